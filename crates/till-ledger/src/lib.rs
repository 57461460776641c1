//! till-ledger

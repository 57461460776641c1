//! till-ledger-fdb

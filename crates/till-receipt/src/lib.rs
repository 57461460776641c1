//! till-receipt

//! till-proxy

//! Proxy end-to-end tests (see tests/proxy/).

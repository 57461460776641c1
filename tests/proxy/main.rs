//! Proxy end-to-end tests: real loopback upstreams, real HTTP clients, the real embedded
//! ledger, the in-process `App` on port 0, and the real `till serve` binary for the main
//! flows. Every wait is bounded.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

mod adversarial;
mod binary;
mod ceilings;
mod failures;
mod hygiene;
mod keys;
mod limits;
mod retention;
mod rotation;
mod streaming;
mod tls;
mod voids;

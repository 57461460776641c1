//! End-to-end tests of the real `till` binary in a temp data dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod fixture;
mod keys;
mod ledger;

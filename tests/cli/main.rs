//! End-to-end tests of the real `till` binary in a temp data dir.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod damage;
mod fixture;
mod fleet_shapes;
#[path = "../fleet/shapes.rs"]
mod fleet_shapes_shared;
mod keys;
mod ledger;
mod lifecycle;

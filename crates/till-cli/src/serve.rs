//! `till serve`. (Placeholder; the proxy work fills this in.)

use std::path::Path;
use std::process::ExitCode;

/// Arguments of `till serve`.
#[derive(Debug, clap::Args)]
pub struct ServeArgs {}

/// Runs the proxy until interrupted.
pub fn run(_args: ServeArgs, _dir: Option<&Path>) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}

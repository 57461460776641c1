//! `till revoke`, `usage`, `receipt verify`, `audit`. (Filled in with the ledger.)

use std::process::ExitCode;

use anyhow::{bail, Result};

use crate::datadir::DataDir;

/// `till revoke` arguments.
#[derive(Debug, clap::Args)]
pub struct RevokeArgs {
    /// A key (or `-`), or a block's revocation id in hex.
    pub target: String,
}

/// `till usage` arguments.
#[derive(Debug, clap::Args)]
pub struct UsageArgs {
    /// The key, or `-`.
    pub token: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `till audit` arguments.
#[derive(Debug, clap::Args)]
pub struct AuditArgs {
    /// The key (any key of the family), or `-`.
    pub token: String,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
}

/// `till receipt` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ReceiptCommand {
    /// Verify one receipt's signature offline.
    Verify {
        /// The receipt (compact JWS), or `-`.
        receipt: String,
        /// Receipt public key file (default: the data dir's receipt.pub.jwk).
        #[arg(long, value_name = "FILE")]
        public_key: Option<std::path::PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// `till revoke`.
pub fn revoke(_dir: &DataDir, _args: RevokeArgs) -> Result<ExitCode> {
    bail!("not implemented yet")
}
/// `till usage`.
pub fn usage(_dir: &DataDir, _args: UsageArgs) -> Result<ExitCode> {
    bail!("not implemented yet")
}
/// `till receipt`.
pub fn receipt(_dir: &DataDir, _cmd: ReceiptCommand) -> Result<ExitCode> {
    bail!("not implemented yet")
}
/// `till audit`.
pub fn audit(_dir: &DataDir, _args: AuditArgs) -> Result<ExitCode> {
    bail!("not implemented yet")
}

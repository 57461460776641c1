//! Argument parsing and dispatch.

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;

use crate::datadir::DataDir;
use crate::keys::{self, CaveatArgs};
use crate::{ledger_cmds, mock, serve};

/// Exit code: runtime error.
pub const EXIT_RUNTIME: u8 = 1;
/// Exit code: usage or configuration error.
pub const EXIT_USAGE: u8 = 2;
/// Exit code: a key, receipt or audit did not verify.
pub const EXIT_INVALID: u8 = 3;

/// Scoped, activation-limited API keys for AI agents.
#[derive(Debug, clap::Parser)]
#[command(name = "till", version, about, long_about = None)]
pub struct Cli {
    /// Data directory (keys and embedded ledger). Default: $TILL_DATA_DIR, else
    /// $XDG_DATA_HOME/till, else ~/.local/share/till.
    #[arg(long, global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum Command {
    /// Create the data dir with a root (minting) key and a receipt key; prints public keys.
    /// With `--rotate root|receipt`, replace that key in an existing data dir (the old
    /// public key stays in keys.json; a running server is told to reload).
    Keygen {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Rotate the root or receipt key of an existing data dir.
        #[arg(long, value_enum, value_name = "root|receipt")]
        rotate: Option<crate::keys_cmd::RotateWhat>,
    },
    /// List the data dir's root and receipt keys, or retire an earlier root key.
    Keys {
        #[command(subcommand)]
        command: crate::keys_cmd::KeysCommand,
    },
    /// The encrypted credential store: real upstream credentials, sealed under a master
    /// key kept outside the data dir.
    Credential {
        #[command(subcommand)]
        command: crate::credential::CredentialCommand,
    },
    /// Mint a key (offline; a signature, no ledger write). Prints only the key.
    Mint {
        /// Upstream this key is for (e.g. openai).
        #[arg(long)]
        upstream: String,
        /// Private root key file (default: the data dir's root.key.jwk).
        #[arg(long, value_name = "FILE")]
        key: Option<PathBuf>,
        /// A human label for the key family (shown by the admin API and dashboard).
        #[arg(long, value_name = "TEXT")]
        label: Option<String>,
        #[command(flatten)]
        caveats: CaveatArgs,
    },
    /// Narrow a key offline (no root key, no network). Prints only the new key.
    Attenuate {
        /// The key to narrow, or `-` to read it from stdin.
        token: String,
        /// Restate the upstream (must equal the key's).
        #[arg(long)]
        upstream: Option<String>,
        #[command(flatten)]
        caveats: CaveatArgs,
    },
    /// Show a key's blocks, caveats, caps, revocation ids and effective scope.
    Inspect {
        /// The key, or `-` to read it from stdin.
        token: String,
        /// Root public key file to verify the signature with.
        #[arg(long, value_name = "FILE")]
        public_key: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
        /// Price per 1000 output tokens (any currency), to show the worst case as money.
        #[arg(long, value_name = "PRICE")]
        price_per_1k_output: Option<f64>,
    },
    /// Run the proxy.
    Serve(serve::ServeArgs),
    /// Revoke a key (and everything derived from it) by key or revocation id.
    Revoke(ledger_cmds::RevokeArgs),
    /// Activations used, cap and remaining for every block of a key.
    Usage(ledger_cmds::UsageArgs),
    /// Work with activation receipts.
    Receipt {
        #[command(subcommand)]
        command: ledger_cmds::ReceiptCommand,
    },
    /// Export and prune receipts beyond a retention (a bounded ledger).
    Receipts {
        #[command(subcommand)]
        command: crate::receipts_export::ReceiptsCommand,
    },
    /// Verify a key family's whole receipt chain: signatures, no gap, no fork, no over-cap.
    Audit(ledger_cmds::AuditArgs),
    /// Check or repair the data dir's embedded ledger file.
    Ledger {
        #[command(subcommand)]
        command: crate::ledger_check::LedgerCommand,
    },
    /// Mint an admin key (for the admin API of `till serve`); prints only the key.
    AdminKey(crate::admin::AdminKeyArgs),
    /// Follow a running server's live events (claims, refusals, revocations, alerts).
    Watch(crate::admin::WatchArgs),
    /// Run a local OpenAI-compatible mock upstream (for trying Till and load tests).
    MockUpstream(mock::MockArgs),
}

/// A failure with a specific exit code.
#[derive(Debug)]
pub struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    /// Usage / configuration error (exit 2).
    pub fn usage(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_USAGE,
            message: message.into(),
        }
    }
    /// Usage error from any error.
    pub fn usage_from(e: impl fmt::Display) -> Self {
        Self::usage(e.to_string())
    }
    /// Verification failure (exit 3).
    pub fn invalid(e: impl fmt::Display) -> Self {
        Self::invalid_msg(e.to_string())
    }
    /// Verification failure with a message (exit 3).
    pub fn invalid_msg(message: impl Into<String>) -> Self {
        Failure {
            code: EXIT_INVALID,
            message: message.into(),
        }
    }
    /// The process exit code.
    pub fn exit_code(&self) -> u8 {
        self.code
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Failure {}

/// Runs one command.
pub fn run(cli: Cli) -> Result<ExitCode> {
    let explicit_dir =
        cli.dir.is_some() || std::env::var_os(crate::datadir::ENV_DATA_DIR).is_some();
    let dir = DataDir::resolve(cli.dir.as_deref())?;
    match cli.command {
        Command::Keygen { json, rotate } => match rotate {
            Some(what) => crate::keys_cmd::rotate(&dir, what, json),
            None => keys::keygen(&dir, json),
        },
        Command::Keys { command } => crate::keys_cmd::keys(&dir, command),
        Command::Credential { command } => crate::credential::run(&dir, command),
        Command::Mint {
            upstream,
            key,
            label,
            caveats,
        } => {
            keys::check_upstream(&upstream)?;
            keys::mint_cmd(&dir, key, upstream, label, &caveats)
        }
        Command::Attenuate {
            token,
            upstream,
            caveats,
        } => keys::attenuate_cmd(&token, &caveats, upstream),
        Command::Inspect {
            token,
            public_key,
            json,
            price_per_1k_output,
        } => keys::inspect_cmd(
            &dir,
            explicit_dir,
            &token,
            public_key,
            json,
            price_per_1k_output,
        ),
        Command::Serve(args) => serve::run(args, cli.dir.as_deref()),
        Command::Revoke(args) => ledger_cmds::revoke(&dir, args),
        Command::Usage(args) => ledger_cmds::usage(&dir, args),
        Command::Receipt { command } => ledger_cmds::receipt(&dir, command),
        Command::Receipts { command } => crate::receipts_export::run(&dir, command),
        Command::Audit(args) => ledger_cmds::audit(&dir, args),
        Command::Ledger { command } => crate::ledger_check::run(&dir, command),
        Command::MockUpstream(args) => mock::run(args),
        Command::AdminKey(args) => crate::admin::admin_key_cmd(&dir, args),
        Command::Watch(args) => crate::admin::watch_cmd(&dir, args),
    }
}

//! `till ledger check` / `till ledger repair`, and the checked open of the data dir's
//! embedded ledger that `till serve` and the ledger commands use.
//!
//! Fail closed, never silently reset (`spec/ledger.md`, "Damage and identity"): a
//! truncated, corrupted, emptied or foreign `ledger.redb` is a clear error (exit 1), never
//! a panic and never a fresh start.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use serde_json::json;
use till_ledger::{EmbeddedConfig, EmbeddedLedger, LedgerBinding, LedgerError, OpenChecks};

use crate::datadir::DataDir;

/// `till ledger` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum LedgerCommand {
    /// Check the data dir's embedded ledger without changing it: redb's integrity check
    /// (every page checksum), every receipt readable, every chain linked, counters and
    /// chain heads consistent, and the ledger id this data dir expects. Exit 0 healthy,
    /// 1 damaged or foreign.
    Check {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Repair the data dir's embedded ledger in place, after copying it to
    /// `ledger.redb.bak-<unix time>`: redb drops a damaged newest commit (its claims are
    /// lost and their slots may be taken again) and rebuilds its allocator state; then the
    /// ledger must pass the consistency check. Stop `till serve` first.
    Repair {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

/// Runs `f` with panic messages silenced: redb asserts on some damaged files, the ledger
/// turns that into an error, and the user should see that error, not a panic report.
pub fn quiet<T>(f: impl FnOnce() -> T) -> T {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = f();
    std::panic::set_hook(previous);
    out
}

/// Opens the data dir's embedded ledger with every check: the ledger id it must have
/// (recorded in the data dir, bound to its receipt key) and, with `integrity`, redb's full
/// integrity check. Records the ledger id on first use.
pub fn open_embedded(
    dir: &DataDir,
    config: EmbeddedConfig,
    integrity: bool,
) -> Result<EmbeddedLedger, LedgerError> {
    let binding = dir
        .ledger_binding(config.signer.key_id())
        .map_err(|e| open_error(dir, format!("{e:#}")))?;
    let checks = OpenChecks { binding, integrity };
    let ledger = quiet(|| EmbeddedLedger::open_checked(dir.ledger_path(), config, &checks))?;
    if let Some(id) = ledger.ledger_id() {
        dir.record_ledger_id(id)
            .map_err(|e| open_error(dir, format!("{e:#}")))?;
    }
    Ok(ledger)
}

fn open_error(dir: &DataDir, reason: String) -> LedgerError {
    LedgerError::Open {
        path: dir.ledger_path().display().to_string(),
        reason,
    }
}

/// `till ledger ...`.
pub fn run(dir: &DataDir, cmd: LedgerCommand) -> Result<ExitCode> {
    match cmd {
        LedgerCommand::Check { json } => check(dir, json),
        LedgerCommand::Repair { json } => repair(dir, json),
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn sibling(dir: &DataDir, suffix: &str) -> PathBuf {
    let mut name = dir.ledger_path().into_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// The ledger id must be the one this data dir expects (the same rule as opening).
fn check_binding(dir: &DataDir, ledger_id: Option<&str>) -> Result<()> {
    let kid = dir.receipt_public()?.key_id().to_owned();
    match (dir.ledger_binding(&kid)?, ledger_id) {
        (LedgerBinding::Expect(want), Some(have)) if want == have => Ok(()),
        (LedgerBinding::Expect(want), have) => bail!(
            "this is not this data dir's ledger: it is {}, {} names {want}",
            have.unwrap_or("a ledger without an id"),
            dir.path().join("ledger.id").display()
        ),
        (LedgerBinding::Adopt { .. }, None) => Ok(()),
        (LedgerBinding::Adopt { kid, .. }, Some(have)) => {
            if have.rsplit_once('@').map(|(_, k)| k) == Some(kid.as_str()) {
                Ok(())
            } else {
                bail!(
                    "this ledger ({have}) belongs to another receipt key than this data \
                     dir's ({kid})"
                )
            }
        }
        (LedgerBinding::Unbound, _) => Ok(()),
    }
}

fn check(dir: &DataDir, json: bool) -> Result<ExitCode> {
    let path = dir.ledger_path();
    let scratch = sibling(dir, &format!(".check-{}", std::process::id()));
    let summary = quiet(|| till_ledger::check_file(&path, &scratch))
        .with_context(|| format!("checking {}", path.display()))?;
    check_binding(dir, summary.ledger_id.as_deref())
        .with_context(|| format!("checking {}", path.display()))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({ "healthy": true, "ledger": summary }))?
        );
    } else {
        println!("ledger:   {}", path.display());
        println!(
            "id:       {}",
            summary.ledger_id.as_deref().unwrap_or("(none yet)")
        );
        println!("schema:   {}", summary.schema_version);
        println!(
            "contents: {} families, {} receipts, {} counters, {} revoked",
            summary.families, summary.receipts, summary.counters, summary.revoked
        );
        println!("integrity check passed; every chain linked; counters agree");
    }
    Ok(ExitCode::SUCCESS)
}

fn repair(dir: &DataDir, json: bool) -> Result<ExitCode> {
    let path = dir.ledger_path();
    let backup = sibling(dir, &format!(".bak-{}", unix_now()));
    let outcome = quiet(|| till_ledger::repair_file(&path, &backup))
        .with_context(|| format!("repairing {}", path.display()))?;
    check_binding(dir, outcome.summary.ledger_id.as_deref())
        .with_context(|| format!("repairing {}", path.display()))?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({
                "backup": backup.display().to_string(),
                "outcome": outcome,
            }))?
        );
    } else {
        println!("backup:   {}", backup.display());
        if outcome.was_clean {
            println!("redb:     the file passed its integrity check unchanged");
        } else {
            println!(
                "redb:     repaired (a damaged newest commit was dropped: claims it held are \
                 lost, and receipts clients hold for them will show as a fork in an audit)"
            );
        }
        if outcome.cleared_mark {
            println!("cleared:  the failed-integrity-check mark");
        }
        println!(
            "contents: {} families, {} receipts; every chain linked; counters agree",
            outcome.summary.families, outcome.summary.receipts
        );
    }
    Ok(ExitCode::SUCCESS)
}

//! `till receipts export`: a bounded ledger (spec/ledger.md §10). Receipts beyond the
//! retention go to append-only JSON-lines files and leave the ledger, each pruned range
//! leaving a signed checkpoint; `till audit` proves the chain from both.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Result;
use till_ledger::retention::{export_and_prune, Checkpoint, ExportLease, Retention};
use till_ledger::{EmbeddedConfig, LedgerError, RetentionStore};
use till_receipt::{Receipt, ReceiptKeySet};

use crate::cli::Failure;
use crate::datadir::DataDir;
use crate::ledger_cmds::{open_fdb_cli, LedgerKind, LedgerLocation};

/// The export directory's name in the data dir (the default of `--dir` and of
/// `till audit --exported`).
pub const EXPORT_DIR: &str = "receipts";

/// How long an export by hand holds the export lease at most (it gives it back when done).
const CLI_LEASE_SECS: u64 = 3600;

/// `till receipts` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ReceiptsCommand {
    /// Export the receipts beyond a retention to append-only JSON-lines files
    /// (`<family>.jsonl`) and prune them from the ledger, leaving a signed checkpoint per
    /// pruned range. Counters and revocations are never pruned. The embedded ledger needs
    /// its file (stop `till serve` first, or set `[retention]` to let it export itself);
    /// `--ledger fdb:CLUSTER_FILE` exports from a FoundationDB key space while the fleet
    /// runs, unless a proxy with `[retention]` holds the key space's export lease.
    Export(ExportArgs),
}

/// `till receipts export` arguments.
#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// Keep this many newest receipts of every family (at least 1 is always kept).
    #[arg(long, value_name = "N")]
    pub keep: Option<u64>,
    /// Keep receipts younger than this (e.g. `30d`, `12h`).
    #[arg(long = "max-age", value_name = "DURATION")]
    pub max_age: Option<humantime::Duration>,
    /// Export directory (default: the data dir's `receipts/`).
    #[arg(long = "export-dir", value_name = "DIR")]
    pub export_dir: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    pub json: bool,
    /// Which ledger.
    #[command(flatten)]
    pub location: LedgerLocation,
}

/// The export directory: `--export-dir`, else the data dir's.
pub fn export_dir(dir: &DataDir, explicit: Option<&Path>) -> PathBuf {
    explicit.map_or_else(|| dir.path().join(EXPORT_DIR), Path::to_path_buf)
}

/// `till receipts ...`.
pub fn run(dir: &DataDir, cmd: ReceiptsCommand) -> Result<ExitCode> {
    let ReceiptsCommand::Export(args) = cmd;
    if args.keep.is_none() && args.max_age.is_none() {
        return Err(Failure::usage("give --keep N and/or --max-age DURATION").into());
    }
    let retention = Retention {
        keep: args.keep,
        max_age_secs: args.max_age.map(|d| d.as_secs()),
    };
    let out = export_dir(dir, args.export_dir.as_deref());
    let signer = Arc::new(dir.receipt_signer()?);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let rt = crate::ledger_cmds::runtime()?;
    let report = rt.block_on(async {
        let store = open_store(dir, &args, signer).await?;
        // One exporter per ledger: refused while a proxy of the fleet holds the lease; held
        // for this run only, and given back either way.
        let holder = format!("till-cli (pid {})", std::process::id());
        let lease = ExportLease {
            holder: holder.clone(),
            dir: out.display().to_string(),
            until: now.saturating_add(CLI_LEASE_SECS),
        };
        store.lease_export(&lease, now).await?;
        let report = export_and_prune(store.as_ref(), retention, &out, now).await;
        if let Err(e) = store.release_export(&holder).await {
            eprintln!(
                "warning: could not give the export lease back ({e}); it lapses by itself at \
                 {} (Unix time)",
                lease.until
            );
        }
        Ok::<_, anyhow::Error>(report?)
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "exported {} receipts ({} of them voids) to {}, pruned {} from the ledger ({} \
             families, {} idempotency records)",
            report.exported,
            report.voids,
            out.display(),
            report.pruned,
            report.families,
            report.idempotency_removed
        );
        if report.swept > 0 {
            println!(
                "removed {} journal entries of pruned receipts",
                report.swept
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The ledger named by `--ledger`, as a retention store.
async fn open_store(
    dir: &DataDir,
    args: &ExportArgs,
    signer: Arc<till_receipt::ReceiptSigner>,
) -> Result<Arc<dyn RetentionStore>> {
    match args.location.kind()? {
        LedgerKind::Embedded => {
            let config = EmbeddedConfig::new(signer, "till-cli");
            match crate::ledger_check::open_embedded(dir, config, true) {
                Ok(l) => Ok(Arc::new(l)),
                Err(LedgerError::Locked { .. }) => Err(Failure::invalid_msg(format!(
                    "{} is in use (a running till serve?): stop it to export, or give it a \
                     [retention] section to export while it runs",
                    dir.ledger_path().display()
                ))
                .into()),
                Err(e) => Err(anyhow::Error::new(e)),
            }
        }
        LedgerKind::Fdb(cluster_file) => {
            Ok(open_fdb_cli(signer, cluster_file, &args.location.keyspace)
                .await?
                .1)
        }
    }
}

/// A family's whole chain for `till audit`: the exported receipts that the ledger no
/// longer holds, then the ledger's own (`kept`, in seq order), checked against the
/// checkpoints (the ledger's and the export directory's). Returns the chain and the last
/// pruned seq (0: nothing was pruned).
pub fn whole_chain(
    export: &Path,
    family_hex: &str,
    kept: Vec<Receipt>,
    ledger_checkpoints: Vec<Checkpoint>,
    keys: &ReceiptKeySet,
) -> Result<(Vec<Receipt>, u64)> {
    till_ledger::retention::whole_chain(export, family_hex, kept, ledger_checkpoints, keys)
        .map_err(|e| Failure::invalid_msg(format!("audit failed: {e}")).into())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use till_ledger::{ClaimRequest, EmbeddedLedger, Ledger, Level, RequestDigest};
    use till_receipt::ReceiptSigner;

    use super::*;

    fn request(levels: &[Level]) -> ClaimRequest {
        ClaimRequest {
            levels: levels.to_vec(),
            idempotency_key: None,
            request: RequestDigest {
                method: "GET".into(),
                upstream: "u".into(),
                path: "/".into(),
                body_sha256: "00".repeat(32),
                model: None,
                query: None,
                content_type: None,
            },
            now: 1_000,
            not_after: None,
            meta: None,
            windows: Vec::new(),
            ceilings: None,
        }
    }

    /// `till audit`'s chain: the exported receipts plus the ledger's, checked against the
    /// checkpoints; an export interrupted before pruning (receipts in both) is accepted
    /// when both copies agree; a missing export file or a deleted range is not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn whole_chain_joins_export_and_ledger() {
        let dir = tempfile::tempdir().unwrap();
        let export = dir.path().join("receipts");
        let signer = Arc::new(ReceiptSigner::from_seed([8; 32]));
        let keys: ReceiptKeySet = [signer.public_key()].into_iter().collect();
        let ledger = EmbeddedLedger::open(
            dir.path().join("ledger.redb"),
            EmbeddedConfig::new(Arc::clone(&signer), "t"),
        )
        .unwrap();
        let levels = vec![Level {
            revocation_id: vec![3; 64],
            cap: None,
        }];
        let family = hex::encode(&levels[0].revocation_id);
        for _ in 0..6 {
            ledger.claim(request(&levels)).await.unwrap().unwrap();
        }
        let all = ledger
            .receipts(&levels[0].revocation_id, 1, 100)
            .await
            .unwrap();
        // Nothing pruned: the ledger's chain as it is.
        let (chain, pruned) =
            whole_chain(&export, &family, all.clone(), Vec::new(), &keys).unwrap();
        assert_eq!((chain.len(), pruned), (6, 0));

        let keep = Retention {
            keep: Some(2),
            max_age_secs: None,
        };
        ledger.export_and_prune(keep, &export, 2_000).await.unwrap();
        let kept = ledger
            .receipts(&levels[0].revocation_id, 1, 100)
            .await
            .unwrap();
        let checkpoints = ledger.checkpoints(&levels[0].revocation_id).await.unwrap();
        let (chain, pruned) =
            whole_chain(&export, &family, kept.clone(), checkpoints.clone(), &keys).unwrap();
        assert_eq!(pruned, 4);
        assert_eq!(chain, all);
        till_receipt::audit_chain(&chain, &keys).unwrap();
        // Exported but not pruned yet (an interrupted export): both copies agree.
        let file = till_ledger::retention::receipts_file(&export, &family);
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str(&format!(
            "{{\"seq\":{},\"receipt\":\"{}\"}}\n",
            kept[0].body().seq,
            kept[0].compact()
        ));
        std::fs::write(&file, text).unwrap();
        let (chain, _) =
            whole_chain(&export, &family, kept.clone(), checkpoints.clone(), &keys).unwrap();
        assert_eq!(chain, all);
        // The ledger's checkpoints alone (the checkpoints file lost) still suffice.
        std::fs::remove_file(till_ledger::retention::checkpoints_file(&export, &family)).unwrap();
        assert!(whole_chain(&export, &family, kept.clone(), checkpoints.clone(), &keys).is_ok());
        // Receipts gone from the ledger without a checkpoint: refused.
        assert!(whole_chain(
            &export,
            &family,
            kept[1..].to_vec(),
            checkpoints.clone(),
            &keys
        )
        .is_err());
        // The export file lost: refused.
        std::fs::remove_file(till_ledger::retention::receipts_file(&export, &family)).unwrap();
        assert!(whole_chain(&export, &family, kept, checkpoints, &keys).is_err());
    }
}

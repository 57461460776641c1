//! `[retention]` in `till serve`: exports and prunes the receipts beyond the retention in
//! the background, every `interval` (spec/ledger.md §10, spec/config.md). Never on the
//! request path: a run is its own task (file writes and fsyncs on the blocking pool), its
//! ledger work is ordinary transactions ordered with claims, and a failed run is logged
//! and counted (`till_retention_failures_total`) and retried at the next interval — it
//! never stops the proxy. A run that stopped half-way resumes at the next one without
//! writing anything twice. In a FoundationDB fleet one proxy exports: each run first
//! takes or renews the key space's export lease, and a run finding it held by another
//! proxy is skipped (`till_retention_skipped_total`).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use till_ledger::retention::{export_and_prune, ExportLease, Retention};
use till_ledger::{LedgerError, RetentionStore};
use till_proxy::metrics::RetentionCounters;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What one background retention needs.
#[derive(Debug)]
pub struct RetentionTask {
    /// The ledger (the same one the proxy claims against).
    pub store: Arc<dyn RetentionStore>,
    /// This proxy's id: the holder of the export lease while it is the exporter.
    pub holder: String,
    /// What stays in the ledger.
    pub retention: Retention,
    /// Where receipts and checkpoints are exported.
    pub dir: PathBuf,
    /// Time between runs (the first run starts at once).
    pub interval: Duration,
    /// Metrics.
    pub counters: RetentionCounters,
}

impl RetentionTask {
    /// Runs until `stop` turns true (a run in progress finishes first).
    pub fn spawn(self, mut stop: watch::Receiver<bool>) -> JoinHandle<()> {
        tokio::spawn(async move {
            let mut ticker = tokio::time::interval(self.interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                self.run_once().await;
            }
        })
    }

    async fn run_once(&self) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        // One exporter per ledger: in a fleet, the proxy holding the lease exports, and
        // keeps it by renewing it every run; the others skip until it lapses.
        let lease = ExportLease {
            holder: self.holder.clone(),
            dir: self.dir.display().to_string(),
            until: now.saturating_add(lease_secs(self.interval)),
        };
        match self.store.lease_export(&lease, now).await {
            Ok(()) => {}
            Err(LedgerError::ExportLeased { holder, dir, until }) => {
                self.counters.skipped.inc();
                tracing::info!(
                    exporter = %holder,
                    exporter_dir = %dir,
                    lease_until = until,
                    "retention: skipped, another proxy exports this ledger"
                );
                return;
            }
            Err(e) => {
                self.counters.failures.inc();
                tracing::warn!(
                    error = %e,
                    retry_in = %humantime::format_duration(self.interval),
                    "retention: cannot take the export lease; retrying at the next interval"
                );
                return;
            }
        }
        let (store, retention, dir) = (Arc::clone(&self.store), self.retention, self.dir.clone());
        let handle = tokio::runtime::Handle::current();
        // On the blocking pool: the export appends and fsyncs files.
        let outcome = tokio::task::spawn_blocking(move || {
            handle.block_on(export_and_prune(store.as_ref(), retention, &dir, now))
        })
        .await;
        match outcome {
            Ok(Ok(report)) => {
                self.counters.runs.inc();
                self.counters.pruned.inc_by(report.pruned);
                self.counters
                    .last_success
                    .set(i64::try_from(now).unwrap_or(i64::MAX));
                if report.pruned > 0 || report.exported > 0 || report.swept > 0 {
                    tracing::info!(
                        exported = report.exported,
                        pruned = report.pruned,
                        families = report.families,
                        checkpoints = report.checkpoints,
                        journal_swept = report.swept,
                        dir = %self.dir.display(),
                        "retention: receipts exported and pruned"
                    );
                }
            }
            Ok(Err(e)) => {
                self.counters.failures.inc();
                tracing::warn!(
                    error = %e,
                    dir = %self.dir.display(),
                    retry_in = %humantime::format_duration(self.interval),
                    "retention: export and prune failed (nothing pruned that was not exported); \
                     retrying at the next interval"
                );
            }
            Err(e) => {
                self.counters.failures.inc();
                tracing::error!(error = %e, "retention: the export task stopped unexpectedly");
            }
        }
    }
}

/// How long the export lease runs past each run: three intervals (at least five
/// minutes), so a live exporter keeps it and a stopped one hands over within that time.
fn lease_secs(interval: Duration) -> u64 {
    interval.as_secs().saturating_mul(3).max(300)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use till_ledger::retention::{ExportLease, Retention};
    use till_ledger::RetentionStore;
    use till_ledger_fdb::memory::MemoryStore;
    use till_ledger_fdb::{FdbConfig, KvLedger};
    use till_proxy::metrics::RetentionCounters;
    use till_receipt::ReceiptSigner;

    use super::RetentionTask;

    fn task(store: Arc<dyn RetentionStore>, dir: &std::path::Path) -> RetentionTask {
        RetentionTask {
            store,
            holder: "p2".into(),
            retention: Retention {
                keep: Some(1),
                max_age_secs: None,
            },
            dir: dir.to_path_buf(),
            interval: Duration::from_secs(60),
            counters: RetentionCounters::default(),
        }
    }

    /// Two proxies of a fleet on one key space (the in-memory FoundationDB model). While
    /// `p1` holds the export lease, `p2`'s run is skipped — counted as skipped, not as a
    /// failure, and nothing exported; once `p1` gives the lease back, `p2`'s next run takes
    /// it and exports.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_run_is_skipped_while_another_proxy_holds_the_export_lease() {
        let store = MemoryStore::new();
        let signer = Arc::new(ReceiptSigner::generate());
        let p1 = KvLedger::open(
            Arc::new(store.clone()),
            &FdbConfig::new(Arc::clone(&signer), "p1"),
        )
        .await
        .unwrap();
        let p2 = KvLedger::open(Arc::new(store), &FdbConfig::new(signer, "p2"))
            .await
            .unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let lease = ExportLease {
            holder: "p1".into(),
            dir: "/srv/receipts".into(),
            until: now + 600,
        };
        p1.lease_export(&lease, now).await.unwrap();

        let dir = tempfile::tempdir().unwrap();
        let exports = dir.path().join("receipts");
        let t = task(Arc::new(p2), &exports);
        t.run_once().await;
        let c = &t.counters;
        assert_eq!((c.skipped.get(), c.failures.get(), c.runs.get()), (1, 0, 0));
        assert!(!exports.exists(), "nothing exported");

        p1.release_export("p1").await.unwrap();
        t.run_once().await;
        assert_eq!((c.skipped.get(), c.failures.get(), c.runs.get()), (1, 0, 1));
        assert!(exports.is_dir());
        // p2 now holds it: p1 is refused.
        assert!(p1.lease_export(&lease, now).await.is_err());
    }
}

//! `[retention]` in `till serve`: exports and prunes the receipts beyond the retention in
//! the background, every `interval` (spec/ledger.md §10, spec/config.md). Never on the
//! request path: a run is its own task (file writes and fsyncs on the blocking pool), its
//! ledger work is ordinary transactions ordered with claims, and a failed run is logged
//! and counted (`till_retention_failures_total`) and retried at the next interval — it
//! never stops the proxy. A run that stopped half-way resumes at the next one without
//! writing anything twice.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use till_ledger::retention::{export_and_prune, Retention};
use till_ledger::RetentionStore;
use till_proxy::metrics::RetentionCounters;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// What one background retention needs.
#[derive(Debug)]
pub struct RetentionTask {
    /// The ledger (the same one the proxy claims against).
    pub store: Arc<dyn RetentionStore>,
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

//! The backend conformance suite on the embedded (redb) ledger, with group commit on
//! (`max_batch` 256) and off (`max_batch` 1).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use till_ledger::conformance::{self, Harness};
use till_ledger::{AlertPolicy, EmbeddedConfig, EmbeddedLedger};
use till_receipt::{ReceiptKeySet, ReceiptSigner};

/// A fresh ledger in a fresh temp dir (keep the dir alive as long as the ledger).
fn harness(max_batch: usize) -> (Harness, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(ReceiptSigner::generate());
    let mut keys = ReceiptKeySet::new();
    keys.insert(signer.public_key());
    let config = EmbeddedConfig {
        signer,
        proxy_id: "conformance".into(),
        max_batch,
        claim_timeout: Duration::from_secs(30),
        alerts: AlertPolicy::default(),
    };
    let ledger = EmbeddedLedger::open(dir.path().join("ledger.redb"), config).unwrap();
    (
        Harness {
            ledger: Arc::new(ledger),
            keys,
        },
        dir,
    )
}

macro_rules! cases {
    ($mode:ident, $max_batch:expr, [$($case:ident),* $(,)?]) => {
        mod $mode {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let (h, _dir) = super::harness($max_batch);
                    super::conformance::$case(h).await;
                }
            )*
        }
    };
}

cases!(
    group_commit_on,
    256,
    [
        concurrent_tree_claims,
        hot_token_exact_cap,
        slots_chain_and_remaining,
        idempotent_replay,
        concurrent_duplicate_claims,
        sibling_cannot_replay_idempotency_key,
        revocation_at_each_level,
        expired_refused,
        refusal_writes_nothing,
        unknown_blocks_and_idempotent_revoke,
        generated_idempotency_keys,
        invalid_requests_rejected,
        families_and_blocks_recorded,
        threshold_alerts_exactly_once,
        alert_outbox_lease_and_settle,
        revocation_alert_once,
        windowed_caps_exact_under_concurrency,
        windowed_refusal_writes_nothing,
        void_restores_exactly_one_slot,
        double_void_is_a_no_op,
        void_of_unknown_seq_refused,
        retry_after_void_claims_afresh,
        caps_exact_under_concurrent_claims_and_voids,
        void_restores_window_slot,
    ]
);

cases!(
    group_commit_off,
    1,
    [
        concurrent_tree_claims,
        hot_token_exact_cap,
        slots_chain_and_remaining,
        idempotent_replay,
        concurrent_duplicate_claims,
        sibling_cannot_replay_idempotency_key,
        revocation_at_each_level,
        expired_refused,
        refusal_writes_nothing,
        unknown_blocks_and_idempotent_revoke,
        generated_idempotency_keys,
        invalid_requests_rejected,
        families_and_blocks_recorded,
        threshold_alerts_exactly_once,
        alert_outbox_lease_and_settle,
        revocation_alert_once,
        windowed_caps_exact_under_concurrency,
        windowed_refusal_writes_nothing,
        void_restores_exactly_one_slot,
        double_void_is_a_no_op,
        void_of_unknown_seq_refused,
        retry_after_void_claims_afresh,
        caps_exact_under_concurrent_claims_and_voids,
        void_restores_window_slot,
    ]
);

/// `run_all` is the entry point other backends use: exercise it once end to end.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn run_all_small_batches() {
    let mut dirs = Vec::new();
    conformance::run_all(|| {
        let (h, dir) = harness(8);
        dirs.push(dir);
        async move { h }
    })
    .await;
}

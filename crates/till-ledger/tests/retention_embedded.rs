//! The retention cases of the conformance suite (export, prune, checkpoints;
//! spec/ledger.md §10) on the embedded (redb) ledger.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use tempfile::TempDir;
use till_ledger::conformance::retention::{self, RetentionHarness};
use till_ledger::{AlertPolicy, EmbeddedConfig, EmbeddedLedger};
use till_receipt::{ReceiptKeySet, ReceiptSigner};

/// A fresh ledger in a fresh temp dir (keep the dir alive as long as the ledger).
fn harness() -> (RetentionHarness, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(ReceiptSigner::generate());
    let mut keys = ReceiptKeySet::new();
    keys.insert(signer.public_key());
    let config = EmbeddedConfig {
        signer,
        proxy_id: "conformance".into(),
        max_batch: 64,
        claim_timeout: Duration::from_secs(30),
        alerts: AlertPolicy::default(),
    };
    let ledger = Arc::new(EmbeddedLedger::open(dir.path().join("ledger.redb"), config).unwrap());
    (
        RetentionHarness {
            ledger: Arc::clone(&ledger) as _,
            store: ledger,
            keys,
        },
        dir,
    )
}

macro_rules! cases {
    ([$($case:ident),* $(,)?]) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $case() {
                let (h, _dir) = harness();
                retention::$case(h).await;
            }
        )*
    };
}

cases!([
    prune_by_count,
    prune_by_age,
    pruned_idempotency_keys_claim_afresh,
    claims_concurrent_with_prune,
    interrupted_export_resumes,
    lost_export_file_refused,
    prune_with_voids,
]);

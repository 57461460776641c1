//! Retention cases of the conformance suite (spec/ledger.md §10): export and prune on
//! every backend that implements [`RetentionStore`].

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use till_receipt::{audit_chain, Receipt, ReceiptKeySet};

use super::{bounded, claim_ok, claim_request, level, used, NOW};
use crate::retention::{
    self, check_checkpoints, export_and_prune_chunked, read_export, Checkpoint, ExportReport,
    PruneRange, Pruned, Retention, RetentionStore, StoredRange,
};
use crate::{BoxFuture, Ledger, LedgerError, Level};

/// A fresh, empty backend for the retention cases: the same object as a [`Ledger`] and as
/// a [`RetentionStore`], the keys that verify what it signs, and an empty export
/// directory (removed by the case when it passes).
#[derive(Debug, Clone)]
pub struct RetentionHarness {
    /// The backend as a ledger.
    pub ledger: Arc<dyn Ledger>,
    /// The same backend as a retention store.
    pub store: Arc<dyn RetentionStore>,
    /// Public keys of the backend's receipt signer.
    pub keys: ReceiptKeySet,
}

/// Runs every retention case, each on its own fresh harness from `make`.
pub async fn run_all<F, Fut>(mut make: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = RetentionHarness>,
{
    prune_by_count(make().await).await;
    prune_by_age(make().await).await;
    pruned_idempotency_keys_claim_afresh(make().await).await;
    claims_concurrent_with_prune(make().await).await;
    interrupted_export_resumes(make().await).await;
    lost_export_file_refused(make().await).await;
    prune_with_voids(make().await).await;
}

/// A fresh empty directory under the system temp dir.
fn export_dir(case: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "till-retention-{case}-{}",
        hex::encode(&super::random_revocation_id()[..8])
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// The stored receipts of a family from its first stored one (paged).
async fn stored(ledger: &dyn Ledger, family: &[u8]) -> Vec<Receipt> {
    let mut out: Vec<Receipt> = Vec::new();
    let mut from = 1;
    loop {
        let page = ledger.receipts(family, from, 64).await.unwrap();
        let Some(last) = page.last() else {
            return out;
        };
        from = last.body().seq + 1;
        out.extend(page);
    }
}

/// The audit `till audit --exported` runs: exported + kept receipts are `seq` 1..=n
/// exactly once and audit clean, the ledger's checkpoints verify and state exactly what
/// the chain holds, and the checkpoints file holds the ledger's checkpoints. Returns
/// (exported receipts, kept receipts, checkpoints).
async fn audit_whole(
    h: &RetentionHarness,
    dir: &Path,
    family: &[u8],
    n: u64,
) -> (Vec<Receipt>, Vec<Receipt>, Vec<Checkpoint>) {
    let family_hex = hex::encode(family);
    let (exported, file_checkpoints) = read_export(dir, &family_hex).unwrap();
    let kept = stored(h.ledger.as_ref(), family).await;
    let chain: Vec<Receipt> = exported.iter().chain(&kept).cloned().collect();
    let seqs: Vec<u64> = chain.iter().map(|r| r.body().seq).collect();
    assert_eq!(
        seqs,
        (1..=n).collect::<Vec<_>>(),
        "exported + kept receipts are seq 1..={n}, each exactly once"
    );
    let report = audit_chain(&chain, &h.keys)
        .unwrap_or_else(|e| panic!("audit of exported + kept receipts failed: {e}"));
    assert_eq!(report.receipts, n);
    let checkpoints = h.ledger.checkpoints(family).await.unwrap();
    let last = check_checkpoints(&chain, &checkpoints, &h.keys)
        .unwrap_or_else(|e| panic!("checkpoints do not match the chain: {e}"));
    assert_eq!(
        last,
        exported.len() as u64,
        "the checkpoints cover exactly the exported receipts"
    );
    assert_eq!(
        kept.first().map(|r| r.body().seq),
        Some(last + 1),
        "the ledger keeps the receipts after the last checkpoint"
    );
    assert_eq!(
        file_checkpoints, checkpoints,
        "the checkpoints file holds the ledger's checkpoints"
    );
    for c in &checkpoints {
        c.verify(&h.keys).unwrap();
    }
    (exported, kept, checkpoints)
}

async fn claims(ledger: &dyn Ledger, levels: &[Level], n: u64, tag: &str, now: u64) {
    for i in 0..n {
        let mut req = claim_request(levels, Some(&format!("{tag}-{i}")), tag);
        req.now = now;
        claim_ok(ledger, req).await;
    }
}

/// `keep = 3` of 10 receipts: 7 exported and pruned in ranges of at most the chunk size
/// (3 → checkpoints 1..=3, 4..=6, 7..=7), the newest 3 kept, counters untouched; another
/// run prunes nothing more; after more claims, the next run continues the ranges.
pub async fn prune_by_count(h: RetentionHarness) {
    bounded("prune_by_count", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(Some(100)), level(Some(50))];
        let family = levels[0].revocation_id.clone();
        let other = vec![level(None)];
        claims(ledger, &levels, 10, "count", NOW).await;
        claims(ledger, &other, 1, "one", NOW).await;
        let dir = export_dir("count");
        let keep3 = Retention {
            keep: Some(3),
            max_age_secs: None,
        };
        let report = export_and_prune_chunked(h.store.as_ref(), keep3, &dir, NOW, 3)
            .await
            .unwrap();
        assert_eq!(
            (
                report.families,
                report.exported,
                report.pruned,
                report.checkpoints
            ),
            (1, 7, 7, 3),
            "{report:?}"
        );
        assert_eq!(report.idempotency_removed, 7);
        let (_, kept, checkpoints) = audit_whole(&h, &dir, &family, 10).await;
        assert_eq!(kept.len(), 3);
        let ranges: Vec<(u64, u64)> = checkpoints
            .iter()
            .map(|c| (c.body.from_seq, c.body.to_seq))
            .collect();
        assert_eq!(ranges, vec![(1, 3), (4, 6), (7, 7)]);
        assert_eq!(
            used(ledger, &levels).await,
            vec![10, 10],
            "counters never pruned"
        );
        // A family with one receipt keeps it.
        assert_eq!(stored(ledger, &other[0].revocation_id).await.len(), 1);
        assert!(ledger
            .checkpoints(&other[0].revocation_id)
            .await
            .unwrap()
            .is_empty());

        let again = export_and_prune_chunked(h.store.as_ref(), keep3, &dir, NOW, 3)
            .await
            .unwrap();
        assert_eq!(
            again,
            ExportReport::default(),
            "nothing more beyond the retention"
        );

        claims(ledger, &levels, 4, "more", NOW).await;
        let report = retention::export_and_prune(h.store.as_ref(), keep3, &dir, NOW)
            .await
            .unwrap();
        assert_eq!((report.exported, report.pruned), (4, 4), "{report:?}");
        let (_, kept, checkpoints) = audit_whole(&h, &dir, &family, 14).await;
        assert_eq!(kept.len(), 3);
        assert_eq!(
            checkpoints.last().map(|c| (c.body.from_seq, c.body.to_seq)),
            Some((8, 11))
        );
        // keep = 0 still keeps the newest receipt.
        let keep0 = Retention {
            keep: Some(0),
            max_age_secs: None,
        };
        retention::export_and_prune(h.store.as_ref(), keep0, &dir, NOW)
            .await
            .unwrap();
        let (_, kept, _) = audit_whole(&h, &dir, &family, 14).await;
        assert_eq!(
            kept.iter().map(|r| r.body().seq).collect::<Vec<_>>(),
            vec![14]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}

/// `max_age`: receipts whose `iat` is older than the cutoff go, younger ones stay (the
/// walk reads pages of growing size across the old ones); the newest receipt stays even
/// when it is old.
pub async fn prune_by_age(h: RetentionHarness) {
    bounded("prune_by_age", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(Some(100))];
        let family = levels[0].revocation_id.clone();
        claims(ledger, &levels, 40, "old", NOW - 3_000).await;
        claims(ledger, &levels, 3, "young", NOW - 100).await;
        let dir = export_dir("age");
        let hour = Retention {
            keep: None,
            max_age_secs: Some(3_600),
        };
        // Nothing is an hour old at NOW - 1000.
        let none = export_and_prune_chunked(h.store.as_ref(), hour, &dir, NOW - 1_000, 50)
            .await
            .unwrap();
        assert_eq!(none, ExportReport::default());
        let report = export_and_prune_chunked(h.store.as_ref(), hour, &dir, NOW + 1_000, 50)
            .await
            .unwrap();
        assert_eq!(
            (report.exported, report.pruned, report.checkpoints),
            (40, 40, 1),
            "{report:?}"
        );
        let (_, kept, _) = audit_whole(&h, &dir, &family, 43).await;
        assert_eq!(kept.len(), 3);
        assert!(kept.iter().all(|r| r.body().iat == NOW - 100));
        // Everything old: only the newest stays.
        let report = export_and_prune_chunked(h.store.as_ref(), hour, &dir, NOW + 10_000, 2)
            .await
            .unwrap();
        assert_eq!(report.pruned, 2, "{report:?}");
        let (_, kept, _) = audit_whole(&h, &dir, &family, 43).await;
        assert_eq!(
            kept.iter().map(|r| r.body().seq).collect::<Vec<_>>(),
            vec![43]
        );
        assert_eq!(used(ledger, &levels).await, vec![43]);
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}

/// The idempotency record of a pruned receipt goes with it: the same key then claims
/// afresh (charged, a new seq); a kept receipt's key still replays.
pub async fn pruned_idempotency_keys_claim_afresh(h: RetentionHarness) {
    bounded("pruned_idempotency_keys_claim_afresh", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(Some(100)), level(None)];
        let family = levels[0].revocation_id.clone();
        claims(ledger, &levels, 5, "idem", NOW).await;
        let dir = export_dir("idem");
        let keep2 = Retention {
            keep: Some(2),
            max_age_secs: None,
        };
        let report = retention::export_and_prune(h.store.as_ref(), keep2, &dir, NOW)
            .await
            .unwrap();
        assert_eq!((report.pruned, report.idempotency_removed), (3, 3));
        let fresh = claim_ok(ledger, claim_request(&levels, Some("idem-0"), "idem")).await;
        assert!(!fresh.replayed, "a pruned receipt's key claims afresh");
        assert_eq!(fresh.receipt.body().seq, 6);
        let replay = claim_ok(ledger, claim_request(&levels, Some("idem-4"), "idem")).await;
        assert!(replay.replayed, "a kept receipt's key still replays");
        assert_eq!(replay.receipt.body().seq, 5);
        assert_eq!(used(ledger, &levels).await, vec![6, 6]);
        audit_whole(&h, &dir, &family, 6).await;
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}

/// Claims on the family (and others) while exports run: every claim succeeds, nothing
/// is lost or written twice, and exported + kept receipts audit clean.
pub async fn claims_concurrent_with_prune(h: RetentionHarness) {
    bounded("claims_concurrent_with_prune", async {
        let levels = vec![level(Some(1_000)), level(Some(500))];
        let family = levels[0].revocation_id.clone();
        claims(h.ledger.as_ref(), &levels, 20, "pre", NOW).await;
        let dir = export_dir("concurrent");
        let mut claimers = Vec::new();
        for worker in 0..4 {
            let ledger = Arc::clone(&h.ledger);
            let levels = levels.clone();
            claimers.push(tokio::spawn(async move {
                for i in 0..30 {
                    let key = format!("w{worker}-{i}");
                    let answer = ledger
                        .claim(claim_request(&levels, Some(&key), "concurrent"))
                        .await
                        .unwrap_or_else(|e| panic!("claim during a prune failed: {e}"));
                    assert!(answer.is_ok(), "claim during a prune refused: {answer:?}");
                }
            }));
        }
        let keep = Retention {
            keep: Some(5),
            max_age_secs: None,
        };
        let mut pruned = 0;
        for _ in 0..6 {
            let report = export_and_prune_chunked(h.store.as_ref(), keep, &dir, NOW, 7)
                .await
                .unwrap_or_else(|e| panic!("export during claims failed: {e}"));
            pruned += report.pruned;
            tokio::task::yield_now().await;
        }
        for c in claimers {
            c.await.unwrap();
        }
        let report = export_and_prune_chunked(h.store.as_ref(), keep, &dir, NOW, 7)
            .await
            .unwrap();
        pruned += report.pruned;
        assert_eq!(pruned, 140 - 5);
        let (_, kept, _) = audit_whole(&h, &dir, &family, 140).await;
        assert_eq!(kept.len(), 5);
        assert_eq!(used(h.ledger.as_ref(), &levels).await, vec![140, 140]);
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}

/// A [`RetentionStore`] whose prune fails on the `fail_at`-th call (1-based), either
/// before the backend saw it (nothing pruned) or after the backend committed it (the
/// process "died" before copying the checkpoint out).
#[derive(Debug)]
struct Interrupt {
    inner: Arc<dyn RetentionStore>,
    calls: AtomicU64,
    fail_at: u64,
    after_commit: bool,
}

impl RetentionStore for Interrupt {
    fn retention_signer(&self) -> Arc<till_receipt::ReceiptSigner> {
        self.inner.retention_signer()
    }
    fn retention_ledger_id(&self) -> Option<String> {
        self.inner.retention_ledger_id()
    }
    fn prune_chunk(&self) -> u64 {
        self.inner.prune_chunk()
    }
    fn stored_ranges(&self) -> BoxFuture<'_, Result<Vec<StoredRange>, LedgerError>> {
        self.inner.stored_ranges()
    }
    fn as_ledger(&self) -> &dyn Ledger {
        self.inner.as_ledger()
    }
    fn prune(&self, ranges: Vec<PruneRange>) -> BoxFuture<'_, Result<Pruned, LedgerError>> {
        Box::pin(async move {
            let call = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            if call != self.fail_at {
                return self.inner.prune(ranges).await;
            }
            if self.after_commit {
                self.inner.prune(ranges).await?;
            }
            Err(LedgerError::Unavailable("interrupted (test)".into()))
        })
    }
    fn sweep(&self) -> BoxFuture<'_, Result<u64, LedgerError>> {
        self.inner.sweep()
    }
}

/// An export stopped after writing a chunk and before pruning it, and one stopped after
/// a prune committed and before its checkpoint was copied out: the next run resumes —
/// no receipt written twice, every checkpoint in the file once, the whole chain audits.
pub async fn interrupted_export_resumes(h: RetentionHarness) {
    bounded("interrupted_export_resumes", async {
        let levels = vec![level(Some(100))];
        let family = levels[0].revocation_id.clone();
        claims(h.ledger.as_ref(), &levels, 12, "int", NOW).await;
        let dir = export_dir("interrupted");
        let keep = Retention {
            keep: Some(2),
            max_age_secs: None,
        };
        for (fail_at, after_commit) in [(2, false), (1, true)] {
            let store = Interrupt {
                inner: Arc::clone(&h.store),
                calls: AtomicU64::new(0),
                fail_at,
                after_commit,
            };
            let err = export_and_prune_chunked(&store, keep, &dir, NOW, 3)
                .await
                .expect_err("the interrupted export reports the failure");
            assert!(err.to_string().contains("interrupted"), "{err}");
            if fail_at == 2 {
                // Chunk 1 pruned; chunk 2 exported, not pruned.
                let (exported, _) = read_export(&dir, &hex::encode(&family)).unwrap();
                assert_eq!(exported.len(), 6);
                assert_eq!(h.ledger.checkpoints(&family).await.unwrap().len(), 1);
                claims(h.ledger.as_ref(), &levels, 2, "between", NOW).await;
            }
        }
        let report = export_and_prune_chunked(h.store.as_ref(), keep, &dir, NOW, 3)
            .await
            .unwrap();
        assert!(report.pruned > 0, "{report:?}");
        let (exported, kept, _) = audit_whole(&h, &dir, &family, 14).await;
        assert_eq!((exported.len(), kept.len()), (12, 2));
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}

/// An export whose file lost receipts that were pruned before (a deleted file, another
/// directory) is refused with nothing written or pruned: the archive never gets a gap.
pub async fn lost_export_file_refused(h: RetentionHarness) {
    bounded("lost_export_file_refused", async {
        let levels = vec![level(Some(100))];
        let family = levels[0].revocation_id.clone();
        claims(h.ledger.as_ref(), &levels, 6, "lost", NOW).await;
        let dir = export_dir("lost");
        let keep = Retention {
            keep: Some(2),
            max_age_secs: None,
        };
        retention::export_and_prune(h.store.as_ref(), keep, &dir, NOW)
            .await
            .unwrap();
        claims(h.ledger.as_ref(), &levels, 3, "more", NOW).await;
        let before = stored(h.ledger.as_ref(), &family).await;
        std::fs::remove_file(retention::receipts_file(&dir, &hex::encode(&family))).unwrap();
        let err = retention::export_and_prune(h.store.as_ref(), keep, &dir, NOW)
            .await
            .expect_err("a lost export file is refused");
        assert!(err.to_string().contains("restore the export file"), "{err}");
        assert_eq!(
            stored(h.ledger.as_ref(), &family).await,
            before,
            "nothing pruned"
        );
        assert_eq!(h.ledger.checkpoints(&family).await.unwrap().len(), 1);
        // Another, empty directory is refused the same way.
        let other = export_dir("lost-other");
        assert!(
            retention::export_and_prune(h.store.as_ref(), keep, &other, NOW)
                .await
                .is_err()
        );
        assert!(!retention::receipts_file(&other, &hex::encode(&family)).exists());
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&other).unwrap();
    })
    .await;
}

/// A pruned range holding a claim and its void: the checkpoint states the void, the
/// export report counts it, exported + kept receipts still audit clean, usage is
/// untouched, a void of a pruned claim is refused (its receipt is gone), and a kept claim
/// can still be voided.
pub async fn prune_with_voids(h: RetentionHarness) {
    bounded("prune_with_voids", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(Some(5))];
        let family = levels[0].revocation_id.clone();
        claims(ledger, &levels, 2, "v", NOW).await; // seq 1, 2
        super::void_ok(ledger, super::void_request(&family, 2)).await; // seq 3
        claims(ledger, &levels, 3, "w", NOW).await; // seq 4, 5, 6
        assert_eq!(used(ledger, &levels).await, vec![4]);
        let dir = export_dir("voids");
        let keep2 = Retention {
            keep: Some(2),
            max_age_secs: None,
        };
        let report = export_and_prune_chunked(h.store.as_ref(), keep2, &dir, NOW + 10, 100)
            .await
            .unwrap();
        assert_eq!(report.pruned, 4, "{report:?}");
        assert_eq!(report.voids, 1, "{report:?}");
        let (exported, kept, checkpoints) = audit_whole(&h, &dir, &family, 6).await;
        assert_eq!(exported.len(), 4);
        assert_eq!(kept.len(), 2);
        assert_eq!(checkpoints.iter().map(|c| c.body.voids).sum::<u64>(), 1);
        let chain: Vec<Receipt> = exported.iter().chain(&kept).cloned().collect();
        let audit = audit_chain(&chain, &h.keys).unwrap();
        assert_eq!((audit.claims, audit.voids, audit.charged), (5, 1, 4));
        assert_eq!(
            used(ledger, &levels).await,
            vec![4],
            "pruning changes no counter"
        );
        match ledger.void(super::void_request(&family, 1)).await {
            Err(LedgerError::NotVoidable(_)) => {}
            other => panic!("a void of a pruned claim must be refused, got {other:?}"),
        }
        let voided = super::void_ok(ledger, super::void_request(&family, 6)).await;
        assert_eq!(voided.receipt.body().seq, 7);
        assert_eq!(used(ledger, &levels).await, vec![3]);
        std::fs::remove_dir_all(&dir).unwrap();
    })
    .await;
}

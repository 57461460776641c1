//! The retention cases of the conformance suite (export, prune, checkpoints;
//! spec/ledger.md §10) on the FoundationDB engine over the in-memory store: one proxy,
//! and one proxy with a quarter of all commits failing (1020, 1021 applied or not,
//! 1007); plus a prune whose commit result is unknown.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use till_ledger::conformance::retention::{self, RetentionHarness};
use till_ledger::conformance::{claim_request, random_revocation_id, NOW};
use till_ledger::retention::{export_and_prune_chunked, read_export, Retention};
use till_ledger::{Ledger, Level};
use till_ledger_fdb::memory::MemoryStore;
use till_ledger_fdb::{codes, FdbConfig, KvLedger};
use till_receipt::{ReceiptKeySet, ReceiptSigner};

async fn open(store: MemoryStore) -> (Arc<KvLedger<MemoryStore>>, ReceiptKeySet) {
    open_as(store, Arc::new(ReceiptSigner::generate()), "p1").await
}

/// A proxy `proxy_id` of a fleet sharing `store` (and, as a fleet does, its receipt key).
async fn open_as(
    store: MemoryStore,
    signer: Arc<ReceiptSigner>,
    proxy_id: &str,
) -> (Arc<KvLedger<MemoryStore>>, ReceiptKeySet) {
    let mut config = FdbConfig::new(Arc::clone(&signer), proxy_id);
    config.transaction_timeout = Duration::from_secs(30);
    config.retry_limit = 1_000;
    let ledger = KvLedger::open(Arc::new(store), &config).await.unwrap();
    let mut keys = ReceiptKeySet::new();
    keys.insert(signer.public_key());
    (Arc::new(ledger), keys)
}

async fn harness(chaos: u32) -> RetentionHarness {
    let store = MemoryStore::new();
    store.set_chaos(chaos);
    let (ledger, keys) = open(store).await;
    RetentionHarness {
        ledger: Arc::clone(&ledger) as _,
        store: ledger,
        keys,
    }
}

macro_rules! cases {
    ($mode:ident, $chaos:expr, [$($case:ident),* $(,)?]) => {
        mod $mode {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    super::retention::$case(super::harness($chaos).await).await;
                }
            )*
        }
    };
}

macro_rules! all_cases {
    ($mode:ident, $chaos:expr) => {
        cases!(
            $mode,
            $chaos,
            [
                prune_by_count,
                prune_by_age,
                pruned_idempotency_keys_claim_afresh,
                claims_concurrent_with_prune,
                interrupted_export_resumes,
                lost_export_file_refused,
                prune_with_voids,
            ]
        );
    };
}

all_cases!(one_proxy, 0);
all_cases!(under_chaos, 25);

/// A prune whose commit answers `commit_unknown_result`: applied (the retry recognises
/// its own checkpoint and answers as the landed attempt did) or not (the retry prunes).
/// Either way one checkpoint, every receipt exported once, the chain audits, and the
/// pruned receipts, slot entries and idempotency records are gone from the key space.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn prune_with_an_unknown_commit_result() {
    for applied in [true, false] {
        let store = MemoryStore::new();
        let (ledger, keys) = open(store.clone()).await;
        let levels = vec![
            Level {
                revocation_id: random_revocation_id(),
                cap: Some(10),
            },
            Level {
                revocation_id: random_revocation_id(),
                cap: None,
            },
        ];
        let family = levels[0].revocation_id.clone();
        for i in 0..6 {
            let req = claim_request(&levels, Some(&format!("k{i}")), "chat");
            ledger.claim(req).await.unwrap().unwrap();
        }
        let before = store.dump().len();
        let dir = tempfile::tempdir().unwrap();
        let keep = Retention {
            keep: Some(2),
            max_age_secs: None,
        };
        store.inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, applied);
        let report = export_and_prune_chunked(ledger.as_ref(), keep, dir.path(), NOW, 100)
            .await
            .unwrap();
        assert_eq!(
            store.pending_faults(),
            0,
            "the prune met the injected fault"
        );
        assert_eq!(
            (
                report.exported,
                report.pruned,
                report.idempotency_removed,
                report.checkpoints,
                report.swept
            ),
            (4, 4, 4, 1, 4),
            "applied = {applied}: {report:?}"
        );
        let checkpoints = ledger.checkpoints(&family).await.unwrap();
        assert_eq!(checkpoints.len(), 1);
        let (exported, in_file) = read_export(dir.path(), &hex::encode(&family)).unwrap();
        assert_eq!(in_file, checkpoints);
        assert_eq!(exported.len(), 4);
        let kept = ledger.receipts(&family, 1, 100).await.unwrap();
        let chain: Vec<_> = exported.into_iter().chain(kept).collect();
        till_receipt::audit_chain(&chain, &keys).unwrap();
        till_ledger::retention::check_checkpoints(&chain, &checkpoints, &keys).unwrap();
        // 4 receipts, 8 slot entries, 4 idempotency records and 4 journal entries gone;
        // 1 checkpoint added.
        assert_eq!(store.dump().len(), before - 20 + 1, "applied = {applied}");
        // The pruned keys claim afresh.
        let fresh = ledger
            .claim(claim_request(&levels, Some("k0"), "chat"))
            .await
            .unwrap()
            .unwrap();
        assert!(!fresh.replayed);
        assert_eq!(fresh.receipt.body().seq, 7);
    }
}

/// The journal (spec/ledger-fdb.md §1) is swept with every export: afterwards it points
/// at exactly the receipts still stored, in commit order, also while claims go on (new
/// families appear during the sweep) and with a quarter of all commits failing. A second
/// run sweeps nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn journal_is_swept_with_the_prune() {
    for chaos in [0, 25] {
        let store = MemoryStore::new();
        store.set_chaos(chaos);
        let (ledger, _keys) = open(store.clone()).await;
        let mut families: Vec<Vec<Level>> = (0..3)
            .map(|_| {
                vec![Level {
                    revocation_id: random_revocation_id(),
                    cap: None,
                }]
            })
            .collect();
        // Interleaved, so each family's journal entries are spread out.
        for _ in 0..6 {
            for levels in &families {
                ledger
                    .claim(claim_request(levels, None, "chat"))
                    .await
                    .unwrap()
                    .unwrap();
            }
        }
        // Claims on fresh families while the export runs.
        let fresh: Vec<Vec<Level>> = (0..8)
            .map(|_| {
                vec![Level {
                    revocation_id: random_revocation_id(),
                    cap: None,
                }]
            })
            .collect();
        let claimer = {
            let (ledger, fresh) = (Arc::clone(&ledger), fresh.clone());
            tokio::spawn(async move {
                for levels in &fresh {
                    for _ in 0..2 {
                        ledger
                            .claim(claim_request(levels, None, "chat"))
                            .await
                            .unwrap()
                            .unwrap();
                    }
                }
            })
        };
        let dir = tempfile::tempdir().unwrap();
        let keep = Retention {
            keep: Some(2),
            max_age_secs: None,
        };
        let report = export_and_prune_chunked(ledger.as_ref(), keep, dir.path(), NOW, 3)
            .await
            .unwrap();
        claimer.await.unwrap();
        assert_eq!(report.pruned, 12, "chaos {chaos}: {report:?}");
        assert_eq!(
            report.swept, report.pruned,
            "chaos {chaos}: one journal entry per pruned receipt"
        );
        let again = export_and_prune_chunked(ledger.as_ref(), keep, dir.path(), NOW, 3)
            .await
            .unwrap();
        assert_eq!((again.pruned, again.swept), (0, 0), "chaos {chaos}");

        families.extend(fresh);
        let mut stored = std::collections::BTreeSet::new();
        for levels in &families {
            let family = &levels[0].revocation_id;
            for r in ledger.receipts(family, 1, 100).await.unwrap() {
                stored.insert((family.clone(), r.body().seq));
            }
        }
        assert_eq!(stored.len(), 3 * 2 + 8 * 2, "chaos {chaos}");
        let (begin, end) = ledger.keyspace().journal_range();
        let journal: Vec<(Vec<u8>, u64)> = store
            .dump()
            .range(begin..end)
            .map(|(_, v)| till_ledger_fdb::keys::decode_receipt_ref(v).unwrap())
            .collect();
        assert_eq!(
            journal
                .iter()
                .cloned()
                .collect::<std::collections::BTreeSet<_>>(),
            stored,
            "chaos {chaos}: the journal points at exactly the stored receipts"
        );
        assert_eq!(journal.len(), stored.len(), "chaos {chaos}: no duplicates");
    }
}

/// One exporter per key space (spec/ledger.md §10): two proxies of a fleet share one
/// lease. The first takes it; the second is refused with an error naming the holder,
/// its directory and the lease's end, and renewing by the holder keeps it; once it lapses
/// (or is given back) the second takes over. Also under chaos.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_exporter_holds_the_lease() {
    use till_ledger::retention::ExportLease;
    use till_ledger::{LedgerError, RetentionStore};
    for chaos in [0, 25] {
        let store = MemoryStore::new();
        store.set_chaos(chaos);
        let signer = Arc::new(ReceiptSigner::generate());
        let (p1, _) = open_as(store.clone(), Arc::clone(&signer), "p1").await;
        let (p2, _) = open_as(store.clone(), signer, "p2").await;
        let lease = |holder: &str, dir: &str, until: u64| ExportLease {
            holder: holder.into(),
            dir: dir.into(),
            until,
        };
        p1.lease_export(&lease("p1", "/srv/a", NOW + 600), NOW)
            .await
            .unwrap();
        let refused = p2
            .lease_export(&lease("p2", "/srv/b", NOW + 600), NOW + 1)
            .await
            .expect_err("p1 holds the lease");
        match &refused {
            LedgerError::ExportLeased { holder, dir, until } => {
                assert_eq!(
                    (holder.as_str(), dir.as_str(), *until),
                    ("p1", "/srv/a", NOW + 600)
                );
            }
            other => panic!("chaos {chaos}: {other:?}"),
        }
        let message = refused.to_string();
        assert!(
            message.contains("`p1`")
                && message.contains("/srv/a")
                && message.contains("[retention]"),
            "{message}"
        );
        // The holder renews (and may move its directory).
        p1.lease_export(&lease("p1", "/srv/a2", NOW + 1_200), NOW + 500)
            .await
            .unwrap();
        assert!(p2
            .lease_export(&lease("p2", "/srv/b", NOW + 1_300), NOW + 700)
            .await
            .is_err());
        // Lapsed: the other takes over, and now the first is refused.
        p2.lease_export(&lease("p2", "/srv/b", NOW + 1_800), NOW + 1_200)
            .await
            .unwrap();
        assert!(matches!(
            p1.lease_export(&lease("p1", "/srv/a2", NOW + 1_900), NOW + 1_300)
                .await,
            Err(LedgerError::ExportLeased { ref holder, .. }) if holder == "p2"
        ));
        // Given back only by its holder.
        p1.release_export("p1").await.unwrap();
        assert!(p1
            .lease_export(&lease("p1", "/srv/a2", NOW + 1_900), NOW + 1_300)
            .await
            .is_err());
        p2.release_export("p2").await.unwrap();
        p1.lease_export(&lease("p1", "/srv/a2", NOW + 1_900), NOW + 1_300)
            .await
            .unwrap();
    }
}

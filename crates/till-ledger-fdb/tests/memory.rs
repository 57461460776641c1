//! The FoundationDB engine on the in-memory store: the conformance suite (one proxy, a
//! three-proxy fleet, and a fleet under random commit faults) and error injection in the
//! style of foundationdb-rs's `tests/run_retry.rs` (1020, 1021, 1007 into the claim).
//!
//! This proves the engine's batching, retry and idempotency logic against FoundationDB's
//! documented transaction contract as imitated by `MemoryStore`, not FoundationDB itself;
//! `tests/fdb_cluster.rs` runs the same suite on a real cluster.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use till_ledger::conformance::{self, Harness};
use till_ledger::{
    AlertOutcome, AlertRecord, BoxFuture, Claim, ClaimRequest, FamilyDetail, FamilyView, KeyBlocks,
    Ledger, LedgerError, Level, LevelUsage, Receipt, Refusal, Revoked,
};
use till_ledger_fdb::memory::MemoryStore;
use till_ledger_fdb::{codes, FdbConfig, KvLedger};
use till_receipt::{audit_chain, ReceiptKeySet, ReceiptSigner};

fn config(signer: &Arc<ReceiptSigner>, proxy: &str, max_batch: usize) -> FdbConfig {
    let mut c = FdbConfig::new(Arc::clone(signer), proxy);
    c.max_batch = max_batch;
    // Generous: contention in the fleet cases must end in success, not a timeout, on a
    // loaded 2-core machine; the timeout cases set their own.
    c.transaction_timeout = Duration::from_secs(30);
    c.retry_limit = 1_000;
    c
}

fn keys(signer: &ReceiptSigner) -> ReceiptKeySet {
    let mut keys = ReceiptKeySet::new();
    keys.insert(signer.public_key());
    keys
}

/// One proxy, opened as `FdbLedger::open` does (schema and ledger id checked or written).
async fn single(max_batch: usize) -> Harness {
    let signer = Arc::new(ReceiptSigner::generate());
    let ledger = KvLedger::open(
        Arc::new(MemoryStore::new()),
        &config(&signer, "p1", max_batch),
    )
    .await
    .unwrap();
    Harness {
        ledger: Arc::new(ledger),
        keys: keys(&signer),
    }
}

/// Several proxies on one store; claims go round-robin across them.
#[derive(Debug)]
struct Fleet {
    proxies: Vec<KvLedger<MemoryStore>>,
    next: AtomicUsize,
}

impl Fleet {
    fn pick(&self) -> &KvLedger<MemoryStore> {
        &self.proxies[self.next.fetch_add(1, Ordering::Relaxed) % self.proxies.len()]
    }
}

impl Ledger for Fleet {
    fn claim(
        &self,
        req: ClaimRequest,
    ) -> BoxFuture<'_, Result<Result<Claim, Refusal>, LedgerError>> {
        self.pick().claim(req)
    }
    fn revoke(&self, revocation_id: &[u8]) -> BoxFuture<'_, Result<Revoked, LedgerError>> {
        self.pick().revoke(revocation_id)
    }
    fn void(
        &self,
        req: till_ledger::VoidRequest,
    ) -> BoxFuture<'_, Result<till_ledger::Voided, LedgerError>> {
        self.pick().void(req)
    }
    fn usage(&self, levels: &[Level]) -> BoxFuture<'_, Result<Vec<LevelUsage>, LedgerError>> {
        self.pick().usage(levels)
    }
    fn receipts(
        &self,
        family: &[u8],
        from_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Receipt>, LedgerError>> {
        self.pick().receipts(family, from_seq, limit)
    }
    fn record_key(&self, key: KeyBlocks, at: u64) -> BoxFuture<'_, Result<(), LedgerError>> {
        self.pick().record_key(key, at)
    }
    fn families(&self, now: u64) -> BoxFuture<'_, Result<Vec<FamilyView>, LedgerError>> {
        self.pick().families(now)
    }
    fn family(
        &self,
        family: &[u8],
        now: u64,
    ) -> BoxFuture<'_, Result<Option<FamilyDetail>, LedgerError>> {
        self.pick().family(family, now)
    }
    fn alerts(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        self.pick().alerts(limit)
    }
    fn lease_alerts(
        &self,
        now: u64,
        lease_secs: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        self.pick().lease_alerts(now, lease_secs, limit)
    }
    fn settle_alert(
        &self,
        id: &str,
        outcome: AlertOutcome,
    ) -> BoxFuture<'_, Result<(), LedgerError>> {
        self.pick().settle_alert(id, outcome)
    }
}

/// Several proxies on one store, opened at once (they race to create the ledger id; all
/// end up with the same one).
async fn fleet(store: &MemoryStore, proxies: usize, max_batch: usize) -> (Arc<Fleet>, Harness) {
    let signer = Arc::new(ReceiptSigner::generate());
    let opened = (0..proxies).map(|i| {
        let (store, config) = (store.clone(), config(&signer, &format!("p{i}"), max_batch));
        async move { KvLedger::open(Arc::new(store), &config).await.unwrap() }
    });
    let proxies = futures::future::join_all(opened).await;
    assert!(
        proxies
            .iter()
            .all(|p| p.ledger_id() == proxies[0].ledger_id()),
        "one ledger id per key space"
    );
    let fleet = Arc::new(Fleet {
        proxies,
        next: AtomicUsize::new(0),
    });
    let harness = Harness {
        ledger: Arc::clone(&fleet) as Arc<dyn Ledger>,
        keys: keys(&signer),
    };
    (fleet, harness)
}

macro_rules! cases {
    ($mode:ident, $make:expr, [$($case:ident),* $(,)?]) => {
        mod $mode {
            #[allow(unused_imports)]
            use super::*;
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $case() {
                    let h: Harness = $make;
                    conformance::$case(h).await;
                }
            )*
        }
    };
}

macro_rules! all_cases {
    ($mode:ident, $make:expr) => {
        cases!(
            $mode,
            $make,
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
    };
}

all_cases!(group_commit_on, single(128).await);
all_cases!(group_commit_off, single(1).await);
all_cases!(fleet_of_three, fleet(&MemoryStore::new(), 3, 128).await.1);
all_cases!(fleet_of_three_under_chaos, {
    let store = MemoryStore::new();
    // A quarter of all commits fail with 1020, 1021 (applied or not) or 1007.
    store.set_chaos(25);
    fleet(&store, 3, 64).await.1
});

// ---------------------------------------------------------------------------------------
// Error injection into the claim (run_retry.rs style)

fn token(caps: &[Option<u64>]) -> Vec<Level> {
    caps.iter()
        .map(|&cap| Level {
            revocation_id: conformance::random_revocation_id(),
            cap,
        })
        .collect()
}

struct Fixture {
    store: MemoryStore,
    ledger: KvLedger<MemoryStore>,
    keys: ReceiptKeySet,
    signer: Arc<ReceiptSigner>,
}

async fn fixture(tweak: impl FnOnce(&mut FdbConfig)) -> Fixture {
    let signer = Arc::new(ReceiptSigner::generate());
    let store = MemoryStore::new();
    let mut cfg = config(&signer, "p1", 128);
    tweak(&mut cfg);
    let ledger = KvLedger::open(Arc::new(store.clone()), &cfg).await.unwrap();
    Fixture {
        store,
        ledger,
        keys: keys(&signer),
        signer,
    }
}

async fn used(ledger: &dyn Ledger, levels: &[Level]) -> Vec<u64> {
    ledger
        .usage(levels)
        .await
        .unwrap()
        .iter()
        .map(|u| u.used)
        .collect()
}

async fn claim_ok(ledger: &dyn Ledger, req: ClaimRequest) -> Claim {
    match ledger.claim(req).await {
        Ok(Ok(c)) => c,
        other => panic!("expected a claim, got {other:?}"),
    }
}

/// After the injected fault: one slot charged at every level, exactly one stored receipt
/// (the one returned), a clean chain, and a later replay with the same key returns it.
async fn assert_single_charge(f: &Fixture, levels: &[Level], key: &str, got: &Claim) {
    assert!(!got.replayed, "the original claim is not a replay");
    assert_eq!(got.receipt.body().seq, 1);
    assert_eq!(
        used(&f.ledger, levels).await,
        vec![1; levels.len()],
        "charged exactly once"
    );
    let stored = f
        .ledger
        .receipts(&levels[0].revocation_id, 1, 10)
        .await
        .unwrap();
    assert_eq!(stored.len(), 1, "exactly one receipt stored");
    assert_eq!(
        stored[0].compact(),
        got.receipt.compact(),
        "the returned receipt is the stored one"
    );
    audit_chain(&stored, &f.keys).unwrap();
    let again = claim_ok(
        &f.ledger,
        conformance::claim_request(levels, Some(key), "chat"),
    )
    .await;
    assert!(again.replayed);
    assert_eq!(again.receipt.compact(), got.receipt.compact());
    assert_eq!(used(&f.ledger, levels).await, vec![1; levels.len()]);
    assert_eq!(f.store.pending_faults(), 0, "every injected fault was hit");
}

#[tokio::test]
async fn commit_unknown_result_that_committed_returns_the_original_receipt() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5), Some(2)]);
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, true);
    let got = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    let stats = f.ledger.stats();
    assert_eq!(stats.maybe_committed, 1);
    assert_eq!(stats.recovered, 1, "the retry recognised its own commit");
    assert_eq!(got.remaining, Some(1), "remaining as of the original claim");
    assert_single_charge(&f, &levels, "k", &got).await;
}

/// Issue 10 item 12: a void whose commit result is unknown is retried; whether or not it
/// landed, the slot is given back exactly once and the caller gets the void receipt.
#[tokio::test]
async fn void_after_commit_unknown_result_gives_back_once() {
    for applied in [true, false] {
        let f = fixture(|_| {}).await;
        let levels = token(&[Some(5), Some(2)]);
        let family = levels[0].revocation_id.clone();
        let got = claim_ok(
            &f.ledger,
            conformance::claim_request(&levels, Some("k"), "chat"),
        )
        .await;
        f.store
            .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, applied);
        let void = f
            .ledger
            .void(till_ledger::VoidRequest {
                family: family.clone(),
                seq: got.receipt.body().seq,
                now: conformance::NOW + 1,
                windows: Vec::new(),
            })
            .await
            .unwrap();
        assert!(void.newly, "applied={applied}: our own void, recognised");
        assert_eq!(void.receipt.body().void, Some(1));
        assert_eq!(void.remaining, Some(2));
        assert_eq!(f.ledger.stats().maybe_committed, 1);
        assert_eq!(
            used(&f.ledger, &levels).await,
            vec![0, 0],
            "given back once"
        );
        let chain = conformance::all_receipts(&f.ledger, &family).await;
        assert_eq!(chain.len(), 2);
        assert_eq!(chain[1].compact(), void.receipt.compact());
        assert_eq!(f.store.pending_faults(), 0, "every injected fault was hit");
    }
}

#[tokio::test]
async fn commit_unknown_result_that_did_not_commit_claims_once() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5)]);
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, false);
    let got = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    let stats = f.ledger.stats();
    assert_eq!((stats.maybe_committed, stats.recovered), (1, 0));
    assert_single_charge(&f, &levels, "k", &got).await;
}

#[tokio::test]
async fn unknown_result_without_a_client_key_reuses_the_generated_key() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(3)]);
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, true);
    let got = claim_ok(&f.ledger, conformance::claim_request(&levels, None, "chat")).await;
    assert_eq!(f.ledger.stats().recovered, 1);
    let key = got.receipt.body().idempotency_key.clone();
    assert_single_charge(&f, &levels, &key, &got).await;
}

#[tokio::test]
async fn not_committed_is_retried_and_charged_once() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5), None]);
    f.store.inject_commit_error(codes::NOT_COMMITTED, false);
    f.store.inject_commit_error(codes::NOT_COMMITTED, false);
    let got = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    let stats = f.ledger.stats();
    assert_eq!(stats.retries, 2);
    assert_eq!(stats.maybe_committed, 0);
    assert_single_charge(&f, &levels, "k", &got).await;
}

#[tokio::test]
async fn transaction_too_old_on_read_and_on_commit_is_retried() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5)]);
    f.store.inject_read_error(codes::TRANSACTION_TOO_OLD);
    f.store
        .inject_commit_error(codes::TRANSACTION_TOO_OLD, false);
    let got = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    assert_eq!(f.ledger.stats().retries, 2);
    assert_single_charge(&f, &levels, "k", &got).await;
}

#[tokio::test]
async fn a_chain_of_faults_ends_in_one_charge() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5), Some(1)]);
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, false);
    f.store.inject_commit_error(codes::NOT_COMMITTED, false);
    f.store
        .inject_commit_error(codes::TRANSACTION_TOO_OLD, false);
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, true);
    let got = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    let stats = f.ledger.stats();
    assert_eq!(stats.retries, 4);
    assert_eq!(stats.maybe_committed, 2);
    assert_eq!(stats.recovered, 1);
    assert_single_charge(&f, &levels, "k", &got).await;
}

/// A replay whose commit result is unknown: still the original receipt, never a charge.
#[tokio::test]
async fn unknown_result_on_a_replay_never_charges() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5)]);
    let original = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, true);
    let replay = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    assert!(replay.replayed);
    assert_eq!(replay.receipt.compact(), original.receipt.compact());
    assert_eq!(
        f.ledger.stats().recovered,
        1,
        "the retry recognised its own replay"
    );
    assert_eq!(used(&f.ledger, &levels).await, vec![1]);
    // The replay was counted once: MAX_REPLAYS - 1 more are served, then the limit.
    for _ in 1..till_ledger::MAX_REPLAYS {
        assert!(
            claim_ok(
                &f.ledger,
                conformance::claim_request(&levels, Some("k"), "chat")
            )
            .await
            .replayed
        );
    }
    assert_eq!(
        f.ledger
            .claim(conformance::claim_request(&levels, Some("k"), "chat"))
            .await
            .unwrap()
            .unwrap_err(),
        Refusal::ReplayLimit
    );
}

/// Many concurrent claims of a hot token (batched) while commits fail with every kind of
/// fault: exactly `cap` slots, unique and gapless, every returned receipt stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_token_under_injected_faults_never_over_cap() {
    let f = fixture(|c| c.max_batch = 16).await;
    let levels = token(&[Some(40)]);
    for i in 0..12 {
        let (code, applied) = [
            (codes::COMMIT_UNKNOWN_RESULT, true),
            (codes::NOT_COMMITTED, false),
            (codes::COMMIT_UNKNOWN_RESULT, false),
            (codes::TRANSACTION_TOO_OLD, false),
        ][i % 4];
        f.store.inject_commit_error(code, applied);
    }
    let ledger = Arc::new(f.ledger);
    let tasks: Vec<_> = (0..120)
        .map(|i| {
            let ledger = Arc::clone(&ledger);
            let req = conformance::claim_request(
                &levels,
                if i % 2 == 0 {
                    Some(format!("k{i}"))
                } else {
                    None
                }
                .as_deref(),
                "chat",
            );
            tokio::spawn(async move { ledger.claim(req).await })
        })
        .collect();
    let mut seqs = BTreeSet::new();
    let mut receipts = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(Ok(c)) => {
                assert!(!c.replayed);
                assert!(seqs.insert(c.receipt.body().seq), "seq handed out twice");
                receipts.push(c.receipt);
            }
            Ok(Err(Refusal::CapReached { block: 0, cap: 40 })) => refused += 1,
            other => panic!("unexpected answer {other:?}"),
        }
    }
    assert_eq!(seqs, (1..=40).collect());
    assert_eq!(refused, 80);
    assert_eq!(used(ledger.as_ref(), &levels).await, vec![40]);
    let stored = conformance::all_receipts(ledger.as_ref(), &levels[0].revocation_id).await;
    audit_chain(&stored, &f.keys).unwrap();
    for r in &receipts {
        let at = usize::try_from(r.body().seq - 1).unwrap();
        assert_eq!(
            stored[at].compact(),
            r.compact(),
            "returned receipt is the stored one"
        );
    }
    // Refusals are read-only (never committed), so some faults may be left over once the
    // cap is reached; every consumed one caused exactly one retry (one lane: no conflicts).
    // 40 slots in batches of at most 16 take at least three committing batches, which
    // consume at least five faults (one of each kind).
    let consumed = 12 - f.store.pending_faults() as u64;
    assert!(consumed >= 5, "only {consumed} faults hit");
    assert_eq!(ledger.stats().retries, consumed);
}

#[tokio::test]
async fn retry_limit_exhausted_is_unavailable_and_writes_nothing() {
    let f = fixture(|c| c.retry_limit = 3).await;
    let levels = token(&[Some(5)]);
    for _ in 0..4 {
        f.store.inject_commit_error(codes::NOT_COMMITTED, false);
    }
    match f
        .ledger
        .claim(conformance::claim_request(&levels, Some("k"), "chat"))
        .await
    {
        Err(LedgerError::Unavailable(msg)) => assert!(msg.contains("1020"), "{msg}"),
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert_eq!(used(&f.ledger, &levels).await, vec![0]);
    assert_eq!(f.store.commits(), 1, "only the key space's opening commit");
    assert!(
        f.ledger
            .families(conformance::NOW)
            .await
            .unwrap()
            .is_empty(),
        "a claim that never committed recorded its family"
    );
}

#[tokio::test]
async fn non_retryable_error_is_unavailable_at_once() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5)]);
    f.store.inject_commit_error(2101, false); // transaction_too_large
    assert!(matches!(
        f.ledger
            .claim(conformance::claim_request(&levels, Some("k"), "chat"))
            .await,
        Err(LedgerError::Unavailable(_))
    ));
    assert_eq!(f.ledger.stats().retries, 0);
    assert_eq!(used(&f.ledger, &levels).await, vec![0]);
    // The next claim goes through: the failure did not wedge the lane.
    let c = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    assert_eq!(c.receipt.body().seq, 1);
}

async fn bounded<T>(
    fut: impl std::future::Future<Output = T>,
) -> Result<T, tokio::time::error::Elapsed> {
    tokio::time::timeout(Duration::from_secs(20), fut).await
}

/// A frozen cluster: claims, revocations and reads answer `Unavailable` (503) instead of
/// hanging, nothing is written; after a thaw, traffic recovers without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_store_is_unavailable_then_recovers() {
    let f = fixture(|c| c.transaction_timeout = Duration::from_millis(300)).await;
    let levels = token(&[Some(5)]);
    f.store.set_frozen(true);
    let answer = bounded(
        f.ledger
            .claim(conformance::claim_request(&levels, Some("k"), "chat")),
    )
    .await
    .expect("claim hung");
    assert!(
        matches!(answer, Err(LedgerError::Unavailable(_))),
        "{answer:?}"
    );
    let answer = bounded(f.ledger.revoke(&levels[0].revocation_id))
        .await
        .expect("revoke hung");
    assert!(
        matches!(answer, Err(LedgerError::Unavailable(_))),
        "{answer:?}"
    );
    assert!(bounded(f.ledger.usage(&levels))
        .await
        .expect("usage hung")
        .is_err());
    f.store.set_frozen(false);
    assert_eq!(f.store.commits(), 1, "only the key space's opening commit");
    let c = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    assert_eq!(c.receipt.body().seq, 1);
    assert_eq!(used(&f.ledger, &levels).await, vec![1]);
}

/// The hot token in one proxy is group-committed: 64 concurrent claims take far fewer
/// transactions than claims.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_token_claims_are_group_committed() {
    let f = fixture(|c| c.max_batch = 64).await;
    let levels = token(&[None]);
    let ledger = Arc::new(f.ledger);
    // Freeze so every claim queues up, then release them together.
    f.store.set_frozen(true);
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let ledger = Arc::clone(&ledger);
            let req = conformance::claim_request(&levels, None, "chat");
            tokio::spawn(async move { ledger.claim(req).await })
        })
        .collect();
    while ledger.stats().batches == 0 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.store.set_frozen(false);
    for t in tasks {
        assert!(matches!(t.await.unwrap(), Ok(Ok(_))));
    }
    assert_eq!(used(ledger.as_ref(), &levels).await, vec![64]);
    let stats = ledger.stats();
    // One batch per transaction; without group commit this would be 64 of each.
    assert!(
        stats.commits <= 8,
        "64 claims took {} commits: {stats:?}",
        stats.commits
    );
    assert!(stats.batches <= 8, "{stats:?}");
}

/// Revocation through one proxy is refused by the others at their next claim (they read
/// it in the claim transaction; no cache).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn revocation_through_one_proxy_is_seen_by_all() {
    let store = MemoryStore::new();
    let (fleet, _h) = fleet(&store, 3, 128).await;
    let levels = token(&[Some(100), Some(10)]);
    for p in &fleet.proxies {
        claim_ok(p, conformance::claim_request(&levels, None, "chat")).await;
    }
    fleet.proxies[0]
        .revoke(&levels[1].revocation_id)
        .await
        .unwrap();
    for p in &fleet.proxies[1..] {
        assert_eq!(
            p.claim(conformance::claim_request(&levels, None, "chat"))
                .await
                .unwrap()
                .unwrap_err(),
            Refusal::Revoked { block: 1 }
        );
    }
    assert!(
        claim_ok(
            &fleet.proxies[2],
            conformance::claim_request(&levels[..1], None, "chat")
        )
        .await
        .receipt
        .body()
        .seq == 4
    );
}

/// Every stored receipt is pointed at by the versionstamped journal (in commit order) and
/// by the slot index.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn journal_and_slot_index_hold_every_receipt() {
    let f = fixture(|c| c.max_batch = 8).await;
    let levels = token(&[Some(30), Some(20)]);
    let ledger = Arc::new(f.ledger);
    let tasks: Vec<_> = (0..20)
        .map(|_| {
            let ledger = Arc::clone(&ledger);
            let req = conformance::claim_request(&levels, None, "chat");
            tokio::spawn(async move { ledger.claim(req).await.unwrap().unwrap() })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    let stored = conformance::all_receipts(ledger.as_ref(), &levels[0].revocation_id).await;
    assert_eq!(stored.len(), 20);
    let ks = ledger.keyspace();
    let dump = f.store.dump();
    let (jb, je) = ks.journal_range();
    // The journal points at each receipt (family, seq); it holds no copy.
    let journal: Vec<(Vec<u8>, u64)> = dump
        .range(jb..je)
        .map(|(_, v)| till_ledger_fdb::keys::decode_receipt_ref(v).unwrap())
        .collect();
    let expected: Vec<(Vec<u8>, u64)> = stored
        .iter()
        .map(|r| (levels[0].revocation_id.clone(), r.body().seq))
        .collect();
    assert_eq!(
        journal, expected,
        "journal order is commit order, which is seq order here"
    );
    for r in &stored {
        for (level, slot) in levels.iter().zip(&r.body().slots) {
            let owner = dump
                .get(&ks.slot(&level.revocation_id, slot.slot))
                .expect("slot indexed");
            let (family, seq): (Vec<u8>, u64) = foundationdb_tuple::unpack(owner).unwrap();
            assert_eq!(
                (family.as_slice(), seq),
                (levels[0].revocation_id.as_slice(), r.body().seq)
            );
        }
    }
}

#[tokio::test]
async fn schema_is_written_once_and_checked() {
    let f = fixture(|_| {}).await;
    f.ledger.check_schema().await.unwrap();
    f.ledger.check_schema().await.unwrap();
    let key = f.ledger.keyspace().schema();
    assert_eq!(
        f.store.dump().get(&key).unwrap(),
        &foundationdb_tuple::pack(&(3i64,))
    );
    // A key space written by another layout version is refused.
    let signer = Arc::new(ReceiptSigner::generate());
    let other = MemoryStore::new();
    let ledger = KvLedger::start(Arc::new(other.clone()), &config(&signer, "p", 1)).unwrap();
    ledger.check_schema().await.unwrap();
    use till_ledger_fdb::{KvStore, KvTxn};
    let opts = till_ledger_fdb::TxnOptions {
        timeout: Duration::from_secs(5),
        retry_limit: 5,
        max_retry_delay: Duration::from_millis(5),
    };
    let mut txn = other.begin(&opts).unwrap();
    txn.set(&key, &foundationdb_tuple::pack(&(4i64,)));
    txn.commit().await.map_err(|(_, e)| e).unwrap();
    assert!(matches!(
        ledger.check_schema().await,
        Err(LedgerError::Open { .. })
    ));
}

fn test_txn_options() -> till_ledger_fdb::TxnOptions {
    till_ledger_fdb::TxnOptions {
        timeout: Duration::from_secs(5),
        retry_limit: 5,
        max_retry_delay: Duration::from_millis(5),
    }
}

/// A schema 1 key space (idempotency records holding a copy of the receipt) is still
/// read: opening it upgrades the schema key to 3, and its records still replay.
#[tokio::test]
async fn schema_1_records_replay_and_the_key_space_is_upgraded() {
    use till_ledger_fdb::{KvStore, KvTxn};
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5)]);
    let req = conformance::claim_request(&levels, Some("k"), "chat");
    let first = claim_ok(&f.ledger, req.clone()).await;
    // Rewrite the record and the schema key as schema 1 wrote them.
    let ks = f.ledger.keyspace();
    let idem = ks.idempotency(&levels[0].revocation_id, "k");
    let record =
        till_ledger_fdb::keys::IdemRecord::decode(f.store.dump().get(&idem).unwrap()).unwrap();
    let legacy = serde_json::json!({
        "record": {
            "request": record.request,
            "receipt": first.receipt.compact(),
            "replays": 0,
        },
        "writers": record.writers,
    });
    let mut txn = f.store.begin(&test_txn_options()).unwrap();
    txn.set(&idem, &serde_json::to_vec(&legacy).unwrap());
    txn.set(&ks.schema(), &foundationdb_tuple::pack(&(1i64,)));
    txn.commit().await.map_err(|(_, e)| e).unwrap();

    f.ledger.check_schema().await.unwrap();
    assert_eq!(
        f.store.dump().get(&ks.schema()).unwrap(),
        &foundationdb_tuple::pack(&(3i64,)),
        "upgraded on open"
    );
    let again = claim_ok(&f.ledger, req).await;
    assert!(again.replayed);
    assert_eq!(again.receipt.compact(), first.receipt.compact());
    assert_eq!(used(&f.ledger, &levels).await, vec![1]);
}

// ---------------------------------------------------------------------------------------
// Receipts v2: chain heads written before schema 3

/// The receipt-format-1 chain of `tests/fixtures/receipts-v1.json` (three receipts of one
/// family, each `prev` the SHA-256 of the previous compact string) and its signer.
fn v1_chain() -> (Arc<ReceiptSigner>, Vec<Receipt>) {
    let fixture: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/receipts-v1.json")).unwrap();
    let seed: [u8; 32] = hex::decode(fixture["signer_seed_hex"].as_str().unwrap())
        .unwrap()
        .try_into()
        .unwrap();
    let signer = Arc::new(ReceiptSigner::from_seed(seed));
    assert_eq!(signer.key_id(), fixture["kid"].as_str().unwrap());
    let receipts: Vec<Receipt> = fixture["receipts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| Receipt::parse(r.as_str().unwrap()).unwrap())
        .collect();
    assert!(receipts.iter().all(|r| r.body().v == 1));
    (signer, receipts)
}

/// Writes `receipts` (one family's chain) into the store the way a build of schema 2
/// wrote them: the schema key `(2,)`, each receipt once, every level's slot entry and
/// counter, and the unmarked chain head `(seq, hash)` with `head_hash` of the last receipt.
async fn seed_schema_2(
    store: &MemoryStore,
    ks: &till_ledger_fdb::keys::Keyspace,
    receipts: &[Receipt],
    head_hash: impl Fn(&Receipt) -> String,
) {
    use till_ledger_fdb::keys;
    use till_ledger_fdb::{KvStore, KvTxn};
    let mut txn = store.begin(&test_txn_options()).unwrap();
    txn.set(&ks.schema(), &foundationdb_tuple::pack(&(2i64,)));
    let mut counts = std::collections::BTreeMap::new();
    for r in receipts {
        let body = r.body();
        let family = hex::decode(&body.family).unwrap();
        txn.set(&ks.receipt(&family, body.seq), r.compact().as_bytes());
        for slot in &body.slots {
            let rid = hex::decode(&slot.revocation_id).unwrap();
            txn.set(
                &ks.slot(&rid, slot.slot),
                &keys::encode_receipt_ref(&family, body.seq),
            );
            counts.insert(rid, slot.slot);
        }
    }
    for (rid, count) in counts {
        txn.set(&ks.count(&rid), &keys::encode_u64(count));
    }
    let last = receipts.last().unwrap();
    let family = hex::decode(&last.body().family).unwrap();
    txn.set(
        &ks.head(&family),
        &keys::encode_legacy_head(last.body().seq, &head_hash(last)),
    );
    txn.commit().await.map_err(|(_, e)| e).unwrap();
}

/// The family's whole stored chain, audited (signatures, links, slots).
async fn audited_chain(ledger: &dyn Ledger, family: &[u8], keys: &ReceiptKeySet) -> Vec<Receipt> {
    let chain = ledger.receipts(family, 1, 1_000).await.unwrap();
    if let Err(e) = audit_chain(&chain, keys) {
        panic!("the chain audits clean: {e} ({})", e.code());
    }
    chain
}

/// A key space written before receipts v2 (format-1 receipts, heads naming the compact
/// string's hash) continues into one clean chain: the first claim after the upgrade names
/// the signing input's hash of the last format-1 receipt (recomputed from the stored
/// receipt in the claim's transaction), writes the head back marked, and the whole chain,
/// v1 then v2, audits. Without the recomputation the next `prev` would be the compact
/// hash: `broken_link`.
#[tokio::test]
async fn v1_era_chain_heads_continue_into_a_clean_chain() {
    let (signer, v1) = v1_chain();
    let store = MemoryStore::new();
    let ledger = KvLedger::start(Arc::new(store.clone()), &config(&signer, "p1", 128)).unwrap();
    let ks = ledger.keyspace().clone();
    seed_schema_2(&store, &ks, &v1, |r| hex::encode(r.compact_hash())).await;
    ledger.check_schema().await.unwrap();
    assert_eq!(
        store.dump().get(&ks.schema()).unwrap(),
        &foundationdb_tuple::pack(&(till_ledger_fdb::keys::SCHEMA_VERSION,)),
        "upgraded on open"
    );
    let family = hex::decode(&v1[0].body().family).unwrap();
    let head = ks.head(&family);
    assert!(
        !till_ledger_fdb::keys::decode_head(store.dump().get(&head).unwrap())
            .unwrap()
            .linked,
        "opening rewrites no head (no scan)"
    );
    let levels = vec![Level {
        revocation_id: family.clone(),
        cap: Some(10),
    }];
    let fourth = claim_ok(
        &ledger,
        conformance::claim_request(&levels, Some("k4"), "chat"),
    )
    .await;
    assert_eq!(fourth.receipt.body().seq, 4);
    assert_eq!(fourth.receipt.body().prev, Some(v1[2].hash_hex()));
    assert_ne!(v1[2].hash_hex(), hex::encode(v1[2].compact_hash()));
    assert_eq!(fourth.receipt.body().ledger.as_deref(), ledger.ledger_id());
    let stored = till_ledger_fdb::keys::decode_head(store.dump().get(&head).unwrap()).unwrap();
    assert_eq!(
        (stored.seq, stored.hash, stored.linked),
        (4, fourth.receipt.hash_hex(), true),
        "the head is written back marked"
    );
    let fifth = claim_ok(
        &ledger,
        conformance::claim_request(&levels, Some("k5"), "chat"),
    )
    .await;
    assert_eq!(fifth.receipt.body().prev, Some(fourth.receipt.hash_hex()));
    let chain = audited_chain(&ledger, &family, &keys(&signer)).await;
    assert_eq!(chain.len(), 5);
    assert_eq!(chain[..3], v1[..]);
    assert_eq!(used(&ledger, &levels).await, vec![5]);
}

/// The same upgrade when the first claim's commit result is unknown, landed or not: one
/// receipt 4, linked by the signing input's hash, and a clean chain.
#[tokio::test]
async fn v1_era_chain_heads_continue_under_unknown_commit_results() {
    for landed in [true, false] {
        let (signer, v1) = v1_chain();
        let store = MemoryStore::new();
        let ledger = KvLedger::start(Arc::new(store.clone()), &config(&signer, "p1", 128)).unwrap();
        let ks = ledger.keyspace().clone();
        seed_schema_2(&store, &ks, &v1, |r| hex::encode(r.compact_hash())).await;
        ledger.check_schema().await.unwrap();
        let family = hex::decode(&v1[0].body().family).unwrap();
        let levels = vec![Level {
            revocation_id: family.clone(),
            cap: Some(10),
        }];
        store.inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, landed);
        let fourth = claim_ok(
            &ledger,
            conformance::claim_request(&levels, Some("k4"), "chat"),
        )
        .await;
        assert_eq!(store.pending_faults(), 0);
        let stats = ledger.stats();
        assert_eq!(
            (stats.maybe_committed, stats.recovered),
            (1, u64::from(landed)),
            "landed: {landed}"
        );
        assert!(!fourth.replayed);
        assert_eq!(fourth.receipt.body().seq, 4);
        assert_eq!(fourth.receipt.body().prev, Some(v1[2].hash_hex()));
        // A second unknown result on the next claim, over the now marked head.
        store.inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, landed);
        let fifth = claim_ok(
            &ledger,
            conformance::claim_request(&levels, Some("k5"), "chat"),
        )
        .await;
        assert_eq!(fifth.receipt.body().prev, Some(fourth.receipt.hash_hex()));
        let chain = audited_chain(&ledger, &family, &keys(&signer)).await;
        assert_eq!(chain.len(), 5, "landed: {landed}");
        assert_eq!(chain[3].compact(), fourth.receipt.compact());
        assert_eq!(used(&ledger, &levels).await, vec![5]);
    }
}

/// A head written between receipts v2 and schema 3 (unmarked, but already naming the link
/// hash) continues too; a fleet of three proxies hammering one family right after the
/// upgrade never forks or breaks the chain; an unmarked head that names neither hash of
/// its receipt is refused as corrupt (nothing is charged).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn unmarked_heads_of_every_era_continue_and_a_wrong_one_is_corrupt() {
    // v2 receipts, head by link hash, unmarked; a fleet takes over.
    let store = MemoryStore::new();
    let (fleet, h) = fleet(&store, 3, 16).await;
    let levels = token(&[Some(100)]);
    for i in 0..3 {
        claim_ok(
            &*h.ledger,
            conformance::claim_request(&levels, Some(&format!("a{i}")), "chat"),
        )
        .await;
    }
    let family = levels[0].revocation_id.clone();
    let before = h.ledger.receipts(&family, 1, 10).await.unwrap();
    let ks = fleet.proxies[0].keyspace().clone();
    seed_schema_2(&store, &ks, &before, Receipt::hash_hex).await;
    fleet.proxies[0].check_schema().await.unwrap();
    let claims = (0..30).map(|i| {
        let ledger = Arc::clone(&h.ledger);
        let req = conformance::claim_request(&levels, Some(&format!("b{i}")), "chat");
        tokio::spawn(async move { claim_ok(&*ledger, req).await })
    });
    futures::future::join_all(claims).await;
    let chain = audited_chain(&*h.ledger, &family, &h.keys).await;
    assert_eq!(chain.len(), 33);

    // A head that does not name its receipt.
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5)]);
    let first = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    seed_schema_2(&f.store, f.ledger.keyspace(), &[first.receipt], |_| {
        "00".repeat(32)
    })
    .await;
    let answer = f
        .ledger
        .claim(conformance::claim_request(&levels, Some("k2"), "chat"))
        .await;
    assert!(
        matches!(answer, Err(LedgerError::Corrupt(ref m)) if m.contains("does not name")),
        "{answer:?}"
    );
    assert_eq!(used(&f.ledger, &levels).await, vec![1]);
}

// ---------------------------------------------------------------------------------------
// Ledger id

use till_ledger_fdb::LedgerIdCheck;

/// Opens a proxy on `store` with `signer` and the given id check.
async fn open_with(
    store: &MemoryStore,
    signer: &Arc<ReceiptSigner>,
    check: LedgerIdCheck,
) -> Result<KvLedger<MemoryStore>, LedgerError> {
    let mut cfg = config(signer, "p1", 128);
    cfg.ledger_id = check;
    KvLedger::open(Arc::new(store.clone()), &cfg).await
}

/// The key space gets its id once, at its first opening (in the schema transaction):
/// `<32 hex>@<receipt kid>`, stored under `(ks, "ledger_id")`, the same for every proxy
/// that opens it later, and in every receipt a claim signs (replays return the original).
#[tokio::test]
async fn ledger_id_is_created_once_and_in_every_receipt() {
    let f = fixture(|_| {}).await;
    let id = f.ledger.ledger_id().unwrap().to_owned();
    let (random, kid) = id.split_once('@').unwrap();
    assert_eq!(random.len(), 32);
    assert!(random.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(kid, f.signer.key_id());
    let ks = f.ledger.keyspace();
    assert_eq!(f.store.dump().get(&ks.ledger_id()).unwrap(), id.as_bytes());

    let levels = token(&[Some(5), Some(4)]);
    for i in 0..3 {
        let c = claim_ok(
            &f.ledger,
            conformance::claim_request(&levels, Some(&format!("k{i}")), "chat"),
        )
        .await;
        assert_eq!(c.receipt.body().ledger.as_deref(), Some(id.as_str()));
    }
    let replay = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k0"), "chat"),
    )
    .await;
    assert!(replay.replayed);
    assert_eq!(replay.receipt.body().ledger.as_deref(), Some(id.as_str()));

    // Reopening (this proxy, or another with the same receipt key) keeps the id.
    f.ledger.check_schema().await.unwrap();
    assert_eq!(f.ledger.ledger_id(), Some(id.as_str()));
    let cfg = config(&Arc::clone(&f.signer), "p2", 128);
    let other = KvLedger::open(Arc::new(f.store.clone()), &cfg)
        .await
        .unwrap();
    assert_eq!(other.ledger_id(), Some(id.as_str()));
    let c = claim_ok(
        &other,
        conformance::claim_request(&levels, Some("k9"), "chat"),
    )
    .await;
    assert_eq!(c.receipt.body().ledger.as_deref(), Some(id.as_str()));
    let chain = audited_chain(&f.ledger, &levels[0].revocation_id, &f.keys).await;
    assert_eq!(chain.len(), 4);
}

/// The opening transaction under unknown commit results, landed or not, and three proxies
/// opening a fresh key space at once: one id, which every proxy uses.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn ledger_id_creation_survives_unknown_results_and_racing_proxies() {
    for landed in [true, false] {
        let store = MemoryStore::new();
        let signer = Arc::new(ReceiptSigner::generate());
        store.inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, landed);
        let ledger = open_with(&store, &signer, LedgerIdCheck::default())
            .await
            .unwrap();
        assert_eq!(store.pending_faults(), 0);
        let id = ledger.ledger_id().unwrap();
        assert_eq!(
            store.dump().get(&ledger.keyspace().ledger_id()).unwrap(),
            id.as_bytes(),
            "landed: {landed}"
        );
    }
    for _ in 0..5 {
        let store = MemoryStore::new();
        let (fleet, _h) = fleet(&store, 3, 16).await;
        let id = fleet.proxies[0].ledger_id().unwrap();
        assert_eq!(
            store
                .dump()
                .get(&fleet.proxies[0].keyspace().ledger_id())
                .unwrap(),
            id.as_bytes()
        );
    }
}

/// A key space whose id is bound to another receipt key is refused by default, writing
/// nothing; `LedgerIdCheck::Expect(id)` (a rotated fleet key) accepts it, and the chain
/// keeps its ledger across the rotation. `Expect` refuses a fresh key space (creating
/// nothing) and a key space of another id.
#[tokio::test]
async fn foreign_ledger_ids_are_refused_unless_expected() {
    let f = fixture(|_| {}).await;
    let id = f.ledger.ledger_id().unwrap().to_owned();
    let levels = token(&[Some(5)]);
    let first = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("a"), "chat"),
    )
    .await;
    let before = f.store.dump();

    let rotated = Arc::new(ReceiptSigner::generate());
    let refused = open_with(&f.store, &rotated, LedgerIdCheck::default()).await;
    match refused {
        Err(LedgerError::Open { reason, .. }) => {
            assert!(reason.contains("another receipt key"), "{reason}");
            assert!(reason.contains(&id), "the refusal names the id: {reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(f.store.dump(), before, "a refused open writes nothing");

    let accepted = open_with(&f.store, &rotated, LedgerIdCheck::Expect(id.clone()))
        .await
        .unwrap();
    assert_eq!(accepted.ledger_id(), Some(id.as_str()));
    let second = claim_ok(
        &accepted,
        conformance::claim_request(&levels, Some("b"), "chat"),
    )
    .await;
    assert_eq!(second.receipt.body().ledger.as_deref(), Some(id.as_str()));
    assert_eq!(second.receipt.body().prev, Some(first.receipt.hash_hex()));
    let mut both = keys(&rotated);
    both.insert(Arc::clone(&f.signer).public_key());
    audited_chain(&accepted, &levels[0].revocation_id, &both).await;

    let wrong = open_with(&f.store, &rotated, LedgerIdCheck::Expect("00@r-x".into())).await;
    assert!(matches!(wrong, Err(LedgerError::Open { .. })), "{wrong:?}");

    let empty = MemoryStore::new();
    let fresh = open_with(&empty, &rotated, LedgerIdCheck::Expect(id.clone())).await;
    match fresh {
        Err(LedgerError::Open { reason, .. }) => {
            assert!(reason.contains("no ledger id"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(empty.dump().is_empty(), "nothing created");
}

/// A key space written before ledger ids (schema 2) gets an id at its first opening, and
/// its chains continue with it: older receipts carry none, the new ones the id.
#[tokio::test]
async fn a_key_space_from_before_ledger_ids_gets_one() {
    let (signer, v1) = v1_chain();
    let store = MemoryStore::new();
    let ledger = KvLedger::start(Arc::new(store.clone()), &config(&signer, "p1", 128)).unwrap();
    seed_schema_2(&store, ledger.keyspace(), &v1, |r| {
        hex::encode(r.compact_hash())
    })
    .await;
    assert_eq!(ledger.ledger_id(), None);
    ledger.check_schema().await.unwrap();
    let id = ledger.ledger_id().unwrap().to_owned();
    let family = hex::decode(&v1[0].body().family).unwrap();
    let levels = vec![Level {
        revocation_id: family.clone(),
        cap: Some(10),
    }];
    let fourth = claim_ok(
        &ledger,
        conformance::claim_request(&levels, Some("k4"), "chat"),
    )
    .await;
    assert_eq!(fourth.receipt.body().ledger.as_deref(), Some(id.as_str()));
    let chain = audited_chain(&ledger, &family, &keys(&signer)).await;
    assert!(chain[..3].iter().all(|r| r.body().ledger.is_none()));
}

/// A key space cleared under a running proxy is refused at the next claim (every claim of
/// the batch, nothing written), and a re-check does not give it a new id: never a fresh
/// start at seq 1 with the old id in its receipts.
#[tokio::test]
async fn a_key_space_cleared_under_a_running_proxy_is_refused() {
    use till_ledger_fdb::{KvStore, KvTxn};
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5)]);
    claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("a"), "chat"),
    )
    .await;
    let prefix = f.ledger.keyspace().prefix().to_vec();
    let mut end = prefix.clone();
    end.push(0xff);
    let mut txn = f.store.begin(&test_txn_options()).unwrap();
    txn.clear_range(&prefix, &end);
    txn.commit().await.map_err(|(_, e)| e).unwrap();
    assert!(f.store.dump().is_empty());

    let answer = f
        .ledger
        .claim(conformance::claim_request(&levels, Some("b"), "chat"))
        .await;
    assert!(
        matches!(answer, Err(LedgerError::Corrupt(ref m)) if m.contains("cleared or replaced")),
        "{answer:?}"
    );
    assert!(
        matches!(f.ledger.check_schema().await, Err(LedgerError::Open { .. })),
        "a re-check expects the id it knows"
    );
    assert!(f.store.dump().is_empty(), "nothing written");
}

// ---------------------------------------------------------------------------------------
// Family records, activity and alerts: the FoundationDB-specific parts

fn alert_ids(alerts: &[AlertRecord]) -> Vec<String> {
    let mut ids: Vec<String> = alerts.iter().map(|a| a.id.clone()).collect();
    ids.sort();
    ids
}

/// A claim that fires alerts, whose commit result is unknown but which landed: the retry
/// answers with the original receipt AND the alerts that commit wrote; nothing is stored
/// twice.
#[tokio::test]
async fn unknown_result_of_an_alerting_claim_fires_each_alert_once() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(1)]);
    let rid = hex::encode(&levels[0].revocation_id);
    let expected = vec![
        format!("threshold:{rid}:100"),
        format!("threshold:{rid}:80"),
    ];
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, true);
    let got = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    assert_eq!(f.ledger.stats().recovered, 1);
    assert_eq!(
        alert_ids(&got.alerts),
        expected,
        "the recovered claim reports them"
    );
    let stored = f.ledger.alerts(100).await.unwrap();
    assert_eq!(alert_ids(&stored), expected, "stored once");
    let leased = f
        .ledger
        .lease_alerts(conformance::NOW, 30, 100)
        .await
        .unwrap();
    assert_eq!(alert_ids(&leased), expected, "one outbox entry each");
    assert_single_charge(&f, &levels, "k", &got).await;
    let view = f
        .ledger
        .family(&levels[0].revocation_id, conformance::NOW)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.family.activity.last_hour, 1, "activity counted once");
    assert_eq!(view.blocks.len(), 1);
}

/// The same fault when the commit did NOT land: the retry plans afresh and fires the
/// alerts then (they are not lost).
#[tokio::test]
async fn unknown_result_that_did_not_land_still_fires_the_alert() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(1)]);
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, false);
    let got = claim_ok(
        &f.ledger,
        conformance::claim_request(&levels, Some("k"), "chat"),
    )
    .await;
    assert_eq!(f.ledger.stats().recovered, 0);
    assert_eq!(got.alerts.len(), 2);
    assert_eq!(
        alert_ids(&f.ledger.alerts(100).await.unwrap()),
        alert_ids(&got.alerts)
    );
}

/// A revocation whose commit result is unknown but which landed: still reported as the
/// first revocation with its alert, and the alert is stored once.
#[tokio::test]
async fn unknown_result_of_a_revocation_reports_it_once() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5), Some(2)]);
    claim_ok(&f.ledger, conformance::claim_request(&levels, None, "chat")).await;
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, true);
    let r = f.ledger.revoke(&levels[1].revocation_id).await.unwrap();
    assert!(r.newly);
    assert_eq!(r.family, Some(hex::encode(&levels[0].revocation_id)));
    let alert = r.alert.expect("the revocation alert");
    assert_eq!(alert.block, Some(1));
    let revocations: Vec<_> = f
        .ledger
        .alerts(100)
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.id == alert.id)
        .collect();
    assert_eq!(revocations.len(), 1);
    assert!(
        !f.ledger
            .revoke(&levels[1].revocation_id)
            .await
            .unwrap()
            .newly
    );
}

/// Ten claims of one family in ONE transaction (group commit): the per-minute counter
/// sees the earlier claims of the batch (10, not 1), the rate alert fires exactly once,
/// and the family's blocks are written once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_of_one_family_counts_its_minute_and_fires_the_rate_alert_once() {
    let f = fixture(|c| {
        c.max_batch = 64;
        c.alerts = till_ledger::AlertPolicy {
            rate_per_minute: Some(3),
            ..till_ledger::AlertPolicy::none()
        };
    })
    .await;
    let levels = token(&[None, Some(100)]);
    let ledger = Arc::new(f.ledger);
    f.store.set_frozen(true);
    let tasks: Vec<_> = (0..10)
        .map(|_| {
            let ledger = Arc::clone(&ledger);
            let req = conformance::claim_request(&levels, None, "chat");
            tokio::spawn(async move { ledger.claim(req).await })
        })
        .collect();
    while ledger.stats().batches == 0 {
        tokio::task::yield_now().await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    f.store.set_frozen(false);
    let mut fired = Vec::new();
    for t in tasks {
        fired.extend(t.await.unwrap().unwrap().unwrap().alerts);
    }
    assert!(
        ledger.stats().commits <= 3,
        "the claims were meant to share transactions: {:?}",
        ledger.stats()
    );
    let fam = hex::encode(&levels[0].revocation_id);
    let minute = conformance::NOW / 60;
    assert_eq!(alert_ids(&fired), vec![format!("rate:{fam}:{minute}")]);
    assert_eq!(fired[0].rate_per_minute, Some(4));
    let stored = ledger.alerts(100).await.unwrap();
    assert_eq!(alert_ids(&stored), alert_ids(&fired));
    let ks = ledger.keyspace();
    let dump = f.store.dump();
    let count = dump
        .get(&ks.activity(&levels[0].revocation_id, minute))
        .map(|v| till_ledger_fdb::keys::decode_u64(v).unwrap());
    assert_eq!(count, Some(10), "every claim of the batch counted");
    let detail = ledger
        .family(&levels[0].revocation_id, conformance::NOW)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(detail.blocks.len(), 2);
    assert_eq!(detail.family.activity.per_minute.last(), Some(&10));
}

/// The first claim of a new minute prunes the family's buckets older than
/// `ACTIVITY_MINUTES`; younger ones stay.
#[tokio::test]
async fn old_activity_buckets_are_pruned() {
    let f = fixture(|_| {}).await;
    let levels = token(&[None]);
    let fam = &levels[0].revocation_id;
    let at = |now: u64| {
        let mut req = conformance::claim_request(&levels, None, "chat");
        req.now = now;
        req
    };
    let t0 = conformance::NOW - conformance::NOW % 60;
    claim_ok(&f.ledger, at(t0)).await;
    claim_ok(&f.ledger, at(t0 + 60 * 50)).await;
    claim_ok(&f.ledger, at(t0 + 60 * 50 + 1)).await;
    let ks = f.ledger.keyspace();
    let m0 = t0 / 60;
    let present = |m: u64| f.store.dump().contains_key(&ks.activity(fam, m));
    assert!(present(m0) && present(m0 + 50));
    let late = m0 + till_ledger::family::ACTIVITY_MINUTES + 1;
    claim_ok(&f.ledger, at(late * 60)).await;
    assert!(!present(m0), "older than the window: pruned");
    assert!(present(m0 + 50) && present(late));
    let view = f.ledger.family(fam, late * 60).await.unwrap().unwrap();
    assert_eq!(view.family.activity.last_hour, 1);
}

/// Two proxies leasing the outbox at the same moment: every due alert is leased by
/// exactly one of them (the lease is one transaction; the loser of the conflict re-reads
/// and finds the alert leased).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_proxies_leasing_at_once_never_take_the_same_alert() {
    let store = MemoryStore::new();
    let (fleet, _h) = fleet(&store, 2, 128).await;
    let mut expected = Vec::new();
    for _ in 0..15 {
        let levels = token(&[Some(1)]);
        let c = claim_ok(
            &fleet.proxies[0],
            conformance::claim_request(&levels, None, "chat"),
        )
        .await;
        expected.extend(c.alerts);
    }
    assert_eq!(expected.len(), 30);
    // A commit round trip long enough that both leases read before either commits.
    store.set_commit_latency(Duration::from_millis(20));
    let conflicts_before = store.conflicts();
    for round in 0..3 {
        let now = conformance::NOW + round * 100;
        let (a, b) = tokio::join!(
            fleet.proxies[0].lease_alerts(now, 30, 1000),
            fleet.proxies[1].lease_alerts(now, 30, 1000)
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        let mut all = alert_ids(&a);
        all.extend(alert_ids(&b));
        all.sort();
        let before = all.len();
        all.dedup();
        assert_eq!(before, all.len(), "an alert leased twice in round {round}");
        assert_eq!(all, alert_ids(&expected), "every due alert leased once");
        assert!(a
            .iter()
            .chain(&b)
            .all(|r| r.delivery.attempts == round as u32 + 1));
    }
    assert!(
        store.conflicts() >= conflicts_before + 3,
        "the two leases of each round were meant to race (one conflicts)"
    );
    store.set_commit_latency(Duration::ZERO);
    // Delivered alerts leave the outbox for good.
    for a in &expected {
        fleet.proxies[1]
            .settle_alert(
                &a.id,
                AlertOutcome::Delivered {
                    at: conformance::NOW,
                },
            )
            .await
            .unwrap();
    }
    let ks = fleet.proxies[0].keyspace();
    let (b, e) = ks.outbox_range();
    assert_eq!(store.dump().range(b..e).count(), 0, "outbox empty");
    assert!(fleet.proxies[0]
        .lease_alerts(conformance::NOW + 10_000, 30, 1000)
        .await
        .unwrap()
        .is_empty());
}

// ---------------------------------------------------------------------------------------
// Bounded key space: one copy of each receipt, idempotency records expire

/// How many stored values contain `needle`.
fn copies(store: &MemoryStore, needle: &[u8]) -> usize {
    store
        .dump()
        .values()
        .filter(|v| v.windows(needle.len()).any(|w| w == needle))
        .count()
}

/// A claim and then a replay, each with a commit whose result is unknown but which
/// landed: both retries find their own write in the record and read the receipt by the
/// record's pointer. One charge, one replay counted, and the receipt stored exactly once
/// (the record and the journal hold `(family, seq)`, not a copy).
#[tokio::test]
async fn replay_by_pointer_after_an_unknown_result() {
    let f = fixture(|_| {}).await;
    let levels = token(&[Some(5), Some(3)]);
    let req = || conformance::claim_request(&levels, Some("k"), "chat");
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, true);
    let first = claim_ok(&f.ledger, req()).await;
    assert!(!first.replayed);
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, true);
    let replay = claim_ok(&f.ledger, req()).await;
    assert!(replay.replayed);
    assert_eq!(replay.receipt.compact(), first.receipt.compact());
    assert_eq!(
        f.ledger.stats().recovered,
        2,
        "both retries found their own write"
    );
    assert_eq!(used(&f.ledger, &levels).await, vec![1, 1]);

    let ks = f.ledger.keyspace();
    let scope = &levels[1].revocation_id;
    let record = till_ledger_fdb::keys::IdemRecord::decode(
        f.store.dump().get(&ks.idempotency(scope, "k")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        record.receipt,
        till_ledger_fdb::keys::ReceiptRef::At {
            family: levels[0].revocation_id.clone(),
            seq: 1
        }
    );
    assert_eq!((record.replays, record.at), (1, Some(conformance::NOW)));
    assert_eq!(record.writers.len(), 2, "the original write and one replay");
    assert_eq!(
        copies(&f.store, first.receipt.compact().as_bytes()),
        1,
        "the receipt is stored once"
    );
    // A receipt's signature (its last segment) appears nowhere else either.
    let signature = first.receipt.compact().rsplit('.').next().unwrap();
    assert_eq!(copies(&f.store, signature.as_bytes()), 1);
}

/// Claims on a hot token, with and without client keys, replays and concurrent
/// duplicates: every receipt is stored exactly once, and what one claim adds to the key
/// space stays small (figures in spec/ledger-fdb.md §1).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn each_receipt_is_stored_once() {
    let f = fixture(|c| c.max_batch = 16).await;
    let ledger = Arc::new(f.ledger);
    let levels = token(&[None, Some(1_000)]);
    let before: usize = f.store.dump().iter().map(|(k, v)| k.len() + v.len()).sum();
    let tasks: Vec<_> = (0..60)
        .map(|i| {
            let ledger = Arc::clone(&ledger);
            // 20 distinct client keys, each sent three times at once.
            let key = format!("key-{}", i % 20);
            let req = conformance::claim_request(&levels, Some(&key), "chat");
            tokio::spawn(async move { ledger.claim(req).await.unwrap().unwrap() })
        })
        .collect();
    let mut claims = Vec::new();
    for t in tasks {
        claims.push(t.await.unwrap());
    }
    assert_eq!(claims.iter().filter(|c| !c.replayed).count(), 20);
    for i in 0..40 {
        let req = conformance::claim_request(&levels, None, &format!("x{i}"));
        claims.push(ledger.claim(req).await.unwrap().unwrap());
    }
    let stored = conformance::all_receipts(ledger.as_ref(), &levels[0].revocation_id).await;
    assert_eq!(stored.len(), 60);
    for r in &stored {
        assert_eq!(
            copies(&f.store, r.compact().as_bytes()),
            1,
            "seq {}",
            r.body().seq
        );
    }
    // Growth per claim: the receipt, plus small records.
    let dump = f.store.dump();
    let after: usize = dump.iter().map(|(k, v)| k.len() + v.len()).sum();
    let receipts: usize = stored.iter().map(|r| r.compact().len()).sum();
    let per_claim = (after - before) / stored.len();
    let overhead = (after - before - receipts) / stored.len();
    println!(
        "per claim: {per_claim} bytes of keys and values, of which {} receipt and {overhead} the rest",
        receipts / stored.len()
    );
    assert!(
        overhead < 1_000,
        "everything but the receipt stays under 1 KB per claim: {overhead}"
    );
}

fn at(levels: &[Level], key: &str, tag: &str, now: u64) -> ClaimRequest {
    ClaimRequest {
        now,
        ..conformance::claim_request(levels, Some(key), tag)
    }
}

/// An idempotency record answers replays for `idempotency_window` after its claim's
/// `now`; past it, the same key (and even the same request) is a fresh claim — charged,
/// with a new receipt — whose record then answers replays in turn.
#[tokio::test]
async fn idempotency_records_expire_after_the_window() {
    let f = fixture(|c| c.idempotency_window = Duration::from_secs(60)).await;
    let levels = token(&[Some(10)]);
    let t0 = conformance::NOW;
    let first = claim_ok(&f.ledger, at(&levels, "k", "chat", t0)).await;
    let edge = claim_ok(&f.ledger, at(&levels, "k", "chat", t0 + 60)).await;
    assert!(edge.replayed, "still a replay at the window's last second");
    assert_eq!(edge.receipt.compact(), first.receipt.compact());
    // A different request under the key is still a conflict inside the window ...
    assert_eq!(
        f.ledger
            .claim(at(&levels, "k", "other", t0 + 60))
            .await
            .unwrap()
            .unwrap_err(),
        Refusal::IdempotencyConflict
    );
    // ... and past the window the record is absent: a fresh claim.
    let fresh = claim_ok(&f.ledger, at(&levels, "k", "chat", t0 + 61)).await;
    assert!(!fresh.replayed, "past the window a replay is a fresh claim");
    assert_eq!(fresh.receipt.body().seq, 2);
    assert_eq!(fresh.receipt.body().idempotency_key, "k");
    assert_eq!(used(&f.ledger, &levels).await, vec![2]);
    // The new record answers replays (with the new receipt), its count starting afresh.
    for _ in 0..till_ledger::MAX_REPLAYS {
        let again = claim_ok(&f.ledger, at(&levels, "k", "chat", t0 + 62)).await;
        assert!(again.replayed);
        assert_eq!(again.receipt.compact(), fresh.receipt.compact());
    }
    // A clock behind the record's time is not expiry.
    assert_eq!(
        f.ledger
            .claim(at(&levels, "k", "chat", t0))
            .await
            .unwrap()
            .unwrap_err(),
        Refusal::ReplayLimit
    );
    // A different request past the window is a fresh claim too (no conflict).
    let other = claim_ok(&f.ledger, at(&levels, "k", "other", t0 + 200)).await;
    assert!(!other.replayed);
    assert_eq!(used(&f.ledger, &levels).await, vec![3]);
    let stored = conformance::all_receipts(&f.ledger, &levels[0].revocation_id).await;
    audit_chain(&stored, &f.keys).unwrap();
    assert_eq!(
        FdbConfig::new(Arc::new(ReceiptSigner::generate()), "p").idempotency_window,
        Duration::from_secs(24 * 60 * 60),
        "the documented default window"
    );
}

/// A fresh claim over an expired record whose commit result is unknown but landed: the
/// retry finds its own write (the record now holds its id and points at its receipt) and
/// charges nothing more.
#[tokio::test]
async fn unknown_result_of_a_claim_over_an_expired_record_charges_once() {
    let f = fixture(|c| c.idempotency_window = Duration::from_secs(60)).await;
    let levels = token(&[Some(10)]);
    let t0 = conformance::NOW;
    let first = claim_ok(&f.ledger, at(&levels, "k", "chat", t0)).await;
    f.store
        .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, true);
    let fresh = claim_ok(&f.ledger, at(&levels, "k", "chat", t0 + 3_600)).await;
    assert!(!fresh.replayed);
    assert_ne!(fresh.receipt.compact(), first.receipt.compact());
    assert_eq!(fresh.receipt.body().seq, 2);
    assert_eq!(f.ledger.stats().recovered, 1);
    assert_eq!(used(&f.ledger, &levels).await, vec![2]);
}

/// A lease whose commit result is unknown: whether it landed or not, the call returns
/// exactly the due alerts, each leased once (attempts 1), and a second deliverer gets
/// none of them while the lease runs. (Before the lease token, a landed unknown lease
/// returned nothing: the fleet-under-chaos conformance run failed now and then.)
#[tokio::test]
async fn unknown_result_of_a_lease_returns_the_alerts_it_leased() {
    for applied in [true, false] {
        let f = fixture(|_| {}).await;
        let levels = token(&[Some(1)]);
        let got = claim_ok(
            &f.ledger,
            conformance::claim_request(&levels, Some("k"), "chat"),
        )
        .await;
        let expected = alert_ids(&got.alerts);
        assert_eq!(expected.len(), 2);
        f.store
            .inject_commit_error(codes::COMMIT_UNKNOWN_RESULT, applied);
        let leased = f
            .ledger
            .lease_alerts(conformance::NOW, 30, 100)
            .await
            .unwrap();
        assert_eq!(alert_ids(&leased), expected, "applied: {applied}");
        assert!(leased.iter().all(|a| a.delivery.attempts == 1));
        assert_eq!(f.store.pending_faults(), 0);
        let again = f
            .ledger
            .lease_alerts(conformance::NOW + 1, 30, 100)
            .await
            .unwrap();
        assert!(again.is_empty(), "leased once (applied: {applied})");
        // Settled alerts leave the outbox and their lease token with it.
        for id in &expected {
            f.ledger
                .settle_alert(
                    id,
                    AlertOutcome::Delivered {
                        at: conformance::NOW + 2,
                    },
                )
                .await
                .unwrap();
        }
        let ks = f.ledger.keyspace();
        let dump = f.store.dump();
        for id in &expected {
            assert!(!dump.contains_key(&ks.outbox(id)));
            assert!(!dump.contains_key(&ks.lease(id)));
        }
    }
}

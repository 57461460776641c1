//! The backend conformance suite (cargo feature `conformance`).
//!
//! Every [`Ledger`] backend runs these cases against a fresh, empty instance. Run them
//! all with [`run_all`], or each as its own test:
//!
//! ```no_run
//! use till_ledger::conformance::{self, Harness};
//! # async fn my_harness() -> Harness { unimplemented!() }
//! // In the backend's tests, one `#[tokio::test(flavor = "multi_thread")]` per case:
//! async fn hot_token_exact_cap() {
//!     conformance::hot_token_exact_cap(my_harness().await).await;
//! }
//! // ...or every case, each on a fresh harness:
//! async fn all_cases() {
//!     conformance::run_all(my_harness).await;
//! }
//! ```
//!
//! Cases need a multi-thread Tokio runtime (they spawn concurrent claimers). Tree shapes,
//! caps and claim targets come from seeded RNGs (reproducible); revocation ids are fresh
//! random 64-byte values, so cases never collide even on a shared store. Each case is
//! bounded in count and in time ([`CASE_TIMEOUT`]) and panics with a description on the
//! first violation: this module is test code shipped as a library.
#![allow(
    // Test harness: a failed expectation must stop the test with a message.
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, RngCore, SeedableRng};
use till_receipt::{audit_chain, Receipt, ReceiptKeySet, RequestDigest};

use crate::alert::{AlertKind, AlertOutcome, DeliveryStatus};
use crate::family::{BlockMeta, KeyBlocks};
use crate::{
    Claim, ClaimRequest, Ledger, LedgerError, Level, Refusal, VoidRequest, Voided, WindowCap,
    MAX_REPLAYS,
};

pub mod retention;

// Harness requirement: the backend runs with the default alert policy
// (`AlertPolicy::default()`: thresholds 80 % and 100 %, revocation alerts, no rate ceiling).

/// Upper bound on one case's wall time.
pub const CASE_TIMEOUT: Duration = Duration::from_secs(120);

/// The claim time every case uses (Unix seconds).
pub const NOW: u64 = 1_750_000_000;

/// A fresh, empty ledger plus the receipt keys that verify what it signs.
#[derive(Debug, Clone)]
pub struct Harness {
    /// The backend under test (fresh and empty).
    pub ledger: Arc<dyn Ledger>,
    /// Public keys of the backend's receipt signer, for verification and `audit_chain`.
    pub keys: ReceiptKeySet,
}

/// Runs every case, each on its own fresh harness from `make`.
pub async fn run_all<F, Fut>(mut make: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Harness>,
{
    concurrent_tree_claims(make().await).await;
    hot_token_exact_cap(make().await).await;
    slots_chain_and_remaining(make().await).await;
    idempotent_replay(make().await).await;
    concurrent_duplicate_claims(make().await).await;
    sibling_cannot_replay_idempotency_key(make().await).await;
    revocation_at_each_level(make().await).await;
    expired_refused(make().await).await;
    refusal_writes_nothing(make().await).await;
    unknown_blocks_and_idempotent_revoke(make().await).await;
    generated_idempotency_keys(make().await).await;
    invalid_requests_rejected(make().await).await;
    families_and_blocks_recorded(make().await).await;
    threshold_alerts_exactly_once(make().await).await;
    alert_outbox_lease_and_settle(make().await).await;
    revocation_alert_once(make().await).await;
    windowed_caps_exact_under_concurrency(make().await).await;
    windowed_refusal_writes_nothing(make().await).await;
    void_restores_exactly_one_slot(make().await).await;
    double_void_is_a_no_op(make().await).await;
    void_of_unknown_seq_refused(make().await).await;
    retry_after_void_claims_afresh(make().await).await;
    caps_exact_under_concurrent_claims_and_voids(make().await).await;
    void_restores_window_slot(make().await).await;
}

async fn bounded(name: &str, case: impl Future<Output = ()>) {
    if tokio::time::timeout(CASE_TIMEOUT, case).await.is_err() {
        panic!("conformance case {name} did not finish within {CASE_TIMEOUT:?}");
    }
}

// ---------------------------------------------------------------------------------------
// Helpers

/// A fresh random 64-byte revocation id.
pub fn random_revocation_id() -> Vec<u8> {
    let mut id = vec![0u8; 64];
    rand::thread_rng().fill_bytes(&mut id);
    id
}

fn level(cap: Option<u64>) -> Level {
    Level {
        revocation_id: random_revocation_id(),
        cap,
    }
}

/// A request digest that differs per `tag`.
pub fn digest(tag: &str) -> RequestDigest {
    RequestDigest {
        method: "POST".into(),
        upstream: "openai".into(),
        path: format!("/v1/{tag}"),
        body_sha256: "0f".repeat(32),
        model: Some("gpt-4o-mini".into()),
        query: None,
        content_type: None,
    }
}

/// A claim through `levels` at [`NOW`] with an optional idempotency key and the request
/// [`digest`] of `tag`. Shared by every backend's tests and benches.
pub fn claim_request(levels: &[Level], key: Option<&str>, tag: &str) -> ClaimRequest {
    ClaimRequest {
        levels: levels.to_vec(),
        idempotency_key: key.map(str::to_owned),
        request: digest(tag),
        now: NOW,
        not_after: None,
        meta: Some(Arc::new(block_meta(levels))),
        windows: Vec::new(),
        ceilings: None,
    }
}

/// The caveats a claim through `levels` declares: each level's cap; the authority block
/// also upstream `openai` and label [`LABEL`].
pub fn block_meta(levels: &[Level]) -> Vec<BlockMeta> {
    levels
        .iter()
        .enumerate()
        .map(|(i, l)| BlockMeta {
            label: (i == 0).then(|| LABEL.to_owned()),
            upstream: (i == 0).then(|| "openai".to_owned()),
            cap: l.cap,
            ..BlockMeta::default()
        })
        .collect()
}

/// The label [`claim_request`] gives every family.
pub const LABEL: &str = "conformance";

async fn claim(ledger: &dyn Ledger, req: ClaimRequest) -> Result<Claim, Refusal> {
    match ledger.claim(req).await {
        Ok(answer) => answer,
        Err(e) => panic!("ledger error where a decision was expected: {e}"),
    }
}

async fn claim_ok(ledger: &dyn Ledger, req: ClaimRequest) -> Claim {
    match claim(ledger, req).await {
        Ok(c) => c,
        Err(r) => panic!("expected a successful claim, got refusal {r:?}"),
    }
}

async fn claim_refused(ledger: &dyn Ledger, req: ClaimRequest) -> Refusal {
    match claim(ledger, req).await {
        Ok(c) => panic!("expected a refusal, got a claim: {:?}", c.receipt.body()),
        Err(r) => r,
    }
}

async fn used(ledger: &dyn Ledger, levels: &[Level]) -> Vec<u64> {
    let usage = ledger.usage(levels).await.unwrap();
    assert_eq!(
        usage.len(),
        levels.len(),
        "usage returns one entry per level"
    );
    for (u, l) in usage.iter().zip(levels) {
        assert_eq!(u.revocation_id, l.revocation_id, "usage keeps level order");
    }
    usage.iter().map(|u| u.used).collect()
}

/// All of a family's receipts, paging through `receipts`.
pub async fn all_receipts(ledger: &dyn Ledger, family: &[u8]) -> Vec<Receipt> {
    let mut out: Vec<Receipt> = Vec::new();
    loop {
        let from = out.len() as u64 + 1;
        let page = ledger.receipts(family, from, 64).await.unwrap();
        assert!(page.len() <= 64, "receipts honours limit");
        let done = page.len() < 64;
        out.extend(page);
        if done {
            return out;
        }
    }
}

/// Checks a family's stored chain: `seq` 1..=n, every receipt verifies, and
/// `audit_chain` is clean. Returns the receipts.
async fn audited_chain(h: &Harness, family: &[u8], expected: u64) -> Vec<Receipt> {
    let receipts = all_receipts(h.ledger.as_ref(), family).await;
    assert_eq!(
        receipts.len() as u64,
        expected,
        "receipts stored for the family"
    );
    for (i, r) in receipts.iter().enumerate() {
        assert_eq!(
            r.body().seq,
            i as u64 + 1,
            "receipts are in seq order, no gap"
        );
        assert_eq!(r.body().family, hex::encode(family));
        r.verify(&h.keys)
            .unwrap_or_else(|e| panic!("stored receipt {} does not verify: {e}", i + 1));
    }
    if !receipts.is_empty() {
        let report = audit_chain(&receipts, &h.keys)
            .unwrap_or_else(|e| panic!("audit_chain rejected the family's receipts: {e}"));
        assert_eq!(report.receipts, expected);
    }
    receipts
}

// ---------------------------------------------------------------------------------------
// Cases

/// A token tree: node 0 is the root; `parent[i] < i` for every other node.
#[derive(Debug)]
struct Tree {
    levels: Vec<Level>,
    parent: Vec<usize>,
}

impl Tree {
    /// Random shape: a root, 2–3 children, 0–2 grandchildren per child, mostly capped.
    fn random(rng: &mut StdRng) -> Self {
        let mut levels = vec![level(Some(rng.gen_range(10..=60)))];
        let mut parent = vec![0];
        for _ in 0..rng.gen_range(2..=3) {
            let child = levels.len();
            let cap = rng.gen_bool(0.75).then(|| rng.gen_range(1..=25));
            levels.push(level(cap));
            parent.push(0);
            for _ in 0..rng.gen_range(0..=2) {
                let cap = rng.gen_bool(0.75).then(|| rng.gen_range(0..=12));
                levels.push(level(cap));
                parent.push(child);
            }
        }
        Self { levels, parent }
    }

    /// Node indices from the root down to `node`.
    fn path(&self, node: usize) -> Vec<usize> {
        let mut path = vec![node];
        let mut at = node;
        while at != 0 {
            at = self.parent[at];
            path.push(at);
        }
        path.reverse();
        path
    }

    fn chain(&self, node: usize) -> Vec<Level> {
        self.path(node)
            .into_iter()
            .map(|i| self.levels[i].clone())
            .collect()
    }
}

/// 200 concurrent claims per tree across random trees (parent, children, grandchildren,
/// random caps): per level used ≤ cap and equal to the claims through it (siblings never
/// spend each other's caps), slot numbers unique and gapless per level, every refusal
/// justified by a full level, and the family's chain audits clean.
pub async fn concurrent_tree_claims(h: Harness) {
    bounded("concurrent_tree_claims", async {
        for seed in [11u64, 22, 33] {
            concurrent_tree(&h, seed, 200).await;
        }
    })
    .await;
}

async fn concurrent_tree(h: &Harness, seed: u64, claims: usize) {
    let mut rng = StdRng::seed_from_u64(seed);
    let tree = Arc::new(Tree::random(&mut rng));
    let n = tree.levels.len();
    let mut tasks = Vec::with_capacity(claims);
    for i in 0..claims {
        let node = rng.gen_range(0..n);
        let key = rng.gen_bool(0.5).then(|| format!("c-{seed}-{i}"));
        let req = claim_request(&tree.chain(node), key.as_deref(), &format!("t{i}"));
        let ledger = Arc::clone(&h.ledger);
        tasks.push(tokio::spawn(async move { (node, ledger.claim(req).await) }));
    }
    let mut successes = vec![0u64; n];
    let mut receipts_by_node: Vec<Vec<Receipt>> = vec![Vec::new(); n];
    let mut refusals: Vec<(usize, usize, u64)> = Vec::new();
    for task in tasks {
        let (node, answer) = task.await.unwrap();
        match answer {
            Ok(Ok(c)) => {
                assert!(!c.replayed, "fresh keys are never replays");
                successes[node] += 1;
                receipts_by_node[node].push(c.receipt);
            }
            Ok(Err(Refusal::CapReached { block, cap })) => refusals.push((node, block, cap)),
            Ok(Err(other)) => panic!("unexpected refusal {other:?}"),
            Err(e) => panic!("ledger error under concurrency: {e}"),
        }
    }

    // Claims through each node = successes at the node and all its descendants.
    let mut through = vec![0u64; n];
    for (node, &ok) in successes.iter().enumerate() {
        for i in tree.path(node) {
            through[i] += ok;
        }
    }
    let usage = used(h.ledger.as_ref(), &tree.levels).await;
    for i in 0..n {
        assert_eq!(
            usage[i], through[i],
            "seed {seed}: node {i} counts exactly the claims through it"
        );
        if let Some(cap) = tree.levels[i].cap {
            assert!(usage[i] <= cap, "seed {seed}: node {i} over cap");
        }
    }
    for (node, block, cap) in refusals {
        let at = tree.path(node)[block];
        assert_eq!(
            tree.levels[at].cap,
            Some(cap),
            "refusal names the level's cap"
        );
        assert_eq!(
            usage[at], cap,
            "seed {seed}: refusal at a level that is not full"
        );
    }

    // Slot numbers per level: unique, and exactly 1..=used.
    let mut slots: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
    for (node, receipts) in receipts_by_node.iter().enumerate() {
        let path = tree.path(node);
        for r in receipts {
            let body = r.body();
            assert_eq!(body.slots.len(), path.len());
            for (slot, &i) in body.slots.iter().zip(&path) {
                assert_eq!(
                    slot.revocation_id,
                    hex::encode(&tree.levels[i].revocation_id)
                );
                assert_eq!(slot.cap, tree.levels[i].cap);
                assert!(
                    slots.entry(i).or_default().insert(slot.slot),
                    "seed {seed}: slot {} at node {i} taken twice",
                    slot.slot
                );
            }
            assert_eq!(body.seq, body.slots[0].slot, "seq is the family slot");
        }
    }
    for (i, &count) in through.iter().enumerate() {
        let expected: BTreeSet<u64> = (1..=count).collect();
        assert_eq!(
            slots.remove(&i).unwrap_or_default(),
            expected,
            "seed {seed}: slots of node {i}"
        );
    }

    let stored = audited_chain(h, &tree.levels[0].revocation_id, through[0]).await;
    for receipts in &receipts_by_node {
        for r in receipts {
            let at = usize::try_from(r.body().seq - 1).unwrap();
            assert_eq!(
                stored[at].compact(),
                r.compact(),
                "returned receipt is stored"
            );
        }
    }
}

/// One token, cap 25, 200 concurrent claims: exactly 25 succeed with seq 1..=25, the rest
/// are refused with `CapReached { block: 0, cap: 25 }`.
pub async fn hot_token_exact_cap(h: Harness) {
    bounded("hot_token_exact_cap", async {
        let levels = vec![level(Some(25))];
        let tasks: Vec<_> = (0..200)
            .map(|i| {
                let ledger = Arc::clone(&h.ledger);
                let req = claim_request(&levels, None, &format!("hot{i}"));
                tokio::spawn(async move { ledger.claim(req).await })
            })
            .collect();
        let mut seqs = BTreeSet::new();
        let mut refused = 0;
        for task in tasks {
            match task.await.unwrap() {
                Ok(Ok(c)) => assert!(seqs.insert(c.receipt.body().seq), "seq reused"),
                Ok(Err(Refusal::CapReached { block: 0, cap: 25 })) => refused += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!(seqs, (1..=25).collect::<BTreeSet<u64>>());
        assert_eq!(refused, 175);
        assert_eq!(used(h.ledger.as_ref(), &levels).await, vec![25]);
        audited_chain(&h, &levels[0].revocation_id, 25).await;
    })
    .await;
}

/// Sequential claims down a three-level token: slots "k of N" per level, `seq`, `prev`
/// links, receipt content, `remaining` under the tightest cap, the first exceeded level
/// reported, and `receipts` paging.
pub async fn slots_chain_and_remaining(h: Harness) {
    bounded("slots_chain_and_remaining", async {
        let ledger = h.ledger.as_ref();
        let root = level(Some(5));
        let child = level(Some(3));
        let grandchild = level(None);
        let deep = vec![root.clone(), child.clone(), grandchild.clone()];
        let mut prev: Option<String> = None;
        for k in 1..=3u64 {
            let key = format!("deep-{k}");
            let c = claim_ok(ledger, claim_request(&deep, Some(&key), "deep")).await;
            assert!(!c.replayed);
            assert_eq!(c.remaining, Some(3 - k), "child is the tightest cap");
            let b = c.receipt.body();
            assert_eq!(b.v, till_receipt::RECEIPT_VERSION);
            assert_eq!(b.seq, k);
            assert_eq!(b.family, hex::encode(&root.revocation_id));
            assert_eq!(b.prev, prev, "prev names the previous receipt");
            assert_eq!(b.iat, NOW);
            assert_eq!(b.idempotency_key, key);
            assert_eq!(b.request, digest("deep"));
            let got: Vec<(u32, u64, Option<u64>)> =
                b.slots.iter().map(|s| (s.block, s.slot, s.cap)).collect();
            assert_eq!(got, vec![(0, k, Some(5)), (1, k, Some(3)), (2, k, None)]);
            c.receipt.verify(&h.keys).unwrap();
            prev = Some(c.receipt.hash_hex());
        }
        assert_eq!(
            claim_refused(ledger, claim_request(&deep, None, "deep")).await,
            Refusal::CapReached { block: 1, cap: 3 }
        );
        for k in 4..=5u64 {
            let c = claim_ok(
                ledger,
                claim_request(std::slice::from_ref(&root), None, "root"),
            )
            .await;
            assert_eq!(c.receipt.body().seq, k);
            assert_eq!(c.remaining, Some(5 - k));
            assert_eq!(c.receipt.body().prev, prev);
            prev = Some(c.receipt.hash_hex());
        }
        assert_eq!(
            claim_refused(ledger, claim_request(&deep, None, "deep")).await,
            Refusal::CapReached { block: 0, cap: 5 },
            "the first exceeded level in block order is reported"
        );
        assert_eq!(used(ledger, &deep).await, vec![5, 3, 3]);

        let family = root.revocation_id.as_slice();
        let seqs = |rs: Vec<Receipt>| rs.iter().map(|r| r.body().seq).collect::<Vec<_>>();
        assert_eq!(
            seqs(ledger.receipts(family, 1, 2).await.unwrap()),
            vec![1, 2]
        );
        assert_eq!(
            seqs(ledger.receipts(family, 0, 2).await.unwrap()),
            vec![1, 2]
        );
        assert_eq!(
            seqs(ledger.receipts(family, 3, 10).await.unwrap()),
            vec![3, 4, 5]
        );
        assert!(ledger.receipts(family, 6, 10).await.unwrap().is_empty());
        assert!(ledger.receipts(family, 1, 0).await.unwrap().is_empty());
        audited_chain(&h, family, 5).await;
    })
    .await;
}

/// Same key + same request: the original receipt, not charged, at most [`MAX_REPLAYS`]
/// times, then `ReplayLimit`; same key + different request: `IdempotencyConflict`. A
/// replay is served even when the cap is used up (it is not a new activation).
pub async fn idempotent_replay(h: Harness) {
    bounded("idempotent_replay", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(Some(10)), level(Some(1))];
        let original = claim_ok(ledger, claim_request(&levels, Some("k-1"), "a")).await;
        assert!(!original.replayed);
        assert_eq!(original.remaining, Some(0));
        for _ in 0..MAX_REPLAYS {
            let again = claim_ok(ledger, claim_request(&levels, Some("k-1"), "a")).await;
            assert!(again.replayed);
            assert_eq!(again.receipt.compact(), original.receipt.compact());
            assert_eq!(again.remaining, Some(0));
            assert_eq!(
                used(ledger, &levels).await,
                vec![1, 1],
                "replay not charged"
            );
            assert_eq!(
                claim_refused(ledger, claim_request(&levels, Some("k-1"), "b")).await,
                Refusal::IdempotencyConflict
            );
        }
        assert_eq!(
            claim_refused(ledger, claim_request(&levels, Some("k-1"), "a")).await,
            Refusal::ReplayLimit
        );
        assert_eq!(
            claim_refused(ledger, claim_request(&levels, Some("k-1"), "b")).await,
            Refusal::IdempotencyConflict
        );
        assert_eq!(used(ledger, &levels).await, vec![1, 1]);
        audited_chain(&h, &levels[0].revocation_id, 1).await;
    })
    .await;
}

/// 16 concurrent identical claims with one idempotency key: charged once, exactly one
/// original, [`MAX_REPLAYS`] replays of that same receipt, the rest `ReplayLimit`.
pub async fn concurrent_duplicate_claims(h: Harness) {
    bounded("concurrent_duplicate_claims", async {
        let levels = vec![level(Some(100)), level(None)];
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let ledger = Arc::clone(&h.ledger);
                let req = claim_request(&levels, Some("dup"), "same");
                tokio::spawn(async move { ledger.claim(req).await })
            })
            .collect();
        let (mut originals, mut replays, mut limited) = (Vec::new(), Vec::new(), 0);
        for task in tasks {
            match task.await.unwrap() {
                Ok(Ok(c)) if c.replayed => replays.push(c.receipt),
                Ok(Ok(c)) => originals.push(c.receipt),
                Ok(Err(Refusal::ReplayLimit)) => limited += 1,
                other => panic!("unexpected answer {other:?}"),
            }
        }
        assert_eq!(originals.len(), 1, "exactly one original claim");
        assert_eq!(replays.len(), MAX_REPLAYS as usize);
        assert_eq!(limited, 16 - 1 - MAX_REPLAYS as usize);
        for r in &replays {
            assert_eq!(r.compact(), originals[0].compact());
        }
        assert_eq!(used(h.ledger.as_ref(), &levels).await, vec![1, 1]);
        audited_chain(&h, &levels[0].revocation_id, 1).await;
    })
    .await;
}

/// Idempotency keys are scoped to the presented token: a sibling, the parent or a
/// grandchild presenting the same key and request makes a fresh claim charged to itself.
pub async fn sibling_cannot_replay_idempotency_key(h: Harness) {
    bounded("sibling_cannot_replay_idempotency_key", async {
        let ledger = h.ledger.as_ref();
        let root = level(Some(10));
        let a = vec![root.clone(), level(Some(5))];
        let b = vec![root.clone(), level(Some(5))];
        let a1 = vec![root.clone(), a[1].clone(), level(None)];
        let first = claim_ok(ledger, claim_request(&a, Some("shared"), "x")).await;
        assert_eq!(first.receipt.body().seq, 1);
        let sibling = claim_ok(ledger, claim_request(&b, Some("shared"), "x")).await;
        assert!(!sibling.replayed, "a sibling cannot replay another's key");
        assert_eq!(sibling.receipt.body().seq, 2);
        let parent = claim_ok(
            ledger,
            claim_request(std::slice::from_ref(&root), Some("shared"), "x"),
        )
        .await;
        assert!(!parent.replayed);
        assert_eq!(parent.receipt.body().seq, 3);
        let grandchild = claim_ok(ledger, claim_request(&a1, Some("shared"), "x")).await;
        assert!(!grandchild.replayed);
        assert_eq!(grandchild.receipt.body().seq, 4);
        let replay = claim_ok(ledger, claim_request(&a, Some("shared"), "x")).await;
        assert!(replay.replayed);
        assert_eq!(replay.receipt.compact(), first.receipt.compact());
        // a: its own claim + the grandchild's; b: its own.
        assert_eq!(used(ledger, &a).await, vec![4, 2]);
        assert_eq!(used(ledger, &b).await, vec![4, 1]);
        audited_chain(&h, &root.revocation_id, 4).await;
    })
    .await;
}

/// Revoking a block kills it and its descendants, never its parent or siblings; a
/// replay through a revoked token is refused too; refusals write nothing; revoke is
/// idempotent and visible in `usage`.
pub async fn revocation_at_each_level(h: Harness) {
    bounded("revocation_at_each_level", async {
        let ledger = h.ledger.as_ref();
        // Three families, one per revoked level: 0 = root, 1 = child A, 2 = grandchild A1.
        for revoked_level in 0..3usize {
            let root = level(Some(50));
            let a = vec![root.clone(), level(Some(10))];
            let b = vec![root.clone(), level(Some(10))];
            let a1 = vec![root.clone(), a[1].clone(), level(Some(5))];
            let r = vec![root.clone()];
            // One claim through the soon-revoked token, with a key to replay later.
            let target = match revoked_level {
                0 => &r,
                1 => &a,
                _ => &a1,
            };
            claim_ok(ledger, claim_request(target, Some("before"), "pre")).await;
            let id = &target[revoked_level].revocation_id;
            ledger.revoke(id).await.unwrap();
            ledger.revoke(id).await.unwrap();

            let before = used(ledger, &a1).await;
            let before_b = used(ledger, &b).await;
            let expect_refused = |chain: &Vec<Level>| {
                chain
                    .iter()
                    .position(|l| &l.revocation_id == id)
                    .map(|block| Refusal::Revoked { block })
            };
            for (name, chain) in [("root", &r), ("a", &a), ("b", &b), ("a1", &a1)] {
                let answer = claim(ledger, claim_request(chain, None, "post")).await;
                match (expect_refused(chain), answer) {
                    (Some(want), Err(got)) => assert_eq!(got, want, "{name}"),
                    (None, Ok(_)) => {}
                    (want, got) => panic!(
                        "revoked level {revoked_level}, token {name}: wanted refusal \
                         {want:?}, got {got:?}"
                    ),
                }
            }
            assert_eq!(
                claim_refused(ledger, claim_request(target, Some("before"), "pre")).await,
                Refusal::Revoked {
                    block: revoked_level
                },
                "a replay through a revoked token is refused"
            );

            // Refused claims wrote nothing; the successful ones counted as usual.
            let after = used(ledger, &a1).await;
            let after_b = used(ledger, &b).await;
            let ok = |chain: &Vec<Level>| u64::from(expect_refused(chain).is_none());
            let through_root = ok(&r) + ok(&a) + ok(&b) + ok(&a1);
            assert_eq!(after[0], before[0] + through_root);
            assert_eq!(after[1], before[1] + ok(&a) + ok(&a1));
            assert_eq!(after[2], before[2] + ok(&a1));
            assert_eq!(after_b[1], before_b[1] + ok(&b));

            let usage = ledger.usage(&a1).await.unwrap();
            for (i, u) in usage.iter().enumerate() {
                assert_eq!(
                    u.revoked,
                    i == revoked_level,
                    "usage shows revocation of level {i}"
                );
            }
            audited_chain(&h, &root.revocation_id, after[0]).await;
        }
    })
    .await;
}

/// `now > not_after` is refused with `Expired` and writes nothing; `now == not_after` is
/// still valid.
pub async fn expired_refused(h: Harness) {
    bounded("expired_refused", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(Some(3)), level(Some(2))];
        let mut req = claim_request(&levels, Some("late"), "e");
        req.not_after = Some(NOW - 1);
        assert_eq!(claim_refused(ledger, req).await, Refusal::Expired);
        assert_eq!(used(ledger, &levels).await, vec![0, 0]);
        assert!(ledger
            .receipts(&levels[0].revocation_id, 1, 10)
            .await
            .unwrap()
            .is_empty());
        let mut req = claim_request(&levels, Some("on-time"), "e");
        req.not_after = Some(NOW);
        let c = claim_ok(ledger, req).await;
        assert_eq!(c.receipt.body().seq, 1);
        assert_eq!(used(ledger, &levels).await, vec![1, 1]);
    })
    .await;
}

/// Refusals (cap, expiry) leave usage, receipts and idempotency keys untouched: a key
/// used by a refused claim is still free for a different request.
pub async fn refusal_writes_nothing(h: Harness) {
    bounded("refusal_writes_nothing", async {
        let ledger = h.ledger.as_ref();
        let root = level(Some(2));
        let child = vec![root.clone(), level(Some(1))];
        let zero = vec![root.clone(), level(Some(0))];
        claim_ok(ledger, claim_request(&child, None, "c")).await;
        assert_eq!(
            claim_refused(ledger, claim_request(&child, Some("kc"), "c")).await,
            Refusal::CapReached { block: 1, cap: 1 }
        );
        assert_eq!(
            claim_refused(ledger, claim_request(&zero, Some("kz"), "z")).await,
            Refusal::CapReached { block: 1, cap: 0 }
        );
        assert_eq!(used(ledger, &child).await, vec![1, 1]);
        assert_eq!(used(ledger, &zero).await, vec![1, 0]);
        audited_chain(&h, &root.revocation_id, 1).await;

        let mut late = claim_request(std::slice::from_ref(&root), Some("kr"), "first");
        late.not_after = Some(NOW - 10);
        assert_eq!(claim_refused(ledger, late).await, Refusal::Expired);
        // Had the refused claim stored a record, this would be a conflict.
        let fresh = claim_ok(
            ledger,
            claim_request(std::slice::from_ref(&root), Some("kr"), "second"),
        )
        .await;
        assert!(!fresh.replayed);
        assert_eq!(fresh.receipt.body().seq, 2);
        assert_eq!(
            claim_refused(
                ledger,
                claim_request(std::slice::from_ref(&root), None, "r")
            )
            .await,
            Refusal::CapReached { block: 0, cap: 2 }
        );
        assert_eq!(used(ledger, &child).await, vec![2, 1]);
        audited_chain(&h, &root.revocation_id, 2).await;
    })
    .await;
}

/// Unknown blocks have zero usage and are not revoked; revoking an id never used works
/// (and is idempotent), and a token carrying it is refused from its first claim.
pub async fn unknown_blocks_and_idempotent_revoke(h: Harness) {
    bounded("unknown_blocks_and_idempotent_revoke", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(Some(5)), level(None)];
        let usage = ledger.usage(&levels).await.unwrap();
        assert!(usage.iter().all(|u| u.used == 0 && !u.revoked));
        assert!(ledger.usage(&[]).await.unwrap().is_empty());
        assert!(ledger
            .receipts(&levels[0].revocation_id, 1, 10)
            .await
            .unwrap()
            .is_empty());
        ledger.revoke(&levels[1].revocation_id).await.unwrap();
        ledger.revoke(&levels[1].revocation_id).await.unwrap();
        let usage = ledger.usage(&levels).await.unwrap();
        assert_eq!(
            usage.iter().map(|u| u.revoked).collect::<Vec<_>>(),
            vec![false, true]
        );
        assert_eq!(
            claim_refused(ledger, claim_request(&levels, None, "u")).await,
            Refusal::Revoked { block: 1 }
        );
        let c = claim_ok(ledger, claim_request(&levels[..1], None, "u")).await;
        assert_eq!(c.receipt.body().seq, 1);
    })
    .await;
}

/// Claims without a client key get distinct generated 128-bit hex keys, recorded in the
/// receipt; presenting that key again replays the claim.
pub async fn generated_idempotency_keys(h: Harness) {
    bounded("generated_idempotency_keys", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(None)];
        let a = claim_ok(ledger, claim_request(&levels, None, "g")).await;
        let b = claim_ok(ledger, claim_request(&levels, None, "g")).await;
        let (ka, kb) = (
            a.receipt.body().idempotency_key.clone(),
            b.receipt.body().idempotency_key.clone(),
        );
        assert_ne!(ka, kb);
        for k in [&ka, &kb] {
            assert_eq!(k.len(), 32);
            assert!(k.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')));
        }
        let replay = claim_ok(ledger, claim_request(&levels, Some(&ka), "g")).await;
        assert!(replay.replayed);
        assert_eq!(replay.receipt.compact(), a.receipt.compact());
        assert_eq!(used(ledger, &levels).await, vec![2]);
    })
    .await;
}

/// A claim with no levels, or with a revocation id repeated, is an error (not a refusal)
/// and writes nothing.
pub async fn invalid_requests_rejected(h: Harness) {
    bounded("invalid_requests_rejected", async {
        let ledger = h.ledger.as_ref();
        let root = level(Some(5));
        let empty = claim_request(&[], None, "i");
        assert!(matches!(
            ledger.claim(empty).await,
            Err(LedgerError::InvalidRequest(_))
        ));
        let twice = claim_request(&[root.clone(), root.clone()], None, "i");
        assert!(matches!(
            ledger.claim(twice).await,
            Err(LedgerError::InvalidRequest(_))
        ));
        assert_eq!(used(ledger, std::slice::from_ref(&root)).await, vec![0]);
        assert!(ledger
            .receipts(&root.revocation_id, 1, 10)
            .await
            .unwrap()
            .is_empty());
    })
    .await;
}

/// Families appear after their first committed claim (never after a refusal), with the
/// authority block's label, upstream and cap, usage, activity and every block seen under
/// its parent; a key recorded through `record_key` is listed before any claim, `minted`.
pub async fn families_and_blocks_recorded(h: Harness) {
    bounded("families_and_blocks_recorded", async {
        let ledger = h.ledger.as_ref();
        let root = level(Some(10));
        let a = level(Some(4));
        let b = level(None);
        let refused_family = level(Some(1));
        let f = hex::encode(&root.revocation_id);

        // A refusal records nothing: the expired claim never lists its family.
        let mut expired = claim_request(std::slice::from_ref(&refused_family), None, "exp");
        expired.not_after = Some(NOW - 1);
        assert_eq!(claim_refused(ledger, expired).await, Refusal::Expired);

        claim_ok(
            ledger,
            claim_request(&[root.clone(), a.clone()], None, "a1"),
        )
        .await;
        claim_ok(
            ledger,
            claim_request(&[root.clone(), a.clone()], None, "a2"),
        )
        .await;
        claim_ok(
            ledger,
            claim_request(&[root.clone(), b.clone()], None, "b1"),
        )
        .await;

        let families = ledger.families(NOW).await.unwrap();
        let ours: Vec<_> = families.iter().filter(|v| v.family == f).collect();
        assert_eq!(ours.len(), 1, "family listed once: {families:?}");
        let view = ours[0];
        assert_eq!(view.label.as_deref(), Some(LABEL));
        assert_eq!(view.upstream.as_deref(), Some("openai"));
        assert_eq!(
            (view.cap, view.used, view.remaining),
            (Some(10), 3, Some(7))
        );
        assert!(!view.revoked && !view.minted);
        assert_eq!(view.blocks, 3);
        assert_eq!(view.first_activation, Some(NOW));
        assert_eq!(view.last_activation, Some(NOW));
        assert_eq!(view.activity.last_hour, 3);
        assert_eq!(view.activity.per_minute.last(), Some(&3));
        let refused_hex = hex::encode(&refused_family.revocation_id);
        assert!(
            families.iter().all(|v| v.family != refused_hex),
            "a refused claim recorded its family"
        );

        let detail = ledger
            .family(&root.revocation_id, NOW)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(detail.family, *view);
        let blocks: BTreeMap<String, (u32, Option<String>, u64, Option<u64>)> = detail
            .blocks
            .iter()
            .map(|b| {
                (
                    b.record.revocation_id.clone(),
                    (b.record.index, b.record.parent.clone(), b.used, b.remaining),
                )
            })
            .collect();
        assert_eq!(blocks.len(), 3);
        assert_eq!(blocks[&f], (0, None, 3, Some(7)));
        assert_eq!(
            blocks[&hex::encode(&a.revocation_id)],
            (1, Some(f.clone()), 2, Some(2))
        );
        assert_eq!(
            blocks[&hex::encode(&b.revocation_id)],
            (1, Some(f.clone()), 1, None)
        );
        assert!(detail.blocks[0].record.index == 0, "authority block first");
        assert!(ledger
            .family(&random_revocation_id(), NOW)
            .await
            .unwrap()
            .is_none());

        // Recorded at mint, before any use; recording again changes nothing.
        let minted = level(Some(5));
        let key = KeyBlocks {
            blocks: vec![(
                minted.revocation_id.clone(),
                block_meta(std::slice::from_ref(&minted))[0].clone(),
            )],
        };
        ledger.record_key(key.clone(), NOW - 5).await.unwrap();
        ledger.record_key(key, NOW).await.unwrap();
        let m = ledger
            .family(&minted.revocation_id, NOW)
            .await
            .unwrap()
            .expect("minted family listed before use");
        assert!(m.family.minted);
        assert_eq!(
            (m.family.used, m.family.cap, m.family.recorded_at),
            (0, Some(5), NOW - 5)
        );
        assert_eq!(m.family.last_activation, None);
        // Recording a known block through the admin API marks it minted, keeps the rest.
        ledger
            .record_key(
                KeyBlocks {
                    blocks: vec![(root.revocation_id.clone(), BlockMeta::default())],
                },
                NOW + 100,
            )
            .await
            .unwrap();
        let again = ledger
            .family(&root.revocation_id, NOW)
            .await
            .unwrap()
            .unwrap();
        assert!(again.family.minted);
        assert_eq!(again.family.label.as_deref(), Some(LABEL));
        assert_eq!(again.family.recorded_at, view.recorded_at);
        assert!(ledger
            .record_key(KeyBlocks { blocks: vec![] }, NOW)
            .await
            .is_err());
    })
    .await;
}

/// Cap 10, 50 concurrent claims: exactly one 80 % and one 100 % alert for the block,
/// each reported by exactly one claim, stored once, pending delivery; a sub-block with
/// its own cap alerts on its own count.
pub async fn threshold_alerts_exactly_once(h: Harness) {
    bounded("threshold_alerts_exactly_once", async {
        let root = level(Some(10));
        let child = level(Some(5));
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let ledger = Arc::clone(&h.ledger);
                let levels = if i % 2 == 0 {
                    vec![root.clone()]
                } else {
                    vec![root.clone(), child.clone()]
                };
                let req = claim_request(&levels, None, &format!("alert{i}"));
                tokio::spawn(async move { ledger.claim(req).await })
            })
            .collect();
        let mut reported = Vec::new();
        let mut ok = 0;
        for task in tasks {
            if let Ok(Ok(c)) = task.await.unwrap() {
                ok += 1;
                reported.extend(c.alerts.into_iter().map(|a| a.id));
            }
        }
        assert_eq!(ok, 10);
        let r = hex::encode(&root.revocation_id);
        let c = hex::encode(&child.revocation_id);
        reported.sort();
        let used_child = used(h.ledger.as_ref(), &[root.clone(), child.clone()]).await[1];
        let mut expected = vec![format!("threshold:{r}:100"), format!("threshold:{r}:80")];
        if used_child >= 4 {
            expected.push(format!("threshold:{c}:80"));
        }
        if used_child >= 5 {
            expected.push(format!("threshold:{c}:100"));
        }
        expected.sort();
        assert_eq!(
            reported, expected,
            "each threshold reported by exactly one claim"
        );
        let stored: Vec<_> = h
            .ledger
            .alerts(1000)
            .await
            .unwrap()
            .into_iter()
            .filter(|a| a.family.as_deref() == Some(r.as_str()))
            .collect();
        let mut stored_ids: Vec<_> = stored.iter().map(|a| a.id.clone()).collect();
        stored_ids.sort();
        assert_eq!(stored_ids, expected);
        for a in &stored {
            assert_eq!(a.kind, AlertKind::Threshold);
            assert_eq!(a.delivery.status, DeliveryStatus::Pending);
            assert_eq!(a.label.as_deref(), Some(LABEL));
            let pct = u64::from(a.threshold.unwrap());
            assert_eq!(
                a.used,
                Some(crate::alert::trigger(a.cap.unwrap(), pct as u8))
            );
        }
        // Refused claims past the cap fire nothing more.
        assert!(claim(
            h.ledger.as_ref(),
            claim_request(std::slice::from_ref(&root), None, "more")
        )
        .await
        .is_err());
        assert_eq!(
            h.ledger
                .alerts(1000)
                .await
                .unwrap()
                .iter()
                .filter(|a| a.family.as_deref() == Some(r.as_str()))
                .count(),
            expected.len()
        );
    })
    .await;
}

/// The outbox: a due alert is leased once (a second deliverer gets nothing while the
/// lease runs), a failed attempt comes back at its retry time, a delivered one never.
pub async fn alert_outbox_lease_and_settle(h: Harness) {
    bounded("alert_outbox_lease_and_settle", async {
        let ledger = h.ledger.as_ref();
        let root = level(Some(1));
        let c = claim_ok(
            ledger,
            claim_request(std::slice::from_ref(&root), None, "one"),
        )
        .await;
        let ids: Vec<String> = c.alerts.iter().map(|a| a.id.clone()).collect();
        assert_eq!(
            ids.len(),
            2,
            "cap 1: 80 % and 100 % both at the first claim"
        );
        let mine = |v: Vec<crate::AlertRecord>| -> Vec<crate::AlertRecord> {
            v.into_iter().filter(|a| ids.contains(&a.id)).collect()
        };
        let first = mine(ledger.lease_alerts(NOW, 30, 1000).await.unwrap());
        assert_eq!(first.len(), 2);
        assert!(first.iter().all(|a| a.delivery.attempts == 1));
        assert!(mine(ledger.lease_alerts(NOW + 29, 30, 1000).await.unwrap()).is_empty());
        ledger
            .settle_alert(&ids[0], AlertOutcome::Delivered { at: NOW + 1 })
            .await
            .unwrap();
        ledger
            .settle_alert(
                &ids[1],
                AlertOutcome::Failed {
                    error: "receiver said 503".into(),
                    retry_at: NOW + 60,
                },
            )
            .await
            .unwrap();
        assert!(mine(ledger.lease_alerts(NOW + 59, 30, 1000).await.unwrap()).is_empty());
        let again = mine(ledger.lease_alerts(NOW + 60, 30, 1000).await.unwrap());
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].id, ids[1]);
        assert_eq!(again[0].delivery.attempts, 2);
        assert_eq!(
            again[0].delivery.last_error.as_deref(),
            Some("receiver said 503")
        );
        let all = mine(ledger.alerts(1000).await.unwrap());
        let delivered = all.iter().find(|a| a.id == ids[0]).unwrap();
        assert_eq!(delivered.delivery.status, DeliveryStatus::Delivered);
        assert_eq!(delivered.delivery.delivered_at, Some(NOW + 1));
        assert!(ledger
            .settle_alert("threshold:nope:80", AlertOutcome::NotConfigured)
            .await
            .is_err());
    })
    .await;
}

/// Revoking fires one revocation alert naming the block's family; revoking again fires
/// nothing and reports `newly: false`.
pub async fn revocation_alert_once(h: Harness) {
    bounded("revocation_alert_once", async {
        let ledger = h.ledger.as_ref();
        let root = level(Some(10));
        let child = level(Some(5));
        claim_ok(
            ledger,
            claim_request(&[root.clone(), child.clone()], None, "x"),
        )
        .await;
        let first = ledger.revoke(&child.revocation_id).await.unwrap();
        assert!(first.newly);
        assert_eq!(first.family, Some(hex::encode(&root.revocation_id)));
        let alert = first.alert.expect("revocation alert");
        assert_eq!(alert.kind, AlertKind::Revocation);
        assert_eq!(alert.block, Some(1));
        assert_eq!(alert.label.as_deref(), Some(LABEL));
        let second = ledger.revoke(&child.revocation_id).await.unwrap();
        assert!(!second.newly && second.alert.is_none());
        let id = format!("revocation:{}", hex::encode(&child.revocation_id));
        assert_eq!(
            ledger
                .alerts(1000)
                .await
                .unwrap()
                .iter()
                .filter(|a| a.id == id)
                .count(),
            1
        );
        let detail = ledger
            .family(&root.revocation_id, NOW)
            .await
            .unwrap()
            .unwrap();
        let b = detail.blocks.iter().find(|b| b.record.index == 1).unwrap();
        assert!(b.revoked && b.revoked_at.is_some());
        assert!(!detail.family.revoked);
        // An unknown block can be revoked too (keys are verified offline); no family.
        let stranger = ledger.revoke(&random_revocation_id()).await.unwrap();
        assert!(stranger.newly && stranger.family.is_none());
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Windowed caps (issue 13)

fn windowed(levels: &[Level], windows: &[WindowCap], tag: &str, now: u64) -> ClaimRequest {
    ClaimRequest {
        windows: windows.to_vec(),
        now,
        ..claim_request(levels, None, tag)
    }
}

/// Windowed caps are exact under concurrency, per block: 24 concurrent claims through a
/// child whose block allows 3 per minute (its parent 5 per minute) take exactly 3 slots;
/// the rest are `RateLimited` naming block 1 with `retry_after` = seconds to the end of the
/// window, and the lifetime counters count only the 3. The parent's own window is shared
/// by everything below it: 2 more through the parent alone, then block 0 refuses. The next
/// window starts afresh, and the lifetime cap still applies across windows.
pub async fn windowed_caps_exact_under_concurrency(h: Harness) {
    bounded("windowed_caps_exact_under_concurrency", async {
        let ledger = h.ledger.clone();
        let root = level(Some(9));
        let levels = vec![root.clone(), level(None)];
        let windows = [
            WindowCap {
                level: 0,
                secs: 60,
                max: 5,
            },
            WindowCap {
                level: 1,
                secs: 60,
                max: 3,
            },
            WindowCap {
                level: 1,
                secs: 86_400,
                max: 100,
            },
        ];
        let start = NOW - NOW % 60;
        let mut tasks = Vec::new();
        for i in 0..24 {
            let ledger = ledger.clone();
            let req = windowed(&levels, &windows, &format!("w{i}"), NOW);
            tasks.push(tokio::spawn(
                async move { claim(ledger.as_ref(), req).await },
            ));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(r) => assert_eq!(
                    r,
                    Refusal::RateLimited {
                        block: 1,
                        max: 3,
                        secs: 60,
                        retry_after: start + 60 - NOW
                    }
                ),
            }
        }
        assert_eq!(ok, 3, "exactly the window's 3 claims");
        assert_eq!(used(ledger.as_ref(), &levels).await, vec![3, 3]);
        // The parent's window (5 per minute) already holds the child's 3.
        let parent_only = &levels[..1];
        for i in 0..2 {
            claim_ok(
                ledger.as_ref(),
                windowed(parent_only, &windows[..1], &format!("p{i}"), NOW + 1),
            )
            .await;
        }
        assert_eq!(
            claim_refused(
                ledger.as_ref(),
                windowed(parent_only, &windows[..1], "p2", NOW + 2)
            )
            .await,
            Refusal::RateLimited {
                block: 0,
                max: 5,
                secs: 60,
                retry_after: start + 60 - NOW - 2
            }
        );
        // The child is now refused by its parent's window too (block 0 comes first).
        assert_eq!(
            claim_refused(ledger.as_ref(), windowed(&levels, &windows, "c", NOW + 3)).await,
            Refusal::RateLimited {
                block: 0,
                max: 5,
                secs: 60,
                retry_after: start + 60 - NOW - 3
            }
        );
        assert_eq!(used(ledger.as_ref(), &levels).await, vec![5, 3]);
        // The next minute: a fresh window, the day window keeps counting, the lifetime
        // cap (9) bounds everything.
        let next = start + 60;
        for i in 0..3 {
            claim_ok(
                ledger.as_ref(),
                windowed(&levels, &windows, &format!("n{i}"), next + i),
            )
            .await;
        }
        assert_eq!(
            claim_refused(ledger.as_ref(), windowed(&levels, &windows, "n3", next + 3)).await,
            Refusal::RateLimited {
                block: 1,
                max: 3,
                secs: 60,
                retry_after: 57
            }
        );
        let later = next + 60;
        claim_ok(ledger.as_ref(), windowed(&levels, &windows, "l0", later)).await;
        assert_eq!(
            claim_refused(ledger.as_ref(), windowed(&levels, &windows, "l1", later)).await,
            Refusal::CapReached { block: 0, cap: 9 }
        );
        assert_eq!(used(ledger.as_ref(), &levels).await, vec![9, 7]);
        audited_chain(&h, &root.revocation_id, 9).await;
    })
    .await;
}

/// A rate-limited claim writes nothing: no counter, no receipt, no idempotency record (the
/// same key later makes a fresh claim, not a replay or a conflict); a lifetime cap refusal
/// wins over a full window; a window counter written with a later start (a proxy whose
/// clock runs ahead) is never reset by an earlier clock; and malformed windows are invalid
/// requests.
pub async fn windowed_refusal_writes_nothing(h: Harness) {
    bounded("windowed_refusal_writes_nothing", async {
        let ledger = h.ledger.as_ref();
        let root = level(Some(2));
        let levels = vec![root.clone()];
        let per_hour = [WindowCap {
            level: 0,
            secs: 3600,
            max: 1,
        }];
        claim_ok(ledger, windowed(&levels, &per_hour, "a", NOW)).await;
        let mut again = windowed(&levels, &per_hour, "b", NOW);
        again.idempotency_key = Some("kb".into());
        assert!(matches!(
            claim_refused(ledger, again.clone()).await,
            Refusal::RateLimited { block: 0, .. }
        ));
        assert_eq!(used(ledger, &levels).await, vec![1]);
        assert_eq!(all_receipts(ledger, &root.revocation_id).await.len(), 1);
        // An earlier clock (another proxy, behind) sees the same, later-started window.
        let behind = NOW - 3600;
        let mut early = windowed(&levels, &per_hour, "c", behind);
        early.idempotency_key = Some("kc".into());
        assert!(matches!(
            claim_refused(ledger, early).await,
            Refusal::RateLimited { block: 0, .. }
        ));
        // Next hour: the same idempotency key makes a fresh claim (nothing was stored).
        again.now = NOW + 3600;
        let fresh = claim_ok(ledger, again.clone()).await;
        assert!(!fresh.replayed);
        assert_eq!(fresh.receipt.body().seq, 2);
        // Cap reached and window full: the permanent refusal wins.
        let mut over = windowed(&levels, &per_hour, "d", NOW + 3600);
        over.idempotency_key = Some("kd".into());
        assert_eq!(
            claim_refused(ledger, over).await,
            Refusal::CapReached { block: 0, cap: 2 }
        );
        // Malformed windows: a level out of range, a zero length, a repeated window.
        for bad in [
            vec![WindowCap {
                level: 1,
                secs: 60,
                max: 1,
            }],
            vec![WindowCap {
                level: 0,
                secs: 0,
                max: 1,
            }],
            vec![
                WindowCap {
                    level: 0,
                    secs: 60,
                    max: 1,
                },
                WindowCap {
                    level: 0,
                    secs: 60,
                    max: 2,
                },
            ],
        ] {
            let fresh_levels = vec![level(Some(5))];
            let req = windowed(&fresh_levels, &bad, "bad", NOW);
            assert!(matches!(
                ledger.claim(req).await,
                Err(LedgerError::InvalidRequest(_))
            ));
        }
        audited_chain(&h, &root.revocation_id, 2).await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------
// Voids (spec/ledger.md §3.5)

fn void_request(family: &[u8], seq: u64) -> VoidRequest {
    VoidRequest {
        family: family.to_vec(),
        seq,
        now: NOW + 1,
        windows: Vec::new(),
    }
}

async fn void_ok(ledger: &dyn Ledger, req: VoidRequest) -> Voided {
    match ledger.void(req).await {
        Ok(v) => v,
        Err(e) => panic!("expected a void, got {e}"),
    }
}

/// The audit report of a family's stored chain (`expected` receipts, claims and voids).
async fn audited_counts(h: &Harness, family: &[u8], expected: u64) -> (u64, u64, u64) {
    let receipts = audited_chain(h, family, expected).await;
    let report = audit_chain(&receipts, &h.keys).unwrap();
    (report.claims, report.voids, report.charged)
}

/// A void gives exactly one slot back at every level of the claim: usage goes down by
/// one, `remaining` up by one, the void receipt (`void: Some(seq)`, next `seq`, `prev`
/// linked, same slots and request) is signed and stored, the next claim takes the freed
/// slot, and the cap then refuses as before. A void fires no alert.
pub async fn void_restores_exactly_one_slot(h: Harness) {
    bounded("void_restores_exactly_one_slot", async {
        let ledger = h.ledger.as_ref();
        let root = level(Some(3));
        let child = level(Some(1));
        let levels = vec![root.clone(), child.clone()];
        let family = root.revocation_id.as_slice();
        let first = claim_ok(ledger, claim_request(&levels, Some("v-1"), "void")).await;
        assert_eq!(first.remaining, Some(0));
        assert_eq!(used(ledger, &levels).await, vec![1, 1]);
        let alerts_before = ledger.alerts(100).await.unwrap().len();

        let voided = void_ok(ledger, void_request(family, 1)).await;
        assert!(voided.newly);
        assert_eq!(
            voided.remaining,
            Some(1),
            "the child's one slot is free again"
        );
        voided.receipt.verify(&h.keys).unwrap();
        let b = voided.receipt.body();
        assert_eq!(b.void, Some(1));
        assert_eq!(b.seq, 2);
        assert_eq!(b.prev, Some(first.receipt.hash_hex()));
        assert_eq!(b.slots, first.receipt.body().slots);
        assert_eq!(b.request, first.receipt.body().request);
        assert_eq!(b.idempotency_key, "v-1");
        assert_eq!(b.iat, NOW + 1);
        assert_eq!(
            used(ledger, &levels).await,
            vec![0, 0],
            "one slot back per level"
        );
        assert_eq!(
            ledger.alerts(100).await.unwrap().len(),
            alerts_before,
            "a void fires no alert"
        );
        // The stored receipt is the one the caller got (signed after the commit).
        let stored = all_receipts(ledger, family).await;
        assert_eq!(stored[1].compact(), voided.receipt.compact());

        let again = claim_ok(ledger, claim_request(&levels, Some("v-2"), "void")).await;
        let slots: Vec<u64> = again.receipt.body().slots.iter().map(|s| s.slot).collect();
        assert_eq!(slots, vec![1, 1], "the freed slots are taken again");
        assert_eq!(again.receipt.body().seq, 3);
        assert_eq!(again.receipt.body().prev, Some(voided.receipt.hash_hex()));
        // Crossing a threshold again after a void fires nothing new: alerts stay exactly
        // once per block and threshold.
        assert!(alerts_before > 0, "the first claim used the child's cap up");
        assert!(again.alerts.is_empty(), "{:?}", again.alerts);
        assert_eq!(ledger.alerts(100).await.unwrap().len(), alerts_before);
        assert_eq!(
            claim_refused(ledger, claim_request(&levels, Some("v-3"), "void")).await,
            Refusal::CapReached { block: 1, cap: 1 },
            "the cap is exact after a void"
        );
        assert_eq!(used(ledger, &levels).await, vec![1, 1]);
        assert_eq!(audited_counts(&h, family, 3).await, (2, 1, 1));
    })
    .await;
}

/// Voiding a voided claim changes nothing and answers with the same void receipt; a
/// revoked or expired key's claim can still be voided.
pub async fn double_void_is_a_no_op(h: Harness) {
    bounded("double_void_is_a_no_op", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(Some(5))];
        let family = levels[0].revocation_id.as_slice();
        claim_ok(ledger, claim_request(&levels, Some("d-1"), "dv")).await;
        claim_ok(ledger, claim_request(&levels, Some("d-2"), "dv")).await;
        let first = void_ok(ledger, void_request(family, 1)).await;
        assert!(first.newly);
        assert_eq!(used(ledger, &levels).await, vec![1]);
        for _ in 0..3 {
            let again = void_ok(ledger, void_request(family, 1)).await;
            assert!(!again.newly, "a second void is a no-op");
            assert_eq!(again.receipt.compact(), first.receipt.compact());
            assert_eq!(again.remaining, Some(4));
            assert_eq!(
                used(ledger, &levels).await,
                vec![1],
                "never decremented twice"
            );
        }
        // Concurrent voids of one claim: one writes, the others find it.
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let ledger = Arc::clone(&h.ledger);
                let req = void_request(family, 2);
                tokio::spawn(async move { ledger.void(req).await })
            })
            .collect();
        let mut newly = 0;
        let mut compacts = BTreeSet::new();
        for task in tasks {
            let v = task.await.unwrap().unwrap();
            newly += usize::from(v.newly);
            compacts.insert(v.receipt.compact().to_owned());
        }
        assert_eq!(newly, 1, "exactly one of concurrent voids writes");
        assert_eq!(
            compacts.len(),
            1,
            "they all answer with the same void receipt"
        );
        assert_eq!(used(ledger, &levels).await, vec![0]);
        assert_eq!(audited_counts(&h, family, 4).await, (2, 2, 0));

        // Revoked and expired keys: the slot can still be given back.
        let revoked = vec![level(Some(2))];
        let fam = revoked[0].revocation_id.as_slice();
        claim_ok(ledger, claim_request(&revoked, None, "rv")).await;
        ledger.revoke(fam).await.unwrap();
        let v = void_ok(ledger, void_request(fam, 1)).await;
        assert!(v.newly);
        assert_eq!(used(ledger, &revoked).await, vec![0]);
        let mut expiring = claim_request(&[level(Some(2))], None, "ex");
        expiring.not_after = Some(NOW);
        let fam = expiring.levels[0].revocation_id.clone();
        claim_ok(ledger, expiring.clone()).await;
        let mut late = void_request(&fam, 1);
        late.now = NOW + 3600;
        assert!(void_ok(ledger, late).await.newly);
        assert_eq!(used(ledger, &expiring.levels).await, vec![0]);
    })
    .await;
}

/// A void names a claim the ledger holds: an unknown seq or family, a void receipt, or a
/// claim whose idempotency key was replayed (a replay may have been forwarded under the
/// slot) is refused with `NotVoidable` and writes nothing; a malformed request is
/// `InvalidRequest`.
pub async fn void_of_unknown_seq_refused(h: Harness) {
    bounded("void_of_unknown_seq_refused", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(Some(5))];
        let family = levels[0].revocation_id.as_slice();
        claim_ok(ledger, claim_request(&levels, Some("u-1"), "uv")).await;
        for seq in [2, 99] {
            assert!(
                matches!(
                    ledger.void(void_request(family, seq)).await,
                    Err(LedgerError::NotVoidable(_))
                ),
                "void of unknown seq {seq}"
            );
        }
        assert!(matches!(
            ledger.void(void_request(&random_revocation_id(), 1)).await,
            Err(LedgerError::NotVoidable(_))
        ));
        assert!(matches!(
            ledger.void(void_request(family, 0)).await,
            Err(LedgerError::InvalidRequest(_))
        ));
        assert!(matches!(
            ledger.void(void_request(&[], 1)).await,
            Err(LedgerError::InvalidRequest(_))
        ));
        // A void receipt cannot itself be voided.
        void_ok(ledger, void_request(family, 1)).await;
        assert!(matches!(
            ledger.void(void_request(family, 2)).await,
            Err(LedgerError::NotVoidable(_))
        ));
        // A replayed claim stays charged.
        let replayed = claim_ok(ledger, claim_request(&levels, Some("u-2"), "uv")).await;
        let again = claim_ok(ledger, claim_request(&levels, Some("u-2"), "uv")).await;
        assert!(again.replayed);
        let seq = replayed.receipt.body().seq;
        assert!(matches!(
            ledger.void(void_request(family, seq)).await,
            Err(LedgerError::NotVoidable(_))
        ));
        assert_eq!(
            used(ledger, &levels).await,
            vec![1],
            "refused voids wrote nothing"
        );
        assert_eq!(audited_counts(&h, family, 3).await, (2, 1, 1));
    })
    .await;
}

/// After a void, a retry with the same `Idempotency-Key` (and request) is a fresh claim,
/// charged, with its own receipt; that claim is then replayed as usual.
pub async fn retry_after_void_claims_afresh(h: Harness) {
    bounded("retry_after_void_claims_afresh", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(Some(1))];
        let family = levels[0].revocation_id.as_slice();
        let first = claim_ok(ledger, claim_request(&levels, Some("sdk-retry"), "rt")).await;
        void_ok(ledger, void_request(family, 1)).await;
        let retry = claim_ok(ledger, claim_request(&levels, Some("sdk-retry"), "rt")).await;
        assert!(!retry.replayed, "the voided claim is not replayed");
        assert_ne!(retry.receipt.compact(), first.receipt.compact());
        assert_eq!(retry.receipt.body().seq, 3);
        assert_eq!(retry.receipt.body().idempotency_key, "sdk-retry");
        assert_eq!(retry.remaining, Some(0));
        let replay = claim_ok(ledger, claim_request(&levels, Some("sdk-retry"), "rt")).await;
        assert!(replay.replayed);
        assert_eq!(replay.receipt.compact(), retry.receipt.compact());
        assert_eq!(used(ledger, &levels).await, vec![1]);
        assert_eq!(audited_counts(&h, family, 3).await, (2, 1, 1));
    })
    .await;
}

/// Concurrent claims and voids on a hot token with a small cap: every claim that
/// succeeded found a free slot (the audit replays the counters and checks `slot <= cap`
/// at every commit, in chain order), usage equals claims minus voids, and the chain stays
/// gapless and audits with the voids counted.
pub async fn caps_exact_under_concurrent_claims_and_voids(h: Harness) {
    bounded("caps_exact_under_concurrent_claims_and_voids", async {
        let root = level(Some(6));
        let child = level(Some(3));
        let family = root.revocation_id.clone();
        let tasks: Vec<_> = (0..120)
            .map(|i| {
                let ledger = Arc::clone(&h.ledger);
                let levels = if i % 3 == 0 {
                    vec![root.clone()]
                } else {
                    vec![root.clone(), child.clone()]
                };
                let req = claim_request(&levels, None, &format!("cv{i}"));
                let family = family.clone();
                tokio::spawn(async move {
                    match ledger.claim(req).await {
                        Ok(Ok(c)) => {
                            // Every other successful claim "finds the upstream down".
                            if i % 2 == 0 {
                                let seq = c.receipt.body().seq;
                                let v = ledger.void(void_request(&family, seq)).await.unwrap();
                                assert!(v.newly);
                                assert_eq!(v.receipt.body().void, Some(seq));
                                (1u64, 1u64)
                            } else {
                                (1, 0)
                            }
                        }
                        Ok(Err(Refusal::CapReached { .. })) => (0, 0),
                        other => panic!("unexpected answer {other:?}"),
                    }
                })
            })
            .collect();
        let (mut claims, mut voids) = (0, 0);
        for task in tasks {
            let (c, v) = task.await.unwrap();
            claims += c;
            voids += v;
        }
        assert!(voids > 0, "some claims were voided");
        let usage = used(h.ledger.as_ref(), &[root.clone(), child.clone()]).await;
        assert_eq!(usage[0], claims - voids);
        assert!(usage[0] <= 6 && usage[1] <= 3, "caps hold: {usage:?}");
        let (c, v, charged) = audited_counts(&h, &family, claims + voids).await;
        assert_eq!((c, v, charged), (claims, voids, usage[0]));
    })
    .await;
}

/// A void lowers the windowed counters the claim advanced while still in the claim's
/// window, so the retry fits a window of 1; once the window is over the counter is left
/// alone.
pub async fn void_restores_window_slot(h: Harness) {
    bounded("void_restores_window_slot", async {
        let ledger = h.ledger.as_ref();
        let levels = vec![level(Some(10))];
        let family = levels[0].revocation_id.as_slice();
        let per_hour = [WindowCap {
            level: 0,
            secs: 3600,
            max: 1,
        }];
        let now = NOW - NOW % 3600 + 10;
        let first = claim_ok(ledger, windowed(&levels, &per_hour, "w1", now)).await;
        let mut void = void_request(family, first.receipt.body().seq);
        void.windows = per_hour.to_vec();
        void.now = now + 1;
        void_ok(ledger, void).await;
        let retry = claim_ok(ledger, windowed(&levels, &per_hour, "w2", now + 2)).await;
        assert!(matches!(
            claim_refused(ledger, windowed(&levels, &per_hour, "w3", now + 3)).await,
            Refusal::RateLimited { block: 0, .. }
        ));
        // Next window: the void of `retry` leaves the new window's counter alone.
        let later = now + 3600;
        let next = claim_ok(ledger, windowed(&levels, &per_hour, "w4", later)).await;
        let mut void = void_request(family, retry.receipt.body().seq);
        void.windows = per_hour.to_vec();
        void.now = later + 1;
        void_ok(ledger, void).await;
        assert!(matches!(
            claim_refused(ledger, windowed(&levels, &per_hour, "w5", later + 2)).await,
            Refusal::RateLimited { block: 0, .. }
        ));
        assert_eq!(used(ledger, &levels).await, vec![1]);
        let _ = next;
        assert_eq!(audited_counts(&h, family, 5).await, (3, 2, 1));
    })
    .await;
}

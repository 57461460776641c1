//! The conformance suite and the fault cases against a real FoundationDB cluster.
//!
//! Gated: runs only when `TILL_FDB_CLUSTER_FILE` names a cluster file (e.g. the one
//! `fdb/local.sh start` prints); otherwise every test prints
//! `SKIPPED: set TILL_FDB_CLUSTER_FILE ...` and returns. Each run uses a fresh key space
//! (`till-test-<random>`), so runs never see each other's data; the key spaces are left on
//! the cluster (a throwaway test cluster).
//!
//! One `#[test]` boots the client (once per process, as FoundationDB requires) and runs
//! every case in order on a multi-thread runtime.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use till_ledger::conformance::{self, Harness};
use till_ledger::{ClaimRequest, Ledger, Level, Refusal};
use till_ledger_fdb::{FdbConfig, FdbLedger};
use till_receipt::{audit_chain, ReceiptKeySet, ReceiptSigner};

const ENV_CLUSTER_FILE: &str = "TILL_FDB_CLUSTER_FILE";

fn cluster_file() -> Option<PathBuf> {
    match std::env::var_os(ENV_CLUSTER_FILE).filter(|v| !v.is_empty()) {
        Some(p) => Some(PathBuf::from(p)),
        None => {
            println!(
                "SKIPPED: set {ENV_CLUSTER_FILE} to a cluster file (fdb/local.sh start prints \
                 one) to run the FoundationDB conformance suite"
            );
            None
        }
    }
}

fn config(
    cluster: &PathBuf,
    keyspace: &str,
    signer: &Arc<ReceiptSigner>,
    proxy: &str,
) -> FdbConfig {
    let mut c = FdbConfig::new(Arc::clone(signer), proxy)
        .with_cluster_file(cluster)
        .with_keyspace(keyspace);
    c.transaction_timeout = Duration::from_secs(10);
    c.retry_limit = 1_000;
    c
}

async fn harness(cluster: &PathBuf, proxies: usize) -> Harness {
    let signer = Arc::new(ReceiptSigner::generate());
    let mut keys = ReceiptKeySet::new();
    keys.insert(signer.public_key());
    let keyspace = format!("till-test-{:016x}", rand::random::<u64>());
    let ledger: Arc<dyn Ledger> = if proxies == 1 {
        Arc::new(
            FdbLedger::open(config(cluster, &keyspace, &signer, "p0"))
                .await
                .unwrap(),
        )
    } else {
        let mut all = Vec::new();
        for i in 0..proxies {
            all.push(
                FdbLedger::open(config(cluster, &keyspace, &signer, &format!("p{i}")))
                    .await
                    .unwrap(),
            );
        }
        Arc::new(RoundRobin {
            proxies: all,
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    };
    Harness { ledger, keys }
}

/// One proxy on a fresh key space, as a ledger and as a retention store.
async fn retention_harness(cluster: &PathBuf) -> conformance::retention::RetentionHarness {
    let signer = Arc::new(ReceiptSigner::generate());
    let mut keys = ReceiptKeySet::new();
    keys.insert(signer.public_key());
    let keyspace = format!("till-test-{:016x}", rand::random::<u64>());
    let ledger = Arc::new(
        FdbLedger::open(config(cluster, &keyspace, &signer, "p0"))
            .await
            .unwrap(),
    );
    conformance::retention::RetentionHarness {
        ledger: Arc::clone(&ledger) as Arc<dyn Ledger>,
        store: ledger,
        keys,
    }
}

/// Several `FdbLedger`s (proxies) on one key space; claims round-robin across them.
#[derive(Debug)]
struct RoundRobin {
    proxies: Vec<FdbLedger>,
    next: std::sync::atomic::AtomicUsize,
}

impl RoundRobin {
    fn pick(&self) -> &FdbLedger {
        let i = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        &self.proxies[i % self.proxies.len()]
    }
}

impl Ledger for RoundRobin {
    fn claim(
        &self,
        req: ClaimRequest,
    ) -> till_ledger::BoxFuture<
        '_,
        Result<Result<till_ledger::Claim, Refusal>, till_ledger::LedgerError>,
    > {
        self.pick().claim(req)
    }
    fn revoke(
        &self,
        id: &[u8],
    ) -> till_ledger::BoxFuture<'_, Result<till_ledger::Revoked, till_ledger::LedgerError>> {
        self.pick().revoke(id)
    }
    fn void(
        &self,
        req: till_ledger::VoidRequest,
    ) -> till_ledger::BoxFuture<'_, Result<till_ledger::Voided, till_ledger::LedgerError>> {
        self.pick().void(req)
    }
    fn usage(
        &self,
        levels: &[Level],
    ) -> till_ledger::BoxFuture<'_, Result<Vec<till_ledger::LevelUsage>, till_ledger::LedgerError>>
    {
        self.pick().usage(levels)
    }
    fn receipts(
        &self,
        family: &[u8],
        from: u64,
        limit: usize,
    ) -> till_ledger::BoxFuture<'_, Result<Vec<till_ledger::Receipt>, till_ledger::LedgerError>>
    {
        self.pick().receipts(family, from, limit)
    }
    fn record_key(
        &self,
        key: till_ledger::KeyBlocks,
        at: u64,
    ) -> till_ledger::BoxFuture<'_, Result<(), till_ledger::LedgerError>> {
        self.pick().record_key(key, at)
    }
    fn families(
        &self,
        now: u64,
    ) -> till_ledger::BoxFuture<'_, Result<Vec<till_ledger::FamilyView>, till_ledger::LedgerError>>
    {
        self.pick().families(now)
    }
    fn family(
        &self,
        family: &[u8],
        now: u64,
    ) -> till_ledger::BoxFuture<
        '_,
        Result<Option<till_ledger::FamilyDetail>, till_ledger::LedgerError>,
    > {
        self.pick().family(family, now)
    }
    fn alerts(
        &self,
        limit: usize,
    ) -> till_ledger::BoxFuture<'_, Result<Vec<till_ledger::AlertRecord>, till_ledger::LedgerError>>
    {
        self.pick().alerts(limit)
    }
    fn lease_alerts(
        &self,
        now: u64,
        lease_secs: u64,
        limit: usize,
    ) -> till_ledger::BoxFuture<'_, Result<Vec<till_ledger::AlertRecord>, till_ledger::LedgerError>>
    {
        self.pick().lease_alerts(now, lease_secs, limit)
    }
    fn settle_alert(
        &self,
        id: &str,
        outcome: till_ledger::AlertOutcome,
    ) -> till_ledger::BoxFuture<'_, Result<(), till_ledger::LedgerError>> {
        self.pick().settle_alert(id, outcome)
    }
}

#[test]
fn fdb_cluster() {
    let Some(cluster) = cluster_file() else {
        return;
    };
    let _network = till_ledger_fdb::boot().expect("boot the FoundationDB client");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        println!("conformance suite, one proxy");
        conformance::run_all(|| harness(&cluster, 1)).await;
        println!("conformance suite, three proxies on one key space");
        conformance::run_all(|| harness(&cluster, 3)).await;
        println!("retention cases (export, prune, checkpoints), one proxy");
        conformance::retention::run_all(|| retention_harness(&cluster)).await;
        println!("revocation through one proxy, seen by the others");
        revocation_seen_by_every_proxy(&cluster).await;
        println!("several proxies hammering one hot token");
        fleet_hot_token(&cluster).await;
        println!("each receipt stored once; idempotency records expire after the window");
        receipts_once_and_idempotency_window(&cluster).await;
        println!("export: one exporter holds the lease; the journal is swept with the prune");
        export_lease_and_journal_sweep(&cluster).await;
        println!("ledger id: one per key space, in every receipt, bound to the receipt key");
        ledger_id_per_key_space(&cluster).await;
        println!("unreachable cluster answers unavailable quickly");
        unreachable_cluster_is_unavailable().await;
    });
    // The runtime (and every ledger) must go before the network guard stops the client.
    drop(runtime);
}

/// Two proxies of a fleet on a real cluster (spec/ledger.md §10, spec/ledger-fdb.md §1):
/// the first takes the export lease and the second is refused, naming it; the first's
/// export prunes and sweeps one journal entry per pruned receipt, after which the journal
/// points at exactly the stored receipts; once the lease is given back the second exports
/// (nothing left to prune).
async fn export_lease_and_journal_sweep(cluster: &PathBuf) {
    use till_ledger::retention::{export_and_prune, ExportLease, Retention};
    use till_ledger::{LedgerError, RetentionStore};
    use till_ledger_fdb::{KvStore, KvTxn, TxnOptions};
    let signer = Arc::new(ReceiptSigner::generate());
    let keyspace = format!("till-test-{:016x}", rand::random::<u64>());
    let p1 = FdbLedger::open(config(cluster, &keyspace, &signer, "p1"))
        .await
        .unwrap();
    let p2 = FdbLedger::open(config(cluster, &keyspace, &signer, "p2"))
        .await
        .unwrap();
    let families: Vec<Vec<Level>> = (0..3).map(|_| vec![level(None)]).collect();
    for _ in 0..5 {
        for levels in &families {
            let proxy = if rand::random::<bool>() { &p1 } else { &p2 };
            proxy
                .claim(conformance::claim_request(levels, None, "chat"))
                .await
                .unwrap()
                .unwrap();
        }
    }
    let now = conformance::NOW;
    let lease = |holder: &str| ExportLease {
        holder: holder.into(),
        dir: format!("/exports/{holder}"),
        until: now + 600,
    };
    p1.lease_export(&lease("p1"), now).await.unwrap();
    match p2.lease_export(&lease("p2"), now).await {
        Err(LedgerError::ExportLeased { holder, until, .. }) => {
            assert_eq!((holder.as_str(), until), ("p1", now + 600));
        }
        other => panic!("p2 must be refused while p1 holds the lease: {other:?}"),
    }
    let dir = tempfile::tempdir().unwrap();
    let keep = Retention {
        keep: Some(2),
        max_age_secs: None,
    };
    let report = export_and_prune(&p1, keep, dir.path(), now).await.unwrap();
    assert_eq!((report.pruned, report.swept), (9, 9), "{report:?}");
    let mut stored = std::collections::BTreeSet::new();
    for levels in &families {
        let family = &levels[0].revocation_id;
        for r in p1.receipts(family, 1, 100).await.unwrap() {
            stored.insert((family.clone(), r.body().seq));
        }
    }
    assert_eq!(stored.len(), 6);
    let (begin, end) = p1.engine().keyspace().journal_range();
    let opts = TxnOptions {
        timeout: Duration::from_secs(10),
        retry_limit: 10,
        max_retry_delay: Duration::from_millis(50),
    };
    let txn = p1.engine().store().begin(&opts).unwrap();
    let journal: std::collections::BTreeSet<(Vec<u8>, u64)> = txn
        .get_range(&begin, &end, 1_000)
        .await
        .unwrap()
        .iter()
        .map(|(_, v)| till_ledger_fdb::keys::decode_receipt_ref(v).unwrap())
        .collect();
    assert_eq!(
        journal, stored,
        "the journal points at exactly the stored receipts"
    );
    p1.release_export("p1").await.unwrap();
    p2.lease_export(&lease("p2"), now).await.unwrap();
    let again = export_and_prune(&p2, keep, dir.path(), now).await.unwrap();
    assert_eq!((again.pruned, again.swept), (0, 0), "{again:?}");
}

/// Three proxies opening a fresh key space at once agree on one ledger id, which every
/// receipt carries; a proxy with another receipt key is refused unless it expects the id.
async fn ledger_id_per_key_space(cluster: &PathBuf) {
    let signer = Arc::new(ReceiptSigner::generate());
    let keyspace = format!("till-test-{:016x}", rand::random::<u64>());
    let opened =
        (0..3).map(|i| FdbLedger::open(config(cluster, &keyspace, &signer, &format!("p{i}"))));
    let proxies: Vec<FdbLedger> = futures::future::join_all(opened)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let id = proxies[0].ledger_id().unwrap().to_owned();
    assert!(id.ends_with(&format!("@{}", signer.key_id())), "{id}");
    assert!(proxies.iter().all(|p| p.ledger_id() == Some(id.as_str())));
    let levels = vec![level(Some(10))];
    for (i, p) in proxies.iter().enumerate() {
        let req = conformance::claim_request(&levels, Some(&format!("k{i}")), "chat");
        let claim = p.claim(req).await.unwrap().unwrap();
        assert_eq!(claim.receipt.body().ledger.as_deref(), Some(id.as_str()));
    }
    let other = Arc::new(ReceiptSigner::generate());
    let refused = FdbLedger::open(config(cluster, &keyspace, &other, "p9")).await;
    assert!(
        matches!(refused, Err(till_ledger::LedgerError::Open { .. })),
        "{refused:?}"
    );
    let mut expecting = config(cluster, &keyspace, &other, "p9");
    expecting.ledger_id = till_ledger_fdb::LedgerIdCheck::Expect(id.clone());
    let rotated = FdbLedger::open(expecting).await.unwrap();
    assert_eq!(rotated.ledger_id(), Some(id.as_str()));
}

fn level(cap: Option<u64>) -> Level {
    Level {
        revocation_id: conformance::random_revocation_id(),
        cap,
    }
}

async fn revocation_seen_by_every_proxy(cluster: &PathBuf) {
    let signer = Arc::new(ReceiptSigner::generate());
    let ks = format!("till-test-{:016x}", rand::random::<u64>());
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(
            FdbLedger::open(config(cluster, &ks, &signer, &format!("p{i}")))
                .await
                .unwrap(),
        );
    }
    let levels = vec![level(Some(100)), level(Some(10))];
    for p in &proxies {
        p.claim(till_ledger::conformance::claim_request(
            &levels, None, "chat",
        ))
        .await
        .unwrap()
        .unwrap();
    }
    proxies[0].revoke(&levels[1].revocation_id).await.unwrap();
    for p in &proxies[1..] {
        assert_eq!(
            p.claim(till_ledger::conformance::claim_request(
                &levels, None, "chat"
            ))
            .await
            .unwrap()
            .unwrap_err(),
            Refusal::Revoked { block: 1 }
        );
    }
}

/// Three proxies, 600 concurrent claims on one token (cap 150) plus two sub-tokens (caps
/// 40 and 30): never over any cap, the family chain audits clean, and the batching is
/// visible in the commit counts.
async fn fleet_hot_token(cluster: &PathBuf) {
    let signer = Arc::new(ReceiptSigner::generate());
    let mut keys = ReceiptKeySet::new();
    keys.insert(signer.public_key());
    let ks = format!("till-test-{:016x}", rand::random::<u64>());
    let mut proxies = Vec::new();
    for i in 0..3 {
        proxies.push(Arc::new(
            FdbLedger::open(config(cluster, &ks, &signer, &format!("p{i}")))
                .await
                .unwrap(),
        ));
    }
    let root = level(Some(150));
    let a = vec![root.clone(), level(Some(40))];
    let b = vec![root.clone(), level(Some(30))];
    let mut tasks = Vec::new();
    for i in 0..600usize {
        let proxy = Arc::clone(&proxies[i % 3]);
        let levels = match i % 5 {
            0 => a.clone(),
            1 => b.clone(),
            _ => vec![root.clone()],
        };
        tasks.push(tokio::spawn(async move {
            (
                i % 5,
                proxy
                    .claim(till_ledger::conformance::claim_request(
                        &levels, None, "chat",
                    ))
                    .await,
            )
        }));
    }
    let mut ok = [0u64; 5];
    for t in tasks {
        let (kind, answer) = t.await.unwrap();
        match answer {
            Ok(Ok(_)) => ok[kind] += 1,
            Ok(Err(Refusal::CapReached { .. })) => {}
            other => panic!("unexpected answer {other:?}"),
        }
    }
    let total: u64 = ok.iter().sum();
    assert_eq!(total, 150, "exactly the root cap");
    assert!(ok[0] <= 40 && ok[1] <= 30);
    let usage = proxies[0]
        .usage(&[root.clone(), a[1].clone(), b[1].clone()])
        .await
        .unwrap();
    assert_eq!(
        usage.iter().map(|u| u.used).collect::<Vec<_>>(),
        vec![150, ok[0], ok[1]]
    );
    let receipts = conformance::all_receipts(proxies[1].as_ref(), &root.revocation_id).await;
    audit_chain(&receipts, &keys).unwrap();
    for (i, p) in proxies.iter().enumerate() {
        println!("proxy {i}: {:?}", p.stats());
    }
}

async fn unreachable_cluster_is_unavailable() {
    // A cluster file naming a coordinator nobody listens on: `open` must fail within the
    // transaction timeout rather than hang.
    let dir = std::env::temp_dir().join(format!("till-fdb-dead-{:016x}", rand::random::<u64>()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("fdb.cluster");
    std::fs::write(&file, "dead:dead@127.0.0.1:1\n").unwrap();
    let signer = Arc::new(ReceiptSigner::generate());
    let mut cfg = config(&file, "till-test-dead", &signer, "p");
    cfg.transaction_timeout = Duration::from_millis(500);
    let opened = tokio::time::timeout(Duration::from_secs(20), FdbLedger::open(cfg))
        .await
        .expect("open hung on an unreachable cluster");
    assert!(opened.is_err(), "open succeeded on an unreachable cluster");
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 15, bounded key space, on a real cluster: the idempotency record and the journal
/// hold `(family, seq)` pointers, not receipt copies; a replay inside the window reads the
/// receipt by pointer; past the window the same key is a fresh claim.
async fn receipts_once_and_idempotency_window(cluster: &PathBuf) {
    use till_ledger_fdb::keys::{decode_receipt_ref, IdemRecord, ReceiptRef};
    use till_ledger_fdb::{KvStore, KvTxn, TxnOptions};
    let signer = Arc::new(ReceiptSigner::generate());
    let ks = format!("till-test-{:016x}", rand::random::<u64>());
    let mut cfg = config(cluster, &ks, &signer, "p0");
    cfg.idempotency_window = Duration::from_secs(60);
    let ledger = FdbLedger::open(cfg).await.unwrap();
    let levels = vec![level(Some(10))];
    let at = |now: u64| ClaimRequest {
        now,
        ..conformance::claim_request(&levels, Some("k"), "chat")
    };
    let t0 = conformance::NOW;
    let first = ledger.claim(at(t0)).await.unwrap().unwrap();
    let replay = ledger.claim(at(t0 + 60)).await.unwrap().unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.receipt.compact(), first.receipt.compact());
    let fresh = ledger.claim(at(t0 + 61)).await.unwrap().unwrap();
    assert!(
        !fresh.replayed,
        "past the window the same key is a fresh claim"
    );
    assert_eq!(fresh.receipt.body().seq, 2);

    let keys = ledger.engine().keyspace().clone();
    let family = levels[0].revocation_id.clone();
    let opts = TxnOptions {
        timeout: Duration::from_secs(10),
        retry_limit: 10,
        max_retry_delay: Duration::from_millis(50),
    };
    let txn = ledger.engine().store().begin(&opts).unwrap();
    let record = txn
        .get(&keys.idempotency(&family, "k"))
        .await
        .unwrap()
        .unwrap();
    let record = IdemRecord::decode(&record).unwrap();
    assert_eq!(
        record.receipt,
        ReceiptRef::At {
            family: family.clone(),
            seq: 2
        }
    );
    assert_eq!(record.at, Some(t0 + 61));
    let (begin, end) = keys.journal_range();
    let journal: Vec<(Vec<u8>, u64)> = txn
        .get_range(&begin, &end, 100)
        .await
        .unwrap()
        .iter()
        .map(|(_, v)| decode_receipt_ref(v).unwrap())
        .collect();
    assert_eq!(journal, vec![(family.clone(), 1), (family.clone(), 2)]);
}

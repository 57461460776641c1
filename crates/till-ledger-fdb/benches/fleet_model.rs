//! A model of the fleet hot-key case without a cluster: several `KvLedger`s ("proxies") on
//! one `MemoryStore` whose commits take an injected round trip (default 2 ms), all
//! hammering ONE hot token. Batches of different proxies conflict on the family's chain
//! head and root counter exactly as they do on FoundationDB (1020, retry from fresh
//! reads), so what batching reaches, and what the conflicts cost, can be judged here.
//!
//! ```text
//! cargo bench -p till-ledger-fdb --no-default-features --features memory --bench fleet_model \
//!   -- --warm-up-time 1 --measurement-time 5
//! ```
//!
//! `TILL_MODEL_LATENCY_MS` (default 2) sets the commit latency, `TILL_MODEL_CLIENTS`
//! (default 32) the closed-loop clients per proxy (like `wrk -c32` per proxy),
//! `TILL_MODEL_THINK_US` (default 1000) the time between an answer and the client's
//! next claim (forward, response, turnaround), `TILL_MODEL_CASES` (comma-separated
//! names) runs only some cases (`1_proxy_batch_1`, `1_proxy_batched`, `3_proxies_batch_1`,
//! `3_proxies_batched`). Each case prints, besides criterion's claims/s, a breakdown from
//! `EngineStats` and the store: claims per committed transaction (the batch size actually
//! reached), claims per batch, retries and 1020 conflicts per commit, and the share of
//! the lanes' time spent reading, planning and signing, committing and backing off.
//!
//! The model's commit is a Tokio sleep (1 ms timer granularity: 2 ms injected measures
//! about 3.2 ms), and signing shares the 2 cores with the clients; compare cases of one
//! run, not absolute figures.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use till_ledger::{conformance, Ledger, Level};
use till_ledger_fdb::memory::MemoryStore;
use till_ledger_fdb::{EngineStats, FdbConfig, KvLedger};
use till_receipt::ReceiptSigner;

/// Claims per criterion iteration (spread over every client of every proxy).
const CLAIMS_PER_ITER: u64 = 512;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Model {
    store: MemoryStore,
    proxies: Vec<Arc<KvLedger<MemoryStore>>>,
    hot: Vec<Level>,
}

/// One case: how many proxies, and the batching knobs each gets.
struct Case {
    name: &'static str,
    proxies: usize,
    max_batch: usize,
}

fn model(runtime: &tokio::runtime::Runtime, case: &Case) -> Model {
    let store = MemoryStore::new();
    store.set_commit_latency(Duration::from_millis(env_u64("TILL_MODEL_LATENCY_MS", 2)));
    let signer = Arc::new(ReceiptSigner::generate());
    let proxies = (0..case.proxies)
        .map(|i| {
            let mut cfg = FdbConfig::new(Arc::clone(&signer), format!("p{i}"));
            cfg.max_batch = case.max_batch;
            cfg.transaction_timeout = Duration::from_secs(30);
            cfg.retry_limit = 10_000;
            if let Some(ms) = std::env::var("TILL_MODEL_MAX_RETRY_DELAY_MS")
                .ok()
                .and_then(|v| v.parse().ok())
            {
                cfg.max_retry_delay = Duration::from_millis(ms);
            }
            let _guard = runtime.enter();
            Arc::new(KvLedger::start(Arc::new(store.clone()), &cfg).unwrap())
        })
        .collect();
    Model {
        store,
        proxies,
        // A two-level hot key (a root and one attenuation), caps far away.
        hot: vec![
            Level {
                revocation_id: conformance::random_revocation_id(),
                cap: Some(u64::MAX / 2),
            },
            Level {
                revocation_id: conformance::random_revocation_id(),
                cap: Some(u64::MAX / 2),
            },
        ],
    }
}

/// Runs `claims` claims as a closed loop: `clients` tasks per proxy, each claiming again
/// `think` after its previous claim is answered (the forward to the upstream and the
/// client's turnaround; zero: at once). Returns the elapsed time.
async fn closed_loop(m: &Model, clients: usize, think: Duration, claims: u64) -> Duration {
    let left = Arc::new(AtomicU64::new(claims));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for proxy in &m.proxies {
        for _ in 0..clients {
            let proxy = Arc::clone(proxy);
            let left = Arc::clone(&left);
            let hot = m.hot.clone();
            tasks.push(tokio::spawn(async move {
                while left
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                    .is_ok()
                {
                    let req = conformance::claim_request(&hot, None, "chat");
                    proxy.claim(req).await.unwrap().unwrap();
                    if !think.is_zero() {
                        tokio::time::sleep(think).await;
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    start.elapsed()
}

/// The fleet's counters minus `before`.
fn delta(m: &Model, before: &EngineStats) -> EngineStats {
    let now = total(m);
    EngineStats {
        batches: now.batches - before.batches,
        claims: now.claims - before.claims,
        commits: now.commits - before.commits,
        retries: now.retries - before.retries,
        read_micros: now.read_micros - before.read_micros,
        plan_micros: now.plan_micros - before.plan_micros,
        commit_micros: now.commit_micros - before.commit_micros,
        backoff_micros: now.backoff_micros - before.backoff_micros,
        ..EngineStats::default()
    }
}

fn total(m: &Model) -> EngineStats {
    m.proxies
        .iter()
        .map(|p| p.stats())
        .fold(EngineStats::default(), |a, s| EngineStats {
            batches: a.batches + s.batches,
            claims: a.claims + s.claims,
            commits: a.commits + s.commits,
            retries: a.retries + s.retries,
            read_micros: a.read_micros + s.read_micros,
            plan_micros: a.plan_micros + s.plan_micros,
            commit_micros: a.commit_micros + s.commit_micros,
            backoff_micros: a.backoff_micros + s.backoff_micros,
            ..EngineStats::default()
        })
}

fn report(name: &str, m: &Model, before: &(EngineStats, u64), elapsed: Duration) {
    let s = delta(m, &before.0);
    let conflicts = m.store.conflicts() - before.1;
    let per_commit = |n: u64| n as f64 / s.commits.max(1) as f64;
    // Where each lane's time goes, as shares of the lanes' busy time.
    let busy = (s.read_micros + s.plan_micros + s.commit_micros + s.backoff_micros).max(1) as f64;
    let pct = |n: u64| 100.0 * n as f64 / busy;
    println!(
        "{name}: {:.0} claims/s | {:.1} claims per commit, {:.1} per batch | {:.2} retries and {:.2} conflicts per commit | lane time: read {:.0}%, plan+sign {:.0}%, commit {:.0}%, backoff {:.0}% ({:.2} ms per commit) | {} claims, {} batches, {} commits",
        s.claims as f64 / elapsed.as_secs_f64(),
        per_commit(s.claims),
        s.claims as f64 / s.batches.max(1) as f64,
        per_commit(s.retries),
        per_commit(conflicts),
        pct(s.read_micros),
        pct(s.plan_micros),
        pct(s.commit_micros),
        pct(s.backoff_micros),
        busy / 1000.0 / s.commits.max(1) as f64,
        s.claims,
        s.batches,
        s.commits,
    );
}

fn fleet_model(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let clients = usize::try_from(env_u64("TILL_MODEL_CLIENTS", 32)).unwrap();
    let mut group = c.benchmark_group("fdb_model_hot_key");
    group.throughput(Throughput::Elements(CLAIMS_PER_ITER));
    group.sample_size(10);
    let think = Duration::from_micros(env_u64("TILL_MODEL_THINK_US", 1_000));
    let batched = FdbConfig::DEFAULT_MAX_BATCH;
    let case = |name, proxies, max_batch| Case {
        name,
        proxies,
        max_batch,
    };
    let cases = [
        case("1_proxy_batch_1", 1, 1),
        case("1_proxy_batched", 1, batched),
        case("3_proxies_batch_1", 3, 1),
        case("3_proxies_batched", 3, batched),
    ];
    let only = std::env::var("TILL_MODEL_CASES").unwrap_or_default();
    for c in &cases {
        let name = c.name;
        if !only.is_empty() && !only.split(',').any(|n| n == name) {
            continue;
        }
        let m = model(&runtime, c);
        let before = (total(&m), m.store.conflicts());
        let mut elapsed = Duration::ZERO;
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let took =
                    runtime.block_on(closed_loop(&m, clients, think, iters * CLAIMS_PER_ITER));
                elapsed += took;
                took
            });
        });
        report(name, &m, &before, elapsed);
    }
    group.finish();
}

criterion_group!(benches, fleet_model);
criterion_main!(benches);

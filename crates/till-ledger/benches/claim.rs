//! Claim latency and throughput of the embedded ledger (every commit fsync'd).
//!
//! - `claim_single`: one claim at a time on one token (latency of one durable commit).
//! - `claim_hot_token_64`: 64 concurrent claims on ONE token, group commit on
//!   (`max_batch` 256) and off (`max_batch` 1).
//! - `claim_cold_tokens_64`: 64 concurrent claims on 64 distinct families drawn in turn
//!   from 10,000 (cold tokens), group commit on.
//!
//! Run briefly: `cargo bench -p till-ledger --bench claim -- --warm-up-time 1
//! --measurement-time 3`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use futures::future::join_all;
use tempfile::TempDir;
use till_ledger::{ClaimRequest, EmbeddedConfig, EmbeddedLedger, Ledger, Level};
use till_receipt::ReceiptSigner;

const CONCURRENT: usize = 64;
const COLD_FAMILIES: usize = 10_000;

fn open(max_batch: usize) -> (Arc<EmbeddedLedger>, TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let config = EmbeddedConfig {
        signer: Arc::new(ReceiptSigner::from_seed([1; 32])),
        proxy_id: "bench".into(),
        max_batch,
        claim_timeout: Duration::from_secs(60),
        alerts: till_ledger::AlertPolicy::default(),
    };
    let ledger = EmbeddedLedger::open(dir.path().join("ledger.redb"), config).unwrap();
    (Arc::new(ledger), dir)
}

fn token(family: u64) -> Vec<Level> {
    let mut root = vec![0u8; 64];
    root[..8].copy_from_slice(&family.to_le_bytes());
    let mut child = root.clone();
    child[63] = 1;
    vec![
        Level {
            revocation_id: root,
            cap: None,
        },
        Level {
            revocation_id: child,
            cap: Some(u64::MAX),
        },
    ]
}

/// Claims concurrently (all queued at once) and checks every one succeeded.
async fn claim_all(ledger: Arc<EmbeddedLedger>, reqs: Vec<ClaimRequest>) {
    let answers = join_all(reqs.into_iter().map(|r| ledger.claim(r))).await;
    for a in answers {
        a.unwrap().unwrap();
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn claim_single(c: &mut Criterion) {
    let rt = runtime();
    let (ledger, _dir) = open(256);
    let levels = token(1);
    let mut group = c.benchmark_group("claim_single");
    group.sample_size(10).throughput(Throughput::Elements(1));
    group.bench_function("one_token", |b| {
        b.to_async(&rt).iter_batched(
            || till_ledger::conformance::claim_request(&levels, None, "chat"),
            |req| {
                let ledger = Arc::clone(&ledger);
                async move { ledger.claim(req).await.unwrap().unwrap() }
            },
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

fn claim_hot_token(c: &mut Criterion) {
    let rt = runtime();
    let mut group = c.benchmark_group("claim_hot_token_64");
    group
        .sample_size(10)
        .throughput(Throughput::Elements(CONCURRENT as u64));
    for (name, max_batch) in [("group_commit_on", 256), ("group_commit_off", 1)] {
        let (ledger, _dir) = open(max_batch);
        let levels = token(2);
        group.bench_function(name, |b| {
            b.to_async(&rt).iter_batched(
                || {
                    (0..CONCURRENT)
                        .map(|_| till_ledger::conformance::claim_request(&levels, None, "chat"))
                        .collect::<Vec<_>>()
                },
                |reqs| claim_all(Arc::clone(&ledger), reqs),
                BatchSize::SmallInput,
            );
        });
    }
    group.finish();
}

fn claim_cold_tokens(c: &mut Criterion) {
    let rt = runtime();
    let (ledger, _dir) = open(256);
    let families: Arc<Vec<Vec<Level>>> = Arc::new(
        (0..COLD_FAMILIES as u64)
            .map(|f| token(1_000 + f))
            .collect(),
    );
    let next = Arc::new(AtomicUsize::new(0));
    let mut group = c.benchmark_group("claim_cold_tokens_64");
    group
        .sample_size(10)
        .throughput(Throughput::Elements(CONCURRENT as u64));
    group.bench_function("of_10000_families", |b| {
        b.to_async(&rt).iter_batched(
            || {
                let start = next.fetch_add(CONCURRENT, Ordering::Relaxed);
                (start..start + CONCURRENT)
                    .map(|i| {
                        till_ledger::conformance::claim_request(
                            &families[i % COLD_FAMILIES],
                            None,
                            "chat",
                        )
                    })
                    .collect::<Vec<_>>()
            },
            |reqs| claim_all(Arc::clone(&ledger), reqs),
            BatchSize::SmallInput,
        );
    });
    group.finish();
}

criterion_group!(benches, claim_single, claim_hot_token, claim_cold_tokens);
criterion_main!(benches);

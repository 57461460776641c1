//! Claims per second against a real FoundationDB cluster: one hot token, and many tokens.
//!
//! Gated like the cluster tests: without `TILL_FDB_CLUSTER_FILE` it prints
//! `SKIPPED: set TILL_FDB_CLUSTER_FILE ...` and measures nothing.
//!
//! ```text
//! fdb/local.sh start
//! TILL_FDB_CLUSTER_FILE=$(fdb/local.sh cluster-file) \
//!   cargo bench -p till-ledger-fdb --bench claims_fdb -- --warm-up-time 1 --measurement-time 3
//! ```
//!
//! Each iteration claims `CONCURRENCY` activations concurrently (so group commit has
//! something to batch) on an uncapped token; throughput is reported per claim.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use till_ledger::{Ledger, Level};
use till_ledger_fdb::{FdbConfig, FdbLedger};
use till_receipt::ReceiptSigner;

const CONCURRENCY: usize = 256;

fn level() -> Level {
    Level {
        revocation_id: (0..64).map(|_| rand::random::<u8>()).collect(),
        cap: None,
    }
}

fn claims(c: &mut Criterion) {
    let Some(cluster) = std::env::var_os("TILL_FDB_CLUSTER_FILE").filter(|v| !v.is_empty()) else {
        println!(
            "SKIPPED: set TILL_FDB_CLUSTER_FILE to a cluster file to benchmark FoundationDB claims"
        );
        return;
    };
    let network = till_ledger_fdb::boot().expect("boot the FoundationDB client");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let signer = Arc::new(ReceiptSigner::generate());
    let mut cfg = FdbConfig::new(signer, "bench")
        .with_cluster_file(std::path::PathBuf::from(cluster))
        .with_keyspace(format!("till-bench-{:016x}", rand::random::<u64>()));
    cfg.transaction_timeout = Duration::from_secs(10);
    let ledger = Arc::new(runtime.block_on(FdbLedger::open(cfg)).unwrap());

    let mut group = c.benchmark_group("fdb_claims");
    group.throughput(Throughput::Elements(CONCURRENCY as u64));
    group.sample_size(10);

    let hot = vec![level()];
    group.bench_function("hot_token", |b| {
        b.to_async(&runtime).iter(|| {
            let ledger = Arc::clone(&ledger);
            let hot = hot.clone();
            async move {
                let tasks: Vec<_> = (0..CONCURRENCY)
                    .map(|_| {
                        let ledger = Arc::clone(&ledger);
                        let req = till_ledger::conformance::claim_request(&hot, None, "chat");
                        tokio::spawn(async move { ledger.claim(req).await.unwrap().unwrap() })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            }
        });
    });

    let many: Vec<Vec<Level>> = (0..CONCURRENCY).map(|_| vec![level()]).collect();
    group.bench_function("many_tokens", |b| {
        b.to_async(&runtime).iter(|| {
            let ledger = Arc::clone(&ledger);
            let many = many.clone();
            async move {
                let tasks: Vec<_> = many
                    .into_iter()
                    .map(|levels| {
                        let ledger = Arc::clone(&ledger);
                        tokio::spawn(async move {
                            ledger
                                .claim(till_ledger::conformance::claim_request(
                                    &levels, None, "chat",
                                ))
                                .await
                                .unwrap()
                                .unwrap()
                        })
                    })
                    .collect();
                for t in tasks {
                    t.await.unwrap();
                }
            }
        });
    });
    group.finish();
    println!("engine stats: {:?}", ledger.stats());
    drop(ledger);
    drop(runtime);
    drop(network);
}

criterion_group!(benches, claims);
criterion_main!(benches);

//! Bytes the embedded ledger keeps per claim (issue 11): N claims on one hot key (64 at a
//! time, group commit), then the file size, redb's own accounting of stored bytes, and
//! the size after compaction, each per claim.
//!
//! `cargo run --release -p till-ledger --example bytes_per_claim -- [N] [LEVELS]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use till_ledger::conformance::claim_request;
use till_ledger::{EmbeddedConfig, EmbeddedLedger, Ledger, Level};
use till_receipt::ReceiptSigner;

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().map_or(50_000, |a| a.parse().unwrap());
    let depth: usize = args.next().map_or(1, |a| a.parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let signer = Arc::new(ReceiptSigner::generate());
    let levels: Vec<Level> = (0..depth)
        .map(|i| Level {
            revocation_id: vec![u8::try_from(i).unwrap() + 1; 64],
            cap: Some(u64::MAX / 2),
        })
        .collect();
    {
        let ledger =
            Arc::new(EmbeddedLedger::open(&path, EmbeddedConfig::new(signer, "bytes")).unwrap());
        let mut done = 0;
        while done < n {
            let wave = 64.min(n - done);
            let mut tasks = Vec::with_capacity(wave);
            for _ in 0..wave {
                let (ledger, levels) = (Arc::clone(&ledger), levels.clone());
                tasks.push(tokio::spawn(async move {
                    ledger
                        .claim(claim_request(&levels, None, "bytes"))
                        .await
                        .unwrap()
                        .unwrap();
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            done += wave;
        }
    }
    let file = std::fs::metadata(&path).unwrap().len();
    let mut db = redb::Database::open(&path).unwrap();
    let stats = db.begin_write().unwrap().stats().unwrap();
    let stored = stats.stored_bytes() + stats.metadata_bytes();
    db.compact().unwrap();
    drop(db);
    let compacted = std::fs::metadata(&path).unwrap().len();
    let per = |b: u64| b as f64 / n as f64;
    println!(
        "{n} claims, {depth}-level key: file {file} B ({:.0} B/claim); redb stored+metadata {stored} B ({:.0} B/claim), fragmented {} B; compacted file {compacted} B ({:.0} B/claim)",
        per(file),
        per(stored),
        stats.fragmented_bytes(),
        per(compacted)
    );
}

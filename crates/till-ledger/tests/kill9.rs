//! Durability under `kill -9`: a child process claims under load and prints every claim
//! the ledger confirmed; the parent SIGKILLs it mid-load, reopens the ledger and checks
//! that every confirmed receipt is there, no slot was reused, the chain audits clean and
//! the counters equal the receipts.
//!
//! The child is this same test binary, re-executed with `--exact kill9_child_entry` and an
//! environment variable naming its data dir; without that variable the entry is a no-op,
//! so a normal `cargo test` run passes through it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use till_ledger::{ClaimRequest, EmbeddedConfig, EmbeddedLedger, Ledger, Level, RequestDigest};
use till_receipt::{audit_chain, ReceiptKeySet, ReceiptSigner};

const CHILD_ENV: &str = "TILL_LEDGER_KILL9_CHILD_DIR";
const CHILD_TEST: &str = "kill9_child_entry";
/// Kill the child after this many confirmed claims.
const KILL_AFTER: usize = 1_000;
/// The child stops on its own after this many claims per task or this long.
const CHILD_CLAIMS_PER_TASK: usize = 5_000;
const CHILD_TASKS: usize = 8;
const DEADLINE: Duration = Duration::from_secs(90);

const ROOT: [u8; 64] = [0xa1; 64];
const CHILD_A: [u8; 64] = [0xb1; 64];
const CHILD_B: [u8; 64] = [0xb2; 64];

fn signer() -> Arc<ReceiptSigner> {
    Arc::new(ReceiptSigner::from_seed([9; 32]))
}

fn open(path: &Path) -> EmbeddedLedger {
    let config = EmbeddedConfig {
        signer: signer(),
        proxy_id: "kill9".into(),
        max_batch: 64,
        claim_timeout: Duration::from_secs(20),
        alerts: till_ledger::AlertPolicy::default(),
    };
    EmbeddedLedger::open(path, config).unwrap()
}

fn chain(i: usize) -> Vec<Level> {
    let root = Level {
        revocation_id: ROOT.to_vec(),
        cap: Some(1_000_000),
    };
    match i % 3 {
        0 => vec![root],
        1 => vec![
            root,
            Level {
                revocation_id: CHILD_A.to_vec(),
                cap: Some(500_000),
            },
        ],
        _ => vec![
            root,
            Level {
                revocation_id: CHILD_B.to_vec(),
                cap: None,
            },
        ],
    }
}

fn request(i: usize) -> ClaimRequest {
    ClaimRequest {
        levels: chain(i),
        idempotency_key: None,
        request: RequestDigest {
            method: "POST".into(),
            upstream: "openai".into(),
            path: format!("/v1/{i}"),
            body_sha256: "cd".repeat(32),
            model: None,
            query: None,
            content_type: None,
        },
        now: 1_750_000_000,
        not_after: None,
        meta: None,
        windows: Vec::new(),
        ceilings: None,
    }
}

/// The child: claim from several tasks until killed (or the bounds run out), printing
/// `COMMITTED <seq> <hash>` only after the ledger confirmed the claim.
#[test]
fn kill9_child_entry() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ledger = Arc::new(open(&Path::new(&dir).join("ledger.redb")));
        let started = Instant::now();
        let tasks: Vec<_> = (0..CHILD_TASKS)
            .map(|t| {
                let ledger = Arc::clone(&ledger);
                tokio::spawn(async move {
                    for i in 0..CHILD_CLAIMS_PER_TASK {
                        if started.elapsed() > DEADLINE {
                            break;
                        }
                        let c = ledger.claim(request(t + i)).await.unwrap().unwrap();
                        let line = format!(
                            "COMMITTED {} {}\n",
                            c.receipt.body().seq,
                            c.receipt.hash_hex()
                        );
                        let mut out = std::io::stdout().lock();
                        out.write_all(line.as_bytes()).unwrap();
                        out.flush().unwrap();
                    }
                })
            })
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn kill9_under_load_loses_nothing() {
    if std::env::var(CHILD_ENV).is_ok() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines_tx, lines) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines_tx.send(line).is_err() {
                break;
            }
        }
    });

    let mut confirmed: BTreeMap<u64, String> = BTreeMap::new();
    let record = |line: String, confirmed: &mut BTreeMap<u64, String>| {
        if let Some(rest) = line.strip_prefix("COMMITTED ") {
            let (seq, hash) = rest.split_once(' ').unwrap();
            let previous = confirmed.insert(seq.parse().unwrap(), hash.to_owned());
            assert!(previous.is_none(), "the child was handed seq {seq} twice");
        }
    };
    let started = Instant::now();
    while confirmed.len() < KILL_AFTER {
        let left = DEADLINE.saturating_sub(started.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) => record(line, &mut confirmed),
            Err(e) => panic!(
                "child stopped confirming after {} claims: {e:?}",
                confirmed.len()
            ),
        }
    }
    assert!(
        child.try_wait().unwrap().is_none(),
        "the child must still be under load when killed"
    );
    child.kill().unwrap(); // SIGKILL
    let status = child.wait().unwrap();
    assert!(!status.success());
    // Lines already in the pipe were printed after their claim was confirmed too.
    reader.join().unwrap();
    for line in lines.try_iter() {
        record(line, &mut confirmed);
    }

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async move {
        let ledger = open(&dir.path().join("ledger.redb"));
        let receipts = ledger.receipts(&ROOT, 1, usize::MAX).await.unwrap();
        let n = receipts.len() as u64;
        assert!(n >= confirmed.len() as u64);
        for (seq, hash) in &confirmed {
            let stored = &receipts[usize::try_from(*seq - 1).unwrap()];
            assert_eq!(stored.body().seq, *seq);
            assert_eq!(
                &stored.hash_hex(),
                hash,
                "confirmed receipt {seq} lost or changed"
            );
        }
        let mut keys = ReceiptKeySet::new();
        keys.insert(signer().public_key());
        let report = audit_chain(&receipts, &keys).unwrap();
        assert_eq!(report.receipts, n);

        let ids = [ROOT.to_vec(), CHILD_A.to_vec(), CHILD_B.to_vec()];
        let levels: Vec<Level> = ids
            .iter()
            .map(|id| Level {
                revocation_id: id.clone(),
                cap: None,
            })
            .collect();
        let usage = ledger.usage(&levels).await.unwrap();
        assert_eq!(usage[0].used, n, "family counter equals receipts");
        for (i, id) in ids.iter().enumerate().skip(1) {
            let through = receipts
                .iter()
                .filter(|r| {
                    r.body().slots.get(1).map(|s| &s.revocation_id) == Some(&hex::encode(id))
                })
                .count() as u64;
            assert_eq!(
                usage[i].used, through,
                "child {i} counter equals its receipts"
            );
        }

        // The chain continues where it stopped: no slot reused after the restart.
        let c = ledger.claim(request(1)).await.unwrap().unwrap();
        assert_eq!(c.receipt.body().seq, n + 1);
        assert_eq!(
            c.receipt.body().prev,
            Some(receipts[receipts.len() - 1].hash_hex())
        );
        eprintln!(
            "kill9: {} confirmed before SIGKILL, {n} stored, chain clean",
            confirmed.len()
        );
    });
}

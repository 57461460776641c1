//! Issue 10 items 10 and 11 (TEST-MATRIX row 29): a truncated, corrupted, emptied or
//! foreign `ledger.redb` is a clear error and a non-zero exit from the real binary —
//! never a panic (exit 101), never a silent fresh start, never a server running on it.

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use till_ledger::{ClaimRequest, EmbeddedConfig, EmbeddedLedger, Ledger, Level};
use till_receipt::{Receipt, ReceiptSigner, RequestDigest};
use till_token::{verify, KeyRing, Limits, RootPublicKey};

use crate::fixture::{Run, Till};

fn levels(t: &Till, key: &str) -> Vec<Level> {
    let ring = KeyRing::with(
        RootPublicKey::from_jwk(
            &std::fs::read_to_string(t.data_dir().join("root.pub.jwk")).unwrap(),
        )
        .unwrap(),
    );
    verify(key, &ring, &Limits::default())
        .unwrap()
        .blocks()
        .iter()
        .map(|b| Level {
            revocation_id: b.revocation_id.clone(),
            cap: b.caveats.cap,
        })
        .collect()
}

/// Claims `n` activations of `key` through the library on the data dir's ledger (which
/// keeps the ledger id `till` gave it) and returns the receipts.
async fn claims(t: &Till, key: &str, n: usize) -> Vec<Receipt> {
    let signer = ReceiptSigner::from_private_jwk(
        &std::fs::read_to_string(t.data_dir().join("receipt.key.jwk")).unwrap(),
    )
    .unwrap();
    let ledger = EmbeddedLedger::open(
        t.data_dir().join("ledger.redb"),
        EmbeddedConfig::new(Arc::new(signer), "test"),
    )
    .unwrap();
    let levels = levels(t, key);
    let mut out = Vec::new();
    for i in 0..n {
        let req = ClaimRequest {
            levels: levels.clone(),
            idempotency_key: None,
            request: RequestDigest {
                method: "POST".into(),
                upstream: "openai".into(),
                path: format!("/v1/chat/completions/{i}"),
                body_sha256: "00".repeat(32),
                model: None,
                query: None,
                content_type: None,
            },
            now: 1_800_000_000,
            not_after: None,
            meta: None,
            windows: Vec::new(),
            ceilings: None,
        };
        out.push(ledger.claim(req).await.unwrap().unwrap().receipt);
    }
    out
}

/// `till serve` on this data dir: must exit (it may not run on a bad ledger) within 30 s.
fn serve(t: &Till) -> Run {
    let mut child = t
        .cmd()
        .args(["serve", "--listen", "127.0.0.1:0", "--admin-listen", "none"])
        .env("OPENAI_API_KEY", "sk-test")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            child.kill().unwrap();
            let out = child.wait_with_output().unwrap();
            panic!(
                "till serve kept running on a bad ledger\nstdout:\n{}\nstderr:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Run {
        args: vec!["serve".into()],
        out: child.wait_with_output().unwrap(),
    }
}

/// Exit 1 with a message that names the ledger file, and no panic report.
fn clear_error(run: &Run, ledger: &Path, says: &str) {
    let err = run.fails_with(1);
    assert!(!err.contains("panicked"), "{err}");
    assert!(!err.contains("RUST_BACKTRACE"), "{err}");
    assert!(err.contains(&ledger.display().to_string()), "{err}");
    assert!(err.contains(says), "expected `{says}` in:\n{err}");
}

/// A data dir with a bound ledger (`till usage` creates and binds it) holding 3 claims.
async fn with_claims(t: &Till) -> (String, Vec<Receipt>) {
    let key = t.minted(&["--upstream", "openai", "--cap", "10"]);
    t.run(&["usage", &key]).ok();
    let receipts = claims(t, &key, 3).await;
    (key, receipts)
}

fn flip_every_copy(path: &Path, needle: &[u8]) {
    let mut data = std::fs::read(path).unwrap();
    let hits: Vec<usize> = data
        .windows(needle.len())
        .enumerate()
        .filter(|(_, w)| *w == needle)
        .map(|(i, _)| i)
        .collect();
    assert!(!hits.is_empty(), "nothing to flip");
    for i in hits {
        for b in &mut data[i + 40..i + 48] {
            *b ^= 0xff;
        }
    }
    std::fs::write(path, data).unwrap();
}

/// Item 10: a truncated ledger makes `usage`, `audit`, `serve` and `ledger check` fail
/// with a clear error (exit 1), where they used to panic (exit 101).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncated_ledger_is_a_clear_error_never_a_panic() {
    let t = Till::new();
    let (key, _) = with_claims(&t).await;
    let ledger = t.data_dir().join("ledger.redb");
    let data = std::fs::read(&ledger).unwrap();
    for keep in [3000, 4096 * 3, data.len() / 2] {
        std::fs::write(&ledger, &data[..keep]).unwrap();
        clear_error(&t.run(&["usage", &key]), &ledger, "damaged");
        clear_error(&t.run(&["audit", &key]), &ledger, "damaged");
        clear_error(&serve(&t), &ledger, "damaged");
        clear_error(&t.run(&["ledger", "check"]), &ledger, "damaged");
    }
}

/// Item 10: flipped bytes in the stored receipts fail redb's integrity check: `serve`
/// refuses to start (it used to run on the damaged ledger), `ledger check` reports it,
/// `ledger repair` keeps a backup and says it cannot repair this; the original file
/// restored, everything is healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flipped_bytes_make_serve_refuse_and_ledger_check_fail() {
    let t = Till::new();
    let (key, receipts) = with_claims(&t).await;
    let ledger = t.data_dir().join("ledger.redb");
    let good = std::fs::read(&ledger).unwrap();
    let healthy = t.run(&["ledger", "check", "--json"]).json();
    assert_eq!(healthy["healthy"], true, "{healthy}");
    assert_eq!(healthy["ledger"]["receipts"], 3);

    // Every stored copy of the family id (raw bytes: keys of the counter, receipt and
    // record tables, in live pages and older ones). Receipts are stored as compact binary
    // bodies, so their JWS text is not in the file to flip.
    let family = hex::decode(&receipts[0].body().family).unwrap();
    flip_every_copy(&ledger, &family[..16]);
    clear_error(&serve(&t), &ledger, "integrity check");
    clear_error(&t.run(&["ledger", "check"]), &ledger, "integrity check");
    clear_error(&t.run(&["usage", &key]), &ledger, "integrity check");
    // Still refused the second time (nothing was silently repaired on the way).
    clear_error(&serve(&t), &ledger, "integrity check");
    let repair = t.run(&["ledger", "repair"]);
    let err = repair.fails_with(1);
    assert!(err.contains("cannot be repaired"), "{err}");
    let backups: Vec<_> = std::fs::read_dir(t.data_dir())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ledger.redb.bak-")
        })
        .collect();
    assert_eq!(backups.len(), 1, "repair keeps a backup first");

    std::fs::write(&ledger, &good).unwrap();
    t.run(&["ledger", "check"]).ok();
    let a = t.run(&["audit", &key, "--json"]).json();
    assert_eq!(a["clean"], true, "{a}");
    let r = t.run(&["ledger", "repair", "--json"]).json();
    assert_eq!(r["outcome"]["was_clean"], true, "{r}");
}

/// Item 11: `: > ledger.redb` (or deleting it) in a data dir whose ledger was bound is
/// refused by `serve` and the ledger commands — never a fresh ledger that would make a
/// revoked, partly used key active again with its full cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn emptied_ledger_is_refused_never_a_fresh_start() {
    let t = Till::new();
    let (key, receipts) = with_claims(&t).await;
    t.run(&["revoke", &key]).ok();
    let ledger = t.data_dir().join("ledger.redb");
    let id = std::fs::read_to_string(t.data_dir().join("ledger.id")).unwrap();
    let id = id.trim();
    assert!(
        id.ends_with(&format!("@{}", receipts[0].body().kid)),
        "{id}"
    );
    // Every receipt names the ledger that signed it.
    for r in &receipts {
        assert_eq!(r.body().ledger.as_deref(), Some(id));
    }

    std::fs::write(&ledger, b"").unwrap();
    clear_error(&serve(&t), &ledger, "missing or empty");
    clear_error(&t.run(&["usage", &key]), &ledger, "missing or empty");
    clear_error(&t.run(&["audit", &key]), &ledger, "missing or empty");
    clear_error(&t.run(&["ledger", "check"]), &ledger, "missing or empty");
    assert_eq!(
        std::fs::metadata(&ledger).unwrap().len(),
        0,
        "left as found"
    );

    std::fs::remove_file(&ledger).unwrap();
    clear_error(&serve(&t), &ledger, "missing or empty");
    assert!(!ledger.exists(), "no new ledger was created");
}

/// Item 11: a ledger from another data dir is refused — whether this data dir already
/// recorded its own ledger, or is new and has none yet (bound to another receipt key).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_ledger_is_refused() {
    let ours = Till::new();
    let (key, _) = with_claims(&ours).await;
    let theirs = Till::new();
    with_claims(&theirs).await;
    let ledger = ours.data_dir().join("ledger.redb");
    std::fs::copy(theirs.data_dir().join("ledger.redb"), &ledger).unwrap();
    clear_error(&serve(&ours), &ledger, "not this data dir's ledger");
    clear_error(
        &ours.run(&["usage", &key]),
        &ledger,
        "not this data dir's ledger",
    );
    clear_error(
        &ours.run(&["ledger", "check"]),
        &ledger,
        "not this data dir's ledger",
    );

    // A fresh data dir (keys, no ledger yet) handed someone else's ledger.
    let fresh = Till::new();
    fresh.run(&["keygen"]).ok();
    let ledger = fresh.data_dir().join("ledger.redb");
    std::fs::copy(theirs.data_dir().join("ledger.redb"), &ledger).unwrap();
    clear_error(&serve(&fresh), &ledger, "another receipt key");
    assert!(!fresh.data_dir().join("ledger.id").exists());
}

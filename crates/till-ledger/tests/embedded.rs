//! Embedded-backend behaviour beyond the conformance suite: persistence across reopen,
//! the file lock, group commit of a queued batch, and the fault-injection handle the
//! proxy's tests rely on (frozen writer, failed commits, failed signing).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use till_ledger::conformance::claim_request;
use till_ledger::{EmbeddedConfig, EmbeddedLedger, Ledger, LedgerError, Level, Refusal};
use till_receipt::{audit_chain, Receipt, ReceiptKeySet, ReceiptSigner};

fn signer() -> Arc<ReceiptSigner> {
    Arc::new(ReceiptSigner::from_seed([42; 32]))
}

fn keys() -> ReceiptKeySet {
    let mut keys = ReceiptKeySet::new();
    keys.insert(signer().public_key());
    keys
}

fn open(path: &Path, max_batch: usize, timeout: Duration) -> EmbeddedLedger {
    let config = EmbeddedConfig {
        signer: signer(),
        proxy_id: "test".into(),
        max_batch,
        claim_timeout: timeout,
        alerts: till_ledger::AlertPolicy::default(),
    };
    EmbeddedLedger::open(path, config).unwrap()
}

fn levels(caps: &[Option<u64>]) -> Vec<Level> {
    caps.iter()
        .map(|&cap| Level {
            revocation_id: (0..64).map(|_| rand::random::<u8>()).collect(),
            cap,
        })
        .collect()
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

async fn chain_len(ledger: &dyn Ledger, family: &[u8]) -> usize {
    let receipts = ledger.receipts(family, 1, 10_000).await.unwrap();
    if !receipts.is_empty() {
        audit_chain(&receipts, &keys()).unwrap();
    }
    receipts.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_survives_reopen_and_chain_continues() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let token = levels(&[Some(10), Some(4)]);
    {
        let ledger = open(&path, 256, Duration::from_secs(10));
        for _ in 0..3 {
            ledger
                .claim(claim_request(&token, None, "chat"))
                .await
                .unwrap()
                .unwrap();
        }
        ledger.revoke(&[9; 64]).await.unwrap();
    }
    let ledger = open(&path, 1, Duration::from_secs(10));
    assert_eq!(used(&ledger, &token).await, vec![3, 3]);
    assert!(ledger.usage(&levels_with(&[9; 64])).await.unwrap()[0].revoked);
    let c = ledger
        .claim(claim_request(&token, None, "chat"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.receipt.body().seq, 4);
    assert_eq!(c.remaining, Some(0));
    assert_eq!(chain_len(&ledger, &token[0].revocation_id).await, 4);
}

fn levels_with(id: &[u8]) -> Vec<Level> {
    vec![Level {
        revocation_id: id.to_vec(),
        cap: None,
    }]
}

#[tokio::test]
async fn second_open_reports_locked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let first = open(&path, 1, Duration::from_secs(5));
    let config = EmbeddedConfig::new(signer(), "other");
    let err = EmbeddedLedger::open(&path, config).unwrap_err();
    assert!(matches!(err, LedgerError::Locked { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("till serve"), "{message}");
    assert!(message.contains("ledger.redb"), "{message}");
    drop(first);
    // Dropping the ledger joins its writer: the lock is free again right away.
    open(&path, 1, Duration::from_secs(5));
}

#[tokio::test]
async fn garbage_file_is_an_open_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    std::fs::write(&path, vec![0x5a; 8192]).unwrap();
    let err = EmbeddedLedger::open(&path, EmbeddedConfig::new(signer(), "x")).unwrap_err();
    assert!(matches!(err, LedgerError::Open { .. }), "{err:?}");
}

/// Claims queued while the writer is frozen are applied as one batch when it resumes:
/// each is planned against the transaction's state, so a hot token stays exact.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn queued_batch_on_a_hot_token_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(open(
        &dir.path().join("l.redb"),
        256,
        Duration::from_secs(30),
    ));
    let faults = ledger.faults();
    let token = levels(&[Some(5), None]);
    faults.freeze();
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let ledger = Arc::clone(&ledger);
            let req = claim_request(&token, None, "chat");
            tokio::spawn(async move { ledger.claim(req).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    faults.unfreeze();
    let mut seqs = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.unwrap().unwrap() {
            Ok(c) => seqs.push(c.receipt.body().seq),
            Err(Refusal::CapReached { block: 0, cap: 5 }) => refused += 1,
            Err(r) => panic!("{r:?}"),
        }
    }
    seqs.sort_unstable();
    assert_eq!(seqs, vec![1, 2, 3, 4, 5]);
    assert_eq!(refused, 7);
    assert_eq!(used(ledger.as_ref(), &token).await, vec![5, 5]);
    assert_eq!(chain_len(ledger.as_ref(), &token[0].revocation_id).await, 5);
}

/// A frozen writer: claims answer `Unavailable` within the timeout; once it resumes the
/// abandoned claims are skipped (nothing claimed) and traffic recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frozen_writer_times_out_then_recovers_without_charging() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir.path().join("l.redb"), 256, Duration::from_millis(300));
    let faults = ledger.faults();
    let token = levels(&[Some(3)]);
    ledger
        .claim(claim_request(&token, None, "chat"))
        .await
        .unwrap()
        .unwrap();
    faults.freeze();
    for _ in 0..3 {
        let err = ledger
            .claim(claim_request(&token, None, "chat"))
            .await
            .unwrap_err();
        assert!(
            matches!(err, LedgerError::Unavailable(ref m) if m == "timed out"),
            "{err:?}"
        );
    }
    let err = ledger.revoke(&token[0].revocation_id).await.unwrap_err();
    assert!(matches!(err, LedgerError::Unavailable(_)), "{err:?}");
    // Reads do not go through the writer.
    assert_eq!(used(&ledger, &token).await, vec![1]);
    faults.unfreeze();
    let c = ledger
        .claim(claim_request(&token, None, "chat"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        c.receipt.body().seq,
        2,
        "timed-out claims were never applied"
    );
    assert!(!ledger.usage(&token).await.unwrap()[0].revoked);
    assert_eq!(used(&ledger, &token).await, vec![2]);
    assert_eq!(chain_len(&ledger, &token[0].revocation_id).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_shorter_than_timeout_only_delays() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir.path().join("l.redb"), 256, Duration::from_secs(10));
    let token = levels(&[None]);
    ledger.faults().stall_for(Duration::from_millis(100));
    let c = ledger
        .claim(claim_request(&token, None, "chat"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.receipt.body().seq, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failed_commit_answers_unavailable_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Arc::new(open(
        &dir.path().join("l.redb"),
        256,
        Duration::from_secs(10),
    ));
    let faults = ledger.faults();
    let token = levels(&[Some(100), Some(50)]);
    ledger
        .claim(claim_request(&token, None, "chat"))
        .await
        .unwrap()
        .unwrap();
    faults.fail_commits(true);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let ledger = Arc::clone(&ledger);
            let req = claim_request(&token, None, "chat");
            tokio::spawn(async move { ledger.claim(req).await })
        })
        .collect();
    for t in tasks {
        let err = t.await.unwrap().unwrap_err();
        assert!(matches!(err, LedgerError::Unavailable(_)), "{err:?}");
    }
    assert!(matches!(
        ledger.revoke(&token[1].revocation_id).await,
        Err(LedgerError::Unavailable(_))
    ));
    assert_eq!(used(ledger.as_ref(), &token).await, vec![1, 1]);
    assert!(!ledger.usage(&token).await.unwrap()[1].revoked);
    faults.reset();
    let c = ledger
        .claim(claim_request(&token, None, "chat"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(c.receipt.body().seq, 2);
    assert_eq!(chain_len(ledger.as_ref(), &token[0].revocation_id).await, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_signing_is_an_error_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir.path().join("l.redb"), 256, Duration::from_secs(10));
    let faults = ledger.faults();
    let token = levels(&[Some(2)]);
    faults.fail_signing(true);
    let mut req = claim_request(&token, None, "chat");
    req.idempotency_key = Some("sig".into());
    let err = ledger.claim(req.clone()).await.unwrap_err();
    assert!(matches!(err, LedgerError::Signing(_)), "{err:?}");
    assert_eq!(used(&ledger, &token).await, vec![0]);
    assert_eq!(chain_len(&ledger, &token[0].revocation_id).await, 0);
    faults.fail_signing(false);
    // No idempotency record was stored: the same key makes a fresh claim.
    let c = ledger.claim(req).await.unwrap().unwrap();
    assert!(!c.replayed);
    assert_eq!(c.receipt.body().seq, 1);
}

/// A receipt too large to sign (the receipt format bounds its size) is a per-claim
/// `Signing` error, not a refusal, and writes nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsignable_receipt_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = open(&dir.path().join("l.redb"), 256, Duration::from_secs(10));
    let token = levels(&[None]);
    let mut req = claim_request(&token, None, "chat");
    req.request.path = "/".repeat(till_receipt::MAX_RECEIPT_LEN);
    let err = ledger.claim(req).await.unwrap_err();
    assert!(matches!(err, LedgerError::Signing(_)), "{err:?}");
    assert_eq!(used(&ledger, &token).await, vec![0]);
    ledger
        .claim(claim_request(&token, None, "chat"))
        .await
        .unwrap()
        .unwrap();
}

/// Issue 10 item 14: a schema-1 file (chain heads naming SHA-256 of the compact receipt)
/// is migrated on open: every head then names the receipt's link hash (its signing
/// input's), so the next receipt links correctly and the whole chain audits clean.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_1_chain_heads_are_migrated_to_the_link_hash() {
    use redb::{ReadableTable as _, TableDefinition};
    const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
    const CHAIN_HEADS: TableDefinition<&[u8], (u64, &str)> = TableDefinition::new("chain_heads");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let token = levels(&[Some(10)]);
    let family = token[0].revocation_id.clone();
    let receipts = {
        let ledger = open(&path, 1, Duration::from_secs(10));
        for _ in 0..2 {
            ledger
                .claim(claim_request(&token, None, "chat"))
                .await
                .unwrap()
                .unwrap();
        }
        ledger.receipts(&family, 1, 10).await.unwrap()
    };
    // Rewrite the file into the schema-1 layout: version 1, heads by compact hash,
    // receipts as compact JWS in `receipts`.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 1)
                .unwrap();
            to_schema_2_receipts(&txn, &family, &receipts);
            let compact = hex::encode(receipts[1].compact_hash());
            txn.open_table(CHAIN_HEADS)
                .unwrap()
                .insert(family.as_slice(), (2, compact.as_str()))
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let ledger = open(&path, 1, Duration::from_secs(10));
    let third = ledger
        .claim(claim_request(&token, None, "chat"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(third.receipt.body().prev, Some(receipts[1].hash_hex()));
    assert_eq!(chain_len(&ledger, &family).await, 3);
    drop(ledger);
    let db = redb::Database::open(&path).unwrap();
    let txn = db.begin_read().unwrap();
    let meta = txn.open_table(META).unwrap();
    assert_eq!(
        meta.get("schema_version").unwrap().unwrap().value(),
        till_ledger::SCHEMA_VERSION
    );
    let heads = txn.open_table(CHAIN_HEADS).unwrap();
    let head = heads.get(family.as_slice()).unwrap().unwrap();
    assert_eq!(head.value(), (3, third.receipt.hash_hex().as_str()));
    assert_eq!(heads.iter().unwrap().count(), 1);
}

/// Moves a family's receipts back into schema 2's table (`receipts`: compact JWS).
fn to_schema_2_receipts(txn: &redb::WriteTransaction, family: &[u8], receipts: &[Receipt]) {
    use redb::TableDefinition;
    const V2: TableDefinition<(&[u8], u64), &str> = TableDefinition::new("receipts");
    const V3: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("receipts_v3");
    let mut v2 = txn.open_table(V2).unwrap();
    for r in receipts {
        v2.insert((family, r.body().seq), r.compact()).unwrap();
    }
    drop(v2);
    txn.delete_table(V3).unwrap();
}

/// Schema 2 → 3: receipts move to `receipts_v3` as they are (signed), a JSON idempotency
/// record of schema 2 still replays, and new claims continue the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_2_receipts_are_migrated() {
    use redb::TableDefinition;
    const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
    const IDEM: TableDefinition<(&[u8], &str), &[u8]> = TableDefinition::new("idempotency");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let token = levels(&[Some(10)]);
    let family = token[0].revocation_id.clone();
    let keyed = claim_request(&token, Some("k-1"), "chat");
    let receipts = {
        let ledger = open(&path, 1, Duration::from_secs(10));
        ledger.claim(keyed.clone()).await.unwrap().unwrap();
        ledger
            .claim(claim_request(&token, None, "chat"))
            .await
            .unwrap()
            .unwrap();
        ledger.receipts(&family, 1, 10).await.unwrap()
    };
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            txn.open_table(META)
                .unwrap()
                .insert("schema_version", 2)
                .unwrap();
            to_schema_2_receipts(&txn, &family, &receipts);
            let legacy = serde_json::json!({
                "request": till_ledger::plan::request_fingerprint(&keyed.request),
                "receipt": receipts[0].compact(),
                "replays": 0,
            });
            txn.open_table(IDEM)
                .unwrap()
                .insert(
                    (family.as_slice(), "k-1"),
                    serde_json::to_vec(&legacy).unwrap().as_slice(),
                )
                .unwrap();
        }
        txn.commit().unwrap();
    }
    let ledger = open(&path, 1, Duration::from_secs(10));
    assert_eq!(ledger.receipts(&family, 1, 10).await.unwrap(), receipts);
    let replay = ledger.claim(keyed).await.unwrap().unwrap();
    assert!(replay.replayed);
    assert_eq!(replay.receipt, receipts[0]);
    let third = ledger
        .claim(claim_request(&token, None, "chat"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(third.receipt.body().prev, Some(receipts[1].hash_hex()));
    assert_eq!(chain_len(&ledger, &family).await, 3);
    drop(ledger);
    let checked = till_ledger::check_file(&path, &dir.path().join("scratch")).unwrap();
    assert_eq!(checked.schema_version, till_ledger::SCHEMA_VERSION);
    assert_eq!(checked.receipts, 3);
}

fn open_with(path: &Path, checks: &till_ledger::OpenChecks) -> Result<EmbeddedLedger, LedgerError> {
    EmbeddedLedger::open_checked(path, EmbeddedConfig::new(signer(), "test"), checks)
}

fn adopt() -> till_ledger::LedgerBinding {
    till_ledger::LedgerBinding::Adopt {
        new_id: till_ledger::new_ledger_id(signer().key_id()),
        kid: signer().key_id().to_owned(),
    }
}

/// Issue 10 item 11: a bound ledger writes its id once, puts it into every receipt, and
/// the bindings refuse an emptied, replaced or foreign file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ledger_id_is_bound_checked_and_in_every_receipt() {
    use till_ledger::{LedgerBinding, OpenChecks};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let token = levels(&[Some(5)]);
    let checks = OpenChecks {
        binding: adopt(),
        integrity: true,
    };
    let id = {
        let ledger = open_with(&path, &checks).unwrap();
        let id = ledger.ledger_id().unwrap().to_owned();
        assert!(id.ends_with(&format!("@{}", signer().key_id())), "{id}");
        let c = ledger
            .claim(claim_request(&token, None, "chat"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.receipt.body().ledger.as_deref(), Some(id.as_str()));
        id
    };
    // Adopt again: the stored id is kept (not replaced by the new candidate).
    assert_eq!(
        open_with(&path, &checks).unwrap().ledger_id(),
        Some(id.as_str())
    );
    // Expect: the right id opens; and an unbound open keeps using it in receipts.
    let expect = |id: &str| OpenChecks {
        binding: LedgerBinding::Expect(id.to_owned()),
        integrity: true,
    };
    drop(open_with(&path, &expect(&id)).unwrap());
    {
        let ledger = open(&path, 1, Duration::from_secs(10));
        assert_eq!(ledger.ledger_id(), Some(id.as_str()));
        let c = ledger
            .claim(claim_request(&token, None, "chat"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(c.receipt.body().ledger.as_deref(), Some(id.as_str()));
        assert_eq!(chain_len(&ledger, &token[0].revocation_id).await, 2);
    }
    let refused = |r: Result<EmbeddedLedger, LedgerError>, says: &str| match r {
        Err(LedgerError::Open { reason, .. }) => assert!(reason.contains(says), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    };
    // Another id expected: refused.
    refused(
        open_with(
            &path,
            &expect(&till_ledger::new_ledger_id(signer().key_id())),
        ),
        "not this data dir's ledger",
    );
    // Bound to another receipt key: refused by Adopt.
    refused(
        open_with(
            &path,
            &OpenChecks {
                binding: LedgerBinding::Adopt {
                    new_id: till_ledger::new_ledger_id("r-0000000000000000"),
                    kid: "r-0000000000000000".into(),
                },
                integrity: false,
            },
        ),
        "another receipt key",
    );
    // Emptied or missing while expected: refused, and nothing is created.
    std::fs::write(&path, b"").unwrap();
    refused(open_with(&path, &expect(&id)), "missing or empty");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    std::fs::remove_file(&path).unwrap();
    refused(open_with(&path, &expect(&id)), "missing or empty");
    assert!(!path.exists());
}

/// Issue 10 item 10: a truncated file is an error from every way of opening it (redb's
/// assertion is contained), and `check_file` says so without touching the file.
#[test]
fn truncated_file_is_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    drop(open(&path, 1, Duration::from_secs(1)));
    let data = std::fs::read(&path).unwrap();
    std::fs::write(&path, &data[..data.len() / 3]).unwrap();
    for checks in [
        till_ledger::OpenChecks::default(),
        till_ledger::OpenChecks {
            binding: adopt(),
            integrity: true,
        },
    ] {
        match open_with(&path, &checks) {
            Err(LedgerError::Open { reason, .. }) => {
                assert!(reason.contains("damaged"), "{reason}")
            }
            other => panic!("expected an open error, got {other:?}"),
        }
    }
    let scratch = dir.path().join("scratch");
    assert!(matches!(
        till_ledger::check_file(&path, &scratch),
        Err(LedgerError::Open { .. })
    ));
    assert!(!scratch.exists());
    assert_eq!(std::fs::read(&path).unwrap(), &data[..data.len() / 3]);
}

/// Issue 10 item 10: a ledger marked as having failed an integrity check stays refused
/// (even if redb repaired it on the way) until `repair_file`, which keeps a backup and
/// clears the mark; `check_file` reports the mark too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrity_failure_mark_is_sticky_until_repair() {
    use redb::TableDefinition;
    const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let token = levels(&[Some(5)]);
    {
        let ledger = open(&path, 1, Duration::from_secs(10));
        ledger
            .claim(claim_request(&token, None, "chat"))
            .await
            .unwrap()
            .unwrap();
    }
    let scratch = dir.path().join("scratch");
    let summary = till_ledger::check_file(&path, &scratch).unwrap();
    assert_eq!((summary.families, summary.receipts), (1, 1));
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(META)
            .unwrap()
            .insert("integrity_failed", 1_800_000_000)
            .unwrap();
        txn.commit().unwrap();
    }
    let checks = till_ledger::OpenChecks {
        binding: till_ledger::LedgerBinding::Unbound,
        integrity: true,
    };
    for _ in 0..2 {
        match open_with(&path, &checks) {
            Err(LedgerError::Open { reason, .. }) => {
                assert!(reason.contains("ledger repair"), "{reason}")
            }
            other => panic!("expected a refusal, got {other:?}"),
        }
    }
    assert!(till_ledger::check_file(&path, &scratch).is_err());
    let backup = dir.path().join("backup");
    let outcome = till_ledger::repair_file(&path, &backup).unwrap();
    assert!(outcome.was_clean && outcome.cleared_mark, "{outcome:?}");
    assert_eq!(outcome.summary.receipts, 1);
    assert!(backup.exists());
    let ledger = open_with(&path, &checks).unwrap();
    assert_eq!(chain_len(&ledger, &token[0].revocation_id).await, 1);
}

/// Issue 11: the writer stores bodies unsigned; the callers' signatures are stored back
/// with later batches (and at shutdown), and what is read back is what was returned —
/// signed again from the body where the signature is not stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signatures_are_stored_back_and_bodies_sign_alike() {
    use redb::{ReadableTable as _, TableDefinition};
    const V3: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("receipts_v3");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let token = levels(&[None, Some(100)]);
    let family = token[0].revocation_id.clone();
    let mut returned = Vec::new();
    {
        let ledger = open(&path, 64, Duration::from_secs(10));
        for _ in 0..10 {
            let claim = ledger
                .claim(claim_request(&token, None, "chat"))
                .await
                .unwrap()
                .unwrap();
            returned.push(claim.receipt);
        }
        assert_eq!(ledger.receipts(&family, 1, 100).await.unwrap(), returned);
    }
    let tags: Vec<u8> = {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_read().unwrap();
        let table = txn.open_table(V3).unwrap();
        let tags = table
            .iter()
            .unwrap()
            .map(|e| e.unwrap().1.value()[0])
            .collect();
        tags
    };
    // Every signature was stored back (the last ones at shutdown).
    assert_eq!(tags, vec![3; 10]);
    // Drop the signatures: the bodies sign to the very same receipts.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(V3).unwrap();
            for seq in 1..=10u64 {
                let value = table
                    .get((family.as_slice(), seq))
                    .unwrap()
                    .unwrap()
                    .value()
                    .to_vec();
                let mut unsigned = value[..value.len() - 64].to_vec();
                unsigned[0] = 2;
                table
                    .insert((family.as_slice(), seq), unsigned.as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let ledger = open(&path, 64, Duration::from_secs(10));
    assert_eq!(ledger.receipts(&family, 1, 100).await.unwrap(), returned);
    drop(ledger);
    // Another receipt key cannot sign them: a clear error, not a wrong receipt.
    let other = EmbeddedLedger::open(
        &path,
        EmbeddedConfig::new(Arc::new(ReceiptSigner::from_seed([5; 32])), "test"),
    )
    .unwrap();
    assert!(matches!(
        other.receipts(&family, 1, 100).await,
        Err(LedgerError::Signing(_))
    ));
}

/// Issue 11: a bounded ledger. Receipts beyond the retention are exported to JSON lines
/// and pruned with a signed checkpoint; the exported files plus the checkpoints and what
/// stays prove the whole chain; counters stay; a second export continues the first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn export_and_prune_keeps_an_auditable_chain() {
    use till_ledger::retention::{check_checkpoints, read_export, Retention};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let export = dir.path().join("receipts");
    let token = levels(&[None, Some(100)]);
    let family = token[0].revocation_id.clone();
    let family_hex = hex::encode(&family);
    let other = levels(&[Some(50)]);
    let ledger = open(&path, 64, Duration::from_secs(10));
    for i in 0..10 {
        let key = format!("k-{i}");
        ledger
            .claim(claim_request(&token, Some(&key), "chat"))
            .await
            .unwrap()
            .unwrap();
    }
    ledger
        .claim(claim_request(&other, None, "chat"))
        .await
        .unwrap()
        .unwrap();
    let keep3 = Retention {
        keep: Some(3),
        max_age_secs: None,
    };
    let report = ledger
        .export_and_prune(keep3, &export, 2_000)
        .await
        .unwrap();
    assert_eq!((report.families, report.exported, report.pruned), (1, 7, 7));
    assert_eq!(report.idempotency_removed, 7);
    let kept = ledger.receipts(&family, 1, 100).await.unwrap();
    assert_eq!(
        kept.iter().map(|r| r.body().seq).collect::<Vec<_>>(),
        vec![8, 9, 10]
    );
    // Counters are never pruned.
    let usage = ledger.usage(&token).await.unwrap();
    assert_eq!((usage[0].used, usage[1].used), (10, 10));
    // A pruned receipt's idempotency key is free again (a fresh claim), a kept one replays.
    let replay = ledger
        .claim(claim_request(&token, Some("k-9"), "chat"))
        .await
        .unwrap()
        .unwrap();
    assert!(replay.replayed);
    let fresh = ledger
        .claim(claim_request(&token, Some("k-0"), "chat"))
        .await
        .unwrap()
        .unwrap();
    assert!(!fresh.replayed);
    assert_eq!(fresh.receipt.body().seq, 11);

    let audit = |extra: Vec<till_receipt::Receipt>,
                 cps: Vec<till_ledger::retention::Checkpoint>| {
        let (mut chain, file_cps) = read_export(&export, &family_hex).unwrap();
        chain.extend(extra);
        audit_chain(&chain, &keys()).unwrap();
        assert_eq!(file_cps, cps);
        check_checkpoints(&chain, &cps, &keys()).unwrap()
    };
    let cps = ledger.checkpoints(&family).await.unwrap();
    assert_eq!(cps.len(), 1);
    assert_eq!(
        audit(ledger.receipts(&family, 1, 100).await.unwrap(), cps),
        7
    );

    // Again: the next range continues the first, nothing is written twice.
    let report = ledger
        .export_and_prune(keep3, &export, 2_000)
        .await
        .unwrap();
    assert_eq!((report.exported, report.pruned), (1, 1));
    let cps = ledger.checkpoints(&family).await.unwrap();
    assert_eq!(cps.len(), 2);
    assert_eq!(
        audit(ledger.receipts(&family, 1, 100).await.unwrap(), cps.clone()),
        8
    );
    // A forged or missing range is caught.
    let (chain, _) = read_export(&export, &family_hex).unwrap();
    assert!(check_checkpoints(&chain[1..], &cps, &keys()).is_err());
    assert!(check_checkpoints(&chain, &cps[1..], &keys()).is_err());

    // By age: everything older than the cutoff but the newest receipt of each family.
    let by_age = Retention {
        keep: None,
        max_age_secs: Some(0),
    };
    let report = ledger
        .export_and_prune(by_age, &export, 4_000_000_000)
        .await
        .unwrap();
    assert_eq!(report.pruned, 2);
    assert_eq!(ledger.receipts(&family, 1, 100).await.unwrap().len(), 1);
    drop(ledger);
    let checked = till_ledger::check_file(&path, &dir.path().join("scratch")).unwrap();
    assert_eq!(checked.receipts, 2);
    // Reopened, claims continue the chain after the pruned ranges.
    let ledger = open(&path, 64, Duration::from_secs(10));
    let next = ledger
        .claim(claim_request(&token, None, "chat"))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(next.receipt.body().seq, 12);
    let cps = ledger.checkpoints(&family).await.unwrap();
    audit(ledger.receipts(&family, 1, 100).await.unwrap(), cps);
}

fn void_of(family: &[u8], seq: u64) -> till_ledger::VoidRequest {
    till_ledger::VoidRequest {
        family: family.to_vec(),
        seq,
        now: 1_750_000_100,
        windows: Vec::new(),
    }
}

/// Issue 10 item 12, embedded specifics: a void receipt follows the claim pattern — stored
/// as a body, signed by the caller after the commit, the signature stored back, and
/// signed again alike from the body when the signature was lost (a crash between the
/// commit and the write-back); voids survive a reopen (a repeat is a no-op), `till ledger
/// check` accepts a family with voids, and export/prune checkpoints count them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn void_receipts_sign_back_survive_reopen_and_export() {
    use redb::{ReadableTable as _, TableDefinition};
    use till_ledger::retention::{check_checkpoints, read_export, Retention};
    const V3: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("receipts_v3");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.redb");
    let token = levels(&[Some(10)]);
    let family = token[0].revocation_id.clone();
    let mut returned = Vec::new();
    {
        let ledger = open(&path, 64, Duration::from_secs(10));
        for i in 0..5 {
            let key = format!("k-{i}");
            let claim = ledger
                .claim(claim_request(&token, Some(&key), "chat"))
                .await
                .unwrap()
                .unwrap();
            returned.push(claim.receipt);
        }
        for seq in [2, 4] {
            let v = ledger.void(void_of(&family, seq)).await.unwrap();
            assert!(v.newly);
            returned.push(v.receipt);
        }
        let claim = ledger
            .claim(claim_request(&token, Some("k-5"), "chat"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(claim.receipt.body().seq, 8);
        assert_eq!(claim.receipt.body().slots[0].slot, 4);
        returned.push(claim.receipt);
        assert_eq!(ledger.receipts(&family, 1, 100).await.unwrap(), returned);
    }
    // Every signature, the voids' included, was stored back; drop the voids' signatures.
    {
        let db = redb::Database::open(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(V3).unwrap();
            let tags: Vec<u8> = table
                .iter()
                .unwrap()
                .map(|e| e.unwrap().1.value()[0])
                .collect();
            assert_eq!(tags, vec![3; 8]);
            for seq in [6u64, 7] {
                let value = table
                    .get((family.as_slice(), seq))
                    .unwrap()
                    .unwrap()
                    .value()
                    .to_vec();
                let mut unsigned = value[..value.len() - 64].to_vec();
                unsigned[0] = 2;
                table
                    .insert((family.as_slice(), seq), unsigned.as_slice())
                    .unwrap();
            }
        }
        txn.commit().unwrap();
    }
    let checked = till_ledger::check_file(&path, &dir.path().join("scratch")).unwrap();
    assert_eq!(checked.receipts, 8);
    let ledger = open(&path, 64, Duration::from_secs(10));
    assert_eq!(ledger.receipts(&family, 1, 100).await.unwrap(), returned);
    let again = ledger.void(void_of(&family, 2)).await.unwrap();
    assert!(!again.newly);
    assert_eq!(again.receipt.compact(), returned[5].compact());
    assert_eq!(used(&ledger, &token).await, vec![4]);

    // Export and prune 1..=6 (keep 2): the checkpoint counts the two voids... of which
    // one (seq 7) stays in the ledger: the range holds one.
    let export = dir.path().join("receipts");
    let report = ledger
        .export_and_prune(
            Retention {
                keep: Some(2),
                max_age_secs: None,
            },
            &export,
            2_000,
        )
        .await
        .unwrap();
    assert_eq!(report.pruned, 6);
    assert_eq!((report.exported, report.voids), (6, 1));
    let cps = ledger.checkpoints(&family).await.unwrap();
    assert_eq!(cps.len(), 1);
    assert_eq!((cps[0].body.count, cps[0].body.voids), (6, 1));
    let (mut chain, _) = read_export(&export, &hex::encode(&family)).unwrap();
    chain.extend(ledger.receipts(&family, 1, 100).await.unwrap());
    let audit = audit_chain(&chain, &keys()).unwrap();
    assert_eq!((audit.claims, audit.voids, audit.charged), (6, 2, 4));
    assert_eq!(check_checkpoints(&chain, &cps, &keys()).unwrap(), 6);
    // A pruned claim cannot be voided (nor voided again: its void receipt is exported).
    for seq in [3, 2] {
        assert!(matches!(
            ledger.void(void_of(&family, seq)).await,
            Err(LedgerError::NotVoidable(_))
        ));
    }
    assert_eq!(used(&ledger, &token).await, vec![4]);
}

//! revoke, usage, receipt verify, audit (issue #3 acceptance): claims driven through the
//! library on a data dir, then the real binaries read the same ledger.

use std::sync::Arc;

use till_ledger::{ClaimRequest, EmbeddedConfig, EmbeddedLedger, Ledger, Level, Refusal};
use till_receipt::{ReceiptSigner, RequestDigest};
use till_token::{verify, KeyRing, Limits, RootPublicKey};

use crate::fixture::Till;

fn levels(t: &Till, key: &str) -> Vec<Level> {
    let ring = KeyRing::with(
        RootPublicKey::from_jwk(
            &std::fs::read_to_string(t.data_dir().join("root.pub.jwk")).unwrap(),
        )
        .unwrap(),
    );
    let v = verify(key, &ring, &Limits::default()).unwrap();
    v.blocks()
        .iter()
        .map(|b| Level {
            revocation_id: b.revocation_id.clone(),
            cap: b.caveats.cap,
        })
        .collect()
}

fn open(t: &Till) -> EmbeddedLedger {
    let signer = ReceiptSigner::from_private_jwk(
        &std::fs::read_to_string(t.data_dir().join("receipt.key.jwk")).unwrap(),
    )
    .unwrap();
    EmbeddedLedger::open(
        t.data_dir().join("ledger.redb"),
        EmbeddedConfig::new(Arc::new(signer), "test"),
    )
    .unwrap()
}

async fn claim(ledger: &EmbeddedLedger, levels: &[Level], n: u32) -> Result<String, Refusal> {
    let req = ClaimRequest {
        levels: levels.to_vec(),
        idempotency_key: None,
        request: RequestDigest {
            method: "POST".into(),
            upstream: "openai".into(),
            path: format!("/v1/chat/completions/{n}"),
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
    ledger
        .claim(req)
        .await
        .unwrap()
        .map(|c| c.receipt.compact().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_audit_and_revoke_through_the_binary() {
    let t = Till::new();
    let parent = t.minted(&["--upstream", "openai", "--cap", "10"]);
    let child = t.run(&["attenuate", &parent, "--cap", "3"]).ok();
    let sibling = t.run(&["attenuate", &parent, "--cap", "4"]).ok();
    let (lp, lc, ls) = (
        levels(&t, &parent),
        levels(&t, &child),
        levels(&t, &sibling),
    );

    let mut last_receipt = String::new();
    {
        let ledger = open(&t);
        for i in 0..3 {
            last_receipt = claim(&ledger, &lc, i).await.unwrap();
        }
        assert!(matches!(
            claim(&ledger, &lc, 99).await,
            Err(Refusal::CapReached { block: 1, cap: 3 })
        ));
        for i in 0..2 {
            claim(&ledger, &ls, 10 + i).await.unwrap();
        }
        claim(&ledger, &lp, 20).await.unwrap();
    } // drop: releases the ledger file lock

    let u = t.run(&["usage", &child, "--json"]).json();
    assert_eq!(u["blocks"][0]["used"], 6, "{u}");
    assert_eq!(u["blocks"][0]["cap"], 10);
    assert_eq!(u["blocks"][0]["remaining"], 4);
    assert_eq!(u["blocks"][1]["used"], 3);
    assert_eq!(u["blocks"][1]["remaining"], 0);
    let u = t.run(&["usage", &sibling, "--json"]).json();
    assert_eq!(u["blocks"][1]["used"], 2);
    let text = t.run(&["usage", &parent]).ok();
    assert!(text.contains("active"), "{text}");

    let a = t.run(&["audit", &child, "--json"]).json();
    assert_eq!(a["clean"], true, "{a}");
    assert_eq!(a["report"]["receipts"], 6);

    let v = t
        .run(&["receipt", "verify", &last_receipt, "--json"])
        .json();
    assert_eq!(v["valid"], true);
    assert_eq!(v["body"]["slots"][1]["slot"], 3);
    let mut forged = last_receipt.clone().into_bytes();
    let mid = forged.len() / 2;
    forged[mid] = if forged[mid] == b'A' { b'B' } else { b'A' };
    t.run(&["receipt", "verify", &String::from_utf8(forged).unwrap()])
        .fails_with(3);

    t.run(&["revoke", &child]).ok();
    let u = t.run(&["usage", &child, "--json"]).json();
    assert_eq!(u["blocks"][1]["revoked"], true);
    assert_eq!(u["blocks"][0]["revoked"], false);
    {
        let ledger = open(&t);
        assert!(matches!(
            claim(&ledger, &lc, 30).await,
            Err(Refusal::Revoked { block: 1 })
        ));
        claim(&ledger, &lp, 31).await.unwrap();
        claim(&ledger, &ls, 32).await.unwrap();
    }
    let a = t.run(&["audit", &parent, "--json"]).json();
    assert_eq!(a["clean"], true, "{a}");
    assert_eq!(a["report"]["receipts"], 8);
}

#[test]
fn revoke_validates_its_argument() {
    let t = Till::new();
    t.run(&["keygen"]).ok();
    let err = t.run(&["revoke", "abcd"]).fails_with(2);
    assert!(err.contains("64 bytes"), "{err}");
    let err = t.run(&["revoke", "not-hex"]).fails_with(2);
    assert!(err.contains("revocation id"), "{err}");
    let err = t
        .run(&["usage", "till_AAAA", "--ledger", "postgres"])
        .code();
    assert_ne!(err, 0);
}

/// Issue 10 item 12: `till audit` counts and lists void receipts (claims given back
/// because the upstream was unreachable), `till receipt verify` names what a void gives
/// back, and the ledger's counters agree with the net charge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_prints_voids() {
    let t = Till::new();
    let key = t.minted(&["--upstream", "openai", "--cap", "2"]);
    let lk = levels(&t, &key);
    let void_receipt = {
        let ledger = open(&t);
        claim(&ledger, &lk, 1).await.unwrap();
        claim(&ledger, &lk, 2).await.unwrap();
        let voided = ledger
            .void(till_ledger::VoidRequest {
                family: lk[0].revocation_id.clone(),
                seq: 1,
                now: 1_800_000_001,
                windows: Vec::new(),
            })
            .await
            .unwrap();
        // The slot given back is taken again: the cap of 2 is exact.
        claim(&ledger, &lk, 3).await.unwrap();
        assert!(matches!(
            claim(&ledger, &lk, 4).await,
            Err(Refusal::CapReached { block: 0, cap: 2 })
        ));
        voided.receipt.compact().to_string()
    };
    let a = t.run(&["audit", &key, "--json"]).json();
    assert_eq!(a["clean"], true, "{a}");
    assert_eq!(a["report"]["receipts"], 4, "{a}");
    assert_eq!(a["report"]["claims"], 3, "{a}");
    assert_eq!(a["report"]["voids"], 1, "{a}");
    assert_eq!(a["report"]["charged"], 2, "{a}");
    assert_eq!(a["report"]["levels"][0]["used"], 2, "{a}");
    assert_eq!(a["voids"][0]["seq"], 3, "{a}");
    assert_eq!(a["voids"][0]["void"], 1, "{a}");
    let text = t.run(&["audit", &key]).ok();
    assert!(text.contains("claims:   3, voids: 1, charged: 2"), "{text}");
    assert!(text.contains("void at seq 3: claim 1 given back"), "{text}");
    assert!(text.contains("audit clean"), "{text}");
    let v = t.run(&["receipt", "verify", &void_receipt]).ok();
    assert!(v.contains("gives back the slot of claim 1"), "{v}");
}

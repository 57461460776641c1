//! Caps, delegation, key failures and scope refusals through the proxy.

use std::time::Duration;

use till_receipt::{Receipt, ReceiptKeySet};
use till_token::Caveats;

use crate::support::{client, error_code, metrics_text, up_config, Till, Upstream};

async fn claims_total(till: &Till) -> u64 {
    let text = metrics_text(&till.url).await;
    text.lines()
        .filter(|l| l.starts_with("till_claims_total{"))
        .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cap_5_with_50_concurrent_requests_forwards_exactly_5() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint_up(Some(5));
    let http = client();
    let mut tasks = Vec::new();
    for i in 0..50 {
        let http = http.clone();
        let url = format!("{}/up/v1/echo", till.url);
        let key = key.clone();
        tasks.push(tokio::spawn(async move {
            let resp = http
                .post(url)
                .bearer_auth(key)
                .body(format!("{{\"n\":{i}}}"))
                .send()
                .await
                .unwrap();
            let status = resp.status().as_u16();
            let receipt = resp
                .headers()
                .get("till-receipt")
                .map(|v| v.to_str().unwrap().to_string());
            let code = if status == 200 {
                "ok".to_string()
            } else {
                error_code(resp).await
            };
            (status, code, receipt)
        }));
    }
    let mut ok = Vec::new();
    let mut refused = 0;
    for t in tasks {
        let (status, code, receipt) = tokio::time::timeout(Duration::from_secs(30), t)
            .await
            .unwrap()
            .unwrap();
        match status {
            200 => ok.push(receipt.expect("a receipt on success")),
            403 => {
                assert_eq!(code, "activation_limit_reached");
                refused += 1;
            }
            other => panic!("unexpected status {other} ({code})"),
        }
    }
    assert_eq!(ok.len(), 5);
    assert_eq!(refused, 45);
    assert_eq!(upstream.hits(), 5, "upstream hits must equal claimed slots");
    assert_eq!(till.usage(&key).await, vec![5]);
    // Every receipt verifies, and the slots are exactly 1..=5.
    let mut keys = ReceiptKeySet::new();
    keys.insert(till.signer.public_key());
    let mut slots: Vec<u64> = ok
        .iter()
        .map(|r| {
            let r = Receipt::parse(r).unwrap();
            r.verify(&keys).unwrap();
            r.body().slots[0].slot
        })
        .collect();
    slots.sort();
    assert_eq!(slots, vec![1, 2, 3, 4, 5]);
}

#[tokio::test]
async fn sub_token_and_parent_caps_both_hold() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let parent = till_token::mint(
        &till.root,
        Caveats {
            upstream: Some("up".into()),
            cap: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    let (child, _) = parent
        .attenuate(Caveats {
            cap: Some(2),
            ..Default::default()
        })
        .unwrap();
    let parent = parent.to_key_string().unwrap();
    let child = child.to_key_string().unwrap();
    let http = client();
    let send = |key: String| {
        let http = http.clone();
        let url = format!("{}/up/v1/x", till.url);
        async move { http.get(url).bearer_auth(key).send().await.unwrap() }
    };
    let r = send(child.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["till-activations-remaining"], "1");
    assert_eq!(send(child.clone()).await.status(), 200);
    let r = send(child.clone()).await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "activation_limit_reached");
    // The parent has one activation left (3 - 2), then none.
    let r = send(parent.clone()).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["till-activations-remaining"], "0");
    let r = send(parent.clone()).await;
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "activation_limit_reached");
    assert_eq!(till.usage(&child).await, vec![3, 2]);
    assert_eq!(upstream.hits(), 3);
}

#[tokio::test]
async fn uncapped_keys_get_no_remaining_header() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let r = client()
        .get(format!("{}/up/v1/x", till.url))
        .bearer_auth(till.mint_up(None))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().get("till-activations-remaining").is_none());
    assert!(r.headers().get("till-receipt").is_some());
    assert!(r.headers().get("till-replayed").is_none());
}

#[tokio::test]
async fn bad_keys_get_401_with_specific_codes_and_no_ledger_access() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let good = till.mint_up(Some(5));
    let other_root = till_token::RootKey::generate();
    let foreign = till_token::mint(
        &other_root,
        Caveats {
            upstream: Some("up".into()),
            ..Default::default()
        },
    )
    .unwrap()
    .to_key_string()
    .unwrap();
    let mut tampered = good.clone().into_bytes();
    let mid = tampered.len() / 2;
    tampered[mid] = if tampered[mid] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let cases: Vec<(String, &[&str])> = vec![
        (
            good[..good.len() / 2].to_string(),
            &["key_malformed", "key_signature_invalid"],
        ),
        (tampered, &["key_malformed", "key_signature_invalid"]),
        ("till_!!!not-base64!!!".into(), &["key_malformed"]),
        ("sk-not-a-till-key".into(), &["key_malformed"]),
        (foreign, &["key_unknown_root", "key_signature_invalid"]),
        (format!("till_{}", "A".repeat(20_000)), &["key_too_large"]),
    ];
    let http = client();
    for (key, codes) in cases {
        let r = http
            .get(format!("{}/up/v1/x", till.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 401, "{}", &key[..key.len().min(40)]);
        assert!(r.headers().get("www-authenticate").is_some());
        let code = error_code(r).await;
        assert!(codes.contains(&code.as_str()), "{code} not in {codes:?}");
    }
    let r = http
        .get(format!("{}/up/v1/x", till.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(r).await, "key_missing");
    assert_eq!(
        claims_total(&till).await,
        0,
        "no claim may be attempted for a bad key"
    );
    assert_eq!(till.usage(&good).await, vec![0]);
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn out_of_scope_requests_get_403_and_claim_nothing() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint(Caveats {
        upstream: Some("up".into()),
        methods: Some(vec!["POST".into()]),
        paths: Some(vec!["/v1/chat".into()]),
        models: Some(vec!["gpt-4o-mini".into()]),
        cap: Some(10),
        ..Default::default()
    });
    let expired = till.mint(Caveats {
        upstream: Some("up".into()),
        expires: Some(1_000),
        ..Default::default()
    });
    let other_upstream = till.mint(Caveats {
        upstream: Some("other".into()),
        ..Default::default()
    });
    let http = client();
    let url = |p: &str| format!("{}/up{p}", till.url);
    let body = r#"{"model":"gpt-4o-mini","messages":[]}"#;
    let cases = vec![
        (
            http.get(url("/v1/chat/completions")).bearer_auth(&key),
            403,
            "method_not_allowed",
        ),
        (
            http.post(url("/v1/embeddings"))
                .bearer_auth(&key)
                .body(body),
            403,
            "path_not_allowed",
        ),
        (
            http.post(url("/v1/chatty")).bearer_auth(&key).body(body),
            403,
            "path_not_allowed",
        ),
        (
            http.post(url("/v1/chat/completions"))
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body(r#"{"model":"gpt-4o"}"#),
            403,
            "model_not_allowed",
        ),
        (
            http.post(url("/v1/chat/completions"))
                .bearer_auth(&key)
                .header("content-type", "application/json")
                .body("{}"),
            403,
            "model_required",
        ),
        (
            http.get(url("/v1/x")).bearer_auth(&expired),
            401,
            "key_expired",
        ),
        (
            http.get(url("/v1/x")).bearer_auth(&other_upstream),
            403,
            "upstream_not_allowed",
        ),
    ];
    for (req, status, code) in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), status, "{code}");
        assert_eq!(error_code(r).await, code);
    }
    assert_eq!(till.usage(&key).await, vec![0]);
    assert_eq!(claims_total(&till).await, 0);
    assert_eq!(upstream.hits(), 0);
    // And the same key in scope works.
    let r = http
        .post(url("/v1/chat/completions"))
        .bearer_auth(&key)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(till.usage(&key).await, vec![1]);
    let receipt = Receipt::parse(r.headers()["till-receipt"].to_str().unwrap()).unwrap();
    assert_eq!(receipt.body().request.model.as_deref(), Some("gpt-4o-mini"));
    assert_eq!(receipt.body().request.path, "/v1/chat/completions");
}

#[tokio::test]
async fn idempotent_replay_is_not_charged_and_returns_the_original_receipt() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint_up(Some(3));
    let http = client();
    let send = || {
        http.post(format!("{}/up/v1/pay", till.url))
            .bearer_auth(&key)
            .header("idempotency-key", "order-77")
            .body("{\"amount\":1}")
            .send()
    };
    let a = send().await.unwrap();
    assert_eq!(a.status(), 200);
    let b = send().await.unwrap();
    assert_eq!(b.status(), 200);
    assert_eq!(b.headers()["till-replayed"], "true");
    assert_eq!(a.headers()["till-receipt"], b.headers()["till-receipt"]);
    assert_eq!(till.usage(&key).await, vec![1]);
    // The upstream sees the client's Idempotency-Key (its own replay protection).
    assert!(upstream
        .seen()
        .iter()
        .all(|s| s.header("idempotency-key") == Some("order-77")));
    // Same key, different request: conflict.
    let c = http
        .post(format!("{}/up/v1/pay", till.url))
        .bearer_auth(&key)
        .header("idempotency-key", "order-77")
        .body("{\"amount\":2}")
        .send()
        .await
        .unwrap();
    assert_eq!(c.status(), 409);
    assert_eq!(error_code(c).await, "idempotency_key_conflict");
}

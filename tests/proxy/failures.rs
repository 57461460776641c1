//! Upstream and ledger failures.

use std::time::Duration;

use crate::support::{client, error_code, metrics_text, up_config, Till, Upstream};

#[tokio::test]
async fn refused_connection_is_502_and_hang_is_504() {
    let upstream = Upstream::start().await;
    // A port with nothing listening.
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let toml = format!(
        "[limits]\nupstream_response_timeout = \"1s\"\n{}\n[upstreams.dead]\nbase_url = \"http://{dead}\"\ncredential_env = \"UP_SECRET\"\nauth = {{ header = \"authorization\", scheme = \"Bearer\" }}\n",
        up_config(&upstream)
    );
    let till = Till::start(&toml).await;
    let http = client();
    let dead_key = till.mint(till_token::Caveats {
        upstream: Some("dead".into()),
        cap: Some(5),
        ..Default::default()
    });
    let r = http
        .get(format!("{}/dead/v1/x", till.url))
        .bearer_auth(&dead_key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(error_code(r).await, "upstream_unreachable");
    let key = till.mint_up(Some(5));
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        http.post(format!("{}/up/v1/hang", till.url))
            .bearer_auth(&key)
            .body("{}")
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(error_code(r).await, "upstream_timeout");
    // A 5xx from the upstream is the upstream's answer: passed through, not retried.
    let r = http
        .post(format!("{}/up/v1/fail", till.url))
        .bearer_auth(&key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 500);
    assert!(r.headers().get("till-receipt").is_some());
    assert_eq!(r.text().await.unwrap(), r#"{"error":"boom"}"#);
    assert_eq!(
        upstream.hits(),
        2,
        "one hit each for hang and fail: no retries"
    );
    // The slots stay spent: the claim came before forwarding.
    assert_eq!(till.usage(&key).await, vec![2]);
}

#[tokio::test]
async fn ledger_unavailable_is_503_with_retry_after_and_nothing_forwarded() {
    let upstream = Upstream::start().await;
    let toml = format!(
        "[limits]\nledger_claim_timeout = \"300ms\"\n{}",
        up_config(&upstream)
    );
    let till = Till::start(&toml).await;
    let key = till.mint_up(Some(5));
    let http = client();
    let faults = till.ledger.faults();
    faults.freeze();
    let r = tokio::time::timeout(
        Duration::from_secs(10),
        http.get(format!("{}/up/v1/x", till.url))
            .bearer_auth(&key)
            .send(),
    )
    .await
    .unwrap()
    .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(error_code(r).await, "ledger_unavailable");
    faults.unfreeze();
    faults.fail_commits(true);
    let r = http
        .get(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    faults.fail_commits(false);
    faults.fail_signing(true);
    let r = http
        .get(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(
        upstream.hits(),
        0,
        "nothing forwarded while the ledger cannot decide"
    );
    assert_eq!(till.usage(&key).await, vec![0], "nothing claimed");
    // Recovery without restart.
    faults.reset();
    let r = http
        .get(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(till.usage(&key).await, vec![1]);
    assert_eq!(upstream.hits(), 1);
}

#[tokio::test]
async fn health_readiness_and_metrics() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let http = client();
    let r = http
        .get(format!("{}/_till/health", till.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("{}/_till/ready", till.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let key = till.mint_up(Some(1));
    for _ in 0..2 {
        http.get(format!("{}/up/v1/x", till.url))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap();
    }
    let text = metrics_text(&till.url).await;
    assert!(
        text.contains("till_requests_total{upstream=\"up\",status=\"200\",code=\"ok\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("till_requests_total{upstream=\"up\",status=\"403\",code=\"activation_limit_reached\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("till_claims_total{outcome=\"claimed\"} 1"),
        "{text}"
    );
    assert!(
        text.contains("till_request_duration_seconds_count 2"),
        "{text}"
    );
    // Upstream latency per upstream, claim latency, and the verify cache (1 miss, 1 hit).
    for want in [
        "till_upstream_duration_seconds_count{upstream=\"up\"} 1",
        "till_ledger_claim_duration_seconds_count 2",
        "till_verify_cache_lookups_total{outcome=\"miss\"} 1",
        "till_verify_cache_lookups_total{outcome=\"hit\"} 1",
        "till_alerts_fired_total 0",
        "till_event_subscribers 0",
    ] {
        assert!(text.contains(want), "missing {want}: {text}");
    }
}

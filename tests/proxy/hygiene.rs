//! Header hygiene and SSRF: only the injected credential reaches the configured upstream.

use crate::support::{client, error_code, raw_exchange, up_config, Till, Upstream, SECRET};

#[tokio::test]
async fn upstream_sees_only_the_injected_credential() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint_up(Some(5));
    let r = client()
        .post(format!(
            "{}/up/v1/chat/completions?stream=true&key={key}",
            till.url
        ))
        .header("authorization", format!("Bearer {key}"))
        .header("x-api-key", "sk-client-own-key")
        .header("x-goog-api-key", "client-goog-key")
        .header("cookie", "session=client-cookie")
        .header("proxy-authorization", "Basic Y2xpZW50")
        .header("proxy-custom", "1")
        .header("connection", "keep-alive, x-secret-hop")
        .header("x-secret-hop", "hop-value")
        .header("keep-alive", "timeout=5")
        .header("te", "trailers")
        .header("forwarded", "for=6.6.6.6")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("x-real-ip", "6.6.6.6")
        .header("till-replayed", "true")
        .header("content-type", "application/json")
        .header("openai-beta", "assistants=v2")
        .body(r#"{"model":"gpt-4o-mini"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // Hop-by-hop headers of the upstream's response do not come back.
    assert!(r.headers().get("x-upstream-hop").is_none());
    assert_eq!(upstream.hits(), 1);
    let seen = &upstream.seen()[0];
    assert_eq!(
        seen.header("authorization"),
        Some(format!("Bearer {SECRET}").as_str())
    );
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.uri, "/v1/chat/completions?stream=true");
    assert_eq!(seen.header("content-type"), Some("application/json"));
    assert_eq!(seen.header("openai-beta"), Some("assistants=v2"));
    assert_eq!(
        seen.header("host"),
        Some(upstream.addr.to_string().as_str())
    );
    for (name, value) in &seen.headers {
        assert!(!value.contains(&key[..40]), "Till key leaked in {name}");
        for leaked in [
            "sk-client-own-key",
            "client-goog-key",
            "client-cookie",
            "Y2xpZW50",
            "hop-value",
            "6.6.6.6",
            "evil",
        ] {
            assert!(
                !value.contains(leaked),
                "{leaked} leaked in {name}: {value}"
            );
        }
        for banned in [
            "x-api-key",
            "x-goog-api-key",
            "cookie",
            "proxy-authorization",
            "proxy-custom",
            "x-secret-hop",
            "te",
            "forwarded",
            "till-replayed",
        ] {
            assert_ne!(name, banned);
        }
        assert!(!name.starts_with("x-forwarded") && name != "x-real-ip" && name != "keep-alive");
    }
    assert!(!seen.uri.contains("till_"));
}

#[tokio::test]
async fn query_and_x_api_key_placements_are_accepted_too() {
    let upstream = Upstream::start().await;
    let toml = format!(
        "[upstreams.gem]\npreset = \"gemini\"\nbase_url = \"{u}\"\ncredential_env = \"UP_SECRET\"\n\
         [upstreams.ant]\npreset = \"anthropic\"\nbase_url = \"{u}\"\ncredential_env = \"UP_SECRET\"\n",
        u = upstream.url()
    );
    let till = Till::start(&toml).await;
    let gem = till.mint(till_token::Caveats {
        upstream: Some("gem".into()),
        models: Some(vec!["gemini-pro".into()]),
        ..Default::default()
    });
    let http = client();
    let r = http
        .post(format!(
            "{}/gem/v1beta/models/gemini-pro:generateContent?key={gem}&alt=sse",
            till.url
        ))
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.seen().pop().unwrap();
    assert_eq!(
        seen.uri,
        "/v1beta/models/gemini-pro:generateContent?alt=sse"
    );
    assert_eq!(seen.header("x-goog-api-key"), Some(SECRET));
    // The model comes from the Gemini path.
    let r = http
        .post(format!(
            "{}/gem/v1beta/models/gemini-ultra:generateContent?key={gem}",
            till.url
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "model_not_allowed");
    let ant = till.mint(till_token::Caveats {
        upstream: Some("ant".into()),
        ..Default::default()
    });
    let r = http
        .post(format!("{}/ant/v1/messages", till.url))
        .header("x-api-key", &ant)
        .header("anthropic-version", "2023-06-01")
        .body(r#"{"model":"claude"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let seen = upstream.seen().pop().unwrap();
    assert_eq!(seen.header("x-api-key"), Some(SECRET));
    assert_eq!(seen.header("anthropic-version"), Some("2023-06-01"));
    assert!(seen.header("authorization").is_none());
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn ssrf_attempts_reach_only_the_configured_upstream() {
    let upstream = Upstream::start().await;
    let evil = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint_up(None);
    let http = client();
    // Host override: ignored; the request goes to the configured upstream.
    let r = http
        .get(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .header("host", evil.addr.to_string())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(upstream.hits(), 1);
    // Absolute-form target naming another host: refused, connection closed.
    let req = format!(
        "GET http://{}/up/v1/x HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer {key}\r\n\r\n",
        evil.addr, evil.addr
    );
    let (resp, closed) = raw_exchange(till.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert!(resp.contains("absolute_target"), "{resp}");
    assert!(closed);
    // Path tricks.
    for path in [
        "/up/../up/v1/x",
        "/up/v1/%2e%2e/x",
        "/up/v1%2Fx",
        "/up/v1%5Cx",
        "/up//v1/x",
        "/up/v1/a%00b",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n");
        let (resp, _) = raw_exchange(till.addr, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{path}: {resp}");
        assert!(resp.contains("bad_path"), "{path}: {resp}");
    }
    // Unknown upstream names are never resolved as hosts.
    let r = http
        .get(format!("{}/127.0.0.1:{}/x", till.url, evil.addr.port()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    // Redirects are returned, never followed.
    upstream.set_redirect(&format!("{}/stolen", evil.url()));
    let r = http
        .get(format!("{}/up/v1/redirect", till.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    assert_eq!(
        r.headers()["location"],
        format!("{}/stolen", evil.url()).as_str()
    );
    assert_eq!(evil.hits(), 0, "the other host must never be contacted");
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test]
async fn idempotency_keys_with_bad_bytes_are_refused_before_any_claim() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint_up(Some(5));
    let http = client();
    for bad in ["x".repeat(256), "caf\u{e9}".to_string()] {
        let r = http
            .post(format!("{}/up/v1/x", till.url))
            .bearer_auth(&key)
            .header(
                "idempotency-key",
                reqwest::header::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(error_code(r).await, "bad_idempotency_key");
    }
    // A CR inside a header value never gets as far as Till's handler.
    let req = format!("POST /up/v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nIdempotency-Key: a\rX-Injected: 1\r\nContent-Length: 0\r\n\r\n");
    let (resp, _) = raw_exchange(till.addr, req.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
    assert_eq!(till.usage(&key).await, vec![0]);
    assert_eq!(upstream.hits(), 0);
}

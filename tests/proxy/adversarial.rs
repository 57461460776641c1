//! Regression tests for the adversarial-test findings of issue 10 (proxy side): each test
//! is named after what it proves and says which item it covers.

use std::time::Duration;

use till_receipt::{Receipt, ReceiptKeySet};
use till_token::Caveats;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

use crate::support::{client, error_code, raw_exchange, up_config, Till, Upstream, SECRET};

fn model_key(till: &Till) -> String {
    till.mint(Caveats {
        upstream: Some("up".into()),
        models: Some(vec!["gpt-4o-mini".into()]),
        cap: Some(10),
        ..Default::default()
    })
}

/// Item 1: an `Upgrade` request on a proxied route is refused (and the connection
/// closed); after an `Upgrade` request elsewhere, the framing guard still holds for the
/// next request of the same keep-alive connection.
#[tokio::test]
async fn upgrade_is_refused_and_framing_holds_after_an_upgrade() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint_up(Some(5));
    let upgrade = format!(
        "GET /up/v1/ws HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
    );
    let (out, closed) = raw_exchange(till.addr, upgrade.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("upgrade_not_allowed"), "{out}");
    assert!(closed, "the connection is closed after a refused upgrade");
    // An upgrade request that is not proxied, answered, then a smuggling attempt on the
    // same keep-alive connection: refused as bad framing, never forwarded.
    let mut s = TcpStream::connect(till.addr).await.unwrap();
    s.write_all(
        b"GET /_till/health HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .await
    .unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let smuggle = format!(
        "POST /up/v1/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    );
    s.write_all(smuggle.as_bytes()).await.unwrap();
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .unwrap()
        .unwrap();
    let second = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(second.starts_with("HTTP/1.1 400"), "{second}");
    assert!(second.contains("bad_framing"), "{second}");
    assert_eq!(upstream.hits(), 0);
    assert_eq!(till.usage(&key).await, vec![0]);
}

/// Item 2: `model` twice in any letter case (Go's `encoding/json` takes the last
/// case-insensitive match) is refused before any claim.
#[tokio::test]
async fn case_variant_model_keys_are_refused() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = model_key(&till);
    let http = client();
    for body in [
        r#"{"model":"gpt-4o-mini","MODEL":"gpt-4o"}"#,
        r#"{"model":"gpt-4o-mini","Model":"gpt-4o"}"#,
        r#"{"model":"gpt-4o-mini","model":"gpt-4o"}"#,
        r#"{"model":"gpt-4o-mini","mod\u0065l":"gpt-4o"}"#,
        r#"{"model":"gpt-4o-mini","n":1,"n":2}"#,
    ] {
        let r = http
            .post(format!("{}/up/v1/chat/completions", till.url))
            .bearer_auth(&key)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 400, "{body}");
        assert_eq!(error_code(r).await, "body_ambiguous", "{body}");
    }
    assert_eq!(upstream.hits(), 0);
    assert_eq!(till.usage(&key).await, vec![0]);
}

/// Item 3: when a caveat reads the body, only JSON content types are accepted.
#[tokio::test]
async fn non_json_content_type_is_refused_when_a_caveat_reads_the_body() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = model_key(&till);
    let http = client();
    let body = r#"{"model":"gpt-4o-mini"}"#;
    for ct in [
        Some("application/x-www-form-urlencoded"),
        Some("text/plain"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let mut req = http
            .post(format!("{}/up/v1/chat/completions", till.url))
            .bearer_auth(&key)
            .body(body);
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 415, "{ct:?}");
        assert_eq!(error_code(r).await, "content_type_not_json", "{ct:?}");
    }
    assert_eq!(upstream.hits(), 0);
    for ct in ["application/json; charset=utf-8", "application/vnd.x+json"] {
        let r = http
            .post(format!("{}/up/v1/chat/completions", till.url))
            .bearer_auth(&key)
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{ct}");
    }
    // A key without a body caveat may send any content type.
    let plain = till.mint_up(Some(5));
    let r = http
        .post(format!("{}/up/v1/files", till.url))
        .bearer_auth(&plain)
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Item 4: method-override headers and `_method` parameters are refused.
#[tokio::test]
async fn method_override_headers_and_parameters_are_refused() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint(Caveats {
        upstream: Some("up".into()),
        methods: Some(vec!["POST".into()]),
        cap: Some(10),
        ..Default::default()
    });
    let http = client();
    let post = |path: &str| {
        http.post(format!("{}/up{path}", till.url))
            .bearer_auth(&key)
            .body("{}")
    };
    let cases = vec![
        post("/v1/x").header("X-HTTP-Method-Override", "DELETE"),
        post("/v1/x").header("X-HTTP-Method", "DELETE"),
        post("/v1/x").header("X-Method-Override", "DELETE"),
        post("/v1/x?_method=DELETE"),
        post("/v1/x?a=1&_METHOD=delete"),
        http.post(format!("{}/up/v1/x", till.url))
            .bearer_auth(&key)
            .header("content-type", "application/x-www-form-urlencoded")
            .body("a=1&_method=DELETE"),
    ];
    for req in cases {
        let r = req.send().await.unwrap();
        assert_eq!(r.status(), 400);
        assert_eq!(r.headers()["x-should-retry"], "false");
        assert_eq!(error_code(r).await, "method_override_not_allowed");
    }
    assert_eq!(upstream.hits(), 0);
    assert_eq!(till.usage(&key).await, vec![0]);
}

/// Item 5: path segments that some upstream server reads as dot segments are refused
/// before any claim (sent raw, so no client normalises them first).
#[tokio::test]
async fn dot_segment_look_alikes_are_refused_before_any_claim() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint(Caveats {
        upstream: Some("up".into()),
        paths: Some(vec!["/v1/chat".into()]),
        cap: Some(10),
        ..Default::default()
    });
    for path in [
        "/up/v1/chat/..;/..;/v1/files",
        "/up/v1/chat/..%3B/x",
        "/up/v1/chat/..%20/..%20/v1/files",
        "/up/v1/chat/.../v1/files",
        "/up/v1/chat/%252e%252e/v1/files",
        "/up/v1/chat/%EF%BC%8E%EF%BC%8E/v1/files",
        "/up/v1/chat/%E2%80%A5/v1/files",
    ] {
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
        );
        let (out, _) = raw_exchange(till.addr, req.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{path}: {out}");
        assert!(out.contains("bad_path"), "{path}: {out}");
    }
    assert_eq!(upstream.hits(), 0);
    assert_eq!(till.usage(&key).await, vec![0]);
}

/// Item 6: an upstream that echoes the query-param credential (a redirect keeping the
/// query) never hands it to the client; `TRACE` is refused.
#[tokio::test]
async fn credential_is_scrubbed_from_response_headers_and_trace_is_refused() {
    let upstream = Upstream::start().await;
    let toml = format!(
        "[upstreams.q]\nbase_url = \"{}\"\ncredential_env = \"UP_SECRET\"\nauth = {{ query = \"key\" }}\n",
        upstream.url()
    );
    let till = Till::start(&toml).await;
    upstream.set_redirect(&format!("https://elsewhere/next?page=2&key={SECRET}"));
    let key = till.mint(Caveats {
        upstream: Some("q".into()),
        ..Default::default()
    });
    let http = client();
    let r = http
        .get(format!("{}/q/v1/redirect?page=1", till.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 302);
    let location = r.headers()["location"].to_str().unwrap().to_string();
    assert!(!location.contains(SECRET), "{location}");
    assert_eq!(location, "https://elsewhere/next?page=2&key=[redacted]");
    for (name, value) in r.headers() {
        assert!(
            !String::from_utf8_lossy(value.as_bytes()).contains(SECRET),
            "{name}"
        );
    }
    // The upstream did get the real credential (that is how it authenticates).
    assert!(upstream.seen()[0].uri.contains(SECRET));
    let r = http
        .request(reqwest::Method::TRACE, format!("{}/q/v1/x", till.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 405);
    assert!(r.headers().contains_key("allow"));
    assert_eq!(error_code(r).await, "method_not_supported");
    assert_eq!(upstream.hits(), 1);
}

/// Item 7: a dead key is refused on its head alone (the body is never read), and the
/// global in-flight body budget turns excess bodies into `503` with `Retry-After`.
#[tokio::test]
async fn dead_key_is_refused_before_its_body_is_read_and_body_memory_is_budgeted() {
    let upstream = Upstream::start().await;
    let toml = format!(
        "[limits]\nmax_body_bytes = 1048576\nmax_inflight_body_bytes = 1048576\n{}",
        up_config(&upstream)
    );
    let till = Till::start(&toml).await;
    let expired = till.mint(Caveats {
        upstream: Some("up".into()),
        expires: Some(1_000),
        ..Default::default()
    });
    // 10 MiB announced, not one byte sent: the answer comes anyway.
    let mut s = TcpStream::connect(till.addr).await.unwrap();
    let head = format!(
        "POST /up/v1/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {expired}\r\nContent-Length: 10485760\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("refused without waiting for the body")
        .unwrap();
    let out = String::from_utf8_lossy(&buf[..n]);
    assert!(out.starts_with("HTTP/1.1 401"), "{out}");
    assert!(out.contains("key_expired"), "{out}");
    drop(s);

    // A live key holds 900 KiB of the 1 MiB budget with a body it has not finished...
    let key = till.mint_up(Some(10));
    let mut slow = TcpStream::connect(till.addr).await.unwrap();
    let head = format!(
        "POST /up/v1/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {key}\r\nContent-Length: 1000000\r\n\r\n"
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&vec![b'a'; 900 * 1024]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // ... so another 200 KiB body does not fit: 503, retry later, nothing charged.
    let r = client()
        .post(format!("{}/up/v1/y", till.url))
        .bearer_auth(&key)
        .body(vec![b'b'; 200 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "1");
    assert_eq!(r.headers()["x-should-retry"], "true");
    assert_eq!(error_code(r).await, "body_budget_exceeded");
    assert_eq!(upstream.hits(), 0);
    assert_eq!(till.usage(&key).await, vec![0]);
    // Once the first body is gone, the budget is back.
    drop(slow);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = client()
        .post(format!("{}/up/v1/y", till.url))
        .bearer_auth(&key)
        .body(vec![b'b'; 200 * 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

/// Item 12 (`x-should-retry` part): permanent refusals say `false`, including the 409 the
/// OpenAI SDK would otherwise retry.
#[tokio::test]
async fn permanent_refusals_say_x_should_retry_false() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint_up(Some(1));
    let http = client();
    let send = |body: &'static str| {
        http.post(format!("{}/up/v1/x", till.url))
            .bearer_auth(&key)
            .header("idempotency-key", "k-1")
            .body(body)
            .send()
    };
    let r = send("{\"a\":1}").await.unwrap();
    assert_eq!(r.status(), 200);
    let r = send("{\"a\":2}").await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.headers()["x-should-retry"], "false");
    assert!(!r.headers().contains_key("retry-after"));
    assert_eq!(error_code(r).await, "idempotency_key_conflict");
    let r = http
        .post(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(r.headers()["x-should-retry"], "false");
    let r = http
        .get(format!("{}/up/v1/x", till.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["x-should-retry"], "false");
}

/// Item 8: the idempotency fingerprint covers the query as forwarded and the content
/// type: reusing one `Idempotency-Key` with `?page=0` then `?page=1` (or with another
/// content type) is a 409 conflict, never a second upstream request for one charge. An
/// identical retry is still a replay, and the receipt names the query and content type.
#[tokio::test]
async fn idempotency_fingerprint_covers_query_and_content_type() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint_up(Some(5));
    let http = client();
    let send = |query: &'static str, content_type: &'static str| {
        http.post(format!("{}/up/v1/items?{query}", till.url))
            .bearer_auth(&key)
            .header("idempotency-key", "idem-page")
            .header("content-type", content_type)
            .body("{}")
            .send()
    };
    let r = send("page=0", "application/json").await.unwrap();
    assert_eq!(r.status(), 200);
    let receipt = Receipt::parse(r.headers()["till-receipt"].to_str().unwrap()).unwrap();
    assert_eq!(receipt.body().request.query.as_deref(), Some("page=0"));
    assert_eq!(
        receipt.body().request.content_type.as_deref(),
        Some("application/json")
    );
    assert_eq!(upstream.hits(), 1);

    // Another query under the same key: refused, not forwarded, not charged.
    let r = send("page=1", "application/json").await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.headers()["x-should-retry"], "false");
    assert_eq!(error_code(r).await, "idempotency_key_conflict");
    // Another content type (same query, same body): refused too.
    let r = send("page=0", "text/plain").await.unwrap();
    assert_eq!(r.status(), 409);
    assert_eq!(r.headers()["x-should-retry"], "false");
    assert_eq!(error_code(r).await, "idempotency_key_conflict");
    assert_eq!(upstream.hits(), 1);
    assert_eq!(till.usage(&key).await, vec![1]);

    // The identical request is a replay of the original receipt (uncharged); a
    // content type differing only in letter case and optional whitespace is the same.
    let r = send("page=0", "Application/JSON").await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["till-replayed"], "true");
    assert_eq!(
        r.headers()["till-receipt"].to_str().unwrap(),
        receipt.compact()
    );
    assert_eq!(till.usage(&key).await, vec![1]);
    // The forwarded query is what the fingerprint saw.
    assert!(
        upstream.seen()[0].uri.ends_with("/v1/items?page=0"),
        "{:?}",
        upstream.seen()[0].uri
    );
}

/// Item 13: a 504 after a committed claim still carries the receipt and the remaining
/// count, so the client can prove what it was charged.
#[tokio::test]
async fn upstream_timeout_after_a_claim_returns_the_receipt() {
    let upstream = Upstream::start().await;
    let toml = format!(
        "[limits]\nupstream_response_timeout = \"1s\"\n{}",
        up_config(&upstream)
    );
    let till = Till::start(&toml).await;
    let key = till.mint_up(Some(5));
    let r = client()
        .post(format!("{}/up/v1/hang", till.url))
        .bearer_auth(&key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 504);
    assert_eq!(r.headers()["till-activations-remaining"], "4");
    assert_eq!(r.headers()["x-should-retry"], "false");
    let receipt = Receipt::parse(r.headers()["till-receipt"].to_str().unwrap()).unwrap();
    let mut keys = ReceiptKeySet::new();
    keys.insert(till.signer.public_key());
    receipt.verify(&keys).unwrap();
    assert_eq!(receipt.body().request.path, "/v1/hang");
    assert_eq!(error_code(r).await, "upstream_timeout");
    assert_eq!(till.usage(&key).await, vec![1]);
}

/// Item 15: HTTP/2 cleartext with prior knowledge is served, with the same limits.
#[tokio::test]
async fn h2c_prior_knowledge_is_served_with_the_same_limits() {
    let upstream = Upstream::start().await;
    let toml = format!("[limits]\nmax_body_bytes = 1024\n{}", up_config(&upstream));
    let till = Till::start(&toml).await;
    let key = till.mint_up(Some(5));
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let r = h2
        .post(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("till-receipt"));
    let r = h2
        .post(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .body(vec![b'a'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "body_too_large");
    assert_eq!(upstream.hits(), 1);
    assert_eq!(till.usage(&key).await, vec![1]);
}

fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Reads HTTP/2 frames until `want` matches one (returns it) or the connection ends.
async fn read_frames(s: &mut TcpStream, want: impl Fn(u8, &[u8]) -> bool) -> Option<Vec<u8>> {
    let mut buf = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        while buf.len() >= 9 {
            let len = (buf[0] as usize) << 16 | (buf[1] as usize) << 8 | buf[2] as usize;
            if buf.len() < 9 + len {
                break;
            }
            let kind = buf[3];
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            if want(kind, &payload) {
                return Some(payload);
            }
        }
        let mut chunk = [0u8; 8192];
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Item 15, raw: the server's SETTINGS cap concurrent streams and the header list size,
/// and a rapid-reset flood (HEADERS then RST_STREAM, over and over) ends the connection.
#[tokio::test]
async fn h2c_settings_limit_streams_and_rapid_reset_is_cut_off() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let mut s = TcpStream::connect(till.addr).await.unwrap();
    s.write_all(PREFACE).await.unwrap();
    s.write_all(&frame(0x4, 0, 0, &[])).await.unwrap();
    let settings = read_frames(&mut s, |kind, _| kind == 0x4)
        .await
        .expect("server SETTINGS");
    let value = |id: u16| {
        settings
            .chunks(6)
            .find(|c| u16::from_be_bytes([c[0], c[1]]) == id)
            .map(|c| u32::from_be_bytes([c[2], c[3], c[4], c[5]]))
    };
    assert_eq!(value(0x3), Some(100), "SETTINGS_MAX_CONCURRENT_STREAMS");
    assert_eq!(value(0x6), Some(32 * 1024), "SETTINGS_MAX_HEADER_LIST_SIZE");

    // HPACK: :method GET, :scheme http, :path /_till/health, :authority a (no Huffman).
    let mut block = vec![0x82, 0x86, 0x04, 13];
    block.extend_from_slice(b"/_till/health");
    block.extend_from_slice(&[0x01, 1, b'a']);
    let mut flood = Vec::new();
    for i in 0..2000u32 {
        let id = 1 + 2 * i;
        flood.extend(frame(0x1, 0x5, id, &block)); // HEADERS, END_STREAM|END_HEADERS
        flood.extend(frame(0x3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let _ = s.write_all(&flood).await;
    // GOAWAY (ENHANCE_YOUR_CALM or another error), or the connection closed.
    let goaway = read_frames(&mut s, |kind, _| kind == 0x7).await;
    if let Some(g) = goaway {
        let code = u32::from_be_bytes([g[4], g[5], g[6], g[7]]);
        assert_ne!(code, 0, "GOAWAY with an error code");
    }
    // The server itself is fine.
    let r = client()
        .get(format!("{}/_till/health", till.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

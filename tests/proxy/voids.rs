//! Issue 10 item 12: a claim whose upstream was unreachable before anything was sent is
//! given back with a signed void receipt; anything that reached the upstream stays
//! charged; a void that fails keeps the slot spent (fail closed).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use till_ledger::{
    AlertOutcome, AlertRecord, BoxFuture, Claim, ClaimRequest, EmbeddedLedger, FamilyDetail,
    FamilyView, KeyBlocks, Ledger, LedgerError, Level, LevelUsage, Refusal, Revoked, VoidRequest,
    Voided,
};
use till_receipt::{audit_chain, Receipt, ReceiptKeySet};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{client, error_code, metrics_text, Till};

/// An upstream named `flaky` at `addr`, Bearer credential.
fn flaky_config(addr: std::net::SocketAddr) -> String {
    format!(
        "[limits]\nupstream_response_timeout = \"5s\"\n[upstreams.flaky]\nbase_url = \"http://{addr}\"\ncredential_env = \"UP_SECRET\"\nauth = {{ header = \"authorization\", scheme = \"Bearer\" }}\n"
    )
}

/// A loopback port with nothing listening on it.
async fn closed_port() -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr
}

fn flaky_key(till: &Till, cap: u64) -> String {
    till.mint(till_token::Caveats {
        upstream: Some("flaky".into()),
        cap: Some(cap),
        ..Default::default()
    })
}

fn keys(till: &Till) -> ReceiptKeySet {
    [till.signer.public_key()].into_iter().collect()
}

fn receipt_of(resp: &reqwest::Response, till: &Till) -> Receipt {
    let compact = resp
        .headers()
        .get("till-receipt")
        .expect("a till-receipt header")
        .to_str()
        .unwrap();
    let receipt = Receipt::parse(compact).unwrap();
    receipt.verify(&keys(till)).unwrap();
    receipt
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).map(|v| v.to_str().unwrap())
}

async fn family_chain(till: &Till, receipt: &Receipt) -> Vec<Receipt> {
    let family = hex::decode(&receipt.body().family).unwrap();
    till.ledger.receipts(&family, 1, 100).await.unwrap()
}

/// Binds `addr` again (the port was just freed; retried briefly) and serves
/// `{"ok":true}` on it, counting requests.
async fn serve_on(addr: std::net::SocketAddr) -> Arc<AtomicUsize> {
    let hits = Arc::new(AtomicUsize::new(0));
    let mut listener = None;
    for _ in 0..50 {
        match tokio::net::TcpListener::bind(addr).await {
            Ok(l) => {
                listener = Some(l);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    let listener = listener.expect("the freed port can be bound again");
    let counter = Arc::clone(&hits);
    let app = axum::Router::new().fallback(move || {
        let counter = Arc::clone(&counter);
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            axum::Json(serde_json::json!({"ok": true}))
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    hits
}

/// A key with cap 1, an upstream whose port is closed: every attempt (an SDK call and its
/// two default retries) is a 502 `upstream_unreachable` with `x-should-retry: true` and a
/// void receipt, and nothing stays charged. Then the upstream comes up: the same key (and
/// the same idempotency key) succeeds once, then gets the cap refusal. The chain audits
/// with the voids counted, and the metrics count them.
#[tokio::test]
async fn unreachable_upstream_gives_the_slot_back_then_the_cap_holds() {
    let dead = closed_port().await;
    let till = Till::start(&flaky_config(dead)).await;
    let key = flaky_key(&till, 1);
    let http = client();
    let mut claims = Vec::new();
    for attempt in 1..=3u64 {
        let r = http
            .post(format!("{}/flaky/v1/chat/completions", till.url))
            .bearer_auth(&key)
            .header("idempotency-key", "sdk-call-1")
            .body(r#"{"model":"m"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 502, "attempt {attempt}");
        assert_eq!(header(&r, "x-should-retry"), Some("true"));
        assert!(header(&r, "retry-after").is_some());
        assert_eq!(header(&r, "till-activations-remaining"), Some("1"));
        let void = receipt_of(&r, &till);
        // Each attempt claimed (seq 2k-1) and gave the slot back (seq 2k).
        assert_eq!(void.body().seq, 2 * attempt);
        assert_eq!(void.body().void, Some(2 * attempt - 1));
        assert_eq!(void.body().idempotency_key, "sdk-call-1");
        claims.push(void);
        assert_eq!(error_code(r).await, "upstream_unreachable");
        assert_eq!(till.usage(&key).await, vec![0], "nothing stays charged");
    }

    // The upstream comes up on the same address.
    let hits = serve_on(dead).await;
    let r = http
        .post(format!("{}/flaky/v1/chat/completions", till.url))
        .bearer_auth(&key)
        .header("idempotency-key", "sdk-call-1")
        .body(r#"{"model":"m"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "till-activations-remaining"), Some("0"));
    assert_eq!(
        header(&r, "till-replayed"),
        None,
        "a fresh claim, not a replay"
    );
    let ok = receipt_of(&r, &till);
    assert_eq!((ok.body().seq, ok.body().void), (7, None));
    assert_eq!(ok.body().slots[0].slot, 1);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    let r = http
        .post(format!("{}/flaky/v1/chat/completions", till.url))
        .bearer_auth(&key)
        .body(r#"{"model":"m"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "activation_limit_reached");
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the refusal was not forwarded"
    );
    assert_eq!(till.usage(&key).await, vec![1]);

    let chain = family_chain(&till, &ok).await;
    let report = audit_chain(&chain, &keys(&till)).unwrap();
    assert_eq!(
        (report.receipts, report.claims, report.voids, report.charged),
        (7, 4, 3, 1)
    );
    let text = metrics_text(&till.url).await;
    assert!(
        text.contains("till_voids_total{outcome=\"voided\"} 3"),
        "{text}"
    );
    assert!(
        text.contains("till_voids_total{outcome=\"failed\"} 0"),
        "{text}"
    );
}

/// The upstream accepted the connection, read the whole request and closed without an
/// answer: the request reached it, so the slot stays spent (502 `upstream_failed`,
/// `x-should-retry: false`, the claim's own receipt).
#[tokio::test]
async fn request_that_reached_the_upstream_stays_charged() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let received = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&received);
    tokio::spawn(async move {
        loop {
            let Ok((mut conn, _)) = listener.accept().await else {
                return;
            };
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16 * 1024];
                let mut got = Vec::new();
                // Read up to the end of the head and the 13-byte body, then hang up.
                while let Ok(n) = conn.read(&mut buf).await {
                    if n == 0 {
                        break;
                    }
                    got.extend_from_slice(&buf[..n]);
                    if let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                        if got.len() >= end + 4 + 13 {
                            break;
                        }
                    }
                }
                seen.fetch_add(got.len(), Ordering::SeqCst);
                let _ = conn.shutdown().await;
            });
        }
    });
    let till = Till::start(&flaky_config(addr)).await;
    let key = flaky_key(&till, 2);
    let r = client()
        .post(format!("{}/flaky/v1/chat/completions", till.url))
        .bearer_auth(&key)
        .body(r#"{"model":"m"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "x-should-retry"), Some("false"));
    let receipt = receipt_of(&r, &till);
    assert_eq!((receipt.body().seq, receipt.body().void), (1, None));
    assert_eq!(header(&r, "till-activations-remaining"), Some("1"));
    assert_eq!(error_code(r).await, "upstream_failed");
    assert!(
        received.load(Ordering::SeqCst) > 0,
        "the upstream received the request"
    );
    assert_eq!(till.usage(&key).await, vec![1], "stays charged");
    assert_eq!(family_chain(&till, &receipt).await.len(), 1, "no void");
}

/// A ledger whose voids fail (everything else is the embedded ledger).
#[derive(Debug)]
struct VoidsFail(Arc<EmbeddedLedger>);

impl Ledger for VoidsFail {
    fn claim(
        &self,
        req: ClaimRequest,
    ) -> BoxFuture<'_, Result<Result<Claim, Refusal>, LedgerError>> {
        self.0.claim(req)
    }
    fn void(&self, _req: VoidRequest) -> BoxFuture<'_, Result<Voided, LedgerError>> {
        Box::pin(async { Err(LedgerError::Unavailable("injected void failure".into())) })
    }
    fn revoke(&self, id: &[u8]) -> BoxFuture<'_, Result<Revoked, LedgerError>> {
        self.0.revoke(id)
    }
    fn usage(&self, levels: &[Level]) -> BoxFuture<'_, Result<Vec<LevelUsage>, LedgerError>> {
        self.0.usage(levels)
    }
    fn receipts(
        &self,
        family: &[u8],
        from: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Receipt>, LedgerError>> {
        self.0.receipts(family, from, limit)
    }
    fn record_key(&self, key: KeyBlocks, at: u64) -> BoxFuture<'_, Result<(), LedgerError>> {
        self.0.record_key(key, at)
    }
    fn families(&self, now: u64) -> BoxFuture<'_, Result<Vec<FamilyView>, LedgerError>> {
        self.0.families(now)
    }
    fn family(
        &self,
        family: &[u8],
        now: u64,
    ) -> BoxFuture<'_, Result<Option<FamilyDetail>, LedgerError>> {
        self.0.family(family, now)
    }
    fn alerts(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        self.0.alerts(limit)
    }
    fn lease_alerts(
        &self,
        now: u64,
        lease: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        self.0.lease_alerts(now, lease, limit)
    }
    fn settle_alert(
        &self,
        id: &str,
        outcome: AlertOutcome,
    ) -> BoxFuture<'_, Result<(), LedgerError>> {
        self.0.settle_alert(id, outcome)
    }
}

/// The void transaction fails: fail closed. The slot stays spent, the answer is the plain
/// 502 with the claim's receipt and `x-should-retry: false` (a retry would be charged
/// again), and the failure is counted.
#[tokio::test]
async fn failed_void_keeps_the_slot_spent() {
    let dead = closed_port().await;
    let till = Till::start_wrapped(&flaky_config(dead), &[], |l| {
        Arc::new(VoidsFail(l)) as Arc<dyn Ledger>
    })
    .await;
    let key = flaky_key(&till, 3);
    let http = client();
    let r = http
        .get(format!("{}/flaky/v1/models", till.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "x-should-retry"), Some("false"));
    assert!(header(&r, "retry-after").is_none());
    assert_eq!(header(&r, "till-activations-remaining"), Some("2"));
    let receipt = receipt_of(&r, &till);
    assert_eq!((receipt.body().seq, receipt.body().void), (1, None));
    assert_eq!(error_code(r).await, "upstream_unreachable");
    assert_eq!(till.usage(&key).await, vec![1], "the slot stays spent");
    let text = metrics_text(&till.url).await;
    assert!(
        text.contains("till_voids_total{outcome=\"failed\"} 1"),
        "{text}"
    );
}

/// A replay of a claim whose upstream is unreachable is not voided: the slot belongs to
/// the original claim (which may have reached the upstream), so it stays charged and the
/// answer is the plain 502 with the original receipt.
#[tokio::test]
async fn replay_to_an_unreachable_upstream_is_not_voided() {
    use sha2::Digest as _;
    let dead = closed_port().await;
    let till = Till::start(&flaky_config(dead)).await;
    let key = flaky_key(&till, 5);
    // The original claim, taken (as if forwarded earlier) with the digest the proxy
    // computes for `GET /flaky/v1/models` and the same idempotency key.
    let token = till_token::verify(&key, &till.ring, &till_token::Limits::default()).unwrap();
    let levels: Vec<Level> = token
        .blocks()
        .iter()
        .map(|b| Level {
            revocation_id: b.revocation_id.clone(),
            cap: b.caveats.cap,
        })
        .collect();
    let original = till
        .ledger
        .claim(ClaimRequest {
            levels,
            idempotency_key: Some("k-1".into()),
            request: till_ledger::RequestDigest {
                method: "GET".into(),
                upstream: "flaky".into(),
                path: "/v1/models".into(),
                body_sha256: hex::encode(sha2::Sha256::digest(b"")),
                model: None,
                query: None,
                content_type: None,
            },
            now: 1_750_000_000,
            not_after: None,
            meta: None,
            windows: Vec::new(),
            ceilings: None,
        })
        .await
        .unwrap()
        .unwrap();
    let r = client()
        .get(format!("{}/flaky/v1/models", till.url))
        .bearer_auth(&key)
        .header("idempotency-key", "k-1")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "till-replayed"), Some("true"));
    assert_eq!(header(&r, "x-should-retry"), Some("false"));
    let receipt = receipt_of(&r, &till);
    assert_eq!(
        receipt.compact(),
        original.receipt.compact(),
        "the original receipt"
    );
    assert_eq!(error_code(r).await, "upstream_unreachable");
    assert_eq!(
        till.usage(&key).await,
        vec![1],
        "the original claim stays charged"
    );
    assert_eq!(family_chain(&till, &receipt).await.len(), 1, "no void");
}

/// The same with the real `till serve` binary and `till audit`: an unreachable upstream
/// costs nothing, then the upstream comes up and the cap of 1 holds; the offline audit of
/// the data dir counts the void.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn till_serve_gives_back_the_slot_of_an_unreachable_upstream() {
    use crate::binary::{audit_clean, mint, serve, stop, till};
    let dead = closed_port().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("till.toml");
    std::fs::write(
        &config,
        format!("proxy_id = \"bin-void\"\n{}", flaky_config(dead)),
    )
    .unwrap();
    let server = serve(
        &data,
        &["--config", config.to_str().unwrap()],
        &[("UP_SECRET", crate::support::SECRET)],
    );
    let key = mint(&data, &["--upstream", "flaky", "--cap", "1"]);
    let http = client();
    let call = || {
        http.post(format!("{}/flaky/v1/chat/completions", server.url))
            .bearer_auth(&key)
            .body(r#"{"model":"m"}"#)
            .send()
    };
    let r = call().await.unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!(header(&r, "x-should-retry"), Some("true"));
    assert_eq!(header(&r, "till-activations-remaining"), Some("1"));
    let compact = header(&r, "till-receipt").unwrap().to_owned();
    assert_eq!(Receipt::parse(&compact).unwrap().body().void, Some(1));
    assert_eq!(error_code(r).await, "upstream_unreachable");

    let hits = serve_on(dead).await;
    let r = call().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "till-activations-remaining"), Some("0"));
    let r = call().await.unwrap();
    assert_eq!(r.status(), 403);
    assert_eq!(error_code(r).await, "activation_limit_reached");
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    stop(server);

    let a = audit_clean(&data, &key);
    assert_eq!(
        (
            &a["report"]["claims"],
            &a["report"]["voids"],
            &a["report"]["charged"]
        ),
        (
            &serde_json::json!(2),
            &serde_json::json!(1),
            &serde_json::json!(1)
        ),
        "{a}"
    );
    let out = till(&data)
        .args(["receipt", "verify", &compact])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("gives back the slot of claim 1"));
}

//! Test fixtures: a recording upstream, an in-process Till, key helpers.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::Response;
use till_ledger::{EmbeddedConfig, EmbeddedLedger, Ledger, Level};
use till_proxy::{Config, Overrides};
use till_receipt::ReceiptSigner;
use till_token::{mint, verify, Caveats, KeyRing, Limits, RootKey};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// The real credential every test upstream expects.
pub const SECRET: &str = "sk-real-upstream-secret-42";

/// One request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    pub uri: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Seen {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug, Clone, Default)]
struct UpstreamState {
    hits: Arc<AtomicUsize>,
    seen: Arc<Mutex<Vec<Seen>>>,
    sse_dropped: Arc<AtomicBool>,
    sse_finished: Arc<AtomicBool>,
    redirect_to: Arc<Mutex<String>>,
}

/// A loopback upstream that records every request. Behaviour by the last path segment:
/// `sse` streams 10 events 300 ms apart, `hang` never answers, `fail` answers 500,
/// `redirect` answers 302 to `redirect_to`, anything else 200 with a small JSON body.
#[derive(Debug, Clone)]
pub struct Upstream {
    pub addr: SocketAddr,
    state: UpstreamState,
}

impl Upstream {
    pub async fn start() -> Upstream {
        let state = UpstreamState::default();
        let app = axum::Router::new()
            .fallback(upstream_handler)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Upstream { addr, state }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.state.hits.load(Ordering::SeqCst)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn sse_dropped(&self) -> bool {
        self.state.sse_dropped.load(Ordering::SeqCst)
    }

    pub fn sse_finished(&self) -> bool {
        self.state.sse_finished.load(Ordering::SeqCst)
    }

    pub fn set_redirect(&self, to: &str) {
        *self.state.redirect_to.lock().unwrap() = to.to_string();
    }
}

struct DropFlag(Arc<AtomicBool>);

impl Drop for DropFlag {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

async fn upstream_handler(State(s): State<UpstreamState>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX)
        .await
        .map(|b| b.to_vec())
        .unwrap_or_default();
    s.hits.fetch_add(1, Ordering::SeqCst);
    s.seen.lock().unwrap().push(Seen {
        method: parts.method.to_string(),
        uri: parts.uri.to_string(),
        headers: parts
            .headers
            .iter()
            .map(|(k, v)| {
                (
                    k.to_string(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        body,
    });
    let last = parts
        .uri
        .path()
        .rsplit('/')
        .next()
        .unwrap_or("")
        .to_string();
    let builder = Response::builder();
    match last.as_str() {
        "sse" => {
            let guard = DropFlag(s.sse_dropped.clone());
            let finished = s.sse_finished.clone();
            let stream = futures::stream::unfold((0u32, guard, finished), |(i, g, f)| async move {
                if i == 10 {
                    f.store(true, Ordering::SeqCst);
                    return None;
                }
                if i > 0 {
                    tokio::time::sleep(Duration::from_millis(300)).await;
                }
                Some((
                    Ok::<_, Infallible>(Bytes::from(format!("data: event {i}\n\n"))),
                    (i + 1, g, f),
                ))
            });
            builder
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(stream))
                .unwrap()
        }
        "hang" => {
            tokio::time::sleep(Duration::from_secs(120)).await;
            builder.body(Body::empty()).unwrap()
        }
        "fail" => builder
            .status(500)
            .body(Body::from(r#"{"error":"boom"}"#))
            .unwrap(),
        "redirect" => {
            let to = s.redirect_to.lock().unwrap().clone();
            builder
                .status(302)
                .header("location", to)
                .body(Body::empty())
                .unwrap()
        }
        _ => builder
            .header("content-type", "application/json")
            .header("connection", "x-upstream-hop")
            .header("x-upstream-hop", "1")
            .body(Body::from(r#"{"ok":true}"#))
            .unwrap(),
    }
}

/// An in-process Till with the real embedded ledger.
pub struct Till {
    pub url: String,
    pub addr: SocketAddr,
    pub root: RootKey,
    pub ring: KeyRing,
    pub ledger: Arc<EmbeddedLedger>,
    pub signer: Arc<ReceiptSigner>,
    _dir: tempfile::TempDir,
}

/// A generic upstream named `up` pointing at `upstream`, with the Bearer credential.
pub fn up_config(upstream: &Upstream) -> String {
    format!(
        "[upstreams.up]\nbase_url = \"{}\"\ncredential_env = \"UP_SECRET\"\nauth = {{ header = \"authorization\", scheme = \"Bearer\" }}\nmodel = \"body\"\n",
        upstream.url()
    )
}

impl Till {
    pub async fn start(toml: &str) -> Till {
        Self::start_with_env(toml, &[]).await
    }

    pub async fn start_with_env(toml: &str, extra_env: &[(&str, &str)]) -> Till {
        Self::start_wrapped(toml, extra_env, |l| l as Arc<dyn Ledger>).await
    }

    /// [`Till::start_with_env`] with the proxy talking to `wrap(ledger)` (e.g. a ledger
    /// that fails one operation); `Till::ledger` stays the embedded ledger underneath.
    pub async fn start_wrapped(
        toml: &str,
        extra_env: &[(&str, &str)],
        wrap: impl FnOnce(Arc<EmbeddedLedger>) -> Arc<dyn Ledger>,
    ) -> Till {
        let mut env: HashMap<String, String> = HashMap::new();
        env.insert("UP_SECRET".into(), SECRET.into());
        for (k, v) in extra_env {
            env.insert(k.to_string(), v.to_string());
        }
        let raw = Config::parse(toml).unwrap();
        let flags = Overrides {
            listen: Some("127.0.0.1:0".into()),
            proxy_id: Some("test-proxy".into()),
            ..Overrides::default()
        };
        let config = Config::validate(raw, &flags, &env).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let signer = Arc::new(ReceiptSigner::generate());
        let mut lc = EmbeddedConfig::new(signer.clone(), "test-proxy");
        lc.claim_timeout = config.limits.ledger_claim_timeout;
        let ledger = Arc::new(EmbeddedLedger::open(dir.path().join("ledger.redb"), lc).unwrap());
        let root = RootKey::generate();
        let ring = KeyRing::with(root.public());
        let listener = tokio::net::TcpListener::bind(config.listen).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = config.build(ring.clone(), wrap(ledger.clone())).unwrap();
        tokio::spawn(async move { app.serve(listener, std::future::pending()).await.unwrap() });
        Till {
            url: format!("http://{addr}"),
            addr,
            root,
            ring,
            ledger,
            signer,
            _dir: dir,
        }
    }

    pub fn mint(&self, caveats: Caveats) -> String {
        mint(&self.root, caveats).unwrap().to_key_string().unwrap()
    }

    pub fn mint_up(&self, cap: Option<u64>) -> String {
        self.mint(Caveats {
            upstream: Some("up".into()),
            cap,
            ..Default::default()
        })
    }

    /// Activations used at every level of `key`.
    pub async fn usage(&self, key: &str) -> Vec<u64> {
        usage_of(&*self.ledger, &self.ring, key).await
    }
}

pub async fn usage_of(ledger: &dyn Ledger, ring: &KeyRing, key: &str) -> Vec<u64> {
    let token = verify(key, ring, &Limits::default()).unwrap();
    let levels: Vec<Level> = token
        .blocks()
        .iter()
        .map(|b| Level {
            revocation_id: b.revocation_id.clone(),
            cap: b.caveats.cap,
        })
        .collect();
    ledger
        .usage(&levels)
        .await
        .unwrap()
        .iter()
        .map(|u| u.used)
        .collect()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

/// The proxy's `/_till/metrics` text (`base`: the proxy's URL).
pub async fn metrics_text(base: &str) -> String {
    client()
        .get(format!("{base}/_till/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The error code of a Till JSON error response.
pub async fn error_code(resp: reqwest::Response) -> String {
    let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap();
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v["error"]["type"].is_string(), "{v}");
    v["error"]["code"].as_str().unwrap().to_string()
}

/// Sends raw bytes and reads until the server closes (bounded to 5 s). Returns the bytes
/// and whether the connection was closed by the server within the bound.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> (String, bool) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let mut closed = false;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => break,
        }
    }
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

/// Polls `f` every 20 ms for at most `max`.
pub async fn eventually(max: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + max;
    while tokio::time::Instant::now() < deadline {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    f()
}

//! The composition root and the request path.
//!
//! [`Config::build`] turns a validated config, the trusted root keys and a ledger into an
//! [`App`]; [`app`] is its axum router (tests drive it with `oneshot`), and
//! `App::serve` runs it on a listener. A proxied request goes through named phases, in
//! this order, and stops at the first refusal:
//!
//! 1. `request_filter`: absolute-form targets, `TRACE`, `Upgrade`, method overrides, path
//!    normalisation, upstream lookup.
//! 2. `authenticate`: find the key, verify it (cached by key digest).
//! 3. `authorize_before_body` then `read_body`: `Idempotency-Key` check, every caveat that
//!    needs no body (upstream, expiry, method, path), the JSON content type when a caveat
//!    reads the body, then the body: size limit, global in-flight budget, buffering.
//! 4. `authorize`: all scope caveats again, with the model — no slot yet.
//! 5. `claim`: ONE ledger transaction; its refusal or failure ends the request here,
//!    and nothing was forwarded.
//! 6. `upstream_request`: strip client credentials and hop-by-hop headers, inject the
//!    real credential, fixed upstream URL.
//! 7. `forward`: send (no redirects, timeouts), map transport failures to 502/504.
//! 8. `response_filter`: hop-by-hop headers out, `Till-*` headers in, body streamed.
//! 9. `logging`: one line and the metrics, whatever happened.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue, Method, StatusCode, Version};
use http_body_util::BodyExt as _;
use sha2::{Digest as _, Sha256};
use till_ledger::{Claim, ClaimRequest, Ledger, Level, RequestDigest, VoidRequest, WindowCap};
use till_token::{
    key_digest, verify, AuthorizeError, CallFacts, KeyRing, Limits, RequestFacts, VerifiedToken,
};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::cache::{VerifiedKey, VerifyCache};
use crate::config::{Config, Upstream};
use crate::error::{ConfigError, ErrorCode, ProxyError};
use crate::events::{Event, EventBus};
use crate::hygiene;
use crate::metrics::{ClaimOutcome, Metrics};
use crate::preset::{self, Auth, BodyFactError, CallNeeds, ModelSource};
use crate::route::{self, Target};

/// Response header: the claim's signed receipt (JWS compact).
pub const HEADER_RECEIPT: &str = "till-receipt";
/// Response header: activations left under the tightest cap (absent when uncapped).
pub const HEADER_REMAINING: &str = "till-activations-remaining";
/// Response header: `true` when the claim was an idempotent replay (nothing charged).
pub const HEADER_REPLAYED: &str = "till-replayed";
/// Request header naming the idempotency key.
pub const HEADER_IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Everything a request needs, shared by every connection.
#[derive(Debug)]
pub struct AppState {
    config: Config,
    keys: KeyRing,
    token_limits: Limits,
    ledger: Arc<dyn Ledger>,
    cache: VerifyCache,
    clients: HashMap<String, reqwest::Client>,
    metrics: Metrics,
    events: EventBus,
    /// One permit per request-body byte buffered at once (`max_inflight_body_bytes`).
    body_budget: Arc<Semaphore>,
}

impl AppState {
    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The ledger.
    pub fn ledger(&self) -> &Arc<dyn Ledger> {
        &self.ledger
    }

    /// The event bus (claims and refusals of this proxy; the admin plane adds its own).
    pub fn events(&self) -> &EventBus {
        &self.events
    }
}

/// The built proxy: state plus router; run it with `App::serve`.
#[derive(Debug, Clone)]
pub struct App {
    pub(crate) state: Arc<AppState>,
}

impl App {
    /// The shared state.
    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// The router (same as [`app`]).
    pub fn router(&self) -> Router {
        app(self.state.clone())
    }
}

impl Config {
    /// Composition root: builds the upstream clients and the shared state.
    pub fn build(self, keys: KeyRing, ledger: Arc<dyn Ledger>) -> Result<App, ConfigError> {
        let mut clients = HashMap::new();
        for (name, up) in &self.upstreams {
            if let Some(record) = &up.credential_store {
                if up.credential.current().expose().is_empty() {
                    return Err(ConfigError::Invalid {
                        key: format!("upstreams.{name}.credential"),
                        reason: format!(
                            "store record `{record}` was not opened \
                             (Config::resolve_store_credentials)"
                        ),
                    });
                }
            }
            clients.insert(name.clone(), upstream_client(up, &self)?);
        }
        let cache = VerifyCache::new(self.limits.verify_cache_entries);
        let budget = usize::try_from(self.limits.max_inflight_body_bytes)
            .unwrap_or(usize::MAX)
            .min(Semaphore::MAX_PERMITS);
        let body_budget = Arc::new(Semaphore::new(budget));
        let state = AppState {
            config: self,
            keys,
            token_limits: Limits::default(),
            ledger,
            cache,
            clients,
            metrics: Metrics::default(),
            events: EventBus::new(),
            body_budget,
        };
        Ok(App {
            state: Arc::new(state),
        })
    }
}

fn upstream_client(up: &Upstream, config: &Config) -> Result<reqwest::Client, ConfigError> {
    let fail = |reason: String| ConfigError::Client {
        upstream: up.name.clone(),
        reason,
    };
    let mut b = reqwest::Client::builder()
        .use_rustls_tls()
        // Never follow: a redirect is the upstream's answer, returned to the client as is.
        .redirect(reqwest::redirect::Policy::none())
        // The upstream host comes only from config, never from HTTP(S)_PROXY.
        .no_proxy()
        .connect_timeout(config.limits.upstream_connect_timeout)
        .read_timeout(config.limits.upstream_response_timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_nodelay(true);
    if let Some(pem) = &up.ca_pem {
        let certs = reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| fail(format!("ca_file: {e}")))?;
        for c in certs {
            b = b.add_root_certificate(c);
        }
    }
    b.build().map_err(|e| fail(e.to_string()))
}

/// The router: `/_till/health`, `/_till/ready`, `/_till/metrics`, and every other path
/// proxied as `/{upstream}/{path...}`.
pub fn app(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/_till/health", get(health))
        .route("/_till/ready", get(ready))
        .route("/_till/metrics", get(metrics))
        .fallback(proxy)
        .with_state(state)
}

async fn health() -> impl IntoResponse {
    axum::Json(serde_json::json!({ "status": "ok" }))
}

async fn ready(State(s): State<Arc<AppState>>) -> Response {
    let probe = [Level {
        revocation_id: vec![0; 64],
        cap: None,
    }];
    let answer =
        tokio::time::timeout(s.config.limits.ledger_claim_timeout, s.ledger.usage(&probe)).await;
    match answer {
        Ok(Ok(_)) => axum::Json(serde_json::json!({ "status": "ready" })).into_response(),
        _ => ProxyError::LedgerUnavailable.into_response(),
    }
}

async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)],
        s.metrics.render(s.events.subscribers()),
    )
        .into_response()
}

/// What the request log line says about a request (never a key or credential).
#[derive(Debug, Default)]
struct RequestLog {
    upstream: Option<String>,
    family: Option<String>,
    block: Option<usize>,
    slot: Option<u64>,
    replayed: bool,
    /// The claim was given back (void receipt): the upstream was unreachable.
    voided: bool,
    /// What the event bus gets, filled only when someone subscribes.
    event: Option<EventFacts>,
}

/// The facts of a request for its [`Event`] (full hex ids; never a key).
#[derive(Debug, Default)]
struct EventFacts {
    family: Option<String>,
    block: Option<String>,
    claim: Option<(u64, Option<u64>, bool)>,
    /// The void of the claim: (void receipt seq, remaining after it).
    void: Option<(u64, Option<u64>)>,
    path: String,
    model: Option<String>,
    /// Alerts the claim fired (committed with it).
    alerts: Vec<till_ledger::AlertRecord>,
}

async fn proxy(State(s): State<Arc<AppState>>, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let mut log = RequestLog::default();
    let response = match s.handle(req, &mut log).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    s.logging(&log, &method, &response, started.elapsed());
    s.publish(&log, &method, &response);
    response
}

impl AppState {
    async fn handle(&self, req: Request, log: &mut RequestLog) -> Result<Response, ProxyError> {
        let (parts, body) = req.into_parts();
        let (target, upstream) = self.request_filter(&parts)?;
        log.upstream = Some(target.upstream.clone());
        let (key, cached) = self.authenticate(&parts.headers, parts.uri.query())?;
        let token = &key.token;
        log.family = Some(short_hex(token.family_id()));
        log.block = token.blocks().len().checked_sub(1);
        if self.events.has_subscribers() {
            log.event = Some(EventFacts {
                family: Some(hex::encode(token.family_id())),
                block: token.blocks().last().map(|b| hex::encode(&b.revocation_id)),
                path: target.path.clone(),
                ..EventFacts::default()
            });
        }
        let idempotency_key = idempotency_key(&parts.headers)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        // Everything that does not need the body is decided before a byte of it is read.
        let needs = CallNeeds::of(token.scope());
        let path_facts = CallFacts {
            repo: needs
                .repo
                .then(|| preset::github_repo(&target.path))
                .flatten(),
            ..CallFacts::default()
        };
        self.authorize_before_body(&key, &target, parts.method.as_str(), &path_facts, now)?;
        let body_caveat = (upstream.model == ModelSource::JsonBody
            && token.scope().models.is_some())
            || needs.json_body(upstream.preset);
        if body_caveat && !preset::is_json_content_type(&parts.headers) {
            return Err(ProxyError::ContentTypeNotJson);
        }
        let (body, _budget) = self.read_body(&parts.headers, body).await?;
        let form = is_form(&parts.headers);
        if form && std::str::from_utf8(&body).is_ok_and(hygiene::has_method_param) {
            return Err(ProxyError::MethodOverride("_method form field"));
        }
        let call = preset::call_facts(
            upstream.preset,
            &needs,
            &target.path,
            parts.uri.query(),
            form,
            &body,
        )
        .map_err(|e| match e {
            BodyFactError::Ambiguous(what) => ProxyError::AmbiguousBody(what),
            BodyFactError::Invalid(what) => ProxyError::BodyFieldInvalid(what),
        })?;
        let model = match upstream.model {
            ModelSource::None => None,
            ModelSource::JsonBody => {
                preset::json_model(&body).map_err(|a| ProxyError::AmbiguousBody(a.0))?
            }
            ModelSource::GeminiPath => preset::gemini_model(&target.path).map(str::to_string),
        };
        self.authorize(
            token,
            cached,
            &target,
            parts.method.as_str(),
            model.as_deref(),
            &call,
            now,
        )?;
        // The query the upstream will see (before the credential is added): in the
        // digest, so that one idempotency key cannot buy two different upstream requests,
        // and forwarded as is.
        let query = hygiene::forward_query(
            parts.uri.query(),
            match &upstream.auth {
                Auth::Query { param } => Some(param.as_str()),
                Auth::Header { .. } => None,
            },
        );
        let digest = RequestDigest {
            method: parts.method.as_str().to_string(),
            upstream: target.upstream.clone(),
            path: target.path.clone(),
            body_sha256: hex::encode(Sha256::digest(&body)),
            model,
            query: query.clone(),
            content_type: content_type_digest(&parts.headers),
        };
        let windows = windows_of(token);
        let claim = self
            .claim(&key, idempotency_key, digest, now, windows.clone())
            .await?;
        log.slot = claim.receipt.body().slots.last().map(|s| s.slot);
        log.replayed = claim.replayed;
        if let Some(facts) = log.event.as_mut() {
            facts.claim = Some((claim.receipt.body().seq, claim.remaining, claim.replayed));
            facts.model = claim.receipt.body().request.model.clone();
            facts.alerts.clone_from(&claim.alerts);
        }
        let till_headers = till_headers(&claim)?;
        // One snapshot of the credential for this request: a rotation meanwhile
        // (`till credential rotate`) reaches the next request, never half of this one.
        let credential = upstream.credential.current();
        let forwarded =
            match self.upstream_request(upstream, &credential, &target, &parts, query, body) {
                Ok(request) => self.forward(upstream, request).await,
                Err(e) => Err(e),
            };
        match forwarded {
            Ok(response) => Ok(response_filter(response, till_headers, credential.expose())),
            // Nothing of the request was sent (the connect phase failed): give the slot
            // back. A replay's slot belongs to the original claim and is never voided.
            Err(ProxyError::UpstreamUnreachable(name)) if !claim.replayed => Ok(self
                .give_back(&claim, windows, name, till_headers, log)
                .await),
            // The claim committed: the client gets its receipt with the error, so it can
            // prove what it was charged.
            Err(e) => {
                let mut resp = e.into_response();
                for (k, v) in till_headers {
                    resp.headers_mut().insert(k, v);
                }
                Ok(resp)
            }
        }
    }

    /// Phase 1: the target. The upstream host comes only from config: absolute-form
    /// targets are refused (HTTP/1; HTTP/2 always carries an authority, which is
    /// ignored) and `Host` is never read.
    fn request_filter(
        &self,
        parts: &http::request::Parts,
    ) -> Result<(Target, &Upstream), ProxyError> {
        if parts.version < Version::HTTP_2
            && (parts.uri.scheme().is_some() || parts.uri.authority().is_some())
        {
            return Err(ProxyError::AbsoluteTarget);
        }
        if parts.method == Method::CONNECT {
            return Err(ProxyError::AbsoluteTarget);
        }
        // TRACE would echo the injected credential back to the client.
        if parts.method == Method::TRACE || parts.method.as_str() == "TRACK" {
            return Err(ProxyError::MethodNotSupported(parts.method.to_string()));
        }
        // No preset needs a protocol switch; refusing it keeps every later request of the
        // connection under the framing guard.
        if parts.headers.contains_key(header::UPGRADE) {
            return Err(ProxyError::UpgradeRefused);
        }
        if let Some(what) = hygiene::method_override(&parts.headers, parts.uri.query()) {
            return Err(ProxyError::MethodOverride(what));
        }
        let target =
            route::parse(parts.uri.path()).map_err(|p| ProxyError::BadPath(p.describe()))?;
        let upstream = self
            .config
            .upstreams
            .get(&target.upstream)
            .ok_or_else(|| ProxyError::UnknownUpstream(target.upstream.clone()))?;
        Ok((target, upstream))
    }

    /// Phase 2: find and verify the key. Only successful verifications are cached. The
    /// flag says whether it came from the cache (then authorization skips the Datalog).
    fn authenticate(
        &self,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<(Arc<VerifiedKey>, bool), ProxyError> {
        let (_, key) = hygiene::find_key(headers, query).ok_or(ProxyError::KeyMissing)?;
        let digest = key_digest(&key);
        // A cached key whose root key was retired since (a reload replaced the ring)
        // is verified again, and refused.
        if let Some(t) = self
            .cache
            .get(&digest)
            .filter(|t| self.keys.contains(t.token.root_key_id()))
        {
            self.metrics.cache_lookup(true);
            return Ok((t, true));
        }
        self.metrics.cache_lookup(false);
        let token = verify(&key, &self.keys, &self.token_limits).map_err(ProxyError::Key)?;
        let verified = Arc::new(VerifiedKey::new(token));
        self.cache.insert(digest, Arc::clone(&verified));
        Ok((verified, false))
    }

    /// Phase 3 (part): every scope caveat that needs no body — upstream, expiry, method,
    /// path, a cap of 0 — so a dead or out-of-scope key is refused before its body is read.
    /// The model (and the Datalog checks) follow in [`AppState::authorize`].
    fn authorize_before_body(
        &self,
        key: &VerifiedKey,
        target: &Target,
        method: &str,
        path_facts: &CallFacts,
        now: u64,
    ) -> Result<(), ProxyError> {
        let facts = RequestFacts {
            upstream: &target.upstream,
            method,
            path: &target.path,
            model: None,
            now: i64::try_from(now).unwrap_or(i64::MAX),
        };
        // Caveats read from the body wait for it (`before_body` leaves them out); the
        // repository is in the path.
        for (b, without_body) in key.token.blocks().iter().zip(&key.before_body) {
            till_token::check_block_call(b.index, without_body, &facts, path_facts, 1)
                .map_err(ProxyError::Refused)?;
        }
        Ok(())
    }

    /// Phase 3: the body, bounded by `max_body_bytes` before any claim: `Content-Length`
    /// is checked first, and bytes are counted while buffering (chunked bodies). Every
    /// buffered byte also takes a permit of the global `max_inflight_body_bytes` budget,
    /// held (the returned permit) until the request was forwarded; an exhausted budget is
    /// `503 body_budget_exceeded` right away (nothing claimed, safe to retry).
    async fn read_body(
        &self,
        headers: &HeaderMap,
        mut body: Body,
    ) -> Result<(Bytes, Option<OwnedSemaphorePermit>), ProxyError> {
        let max = self.config.limits.max_body_bytes;
        if let Some(len) = headers.get(header::CONTENT_LENGTH) {
            let len = len
                .to_str()
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .ok_or(ProxyError::BodyRead)?;
            if len > max {
                return Err(ProxyError::BodyTooLarge { max });
            }
        }
        let mut buf: Vec<u8> = Vec::new();
        let mut permit: Option<OwnedSemaphorePermit> = None;
        loop {
            let frame = tokio::time::timeout(self.config.limits.idle_timeout, body.frame()).await;
            match frame {
                Err(_) => return Err(ProxyError::BodyTimeout),
                Ok(None) => break,
                Ok(Some(Err(_))) => return Err(ProxyError::BodyRead),
                Ok(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        if (buf.len() + data.len()) as u64 > max {
                            return Err(ProxyError::BodyTooLarge { max });
                        }
                        if !data.is_empty() {
                            let n = u32::try_from(data.len())
                                .map_err(|_| ProxyError::BodyTooLarge { max })?;
                            let more = self
                                .body_budget
                                .clone()
                                .try_acquire_many_owned(n)
                                .map_err(|_| ProxyError::BodyBudgetExceeded)?;
                            match permit.as_mut() {
                                Some(p) => p.merge(more),
                                None => permit = Some(more),
                            }
                        }
                        buf.extend_from_slice(&data);
                    }
                }
            }
        }
        Ok((Bytes::from(buf), permit))
    }

    /// Phase 4: scope caveats with no counts (the ledger enforces caps in the claim).
    #[allow(clippy::too_many_arguments)]
    fn authorize(
        &self,
        token: &VerifiedToken,
        cached: bool,
        target: &Target,
        method: &str,
        model: Option<&str>,
        call: &CallFacts,
        now: u64,
    ) -> Result<(), ProxyError> {
        let facts = RequestFacts {
            upstream: &target.upstream,
            method,
            path: &target.path,
            model,
            now: i64::try_from(now).unwrap_or(i64::MAX),
        };
        if cached {
            // A key verified before: its Datalog already ran once, and for a verified key
            // the pure check decides alike (crate::cache::pure_authorize).
            return crate::cache::pure_authorize(token, &facts, call).map_err(ProxyError::Refused);
        }
        token
            .authorize_call(&facts, call, None, &self.token_limits)
            .map_err(|e| match e {
                AuthorizeError::Refused(r) => ProxyError::Refused(r),
                AuthorizeError::Token(t) => ProxyError::Key(t),
                _ => ProxyError::Internal,
            })
    }

    /// Phase 5: ONE ledger transaction. Fail closed on anything but a decision.
    async fn claim(
        &self,
        key: &VerifiedKey,
        idempotency_key: Option<String>,
        request: RequestDigest,
        now: u64,
        windows: Vec<WindowCap>,
    ) -> Result<Claim, ProxyError> {
        let token = &key.token;
        let levels = token
            .blocks()
            .iter()
            .map(|b| Level {
                revocation_id: b.revocation_id.clone(),
                cap: b.caveats.cap,
            })
            .collect();
        let not_after = token.scope().expires.map(|e| u64::try_from(e).unwrap_or(0));
        let req = ClaimRequest {
            levels,
            idempotency_key,
            request,
            now,
            not_after,
            meta: Some(Arc::clone(&key.meta)),
            windows,
            ceilings: ceilings(token.scope()),
        };
        // The ledger has its own timeout; this one bounds a backend that ignores it.
        let limit = self.config.limits.ledger_claim_timeout + Duration::from_millis(500);
        let started = Instant::now();
        let outcome = tokio::time::timeout(limit, self.ledger.claim(req)).await;
        let took = started.elapsed();
        match outcome {
            Ok(Ok(Ok(claim))) => {
                self.metrics.claim(
                    if claim.replayed {
                        ClaimOutcome::Replayed
                    } else {
                        ClaimOutcome::Claimed
                    },
                    took,
                );
                Ok(claim)
            }
            Ok(Ok(Err(refusal))) => {
                self.metrics.claim(ClaimOutcome::Refused, took);
                Err(ProxyError::LedgerRefused(refusal))
            }
            Ok(Err(e)) => {
                self.metrics.claim(ClaimOutcome::Error, took);
                tracing::warn!(error = %e, "ledger claim failed; refusing with 503");
                Err(ProxyError::LedgerUnavailable)
            }
            Err(_) => {
                self.metrics.claim(ClaimOutcome::Error, took);
                tracing::warn!("ledger claim timed out; refusing with 503");
                Err(ProxyError::LedgerUnavailable)
            }
        }
    }

    /// Phase 7b: the upstream was unreachable and nothing of the request was sent (the
    /// connect phase failed: refused, DNS, TLS handshake), so the committed claim is given
    /// back (spec/ledger.md §3.5): `502 upstream_unreachable` with `x-should-retry: true`,
    /// the void receipt and the restored remaining count. If the void fails, fail closed:
    /// the slot stays spent and the answer is the plain 502 with the claim's receipt and
    /// `x-should-retry: false` (a retry would be charged again).
    async fn give_back(
        &self,
        claim: &Claim,
        windows: Vec<WindowCap>,
        upstream: String,
        claim_headers: Vec<(HeaderName, HeaderValue)>,
        log: &mut RequestLog,
    ) -> Response {
        let body = claim.receipt.body();
        let seq = body.seq;
        let family = hex::decode(&body.family).unwrap_or_default();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let req = VoidRequest {
            family,
            seq,
            now,
            windows,
        };
        let limit = self.config.limits.ledger_claim_timeout + Duration::from_millis(500);
        let outcome = tokio::time::timeout(limit, self.ledger.void(req)).await;
        let voided = match outcome {
            Ok(Ok(voided)) => Ok(voided),
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".to_owned()),
        };
        match voided.and_then(|v| {
            let receipt = HeaderValue::from_str(v.receipt.compact())
                .map_err(|_| "void receipt is not a header value".to_owned())?;
            Ok((v, receipt))
        }) {
            Ok((voided, receipt)) => {
                self.metrics.void(true);
                log.voided = true;
                log.slot = None;
                if let Some(facts) = log.event.as_mut() {
                    facts.void = Some((voided.receipt.body().seq, voided.remaining));
                }
                let mut resp = ProxyError::UpstreamUnreachableVoided(upstream).into_response();
                let h = resp.headers_mut();
                h.insert(HeaderName::from_static(HEADER_RECEIPT), receipt);
                if let Some(n) = voided.remaining {
                    h.insert(
                        HeaderName::from_static(HEADER_REMAINING),
                        HeaderValue::from(n),
                    );
                }
                resp
            }
            Err(why) => {
                self.metrics.void(false);
                tracing::warn!(
                    family = %short_hex(&hex::decode(&body.family).unwrap_or_default()),
                    seq,
                    error = %why,
                    "could not give back the claim of an unreachable upstream; the activation stays spent"
                );
                let mut resp = ProxyError::UpstreamUnreachable(upstream).into_response();
                for (k, v) in claim_headers {
                    resp.headers_mut().insert(k, v);
                }
                resp
            }
        }
    }

    /// Phase 6: the request the upstream sees. `query` is the client's query as forwarded
    /// ([`hygiene::forward_query`], the one in the receipt's digest).
    fn upstream_request(
        &self,
        upstream: &Upstream,
        credential: &crate::secret::Secret,
        target: &Target,
        parts: &http::request::Parts,
        mut query: Option<String>,
        body: Bytes,
    ) -> Result<reqwest::Request, ProxyError> {
        let (credential_header, query_param) = match &upstream.auth {
            Auth::Header { name, .. } => (Some(name), None),
            Auth::Query { param } => (None, Some(param.as_str())),
        };
        if let Some(param) = query_param {
            let pair = format!("{param}={}", hygiene::form_encode(credential.expose()));
            query = Some(match query {
                Some(q) => format!("{q}&{pair}"),
                None => pair,
            });
        }
        let mut url = format!("{}{}", upstream.base_url, target.encoded_path);
        if let Some(q) = &query {
            url.push('?');
            url.push_str(q);
        }
        let url = reqwest::Url::parse(&url)
            .map_err(|_| ProxyError::BadPath("the path cannot be forwarded"))?;
        // Defence in depth: whatever the path did, the host is the configured one.
        let (host, port) = &upstream.origin;
        if url.host_str() != Some(host.as_str()) || url.port_or_known_default() != *port {
            return Err(ProxyError::Internal);
        }
        let mut headers = hygiene::request_headers(&parts.headers, credential_header);
        if let Auth::Header { name, scheme } = &upstream.auth {
            let text = match scheme {
                Some(s) => format!("{s} {}", credential.expose()),
                None => credential.expose().to_string(),
            };
            let mut value = HeaderValue::from_str(&text).map_err(|_| ProxyError::Internal)?;
            value.set_sensitive(true);
            headers.insert(name.clone(), value);
        }
        let mut req = reqwest::Request::new(parts.method.clone(), url);
        *req.headers_mut() = headers;
        *req.body_mut() = Some(reqwest::Body::from(body));
        Ok(req)
    }

    /// Phase 7: send it. No retries, no redirects.
    async fn forward(
        &self,
        upstream: &Upstream,
        req: reqwest::Request,
    ) -> Result<reqwest::Response, ProxyError> {
        let client = self
            .clients
            .get(&upstream.name)
            .ok_or(ProxyError::Internal)?;
        let limit = self.config.limits.upstream_response_timeout;
        let started = Instant::now();
        let sent = tokio::time::timeout(limit, client.execute(req)).await;
        self.metrics.upstream(&upstream.name, started.elapsed());
        match sent {
            Err(_) => Err(ProxyError::UpstreamTimeout(upstream.name.clone())),
            Ok(Ok(resp)) => Ok(resp),
            Ok(Err(e)) if e.is_timeout() => Err(ProxyError::UpstreamTimeout(upstream.name.clone())),
            Ok(Err(e)) if e.is_connect() => {
                tracing::warn!(upstream = %upstream.name, error = %error_chain(e), "upstream unreachable");
                Err(ProxyError::UpstreamUnreachable(upstream.name.clone()))
            }
            Ok(Err(e)) => {
                tracing::warn!(upstream = %upstream.name, error = %error_chain(e), "upstream request failed");
                Err(ProxyError::UpstreamFailed(upstream.name.clone()))
            }
        }
    }

    /// Phase 9 (part): the event of this request, for subscribers of the bus. A request
    /// whose claim committed is a `claim` event whatever the upstream answered (the slot
    /// is spent); any other refusal is a `refusal` event with its code.
    fn publish(&self, log: &RequestLog, method: &Method, response: &Response) {
        if !self.events.has_subscribers() {
            return;
        }
        let at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let facts = log.event.as_ref();
        let event = match facts.and_then(|f| f.claim.map(|c| (f, c))) {
            Some((f, (seq, remaining, replayed))) => Event::Claim {
                at,
                family: f.family.clone().unwrap_or_default(),
                block: f.block.clone().unwrap_or_default(),
                block_index: log.block.unwrap_or(0),
                seq,
                remaining,
                replayed,
                upstream: log.upstream.clone().unwrap_or_default(),
                method: method.to_string(),
                path: f.path.clone(),
                model: f.model.clone(),
                proxy: self.config.proxy_id.clone(),
            },
            None => {
                let Some(code) = response.extensions().get::<ErrorCode>() else {
                    return;
                };
                Event::Refusal {
                    at,
                    family: facts.and_then(|f| f.family.clone()),
                    status: response.status().as_u16(),
                    code: code.0.to_string(),
                    upstream: log.upstream.clone(),
                    method: method.to_string(),
                }
            }
        };
        self.events.publish(event);
        if let (Some(f), Some((void_seq, remaining))) = (facts, facts.and_then(|f| f.void)) {
            self.events.publish(Event::Void {
                at,
                family: f.family.clone().unwrap_or_default(),
                block: f.block.clone().unwrap_or_default(),
                seq: f.claim.map_or(0, |c| c.0),
                void_seq,
                remaining,
                upstream: log.upstream.clone().unwrap_or_default(),
                proxy: self.config.proxy_id.clone(),
            });
        }
        for alert in facts.map(|f| f.alerts.as_slice()).unwrap_or_default() {
            self.events.publish(Event::Alert {
                alert: serde_json::to_value(alert).unwrap_or_default(),
            });
        }
    }

    /// Phase 9: one log line and the metrics.
    fn logging(&self, log: &RequestLog, method: &Method, response: &Response, latency: Duration) {
        let status = response.status();
        let code = response
            .extensions()
            .get::<ErrorCode>()
            .map(|c| c.0)
            .unwrap_or("ok");
        self.metrics.request(
            log.upstream.as_deref().unwrap_or("-"),
            status.as_u16(),
            code,
            latency,
        );
        let latency_ms = latency.as_secs_f64() * 1000.0;
        tracing::info!(
            target: "till::request",
            family = log.family.as_deref().unwrap_or("-"),
            block = log.block.map(|b| b as i64).unwrap_or(-1),
            slot = log.slot.unwrap_or(0),
            replayed = log.replayed,
            voided = log.voided,
            upstream = log.upstream.as_deref().unwrap_or("-"),
            method = %method,
            status = status.as_u16(),
            code,
            latency_ms = format!("{latency_ms:.2}"),
        );
    }
}

/// The windowed caps of the token's blocks, as the claim (and a void of it) names them.
fn windows_of(token: &VerifiedToken) -> Vec<WindowCap> {
    token
        .blocks()
        .iter()
        .flat_map(|b| {
            b.caveats.windows.iter().flatten().map(|w| WindowCap {
                level: b.index,
                secs: w.secs,
                max: w.max,
            })
        })
        .collect()
}

/// Phase 3 (part): the `Idempotency-Key` header, validated (no CR/LF or other bytes
/// Till would copy into a receipt or header).
fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ProxyError> {
    let mut values = headers.get_all(HEADER_IDEMPOTENCY_KEY).iter();
    let Some(v) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() || !hygiene::valid_idempotency_key(v.as_bytes()) {
        return Err(ProxyError::BadIdempotencyKey);
    }
    v.to_str()
        .map(|s| Some(s.to_string()))
        .map_err(|_| ProxyError::BadIdempotencyKey)
}

fn till_headers(claim: &Claim) -> Result<Vec<(HeaderName, HeaderValue)>, ProxyError> {
    let mut out = Vec::with_capacity(3);
    let receipt =
        HeaderValue::from_str(claim.receipt.compact()).map_err(|_| ProxyError::Internal)?;
    out.push((HeaderName::from_static(HEADER_RECEIPT), receipt));
    if let Some(n) = claim.remaining {
        out.push((
            HeaderName::from_static(HEADER_REMAINING),
            HeaderValue::from(n),
        ));
    }
    if claim.replayed {
        out.push((
            HeaderName::from_static(HEADER_REPLAYED),
            HeaderValue::from_static("true"),
        ));
    }
    Ok(out)
}

/// Phase 8: status and headers from the upstream, hop-by-hop out, the real credential
/// scrubbed from every header, `Till-*` in; the body is streamed chunk by chunk (dropping
/// it — the client went away — drops the upstream connection).
fn response_filter(
    upstream: reqwest::Response,
    till: Vec<(HeaderName, HeaderValue)>,
    credential: &str,
) -> Response {
    let status =
        StatusCode::from_u16(upstream.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    let mut headers = hygiene::response_headers(upstream.headers());
    hygiene::scrub_secret(&mut headers, credential);
    for (k, v) in till {
        headers.insert(k, v);
    }
    let mut resp = Response::new(Body::from_stream(upstream.bytes_stream()));
    *resp.status_mut() = status;
    *resp.headers_mut() = headers;
    resp
}

/// The per-call ceilings and windowed caps that applied (effective over the key's blocks),
/// for the receipt. `None` when the key has none.
fn ceilings(scope: &till_token::EffectiveScope) -> Option<till_receipt::Ceilings> {
    let c = till_receipt::Ceilings {
        max_output_tokens: scope.max_output_tokens,
        amount_max: scope.amount_max,
        currencies: scope.currencies.clone(),
        repos: scope.repos.clone(),
        json_max: scope.json_max.clone(),
        json_allow: scope.json_allow.clone(),
        windows: scope
            .windows
            .as_ref()
            .map(|ws| ws.iter().map(|w| [w.secs, w.max]).collect()),
    };
    (!c.is_empty()).then_some(c)
}

/// True when the request's `Content-Type` is `application/x-www-form-urlencoded`.
fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| {
            v.split(';')
                .next()
                .unwrap_or_default()
                .trim()
                .eq_ignore_ascii_case("application/x-www-form-urlencoded")
        })
}

/// The request's `Content-Type` for the request digest: every value in order (joined
/// by `, `), each with its media type and parameter names in lower case and without
/// optional whitespace; bytes outside visible ASCII (and `%`) percent-encoded so that
/// distinct values stay distinct. `None` when the request has no `Content-Type`.
fn content_type_digest(headers: &HeaderMap) -> Option<String> {
    let values: Vec<String> = headers
        .get_all(header::CONTENT_TYPE)
        .iter()
        .map(|v| {
            let text = percent_escape(v.as_bytes());
            let mut pieces = text.split(';').map(str::trim);
            let mut out = pieces.next().unwrap_or_default().to_ascii_lowercase();
            for param in pieces {
                out.push(';');
                match param.split_once('=') {
                    Some((name, value)) => {
                        out.push_str(&name.trim().to_ascii_lowercase());
                        out.push('=');
                        out.push_str(value.trim());
                    }
                    None => out.push_str(param),
                }
            }
            out
        })
        .collect();
    (!values.is_empty()).then(|| values.join(", "))
}

fn percent_escape(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len());
    for &b in bytes {
        if (0x20..0x7f).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn short_hex(bytes: &[u8]) -> String {
    let mut h = hex::encode(bytes.get(..8).unwrap_or(bytes));
    h.truncate(16);
    h
}

/// The error and its sources, for logs (reqwest's messages carry no credentials; the URL
/// may carry a query-injected one, so it is stripped).
fn error_chain(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut out = e.to_string();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

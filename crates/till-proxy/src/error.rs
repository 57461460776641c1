//! Errors: configuration errors, and the ONE mapping of request failures to HTTP.
//!
//! Every refusal a client can see is a [`ProxyError`]; [`ProxyError::status`] and
//! [`ProxyError::code`] are the whole mapping (stable codes, listed in `spec/http.md`).
//! Messages say what to do and never contain a key, a credential or internal detail.

use std::path::PathBuf;

use axum::response::{IntoResponse, Response};
use http::{header, HeaderValue, StatusCode};

/// Why the configuration is unusable.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config {}: {reason}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        reason: String,
    },
    /// The file is not valid TOML or has unknown keys.
    #[error("invalid config{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Parse {
        /// The file, when known.
        path: Option<PathBuf>,
        /// The parser's message (line, column, key).
        reason: String,
    },
    /// A value is invalid.
    #[error("invalid config value `{key}`: {reason}")]
    Invalid {
        /// Dotted key, e.g. `upstreams.openai.base_url`.
        key: String,
        /// What is wrong and what is expected.
        reason: String,
    },
    /// An upstream HTTP client could not be built (e.g. a CA file rustls refuses).
    #[error("cannot set up upstream `{upstream}`: {reason}")]
    Client {
        /// Upstream name.
        upstream: String,
        /// Why.
        reason: String,
    },
}

/// Where a failure came from, for logs and metrics (pingora-style).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The client's request.
    Client,
    /// The upstream.
    Upstream,
    /// Till itself (ledger, signing).
    Internal,
}

/// A request Till refused or could not complete. One variant per stable code family.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProxyError {
    /// Absolute-form request target (`GET http://host/ HTTP/1.1`).
    #[error("absolute-form request targets are not accepted; send the path only")]
    AbsoluteTarget,
    /// The path broke a normalisation rule.
    #[error("{0}")]
    BadPath(&'static str),
    /// Content-Length together with Transfer-Encoding (request smuggling).
    #[error("ambiguous request framing: Content-Length together with Transfer-Encoding")]
    BadFraming,
    /// No upstream of that name is configured.
    #[error("no upstream named `{0}` is configured")]
    UnknownUpstream(String),
    /// An `Upgrade` request on a proxied route (no preset needs one).
    #[error("protocol upgrades (Upgrade header) are not proxied")]
    UpgradeRefused,
    /// `TRACE`/`TRACK`: would echo the injected credential back.
    #[error("method {0} is not supported")]
    MethodNotSupported(String),
    /// `X-HTTP-Method-Override`, `X-HTTP-Method`, `X-Method-Override` or a `_method`
    /// query (or form body) parameter: the upstream may act on another method than the
    /// one the key's scope was checked against.
    #[error("method override ({0}) is not allowed: send the real HTTP method")]
    MethodOverride(&'static str),
    /// A caveat reads the body, but it is not JSON (`application/json` or `+json`).
    #[error("this key's scope is read from a JSON body: send `Content-Type: application/json`")]
    ContentTypeNotJson,
    /// The JSON body names a field a caveat reads more than once (`model`, `MODEL`).
    #[error("the JSON body has more than one `{0}` field (in any letter case)")]
    AmbiguousBody(&'static str),
    /// A body member a caveat reads has a value of the wrong kind (`"max_tokens": 1.5`,
    /// `amount=12.50`).
    #[error("this key reads the request's {0}, which must be a non-negative integer (or absent)")]
    BodyFieldInvalid(&'static str),
    /// No key presented.
    #[error("no Till key: send it where your SDK sends its API key (Authorization: Bearer, x-api-key, x-goog-api-key or ?key=)")]
    KeyMissing,
    /// The key failed parsing or verification.
    #[error("{0}")]
    Key(till_token::TokenError),
    /// A caveat refused the request (scope, expiry).
    #[error("{0}")]
    Refused(till_token::Refusal),
    /// The ledger refused the claim (cap, revocation, expiry, idempotency).
    #[error("{0}")]
    LedgerRefused(till_ledger::Refusal),
    /// `Idempotency-Key` is not 1-255 printable ASCII bytes, or sent twice.
    #[error("Idempotency-Key must be 1-255 printable ASCII characters, sent once")]
    BadIdempotencyKey,
    /// The body is larger than `limits.max_body_bytes`.
    #[error("request body larger than {max} bytes")]
    BodyTooLarge {
        /// The limit.
        max: u64,
    },
    /// The client paused longer than `limits.idle_timeout` while sending the body.
    #[error("timed out reading the request body")]
    BodyTimeout,
    /// The client's body could not be read (connection reset, bad chunk framing).
    #[error("could not read the request body")]
    BodyRead,
    /// Bodies in flight already use `limits.max_inflight_body_bytes`.
    #[error("too many request bodies in flight; nothing was forwarded or charged, retry later")]
    BodyBudgetExceeded,
    /// The ledger could not decide (unavailable, timed out, signing failed).
    #[error("activation ledger unavailable; nothing was forwarded or charged, retry later")]
    LedgerUnavailable,
    /// The upstream could not be reached (connect refused, DNS, TLS).
    #[error("upstream `{0}` is unreachable")]
    UpstreamUnreachable(String),
    /// The upstream could not be reached before anything of the request was sent, and
    /// the activation was given back (a void receipt is in `till-receipt`): retrying is
    /// charged only once.
    #[error(
        "upstream `{0}` is unreachable; nothing was sent and the activation was given back \
         (void receipt in the till-receipt header), retry later"
    )]
    UpstreamUnreachableVoided(String),
    /// The upstream did not answer in time.
    #[error("upstream `{0}` did not respond in time")]
    UpstreamTimeout(String),
    /// The upstream's answer broke off or was malformed.
    #[error("upstream `{0}` failed")]
    UpstreamFailed(String),
    /// An invariant Till relies on did not hold (a bug). Nothing was forwarded.
    #[error("internal error")]
    Internal,
}

impl ProxyError {
    /// HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::AbsoluteTarget
            | ProxyError::BadPath(_)
            | ProxyError::BadFraming
            | ProxyError::BadIdempotencyKey
            | ProxyError::UpgradeRefused
            | ProxyError::MethodOverride(_)
            | ProxyError::AmbiguousBody(_)
            | ProxyError::BodyFieldInvalid(_)
            | ProxyError::BodyRead => StatusCode::BAD_REQUEST,
            ProxyError::MethodNotSupported(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::ContentTypeNotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ProxyError::UnknownUpstream(_) => StatusCode::NOT_FOUND,
            ProxyError::KeyMissing | ProxyError::Key(_) => StatusCode::UNAUTHORIZED,
            ProxyError::Refused(r) if r.code == "key_expired" => StatusCode::UNAUTHORIZED,
            ProxyError::Refused(_) => StatusCode::FORBIDDEN,
            ProxyError::LedgerRefused(r) => match r {
                till_ledger::Refusal::Expired => StatusCode::UNAUTHORIZED,
                till_ledger::Refusal::IdempotencyConflict | till_ledger::Refusal::ReplayLimit => {
                    StatusCode::CONFLICT
                }
                till_ledger::Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
                _ => StatusCode::FORBIDDEN,
            },
            ProxyError::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            ProxyError::LedgerUnavailable
            | ProxyError::BodyBudgetExceeded
            | ProxyError::Internal => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamUnreachableVoided(_)
            | ProxyError::UpstreamFailed(_) => StatusCode::BAD_GATEWAY,
            ProxyError::UpstreamTimeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// Stable machine-readable code (`spec/http.md`).
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::AbsoluteTarget => "absolute_target",
            ProxyError::BadPath(_) => "bad_path",
            ProxyError::BadFraming => "bad_framing",
            ProxyError::UnknownUpstream(_) => "upstream_unknown",
            ProxyError::UpgradeRefused => "upgrade_not_allowed",
            ProxyError::MethodNotSupported(_) => "method_not_supported",
            ProxyError::MethodOverride(_) => "method_override_not_allowed",
            ProxyError::ContentTypeNotJson => "content_type_not_json",
            ProxyError::AmbiguousBody(_) => "body_ambiguous",
            ProxyError::BodyFieldInvalid(_) => "body_field_invalid",
            ProxyError::KeyMissing => "key_missing",
            ProxyError::Key(e) => e.code(),
            ProxyError::Refused(r) => r.code,
            ProxyError::LedgerRefused(r) => r.code(),
            ProxyError::BadIdempotencyKey => "bad_idempotency_key",
            ProxyError::BodyTooLarge { .. } => "body_too_large",
            ProxyError::BodyTimeout => "body_timeout",
            ProxyError::BodyRead => "body_unreadable",
            ProxyError::BodyBudgetExceeded => "body_budget_exceeded",
            ProxyError::LedgerUnavailable => "ledger_unavailable",
            ProxyError::UpstreamUnreachable(_) | ProxyError::UpstreamUnreachableVoided(_) => {
                "upstream_unreachable"
            }
            ProxyError::UpstreamTimeout(_) => "upstream_timeout",
            ProxyError::UpstreamFailed(_) => "upstream_failed",
            ProxyError::Internal => "internal_error",
        }
    }

    /// The `type` field, in the vocabulary LLM SDKs already display.
    pub fn kind(&self) -> &'static str {
        match self.status() {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::CONFLICT => "idempotency_error",
            StatusCode::PAYLOAD_TOO_LARGE => "request_too_large",
            StatusCode::BAD_GATEWAY | StatusCode::GATEWAY_TIMEOUT => "upstream_error",
            StatusCode::SERVICE_UNAVAILABLE => "unavailable_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            _ => "invalid_request_error",
        }
    }

    /// Where the failure came from.
    pub fn origin(&self) -> Origin {
        match self {
            ProxyError::UpstreamUnreachable(_)
            | ProxyError::UpstreamUnreachableVoided(_)
            | ProxyError::UpstreamTimeout(_)
            | ProxyError::UpstreamFailed(_) => Origin::Upstream,
            ProxyError::LedgerUnavailable
            | ProxyError::BodyBudgetExceeded
            | ProxyError::Internal => Origin::Internal,
            _ => Origin::Client,
        }
    }

    /// Whether retrying the same request may succeed without a second charge: the 503s
    /// that are refused before any claim (`ledger_unavailable`, `body_budget_exceeded`), a
    /// 502 `upstream_unreachable` whose claim was voided (given back) and a 429 `rate_limited` whose window frees within
    /// [`MAX_SDK_RETRY_WAIT_SECS`] (nothing charged; SDKs wait `Retry-After` up to about a
    /// minute, then fall back to their own short backoff, which a longer window would
    /// only refuse again). Sent as `x-should-retry` (which the OpenAI and Anthropic SDKs
    /// obey) on every error, with `Retry-After` when true (and on every 429). Everything
    /// else is permanent for this request, or happened after a committed claim (502/504,
    /// `internal_error`), where a retry would be charged again.
    pub fn retryable(&self) -> bool {
        match self {
            ProxyError::LedgerUnavailable
            | ProxyError::BodyBudgetExceeded
            | ProxyError::UpstreamUnreachableVoided(_) => true,
            ProxyError::LedgerRefused(till_ledger::Refusal::RateLimited {
                retry_after, ..
            }) => *retry_after <= MAX_SDK_RETRY_WAIT_SECS,
            _ => false,
        }
    }

    /// `Retry-After` seconds of a retryable error: until the window frees for a
    /// `rate_limited` refusal (nothing was charged), else [`RETRY_AFTER_SECS`].
    pub fn retry_after(&self) -> u64 {
        match self {
            ProxyError::LedgerRefused(till_ledger::Refusal::RateLimited {
                retry_after, ..
            }) => *retry_after,
            _ => RETRY_AFTER_SECS,
        }
    }

    /// The JSON body `{"error":{"type","code","message"}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": { "type": self.kind(), "code": self.code(), "message": self.to_string() }
        })
    }
}

/// The longest `Retry-After` of a `rate_limited` answer that still says
/// `x-should-retry: true`: the OpenAI and Anthropic SDKs honour `Retry-After` up to 60 s.
pub const MAX_SDK_RETRY_WAIT_SECS: u64 = 60;

/// Seconds a client should wait before retrying a 503.
pub const RETRY_AFTER_SECS: u64 = 1;

/// Response header the OpenAI and Anthropic SDKs obey over their own retry rules.
pub const HEADER_SHOULD_RETRY: &str = "x-should-retry";

/// `Allow` of a `405 method_not_supported`.
pub const ALLOWED_METHODS: &str = "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS";

impl IntoResponse for ProxyError {
    fn into_response(self) -> Response {
        let mut resp = (self.status(), axum::Json(self.body())).into_response();
        let h = resp.headers_mut();
        if self.retryable() || self.status() == StatusCode::TOO_MANY_REQUESTS {
            h.insert(header::RETRY_AFTER, HeaderValue::from(self.retry_after()));
        }
        h.insert(
            HEADER_SHOULD_RETRY,
            HeaderValue::from_static(if self.retryable() { "true" } else { "false" }),
        );
        if matches!(self, ProxyError::MethodNotSupported(_)) {
            h.insert(header::ALLOW, HeaderValue::from_static(ALLOWED_METHODS));
        }
        if matches!(
            self,
            ProxyError::BadFraming | ProxyError::AbsoluteTarget | ProxyError::UpgradeRefused
        ) {
            // Never reuse a connection whose framing we distrust.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status() == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"till\""),
            );
        }
        resp.extensions_mut().insert(ErrorCode(self.code()));
        resp
    }
}

/// Response extension carrying the error code, for the request log and metrics.
#[derive(Debug, Clone, Copy)]
pub struct ErrorCode(pub &'static str);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_follow_the_design() {
        assert_eq!(ProxyError::KeyMissing.status(), 401);
        assert_eq!(
            ProxyError::Key(till_token::TokenError::BadSignature).code(),
            "key_signature_invalid"
        );
        assert_eq!(
            ProxyError::LedgerRefused(till_ledger::Refusal::CapReached { block: 0, cap: 5 })
                .status(),
            403
        );
        assert_eq!(
            ProxyError::LedgerRefused(till_ledger::Refusal::Expired).status(),
            401
        );
        assert_eq!(ProxyError::LedgerUnavailable.status(), 503);
        assert_eq!(ProxyError::UpstreamTimeout("x".into()).status(), 504);
        assert_eq!(ProxyError::BodyTooLarge { max: 1 }.status(), 413);
    }

    /// Issue 10 item 12: `x-should-retry` on every error, `true` only where a retry
    /// cannot be charged twice.
    #[test]
    fn x_should_retry_is_deliberate_on_every_error() {
        let cases = [
            (ProxyError::LedgerUnavailable, "true"),
            (ProxyError::BodyBudgetExceeded, "true"),
            (
                ProxyError::LedgerRefused(till_ledger::Refusal::IdempotencyConflict),
                "false",
            ),
            (
                ProxyError::LedgerRefused(till_ledger::Refusal::CapReached { block: 0, cap: 1 }),
                "false",
            ),
            (ProxyError::KeyMissing, "false"),
            (ProxyError::BadFraming, "false"),
            (ProxyError::UpstreamUnreachable("x".into()), "false"),
            (ProxyError::UpstreamUnreachableVoided("x".into()), "true"),
            (ProxyError::UpstreamTimeout("x".into()), "false"),
            (ProxyError::Internal, "false"),
            (ProxyError::ContentTypeNotJson, "false"),
            (ProxyError::BodyFieldInvalid("amount"), "false"),
        ];
        for (e, want) in cases {
            let code = e.code();
            let retry_after = e.retryable();
            let resp = e.into_response();
            assert_eq!(resp.headers()[HEADER_SHOULD_RETRY], want, "{code}");
            assert_eq!(
                resp.headers().contains_key(header::RETRY_AFTER),
                retry_after,
                "{code}"
            );
        }
        assert_eq!(ProxyError::BodyBudgetExceeded.status(), 503);
        assert_eq!(ProxyError::ContentTypeNotJson.status(), 415);
        assert_eq!(ProxyError::MethodNotSupported("TRACE".into()).status(), 405);
    }

    /// Issue 13: a windowed cap is a free retry when it frees within a minute, and always
    /// says when it frees.
    #[test]
    fn rate_limited_is_429_with_retry_after() {
        let limited = |retry_after| {
            ProxyError::LedgerRefused(till_ledger::Refusal::RateLimited {
                block: 1,
                max: 5,
                secs: 60,
                retry_after,
            })
        };
        for (secs, retry) in [(1, "true"), (60, "true"), (61, "false"), (86_000, "false")] {
            let e = limited(secs);
            assert_eq!(e.status(), 429);
            assert_eq!(e.code(), "rate_limited");
            assert_eq!(e.kind(), "rate_limit_error");
            let resp = e.into_response();
            assert_eq!(resp.headers()[HEADER_SHOULD_RETRY], retry, "{secs}");
            assert_eq!(
                resp.headers()[header::RETRY_AFTER],
                secs.to_string().as_str()
            );
        }
    }

    #[test]
    fn the_503_carries_retry_after_and_the_json_shape() {
        let resp = ProxyError::LedgerUnavailable.into_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let body = ProxyError::LedgerUnavailable.body();
        assert_eq!(body["error"]["code"], "ledger_unavailable");
        assert_eq!(body["error"]["type"], "unavailable_error");
        assert!(body["error"]["message"].as_str().is_some());
    }
}

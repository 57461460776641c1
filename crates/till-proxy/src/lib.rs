//! The Till proxy: an HTTP service that turns a scoped, activation-limited Till key into
//! one forwarded request to a real API, charging one activation first.
//!
//! # Design
//!
//! Requests arrive as `/{upstream}/{path...}`. Each goes through named phases (see
//! [`app`] module docs): target normalisation → key verification (cached by key digest)
//! → body bounded by size → scope authorization → ONE ledger claim → header hygiene and
//! credential injection → forwarding (never following redirects) → the response streamed
//! back with `Till-Receipt` and `Till-Activations-Remaining`. Every refusal is a
//! [`ProxyError`], mapped to HTTP in one place with a stable code; the wire contract is
//! normative in `spec/http.md`, configuration in `spec/config.md`.
//!
//! The composition root is [`Config::build`] → [`App`]; [`app()`] is the axum router
//! (tests drive it with `oneshot`) and `App::serve` serves it with hyper (header read
//! timeout, 431 for oversized heads, request-smuggling guard, graceful shutdown).
//!
//! # Secrets
//!
//! Real upstream credentials live in [`Secret`] (redacted `Debug`, zeroized on drop) and
//! are written only into the upstream request. Logs never contain a Till key or a
//! credential: they name the key family by a 16-hex-digit prefix of its revocation id.
//!
//! # Non-features
//!
//! - No request-body streaming: bodies are buffered up to `limits.max_body_bytes` so the
//!   receipt carries a real body hash and the size limit holds before any claim.
//! - No HTTP/2 or TLS on the listening side (terminate TLS in front of Till); upstreams
//!   may be HTTP/1.1 or HTTP/2 over TLS.
//! - No retries of upstream requests and no redirect following.
//!
//! # Example
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use till_ledger::{EmbeddedConfig, EmbeddedLedger};
//! use till_proxy::{Config, Overrides, SystemEnv};
//! use till_receipt::ReceiptSigner;
//! use till_token::{KeyRing, RootKey};
//!
//! let config = Config::load(None, &Overrides::default(), &SystemEnv)?;
//! let signer = Arc::new(ReceiptSigner::generate());
//! let ledger = EmbeddedLedger::open("ledger.redb", EmbeddedConfig::new(signer, &config.proxy_id))?;
//! let keys = KeyRing::with(RootKey::generate().public());
//! let listener = tokio::net::TcpListener::bind(config.listen).await?;
//! let app = config.build(keys, Arc::new(ledger))?;
//! app.serve(listener, async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod admin_config;
pub mod app;
mod cache;
pub mod config;
pub mod credstore;
mod error;
pub mod events;
mod framing;
pub mod hygiene;
pub mod metrics;
pub mod preset;
pub mod retention_config;
pub mod route;
mod secret;
mod server;

pub use app::{
    app, App, AppState, HEADER_IDEMPOTENCY_KEY, HEADER_RECEIPT, HEADER_REMAINING, HEADER_REPLAYED,
};
pub use cache::{block_meta, VerifyCache};
pub use config::{Config, Env, Overrides, ProxyLimits, RawConfig, SystemEnv, Upstream};
pub use error::{ConfigError, ErrorCode, Origin, ProxyError, RETRY_AFTER_SECS};
pub use framing::FramingScanner;
pub use metrics::{ClaimOutcome, Metrics};
pub use preset::{Auth, ModelSource, Preset};
pub use secret::{Credential, Secret};
pub use server::{GuardedIo, SHUTDOWN_GRACE};

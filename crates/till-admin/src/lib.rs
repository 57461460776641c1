//! Till's admin plane: steer a running Till — mint, revoke, usage, receipts, audit, live
//! events and usage alerts — over a versioned JSON API on its own listener.
//!
//! # Design
//!
//! One process, two listeners: `till serve` composes the proxy (agent traffic) with an
//! [`AdminPlane`] on a separate address (default `127.0.0.1:8081`), so admin endpoints
//! never share a port with agents. The admin plane holds the same `Arc<dyn Ledger>` as the
//! proxy: a revocation is visible to the proxy's next claim with no cache in between (and
//! to every proxy of a fleet on FoundationDB, which reads revocations in every claim
//! transaction). Admin credentials are Till keys for the reserved upstream `till-admin`
//! ([`auth`]), authorized like proxied requests, so they attenuate offline (read-only
//! with `--method GET`). Events from the proxy's [`EventBus`] stream out as SSE
//! ([`sse`]); alerts decided by the ledger inside claim transactions are delivered from
//! the ledger's outbox by a background task ([`webhook`]). Normative: `spec/admin.md`
//! and `spec/admin-openapi.yaml` (served at `/admin/v1/openapi.yaml`).
//!
//! # Secrets
//!
//! Admin keys and Till keys are never logged; the only response that carries a full key
//! is the mint/attenuate result (`Cache-Control: no-store`). Webhook secrets live in a
//! redacted [`till_proxy::Secret`].
//!
//! # Non-features
//!
//! - No TLS: keep the admin listener on loopback or behind a TLS-terminating proxy.
//! - Events are per process: in a fleet, each proxy's stream shows its own claims and
//!   refusals (revocations and alerts are in the shared ledger for every proxy).
//!
//! ```no_run
//! # async fn demo(plane: till_admin::AdminPlane) -> std::io::Result<()> {
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:8081").await?;
//! plane.serve(listener).await
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod api;
pub mod auth;
pub mod client;
pub mod dashboard;
mod error;
pub mod sse;
pub mod webhook;

use std::sync::Arc;

use arc_swap::{ArcSwap, ArcSwapOption};
use axum::routing::{get, post};
use axum::Router;
use till_ledger::{AlertRecord, Ledger};
use till_proxy::admin_config::AlertSettings;
use till_proxy::events::{Event, EventBus};
use till_proxy::metrics::AlertCounters;
use till_receipt::ReceiptKeySet;
use till_token::{KeyRing, Limits, RootKey};
use tokio::sync::{watch, Notify};

pub use error::AdminError;

/// The OpenAPI 3.1 description of the admin API.
pub const OPENAPI: &str = include_str!("../../../spec/admin-openapi.yaml");

/// Alert counters, exported by the proxy's `/_till/metrics` (no per-family labels: that
/// is what the API is for).
#[derive(Debug, Default)]
pub struct AdminMetrics {
    counters: AlertCounters,
}

impl AdminMetrics {
    fn fired(&self) {
        self.counters.fired.inc();
    }
    fn delivered(&self) {
        self.counters.delivered.inc();
    }
    fn failed(&self) {
        self.counters.failed.inc();
    }

    /// `(fired, delivered, failed delivery attempts)`.
    pub fn snapshot(&self) -> (u64, u64, u64) {
        (
            self.counters.fired.get(),
            self.counters.delivered.get(),
            self.counters.failed.get(),
        )
    }
}

/// Everything an admin request needs.
pub struct AdminState {
    pub(crate) ledger: Arc<dyn Ledger>,
    pub(crate) keys: KeyRing,
    pub(crate) root: MintKey,
    pub(crate) receipt_keys: ArcSwap<ReceiptKeySet>,
    pub(crate) reloader: std::sync::OnceLock<Reloader>,
    /// Where this server's receipts are exported (`[retention]`), for audits of families
    /// with pruned receipts.
    pub(crate) export_dir: std::sync::OnceLock<std::path::PathBuf>,
    pub(crate) limits: Limits,
    pub(crate) events: EventBus,
    pub(crate) alerts: AlertSettings,
    pub(crate) shutdown: watch::Receiver<bool>,
    pub(crate) wake: Notify,
    pub(crate) metrics: AdminMetrics,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("ledger", &self.ledger)
            .field("can_mint", &self.root.is_some())
            .field("can_reload", &self.reloader.get().is_some())
            .field("alerts", &self.alerts)
            .finish_non_exhaustive()
    }
}

impl AdminState {
    /// An alert was written by something the admin plane did (a revocation): tell
    /// subscribers and wake the deliverer.
    pub(crate) fn alert_fired(&self, alert: &AlertRecord) {
        self.events.publish(Event::Alert {
            alert: serde_json::to_value(alert).unwrap_or_default(),
        });
        self.wake.notify_one();
    }

    /// Alert counters.
    pub fn metrics(&self) -> &AdminMetrics {
        &self.metrics
    }

    pub(crate) async fn reload(&self) -> Result<serde_json::Value, String> {
        let reloader = self
            .reloader
            .get()
            .ok_or("this server cannot reload (no reloader installed)")?;
        let reloaded = reloader().await?;
        self.root.replace(reloaded.root);
        self.receipt_keys.store(Arc::new(reloaded.receipt_keys));
        Ok(reloaded.report)
    }
}

/// The private root key the admin plane mints with, swappable by a reload (root key
/// rotation) while requests read it.
#[derive(Default)]
pub struct MintKey(ArcSwapOption<RootKey>);

impl std::fmt::Debug for MintKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("MintKey")
            .field(&self.0.load().as_ref().map(|k| k.id()))
            .finish()
    }
}

impl MintKey {
    /// Whether this server may mint.
    pub fn is_some(&self) -> bool {
        self.0.load().is_some()
    }

    /// The key now.
    pub fn load(&self) -> Option<Arc<RootKey>> {
        self.0.load_full()
    }

    /// Mints with `root` from now on (`None`: minting is off).
    pub fn replace(&self, root: Option<RootKey>) {
        self.0.store(root.map(Arc::new));
    }
}

/// What a reload ([`AdminPlane::reload`], `POST /admin/v1/reload`, SIGHUP) produced. The
/// server's own reloader has already swapped the proxy's keys, signer and credentials;
/// the admin plane then takes its part (the minting key and the receipt keys for audits).
#[derive(Debug)]
pub struct Reloaded {
    /// What changed, for the caller (key ids, credential names; never a secret).
    pub report: serde_json::Value,
    /// The root key to mint with now, if this server holds one.
    pub root: Option<RootKey>,
    /// The receipt public keys audits trust now.
    pub receipt_keys: ReceiptKeySet,
}

/// The server's reload: re-reads keys and credentials and swaps them in, all or nothing.
/// An `Err` (a message naming what is wrong, never a secret) changed nothing.
pub type Reloader =
    Arc<dyn Fn() -> futures::future::BoxFuture<'static, Result<Reloaded, String>> + Send + Sync>;

/// What the admin plane is built from.
#[derive(Debug)]
pub struct AdminConfig {
    /// The ledger the proxy claims against.
    pub ledger: Arc<dyn Ledger>,
    /// Trusted root public keys (verifies admin keys and keys given to the API).
    pub keys: KeyRing,
    /// The private root key, if this server may mint.
    pub root: Option<RootKey>,
    /// Receipt public keys (audits).
    pub receipt_keys: ReceiptKeySet,
    /// The proxy's event bus.
    pub events: EventBus,
    /// Alert settings (policy and webhook).
    pub alerts: AlertSettings,
    /// Where alert counters go (the proxy's metrics: `App::state().metrics().alerts()`).
    pub alert_counters: AlertCounters,
}

/// The admin plane: state, router, deliverer. Cheap to clone.
#[derive(Debug, Clone)]
pub struct AdminPlane {
    state: Arc<AdminState>,
    stop: Arc<watch::Sender<bool>>,
}

impl AdminPlane {
    /// Builds the admin plane (nothing runs until [`AdminPlane::serve`] /
    /// [`AdminPlane::spawn_deliverer`]).
    pub fn new(config: AdminConfig) -> Self {
        let (stop, shutdown) = watch::channel(false);
        let state = AdminState {
            ledger: config.ledger,
            keys: config.keys,
            root: MintKey(ArcSwapOption::from(config.root.map(Arc::new))),
            receipt_keys: ArcSwap::from_pointee(config.receipt_keys),
            reloader: std::sync::OnceLock::new(),
            export_dir: std::sync::OnceLock::new(),
            limits: Limits::default(),
            events: config.events,
            alerts: config.alerts,
            shutdown,
            wake: Notify::new(),
            metrics: AdminMetrics {
                counters: config.alert_counters,
            },
        };
        Self {
            state: Arc::new(state),
            stop: Arc::new(stop),
        }
    }

    /// The shared state.
    pub fn state(&self) -> &Arc<AdminState> {
        &self.state
    }

    /// Installs the server's reload (once; later calls are ignored): enables
    /// `POST /admin/v1/reload` and [`AdminPlane::reload`].
    pub fn set_reloader(&self, reloader: Reloader) {
        let _ = self.state.reloader.set(reloader);
    }

    /// Names the directory receipts are exported to (`[retention]`; once, later calls are
    /// ignored): audits of a family whose older receipts were pruned read them there.
    pub fn set_export_dir(&self, dir: std::path::PathBuf) {
        let _ = self.state.export_dir.set(dir);
    }

    /// Runs the server's reload and takes the admin plane's part of it. Used by
    /// `POST /admin/v1/reload` and by `till serve` on SIGHUP.
    pub async fn reload(&self) -> Result<serde_json::Value, String> {
        self.state.reload().await
    }

    /// The router (tests drive it with `oneshot`).
    pub fn router(&self) -> Router {
        router(Arc::clone(&self.state))
    }

    /// Starts the alert deliverer on the current runtime.
    pub fn spawn_deliverer(&self) -> tokio::task::JoinHandle<()> {
        tokio::spawn(webhook::run(Arc::clone(&self.state)))
    }

    /// Ends SSE streams and the deliverer, and lets [`AdminPlane::serve`] return.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
    }

    /// Serves the admin API on `listener` until [`AdminPlane::shutdown`].
    pub async fn serve(&self, listener: tokio::net::TcpListener) -> std::io::Result<()> {
        let mut stop = self.state.shutdown.clone();
        axum::serve(listener, self.router())
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await
    }
}

/// The admin router: `/admin/v1/*` and the dashboard (`/`).
pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/admin/v1/openapi.yaml", get(api::openapi))
        .route("/admin/v1/whoami", get(api::whoami))
        .route("/admin/v1/keys", post(api::mint_key))
        .route("/admin/v1/keys/attenuate", post(api::attenuate_key))
        .route("/admin/v1/keys/inspect", post(api::inspect_key))
        .route("/admin/v1/revoke", post(api::revoke))
        .route("/admin/v1/usage", post(api::usage))
        .route("/admin/v1/families", get(api::families))
        .route("/admin/v1/families/{id}", get(api::family))
        .route("/admin/v1/families/{id}/receipts", get(api::receipts))
        .route("/admin/v1/families/{id}/audit", get(api::audit))
        .route("/admin/v1/families/{id}/checkpoints", get(api::checkpoints))
        .route("/admin/v1/alerts", get(api::alerts))
        .route("/admin/v1/reload", post(api::reload))
        .route("/admin/v1/events", get(sse::events))
        .merge(dashboard::routes(Arc::clone(&state)))
        .fallback(api::not_found)
        .with_state(state)
}

//! What a running `till serve` re-reads on `POST /admin/v1/reload` and SIGHUP: the data
//! dir's keys (`keys.json` after a rotation or a retirement) and the credential store.
//!
//! All or nothing: everything is read and checked first (the key files, the registry, the
//! store with the master key), then swapped in — the shared [`KeyRing`] (proxy and admin
//! plane), the embedded ledger's receipt signer, every `store:` credential. A failure
//! changes nothing and says what is wrong (never a secret).

use std::sync::Arc;

use anyhow::{Context as _, Result};
use serde_json::json;
use till_ledger::EmbeddedLedger;
use till_proxy::app::AppState;
use till_proxy::credstore::{CredentialStore, MasterKey, STORE_FILE};
use till_proxy::{Config, SystemEnv};
use till_token::{KeyRing, RootPublicKey};

use crate::datadir::DataDir;

/// The running server's swappable parts.
#[derive(Debug)]
pub struct Swappable {
    /// The data dir.
    pub data: DataDir,
    /// The ring the proxy and the admin plane share.
    pub ring: KeyRing,
    /// `trusted_root_keys` from till.toml as loaded at start (always trusted besides the
    /// data dir's); a reload reads them again from `config_file`.
    pub config_roots: Vec<RootPublicKey>,
    /// The config file and flags `till serve` started with (a reload re-reads
    /// `trusted_root_keys` from it).
    pub config_source: Option<(Option<std::path::PathBuf>, till_proxy::Overrides)>,
    /// The embedded ledger, whose signer a receipt key rotation swaps (`None` on
    /// FoundationDB, whose key space is bound to the fleet's receipt key: not rotated).
    pub embedded: Option<Arc<EmbeddedLedger>>,
    /// The proxy (its config holds the credential slots).
    pub app: Option<Arc<AppState>>,
}

/// The root keys to trust: the data dir's minting and trusted keys plus the config's.
pub fn trusted_roots(data: &DataDir, config_roots: &[RootPublicKey]) -> Result<Vec<RootPublicKey>> {
    let mut roots = data.registry()?.trusted_roots();
    roots.extend(config_roots.iter().cloned());
    Ok(roots)
}

/// Opens every `credential = "store:NAME"` of `config` and swaps it in (all or nothing).
/// Errors name the record; the caller maps them to exit 2 at startup.
pub fn resolve_store_credentials(
    config: &Config,
    data: &DataDir,
) -> Result<Vec<serde_json::Value>> {
    let wanted = config.store_credentials();
    if wanted.is_empty() {
        return Ok(Vec::new());
    }
    let master = MasterKey::resolve(&SystemEnv, data.path())?;
    let store = CredentialStore::load(data.path().join(STORE_FILE))?;
    config
        .resolve_store_credentials(&|name| store.open(&master, name).map_err(|e| e.to_string()))?;
    let records = store.records();
    Ok(wanted
        .into_iter()
        .map(|(upstream, record)| {
            let fingerprint = records
                .iter()
                .find(|r| r.name == record)
                .map(|r| r.fingerprint.clone());
            json!({ "upstream": upstream, "record": record, "fingerprint": fingerprint })
        })
        .collect())
}

impl Swappable {
    /// Re-reads and swaps (see the module docs).
    pub fn reload(&self) -> Result<till_admin::Reloaded> {
        let registry = self.data.registry()?;
        let config_roots = match &self.config_source {
            Some((file, flags)) => {
                Config::load(file.as_deref(), flags, &SystemEnv)
                    .context("re-reading trusted_root_keys from the config")?
                    .trusted_root_keys
            }
            None => self.config_roots.clone(),
        };
        let mut roots = registry.trusted_roots();
        roots.extend(config_roots.iter().cloned());
        let receipt_keys = registry.receipt_keys();
        let signer = Arc::new(self.data.receipt_signer()?);
        let root = self.data.root_key().ok();
        // The only step that can fail after this point is the credential store, and it
        // swaps nothing unless every record opens.
        let credentials = match &self.app {
            Some(app) => resolve_store_credentials(app.config(), &self.data)
                .context("the credential store")?,
            None => Vec::new(),
        };
        self.ring.replace(roots);
        let kid = signer.key_id().to_owned();
        let receipt_key = match &self.embedded {
            Some(ledger) => {
                if ledger.signer_key_id() != kid {
                    tracing::info!(kid = %kid, "reload: signing receipts with the new receipt key");
                }
                ledger.set_signer(signer);
                json!({ "id": kid, "signing": true })
            }
            None => {
                json!({ "id": kid, "signing": false, "note": "FoundationDB ledger: the key space is bound to the fleet's receipt key; this key is not used" })
            }
        };
        let root_keys: Vec<_> = registry
            .keys
            .iter()
            .filter(|e| e.role == crate::registry::Role::Root)
            .map(|e| json!({ "id": e.id, "state": e.state.as_str() }))
            .chain(
                config_roots
                    .iter()
                    .map(|k| json!({ "id": k.id().to_string(), "state": "trusted (till.toml)" })),
            )
            .collect();
        tracing::info!(
            root_keys = ?self.ring.ids().collect::<Vec<_>>(),
            receipt_key = %kid,
            credentials = credentials.len(),
            "reloaded keys and credentials"
        );
        Ok(till_admin::Reloaded {
            report: json!({
                "root_keys": root_keys,
                "receipt_key": receipt_key,
                "credentials": credentials,
            }),
            root,
            receipt_keys,
        })
    }

    /// [`Swappable::reload`] as the admin plane's reloader.
    pub fn reloader(self: &Arc<Self>) -> till_admin::Reloader {
        let me = Arc::clone(self);
        Arc::new(move || {
            let me = Arc::clone(&me);
            Box::pin(async move {
                tokio::task::spawn_blocking(move || me.reload().map_err(|e| format!("{e:#}")))
                    .await
                    .map_err(|e| format!("reload task failed: {e}"))?
            })
        })
    }
}

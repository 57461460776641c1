//! The data dir's key registry, `keys.json`: every root and receipt public key this data
//! dir has had, with its state, so a rotation never orphans what the old key signed.
//!
//! ```json
//! {"version": 1, "keys": [
//!   {"role": "root", "id": "2831514012", "state": "trusted", "created": "2026-01-02T03:04:05Z",
//!    "retired": null, "public_jwk": {"kty": "OKP", "crv": "Ed25519", "kid": "2831514012", "x": "…"}},
//!   {"role": "root", "id": "190473201", "state": "minting", …},
//!   {"role": "receipt", "id": "r-c18713ae40d6beae", "state": "verifying", …},
//!   {"role": "receipt", "id": "r-0a1b2c3d4e5f6071", "state": "signing", …}]}
//! ```
//!
//! Root keys are `minting` (the one private key, `root.key.jwk`), `trusted` (an earlier
//! root: keys it minted keep working) or `retired` (its keys get `key_unknown_root`).
//! Receipt keys are `signing` (`receipt.key.jwk`) or `verifying` (an earlier key: receipts
//! it signed keep verifying; receipt keys are never retired). Only public keys are kept:
//! a rotation replaces the private key file, so the old private key is gone.
//!
//! The key files are the truth for which key is current: the registry is reconciled
//! with `root.pub.jwk` / `receipt.pub.jwk` on every read (a data dir from before the
//! registry simply has none yet, and gets one at its first rotation). Entries keep their
//! order; the first receipt key is the data dir's **origin** receipt key, which the ledger
//! id names (`<hex>@<origin kid>`), so a rotation is never mistaken for a foreign ledger.

use std::path::Path;

use anyhow::{bail, Context as _, Result};
use serde::{Deserialize, Serialize};
use till_receipt::{ReceiptKeySet, ReceiptPublicKey};
use till_token::{KeyRing, RootPublicKey};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

/// The registry file in the data dir.
pub const REGISTRY: &str = "keys.json";
const VERSION: u32 = 1;

/// Which kind of key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// A root (minting) key.
    Root,
    /// A receipt-signing key.
    Receipt,
}

/// What a key is used for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    /// The current root key: new keys are minted with it.
    Minting,
    /// An earlier root key still trusted: keys it minted keep working.
    Trusted,
    /// An earlier root key no longer trusted: its keys get `key_unknown_root`.
    Retired,
    /// The current receipt key: new receipts are signed with it.
    Signing,
    /// An earlier receipt key: receipts it signed keep verifying.
    Verifying,
}

impl State {
    /// The word `till keys list` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Minting => "minting",
            State::Trusted => "trusted",
            State::Retired => "retired",
            State::Signing => "signing",
            State::Verifying => "verifying",
        }
    }
}

/// One key of the registry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Entry {
    /// Root or receipt.
    pub role: Role,
    /// Root key id (decimal) or receipt key id (`r-…`).
    pub id: String,
    /// Its state.
    pub state: State,
    /// When it was created (RFC 3339).
    pub created: String,
    /// When it was retired (root keys only).
    #[serde(default)]
    pub retired: Option<String>,
    /// Its public JWK.
    pub public_jwk: serde_json::Value,
}

/// `keys.json`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Registry {
    version: u32,
    /// Every key, oldest first.
    pub keys: Vec<Entry>,
}

/// Now, RFC 3339 (seconds).
pub fn now_rfc3339() -> String {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(0)
        .unwrap_or(now)
        .format(&Rfc3339)
        .unwrap_or_default()
}

fn created_of(path: &Path) -> String {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .map(OffsetDateTime::from)
        .and_then(|t| t.replace_nanosecond(0).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(now_rfc3339)
}

impl Registry {
    /// Reads `keys.json` (a missing file is an empty registry) and reconciles it with
    /// the current public key files (`current_root`, `current_receipt`; the latter is
    /// absent in a verifier's copy holding only `root.pub.jwk`).
    pub fn load(
        dir: &Path,
        current_root: &RootPublicKey,
        current_receipt: Option<&ReceiptPublicKey>,
    ) -> Result<Self> {
        let path = dir.join(REGISTRY);
        let mut reg = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let reg: Registry = serde_json::from_str(&text)
                    .with_context(|| format!("reading {}", path.display()))?;
                if reg.version != VERSION {
                    bail!(
                        "{}: version {}, this build reads {VERSION}",
                        path.display(),
                        reg.version
                    );
                }
                reg.check()
                    .with_context(|| format!("reading {}", path.display()))?;
                reg
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Registry {
                version: VERSION,
                keys: Vec::new(),
            },
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        reg.reconcile_root(current_root, &created_of(&dir.join("root.key.jwk")));
        if let Some(receipt) = current_receipt {
            reg.reconcile_receipt(receipt, &created_of(&dir.join("receipt.key.jwk")));
        }
        Ok(reg)
    }

    /// Every entry's JWK parses and names its id.
    fn check(&self) -> Result<()> {
        for e in &self.keys {
            let jwk = e.public_jwk.to_string();
            let id = match e.role {
                Role::Root => RootPublicKey::from_jwk(&jwk)
                    .map(|k| k.id().to_string())
                    .map_err(|err| anyhow::anyhow!("root key {}: {err}", e.id))?,
                Role::Receipt => ReceiptPublicKey::from_jwk(&jwk)
                    .map(|k| k.key_id().to_owned())
                    .map_err(|err| anyhow::anyhow!("receipt key {}: {err}", e.id))?,
            };
            if id != e.id {
                bail!("key {}: its public_jwk is key {id}", e.id);
            }
        }
        Ok(())
    }

    /// The current root key file wins: it is `minting`; any other `minting` entry becomes
    /// `trusted` (a rotation interrupted before its rename).
    fn reconcile_root(&mut self, current: &RootPublicKey, created: &str) {
        let id = current.id().to_string();
        for e in self.keys.iter_mut().filter(|e| e.role == Role::Root) {
            if e.id == id {
                e.state = State::Minting;
                e.retired = None;
            } else if e.state == State::Minting {
                e.state = State::Trusted;
            }
        }
        if !self.keys.iter().any(|e| e.role == Role::Root && e.id == id) {
            self.keys.push(Entry {
                role: Role::Root,
                id,
                state: State::Minting,
                created: created.to_owned(),
                retired: None,
                public_jwk: serde_json::from_str(&current.to_jwk()).unwrap_or_default(),
            });
        }
    }

    fn reconcile_receipt(&mut self, current: &ReceiptPublicKey, created: &str) {
        let id = current.key_id().to_owned();
        for e in self.keys.iter_mut().filter(|e| e.role == Role::Receipt) {
            e.state = if e.id == id {
                State::Signing
            } else {
                State::Verifying
            };
        }
        if !self
            .keys
            .iter()
            .any(|e| e.role == Role::Receipt && e.id == id)
        {
            self.keys.push(Entry {
                role: Role::Receipt,
                id,
                state: State::Signing,
                created: created.to_owned(),
                retired: None,
                public_jwk: serde_json::from_str(&current.to_jwk()).unwrap_or_default(),
            });
        }
    }

    /// Records a new root key as `minting` (the previous one becomes `trusted`).
    pub fn add_root(&mut self, key: &RootPublicKey) {
        for e in self.keys.iter_mut().filter(|e| e.role == Role::Root) {
            if e.state == State::Minting {
                e.state = State::Trusted;
            }
        }
        self.keys.push(Entry {
            role: Role::Root,
            id: key.id().to_string(),
            state: State::Minting,
            created: now_rfc3339(),
            retired: None,
            public_jwk: serde_json::from_str(&key.to_jwk()).unwrap_or_default(),
        });
    }

    /// Records a new receipt key as `signing` (the previous one becomes `verifying`).
    pub fn add_receipt(&mut self, key: &ReceiptPublicKey) {
        for e in self.keys.iter_mut().filter(|e| e.role == Role::Receipt) {
            e.state = State::Verifying;
        }
        self.keys.push(Entry {
            role: Role::Receipt,
            id: key.key_id().to_owned(),
            state: State::Signing,
            created: now_rfc3339(),
            retired: None,
            public_jwk: serde_json::from_str(&key.to_jwk()).unwrap_or_default(),
        });
    }

    /// Retires root key `id`: keys it minted stop working. The minting key and receipt
    /// keys cannot be retired.
    pub fn retire(&mut self, id: &str) -> Result<&Entry> {
        let Some(i) = self.keys.iter().position(|e| e.id == id) else {
            bail!(crate::cli::Failure::usage(format!(
                "no key {id} in this data dir (see `till keys list`)"
            )));
        };
        let entry = &mut self.keys[i];
        match (entry.role, entry.state) {
            (Role::Receipt, _) => bail!(crate::cli::Failure::usage(format!(
                "{id} is a receipt key: receipt keys are never retired, so the receipts \
                 they signed keep verifying (rotate with `till keygen --rotate receipt`)"
            ))),
            (Role::Root, State::Minting) => bail!(crate::cli::Failure::usage(format!(
                "{id} is the minting root key: rotate first (`till keygen --rotate root`), \
                 then retire it"
            ))),
            (Role::Root, State::Retired) => {}
            (Role::Root, _) => {
                entry.state = State::Retired;
                entry.retired = Some(now_rfc3339());
            }
        }
        Ok(&self.keys[i])
    }

    /// Root public keys verifiers trust: the minting key and every `trusted` one.
    pub fn trusted_roots(&self) -> Vec<RootPublicKey> {
        self.keys
            .iter()
            .filter(|e| e.role == Role::Root && matches!(e.state, State::Minting | State::Trusted))
            .filter_map(|e| RootPublicKey::from_jwk(&e.public_jwk.to_string()).ok())
            .collect()
    }

    /// The trusted root keys as a ring.
    pub fn key_ring(&self) -> KeyRing {
        let ring = KeyRing::new();
        ring.replace(self.trusted_roots());
        ring
    }

    /// Every root key this data dir has had, retired ones included (for the owner's own
    /// ledger commands: audit, usage, revoke — never for accepting requests).
    pub fn key_ring_with_retired(&self) -> KeyRing {
        let ring = KeyRing::new();
        ring.replace(
            self.keys
                .iter()
                .filter(|e| e.role == Role::Root)
                .filter_map(|e| RootPublicKey::from_jwk(&e.public_jwk.to_string()).ok()),
        );
        ring
    }

    /// Every receipt public key (current and earlier).
    pub fn receipt_keys(&self) -> ReceiptKeySet {
        self.keys
            .iter()
            .filter(|e| e.role == Role::Receipt)
            .filter_map(|e| ReceiptPublicKey::from_jwk(&e.public_jwk.to_string()).ok())
            .collect()
    }

    /// The data dir's first receipt key id (what its ledger id names).
    pub fn origin_receipt_kid(&self) -> Option<&str> {
        self.keys
            .iter()
            .find(|e| e.role == Role::Receipt)
            .map(|e| e.id.as_str())
    }

    /// Writes `keys.json` (a temporary file renamed over the old one).
    pub fn save(&self, dir: &Path) -> Result<()> {
        let path = dir.join(REGISTRY);
        let tmp = dir.join(format!("{REGISTRY}.tmp"));
        let mut text = serde_json::to_string_pretty(self)?;
        text.push('\n');
        std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
        Ok(())
    }
}

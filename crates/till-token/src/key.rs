//! Root keys: the owner's minting key, its public half, and the set of trusted public keys
//! a verifier uses (rotation by root key id).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use arc_swap::ArcSwap;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use biscuit_auth::{Algorithm, KeyPair, PrivateKey, PublicKey, RootKeyProvider};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::TokenError;

/// The owner's root (minting) key. Zeroized on drop by biscuit-auth; `Debug` prints only
/// the key id.
pub struct RootKey {
    keypair: KeyPair,
    id: u32,
}

impl fmt::Debug for RootKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootKey")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl RootKey {
    /// A fresh key from the OS RNG.
    pub fn generate() -> Self {
        Self::from_keypair(KeyPair::new())
    }

    /// From a 32-byte ed25519 seed (tests and vectors).
    pub fn from_seed(seed: &[u8; 32]) -> Result<Self, TokenError> {
        let private = PrivateKey::from_bytes(seed, Algorithm::Ed25519)
            .map_err(|e| TokenError::BadKey(e.to_string()))?;
        Ok(Self::from_keypair(KeyPair::from(&private)))
    }

    fn from_keypair(keypair: KeyPair) -> Self {
        let id = key_id(&keypair.public());
        RootKey { keypair, id }
    }

    /// Root key id: the first four bytes of SHA-256(public key), big-endian.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The public half with its id.
    pub fn public(&self) -> RootPublicKey {
        RootPublicKey {
            id: self.id,
            key: self.keypair.public(),
        }
    }

    pub(crate) fn keypair(&self) -> &KeyPair {
        &self.keypair
    }

    /// Private JWK (RFC 8037 `OKP`/`Ed25519`, `kid` = decimal root key id).
    pub fn to_private_jwk(&self) -> Zeroizing<String> {
        let private = self.keypair.private();
        let d = private.to_bytes();
        let jwk = Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            kid: self.id.to_string(),
            x: URL_SAFE_NO_PAD.encode(self.keypair.public().to_bytes()),
            d: Some(URL_SAFE_NO_PAD.encode(d.as_slice())),
        };
        Zeroizing::new(serde_json::to_string_pretty(&jwk).unwrap_or_default())
    }

    /// Reads a private JWK written by [`RootKey::to_private_jwk`].
    pub fn from_private_jwk(json: &str) -> Result<Self, TokenError> {
        let jwk: Jwk = serde_json::from_str(json).map_err(|e| {
            TokenError::BadKey(format!(
                "not a JWK (JSON error at line {} column {})",
                e.line(),
                e.column()
            ))
        })?;
        let d = jwk.d.as_deref().ok_or_else(|| {
            TokenError::BadKey("this is a public key; minting needs the private root key".into())
        })?;
        let seed = Zeroizing::new(
            URL_SAFE_NO_PAD
                .decode(d)
                .map_err(|_| TokenError::BadKey("`d` is not base64url".into()))?,
        );
        let seed: &[u8; 32] = seed
            .as_slice()
            .try_into()
            .map_err(|_| TokenError::BadKey("`d` must be 32 bytes".into()))?;
        let key = Self::from_seed(seed)?;
        let public = RootPublicKey::from_jwk_value(&jwk)?;
        if public != key.public() {
            return Err(TokenError::BadKey("`x` or `kid` does not match `d`".into()));
        }
        Ok(key)
    }
}

/// A root public key with its id.
#[derive(Clone, PartialEq)]
pub struct RootPublicKey {
    id: u32,
    key: PublicKey,
}

impl fmt::Debug for RootPublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootPublicKey")
            .field("id", &self.id)
            .field("key", &self.key.to_bytes_hex())
            .finish()
    }
}

impl RootPublicKey {
    /// The root key id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The raw 32-byte ed25519 key, hex.
    pub fn to_hex(&self) -> String {
        self.key.to_bytes_hex()
    }

    /// From the raw 32-byte ed25519 key in hex (what [`RootPublicKey::to_hex`] and
    /// `till keygen` print).
    pub fn from_hex(text: &str) -> Result<Self, TokenError> {
        let bytes = hex::decode(text.trim())
            .map_err(|_| TokenError::BadKey("not a hex ed25519 public key".into()))?;
        if bytes.len() != 32 {
            return Err(TokenError::BadKey(
                "an ed25519 public key is 32 bytes (64 hex digits)".into(),
            ));
        }
        let key = PublicKey::from_bytes(&bytes, Algorithm::Ed25519)
            .map_err(|_| TokenError::BadKey("not an ed25519 public key".into()))?;
        Ok(RootPublicKey {
            id: key_id(&key),
            key,
        })
    }

    /// Public JWK.
    pub fn to_jwk(&self) -> String {
        let jwk = Jwk {
            kty: "OKP".into(),
            crv: "Ed25519".into(),
            kid: self.id.to_string(),
            x: URL_SAFE_NO_PAD.encode(self.key.to_bytes()),
            d: None,
        };
        serde_json::to_string_pretty(&jwk).unwrap_or_default()
    }

    /// Reads a public JWK (a private one is accepted; `d` is ignored).
    pub fn from_jwk(json: &str) -> Result<Self, TokenError> {
        let jwk: Jwk = serde_json::from_str(json).map_err(|e| {
            TokenError::BadKey(format!(
                "not a JWK (JSON error at line {} column {})",
                e.line(),
                e.column()
            ))
        })?;
        Self::from_jwk_value(&jwk)
    }

    fn from_jwk_value(jwk: &Jwk) -> Result<Self, TokenError> {
        if jwk.kty != "OKP" || jwk.crv != "Ed25519" {
            return Err(TokenError::BadKey(
                "expected kty OKP and crv Ed25519".into(),
            ));
        }
        let x = URL_SAFE_NO_PAD
            .decode(&jwk.x)
            .map_err(|_| TokenError::BadKey("`x` is not base64url".into()))?;
        let key = PublicKey::from_bytes(&x, Algorithm::Ed25519)
            .map_err(|_| TokenError::BadKey("`x` is not an ed25519 public key".into()))?;
        let id = key_id(&key);
        if jwk.kid != id.to_string() {
            return Err(TokenError::BadKey(format!(
                "`kid` {} does not match the key (expected {id})",
                jwk.kid
            )));
        }
        Ok(RootPublicKey { id, key })
    }
}

/// The root public keys a verifier trusts, by id. Unknown ids fail closed; keep a retired
/// key here for as long as keys it minted must keep working.
///
/// A `KeyRing` is a handle: its clones share one set of keys, and [`KeyRing::replace`]
/// (or `insert` / `remove`) through any clone is seen by all of them at once. That is how
/// a running server picks up a root key rotation: the proxy and the admin plane hold
/// clones of one ring and the reload swaps its contents. Readers never block (the set is
/// an immutable map behind an atomic pointer); a new, independent ring comes from
/// [`KeyRing::new`] / [`KeyRing::with`] / [`KeyRing::snapshot`].
#[derive(Clone, Default)]
pub struct KeyRing {
    keys: Arc<ArcSwap<BTreeMap<u32, RootPublicKey>>>,
}

impl fmt::Debug for KeyRing {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyRing")
            .field("ids", &self.ids().collect::<Vec<_>>())
            .finish()
    }
}

impl KeyRing {
    /// An empty ring (trusts nothing).
    pub fn new() -> Self {
        Self::default()
    }

    /// A ring with one key.
    pub fn with(key: RootPublicKey) -> Self {
        let mut ring = Self::new();
        ring.insert(key);
        ring
    }

    /// Trusts `key` (seen by every clone of this ring).
    pub fn insert(&mut self, key: RootPublicKey) {
        self.keys.rcu(|keys| {
            let mut keys = BTreeMap::clone(keys);
            keys.insert(key.id, key.clone());
            keys
        });
    }

    /// Stops trusting the key with `id` (seen by every clone of this ring).
    pub fn remove(&mut self, id: u32) -> Option<RootPublicKey> {
        let old = self.keys.load().get(&id).cloned();
        self.keys.rcu(|keys| {
            let mut keys = BTreeMap::clone(keys);
            keys.remove(&id);
            keys
        });
        old
    }

    /// Replaces every trusted key with `keys`, atomically: a verification running
    /// meanwhile sees either the old set or the new one, never a mix.
    pub fn replace(&self, keys: impl IntoIterator<Item = RootPublicKey>) {
        let map: BTreeMap<u32, RootPublicKey> = keys.into_iter().map(|k| (k.id, k)).collect();
        self.keys.store(Arc::new(map));
    }

    /// An independent copy of the current set (later changes to `self` do not reach it).
    pub fn snapshot(&self) -> KeyRing {
        KeyRing {
            keys: Arc::new(ArcSwap::new(self.keys.load_full())),
        }
    }

    /// Whether `id` is trusted.
    pub fn contains(&self, id: u32) -> bool {
        self.keys.load().contains_key(&id)
    }

    /// Trusted key ids.
    pub fn ids(&self) -> impl Iterator<Item = u32> {
        let keys = self.keys.load_full();
        let ids: Vec<u32> = keys.keys().copied().collect();
        ids.into_iter()
    }

    /// The trusted keys, by id.
    pub fn keys(&self) -> Vec<RootPublicKey> {
        self.keys.load().values().cloned().collect()
    }
}

impl RootKeyProvider for &KeyRing {
    fn choose(&self, key_id: Option<u32>) -> Result<PublicKey, biscuit_auth::error::Format> {
        let keys = self.keys.load();
        key_id
            .and_then(|id| keys.get(&id))
            .map(|k| k.key)
            .ok_or(biscuit_auth::error::Format::UnknownPublicKey)
    }
}

#[derive(Serialize, Deserialize)]
struct Jwk {
    kty: String,
    crv: String,
    kid: String,
    x: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    d: Option<String>,
}

impl Drop for Jwk {
    fn drop(&mut self) {
        if let Some(d) = self.d.as_mut() {
            zeroize::Zeroize::zeroize(d);
        }
    }
}

fn key_id(key: &PublicKey) -> u32 {
    let digest = Sha256::digest(key.to_bytes());
    u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jwk_round_trips_and_debug_hides_secret() {
        let key = RootKey::from_seed(&[7; 32]).unwrap();
        let jwk = key.to_private_jwk();
        let back = RootKey::from_private_jwk(&jwk).unwrap();
        assert_eq!(back.public(), key.public());
        let public = RootPublicKey::from_jwk(&key.public().to_jwk()).unwrap();
        assert_eq!(public, key.public());
        assert_eq!(RootPublicKey::from_hex(&public.to_hex()).unwrap(), public);
        assert!(RootPublicKey::from_hex("abcd").is_err());
        let dbg = format!("{key:?}");
        let d = URL_SAFE_NO_PAD.encode([7u8; 32]);
        assert!(!dbg.contains(&d) && !dbg.contains(&hex::encode([7u8; 32])));
        assert!(RootKey::from_private_jwk(&key.public().to_jwk()).is_err());
    }

    #[test]
    fn mismatched_kid_is_rejected() {
        let key = RootKey::from_seed(&[7; 32]).unwrap();
        let jwk = key.public().to_jwk().replace(&key.id().to_string(), "1");
        assert!(RootPublicKey::from_jwk(&jwk).is_err());
    }

    #[test]
    fn clones_of_a_ring_share_its_keys_and_snapshots_do_not() {
        let a = RootKey::from_seed(&[1; 32]).unwrap().public();
        let b = RootKey::from_seed(&[2; 32]).unwrap().public();
        let ring = KeyRing::with(a.clone());
        let mut held_by_proxy = ring.clone();
        let frozen = ring.snapshot();
        ring.replace([a.clone(), b.clone()]);
        assert!(held_by_proxy.contains(b.id()) && held_by_proxy.contains(a.id()));
        assert!(!frozen.contains(b.id()));
        assert_eq!(held_by_proxy.remove(a.id()), Some(a.clone()));
        assert!(!ring.contains(a.id()));
        assert_eq!(ring.ids().collect::<Vec<_>>(), vec![b.id()]);
        assert_eq!(ring.keys(), vec![b]);
    }
}

//! Receipt keys: the ed25519 signing key, its public half with a derived key id, the
//! set of keys an auditor trusts, and the JWK (RFC 7517 / RFC 8037 `OKP`) forms.

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use zeroize::{Zeroize, Zeroizing};

use crate::error::{JwkError, ReceiptError};

/// Prefix of every receipt key id.
pub const KEY_ID_PREFIX: &str = "r-";

/// `"r-"` + lower-case hex of the first 8 bytes of SHA-256(public key bytes).
fn derive_key_id(public: &VerifyingKey) -> String {
    let digest = Sha256::digest(public.as_bytes());
    let mut kid = String::with_capacity(KEY_ID_PREFIX.len() + 16);
    kid.push_str(KEY_ID_PREFIX);
    kid.push_str(&hex::encode(&digest[..8]));
    kid
}

/// The private receipt-signing key (ed25519). Zeroized on drop; `Debug` shows only the key id.
pub struct ReceiptSigner {
    // ed25519-dalek's `zeroize` feature zeroizes the secret when this is dropped.
    pub(crate) signing: SigningKey,
    pub(crate) public: ReceiptPublicKey,
}

impl fmt::Debug for ReceiptSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReceiptSigner")
            .field("kid", &self.public.kid)
            .finish_non_exhaustive()
    }
}

impl ReceiptSigner {
    /// A fresh key from the OS RNG.
    pub fn generate() -> Self {
        Self::from_signing_key(SigningKey::generate(&mut rand::rngs::OsRng))
    }

    /// From the 32-byte secret seed.
    pub fn from_seed(seed: [u8; 32]) -> Self {
        let seed = Zeroizing::new(seed);
        Self::from_signing_key(SigningKey::from_bytes(&seed))
    }

    fn from_signing_key(signing: SigningKey) -> Self {
        let public = ReceiptPublicKey::from_verifying_key(signing.verifying_key());
        Self { signing, public }
    }

    /// Key id: `"r-"` + first 8 bytes of SHA-256(public key), lower-case hex.
    pub fn key_id(&self) -> &str {
        &self.public.kid
    }

    /// The public half.
    pub fn public_key(&self) -> ReceiptPublicKey {
        self.public.clone()
    }

    /// Signs a statement other than a receipt (e.g. a ledger checkpoint): ed25519 over
    /// `context`, a NUL byte, then `message`. A JWS signing input never contains a NUL,
    /// so such a signature is never a receipt's, nor one made for another `context`.
    pub fn sign_statement(&self, context: &str, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer as _;
        self.signing
            .sign(&statement_input(context, message))
            .to_bytes()
    }

    /// Private JWK (`kty: OKP, crv: Ed25519, kid, x, d`), for the key file.
    ///
    /// The returned string holds the secret: write it to a file with restrictive
    /// permissions and zeroize it.
    pub fn to_private_jwk(&self) -> String {
        let d = Zeroizing::new(URL_SAFE_NO_PAD.encode(self.signing.as_bytes()));
        let public = self.public.to_jwk();
        // Splice `,"d":"…"` before the closing brace. Sized up front so no reallocation
        // leaves a stray copy of the secret behind.
        let mut out = String::with_capacity(public.len() + d.len() + 8);
        out.push_str(public.trim_end_matches('}'));
        out.push_str(",\"d\":\"");
        out.push_str(&d);
        out.push_str("\"}");
        out
    }

    /// Reads a private JWK written by [`ReceiptSigner::to_private_jwk`]: `d` must be
    /// present and derive `x`, and `kid` must be the derived key id.
    pub fn from_private_jwk(json: &str) -> Result<Self, ReceiptError> {
        let jwk = JwkInput::parse(json)?;
        let public = jwk.public_key()?;
        let signing = jwk.signing_key()?.ok_or(JwkError::MissingPrivateKey)?;
        Ok(Self { signing, public })
    }
}

/// A receipt verification key with its key id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReceiptPublicKey {
    pub(crate) verifying: VerifyingKey,
    pub(crate) kid: String,
}

impl ReceiptPublicKey {
    fn from_verifying_key(verifying: VerifyingKey) -> Self {
        let kid = derive_key_id(&verifying);
        Self { verifying, kid }
    }

    /// From the 32 raw public key bytes; rejects invalid and small-order (weak) points.
    pub fn from_bytes(bytes: &[u8; 32]) -> Result<Self, ReceiptError> {
        Ok(Self::from_verifying_key(verifying_key(bytes)?))
    }

    /// The 32 raw public key bytes.
    pub fn to_bytes(&self) -> [u8; 32] {
        self.verifying.to_bytes()
    }

    /// Key id (see [`ReceiptSigner::key_id`]).
    pub fn key_id(&self) -> &str {
        &self.kid
    }

    /// Verifies a [`ReceiptSigner::sign_statement`] signature (strict, like receipts).
    pub fn verify_statement(&self, context: &str, message: &[u8], signature: &[u8; 64]) -> bool {
        self.verifying
            .verify_strict(
                &statement_input(context, message),
                &ed25519_dalek::Signature::from_bytes(signature),
            )
            .is_ok()
    }

    /// Public JWK (`{"kty":"OKP","crv":"Ed25519","kid":…,"x":…}`, in that order).
    pub fn to_jwk(&self) -> String {
        // Every value is hex or base64url, so no JSON escaping is ever needed.
        format!(
            r#"{{"kty":"OKP","crv":"Ed25519","kid":"{}","x":"{}"}}"#,
            self.kid,
            URL_SAFE_NO_PAD.encode(self.verifying.as_bytes())
        )
    }

    /// Reads a public JWK. A private JWK is accepted too: its `d` must derive `x`, and
    /// only the public half is kept.
    pub fn from_jwk(json: &str) -> Result<Self, ReceiptError> {
        let jwk = JwkInput::parse(json)?;
        let public = jwk.public_key()?;
        jwk.signing_key()?;
        Ok(public)
    }
}

/// The JWK members Till reads. Unknown members are refused so a typo (or a key meant for
/// another purpose) is not silently accepted.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JwkInput {
    kty: String,
    crv: String,
    x: String,
    #[serde(default)]
    d: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    alg: Option<String>,
    #[serde(default, rename = "use")]
    key_use: Option<String>,
}

impl Drop for JwkInput {
    fn drop(&mut self) {
        if let Some(d) = self.d.as_mut() {
            d.zeroize();
        }
    }
}

impl JwkInput {
    fn parse(json: &str) -> Result<Self, JwkError> {
        // serde's message may quote the offending value (possibly the secret): keep only
        // the position.
        let jwk: Self = serde_json::from_str(json).map_err(|e| JwkError::Json {
            line: e.line(),
            column: e.column(),
        })?;
        if jwk.kty != "OKP" {
            return Err(JwkError::KeyType {
                kty: jwk.kty.clone(),
            });
        }
        if jwk.crv != "Ed25519" {
            return Err(JwkError::Curve {
                crv: jwk.crv.clone(),
            });
        }
        if let Some(alg) = jwk.alg.as_ref().filter(|alg| *alg != "EdDSA") {
            return Err(JwkError::Algorithm { alg: alg.clone() });
        }
        if let Some(key_use) = jwk.key_use.as_ref().filter(|u| *u != "sig") {
            return Err(JwkError::KeyUse {
                key_use: key_use.clone(),
            });
        }
        Ok(jwk)
    }

    /// Decodes `x` and checks `kid`.
    fn public_key(&self) -> Result<ReceiptPublicKey, JwkError> {
        let x = decode_32(&self.x, "x")?;
        let public = ReceiptPublicKey::from_verifying_key(verifying_key(&x)?);
        match &self.kid {
            None => Err(JwkError::MissingKeyId),
            Some(kid) if *kid != public.kid => Err(JwkError::KeyIdMismatch {
                found: kid.clone(),
                expected: public.kid.clone(),
            }),
            Some(_) => Ok(public),
        }
    }

    /// Decodes `d`, if present, and checks that it derives `x`.
    fn signing_key(&self) -> Result<Option<SigningKey>, JwkError> {
        let Some(d) = &self.d else {
            return Ok(None);
        };
        let seed = Zeroizing::new(decode_32(d, "d")?);
        let signing = SigningKey::from_bytes(&seed);
        let x = decode_32(&self.x, "x")?;
        if signing.verifying_key().as_bytes() != &x {
            return Err(JwkError::KeyMismatch);
        }
        Ok(Some(signing))
    }
}

fn verifying_key(bytes: &[u8; 32]) -> Result<VerifyingKey, JwkError> {
    let verifying = VerifyingKey::from_bytes(bytes).map_err(|_| JwkError::InvalidPublicKey)?;
    // Small-order points would let anyone forge signatures under `verify` (and
    // `verify_strict` refuses them anyway): refuse to trust them at all.
    if verifying.is_weak() {
        return Err(JwkError::InvalidPublicKey);
    }
    Ok(verifying)
}

fn decode_32(text: &str, param: &'static str) -> Result<[u8; 32], JwkError> {
    let bytes = Zeroizing::new(
        URL_SAFE_NO_PAD
            .decode(text)
            .map_err(|_| JwkError::Base64 { param })?,
    );
    <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| JwkError::Length {
        param,
        len: bytes.len(),
    })
}

fn statement_input(context: &str, message: &[u8]) -> Vec<u8> {
    let mut input = Vec::with_capacity(context.len() + 1 + message.len());
    input.extend_from_slice(context.as_bytes());
    input.push(0);
    input.extend_from_slice(message);
    input
}

/// The receipt keys an auditor trusts, by key id (old keys stay here after rotation).
#[derive(Debug, Clone, Default)]
pub struct ReceiptKeySet {
    keys: BTreeMap<String, ReceiptPublicKey>,
}

impl ReceiptKeySet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a key (replacing one with the same key id, which is the same key).
    pub fn insert(&mut self, key: ReceiptPublicKey) {
        self.keys.insert(key.kid.clone(), key);
    }

    /// The key with this id, if trusted.
    pub fn get(&self, kid: &str) -> Option<&ReceiptPublicKey> {
        self.keys.get(kid)
    }

    /// Number of trusted keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is trusted (every verification fails).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The trusted key ids, sorted.
    pub fn key_ids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }
}

impl FromIterator<ReceiptPublicKey> for ReceiptKeySet {
    fn from_iter<I: IntoIterator<Item = ReceiptPublicKey>>(iter: I) -> Self {
        let mut set = Self::new();
        for key in iter {
            set.insert(key);
        }
        set
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEED: [u8; 32] = [7; 32];

    #[test]
    fn key_id_is_prefix_and_16_hex_digits_of_public_key_hash() {
        let signer = ReceiptSigner::from_seed(SEED);
        let public = signer.public_key().to_bytes();
        let expected = format!("r-{}", hex::encode(&Sha256::digest(public)[..8]));
        assert_eq!(signer.key_id(), expected);
        assert_eq!(signer.key_id().len(), 18);
        assert_eq!(signer.public_key().key_id(), expected);
    }

    #[test]
    fn debug_never_shows_the_secret() {
        let signer = ReceiptSigner::from_seed(SEED);
        let debug = format!("{signer:?}");
        assert!(debug.contains(signer.key_id()), "{debug}");
        let d = URL_SAFE_NO_PAD.encode(SEED);
        assert!(!debug.contains(&d));
        assert!(!debug.contains(&hex::encode(SEED)));
        assert!(!debug.contains("7, 7, 7"));
    }

    #[test]
    fn public_jwk_has_fixed_shape_and_round_trips() {
        let signer = ReceiptSigner::from_seed(SEED);
        let jwk = signer.public_key().to_jwk();
        let x = URL_SAFE_NO_PAD.encode(signer.public_key().to_bytes());
        assert_eq!(
            jwk,
            format!(
                r#"{{"kty":"OKP","crv":"Ed25519","kid":"{}","x":"{x}"}}"#,
                signer.key_id()
            )
        );
        assert_eq!(
            ReceiptPublicKey::from_jwk(&jwk).unwrap(),
            signer.public_key()
        );
        // A public JWK is not a signer.
        assert_eq!(
            ReceiptSigner::from_private_jwk(&jwk).unwrap_err(),
            ReceiptError::Jwk(JwkError::MissingPrivateKey)
        );
    }

    #[test]
    fn private_jwk_round_trips() {
        let signer = ReceiptSigner::from_seed(SEED);
        let jwk = signer.to_private_jwk();
        let value: serde_json::Value = serde_json::from_str(&jwk).unwrap();
        assert_eq!(value["d"], URL_SAFE_NO_PAD.encode(SEED));
        let back = ReceiptSigner::from_private_jwk(&jwk).unwrap();
        assert_eq!(back.signing.to_bytes(), SEED);
        assert_eq!(back.public_key(), signer.public_key());
        // A private JWK read as public keeps the public half only.
        assert_eq!(
            ReceiptPublicKey::from_jwk(&jwk).unwrap(),
            signer.public_key()
        );
    }

    #[test]
    fn generated_keys_differ() {
        assert_ne!(
            ReceiptSigner::generate().key_id(),
            ReceiptSigner::generate().key_id()
        );
    }

    fn jwk_with(field: &str, value: serde_json::Value) -> String {
        let signer = ReceiptSigner::from_seed(SEED);
        let mut jwk: serde_json::Value = serde_json::from_str(&signer.to_private_jwk()).unwrap();
        if value.is_null() {
            jwk.as_object_mut().unwrap().remove(field);
        } else {
            jwk[field] = value;
        }
        jwk.to_string()
    }

    #[test]
    fn jwk_rejections_are_specific() {
        let other = ReceiptSigner::from_seed([8; 32]);
        let other_d = URL_SAFE_NO_PAD.encode([8u8; 32]);
        let cases: Vec<(String, JwkError)> = vec![
            ("not json".into(), JwkError::Json { line: 1, column: 2 }),
            (
                jwk_with("kty", "EC".into()),
                JwkError::KeyType { kty: "EC".into() },
            ),
            (
                jwk_with("crv", "X25519".into()),
                JwkError::Curve {
                    crv: "X25519".into(),
                },
            ),
            (
                jwk_with("alg", "ES256".into()),
                JwkError::Algorithm {
                    alg: "ES256".into(),
                },
            ),
            (
                jwk_with("use", "enc".into()),
                JwkError::KeyUse {
                    key_use: "enc".into(),
                },
            ),
            (
                jwk_with("x", "a+b/".into()),
                JwkError::Base64 { param: "x" },
            ),
            (
                jwk_with("x", URL_SAFE_NO_PAD.encode([1u8; 31]).into()),
                JwkError::Length {
                    param: "x",
                    len: 31,
                },
            ),
            (
                jwk_with("d", URL_SAFE_NO_PAD.encode([1u8; 33]).into()),
                JwkError::Length {
                    param: "d",
                    len: 33,
                },
            ),
            (jwk_with("d", other_d.into()), JwkError::KeyMismatch),
            (
                jwk_with("kid", serde_json::Value::Null),
                JwkError::MissingKeyId,
            ),
            (
                jwk_with("kid", other.key_id().into()),
                JwkError::KeyIdMismatch {
                    found: other.key_id().into(),
                    expected: ReceiptSigner::from_seed(SEED).key_id().into(),
                },
            ),
            (
                jwk_with("extra", "1".into()),
                JwkError::Json { line: 0, column: 0 },
            ),
            // The identity point is small-order: a weak key that verifies forged signatures.
            (
                jwk_with("x", URL_SAFE_NO_PAD.encode(identity_point()).into()),
                JwkError::InvalidPublicKey,
            ),
        ];
        for (json, expected) in cases {
            let ReceiptError::Jwk(err) = ReceiptSigner::from_private_jwk(&json).unwrap_err() else {
                panic!("not a JWK error: {json}");
            };
            match (&err, &expected) {
                (JwkError::Json { .. }, JwkError::Json { .. }) => {}
                _ => assert_eq!(err, expected, "{json}"),
            }
            // The public reader applies the same checks (it validates `d` when present).
            assert!(ReceiptPublicKey::from_jwk(&json).is_err(), "{json}");
        }
    }

    fn identity_point() -> [u8; 32] {
        let mut p = [0u8; 32];
        p[0] = 1;
        p
    }

    #[test]
    fn jwk_errors_never_echo_the_secret() {
        let d = URL_SAFE_NO_PAD.encode(SEED);
        // serde's own message would quote an unknown member's name: here, the secret.
        let json = format!(r#"{{"kty":"OKP","crv":"Ed25519","{d}":"x"}}"#);
        let serde_message = serde_json::from_str::<JwkInput>(&json)
            .err()
            .unwrap()
            .to_string();
        assert!(serde_message.contains(&d), "{serde_message}");
        let err = ReceiptSigner::from_private_jwk(&json).unwrap_err();
        assert!(!err.to_string().contains(&d), "{err}");
        assert!(!format!("{err:?}").contains(&d));
    }

    #[test]
    fn key_set_looks_up_by_id() {
        let a = ReceiptSigner::from_seed([1; 32]).public_key();
        let b = ReceiptSigner::from_seed([2; 32]).public_key();
        let mut set = ReceiptKeySet::new();
        assert!(set.is_empty());
        set.insert(a.clone());
        set.insert(a.clone());
        assert_eq!(set.len(), 1);
        assert_eq!(set.get(a.key_id()), Some(&a));
        assert_eq!(set.get(b.key_id()), None);
        let set: ReceiptKeySet = [a.clone(), b.clone()].into_iter().collect();
        assert_eq!(set.len(), 2);
        let mut ids = vec![a.key_id(), b.key_id()];
        ids.sort_unstable();
        assert_eq!(set.key_ids().collect::<Vec<_>>(), ids);
    }

    #[test]
    fn statements_are_domain_separated() {
        let s = ReceiptSigner::from_seed([1; 32]);
        let p = s.public_key();
        let sig = s.sign_statement("till-checkpoint", b"{}");
        assert!(p.verify_statement("till-checkpoint", b"{}", &sig));
        assert!(!p.verify_statement("till-other", b"{}", &sig));
        assert!(!p.verify_statement("till-checkpoint", b"{ }", &sig));
        let other = ReceiptSigner::from_seed([2; 32]).public_key();
        assert!(!other.verify_statement("till-checkpoint", b"{}", &sig));
    }
}

//! Till activation receipts: proof that one activation of a token was claimed, signed by
//! the fleet's receipt key in an envelope that stock JOSE libraries verify.
//!
//! Every claim the ledger takes produces one [`Receipt`]: a JWS compact serialization
//! (RFC 7515) with `alg: EdDSA` (RFC 8037, Ed25519) whose payload is a [`ReceiptBody`]
//! naming the token family, the slot taken at every level of the presented token ("k of
//! N"), a digest of the forwarded request, and the hash of the family's previous receipt
//! (SHA-256 of its JWS signing input, which its signature fixes).
//! The format is normative in `spec/receipt.md`, with test vectors in `spec/vectors/`.
//!
//! # Design
//!
//! Signing and parsing are pure functions over plain data. The header and payload are
//! canonical (fixed header bytes, serde_json serialization of the body in field order), and
//! [`Receipt::parse`] re-serializes both and rejects any difference, so a receipt's bytes
//! and its decoded body are one-to-one. The chain link [`Receipt::hash`] is over the JWS
//! signing input (header and payload), not the compact string: the signature fixes those
//! bytes, so a lenient verifier that accepts another encoding of the signature still
//! computes the same link.
//! Parsing never verifies; [`Receipt::verify`] looks the header's key id up in a
//! [`ReceiptKeySet`] (unknown id: fail closed) and uses `verify_strict`. [`audit_chain`]
//! checks a whole family: signatures, a gapless fork-free `seq`/`prev` chain, and unique,
//! gapless, capped slots at every level. A **void receipt** ([`ReceiptBody::void`]) gives
//! an earlier claim's slot back (nothing was sent upstream); the audit replays the
//! counters, so caps are checked at every claim with voids counted. Each rejection is its own [`ReceiptError`]
//! variant with a stable [`ReceiptError::code`].
//!
//! Secrets: the signing key lives in [`ReceiptSigner`], is zeroized on drop, and never
//! appears in `Debug` output or in errors (JWK errors report positions, not values). Only
//! key ids are meant for logs.
//!
//! # Non-features
//!
//! - No JWS JSON serialization, detached payloads, `crit`, `jku`/`jwk`/`x5u` header keys,
//!   or any algorithm but EdDSA over Ed25519: the header is a fixed string.
//! - No storage, I/O or clock: the ledger stores receipts, the CLI reads files.
//! - No recomputation of the request digest: the auditor compares it with its own records.
//!
//! # Example
//!
//! ```
//! use till_receipt::{
//!     audit_chain, Receipt, ReceiptBody, ReceiptKeySet, ReceiptSigner, RequestDigest,
//!     SlotClaim, RECEIPT_VERSION,
//! };
//!
//! let signer = ReceiptSigner::from_seed([7; 32]);
//! let family = "ab".repeat(32);
//! let body = ReceiptBody {
//!     v: RECEIPT_VERSION,
//!     family: family.clone(),
//!     seq: 1,
//!     slots: vec![SlotClaim { block: 0, revocation_id: family, slot: 1, cap: Some(100) }],
//!     request: RequestDigest {
//!         method: "POST".into(),
//!         upstream: "openai".into(),
//!         path: "/v1/chat/completions".into(),
//!         body_sha256: "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855".into(),
//!         model: Some("gpt-4o-mini".into()),
//!         query: None,
//!         content_type: None,
//!     },
//!     iat: 1_700_000_000,
//!     proxy: "proxy-1".into(),
//!     kid: signer.key_id().into(),
//!     idempotency_key: "req-1".into(),
//!     prev: None,
//!     ledger: None,
//!     ceilings: None,
//!     void: None,
//! };
//! let receipt = signer.sign(&body)?;
//!
//! // An auditor holds only the public key (e.g. from its JWK) and the compact string.
//! let mut keys = ReceiptKeySet::new();
//! keys.insert(till_receipt::ReceiptPublicKey::from_jwk(&signer.public_key().to_jwk())?);
//! let parsed = Receipt::parse(receipt.compact())?;
//! parsed.verify(&keys)?;
//! assert_eq!(parsed.body(), &body);
//!
//! let report = audit_chain(&[parsed], &keys)?;
//! assert_eq!(report.levels[0].used, 1);
//! # Ok::<(), till_receipt::ReceiptError>(())
//! ```

#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod body;
mod chain;
mod error;
mod jws;
mod key;

pub use body::{
    Ceilings, ReceiptBody, RequestDigest, SlotClaim, MIN_RECEIPT_VERSION, RECEIPT_VERSION,
};
pub use chain::{audit_chain, AuditReport, LevelUsage};
pub use error::{JwkError, JwsPart, ReceiptError};
pub use jws::{PreparedReceipt, Receipt, JWS_ALG, JWS_TYP, MAX_RECEIPT_LEN};
pub use key::{ReceiptKeySet, ReceiptPublicKey, ReceiptSigner, KEY_ID_PREFIX};

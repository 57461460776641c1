//! Receipt errors: every way a receipt, a receipt key or a receipt chain is rejected.
//!
//! No variant carries secret material: JWK failures report the JSON position and the
//! parameter name, never its value.

use std::fmt;

/// Which of the three parts of a compact JWS a failure is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum JwsPart {
    /// The protected header (first part).
    Header,
    /// The payload, i.e. the [`ReceiptBody`](crate::ReceiptBody) (second part).
    Payload,
    /// The signature (third part).
    Signature,
}

impl fmt::Display for JwsPart {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Header => "header",
            Self::Payload => "payload",
            Self::Signature => "signature",
        })
    }
}

/// Why a receipt (or a chain of receipts) was rejected.
///
/// [`ReceiptError::code`] gives each variant a stable snake_case code for CLIs, APIs and
/// the invalid test vectors in `spec/vectors/receipts-invalid.json`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiptError {
    // ---- Envelope (Receipt::parse), checked in this order. ----
    /// The compact string is longer than [`MAX_RECEIPT_LEN`](crate::MAX_RECEIPT_LEN)
    /// bytes; nothing else was looked at.
    #[error("receipt is {len} bytes, more than the {max}-byte limit")]
    TooLarge {
        /// Length of the input in bytes.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// The compact string does not have exactly three `.`-separated parts.
    #[error("receipt has {found} dot-separated parts, expected 3")]
    PartCount {
        /// Number of parts found.
        found: usize,
    },
    /// A part is not unpadded base64url (RFC 4648 §5) with zero trailing bits.
    #[error("receipt {part} is not unpadded base64url")]
    Base64 {
        /// The offending part.
        part: JwsPart,
    },
    /// The protected header is not a JSON object with only `alg`, `kid` and `typ` string
    /// members (the text is the JSON parser's message).
    #[error("receipt header is not valid: {0}")]
    HeaderJson(String),
    /// The header's `alg` is not `EdDSA`.
    #[error("receipt algorithm {alg:?} is not supported, expected \"EdDSA\"")]
    UnsupportedAlgorithm {
        /// The `alg` found.
        alg: String,
    },
    /// The header's `typ` is missing or not `till-receipt+jwt`.
    #[error("receipt header typ is {typ:?}, expected \"till-receipt+jwt\"")]
    WrongType {
        /// The `typ` found, if any.
        typ: Option<String>,
    },
    /// The header has no `kid`.
    #[error("receipt header has no kid")]
    MissingKeyId,
    /// The header decodes but is not byte-for-byte the canonical form
    /// `{"alg":"EdDSA","kid":"…","typ":"till-receipt+jwt"}`.
    #[error("receipt header is not in canonical form")]
    NonCanonicalHeader,
    /// The payload is not a valid receipt body: not JSON, an unknown or missing field, or
    /// a wrong type (the text is the JSON parser's message).
    #[error("malformed receipt: {0}")]
    Malformed(String),
    /// The body's `v` is not a supported format version.
    #[error("receipt format version {v} is not supported, expected 1")]
    UnsupportedVersion {
        /// The version found.
        v: u32,
    },
    /// The payload decodes but is not byte-for-byte the canonical serialization of the
    /// body (field order, whitespace, escapes, explicit `"prev":null`).
    #[error("receipt payload is not in canonical form")]
    NonCanonicalPayload,
    /// The header's `kid` differs from the body's `kid`.
    #[error("receipt header kid {header:?} differs from body kid {body:?}")]
    KeyIdMismatch {
        /// `kid` in the protected header.
        header: String,
        /// `kid` in the body.
        body: String,
    },
    /// The signature does not decode to 64 bytes.
    #[error("receipt signature is {len} bytes, expected 64")]
    SignatureLength {
        /// Decoded length.
        len: usize,
    },

    // ---- Signing and verification. ----
    /// The receipt names a key id that is not in the trusted
    /// [`ReceiptKeySet`](crate::ReceiptKeySet) (fail closed).
    #[error("receipt key id {kid:?} is not trusted")]
    UnknownKeyId {
        /// The key id named by the receipt.
        kid: String,
    },
    /// The signature does not verify (under `verify_strict`) with the named key.
    #[error("receipt signature does not verify (kid {kid:?}, seq {seq})")]
    BadSignature {
        /// The key id named by the receipt.
        kid: String,
        /// The (unauthenticated) `seq` the receipt claims, to locate it.
        seq: u64,
    },
    /// [`ReceiptSigner::sign`](crate::ReceiptSigner::sign) was given a body whose `kid`
    /// is not the signer's key id.
    #[error("body kid {body:?} is not the signing key's id {signer:?}")]
    SignerKeyMismatch {
        /// The signer's key id.
        signer: String,
        /// The body's `kid`.
        body: String,
    },
    /// Serializing a body failed (not expected for the receipt types).
    #[error("could not encode receipt: {0}")]
    Encode(String),
    /// A receipt key in JWK form was rejected.
    #[error("invalid receipt key: {0}")]
    Jwk(#[from] JwkError),

    // ---- Chain audit (audit_chain). ----
    /// No receipts were given to audit.
    #[error("no receipts to audit")]
    EmptyChain,
    /// A receipt belongs to another family than the first receipt.
    #[error("receipt seq {seq} belongs to another family")]
    FamilyMismatch {
        /// The offending receipt's `seq`.
        seq: u64,
    },
    /// A `seq` is missing: the chain must run 1, 2, …, n.
    #[error("receipt chain gap: expected seq {expected}, found {found}")]
    Gap {
        /// The `seq` that should come next.
        expected: u64,
        /// The `seq` found instead.
        found: u64,
    },
    /// Two different receipts share one `seq`.
    #[error("receipt chain fork at seq {seq}")]
    Fork {
        /// The shared `seq`.
        seq: u64,
    },
    /// The same receipt appears twice.
    #[error("receipt seq {seq} appears twice")]
    Duplicate {
        /// The repeated `seq`.
        seq: u64,
    },
    /// The input is not sorted by `seq`.
    #[error("receipts not in seq order: {found} after {previous}")]
    OutOfOrder {
        /// The previous receipt's `seq`.
        previous: u64,
        /// The smaller `seq` that followed it.
        found: u64,
    },
    /// `prev` is not the hash of the previous receipt (or is set on `seq` 1).
    #[error("receipt seq {seq} does not link to its predecessor")]
    BrokenLink {
        /// The offending receipt's `seq`.
        seq: u64,
    },
    /// The receipt names another ledger than an earlier receipt of the chain (or none
    /// after one did): the family's claims come from two ledgers, e.g. one that was
    /// emptied and started over.
    #[error("receipt seq {seq} names another ledger than the receipts before it")]
    LedgerMismatch {
        /// The offending receipt's `seq`.
        seq: u64,
    },
    /// `slots[0]` is missing, or is not the family's own level with `slot == seq`.
    #[error("receipt seq {seq}: first slot must be the family's, with slot == seq")]
    AuthoritySlotMismatch {
        /// The offending receipt's `seq`.
        seq: u64,
    },
    /// `slots[i].block` is not `i`.
    #[error("receipt seq {seq}: slots are not one per block in block order")]
    BlockOrder {
        /// The offending receipt's `seq`.
        seq: u64,
    },
    /// One receipt names the same revocation id at two levels.
    #[error("receipt seq {seq} names level {revocation_id} twice")]
    DuplicateLevel {
        /// The offending receipt's `seq`.
        seq: u64,
        /// The repeated revocation id.
        revocation_id: String,
    },
    /// A level's block index or declared cap differs from an earlier receipt's.
    #[error("receipt seq {seq}: level {revocation_id} changed block index or cap")]
    LevelMismatch {
        /// The offending receipt's `seq`.
        seq: u64,
        /// The level's revocation id.
        revocation_id: String,
    },
    /// A slot number is 0 (slots are 1-based).
    #[error("receipt seq {seq}: level {revocation_id} has slot 0")]
    SlotZero {
        /// The offending receipt's `seq`.
        seq: u64,
        /// The level's revocation id.
        revocation_id: String,
    },
    /// Two receipts took the same slot at one level.
    #[error("slot {slot} of level {revocation_id} taken twice")]
    SlotReused {
        /// The level's revocation id.
        revocation_id: String,
        /// The reused slot.
        slot: u64,
    },
    /// A slot exceeds the level's declared cap.
    #[error("slot {slot} of level {revocation_id} exceeds its cap {cap}")]
    OverCap {
        /// The level's revocation id.
        revocation_id: String,
        /// The declared cap.
        cap: u64,
        /// The slot above it.
        slot: u64,
    },
    /// A level's slots are not exactly 1..=used: some slot has no receipt (with voids: a
    /// claim's slot is not the level's net count plus one).
    #[error("level {revocation_id}: {used} receipts but highest slot {max}")]
    SlotGap {
        /// The level's revocation id.
        revocation_id: String,
        /// Receipts naming the level.
        used: u64,
        /// The highest slot named.
        max: u64,
    },
    /// A void receipt names a `seq` that is not an earlier claim receipt of the chain (a
    /// later or missing receipt, or another void).
    #[error("void receipt seq {seq} names seq {void}, which is not an earlier claim")]
    VoidUnknown {
        /// The void receipt's `seq`.
        seq: u64,
        /// The `seq` it names.
        void: u64,
    },
    /// A void receipt names a claim that an earlier void already gave back.
    #[error("void receipt seq {seq} names claim {void}, which was already voided")]
    VoidTwice {
        /// The void receipt's `seq`.
        seq: u64,
        /// The claim it names.
        void: u64,
    },
    /// A void receipt's slots, request or idempotency key differ from the claim it gives
    /// back.
    #[error("void receipt seq {seq} does not repeat the slots and request of claim {void}")]
    VoidMismatch {
        /// The void receipt's `seq`.
        seq: u64,
        /// The claim it names.
        void: u64,
    },
}

impl ReceiptError {
    /// A stable snake_case code for this error (the variant name), for machine-readable
    /// output. Codes never change meaning; new variants get new codes.
    pub fn code(&self) -> &'static str {
        match self {
            Self::TooLarge { .. } => "too_large",
            Self::PartCount { .. } => "part_count",
            Self::Base64 { .. } => "base64",
            Self::HeaderJson(_) => "header_json",
            Self::UnsupportedAlgorithm { .. } => "unsupported_algorithm",
            Self::WrongType { .. } => "wrong_type",
            Self::MissingKeyId => "missing_key_id",
            Self::NonCanonicalHeader => "non_canonical_header",
            Self::Malformed(_) => "malformed",
            Self::UnsupportedVersion { .. } => "unsupported_version",
            Self::NonCanonicalPayload => "non_canonical_payload",
            Self::KeyIdMismatch { .. } => "key_id_mismatch",
            Self::SignatureLength { .. } => "signature_length",
            Self::UnknownKeyId { .. } => "unknown_key_id",
            Self::BadSignature { .. } => "bad_signature",
            Self::SignerKeyMismatch { .. } => "signer_key_mismatch",
            Self::Encode(_) => "encode",
            Self::Jwk(_) => "invalid_jwk",
            Self::EmptyChain => "empty_chain",
            Self::FamilyMismatch { .. } => "family_mismatch",
            Self::Gap { .. } => "gap",
            Self::Fork { .. } => "fork",
            Self::Duplicate { .. } => "duplicate",
            Self::OutOfOrder { .. } => "out_of_order",
            Self::BrokenLink { .. } => "broken_link",
            Self::LedgerMismatch { .. } => "ledger_mismatch",
            Self::AuthoritySlotMismatch { .. } => "authority_slot_mismatch",
            Self::BlockOrder { .. } => "block_order",
            Self::DuplicateLevel { .. } => "duplicate_level",
            Self::LevelMismatch { .. } => "level_mismatch",
            Self::SlotZero { .. } => "slot_zero",
            Self::SlotReused { .. } => "slot_reused",
            Self::OverCap { .. } => "over_cap",
            Self::SlotGap { .. } => "slot_gap",
            Self::VoidUnknown { .. } => "void_unknown",
            Self::VoidTwice { .. } => "void_twice",
            Self::VoidMismatch { .. } => "void_mismatch",
        }
    }
}

/// Why a receipt key in JWK form (RFC 7517, OKP per RFC 8037) was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum JwkError {
    /// Not a JSON object with only `kty`, `crv`, `kid`, `x`, `d`, `alg`, `use` string
    /// members. Only the position is reported, so a private key never reaches a log.
    #[error("JWK is not valid JSON of the expected shape (line {line}, column {column})")]
    Json {
        /// 1-based line of the error.
        line: usize,
        /// 1-based column of the error.
        column: usize,
    },
    /// `kty` is not `OKP`.
    #[error("JWK kty {kty:?} is not \"OKP\"")]
    KeyType {
        /// The `kty` found.
        kty: String,
    },
    /// `crv` is not `Ed25519`.
    #[error("JWK crv {crv:?} is not \"Ed25519\"")]
    Curve {
        /// The `crv` found.
        crv: String,
    },
    /// `alg` is present and not `EdDSA`.
    #[error("JWK alg {alg:?} is not \"EdDSA\"")]
    Algorithm {
        /// The `alg` found.
        alg: String,
    },
    /// `use` is present and not `sig`.
    #[error("JWK use {key_use:?} is not \"sig\"")]
    KeyUse {
        /// The `use` found.
        key_use: String,
    },
    /// A key parameter is not unpadded base64url.
    #[error("JWK parameter {param} is not unpadded base64url")]
    Base64 {
        /// `"x"` or `"d"`.
        param: &'static str,
    },
    /// A key parameter does not decode to 32 bytes.
    #[error("JWK parameter {param} is {len} bytes, expected 32")]
    Length {
        /// `"x"` or `"d"`.
        param: &'static str,
        /// Decoded length.
        len: usize,
    },
    /// `x` is not a valid Ed25519 point, or is a small-order (weak) point.
    #[error("JWK x is not a valid Ed25519 public key")]
    InvalidPublicKey,
    /// The public key derived from `d` is not `x`.
    #[error("JWK d does not match x")]
    KeyMismatch,
    /// A private key was required and `d` is absent.
    #[error("JWK has no private key (d)")]
    MissingPrivateKey,
    /// `kid` is absent.
    #[error("JWK has no kid")]
    MissingKeyId,
    /// `kid` is not the key id derived from `x`.
    #[error("JWK kid {found:?} is not the key's id {expected:?}")]
    KeyIdMismatch {
        /// The `kid` found.
        found: String,
        /// The id derived from the public key.
        expected: String,
    },
}

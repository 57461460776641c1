//! Token errors (the key itself is bad) and refusals (the key is fine, the request is not).

/// Why a Till key could not be parsed, verified, minted or attenuated.
///
/// Messages never contain the key itself.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// The string does not start with the `till_` prefix.
    #[error("not a Till key: it must start with `till_`")]
    MissingPrefix,
    /// The text after the prefix is not unpadded base64url.
    #[error("malformed Till key: invalid base64url encoding")]
    BadEncoding,
    /// The key is larger than the configured maximum.
    #[error("Till key too large: {size} bytes, the maximum is {max}")]
    TooLarge {
        /// Size of the presented key in bytes.
        size: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The key has more blocks than allowed.
    #[error("Till key has {blocks} blocks, the maximum is {max}")]
    TooManyBlocks {
        /// Blocks in the presented key.
        blocks: usize,
        /// Configured maximum.
        max: usize,
    },
    /// The bytes are not a Biscuit token.
    #[error("malformed Till key: {0}")]
    Malformed(String),
    /// The key names no root key id, or one this proxy does not trust.
    #[error("Till key was minted with root key id {0:?}, which is not trusted here")]
    UnknownRootKey(Option<u32>),
    /// A signature in the block chain does not verify.
    #[error("Till key signature is invalid (tampered, truncated or from another root key)")]
    BadSignature,
    /// A block is not in Till's canonical vocabulary (arbitrary Datalog, third-party
    /// blocks and unknown caveats are refused).
    #[error("block {block} of the Till key is not a Till caveat block: {reason}")]
    NotCanonical {
        /// Block index.
        block: usize,
        /// What was wrong.
        reason: String,
    },
    /// A caveat value is invalid (e.g. a path without a leading `/`).
    #[error("invalid caveat: {0}")]
    InvalidCaveat(String),
    /// Attenuation tried to name a different upstream than the family's.
    #[error("this key is for upstream `{family}`; a block cannot switch it to `{requested}`")]
    UpstreamMismatch {
        /// The family's upstream.
        family: String,
        /// The upstream the new block named.
        requested: String,
    },
    /// A root key or key file could not be read.
    #[error("invalid root key: {0}")]
    BadKey(String),
    /// Biscuit refused to build or evaluate the token.
    #[error("token library error: {0}")]
    Biscuit(String),
}

impl TokenError {
    /// Stable machine-readable code (see `spec/token.md`).
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::MissingPrefix | TokenError::BadEncoding | TokenError::Malformed(_) => {
                "key_malformed"
            }
            TokenError::TooLarge { .. } => "key_too_large",
            TokenError::TooManyBlocks { .. } => "key_too_many_blocks",
            TokenError::UnknownRootKey(_) => "key_unknown_root",
            TokenError::BadSignature => "key_signature_invalid",
            TokenError::NotCanonical { .. } => "key_not_canonical",
            TokenError::InvalidCaveat(_) => "invalid_caveat",
            TokenError::UpstreamMismatch { .. } => "upstream_mismatch",
            TokenError::BadKey(_) => "root_key_invalid",
            TokenError::Biscuit(_) => "key_invalid",
        }
    }
}

/// Which caveat refused a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum CaveatKind {
    /// `upstream`
    Upstream,
    /// `methods`
    Methods,
    /// `paths`
    Paths,
    /// `models`
    Models,
    /// `expires`
    Expires,
    /// `cap`
    Cap,
    /// `max_output_tokens`
    MaxOutputTokens,
    /// `amount_max`
    Amount,
    /// `currencies`
    Currencies,
    /// `repos`
    Repos,
    /// `json_max`
    JsonMax,
    /// `json_allow`
    JsonAllow,
    /// `windows` (decided by the ledger; refused here only by the Datalog run)
    Windows,
    /// The Datalog evaluation refused although every declared caveat passed, or hit a
    /// run limit (should not happen for canonical blocks).
    Datalog,
}

/// A structured "no" from authorization: which block, which caveat, and a stable code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Refusal {
    /// Index of the block whose caveat refused (0 = authority block).
    pub block: usize,
    /// The caveat that refused.
    pub caveat: CaveatKind,
    /// Stable code (see `spec/token.md`).
    pub code: &'static str,
    /// Human-readable, actionable message. Never contains the key.
    pub message: String,
}

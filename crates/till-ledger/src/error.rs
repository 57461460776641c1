//! Ledger errors and refusals.

/// A definitive "no": nothing was written. Stable codes in `code()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Refusal {
    /// Block `block`'s cap `cap` is already used up.
    #[error("activation cap of block {block} reached ({cap} of {cap} used)")]
    CapReached {
        /// Block index.
        block: usize,
        /// That block's cap.
        cap: u64,
    },
    /// Block `block` (or an ancestor) was revoked.
    #[error("block {block} of this key has been revoked")]
    Revoked {
        /// Block index.
        block: usize,
    },
    /// The token expired before the claim.
    #[error("key expired")]
    Expired,
    /// The idempotency key was already used for a different request.
    #[error("idempotency key already used for a different request")]
    IdempotencyConflict,
    /// The idempotency key was already replayed [`crate::MAX_REPLAYS`] times; an identical
    /// request cannot be forwarded for free forever.
    #[error("idempotency key replayed too often; send a new idempotency key")]
    ReplayLimit,
    /// Block `block`'s windowed cap is used up for the current window; nothing was
    /// charged. Retry after `retry_after` seconds (when the window frees).
    #[error("block {block} of this key allows {max} activations per {secs} s; that window is used up, retry in {retry_after} s")]
    RateLimited {
        /// Block index.
        block: usize,
        /// The window's cap.
        max: u64,
        /// The window length in seconds.
        secs: u64,
        /// Seconds until the window frees.
        retry_after: u64,
    },
}

impl Refusal {
    /// Stable error code.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::CapReached { .. } => "activation_limit_reached",
            Refusal::Revoked { .. } => "key_revoked",
            Refusal::Expired => "key_expired",
            Refusal::IdempotencyConflict => "idempotency_key_conflict",
            Refusal::ReplayLimit => "idempotency_replay_limit",
            Refusal::RateLimited { .. } => "rate_limited",
        }
    }
}

/// The ledger could not decide (fail closed: 503, nothing forwarded).
///
/// Messages never contain token material beyond revocation ids, and never key material.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LedgerError {
    /// Storage unavailable, timed out or failed.
    #[error("ledger unavailable: {0}")]
    Unavailable(String),
    /// The receipt for this claim could not be signed; nothing was written for it.
    #[error("receipt signing failed: {0}")]
    Signing(String),
    /// The ledger file is locked by another process (normally a running `till serve`).
    #[error(
        "ledger {path} is in use by another process (a running `till serve`?); stop it, or \
         use the admin API of the running server"
    )]
    Locked {
        /// The ledger file.
        path: String,
    },
    /// The ledger could not be opened or created (I/O error, not a redb file, ...).
    #[error("cannot open ledger {path}: {reason}")]
    Open {
        /// The ledger file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// Stored state contradicts itself (e.g. a chain head that does not match the family
    /// counter, or a stored receipt that does not parse). Nothing was written.
    #[error("ledger state is inconsistent: {0}")]
    Corrupt(String),
    /// The claim request is malformed (no levels, or a revocation id repeated). A caller bug.
    #[error("invalid claim request: {0}")]
    InvalidRequest(String),
    /// A void was refused: no such claim receipt (never written, or pruned), a void
    /// receipt, or a claim whose idempotency key was replayed (a replay may have been
    /// forwarded under the slot). Nothing was written; the slot stays spent.
    #[error("cannot void: {0}")]
    NotVoidable(String),
    /// Another exporter holds the ledger's export lease (spec/ledger.md §10, "One
    /// exporter per ledger"): nothing was exported or pruned.
    #[error(
        "this ledger's receipts are exported by `{holder}` (to {dir}; its lease runs until \
         {until}, Unix time, and is renewed by each of its runs): exports of one ledger go \
         to one place. Enable [retention] on that proxy only, or stop it and wait for its \
         lease to lapse"
    )]
    ExportLeased {
        /// The exporter holding the lease: a proxy id, or `till-cli (pid N)`.
        holder: String,
        /// Where it exports.
        dir: String,
        /// Unix seconds until which it holds the lease.
        until: u64,
    },
}

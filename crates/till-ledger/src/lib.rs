//! Till's activation ledger: where a cap becomes real.
//!
//! A claim is the only state change per proxied request, and it happens before the
//! request is forwarded. One [`Ledger::claim`] is ONE transaction that checks expiry and
//! revocation of every block of the presented token, answers an idempotent replay with
//! the stored receipt, advances every block's counter (refusing, with nothing written,
//! when any cap would be exceeded), signs the receipt and stores it as the new head of
//! the family's receipt chain.
//!
//! Design: the decision is a pure function ([`plan::plan_claim`]) over what the backend
//! read in its transaction ([`plan::ClaimState`]), so every backend decides alike; the
//! backends only read state, carry out the [`plan::Plan`] and commit. The embedded
//! backend ([`EmbeddedLedger`], redb) runs all writes on one writer thread that
//! group-commits concurrent claims into one fsync'd transaction. Every backend runs the
//! same conformance suite (`conformance` cargo feature). Normative details:
//! `spec/ledger.md`.
//!
//! Besides claims, the ledger keeps what the admin plane needs, written in the same
//! transactions: a record of each block the first time it is seen ([`family`]),
//! per-minute activity per family, and usage alerts with their delivery outbox
//! ([`alert`]), decided inside the claim that crosses a threshold so each fires once.
//!
//! A committed claim whose request never left the proxy (the upstream was unreachable
//! in the connect phase) can be given back with [`Ledger::void`]: one compensating
//! transaction that lowers every counter the claim raised and appends a signed void
//! receipt to the family's chain ([`plan::plan_void`]; `spec/ledger.md` §3.5).
//!
//! Receipts (and the idempotency records pointing at them) are kept until exported and
//! pruned ([`retention::export_and_prune`], the same for every backend that implements
//! [`RetentionStore`]). Non-feature: no
//! multi-process access to one embedded ledger file (use the admin API of the running
//! server, or the FoundationDB backend for a fleet).
//!
//! Nothing here logs or returns token material other than revocation ids, or any key.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use till_ledger::{ClaimRequest, EmbeddedConfig, EmbeddedLedger, Ledger, Level, RequestDigest};
//! use till_receipt::ReceiptSigner;
//!
//! let signer = Arc::new(ReceiptSigner::generate());
//! let ledger = EmbeddedLedger::open("ledger.redb", EmbeddedConfig::new(signer, "proxy-1"))?;
//! let claim = ledger
//!     .claim(ClaimRequest {
//!         levels: vec![Level { revocation_id: vec![7; 64], cap: Some(10) }],
//!         idempotency_key: None,
//!         request: RequestDigest {
//!             method: "POST".into(),
//!             upstream: "openai".into(),
//!             path: "/v1/chat/completions".into(),
//!             body_sha256: "00".repeat(32),
//!             model: Some("gpt-4o".into()),
//!             query: None,
//!             content_type: None,
//!         },
//!         now: 1_750_000_000,
//!         not_after: None,
//!         meta: None,
//!         windows: Vec::new(),
//!         ceilings: None,
//!     })
//!     .await?;
//! match claim {
//!     Ok(claim) => println!("slot {} taken, {:?} left", claim.receipt.body().seq, claim.remaining),
//!     Err(refusal) => println!("refused: {}", refusal.code()),
//! }
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

use std::future::Future;
use std::pin::Pin;

pub use till_receipt::{Receipt, RequestDigest};

pub mod alert;
#[cfg(feature = "conformance")]
pub mod conformance;
mod embedded;
mod error;
pub mod family;
mod fault;
pub mod plan;
pub mod retention;
mod stored;

pub use alert::{AlertOutcome, AlertPolicy, AlertRecord};
pub use family::{BlockMeta, FamilyDetail, FamilyView, KeyBlocks};

pub use embedded::{
    check_file, new_ledger_id, repair_file, EmbeddedConfig, EmbeddedLedger, LedgerBinding,
    LedgerSummary, OpenChecks, RepairOutcome, QUEUE_CAPACITY, SCHEMA_VERSION,
};
pub use error::{LedgerError, Refusal};
#[cfg(feature = "fault-injection")]
#[doc(hidden)]
pub use fault::FaultInjector;
pub use plan::{VoidPlan, VoidState, WindowCount, MAX_REPLAYS};
pub use retention::{ExportReport, RetentionStore};

/// A boxed future, so `dyn Ledger` works.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One block of the presented token, as the ledger sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Level {
    /// The block's revocation id (raw bytes; 64 for ed25519 Biscuit blocks).
    pub revocation_id: Vec<u8>,
    /// The block's declared activation cap, if any.
    pub cap: Option<u64>,
}

/// One activation to claim.
#[derive(Debug, Clone)]
pub struct ClaimRequest {
    /// Blocks of the presented token, authority first. `levels[0].revocation_id` is the
    /// family id. Never empty.
    pub levels: Vec<Level>,
    /// Client-supplied `Idempotency-Key`, scoped to the presented token (its last block).
    /// `None`: the ledger generates one, and a retry inside the ledger reuses it.
    pub idempotency_key: Option<String>,
    /// What will be forwarded (goes into the receipt; a replay must match it).
    pub request: RequestDigest,
    /// Claim time, Unix seconds.
    pub now: u64,
    /// The token's effective expiry (Unix seconds), if any: refuse when `now > not_after`.
    pub not_after: Option<u64>,
    /// The caveats of each level (block order), recorded the first time the ledger sees
    /// a block (for the admin plane) and used to label alerts. `None`: not recorded.
    pub meta: Option<std::sync::Arc<Vec<BlockMeta>>>,
    /// Windowed caps of the levels, decided in the same transaction as the lifetime caps
    /// (spec/ledger.md §3.4). Empty: none.
    pub windows: Vec<WindowCap>,
    /// The per-call ceilings that applied, recorded in the receipt. `None`: none.
    pub ceilings: Option<till_receipt::Ceilings>,
}

/// A windowed cap of one level: at most `max` claims through that block (and its
/// descendants) per fixed window of `secs` seconds (`[now − now mod secs, … + secs)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WindowCap {
    /// Index into [`ClaimRequest::levels`].
    pub level: usize,
    /// Window length in seconds (> 0).
    pub secs: u64,
    /// Most claims per window.
    pub max: u64,
}

impl WindowCap {
    /// Start of the window containing `now`.
    pub fn start(&self, now: u64) -> u64 {
        now - now % self.secs.max(1)
    }
}

/// A successful claim (or an idempotent replay of one).
#[derive(Debug, Clone)]
pub struct Claim {
    /// The signed receipt (the original one on a replay).
    pub receipt: Receipt,
    /// True when this is a replay of an earlier claim with the same idempotency key:
    /// nothing was charged.
    pub replayed: bool,
    /// Activations left under the tightest cap after this claim (`None`: uncapped).
    pub remaining: Option<u64>,
    /// Alerts this claim fired (committed to the outbox with it); empty on a replay.
    pub alerts: Vec<AlertRecord>,
}

/// One claim to give back: the upstream was unreachable and nothing of the request was
/// sent (spec/ledger.md §3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidRequest {
    /// The family id: raw authority-block revocation id (the claim's `levels[0]`).
    pub family: Vec<u8>,
    /// The claim receipt's `seq`.
    pub seq: u64,
    /// Void time, Unix seconds (the void receipt's `iat`).
    pub now: u64,
    /// The windowed caps the claim was decided with ([`ClaimRequest::windows`], levels
    /// indexing the claim's slots): their counters are lowered while still in the window
    /// that counted the claim.
    pub windows: Vec<WindowCap>,
}

/// A void (or the answer to a repeated one).
#[derive(Debug, Clone)]
pub struct Voided {
    /// The signed void receipt (`void: Some(claim seq)`).
    pub receipt: Receipt,
    /// False when the claim was already voided: `receipt` is the existing void receipt and
    /// nothing was written or given back again.
    pub newly: bool,
    /// Activations left under the tightest cap of the claim's levels after the void
    /// (`None`: uncapped; on a repeat, computed from the counters now).
    pub remaining: Option<u64>,
}

/// The outcome of a revocation.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Revoked {
    /// False when the block was already revoked (nothing written).
    pub newly: bool,
    /// The block's family (hex), when the ledger has seen the block.
    pub family: Option<String>,
    /// The revocation alert written to the outbox, if the policy has one.
    pub alert: Option<AlertRecord>,
}

/// Per-block usage, for `till usage` and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LevelUsage {
    /// Revocation id (raw bytes).
    pub revocation_id: Vec<u8>,
    /// Activations claimed through this block and its descendants.
    pub used: u64,
    /// Whether this block's revocation id is revoked.
    pub revoked: bool,
}

/// The ledger contract. Every backend passes the same conformance suite.
pub trait Ledger: Send + Sync + std::fmt::Debug {
    /// Claims one activation in ONE transaction (see `spec/ledger.md`). Durable before it
    /// returns `Ok(Ok(_))`. `Ok(Err(refusal))` wrote nothing. `Err(_)`: the ledger could not
    /// decide; the caller must fail closed (503) and must not forward.
    fn claim(
        &self,
        req: ClaimRequest,
    ) -> BoxFuture<'_, Result<Result<Claim, Refusal>, LedgerError>>;
    /// Gives a committed claim's slot back in ONE transaction (spec/ledger.md §3.5): every
    /// level's counter the claim advanced goes down by one (window counters only while
    /// still in the claim's window), a signed void receipt naming the claim is appended
    /// to the family's chain, and the claim's idempotency record is removed (a retry with
    /// the same key claims afresh). Idempotent: voiding a voided claim returns its void
    /// receipt (`newly: false`) and changes nothing. Revoked or expired keys can be voided
    /// (giving a slot back never exceeds a cap). Fires no alert. Refused with
    /// [`LedgerError::NotVoidable`] (nothing written) for an unknown or pruned seq, a void
    /// receipt, or a claim that was replayed.
    ///
    /// Default: [`LedgerError::NotVoidable`] (a ledger that cannot void keeps the slot
    /// spent: the fail-closed direction).
    fn void(&self, req: VoidRequest) -> BoxFuture<'_, Result<Voided, LedgerError>> {
        Box::pin(async move {
            Err(LedgerError::NotVoidable(format!(
                "receipt {} of family {}: this ledger does not support voids",
                req.seq,
                hex::encode(&req.family)
            )))
        })
    }

    /// Revokes a block by revocation id (idempotent). Effective for the next claim.
    fn revoke(&self, revocation_id: &[u8]) -> BoxFuture<'_, Result<Revoked, LedgerError>>;
    /// Current usage of each given block.
    fn usage(&self, levels: &[Level]) -> BoxFuture<'_, Result<Vec<LevelUsage>, LedgerError>>;
    /// A family's receipts in `seq` order, starting at `from_seq` (1-based), at most `limit`.
    fn receipts(
        &self,
        family: &[u8],
        from_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Receipt>, LedgerError>>;

    /// The signed checkpoints of a family's exported and pruned receipt ranges, in `seq`
    /// order (`spec/ledger.md` §10). Default: none (a backend that never prunes).
    fn checkpoints(
        &self,
        family: &[u8],
    ) -> BoxFuture<'_, Result<Vec<retention::Checkpoint>, LedgerError>> {
        let _ = family;
        Box::pin(async { Ok(Vec::new()) })
    }

    /// Records a key's blocks (admin-API mint or attenuate) so the family is listed
    /// before its first use. Existing records are kept, only marked `minted`.
    fn record_key(&self, key: KeyBlocks, at: u64) -> BoxFuture<'_, Result<(), LedgerError>>;

    /// Every family the ledger knows (first claim or admin mint), ordered by family id.
    fn families(&self, now: u64) -> BoxFuture<'_, Result<Vec<FamilyView>, LedgerError>>;

    /// One family with every block the ledger knows of it; `None` if unknown.
    fn family(
        &self,
        family: &[u8],
        now: u64,
    ) -> BoxFuture<'_, Result<Option<FamilyDetail>, LedgerError>>;

    /// Every alert, newest first, at most `limit`.
    fn alerts(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>>;

    /// Takes up to `limit` due pending alerts for delivery, leasing each for `lease_secs`
    /// (in one transaction, so two deliverers never take the same alert at once).
    fn lease_alerts(
        &self,
        now: u64,
        lease_secs: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>>;

    /// Records the outcome of a delivery attempt.
    fn settle_alert(
        &self,
        id: &str,
        outcome: AlertOutcome,
    ) -> BoxFuture<'_, Result<(), LedgerError>>;
}

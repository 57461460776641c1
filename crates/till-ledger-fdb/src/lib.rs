//! Till's FoundationDB ledger: one activation ledger shared by a fleet of proxies.
//!
//! Every `till serve` of a fleet opens an [`FdbLedger`] on the same cluster and key space.
//! Tokens are verified offline on each proxy; the only shared state is the ledger, and
//! every claim is ONE strictly serializable FoundationDB transaction that checks
//! revocation, answers idempotent replays, advances every block's counter with
//! serializable reads (never a blind atomic add on a capped counter), stores the signed
//! receipt once (under family and seq; the slot index, a versionstamped append-only
//! journal and the idempotency record point at it). Same [`till_ledger::Ledger`] contract and the
//! same conformance suite as the embedded backend. Normative: `spec/ledger-fdb.md`.
//!
//! # Design
//!
//! The engine ([`KvLedger`]) is generic over a small transaction interface ([`KvStore`],
//! [`KvTxn`]): lanes per token family group-commit concurrent claims into one
//! transaction; each attempt reads everything the batch needs at once, plans every claim
//! with [`till_ledger::plan::plan_claim`] (the decision is shared with every backend),
//! signs, writes, commits; retryable errors (1020 `not_committed`, 1021
//! `commit_unknown_result`, 1007 `transaction_too_old`, ...) rerun the whole batch from
//! fresh reads within a retry limit and a deadline. A claim whose earlier attempt
//! committed despite an unknown result finds its own receipt in its idempotency record
//! and returns it: never a second slot. [`FdbStore`] (feature `fdb-client`) is the real
//! client; [`memory::MemoryStore`] (feature `memory`) imitates FoundationDB's
//! transaction semantics with error injection, so the retry logic is tested on machines
//! without `libfdb_c`.
//!
//! # Non-features
//!
//! - No FoundationDB directory layer: the key space is a fixed tuple prefix `(keyspace,)`
//!   chosen in the config (no extra transaction or allocator at startup).
//! - Receipts are bounded only by export and prune
//!   ([`till_ledger::retention::export_and_prune`], which [`KvLedger`] and [`FdbLedger`]
//!   support; the export also sweeps the journal entries of pruned receipts), and
//!   idempotency records of kept receipts stop answering after
//!   [`FdbConfig::idempotency_window`] (a replay after it is a fresh claim) but are
//!   deleted only with their receipt.
//! - No caching of revocations or counters: every claim reads them in its transaction.
//!
//! Nothing here logs token material beyond revocation ids, or any key.
//!
//! # Example
//!
//! The engine over the in-memory store (feature `memory`); a fleet proxy does the same
//! with `FdbLedger::open(FdbConfig::new(signer, "proxy-1").with_cluster_file(path))`
//! after [`boot`] (feature `fdb-client`).
//!
//! ```
//! # #[cfg(feature = "memory")]
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use till_ledger::{ClaimRequest, Ledger, Level, RequestDigest};
//! use till_ledger_fdb::{memory::MemoryStore, FdbConfig, KvLedger};
//! use till_receipt::ReceiptSigner;
//!
//! let signer = Arc::new(ReceiptSigner::generate());
//! let ledger = KvLedger::start(Arc::new(MemoryStore::new()), &FdbConfig::new(signer, "proxy-1"))?;
//! let req = ClaimRequest {
//!     levels: vec![Level { revocation_id: vec![7; 64], cap: Some(1) }],
//!     idempotency_key: None,
//!     request: RequestDigest {
//!         method: "POST".into(),
//!         upstream: "openai".into(),
//!         path: "/v1/chat/completions".into(),
//!         body_sha256: "00".repeat(32),
//!         model: None,
//!         query: None,
//!         content_type: None,
//!     },
//!     now: 1_750_000_000,
//!     not_after: None,
//!     meta: None,
//!     windows: Vec::new(),
//!     ceilings: None,
//! };
//! let first = ledger.claim(req.clone()).await?;
//! assert_eq!(first.map(|c| c.receipt.body().seq).ok(), Some(1));
//! assert_eq!(ledger.claim(req).await?.err().map(|r| r.code()), Some("activation_limit_reached"));
//! # Ok(())
//! # }
//! # #[cfg(not(feature = "memory"))]
//! # fn main() {}
//! ```
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod admin;
#[cfg(feature = "fdb-client")]
mod client;
mod config;
mod engine;
mod error;
pub mod keys;
mod kv;
#[cfg(any(test, feature = "memory"))]
pub mod memory;
mod retention;

pub use admin::SCAN_LIMIT;
#[cfg(feature = "fdb-client")]
pub use client::{boot, is_booted, FdbLedger, FdbNetwork, FdbStore, FdbTxn};
pub use config::{FdbConfig, LedgerIdCheck};
pub use engine::{EngineStats, KvLedger, LANE_QUEUE_CAPACITY};
pub use error::{codes, BootError, KvError};
pub use kv::{KvStore, KvTxn, TxnOptions};
pub use retention::FDB_PRUNE_CHUNK;

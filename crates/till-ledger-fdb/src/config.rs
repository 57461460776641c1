//! Configuration of the FoundationDB ledger.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use till_ledger::AlertPolicy;
use till_receipt::ReceiptSigner;

/// Configuration of an [`crate::FdbLedger`] (and of the engine on any [`crate::KvStore`]).
#[derive(Debug, Clone)]
pub struct FdbConfig {
    /// The cluster file; `None`: `libfdb_c`'s default (`$FDB_CLUSTER_FILE`, then
    /// `./fdb.cluster`, then `/etc/foundationdb/fdb.cluster`). Ignored by the in-memory store.
    pub cluster_file: Option<PathBuf>,
    /// Key-space name: every key lives under the tuple prefix `(keyspace,)`, so several
    /// Till deployments (or tests) can share one cluster. Default [`Self::DEFAULT_KEYSPACE`].
    pub keyspace: String,
    /// Signs every receipt (its key id goes into the receipts). Every proxy of a fleet
    /// holds the same receipt key.
    pub signer: Arc<ReceiptSigner>,
    /// This proxy's id (goes into the receipts). Should differ per proxy of a fleet.
    pub proxy_id: String,
    /// Most claims applied in one transaction (group commit); `0` is treated as `1`.
    pub max_batch: usize,
    /// Independent batching lanes: claims of one token family always go to the same lane
    /// (so one proxy never conflicts with itself on a hot token); different families run
    /// in parallel. `0` is treated as `1`.
    pub lanes: usize,
    /// Upper bound on one operation (a claim's transaction with all its retries, a revoke,
    /// a read). Past it the caller gets `LedgerError::Unavailable` (a 503), so a frozen
    /// cluster costs a request at most this long. Also set as FoundationDB's `timeout`
    /// transaction option.
    pub transaction_timeout: Duration,
    /// Most retries of one transaction (conflicts, unknown results, too-old reads). Also
    /// set as FoundationDB's `retry_limit` transaction option.
    pub retry_limit: u32,
    /// Longest backoff between retries (FoundationDB's `max_retry_delay` option; its
    /// default of 1 s is far too slow for a hot token's conflict retries).
    pub max_retry_delay: Duration,
    /// Which alerts claims and revocations fire (decided and written in their
    /// transaction). Default [`AlertPolicy::default()`]. Every proxy of a fleet should use
    /// the same policy.
    pub alerts: AlertPolicy,
    /// How long an idempotency record answers replays, counted from its claim's `now`.
    /// A claim whose record is older than this (compared against the new claim's `now`)
    /// finds no record: it is a fresh claim (charged, new receipt), not a replay. Default
    /// [`Self::DEFAULT_IDEMPOTENCY_WINDOW`]; whole seconds. Every proxy of a fleet should
    /// use the same window.
    pub idempotency_window: Duration,
    /// Which key space this proxy accepts, by its ledger id (`<32 hex>@<receipt key id>`,
    /// created once with the key space and put into every receipt). Default
    /// [`LedgerIdCheck::SameReceiptKey`].
    pub ledger_id: LedgerIdCheck,
}

/// How opening checks the key space's ledger id (spec/ledger-fdb.md §1, "Ledger id").
///
/// A fleet shares one receipt key per key space, so by default a key space whose id is
/// bound to another receipt key is refused: it belongs to another deployment (a wrong
/// `keyspace` or cluster file), and claiming in it would mix two deployments' chains.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LedgerIdCheck {
    /// A key space without an id (fresh, or written before ledger ids) gets a new one
    /// bound to this proxy's receipt key; one whose id is bound to another receipt key is
    /// refused ([`till_ledger::LedgerError::Open`], nothing written).
    #[default]
    SameReceiptKey,
    /// The key space must already carry exactly this id, whatever receipt key it names
    /// (after a rotation of the fleet's receipt key, set the id the refusal names). A key
    /// space without an id — fresh, cleared, or written before ledger ids — is refused
    /// and nothing is created: a proxy that expects a ledger never starts a new one.
    Expect(String),
}

impl FdbConfig {
    /// Default key space: all keys under the tuple `("till",)`.
    pub const DEFAULT_KEYSPACE: &'static str = "till";
    /// Default claims per transaction. A claim writes about 2 KB (the receipt once, plus
    /// small records: idempotency pointer, journal pointer, counters, slots, head; see the
    /// spec), so 128 stays well under FoundationDB's recommended 1 MB per transaction.
    pub const DEFAULT_MAX_BATCH: usize = 128;
    /// Default number of batching lanes.
    pub const DEFAULT_LANES: usize = 16;
    /// Default operation timeout (the embedded ledger's default claim timeout too).
    pub const DEFAULT_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(2);
    /// Default retry limit.
    pub const DEFAULT_RETRY_LIMIT: u32 = 100;
    /// Default longest retry backoff.
    pub const DEFAULT_MAX_RETRY_DELAY: Duration = Duration::from_millis(50);
    /// Default idempotency window: 24 hours.
    pub const DEFAULT_IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);
    /// Most claims one transaction may carry (user versions of the journal's versionstamps
    /// are 16 bits; the byte limit bites long before).
    pub const MAX_BATCH_LIMIT: usize = 1024;

    /// A config with the defaults and `libfdb_c`'s default cluster file.
    pub fn new(signer: Arc<ReceiptSigner>, proxy_id: impl Into<String>) -> Self {
        Self {
            cluster_file: None,
            keyspace: Self::DEFAULT_KEYSPACE.to_owned(),
            signer,
            proxy_id: proxy_id.into(),
            max_batch: Self::DEFAULT_MAX_BATCH,
            lanes: Self::DEFAULT_LANES,
            transaction_timeout: Self::DEFAULT_TRANSACTION_TIMEOUT,
            retry_limit: Self::DEFAULT_RETRY_LIMIT,
            max_retry_delay: Self::DEFAULT_MAX_RETRY_DELAY,
            alerts: AlertPolicy::default(),
            idempotency_window: Self::DEFAULT_IDEMPOTENCY_WINDOW,
            ledger_id: LedgerIdCheck::SameReceiptKey,
        }
    }

    /// The same config with `cluster_file` set.
    pub fn with_cluster_file(mut self, cluster_file: impl Into<PathBuf>) -> Self {
        self.cluster_file = Some(cluster_file.into());
        self
    }

    /// The same config with `keyspace` set.
    pub fn with_keyspace(mut self, keyspace: impl Into<String>) -> Self {
        self.keyspace = keyspace.into();
        self
    }

    pub(crate) fn batch_size(&self) -> usize {
        self.max_batch.clamp(1, Self::MAX_BATCH_LIMIT)
    }

    pub(crate) fn lane_count(&self) -> usize {
        self.lanes.clamp(1, 1024)
    }
}

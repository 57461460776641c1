//! The small transaction interface the engine needs from FoundationDB.
//!
//! The claim engine ([`crate::KvLedger`]) is generic over [`KvStore`] so the exact code that
//! runs against a cluster (batching, the retry loop, `maybe_committed` handling) also runs
//! against [`crate::memory::MemoryStore`] in tests on machines without `libfdb_c`. The
//! contract is FoundationDB's:
//!
//! - reads are serializable: every key read (and every range read) joins the
//!   transaction's read-conflict set, and the commit fails with 1020 `not_committed` if
//!   any of them was written by a transaction that committed after this one's read
//!   version;
//! - writes are buffered and applied atomically at commit;
//! - a failed step is a [`KvError`]; [`KvTxn::on_error`] backs off and resets the
//!   transaction for another attempt when the error is retryable, and returns an error
//!   otherwise.

use std::future::Future;
use std::time::Duration;

use crate::error::KvError;

/// Key-value pairs of a range read, in key order.
pub type KeyValues = Vec<(Vec<u8>, Vec<u8>)>;

/// Options every transaction gets (FoundationDB transaction options).
#[derive(Debug, Clone, Copy)]
pub struct TxnOptions {
    /// `timeout`: the whole transaction, retries included, is cancelled after this.
    pub timeout: Duration,
    /// `retry_limit`: `on_error` gives up after this many retries.
    pub retry_limit: u32,
    /// `max_retry_delay`: the longest backoff `on_error` sleeps.
    pub max_retry_delay: Duration,
}

/// A database that starts transactions.
pub trait KvStore: Send + Sync + std::fmt::Debug + 'static {
    /// The transaction type.
    type Txn: KvTxn;
    /// Starts a transaction with `options` applied.
    fn begin(&self, options: &TxnOptions) -> Result<Self::Txn, KvError>;
}

/// One transaction (reused across retries, like a FoundationDB transaction).
pub trait KvTxn: Send + Sync + Sized + 'static {
    /// Serializable read of one key.
    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Vec<u8>>, KvError>> + Send;
    /// Serializable read of `[begin, end)`, ascending, at most `limit` pairs.
    fn get_range(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> impl Future<Output = Result<KeyValues, KvError>> + Send;
    /// Buffers a write.
    fn set(&mut self, key: &[u8], value: &[u8]);
    /// Buffers the removal of one key (a write: it joins the write-conflict set, never the
    /// read-conflict set).
    fn clear(&mut self, key: &[u8]);
    /// Buffers the removal of every key in `[begin, end)` (a write, like [`KvTxn::clear`]).
    fn clear_range(&mut self, begin: &[u8], end: &[u8]);
    /// Buffers a `SetVersionstampedKey` mutation: `key` ends with the 4-byte little-endian
    /// offset of a 10-byte placeholder, which the commit replaces with the commit
    /// versionstamp. Never conflicts with anything (nobody reads the key before it exists).
    fn set_versionstamped_key(&mut self, key: &[u8], value: &[u8]);
    /// Commits; on failure hands the transaction back with the error, for `on_error`.
    fn commit(self) -> impl Future<Output = Result<(), (Self, KvError)>> + Send;
    /// FoundationDB's `on_error`: for a retryable error, backs off, resets the transaction
    /// (options kept) and returns it for another attempt; otherwise returns the error.
    fn on_error(self, error: KvError) -> impl Future<Output = Result<Self, KvError>> + Send;
}

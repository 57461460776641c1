//! Errors of the FoundationDB backend.
//!
//! The [`till_ledger::Ledger`] contract speaks [`till_ledger::LedgerError`]; these are the
//! errors below it: one key-value transaction step ([`KvError`]) and booting the client
//! ([`BootError`]). Nothing here carries token material or key material: keys of the
//! ledger's key space contain revocation ids at most, and they are never put in messages.

/// FoundationDB error codes the engine names (the rest pass through as numbers).
pub mod codes {
    /// `transaction_too_old`: the read version is older than the 5 s MVCC window. Retryable;
    /// the transaction did not commit.
    pub const TRANSACTION_TOO_OLD: i32 = 1007;
    /// `not_committed`: a read conflicted with a concurrent commit. Retryable; the
    /// transaction did not commit.
    pub const NOT_COMMITTED: i32 = 1020;
    /// `commit_unknown_result`: the commit may or may not have been applied. Retryable,
    /// and `maybe_committed`.
    pub const COMMIT_UNKNOWN_RESULT: i32 = 1021;
    /// `transaction_cancelled`.
    pub const TRANSACTION_CANCELLED: i32 = 1025;
    /// `transaction_timed_out`: the `timeout` transaction option fired. Not retryable.
    pub const TRANSACTION_TIMED_OUT: i32 = 1031;
    /// `cluster_version_changed`: maybe committed (multi-version client).
    pub const CLUSTER_VERSION_CHANGED: i32 = 1039;
}

/// One failed step of a key-value transaction (a read, or the commit).
///
/// Mirrors a FoundationDB error code plus the two predicates the retry loop needs, so the
/// engine decides the same way on the real client and on the in-memory store.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum KvError {
    /// A FoundationDB error (or the in-memory store's imitation of one).
    #[error("foundationdb error {code}: {message}")]
    Fdb {
        /// The FoundationDB error code (e.g. 1020 `not_committed`).
        code: i32,
        /// FoundationDB's description of the code.
        message: String,
        /// `fdb_error_predicate(RETRYABLE)`: running the transaction again may succeed.
        retryable: bool,
        /// `fdb_error_predicate(MAYBE_COMMITTED)`: the failed commit may have been applied.
        maybe_committed: bool,
    },
    /// The engine's own deadline ([`crate::FdbConfig::transaction_timeout`]) passed.
    #[error("transaction timed out after {0:?}")]
    TimedOut(std::time::Duration),
    /// The engine's own retry budget ([`crate::FdbConfig::retry_limit`]) is spent; carries
    /// the last error.
    #[error("gave up after {retries} retries; last error: {last}")]
    RetryLimit {
        /// Retries made.
        retries: u32,
        /// The last error seen.
        last: Box<KvError>,
    },
    /// A stored value could not be decoded (a key of the ledger's space holds bytes this
    /// build does not understand).
    #[error("undecodable value in the ledger key space: {0}")]
    Decode(String),
    /// The database could not be opened or configured.
    #[error("cannot open the database: {0}")]
    Open(String),
}

impl KvError {
    /// An error for a FoundationDB code, classified the way `libfdb_c` 7.3 classifies it
    /// (used by the in-memory store; the real client asks `libfdb_c`).
    pub fn from_code(code: i32) -> Self {
        let (message, retryable, maybe_committed) = match code {
            codes::TRANSACTION_TOO_OLD => (
                "Transaction is too old to perform reads or be committed",
                true,
                false,
            ),
            1009 => ("Request for future version", true, false),
            codes::NOT_COMMITTED => (
                "Transaction not committed due to conflict with another transaction",
                true,
                false,
            ),
            codes::COMMIT_UNKNOWN_RESULT => {
                ("Transaction may or may not have committed", true, true)
            }
            codes::TRANSACTION_CANCELLED => (
                "Operation aborted because the transaction was cancelled",
                false,
                false,
            ),
            codes::TRANSACTION_TIMED_OUT => (
                "Operation aborted because the transaction timed out",
                false,
                false,
            ),
            1037 => (
                "Storage process does not have recent mutations",
                true,
                false,
            ),
            codes::CLUSTER_VERSION_CHANGED => (
                "The protocol version of the cluster has changed",
                true,
                true,
            ),
            2101 => ("Transaction exceeds byte limit", false, false),
            _ => ("unknown error", false, false),
        };
        KvError::Fdb {
            code,
            message: message.to_owned(),
            retryable,
            maybe_committed,
        }
    }

    /// The FoundationDB error code, if this is one.
    pub fn code(&self) -> Option<i32> {
        match self {
            KvError::Fdb { code, .. } => Some(*code),
            KvError::RetryLimit { last, .. } => last.code(),
            _ => None,
        }
    }

    /// Running the transaction again may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            KvError::Fdb {
                retryable: true,
                ..
            }
        )
    }

    /// The failed commit may have been applied (`commit_unknown_result` and kin).
    pub fn is_maybe_committed(&self) -> bool {
        matches!(
            self,
            KvError::Fdb {
                maybe_committed: true,
                ..
            }
        )
    }
}

/// Booting the FoundationDB client network (see [`crate::boot`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BootError {
    /// `boot()` was already called in this process; the FoundationDB client can be started
    /// once per process (keep the first [`crate::FdbNetwork`] alive instead).
    #[error("the FoundationDB client is already booted in this process")]
    AlreadyBooted,
    /// `libfdb_c` refused API version 730 or could not start its network thread.
    #[error("cannot start the FoundationDB client (API version 730): error {code}: {message}")]
    Client {
        /// FoundationDB error code (2203: the installed libfdb_c is older than 7.3).
        code: i32,
        /// FoundationDB's description.
        message: String,
    },
}

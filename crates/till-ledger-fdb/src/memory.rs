//! An in-memory imitation of FoundationDB's transaction semantics, with error injection
//! (cargo feature `memory`; tests only).
//!
//! What it imitates: multi-version reads at a read version taken when the transaction
//! starts (or is reset by `on_error`); every read joins the read-conflict set, and a commit
//! fails with 1020 `not_committed` when any key it read was written by a commit after its
//! read version; writes apply atomically at commit under a new version; versionstamped keys
//! get `(commit version: 8 bytes BE, batch order: 2 bytes BE)`; `on_error` backs off, counts
//! retries against `retry_limit` and fails with 1031 `transaction_timed_out` past the
//! `timeout` option. Injected faults: the next commit fails with a chosen code, applied or
//! not (1021 `commit_unknown_result` either way); the next read fails; the store freezes
//! (reads and commits hang until thawed or the transaction times out).
//!
//! What it does NOT prove: anything about FoundationDB itself (its resolver, its
//! recovery, real `commit_unknown_result` timing, the 5 s MVCC window, size limits). It
//! proves the engine's retry and idempotency logic against the contract FoundationDB
//! documents. The same engine runs against a real cluster in `tests/fdb_cluster.rs` when
//! `TILL_FDB_CLUSTER_FILE` is set.

use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::watch;

use crate::error::{codes, KvError};
use crate::kv::{KvStore, KvTxn, TxnOptions};

/// One injected commit failure.
#[derive(Debug, Clone, Copy)]
struct CommitFault {
    code: i32,
    applied: bool,
}

type History = Vec<(u64, Option<Vec<u8>>)>;

/// A buffered write, applied in order at commit.
#[derive(Debug, Clone)]
enum Op {
    Set(Vec<u8>, Vec<u8>),
    Clear(Vec<u8>, Vec<u8>),
}

#[derive(Debug, Default)]
struct Data {
    /// Committed versions so far.
    version: u64,
    /// key → (version, value) history, oldest first; `None` marks a clear.
    keys: BTreeMap<Vec<u8>, History>,
    commit_faults: VecDeque<CommitFault>,
    read_faults: VecDeque<i32>,
    commits: u64,
    conflicts: u64,
    /// Percent of commits that fail with a random retryable error (see `set_chaos`).
    chaos_percent: u32,
    /// Simulated commit round trip (see `set_commit_latency`).
    commit_latency: Duration,
}

#[derive(Debug)]
struct Inner {
    data: Mutex<Data>,
    frozen: watch::Sender<bool>,
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, Data> {
        // A panic while holding the lock is a test failure anyway; keep going with the data.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The in-memory store. Clones share the same data (several "proxies" on one "cluster").
#[derive(Debug, Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        let (frozen, _) = watch::channel(false);
        Self {
            inner: Arc::new(Inner {
                data: Mutex::new(Data::default()),
                frozen,
            }),
        }
    }

    /// The next commit that reaches the store (after its conflict check passes) fails with
    /// `code`; with `applied`, its writes land first (a `commit_unknown_result` that in fact
    /// committed). Faults queue up in order.
    pub fn inject_commit_error(&self, code: i32, applied: bool) {
        self.inner
            .lock()
            .commit_faults
            .push_back(CommitFault { code, applied });
    }

    /// The next read fails with `code` (e.g. 1007 `transaction_too_old`).
    pub fn inject_read_error(&self, code: i32) {
        self.inner.lock().read_faults.push_back(code);
    }

    /// From now on, `percent` of the commits that pass their conflict check fail with a
    /// random one of 1020 (not applied), 1021 (applied or not) and 1007 (not applied).
    /// `0` turns chaos off.
    pub fn set_chaos(&self, percent: u32) {
        self.inner.lock().chaos_percent = percent.min(100);
    }

    /// From now on every commit takes `latency` before it is resolved (conflict check and
    /// apply), like a cluster's commit round trip; transactions that read meanwhile get
    /// older read versions and so conflict as they would on a real cluster. Benchmarks.
    pub fn set_commit_latency(&self, latency: Duration) {
        self.inner.lock().commit_latency = latency;
    }

    /// Injected faults not yet consumed.
    pub fn pending_faults(&self) -> usize {
        let data = self.inner.lock();
        data.commit_faults.len() + data.read_faults.len()
    }

    /// Freezes (`true`) or thaws (`false`) the store: while frozen, reads and commits hang
    /// until thawed or their transaction's timeout passes (1031).
    pub fn set_frozen(&self, frozen: bool) {
        self.inner.frozen.send_replace(frozen);
    }

    /// Successful commits so far.
    pub fn commits(&self) -> u64 {
        self.inner.lock().commits
    }

    /// Commits refused with 1020 `not_committed` so far.
    pub fn conflicts(&self) -> u64 {
        self.inner.lock().conflicts
    }

    /// The latest value of every key.
    pub fn dump(&self) -> BTreeMap<Vec<u8>, Vec<u8>> {
        self.inner
            .lock()
            .keys
            .iter()
            .filter_map(|(k, h)| {
                h.last()
                    .and_then(|(_, v)| v.as_ref())
                    .map(|v| (k.clone(), v.clone()))
            })
            .collect()
    }
}

impl KvStore for MemoryStore {
    type Txn = MemoryTxn;

    fn begin(&self, options: &TxnOptions) -> Result<MemoryTxn, KvError> {
        let read_version = self.inner.lock().version;
        Ok(MemoryTxn {
            inner: Arc::clone(&self.inner),
            options: *options,
            created: Instant::now(),
            retries: 0,
            read_version,
            reads: Mutex::new(Vec::new()),
            writes: Vec::new(),
            stamped: Vec::new(),
        })
    }
}

/// A transaction on a [`MemoryStore`].
#[derive(Debug)]
pub struct MemoryTxn {
    inner: Arc<Inner>,
    options: TxnOptions,
    created: Instant,
    retries: u32,
    read_version: u64,
    /// Read-conflict ranges `[begin, end)`.
    reads: Mutex<Vec<(Vec<u8>, Vec<u8>)>>,
    writes: Vec<Op>,
    stamped: Vec<(Vec<u8>, Vec<u8>)>,
}

fn key_after(key: &[u8]) -> Vec<u8> {
    let mut k = key.to_vec();
    k.push(0);
    k
}

fn visible(history: &[(u64, Option<Vec<u8>>)], version: u64) -> Option<&Vec<u8>> {
    history
        .iter()
        .rev()
        .find(|(v, _)| *v <= version)
        .and_then(|(_, value)| value.as_ref())
}

impl MemoryTxn {
    fn remaining(&self) -> Duration {
        self.options.timeout.saturating_sub(self.created.elapsed())
    }

    /// Waits while the store is frozen; 1031 once the transaction's timeout passes.
    async fn wait_thawed(&self) -> Result<(), KvError> {
        let mut frozen = self.inner.frozen.subscribe();
        let thawed = tokio::time::timeout(self.remaining(), frozen.wait_for(|f| !*f))
            .await
            .is_ok_and(|r| r.is_ok());
        if thawed && self.remaining() > Duration::ZERO {
            Ok(())
        } else {
            Err(KvError::from_code(codes::TRANSACTION_TIMED_OUT))
        }
    }

    fn note_read(&self, begin: Vec<u8>, end: Vec<u8>) {
        self.reads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push((begin, end));
    }
}

impl KvTxn for MemoryTxn {
    fn get(&self, key: &[u8]) -> impl Future<Output = Result<Option<Vec<u8>>, KvError>> + Send {
        let key = key.to_vec();
        async move {
            self.wait_thawed().await?;
            // Read your writes: the latest buffered write touching the key wins.
            for op in self.writes.iter().rev() {
                match op {
                    Op::Set(k, v) if *k == key => return Ok(Some(v.clone())),
                    Op::Clear(b, e) if *b <= key && key < *e => return Ok(None),
                    _ => {}
                }
            }
            let value = {
                let mut data = self.inner.lock();
                if let Some(code) = data.read_faults.pop_front() {
                    return Err(KvError::from_code(code));
                }
                data.keys
                    .get(&key)
                    .and_then(|h| visible(h, self.read_version))
                    .cloned()
            };
            self.note_read(key.clone(), key_after(&key));
            Ok(value)
        }
    }

    fn get_range(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> impl Future<Output = Result<Vec<(Vec<u8>, Vec<u8>)>, KvError>> + Send {
        let (begin, end) = (begin.to_vec(), end.to_vec());
        async move {
            self.wait_thawed().await?;
            let out: Vec<(Vec<u8>, Vec<u8>)> = {
                let mut data = self.inner.lock();
                if let Some(code) = data.read_faults.pop_front() {
                    return Err(KvError::from_code(code));
                }
                if begin >= end {
                    return Ok(Vec::new());
                }
                data.keys
                    .range(begin.clone()..end.clone())
                    .filter_map(|(k, h)| {
                        visible(h, self.read_version).map(|v| (k.clone(), v.clone()))
                    })
                    .take(limit)
                    .collect()
            };
            // Like FoundationDB: a limited range read conflicts only up to what it saw.
            let conflict_end = match (out.len() == limit, out.last()) {
                (true, Some((last, _))) => key_after(last),
                _ => end,
            };
            self.note_read(begin, conflict_end);
            Ok(out)
        }
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        self.writes.push(Op::Set(key.to_vec(), value.to_vec()));
    }

    fn clear(&mut self, key: &[u8]) {
        self.writes.push(Op::Clear(key.to_vec(), key_after(key)));
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        if begin < end {
            self.writes.push(Op::Clear(begin.to_vec(), end.to_vec()));
        }
    }

    fn set_versionstamped_key(&mut self, key: &[u8], value: &[u8]) {
        self.stamped.push((key.to_vec(), value.to_vec()));
    }

    async fn commit(self) -> Result<(), (Self, KvError)> {
        if let Err(e) = self.wait_thawed().await {
            return Err((self, e));
        }
        let latency = self.inner.lock().commit_latency;
        if !latency.is_zero() {
            tokio::time::sleep(latency).await;
        }
        let outcome = {
            let mut data = self.inner.lock();
            let reads = self.reads.lock().unwrap_or_else(|e| e.into_inner());
            let conflict = reads.iter().any(|(b, e)| {
                data.keys
                    .range(b.clone()..e.clone())
                    .any(|(_, h)| h.last().is_some_and(|(v, _)| *v > self.read_version))
            });
            if conflict {
                data.conflicts += 1;
                Err(KvError::from_code(codes::NOT_COMMITTED))
            } else {
                let fault = data
                    .commit_faults
                    .pop_front()
                    .or_else(|| chaos(data.chaos_percent));
                let apply = fault.is_none_or(|f| f.applied);
                if apply {
                    data.version += 1;
                    let version = data.version;
                    for op in &self.writes {
                        match op {
                            Op::Set(k, v) => data
                                .keys
                                .entry(k.clone())
                                .or_default()
                                .push((version, Some(v.clone()))),
                            Op::Clear(b, e) => {
                                // Only keys that exist get a tombstone (a clear of nothing
                                // changes nothing a reader could see).
                                for (_, h) in data.keys.range_mut(b.clone()..e.clone()) {
                                    if h.last().is_some_and(|(_, v)| v.is_some()) {
                                        h.push((version, None));
                                    }
                                }
                            }
                        }
                    }
                    for (order, (k, v)) in self.stamped.iter().enumerate() {
                        if let Some(key) = complete_stamp(k, version, order) {
                            data.keys
                                .entry(key)
                                .or_default()
                                .push((version, Some(v.clone())));
                        }
                    }
                    data.commits += 1;
                }
                match fault {
                    Some(f) => Err(KvError::from_code(f.code)),
                    None => Ok(()),
                }
            }
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(e) => Err((self, e)),
        }
    }

    async fn on_error(mut self, error: KvError) -> Result<Self, KvError> {
        if !error.is_retryable() {
            return Err(error);
        }
        if self.retries >= self.options.retry_limit {
            return Err(error);
        }
        if self.remaining() == Duration::ZERO {
            return Err(KvError::from_code(codes::TRANSACTION_TIMED_OUT));
        }
        // FoundationDB backs off from 10 ms, doubling; a short jittered backoff keeps
        // the tests fast while still spreading contending retries.
        let backoff = Duration::from_micros(200 + rand::random::<u64>() % 800)
            .saturating_mul(1 << self.retries.min(6))
            .min(self.options.max_retry_delay);
        tokio::time::sleep(backoff.min(self.remaining())).await;
        self.retries += 1;
        self.read_version = self.inner.lock().version;
        self.reads.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.writes.clear();
        self.stamped.clear();
        Ok(self)
    }
}

fn chaos(percent: u32) -> Option<CommitFault> {
    if percent == 0 || rand::random::<u32>() % 100 >= percent {
        return None;
    }
    let (code, applied) = match rand::random::<u32>() % 4 {
        0 => (codes::NOT_COMMITTED, false),
        1 => (codes::COMMIT_UNKNOWN_RESULT, true),
        2 => (codes::COMMIT_UNKNOWN_RESULT, false),
        _ => (codes::TRANSACTION_TOO_OLD, false),
    };
    Some(CommitFault { code, applied })
}

/// Replaces the 10-byte placeholder at the key's trailing 4-byte LE offset with
/// `(version BE, order BE)` and drops the offset. `None` for a malformed key.
fn complete_stamp(key: &[u8], version: u64, order: usize) -> Option<Vec<u8>> {
    let split = key.len().checked_sub(4)?;
    let (body, offset) = key.split_at(split);
    let offset = usize::try_from(u32::from_le_bytes(offset.try_into().ok()?)).ok()?;
    let mut out = body.to_vec();
    let stamp = out.get_mut(offset..offset.checked_add(10)?)?;
    stamp[..8].copy_from_slice(&version.to_be_bytes());
    stamp[8..].copy_from_slice(&u16::try_from(order).ok()?.to_be_bytes());
    Some(out)
}

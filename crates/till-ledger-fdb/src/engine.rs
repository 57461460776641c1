//! The claim engine: batching lanes, one transaction per batch, the retry loop.
//!
//! Generic over [`KvStore`], so the code that runs against a FoundationDB cluster is the
//! code the in-memory tests exercise. Normative description: `spec/ledger-fdb.md`.
//!
//! - **Lanes.** A claim goes to lane `hash(family) % lanes`. A lane takes its first
//!   waiting claim plus whatever else is queued (up to `max_batch`) and applies them all
//!   in ONE transaction (group commit). Claims of one family always share a lane, so one
//!   proxy never conflicts with itself on a hot token; families in different lanes commit
//!   in parallel.
//! - **One attempt.** Read every key the batch needs (idempotency records, revocation
//!   flags, counters, chain heads) concurrently with serializable reads; plan each claim
//!   in order with [`till_ledger::plan::plan_claim`] against an overlay of the batch's own
//!   writes (so two claims of a hot token in one batch see each other); sign receipts;
//!   buffer the writes; commit once.
//! - **Retries.** A failed read or commit goes through `on_error` (backoff, reset) and the
//!   whole batch is planned again from fresh reads, within `retry_limit` and the batch's
//!   deadline. Every write of an idempotency record carries a fresh writer id, kept in the
//!   record, and remembered by the claim: when a later attempt finds one of its own ids in
//!   the record, the earlier attempt did commit (`commit_unknown_result` that in fact
//!   landed) and the claim is answered as that attempt did (the original receipt, or the
//!   replay), charging nothing more and counting no extra replay.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::future::Future;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::try_join_all;
use till_ledger::family::ACTIVITY_MINUTES;
use till_ledger::plan::{self, ClaimContext, ClaimState, Plan, StoredIdempotency};
use till_ledger::{
    AlertOutcome, AlertPolicy, AlertRecord, BoxFuture, Claim, ClaimRequest, FamilyDetail,
    FamilyView, KeyBlocks, Ledger, LedgerError, Level, LevelUsage, Receipt, Refusal, Revoked,
    VoidRequest, Voided,
};
use till_receipt::ReceiptSigner;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::admin;
use crate::config::{FdbConfig, LedgerIdCheck};
use crate::error::KvError;
use crate::keys::{self, Keyspace};
use crate::kv::{KvStore, KvTxn, TxnOptions};

/// Claims waiting in one lane beyond this many are refused with
/// [`LedgerError::Unavailable`] ("ledger busy") rather than queued without bound.
pub const LANE_QUEUE_CAPACITY: usize = 4096;

/// How long past its deadline a caller waits for the lane's own answer before giving up
/// itself (the lane normally answers `Unavailable` at the deadline).
const ANSWER_GRACE: Duration = Duration::from_millis(250);

type ClaimAnswer = Result<Result<Claim, Refusal>, LedgerError>;

/// Counters of what the engine did, for tests, benchmarks and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EngineStats {
    /// Claim batches that ended (committed, read-only, or failed).
    pub batches: u64,
    /// Claims carried by those batches.
    pub claims: u64,
    /// Transactions committed (claim batches and revocations).
    pub commits: u64,
    /// Retries after a retryable error (conflicts, unknown results, too-old reads).
    pub retries: u64,
    /// Commits that failed with a `maybe_committed` error.
    pub maybe_committed: u64,
    /// Claims answered with their own receipt after an unknown commit result.
    pub recovered: u64,
    /// Operations that failed (timeout, retry limit, non-retryable error).
    pub failures: u64,
    /// Wall time claim batches spent reading (µs, all attempts): where a batch waits
    /// for the store's reads.
    pub read_micros: u64,
    /// Wall time claim batches spent planning and signing (µs, all attempts): CPU on the
    /// lane's critical path.
    pub plan_micros: u64,
    /// Wall time spent in commits (µs, every transaction, failed commits included).
    pub commit_micros: u64,
    /// Wall time spent in `on_error` backoff before retries (µs).
    pub backoff_micros: u64,
}

#[derive(Debug, Default)]
struct Stats {
    batches: AtomicU64,
    claims: AtomicU64,
    commits: AtomicU64,
    retries: AtomicU64,
    maybe_committed: AtomicU64,
    recovered: AtomicU64,
    failures: AtomicU64,
    read_micros: AtomicU64,
    plan_micros: AtomicU64,
    commit_micros: AtomicU64,
    backoff_micros: AtomicU64,
}

impl Stats {
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    fn add_since(counter: &AtomicU64, start: Instant) {
        let micros = u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX);
        counter.fetch_add(micros, Ordering::Relaxed);
    }

    fn snapshot(&self) -> EngineStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        EngineStats {
            batches: get(&self.batches),
            claims: get(&self.claims),
            commits: get(&self.commits),
            retries: get(&self.retries),
            maybe_committed: get(&self.maybe_committed),
            recovered: get(&self.recovered),
            failures: get(&self.failures),
            read_micros: get(&self.read_micros),
            plan_micros: get(&self.plan_micros),
            commit_micros: get(&self.commit_micros),
            backoff_micros: get(&self.backoff_micros),
        }
    }
}

/// What every lane shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) keys: Keyspace,
    pub(crate) alerts: AlertPolicy,
    signer: Arc<ReceiptSigner>,
    kid: String,
    proxy_id: String,
    max_batch: usize,
    timeout: Duration,
    retry_limit: u32,
    /// Idempotency window in seconds (see [`FdbConfig::idempotency_window`]).
    idem_window: u64,
    options: TxnOptions,
    stats: Stats,
    /// How opening checks the key space's ledger id.
    id_check: LedgerIdCheck,
    /// The key space's ledger id, once [`KvLedger::check_schema`] read (or wrote) it: put
    /// into every receipt, and checked by every claim batch (a key space cleared or
    /// replaced under a running proxy is refused, never restarted at `seq` 1).
    ledger_id: OnceLock<String>,
}

/// One claim waiting in (or being carried by) a lane.
struct Pending {
    req: ClaimRequest,
    idempotency_key: String,
    deadline: Instant,
    reply: oneshot::Sender<ClaimAnswer>,
    /// Writer ids of this claim's idempotency-record writes in earlier attempts of its
    /// batch, and what each write was.
    wrote: Vec<(String, Wrote)>,
}

/// The ledger engine over any [`KvStore`]. [`crate::FdbLedger`] is this over
/// FoundationDB; with the `memory` feature, [`crate::memory::MemoryStore`] gives the same
/// engine over an in-memory imitation.
pub struct KvLedger<S: KvStore> {
    store: Arc<S>,
    shared: Arc<Shared>,
    lanes: Vec<mpsc::Sender<Pending>>,
}

impl<S: KvStore> std::fmt::Debug for KvLedger<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvLedger")
            .field("store", &self.store)
            .field("keyspace", &self.shared.keys)
            .field("proxy_id", &self.shared.proxy_id)
            .field("lanes", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

impl<S: KvStore> KvLedger<S> {
    /// Starts the engine's lanes on the current Tokio runtime. Does not touch the store;
    /// see [`KvLedger::check_schema`].
    ///
    /// Fails with [`LedgerError::Open`] outside a Tokio runtime.
    pub fn start(store: Arc<S>, config: &FdbConfig) -> Result<Self, LedgerError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|e| LedgerError::Open {
            path: config.keyspace.clone(),
            reason: format!("the ledger needs a Tokio runtime: {e}"),
        })?;
        let shared = Arc::new(Shared {
            keys: Keyspace::new(&config.keyspace),
            alerts: config.alerts.clone(),
            kid: config.signer.key_id().to_owned(),
            signer: Arc::clone(&config.signer),
            proxy_id: config.proxy_id.clone(),
            max_batch: config.batch_size(),
            timeout: config.transaction_timeout,
            retry_limit: config.retry_limit,
            idem_window: config.idempotency_window.as_secs(),
            options: TxnOptions {
                timeout: config.transaction_timeout,
                retry_limit: config.retry_limit,
                max_retry_delay: config.max_retry_delay,
            },
            stats: Stats::default(),
            id_check: config.ledger_id.clone(),
            ledger_id: OnceLock::new(),
        });
        let mut lanes = Vec::with_capacity(config.lane_count());
        for _ in 0..config.lane_count() {
            let (tx, rx) = mpsc::channel(LANE_QUEUE_CAPACITY);
            runtime.spawn(run_lane(Arc::clone(&store), Arc::clone(&shared), rx));
            lanes.push(tx);
        }
        Ok(Self {
            store,
            shared,
            lanes,
        })
    }

    /// The store under the engine.
    pub fn store(&self) -> &Arc<S> {
        &self.store
    }

    /// The key space.
    pub fn keyspace(&self) -> &Keyspace {
        &self.shared.keys
    }

    /// What the engine did so far.
    pub fn stats(&self) -> EngineStats {
        self.shared.stats.snapshot()
    }

    /// Starts the engine ([`KvLedger::start`]) and opens the key space
    /// ([`KvLedger::check_schema`]): what [`crate::FdbLedger::open`] does over FoundationDB.
    pub async fn open(store: Arc<S>, config: &FdbConfig) -> Result<Self, LedgerError> {
        let ledger = Self::start(store, config)?;
        ledger.check_schema().await?;
        Ok(ledger)
    }

    /// Opens the key space, in one transaction: checks the layout version under `(ks,
    /// "schema")` (writing it on a fresh key space, upgrading an older one it reads),
    /// and reads the ledger id under `(ks, "ledger_id")`, creating it when the key space
    /// has none, as [`FdbConfig::ledger_id`] says. Refuses ([`LedgerError::Open`],
    /// nothing written) a key space of an incompatible layout, or whose id is bound to
    /// another receipt key (or is not the expected one). From then on every receipt
    /// carries the id. Idempotent; a second call that finds another id is refused.
    pub async fn check_schema(&self) -> Result<(), LedgerError> {
        // Once this proxy knows the id, a later check expects exactly it: a key space
        // cleared meanwhile is refused, never given a new id.
        let check = match self.shared.ledger_id.get() {
            Some(known) => LedgerIdCheck::Expect(known.clone()),
            None => self.shared.id_check.clone(),
        };
        let mut work = SchemaWork {
            keys: &self.shared.keys,
            check: &check,
            kid: &self.shared.kid,
            new_id: till_ledger::new_ledger_id(&self.shared.kid),
        };
        let open_error = |reason: String| LedgerError::Open {
            path: format!(
                "key space {}",
                String::from_utf8_lossy(self.shared.keys.prefix())
            ),
            reason,
        };
        let id = self
            .transact(&mut work)
            .await
            .map_err(unavailable)?
            .map_err(open_error)?;
        let known = self.shared.ledger_id.get_or_init(|| id.clone());
        if *known != id {
            return Err(open_error(format!(
                "the key space's ledger id is now {id}, it was {known} when this proxy \
                 opened it (cleared or replaced meanwhile): refusing it"
            )));
        }
        Ok(())
    }

    /// The key space's ledger id (`<32 hex>@<receipt key id>`), known once
    /// [`KvLedger::check_schema`] succeeded; `None` before (receipts then carry none).
    pub fn ledger_id(&self) -> Option<&str> {
        self.shared.ledger_id.get().map(String::as_str)
    }

    /// The receipt signer (it also signs retention checkpoints).
    pub(crate) fn signer(&self) -> Arc<ReceiptSigner> {
        Arc::clone(&self.shared.signer)
    }

    /// Runs `work` in one transaction with retries, bounded by the configured timeout.
    pub(crate) async fn transact<W: Work<S::Txn>>(
        &self,
        work: &mut W,
    ) -> Result<W::Output, KvError> {
        let deadline = Instant::now() + self.shared.timeout;
        transact(self.store.as_ref(), &self.shared, deadline, work).await
    }

    fn lane_of(&self, family: &[u8]) -> usize {
        let mut h = DefaultHasher::new();
        family.hash(&mut h);
        // `lanes.len() >= 1`; the remainder fits in usize.
        usize::try_from(h.finish() % self.lanes.len() as u64).unwrap_or(0)
    }
}

impl<S: KvStore> Ledger for KvLedger<S> {
    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, ClaimAnswer> {
        Box::pin(async move {
            plan::validate(&req)?;
            // Generated once, before the transaction: every retry reuses it, which is what
            // lets a retry recognise its own earlier commit.
            let idempotency_key = plan::resolve_idempotency_key(&req);
            let lane = self.lane_of(&req.levels[0].revocation_id);
            let deadline = Instant::now() + self.shared.timeout;
            let (reply, answer) = oneshot::channel();
            let pending = Pending {
                req,
                idempotency_key,
                deadline,
                reply,
                wrote: Vec::new(),
            };
            self.lanes[lane].try_send(pending).map_err(|e| match e {
                mpsc::error::TrySendError::Full(_) => {
                    LedgerError::Unavailable("ledger busy".into())
                }
                mpsc::error::TrySendError::Closed(_) => {
                    LedgerError::Unavailable("ledger lane stopped".into())
                }
            })?;
            match tokio::time::timeout_at(deadline + ANSWER_GRACE, answer).await {
                Ok(Ok(answer)) => answer,
                Ok(Err(_)) => Err(LedgerError::Unavailable("ledger lane stopped".into())),
                // Dropping `answer` marks the claim abandoned: if its batch has not started,
                // it is skipped and writes nothing.
                Err(_) => Err(LedgerError::Unavailable("timed out".into())),
            }
        })
    }

    fn void(&self, req: VoidRequest) -> BoxFuture<'_, Result<Voided, LedgerError>> {
        Box::pin(async move {
            if req.family.is_empty() || req.seq == 0 {
                return Err(LedgerError::InvalidRequest(
                    "a void names a family and a seq >= 1".into(),
                ));
            }
            let mut work = VoidWork {
                shared: &self.shared,
                req,
                last: None,
                maybe_committed: false,
            };
            self.transact(&mut work).await.map_err(unavailable)?
        })
    }

    fn revoke(&self, revocation_id: &[u8]) -> BoxFuture<'_, Result<Revoked, LedgerError>> {
        let revocation_id = revocation_id.to_vec();
        Box::pin(async move {
            if revocation_id.is_empty() {
                return Err(LedgerError::InvalidRequest("empty revocation id".into()));
            }
            let mut work = admin::RevokeWork::new(&self.shared, revocation_id, unix_now());
            self.transact(&mut work).await.map_err(unavailable)
        })
    }

    fn record_key(&self, key: KeyBlocks, at: u64) -> BoxFuture<'_, Result<(), LedgerError>> {
        Box::pin(async move {
            if key.blocks.is_empty() || key.blocks.iter().any(|(id, _)| id.is_empty()) {
                return Err(LedgerError::InvalidRequest(
                    "a key needs at least one block with a revocation id".into(),
                ));
            }
            let mut work = admin::RecordWork {
                keys: &self.shared.keys,
                key,
                at,
            };
            self.transact(&mut work).await.map_err(unavailable)
        })
    }

    fn families(&self, now: u64) -> BoxFuture<'_, Result<Vec<FamilyView>, LedgerError>> {
        Box::pin(async move {
            let mut work = admin::FamiliesWork {
                keys: &self.shared.keys,
                now,
            };
            self.transact(&mut work).await.map_err(unavailable)
        })
    }

    fn family(
        &self,
        family: &[u8],
        now: u64,
    ) -> BoxFuture<'_, Result<Option<FamilyDetail>, LedgerError>> {
        let family = family.to_vec();
        Box::pin(async move {
            let mut work = admin::FamilyWork {
                keys: &self.shared.keys,
                family,
                now,
            };
            self.transact(&mut work).await.map_err(unavailable)
        })
    }

    fn alerts(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        Box::pin(async move {
            let mut work = admin::AlertsWork {
                keys: &self.shared.keys,
                limit,
            };
            self.transact(&mut work).await.map_err(unavailable)
        })
    }

    fn lease_alerts(
        &self,
        now: u64,
        lease_secs: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let mut work = admin::LeaseWork::new(&self.shared.keys, now, lease_secs, limit);
            self.transact(&mut work).await.map_err(unavailable)
        })
    }

    fn settle_alert(
        &self,
        id: &str,
        outcome: AlertOutcome,
    ) -> BoxFuture<'_, Result<(), LedgerError>> {
        let id = id.to_owned();
        Box::pin(async move {
            let mut work = admin::SettleWork {
                keys: &self.shared.keys,
                id,
                outcome,
            };
            self.transact(&mut work).await.map_err(unavailable)?
        })
    }

    fn checkpoints(
        &self,
        family: &[u8],
    ) -> BoxFuture<'_, Result<Vec<till_ledger::retention::Checkpoint>, LedgerError>> {
        let family = family.to_vec();
        Box::pin(async move { self.family_checkpoints(&family).await })
    }

    fn usage(&self, levels: &[Level]) -> BoxFuture<'_, Result<Vec<LevelUsage>, LedgerError>> {
        let ids: Vec<Vec<u8>> = levels.iter().map(|l| l.revocation_id.clone()).collect();
        Box::pin(async move {
            let mut work = UsageWork {
                keys: &self.shared.keys,
                ids,
            };
            self.transact(&mut work).await.map_err(unavailable)?
        })
    }

    fn receipts(
        &self,
        family: &[u8],
        from_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Receipt>, LedgerError>> {
        let family = family.to_vec();
        Box::pin(async move {
            if limit == 0 {
                return Ok(Vec::new());
            }
            let (begin, end) = self.shared.keys.receipts_from(&family, from_seq.max(1));
            let mut work = RangeWork { begin, end, limit };
            let pairs = self.transact(&mut work).await.map_err(unavailable)?;
            pairs
                .into_iter()
                .map(|(_, value)| {
                    let text = std::str::from_utf8(&value).map_err(|e| {
                        LedgerError::Corrupt(format!("stored receipt is not UTF-8: {e}"))
                    })?;
                    Receipt::parse(text).map_err(|e| {
                        LedgerError::Corrupt(format!("stored receipt is unreadable: {e}"))
                    })
                })
                .collect()
        })
    }
}

pub(crate) fn unavailable(e: KvError) -> LedgerError {
    match e {
        KvError::Decode(msg) => LedgerError::Corrupt(msg),
        other => LedgerError::Unavailable(other.to_string()),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// ---------------------------------------------------------------------------------------
// The retry loop

/// One transaction's work, run again from scratch on every attempt.
pub(crate) trait Work<T: KvTxn>: Send {
    type Output: Send;
    /// Reads and buffers writes; returns the output and whether anything was written
    /// (read-only attempts are not committed).
    fn attempt<'a>(
        &'a mut self,
        txn: &'a mut T,
    ) -> impl Future<Output = Result<(Self::Output, bool), KvError>> + Send + 'a;
    /// The last commit failed with a `maybe_committed` error.
    fn maybe_committed(&mut self) {}
}

/// FoundationDB's retry loop, bounded by `deadline` and `retry_limit` whatever the store
/// does (the real client enforces the same limits through transaction options).
async fn transact<S: KvStore, W: Work<S::Txn>>(
    store: &S,
    shared: &Shared,
    deadline: Instant,
    work: &mut W,
) -> Result<W::Output, KvError> {
    let stats = &shared.stats;
    let timed_out = || KvError::TimedOut(shared.timeout);
    let result = async {
        let mut txn = store.begin(&shared.options)?;
        let mut retries = 0u32;
        loop {
            let error = match tokio::time::timeout_at(deadline, work.attempt(&mut txn)).await {
                Err(_) => return Err(timed_out()),
                Ok(Err(e)) => e,
                Ok(Ok((output, false))) => return Ok(output),
                Ok(Ok((output, true))) => {
                    let started = Instant::now();
                    let committed = tokio::time::timeout_at(deadline, txn.commit()).await;
                    Stats::add_since(&stats.commit_micros, started);
                    match committed {
                        // The commit may or may not land; the caller hears "unavailable".
                        Err(_) => return Err(timed_out()),
                        Ok(Ok(())) => {
                            Stats::add(&stats.commits, 1);
                            return Ok(output);
                        }
                        Ok(Err((back, e))) => {
                            txn = back;
                            if e.is_maybe_committed() {
                                Stats::add(&stats.maybe_committed, 1);
                                work.maybe_committed();
                            }
                            e
                        }
                    }
                }
            };
            if !error.is_retryable() {
                return Err(error);
            }
            if retries >= shared.retry_limit {
                return Err(KvError::RetryLimit {
                    retries,
                    last: Box::new(error),
                });
            }
            retries += 1;
            Stats::add(&stats.retries, 1);
            tracing::debug!(code = ?error.code(), retries, "ledger transaction retry");
            let started = Instant::now();
            let reset = tokio::time::timeout_at(deadline, txn.on_error(error)).await;
            Stats::add_since(&stats.backoff_micros, started);
            txn = match reset {
                Err(_) => return Err(timed_out()),
                Ok(result) => result?,
            };
        }
    }
    .await;
    if let Err(e) = &result {
        Stats::add(&stats.failures, 1);
        tracing::warn!(error = %e, "ledger transaction failed");
    }
    result
}

// ---------------------------------------------------------------------------------------
// Lanes and claim batches

async fn run_lane<S: KvStore>(
    store: Arc<S>,
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<Pending>,
) {
    while let Some(first) = queue.recv().await {
        let mut batch = vec![first];
        drain(&mut queue, &mut batch, shared.max_batch);
        // A caller that stopped waiting before its batch started: skip it, write nothing.
        batch.retain(|p| !p.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let deadline = batch
            .iter()
            .map(|p| p.deadline)
            .min()
            .unwrap_or_else(Instant::now);
        Stats::add(&shared.stats.batches, 1);
        Stats::add(&shared.stats.claims, batch.len() as u64);
        let mut work = ClaimBatch {
            shared: &shared,
            batch: &mut batch,
            recovered: 0,
        };
        let answers = match transact(store.as_ref(), &shared, deadline, &mut work).await {
            Ok(answers) => {
                Stats::add(&shared.stats.recovered, work.recovered);
                answers
            }
            Err(e) => {
                let msg = e.to_string();
                (0..batch.len())
                    .map(|_| Err(LedgerError::Unavailable(msg.clone())))
                    .collect()
            }
        };
        for (pending, answer) in batch.into_iter().zip(answers) {
            // A caller that gave up meanwhile is fine: the slot may be spent, but nothing
            // is forwarded (spec/ledger.md, "What a timeout means").
            let _ = pending.reply.send(answer);
        }
    }
}

/// Moves queued claims into `batch` until it holds `max` or the queue is empty.
fn drain(queue: &mut mpsc::Receiver<Pending>, batch: &mut Vec<Pending>, max: usize) {
    while batch.len() < max {
        match queue.try_recv() {
            Ok(p) => batch.push(p),
            Err(_) => break,
        }
    }
}

/// A batch of claims as one transaction's work.
struct ClaimBatch<'b> {
    shared: &'b Shared,
    batch: &'b mut Vec<Pending>,
    /// Claims of the last attempt answered from their own earlier commit.
    recovered: u64,
}

/// The values one attempt read, overlaid with the attempt's own writes.
#[derive(Default)]
struct Overlay {
    values: HashMap<Vec<u8>, Option<Vec<u8>>>,
    writes: BTreeMap<Vec<u8>, Vec<u8>>,
    /// Ranges cleared, applied before `writes` (see [`Overlay::clear_range`]).
    clears: Vec<(Vec<u8>, Vec<u8>)>,
}

impl Overlay {
    fn get(&self, key: &[u8]) -> Option<&[u8]> {
        self.values.get(key).and_then(|v| v.as_deref())
    }

    fn set(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.values.insert(key.clone(), Some(value.clone()));
        self.writes.insert(key, value);
    }

    /// A write nobody in the batch reads back.
    fn set_blind(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, value);
    }

    /// Clears `[begin, end)`: earlier buffered writes in the range are dropped and read
    /// values in it become absent, so applying every clear before every set is the same
    /// as applying the batch's operations in order.
    fn clear_range(&mut self, begin: Vec<u8>, end: Vec<u8>) {
        if begin >= end {
            return;
        }
        let doomed: Vec<Vec<u8>> = self
            .writes
            .range(begin.clone()..end.clone())
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.writes.remove(&k);
        }
        for (k, v) in self.values.iter_mut() {
            if begin <= *k && *k < end {
                *v = None;
            }
        }
        self.clears.push((begin, end));
    }

    fn wrote(&self) -> bool {
        !self.writes.is_empty() || !self.clears.is_empty()
    }
}

impl<T: KvTxn> Work<T> for ClaimBatch<'_> {
    type Output = Vec<ClaimAnswer>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        let stats = &self.shared.stats;
        let started = Instant::now();
        let keys = &self.shared.keys;
        let mut wanted = BTreeSet::new();
        for p in self.batch.iter() {
            let scope = plan::idempotency_scope(&p.req);
            wanted.insert(keys.idempotency(scope, &p.idempotency_key));
            let family = p.req.levels[0].revocation_id.as_slice();
            wanted.insert(keys.head(family));
            // The family's void count (the head is at `count + 2 × voids`); a void writes
            // it, so a claim and a void of one family conflict like two claims.
            wanted.insert(keys.void_count(family));
            // The family's current-minute activity (per family: adds no cross-family
            // conflict; every claim of the family already reads and writes its head).
            wanted.insert(keys.activity(family, p.req.now / 60));
            for level in &p.req.levels {
                wanted.insert(keys.count(&level.revocation_id));
                wanted.insert(keys.revoked(&level.revocation_id));
            }
            // Windowed caps: read (serializably) and written with the counters, so two
            // proxies racing on one window conflict like on a counter.
            for w in &p.req.windows {
                if let Some(level) = p.req.levels.get(w.level) {
                    wanted.insert(keys.window(&level.revocation_id, w.secs));
                }
            }
            if p.req.meta.is_some() {
                // Written once, the first time a committing claim presents the block.
                wanted.insert(keys.family(family));
                for level in &p.req.levels {
                    wanted.insert(keys.block(&level.revocation_id));
                }
            }
        }
        // The key space's ledger id (never written after it is created: reading it
        // conflicts with nothing), so a key space cleared or replaced under a running
        // proxy is refused rather than restarted at seq 1.
        let ledger_id = self.shared.ledger_id.get();
        if ledger_id.is_some() {
            wanted.insert(keys.ledger_id());
        }
        let wanted: Vec<Vec<u8>> = wanted.into_iter().collect();
        // Serializable reads, all in flight at once: one round trip for the batch.
        let read = try_join_all(wanted.iter().map(|k| txn.get(k))).await?;
        let mut overlay = Overlay {
            values: wanted.into_iter().zip(read).collect(),
            ..Overlay::default()
        };
        if let Some(id) = ledger_id {
            let stored = overlay.get(&keys.ledger_id());
            if stored != Some(id.as_bytes()) {
                let now = stored.map_or_else(
                    || "gone".to_owned(),
                    |b| String::from_utf8_lossy(b).into_owned(),
                );
                tracing::error!(opened = %id, now = %now, "ledger: the key space's ledger id changed");
                let answer = || {
                    Err(LedgerError::Corrupt(format!(
                        "the key space's ledger id is {now}, this proxy opened {id}: it was \
                         cleared or replaced; refusing to claim in it"
                    )))
                };
                return Ok((self.batch.iter().map(|_| answer()).collect(), false));
            }
        }
        // Replays (and retries after an unknown result) read the original receipt by
        // the record's pointer: a second round trip, only for batches that found a record.
        let mut pointed: BTreeSet<Vec<u8>> = self
            .batch
            .iter()
            .filter_map(|p| {
                let scope = plan::idempotency_scope(&p.req);
                let bytes = overlay.get(&keys.idempotency(scope, &p.idempotency_key))?;
                let record = keys::IdemRecord::decode(bytes).ok()?;
                if record.expired(p.req.now, self.shared.idem_window) {
                    return None;
                }
                match record.receipt {
                    keys::ReceiptRef::At { family, seq } => Some(keys.receipt(&family, seq)),
                    keys::ReceiptRef::Inline(_) => None,
                }
            })
            .collect();
        // A chain head written before schema 3 names its receipt by a hash that may be the
        // compact string's (receipts v1): the receipt at its seq is read in the same round
        // trip, and `read_state` recomputes the link from it (lazy, transactional
        // migration; the commit writes the head back marked).
        for p in self.batch.iter() {
            let family = p.req.levels[0].revocation_id.as_slice();
            if let Some(head) = overlay.get(&keys.head(family)) {
                if let Ok(head) = keys::decode_head(head) {
                    if !head.linked {
                        pointed.insert(keys.receipt(family, head.seq));
                    }
                }
            }
        }
        if !pointed.is_empty() {
            let read = try_join_all(pointed.iter().map(|k| txn.get(k))).await?;
            overlay.values.extend(pointed.into_iter().zip(read));
        }
        Stats::add_since(&stats.read_micros, started);
        let started = Instant::now();
        let mut journal: Vec<Vec<u8>> = Vec::new();
        let mut answers = Vec::with_capacity(self.batch.len());
        self.recovered = 0;
        for p in self.batch.iter_mut() {
            let (mut answer, recovered, alerts) =
                apply_claim(self.shared, &mut overlay, &mut journal, p);
            self.recovered += u64::from(recovered);
            if !alerts.is_empty() {
                let fired = insert_alerts(&self.shared.keys, &*txn, &mut overlay, alerts).await?;
                // Remembered with the write id: if this attempt's commit result is
                // unknown but it landed, the retry answers with exactly these alerts.
                if let Some((_, Wrote::Commit(remembered))) = p.wrote.last_mut() {
                    remembered.clone_from(&fired);
                }
                if let Ok(Ok(claim)) = &mut answer {
                    claim.alerts = fired;
                }
            }
            answers.push(answer);
        }
        let wrote = overlay.wrote();
        for (begin, end) in &overlay.clears {
            txn.clear_range(begin, end);
        }
        for (key, value) in &overlay.writes {
            txn.set(key, value);
        }
        for (i, pointer) in journal.iter().enumerate() {
            // `max_batch <= MAX_BATCH_LIMIT < u16::MAX`: one user version per receipt.
            let user_version = u16::try_from(i).unwrap_or(u16::MAX);
            txn.set_versionstamped_key(&keys.journal_incomplete(user_version), pointer);
        }
        Stats::add_since(&stats.plan_micros, started);
        Ok((answers, wrote))
    }
}

/// Writes each alert (and its outbox entry) unless an alert with its id exists, in the
/// store or earlier in this batch; returns those written. Alerts are rare (a threshold
/// fires once per block), so the extra read round trip is paid only when one fires.
async fn insert_alerts<T: KvTxn>(
    keys: &Keyspace,
    txn: &T,
    overlay: &mut Overlay,
    alerts: Vec<AlertRecord>,
) -> Result<Vec<AlertRecord>, KvError> {
    let unknown: Vec<Vec<u8>> = alerts
        .iter()
        .map(|a| keys.alert(&a.id))
        .filter(|k| !overlay.values.contains_key(k))
        .collect();
    let read = try_join_all(unknown.iter().map(|k| txn.get(k))).await?;
    overlay.values.extend(unknown.into_iter().zip(read));
    let mut fired = Vec::with_capacity(alerts.len());
    for alert in alerts {
        let key = keys.alert(&alert.id);
        if overlay.get(&key).is_some() {
            continue;
        }
        overlay.set(key, alert.to_bytes());
        overlay.set_blind(keys.outbox(&alert.id), keys::encode_u64(alert.at).to_vec());
        fired.push(alert);
    }
    Ok(fired)
}

/// What a claim wrote in an attempt whose commit may have landed.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wrote {
    /// The original claim (counters, receipt, record, activity, blocks), with the alerts
    /// it fired.
    Commit(Vec<AlertRecord>),
    /// A replay (the record's replay counter).
    Replay,
}

/// Most writer ids kept per record (more than `1 + MAX_REPLAYS` writes never happen).
const MAX_WRITERS: usize = 16;

fn writer_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Reads one claim's state from the overlay, plans it and carries the plan out into the
/// overlay. Returns the answer, whether it was recovered from an earlier attempt, and the
/// alerts the plan fires (for [`insert_alerts`]; not yet in the answer).
fn apply_claim(
    shared: &Shared,
    overlay: &mut Overlay,
    journal: &mut Vec<Vec<u8>>,
    p: &mut Pending,
) -> (ClaimAnswer, bool, Vec<AlertRecord>) {
    let (answer, recovered) = match plan_and_apply(shared, overlay, journal, p) {
        Ok(done) => done,
        Err(e) => return (Err(e), false, Vec::new()),
    };
    match answer {
        Applied::Answer(a) => (a, recovered, Vec::new()),
        Applied::Committed(claim, alerts) => (Ok(Ok(claim)), recovered, alerts),
    }
}

enum Applied {
    Answer(ClaimAnswer),
    /// A fresh commit and the alerts its plan fires.
    Committed(Claim, Vec<AlertRecord>),
}

fn plan_and_apply(
    shared: &Shared,
    overlay: &mut Overlay,
    journal: &mut Vec<Vec<u8>>,
    p: &mut Pending,
) -> Result<(Applied, bool), LedgerError> {
    let keys = &shared.keys;
    let req = &p.req;
    let family = req.levels[0].revocation_id.as_slice();
    let scope = plan::idempotency_scope(req);
    let idem_key = keys.idempotency(scope, &p.idempotency_key);
    let (state, record) = read_state(keys, overlay, req, &idem_key, shared.idem_window)?;

    // An earlier attempt of this very claim committed after all (its commit result was
    // unknown): answer as that attempt did, write and charge nothing more. (A record this
    // claim wrote is never expired for it: the record's time is this claim's `now`, or a
    // time within the window of it when the write was a replay.)
    if let (Some(stored), Some(record)) = (&state.idempotency, &record) {
        if let Some((_, wrote)) = p.wrote.iter().find(|(id, _)| record.writers.contains(id)) {
            let receipt = Receipt::parse(&stored.receipt)
                .map_err(|e| LedgerError::Corrupt(format!("stored receipt is unreadable: {e}")))?;
            let claim = match wrote {
                Wrote::Commit(alerts) => Claim {
                    remaining: remaining_of(&receipt),
                    receipt,
                    replayed: false,
                    alerts: alerts.clone(),
                },
                Wrote::Replay => Claim {
                    receipt,
                    replayed: true,
                    remaining: plan::remaining(&req.levels, &state.counts),
                    alerts: Vec::new(),
                },
            };
            return Ok((Applied::Answer(Ok(Ok(claim))), true));
        }
    }

    let ctx = ClaimContext {
        proxy_id: &shared.proxy_id,
        kid: &shared.kid,
        idempotency_key: &p.idempotency_key,
        alerts: &shared.alerts,
    };
    let stored_windows = read_windows(keys, overlay, req)?;
    let (plan, window_writes) = plan::plan_claim_windowed(req, &state, &stored_windows, &ctx)?;
    match plan {
        Plan::Refuse(refusal) => Ok((Applied::Answer(Ok(Err(refusal))), false)),
        Plan::Replay {
            receipt,
            record: replayed,
            remaining,
        } => {
            let receipt = Receipt::parse(&receipt).map_err(|e| {
                LedgerError::Corrupt(format!("stored idempotent receipt is unreadable: {e}"))
            })?;
            // Remembered before the commit, so a retry after an unknown result
            // recognises this write.
            let id = writer_id();
            p.wrote.push((id.clone(), Wrote::Replay));
            // A replay plan comes from a stored record.
            let mut record = record.ok_or_else(|| {
                LedgerError::Corrupt("replay planned without an idempotency record".into())
            })?;
            record.replays = replayed.replays;
            record.writers.push(id);
            let excess = record.writers.len().saturating_sub(MAX_WRITERS);
            record.writers.drain(..excess);
            overlay.set(idem_key, record.encode());
            let claim = Claim {
                receipt,
                replayed: true,
                remaining,
                alerts: Vec::new(),
            };
            Ok((Applied::Answer(Ok(Ok(claim))), false))
        }
        Plan::Commit {
            new_counts,
            mut body,
            remaining,
            minute_count,
            alerts,
        } => {
            body.ledger = shared.ledger_id.get().cloned();
            let receipt = shared.signer.sign(&body).map_err(|e| {
                tracing::error!(error = %e, "ledger: receipt signing failed");
                LedgerError::Signing(e.to_string())
            })?;
            let id = writer_id();
            p.wrote.push((id.clone(), Wrote::Commit(Vec::new())));
            for (level, &count) in req.levels.iter().zip(&new_counts) {
                overlay.set(
                    keys.count(&level.revocation_id),
                    keys::encode_u64(count).to_vec(),
                );
                overlay.set_blind(
                    keys.slot(&level.revocation_id, count),
                    keys::encode_receipt_ref(family, body.seq),
                );
            }
            // The only copy of the receipt; readable in the overlay, so a duplicate of
            // this claim later in the batch replays it by pointer.
            overlay.set(
                keys.receipt(family, body.seq),
                receipt.compact().as_bytes().to_vec(),
            );
            overlay.set(
                keys.head(family),
                keys::encode_head(body.seq, &receipt.hash_hex()),
            );
            let record = keys::IdemRecord {
                request: plan::request_fingerprint(&req.request),
                receipt: keys::ReceiptRef::At {
                    family: family.to_vec(),
                    seq: body.seq,
                },
                replays: 0,
                at: Some(req.now),
                writers: vec![id],
            };
            overlay.set(idem_key, record.encode());
            journal.push(keys::encode_receipt_ref(family, body.seq));
            for (w, count) in req.windows.iter().zip(&window_writes) {
                if let Some(level) = req.levels.get(w.level) {
                    overlay.set(
                        keys.window(&level.revocation_id, w.secs),
                        count.to_bytes().to_vec(),
                    );
                }
            }
            record_activity(keys, overlay, family, req.now / 60, minute_count);
            if let Some(meta) = &req.meta {
                let key = KeyBlocks {
                    blocks: req
                        .levels
                        .iter()
                        .map(|l| l.revocation_id.clone())
                        .zip(meta.iter().cloned())
                        .collect(),
                };
                record_blocks(keys, overlay, &key, req.now);
            }
            let claim = Claim {
                receipt,
                replayed: false,
                remaining,
                alerts: Vec::new(),
            };
            Ok((Applied::Committed(claim, alerts), false))
        }
    }
}

/// The stored counter of each of the request's windows (read in the claim's first round
/// trip; a claim earlier in the batch may have updated it in the overlay).
fn read_windows(
    keys: &Keyspace,
    overlay: &Overlay,
    req: &ClaimRequest,
) -> Result<Vec<Option<plan::WindowCount>>, LedgerError> {
    req.windows
        .iter()
        .map(|w| {
            let level = req.levels.get(w.level).ok_or_else(|| {
                LedgerError::InvalidRequest(format!("window names level {}", w.level))
            })?;
            overlay
                .get(&keys.window(&level.revocation_id, w.secs))
                .map(plan::WindowCount::from_bytes)
                .transpose()
        })
        .collect()
}

/// Counts one activation in the family's minute; on the first of a new minute, clears
/// the buckets older than [`ACTIVITY_MINUTES`] (a blind range clear: no read conflict).
fn record_activity(keys: &Keyspace, overlay: &mut Overlay, family: &[u8], minute: u64, count: u64) {
    overlay.set(
        keys.activity(family, minute),
        keys::encode_u64(count).to_vec(),
    );
    if count == 1 {
        let cutoff = minute.saturating_sub(ACTIVITY_MINUTES);
        let (begin, end) = keys.activity_range(family, 0, cutoff);
        overlay.clear_range(begin, end);
    }
}

/// Records every block of a claim's key not yet known, and its family (claims never mark
/// a block minted; see [`crate::admin::RecordWork`] for the admin API's records).
fn record_blocks(keys: &Keyspace, overlay: &mut Overlay, key: &KeyBlocks, at: u64) {
    let Some((family, _)) = key.blocks.first() else {
        return;
    };
    for (record, (id, _)) in key.records(at, false).into_iter().zip(&key.blocks) {
        let block_key = keys.block(id);
        if overlay.get(&block_key).is_none() {
            overlay.set(block_key, serde_json::to_vec(&record).unwrap_or_default());
            overlay.set_blind(keys.family_block(family, id), Vec::new());
        }
    }
    let family_key = keys.family(family);
    if overlay.get(&family_key).is_none() {
        overlay.set(family_key, keys::encode_u64(at).to_vec());
    }
}

/// The claim's state as the backend-independent planner wants it, and the raw
/// idempotency record (pointer, writers, time) behind `state.idempotency`. The planner's
/// record carries the receipt itself, read by the record's pointer. A record past its
/// window (`window_secs` before `req.now`) is treated as absent: the claim is a fresh one,
/// and its commit overwrites the record.
fn read_state(
    keys: &Keyspace,
    overlay: &Overlay,
    req: &ClaimRequest,
    idem_key: &[u8],
    window_secs: u64,
) -> Result<(ClaimState, Option<keys::IdemRecord>), LedgerError> {
    let corrupt = |e: KvError| LedgerError::Corrupt(e.to_string());
    let record = overlay
        .get(idem_key)
        .map(keys::IdemRecord::decode)
        .transpose()
        .map_err(corrupt)?
        .filter(|r| !r.expired(req.now, window_secs));
    let idempotency = match &record {
        None => None,
        Some(record) => {
            let receipt = match &record.receipt {
                keys::ReceiptRef::Inline(compact) => compact.clone(),
                keys::ReceiptRef::At { family, seq } => {
                    let bytes = overlay.get(&keys.receipt(family, *seq)).ok_or_else(|| {
                        LedgerError::Corrupt(format!(
                            "idempotency record points at receipt {seq} of family {}, which is missing",
                            hex::encode(family)
                        ))
                    })?;
                    String::from_utf8(bytes.to_vec()).map_err(|e| {
                        LedgerError::Corrupt(format!("stored receipt is not UTF-8: {e}"))
                    })?
                }
            };
            Some(StoredIdempotency {
                request: record.request.clone(),
                receipt,
                replays: record.replays,
            })
        }
    };
    let mut revoked = Vec::with_capacity(req.levels.len());
    let mut counts = Vec::with_capacity(req.levels.len());
    for level in &req.levels {
        revoked.push(overlay.get(&keys.revoked(&level.revocation_id)).is_some());
        counts.push(
            overlay
                .get(&keys.count(&level.revocation_id))
                .map(keys::decode_u64)
                .transpose()
                .map_err(corrupt)?
                .unwrap_or(0),
        );
    }
    let family = req.levels[0].revocation_id.as_slice();
    let chain_head = overlay
        .get(&keys.head(family))
        .map(keys::decode_head)
        .transpose()
        .map_err(corrupt)?
        .map(|head| chain_head_link(keys, overlay, family, head))
        .transpose()?;
    let voids = overlay
        .get(&keys.void_count(family))
        .map(keys::decode_u64)
        .transpose()
        .map_err(corrupt)?
        .unwrap_or(0);
    let minute_count = overlay
        .get(&keys.activity(family, req.now / 60))
        .map(keys::decode_u64)
        .transpose()
        .map_err(corrupt)?
        .unwrap_or(0);
    Ok((
        ClaimState {
            idempotency,
            revoked,
            counts,
            chain_head,
            voids,
            minute_count,
        },
        record,
    ))
}

/// The chain head as the planner wants it, `(seq, link hash)`. A head written before
/// schema 3 (unmarked) gets its link recomputed from the receipt at its seq, read in the
/// same transaction: the next receipt (format 2) must name the signing input's hash, and
/// an unmarked head may hold the compact string's. The stored hash must name that
/// receipt one way or the other, else the key space is corrupt.
fn chain_head_link(
    keys: &Keyspace,
    overlay: &Overlay,
    family: &[u8],
    head: keys::ChainHead,
) -> Result<(u64, String), LedgerError> {
    if head.linked {
        return Ok((head.seq, head.hash));
    }
    let family_hex = || hex::encode(family);
    let bytes = overlay
        .get(&keys.receipt(family, head.seq))
        .ok_or_else(|| {
            LedgerError::Corrupt(format!(
                "chain head of family {} names receipt {}, which is missing",
                family_hex(),
                head.seq
            ))
        })?;
    let receipt = std::str::from_utf8(bytes)
        .map_err(|e| e.to_string())
        .and_then(|text| Receipt::parse(text).map_err(|e| e.to_string()))
        .map_err(|e| {
            LedgerError::Corrupt(format!(
                "receipt {} of family {} (the chain head) is unreadable: {e}",
                head.seq,
                family_hex()
            ))
        })?;
    let link = receipt.hash_hex();
    if head.hash != link && head.hash != hex::encode(receipt.compact_hash()) {
        return Err(LedgerError::Corrupt(format!(
            "chain head of family {} does not name its receipt {}",
            family_hex(),
            head.seq
        )));
    }
    Ok((head.seq, link))
}

/// Activations left under the tightest cap right after `receipt`'s claim.
fn remaining_of(receipt: &Receipt) -> Option<u64> {
    receipt
        .body()
        .slots
        .iter()
        .filter_map(|s| s.cap.map(|cap| cap.saturating_sub(s.slot)))
        .min()
}

// ---------------------------------------------------------------------------------------
// Voids (spec/ledger.md §3.5)

/// One void as one serializable transaction: read the claim, its void marker, its
/// idempotency record, the family's head and void count, every level's counter and the
/// claim's window counters; plan ([`plan::plan_void`]); sign; write counters, windows,
/// the void receipt, head, marker, void count and journal entry, and clear the record.
/// A retry after `commit_unknown_result` finds its own marker and answers with that
/// receipt (`newly` still true): nothing is decremented twice.
struct VoidWork<'s> {
    shared: &'s Shared,
    req: VoidRequest,
    /// The writer id of the last attempt that wrote (see [`keys::encode_voided`]).
    last: Option<String>,
    /// An attempt's commit result was unknown.
    maybe_committed: bool,
}

impl<T: KvTxn> Work<T> for VoidWork<'_> {
    type Output = Result<Voided, LedgerError>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        let keys = &self.shared.keys;
        let family = self.req.family.clone();
        let seq = self.req.seq;
        let corrupt = |e: KvError| LedgerError::Corrupt(e.to_string());
        let t: &T = txn;
        let (((claim, marker), (head, voids)), ledger_id) = futures::future::try_join(
            futures::future::try_join(
                futures::future::try_join(
                    t.get(&keys.receipt(&family, seq)),
                    t.get(&keys.voided(&family, seq)),
                ),
                futures::future::try_join(
                    t.get(&keys.head(&family)),
                    t.get(&keys.void_count(&family)),
                ),
            ),
            t.get(&keys.ledger_id()),
        )
        .await?;
        if let Some(id) = self.shared.ledger_id.get() {
            if ledger_id.as_deref() != Some(id.as_bytes()) {
                return Ok((
                    Err(LedgerError::Corrupt(
                        "the key space's ledger id changed: it was cleared or replaced; \
                         refusing to void in it"
                            .into(),
                    )),
                    false,
                ));
            }
        }
        let parse = |bytes: &[u8], at: u64| {
            std::str::from_utf8(bytes)
                .map_err(|e| e.to_string())
                .and_then(|text| Receipt::parse(text).map_err(|e| e.to_string()))
                .map_err(|e| {
                    LedgerError::Corrupt(format!(
                        "receipt {at} of family {} is unreadable: {e}",
                        hex::encode(&family)
                    ))
                })
        };
        let claim = match claim.as_deref().map(|b| parse(b, seq)).transpose() {
            Ok(c) => c,
            Err(e) => return Ok((Err(e), false)),
        };
        let (voided_by, marker_writer) = match marker.as_deref().map(keys::decode_voided) {
            None => (None, None),
            Some(Ok((at, writer))) => (Some(at), Some(writer)),
            Some(Err(e)) => return Ok((Err(corrupt(e)), false)),
        };
        let voids = match voids.as_deref().map(keys::decode_u64).transpose() {
            Ok(v) => v.unwrap_or(0),
            Err(e) => return Ok((Err(corrupt(e)), false)),
        };
        // Second round trip: the levels' counters, the claim's idempotency record, its
        // window counters, and (for a head from before schema 3) the receipt at the head.
        let mut ids = Vec::new();
        let mut wanted = Vec::new();
        let mut idem_key = None;
        if let Some(receipt) = &claim {
            for slot in &receipt.body().slots {
                let Ok(id) = hex::decode(&slot.revocation_id) else {
                    return Ok((
                        Err(LedgerError::Corrupt(format!(
                            "receipt {seq} names a revocation id that is not hex"
                        ))),
                        false,
                    ));
                };
                wanted.push(keys.count(&id));
                ids.push(id);
            }
            if let Some(scope) = ids.last() {
                let key = keys.idempotency(scope, &receipt.body().idempotency_key);
                wanted.push(key.clone());
                idem_key = Some(key);
            }
            for w in &self.req.windows {
                if let Some(id) = ids.get(w.level) {
                    wanted.push(keys.window(id, w.secs));
                }
            }
        }
        let decoded_head = match head.as_deref().map(keys::decode_head).transpose() {
            Ok(h) => h,
            Err(e) => return Ok((Err(corrupt(e)), false)),
        };
        if let Some(h) = &decoded_head {
            if !h.linked {
                wanted.push(keys.receipt(&family, h.seq));
            }
        }
        let read = try_join_all(wanted.iter().map(|k| t.get(k))).await?;
        let overlay = Overlay {
            values: wanted.into_iter().zip(read).collect(),
            ..Overlay::default()
        };
        let mut counts = Vec::with_capacity(ids.len());
        for id in &ids {
            match overlay
                .get(&keys.count(id))
                .map(keys::decode_u64)
                .transpose()
            {
                Ok(c) => counts.push(c.unwrap_or(0)),
                Err(e) => return Ok((Err(corrupt(e)), false)),
            }
        }
        let replays = match idem_key.as_ref().and_then(|k| overlay.get(k)) {
            None => None,
            Some(bytes) => match keys::IdemRecord::decode(bytes) {
                Ok(r) => match r.receipt {
                    keys::ReceiptRef::At { family: f, seq: s } if f == family && s == seq => {
                        Some(r.replays)
                    }
                    _ => None,
                },
                Err(e) => return Ok((Err(corrupt(e)), false)),
            },
        };
        let chain_head = match decoded_head
            .map(|h| chain_head_link(keys, &overlay, &family, h))
            .transpose()
        {
            Ok(h) => h,
            Err(e) => return Ok((Err(e), false)),
        };
        let state = plan::VoidState {
            claim: claim.as_ref().map(|r| r.body().clone()),
            voided_by,
            replays,
            counts,
            chain_head,
            voids,
        };
        let ctx = ClaimContext {
            proxy_id: &self.shared.proxy_id,
            kid: &self.shared.kid,
            idempotency_key: "",
            alerts: &self.shared.alerts,
        };
        let remaining_now = || {
            state
                .claim
                .iter()
                .flat_map(|c| c.slots.iter().zip(&state.counts))
                .filter_map(|(slot, &count)| slot.cap.map(|cap| cap.saturating_sub(count)))
                .min()
        };
        match plan::plan_void(&self.req, &state, &ctx) {
            Err(e) => Ok((Err(e), false)),
            Ok(plan::VoidPlan::Existing { seq: at }) => {
                let Some(bytes) = t.get(&keys.receipt(&family, at)).await? else {
                    return Ok((
                        Err(LedgerError::Corrupt(format!(
                            "claim {seq} was voided by receipt {at}, which is missing"
                        ))),
                        false,
                    ));
                };
                let receipt = match parse(&bytes, at) {
                    Ok(r) => r,
                    Err(e) => return Ok((Err(e), false)),
                };
                // Our own earlier attempt landed after all (its result was unknown).
                let newly =
                    self.maybe_committed && self.last.is_some() && self.last == marker_writer;
                let remaining = remaining_now();
                Ok((
                    Ok(Voided {
                        receipt,
                        newly,
                        remaining,
                    }),
                    false,
                ))
            }
            Ok(plan::VoidPlan::Commit {
                new_counts,
                mut body,
                voids,
                remaining,
            }) => {
                body.ledger = self.shared.ledger_id.get().cloned();
                let receipt = match self.shared.signer.sign(&body) {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "ledger: void receipt signing failed");
                        return Ok((Err(LedgerError::Signing(e.to_string())), false));
                    }
                };
                let at = body.seq;
                let writer = writer_id();
                self.last = Some(writer.clone());
                for (id, count) in ids.iter().zip(&new_counts) {
                    txn.set(&keys.count(id), &keys::encode_u64(*count));
                }
                let claim_iat = state.claim.as_ref().map_or(0, |c| c.iat);
                for w in &self.req.windows {
                    let Some(id) = ids.get(w.level) else {
                        continue;
                    };
                    let key = keys.window(id, w.secs);
                    let stored = overlay
                        .get(&key)
                        .and_then(|b| plan::WindowCount::from_bytes(b).ok());
                    if let Some(lowered) = plan::void_window(w, claim_iat, stored) {
                        txn.set(&key, &lowered.to_bytes());
                    }
                }
                txn.set(&keys.receipt(&family, at), receipt.compact().as_bytes());
                txn.set(
                    &keys.head(&family),
                    &keys::encode_head(at, &receipt.hash_hex()),
                );
                txn.set(
                    &keys.voided(&family, seq),
                    &keys::encode_voided(at, &writer),
                );
                txn.set(&keys.void_count(&family), &keys::encode_u64(voids));
                // A retry with the same idempotency key claims afresh.
                if let Some(key) = &idem_key {
                    txn.clear(key);
                }
                txn.set_versionstamped_key(
                    &keys.journal_incomplete(0),
                    &keys::encode_receipt_ref(&family, at),
                );
                Ok((
                    Ok(Voided {
                        receipt,
                        newly: true,
                        remaining,
                    }),
                    true,
                ))
            }
        }
    }

    fn maybe_committed(&mut self) {
        self.maybe_committed = true;
    }
}

// ---------------------------------------------------------------------------------------
// Other transactions

struct UsageWork<'k> {
    keys: &'k Keyspace,
    ids: Vec<Vec<u8>>,
}

impl<T: KvTxn> Work<T> for UsageWork<'_> {
    type Output = Result<Vec<LevelUsage>, LedgerError>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        let txn: &T = txn;
        let counts = try_join_all(self.ids.iter().map(|id| {
            let key = self.keys.count(id);
            async move { txn.get(&key).await }
        }));
        let revoked = try_join_all(self.ids.iter().map(|id| {
            let key = self.keys.revoked(id);
            async move { txn.get(&key).await }
        }));
        let (counts, revoked) = futures::future::try_join(counts, revoked).await?;
        let usage = self
            .ids
            .iter()
            .zip(counts.into_iter().zip(revoked))
            .map(|(id, (count, revoked))| {
                Ok(LevelUsage {
                    revocation_id: id.clone(),
                    used: count
                        .as_deref()
                        .map(keys::decode_u64)
                        .transpose()
                        .map_err(|e| LedgerError::Corrupt(e.to_string()))?
                        .unwrap_or(0),
                    revoked: revoked.is_some(),
                })
            })
            .collect();
        Ok((usage, false))
    }
}

struct RangeWork {
    begin: Vec<u8>,
    end: Vec<u8>,
    limit: usize,
}

impl<T: KvTxn> Work<T> for RangeWork {
    type Output = Vec<(Vec<u8>, Vec<u8>)>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        let pairs = txn.get_range(&self.begin, &self.end, self.limit).await?;
        Ok((pairs, false))
    }
}

/// Opening a key space: schema version and ledger id, read (and written when missing)
/// in one serializable transaction, so two proxies opening a fresh key space at once
/// conflict and the later one adopts the id the first wrote. Answers the id, or why the
/// key space is refused (then nothing is written).
struct SchemaWork<'k> {
    keys: &'k Keyspace,
    check: &'k LedgerIdCheck,
    kid: &'k str,
    /// The id to write when the key space has none (made once: every attempt writes the
    /// same one).
    new_id: String,
}

impl<T: KvTxn> Work<T> for SchemaWork<'_> {
    type Output = Result<String, String>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        let schema_key = self.keys.schema();
        let id_key = self.keys.ledger_id();
        let (schema, stored) =
            futures::future::try_join(txn.get(&schema_key), txn.get(&id_key)).await?;
        let found = schema.as_deref().map(keys::decode_schema).transpose()?;
        match found {
            None | Some(keys::SCHEMA_VERSION) => {}
            Some(v) if keys::UPGRADABLE_SCHEMA_VERSIONS.contains(&v) => {}
            Some(other) => {
                return Ok((
                    Err(format!(
                        "ledger schema version {other}, this build reads {}",
                        keys::SCHEMA_VERSION
                    )),
                    false,
                ))
            }
        }
        let stored = stored.as_deref().map(keys::decode_ledger_id).transpose()?;
        let mut wrote = false;
        let id = match (self.check, stored) {
            (LedgerIdCheck::Expect(want), Some(have)) if *want == have => have,
            (LedgerIdCheck::Expect(want), have) => {
                let have = have.unwrap_or_else(|| {
                    "no ledger id (fresh, cleared, or written before ledger ids)".into()
                });
                return Ok((
                    Err(format!(
                        "the key space's ledger is {have}, this proxy expects {want} \
                         (FdbConfig::ledger_id): refusing it; nothing was created"
                    )),
                    false,
                ));
            }
            (LedgerIdCheck::SameReceiptKey, Some(have)) => {
                if keys::ledger_id_kid(&have) != Some(self.kid) {
                    return Ok((
                        Err(format!(
                            "the key space's ledger {have} is bound to another receipt key \
                             than this proxy's ({}): a fleet shares one receipt key per key \
                             space. Check the key space and cluster file; after rotating the \
                             fleet's receipt key, accept this ledger with FdbConfig::ledger_id \
                             = LedgerIdCheck::Expect({have:?})",
                            self.kid
                        )),
                        false,
                    ));
                }
                have
            }
            (LedgerIdCheck::SameReceiptKey, None) => {
                txn.set(&id_key, self.new_id.as_bytes());
                wrote = true;
                self.new_id.clone()
            }
        };
        // Schema 1 records (receipt copies inline) and unmarked chain heads (schemas 1,
        // 2) stay readable; new writes use pointers and marked heads, so the key space is
        // schema 3 from now on. No head is rewritten here: a claim that reads an unmarked
        // head recomputes its link (see `chain_head_link`).
        if found != Some(keys::SCHEMA_VERSION) {
            txn.set(&schema_key, &keys::encode_schema());
            wrote = true;
        }
        Ok((Ok(id), wrote))
    }
}

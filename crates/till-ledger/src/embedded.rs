//! The embedded backend: one redb file, one writer thread, group commit.
//!
//! Every state change (claim, revoke) goes to a dedicated writer thread over a bounded
//! channel. The writer takes the first queued command plus whatever else is already
//! queued (up to `max_batch`), applies them one after another inside ONE write
//! transaction — each planned against the transaction's current state, so two claims of
//! the same hot token in one batch see each other — commits once with
//! `Durability::Immediate` (fsync), and only then answers every caller. A caller never
//! hears "yes" before its claim is on disk.
//!
//! Reads (`usage`, `receipts`) use read transactions on the blocking pool; they never
//! wait for the writer.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{Database, DatabaseError, Durability, ReadableTable, TableDefinition};
use till_receipt::{Receipt, ReceiptSigner};
use tokio::sync::oneshot;

use crate::fault::Faults;
use crate::plan::{self, ClaimContext, ClaimState, Plan, StoredIdempotency};
use crate::{BoxFuture, Claim, ClaimRequest, Ledger, LedgerError, Level, LevelUsage, Refusal};

/// Counter per block: revocation id → activations claimed through it (and descendants).
const COUNTERS: TableDefinition<&[u8], u64> = TableDefinition::new("counters");
/// Revoked blocks: revocation id → Unix time of the (first) revocation.
const REVOKED: TableDefinition<&[u8], u64> = TableDefinition::new("revoked");
/// Receipts: (family id, seq) → compact JWS.
const RECEIPTS: TableDefinition<(&[u8], u64), &str> = TableDefinition::new("receipts");
/// Chain heads: family id → (seq, lower-case hex hash of the receipt at seq).
const CHAIN_HEADS: TableDefinition<&[u8], (u64, &str)> = TableDefinition::new("chain_heads");
/// Idempotency records: (presented token's last revocation id, key) → JSON record.
const IDEMPOTENCY: TableDefinition<(&[u8], &str), &[u8]> = TableDefinition::new("idempotency");
/// Metadata: `schema_version` → [`SCHEMA_VERSION`].
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

/// On-disk layout version; bumped on any incompatible table change.
pub const SCHEMA_VERSION: u64 = 1;

/// Commands waiting for the writer beyond this many are refused with
/// [`LedgerError::Unavailable`] ("ledger busy") rather than queued without bound.
pub const QUEUE_CAPACITY: usize = 8192;

/// Configuration of an [`EmbeddedLedger`].
#[derive(Debug, Clone)]
pub struct EmbeddedConfig {
    /// Signs every receipt (its key id goes into the receipts).
    pub signer: Arc<ReceiptSigner>,
    /// This proxy's id (goes into the receipts).
    pub proxy_id: String,
    /// Most claims applied in one write transaction; `1` turns group commit off. `0` is
    /// treated as `1`.
    pub max_batch: usize,
    /// How long `claim` and `revoke` wait for the writer before answering
    /// [`LedgerError::Unavailable`] (see `spec/ledger.md`, "What a timeout means").
    pub claim_timeout: Duration,
}

impl EmbeddedConfig {
    /// Default batch size (group commit on).
    pub const DEFAULT_MAX_BATCH: usize = 256;
    /// Default claim timeout.
    pub const DEFAULT_CLAIM_TIMEOUT: Duration = Duration::from_secs(2);

    /// A config with the default batch size and timeout.
    pub fn new(signer: Arc<ReceiptSigner>, proxy_id: impl Into<String>) -> Self {
        Self {
            signer,
            proxy_id: proxy_id.into(),
            max_batch: Self::DEFAULT_MAX_BATCH,
            claim_timeout: Self::DEFAULT_CLAIM_TIMEOUT,
        }
    }
}

type ClaimAnswer = Result<Result<Claim, Refusal>, LedgerError>;

enum Command {
    Claim {
        req: ClaimRequest,
        idempotency_key: String,
        reply: oneshot::Sender<ClaimAnswer>,
    },
    Revoke {
        revocation_id: Vec<u8>,
        at: u64,
        reply: oneshot::Sender<Result<(), LedgerError>>,
    },
}

impl Command {
    /// The caller stopped waiting (timed out or went away) before the writer started on
    /// this command: skip it, so it writes nothing.
    fn abandoned(&self) -> bool {
        match self {
            Command::Claim { reply, .. } => reply.is_closed(),
            Command::Revoke { reply, .. } => reply.is_closed(),
        }
    }
}

// One short-lived answer per command; boxing the large variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Answer {
    Claim(ClaimAnswer),
    Revoke(Result<(), LedgerError>),
}

/// The embedded, single-node ledger (redb). See the module docs and `spec/ledger.md`.
pub struct EmbeddedLedger {
    path: PathBuf,
    db: Arc<Database>,
    commands: Option<SyncSender<Command>>,
    writer: Option<JoinHandle<()>>,
    claim_timeout: Duration,
    faults: Arc<Faults>,
}

impl std::fmt::Debug for EmbeddedLedger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedLedger")
            .field("path", &self.path)
            .field("claim_timeout", &self.claim_timeout)
            .finish_non_exhaustive()
    }
}

impl EmbeddedLedger {
    /// Opens (or creates) the ledger file at `path` and starts its writer thread.
    ///
    /// Fails with [`LedgerError::Locked`] when another process (normally a running
    /// `till serve`) has the file open: redb holds an exclusive lock on it.
    pub fn open(path: impl AsRef<Path>, config: EmbeddedConfig) -> Result<Self, LedgerError> {
        let path = path.as_ref().to_path_buf();
        let db = Arc::new(open_database(&path)?);
        let faults = Arc::new(Faults::default());
        let (commands, queue) = mpsc::sync_channel(QUEUE_CAPACITY);
        let writer = Writer {
            db: Arc::clone(&db),
            kid: config.signer.key_id().to_owned(),
            signer: config.signer,
            proxy_id: config.proxy_id,
            max_batch: config.max_batch.max(1),
            faults: Arc::clone(&faults),
        };
        let handle = std::thread::Builder::new()
            .name("till-ledger-writer".into())
            .spawn(move || writer.run(queue))
            .map_err(|e| LedgerError::Open {
                path: path.display().to_string(),
                reason: format!("cannot start writer thread: {e}"),
            })?;
        Ok(Self {
            path,
            db,
            commands: Some(commands),
            writer: Some(handle),
            claim_timeout: config.claim_timeout,
            faults,
        })
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fault injection for tests of the layers above (proxy: "ledger unavailable → 503,
    /// nothing forwarded", "ledger back → recovers", "signing fails → 503").
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn faults(&self) -> crate::fault::FaultInjector {
        crate::fault::FaultInjector::new(Arc::clone(&self.faults))
    }

    fn send(&self, command: Command) -> Result<(), LedgerError> {
        let commands = self
            .commands
            .as_ref()
            .ok_or_else(|| LedgerError::Unavailable("ledger is shutting down".into()))?;
        commands.try_send(command).map_err(|e| match e {
            TrySendError::Full(_) => LedgerError::Unavailable("ledger busy".into()),
            TrySendError::Disconnected(_) => {
                LedgerError::Unavailable("ledger writer stopped".into())
            }
        })
    }

    async fn wait<T>(&self, reply: oneshot::Receiver<T>) -> Result<T, LedgerError> {
        match tokio::time::timeout(self.claim_timeout, reply).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(_)) => Err(LedgerError::Unavailable("ledger writer stopped".into())),
            // Dropping `reply` here marks the command abandoned: if the writer has not
            // started on it yet, it is skipped and writes nothing.
            Err(_) => Err(LedgerError::Unavailable("timed out".into())),
        }
    }

    async fn read<T, F>(&self, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, LedgerError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| LedgerError::Unavailable(format!("read task failed: {e}")))?
    }
}

impl Drop for EmbeddedLedger {
    fn drop(&mut self) {
        // Closing the channel ends the writer after its current batch; release any
        // injected freeze so it can get there, then wait so the file lock is released
        // when `drop` returns (a reopen right after must not see `Locked`).
        self.commands = None;
        self.faults.release();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

impl Ledger for EmbeddedLedger {
    fn claim(&self, req: ClaimRequest) -> BoxFuture<'_, ClaimAnswer> {
        Box::pin(async move {
            plan::validate(&req)?;
            // Generated once, before the transaction: a retried transaction reuses it.
            let idempotency_key = plan::resolve_idempotency_key(&req);
            let (reply, answer) = oneshot::channel();
            self.send(Command::Claim {
                req,
                idempotency_key,
                reply,
            })?;
            self.wait(answer).await?
        })
    }

    fn revoke(&self, revocation_id: &[u8]) -> BoxFuture<'_, Result<(), LedgerError>> {
        let revocation_id = revocation_id.to_vec();
        Box::pin(async move {
            if revocation_id.is_empty() {
                return Err(LedgerError::InvalidRequest("empty revocation id".into()));
            }
            let (reply, answer) = oneshot::channel();
            self.send(Command::Revoke {
                revocation_id,
                at: unix_now(),
                reply,
            })?;
            self.wait(answer).await?
        })
    }

    fn usage(&self, levels: &[Level]) -> BoxFuture<'_, Result<Vec<LevelUsage>, LedgerError>> {
        let ids: Vec<Vec<u8>> = levels.iter().map(|l| l.revocation_id.clone()).collect();
        Box::pin(self.read(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let counters = txn.open_table(COUNTERS).map_err(unavailable)?;
            let revoked = txn.open_table(REVOKED).map_err(unavailable)?;
            ids.into_iter()
                .map(|id| {
                    let used = counters
                        .get(id.as_slice())
                        .map_err(unavailable)?
                        .map_or(0, |v| v.value());
                    let is_revoked = revoked.get(id.as_slice()).map_err(unavailable)?.is_some();
                    Ok(LevelUsage {
                        revocation_id: id,
                        used,
                        revoked: is_revoked,
                    })
                })
                .collect()
        }))
    }

    fn receipts(
        &self,
        family: &[u8],
        from_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Receipt>, LedgerError>> {
        let family = family.to_vec();
        Box::pin(self.read(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(RECEIPTS).map_err(unavailable)?;
            let start = (family.as_slice(), from_seq.max(1));
            let end = (family.as_slice(), u64::MAX);
            let mut out = Vec::new();
            for entry in table.range(start..=end).map_err(unavailable)? {
                if out.len() >= limit {
                    break;
                }
                let (key, value) = entry.map_err(unavailable)?;
                let receipt = Receipt::parse(value.value()).map_err(|e| {
                    LedgerError::Corrupt(format!(
                        "stored receipt {} is unreadable: {e}",
                        key.value().1
                    ))
                })?;
                out.push(receipt);
            }
            Ok(out)
        }))
    }
}

fn open_database(path: &Path) -> Result<Database, LedgerError> {
    let shown = path.display().to_string();
    let open_err = |reason: String| LedgerError::Open {
        path: shown.clone(),
        reason,
    };
    let db = match Database::create(path) {
        Ok(db) => db,
        Err(DatabaseError::DatabaseAlreadyOpen) => {
            return Err(LedgerError::Locked { path: shown });
        }
        Err(e) => return Err(open_err(e.to_string())),
    };
    // Create every table up front so read transactions never meet a missing table, and
    // refuse a file written by an incompatible layout.
    let mut txn = db.begin_write().map_err(|e| open_err(e.to_string()))?;
    txn.set_durability(Durability::Immediate);
    {
        let mut meta = txn.open_table(META).map_err(|e| open_err(e.to_string()))?;
        let stored = meta
            .get("schema_version")
            .map_err(|e| open_err(e.to_string()))?
            .map(|v| v.value());
        match stored {
            None => {
                meta.insert("schema_version", SCHEMA_VERSION)
                    .map_err(|e| open_err(e.to_string()))?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(other) => {
                return Err(open_err(format!(
                    "ledger schema version {other}, this build reads {SCHEMA_VERSION}"
                )))
            }
        }
        txn.open_table(COUNTERS)
            .map_err(|e| open_err(e.to_string()))?;
        txn.open_table(REVOKED)
            .map_err(|e| open_err(e.to_string()))?;
        txn.open_table(RECEIPTS)
            .map_err(|e| open_err(e.to_string()))?;
        txn.open_table(CHAIN_HEADS)
            .map_err(|e| open_err(e.to_string()))?;
        txn.open_table(IDEMPOTENCY)
            .map_err(|e| open_err(e.to_string()))?;
    }
    txn.commit().map_err(|e| open_err(e.to_string()))?;
    Ok(db)
}

fn unavailable(e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Unavailable(e.to_string())
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The writer thread's state.
struct Writer {
    db: Arc<Database>,
    signer: Arc<ReceiptSigner>,
    kid: String,
    proxy_id: String,
    max_batch: usize,
    faults: Arc<Faults>,
}

// redb's error type is large; these private functions run once per batch or claim and
// their `Err` is immediately turned into a message, so boxing it buys nothing.
/// Open tables of the current write transaction.
struct Tables<'txn> {
    counters: redb::Table<'txn, &'static [u8], u64>,
    revoked: redb::Table<'txn, &'static [u8], u64>,
    receipts: redb::Table<'txn, (&'static [u8], u64), &'static str>,
    chain_heads: redb::Table<'txn, &'static [u8], (u64, &'static str)>,
    idempotency: redb::Table<'txn, (&'static [u8], &'static str), &'static [u8]>,
}

impl<'txn> Tables<'txn> {
    #[allow(clippy::result_large_err)] // see above
    fn open(txn: &'txn redb::WriteTransaction) -> Result<Self, redb::Error> {
        Ok(Self {
            counters: txn.open_table(COUNTERS)?,
            revoked: txn.open_table(REVOKED)?,
            receipts: txn.open_table(RECEIPTS)?,
            chain_heads: txn.open_table(CHAIN_HEADS)?,
            idempotency: txn.open_table(IDEMPOTENCY)?,
        })
    }
}

/// One command's outcome inside the batch, before the commit decides its fate.
struct Applied {
    answer: Answer,
    wrote: bool,
}

impl Writer {
    fn run(self, queue: Receiver<Command>) {
        while let Ok(first) = queue.recv() {
            let mut batch = vec![first];
            while batch.len() < self.max_batch {
                match queue.try_recv() {
                    Ok(command) => batch.push(command),
                    Err(_) => break,
                }
            }
            self.faults.wait_until_runnable();
            batch.retain(|command| !command.abandoned());
            if !batch.is_empty() {
                self.process(batch);
            }
        }
    }

    /// Applies a batch in one write transaction, commits once, answers everyone.
    fn process(&self, batch: Vec<Command>) {
        let outcome = self.apply_and_commit(&batch);
        for (command, answer) in batch.into_iter().zip(outcome) {
            // A caller that gave up meanwhile is fine: its claim is spent but nothing is
            // forwarded (spec/ledger.md, "What a timeout means").
            match (command, answer) {
                (Command::Claim { reply, .. }, Answer::Claim(a)) => {
                    let _ = reply.send(a);
                }
                (Command::Revoke { reply, .. }, Answer::Revoke(a)) => {
                    let _ = reply.send(a);
                }
                (Command::Claim { reply, .. }, Answer::Revoke(_)) => {
                    let _ = reply.send(Err(LedgerError::Unavailable("internal mismatch".into())));
                }
                (Command::Revoke { reply, .. }, Answer::Claim(_)) => {
                    let _ = reply.send(Err(LedgerError::Unavailable("internal mismatch".into())));
                }
            }
        }
    }

    /// One answer per command, in order. Any storage failure or a failed commit turns
    /// every answer of the batch into `Unavailable` (the transaction is dropped, i.e.
    /// aborted, so nothing of the batch is written).
    fn apply_and_commit(&self, batch: &[Command]) -> Vec<Answer> {
        let fail_all = |why: String| -> Vec<Answer> {
            batch
                .iter()
                .map(|command| match command {
                    Command::Claim { .. } => {
                        Answer::Claim(Err(LedgerError::Unavailable(why.clone())))
                    }
                    Command::Revoke { .. } => {
                        Answer::Revoke(Err(LedgerError::Unavailable(why.clone())))
                    }
                })
                .collect()
        };
        let mut txn = match self.db.begin_write() {
            Ok(txn) => txn,
            Err(e) => {
                tracing::error!(error = %e, "ledger: cannot begin write transaction");
                return fail_all(format!("cannot begin transaction: {e}"));
            }
        };
        txn.set_durability(Durability::Immediate);
        let applied = match self.apply_all(&txn, batch) {
            Ok(applied) => applied,
            Err(e) => {
                tracing::error!(error = %e, "ledger: storage failure, batch aborted");
                return fail_all(format!("storage failure: {e}"));
            }
        };
        let wrote = applied.iter().any(|a| a.wrote);
        if wrote {
            if self.faults.commit_should_fail() {
                drop(txn);
                return fail_all("injected commit failure".into());
            }
            if let Err(e) = txn.commit() {
                tracing::error!(error = %e, "ledger: commit failed, batch aborted");
                return fail_all(format!("commit failed: {e}"));
            }
        } else if let Err(e) = txn.abort() {
            // Nothing was written; the answers stand. Worth a log line all the same.
            tracing::warn!(error = %e, "ledger: aborting a read-only batch failed");
        }
        applied.into_iter().map(|a| a.answer).collect()
    }

    #[allow(clippy::result_large_err)] // see `Tables`
    fn apply_all(
        &self,
        txn: &redb::WriteTransaction,
        batch: &[Command],
    ) -> Result<Vec<Applied>, redb::Error> {
        let mut tables = Tables::open(txn)?;
        let mut applied = Vec::with_capacity(batch.len());
        for command in batch {
            applied.push(match command {
                Command::Claim {
                    req,
                    idempotency_key,
                    ..
                } => self.apply_claim(&mut tables, req, idempotency_key)?,
                Command::Revoke {
                    revocation_id, at, ..
                } => {
                    let already = tables.revoked.get(revocation_id.as_slice())?.is_some();
                    if !already {
                        tables.revoked.insert(revocation_id.as_slice(), *at)?;
                    }
                    Applied {
                        answer: Answer::Revoke(Ok(())),
                        wrote: !already,
                    }
                }
            });
        }
        Ok(applied)
    }

    /// Reads the claim's state in the transaction, plans, and carries the plan out.
    /// `Err` is a storage failure (the whole batch aborts); decisions and per-claim
    /// errors are in `Applied::answer`.
    #[allow(clippy::result_large_err)] // see `Tables`
    fn apply_claim(
        &self,
        t: &mut Tables<'_>,
        req: &ClaimRequest,
        idempotency_key: &str,
    ) -> Result<Applied, redb::Error> {
        let nothing = |answer: ClaimAnswer| Applied {
            answer: Answer::Claim(answer),
            wrote: false,
        };
        let family = req.levels[0].revocation_id.as_slice();
        let scope = plan::idempotency_scope(req);

        let idempotency = match t.idempotency.get((scope, idempotency_key))? {
            None => None,
            Some(bytes) => match StoredIdempotency::from_bytes(bytes.value()) {
                Ok(record) => Some(record),
                Err(e) => return Ok(nothing(Err(e))),
            },
        };
        let mut revoked = Vec::with_capacity(req.levels.len());
        let mut counts = Vec::with_capacity(req.levels.len());
        for level in &req.levels {
            let id = level.revocation_id.as_slice();
            revoked.push(t.revoked.get(id)?.is_some());
            counts.push(t.counters.get(id)?.map_or(0, |v| v.value()));
        }
        let chain_head = t.chain_heads.get(family)?.map(|v| {
            let (seq, hash) = v.value();
            (seq, hash.to_owned())
        });
        let state = ClaimState {
            idempotency,
            revoked,
            counts,
            chain_head,
        };
        let ctx = ClaimContext {
            proxy_id: &self.proxy_id,
            kid: &self.kid,
            idempotency_key,
        };

        match plan::plan_claim(req, &state, &ctx) {
            Err(e) => Ok(nothing(Err(e))),
            Ok(Plan::Refuse(refusal)) => Ok(nothing(Ok(Err(refusal)))),
            Ok(Plan::Replay {
                receipt,
                record,
                remaining,
            }) => {
                let receipt = match Receipt::parse(&receipt) {
                    Ok(r) => r,
                    Err(e) => {
                        return Ok(nothing(Err(LedgerError::Corrupt(format!(
                            "stored idempotent receipt is unreadable: {e}"
                        )))))
                    }
                };
                t.idempotency
                    .insert((scope, idempotency_key), record.to_bytes().as_slice())?;
                Ok(Applied {
                    answer: Answer::Claim(Ok(Ok(Claim {
                        receipt,
                        replayed: true,
                        remaining,
                    }))),
                    wrote: true,
                })
            }
            Ok(Plan::Commit {
                new_counts,
                body,
                remaining,
            }) => {
                let signed = if self.faults.signing_should_fail() {
                    Err("injected signing failure".to_owned())
                } else {
                    self.signer.sign(&body).map_err(|e| e.to_string())
                };
                let receipt = match signed {
                    Ok(r) => r,
                    Err(e) => {
                        tracing::error!(error = %e, "ledger: receipt signing failed");
                        return Ok(nothing(Err(LedgerError::Signing(e))));
                    }
                };
                let hash = receipt.hash_hex();
                for (level, count) in req.levels.iter().zip(&new_counts) {
                    t.counters.insert(level.revocation_id.as_slice(), *count)?;
                }
                t.receipts.insert((family, body.seq), receipt.compact())?;
                t.chain_heads.insert(family, (body.seq, hash.as_str()))?;
                let record = StoredIdempotency::original(&req.request, receipt.compact());
                t.idempotency
                    .insert((scope, idempotency_key), record.to_bytes().as_slice())?;
                Ok(Applied {
                    answer: Answer::Claim(Ok(Ok(Claim {
                        receipt,
                        replayed: false,
                        remaining,
                    }))),
                    wrote: true,
                })
            }
        }
    }
}

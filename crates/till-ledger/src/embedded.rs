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
//! The writer does not sign: it plans, links each receipt by the hash of its JWS signing
//! input (computable without the key), stores the receipt body once (compact binary,
//! [`crate::stored`]) and commits. The caller signs on its own task after the commit
//! (ed25519 is deterministic, so a stored body always signs to the same receipt) and hands
//! the signature back; the writer stores it with a later batch. A body whose signature
//! was not stored yet (a crash right after the commit) is signed again when read.
//!
//! Reads (`usage`, `receipts`) use read transactions on the blocking pool; they never
//! wait for the writer.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redb::{
    Database, DatabaseError, Durability, ReadableTable, ReadableTableMetadata, TableDefinition,
};
use till_receipt::{PreparedReceipt, Receipt, ReceiptSigner};
use tokio::sync::oneshot;

use crate::alert::{self, AlertOutcome, AlertPolicy, AlertRecord};
use crate::family::{self, Activity, BlockRecord, BlockView, FamilyDetail, FamilyView, KeyBlocks};
use crate::fault::Faults;
use crate::plan::{self, ClaimContext, ClaimState, Plan, StoredIdempotency};
use crate::retention::{self, Checkpoint, ExportReport, PruneRange, Retention};
use crate::stored::{self, IdempotencyRecord, Pointer, StoredReceipt};
use crate::{
    BoxFuture, Claim, ClaimRequest, Ledger, LedgerError, Level, LevelUsage, Refusal, Revoked,
    VoidRequest, Voided,
};

mod retention_store;

/// Counter per block: revocation id → activations claimed through it (and descendants).
const COUNTERS: TableDefinition<&[u8], u64> = TableDefinition::new("counters");
/// Revoked blocks: revocation id → Unix time of the (first) revocation.
const REVOKED: TableDefinition<&[u8], u64> = TableDefinition::new("revoked");
/// Schema 2 receipts: (family id, seq) → compact JWS. Read only to migrate to schema 3.
const RECEIPTS_V2: TableDefinition<(&[u8], u64), &str> = TableDefinition::new("receipts");
/// Receipts, stored once: (family id, seq) → a [`crate::stored`] receipt value.
const RECEIPTS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("receipts_v3");
/// Chain heads: family id → (seq, lower-case hex hash of the receipt at seq).
const CHAIN_HEADS: TableDefinition<&[u8], (u64, &str)> = TableDefinition::new("chain_heads");
/// Idempotency records: (presented token's last revocation id, key) → a pointer to the
/// receipt ([`crate::stored::encode_pointer`]; schema 2's JSON records are still read).
const IDEMPOTENCY: TableDefinition<(&[u8], &str), &[u8]> = TableDefinition::new("idempotency");
/// Blocks seen (first claim or admin mint): revocation id → JSON [`BlockRecord`].
const BLOCKS: TableDefinition<&[u8], &[u8]> = TableDefinition::new("blocks");
/// Index of a family's blocks: (family id, revocation id) → ().
const FAMILY_BLOCKS: TableDefinition<(&[u8], &[u8]), ()> = TableDefinition::new("family_blocks");
/// Families known: family id → Unix time first recorded.
const FAMILIES: TableDefinition<&[u8], u64> = TableDefinition::new("families");
/// Activity: (family id, Unix minute) → activations in that minute.
const ACTIVITY: TableDefinition<(&[u8], u64), u64> = TableDefinition::new("activity");
/// Alerts: alert id → JSON [`AlertRecord`].
const ALERTS: TableDefinition<&str, &[u8]> = TableDefinition::new("alerts");
/// Outbox: alert id → Unix time fired, while its delivery is pending.
const OUTBOX: TableDefinition<&str, u64> = TableDefinition::new("outbox");
/// `(revocation id, window seconds)` → 16 bytes `(start, count)` big-endian: a block's
/// windowed-cap counter (spec/ledger.md §3.4), overwritten when a new window begins.
const WINDOWS: TableDefinition<(&[u8], u64), &[u8]> = TableDefinition::new("windows");
/// Metadata: `schema_version` → [`SCHEMA_VERSION`]; `integrity_failed` → Unix time of a
/// failed integrity check (present until `till ledger repair` clears it).
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Text metadata: `ledger_id` → this ledger's id (see [`LedgerBinding`]).
const META_TEXT: TableDefinition<&str, &str> = TableDefinition::new("meta_text");
/// Checkpoints of pruned receipt ranges: (family id, last pruned seq) → signed
/// [`Checkpoint`] (JSON line). Never pruned.
const CHECKPOINTS: TableDefinition<(&[u8], u64), &str> = TableDefinition::new("checkpoints");
/// Voided claims (spec/ledger.md §3.5): (family id, claim seq) → seq of its void receipt.
const VOIDS: TableDefinition<(&[u8], u64), u64> = TableDefinition::new("voids");
/// Void receipts per family: family id → count (absent: 0). The chain head is at
/// `counter + 2 × voids`.
const VOID_COUNTS: TableDefinition<&[u8], u64> = TableDefinition::new("void_counts");
const INTEGRITY_FAILED: &str = "integrity_failed";
const LEDGER_ID: &str = "ledger_id";

/// On-disk layout version; bumped on any incompatible table change.
///
/// 2: a chain head's hash is the receipt's link hash (SHA-256 of its JWS signing input,
/// receipt format 2) instead of the compact string's; a version-1 file is migrated on
/// open by recomputing every chain head from its stored receipt.
///
/// 3: receipts stored once, as compact binary bodies (table `receipts_v3`), idempotency
/// records point at them; a version-2 file's receipts are moved over as they are
/// (signed) on open.
pub const SCHEMA_VERSION: u64 = 3;

/// redb's page cache (bounded, so the process's memory does not grow with the file).
pub const CACHE_BYTES: usize = 32 * 1024 * 1024;

/// Signatures waiting to be stored beyond this many are dropped (their receipts are
/// signed again when read).
const SIGNATURE_BACKLOG: usize = 16 * 1024;

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
    /// Which alerts claims and revocations fire.
    pub alerts: AlertPolicy,
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
            alerts: AlertPolicy::default(),
        }
    }
}

/// Which ledger a caller expects to open (`spec/ledger.md`, "Ledger id").
///
/// A ledger id is `<32 lower-case hex digits>@<receipt key id>`: random, written once when
/// the ledger is created (or first bound), and put into every receipt it signs. The data
/// dir remembers it, so an emptied, replaced or foreign ledger file is refused instead of
/// being taken as a fresh start.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum LedgerBinding {
    /// No check and no new id: the ledger keeps (and uses) whatever id it has, if any.
    #[default]
    Unbound,
    /// The file must exist, be non-empty and carry exactly this id.
    Expect(String),
    /// First binding: a missing or empty file is created with `new_id`; a file without an
    /// id gets `new_id`; a file whose id is bound to receipt key `kid` keeps it; a file
    /// bound to another receipt key is refused (a foreign ledger).
    Adopt {
        /// The id to write when the file has none.
        new_id: String,
        /// This data dir's receipt key id.
        kid: String,
    },
}

/// A fresh ledger id bound to receipt key `kid`.
pub fn new_ledger_id(kid: &str) -> String {
    format!("{:032x}@{kid}", rand::random::<u128>())
}

/// What to check when opening (see [`EmbeddedLedger::open_checked`]).
#[derive(Debug, Clone, Default)]
pub struct OpenChecks {
    /// Which ledger is expected.
    pub binding: LedgerBinding,
    /// Run redb's full integrity check (every page checksum, the allocator state) and the
    /// ledger's own consistency checks before accepting the file. Reads the whole file.
    pub integrity: bool,
}

/// What [`check_file`] found in a healthy ledger.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LedgerSummary {
    /// The ledger id, if one was written.
    pub ledger_id: Option<String>,
    /// On-disk schema version.
    pub schema_version: u64,
    /// Families with at least one receipt.
    pub families: u64,
    /// Receipts stored (every one parsed, every chain linked).
    pub receipts: u64,
    /// Counters stored.
    pub counters: u64,
    /// Revoked ids.
    pub revoked: u64,
}

type ClaimAnswer = Result<Result<Claim, Refusal>, LedgerError>;

/// The writer's answer to a claim: committed, but the receipt not signed yet.
type WriterAnswer = Result<Result<Committed, Refusal>, LedgerError>;

/// The writer's answer to a void: committed (or found), the receipt not signed yet.
type WriterVoidAnswer = Result<VoidCommitted, LedgerError>;

/// A committed void (or an earlier one) whose receipt the caller signs.
#[derive(Debug)]
struct VoidCommitted {
    receipt: StoredReceipt,
    newly: bool,
    remaining: Option<u64>,
}

/// A committed claim (or a replay) whose receipt the caller signs.
#[derive(Debug)]
struct Committed {
    receipt: StoredReceipt,
    replayed: bool,
    remaining: Option<u64>,
    alerts: Vec<AlertRecord>,
}

/// A signature to store with a later batch: `(family, seq, signature)`.
type SignatureBack = (Vec<u8>, u64, [u8; 64]);

/// The receipt keys of this ledger: the one signing now (last) and any it signed with
/// before in this process (a rotation), so a stored body is signed by its own key.
#[derive(Debug)]
pub(crate) struct SignerRing {
    keys: std::sync::RwLock<Vec<Arc<ReceiptSigner>>>,
}

impl SignerRing {
    fn new(current: Arc<ReceiptSigner>) -> Self {
        Self {
            keys: std::sync::RwLock::new(vec![current]),
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<ReceiptSigner>>> {
        self.keys
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The key new receipts are signed with.
    pub(crate) fn current(&self) -> Arc<ReceiptSigner> {
        // Never empty: created with one key, and keys are only ever added.
        let keys = self.read();
        Arc::clone(&keys[keys.len() - 1])
    }

    /// Makes `signer` the current key; earlier keys stay for bodies they must sign.
    pub(crate) fn set_current(&self, signer: Arc<ReceiptSigner>) {
        let mut keys = self
            .keys
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        keys.retain(|k| k.key_id() != signer.key_id());
        keys.push(signer);
    }

    /// Signs a stored receipt (a signed one is returned as is).
    fn sign(&self, stored: StoredReceipt) -> Result<Receipt, LedgerError> {
        match stored {
            StoredReceipt::Signed(r) => Ok(r),
            StoredReceipt::Unsigned(prepared) => {
                let signer = self
                    .read()
                    .iter()
                    .rev()
                    .find(|k| k.key_id() == prepared.body().kid)
                    .cloned()
                    .ok_or_else(|| {
                        LedgerError::Signing(format!(
                            "receipt {} of family {} is stored unsigned and its key {} is not \
                             this ledger's receipt key",
                            prepared.body().seq,
                            prepared.body().family,
                            prepared.body().kid
                        ))
                    })?;
                signer
                    .sign_prepared(prepared)
                    .map_err(|e| LedgerError::Signing(e.to_string()))
            }
        }
    }
}

// One short-lived command per request; boxing the claim would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Command {
    Claim {
        req: ClaimRequest,
        idempotency_key: String,
        /// [`plan::request_fingerprint`] of `req.request`, computed by the caller (off the
        /// writer).
        fingerprint: String,
        reply: oneshot::Sender<WriterAnswer>,
    },
    Admin {
        op: AdminOp,
        reply: oneshot::Sender<Result<AdminAnswer, LedgerError>>,
    },
    Void {
        req: VoidRequest,
        reply: oneshot::Sender<WriterVoidAnswer>,
    },
}

/// State changes other than claims (rare; they share the writer and its batches).
enum AdminOp {
    Revoke { revocation_id: Vec<u8>, at: u64 },
    Record { key: KeyBlocks, at: u64 },
    Lease { now: u64, lease: u64, limit: usize },
    Settle { id: String, outcome: AlertOutcome },
    Prune { ranges: Vec<PruneRange> },
}

// One short-lived answer per command; boxing would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum AdminAnswer {
    Revoked(Revoked),
    Done,
    Leased(Vec<AlertRecord>),
    Pruned { receipts: u64, idempotency: u64 },
}

impl Command {
    /// The caller stopped waiting (timed out or went away) before the writer started on
    /// this command: skip it, so it writes nothing.
    fn abandoned(&self) -> bool {
        match self {
            Command::Claim { reply, .. } => reply.is_closed(),
            Command::Admin { reply, .. } => reply.is_closed(),
            Command::Void { reply, .. } => reply.is_closed(),
        }
    }
}

// One short-lived answer per command; boxing the large variant would only add an allocation.
#[allow(clippy::large_enum_variant)]
enum Answer {
    Claim(WriterAnswer),
    Admin(Result<AdminAnswer, LedgerError>),
    Void(WriterVoidAnswer),
}

/// The embedded, single-node ledger (redb). See the module docs and `spec/ledger.md`.
pub struct EmbeddedLedger {
    path: PathBuf,
    ledger_id: Option<String>,
    db: Arc<Database>,
    commands: Option<SyncSender<Command>>,
    writer: Option<JoinHandle<()>>,
    claim_timeout: Duration,
    faults: Arc<Faults>,
    /// Signs receipts after their commit, and stored bodies when they are read.
    signers: Arc<SignerRing>,
    /// Signatures for the writer to store with a later batch (dropped when full).
    signatures: Option<SyncSender<SignatureBack>>,
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
        Self::open_checked(path, config, &OpenChecks::default())
    }

    /// [`EmbeddedLedger::open`] with the checks `till serve` and the CLI use: the ledger
    /// id ([`LedgerBinding`]) and, with `checks.integrity`, a full integrity check.
    ///
    /// Never panics on a damaged file: redb's own assertions are contained and every
    /// failure is a [`LedgerError::Open`] naming the file and what is wrong with it. A file
    /// that fails the integrity check is marked (`integrity_failed`), so it keeps being
    /// refused until `till ledger repair` — even if redb repaired it on the way.
    pub fn open_checked(
        path: impl AsRef<Path>,
        config: EmbeddedConfig,
        checks: &OpenChecks,
    ) -> Result<Self, LedgerError> {
        let path = path.as_ref().to_path_buf();
        let (db, ledger_id) = open_database(&path, checks)?;
        let db = Arc::new(db);
        let faults = Arc::new(Faults::default());
        let (commands, queue) = mpsc::sync_channel(QUEUE_CAPACITY);
        let (signatures, signatures_queue) = mpsc::sync_channel(SIGNATURE_BACKLOG);
        let signers = Arc::new(SignerRing::new(config.signer));
        let writer = Writer {
            ledger_id: ledger_id.clone(),
            db: Arc::clone(&db),
            signers: Arc::clone(&signers),
            signatures: signatures_queue,
            alerts: config.alerts,
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
            ledger_id,
            db,
            commands: Some(commands),
            writer: Some(handle),
            claim_timeout: config.claim_timeout,
            faults,
            signers,
            signatures: Some(signatures),
        })
    }

    /// Signs every later receipt with `signer` (a receipt key rotation, picked up by a
    /// running server). Claims already being applied finish with the key they started
    /// with; the ledger id is unchanged (it names the ledger, not the signing key).
    pub fn set_signer(&self, signer: Arc<ReceiptSigner>) {
        self.signers.set_current(signer);
    }

    /// The key id receipts are signed with now.
    pub fn signer_key_id(&self) -> String {
        self.signers.current().key_id().to_owned()
    }

    /// The ledger file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// This ledger's id (see [`LedgerBinding`]); `None` for a ledger never bound.
    pub fn ledger_id(&self) -> Option<&str> {
        self.ledger_id.as_deref()
    }

    /// Exports the receipts beyond `retention` to `dir` and prunes them, leaving a signed
    /// checkpoint per pruned range (`spec/ledger.md` §10). Per family: the receipts go to
    /// `<family>.jsonl` (appended and fsync'd first; receipts already there are not
    /// written again), then ONE write transaction deletes every range — after checking
    /// each is still exactly what was exported — with its checkpoint and the idempotency
    /// records pointing into it, then the checkpoints are appended to
    /// `<family>.checkpoints.jsonl`. Counters, revocations and chain heads stay. Safe
    /// while claims go on (they only append at the head, which is never pruned).
    pub async fn export_and_prune(
        &self,
        retention: Retention,
        dir: &Path,
        now: u64,
    ) -> Result<ExportReport, LedgerError> {
        retention::export_and_prune(self, retention, dir, now).await
    }

    /// Fault injection for tests of the layers above (proxy: "ledger unavailable → 503,
    /// nothing forwarded", "ledger back → recovers", "signing fails → 503").
    #[cfg(feature = "fault-injection")]
    #[doc(hidden)]
    pub fn faults(&self) -> crate::fault::FaultInjector {
        crate::fault::FaultInjector::new(Arc::clone(&self.faults))
    }

    /// Queues a receipt's signature for the writer (best effort: a full queue drops it,
    /// and the stored body is signed again when read).
    fn store_signature(&self, receipt: &Receipt) {
        let Some(queue) = &self.signatures else {
            return;
        };
        let sig = *receipt.signature();
        let Ok(family) = hex::decode(&receipt.body().family) else {
            return;
        };
        let _ = queue.try_send((family, receipt.body().seq, sig));
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

    async fn admin(&self, op: AdminOp) -> Result<AdminAnswer, LedgerError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Admin { op, reply })?;
        self.wait(answer).await?
    }

    async fn read<T, F>(&self, f: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, LedgerError> + Send + 'static,
    {
        let db = Arc::clone(&self.db);
        let path = self.path.display().to_string();
        tokio::task::spawn_blocking(move || {
            // A damaged file can trip redb's assertions: an error, never a crash.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&db))).unwrap_or_else(
                |panic| {
                    Err(LedgerError::Corrupt(format!(
                        "reading {path} failed ({}); the file may be damaged: run `till ledger check`",
                        panic_message(&*panic)
                    )))
                },
            )
        })
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
        self.signatures = None;
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
            let fingerprint = plan::request_fingerprint(&req.request);
            let (reply, answer) = oneshot::channel();
            self.send(Command::Claim {
                req,
                idempotency_key,
                fingerprint,
                reply,
            })?;
            let committed = match self.wait(answer).await?? {
                Ok(committed) => committed,
                Err(refusal) => return Ok(Err(refusal)),
            };
            // Committed: sign here, off the writer, and hand the signature back so the
            // stored receipt need not be signed again when read.
            let unsigned = matches!(committed.receipt, StoredReceipt::Unsigned(_));
            let receipt = self.signers.sign(committed.receipt)?;
            if unsigned {
                self.store_signature(&receipt);
            }
            Ok(Ok(Claim {
                receipt,
                replayed: committed.replayed,
                remaining: committed.remaining,
                alerts: committed.alerts,
            }))
        })
    }

    fn void(&self, req: VoidRequest) -> BoxFuture<'_, Result<Voided, LedgerError>> {
        Box::pin(async move {
            if req.family.is_empty() || req.seq == 0 {
                return Err(LedgerError::InvalidRequest(
                    "a void names a family and a seq >= 1".into(),
                ));
            }
            let (reply, answer) = oneshot::channel();
            self.send(Command::Void { req, reply })?;
            let committed = self.wait(answer).await??;
            // Signed here, off the writer, like a claim's receipt; the signature goes back
            // to the writer, and a crash before that re-signs the stored body on read.
            let unsigned = matches!(committed.receipt, StoredReceipt::Unsigned(_));
            let receipt = self.signers.sign(committed.receipt)?;
            if unsigned {
                self.store_signature(&receipt);
            }
            Ok(Voided {
                receipt,
                newly: committed.newly,
                remaining: committed.remaining,
            })
        })
    }

    fn revoke(&self, revocation_id: &[u8]) -> BoxFuture<'_, Result<Revoked, LedgerError>> {
        let revocation_id = revocation_id.to_vec();
        Box::pin(async move {
            if revocation_id.is_empty() {
                return Err(LedgerError::InvalidRequest("empty revocation id".into()));
            }
            match self
                .admin(AdminOp::Revoke {
                    revocation_id,
                    at: unix_now(),
                })
                .await?
            {
                AdminAnswer::Revoked(r) => Ok(r),
                _ => Err(LedgerError::Unavailable("internal mismatch".into())),
            }
        })
    }

    fn record_key(&self, key: KeyBlocks, at: u64) -> BoxFuture<'_, Result<(), LedgerError>> {
        Box::pin(async move {
            if key.blocks.is_empty() || key.blocks.iter().any(|(id, _)| id.is_empty()) {
                return Err(LedgerError::InvalidRequest(
                    "a key needs at least one block with a revocation id".into(),
                ));
            }
            self.admin(AdminOp::Record { key, at }).await.map(|_| ())
        })
    }

    fn families(&self, now: u64) -> BoxFuture<'_, Result<Vec<FamilyView>, LedgerError>> {
        Box::pin(self.read(move |db| {
            let r = ReadTables::open(db)?;
            let mut out = Vec::new();
            for entry in r.families.iter().map_err(unavailable)? {
                let (family, recorded_at) = entry.map_err(unavailable)?;
                out.push(r.family_view(family.value(), recorded_at.value(), now)?);
            }
            Ok(out)
        }))
    }

    fn family(
        &self,
        family: &[u8],
        now: u64,
    ) -> BoxFuture<'_, Result<Option<FamilyDetail>, LedgerError>> {
        let family = family.to_vec();
        Box::pin(self.read(move |db| {
            let r = ReadTables::open(db)?;
            let Some(recorded_at) = r.families.get(family.as_slice()).map_err(unavailable)? else {
                return Ok(None);
            };
            let view = r.family_view(&family, recorded_at.value(), now)?;
            let start = (family.as_slice(), &[][..]);
            let mut blocks = Vec::new();
            for entry in r.family_blocks.range(start..).map_err(unavailable)? {
                let (key, _) = entry.map_err(unavailable)?;
                let (fam, rev) = key.value();
                if fam != family.as_slice() {
                    break;
                }
                if let Some(record) = r.block(rev)? {
                    blocks.push(r.block_view(rev, record)?);
                }
            }
            blocks.sort_by(|a, b| {
                (a.record.index, &a.record.revocation_id)
                    .cmp(&(b.record.index, &b.record.revocation_id))
            });
            Ok(Some(FamilyDetail {
                family: view,
                blocks,
            }))
        }))
    }

    fn alerts(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        Box::pin(self.read(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(ALERTS).map_err(unavailable)?;
            let mut out = Vec::new();
            for entry in table.iter().map_err(unavailable)? {
                let (_, value) = entry.map_err(unavailable)?;
                out.push(AlertRecord::from_bytes(value.value())?);
            }
            out.sort_by(|a, b| (b.at, &b.id).cmp(&(a.at, &a.id)));
            out.truncate(limit);
            Ok(out)
        }))
    }

    fn lease_alerts(
        &self,
        now: u64,
        lease_secs: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        Box::pin(async move {
            match self
                .admin(AdminOp::Lease {
                    now,
                    lease: lease_secs,
                    limit,
                })
                .await?
            {
                AdminAnswer::Leased(v) => Ok(v),
                _ => Err(LedgerError::Unavailable("internal mismatch".into())),
            }
        })
    }

    fn settle_alert(
        &self,
        id: &str,
        outcome: AlertOutcome,
    ) -> BoxFuture<'_, Result<(), LedgerError>> {
        let id = id.to_owned();
        Box::pin(async move {
            self.admin(AdminOp::Settle { id, outcome })
                .await
                .map(|_| ())
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

    fn checkpoints(&self, family: &[u8]) -> BoxFuture<'_, Result<Vec<Checkpoint>, LedgerError>> {
        let family = family.to_vec();
        Box::pin(self.read(move |db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let table = txn.open_table(CHECKPOINTS).map_err(unavailable)?;
            let mut out = Vec::new();
            let range = (family.as_slice(), 0)..=(family.as_slice(), u64::MAX);
            for entry in table.range(range).map_err(unavailable)? {
                let (_, v) = entry.map_err(unavailable)?;
                out.push(Checkpoint::parse(v.value()).map_err(LedgerError::Corrupt)?);
            }
            Ok(out)
        }))
    }

    fn receipts(
        &self,
        family: &[u8],
        from_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Receipt>, LedgerError>> {
        let family = family.to_vec();
        let signers = Arc::clone(&self.signers);
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
                let stored = stored::decode_receipt(value.value(), &family).map_err(|e| {
                    LedgerError::Corrupt(format!("stored receipt {}: {e}", key.value().1))
                })?;
                out.push(signers.sign(stored)?);
            }
            Ok(out)
        }))
    }
}

/// The text of a panic payload.
fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic".to_owned())
}

/// Runs `f`, turning a panic (redb asserts on some damaged files) into an error.
fn contained<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        Err(format!(
            "{what} failed inside the storage engine ({}): the file is damaged",
            panic_message(&*panic)
        ))
    })
}

/// Is the file missing or empty (a state redb would silently initialise)?
fn missing_or_empty(path: &Path) -> Result<bool, String> {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_file() => Err("not a regular file".to_owned()),
        Ok(m) => Ok(m.len() == 0),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(true),
        Err(e) => Err(e.to_string()),
    }
}

fn open_database(
    path: &Path,
    checks: &OpenChecks,
) -> Result<(Database, Option<String>), LedgerError> {
    let shown = path.display().to_string();
    let open_err = |reason: String| LedgerError::Open {
        path: shown.clone(),
        reason,
    };
    let fresh = missing_or_empty(path).map_err(open_err)?;
    if let (true, LedgerBinding::Expect(id)) = (fresh, &checks.binding) {
        return Err(open_err(format!(
            "the file is missing or empty, but this data dir's ledger is {id}: refusing to \
             start a fresh ledger (it would re-activate revoked and used-up keys and restart \
             every receipt chain). Restore ledger.redb from a backup"
        )));
    }
    let mut db = match contained("opening", || {
        Database::builder()
            .set_cache_size(CACHE_BYTES)
            .create(path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => "locked".to_owned(),
                other => other.to_string(),
            })
    }) {
        Ok(db) => db,
        Err(reason) if reason == "locked" => return Err(LedgerError::Locked { path: shown }),
        Err(reason) => {
            return Err(open_err(format!(
                "{reason}; the file is not a readable ledger (run `till ledger check`)"
            )))
        }
    };
    if checks.integrity && !fresh {
        integrity(&mut db).map_err(open_err)?;
    }
    let ledger_id =
        contained("preparing the ledger", || prepare(&db, &checks.binding)).map_err(open_err)?;
    Ok((db, ledger_id))
}

/// redb's full integrity check. A file that fails it is marked `integrity_failed` (redb
/// may have repaired it in place by going back to its previous commit, which can lose
/// committed claims): the mark keeps it refused until `till ledger repair`.
fn integrity(db: &mut Database) -> Result<(), String> {
    let marked = contained("reading the ledger's metadata", || failed_mark(db))?;
    if let Some(at) = marked {
        return Err(format!(
            "this ledger failed an integrity check (at Unix time {at}) and has not been \
             repaired: run `till ledger check`, then `till ledger repair` to accept what \
             remains, or restore ledger.redb from a backup"
        ));
    }
    let verdict = contained("the integrity check", || {
        db.check_integrity().map_err(|e| e.to_string())
    });
    match verdict {
        Ok(true) => Ok(()),
        Ok(false) => {
            // Best effort: if the mark cannot be written, the error below still stops us.
            let _ = contained("marking the ledger", || mark_failed(db));
            Err(
                "the ledger failed its integrity check (damaged pages: its newest commit \
                 could not be trusted); refusing to use it. Run `till ledger check`, then \
                 `till ledger repair`, or restore ledger.redb from a backup"
                    .to_owned(),
            )
        }
        Err(e) => Err(format!(
            "the ledger failed its integrity check and cannot be repaired: {e}. Restore \
             ledger.redb from a backup"
        )),
    }
}

fn failed_mark(db: &Database) -> Result<Option<u64>, String> {
    let txn = db.begin_read().map_err(|e| e.to_string())?;
    let meta = match txn.open_table(META) {
        Ok(t) => t,
        Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
        Err(e) => return Err(e.to_string()),
    };
    let at = meta
        .get(INTEGRITY_FAILED)
        .map_err(|e| e.to_string())?
        .map(|v| v.value());
    Ok(at)
}

fn mark_failed(db: &Database) -> Result<(), String> {
    let mut txn = db.begin_write().map_err(|e| e.to_string())?;
    txn.set_durability(Durability::Immediate);
    txn.open_table(META)
        .map_err(|e| e.to_string())?
        .insert(INTEGRITY_FAILED, unix_now())
        .map_err(|e| e.to_string())?;
    txn.commit().map_err(|e| e.to_string())
}

/// Creates every table, checks (or migrates) the schema version, and applies the
/// ledger-id binding, in one transaction. Returns the ledger id.
fn prepare(db: &Database, binding: &LedgerBinding) -> Result<Option<String>, String> {
    // Create every table up front so read transactions never meet a missing table, and
    // refuse a file written by an incompatible layout.
    let e = |e: redb::Error| e.to_string();
    let mut txn = db.begin_write().map_err(|x| e(x.into()))?;
    txn.set_durability(Durability::Immediate);
    let ledger_id;
    {
        let mut meta = txn.open_table(META).map_err(|x| e(x.into()))?;
        let stored = meta
            .get("schema_version")
            .map_err(|x| e(x.into()))?
            .map(|v| v.value());
        match stored {
            None => {
                meta.insert("schema_version", SCHEMA_VERSION)
                    .map_err(|x| e(x.into()))?;
            }
            Some(SCHEMA_VERSION) => {}
            Some(1) => {
                migrate_chain_heads(&txn)?;
                migrate_receipts(&txn)?;
                meta.insert("schema_version", SCHEMA_VERSION)
                    .map_err(|x| e(x.into()))?;
            }
            Some(2) => {
                migrate_receipts(&txn)?;
                meta.insert("schema_version", SCHEMA_VERSION)
                    .map_err(|x| e(x.into()))?;
            }
            Some(other) => {
                return Err(format!(
                    "ledger schema version {other}, this build reads {SCHEMA_VERSION}"
                ))
            }
        }
        let mut text = txn.open_table(META_TEXT).map_err(|x| e(x.into()))?;
        let stored = text
            .get(LEDGER_ID)
            .map_err(|x| e(x.into()))?
            .map(|v| v.value().to_owned());
        ledger_id = match (binding, stored) {
            (LedgerBinding::Unbound, stored) => stored,
            (LedgerBinding::Expect(want), Some(have)) if *want == have => Some(have),
            (LedgerBinding::Expect(want), have) => {
                return Err(format!(
                    "this is not this data dir's ledger: it is {}, the data dir's is {want} \
                     (a ledger from another data dir, or one that was replaced): refusing it",
                    have.as_deref().unwrap_or("a ledger without an id")
                ))
            }
            (LedgerBinding::Adopt { kid, .. }, Some(have)) => {
                if have.rsplit_once('@').map(|(_, k)| k) != Some(kid.as_str()) {
                    return Err(format!(
                        "this ledger ({have}) belongs to another receipt key than this data \
                         dir's ({kid}): refusing a foreign ledger"
                    ));
                }
                Some(have)
            }
            (LedgerBinding::Adopt { new_id, .. }, None) => {
                text.insert(LEDGER_ID, new_id.as_str())
                    .map_err(|x| e(x.into()))?;
                Some(new_id.clone())
            }
        };
        txn.open_table(COUNTERS).map_err(|x| e(x.into()))?;
        txn.open_table(REVOKED).map_err(|x| e(x.into()))?;
        txn.open_table(RECEIPTS).map_err(|x| e(x.into()))?;
        txn.open_table(CHAIN_HEADS).map_err(|x| e(x.into()))?;
        txn.open_table(IDEMPOTENCY).map_err(|x| e(x.into()))?;
        txn.open_table(BLOCKS).map_err(|x| e(x.into()))?;
        txn.open_table(FAMILY_BLOCKS).map_err(|x| e(x.into()))?;
        txn.open_table(FAMILIES).map_err(|x| e(x.into()))?;
        txn.open_table(ACTIVITY).map_err(|x| e(x.into()))?;
        txn.open_table(ALERTS).map_err(|x| e(x.into()))?;
        txn.open_table(OUTBOX).map_err(|x| e(x.into()))?;
        txn.open_table(CHECKPOINTS).map_err(|x| e(x.into()))?;
        txn.open_table(WINDOWS).map_err(|x| e(x.into()))?;
        txn.open_table(VOIDS).map_err(|x| e(x.into()))?;
        txn.open_table(VOID_COUNTS).map_err(|x| e(x.into()))?;
    }
    txn.commit().map_err(|x| e(x.into()))?;
    Ok(ledger_id)
}

/// Checks a ledger file without changing it (`till ledger check`).
///
/// Takes the file's lock (so no `till serve` writes it meanwhile; a ledger in use is
/// [`LedgerError::Locked`]), copies it to `scratch` (a path the caller owns, removed
/// afterwards), and checks the copy: redb's full integrity check (every page checksum,
/// the allocator state), then the ledger's own consistency — schema version, every stored
/// receipt parses, every family's receipts run `seq` 1..n with each `prev` naming its
/// predecessor, the chain head names the last receipt, and the family counter equals it.
/// Signatures are not verified here (`till audit` does, per family, with the public key).
pub fn check_file(path: &Path, scratch: &Path) -> Result<LedgerSummary, LedgerError> {
    let shown = path.display().to_string();
    let damaged = |reason: String| LedgerError::Open {
        path: shown.clone(),
        reason,
    };
    if missing_or_empty(path).map_err(&damaged)? {
        return Err(damaged(
            "the file is missing or empty: there is no ledger to check".into(),
        ));
    }
    // Held (when the file opens cleanly) while copying, so no `till serve` writes it
    // meanwhile.
    let held = hold_lock(path)?;
    std::fs::copy(path, scratch).map_err(|e| damaged(format!("copying it to check: {e}")))?;
    drop(held);
    let result = check_copy(scratch);
    let _ = std::fs::remove_file(scratch);
    result.map_err(damaged)
}

/// Takes the ledger file's lock by opening it without any repair: a clean file comes
/// back open (its lock held until dropped); one in use is [`LedgerError::Locked`]; one
/// redb cannot open as is (damaged, or needing crash recovery) is `None` — nobody can
/// have it open, and it is left exactly as it is.
fn hold_lock(path: &Path) -> Result<Option<Database>, LedgerError> {
    let opened = contained("opening", || {
        Database::builder()
            .set_repair_callback(|session| session.abort())
            .create(path)
            .map_err(|e| match e {
                DatabaseError::DatabaseAlreadyOpen => "locked".to_owned(),
                other => other.to_string(),
            })
    });
    match opened {
        Ok(db) => Ok(Some(db)),
        Err(reason) if reason == "locked" => Err(LedgerError::Locked {
            path: path.display().to_string(),
        }),
        Err(_) => Ok(None),
    }
}

fn check_copy(copy: &Path) -> Result<LedgerSummary, String> {
    let mut db = contained("opening", || {
        Database::create(copy).map_err(|e| e.to_string())
    })
    .map_err(|e| format!("{e}; the file is not a readable ledger"))?;
    match contained("the integrity check", || {
        db.check_integrity().map_err(|e| e.to_string())
    }) {
        Ok(true) => {}
        Ok(false) => {
            return Err(
                "the file fails redb's integrity check (damaged pages; redb could \
                        repair it only by going back to an earlier commit, losing what came \
                        after)"
                    .into(),
            )
        }
        Err(e) => return Err(format!("the file fails redb's integrity check: {e}")),
    }
    if let Some(at) = contained("reading the metadata", || failed_mark(&db))? {
        return Err(format!(
            "the ledger is marked as having failed an integrity check (at Unix time {at}); \
             `till ledger repair` clears the mark"
        ));
    }
    contained("the consistency check", || consistency(&db))
}

/// The ledger's own invariants over a whole file (see [`check_file`]).
fn consistency(db: &Database) -> Result<LedgerSummary, String> {
    let e = |x: redb::Error| x.to_string();
    let txn = db.begin_read().map_err(|x| e(x.into()))?;
    let meta = txn.open_table(META).map_err(|x| e(x.into()))?;
    let schema_version = meta
        .get("schema_version")
        .map_err(|x| e(x.into()))?
        .map(|v| v.value())
        .ok_or("no schema version: not a Till ledger")?;
    if !(1..=SCHEMA_VERSION).contains(&schema_version) {
        return Err(format!(
            "ledger schema version {schema_version}, this build reads {SCHEMA_VERSION}"
        ));
    }
    let ledger_id = match txn.open_table(META_TEXT) {
        Ok(t) => t
            .get(LEDGER_ID)
            .map_err(|x| e(x.into()))?
            .map(|v| v.value().to_owned()),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(x) => return Err(e(x.into())),
    };
    let heads = txn.open_table(CHAIN_HEADS).map_err(|x| e(x.into()))?;
    let counters = txn.open_table(COUNTERS).map_err(|x| e(x.into()))?;
    let checkpoints = match txn.open_table(CHECKPOINTS) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(x) => return Err(e(x.into())),
    };
    let revoked = txn.open_table(REVOKED).map_err(|x| e(x.into()))?;
    let void_counts = match txn.open_table(VOID_COUNTS) {
        Ok(t) => Some(t),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(x) => return Err(e(x.into())),
    };

    let mut summary = LedgerSummary {
        ledger_id,
        schema_version,
        families: 0,
        receipts: 0,
        counters: counters.len().map_err(|x| e(x.into()))?,
        revoked: revoked.len().map_err(|x| e(x.into()))?,
    };
    let mut previous: Option<(Vec<u8>, StoredReceipt)> = None;
    let finish = |family: &[u8], last: &StoredReceipt| -> Result<(), String> {
        let fam = hex::encode(family);
        let seq = last.body().seq;
        let head = heads
            .get(family)
            .map_err(|x| e(x.into()))?
            .map(|v| (v.value().0, v.value().1.to_owned()))
            .ok_or_else(|| format!("family {fam}: receipts but no chain head"))?;
        let want = last.link_for_version(if schema_version >= 2 { 2 } else { 1 });
        if head != (seq, want) {
            return Err(format!(
                "family {fam}: the chain head does not name its last receipt (seq {seq})"
            ));
        }
        let counter = counters
            .get(family)
            .map_err(|x| e(x.into()))?
            .map_or(0, |v| v.value());
        // Each void adds a receipt and gives one activation back.
        let voids = match &void_counts {
            Some(t) => t
                .get(family)
                .map_err(|x| e(x.into()))?
                .map_or(0, |v| v.value()),
            None => 0,
        };
        if voids.checked_mul(2).and_then(|v| v.checked_add(counter)) != Some(seq) {
            return Err(format!(
                "family {fam}: counter {counter} and {voids} voids but {seq} receipts"
            ));
        }
        Ok(())
    };
    // Schema 1 and 2 files (a copy checked before `till serve` migrated them) keep
    // compact JWS in `receipts`; schema 3 keeps stored bodies in `receipts_v3`.
    let unreadable = |family: &[u8], seq: u64, x: String| {
        format!(
            "family {}: stored receipt {seq} is unreadable: {x}",
            hex::encode(family)
        )
    };
    let legacy;
    let current;
    type Entries<'a> = Box<dyn Iterator<Item = Result<(Vec<u8>, u64, StoredReceipt), String>> + 'a>;
    let entries: Entries<'_> = if schema_version < 3 {
        legacy = txn.open_table(RECEIPTS_V2).map_err(|x| e(x.into()))?;
        Box::new(legacy.iter().map_err(|x| e(x.into()))?.map(|entry| {
            let (key, value) = entry.map_err(|x| e(x.into()))?;
            let (family, seq) = key.value();
            let receipt = Receipt::parse(value.value())
                .map_err(|x| unreadable(family, seq, x.to_string()))?;
            Ok((family.to_vec(), seq, StoredReceipt::Signed(receipt)))
        }))
    } else {
        current = txn.open_table(RECEIPTS).map_err(|x| e(x.into()))?;
        Box::new(current.iter().map_err(|x| e(x.into()))?.map(|entry| {
            let (key, value) = entry.map_err(|x| e(x.into()))?;
            let (family, seq) = key.value();
            let receipt = stored::decode_receipt(value.value(), family)
                .map_err(|x| unreadable(family, seq, x.to_string()))?;
            Ok((family.to_vec(), seq, receipt))
        }))
    };
    for entry in entries {
        let (family, seq, receipt) = entry?;
        let family = family.as_slice();
        let body = receipt.body();
        if body.seq != seq || body.family != hex::encode(family) {
            return Err(format!(
                "family {}: the receipt stored at {seq} is another one",
                hex::encode(family)
            ));
        }
        let expected_prev = match &previous {
            Some((prev_family, prev)) if prev_family.as_slice() == family => {
                if seq != prev.body().seq + 1 {
                    return Err(format!(
                        "family {}: receipt {} is followed by {seq}",
                        hex::encode(family),
                        prev.body().seq
                    ));
                }
                Some(prev.link_for_version(body.v))
            }
            other => {
                if let Some((prev_family, prev)) = other {
                    finish(prev_family, prev)?;
                }
                summary.families += 1;
                if seq == 1 {
                    None
                } else {
                    // Receipts before it were exported and pruned: a checkpoint of the
                    // range ending at `seq - 1` names the link.
                    let checkpoint = match &checkpoints {
                        Some(t) => t
                            .get((family, seq - 1))
                            .map_err(|x| e(x.into()))?
                            .and_then(|v| Checkpoint::parse(v.value()).ok()),
                        None => None,
                    };
                    match checkpoint {
                        Some(c) => Some(c.body.head),
                        None => {
                            return Err(format!(
                                "family {}: the first receipt is {seq}, not 1, and no \
                                 checkpoint covers the receipts before it",
                                hex::encode(family)
                            ))
                        }
                    }
                }
            }
        };
        if body.prev != expected_prev {
            return Err(format!(
                "family {}: receipt {seq} does not name its predecessor",
                hex::encode(family)
            ));
        }
        summary.receipts += 1;
        previous = Some((family.to_vec(), receipt));
    }
    if let Some((family, last)) = &previous {
        finish(family, last)?;
    }
    if heads.len().map_err(|x| e(x.into()))? != summary.families {
        return Err("a chain head names a family without receipts".into());
    }
    Ok(summary)
}

/// What [`repair_file`] did.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RepairOutcome {
    /// The file passed redb's integrity check unchanged.
    pub was_clean: bool,
    /// An `integrity_failed` mark was cleared.
    pub cleared_mark: bool,
    /// The ledger after the repair.
    pub summary: LedgerSummary,
}

/// Repairs a ledger file in place (`till ledger repair`), after copying it to `backup`.
///
/// redb's integrity check repairs what it can: a damaged newest commit is dropped (the
/// file goes back to its previous commit, so claims of the dropped commit are lost and
/// their slots may be taken again — an auditor holding their receipts sees a fork) and
/// the allocator state is rebuilt. Then the `integrity_failed` mark is cleared and the
/// consistency check must pass. Refuses a ledger in use ([`LedgerError::Locked`]).
pub fn repair_file(path: &Path, backup: &Path) -> Result<RepairOutcome, LedgerError> {
    let shown = path.display().to_string();
    let failed = |reason: String| LedgerError::Open {
        path: shown.clone(),
        reason,
    };
    if missing_or_empty(path).map_err(&failed)? {
        return Err(failed(
            "the file is missing or empty: nothing to repair".into(),
        ));
    }
    {
        let held = hold_lock(path)?;
        std::fs::copy(path, backup)
            .map_err(|e| failed(format!("backing it up to {}: {e}", backup.display())))?;
        drop(held);
    }
    let mut db = contained("opening", || {
        Database::create(path).map_err(|e| match e {
            DatabaseError::DatabaseAlreadyOpen => "locked".to_owned(),
            other => other.to_string(),
        })
    })
    .map_err(|e| {
        failed(format!(
            "{e}; redb cannot open it, so it cannot be repaired"
        ))
    })?;
    let was_clean = contained("the integrity check", || {
        db.check_integrity().map_err(|e| e.to_string())
    })
    .map_err(|e| failed(format!("cannot be repaired: {e}")))?;
    let cleared_mark = contained("clearing the mark", || {
        let mut txn = db.begin_write().map_err(|e| e.to_string())?;
        txn.set_durability(Durability::Immediate);
        let had = txn
            .open_table(META)
            .map_err(|e| e.to_string())?
            .remove(INTEGRITY_FAILED)
            .map_err(|e| e.to_string())?
            .is_some();
        txn.commit().map_err(|e| e.to_string())?;
        Ok(had)
    })
    .map_err(&failed)?;
    let summary = contained("the consistency check", || consistency(&db))
        .map_err(|e| failed(format!("repaired by redb, but still inconsistent: {e}")))?;
    Ok(RepairOutcome {
        was_clean,
        cleared_mark,
        summary,
    })
}

/// Schema 1 → 2: every chain head's hash becomes its receipt's link hash (the next
/// receipt, format 2, names that in `prev`). One read and one write per family, in the
/// open transaction: either every head is migrated or none is.
fn migrate_chain_heads(txn: &redb::WriteTransaction) -> Result<(), String> {
    let receipts = txn.open_table(RECEIPTS_V2).map_err(|e| e.to_string())?;
    let mut heads = txn.open_table(CHAIN_HEADS).map_err(|e| e.to_string())?;
    let mut updated: Vec<(Vec<u8>, u64, String)> = Vec::new();
    for entry in heads.iter().map_err(|e| e.to_string())? {
        let (family, head) = entry.map_err(|e| e.to_string())?;
        let family = family.value().to_vec();
        let (seq, _) = head.value();
        let stored = receipts
            .get((family.as_slice(), seq))
            .map_err(|e| e.to_string())?
            .ok_or_else(|| {
                format!(
                    "chain head {} names missing receipt {seq}",
                    hex::encode(&family)
                )
            })?;
        let receipt = Receipt::parse(stored.value())
            .map_err(|e| format!("stored receipt {seq} is unreadable: {e}"))?;
        updated.push((family, seq, receipt.hash_hex()));
    }
    for (family, seq, hash) in updated {
        heads
            .insert(family.as_slice(), (seq, hash.as_str()))
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Schema 2 → 3: every receipt moves from `receipts` (compact JWS) to `receipts_v3`,
/// as it is (signed, [`stored::TAG_SIGNED`]); the old table is deleted. Schema 2's
/// idempotency records (JSON with a copy of the receipt) stay and are still read. In
/// the open transaction: all or nothing.
fn migrate_receipts(txn: &redb::WriteTransaction) -> Result<(), String> {
    let e = |x: redb::Error| x.to_string();
    {
        let old = match txn.open_table(RECEIPTS_V2) {
            Ok(t) => t,
            Err(redb::TableError::TableTypeMismatch { .. }) => {
                return Err("table `receipts` has an unexpected type".into())
            }
            Err(x) => return Err(e(x.into())),
        };
        let mut new = txn.open_table(RECEIPTS).map_err(|x| e(x.into()))?;
        for entry in old.iter().map_err(|x| e(x.into()))? {
            let (key, value) = entry.map_err(|x| e(x.into()))?;
            let (family, seq) = key.value();
            let mut stored = Vec::with_capacity(value.value().len() + 1);
            stored.push(stored::TAG_SIGNED);
            stored.extend_from_slice(value.value().as_bytes());
            new.insert((family, seq), stored.as_slice())
                .map_err(|x| e(x.into()))?;
        }
    }
    txn.delete_table(RECEIPTS_V2).map_err(|x| e(x.into()))?;
    Ok(())
}

/// Read-only tables for the admin read models.
struct ReadTables {
    counters: redb::ReadOnlyTable<&'static [u8], u64>,
    revoked: redb::ReadOnlyTable<&'static [u8], u64>,
    receipts: redb::ReadOnlyTable<(&'static [u8], u64), &'static [u8]>,
    chain_heads: redb::ReadOnlyTable<&'static [u8], (u64, &'static str)>,
    blocks: redb::ReadOnlyTable<&'static [u8], &'static [u8]>,
    family_blocks: redb::ReadOnlyTable<(&'static [u8], &'static [u8]), ()>,
    families: redb::ReadOnlyTable<&'static [u8], u64>,
    activity: redb::ReadOnlyTable<(&'static [u8], u64), u64>,
}

impl ReadTables {
    fn open(db: &Database) -> Result<Self, LedgerError> {
        let txn = db.begin_read().map_err(unavailable)?;
        Ok(Self {
            counters: txn.open_table(COUNTERS).map_err(unavailable)?,
            revoked: txn.open_table(REVOKED).map_err(unavailable)?,
            receipts: txn.open_table(RECEIPTS).map_err(unavailable)?,
            chain_heads: txn.open_table(CHAIN_HEADS).map_err(unavailable)?,
            blocks: txn.open_table(BLOCKS).map_err(unavailable)?,
            family_blocks: txn.open_table(FAMILY_BLOCKS).map_err(unavailable)?,
            families: txn.open_table(FAMILIES).map_err(unavailable)?,
            activity: txn.open_table(ACTIVITY).map_err(unavailable)?,
        })
    }

    fn block(&self, rev: &[u8]) -> Result<Option<BlockRecord>, LedgerError> {
        match self.blocks.get(rev).map_err(unavailable)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(v.value())
                .map(Some)
                .map_err(|e| LedgerError::Corrupt(format!("block record: {e}"))),
        }
    }

    fn block_view(&self, rev: &[u8], record: BlockRecord) -> Result<BlockView, LedgerError> {
        let used = self
            .counters
            .get(rev)
            .map_err(unavailable)?
            .map_or(0, |v| v.value());
        let revoked_at = self
            .revoked
            .get(rev)
            .map_err(unavailable)?
            .map(|v| v.value());
        Ok(BlockView {
            remaining: family::remaining_of(record.caveats.cap, used),
            record,
            used,
            revoked: revoked_at.is_some(),
            revoked_at,
        })
    }

    fn receipt_time(&self, family: &[u8], seq: u64) -> Result<Option<u64>, LedgerError> {
        let Some(v) = self.receipts.get((family, seq)).map_err(unavailable)? else {
            return Ok(None);
        };
        let receipt = stored::decode_receipt(v.value(), family).map_err(|e| {
            LedgerError::Corrupt(format!("stored receipt {seq} is unreadable: {e}"))
        })?;
        Ok(Some(receipt.body().iat))
    }

    fn family_view(
        &self,
        family: &[u8],
        recorded_at: u64,
        now: u64,
    ) -> Result<FamilyView, LedgerError> {
        let root = self.block(family)?;
        let root_view = match root {
            Some(record) => Some(self.block_view(family, record)?),
            None => None,
        };
        let head = self
            .chain_heads
            .get(family)
            .map_err(unavailable)?
            .map(|v| v.value().0);
        let first_seq = first_stored_seq(&self.receipts, family).map_err(unavailable)?;
        let first_activation = match first_seq {
            Some(seq) => self.receipt_time(family, seq)?,
            None => None,
        };
        let last_activation = match head {
            Some(seq) => self.receipt_time(family, seq)?,
            None => None,
        };
        let current = now / 60;
        let mut buckets = Vec::new();
        let from = current.saturating_sub(61);
        for entry in self
            .activity
            .range((family, from)..=(family, current))
            .map_err(unavailable)?
        {
            let (k, v) = entry.map_err(unavailable)?;
            buckets.push((k.value().1, v.value()));
        }
        let blocks = self
            .family_blocks
            .range((family, &[][..])..)
            .map_err(unavailable)?
            .take_while(|e| e.as_ref().map_or(true, |(k, _)| k.value().0 == family))
            .count() as u64;
        let used = self
            .counters
            .get(family)
            .map_err(unavailable)?
            .map_or(0, |v| v.value());
        let caveats = root_view
            .as_ref()
            .map(|v| v.record.caveats.clone())
            .unwrap_or_default();
        Ok(FamilyView {
            family: hex::encode(family),
            label: caveats.label.clone(),
            upstream: caveats.upstream.clone(),
            cap: caveats.cap,
            used,
            remaining: family::remaining_of(caveats.cap, used),
            revoked: self.revoked.get(family).map_err(unavailable)?.is_some(),
            expires: caveats.expires,
            recorded_at,
            minted: root_view.is_some_and(|v| v.record.minted),
            first_activation,
            last_activation,
            blocks,
            activity: Activity::from_buckets(now, &buckets),
        })
    }
}

/// Counts one activation in the family's current minute; on the first of a new minute,
/// deletes buckets older than [`family::ACTIVITY_MINUTES`].
#[allow(clippy::result_large_err)] // see `Tables`
fn record_activity(
    t: &mut Tables<'_>,
    family: &[u8],
    minute: u64,
    count: u64,
) -> Result<(), redb::Error> {
    t.activity.insert((family, minute), count)?;
    if count == 1 {
        let cutoff = minute.saturating_sub(family::ACTIVITY_MINUTES);
        let old: Vec<u64> = t
            .activity
            .range((family, 0)..(family, cutoff))?
            .map(|e| e.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()?;
        for m in old {
            t.activity.remove((family, m))?;
        }
    }
    Ok(())
}

/// Deletes exported receipt ranges, after checking each is still exactly what was
/// exported (first stored seq is `from_seq`, the receipt at `to_seq` hashes to the
/// checkpoint's head), stores their checkpoints and removes the idempotency records that
/// point into them. `Ok(Err(_))`: refused, nothing written (the batch goes on).
#[allow(clippy::result_large_err)] // see `Tables`
fn prune(
    t: &mut Tables<'_>,
    ranges: &[PruneRange],
) -> Result<Result<(u64, u64), LedgerError>, redb::Error> {
    for r in ranges {
        let family = r.family.as_slice();
        let first = first_stored_seq(&t.receipts, family)?;
        let head = t.chain_heads.get(family)?.map(|v| v.value().0);
        let last = match t.receipts.get((family, r.to_seq))? {
            Some(v) => stored::decode_receipt(v.value(), family).map(|s| s.link_for_version(2)),
            None => Err(LedgerError::Corrupt("missing".into())),
        };
        let ok = first == Some(r.from_seq)
            && head.is_some_and(|h| h > r.to_seq)
            && last.as_ref().is_ok_and(|h| *h == r.checkpoint.body.head);
        if !ok {
            return Ok(Err(LedgerError::InvalidRequest(format!(
                "family {}: receipts {}..={} are no longer what was exported; nothing pruned",
                hex::encode(family),
                r.from_seq,
                r.to_seq
            ))));
        }
    }
    let mut receipts = 0;
    let mut doomed: Vec<(Vec<u8>, String)> = Vec::new();
    for r in ranges {
        let family = r.family.as_slice();
        for seq in r.from_seq..=r.to_seq {
            let Some(value) = t.receipts.remove((family, seq))? else {
                continue;
            };
            receipts += 1;
            // The record its claim wrote: key computed from the receipt (scope = its last
            // slot's revocation id), no scan of the idempotency table.
            let Ok(stored) = stored::decode_receipt(value.value(), family) else {
                continue;
            };
            let body = stored.body();
            if let Some(scope) = body
                .slots
                .last()
                .and_then(|s| hex::decode(&s.revocation_id).ok())
            {
                doomed.push((scope, body.idempotency_key.clone()));
            }
        }
        t.checkpoints
            .insert((family, r.to_seq), r.checkpoint.to_line().as_str())?;
        // Void markers of pruned claims go with them (a void of a pruned claim is
        // refused as unknown; the void receipts themselves are in the export).
        let marked: Vec<u64> = t
            .voids
            .range((family, r.from_seq)..=(family, r.to_seq))?
            .map(|e| e.map(|(k, _)| k.value().1))
            .collect::<Result<_, _>>()?;
        for seq in marked {
            t.voids.remove((family, seq))?;
        }
    }
    let mut removed = 0u64;
    for (scope, idem) in &doomed {
        let points_into_range = match t.idempotency.get((scope.as_slice(), idem.as_str()))? {
            None => false,
            Some(value) => {
                let target = match stored::decode_idempotency(value.value(), scope) {
                    Ok(IdempotencyRecord::Pointer(p)) => Some((p.family, p.seq)),
                    Ok(IdempotencyRecord::Legacy(l)) => {
                        Receipt::parse(&l.receipt).ok().and_then(|r| {
                            hex::decode(&r.body().family)
                                .ok()
                                .map(|f| (f, r.body().seq))
                        })
                    }
                    Err(_) => None,
                };
                target.is_some_and(|(family, seq)| {
                    ranges
                        .iter()
                        .any(|r| r.family == family && (r.from_seq..=r.to_seq).contains(&seq))
                })
            }
        };
        if points_into_range {
            t.idempotency.remove((scope.as_slice(), idem.as_str()))?;
            removed += 1;
        }
    }
    Ok(Ok((receipts, removed)))
}

/// Stores callers' signatures next to the bodies they sign (a body already signed, or
/// gone, is left alone).
#[allow(clippy::result_large_err)] // see `Tables`
fn store_signatures(
    receipts: &mut redb::Table<'_, (&'static [u8], u64), &'static [u8]>,
    signatures: &[SignatureBack],
) -> Result<(), redb::Error> {
    for (family, seq, sig) in signatures {
        let key = (family.as_slice(), *seq);
        let signed = receipts
            .get(key)?
            .and_then(|v| stored::with_signature(v.value(), sig));
        if let Some(value) = signed {
            receipts.insert(key, value.as_slice())?;
        }
    }
    Ok(())
}

/// Records every block of `key` not yet known (and marks known ones `minted` when
/// `minted`). Returns whether anything was written.
#[allow(clippy::result_large_err)] // see `Tables`
fn record_blocks(
    t: &mut Tables<'_>,
    key: &KeyBlocks,
    at: u64,
    minted: bool,
) -> Result<bool, redb::Error> {
    let Some((family, _)) = key.blocks.first() else {
        return Ok(false);
    };
    let mut wrote = false;
    for (record, (id, _)) in key.records(at, minted).into_iter().zip(&key.blocks) {
        let existing = t.blocks.get(id.as_slice())?.map(|v| v.value().to_vec());
        let bytes = match existing {
            None => Some(serde_json::to_vec(&record).unwrap_or_default()),
            Some(bytes) if minted => match serde_json::from_slice::<BlockRecord>(&bytes) {
                Ok(mut old) if !old.minted => {
                    old.minted = true;
                    Some(serde_json::to_vec(&old).unwrap_or_default())
                }
                _ => None,
            },
            Some(_) => None,
        };
        if let Some(bytes) = bytes {
            t.blocks.insert(id.as_slice(), bytes.as_slice())?;
            t.family_blocks
                .insert((family.as_slice(), id.as_slice()), ())?;
            wrote = true;
        }
    }
    if t.families.get(family.as_slice())?.is_none() {
        t.families.insert(family.as_slice(), at)?;
        wrote = true;
    }
    Ok(wrote)
}

/// Writes an alert and its outbox entry unless an alert with its id exists (exactly
/// once). Returns whether it was written.
#[allow(clippy::result_large_err)] // see `Tables`
fn insert_alert(t: &mut Tables<'_>, alert: &AlertRecord) -> Result<bool, redb::Error> {
    if t.alerts.get(alert.id.as_str())?.is_some() {
        return Ok(false);
    }
    t.alerts
        .insert(alert.id.as_str(), alert.to_bytes().as_slice())?;
    t.outbox.insert(alert.id.as_str(), alert.at)?;
    Ok(true)
}

/// The seq of `family`'s first stored receipt (those before it were exported and
/// pruned), if it has any.
fn first_stored_seq(
    receipts: &impl ReadableTable<(&'static [u8], u64), &'static [u8]>,
    family: &[u8],
) -> Result<Option<u64>, redb::StorageError> {
    Ok(receipts
        .range((family, 0)..=(family, u64::MAX))?
        .next()
        .transpose()?
        .map(|(k, _)| k.value().1))
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
    /// Goes into every receipt this writer signs.
    ledger_id: Option<String>,
    db: Arc<Database>,
    /// Only for the key id of new receipts: the writer does not sign.
    signers: Arc<SignerRing>,
    /// Signatures from the callers, stored with the next batch.
    signatures: Receiver<SignatureBack>,
    alerts: AlertPolicy,
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
    receipts: redb::Table<'txn, (&'static [u8], u64), &'static [u8]>,
    chain_heads: redb::Table<'txn, &'static [u8], (u64, &'static str)>,
    idempotency: redb::Table<'txn, (&'static [u8], &'static str), &'static [u8]>,
    blocks: redb::Table<'txn, &'static [u8], &'static [u8]>,
    family_blocks: redb::Table<'txn, (&'static [u8], &'static [u8]), ()>,
    families: redb::Table<'txn, &'static [u8], u64>,
    activity: redb::Table<'txn, (&'static [u8], u64), u64>,
    alerts: redb::Table<'txn, &'static str, &'static [u8]>,
    outbox: redb::Table<'txn, &'static str, u64>,
    checkpoints: redb::Table<'txn, (&'static [u8], u64), &'static str>,
    windows: redb::Table<'txn, (&'static [u8], u64), &'static [u8]>,
    voids: redb::Table<'txn, (&'static [u8], u64), u64>,
    void_counts: redb::Table<'txn, &'static [u8], u64>,
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
            blocks: txn.open_table(BLOCKS)?,
            family_blocks: txn.open_table(FAMILY_BLOCKS)?,
            families: txn.open_table(FAMILIES)?,
            activity: txn.open_table(ACTIVITY)?,
            alerts: txn.open_table(ALERTS)?,
            outbox: txn.open_table(OUTBOX)?,
            checkpoints: txn.open_table(CHECKPOINTS)?,
            windows: txn.open_table(WINDOWS)?,
            voids: txn.open_table(VOIDS)?,
            void_counts: txn.open_table(VOID_COUNTS)?,
        })
    }
}

/// One command's outcome inside the batch, before the commit decides its fate.
struct Applied {
    answer: Answer,
    wrote: bool,
}

impl Writer {
    /// A receipt body ready to commit (its link hash computed). Everything that could
    /// make signing fail is checked here, before the commit (the key id is the signer's;
    /// `PreparedReceipt::new` checks the version and the size): after the commit,
    /// signing cannot fail.
    fn prepare(&self, body: till_receipt::ReceiptBody) -> Result<PreparedReceipt, LedgerError> {
        let prepared = if self.faults.signing_should_fail() {
            Err("injected signing failure".to_owned())
        } else {
            PreparedReceipt::new(body).map_err(|e| e.to_string())
        };
        prepared.map_err(|e| {
            tracing::error!(error = %e, "ledger: receipt signing failed");
            LedgerError::Signing(e)
        })
    }

    fn run(self, queue: Receiver<Command>) {
        // Never waits when idle: blocks for the first command only, then takes what is
        // already queued.
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
        // Shutting down: store the signatures still queued (best effort).
        let signatures: Vec<SignatureBack> = self.signatures.try_iter().collect();
        if !signatures.is_empty() {
            if let Ok(mut txn) = self.db.begin_write() {
                txn.set_durability(Durability::Immediate);
                let stored = match txn.open_table(RECEIPTS) {
                    Ok(mut table) => store_signatures(&mut table, &signatures).is_ok(),
                    Err(_) => false,
                };
                if stored {
                    let _ = txn.commit();
                }
            }
        }
    }

    /// Applies a batch in one write transaction, commits once, answers everyone.
    fn process(&self, batch: Vec<Command>) {
        let outcome = self.apply_and_commit(&batch);
        for (command, answer) in batch.into_iter().zip(outcome) {
            // A caller that gave up meanwhile is fine: its claim is spent but nothing is
            // forwarded (spec/ledger.md, "What a timeout means").
            let mismatch = || LedgerError::Unavailable("internal mismatch".into());
            match (command, answer) {
                (Command::Claim { reply, .. }, Answer::Claim(a)) => {
                    let _ = reply.send(a);
                }
                (Command::Admin { reply, .. }, Answer::Admin(a)) => {
                    let _ = reply.send(a);
                }
                (Command::Void { reply, .. }, Answer::Void(a)) => {
                    let _ = reply.send(a);
                }
                (Command::Claim { reply, .. }, _) => {
                    let _ = reply.send(Err(mismatch()));
                }
                (Command::Admin { reply, .. }, _) => {
                    let _ = reply.send(Err(mismatch()));
                }
                (Command::Void { reply, .. }, _) => {
                    let _ = reply.send(Err(mismatch()));
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
                    Command::Admin { .. } => {
                        Answer::Admin(Err(LedgerError::Unavailable(why.clone())))
                    }
                    Command::Void { .. } => {
                        Answer::Void(Err(LedgerError::Unavailable(why.clone())))
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
        // Signatures of receipts committed by earlier batches ride along (no fsync of
        // their own); if this batch fails they are lost, which only means signing again
        // on read.
        let signatures: Vec<SignatureBack> = self.signatures.try_iter().collect();
        store_signatures(&mut tables.receipts, &signatures)?;
        let mut applied = Vec::with_capacity(batch.len());
        for command in batch {
            applied.push(match command {
                Command::Claim {
                    req,
                    idempotency_key,
                    fingerprint,
                    ..
                } => self.apply_claim(&mut tables, req, idempotency_key, fingerprint)?,
                Command::Admin { op, .. } => self.apply_admin(&mut tables, op)?,
                Command::Void { req, .. } => self.apply_void(&mut tables, req)?,
            });
        }
        Ok(applied)
    }

    /// Revocations, key records and alert deliveries.
    #[allow(clippy::result_large_err)] // see `Tables`
    fn apply_admin(&self, t: &mut Tables<'_>, op: &AdminOp) -> Result<Applied, redb::Error> {
        let done = |answer: Result<AdminAnswer, LedgerError>, wrote: bool| Applied {
            answer: Answer::Admin(answer),
            wrote,
        };
        match op {
            AdminOp::Revoke { revocation_id, at } => {
                let id = revocation_id.as_slice();
                let record: Option<BlockRecord> = t
                    .blocks
                    .get(id)?
                    .and_then(|v| serde_json::from_slice(v.value()).ok());
                let family = record.as_ref().map(|r| r.family.clone());
                if t.revoked.get(id)?.is_some() {
                    return Ok(done(
                        Ok(AdminAnswer::Revoked(Revoked {
                            newly: false,
                            family,
                            alert: None,
                        })),
                        false,
                    ));
                }
                t.revoked.insert(id, *at)?;
                let label = match &record {
                    Some(r) => {
                        let root = hex::decode(&r.family).unwrap_or_default();
                        t.blocks
                            .get(root.as_slice())?
                            .and_then(|v| serde_json::from_slice::<BlockRecord>(v.value()).ok())
                            .and_then(|root| root.caveats.label)
                    }
                    None => None,
                };
                let mut alert = alert::revocation_alert(
                    &self.alerts,
                    id,
                    family.clone(),
                    record.as_ref().map(|r| r.index),
                    label,
                    *at,
                );
                if let Some(a) = &alert {
                    if !insert_alert(t, a)? {
                        alert = None;
                    }
                }
                Ok(done(
                    Ok(AdminAnswer::Revoked(Revoked {
                        newly: true,
                        family,
                        alert,
                    })),
                    true,
                ))
            }
            AdminOp::Record { key, at } => {
                let wrote = record_blocks(t, key, *at, true)?;
                Ok(done(Ok(AdminAnswer::Done), wrote))
            }
            AdminOp::Lease { now, lease, limit } => {
                let ids: Vec<String> = t
                    .outbox
                    .iter()?
                    .map(|e| e.map(|(k, _)| k.value().to_owned()))
                    .collect::<Result<_, _>>()?;
                let mut leased = Vec::new();
                for id in ids {
                    if leased.len() >= *limit {
                        break;
                    }
                    let Some(bytes) = t.alerts.get(id.as_str())?.map(|v| v.value().to_vec()) else {
                        t.outbox.remove(id.as_str())?;
                        continue;
                    };
                    let mut record = match AlertRecord::from_bytes(&bytes) {
                        Ok(r) => r,
                        Err(e) => return Ok(done(Err(e), false)),
                    };
                    if alert::lease(&mut record, *now, *lease) {
                        t.alerts.insert(id.as_str(), record.to_bytes().as_slice())?;
                        leased.push(record);
                    }
                }
                let wrote = !leased.is_empty();
                Ok(done(Ok(AdminAnswer::Leased(leased)), wrote))
            }
            AdminOp::Prune { ranges } => {
                let (receipts, idempotency) = match prune(t, ranges)? {
                    Ok(counts) => counts,
                    Err(e) => return Ok(done(Err(e), false)),
                };
                Ok(done(
                    Ok(AdminAnswer::Pruned {
                        receipts,
                        idempotency,
                    }),
                    receipts > 0,
                ))
            }
            AdminOp::Settle { id, outcome } => {
                let Some(bytes) = t.alerts.get(id.as_str())?.map(|v| v.value().to_vec()) else {
                    return Ok(done(
                        Err(LedgerError::InvalidRequest(format!("no alert {id}"))),
                        false,
                    ));
                };
                let mut record = match AlertRecord::from_bytes(&bytes) {
                    Ok(r) => r,
                    Err(e) => return Ok(done(Err(e), false)),
                };
                alert::settle(&mut record, outcome);
                t.alerts.insert(id.as_str(), record.to_bytes().as_slice())?;
                if record.delivery.status != alert::DeliveryStatus::Pending {
                    t.outbox.remove(id.as_str())?;
                }
                Ok(done(Ok(AdminAnswer::Done), true))
            }
        }
    }

    /// Reads the void's state in the transaction, plans ([`plan::plan_void`]) and carries
    /// the plan out, like [`Writer::apply_claim`]: the void receipt is stored as an
    /// unsigned body (tag 2) and signed by the caller after the commit.
    #[allow(clippy::result_large_err)] // see `Tables`
    fn apply_void(&self, t: &mut Tables<'_>, req: &VoidRequest) -> Result<Applied, redb::Error> {
        let nothing = |answer: WriterVoidAnswer| Applied {
            answer: Answer::Void(answer),
            wrote: false,
        };
        let family = req.family.as_slice();
        let stored = match t.receipts.get((family, req.seq))? {
            None => None,
            Some(v) => match stored::decode_receipt(v.value(), family) {
                Ok(r) => Some(r),
                Err(e) => return Ok(nothing(Err(e))),
            },
        };
        let claim = stored.as_ref().map(|r| r.body().clone());
        let voided_by = t.voids.get((family, req.seq))?.map(|v| v.value());
        let mut counts = Vec::new();
        let mut replays = None;
        let mut ids = Vec::new();
        let mut scope_key: Option<(Vec<u8>, String)> = None;
        if let Some(body) = &claim {
            for slot in &body.slots {
                let Ok(id) = hex::decode(&slot.revocation_id) else {
                    return Ok(nothing(Err(LedgerError::Corrupt(format!(
                        "receipt {} names a revocation id that is not hex",
                        body.seq
                    )))));
                };
                counts.push(t.counters.get(id.as_slice())?.map_or(0, |v| v.value()));
                ids.push(id);
            }
            // The claim's idempotency record: scoped to the presented token's last block.
            if let Some(scope) = ids.last() {
                let key = body.idempotency_key.as_str();
                if let Some(bytes) = t.idempotency.get((scope.as_slice(), key))? {
                    match stored::decode_idempotency(bytes.value(), scope) {
                        Ok(IdempotencyRecord::Pointer(p))
                            if p.family == family && p.seq == req.seq =>
                        {
                            replays = Some(p.replays);
                        }
                        Ok(_) => {}
                        Err(e) => return Ok(nothing(Err(e))),
                    }
                }
                scope_key = Some((scope.clone(), key.to_owned()));
            }
        }
        let chain_head = t.chain_heads.get(family)?.map(|v| {
            let (seq, hash) = v.value();
            (seq, hash.to_owned())
        });
        let voids = t.void_counts.get(family)?.map_or(0, |v| v.value());
        let state = plan::VoidState {
            claim,
            voided_by,
            replays,
            counts,
            chain_head,
            voids,
        };
        let signer = self.signers.current();
        let ctx = ClaimContext {
            proxy_id: &self.proxy_id,
            kid: signer.key_id(),
            idempotency_key: "",
            alerts: &self.alerts,
        };
        match plan::plan_void(req, &state, &ctx) {
            Err(e) => Ok(nothing(Err(e))),
            Ok(plan::VoidPlan::Existing { seq }) => {
                let Some(value) = t.receipts.get((family, seq))? else {
                    return Ok(nothing(Err(LedgerError::NotVoidable(format!(
                        "receipt {} of family {} was voided by receipt {seq}, which was pruned",
                        req.seq,
                        hex::encode(family)
                    )))));
                };
                let receipt = match stored::decode_receipt(value.value(), family) {
                    Ok(r) => r,
                    Err(e) => return Ok(nothing(Err(e))),
                };
                let remaining = state
                    .claim
                    .iter()
                    .flat_map(|c| c.slots.iter().zip(&state.counts))
                    .filter_map(|(slot, &count)| slot.cap.map(|cap| cap.saturating_sub(count)))
                    .min();
                Ok(nothing(Ok(VoidCommitted {
                    receipt,
                    newly: false,
                    remaining,
                })))
            }
            Ok(plan::VoidPlan::Commit {
                new_counts,
                mut body,
                voids,
                remaining,
            }) => {
                body.ledger.clone_from(&self.ledger_id);
                let claim_iat = state.claim.as_ref().map_or(0, |c| c.iat);
                let prepared = match self.prepare(body) {
                    Ok(p) => p,
                    Err(e) => return Ok(nothing(Err(e))),
                };
                let seq = prepared.body().seq;
                let hash = prepared.hash_hex();
                for (id, count) in ids.iter().zip(&new_counts) {
                    t.counters.insert(id.as_slice(), *count)?;
                }
                for w in &req.windows {
                    let Some(id) = ids.get(w.level) else {
                        continue;
                    };
                    let key = (id.as_slice(), w.secs);
                    let current = match t.windows.get(key)? {
                        None => None,
                        Some(bytes) => plan::WindowCount::from_bytes(bytes.value()).ok(),
                    };
                    if let Some(lowered) = plan::void_window(w, claim_iat, current) {
                        t.windows.insert(key, lowered.to_bytes().as_slice())?;
                    }
                }
                t.receipts.insert(
                    (family, seq),
                    stored::encode_body(prepared.body(), family).as_slice(),
                )?;
                t.chain_heads.insert(family, (seq, hash.as_str()))?;
                t.voids.insert((family, req.seq), seq)?;
                t.void_counts.insert(family, voids)?;
                // A retry with the same idempotency key claims afresh.
                if let Some((scope, key)) = &scope_key {
                    t.idempotency.remove((scope.as_slice(), key.as_str()))?;
                }
                Ok(Applied {
                    answer: Answer::Void(Ok(VoidCommitted {
                        receipt: StoredReceipt::Unsigned(prepared),
                        newly: true,
                        remaining,
                    })),
                    wrote: true,
                })
            }
        }
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
        fingerprint: &str,
    ) -> Result<Applied, redb::Error> {
        let nothing = |answer: WriterAnswer| Applied {
            answer: Answer::Claim(answer),
            wrote: false,
        };
        let family = req.levels[0].revocation_id.as_slice();
        let scope = plan::idempotency_scope(req);

        let record = match t.idempotency.get((scope, idempotency_key))? {
            None => None,
            Some(bytes) => match stored::decode_idempotency(bytes.value(), scope) {
                Ok(record) => Some(record),
                Err(e) => return Ok(nothing(Err(e))),
            },
        };
        // The planner compares fingerprints and counts replays; the receipt itself is
        // loaded (through the pointer) only for a replay.
        let idempotency = record.as_ref().map(|r| match r {
            IdempotencyRecord::Pointer(p) => StoredIdempotency {
                request: p.request.clone(),
                receipt: String::new(),
                replays: p.replays,
            },
            IdempotencyRecord::Legacy(l) => l.clone(),
        });
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
        let minute = req.now / 60;
        let minute_count = t.activity.get((family, minute))?.map_or(0, |v| v.value());
        let voids = t.void_counts.get(family)?.map_or(0, |v| v.value());
        let state = ClaimState {
            idempotency,
            revoked,
            counts,
            chain_head,
            voids,
            minute_count,
        };
        // Windowed caps (spec/ledger.md §3.4): each window's stored counter, read in this
        // transaction (a claim earlier in the batch may have written it).
        let mut stored_windows = Vec::with_capacity(req.windows.len());
        for w in &req.windows {
            let Some(level) = req.levels.get(w.level) else {
                stored_windows.push(None); // plan::validate refuses the request
                continue;
            };
            let key = (level.revocation_id.as_slice(), w.secs);
            stored_windows.push(match t.windows.get(key)? {
                None => None,
                Some(bytes) => match plan::WindowCount::from_bytes(bytes.value()) {
                    Ok(count) => Some(count),
                    Err(e) => return Ok(nothing(Err(e))),
                },
            });
        }
        let signer = self.signers.current();
        let ctx = ClaimContext {
            proxy_id: &self.proxy_id,
            kid: signer.key_id(),
            idempotency_key,
            alerts: &self.alerts,
        };

        let planned = plan::plan_claim_windowed(req, &state, &stored_windows, &ctx);
        let window_writes = planned
            .as_ref()
            .map(|(_, writes)| writes.clone())
            .unwrap_or_default();
        match planned.map(|(plan, _)| plan) {
            Err(e) => Ok(nothing(Err(e))),
            Ok(Plan::Refuse(refusal)) => Ok(nothing(Ok(Err(refusal)))),
            Ok(Plan::Replay {
                receipt: _,
                record: replayed,
                remaining,
            }) => {
                let (receipt, value) = match record {
                    Some(IdempotencyRecord::Pointer(p)) => {
                        let Some(value) = t.receipts.get((p.family.as_slice(), p.seq))? else {
                            return Ok(nothing(Err(LedgerError::Corrupt(format!(
                                "idempotency record points at receipt {} of family {}, which \
                                 is missing",
                                p.seq,
                                hex::encode(&p.family)
                            )))));
                        };
                        let receipt = match stored::decode_receipt(value.value(), &p.family) {
                            Ok(r) => r,
                            Err(e) => return Ok(nothing(Err(e))),
                        };
                        let pointer = Pointer {
                            replays: replayed.replays,
                            ..p
                        };
                        (receipt, stored::encode_pointer(&pointer, scope))
                    }
                    _ => match Receipt::parse(&replayed.receipt) {
                        Ok(r) => (StoredReceipt::Signed(r), replayed.to_bytes()),
                        Err(e) => {
                            return Ok(nothing(Err(LedgerError::Corrupt(format!(
                                "stored idempotent receipt is unreadable: {e}"
                            )))))
                        }
                    },
                };
                t.idempotency
                    .insert((scope, idempotency_key), value.as_slice())?;
                Ok(Applied {
                    answer: Answer::Claim(Ok(Ok(Committed {
                        receipt,
                        replayed: true,
                        remaining,
                        alerts: Vec::new(),
                    }))),
                    wrote: true,
                })
            }
            Ok(Plan::Commit {
                new_counts,
                mut body,
                remaining,
                minute_count,
                alerts,
            }) => {
                body.ledger.clone_from(&self.ledger_id);
                let prepared = match self.prepare(body) {
                    Ok(p) => p,
                    Err(e) => return Ok(nothing(Err(e))),
                };
                let seq = prepared.body().seq;
                let hash = prepared.hash_hex();
                for (level, count) in req.levels.iter().zip(&new_counts) {
                    t.counters.insert(level.revocation_id.as_slice(), *count)?;
                }
                for (w, count) in req.windows.iter().zip(&window_writes) {
                    if let Some(level) = req.levels.get(w.level) {
                        let key = (level.revocation_id.as_slice(), w.secs);
                        t.windows.insert(key, count.to_bytes().as_slice())?;
                    }
                }
                t.receipts.insert(
                    (family, seq),
                    stored::encode_body(prepared.body(), family).as_slice(),
                )?;
                t.chain_heads.insert(family, (seq, hash.as_str()))?;
                let pointer = Pointer {
                    family: family.to_vec(),
                    seq,
                    request: fingerprint.to_owned(),
                    replays: 0,
                };
                t.idempotency.insert(
                    (scope, idempotency_key),
                    stored::encode_pointer(&pointer, scope).as_slice(),
                )?;
                record_activity(t, family, minute, minute_count)?;
                // A key's blocks are recorded together, and a block's revocation id fixes
                // its ancestors: once the presented block is known, so is the rest.
                let known = match req.levels.last() {
                    Some(last) => t.blocks.get(last.revocation_id.as_slice())?.is_some(),
                    None => true,
                };
                if let (Some(meta), false) = (&req.meta, known) {
                    let key = KeyBlocks {
                        blocks: req
                            .levels
                            .iter()
                            .map(|l| l.revocation_id.clone())
                            .zip(meta.iter().cloned())
                            .collect(),
                    };
                    record_blocks(t, &key, req.now, false)?;
                }
                let mut fired = Vec::with_capacity(alerts.len());
                for alert in alerts {
                    if insert_alert(t, &alert)? {
                        fired.push(alert);
                    }
                }
                Ok(Applied {
                    answer: Answer::Claim(Ok(Ok(Committed {
                        receipt: StoredReceipt::Unsigned(prepared),
                        replayed: false,
                        remaining,
                        alerts: fired,
                    }))),
                    wrote: true,
                })
            }
        }
    }
}

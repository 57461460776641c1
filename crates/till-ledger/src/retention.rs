//! A bounded ledger: receipts beyond a retention are exported to append-only JSON-lines
//! files and pruned, each pruned range leaving a signed [`Checkpoint`] in the ledger (and
//! in a checkpoints file next to the export), so an auditor still proves a gapless,
//! fork-free chain from the checkpoints and the exported files. Counters, revocations
//! and chain heads are never pruned. Normative: `spec/ledger.md` §10.
//!
//! Files in the export directory, per family (`<family hex>` = its revocation id):
//!
//! - `<family hex>.jsonl`: one line per receipt, `{"seq":N,"receipt":"<compact JWS>"}`,
//!   in `seq` order, only ever appended to (an export interrupted after writing and
//!   before pruning is resumed without writing a receipt twice);
//! - `<family hex>.checkpoints.jsonl`: one [`Checkpoint`] per pruned range.
//!
//! [`export_and_prune`] is the whole procedure, shared by every backend: it plans the
//! ranges (chain heads and receipt `iat`s), reads and checks each chain, appends it to the
//! export file, signs a checkpoint per range and copies committed checkpoints out. A
//! backend provides only a [`RetentionStore`]: what is stored, and the transactional
//! prune of exported ranges (checked against what was exported, with the checkpoint
//! stored in the same transaction).

use std::collections::BTreeMap;
use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use till_receipt::{Receipt, ReceiptKeySet, ReceiptSigner};

use crate::{BoxFuture, Ledger, LedgerError};

/// What may stay in the ledger. A receipt is pruned when it is beyond `keep` (older than
/// the family's `keep` newest receipts) OR older than `max_age_secs`. The newest receipt
/// of every family always stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Receipts kept per family (at least 1 is always kept).
    pub keep: Option<u64>,
    /// Receipts younger than this (by `iat`) are kept.
    pub max_age_secs: Option<u64>,
}

impl Retention {
    /// True when nothing would ever be pruned.
    pub fn is_unbounded(&self) -> bool {
        self.keep.is_none() && self.max_age_secs.is_none()
    }
}

/// Signature context of checkpoints ([`ReceiptSigner::sign_statement`]).
pub const CHECKPOINT_CONTEXT: &str = "till-checkpoint-v1";

/// What a checkpoint states: receipts `from_seq..=to_seq` of `family` were exported to
/// `file` and pruned; the last of them hashes to `head` (its chain link: the next
/// receipt's `prev`), the first names `first_prev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    /// Format version (1).
    pub v: u32,
    /// Family id, lower-case hex.
    pub family: String,
    /// First pruned seq.
    pub from_seq: u64,
    /// Last pruned seq.
    pub to_seq: u64,
    /// Receipts in the range (`to_seq - from_seq + 1`).
    pub count: u64,
    /// Link hash of receipt `to_seq` (lower-case hex SHA-256 of its JWS signing input).
    pub head: String,
    /// `prev` of receipt `from_seq` (`None` when it is 1).
    pub first_prev: Option<String>,
    /// The export file (name, in the export directory).
    pub file: String,
    /// The ledger's id, if it has one.
    pub ledger: Option<String>,
    /// Key id of the receipt key that signed this checkpoint.
    pub kid: String,
    /// When the range was pruned, Unix seconds.
    pub iat: u64,
    /// Void receipts in the range (spec/ledger.md §3.5): the range held
    /// `count - voids` claims. Omitted when 0, so checkpoints of ranges without voids
    /// (and every checkpoint signed before voids existed) are byte-for-byte unchanged.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub voids: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A signed checkpoint: `{"body": {...}, "sig": "<hex ed25519>"}` over the body's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// What is stated.
    pub body: CheckpointBody,
    /// Lower-case hex ed25519 signature ([`CHECKPOINT_CONTEXT`]) over the body's JSON.
    pub sig: String,
}

impl Checkpoint {
    /// Signs `body` (its `kid` is set to the signer's).
    pub fn sign(mut body: CheckpointBody, signer: &ReceiptSigner) -> Self {
        signer.key_id().clone_into(&mut body.kid);
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let sig = hex::encode(signer.sign_statement(CHECKPOINT_CONTEXT, &bytes));
        Self { body, sig }
    }

    /// One JSON line.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses [`Checkpoint::to_line`].
    pub fn parse(line: &str) -> Result<Self, String> {
        serde_json::from_str(line).map_err(|e| format!("checkpoint: {e}"))
    }

    /// Verifies the signature with the key named by `kid`.
    pub fn verify(&self, keys: &ReceiptKeySet) -> Result<(), String> {
        let key = keys
            .get(&self.body.kid)
            .ok_or_else(|| format!("checkpoint signed by unknown key {}", self.body.kid))?;
        let sig = hex::decode(&self.sig)
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s).ok())
            .ok_or("checkpoint signature is not 64 hex bytes")?;
        let bytes = serde_json::to_vec(&self.body).map_err(|e| e.to_string())?;
        if key.verify_statement(CHECKPOINT_CONTEXT, &bytes, &sig) {
            Ok(())
        } else {
            Err(format!(
                "checkpoint {}..={} of family {}: bad signature",
                self.body.from_seq, self.body.to_seq, self.body.family
            ))
        }
    }
}

/// One family's receipts still in the ledger: seqs `first..=head`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRange {
    /// Family id (raw revocation-id bytes).
    pub family: Vec<u8>,
    /// First receipt still stored (receipts before it were exported and pruned).
    pub first: u64,
    /// The chain head's seq (the newest receipt, never pruned).
    pub head: u64,
}

/// One exported range of a family, to prune, with its signed checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PruneRange {
    /// Family id (raw revocation-id bytes).
    pub family: Vec<u8>,
    /// First receipt of the range (the family's first stored receipt).
    pub from_seq: u64,
    /// Last receipt of the range (before the chain head).
    pub to_seq: u64,
    /// What is stored in its place (`body.head` = link hash of receipt `to_seq`).
    pub checkpoint: Checkpoint,
}

/// What one [`RetentionStore::prune`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    /// Receipts deleted.
    pub receipts: u64,
    /// Idempotency records (pointing at deleted receipts) deleted.
    pub idempotency: u64,
}

/// What a backend provides for [`export_and_prune`].
pub trait RetentionStore: Send + Sync + std::fmt::Debug {
    /// The key that signs checkpoints (the current receipt key).
    fn retention_signer(&self) -> Arc<ReceiptSigner>;
    /// The ledger's id (named in checkpoints), if it has one.
    fn retention_ledger_id(&self) -> Option<String>;
    /// Most receipts pruned in one [`RetentionStore::prune`] call (one transaction), and
    /// in one range: the export reads, checks and holds at most this many at once.
    fn prune_chunk(&self) -> u64;
    /// Every family with stored receipts, ordered by family id.
    fn stored_ranges(&self) -> BoxFuture<'_, Result<Vec<StoredRange>, LedgerError>>;
    /// The ledger itself: the export reads stored receipts and checkpoints through
    /// [`Ledger::receipts`] and [`Ledger::checkpoints`].
    fn as_ledger(&self) -> &dyn Ledger;
    /// In ONE transaction, for every range: checks it is still exactly what was exported
    /// (its first receipt is the family's first stored one, the receipt at `to_seq` has
    /// the checkpoint's `head`, the chain head is past it), deletes its receipts (and
    /// whatever indexes only them), stores its checkpoint under `(family, to_seq)` and
    /// deletes the idempotency records pointing into it. All or nothing: a range that is
    /// no longer what was exported is `LedgerError::InvalidRequest`, nothing written. A
    /// retry of a call that did commit (an unknown commit result) finds its checkpoints
    /// stored and answers success again, never an error.
    fn prune(&self, ranges: Vec<PruneRange>) -> BoxFuture<'_, Result<Pruned, LedgerError>>;
    /// Takes or renews the ledger's export lease for `lease.holder` (spec/ledger.md §10,
    /// "One exporter per ledger"): granted when no lease is held, when the held one has
    /// lapsed (its `until` is not after `now`), or when `lease.holder` holds it already
    /// (then its `dir` and `until` are updated); otherwise
    /// [`LedgerError::ExportLeased`], naming the holder, and nothing is written. The
    /// default grants it: an embedded ledger file is opened by one process at a time.
    fn lease_export(
        &self,
        lease: &ExportLease,
        now: u64,
    ) -> BoxFuture<'_, Result<(), LedgerError>> {
        let _ = (lease, now);
        Box::pin(async { Ok(()) })
    }
    /// Gives the export lease back if `holder` holds it (an export run by hand, which
    /// should not keep the proxies' retention waiting). Default: nothing to give back.
    fn release_export(&self, holder: &str) -> BoxFuture<'_, Result<(), LedgerError>> {
        let _ = holder;
        Box::pin(async { Ok(()) })
    }
    /// Deletes what the backend keeps outside a family's own keys that only points at
    /// receipts already pruned (the FoundationDB journal, spec/ledger-fdb.md §1), so the
    /// ledger stays bounded. Called once at the end of every run that pruned something,
    /// after the prunes; answers how many entries it removed. Idempotent, and safe while
    /// claims go on (a receipt pruned once never comes back). The embedded ledger has
    /// nothing to sweep.
    fn sweep(&self) -> BoxFuture<'_, Result<u64, LedgerError>> {
        Box::pin(async { Ok(0) })
    }
}

/// Who exports a ledger, where, and until when ([`RetentionStore::lease_export`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportLease {
    /// The exporter: the proxy id of a `till serve`, or `till-cli (pid N)` for an export
    /// by hand.
    pub holder: String,
    /// Where it exports (for the refusal message of the others).
    pub dir: String,
    /// Unix seconds until which it holds the lease unless it renews it.
    pub until: u64,
}

/// What [`export_and_prune`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ExportReport {
    /// Families with a range exported and pruned.
    pub families: u64,
    /// Receipts written to the export files (receipts already there are not rewritten).
    pub exported: u64,
    /// Receipts pruned from the ledger.
    pub pruned: u64,
    /// Idempotency records of pruned receipts removed.
    pub idempotency_removed: u64,
    /// Checkpoints stored (one per pruned range; a range is at most
    /// [`RetentionStore::prune_chunk`] receipts).
    pub checkpoints: u64,
    /// Void receipts among the receipts exported (each pruned range's checkpoint states
    /// its own count, spec/ledger.md §10).
    pub voids: u64,
    /// Entries removed by [`RetentionStore::sweep`] because every receipt they point at
    /// is pruned (FoundationDB journal entries; always 0 on the embedded ledger).
    pub swept: u64,
}

/// Exports the receipts beyond `retention` to `dir` and prunes them, leaving a signed
/// checkpoint per pruned range (`spec/ledger.md` §10), in chunks of
/// [`RetentionStore::prune_chunk`] receipts. Per chunk: the receipts are read, checked to
/// be one linked chain, appended to `<family>.jsonl` and fsync'd (receipts already in the
/// file are not written again), a checkpoint is signed, the backend prunes the range in
/// one transaction, and the checkpoint is appended to `<family>.checkpoints.jsonl`.
/// Stopping anywhere leaves a consistent ledger and files: the next run resumes (a
/// committed checkpoint missing from its file is copied out first). Safe while claims go
/// on: they only append at the chain head, which is never pruned.
pub async fn export_and_prune(
    store: &dyn RetentionStore,
    retention: Retention,
    dir: &Path,
    now: u64,
) -> Result<ExportReport, LedgerError> {
    export_and_prune_chunked(store, retention, dir, now, store.prune_chunk()).await
}

/// [`export_and_prune`] with an explicit chunk size (tests use small ones).
pub async fn export_and_prune_chunked(
    store: &dyn RetentionStore,
    retention: Retention,
    dir: &Path,
    now: u64,
    chunk: u64,
) -> Result<ExportReport, LedgerError> {
    let chunk = chunk.max(1);
    let mut report = ExportReport::default();
    std::fs::create_dir_all(dir).map_err(|e| export_error(format!("{}: {e}", dir.display())))?;
    let stored = store.stored_ranges().await?;
    // Checkpoints committed by an export that stopped before copying them out.
    copy_checkpoints(store, dir, &stored).await?;
    if retention.is_unbounded() {
        return Ok(report);
    }
    let mut export = Export {
        store,
        dir,
        now,
        chunk,
        signer: store.retention_signer(),
        ledger_id: store.retention_ledger_id(),
        batch: Vec::new(),
        batched: 0,
        report: &mut report,
        families: std::collections::BTreeSet::new(),
    };
    for range in stored {
        export.family(range, retention).await?;
    }
    export.flush().await?;
    let families = export.families.len() as u64;
    report.families = families;
    // The sweep reads the whole journal: only worth it when something was pruned (a run
    // interrupted before its sweep leaves entries that the next pruning run clears).
    if report.pruned > 0 {
        report.swept = store.sweep().await?;
    }
    Ok(report)
}

fn export_error(e: String) -> LedgerError {
    LedgerError::Unavailable(format!("export: {e}"))
}

/// One export run's state: ranges exported and signed, waiting for their prune.
struct Export<'a> {
    store: &'a dyn RetentionStore,
    dir: &'a Path,
    now: u64,
    chunk: u64,
    signer: Arc<ReceiptSigner>,
    ledger_id: Option<String>,
    batch: Vec<PruneRange>,
    batched: u64,
    report: &'a mut ExportReport,
    families: std::collections::BTreeSet<Vec<u8>>,
}

impl Export<'_> {
    /// Exports (and prunes, chunk by chunk) one family's receipts beyond the retention.
    async fn family(
        &mut self,
        stored: StoredRange,
        retention: Retention,
    ) -> Result<(), LedgerError> {
        let StoredRange {
            family,
            first,
            head,
        } = stored;
        // The newest receipt always stays.
        if head <= 1 || first >= head {
            return Ok(());
        }
        let last_allowed = head - 1;
        let keep_to = retention
            .keep
            .map_or(0, |keep| head.saturating_sub(keep.max(1)))
            .min(last_allowed);
        let cutoff = retention
            .max_age_secs
            .map(|age| self.now.saturating_sub(age));
        if keep_to < first && cutoff.is_none() {
            return Ok(());
        }
        let family_hex = hex::encode(&family);
        let already = exported_up_to(self.dir, &family_hex).map_err(export_error)?;
        if first > 1 && already + 1 < first {
            return Err(export_error(format!(
                "{} ends at receipt {already}, but receipts up to {} were pruned before: \
                 restore the export file, or export to the directory that holds it (an \
                 archive split across directories, or with a gap, cannot be audited)",
                receipts_file(self.dir, &family_hex).display(),
                first - 1
            )));
        }
        let mut chain: Vec<Receipt> = Vec::new();
        // Link hash of the last receipt of the previous range of this run.
        let mut link: Option<String> = None;
        let mut next = first;
        // Without an age limit nothing past `keep_to` is pruned: read no further.
        let want = if cutoff.is_some() {
            last_allowed
        } else {
            keep_to
        };
        // Past `keep_to` the walk stops at the first young receipt, often the first one
        // read: start with small pages (a family's kept receipts are not all read).
        let mut page = 16u64;
        'walk: while next <= want {
            let upto = if next <= keep_to {
                keep_to - next + 1
            } else {
                page
            };
            page = (page * 2).min(1024);
            let limit = usize::try_from(upto.min(want - next + 1).min(self.chunk).min(1024))
                .unwrap_or(1024);
            let receipts = self
                .store
                .as_ledger()
                .receipts(&family, next, limit)
                .await?;
            if receipts.is_empty() {
                break;
            }
            for receipt in receipts {
                let body = receipt.body();
                if body.seq != next {
                    return Err(LedgerError::Corrupt(format!(
                        "family {family_hex}: receipt {next} is missing (found {}); nothing \
                         exported from it on",
                        body.seq
                    )));
                }
                let beyond = body.seq <= last_allowed
                    && (body.seq <= keep_to || cutoff.is_some_and(|c| body.iat < c));
                if !beyond {
                    break 'walk;
                }
                let expected = chain.last().map(Receipt::hash_hex).or_else(|| link.clone());
                if expected.is_some() && body.prev != expected {
                    return Err(LedgerError::Corrupt(format!(
                        "family {family_hex}: receipt {next} does not link to receipt {}; \
                         nothing exported from it on",
                        next - 1
                    )));
                }
                chain.push(receipt);
                next += 1;
                if chain.len() as u64 >= self.chunk {
                    link = chain.last().map(Receipt::hash_hex);
                    self.range(&family, &family_hex, already, std::mem::take(&mut chain))
                        .await?;
                }
            }
        }
        self.range(&family, &family_hex, already, chain).await
    }

    /// Exports one range (durably), signs its checkpoint and queues it for pruning.
    async fn range(
        &mut self,
        family: &[u8],
        family_hex: &str,
        already: u64,
        chain: Vec<Receipt>,
    ) -> Result<(), LedgerError> {
        let (Some(first), Some(last)) = (chain.first(), chain.last()) else {
            return Ok(());
        };
        let lines: Vec<String> = chain
            .iter()
            .filter(|r| r.body().seq > already)
            .map(receipt_line)
            .collect();
        self.report.exported += lines.len() as u64;
        self.report.voids += chain
            .iter()
            .filter(|r| r.body().seq > already && r.body().is_void())
            .count() as u64;
        append_durably(&receipts_file(self.dir, family_hex), &lines).map_err(export_error)?;
        let (from_seq, to_seq) = (first.body().seq, last.body().seq);
        let checkpoint = Checkpoint::sign(
            CheckpointBody {
                v: 1,
                family: family_hex.to_owned(),
                from_seq,
                to_seq,
                count: to_seq - from_seq + 1,
                head: last.hash_hex(),
                first_prev: first.body().prev.clone(),
                file: format!("{family_hex}.jsonl"),
                ledger: self.ledger_id.clone(),
                kid: String::new(),
                iat: self.now,
                voids: chain.iter().filter(|r| r.body().is_void()).count() as u64,
            },
            &self.signer,
        );
        self.batch.push(PruneRange {
            family: family.to_vec(),
            from_seq,
            to_seq,
            checkpoint,
        });
        self.batched += to_seq - from_seq + 1;
        if self.batched >= self.chunk {
            self.flush().await?;
        }
        Ok(())
    }

    /// Prunes the queued ranges (one backend transaction) and copies their checkpoints
    /// out.
    async fn flush(&mut self) -> Result<(), LedgerError> {
        if self.batch.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.batch);
        self.batched = 0;
        let pruned = self.store.prune(batch.clone()).await?;
        self.report.pruned += pruned.receipts;
        self.report.idempotency_removed += pruned.idempotency;
        self.report.checkpoints += batch.len() as u64;
        let checkpoints: Vec<Checkpoint> = batch
            .into_iter()
            .map(|r| {
                self.families.insert(r.family);
                r.checkpoint
            })
            .collect();
        append_checkpoints(self.dir, &checkpoints)
    }
}

/// Appends to each family's checkpoints file the checkpoints (committed in the ledger) it
/// lacks: those of a family whose file does not reach its first stored receipt (one tail
/// read per family; the ledger is asked only for such families).
async fn copy_checkpoints(
    store: &dyn RetentionStore,
    dir: &Path,
    stored: &[StoredRange],
) -> Result<(), LedgerError> {
    for range in stored.iter().filter(|r| r.first > 1) {
        let family_hex = hex::encode(&range.family);
        let in_file = checkpointed_up_to(dir, &family_hex).map_err(export_error)?;
        if in_file + 1 < range.first {
            let checkpoints = store.as_ledger().checkpoints(&range.family).await?;
            append_checkpoints(dir, &checkpoints)?;
        }
    }
    Ok(())
}

/// Appends checkpoints to their families' files, skipping those a file already holds
/// (by `to_seq`).
fn append_checkpoints(dir: &Path, checkpoints: &[Checkpoint]) -> Result<(), LedgerError> {
    let mut by_family: BTreeMap<&str, Vec<&Checkpoint>> = BTreeMap::new();
    for c in checkpoints {
        by_family.entry(c.body.family.as_str()).or_default().push(c);
    }
    for (family_hex, mut list) in by_family {
        if hex::decode(family_hex).is_err() {
            return Err(LedgerError::Corrupt(format!(
                "a stored checkpoint names family {family_hex:?}, which is not hex"
            )));
        }
        list.sort_by_key(|c| c.body.to_seq);
        let in_file = checkpointed_up_to(dir, family_hex).map_err(export_error)?;
        let lines: Vec<String> = list
            .into_iter()
            .filter(|c| c.body.to_seq > in_file)
            .map(Checkpoint::to_line)
            .collect();
        append_durably(&checkpoints_file(dir, family_hex), &lines).map_err(export_error)?;
    }
    Ok(())
}

/// The export file of a family.
pub fn receipts_file(dir: &Path, family_hex: &str) -> PathBuf {
    dir.join(format!("{family_hex}.jsonl"))
}

/// The checkpoints file of a family.
pub fn checkpoints_file(dir: &Path, family_hex: &str) -> PathBuf {
    dir.join(format!("{family_hex}.checkpoints.jsonl"))
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    seq: u64,
    receipt: String,
}

/// Reads a family's exported receipts (in file order) and checkpoints; missing files are
/// empty.
pub fn read_export(
    dir: &Path,
    family_hex: &str,
) -> Result<(Vec<Receipt>, Vec<Checkpoint>), String> {
    let mut receipts = Vec::new();
    let path = receipts_file(dir, family_hex);
    for (n, line) in lines(&path)?.into_iter().enumerate() {
        let line: Line = serde_json::from_str(&line)
            .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
        let receipt = Receipt::parse(&line.receipt)
            .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
        if receipt.body().seq != line.seq || receipt.body().family != family_hex {
            return Err(format!(
                "{} line {}: the receipt is not seq {} of this family",
                path.display(),
                n + 1,
                line.seq
            ));
        }
        receipts.push(receipt);
    }
    let (checkpoints, _) = read_export_checkpoints(dir, family_hex)?;
    Ok((receipts, checkpoints))
}

fn lines(path: &Path) -> Result<Vec<String>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    std::io::BufReader::new(file)
        .lines()
        .filter(|l| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A family's checkpoints file: its checkpoints and the highest `to_seq` among them.
pub(crate) fn read_export_checkpoints(
    dir: &Path,
    family_hex: &str,
) -> Result<(Vec<Checkpoint>, u64), String> {
    let path = checkpoints_file(dir, family_hex);
    let mut out = Vec::new();
    for (n, line) in lines(&path)?.into_iter().enumerate() {
        out.push(
            Checkpoint::parse(&line)
                .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?,
        );
    }
    let last = out.iter().map(|c| c.body.to_seq).max().unwrap_or(0);
    Ok((out, last))
}

/// The highest seq already in a family's export file (0 when none): its last line (lines
/// are appended in `seq` order).
pub(crate) fn exported_up_to(dir: &Path, family_hex: &str) -> Result<u64, String> {
    let path = receipts_file(dir, family_hex);
    match last_line(&path)? {
        None => Ok(0),
        Some(line) => serde_json::from_str::<Line>(&line)
            .map(|l| l.seq)
            .map_err(|e| format!("{} (last line): {e}", path.display())),
    }
}

/// The highest `to_seq` in a family's checkpoints file (0 when none): its last line
/// (checkpoints are appended in `to_seq` order).
pub(crate) fn checkpointed_up_to(dir: &Path, family_hex: &str) -> Result<u64, String> {
    let path = checkpoints_file(dir, family_hex);
    match last_line(&path)? {
        None => Ok(0),
        Some(line) => Checkpoint::parse(&line)
            .map(|c| c.body.to_seq)
            .map_err(|e| format!("{} (last line): {e}", path.display())),
    }
}

/// Bytes read from the end of a file to find its last line (doubled until one fits).
const TAIL: u64 = 64 * 1024;

/// The last non-empty line of an export file, read from its end (the files only grow, so
/// a run never rereads them). A last line without its newline is an append torn by a
/// crash — its receipts (or checkpoint) were never pruned on the strength of it, since
/// the prune waits for the fsync — and is cut off, so the next append starts a clean
/// line.
fn last_line(path: &Path) -> Result<Option<String>, String> {
    use std::io::{Read as _, Seek as _, SeekFrom};
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(err(e)),
    };
    let mut len = file.metadata().map_err(err)?.len();
    let mut tail = TAIL;
    loop {
        let start = len.saturating_sub(tail);
        file.seek(SeekFrom::Start(start)).map_err(err)?;
        let mut buf = Vec::new();
        std::io::Read::by_ref(&mut file)
            .take(len - start)
            .read_to_end(&mut buf)
            .map_err(err)?;
        if !buf.is_empty() && buf.last() != Some(&b'\n') {
            // Torn last line: cut it (back to the last newline, or to nothing).
            match buf.iter().rposition(|&b| b == b'\n') {
                Some(i) => {
                    len = start + i as u64 + 1;
                    buf.truncate(i + 1);
                }
                None if start == 0 => {
                    len = 0;
                    buf.clear();
                }
                None => {
                    tail = tail.saturating_mul(2);
                    continue;
                }
            }
            file.set_len(len).map_err(err)?;
            file.sync_all().map_err(err)?;
        }
        let text = String::from_utf8_lossy(&buf);
        let mut complete: Vec<&str> = text.split('\n').collect();
        if start > 0 {
            // The first piece may be the end of a longer line.
            complete.remove(0);
        }
        if let Some(line) = complete.iter().rev().find(|l| !l.trim().is_empty()) {
            return Ok(Some((*line).to_owned()));
        }
        if start == 0 {
            return Ok(None);
        }
        tail = tail.saturating_mul(2);
    }
}

/// Appends lines to a file and makes them durable (file and directory fsync'd).
pub(crate) fn append_durably(path: &Path, lines: &[String]) -> Result<(), String> {
    if lines.is_empty() {
        return Ok(());
    }
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    file.write_all(text.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    if let Some(parent) = path.parent() {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// One export line.
pub(crate) fn receipt_line(receipt: &Receipt) -> String {
    serde_json::to_string(&Line {
        seq: receipt.body().seq,
        receipt: receipt.compact().to_owned(),
    })
    .unwrap_or_default()
}

/// A family's whole chain for an audit: the exported receipts (`export/<family>.jsonl`)
/// that the ledger no longer holds, then the ledger's own (`kept`, in seq order), checked
/// against the checkpoints (the ledger's and the export directory's). Returns the chain
/// (`seq` 1..=n, ready for [`till_receipt::audit_chain`]) and the last pruned seq (0:
/// nothing was pruned, and the export directory is not read).
pub fn whole_chain(
    export: &Path,
    family_hex: &str,
    kept: Vec<Receipt>,
    ledger_checkpoints: Vec<Checkpoint>,
    keys: &ReceiptKeySet,
) -> Result<(Vec<Receipt>, u64), String> {
    let mut checkpoints = ledger_checkpoints;
    let first_kept = kept.first().map(|r| r.body().seq);
    if checkpoints.is_empty() && first_kept.is_none_or(|s| s == 1) {
        return Ok((kept, 0));
    }
    let (exported, file_checkpoints) = read_export(export, family_hex)?;
    for c in file_checkpoints {
        if !checkpoints.contains(&c) {
            checkpoints.push(c);
        }
    }
    let mut chain: Vec<Receipt> = Vec::with_capacity(exported.len() + kept.len());
    for r in exported {
        // Exported but not pruned yet (an export stopped before pruning): the ledger's
        // copy must be the same receipt.
        if let Some(first) = first_kept.filter(|s| r.body().seq >= *s) {
            let i = usize::try_from(r.body().seq - first).unwrap_or(usize::MAX);
            if kept.get(i) != Some(&r) {
                return Err(format!(
                    "exported receipt {} differs from the ledger's",
                    r.body().seq
                ));
            }
            continue;
        }
        chain.push(r);
    }
    chain.extend(kept);
    let pruned = check_checkpoints(&chain, &checkpoints, keys)?;
    if let Some(first) = first_kept {
        if first != pruned + 1 {
            return Err(format!(
                "the ledger's receipts start at {first}, but checkpoints cover only 1..={pruned}"
            ));
        }
    }
    Ok((chain, pruned))
}

/// Checks checkpoints against a family's whole chain (`chain[i]` has `seq == i + 1`, as
/// [`till_receipt::audit_chain`] requires): every checkpoint verifies, names this family,
/// and states exactly what the chain holds (count, voids among them, the hash of its last
/// receipt, the `prev` of its first); the ranges are contiguous from seq 1. Returns the last pruned
/// seq (0 without checkpoints).
pub fn check_checkpoints(
    chain: &[Receipt],
    checkpoints: &[Checkpoint],
    keys: &ReceiptKeySet,
) -> Result<u64, String> {
    let mut sorted: Vec<&Checkpoint> = checkpoints.iter().collect();
    sorted.sort_by_key(|c| c.body.from_seq);
    sorted.dedup_by(|a, b| a == b);
    let mut next = 1u64;
    for c in sorted {
        c.verify(keys)?;
        let b = &c.body;
        let range = format!("checkpoint {}..={}", b.from_seq, b.to_seq);
        if b.from_seq != next || b.to_seq < b.from_seq || b.count != b.to_seq - b.from_seq + 1 {
            return Err(format!(
                "{range}: ranges are not contiguous from seq 1 (expected {next}..)"
            ));
        }
        let at = |seq: u64| {
            usize::try_from(seq - 1)
                .ok()
                .and_then(|i| chain.get(i))
                .ok_or_else(|| {
                    format!("{range}: receipt {seq} is not in the chain (exported file missing?)")
                })
        };
        let (first, last) = (at(b.from_seq)?, at(b.to_seq)?);
        if first.body().family != b.family {
            return Err(format!("{range}: another family"));
        }
        if last.hash_hex() != b.head || first.body().prev != b.first_prev {
            return Err(format!(
                "{range}: the exported receipts are not the ones it signed"
            ));
        }
        let voids = (b.from_seq..=b.to_seq)
            .map(at)
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .filter(|r| r.body().is_void())
            .count() as u64;
        if voids != b.voids {
            return Err(format!(
                "{range}: states {} voids, the exported receipts hold {voids}",
                b.voids
            ));
        }
        next = b.to_seq + 1;
    }
    Ok(next - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> CheckpointBody {
        CheckpointBody {
            v: 1,
            family: "ab".into(),
            from_seq: 1,
            to_seq: 3,
            count: 3,
            head: "00".repeat(32),
            first_prev: None,
            file: "ab.jsonl".into(),
            ledger: None,
            kid: String::new(),
            iat: 1,
            voids: 0,
        }
    }

    /// The last line is found from the end of the file, also past the first tail read,
    /// and a torn last line (a crash mid-append) is cut off, never parsed.
    #[test]
    fn last_line_reads_the_tail_and_cuts_a_torn_append() {
        let dir = std::env::temp_dir().join(format!("till-last-line-{}", rand::random::<u64>()));
        std::fs::create_dir_all(&dir).unwrap();
        let family = "ab";
        let path = receipts_file(&dir, family);
        assert_eq!(exported_up_to(&dir, family).unwrap(), 0, "no file");
        let long = "x".repeat(usize::try_from(TAIL).unwrap() * 3);
        let line = |seq: u64| format!("{{\"seq\":{seq},\"receipt\":\"{long}\"}}");
        append_durably(&path, &[line(1), line(2)]).unwrap();
        assert_eq!(exported_up_to(&dir, family).unwrap(), 2);
        let whole = std::fs::metadata(&path).unwrap().len();
        // A torn append: half a line without its newline.
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        f.write_all(&line(3).as_bytes()[..100]).unwrap();
        drop(f);
        assert_eq!(exported_up_to(&dir, family).unwrap(), 2);
        assert_eq!(
            std::fs::metadata(&path).unwrap().len(),
            whole,
            "torn line cut"
        );
        append_durably(&path, &[line(3)]).unwrap();
        assert_eq!(exported_up_to(&dir, family).unwrap(), 3);
        // A file holding only a torn line is empty afterwards.
        let torn = receipts_file(&dir, "cd");
        std::fs::write(&torn, "{\"seq\":1,").unwrap();
        assert_eq!(exported_up_to(&dir, "cd").unwrap(), 0);
        assert_eq!(std::fs::metadata(&torn).unwrap().len(), 0);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn checkpoints_sign_parse_and_verify() {
        let signer = ReceiptSigner::from_seed([4; 32]);
        let keys: ReceiptKeySet = [signer.public_key()].into_iter().collect();
        let c = Checkpoint::sign(body(), &signer);
        assert_eq!(c.body.kid, signer.key_id());
        let parsed = Checkpoint::parse(&c.to_line()).unwrap();
        assert_eq!(parsed, c);
        parsed.verify(&keys).unwrap();
        let mut forged = parsed.clone();
        forged.body.to_seq = 4;
        assert!(forged.verify(&keys).is_err());
        assert!(c.verify(&ReceiptKeySet::new()).is_err());
        // No voids: the member is left out (checkpoints signed before voids verify).
        assert!(!c.to_line().contains("voids"));
        let mut with_voids = body();
        with_voids.voids = 1;
        let line = Checkpoint::sign(with_voids, &signer).to_line();
        assert!(line.contains(r#""voids":1"#), "{line}");
        Checkpoint::parse(&line).unwrap().verify(&keys).unwrap();
    }
}

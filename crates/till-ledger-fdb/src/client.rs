//! The FoundationDB client side (cargo feature `fdb-client`, links `libfdb_c`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use foundationdb::api::{FdbApiBuilder, NetworkAutoStop};
use foundationdb::options::{MutationType, TransactionOption};
use foundationdb::{Database, FdbError, RangeOption, Transaction, TransactionCommitError};
use till_ledger::{
    AlertOutcome, AlertRecord, BoxFuture, Claim, ClaimRequest, FamilyDetail, FamilyView, KeyBlocks,
    Ledger, LedgerError, Level, LevelUsage, Receipt, Refusal, Revoked, VoidRequest, Voided,
};

use crate::config::FdbConfig;
use crate::engine::{EngineStats, KvLedger};
use crate::error::{BootError, KvError};
use crate::kv::{KvStore, KvTxn, TxnOptions};

static BOOTED: AtomicBool = AtomicBool::new(false);

/// The running FoundationDB client network. Keep it alive for as long as any
/// [`FdbLedger`] is in use (normally: hold it in `main`); dropping it stops the network
/// thread, and the client cannot be started again in this process.
pub struct FdbNetwork {
    _guard: NetworkAutoStop,
}

impl std::fmt::Debug for FdbNetwork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FdbNetwork")
    }
}

/// Whether [`boot`] has been called in this process.
pub fn is_booted() -> bool {
    BOOTED.load(Ordering::Acquire)
}

/// Selects FoundationDB API version 730 and starts the client network thread, once per
/// process. A second call fails with [`BootError::AlreadyBooted`] (never panics).
///
/// Call it early in `main`, before any runtime work that may open a ledger, and keep the
/// returned [`FdbNetwork`] until the end of `main`.
///
/// # Safety
///
/// This function is safe to call; it contains the crate's only `unsafe` block.
/// `NetworkBuilder::boot` is `unsafe` because the network must be stopped (the guard
/// dropped) before the process exits and must not be started twice: the returned guard
/// stops it on drop, and the process-wide flag makes a second start impossible.
#[allow(unsafe_code)]
pub fn boot() -> Result<FdbNetwork, BootError> {
    if BOOTED
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return Err(BootError::AlreadyBooted);
    }
    let client = |e: FdbError| BootError::Client {
        code: e.code(),
        message: e.message().to_owned(),
    };
    let network = FdbApiBuilder::default().build().map_err(client)?;
    // SAFETY: see the `# Safety` section: started once (flag above), stopped by the guard.
    let guard = unsafe { network.boot() }.map_err(client)?;
    Ok(FdbNetwork { _guard: guard })
}

fn kv_error(e: FdbError) -> KvError {
    KvError::Fdb {
        code: e.code(),
        message: e.message().to_owned(),
        retryable: e.is_retryable(),
        maybe_committed: e.is_maybe_committed(),
    }
}

fn millis(d: std::time::Duration) -> i32 {
    i32::try_from(d.as_millis()).unwrap_or(i32::MAX).max(1)
}

/// A FoundationDB database as a [`KvStore`].
pub struct FdbStore {
    db: Database,
    cluster_file: Option<String>,
}

impl std::fmt::Debug for FdbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FdbStore")
            .field("cluster_file", &self.cluster_file)
            .finish_non_exhaustive()
    }
}

impl FdbStore {
    /// Opens the database named by `cluster_file` (`None`: libfdb_c's default). Needs
    /// [`boot`] first. Does not contact the cluster.
    pub fn open(cluster_file: Option<&std::path::Path>) -> Result<Self, KvError> {
        if !is_booted() {
            return Err(KvError::Open(
                "the FoundationDB client is not booted: call till_ledger_fdb::boot() first".into(),
            ));
        }
        let cluster_file = match cluster_file {
            None => None,
            Some(p) => Some(
                p.to_str()
                    .ok_or_else(|| {
                        KvError::Open(format!("cluster file path {} is not UTF-8", p.display()))
                    })?
                    .to_owned(),
            ),
        };
        let db = Database::new(cluster_file.as_deref()).map_err(|e| {
            KvError::Open(format!(
                "cluster file {}: {}",
                cluster_file.as_deref().unwrap_or("(default)"),
                e.message()
            ))
        })?;
        Ok(Self { db, cluster_file })
    }
}

/// A FoundationDB transaction as a [`KvTxn`].
pub struct FdbTxn {
    state: TxnState,
}

enum TxnState {
    Live(Transaction),
    Failed(TransactionCommitError),
}

impl std::fmt::Debug for FdbTxn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FdbTxn")
    }
}

impl FdbTxn {
    fn live(&self) -> Result<&Transaction, KvError> {
        match &self.state {
            TxnState::Live(t) => Ok(t),
            TxnState::Failed(_) => Err(KvError::from_code(
                crate::error::codes::TRANSACTION_CANCELLED,
            )),
        }
    }
}

fn set_options(trx: &Transaction, options: &TxnOptions) -> Result<(), KvError> {
    trx.set_option(TransactionOption::Timeout(millis(options.timeout)))
        .map_err(kv_error)?;
    trx.set_option(TransactionOption::RetryLimit(
        i32::try_from(options.retry_limit).unwrap_or(i32::MAX),
    ))
    .map_err(kv_error)?;
    trx.set_option(TransactionOption::MaxRetryDelay(millis(
        options.max_retry_delay,
    )))
    .map_err(kv_error)?;
    Ok(())
}

impl KvStore for FdbStore {
    type Txn = FdbTxn;

    fn begin(&self, options: &TxnOptions) -> Result<FdbTxn, KvError> {
        let trx = self.db.create_trx().map_err(kv_error)?;
        // API >= 610: timeout and retry limit survive `on_error`, so they bound the whole
        // retry loop, not one attempt.
        set_options(&trx, options)?;
        Ok(FdbTxn {
            state: TxnState::Live(trx),
        })
    }
}

impl KvTxn for FdbTxn {
    fn get(
        &self,
        key: &[u8],
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, KvError>> + Send {
        // Serializable read (`snapshot = false`): the key joins the read-conflict set.
        let fut = self.live().map(|t| t.get(key, false));
        async move {
            let value = fut?.await.map_err(kv_error)?;
            Ok(value.map(|v| v.to_vec()))
        }
    }

    fn get_range(
        &self,
        begin: &[u8],
        end: &[u8],
        limit: usize,
    ) -> impl std::future::Future<Output = Result<Vec<(Vec<u8>, Vec<u8>)>, KvError>> + Send {
        let mut opt = RangeOption::from((begin.to_vec(), end.to_vec()));
        opt.limit = Some(limit);
        async move {
            let trx = self.live()?;
            let mut out = Vec::new();
            let mut next = Some(opt);
            let mut iteration = 1;
            while let Some(opt) = next.take() {
                let values = trx
                    .get_range(&opt, iteration, false)
                    .await
                    .map_err(kv_error)?;
                out.extend(
                    values
                        .iter()
                        .map(|kv| (kv.key().to_vec(), kv.value().to_vec())),
                );
                iteration += 1;
                next = opt.next_range(&values);
            }
            out.truncate(limit);
            Ok(out)
        }
    }

    fn set(&mut self, key: &[u8], value: &[u8]) {
        if let TxnState::Live(t) = &self.state {
            t.set(key, value);
        }
    }

    fn clear(&mut self, key: &[u8]) {
        if let TxnState::Live(t) = &self.state {
            t.clear(key);
        }
    }

    fn clear_range(&mut self, begin: &[u8], end: &[u8]) {
        if let TxnState::Live(t) = &self.state {
            t.clear_range(begin, end);
        }
    }

    fn set_versionstamped_key(&mut self, key: &[u8], value: &[u8]) {
        if let TxnState::Live(t) = &self.state {
            t.atomic_op(key, value, MutationType::SetVersionstampedKey);
        }
    }

    async fn commit(self) -> Result<(), (Self, KvError)> {
        match self.state {
            TxnState::Live(trx) => match trx.commit().await {
                Ok(_) => Ok(()),
                Err(failed) => {
                    let error = kv_error(*failed);
                    Err((
                        FdbTxn {
                            state: TxnState::Failed(failed),
                        },
                        error,
                    ))
                }
            },
            failed @ TxnState::Failed(_) => Err((
                FdbTxn { state: failed },
                KvError::from_code(crate::error::codes::TRANSACTION_CANCELLED),
            )),
        }
    }

    async fn on_error(self, error: KvError) -> Result<Self, KvError> {
        let code = match error.code() {
            Some(code) => code,
            None => return Err(error),
        };
        let trx = match self.state {
            TxnState::Live(trx) => trx.on_error(FdbError::from_code(code)).await,
            TxnState::Failed(failed) => failed.on_error().await,
        }
        .map_err(kv_error)?;
        Ok(FdbTxn {
            state: TxnState::Live(trx),
        })
    }
}

/// The FoundationDB ledger: [`KvLedger`] over [`FdbStore`]. Every `till serve` of a fleet
/// opens one on the same cluster and key space.
#[derive(Debug)]
pub struct FdbLedger {
    inner: KvLedger<FdbStore>,
}

impl FdbLedger {
    /// Opens the ledger: connects to the cluster named by `config.cluster_file`, starts
    /// the batching lanes on the current Tokio runtime, and checks (or writes, on a fresh
    /// key space) the layout version. Needs [`boot`] first.
    ///
    /// Fails with [`LedgerError::Open`] when the client is not booted, the cluster file is
    /// unusable, the key space holds another layout version or its ledger id is bound to
    /// another receipt key ([`crate::FdbConfig::ledger_id`]), and with
    /// [`LedgerError::Unavailable`] when the cluster does not answer within
    /// `config.transaction_timeout`.
    pub async fn open(config: FdbConfig) -> Result<Self, LedgerError> {
        let shown = config.cluster_file.as_ref().map_or_else(
            || "(default cluster file)".to_owned(),
            |p| p.display().to_string(),
        );
        let store =
            FdbStore::open(config.cluster_file.as_deref()).map_err(|e| LedgerError::Open {
                path: shown,
                reason: e.to_string(),
            })?;
        let inner = KvLedger::start(Arc::new(store), &config)?;
        inner.check_schema().await?;
        Ok(Self { inner })
    }

    /// What the engine did so far (batches, commits, retries, ...).
    pub fn stats(&self) -> EngineStats {
        self.inner.stats()
    }

    /// The key space's ledger id, `<32 hex>@<receipt key id>` (in every receipt this
    /// ledger signs; spec/ledger-fdb.md §1, "Ledger id").
    pub fn ledger_id(&self) -> Option<&str> {
        self.inner.ledger_id()
    }

    /// The engine (key space, store).
    pub fn engine(&self) -> &KvLedger<FdbStore> {
        &self.inner
    }
}

impl Ledger for FdbLedger {
    fn claim(
        &self,
        req: ClaimRequest,
    ) -> BoxFuture<'_, Result<Result<Claim, Refusal>, LedgerError>> {
        self.inner.claim(req)
    }

    fn void(&self, req: VoidRequest) -> BoxFuture<'_, Result<Voided, LedgerError>> {
        self.inner.void(req)
    }

    fn revoke(&self, revocation_id: &[u8]) -> BoxFuture<'_, Result<Revoked, LedgerError>> {
        self.inner.revoke(revocation_id)
    }

    fn usage(&self, levels: &[Level]) -> BoxFuture<'_, Result<Vec<LevelUsage>, LedgerError>> {
        self.inner.usage(levels)
    }

    fn receipts(
        &self,
        family: &[u8],
        from_seq: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<Receipt>, LedgerError>> {
        self.inner.receipts(family, from_seq, limit)
    }

    fn checkpoints(
        &self,
        family: &[u8],
    ) -> BoxFuture<'_, Result<Vec<till_ledger::retention::Checkpoint>, LedgerError>> {
        self.inner.checkpoints(family)
    }

    fn record_key(&self, key: KeyBlocks, at: u64) -> BoxFuture<'_, Result<(), LedgerError>> {
        self.inner.record_key(key, at)
    }

    fn families(&self, now: u64) -> BoxFuture<'_, Result<Vec<FamilyView>, LedgerError>> {
        self.inner.families(now)
    }

    fn family(
        &self,
        family: &[u8],
        now: u64,
    ) -> BoxFuture<'_, Result<Option<FamilyDetail>, LedgerError>> {
        self.inner.family(family, now)
    }

    fn alerts(&self, limit: usize) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        self.inner.alerts(limit)
    }

    fn lease_alerts(
        &self,
        now: u64,
        lease_secs: u64,
        limit: usize,
    ) -> BoxFuture<'_, Result<Vec<AlertRecord>, LedgerError>> {
        self.inner.lease_alerts(now, lease_secs, limit)
    }

    fn settle_alert(
        &self,
        id: &str,
        outcome: AlertOutcome,
    ) -> BoxFuture<'_, Result<(), LedgerError>> {
        self.inner.settle_alert(id, outcome)
    }
}

/// Export and prune (spec/ledger.md §10), delegated to the engine.
impl till_ledger::RetentionStore for FdbLedger {
    fn retention_signer(&self) -> Arc<till_receipt::ReceiptSigner> {
        self.inner.retention_signer()
    }

    fn retention_ledger_id(&self) -> Option<String> {
        self.inner.retention_ledger_id()
    }

    fn prune_chunk(&self) -> u64 {
        self.inner.prune_chunk()
    }

    fn stored_ranges(
        &self,
    ) -> BoxFuture<'_, Result<Vec<till_ledger::retention::StoredRange>, LedgerError>> {
        self.inner.stored_ranges()
    }

    fn as_ledger(&self) -> &dyn Ledger {
        self
    }

    fn prune(
        &self,
        ranges: Vec<till_ledger::retention::PruneRange>,
    ) -> BoxFuture<'_, Result<till_ledger::retention::Pruned, LedgerError>> {
        self.inner.prune(ranges)
    }

    fn sweep(&self) -> BoxFuture<'_, Result<u64, LedgerError>> {
        self.inner.sweep()
    }

    fn lease_export(
        &self,
        lease: &till_ledger::retention::ExportLease,
        now: u64,
    ) -> BoxFuture<'_, Result<(), LedgerError>> {
        self.inner.lease_export(lease, now)
    }

    fn release_export(&self, holder: &str) -> BoxFuture<'_, Result<(), LedgerError>> {
        self.inner.release_export(holder)
    }
}

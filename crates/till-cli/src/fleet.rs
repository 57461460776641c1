//! Fleet mode: the FoundationDB ledger (cargo feature `fdb`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, Result};
use till_ledger::{Ledger, RetentionStore};
use till_ledger_fdb::{FdbConfig, FdbLedger, FdbNetwork};
use till_receipt::ReceiptSigner;

/// The client network, started on first use and stopped by [`shutdown`] at the end of
/// `main` (after every ledger and runtime is gone).
static NETWORK: Mutex<Option<FdbNetwork>> = Mutex::new(None);

fn ensure_booted() -> Result<()> {
    let mut network = NETWORK
        .lock()
        .map_err(|_| anyhow::anyhow!("FoundationDB boot lock poisoned"))?;
    if network.is_none() && !till_ledger_fdb::is_booted() {
        *network = Some(till_ledger_fdb::boot().context("starting the FoundationDB client")?);
    }
    Ok(())
}

/// Stops the FoundationDB client network if it was started.
pub fn shutdown() {
    if let Ok(mut network) = NETWORK.lock() {
        network.take();
    }
}

/// Opens the FoundationDB ledger in `keyspace`, as the ledger and as a retention store
/// (export and prune; the same object). `cluster_file` `None` uses the client's default
/// (`$FDB_CLUSTER_FILE`, then `/etc/foundationdb/fdb.cluster`).
pub async fn open_fdb_with_retention(
    signer: Arc<ReceiptSigner>,
    cluster_file: Option<PathBuf>,
    keyspace: &str,
    proxy_id: &str,
    alerts: till_ledger::AlertPolicy,
) -> Result<(Arc<dyn Ledger>, Arc<dyn RetentionStore>)> {
    let ledger = open_fdb(signer, cluster_file, keyspace, proxy_id, alerts).await?;
    Ok((Arc::clone(&ledger) as Arc<dyn Ledger>, ledger))
}

async fn open_fdb(
    signer: Arc<ReceiptSigner>,
    cluster_file: Option<PathBuf>,
    keyspace: &str,
    proxy_id: &str,
    alerts: till_ledger::AlertPolicy,
) -> Result<Arc<FdbLedger>> {
    ensure_booted()?;
    let mut config = FdbConfig::new(signer, proxy_id).with_keyspace(keyspace);
    config.alerts = alerts;
    if let Some(p) = cluster_file {
        config = config.with_cluster_file(p);
    }
    let ledger = FdbLedger::open(config)
        .await
        .context("opening the FoundationDB ledger")?;
    Ok(Arc::new(ledger))
}

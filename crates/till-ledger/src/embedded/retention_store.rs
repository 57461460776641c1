//! The embedded backend's part of export and prune ([`crate::retention`]): what is
//! stored, and the prune of exported ranges through the writer (ordered with claims).

use std::sync::Arc;

use redb::ReadableTable;
use till_receipt::ReceiptSigner;

use super::{
    first_stored_seq, unavailable, AdminAnswer, AdminOp, EmbeddedLedger, CHAIN_HEADS, RECEIPTS,
};
use crate::retention::{PruneRange, Pruned, RetentionStore, StoredRange};
use crate::{BoxFuture, Ledger, LedgerError};

/// Receipts per prune transaction (and per range): bounds how long one prune holds the
/// writer (claims wait meanwhile) and what one export holds in memory.
pub const EMBEDDED_PRUNE_CHUNK: u64 = 10_000;

impl RetentionStore for EmbeddedLedger {
    fn retention_signer(&self) -> Arc<ReceiptSigner> {
        self.signers.current()
    }

    fn retention_ledger_id(&self) -> Option<String> {
        self.ledger_id.clone()
    }

    fn prune_chunk(&self) -> u64 {
        EMBEDDED_PRUNE_CHUNK
    }

    fn stored_ranges(&self) -> BoxFuture<'_, Result<Vec<StoredRange>, LedgerError>> {
        Box::pin(self.read(|db| {
            let txn = db.begin_read().map_err(unavailable)?;
            let heads = txn.open_table(CHAIN_HEADS).map_err(unavailable)?;
            let receipts = txn.open_table(RECEIPTS).map_err(unavailable)?;
            let mut out = Vec::new();
            for entry in heads.iter().map_err(unavailable)? {
                let (family, head) = entry.map_err(unavailable)?;
                let (family, head) = (family.value(), head.value().0);
                let first = first_stored_seq(&receipts, family).map_err(unavailable)?;
                if let Some(first) = first {
                    out.push(StoredRange {
                        family: family.to_vec(),
                        first,
                        head,
                    });
                }
            }
            Ok(out)
        }))
    }

    fn as_ledger(&self) -> &dyn Ledger {
        self
    }

    fn prune(&self, ranges: Vec<PruneRange>) -> BoxFuture<'_, Result<Pruned, LedgerError>> {
        Box::pin(async move {
            if ranges.is_empty() {
                return Ok(Pruned::default());
            }
            match self.admin(AdminOp::Prune { ranges }).await? {
                AdminAnswer::Pruned {
                    receipts,
                    idempotency,
                } => Ok(Pruned {
                    receipts,
                    idempotency,
                }),
                _ => Err(LedgerError::Unavailable("internal mismatch".into())),
            }
        })
    }
}

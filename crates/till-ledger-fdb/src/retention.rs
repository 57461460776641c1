//! Export and prune on FoundationDB: the backend's part of [`till_ledger::retention`]
//! (normative: spec/ledger.md §10 and spec/ledger-fdb.md §1, "Retention").
//!
//! The procedure (plan, read and check the chain, append to the export files, sign the
//! checkpoints) is [`till_ledger::retention::export_and_prune`]; this module lists what is
//! stored and prunes exported ranges, each call ONE transaction of at most
//! [`FDB_PRUNE_CHUNK`] receipts (well inside FoundationDB's 5 s and 10 MB limits):
//!
//! - it reads the range's receipts `(ks, "receipt", family, from..=to)` (and nothing
//!   past `to`, so it never conflicts with claims, which only append at the head) and
//!   checks they are exactly what was exported: the first stored receipt is `from`, all
//!   of `from..=to` are there, the receipt at `to` has the checkpoint's `head`;
//! - it clears them (one range clear), their `slot` entries, and each idempotency record
//!   that still points at one of them (the record's key is computed from the receipt:
//!   scope = its last slot's revocation id, key = its `idempotency_key`; a record
//!   overwritten since by a fresh claim points elsewhere and stays);
//! - it stores the checkpoint under `(ks, "checkpoint", family, to)`.
//!
//! The export lease (`(ks, "exporter")`, [`RetentionStore::lease_export`]) keeps one
//! exporter per key space: one small transaction to take or renew it, one to give it back.
//!
//! A retry after `commit_unknown_result` first reads the checkpoint key: finding the very
//! checkpoint it wrote, the earlier attempt committed, and it answers as that attempt
//! would have. Counters, revocations, chain heads, blocks and windows are never touched.
//! At the end of every run that pruned, [`RetentionStore::sweep`] clears the journal's
//! pointers to pruned receipts (a consumer finds those receipts in the export files), so the journal
//! stays as bounded as the receipts.

use std::collections::HashMap;
use std::sync::Arc;

use futures::future::try_join_all;
use till_ledger::retention::{
    Checkpoint, ExportLease, PruneRange, Pruned, RetentionStore, StoredRange,
};
use till_ledger::{BoxFuture, Ledger, LedgerError, Receipt};
use till_receipt::ReceiptSigner;

use crate::engine::{unavailable, KvLedger, Work};
use crate::error::KvError;
use crate::keys::{self, Keyspace, ReceiptRef};
use crate::kv::{KvStore, KvTxn};

/// Receipts pruned per transaction (and per checkpoint). A transaction of this many
/// two-level receipts reads about 0.7 MB and clears about 2,000 keys.
pub const FDB_PRUNE_CHUNK: u64 = 500;

/// Keys read per page of a listing (one read-only transaction each).
const PAGE: usize = 1_000;

impl<S: KvStore> RetentionStore for KvLedger<S> {
    fn retention_signer(&self) -> Arc<ReceiptSigner> {
        self.signer()
    }

    fn retention_ledger_id(&self) -> Option<String> {
        self.ledger_id().map(str::to_owned)
    }

    fn prune_chunk(&self) -> u64 {
        FDB_PRUNE_CHUNK
    }

    fn stored_ranges(&self) -> BoxFuture<'_, Result<Vec<StoredRange>, LedgerError>> {
        Box::pin(async move {
            let keys = self.keyspace();
            let (mut begin, end) = keys.heads_range();
            let mut out = Vec::new();
            loop {
                let mut work = HeadsPage {
                    keys,
                    begin: begin.clone(),
                    end: end.clone(),
                };
                let (page, next) = self.transact(&mut work).await.map_err(unavailable)?;
                out.extend(page);
                match next {
                    Some(next) => begin = next,
                    None => return Ok(out),
                }
            }
        })
    }

    fn as_ledger(&self) -> &dyn Ledger {
        self
    }

    fn prune(&self, ranges: Vec<PruneRange>) -> BoxFuture<'_, Result<Pruned, LedgerError>> {
        Box::pin(async move {
            if ranges.is_empty() {
                return Ok(Pruned::default());
            }
            let mut work = PruneWork {
                keys: self.keyspace(),
                ranges: &ranges,
                maybe_landed: None,
                attempted: None,
            };
            self.transact(&mut work)
                .await
                .map_err(unavailable)?
                .map_err(LedgerError::InvalidRequest)
        })
    }

    fn sweep(&self) -> BoxFuture<'_, Result<u64, LedgerError>> {
        Box::pin(async move { self.sweep_journal().await })
    }

    fn lease_export(
        &self,
        lease: &ExportLease,
        now: u64,
    ) -> BoxFuture<'_, Result<(), LedgerError>> {
        let lease = lease.clone();
        Box::pin(async move {
            let mut work = LeaseWork {
                key: self.keyspace().exporter(),
                lease,
                now,
            };
            match self.transact(&mut work).await.map_err(unavailable)? {
                None => Ok(()),
                Some((holder, dir, until)) => Err(LedgerError::ExportLeased { holder, dir, until }),
            }
        })
    }

    fn release_export(&self, holder: &str) -> BoxFuture<'_, Result<(), LedgerError>> {
        let holder = holder.to_owned();
        Box::pin(async move {
            let mut work = ReleaseWork {
                key: self.keyspace().exporter(),
                holder,
            };
            self.transact(&mut work).await.map_err(unavailable)
        })
    }
}

/// Takes or renews the export lease: answers the other holder's lease instead when one
/// is held and has not lapsed (then nothing is written). Retry-safe: a retry after an
/// unknown commit result reads its own lease and writes it again.
struct LeaseWork {
    key: Vec<u8>,
    lease: ExportLease,
    now: u64,
}

impl<T: KvTxn> Work<T> for LeaseWork {
    type Output = Option<(String, String, u64)>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        if let Some(bytes) = txn.get(&self.key).await? {
            let held = keys::decode_exporter(&bytes)?;
            if held.0 != self.lease.holder && held.2 > self.now {
                return Ok((Some(held), false));
            }
        }
        let lease = &self.lease;
        txn.set(
            &self.key,
            &keys::encode_exporter(&lease.holder, &lease.dir, lease.until),
        );
        Ok((None, true))
    }
}

/// Clears the export lease if `holder` holds it.
struct ReleaseWork {
    key: Vec<u8>,
    holder: String,
}

impl<T: KvTxn> Work<T> for ReleaseWork {
    type Output = ();

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        let Some(bytes) = txn.get(&self.key).await? else {
            return Ok(((), false));
        };
        if keys::decode_exporter(&bytes)?.0 != self.holder {
            return Ok(((), false));
        }
        txn.clear(&self.key);
        Ok(((), true))
    }
}

impl<S: KvStore> KvLedger<S> {
    /// Clears the journal entries whose receipt is pruned ([`RetentionStore::sweep`]).
    /// Pages of the journal are read in read-only transactions and their pruned entries
    /// cleared by a blind write (no reads, so it never conflicts with claims appending
    /// to the journal): whether an entry's receipt is pruned cannot change back, so the
    /// decision needs no re-check. An entry is pruned when its seq is below its family's
    /// first stored receipt; for a family with no receipt listed (all pruned, or first
    /// claimed after the list was read) the receipt's key is read. Entries that are not
    /// a pointer (schema 1 kept a copy of the receipt) are left alone. Cost: one pass
    /// over the journal, i.e. over the receipts still stored, per pruning run.
    pub(crate) async fn sweep_journal(&self) -> Result<u64, LedgerError> {
        let floors: HashMap<Vec<u8>, u64> = self
            .stored_ranges()
            .await?
            .into_iter()
            .map(|range| (range.family, range.first))
            .collect();
        let keys = self.keyspace();
        let (mut begin, end) = keys.journal_range();
        let mut removed = 0;
        loop {
            let mut page = JournalPage {
                keys,
                floors: &floors,
                begin: begin.clone(),
                end: end.clone(),
            };
            let (pruned, next) = self.transact(&mut page).await.map_err(unavailable)?;
            if !pruned.is_empty() {
                removed += pruned.len() as u64;
                let mut clear = ClearKeys(pruned);
                self.transact(&mut clear).await.map_err(unavailable)?;
            }
            match next {
                Some(next) => begin = next,
                None => return Ok(removed),
            }
        }
    }

    /// A family's checkpoints, in `seq` order ([`Ledger::checkpoints`]).
    pub(crate) async fn family_checkpoints(
        &self,
        family: &[u8],
    ) -> Result<Vec<Checkpoint>, LedgerError> {
        let (begin, end) = self.keyspace().checkpoints_of(family);
        self.checkpoints_in(begin, end).await
    }

    /// The checkpoints stored in `[begin, end)`, in key order, a page per transaction.
    async fn checkpoints_in(
        &self,
        mut begin: Vec<u8>,
        end: Vec<u8>,
    ) -> Result<Vec<Checkpoint>, LedgerError> {
        let mut out = Vec::new();
        loop {
            let mut work = Page {
                begin: begin.clone(),
                end: end.clone(),
            };
            let pairs = self.transact(&mut work).await.map_err(unavailable)?;
            let full = pairs.len() == PAGE;
            if let Some((last, _)) = pairs.last() {
                begin = key_after(last);
            }
            for (_, value) in pairs {
                let line = std::str::from_utf8(&value).map_err(|e| {
                    LedgerError::Corrupt(format!("stored checkpoint is not UTF-8: {e}"))
                })?;
                out.push(Checkpoint::parse(line).map_err(LedgerError::Corrupt)?);
            }
            if !full {
                return Ok(out);
            }
        }
    }
}

/// The first key after `key`.
fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = key.to_vec();
    next.push(0);
    next
}

/// One page of `[begin, end)`, read-only.
struct Page {
    begin: Vec<u8>,
    end: Vec<u8>,
}

impl<T: KvTxn> Work<T> for Page {
    type Output = Vec<(Vec<u8>, Vec<u8>)>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        Ok((txn.get_range(&self.begin, &self.end, PAGE).await?, false))
    }
}

/// One page of the journal, read-only: the keys of its entries whose receipt is pruned,
/// and where the next page starts (`None`: done).
struct JournalPage<'a> {
    keys: &'a Keyspace,
    /// Each family's first stored receipt.
    floors: &'a HashMap<Vec<u8>, u64>,
    begin: Vec<u8>,
    end: Vec<u8>,
}

impl<T: KvTxn> Work<T> for JournalPage<'_> {
    type Output = (Vec<Vec<u8>>, Option<Vec<u8>>);

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        let (keys, floors) = (self.keys, self.floors);
        let pairs = txn.get_range(&self.begin, &self.end, PAGE).await?;
        let next = (pairs.len() == PAGE)
            .then(|| pairs.last().map(|(k, _)| key_after(k)))
            .flatten();
        let reader: &T = txn;
        let pruned = try_join_all(pairs.iter().map(|(_, value)| async move {
            let Ok((family, seq)) = keys::decode_receipt_ref(value) else {
                return Ok::<bool, KvError>(false);
            };
            Ok(match floors.get(&family) {
                Some(first) => seq < *first,
                None => reader.get(&keys.receipt(&family, seq)).await?.is_none(),
            })
        }))
        .await?;
        let pruned = pairs
            .into_iter()
            .zip(pruned)
            .filter_map(|((key, _), pruned)| pruned.then_some(key))
            .collect();
        Ok(((pruned, next), false))
    }
}

/// Clears the given keys: a blind write, safe to retry.
struct ClearKeys(Vec<Vec<u8>>);

impl<T: KvTxn> Work<T> for ClearKeys {
    type Output = ();

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        for key in &self.0 {
            txn.clear(key);
        }
        Ok(((), true))
    }
}

/// One page of chain heads with each family's first stored receipt; read-only. Answers
/// the families that have receipts, and where the next page starts (`None`: done).
struct HeadsPage<'k> {
    keys: &'k Keyspace,
    begin: Vec<u8>,
    end: Vec<u8>,
}

impl<T: KvTxn> Work<T> for HeadsPage<'_> {
    type Output = (Vec<StoredRange>, Option<Vec<u8>>);

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        let keys = self.keys;
        let pairs = txn.get_range(&self.begin, &self.end, PAGE).await?;
        let next = (pairs.len() == PAGE)
            .then(|| pairs.last().map(|(k, _)| key_after(k)))
            .flatten();
        let heads = pairs
            .iter()
            .map(|(k, v)| Ok((keys.head_family(k)?, keys::decode_head(v)?.seq)))
            .collect::<Result<Vec<_>, KvError>>()?;
        let reader: &T = txn;
        let firsts = try_join_all(heads.iter().map(|(family, _)| async move {
            let (begin, end) = keys.receipts_from(family, 0);
            let first = reader.get_range(&begin, &end, 1).await?;
            first.first().map(|(k, _)| keys.receipt_seq(k)).transpose()
        }))
        .await?;
        let ranges = heads
            .into_iter()
            .zip(firsts)
            .filter_map(|((family, head), first)| {
                first.map(|first| StoredRange {
                    family,
                    first,
                    head,
                })
            })
            .collect();
        Ok(((ranges, next), false))
    }
}

/// The prune of exported ranges, one transaction (see the module docs). Answers
/// `Err(reason)` (nothing written) when a range is no longer what was exported.
struct PruneWork<'r> {
    keys: &'r Keyspace,
    ranges: &'r [PruneRange],
    /// What the last attempt that reached its commit would have answered.
    attempted: Option<Pruned>,
    /// Set when that commit's result was unknown: it may have landed.
    maybe_landed: Option<Pruned>,
}

impl<T: KvTxn> Work<T> for PruneWork<'_> {
    type Output = Result<Pruned, String>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        let keys = self.keys;
        let reader: &T = txn;
        // An earlier attempt whose commit result was unknown landed iff its checkpoints
        // are there (the checkpoints and the deletions commit together).
        let stored = try_join_all(
            self.ranges
                .iter()
                .map(|r| async move { reader.get(&keys.checkpoint(&r.family, r.to_seq)).await }),
        )
        .await?;
        let ours = |(r, s): (&PruneRange, &Option<Vec<u8>>)| {
            s.as_deref() == Some(r.checkpoint.to_line().as_bytes())
        };
        if let Some(landed) = self.maybe_landed {
            if self.ranges.iter().zip(&stored).all(ours) {
                return Ok((Ok(landed), false));
            }
        }
        if let Some((r, _)) = self.ranges.iter().zip(&stored).find(|(_, s)| s.is_some()) {
            return Ok((
                Err(format!(
                    "family {}: a checkpoint ending at receipt {} is already stored \
                     (another export pruned the range); nothing pruned",
                    hex::encode(&r.family),
                    r.to_seq
                )),
                false,
            ));
        }
        let mut pruned = Pruned::default();
        for r in self.ranges {
            match prune_range(txn, keys, r).await? {
                Ok(p) => {
                    pruned.receipts += p.receipts;
                    pruned.idempotency += p.idempotency;
                }
                Err(reason) => return Ok((Err(reason), false)),
            }
        }
        self.attempted = Some(pruned);
        Ok((Ok(pruned), true))
    }

    fn maybe_committed(&mut self) {
        self.maybe_landed = self.attempted;
    }
}

/// Checks one range and buffers its deletions and its checkpoint.
async fn prune_range<T: KvTxn>(
    txn: &mut T,
    keys: &Keyspace,
    r: &PruneRange,
) -> Result<Result<Pruned, String>, KvError> {
    let family = r.family.as_slice();
    let family_hex = hex::encode(family);
    let refused = |why: &str| {
        Ok(Err(format!(
            "family {family_hex}: receipts {}..={} are no longer what was exported ({why}); \
             nothing pruned",
            r.from_seq, r.to_seq
        )))
    };
    let Some(count) = r
        .to_seq
        .checked_sub(r.from_seq)
        .and_then(|d| usize::try_from(d + 1).ok())
    else {
        return refused("an empty range");
    };
    // Everything up to `to` (never past it: claims append there).
    let (begin, _) = keys.receipts_from(family, 0);
    let end = keys.receipt(family, r.to_seq + 1);
    let stored = txn.get_range(&begin, &end, count + 1).await?;
    let first = stored
        .first()
        .map(|(k, _)| keys.receipt_seq(k))
        .transpose()?;
    if first != Some(r.from_seq) || stored.len() != count {
        return refused("its first receipt or its count changed");
    }
    let mut receipts = Vec::with_capacity(count);
    for (key, value) in &stored {
        let seq = keys.receipt_seq(key)?;
        let receipt = std::str::from_utf8(value)
            .ok()
            .and_then(|text| Receipt::parse(text).ok())
            .ok_or_else(|| KvError::Decode(format!("stored receipt {seq} is unreadable")))?;
        receipts.push(receipt);
    }
    if receipts.last().map(Receipt::hash_hex).as_deref() != Some(r.checkpoint.body.head.as_str()) {
        return refused("its last receipt is another");
    }
    // The idempotency record each receipt's claim wrote, if it still points at it.
    let mut idem_keys = Vec::with_capacity(count);
    for receipt in &receipts {
        let body = receipt.body();
        let scope = body
            .slots
            .last()
            .and_then(|s| hex::decode(&s.revocation_id).ok())
            .ok_or_else(|| KvError::Decode(format!("receipt {} has no slots", body.seq)))?;
        idem_keys.push(keys.idempotency(&scope, &body.idempotency_key));
    }
    let records = try_join_all(idem_keys.iter().map(|k| txn.get(k))).await?;
    let mut idempotency = 0;
    for ((receipt, key), record) in receipts.iter().zip(&idem_keys).zip(records) {
        let Some(bytes) = record else { continue };
        let body = receipt.body();
        let points_here = match keys::IdemRecord::decode(&bytes)?.receipt {
            ReceiptRef::At { family: f, seq } => f == family && seq == body.seq,
            ReceiptRef::Inline(jws) => Receipt::parse(&jws).is_ok_and(|inline| {
                inline.body().family == family_hex && inline.body().seq == body.seq
            }),
        };
        if points_here {
            txn.clear(key);
            idempotency += 1;
        }
    }
    // Slot index entries that still name a receipt of the range. A slot given back by a
    // void and taken again by a later claim names that claim: it stays.
    let mut slot_keys = Vec::new();
    for receipt in &receipts {
        for slot in &receipt.body().slots {
            if let Ok(rid) = hex::decode(&slot.revocation_id) {
                slot_keys.push(keys.slot(&rid, slot.slot));
            }
        }
    }
    slot_keys.sort();
    slot_keys.dedup();
    let owners = try_join_all(slot_keys.iter().map(|k| txn.get(k))).await?;
    for (key, owner) in slot_keys.iter().zip(owners) {
        let Some(bytes) = owner else { continue };
        let (f, seq) = keys::decode_receipt_ref(&bytes)?;
        if f == family && (r.from_seq..=r.to_seq).contains(&seq) {
            txn.clear(key);
        }
    }
    // Void markers of pruned claims go with them (a void of a pruned claim is refused as
    // unknown; the void receipts themselves are in the export). The family's void count
    // stays: the chain head is still at count + 2 × voids.
    txn.clear_range(
        &keys.voided(family, r.from_seq),
        &keys.voided(family, r.to_seq + 1),
    );
    txn.clear_range(&begin, &end);
    txn.set(
        &keys.checkpoint(family, r.to_seq),
        r.checkpoint.to_line().as_bytes(),
    );
    Ok(Ok(Pruned {
        receipts: count as u64,
        idempotency,
    }))
}

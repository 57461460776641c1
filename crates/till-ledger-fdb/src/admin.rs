//! The admin plane's transactions: revocation (with its alert), key records, the family
//! read models, and the alert outbox (list, lease, settle). Claims are in
//! [`crate::engine`]; the layout is in [`crate::keys`] and `spec/ledger-fdb.md`.
//!
//! The read models compute exactly what the embedded backend's do (same fields, same
//! sources: block records, counters, revocations, chain head, first receipt, per-minute
//! activity), in one read-only transaction (never committed, so they conflict with
//! nothing).

use futures::future::{try_join, try_join_all};
use till_ledger::alert::{self, DeliveryStatus};
use till_ledger::family::{self, Activity, BlockRecord, BlockView, FamilyDetail, FamilyView};
use till_ledger::{AlertOutcome, AlertRecord, KeyBlocks, LedgerError, Receipt, Revoked};

use crate::engine::{Shared, Work};
use crate::error::KvError;
use crate::keys::{self, Keyspace};
use crate::kv::KvTxn;

/// Most keys one range read of the admin plane returns (families, a family's blocks,
/// alerts, the outbox). A key space past this is listed truncated, never an error.
pub const SCAN_LIMIT: usize = 100_000;

/// How many alert records the lease transaction reads at once.
const LEASE_CHUNK: usize = 64;

fn decode_block(bytes: &[u8]) -> Result<BlockRecord, KvError> {
    serde_json::from_slice(bytes).map_err(|e| KvError::Decode(format!("block record: {e}")))
}

fn decode_alert(bytes: &[u8]) -> Result<AlertRecord, KvError> {
    serde_json::from_slice(bytes).map_err(|e| KvError::Decode(format!("alert record: {e}")))
}

fn u64_of(value: Option<Vec<u8>>) -> Result<Option<u64>, KvError> {
    value.as_deref().map(keys::decode_u64).transpose()
}

// ---------------------------------------------------------------------------------------
// Revocation

/// `revoke`: reads then sets `(ks, "revoked", rid)`; on the first revocation also writes
/// the revocation alert (unless its id exists) and its outbox entry.
pub(crate) struct RevokeWork<'s> {
    shared: &'s Shared,
    rid: Vec<u8>,
    at: u64,
    /// What the last committing attempt answered, and whether its commit result was
    /// unknown (see [`Work::maybe_committed`]).
    attempted: Option<Revoked>,
    unknown: bool,
}

impl<'s> RevokeWork<'s> {
    pub(crate) fn new(shared: &'s Shared, rid: Vec<u8>, at: u64) -> Self {
        Self {
            shared,
            rid,
            at,
            attempted: None,
            unknown: false,
        }
    }
}

impl<T: KvTxn> Work<T> for RevokeWork<'_> {
    type Output = Revoked;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Revoked, bool), KvError> {
        let keys = &self.shared.keys;
        let revoked_key = keys.revoked(&self.rid);
        let (revoked, block) =
            try_join(txn.get(&revoked_key), txn.get(&keys.block(&self.rid))).await?;
        let record: Option<BlockRecord> = block.as_deref().and_then(|b| decode_block(b).ok());
        let family = record.as_ref().map(|r| r.family.clone());
        if let Some(at) = u64_of(revoked)? {
            // An earlier attempt whose commit result was unknown landed after all: it is
            // the first revocation (same time, written by us); answer as it did.
            if let (true, Some(mine)) = (self.unknown && at == self.at, self.attempted.take()) {
                return Ok((mine, false));
            }
            let answer = Revoked {
                newly: false,
                family,
                alert: None,
            };
            return Ok((answer, false));
        }
        txn.set(&revoked_key, &keys::encode_u64(self.at));
        let label = match &record {
            Some(r) => {
                let root = hex::decode(&r.family).unwrap_or_default();
                txn.get(&keys.block(&root))
                    .await?
                    .and_then(|b| decode_block(&b).ok())
                    .and_then(|root| root.caveats.label)
            }
            None => None,
        };
        let mut alert = alert::revocation_alert(
            &self.shared.alerts,
            &self.rid,
            family.clone(),
            record.as_ref().map(|r| r.index),
            label,
            self.at,
        );
        if let Some(a) = &alert {
            let key = keys.alert(&a.id);
            if txn.get(&key).await?.is_some() {
                alert = None;
            } else {
                txn.set(&key, &a.to_bytes());
                txn.set(&keys.outbox(&a.id), &keys::encode_u64(a.at));
            }
        }
        let answer = Revoked {
            newly: true,
            family,
            alert,
        };
        self.attempted = Some(answer.clone());
        self.unknown = false;
        Ok((answer, true))
    }

    fn maybe_committed(&mut self) {
        self.unknown = true;
    }
}

// ---------------------------------------------------------------------------------------
// Key records

/// `record_key`: records every block not yet known (minted), marks known ones minted.
pub(crate) struct RecordWork<'k> {
    pub(crate) keys: &'k Keyspace,
    pub(crate) key: KeyBlocks,
    pub(crate) at: u64,
}

impl<T: KvTxn> Work<T> for RecordWork<'_> {
    type Output = ();

    async fn attempt(&mut self, txn: &mut T) -> Result<((), bool), KvError> {
        let keys = self.keys;
        let Some((family, _)) = self.key.blocks.first() else {
            return Ok(((), false));
        };
        let family_key = keys.family(family);
        let txn_ref: &T = txn;
        let (existing, known_family) = try_join(
            try_join_all(
                self.key
                    .blocks
                    .iter()
                    .map(|(id, _)| txn_ref.get_owned(keys.block(id))),
            ),
            txn_ref.get(&family_key),
        )
        .await?;
        let mut wrote = false;
        for ((record, (id, _)), existing) in self
            .key
            .records(self.at, true)
            .into_iter()
            .zip(&self.key.blocks)
            .zip(existing)
        {
            let bytes = match existing {
                None => Some(serde_json::to_vec(&record).unwrap_or_default()),
                Some(bytes) => match decode_block(&bytes) {
                    Ok(mut old) if !old.minted => {
                        old.minted = true;
                        Some(serde_json::to_vec(&old).unwrap_or_default())
                    }
                    _ => None,
                },
            };
            if let Some(bytes) = bytes {
                txn.set(&keys.block(id), &bytes);
                txn.set(&keys.family_block(family, id), &[]);
                wrote = true;
            }
        }
        if known_family.is_none() {
            txn.set(&family_key, &keys::encode_u64(self.at));
            wrote = true;
        }
        Ok(((), wrote))
    }
}

/// `get` with an owned key, for `try_join_all` over computed keys.
trait GetOwned: KvTxn {
    fn get_owned(
        &self,
        key: Vec<u8>,
    ) -> impl std::future::Future<Output = Result<Option<Vec<u8>>, KvError>> + Send {
        async move { self.get(&key).await }
    }
}

impl<T: KvTxn> GetOwned for T {}

// ---------------------------------------------------------------------------------------
// Read models

async fn block_view<T: KvTxn>(
    txn: &T,
    keys: &Keyspace,
    rid: &[u8],
    record: BlockRecord,
) -> Result<BlockView, KvError> {
    let (count, revoked) = try_join(txn.get(&keys.count(rid)), txn.get(&keys.revoked(rid))).await?;
    let used = u64_of(count)?.unwrap_or(0);
    let revoked_at = u64_of(revoked)?;
    Ok(BlockView {
        remaining: family::remaining_of(record.caveats.cap, used),
        record,
        used,
        revoked: revoked_at.is_some(),
        revoked_at,
    })
}

async fn receipt_time<T: KvTxn>(
    txn: &T,
    keys: &Keyspace,
    family: &[u8],
    seq: u64,
) -> Result<Option<u64>, KvError> {
    let Some(bytes) = txn.get(&keys.receipt(family, seq)).await? else {
        return Ok(None);
    };
    receipt_iat(&bytes).map(Some)
}

fn receipt_iat(bytes: &[u8]) -> Result<u64, KvError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| KvError::Decode(format!("stored receipt is not UTF-8: {e}")))?;
    let receipt = Receipt::parse(text)
        .map_err(|e| KvError::Decode(format!("stored receipt is unreadable: {e}")))?;
    Ok(receipt.body().iat)
}

/// One family's summary: the same fields and sources as the embedded backend's
/// `ReadTables::family_view`.
async fn family_view<T: KvTxn>(
    txn: &T,
    keys: &Keyspace,
    family: &[u8],
    recorded_at: u64,
    now: u64,
) -> Result<FamilyView, KvError> {
    let current = now / 60;
    let (first_begin, first_end) = keys.receipts_from(family, 1);
    let (act_begin, act_end) = keys.activity_range(
        family,
        current.saturating_sub(61),
        current.saturating_add(1),
    );
    let (fb_begin, fb_end) = keys.family_blocks_range(family);
    let (((root, count), (revoked, head)), ((first, activity), blocks)) = try_join(
        try_join(
            try_join(txn.get(&keys.block(family)), txn.get(&keys.count(family))),
            try_join(txn.get(&keys.revoked(family)), txn.get(&keys.head(family))),
        ),
        try_join(
            try_join(
                txn.get_range(&first_begin, &first_end, 1),
                txn.get_range(&act_begin, &act_end, SCAN_LIMIT),
            ),
            txn.get_range(&fb_begin, &fb_end, SCAN_LIMIT),
        ),
    )
    .await?;
    let root: Option<BlockRecord> = root.as_deref().map(decode_block).transpose()?;
    let used = u64_of(count)?.unwrap_or(0);
    let head_seq = head
        .as_deref()
        .map(keys::decode_head)
        .transpose()?
        .map(|head| head.seq);
    let first_activation = match first.first() {
        Some((_, bytes)) => Some(receipt_iat(bytes)?),
        None => None,
    };
    let last_activation = match head_seq {
        Some(seq) => receipt_time(txn, keys, family, seq).await?,
        None => None,
    };
    let buckets = activity
        .iter()
        .map(|(k, v)| Ok((keys.activity_minute(k)?, keys::decode_u64(v)?)))
        .collect::<Result<Vec<_>, KvError>>()?;
    let minted = root.as_ref().is_some_and(|r| r.minted);
    let caveats = root.map(|r| r.caveats).unwrap_or_default();
    Ok(FamilyView {
        family: hex::encode(family),
        label: caveats.label.clone(),
        upstream: caveats.upstream.clone(),
        cap: caveats.cap,
        used,
        remaining: family::remaining_of(caveats.cap, used),
        revoked: revoked.is_some(),
        expires: caveats.expires,
        recorded_at,
        minted,
        first_activation,
        last_activation,
        blocks: blocks.len() as u64,
        activity: Activity::from_buckets(now, &buckets),
    })
}

/// `families`: every `(ks, "family", _)` in key order (= family id order, as embedded).
pub(crate) struct FamiliesWork<'k> {
    pub(crate) keys: &'k Keyspace,
    pub(crate) now: u64,
}

impl<T: KvTxn> Work<T> for FamiliesWork<'_> {
    type Output = Vec<FamilyView>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Vec<FamilyView>, bool), KvError> {
        let (keys, now) = (self.keys, self.now);
        let txn: &T = txn;
        let (begin, end) = keys.families_range();
        let listed = txn.get_range(&begin, &end, SCAN_LIMIT).await?;
        let families = listed
            .iter()
            .map(|(k, v)| Ok((keys.family_id(k)?, keys::decode_u64(v)?)))
            .collect::<Result<Vec<_>, KvError>>()?;
        let views = try_join_all(
            families
                .iter()
                .map(|(family, at)| family_view(txn, keys, family, *at, now)),
        )
        .await?;
        Ok((views, false))
    }
}

/// `family`: one family with every block it has recorded, in (index, rid) order.
pub(crate) struct FamilyWork<'k> {
    pub(crate) keys: &'k Keyspace,
    pub(crate) family: Vec<u8>,
    pub(crate) now: u64,
}

impl<T: KvTxn> Work<T> for FamilyWork<'_> {
    type Output = Option<FamilyDetail>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        let (keys, family) = (self.keys, self.family.as_slice());
        let txn: &T = txn;
        let Some(recorded_at) = u64_of(txn.get(&keys.family(family)).await?)? else {
            return Ok((None, false));
        };
        let view = family_view(txn, keys, family, recorded_at, self.now).await?;
        let (begin, end) = keys.family_blocks_range(family);
        let rids = txn
            .get_range(&begin, &end, SCAN_LIMIT)
            .await?
            .iter()
            .map(|(k, _)| keys.family_block_rid(k))
            .collect::<Result<Vec<_>, KvError>>()?;
        let blocks = try_join_all(rids.iter().map(|rid| async move {
            match txn.get(&keys.block(rid)).await? {
                None => Ok(None),
                Some(bytes) => {
                    let record: BlockRecord = decode_block(&bytes)?;
                    block_view(txn, keys, rid, record).await.map(Some)
                }
            }
        }))
        .await?;
        let mut blocks: Vec<BlockView> = blocks.into_iter().flatten().collect();
        blocks.sort_by(|a, b| {
            (a.record.index, &a.record.revocation_id)
                .cmp(&(b.record.index, &b.record.revocation_id))
        });
        Ok((
            Some(FamilyDetail {
                family: view,
                blocks,
            }),
            false,
        ))
    }
}

// ---------------------------------------------------------------------------------------
// Alerts

/// `alerts`: every alert, newest first (then by id, descending, as embedded).
pub(crate) struct AlertsWork<'k> {
    pub(crate) keys: &'k Keyspace,
    pub(crate) limit: usize,
}

impl<T: KvTxn> Work<T> for AlertsWork<'_> {
    type Output = Vec<AlertRecord>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Vec<AlertRecord>, bool), KvError> {
        let (begin, end) = self.keys.alerts_range();
        let mut out = txn
            .get_range(&begin, &end, SCAN_LIMIT)
            .await?
            .iter()
            .map(|(_, v)| decode_alert(v))
            .collect::<Result<Vec<_>, KvError>>()?;
        out.sort_by(|a, b| (b.at, &b.id).cmp(&(a.at, &a.id)));
        out.truncate(self.limit);
        Ok((out, false))
    }
}

/// `lease_alerts`: in ONE transaction, walks the outbox in id order and leases up to
/// `limit` due alerts. Two proxies leasing at once both read the leased alert keys and
/// write them, so the later commit conflicts (1020), re-reads and finds them leased: an
/// alert is never leased to two deliverers at once.
pub(crate) struct LeaseWork<'k> {
    keys: &'k Keyspace,
    now: u64,
    lease: u64,
    limit: usize,
    /// Written to `(ks, "lease", id)` with every alert this operation leases: after a
    /// commit whose result is unknown, the retry recognises the alerts its earlier attempt
    /// leased (the token is there) and returns them, rather than nothing.
    token: String,
    /// A commit of this operation failed with a `maybe_committed` error.
    unknown: bool,
}

impl<'k> LeaseWork<'k> {
    pub(crate) fn new(keys: &'k Keyspace, now: u64, lease: u64, limit: usize) -> Self {
        Self {
            keys,
            now,
            lease,
            limit,
            token: format!("{:032x}", rand::random::<u128>()),
            unknown: false,
        }
    }
}

impl<T: KvTxn> Work<T> for LeaseWork<'_> {
    type Output = Vec<AlertRecord>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Vec<AlertRecord>, bool), KvError> {
        let keys = self.keys;
        let (begin, end) = keys.outbox_range();
        let ids = txn
            .get_range(&begin, &end, SCAN_LIMIT)
            .await?
            .iter()
            .map(|(k, _)| keys.outbox_id(k))
            .collect::<Result<Vec<_>, KvError>>()?;
        let mut leased = Vec::new();
        let mut wrote = false;
        for chunk in ids.chunks(LEASE_CHUNK) {
            if leased.len() >= self.limit {
                break;
            }
            let txn_ref: &T = txn;
            let records =
                try_join_all(chunk.iter().map(|id| txn_ref.get_owned(keys.alert(id)))).await?;
            // Only after an unknown result: which of these alerts did we lease already?
            let tokens = if self.unknown {
                try_join_all(chunk.iter().map(|id| txn_ref.get_owned(keys.lease(id)))).await?
            } else {
                vec![None; chunk.len()]
            };
            for ((id, bytes), token) in chunk.iter().zip(records).zip(tokens) {
                if leased.len() >= self.limit {
                    break;
                }
                let Some(bytes) = bytes else {
                    // An outbox entry without its alert: drop it.
                    txn.clear(&keys.outbox(id));
                    wrote = true;
                    continue;
                };
                let mut record = decode_alert(&bytes)?;
                if token.as_deref() == Some(self.token.as_bytes()) {
                    // Leased by an earlier attempt of this operation that committed after
                    // all: ours, as that attempt would have answered.
                    leased.push(record);
                } else if alert::lease(&mut record, self.now, self.lease) {
                    txn.set(&keys.alert(id), &record.to_bytes());
                    txn.set(&keys.lease(id), self.token.as_bytes());
                    wrote = true;
                    leased.push(record);
                }
            }
        }
        Ok((leased, wrote))
    }

    fn maybe_committed(&mut self) {
        self.unknown = true;
    }
}

/// `settle_alert`: applies a delivery outcome; a settled alert leaves the outbox.
pub(crate) struct SettleWork<'k> {
    pub(crate) keys: &'k Keyspace,
    pub(crate) id: String,
    pub(crate) outcome: AlertOutcome,
}

impl<T: KvTxn> Work<T> for SettleWork<'_> {
    type Output = Result<(), LedgerError>;

    async fn attempt(&mut self, txn: &mut T) -> Result<(Self::Output, bool), KvError> {
        let key = self.keys.alert(&self.id);
        let Some(bytes) = txn.get(&key).await? else {
            let missing = LedgerError::InvalidRequest(format!("no alert {}", self.id));
            return Ok((Err(missing), false));
        };
        let mut record = decode_alert(&bytes)?;
        alert::settle(&mut record, &self.outcome);
        txn.set(&key, &record.to_bytes());
        if record.delivery.status != DeliveryStatus::Pending {
            txn.clear(&self.keys.outbox(&self.id));
            txn.clear(&self.keys.lease(&self.id));
        }
        Ok((Ok(()), true))
    }
}

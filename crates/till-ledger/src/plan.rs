//! Claim planning: the decision of one claim, as a pure function over plain data.
//!
//! Every backend does the same thing inside its one transaction: read a [`ClaimState`]
//! (with serializable reads), call [`plan_claim`], then carry out the [`Plan`] — write
//! nothing for a refusal, bump the replay counter for a replay, or sign the receipt body
//! and write counters, receipt, chain head and idempotency record for a commit. Keeping
//! the decision here means the embedded and the FoundationDB backends cannot disagree on
//! what a claim means; see `spec/ledger.md` for the normative description.
//!
//! Check order (first failing check wins):
//! 1. request shape ([`validate`]): at least one level, revocation ids distinct;
//! 2. expiry: `now > not_after` refuses with [`Refusal::Expired`];
//! 3. revocation: the first revoked level in block order refuses with
//!    [`Refusal::Revoked`] — before the idempotency check, so a revoked or expired token
//!    cannot get even a replay forwarded ("refused at the next request");
//! 4. idempotency: a stored record for `(presented token, key)` with the same request
//!    fingerprint is replayed (at most [`MAX_REPLAYS`] times, then
//!    [`Refusal::ReplayLimit`]); a different fingerprint refuses with
//!    [`Refusal::IdempotencyConflict`];
//! 5. caps: every level's count goes up by one; the first level in block order whose new
//!    count would exceed its cap refuses with [`Refusal::CapReached`];
//! 6. commit: the receipt body takes `seq = new count of block 0` and `prev = hash of the
//!    family's chain head`.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::time::{SystemTime, UNIX_EPOCH};
use till_receipt::{ReceiptBody, RequestDigest, SlotClaim, RECEIPT_VERSION};

use crate::alert::{self, AlertPolicy, AlertRecord};
use crate::{ClaimRequest, LedgerError, Level, Refusal};

/// How many times one idempotency key may be replayed (after its original claim). Beyond
/// that the claim is refused with [`Refusal::ReplayLimit`], so an identical request cannot
/// be forwarded for free forever.
pub const MAX_REPLAYS: u32 = 3;

/// The idempotency record stored for `(presented token's last revocation id, key)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredIdempotency {
    /// [`request_fingerprint`] of the request that made the original claim.
    pub request: String,
    /// The original receipt, compact JWS.
    pub receipt: String,
    /// Replays served so far (0 right after the original claim).
    pub replays: u32,
}

impl StoredIdempotency {
    /// The record written by a committing claim.
    pub fn original(request: &RequestDigest, receipt_compact: &str) -> Self {
        Self {
            request: request_fingerprint(request),
            receipt: receipt_compact.to_owned(),
            replays: 0,
        }
    }

    /// Serialized form (JSON), as stored by the embedded backend.
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serializing three plain fields cannot fail; an empty record would be rejected
        // by `from_bytes` (reported as corruption) rather than silently accepted.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses [`StoredIdempotency::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        serde_json::from_slice(bytes)
            .map_err(|e| LedgerError::Corrupt(format!("idempotency record: {e}")))
    }
}

/// What the backend read inside its transaction, for one claim.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClaimState {
    /// The idempotency record for `(last level's revocation id, idempotency key)`.
    pub idempotency: Option<StoredIdempotency>,
    /// Per level (block order): is its revocation id revoked?
    pub revoked: Vec<bool>,
    /// Per level (block order): activations claimed so far through that block.
    pub counts: Vec<u64>,
    /// The family's chain head `(seq, lower-case hex receipt hash)`; `None` before the
    /// first claim. Always the receipt at `seq == counts[0] + 2 × voids` (each claim adds
    /// a receipt and one to the count; each void adds a receipt and takes one away).
    pub chain_head: Option<(u64, String)>,
    /// The family's void receipts so far (spec/ledger.md §3.5); 0 for most families.
    pub voids: u64,
    /// The family's activations in the current clock minute (`now / 60`) so far.
    pub minute_count: u64,
}

/// A window counter as stored: the start of the window it counts and the claims in it.
/// One record per (block, window length), overwritten when a new window begins, so the
/// ledger keeps a bounded number of them (spec/ledger.md §3.4).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct WindowCount {
    /// Unix seconds, a multiple of the window length.
    pub start: u64,
    /// Claims counted in the window starting at `start`.
    pub count: u64,
}

impl WindowCount {
    /// Stored form: 16 bytes, `start` then `count`, big-endian.
    pub fn to_bytes(self) -> [u8; 16] {
        let mut out = [0u8; 16];
        out[..8].copy_from_slice(&self.start.to_be_bytes());
        out[8..].copy_from_slice(&self.count.to_be_bytes());
        out
    }

    /// Parses [`WindowCount::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, LedgerError> {
        let arr: [u8; 16] = bytes
            .try_into()
            .map_err(|_| LedgerError::Corrupt("window counter is not 16 bytes".into()))?;
        let (a, b) = arr.split_at(8);
        let start = u64::from_be_bytes(a.try_into().unwrap_or_default());
        let count = u64::from_be_bytes(b.try_into().unwrap_or_default());
        Ok(Self { start, count })
    }
}

/// Who is claiming: fixed per backend instance, except the resolved idempotency key.
#[derive(Debug, Clone, Copy)]
pub struct ClaimContext<'a> {
    /// Identifier of this proxy (goes into the receipt).
    pub proxy_id: &'a str,
    /// Key id of the receipt signer (goes into the receipt).
    pub kid: &'a str,
    /// The client's `Idempotency-Key`, or the id the backend generated once before its
    /// transaction (see [`resolve_idempotency_key`]).
    pub idempotency_key: &'a str,
    /// Which alerts a committing claim fires.
    pub alerts: &'a AlertPolicy,
}

/// The decision for one claim.
// One transient value per claim; boxing the receipt body would only add an allocation and
// a deref to every backend's match. Deliberately exhaustive (not `#[non_exhaustive]`): a
// new kind of plan must break every backend's match rather than fall into a wildcard.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Return the stored receipt; write `record` (its replay counter advanced) back.
    Replay {
        /// The original receipt, compact JWS.
        receipt: String,
        /// The record to store back under the same key.
        record: StoredIdempotency,
        /// Activations left under the tightest cap (current counts; nothing is charged).
        remaining: Option<u64>,
    },
    /// Write nothing; answer with this refusal.
    Refuse(Refusal),
    /// Sign `body`, then write `new_counts` (per level), the receipt at
    /// `(family, body.seq)`, the chain head, the idempotency record, the family's
    /// current-minute count and every alert (unless one with its id exists).
    Commit {
        /// New counter value per level, block order.
        new_counts: Vec<u64>,
        /// The receipt to sign.
        body: ReceiptBody,
        /// Activations left under the tightest cap after this claim.
        remaining: Option<u64>,
        /// The family's count for minute `now / 60` after this claim.
        minute_count: u64,
        /// Alerts this claim fires (see [`crate::alert`]).
        alerts: Vec<AlertRecord>,
    },
}

/// Checks the request shape: at least one level, no revocation id twice (a repeated id
/// would be counted once but read twice, breaking the cap arithmetic), ids non-empty.
pub fn validate(req: &ClaimRequest) -> Result<(), LedgerError> {
    if req.levels.is_empty() {
        return Err(LedgerError::InvalidRequest("no levels".into()));
    }
    for (i, level) in req.levels.iter().enumerate() {
        if level.revocation_id.is_empty() {
            return Err(LedgerError::InvalidRequest(format!(
                "level {i} has an empty revocation id"
            )));
        }
        if req.levels[..i]
            .iter()
            .any(|earlier| earlier.revocation_id == level.revocation_id)
        {
            return Err(LedgerError::InvalidRequest(format!(
                "level {i} repeats an earlier revocation id"
            )));
        }
    }
    for (j, w) in req.windows.iter().enumerate() {
        if w.level >= req.levels.len() || w.secs == 0 {
            return Err(LedgerError::InvalidRequest(format!(
                "window {j} names level {} of {} or has length 0",
                w.level,
                req.levels.len()
            )));
        }
        if req.windows[..j]
            .iter()
            .any(|e| e.level == w.level && e.secs == w.secs)
        {
            return Err(LedgerError::InvalidRequest(format!(
                "window {j} repeats an earlier (level, length)"
            )));
        }
    }
    Ok(())
}

/// The request's fingerprint for idempotency: lower-case hex SHA-256 of its JSON form,
/// so it covers every member of the digest: method, upstream, path, query, body hash,
/// model and content type.
pub fn request_fingerprint(request: &RequestDigest) -> String {
    let json = serde_json::to_vec(request).unwrap_or_default();
    hex::encode(Sha256::digest(&json))
}

/// A fresh idempotency id (128 bits, lower-case hex), for claims without a client key:
/// the Unix time in milliseconds (48 bits) then 80 random bits. Generate it ONCE before
/// the transaction so a retried transaction reuses it.
///
/// Time first, so the ids of one token sort in the order they were made: a batch of
/// claims appends its records to the same end of the idempotency index instead of
/// touching one random B-tree page per claim (spec/ledger.md §5). 80 random bits keep
/// two claims of the same millisecond apart.
pub fn generate_idempotency_key() -> String {
    let millis = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
        & ((1 << 48) - 1);
    let random = rand::random::<u128>() & ((1 << 80) - 1);
    format!("{:032x}", (u128::from(millis) << 80) | random)
}

/// The client's key, or a freshly generated one.
pub fn resolve_idempotency_key(req: &ClaimRequest) -> String {
    req.idempotency_key
        .clone()
        .unwrap_or_else(generate_idempotency_key)
}

/// The idempotency scope: the presented token's last revocation id, so a sibling (or an
/// ancestor) presenting the same key makes a fresh claim rather than a replay.
pub fn idempotency_scope(req: &ClaimRequest) -> &[u8] {
    req.levels
        .last()
        .map(|l| l.revocation_id.as_slice())
        .unwrap_or_default()
}

/// Activations left under the tightest cap, given per-level counts (`None`: no level is
/// capped).
pub fn remaining(levels: &[Level], counts: &[u64]) -> Option<u64> {
    levels
        .iter()
        .zip(counts)
        .filter_map(|(level, &count)| level.cap.map(|cap| cap.saturating_sub(count)))
        .min()
}

/// Decides one claim. Pure: same inputs, same plan (including the receipt body).
///
/// Errors are "cannot decide" conditions: a malformed request ([`validate`]) or a state
/// that contradicts itself ([`LedgerError::Corrupt`]); the backend writes nothing for them.
///
/// A request with windowed caps needs the window counters: a backend that does not read
/// them calls this and is refused ([`LedgerError::InvalidRequest`], fail closed); the
/// backends call [`plan_claim_windowed`].
pub fn plan_claim(
    req: &ClaimRequest,
    state: &ClaimState,
    ctx: &ClaimContext<'_>,
) -> Result<Plan, LedgerError> {
    if !req.windows.is_empty() {
        return Err(LedgerError::InvalidRequest(
            "windowed caps need a backend that reads window counters".into(),
        ));
    }
    plan_claim_windowed(req, state, &[], ctx).map(|(plan, _)| plan)
}

/// [`plan_claim`] with windowed caps: `windows[j]` is the stored counter of
/// `req.windows[j]` (`None`: never written). Windows are checked after the lifetime caps
/// (a permanent refusal wins over a transient one), and a refusal writes nothing, so a
/// rate-limited call never charges a lifetime cap. On a commit, the second value is the
/// counter to store for each window (same order).
///
/// A stored window that starts later than the current one (written by a proxy whose clock
/// runs ahead) is counted as the current window: a window is never reset early.
pub fn plan_claim_windowed(
    req: &ClaimRequest,
    state: &ClaimState,
    windows: &[Option<WindowCount>],
    ctx: &ClaimContext<'_>,
) -> Result<(Plan, Vec<WindowCount>), LedgerError> {
    let plan = plan_claim_inner(req, state, ctx)?;
    let writes = match &plan {
        Plan::Commit { .. } => {
            if windows.len() != req.windows.len() {
                return Err(LedgerError::Corrupt(format!(
                    "{} window counters for {} windows",
                    windows.len(),
                    req.windows.len()
                )));
            }
            let mut writes = Vec::with_capacity(windows.len());
            for (w, stored) in req.windows.iter().zip(windows) {
                let current = w.start(req.now);
                let (start, count) = match stored {
                    Some(s) if s.start >= current => (s.start, s.count),
                    _ => (current, 0),
                };
                let next = count.saturating_add(1);
                if next > w.max {
                    let retry_after = start.saturating_add(w.secs).saturating_sub(req.now).max(1);
                    return Ok((
                        Plan::Refuse(Refusal::RateLimited {
                            block: w.level,
                            max: w.max,
                            secs: w.secs,
                            retry_after,
                        }),
                        Vec::new(),
                    ));
                }
                writes.push(WindowCount { start, count: next });
            }
            writes
        }
        _ => Vec::new(),
    };
    Ok((plan, writes))
}

fn plan_claim_inner(
    req: &ClaimRequest,
    state: &ClaimState,
    ctx: &ClaimContext<'_>,
) -> Result<Plan, LedgerError> {
    validate(req)?;
    let n = req.levels.len();
    if state.revoked.len() != n || state.counts.len() != n {
        return Err(LedgerError::Corrupt(format!(
            "state has {} revocation flags and {} counts for {n} levels",
            state.revoked.len(),
            state.counts.len()
        )));
    }
    check_chain_head(state)?;

    if let Some(not_after) = req.not_after {
        if req.now > not_after {
            return Ok(Plan::Refuse(Refusal::Expired));
        }
    }
    if let Some(block) = state.revoked.iter().position(|&r| r) {
        return Ok(Plan::Refuse(Refusal::Revoked { block }));
    }

    if let Some(stored) = &state.idempotency {
        if stored.request != request_fingerprint(&req.request) {
            return Ok(Plan::Refuse(Refusal::IdempotencyConflict));
        }
        if stored.replays >= MAX_REPLAYS {
            return Ok(Plan::Refuse(Refusal::ReplayLimit));
        }
        let mut record = stored.clone();
        record.replays += 1;
        return Ok(Plan::Replay {
            receipt: stored.receipt.clone(),
            record,
            remaining: remaining(&req.levels, &state.counts),
        });
    }

    let mut new_counts = Vec::with_capacity(n);
    for (block, (level, &count)) in req.levels.iter().zip(&state.counts).enumerate() {
        let next = count
            .checked_add(1)
            .ok_or_else(|| LedgerError::Corrupt(format!("counter of block {block} overflows")))?;
        if let Some(cap) = level.cap {
            if next > cap {
                return Ok(Plan::Refuse(Refusal::CapReached { block, cap }));
            }
        }
        new_counts.push(next);
    }

    // The receipt's place in the chain: after the head. Without voids this is the new
    // family count (`new_counts[0]`); each void adds a receipt without a charge.
    let seq = state
        .chain_head
        .as_ref()
        .map_or(0, |(seq, _)| *seq)
        .checked_add(1)
        .ok_or_else(|| LedgerError::Corrupt("family chain seq overflows".into()))?;
    let prev = state.chain_head.as_ref().map(|(_, hash)| hash.clone());
    let slots = req
        .levels
        .iter()
        .zip(&new_counts)
        .enumerate()
        .map(|(block, (level, &slot))| SlotClaim {
            block: u32::try_from(block).unwrap_or(u32::MAX),
            revocation_id: hex::encode(&level.revocation_id),
            slot,
            cap: level.cap,
        })
        .collect();
    let body = ReceiptBody {
        v: RECEIPT_VERSION,
        family: hex::encode(&req.levels[0].revocation_id),
        seq,
        slots,
        request: req.request.clone(),
        iat: req.now,
        proxy: ctx.proxy_id.to_owned(),
        kid: ctx.kid.to_owned(),
        idempotency_key: ctx.idempotency_key.to_owned(),
        prev,
        ledger: None,
        ceilings: req.ceilings.clone().filter(|c| !c.is_empty()),
        void: None,
    };
    let remaining = remaining(&req.levels, &new_counts);
    let minute_count = state.minute_count.saturating_add(1);
    let alerts = alert::claim_alerts(
        ctx.alerts,
        &req.levels,
        req.meta.as_deref().map(Vec::as_slice),
        &new_counts,
        req.now,
        minute_count,
    );
    Ok(Plan::Commit {
        new_counts,
        body,
        remaining,
        minute_count,
        alerts,
    })
}

/// The chain head must be the receipt at `seq == counts[0] + 2 × voids` (none before the
/// first claim).
fn check_chain_head(state: &ClaimState) -> Result<(), LedgerError> {
    let family_count = state.counts.first().copied().unwrap_or(0);
    check_head(family_count, state.voids, state.chain_head.as_ref())
}

fn check_head(
    family_count: u64,
    voids: u64,
    head: Option<&(u64, String)>,
) -> Result<(), LedgerError> {
    let expected = voids
        .checked_mul(2)
        .and_then(|v| v.checked_add(family_count));
    match (head, expected) {
        (None, Some(0)) => Ok(()),
        (Some((seq, _)), Some(expected)) if *seq == expected => Ok(()),
        (head, _) => Err(LedgerError::Corrupt(format!(
            "family counter is {family_count} with {voids} voids but chain head is at {:?}",
            head.map(|(seq, _)| *seq)
        ))),
    }
}

/// What the backend read inside its transaction, for one void (spec/ledger.md §3.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VoidState {
    /// The receipt stored at `(family, seq)`; `None`: no such receipt (never written, or
    /// exported and pruned).
    pub claim: Option<ReceiptBody>,
    /// The seq of the void receipt already written for this claim, if any.
    pub voided_by: Option<u64>,
    /// Replays served of the claim's idempotency record (`None`: no record points at the
    /// claim any more).
    pub replays: Option<u32>,
    /// Per slot of the claim (block order): the level's counter now.
    pub counts: Vec<u64>,
    /// The family's chain head `(seq, link hash)`.
    pub chain_head: Option<(u64, String)>,
    /// The family's voids so far.
    pub voids: u64,
}

/// The decision for one void.
// One transient value per void (rare); see `Plan` for why it is not boxed.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VoidPlan {
    /// Already voided: answer with the void receipt at this seq, write nothing.
    Existing {
        /// The void receipt's seq.
        seq: u64,
    },
    /// Write `new_counts` (per slot of the claim), the void receipt `body` at
    /// `(family, body.seq)`, the chain head, the void marker `(family, claim seq) →
    /// body.seq`, the family's void count, the window counters, and delete the claim's
    /// idempotency record (so a retry with the same key claims afresh).
    Commit {
        /// New counter value per level of the claim, block order (each one lower).
        new_counts: Vec<u64>,
        /// The void receipt to sign.
        body: ReceiptBody,
        /// The family's void count after this void.
        voids: u64,
        /// Activations left under the tightest cap after the void.
        remaining: Option<u64>,
    },
}

/// Why a claim cannot be voided (the slot stays spent; the proxy fails closed).
pub(crate) fn not_voidable(family: &[u8], seq: u64, why: &str) -> LedgerError {
    LedgerError::NotVoidable(format!(
        "receipt {seq} of family {}: {why}",
        hex::encode(family)
    ))
}

/// Decides one void. Pure, like [`plan_claim`].
///
/// Refused ([`LedgerError::NotVoidable`], nothing written): no receipt at `seq` (never
/// written, or pruned), a receipt that is itself a void, or a claim whose idempotency
/// record was replayed (a replay may have been forwarded under that slot) or no longer
/// points at it. Already voided: [`VoidPlan::Existing`], nothing written, nothing
/// decremented twice.
pub fn plan_void(
    req: &crate::VoidRequest,
    state: &VoidState,
    ctx: &ClaimContext<'_>,
) -> Result<VoidPlan, LedgerError> {
    let family = req.family.as_slice();
    let Some(claim) = &state.claim else {
        return Err(not_voidable(
            family,
            req.seq,
            "no such receipt in the ledger",
        ));
    };
    if claim.family != hex::encode(family) || claim.seq != req.seq {
        return Err(LedgerError::Corrupt(format!(
            "receipt stored at {} of family {} names {} of {}",
            req.seq,
            hex::encode(family),
            claim.seq,
            claim.family
        )));
    }
    if claim.void.is_some() {
        return Err(not_voidable(family, req.seq, "it is a void receipt"));
    }
    if let Some(seq) = state.voided_by {
        return Ok(VoidPlan::Existing { seq });
    }
    match state.replays {
        Some(0) => {}
        Some(_) => {
            return Err(not_voidable(
                family,
                req.seq,
                "its idempotency key was replayed, so the slot may have been used",
            ))
        }
        None => {
            return Err(not_voidable(
                family,
                req.seq,
                "its idempotency record is gone (exported, or reused)",
            ))
        }
    }
    if state.counts.len() != claim.slots.len() {
        return Err(LedgerError::Corrupt(format!(
            "{} counters for {} slots",
            state.counts.len(),
            claim.slots.len()
        )));
    }
    let family_count = state.counts.first().copied().unwrap_or(0);
    check_head(family_count, state.voids, state.chain_head.as_ref())?;
    let mut new_counts = Vec::with_capacity(state.counts.len());
    for (slot, &count) in claim.slots.iter().zip(&state.counts) {
        let next = count.checked_sub(1).ok_or_else(|| {
            LedgerError::Corrupt(format!(
                "counter of {} is 0 but receipt {} of family {} counts in it",
                slot.revocation_id, claim.seq, claim.family
            ))
        })?;
        new_counts.push(next);
    }
    let (head_seq, prev) = match &state.chain_head {
        Some((seq, hash)) => (*seq, hash.clone()),
        None => return Err(LedgerError::Corrupt("a claim without a chain head".into())),
    };
    let voids = state
        .voids
        .checked_add(1)
        .ok_or_else(|| LedgerError::Corrupt("void count overflows".into()))?;
    let body = ReceiptBody {
        v: RECEIPT_VERSION,
        family: claim.family.clone(),
        seq: head_seq.saturating_add(1),
        slots: claim.slots.clone(),
        request: claim.request.clone(),
        iat: req.now,
        proxy: ctx.proxy_id.to_owned(),
        kid: ctx.kid.to_owned(),
        idempotency_key: claim.idempotency_key.clone(),
        prev: Some(prev),
        ledger: None,
        ceilings: None,
        void: Some(claim.seq),
    };
    let remaining = claim
        .slots
        .iter()
        .zip(&new_counts)
        .filter_map(|(slot, &count)| slot.cap.map(|cap| cap.saturating_sub(count)))
        .min();
    Ok(VoidPlan::Commit {
        new_counts,
        body,
        voids,
        remaining,
    })
}

/// The window counter a void writes back for `w` (a window of the claim it voids), or
/// `None` to leave it: lowered by one only while the stored counter still counts the
/// window that contained the claim (`start == w.start(claim_iat)`); a later window never
/// counted the claim, so it is left alone (the void then frees nothing there).
pub fn void_window(
    w: &crate::WindowCap,
    claim_iat: u64,
    stored: Option<WindowCount>,
) -> Option<WindowCount> {
    let stored = stored?;
    (stored.start == w.start(claim_iat) && stored.count > 0).then(|| WindowCount {
        start: stored.start,
        count: stored.count - 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Generated ids: 32 lower-case hex digits, distinct within one millisecond, and in
    /// time order across milliseconds (so a batch appends to one end of the index).
    #[test]
    fn generated_idempotency_keys_are_time_ordered() {
        let same_ms: Vec<String> = (0..64).map(|_| generate_idempotency_key()).collect();
        let distinct: std::collections::HashSet<&String> = same_ms.iter().collect();
        assert_eq!(distinct.len(), same_ms.len());
        for k in &same_ms {
            assert_eq!(k.len(), 32);
            assert!(k.chars().all(|c| matches!(c, '0'..='9' | 'a'..='f')), "{k}");
        }
        let earlier = generate_idempotency_key();
        std::thread::sleep(std::time::Duration::from_millis(3));
        let later = generate_idempotency_key();
        assert!(earlier < later, "{earlier} !< {later}");
        // The first 12 hex digits are the Unix time in milliseconds.
        let millis = u64::from_str_radix(&later[..12], 16).unwrap();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        assert!(now.abs_diff(millis) < 60_000, "{millis} vs {now}");
    }

    fn level(id: u8, cap: Option<u64>) -> Level {
        Level {
            revocation_id: vec![id; 64],
            cap,
        }
    }

    fn digest(path: &str) -> RequestDigest {
        RequestDigest {
            method: "POST".into(),
            upstream: "openai".into(),
            path: path.into(),
            body_sha256: "00".repeat(32),
            model: None,
            query: None,
            content_type: None,
        }
    }

    fn request(levels: Vec<Level>) -> ClaimRequest {
        ClaimRequest {
            levels,
            idempotency_key: Some("k".into()),
            request: digest("/v1/chat/completions"),
            now: 1_000,
            not_after: None,
            meta: None,
            windows: Vec::new(),
            ceilings: None,
        }
    }

    fn fresh(n: usize) -> ClaimState {
        ClaimState {
            idempotency: None,
            revoked: vec![false; n],
            counts: vec![0; n],
            chain_head: None,
            voids: 0,
            minute_count: 0,
        }
    }

    const CTX: ClaimContext<'static> = ClaimContext {
        proxy_id: "proxy-1",
        kid: "r-0011223344556677",
        idempotency_key: "k",
        alerts: &NO_ALERTS,
    };

    #[test]
    fn windows_need_the_windowed_planner_and_decide_after_caps() {
        use crate::WindowCap;
        let mut req = request(vec![level(1, Some(5))]);
        req.windows = vec![WindowCap {
            level: 0,
            secs: 60,
            max: 2,
        }];
        // The plain planner refuses windows (fail closed for a backend that ignores them).
        assert!(matches!(
            plan_claim(&req, &fresh(1), &CTX),
            Err(LedgerError::InvalidRequest(_))
        ));
        let start = req.now - req.now % 60;
        // A fresh window: counted from 0, written as (start, 1).
        let (plan, writes) = plan_claim_windowed(&req, &fresh(1), &[None], &CTX).unwrap();
        assert!(matches!(plan, Plan::Commit { .. }));
        assert_eq!(writes, vec![WindowCount { start, count: 1 }]);
        // An old window is replaced; the current one is counted.
        let old = WindowCount {
            start: start - 60,
            count: 2,
        };
        let (_, writes) = plan_claim_windowed(&req, &fresh(1), &[Some(old)], &CTX).unwrap();
        assert_eq!(writes, vec![WindowCount { start, count: 1 }]);
        let full = WindowCount { start, count: 2 };
        let (plan, writes) = plan_claim_windowed(&req, &fresh(1), &[Some(full)], &CTX).unwrap();
        assert_eq!(
            plan,
            Plan::Refuse(Refusal::RateLimited {
                block: 0,
                max: 2,
                secs: 60,
                retry_after: start + 60 - req.now
            })
        );
        assert!(writes.is_empty());
        // A window started later by a faster clock is never reset by this slower one.
        let ahead = WindowCount {
            start: start + 60,
            count: 2,
        };
        let (plan, _) = plan_claim_windowed(&req, &fresh(1), &[Some(ahead)], &CTX).unwrap();
        assert!(matches!(
            plan,
            Plan::Refuse(Refusal::RateLimited { retry_after, .. }) if retry_after == start + 120 - req.now
        ));
        // The lifetime cap is checked first: a full cap wins over a full window.
        let capped = ClaimState {
            counts: vec![5],
            chain_head: Some((5, "ab".repeat(32))),
            ..fresh(1)
        };
        let (plan, _) = plan_claim_windowed(&req, &capped, &[Some(full)], &CTX).unwrap();
        assert_eq!(plan, Plan::Refuse(Refusal::CapReached { block: 0, cap: 5 }));
        // A wrong number of stored counters is corruption, not a decision.
        assert!(plan_claim_windowed(&req, &fresh(1), &[], &CTX).is_err());
        assert_eq!(WindowCount::from_bytes(&full.to_bytes()).unwrap(), full);
        assert!(WindowCount::from_bytes(&[0; 15]).is_err());
    }

    /// The committed claim `plan_void` is asked about: seq 2 through two levels.
    fn committed_claim() -> (ClaimRequest, ReceiptBody) {
        let req = request(vec![level(1, Some(5)), level(2, Some(1))]);
        let mut state = fresh(2);
        state.counts = vec![1, 0];
        state.chain_head = Some((1, "aa".repeat(32)));
        let Plan::Commit { body, .. } = plan_claim(&req, &state, &CTX).unwrap() else {
            panic!("expected a commit");
        };
        (req, body)
    }

    fn void_state(claim: &ReceiptBody) -> VoidState {
        VoidState {
            claim: Some(claim.clone()),
            voided_by: None,
            replays: Some(0),
            counts: vec![2, 1],
            chain_head: Some((2, "bb".repeat(32))),
            voids: 0,
        }
    }

    #[test]
    fn a_void_lowers_every_level_and_appends_to_the_chain() {
        let (req, claim) = committed_claim();
        assert_eq!(claim.seq, 2);
        let void = crate::VoidRequest {
            family: req.levels[0].revocation_id.clone(),
            seq: 2,
            now: 2_000,
            windows: Vec::new(),
        };
        let VoidPlan::Commit {
            new_counts,
            body,
            voids,
            remaining,
        } = plan_void(&void, &void_state(&claim), &CTX).unwrap()
        else {
            panic!("expected a commit");
        };
        assert_eq!(new_counts, vec![1, 0]);
        assert_eq!(voids, 1);
        assert_eq!(remaining, Some(1));
        assert_eq!(body.seq, 3);
        assert_eq!(body.void, Some(2));
        assert_eq!(body.prev, Some("bb".repeat(32)));
        assert_eq!(body.slots, claim.slots);
        assert_eq!(body.request, claim.request);
        assert_eq!(body.idempotency_key, claim.idempotency_key);
        assert_eq!(body.iat, 2_000);

        // After the void, the next claim takes seq 4 with the freed slot.
        let mut state = fresh(2);
        state.counts = new_counts;
        state.chain_head = Some((3, "cc".repeat(32)));
        state.voids = 1;
        let Plan::Commit { body, .. } = plan_claim(&req, &state, &CTX).unwrap() else {
            panic!("expected a commit");
        };
        assert_eq!(body.seq, 4);
        assert_eq!(body.slots[0].slot, 2);
        assert_eq!(body.slots[1].slot, 1);
        // A head that does not account for the voids is corrupt.
        state.voids = 0;
        assert!(matches!(
            plan_claim(&req, &state, &CTX),
            Err(LedgerError::Corrupt(_))
        ));
    }

    #[test]
    fn void_refusals_and_repeats() {
        let (req, claim) = committed_claim();
        let void = crate::VoidRequest {
            family: req.levels[0].revocation_id.clone(),
            seq: 2,
            now: 2_000,
            windows: Vec::new(),
        };
        let refused = |state: &VoidState| {
            matches!(
                plan_void(&void, state, &CTX),
                Err(LedgerError::NotVoidable(_))
            )
        };
        let mut s = void_state(&claim);
        s.claim = None;
        assert!(refused(&s), "unknown seq");
        let mut s = void_state(&claim);
        s.replays = Some(1);
        assert!(refused(&s), "replayed claim");
        let mut s = void_state(&claim);
        s.replays = None;
        assert!(refused(&s), "record gone");
        let mut s = void_state(&claim);
        let mut a_void = claim.clone();
        a_void.void = Some(1);
        s.claim = Some(a_void);
        assert!(refused(&s), "a void receipt");
        let mut s = void_state(&claim);
        s.voided_by = Some(3);
        s.replays = None;
        assert_eq!(
            plan_void(&void, &s, &CTX).unwrap(),
            VoidPlan::Existing { seq: 3 }
        );
        let mut s = void_state(&claim);
        s.counts = vec![2, 0];
        assert!(matches!(
            plan_void(&void, &s, &CTX),
            Err(LedgerError::Corrupt(_))
        ));
    }

    #[test]
    fn a_void_lowers_a_window_only_while_it_is_the_claims() {
        let w = crate::WindowCap {
            level: 0,
            secs: 60,
            max: 5,
        };
        let start = 960; // the window containing 1_000
        let in_window = WindowCount { start, count: 3 };
        assert_eq!(
            void_window(&w, 1_000, Some(in_window)),
            Some(WindowCount { start, count: 2 })
        );
        let later = WindowCount {
            start: start + 60,
            count: 1,
        };
        assert_eq!(void_window(&w, 1_000, Some(later)), None);
        assert_eq!(void_window(&w, 1_000, None), None);
        assert_eq!(
            void_window(&w, 1_000, Some(WindowCount { start, count: 0 })),
            None
        );
    }

    static NO_ALERTS: AlertPolicy = AlertPolicy {
        thresholds: Vec::new(),
        rate_per_minute: None,
        revocations: false,
    };

    #[test]
    fn first_claim_commits_slot_one_without_prev() {
        let req = request(vec![level(1, Some(3)), level(2, Some(2))]);
        let plan = plan_claim(&req, &fresh(2), &CTX).unwrap();
        let Plan::Commit {
            new_counts,
            body,
            remaining,
            ..
        } = plan
        else {
            panic!("expected commit, got {plan:?}");
        };
        assert_eq!(new_counts, vec![1, 1]);
        assert_eq!(remaining, Some(1));
        assert_eq!(body.v, RECEIPT_VERSION);
        assert_eq!(body.seq, 1);
        assert_eq!(body.prev, None);
        assert_eq!(body.family, hex::encode([1u8; 64]));
        assert_eq!(body.proxy, "proxy-1");
        assert_eq!(body.kid, "r-0011223344556677");
        assert_eq!(body.idempotency_key, "k");
        assert_eq!(body.iat, 1_000);
        assert_eq!(body.request, req.request);
        assert_eq!(
            body.slots,
            vec![
                SlotClaim {
                    block: 0,
                    revocation_id: hex::encode([1u8; 64]),
                    slot: 1,
                    cap: Some(3)
                },
                SlotClaim {
                    block: 1,
                    revocation_id: hex::encode([2u8; 64]),
                    slot: 1,
                    cap: Some(2)
                },
            ]
        );
    }

    #[test]
    fn later_claim_links_to_chain_head() {
        let req = request(vec![level(1, None), level(2, Some(10))]);
        let state = ClaimState {
            counts: vec![7, 2],
            chain_head: Some((7, "ab".repeat(32))),
            ..fresh(2)
        };
        let Plan::Commit {
            new_counts,
            body,
            remaining,
            ..
        } = plan_claim(&req, &state, &CTX).unwrap()
        else {
            panic!("expected commit");
        };
        assert_eq!(new_counts, vec![8, 3]);
        assert_eq!(body.seq, 8);
        assert_eq!(body.prev.as_deref(), Some("ab".repeat(32).as_str()));
        assert_eq!(remaining, Some(7));
    }

    #[test]
    fn uncapped_token_has_no_remaining() {
        let req = request(vec![level(1, None)]);
        let Plan::Commit { remaining, .. } = plan_claim(&req, &fresh(1), &CTX).unwrap() else {
            panic!("expected commit");
        };
        assert_eq!(remaining, None);
    }

    #[test]
    fn cap_reached_reports_first_exceeded_level() {
        let req = request(vec![
            level(1, Some(5)),
            level(2, Some(2)),
            level(3, Some(1)),
        ]);
        let state = ClaimState {
            counts: vec![5, 2, 1],
            chain_head: Some((5, "00".into())),
            ..fresh(3)
        };
        assert_eq!(
            plan_claim(&req, &state, &CTX).unwrap(),
            Plan::Refuse(Refusal::CapReached { block: 0, cap: 5 })
        );
        let state = ClaimState {
            counts: vec![4, 2, 1],
            chain_head: Some((4, "00".into())),
            ..fresh(3)
        };
        assert_eq!(
            plan_claim(&req, &state, &CTX).unwrap(),
            Plan::Refuse(Refusal::CapReached { block: 1, cap: 2 })
        );
        let state = ClaimState {
            counts: vec![4, 1, 1],
            chain_head: Some((4, "00".into())),
            ..fresh(3)
        };
        assert_eq!(
            plan_claim(&req, &state, &CTX).unwrap(),
            Plan::Refuse(Refusal::CapReached { block: 2, cap: 1 })
        );
    }

    #[test]
    fn zero_cap_refuses_the_first_claim() {
        let req = request(vec![level(1, Some(0))]);
        assert_eq!(
            plan_claim(&req, &fresh(1), &CTX).unwrap(),
            Plan::Refuse(Refusal::CapReached { block: 0, cap: 0 })
        );
    }

    #[test]
    fn expiry_is_inclusive_of_not_after() {
        let mut req = request(vec![level(1, None)]);
        req.not_after = Some(1_000);
        assert!(matches!(
            plan_claim(&req, &fresh(1), &CTX).unwrap(),
            Plan::Commit { .. }
        ));
        req.not_after = Some(999);
        assert_eq!(
            plan_claim(&req, &fresh(1), &CTX).unwrap(),
            Plan::Refuse(Refusal::Expired)
        );
    }

    #[test]
    fn revocation_reports_first_revoked_level() {
        let req = request(vec![level(1, None), level(2, None), level(3, None)]);
        let mut state = fresh(3);
        state.revoked = vec![false, true, true];
        assert_eq!(
            plan_claim(&req, &state, &CTX).unwrap(),
            Plan::Refuse(Refusal::Revoked { block: 1 })
        );
        state.revoked = vec![false, false, true];
        assert_eq!(
            plan_claim(&req, &state, &CTX).unwrap(),
            Plan::Refuse(Refusal::Revoked { block: 2 })
        );
    }

    #[test]
    fn expired_and_revoked_win_over_replay_and_caps() {
        let mut req = request(vec![level(1, Some(1))]);
        let mut state = fresh(1);
        state.counts = vec![1];
        state.chain_head = Some((1, "00".into()));
        state.idempotency = Some(StoredIdempotency::original(&req.request, "r"));
        state.revoked = vec![true];
        assert_eq!(
            plan_claim(&req, &state, &CTX).unwrap(),
            Plan::Refuse(Refusal::Revoked { block: 0 })
        );
        req.not_after = Some(1);
        assert_eq!(
            plan_claim(&req, &state, &CTX).unwrap(),
            Plan::Refuse(Refusal::Expired)
        );
    }

    #[test]
    fn replay_returns_stored_receipt_and_counts_replays() {
        let req = request(vec![level(1, Some(1))]);
        let mut state = fresh(1);
        // The cap is used up by the original claim: a replay is still served, uncharged.
        state.counts = vec![1];
        state.chain_head = Some((1, "00".into()));
        state.idempotency = Some(StoredIdempotency::original(&req.request, "compact"));
        for served in 1..=MAX_REPLAYS {
            let plan = plan_claim(&req, &state, &CTX).unwrap();
            let Plan::Replay {
                receipt,
                record,
                remaining,
            } = plan
            else {
                panic!("expected replay, got {plan:?}");
            };
            assert_eq!(receipt, "compact");
            assert_eq!(record.replays, served);
            assert_eq!(remaining, Some(0));
            state.idempotency = Some(record);
        }
        assert_eq!(
            plan_claim(&req, &state, &CTX).unwrap(),
            Plan::Refuse(Refusal::ReplayLimit)
        );
    }

    #[test]
    fn different_request_under_same_key_conflicts() {
        let req = request(vec![level(1, None)]);
        let mut state = fresh(1);
        state.counts = vec![1];
        state.chain_head = Some((1, "00".into()));
        state.idempotency = Some(StoredIdempotency::original(&digest("/other"), "r"));
        assert_eq!(
            plan_claim(&req, &state, &CTX).unwrap(),
            Plan::Refuse(Refusal::IdempotencyConflict)
        );
        // Conflict wins over the replay limit: it is the more specific answer.
        state.idempotency = Some(StoredIdempotency {
            replays: MAX_REPLAYS,
            ..StoredIdempotency::original(&digest("/other"), "r")
        });
        assert_eq!(
            plan_claim(&req, &state, &CTX).unwrap(),
            Plan::Refuse(Refusal::IdempotencyConflict)
        );
    }

    #[test]
    fn fingerprint_covers_every_field() {
        let base = RequestDigest {
            query: Some("page=0".into()),
            content_type: Some("application/json".into()),
            ..digest("/p")
        };
        let variants = [
            RequestDigest {
                method: "GET".into(),
                ..base.clone()
            },
            RequestDigest {
                upstream: "x".into(),
                ..base.clone()
            },
            RequestDigest {
                path: "/q".into(),
                ..base.clone()
            },
            RequestDigest {
                body_sha256: "11".repeat(32),
                ..base.clone()
            },
            RequestDigest {
                model: Some("m".into()),
                ..base.clone()
            },
            RequestDigest {
                query: Some("page=1".into()),
                ..base.clone()
            },
            RequestDigest {
                content_type: Some("text/plain".into()),
                ..base.clone()
            },
        ];
        let fp = request_fingerprint(&base);
        assert_eq!(fp.len(), 64);
        assert_eq!(fp, request_fingerprint(&base.clone()));
        for v in &variants {
            assert_ne!(request_fingerprint(v), fp, "{v:?}");
        }
    }

    #[test]
    fn invalid_requests_are_errors() {
        let req = request(vec![]);
        assert!(matches!(
            plan_claim(&req, &fresh(0), &CTX),
            Err(LedgerError::InvalidRequest(_))
        ));
        let req = request(vec![level(1, None), level(1, None)]);
        assert!(matches!(
            plan_claim(&req, &fresh(2), &CTX),
            Err(LedgerError::InvalidRequest(_))
        ));
        let req = request(vec![Level {
            revocation_id: vec![],
            cap: None,
        }]);
        assert!(matches!(
            validate(&req),
            Err(LedgerError::InvalidRequest(_))
        ));
    }

    #[test]
    fn inconsistent_state_is_corrupt() {
        let req = request(vec![level(1, None)]);
        let mut state = fresh(1);
        state.counts = vec![2];
        assert!(matches!(
            plan_claim(&req, &state, &CTX),
            Err(LedgerError::Corrupt(_))
        ));
        state.chain_head = Some((1, "00".into()));
        assert!(matches!(
            plan_claim(&req, &state, &CTX),
            Err(LedgerError::Corrupt(_))
        ));
        let state = ClaimState {
            chain_head: Some((1, "00".into())),
            ..fresh(1)
        };
        assert!(matches!(
            plan_claim(&req, &state, &CTX),
            Err(LedgerError::Corrupt(_))
        ));
        assert!(matches!(
            plan_claim(&req, &fresh(2), &CTX),
            Err(LedgerError::Corrupt(_))
        ));
    }

    #[test]
    fn idempotency_record_round_trips() {
        let rec = StoredIdempotency::original(&digest("/p"), "a.b.c");
        assert_eq!(StoredIdempotency::from_bytes(&rec.to_bytes()).unwrap(), rec);
        assert!(matches!(
            StoredIdempotency::from_bytes(b"nope"),
            Err(LedgerError::Corrupt(_))
        ));
    }

    #[test]
    fn generated_keys_are_128_bit_hex_and_distinct() {
        let a = generate_idempotency_key();
        let b = generate_idempotency_key();
        assert_eq!(a.len(), 32);
        assert!(a
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_ne!(a, b);
        let mut req = request(vec![level(1, None), level(2, None)]);
        assert_eq!(resolve_idempotency_key(&req), "k");
        req.idempotency_key = None;
        assert_eq!(resolve_idempotency_key(&req).len(), 32);
        assert_eq!(idempotency_scope(&req), &[2u8; 64][..]);
    }

    /// A token tree for the property test: node 0 is the root; `parent[i] < i`.
    #[derive(Debug, Clone)]
    struct Tree {
        caps: Vec<Option<u64>>,
        parent: Vec<usize>,
    }

    impl Tree {
        fn path(&self, node: usize) -> Vec<usize> {
            let mut path = vec![node];
            let mut at = node;
            while at != 0 {
                at = self.parent[at];
                path.push(at);
            }
            path.reverse();
            path
        }
    }

    fn tree_strategy() -> impl Strategy<Value = Tree> {
        (1usize..8)
            .prop_flat_map(|n| {
                (
                    proptest::collection::vec(proptest::option::weighted(0.8, 0u64..12), n),
                    proptest::collection::vec(any::<prop::sample::Index>(), n),
                )
            })
            .prop_map(|(caps, picks)| {
                let parent = picks
                    .iter()
                    .enumerate()
                    .map(|(i, pick)| if i == 0 { 0 } else { pick.index(i) })
                    .collect();
                Tree { caps, parent }
            })
    }

    proptest! {
        /// Applying plans sequentially to a simulated store: no level ever exceeds its
        /// cap, counts only grow (by exactly one per level on a commit, not at all
        /// otherwise), the family chain is gapless and linked, and every refusal is
        /// justified by a full level.
        #[test]
        fn never_over_cap_and_monotonic(
            tree in tree_strategy(),
            claims in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..4), 0..80),
        ) {
            let n = tree.caps.len();
            let mut counts = vec![0u64; n];
            let mut head: Option<(u64, String)> = None;
            let mut replay_store: std::collections::HashMap<(usize, u8), (StoredIdempotency, Vec<u64>)> =
                std::collections::HashMap::new();
            for (pick, key) in claims {
                let node = pick.index(n);
                let path = tree.path(node);
                let levels: Vec<Level> = path
                    .iter()
                    .map(|&i| level(u8::try_from(i).unwrap() + 1, tree.caps[i]))
                    .collect();
                let mut req = request(levels);
                let key_s = key.to_string();
                req.idempotency_key = Some(key_s.clone());
                let stored = replay_store.get(&(node, key)).map(|(r, _)| r.clone());
                let state = ClaimState {
                    idempotency: stored,
                    revoked: vec![false; path.len()],
                    counts: path.iter().map(|&i| counts[i]).collect(),
                    chain_head: head.clone(),
                    voids: 0,
                    minute_count: 0,
                };
                let ctx = ClaimContext { idempotency_key: &key_s, ..CTX };
                let before = counts.clone();
                match plan_claim(&req, &state, &ctx).unwrap() {
                    Plan::Commit { new_counts, body, remaining, .. } => {
                        prop_assert_eq!(body.seq, counts[0] + 1);
                        prop_assert_eq!(body.prev.clone(), head.as_ref().map(|(_, h)| h.clone()));
                        for (&i, &c) in path.iter().zip(&new_counts) {
                            prop_assert_eq!(c, counts[i] + 1);
                            if let Some(cap) = tree.caps[i] { prop_assert!(c <= cap); }
                            counts[i] = c;
                        }
                        for (slot, &i) in body.slots.iter().zip(&path) {
                            prop_assert_eq!(slot.slot, counts[i]);
                        }
                        prop_assert_eq!(remaining, super::remaining(&req.levels, &new_counts));
                        let hash = format!("h{}", body.seq);
                        head = Some((body.seq, hash.clone()));
                        replay_store.insert(
                            (node, key),
                            (StoredIdempotency::original(&req.request, &hash), new_counts),
                        );
                    }
                    Plan::Replay { receipt, record, .. } => {
                        let (orig, _) = &replay_store[&(node, key)];
                        prop_assert_eq!(&receipt, &orig.receipt);
                        prop_assert_eq!(record.replays, orig.replays + 1);
                        prop_assert!(record.replays <= MAX_REPLAYS);
                        let entry = replay_store.get_mut(&(node, key)).unwrap();
                        entry.0 = record;
                    }
                    Plan::Refuse(Refusal::CapReached { block, cap }) => {
                        prop_assert_eq!(Some(cap), tree.caps[path[block]]);
                        prop_assert_eq!(counts[path[block]], cap);
                        // Earlier levels all had room.
                        for (b, &i) in path.iter().enumerate().take(block) {
                            if let Some(c) = tree.caps[i] { prop_assert!(counts[i] < c, "level {}", b); }
                        }
                    }
                    Plan::Refuse(Refusal::ReplayLimit) => {
                        prop_assert_eq!(replay_store[&(node, key)].0.replays, MAX_REPLAYS);
                    }
                    other => prop_assert!(false, "unexpected plan {:?}", other),
                }
                for (b, a) in before.iter().zip(&counts) {
                    prop_assert!(a >= b);
                }
                for (i, &c) in counts.iter().enumerate() {
                    if let Some(cap) = tree.caps[i] { prop_assert!(c <= cap); }
                }
            }
            // The root counts every commit: the chain head is at the root's count.
            prop_assert_eq!(head.map(|(s, _)| s).unwrap_or(0), counts[0]);
        }
    }
}

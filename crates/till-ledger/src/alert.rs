//! Usage alerts: decided inside the claim (or revoke) transaction that causes them, and
//! written to a durable outbox in the same transaction, so each fires exactly once.
//!
//! - **Threshold**: a capped block's count reaches `ceil(cap * pct / 100)` (at least 1).
//!   Counters only ever go up by one per committed claim, so exactly one committed claim
//!   per block reaches each trigger value — across restarts and across a fleet, because
//!   counters are read and written serializably.
//! - **Rate**: a family's activations in the current clock minute reach `ceiling + 1`
//!   (once per family and minute).
//! - **Revocation**: a block goes from not revoked to revoked.
//!
//! The alert id is deterministic (`threshold:<rev id>:<pct>`, `rate:<family>:<minute>`,
//! `revocation:<rev id>`): it names the (block, threshold) pair, and it is the
//! `webhook-id` of its deliveries, so a receiver can deduplicate a redelivery after a
//! crash between the receiver's acknowledgement and the ledger's "delivered" mark.
//! Normative: `spec/admin.md`.

use serde::{Deserialize, Serialize};

use crate::family::BlockMeta;
use crate::Level;

/// Which alerts the ledger decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertPolicy {
    /// Percentages of each capped block's cap (1..=100, sorted, distinct).
    pub thresholds: Vec<u8>,
    /// A family's activations per clock minute above this fire a rate alert.
    pub rate_per_minute: Option<u64>,
    /// Revocations fire an alert.
    pub revocations: bool,
}

impl Default for AlertPolicy {
    /// Thresholds 80 % and 100 %, no rate ceiling, revocation alerts on.
    fn default() -> Self {
        Self {
            thresholds: vec![80, 100],
            rate_per_minute: None,
            revocations: true,
        }
    }
}

impl AlertPolicy {
    /// No alerts at all.
    pub fn none() -> Self {
        Self {
            thresholds: Vec::new(),
            rate_per_minute: None,
            revocations: false,
        }
    }

    /// Validates and normalises (sorts, dedups) the thresholds.
    pub fn normalized(mut self) -> Result<Self, String> {
        if let Some(bad) = self.thresholds.iter().find(|&&t| t == 0 || t > 100) {
            return Err(format!("alert threshold {bad}% must be between 1 and 100"));
        }
        self.thresholds.sort_unstable();
        self.thresholds.dedup();
        if self.rate_per_minute == Some(0) {
            return Err("alert rate ceiling must be at least 1 per minute".into());
        }
        Ok(self)
    }
}

/// The count at which a threshold fires for `cap` (never 0).
pub fn trigger(cap: u64, pct: u8) -> u64 {
    let t = (u128::from(cap) * u128::from(pct)).div_ceil(100);
    u64::try_from(t).unwrap_or(u64::MAX).max(1)
}

/// What kind of alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertKind {
    /// A block's usage reached a threshold of its cap.
    Threshold,
    /// A family's rate exceeded the ceiling.
    Rate,
    /// A block was revoked.
    Revocation,
}

/// Delivery state of an alert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeliveryStatus {
    /// Waiting for (another) delivery attempt.
    Pending,
    /// A receiver acknowledged it (2xx).
    Delivered,
    /// No webhook is configured: recorded and logged only.
    NotConfigured,
}

/// Delivery bookkeeping.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Delivery {
    /// Current status.
    pub status: DeliveryStatus,
    /// Attempts so far.
    pub attempts: u32,
    /// Last failure, for operators (never a secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// When the next attempt is due (Unix seconds), while pending.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt: Option<u64>,
    /// When it was delivered (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<u64>,
}

impl Delivery {
    fn pending(at: u64) -> Self {
        Self {
            status: DeliveryStatus::Pending,
            attempts: 0,
            last_error: None,
            next_attempt: Some(at),
            delivered_at: None,
        }
    }
}

/// One alert, as stored in the outbox and sent as the webhook payload (minus
/// `delivery`). Names families and blocks by revocation id; never a key or credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertRecord {
    /// Deterministic id (see the module docs); the webhook-id.
    pub id: String,
    /// Kind.
    pub kind: AlertKind,
    /// When it fired (Unix seconds).
    pub at: u64,
    /// Family id (hex).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub family: Option<String>,
    /// The block concerned (hex revocation id); for rate alerts, the family's root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revocation_id: Option<String>,
    /// The block's index in the presented key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub block: Option<u32>,
    /// The family's label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Usage at the time (threshold alerts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub used: Option<u64>,
    /// The block's cap (threshold alerts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<u64>,
    /// The threshold crossed, percent (threshold alerts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threshold: Option<u8>,
    /// Activations in the minute so far (rate alerts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_per_minute: Option<u64>,
    /// The configured ceiling (rate alerts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<u64>,
    /// Delivery state.
    pub delivery: Delivery,
}

impl AlertRecord {
    /// The webhook payload: the record without its delivery bookkeeping.
    pub fn payload(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.remove("delivery");
            o.insert(
                "type".into(),
                serde_json::json!(format!("till.alert.{}", kind_name(self.kind))),
            );
        }
        v
    }

    /// Serialized form, as stored.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Parses [`AlertRecord::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, crate::LedgerError> {
        serde_json::from_slice(bytes)
            .map_err(|e| crate::LedgerError::Corrupt(format!("alert record: {e}")))
    }
}

fn kind_name(kind: AlertKind) -> &'static str {
    match kind {
        AlertKind::Threshold => "threshold",
        AlertKind::Rate => "rate",
        AlertKind::Revocation => "revocation",
    }
}

/// Threshold and rate alerts fired by a claim that moves every level from `old` to
/// `new` counts and the family's current-minute count from `minute_count - 1` to
/// `minute_count`. Pure; called by [`crate::plan::plan_claim`].
pub fn claim_alerts(
    policy: &AlertPolicy,
    levels: &[Level],
    meta: Option<&[BlockMeta]>,
    new_counts: &[u64],
    now: u64,
    minute_count: u64,
) -> Vec<AlertRecord> {
    let family = levels.first().map(|l| hex::encode(&l.revocation_id));
    let label = meta.and_then(|m| m.first()).and_then(|m| m.label.clone());
    let mut out = Vec::new();
    for (index, (level, &count)) in levels.iter().zip(new_counts).enumerate() {
        let Some(cap) = level.cap else { continue };
        for &pct in &policy.thresholds {
            if count == trigger(cap, pct) {
                let rev = hex::encode(&level.revocation_id);
                out.push(AlertRecord {
                    id: format!("threshold:{rev}:{pct}"),
                    kind: AlertKind::Threshold,
                    at: now,
                    family: family.clone(),
                    revocation_id: Some(rev),
                    block: u32::try_from(index).ok(),
                    label: label.clone(),
                    used: Some(count),
                    cap: Some(cap),
                    threshold: Some(pct),
                    rate_per_minute: None,
                    ceiling: None,
                    delivery: Delivery::pending(now),
                });
            }
        }
    }
    if let (Some(ceiling), Some(fam)) = (policy.rate_per_minute, &family) {
        if minute_count == ceiling.saturating_add(1) {
            out.push(AlertRecord {
                id: format!("rate:{fam}:{}", now / 60),
                kind: AlertKind::Rate,
                at: now,
                family: family.clone(),
                revocation_id: family.clone(),
                block: Some(0),
                label: label.clone(),
                used: None,
                cap: None,
                threshold: None,
                rate_per_minute: Some(minute_count),
                ceiling: Some(ceiling),
                delivery: Delivery::pending(now),
            });
        }
    }
    out
}

/// The alert for a block that just became revoked (`None` when the policy has none).
pub fn revocation_alert(
    policy: &AlertPolicy,
    revocation_id: &[u8],
    family: Option<String>,
    block: Option<u32>,
    label: Option<String>,
    now: u64,
) -> Option<AlertRecord> {
    if !policy.revocations {
        return None;
    }
    let rev = hex::encode(revocation_id);
    Some(AlertRecord {
        id: format!("revocation:{rev}"),
        kind: AlertKind::Revocation,
        at: now,
        family,
        revocation_id: Some(rev),
        block,
        label,
        used: None,
        cap: None,
        threshold: None,
        rate_per_minute: None,
        ceiling: None,
        delivery: Delivery::pending(now),
    })
}

/// The outcome of one delivery attempt, reported back with [`crate::Ledger::settle_alert`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertOutcome {
    /// The receiver acknowledged it at this time.
    Delivered {
        /// Unix seconds.
        at: u64,
    },
    /// The attempt failed; try again at `retry_at`.
    Failed {
        /// What went wrong (no secrets).
        error: String,
        /// Unix seconds.
        retry_at: u64,
    },
    /// No webhook configured: mark it recorded-only.
    NotConfigured,
}

/// Applies an outcome to a stored record (pure; every backend stores the result).
pub fn settle(record: &mut AlertRecord, outcome: &AlertOutcome) {
    let d = &mut record.delivery;
    match outcome {
        AlertOutcome::Delivered { at } => {
            d.status = DeliveryStatus::Delivered;
            d.delivered_at = Some(*at);
            d.next_attempt = None;
            d.last_error = None;
        }
        AlertOutcome::Failed { error, retry_at } => {
            d.status = DeliveryStatus::Pending;
            d.last_error = Some(error.clone());
            d.next_attempt = Some(*retry_at);
        }
        AlertOutcome::NotConfigured => {
            d.status = DeliveryStatus::NotConfigured;
            d.next_attempt = None;
        }
    }
}

/// Leases a due pending record for `lease` seconds from `now` (pure): counts the
/// attempt and pushes `next_attempt` out so no other deliverer (another proxy of the
/// fleet) takes it meanwhile. `false` when it is not due or not pending.
pub fn lease(record: &mut AlertRecord, now: u64, lease: u64) -> bool {
    let d = &mut record.delivery;
    if d.status != DeliveryStatus::Pending || d.next_attempt.is_some_and(|t| t > now) {
        return false;
    }
    d.attempts = d.attempts.saturating_add(1);
    d.next_attempt = Some(now.saturating_add(lease));
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn level(id: u8, cap: Option<u64>) -> Level {
        Level {
            revocation_id: vec![id; 4],
            cap,
        }
    }

    #[test]
    fn triggers() {
        assert_eq!(trigger(10, 80), 8);
        assert_eq!(trigger(10, 100), 10);
        assert_eq!(trigger(3, 80), 3);
        assert_eq!(trigger(1, 1), 1);
        assert_eq!(trigger(0, 80), 1);
        assert_eq!(trigger(u64::MAX, 100), u64::MAX);
    }

    #[test]
    fn each_threshold_fires_at_exactly_one_count() {
        let policy = AlertPolicy::default();
        let levels = [level(1, Some(10)), level(2, None)];
        let mut fired = Vec::new();
        for c in 1..=12 {
            fired.extend(claim_alerts(&policy, &levels, None, &[c, c], 0, 1));
        }
        let ids: Vec<_> = fired.iter().map(|a| a.id.as_str()).collect();
        assert_eq!(ids, ["threshold:01010101:80", "threshold:01010101:100"]);
        assert_eq!(fired[0].used, Some(8));
    }

    #[test]
    fn rate_fires_once_per_minute_at_ceiling_plus_one() {
        let policy = AlertPolicy {
            rate_per_minute: Some(3),
            ..AlertPolicy::none()
        };
        let levels = [level(1, None)];
        let fired: Vec<_> = (1..=6)
            .flat_map(|m| claim_alerts(&policy, &levels, None, &[m], 120, m))
            .collect();
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].id, "rate:01010101:2");
        assert_eq!(fired[0].rate_per_minute, Some(4));
    }

    #[test]
    fn lease_and_settle() {
        let mut a = revocation_alert(&AlertPolicy::default(), &[9], None, None, None, 100).unwrap();
        assert!(lease(&mut a, 100, 30));
        assert!(!lease(&mut a, 110, 30), "leased: not due again until 130");
        settle(
            &mut a,
            &AlertOutcome::Failed {
                error: "503".into(),
                retry_at: 140,
            },
        );
        assert!(!lease(&mut a, 139, 30));
        assert!(lease(&mut a, 140, 30));
        assert_eq!(a.delivery.attempts, 2);
        settle(&mut a, &AlertOutcome::Delivered { at: 141 });
        assert!(!lease(&mut a, 1000, 30));
        assert_eq!(a.payload()["type"], "till.alert.revocation");
        assert!(a.payload().get("delivery").is_none());
        assert!(AlertPolicy {
            thresholds: vec![0],
            ..AlertPolicy::none()
        }
        .normalized()
        .is_err());
    }
}

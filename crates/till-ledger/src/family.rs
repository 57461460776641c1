//! What the ledger knows about key families, for the admin plane: the blocks it has seen
//! (recorded the first time a claim presents them, or when the admin API mints a key),
//! per-minute activity, and the read models the admin API serves.
//!
//! Minting stays stateless: a key the ledger never saw is simply not listed until its
//! first claim (unless it was minted through the admin API, which records it). Records
//! are written once per block, never per claim; per-claim cost is one per-minute activity
//! counter per family.

use serde::{Deserialize, Serialize};

/// How many per-minute activity buckets a family keeps (older ones are deleted).
pub const ACTIVITY_MINUTES: u64 = 120;

/// The caveats of one block, as plain data (the ledger does not parse keys). Mirrors the
/// Till caveat vocabulary of `spec/token.md`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMeta {
    /// Human label (authority block only, by convention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// Upstream name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Allowed methods (empty: not restricted by this block).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub methods: Vec<String>,
    /// Allowed path prefixes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// Allowed models.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<String>,
    /// Expiry, Unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// Activation cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<u64>,
}

/// One block as recorded by the ledger (written once).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockRecord {
    /// Family id (authority block revocation id), hex.
    pub family: String,
    /// This block's revocation id, hex.
    pub revocation_id: String,
    /// Position in its key (0 = authority).
    pub index: u32,
    /// The revocation id of the block it was appended to (hex); `None` for the authority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Its caveats.
    pub caveats: BlockMeta,
    /// Unix seconds when the ledger first recorded it.
    pub recorded_at: u64,
    /// True when it was minted (or attenuated) through the admin API.
    #[serde(default)]
    pub minted: bool,
}

/// The blocks of one key, authority first, as a claim or a mint presents them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyBlocks {
    /// `(revocation id, caveats)` per block, authority first. Never empty.
    pub blocks: Vec<(Vec<u8>, BlockMeta)>,
}

impl KeyBlocks {
    /// The records for these blocks, as they would be written at `at`.
    pub fn records(&self, at: u64, minted: bool) -> Vec<BlockRecord> {
        let family = self
            .blocks
            .first()
            .map(|(id, _)| hex::encode(id))
            .unwrap_or_default();
        let mut parent: Option<String> = None;
        let mut out = Vec::with_capacity(self.blocks.len());
        for (index, (id, meta)) in self.blocks.iter().enumerate() {
            let revocation_id = hex::encode(id);
            out.push(BlockRecord {
                family: family.clone(),
                revocation_id: revocation_id.clone(),
                index: u32::try_from(index).unwrap_or(u32::MAX),
                parent: parent.replace(revocation_id),
                caveats: meta.clone(),
                recorded_at: at,
                minted,
            });
        }
        out
    }
}

/// Recent activity of a family, from its per-minute buckets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Activity {
    /// Activations in the last 60 seconds (sliding-window estimate: the current minute's
    /// count plus the previous minute's, weighted by the part of it still inside the
    /// window).
    pub last_minute: u64,
    /// Activations in the last 60 whole minutes plus the current one.
    pub last_hour: u64,
    /// Activations per minute for the last 60 minutes, oldest first, the current
    /// (partial) minute last.
    pub per_minute: Vec<u64>,
}

impl Activity {
    /// Computes the activity at `now` from `(minute, count)` buckets (any order; minutes
    /// are `unix_seconds / 60`).
    pub fn from_buckets(now: u64, buckets: &[(u64, u64)]) -> Self {
        let current = now / 60;
        let count = |m: u64| {
            buckets
                .iter()
                .filter(|(bm, _)| *bm == m)
                .map(|(_, c)| *c)
                .sum::<u64>()
        };
        let per_minute: Vec<u64> = (0..60)
            .rev()
            .map(|back| current.checked_sub(back).map_or(0, count))
            .collect();
        let elapsed = now % 60;
        let previous = current.checked_sub(1).map_or(0, count);
        let last_minute = count(current) + previous * (60 - elapsed) / 60;
        let last_hour = buckets
            .iter()
            .filter(|(m, _)| *m + 60 >= current && *m <= current)
            .map(|(_, c)| *c)
            .sum();
        Self {
            last_minute,
            last_hour,
            per_minute,
        }
    }
}

/// A family as the admin API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyView {
    /// Family id (hex).
    pub family: String,
    /// The authority block's label.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The authority block's upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// The root block's cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cap: Option<u64>,
    /// Activations claimed through the family (every key derived from the root).
    pub used: u64,
    /// `cap - used` (absent when uncapped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// Whether the root block is revoked.
    pub revoked: bool,
    /// When the root key expires (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires: Option<u64>,
    /// When the ledger first recorded the family (Unix seconds).
    pub recorded_at: u64,
    /// Minted through the admin API.
    pub minted: bool,
    /// Time of the first activation still in the ledger (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_activation: Option<u64>,
    /// Time of the latest activation (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_activation: Option<u64>,
    /// Blocks the ledger knows of this family.
    pub blocks: u64,
    /// Recent activity.
    pub activity: Activity,
}

/// One block of a family with its live state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockView {
    /// The recorded block.
    #[serde(flatten)]
    pub record: BlockRecord,
    /// Activations claimed through this block and its descendants.
    pub used: u64,
    /// `cap - used` (absent when uncapped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remaining: Option<u64>,
    /// Revoked (directly; a revoked ancestor also kills it).
    pub revoked: bool,
    /// When it was revoked (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_at: Option<u64>,
}

/// A family with every block the ledger knows of it, in (index, revocation id) order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FamilyDetail {
    /// The summary.
    pub family: FamilyView,
    /// Its blocks.
    pub blocks: Vec<BlockView>,
}

/// `cap - used`, saturating; `None` when uncapped.
pub fn remaining_of(cap: Option<u64>, used: u64) -> Option<u64> {
    cap.map(|c| c.saturating_sub(used))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_link_each_block_to_its_parent() {
        let kb = KeyBlocks {
            blocks: vec![
                (vec![1; 4], BlockMeta::default()),
                (vec![2; 4], BlockMeta::default()),
                (vec![3; 4], BlockMeta::default()),
            ],
        };
        let r = kb.records(9, true);
        assert_eq!(r[0].parent, None);
        assert_eq!(r[1].parent.as_deref(), Some("01010101"));
        assert_eq!(r[2].parent.as_deref(), Some("02020202"));
        assert!(r.iter().all(|b| b.family == "01010101" && b.minted));
        assert_eq!(r[2].index, 2);
    }

    #[test]
    fn activity_windows() {
        let now = 60 * 1000 + 30; // half-way through minute 1000
        let a = Activity::from_buckets(now, &[(1000, 4), (999, 10), (990, 7), (900, 100)]);
        assert_eq!(a.last_minute, 4 + 5);
        assert_eq!(a.last_hour, 21);
        assert_eq!(a.per_minute.len(), 60);
        assert_eq!(a.per_minute[59], 4);
        assert_eq!(a.per_minute[58], 10);
        assert_eq!(a.per_minute[49], 7);
        assert_eq!(a.per_minute.iter().sum::<u64>(), 21);
    }
}

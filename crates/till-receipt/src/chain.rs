//! The receipt chain audit: one family's receipts, checked end to end.
//!
//! Every claim on a family advances the family's counter, so the family's receipts form
//! a single sequence: receipt `seq` names the hash of receipt `seq - 1`. A **void**
//! receipt (`void: Some(k)`) gives the slot of claim `k` back (the upstream was
//! unreachable, nothing was sent): it takes the next `seq` like any receipt and lowers
//! every level that claim counted by one. The audit replays the counters: a claim takes,
//! at every level, the slot `net count + 1` (without voids: `slot == seq` at the
//! authority, and each level's slots are exactly `1..=used`).

use std::collections::{HashMap, HashSet};

use serde::Serialize;

use crate::error::ReceiptError;
use crate::jws::Receipt;
use crate::key::ReceiptKeySet;

/// What [`audit_chain`] found.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditReport {
    /// Family id (hex).
    pub family: String,
    /// Number of receipts checked (claims and voids).
    pub receipts: u64,
    /// Claim receipts.
    pub claims: u64,
    /// Void receipts: claims given back because nothing was sent upstream.
    pub voids: u64,
    /// Activations charged: `claims - voids` (the family level's `used`).
    pub charged: u64,
    /// Per revocation id (hex), in the order first seen: activations charged (net of
    /// voids) and declared cap. The first entry is the family's own (authority) level.
    pub levels: Vec<LevelUsage>,
}

/// Usage of one block as seen in the receipts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LevelUsage {
    /// Revocation id (hex).
    pub revocation_id: String,
    /// Activations charged at this level (claims naming it, minus voids of them).
    pub used: u64,
    /// Declared cap, if any.
    pub cap: Option<u64>,
}

/// One level's running state during the audit.
struct Level {
    revocation_id: String,
    block: u32,
    cap: Option<u64>,
    /// Net count so far: claims naming the level minus voids of them.
    count: u64,
}

/// Audits one family's receipts, given in `seq` order: every signature verifies, `seq` runs
/// 1..=n with no gap and no duplicate, every `prev` names the previous receipt's hash
/// (no fork), each claim takes the next slot at every level, no level exceeds its declared
/// cap, and every void gives back one earlier claim exactly once.
///
/// Checks, per receipt in order (the first failure is returned):
/// 1. the signature verifies with a key in `keys` ([`ReceiptError::UnknownKeyId`],
///    [`ReceiptError::BadSignature`]);
/// 2. `family` is the first receipt's ([`ReceiptError::FamilyMismatch`]);
/// 3. `seq` is the previous `seq + 1`, starting at 1 ([`ReceiptError::Gap`],
///    [`ReceiptError::Fork`], [`ReceiptError::Duplicate`], [`ReceiptError::OutOfOrder`]);
/// 4. `prev` is `None` for seq 1, else the previous receipt's link for this receipt's
///    version ([`Receipt::link_for_version`]: [`Receipt::hash_hex`], the signing input's
///    hash, from version 2 on; the compact string's hash in version 1), and the version
///    never decreases along the chain ([`ReceiptError::BrokenLink`]); once a receipt
///    names its `ledger`, every later one names the same ([`ReceiptError::LedgerMismatch`]);
/// 5. a claim: `slots[0]` is the family's level with `slot` = the family's net count + 1
///    (`== seq` when there are no voids) ([`ReceiptError::AuthoritySlotMismatch`]),
///    `slots[i].block == i` ([`ReceiptError::BlockOrder`]), no level twice in one receipt
///    ([`ReceiptError::DuplicateLevel`]), a level keeps its block index and cap
///    ([`ReceiptError::LevelMismatch`]), slots are 1-based ([`ReceiptError::SlotZero`]),
///    not one still held ([`ReceiptError::SlotReused`]), within the cap
///    ([`ReceiptError::OverCap`]) and exactly the level's net count + 1
///    ([`ReceiptError::SlotGap`]);
/// 6. a void: names an earlier claim of the chain ([`ReceiptError::VoidUnknown`]) not
///    voided before ([`ReceiptError::VoidTwice`]), and repeats its `slots`, `request`
///    and `idempotency_key` ([`ReceiptError::VoidMismatch`]); every level of that claim
///    goes down by one.
///
/// An empty input is [`ReceiptError::EmptyChain`].
pub fn audit_chain(
    receipts: &[Receipt],
    keys: &ReceiptKeySet,
) -> Result<AuditReport, ReceiptError> {
    let first = receipts.first().ok_or(ReceiptError::EmptyChain)?;
    let family = first.body().family.as_str();
    let mut levels: Vec<Level> = Vec::new();
    let mut level_index: HashMap<String, usize> = HashMap::new();
    let mut previous: Option<&Receipt> = None;
    // Claim receipts by seq, and the claims voided so far.
    let mut claims: HashMap<u64, &Receipt> = HashMap::new();
    let mut voided: HashSet<u64> = HashSet::new();

    for receipt in receipts {
        receipt.verify(keys)?;
        let body = receipt.body();
        let seq = body.seq;
        if body.family != family {
            return Err(ReceiptError::FamilyMismatch { seq });
        }
        check_position(receipt, previous)?;
        // The link a receipt names depends on its own format version (v1: the compact
        // string's hash; v2: the signing input's). A chain never goes back to v1.
        let expected_prev = previous.map(|p| p.link_for_version(body.v));
        let downgrade = previous.is_some_and(|p| p.body().v > body.v);
        if body.prev != expected_prev || downgrade {
            return Err(ReceiptError::BrokenLink { seq });
        }
        // Once a receipt names its ledger, every later one names the same ledger.
        if let Some(earlier) = previous.and_then(|p| p.body().ledger.as_deref()) {
            if body.ledger.as_deref() != Some(earlier) {
                return Err(ReceiptError::LedgerMismatch { seq });
            }
        }
        previous = Some(receipt);

        if let Some(void) = body.void {
            let claim = claims
                .get(&void)
                .filter(|_| void < seq)
                .ok_or(ReceiptError::VoidUnknown { seq, void })?;
            if voided.contains(&void) {
                return Err(ReceiptError::VoidTwice { seq, void });
            }
            let original = claim.body();
            if original.slots != body.slots
                || original.request != body.request
                || original.idempotency_key != body.idempotency_key
            {
                return Err(ReceiptError::VoidMismatch { seq, void });
            }
            for slot in &body.slots {
                let level = level_index
                    .get(&slot.revocation_id)
                    .and_then(|&i| levels.get_mut(i))
                    .filter(|level| level.count > 0)
                    .ok_or(ReceiptError::VoidMismatch { seq, void })?;
                level.count -= 1;
            }
            voided.insert(void);
            continue;
        }

        let family_count = level_index.get(family).map_or(0, |&i| levels[i].count);
        match body.slots.first() {
            Some(authority)
                if authority.revocation_id == family
                    && Some(authority.slot) == family_count.checked_add(1) => {}
            _ => return Err(ReceiptError::AuthoritySlotMismatch { seq }),
        }
        let mut in_this_receipt: HashSet<&str> = HashSet::with_capacity(body.slots.len());
        for (position, claim) in body.slots.iter().enumerate() {
            if usize::try_from(claim.block).ok() != Some(position) {
                return Err(ReceiptError::BlockOrder { seq });
            }
            let rid = claim.revocation_id.as_str();
            if !in_this_receipt.insert(rid) {
                return Err(ReceiptError::DuplicateLevel {
                    seq,
                    revocation_id: rid.to_owned(),
                });
            }
            let index = *level_index.entry(rid.to_owned()).or_insert_with(|| {
                levels.push(Level {
                    revocation_id: rid.to_owned(),
                    block: claim.block,
                    cap: claim.cap,
                    count: 0,
                });
                levels.len() - 1
            });
            let level = &mut levels[index];
            if level.block != claim.block || level.cap != claim.cap {
                return Err(ReceiptError::LevelMismatch {
                    seq,
                    revocation_id: rid.to_owned(),
                });
            }
            if claim.slot == 0 {
                return Err(ReceiptError::SlotZero {
                    seq,
                    revocation_id: rid.to_owned(),
                });
            }
            if claim.slot <= level.count {
                return Err(ReceiptError::SlotReused {
                    revocation_id: rid.to_owned(),
                    slot: claim.slot,
                });
            }
            if let Some(cap) = level.cap.filter(|cap| claim.slot > *cap) {
                return Err(ReceiptError::OverCap {
                    revocation_id: rid.to_owned(),
                    cap,
                    slot: claim.slot,
                });
            }
            let next = level.count.saturating_add(1);
            if claim.slot != next {
                return Err(ReceiptError::SlotGap {
                    revocation_id: rid.to_owned(),
                    used: next,
                    max: claim.slot,
                });
            }
            level.count = next;
        }
        claims.insert(seq, receipt);
    }

    let usage: Vec<LevelUsage> = levels
        .into_iter()
        .map(|level| LevelUsage {
            revocation_id: level.revocation_id,
            used: level.count,
            cap: level.cap,
        })
        .collect();
    let voids = voided.len() as u64;
    let claims = claims.len() as u64;
    Ok(AuditReport {
        family: family.to_owned(),
        receipts: receipts.len() as u64,
        claims,
        voids,
        charged: claims - voids,
        levels: usage,
    })
}

/// `seq` must follow the previous receipt's by exactly one, starting at 1.
fn check_position(receipt: &Receipt, previous: Option<&Receipt>) -> Result<(), ReceiptError> {
    let found = receipt.body().seq;
    let Some(previous) = previous else {
        return match found {
            1 => Ok(()),
            _ => Err(ReceiptError::Gap { expected: 1, found }),
        };
    };
    let last = previous.body().seq;
    if found == last {
        return Err(if receipt.compact() == previous.compact() {
            ReceiptError::Duplicate { seq: found }
        } else {
            ReceiptError::Fork { seq: found }
        });
    }
    if found < last {
        return Err(ReceiptError::OutOfOrder {
            previous: last,
            found,
        });
    }
    let expected = last.saturating_add(1);
    if found != expected {
        return Err(ReceiptError::Gap { expected, found });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use ed25519_dalek::Signer as _;

    use super::*;
    use crate::body::{ReceiptBody, RequestDigest, SlotClaim};
    use crate::key::ReceiptSigner;

    const ROOT: &str = "aa";
    const CHILD: &str = "bb";
    const SIBLING: &str = "cc";

    fn signer() -> ReceiptSigner {
        ReceiptSigner::from_seed([3; 32])
    }

    fn keys() -> ReceiptKeySet {
        [signer().public_key()].into_iter().collect()
    }

    fn claim(block: u32, rid: &str, slot: u64, cap: Option<u64>) -> SlotClaim {
        SlotClaim {
            block,
            revocation_id: rid.into(),
            slot,
            cap,
        }
    }

    fn body(seq: u64, slots: Vec<SlotClaim>, prev: Option<String>) -> ReceiptBody {
        ReceiptBody {
            v: 2,
            family: ROOT.into(),
            seq,
            slots,
            request: RequestDigest {
                method: "GET".into(),
                upstream: "github".into(),
                path: "/user".into(),
                body_sha256: String::new(),
                model: None,
                query: None,
                content_type: None,
            },
            iat: 1_700_000_000 + seq,
            proxy: "p1".into(),
            kid: signer().key_id().into(),
            idempotency_key: format!("k{seq}"),
            prev,
            ledger: None,
            ceilings: None,
            void: None,
        }
    }

    /// Signs one receipt per entry, linking each `prev` to the receipt before it. Each
    /// entry is (seq, [(rid, slot)]) with root cap 10 and sub-caps 2.
    fn chain(entries: &[(u64, &[(&str, u64)])]) -> Vec<Receipt> {
        let s = signer();
        let mut out: Vec<Receipt> = Vec::new();
        for (seq, levels) in entries {
            let slots = levels
                .iter()
                .enumerate()
                .map(|(i, (rid, slot))| {
                    let cap = if *rid == ROOT { 10 } else { 2 };
                    claim(i as u32, rid, *slot, Some(cap))
                })
                .collect();
            let prev = out.last().map(Receipt::hash_hex);
            out.push(s.sign(&body(*seq, slots, prev)).unwrap());
        }
        out
    }

    fn good() -> Vec<Receipt> {
        chain(&[
            (1, &[(ROOT, 1)]),
            (2, &[(ROOT, 2), (CHILD, 1)]),
            (3, &[(ROOT, 3), (SIBLING, 1)]),
            (4, &[(ROOT, 4), (CHILD, 2)]),
        ])
    }

    /// Re-signs `receipts[index]` after `edit`, keeping later links intact by re-linking.
    fn edit(receipts: &mut [Receipt], index: usize, edit: impl FnOnce(&mut ReceiptBody)) {
        let s = signer();
        let mut b = receipts[index].body().clone();
        edit(&mut b);
        receipts[index] = s.sign(&b).unwrap();
        for i in index + 1..receipts.len() {
            let mut b = receipts[i].body().clone();
            b.prev = Some(receipts[i - 1].hash_hex());
            receipts[i] = s.sign(&b).unwrap();
        }
    }

    #[test]
    fn a_good_chain_reports_usage_per_level() {
        let report = audit_chain(&good(), &keys()).unwrap();
        assert_eq!(report.family, ROOT);
        assert_eq!(report.receipts, 4);
        let levels: Vec<(&str, u64, Option<u64>)> = report
            .levels
            .iter()
            .map(|l| (l.revocation_id.as_str(), l.used, l.cap))
            .collect();
        assert_eq!(
            levels,
            vec![
                (ROOT, 4, Some(10)),
                (CHILD, 2, Some(2)),
                (SIBLING, 1, Some(2))
            ]
        );
    }

    #[test]
    fn a_prefix_of_a_good_chain_is_good() {
        let receipts = good();
        for n in 1..=receipts.len() {
            audit_chain(&receipts[..n], &keys()).unwrap();
        }
    }

    #[test]
    fn empty() {
        assert_eq!(audit_chain(&[], &keys()), Err(ReceiptError::EmptyChain));
    }

    #[test]
    fn gap() {
        let receipts = chain(&[(1, &[(ROOT, 1)]), (3, &[(ROOT, 3)])]);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::Gap {
                expected: 2,
                found: 3
            })
        );
        let receipts = chain(&[(2, &[(ROOT, 2)])]);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::Gap {
                expected: 1,
                found: 2
            })
        );
    }

    #[test]
    fn gap_by_omission() {
        let mut receipts = good();
        receipts.remove(1);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::Gap {
                expected: 2,
                found: 3
            })
        );
    }

    #[test]
    fn fork() {
        let mut receipts = good();
        receipts.truncate(2);
        let mut twin = receipts[1].body().clone();
        twin.idempotency_key = "another request".into();
        receipts.push(signer().sign(&twin).unwrap());
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::Fork { seq: 2 })
        );
    }

    #[test]
    fn duplicate_and_out_of_order() {
        let mut receipts = good();
        receipts.insert(2, receipts[1].clone());
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::Duplicate { seq: 2 })
        );
        let mut receipts = good();
        receipts.swap(1, 2);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::Gap {
                expected: 2,
                found: 3
            })
        );
        let mut receipts = good();
        receipts.push(receipts[0].clone());
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::OutOfOrder {
                previous: 4,
                found: 1
            })
        );
    }

    #[test]
    fn broken_link() {
        let mut receipts = good();
        edit(&mut receipts, 2, |b| b.prev = Some("00".repeat(32)));
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::BrokenLink { seq: 3 })
        );
        // Upper-case hex is not the canonical spelling of the link.
        let mut receipts = good();
        edit(&mut receipts, 1, |b| {
            b.prev = b.prev.as_ref().map(|p| p.to_uppercase());
        });
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::BrokenLink { seq: 2 })
        );
        let mut receipts = good();
        edit(&mut receipts, 0, |b| b.prev = Some("00".repeat(32)));
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::BrokenLink { seq: 1 })
        );
        let mut receipts = good();
        edit(&mut receipts, 1, |b| b.prev = None);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::BrokenLink { seq: 2 })
        );
    }

    /// Signs a version-1 body (which `sign` no longer writes) with the test key.
    fn sign_v1(mut b: ReceiptBody) -> Receipt {
        use base64::engine::general_purpose::URL_SAFE_NO_PAD;
        use base64::Engine as _;
        b.v = 1;
        let header = format!(
            r#"{{"alg":"EdDSA","kid":"{}","typ":"till-receipt+jwt"}}"#,
            signer().key_id()
        );
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(serde_json::to_vec(&b).unwrap())
        );
        let sig = signer().signing.sign(input.as_bytes()).to_bytes();
        Receipt::parse(&format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig))).unwrap()
    }

    /// Chains written before version 2 keep auditing: v1 receipts link by the compact
    /// hash, the first v2 receipt after them by the signing input's hash; a v2 receipt
    /// naming a compact hash, or a v1 receipt after a v2 one, is a broken link.
    #[test]
    fn version_1_then_version_2_chain() {
        let s = signer();
        let r1 = sign_v1(body(1, vec![claim(0, ROOT, 1, Some(10))], None));
        let r2 = sign_v1(body(
            2,
            vec![claim(0, ROOT, 2, Some(10))],
            Some(hex::encode(r1.compact_hash())),
        ));
        let r3 = s
            .sign(&body(
                3,
                vec![claim(0, ROOT, 3, Some(10))],
                Some(r2.hash_hex()),
            ))
            .unwrap();
        let report = audit_chain(&[r1.clone(), r2.clone(), r3], &keys()).unwrap();
        assert_eq!(report.receipts, 3);

        // v1 naming the signing-input hash, v2 naming the compact hash: broken.
        let bad_v1 = sign_v1(body(
            2,
            vec![claim(0, ROOT, 2, Some(10))],
            Some(r1.hash_hex()),
        ));
        assert_eq!(
            audit_chain(&[r1.clone(), bad_v1], &keys()),
            Err(ReceiptError::BrokenLink { seq: 2 })
        );
        let bad_v2 = s
            .sign(&body(
                3,
                vec![claim(0, ROOT, 3, Some(10))],
                Some(hex::encode(r2.compact_hash())),
            ))
            .unwrap();
        assert_eq!(
            audit_chain(&[r1.clone(), r2.clone(), bad_v2], &keys()),
            Err(ReceiptError::BrokenLink { seq: 3 })
        );
        // Back to v1 after v2: broken, whatever it names.
        let v2 = s
            .sign(&body(
                2,
                vec![claim(0, ROOT, 2, Some(10))],
                Some(r1.hash_hex()),
            ))
            .unwrap();
        let back = sign_v1(body(
            3,
            vec![claim(0, ROOT, 3, Some(10))],
            Some(hex::encode(v2.compact_hash())),
        ));
        assert_eq!(
            audit_chain(&[r1, v2, back], &keys()),
            Err(ReceiptError::BrokenLink { seq: 3 })
        );
    }

    /// Issue 10 item 11: receipts name the ledger that signed them; a chain that moves to
    /// another ledger (one emptied and started over, a foreign one) is refused, while a
    /// chain whose first receipts predate ledger ids is fine.
    #[test]
    fn ledger_mismatch() {
        let mut receipts = good();
        for i in 0..receipts.len() {
            edit(&mut receipts, i, |b| b.ledger = Some("aa@r-1".into()));
        }
        audit_chain(&receipts, &keys()).unwrap();
        let mut other = receipts.clone();
        edit(&mut other, 2, |b| b.ledger = Some("bb@r-1".into()));
        assert_eq!(
            audit_chain(&other, &keys()),
            Err(ReceiptError::LedgerMismatch { seq: 3 })
        );
        let mut none = receipts.clone();
        edit(&mut none, 3, |b| b.ledger = None);
        assert_eq!(
            audit_chain(&none, &keys()),
            Err(ReceiptError::LedgerMismatch { seq: 4 })
        );
        let mut later = good();
        edit(&mut later, 2, |b| b.ledger = Some("aa@r-1".into()));
        edit(&mut later, 3, |b| b.ledger = Some("aa@r-1".into()));
        audit_chain(&later, &keys()).unwrap();
    }

    #[test]
    fn a_changed_predecessor_breaks_the_link() {
        // Re-signing receipt 2 (even with the right key) changes its hash, which receipt
        // 3 still names the old value of.
        let mut receipts = good();
        let mut b = receipts[1].body().clone();
        b.iat += 1;
        receipts[1] = signer().sign(&b).unwrap();
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::BrokenLink { seq: 3 })
        );
    }

    #[test]
    fn over_cap() {
        let receipts = chain(&[
            (1, &[(ROOT, 1), (CHILD, 1)]),
            (2, &[(ROOT, 2), (CHILD, 2)]),
            (3, &[(ROOT, 3), (CHILD, 3)]),
        ]);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::OverCap {
                revocation_id: CHILD.into(),
                cap: 2,
                slot: 3
            })
        );
        let entries: Vec<(u64, Vec<(&str, u64)>)> =
            (1..=11).map(|i| (i, vec![(ROOT, i)])).collect();
        let entries: Vec<(u64, &[(&str, u64)])> =
            entries.iter().map(|(i, l)| (*i, l.as_slice())).collect();
        assert_eq!(
            audit_chain(&chain(&entries), &keys()),
            Err(ReceiptError::OverCap {
                revocation_id: ROOT.into(),
                cap: 10,
                slot: 11
            })
        );
    }

    #[test]
    fn slot_reused() {
        let receipts = chain(&[(1, &[(ROOT, 1), (CHILD, 1)]), (2, &[(ROOT, 2), (CHILD, 1)])]);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::SlotReused {
                revocation_id: CHILD.into(),
                slot: 1
            })
        );
    }

    #[test]
    fn slot_gap() {
        let receipts = chain(&[(1, &[(ROOT, 1), (CHILD, 2)])]);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::SlotGap {
                revocation_id: CHILD.into(),
                used: 1,
                max: 2
            })
        );
    }

    #[test]
    fn slot_zero() {
        let receipts = chain(&[(1, &[(ROOT, 1), (CHILD, 0)])]);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::SlotZero {
                seq: 1,
                revocation_id: CHILD.into()
            })
        );
    }

    #[test]
    fn authority_slot_must_be_the_family_at_seq() {
        for slots in [
            vec![],
            vec![claim(0, ROOT, 2, None)],
            vec![claim(0, CHILD, 1, None)],
        ] {
            let receipts = vec![signer().sign(&body(1, slots, None)).unwrap()];
            assert_eq!(
                audit_chain(&receipts, &keys()),
                Err(ReceiptError::AuthoritySlotMismatch { seq: 1 })
            );
        }
    }

    #[test]
    fn block_order_and_duplicate_level() {
        let slots = vec![claim(0, ROOT, 1, None), claim(2, CHILD, 1, None)];
        let receipts = vec![signer().sign(&body(1, slots, None)).unwrap()];
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::BlockOrder { seq: 1 })
        );
        let slots = vec![claim(0, ROOT, 1, None), claim(1, ROOT, 1, None)];
        let receipts = vec![signer().sign(&body(1, slots, None)).unwrap()];
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::DuplicateLevel {
                seq: 1,
                revocation_id: ROOT.into()
            })
        );
    }

    #[test]
    fn level_mismatch() {
        let mut receipts = good();
        edit(&mut receipts, 3, |b| b.slots[1].cap = Some(3));
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::LevelMismatch {
                seq: 4,
                revocation_id: CHILD.into()
            })
        );
    }

    #[test]
    fn family_mismatch() {
        let mut receipts = good();
        edit(&mut receipts, 2, |b| b.family = "dd".into());
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::FamilyMismatch { seq: 3 })
        );
    }

    #[test]
    fn unknown_kid() {
        let receipts = good();
        let stranger = ReceiptSigner::from_seed([9; 32]);
        let only_stranger: ReceiptKeySet = [stranger.public_key()].into_iter().collect();
        assert_eq!(
            audit_chain(&receipts, &only_stranger),
            Err(ReceiptError::UnknownKeyId {
                kid: signer().key_id().into()
            })
        );
    }

    #[test]
    fn wrong_key() {
        // Receipt 3 carries our kid but was signed by another key.
        let mut receipts = good();
        let compact = receipts[2].compact();
        let input = &compact[..compact.rfind('.').unwrap()];
        let forged_sig = ReceiptSigner::from_seed([9; 32])
            .signing
            .sign(input.as_bytes());
        let forged = format!(
            "{input}.{}",
            base64::Engine::encode(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD,
                forged_sig.to_bytes()
            )
        );
        receipts[2] = Receipt::parse(&forged).unwrap();
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::BadSignature {
                kid: signer().key_id().into(),
                seq: 3
            })
        );
    }

    /// One entry of [`with_voids`]: a claim (its slots, root cap 10, sub-caps 2) or a void
    /// of the claim at a seq.
    enum Entry<'a> {
        Claim(&'a [(&'a str, u64)]),
        Void(u64),
    }

    /// Signs a chain with seq 1.. in entry order; a void copies the slots, request and
    /// idempotency key of the receipt it names (as the ledger writes it).
    fn with_voids(entries: &[Entry<'_>]) -> Vec<Receipt> {
        let s = signer();
        let mut out: Vec<Receipt> = Vec::new();
        for (i, entry) in entries.iter().enumerate() {
            let seq = i as u64 + 1;
            let prev = out.last().map(Receipt::hash_hex);
            let b = match entry {
                Entry::Claim(levels) => {
                    let slots = levels
                        .iter()
                        .enumerate()
                        .map(|(i, (rid, slot))| {
                            let cap = if *rid == ROOT { 10 } else { 2 };
                            claim(i as u32, rid, *slot, Some(cap))
                        })
                        .collect();
                    body(seq, slots, prev)
                }
                Entry::Void(of) => {
                    let original = out[*of as usize - 1].body();
                    let mut b = body(seq, original.slots.clone(), prev);
                    b.request = original.request.clone();
                    b.idempotency_key = original.idempotency_key.clone();
                    b.void = Some(*of);
                    b
                }
            };
            out.push(s.sign(&b).unwrap());
        }
        out
    }

    /// Issue 10 item 12: a void gives one claim's slots back at every level; the next
    /// claim takes them again; the report counts claims, voids and what stays charged.
    #[test]
    fn voids_give_slots_back_and_are_counted() {
        use Entry::{Claim, Void};
        let receipts = with_voids(&[
            Claim(&[(ROOT, 1), (CHILD, 1)]),
            Claim(&[(ROOT, 2), (CHILD, 2)]),
            // The older claim is given back: every level goes down by one...
            Void(1),
            // ... so the next claim takes slot 2 at both levels again, and the child's
            // cap of 2 is exact: 2 charged.
            Claim(&[(ROOT, 2), (CHILD, 2)]),
            Claim(&[(ROOT, 3)]),
            Void(5),
        ]);
        let report = audit_chain(&receipts, &keys()).unwrap();
        assert_eq!(report.receipts, 6);
        assert_eq!((report.claims, report.voids, report.charged), (4, 2, 2));
        let levels: Vec<(&str, u64)> = report
            .levels
            .iter()
            .map(|l| (l.revocation_id.as_str(), l.used))
            .collect();
        assert_eq!(levels, vec![(ROOT, 2), (CHILD, 2)]);
        // Without voids the counts are plain.
        let plain = audit_chain(&good(), &keys()).unwrap();
        assert_eq!((plain.claims, plain.voids, plain.charged), (4, 0, 4));
    }

    #[test]
    fn a_void_must_name_an_earlier_live_claim_and_repeat_it() {
        use Entry::{Claim, Void};
        // Twice.
        let twice = with_voids(&[Claim(&[(ROOT, 1)]), Void(1), Claim(&[(ROOT, 1)]), Void(1)]);
        assert_eq!(
            audit_chain(&twice, &keys()),
            Err(ReceiptError::VoidTwice { seq: 4, void: 1 })
        );
        // A void of a void.
        let of_void = with_voids(&[Claim(&[(ROOT, 1)]), Void(1), Void(2)]);
        assert_eq!(
            audit_chain(&of_void, &keys()),
            Err(ReceiptError::VoidUnknown { seq: 3, void: 2 })
        );
        // A seq that is not in the chain (or itself).
        let mut receipts = with_voids(&[Claim(&[(ROOT, 1)]), Claim(&[(ROOT, 2)]), Void(2)]);
        edit(&mut receipts, 2, |b| b.void = Some(9));
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::VoidUnknown { seq: 3, void: 9 })
        );
        edit(&mut receipts, 2, |b| b.void = Some(3));
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::VoidUnknown { seq: 3, void: 3 })
        );
        // Slots or request that are not the claim's.
        let mut receipts = with_voids(&[Claim(&[(ROOT, 1)]), Claim(&[(ROOT, 2)]), Void(2)]);
        edit(&mut receipts, 2, |b| b.slots[0].slot = 1);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::VoidMismatch { seq: 3, void: 2 })
        );
        let mut receipts = with_voids(&[Claim(&[(ROOT, 1)]), Claim(&[(ROOT, 2)]), Void(2)]);
        edit(&mut receipts, 2, |b| b.request.path = "/other".into());
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::VoidMismatch { seq: 3, void: 2 })
        );
    }

    #[test]
    fn after_a_void_the_next_claim_must_take_the_freed_slot() {
        use Entry::{Claim, Void};
        // The authority slot after a void is the net count + 1, not seq.
        let receipts = with_voids(&[Claim(&[(ROOT, 1)]), Void(1), Claim(&[(ROOT, 3)])]);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::AuthoritySlotMismatch { seq: 3 })
        );
        let receipts = with_voids(&[Claim(&[(ROOT, 1)]), Void(1), Claim(&[(ROOT, 2)])]);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::AuthoritySlotMismatch { seq: 3 })
        );
        // Below the authority: a slot past the net count + 1 is a gap, one still held is
        // reused.
        let receipts = with_voids(&[
            Claim(&[(ROOT, 1), (CHILD, 1)]),
            Void(1),
            Claim(&[(ROOT, 1), (CHILD, 2)]),
        ]);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::SlotGap {
                revocation_id: CHILD.into(),
                used: 1,
                max: 2
            })
        );
        let receipts = with_voids(&[
            Claim(&[(ROOT, 1), (CHILD, 1)]),
            Claim(&[(ROOT, 2), (SIBLING, 1)]),
            Void(2),
            Claim(&[(ROOT, 2), (CHILD, 1)]),
        ]);
        assert_eq!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::SlotReused {
                revocation_id: CHILD.into(),
                slot: 1
            })
        );
    }

    #[test]
    fn rotated_keys_verify_when_both_are_trusted() {
        let mut receipts = good();
        receipts.truncate(2);
        let new = ReceiptSigner::from_seed([4; 32]);
        let mut b = body(
            3,
            vec![claim(0, ROOT, 3, Some(10))],
            Some(receipts[1].hash_hex()),
        );
        b.kid = new.key_id().into();
        receipts.push(new.sign(&b).unwrap());
        assert!(matches!(
            audit_chain(&receipts, &keys()),
            Err(ReceiptError::UnknownKeyId { .. })
        ));
        let mut both = keys();
        both.insert(new.public_key());
        assert_eq!(audit_chain(&receipts, &both).unwrap().receipts, 3);
    }
}

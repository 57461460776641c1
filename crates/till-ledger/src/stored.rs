//! The embedded ledger's compact record formats (schema 3): a receipt stored once, as
//! its body (the key signs it when it is read), and the idempotency record as a pointer
//! to it.
//!
//! A stored receipt is one tagged value:
//!
//! - [`TAG_BODY`]: the receipt body in a compact binary form (below), unsigned. Its JWS
//!   signing input — and so its chain link — is a function of the body alone, and
//!   ed25519 is deterministic, so signing it on every read gives the same compact receipt
//!   every time (the one its client got).
//! - [`TAG_BODY_SIGNED`]: the same body followed by its 64-byte signature, once the
//!   signature (made by the claim's caller after the commit) has been stored back.
//! - [`TAG_SIGNED`]: a compact JWS, as written by schema 2 (migrated as is).
//!
//! The binary body is lossless: decoding gives back the same [`ReceiptBody`], so the same
//! serde_json payload, for any body (property-tested). Strings that are lower-case hex of
//! even length (ids, hashes, generated idempotency keys) are stored as their bytes.
//!
//! An idempotency record is [`TAG_POINTER`] + the receipt's `seq`, the replay count, the
//! request fingerprint (32 bytes) and the receipt's family when it is not the record's
//! scope (a multi-level token). Schema 2's JSON records (`{...}`, with a copy of the
//! receipt) are still read.

use till_receipt::{PreparedReceipt, Receipt, ReceiptBody, RequestDigest, SlotClaim};

use crate::LedgerError;

/// A receipt stored as its unsigned binary body.
pub const TAG_BODY: u8 = 2;
/// A receipt stored as a signed compact JWS (schema 2, migrated).
pub const TAG_SIGNED: u8 = 1;
/// A receipt stored as its binary body and its signature.
pub const TAG_BODY_SIGNED: u8 = 3;
/// An idempotency record that points at its receipt.
pub const TAG_POINTER: u8 = 2;

/// A receipt as read from storage.
#[derive(Debug, Clone)]
pub enum StoredReceipt {
    /// Signed when it was written (schema 2).
    Signed(Receipt),
    /// To be signed with the ledger's receipt key.
    Unsigned(PreparedReceipt),
}

impl StoredReceipt {
    /// The body.
    pub fn body(&self) -> &ReceiptBody {
        match self {
            StoredReceipt::Signed(r) => r.body(),
            StoredReceipt::Unsigned(p) => p.body(),
        }
    }

    /// What a receipt of format `v` following this one names in `prev`.
    pub fn link_for_version(&self, v: u32) -> String {
        match self {
            StoredReceipt::Signed(r) => r.link_for_version(v),
            // Bodies are only stored at the current version (2+): the link is the hash
            // of the signing input whatever follows.
            StoredReceipt::Unsigned(p) => p.hash_hex(),
        }
    }
}

/// Encodes a receipt body for storage under `(family, seq)`.
pub fn encode_body(body: &ReceiptBody, family: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(256);
    out.push(TAG_BODY);
    put_varint(&mut out, u64::from(body.v));
    let family_hex = hex::encode(family);
    let implied_family = body.family == family_hex;
    out.push(u8::from(!implied_family));
    if !implied_family {
        put_str(&mut out, &body.family);
    }
    put_varint(&mut out, body.seq);
    put_varint(&mut out, body.slots.len() as u64);
    for slot in &body.slots {
        let same = slot.revocation_id == body.family;
        out.push(u8::from(slot.cap.is_some()) | (u8::from(same) << 1));
        put_varint(&mut out, u64::from(slot.block));
        if !same {
            put_str(&mut out, &slot.revocation_id);
        }
        put_varint(&mut out, slot.slot);
        if let Some(cap) = slot.cap {
            put_varint(&mut out, cap);
        }
    }
    let r = &body.request;
    put_str(&mut out, &r.method);
    put_str(&mut out, &r.upstream);
    put_str(&mut out, &r.path);
    put_str(&mut out, &r.body_sha256);
    put_opts(&mut out, &[&r.model, &r.query, &r.content_type]);
    put_varint(&mut out, body.iat);
    put_str(&mut out, &body.proxy);
    put_str(&mut out, &body.kid);
    put_str(&mut out, &body.idempotency_key);
    // `ceilings` (rare, structured) as its JSON: the body's own serialization of it, so
    // decoding gives the same value back.
    let ceilings = body
        .ceilings
        .as_ref()
        .map(|c| serde_json::to_string(c).unwrap_or_default());
    // A void receipt's `void` (the claim it gives back), in decimal: a fourth optional
    // member, so a claim's value is byte-identical to before voids existed.
    let void = body.void.map(|seq| seq.to_string());
    put_opts(&mut out, &[&body.prev, &body.ledger, &ceilings, &void]);
    out
}

/// Decodes a stored receipt value found at `(family, _)`.
pub fn decode_receipt(bytes: &[u8], family: &[u8]) -> Result<StoredReceipt, LedgerError> {
    let corrupt = |why: &str| LedgerError::Corrupt(format!("stored receipt: {why}"));
    match bytes.split_first() {
        Some((&TAG_SIGNED, rest)) => {
            let text = std::str::from_utf8(rest).map_err(|_| corrupt("not UTF-8"))?;
            Receipt::parse(text)
                .map(StoredReceipt::Signed)
                .map_err(|e| corrupt(&e.to_string()))
        }
        Some((&TAG_BODY, rest)) => {
            let body = decode_body(rest, family).ok_or_else(|| corrupt("truncated body"))?;
            PreparedReceipt::new(body)
                .map(StoredReceipt::Unsigned)
                .map_err(|e| corrupt(&e.to_string()))
        }
        Some((&TAG_BODY_SIGNED, rest)) if rest.len() > 64 => {
            let (body, sig) = rest.split_at(rest.len() - 64);
            let body = decode_body(body, family).ok_or_else(|| corrupt("truncated body"))?;
            let sig = <[u8; 64]>::try_from(sig).map_err(|_| corrupt("signature"))?;
            PreparedReceipt::new(body)
                .map(|p| StoredReceipt::Signed(p.with_signature(sig)))
                .map_err(|e| corrupt(&e.to_string()))
        }
        _ => Err(corrupt("unknown format")),
    }
}

/// The stored value of an unsigned body ([`TAG_BODY`]) with its signature appended;
/// `None` when the value is not an unsigned body (already signed, or another format).
pub fn with_signature(value: &[u8], signature: &[u8; 64]) -> Option<Vec<u8>> {
    let (&TAG_BODY, body) = value.split_first()? else {
        return None;
    };
    let mut out = Vec::with_capacity(value.len() + 64);
    out.push(TAG_BODY_SIGNED);
    out.extend_from_slice(body);
    out.extend_from_slice(signature);
    Some(out)
}

fn decode_body(bytes: &[u8], family: &[u8]) -> Option<ReceiptBody> {
    let mut r = Reader(bytes);
    let v = u32::try_from(r.varint()?).ok()?;
    let family = match r.byte()? {
        0 => hex::encode(family),
        1 => r.str()?,
        _ => return None,
    };
    let seq = r.varint()?;
    let n = usize::try_from(r.varint()?).ok()?;
    let mut slots = Vec::with_capacity(n.min(64));
    for _ in 0..n {
        let flags = r.byte()?;
        let block = u32::try_from(r.varint()?).ok()?;
        let revocation_id = if flags & 2 != 0 {
            family.clone()
        } else {
            r.str()?
        };
        let slot = r.varint()?;
        let cap = if flags & 1 != 0 {
            Some(r.varint()?)
        } else {
            None
        };
        slots.push(SlotClaim {
            block,
            revocation_id,
            slot,
            cap,
        });
    }
    let method = r.str()?;
    let upstream = r.str()?;
    let path = r.str()?;
    let body_sha256 = r.str()?;
    let [model, query, content_type] = r.opts::<3>()?;
    let iat = r.varint()?;
    let proxy = r.str()?;
    let kid = r.str()?;
    let idempotency_key = r.str()?;
    let [prev, ledger, ceilings, void] = r.opts::<4>()?;
    if !r.0.is_empty() {
        return None;
    }
    let void = match void {
        Some(text) => {
            let seq: u64 = text.parse().ok()?;
            (seq.to_string() == text).then_some(seq)?;
            Some(seq)
        }
        None => None,
    };
    let ceilings = match ceilings {
        Some(json) => Some(serde_json::from_str(&json).ok()?),
        None => None,
    };
    Some(ReceiptBody {
        v,
        family,
        seq,
        slots,
        request: RequestDigest {
            method,
            upstream,
            path,
            body_sha256,
            model,
            query,
            content_type,
        },
        iat,
        proxy,
        kid,
        idempotency_key,
        prev,
        ledger,
        ceilings,
        void,
    })
}

/// An idempotency record: where its receipt is, the request fingerprint, replays served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pointer {
    /// The receipt's family.
    pub family: Vec<u8>,
    /// The receipt's seq.
    pub seq: u64,
    /// Lower-case hex SHA-256 request fingerprint.
    pub request: String,
    /// Replays served so far.
    pub replays: u32,
}

/// An idempotency record as read: a pointer (schema 3) or a legacy JSON record.
#[derive(Debug, Clone)]
pub enum IdempotencyRecord {
    /// Schema 3.
    Pointer(Pointer),
    /// Schema 2: the record holds its own copy of the receipt.
    Legacy(crate::plan::StoredIdempotency),
}

/// Encodes a pointer record stored under `(scope, key)`.
pub fn encode_pointer(p: &Pointer, scope: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(48);
    out.push(TAG_POINTER);
    put_varint(&mut out, p.seq);
    put_varint(&mut out, u64::from(p.replays));
    match hex::decode(&p.request) {
        Ok(raw) if raw.len() == 32 && hex::encode(&raw) == p.request => {
            out.push(0);
            out.extend_from_slice(&raw);
        }
        _ => {
            out.push(1);
            put_str(&mut out, &p.request);
        }
    }
    if p.family != scope {
        out.extend_from_slice(&p.family);
    }
    out
}

/// Decodes an idempotency record stored under `(scope, _)`.
pub fn decode_idempotency(bytes: &[u8], scope: &[u8]) -> Result<IdempotencyRecord, LedgerError> {
    if bytes.first() == Some(&b'{') {
        return crate::plan::StoredIdempotency::from_bytes(bytes).map(IdempotencyRecord::Legacy);
    }
    let bad = || LedgerError::Corrupt("idempotency record: unreadable pointer".into());
    let Some((&TAG_POINTER, rest)) = bytes.split_first() else {
        return Err(bad());
    };
    let mut r = Reader(rest);
    let seq = r.varint().ok_or_else(bad)?;
    let replays = u32::try_from(r.varint().ok_or_else(bad)?).map_err(|_| bad())?;
    let request = match r.byte().ok_or_else(bad)? {
        0 => hex::encode(r.take(32).ok_or_else(bad)?),
        1 => r.str().ok_or_else(bad)?,
        _ => return Err(bad()),
    };
    let family = if r.0.is_empty() {
        scope.to_vec()
    } else {
        r.0.to_vec()
    };
    Ok(IdempotencyRecord::Pointer(Pointer {
        family,
        seq,
        request,
        replays,
    }))
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn is_lower_hex(s: &str) -> bool {
    !s.is_empty()
        && s.len() % 2 == 0
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A string: `len << 1` + UTF-8, or (lower-case hex of even length) `bytes << 1 | 1` + bytes.
fn put_str(out: &mut Vec<u8>, s: &str) {
    if is_lower_hex(s) {
        put_varint(out, ((s.len() / 2) as u64) << 1 | 1);
        // Checked by `is_lower_hex`: decoding cannot fail.
        out.extend_from_slice(&hex::decode(s).unwrap_or_default());
    } else {
        put_varint(out, (s.len() as u64) << 1);
        out.extend_from_slice(s.as_bytes());
    }
}

/// A presence byte (bit i: option i is `Some`), then each present string.
fn put_opts(out: &mut Vec<u8>, opts: &[&Option<String>]) {
    let mut flags = 0u8;
    for (i, o) in opts.iter().enumerate() {
        if o.is_some() {
            flags |= 1 << i;
        }
    }
    out.push(flags);
    for s in opts.iter().copied().flatten() {
        put_str(out, s);
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&b, rest) = self.0.split_first()?;
        self.0 = rest;
        Some(b)
    }

    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn varint(&mut self) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.byte()?;
            v |= u64::from(b & 0x7f).checked_shl(shift)?;
            if b & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }

    fn str(&mut self) -> Option<String> {
        let head = self.varint()?;
        let len = usize::try_from(head >> 1).ok()?;
        let bytes = self.take(len)?;
        if head & 1 == 1 {
            Some(hex::encode(bytes))
        } else {
            String::from_utf8(bytes.to_vec()).ok()
        }
    }

    fn opts<const N: usize>(&mut self) -> Option<[Option<String>; N]> {
        let flags = self.byte()?;
        if u32::from(flags) >> N != 0 {
            return None;
        }
        let mut out: [Option<String>; N] = std::array::from_fn(|_| None);
        for (i, slot) in out.iter_mut().enumerate() {
            if flags & (1 << i) != 0 {
                *slot = Some(self.str()?);
            }
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        prop_oneof![
            "[a-f0-9]{0,8}",
            "[A-Za-z0-9/_.-]{0,12}",
            Just(String::new()),
            "\\PC{0,6}",
            proptest::collection::vec(any::<u8>(), 1..40).prop_map(hex::encode),
        ]
    }

    fn body_strategy() -> impl Strategy<Value = (ReceiptBody, Vec<u8>)> {
        (
            proptest::collection::vec(any::<u8>(), 1..70),
            any::<bool>(),
            proptest::collection::vec(
                (
                    any::<u32>(),
                    any::<bool>(),
                    text(),
                    any::<u64>(),
                    proptest::option::of(any::<u64>()),
                ),
                0..4,
            ),
            (text(), text(), text(), text()),
            (
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of(text()),
            ),
            (any::<u32>(), any::<u64>(), any::<u64>()),
            (text(), text(), text()),
            (
                proptest::option::of(text()),
                proptest::option::of(text()),
                proptest::option::of((
                    proptest::option::of(any::<u64>()),
                    proptest::option::of(proptest::collection::vec(text(), 0..3)),
                    proptest::option::of(proptest::collection::btree_map(
                        text(),
                        any::<u64>(),
                        0..3,
                    )),
                    proptest::option::of(proptest::collection::vec(any::<[u64; 2]>(), 0..3)),
                )),
            ),
        )
            .prop_map(
                |(
                    family,
                    implied,
                    slots,
                    (m, u, p, b),
                    (model, query, ct),
                    (v, seq, iat),
                    (proxy, kid, ik),
                    (prev, ledger, ceilings),
                )| {
                    let ceilings =
                        ceilings.map(
                            |(tokens, repos, json_max, windows)| till_receipt::Ceilings {
                                max_output_tokens: tokens,
                                repos,
                                json_max,
                                windows,
                                ..Default::default()
                            },
                        );
                    let family_hex = hex::encode(&family);
                    let fam = if implied {
                        family_hex.clone()
                    } else {
                        format!("x{family_hex}")
                    };
                    let slots = slots
                        .into_iter()
                        .map(|(block, same, rev, slot, cap)| SlotClaim {
                            block,
                            revocation_id: if same { fam.clone() } else { rev },
                            slot,
                            cap,
                        })
                        .collect();
                    let body = ReceiptBody {
                        v,
                        family: fam,
                        seq,
                        slots,
                        request: RequestDigest {
                            method: m,
                            upstream: u,
                            path: p,
                            body_sha256: b,
                            model,
                            query,
                            content_type: ct,
                        },
                        iat,
                        proxy,
                        kid,
                        idempotency_key: ik,
                        prev,
                        ledger,
                        ceilings,
                        // Every third body is a void receipt.
                        void: (iat % 3 == 0).then_some(iat / 3),
                    };
                    (body, family)
                },
            )
    }

    proptest! {
        /// Any body decodes to itself (so to the same JWS payload and chain link).
        #[test]
        fn bodies_round_trip((body, family) in body_strategy()) {
            let bytes = encode_body(&body, &family);
            prop_assert_eq!(decode_body(&bytes[1..], &family), Some(body.clone()));
            // Truncated values are refused, never misread.
            for cut in 1..bytes.len() {
                prop_assert_ne!(decode_body(&bytes[1..cut], &family), Some(body.clone()));
            }
        }

        #[test]
        fn pointers_round_trip(
            family in proptest::collection::vec(any::<u8>(), 1..70),
            scope_is_family in any::<bool>(),
            seq in any::<u64>(),
            replays in any::<u32>(),
            fp in prop_oneof![proptest::collection::vec(any::<u8>(), 32).prop_map(hex::encode), text()],
        ) {
            let scope = if scope_is_family { family.clone() } else { vec![0xee; 64] };
            let p = Pointer { family, seq, request: fp, replays };
            let bytes = encode_pointer(&p, &scope);
            match decode_idempotency(&bytes, &scope).unwrap() {
                IdempotencyRecord::Pointer(q) => prop_assert_eq!(q, p),
                IdempotencyRecord::Legacy(_) => prop_assert!(false),
            }
        }
    }

    #[test]
    fn typical_body_is_small_and_signs_like_the_original() {
        let signer = till_receipt::ReceiptSigner::from_seed([3; 32]);
        let family = vec![0xab; 64];
        let body = ReceiptBody {
            v: till_receipt::RECEIPT_VERSION,
            family: hex::encode(&family),
            seq: 123_456,
            slots: vec![
                SlotClaim {
                    block: 0,
                    revocation_id: hex::encode(&family),
                    slot: 123_456,
                    cap: Some(1_000_000),
                },
                SlotClaim {
                    block: 1,
                    revocation_id: "cd".repeat(64),
                    slot: 17,
                    cap: Some(100),
                },
            ],
            request: RequestDigest {
                method: "POST".into(),
                upstream: "openai".into(),
                path: "/v1/chat/completions".into(),
                body_sha256: "12".repeat(32),
                model: Some("gpt-4o-mini".into()),
                query: None,
                content_type: Some("application/json".into()),
            },
            iat: 1_750_000_000,
            proxy: "till-1".into(),
            kid: signer.key_id().into(),
            idempotency_key: "0f".repeat(16),
            prev: Some("34".repeat(32)),
            ledger: Some(format!("{}@{}", "56".repeat(16), signer.key_id())),
            ceilings: Some(till_receipt::Ceilings {
                max_output_tokens: Some(4096),
                windows: Some(vec![[60, 10]]),
                ..Default::default()
            }),
            void: None,
        };
        let bytes = encode_body(&body, &family);
        assert!(bytes.len() < 400, "{} bytes", bytes.len());
        let StoredReceipt::Unsigned(prepared) = decode_receipt(&bytes, &family).unwrap() else {
            panic!("expected an unsigned body");
        };
        let original = signer.sign(&body).unwrap();
        assert_eq!(prepared.hash_hex(), original.hash_hex());
        assert_eq!(signer.sign_prepared(prepared).unwrap(), original);
        // With its signature stored back, it reads as the signed receipt.
        let signed_back = with_signature(&bytes, original.signature()).unwrap();
        assert_eq!(signed_back.len(), bytes.len() + 64);
        let StoredReceipt::Signed(back) = decode_receipt(&signed_back, &family).unwrap() else {
            panic!("expected a signed receipt");
        };
        assert_eq!(back, original);
        assert!(with_signature(&signed_back, original.signature()).is_none());
        // A signed (schema 2) value reads back as the same receipt.
        let mut signed = vec![TAG_SIGNED];
        signed.extend_from_slice(original.compact().as_bytes());
        let StoredReceipt::Signed(again) = decode_receipt(&signed, &family).unwrap() else {
            panic!("expected a signed receipt");
        };
        assert_eq!(again, original);
        assert!(decode_receipt(&[9, 1, 2], &family).is_err());
        assert!(decode_receipt(&[], &family).is_err());
    }

    #[test]
    fn legacy_json_records_are_read() {
        let digest = RequestDigest {
            method: "GET".into(),
            upstream: "u".into(),
            path: "/".into(),
            body_sha256: "00".repeat(32),
            model: None,
            query: None,
            content_type: None,
        };
        let legacy = crate::plan::StoredIdempotency::original(&digest, "a.b.c");
        match decode_idempotency(&legacy.to_bytes(), b"s").unwrap() {
            IdempotencyRecord::Legacy(l) => assert_eq!(l, legacy),
            IdempotencyRecord::Pointer(_) => panic!("expected legacy"),
        }
        assert!(decode_idempotency(&[7], b"s").is_err());
    }
}

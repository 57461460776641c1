//! The key layout (normative: `spec/ledger-fdb.md`, "Key layout").
//!
//! Every key is a tuple-layer tuple under the prefix `(keyspace,)`:
//!
//! | key                                 | value                                          |
//! |-------------------------------------|------------------------------------------------|
//! | `(ks, "schema")`                    | tuple `(3,)`: layout version                   |
//! | `(ks, "ledger_id")`                 | UTF-8 ledger id `<32 hex>@<receipt kid>`       |
//! | `(ks, "count", rid)`                | u64 little-endian: activations through `rid`   |
//! | `(ks, "revoked", rid)`              | u64 little-endian: Unix time of the revocation |
//! | `(ks, "head", family)`              | [`ChainHead`] `(seq, hash_hex, 2)`: chain head |
//! | `(ks, "receipt", family, seq)`      | receipt, compact JWS (UTF-8)                   |
//! | `(ks, "slot", rid, slot)`           | tuple `(family, seq)`: who took slot `slot`    |
//! | `(ks, "idem", scope, key)`          | [`IdemRecord`]: fingerprint, pointer, writers  |
//! | `(ks, "journal", versionstamp)`     | tuple `(family, seq)`: append-only journal     |
//! | `(ks, "block", rid)`                | JSON `BlockRecord`: a block, written once      |
//! | `(ks, "fblock", family, rid)`       | empty: index of a family's blocks              |
//! | `(ks, "family", family)`            | u64 LE: Unix time the family was first recorded|
//! | `(ks, "activity", family, minute)`  | u64 LE: the family's claims in that minute     |
//! | `(ks, "alert", id)`                 | JSON `AlertRecord`, written once per id        |
//! | `(ks, "outbox", id)`                | u64 LE: time fired, while delivery is pending  |
//! | `(ks, "lease", id)`                 | token of the last lease of the alert (pending) |
//! | `(ks, "window", rid, secs)`         | 16 bytes BE `(start, count)`: windowed cap     |
//! | `(ks, "voided", family, seq)`       | tuple `(void seq, writer)`: claim `seq` voided |
//! | `(ks, "voids", family)`             | u64 LE: the family's void receipts (absent: 0) |
//! | `(ks, "checkpoint", family, to)`    | JSON line: signed checkpoint of a pruned range |
//! | `(ks, "exporter")`                  | tuple `(holder, dir, until)`: the export lease |
//!
//! `rid`, `family` and `scope` are raw revocation-id bytes (tuple byte strings); `key` is
//! the idempotency key (tuple string); `seq` and `slot` are tuple integers (order-preserving,
//! so a range read lists a family's receipts in `seq` order).

use foundationdb_tuple::{pack, unpack, Subspace, Versionstamp};

use crate::error::KvError;

/// The layout version stored under `(ks, "schema")`. Version 2 stores each receipt once:
/// idempotency records and journal entries point at `(family, seq)`. Version 3 marks
/// every chain head it writes with [`HEAD_LINK_VERSION`] (the head names its receipt by
/// the receipt-format-2 link hash).
pub const SCHEMA_VERSION: i64 = 3;

/// The first layout, which this build still reads (idempotency records and journal
/// entries that hold a copy of the receipt, unmarked chain heads); opening such a key
/// space upgrades its schema key to [`SCHEMA_VERSION`] (spec/ledger-fdb.md §1).
pub const LEGACY_SCHEMA_VERSION: i64 = 1;

/// The older layouts this build reads and upgrades on open: 1 ([`LEGACY_SCHEMA_VERSION`])
/// and 2 (receipts stored once, chain heads unmarked `(seq, hash_hex)`).
pub const UPGRADABLE_SCHEMA_VERSIONS: [i64; 2] = [LEGACY_SCHEMA_VERSION, 2];

/// The ledger's key space: computes every key.
#[derive(Debug, Clone)]
pub struct Keyspace {
    root: Subspace,
}

impl Keyspace {
    /// The key space under the tuple prefix `(name,)`.
    pub fn new(name: &str) -> Self {
        Self {
            root: Subspace::from(&(name,)),
        }
    }

    /// The prefix bytes (every key of the ledger starts with them).
    pub fn prefix(&self) -> &[u8] {
        self.root.bytes()
    }

    /// `(ks, "schema")`.
    pub fn schema(&self) -> Vec<u8> {
        self.root.pack(&("schema",))
    }

    /// `(ks, "ledger_id")`: the key space's ledger id, written once with the key space
    /// (spec/ledger-fdb.md §1, "Ledger id").
    pub fn ledger_id(&self) -> Vec<u8> {
        self.root.pack(&("ledger_id",))
    }

    /// `(ks, "count", rid)`.
    pub fn count(&self, rid: &[u8]) -> Vec<u8> {
        self.root.pack(&("count", rid))
    }

    /// `(ks, "revoked", rid)`.
    pub fn revoked(&self, rid: &[u8]) -> Vec<u8> {
        self.root.pack(&("revoked", rid))
    }

    /// `(ks, "head", family)`.
    pub fn head(&self, family: &[u8]) -> Vec<u8> {
        self.root.pack(&("head", family))
    }

    /// `(ks, "receipt", family, seq)`.
    pub fn receipt(&self, family: &[u8], seq: u64) -> Vec<u8> {
        self.root.pack(&("receipt", family, seq))
    }

    /// The key range of a family's receipts from `from_seq` on: `[begin, end)`.
    pub fn receipts_from(&self, family: &[u8], from_seq: u64) -> (Vec<u8>, Vec<u8>) {
        let begin = self.receipt(family, from_seq);
        let (_, end) = self.root.subspace(&("receipt", family)).range();
        (begin, end)
    }

    /// `(ks, "slot", rid, slot)`.
    pub fn slot(&self, rid: &[u8], slot: u64) -> Vec<u8> {
        self.root.pack(&("slot", rid, slot))
    }

    /// `(ks, "voided", family, seq)`: claim `seq` was voided by the receipt whose seq is
    /// the value (spec/ledger.md §3.5).
    pub fn voided(&self, family: &[u8], seq: u64) -> Vec<u8> {
        self.root.pack(&("voided", family, seq))
    }

    /// `(ks, "voids", family)`: the family's void receipts; its chain head is at
    /// `count(family) + 2 × voids`.
    pub fn void_count(&self, family: &[u8]) -> Vec<u8> {
        self.root.pack(&("voids", family))
    }

    /// `(ks, "idem", scope, key)`.
    pub fn idempotency(&self, scope: &[u8], key: &str) -> Vec<u8> {
        self.root.pack(&("idem", scope, key))
    }

    /// `(ks, "journal", <incomplete versionstamp with user version>)`, in the form
    /// `SetVersionstampedKey` takes (the 4-byte little-endian offset of the stamp appended).
    pub fn journal_incomplete(&self, user_version: u16) -> Vec<u8> {
        self.root
            .pack_with_versionstamp(&("journal", Versionstamp::incomplete(user_version)))
    }

    /// The whole journal range `[begin, end)`.
    pub fn journal_range(&self) -> (Vec<u8>, Vec<u8>) {
        self.root.subspace(&("journal",)).range()
    }

    /// `(ks, "block", rid)`.
    pub fn block(&self, rid: &[u8]) -> Vec<u8> {
        self.root.pack(&("block", rid))
    }

    /// `(ks, "fblock", family, rid)`.
    pub fn family_block(&self, family: &[u8], rid: &[u8]) -> Vec<u8> {
        self.root.pack(&("fblock", family, rid))
    }

    /// Every `(ks, "fblock", family, _)`: `[begin, end)`.
    pub fn family_blocks_range(&self, family: &[u8]) -> (Vec<u8>, Vec<u8>) {
        self.root.subspace(&("fblock", family)).range()
    }

    /// Decodes the revocation id out of a `(ks, "fblock", family, rid)` key.
    pub fn family_block_rid(&self, key: &[u8]) -> Result<Vec<u8>, KvError> {
        let (tag, _family, rid): (String, Vec<u8>, Vec<u8>) = self
            .root
            .unpack(key)
            .map_err(|e| KvError::Decode(format!("family block key: {e:?}")))?;
        if tag != "fblock" {
            return Err(KvError::Decode("not a family block key".into()));
        }
        Ok(rid)
    }

    /// `(ks, "family", family)`.
    pub fn family(&self, family: &[u8]) -> Vec<u8> {
        self.root.pack(&("family", family))
    }

    /// Every `(ks, "family", _)`: `[begin, end)`.
    pub fn families_range(&self) -> (Vec<u8>, Vec<u8>) {
        self.root.subspace(&("family",)).range()
    }

    /// Decodes the family id out of a `(ks, "family", family)` key.
    pub fn family_id(&self, key: &[u8]) -> Result<Vec<u8>, KvError> {
        let (tag, family): (String, Vec<u8>) = self
            .root
            .unpack(key)
            .map_err(|e| KvError::Decode(format!("family key: {e:?}")))?;
        if tag != "family" {
            return Err(KvError::Decode("not a family key".into()));
        }
        Ok(family)
    }

    /// `(ks, "activity", family, minute)`.
    pub fn activity(&self, family: &[u8], minute: u64) -> Vec<u8> {
        self.root.pack(&("activity", family, minute))
    }

    /// `(ks, "window", rid, secs)`: the block's counter for its window of `secs` seconds
    /// (one key per block and window length, overwritten when a new window begins).
    pub fn window(&self, rid: &[u8], secs: u64) -> Vec<u8> {
        self.root.pack(&("window", rid, secs))
    }

    /// The family's activity buckets for minutes `[from, to)`: `[begin, end)`.
    pub fn activity_range(&self, family: &[u8], from: u64, to: u64) -> (Vec<u8>, Vec<u8>) {
        (self.activity(family, from), self.activity(family, to))
    }

    /// Decodes the minute out of a `(ks, "activity", family, minute)` key.
    pub fn activity_minute(&self, key: &[u8]) -> Result<u64, KvError> {
        let (tag, _family, minute): (String, Vec<u8>, u64) = self
            .root
            .unpack(key)
            .map_err(|e| KvError::Decode(format!("activity key: {e:?}")))?;
        if tag != "activity" {
            return Err(KvError::Decode("not an activity key".into()));
        }
        Ok(minute)
    }

    /// `(ks, "alert", id)`.
    pub fn alert(&self, id: &str) -> Vec<u8> {
        self.root.pack(&("alert", id))
    }

    /// Every `(ks, "alert", _)`: `[begin, end)`.
    pub fn alerts_range(&self) -> (Vec<u8>, Vec<u8>) {
        self.root.subspace(&("alert",)).range()
    }

    /// `(ks, "outbox", id)`.
    pub fn outbox(&self, id: &str) -> Vec<u8> {
        self.root.pack(&("outbox", id))
    }

    /// `(ks, "lease", id)`: the token of the operation that last leased alert `id`.
    pub fn lease(&self, id: &str) -> Vec<u8> {
        self.root.pack(&("lease", id))
    }

    /// Every `(ks, "outbox", _)`: `[begin, end)`.
    pub fn outbox_range(&self) -> (Vec<u8>, Vec<u8>) {
        self.root.subspace(&("outbox",)).range()
    }

    /// Decodes the alert id out of a `(ks, "outbox", id)` key.
    pub fn outbox_id(&self, key: &[u8]) -> Result<String, KvError> {
        let (tag, id): (String, String) = self
            .root
            .unpack(key)
            .map_err(|e| KvError::Decode(format!("outbox key: {e:?}")))?;
        if tag != "outbox" {
            return Err(KvError::Decode("not an outbox key".into()));
        }
        Ok(id)
    }

    /// Every `(ks, "head", _)`: `[begin, end)`.
    pub fn heads_range(&self) -> (Vec<u8>, Vec<u8>) {
        self.root.subspace(&("head",)).range()
    }

    /// Decodes the family id out of a `(ks, "head", family)` key.
    pub fn head_family(&self, key: &[u8]) -> Result<Vec<u8>, KvError> {
        let (tag, family): (String, Vec<u8>) = self
            .root
            .unpack(key)
            .map_err(|e| KvError::Decode(format!("head key: {e:?}")))?;
        if tag != "head" {
            return Err(KvError::Decode("not a head key".into()));
        }
        Ok(family)
    }

    /// `(ks, "exporter")`: the export lease (spec/ledger.md §10).
    pub fn exporter(&self) -> Vec<u8> {
        self.root.pack(&("exporter",))
    }

    /// `(ks, "checkpoint", family, to_seq)`: the signed checkpoint of a family's pruned
    /// receipts ending at `to_seq` (spec/ledger.md §10).
    pub fn checkpoint(&self, family: &[u8], to_seq: u64) -> Vec<u8> {
        self.root.pack(&("checkpoint", family, to_seq))
    }

    /// A family's checkpoints: `[begin, end)`.
    pub fn checkpoints_of(&self, family: &[u8]) -> (Vec<u8>, Vec<u8>) {
        self.root.subspace(&("checkpoint", family)).range()
    }

    /// Decodes the seq out of a `(ks, "receipt", family, seq)` key.
    pub fn receipt_seq(&self, key: &[u8]) -> Result<u64, KvError> {
        let (tag, _family, seq): (String, Vec<u8>, u64) = self
            .root
            .unpack(key)
            .map_err(|e| KvError::Decode(format!("receipt key: {e:?}")))?;
        if tag != "receipt" {
            return Err(KvError::Decode("not a receipt key".into()));
        }
        Ok(seq)
    }

    /// Decodes a journal key into its complete versionstamp.
    pub fn journal_stamp(&self, key: &[u8]) -> Result<Versionstamp, KvError> {
        let (tag, stamp): (String, Versionstamp) = self
            .root
            .unpack(key)
            .map_err(|e| KvError::Decode(format!("journal key: {e:?}")))?;
        if tag != "journal" {
            return Err(KvError::Decode("not a journal key".into()));
        }
        Ok(stamp)
    }
}

/// Encodes a counter (or a revocation time): u64 little-endian, FoundationDB's convention
/// for integers that atomic operations could read (Till never uses an atomic add on a
/// capped counter; see the spec).
pub fn encode_u64(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// Decodes [`encode_u64`].
pub fn decode_u64(bytes: &[u8]) -> Result<u64, KvError> {
    let arr: [u8; 8] = bytes
        .try_into()
        .map_err(|_| KvError::Decode(format!("counter of {} bytes, expected 8", bytes.len())))?;
    Ok(u64::from_le_bytes(arr))
}

/// The link-version marker of a chain head written by this layout (schema 3): the hash is
/// the receipt's link hash, SHA-256 of its JWS signing input (receipt format 2,
/// `till_receipt::Receipt::hash_hex`).
pub const HEAD_LINK_VERSION: i64 = 2;

/// A family's chain head as stored under `(ks, "head", family)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChainHead {
    /// The seq of the family's last receipt.
    pub seq: u64,
    /// Lower-case hex SHA-256 naming that receipt.
    pub hash: String,
    /// Whether the head carries [`HEAD_LINK_VERSION`], i.e. `hash` is certainly the link
    /// hash. `false` for a head written before schema 3, `(seq, hash_hex)`: its hash is
    /// the compact string's (builds before receipts v2) or the link hash (builds between
    /// receipts v2 and schema 3); the claim that reads it recomputes the link from the
    /// receipt at `seq` in the same transaction (spec/ledger-fdb.md §1).
    pub linked: bool,
}

/// Encodes a chain head `(seq, hash_hex, HEAD_LINK_VERSION)`; `hash_hex` is the receipt's
/// link hash.
pub fn encode_head(seq: u64, hash_hex: &str) -> Vec<u8> {
    pack(&(seq, hash_hex, HEAD_LINK_VERSION))
}

/// Decodes [`encode_head`], and the unmarked `(seq, hash_hex)` of schemas 1 and 2. A head
/// with another marker is refused (a later layout's).
pub fn decode_head(bytes: &[u8]) -> Result<ChainHead, KvError> {
    if let Ok((seq, hash, marker)) = unpack::<(u64, String, i64)>(bytes) {
        if marker != HEAD_LINK_VERSION {
            return Err(KvError::Decode(format!(
                "chain head of link version {marker}, this build writes {HEAD_LINK_VERSION}"
            )));
        }
        return Ok(ChainHead {
            seq,
            hash,
            linked: true,
        });
    }
    let (seq, hash) = unpack::<(u64, String)>(bytes)
        .map_err(|e| KvError::Decode(format!("chain head: {e:?}")))?;
    Ok(ChainHead {
        seq,
        hash,
        linked: false,
    })
}

/// Encodes a chain head as schemas 1 and 2 wrote it, `(seq, hash_hex)` without a marker
/// (tests seed key spaces of older builds with it).
pub fn encode_legacy_head(seq: u64, hash_hex: &str) -> Vec<u8> {
    pack(&(seq, hash_hex))
}

/// Encodes a void marker `(void receipt seq, writer id)`: the writer id lets a retry after
/// `commit_unknown_result` recognise its own void.
pub fn encode_voided(at: u64, writer: &str) -> Vec<u8> {
    pack(&(at, writer))
}

/// Decodes [`encode_voided`].
pub fn decode_voided(bytes: &[u8]) -> Result<(u64, String), KvError> {
    unpack::<(u64, String)>(bytes).map_err(|e| KvError::Decode(format!("void marker: {e:?}")))
}

/// Encodes the export lease `(holder, dir, until)`.
pub fn encode_exporter(holder: &str, dir: &str, until: u64) -> Vec<u8> {
    pack(&(holder, dir, until))
}

/// Decodes [`encode_exporter`].
pub fn decode_exporter(bytes: &[u8]) -> Result<(String, String, u64), KvError> {
    unpack::<(String, String, u64)>(bytes)
        .map_err(|e| KvError::Decode(format!("export lease: {e:?}")))
}

/// Encodes a pointer to a receipt, `(family, seq)`: the value of a slot-index entry and
/// of a journal entry.
pub fn encode_receipt_ref(family: &[u8], seq: u64) -> Vec<u8> {
    pack(&(family, seq))
}

/// Decodes [`encode_receipt_ref`].
pub fn decode_receipt_ref(bytes: &[u8]) -> Result<(Vec<u8>, u64), KvError> {
    unpack::<(Vec<u8>, u64)>(bytes).map_err(|e| KvError::Decode(format!("receipt pointer: {e:?}")))
}

/// Where an idempotency record's original receipt is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptRef {
    /// At `(ks, "receipt", family, seq)` (schema 2).
    At {
        /// The family (authority block's revocation id).
        family: Vec<u8>,
        /// The receipt's seq.
        seq: u64,
    },
    /// A copy of the receipt itself, compact JWS (records written by schema 1).
    Inline(String),
}

/// The value under `(ks, "idem", scope, key)`.
///
/// Schema 2 encodes it as the tuple `(2, fingerprint, family, seq, replays, at, (writer,
/// ...))`: `fingerprint` the 32 raw bytes of the request fingerprint, `at` the claim's
/// `now` (the start of the record's expiry window), `writer` one 32-hex-digit id per write
/// of the record (see the spec, §4). About 170 bytes for a 64-byte family id, against the
/// ~1.3 KB receipt it points at. Records written by schema 1 (JSON `{"record":
/// {request, receipt, replays}, "writers": [...]}`) decode with the receipt inline and no
/// `at` (they never expire).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdemRecord {
    /// The request fingerprint, lower-case hex SHA-256 (`till_ledger::plan::request_fingerprint`).
    pub request: String,
    /// The original receipt.
    pub receipt: ReceiptRef,
    /// Replays served so far.
    pub replays: u32,
    /// The original claim's `now` (`None`: a schema 1 record, which does not expire).
    pub at: Option<u64>,
    /// Ids of the writes that produced this value (original claim, then each replay).
    pub writers: Vec<String>,
}

/// Tag of a schema 2 idempotency record (first tuple element).
const IDEM_FORMAT: i64 = 2;

impl IdemRecord {
    /// Encodes the record (schema 2 tuple; a schema 1 record with its receipt inline keeps
    /// its JSON form, so rewriting it on a replay loses nothing).
    pub fn encode(&self) -> Vec<u8> {
        match &self.receipt {
            ReceiptRef::At { family, seq } => {
                let fingerprint =
                    hex::decode(&self.request).unwrap_or_else(|_| self.request.as_bytes().to_vec());
                pack(&(
                    IDEM_FORMAT,
                    fingerprint,
                    family.as_slice(),
                    *seq,
                    self.replays,
                    self.at.unwrap_or(0),
                    &self.writers,
                ))
            }
            ReceiptRef::Inline(receipt) => {
                let value = serde_json::json!({
                    "record": {"request": self.request, "receipt": receipt, "replays": self.replays},
                    "writers": self.writers,
                });
                serde_json::to_vec(&value).unwrap_or_default()
            }
        }
    }

    /// Decodes [`IdemRecord::encode`] (either schema).
    pub fn decode(bytes: &[u8]) -> Result<Self, KvError> {
        if bytes.first() == Some(&b'{') {
            return Self::decode_legacy(bytes);
        }
        type Packed = (i64, Vec<u8>, Vec<u8>, u64, u32, u64, Vec<String>);
        let (format, fingerprint, family, seq, replays, at, writers): Packed =
            unpack(bytes).map_err(|e| KvError::Decode(format!("idempotency record: {e:?}")))?;
        if format != IDEM_FORMAT {
            return Err(KvError::Decode(format!(
                "idempotency record of format {format}"
            )));
        }
        Ok(Self {
            request: hex::encode(fingerprint),
            receipt: ReceiptRef::At { family, seq },
            replays,
            at: Some(at),
            writers,
        })
    }

    fn decode_legacy(bytes: &[u8]) -> Result<Self, KvError> {
        let corrupt = |e: serde_json::Error| KvError::Decode(format!("idempotency record: {e}"));
        let mut value: serde_json::Value = serde_json::from_slice(bytes).map_err(corrupt)?;
        let record = &mut value["record"];
        let request = serde_json::from_value(record["request"].take()).map_err(corrupt)?;
        let receipt = serde_json::from_value(record["receipt"].take()).map_err(corrupt)?;
        let replays = serde_json::from_value(record["replays"].take()).map_err(corrupt)?;
        let writers = serde_json::from_value(value["writers"].take()).map_err(corrupt)?;
        Ok(Self {
            request,
            receipt: ReceiptRef::Inline(receipt),
            replays,
            at: None,
            writers,
        })
    }

    /// Whether the record is past its window at `now` (expired records are treated as
    /// absent; `window_secs` after `at` the record is still valid, one second later not).
    pub fn expired(&self, now: u64, window_secs: u64) -> bool {
        self.at
            .is_some_and(|at| now.saturating_sub(at) > window_secs)
    }
}

/// Decodes a ledger id value (UTF-8 `<32 hex>@<receipt kid>`).
pub fn decode_ledger_id(bytes: &[u8]) -> Result<String, KvError> {
    let id = std::str::from_utf8(bytes)
        .map_err(|e| KvError::Decode(format!("ledger id is not UTF-8: {e}")))?;
    if id
        .split_once('@')
        .is_none_or(|(random, kid)| random.is_empty() || kid.is_empty())
    {
        return Err(KvError::Decode(format!(
            "ledger id {id:?} is not <hex>@<receipt key id>"
        )));
    }
    Ok(id.to_owned())
}

/// The receipt key id a ledger id is bound to (what follows its `@`).
pub fn ledger_id_kid(id: &str) -> Option<&str> {
    id.rsplit_once('@').map(|(_, kid)| kid)
}

/// Decodes the schema version value.
pub fn decode_schema(bytes: &[u8]) -> Result<i64, KvError> {
    unpack::<(i64,)>(bytes)
        .map(|(v,)| v)
        .map_err(|e| KvError::Decode(format!("schema version: {e:?}")))
}

/// Encodes the schema version value.
pub fn encode_schema() -> Vec<u8> {
    pack(&(SCHEMA_VERSION,))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_tuples_under_the_prefix() {
        let ks = Keyspace::new("till");
        // Tuple encoding: 0x02 string ... 0x00; 0x01 bytes ... 0x00; ints 0x14 + n bytes.
        assert_eq!(ks.prefix(), b"\x02till\x00");
        assert_eq!(
            ks.count(&[1, 0, 2]),
            b"\x02till\x00\x02count\x00\x01\x01\x00\xff\x02\x00"
        );
        assert_eq!(
            ks.receipt(b"f", 1),
            b"\x02till\x00\x02receipt\x00\x01f\x00\x15\x01"
        );
        assert_eq!(
            ks.idempotency(b"s", "k"),
            b"\x02till\x00\x02idem\x00\x01s\x00\x02k\x00"
        );
        assert_eq!(ks.schema(), b"\x02till\x00\x02schema\x00");
        for key in [
            ks.count(b"a"),
            ks.revoked(b"a"),
            ks.head(b"a"),
            ks.slot(b"a", 3),
        ] {
            assert!(key.starts_with(ks.prefix()));
        }
        assert_ne!(Keyspace::new("other").count(b"a"), ks.count(b"a"));
    }

    #[test]
    fn receipt_keys_sort_by_seq_and_stay_in_the_family_range() {
        let ks = Keyspace::new("till");
        let (begin, end) = ks.receipts_from(b"fam", 2);
        let k = |s| ks.receipt(b"fam", s);
        assert!(k(1) < begin);
        assert_eq!(k(2), begin);
        let mut prev = k(2);
        for s in [3, 255, 256, 65_536, u64::from(u32::MAX) + 1, u64::MAX] {
            assert!(prev < k(s), "seq {s} sorts after the previous one");
            assert!(k(s) < end);
            prev = k(s);
        }
        // Another family (even one that extends this one's bytes) is outside the range.
        assert!(ks.receipt(b"fam\x00", 1) >= end || ks.receipt(b"fam\x00", 1) < begin);
        assert!(ks.receipt(b"fan", 1) >= end);
    }

    #[test]
    fn journal_key_carries_an_incomplete_versionstamp_and_its_offset() {
        let ks = Keyspace::new("till");
        let key = ks.journal_incomplete(7);
        let (body, offset) = key.split_at(key.len() - 4);
        let offset = u32::from_le_bytes(offset.try_into().unwrap()) as usize;
        assert_eq!(&body[offset..offset + 10], &[0xff; 10], "incomplete stamp");
        assert_eq!(&body[offset + 10..offset + 12], &7u16.to_be_bytes());
        let (begin, end) = ks.journal_range();
        assert!(body > begin.as_slice() && body < end.as_slice());
        let mut complete = body.to_vec();
        complete[offset..offset + 10].copy_from_slice(&[0, 0, 0, 0, 0, 0, 0, 9, 0, 0]);
        let stamp = ks.journal_stamp(&complete).unwrap();
        assert_eq!(stamp.user_version(), 7);
        assert!(stamp.is_complete());
    }

    #[test]
    fn admin_plane_keys_decode_and_stay_in_their_ranges() {
        let ks = Keyspace::new("till");
        let fam = [1u8, 0, 2];
        let fb = ks.family_block(&fam, b"rid");
        let (b, e) = ks.family_blocks_range(&fam);
        assert!(b < fb && fb < e);
        assert_eq!(ks.family_block_rid(&fb).unwrap(), b"rid");
        assert!(ks.family_block(b"other", b"rid") >= e || ks.family_block(b"other", b"rid") < b);
        let f = ks.family(&fam);
        let (b, e) = ks.families_range();
        assert!(b < f && f < e);
        assert_eq!(ks.family_id(&f).unwrap(), fam);
        assert!(ks.family_id(&fb).is_err());
        let (b, e) = ks.activity_range(&fam, 10, 12);
        for (m, inside) in [
            (9, false),
            (10, true),
            (11, true),
            (12, false),
            (300, false),
        ] {
            let k = ks.activity(&fam, m);
            assert_eq!(b <= k && k < e, inside, "minute {m}");
            assert_eq!(ks.activity_minute(&k).unwrap(), m);
        }
        let o = ks.outbox("threshold:ab:80");
        let (b, e) = ks.outbox_range();
        assert!(b < o && o < e);
        assert_eq!(ks.outbox_id(&o).unwrap(), "threshold:ab:80");
        let (b, e) = ks.alerts_range();
        assert!(b < ks.alert("x") && ks.alert("x") < e);
        assert!(!(b <= o && o < e), "outbox is not inside the alerts range");
    }

    #[test]
    fn values_round_trip() {
        assert_eq!(decode_u64(&encode_u64(42)).unwrap(), 42);
        assert!(decode_u64(b"short").is_err());
        assert_eq!(
            decode_head(&encode_head(9, "ab")).unwrap(),
            ChainHead {
                seq: 9,
                hash: "ab".to_owned(),
                linked: true
            }
        );
        assert_eq!(
            decode_head(&encode_legacy_head(9, "ab")).unwrap(),
            ChainHead {
                seq: 9,
                hash: "ab".to_owned(),
                linked: false
            }
        );
        assert!(
            decode_head(&pack(&(9u64, "ab", 3i64))).is_err(),
            "a later marker"
        );
        assert!(decode_head(b"\xff").is_err());
        assert_eq!(decode_schema(&encode_schema()).unwrap(), SCHEMA_VERSION);
        assert_eq!(decode_ledger_id(b"0a1b@r-1").unwrap(), "0a1b@r-1");
        assert_eq!(ledger_id_kid("0a1b@r-1"), Some("r-1"));
        for bad in [&b"0a1b"[..], b"@r-1", b"0a1b@", b"\xff@r"] {
            assert!(decode_ledger_id(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            decode_receipt_ref(&encode_receipt_ref(b"fam", 7)).unwrap(),
            (b"fam".to_vec(), 7)
        );
    }

    #[test]
    fn idempotency_records_round_trip_and_stay_small() {
        let record = IdemRecord {
            request: "ab".repeat(32),
            receipt: ReceiptRef::At {
                family: vec![9; 64],
                seq: 1_000_000,
            },
            replays: 2,
            at: Some(1_750_000_000),
            writers: vec!["0f".repeat(16), "e1".repeat(16)],
        };
        let bytes = record.encode();
        assert_eq!(IdemRecord::decode(&bytes).unwrap(), record);
        assert!(
            bytes.len() < 200,
            "a pointer record is small: {} bytes",
            bytes.len()
        );
        let window = 86_400;
        assert!(!record.expired(1_750_000_000 + window, window));
        assert!(record.expired(1_750_000_000 + window + 1, window));
        assert!(
            !record.expired(0, window),
            "a clock behind `at` is not expiry"
        );
        // A schema 1 record: receipt inline, no expiry; rewriting it keeps its form.
        let legacy =
            br#"{"record":{"request":"ff","receipt":"eyJ.x.y","replays":1},"writers":["w1"]}"#;
        let old = IdemRecord::decode(legacy).unwrap();
        assert_eq!(old.receipt, ReceiptRef::Inline("eyJ.x.y".into()));
        assert_eq!(
            (old.replays, old.at, old.writers.clone()),
            (1, None, vec!["w1".to_owned()])
        );
        assert!(!old.expired(u64::MAX, 0));
        assert_eq!(IdemRecord::decode(&old.encode()).unwrap(), old);
        assert!(IdemRecord::decode(b"\x15\x01").is_err());
    }
}

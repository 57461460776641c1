//! A bounded ledger: receipts beyond a retention are exported to append-only JSON-lines
//! files and pruned, each pruned range leaving a signed [`Checkpoint`] in the ledger (and
//! in a checkpoints file next to the export), so an auditor still proves a gapless,
//! fork-free chain from the checkpoints and the exported files. Counters, revocations
//! and chain heads are never pruned. Normative: `spec/ledger.md` §10.
//!
//! Files in the export directory, per family (`<family hex>` = its revocation id):
//!
//! - `<family hex>.jsonl`: one line per receipt, `{"seq":N,"receipt":"<compact JWS>"}`,
//!   in `seq` order, only ever appended to (an export interrupted after writing and
//!   before pruning is resumed without writing a receipt twice);
//! - `<family hex>.checkpoints.jsonl`: one [`Checkpoint`] per pruned range.

use std::io::{BufRead as _, Write as _};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use till_receipt::{Receipt, ReceiptKeySet, ReceiptSigner};

/// What may stay in the ledger. A receipt is pruned when it is beyond `keep` (older than
/// the family's `keep` newest receipts) OR older than `max_age_secs`. The newest receipt
/// of every family always stays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Retention {
    /// Receipts kept per family (at least 1 is always kept).
    pub keep: Option<u64>,
    /// Receipts younger than this (by `iat`) are kept.
    pub max_age_secs: Option<u64>,
}

impl Retention {
    /// True when nothing would ever be pruned.
    pub fn is_unbounded(&self) -> bool {
        self.keep.is_none() && self.max_age_secs.is_none()
    }
}

/// Signature context of checkpoints ([`ReceiptSigner::sign_statement`]).
pub const CHECKPOINT_CONTEXT: &str = "till-checkpoint-v1";

/// What a checkpoint states: receipts `from_seq..=to_seq` of `family` were exported to
/// `file` and pruned; the last of them hashes to `head` (its chain link: the next
/// receipt's `prev`), the first names `first_prev`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CheckpointBody {
    /// Format version (1).
    pub v: u32,
    /// Family id, lower-case hex.
    pub family: String,
    /// First pruned seq.
    pub from_seq: u64,
    /// Last pruned seq.
    pub to_seq: u64,
    /// Receipts in the range (`to_seq - from_seq + 1`).
    pub count: u64,
    /// Link hash of receipt `to_seq` (lower-case hex SHA-256 of its JWS signing input).
    pub head: String,
    /// `prev` of receipt `from_seq` (`None` when it is 1).
    pub first_prev: Option<String>,
    /// The export file (name, in the export directory).
    pub file: String,
    /// The ledger's id, if it has one.
    pub ledger: Option<String>,
    /// Key id of the receipt key that signed this checkpoint.
    pub kid: String,
    /// When the range was pruned, Unix seconds.
    pub iat: u64,
    /// Void receipts in the range (spec/ledger.md §3.5): the range held
    /// `count - voids` claims. Omitted when 0, so checkpoints of ranges without voids
    /// (and every checkpoint signed before voids existed) are byte-for-byte unchanged.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub voids: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A signed checkpoint: `{"body": {...}, "sig": "<hex ed25519>"}` over the body's JSON.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    /// What is stated.
    pub body: CheckpointBody,
    /// Lower-case hex ed25519 signature ([`CHECKPOINT_CONTEXT`]) over the body's JSON.
    pub sig: String,
}

impl Checkpoint {
    /// Signs `body` (its `kid` is set to the signer's).
    pub fn sign(mut body: CheckpointBody, signer: &ReceiptSigner) -> Self {
        signer.key_id().clone_into(&mut body.kid);
        let bytes = serde_json::to_vec(&body).unwrap_or_default();
        let sig = hex::encode(signer.sign_statement(CHECKPOINT_CONTEXT, &bytes));
        Self { body, sig }
    }

    /// One JSON line.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Parses [`Checkpoint::to_line`].
    pub fn parse(line: &str) -> Result<Self, String> {
        serde_json::from_str(line).map_err(|e| format!("checkpoint: {e}"))
    }

    /// Verifies the signature with the key named by `kid`.
    pub fn verify(&self, keys: &ReceiptKeySet) -> Result<(), String> {
        let key = keys
            .get(&self.body.kid)
            .ok_or_else(|| format!("checkpoint signed by unknown key {}", self.body.kid))?;
        let sig = hex::decode(&self.sig)
            .ok()
            .and_then(|s| <[u8; 64]>::try_from(s).ok())
            .ok_or("checkpoint signature is not 64 hex bytes")?;
        let bytes = serde_json::to_vec(&self.body).map_err(|e| e.to_string())?;
        if key.verify_statement(CHECKPOINT_CONTEXT, &bytes, &sig) {
            Ok(())
        } else {
            Err(format!(
                "checkpoint {}..={} of family {}: bad signature",
                self.body.from_seq, self.body.to_seq, self.body.family
            ))
        }
    }
}

/// The export file of a family.
pub fn receipts_file(dir: &Path, family_hex: &str) -> PathBuf {
    dir.join(format!("{family_hex}.jsonl"))
}

/// The checkpoints file of a family.
pub fn checkpoints_file(dir: &Path, family_hex: &str) -> PathBuf {
    dir.join(format!("{family_hex}.checkpoints.jsonl"))
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    seq: u64,
    receipt: String,
}

/// Reads a family's exported receipts (in file order) and checkpoints; missing files are
/// empty.
pub fn read_export(
    dir: &Path,
    family_hex: &str,
) -> Result<(Vec<Receipt>, Vec<Checkpoint>), String> {
    let mut receipts = Vec::new();
    let path = receipts_file(dir, family_hex);
    for (n, line) in lines(&path)?.into_iter().enumerate() {
        let line: Line = serde_json::from_str(&line)
            .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
        let receipt = Receipt::parse(&line.receipt)
            .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?;
        if receipt.body().seq != line.seq || receipt.body().family != family_hex {
            return Err(format!(
                "{} line {}: the receipt is not seq {} of this family",
                path.display(),
                n + 1,
                line.seq
            ));
        }
        receipts.push(receipt);
    }
    let (checkpoints, _) = read_export_checkpoints(dir, family_hex)?;
    Ok((receipts, checkpoints))
}

fn lines(path: &Path) -> Result<Vec<String>, String> {
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    std::io::BufReader::new(file)
        .lines()
        .filter(|l| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// A family's checkpoints file: its checkpoints and the highest `to_seq` among them.
pub(crate) fn read_export_checkpoints(
    dir: &Path,
    family_hex: &str,
) -> Result<(Vec<Checkpoint>, u64), String> {
    let path = checkpoints_file(dir, family_hex);
    let mut out = Vec::new();
    for (n, line) in lines(&path)?.into_iter().enumerate() {
        out.push(
            Checkpoint::parse(&line)
                .map_err(|e| format!("{} line {}: {e}", path.display(), n + 1))?,
        );
    }
    let last = out.iter().map(|c| c.body.to_seq).max().unwrap_or(0);
    Ok((out, last))
}

/// The highest seq already in a family's export file (0 when none).
pub(crate) fn exported_up_to(dir: &Path, family_hex: &str) -> Result<u64, String> {
    let path = receipts_file(dir, family_hex);
    let mut last = 0;
    for line in lines(&path)? {
        let line: Line =
            serde_json::from_str(&line).map_err(|e| format!("{}: {e}", path.display()))?;
        last = line.seq;
    }
    Ok(last)
}

/// Appends lines to a file and makes them durable (file and directory fsync'd).
pub(crate) fn append_durably(path: &Path, lines: &[String]) -> Result<(), String> {
    if lines.is_empty() {
        return Ok(());
    }
    let err = |e: std::io::Error| format!("{}: {e}", path.display());
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(err)?;
    let mut text = String::new();
    for line in lines {
        text.push_str(line);
        text.push('\n');
    }
    file.write_all(text.as_bytes()).map_err(err)?;
    file.sync_all().map_err(err)?;
    if let Some(parent) = path.parent() {
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// One export line.
pub(crate) fn receipt_line(receipt: &Receipt) -> String {
    serde_json::to_string(&Line {
        seq: receipt.body().seq,
        receipt: receipt.compact().to_owned(),
    })
    .unwrap_or_default()
}

/// Checks checkpoints against a family's whole chain (`chain[i]` has `seq == i + 1`, as
/// [`till_receipt::audit_chain`] requires): every checkpoint verifies, names this family,
/// and states exactly what the chain holds (count, voids among them, the hash of its last
/// receipt, the `prev` of its first); the ranges are contiguous from seq 1. Returns the last pruned
/// seq (0 without checkpoints).
pub fn check_checkpoints(
    chain: &[Receipt],
    checkpoints: &[Checkpoint],
    keys: &ReceiptKeySet,
) -> Result<u64, String> {
    let mut sorted: Vec<&Checkpoint> = checkpoints.iter().collect();
    sorted.sort_by_key(|c| c.body.from_seq);
    sorted.dedup_by(|a, b| a == b);
    let mut next = 1u64;
    for c in sorted {
        c.verify(keys)?;
        let b = &c.body;
        let range = format!("checkpoint {}..={}", b.from_seq, b.to_seq);
        if b.from_seq != next || b.to_seq < b.from_seq || b.count != b.to_seq - b.from_seq + 1 {
            return Err(format!(
                "{range}: ranges are not contiguous from seq 1 (expected {next}..)"
            ));
        }
        let at = |seq: u64| {
            usize::try_from(seq - 1)
                .ok()
                .and_then(|i| chain.get(i))
                .ok_or_else(|| {
                    format!("{range}: receipt {seq} is not in the chain (exported file missing?)")
                })
        };
        let (first, last) = (at(b.from_seq)?, at(b.to_seq)?);
        if first.body().family != b.family {
            return Err(format!("{range}: another family"));
        }
        if last.hash_hex() != b.head || first.body().prev != b.first_prev {
            return Err(format!(
                "{range}: the exported receipts are not the ones it signed"
            ));
        }
        let voids = (b.from_seq..=b.to_seq)
            .map(at)
            .collect::<Result<Vec<_>, _>>()?
            .iter()
            .filter(|r| r.body().is_void())
            .count() as u64;
        if voids != b.voids {
            return Err(format!(
                "{range}: states {} voids, the exported receipts hold {voids}",
                b.voids
            ));
        }
        next = b.to_seq + 1;
    }
    Ok(next - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> CheckpointBody {
        CheckpointBody {
            v: 1,
            family: "ab".into(),
            from_seq: 1,
            to_seq: 3,
            count: 3,
            head: "00".repeat(32),
            first_prev: None,
            file: "ab.jsonl".into(),
            ledger: None,
            kid: String::new(),
            iat: 1,
            voids: 0,
        }
    }

    #[test]
    fn checkpoints_sign_parse_and_verify() {
        let signer = ReceiptSigner::from_seed([4; 32]);
        let keys: ReceiptKeySet = [signer.public_key()].into_iter().collect();
        let c = Checkpoint::sign(body(), &signer);
        assert_eq!(c.body.kid, signer.key_id());
        let parsed = Checkpoint::parse(&c.to_line()).unwrap();
        assert_eq!(parsed, c);
        parsed.verify(&keys).unwrap();
        let mut forged = parsed.clone();
        forged.body.to_seq = 4;
        assert!(forged.verify(&keys).is_err());
        assert!(c.verify(&ReceiptKeySet::new()).is_err());
        // No voids: the member is left out (checkpoints signed before voids verify).
        assert!(!c.to_line().contains("voids"));
        let mut with_voids = body();
        with_voids.voids = 1;
        let line = Checkpoint::sign(with_voids, &signer).to_line();
        assert!(line.contains(r#""voids":1"#), "{line}");
        Checkpoint::parse(&line).unwrap().verify(&keys).unwrap();
    }
}

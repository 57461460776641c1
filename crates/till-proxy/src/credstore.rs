//! The encrypted credential store: real upstream credentials kept in the data dir's
//! `credentials.json`, each record sealed with XChaCha20-Poly1305 under a master key that
//! is never stored beside it (`spec/config.md`, "Credential store").
//!
//! Design: the file is JSON with public metadata per record (name, upstream, created,
//! fingerprint) and the sealed value. The associated data of every record is its own
//! metadata, name first, so a record copied or swapped under another name, or with its
//! metadata edited, fails to open — and the error names the record. The AEAD key and the
//! fingerprint key are derived from the master key (HMAC-SHA256 with fixed labels); the
//! store remembers only the master key's id, so a wrong master key is told apart from a
//! tampered record. Fingerprints are keyed (they reveal nothing about a value without the
//! master key) and are what `till credential list` shows instead of values.
//!
//! Master key sources, first found wins: `TILL_MASTER_KEY_FILE` (a file, mode 0600, not in
//! the data dir), `TILL_MASTER_KEY` (the value itself), then systemd's
//! `$CREDENTIALS_DIRECTORY/till-master-key` (`LoadCredential=` / `SetCredentialEncrypted=`).
//! A master key is 32 bytes written as 64 hex digits (or base64).
//!
//! Secrets: values are decrypted into [`Secret`]s (zeroized on drop, redacted `Debug`);
//! the master key is zeroized on drop and its `Debug` shows only its id and source. No
//! error message quotes a value or a key.

use std::collections::BTreeMap;
use std::fmt;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use chacha20poly1305::aead::{Aead as _, KeyInit as _, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac as _};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use zeroize::{Zeroize as _, Zeroizing};

use crate::config::Env;
use crate::secret::Secret;

/// The store's file name in the data dir.
pub const STORE_FILE: &str = "credentials.json";
/// Environment: a file holding the master key.
pub const ENV_MASTER_KEY_FILE: &str = "TILL_MASTER_KEY_FILE";
/// Environment: the master key itself (64 hex digits).
pub const ENV_MASTER_KEY: &str = "TILL_MASTER_KEY";
/// Environment set by systemd for a unit with credentials.
pub const ENV_CREDENTIALS_DIRECTORY: &str = "CREDENTIALS_DIRECTORY";
/// The systemd credential name Till reads from `$CREDENTIALS_DIRECTORY`.
pub const SYSTEMD_CREDENTIAL: &str = "till-master-key";
/// The store format version this build writes and reads.
pub const STORE_VERSION: u32 = 1;
/// Prefix of `credential = "store:NAME"` in `till.toml`.
pub const STORE_PREFIX: &str = "store:";

const AEAD_LABEL: &[u8] = b"till credential store v1: aead key";
const FINGERPRINT_LABEL: &[u8] = b"till credential store v1: fingerprint key";
const ID_LABEL: &[u8] = b"till credential store v1: master key id";
const AD_PREFIX: &[u8] = b"till-credential-v1";

/// What can go wrong with the store or the master key. Messages name the record or the
/// source, never a value.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// No master key source is set.
    #[error(
        "no master key: set {ENV_MASTER_KEY_FILE} (a file outside the data dir), {ENV_MASTER_KEY}, \
         or run under systemd with LoadCredential={SYSTEMD_CREDENTIAL}:<file>"
    )]
    NoMasterKey,
    /// The master key could not be read or is not 32 bytes.
    #[error("master key from {source_name}: {reason}")]
    BadMasterKey {
        /// Where it came from.
        source_name: String,
        /// What is wrong.
        reason: String,
    },
    /// The store was sealed under another master key.
    #[error(
        "credential store {path}: record `{record}` was sealed under master key {store_key}, \
         but the master key from {source_name} is {given_key}: wrong master key"
    )]
    WrongMasterKey {
        /// The store file.
        path: String,
        /// The first record that cannot be opened.
        record: String,
        /// The id the store names.
        store_key: String,
        /// The id of the key given.
        given_key: String,
        /// Where the key given came from.
        source_name: String,
    },
    /// A record does not open under the right master key: edited, corrupted, or moved
    /// from another name.
    #[error(
        "credential store {path}: record `{record}` does not decrypt: it was tampered with, \
         corrupted, or copied from another record (each record is bound to its name)"
    )]
    Tampered {
        /// The store file.
        path: String,
        /// The record.
        record: String,
    },
    /// No record with this name.
    #[error("credential store {path} has no record `{record}` (see `till credential list`)")]
    NotFound {
        /// The store file.
        path: String,
        /// The record asked for.
        record: String,
    },
    /// A record name that is not allowed.
    #[error("credential name `{0}`: 1-64 of a-z A-Z 0-9 - _ . starting with a letter or digit")]
    BadName(String),
    /// A value that cannot be a credential.
    #[error("credential `{0}`: the value is empty or contains spaces or control characters")]
    BadValue(String),
    /// The file cannot be read, parsed or written.
    #[error("credential store {path}: {reason}")]
    File {
        /// The store file.
        path: String,
        /// What went wrong.
        reason: String,
    },
}

/// The master key (32 bytes). Zeroized on drop; `Debug` shows its id and source only.
pub struct MasterKey {
    key: Zeroizing<[u8; 32]>,
    source: String,
}

impl fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MasterKey")
            .field("id", &self.id())
            .field("source", &self.source)
            .finish_non_exhaustive()
    }
}

impl MasterKey {
    /// A fresh key from the OS RNG.
    pub fn generate() -> Self {
        let mut key = Zeroizing::new([0u8; 32]);
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, key.as_mut_slice());
        MasterKey {
            key,
            source: "generated".into(),
        }
    }

    /// Reads a key written as 64 hex digits or as base64 of 32 bytes (surrounding
    /// whitespace ignored); `source` names where it came from, for errors.
    pub fn from_text(text: &str, source: impl Into<String>) -> Result<Self, StoreError> {
        let source = source.into();
        let text = text.trim();
        let bytes = Zeroizing::new(
            hex::decode(text)
                .ok()
                .filter(|b| b.len() == 32)
                .or_else(|| STANDARD.decode(text).ok())
                .or_else(|| URL_SAFE_NO_PAD.decode(text.trim_end_matches('=')).ok())
                .unwrap_or_default(),
        );
        let key: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| StoreError::BadMasterKey {
                source_name: source.clone(),
                reason: "a master key is 32 bytes written as 64 hex digits (or base64); \
                         `till credential master-key` prints a new one"
                    .into(),
            })?;
        Ok(MasterKey {
            key: Zeroizing::new(key),
            source,
        })
    }

    /// The key as 64 hex digits (to write to a file). Holds the secret.
    pub fn to_hex(&self) -> Zeroizing<String> {
        Zeroizing::new(hex::encode(self.key.as_slice()))
    }

    /// Where the key came from (`TILL_MASTER_KEY_FILE /etc/till/master.key`, …).
    pub fn source(&self) -> &str {
        &self.source
    }

    /// `m-` + 16 hex digits: names the key without revealing it.
    pub fn id(&self) -> String {
        format!("m-{}", hex::encode(&self.derive(ID_LABEL)[..8]))
    }

    /// Finds the master key: `TILL_MASTER_KEY_FILE`, else `TILL_MASTER_KEY`, else
    /// `$CREDENTIALS_DIRECTORY/till-master-key`. A key file inside `data_dir` is refused:
    /// a key kept beside what it encrypts protects nothing.
    pub fn resolve(env: &dyn Env, data_dir: &Path) -> Result<Self, StoreError> {
        if let Some(file) = env.var(ENV_MASTER_KEY_FILE).filter(|v| !v.is_empty()) {
            let path = PathBuf::from(&file);
            let source = format!("{ENV_MASTER_KEY_FILE} {}", path.display());
            refuse_beside_store(&path, data_dir, &source)?;
            check_file_mode(&path, &source)?;
            return Self::read_file(&path, source);
        }
        if let Some(value) = env.var(ENV_MASTER_KEY).filter(|v| !v.is_empty()) {
            let value = Zeroizing::new(value);
            return Self::from_text(&value, ENV_MASTER_KEY);
        }
        if let Some(dir) = env.var(ENV_CREDENTIALS_DIRECTORY).filter(|v| !v.is_empty()) {
            let path = Path::new(&dir).join(SYSTEMD_CREDENTIAL);
            if path.exists() {
                let source = format!("systemd credential {}", path.display());
                return Self::read_file(&path, source);
            }
        }
        Err(StoreError::NoMasterKey)
    }

    fn read_file(path: &Path, source: String) -> Result<Self, StoreError> {
        let text = Zeroizing::new(std::fs::read_to_string(path).map_err(|e| {
            StoreError::BadMasterKey {
                source_name: source.clone(),
                reason: format!("cannot read it: {e}"),
            }
        })?);
        Self::from_text(&text, source)
    }

    fn derive(&self, label: &[u8]) -> Zeroizing<[u8; 32]> {
        // HMAC accepts any key length, so `new_from_slice` cannot fail here.
        let mut out = Zeroizing::new([0u8; 32]);
        if let Ok(mut mac) = <Hmac<Sha256> as hmac::Mac>::new_from_slice(self.key.as_slice()) {
            mac.update(label);
            out.copy_from_slice(&mac.finalize().into_bytes());
        }
        out
    }

    fn cipher(&self) -> Option<XChaCha20Poly1305> {
        let key = self.derive(AEAD_LABEL);
        XChaCha20Poly1305::new_from_slice(key.as_slice()).ok()
    }

    fn fingerprint(&self, name: &str, value: &str) -> String {
        let key = self.derive(FINGERPRINT_LABEL);
        let mut out = String::from("fp-");
        if let Ok(mut mac) = <Hmac<Sha256> as hmac::Mac>::new_from_slice(key.as_slice()) {
            mac.update(name.as_bytes());
            mac.update(&[0]);
            mac.update(value.as_bytes());
            out.push_str(&hex::encode(&mac.finalize().into_bytes()[..8]));
        }
        out
    }
}

fn refuse_beside_store(key_file: &Path, data_dir: &Path, source: &str) -> Result<(), StoreError> {
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let dir = canonical(data_dir);
    let file = canonical(key_file);
    if file.starts_with(&dir) {
        return Err(StoreError::BadMasterKey {
            source_name: source.to_owned(),
            reason: format!(
                "the master key file is inside the data dir {}: keep it elsewhere (another \
                 disk, a secrets manager, systemd credentials), or it protects nothing",
                data_dir.display()
            ),
        });
    }
    Ok(())
}

fn check_file_mode(path: &Path, source: &str) -> Result<(), StoreError> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            if mode & 0o077 != 0 {
                return Err(StoreError::BadMasterKey {
                    source_name: source.to_owned(),
                    reason: format!(
                        "the file is accessible by group or others (mode {mode:04o}): run \
                         `chmod 600 {}`",
                        path.display()
                    ),
                });
            }
        }
    }
    #[cfg(not(unix))]
    let _ = (path, source);
    Ok(())
}

/// Public metadata of one record: what `till credential list` shows.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RecordInfo {
    /// The record's name (`credential = "store:NAME"`).
    pub name: String,
    /// The upstream it is meant for (informational).
    pub upstream: String,
    /// When it was stored, Unix seconds.
    pub created: u64,
    /// Keyed fingerprint of the value (`fp-` + 16 hex digits).
    pub fingerprint: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Record {
    #[serde(rename = "record")]
    info: RecordInfo,
    /// 24-byte XChaCha20 nonce, base64url.
    nonce: String,
    /// Ciphertext and tag, base64url.
    sealed: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct StoreFile {
    version: u32,
    /// Id of the master key the records are sealed under (`null` while empty).
    master_key: Option<String>,
    records: Vec<Record>,
}

/// The store as read from (and written back to) its file.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    path: PathBuf,
    file: StoreFile,
}

impl CredentialStore {
    /// Reads the store at `path`; a missing file is an empty store.
    pub fn load(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let path = path.into();
        let fail = |reason: String| StoreError::File {
            path: path.display().to_string(),
            reason,
        };
        let file = match std::fs::read_to_string(&path) {
            Ok(text) => {
                let file: StoreFile = serde_json::from_str(&text).map_err(|e| {
                    fail(format!(
                        "not a credential store (JSON error at line {} column {})",
                        e.line(),
                        e.column()
                    ))
                })?;
                if file.version != STORE_VERSION {
                    return Err(fail(format!(
                        "format version {}, this build reads {STORE_VERSION}",
                        file.version
                    )));
                }
                file
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => StoreFile {
                version: STORE_VERSION,
                master_key: None,
                records: Vec::new(),
            },
            Err(e) => return Err(fail(e.to_string())),
        };
        Ok(CredentialStore { path, file })
    }

    /// The store file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Every record's metadata, by name (no master key needed, no value shown).
    pub fn records(&self) -> Vec<RecordInfo> {
        let mut out: Vec<RecordInfo> = self.file.records.iter().map(|r| r.info.clone()).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }

    /// Whether a record named `name` exists.
    pub fn contains(&self, name: &str) -> bool {
        self.file.records.iter().any(|r| r.info.name == name)
    }

    /// Id of the master key the records are sealed under, if any.
    pub fn master_key_id(&self) -> Option<&str> {
        self.file.master_key.as_deref()
    }

    /// Seals `value` as record `name` (replacing one of that name). Every record of a
    /// store is under one master key: a store sealed under another key is refused.
    pub fn set(
        &mut self,
        master: &MasterKey,
        name: &str,
        upstream: &str,
        value: &Secret,
        now: u64,
    ) -> Result<RecordInfo, StoreError> {
        validate_name(name)?;
        validate_name(upstream)?;
        validate_value(name, value.expose())?;
        if let Some(id) = self.file.master_key.as_deref() {
            if id != master.id() && !self.file.records.is_empty() {
                return Err(StoreError::WrongMasterKey {
                    path: self.path.display().to_string(),
                    record: self.file.records[0].info.name.clone(),
                    store_key: id.to_owned(),
                    given_key: master.id(),
                    source_name: master.source.clone(),
                });
            }
        }
        let info = RecordInfo {
            name: name.to_owned(),
            upstream: upstream.to_owned(),
            created: now,
            fingerprint: master.fingerprint(name, value.expose()),
        };
        let mut nonce = [0u8; 24];
        rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut nonce);
        let ad = associated_data(&info);
        let sealed = master
            .cipher()
            .and_then(|c| {
                c.encrypt(
                    &XNonce::from(nonce),
                    Payload {
                        msg: value.expose().as_bytes(),
                        aad: &ad,
                    },
                )
                .ok()
            })
            .ok_or_else(|| StoreError::File {
                path: self.path.display().to_string(),
                reason: "encryption failed".into(),
            })?;
        let record = Record {
            info: info.clone(),
            nonce: URL_SAFE_NO_PAD.encode(nonce),
            sealed: URL_SAFE_NO_PAD.encode(sealed),
        };
        self.file.records.retain(|r| r.info.name != name);
        self.file.records.push(record);
        self.file.master_key = Some(master.id());
        Ok(info)
    }

    /// Removes record `name`; false when there was none.
    pub fn remove(&mut self, name: &str) -> bool {
        let before = self.file.records.len();
        self.file.records.retain(|r| r.info.name != name);
        if self.file.records.is_empty() {
            self.file.master_key = None;
        }
        self.file.records.len() != before
    }

    /// Opens record `name`.
    pub fn open(&self, master: &MasterKey, name: &str) -> Result<Secret, StoreError> {
        let record = self
            .file
            .records
            .iter()
            .find(|r| r.info.name == name)
            .ok_or_else(|| StoreError::NotFound {
                path: self.path.display().to_string(),
                record: name.to_owned(),
            })?;
        self.open_record(master, record)
    }

    /// Opens every record (the first failure, naming its record, wins).
    pub fn open_all(&self, master: &MasterKey) -> Result<BTreeMap<String, Secret>, StoreError> {
        let mut out = BTreeMap::new();
        for r in &self.file.records {
            out.insert(r.info.name.clone(), self.open_record(master, r)?);
        }
        Ok(out)
    }

    fn open_record(&self, master: &MasterKey, record: &Record) -> Result<Secret, StoreError> {
        let path = self.path.display().to_string();
        let name = record.info.name.clone();
        if let Some(id) = self.file.master_key.as_deref() {
            if id != master.id() {
                return Err(StoreError::WrongMasterKey {
                    path,
                    record: name,
                    store_key: id.to_owned(),
                    given_key: master.id(),
                    source_name: master.source.clone(),
                });
            }
        }
        let tampered = || StoreError::Tampered {
            path: path.clone(),
            record: name.clone(),
        };
        let nonce: [u8; 24] = URL_SAFE_NO_PAD
            .decode(&record.nonce)
            .ok()
            .and_then(|n| n.try_into().ok())
            .ok_or_else(tampered)?;
        let sealed = URL_SAFE_NO_PAD
            .decode(&record.sealed)
            .map_err(|_| tampered())?;
        let ad = associated_data(&record.info);
        let plain = Zeroizing::new(
            master
                .cipher()
                .and_then(|c| {
                    c.decrypt(
                        &XNonce::from(nonce),
                        Payload {
                            msg: &sealed,
                            aad: &ad,
                        },
                    )
                    .ok()
                })
                .ok_or_else(tampered)?,
        );
        let text = match std::str::from_utf8(&plain) {
            Ok(t) => t,
            Err(_) => return Err(tampered()),
        };
        // A fingerprint that does not match the value means the metadata was rewritten
        // (the AEAD already refuses that, since the fingerprint is associated data).
        let fingerprint = master.fingerprint(&record.info.name, text);
        if !bool::from(subtle::ConstantTimeEq::ct_eq(
            fingerprint.as_bytes(),
            record.info.fingerprint.as_bytes(),
        )) {
            return Err(tampered());
        }
        Ok(Secret::new(text))
    }

    /// Writes the store: a temporary file (mode 0600) renamed over the old one, so a
    /// crash leaves the old store or the new one, never half of either.
    pub fn save(&self) -> Result<(), StoreError> {
        let fail = |reason: String| StoreError::File {
            path: self.path.display().to_string(),
            reason,
        };
        let mut text = serde_json::to_string_pretty(&self.file).map_err(|e| fail(e.to_string()))?;
        text.push('\n');
        let tmp = self
            .path
            .with_extension(format!("json.tmp-{}", std::process::id()));
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt as _;
            opts.mode(0o600);
        }
        let write = || -> std::io::Result<()> {
            let mut f = opts.open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, &self.path)?;
            if let Some(dir) = self.path.parent() {
                if let Ok(d) = std::fs::File::open(dir) {
                    let _ = d.sync_all();
                }
            }
            Ok(())
        };
        write().map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            fail(e.to_string())
        })
    }
}

/// The associated data of a record: a label and its metadata, NUL-separated (names and
/// upstreams cannot contain NUL).
fn associated_data(info: &RecordInfo) -> Vec<u8> {
    let mut ad = AD_PREFIX.to_vec();
    for part in [
        info.name.as_bytes(),
        info.upstream.as_bytes(),
        info.created.to_string().as_bytes(),
        info.fingerprint.as_bytes(),
    ] {
        ad.push(0);
        ad.extend_from_slice(part);
    }
    ad
}

/// Record and upstream names: 1-64 of `a-z A-Z 0-9 - _ .`, starting with a letter or digit.
pub fn validate_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.to_owned()))
    }
}

/// A credential goes into a header or a query: no empty value, spaces or control bytes.
pub fn validate_value(name: &str, value: &str) -> Result<(), StoreError> {
    if value.is_empty() || value.bytes().any(|b| b.is_ascii_control() || b == b' ') {
        return Err(StoreError::BadValue(name.to_owned()));
    }
    Ok(())
}

/// Reads a credential value typed or piped in: one line, the line break removed; the
/// buffer is zeroized.
pub fn value_from_line(mut line: String) -> Secret {
    let trimmed = line.trim_end_matches(['\r', '\n']).to_owned();
    line.zeroize();
    Secret::new(trimmed)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn key(b: u8) -> MasterKey {
        MasterKey::from_text(&hex::encode([b; 32]), "test").unwrap()
    }

    fn store(dir: &Path) -> CredentialStore {
        let mut s = CredentialStore::load(dir.join(STORE_FILE)).unwrap();
        s.set(&key(1), "openai", "openai", &Secret::new("sk-aaa-111"), 10)
            .unwrap();
        s.set(&key(1), "github", "github", &Secret::new("ghp_bbb222"), 11)
            .unwrap();
        s.save().unwrap();
        CredentialStore::load(dir.join(STORE_FILE)).unwrap()
    }

    #[test]
    fn records_round_trip_and_the_file_holds_no_value() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        assert_eq!(s.open(&key(1), "openai").unwrap().expose(), "sk-aaa-111");
        let all = s.open_all(&key(1)).unwrap();
        assert_eq!(all["github"].expose(), "ghp_bbb222");
        let text = std::fs::read_to_string(dir.path().join(STORE_FILE)).unwrap();
        assert!(
            !text.contains("sk-aaa") && !text.contains("ghp_bbb"),
            "{text}"
        );
        let names: Vec<_> = s.records().into_iter().map(|r| r.name).collect();
        assert_eq!(names, ["github", "openai"]);
        assert!(matches!(
            s.open(&key(1), "nope"),
            Err(StoreError::NotFound { .. })
        ));
    }

    #[test]
    fn another_master_key_does_not_open_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let err = s.open_all(&key(2)).unwrap_err();
        assert!(matches!(err, StoreError::WrongMasterKey { ref record, .. } if record == "openai"));
        assert!(err.to_string().contains("wrong master key"), "{err}");
        // Even with the store's key id forged to match, the AEAD refuses.
        let path = dir.path().join(STORE_FILE);
        let text = std::fs::read_to_string(&path)
            .unwrap()
            .replace(&key(1).id(), &key(2).id());
        std::fs::write(&path, text).unwrap();
        let s = CredentialStore::load(&path).unwrap();
        assert!(matches!(
            s.open(&key(2), "github"),
            Err(StoreError::Tampered { .. })
        ));
        // And a new record under another key is refused rather than mixing keys.
        let mut s = store(tempfile::tempdir().unwrap().path());
        assert!(s.set(&key(3), "x", "x", &Secret::new("v"), 1).is_err());
    }

    #[test]
    fn swapped_or_edited_records_are_detected_by_name() {
        let dir = tempfile::tempdir().unwrap();
        let _ = store(dir.path());
        let path = dir.path().join(STORE_FILE);
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let records = json["records"].as_array_mut().unwrap();
        // Swap the sealed values (and nonces) of the two records.
        let (a, b) = (records[0].clone(), records[1].clone());
        for (field, _) in [("nonce", 0), ("sealed", 0)] {
            records[0][field] = b[field].clone();
            records[1][field] = a[field].clone();
        }
        std::fs::write(&path, json.to_string()).unwrap();
        let s = CredentialStore::load(&path).unwrap();
        let err = s.open_all(&key(1)).unwrap_err();
        assert!(
            matches!(err, StoreError::Tampered { ref record, .. } if record == "openai"),
            "{err}"
        );
        // Renaming a record (metadata edit) is detected too.
        let mut json: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.path().join(STORE_FILE)).unwrap())
                .unwrap();
        json["records"][1]["record"]["name"] = "renamed".into();
        std::fs::write(&path, json.to_string()).unwrap();
        let s = CredentialStore::load(&path).unwrap();
        assert!(matches!(
            s.open(&key(1), "renamed"),
            Err(StoreError::Tampered { .. })
        ));
    }

    #[test]
    fn master_key_sources_in_order_and_never_beside_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let file = outside.path().join("master.key");
        std::fs::write(&file, format!("{}\n", hex::encode([5u8; 32]))).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let mut env: HashMap<String, String> = HashMap::new();
        assert!(matches!(
            MasterKey::resolve(&env, dir.path()),
            Err(StoreError::NoMasterKey)
        ));
        let systemd = tempfile::tempdir().unwrap();
        std::fs::write(
            systemd.path().join(SYSTEMD_CREDENTIAL),
            hex::encode([7u8; 32]),
        )
        .unwrap();
        env.insert(
            ENV_CREDENTIALS_DIRECTORY.into(),
            systemd.path().display().to_string(),
        );
        assert_eq!(
            MasterKey::resolve(&env, dir.path()).unwrap().id(),
            key(7).id()
        );
        env.insert(ENV_MASTER_KEY.into(), hex::encode([6u8; 32]));
        assert_eq!(
            MasterKey::resolve(&env, dir.path()).unwrap().id(),
            key(6).id()
        );
        env.insert(ENV_MASTER_KEY_FILE.into(), file.display().to_string());
        let k = MasterKey::resolve(&env, dir.path()).unwrap();
        assert_eq!(k.id(), key(5).id());
        let dbg = format!("{k:?}");
        assert!(!dbg.contains(&hex::encode([5u8; 32])), "{dbg}");
        // A key file in the data dir is refused.
        let beside = dir.path().join("master.key");
        std::fs::copy(&file, &beside).unwrap();
        env.insert(ENV_MASTER_KEY_FILE.into(), beside.display().to_string());
        let err = MasterKey::resolve(&env, dir.path()).unwrap_err();
        assert!(err.to_string().contains("inside the data dir"), "{err}");
        assert!(MasterKey::from_text("abcd", "x").is_err());
    }

    #[test]
    fn names_and_values_are_checked() {
        assert!(validate_name("openai-prod.2").is_ok());
        for bad in ["", "-x", "a b", "a/b", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
        assert!(validate_value("n", "sk 1").is_err());
        assert!(validate_value("n", "sk\n1").is_err());
        assert_eq!(value_from_line("sk-1\r\n".into()).expose(), "sk-1");
    }
}

//! The data directory: root key, receipt key and the embedded ledger, in one place.
//!
//! Layout (see README "Data directory"):
//! - `root.key.jwk`     private root (minting) key, mode 0600
//! - `root.pub.jwk`     root public key (give it to verifiers)
//! - `receipt.key.jwk`  private receipt-signing key, mode 0600
//! - `receipt.pub.jwk`  receipt public key (give it to auditors)
//! - `ledger.redb`      the embedded activation ledger
//! - `ledger.id`        the id of this data dir's ledger, written when the ledger is
//!   created (or first bound): an emptied, replaced or foreign `ledger.redb` is refused
//! - `keys.json`        every root and receipt public key the data dir has had, with its
//!   state (minting / trusted / retired, signing / verifying): see [`crate::registry`]
//! - `credentials.json` the encrypted credential store (`till credential`), if used
//!
//! Resolution: `--dir`, else `$TILL_DATA_DIR`, else `$XDG_DATA_HOME/till`, else
//! `$HOME/.local/share/till`.
//!
//! Fail closed, never silently reset: keys are created only in a data dir that holds no
//! Till state. A missing private key next to its public half, the other key pair or the
//! ledger (`ledger*`) is an error that names the files: a new root key
//! would orphan every issued key (`key_unknown_root`), a new receipt key every receipt
//! chain. A private key file readable by group or others is refused, like ssh does.

use std::fs;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _, Result};
use till_receipt::{ReceiptPublicKey, ReceiptSigner};
use till_token::{KeyRing, RootKey, RootPublicKey};

/// Environment variable naming the data dir.
pub const ENV_DATA_DIR: &str = "TILL_DATA_DIR";

const ROOT_KEY: &str = "root.key.jwk";
const ROOT_PUB: &str = "root.pub.jwk";
const RECEIPT_KEY: &str = "receipt.key.jwk";
const RECEIPT_PUB: &str = "receipt.pub.jwk";
const LEDGER: &str = "ledger.redb";
const LEDGER_ID: &str = "ledger.id";

/// A resolved data directory (it may not exist yet).
#[derive(Debug, Clone)]
pub struct DataDir {
    path: PathBuf,
}

/// What [`DataDir::init`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Init {
    /// Keys were generated.
    Created,
    /// Keys were already there.
    Existing,
}

impl DataDir {
    /// Resolves the data dir from a flag, the environment, or the default.
    pub fn resolve(flag: Option<&Path>) -> Result<Self> {
        if let Some(p) = flag {
            return Ok(DataDir {
                path: p.to_path_buf(),
            });
        }
        if let Some(p) = std::env::var_os(ENV_DATA_DIR).filter(|p| !p.is_empty()) {
            return Ok(DataDir {
                path: PathBuf::from(p),
            });
        }
        if let Some(p) = std::env::var_os("XDG_DATA_HOME").filter(|p| !p.is_empty()) {
            return Ok(DataDir {
                path: PathBuf::from(p).join("till"),
            });
        }
        let home = std::env::var_os("HOME")
            .filter(|p| !p.is_empty())
            .context("cannot find a data dir: set TILL_DATA_DIR or pass --dir")?;
        Ok(DataDir {
            path: PathBuf::from(home).join(".local/share/till"),
        })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Creates the directory (mode 0700) if it does not exist; no keys.
    pub fn ensure_dir(&self) -> Result<()> {
        create_private_dir(&self.path)
    }

    /// Path of the embedded ledger file.
    pub fn ledger_path(&self) -> PathBuf {
        self.path.join(LEDGER)
    }

    /// The id of this data dir's ledger, if one was recorded.
    pub fn recorded_ledger_id(&self) -> Result<Option<String>> {
        let path = self.path.join(LEDGER_ID);
        match fs::read_to_string(&path) {
            Ok(text) => {
                let id = text.trim();
                if id.is_empty() {
                    bail!(
                        "{} is empty: it should name this data dir's ledger",
                        path.display()
                    );
                }
                Ok(Some(id.to_owned()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    /// Which embedded ledger this data dir expects: the recorded one, else (first use, or
    /// a data dir from before ledger ids) any ledger bound to this data dir's origin
    /// receipt key (its first, kept in `keys.json` across rotations; `kid` when there is
    /// no registry), which gets a new id if it has none. Binding to the origin key, not
    /// the current one, is what keeps a receipt key rotation from looking like a foreign
    /// ledger.
    pub fn ledger_binding(&self, kid: &str) -> Result<till_ledger::LedgerBinding> {
        let origin = match self.path.join(crate::registry::REGISTRY).exists() {
            true => self.registry()?.origin_receipt_kid().map(str::to_owned),
            false => None,
        };
        let kid = origin.as_deref().unwrap_or(kid);
        Ok(match self.recorded_ledger_id()? {
            Some(id) => till_ledger::LedgerBinding::Expect(id),
            None => till_ledger::LedgerBinding::Adopt {
                new_id: till_ledger::new_ledger_id(kid),
                kid: kid.to_owned(),
            },
        })
    }

    /// Records the ledger's id in the data dir (once; a different recorded id is an error).
    pub fn record_ledger_id(&self, id: &str) -> Result<()> {
        match self.recorded_ledger_id()? {
            Some(recorded) if recorded == id => Ok(()),
            Some(recorded) => bail!(
                "{} names ledger {recorded}, but the ledger is {id}",
                self.path.join(LEDGER_ID).display()
            ),
            None => write_public(&self.path.join(LEDGER_ID), id.as_bytes()),
        }
    }

    /// Creates the directory and both key pairs when the directory holds nothing yet.
    /// Never overwrites, and never creates a key in a data dir that has any state (see the
    /// module docs); a missing public half is re-derived from its private key.
    pub fn init(&self) -> Result<Init> {
        create_private_dir(&self.path)?;
        let root_exists = self.path.join(ROOT_KEY).exists();
        let receipt_exists = self.path.join(RECEIPT_KEY).exists();
        if !(root_exists && receipt_exists) {
            self.refuse_partial_state(root_exists, receipt_exists)?;
        }
        if root_exists {
            check_private_mode(&self.path.join(ROOT_KEY))?;
            if !self.path.join(ROOT_PUB).exists() {
                let root = self.root_key()?;
                write_public(&self.path.join(ROOT_PUB), root.public().to_jwk().as_bytes())?;
            }
        }
        if receipt_exists {
            check_private_mode(&self.path.join(RECEIPT_KEY))?;
            if !self.path.join(RECEIPT_PUB).exists() {
                let signer = self.receipt_signer()?;
                write_public(
                    &self.path.join(RECEIPT_PUB),
                    signer.public_key().to_jwk().as_bytes(),
                )?;
            }
        }
        if !root_exists {
            let root = RootKey::generate();
            write_secret(&self.path.join(ROOT_KEY), root.to_private_jwk().as_bytes())?;
            write_public(&self.path.join(ROOT_PUB), root.public().to_jwk().as_bytes())?;
        }
        if !receipt_exists {
            let signer = ReceiptSigner::generate();
            write_secret(
                &self.path.join(RECEIPT_KEY),
                signer.to_private_jwk().as_bytes(),
            )?;
            write_public(
                &self.path.join(RECEIPT_PUB),
                signer.public_key().to_jwk().as_bytes(),
            )?;
        }
        if root_exists && receipt_exists {
            Ok(Init::Existing)
        } else {
            // Record the new keys' creation (and, for a data dir that had one pair, the
            // other) in keys.json.
            self.registry()?.save(&self.path)?;
            Ok(Init::Created)
        }
    }

    /// The key registry (`keys.json`), reconciled with the current key files.
    pub fn registry(&self) -> Result<crate::registry::Registry> {
        let receipt = match self.path.join(RECEIPT_PUB).exists() {
            true => Some(self.receipt_public()?),
            false => None,
        };
        crate::registry::Registry::load(&self.path, &self.root_public()?, receipt.as_ref())
    }

    /// Every receipt public key of this data dir, current and earlier (audits).
    pub fn receipt_key_set(&self) -> Result<till_receipt::ReceiptKeySet> {
        // The current key must be there (a clear "run till keygen" otherwise).
        self.receipt_public()?;
        Ok(self.registry()?.receipt_keys())
    }

    /// Root key rotation: a new private root key replaces `root.key.jwk` (the old private
    /// key is gone); the old public key stays trusted in `keys.json` until retired.
    pub fn rotate_root(&self) -> Result<RootPublicKey> {
        let mut registry = self.registry()?;
        let new = RootKey::generate();
        let public = new.public();
        self.replace_pair(
            ROOT_KEY,
            ROOT_PUB,
            &new.to_private_jwk(),
            &public.to_jwk(),
            || {
                registry.add_root(&public);
                registry.save(&self.path)
            },
        )?;
        Ok(public)
    }

    /// Receipt key rotation: a new private receipt key replaces `receipt.key.jwk`; the old
    /// public key stays in `keys.json` so the receipts it signed keep verifying.
    pub fn rotate_receipt(&self) -> Result<ReceiptPublicKey> {
        let mut registry = self.registry()?;
        let new = ReceiptSigner::generate();
        let public = new.public_key();
        let private = zeroize::Zeroizing::new(new.to_private_jwk());
        self.replace_pair(RECEIPT_KEY, RECEIPT_PUB, &private, &public.to_jwk(), || {
            registry.add_receipt(&public);
            registry.save(&self.path)
        })?;
        Ok(public)
    }

    /// Writes `<name>.new` files, runs `record` (the registry update), then renames them
    /// over the current pair. A crash before the renames leaves the old pair current (the
    /// registry is reconciled with the key files on every read).
    fn replace_pair(
        &self,
        private_name: &str,
        public_name: &str,
        private_jwk: &str,
        public_jwk: &str,
        record: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        // Both keys must be there and readable before anything changes.
        self.root_key()?;
        self.receipt_signer()?;
        let private_new = self.path.join(format!("{private_name}.new"));
        let public_new = self.path.join(format!("{public_name}.new"));
        let _ = fs::remove_file(&private_new);
        write_secret(&private_new, private_jwk.as_bytes())?;
        fs::write(&public_new, format!("{public_jwk}\n"))
            .with_context(|| format!("creating {}", public_new.display()))?;
        record()?;
        fs::rename(&public_new, self.path.join(public_name))
            .with_context(|| format!("replacing {public_name}"))?;
        fs::rename(&private_new, self.path.join(private_name))
            .with_context(|| format!("replacing {private_name}"))?;
        if let Ok(d) = fs::File::open(&self.path) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    /// Refuses to create keys unless the data dir holds no Till state: no key file of
    /// either pair and no ledger (other files, such as a `till.toml`, do not count).
    fn refuse_partial_state(&self, root_exists: bool, receipt_exists: bool) -> Result<()> {
        let mut present: Vec<String> = fs::read_dir(&self.path)
            .with_context(|| format!("reading {}", self.path.display()))?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|name| is_state(name))
            .collect();
        present.sort();
        if present.is_empty() {
            return Ok(());
        }
        let missing: Vec<&str> = [(ROOT_KEY, root_exists), (RECEIPT_KEY, receipt_exists)]
            .iter()
            .filter(|(_, exists)| !exists)
            .map(|(name, _)| *name)
            .collect();
        bail!(
            "{dir} has state ({present}) but {missing} is missing: refusing to create a new key \
             (a new root key would invalidate every issued key; a new receipt key would break \
             every receipt chain). Restore {missing} from a backup, or point --dir / \
             TILL_DATA_DIR at an empty directory to start a new, separate installation",
            dir = self.path.display(),
            present = present.join(", "),
            missing = missing.join(" and "),
        )
    }

    /// The private root key.
    pub fn root_key(&self) -> Result<RootKey> {
        let path = self.path.join(ROOT_KEY);
        check_private_mode(&path)?;
        let text = read_key_file(&path, "till keygen")?;
        RootKey::from_private_jwk(&text).with_context(|| format!("reading {}", path.display()))
    }

    /// The root public key.
    pub fn root_public(&self) -> Result<RootPublicKey> {
        load_root_public(&self.path.join(ROOT_PUB))
    }

    /// The root keys this data dir trusts: its minting key and every earlier root key not
    /// retired (`keys.json`).
    pub fn key_ring(&self) -> Result<KeyRing> {
        Ok(self.registry()?.key_ring())
    }

    /// The private receipt-signing key.
    pub fn receipt_signer(&self) -> Result<ReceiptSigner> {
        let path = self.path.join(RECEIPT_KEY);
        check_private_mode(&path)?;
        let text = read_key_file(&path, "till keygen")?;
        ReceiptSigner::from_private_jwk(&text)
            .with_context(|| format!("reading {}", path.display()))
    }

    /// The receipt public key.
    pub fn receipt_public(&self) -> Result<ReceiptPublicKey> {
        load_receipt_public(&self.path.join(RECEIPT_PUB))
    }
}

/// Reads a root public key JWK file.
pub fn load_root_public(path: &Path) -> Result<RootPublicKey> {
    let text = read_key_file(path, "till keygen")?;
    RootPublicKey::from_jwk(&text).with_context(|| format!("reading {}", path.display()))
}

/// Reads a receipt public key JWK file.
pub fn load_receipt_public(path: &Path) -> Result<ReceiptPublicKey> {
    let text = read_key_file(path, "till keygen")?;
    ReceiptPublicKey::from_jwk(&text).with_context(|| format!("reading {}", path.display()))
}

fn read_key_file(path: &Path, hint: &str) -> Result<String> {
    match fs::read_to_string(path) {
        Ok(t) => Ok(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!(
                "{} not found: run `{hint}` first (or pass --dir / set TILL_DATA_DIR)",
                path.display()
            )
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Files that are Till state: either key pair, and the ledger with its companions.
fn is_state(name: &str) -> bool {
    [
        ROOT_KEY,
        ROOT_PUB,
        RECEIPT_KEY,
        RECEIPT_PUB,
        crate::registry::REGISTRY,
    ]
    .contains(&name)
        || name.starts_with("ledger")
}

/// Refuses a private key file that group or others may read or write (ssh's rule).
/// A missing file passes (reading it then says how to create it).
pub fn check_private_mode(path: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let meta = match fs::metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
        };
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            bail!(
                "private key {} is accessible by group or others (mode {mode:04o}): \
                 refusing to use it. Run `chmod 600 {}` (and consider the key leaked if \
                 others could read it)",
                path.display(),
                path.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

fn create_private_dir(path: &Path) -> Result<()> {
    fs::create_dir_all(path).with_context(|| format!("creating {}", path.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            fs::set_permissions(path, fs::Permissions::from_mode(0o700))
                .with_context(|| format!("restricting {}", path.display()))?;
        }
    }
    Ok(())
}

fn write_secret(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    Ok(())
}

fn write_public(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut f = fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    f.write_all(bytes)?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    Ok(())
}

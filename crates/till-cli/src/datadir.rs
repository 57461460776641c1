//! The data directory: root key, receipt key and the embedded ledger, in one place.
//!
//! Layout (see README "Data directory"):
//! - `root.key.jwk`     private root (minting) key, mode 0600
//! - `root.pub.jwk`     root public key (give it to verifiers)
//! - `receipt.key.jwk`  private receipt-signing key, mode 0600
//! - `receipt.pub.jwk`  receipt public key (give it to auditors)
//! - `ledger.redb`      the embedded activation ledger
//!
//! Resolution: `--dir`, else `$TILL_DATA_DIR`, else `$XDG_DATA_HOME/till`, else
//! `$HOME/.local/share/till`.

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

    /// Path of the embedded ledger file.
    pub fn ledger_path(&self) -> PathBuf {
        self.path.join(LEDGER)
    }

    /// Creates the directory and both key pairs if they do not exist yet. Never overwrites.
    pub fn init(&self) -> Result<Init> {
        create_private_dir(&self.path)?;
        let root_exists = self.path.join(ROOT_KEY).exists();
        let receipt_exists = self.path.join(RECEIPT_KEY).exists();
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
        Ok(if root_exists && receipt_exists {
            Init::Existing
        } else {
            Init::Created
        })
    }

    /// The private root key.
    pub fn root_key(&self) -> Result<RootKey> {
        let path = self.path.join(ROOT_KEY);
        let text = read_key_file(&path, "till keygen")?;
        RootKey::from_private_jwk(&text).with_context(|| format!("reading {}", path.display()))
    }

    /// The root public key.
    pub fn root_public(&self) -> Result<RootPublicKey> {
        load_root_public(&self.path.join(ROOT_PUB))
    }

    /// The root keys this data dir trusts (its own).
    pub fn key_ring(&self) -> Result<KeyRing> {
        Ok(KeyRing::with(self.root_public()?))
    }

    /// The private receipt-signing key.
    pub fn receipt_signer(&self) -> Result<ReceiptSigner> {
        let path = self.path.join(RECEIPT_KEY);
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

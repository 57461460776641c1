//! The CLI side of the admin plane: the data dir's admin key (`admin.key`), the discovery
//! file a running `till serve` writes (`admin.json`), `till admin-key` and `till watch`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use till_admin::auth::{mint_admin_key, mint_read_only_admin_key};
use till_admin::client::{Discovery, DISCOVERY_FILE};

use crate::cli::Failure;
use crate::datadir::DataDir;
use crate::input::arg_or_stdin;

/// The data dir's admin key file (mode 0600).
pub const ADMIN_KEY: &str = "admin.key";
/// Environment: the admin API base URL (else discovered through the data dir).
pub const ENV_SERVER: &str = "TILL_SERVER";
/// Environment: the admin key itself (else the data dir's `admin.key`).
pub const ENV_ADMIN_KEY: &str = "TILL_ADMIN_KEY";

/// Creates `<data dir>/admin.key` (a full admin key minted from the root key) if absent.
pub fn ensure_admin_key(dir: &DataDir) -> Result<PathBuf> {
    let path = dir.path().join(ADMIN_KEY);
    if !path.exists() {
        let root = dir.root_key()?;
        let key = mint_admin_key(&root, None).context("minting the data dir's admin key")?;
        write_private(&path, format!("{key}\n").as_bytes())?;
    }
    Ok(path)
}

/// Writes `bytes` to `path` with mode 0600 (via a temporary file and a rename, so a
/// reader never sees half a file).
fn write_private(path: &std::path::Path, bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("creating {}", path.display()))?;
    Ok(())
}

/// The admin key to use: `$TILL_ADMIN_KEY`, else the data dir's `admin.key`.
pub fn admin_key(dir: &DataDir) -> Result<String> {
    if let Some(k) = std::env::var(ENV_ADMIN_KEY)
        .ok()
        .filter(|k| !k.trim().is_empty())
    {
        return Ok(k.trim().to_string());
    }
    let path = dir.path().join(ADMIN_KEY);
    let text = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "reading the admin key {} (set {ENV_ADMIN_KEY}, or run `till keygen`)",
            path.display()
        )
    })?;
    Ok(text.trim().to_string())
}

/// Writes `admin.json` for the CLI to find this server.
pub fn write_discovery(dir: &DataDir, url: &str) -> Result<PathBuf> {
    let path = dir.path().join(DISCOVERY_FILE);
    let body = serde_json::to_vec_pretty(&Discovery {
        url: url.to_string(),
        pid: std::process::id(),
    })?;
    write_private(&path, &body)?;
    Ok(path)
}

/// Removes `admin.json` if it is ours.
pub fn remove_discovery(dir: &DataDir) {
    let path = dir.path().join(DISCOVERY_FILE);
    if read_discovery(dir).is_some_and(|d| d.pid == std::process::id()) {
        let _ = std::fs::remove_file(path);
    }
}

/// The running server announced in the data dir, if any.
pub fn read_discovery(dir: &DataDir) -> Option<Discovery> {
    let text = std::fs::read_to_string(dir.path().join(DISCOVERY_FILE)).ok()?;
    serde_json::from_str(&text).ok()
}

/// The admin API to talk to: `--server`/`$TILL_SERVER`, else the data dir's `admin.json`.
pub fn server_url(dir: &DataDir, flag: Option<&str>) -> Option<String> {
    flag.map(str::to_string)
        .or_else(|| std::env::var(ENV_SERVER).ok().filter(|s| !s.is_empty()))
        .or_else(|| read_discovery(dir).map(|d| d.url))
}

/// `till admin-key` arguments.
#[derive(Debug, clap::Args)]
pub struct AdminKeyArgs {
    /// Read-only: GET endpoints only (no mint, attenuate, revoke).
    #[arg(long)]
    pub read_only: bool,
    /// Lifetime (`1h`, `7d`); default: no expiry.
    #[arg(long, value_name = "DURATION")]
    pub ttl: Option<humantime::Duration>,
    /// Private root key file (default: the data dir's root.key.jwk).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
}

/// `till admin-key`: prints a new admin key.
pub fn admin_key_cmd(dir: &DataDir, args: AdminKeyArgs) -> Result<ExitCode> {
    let root = match &args.key {
        Some(path) => {
            crate::datadir::check_private_mode(path)?;
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            till_token::RootKey::from_private_jwk(&text)
                .with_context(|| format!("reading {}", path.display()))?
        }
        None => dir.root_key()?,
    };
    let expires = match args.ttl {
        Some(ttl) => {
            let d: Duration = ttl.into();
            let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
            Some(i64::try_from(now.saturating_add(d.as_secs())).context("--ttl is too long")?)
        }
        None => None,
    };
    let key = if args.read_only {
        mint_read_only_admin_key(&root, expires)
    } else {
        mint_admin_key(&root, expires)
    }
    .map_err(Failure::invalid)?;
    println!("{key}");
    Ok(ExitCode::SUCCESS)
}

/// `till watch` arguments.
#[derive(Debug, clap::Args)]
pub struct WatchArgs {
    /// Only this family: a key (or `-`), or a family id in hex.
    pub target: Option<String>,
    /// Admin API base URL (default: $TILL_SERVER, else the running server found through
    /// the data dir).
    #[arg(long, value_name = "URL")]
    pub server: Option<String>,
    /// Print raw JSON lines.
    #[arg(long)]
    pub json: bool,
    /// Stop after this many events.
    #[arg(long, value_name = "N")]
    pub count: Option<u64>,
}

/// `till watch`: the live event stream in the terminal.
pub fn watch_cmd(dir: &DataDir, args: WatchArgs) -> Result<ExitCode> {
    let Some(url) = server_url(dir, args.server.as_deref()) else {
        bail!(
            "no running till serve found (no {} in {}); pass --server URL",
            DISCOVERY_FILE,
            dir.path().display()
        );
    };
    let key = admin_key(dir)?;
    let family = match &args.target {
        None => None,
        Some(t) => {
            let t = arg_or_stdin(t)?;
            if t.starts_with(till_token::KEY_PREFIX) {
                let report = till_token::inspect(&t, None, &till_token::Limits::default())
                    .map_err(Failure::invalid)?;
                report.blocks.first().map(|b| hex::encode(&b.revocation_id))
            } else {
                Some(t.to_ascii_lowercase())
            }
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut seen = 0u64;
    let json = args.json;
    let limit = args.count;
    rt.block_on(till_admin::client::watch(
        &url,
        &key,
        family.as_deref(),
        |ev| {
            if json {
                println!("{}", ev.data);
            } else {
                println!("{}", human_line(&ev.kind, &ev.data));
            }
            seen += 1;
            limit.is_none_or(|n| seen < n)
        },
    ))
    .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(ExitCode::SUCCESS)
}

fn short(v: &serde_json::Value, key: &str) -> String {
    let s = v[key].as_str().unwrap_or("-");
    s[..s.len().min(16)].to_string()
}

/// One line per event for humans.
pub fn human_line(kind: &str, data: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(data).unwrap_or_default();
    match kind {
        "claim" => format!(
            "claim      family {}  seq {}  {} {}{}  remaining {}{}",
            short(&v, "family"),
            v["seq"],
            v["method"].as_str().unwrap_or("-"),
            v["upstream"].as_str().unwrap_or("-"),
            v["path"].as_str().unwrap_or(""),
            v["remaining"]
                .as_u64()
                .map_or("unlimited".into(), |n| n.to_string()),
            if v["replayed"] == true {
                "  (replay)"
            } else {
                ""
            }
        ),
        "void" => format!(
            "void       family {}  seq {} voided by {}  {}  remaining {}",
            short(&v, "family"),
            v["seq"],
            v["void_seq"],
            v["upstream"].as_str().unwrap_or("-"),
            v["remaining"]
                .as_u64()
                .map_or("unlimited".into(), |n| n.to_string()),
        ),
        "refusal" => format!(
            "refusal    family {}  {} {}  {}",
            short(&v, "family"),
            v["status"],
            v["code"].as_str().unwrap_or("-"),
            v["upstream"].as_str().unwrap_or("-"),
        ),
        "revocation" => format!(
            "revocation family {}  block {}",
            short(&v, "family"),
            short(&v, "revocation_id")
        ),
        "alert" => {
            let a = &v["alert"];
            format!(
                "alert      {}  family {}  {}",
                a["id"].as_str().unwrap_or("-"),
                short(a, "family"),
                a["label"].as_str().unwrap_or("")
            )
        }
        other => format!("{other:<10} {data}"),
    }
}

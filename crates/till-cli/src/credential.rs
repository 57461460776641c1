//! `till credential set|list|rm|rotate|master-key`: the encrypted credential store
//! (`till_proxy::credstore`) in the data dir.
//!
//! Values are read from stdin (piped) or a no-echo prompt, never from an argument (which
//! `ps` and shell history would keep). Nothing here prints a value: `list` shows names,
//! upstreams, creation times and keyed fingerprints.

use std::io::{IsTerminal as _, Read as _};
use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _, Result};
use serde_json::json;
use till_proxy::credstore::{self, CredentialStore, MasterKey, STORE_FILE};
use till_proxy::{Secret, SystemEnv};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::cli::Failure;
use crate::datadir::DataDir;

/// `till credential` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum CredentialCommand {
    /// Store a new credential NAME (use it as `credential = "store:NAME"` in till.toml).
    /// The value comes from stdin, or a no-echo prompt on a terminal — never an argument.
    Set {
        /// Record name.
        name: String,
        /// The upstream it is for (shown by `list`; default: NAME).
        #[arg(long, value_name = "UPSTREAM")]
        upstream: Option<String>,
    },
    /// Names, upstreams, creation times and fingerprints (never values).
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Delete credential NAME.
    Rm {
        /// Record name.
        name: String,
    },
    /// Replace credential NAME and swap it into the running server (no restart; requests
    /// in flight finish with the old value, later ones use the new one).
    Rotate {
        /// Record name.
        name: String,
        /// Admin API of the running server (default: $TILL_SERVER, else the data dir's
        /// admin.json).
        #[arg(long, value_name = "URL")]
        server: Option<String>,
    },
    /// Print a new random master key (64 hex digits). Keep it OUTSIDE the data dir and
    /// point TILL_MASTER_KEY_FILE at it (or use systemd credentials).
    MasterKey,
}

/// Runs one `till credential` command.
pub fn run(dir: &DataDir, cmd: CredentialCommand) -> Result<ExitCode> {
    let path = dir.path().join(STORE_FILE);
    match cmd {
        CredentialCommand::MasterKey => {
            let key = MasterKey::generate();
            println!("{}", key.to_hex().as_str());
            eprintln!(
                "till: master key {}: save it to a file outside the data dir (mode 0600) \
                 and set {}=<that file>",
                key.id(),
                credstore::ENV_MASTER_KEY_FILE
            );
            Ok(ExitCode::SUCCESS)
        }
        CredentialCommand::List { json } => {
            let store = load(&path)?;
            let records = store.records();
            if json {
                let out: Vec<_> = records
                    .iter()
                    .map(|r| {
                        json!({
                            "name": r.name,
                            "upstream": r.upstream,
                            "created": rfc3339(r.created),
                            "fingerprint": r.fingerprint,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({
                        "store": path,
                        "master_key": store.master_key_id(),
                        "credentials": out,
                    }))?
                );
            } else if records.is_empty() {
                println!("no credentials in {}", path.display());
            } else {
                println!(
                    "{:<24} {:<16} {:<21} fingerprint",
                    "name", "upstream", "created"
                );
                for r in records {
                    println!(
                        "{:<24} {:<16} {:<21} {}",
                        r.name,
                        r.upstream,
                        rfc3339(r.created),
                        r.fingerprint
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CredentialCommand::Rm { name } => {
            let mut store = load(&path)?;
            if !store.remove(&name) {
                bail!(Failure::usage(format!(
                    "no credential `{name}` in {}",
                    path.display()
                )));
            }
            store.save().map_err(Failure::usage_from)?;
            println!("removed credential {name}");
            Ok(ExitCode::SUCCESS)
        }
        CredentialCommand::Set { name, upstream } => {
            credstore::validate_name(&name).map_err(Failure::usage_from)?;
            let mut store = load(&path)?;
            if store.contains(&name) {
                bail!(Failure::usage(format!(
                    "credential `{name}` exists: replace it with `till credential rotate {name}`"
                )));
            }
            let master = master_key(dir)?;
            let value = read_value(&name)?;
            dir.ensure_dir()?;
            let upstream = upstream.unwrap_or_else(|| name.clone());
            let info = store
                .set(&master, &name, &upstream, &value, unix_now())
                .map_err(Failure::usage_from)?;
            store.save().map_err(Failure::usage_from)?;
            println!(
                "stored credential {} (upstream {}, fingerprint {}) in {}",
                info.name,
                info.upstream,
                info.fingerprint,
                path.display()
            );
            println!("use it in till.toml: credential = \"store:{}\"", info.name);
            Ok(ExitCode::SUCCESS)
        }
        CredentialCommand::Rotate { name, server } => {
            let mut store = load(&path)?;
            let Some(old) = store.records().into_iter().find(|r| r.name == name) else {
                bail!(Failure::usage(format!(
                    "no credential `{name}` in {}: create it with `till credential set {name}`",
                    path.display()
                )));
            };
            let master = master_key(dir)?;
            // The store must open with this master key before anything is replaced.
            store.open(&master, &name).map_err(Failure::usage_from)?;
            let value = read_value(&name)?;
            let info = store
                .set(&master, &name, &old.upstream, &value, unix_now())
                .map_err(Failure::usage_from)?;
            store.save().map_err(Failure::usage_from)?;
            println!(
                "rotated credential {} (fingerprint {} -> {})",
                name, old.fingerprint, info.fingerprint
            );
            let reloaded = crate::keys_cmd::notify_server(dir, server.as_deref());
            if let Ok(Some(report)) = &reloaded {
                let used = report["credentials"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|c| c["record"] == name.as_str()));
                if !used {
                    eprintln!(
                        "till: note: the running server's till.toml does not use store:{name}"
                    );
                }
            }
            crate::keys_cmd::report_reload(reloaded);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn load(path: &std::path::Path) -> Result<CredentialStore> {
    CredentialStore::load(path).map_err(|e| Failure::usage_from(e).into())
}

fn master_key(dir: &DataDir) -> Result<MasterKey> {
    MasterKey::resolve(&SystemEnv, dir.path()).map_err(|e| Failure::usage_from(e).into())
}

/// The value: a no-echo prompt on a terminal, else stdin (one line; a trailing line
/// break is dropped).
fn read_value(name: &str) -> Result<Secret> {
    let value = if std::io::stdin().is_terminal() {
        let typed = Zeroizing::new(
            rpassword::prompt_password(format!("value for credential {name} (not echoed): "))
                .context("reading the value")?,
        );
        credstore::value_from_line(String::clone(&typed))
    } else {
        let mut text = Zeroizing::new(String::new());
        std::io::stdin()
            .read_to_string(&mut text)
            .context("reading the value from stdin")?;
        credstore::value_from_line(String::clone(&text))
    };
    if value.expose().contains(['\n', '\r']) {
        bail!(Failure::usage(format!(
            "credential `{name}`: the value must be one line"
        )));
    }
    credstore::validate_value(name, value.expose()).map_err(Failure::usage_from)?;
    Ok(value)
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| secs.to_string())
}

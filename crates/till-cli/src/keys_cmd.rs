//! `till keygen --rotate root|receipt`, `till keys list`, `till keys retire ID`, and the
//! nudge that makes a running `till serve` pick a change up (`POST /admin/v1/reload`).

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use serde_json::json;

use crate::datadir::DataDir;
use crate::registry::{Entry, Role};

/// Which key `till keygen --rotate` replaces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum RotateWhat {
    /// The root (minting) key: new keys are minted with a new key; keys minted before keep
    /// working until `till keys retire` names the old one.
    Root,
    /// The receipt-signing key: new receipts are signed with a new key; earlier receipts
    /// keep verifying with the old public key.
    Receipt,
}

/// `till keys` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum KeysCommand {
    /// Every root and receipt key of the data dir: id, role, state, created, retired.
    List {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Stop trusting an earlier root key: keys it minted get `key_unknown_root`.
    Retire {
        /// The root key id (from `till keys list`).
        id: String,
        /// Admin API of the running server to reload (default: $TILL_SERVER, else the data
        /// dir's admin.json).
        #[arg(long, value_name = "URL")]
        server: Option<String>,
    },
}

/// `till keygen --rotate WHAT`.
pub fn rotate(dir: &DataDir, what: RotateWhat, as_json: bool) -> Result<ExitCode> {
    // Rotation needs an existing data dir: there is nothing to rotate otherwise.
    dir.root_key()?;
    dir.receipt_signer()?;
    let (role, new_id, old_id) = match what {
        RotateWhat::Root => {
            let old = dir.root_public()?.id().to_string();
            let new = dir.rotate_root()?;
            ("root", new.id().to_string(), old)
        }
        RotateWhat::Receipt => {
            let old = dir.receipt_public()?.key_id().to_owned();
            let new = dir.rotate_receipt()?;
            ("receipt", new.key_id().to_owned(), old)
        }
    };
    let reloaded = notify_server(dir, None);
    if as_json {
        let out = json!({
            "role": role,
            "new_key_id": new_id,
            "previous_key_id": old_id,
            "server_reloaded": reloaded.as_ref().is_ok_and(Option::is_some),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        println!("new {role} key:      {new_id}");
        match what {
            RotateWhat::Root => {
                println!("previous root key: {old_id} (trusted: keys it minted keep working)");
                println!("retire it when they may stop: till keys retire {old_id}");
                if let Ok(root) = dir.root_public() {
                    println!("new root public key: {}  (root.pub.jwk)", root.to_hex());
                }
            }
            RotateWhat::Receipt => {
                println!(
                    "previous receipt key: {old_id} (kept in keys.json: its receipts keep \
                     verifying)"
                );
            }
        }
    }
    report_reload(reloaded);
    Ok(ExitCode::SUCCESS)
}

/// `till keys list|retire`.
pub fn keys(dir: &DataDir, cmd: KeysCommand) -> Result<ExitCode> {
    match cmd {
        KeysCommand::List { json } => {
            let reg = dir.registry()?;
            if json {
                let keys: Vec<_> = reg.keys.iter().map(entry_json).collect();
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json!({ "keys": keys }))?
                );
            } else {
                println!(
                    "{:<8} {:<20} {:<10} {:<21} retired",
                    "role", "id", "state", "created"
                );
                for e in &reg.keys {
                    println!(
                        "{:<8} {:<20} {:<10} {:<21} {}",
                        role_name(e.role),
                        e.id,
                        e.state.as_str(),
                        e.created,
                        e.retired.as_deref().unwrap_or("-")
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::Retire { id, server } => {
            let mut reg = dir.registry()?;
            let entry = reg.retire(&id)?.clone();
            reg.save(dir.path())?;
            // The data dir's admin key must not die with the root that minted it.
            remint_admin_key_if_minted_by(dir, &id)?;
            println!(
                "retired root key {} (at {}): keys it minted now get key_unknown_root",
                entry.id,
                entry.retired.as_deref().unwrap_or("now")
            );
            report_reload(notify_server(dir, server.as_deref()));
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Re-mints the data dir's `admin.key` with the minting root key when the root key
/// `retired` minted it (otherwise the owner would lock themselves out of the admin API).
fn remint_admin_key_if_minted_by(dir: &DataDir, retired: &str) -> Result<()> {
    let path = dir.path().join(crate::admin::ADMIN_KEY);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let minted_by = till_token::inspect(text.trim(), None, &till_token::Limits::default())
        .ok()
        .and_then(|r| r.root_key_id);
    if minted_by.map(|id| id.to_string()).as_deref() == Some(retired) {
        std::fs::remove_file(&path).with_context(|| format!("replacing {}", path.display()))?;
        crate::admin::ensure_admin_key(dir)?;
        eprintln!(
            "till: {} was minted by the retired key: replaced it with one from the minting key",
            path.display()
        );
    }
    Ok(())
}

fn role_name(role: Role) -> &'static str {
    match role {
        Role::Root => "root",
        Role::Receipt => "receipt",
    }
}

fn entry_json(e: &Entry) -> serde_json::Value {
    json!({
        "role": role_name(e.role),
        "id": e.id,
        "state": e.state.as_str(),
        "created": e.created,
        "retired": e.retired,
        "public_jwk": e.public_jwk,
    })
}

/// Asks the running server (if any) to reload keys and credentials. `Ok(None)`: no
/// server found; `Ok(Some(report))`: reloaded.
pub fn notify_server(dir: &DataDir, server: Option<&str>) -> Result<Option<serde_json::Value>> {
    let Some(url) = crate::admin::server_url(dir, server) else {
        return Ok(None);
    };
    let key = crate::admin::admin_key(dir)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(std::time::Duration::from_secs(30))
            .build()?;
        let resp = client
            .post(format!("{}/admin/v1/reload", url.trim_end_matches('/')))
            .bearer_auth(key.trim())
            .send()
            .await;
        let resp = match resp {
            Ok(r) => r,
            // A stale admin.json (the server is gone): nothing to reload.
            Err(e) if e.is_connect() && server.is_none() => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reaching the server at {url}")),
        };
        let status = resp.status();
        let bytes = resp.bytes().await.unwrap_or_default();
        let body: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        if !status.is_success() {
            let message = body["error"]["message"]
                .as_str()
                .unwrap_or("no message")
                .to_owned();
            anyhow::bail!("the server at {url} did not reload ({status}): {message}");
        }
        Ok(Some(body))
    })
}

/// Tells the user whether a running server took the change.
pub fn report_reload(result: Result<Option<serde_json::Value>>) {
    match result {
        Ok(Some(_)) => eprintln!("till: the running server reloaded its keys and credentials"),
        Ok(None) => eprintln!(
            "till: no running server found; a server started later uses the new state (a \
             running one: `kill -HUP <pid>` or POST /admin/v1/reload)"
        ),
        Err(e) => eprintln!(
            "till: warning: the change is saved, but the running server did not reload: {e:#} \
             (retry with `kill -HUP <pid>`)"
        ),
    }
}

//! Key lifecycle through the real `till` binary and real HTTP: root key rotation and
//! retirement, receipt key rotation across an audited chain, and the encrypted credential
//! store (rotation under load, wrong master key, tampering, no plaintext anywhere).

use std::process::Stdio;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};

use crate::binary::{mint, serve, stop, till, walk};
use crate::support::{client, error_code, Upstream, SECRET};

/// Runs `till --dir DIR ARGS` with `stdin`, returning (exit code, stdout, stderr).
fn run(
    dir: &std::path::Path,
    args: &[&str],
    env: &[(&str, &str)],
    stdin: &str,
) -> (i32, String, String) {
    use std::io::Write as _;
    let mut cmd = till(dir);
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .env_remove("TILL_SERVER")
        .env_remove("TILL_MASTER_KEY")
        .env_remove("TILL_MASTER_KEY_FILE")
        .env_remove("CREDENTIALS_DIRECTORY");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().unwrap();
    // A refusal may come before stdin is read (a closed pipe is fine).
    let _ = child.stdin.take().unwrap().write_all(stdin.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)], stdin: &str) -> String {
    let (code, out, err) = run(dir, args, env, stdin);
    assert_eq!(
        code, 0,
        "till {args:?} failed\nstdout:\n{out}\nstderr:\n{err}"
    );
    out
}

async fn call(url: &str, key: &str) -> reqwest::Response {
    client()
        .post(format!("{url}/up/v1/chat/completions"))
        .bearer_auth(key)
        .body(r#"{"model":"m"}"#)
        .send()
        .await
        .unwrap()
}

fn admin_url(server: &crate::binary::Server) -> String {
    server
        .banner
        .iter()
        .find_map(|l| l.strip_prefix("admin API on "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .trim_end_matches("/admin/v1")
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_minted_before_a_root_rotation_work_until_the_old_key_is_retired() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("till.toml");
    std::fs::write(&config, crate::support::up_config(&upstream)).unwrap();
    let server = serve(
        &data,
        &["--config", config.to_str().unwrap()],
        &[("UP_SECRET", SECRET)],
    );
    let old_key = mint(&data, &["--upstream", "up"]);
    assert_eq!(call(&server.url, &old_key).await.status(), 200);
    let keys =
        serde_json::from_str::<serde_json::Value>(&ok(&data, &["keys", "list", "--json"], &[], ""))
            .unwrap();
    let old_id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(keys["keys"][0]["state"], "minting");

    // Rotate while serving: the CLI finds the server (admin.json) and reloads it.
    let (code, out, err) = run(&data, &["keygen", "--rotate", "root"], &[], "");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("reloaded"), "{err}");
    let new_key = mint(&data, &["--upstream", "up"]);
    assert_eq!(
        call(&server.url, &old_key).await.status(),
        200,
        "old key after rotation"
    );
    assert_eq!(
        call(&server.url, &new_key).await.status(),
        200,
        "new key after rotation"
    );
    let list = ok(&data, &["keys", "list"], &[], "");
    assert!(
        list.contains(&old_id) && list.contains("trusted") && list.contains("minting"),
        "{list}"
    );

    // A read-only admin key cannot reload.
    let read_only = ok(&data, &["admin-key", "--read-only"], &[], "");
    let r = client()
        .post(format!("{}/admin/v1/reload", admin_url(&server)))
        .bearer_auth(read_only.trim())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);

    // Retire the old root: its keys stop (even though the proxy cached them verified).
    let (code, out, err) = run(&data, &["keys", "retire", &old_id], &[], "");
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("reloaded"), "{err}");
    let r = call(&server.url, &old_key).await;
    assert_eq!(r.status(), 401);
    assert_eq!(error_code(r).await, "key_unknown_root");
    assert_eq!(call(&server.url, &new_key).await.status(), 200);
    // The minting key cannot be retired; an unknown id is a usage error.
    let minting =
        serde_json::from_str::<serde_json::Value>(&ok(&data, &["keys", "list", "--json"], &[], ""))
            .unwrap()["keys"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["state"] == "minting")
            .unwrap()["id"]
            .as_str()
            .unwrap()
            .to_string();
    assert_eq!(run(&data, &["keys", "retire", &minting], &[], "").0, 2);
    assert_eq!(run(&data, &["keys", "retire", "12345"], &[], "").0, 2);
    // The owner can still audit the retired key's family.
    stop(server);
    let (code, out, err) = run(&data, &["audit", &old_key], &[], "");
    assert_eq!(code, 0, "{out}\n{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_audit_across_a_receipt_key_rotation_is_clean_and_shows_it() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("till.toml");
    std::fs::write(&config, crate::support::up_config(&upstream)).unwrap();
    // No admin plane: the rotation reaches the server through SIGHUP.
    let server = serve(
        &data,
        &[
            "--config",
            config.to_str().unwrap(),
            "--admin-listen",
            "none",
        ],
        &[("UP_SECRET", SECRET)],
    );
    let key = mint(&data, &["--upstream", "up", "--cap", "10"]);
    let mut receipts = Vec::new();
    for _ in 0..3 {
        let r = call(&server.url, &key).await;
        assert_eq!(r.status(), 200);
        receipts.push(r.headers()["till-receipt"].to_str().unwrap().to_string());
    }
    let old_kid = std::fs::read_to_string(data.join("receipt.pub.jwk")).unwrap();
    let (code, out, err) = run(&data, &["keygen", "--rotate", "receipt", "--json"], &[], "");
    assert_eq!(code, 0, "{out}\n{err}");
    let rotated: serde_json::Value = serde_json::from_str(&out).unwrap();
    let new_kid = rotated["new_key_id"].as_str().unwrap().to_string();
    assert!(old_kid.contains(rotated["previous_key_id"].as_str().unwrap()));
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    // The reload is asynchronous: wait (bounded) for a receipt under the new key.
    let mut rotated_at = None;
    for _ in 0..50 {
        let r = call(&server.url, &key).await;
        assert_eq!(r.status(), 200);
        let receipt = r.headers()["till-receipt"].to_str().unwrap().to_string();
        receipts.push(receipt.clone());
        let out = ok(&data, &["receipt", "verify", &receipt, "--json"], &[], "");
        if out.contains(&new_kid) {
            rotated_at = Some(receipts.len());
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let rotated_at = rotated_at.expect("no receipt signed by the new key after SIGHUP");
    assert_eq!(call(&server.url, &key).await.status(), 200);
    stop(server);
    // Old receipts still verify offline, with the old key from keys.json.
    ok(&data, &["receipt", "verify", &receipts[0]], &[], "");
    let audit: serde_json::Value =
        serde_json::from_str(&ok(&data, &["audit", &key, "--json"], &[], "")).unwrap();
    assert_eq!(audit["clean"], true, "{audit}");
    let segments = audit["receipt_keys"].as_array().unwrap();
    assert_eq!(segments.len(), 2, "{audit}");
    assert_eq!(segments[1]["kid"], new_kid.as_str());
    assert_eq!(segments[1]["from_seq"], rotated_at as u64);
    let text = ok(&data, &["audit", &key], &[], "");
    assert!(text.contains("receipt key rotation at seq"), "{text}");
    // The ledger was not mistaken for a foreign one: serve starts again on it.
    let server = serve(
        &data,
        &["--config", config.to_str().unwrap()],
        &[("UP_SECRET", SECRET)],
    );
    assert_eq!(call(&server.url, &key).await.status(), 200);
    stop(server);
    let (code, out, err) = run(&data, &["ledger", "check"], &[], "");
    assert_eq!(code, 0, "{out}\n{err}");
}

/// A loopback upstream that accepts two credentials and says which one it saw.
#[derive(Clone, Default)]
struct Checking {
    seen: Arc<Mutex<Vec<String>>>,
    refused: Arc<AtomicUsize>,
}

async fn checking(State(s): State<Checking>, headers: HeaderMap) -> (StatusCode, String) {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let which = match auth.as_str() {
        "Bearer sk-old-credential-1" => "old",
        "Bearer sk-new-credential-2" => "new",
        _ => {
            s.refused.fetch_add(1, Ordering::SeqCst);
            return (StatusCode::UNAUTHORIZED, "bad credential".into());
        }
    };
    s.seen.lock().unwrap().push(which.to_string());
    (StatusCode::OK, which.to_string())
}

fn store_config(url: &str) -> String {
    format!(
        "[upstreams.up]\nbase_url = \"{url}\"\ncredential = \"store:up-cred\"\nauth = {{ header = \"authorization\", scheme = \"Bearer\" }}\nmodel = \"body\"\n"
    )
}

fn master_key_file(dir: &std::path::Path, name: &str, byte: u8) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", hex::encode([byte; 32]))).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_credential_rotates_on_a_running_server_without_failing_a_request() {
    let state = Checking::default();
    let app = axum::Router::new()
        .fallback(checking)
        .with_state(state.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let secrets = tempfile::tempdir().unwrap();
    let master = master_key_file(secrets.path(), "master.key", 9);
    let env = [("TILL_MASTER_KEY_FILE", master.as_str())];
    ok(
        &data,
        &["credential", "set", "up-cred", "--upstream", "up"],
        &env,
        "sk-old-credential-1\n",
    );
    let config = dir.path().join("till.toml");
    std::fs::write(&config, store_config(&up)).unwrap();
    let server = serve(
        &data,
        &["--config", config.to_str().unwrap(), "--log-format", "json"],
        &[
            ("TILL_MASTER_KEY_FILE", master.as_str()),
            ("TILL_LOG", "trace"),
        ],
    );
    let key = mint(&data, &["--upstream", "up"]);
    let first = call(&server.url, &key).await;
    assert_eq!(first.status(), 200);
    assert_eq!(first.text().await.unwrap(), "old");

    // Requests flow from 4 clients while the credential is rotated.
    let stop_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut flows = Vec::new();
    for _ in 0..4 {
        let (url, key, stop_flag) = (server.url.clone(), key.clone(), Arc::clone(&stop_flag));
        flows.push(tokio::spawn(async move {
            let mut statuses = Vec::new();
            while !stop_flag.load(Ordering::SeqCst) {
                let r = call(&url, &key).await;
                statuses.push(r.status().as_u16());
                let _ = r.bytes().await;
            }
            statuses
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let data2 = data.clone();
    let master2 = master.clone();
    let (code, out, err) = tokio::task::spawn_blocking(move || {
        run(
            &data2,
            &["credential", "rotate", "up-cred"],
            &[("TILL_MASTER_KEY_FILE", master2.as_str())],
            "sk-new-credential-2\n",
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "{out}\n{err}");
    assert!(err.contains("reloaded"), "{err}");
    // Every request sent after the rotation returned uses the new credential.
    for _ in 0..10 {
        let r = call(&server.url, &key).await;
        assert_eq!(r.status(), 200);
        assert_eq!(r.text().await.unwrap(), "new");
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop_flag.store(true, Ordering::SeqCst);
    let mut total = 0;
    for f in flows {
        let statuses = f.await.unwrap();
        total += statuses.len();
        assert!(
            statuses.iter().all(|s| *s == 200),
            "a request failed: {statuses:?}"
        );
    }
    assert!(
        total > 20,
        "too few requests flowed during the rotation: {total}"
    );
    assert_eq!(state.refused.load(Ordering::SeqCst), 0);
    let seen = state.seen.lock().unwrap().clone();
    assert!(seen.contains(&"old".to_string()) && seen.contains(&"new".to_string()));

    // No credential value in logs, --check-config, `credential list`, or the data dir.
    let check = ok(
        &data,
        &[
            "serve",
            "--check-config",
            "--config",
            config.to_str().unwrap(),
        ],
        &env,
        "",
    );
    assert!(check.contains("credential from store up-cred"), "{check}");
    let list = ok(&data, &["credential", "list"], &env, "");
    assert!(list.contains("up-cred") && list.contains("fp-"), "{list}");
    let list_json = ok(&data, &["credential", "list", "--json"], &env, "");
    let stderr = server.stderr.clone();
    stop(server);
    let logs = std::fs::read_to_string(&stderr).unwrap();
    for value in [
        "sk-old-credential-1",
        "sk-new-credential-2",
        "old-credential",
        "new-credential",
    ] {
        assert!(!logs.contains(value), "{value} in the logs");
        assert!(!check.contains(value) && !list.contains(value) && !list_json.contains(value));
        for entry in walk(&data) {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !bytes.windows(value.len()).any(|w| w == value.as_bytes()),
                "{value} in plain text in {}",
                entry.display()
            );
        }
    }
    // Values are never taken as arguments.
    let (code, _, _) = run(&data, &["credential", "set", "x", "sk-arg"], &env, "");
    assert_eq!(code, 2);
}

#[test]
fn a_wrong_master_key_or_a_tampered_store_is_a_startup_error_naming_the_record() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let secrets = tempfile::tempdir().unwrap();
    let right = master_key_file(secrets.path(), "right.key", 1);
    let wrong = master_key_file(secrets.path(), "wrong.key", 2);
    let env = [("TILL_MASTER_KEY_FILE", right.as_str())];
    ok(
        &data,
        &["credential", "set", "up-cred", "--upstream", "up"],
        &env,
        "sk-one\n",
    );
    ok(&data, &["credential", "set", "other"], &env, "sk-two\n");
    let config = dir.path().join("till.toml");
    std::fs::write(&config, store_config("http://127.0.0.1:9")).unwrap();
    let check = |env: &[(&str, &str)]| {
        run(
            &data,
            &[
                "serve",
                "--check-config",
                "--config",
                config.to_str().unwrap(),
            ],
            env,
            "",
        )
    };
    let (code, out, _) = check(&env);
    assert_eq!(code, 0, "{out}");
    // Another master key: exit 2, naming the record.
    let (code, _, err) = check(&[("TILL_MASTER_KEY_FILE", wrong.as_str())]);
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("up-cred") && err.contains("wrong master key"),
        "{err}"
    );
    // No master key at all.
    let (code, _, err) = check(&[]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("TILL_MASTER_KEY_FILE"), "{err}");
    // A master key file inside the data dir is refused.
    std::fs::copy(&right, data.join("master.key")).unwrap();
    let beside = data.join("master.key").display().to_string();
    let (code, _, err) = check(&[("TILL_MASTER_KEY_FILE", beside.as_str())]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("inside the data dir"), "{err}");
    // Swap the two sealed records: detected, naming the record.
    let path = data.join("credentials.json");
    let mut store: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let records = store["records"].as_array_mut().unwrap();
    let (a, b) = (records[0].clone(), records[1].clone());
    for field in ["nonce", "sealed"] {
        records[0][field] = b[field].clone();
        records[1][field] = a[field].clone();
    }
    std::fs::write(&path, store.to_string()).unwrap();
    let (code, _, err) = check(&env);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("up-cred") && err.contains("tampered"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_trusts_root_keys_the_owner_distributes_in_till_toml() {
    let upstream = Upstream::start().await;
    let owner = tempfile::tempdir().unwrap();
    ok(owner.path(), &["keygen"], &[], "");
    let key = mint(owner.path(), &["--upstream", "up"]);
    let proxy = tempfile::tempdir().unwrap();
    let data = proxy.path().join("data");
    // One key as a JWK file relative to till.toml, the same key again as hex.
    std::fs::copy(
        owner.path().join("root.pub.jwk"),
        proxy.path().join("owner.pub.jwk"),
    )
    .unwrap();
    let hex_key = serde_json::from_str::<serde_json::Value>(&ok(
        owner.path(),
        &["keygen", "--json"],
        &[],
        "",
    ))
    .unwrap()["root_public_key"]
        .as_str()
        .unwrap()
        .to_string();
    let config = proxy.path().join("till.toml");
    std::fs::write(
        &config,
        format!(
            "trusted_root_keys = [\"owner.pub.jwk\", \"{hex_key}\"]\n{}",
            crate::support::up_config(&upstream)
        ),
    )
    .unwrap();
    let check = ok(
        &data,
        &[
            "serve",
            "--check-config",
            "--config",
            config.to_str().unwrap(),
        ],
        &[("UP_SECRET", SECRET)],
        "",
    );
    assert!(check.contains("trusted root keys (till.toml)"), "{check}");
    let server = serve(
        &data,
        &["--config", config.to_str().unwrap()],
        &[("UP_SECRET", SECRET)],
    );
    assert_eq!(call(&server.url, &key).await.status(), 200);
    // The owner takes the entry out again; SIGHUP re-reads trusted_root_keys.
    std::fs::write(&config, crate::support::up_config(&upstream)).unwrap();
    let pid = server.child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap()
        .success());
    let mut code = String::new();
    for _ in 0..50 {
        let r = call(&server.url, &key).await;
        if r.status() == 401 {
            code = error_code(r).await;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(code, "key_unknown_root");
    stop(server);
}

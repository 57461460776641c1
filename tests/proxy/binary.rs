//! The real `till serve` binary: first run, banner, the cap under concurrency, shutdown.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{client, error_code, Upstream, SECRET};

pub(crate) struct Server {
    pub(crate) child: Child,
    pub(crate) stderr: std::path::PathBuf,
    pub(crate) url: String,
    pub(crate) banner: Vec<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(crate) fn till(dir: &std::path::Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_till"));
    c.arg("--dir").arg(dir);
    c
}

/// `till --dir DIR audit KEY --json`, which must succeed and find the chain clean;
/// answers the JSON report for the caller's own checks.
pub(crate) fn audit_clean(dir: &std::path::Path, key: &str) -> serde_json::Value {
    let out = till(dir).args(["audit", key, "--json"]).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "till audit failed: {stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let audit: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(audit["clean"], true, "{audit}");
    audit
}

/// Starts `till serve` and reads its banner up to the mint hint (bounded to 30 s).
pub(crate) fn serve(dir: &std::path::Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
    let mut cmd = till(dir);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]).args(extra);
    // Tests run in parallel: each server's admin plane takes a free port too.
    cmd.env("TILL_ADMIN_LISTEN", "127.0.0.1:0");
    for (k, v) in env {
        cmd.env(k, v);
    }
    for var in [
        "OPENAI_API_KEY",
        "ANTHROPIC_API_KEY",
        "GEMINI_API_KEY",
        "GITHUB_TOKEN",
        "STRIPE_API_KEY",
        "TILL_CONFIG",
    ] {
        if !env.iter().any(|(k, _)| *k == var) {
            cmd.env_remove(var);
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    let stderr = dir.join("serve.stderr.log");
    let log = std::fs::File::create(&stderr).unwrap();
    let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn().unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            if tx.send(line.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut banner = Vec::new();
    let mut url = None;
    while Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        if let Some(u) = line.strip_prefix("listening on ") {
            url = Some(u.trim().to_string());
        }
        let done = line.starts_with("mint a first key") || line.starts_with("no upstream enabled");
        banner.push(line);
        if done && url.is_some() {
            break;
        }
    }
    let url = url.unwrap_or_else(|| panic!("no listening line; banner: {banner:?}"));
    Server {
        child,
        stderr,
        url,
        banner,
    }
}

pub(crate) fn mint(dir: &std::path::Path, args: &[&str]) -> String {
    let out = till(dir).arg("mint").args(args).output().unwrap();
    assert!(
        out.status.success(),
        "mint failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

pub(crate) fn stop(mut server: Server) {
    let pid = server.child.id().to_string();
    let _ = Command::new("kill").args(["-TERM", &pid]).status();
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = server.child.try_wait() {
            let log = std::fs::read_to_string(&server.stderr).unwrap_or_default();
            assert!(
                status.success(),
                "till serve exited with {status}; stderr:\n{log}"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("till serve did not stop on SIGTERM");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn till_serve_enforces_a_cap_of_5_under_50_concurrent_requests() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("till.toml");
    std::fs::write(
        &config,
        format!(
            "proxy_id = \"bin-test\"\n[upstreams.up]\nbase_url = \"{}\"\ncredential_env = \"UP_SECRET\"\nauth = {{ header = \"authorization\", scheme = \"Bearer\" }}\n",
            upstream.url()
        ),
    )
    .unwrap();
    let server = serve(
        &data,
        &["--config", config.to_str().unwrap()],
        &[("UP_SECRET", SECRET)],
    );
    let banner = server.banner.join("\n");
    assert!(banner.contains("till data dir:"), "{banner}");
    assert!(banner.contains("upstream up:"), "{banner}");
    assert!(banner.contains("till --dir"), "{banner}");
    assert!(
        banner.contains("mint --upstream up --cap 100 --ttl 24h"),
        "{banner}"
    );
    assert!(
        !banner.contains(SECRET),
        "the credential must never be printed"
    );
    assert!(data.join("root.key.jwk").exists() && data.join("ledger.redb").exists());

    let key = mint(&data, &["--upstream", "up", "--cap", "5"]);
    let http = client();
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (http, url, key) = (
            http.clone(),
            format!("{}/up/v1/chat/completions", server.url),
            key.clone(),
        );
        tasks.push(tokio::spawn(async move {
            let r = http
                .post(url)
                .bearer_auth(key)
                .body(r#"{"model":"m"}"#)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let code = if status == 200 {
                "ok".to_string()
            } else {
                error_code(r).await
            };
            (status, code)
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, code) = tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .unwrap()
            .unwrap();
        match (status, code.as_str()) {
            (200, _) => ok += 1,
            (403, "activation_limit_reached") => refused += 1,
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!((ok, refused), (5, 45));
    assert_eq!(upstream.hits(), 5);
    let r = http
        .get(format!("{}/_till/ready", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    stop(server);

    // After shutdown the ledger file is free again: the count is durable.
    let ring = till_token::KeyRing::with(
        till_token::RootPublicKey::from_jwk(
            &std::fs::read_to_string(data.join("root.pub.jwk")).unwrap(),
        )
        .unwrap(),
    );
    let signer = std::sync::Arc::new(
        till_receipt::ReceiptSigner::from_private_jwk(
            &std::fs::read_to_string(data.join("receipt.key.jwk")).unwrap(),
        )
        .unwrap(),
    );
    let ledger = till_ledger::EmbeddedLedger::open(
        data.join("ledger.redb"),
        till_ledger::EmbeddedConfig::new(signer, "check"),
    )
    .unwrap();
    assert_eq!(
        crate::support::usage_of(&ledger, &ring, &key).await,
        vec![5]
    );
    drop(ledger);

    // Acceptance: `till audit` on that family is clean (5 receipts, gapless chain).
    let audit = audit_clean(&data, &key);
    assert_eq!(audit["report"]["receipts"], 5, "{audit}");
}

#[tokio::test]
async fn till_serve_with_no_upstream_still_starts_and_says_how_to_enable_one() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[], &[]);
    let banner = server.banner.join("\n");
    assert!(banner.contains("no upstream enabled"), "{banner}");
    assert!(banner.contains("OPENAI_API_KEY"), "{banner}");
    let r = client()
        .get(format!("{}/_till/health", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    stop(server);
}

#[tokio::test]
async fn till_serve_enables_presets_from_the_environment() {
    let dir = tempfile::tempdir().unwrap();
    let server = serve(dir.path(), &[], &[("OPENAI_API_KEY", "sk-test-env")]);
    let banner = server.banner.join("\n");
    assert!(
        banner.contains("upstream openai: https://api.openai.com"),
        "{banner}"
    );
    assert!(banner.contains("mint --upstream openai"), "{banner}");
    assert!(!banner.contains("sk-test-env"));
    stop(server);
}

#[test]
fn check_config_exits_0_or_2() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[upstreams.openai]\ncredential_env = \"MY_OPENAI\"\n",
    )
    .unwrap();
    let out = till(dir.path())
        .args([
            "serve",
            "--check-config",
            "--config",
            good.to_str().unwrap(),
        ])
        .env("MY_OPENAI", "sk-x")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("config OK") && stdout.contains("upstream openai"),
        "{stdout}"
    );
    assert!(!stdout.contains("sk-x"));
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[limits]\nmax_body = 5\n").unwrap();
    let out = till(dir.path())
        .args(["serve", "--check-config", "--config", bad.to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("max_body"), "{stderr}");
    // An explicitly configured upstream whose secret is missing is a config error.
    let out = till(dir.path())
        .args([
            "serve",
            "--check-config",
            "--config",
            good.to_str().unwrap(),
        ])
        .env_remove("MY_OPENAI")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MY_OPENAI"));
    // Checking a config creates nothing.
    assert!(!dir.path().join("root.key.jwk").exists());
}

/// TEST-MATRIX row 21: at trace level, neither the logs nor anything in the data dir
/// (keys, ledger file) contains the real credential or a full Till key — including keys
/// that were refused, replayed or malformed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_or_the_data_dir() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("till.toml");
    std::fs::write(&config, crate::support::up_config(&upstream)).unwrap();
    let server = serve(
        &data,
        &["--config", config.to_str().unwrap(), "--log-format", "json"],
        &[("UP_SECRET", SECRET), ("TILL_LOG", "trace")],
    );
    let key = mint(&data, &["--upstream", "up", "--cap", "2"]);
    let http = client();
    let url = format!("{}/up/v1/chat/completions", server.url);
    let mut statuses = Vec::new();
    for i in 0..3 {
        let r = http
            .post(&url)
            .bearer_auth(&key)
            .header("idempotency-key", format!("k{}", i % 2))
            .body(r#"{"model":"m"}"#)
            .send()
            .await
            .unwrap();
        statuses.push(r.status().as_u16());
        let _ = r.bytes().await;
    }
    // A tampered key and a key in the query string, too.
    let tampered = {
        let mut bytes = key.clone().into_bytes();
        let mid = bytes.len() / 2;
        bytes[mid] = if bytes[mid] == b'A' { b'B' } else { b'A' };
        String::from_utf8(bytes).unwrap()
    };
    assert_ne!(tampered, key);
    let r = http.post(&url).bearer_auth(&tampered).send().await.unwrap();
    statuses.push(r.status().as_u16());
    let r = http
        .get(format!("{}/up/v1/models?key={}", server.url, key))
        .send()
        .await
        .unwrap();
    statuses.push(r.status().as_u16());
    assert_eq!(statuses[..2], [200, 200], "{statuses:?}");
    assert_eq!(statuses[3], 401, "{statuses:?}");
    let stderr = server.stderr.clone();
    stop(server);

    let logs = std::fs::read_to_string(&stderr).unwrap();
    assert!(logs.len() > 200, "expected trace output, got:\n{logs}");
    // The key body minus a few characters: catches partial echoes too.
    let key_core = &key[8..key.len() - 8];
    let tampered_core = &tampered[8..tampered.len() - 8];
    for (what, needle) in [
        ("credential", SECRET),
        ("key", key_core),
        ("tampered key", tampered_core),
    ] {
        assert!(!logs.contains(needle), "{what} found in trace logs");
        for entry in walk(&data) {
            let bytes = std::fs::read(&entry).unwrap();
            assert!(
                !bytes.windows(needle.len()).any(|w| w == needle.as_bytes()),
                "{what} found in {}",
                entry.display()
            );
        }
    }
}

pub(crate) fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else if !p.ends_with("serve.stderr.log") {
            out.push(p);
        }
    }
    out
}

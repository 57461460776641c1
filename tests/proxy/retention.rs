//! `[retention]` in the real `till serve`: receipts are exported and pruned in the
//! background while it serves, and `till audit` proves the whole chain afterwards.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::binary::{audit_clean, mint, serve, stop, till};
use crate::support::{client, metrics_text, up_config, Upstream, SECRET};

/// Exported receipt lines and checkpoint lines in the export dir (every family).
fn exported(dir: &Path) -> (usize, usize) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return (0, 0);
    };
    let (mut receipts, mut checkpoints) = (0, 0);
    for entry in entries {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().to_string();
        let lines = std::fs::read_to_string(&path)
            .unwrap_or_default()
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count();
        if name.ends_with(".checkpoints.jsonl") {
            checkpoints += lines;
        } else if name.ends_with(".jsonl") {
            receipts += lines;
        }
    }
    (receipts, checkpoints)
}

/// Waits (bounded) until `exported(dir).0 == want`.
fn wait_exported(dir: &Path, want: usize, stderr: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if exported(dir).0 == want {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "expected {want} exported receipts in {}, found {:?}; serve stderr:\n{}",
        dir.display(),
        exported(dir),
        std::fs::read_to_string(stderr).unwrap_or_default()
    );
}

async fn call(url: &str, key: &str) {
    let r = client()
        .post(format!("{url}/up/v1/chat/completions"))
        .bearer_auth(key)
        .body(r#"{"model":"m"}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn serve_exports_and_prunes_in_the_background_and_audit_stays_clean() {
    let upstream = Upstream::start().await;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let config = dir.path().join("till.toml");
    std::fs::write(
        &config,
        format!(
            "{}[retention]\nkeep = 2\ninterval = \"1s\"\n",
            up_config(&upstream)
        ),
    )
    .unwrap();
    let server = serve(
        &data,
        &["--config", config.to_str().unwrap()],
        &[("UP_SECRET", SECRET)],
    );
    let banner = server.banner.join("\n");
    let exports = data.join("receipts");
    assert!(
        banner.contains(&format!(
            "retention: keep 2 per family, exported to {} every 1s",
            exports.display()
        )),
        "{banner}"
    );
    let key = mint(&data, &["--upstream", "up", "--cap", "20"]);
    for _ in 0..6 {
        call(&server.url, &key).await;
    }
    wait_exported(&exports, 4, &server.stderr);
    // Still serving, and still charging: the next claim is seq 7.
    call(&server.url, &key).await;
    wait_exported(&exports, 5, &server.stderr);
    let metrics = metrics_text(&server.url).await;
    assert!(
        metrics.contains("till_retention_pruned_receipts_total 5"),
        "{metrics}"
    );
    assert!(
        metrics.contains("till_retention_failures_total 0"),
        "{metrics}"
    );
    let (_, checkpoints) = exported(&exports);
    assert!(checkpoints >= 2, "one checkpoint per pruned range");

    // While it serves, `till audit` goes through the admin API (receipts and checkpoints)
    // and reads the exported receipts from the data dir: all 7, clean.
    let audit = audit_clean(&data, &key);
    assert_eq!(audit["report"]["receipts"], 7, "{audit}");
    // The admin plane's own audit (the dashboard's) reads them back too.
    let admin = server
        .banner
        .iter()
        .find_map(|l| l.strip_prefix("admin API on "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap()
        .to_string();
    let admin_key = std::fs::read_to_string(data.join("admin.key")).unwrap();
    let listed = till(&data)
        .args(["receipt", "list", &key, "--json"])
        .output()
        .unwrap();
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let first: serde_json::Value = serde_json::from_str(
        String::from_utf8_lossy(&listed.stdout)
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let family = first["body"]["family"].as_str().unwrap().to_string();
    let body = client()
        .get(format!("{admin}/families/{family}/audit"))
        .bearer_auth(admin_key.trim())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let audit: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(audit["clean"], true, "{audit}");
    assert_eq!(audit["report"]["receipts"], 7, "{audit}");
    stop(server);

    // The ledger keeps the newest 2; the export holds 1..=5 once each.
    let out = till(&data)
        .args(["receipt", "list", &key, "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seqs: Vec<u64> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, vec![6, 7]);

    // `till audit` (default --exported: the data dir's receipts/) proves all 7.
    let audit = audit_clean(&data, &key);
    assert_eq!(audit["report"]["receipts"], 7, "{audit}");
    assert_eq!(upstream.hits(), 7);

    // By hand, with the server stopped: `till receipts export` continues the same files.
    let out = till(&data)
        .args(["receipts", "export", "--keep", "1", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (report["exported"].as_u64(), report["pruned"].as_u64()),
        (Some(1), Some(1)),
        "{report}"
    );
    assert_eq!(exported(&exports).0, 6);
    let audit = audit_clean(&data, &key);
    assert_eq!(audit["report"]["receipts"], 7, "{audit}");
}

#[test]
fn nonsense_retention_config_exits_2_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    // `till serve --check-config` with `toml` as the config file.
    let check = |toml: &str| {
        let config = dir.path().join("till.toml");
        std::fs::write(&config, toml).unwrap();
        till(&dir.path().join("data"))
            .args([
                "serve",
                "--check-config",
                "--config",
                config.to_str().unwrap(),
            ])
            .output()
            .unwrap()
    };
    for (toml, key) in [
        ("[retention]\ninterval = \"1m\"\n", "retention"),
        ("[retention]\nkeep = 0\n", "retention.keep"),
        (
            "[retention]\nkeep = 3\nmax_age = \"a while\"\n",
            "retention.max_age",
        ),
        ("[retention]\nkeep = 3\nbogus = 1\n", "bogus"),
    ] {
        let out = check(toml);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{toml}: {stderr}");
        assert!(stderr.contains(key), "{toml}: {stderr}");
    }
    let out = check("[retention]\nmax_age = \"30d\"\n");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("retention: max age 30days"), "{stdout}");
}

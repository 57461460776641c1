//! keygen, mint, attenuate, inspect (issue #2 acceptance).

use crate::fixture::Till;

#[test]
fn keygen_creates_private_files_and_is_idempotent() {
    let t = Till::new();
    let first = t.run(&["keygen", "--json"]).json();
    assert_eq!(first["created"], true);
    for f in ["root.key.jwk", "receipt.key.jwk"] {
        let meta = std::fs::metadata(t.data_dir().join(f)).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{f}");
        }
        let _ = meta;
    }
    let again = t.run(&["keygen", "--json"]).json();
    assert_eq!(again["created"], false);
    assert_eq!(
        again["root_key_id"], first["root_key_id"],
        "keygen must never overwrite keys"
    );
    // Public output never carries private material.
    let text = t.run(&["keygen"]).ok();
    let private = std::fs::read_to_string(t.data_dir().join("root.key.jwk")).unwrap();
    let d: serde_json::Value = serde_json::from_str(&private).unwrap();
    assert!(!text.contains(d["d"].as_str().unwrap()));
}

#[test]
fn acceptance_mint_attenuate_inspect() {
    let t = Till::new();
    let token = t.minted(&[
        "--upstream",
        "openai",
        "--cap",
        "3",
        "--path",
        "/v1/chat",
        "--model",
        "gpt-4o-mini",
    ]);
    assert!(token.starts_with("till_"), "{token}");
    assert_eq!(token.lines().count(), 1, "mint prints only the key");
    let child = t
        .run(&["attenuate", &token, "--cap", "2", "--method", "POST"])
        .ok();
    let j = t.run(&["inspect", &child, "--json"]).json();
    let blocks = j["blocks"].as_array().unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0]["caveats"]["cap"], 3);
    assert_eq!(blocks[0]["caveats"]["upstream"], "openai");
    assert_eq!(
        blocks[0]["caveats"]["paths"],
        serde_json::json!(["/v1/chat"])
    );
    assert_eq!(
        blocks[0]["caveats"]["models"],
        serde_json::json!(["gpt-4o-mini"])
    );
    assert_eq!(blocks[1]["caveats"]["cap"], 2);
    assert_eq!(blocks[1]["caveats"]["methods"], serde_json::json!(["POST"]));
    assert_ne!(blocks[0]["revocation_id"], blocks[1]["revocation_id"]);
    assert_eq!(j["effective"]["cap"], 2);
    assert_eq!(j["effective"]["methods"], serde_json::json!(["POST"]));
    assert_eq!(j["effective"]["paths"], serde_json::json!(["/v1/chat"]));
    assert_eq!(j["signature"]["status"], "verified");
    assert!(j["root_key_id"].as_u64().is_some());

    // Flip one character anywhere in the body: inspect must fail with exit 3 and a message.
    let body_start = "till_".len();
    for pos in [
        body_start + 3,
        child.len() / 3,
        child.len() / 2,
        child.len() - 5,
    ] {
        let mut bytes = child.clone().into_bytes();
        bytes[pos] = if bytes[pos] == b'A' { b'B' } else { b'A' };
        let tampered = String::from_utf8(bytes).unwrap();
        let err = t.run(&["inspect", &tampered]).fails_with(3);
        assert!(err.contains("till: error:"), "{err}");
        assert!(
            !err.contains(&tampered),
            "error output must not echo the key"
        );
    }
}

#[test]
fn stdin_dash_and_warnings() {
    let t = Till::new();
    let token = t.minted(&["--upstream", "openai", "--cap", "2"]);
    let run = t.run_stdin(&["attenuate", "-", "--cap", "5"], Some(&token));
    let child = run.ok();
    assert!(
        run.stderr().contains("effective cap stays 2"),
        "{}",
        run.stderr()
    );
    let j = t
        .run_stdin(&["inspect", "-", "--json"], Some(&child))
        .json();
    assert_eq!(j["effective"]["cap"], 2);
    assert_eq!(j["blocks"][1]["caveats"]["cap"], 5);
}

#[test]
fn usage_errors_exit_2() {
    let t = Till::new();
    t.run(&["keygen"]).ok();
    let err = t.run(&["mint", "--upstream", "OpenAI!"]).fails_with(2);
    assert!(err.contains("--upstream"), "{err}");
    let err = t
        .run(&["mint", "--upstream", "openai", "--path", "no-slash"])
        .fails_with(2);
    assert!(err.contains("must start with /"), "{err}");
    let err = t
        .run(&["mint", "--upstream", "openai", "--expires", "tomorrow"])
        .fails_with(2);
    assert!(err.contains("RFC 3339"), "{err}");
    t.run(&["mint"]).fails_with(2);
    let token = t.run(&["mint", "--upstream", "openai"]).ok();
    let err = t
        .run(&["attenuate", &token, "--upstream", "anthropic"])
        .fails_with(2);
    assert!(err.contains("openai"), "{err}");
    let err = t.run(&["attenuate", &token]).fails_with(2);
    assert!(err.contains("must restrict"), "{err}");
}

#[test]
fn mint_without_keys_says_how_to_fix() {
    let t = Till::new();
    let err = t.run(&["mint", "--upstream", "openai"]).fails_with(1);
    assert!(err.contains("till keygen"), "{err}");
}

#[test]
fn inspect_with_other_root_key_fails_and_without_key_is_unchecked() {
    let a = Till::new();
    let b = Till::new();
    let token = a.minted(&["--upstream", "github", "--ttl", "1h"]);
    b.run(&["keygen"]).ok();
    let err = b.run(&["inspect", &token]).fails_with(3);
    assert!(err.contains("not trusted"), "{err}");
    let pubkey = a.data_dir().join("root.pub.jwk");
    let j = b
        .run(&[
            "inspect",
            &token,
            "--json",
            "--public-key",
            pubkey.to_str().unwrap(),
        ])
        .json();
    assert_eq!(j["signature"]["status"], "verified");
    assert!(j["effective"]["expires"].as_i64().unwrap() > 0);
    // A fresh machine without any keys can still read a key it was handed.
    let c = Till::new();
    let j = c.run(&["inspect", &token, "--json"]);
    // TILL_DATA_DIR is set for the fixture, so the (missing) public key is an error...
    assert_eq!(j.code(), 1, "{}", j.stderr());
    // ...while an explicit public key works.
    let j = c
        .run(&[
            "inspect",
            &token,
            "--json",
            "--public-key",
            pubkey.to_str().unwrap(),
        ])
        .json();
    assert_eq!(j["signature"]["status"], "verified");
}

/// Runs `till` expecting exit 1 within 20 s (a `serve` that wrongly starts is killed and
/// fails the test); returns stderr.
fn serve_bounded(t: &Till, args: &[&str]) -> String {
    use std::process::Stdio;
    let mut child = t
        .cmd()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            child.kill().unwrap();
            panic!("till {args:?} kept running");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "till {args:?}: {err}");
    err
}

/// Issue 10 item 9: a deleted private key is never silently re-created, by `keygen` or by
/// `serve`; the public halves stay as they were.
#[test]
fn deleted_private_key_is_never_recreated() {
    for (private, public) in [
        ("root.key.jwk", "root.pub.jwk"),
        ("receipt.key.jwk", "receipt.pub.jwk"),
    ] {
        let t = Till::new();
        t.run(&["keygen"]).ok();
        let before = std::fs::read_to_string(t.data_dir().join(public)).unwrap();
        std::fs::remove_file(t.data_dir().join(private)).unwrap();
        for args in [&["keygen"][..], &["serve", "--listen", "127.0.0.1:0"][..]] {
            let err = serve_bounded(&t, args);
            assert!(err.contains(private), "{args:?}: {err}");
            assert!(
                err.contains("refusing to create a new key"),
                "{args:?}: {err}"
            );
            assert!(!t.data_dir().join(private).exists(), "{args:?}");
            let after = std::fs::read_to_string(t.data_dir().join(public)).unwrap();
            assert_eq!(before, after, "{args:?}: {public} must not change");
        }
    }
    // The ledger alone is state too.
    let t = Till::new();
    std::fs::create_dir_all(t.data_dir()).unwrap();
    std::fs::write(t.data_dir().join("ledger.redb"), b"x").unwrap();
    let err = t.run(&["keygen"]).fails_with(1);
    assert!(err.contains("ledger.redb"), "{err}");
    // A lost public half is re-derived from its private key (no new key).
    let t = Till::new();
    let first = t.run(&["keygen", "--json"]).json();
    std::fs::remove_file(t.data_dir().join("root.pub.jwk")).unwrap();
    let again = t.run(&["keygen", "--json"]).json();
    assert_eq!(again["root_public_key"], first["root_public_key"]);
}

/// Issue 10 item 9: a private key readable by group or others is refused, like ssh.
#[cfg(unix)]
#[test]
fn group_readable_private_key_is_refused() {
    use std::os::unix::fs::PermissionsExt as _;
    let t = Till::new();
    t.run(&["keygen"]).ok();
    let path = t.data_dir().join("root.key.jwk");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o640)).unwrap();
    let err = t
        .run(&["mint", "--upstream", "openai", "--cap", "1"])
        .fails_with(1);
    assert!(err.contains("root.key.jwk"), "{err}");
    assert!(err.contains("chmod 600"), "{err}");
    let err = serve_bounded(&t, &["serve", "--listen", "127.0.0.1:0"]);
    assert!(err.contains("chmod 600"), "{err}");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    t.run(&["mint", "--upstream", "openai", "--cap", "1"]).ok();
}

/// Issue 10 (minor): minting a key that is already expired needs `--force`.
#[test]
fn minting_an_expired_key_needs_force() {
    let t = Till::new();
    t.run(&["keygen"]).ok();
    let past = [
        "mint",
        "--upstream",
        "openai",
        "--expires",
        "2001-01-01T00:00:00Z",
    ];
    let err = t.run(&past).fails_with(2);
    assert!(err.contains("in the past"), "{err}");
    assert!(err.contains("--force"), "{err}");
    let mut forced = past.to_vec();
    forced.push("--force");
    let run = t.run(&forced);
    assert!(run.ok().starts_with("till_"));
    assert!(run.stderr().contains("expired"));
    t.run(&[
        "mint",
        "--upstream",
        "openai",
        "--expires",
        "2999-01-01T00:00:00Z",
    ])
    .ok();
}

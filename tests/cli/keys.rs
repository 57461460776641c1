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

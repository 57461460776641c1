//! Key lifecycle without a server: the key registry, the ledger binding across a receipt
//! key rotation, and the credential store commands (issue 12).

use crate::fixture::Till;

#[test]
fn a_receipt_key_rotation_keeps_the_ledger_bound_even_without_ledger_id() {
    let t = Till::new();
    let key = t.minted(&["--upstream", "openai", "--cap", "10"]);
    // `till usage` opens (creates and binds) the embedded ledger and records ledger.id.
    t.run(&["usage", &key]).ok();
    let id = std::fs::read_to_string(t.data_dir().join("ledger.id")).unwrap();
    let rotated = t.run(&["keygen", "--rotate", "receipt", "--json"]).json();
    let new_kid = rotated["new_key_id"].as_str().unwrap().to_string();
    assert!(id
        .trim()
        .ends_with(rotated["previous_key_id"].as_str().unwrap()));
    t.run(&["usage", &key]).ok();
    // Without ledger.id (an old data dir, or lost), the ledger bound to the data dir's
    // first receipt key is still its own, not a foreign one.
    std::fs::remove_file(t.data_dir().join("ledger.id")).unwrap();
    t.run(&["usage", &key]).ok();
    assert_eq!(
        std::fs::read_to_string(t.data_dir().join("ledger.id")).unwrap(),
        id
    );
    t.run(&["ledger", "check"]).ok();
    let keys = t.run(&["keys", "list", "--json"]).json();
    let receipt_keys: Vec<_> = keys["keys"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|k| k["role"] == "receipt")
        .collect();
    assert_eq!(receipt_keys.len(), 2);
    assert_eq!(receipt_keys[0]["state"], "verifying");
    assert_eq!(receipt_keys[1]["state"], "signing");
    assert_eq!(receipt_keys[1]["id"], new_kid.as_str());
    assert_eq!(receipt_keys[1]["public_jwk"]["kid"], new_kid.as_str());
    // Receipt keys are never retired (their receipts must keep verifying).
    let old = receipt_keys[0]["id"].as_str().unwrap().to_string();
    let err = t.run(&["keys", "retire", &old]).fails_with(2);
    assert!(err.contains("never retired"), "{err}");
    // keys.json holds public keys only.
    let registry = std::fs::read_to_string(t.data_dir().join("keys.json")).unwrap();
    assert!(!registry.contains("\"d\""), "{registry}");
}

#[test]
fn rotating_needs_an_existing_data_dir_and_keeps_only_public_halves() {
    let t = Till::new();
    let err = t.run(&["keygen", "--rotate", "root"]).fails_with(1);
    assert!(err.contains("till keygen"), "{err}");
    assert!(!t.data_dir().join("root.key.jwk").exists());
    t.run(&["keygen"]).ok();
    let old_private = std::fs::read_to_string(t.data_dir().join("root.key.jwk")).unwrap();
    let old_d = serde_json::from_str::<serde_json::Value>(&old_private).unwrap()["d"]
        .as_str()
        .unwrap()
        .to_string();
    t.run(&["keygen", "--rotate", "root"]).ok();
    // The old private key is gone from the data dir.
    for entry in std::fs::read_dir(t.data_dir()).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read(&path).unwrap();
        assert!(
            !text.windows(old_d.len()).any(|w| w == old_d.as_bytes()),
            "old private key in {}",
            path.display()
        );
    }
    // A key the old root minted is still accepted offline (trusted), inspect says so.
    let list = t.run(&["keys", "list"]).ok();
    assert_eq!(list.matches("root").count(), 2, "{list}");
}

#[test]
fn credential_commands_never_show_a_value() {
    let t = Till::new();
    let secrets = tempfile::tempdir().unwrap();
    let master = t.run(&["credential", "master-key"]).ok();
    assert_eq!(master.len(), 64);
    let file = secrets.path().join("master.key");
    std::fs::write(&file, &master).unwrap();
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    let spawn = |args: &[&str], stdin: Option<&str>, with_key: bool| {
        let mut c = t.cmd();
        if with_key {
            c.env("TILL_MASTER_KEY_FILE", &file);
        }
        let mut child = c
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(s) = stdin {
            use std::io::Write as _;
            // A refusal may come before the value is read (a closed pipe is fine).
            let _ = child.stdin.take().unwrap().write_all(s.as_bytes());
        }
        drop(child.stdin.take());
        child.wait_with_output().unwrap()
    };
    let run = |args: &[&str], stdin: Option<&str>| spawn(args, stdin, true);
    // No master key: a usage error that says where one comes from.
    let out = spawn(
        &["credential", "set", "openai"],
        Some("sk-secret-value-1\n"),
        false,
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("TILL_MASTER_KEY_FILE"));
    // A master key file others may read is refused.
    let out = run(
        &["credential", "set", "openai"],
        Some("sk-secret-value-1\n"),
    );
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chmod 600"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    let out = run(
        &["credential", "set", "openai"],
        Some("sk-secret-value-1\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A second set of the same name is refused (rotate replaces).
    assert_eq!(
        run(&["credential", "set", "openai"], Some("sk-x\n"))
            .status
            .code(),
        Some(2)
    );
    // A value of two lines is refused.
    assert_eq!(
        run(&["credential", "set", "two"], Some("a\nb\n"))
            .status
            .code(),
        Some(2)
    );
    let out = run(
        &["credential", "rotate", "openai"],
        Some("sk-secret-value-2\n"),
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("no running server"), "{stderr}");
    let list =
        String::from_utf8_lossy(&run(&["credential", "list", "--json"], None).stdout).to_string();
    let v: serde_json::Value = serde_json::from_str(&list).unwrap();
    assert_eq!(v["credentials"][0]["name"], "openai");
    assert!(v["credentials"][0]["fingerprint"]
        .as_str()
        .unwrap()
        .starts_with("fp-"));
    for value in ["sk-secret-value-1", "sk-secret-value-2"] {
        assert!(!list.contains(value));
        let store = std::fs::read_to_string(t.data_dir().join("credentials.json")).unwrap();
        assert!(!store.contains(value));
    }
    let out = run(&["credential", "rm", "openai"], None);
    assert!(out.status.success());
    assert_eq!(
        run(&["credential", "rm", "openai"], None).status.code(),
        Some(2)
    );
    let list = String::from_utf8_lossy(&run(&["credential", "list"], None).stdout).to_string();
    assert!(list.contains("no credentials"), "{list}");
}

//! The CLI output the gated fleet test (`tests/fleet`, needs a FoundationDB cluster)
//! parses, checked here on the embedded ledger so CI notices when it drifts (issue 15):
//! `till audit --json`, `till usage --json`, the fleet's `[ledger]` table in till.toml, and
//! the `--keyspace` / `TILL_FDB_KEYSPACE` plumbing of `serve` and the ledger commands.
//! The accessors are the fleet test's own (`tests/fleet/shapes.rs`).

use std::sync::Arc;

use till_ledger::{ClaimRequest, EmbeddedConfig, EmbeddedLedger, Ledger, Level};
use till_receipt::{ReceiptSigner, RequestDigest};
use till_token::{verify, KeyRing, Limits, RootPublicKey};

use crate::fixture::Till;
use crate::fleet_shapes_shared as shapes;

fn levels(t: &Till, key: &str) -> Vec<Level> {
    let jwk = std::fs::read_to_string(t.data_dir().join("root.pub.jwk")).unwrap();
    let ring = KeyRing::with(RootPublicKey::from_jwk(&jwk).unwrap());
    verify(key, &ring, &Limits::default())
        .unwrap()
        .blocks()
        .iter()
        .map(|b| Level {
            revocation_id: b.revocation_id.clone(),
            cap: b.caveats.cap,
        })
        .collect()
}

async fn claim_n(t: &Till, levels: &[Level], n: u32) {
    let jwk = std::fs::read_to_string(t.data_dir().join("receipt.key.jwk")).unwrap();
    let signer = ReceiptSigner::from_private_jwk(&jwk).unwrap();
    let ledger = EmbeddedLedger::open(
        t.data_dir().join("ledger.redb"),
        EmbeddedConfig::new(Arc::new(signer), "shapes"),
    )
    .unwrap();
    for i in 0..n {
        let req = ClaimRequest {
            levels: levels.to_vec(),
            idempotency_key: None,
            request: RequestDigest {
                method: "POST".into(),
                upstream: "up".into(),
                path: format!("/v1/x/{i}"),
                body_sha256: "00".repeat(32),
                model: None,
                query: None,
                content_type: None,
            },
            now: 1_800_000_000,
            not_after: None,
            meta: None,
            windows: Vec::new(),
            ceilings: None,
        };
        ledger.claim(req).await.unwrap().unwrap();
    }
}

/// The same accessors the fleet test applies to `till audit --json` and `till usage
/// --json` (and the same mint / attenuate / revoke command lines), on the embedded ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_and_usage_json_have_the_shape_the_fleet_test_reads() {
    let t = Till::new();
    let token = t.minted(&["--upstream", "up", "--cap", "5"]);
    let child = t.run(&["attenuate", &token, "--cap", "3"]).ok();
    claim_n(&t, &levels(&t, &child), 2).await;
    claim_n(&t, &levels(&t, &token), 1).await;

    let audit = t.run(&["audit", "--json", &token]).json();
    assert_eq!(shapes::audit_clean(&audit), Some(true), "{audit}");
    assert_eq!(shapes::audit_receipts(&audit), Some(3), "{audit}");
    // `--ledger embedded --keyspace ...` is accepted (the key space is FoundationDB's).
    let audit = t
        .run(&[
            "audit",
            "--json",
            "--ledger",
            "embedded",
            "--keyspace",
            "k1",
            &child,
        ])
        .json();
    assert_eq!(shapes::audit_receipts(&audit), Some(3), "{audit}");

    let usage = t.run(&["usage", "--json", &child]).json();
    assert_eq!(shapes::usage_used(&usage, 0), Some(3), "{usage}");
    assert_eq!(shapes::usage_used(&usage, 1), Some(2), "{usage}");
    assert_eq!(shapes::usage_revoked(&usage, 1), Some(false), "{usage}");
    t.run(&["revoke", &child]).ok();
    let usage = t.run(&["usage", "--json", &child]).json();
    assert_eq!(shapes::usage_revoked(&usage, 1), Some(true), "{usage}");
    assert_eq!(shapes::usage_revoked(&usage, 0), Some(false), "{usage}");
}

/// The fleet test's till.toml (the documented `[ledger]` table with `backend`,
/// `cluster_file` and `keyspace`) is a valid configuration; the key space can also come
/// from `TILL_FDB_KEYSPACE` and `--keyspace` (flag > env > file).
#[test]
fn fleet_config_ledger_table_and_keyspace_precedence() {
    let t = Till::new();
    let table = "backend = \"fdb\"\ncluster_file = \"/etc/foundationdb/fdb.cluster\"\n\
                 keyspace = \"fleet-ks\"";
    let config = t.dir.path().join("till.toml");
    std::fs::write(
        &config,
        shapes::proxy_config("127.0.0.1:0", "127.0.0.1:9", table),
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let check = |extra: &[&str], env: Option<&str>| {
        let mut c = t.cmd();
        c.args(["serve", "--config", config, "--check-config"])
            .args(extra)
            .env("TILL_FLEET_UPSTREAM_SECRET", "x");
        if let Some(ks) = env {
            c.env("TILL_FDB_KEYSPACE", ks);
        }
        let out = c.output().unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        assert!(
            out.status.success(),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        stdout
    };
    let out = check(&[], None);
    assert!(
        out.contains("FoundationDB (/etc/foundationdb/fdb.cluster, key space fleet-ks)"),
        "{out}"
    );
    let out = check(&[], Some("from-env"));
    assert!(out.contains("key space from-env"), "{out}");
    let out = check(&["--keyspace", "from-flag"], Some("from-env"));
    assert!(out.contains("key space from-flag"), "{out}");
    // The short form still works, with the default key space.
    std::fs::write(
        t.dir.path().join("short.toml"),
        "ledger = \"fdb:/etc/fdb.cluster\"\nupstreams = {}\n",
    )
    .unwrap();
    let out = t
        .run(&["serve", "--config", "short.toml", "--check-config"])
        .ok();
    assert!(
        out.contains("FoundationDB (/etc/fdb.cluster, key space till)"),
        "{out}"
    );
    // A bad key space is a usage error, for serve and for the ledger commands.
    t.run(&[
        "serve",
        "--config",
        config,
        "--check-config",
        "--keyspace",
        "a b",
    ])
    .fails_with(2);
    let token = t.minted(&["--upstream", "up", "--cap", "2"]);
    let err = t
        .run(&[
            "usage",
            &token,
            "--ledger",
            "fdb:/nope",
            "--keyspace",
            "a b",
        ])
        .fails_with(2);
    assert!(err.contains("key space"), "{err}");
}

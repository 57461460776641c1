//! The dashboard through its router (no socket): sign-in, CSRF, read-only keys.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::Router;
use http::{HeaderMap, Request, StatusCode};
use tempfile::TempDir;
use till_ledger::{AlertPolicy, EmbeddedConfig, EmbeddedLedger, Ledger};
use till_receipt::{ReceiptKeySet, ReceiptSigner};
use till_token::{KeyRing, RootKey};
use tower::ServiceExt;

use crate::api::{do_mint, CaveatFields, MintRequest};
use crate::auth::{mint_admin_key, mint_read_only_admin_key};
use crate::{AdminConfig, AdminPlane};

struct Fixture {
    plane: AdminPlane,
    ledger: Arc<dyn Ledger>,
    admin: String,
    read_only: String,
    _dir: TempDir,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let signer = Arc::new(ReceiptSigner::generate());
    let mut receipt_keys = ReceiptKeySet::new();
    receipt_keys.insert(signer.public_key());
    let ledger = EmbeddedLedger::open(
        dir.path().join("ledger.redb"),
        EmbeddedConfig {
            signer,
            proxy_id: "test".into(),
            max_batch: 1,
            claim_timeout: Duration::from_secs(30),
            alerts: AlertPolicy::default(),
        },
    )
    .unwrap();
    let root = RootKey::from_seed(&[7; 32]).unwrap();
    let ledger = Arc::new(ledger) as Arc<dyn Ledger>;
    let plane = AdminPlane::new(AdminConfig {
        ledger: Arc::clone(&ledger),
        keys: KeyRing::with(root.public()),
        root: Some(RootKey::from_seed(&[7; 32]).unwrap()),
        receipt_keys,
        events: Default::default(),
        alerts: Default::default(),
        alert_counters: Default::default(),
    });
    Fixture {
        admin: mint_admin_key(&root, None).unwrap(),
        read_only: mint_read_only_admin_key(&root, None).unwrap(),
        plane,
        ledger,
        _dir: dir,
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

async fn send(router: &Router, req: Request<Body>) -> Reply {
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    Reply {
        status,
        headers,
        body: String::from_utf8_lossy(&bytes).into_owned(),
    }
}

fn get(path: &str, key: Option<&str>) -> Request<Body> {
    let mut b = Request::get(path);
    if let Some(k) = key {
        b = b.header("cookie", format!("till_admin={k}"));
    }
    b.body(Body::empty()).unwrap()
}

fn post(path: &str, key: Option<&str>, form: &[(&str, &str)]) -> Request<Body> {
    let mut b = Request::post(path).header("content-type", "application/x-www-form-urlencoded");
    if let Some(k) = key {
        b = b.header("cookie", format!("till_admin={k}"));
    }
    b.body(Body::from(serde_urlencoded::to_string(form).unwrap()))
        .unwrap()
}

fn cookie_of(r: &Reply) -> String {
    r.headers
        .get("set-cookie")
        .map(|v| v.to_str().unwrap().to_string())
        .unwrap_or_default()
}

async fn mint_family(f: &Fixture, cap: u64) -> String {
    let (_, token) = do_mint(
        f.plane.state(),
        MintRequest {
            caveats: CaveatFields {
                upstream: Some("openai".into()),
                cap: Some(cap),
                ..CaveatFields::default()
            },
            label: Some("agent-7".into()),
        },
    )
    .await
    .unwrap();
    hex::encode(token.family_id())
}

#[tokio::test]
async fn sign_in_keeps_the_key_in_a_strict_http_only_cookie() {
    let f = fixture();
    let r = f.plane.router();
    let anon = send(&r, get("/", None)).await;
    assert_eq!(anon.status, StatusCode::SEE_OTHER);
    assert_eq!(anon.headers["location"], "/login");

    let bad = send(&r, post("/login", None, &[("key", "till_nope")])).await;
    assert_eq!(bad.status, StatusCode::UNAUTHORIZED, "{}", bad.body);
    assert!(cookie_of(&bad).is_empty());

    let ok = send(&r, post("/login", None, &[("key", &f.admin)])).await;
    assert_eq!(ok.status, StatusCode::SEE_OTHER);
    let c = cookie_of(&ok);
    assert!(c.starts_with(&format!("till_admin={};", f.admin)), "{c}");
    for attr in ["HttpOnly", "SameSite=Strict", "Path=/"] {
        assert!(c.contains(attr), "{c}");
    }

    let page = send(&r, get("/", Some(&f.admin))).await;
    assert_eq!(page.status, StatusCode::OK);
    assert_eq!(page.headers["cache-control"], "no-store");
    assert!(page.headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("script-src 'self'"));
    assert!(page.body.contains("Key families"));
    // The session key is never written into a page.
    assert!(!page.body.contains(&f.admin));

    let out = send(
        &r,
        post(
            "/logout",
            Some(&f.admin),
            &[("csrf", &super::csrf_token(&f.admin))],
        ),
    )
    .await;
    assert_eq!(out.status, StatusCode::SEE_OTHER);
    assert!(cookie_of(&out).contains("Max-Age=0"));
}

#[tokio::test]
async fn minting_from_the_form_needs_the_session_csrf_token() {
    let f = fixture();
    let r = f.plane.router();
    let form = |csrf: &'static str| -> Vec<(&'static str, String)> {
        vec![
            ("csrf", csrf.to_string()),
            ("upstream", "openai".into()),
            ("cap", "3".into()),
            ("label", "bot".into()),
        ]
    };
    let to_req = |fields: Vec<(&'static str, String)>, key: &str| {
        let pairs: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (*k, v.as_str())).collect();
        post("/keys/mint", Some(key), &pairs)
    };
    let none = send(&r, to_req(form(""), &f.admin)).await;
    assert_eq!(none.status, StatusCode::FORBIDDEN);
    assert!(none.body.contains("csrf_token_invalid"));

    // A token from another session (e.g. the read-only key's) does not do.
    let mut other = form("");
    other[0].1 = super::csrf_token(&f.read_only);
    let stolen = send(&r, to_req(other, &f.admin)).await;
    assert_eq!(stolen.status, StatusCode::FORBIDDEN);

    let mut good = form("");
    good[0].1 = super::csrf_token(&f.admin);
    let minted = send(&r, to_req(good, &f.admin)).await;
    assert_eq!(minted.status, StatusCode::OK, "{}", minted.body);
    assert_eq!(minted.headers["cache-control"], "no-store");
    assert!(minted.body.contains("id=\"minted-key\""));
    assert!(minted.body.contains(">till_"));
    assert!(minted.body.contains("verified"));

    let overview = send(&r, get("/", Some(&f.admin))).await;
    assert!(overview.body.contains(">bot<"), "{}", overview.body);

    // A bad cap comes back as the form with the message, not a raw error.
    let mut bad = form("");
    bad[0].1 = super::csrf_token(&f.admin);
    bad[2].1 = "lots".into();
    let bad = send(&r, to_req(bad, &f.admin)).await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST);
    assert!(bad.body.contains("is not a whole number"));
}

#[tokio::test]
async fn read_only_keys_see_no_write_buttons_and_cannot_post() {
    let f = fixture();
    let r = f.plane.router();
    let fam = mint_family(&f, 10).await;
    let page = send(&r, get(&format!("/families/{fam}"), Some(&f.read_only))).await;
    assert_eq!(page.status, StatusCode::OK, "{}", page.body);
    assert!(page.body.contains("agent-7"));
    assert!(!page.body.contains("Revoke…"));
    assert!(page.body.contains("read-only"));
    let keys = send(&r, get("/keys", Some(&f.read_only))).await;
    assert!(!keys.body.contains("action=\"/keys/mint\""));

    let confirm = send(
        &r,
        get(
            &format!("/families/{fam}/revoke?block={fam}"),
            Some(&f.read_only),
        ),
    )
    .await;
    assert_eq!(confirm.status, StatusCode::FORBIDDEN);

    // Even with its own valid CSRF token, a read-only key cannot revoke.
    let csrf = super::csrf_token(&f.read_only);
    let forged = send(
        &r,
        post(
            &format!("/families/{fam}/revoke"),
            Some(&f.read_only),
            &[("csrf", &csrf), ("revocation_id", &fam)],
        ),
    )
    .await;
    assert_eq!(forged.status, StatusCode::FORBIDDEN);
    assert!(forged.body.contains("admin_forbidden"), "{}", forged.body);
    let id = hex::decode(&fam).unwrap();
    let detail = f
        .plane
        .state()
        .ledger
        .family(&id, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(!detail.family.revoked);

    // The full key sees the button, the confirmation, and revokes.
    let page = send(&r, get(&format!("/families/{fam}"), Some(&f.admin))).await;
    assert!(page.body.contains("Revoke…"));
    let confirm = send(
        &r,
        get(
            &format!("/families/{fam}/revoke?block={fam}"),
            Some(&f.admin),
        ),
    )
    .await;
    assert_eq!(confirm.status, StatusCode::OK);
    assert!(confirm.body.contains("Revoke 1 key"));
    let no_token = send(
        &r,
        post(
            &format!("/families/{fam}/revoke"),
            Some(&f.admin),
            &[("revocation_id", &fam)],
        ),
    )
    .await;
    assert_eq!(no_token.status, StatusCode::FORBIDDEN);
    assert!(no_token.body.contains("csrf_token_invalid"));
    let csrf = super::csrf_token(&f.admin);
    let done = send(
        &r,
        post(
            &format!("/families/{fam}/revoke"),
            Some(&f.admin),
            &[("csrf", &csrf), ("revocation_id", &fam)],
        ),
    )
    .await;
    assert_eq!(done.status, StatusCode::SEE_OTHER, "{}", done.body);
    let detail = f
        .plane
        .state()
        .ledger
        .family(&id, 0)
        .await
        .unwrap()
        .unwrap();
    assert!(detail.family.revoked);
}

#[tokio::test]
async fn family_pages_audit_and_download() {
    let f = fixture();
    let r = f.plane.router();
    let fam = mint_family(&f, 10).await;
    let audit = send(
        &r,
        get(&format!("/families/{fam}/audit"), Some(&f.read_only)),
    )
    .await;
    assert_eq!(audit.status, StatusCode::SEE_OTHER);
    let page = send(&r, get(&format!("/families/{fam}"), Some(&f.read_only))).await;
    assert!(page.body.contains("Re-run audit"));
    assert!(page.body.contains("No receipts yet."));
    let dl = send(
        &r,
        get(
            &format!("/families/{fam}/receipts.jsonl"),
            Some(&f.read_only),
        ),
    )
    .await;
    assert_eq!(dl.status, StatusCode::OK);
    assert!(dl.headers["content-disposition"]
        .to_str()
        .unwrap()
        .starts_with("attachment"));
    assert_eq!(dl.body, "");
    let missing = send(
        &r,
        get(&format!("/families/{}", "ab".repeat(64)), Some(&f.admin)),
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    assert!(missing.body.contains("family_not_found"));
    let alerts = send(&r, get("/alerts", Some(&f.admin))).await;
    assert_eq!(alerts.status, StatusCode::OK);
    assert!(alerts.body.contains("No alert has fired."));
    // The JSON API is unchanged next to it.
    let api = send(&r, get("/admin/v1/nope", Some(&f.admin))).await;
    assert_eq!(api.status, StatusCode::NOT_FOUND);
    assert!(api.headers["content-type"]
        .to_str()
        .unwrap()
        .contains("json"));
}

fn post_json(path: &str, key: &str, body: serde_json::Value) -> Request<Body> {
    Request::post(path)
        .header("authorization", format!("Bearer {key}"))
        .header("content-type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// The JSON API mints and attenuates with every caveat `till mint` has: per-call
/// ceilings, repositories, JSON-pointer checks and windowed caps; a window the token
/// format does not allow is a 400 with the reason, never a key.
#[tokio::test]
async fn api_mint_and_attenuate_take_ceilings_and_windows() {
    let f = fixture();
    let r = f.plane.router();
    let minted = send(
        &r,
        post_json(
            "/admin/v1/keys",
            &f.admin,
            serde_json::json!({
                "upstream": "openai",
                "cap": 100,
                "max_output_tokens": 512,
                "json_max": {"/n": 1},
                "json_allow": {"/model": ["gpt-4o-mini"]},
                "windows": [{"secs": 60, "max": 10}],
                "label": "ceilings",
            }),
        ),
    )
    .await;
    assert_eq!(minted.status, StatusCode::CREATED, "{}", minted.body);
    let doc: serde_json::Value = serde_json::from_str(&minted.body).unwrap();
    let block = &doc["inspect"]["blocks"][0]["caveats"];
    assert_eq!(block["max_output_tokens"], 512, "{doc}");
    assert_eq!(block["json_max"]["/n"], 1);
    assert_eq!(block["json_allow"]["/model"][0], "gpt-4o-mini");
    assert_eq!(block["windows"][0]["secs"], 60);
    assert_eq!(block["windows"][0]["max"], 10);

    let key = doc["key"].as_str().unwrap();
    let narrowed = send(
        &r,
        post_json(
            "/admin/v1/keys/attenuate",
            &f.admin,
            serde_json::json!({"key": key, "windows": [{"secs": 3600, "max": 5}], "repos": ["a/b"]}),
        ),
    )
    .await;
    assert_eq!(narrowed.status, StatusCode::CREATED, "{}", narrowed.body);
    let doc: serde_json::Value = serde_json::from_str(&narrowed.body).unwrap();
    assert_eq!(
        doc["inspect"]["blocks"][1]["caveats"]["windows"][0]["secs"],
        3600
    );
    assert_eq!(doc["inspect"]["blocks"][1]["caveats"]["repos"][0], "a/b");

    let bad = send(
        &r,
        post_json(
            "/admin/v1/keys",
            &f.admin,
            serde_json::json!({"upstream": "openai", "windows": [{"secs": 7, "max": 1}]}),
        ),
    )
    .await;
    assert_eq!(bad.status, StatusCode::BAD_REQUEST, "{}", bad.body);
    assert!(!bad.body.contains("\"key\""), "{}", bad.body);
}

/// A family's recent receipts end at its chain head even when voids put the head past
/// its net count (each void adds a receipt and frees a slot another claim takes).
#[tokio::test]
async fn recent_receipts_reach_the_chain_head_past_voids() {
    let f = fixture();
    let r = f.plane.router();
    let (_, token) = do_mint(
        f.plane.state(),
        MintRequest {
            caveats: CaveatFields {
                upstream: Some("openai".into()),
                ..CaveatFields::default()
            },
            label: None,
        },
    )
    .await
    .unwrap();
    let levels: Vec<till_ledger::Level> = token
        .blocks()
        .iter()
        .map(|b| till_ledger::Level {
            revocation_id: b.revocation_id.clone(),
            cap: b.caveats.cap,
        })
        .collect();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    for _ in 0..25 {
        let claim = till_ledger::ClaimRequest {
            levels: levels.clone(),
            idempotency_key: None,
            request: till_ledger::RequestDigest {
                method: "POST".into(),
                upstream: "openai".into(),
                path: "/v1/chat/completions".into(),
                body_sha256: "00".repeat(32),
                model: None,
                query: None,
                content_type: None,
            },
            now,
            not_after: None,
            meta: None,
            windows: Vec::new(),
            ceilings: None,
        };
        f.ledger.claim(claim).await.unwrap().unwrap();
    }
    let void = till_ledger::VoidRequest {
        family: token.family_id().to_vec(),
        seq: 3,
        now,
        windows: Vec::new(),
    };
    f.ledger.void(void).await.unwrap();
    // 25 claims and one void: the head is receipt 26, the net count 24.
    let fam = hex::encode(token.family_id());
    let detail = send(
        &r,
        Request::get(format!("/admin/v1/families/{fam}"))
            .header("authorization", format!("Bearer {}", f.admin))
            .body(Body::empty())
            .unwrap(),
    )
    .await;
    assert_eq!(detail.status, StatusCode::OK, "{}", detail.body);
    let doc: serde_json::Value = serde_json::from_str(&detail.body).unwrap();
    assert_eq!(doc["family"]["used"], 24, "{doc}");
    let recent = doc["recent_receipts"].as_array().unwrap();
    assert_eq!(recent.len(), crate::api::RECENT_RECEIPTS);
    assert_eq!(recent[0]["seq"], 26, "newest first, the chain head");
    assert_eq!(recent[crate::api::RECENT_RECEIPTS - 1]["seq"], 7);
}

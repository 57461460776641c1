//! Per-call ceilings, repository scope and JSON caveats through the proxy (issue 13): a
//! request above a ceiling is refused before any claim (nothing charged, nothing
//! forwarded) with a permanent 4xx (`x-should-retry: false`).

use std::collections::BTreeMap;

use till_token::Caveats;

use crate::support::{client, error_code, up_config, Till, Upstream};

/// Every preset this file uses, pointed at one loopback upstream.
fn presets_config(upstream: &Upstream) -> String {
    let mut toml = up_config(upstream);
    for name in ["openai", "anthropic", "gemini", "github", "stripe"] {
        toml.push_str(&format!(
            "[upstreams.{name}]\nbase_url = \"{}\"\n",
            upstream.url()
        ));
    }
    toml
}

async fn start() -> (Upstream, Till) {
    let upstream = Upstream::start().await;
    let env = [
        ("OPENAI_API_KEY", "sk-real"),
        ("ANTHROPIC_API_KEY", "sk-real"),
        ("GEMINI_API_KEY", "sk-real"),
        ("GITHUB_TOKEN", "sk-real"),
        ("STRIPE_API_KEY", "sk-real"),
    ];
    let till = Till::start_with_env(&presets_config(&upstream), &env).await;
    (upstream, till)
}

/// Sends a body with a content type; returns (status, code or "ok", x-should-retry).
async fn send(
    till: &Till,
    key: &str,
    method: &str,
    path: &str,
    content_type: &str,
    body: &str,
) -> (u16, String, Option<String>) {
    let resp = client()
        .request(method.parse().unwrap(), format!("{}{path}", till.url))
        .bearer_auth(key)
        .header("content-type", content_type)
        .body(body.to_string())
        .send()
        .await
        .unwrap();
    let status = resp.status().as_u16();
    let retry = resp
        .headers()
        .get("x-should-retry")
        .map(|v| v.to_str().unwrap().to_string());
    let code = if status == 200 {
        "ok".to_string()
    } else {
        error_code(resp).await
    };
    (status, code, retry)
}

const JSON: &str = "application/json";
const FORM: &str = "application/x-www-form-urlencoded";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_token_ceilings_per_preset() {
    let (upstream, till) = start().await;
    let key = |up: &str| {
        till.mint(Caveats {
            upstream: Some(up.into()),
            max_output_tokens: Some(256),
            cap: Some(100),
            ..Caveats::default()
        })
    };
    let openai = key("openai");
    let chat = "/openai/v1/chat/completions";
    let cases: &[(&str, &str, &str, u16, &str)] = &[
        (
            &openai,
            chat,
            r#"{"model":"m","max_tokens":256}"#,
            200,
            "ok",
        ),
        (
            &openai,
            chat,
            r#"{"model":"m","max_completion_tokens":100}"#,
            200,
            "ok",
        ),
        (
            &openai,
            "/openai/v1/responses",
            r#"{"model":"m","max_output_tokens":10}"#,
            200,
            "ok",
        ),
        (
            &openai,
            chat,
            r#"{"model":"m","max_tokens":257}"#,
            403,
            "max_output_tokens_exceeded",
        ),
        // The largest of the fields counts.
        (
            &openai,
            chat,
            r#"{"max_tokens":10,"max_completion_tokens":1000}"#,
            403,
            "max_output_tokens_exceeded",
        ),
        (
            &openai,
            chat,
            r#"{"model":"m"}"#,
            403,
            "max_output_tokens_required",
        ),
        (
            &openai,
            chat,
            r#"{"model":"m","max_tokens":null}"#,
            403,
            "max_output_tokens_required",
        ),
        // Several choices each up to max_tokens: the ceiling bounds their total.
        (&openai, chat, r#"{"max_tokens":128,"n":2}"#, 200, "ok"),
        (
            &openai,
            chat,
            r#"{"max_tokens":100,"n":3}"#,
            403,
            "max_output_tokens_exceeded",
        ),
        (
            &openai,
            "/openai/v1/completions",
            r#"{"max_tokens":100,"best_of":5,"n":1}"#,
            403,
            "max_output_tokens_exceeded",
        ),
        (
            &openai,
            chat,
            r#"{"max_tokens":10,"n":"2"}"#,
            400,
            "body_field_invalid",
        ),
        (
            &openai,
            chat,
            r#"{"max_tokens":1.5}"#,
            400,
            "body_field_invalid",
        ),
        (
            &openai,
            chat,
            r#"{"max_tokens":-1}"#,
            400,
            "body_field_invalid",
        ),
        (
            &openai,
            chat,
            r#"{"max_tokens":"10"}"#,
            400,
            "body_field_invalid",
        ),
        (
            &openai,
            chat,
            r#"{"max_tokens":10,"max_tokens":9999}"#,
            400,
            "body_ambiguous",
        ),
        (
            &openai,
            chat,
            r#"{"max_tokens":10,"MAX_TOKENS":9999}"#,
            400,
            "body_ambiguous",
        ),
        (
            &openai,
            chat,
            r#"{"max_tokens":10,"m":{"a":1,"a":2}}"#,
            400,
            "body_ambiguous",
        ),
        (&openai, chat, "not json", 403, "max_output_tokens_required"),
    ];
    for (k, path, body, status, code) in cases {
        let (s, c, retry) = send(&till, k, "POST", path, JSON, body).await;
        assert_eq!((s, c.as_str()), (*status, *code), "{body}");
        if *status != 200 {
            assert_eq!(retry.as_deref(), Some("false"), "{body}");
        }
    }
    // Not JSON at all: refused before the body is read.
    let (s, c, _) = send(&till, &openai, "POST", chat, "text/plain", "{}").await;
    assert_eq!((s, c.as_str()), (415, "content_type_not_json"));

    let anthropic = key("anthropic");
    let (s, ..) = send(
        &till,
        &anthropic,
        "POST",
        "/anthropic/v1/messages",
        JSON,
        r#"{"max_tokens":200}"#,
    )
    .await;
    assert_eq!(s, 200);
    // `max_completion_tokens` is not an Anthropic field: the request states no ceiling.
    let (s, c, _) = send(
        &till,
        &anthropic,
        "POST",
        "/anthropic/v1/messages",
        JSON,
        r#"{"max_completion_tokens":200}"#,
    )
    .await;
    assert_eq!((s, c.as_str()), (403, "max_output_tokens_required"));

    let gemini = key("gemini");
    let path = "/gemini/v1beta/models/gemini-pro:generateContent";
    for (body, status, code) in [
        (r#"{"generationConfig":{"maxOutputTokens":256}}"#, 200, "ok"),
        (
            r#"{"generation_config":{"max_output_tokens":100}}"#,
            200,
            "ok",
        ),
        (
            r#"{"generationConfig":{"maxOutputTokens":300}}"#,
            403,
            "max_output_tokens_exceeded",
        ),
        (
            r#"{"generationConfig":{"maxOutputTokens":10},"generation_config":{"max_output_tokens":9000}}"#,
            403,
            "max_output_tokens_exceeded",
        ),
        (
            r#"{"generationConfig":{}}"#,
            403,
            "max_output_tokens_required",
        ),
        (
            r#"{"generationConfig":{"maxOutputTokens":100,"candidateCount":3}}"#,
            403,
            "max_output_tokens_exceeded",
        ),
    ] {
        let (s, c, _) = send(&till, &gemini, "POST", path, JSON, body).await;
        assert_eq!((s, c.as_str()), (status, code), "{body}");
    }
    // Refused requests were neither charged nor forwarded.
    assert_eq!(upstream.hits(), 7);
    assert_eq!(till.usage(&openai).await, vec![4]);
    assert_eq!(till.usage(&gemini).await, vec![2]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stripe_amount_and_currency() {
    let (upstream, till) = start().await;
    let key = till.mint(Caveats {
        upstream: Some("stripe".into()),
        amount_max: Some(5000),
        currencies: Some(vec!["usd".into()]),
        ..Caveats::default()
    });
    let path = "/stripe/v1/payment_intents";
    for (query, body, status, code) in [
        ("", "amount=5000&currency=usd", 200, "ok"),
        ("", "currency=USD&amount=1", 200, "ok"),
        ("", "amount=5001&currency=usd", 403, "amount_exceeded"),
        ("", "amount=50&currency=eur", 403, "currency_not_allowed"),
        ("", "currency=usd", 403, "amount_required"),
        ("", "amount=5", 403, "currency_required"),
        ("", "amount=12.50&currency=usd", 400, "body_field_invalid"),
        (
            "",
            "amount=1&amount=99999&currency=usd",
            400,
            "body_ambiguous",
        ),
        (
            "",
            "amount=1&Amount=99999&currency=usd",
            400,
            "body_ambiguous",
        ),
        (
            "",
            "amount=1&amoun%74=99999&currency=usd",
            400,
            "body_ambiguous",
        ),
        (
            "?amount=99999",
            "amount=1&currency=usd",
            400,
            "body_ambiguous",
        ),
    ] {
        let (s, c, _) = send(&till, &key, "POST", &format!("{path}{query}"), FORM, body).await;
        assert_eq!((s, c.as_str()), (status, code), "{query} {body}");
    }
    // A JSON body states no form amount.
    let (s, c, _) = send(
        &till,
        &key,
        "POST",
        path,
        JSON,
        r#"{"amount":1,"currency":"usd"}"#,
    )
    .await;
    assert_eq!((s, c.as_str()), (403, "amount_required"));
    assert_eq!(upstream.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn github_repository_scope_and_json_caveats() {
    let (upstream, till) = start().await;
    let gh = till.mint(Caveats {
        upstream: Some("github".into()),
        repos: Some(vec!["Acme/Widgets".into()]),
        ..Caveats::default()
    });
    for (path, status, code) in [
        ("/github/repos/acme/widgets/issues", 200, "ok"),
        ("/github/repos/ACME/Widgets", 200, "ok"),
        (
            "/github/repos/acme/widgets-2/issues",
            403,
            "repo_not_allowed",
        ),
        ("/github/repos/acme", 403, "repo_not_allowed"),
        ("/github/user/repos", 403, "repo_not_allowed"),
        ("/github/repositories/1234", 403, "repo_not_allowed"),
    ] {
        let (s, c, _) = send(&till, &gh, "GET", path, JSON, "").await;
        assert_eq!((s, c.as_str()), (status, code), "{path}");
    }

    let generic = till.mint(Caveats {
        upstream: Some("up".into()),
        json_max: Some(BTreeMap::from([("/max_tokens".to_string(), 512)])),
        json_allow: Some(BTreeMap::from([(
            "/model".to_string(),
            vec!["a".to_string(), "b".to_string()],
        )])),
        ..Caveats::default()
    });
    for (body, status, code) in [
        (r#"{"model":"a","max_tokens":512}"#, 200, "ok"),
        (
            r#"{"model":"c","max_tokens":5}"#,
            403,
            "json_field_not_allowed",
        ),
        (
            r#"{"model":"a","max_tokens":513}"#,
            403,
            "json_field_exceeded",
        ),
        (r#"{"model":"a"}"#, 403, "json_field_required"),
        (
            r#"{"model":"a","max_tokens":5,"Max_Tokens":9999}"#,
            400,
            "body_ambiguous",
        ),
    ] {
        let (s, c, _) = send(&till, &generic, "POST", "/up/v1/x", JSON, body).await;
        assert_eq!((s, c.as_str()), (status, code), "{body}");
    }
    assert_eq!(upstream.hits(), 3);
}

/// The upstream sees the body byte for byte (no rewriting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bodies_are_forwarded_unchanged() {
    let (upstream, till) = start().await;
    let key = till.mint(Caveats {
        upstream: Some("openai".into()),
        max_output_tokens: Some(64),
        ..Caveats::default()
    });
    let body = "{ \"max_tokens\" : 64 ,\"model\":\"x\"}";
    let (s, ..) = send(
        &till,
        &key,
        "POST",
        "/openai/v1/chat/completions",
        JSON,
        body,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(upstream.seen()[0].body, body.as_bytes());
}

/// Windowed caps through the proxy: 429 `rate_limited` with `Retry-After` (seconds until
/// the window frees) and `x-should-retry: true`, nothing forwarded or charged; the receipt
/// of an allowed call records the ceilings that applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn windowed_cap_is_429_with_retry_after_and_receipts_record_ceilings() {
    let (upstream, till) = start().await;
    let key = till.mint(Caveats {
        upstream: Some("openai".into()),
        cap: Some(10),
        max_output_tokens: Some(64),
        windows: Some(vec![till_token::Window { secs: 3600, max: 2 }]),
        ..Caveats::default()
    });
    let body = r#"{"model":"m","max_tokens":64}"#;
    let path = format!("{}/openai/v1/chat/completions", till.url);
    let mut receipt = None;
    for _ in 0..2 {
        let resp = client()
            .post(&path)
            .bearer_auth(&key)
            .header("content-type", JSON)
            .body(body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        receipt = resp
            .headers()
            .get("till-receipt")
            .map(|v| v.to_str().unwrap().to_string());
    }
    let resp = client()
        .post(&path)
        .bearer_auth(&key)
        .header("content-type", JSON)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 429);
    let retry_after: u64 = resp.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=3600).contains(&retry_after), "{retry_after}");
    // SDKs wait out a Retry-After of up to a minute; a longer one is surfaced at once.
    let retry = if retry_after <= 60 { "true" } else { "false" };
    assert_eq!(resp.headers()["x-should-retry"], retry);
    assert_eq!(error_code(resp).await, "rate_limited");
    assert_eq!(upstream.hits(), 2);
    assert_eq!(till.usage(&key).await, vec![2]);

    let receipt = till_receipt::Receipt::parse(&receipt.unwrap()).unwrap();
    let ceilings = receipt.body().ceilings.clone().unwrap();
    assert_eq!(ceilings.max_output_tokens, Some(64));
    assert_eq!(ceilings.windows, Some(vec![[3600, 2]]));
}

/// `till mint`/`attenuate` flags for the new caveats and `till inspect`'s worst case, through
/// the real binary (offline: no server).
#[test]
fn cli_flags_and_inspect_worst_case() {
    let dir = tempfile::tempdir().unwrap();
    let till = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_till"))
            .arg("--dir")
            .arg(dir.path())
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8(out.stdout).unwrap().trim().to_string(),
            String::from_utf8(out.stderr).unwrap(),
        )
    };
    assert_eq!(till(&["keygen"]).0, Some(0));
    let (code, key, err) = till(&[
        "mint",
        "--upstream",
        "openai",
        "--cap",
        "100",
        "--max-output-tokens",
        "1000",
        "--rate",
        "60/m",
        "--window",
        "1000/d",
    ]);
    assert_eq!(code, Some(0), "{err}");
    let (code, sub, err) = till(&[
        "attenuate",
        &key,
        "--cap",
        "10",
        "--max-output-tokens",
        "2000",
        "--json-max",
        "/n=1",
        "--json-allow",
        "/model=b,a",
    ]);
    assert_eq!(code, Some(0), "{err}");
    // A wider ceiling is a warning, not a widening.
    assert!(err.contains("max_output_tokens 2000 is above"), "{err}");
    let (code, out, err) = till(&["inspect", &sub, "--json", "--price-per-1k-output", "0.5"]);
    assert_eq!(code, Some(0), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let w = &v["worst_case"];
    assert_eq!(w["activations"], 10);
    assert_eq!(w["output_tokens_per_call"], 1000);
    assert_eq!(w["output_tokens"], 10_000);
    assert_eq!(w["output_cost"], 5.0);
    assert_eq!(
        w["windows"],
        serde_json::json!([{"secs": 60, "max": 60}, {"secs": 86400, "max": 1000}])
    );
    assert_eq!(
        v["effective"]["json_allow"]["/model"],
        serde_json::json!(["a", "b"])
    );
    let (code, text, _) = till(&["inspect", &sub, "--price-per-1k-output", "0.5"]);
    assert_eq!(code, Some(0));
    assert!(
        text.contains("output tokens: 10000 (1000 per call)"),
        "{text}"
    );
    assert!(text.contains("at most 60 per minute"), "{text}");
    // Without a cap the worst case is unbounded, and says so.
    let (_, uncapped, _) = till(&["mint", "--upstream", "openai", "--max-output-tokens", "5"]);
    let (_, text, _) = till(&["inspect", &uncapped]);
    assert!(text.contains("activations:   unbounded"), "{text}");
    // Bad flags are usage errors (exit 2).
    for bad in [
        &["attenuate", key.as_str(), "--rate", "5/x"][..],
        &["attenuate", key.as_str(), "--json-max", "/n"][..],
        &["attenuate", key.as_str(), "--repo", "no-slash"][..],
        &["attenuate", key.as_str(), "--currency", "dollars"][..],
    ] {
        assert_eq!(till(bad).0, Some(2), "{bad:?}");
    }
}

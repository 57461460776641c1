//! Fuzz target bodies, shared by the libFuzzer binaries and the stable corpus test.
#![forbid(unsafe_code)]

use std::sync::OnceLock;

use till_receipt::Receipt;
use till_token::{inspect, verify, KeyRing, Limits, RequestFacts, RootKey};

fn ring() -> &'static (RootKey, KeyRing) {
    static RING: OnceLock<(RootKey, KeyRing)> = OnceLock::new();
    RING.get_or_init(|| {
        let root = RootKey::from_seed(&[42; 32]).unwrap_or_else(|_| RootKey::generate());
        let ring = KeyRing::with(root.public());
        (root, ring)
    })
}

/// Token parsing, verification, inspection and authorization must never panic, and a key
/// that verifies must inspect to the same blocks.
pub fn token(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let limits = Limits::default();
    let (_, ring) = ring();
    let verified = verify(text, ring, &limits);
    let inspected = inspect(text, Some(ring), &limits);
    if let Ok(v) = verified {
        let i = inspected.unwrap_or_else(|e| panic!("verified key failed inspect: {e}"));
        assert_eq!(i.blocks, v.blocks().to_vec(), "inspect and verify disagree");
        let req = RequestFacts {
            upstream: "openai",
            method: "POST",
            path: "/v1/chat",
            model: Some("m"),
            now: 0,
        };
        let _ = v.authorize(&req, None, &limits);
        let counts = vec![u64::MAX; v.blocks().len()];
        let refused = v.authorize(&req, Some(&counts), &limits);
        if v.scope().cap.is_some() {
            assert!(refused.is_err(), "over-cap counts authorized");
        }
    }
}

/// Receipt parsing must never panic, and a parsed receipt re-serializes to the same text.
pub fn receipt(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(r) = Receipt::parse(text) {
        assert_eq!(r.compact(), text, "parse is not canonical");
        let again =
            Receipt::parse(r.compact()).unwrap_or_else(|e| panic!("round trip failed: {e}"));
        assert_eq!(again.body(), r.body());
    }
}

/// Valid keys from the fuzz root key (1, 2 and 3 blocks), so mutations start from
/// something that verifies.
pub fn sample_tokens() -> Vec<String> {
    use till_token::{mint, Caveats};
    let (root, _) = ring();
    let minted = mint(
        root,
        Caveats {
            upstream: Some("openai".into()),
            cap: Some(3),
            paths: Some(vec!["/v1/chat".into()]),
            models: Some(vec!["m".into()]),
            methods: Some(vec!["POST".into()]),
            expires: Some(4_000_000_000),
            label: None,
            ..Caveats::default()
        },
    );
    let Ok(minted) = minted else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let mut current = minted;
    for cap in [2, 1] {
        if let Ok(s) = current.to_key_string() {
            out.push(s);
        }
        match current.attenuate(Caveats {
            cap: Some(cap),
            ..Caveats::default()
        }) {
            Ok((next, _)) => current = next,
            Err(_) => break,
        }
    }
    if let Ok(s) = current.to_key_string() {
        out.push(s);
    }
    out
}

/// `till.toml` parsing and validation must never panic; a config that validates has a
/// listen address and only upstream names of the documented shape.
pub fn config(data: &[u8]) {
    use std::collections::HashMap;
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(raw) = till_proxy::Config::parse(text) else {
        return;
    };
    let env: HashMap<String, String> = [
        ("OPENAI_API_KEY".to_string(), "sk-fuzz".to_string()),
        ("S".to_string(), "sk-fuzz".to_string()),
    ]
    .into_iter()
    .collect();
    if let Ok(config) = till_proxy::Config::validate(raw, &till_proxy::Overrides::default(), &env) {
        for name in config.upstreams.keys() {
            assert!(
                till_token::validate_upstream(name).is_ok(),
                "accepted upstream name {name:?}"
            );
        }
    }
}

/// Request-target normalisation, the framing scanner and query hygiene must never panic,
/// and what they accept must be safe to forward: no dot segments, no encoded slashes, no
/// control bytes, no Till key left in a forwarded query.
pub fn http(data: &[u8]) {
    let mut scanner = till_proxy::FramingScanner::new(16 * 1024);
    scanner.feed(data);
    let _ = scanner.flagged();
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(target) = till_proxy::route::parse(text) {
        let p = &target.path;
        assert!(p.starts_with('/'), "path {p:?}");
        assert!(
            !p.split('/').any(|s| s == ".." || s == "."),
            "dot segment in {p:?}"
        );
        assert!(
            !p.contains("//") && !p.contains('\\'),
            "bad separator in {p:?}"
        );
        // Issue 10 item 5: nothing an upstream could read as a path parameter or decode again.
        assert!(
            !p.contains(';') && !p.contains('%'),
            "`;` or `%` in {p:?}"
        );
        assert!(
            !p.bytes().any(|b| b.is_ascii_control()),
            "control byte in {p:?}"
        );
        // Unknown names are refused later by the config lookup; the segment itself must
        // never smuggle a separator or a control byte.
        let u = &target.upstream;
        assert!(
            !u.is_empty() && !u.contains('/') && !u.bytes().any(|b| b.is_ascii_control()),
            "upstream {u:?}"
        );
    }
    if let Some(q) = till_proxy::hygiene::forward_query(Some(text), None) {
        for pair in q.split('&') {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            assert!(
                !(k == "key" && v.trim().starts_with(till_token::KEY_PREFIX)),
                "key forwarded in {q:?}"
            );
        }
    }
}

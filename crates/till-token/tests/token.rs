//! Behaviour of mint, attenuate, verify and authorize, one concern per test.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use sha2::{Digest, Sha256};
use till_token::{
    attenuate_str, check_block, inspect, key_digest, mint, verify, AuthorizeError, CaveatKind,
    Caveats, KeyRing, Limits, RequestFacts, RootKey, RootPublicKey, SignatureStatus, Token,
    TokenError, VerifiedToken, KEY_PREFIX,
};

fn limits() -> Limits {
    Limits::default()
}

fn openai(extra: Caveats) -> Caveats {
    Caveats {
        upstream: Some("openai".into()),
        ..extra
    }
}

fn minted(c: Caveats) -> Token {
    mint(&root(), openai(c)).unwrap()
}

fn verified(t: &Token) -> VerifiedToken {
    verify(&t.to_key_string().unwrap(), &ring(), &limits()).unwrap()
}

fn post(path: &str, model: Option<&'static str>, now: i64) -> RequestFacts<'static> {
    // Leak is fine in tests: keeps the helper's signature simple.
    let path: &'static str = Box::leak(path.to_string().into_boxed_str());
    RequestFacts {
        upstream: "openai",
        method: "POST",
        path,
        model,
        now,
    }
}

fn refusal(r: Result<(), AuthorizeError>) -> (usize, CaveatKind, &'static str) {
    match r {
        Err(AuthorizeError::Refused(r)) => (r.block, r.caveat, r.code),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

fn token_code<T: std::fmt::Debug>(r: Result<T, TokenError>) -> &'static str {
    r.unwrap_err().code()
}

// ---------------------------------------------------------------- attenuation

#[test]
fn attenuation_cannot_switch_upstream() {
    let key = minted(Caveats::default());
    let err = key.attenuate(upstream("anthropic")).unwrap_err();
    assert_eq!(err.code(), "upstream_mismatch");
    assert!(err.to_string().contains("openai") && err.to_string().contains("anthropic"));
    // The string form (no root key at hand) refuses the same way.
    let s = key.to_key_string().unwrap();
    let err = attenuate_str(&s, upstream("anthropic"), &limits()).unwrap_err();
    assert!(matches!(err, TokenError::UpstreamMismatch { .. }));
    // Repeating the family's upstream is allowed (it restricts nothing new).
    let (child, warnings) = key.attenuate(upstream("openai")).unwrap();
    assert!(warnings.is_empty());
    assert_eq!(verified(&child).scope().upstream.as_deref(), Some("openai"));
}

#[test]
fn attenuation_must_restrict_something() {
    let key = minted(Caveats::default());
    assert_eq!(
        token_code(key.attenuate(Caveats::default())),
        "invalid_caveat"
    );
    let s = key.to_key_string().unwrap();
    assert_eq!(
        token_code(attenuate_str(&s, Caveats::default(), &limits())),
        "invalid_caveat"
    );
}

#[test]
fn minting_requires_an_upstream_and_valid_values() {
    assert_eq!(
        token_code(mint(&root(), Caveats::default())),
        "invalid_caveat"
    );
    let bad = openai(Caveats {
        paths: strings(&["/v1/../admin"]),
        ..Caveats::default()
    });
    assert_eq!(token_code(mint(&root(), bad)), "invalid_caveat");
    let bad = openai(Caveats {
        models: strings(&["gpt\"); check if true; //"]),
        ..Caveats::default()
    });
    assert_eq!(token_code(mint(&root(), bad)), "invalid_caveat");
}

#[test]
fn attenuate_str_needs_no_root_key_and_verifies() {
    let key = minted(Caveats {
        cap: Some(5),
        ..Caveats::default()
    });
    let s = key.to_key_string().unwrap();
    let (child, warnings) = attenuate_str(
        &s,
        Caveats {
            cap: Some(2),
            methods: strings(&["GET"]),
            ..Caveats::default()
        },
        &limits(),
    )
    .unwrap();
    assert!(warnings.is_empty());
    assert!(child.starts_with(KEY_PREFIX));
    let v = verify(&child, &ring(), &limits()).unwrap();
    assert_eq!(v.blocks().len(), 2);
    assert_eq!(v.scope().cap, Some(2));
    assert_eq!(v.family_id(), key.family_id().as_slice());
    // It refuses to extend a key that is already over a limit.
    let tight = Limits {
        max_blocks: 2,
        ..Limits::default()
    };
    assert_eq!(
        token_code(attenuate_str(&child, upstream("openai"), &tight)),
        "key_too_many_blocks"
    );
    let small = Limits {
        max_token_bytes: v.token().to_key_string().unwrap().len() * 3 / 4 + 10,
        ..Limits::default()
    };
    assert_eq!(
        token_code(attenuate_str(
            &child,
            Caveats {
                models: strings(&["a-rather-long-model-name-to-grow-the-key"]),
                ..Caveats::default()
            },
            &small
        )),
        "key_too_large"
    );
}

#[test]
fn attenuate_str_refuses_non_canonical_input() {
    let parent = det_mint(ROOT_SEED, &upstream("openai"), &next_keypair(200, 0));
    let bad = det_raw_append(
        &parent,
        "check if true;",
        Some("till:v1:{\"cap\":1}".into()),
        &next_keypair(200, 1),
    );
    let err = attenuate_str(
        &key_string(&bad),
        Caveats {
            cap: Some(1),
            ..Caveats::default()
        },
        &limits(),
    )
    .unwrap_err();
    assert!(
        matches!(err, TokenError::NotCanonical { block: 1, .. }),
        "{err:?}"
    );
}

#[test]
fn widening_requests_warn_and_stay_narrow() {
    let key = minted(Caveats {
        cap: Some(3),
        methods: strings(&["POST"]),
        models: strings(&["a"]),
        paths: strings(&["/v1/chat"]),
        expires: Some(1_000),
        ..Caveats::default()
    });
    let (child, warnings) = key
        .attenuate(Caveats {
            cap: Some(10),
            methods: strings(&["GET", "POST"]),
            models: strings(&["a", "b"]),
            paths: strings(&["/v1"]),
            expires: Some(5_000),
            ..Caveats::default()
        })
        .unwrap();
    let kinds: Vec<&str> = warnings.iter().map(|w| w.caveat).collect();
    assert_eq!(kinds, ["cap", "methods", "models", "paths", "expires"]);
    let v = verified(&child);
    let s = v.scope();
    assert_eq!(s.cap, Some(3));
    assert_eq!(s.methods, strings(&["POST"]));
    assert_eq!(s.models, strings(&["a"]));
    assert_eq!(s.paths, strings(&["/v1/chat"]));
    assert_eq!(s.expires, Some(1_000));
    // The raised cap has no effect: the authority block's check still refuses.
    let req = post("/v1/chat", Some("a"), 0);
    assert_eq!(
        refusal(v.authorize(&req, Some(&[4, 4]), &limits())),
        (0, CaveatKind::Cap, "activation_limit_reached")
    );
    assert_eq!(
        refusal(v.authorize(&post("/v1/x", Some("a"), 0), None, &limits())),
        (0, CaveatKind::Paths, "path_not_allowed")
    );
}

#[test]
fn sixteen_blocks_fit_seventeen_do_not() {
    let mut key = minted(Caveats {
        cap: Some(100),
        ..Caveats::default()
    });
    for i in 1..16u64 {
        key = key
            .attenuate(Caveats {
                cap: Some(100 - i),
                ..Caveats::default()
            })
            .unwrap()
            .0;
    }
    let v = verified(&key);
    assert_eq!(v.blocks().len(), 16);
    assert_eq!(v.scope().cap, Some(85));
    let counts: Vec<u64> = (0..16).map(|_| 85).collect();
    v.authorize(&post("/", None, 0), Some(&counts), &limits())
        .unwrap();
    // Token::attenuate itself has no limits; verify enforces them.
    let (seventeen, _) = key
        .attenuate(Caveats {
            cap: Some(1),
            ..Caveats::default()
        })
        .unwrap();
    let s = seventeen.to_key_string().unwrap();
    assert_eq!(
        token_code(verify(&s, &ring(), &limits())),
        "key_too_many_blocks"
    );
    // attenuate_str does take limits: it refuses to write a key that verify would refuse.
    let cap1 = Caveats {
        cap: Some(1),
        ..Caveats::default()
    };
    assert_eq!(
        token_code(attenuate_str(
            &key.to_key_string().unwrap(),
            cap1,
            &limits()
        )),
        "key_too_many_blocks"
    );
}

// ---------------------------------------------------------------- authorization

#[test]
fn datalog_layer_enforces_every_caveat_on_its_own() {
    let key = minted(Caveats {
        methods: strings(&["POST"]),
        paths: strings(&["/v1/chat"]),
        models: strings(&["m"]),
        expires: Some(1_000),
        cap: Some(2),
        ..Caveats::default()
    });
    let (child, _) = key
        .attenuate(Caveats {
            cap: Some(1),
            ..Caveats::default()
        })
        .unwrap();
    let v = verified(&child);
    let ok = post("/v1/chat", Some("m"), 1_000);
    v.authorize_datalog_only(&ok, &[2, 1], &limits()).unwrap();
    let refused = |req: &RequestFacts<'_>, counts: &[u64]| match v.authorize_datalog_only(
        req,
        counts,
        &limits(),
    ) {
        Err(AuthorizeError::Refused(r)) => {
            assert_eq!(r.code, "key_check_failed");
            assert_eq!(r.caveat, CaveatKind::Datalog);
            r.block
        }
        other => panic!("Datalog accepted {req:?} {counts:?}: {other:?}"),
    };
    // Over the child's cap, then over the parent's: each block's own check refuses.
    assert_eq!(refused(&ok, &[2, 2]), 1);
    assert_eq!(refused(&ok, &[3, 1]), 0);
    assert_eq!(refused(&post("/v1/chat", Some("m"), 1_001), &[1, 1]), 0);
    assert_eq!(refused(&post("/v1/chatty", Some("m"), 0), &[1, 1]), 0);
    assert_eq!(refused(&post("/v1/chat", None, 0), &[1, 1]), 0);
    assert_eq!(refused(&post("/v1/chat", Some("n"), 0), &[1, 1]), 0);
    let get = RequestFacts {
        method: "GET",
        ..ok.clone()
    };
    assert_eq!(refused(&get, &[1, 1]), 0);
    let other = RequestFacts {
        upstream: "anthropic",
        ..ok.clone()
    };
    assert_eq!(refused(&other, &[1, 1]), 0);
    // The full authorize refuses first in the pure check, which names the caveat.
    assert_eq!(
        refusal(v.authorize(&ok, Some(&[2, 2]), &limits())),
        (1, CaveatKind::Cap, "activation_limit_reached")
    );
    // Wrong number of counts is an error, not a refusal.
    assert!(matches!(
        v.authorize_datalog_only(&ok, &[1], &limits()),
        Err(AuthorizeError::Token(_))
    ));
    assert!(matches!(
        v.authorize(&ok, Some(&[1, 1, 1]), &limits()),
        Err(AuthorizeError::Token(_))
    ));
}

#[test]
fn datalog_run_limits_are_applied() {
    let v = verified(&minted(Caveats {
        cap: Some(5),
        ..Caveats::default()
    }));
    let req = post("/", None, 0);
    // Canonical blocks have no rules, so only the time limit can bite; a zero budget is
    // spent before the first check (biscuit compares with >=, so this is deterministic).
    let starved = Limits {
        max_time: std::time::Duration::ZERO,
        ..Limits::default()
    };
    let (_, caveat, code) = refusal(v.authorize(&req, None, &starved));
    assert_eq!(
        (caveat, code),
        (CaveatKind::Datalog, "key_evaluation_limit")
    );
    v.authorize(&req, None, &limits()).unwrap();
}

#[test]
fn expiry_is_inclusive_and_checked_at_every_level() {
    let key = minted(Caveats {
        expires: Some(2_000),
        ..Caveats::default()
    });
    let (child, _) = key
        .attenuate(Caveats {
            expires: Some(1_000),
            ..Caveats::default()
        })
        .unwrap();
    let parent = verified(&key);
    let child = verified(&child);
    parent
        .authorize(&post("/", None, 2_000), None, &limits())
        .unwrap();
    assert_eq!(
        refusal(parent.authorize(&post("/", None, 2_001), None, &limits())),
        (0, CaveatKind::Expires, "key_expired")
    );
    child
        .authorize(&post("/", None, 1_000), None, &limits())
        .unwrap();
    assert_eq!(
        refusal(child.authorize(&post("/", None, 1_001), None, &limits())),
        (1, CaveatKind::Expires, "key_expired")
    );
    // Expired wins over the other caveats of the same block (fixed order).
    assert_eq!(
        refusal(
            parent
                .authorize(&post("/", None, 9_999), Some(&[u64::MAX]), &limits())
                .map(|_| ())
        ),
        (0, CaveatKind::Expires, "key_expired")
    );
    // Unix time must be representable.
    assert_eq!(
        token_code(mint(
            &root(),
            openai(Caveats {
                expires: Some(-1),
                ..Caveats::default()
            })
        )),
        "invalid_caveat"
    );
}

#[test]
fn model_limited_keys_require_a_model() {
    let limited = verified(&minted(Caveats {
        models: strings(&["gpt-4o-mini"]),
        ..Caveats::default()
    }));
    assert_eq!(
        refusal(limited.authorize(&post("/v1/chat/completions", None, 0), None, &limits())),
        (0, CaveatKind::Models, "model_required")
    );
    assert_eq!(
        refusal(limited.authorize(
            &post("/v1/chat/completions", Some("gpt-4o"), 0),
            None,
            &limits()
        )),
        (0, CaveatKind::Models, "model_not_allowed")
    );
    limited
        .authorize(
            &post("/v1/chat/completions", Some("gpt-4o-mini"), 0),
            None,
            &limits(),
        )
        .unwrap();
    // A key without a model caveat does not care whether there is one.
    let open = verified(&minted(Caveats::default()));
    open.authorize(&post("/v1/files", None, 0), None, &limits())
        .unwrap();
    open.authorize(&post("/v1/files", Some("anything"), 0), None, &limits())
        .unwrap();
}

#[test]
fn path_prefixes_are_segment_aware() {
    let v = verified(&minted(Caveats {
        paths: strings(&["/v1/chat", "/files/"]),
        ..Caveats::default()
    }));
    for ok in [
        "/v1/chat",
        "/v1/chat/",
        "/v1/chat/completions",
        "/files/x",
        "/files/",
    ] {
        v.authorize(&post(ok, None, 0), None, &limits())
            .unwrap_or_else(|e| panic!("{ok}: {e}"));
        v.authorize_datalog_only(&post(ok, None, 0), &[1], &limits())
            .unwrap();
    }
    for bad in [
        "/v1/chatty",
        "/v1/cha",
        "/v1",
        "/V1/chat",
        "/v1/chat%2F..",
        "/files",
        "/filesx/y",
        "v1/chat",
        "",
    ] {
        assert_eq!(
            refusal(v.authorize(&post(bad, None, 0), None, &limits())),
            (0, CaveatKind::Paths, "path_not_allowed"),
            "{bad}"
        );
        assert!(v
            .authorize_datalog_only(&post(bad, None, 0), &[1], &limits())
            .is_err());
    }
}

#[test]
fn methods_are_exact_and_case_sensitive_at_authorization() {
    let v = verified(&minted(Caveats {
        methods: strings(&["get"]),
        ..Caveats::default()
    }));
    assert_eq!(v.scope().methods, strings(&["GET"]));
    let get = RequestFacts {
        method: "GET",
        ..post("/", None, 0)
    };
    v.authorize(&get, None, &limits()).unwrap();
    let lower = RequestFacts {
        method: "get",
        ..post("/", None, 0)
    };
    assert_eq!(
        refusal(v.authorize(&lower, None, &limits())).2,
        "method_not_allowed"
    );
}

#[test]
fn scope_only_check_uses_count_one() {
    let zero = verified(&minted(Caveats {
        cap: Some(0),
        ..Caveats::default()
    }));
    assert_eq!(
        refusal(zero.authorize(&post("/", None, 0), None, &limits())).2,
        "activation_limit_reached"
    );
    let one = verified(&minted(Caveats {
        cap: Some(1),
        ..Caveats::default()
    }));
    one.authorize(&post("/", None, 0), None, &limits()).unwrap();
    one.authorize(&post("/", None, 0), Some(&[1]), &limits())
        .unwrap();
    assert!(one
        .authorize(&post("/", None, 0), Some(&[2]), &limits())
        .is_err());
}

#[test]
fn sibling_caps_are_independent_and_all_count_against_the_parent() {
    let parent = minted(Caveats {
        cap: Some(5),
        ..Caveats::default()
    });
    let a = verified(
        &parent
            .attenuate(Caveats {
                cap: Some(2),
                ..Caveats::default()
            })
            .unwrap()
            .0,
    );
    let b = verified(
        &parent
            .attenuate(Caveats {
                cap: Some(2),
                ..Caveats::default()
            })
            .unwrap()
            .0,
    );
    assert_ne!(a.blocks()[1].revocation_id, b.blocks()[1].revocation_id);
    assert_eq!(a.blocks()[0].revocation_id, b.blocks()[0].revocation_id);
    let req = post("/", None, 0);
    // A has spent 2 of its own, B 2 of its own: the family counter is at 4.
    a.authorize(&req, Some(&[4, 2]), &limits()).unwrap();
    b.authorize(&req, Some(&[5, 1]), &limits()).unwrap();
    assert_eq!(refusal(b.authorize(&req, Some(&[6, 2]), &limits())).0, 0);
    assert_eq!(refusal(a.authorize(&req, Some(&[5, 3]), &limits())).0, 1);
}

// ---------------------------------------------------------------- parsing and limits

#[test]
fn size_is_checked_before_decoding() {
    // 12 KiB of characters that are not even base64url: still `too large`, not `malformed`.
    let junk = format!("{KEY_PREFIX}{}", "*".repeat(12 * 1024));
    assert_eq!(
        token_code(verify(&junk, &ring(), &limits())),
        "key_too_large"
    );
    assert_eq!(token_code(inspect(&junk, None, &limits())), "key_too_large");
    // The boundary: a key of exactly max_token_bytes passes the size check.
    let key = minted(Caveats::default()).to_key_string().unwrap();
    let n = key_bytes(&key).len();
    let exact = Limits {
        max_token_bytes: n,
        ..Limits::default()
    };
    verify(&key, &ring(), &exact).unwrap();
    let under = Limits {
        max_token_bytes: n - 1,
        ..Limits::default()
    };
    match verify(&key, &ring(), &under) {
        Err(TokenError::TooLarge { size, max }) => assert_eq!((size, max), (n, n - 1)),
        other => panic!("{other:?}"),
    }
}

#[test]
fn block_count_is_checked_before_the_root_key_and_signatures() {
    // 17 blocks from an untrusted root: the cheap limit answers first.
    let mut b = det_mint(OTHER_ROOT_SEED, &upstream("openai"), &next_keypair(201, 0));
    for i in 1..17u8 {
        b = det_attenuate(
            &b,
            &Caveats {
                cap: Some(u64::from(i)),
                ..Caveats::default()
            },
            &next_keypair(201, i),
        );
    }
    let s = key_string(&b);
    assert!(key_bytes(&s).len() < 8 * 1024);
    assert_eq!(
        token_code(verify(&s, &ring(), &limits())),
        "key_too_many_blocks"
    );
    let mut c = container(&s);
    c.authority.signature[3] ^= 0xff;
    assert_eq!(
        token_code(verify(&encode_container(&c), &ring(), &limits())),
        "key_too_many_blocks"
    );
}

#[test]
fn pathological_datalog_is_refused_as_not_canonical() {
    let open = upstream("openai");
    let ctx = open.clone().normalize().unwrap().context().unwrap();
    let mut src = open.block_source(0).unwrap();
    for i in 0..400 {
        src.push_str(&format!("f({i});"));
    }
    src.push_str("g($x) <- f($x), f($y), f($z);");
    let b = det_raw_mint(ROOT_SEED, &src, Some(ctx), &next_keypair(202, 0));
    let s = key_string(&b);
    assert!(key_bytes(&s).len() <= 8 * 1024);
    let err = verify(&s, &ring(), &limits()).unwrap_err();
    assert!(
        matches!(err, TokenError::NotCanonical { block: 0, .. }),
        "{err:?}"
    );
    assert!(matches!(
        inspect(&s, None, &limits()),
        Err(TokenError::NotCanonical { .. })
    ));
}

#[test]
fn malformed_strings_have_stable_codes() {
    let key = minted(Caveats::default()).to_key_string().unwrap();
    for (bad, code) in [
        (String::new(), "key_malformed"),
        ("till".to_string(), "key_malformed"),
        (key.replacen("till_", "TILL_", 1), "key_malformed"),
        (key.replacen("till_", "sk-", 1), "key_malformed"),
        (format!("{key}="), "key_malformed"),
        (format!("{key}!"), "key_malformed"),
        (key[..key.len() - 4].to_string(), "key_malformed"),
        (key[..40].to_string(), "key_malformed"),
    ] {
        assert_eq!(
            token_code(verify(&bad, &ring(), &limits())),
            code,
            "{bad:?}"
        );
    }
    // Non-zero trailing bits: the same bytes have exactly one encoding.
    let key = ["a", "ab", "abc"]
        .iter()
        .map(|u| mint(&root(), upstream(u)).unwrap().to_key_string().unwrap())
        .find(|k| (k.len() - KEY_PREFIX.len()) % 4 != 0)
        .unwrap();
    verify(&key, &ring(), &limits()).unwrap();
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let last = *key.as_bytes().last().unwrap();
    let value = ALPHABET.iter().position(|&c| c == last).unwrap();
    // The lowest bit of the last character is never used by an unpadded tail.
    let sloppy = format!("{}{}", &key[..key.len() - 1], ALPHABET[value ^ 1] as char);
    assert_eq!(
        token_code(verify(&sloppy, &ring(), &limits())),
        "key_malformed"
    );
    // Surrounding whitespace (a pasted key) is tolerated.
    verify(&format!("  {key}\n"), &ring(), &limits()).unwrap();
}

// ---------------------------------------------------------------- root keys

#[test]
fn root_key_id_is_the_first_four_bytes_of_sha256_big_endian() {
    let root = root();
    let public = hex::decode(root.public().to_hex()).unwrap();
    let digest = Sha256::digest(&public);
    let id = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
    assert_eq!(root.id(), id);
    assert_eq!(root.public().id(), id);
    let v = verified(&minted(Caveats::default()));
    assert_eq!(v.root_key_id(), id);
    let i = inspect(&v.token().to_key_string().unwrap(), None, &limits()).unwrap();
    assert_eq!(i.root_key_id, Some(id));
}

#[test]
fn rotation_keeps_old_keys_while_their_root_is_trusted() {
    let old = root();
    let new = RootKey::from_seed(&[0x44; 32]).unwrap();
    let old_key = mint(&old, upstream("openai"))
        .unwrap()
        .to_key_string()
        .unwrap();
    let new_key = mint(&new, upstream("openai"))
        .unwrap()
        .to_key_string()
        .unwrap();
    let mut ring = KeyRing::new();
    assert_eq!(
        token_code(verify(&old_key, &ring, &limits())),
        "key_unknown_root"
    );
    ring.insert(old.public());
    ring.insert(new.public());
    let mut ids: Vec<u32> = ring.ids().collect();
    ids.sort_unstable();
    let mut want = vec![old.id(), new.id()];
    want.sort_unstable();
    assert_eq!(ids, want);
    assert_eq!(
        verify(&old_key, &ring, &limits()).unwrap().root_key_id(),
        old.id()
    );
    assert_eq!(
        verify(&new_key, &ring, &limits()).unwrap().root_key_id(),
        new.id()
    );
    // Retire the old key: its keys fail closed with a specific code.
    assert!(ring.remove(old.id()).is_some());
    assert!(!ring.contains(old.id()));
    match verify(&old_key, &ring, &limits()) {
        Err(TokenError::UnknownRootKey(Some(id))) => assert_eq!(id, old.id()),
        other => panic!("{other:?}"),
    }
    verify(&new_key, &ring, &limits()).unwrap();
}

#[test]
fn jwk_key_files() {
    let root = root();
    let private = root.to_private_jwk();
    let v: serde_json::Value = serde_json::from_str(&private).unwrap();
    assert_eq!(v["kty"], "OKP");
    assert_eq!(v["crv"], "Ed25519");
    assert_eq!(v["kid"], root.id().to_string());
    assert!(v["d"].is_string() && v["x"].is_string());
    let back = RootKey::from_private_jwk(&private).unwrap();
    assert_eq!(back.public(), root.public());
    let public = root.public().to_jwk();
    let p: serde_json::Value = serde_json::from_str(&public).unwrap();
    assert!(p.get("d").is_none());
    assert_eq!(RootPublicKey::from_jwk(&public).unwrap(), root.public());
    // A private JWK also serves as a public one.
    assert_eq!(RootPublicKey::from_jwk(&private).unwrap(), root.public());
    for bad in [
        "not json".to_string(),
        public.clone(),
        private.replace("\"OKP\"", "\"EC\""),
        private.replace(&format!("\"{}\"", root.id()), "\"7\""),
    ] {
        assert_eq!(
            token_code(RootKey::from_private_jwk(&bad)),
            "root_key_invalid"
        );
    }
    // The private key never shows in Debug output or errors.
    let d = v["d"].as_str().unwrap();
    assert!(!format!("{root:?}").contains(d));
    let err = RootKey::from_private_jwk(&private.replace("\"kty\"", "\"kty2\"")).unwrap_err();
    assert!(!err.to_string().contains(d));
}

#[test]
fn debug_output_never_contains_the_key() {
    let token = minted(Caveats {
        cap: Some(1),
        ..Caveats::default()
    });
    let s = token.to_key_string().unwrap();
    let body = &s[KEY_PREFIX.len()..];
    let v = verified(&token);
    for dbg in [
        format!("{token:?}"),
        format!("{v:?}"),
        format!("{:?}", root()),
    ] {
        assert!(!dbg.contains(&body[..24]), "{dbg}");
    }
    // Errors about a key never echo it.
    let err = verify(&format!("{s}x"), &ring(), &limits()).unwrap_err();
    assert!(!err.to_string().contains(&body[..24]));
}

#[test]
fn key_digest_is_sha256_of_the_string() {
    let s = minted(Caveats::default()).to_key_string().unwrap();
    let want: [u8; 32] = Sha256::digest(s.as_bytes()).into();
    assert_eq!(key_digest(&s), want);
}

// ---------------------------------------------------------------- inspect

#[test]
fn inspect_reports_signature_status() {
    let s = minted(Caveats {
        cap: Some(2),
        ..Caveats::default()
    })
    .to_key_string()
    .unwrap();
    let i = inspect(&s, None, &limits()).unwrap();
    assert!(matches!(i.signature, SignatureStatus::Unchecked));
    assert_eq!(i.effective.cap, Some(2));
    let i = inspect(&s, Some(&ring()), &limits()).unwrap();
    assert!(matches!(i.signature, SignatureStatus::Verified));
    let other = KeyRing::with(other_root().public());
    match inspect(&s, Some(&other), &limits()).unwrap().signature {
        SignatureStatus::Invalid { code, .. } => assert_eq!(code, "key_unknown_root"),
        s => panic!("{s:?}"),
    }
    let mut c = container(&s);
    c.authority.signature[0] ^= 1;
    let tampered = encode_container(&c);
    match inspect(&tampered, Some(&ring()), &limits())
        .unwrap()
        .signature
    {
        SignatureStatus::Invalid { code, .. } => assert_eq!(code, "key_signature_invalid"),
        s => panic!("{s:?}"),
    }
}

// ---------------------------------------------------------------- codes

#[test]
fn token_error_codes_are_stable() {
    let cases: Vec<(TokenError, &str)> = vec![
        (TokenError::MissingPrefix, "key_malformed"),
        (TokenError::BadEncoding, "key_malformed"),
        (TokenError::Malformed("x".into()), "key_malformed"),
        (TokenError::TooLarge { size: 2, max: 1 }, "key_too_large"),
        (
            TokenError::TooManyBlocks { blocks: 2, max: 1 },
            "key_too_many_blocks",
        ),
        (TokenError::UnknownRootKey(None), "key_unknown_root"),
        (TokenError::BadSignature, "key_signature_invalid"),
        (
            TokenError::NotCanonical {
                block: 0,
                reason: "x".into(),
            },
            "key_not_canonical",
        ),
        (TokenError::InvalidCaveat("x".into()), "invalid_caveat"),
        (
            TokenError::UpstreamMismatch {
                family: "a".into(),
                requested: "b".into(),
            },
            "upstream_mismatch",
        ),
        (TokenError::BadKey("x".into()), "root_key_invalid"),
        (TokenError::Biscuit("x".into()), "key_invalid"),
    ];
    for (e, code) in cases {
        assert_eq!(e.code(), code, "{e:?}");
    }
}

#[test]
fn refusal_codes_are_stable() {
    let c = Caveats {
        upstream: Some("openai".into()),
        methods: strings(&["POST"]),
        paths: strings(&["/v1"]),
        models: strings(&["m"]),
        expires: Some(100),
        cap: Some(1),
        label: None,
        ..Caveats::default()
    };
    let ok = post("/v1", Some("m"), 100);
    check_block(0, &c, &ok, 1).unwrap();
    let cases: Vec<(RequestFacts<'_>, u64, CaveatKind, &str)> = vec![
        (
            RequestFacts {
                upstream: "x",
                ..ok.clone()
            },
            1,
            CaveatKind::Upstream,
            "upstream_not_allowed",
        ),
        (
            RequestFacts {
                now: 101,
                ..ok.clone()
            },
            1,
            CaveatKind::Expires,
            "key_expired",
        ),
        (
            RequestFacts {
                method: "GET",
                ..ok.clone()
            },
            1,
            CaveatKind::Methods,
            "method_not_allowed",
        ),
        (
            RequestFacts {
                path: "/v2",
                ..ok.clone()
            },
            1,
            CaveatKind::Paths,
            "path_not_allowed",
        ),
        (
            RequestFacts {
                model: None,
                ..ok.clone()
            },
            1,
            CaveatKind::Models,
            "model_required",
        ),
        (
            RequestFacts {
                model: Some("n"),
                ..ok.clone()
            },
            1,
            CaveatKind::Models,
            "model_not_allowed",
        ),
        (ok.clone(), 2, CaveatKind::Cap, "activation_limit_reached"),
    ];
    for (req, count, kind, code) in cases {
        let r = check_block(3, &c, &req, count).unwrap_err();
        assert_eq!((r.block, r.caveat, r.code), (3, kind, code), "{req:?}");
        assert!(!r.message.is_empty());
    }
    let kinds = serde_json::to_value([
        CaveatKind::Upstream,
        CaveatKind::Methods,
        CaveatKind::Paths,
        CaveatKind::Models,
        CaveatKind::Expires,
        CaveatKind::Cap,
        CaveatKind::Datalog,
    ])
    .unwrap();
    assert_eq!(
        kinds,
        serde_json::json!(["upstream", "methods", "paths", "models", "expires", "cap", "datalog"])
    );
}

#[test]
fn label_is_declared_in_the_authority_block_only() {
    let root = RootKey::generate();
    let ring = KeyRing::with(root.public());
    let key = mint(
        &root,
        Caveats {
            upstream: Some("openai".into()),
            label: Some("research-agent".into()),
            cap: Some(3),
            ..Default::default()
        },
    )
    .unwrap();
    let s = key.to_key_string().unwrap();
    let v = verify(&s, &ring, &Limits::default()).unwrap();
    assert_eq!(
        v.blocks()[0].caveats.label.as_deref(),
        Some("research-agent")
    );
    // A label restricts nothing: the Datalog is the same as without it.
    let plain = Caveats {
        upstream: Some("openai".into()),
        cap: Some(3),
        ..Default::default()
    };
    assert_eq!(
        v.blocks()[0].caveats.block_source(0).unwrap(),
        plain.block_source(0).unwrap()
    );
    // Attenuation cannot add or change a label.
    let err = key
        .attenuate(Caveats {
            label: Some("other".into()),
            cap: Some(1),
            ..Default::default()
        })
        .unwrap_err();
    assert!(err.to_string().contains("label"), "{err}");
    // Bad labels are refused at mint.
    for bad in ["", " x", "x ", "a\nb", "é", &"x".repeat(65)] {
        assert!(
            mint(
                &root,
                Caveats {
                    upstream: Some("openai".into()),
                    label: Some(bad.into()),
                    ..Default::default()
                }
            )
            .is_err(),
            "label {bad:?} accepted"
        );
    }
}

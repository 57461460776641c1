//! `spec/vectors/token.json`: generated deterministically (fixed root seed, fixed next-key
//! seeds; ed25519 signatures are deterministic), committed, and checked two ways:
//! regenerating must reproduce the committed file exactly, and the committed keys must
//! verify, inspect and authorize as the file says.
//!
//! `TILL_REGEN_VECTORS=1 cargo test -p till-token --test vectors` rewrites the file.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use biscuit_auth::format::schema;
use biscuit_auth::{Biscuit, UnverifiedBiscuit};
use common::*;
use prost::Message as _;
use serde_json::{json, Value};
use std::collections::BTreeMap;

use till_token::{
    inspect, key_digest, mint, verify, AuthorizeError, CallFacts, Caveats, JsonFact, KeyRing,
    Limits, RequestFacts, RootPublicKey, Token, TokenError, Window,
};

const VECTORS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../spec/vectors/token.json");

/// A request of a vector, with the counts the ledger would supply (`None` = scope only).
struct Req {
    upstream: &'static str,
    method: &'static str,
    path: &'static str,
    model: Option<&'static str>,
    now: i64,
    counts: Option<Vec<u64>>,
    /// Per-call facts (spec/token.md §14); absent from the vector when `None`.
    call: Option<CallFacts>,
}

const NOW: i64 = 1_700_000_000;

fn req(method: &'static str, path: &'static str, model: Option<&'static str>) -> Req {
    Req {
        upstream: "openai",
        method,
        path,
        model,
        now: NOW,
        counts: None,
        call: None,
    }
}

impl Req {
    fn upstream(mut self, u: &'static str) -> Self {
        self.upstream = u;
        self
    }
    fn at(mut self, now: i64) -> Self {
        self.now = now;
        self
    }
    fn counts(mut self, c: &[u64]) -> Self {
        self.counts = Some(c.to_vec());
        self
    }
    fn call(mut self, c: CallFacts) -> Self {
        self.call = Some(c);
        self
    }
    fn call_facts(&self) -> CallFacts {
        self.call.clone().unwrap_or_default()
    }
    fn facts(&self) -> RequestFacts<'_> {
        RequestFacts {
            upstream: self.upstream,
            method: self.method,
            path: self.path,
            model: self.model,
            now: self.now,
        }
    }
}

struct ValidCase {
    name: &'static str,
    description: &'static str,
    /// Indices of attenuation blocks written without a declaration (spec/token.md §13).
    undeclared: &'static [usize],
    chain: Vec<Caveats>,
    requests: Vec<Req>,
}

fn full_authority() -> Caveats {
    Caveats {
        upstream: Some("openai".into()),
        methods: strings(&["post", "GET"]),
        paths: strings(&["/v1/embeddings/", "/v1/chat"]),
        models: strings(&["gpt-4o-mini", "gpt-4o"]),
        expires: Some(2_000_000_000),
        cap: Some(10),
        label: None,
        ..Caveats::default()
    }
}

fn valid_cases() -> Vec<ValidCase> {
    vec![
        ValidCase {
            name: "minimal",
            description: "Authority block naming only the upstream: no other restriction, no cap.",
            undeclared: &[],
            chain: vec![upstream("openai")],
            requests: vec![
                req("GET", "/v1/models", None),
                req("POST", "/v1/messages", None).upstream("anthropic"),
                req("GET", "/v1/models", None).counts(&[1_000_000]),
            ],
        },
        ValidCase {
            name: "authority-full",
            description: "Every caveat in the authority block. Lists given unsorted and in lower case are stored sorted, deduplicated, methods upper-cased.",
            undeclared: &[],
            chain: vec![full_authority()],
            requests: vec![
                req("POST", "/v1/chat/completions", Some("gpt-4o-mini")),
                req("POST", "/v1/chat", Some("gpt-4o")),
                req("POST", "/v1/chatty", Some("gpt-4o")),
                req("POST", "/v1/embeddings", Some("gpt-4o")),
                req("POST", "/v1/embeddings/x", Some("gpt-4o")),
                req("DELETE", "/v1/chat", Some("gpt-4o")),
                req("post", "/v1/chat", Some("gpt-4o")),
                req("POST", "/v1/chat", None),
                req("POST", "/v1/chat", Some("gpt-3.5-turbo")),
                req("POST", "/v1/chat", Some("gpt-4o")).at(2_000_000_000),
                req("POST", "/v1/chat", Some("gpt-4o")).at(2_000_000_001),
                req("POST", "/v1/chat", Some("gpt-4o")).counts(&[10]),
                req("POST", "/v1/chat", Some("gpt-4o")).counts(&[11]),
                req("POST", "/v1/chat", Some("gpt-4o")).counts(&[1, 1]),
            ],
        },
        ValidCase {
            name: "chain-3",
            description: "authority-full, then {cap 5, methods POST}, then {paths /v1/chat/completions, models gpt-4o-mini, expires 1900000000, cap 2}. counts[i] is block i's count after the claim.",
            undeclared: &[],
            chain: vec![
                full_authority(),
                Caveats {
                    cap: Some(5),
                    methods: strings(&["POST"]),
                    ..Caveats::default()
                },
                Caveats {
                    paths: strings(&["/v1/chat/completions"]),
                    models: strings(&["gpt-4o-mini"]),
                    expires: Some(1_900_000_000),
                    cap: Some(2),
                    ..Caveats::default()
                },
            ],
            requests: vec![
                req("POST", "/v1/chat/completions", Some("gpt-4o-mini")),
                req("POST", "/v1/chat/completions", Some("gpt-4o-mini")).counts(&[7, 5, 2]),
                req("POST", "/v1/chat/completions", Some("gpt-4o-mini")).counts(&[7, 5, 3]),
                req("POST", "/v1/chat/completions", Some("gpt-4o-mini")).counts(&[7, 6, 2]),
                req("POST", "/v1/chat/completions", Some("gpt-4o-mini")).counts(&[11, 5, 2]),
                req("GET", "/v1/chat/completions", Some("gpt-4o-mini")),
                req("POST", "/v1/chat/completions", Some("gpt-4o")),
                req("POST", "/v1/chat", Some("gpt-4o-mini")),
                req("POST", "/v1/chat/completions", Some("gpt-4o-mini")).at(1_950_000_000),
            ],
        },
        ValidCase {
            name: "symbol-order",
            description: "List values that Biscuit's default symbol table or an earlier block already interned (\"admin\", \"POST\"). Lists are rendered as alternatives, never as Datalog sets, whose printed order would follow symbol indices. The child asks for more than its parent allows: warnings, and the parent still refuses.",
            undeclared: &[],
            chain: vec![
                Caveats {
                    upstream: Some("openai".into()),
                    methods: strings(&["POST"]),
                    models: strings(&["admin", "abc"]),
                    ..Caveats::default()
                },
                Caveats {
                    methods: strings(&["GET", "POST"]),
                    models: strings(&["zzz", "abc", "admin"]),
                    ..Caveats::default()
                },
            ],
            requests: vec![
                req("POST", "/x", Some("abc")),
                req("POST", "/x", Some("admin")),
                req("GET", "/x", Some("abc")),
                req("POST", "/x", Some("zzz")),
            ],
        },
        ValidCase {
            name: "cap-zero",
            description: "Cap 0: every request is refused, already by the scope-only check (counts = 1).",
            undeclared: &[],
            chain: vec![Caveats {
                upstream: Some("github".into()),
                paths: strings(&["/"]),
                cap: Some(0),
                ..Caveats::default()
            }],
            requests: vec![req("GET", "/repos", None).upstream("github")],
        },
        ValidCase {
            name: "paths-narrowed",
            description: "A prefix ending in / covers what is below it only; the child narrows to /v1/messages (segment-aware) and asks for /v2, which stays refused (warning).",
            undeclared: &[],
            chain: vec![
                Caveats {
                    upstream: Some("anthropic".into()),
                    paths: strings(&["/v1/"]),
                    cap: Some(100),
                    ..Caveats::default()
                },
                Caveats {
                    upstream: Some("anthropic".into()),
                    paths: strings(&["/v1/messages", "/v2"]),
                    ..Caveats::default()
                },
            ],
            requests: vec![
                req("POST", "/v1/messages", None).upstream("anthropic"),
                req("POST", "/v1/messages/batches", None).upstream("anthropic"),
                req("POST", "/v1/messagesx", None).upstream("anthropic"),
                req("POST", "/v1", None).upstream("anthropic"),
                req("POST", "/v2", None).upstream("anthropic"),
                req("POST", "/v1/messages", None)
                    .upstream("anthropic")
                    .counts(&[100, 100]),
                req("POST", "/v1/messages", None)
                    .upstream("anthropic")
                    .counts(&[101, 1]),
            ],
        },
        ValidCase {
            name: "undeclared-blocks",
            description: "Blocks 1 and 2 carry no declaration, as a Biscuit library that cannot set a block's context writes them (spec/token.md §13): each one's Datalog is exactly the canonical rendering of the caveats read back from it, covering every caveat line. Block 3 is an ordinary Till attenuation on top.",
            undeclared: &[1, 2],
            chain: vec![
                Caveats {
                    upstream: Some("openai".into()),
                    paths: strings(&["/v1"]),
                    cap: Some(10),
                    ..Caveats::default()
                },
                Caveats {
                    paths: strings(&["/v1/chat"]),
                    cap: Some(3),
                    ..Caveats::default()
                },
                Caveats {
                    upstream: Some("openai".into()),
                    methods: strings(&["POST", "GET"]),
                    paths: strings(&["/v1/chat/", "/v1/chat/completions"]),
                    models: strings(&["gpt-4o-mini", "gpt-4o"]),
                    expires: Some(1_900_000_000),
                    cap: Some(2),
                    label: None,
                    ..Caveats::default()
                },
                Caveats {
                    cap: Some(1),
                    ..Caveats::default()
                },
            ],
            requests: vec![
                req("POST", "/v1/chat/completions", Some("gpt-4o")),
                req("POST", "/v1/chat/completions", Some("gpt-4o")).counts(&[5, 3, 2, 1]),
                req("POST", "/v1/chat/completions", Some("gpt-4o")).counts(&[5, 4, 2, 1]),
                req("POST", "/v1/chat/completions", Some("gpt-4o")).counts(&[5, 3, 3, 1]),
                req("POST", "/v1/chat/completions", Some("gpt-4o")).counts(&[5, 3, 2, 2]),
                req("POST", "/v1/models", Some("gpt-4o")),
                req("POST", "/v1/chat", Some("gpt-4o")),
                req("POST", "/v1/chat/x", Some("gpt-4o")),
                req("DELETE", "/v1/chat/completions", Some("gpt-4o")),
                req("POST", "/v1/chat/completions", Some("o1")),
                req("POST", "/v1/chat/completions", Some("gpt-4o")).at(1_900_000_001),
            ],
        },
        ValidCase {
            name: "ceilings",
            description: "Per-call ceilings and windowed caps (spec/token.md §14): the authority block caps output tokens at 1024 and allows 100 per minute; block 1 tightens to 256 output tokens, bounds /temperature and allow-lists /model, 10 per minute and 1000 per day; block 2 carries no declaration (§13) and tightens output tokens to 128. Requests carry their per-call facts in `call`.",
            undeclared: &[2],
            chain: vec![
                Caveats {
                    upstream: Some("openai".into()),
                    max_output_tokens: Some(1024),
                    windows: Some(vec![Window { secs: 60, max: 100 }]),
                    ..Caveats::default()
                },
                Caveats {
                    max_output_tokens: Some(256),
                    json_max: Some(BTreeMap::from([("/temperature".to_string(), 1)])),
                    json_allow: Some(BTreeMap::from([(
                        "/model".to_string(),
                        vec!["gpt-4o-mini".to_string(), "gpt-4o".to_string()],
                    )])),
                    windows: Some(vec![
                        Window { secs: 86_400, max: 1000 },
                        Window { secs: 60, max: 10 },
                    ]),
                    ..Caveats::default()
                },
                Caveats {
                    max_output_tokens: Some(128),
                    ..Caveats::default()
                },
            ],
            requests: {
                let call = |t: Option<u64>, temp: Option<JsonFact>, model: Option<&str>| {
                    let mut json = BTreeMap::new();
                    if let Some(v) = temp {
                        json.insert("/temperature".to_string(), v);
                    }
                    if let Some(m) = model {
                        json.insert("/model".to_string(), JsonFact::Str(m.to_string()));
                    }
                    CallFacts {
                        max_output_tokens: t,
                        json,
                        ..CallFacts::default()
                    }
                };
                let r = || req("POST", "/v1/chat/completions", Some("gpt-4o"));
                vec![
                    r().call(call(Some(128), Some(JsonFact::Int(1)), Some("gpt-4o"))),
                    r().call(call(Some(129), Some(JsonFact::Int(1)), Some("gpt-4o"))),
                    r().call(call(Some(257), Some(JsonFact::Int(1)), Some("gpt-4o"))),
                    r().call(call(Some(2048), Some(JsonFact::Int(1)), Some("gpt-4o"))),
                    r().call(call(None, Some(JsonFact::Int(1)), Some("gpt-4o"))),
                    r().call(call(Some(1), Some(JsonFact::Int(2)), Some("gpt-4o"))),
                    r().call(call(Some(1), Some(JsonFact::Str("1".into())), Some("gpt-4o"))),
                    r().call(call(Some(1), None, Some("gpt-4o"))),
                    r().call(call(Some(1), Some(JsonFact::Int(0)), Some("o1"))),
                    r().call(call(Some(1), Some(JsonFact::Int(0)), None)),
                    r(),
                ]
            },
        },
        ValidCase {
            name: "ceilings-stripe",
            description: "Stripe: at most 5000 (minor units) per call, in usd or eur (spec/token.md §14.2), cap 3.",
            undeclared: &[],
            chain: vec![Caveats {
                upstream: Some("stripe".into()),
                amount_max: Some(5000),
                currencies: strings(&["USD", "eur"]),
                cap: Some(3),
                ..Caveats::default()
            }],
            requests: {
                let call = |a: Option<u64>, c: Option<&str>| CallFacts {
                    amount: a,
                    currency: c.map(String::from),
                    ..CallFacts::default()
                };
                let r = || req("POST", "/v1/payment_intents", None).upstream("stripe");
                vec![
                    r().call(call(Some(5000), Some("usd"))),
                    r().call(call(Some(5001), Some("usd"))),
                    r().call(call(Some(1), Some("gbp"))),
                    r().call(call(None, Some("eur"))),
                    r().call(call(Some(1), None)),
                ]
            },
        },
        ValidCase {
            name: "ceilings-github",
            description: "GitHub repository scope (spec/token.md §14.3): the path's /repos/{owner}/{name}, lower-cased, must be listed.",
            undeclared: &[],
            chain: vec![Caveats {
                upstream: Some("github".into()),
                repos: strings(&["Acme/Widgets", "acme/docs"]),
                ..Caveats::default()
            }],
            requests: {
                let call = |r: Option<&str>| CallFacts {
                    repo: r.map(String::from),
                    ..CallFacts::default()
                };
                let r = |p| req("GET", p, None).upstream("github");
                vec![
                    r("/repos/acme/widgets/issues").call(call(Some("acme/widgets"))),
                    r("/repos/acme/secret").call(call(Some("acme/secret"))),
                    r("/user/repos").call(call(None)),
                ]
            },
        },
    ]
}

/// The per-call facts of a vector request, as JSON (spec/token.md §14).
fn call_json(c: &CallFacts) -> Value {
    let json: serde_json::Map<String, Value> = c
        .json
        .iter()
        .map(|(p, v)| {
            let v = match v {
                JsonFact::Int(i) => json!({ "int": i }),
                JsonFact::Str(s) => json!({ "str": s }),
            };
            (p.clone(), v)
        })
        .collect();
    json!({
        "max_output_tokens": c.max_output_tokens,
        "amount": c.amount,
        "currency": c.currency,
        "repo": c.repo,
        "json": json,
    })
}

fn call_from(v: &Value) -> CallFacts {
    if v.is_null() {
        return CallFacts::default();
    }
    CallFacts {
        max_output_tokens: v["max_output_tokens"].as_u64(),
        amount: v["amount"].as_u64(),
        currency: v["currency"].as_str().map(String::from),
        repo: v["repo"].as_str().map(String::from),
        json: v["json"]
            .as_object()
            .map(|m| {
                m.iter()
                    .map(|(p, f)| {
                        let fact = match f["int"].as_i64() {
                            Some(i) => JsonFact::Int(i),
                            None => JsonFact::Str(f["str"].as_str().unwrap().to_string()),
                        };
                        (p.clone(), fact)
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// Builds a vector chain deterministically; vector number `v` picks the next-key seeds.
/// Blocks listed in `undeclared` are appended with their canonical Datalog and no context.
fn build_chain(v: u8, chain: &[Caveats], undeclared: &[usize]) -> Biscuit {
    let mut b = det_mint(ROOT_SEED, &chain[0], &next_keypair(v, 0));
    for (i, c) in chain.iter().enumerate().skip(1) {
        b = if undeclared.contains(&i) {
            let c = c.clone().normalize().unwrap();
            det_raw_append(
                &b,
                &c.block_source(i).unwrap(),
                None,
                &next_keypair(v, i as u8),
            )
        } else {
            det_attenuate(&b, c, &next_keypair(v, i as u8))
        };
    }
    b
}

/// The context each block of a key actually carries (`None`: no declaration).
fn block_contexts(key: &str) -> Vec<Option<String>> {
    block_payloads(key)
        .iter()
        .map(|p| schema::Block::decode(p.as_slice()).unwrap().context)
        .collect()
}

fn outcome(r: Result<(), AuthorizeError>) -> Value {
    match r {
        Ok(()) => json!("ok"),
        Err(AuthorizeError::Refused(refusal)) => json!({
            "code": refusal.code,
            "block": refusal.block,
            "caveat": refusal.caveat,
        }),
        Err(AuthorizeError::Token(e)) => json!({ "error": e.code() }),
        Err(e) => json!({ "error": e.to_string() }),
    }
}

fn valid_vector(v: u8, case: &ValidCase) -> Value {
    let limits = Limits::default();
    let biscuit = build_chain(v, &case.chain, case.undeclared);
    let key = key_string(&biscuit);
    let verified = verify(&key, &ring(), &limits).unwrap();
    let contexts = block_contexts(&key);
    let blocks: Vec<Value> = verified
        .blocks()
        .iter()
        .map(|b| {
            json!({
                "index": b.index,
                "context": contexts[b.index],
                "datalog": biscuit.print_block_source(b.index).unwrap(),
                "revocation_id": hex::encode(&b.revocation_id),
            })
        })
        .collect();
    // Warnings come from the real attenuate (they depend on the caveats only).
    let mut warnings = vec![json!([])];
    let mut token = mint(&root(), case.chain[0].clone()).unwrap();
    for c in &case.chain[1..] {
        let (child, w) = token.attenuate(c.clone()).unwrap();
        warnings.push(serde_json::to_value(w).unwrap());
        token = child;
    }
    let requests: Vec<Value> = case
        .requests
        .iter()
        .map(|r| {
            let call = r.call_facts();
            let result = verified.authorize_call(&r.facts(), &call, r.counts.as_deref(), &limits);
            let ones = vec![1; case.chain.len()];
            let counts = r.counts.clone().unwrap_or(ones);
            let datalog =
                match verified.authorize_datalog_only_call(&r.facts(), &call, &counts, &limits) {
                    Ok(()) => json!("ok"),
                    Err(AuthorizeError::Refused(refusal)) => json!({ "block": refusal.block }),
                    Err(AuthorizeError::Token(e)) => json!({ "error": e.code() }),
                    Err(e) => json!({ "error": e.to_string() }),
                };
            let mut out = json!({
                "upstream": r.upstream,
                "method": r.method,
                "path": r.path,
                "model": r.model,
                "now": r.now,
                "counts": r.counts,
                "authorize": outcome(result),
                "datalog_only": datalog,
            });
            if let Some(c) = &r.call {
                out["call"] = call_json(c);
            }
            out
        })
        .collect();
    json!({
        "name": case.name,
        "description": case.description,
        "key": key,
        "key_digest": hex::encode(key_digest(&key)),
        "blocks": blocks,
        "attenuation_warnings": warnings,
        "inspection": serde_json::to_value(inspect(&key, Some(&ring()), &limits).unwrap()).unwrap(),
        "requests": requests,
    })
}

/// Negative vectors: (name, description, key). The expected code is what `verify` says.
fn invalid_keys() -> Vec<(&'static str, &'static str, String)> {
    let open = upstream("openai");
    let open_ctx = open.clone().normalize().unwrap().context().unwrap();
    let open_src = open.block_source(0).unwrap();
    let chain3 = key_string(&build_chain(3, &valid_cases()[2].chain, &[]));
    let nk = |i: u8| next_keypair(100, i);
    let mut out = Vec::new();

    out.push((
        "missing-prefix",
        "The base64url body without `till_`.",
        chain3[5..].to_string(),
    ));
    out.push((
        "bad-base64",
        "Characters outside base64url.",
        "till_not+base64/at@all".to_string(),
    ));
    out.push((
        "padded-base64",
        "Padding is not part of the string form.",
        format!("{chain3}=="),
    ));
    out.push(("empty", "Nothing after the prefix.", "till_".to_string()));
    out.push((
        "not-a-biscuit",
        "Valid base64url of bytes that are not a Biscuit.",
        key_from_bytes(b"hello, world"),
    ));
    out.push((
        "truncated",
        "The last 8 characters removed.",
        chain3[..chain3.len() - 8].to_string(),
    ));

    let mut c = container(&chain3);
    c.authority.signature[0] ^= 0x01;
    out.push((
        "tampered-signature",
        "One bit of the authority block's signature flipped.",
        encode_container(&c),
    ));

    let mut c = container(&chain3);
    let needle = b"\"cap\":10";
    let at = c
        .authority
        .block
        .windows(needle.len())
        .position(|w| w == needle)
        .unwrap();
    c.authority.block[at + 6..at + 8].copy_from_slice(b"99");
    out.push((
        "forged-cap-declaration",
        "The authority block's declaration edited from cap 10 to cap 99 (same length).",
        encode_container(&c),
    ));

    let mut c = container(&chain3);
    c.blocks.swap(0, 1);
    out.push((
        "reordered-blocks",
        "Blocks 1 and 2 swapped.",
        encode_container(&c),
    ));

    let mut c = container(&chain3);
    c.blocks.pop();
    out.push((
        "removed-last-block",
        "The last attenuation block dropped (to escape its cap): the proof no longer matches.",
        encode_container(&c),
    ));

    out.push((
        "unknown-root",
        "Minted by a root key the verifier does not trust.",
        key_string(&det_mint(OTHER_ROOT_SEED, &open, &nk(0))),
    ));

    let mut c = container(&key_string(&det_mint(OTHER_ROOT_SEED, &open, &nk(1))));
    c.root_key_id = Some(root().id());
    out.push((
        "root-id-rewritten",
        "Minted by an untrusted root key, root key id rewritten to the trusted one.",
        encode_container(&c),
    ));

    let mut c = container(&key_string(&det_mint(ROOT_SEED, &open, &nk(2))));
    c.root_key_id = None;
    out.push((
        "no-root-key-id",
        "The root key id removed: unknown ids fail closed.",
        encode_container(&c),
    ));

    out.push((
        "extra-fact",
        "A canonical authority block plus a fact.",
        key_string(&det_raw_mint(
            ROOT_SEED,
            &format!("{open_src}user(\"alice\");"),
            Some(open_ctx.clone()),
            &nk(3),
        )),
    ));

    let mut facts = open_src.clone();
    for i in 0..300 {
        facts.push_str(&format!("f({i});"));
    }
    out.push((
        "many-facts",
        "300 facts in the authority block: refused as non-canonical before any Datalog runs.",
        key_string(&det_raw_mint(
            ROOT_SEED,
            &facts,
            Some(open_ctx.clone()),
            &nk(4),
        )),
    ));

    let parent = det_mint(ROOT_SEED, &open, &nk(5));
    let cap5 = Caveats {
        cap: Some(5),
        ..Caveats::default()
    };
    let cap5_ctx = cap5.context().unwrap();
    out.push((
        "rule-fakes-count",
        "A child block with its cap check and a rule deriving its own activation count.",
        key_string(&det_raw_append(
            &parent,
            &format!(
                "{}till_activation(1, 1) <- till_upstream($u);",
                cap5.block_source(1).unwrap()
            ),
            Some(cap5_ctx.clone()),
            &nk(6),
        )),
    ));

    let mut deep = cap5.block_source(1).unwrap();
    for i in 0..40 {
        deep.push_str(&format!("r{}($x) <- r{i}($x);", i + 1));
    }
    out.push((
        "deep-rules",
        "A child block with a 40-rule chain.",
        key_string(&det_raw_append(
            &parent,
            &deep,
            Some(cap5_ctx.clone()),
            &nk(7),
        )),
    ));

    out.push((
        "extra-check",
        "A canonical child block plus `check if true`.",
        key_string(&det_raw_append(
            &parent,
            &format!("{}check if true;", cap5.block_source(1).unwrap()),
            Some(cap5_ctx.clone()),
            &nk(8),
        )),
    ));

    out.push((
        "declaration-not-enforced",
        "A child block declaring cap 5 without the cap check.",
        key_string(&det_raw_append(
            &parent,
            "check if till_method(\"POST\");",
            Some(cap5_ctx.clone()),
            &nk(9),
        )),
    ));

    out.push((
        "cap-names-other-block",
        "A child block whose cap check names block 0's count instead of its own.",
        key_string(&det_raw_append(
            &parent,
            &cap5.block_source(0).unwrap(),
            Some(cap5_ctx.clone()),
            &nk(10),
        )),
    ));

    out.push((
        "no-declaration",
        "An authority block with canonical checks but no context: the authority block is minted by Till and must carry its declaration (a later block may omit it, §13).",
        key_string(&det_raw_mint(ROOT_SEED, &open_src, None, &nk(11))),
    ));

    out.push((
        "declaration-not-canonical",
        "A declaration with a space in its JSON.",
        key_string(&det_raw_append(
            &parent,
            &cap5.block_source(1).unwrap(),
            Some("till:v1:{\"cap\": 5}".into()),
            &nk(12),
        )),
    ));

    out.push((
        "declaration-unknown-caveat",
        "A declaration with a caveat Till does not know.",
        key_string(&det_raw_append(
            &parent,
            &cap5.block_source(1).unwrap(),
            Some("till:v1:{\"cap\":5,\"rate\":1}".into()),
            &nk(13),
        )),
    ));

    let post = Caveats {
        methods: strings(&["POST", "GET"]),
        ..Caveats::default()
    }
    .normalize()
    .unwrap();
    out.push((
        "set-rendering",
        "Methods written as a Datalog set instead of alternatives.",
        key_string(&det_raw_append(
            &parent,
            "check if till_method($m), {\"GET\", \"POST\"}.contains($m);",
            Some(post.context().unwrap()),
            &nk(14),
        )),
    ));

    out.push((
        "block-scope",
        "A canonical child block with a block-level `trusting previous` scope.",
        key_string(&det_append_with_scope(&parent, &cap5, &nk(15))),
    ));

    out.push((
        "third-party-block",
        "A canonical child block appended as a third-party block.",
        key_string(&det_append_third_party(
            &parent,
            &cap5,
            &keypair([0x33; 32]),
            nk(16),
        )),
    ));

    out.push((
        "upstream-conflict",
        "A child block naming another upstream than the family's.",
        key_string(&det_attenuate(&parent, &upstream("anthropic"), &nk(17))),
    ));

    out.push((
        "authority-without-upstream",
        "An authority block that names no upstream.",
        key_string(&det_mint(ROOT_SEED, &cap5, &nk(18))),
    ));

    // Attenuation blocks without a declaration (§13) whose Datalog is not exactly the
    // canonical rendering of the caveats it expresses.
    let undeclared: [(&str, &str, &str); 12] = [
        (
            "undeclared-reordered-alternatives",
            "No declaration; methods not in sorted order.",
            "check if till_method(\"POST\") or till_method(\"GET\");",
        ),
        (
            "undeclared-reordered-lines",
            "No declaration; the cap line before the path line.",
            "check if till_activation(1, $n), $n <= 5; check if till_path($p), $p == \"/v1\" || $p.starts_with(\"/v1/\");",
        ),
        (
            "undeclared-cap-names-other-block",
            "No declaration; block 1's cap check names block 0's count.",
            "check if till_activation(0, $n), $n <= 5;",
        ),
        (
            "undeclared-unknown-predicate",
            "No declaration; a check on a predicate outside Till's vocabulary.",
            "check if till_rate(5);",
        ),
        (
            "undeclared-fact",
            "No declaration; a canonical cap check plus a fact faking the block's count.",
            "check if till_activation(1, $n), $n <= 5; till_activation(1, 0);",
        ),
        (
            "undeclared-rule",
            "No declaration; a canonical cap check plus a rule.",
            "check if till_activation(1, $n), $n <= 5; till_activation(1, 0) <- till_upstream($u);",
        ),
        (
            "undeclared-set-rendering",
            "No declaration; methods as a Datalog set.",
            "check if till_method($m), {\"GET\", \"POST\"}.contains($m);",
        ),
        (
            "undeclared-equivalent-comparison",
            "No declaration; `$n < 6` means the same as the canonical `$n <= 5` but is not it.",
            "check if till_activation(1, $n), $n < 6;",
        ),
        (
            "undeclared-path-form",
            "No declaration; a plain starts_with for a prefix not ending in / (not segment-aware).",
            "check if till_path($p), $p.starts_with(\"/v1\");",
        ),
        (
            "undeclared-check-all",
            "No declaration; `check all` instead of `check if`.",
            "check all till_activation(1, $n), $n <= 5;",
        ),
        (
            "undeclared-other-upstream",
            "No declaration; a canonical upstream line naming another upstream than the family's.",
            "check if till_upstream(\"anthropic\");",
        ),
        (
            "undeclared-empty",
            "No declaration and no checks: restricts nothing.",
            "",
        ),
    ];
    for (i, (name, description, source)) in undeclared.into_iter().enumerate() {
        out.push((
            name,
            description,
            key_string(&det_raw_append(&parent, source, None, &nk(41 + i as u8))),
        ));
    }

    let mut many = det_mint(
        ROOT_SEED,
        &Caveats {
            cap: Some(1000),
            ..open.clone()
        },
        &nk(19),
    );
    for i in 1..17u8 {
        many = det_attenuate(
            &many,
            &Caveats {
                cap: Some(1000 - u64::from(i)),
                ..Caveats::default()
            },
            &nk(19 + i),
        );
    }
    out.push((
        "too-many-blocks",
        "17 canonical blocks; the limit is 16.",
        key_string(&many),
    ));

    let big = format!("{open_src}blob(\"{}\");", "x".repeat(9 * 1024));
    out.push((
        "too-large",
        "A 9 KiB key (a large fact); the limit is 8 KiB decoded, checked before decoding.",
        key_string(&det_raw_mint(ROOT_SEED, &big, Some(open_ctx), &nk(40))),
    ));
    out
}

fn generate() -> Value {
    let root = root();
    let valid: Vec<Value> = valid_cases()
        .iter()
        .enumerate()
        .map(|(i, c)| valid_vector(i as u8 + 1, c))
        .collect();
    let invalid: Vec<Value> = invalid_keys()
        .into_iter()
        .map(|(name, description, key)| {
            let code = verify(&key, &ring(), &Limits::default())
                .unwrap_err()
                .code();
            json!({ "name": name, "description": description, "key": key, "code": code })
        })
        .collect();
    let limits = Limits::default();
    json!({
        "description": "Till key test vectors (spec/token.md). Deterministic: root key from a fixed seed, each block's next key pair from a fixed seed (mint and attenuate use random ones, which change only signatures and next keys, never block payloads). The seeds are for tests only.",
        "root": {
            "seed_hex": hex::encode(ROOT_SEED),
            "public_key_hex": root.public().to_hex(),
            "root_key_id": root.id(),
            "public_jwk": serde_json::from_str::<Value>(&root.public().to_jwk()).unwrap(),
        },
        "untrusted_root": {
            "seed_hex": hex::encode(OTHER_ROOT_SEED),
            "root_key_id": other_root().id(),
        },
        "limits": {
            "max_token_bytes": limits.max_token_bytes,
            "max_blocks": limits.max_blocks,
            "max_facts": limits.max_facts,
            "max_iterations": limits.max_iterations,
            "max_time_ms": limits.max_time.as_millis() as u64,
        },
        "valid": valid,
        "invalid": invalid,
    })
}

fn committed() -> Value {
    let text = std::fs::read_to_string(VECTORS)
        .unwrap_or_else(|e| panic!("{VECTORS}: {e}; run with TILL_REGEN_VECTORS=1 to create it"));
    serde_json::from_str(&text).unwrap()
}

#[test]
fn regenerating_reproduces_the_committed_file() {
    let generated = generate();
    let text = format!("{}\n", serde_json::to_string_pretty(&generated).unwrap());
    if std::env::var_os("TILL_REGEN_VECTORS").is_some_and(|v| v == "1") {
        std::fs::write(VECTORS, &text).unwrap();
        return;
    }
    let on_disk = std::fs::read_to_string(VECTORS)
        .unwrap_or_else(|e| panic!("{VECTORS}: {e}; run with TILL_REGEN_VECTORS=1 to create it"));
    if on_disk != text {
        let line = on_disk
            .lines()
            .zip(text.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(0);
        panic!(
            "spec/vectors/token.json is out of date (first difference at line {}):\n  committed: {}\n  generated: {}\nIf the format change is intended, rerun with TILL_REGEN_VECTORS=1 and update spec/token.md.",
            line + 1,
            on_disk.lines().nth(line).unwrap_or(""),
            text.lines().nth(line).unwrap_or(""),
        );
    }
}

fn req_from(v: &Value) -> (RequestFacts<'_>, Option<Vec<u64>>) {
    let facts = RequestFacts {
        upstream: v["upstream"].as_str().unwrap(),
        method: v["method"].as_str().unwrap(),
        path: v["path"].as_str().unwrap(),
        model: v["model"].as_str(),
        now: v["now"].as_i64().unwrap(),
    };
    let counts = v["counts"]
        .as_array()
        .map(|a| a.iter().map(|n| n.as_u64().unwrap()).collect());
    (facts, counts)
}

/// Reads the committed file the way another implementation would, independent of how it
/// was generated.
#[test]
fn committed_vectors_hold() {
    let vectors = committed();
    let limits = Limits::default();
    let public = RootPublicKey::from_jwk(&vectors["root"]["public_jwk"].to_string()).unwrap();
    assert_eq!(
        u64::from(public.id()),
        vectors["root"]["root_key_id"].as_u64().unwrap()
    );
    assert_eq!(
        public.to_hex(),
        vectors["root"]["public_key_hex"].as_str().unwrap()
    );
    let keys = KeyRing::with(public);

    let valid = vectors["valid"].as_array().unwrap();
    assert!(valid.len() >= 6);
    for v in valid {
        let name = v["name"].as_str().unwrap();
        let key = v["key"].as_str().unwrap();
        assert_eq!(
            hex::encode(key_digest(key)),
            v["key_digest"].as_str().unwrap()
        );
        let verified = verify(key, &keys, &limits).unwrap_or_else(|e| panic!("{name}: {e}"));
        let unverified = UnverifiedBiscuit::from(key_bytes(key)).unwrap();
        let blocks = v["blocks"].as_array().unwrap();
        assert_eq!(blocks.len(), verified.blocks().len(), "{name}");
        for (b, info) in blocks.iter().zip(verified.blocks()) {
            let i = b["index"].as_u64().unwrap() as usize;
            // A block carries its declaration, or (§13) is read back from its Datalog.
            let caveats = match b["context"].as_str() {
                Some(context) => Caveats::from_context(context).unwrap(),
                None => Caveats::from_block_source(b["datalog"].as_str().unwrap(), i).unwrap(),
            };
            // The committed Datalog is the rendering of the committed declaration...
            assert_eq!(
                caveats.block_source(i).unwrap(),
                b["datalog"].as_str().unwrap(),
                "{name} block {i}"
            );
            // ...and what the key carries.
            assert_eq!(
                unverified.print_block_source(i).unwrap(),
                b["datalog"].as_str().unwrap()
            );
            assert_eq!(info.caveats, caveats);
            assert_eq!(
                hex::encode(&info.revocation_id),
                b["revocation_id"].as_str().unwrap()
            );
        }
        let inspection = serde_json::to_value(inspect(key, Some(&keys), &limits).unwrap()).unwrap();
        assert_eq!(inspection, v["inspection"], "{name}");
        let unchecked = serde_json::to_value(inspect(key, None, &limits).unwrap()).unwrap();
        assert_eq!(unchecked["blocks"], v["inspection"]["blocks"], "{name}");
        assert_eq!(unchecked["signature"]["status"], "unchecked");
        for r in v["requests"].as_array().unwrap() {
            let (facts, counts) = req_from(r);
            let call = call_from(&r["call"]);
            let got = outcome(verified.authorize_call(&facts, &call, counts.as_deref(), &limits));
            assert_eq!(got, r["authorize"], "{name}: {r}");
            // The Datalog layer alone reaches the same verdict (and names the same block).
            let n = verified.blocks().len();
            let counts = counts.unwrap_or_else(|| vec![1; n]);
            let datalog = verified.authorize_datalog_only_call(&facts, &call, &counts, &limits);
            match (&r["authorize"], datalog) {
                (Value::String(ok), Ok(())) => assert_eq!(ok, "ok"),
                (a, Err(AuthorizeError::Refused(refusal))) => {
                    assert_eq!(refusal.code, "key_check_failed");
                    assert_eq!(
                        Some(refusal.block as u64),
                        a["block"].as_u64(),
                        "{name}: {r}"
                    );
                }
                (a, Err(AuthorizeError::Token(e))) => assert_eq!(a["error"], e.code()),
                (a, d) => panic!("{name}: {r}: authorize {a} but datalog {d:?}"),
            }
        }
    }

    let invalid = vectors["invalid"].as_array().unwrap();
    assert!(invalid.len() >= 25);
    for v in invalid {
        let name = v["name"].as_str().unwrap();
        let err = verify(v["key"].as_str().unwrap(), &keys, &limits).unwrap_err();
        assert_eq!(err.code(), v["code"].as_str().unwrap(), "{name}: {err}");
    }
}

/// The expected codes of the negative vectors, stated here rather than only recorded, so a
/// regeneration cannot silently change what a forgery is refused with.
#[test]
fn negative_vectors_have_the_documented_codes() {
    let expected = [
        ("missing-prefix", "key_malformed"),
        ("bad-base64", "key_malformed"),
        ("padded-base64", "key_malformed"),
        ("empty", "key_malformed"),
        ("not-a-biscuit", "key_malformed"),
        ("truncated", "key_malformed"),
        ("tampered-signature", "key_signature_invalid"),
        ("forged-cap-declaration", "key_signature_invalid"),
        ("reordered-blocks", "key_signature_invalid"),
        ("removed-last-block", "key_signature_invalid"),
        ("unknown-root", "key_unknown_root"),
        ("root-id-rewritten", "key_signature_invalid"),
        ("no-root-key-id", "key_unknown_root"),
        ("extra-fact", "key_not_canonical"),
        ("many-facts", "key_not_canonical"),
        ("rule-fakes-count", "key_not_canonical"),
        ("deep-rules", "key_not_canonical"),
        ("extra-check", "key_not_canonical"),
        ("declaration-not-enforced", "key_not_canonical"),
        ("cap-names-other-block", "key_not_canonical"),
        ("no-declaration", "key_not_canonical"),
        ("declaration-not-canonical", "key_not_canonical"),
        ("declaration-unknown-caveat", "key_not_canonical"),
        ("set-rendering", "key_not_canonical"),
        ("block-scope", "key_not_canonical"),
        ("third-party-block", "key_not_canonical"),
        ("upstream-conflict", "key_not_canonical"),
        ("authority-without-upstream", "key_not_canonical"),
        ("undeclared-reordered-alternatives", "key_not_canonical"),
        ("undeclared-reordered-lines", "key_not_canonical"),
        ("undeclared-cap-names-other-block", "key_not_canonical"),
        ("undeclared-unknown-predicate", "key_not_canonical"),
        ("undeclared-fact", "key_not_canonical"),
        ("undeclared-rule", "key_not_canonical"),
        ("undeclared-set-rendering", "key_not_canonical"),
        ("undeclared-equivalent-comparison", "key_not_canonical"),
        ("undeclared-path-form", "key_not_canonical"),
        ("undeclared-check-all", "key_not_canonical"),
        ("undeclared-other-upstream", "key_not_canonical"),
        ("undeclared-empty", "key_not_canonical"),
        ("too-many-blocks", "key_too_many_blocks"),
        ("too-large", "key_too_large"),
    ];
    let vectors = committed();
    let invalid = vectors["invalid"].as_array().unwrap();
    assert_eq!(invalid.len(), expected.len());
    for ((name, code), v) in expected.iter().zip(invalid) {
        assert_eq!(v["name"], *name);
        assert_eq!(v["code"], *code, "{name}");
    }
    // Hand-built keys are refused at the structure check, never by a Datalog run: verify
    // does not evaluate Datalog at all, and these fail there.
    for (name, _, key) in invalid_keys() {
        if let Err(TokenError::NotCanonical { .. }) = verify(&key, &ring(), &Limits::default()) {
            assert!(expected
                .iter()
                .any(|(n, c)| *n == name && *c == "key_not_canonical"));
        }
    }
}

/// `mint` and `attenuate` (random next keys) write exactly the vectors' block payloads; an
/// undeclared block (§13) is exactly the block `attenuate` writes, minus its context.
#[test]
fn mint_and_attenuate_write_the_vector_blocks() {
    for (i, case) in valid_cases().iter().enumerate() {
        let vector = key_string(&build_chain(i as u8 + 1, &case.chain, case.undeclared));
        let mut token: Token = mint(&root(), case.chain[0].clone()).unwrap();
        for c in &case.chain[1..] {
            token = token.attenuate(c.clone()).unwrap().0;
        }
        let real = token.to_key_string().unwrap();
        assert_ne!(real, vector, "next keys are random");
        let real_payloads: Vec<Vec<u8>> = block_payloads(&real)
            .into_iter()
            .enumerate()
            .map(|(b, p)| {
                if !case.undeclared.contains(&b) {
                    return p;
                }
                let mut block = schema::Block::decode(p.as_slice()).unwrap();
                assert!(block.context.take().is_some());
                block.encode_to_vec()
            })
            .collect();
        assert_eq!(real_payloads, block_payloads(&vector), "{}", case.name);
        let again = verify(&real, &ring(), &Limits::default()).unwrap();
        assert_eq!(again.root_key_id(), root().id());
    }
}

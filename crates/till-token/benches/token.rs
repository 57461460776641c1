//! Mint, attenuate, parse + verify, authorize, and the pieces of a verified-key cache.
//!
//! `cargo bench -p till-token --bench token -- --warm-up-time 1 --measurement-time 3`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use till_token::{
    attenuate_str, key_digest, mint, verify, CallFacts, Caveats, JsonFact, KeyRing, Limits,
    RequestFacts, RootKey, Token, VerifiedToken, Window,
};

fn authority() -> Caveats {
    Caveats {
        upstream: Some("openai".into()),
        methods: Some(vec!["POST".into(), "GET".into()]),
        paths: Some(vec!["/v1/chat".into(), "/v1/embeddings".into()]),
        models: Some(vec!["gpt-4o".into(), "gpt-4o-mini".into()]),
        expires: Some(2_000_000_000),
        cap: Some(1_000_000),
        label: None,
        ..Caveats::default()
    }
}

fn child(i: usize) -> Caveats {
    Caveats {
        cap: Some(1_000_000 - i as u64),
        paths: Some(vec!["/v1/chat/completions".into()]),
        ..Caveats::default()
    }
}

/// A key with `blocks` blocks: the authority block and `blocks - 1` attenuations.
fn chain(root: &RootKey, blocks: usize) -> Token {
    let mut t = mint(root, authority()).unwrap();
    for i in 1..blocks {
        t = t.attenuate(child(i)).unwrap().0;
    }
    t
}

const REQ: RequestFacts<'static> = RequestFacts {
    upstream: "openai",
    method: "POST",
    path: "/v1/chat/completions",
    model: Some("gpt-4o-mini"),
    now: 1_700_000_000,
};

fn benches(c: &mut Criterion) {
    let root = RootKey::from_seed(&[9; 32]).unwrap();
    let ring = KeyRing::with(root.public());
    let limits = Limits::default();

    let mut g = c.benchmark_group("token");
    g.throughput(Throughput::Elements(1));
    g.bench_function("mint", |b| {
        b.iter(|| mint(&root, black_box(authority())).unwrap())
    });
    let one = chain(&root, 1);
    g.bench_function("attenuate", |b| {
        b.iter(|| one.attenuate(black_box(child(1))).unwrap())
    });
    let one_str = one.to_key_string().unwrap();
    g.bench_function("attenuate_str", |b| {
        b.iter(|| attenuate_str(black_box(&one_str), child(1), &limits).unwrap())
    });

    let mut verified: HashMap<usize, VerifiedToken> = HashMap::new();
    for blocks in [1usize, 3, 8] {
        let key = chain(&root, blocks).to_key_string().unwrap();
        // Format drift shows up as a size change (signatures and keys are fixed-size).
        eprintln!("{blocks}-block key: {} chars", key.len());
        g.bench_with_input(BenchmarkId::new("verify", blocks), &key, |b, key| {
            b.iter(|| verify(black_box(key), &ring, &limits).unwrap())
        });
        g.bench_with_input(BenchmarkId::new("key_digest", blocks), &key, |b, key| {
            b.iter(|| key_digest(black_box(key)))
        });
        verified.insert(blocks, verify(&key, &ring, &limits).unwrap());
    }

    for blocks in [1usize, 3, 8] {
        let v = &verified[&blocks];
        let counts: Vec<u64> = (0..blocks as u64).map(|i| 500 + i).collect();
        g.bench_with_input(
            BenchmarkId::new("authorize_scope_only", blocks),
            v,
            |b, v| b.iter(|| v.authorize(black_box(&REQ), None, &limits).unwrap()),
        );
        g.bench_with_input(
            BenchmarkId::new("authorize_with_counts", blocks),
            v,
            |b, v| {
                b.iter(|| {
                    v.authorize(black_box(&REQ), Some(&counts), &limits)
                        .unwrap()
                })
            },
        );
    }

    // Issue 13: the same 3-block chain with a fourth block carrying per-call ceilings
    // (output tokens, a JSON ceiling and allow-list, a windowed cap), authorized with the
    // per-call facts the proxy reads from the body. Compare with authorize_scope_only/3
    // and /8 (the cost of one more block) to see what the new checks add.
    let ceilings = Caveats {
        max_output_tokens: Some(512),
        json_max: Some([("/temperature".to_string(), 1)].into()),
        json_allow: Some([("/model".to_string(), vec!["gpt-4o-mini".to_string()])].into()),
        windows: Some(vec![Window { secs: 60, max: 60 }]),
        ..Caveats::default()
    };
    let with_ceilings = chain(&root, 3).attenuate(ceilings).unwrap().0;
    let with_ceilings = verify(&with_ceilings.to_key_string().unwrap(), &ring, &limits).unwrap();
    let call = CallFacts {
        max_output_tokens: Some(256),
        json: [
            ("/temperature".to_string(), JsonFact::Int(1)),
            ("/model".to_string(), JsonFact::Str("gpt-4o-mini".into())),
        ]
        .into(),
        ..CallFacts::default()
    };
    g.bench_function("authorize_ceilings/3+1", |b| {
        b.iter(|| {
            with_ceilings
                .authorize_call(black_box(&REQ), &call, None, &limits)
                .unwrap()
        })
    });
    let plain4 = verify(&chain(&root, 4).to_key_string().unwrap(), &ring, &limits).unwrap();
    g.bench_function("authorize_scope_only/3+1", |b| {
        b.iter(|| plain4.authorize(black_box(&REQ), None, &limits).unwrap())
    });

    // A verified-key cache hit: digest the presented string, look it up, clone the entry.
    let keys: Vec<String> = (0..1_000)
        .map(|_| chain(&root, 3).to_key_string().unwrap())
        .collect();
    let cache: HashMap<[u8; 32], VerifiedToken> = keys
        .iter()
        .map(|k| (key_digest(k), verify(k, &ring, &limits).unwrap()))
        .collect();
    let probe = keys[517].clone();
    g.bench_function("cache_hit/3", |b| {
        b.iter(|| cache.get(&key_digest(black_box(&probe))).unwrap().clone())
    });
    // The same with the entry behind an `Arc` (no deep clone of the Biscuit).
    let shared: HashMap<[u8; 32], Arc<VerifiedToken>> = cache
        .iter()
        .map(|(k, v)| (*k, Arc::new(v.clone())))
        .collect();
    g.bench_function("cache_hit_arc/3", |b| {
        b.iter(|| Arc::clone(shared.get(&key_digest(black_box(&probe))).unwrap()))
    });
    g.finish();
}

criterion_group!(token, benches);
criterion_main!(token);

//! Invariants over random attenuation chains, requests and counts (bounded: 64 cases each).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::*;
use proptest::prelude::*;
use till_token::{
    attenuate_str, inspect, mint, verify, AuthorizeError, Caveats, EffectiveScope, Limits,
    RequestFacts, Token, VerifiedToken,
};

const METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE"];
const PREFIXES: &[&str] = &[
    "/",
    "/v1",
    "/v1/",
    "/v1/chat",
    "/v1/chat/completions",
    "/v1/chatty",
    "/v1/embeddings",
    "/v2",
];
const MODELS: &[&str] = &["a", "b", "gpt-4o", "admin"];
const EXPIRIES: &[i64] = &[1_000, 2_000, 3_000];

const REQ_METHODS: &[&str] = &["GET", "POST", "PUT", "DELETE", "PATCH", "post"];
const REQ_PATHS: &[&str] = &[
    "/",
    "/v1",
    "/v1/",
    "/v1/chat",
    "/v1/chat/",
    "/v1/chat/completions",
    "/v1/chat/completions/x",
    "/v1/chatty",
    "/v1/embeddings",
    "/v1/embeddings/x",
    "/v2/x",
    "/v3",
];
const REQ_MODELS: &[&str] = &["a", "b", "c", "gpt-4o", "admin"];
const REQ_NOWS: &[i64] = &[0, 999, 1_000, 1_001, 2_000, 2_500, 3_001];

fn subset(pool: &'static [&'static str]) -> impl Strategy<Value = Option<Vec<String>>> {
    prop::option::of(
        prop::sample::subsequence(pool.to_vec(), 1..=pool.len())
            .prop_map(|v| v.into_iter().map(String::from).collect()),
    )
}

/// A random block: any combination of caveats (possibly wider than its parent's).
fn caveats() -> impl Strategy<Value = Caveats> {
    (
        prop::option::of(Just("openai".to_string())),
        subset(METHODS),
        subset(PREFIXES),
        subset(MODELS),
        prop::option::of(prop::sample::select(EXPIRIES)),
        prop::option::of(0u64..6),
    )
        .prop_map(|(upstream, methods, paths, models, expires, cap)| Caveats {
            upstream,
            methods,
            paths,
            models,
            expires,
            cap,
            label: None,
            ..Caveats::default()
        })
}

fn chain() -> impl Strategy<Value = (Caveats, Vec<Caveats>)> {
    (
        caveats(),
        prop::collection::vec(caveats().prop_filter("restricts", |c| !c.is_empty()), 0..5),
    )
        .prop_map(|(authority, rest)| {
            (
                Caveats {
                    upstream: Some("openai".into()),
                    ..authority
                },
                rest,
            )
        })
}

#[derive(Debug, Clone)]
struct Req {
    upstream: &'static str,
    method: &'static str,
    path: &'static str,
    model: Option<&'static str>,
    now: i64,
}

impl Req {
    fn facts(&self) -> RequestFacts<'static> {
        RequestFacts {
            upstream: self.upstream,
            method: self.method,
            path: self.path,
            model: self.model,
            now: self.now,
        }
    }
}

fn request() -> impl Strategy<Value = Req> {
    (
        prop::sample::select(&["openai", "openai", "openai", "anthropic"][..]),
        prop::sample::select(REQ_METHODS),
        prop::sample::select(REQ_PATHS),
        prop::option::of(prop::sample::select(REQ_MODELS)),
        prop::sample::select(REQ_NOWS),
    )
        .prop_map(|(upstream, method, path, model, now)| Req {
            upstream,
            method,
            path,
            model,
            now,
        })
}

/// The verified key at every depth of the chain (index 0 = the minted key).
fn build(authority: &Caveats, rest: &[Caveats]) -> Vec<VerifiedToken> {
    let mut token: Token = mint(&root(), authority.clone()).unwrap();
    let mut out = vec![token.clone()];
    for c in rest {
        token = token.attenuate(c.clone()).unwrap().0;
        out.push(token.clone());
    }
    out.iter()
        .map(|t| verify(&t.to_key_string().unwrap(), &ring(), &Limits::default()).unwrap())
        .collect()
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 64,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// Attenuation never widens: whenever a descendant authorizes a request (with the
    /// counts the ledger would supply for its chain), every ancestor authorizes it too with
    /// the same counts for the blocks they share. The effective cap never rises, and
    /// nothing becomes unrestricted once restricted.
    #[test]
    fn attenuation_never_widens(
        (authority, rest) in chain(),
        reqs in prop::collection::vec(request(), 1..8),
        counts in prop::collection::vec(1u64..8, 5),
    ) {
        let keys = build(&authority, &rest);
        let limits = Limits::default();
        for pair in keys.windows(2) {
            let (parent, child) = (pair[0].scope(), pair[1].scope());
            if let Some(p) = parent.cap {
                prop_assert!(child.cap.is_some_and(|c| c <= p), "{parent:?} -> {child:?}");
            }
            if let Some(p) = parent.expires {
                prop_assert!(child.expires.is_some_and(|c| c <= p));
            }
            for (p, c) in [
                (&parent.methods, &child.methods),
                (&parent.models, &child.models),
                (&parent.paths, &child.paths),
            ] {
                if p.is_some() {
                    prop_assert!(c.is_some());
                }
            }
            prop_assert_eq!(&parent.upstream, &child.upstream);
        }
        for req in &reqs {
            for depth in (1..keys.len()).rev() {
                let child = &keys[depth];
                let parent = &keys[depth - 1];
                let cc = &counts[..=depth];
                let pc = &counts[..depth];
                if child.authorize(&req.facts(), Some(cc), &limits).is_ok() {
                    prop_assert!(parent.authorize(&req.facts(), Some(pc), &limits).is_ok(),
                        "child allows {req:?} with {cc:?} but parent refuses");
                }
                if child.authorize(&req.facts(), None, &limits).is_ok() {
                    prop_assert!(parent.authorize(&req.facts(), None, &limits).is_ok());
                }
            }
        }
    }

    /// The readable scope and the enforced checks agree: `EffectiveScope::allows` plus the
    /// expiry and a cap of at least 1 is exactly the scope-only authorization, and the
    /// Datalog layer alone reaches the same verdict as the pure check for any counts.
    /// Every (method, path, model) of the request grid is tried, so the cases that tell
    /// near-misses apart (`/v1/chatty` against `/v1/chat`) are always reached.
    #[test]
    fn declared_scope_and_enforcement_agree(
        (authority, rest) in chain(),
        now in prop::sample::select(REQ_NOWS),
        counts in prop::collection::vec(0u64..8, 5),
    ) {
        let keys = build(&authority, &rest);
        let limits = Limits::default();
        let key = keys.last().unwrap();
        let scope = key.scope();
        let n = key.blocks().len();
        let ones = vec![1; n];
        let models = REQ_MODELS.iter().map(|m| Some(*m)).chain([None]);
        for model in models {
            for method in REQ_METHODS {
                for path in REQ_PATHS {
                    for upstream in ["openai", "anthropic"] {
                        let f = RequestFacts { upstream, method, path, model, now };
                        let expected = scope.allows(upstream, method, path, model)
                            && scope.expires.is_none_or(|e| now <= e)
                            && scope.cap.is_none_or(|c| c >= 1);
                        let scope_only = key.authorize(&f, None, &limits);
                        prop_assert_eq!(scope_only.is_ok(), expected, "{:?} {:?} {:?}", f, scope, scope_only);

                        // Both the least counts a claim can produce and random ones (which
                        // often hit a cap in the same block and so hide other checks).
                        for c in [&ones[..], &counts[..n]] {
                            let pure = key.authorize(&f, Some(c), &limits);
                            let datalog = key.authorize_datalog_only(&f, c, &limits);
                            match (&pure, &datalog) {
                                (Ok(()), Ok(())) => {}
                                (Err(AuthorizeError::Refused(p)), Err(AuthorizeError::Refused(d))) => {
                                    prop_assert_eq!(p.block, d.block, "{:?} {:?}", p, d);
                                }
                                _ => prop_assert!(false, "pure {pure:?} but datalog {datalog:?} for {f:?} {c:?}"),
                            }
                        }
                    }
                }
            }
        }
    }

    /// Any valid caveat values survive the trip through Datalog text, the Biscuit encoding
    /// and back: the verified blocks are the normalised declarations, and the string form
    /// inspects to the same blocks without a root key.
    #[test]
    fn encoding_round_trips(
        paths in prop::collection::vec("/[a-zA-Z0-9._~!$&'()*+,;=:@-]{1,10}(/[a-z0-9._~!$&'()*+,;=:@-]{1,6}){0,3}/?", 1..4),
        models in prop::collection::vec("[A-Za-z0-9._:/@+-]{1,24}", 1..4),
        methods in prop::collection::vec("[a-zA-Z]{1,16}", 1..4),
        expires in 0i64..253_402_300_799,
        cap in 0u64..=(i64::MAX as u64),
        child_cap in prop::option::of(any::<u64>().prop_map(|c| c >> 1)),
    ) {
        let authority = Caveats {
            upstream: Some("openai".into()),
            methods: Some(methods),
            paths: Some(paths),
            models: Some(models),
            expires: Some(expires),
            cap: Some(cap),
            label: None,
            ..Caveats::default()
        };
        // Some generated paths contain `.`/`..` segments; those are invalid by design.
        let Ok(normalized) = authority.clone().normalize() else { return Ok(()); };
        let token = mint(&root(), authority).unwrap();
        let child = Caveats { cap: child_cap, models: normalized.models.clone(), ..Caveats::default() };
        let (token, _) = if child.is_empty() {
            (token.clone(), vec![])
        } else {
            token.attenuate(child.clone()).unwrap()
        };
        let s = token.to_key_string().unwrap();
        let v = verify(&s, &ring(), &Limits::default()).unwrap();
        prop_assert_eq!(&v.blocks()[0].caveats, &normalized);
        if !child.is_empty() {
            prop_assert_eq!(&v.blocks()[1].caveats, &child.normalize().unwrap());
        }
        let i = inspect(&s, None, &Limits::default()).unwrap();
        prop_assert_eq!(&i.blocks, &v.blocks().to_vec());
        prop_assert_eq!(&i.effective, v.scope());
        prop_assert_eq!(
            EffectiveScope::of(v.blocks().iter().map(|b| &b.caveats)),
            v.scope().clone()
        );
    }

    /// An attenuation block without a declaration (what a stock Biscuit library writes,
    /// spec/token.md §13) reads back from its Datalog as exactly the caveats it renders,
    /// for every caveat combination; at another index, a cap check is refused.
    #[test]
    fn undeclared_block_source_round_trips(c in caveats(), index in 1usize..16, other in 0usize..16) {
        let c = c.normalize().unwrap();
        let src = c.block_source(index).unwrap();
        match Caveats::from_block_source(&src, index) {
            Ok(read) => prop_assert_eq!(&read, &c),
            Err(e) => prop_assert!(c.is_empty(), "{c:?} at {index}: {e}"),
        }
        if other != index && c.cap.is_some() {
            prop_assert!(Caveats::from_block_source(&src, other).is_err());
        }
    }

    /// The same over random values of every grammar (paths, models, methods, dates, caps).
    #[test]
    fn undeclared_block_source_round_trips_any_value(
        paths in prop::option::of(prop::collection::vec("/[a-zA-Z0-9._~!$&'()*+,;=:@-]{1,10}(/[a-z0-9._~!$&'()*+,;=:@-]{1,6}){0,3}/?", 1..4)),
        models in prop::option::of(prop::collection::vec("[A-Za-z0-9._:/@+-]{1,24}", 1..4)),
        methods in prop::option::of(prop::collection::vec("[a-zA-Z]{1,16}", 1..4)),
        upstream in prop::option::of("[a-z][a-z0-9_-]{0,20}"),
        expires in prop::option::of(0i64..253_402_300_799),
        cap in prop::option::of(0u64..=(i64::MAX as u64)),
        index in 1usize..16,
    ) {
        let c = Caveats { upstream, methods, paths, models, expires, cap, label: None, ..Caveats::default() };
        let Ok(c) = c.normalize() else { return Ok(()); };
        prop_assume!(!c.is_empty());
        let src = c.block_source(index).unwrap();
        prop_assert_eq!(Caveats::from_block_source(&src, index).unwrap(), c);
    }

    /// A key whose attenuation blocks carry no declaration (some or all of them, written
    /// with Biscuit's own block builder and no context) verifies to the same blocks, scope
    /// and decisions as the key with declarations, and can be attenuated further.
    #[test]
    fn undeclared_blocks_verify_like_declared(
        (authority, rest) in chain(),
        declared in prop::collection::vec(any::<bool>(), 5),
        reqs in prop::collection::vec(request(), 1..8),
        counts in prop::collection::vec(1u64..8, 6),
    ) {
        let limits = Limits::default();
        let with = build(&authority, &rest);
        let with = with.last().unwrap();
        let mut b = det_mint(ROOT_SEED, &authority, &next_keypair(1, 0));
        for (i, c) in rest.iter().enumerate() {
            let c = c.clone().normalize().unwrap();
            let index = i + 1;
            let context = declared[i].then(|| c.context().unwrap());
            b = det_raw_append(&b, &c.block_source(index).unwrap(), context, &next_keypair(1, index as u8));
        }
        let s = key_string(&b);
        let without = verify(&s, &ring(), &limits).unwrap();
        let caveats = |v: &VerifiedToken| v.blocks().iter().map(|b| b.caveats.clone()).collect::<Vec<_>>();
        prop_assert_eq!(caveats(&without), caveats(with));
        prop_assert_eq!(without.scope(), with.scope());
        let i = inspect(&s, None, &limits).unwrap();
        prop_assert_eq!(&i.blocks, &without.blocks().to_vec());
        let n = without.blocks().len();
        for req in &reqs {
            for c in [None, Some(&counts[..n])] {
                let a = with.authorize(&req.facts(), c, &limits).map_err(|e| e.to_string());
                let b = without.authorize(&req.facts(), c, &limits).map_err(|e| e.to_string());
                prop_assert_eq!(a, b);
            }
            let d = without.authorize_datalog_only(&req.facts(), &counts[..n], &limits).is_ok();
            prop_assert_eq!(d, without.authorize(&req.facts(), Some(&counts[..n]), &limits).is_ok());
        }
        if n < 16 {
            let (more, _) = attenuate_str(&s, Caveats { cap: Some(1), ..Caveats::default() }, &limits).unwrap();
            let v = verify(&more, &ring(), &limits).unwrap();
            prop_assert_eq!(v.scope().cap, Some(with.scope().cap.map_or(1, |c| c.min(1))));
        }
    }

    /// Flipping any bits of any byte of a key makes it fail verification.
    #[test]
    fn tampering_any_byte_fails(
        (authority, rest) in chain(),
        position in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let keys = build(&authority, &rest);
        let s = keys.last().unwrap().token().to_key_string().unwrap();
        let mut bytes = key_bytes(&s);
        let at = position.index(bytes.len());
        bytes[at] ^= flip;
        let tampered = key_from_bytes(&bytes);
        prop_assert!(verify(&tampered, &ring(), &Limits::default()).is_err(), "byte {at} ^ {flip:#x} accepted");
    }

    /// A key from another root fails closed as unknown; with its root key id rewritten to
    /// a trusted one, its signature fails.
    #[test]
    fn foreign_roots_fail((authority, rest) in chain()) {
        let mut token = mint(&other_root(), authority).unwrap();
        for c in rest {
            token = token.attenuate(c).unwrap().0;
        }
        let s = token.to_key_string().unwrap();
        let limits = Limits::default();
        prop_assert_eq!(verify(&s, &ring(), &limits).unwrap_err().code(), "key_unknown_root");
        let mut c = container(&s);
        c.root_key_id = Some(root().id());
        let rewritten = encode_container(&c);
        prop_assert_eq!(verify(&rewritten, &ring(), &limits).unwrap_err().code(), "key_signature_invalid");
    }
}

/// Every single-bit flip at every byte position of one multi-block key fails verification
/// (exhaustive, not sampled).
#[test]
fn every_bit_flip_of_a_key_fails() {
    let token = mint(
        &root(),
        Caveats {
            upstream: Some("openai".into()),
            methods: Some(vec!["POST".into()]),
            cap: Some(10),
            ..Caveats::default()
        },
    )
    .unwrap();
    let (token, _) = token
        .attenuate(Caveats {
            cap: Some(3),
            paths: Some(vec!["/v1/chat".into()]),
            ..Caveats::default()
        })
        .unwrap();
    let s = token.to_key_string().unwrap();
    let bytes = key_bytes(&s);
    let limits = Limits::default();
    let mut accepted = Vec::new();
    for at in 0..bytes.len() {
        for bit in [0x01u8, 0x80] {
            let mut b = bytes.clone();
            b[at] ^= bit;
            if verify(&key_from_bytes(&b), &ring(), &limits).is_ok() {
                accepted.push((at, bit));
            }
        }
    }
    assert!(
        accepted.is_empty(),
        "{} of {} flips accepted: {accepted:?}",
        accepted.len(),
        bytes.len() * 2
    );
}

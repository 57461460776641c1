//! Per-call ceilings, repository scope, JSON caveats and windowed caps (issue 13): canonical
//! round trips through real Biscuit keys, the pure check and the Datalog agreeing, and
//! attenuation never widening any of them (property tests).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::BTreeMap;

use common::*;
use proptest::prelude::*;
use till_token::{
    attenuate_str, mint, verify, AuthorizeError, CallFacts, CaveatKind, Caveats, JsonFact, Limits,
    RequestFacts, Window,
};

fn every_new_caveat() -> Caveats {
    Caveats {
        max_output_tokens: Some(512),
        amount_max: Some(5000),
        currencies: strings(&["USD", "eur"]),
        repos: strings(&["Acme/Widgets", "acme/docs.site"]),
        json_max: Some(BTreeMap::from([
            ("/max_tokens".to_string(), 256),
            ("/generationConfig/candidateCount".to_string(), 1),
        ])),
        json_allow: Some(BTreeMap::from([(
            "/model".to_string(),
            vec!["gpt-4o-mini".to_string(), "gpt-4o".to_string()],
        )])),
        windows: Some(vec![
            Window {
                secs: 86_400,
                max: 1000,
            },
            Window { secs: 60, max: 60 },
        ]),
        ..Caveats::default()
    }
}

fn req(now: i64) -> RequestFacts<'static> {
    RequestFacts {
        upstream: "openai",
        method: "POST",
        path: "/v1/chat/completions",
        model: None,
        now,
    }
}

fn good_call() -> CallFacts {
    CallFacts {
        max_output_tokens: Some(512),
        amount: Some(5000),
        currency: Some("usd".into()),
        repo: Some("acme/widgets".into()),
        json: BTreeMap::from([
            ("/max_tokens".to_string(), JsonFact::Int(256)),
            (
                "/generationConfig/candidateCount".to_string(),
                JsonFact::Int(1),
            ),
            ("/model".to_string(), JsonFact::Str("gpt-4o".into())),
        ]),
    }
}

fn refusal(r: Result<(), AuthorizeError>) -> Option<(usize, CaveatKind, &'static str)> {
    match r {
        Ok(()) => None,
        Err(AuthorizeError::Refused(r)) => Some((r.block, r.caveat, r.code)),
        Err(e) => panic!("not a refusal: {e}"),
    }
}

#[test]
fn rendering_is_canonical_and_reads_back() {
    let c = every_new_caveat().normalize().unwrap();
    assert_eq!(c.currencies, strings(&["eur", "usd"]));
    assert_eq!(c.repos, strings(&["acme/docs.site", "acme/widgets"]));
    assert_eq!(
        c.windows,
        Some(vec![
            Window { secs: 60, max: 60 },
            Window {
                secs: 86_400,
                max: 1000
            }
        ])
    );
    let src = c.block_source(2).unwrap();
    assert_eq!(
        src,
        "check if till_max_output_tokens($t), $t <= 512;\n\
         check if till_amount($a), $a <= 5000;\n\
         check if till_currency(\"eur\") or till_currency(\"usd\");\n\
         check if till_repo(\"acme/docs.site\") or till_repo(\"acme/widgets\");\n\
         check if till_json_int(\"/generationConfig/candidateCount\", $v), $v <= 1;\n\
         check if till_json_int(\"/max_tokens\", $v), $v <= 256;\n\
         check if till_json_str(\"/model\", \"gpt-4o\") or till_json_str(\"/model\", \"gpt-4o-mini\");\n\
         check if till_window(2, 60, $n), $n <= 60;\n\
         check if till_window(2, 86400, $n), $n <= 1000;\n"
    );
    assert_eq!(Caveats::from_block_source(&src, 2).unwrap(), c);
    let ctx = c.context().unwrap();
    assert_eq!(Caveats::from_context(&ctx).unwrap(), c);
    // Declarations of keys without the new caveats are unchanged (old vectors stay
    // byte-identical): absent members are omitted.
    let old = Caveats {
        cap: Some(3),
        ..Caveats::default()
    };
    assert_eq!(old.context().unwrap(), "till:v1:{\"cap\":3}");

    // Near misses of the new lines are refused.
    let swap_lines = {
        let mut lines: Vec<&str> = src.split_inclusive('\n').collect();
        lines.swap(4, 5);
        lines.concat()
    };
    for bad in [
        src.replace("$t <= 512", "$t < 513"),
        src.replace("till_window(2,", "till_window(1,"),
        src.replace("86400, $n), $n <= 1000", "86401, $n), $n <= 1000"),
        src.replace("$n <= 60;", "$n <= 0;"),
        src.replace("\"eur\"", "\"EUR\""),
        src.replace("acme/widgets", "Acme/widgets"),
        src.replace(
            "till_json_str(\"/model\", \"gpt-4o\") or till_json_str(\"/model\", \"gpt-4o-mini\")",
            "till_json_str(\"/model\", \"gpt-4o-mini\") or till_json_str(\"/model\", \"gpt-4o\")",
        ),
        src.replace(
            "till_json_str(\"/model\", \"gpt-4o\") or",
            "till_json_str(\"/x\", \"gpt-4o\") or",
        ),
        src.replace("/max_tokens", "/max tokens"),
        swap_lines,
        format!("{src}check if till_window(2, 60, $n), $n <= 5;\n"),
    ] {
        assert_ne!(bad, src);
        assert!(
            Caveats::from_block_source(&bad, 2).is_err(),
            "accepted:\n{bad}"
        );
    }
    // Normalisation refusals.
    for bad in [
        Caveats {
            windows: Some(vec![Window { secs: 61, max: 1 }]),
            ..Caveats::default()
        },
        Caveats {
            windows: Some(vec![Window { secs: 60, max: 0 }]),
            ..Caveats::default()
        },
        Caveats {
            currencies: strings(&["dollars"]),
            ..Caveats::default()
        },
        Caveats {
            repos: strings(&["no-slash"]),
            ..Caveats::default()
        },
        Caveats {
            json_max: Some(BTreeMap::from([("max_tokens".to_string(), 1)])),
            ..Caveats::default()
        },
        Caveats {
            json_allow: Some(BTreeMap::from([("/model".to_string(), vec![])])),
            ..Caveats::default()
        },
        Caveats {
            max_output_tokens: Some(u64::MAX),
            ..Caveats::default()
        },
    ] {
        assert!(bad.normalize().is_err());
    }
}

#[test]
fn real_keys_carry_and_enforce_every_new_caveat() {
    let root = root();
    let key = mint(
        &root,
        Caveats {
            upstream: Some("openai".into()),
            max_output_tokens: Some(1024),
            ..Caveats::default()
        },
    )
    .unwrap();
    let (child, warnings) = key.attenuate(every_new_caveat()).unwrap();
    assert!(warnings.is_empty());
    let s = child.to_key_string().unwrap();
    let v = verify(&s, &ring(), &Limits::default()).unwrap();
    assert_eq!(v.scope().max_output_tokens, Some(512));
    let limits = Limits::default();
    let ok = good_call();
    assert_eq!(refusal(v.authorize_call(&req(0), &ok, None, &limits)), None);
    // Each caveat refuses alone, naming its block and kind; the Datalog refuses too.
    let cases: Vec<(CallFacts, usize, CaveatKind, &str)> = vec![
        (
            CallFacts {
                max_output_tokens: None,
                ..ok.clone()
            },
            0,
            CaveatKind::MaxOutputTokens,
            "max_output_tokens_required",
        ),
        (
            CallFacts {
                max_output_tokens: Some(2000),
                ..ok.clone()
            },
            0,
            CaveatKind::MaxOutputTokens,
            "max_output_tokens_exceeded",
        ),
        (
            CallFacts {
                max_output_tokens: Some(513),
                ..ok.clone()
            },
            1,
            CaveatKind::MaxOutputTokens,
            "max_output_tokens_exceeded",
        ),
        (
            CallFacts {
                amount: Some(5001),
                ..ok.clone()
            },
            1,
            CaveatKind::Amount,
            "amount_exceeded",
        ),
        (
            CallFacts {
                amount: None,
                ..ok.clone()
            },
            1,
            CaveatKind::Amount,
            "amount_required",
        ),
        (
            CallFacts {
                currency: Some("gbp".into()),
                ..ok.clone()
            },
            1,
            CaveatKind::Currencies,
            "currency_not_allowed",
        ),
        (
            CallFacts {
                repo: Some("acme/secret".into()),
                ..ok.clone()
            },
            1,
            CaveatKind::Repos,
            "repo_not_allowed",
        ),
        (
            CallFacts {
                repo: None,
                ..ok.clone()
            },
            1,
            CaveatKind::Repos,
            "repo_not_allowed",
        ),
        (
            {
                let mut c = ok.clone();
                c.json.insert("/max_tokens".into(), JsonFact::Int(257));
                c
            },
            1,
            CaveatKind::JsonMax,
            "json_field_exceeded",
        ),
        (
            {
                let mut c = ok.clone();
                c.json
                    .insert("/max_tokens".into(), JsonFact::Str("1".into()));
                c
            },
            1,
            CaveatKind::JsonMax,
            "json_field_required",
        ),
        (
            {
                let mut c = ok.clone();
                c.json.insert("/model".into(), JsonFact::Str("o1".into()));
                c
            },
            1,
            CaveatKind::JsonAllow,
            "json_field_not_allowed",
        ),
        (
            {
                let mut c = ok.clone();
                c.json.remove("/model");
                c
            },
            1,
            CaveatKind::JsonAllow,
            "json_field_required",
        ),
    ];
    for (call, block, kind, code) in cases {
        assert_eq!(
            refusal(v.authorize_call(&req(0), &call, None, &limits)),
            Some((block, kind, code)),
            "{code}"
        );
        let datalog = v.authorize_datalog_only_call(&req(0), &call, &[1, 1], &limits);
        assert!(
            matches!(datalog, Err(AuthorizeError::Refused(ref r)) if r.block == block),
            "datalog for {code}: {datalog:?}"
        );
    }
    assert!(v
        .authorize_datalog_only_call(&req(0), &ok, &[1, 1], &limits)
        .is_ok());
    // Without per-call facts (the old entry point) a key with ceilings refuses: fail
    // closed.
    assert!(v.authorize(&req(0), None, &limits).is_err());
}

#[test]
fn undeclared_block_with_new_caveats_is_accepted() {
    // What a stock Biscuit library writes: the same Datalog, no context.
    let root_seed = [0x11; 32];
    let parent = det_mint(root_seed, &upstream("github"), &next_keypair(200, 0));
    let c = Caveats {
        repos: strings(&["acme/widgets"]),
        windows: Some(vec![Window {
            secs: 3600,
            max: 10,
        }]),
        ..Caveats::default()
    }
    .normalize()
    .unwrap();
    let child = det_raw_append(
        &parent,
        &c.block_source(1).unwrap(),
        None,
        &next_keypair(200, 1),
    );
    let v = verify(&key_string(&child), &ring(), &Limits::default()).unwrap();
    assert_eq!(v.blocks()[1].caveats, c);
    assert_eq!(
        v.scope().windows,
        Some(vec![Window {
            secs: 3600,
            max: 10
        }])
    );
}

const CEILINGS: &[u64] = &[0, 1, 100, 512, 4096];
const CURRENCIES: &[&str] = &["eur", "gbp", "usd"];
const REPOS: &[&str] = &["a/x", "a/y", "b/x"];

fn strategy_subset(pool: &'static [&'static str]) -> impl Strategy<Value = Option<Vec<String>>> {
    prop::option::of(
        prop::sample::subsequence(pool.to_vec(), 1..=pool.len())
            .prop_map(|v| v.into_iter().map(String::from).collect()),
    )
}

fn new_caveats() -> impl Strategy<Value = Caveats> {
    (
        prop::option::of(prop::sample::select(CEILINGS)),
        prop::option::of(prop::sample::select(CEILINGS)),
        strategy_subset(CURRENCIES),
        strategy_subset(REPOS),
        prop::option::of(prop::sample::select(CEILINGS)),
        prop::option::of(strategy_subset(&["m1", "m2", "m3"]).prop_filter_map("some", |v| v)),
        prop::option::of((prop::sample::select(&[60u64, 3600, 86_400][..]), 1u64..5)),
    )
        .prop_map(
            |(mot, amount, currencies, repos, jmax, jallow, window)| Caveats {
                max_output_tokens: mot,
                amount_max: amount,
                currencies,
                repos,
                json_max: jmax.map(|n| BTreeMap::from([("/n".to_string(), n)])),
                json_allow: jallow.map(|v| BTreeMap::from([("/m".to_string(), v)])),
                windows: window.map(|(secs, max)| vec![Window { secs, max }]),
                ..Caveats::default()
            },
        )
        .prop_filter("restricts something", |c| !c.is_empty())
}

fn call_facts() -> impl Strategy<Value = CallFacts> {
    (
        prop::option::of(prop::sample::select(
            &[0u64, 1, 99, 100, 511, 512, 513, 5000][..],
        )),
        prop::option::of(prop::sample::select(&[0u64, 1, 100, 512, 9999][..])),
        prop::option::of(prop::sample::select(&["eur", "gbp", "usd", "jpy"][..])),
        prop::option::of(prop::sample::select(&["a/x", "a/y", "b/x", "c/z"][..])),
        prop::option::of(prop::sample::select(&[-1i64, 0, 1, 100, 512, 4097][..])),
        prop::option::of(prop::sample::select(&["m1", "m2", "m3", "m4"][..])),
    )
        .prop_map(|(mot, amount, cur, repo, n, m)| {
            let mut json = BTreeMap::new();
            if let Some(n) = n {
                json.insert("/n".to_string(), JsonFact::Int(n));
            }
            if let Some(m) = m {
                json.insert("/m".to_string(), JsonFact::Str(m.to_string()));
            }
            CallFacts {
                max_output_tokens: mot,
                amount,
                currency: cur.map(String::from),
                repo: repo.map(String::from),
                json,
            }
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Attenuation never widens: whatever a child block declares, a request the child key
    /// allows is allowed by the parent key, the effective ceilings are the minimum over
    /// blocks and the sets the intersection; the pure check and the Datalog agree; and the
    /// child block reads back from its Datalog alone.
    #[test]
    fn attenuation_never_widens_new_caveats(
        parent in new_caveats(),
        child in new_caveats(),
        call in call_facts(),
    ) {
        let root = root();
        let limits = Limits::default();
        let p = mint(&root, Caveats { upstream: Some("openai".into()), ..parent.clone() }).unwrap();
        let ps = p.to_key_string().unwrap();
        let (cs, _) = attenuate_str(&ps, child.clone(), &limits).unwrap();
        let pv = verify(&ps, &ring(), &limits).unwrap();
        let cv = verify(&cs, &ring(), &limits).unwrap();
        let r = req(0);
        let child_ok = cv.authorize_call(&r, &call, None, &limits).is_ok();
        let parent_ok = pv.authorize_call(&r, &call, None, &limits).is_ok();
        prop_assert!(!child_ok || parent_ok, "child allowed what the parent refuses");
        let datalog_ok = cv.authorize_datalog_only_call(&r, &call, &[1, 1], &limits).is_ok();
        prop_assert_eq!(child_ok, datalog_ok);
        let min = |a: Option<u64>, b: Option<u64>| match (a, b) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let s = cv.scope();
        prop_assert_eq!(s.max_output_tokens, min(parent.max_output_tokens, child.max_output_tokens));
        prop_assert_eq!(s.amount_max, min(parent.amount_max, child.amount_max));
        if let (Some(pc), Some(ec)) = (&pv.scope().currencies, &s.currencies) {
            prop_assert!(ec.iter().all(|c| pc.contains(c)));
        }
        if let (Some(pr), Some(er)) = (&pv.scope().repos, &s.repos) {
            prop_assert!(er.iter().all(|c| pr.contains(c)));
        }
        for w in pv.scope().windows.iter().flatten() {
            let e = s.windows.as_ref().and_then(|ws| ws.iter().find(|x| x.secs == w.secs));
            prop_assert!(e.is_some_and(|e| e.max <= w.max));
        }
        let block = &cv.blocks()[1].caveats;
        let src = block.block_source(1).unwrap();
        prop_assert_eq!(&Caveats::from_block_source(&src, 1).unwrap(), block);
        let ctx = block.context().unwrap();
        prop_assert_eq!(&Caveats::from_context(&ctx).unwrap(), block);
    }
}

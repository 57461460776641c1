//! Bounded cache of verified keys, looked up by the SHA-256 of the key string.
//!
//! Only successful verifications are cached (a flood of garbage keys cannot evict good
//! ones or grow memory). Two generations: lookups hit `hot` then `cold` (and promote);
//! when `hot` is full it becomes `cold` and the old `cold` is dropped, so at most
//! `2 × capacity` entries are held and recently used keys survive. Expiry is not a cache
//! concern: authorization checks it on every request, and revocation and caps live in the
//! ledger.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use till_token::{check_block_call, CallFacts, Caveats, Refusal, RequestFacts, VerifiedToken};

/// A verified key and what the request path derives from it once per key rather than
/// once per call: the cache hands out an `Arc` of it, so a hit clones no Biscuit, no
/// caveat and no string.
#[derive(Debug)]
pub struct VerifiedKey {
    /// The verified key.
    pub token: VerifiedToken,
    /// Each block's caveats without those read from the body (model, ceilings, JSON
    /// fields): what is checked before a byte of the body is read.
    pub before_body: Vec<Caveats>,
    /// Each block's record for the ledger (written the first time a claim shows it).
    pub meta: Arc<Vec<till_ledger::BlockMeta>>,
}

impl VerifiedKey {
    /// Derives the per-key parts once.
    pub fn new(token: VerifiedToken) -> Self {
        let before_body = token
            .blocks()
            .iter()
            .map(|b| Caveats {
                models: None,
                max_output_tokens: None,
                amount_max: None,
                currencies: None,
                json_max: None,
                json_allow: None,
                ..b.caveats.clone()
            })
            .collect();
        let meta = token
            .blocks()
            .iter()
            .map(|b| block_meta(&b.caveats))
            .collect();
        VerifiedKey {
            token,
            before_body,
            meta: Arc::new(meta),
        }
    }
}

/// The authorization of a key found in the cache: the pure check of every block's
/// caveats (`check_block_call`, counts 1), without re-running the Biscuit Datalog.
///
/// Equivalent to `VerifiedToken::authorize_call(req, call, None, _)` for every key
/// `verify` accepts (each block is a Till declaration or exactly its canonical Datalog,
/// so the Datalog states the same checks): same verdict, same refusing block — proven
/// over the token vocabulary by `pure_check_decides_like_datalog` below and by
/// till-token's `declared_scope_and_enforcement_agree`. The Datalog still runs on the
/// first use of every key (the cache miss that verified it).
pub fn pure_authorize(
    token: &VerifiedToken,
    req: &RequestFacts<'_>,
    call: &CallFacts,
) -> Result<(), Refusal> {
    for b in token.blocks() {
        check_block_call(b.index, &b.caveats, req, call, 1)?;
    }
    Ok(())
}

/// A block's caveats as the ledger records them (family records, alert labels).
pub fn block_meta(c: &Caveats) -> till_ledger::BlockMeta {
    till_ledger::BlockMeta {
        label: c.label.clone(),
        upstream: c.upstream.clone(),
        methods: c.methods.clone().unwrap_or_default(),
        paths: c.paths.clone().unwrap_or_default(),
        models: c.models.clone().unwrap_or_default(),
        expires: c.expires.and_then(|e| u64::try_from(e).ok()),
        cap: c.cap,
    }
}

/// The verification cache.
#[derive(Debug)]
pub struct VerifyCache {
    capacity: usize,
    inner: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    hot: HashMap<[u8; 32], Arc<VerifiedKey>>,
    cold: HashMap<[u8; 32], Arc<VerifiedKey>>,
}

impl VerifyCache {
    /// A cache holding up to `2 × capacity` keys (`0` disables caching).
    pub fn new(capacity: usize) -> Self {
        VerifyCache {
            capacity,
            inner: Mutex::new(Generations::default()),
        }
    }

    /// The cached verification of the key with this digest.
    pub fn get(&self, digest: &[u8; 32]) -> Option<Arc<VerifiedKey>> {
        let mut g = self.inner.lock().ok()?;
        if let Some(t) = g.hot.get(digest) {
            return Some(Arc::clone(t));
        }
        let t = g.cold.remove(digest)?;
        self.insert_locked(&mut g, *digest, Arc::clone(&t));
        Some(t)
    }

    /// Remembers a successful verification.
    pub fn insert(&self, digest: [u8; 32], token: Arc<VerifiedKey>) {
        if let Ok(mut g) = self.inner.lock() {
            self.insert_locked(&mut g, digest, token);
        }
    }

    fn insert_locked(&self, g: &mut Generations, digest: [u8; 32], token: Arc<VerifiedKey>) {
        if self.capacity == 0 {
            return;
        }
        if g.hot.len() >= self.capacity {
            g.cold = std::mem::take(&mut g.hot);
        }
        g.hot.insert(digest, token);
    }

    /// Entries currently held.
    pub fn len(&self) -> usize {
        self.inner
            .lock()
            .map(|g| g.hot.len() + g.cold.len())
            .unwrap_or(0)
    }

    /// True when nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use proptest::prelude::*;
    use till_token::{
        mint, verify, AuthorizeError, Caveats, JsonFact, KeyRing, Limits, RootKey, Window,
    };

    use super::*;

    const UPSTREAMS: [&str; 2] = ["openai", "github"];
    const METHODS: [&str; 3] = ["GET", "POST", "DELETE"];
    const PATHS: [&str; 5] = [
        "/v1/chat",
        "/v1/chatty",
        "/v1/chat/x",
        "/repos/a/b/issues",
        "/",
    ];
    const MODELS: [&str; 3] = ["gpt-4o", "gpt-4o-mini", "o1"];
    const NOWS: [i64; 3] = [1_000, 2_000, 3_000];

    fn sub<T: Clone + std::fmt::Debug + 'static>(
        items: &'static [T],
    ) -> impl Strategy<Value = Option<Vec<T>>> {
        proptest::option::of(proptest::sample::subsequence(items, 1..=items.len()))
    }

    fn caveats() -> impl Strategy<Value = Caveats> {
        (
            (
                proptest::option::of(proptest::sample::select(&UPSTREAMS[..])),
                sub(&METHODS),
                sub(&["/v1/chat", "/v1", "/repos/a/b"][..]),
                sub(&MODELS),
                proptest::option::of(proptest::sample::select(&NOWS[..])),
                proptest::option::of(0u64..3),
            ),
            (
                proptest::option::of(1u64..200),
                proptest::option::of(1u64..200),
                sub(&["usd", "eur"][..]),
                sub(&["a/b", "c/d"][..]),
                proptest::option::of(1u64..20),
                proptest::option::of(proptest::sample::subsequence(&["x", "y"][..], 1..=2)),
                proptest::option::of(proptest::sample::select(&[60u64, 3600][..])),
            ),
        )
            .prop_map(
                |(
                    (upstream, methods, paths, models, expires, cap),
                    (tokens, amount, cur, repos, jmax, jallow, window),
                )| {
                    let owned =
                        |v: Option<Vec<&str>>| v.map(|v| v.into_iter().map(String::from).collect());
                    Caveats {
                        upstream: upstream.map(String::from),
                        methods: owned(methods),
                        paths: owned(paths),
                        models: owned(models),
                        expires,
                        cap,
                        max_output_tokens: tokens,
                        amount_max: amount,
                        currencies: owned(cur),
                        repos: owned(repos),
                        json_max: jmax.map(|m| BTreeMap::from([("/n".to_owned(), m)])),
                        json_allow: jallow.map(|v| {
                            BTreeMap::from([(
                                "/s".to_owned(),
                                v.into_iter().map(String::from).collect(),
                            )])
                        }),
                        windows: window.map(|secs| vec![Window { secs, max: 5 }]),
                        ..Caveats::default()
                    }
                },
            )
    }

    fn calls() -> Vec<CallFacts> {
        let mut out = vec![CallFacts::default()];
        for (tokens, amount, cur, repo, n, s) in [
            (
                Some(50),
                Some(100),
                Some("usd"),
                Some("a/b"),
                Some(5),
                Some("x"),
            ),
            (
                Some(150),
                Some(150),
                Some("eur"),
                Some("c/d"),
                Some(15),
                Some("z"),
            ),
            (None, Some(10), Some("gbp"), None, None, Some("y")),
        ] {
            let mut json = BTreeMap::new();
            if let Some(n) = n {
                json.insert("/n".to_owned(), JsonFact::Int(n));
            }
            if let Some(s) = s {
                json.insert("/s".to_owned(), JsonFact::Str(s.to_owned()));
            }
            out.push(CallFacts {
                max_output_tokens: tokens,
                amount,
                currency: cur.map(String::from),
                repo: repo.map(String::from),
                json,
            });
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        /// Issue 11: skipping the Datalog on a cache hit changes no decision. For keys of
        /// one to three blocks over the whole caveat vocabulary (scope, expiry, caps,
        /// per-call ceilings, windows) and a grid of requests and per-call facts, the pure
        /// check alone gives the verdict (and refusing block) of the full authorization.
        #[test]
        fn pure_check_decides_like_datalog(
            blocks in proptest::collection::vec(caveats(), 1..=3),
        ) {
            let root = RootKey::generate();
            let ring = KeyRing::with(root.public());
            let Ok(mut token) = mint(&root, blocks[0].clone()) else { return Ok(()) };
            for c in &blocks[1..] {
                match token.attenuate(c.clone()) {
                    Ok((t, _)) => token = t,
                    Err(_) => return Ok(()),
                }
            }
            let key = token.to_key_string().unwrap();
            let verified = verify(&key, &ring, &Limits::default()).unwrap();
            let limits = Limits::default();
            let calls = calls();
            for upstream in UPSTREAMS {
                for method in METHODS {
                    for path in PATHS {
                        for model in MODELS.iter().map(|m| Some(*m)).chain([None]) {
                            for now in NOWS {
                                let facts = RequestFacts { upstream, method, path, model, now };
                                for call in &calls {
                                    let full = verified.authorize_call(&facts, call, None, &limits);
                                    let pure = pure_authorize(&verified, &facts, call);
                                    match (&full, &pure) {
                                        (Ok(()), Ok(())) => {}
                                        (Err(AuthorizeError::Refused(a)), Err(b)) => {
                                            prop_assert_eq!(a.block, b.block);
                                            prop_assert_eq!(a.code, b.code);
                                        }
                                        _ => prop_assert!(false, "full {full:?}, pure {pure:?}, {facts:?} {call:?}"),
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn bounded_and_keeps_recent_keys() {
        let root = RootKey::generate();
        let ring = KeyRing::with(root.public());
        let key = mint(
            &root,
            Caveats {
                upstream: Some("x".into()),
                ..Default::default()
            },
        )
        .unwrap()
        .to_key_string()
        .unwrap();
        let token = Arc::new(VerifiedKey::new(
            verify(&key, &ring, &Limits::default()).unwrap(),
        ));
        let cache = VerifyCache::new(4);
        for i in 0..100u8 {
            cache.insert([i; 32], Arc::clone(&token));
            // Key 0 is used all the time, so it is never evicted.
            assert!(cache.get(&[0; 32]).is_some(), "evicted at {i}");
            assert!(cache.len() <= 8);
        }
        assert!(cache.get(&[1; 32]).is_none());
        let off = VerifyCache::new(0);
        off.insert([1; 32], token);
        assert!(off.is_empty());
    }
}

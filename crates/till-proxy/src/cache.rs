//! Bounded cache of verified keys, looked up by the SHA-256 of the key string.
//!
//! Only successful verifications are cached (a flood of garbage keys cannot evict good
//! ones or grow memory). Two generations: lookups hit `hot` then `cold` (and promote);
//! when `hot` is full it becomes `cold` and the old `cold` is dropped, so at most
//! `2 × capacity` entries are held and recently used keys survive. Expiry is not a cache
//! concern: authorization checks it on every request, and revocation and caps live in the
//! ledger.

use std::collections::HashMap;
use std::sync::Mutex;

use till_token::VerifiedToken;

/// The verification cache.
#[derive(Debug)]
pub struct VerifyCache {
    capacity: usize,
    inner: Mutex<Generations>,
}

#[derive(Debug, Default)]
struct Generations {
    hot: HashMap<[u8; 32], VerifiedToken>,
    cold: HashMap<[u8; 32], VerifiedToken>,
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
    pub fn get(&self, digest: &[u8; 32]) -> Option<VerifiedToken> {
        let mut g = self.inner.lock().ok()?;
        if let Some(t) = g.hot.get(digest) {
            return Some(t.clone());
        }
        let t = g.cold.remove(digest)?;
        self.insert_locked(&mut g, *digest, t.clone());
        Some(t)
    }

    /// Remembers a successful verification.
    pub fn insert(&self, digest: [u8; 32], token: VerifiedToken) {
        if let Ok(mut g) = self.inner.lock() {
            self.insert_locked(&mut g, digest, token);
        }
    }

    fn insert_locked(&self, g: &mut Generations, digest: [u8; 32], token: VerifiedToken) {
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
    use till_token::{mint, verify, Caveats, KeyRing, Limits, RootKey};

    use super::*;

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
        let token = verify(&key, &ring, &Limits::default()).unwrap();
        let cache = VerifyCache::new(4);
        for i in 0..100u8 {
            cache.insert([i; 32], token.clone());
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

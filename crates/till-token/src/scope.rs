//! The effective scope of a key: the intersection of what every block allows.

use serde::Serialize;

use crate::caveat::{path_matches, Caveats};

/// What a key allows once every block is applied. `None` means "not restricted".
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EffectiveScope {
    /// The family's upstream.
    pub upstream: Option<String>,
    /// Methods allowed by every block.
    pub methods: Option<Vec<String>>,
    /// Path prefixes whose paths every block allows.
    pub paths: Option<Vec<String>>,
    /// Models allowed by every block.
    pub models: Option<Vec<String>>,
    /// Earliest expiry (Unix seconds).
    pub expires: Option<i64>,
    /// Tightest cap along the chain.
    pub cap: Option<u64>,
}

impl EffectiveScope {
    /// Intersects the blocks' caveats, in order.
    pub fn of<'a>(blocks: impl IntoIterator<Item = &'a Caveats>) -> Self {
        let mut scope = EffectiveScope::default();
        for c in blocks {
            if scope.upstream.is_none() {
                scope.upstream.clone_from(&c.upstream);
            }
            scope.methods = intersect_sets(scope.methods.take(), c.methods.as_ref());
            scope.models = intersect_sets(scope.models.take(), c.models.as_ref());
            scope.paths = intersect_prefixes(scope.paths.take(), c.paths.as_ref());
            scope.expires = min_opt(scope.expires, c.expires);
            scope.cap = min_opt(scope.cap, c.cap);
        }
        scope
    }

    /// Whether a request with these properties is inside the scope (caps and time aside).
    pub fn allows(&self, upstream: &str, method: &str, path: &str, model: Option<&str>) -> bool {
        self.upstream.as_deref().is_none_or(|u| u == upstream)
            && self
                .methods
                .as_ref()
                .is_none_or(|ms| ms.iter().any(|m| m == method))
            && self
                .paths
                .as_ref()
                .is_none_or(|ps| ps.iter().any(|p| path_matches(p, path)))
            && self
                .models
                .as_ref()
                .is_none_or(|ms| model.is_some_and(|m| ms.iter().any(|x| x == m)))
    }
}

fn min_opt<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

fn intersect_sets(have: Option<Vec<String>>, new: Option<&Vec<String>>) -> Option<Vec<String>> {
    match (have, new) {
        (Some(h), Some(n)) => Some(h.into_iter().filter(|x| n.contains(x)).collect()),
        (h, n) => h.or_else(|| n.cloned()),
    }
}

/// The intersection of two prefix sets is the set of the longer prefix of every pair where
/// one covers the other (two prefixes that do not nest share no path).
fn intersect_prefixes(have: Option<Vec<String>>, new: Option<&Vec<String>>) -> Option<Vec<String>> {
    match (have, new) {
        (Some(h), Some(n)) => {
            let mut out: Vec<String> = Vec::new();
            for a in &h {
                for b in n {
                    // path_matches(outer, inner) means every path under `inner` is under
                    // `outer` too (also when `inner` ends in `/`).
                    if path_matches(a, b) {
                        out.push(b.clone());
                    } else if path_matches(b, a) {
                        out.push(a.clone());
                    }
                }
            }
            out.sort();
            out.dedup();
            Some(out)
        }
        (h, n) => h.or_else(|| n.cloned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(p: &[&str]) -> Caveats {
        Caveats {
            paths: Some(p.iter().map(|s| s.to_string()).collect()),
            ..Caveats::default()
        }
    }

    #[test]
    fn prefixes_intersect_to_the_longer_nested_one() {
        let s = EffectiveScope::of([&paths(&["/v1"]), &paths(&["/v1/chat", "/v2"])]);
        assert_eq!(s.paths, Some(vec!["/v1/chat".to_string()]));
        let s = EffectiveScope::of([&paths(&["/v1/chat"]), &paths(&["/v1"])]);
        assert_eq!(s.paths, Some(vec!["/v1/chat".to_string()]));
        let s = EffectiveScope::of([&paths(&["/a"]), &paths(&["/b"])]);
        assert_eq!(s.paths, Some(vec![]));
        assert!(!s.allows("x", "GET", "/a", None));
    }

    #[test]
    fn caps_and_expiry_take_the_minimum() {
        let a = Caveats {
            cap: Some(3),
            expires: Some(100),
            ..Caveats::default()
        };
        let b = Caveats {
            cap: Some(5),
            expires: Some(50),
            ..Caveats::default()
        };
        let s = EffectiveScope::of([&a, &b]);
        assert_eq!((s.cap, s.expires), (Some(3), Some(50)));
    }
}

//! The effective scope of a key: the intersection of what every block allows.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::caveat::{path_matches, Caveats, Window};

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
    /// Tightest output-token ceiling per call. (The members below are omitted from JSON
    /// when absent, so inspections of keys without them are unchanged.)
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// Tightest amount ceiling per call.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub amount_max: Option<u64>,
    /// Currencies allowed by every block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub currencies: Option<Vec<String>>,
    /// Repositories allowed by every block.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repos: Option<Vec<String>>,
    /// Tightest ceiling per JSON pointer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json_max: Option<BTreeMap<String, u64>>,
    /// Values allowed by every block, per JSON pointer.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub json_allow: Option<BTreeMap<String, Vec<String>>>,
    /// Tightest windowed cap per window length (each block keeps its own counter; the
    /// tightest one bounds the key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub windows: Option<Vec<Window>>,
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
            scope.max_output_tokens = min_opt(scope.max_output_tokens, c.max_output_tokens);
            scope.amount_max = min_opt(scope.amount_max, c.amount_max);
            scope.currencies = intersect_sets(scope.currencies.take(), c.currencies.as_ref());
            scope.repos = intersect_sets(scope.repos.take(), c.repos.as_ref());
            if let Some(new) = &c.json_max {
                let map = scope.json_max.get_or_insert_with(BTreeMap::new);
                for (p, &v) in new {
                    let e = map.entry(p.clone()).or_insert(v);
                    *e = (*e).min(v);
                }
            }
            if let Some(new) = &c.json_allow {
                let map = scope.json_allow.get_or_insert_with(BTreeMap::new);
                for (p, vs) in new {
                    let have = map.remove(p);
                    let merged = intersect_sets(have, Some(vs)).unwrap_or_default();
                    map.insert(p.clone(), merged);
                }
            }
            if let Some(new) = &c.windows {
                let ws = scope.windows.get_or_insert_with(Vec::new);
                for w in new {
                    match ws.iter_mut().find(|x| x.secs == w.secs) {
                        Some(x) => x.max = x.max.min(w.max),
                        None => ws.push(*w),
                    }
                }
                ws.sort();
            }
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

    /// The worst case a holder of the key can cause, computed from the key alone.
    pub fn worst_case(&self) -> WorstCase {
        let times = |per_call: Option<u64>| match (self.cap, per_call) {
            (Some(cap), Some(c)) => Some(cap.saturating_mul(c)),
            _ => None,
        };
        WorstCase {
            upstream: self.upstream.clone(),
            activations: self.cap,
            output_tokens_per_call: self.max_output_tokens,
            output_tokens: times(self.max_output_tokens),
            amount_per_call: self.amount_max,
            amount: times(self.amount_max),
            currencies: self.currencies.clone(),
            windows: self.windows.clone().unwrap_or_default(),
        }
    }
}

/// What a key allows at most, read off the key (spec/token.md §11.1). `None` = unbounded.
/// Products saturate at 2^64 − 1.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct WorstCase {
    /// The upstream it all goes to.
    pub upstream: Option<String>,
    /// Activations: the tightest cap.
    pub activations: Option<u64>,
    /// Output tokens one call may ask for.
    pub output_tokens_per_call: Option<u64>,
    /// Output tokens over the key's life: activations × per-call ceiling.
    pub output_tokens: Option<u64>,
    /// Amount one call may state (minor units).
    pub amount_per_call: Option<u64>,
    /// Amount over the key's life: activations × per-call ceiling.
    pub amount: Option<u64>,
    /// The currencies that amount may be in (`None`: any).
    pub currencies: Option<Vec<String>>,
    /// Activations per window (tightest per window length).
    pub windows: Vec<Window>,
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

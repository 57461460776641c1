//! Prometheus metrics, rendered as text at `/_till/metrics`. Counters are atomics or a
//! small map behind a mutex; no labels carry token material.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// Latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0,
];

/// Claim outcomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimOutcome {
    /// A slot was taken.
    Claimed,
    /// An idempotent replay (nothing charged).
    Replayed,
    /// The ledger refused.
    Refused,
    /// The ledger could not decide.
    Error,
}

/// Process-wide proxy metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(u16, &'static str), u64>>,
    claims: [AtomicU64; 4],
    buckets: [AtomicU64; BUCKETS.len()],
    latency_count: AtomicU64,
    latency_sum_micros: AtomicU64,
}

impl Metrics {
    /// Counts one finished request (`code`: Till error code, or `ok`).
    pub fn request(&self, status: u16, code: &'static str, latency: Duration) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((status, code)).or_default() += 1;
        }
        let secs = latency.as_secs_f64();
        for (i, bound) in BUCKETS.iter().enumerate() {
            if secs <= *bound {
                self.buckets[i].fetch_add(1, Ordering::Relaxed);
            }
        }
        self.latency_count.fetch_add(1, Ordering::Relaxed);
        self.latency_sum_micros.fetch_add(
            u64::try_from(latency.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// Counts one claim outcome.
    pub fn claim(&self, outcome: ClaimOutcome) {
        self.claims[outcome as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Prometheus text exposition format 0.0.4.
    pub fn render(&self) -> String {
        let mut out = String::new();
        out.push_str("# HELP till_requests_total Proxied requests by HTTP status and Till code.\n");
        out.push_str("# TYPE till_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((status, code), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "till_requests_total{{status=\"{status}\",code=\"{code}\"}} {n}"
                );
            }
        }
        out.push_str("# HELP till_claims_total Ledger claims by outcome.\n");
        out.push_str("# TYPE till_claims_total counter\n");
        for (i, name) in ["claimed", "replayed", "refused", "error"]
            .iter()
            .enumerate()
        {
            let _ = writeln!(
                out,
                "till_claims_total{{outcome=\"{name}\"}} {}",
                self.claims[i].load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP till_request_duration_seconds Time to the response head.\n");
        out.push_str("# TYPE till_request_duration_seconds histogram\n");
        for (i, bound) in BUCKETS.iter().enumerate() {
            let _ = writeln!(
                out,
                "till_request_duration_seconds_bucket{{le=\"{bound}\"}} {}",
                self.buckets[i].load(Ordering::Relaxed)
            );
        }
        let count = self.latency_count.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "till_request_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let sum = self.latency_sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        let _ = writeln!(out, "till_request_duration_seconds_sum {sum}");
        let _ = writeln!(out, "till_request_duration_seconds_count {count}");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_a_cumulative_histogram() {
        let m = Metrics::default();
        m.request(200, "ok", Duration::from_millis(3));
        m.request(403, "activation_limit_reached", Duration::from_millis(30));
        m.claim(ClaimOutcome::Claimed);
        let text = m.render();
        assert!(
            text.contains("till_requests_total{status=\"200\",code=\"ok\"} 1"),
            "{text}"
        );
        assert!(text.contains("till_claims_total{outcome=\"claimed\"} 1"));
        assert!(text.contains("till_request_duration_seconds_bucket{le=\"0.005\"} 1"));
        assert!(text.contains("till_request_duration_seconds_bucket{le=\"0.05\"} 2"));
        assert!(text.contains("till_request_duration_seconds_count 2"));
    }
}

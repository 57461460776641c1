//! Prometheus metrics at `/_till/metrics`, through the maintained `prometheus-client` crate
//! (OpenMetrics text). Labels are bounded: the configured upstream names, HTTP statuses,
//! Till's stable error codes and fixed outcome names. No label carries token material or a
//! family id (that is what the admin API is for).

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Latency histogram bucket bounds, seconds.
const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0, 60.0,
];

fn histogram() -> Histogram {
    Histogram::new(BUCKETS)
}

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

impl ClaimOutcome {
    fn name(self) -> &'static str {
        match self {
            ClaimOutcome::Claimed => "claimed",
            ClaimOutcome::Replayed => "replayed",
            ClaimOutcome::Refused => "refused",
            ClaimOutcome::Error => "error",
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    upstream: String,
    status: u16,
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    upstream: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: &'static str,
}

/// Alert counters, shared with the admin plane's deliverer (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct AlertCounters {
    /// Alerts fired (first delivery attempt, or recorded without a webhook).
    pub fired: Counter,
    /// Alerts a receiver acknowledged.
    pub delivered: Counter,
    /// Failed delivery attempts (each retried later).
    pub failed: Counter,
}

/// Automatic retention (`[retention]`): the background export-and-prune runs of `till
/// serve` (cheap to clone).
#[derive(Debug, Clone, Default)]
pub struct RetentionCounters {
    /// Runs that finished.
    pub runs: Counter,
    /// Runs that failed (logged; retried at the next interval).
    pub failures: Counter,
    /// Receipts exported and pruned.
    pub pruned: Counter,
    /// Runs skipped because another exporter holds the ledger's export lease (a fleet
    /// with `[retention]` on several proxies: one exports).
    pub skipped: Counter,
    /// Unix time of the last run that finished (0: none yet).
    pub last_success: Gauge,
}

/// Process-wide proxy metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Histogram,
    upstream_duration: Family<UpstreamLabels, Histogram, fn() -> Histogram>,
    claims: Family<OutcomeLabels, Counter>,
    claim_duration: Histogram,
    voids: Family<OutcomeLabels, Counter>,
    cache: Family<OutcomeLabels, Counter>,
    alerts: AlertCounters,
    retention: RetentionCounters,
    sse_subscribers: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric registered, at zero.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "till_requests",
            "Requests on the proxy listener by upstream, HTTP status and Till code (`ok` when forwarded)",
            requests.clone(),
        );
        let request_duration = histogram();
        registry.register(
            "till_request_duration_seconds",
            "Time from request to response head",
            request_duration.clone(),
        );
        let upstream_duration =
            Family::<UpstreamLabels, Histogram, fn() -> Histogram>::new_with_constructor(histogram);
        registry.register(
            "till_upstream_duration_seconds",
            "Time from sending to the upstream to its response head, by upstream",
            upstream_duration.clone(),
        );
        let claims = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "till_claims",
            "Ledger claims by outcome (claimed, replayed, refused, error)",
            claims.clone(),
        );
        let claim_duration = histogram();
        registry.register(
            "till_ledger_claim_duration_seconds",
            "Time of one ledger claim (the durable, fsync'd transaction included)",
            claim_duration.clone(),
        );
        let voids = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "till_voids",
            "Claims given back because the upstream was unreachable and nothing was sent, by \
             outcome (voided; failed: the void transaction failed and the slot stays spent)",
            voids.clone(),
        );
        let cache = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "till_verify_cache_lookups",
            "Verified-key cache lookups by outcome (hit, miss)",
            cache.clone(),
        );
        let alerts = AlertCounters::default();
        registry.register(
            "till_alerts_fired",
            "Usage alerts fired",
            alerts.fired.clone(),
        );
        registry.register(
            "till_alerts_delivered",
            "Usage alerts acknowledged by the webhook receiver",
            alerts.delivered.clone(),
        );
        registry.register(
            "till_alert_delivery_failures",
            "Failed alert delivery attempts (retried)",
            alerts.failed.clone(),
        );
        let retention = RetentionCounters::default();
        registry.register(
            "till_retention_runs",
            "Automatic export-and-prune runs that finished ([retention])",
            retention.runs.clone(),
        );
        registry.register(
            "till_retention_failures",
            "Automatic export-and-prune runs that failed (see the log; retried next interval)",
            retention.failures.clone(),
        );
        registry.register(
            "till_retention_pruned_receipts",
            "Receipts exported and pruned by the automatic retention",
            retention.pruned.clone(),
        );
        registry.register(
            "till_retention_skipped",
            "Automatic export-and-prune runs skipped: another proxy holds the export lease",
            retention.skipped.clone(),
        );
        registry.register(
            "till_retention_last_success_timestamp_seconds",
            "Unix time of the last automatic export-and-prune run that finished (0: none)",
            retention.last_success.clone(),
        );
        let sse_subscribers = Gauge::default();
        registry.register(
            "till_event_subscribers",
            "Open admin event-stream (SSE) subscribers",
            sse_subscribers.clone(),
        );
        for outcome in ["claimed", "replayed", "refused", "error"] {
            let _ = claims.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["voided", "failed"] {
            let _ = voids.get_or_create(&OutcomeLabels { outcome });
        }
        for outcome in ["hit", "miss"] {
            let _ = cache.get_or_create(&OutcomeLabels { outcome });
        }
        Self {
            registry,
            requests,
            request_duration,
            upstream_duration,
            claims,
            claim_duration,
            voids,
            cache,
            alerts,
            retention,
            sse_subscribers,
        }
    }

    /// Counts one finished request (`upstream`: configured name or `-`; `code`: Till
    /// error code, or `ok`).
    pub fn request(&self, upstream: &str, status: u16, code: &'static str, latency: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                upstream: upstream.to_string(),
                status,
                code,
            })
            .inc();
        self.request_duration.observe(latency.as_secs_f64());
    }

    /// One upstream round trip (to the response head).
    pub fn upstream(&self, upstream: &str, latency: Duration) {
        self.upstream_duration
            .get_or_create(&UpstreamLabels {
                upstream: upstream.to_string(),
            })
            .observe(latency.as_secs_f64());
    }

    /// Counts one claim outcome and its duration.
    pub fn claim(&self, outcome: ClaimOutcome, latency: Duration) {
        self.claims
            .get_or_create(&OutcomeLabels {
                outcome: outcome.name(),
            })
            .inc();
        self.claim_duration.observe(latency.as_secs_f64());
    }

    /// Counts one void attempt: `true` when the slot was given back.
    pub fn void(&self, voided: bool) {
        self.voids
            .get_or_create(&OutcomeLabels {
                outcome: if voided { "voided" } else { "failed" },
            })
            .inc();
    }

    /// One verified-key cache lookup.
    pub fn cache_lookup(&self, hit: bool) {
        self.cache
            .get_or_create(&OutcomeLabels {
                outcome: if hit { "hit" } else { "miss" },
            })
            .inc();
    }

    /// The alert counters (the admin plane's deliverer increments them).
    pub fn alerts(&self) -> &AlertCounters {
        &self.alerts
    }

    /// The automatic retention's counters (its background task increments them).
    pub fn retention(&self) -> &RetentionCounters {
        &self.retention
    }

    /// OpenMetrics text, with the current number of event subscribers.
    pub fn render(&self, sse_subscribers: usize) -> String {
        self.sse_subscribers
            .set(i64::try_from(sse_subscribers).unwrap_or(i64::MAX));
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

/// Content type of [`Metrics::render`].
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_family_with_bounded_labels() {
        let m = Metrics::default();
        m.request("openai", 200, "ok", Duration::from_millis(3));
        m.request(
            "openai",
            403,
            "activation_limit_reached",
            Duration::from_millis(30),
        );
        m.claim(ClaimOutcome::Claimed, Duration::from_micros(400));
        m.upstream("openai", Duration::from_millis(2));
        m.cache_lookup(true);
        m.cache_lookup(false);
        m.cache_lookup(true);
        m.alerts().fired.inc();
        m.retention().runs.inc();
        m.retention().pruned.inc_by(7);
        m.retention().last_success.set(1_750_000_000);
        let text = m.render(2);
        for want in [
            "till_requests_total{upstream=\"openai\",status=\"200\",code=\"ok\"} 1",
            "till_requests_total{upstream=\"openai\",status=\"403\",code=\"activation_limit_reached\"} 1",
            "till_claims_total{outcome=\"claimed\"} 1",
            "till_claims_total{outcome=\"error\"} 0",
            "till_request_duration_seconds_bucket{le=\"0.005\"} 1",
            "till_request_duration_seconds_bucket{le=\"0.05\"} 2",
            "till_request_duration_seconds_count 2",
            "till_upstream_duration_seconds_count{upstream=\"openai\"} 1",
            "till_ledger_claim_duration_seconds_bucket{le=\"0.0005\"} 1",
            "till_verify_cache_lookups_total{outcome=\"hit\"} 2",
            "till_verify_cache_lookups_total{outcome=\"miss\"} 1",
            "till_alerts_fired_total 1",
            "till_alerts_delivered_total 0",
            "till_event_subscribers 2",
            "till_retention_runs_total 1",
            "till_retention_failures_total 0",
            "till_retention_pruned_receipts_total 7",
            "till_retention_last_success_timestamp_seconds 1750000000",
            "# EOF",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
    }
}

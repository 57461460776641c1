//! Alert delivery from the ledger's outbox, signed per Standard Webhooks.
//!
//! A background task leases due alerts from the ledger (one transaction: two proxies of a
//! fleet never take the same alert at once), POSTs each to the configured receiver with
//! `webhook-id` (the alert id), `webhook-timestamp` and `webhook-signature`
//! (`v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">`), and records the outcome:
//! delivered on a 2xx, else retried with exponential backoff (2 s doubling, at most
//! 5 minutes) until acknowledged. Nothing here runs on the request path. A crash after
//! the receiver acknowledged but before the ledger recorded it redelivers the same
//! `webhook-id`: receivers deduplicate on it, as the convention asks.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use till_ledger::{AlertOutcome, AlertRecord};
use till_proxy::admin_config::Webhook;

use crate::AdminState;

/// How long a leased alert is reserved for one delivery attempt.
pub const LEASE_SECS: u64 = 30;
/// Alerts taken per lease.
pub const BATCH: usize = 16;
/// Longest wait between two looks at the outbox when nothing wakes the deliverer.
pub const POLL: Duration = Duration::from_secs(1);
/// Per-attempt timeout of a webhook POST.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest backoff between attempts.
pub const MAX_BACKOFF_SECS: u64 = 300;

/// Backoff before attempt `attempts + 1`: 2, 4, 8, ... seconds, at most 5 minutes.
pub fn backoff_secs(attempts: u32) -> u64 {
    2u64.saturating_pow(attempts.clamp(1, 16))
        .min(MAX_BACKOFF_SECS)
}

/// The `webhook-signature` value for `body` (Standard Webhooks, `v1`).
pub fn sign(secret_b64: &str, id: &str, timestamp: u64, body: &[u8]) -> Result<String, String> {
    let key = base64::engine::general_purpose::STANDARD
        .decode(secret_b64)
        .map_err(|_| "webhook secret is not base64".to_string())?;
    let mut mac =
        Hmac::<Sha256>::new_from_slice(&key).map_err(|_| "bad webhook secret".to_string())?;
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    let sig = base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes());
    Ok(format!("v1,{sig}"))
}

/// Runs until shutdown.
pub(crate) async fn run(state: Arc<AdminState>) {
    let client = match reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(ATTEMPT_TIMEOUT)
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "alerts: cannot build the webhook client; alerts stay in the outbox");
            return;
        }
    };
    let mut shutdown = state.shutdown.clone();
    loop {
        deliver_due(&state, &client).await;
        tokio::select! {
            _ = state.wake.notified() => {}
            _ = tokio::time::sleep(POLL) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

async fn deliver_due(state: &AdminState, client: &reqwest::Client) {
    let now = crate::api::now();
    let leased = match state.ledger.lease_alerts(now, LEASE_SECS, BATCH).await {
        Ok(l) => l,
        Err(e) => {
            tracing::warn!(error = %e, "alerts: cannot read the outbox; will retry");
            return;
        }
    };
    for alert in leased {
        if alert.delivery.attempts == 1 {
            state.metrics.fired();
            tracing::info!(
                target: "till::alert",
                id = %alert.id,
                family = alert.family.as_deref().unwrap_or("-"),
                label = alert.label.as_deref().unwrap_or("-"),
                used = alert.used.unwrap_or(0),
                cap = alert.cap.unwrap_or(0),
                threshold = alert.threshold.unwrap_or(0),
                "alert fired"
            );
        }
        let outcome = match &state.alerts.webhook {
            None => AlertOutcome::NotConfigured,
            Some(hook) => attempt(client, hook, &alert).await,
        };
        match &outcome {
            AlertOutcome::Delivered { .. } => {
                state.metrics.delivered();
                tracing::info!(target: "till::alert", id = %alert.id, attempts = alert.delivery.attempts, "alert delivered");
            }
            AlertOutcome::Failed { error, retry_at } => {
                state.metrics.failed();
                tracing::warn!(target: "till::alert", id = %alert.id, attempts = alert.delivery.attempts, error = %error, retry_in_s = retry_at.saturating_sub(now), "alert delivery failed; will retry");
            }
            AlertOutcome::NotConfigured => {}
        }
        if let Err(e) = state.ledger.settle_alert(&alert.id, outcome).await {
            tracing::warn!(error = %e, id = %alert.id, "alerts: cannot record the delivery outcome; it will be retried");
        }
    }
}

async fn attempt(client: &reqwest::Client, hook: &Webhook, alert: &AlertRecord) -> AlertOutcome {
    let now = crate::api::now();
    let failed = |error: String| AlertOutcome::Failed {
        error,
        retry_at: now + backoff_secs(alert.delivery.attempts),
    };
    let body = match serde_json::to_vec(&alert.payload()) {
        Ok(b) => b,
        Err(e) => return failed(format!("cannot serialize: {e}")),
    };
    let signature = match sign(hook.secret.expose(), &alert.id, now, &body) {
        Ok(s) => s,
        Err(e) => return failed(e),
    };
    let sent = client
        .post(&hook.url)
        .header("content-type", "application/json")
        .header("webhook-id", &alert.id)
        .header("webhook-timestamp", now.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await;
    match sent {
        Ok(r) if r.status().is_success() => AlertOutcome::Delivered { at: now },
        Ok(r) => failed(format!("receiver answered {}", r.status().as_u16())),
        Err(e) => failed(format!(
            "cannot reach the receiver: {}",
            if e.is_timeout() {
                "timed out".to_string()
            } else if e.is_connect() {
                "connection failed".to_string()
            } else {
                "request failed".to_string()
            }
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_webhooks_reference_signature() {
        // The example of the Standard Webhooks specification.
        let sig = sign(
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            br#"{"test": 2432232314}"#,
        )
        .unwrap();
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn backoff_doubles_and_is_bounded() {
        assert_eq!(backoff_secs(1), 2);
        assert_eq!(backoff_secs(2), 4);
        assert_eq!(backoff_secs(5), 32);
        assert_eq!(backoff_secs(30), MAX_BACKOFF_SECS);
    }
}

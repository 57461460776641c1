//! The event bus: what happened on this proxy, live, for the admin plane's SSE stream
//! (`/admin/v1/events`), dashboards and `till watch`.
//!
//! Events are published only after the fact they report is final: a claim after the
//! ledger committed it, a revocation after the ledger wrote it, an alert after the claim
//! that fired it committed. Publishing never blocks and never fails the request path: the
//! bus is a bounded broadcast channel, and a subscriber that falls behind by more than
//! [`EventBus::CAPACITY`] events is told so (`lagged`) and dropped by the SSE layer.
//!
//! Events never carry a Till key or a credential: families and blocks are named by
//! revocation id (hex).

use serde::Serialize;
use tokio::sync::broadcast;

/// One event. Serialized with a `type` tag (`claim`, `void`, `refusal`, `revocation`,
/// `alert`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
#[non_exhaustive]
pub enum Event {
    /// A committed claim (or an idempotent replay of one).
    Claim {
        /// Unix seconds.
        at: u64,
        /// Family id (authority block revocation id, hex).
        family: String,
        /// Revocation id of the presented key's last block (hex).
        block: String,
        /// Index of the presented key's last block (0 = the root key).
        block_index: usize,
        /// The family receipt chain sequence number of this claim.
        seq: u64,
        /// Activations left under the tightest cap (absent: uncapped).
        #[serde(skip_serializing_if = "Option::is_none")]
        remaining: Option<u64>,
        /// True for an idempotent replay (nothing charged).
        replayed: bool,
        /// Upstream name.
        upstream: String,
        /// HTTP method.
        method: String,
        /// Request path (below the upstream).
        path: String,
        /// Model read from the request, if any.
        #[serde(skip_serializing_if = "Option::is_none")]
        model: Option<String>,
        /// This proxy's id.
        proxy: String,
    },
    /// A committed claim given back (spec/ledger.md §3.5): the upstream was unreachable,
    /// nothing was sent, and a void receipt was appended to the family's chain. Published
    /// after the `claim` event of the same request.
    Void {
        /// Unix seconds.
        at: u64,
        /// Family id (hex).
        family: String,
        /// Revocation id of the presented key's last block (hex).
        block: String,
        /// The voided claim's seq.
        seq: u64,
        /// The void receipt's seq.
        void_seq: u64,
        /// Activations left under the tightest cap after the void (absent: uncapped).
        #[serde(skip_serializing_if = "Option::is_none")]
        remaining: Option<u64>,
        /// Upstream name.
        upstream: String,
        /// This proxy's id.
        proxy: String,
    },
    /// A refused request (any stable error code of `spec/http.md`).
    Refusal {
        /// Unix seconds.
        at: u64,
        /// Family id, when the key verified far enough to know it.
        #[serde(skip_serializing_if = "Option::is_none")]
        family: Option<String>,
        /// HTTP status sent.
        status: u16,
        /// Stable error code.
        code: String,
        /// Upstream name, when the path named a configured one.
        #[serde(skip_serializing_if = "Option::is_none")]
        upstream: Option<String>,
        /// HTTP method.
        method: String,
    },
    /// A block was revoked (this and every key derived from it are dead).
    Revocation {
        /// Unix seconds.
        at: u64,
        /// The revoked block's revocation id (hex).
        revocation_id: String,
        /// Its family, when known.
        #[serde(skip_serializing_if = "Option::is_none")]
        family: Option<String>,
    },
    /// An alert fired (threshold crossed, rate ceiling exceeded, revocation). The JSON
    /// payload is the alert record of `spec/admin.md`.
    Alert {
        /// The alert record.
        alert: serde_json::Value,
    },
}

impl Event {
    /// The SSE `event:` name.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::Claim { .. } => "claim",
            Event::Void { .. } => "void",
            Event::Refusal { .. } => "refusal",
            Event::Revocation { .. } => "revocation",
            Event::Alert { .. } => "alert",
        }
    }

    /// The family the event is about, if any (for per-family filtering).
    pub fn family(&self) -> Option<&str> {
        match self {
            Event::Claim { family, .. } | Event::Void { family, .. } => Some(family),
            Event::Refusal { family, .. } | Event::Revocation { family, .. } => family.as_deref(),
            Event::Alert { alert } => alert.get("family").and_then(|f| f.as_str()),
        }
    }
}

/// A bounded, non-blocking broadcast of [`Event`]s. Cheap to clone.
#[derive(Debug, Clone)]
pub struct EventBus {
    sender: broadcast::Sender<Event>,
}

impl Default for EventBus {
    fn default() -> Self {
        Self::new()
    }
}

impl EventBus {
    /// Events a subscriber may fall behind by before it is told it lagged.
    pub const CAPACITY: usize = 4096;

    /// A new bus with no subscribers.
    pub fn new() -> Self {
        let (sender, _) = broadcast::channel(Self::CAPACITY);
        Self { sender }
    }

    /// Publishes an event. Never blocks; with no subscriber it is dropped.
    pub fn publish(&self, event: Event) {
        let _ = self.sender.send(event);
    }

    /// True when someone listens (lets the request path skip building events).
    pub fn has_subscribers(&self) -> bool {
        self.sender.receiver_count() > 0
    }

    /// Open subscriptions.
    pub fn subscribers(&self) -> usize {
        self.sender.receiver_count()
    }

    /// A new subscription, starting with the next event published.
    pub fn subscribe(&self) -> broadcast::Receiver<Event> {
        self.sender.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn subscriber_sees_events_in_order_and_lag_is_reported() {
        let bus = EventBus::new();
        assert!(!bus.has_subscribers());
        bus.publish(Event::Revocation {
            at: 1,
            revocation_id: "00".into(),
            family: None,
        });
        let mut rx = bus.subscribe();
        assert_eq!(bus.subscribers(), 1);
        for i in 0..3 {
            bus.publish(Event::Revocation {
                at: i,
                revocation_id: "ab".into(),
                family: Some("ff".into()),
            });
        }
        for i in 0..3 {
            let e = rx.recv().await.unwrap();
            assert_eq!(e.kind(), "revocation");
            assert_eq!(e.family(), Some("ff"));
            assert!(matches!(e, Event::Revocation { at, .. } if at == i));
        }
        for i in 0..(EventBus::CAPACITY as u64 + 5) {
            bus.publish(Event::Revocation {
                at: i,
                revocation_id: "ab".into(),
                family: None,
            });
        }
        assert!(matches!(
            rx.recv().await,
            Err(broadcast::error::RecvError::Lagged(_))
        ));
    }

    /// Issue 10 item 12: a void is its own event kind, filtered by family like a claim.
    #[test]
    fn void_event_serializes_with_its_kind_and_family() {
        let e = Event::Void {
            at: 7,
            family: "aa".into(),
            block: "bb".into(),
            seq: 3,
            void_seq: 4,
            remaining: Some(1),
            upstream: "openai".into(),
            proxy: "p1".into(),
        };
        assert_eq!(e.kind(), "void");
        assert_eq!(e.family(), Some("aa"));
        assert_eq!(
            serde_json::to_string(&e).unwrap(),
            r#"{"type":"void","at":7,"family":"aa","block":"bb","seq":3,"void_seq":4,"remaining":1,"upstream":"openai","proxy":"p1"}"#
        );
    }

    #[test]
    fn serializes_with_type_tag_and_no_empty_fields() {
        let e = Event::Refusal {
            at: 5,
            family: None,
            status: 403,
            code: "key_revoked".into(),
            upstream: Some("openai".into()),
            method: "POST".into(),
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "refusal");
        assert_eq!(v["code"], "key_revoked");
        assert!(v.get("family").is_none());
    }
}

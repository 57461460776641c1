//! `GET /admin/v1/events`: the event bus as Server-Sent Events.
//!
//! Each event is `event: <type>` plus `data: <JSON>` (the [`Event`] serialization). A
//! subscriber that falls behind by more than the bus capacity gets one `event: lagged`
//! and the stream ends (reconnect to resume; nothing on the request path ever waits for
//! a subscriber). Streams end on server shutdown. `?family=<hex>` filters to one family.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Query, Request, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::stream::{self, Stream};
use serde::Deserialize;
use till_proxy::events::Event;
use tokio::sync::broadcast::error::RecvError;

use crate::api::admit;
use crate::error::AdminError;
use crate::AdminState;

/// `?family=`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventFilter {
    /// Only events of this family (hex id).
    pub family: Option<String>,
}

pub(crate) async fn events(
    State(state): State<Arc<AdminState>>,
    query: Result<Query<EventFilter>, axum::extract::rejection::QueryRejection>,
    req: Request,
) -> Result<Response, AdminError> {
    let _ = admit(&state, req).await?;
    let Query(filter) = query.map_err(|e| AdminError::BadRequest(e.body_text()))?;
    let family = filter.family.map(|f| f.to_ascii_lowercase());
    Ok(Sse::new(stream_of(&state, family))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}

/// The SSE stream for one subscriber (also used by the dashboard's live view).
pub(crate) fn stream_of(
    state: &AdminState,
    family: Option<String>,
) -> impl Stream<Item = Result<SseEvent, Infallible>> + Send + 'static {
    let rx = state.events.subscribe();
    let shutdown = state.shutdown.clone();
    stream::unfold(
        (rx, shutdown, family, false),
        |(mut rx, mut shutdown, family, done)| async move {
            if done {
                return None;
            }
            loop {
                let next = tokio::select! {
                    r = rx.recv() => r,
                    _ = shutdown.wait_for(|stop| *stop) => return None,
                };
                match next {
                    Ok(event) => {
                        if let Some(f) = &family {
                            if event.family() != Some(f.as_str()) {
                                continue;
                            }
                        }
                        let sse = to_sse(&event);
                        return Some((Ok(sse), (rx, shutdown, family, false)));
                    }
                    Err(RecvError::Lagged(n)) => {
                        let sse = SseEvent::default()
                            .event("lagged")
                            .data(format!("{{\"missed\":{n}}}"));
                        return Some((Ok(sse), (rx, shutdown, family, true)));
                    }
                    Err(RecvError::Closed) => return None,
                }
            }
        },
    )
}

fn to_sse(event: &Event) -> SseEvent {
    let data = serde_json::to_string(event).unwrap_or_else(|_| "{}".into());
    SseEvent::default().event(event.kind()).data(data)
}

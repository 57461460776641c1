//! SSE streaming and cancellation.

use std::time::Duration;

use futures::StreamExt as _;

use crate::support::{client, eventually, up_config, Till, Upstream};

#[tokio::test]
async fn sse_arrives_incrementally_and_disconnect_cancels_the_upstream() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint_up(Some(5));
    let resp = client()
        .post(format!("{}/up/v1/sse", till.url))
        .bearer_auth(&key)
        .body(r#"{"model":"m","stream":true}"#)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut body = resp.bytes_stream();
    let first = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&first).contains("event 0"));
    assert!(
        !upstream.sse_finished(),
        "the first event must arrive before the upstream finishes"
    );
    let second = tokio::time::timeout(Duration::from_secs(5), body.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(String::from_utf8_lossy(&second).contains("event 1"));
    // The client goes away mid-stream.
    drop(body);
    assert!(
        eventually(Duration::from_secs(5), || upstream.sse_dropped()).await,
        "the upstream must see its response dropped"
    );
    assert!(
        !upstream.sse_finished(),
        "the upstream stream was cancelled, not completed"
    );
    // The slot stays spent.
    assert_eq!(till.usage(&key).await, vec![1]);
}

#[tokio::test]
async fn full_sse_stream_is_relayed_intact() {
    let upstream = Upstream::start().await;
    let till = Till::start(&up_config(&upstream)).await;
    let key = till.mint_up(None);
    let text = client()
        .post(format!("{}/up/v1/sse", till.url))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let expected: String = (0..10).map(|i| format!("data: event {i}\n\n")).collect();
    assert_eq!(text, expected);
    assert!(upstream.sse_finished());
}

//! Size limits, framing and timeouts on the client side: refused before any claim.

use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{client, error_code, raw_exchange, up_config, Till, Upstream};

fn config(upstream: &Upstream) -> String {
    format!(
        "[limits]\nmax_body_bytes = 1024\nmax_header_bytes = 16384\nheader_read_timeout = \"1s\"\n{}",
        up_config(upstream)
    )
}

#[tokio::test]
async fn oversized_bodies_get_413_before_any_claim() {
    let upstream = Upstream::start().await;
    let till = Till::start(&config(&upstream)).await;
    let key = till.mint_up(Some(5));
    let http = client();
    // Declared by Content-Length.
    let r = http
        .post(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .body(vec![b'a'; 2048])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    assert_eq!(error_code(r).await, "body_too_large");
    // Chunked, no length: counted while buffering.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> =
        (0..8).map(|_| Ok(vec![b'b'; 200])).collect();
    let r = http
        .post(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 413);
    // Exactly at the limit is fine.
    let r = http
        .post(format!("{}/up/v1/x", till.url))
        .bearer_auth(&key)
        .body(vec![b'c'; 1024])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(till.usage(&key).await, vec![1]);
    assert_eq!(upstream.hits(), 1);
    assert_eq!(upstream.seen()[0].body.len(), 1024);
}

#[tokio::test]
async fn oversized_headers_get_431() {
    let upstream = Upstream::start().await;
    let till = Till::start(&config(&upstream)).await;
    let key = till.mint_up(Some(5));
    let req = format!(
        "GET /up/v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(40_000)
    );
    let (resp, closed) = raw_exchange(till.addr, req.as_bytes()).await;
    assert!(
        resp.starts_with("HTTP/1.1 431"),
        "{}",
        &resp[..resp.len().min(200)]
    );
    assert!(closed);
    assert_eq!(till.usage(&key).await, vec![0]);
    assert_eq!(upstream.hits(), 0);
}

#[tokio::test]
async fn content_length_with_transfer_encoding_is_refused_and_the_connection_closed() {
    let upstream = Upstream::start().await;
    let till = Till::start(&config(&upstream)).await;
    let key = till.mint_up(Some(5));
    for req in [
        format!(
            "POST /up/v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /up/v1/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"
        ),
        format!(
            "POST /up/v1/x HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\nContent-Length: 30\r\n\r\n0\r\n\r\n"
        ),
    ] {
        let (resp, closed) = raw_exchange(till.addr, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 400"), "{resp}");
        assert!(resp.contains("bad_framing"), "{resp}");
        assert_eq!(resp.matches("HTTP/1.1").count(), 1, "one response, then close: {resp}");
        assert!(closed, "the connection must be closed");
    }
    // A clean request on a keep-alive connection after a chunked one is unaffected.
    let req = format!(
        "POST /up/v1/a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{{}}\r\n0\r\n\r\nGET /up/v1/b HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n\r\n"
    );
    let (resp, _) = raw_exchange(till.addr, req.as_bytes()).await;
    assert_eq!(resp.matches("HTTP/1.1 200").count(), 2, "{resp}");
    assert_eq!(upstream.hits(), 2);
    assert_eq!(till.usage(&key).await, vec![2]);
}

#[tokio::test]
async fn slow_request_heads_are_cut_off() {
    let upstream = Upstream::start().await;
    let till = Till::start(&config(&upstream)).await;
    let mut s = tokio::net::TcpStream::connect(till.addr).await.unwrap();
    s.write_all(b"GET /up/v1/x HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    // header_read_timeout is 1 s; the server must close well within 5 s.
    let mut buf = [0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf)).await;
    let closed = match n {
        Ok(Ok(n)) => n == 0 || String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 408"),
        Ok(Err(_)) => true,
        Err(_) => false,
    };
    assert!(closed, "a slowloris head must be cut off");
    assert_eq!(upstream.hits(), 0);
}

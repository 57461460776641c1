//! Serving connections: hyper's HTTP/1 server with a header read timeout, a head size
//! limit (431), the framing guard, a write-stall timeout, and graceful shutdown; and
//! HTTP/2 cleartext with prior knowledge (`curl --http2-prior-knowledge`, gRPC-style
//! clients) with the same header, body and write limits, a cap on concurrent streams and
//! rapid-reset protection.
//!
//! `axum::serve` has no header read timeout, so connections are served by hand: the first
//! bytes are peeked (within `header_read_timeout`) to tell the HTTP/2 preface from an
//! HTTP/1 request; each connection is wrapped in [`GuardedIo`], served by
//! `hyper::server::conn::http1` or `http2`, and told to shut down gracefully when the
//! shutdown future completes. `Upgrade: h2c` is not supported (Till refuses upgrades).

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::response::IntoResponse as _;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Sleep;
use tower::ServiceExt as _;

use crate::app::App;
use crate::config::{
    ProxyLimits, HTTP2_MAX_CONCURRENT_STREAMS, HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS,
    HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS, MIN_MAX_HEADER_BYTES,
};
use crate::error::ProxyError;
use crate::framing::FramingScanner;

/// How long in-flight requests get to finish after shutdown starts.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

impl App {
    /// Serves on `listener` until `shutdown` completes, then stops accepting, lets
    /// in-flight requests finish (at most [`SHUTDOWN_GRACE`]) and returns.
    pub async fn serve<F>(self, listener: TcpListener, shutdown: F) -> io::Result<()>
    where
        F: Future<Output = ()> + Send,
    {
        let limits = self.state.config().limits.clone();
        let router = self.router();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut tasks = tokio::task::JoinSet::new();
        tokio::pin!(shutdown);
        loop {
            tokio::select! {
                _ = &mut shutdown => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let _ = stream.set_nodelay(true);
                        tasks.spawn(serve_connection(stream, router.clone(), limits.clone(), stop_rx.clone()));
                    }
                    Err(e) => {
                        // Out of file descriptors and the like: back off, keep serving.
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                    }
                },
                Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            }
        }
        let _ = stop_tx.send(true);
        let drained = tokio::time::timeout(SHUTDOWN_GRACE, async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(
                left = tasks.len(),
                "shutdown grace period over; closing connections"
            );
            tasks.abort_all();
        }
        Ok(())
    }
}

/// The HTTP/2 connection preface (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Peeks at the first bytes: `Some(true)` for the HTTP/2 preface, `Some(false)` for
/// anything else, `None` when the client sent nothing useful in time or closed.
async fn sniff_http2(stream: &TcpStream, timeout: Duration) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = tokio::time::timeout_at(deadline, stream.peek(&mut buf))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if !H2_PREFACE.starts_with(&buf[..n]) {
            return Some(false);
        }
        if n == H2_PREFACE.len() {
            return Some(true);
        }
        // Part of the preface so far: wait for the rest (peek would return at once).
        tokio::time::timeout_at(deadline, tokio::time::sleep(Duration::from_millis(5)))
            .await
            .ok()?;
    }
}

/// Runs a hyper connection until it ends, or shuts it down gracefully on `stop`.
macro_rules! drive {
    ($conn:expr, $stop:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
            }
            _ = $stop.changed() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
        }
    }};
}

async fn serve_connection(
    stream: TcpStream,
    router: axum::Router,
    limits: ProxyLimits,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let Some(http2) = sniff_http2(&stream, limits.header_read_timeout).await else {
        return;
    };
    let flag = Arc::new(AtomicBool::new(false));
    let io = GuardedIo::new(
        stream,
        flag.clone(),
        limits.max_header_bytes,
        limits.idle_timeout,
    );
    let service = hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
        let router = router.clone();
        let smuggled = flag.load(Ordering::SeqCst);
        async move {
            if smuggled {
                return Ok::<_, Infallible>(ProxyError::BadFraming.into_response());
            }
            router.oneshot(req).await
        }
    });
    if http2 {
        let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
        builder
            .timer(TokioTimer::new())
            .max_concurrent_streams(HTTP2_MAX_CONCURRENT_STREAMS)
            .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
            .max_pending_accept_reset_streams(HTTP2_MAX_PENDING_ACCEPT_RESET_STREAMS)
            .max_local_error_reset_streams(HTTP2_MAX_LOCAL_ERROR_RESET_STREAMS)
            // A peer that stops answering pings is gone: close and cancel its upstreams.
            .keep_alive_interval(limits.idle_timeout)
            .keep_alive_timeout(limits.header_read_timeout);
        drive!(builder.serve_connection(TokioIo::new(io), service), stop);
    } else {
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_header_bytes.max(MIN_MAX_HEADER_BYTES))
            .keep_alive(true);
        drive!(builder.serve_connection(TokioIo::new(io), service), stop);
    }
}

/// A client connection: feeds every byte read to the [`FramingScanner`] (raising the
/// shared flag) and fails a write that makes no progress for `write_timeout` (slow or
/// stalled readers cannot pin a connection and its upstream forever).
pub struct GuardedIo<T> {
    inner: T,
    scanner: FramingScanner,
    flag: Arc<AtomicBool>,
    write_timeout: Duration,
    write_stall: Option<Pin<Box<Sleep>>>,
}

impl<T> std::fmt::Debug for GuardedIo<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardedIo")
            .field("scanner", &self.scanner)
            .finish_non_exhaustive()
    }
}

impl<T> GuardedIo<T> {
    /// Wraps a connection.
    pub fn new(inner: T, flag: Arc<AtomicBool>, max_head: usize, write_timeout: Duration) -> Self {
        GuardedIo {
            inner,
            scanner: FramingScanner::new(max_head),
            flag,
            write_timeout,
            write_stall: None,
        }
    }

    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let timeout = self.write_timeout;
        let sleep = self
            .write_stall
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "client stopped reading",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardedIo<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = &result {
            this.scanner.feed(&buf.filled()[before..]);
            if this.scanner.flagged() {
                this.flag.store(true, Ordering::SeqCst);
            }
        }
        result
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for GuardedIo<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, data) {
            Poll::Ready(r) => {
                this.write_stall = None;
                Poll::Ready(r)
            }
            Poll::Pending => match this.poll_stall(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => {
                this.write_stall = None;
                Poll::Ready(r)
            }
            Poll::Pending => match this.poll_stall(cx) {
                Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
                _ => Poll::Pending,
            },
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

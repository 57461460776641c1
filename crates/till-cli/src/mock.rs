//! `till mock-upstream`: a local OpenAI-compatible stand-in upstream, so Till can be tried
//! (and load-tested) without a real API key or network.
//!
//! - `POST /v1/chat/completions`: a chat completion that echoes the last user message;
//!   with `"stream": true`, the same as Server-Sent Events, one word per event.
//! - `GET /v1/models`: a model list.
//! - anything else: a JSON echo of method, path and headers, where credential headers are
//!   shown only as a fingerprint (so a demo proves the swap without printing a secret).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context as _, Result};
use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// `till mock-upstream` arguments.
#[derive(Debug, clap::Args)]
pub struct MockArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    pub listen: SocketAddr,
    /// Delay between streamed events, in milliseconds.
    #[arg(long, default_value_t = 20)]
    pub stream_delay_ms: u64,
}

/// Runs the mock until interrupted.
pub fn run(args: MockArgs) -> Result<ExitCode> {
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("binding {}", args.listen))?;
        let addr = listener.local_addr()?;
        println!("mock upstream listening on http://{addr}");
        let delay = Duration::from_millis(args.stream_delay_ms);
        let app = Router::new()
            .route("/v1/chat/completions", post(move |body| chat(body, delay)))
            .route("/v1/models", get(models))
            .fallback(echo);
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = tokio::signal::ctrl_c().await;
            })
            .await
            .context("serving")?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn models() -> Json<Value> {
    Json(json!({
        "object": "list",
        "data": [
            {"id": "gpt-4o-mini", "object": "model", "owned_by": "till-mock"},
            {"id": "gpt-4o", "object": "model", "owned_by": "till-mock"}
        ]
    }))
}

async fn chat(Json(req): Json<Value>, delay: Duration) -> Response {
    let model = req["model"].as_str().unwrap_or("gpt-4o-mini").to_string();
    let prompt = req["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let answer = format!("mock reply to: {prompt}");
    if req["stream"].as_bool() != Some(true) {
        return Json(json!({
            "id": "chatcmpl-mock",
            "object": "chat.completion",
            "created": 0,
            "model": model,
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": answer},
                "finish_reason": "stop"
            }],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        }))
        .into_response();
    }
    let words: Vec<String> = answer.split(' ').map(|w| format!("{w} ")).collect();
    let stream = futures::stream::unfold((words.into_iter(), false), move |(mut it, done)| {
        let model = model.clone();
        async move {
            if done {
                return None;
            }
            tokio::time::sleep(delay).await;
            let event = match it.next() {
                Some(word) => {
                    let chunk = json!({
                        "id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0,
                        "model": model,
                        "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": null}]
                    });
                    return Some((
                        Ok::<_, Infallible>(format!("data: {chunk}\n\n")),
                        (it, false),
                    ));
                }
                None => "data: [DONE]\n\n".to_string(),
            };
            Some((Ok(event), (it, true)))
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn echo(req: Request) -> Json<Value> {
    let headers = shown_headers(req.headers());
    Json(json!({
        "method": req.method().as_str(),
        "path": req.uri().path(),
        "query": req.uri().query(),
        "headers": headers,
    }))
}

fn shown_headers(headers: &HeaderMap) -> Value {
    let mut out = serde_json::Map::new();
    for (name, value) in headers {
        let n = name.as_str();
        let shown = if matches!(
            n,
            "authorization" | "x-api-key" | "x-goog-api-key" | "cookie"
        ) {
            let digest = Sha256::digest(value.as_bytes());
            format!("[credential, sha256 {}…]", hex::encode(&digest[..6]))
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        out.insert(n.to_string(), Value::String(shown));
    }
    Value::Object(out)
}

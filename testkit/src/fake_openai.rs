//! A fake OpenAI-compatible API under `/v1`: streamed (server-sent events) and plain
//! `chat/completions`, `images/generations` and `images/edits` (`b64_json` or `url`, the URLs
//! served by the fake itself), and `responses`, with OpenAI's error body shape.
//!
//! Tests script it: [`FakeOpenai::fail_next`] queues error answers (429 with `Retry-After`, 5xx,
//! 4xx) returned before any real one; a `fake_chunk_ms` field in a chat request spaces the
//! streamed chunks; the model `missing-model` answers 404; `stream_options.include_usage`
//! adds the final usage chunk (words counted as tokens). The reply text is `echo: <last user
//! message>`, streamed word by word.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use bytes::Bytes;
use serde_json::{Value, json};

use crate::serve::{Served, TINY_PNG, serve};

/// A running fake OpenAI-compatible API; stopped on drop.
#[derive(Debug)]
pub struct FakeOpenai {
    served: Served,
    state: Arc<Api>,
}

#[derive(Debug)]
struct Api {
    key: Option<String>,
    addr: Mutex<Option<SocketAddr>>,
    failures: Mutex<VecDeque<(u16, Option<String>)>>,
    requests: Mutex<Vec<(String, Instant)>>,
    streams_aborted: AtomicUsize,
}

impl FakeOpenai {
    /// Starts on a free loopback port; when `key` is given, requests must carry it as a bearer
    /// token.
    pub fn start(key: Option<&str>) -> FakeOpenai {
        let state = Arc::new(Api {
            key: key.map(str::to_owned),
            addr: Mutex::new(None),
            failures: Mutex::new(VecDeque::new()),
            requests: Mutex::new(Vec::new()),
            streams_aborted: AtomicUsize::new(0),
        });
        let s = state.clone();
        let served = serve(0, move || {
            Router::new()
                .route("/v1/models", get(models))
                .route("/v1/chat/completions", post(chat))
                .route("/v1/images/generations", post(images))
                .route("/v1/images/edits", post(images))
                .route("/v1/responses", post(responses))
                .route("/files/{name}", get(file))
                .with_state(s)
        });
        *state.addr.lock().expect("fake lock") = Some(served.addr);
        FakeOpenai { served, state }
    }

    /// The base URL to configure: `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.served.addr)
    }

    /// Queues an error answer (`status`, optional `Retry-After` value) for the next request.
    pub fn fail_next(&self, status: u16, retry_after: Option<&str>) {
        self.state
            .failures
            .lock()
            .expect("fake lock")
            .push_back((status, retry_after.map(str::to_owned)));
    }

    /// Every API request so far: path and arrival time.
    pub fn requests(&self) -> Vec<(String, Instant)> {
        self.state.requests.lock().expect("fake lock").clone()
    }

    /// How many streamed answers the client dropped before the end.
    pub fn streams_aborted(&self) -> usize {
        self.state.streams_aborted.load(Ordering::SeqCst)
    }
}

fn error(status: StatusCode, message: &str, kind: &str, code: &str) -> Response {
    (
        status,
        Json(json!({"error": {"message": message, "type": kind, "param": null, "code": code}})),
    )
        .into_response()
}

/// Logs the request, checks the key and serves a scripted failure when one is queued.
fn gate(s: &Api, path: &str, headers: &HeaderMap) -> Option<Response> {
    s.requests
        .lock()
        .expect("fake lock")
        .push((path.to_owned(), Instant::now()));
    if let Some(key) = &s.key {
        let ok = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == format!("Bearer {key}"));
        if !ok {
            return Some(error(
                StatusCode::UNAUTHORIZED,
                "Incorrect API key provided.",
                "invalid_request_error",
                "invalid_api_key",
            ));
        }
    }
    let (status, retry_after) = s.failures.lock().expect("fake lock").pop_front()?;
    let status = StatusCode::from_u16(status).expect("tests queue valid status codes");
    let mut resp = match status {
        StatusCode::TOO_MANY_REQUESTS => error(
            status,
            "Rate limit reached for requests",
            "requests",
            "rate_limit_exceeded",
        ),
        s if s.is_server_error() => error(
            s,
            "The server had an error while processing your request.",
            "server_error",
            "server_error",
        ),
        s => error(s, "Invalid request.", "invalid_request_error", "invalid_request"),
    };
    if let Some(ra) = retry_after {
        resp.headers_mut().insert(
            header::RETRY_AFTER,
            ra.parse().expect("tests queue valid header values"),
        );
    }
    Some(resp)
}

fn created() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Counts a stream as aborted when it is dropped before its last chunk.
struct StreamGuard {
    api: Arc<Api>,
    finished: bool,
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.finished {
            self.api.streams_aborted.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn chat(State(s): State<Arc<Api>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(r) = gate(&s, "/v1/chat/completions", &headers) {
        return r;
    }
    let model = body.get("model").and_then(Value::as_str).unwrap_or_default().to_owned();
    if model == "missing-model" {
        return error(
            StatusCode::NOT_FOUND,
            "The model `missing-model` does not exist or you do not have access to it.",
            "invalid_request_error",
            "model_not_found",
        );
    }
    let Some(messages) = body.get("messages").and_then(Value::as_array) else {
        return error(
            StatusCode::BAD_REQUEST,
            "Missing required parameter: 'messages'.",
            "invalid_request_error",
            "missing_required_parameter",
        );
    };
    let last = messages
        .iter()
        .rev()
        .find(|m| m.get("role").and_then(Value::as_str) == Some("user"))
        .and_then(|m| m.get("content").and_then(Value::as_str))
        .unwrap_or_default();
    let reply = format!("echo: {last}");
    if body.get("stream").and_then(Value::as_bool) != Some(true) {
        return Json(json!({
            "id": "chatcmpl-fake", "object": "chat.completion", "created": created(), "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}
        }))
        .into_response();
    }
    let delay = Duration::from_millis(body.get("fake_chunk_ms").and_then(Value::as_u64).unwrap_or(0));
    let mut pieces: Vec<String> = Vec::new();
    for (i, word) in reply.split(' ').enumerate() {
        pieces.push(if i == 0 { word.to_owned() } else { format!(" {word}") });
    }
    let chunk = |delta: Value, finish: Value| {
        let v = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created(),
                       "model": model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]});
        format!("data: {v}\n\n")
    };
    let mut events: VecDeque<String> = VecDeque::new();
    events.push_back(chunk(json!({"role": "assistant", "content": ""}), Value::Null));
    for p in pieces {
        events.push_back(chunk(json!({"content": p}), Value::Null));
    }
    events.push_back(chunk(json!({}), json!("stop")));
    // With `stream_options.include_usage`, OpenAI sends one more chunk, with no choices and the
    // usage of the whole request. The fake counts words as tokens.
    if body.pointer("/stream_options/include_usage").and_then(Value::as_bool) == Some(true) {
        let prompt: usize = messages
            .iter()
            .filter_map(|m| m.get("content").and_then(Value::as_str))
            .map(|c| c.split_whitespace().count())
            .sum();
        let completion = reply.split_whitespace().count();
        let v = json!({"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": created(),
                       "model": model, "choices": [],
                       "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                                 "total_tokens": prompt + completion}});
        events.push_back(format!("data: {v}\n\n"));
    }
    events.push_back("data: [DONE]\n\n".to_owned());
    let guard = StreamGuard {
        api: s.clone(),
        finished: false,
    };
    let stream = futures_util::stream::unfold(
        (events, guard, true),
        move |(mut events, mut guard, first)| async move {
            let next = events.pop_front()?;
            if !first && !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if events.is_empty() {
                guard.finished = true;
            }
            Some((Ok::<Bytes, Infallible>(Bytes::from(next)), (events, guard, false)))
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-cache")
        .body(Body::from_stream(stream))
        .expect("a response with static headers builds")
}

/// `GET /v1/models`: the list of models the key may use (the cheap authenticated request a
/// client makes to check its key).
async fn models(State(s): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Some(r) = gate(&s, "/v1/models", &headers) {
        return r;
    }
    Json(json!({
        "object": "list",
        "data": [
            {"id": "gpt-4o-mini", "object": "model", "created": 1_721_172_741, "owned_by": "system"},
            {"id": "gpt-image-1", "object": "model", "created": 1_745_517_030, "owned_by": "system"}
        ]
    }))
    .into_response()
}

async fn images(State(s): State<Arc<Api>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(r) = gate(&s, "/v1/images/generations", &headers) {
        return r;
    }
    if !body.get("prompt").is_some_and(Value::is_string) {
        return error(
            StatusCode::BAD_REQUEST,
            "Missing required parameter: 'prompt'.",
            "invalid_request_error",
            "missing_required_parameter",
        );
    }
    let n = body.get("n").and_then(Value::as_u64).unwrap_or(1).clamp(1, 10);
    let as_url = body.get("response_format").and_then(Value::as_str) == Some("url");
    let addr = s.addr.lock().expect("fake lock").expect("the address is set at start");
    let data: Vec<Value> = (0..n)
        .map(|i| {
            if as_url {
                json!({"url": format!("http://{addr}/files/img-{i}.png"), "revised_prompt": body["prompt"]})
            } else {
                json!({"b64_json": base64::engine::general_purpose::STANDARD.encode(TINY_PNG), "revised_prompt": body["prompt"]})
            }
        })
        .collect();
    Json(json!({"created": created(), "data": data})).into_response()
}

async fn responses(State(s): State<Arc<Api>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    if let Some(r) = gate(&s, "/v1/responses", &headers) {
        return r;
    }
    let input = body.get("input").cloned().unwrap_or(Value::Null);
    Json(json!({
        "id": "resp_fake", "object": "response", "created_at": created(), "status": "completed",
        "model": body.get("model").cloned().unwrap_or(Value::Null),
        "output": [{"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": format!("echo: {input}")}]}]
    }))
    .into_response()
}

async fn file(Path(name): Path<String>) -> Response {
    if name.ends_with(".png") {
        ([(header::CONTENT_TYPE, "image/png")], TINY_PNG).into_response()
    } else {
        StatusCode::NOT_FOUND.into_response()
    }
}

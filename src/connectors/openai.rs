//! The OpenAI connector: jobs against any OpenAI-compatible HTTP API at a configured base URL,
//! authenticated with the key from the environment variable the configuration names.
//!
//! - `openai_text`: `POST /chat/completions` with `stream: true`; the server-sent events are
//!   read as they come (progress grows with the tokens received) and joined into the text.
//!   The payload is the request body; `prompt` (and `system`) are accepted as a shortcut for
//!   `messages`, and `model` defaults to the configured text model.
//! - `openai_image`: `POST /images/generations`; each `b64_json` image becomes an artifact, and
//!   each `url` image is downloaded (kept as a URL when that fails).
//! - `openai_img2img`: `POST /images/edits` with the payload as JSON (APIs that take image
//!   references in JSON); images handled as for `openai_image`.
//! - `openai_responses`: `POST /responses`, the answer returned as the result.
//!
//! 429, 408, 5xx and connection failures are retried with exponential backoff, honouring
//! `Retry-After` (capped); other 4xx fail without retry with the API's error message.
//! Cancellation drops the request in flight.
//!
//! Every attempt first passes the fleet-wide [`Limiter`] when limits are configured. The
//! result carries a `billing` record: the attempts, the tokens the API reported (streamed chats
//! ask for `stream_options.include_usage`) and the cost from `[connectors.openai.prices]`; the
//! tokens also count against a `daily_tokens` quota.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::http::{self, Backoff};
use super::json_kind;
use super::limits::Limiter;
use super::{
    Artifact, ArtifactBody, Billing, Connector, ConnectorError, Job, JobOutput, Progress, ProgressSink, or_cancelled,
};
use crate::config::{ConnectorKind, OpenaiConfig, Secret};

/// Runs jobs against an OpenAI-compatible API.
#[derive(Debug, Clone)]
pub struct OpenaiConnector {
    config: OpenaiConfig,
    api_key: Option<Secret>,
    client: reqwest::Client,
    limiter: Option<Arc<Limiter>>,
}

impl OpenaiConnector {
    /// A connector for `config.base_url`; `api_key` is the value of `config.api_key_env` (a
    /// compatible server that needs no key may run without one).
    pub fn new(config: OpenaiConfig, api_key: Option<String>) -> Self {
        OpenaiConnector {
            config,
            api_key: api_key.filter(|k| !k.trim().is_empty()).map(Secret::new),
            client: http::client(),
            limiter: None,
        }
    }

    /// Sends every request through `limiter` first (the fleet-wide limits of this API).
    pub fn with_limiter(mut self, limiter: Arc<Limiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    fn backoff(&self) -> Backoff {
        Backoff::doubling(self.config.backoff_initial, self.config.backoff_max)
    }

    /// POSTs `body` to `path`, retrying what may succeed later, each attempt admitted by the
    /// limiter; returns the successful answer and counts the attempts in `billing`.
    async fn post(
        &self,
        path: &str,
        body: &Value,
        billing: &mut Billing,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<reqwest::Response, ConnectorError> {
        let url = format!("{}{path}", self.config.base_url);
        let mut retry = 0;
        loop {
            if let Some(limiter) = &self.limiter {
                limiter.acquire(&billing.customer, Some(progress), cancel).await?;
            }
            let mut req = self.client.post(&url).json(body);
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key.expose());
            }
            let sent = or_cancelled(cancel, async {
                req.send()
                    .await
                    .map_err(|e| http::send_error(&format!("call {path}"), e))
            })
            .await;
            let (err, asked) = match sent {
                Err(ConnectorError::Cancelled) => return Err(ConnectorError::Cancelled),
                Err(e) => (e, None),
                Ok(resp) if resp.status().is_success() => {
                    // Only an accepted request is billed; a 429 or an error answer is not.
                    billing.requests += 1;
                    return Ok(resp);
                }
                Ok(resp) => {
                    let status = resp.status();
                    let asked = http::retry_after(resp.headers());
                    let text = resp.text().await.unwrap_or_default();
                    let message = api_error_message(&text);
                    let what = format!("OpenAI API {path}");
                    if let Some(refused) = http::refusal("openai", &what, status, &text, &message) {
                        return Err(refused);
                    }
                    let err = http::status_error(&what, status, &message);
                    if !http::retryable_status(status) {
                        return Err(err);
                    }
                    (err, asked)
                }
            };
            if retry + 1 >= self.config.max_attempts {
                return Err(err);
            }
            let delay = http::retry_delay(&self.backoff(), retry, asked);
            tracing::info!(error = %err.chain(), ?delay, "OpenAI API request will be retried");
            tokio::select! {
                () = cancel.cancelled() => return Err(ConnectorError::Cancelled),
                () = tokio::time::sleep(delay) => {}
            }
            retry += 1;
        }
    }

    async fn text(
        &self,
        payload: &Value,
        billing: &mut Billing,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<JobOutput, ConnectorError> {
        let body = chat_request(payload, &self.config.text_model)?;
        let limit = body
            .get("max_completion_tokens")
            .or_else(|| body.get("max_tokens"))
            .and_then(Value::as_u64);
        let resp = self.post("/chat/completions", &body, billing, progress, cancel).await?;
        progress.percent(1.0, "streaming");
        let mut stream = resp.bytes_stream();
        let mut sse = SseReader::default();
        let mut chat = ChatAccumulator::default();
        loop {
            let chunk = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(ConnectorError::Cancelled),
                chunk = stream.next() => chunk,
            };
            let Some(chunk) = chunk else { break };
            let chunk = chunk.map_err(|e| http::send_error("read the streamed completion", e))?;
            for event in sse.push(&chunk) {
                if event == "[DONE]" {
                    chat.done = true;
                    continue;
                }
                chat.add(&event)?;
            }
            let n = chat.chunks;
            let percent = match limit {
                Some(max) if max > 0 => n as f64 * 100.0 / max as f64,
                _ => 100.0 * n as f64 / (n as f64 + 50.0),
            };
            progress.report(Progress {
                percent: percent.min(99.0),
                message: format!("{n} chunk(s) received"),
                current_step: None,
                total_steps: None,
            });
            if chat.done {
                break;
            }
        }
        if !chat.done && chat.finish_reason.is_none() {
            return Err(ConnectorError::Unavailable {
                message: "the completion stream ended before it finished".to_owned(),
                source: None,
            });
        }
        add_usage(billing, chat.usage.as_ref());
        Ok(JobOutput {
            data: json!({
                "text": chat.text,
                "model": chat.model.or_else(|| body.get("model").and_then(Value::as_str).map(str::to_owned)),
                "finish_reason": chat.finish_reason,
                "usage": chat.usage,
            }),
            artifacts: Vec::new(),
        })
    }

    async fn image(
        &self,
        path: &str,
        payload: &Value,
        billing: &mut Billing,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<JobOutput, ConnectorError> {
        let Value::Object(obj) = payload else {
            return Err(ConnectorError::BadPayload(format!(
                "an image payload is a JSON object, not {}",
                json_kind(payload)
            )));
        };
        if !obj.get("prompt").is_some_and(Value::is_string) {
            return Err(ConnectorError::BadPayload("`prompt` (a string) is required".to_owned()));
        }
        let mut body = obj.clone();
        body.entry("model")
            .or_insert_with(|| Value::String(self.config.image_model.clone()));
        let body = Value::Object(body);
        progress.percent(0.0, "image requested");
        let resp = self.post(path, &body, billing, progress, cancel).await?;
        let answer: Value = or_cancelled(cancel, async {
            resp.json()
                .await
                .map_err(|e| http::send_error("read the image answer", e))
        })
        .await?;
        let images = answer
            .get("data")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let format = body
            .get("output_format")
            .and_then(Value::as_str)
            .unwrap_or("png")
            .to_ascii_lowercase();
        let mut artifacts = Vec::new();
        let mut revised = Vec::new();
        for (i, image) in images.iter().enumerate() {
            revised.push(image.get("revised_prompt").cloned().unwrap_or(Value::Null));
            let name = format!("image_{i}.{format}");
            let content_type = super::guess_content_type(&name).to_owned();
            if let Some(b64) = image.get("b64_json").and_then(Value::as_str) {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(b64.trim())
                    .map_err(|e| ConnectorError::Failed {
                        message: format!("image {i} is not valid base64: {e}"),
                        retryable: false,
                    })?;
                artifacts.push(Artifact {
                    name,
                    content_type,
                    body: ArtifactBody::Bytes(Bytes::from(bytes)),
                });
            } else if let Some(url) = image.get("url").and_then(Value::as_str) {
                // API image URLs expire; keep a copy when it can be fetched.
                let body = http::fetch_output(
                    &self.client,
                    url,
                    "download a generated image",
                    Duration::from_secs(60),
                    cancel,
                )
                .await?;
                artifacts.push(Artifact {
                    name,
                    content_type,
                    body,
                });
            }
        }
        if artifacts.is_empty() {
            return Err(ConnectorError::Failed {
                message: format!("the API returned no image: {}", http::snippet(&answer.to_string())),
                retryable: true,
            });
        }
        add_usage(billing, answer.get("usage"));
        Ok(JobOutput {
            data: json!({
                "created": answer.get("created").cloned().unwrap_or(Value::Null),
                "revised_prompts": revised,
                "usage": answer.get("usage").cloned().unwrap_or(Value::Null),
            }),
            artifacts,
        })
    }

    async fn responses(
        &self,
        payload: &Value,
        billing: &mut Billing,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<JobOutput, ConnectorError> {
        let Value::Object(obj) = payload else {
            return Err(ConnectorError::BadPayload(format!(
                "a responses payload is a JSON object, not {}",
                json_kind(payload)
            )));
        };
        let mut body = obj.clone();
        body.entry("model")
            .or_insert_with(|| Value::String(self.config.text_model.clone()));
        body.insert("stream".to_owned(), Value::Bool(false));
        let resp = self
            .post("/responses", &Value::Object(body), billing, progress, cancel)
            .await?;
        let answer: Value = or_cancelled(cancel, async {
            resp.json()
                .await
                .map_err(|e| http::send_error("read the responses answer", e))
        })
        .await?;
        add_usage(billing, answer.get("usage"));
        Ok(JobOutput {
            data: answer,
            artifacts: Vec::new(),
        })
    }

    async fn run_job(
        &self,
        job: &Job,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<JobOutput, ConnectorError> {
        let mut billing = Billing::for_job("openai", job);
        let result = self.attempt(job, &mut billing, progress, cancel).await;
        if let Some(limiter) = &self.limiter {
            limiter
                .record_tokens(&job.customer_id, billing.input_tokens + billing.output_tokens)
                .await;
        }
        billing.settle(&self.config.prices, progress, result)
    }

    /// Runs the job's request, recording what the API bills in `billing` as it goes.
    async fn attempt(
        &self,
        job: &Job,
        b: &mut Billing,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<JobOutput, ConnectorError> {
        match job.service_required.as_str() {
            "openai_text" => self.text(&job.payload, b, progress, cancel).await,
            "openai_image" => {
                self.image("/images/generations", &job.payload, b, progress, cancel)
                    .await
            }
            "openai_img2img" => self.image("/images/edits", &job.payload, b, progress, cancel).await,
            "openai_responses" => self.responses(&job.payload, b, progress, cancel).await,
            other => Err(ConnectorError::BadPayload(format!(
                "the openai connector does not run `{other}` jobs"
            ))),
        }
    }
}

impl Connector for OpenaiConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Openai
    }

    /// `GET /models`: the cheapest authenticated request of an OpenAI-compatible API.
    fn check_credentials(&self) -> BoxFuture<'_, Result<(), String>> {
        let mut req = self.client.get(format!("{}/models", self.config.base_url));
        if let Some(key) = &self.api_key {
            req = req.bearer_auth(key.expose());
        }
        Box::pin(http::check(req))
    }

    fn run<'a>(
        &'a self,
        job: &'a Job,
        progress: &'a ProgressSink,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<JobOutput, ConnectorError>> {
        Box::pin(self.run_job(job, progress, cancel))
    }
}

/// The chat request for a text payload: streamed, with a model, and `prompt`/`system` turned
/// into `messages`.
fn chat_request(payload: &Value, default_model: &str) -> Result<Value, ConnectorError> {
    let mut body: Map<String, Value> = match payload {
        Value::Object(o) => o.clone(),
        Value::String(s) => Map::from_iter([("prompt".to_owned(), Value::String(s.clone()))]),
        other => {
            return Err(ConnectorError::BadPayload(format!(
                "a text payload is a JSON object or a string, not {}",
                json_kind(other)
            )));
        }
    };
    let prompt = body.remove("prompt");
    let system = body.remove("system");
    if !body.contains_key("messages") {
        let Some(Value::String(prompt)) = prompt else {
            return Err(ConnectorError::BadPayload(
                "a text payload needs `messages` or a `prompt` string".to_owned(),
            ));
        };
        let mut messages = Vec::new();
        if let Some(Value::String(system)) = system {
            messages.push(json!({"role": "system", "content": system}));
        }
        messages.push(json!({"role": "user", "content": prompt}));
        body.insert("messages".to_owned(), Value::Array(messages));
    } else if !body.get("messages").is_some_and(Value::is_array) {
        return Err(ConnectorError::BadPayload("`messages` must be a list".to_owned()));
    }
    body.entry("model")
        .or_insert_with(|| Value::String(default_model.to_owned()));
    body.insert("stream".to_owned(), Value::Bool(true));
    // Without this a streamed completion reports no usage, and the job could not be billed.
    body.entry("stream_options")
        .or_insert_with(|| json!({"include_usage": true}));
    Ok(Value::Object(body))
}

/// Adds the tokens of an OpenAI `usage` object (chat: `prompt_tokens`/`completion_tokens`;
/// images and responses: `input_tokens`/`output_tokens`) to `billing`.
fn add_usage(billing: &mut Billing, usage: Option<&Value>) {
    let Some(u) = usage else { return };
    let n = |a: &str, b: &str| u.get(a).or_else(|| u.get(b)).and_then(Value::as_u64).unwrap_or(0);
    billing.input_tokens += n("prompt_tokens", "input_tokens");
    billing.output_tokens += n("completion_tokens", "output_tokens");
}

/// The `error.message` of an OpenAI error body, or the body.
fn api_error_message(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.pointer("/error/message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| text.to_owned())
}

/// Splits a server-sent event stream into its events, across chunk boundaries.
#[derive(Debug, Default)]
pub(super) struct SseReader {
    buf: Vec<u8>,
    event: Option<String>,
    data: Vec<String>,
}

impl SseReader {
    /// The `data` of each event completed by `chunk`.
    pub(super) fn push(&mut self, chunk: &[u8]) -> Vec<String> {
        self.push_events(chunk).into_iter().map(|(_, data)| data).collect()
    }

    /// Each event completed by `chunk`: its `event` name (`message` when unnamed) and `data`.
    pub(super) fn push_events(&mut self, chunk: &[u8]) -> Vec<(String, String)> {
        self.buf.extend_from_slice(chunk);
        let mut events = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            let line = String::from_utf8_lossy(&line);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                let event = self.event.take().unwrap_or_else(|| "message".to_owned());
                if !self.data.is_empty() {
                    events.push((event, self.data.join("\n")));
                    self.data.clear();
                }
            } else if let Some(rest) = line.strip_prefix("data:") {
                self.data.push(rest.strip_prefix(' ').unwrap_or(rest).to_owned());
            } else if let Some(rest) = line.strip_prefix("event:") {
                self.event = Some(rest.trim().to_owned());
            }
        }
        events
    }
}

/// Joins streamed chat completion chunks.
#[derive(Debug, Default)]
struct ChatAccumulator {
    text: String,
    chunks: u64,
    model: Option<String>,
    finish_reason: Option<String>,
    usage: Option<Value>,
    done: bool,
}

impl ChatAccumulator {
    fn add(&mut self, event: &str) -> Result<(), ConnectorError> {
        let v: Value = serde_json::from_str(event).map_err(|e| ConnectorError::Unavailable {
            message: format!("a streamed chunk is not JSON: {}", http::snippet(event)),
            source: Some(Box::new(e)),
        })?;
        if let Some(err) = v.get("error") {
            return Err(ConnectorError::Failed {
                message: format!("the API failed while streaming: {err}"),
                retryable: true,
            });
        }
        if let Some(m) = v.get("model").and_then(Value::as_str) {
            self.model = Some(m.to_owned());
        }
        if let Some(u) = v.get("usage").filter(|u| !u.is_null()) {
            self.usage = Some(u.clone());
        }
        if let Some(choice) = v.get("choices").and_then(|c| c.get(0)) {
            if let Some(piece) = choice.pointer("/delta/content").and_then(Value::as_str) {
                self.text.push_str(piece);
                self.chunks += 1;
            }
            if let Some(r) = choice.get("finish_reason").and_then(Value::as_str) {
                self.finish_reason = Some(r.to_owned());
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sse_events_survive_chunk_boundaries() {
        let mut r = SseReader::default();
        assert!(r.push(b"data: {\"a\"").is_empty());
        assert_eq!(r.push(b":1}\r\n\r\ndata: [DONE]\n"), vec!["{\"a\":1}".to_owned()]);
        assert_eq!(r.push(b"\n: comment\n\n"), vec!["[DONE]".to_owned()]);
    }

    #[test]
    fn chat_requests_are_normalised() {
        let b = chat_request(&json!({"prompt": "hi", "system": "be brief"}), "m").unwrap();
        assert_eq!(b["model"], "m");
        assert_eq!(b["stream"], true);
        assert_eq!(b["messages"][0]["role"], "system");
        assert_eq!(b["messages"][1]["content"], "hi");
        assert!(b.get("prompt").is_none());
        let b = chat_request(&json!({"model": "x", "messages": []}), "m").unwrap();
        assert_eq!(b["model"], "x");
        assert!(chat_request(&json!({"temperature": 1}), "m").is_err());
        assert!(chat_request(&json!(3), "m").is_err());
    }

    #[test]
    fn chunks_accumulate() {
        let mut c = ChatAccumulator::default();
        c.add(r#"{"model":"gpt","choices":[{"delta":{"role":"assistant","content":"Hel"}}]}"#)
            .unwrap();
        c.add(r#"{"choices":[{"delta":{"content":"lo"},"finish_reason":"stop"}]}"#)
            .unwrap();
        assert_eq!(c.text, "Hello");
        assert_eq!(c.chunks, 2);
        assert_eq!(c.finish_reason.as_deref(), Some("stop"));
        assert!(c.add("nope").is_err());
        assert_eq!(api_error_message(r#"{"error":{"message":"bad key"}}"#), "bad key");
    }
}

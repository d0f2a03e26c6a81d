//! The ComfyUI connector: runs a workflow on the ComfyUI server of this worker's GPU through
//! ComfyUI's own API.
//!
//! It opens `ws://host:port/ws?clientId=<id>` before submitting, so no event of the job can be
//! missed, then `POST /prompt {prompt, client_id}` (the workflow is `payload.workflow` or the
//! payload itself, in ComfyUI's API format). The WebSocket events for that prompt drive progress
//! (`execution_cached`, `executing`, `progress` per node, `executed`) and the outcome
//! (`execution_success`, `execution_error`, `execution_interrupted`; `executing` with no node
//! on older servers). On success the outputs listed by `GET /history/<prompt_id>` are fetched
//! with `GET /view?filename&subfolder&type` and returned as artifacts.
//!
//! Failure classes: `node_errors` from `/prompt` (an invalid workflow) fail without retry; an
//! execution error fails without retry unless it is an out-of-memory error; a server that cannot
//! be reached fails retryably. A dropped WebSocket is reopened with backoff and the outcome is
//! recovered from `/history`, which is also consulted whenever the socket stays silent for a
//! while; a server that knows the prompt neither in `/history` nor in `/queue` (it restarted)
//! fails the job retryably at once. Cancellation sends `POST /interrupt` (and removes the prompt from the queue if it had
//! not started).

use std::collections::HashSet;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use serde_json::{Map, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::http::{self, Backoff};
use super::simulation::json_kind;
use super::{Artifact, ArtifactBody, Connector, ConnectorError, Job, JobOutput, Progress, ProgressSink, or_cancelled};
use crate::config::ConnectorKind;
use crate::models::{ModelError, ModelStore, ModelsInUse};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the WebSocket may stay silent before `/history` is asked directly.
const SILENCE_CHECK: Duration = Duration::from_secs(10);
/// How long a lost ComfyUI may stay unreachable before the job fails (retryably).
const RECONNECT_LIMIT: Duration = Duration::from_secs(30);

/// What the server knows of a submitted prompt.
#[derive(Debug, Clone, PartialEq)]
enum Whereabouts {
    Finished(Outcome),
    /// Queued, running, or finished without its outcome written yet.
    Known,
    /// Neither in the history nor in the queue.
    Unknown,
}

/// Runs ComfyUI workflows on one ComfyUI server.
#[derive(Debug, Clone)]
pub struct ComfyuiConnector {
    base: Url,
    client: reqwest::Client,
    models: Option<ModelStore>,
}

/// How a prompt ended, as ComfyUI reported it.
#[derive(Debug, Clone, PartialEq)]
enum Outcome {
    Success,
    Error { message: String, retryable: bool },
    Interrupted,
}

impl ComfyuiConnector {
    /// A connector for the ComfyUI server at `base` (e.g. `http://127.0.0.1:8188`).
    pub fn new(base: Url) -> Self {
        ComfyuiConnector {
            base,
            client: http::client(),
            models: None,
        }
    }

    /// The same connector fetching the models a workflow names from `store` before submitting
    /// it (the machine's one store, shared by every GPU's connector).
    pub fn with_models(mut self, store: ModelStore) -> Self {
        self.models = Some(store);
        self
    }

    /// Makes the models `workflow` names present, reporting downloads as the job's progress;
    /// they stay in use (not evictable) while the guard lives.
    async fn models_for(
        &self,
        workflow: &Map<String, Value>,
        progress: &ProgressSink,
    ) -> Result<Option<ModelsInUse>, ConnectorError> {
        let Some(store) = &self.models else {
            return Ok(None);
        };
        let names = crate::models::references(workflow, store.loader_inputs());
        if names.is_empty() {
            return Ok(None);
        }
        let report = |name: &str, done: u64, size: u64| {
            let percent = if size == 0 {
                100.0
            } else {
                done as f64 * 100.0 / size as f64
            };
            progress.report(Progress {
                percent: percent.min(99.0),
                message: format!(
                    "downloading model {name}: {} of {} MB",
                    done / 1_000_000,
                    size / 1_000_000
                ),
                ..Progress::default()
            });
        };
        store.ensure(&names, &report).await.map(Some).map_err(|e| match e {
            ModelError::Unknown(_) => ConnectorError::Rejected { message: e.to_string() },
            e if e.is_retryable() => ConnectorError::unavailable("failed to fetch the workflow's models", e),
            e => ConnectorError::Failed {
                message: e.to_string(),
                retryable: false,
            },
        })
    }

    fn url(&self, path: &str) -> Url {
        let mut u = self.base.clone();
        u.set_path(path);
        u.set_query(None);
        u
    }

    fn ws_url(&self, client_id: &str) -> Url {
        let mut u = self.url("/ws");
        let scheme = if self.base.scheme() == "https" { "wss" } else { "ws" };
        u.set_scheme(scheme).expect("http(s) URLs can always become ws(s) URLs");
        u.query_pairs_mut().append_pair("clientId", client_id);
        u
    }

    async fn connect(&self, client_id: &str) -> Result<Socket, ConnectorError> {
        let url = self.ws_url(client_id);
        let (socket, _) = tokio_tungstenite::connect_async(url.as_str())
            .await
            .map_err(|e| ConnectorError::unavailable(format!("failed to open the ComfyUI WebSocket {url}"), e))?;
        Ok(socket)
    }

    async fn submit(&self, workflow: &Map<String, Value>, client_id: &str) -> Result<String, ConnectorError> {
        let body = serde_json::json!({"prompt": workflow, "client_id": client_id});
        let resp = self
            .client
            .post(self.url("/prompt"))
            .json(&body)
            .send()
            .await
            .map_err(|e| http::send_error("submit the prompt to ComfyUI", e))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| http::send_error("read ComfyUI's answer to /prompt", e))?;
        let parsed: Option<Value> = serde_json::from_str(&text).ok();
        if let Some(v) = &parsed {
            if let Some(message) = node_errors_message(v) {
                if let Some(id) = v.get("prompt_id").and_then(Value::as_str) {
                    // A prompt with some invalid outputs is queued anyway; do not let it run.
                    self.delete_from_queue(id).await;
                }
                return Err(ConnectorError::Rejected { message });
            }
        }
        if status == StatusCode::BAD_REQUEST {
            let message = parsed
                .as_ref()
                .and_then(|v| v.pointer("/error/message").and_then(Value::as_str))
                .map_or_else(|| http::snippet(&text), str::to_owned);
            return Err(ConnectorError::Rejected {
                message: format!("ComfyUI refused the prompt: {message}"),
            });
        }
        if !status.is_success() {
            return Err(http::status_error("ComfyUI /prompt", status, &text));
        }
        parsed
            .as_ref()
            .and_then(|v| v.get("prompt_id"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| ConnectorError::Unavailable {
                message: format!("ComfyUI answered /prompt without a prompt_id: {}", http::snippet(&text)),
                source: None,
            })
    }

    async fn history(&self, prompt_id: &str) -> Result<Option<Value>, ConnectorError> {
        let resp = self
            .client
            .get(self.url(&format!("/history/{prompt_id}")))
            .send()
            .await
            .map_err(|e| http::send_error("read the ComfyUI history", e))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(http::status_error("ComfyUI /history", status, &text));
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|e| http::send_error("parse the ComfyUI history", e))?;
        Ok(v.get(prompt_id).cloned())
    }

    /// Whether `/queue` lists the prompt as running or pending.
    async fn queued(&self, prompt_id: &str) -> Result<bool, ConnectorError> {
        let resp = self
            .client
            .get(self.url("/queue"))
            .send()
            .await
            .map_err(|e| http::send_error("read the ComfyUI queue", e))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(http::status_error("ComfyUI /queue", status, &text));
        }
        let v: Value = resp
            .json()
            .await
            .map_err(|e| http::send_error("parse the ComfyUI queue", e))?;
        Ok(queue_lists(&v, prompt_id))
    }

    /// What the server knows of the prompt: its outcome when it has finished, whether it is
    /// still queued or running, or nothing (the server restarted and lost it).
    async fn whereabouts(&self, prompt_id: &str) -> Result<Whereabouts, ConnectorError> {
        if let Some(entry) = self.history(prompt_id).await? {
            return Ok(history_outcome(&entry).map_or(Whereabouts::Known, Whereabouts::Finished));
        }
        if self.queued(prompt_id).await? {
            return Ok(Whereabouts::Known);
        }
        // The prompt may have finished between the two reads: upstream leaves the queue and
        // writes the history under one lock, so a second look at the history settles it.
        Ok(match self.history(prompt_id).await? {
            Some(entry) => history_outcome(&entry).map_or(Whereabouts::Known, Whereabouts::Finished),
            None => Whereabouts::Unknown,
        })
    }

    /// Reopens the WebSocket with backoff; gives up after [`RECONNECT_LIMIT`].
    async fn reconnect(&self, client_id: &str, cancel: &CancellationToken) -> Result<Socket, ConnectorError> {
        let backoff = Backoff::doubling(Duration::from_millis(100), Duration::from_secs(2));
        let start = tokio::time::Instant::now();
        let mut retry = 0;
        loop {
            match or_cancelled(cancel, self.connect(client_id)).await {
                Ok(s) => return Ok(s),
                Err(ConnectorError::Cancelled) => return Err(ConnectorError::Cancelled),
                Err(e) if start.elapsed() >= RECONNECT_LIMIT => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e.chain(), "ComfyUI WebSocket lost; reconnecting");
                    tokio::select! {
                        () = cancel.cancelled() => return Err(ConnectorError::Cancelled),
                        () = tokio::time::sleep(backoff.delay(retry, 0.0)) => {}
                    }
                    retry += 1;
                }
            }
        }
    }

    /// Asks ComfyUI to stop the prompt, best effort and bounded: the job ends either way.
    async fn interrupt(&self, prompt_id: &str) {
        let body = serde_json::json!({"prompt_id": prompt_id});
        let sent = self
            .client
            .post(self.url("/interrupt"))
            .json(&body)
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "failed to interrupt ComfyUI");
        }
        self.delete_from_queue(prompt_id).await;
    }

    async fn delete_from_queue(&self, prompt_id: &str) {
        let body = serde_json::json!({"delete": [prompt_id]});
        let _ = self
            .client
            .post(self.url("/queue"))
            .json(&body)
            .timeout(Duration::from_secs(2))
            .send()
            .await;
    }

    /// Reads the finished prompt's outputs: files become artifacts, the rest stays in `data`.
    async fn collect(&self, prompt_id: &str, cancel: &CancellationToken) -> Result<JobOutput, ConnectorError> {
        // ComfyUI announces success before it writes the history entry, so the entry may lag.
        let mut entry = None;
        for attempt in 0..60u32 {
            if let Some(h) = self.history(prompt_id).await? {
                if h.get("outputs").is_some() {
                    entry = Some(h);
                    break;
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return Err(ConnectorError::Cancelled),
                () = tokio::time::sleep(Duration::from_millis(u64::from(2 + attempt * 10).min(250))) => {}
            }
        }
        let entry = entry.ok_or_else(|| ConnectorError::Unavailable {
            message: format!("ComfyUI reported success but /history/{prompt_id} has no outputs"),
            source: None,
        })?;
        let outputs = entry.get("outputs").cloned().unwrap_or(Value::Object(Map::new()));
        let mut artifacts = Vec::new();
        if let Value::Object(nodes) = &outputs {
            for node_output in nodes.values() {
                let Value::Object(kinds) = node_output else { continue };
                for items in kinds.values() {
                    let Value::Array(items) = items else { continue };
                    for item in items {
                        if let Some(file) = OutputFile::from_json(item) {
                            let a = or_cancelled(cancel, self.fetch(&file)).await?;
                            artifacts.push(a);
                        }
                    }
                }
            }
        }
        Ok(JobOutput {
            data: serde_json::json!({"prompt_id": prompt_id, "outputs": outputs}),
            artifacts,
        })
    }

    async fn fetch(&self, file: &OutputFile) -> Result<Artifact, ConnectorError> {
        let mut url = self.url("/view");
        url.query_pairs_mut()
            .append_pair("filename", &file.filename)
            .append_pair("subfolder", &file.subfolder)
            .append_pair("type", &file.kind);
        let resp = self
            .client
            .get(url)
            .send()
            .await
            .map_err(|e| http::send_error("fetch an output from ComfyUI", e))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(http::status_error(
                &format!("ComfyUI /view {}", file.filename),
                status,
                &text,
            ));
        }
        let content_type = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .filter(|c| c != "application/octet-stream")
            .unwrap_or_else(|| guess_content_type(&file.filename).to_owned());
        let bytes: Bytes = resp
            .bytes()
            .await
            .map_err(|e| http::send_error("read an output from ComfyUI", e))?;
        Ok(Artifact {
            name: file.filename.clone(),
            content_type,
            body: ArtifactBody::Bytes(bytes),
        })
    }

    async fn run_job(
        &self,
        job: &Job,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<JobOutput, ConnectorError> {
        let workflow = workflow_of(&job.payload)?;
        let _models_in_use = or_cancelled(cancel, self.models_for(workflow, progress)).await?;
        let client_id = format!("machine-{}", hex::encode(rand::random::<[u8; 8]>()));
        let mut socket = or_cancelled(cancel, self.connect(&client_id)).await?;
        let prompt_id = or_cancelled(cancel, self.submit(workflow, &client_id)).await?;
        progress.report(Progress {
            percent: 0.0,
            message: "queued in ComfyUI".to_owned(),
            current_step: Some(0),
            total_steps: Some(workflow.len() as u32),
        });
        let mut tracker = Tracker::new(prompt_id.clone(), workflow);
        let outcome = loop {
            let next = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    self.interrupt(&prompt_id).await;
                    return Err(ConnectorError::Cancelled);
                }
                next = tokio::time::timeout(SILENCE_CHECK, socket.next()) => next,
            };
            let lost = match next {
                Err(_silence) => false,
                Ok(Some(Ok(Message::Text(text)))) => {
                    if let Some(outcome) = tracker.handle(text.as_str(), progress) {
                        break outcome;
                    }
                    continue;
                }
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => true,
                Ok(Some(Ok(_binary_preview_or_ping))) => continue,
            };
            if lost {
                socket = self.reconnect(&client_id, cancel).await.inspect_err(|e| {
                    if !matches!(e, ConnectorError::Cancelled) {
                        tracing::warn!(error = %e.chain(), "ComfyUI stayed unreachable");
                    }
                })?;
            }
            // After a reconnect or a long silence the outcome may have been missed: ask the
            // history, which ComfyUI keeps for finished prompts, and the queue. A server that
            // knows the prompt in neither restarted and lost it: nothing will ever finish it.
            match or_cancelled(cancel, self.whereabouts(&prompt_id)).await {
                Ok(Whereabouts::Finished(outcome)) => break outcome,
                Ok(Whereabouts::Known) => {}
                Ok(Whereabouts::Unknown) => {
                    return Err(ConnectorError::Failed {
                        message: format!(
                            "ComfyUI no longer knows prompt {prompt_id} (not in /history, not running or pending in /queue): it restarted and lost the job"
                        ),
                        retryable: true,
                    });
                }
                Err(ConnectorError::Cancelled) => {
                    self.interrupt(&prompt_id).await;
                    return Err(ConnectorError::Cancelled);
                }
                Err(e) => tracing::warn!(error = %e.chain(), "failed to read the ComfyUI history"),
            }
        };
        if outcome == Outcome::Success && !tracker.finished {
            // Upstream announces success before writing the history and sends `executing` with
            // no node after it; waiting briefly for that saves polling the history.
            let _ = tokio::time::timeout(Duration::from_millis(500), async {
                while let Some(Ok(msg)) = socket.next().await {
                    if let Message::Text(text) = msg {
                        tracker.handle(text.as_str(), progress);
                        if tracker.finished {
                            break;
                        }
                    }
                }
            })
            .await;
        }
        match outcome {
            Outcome::Success => {}
            Outcome::Error { message, retryable } => return Err(ConnectorError::Failed { message, retryable }),
            Outcome::Interrupted if cancel.is_cancelled() => return Err(ConnectorError::Cancelled),
            Outcome::Interrupted => {
                return Err(ConnectorError::Failed {
                    message: "ComfyUI interrupted the prompt (not at the machine's request)".to_owned(),
                    retryable: true,
                });
            }
        }
        progress.report(Progress {
            percent: 99.0,
            message: "collecting outputs".to_owned(),
            current_step: Some(workflow.len() as u32),
            total_steps: Some(workflow.len() as u32),
        });
        self.collect(&prompt_id, cancel).await
    }
}

impl Connector for ComfyuiConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Comfyui
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

/// The workflow in ComfyUI's API format: `payload.workflow`, or the payload itself; an object of
/// nodes, each an object with a `class_type`.
fn workflow_of(payload: &Value) -> Result<&Map<String, Value>, ConnectorError> {
    let candidate = payload.get("workflow").unwrap_or(payload);
    let Value::Object(nodes) = candidate else {
        return Err(ConnectorError::BadPayload(format!(
            "a ComfyUI workflow is a JSON object of nodes, not {}",
            json_kind(candidate)
        )));
    };
    if nodes.is_empty() {
        return Err(ConnectorError::BadPayload(
            "the ComfyUI workflow has no nodes".to_owned(),
        ));
    }
    for (id, node) in nodes {
        if node.get("class_type").and_then(Value::as_str).is_none() {
            return Err(ConnectorError::BadPayload(format!(
                "node `{id}` of the ComfyUI workflow has no `class_type` (is the workflow in API format?)"
            )));
        }
    }
    Ok(nodes)
}

/// A readable summary of `node_errors`, when there are any.
fn node_errors_message(v: &Value) -> Option<String> {
    let Value::Object(errors) = v.get("node_errors")? else {
        return None;
    };
    if errors.is_empty() {
        return None;
    }
    let mut parts = Vec::new();
    for (node, e) in errors {
        let class = e.get("class_type").and_then(Value::as_str).unwrap_or("?");
        let details: Vec<String> = e
            .get("errors")
            .and_then(Value::as_array)
            .map(|list| {
                list.iter()
                    .map(|x| {
                        let m = x.get("message").and_then(Value::as_str).unwrap_or("error");
                        match x.get("details").and_then(Value::as_str).filter(|d| !d.is_empty()) {
                            Some(d) => format!("{m}: {d}"),
                            None => m.to_owned(),
                        }
                    })
                    .collect()
            })
            .unwrap_or_default();
        parts.push(format!("node {node} ({class}): {}", details.join("; ")));
    }
    let head = v
        .pointer("/error/message")
        .and_then(Value::as_str)
        .unwrap_or("invalid workflow");
    Some(format!("{head}: {}", parts.join(", ")))
}

/// The outcome an `execution_error` describes; out-of-memory errors may succeed on a retry.
fn execution_error(data: &Value) -> Outcome {
    let s = |k: &str| data.get(k).and_then(Value::as_str).unwrap_or_default();
    let message = format!(
        "node {} ({}) raised {}: {}",
        s("node_id"),
        s("node_type"),
        s("exception_type"),
        s("exception_message").trim()
    );
    let lower = format!("{} {}", s("exception_type"), s("exception_message")).to_ascii_lowercase();
    let retryable = lower.contains("outofmemory") || lower.contains("out of memory");
    Outcome::Error { message, retryable }
}

/// Whether a `GET /queue` answer lists `prompt_id` as running or pending (items are
/// `[number, prompt_id, prompt, extra_data, outputs_to_execute]`).
fn queue_lists(queue: &Value, prompt_id: &str) -> bool {
    ["queue_running", "queue_pending"].iter().any(|k| {
        queue.get(*k).and_then(Value::as_array).is_some_and(|items| {
            items
                .iter()
                .any(|i| i.get(1).and_then(Value::as_str) == Some(prompt_id))
        })
    })
}

/// The outcome a finished history entry records; `None` while the prompt is not finished.
fn history_outcome(entry: &Value) -> Option<Outcome> {
    let status = entry.get("status")?;
    let messages = status.get("messages").and_then(Value::as_array);
    let find = |name: &str| {
        messages.and_then(|m| {
            m.iter()
                .find(|x| x.get(0).and_then(Value::as_str) == Some(name))
                .and_then(|x| x.get(1))
        })
    };
    if let Some(data) = find("execution_error") {
        return Some(execution_error(data));
    }
    if find("execution_interrupted").is_some() {
        return Some(Outcome::Interrupted);
    }
    match status.get("status_str").and_then(Value::as_str) {
        Some("success") => Some(Outcome::Success),
        Some("error") => Some(Outcome::Error {
            message: "ComfyUI recorded the prompt as failed".to_owned(),
            retryable: false,
        }),
        _ if status.get("completed").and_then(Value::as_bool) == Some(true) => Some(Outcome::Success),
        _ => None,
    }
}

/// A file listed in a node's output.
#[derive(Debug, Clone, PartialEq)]
struct OutputFile {
    filename: String,
    subfolder: String,
    kind: String,
}

impl OutputFile {
    /// Saved outputs only: `temp` files are previews.
    fn from_json(v: &Value) -> Option<OutputFile> {
        let filename = v.get("filename")?.as_str()?.to_owned();
        let kind = v.get("type").and_then(Value::as_str).unwrap_or("output").to_owned();
        if kind != "output" {
            return None;
        }
        Some(OutputFile {
            filename,
            subfolder: v
                .get("subfolder")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            kind,
        })
    }
}

/// A MIME type from a file name, for servers that send none.
pub(crate) fn guess_content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "json" => "application/json",
        "txt" => "text/plain",
        "glb" => "model/gltf-binary",
        _ => "application/octet-stream",
    }
}

/// Follows one prompt's events and turns them into progress and, at the end, an outcome.
///
/// Overall progress counts finished nodes (executed or cached) out of the workflow's nodes, plus
/// the running node's `value / max`.
#[derive(Debug)]
struct Tracker {
    prompt_id: String,
    total: usize,
    done: HashSet<String>,
    current: Option<String>,
    class_of: std::collections::HashMap<String, String>,
    node_fraction: f64,
    /// `executing` with no node arrived: the server is done with the prompt, history written.
    finished: bool,
}

impl Tracker {
    fn new(prompt_id: String, workflow: &Map<String, Value>) -> Tracker {
        Tracker {
            prompt_id,
            total: workflow.len().max(1),
            done: HashSet::new(),
            current: None,
            class_of: workflow
                .iter()
                .map(|(id, n)| {
                    let class = n.get("class_type").and_then(Value::as_str).unwrap_or_default();
                    (id.clone(), class.to_owned())
                })
                .collect(),
            node_fraction: 0.0,
            finished: false,
        }
    }

    fn report(&self, progress: &ProgressSink, message: String) {
        let done = self.done.len().min(self.total);
        let percent = (done as f64 + self.node_fraction) * 100.0 / self.total as f64;
        progress.report(Progress {
            // 100 is reserved for the end, after the outputs are collected.
            percent: percent.min(99.0),
            message,
            current_step: Some(done as u32),
            total_steps: Some(self.total as u32),
        });
    }

    fn node_label(&self, node: &str) -> String {
        match self.class_of.get(node).filter(|c| !c.is_empty()) {
            Some(class) => format!("{node} ({class})"),
            None => node.to_owned(),
        }
    }

    /// Handles one text message; returns the outcome when the prompt has finished.
    fn handle(&mut self, text: &str, progress: &ProgressSink) -> Option<Outcome> {
        let msg: Value = serde_json::from_str(text).ok()?;
        let kind = msg.get("type").and_then(Value::as_str)?;
        let data = msg.get("data").cloned().unwrap_or(Value::Null);
        // Events of other prompts (other clients of the same server) are not ours. Events with no
        // prompt id (`progress` on older servers) belong to whatever runs now.
        match data.get("prompt_id").and_then(Value::as_str) {
            Some(id) if id != self.prompt_id => return None,
            None if kind != "progress" => return None,
            None if self.current.is_none() => return None,
            _ => {}
        }
        match kind {
            "execution_start" => self.report(progress, "started".to_owned()),
            "execution_cached" => {
                if let Some(nodes) = data.get("nodes").and_then(Value::as_array) {
                    self.done
                        .extend(nodes.iter().filter_map(Value::as_str).map(str::to_owned));
                }
                self.report(progress, format!("{} cached node(s)", self.done.len()));
            }
            "executing" => match data.get("node").and_then(Value::as_str) {
                Some(node) => {
                    if let Some(prev) = self.current.replace(node.to_owned()) {
                        self.done.insert(prev);
                    }
                    self.node_fraction = 0.0;
                    self.report(progress, format!("executing node {}", self.node_label(node)));
                }
                // `executing` with a null node is how older servers say the prompt finished.
                None => {
                    self.finished = true;
                    return Some(Outcome::Success);
                }
            },
            "progress" => {
                let value = data.get("value").and_then(Value::as_f64).unwrap_or(0.0);
                let max = data.get("max").and_then(Value::as_f64).unwrap_or(0.0);
                if max > 0.0 {
                    self.node_fraction = (value / max).clamp(0.0, 1.0);
                }
                let node = data
                    .get("node")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| self.current.clone())
                    .unwrap_or_default();
                self.report(
                    progress,
                    format!("node {}: step {value} of {max}", self.node_label(&node)),
                );
            }
            "executed" => {
                if let Some(node) = data.get("node").and_then(Value::as_str) {
                    self.done.insert(node.to_owned());
                    if self.current.as_deref() == Some(node) {
                        self.current = None;
                    }
                    self.node_fraction = 0.0;
                    self.report(progress, format!("node {} done", self.node_label(node)));
                }
            }
            "execution_success" => return Some(Outcome::Success),
            "execution_error" => return Some(execution_error(&data)),
            "execution_interrupted" => return Some(Outcome::Interrupted),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn workflow() -> Value {
        json!({
            "3": {"class_type": "KSampler", "inputs": {}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
            "9": {"class_type": "SaveImage", "inputs": {}}
        })
    }

    #[test]
    fn workflow_is_the_payload_or_its_workflow_field() {
        let w = workflow();
        assert_eq!(workflow_of(&w).unwrap().len(), 3);
        assert_eq!(workflow_of(&json!({"workflow": w})).unwrap().len(), 3);
        assert!(matches!(workflow_of(&json!("x")), Err(ConnectorError::BadPayload(_))));
        assert!(matches!(workflow_of(&json!({})), Err(ConnectorError::BadPayload(_))));
        let e = workflow_of(&json!({"1": {"inputs": {}}})).unwrap_err();
        assert!(e.to_string().contains("API format"), "{e}");
    }

    #[test]
    fn node_errors_read_well() {
        let v = json!({
            "error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation"},
            "node_errors": {"3": {"class_type": "KSampler", "errors": [{"message": "Required input is missing", "details": "model"}]}}
        });
        assert_eq!(
            node_errors_message(&v).unwrap(),
            "Prompt outputs failed validation: node 3 (KSampler): Required input is missing: model"
        );
        assert_eq!(node_errors_message(&json!({"prompt_id": "x", "node_errors": {}})), None);
    }

    #[test]
    fn tracker_maps_events_to_progress_and_outcome() {
        let w = workflow();
        let mut t = Tracker::new("p1".into(), w.as_object().unwrap());
        let (sink, rx) = ProgressSink::new();
        let ev = |t: &mut Tracker, v: Value| t.handle(&v.to_string(), &sink);
        assert_eq!(ev(&mut t, json!({"type": "status", "data": {"status": {}}})), None);
        ev(
            &mut t,
            json!({"type": "execution_cached", "data": {"nodes": ["4"], "prompt_id": "p1"}}),
        );
        assert_eq!(rx.borrow().1.current_step, Some(1));
        ev(
            &mut t,
            json!({"type": "executing", "data": {"node": "3", "prompt_id": "p1"}}),
        );
        ev(
            &mut t,
            json!({"type": "progress", "data": {"value": 10, "max": 20, "node": "3", "prompt_id": "p1"}}),
        );
        assert!((rx.borrow().1.percent - 50.0).abs() < 1e-9, "{:?}", rx.borrow());
        // Another prompt's events change nothing.
        ev(
            &mut t,
            json!({"type": "progress", "data": {"value": 20, "max": 20, "prompt_id": "other"}}),
        );
        assert!((rx.borrow().1.percent - 50.0).abs() < 1e-9);
        ev(
            &mut t,
            json!({"type": "executed", "data": {"node": "3", "output": {}, "prompt_id": "p1"}}),
        );
        assert_eq!(rx.borrow().1.current_step, Some(2));
        assert_eq!(
            ev(
                &mut t,
                json!({"type": "execution_success", "data": {"prompt_id": "p1"}})
            ),
            Some(Outcome::Success)
        );
        let oom = ev(
            &mut t,
            json!({"type": "execution_error", "data": {"prompt_id": "p1", "node_id": "3", "node_type": "KSampler",
                "exception_type": "torch.OutOfMemoryError", "exception_message": "CUDA out of memory"}}),
        );
        assert!(matches!(oom, Some(Outcome::Error { retryable: true, .. })), "{oom:?}");
        assert_eq!(
            ev(
                &mut t,
                json!({"type": "executing", "data": {"node": null, "prompt_id": "p1"}})
            ),
            Some(Outcome::Success)
        );
    }

    #[test]
    fn the_queue_lists_running_and_pending_prompts() {
        let q = json!({"queue_running": [[0, "a", {}, {}, []]], "queue_pending": [[1, "b", {}, {}, []]]});
        assert!(queue_lists(&q, "a"));
        assert!(queue_lists(&q, "b"));
        assert!(!queue_lists(&q, "c"));
        assert!(!queue_lists(&json!({}), "a"));
    }

    #[test]
    fn history_outcomes() {
        assert_eq!(history_outcome(&json!({"outputs": {}})), None);
        assert_eq!(
            history_outcome(&json!({"status": {"status_str": "success", "completed": true, "messages": []}})),
            Some(Outcome::Success)
        );
        let e = history_outcome(
            &json!({"status": {"status_str": "error", "completed": false, "messages": [
                ["execution_start", {}],
                ["execution_error", {"node_id": "3", "node_type": "KSampler", "exception_type": "ValueError", "exception_message": "bad"}]
            ]}}),
        );
        assert_eq!(
            e,
            Some(Outcome::Error {
                message: "node 3 (KSampler) raised ValueError: bad".into(),
                retryable: false
            })
        );
    }

    #[test]
    fn only_saved_outputs_are_fetched() {
        assert!(OutputFile::from_json(&json!({"filename": "a.png", "subfolder": "", "type": "temp"})).is_none());
        assert_eq!(
            OutputFile::from_json(&json!({"filename": "a.png", "subfolder": "x", "type": "output"})),
            Some(OutputFile {
                filename: "a.png".into(),
                subfolder: "x".into(),
                kind: "output".into()
            })
        );
        assert_eq!(guess_content_type("x.PNG"), "image/png");
    }
}

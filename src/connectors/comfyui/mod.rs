//! The ComfyUI connector: runs a workflow on the ComfyUI server of this worker's GPU through
//! ComfyUI's own API.
//!
//! It opens `ws://host:port/ws?clientId=<id>` before submitting, so no event of the job can be
//! missed, then `POST /prompt {prompt, client_id}` (the workflow is `payload.workflow` or the
//! payload itself, in ComfyUI's API format). The WebSocket events for that prompt drive progress
//! (`execution_cached`, `executing`, `progress` per node, `executed`) and the outcome
//! (`execution_success`, `execution_error`, `execution_interrupted`; `executing` with no node
//! on older servers). On success the outputs listed by `GET /history/<prompt_id>` are returned as
//! artifacts to fetch with `GET /view?filename&subfolder&type` ([`super::fetch`]): the worker's
//! upload stage fetches them while ComfyUI already runs the next prompt, so its queue never
//! waits for the downloads.
//!
//! Failure classes: `node_errors` from `/prompt` (an invalid workflow) fail without retry; an
//! execution error fails without retry unless it is an out-of-memory error; a server that cannot
//! be reached fails retryably. A dropped WebSocket is reopened with backoff and the outcome is
//! recovered from `/history`, which is also consulted whenever the socket stays silent for a
//! while; a server that knows the prompt neither in `/history` nor in `/queue` (it restarted)
//! fails the job retryably at once. Cancellation sends `POST /interrupt` (and removes the prompt from the queue if it had
//! not started).
//!
//! A prompt about which the server says nothing for the stall timeout (no event of it on the
//! socket; `progress` of a long node counts, so a slow node is not silence) is interrupted and
//! fails retryably as stalled ([`super::stall`]), noting whether `/system_stats` still answers.
//!
//! Reading what ComfyUI says about the prompt (its events, `/history`, `/queue`) is
//! [`tracker`]'s; this module talks to the server.

mod tracker;

use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use reqwest::StatusCode;
use serde_json::{Map, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::fetch::Fetch;
use super::http::{self, Backoff};
use super::stall::StallClock;
use super::{
    Artifact, ArtifactBody, Connector, ConnectorError, Job, JobOutput, Progress, ProgressSink, guess_content_type,
    json_kind, or_cancelled,
};
use crate::config::ConnectorKind;
use crate::models::{ModelError, ModelStore, ModelsInUse};
use tracker::{PromptEnd, PromptTracker, history_outcome, queue_is_empty, queue_lists};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long the WebSocket may stay silent before `/history` is asked directly.
const SILENCE_CHECK: Duration = Duration::from_secs(10);
/// How long a lost ComfyUI may stay unreachable before the job fails (retryably).
const RECONNECT_LIMIT: Duration = Duration::from_secs(30);
/// The limit of one short request (`/history`, `/queue`): a stopped process accepts the
/// connection and never answers, and the caller must go on.
const SHORT_REQUEST: Duration = Duration::from_secs(5);
/// The limit of the `/interrupt` and queue removal sent when a job ends early: best effort.
const INTERRUPT_LIMIT: Duration = Duration::from_secs(2);

/// What the server knows of a submitted prompt.
#[derive(Debug, Clone, PartialEq)]
enum Whereabouts {
    Finished(PromptEnd),
    /// Queued, running, or finished without its outcome written yet.
    Known,
    /// Neither in the history nor in the queue.
    Unknown,
}

/// A prompt ComfyUI accepted: the socket that hears its events, and what they said so far.
struct Submitted {
    socket: Socket,
    tracker: PromptTracker,
    prompt_id: String,
    client_id: String,
}

/// Runs ComfyUI workflows on one ComfyUI server.
#[derive(Debug, Clone)]
pub struct ComfyuiConnector {
    base: Url,
    client: reqwest::Client,
    models: Option<ModelStore>,
    stall_timeout: Duration,
}

impl ComfyuiConnector {
    /// A connector for the ComfyUI server at `base` (e.g. `http://127.0.0.1:8188`).
    pub fn new(base: Url) -> Self {
        ComfyuiConnector {
            base,
            client: http::client(),
            models: None,
            stall_timeout: super::stall::DEFAULT_TIMEOUT,
        }
    }

    /// The same connector giving up on a prompt after `timeout` without a word about it (a job's
    /// `stall_timeout_seconds` may raise it).
    pub fn with_stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Whether the server answers its health check (`/system_stats`) within a few seconds.
    async fn answers(&self) -> bool {
        http::answers(&self.client, self.url("/system_stats")).await
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
        let names = crate::models::references(workflow, &store.loader_inputs());
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
            .timeout(SHORT_REQUEST)
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

    /// `GET /queue`: the running and pending prompts.
    async fn queue(&self) -> Result<Value, ConnectorError> {
        let resp = self
            .client
            .get(self.url("/queue"))
            .timeout(SHORT_REQUEST)
            .send()
            .await
            .map_err(|e| http::send_error("read the ComfyUI queue", e))?;
        let status = resp.status();
        if !status.is_success() {
            let text = resp.text().await.unwrap_or_default();
            return Err(http::status_error("ComfyUI /queue", status, &text));
        }
        resp.json()
            .await
            .map_err(|e| http::send_error("parse the ComfyUI queue", e))
    }

    /// Whether `/queue` lists the prompt as running or pending.
    async fn queued(&self, prompt_id: &str) -> Result<bool, ConnectorError> {
        Ok(queue_lists(&self.queue().await?, prompt_id))
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

    /// Asks ComfyUI to stop the prompt and removes it from the queue, both at once, best effort
    /// and bounded by [`INTERRUPT_LIMIT`]: the job ends either way.
    async fn interrupt(&self, prompt_id: &str) {
        let body = serde_json::json!({"prompt_id": prompt_id});
        let sent = self
            .client
            .post(self.url("/interrupt"))
            .json(&body)
            .timeout(INTERRUPT_LIMIT)
            .send();
        let (sent, ()) = tokio::join!(sent, self.delete_from_queue(prompt_id));
        if let Err(e) = sent {
            tracing::warn!(error = %e, "failed to interrupt ComfyUI");
        }
    }

    async fn delete_from_queue(&self, prompt_id: &str) {
        let body = serde_json::json!({"delete": [prompt_id]});
        let _ = self
            .client
            .post(self.url("/queue"))
            .json(&body)
            .timeout(INTERRUPT_LIMIT)
            .send()
            .await;
    }

    /// Ends a stalled prompt: interrupts it and asks the health check at the same time, so the
    /// stall is declared within a few seconds of its deadline whatever the server does.
    async fn stalled(&self, prompt_id: &str, clock: &StallClock) -> ConnectorError {
        let silent_for = clock.silent_for();
        let ((), answers) = tokio::join!(self.interrupt(prompt_id), self.answers());
        let e = clock.stalled("comfyui", silent_for, answers);
        tracing::warn!(%prompt_id, error = %e, "the prompt stalled; interrupted it");
        e
    }

    /// Reads the finished prompt's outputs: files become artifacts to be fetched from `/view`
    /// by the worker (ComfyUI keeps them and serves them while it runs the next prompt), the
    /// rest stays in `data`.
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
                    artifacts.extend(
                        items
                            .iter()
                            .filter_map(OutputFile::from_json)
                            .map(|f| self.artifact(&f)),
                    );
                }
            }
        }
        Ok(JobOutput {
            data: serde_json::json!({"prompt_id": prompt_id, "outputs": outputs}),
            artifacts,
        })
    }

    /// An output file as an artifact to fetch with `GET /view?filename&subfolder&type`.
    fn artifact(&self, file: &OutputFile) -> Artifact {
        let mut url = self.url("/view");
        url.query_pairs_mut()
            .append_pair("filename", &file.filename)
            .append_pair("subfolder", &file.subfolder)
            .append_pair("type", &file.kind);
        Artifact {
            name: file.filename.clone(),
            content_type: guess_content_type(&file.filename).to_owned(),
            body: ArtifactBody::Fetch(Fetch::new(
                self.client.clone(),
                url,
                format!("ComfyUI /view {}", file.filename),
            )),
        }
    }

    /// Connects the WebSocket, then submits the workflow, both raced against the stall clock
    /// (a stopped ComfyUI accepts connections and answers nothing, and its job must still end
    /// in time).
    async fn start(
        &self,
        workflow: &Map<String, Value>,
        clock: &mut StallClock,
        cancel: &CancellationToken,
    ) -> Result<Submitted, ConnectorError> {
        let client_id = format!("machine-{}", hex::encode(rand::random::<[u8; 8]>()));
        let Some(socket) = clock.within(or_cancelled(cancel, self.connect(&client_id))).await else {
            return Err(clock.stalled("comfyui", clock.silent_for(), self.answers().await));
        };
        let socket = socket?;
        let Some(prompt_id) = clock
            .within(or_cancelled(cancel, self.submit(workflow, &client_id)))
            .await
        else {
            return Err(clock.stalled("comfyui", clock.silent_for(), self.answers().await));
        };
        let prompt_id = prompt_id?;
        clock.heard();
        Ok(Submitted {
            socket,
            tracker: PromptTracker::new(prompt_id.clone(), workflow),
            prompt_id,
            client_id,
        })
    }

    /// Follows the prompt's events until its outcome, reopening a lost WebSocket and asking
    /// the history and the queue after a reconnect or a long silence.
    async fn follow(
        &self,
        prompt: &mut Submitted,
        clock: &mut StallClock,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<PromptEnd, ConnectorError> {
        let Submitted {
            socket,
            tracker,
            prompt_id,
            client_id,
        } = prompt;
        loop {
            let next = tokio::select! {
                biased;
                () = cancel.cancelled() => {
                    self.interrupt(prompt_id).await;
                    return Err(ConnectorError::Cancelled);
                }
                () = clock.expired() => return Err(self.stalled(prompt_id, clock).await),
                next = tokio::time::timeout(SILENCE_CHECK, socket.next()) => next,
            };
            let lost = match next {
                Err(_silence) => false,
                Ok(Some(Ok(Message::Text(text)))) => {
                    let words = tracker.words;
                    let outcome = tracker.handle(text.as_str(), progress);
                    if tracker.words != words {
                        clock.heard();
                    }
                    if let Some(outcome) = outcome {
                        return Ok(outcome);
                    }
                    continue;
                }
                Ok(Some(Ok(Message::Close(_)) | Err(_)) | None) => true,
                Ok(Some(Ok(_binary_preview_or_ping))) => continue,
            };
            if lost {
                let Some(reconnected) = clock.within(self.reconnect(client_id, cancel)).await else {
                    return Err(self.stalled(prompt_id, clock).await);
                };
                *socket = match reconnected {
                    Ok(socket) => socket,
                    Err(ConnectorError::Cancelled) => return Err(ConnectorError::Cancelled),
                    Err(e) => {
                        tracing::warn!(error = %e.chain(), "ComfyUI stayed unreachable");
                        return Err(ConnectorError::ServiceLost {
                            service: "comfyui".to_owned(),
                            message: format!("its WebSocket closed mid-job and it stayed unreachable: {}", e.chain()),
                        });
                    }
                };
            }
            if let Some(outcome) = self.look_up(prompt_id, clock, cancel).await? {
                return Ok(outcome);
            }
        }
    }

    /// After a reconnect or a long silence the outcome may have been missed: asks the history,
    /// which ComfyUI keeps for finished prompts, and the queue. A server that knows the prompt
    /// in neither restarted and lost it: nothing will ever finish it.
    async fn look_up(
        &self,
        prompt_id: &str,
        clock: &StallClock,
        cancel: &CancellationToken,
    ) -> Result<Option<PromptEnd>, ConnectorError> {
        let Some(whereabouts) = clock.within(or_cancelled(cancel, self.whereabouts(prompt_id))).await else {
            return Err(self.stalled(prompt_id, clock).await);
        };
        match whereabouts {
            Ok(Whereabouts::Finished(outcome)) => Ok(Some(outcome)),
            Ok(Whereabouts::Known) => Ok(None),
            Ok(Whereabouts::Unknown) => Err(ConnectorError::ServiceLost {
                service: "comfyui".to_owned(),
                message: format!(
                    "ComfyUI no longer knows prompt {prompt_id} (not in /history, not running or pending in /queue): it restarted"
                ),
            }),
            Err(ConnectorError::Cancelled) => {
                self.interrupt(prompt_id).await;
                Err(ConnectorError::Cancelled)
            }
            Err(e) => {
                tracing::warn!(error = %e.chain(), "failed to read the ComfyUI history");
                Ok(None)
            }
        }
    }

    /// After a success event, waits briefly for the end of the prompt's run: upstream
    /// announces success before writing the history and sends `executing` with no node after
    /// it, and hearing that saves polling the history.
    async fn hear_the_end(&self, prompt: &mut Submitted, progress: &ProgressSink) {
        let _ = tokio::time::timeout(Duration::from_millis(500), async {
            while let Some(Ok(msg)) = prompt.socket.next().await {
                if let Message::Text(text) = msg {
                    prompt.tracker.handle(text.as_str(), progress);
                    if prompt.tracker.finished {
                        break;
                    }
                }
            }
        })
        .await;
    }

    async fn run_job(
        &self,
        job: &Job,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<JobOutput, ConnectorError> {
        let workflow = workflow_of(&job.payload)?;
        let _models_in_use = or_cancelled(cancel, self.models_for(workflow, progress)).await?;
        let mut clock = StallClock::start(self.stall_timeout, job);
        let mut prompt = self.start(workflow, &mut clock, cancel).await?;
        let steps = u32::try_from(workflow.len()).unwrap_or(u32::MAX);
        progress.report(Progress {
            percent: 0.0,
            message: "queued in ComfyUI".to_owned(),
            current_step: Some(0),
            total_steps: Some(steps),
        });
        let outcome = self.follow(&mut prompt, &mut clock, progress, cancel).await?;
        if outcome == PromptEnd::Success && !prompt.tracker.finished {
            self.hear_the_end(&mut prompt, progress).await;
        }
        outcome_error(outcome, cancel)?;
        progress.report(Progress {
            percent: 99.0,
            message: "collecting outputs".to_owned(),
            current_step: Some(steps),
            total_steps: Some(steps),
        });
        clock.heard();
        match clock.within(self.collect(&prompt.prompt_id, cancel)).await {
            Some(collected) => collected,
            None => Err(clock.stalled("comfyui", clock.silent_for(), self.answers().await)),
        }
    }
}

/// The error of a prompt that did not succeed, blamed by what ended it.
fn outcome_error(outcome: PromptEnd, cancel: &CancellationToken) -> Result<(), ConnectorError> {
    match outcome {
        PromptEnd::Success => Ok(()),
        PromptEnd::Error { message, gpu: true } => Err(ConnectorError::MachineFault {
            message: format!("the GPU ran out of memory under the job: {message}"),
        }),
        PromptEnd::Error { message, gpu: false } => Err(ConnectorError::Failed {
            message,
            retryable: false,
        }),
        PromptEnd::Interrupted if cancel.is_cancelled() => Err(ConnectorError::Cancelled),
        PromptEnd::Interrupted => Err(ConnectorError::MachineFault {
            message: "ComfyUI interrupted the prompt (not at the machine's request)".to_owned(),
        }),
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

    /// Idle when `/queue` lists nothing running or pending: an interrupted prompt is listed as
    /// running until its node ends.
    fn idle(&self) -> BoxFuture<'_, Result<bool, ConnectorError>> {
        Box::pin(async { Ok(queue_is_empty(&self.queue().await?)) })
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

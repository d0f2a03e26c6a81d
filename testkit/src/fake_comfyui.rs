//! A fake ComfyUI server speaking ComfyUI's HTTP and WebSocket API with upstream's message
//! shapes: `POST /prompt`, `GET /ws?clientId=`, `GET /history/<id>`, `GET /view`,
//! `POST /interrupt`, `GET /queue`, `POST /queue`, `GET /system_stats`, `GET /object_info`.
//!
//! Prompts run one at a time in submission order, as in ComfyUI. What a prompt does is decided
//! by its nodes, so a test (or a job sent to the standalone `fake_comfyui` example of the machine package) scripts it:
//! - any node: `inputs.steps` progress events, `inputs.step_ms` apart; `inputs.cached = true`
//!   reports it in `execution_cached` instead of running it; `inputs.busy_ms` makes it work that
//!   long without a word and without looking at interrupts, as an upstream node without a
//!   progress hook does (a VAE decode): an interrupt ends the prompt only when the node ends,
//!   and `/queue` lists the prompt as running until then;
//! - `SaveImage`: writes a PNG named from `inputs.filename_prefix` (type `output`);
//!   `PreviewImage` writes one of type `temp`; with `inputs.view_ms`, `/view` of that file
//!   sends its headers (with `Content-Length`) and the first half of the file at once and the
//!   rest that much later, as a large output over a busy server does;
//! - `FakeError`: `execution_error` with `inputs.exception_type` / `inputs.message`;
//! - `FakeInvalid`: `/prompt` answers 400 with `node_errors`, as for a missing input;
//! - `FakeDropSocket`: the server drops the client's WebSocket at that node (without a close
//!   frame) and goes on running;
//! - `FakeStall`: the prompt goes silent at that node, WebSocket open, no message at all, for
//!   `inputs.silent_ms` (default: until interrupted); with `inputs.hang = true` the server also
//!   stops answering `/system_stats` from then on, as a wedged ComfyUI does;
//! - `FakeGrow`: the server keeps `inputs.mb` MiB more memory (touched, so its RSS grows) for
//!   the rest of its life, as a leaking node does;
//! - with a models folder ([`FakeComfyui::start_with_models`]), a loader input (`ckpt_name`,
//!   `lora_name`, `vae_name`, ...) naming a file absent from its folder is refused by `/prompt`
//!   with upstream's `value_not_in_list` node error.
//!
//! The history entry is written a few milliseconds after `execution_success`, as upstream does.
//!
//! The fake records, in order, the prompts it accepted and the `/view` requests it began and
//! ended ([`FakeComfyui::seen`]), so a test can tell what overlapped; [`FakeComfyui::fail_views`]
//! makes the next `/view` requests answer 503 (after their `view_ms`), as a server restarting
//! under them does.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{Notify, mpsc};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

use crate::serve::{Served, TINY_PNG, serve};

/// A running fake ComfyUI; stopped on drop.
#[derive(Debug)]
pub struct FakeComfyui {
    served: Served,
    state: Arc<Comfy>,
}

impl FakeComfyui {
    /// Starts on a free loopback port.
    pub fn start() -> FakeComfyui {
        Self::start_on(0)
    }

    /// Starts on a free port, validating loader inputs against `models` (ComfyUI's `models/`).
    pub fn start_with_models(models: &std::path::Path) -> FakeComfyui {
        Self::start_on_with_models(0, Some(models))
    }

    /// Starts on `127.0.0.1:port` (0 = any free port), validating loader inputs against
    /// `models` when given.
    pub fn start_on_with_models(port: u16, models: Option<&std::path::Path>) -> FakeComfyui {
        let state = Arc::new(Comfy {
            models: models.map(ToOwned::to_owned),
            ..Comfy::default()
        });
        Self::serve(port, state)
    }

    /// Starts on `127.0.0.1:port` (0 = any free port).
    pub fn start_on(port: u16) -> FakeComfyui {
        Self::serve(port, Arc::new(Comfy::default()))
    }

    fn serve(port: u16, state: Arc<Comfy>) -> FakeComfyui {
        let s = state.clone();
        let served = serve(port, move || {
            tokio::spawn(executor(s.clone()));
            router(s)
        });
        FakeComfyui { served, state }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.served.addr)
    }

    /// How many prompts `/prompt` accepted.
    pub fn prompts_accepted(&self) -> usize {
        self.state.accepted.load(Ordering::SeqCst)
    }

    /// How many `POST /interrupt` arrived.
    pub fn interrupts(&self) -> usize {
        self.state.interrupts.load(Ordering::SeqCst)
    }

    /// How many WebSocket connections were opened.
    pub fn ws_connections(&self) -> usize {
        self.state.ws_connections.load(Ordering::SeqCst)
    }

    /// Whether a prompt is running now.
    pub fn busy(&self) -> bool {
        self.state.running.lock().expect("fake lock").is_some()
    }

    /// What the fake saw, in order: prompts accepted, `/view` requests begun and ended.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().expect("fake lock").clone()
    }

    /// The next `n` `/view` requests answer 503 Service Unavailable (after their `view_ms`).
    pub fn fail_views(&self, n: usize) {
        self.state.failing_views.store(n, Ordering::SeqCst);
    }

    /// Serves until the process is killed (for the standalone binary).
    pub fn wait(self) {
        self.served.wait();
    }
}

/// A request the fake saw, for tests that check what overlapped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seen {
    /// `/prompt` accepted a prompt; the `filename_prefix` of its `SaveImage` nodes, joined with
    /// `,` (empty when it has none).
    Prompt(String),
    /// A `/view` of this file began.
    ViewBegan(String),
    /// A `/view` of this file sent its last byte (or its error).
    ViewEnded(String),
}

/// A file a prompt wrote, and how slowly `/view` serves it.
#[derive(Debug, Clone)]
struct Saved {
    bytes: Vec<u8>,
    view_delay: Duration,
}

#[derive(Debug)]
struct QueuedPrompt {
    id: String,
    number: u64,
    client_id: String,
    prompt: serde_json::Map<String, Value>,
}

#[derive(Debug, Default)]
struct Comfy {
    queue: Mutex<VecDeque<QueuedPrompt>>,
    wake: Notify,
    running: Mutex<Option<String>>,
    interrupt: AtomicBool,
    history: Mutex<HashMap<String, Value>>,
    files: Mutex<HashMap<(String, String, String), Saved>>,
    /// What tests read back through [`FakeComfyui::seen`].
    seen: Mutex<Vec<Seen>>,
    /// How many `/view` requests still answer 503.
    failing_views: AtomicUsize,
    clients: Mutex<HashMap<String, Vec<mpsc::UnboundedSender<Outgoing>>>>,
    accepted: AtomicUsize,
    interrupts: AtomicUsize,
    ws_connections: AtomicUsize,
    counter: AtomicUsize,
    models: Option<std::path::PathBuf>,
    /// `/system_stats` no longer answers (a `FakeStall` with `hang`).
    hung: AtomicBool,
    /// Memory `FakeGrow` nodes keep.
    kept: Mutex<Vec<Vec<u8>>>,
}

/// Loader inputs and the models folder each names a file in, as upstream's loaders declare.
const LOADERS: &[(&str, &str)] = &[
    ("ckpt_name", "checkpoints"),
    ("lora_name", "loras"),
    ("vae_name", "vae"),
    ("unet_name", "unet"),
    ("clip_name", "clip"),
    ("control_net_name", "controlnet"),
    ("model_name", "upscale_models"),
];

#[derive(Debug)]
enum Outgoing {
    Text(String),
    Drop,
}

impl Comfy {
    fn send(&self, client_id: &str, kind: &str, data: Value) {
        let text = json!({"type": kind, "data": data}).to_string();
        if let Some(list) = self.clients.lock().expect("fake lock").get_mut(client_id) {
            list.retain(|tx| tx.send(Outgoing::Text(text.clone())).is_ok());
        }
    }

    fn drop_sockets(&self, client_id: &str) {
        if let Some(list) = self.clients.lock().expect("fake lock").remove(client_id) {
            for tx in list {
                let _ = tx.send(Outgoing::Drop);
            }
        }
    }

    fn saw(&self, seen: Seen) {
        self.seen.lock().expect("fake lock").push(seen);
    }

    fn queue_remaining(&self) -> usize {
        self.queue.lock().expect("fake lock").len() + usize::from(self.running.lock().expect("fake lock").is_some())
    }
}

fn router(state: Arc<Comfy>) -> Router {
    Router::new()
        .route("/prompt", post(submit).get(prompt_info))
        .route("/ws", get(ws))
        .route("/history/{id}", get(history))
        .route("/view", get(view))
        .route("/interrupt", post(interrupt))
        .route("/queue", post(queue_edit).get(queue_list))
        .route("/system_stats", get(system_stats))
        .route("/object_info", get(object_info))
        .with_state(state)
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

async fn submit(State(s): State<Arc<Comfy>>, Json(body): Json<Value>) -> Response {
    let Some(prompt) = body.get("prompt").and_then(Value::as_object).cloned() else {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"type": "no_prompt", "message": "No prompt provided", "details": "No prompt provided", "extra_info": {}}, "node_errors": {}})),
        )
            .into_response();
    };
    let mut node_errors = serde_json::Map::new();
    for (id, node) in &prompt {
        let class = node.get("class_type").and_then(Value::as_str);
        match class {
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    Json(json!({"error": {"type": "invalid_prompt", "message": format!("Cannot execute because a node is missing the class_type property.: Node ID '#{id}'"), "details": "", "extra_info": {}}, "node_errors": {}})),
                )
                    .into_response();
            }
            Some("FakeInvalid") => {
                node_errors.insert(
                    id.clone(),
                    json!({"errors": [{"type": "required_input_missing", "message": "Required input is missing", "details": "model", "extra_info": {"input_name": "model"}}],
                           "dependent_outputs": [], "class_type": "FakeInvalid"}),
                );
            }
            Some(class) => {
                let Some(models) = &s.models else { continue };
                for (input, folder) in LOADERS {
                    let Some(file) = node.pointer(&format!("/inputs/{input}")).and_then(Value::as_str) else {
                        continue;
                    };
                    if !models.join(folder).join(file).is_file() {
                        node_errors.insert(
                            id.clone(),
                            json!({"errors": [{"type": "value_not_in_list", "message": "Value not in list",
                                               "details": format!("{input}: '{file}' not in []"),
                                               "extra_info": {"input_name": input}}],
                                   "dependent_outputs": [], "class_type": class}),
                        );
                    }
                }
            }
        }
    }
    if !node_errors.is_empty() {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"error": {"type": "prompt_outputs_failed_validation", "message": "Prompt outputs failed validation", "details": "", "extra_info": {}},
                        "node_errors": node_errors})),
        )
            .into_response();
    }
    let n = s.counter.fetch_add(1, Ordering::SeqCst) as u64;
    let id = format!("{:08x}-fake-{n:012x}", now_ms() as u32);
    let client_id = body
        .get("client_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    s.accepted.fetch_add(1, Ordering::SeqCst);
    let prefixes: Vec<&str> = prompt
        .values()
        .filter(|node| node.get("class_type").and_then(Value::as_str) == Some("SaveImage"))
        .filter_map(|node| node.pointer("/inputs/filename_prefix").and_then(Value::as_str))
        .collect();
    s.saw(Seen::Prompt(prefixes.join(",")));
    s.queue.lock().expect("fake lock").push_back(QueuedPrompt {
        id: id.clone(),
        number: n,
        client_id,
        prompt,
    });
    s.wake.notify_one();
    Json(json!({"prompt_id": id, "number": n, "node_errors": {}})).into_response()
}

async fn prompt_info(State(s): State<Arc<Comfy>>) -> Json<Value> {
    Json(json!({"exec_info": {"queue_remaining": s.queue_remaining()}}))
}

async fn ws(State(s): State<Arc<Comfy>>, Query(q): Query<HashMap<String, String>>, mut req: Request) -> Response {
    let Some(key) = req.headers().get("sec-websocket-key").cloned() else {
        return (StatusCode::BAD_REQUEST, "expected a WebSocket upgrade").into_response();
    };
    let client_id = q
        .get("clientId")
        .cloned()
        .unwrap_or_else(|| format!("anon-{}", s.counter.fetch_add(1, Ordering::SeqCst)));
    let upgrade = hyper::upgrade::on(&mut req);
    s.ws_connections.fetch_add(1, Ordering::SeqCst);
    // Register before answering, so an event sent right after the handshake is not lost.
    let (tx, mut rx) = mpsc::unbounded_channel();
    s.clients
        .lock()
        .expect("fake lock")
        .entry(client_id.clone())
        .or_default()
        .push(tx);
    s.send(
        &client_id,
        "status",
        json!({"status": {"exec_info": {"queue_remaining": s.queue_remaining()}}, "sid": client_id}),
    );
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        loop {
            tokio::select! {
                out = rx.recv() => match out {
                    Some(Outgoing::Text(t)) => {
                        if socket.send(Message::text(t)).await.is_err() {
                            break;
                        }
                    }
                    // Dropping the stream closes the TCP connection with no close frame.
                    Some(Outgoing::Drop) | None => break,
                },
                incoming = socket.next() => match incoming {
                    Some(Ok(Message::Close(_)) | Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
            }
        }
    });
    let mut resp = Response::new(Body::empty());
    *resp.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = resp.headers_mut();
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(
        "sec-websocket-accept",
        HeaderValue::from_str(&derive_accept_key(key.as_bytes())).expect("an accept key is base64"),
    );
    resp
}

async fn history(State(s): State<Arc<Comfy>>, Path(id): Path<String>) -> Json<Value> {
    let h = s.history.lock().expect("fake lock");
    match h.get(&id) {
        Some(entry) => Json(json!({ id: entry })),
        None => Json(json!({})),
    }
}

async fn view(State(s): State<Arc<Comfy>>, Query(q): Query<HashMap<String, String>>) -> Response {
    let key = (
        q.get("type").cloned().unwrap_or_else(|| "output".to_owned()),
        q.get("subfolder").cloned().unwrap_or_default(),
        q.get("filename").cloned().unwrap_or_default(),
    );
    let name = key.2.clone();
    s.saw(Seen::ViewBegan(name.clone()));
    let saved = s.files.lock().expect("fake lock").get(&key).cloned();
    let Some(Saved { bytes, view_delay }) = saved else {
        s.saw(Seen::ViewEnded(name));
        return StatusCode::NOT_FOUND.into_response();
    };
    let failing = s
        .failing_views
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok();
    if failing {
        tokio::time::sleep(view_delay).await;
        s.saw(Seen::ViewEnded(name));
        return (StatusCode::SERVICE_UNAVAILABLE, "restarting").into_response();
    }
    let len = bytes.len();
    let tail = bytes[len / 2..].to_vec();
    let head = bytes[..len / 2].to_vec();
    // The first half at once, the rest after the delay: the client knows the size early.
    let chunks = futures_util::stream::unfold(0u8, move |step| {
        let (s, name, head, tail) = (s.clone(), name.clone(), head.clone(), tail.clone());
        async move {
            match step {
                0 => Some((Ok::<_, std::io::Error>(bytes::Bytes::from(head)), 1)),
                1 => {
                    tokio::time::sleep(view_delay).await;
                    s.saw(Seen::ViewEnded(name));
                    Some((Ok(bytes::Bytes::from(tail)), 2))
                }
                _ => None,
            }
        }
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "image/png")
        .header(header::CONTENT_LENGTH, len)
        .body(Body::from_stream(chunks))
        .expect("a response of known headers builds")
}

async fn interrupt(State(s): State<Arc<Comfy>>, body: Option<Json<Value>>) -> StatusCode {
    s.interrupts.fetch_add(1, Ordering::SeqCst);
    let wanted = body.and_then(|Json(b)| b.get("prompt_id").and_then(Value::as_str).map(str::to_owned));
    let running = s.running.lock().expect("fake lock").clone();
    // Upstream interrupts only the named prompt when one is named, else whatever runs.
    if running.is_some() && (wanted.is_none() || wanted == running) {
        s.interrupt.store(true, Ordering::SeqCst);
    }
    StatusCode::OK
}

async fn queue_edit(State(s): State<Arc<Comfy>>, Json(body): Json<Value>) -> StatusCode {
    if let Some(ids) = body.get("delete").and_then(Value::as_array) {
        let ids: Vec<&str> = ids.iter().filter_map(Value::as_str).collect();
        s.queue
            .lock()
            .expect("fake lock")
            .retain(|p| !ids.contains(&p.id.as_str()));
    }
    if body.get("clear").and_then(Value::as_bool) == Some(true) {
        s.queue.lock().expect("fake lock").clear();
    }
    StatusCode::OK
}

/// Upstream's `GET /queue`: `[number, prompt_id, prompt, extra_data, outputs_to_execute]` per
/// running and pending prompt.
async fn queue_list(State(s): State<Arc<Comfy>>) -> Json<Value> {
    let item = |p: &QueuedPrompt| json!([p.number, p.id, p.prompt, {"client_id": p.client_id}, []]);
    let pending: Vec<Value> = s.queue.lock().expect("fake lock").iter().map(item).collect();
    let running: Vec<Value> = s
        .running
        .lock()
        .expect("fake lock")
        .iter()
        .map(|id| json!([0, id, {}, {}, []]))
        .collect();
    Json(json!({"queue_running": running, "queue_pending": pending}))
}

async fn system_stats(State(s): State<Arc<Comfy>>) -> Json<Value> {
    if s.hung.load(Ordering::SeqCst) {
        std::future::pending::<()>().await;
    }
    Json(json!({
        "system": {"os": "posix", "ram_total": 34359738368u64, "ram_free": 17179869184u64,
                   "comfyui_version": "0.3.0-fake", "python_version": "3.12.0", "pytorch_version": "2.5.0",
                   "embedded_python": false, "argv": ["main.py"]},
        "devices": [{"name": "cpu", "type": "cpu", "index": null, "vram_total": 0, "vram_free": 0,
                     "torch_vram_total": 0, "torch_vram_free": 0}]
    }))
}

async fn object_info() -> Json<Value> {
    let node = |name: &str, output: &[&str], output_node: bool| {
        json!({"input": {"required": {}}, "input_order": {"required": []}, "output": output,
               "output_is_list": output.iter().map(|_| false).collect::<Vec<_>>(),
               "output_name": output, "name": name, "display_name": name, "description": "",
               "python_module": "nodes", "category": "fake", "output_node": output_node})
    };
    Json(json!({
        "CheckpointLoaderSimple": node("CheckpointLoaderSimple", &["MODEL", "CLIP", "VAE"], false),
        "KSampler": node("KSampler", &["LATENT"], false),
        "SaveImage": node("SaveImage", &[], true),
        "PreviewImage": node("PreviewImage", &[], true),
    }))
}

/// Runs queued prompts one at a time.
async fn executor(s: Arc<Comfy>) {
    loop {
        let next = s.queue.lock().expect("fake lock").pop_front();
        let Some(p) = next else {
            s.wake.notified().await;
            continue;
        };
        *s.running.lock().expect("fake lock") = Some(p.id.clone());
        s.interrupt.store(false, Ordering::SeqCst);
        run_prompt(&s, &p).await;
        *s.running.lock().expect("fake lock") = None;
        // Upstream sends this after writing the history; clients of old servers rely on it.
        s.send(&p.client_id, "executing", json!({"node": null, "prompt_id": p.id}));
        s.send(
            &p.client_id,
            "status",
            json!({"status": {"exec_info": {"queue_remaining": s.queue_remaining()}}}),
        );
    }
}

/// Runs one queued prompt as ComfyUI reports it: the messages of its life on the websocket, in
/// the order ComfyUI sends them, then its history. Long (about 140 lines) on purpose: it is one
/// sequence of messages, read top to bottom against ComfyUI's own.
async fn run_prompt(s: &Arc<Comfy>, p: &QueuedPrompt) {
    let pid = p.id.clone();
    let client = p.client_id.as_str();
    let mut messages = vec![json!(["execution_start", {"prompt_id": pid, "timestamp": now_ms()}])];
    s.send(
        client,
        "execution_start",
        json!({"prompt_id": pid, "timestamp": now_ms()}),
    );
    // Node ids are numbers in API-format workflows; run them in numeric order.
    let mut nodes: Vec<(&String, &Value)> = p.prompt.iter().collect();
    nodes.sort_by_key(|(id, _)| (id.parse::<u64>().unwrap_or(u64::MAX), (*id).clone()));
    let cached: Vec<String> = nodes
        .iter()
        .filter(|(_, n)| n.pointer("/inputs/cached").and_then(Value::as_bool) == Some(true))
        .map(|(id, _)| (*id).clone())
        .collect();
    let cached_msg = json!({"nodes": cached, "prompt_id": pid, "timestamp": now_ms()});
    messages.push(json!(["execution_cached", cached_msg.clone()]));
    s.send(client, "execution_cached", cached_msg);
    let mut executed: Vec<String> = cached.clone();
    let mut outputs = BTreeMap::new();
    let finish = |s: &Arc<Comfy>, status: &str, messages: Vec<Value>, outputs: BTreeMap<String, Value>| {
        let entry = json!({
            "prompt": [p.number, pid, p.prompt, {"client_id": p.client_id}, outputs.keys().collect::<Vec<_>>()],
            "outputs": outputs,
            "status": {"status_str": status, "completed": status == "success", "messages": messages},
            "meta": {}
        });
        s.history.lock().expect("fake lock").insert(pid.clone(), entry);
    };
    for (id, node) in nodes {
        if cached.contains(id) {
            continue;
        }
        let class = node.get("class_type").and_then(Value::as_str).unwrap_or_default();
        let inputs = node.get("inputs").cloned().unwrap_or(Value::Null);
        s.send(
            client,
            "executing",
            json!({"node": id, "display_node": id, "prompt_id": pid}),
        );
        if class == "FakeStall" {
            if inputs.get("hang").and_then(Value::as_bool) == Some(true) {
                s.hung.store(true, Ordering::SeqCst);
            }
            let silent = inputs
                .get("silent_ms")
                .and_then(Value::as_u64)
                .map(Duration::from_millis);
            let started = tokio::time::Instant::now();
            while !s.interrupt.load(Ordering::SeqCst) && silent.is_none_or(|d| started.elapsed() < d) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
        if let Some(ms) = inputs.get("busy_ms").and_then(Value::as_u64) {
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if class == "FakeGrow" {
            let mb = inputs.get("mb").and_then(Value::as_u64).unwrap_or(0);
            let mut block = vec![0u8; usize::try_from(mb).unwrap_or(0) << 20];
            // Touch every page so the memory is resident, not just reserved.
            for page in block.chunks_mut(4096) {
                page[0] = 1;
            }
            s.kept.lock().expect("fake lock").push(block);
        }
        let steps = inputs.get("steps").and_then(Value::as_u64).unwrap_or(0);
        let step_ms = inputs.get("step_ms").and_then(Value::as_u64).unwrap_or(0);
        for i in 1..=steps {
            if step_ms > 0 {
                tokio::time::sleep(Duration::from_millis(step_ms)).await;
            }
            if s.interrupt.load(Ordering::SeqCst) {
                break;
            }
            s.send(
                client,
                "progress",
                json!({"value": i, "max": steps, "prompt_id": pid, "node": id}),
            );
        }
        if s.interrupt.load(Ordering::SeqCst) {
            let data = json!({"prompt_id": pid, "node_id": id, "node_type": class, "executed": executed, "timestamp": now_ms()});
            messages.push(json!(["execution_interrupted", data.clone()]));
            s.send(client, "execution_interrupted", data);
            finish(s, "error", messages, outputs);
            return;
        }
        match class {
            "FakeError" => {
                let data = json!({
                    "prompt_id": pid, "node_id": id, "node_type": class, "executed": executed,
                    "exception_message": inputs.get("message").and_then(Value::as_str).unwrap_or("fake failure"),
                    "exception_type": inputs.get("exception_type").and_then(Value::as_str).unwrap_or("RuntimeError"),
                    "traceback": ["  File \"execution.py\", line 1, in execute\n"],
                    "current_inputs": {}, "current_outputs": {}, "timestamp": now_ms()
                });
                messages.push(json!(["execution_error", data.clone()]));
                s.send(client, "execution_error", data);
                finish(s, "error", messages, outputs);
                return;
            }
            "FakeDropSocket" => s.drop_sockets(client),
            "SaveImage" | "PreviewImage" => {
                let kind = if class == "SaveImage" { "output" } else { "temp" };
                let prefix = inputs
                    .get("filename_prefix")
                    .and_then(Value::as_str)
                    .unwrap_or("ComfyUI");
                let n = s.counter.fetch_add(1, Ordering::SeqCst);
                let filename = format!("{prefix}_{n:05}_.png");
                let view_delay = Duration::from_millis(inputs.get("view_ms").and_then(Value::as_u64).unwrap_or(0));
                s.files.lock().expect("fake lock").insert(
                    (kind.to_owned(), String::new(), filename.clone()),
                    Saved {
                        bytes: TINY_PNG.to_vec(),
                        view_delay,
                    },
                );
                let output = json!({"images": [{"filename": filename, "subfolder": "", "type": kind}]});
                outputs.insert(id.clone(), output.clone());
                s.send(
                    client,
                    "executed",
                    json!({"node": id, "display_node": id, "output": output, "prompt_id": pid}),
                );
            }
            _ => {}
        }
        executed.push(id.clone());
    }
    let data = json!({"prompt_id": pid, "timestamp": now_ms()});
    messages.push(json!(["execution_success", data.clone()]));
    s.send(client, "execution_success", data);
    // Upstream writes the history entry only after announcing success.
    tokio::time::sleep(Duration::from_millis(1)).await;
    finish(s, "success", messages, outputs);
}

//! A fake RunPod serverless API under `/v2/<endpoint id>`, speaking the documented queue-based
//! operations: `POST /run` (`{"id", "status": "IN_QUEUE"}`), `POST /runsync?wait=<ms>` (the
//! finished job, or its current state when not done within the wait), `GET /status/<id>`
//! (`id`, `status` of `IN_QUEUE` / `IN_PROGRESS` / `COMPLETED` / `FAILED` / `CANCELLED` /
//! `TIMED_OUT`, `delayTime` and `executionTime` in ms, `output`, `error`) and
//! `POST /cancel/<id>`, with `{"error": "..."}` error bodies and output files under `/files/`.
//!
//! A job waits in the queue for the first fifth of `input.fake_ms` (default 300), then runs;
//! `input.fake_fail` makes it fail with that error. Its output is
//! `{"images": ["<url of a PNG>"], "prompt": <input.prompt>}`; `input.fake_output` replaces it:
//! `"worker-comfyui"` answers as RunPod's worker-comfyui does by default (each image inline,
//! `{"images": [{"filename", "type": "base64", "data"}]}`, of `input.fake_image_bytes` bytes,
//! a PNG header padded, default a tiny PNG), any other value is the output as it is. While a
//! job runs its progress update is `"NN% done"`, or `{"progress": NN}` with
//! `input.fake_progress = "object"`. [`FakeRunpod::act_then_fail`] makes the next `/run` queue
//! its job and then answer a 5xx, or nothing (a timeout), as an outage can. A cancelled job
//! reports the `executionTime` it ran (RunPod bills it).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::serve::{Served, TINY_PNG, serve};

/// A running fake RunPod API; stopped on drop.
#[derive(Debug)]
pub struct FakeRunpod {
    served: Served,
    state: Arc<Api>,
}

#[derive(Debug)]
struct RunJob {
    endpoint: String,
    input: Value,
    created: Instant,
    run: Duration,
    fail: Option<String>,
    cancelled: Option<Instant>,
}

#[derive(Debug, Default)]
struct Counts {
    runs: Vec<(String, Instant)>,
    runsyncs: usize,
    statuses: usize,
    cancels: Vec<String>,
}

#[derive(Debug)]
struct Api {
    key: Mutex<Option<String>>,
    after_run: Mutex<std::collections::VecDeque<Option<u16>>>,
    addr: Mutex<Option<SocketAddr>>,
    jobs: Mutex<HashMap<String, RunJob>>,
    counts: Mutex<Counts>,
}

impl FakeRunpod {
    /// Starts on a free loopback port; when `key` is given, requests must carry it.
    pub fn start(key: Option<&str>) -> FakeRunpod {
        let state = Arc::new(Api {
            key: Mutex::new(key.map(str::to_owned)),
            after_run: Mutex::new(std::collections::VecDeque::new()),
            addr: Mutex::new(None),
            jobs: Mutex::new(HashMap::new()),
            counts: Mutex::new(Counts::default()),
        });
        let s = state.clone();
        let served = serve(0, move || {
            Router::new()
                .route("/v2/{endpoint}/health", get(health))
                .route("/v2/{endpoint}/run", post(run))
                .route("/v2/{endpoint}/runsync", post(runsync))
                .route("/v2/{endpoint}/status/{id}", get(status))
                .route("/v2/{endpoint}/cancel/{id}", post(cancel))
                .route("/files/{name}", get(file))
                .with_state(s)
        });
        *state.addr.lock().expect("fake lock") = Some(served.addr);
        FakeRunpod { served, state }
    }

    /// The base URL to configure: `http://127.0.0.1:<port>/v2`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v2", self.served.addr)
    }

    /// `/run` and `/runsync` requests so far: endpoint and arrival.
    pub fn runs(&self) -> Vec<(String, Instant)> {
        self.state.counts.lock().expect("fake lock").runs.clone()
    }

    /// Makes the next `/run` queue its job, then answer `status` (a 5xx), or nothing for a
    /// minute with `None` (a timeout).
    pub fn act_then_fail(&self, status: Option<u16>) {
        self.state.after_run.lock().expect("fake lock").push_back(status);
    }

    /// Changes the key requests must carry (a key rotated or corrected).
    pub fn set_key(&self, key: &str) {
        *self.state.key.lock().expect("fake lock") = Some(key.to_owned());
    }

    /// Every job submitted: id and status now.
    pub fn jobs(&self) -> Vec<(String, String)> {
        let now = Instant::now();
        let mut v: Vec<(String, String)> = self
            .state
            .jobs
            .lock()
            .expect("fake lock")
            .iter()
            .map(|(id, j)| (id.clone(), j.state(now).to_owned()))
            .collect();
        v.sort();
        v
    }

    /// `/runsync` requests so far.
    pub fn runsyncs(&self) -> usize {
        self.state.counts.lock().expect("fake lock").runsyncs
    }

    /// `/status` requests so far.
    pub fn statuses(&self) -> usize {
        self.state.counts.lock().expect("fake lock").statuses
    }

    /// Ids of the jobs cancelled through `/cancel`.
    pub fn cancels(&self) -> Vec<String> {
        self.state.counts.lock().expect("fake lock").cancels.clone()
    }
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}

fn authorized(s: &Api, headers: &HeaderMap) -> Option<Response> {
    let key = s.key.lock().expect("fake lock").clone()?;
    let ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == key || v == format!("Bearer {key}"));
    (!ok).then(|| error(StatusCode::UNAUTHORIZED, "Unauthorized"))
}

impl RunJob {
    fn state(&self, now: Instant) -> &'static str {
        let age = now.duration_since(self.created);
        if self.cancelled.is_some() {
            "CANCELLED"
        } else if age < self.run / 5 {
            "IN_QUEUE"
        } else if age < self.run {
            "IN_PROGRESS"
        } else if self.fail.is_some() {
            "FAILED"
        } else {
            "COMPLETED"
        }
    }
}

fn view(s: &Api, id: &str, j: &RunJob) -> Value {
    let now = Instant::now();
    let state = j.state(now);
    let addr = s.addr.lock().expect("fake lock").expect("address set at start");
    let delay = (j.run / 5).as_millis() as u64;
    let exec = (j.run - j.run / 5).as_millis() as u64;
    let mut v = json!({"id": id, "status": state});
    match state {
        "COMPLETED" => {
            v["delayTime"] = json!(delay);
            v["executionTime"] = json!(exec);
            v["output"] = output(&j.input, &format!("http://{addr}/files/{id}.png"));
        }
        "FAILED" => {
            v["delayTime"] = json!(delay);
            v["executionTime"] = json!(exec);
            v["error"] = json!(j.fail);
        }
        "CANCELLED" => {
            // It ran from leaving the queue until it was cancelled.
            let ran = j
                .cancelled
                .map_or(Duration::ZERO, |at| at.saturating_duration_since(j.created + j.run / 5));
            v["executionTime"] = json!(ran.min(j.run).as_millis() as u64);
        }
        "IN_PROGRESS" => {
            let frac = now.duration_since(j.created).as_secs_f64() / j.run.as_secs_f64().max(1e-9);
            v["delayTime"] = json!(delay);
            let percent = (frac * 100.0).min(99.0).floor();
            v["output"] = if j.input.get("fake_progress").and_then(Value::as_str) == Some("object") {
                json!({"progress": percent})
            } else {
                json!(format!("{percent:.0}% done"))
            };
        }
        _ => {}
    }
    v
}

/// A completed job's output (see the module's doc).
fn output(input: &Value, url: &str) -> Value {
    match input.get("fake_output") {
        Some(Value::String(s)) if s == "worker-comfyui" => {
            let mut image = TINY_PNG.to_vec();
            let size = input.get("fake_image_bytes").and_then(Value::as_u64).unwrap_or(0) as usize;
            image.resize(image.len().max(size), 0);
            let data = base64::engine::general_purpose::STANDARD.encode(&image);
            json!({"images": [{"filename": "ComfyUI_00001_.png", "type": "base64", "data": data}]})
        }
        Some(other) => other.clone(),
        None => json!({"images": [url], "prompt": input.get("prompt")}),
    }
}

fn submit(s: &Arc<Api>, endpoint: &str, headers: &HeaderMap, body: &Value) -> Result<String, Box<Response>> {
    s.counts
        .lock()
        .expect("fake lock")
        .runs
        .push((endpoint.to_owned(), Instant::now()));
    if let Some(r) = authorized(s, headers) {
        return Err(Box::new(r));
    }
    let Some(input) = body.get("input").filter(|i| i.is_object()).cloned() else {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "Missing required field: input",
        )));
    };
    let run = Duration::from_millis(input.get("fake_ms").and_then(Value::as_u64).unwrap_or(300));
    let fail = input.get("fake_fail").and_then(Value::as_str).map(str::to_owned);
    let id = format!(
        "{:x}-u1",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos()
    );
    s.jobs.lock().expect("fake lock").insert(
        id.clone(),
        RunJob {
            endpoint: endpoint.to_owned(),
            input,
            created: Instant::now(),
            run,
            fail,
            cancelled: None,
        },
    );
    Ok(id)
}

async fn run(
    State(s): State<Arc<Api>>,
    Path(endpoint): Path<String>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let id = match submit(&s, &endpoint, &headers, &body) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    let after = s.after_run.lock().expect("fake lock").pop_front();
    match after {
        None => Json(json!({"id": id, "status": "IN_QUEUE"})).into_response(),
        Some(Some(status)) => error(
            StatusCode::from_u16(status).expect("tests script valid status codes"),
            "Internal Server Error",
        ),
        Some(None) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
    }
}

async fn runsync(
    State(s): State<Arc<Api>>,
    Path(endpoint): Path<String>,
    Query(q): Query<HashMap<String, String>>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    s.counts.lock().expect("fake lock").runsyncs += 1;
    let id = match submit(&s, &endpoint, &headers, &body) {
        Ok(id) => id,
        Err(r) => return *r,
    };
    let wait = Duration::from_millis(q.get("wait").and_then(|w| w.parse().ok()).unwrap_or(90_000));
    let deadline = Instant::now() + wait;
    loop {
        {
            let jobs = s.jobs.lock().expect("fake lock");
            let j = jobs.get(&id).expect("just submitted");
            if matches!(j.state(Instant::now()), "COMPLETED" | "FAILED" | "CANCELLED") || Instant::now() >= deadline {
                return Json(view(&s, &id, j)).into_response();
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn status(
    State(s): State<Arc<Api>>,
    Path((endpoint, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    s.counts.lock().expect("fake lock").statuses += 1;
    let jobs = s.jobs.lock().expect("fake lock");
    match jobs.get(&id).filter(|j| j.endpoint == endpoint) {
        Some(j) => Json(view(&s, &id, j)).into_response(),
        None => error(StatusCode::NOT_FOUND, "request does not exist"),
    }
}

async fn cancel(
    State(s): State<Arc<Api>>,
    Path((endpoint, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    s.counts.lock().expect("fake lock").cancels.push(id.clone());
    let mut jobs = s.jobs.lock().expect("fake lock");
    match jobs.get_mut(&id).filter(|j| j.endpoint == endpoint) {
        Some(j) => {
            if !matches!(j.state(Instant::now()), "COMPLETED" | "FAILED") {
                j.cancelled.get_or_insert_with(Instant::now);
            }
            Json(json!({"id": id, "status": j.state(Instant::now())})).into_response()
        }
        None => error(StatusCode::NOT_FOUND, "request does not exist"),
    }
}

/// `GET /v2/<endpoint>/health`: the endpoint's job and worker counts.
async fn health(State(s): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    Json(
        json!({"jobs": {"completed": 0, "failed": 0, "inProgress": 0, "inQueue": 0, "retried": 0},
                "workers": {"idle": 1, "running": 0}}),
    )
    .into_response()
}

async fn file(Path(_name): Path<String>) -> Response {
    ([(header::CONTENT_TYPE, "image/png")], TINY_PNG).into_response()
}

//! A fake Replicate HTTP API under `/v1`, speaking the documented prediction object (`id`,
//! `model`, `version`, `input`, `logs`, `output`, `error`, `status` of `starting` /
//! `processing` / `succeeded` / `failed` / `canceled`, `created_at`, `started_at`,
//! `completed_at`, `metrics.predict_time`, `urls.get` / `urls.cancel` / `urls.stream`) and its
//! error body (`{"title", "detail", "status"}`).
//!
//! Routes: `POST /v1/predictions` (`version` + `input`), `POST /v1/models/<owner>/<name>/predictions`
//! (`input`), `GET /v1/predictions/<id>`, `POST /v1/predictions/<id>/cancel`, the stream
//! `GET /stream/<id>` (server-sent `logs`, `output` and `done` events) and the output files
//! under `/files/`. A prediction runs for `input.fake_ms` (default 300) and writes tqdm-style
//! progress lines to its logs; `input.fake_fail` makes it fail with that error; the version
//! `bad-version` is refused with 422. Tests queue error answers with [`FakeReplicate::fail_next`],
//! and with [`FakeReplicate::act_then_fail`] answers given after the prediction was created (a
//! 5xx, or no answer at all), as a real API's outage can. Deployments
//! (`POST /v1/deployments/<owner>/<name>/predictions`) run like official models. A canceled or
//! failed prediction reports the predict time it ran (Replicate bills it).

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::serve::{Served, TINY_PNG, serve};

/// A running fake Replicate API; stopped on drop.
#[derive(Debug)]
pub struct FakeReplicate {
    served: Served,
    state: Arc<Api>,
}

#[derive(Debug)]
struct Prediction {
    model: String,
    version: String,
    input: Value,
    created: Instant,
    run: Duration,
    fail: Option<String>,
    canceled_at: Option<Instant>,
}

#[derive(Debug, Default)]
struct Counts {
    creates: Vec<(String, Instant)>,
    polls: usize,
    cancels: Vec<String>,
    streams: usize,
}

#[derive(Debug)]
struct Api {
    key: Mutex<Option<String>>,
    /// Out of credit: creates answer 402 "Insufficient credit".
    no_credit: std::sync::atomic::AtomicBool,
    addr: Mutex<Option<SocketAddr>>,
    failures: Mutex<VecDeque<(u16, Option<String>)>>,
    /// Answers for creates that act first: a status, or `None` for no answer.
    after_create: Mutex<VecDeque<Option<u16>>>,
    predictions: Mutex<HashMap<String, Prediction>>,
    counts: Mutex<Counts>,
}

impl FakeReplicate {
    /// Starts on a free loopback port; when `key` is given, requests must carry it as a bearer
    /// token.
    pub fn start(key: Option<&str>) -> FakeReplicate {
        let state = Arc::new(Api {
            key: Mutex::new(key.map(str::to_owned)),
            no_credit: std::sync::atomic::AtomicBool::new(false),
            addr: Mutex::new(None),
            failures: Mutex::new(VecDeque::new()),
            after_create: Mutex::new(VecDeque::new()),
            predictions: Mutex::new(HashMap::new()),
            counts: Mutex::new(Counts::default()),
        });
        let s = state.clone();
        let served = serve(0, move || {
            Router::new()
                .route("/v1/account", get(account))
                .route("/v1/predictions", post(create_versioned))
                .route("/v1/models/{owner}/{name}/predictions", post(create_official))
                .route("/v1/deployments/{owner}/{name}/predictions", post(create_deployment))
                .route("/v1/predictions/{id}", get(read))
                .route("/v1/predictions/{id}/cancel", post(cancel))
                .route("/stream/{id}", get(stream))
                .route("/files/{name}", get(file))
                .with_state(s)
        });
        *state.addr.lock().expect("fake lock") = Some(served.addr);
        FakeReplicate { served, state }
    }

    /// The base URL to configure: `http://127.0.0.1:<port>/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.served.addr)
    }

    /// Queues an error answer (`status`, optional `Retry-After` value) for the next create.
    pub fn fail_next(&self, status: u16, retry_after: Option<&str>) {
        self.state
            .failures
            .lock()
            .expect("fake lock")
            .push_back((status, retry_after.map(str::to_owned)));
    }

    /// Makes the next create create its prediction, then answer `status` (a 5xx), or nothing
    /// for a minute with `None` (a timeout).
    pub fn act_then_fail(&self, status: Option<u16>) {
        self.state.after_create.lock().expect("fake lock").push_back(status);
    }

    /// Changes the token requests must carry (a key rotated or corrected).
    pub fn set_key(&self, key: &str) {
        *self.state.key.lock().expect("fake lock") = Some(key.to_owned());
    }

    /// Puts the account out of credit (creates answer 402), or back in credit.
    pub fn set_out_of_credit(&self, out: bool) {
        self.state.no_credit.store(out, std::sync::atomic::Ordering::SeqCst);
    }

    /// Every prediction created: id and status now.
    pub fn predictions(&self) -> Vec<(String, String)> {
        let now = Instant::now();
        let mut v: Vec<(String, String)> = self
            .state
            .predictions
            .lock()
            .expect("fake lock")
            .iter()
            .map(|(id, p)| (id.clone(), p.status(now).to_owned()))
            .collect();
        v.sort();
        v
    }

    /// Create requests so far (model or version, arrival), the refused ones included.
    pub fn creates(&self) -> Vec<(String, Instant)> {
        self.state.counts.lock().expect("fake lock").creates.clone()
    }

    /// Ids of the predictions cancelled through `urls.cancel`.
    pub fn cancels(&self) -> Vec<String> {
        self.state.counts.lock().expect("fake lock").cancels.clone()
    }

    /// `GET /v1/predictions/<id>` requests so far.
    pub fn polls(&self) -> usize {
        self.state.counts.lock().expect("fake lock").polls
    }

    /// Stream connections so far.
    pub fn streams(&self) -> usize {
        self.state.counts.lock().expect("fake lock").streams
    }
}

fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    (
        status,
        Json(json!({"title": title, "detail": detail, "status": status.as_u16()})),
    )
        .into_response()
}

fn authorized(s: &Api, headers: &HeaderMap) -> Option<Response> {
    let key = s.key.lock().expect("fake lock").clone()?;
    let ok = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v == format!("Bearer {key}") || v == format!("Token {key}"));
    (!ok).then(|| {
        problem(
            StatusCode::UNAUTHORIZED,
            "Unauthenticated",
            "You did not pass a valid authentication token",
        )
    })
}

fn iso(t: std::time::SystemTime) -> String {
    let d = t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    // Seconds since the epoch are enough for a fake; the connector does not parse these.
    format!("{}.{:06}", d.as_secs(), d.subsec_micros())
}

impl Prediction {
    fn status(&self, now: Instant) -> &'static str {
        if self.canceled_at.is_some() {
            return "canceled";
        }
        let age = now.duration_since(self.created);
        if age < self.run / 5 {
            "starting"
        } else if age < self.run {
            "processing"
        } else if self.fail.is_some() {
            "failed"
        } else {
            "succeeded"
        }
    }

    fn logs(&self, now: Instant) -> String {
        let age = now.duration_since(self.created);
        let mut logs = String::from("Loading the model\n");
        if age >= self.run / 5 {
            let frac = (age.as_secs_f64() / self.run.as_secs_f64().max(1e-9)).min(1.0);
            let steps = (frac * 10.0).floor() as u32;
            for i in 1..=steps {
                logs.push_str(&format!("{:3}%|{:<10}| {i}/10\n", i * 10, "#".repeat(i as usize)));
            }
        }
        logs
    }
}

fn view(s: &Api, id: &str, p: &Prediction) -> Value {
    let now = Instant::now();
    let addr = s.addr.lock().expect("fake lock").expect("address set at start");
    let status = p.status(now);
    let done = matches!(status, "succeeded" | "failed" | "canceled");
    let output = if status == "succeeded" {
        p.input
            .get("fake_output")
            .cloned()
            .unwrap_or_else(|| json!([format!("http://{addr}/files/{id}-0.png")]))
    } else {
        Value::Null
    };
    // Replicate bills the time a prediction ran, whatever its end: a canceled one ran from
    // leaving `starting` until it was canceled.
    let predict_time = match p.canceled_at {
        Some(at) => at
            .saturating_duration_since(p.created + p.run / 5)
            .min(p.run)
            .as_secs_f64(),
        None if done => p.run.as_secs_f64(),
        None => 0.0,
    };
    let mut input = p.input.clone();
    if let Value::Object(m) = &mut input {
        m.retain(|k, _| !k.starts_with("fake_"));
    }
    json!({
        "id": id,
        "model": p.model,
        "version": p.version,
        "input": input,
        "logs": p.logs(now),
        "output": output,
        "error": if status == "failed" { json!(p.fail) } else { Value::Null },
        "status": status,
        "data_removed": false,
        "created_at": iso(std::time::SystemTime::now() - now.duration_since(p.created)),
        "started_at": Value::Null,
        "completed_at": if done { json!(iso(std::time::SystemTime::now())) } else { Value::Null },
        "metrics": if done { json!({"predict_time": predict_time, "total_time": predict_time}) } else { json!({}) },
        "urls": {
            "get": format!("http://{addr}/v1/predictions/{id}"),
            "cancel": format!("http://{addr}/v1/predictions/{id}/cancel"),
            "stream": format!("http://{addr}/stream/{id}"),
        }
    })
}

fn create(
    s: &Arc<Api>,
    headers: &HeaderMap,
    model: String,
    version: String,
    body: &Value,
) -> Result<Response, Option<u16>> {
    s.counts.lock().expect("fake lock").creates.push((
        if version.is_empty() {
            model.clone()
        } else {
            version.clone()
        },
        Instant::now(),
    ));
    if let Some(r) = authorized(s, headers) {
        return Ok(r);
    }
    if let Some((status, retry_after)) = s.failures.lock().expect("fake lock").pop_front() {
        let status = StatusCode::from_u16(status).expect("tests queue valid status codes");
        let mut resp = if status == StatusCode::TOO_MANY_REQUESTS {
            problem(
                status,
                "Request was throttled",
                "Request was throttled. Expected available in 1 second.",
            )
        } else {
            problem(status, "Internal server error", "Something went wrong")
        };
        if let Some(ra) = retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, ra.parse().expect("a valid header value"));
        }
        return Ok(resp);
    }
    if s.no_credit.load(std::sync::atomic::Ordering::SeqCst) {
        return Ok(problem(
            StatusCode::PAYMENT_REQUIRED,
            "Insufficient credit",
            "You have insufficient credit to run this model. Go to https://replicate.com/account/billing#billing to purchase credit. Once you purchase credit, please wait a few minutes before trying again.",
        ));
    }
    if version == "bad-version" {
        return Ok(problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid version or not permitted",
            "The specified version does not exist (or perhaps you don't have permission to use it?)",
        ));
    }
    let Some(input) = body.get("input").filter(|i| i.is_object()).cloned() else {
        return Ok(problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Input validation failed",
            "input: input is required",
        ));
    };
    let run = Duration::from_millis(input.get("fake_ms").and_then(Value::as_u64).unwrap_or(300));
    let fail = input.get("fake_fail").and_then(Value::as_str).map(str::to_owned);
    let id = format!("fake{:x}", rand_id());
    let p = Prediction {
        model,
        version,
        input,
        created: Instant::now(),
        run,
        fail,
        canceled_at: None,
    };
    let v = view(s, &id, &p);
    s.predictions.lock().expect("fake lock").insert(id, p);
    if let Some(after) = s.after_create.lock().expect("fake lock").pop_front() {
        return Err(after);
    }
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// Answers a create: the created prediction, or what a test scripted after it was created.
async fn answer_create(created: Result<Response, Option<u16>>) -> Response {
    match created {
        Ok(r) => r,
        Err(Some(status)) => problem(
            StatusCode::from_u16(status).expect("tests script valid status codes"),
            "Internal server error",
            "Something went wrong",
        ),
        Err(None) => {
            tokio::time::sleep(Duration::from_secs(60)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
    }
}

fn rand_id() -> u128 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(1);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos();
    (t << 16) ^ u128::from(N.fetch_add(1, Ordering::Relaxed))
}

async fn create_versioned(State(s): State<Arc<Api>>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let version = body
        .get("version")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if version.is_empty() {
        return problem(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Input validation failed",
            "version: version is required",
        );
    }
    answer_create(create(&s, &headers, String::new(), version, &body)).await
}

async fn create_official(
    State(s): State<Arc<Api>>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    answer_create(create(&s, &headers, format!("{owner}/{name}"), String::new(), &body)).await
}

async fn create_deployment(
    State(s): State<Arc<Api>>,
    Path((owner, name)): Path<(String, String)>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let model = format!("deployments/{owner}/{name}");
    answer_create(create(&s, &headers, model, String::new(), &body)).await
}

async fn read(State(s): State<Arc<Api>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    s.counts.lock().expect("fake lock").polls += 1;
    let preds = s.predictions.lock().expect("fake lock");
    match preds.get(&id) {
        Some(p) => Json(view(&s, &id, p)).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            "Not found",
            "The requested resource could not be found.",
        ),
    }
}

async fn cancel(State(s): State<Arc<Api>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    s.counts.lock().expect("fake lock").cancels.push(id.clone());
    let mut preds = s.predictions.lock().expect("fake lock");
    match preds.get_mut(&id) {
        Some(p) => {
            if !matches!(p.status(Instant::now()), "succeeded" | "failed") {
                p.canceled_at.get_or_insert_with(Instant::now);
            }
            Json(view(&s, &id, p)).into_response()
        }
        None => problem(
            StatusCode::NOT_FOUND,
            "Not found",
            "The requested resource could not be found.",
        ),
    }
}

async fn stream(State(s): State<Arc<Api>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    s.counts.lock().expect("fake lock").streams += 1;
    if !s.predictions.lock().expect("fake lock").contains_key(&id) {
        return problem(
            StatusCode::NOT_FOUND,
            "Not found",
            "The requested resource could not be found.",
        );
    }
    let events = futures_util::stream::unfold((s, id, 0usize, false), |(s, id, sent, done)| async move {
        if done {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let (logs, status, output) = {
            let preds = s.predictions.lock().expect("fake lock");
            let p = preds.get(&id)?;
            let v = view(&s, &id, p);
            (p.logs(Instant::now()), p.status(Instant::now()), v["output"].clone())
        };
        let mut out = String::new();
        let new_lines: Vec<&str> = logs.lines().skip(sent).collect();
        for line in &new_lines {
            out.push_str(&format!("event: logs\nid: {}\ndata: {line}\n\n", sent + 1));
        }
        let sent = sent + new_lines.len();
        let finished = matches!(status, "succeeded" | "failed" | "canceled");
        if finished {
            if status == "succeeded" {
                out.push_str(&format!("event: output\ndata: {output}\n\n"));
            }
            let reason = match status {
                "failed" => r#"{"reason":"error"}"#,
                "canceled" => r#"{"reason":"canceled"}"#,
                _ => "{}",
            };
            out.push_str(&format!("event: done\ndata: {reason}\n\n"));
        }
        Some((Ok::<Bytes, Infallible>(Bytes::from(out)), (s, id, sent, finished)))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, "text/event-stream")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(events))
        .expect("a response with static headers builds")
}

/// `GET /v1/account`: who the token belongs to.
async fn account(State(s): State<Arc<Api>>, headers: HeaderMap) -> Response {
    if let Some(r) = authorized(&s, &headers) {
        return r;
    }
    Json(json!({"type": "organization", "username": "fake", "name": "Fake", "github_url": null})).into_response()
}

async fn file(Path(_name): Path<String>) -> Response {
    ([(header::CONTENT_TYPE, "image/png")], TINY_PNG).into_response()
}

//! A fake AUTOMATIC1111 WebUI API: `POST /sdapi/v1/txt2img` and `img2img` (answering
//! `{images: [base64 PNG], parameters, info}` like the WebUI), `GET /sdapi/v1/progress` while
//! a generation runs, and `POST /sdapi/v1/interrupt`.
//!
//! A generation takes `steps` (default 3) sampling steps, `step_ms` (a fake-only field, default
//! 0) apart, and returns `batch_size` images. A prompt containing `FAIL_OOM` answers 500 as the
//! WebUI does on CUDA out-of-memory; a non-integer `steps` answers 422 as its validation does.
//! An interrupted generation returns early with what it has, as the WebUI does. A prompt
//! containing `FAKE_STALL` hangs after its first step (progress readings stop moving) until it
//! is interrupted, as a wedged WebUI does.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use serde_json::{Value, json};

use crate::serve::{Served, TINY_PNG, serve};

/// A running fake A1111; stopped on drop.
#[derive(Debug)]
pub struct FakeA1111 {
    served: Served,
    state: Arc<A1111>,
}

#[derive(Debug, Default)]
struct A1111 {
    // (sampling_step, sampling_steps) of the generation that runs, if any.
    current: Mutex<Option<(u64, u64)>>,
    interrupted: AtomicBool,
    interrupts: AtomicUsize,
    progress_polls: AtomicUsize,
    generations: AtomicUsize,
}

impl FakeA1111 {
    /// Starts on a free loopback port.
    pub fn start() -> FakeA1111 {
        Self::start_on(0)
    }

    /// Starts on `127.0.0.1:port` (0 = any free port); a test restarts the WebUI by dropping
    /// one fake and starting another on the same port.
    pub fn start_on(port: u16) -> FakeA1111 {
        let state = Arc::new(A1111::default());
        let s = state.clone();
        let served = serve(port, move || {
            Router::new()
                .route("/sdapi/v1/txt2img", post(txt2img))
                .route("/sdapi/v1/img2img", post(img2img))
                .route("/sdapi/v1/progress", get(progress))
                .route("/sdapi/v1/interrupt", post(interrupt))
                .with_state(s)
        });
        FakeA1111 { served, state }
    }

    /// The server's address.
    pub fn addr(&self) -> SocketAddr {
        self.served.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.served.addr)
    }

    /// How many `POST /sdapi/v1/interrupt` arrived.
    pub fn interrupts(&self) -> usize {
        self.state.interrupts.load(Ordering::SeqCst)
    }

    /// How many times progress was polled.
    pub fn progress_polls(&self) -> usize {
        self.state.progress_polls.load(Ordering::SeqCst)
    }

    /// Whether a generation runs now.
    pub fn busy(&self) -> bool {
        self.state.current.lock().expect("fake lock").is_some()
    }

    /// How many generations finished.
    pub fn generations(&self) -> usize {
        self.state.generations.load(Ordering::SeqCst)
    }
}

async fn txt2img(state: State<Arc<A1111>>, body: Json<Value>) -> Response {
    generate(state, body, "txt2img").await
}

async fn img2img(state: State<Arc<A1111>>, body: Json<Value>) -> Response {
    generate(state, body, "img2img").await
}

async fn generate(State(s): State<Arc<A1111>>, Json(body): Json<Value>, kind: &str) -> Response {
    let steps = match body.get("steps") {
        None => 3,
        Some(v) => match v.as_u64() {
            Some(n) => n,
            None => {
                return (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    Json(json!({"detail": [{"loc": ["body", "steps"], "msg": "value is not a valid integer", "type": "type_error.integer"}]})),
                )
                    .into_response();
            }
        },
    };
    let prompt = body.get("prompt").and_then(Value::as_str).unwrap_or_default();
    if prompt.contains("FAIL_OOM") {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({"error": "OutOfMemoryError", "detail": "", "body": "",
                        "errors": "CUDA out of memory. Tried to allocate 2.00 GiB"})),
        )
            .into_response();
    }
    if kind == "img2img" && !body.get("init_images").is_some_and(Value::is_array) {
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(json!({"detail": [{"loc": ["body", "init_images"], "msg": "field required", "type": "value_error.missing"}]})),
        )
            .into_response();
    }
    let step_ms = body.get("step_ms").and_then(Value::as_u64).unwrap_or(0);
    let batch = body.get("batch_size").and_then(Value::as_u64).unwrap_or(1).max(1);
    s.interrupted.store(false, Ordering::SeqCst);
    *s.current.lock().expect("fake lock") = Some((0, steps));
    for i in 1..=steps {
        if step_ms > 0 {
            tokio::time::sleep(Duration::from_millis(step_ms)).await;
        }
        if s.interrupted.load(Ordering::SeqCst) {
            break;
        }
        *s.current.lock().expect("fake lock") = Some((i, steps));
        if prompt.contains("FAKE_STALL") {
            while !s.interrupted.load(Ordering::SeqCst) {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }
    }
    *s.current.lock().expect("fake lock") = None;
    s.generations.fetch_add(1, Ordering::SeqCst);
    let image = base64::engine::general_purpose::STANDARD.encode(TINY_PNG);
    let info = json!({"prompt": prompt, "all_prompts": [prompt], "seed": 1234, "steps": steps,
                      "interrupted": s.interrupted.load(Ordering::SeqCst)});
    Json(json!({
        "images": vec![image; batch as usize],
        "parameters": body,
        "info": info.to_string(),
    }))
    .into_response()
}

async fn progress(State(s): State<Arc<A1111>>) -> Json<Value> {
    s.progress_polls.fetch_add(1, Ordering::SeqCst);
    let current = *s.current.lock().expect("fake lock");
    let (step, steps, fraction, jobs) = match current {
        Some((a, b)) if b > 0 => (a, b, a as f64 / b as f64, 1),
        _ => (0, 0, 0.0, 0),
    };
    Json(json!({
        "progress": fraction,
        "eta_relative": (steps - step) as f64 * 0.1,
        "state": {"skipped": false, "interrupted": s.interrupted.load(Ordering::SeqCst), "stopping_generation": false,
                  "job": if jobs > 0 { "scripts_txt2img: 0" } else { "" }, "job_count": jobs,
                  "job_timestamp": "20260101000000", "job_no": 0, "sampling_step": step, "sampling_steps": steps},
        "current_image": null,
        "textinfo": null
    }))
}

async fn interrupt(State(s): State<Arc<A1111>>) -> Json<Value> {
    s.interrupts.fetch_add(1, Ordering::SeqCst);
    s.interrupted.store(true, Ordering::SeqCst);
    Json(json!({}))
}

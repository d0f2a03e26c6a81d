//! The HTTP routes of the health server (axum), and the connection handling that keeps it
//! answering under abuse.
//!
//! The server binds `0.0.0.0`, so anyone who can reach the port can open connections. Each
//! connection must send its request headers within [`HEADER_READ_TIMEOUT`] (this also closes a
//! keep-alive connection that waits that long for its next request), and one with no request in
//! flight for [`IDLE_TIMEOUT`] (a client that stopped reading its response) is closed. At most
//! [`MAX_CONNECTIONS`] are open at once: at the cap the oldest connection with no request in
//! flight is closed to make room, so a flood of idle or half-sent connections cannot shut out
//! `/health`, and when every one is busy the new one is refused. Nothing waits in a queue.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::service::Service as _;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::status::{HealthDocument, ReadyDocument, Verdict, WorkerStage};
use super::{HealthState, Phase};

/// How long a connection may take to send a request's headers (and, on a keep-alive
/// connection, to start its next request).
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a connection may go without a request in flight before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// The most connections open at once.
pub const MAX_CONNECTIONS: usize = 256;

/// How long open connections get to finish their response when the server stops.
const STOP_GRACE: Duration = Duration::from_millis(250);

/// How long the accept loop pauses after an accept error (e.g. out of file descriptors), so
/// that it does not spin while the condition lasts.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// Why the health server stopped.
#[derive(Debug, thiserror::Error)]
pub enum HealthError {
    /// The port could not be bound.
    #[error("failed to bind the health server to {addr}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// Binds the health server's port on `0.0.0.0`, so that `machine run` fails before anything
/// starts when the port is taken.
pub async fn bind(port: u16) -> Result<TcpListener, HealthError> {
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    TcpListener::bind(addr)
        .await
        .map_err(|source| HealthError::Bind { addr, source })
}

/// Serves the health routes on `listener` until `stop` is cancelled.
pub async fn run(state: Arc<HealthState>, listener: TcpListener, stop: CancellationToken) -> Result<(), HealthError> {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    tracing::info!(port, "health server listening");
    let app = router(state);
    let open = Arc::new(Connections::default());
    let mut tasks = tokio::task::JoinSet::new();
    let mut last_accept_error: Option<Instant> = None;
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Logged at most once a minute: a flood would otherwise flood the log too.
                    if last_accept_error.is_none_or(|t| t.elapsed() > Duration::from_secs(60)) {
                        tracing::warn!("the health server failed to accept a connection: {e}");
                        last_accept_error = Some(Instant::now());
                    }
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let Some(conn) = open.admit() else {
            // Every connection has a request in flight: refuse rather than queue.
            drop(stream);
            continue;
        };
        tasks.spawn(serve_connection(stream, app.clone(), conn, stop.clone()));
    }
    // Each connection saw `stop` and finishes its response within STOP_GRACE.
    let _ = tokio::time::timeout(STOP_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    Ok(())
}

/// The open connections, oldest first (ids only grow).
#[derive(Debug, Default)]
struct Connections {
    next: AtomicU64,
    open: Mutex<BTreeMap<u64, Arc<Conn>>>,
}

/// One open connection as the server tracks it.
#[derive(Debug)]
struct Conn {
    id: u64,
    /// Requests in flight.
    busy: AtomicUsize,
    /// Milliseconds after `opened` of the last request's start or end.
    last_active_ms: AtomicU64,
    opened: Instant,
    /// Cancelled to close the connection to make room for a new one.
    evict: CancellationToken,
    registry: std::sync::Weak<Connections>,
}

impl Connections {
    /// Registers a new connection, closing the oldest idle one at the cap; `None` when every
    /// open connection is busy.
    fn admit(self: &Arc<Self>) -> Option<Arc<Conn>> {
        let mut open = self.open.lock().unwrap_or_else(PoisonError::into_inner);
        if open.len() >= MAX_CONNECTIONS {
            let idle = open
                .iter()
                .find(|(_, c)| c.busy.load(Ordering::Acquire) == 0 && !c.evict.is_cancelled())
                .map(|(id, _)| *id)?;
            if let Some(c) = open.remove(&idle) {
                c.evict.cancel();
            }
        }
        let conn = Arc::new(Conn {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            busy: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(0),
            opened: Instant::now(),
            evict: CancellationToken::new(),
            registry: Arc::downgrade(self),
        });
        open.insert(conn.id, Arc::clone(&conn));
        Some(conn)
    }
}

impl Conn {
    fn touch(&self) {
        self.last_active_ms
            .store(self.opened.elapsed().as_millis() as u64, Ordering::Release);
    }

    /// How long until the connection counts as idle, or `None` when it already does.
    fn idle_in(&self) -> Option<Duration> {
        if self.busy.load(Ordering::Acquire) > 0 {
            return Some(IDLE_TIMEOUT);
        }
        let last = Duration::from_millis(self.last_active_ms.load(Ordering::Acquire));
        (last + IDLE_TIMEOUT).checked_sub(self.opened.elapsed())
    }

    fn close(&self) {
        if let Some(registry) = self.registry.upgrade() {
            registry
                .open
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&self.id);
        }
    }
}

/// Marks a request in flight on its connection while it lives.
struct InFlight(Arc<Conn>);

impl InFlight {
    fn new(conn: &Arc<Conn>) -> InFlight {
        conn.busy.fetch_add(1, Ordering::AcqRel);
        conn.touch();
        InFlight(Arc::clone(conn))
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, app: Router, conn: Arc<Conn>, stop: CancellationToken) {
    let tower = hyper_util::service::TowerToHyperService::new(app);
    let service = {
        let conn = Arc::clone(&conn);
        hyper::service::service_fn(move |req| {
            let in_flight = InFlight::new(&conn);
            let response = tower.call(req);
            async move {
                let r = response.await;
                drop(in_flight);
                r
            }
        })
    };
    let http = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    tokio::pin!(http);
    let idle = async {
        while let Some(left) = conn.idle_in() {
            tokio::time::sleep(left.max(Duration::from_millis(100))).await;
        }
    };
    tokio::select! {
        _ = http.as_mut() => {}
        () = conn.evict.cancelled() => {}
        () = idle => {}
        () = stop.cancelled() => {
            http.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(STOP_GRACE, http.as_mut()).await;
        }
    }
    conn.close();
}

fn router(state: Arc<HealthState>) -> Router {
    Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/logs/{service}", get(logs))
        .route("/services/{name}/restart", post(restart))
        .route("/shutdown", post(shutdown))
        .with_state(state)
}

async fn health(State(s): State<Arc<HealthState>>) -> Response {
    let phase = s.phase();
    let failure = s.critical_failure();
    let healthy = phase != Phase::Shutdown && failure.is_none();
    let body = HealthDocument {
        status: if healthy { Verdict::Ok } else { Verdict::Unhealthy },
        machine_id: s.machine_id.clone(),
        phase,
        uptime_ms: s.uptime_ms(),
        critical_failure: failure,
    };
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn ready(State(s): State<Arc<HealthState>>) -> Response {
    let phase = s.phase();
    let workers = s.workers_document();
    // Ready while at least one worker can claim (a machine without workers: by its phase);
    // the workers that cannot are listed with why, whatever the answer.
    let can_claim =
        |w: &super::status::Worker| w.reason.is_none() && matches!(w.state, WorkerStage::Idle | WorkerStage::Busy);
    let ready = phase == Phase::Ready && (workers.is_empty() || workers.iter().any(can_claim));
    let not_claiming = workers
        .iter()
        .filter(|w| !can_claim(w))
        .map(|w| {
            let why = w.reason.clone().unwrap_or_else(|| w.state.name().replace('_', " "));
            (w.worker_id.clone(), why)
        })
        .collect();
    let body = ReadyDocument {
        ready,
        phase,
        not_claiming,
        workers,
    };
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn status(State(s): State<Arc<HealthState>>, headers: HeaderMap) -> Response {
    if s.access.guard_status {
        if let Some(refusal) = refuse(&s, &headers, Access::Read) {
            return refusal;
        }
    }
    axum::Json(s.status_document()).into_response()
}

async fn metrics(State(s): State<Arc<HealthState>>, headers: HeaderMap) -> Response {
    if s.access.guard_metrics {
        if let Some(refusal) = refuse(&s, &headers, Access::Read) {
            return refusal;
        }
    }
    for gpu in s.probe.live() {
        s.metrics.set_gpu(&gpu);
    }
    for gpu in s.probe.health_now() {
        s.metrics.set_gpu_health(&gpu);
    }
    for w in s.worker_statuses() {
        let quarantined = w.held_by.contains(&crate::worker::hold::HoldKind::Quarantine);
        s.metrics.set_worker_hold(&w.worker_id, w.hold.is_some(), quarantined);
    }
    for service in s.services.status() {
        s.metrics
            .set_service_restarts(&service.name, u64::from(service.restarts));
    }
    if let Some(m) = &s.models {
        s.metrics.set_models(m.downloads(), m.downloaded_bytes(), m.evictions());
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.encode(),
    )
        .into_response()
}

#[derive(Debug, serde::Deserialize)]
struct LogsQuery {
    lines: Option<usize>,
}

/// The most lines `/logs` returns at once (the supervisor keeps at most its tail anyway).
const MAX_LOG_LINES: usize = 10_000;

async fn logs(
    State(s): State<Arc<HealthState>>,
    Path(service): Path<String>,
    Query(q): Query<LogsQuery>,
    headers: HeaderMap,
) -> Response {
    if !s.access.open_logs {
        if let Some(refusal) = refuse(&s, &headers, Access::Read) {
            return refusal;
        }
    }
    let n = q.lines.unwrap_or(100).min(MAX_LOG_LINES);
    match s.services.logs(&service, n) {
        Ok(lines) => {
            let mut body = lines.join("\n");
            if !body.is_empty() {
                body.push('\n');
            }
            ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
        }
        Err(e) => (StatusCode::NOT_FOUND, axum::Json(json!({ "error": e.to_string() }))).into_response(),
    }
}

async fn restart(State(s): State<Arc<HealthState>>, Path(name): Path<String>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse(&s, &headers, Access::Control) {
        return refusal;
    }
    tracing::info!(service = %name, "restart requested over HTTP");
    match s.services.restart(&name).await {
        Ok(()) => (StatusCode::ACCEPTED, axum::Json(json!({ "restarting": name }))).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, axum::Json(json!({ "error": e.to_string() }))).into_response(),
    }
}

async fn shutdown(State(s): State<Arc<HealthState>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse(&s, &headers, Access::Control) {
        return refusal;
    }
    tracing::info!("shutdown requested over HTTP");
    s.shutdown.cancel();
    (StatusCode::ACCEPTED, axum::Json(json!({ "shutting_down": true }))).into_response()
}

/// What a guarded route lets the caller do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Read logs, status or metrics: the read token or the control token.
    Read,
    /// Restart services or shut down: the control token only.
    Control,
}

/// Checks `Authorization: Bearer <token>` against the tokens that grant `access` and returns
/// the refusal when it does not hold; with no such token configured the route is refused.
fn refuse(s: &HealthState, headers: &HeaderMap, access: Access) -> Option<Response> {
    let tokens: Vec<&str> = match access {
        Access::Control => s.control_token.iter().map(|t| t.expose()).collect(),
        Access::Read => s
            .control_token
            .iter()
            .chain(&s.access.read_token)
            .map(|t| t.expose())
            .collect(),
    };
    if tokens.is_empty() {
        let error = match access {
            Access::Control => "control routes are disabled: set MACHINE_CONTROL_TOKEN",
            Access::Read => {
                "this route needs a token: set MACHINE_READ_TOKEN or MACHINE_CONTROL_TOKEN (or open it in [health])"
            }
        };
        return Some((StatusCode::FORBIDDEN, axum::Json(json!({ "error": error }))).into_response());
    }
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    // Every token is compared, so the timing does not say which one came close.
    let matched = tokens
        .iter()
        .fold(false, |ok, t| constant_time_eq(given.as_bytes(), t.as_bytes()) | ok);
    if matched {
        None
    } else {
        Some(
            (
                StatusCode::UNAUTHORIZED,
                axum::Json(json!({ "error": "missing or wrong bearer token" })),
            )
                .into_response(),
        )
    }
}

/// Compares without an early exit, so response timing does not reveal how much of a guess was
/// right.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, x) in a.iter().enumerate() {
        diff |= usize::from(x ^ b.get(i).copied().unwrap_or(0));
    }
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"ab", b"abc"));
        assert!(!constant_time_eq(b"", b"abc"));
    }
}

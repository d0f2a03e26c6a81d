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
//!
//! An event stream (`/events`) is one response that never ends: while it streams, each event or
//! keep-alive it writes counts as activity on its connection, so it is not closed as idle, and
//! it is never the connection closed to make room (there are at most
//! [`events::MAX_STREAMS`](super::events::MAX_STREAMS) of them). A client that stops reading
//! one stops its writes too, and is closed as idle like any other.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use hyper::service::Service as _;
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::access::{Access, granted, refuse};
use super::control::ControlSocket;
use super::events::Hub;
use super::status::{HealthDocument, Verdict};
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

/// The status page, embedded so that the binary serves it with nothing else installed.
const PAGE: &str = include_str!("../../assets/page/index.html");

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

/// Serves the health routes on `listener`, and on the control socket when there is one, until
/// `stop` is cancelled.
pub async fn run(
    state: Arc<HealthState>,
    listener: TcpListener,
    control: Option<ControlSocket>,
    stop: CancellationToken,
) -> Result<(), HealthError> {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or_default();
    tracing::info!(port, "health server listening");
    let (hub, publisher) = Hub::new(Arc::clone(&state), stop.clone());
    let publisher = tokio::spawn(publisher);
    let app = router(Arc::clone(&state), hub);
    let control = control.map(|socket| tokio::spawn(super::control::serve(state, app.clone(), socket, stop.clone())));
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
    // The publisher saw `stop` too and ends at its next await; so does the control socket.
    let _ = publisher.await;
    if let Some(control) = control {
        let _ = control.await;
    }
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
    /// Event streams being written.
    streams: AtomicUsize,
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
                .find(|(_, c)| {
                    c.busy.load(Ordering::Acquire) == 0
                        && c.streams.load(Ordering::Acquire) == 0
                        && !c.evict.is_cancelled()
                })
                .map(|(id, _)| *id)?;
            if let Some(c) = open.remove(&idle) {
                c.evict.cancel();
            }
        }
        let conn = Arc::new(Conn {
            id: self.next.fetch_add(1, Ordering::Relaxed),
            busy: AtomicUsize::new(0),
            streams: AtomicUsize::new(0),
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

/// Marks a response whose body streams for as long as the client listens (the event stream).
#[derive(Debug, Clone, Copy)]
pub(super) struct LongLived;

/// The body of a [`LongLived`] response: each frame it yields counts as activity on its
/// connection, and while it lives the connection is not closed to make room.
struct Streaming {
    body: Body,
    conn: Arc<Conn>,
}

impl Streaming {
    fn new(body: Body, conn: &Arc<Conn>) -> Streaming {
        conn.streams.fetch_add(1, Ordering::AcqRel);
        conn.touch();
        Streaming {
            body,
            conn: Arc::clone(conn),
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.conn.streams.fetch_sub(1, Ordering::AcqRel);
    }
}

impl hyper::body::Body for Streaming {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &polled {
            self.conn.touch();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

async fn serve_connection(stream: tokio::net::TcpStream, app: Router, conn: Arc<Conn>, stop: CancellationToken) {
    let tower = hyper_util::service::TowerToHyperService::new(app);
    let service = {
        let conn = Arc::clone(&conn);
        hyper::service::service_fn(move |req| {
            let in_flight = InFlight::new(&conn);
            let response = tower.call(req);
            let conn = Arc::clone(&conn);
            async move {
                let r = response.await;
                drop(in_flight);
                r.map(|response| {
                    if response.extensions().get::<LongLived>().is_some() {
                        response.map(|body| Body::new(Streaming::new(body, &conn)))
                    } else {
                        response
                    }
                })
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

fn router(state: Arc<HealthState>, hub: Hub) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/events", get(events))
        .route("/fleet", get(fleet))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/access", get(access))
        .route("/status", get(status))
        .route("/metrics", get(metrics))
        .route("/logs/{service}", get(logs))
        .route("/services/{name}/restart", post(restart))
        .route("/workers/quarantine/clear", post(clear_quarantine))
        .route("/shutdown", post(shutdown))
        .merge(super::control::routes())
        .route("/reload", post(reload))
        .route("/plan", get(plan))
        .layer(Extension(hub))
        .with_state(state)
}

/// The status page. Open: it holds no data, only the code that reads the guarded routes. It
/// may load nothing from anywhere else (the policy says so to the browser too), and no other
/// site may frame it, so that its restart button cannot be clicked through someone's page.
async fn page() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
                 img-src data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
            ),
            (header::X_FRAME_OPTIONS, "DENY"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
        ],
        PAGE,
    )
        .into_response()
}

/// The live status stream (see [`super::events`]); guarded like `/status`.
async fn events(State(s): State<Arc<HealthState>>, Extension(hub): Extension<Hub>, headers: HeaderMap) -> Response {
    if s.access.guard_status {
        if let Some(refusal) = refuse(&s, &headers, Access::Read) {
            return refusal;
        }
    }
    match hub.open(Arc::clone(&s)) {
        Ok(mut stream) => {
            stream.extensions_mut().insert(LongLived);
            stream
        }
        Err(busy) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": busy.to_string() })),
        )
            .into_response(),
    }
}

/// Every machine's stored fleet status, read from Redis; guarded like `/status`. When Redis
/// cannot be read the answer is 503 with the reason.
async fn fleet(State(s): State<Arc<HealthState>>, Extension(hub): Extension<Hub>, headers: HeaderMap) -> Response {
    if s.access.guard_status {
        if let Some(refusal) = refuse(&s, &headers, Access::Read) {
            return refusal;
        }
    }
    match hub.fleet(&s).await {
        Ok(fleet) => axum::Json(&*fleet).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": crate::logging::error_chain(&*e) })),
        )
            .into_response(),
    }
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
    let body = s.ready_document();
    let code = if body.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

/// `GET /access`: what the request's token lets it do (`control`, `read` or `none`), so that the
/// page offers only the actions the entered token may take. Open: it says nothing a guarded
/// route's 401 would not.
async fn access(State(s): State<Arc<HealthState>>, headers: HeaderMap) -> Response {
    let access = match granted(&s, &headers) {
        Some(Access::Control) => "control",
        Some(Access::Read) => "read",
        None => "none",
    };
    axum::Json(json!({ "access": access })).into_response()
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
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = s.scrape_metrics(accept);
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
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
    match s
        .services
        .resolve_one(&service)
        .and_then(|service| s.services.logs(&service, n))
    {
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
    // A connector name restarts every instance of it.
    let services = match s.services.resolve(&name) {
        Ok(services) => services,
        Err(e) => return (StatusCode::NOT_FOUND, axum::Json(json!({ "error": e.to_string() }))).into_response(),
    };
    for service in &services {
        if let Err(e) = s.services.restart(service).await {
            return (StatusCode::NOT_FOUND, axum::Json(json!({ "error": e.to_string() }))).into_response();
        }
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "restarting": name, "services": services })),
    )
        .into_response()
}

/// `POST /workers/quarantine/clear[?worker=ID]` (control token): lifts the quarantine of one
/// worker, or of every worker; answers the workers that were quarantined.
async fn clear_quarantine(
    State(s): State<Arc<HealthState>>,
    Query(q): Query<QuarantineQuery>,
    headers: HeaderMap,
) -> Response {
    if let Some(refusal) = refuse(&s, &headers, Access::Control) {
        return refusal;
    }
    let Some(workers) = s.workers() else {
        let error = "the machine's workers are not running yet";
        return (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "error": error }))).into_response();
    };
    let worker = q.worker.as_deref().filter(|w| !w.is_empty());
    tracing::info!(
        worker = worker.unwrap_or("(all)"),
        "quarantine clear requested over HTTP"
    );
    match workers.clear_quarantine(worker).await {
        Ok(cleared) => axum::Json(json!({ "cleared": cleared })).into_response(),
        Err(e @ crate::worker::WorkerError::UnknownWorker { .. }) => {
            (StatusCode::NOT_FOUND, axum::Json(json!({ "error": e.to_string() }))).into_response()
        }
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": crate::logging::error_chain(&e) })),
        )
            .into_response(),
    }
}

/// The query of `POST /workers/quarantine/clear`.
#[derive(Debug, serde::Deserialize)]
struct QuarantineQuery {
    /// One worker; every worker when absent.
    worker: Option<String>,
}

async fn shutdown(State(s): State<Arc<HealthState>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse(&s, &headers, Access::Control) {
        return refusal;
    }
    tracing::info!("shutdown requested over HTTP");
    s.shutdown.cancel();
    (StatusCode::ACCEPTED, axum::Json(json!({ "shutting_down": true }))).into_response()
}

#[derive(Debug, serde::Deserialize)]
struct ReloadQuery {
    /// Load and compare only (`machine config check --diff`): change nothing.
    #[serde(default)]
    dry_run: bool,
}

/// `POST /reload`: reloads the configuration (control token) and answers the report, or 422
/// with every problem of a refused configuration. With `?dry_run=true` the machine loads its
/// configuration as a reload would and answers what would change, changing nothing; that is
/// guarded like `/plan`.
async fn reload(State(s): State<Arc<HealthState>>, Query(q): Query<ReloadQuery>, headers: HeaderMap) -> Response {
    if q.dry_run {
        if s.access.guard_status {
            if let Some(refusal) = refuse(&s, &headers, Access::Read) {
                return refusal;
            }
        }
    } else if let Some(refusal) = refuse(&s, &headers, Access::Control) {
        return refusal;
    } else {
        tracing::info!("reload requested over HTTP");
    }
    let unavailable = |why: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({ "error": format!("the machine cannot reload now: {why}") })),
        )
            .into_response()
    };
    let Some(requests) = s.reload_requests() else {
        return unavailable("its services are not running yet");
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let request = super::ReloadRequest {
        dry_run: q.dry_run,
        reply: tx,
    };
    if requests.send(request).await.is_err() {
        return unavailable("it is shutting down");
    }
    match rx.await {
        Ok(Ok(report)) => axum::Json(report).into_response(),
        Ok(Err(e)) => {
            let code = match &e {
                super::ReloadError::Invalid(_) => StatusCode::UNPROCESSABLE_ENTITY,
                super::ReloadError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
                super::ReloadError::Apply { .. } => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let body = json!({
                "error": crate::logging::error_chain(&e),
                "problems": e.problems(),
            });
            (code, axum::Json(body)).into_response()
        }
        Err(_) => unavailable("it is shutting down"),
    }
}

/// `GET /plan`: the running plan and configuration (secrets masked), guarded like `/status`;
/// `machine config check --diff` compares a new configuration with it.
async fn plan(State(s): State<Arc<HealthState>>, headers: HeaderMap) -> Response {
    if s.access.guard_status {
        if let Some(refusal) = refuse(&s, &headers, Access::Read) {
            return refusal;
        }
    }
    axum::Json(json!({ "plan": s.plan(), "config": s.config_document() })).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_streams_are_not_closed_to_make_room() {
        let open = Arc::new(Connections::default());
        let conns: Vec<Arc<Conn>> = (0..MAX_CONNECTIONS)
            .map(|_| open.admit().expect("room below the cap"))
            .collect();
        // The oldest connection writes an event stream; the next oldest is idle.
        let stream = Streaming::new(Body::empty(), &conns[0]);
        let _newest = open.admit().expect("an idle connection makes room");
        assert!(!conns[0].evict.is_cancelled(), "the stream was kept");
        assert!(conns[1].evict.is_cancelled(), "the oldest idle connection was closed");
        // Once the stream ends, its connection is an idle one like the others.
        drop(stream);
        let _another = open.admit().expect("room again");
        assert!(conns[0].evict.is_cancelled());
    }
}

//! The HTTP routes of the health server (axum).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::{HealthState, Phase};

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
    /// Serving failed.
    #[error("health server failed")]
    Serve(#[source] std::io::Error),
}

/// Serves the health routes on `0.0.0.0:port` until `stop` is cancelled. `bound` receives the
/// bound address (useful with port 0).
pub async fn run(
    state: Arc<HealthState>,
    port: u16,
    stop: CancellationToken,
    bound: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> Result<(), HealthError> {
    let addr = SocketAddr::from(([0, 0, 0, 0], port));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| HealthError::Bind { addr, source })?;
    if let Some(tx) = bound {
        let _ = tx.send(listener.local_addr().map_err(HealthError::Serve)?);
    }
    tracing::info!(port, "health server listening");
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
        .map_err(HealthError::Serve)
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
    let body = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "machine_id": s.machine_id,
        "phase": phase,
        "uptime_ms": s.uptime_ms(),
        "critical_failure": failure,
    });
    let code = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn ready(State(s): State<Arc<HealthState>>) -> Response {
    let phase = s.phase();
    let ready = phase == Phase::Ready;
    let body = json!({ "ready": ready, "phase": phase, "workers": s.workers_document() });
    let code = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, axum::Json(body)).into_response()
}

async fn status(State(s): State<Arc<HealthState>>) -> Response {
    axum::Json(s.status_document()).into_response()
}

async fn metrics(State(s): State<Arc<HealthState>>) -> Response {
    for gpu in s.probe.live() {
        s.metrics.set_gpu(&gpu);
    }
    for service in s.services.status() {
        s.metrics
            .set_service_restarts(&service.name, u64::from(service.restarts));
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

async fn logs(State(s): State<Arc<HealthState>>, Path(service): Path<String>, Query(q): Query<LogsQuery>) -> Response {
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
    if let Some(refusal) = refuse_unauthorized(&s, &headers) {
        return refusal;
    }
    tracing::info!(service = %name, "restart requested over HTTP");
    match s.services.restart(&name).await {
        Ok(()) => (StatusCode::ACCEPTED, axum::Json(json!({ "restarting": name }))).into_response(),
        Err(e) => (StatusCode::NOT_FOUND, axum::Json(json!({ "error": e.to_string() }))).into_response(),
    }
}

async fn shutdown(State(s): State<Arc<HealthState>>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse_unauthorized(&s, &headers) {
        return refusal;
    }
    tracing::info!("shutdown requested over HTTP");
    s.shutdown.cancel();
    (StatusCode::ACCEPTED, axum::Json(json!({ "shutting_down": true }))).into_response()
}

/// Checks `Authorization: Bearer <MACHINE_CONTROL_TOKEN>` and returns the refusal when it does
/// not hold; without a configured token every control route is refused.
fn refuse_unauthorized(s: &HealthState, headers: &HeaderMap) -> Option<Response> {
    let Some(token) = &s.control_token else {
        return Some(
            (
                StatusCode::FORBIDDEN,
                axum::Json(json!({ "error": "control routes are disabled: set MACHINE_CONTROL_TOKEN" })),
            )
                .into_response(),
        );
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if constant_time_eq(given.as_bytes(), token.expose().as_bytes()) {
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

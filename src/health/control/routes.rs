//! The routes the operator commands need beyond the health server's documents: a log's tail,
//! optionally followed (`machine logs`), and stopping the machine (`machine stop`). They are
//! part of the health router, so they answer on the control socket (with control access) and on
//! the health port (with a token).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use serde_json::json;

use crate::health::HealthState;
use crate::health::access::{Access, refuse};
use crate::logging::{MACHINE_LOG, Tail, machine_log};

/// How often a followed log is checked for new lines.
const FOLLOW_EVERY: Duration = Duration::from_millis(200);

/// The most lines a log answer starts with.
const MAX_LINES: usize = 10_000;

/// The control routes, to merge into the health router.
pub(in crate::health) fn routes() -> Router<Arc<HealthState>> {
    Router::new()
        .route("/control/logs/{name}", get(logs))
        .route("/control/stop", post(stop))
}

#[derive(Debug, serde::Deserialize)]
struct LogsQuery {
    /// How many of the last lines to start with (default 100).
    lines: Option<usize>,
    /// Keep the answer open and send each new line as it arrives.
    #[serde(default)]
    follow: bool,
}

/// `GET /control/logs/{name}?lines=N&follow=true`: a service's output, or the machine's own log
/// (`machine`), as timestamped text lines.
async fn logs(
    State(s): State<Arc<HealthState>>,
    Path(name): Path<String>,
    Query(q): Query<LogsQuery>,
    headers: HeaderMap,
) -> Response {
    if !s.access.open_logs {
        if let Some(refusal) = refuse(&s, &headers, Access::Read) {
            return refusal;
        }
    }
    let tail = if name == MACHINE_LOG {
        machine_log()
    } else {
        match s
            .services
            .resolve_one(&name)
            .and_then(|name| s.services.log_tail(&name))
        {
            Ok(t) => t,
            Err(e) => {
                return (StatusCode::NOT_FOUND, axum::Json(json!({ "error": e.to_string() }))).into_response();
            }
        }
    };
    let (first, cursor) = tail.last_and_cursor(q.lines.unwrap_or(100).min(MAX_LINES));
    let first = lines_text(first);
    let body = if q.follow {
        Body::from_stream(follow(tail, first, cursor))
    } else {
        Body::from(first)
    };
    ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], body).into_response()
}

/// The chunks of a followed log: the first lines, then each batch of new ones. It ends when
/// the reader goes away or the server stops.
fn follow(
    tail: Arc<Tail>,
    first: String,
    cursor: u64,
) -> impl futures_util::Stream<Item = Result<Bytes, std::convert::Infallible>> + Send {
    futures_util::stream::unfold((tail, Some(first), cursor), |(tail, first, cursor)| async move {
        if let Some(first) = first {
            return Some((Ok(Bytes::from(first)), (tail, None, cursor)));
        }
        loop {
            let (lines, next) = tail.after(cursor);
            if !lines.is_empty() {
                return Some((Ok(Bytes::from(lines_text(lines))), (tail, None, next)));
            }
            tokio::time::sleep(FOLLOW_EVERY).await;
        }
    })
}

fn lines_text(lines: Vec<String>) -> String {
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    text
}

#[derive(Debug, serde::Deserialize)]
struct StopQuery {
    /// Skip the drain, as a second SIGTERM does.
    #[serde(default)]
    now: bool,
}

/// `POST /control/stop[?now=true]`: the graceful stop a SIGTERM starts (workers drain), or with
/// `now` the forced one a second signal makes (jobs returned at once, services killed).
async fn stop(State(s): State<Arc<HealthState>>, Query(q): Query<StopQuery>, headers: HeaderMap) -> Response {
    if let Some(refusal) = refuse(&s, &headers, Access::Control) {
        return refusal;
    }
    tracing::info!(now = q.now, "stop requested by an operator");
    s.shutdown.cancel();
    if q.now {
        s.force.cancel();
    }
    (
        StatusCode::ACCEPTED,
        axum::Json(json!({ "stopping": true, "now": q.now })),
    )
        .into_response()
}

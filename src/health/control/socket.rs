//! The control socket's file and its accept loop.
//!
//! The socket is created after the workspace lock is taken, so a socket file found there is a
//! dead machine's and is removed. It is made owner-only (0600) before the first connection is
//! accepted, and removed again when the machine stops.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::{HeaderValue, header};
use hyper::service::Service as _;
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use crate::health::HealthState;

/// Where the socket lies under the workspace.
pub const SOCKET: &str = "run/control.sock";

/// How long open connections (a followed log among them) get when the machine stops.
const STOP_GRACE: Duration = Duration::from_millis(250);

/// How long the accept loop pauses after an accept error, so that it does not spin.
const ACCEPT_PAUSE: Duration = Duration::from_millis(50);

/// The control socket of the machine on `workspace`.
pub fn socket_path(workspace: &Path) -> PathBuf {
    workspace.join(SOCKET)
}

/// Why the control socket could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Its directory could not be created.
    #[error("failed to create the directory of the control socket {path}")]
    Directory {
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A dead machine's socket could not be removed.
    #[error("failed to remove the stale control socket {path}")]
    Stale {
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be bound.
    #[error("failed to bind the control socket {path}")]
    Bind {
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The socket could not be made owner-only.
    #[error("failed to make the control socket {path} owner-only")]
    Mode {
        /// The socket's path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The bound control socket; dropping it removes the file.
#[derive(Debug)]
pub struct ControlSocket {
    listener: UnixListener,
    path: PathBuf,
}

impl Drop for ControlSocket {
    fn drop(&mut self) {
        // A socket file left behind would make the next command try a machine that is gone.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `<workspace>/run/control.sock`, owner-only; the caller holds the workspace lock.
pub fn bind(workspace: &Path) -> Result<ControlSocket, ControlError> {
    use std::os::unix::fs::PermissionsExt as _;
    let path = socket_path(workspace);
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| ControlError::Directory {
            path: path.clone(),
            source,
        })?;
    }
    match std::fs::remove_file(&path) {
        Ok(()) => tracing::info!(path = %path.display(), "removed a stale control socket"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(source) => return Err(ControlError::Stale { path, source }),
    }
    let listener = UnixListener::bind(&path).map_err(|source| ControlError::Bind {
        path: path.clone(),
        source,
    })?;
    // Under the usual umask (022) the fresh socket is connectable by its owner only already;
    // setting the mode makes that hold whatever the umask, before anything is accepted (a
    // connection that slipped into the backlog meanwhile is dropped with the listener if the
    // mode cannot be set).
    let socket = ControlSocket { listener, path };
    std::fs::set_permissions(&socket.path, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
        ControlError::Mode {
            path: socket.path.clone(),
            source,
        }
    })?;
    Ok(socket)
}

/// Serves `app`, the health server's router, on `socket` with control access until `stop` is
/// cancelled; then removes the socket file.
pub(in crate::health) async fn serve(
    state: Arc<HealthState>,
    app: Router,
    socket: ControlSocket,
    stop: CancellationToken,
) {
    tracing::info!(path = %socket.path.display(), "control socket listening");
    // A request through the socket carries the machine's own local token, whatever it sent:
    // the socket's mode already restricted who could connect.
    let grant = HeaderValue::from_str(&format!("Bearer {}", state.local_token.expose()))
        .unwrap_or_else(|_| HeaderValue::from_static(""));
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        let stream = tokio::select! {
            () = stop.cancelled() => break,
            accepted = socket.listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("the control socket failed to accept a connection: {e}");
                    tokio::time::sleep(ACCEPT_PAUSE).await;
                    continue;
                }
            },
        };
        while tasks.try_join_next().is_some() {}
        let tower = hyper_util::service::TowerToHyperService::new(app.clone());
        let grant = grant.clone();
        let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.headers_mut().insert(header::AUTHORIZATION, grant.clone());
            tower.call(req)
        });
        let stop = stop.clone();
        tasks.spawn(async move {
            let http = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(http);
            tokio::select! {
                _ = http.as_mut() => {}
                () = stop.cancelled() => {
                    http.as_mut().graceful_shutdown();
                    let _ = tokio::time::timeout(STOP_GRACE, http.as_mut()).await;
                }
            }
        });
    }
    let _ = tokio::time::timeout(STOP_GRACE, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
    drop(socket);
}

//! How every command that talks to a running machine finds it, the same way for all of them:
//! the control socket under the machine's workspace (`<workspace>/run/control.sock`, the
//! configuration's workspace or `/workspace`), else the health port on 127.0.0.1 (the
//! configuration's port or 9092), or only the URL given with `--url`. The socket grants control
//! access by its file mode; over TCP the request carries `MACHINE_CONTROL_TOKEN` (or
//! `MACHINE_READ_TOKEN`) when set.
//!
//! The conversation is plain HTTP/1.1 (hyper) over either stream, so the commands use the
//! health server's own routes and documents.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

use crate::config::{self, ProcessEnv};
use crate::health::control::socket_path;

/// The health port of a `--url` that names none.
const DEFAULT_PORT: u16 = 9092;
/// How long connecting (or a whole non-streaming request) may take.
const TIMEOUT: Duration = Duration::from_secs(5);

/// Why a command could not talk to the machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Nothing answered where the machine should be.
    #[error("no machine: {tried}")]
    NotFound {
        /// What was tried, and how each failed.
        tried: String,
    },
    /// `--url` is not an `http://host:port` URL.
    #[error("--url {url} is not an http:// URL with a host")]
    Url {
        /// The URL.
        url: String,
    },
    /// The HTTP conversation failed.
    #[error("failed to talk to the machine at {at}")]
    Http {
        /// The socket or address.
        at: String,
        /// The cause.
        #[source]
        source: hyper::Error,
    },
    /// The machine did not answer in time.
    #[error("the machine at {at} did not answer within {after:?}")]
    Timeout {
        /// The socket or address.
        at: String,
        /// How long it was given.
        after: Duration,
    },
    /// The machine refused or failed the request.
    #[error("the machine answered {status} to {path}: {message}")]
    Refused {
        /// The route.
        path: String,
        /// The HTTP status.
        status: u16,
        /// Its `error`, or the body cut short.
        message: String,
    },
    /// The answer is not the document the route promises.
    #[error("the machine's answer to {path} is not what this version of `machine` reads")]
    Document {
        /// The route.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
}

/// Where a command looks for the machine.
#[derive(Debug, Clone)]
pub(super) struct Target {
    /// The control socket, unless `--url` names the machine.
    socket: Option<PathBuf>,
    /// `host:port` of the health server.
    address: String,
    /// The bearer token sent over TCP: the control token, which also grants reading, else the
    /// read token ([`config::locate`]'s, read with the configuration).
    token: Option<config::Secret>,
}

impl Target {
    /// The machine of this configuration (`config_path` and the environment), or the one at
    /// `url`. The workspace and port are read leniently ([`config::locate`]): the status commands
    /// must work beside a machine whose configuration is being edited.
    pub(super) fn find(config_path: Option<&Path>, url: Option<&str>) -> Result<Target, MachineError> {
        // Leniently: finding the machine must not need a configuration that validates.
        let config::Location {
            workspace,
            health_port,
            control_token,
            read_token,
        } = config::locate(config_path, &ProcessEnv);
        let token = control_token.or(read_token);
        if let Some(url) = url {
            let bad = || MachineError::Url { url: url.to_owned() };
            let parsed = url::Url::parse(url).map_err(|_| bad())?;
            if parsed.scheme() != "http" {
                return Err(bad());
            }
            let host = parsed.host_str().ok_or_else(bad)?;
            let port = parsed.port_or_known_default().unwrap_or(DEFAULT_PORT);
            return Ok(Target {
                socket: None,
                address: format!("{host}:{port}"),
                token,
            });
        }
        Ok(Target {
            socket: Some(socket_path(&workspace)),
            address: format!("127.0.0.1:{health_port}"),
            token,
        })
    }

    /// Opens an HTTP connection: the socket first, then the port.
    async fn connect(&self) -> Result<Connection, MachineError> {
        let mut tried = Vec::new();
        if let Some(path) = &self.socket {
            match tokio::time::timeout(TIMEOUT, tokio::net::UnixStream::connect(path)).await {
                Ok(Ok(stream)) => return Connection::open(stream, path.display().to_string(), false).await,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::NotFound => {
                    tried.push(format!("no control socket at {}", path.display()));
                }
                Ok(Err(e)) => tried.push(format!("the control socket {} refused ({e})", path.display())),
                Err(_) => tried.push(format!("the control socket {} did not answer", path.display())),
            }
        }
        match tokio::time::timeout(TIMEOUT, tokio::net::TcpStream::connect(&self.address)).await {
            Ok(Ok(stream)) => Connection::open(stream, self.address.clone(), true).await,
            Ok(Err(e)) => {
                tried.push(format!("nothing answers on {} ({e})", self.address));
                Err(MachineError::NotFound {
                    tried: tried.join(" and "),
                })
            }
            Err(_) => {
                tried.push(format!("{} did not answer", self.address));
                Err(MachineError::NotFound {
                    tried: tried.join(" and "),
                })
            }
        }
    }

    /// Sends one request and returns the answer with its body still to read; a status other
    /// than 2xx is an error carrying the machine's reason.
    pub(super) async fn send(&self, method: Method, path: &str) -> Result<Response<Incoming>, MachineError> {
        let response = self.send_within(method, path, TIMEOUT).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let body = read_body(response, &self.at()).await.unwrap_or_default();
        Err(refused(path, status, &body))
    }

    /// Sends one request that the machine may take up to `after` to answer (a reload drains
    /// workers first) and returns its status and whole body, whatever the status.
    pub(super) async fn exchange(
        &self,
        method: Method,
        path: &str,
        after: Duration,
    ) -> Result<(StatusCode, Vec<u8>), MachineError> {
        let response = self.send_within(method, path, after).await?;
        let status = response.status();
        Ok((status, read_body(response, &self.at()).await?))
    }

    /// The workspace of the machine found by its socket; `None` for the machine at `--url`.
    pub(super) fn workspace(&self) -> Option<&Path> {
        self.socket.as_deref().and_then(Path::parent).and_then(Path::parent)
    }

    /// Where the machine was reached, for messages.
    fn at(&self) -> String {
        self.socket
            .as_ref()
            .map_or_else(|| self.address.clone(), |p| p.display().to_string())
    }

    async fn send_within(
        &self,
        method: Method,
        path: &str,
        after: Duration,
    ) -> Result<Response<Incoming>, MachineError> {
        let mut conn = self.connect().await?;
        let at = conn.at.clone();
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, "machine");
        if conn.tcp {
            // Over TCP the guarded routes want a token.
            if let Some(token) = &self.token {
                request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {}", token.expose()));
            }
        }
        let request = request
            .body(Empty::<Bytes>::new())
            .expect("a request built from a valid method, path and headers");
        tokio::time::timeout(after, conn.sender.send_request(request))
            .await
            .map_err(|_| MachineError::Timeout { at: at.clone(), after })?
            .map_err(|source| MachineError::Http { at, source })
    }

    /// Sends a request and reads the whole answer.
    pub(super) async fn text(&self, method: Method, path: &str) -> Result<Vec<u8>, MachineError> {
        let response = self.send(method, path).await?;
        read_body(response, &self.at()).await
    }

    /// `GET path` as the JSON document `T`.
    pub(super) async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, MachineError> {
        let body = self.text(Method::GET, path).await?;
        serde_json::from_slice(&body).map_err(|source| MachineError::Document {
            path: path.to_owned(),
            source,
        })
    }

    /// `POST path`, the answer as JSON.
    pub(super) async fn post(&self, path: &str) -> Result<serde_json::Value, MachineError> {
        let body = self.text(Method::POST, path).await?;
        serde_json::from_slice(&body).map_err(|source| MachineError::Document {
            path: path.to_owned(),
            source,
        })
    }
}

/// The reason in a refusal: the machine's `{"error": ...}`, else the body cut short.
fn refused(path: &str, status: StatusCode, body: &[u8]) -> MachineError {
    let message = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
    MachineError::Refused {
        path: path.to_owned(),
        status: status.as_u16(),
        message,
    }
}

async fn read_body(response: Response<Incoming>, at: &str) -> Result<Vec<u8>, MachineError> {
    let collected = tokio::time::timeout(TIMEOUT, response.into_body().collect())
        .await
        .map_err(|_| MachineError::Timeout {
            at: at.to_owned(),
            after: TIMEOUT,
        })?
        .map_err(|source| MachineError::Http {
            at: at.to_owned(),
            source,
        })?;
    Ok(collected.to_bytes().to_vec())
}

/// One HTTP/1.1 connection to the machine.
struct Connection {
    sender: hyper::client::conn::http1::SendRequest<Empty<Bytes>>,
    at: String,
    tcp: bool,
}

impl Connection {
    async fn open<S>(stream: S, at: String, tcp: bool) -> Result<Connection, MachineError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|source| MachineError::Http { at: at.clone(), source })?;
        // The connection task ends with the connection, when the sender and the answer's body
        // are dropped.
        tokio::spawn(conn);
        Ok(Connection { sender, at, tcp })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_names_one_address_and_no_socket() {
        let t = Target::find(None, Some("http://10.0.0.5:9100/")).expect("a good URL");
        assert!(t.socket.is_none());
        assert_eq!(t.address, "10.0.0.5:9100");
        assert!(matches!(
            Target::find(None, Some("https://h")),
            Err(MachineError::Url { .. })
        ));
    }

    #[test]
    fn a_refusal_carries_the_machines_reason() {
        let e = refused("/x", StatusCode::NOT_FOUND, br#"{"error":"no service nope"}"#);
        assert_eq!(e.to_string(), "the machine answered 404 to /x: no service nope");
        let e = refused("/x", StatusCode::BAD_GATEWAY, b"plain");
        assert!(e.to_string().ends_with(": plain"));
    }
}

//! Helpers shared by the integration tests.

use std::future::Future;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A `machine` command with a clean environment: only `PATH`, `HOME` and what the test sets,
/// so variables of the developer's shell never leak into a test.
pub fn machine() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_machine"));
    cmd.env_clear();
    for key in ["PATH", "HOME"] {
        if let Ok(v) = std::env::var(key) {
            cmd.env(key, v);
        }
    }
    cmd.env("HOSTNAME", "test-host");
    cmd
}

/// Runs the command and returns its output, with stdout and stderr as text.
pub fn run(cmd: &mut Command) -> (Output, String, String) {
    let out = cmd.output().expect("the machine binary runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stdout, stderr)
}

/// Polls `f` every 25 ms until it returns a value, failing the test after `timeout`.
pub fn wait_until<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// A job for a connector, as a worker hands it over: `job-1` of `service` with `payload`.
pub fn job(service: &str, payload: serde_json::Value) -> machine::connectors::Job {
    machine::connectors::Job {
        id: "job-1".into(),
        service_required: service.into(),
        payload,
        customer_id: String::new(),
        ctx: serde_json::Value::Null,
        timeout: None,
    }
}

/// Runs `f` to its end within `limit`, the test's hard limit; a test past it fails.
pub async fn within<T>(limit: Duration, f: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, f)
        .await
        .expect("the test finishes within its hard limit")
}

/// Runs `argv` in `dir` (no git prompt for credentials) and returns its trimmed stdout; a
/// failure fails the test with its output.
pub fn sh(dir: &std::path::Path, argv: &[&str]) -> String {
    let out = Command::new(argv[0])
        .args(&argv[1..])
        .current_dir(dir)
        .env("GIT_TERMINAL_PROMPT", "0")
        .output()
        .unwrap_or_else(|e| panic!("failed to run {argv:?}: {e}"));
    assert!(
        out.status.success(),
        "{argv:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The SHA-256 of `b`, in hex.
pub fn sha256(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
}

/// `GET http://127.0.0.1:{port}{path}`, with `token` as the bearer when given: the status
/// code and the body.
pub async fn get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let mut req = reqwest::Client::new().get(format!("http://127.0.0.1:{port}{path}"));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.expect("the machine answers");
    (r.status().as_u16(), r.text().await.expect("a body"))
}

/// A child the test started (a `machine run`, mostly), killed and reaped when the test lets go
/// of it, however it ends; its services die with it (PR_SET_PDEATHSIG).
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl From<std::process::Child> for KillOnDrop {
    fn from(child: std::process::Child) -> Self {
        Self(child)
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;

    fn deref(&self) -> &std::process::Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut std::process::Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A pub/sub connection to the Redis at `url`, subscribed to `channel` (listening once this
/// returns: SUBSCRIBE is answered).
pub async fn subscribed(url: &str, channel: &str) -> redis::aio::PubSub {
    let mut pubsub = redis::Client::open(url)
        .expect("a redis URL")
        .get_async_pubsub()
        .await
        .expect("a pub/sub connection");
    pubsub.subscribe(channel).await.expect("SUBSCRIBE");
    pubsub
}

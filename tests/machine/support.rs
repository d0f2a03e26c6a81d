//! Helpers shared by the integration tests.

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

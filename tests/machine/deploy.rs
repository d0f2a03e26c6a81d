//! The machine deployed as it runs in a container, against the real binary and real Redis
//! servers: no CA store, no `HOME`, an unusable workspace; the truth about Redis on `/ready`,
//! `/metrics` and `machine status --check`; bounded waits on a Redis that never answers.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{machine, run, wait_until};

/// A `machine run` started by a test, killed when dropped.
pub(crate) struct Deployed {
    pub(crate) child: Child,
    pub(crate) port: u16,
    dir: PathBuf,
}

impl Drop for Deployed {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Deployed {
    /// Starts `machine run` in `dir` (workspace `dir/ws`) with `env` on a clean environment
    /// without `HOME` (a container's PID 1 may have none).
    pub(crate) fn start(dir: &Path, env: &[(&str, &str)]) -> Deployed {
        let port = testkit::free_port();
        let mut cmd = machine();
        cmd.arg("run")
            .env_remove("HOME")
            .env("MACHINE_ID", "deploy1")
            .env("MACHINE_HEALTH_PORT", port.to_string())
            .env("MACHINE_WORKSPACE", dir.join("ws"))
            .env("NO_COLOR", "1")
            .env("LOG_FORMAT", "text")
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(dir.join("stdout")).unwrap())
            .stderr(std::fs::File::create(dir.join("stderr")).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        Deployed {
            child: cmd.spawn().unwrap(),
            port,
            dir: dir.to_owned(),
        }
    }

    /// Everything the machine printed so far.
    pub(crate) fn output(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default());
        s
    }

    /// The status code and body of `GET path`, or `None` while nothing answers.
    pub(crate) fn get(&self, path: &str) -> Option<(u16, String)> {
        let out = Command::new("curl")
            .args(["-s", "-m", "5", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:{}{path}", self.port))
            .output()
            .ok()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n')?;
        let code: u16 = code.trim().parse().ok().filter(|c| *c != 0)?;
        Some((code, body.to_owned()))
    }

    /// Waits until `GET path` answers `code`, returning the body.
    pub(crate) fn wait_answer(&self, path: &str, code: u16, within: Duration) -> String {
        let deadline = Instant::now() + within;
        loop {
            let answer = self.get(path);
            if let Some((c, body)) = &answer {
                if *c == code {
                    return body.clone();
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {code} on {path} after {within:?} (last {answer:?}):\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Submits a simulation job with `payload` to `redis_url`, returning its id.
pub(crate) fn submit(redis_url: &str, payload: &str) -> String {
    let (out, stdout, stderr) = run(machine().args([
        "jobs",
        "submit",
        "--redis-url",
        redis_url,
        "--service",
        "simulation",
        "--payload",
        payload,
    ]));
    assert!(out.status.success(), "{stderr}");
    stdout.trim().to_owned()
}

/// Waits until job `id` has `status` in Redis.
pub(crate) fn wait_job(redis: &testkit::RedisServer, id: &str, status: &str, within: Duration) {
    wait_until(within, &format!("job {id} {status}"), || {
        // A raw RESP reply: `$9\r\ncompleted\r\n`.
        let now = redis.raw_command(&format!("HGET job:{id} status"));
        now.lines().any(|l| l.trim() == status).then_some(())
    });
}

#[test]
fn without_a_ca_store_or_home_the_machine_starts_and_runs_a_job() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty-certs");
    std::fs::create_dir(&empty).unwrap();
    let m = Deployed::start(
        dir.path(),
        &[
            ("HUB_REDIS_URL", &redis.url()),
            ("SSL_CERT_FILE", "/nonexistent"),
            ("SSL_CERT_DIR", &empty.display().to_string()),
        ],
    );
    m.wait_answer("/ready", 200, Duration::from_secs(30));
    let id = submit(&redis.url(), r#"{"duration_ms": 50, "steps": 2}"#);
    wait_job(&redis, &id, "completed", Duration::from_secs(30));
    let out = m.output();
    assert!(!out.contains("panicked"), "{out}");
    assert!(
        out.contains("no CA certificates from the system"),
        "the warning names it: {out}"
    );
}

#[test]
fn an_unusable_workspace_exits_1_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    // A workspace below a regular file cannot be created, even by root (a read-only or
    // unwritable volume fails the same way, with its own cause).
    let file = dir.path().join("a-file");
    std::fs::write(&file, "").unwrap();
    let ws = file.join("ws");
    let started = Instant::now();
    let (out, stdout, stderr) = run(machine()
        .arg("run")
        .env_remove("HOME")
        .env("MACHINE_WORKSPACE", &ws)
        .env("MACHINE_HEALTH_PORT", testkit::free_port().to_string())
        .env("NO_COLOR", "1"));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        stderr.contains("failed to prepare the workspace") && stderr.contains(&ws.display().to_string()),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

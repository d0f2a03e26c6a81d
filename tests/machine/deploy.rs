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

    /// `machine status` against this machine with `args`: its exit code and output.
    pub(crate) fn status(&self, args: &[&str]) -> (Option<i32>, String) {
        let (out, stdout, stderr) = run(machine()
            .arg("status")
            .args(args)
            .args(["--url", &format!("http://127.0.0.1:{}", self.port)]));
        (out.status.code(), format!("{stdout}{stderr}"))
    }

    pub(crate) fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        wait_until(within, "the machine to exit", || self.child.try_wait().unwrap())
    }

    pub(crate) fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
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

/// The value of the metric line that starts with `name` in `/metrics`.
fn metric(m: &Deployed, name: &str) -> Option<f64> {
    let (_, body) = m.get("/metrics")?;
    body.lines()
        .find(|l| l.starts_with(name))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

/// A spell of Redis failing: `/ready` turns 503 naming `cause` within the 5 s grace plus a few
/// seconds, `/health` and `status --check` stay healthy and say why, `--check --ready` fails.
fn assert_not_ready_but_healthy(m: &Deployed, cause: &str, kind: &str) {
    // At start `/ready` is 503 from the first moment (starting); the reason comes after 5 s.
    let (body, doc) = wait_until(Duration::from_secs(15), "/ready 503 naming redis", || {
        let (code, body) = m.get("/ready")?;
        let doc: serde_json::Value = serde_json::from_str(&body).ok()?;
        (code == 503 && doc["redis"].is_string()).then_some((body, doc))
    });
    let why = doc["redis"].as_str().unwrap_or_default().to_owned();
    assert!(why.contains(cause), "{body}");
    assert!(
        doc["not_claiming"]
            .as_object()
            .is_some_and(|w| w.values().all(|r| r.as_str() == Some(&why))),
        "every worker names redis: {body}"
    );
    assert_eq!(m.get("/health").map(|(c, _)| c), Some(200), "a restart would not help");
    let (code, out) = m.status(&["--check"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.starts_with("healthy") && out.contains(cause), "{out}");
    let (code, out) = m.status(&["--check", "--ready"]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains(cause), "{out}");
    let (_, out) = m.status(&[]);
    assert!(
        out.contains("NOT READY") && out.contains(kind),
        "machine status shows it: {out}"
    );
    assert_eq!(metric(m, "machine_redis_up"), Some(0.0));
    let errors = metric(m, &format!("machine_redis_errors_total{{kind=\"{kind}\"}}"));
    assert!(errors.is_some_and(|n| n > 0.0), "{errors:?}");
}

/// After a spell, `/ready` is 200 again and a job submitted at once runs at once: no worker
/// sleeps out a backoff grown during the spell.
fn assert_claims_resume(m: &Deployed, redis: &testkit::RedisServer) {
    let back = Instant::now();
    let id = submit(&redis.url(), r#"{"duration_ms": 20, "steps": 1}"#);
    wait_job(redis, &id, "completed", Duration::from_secs(30));
    let took = back.elapsed();
    assert!(
        took < Duration::from_secs(3),
        "the job took {took:?} after redis came back"
    );
    m.wait_answer("/ready", 200, Duration::from_secs(5));
    assert_eq!(metric(m, "machine_redis_up"), Some(1.0));
    eprintln!("redis back to job completed: {took:?}");
}

#[test]
fn ready_says_why_redis_takes_no_claims_and_claims_resume_when_it_does() {
    let mut redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let m = Deployed::start(
        dir.path(),
        &[("HUB_REDIS_URL", &redis.url()), ("WORKER_CONNECTORS", "simulation:2")],
    );
    m.wait_answer("/ready", 200, Duration::from_secs(30));

    // Read-only: the primary became a replica (of a master that is not there).
    let nowhere = testkit::free_port();
    redis.raw_command(&format!("REPLICAOF 127.0.0.1 {nowhere}"));
    assert_not_ready_but_healthy(&m, "read-only", "readonly");
    // Long enough for a doubling backoff to outgrow the time claims take to resume.
    std::thread::sleep(Duration::from_secs(6));
    redis.raw_command("REPLICAOF NO ONE");
    assert_claims_resume(&m, &redis);

    // Unreachable: the server is gone, then back with its data.
    redis.stop_keeping_data();
    assert_not_ready_but_healthy(&m, "unreachable", "unreachable");
    std::thread::sleep(Duration::from_secs(6));
    redis.start_again();
    assert_claims_resume(&m, &redis);
    let out = m.output();
    assert!(!out.contains("panicked"), "{out}");
}

#[test]
fn a_refused_password_is_not_ready_but_healthy() {
    let redis = testkit::RedisServer::start();
    redis.raw_command("CONFIG SET requirepass right-one");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis://:wrong-one@127.0.0.1:{}", redis.port());
    let m = Deployed::start(dir.path(), &[("HUB_REDIS_URL", &url)]);
    assert_not_ready_but_healthy(&m, "refuses the credentials", "auth");
}

/// SIGTERM while the first connection to Redis hangs (an endpoint that accepts and never
/// answers; `rediss://` to a plain Redis): the machine exits 0 within the drain plus a second.
#[test]
fn sigterm_during_a_hanging_connect_ends_within_the_drain_plus_a_second() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    // Accept and hold every connection, answering nothing.
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for conn in silent.incoming() {
            held.push(conn);
        }
    });
    let plain = testkit::RedisServer::start();
    for url in [
        format!("redis://127.0.0.1:{silent_port}"),
        format!("rediss://127.0.0.1:{}", plain.port()),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("machine.toml");
        std::fs::write(&config, "[worker]\ndrain = \"2s\"\n").unwrap();
        let config = config.display().to_string();
        let mut m = Deployed::start(dir.path(), &[("HUB_REDIS_URL", &url), ("MACHINE_CONFIG", &config)]);
        m.wait_answer("/health", 200, Duration::from_secs(20));
        std::thread::sleep(Duration::from_secs(1));
        m.signal(nix::sys::signal::Signal::SIGTERM);
        let signalled = Instant::now();
        let status = m.wait_exit(Duration::from_secs(30));
        let took = signalled.elapsed();
        assert!(
            took < Duration::from_secs(3),
            "{url}: exit took {took:?}:\n{}",
            m.output()
        );
        assert_eq!(status.code(), Some(0), "{url}: {}", m.output());
        eprintln!("{url}: SIGTERM to exit {took:?}");
    }
}

/// A Redis outage is told once when it starts and once when it ends (issue 25: 31 WARNs in a
/// 25 s outage before), whatever the number of loops retrying meanwhile; and a normal start,
/// with a service whose readiness probe fails until it is up, warns of nothing.
#[test]
fn a_redis_outage_is_one_warning_when_it_starts_and_one_when_it_ends() {
    let mut redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let probe_port = testkit::free_port();
    let config = dir.path().join("machine.toml");
    std::fs::write(
        &config,
        format!(
            "[services.side]\ncommand = [\"/bin/sh\", \"-c\", \"sleep 1; exec python3 -m http.server {probe_port} --bind 127.0.0.1\"]\n\
             ready = {{ tcp = \"127.0.0.1:{probe_port}\" }}\ngrace = \"1s\"\n"
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let m = Deployed::start(
        dir.path(),
        &[
            ("HUB_REDIS_URL", &redis.url()),
            ("WORKER_CONNECTORS", "simulation:2"),
            ("MACHINE_CONFIG", &config),
        ],
    );
    m.wait_answer("/ready", 200, Duration::from_secs(30));
    wait_until(Duration::from_secs(20), "the service to be ready", || {
        m.output().contains("service is ready").then_some(())
    });
    let warnings = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
            .map(str::to_owned)
            .collect()
    };
    let start = m.output();
    assert_eq!(warnings(&start), Vec::<String>::new(), "a normal start:\n{start}");

    redis.stop_keeping_data();
    // Long enough for every loop (claims of two workers, heartbeats, sweeps, the fleet status,
    // the subscription) to retry many times.
    std::thread::sleep(Duration::from_secs(15));
    redis.start_again();
    m.wait_answer("/ready", 200, Duration::from_secs(15));
    std::thread::sleep(Duration::from_secs(1));
    let out = m.output();
    let during = warnings(&out[start.len()..]);
    let started: Vec<_> = during.iter().filter(|l| l.contains("redis is unreachable")).collect();
    let ended: Vec<_> = during.iter().filter(|l| l.contains("redis answers again")).collect();
    assert_eq!(started.len(), 1, "one WARN when it starts:\n{}", during.join("\n"));
    assert_eq!(ended.len(), 1, "one WARN when it ends:\n{}", during.join("\n"));
    assert!(ended[0].contains("lasted="), "{}", ended[0]);
    // Nothing else says the same: no line per retry of each loop.
    let retries: Vec<_> = during
        .iter()
        .filter(|l| l.contains("Connection refused") || l.contains("broken pipe"))
        .filter(|l| !l.contains("redis is unreachable"))
        .collect();
    assert!(retries.is_empty(), "a WARN per retry:\n{}", during.join("\n"));
}

/// Redis out of reach when the machine starts is the same outage: one WARN when it starts, one
/// when it ends, not a line per connection attempt.
#[test]
fn redis_down_at_start_is_one_warning_when_it_starts_and_one_when_it_ends() {
    let mut redis = testkit::RedisServer::start();
    redis.stop_keeping_data();
    let dir = tempfile::tempdir().unwrap();
    let m = Deployed::start(
        dir.path(),
        &[("HUB_REDIS_URL", &redis.url()), ("WORKER_CONNECTORS", "simulation:1")],
    );
    // The backoff (100 ms doubling) tries some six times in 8 s.
    std::thread::sleep(Duration::from_secs(8));
    redis.start_again();
    m.wait_answer("/ready", 200, Duration::from_secs(30));
    std::thread::sleep(Duration::from_secs(1));
    let out = m.output();
    let warnings: Vec<&str> = out
        .lines()
        .filter(|l| l.contains(" WARN ") || l.contains(" ERROR "))
        .collect();
    let started = warnings.iter().filter(|l| l.contains("redis is unreachable")).count();
    let ended = warnings.iter().filter(|l| l.contains("redis answers again")).count();
    assert_eq!((started, ended), (1, 1), "one WARN each:\n{}", warnings.join("\n"));
    assert!(
        !warnings.iter().any(|l| l.contains("failed to set up the broker")),
        "a WARN per attempt:\n{}",
        warnings.join("\n")
    );
}

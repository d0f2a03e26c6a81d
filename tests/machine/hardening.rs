//! Hardening, against the real binary, a real Redis and real child processes: secrets stay with
//! the machine, the health server survives a connection flood, every failure to start says why
//! and exits 1, a second signal stops at once, one workspace runs one machine, services die with
//! a SIGKILLed machine, and a crash is a warning with its last lines.

use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use redis::AsyncCommands;

use crate::support::{get, machine, run, wait_until};

/// A `machine run` started by a test, killed when dropped.
struct Running {
    child: crate::support::KillOnDrop,
    port: u16,
    dir: PathBuf,
}

impl Running {
    /// Everything the machine printed so far.
    fn output(&self) -> String {
        let mut s = std::fs::read_to_string(self.dir.join("stdout")).unwrap_or_default();
        s.push_str(&std::fs::read_to_string(self.dir.join("stderr")).unwrap_or_default());
        s
    }

    fn wait_for_output(&self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.output();
            if out.contains(needle) {
                return out;
            }
            assert!(Instant::now() < deadline, "no `{needle}` after {timeout:?} in:\n{out}");
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn wait_for_port(&self) {
        wait_until(Duration::from_secs(20), "the health server", || {
            TcpStream::connect(("127.0.0.1", self.port)).ok()
        });
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig).unwrap();
    }
}

/// Starts `machine run` in `dir` (workspace `dir/ws`, config `dir/machine.toml` from `toml`),
/// through `wrapper` (e.g. `prlimit`) when given, with `env` on top of a clean environment.
fn start(dir: &Path, toml: &str, env: &[(&str, &str)], wrapper: &[&str]) -> Running {
    let port = testkit::free_port();
    std::fs::write(
        dir.join("machine.toml"),
        toml.replace("{dir}", &dir.display().to_string()),
    )
    .unwrap();
    let mut cmd = if let Some((first, rest)) = wrapper.split_first() {
        let mut c = Command::new(first);
        c.args(rest).arg(env!("CARGO_BIN_EXE_machine"));
        c.env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
        c.env("HOSTNAME", "test-host");
        c
    } else {
        machine()
    };
    cmd.arg("run")
        .env("MACHINE_CONFIG", dir.join("machine.toml"))
        .env("MACHINE_ID", "hard1")
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
    Running {
        child: cmd.spawn().unwrap().into(),
        port,
        dir: dir.to_owned(),
    }
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    wait_until(timeout, "the machine to exit", || child.try_wait().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn services_get_no_secrets_and_logs_need_a_token() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let m = start(
        dir.path(),
        "[services.envdump]\ncommand = [\"/bin/sh\", \"-c\", \"env | sort; echo dumped; exec sleep 60\"]\n\
         pass_env = [\"PASSED_ON\"]\nenv = { OWN = \"mine\" }\ngrace = \"1s\"\n",
        &[
            ("HUB_REDIS_URL", &redis.url()),
            ("MACHINE_CONTROL_TOKEN", "control-secret-1"),
            ("MACHINE_READ_TOKEN", "read-secret-2"),
            ("OPENAI_API_KEY", "sk-secret-3"),
            ("AWS_SECRET_ACCESS_KEY", "aws-secret-4"),
            ("PASSED_ON", "passed-5"),
            ("CUDA_CACHE_PATH", "/tmp/cuda-6"),
        ],
        &[],
    );
    m.wait_for_output("dumped", Duration::from_secs(20));
    m.wait_for_port();
    let log = wait_until(Duration::from_secs(5), "the service log file", || {
        std::fs::read_to_string(dir.path().join("ws/logs/envdump.log"))
            .ok()
            .filter(|l| l.contains("dumped"))
    });
    for shown in [log.as_str(), &m.output()] {
        for secret in [
            "control-secret-1",
            "read-secret-2",
            "sk-secret-3",
            "aws-secret-4",
            "HUB_REDIS_URL",
        ] {
            assert!(!shown.contains(secret), "{secret} reached the service:\n{shown}");
        }
        for passed in ["PASSED_ON=passed-5", "OWN=mine", "CUDA_CACHE_PATH=/tmp/cuda-6", "PATH="] {
            assert!(shown.contains(passed), "{passed} missing:\n{shown}");
        }
    }

    // /logs needs the read token (or the control token); /health, /ready and /status do not.
    let (code, body) = get(m.port, "/logs/envdump", None).await;
    assert_eq!(code, 401, "{body}");
    let (code, _) = get(m.port, "/logs/envdump", Some("wrong")).await;
    assert_eq!(code, 401);
    for token in ["read-secret-2", "control-secret-1"] {
        let (code, body) = get(m.port, "/logs/envdump", Some(token)).await;
        assert_eq!(code, 200, "{body}");
        assert!(
            body.contains("PASSED_ON=passed-5") && !body.contains("sk-secret-3"),
            "{body}"
        );
    }
    let (code, _) = get(m.port, "/health", None).await;
    assert_eq!(code, 200);
    let (code, body) = get(m.port, "/status", None).await;
    assert_eq!(code, 200);
    assert!(!body.contains("read-secret-2") && !body.contains("control-secret-1"));
    // The read token cannot control: refused as forbidden (a valid token without the right),
    // not as unauthenticated.
    let r = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/shutdown", m.port))
        .bearer_auth("read-secret-2")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 403);

    // Worker hashes expire when the machine is gone.
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> = wait_until(Duration::from_secs(20), "the worker hash", || {
        let keys: Vec<String> = redis::cmd("KEYS")
            .arg("worker:*")
            .query(&mut client.get_connection().unwrap())
            .unwrap();
        let hashes: Vec<String> = keys.into_iter().filter(|k| !k.ends_with(":heartbeat")).collect();
        (!hashes.is_empty()).then_some(hashes)
    });
    for key in keys {
        let ttl: i64 = conn.ttl(&key).await.unwrap();
        assert!((1..=300).contains(&ttl), "{key} has TTL {ttl}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn guarded_status_and_metrics_need_a_token_and_open_logs_do_not() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let m = start(
        dir.path(),
        "[health]\nopen_logs = true\nguard_status = true\nguard_metrics = true\n\
         [services.echo]\ncommand = [\"/bin/sh\", \"-c\", \"echo hi; exec sleep 60\"]\ngrace = \"1s\"\n",
        &[("HUB_REDIS_URL", &redis.url()), ("MACHINE_READ_TOKEN", "rt")],
        &[],
    );
    m.wait_for_port();
    assert_eq!(get(m.port, "/status", None).await.0, 401);
    assert_eq!(get(m.port, "/metrics", None).await.0, 401);
    assert_eq!(get(m.port, "/status", Some("rt")).await.0, 200);
    assert_eq!(get(m.port, "/metrics", Some("rt")).await.0, 200);
    assert_eq!(get(m.port, "/logs/echo", None).await.0, 200);
    // `machine status` sends the read token it finds in its environment.
    let (out, stdout, stderr) = run(machine()
        .args(["status", "--url", &format!("http://127.0.0.1:{}", m.port)])
        .env("MACHINE_READ_TOKEN", "rt"));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("hard1"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_answers_under_a_connection_flood_with_few_open_files() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let m = start(
        dir.path(),
        "",
        &[("HUB_REDIS_URL", &redis.url())],
        &["prlimit", "--nofile=1024:1024"],
    );
    m.wait_for_port();
    // 1,100 half-sent requests: more connections than the machine has file descriptors.
    let mut flood = Vec::new();
    for _ in 0..1100 {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", m.port)) {
            let _ = s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n");
            flood.push(s);
        }
    }
    // A fresh connection for each check, as a HEALTHCHECK or an orchestrator's probe makes.
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .pool_max_idle_per_host(0)
        .build()
        .unwrap();
    let mut slowest = Duration::ZERO;
    for i in 0..10 {
        let started = Instant::now();
        let r = client
            .get(format!("http://127.0.0.1:{}/health", m.port))
            .send()
            .await
            .unwrap_or_else(|e| panic!("/health did not answer under the flood (try {i}): {e}"));
        assert_eq!(r.status().as_u16(), 200);
        slowest = slowest.max(started.elapsed());
        // More of the flood keeps coming between the checks.
        for _ in 0..100 {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", m.port)) {
                let _ = s.write_all(b"GET /health HTTP/1.1\r\n");
                flood.push(s);
            }
        }
    }
    eprintln!(
        "slowest /health under a flood of {} connections: {slowest:?}",
        flood.len()
    );
    assert!(slowest < Duration::from_secs(1), "{slowest:?}");
    drop(flood);
    assert!(!m.output().contains("Too many open files"), "{}", m.output());
}

#[test]
fn the_open_files_limit_is_raised_to_the_hard_limit() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let m = start(
        dir.path(),
        "",
        &[("HUB_REDIS_URL", &redis.url())],
        &["prlimit", "--nofile=512:4096"],
    );
    m.wait_for_output("raised the open-files limit", Duration::from_secs(20));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", m.child.id())).unwrap();
    let line = limits.lines().find(|l| l.starts_with("Max open files")).unwrap();
    let fields: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&fields[3..5], ["4096", "4096"], "{line}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_taken_health_port_exits_1_before_any_job_is_claimed() {
    let redis = testkit::RedisServer::start();
    let taken = std::net::TcpListener::bind("0.0.0.0:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let (out, stdout, stderr) = run(machine()
        .arg("run")
        .env("MACHINE_WORKSPACE", dir.path())
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("HUB_REDIS_URL", redis.url())
        .env("NO_COLOR", "1"));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        stderr.contains("failed to bind the health server") && stderr.contains("in use"),
        "{stderr}"
    );
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("worker:*")
        .query(&mut redis::Client::open(redis.url()).unwrap().get_connection().unwrap())
        .unwrap();
    assert!(keys.is_empty(), "no worker registered: {keys:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_redis_password_shows_its_cause_on_status() {
    let redis = testkit::RedisServer::start();
    redis.raw_command("CONFIG SET requirepass right-one");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("redis://:wrong-one@127.0.0.1:{}", redis.port());
    let m = start(dir.path(), "", &[("HUB_REDIS_URL", &url)], &[]);
    m.wait_for_port();
    let error = wait_until(Duration::from_secs(20), "redis.last_error on /status", || {
        let body = Command::new("curl")
            .args(["-s", &format!("http://127.0.0.1:{}/status", m.port)])
            .output()
            .ok()?;
        let doc: serde_json::Value = serde_json::from_slice(&body.stdout).ok()?;
        doc["redis"]["last_error"].as_str().map(str::to_owned)
    });
    let names_the_cause = |text: &str| text.to_lowercase().contains("authentication failed");
    assert!(names_the_cause(&error), "{error}");
    assert!(!error.contains("wrong-one"), "the password is not shown: {error}");
    // Logged once, as the outage it is (each retry after is a debug line), with its cause.
    let logged = m.wait_for_output("redis refuses the credentials", Duration::from_secs(5));
    assert!(names_the_cause(&logged), "{logged}");
    assert!(!logged.contains("wrong-one"), "{logged}");
    let (out, stdout, stderr) = run(machine().args(["status", "--url", &format!("http://127.0.0.1:{}", m.port)]));
    assert!(out.status.success(), "{stderr}");
    assert!(names_the_cause(&stdout), "{stdout}");
}

/// Polls `/status` until `redis.last_error` is set and returns it.
async fn last_redis_error(port: u16) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(r) = reqwest::get(format!("http://127.0.0.1:{port}/status")).await {
            let doc: serde_json::Value = r.json().await.unwrap_or_default();
            if let Some(e) = doc["redis"]["last_error"].as_str() {
                return e.to_owned();
            }
        }
        assert!(Instant::now() < deadline, "no redis.last_error on /status");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_refused_connection_and_a_missing_database_say_so_on_status() {
    let redis = testkit::RedisServer::start();
    let closed = testkit::free_port();
    for (url, cause) in [
        (format!("redis://127.0.0.1:{closed}"), "connection refused"),
        (
            format!("{}/99", redis.url().trim_end_matches('/')),
            "db index is out of range",
        ),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let m = start(dir.path(), "", &[("HUB_REDIS_URL", &url)], &[]);
        m.wait_for_port();
        let error = last_redis_error(m.port).await;
        assert!(error.to_lowercase().contains(cause), "{url}: {error}");
        let (code, _) = get(m.port, "/health", None).await;
        assert_eq!(code, 200, "the machine runs on and retries");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_signal_returns_the_job_and_exits_within_a_second() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let mut m = start(
        dir.path(),
        "[worker]\ndrain = \"10s\"\n[services.slow]\ncommand = [\"/bin/sh\", \"-c\", \"trap '' TERM; exec sleep 60\"]\ngrace = \"10s\"\n",
        &[("HUB_REDIS_URL", &redis.url())],
        &[],
    );
    m.wait_for_port();
    let (out, stdout, stderr) = run(machine().args([
        "jobs",
        "submit",
        "--redis-url",
        &redis.url(),
        "--service",
        "simulation",
        "--payload",
        r#"{"duration_ms": 30000, "steps": 30}"#,
    ]));
    assert!(out.status.success(), "{stderr}");
    let id = stdout.trim().to_owned();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status: Option<String> = conn.hget(format!("job:{id}"), "status").await.unwrap();
        if status.as_deref() == Some("in_progress") {
            break;
        }
        assert!(Instant::now() < deadline, "the job was not started: {status:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m.signal(nix::sys::signal::Signal::SIGTERM);
    m.wait_for_output("shutting down gracefully", Duration::from_secs(5));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = Instant::now();
    m.signal(nix::sys::signal::Signal::SIGTERM);
    let status = wait_exit(&mut m.child, Duration::from_secs(15));
    let took = second.elapsed();
    assert!(
        took < Duration::from_secs(1),
        "exit took {took:?} after the second signal"
    );
    assert_eq!(status.code(), Some(4), "{}", m.output());
    let status: Option<String> = conn.hget(format!("job:{id}"), "status").await.unwrap();
    assert_eq!(
        status.as_deref(),
        Some("pending"),
        "the job was returned: {}",
        m.output()
    );
    eprintln!("second signal to exit: {took:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_machine_on_a_workspace_exits_1_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    // Local mode: the first machine runs the private redis-server on the workspace's socket.
    let first = start(dir.path(), "", &[], &[]);
    first.wait_for_port();
    let socket = dir.path().join("ws/run/redis.sock");
    let ping = || {
        Command::new("redis-cli")
            .args(["-s", &socket.display().to_string(), "ping"])
            .output()
            .ok()
            .filter(|o| String::from_utf8_lossy(&o.stdout).contains("PONG"))
    };
    wait_until(Duration::from_secs(20), "the first machine's redis", ping);

    let started = Instant::now();
    let (out, stdout, stderr) = run(machine()
        .arg("run")
        .env("MACHINE_WORKSPACE", dir.path().join("ws"))
        .env("MACHINE_HEALTH_PORT", testkit::free_port().to_string())
        .env("NO_COLOR", "1"));
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        stderr.contains(&format!("in use by another machine (pid {})", first.child.id())),
        "{stderr}"
    );
    // The first machine's redis and CLI work on.
    assert!(ping().is_some(), "the first machine's socket survived");
    let (code, _) = get(first.port, "/health", None).await;
    assert_eq!(code, 200);
}

#[test]
fn services_die_with_a_killed_machine_and_the_next_run_kills_leftovers() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let toml = "[services.tree]\ncommand = [\"/bin/sh\", \"-c\", \"sleep 300 & echo $! > {dir}/grandchild; echo $$ > {dir}/leader; exec sleep 301\"]\n";
    let mut first = start(dir.path(), toml, &[("HUB_REDIS_URL", &redis.url())], &[]);
    let read_pid = |name: &str| {
        wait_until(Duration::from_secs(20), name, || {
            std::fs::read_to_string(dir.path().join(name))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok())
        })
    };
    let leader = read_pid("leader");
    let grandchild = read_pid("grandchild");
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .and_then(|s| s.rsplit_once(')').map(|(_, t)| !t.trim_start().starts_with('Z')))
            .unwrap_or(false)
    };
    assert!(alive(leader) && alive(grandchild));
    // The machine records the service just after spawning it, which may be after the service
    // wrote its pids.
    wait_until(Duration::from_secs(5), "the pid file", || {
        std::fs::read_to_string(dir.path().join("ws/run/services.pids"))
            .ok()
            .filter(|s| s.contains(" tree"))
    });
    first.child.kill().unwrap();
    first.child.wait().unwrap();
    wait_until(
        Duration::from_secs(5),
        "the service leader to die with the machine",
        || (!alive(leader)).then_some(()),
    );
    assert!(
        alive(grandchild),
        "outside the leader's reach, the grandchild outlived the machine"
    );

    std::fs::remove_file(dir.path().join("leader")).unwrap();
    let second = start(dir.path(), toml, &[("HUB_REDIS_URL", &redis.url())], &[]);
    second.wait_for_output("killing what the previous run left", Duration::from_secs(20));
    wait_until(Duration::from_secs(5), "the leftover to be killed", || {
        (!alive(grandchild)).then_some(())
    });
    let new_leader = read_pid("leader");
    assert!(alive(new_leader), "the service runs again, once");
}

#[test]
fn a_crashed_service_is_a_warning_with_its_last_lines() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let m = start(
        dir.path(),
        "[services.crasher]\ncommand = [\"/bin/sh\", \"-c\", \"echo first words; echo last words >&2; exit 3\"]\nrestart = \"never\"\n",
        &[("HUB_REDIS_URL", &redis.url())],
        &[],
    );
    let out = m.wait_for_output("service crashed", Duration::from_secs(20));
    let line = out.lines().find(|l| l.contains("service crashed")).unwrap();
    assert!(line.contains("WARN"), "{line}");
    // One line: the event with its last output, not fields glued to the service's last line.
    assert!(line.contains("code=3"), "{out}");
    assert!(line.contains("first words") && line.contains("last words"), "{out}");
    assert!(line.contains("uptime=") && !line.contains("uptime_ms"), "{line}");
    assert!(
        !out.contains("INFO machine::supervisor::service: service exited"),
        "{out}"
    );
}

#[test]
fn a_config_file_with_four_problems_lists_four() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("machine.toml");
    std::fs::write(
        &file,
        "[health]\nport = \"high\"\nbogus = 1\n[supervisor]\ngrace = 5\n[services.x]\ncommand = [\"a\"]\nrestrat = \"always\"\n",
    )
    .unwrap();
    let (out, _, stderr) = run(machine()
        .args(["config", "check"])
        .env("MACHINE_CONFIG", &file)
        .env("WORKER_CONNECTOR", "simulation"));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let listed: Vec<&str> = stderr.lines().filter(|l| l.trim_start().starts_with("- ")).collect();
    assert_eq!(listed.len(), 4, "{stderr}");
    for key in ["health.port", "bogus", "supervisor.grace", "restrat"] {
        assert!(listed.iter().any(|l| l.contains(key)), "{key}: {stderr}");
    }
    assert!(
        stderr.contains("WORKER_CONNECTOR") && stderr.contains("`WORKER_CONNECTORS`"),
        "{stderr}"
    );
}

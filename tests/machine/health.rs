//! The health server, `machine status` and the fleet status message, against the real binary
//! and a real Redis.

use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::support::{get, machine, run};

struct Running {
    child: crate::support::KillOnDrop,
    port: u16,
    _ws: tempfile::TempDir,
}

fn start(redis: &testkit::RedisServer, token: Option<&str>) -> Running {
    let ws = tempfile::tempdir().unwrap();
    let port = testkit::free_port();
    let config = ws.path().join("machine.toml");
    std::fs::write(
        &config,
        "[services.echo]\ncommand = [\"/bin/sh\", \"-c\", \"echo hello from echo; exec sleep 60\"]\ngrace = \"1s\"\n",
    )
    .unwrap();
    let mut cmd = machine();
    cmd.arg("run")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", "hm1")
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("MACHINE_WORKSPACE", ws.path())
        .env("HUB_REDIS_URL", redis.url())
        .env("MACHINE_READ_TOKEN", READ_TOKEN)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(t) = token {
        cmd.env("MACHINE_CONTROL_TOKEN", t);
    }
    let child = cmd.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "health server did not come up");
        std::thread::sleep(Duration::from_millis(20));
    }
    Running {
        child: child.into(),
        port,
        _ws: ws,
    }
}

/// The read token every machine of these tests has; `/logs` needs it.
const READ_TOKEN: &str = "read-token";

#[tokio::test(flavor = "multi_thread")]
async fn routes_answer_and_status_command_reads_them() {
    let redis = testkit::RedisServer::start();
    let m = start(&redis, None);
    let (code, body) = get(m.port, "/health", Some(READ_TOKEN)).await;
    assert_eq!(code, 200, "{body}");
    let health: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(health["machine_id"], "hm1");

    // The health server answers from the first moment, before the broker has connected.
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        let (code, body) = get(m.port, "/status", Some(READ_TOKEN)).await;
        assert_eq!(code, 200);
        let status: serde_json::Value = serde_json::from_str(&body).unwrap();
        if status["redis"]["connected"] == true {
            break status;
        }
        assert!(Instant::now() < deadline, "redis never connected: {status}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(status["machine"]["id"], "hm1");
    assert_eq!(status["config"]["connectors"], "simulation:1");
    assert!(status["host"]["cpu_cores"].as_u64().unwrap() >= 1);

    // The simulation worker claims against the hub's Redis, so the machine becomes ready.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (code, body) = get(m.port, "/ready", Some(READ_TOKEN)).await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (_, body) = get(m.port, "/status", Some(READ_TOKEN)).await;
    // The live documents are what the shared types say, field for field: they parse, and
    // written back they are the same JSON.
    let typed: machine::health::StatusDocument = serde_json::from_str(&body).expect("/status is a StatusDocument");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(serde_json::to_value(&typed).unwrap(), status);
    assert_eq!(typed.machine.phase, machine::health::Phase::Ready);
    let (_, body) = get(m.port, "/ready", Some(READ_TOKEN)).await;
    serde_json::from_str::<machine::health::status::ReadyDocument>(&body).expect("/ready is a ReadyDocument");
    let (_, body) = get(m.port, "/health", Some(READ_TOKEN)).await;
    serde_json::from_str::<machine::health::status::HealthDocument>(&body).expect("/health is a HealthDocument");
    assert_eq!(status["machine"]["phase"], "ready");
    assert_eq!(status["workers"][0]["worker_id"], "hm1-simulation-1");
    assert_eq!(status["services"][0]["name"], "echo");
    assert!(status["redis"]["function_version"].is_string(), "{status}");

    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (code, body) = get(m.port, "/logs/echo?lines=10", Some(READ_TOKEN)).await;
        assert_eq!(code, 200);
        if body.contains("hello from echo") {
            break;
        }
        assert!(Instant::now() < deadline, "no log line: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(get(m.port, "/logs/nope", Some(READ_TOKEN)).await.0, 404);

    let (code, body) = get(m.port, "/metrics", Some(READ_TOKEN)).await;
    assert_eq!(code, 200);
    assert!(body.contains("# TYPE machine_match_misses_total counter"), "{body}");
    assert!(
        body.contains("machine_service_restarts_total{service=\"echo\"} 0"),
        "{body}"
    );
    assert!(body.contains("machine_claim_duration_seconds_count"), "{body}");

    let url = format!("http://127.0.0.1:{}", m.port);
    let (out, stdout, stderr) = run(machine().args(["status", "--url", &url]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("machine hm1"), "{stdout}");
    assert!(stdout.contains("hm1-simulation-1"), "{stdout}");
    // The heartbeat reads as an age, not as epoch milliseconds.
    let worker = stdout.lines().find(|l| l.contains("hm1-simulation-1")).unwrap();
    // `machine status` shows it in the ACTIVE column, the last one: `323ms ago`.
    let beat = worker.split_whitespace().rev().nth(1).unwrap_or_default();
    assert!(worker.trim_end().ends_with(" ago") && beat.len() < 8, "{stdout}");
    let (out, stdout, _) = run(machine().args(["status", "--json", "--url", &url]));
    assert!(out.status.success());
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["machine"]["id"],
        "hm1"
    );
    let (out, stdout, _) = run(machine()
        .args(["status", "--check"])
        .env("MACHINE_HEALTH_PORT", m.port.to_string()));
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.starts_with("healthy"), "{stdout}");
}

#[tokio::test(flavor = "multi_thread")]
async fn control_routes_need_the_token() {
    let redis = testkit::RedisServer::start();
    let mut m = start(&redis, None);
    let client = reqwest::Client::new();
    let url = format!("http://127.0.0.1:{}/shutdown", m.port);
    assert_eq!(client.post(&url).send().await.unwrap().status().as_u16(), 403);
    drop(m.child.kill());

    let mut m = start(&redis, Some("s3cret"));
    let restart = format!("http://127.0.0.1:{}/services/echo/restart", m.port);
    assert_eq!(client.post(&restart).send().await.unwrap().status().as_u16(), 401);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !get(m.port, "/status", Some(READ_TOKEN))
        .await
        .1
        .contains("\"state\":\"running\"")
    {
        assert!(Instant::now() < deadline, "echo never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let ok = client.post(&restart).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 202);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, body) = get(m.port, "/status", Some(READ_TOKEN)).await;
        let doc: serde_json::Value = serde_json::from_str(&body).unwrap();
        if doc["services"][0]["restarts"].as_u64() >= Some(1) {
            break;
        }
        assert!(Instant::now() < deadline, "echo was not restarted: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let url = format!("http://127.0.0.1:{}/shutdown", m.port);
    assert_eq!(client.post(&url).send().await.unwrap().status().as_u16(), 401);
    let wrong = client.post(&url).bearer_auth("s3cre").send().await.unwrap();
    assert_eq!(wrong.status().as_u16(), 401);
    let (_, status) = get(m.port, "/status", Some(READ_TOKEN)).await;
    assert!(!status.contains("s3cret"), "the token is never shown");
    let ok = client.post(&url).bearer_auth("s3cret").send().await.unwrap();
    assert_eq!(ok.status().as_u16(), 202);
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = m.child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "machine did not exit after POST /shutdown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn fleet_status_is_published_and_readable() {
    let redis = testkit::RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let (mut sink, mut stream) = client.get_async_pubsub().await.unwrap().split();
    sink.subscribe("machine:status:hm1").await.unwrap();
    let m = start(&redis, None);
    use futures_util::StreamExt;
    let msg = tokio::time::timeout(Duration::from_secs(15), stream.next())
        .await
        .unwrap()
        .unwrap();
    let payload = msg.get_payload::<String>().unwrap();
    let typed: machine::health::fleet::FleetMessage =
        serde_json::from_str(&payload).expect("the fleet status is a FleetMessage");
    let doc: serde_json::Value = serde_json::from_str(&payload).unwrap();
    assert_eq!(serde_json::to_value(&typed).unwrap(), doc);
    assert_eq!(doc["machine_id"], "hm1");
    assert!(doc["timestamp"].as_u64().unwrap() > 0);
    assert_eq!(
        doc["structure"]["workers"]["hm1-simulation-1"]["worker_type"],
        "external"
    );
    assert!(
        doc["health_url"]
            .as_str()
            .unwrap()
            .ends_with(&format!(":{}/health", m.port))
    );

    let (out, stdout, stderr) = run(machine().args(["status", "--fleet", "--redis-url", &redis.url()]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("hm1"), "{stdout}");
    assert!(stdout.contains("hm1-simulation-1"), "{stdout}");
    // The heartbeat reads as an age, not as epoch milliseconds.
    let worker = stdout.lines().find(|l| l.contains("hm1-simulation-1")).unwrap();
    let beat = worker.split("heartbeat ").nth(1).unwrap_or_default();
    assert!(
        beat.starts_with('-') || beat.split_once("s ago").is_some_and(|(n, _)| n.len() < 6),
        "{stdout}"
    );

    let pid = nix::unistd::Pid::from_raw(m.child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let last = loop {
        let msg = tokio::time::timeout(Duration::from_secs(15), stream.next())
            .await
            .unwrap()
            .unwrap();
        let doc: serde_json::Value = serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
        if doc["update_type"] == "shutdown" {
            break doc;
        }
    };
    assert_eq!(last["status"]["machine"]["phase"], "shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn local_mode_runs_jobs_in_two_commands() {
    // No HUB_REDIS_URL: the machine supervises its own redis-server, and `machine jobs` finds it
    // through the same workspace.
    let ws = tempfile::tempdir().unwrap();
    let port = testkit::free_port();
    let mut child = machine()
        .arg("run")
        .env("MACHINE_ID", "local1")
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("MACHINE_WORKSPACE", ws.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if reqwest::get(format!("http://127.0.0.1:{port}/ready"))
            .await
            .is_ok_and(|r| r.status().as_u16() == 200)
        {
            break;
        }
        assert!(Instant::now() < deadline, "local mode never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (out, id, stderr) = run(machine()
        .args([
            "jobs",
            "submit",
            "--service",
            "simulation",
            "--payload",
            r#"{"duration_ms": 20}"#,
        ])
        .env("MACHINE_WORKSPACE", ws.path()));
    assert!(out.status.success(), "{stderr}");
    let id = id.trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (out, shown, _) = run(machine()
            .args(["jobs", "show", &id, "--json"])
            .env("MACHINE_WORKSPACE", ws.path()));
        assert!(out.status.success());
        if shown.contains("\"completed\"") {
            assert!(shown.contains("local1-simulation-1"), "{shown}");
            break;
        }
        assert!(Instant::now() < deadline, "the job never completed: {shown}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // `status --fleet` finds the local Redis through the workspace, as `jobs` does, and lists
    // the machine once its status is published (at once when ready, then every 10 s).
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (out, fleet, stderr) = run(machine()
            .args(["status", "--fleet"])
            .env("MACHINE_WORKSPACE", ws.path())
            .env_remove("HUB_REDIS_URL"));
        assert!(out.status.success(), "{fleet}{stderr}");
        if fleet.contains("local1") {
            break;
        }
        assert!(Instant::now() < deadline, "the fleet never listed the machine: {fleet}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "the machine did not stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
    assert!(ws.path().join("redis/appendonly.aof").exists() || ws.path().join("redis/appendonlydir").exists());
}

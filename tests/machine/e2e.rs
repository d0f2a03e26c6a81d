//! The whole product: the release-shaped binary as PID 1 of a fresh PID namespace, a real
//! Redis, the fake NVML library reporting 2 GPUs, `WORKER_CONNECTORS=comfyui,simulation:2` with
//! the ComfyUI service command pointed at the fake ComfyUI server (built as an example of this
//! package). Jobs go in through `machine jobs submit` and as the existing API writes them; they
//! all complete; status, metrics and the fleet messages show it; SIGTERM while jobs run returns
//! them to the queue, stops every service, leaves no process and exits 0.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::support::{machine, run, wait_until};

pub(crate) fn fake_comfyui() -> PathBuf {
    let bin = Path::new(env!("CARGO_BIN_EXE_machine"));
    let path = bin
        .parent()
        .expect("the binary is in a directory")
        .join("examples/fake_comfyui");
    assert!(
        path.is_file(),
        "{} is missing: `cargo test` builds the examples (run scripts/test.sh)",
        path.display()
    );
    path
}

/// A local git repository standing in for upstream ComfyUI, for the real installer: its
/// `main.py` passes the smoke test (`--quick-test-for-ci`) and otherwise becomes the fake
/// ComfyUI on the port it is given, serving the `models` folder beside it. Returns the
/// repository and its commit.
pub(crate) fn comfyui_repository(root: &Path) -> (PathBuf, String) {
    let src = root.join("comfy-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("main.py"),
        format!(
            r#"import os, sys
if "--quick-test-for-ci" in sys.argv:
    sys.exit(0)
port = sys.argv[sys.argv.index("--port") + 1]
models = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
os.execv({fake:?}, [{fake:?}, "--port", port, "--models", models])
"#,
            fake = fake_comfyui().display().to_string()
        ),
    )
    .unwrap();
    let git = |args: &[&str]| {
        let out = Command::new("git").args(args).current_dir(&src).output().unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "--quiet", "--initial-branch=main"]);
    git(&["add", "-A"]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "--quiet",
        "-m",
        "init",
    ]);
    let commit = git(&["rev-parse", "HEAD"]);
    (src, commit)
}

/// A base port with the next one free too, for the two GPUs' ComfyUI services (tests run in
/// parallel, so the default 8188 would clash).
pub(crate) fn two_free_ports() -> u16 {
    loop {
        let base = testkit::free_port();
        if base < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", base + 1)).is_ok() {
            return base;
        }
    }
}

/// The processes whose PID namespace is `ns` (as `readlink /proc/<pid>/ns/pid` shows it).
fn processes_in(ns: &str) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if std::fs::read_link(format!("/proc/{pid}/ns/pid")).is_ok_and(|l| l.to_string_lossy() == ns) {
            out.push(pid);
        }
    }
    out
}

pub(crate) async fn http_get(port: u16, path: &str) -> (u16, String) {
    match reqwest::get(format!("http://127.0.0.1:{port}{path}")).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

pub(crate) fn submit(redis_url: &str, args: &[&str]) -> String {
    let (out, stdout, stderr) = run(machine().args(["jobs", "submit", "--redis-url", redis_url]).args(args));
    assert!(out.status.success(), "submit failed: {stderr}");
    stdout.trim().to_owned()
}

/// Writes a job exactly as the existing API does: the hash, the score, the message.
async fn api_submit(conn: &mut redis::aio::MultiplexedConnection, id: &str, service: &str, payload: Value) {
    let created = 1_750_000_000_000i64;
    let fields: Vec<(&str, String)> = vec![
        ("id", id.to_owned()),
        ("service_required", service.to_owned()),
        ("priority", "50".to_owned()),
        ("payload", payload.to_string()),
        ("requirements", String::new()),
        ("customer_id", String::new()),
        ("created_at", "2025-06-15T15:06:40.000Z".to_owned()),
        ("status", "pending".to_owned()),
        ("retry_count", "0".to_owned()),
        ("max_retries", "3".to_owned()),
    ];
    let score = 50.0 * 1e15 - (created / 1000) as f64;
    let _: () = redis::pipe()
        .hset_multiple(format!("job:{id}"), &fields)
        .ignore()
        .zadd("jobs:pending", id, score)
        .ignore()
        .publish(
            "job_submitted",
            json!({"job_id": id, "service_required": service, "priority": 50, "requirements": "",
                   "customer_id": "", "workflow_id": "", "timestamp": created})
            .to_string(),
        )
        .ignore()
        .query_async(conn)
        .await
        .unwrap();
}

async fn job(conn: &mut redis::aio::MultiplexedConnection, id: &str) -> BTreeMap<String, String> {
    conn.hgetall(format!("job:{id}")).await.unwrap()
}

/// Waits until job `id` is completed and returns its hash.
pub(crate) async fn completed(
    conn: &mut redis::aio::MultiplexedConnection,
    id: &str,
    deadline: Instant,
) -> BTreeMap<String, String> {
    loop {
        let j = job(conn, id).await;
        if j.get("status").map(String::as_str) == Some("completed") {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} did not complete: {j:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Pid1 {
    unshare: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Pid1 {
    fn drop(&mut self) {
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_whole_machine_runs_jobs_and_stops_cleanly() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let (mut sink, mut fleet) = client.get_async_pubsub().await.unwrap().split();
    sink.subscribe("machine:status:e2e").await.unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    let config = dir.path().join("machine.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[connectors.comfyui]
command = ["{fake}", "--port", "{{port}}"]

[connectors.simulation]
duration = "200ms"
steps = 4

[worker]
drain = "1s"
"#,
            fake = fake_comfyui().display()
        ),
    )
    .unwrap();
    let port = testkit::free_port();
    let log = std::fs::File::create(dir.path().join("machine.log")).unwrap();
    let unshare = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", env!("CARGO_BIN_EXE_machine"), "run"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", "e2e")
        .env("MACHINE_WORKSPACE", &ws)
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("HUB_REDIS_URL", &url)
        .env("WORKER_CONNECTORS", "comfyui,simulation:2")
        .env("COMFYUI_BASE_PORT", two_free_ports().to_string())
        .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
        .env("FAKE_NVML_GPUS", "2")
        .env("LOG_FORMAT", "json")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("unshare (util-linux) runs as root");
    let upid = unshare.id();
    let mut pid1 = Pid1 { unshare, _dir: dir };
    // The machine is the only child of unshare, and PID 1 of the new namespace.
    let machine_pid = wait_until(Duration::from_secs(10), "the machine to start", || {
        std::fs::read_to_string(format!("/proc/{upid}/task/{upid}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse::<u32>().ok()))
    });
    let ns = std::fs::read_link(format!("/proc/{machine_pid}/ns/pid"))
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let status_line = std::fs::read_to_string(format!("/proc/{machine_pid}/status")).unwrap();
    let nspid = status_line.lines().find(|l| l.starts_with("NSpid:")).unwrap();
    assert!(
        nspid.trim_end().ends_with("\t1"),
        "the machine is PID 1 of its namespace: {nspid}"
    );

    // Ready: both fake ComfyUI services up and every worker claiming.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = http_get(port, "/ready").await;
        if code == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Jobs through the operator command and as the API writes them.
    let workflow = json!({"workflow": {
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
        "3": {"class_type": "KSampler", "inputs": {"steps": 5, "step_ms": 5}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "e2e"}}
    }});
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(submit(
            &url,
            &["--service", "comfyui", "--payload", &workflow.to_string()],
        ));
        ids.push(submit(&url, &["--service", "simulation", "--payload", "{}"]));
    }
    for i in 0..4 {
        let id = format!("api-{i}");
        let (service, payload) = if i % 2 == 0 {
            ("comfyui", workflow.clone())
        } else {
            ("simulation", json!({}))
        };
        api_submit(&mut conn, &id, service, payload).await;
        ids.push(id);
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    for id in &ids {
        let j = completed(&mut conn, id, deadline).await;
        assert!(j["worker_id"].starts_with("e2e-"), "{j:?}");
    }
    let comfy_workers: std::collections::BTreeSet<String> = {
        let mut set = std::collections::BTreeSet::new();
        for id in &ids {
            let j = job(&mut conn, id).await;
            if j["service_required"] == "comfyui" {
                set.insert(j["worker_id"].clone());
            }
        }
        set
    };
    assert!(
        comfy_workers.iter().all(|w| w == "e2e-gpu0" || w == "e2e-gpu1"),
        "ComfyUI jobs ran on the GPU workers: {comfy_workers:?}"
    );

    // `machine jobs show` prints every stored output's URL of a ComfyUI job, in text and typed
    // in JSON, as the result in Redis has them.
    let comfy = &ids[0];
    let record: String = conn.hget("jobs:completed", comfy).await.expect("the completion record");
    let record: Value = serde_json::from_str(&record).expect("the record is JSON");
    let result = &record["data"];
    let stored: Vec<&str> = result["artifacts"]
        .as_array()
        .unwrap_or_else(|| panic!("the result lists no artifacts: {record}"))
        .iter()
        .map(|a| a["url"].as_str().expect("an artifact has a URL"))
        .collect();
    assert!(!stored.is_empty(), "{result}");
    let (out, text, stderr) = run(machine().args(["jobs", "show", comfy, "--redis-url", &url]));
    assert!(out.status.success(), "{stderr}");
    let (out, json_text, stderr) = run(machine().args(["jobs", "show", comfy, "--json", "--redis-url", &url]));
    assert!(out.status.success(), "{stderr}");
    let shown: Value = serde_json::from_str(&json_text).expect("jobs show --json prints JSON");
    for u in &stored {
        assert!(text.contains(u), "{u} is not in:\n{text}");
        assert!(
            shown["artifacts"].as_array().is_some_and(|a| a.iter().any(|v| v == u)),
            "{u} is not in {shown}"
        );
    }

    // What operators see.
    let (_, body) = http_get(port, "/status").await;
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["machine"]["phase"], "ready");
    assert_eq!(status["gpus"].as_array().unwrap().len(), 2);
    let completed: u64 = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["counts"]["completed"].as_u64().unwrap())
        .sum();
    assert_eq!(completed, ids.len() as u64);
    let services: Vec<&str> = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(services, ["comfyui-gpu0", "comfyui-gpu1"]);
    let (_, metrics) = http_get(port, "/metrics").await;
    assert!(
        metrics.contains("machine_jobs_total{service=\"comfyui\",outcome=\"completed\"} 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("machine_jobs_total{service=\"simulation\",outcome=\"completed\"} 6"),
        "{metrics}"
    );
    assert!(
        metrics.contains("machine_gpu_utilization_ratio{gpu=\"1\"}"),
        "{metrics}"
    );
    let (out, text, stderr) = run(machine().args(["status", "--url", &format!("http://127.0.0.1:{port}")]));
    assert!(out.status.success(), "{stderr}");
    assert!(text.contains("machine e2e  phase ready"), "{text}");
    assert!(
        text.contains("comfyui-gpu1") && text.contains("e2e-simulation-2"),
        "{text}"
    );

    // The fleet monitor hears the machine.
    let mut seen = BTreeMap::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while seen.is_empty() {
        let remaining = deadline.saturating_duration_since(Instant::now());
        let msg = tokio::time::timeout(remaining, fleet.next())
            .await
            .expect("a fleet message")
            .unwrap();
        let doc: Value = serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
        assert_eq!(doc["machine_id"], "e2e");
        assert_eq!(doc["structure"]["gpu_count"], 2);
        seen.insert(doc["update_type"].as_str().unwrap().to_owned(), doc);
    }

    // SIGTERM while jobs run: they go back to the queue, and nothing is left behind.
    let long = [
        submit(
            &url,
            &["--service", "simulation", "--payload", r#"{"duration_ms": 60000}"#],
        ),
        submit(
            &url,
            &["--service", "simulation", "--payload", r#"{"duration_ms": 60000}"#],
        ),
    ];
    let deadline = Instant::now() + Duration::from_secs(20);
    for id in &long {
        while job(&mut conn, id).await.get("status").map(String::as_str) != Some("in_progress") {
            assert!(Instant::now() < deadline, "long job {id} never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(machine_pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = wait_until(Duration::from_secs(30), "the machine to exit", || {
        pid1.unshare.try_wait().unwrap()
    });
    assert!(exit.success(), "exit status {exit:?}");
    for id in &long {
        let j = job(&mut conn, id).await;
        assert_eq!(j["status"], "pending", "returned to the queue: {j:?}");
        let score: Option<f64> = conn.zscore("jobs:pending", id).await.unwrap();
        assert!(score.is_some(), "{id} is back in jobs:pending");
    }
    assert!(processes_in(&ns).is_empty(), "no process is left in the namespace");
    let last = loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), fleet.next())
            .await
            .expect("the shutdown message")
            .unwrap();
        let doc: Value = serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
        if doc["update_type"] == "shutdown" {
            break doc;
        }
    };
    assert_eq!(last["status"]["machine"]["phase"], "shutdown");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_crash_looping_service_idles_only_its_gpu() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("machine.toml");
    // GPU 0's ComfyUI dies at once, GPU 1's is the fake ComfyUI (a test may use a shell; the
    // product never does).
    std::fs::write(
        &config,
        format!(
            r#"
[connectors.comfyui]
command = ["/bin/sh", "-c", "if [ {{gpu}} = 0 ]; then echo boom; exit 1; fi; exec {fake} --port {{port}}"]
[supervisor]
crash_loop_failures = 3
crash_loop_window = "1m"
backoff_max = "2s"
"#,
            fake = fake_comfyui().display()
        ),
    )
    .unwrap();
    let port = testkit::free_port();
    let mut child = machine()
        .arg("run")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", "cl")
        .env("MACHINE_WORKSPACE", dir.path().join("ws"))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("HUB_REDIS_URL", &url)
        .env("WORKER_CONNECTORS", "comfyui,simulation")
        .env("COMFYUI_BASE_PORT", two_free_ports().to_string())
        .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
        .env("FAKE_NVML_GPUS", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    // Ready, with the blocked worker reporting why.
    let deadline = Instant::now() + Duration::from_secs(30);
    let status: Value = loop {
        let (code, _) = http_get(port, "/ready").await;
        let (_, body) = http_get(port, "/status").await;
        if code == 200 {
            break serde_json::from_str(&body).unwrap();
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let gpu0 = status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker_id"] == "cl-gpu0")
        .unwrap();
    assert_eq!(gpu0["state"], "waiting_for_services", "{gpu0}");
    assert_eq!(gpu0["reason"], "comfyui-gpu0 is in crash loop", "{gpu0}");
    let svc0 = status["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "comfyui-gpu0")
        .unwrap();
    assert_eq!(svc0["crash_loop"], true, "{svc0}");
    assert_eq!(status["machine"]["critical_failure"], Value::Null);

    // ComfyUI jobs all go to GPU 1; the other connectors keep working.
    let workflow = json!({"workflow": {"3": {"class_type": "KSampler", "inputs": {"steps": 2, "step_ms": 5}},
                                       "9": {"class_type": "SaveImage", "inputs": {}}}});
    let ids: Vec<String> = (0..4)
        .map(|_| submit(&url, &["--service", "comfyui", "--payload", &workflow.to_string()]))
        .chain(std::iter::once(submit(
            &url,
            &["--service", "simulation", "--payload", r#"{"duration_ms": 10}"#],
        )))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    for id in &ids {
        let j = completed(&mut conn, id, deadline).await;
        assert_ne!(
            j["worker_id"], "cl-gpu0",
            "the crash-looping GPU's worker claims nothing"
        );
    }
    let (code, _) = http_get(port, "/health").await;
    assert_eq!(code, 200, "a non-critical crash loop leaves the machine healthy");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = wait_until(Duration::from_secs(30), "the machine to exit", || {
        child.try_wait().unwrap()
    });
    assert!(exit.success(), "{exit:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_worker_claims_as_soon_as_its_service_recovers_from_a_crash_loop() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fixed");
    let config = dir.path().join("machine.toml");
    // ComfyUI dies at once until the file `fixed` exists; `stable_after` stays at its default
    // (60 s), far longer than the test may wait.
    std::fs::write(
        &config,
        format!(
            r#"
[connectors.comfyui]
command = ["/bin/sh", "-c", "if [ ! -e {fixed} ]; then echo boom; exit 1; fi; exec {fake} --port {{port}}"]
[supervisor]
crash_loop_failures = 2
crash_loop_window = "1m"
backoff_max = "1s"
"#,
            fixed = fixed.display(),
            fake = fake_comfyui().display()
        ),
    )
    .unwrap();
    let port = testkit::free_port();
    let mut child = machine()
        .arg("run")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", "rc")
        .env("MACHINE_WORKSPACE", dir.path().join("ws"))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("HUB_REDIS_URL", &url)
        .env("WORKER_CONNECTORS", "comfyui")
        .env("COMFYUI_BASE_PORT", two_free_ports().to_string())
        .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
        .env("FAKE_NVML_GPUS", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http_get(port, "/status").await;
        if body.contains("\"crash_loop\":true") {
            break;
        }
        assert!(Instant::now() < deadline, "never in crash loop: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let workflow = json!({"workflow": {"9": {"class_type": "SaveImage", "inputs": {}}}});
    let id = submit(&url, &["--service", "comfyui", "--payload", &workflow.to_string()]);
    std::fs::write(&fixed, "").unwrap();
    let fixed_at = Instant::now();
    let j = completed(&mut conn, &id, fixed_at + Duration::from_secs(20)).await;
    assert_eq!(j["worker_id"], "rc-gpu0");
    assert!(
        fixed_at.elapsed() < Duration::from_secs(20),
        "the job waited {:?} for a service that was ready",
        fixed_at.elapsed()
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = wait_until(Duration::from_secs(30), "the machine to exit", || {
        child.try_wait().unwrap()
    });
    assert!(exit.success(), "{exit:?}");
}

/// `machine run` as PID 1 of a fresh PID namespace with one fake GPU and the fake ComfyUI,
/// leases of 3 s, and its log in `dir`. Killing the machine ends the namespace, its ComfyUI too.
fn pid1_machine(dir: &Path, name: &str, url: &str, port: u16) -> Child {
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "[connectors.comfyui]\ncommand = [\"{fake}\", \"--port\", \"{{port}}\"]\n\n\
             [worker]\nlease = \"3s\"\nheartbeat = \"1s\"\npending_uploads = 2\ndrain = \"1s\"\n",
            fake = fake_comfyui().display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", env!("CARGO_BIN_EXE_machine"), "run"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", name)
        .env("MACHINE_WORKSPACE", dir.join(name))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("HUB_REDIS_URL", url)
        .env("WORKER_CONNECTORS", "comfyui")
        .env("COMFYUI_BASE_PORT", testkit::free_port().to_string())
        .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
        .env("FAKE_NVML_GPUS", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("unshare (util-linux) runs as root")
}

/// The outputs of a finished ComfyUI job are fetched from its `/view` by the upload stage while
/// the worker goes on. A machine SIGKILLed during that fetch loses nothing: the job keeps its
/// lease (in progress, no result), the lease runs out, another machine runs it and completes it
/// once, with its one output.
#[tokio::test(flavor = "multi_thread")]
async fn a_machine_killed_while_it_fetches_comfyui_outputs_loses_nothing() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let dir = tempfile::tempdir().unwrap();

    let port = testkit::free_port();
    let mut first = Pid1 {
        unshare: pid1_machine(dir.path(), "fa", &url, port),
        _dir: tempfile::tempdir().unwrap(),
    };
    let upid = first.unshare.id();
    let machine_pid = wait_until(Duration::from_secs(10), "the machine to start", || {
        std::fs::read_to_string(format!("/proc/{upid}/task/{upid}/children"))
            .ok()
            .and_then(|c| c.split_whitespace().next().and_then(|p| p.parse::<i32>().ok()))
    });
    // `/view` of its image takes 4 s: the first machine is killed during it, the second waits it out.
    let workflow = json!({"workflow": {
        "3": {"class_type": "KSampler", "inputs": {"steps": 2, "step_ms": 5}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "kill", "view_ms": 4000}}
    }});
    let deadline = Instant::now() + Duration::from_secs(60);
    while http_get(port, "/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "the first machine never got ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let id = submit(&url, &["--service", "comfyui", "--payload", &workflow.to_string()]);

    // The job's service work is done and its output is being fetched.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, body) = http_get(port, "/status").await;
        let status: Value = serde_json::from_str(&body).unwrap_or_default();
        let fetching = status["workers"][0]["uploads"]
            .as_array()
            .is_some_and(|u| u.iter().any(|u| u["job_id"] == id.as_str()));
        if fetching {
            break;
        }
        assert!(Instant::now() < deadline, "the output was never being fetched: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(machine_pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let _ = first.unshare.wait();
    let j = job(&mut conn, &id).await;
    assert_eq!(
        j["status"], "in_progress",
        "the killed machine's job keeps its lease: {j:?}"
    );
    assert!(!j.contains_key("result"), "no result was written: {j:?}");

    let port = testkit::free_port();
    let _second = Pid1 {
        unshare: pid1_machine(dir.path(), "fb", &url, port),
        _dir: tempfile::tempdir().unwrap(),
    };
    let j = completed(&mut conn, &id, Instant::now() + Duration::from_secs(60)).await;
    assert_eq!(j["worker_id"], "fb-gpu0", "the second machine ran it: {j:?}");
    let (_, body) = http_get(port, "/status").await;
    let status: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["workers"][0]["counts"]["completed"], 1, "completed once: {body}");
    assert_eq!(j["retry_count"], "1", "the lost attempt is counted once: {j:?}");
    let record: Option<String> = conn.hget("jobs:completed", &id).await.unwrap();
    let record: Value = serde_json::from_str(&record.expect("a completion record")).unwrap();
    let text = record["data"].to_string();
    assert_eq!(
        text.matches("kill_").count(),
        1,
        "its one output is in the result: {text}"
    );
}

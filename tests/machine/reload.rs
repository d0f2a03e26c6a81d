//! Reloading a running machine (issue 15) on the real binary, a real Redis and the fake ComfyUI:
//! `simulation:1,comfyui` reloaded to `simulation:2,comfyui,openai:1` (`machine reload`) keeps
//! the ComfyUI service (same PID) and its running job; reloaded to `openai:1` (SIGHUP) the
//! simulation and ComfyUI workers drain and stop with no job lost and ComfyUI stops; an invalid
//! reload (`POST /reload`) changes nothing and lists every problem; `config check --diff` shows
//! what a reload would do.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::e2e::{completed, fake_comfyui, submit};
use crate::support::{machine, run, wait_until};

const TOKEN: &str = "reload-test-token";

struct Machine {
    child: crate::support::KillOnDrop,
    port: u16,
    comfy_port: u16,
}

fn status(port: u16) -> Option<Value> {
    let out = machine()
        .args(["status", "--json", "--url", &format!("http://127.0.0.1:{port}")])
        .env("MACHINE_CONTROL_TOKEN", TOKEN)
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

fn worker_ids(doc: &Value) -> Vec<String> {
    doc["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["worker_id"].as_str().unwrap().to_owned())
        .collect()
}

fn service<'a>(doc: &'a Value, name: &str) -> Option<&'a Value> {
    doc["services"].as_array()?.iter().find(|s| s["name"] == name)
}

fn start(dir: &Path, redis_url: &str) -> Machine {
    start_draining(dir, redis_url, "20s")
}

fn start_draining(dir: &Path, redis_url: &str, drain: &str) -> Machine {
    let config = dir.join("machine.toml");
    std::fs::write(
        &config,
        format!(
            "[connectors.comfyui]\ncommand = [\"{}\", \"--port\", \"{{port}}\"]\n\n[connectors.simulation]\nduration = \"3s\"\nsteps = 6\n\n[worker]\ndrain = \"{drain}\"\n",
            fake_comfyui().display()
        ),
    )
    .unwrap();
    let port = testkit::free_port();
    let comfy_port = testkit::free_port();
    let log = std::fs::File::create(dir.join("machine.log")).unwrap();
    let child = machine()
        .arg("run")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", "rl")
        .env("MACHINE_WORKSPACE", dir.join("ws"))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("MACHINE_CONTROL_TOKEN", TOKEN)
        .env("HUB_REDIS_URL", redis_url)
        .env("WORKER_CONNECTORS", "simulation:1,comfyui")
        .env("COMFYUI_BASE_PORT", comfy_port.to_string())
        .env("OPENAI_API_KEY", "sk-test")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    Machine {
        child: child.into(),
        port,
        comfy_port,
    }
}

fn reload_cli(m: &Machine, dir: &Path) -> (bool, String, String) {
    let (out, stdout, stderr) = run(machine()
        .args(["reload", "--url", &format!("http://127.0.0.1:{}", m.port)])
        .env("MACHINE_CONFIG", dir.join("machine.toml"))
        .env("MACHINE_CONTROL_TOKEN", TOKEN));
    (out.status.success(), stdout, stderr)
}

async fn job_status(conn: &mut redis::aio::MultiplexedConnection, id: &str) -> String {
    let s: Option<String> = conn.hget(format!("job:{id}"), "status").await.unwrap();
    s.unwrap_or_default()
}

/// Waits until a worker claimed the job `id` (it is no longer pending), until `deadline`.
async fn wait_claimed(conn: &mut redis::aio::MultiplexedConnection, id: &str, deadline: Instant) {
    while job_status(conn, id).await == "pending" {
        assert!(Instant::now() < deadline, "job {id} was not claimed");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until the machine on `port` is ready; its `/status` then.
fn wait_ready(port: u16) -> Value {
    wait_until(Duration::from_secs(30), "the machine to be ready", || {
        status(port).filter(|d| d["machine"]["phase"] == "ready")
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn reload_changes_only_what_changed_and_loses_no_job() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &url);
    let log = || std::fs::read_to_string(dir.path().join("machine.log")).unwrap_or_default();

    let doc = wait_ready(m.port);
    assert_eq!(worker_ids(&doc), ["rl-cpu0", "rl-simulation-1"], "{doc}");
    let comfy_pid = service(&doc, "comfyui-cpu0").unwrap()["pid"].as_u64().unwrap();

    // A ComfyUI job that runs across the reload.
    let workflow = json!({"workflow": {
        "3": {"class_type": "KSampler", "inputs": {"steps": 40, "step_ms": 100}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "rl"}}
    }});
    let comfy_job = submit(&url, &["--service", "comfyui", "--payload", &workflow.to_string()]);
    wait_claimed(&mut conn, &comfy_job, Instant::now() + Duration::from_secs(10)).await;

    // What a reload would do, before doing it.
    std::fs::write(
        dir.path().join("ws/worker_connectors"),
        "simulation:2,comfyui,openai:1\n",
    )
    .unwrap();
    let (out, stdout, stderr) = run(machine()
        .args([
            "config",
            "check",
            "--diff",
            "--url",
            &format!("http://127.0.0.1:{}", m.port),
        ])
        .env("MACHINE_CONFIG", dir.path().join("machine.toml"))
        .env("MACHINE_WORKSPACE", dir.path().join("ws"))
        .env("MACHINE_ID", "rl")
        .env("MACHINE_HEALTH_PORT", m.port.to_string())
        .env("HUB_REDIS_URL", &url)
        .env("OPENAI_API_KEY", "sk-test")
        .env("COMFYUI_BASE_PORT", m.comfy_port.to_string())
        .env("MACHINE_CONTROL_TOKEN", TOKEN));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("+ worker rl-simulation-2 added\n"), "{stdout}");
    assert!(stdout.contains("+ worker rl-openai-1 added\n"), "{stdout}");
    assert!(
        stdout.contains("unchanged: 2 worker(s), 1 service(s) keep running"),
        "{stdout}"
    );

    // `machine reload`: workers are added, nothing else is touched.
    let (ok, stdout, stderr) = reload_cli(&m, dir.path());
    assert!(ok, "{stdout}{stderr}\n{}", log());
    assert!(stdout.contains("+ worker rl-openai-1 added"), "{stdout}");
    let doc = status(m.port).unwrap();
    assert_eq!(
        worker_ids(&doc),
        ["rl-cpu0", "rl-simulation-1", "rl-simulation-2", "rl-openai-1"],
        "{doc}"
    );
    assert_eq!(
        service(&doc, "comfyui-cpu0").unwrap()["pid"].as_u64(),
        Some(comfy_pid),
        "ComfyUI kept running"
    );
    let done = completed(&mut conn, &comfy_job, Instant::now() + Duration::from_secs(30)).await;
    assert_eq!(done["worker_id"], "rl-cpu0", "{done:?}");
    let registered: bool = conn.exists("worker:rl-openai-1").await.unwrap();
    assert!(registered, "the added worker registered in Redis");
    let fleet = wait_until(
        Duration::from_secs(10),
        "the fleet status to show the new workers",
        || {
            let mut c = client.get_connection().ok()?;
            let raw: Option<String> = redis::cmd("GET").arg("machine:rl:status").query(&mut c).ok()?;
            let msg: Value = serde_json::from_str(&raw?).ok()?;
            (msg["structure"]["workers"].as_object()?.len() == 4).then_some(msg)
        },
    );
    assert!(fleet["structure"]["workers"].get("rl-openai-1").is_some(), "{fleet}");

    // SIGHUP to `openai:1`: the ComfyUI and simulation workers drain (their jobs complete) and
    // stop, ComfyUI stops, the openai worker runs on.
    let comfy_job = submit(&url, &["--service", "comfyui", "--payload", &workflow.to_string()]);
    let sim_jobs = [
        submit(&url, &["--service", "simulation", "--payload", "{}"]),
        submit(&url, &["--service", "simulation", "--payload", "{}"]),
    ];
    let deadline = Instant::now() + Duration::from_secs(10);
    for id in sim_jobs.iter().chain([&comfy_job]) {
        wait_claimed(&mut conn, id, deadline).await;
    }
    std::fs::write(dir.path().join("ws/worker_connectors"), "openai:1\n").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(m.child.id() as i32),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let doc = wait_until(Duration::from_secs(40), "the reload to openai:1", || {
        status(m.port).filter(|d| worker_ids(d) == ["rl-openai-1"] && service(d, "comfyui-cpu0").is_none())
    });
    assert!(doc["services"].as_array().unwrap().is_empty(), "{doc}");
    for id in sim_jobs.iter().chain([&comfy_job]) {
        completed(&mut conn, id, Instant::now() + Duration::from_secs(5)).await;
    }
    assert!(
        !Path::new(&format!("/proc/{comfy_pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{comfy_pid}/stat")).is_ok_and(|s| s.contains(") Z ")),
        "ComfyUI was stopped"
    );
    for gone in ["worker:rl-cpu0", "worker:rl-simulation-1", "worker:rl-simulation-2"] {
        let exists: bool = conn.exists(gone).await.unwrap();
        assert!(!exists, "{gone} left Redis");
    }

    // An invalid configuration: refused with every problem, nothing changes.
    std::fs::write(dir.path().join("ws/worker_connectors"), "nope:1\n").unwrap();
    std::fs::write(
        dir.path().join("machine.toml"),
        "[worker]\ndrain = \"not a duration\"\n",
    )
    .unwrap();
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/reload", m.port))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().await.unwrap();
    let keys: Vec<&str> = body["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    // The connectors came from `<workspace>/worker_connectors`: its problem names that file.
    assert!(keys.iter().any(|k| k.ends_with("/worker_connectors")), "{body}");
    assert!(keys.iter().any(|k| k.starts_with("worker.drain")), "{body}");
    let (ok, _, stderr) = reload_cli(&m, dir.path());
    assert!(!ok, "machine reload exits non-zero on a refused configuration");
    assert!(stderr.contains("/worker_connectors"), "{stderr}");
    let doc = status(m.port).unwrap();
    assert_eq!(worker_ids(&doc), ["rl-openai-1"], "{doc}");
    // Without the token, the reload is refused outright.
    let resp = reqwest::Client::new()
        .post(format!("http://127.0.0.1:{}/reload", m.port))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status().as_u16(), 401);
}

/// A changed ComfyUI command restarts that service between jobs: its worker drains first (the
/// running job completes), the service comes back with a new PID, the worker claims again; the
/// simulation worker is not touched.
#[tokio::test(flavor = "multi_thread")]
async fn a_changed_service_restarts_between_jobs() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &url);
    let log = || std::fs::read_to_string(dir.path().join("machine.log")).unwrap_or_default();
    let doc = wait_ready(m.port);
    let comfy_pid = service(&doc, "comfyui-cpu0").unwrap()["pid"].as_u64().unwrap();
    let workflow = json!({"workflow": {
        "3": {"class_type": "KSampler", "inputs": {"steps": 20, "step_ms": 100}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "rl"}}
    }});
    let running = submit(&url, &["--service", "comfyui", "--payload", &workflow.to_string()]);
    wait_claimed(&mut conn, &running, Instant::now() + Duration::from_secs(10)).await;
    std::fs::write(
        dir.path().join("machine.toml"),
        format!(
            "[connectors.comfyui]\ncommand = [\"{}\", \"--port\", \"{{port}}\", \"--reloaded\"]\n\n[connectors.simulation]\nduration = \"3s\"\nsteps = 6\n\n[worker]\ndrain = \"20s\"\n",
            fake_comfyui().display()
        ),
    )
    .unwrap();
    let (ok, stdout, stderr) = reload_cli(&m, dir.path());
    assert!(ok, "{stdout}{stderr}\n{}", log());
    assert!(
        stdout.contains("~ service comfyui-cpu0 changed (restarted)"),
        "{stdout}"
    );
    assert!(stdout.contains("~ worker rl-cpu0 changed (restarted)"), "{stdout}");
    assert!(stdout.contains("unchanged: 1 worker(s)"), "{stdout}");
    // The reload returned after the drain: the job finished on the old service.
    let done = completed(&mut conn, &running, Instant::now() + Duration::from_secs(1)).await;
    assert_eq!(done["worker_id"], "rl-cpu0");
    let doc = wait_until(Duration::from_secs(20), "ComfyUI to run again", || {
        status(m.port).filter(|d| service(d, "comfyui-cpu0").is_some_and(|s| s["state"] == "running"))
    });
    let new_pid = service(&doc, "comfyui-cpu0").unwrap()["pid"].as_u64().unwrap();
    assert_ne!(new_pid, comfy_pid, "ComfyUI was restarted");
    assert_eq!(worker_ids(&doc), ["rl-cpu0", "rl-simulation-1"], "{doc}");
    let next = submit(&url, &["--service", "comfyui", "--payload", &workflow.to_string()]);
    completed(&mut conn, &next, Instant::now() + Duration::from_secs(30)).await;
}

/// The supervisor's add and remove, on real children: an added service waits for the one it
/// starts after, a second one of the same name is refused, and a removed one stops and is
/// forgotten while the other runs on with the same pid.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_added_and_removed_while_the_rest_run() {
    use machine::supervisor::{Supervisor, SupervisorError};
    let dir = tempfile::tempdir().unwrap();
    let file = r#"
[services.base]
command = ["sleep", "1000"]
grace = "2s"
[services.extra]
command = ["sleep", "1000"]
after = ["base"]
grace = "2s"
"#;
    let env = std::collections::BTreeMap::from([("MACHINE_WORKSPACE", dir.path().to_str().unwrap())]);
    let config = machine::config::load_str(Some(("machine.toml", file)), &env).unwrap();
    let spec = |n: &str| config.plan.services.iter().find(|s| s.name == n).unwrap().clone();
    let sup = Supervisor::new(vec![spec("base")], &config.machine.supervisor, dir.path()).unwrap();
    let handle = sup.handle();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(sup.run(shutdown.clone(), tokio_util::sync::CancellationToken::new()));
    let body = async {
        handle
            .watch(&["base".to_owned()])
            .unwrap()
            .wait_healthy()
            .await
            .unwrap();
        let base_pid = handle.service("base").unwrap().state.pid();
        handle.add(spec("extra")).unwrap();
        assert!(matches!(handle.add(spec("extra")), Err(SupervisorError::Exists(_))));
        handle
            .watch(&["extra".to_owned()])
            .unwrap()
            .wait_healthy()
            .await
            .unwrap();
        assert_eq!(handle.names(), ["base", "extra"]);
        let extra_pid = handle.service("extra").unwrap().state.pid().unwrap();
        handle.remove("extra").await.unwrap();
        assert!(handle.service("extra").is_err(), "forgotten");
        assert_eq!(handle.names(), ["base"]);
        assert!(
            !Path::new(&format!("/proc/{extra_pid}")).exists()
                || std::fs::read_to_string(format!("/proc/{extra_pid}/stat")).is_ok_and(|s| s.contains(") Z ")),
            "stopped"
        );
        let base = handle.service("base").unwrap();
        assert!(base.state.ready(), "{base:?}");
        assert_eq!(base.state.pid(), base_pid);
    };
    tokio::time::timeout(Duration::from_secs(30), body)
        .await
        .expect("in time");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(handle.service("base").unwrap().state.is_down());
}

/// A removed worker whose job outlasts the drain period returns the job to the queue: the reload
/// finishes after the drain, and the job waits, pending, for a worker that runs ComfyUI.
#[tokio::test(flavor = "multi_thread")]
async fn a_job_outlasting_the_drain_goes_back_to_the_queue() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = start_draining(dir.path(), &url, "1s");
    let log = || std::fs::read_to_string(dir.path().join("machine.log")).unwrap_or_default();
    wait_ready(m.port);
    let workflow = json!({"workflow": {
        "3": {"class_type": "KSampler", "inputs": {"steps": 100, "step_ms": 100}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "rl"}}
    }});
    let id = submit(&url, &["--service", "comfyui", "--payload", &workflow.to_string()]);
    wait_claimed(&mut conn, &id, Instant::now() + Duration::from_secs(10)).await;
    std::fs::write(dir.path().join("ws/worker_connectors"), "simulation:1\n").unwrap();
    let began = Instant::now();
    let (ok, stdout, stderr) = reload_cli(&m, dir.path());
    assert!(ok, "{stdout}{stderr}\n{}", log());
    assert!(
        began.elapsed() < Duration::from_secs(8),
        "the drain period bounds the reload"
    );
    assert!(stdout.contains("- worker rl-cpu0 removed"), "{stdout}");
    assert_eq!(job_status(&mut conn, &id).await, "pending", "{}", log());
    let queued: Option<f64> = conn.zscore("jobs:pending", &id).await.unwrap();
    assert!(queued.is_some(), "the job is back in the queue");
    let doc = status(m.port).unwrap();
    assert_eq!(worker_ids(&doc), ["rl-simulation-1"], "{doc}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_changed_lease_applies_to_the_next_claim() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let m = start(dir.path(), &url);
    wait_ready(m.port);
    let comfy_pid = |doc: &Value| service(doc, "comfyui-cpu0").and_then(|s| s["pid"].as_u64());
    let before = comfy_pid(&status(m.port).unwrap());

    // The lease of a job claimed now: its deadline in `jobs:leases` less the claim time.
    async fn lease_of_next_claim(conn: &mut redis::aio::MultiplexedConnection, url: &str) -> f64 {
        let id = submit(url, &["--service", "simulation"]);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let score: Option<f64> = conn.zscore("jobs:leases", &id).await.unwrap();
            if let Some(score) = score {
                let now = machine::clock::now_ms() as f64;
                return (score - now) / 1000.0;
            }
            assert!(Instant::now() < deadline, "job {id} was not claimed");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let lease = lease_of_next_claim(&mut conn, &url).await;
    assert!((55.0..=60.5).contains(&lease), "the configured lease (60 s): {lease}");

    // Only the lease changes; `machine reload` finds the machine by its workspace's control
    // socket, with no token.
    let config = dir.path().join("machine.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, text.replace("[worker]\n", "[worker]\nlease = \"45s\"\n")).unwrap();
    let (out, stdout, stderr) = run(machine()
        .arg("reload")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_WORKSPACE", dir.path().join("ws"))
        .env("MACHINE_HEALTH_PORT", "1")
        .env_remove("MACHINE_CONTROL_TOKEN"));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("applied: worker.lease = 45s"), "{stdout}");
    assert!(!stdout.contains("not applied: `worker`"), "{stdout}");

    let lease = lease_of_next_claim(&mut conn, &url).await;
    assert!((40.0..=45.5).contains(&lease), "the reloaded lease (45 s): {lease}");
    assert_eq!(comfy_pid(&status(m.port).unwrap()), before, "nothing restarted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_connector_added_by_a_reload_is_installed_then_started() {
    use crate::e2e::{comfyui_repository, two_free_ports};

    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let (repo, commit) = comfyui_repository(root);
    let nodes = root.join("nodes.toml");
    std::fs::write(&nodes, "").unwrap();
    let port = testkit::free_port();
    let log = root.join("machine.log");
    // Started without ComfyUI; its installer settings are there for when a reload adds it.
    let child = machine()
        .arg("run")
        .env("MACHINE_ID", "ri")
        .env("MACHINE_WORKSPACE", root.join("ws"))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("MACHINE_GPU_COUNT", "0")
        .env("HUB_REDIS_URL", &url)
        .env("WORKER_CONNECTORS", "simulation:1")
        .env("COMFYUI_BASE_PORT", two_free_ports().to_string())
        .env("COMFYUI_REPO_URL", &repo)
        .env("COMFYUI_REF", &commit)
        .env("COMFYUI_NODES_FILE", &nodes)
        .env("COMFYUI_EXTRA_PACKAGES", "none")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut m = Machine {
        child: child.into(),
        port,
        comfy_port: 0,
    };
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();
    let ready = wait_ready(port);
    assert_eq!(ready["installs"], json!({}), "nothing to install at start: {ready}");

    std::fs::write(root.join("ws/worker_connectors"), "simulation:1,comfyui\n").unwrap();
    let (out, stdout, stderr) = run(machine()
        .arg("reload")
        .env("MACHINE_WORKSPACE", root.join("ws"))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env_remove("MACHINE_CONTROL_TOKEN"));
    assert!(out.status.success(), "{stdout}{stderr}\n{}", log_text());
    assert!(
        stdout.contains("ri-cpu0"),
        "the added worker is in the report: {stdout}"
    );

    // The reload ran the ComfyUI installer (a real git clone and venv), then started the
    // service, then its worker, which runs a ComfyUI job.
    let doc = status(port).unwrap();
    assert_eq!(doc["installs"]["comfyui"]["state"], "done", "{}", doc["installs"]);
    let workflow = json!({"workflow": {
        "3": {"class_type": "KSampler", "inputs": {"steps": 2, "step_ms": 10}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ri"}}
    }});
    let id = submit(&url, &["--service", "comfyui", "--payload", &workflow.to_string()]);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = job_status(&mut conn, &id).await;
        if s == "completed" {
            break;
        }
        assert!(s != "failed", "the ComfyUI job failed: {}", log_text());
        assert!(
            Instant::now() < deadline,
            "the ComfyUI job did not complete ({s}): {}",
            log_text()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let worker: Option<String> = conn.hget(format!("job:{id}"), "worker_id").await.unwrap();
    assert_eq!(worker.as_deref(), Some("ri-cpu0"));
    let _ = m.child.kill();
}

/// The queue depth of a connector a reload added is sampled: the feed follows the running plan,
/// not the plan of the start.
#[test]
fn a_connector_added_by_a_reload_has_its_queue_depth_sampled() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let port = testkit::free_port();
    let log = std::fs::File::create(dir.path().join("machine.log")).unwrap();
    let child = machine()
        .arg("run")
        .env("MACHINE_ID", "rlq")
        .env("MACHINE_WORKSPACE", dir.path().join("ws"))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("MACHINE_CONTROL_TOKEN", TOKEN)
        .env("HUB_REDIS_URL", redis.url())
        .env("WORKER_CONNECTORS", "simulation:1")
        .env("OPENAI_API_KEY", "sk-test")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let m = Machine {
        child: child.into(),
        port,
        comfy_port: 0,
    };
    wait_ready(port);
    let metrics = || {
        let out = reqwest::blocking::Client::new()
            .get(format!("http://127.0.0.1:{port}/metrics"))
            .bearer_auth(TOKEN)
            .send()
            .ok()?;
        out.text().ok()
    };
    wait_until(Duration::from_secs(20), "the simulation queue depth", || {
        metrics().filter(|m| m.contains("machine_queue_depth{service=\"simulation\"}"))
    });
    std::fs::write(dir.path().join("ws/worker_connectors"), "simulation:1,openai:1\n").unwrap();
    let (ok, stdout, stderr) = run(machine()
        .args(["reload", "--url", &format!("http://127.0.0.1:{port}")])
        .env("MACHINE_CONTROL_TOKEN", TOKEN));
    assert!(ok.status.success(), "{stdout}{stderr}");
    wait_until(Duration::from_secs(20), "the added connector's queue depth", || {
        metrics().filter(|m| m.contains("machine_queue_depth{service=\"openai_text\"}"))
    });
    drop(m);
}

/// `config check --diff` is what the machine itself would load (issue 25): the machine loads its
/// own file with its own environment (a dry run), so a shell without the machine's `LOG_FORMAT`
/// or read token sees no change, a shell checking another file is told which file the machine
/// reads, and a configuration the machine would refuse is listed once, exit 2. A no-change
/// reload of a machine whose id comes from the hostname changes nothing.
#[test]
fn config_check_diff_is_what_the_machine_would_load() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("machine.toml");
    std::fs::write(&config, "[connectors.simulation]\nduration = \"1s\"\n").unwrap();
    let port = testkit::free_port();
    let log = std::fs::File::create(dir.path().join("machine.log")).unwrap();
    let child = machine()
        .arg("run")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_WORKSPACE", dir.path().join("ws"))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("MACHINE_CONTROL_TOKEN", TOKEN)
        .env("MACHINE_READ_TOKEN", "machine-only-read-token")
        .env("LOG_FORMAT", "json")
        .env("HUB_REDIS_URL", redis.url())
        .env("WORKER_CONNECTORS", "simulation")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let _m = Machine {
        child: child.into(),
        port,
        comfy_port: 0,
    };
    let doc = wait_ready(port);
    assert!(
        doc["machine"]["id"].as_str().unwrap().starts_with("machine-"),
        "an id from the hostname: {doc}"
    );
    let url = format!("http://127.0.0.1:{port}");
    // The operator's shell: the same file, none of the machine's other variables.
    let diff = |file: &Path| {
        run(machine()
            .args(["config", "check", "--diff", "--url", &url])
            .env("MACHINE_CONFIG", file)
            .env("MACHINE_WORKSPACE", dir.path().join("ws"))
            .env("MACHINE_CONTROL_TOKEN", TOKEN))
    };
    let (out, stdout, stderr) = diff(&config);
    assert!(out.status.success(), "{stdout}{stderr}");
    let said = stdout
        .split_once("a reload of the running machine would change:\n")
        .unwrap_or_else(|| panic!("{stdout}"))
        .1;
    assert!(said.starts_with("no change\n"), "{stdout}");
    assert!(
        !stdout.contains("not applied"),
        "nothing the shell lacks is a change: {stdout}"
    );
    assert!(!stdout.contains("note: the running machine reads"), "{stdout}");

    // Another file in the shell: the machine's own file is what a reload reads.
    let other = dir.path().join("other.toml");
    std::fs::write(&other, "[connectors.simulation]\nduration = \"2s\"\n").unwrap();
    let (out, stdout, stderr) = diff(&other);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "note: the running machine reads {}, not {}",
            config.display(),
            other.display()
        )),
        "{stdout}"
    );
    assert!(stdout.contains("would change:\nno change\n"), "{stdout}");

    // The machine's file turns invalid: the machine would refuse it; each problem once.
    std::fs::write(
        &config,
        "[connectors.simulation]\nduration = \"1s\"\n\n[services.bad]\n",
    )
    .unwrap();
    let (out, stdout, stderr) = diff(&other);
    assert_eq!(out.status.code(), Some(2), "{stdout}{stderr}");
    assert!(stdout.contains("the running machine would refuse a reload"), "{stdout}");
    assert_eq!(stdout.matches("services.bad").count(), 1, "{stdout}");
    std::fs::write(&config, "[connectors.simulation]\nduration = \"1s\"\n").unwrap();

    // A no-change reload: nothing changed, the hostname-derived id included.
    let (out, stdout, stderr) = run(machine()
        .args(["reload", "--url", &url])
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_CONTROL_TOKEN", TOKEN));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("no change"), "{stdout}");
    assert!(!stdout.contains("not applied"), "{stdout}");
}

//! Issue 13 part A on the real binary, a real Redis and the fake NVML library with injected
//! events: a fatal XID on one GPU returns that GPU's job (not as a retry) to the other GPU,
//! holds its worker, stops its service and keeps `/health` at 200; `gpu.on_fault = "exit"`
//! returns the job and exits with code 5; throttling is reported; a worker whose jobs fail
//! for the machine's reasons is quarantined for its (shortened) cool-down and then claims
//! again, while an invalid workflow does not count; `/ready` answers 503 only when no worker
//! can claim, listing why.

use std::path::Path;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::e2e::{completed, fake_comfyui, http_get, submit, two_free_ports};
use crate::support::{machine, wait_until};

/// A machine child killed on drop.
struct Machine {
    child: crate::support::KillOnDrop,
    port: u16,
}

impl Machine {
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        wait_until(timeout, "the machine to exit", || self.child.try_wait().unwrap())
    }
}

/// Starts `machine run` with ComfyUI on `gpus` fake GPUs, the fake NVML reading `control`.
fn start(dir: &Path, id: &str, redis: &str, gpus: u32, toml: &str, control: &Path, envs: &[(&str, &str)]) -> Machine {
    let config = dir.join("machine.toml");
    std::fs::write(&config, toml).unwrap();
    let port = testkit::free_port();
    let log = std::fs::File::create(dir.join("machine.log")).unwrap();
    let mut cmd = machine();
    cmd.arg("run")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", id)
        .env("MACHINE_WORKSPACE", dir.join("ws"))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("HUB_REDIS_URL", redis)
        .env("WORKER_CONNECTORS", "comfyui")
        .env("COMFYUI_BASE_PORT", two_free_ports().to_string())
        .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
        .env("FAKE_NVML_GPUS", gpus.to_string())
        .env("FAKE_NVML_CONTROL", control)
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    Machine {
        child: cmd.spawn().unwrap().into(),
        port,
    }
}

fn comfyui_toml(extra: &str) -> String {
    format!(
        "[connectors.comfyui]\ncommand = [\"{fake}\", \"--port\", \"{{port}}\"]\n[gpu]\nhealth_poll = \"100ms\"\n{extra}",
        fake = fake_comfyui().display()
    )
}

/// A ComfyUI workflow running `steps` steps `step_ms` apart.
fn workflow(steps: u32, step_ms: u32) -> String {
    json!({"workflow": {"3": {"class_type": "KSampler", "inputs": {"steps": steps, "step_ms": step_ms}},
                        "9": {"class_type": "SaveImage", "inputs": {}}}})
    .to_string()
}

async fn get_json(port: u16, path: &str) -> (u16, Value) {
    let (code, body) = http_get(port, path).await;
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn until_ready(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, body) = get_json(port, "/ready").await;
        if code == 200 {
            return;
        }
        assert!(Instant::now() < deadline, "never ready: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn job_field(conn: &mut redis::aio::MultiplexedConnection, id: &str, field: &str) -> String {
    let v: Option<String> = conn.hget(format!("job:{id}"), field).await.unwrap();
    v.unwrap_or_default()
}

/// Waits until job `id` runs and returns the worker running it.
async fn running_on(conn: &mut redis::aio::MultiplexedConnection, id: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if job_field(conn, id, "status").await == "in_progress" {
            return job_field(conn, id, "worker_id").await;
        }
        assert!(Instant::now() < deadline, "job {id} never started");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

fn worker<'a>(status: &'a Value, id: &str) -> &'a Value {
    status["workers"]
        .as_array()
        .unwrap()
        .iter()
        .find(|w| w["worker_id"] == id)
        .unwrap_or_else(|| panic!("no worker {id} in {status}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fatal_xid_returns_the_job_to_the_other_gpu_and_isolates_its_own() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nvml = testkit::fake_nvml::Control::new(dir.path().join("nvml-control"));
    let m = start(dir.path(), "xid", &url, 2, &comfyui_toml(""), nvml.path(), &[]);
    until_ready(m.port).await;

    // Throttling is reported, not acted on.
    nvml.throttle(0, 0x40);
    let throttled = wait_until(Duration::from_secs(10), "throttling on /status", || {
        let (_, s) = futures_executor(get_json(m.port, "/status"));
        let t = s["gpus"][0]["throttle"].clone();
        t.is_object().then_some(t)
    });
    assert_eq!(throttled["reasons"], json!(["hw_thermal_slowdown"]), "{throttled}");

    let id = submit(&url, &["--service", "comfyui", "--payload", &workflow(200, 50)]);
    let first = running_on(&mut conn, &id).await;
    let gpu: u32 = first.trim_start_matches("xid-gpu").parse().unwrap();
    let other = format!("xid-gpu{}", 1 - gpu);
    nvml.xid(gpu, 79);

    // The job goes back without burning a retry and completes on the other GPU.
    let j = completed(&mut conn, &id, Instant::now() + Duration::from_secs(40)).await;
    assert_eq!(j["worker_id"], other, "{j:?}");
    assert_eq!(j["retry_count"], "0", "a GPU fault is not the job's retry: {j:?}");

    let (health, _) = http_get(m.port, "/health").await;
    assert_eq!(health, 200, "the other GPU keeps the machine healthy");
    let (_, status) = get_json(m.port, "/status").await;
    let g = &status["gpus"][gpu as usize];
    assert_eq!(g["health"], "faulted", "{g}");
    assert!(g["reason"].as_str().unwrap().contains("XID 79"), "{g}");
    assert_eq!(g["last_xid"], 79);
    let w = worker(&status, &first);
    assert_eq!(w["state"], "held", "{w}");
    assert!(w["reason"].as_str().unwrap().contains("faulted: XID 79"), "{w}");
    // Its service is stopped once the worker is off the job.
    let service = format!("comfyui-gpu{gpu}");
    wait_until(Duration::from_secs(20), "the faulted GPU's service to stop", || {
        let (_, s) = futures_executor(get_json(m.port, "/status"));
        s["services"]
            .as_array()?
            .iter()
            .find(|v| v["name"] == service.as_str())
            .filter(|v| v["state"] == "stopped")
            .cloned()
    });

    // Ready, naming the worker that cannot claim.
    let (code, ready) = get_json(m.port, "/ready").await;
    assert_eq!(code, 200, "{ready}");
    assert!(
        ready["not_claiming"][&first].as_str().unwrap().contains("XID 79"),
        "{ready}"
    );
    let (_, metrics) = http_get(m.port, "/metrics").await;
    assert!(
        metrics.contains(&format!("machine_gpu_faulted{{gpu=\"{gpu}\"}} 1")),
        "{metrics}"
    );
    assert!(metrics.contains("machine_gpu_throttled{gpu=\"0\"} 1"), "{metrics}");

    // A later job goes to the healthy GPU only.
    let next = submit(&url, &["--service", "comfyui", "--payload", &workflow(2, 5)]);
    let j = completed(&mut conn, &next, Instant::now() + Duration::from_secs(20)).await;
    assert_eq!(j["worker_id"], other);
}

/// Blocks on a future from a synchronous polling closure (the test runtime is multi-threaded).
fn futures_executor<T: Send + 'static>(f: impl Future<Output = T> + Send + 'static) -> T {
    let handle = tokio::runtime::Handle::current();
    std::thread::scope(|s| s.spawn(move || handle.block_on(f)).join().unwrap())
}

#[tokio::test(flavor = "multi_thread")]
async fn on_fault_exit_returns_the_job_and_exits_with_code_5() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nvml = testkit::fake_nvml::Control::new(dir.path().join("nvml-control"));
    let mut m = start(
        dir.path(),
        "ex",
        &url,
        1,
        &comfyui_toml(""),
        nvml.path(),
        &[("MACHINE_GPU_ON_FAULT", "exit")],
    );
    until_ready(m.port).await;
    let id = submit(&url, &["--service", "comfyui", "--payload", &workflow(200, 50)]);
    running_on(&mut conn, &id).await;
    nvml.double_bit_ecc(0);
    let exit = m.wait_exit(Duration::from_secs(30));
    assert_eq!(exit.code(), Some(5), "{exit:?}");
    assert_eq!(job_field(&mut conn, &id, "status").await, "pending");
    assert_eq!(job_field(&mut conn, &id, "retry_count").await, "0");
}

#[tokio::test(flavor = "multi_thread")]
async fn machine_failures_quarantine_a_worker_for_its_cool_down_and_invalid_workflows_do_not() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nvml = testkit::fake_nvml::Control::new(dir.path().join("nvml-control"));
    // The connector's own setting wins over [worker]'s 3m.
    let toml = comfyui_toml("[worker.quarantine.comfyui]\nafter = 3\ncooldown = \"3s\"\n");
    let m = start(dir.path(), "q", &url, 1, &toml, nvml.path(), &[]);
    until_ready(m.port).await;

    let oom = json!({"workflow": {"1": {"class_type": "FakeError",
        "inputs": {"exception_type": "torch.cuda.OutOfMemoryError", "message": "CUDA out of memory"}}}})
    .to_string();
    let invalid = json!({"workflow": {"1": {"class_type": "FakeInvalid", "inputs": {}}}}).to_string();
    let fail = |payload: &str| {
        submit(
            &url,
            &["--service", "comfyui", "--payload", payload, "--max-retries", "0"],
        )
    };
    let mut ids = vec![fail(&oom), fail(&invalid), fail(&oom)];
    for id in &ids {
        wait_failed(&mut conn, id).await;
    }
    let (_, status) = get_json(m.port, "/status").await;
    assert_ne!(
        worker(&status, "q-gpu0")["state"],
        "held",
        "two machine failures and an invalid workflow"
    );
    ids.push(fail(&oom));
    wait_failed(&mut conn, &ids[3]).await;
    let held_at = Instant::now();

    let status = wait_until(Duration::from_secs(5), "the quarantine on /status", || {
        let (_, s) = futures_executor(get_json(m.port, "/status"));
        (worker(&s, "q-gpu0")["state"] == "held").then_some(s)
    });
    let reason = worker(&status, "q-gpu0")["reason"].as_str().unwrap().to_owned();
    assert!(reason.starts_with("quarantined for 3s"), "{reason}");
    assert!(
        reason.contains("after 3 failures") && reason.contains("out of memory"),
        "{reason}"
    );
    let (code, ready) = get_json(m.port, "/ready").await;
    assert_eq!(code, 503, "the only worker cannot claim: {ready}");
    assert!(
        ready["not_claiming"]["q-gpu0"]
            .as_str()
            .unwrap()
            .contains("quarantined"),
        "{ready}"
    );
    let (_, metrics) = http_get(m.port, "/metrics").await;
    assert!(
        metrics.contains("machine_worker_quarantined{worker=\"q-gpu0\"} 1"),
        "{metrics}"
    );

    // Not claimed during the cool-down, claimed after it.
    let good = submit(&url, &["--service", "comfyui", "--payload", &workflow(2, 5)]);
    completed(&mut conn, &good, Instant::now() + Duration::from_secs(20)).await;
    assert!(
        held_at.elapsed() >= Duration::from_millis(2500),
        "the job waited for the cool-down (claimed {:?} after the quarantine)",
        held_at.elapsed()
    );
    let (code, _) = get_json(m.port, "/ready").await;
    assert_eq!(code, 200);
}

/// `machine quarantine clear [WORKER]` (control token) lifts a quarantine at once: the worker
/// claims again and `/ready` is 200; an unknown worker is named with the machine's workers, and
/// no token is refused.
#[tokio::test(flavor = "multi_thread")]
async fn an_operator_lifts_a_quarantine_with_machine_quarantine_clear() {
    const TOKEN: &str = "quarantine-test-token";
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let mut conn = redis::Client::open(url.as_str())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let nvml = testkit::fake_nvml::Control::new(dir.path().join("nvml-control"));
    let toml = comfyui_toml("[worker.quarantine.comfyui]\nafter = 1\ncooldown = \"10m\"\n");
    let m = start(
        dir.path(),
        "qc",
        &url,
        1,
        &toml,
        nvml.path(),
        &[("MACHINE_CONTROL_TOKEN", TOKEN)],
    );
    until_ready(m.port).await;
    let oom = json!({"workflow": {"1": {"class_type": "FakeError",
        "inputs": {"exception_type": "torch.cuda.OutOfMemoryError", "message": "CUDA out of memory"}}}})
    .to_string();
    let id = submit(&url, &["--service", "comfyui", "--payload", &oom, "--max-retries", "0"]);
    wait_failed(&mut conn, &id).await;
    let machine_url = format!("http://127.0.0.1:{}", m.port);
    let status_doc = || {
        let (out, stdout, _) = crate::support::run(
            machine()
                .args(["status", "--json", "--url", &machine_url])
                .env("MACHINE_CONTROL_TOKEN", TOKEN),
        );
        assert!(out.status.success());
        serde_json::from_str::<Value>(&stdout).unwrap()
    };
    let held = wait_until(Duration::from_secs(10), "the quarantine", || {
        let s = status_doc();
        (worker(&s, "qc-gpu0")["quarantined"] == true).then_some(s)
    });
    assert!(
        worker(&held, "qc-gpu0")["reason"]
            .as_str()
            .unwrap()
            .starts_with("quarantined for 10m"),
        "{held}"
    );
    let (code, _) = get_json(m.port, "/ready").await;
    assert_eq!(code, 503);

    let clear = |args: &[&str], token: Option<&str>| {
        let mut cmd = machine();
        cmd.args(["quarantine", "clear"])
            .args(args)
            .args(["--url", &machine_url])
            .env_remove("MACHINE_CONTROL_TOKEN")
            .env_remove("MACHINE_READ_TOKEN");
        if let Some(t) = token {
            cmd.env("MACHINE_CONTROL_TOKEN", t);
        }
        crate::support::run(&mut cmd)
    };
    let (out, stdout, stderr) = clear(&["qc-gpu0"], None);
    assert!(!out.status.success(), "no token: {stdout}{stderr}");
    let (out, stdout, stderr) = clear(&["nope"], Some(TOKEN));
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("no worker `nope`") && stderr.contains("qc-gpu0"),
        "{stderr}"
    );
    assert_eq!(
        worker(&status_doc(), "qc-gpu0")["quarantined"],
        true,
        "refusals lift nothing"
    );

    let (out, stdout, stderr) = clear(&["qc-gpu0"], Some(TOKEN));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "lifted the quarantine of qc-gpu0");
    let lifted = wait_until(Duration::from_secs(5), "the worker to claim again", || {
        let s = status_doc();
        (worker(&s, "qc-gpu0")["state"] == "idle").then_some(s)
    });
    assert_eq!(worker(&lifted, "qc-gpu0")["quarantined"], false, "{lifted}");
    assert!(worker(&lifted, "qc-gpu0")["reason"].is_null(), "{lifted}");
    let (code, ready) = get_json(m.port, "/ready").await;
    assert_eq!(code, 200, "{ready}");
    let (_, metrics) = http_get(m.port, "/metrics").await;
    assert!(
        metrics.contains("machine_worker_quarantined{worker=\"qc-gpu0\"} 0"),
        "{metrics}"
    );
    let good = submit(&url, &["--service", "comfyui", "--payload", &workflow(2, 5)]);
    completed(&mut conn, &good, Instant::now() + Duration::from_secs(10)).await;
    let (out, stdout, stderr) = clear(&[], Some(TOKEN));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(stdout.trim(), "no worker is quarantined");
}

async fn wait_failed(conn: &mut redis::aio::MultiplexedConnection, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while job_field(conn, id, "status").await != "failed" {
        assert!(Instant::now() < deadline, "job {id} did not fail");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_is_503_when_the_only_worker_s_service_crash_loops() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nvml = testkit::fake_nvml::Control::new(dir.path().join("nvml-control"));
    let toml = "[connectors.comfyui]\ncommand = [\"/bin/sh\", \"-c\", \"echo boom; exit 1\"]\n\
                [supervisor]\ncrash_loop_failures = 3\ncrash_loop_window = \"1m\"\nbackoff_max = \"1s\"\n";
    let m = start(dir.path(), "cl1", &redis.url(), 1, toml, nvml.path(), &[]);
    let ready = wait_until(Duration::from_secs(30), "the crash loop on /ready", || {
        let (code, r) = futures_executor(get_json(m.port, "/ready"));
        (r["phase"] == "ready").then_some((code, r))
    });
    assert_eq!(ready.0, 503, "{}", ready.1);
    assert_eq!(
        ready.1["not_claiming"]["cl1-gpu0"], "comfyui-gpu0 is in crash loop",
        "{}",
        ready.1
    );
    let (health, _) = http_get(m.port, "/health").await;
    assert_eq!(health, 200);
    let (out, stdout, stderr) = crate::support::run(
        machine()
            .args(["status", "--check"])
            .env("MACHINE_HEALTH_PORT", m.port.to_string()),
    );
    assert!(!out.status.success(), "{stdout}{stderr}");
    assert!(
        format!("{stdout}{stderr}").contains("comfyui-gpu0 is in crash loop"),
        "{stdout}{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lost_gpu_is_faulted_and_ready_says_why() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nvml = testkit::fake_nvml::Control::new(dir.path().join("nvml-control"));
    let m = start(dir.path(), "lost", &redis.url(), 1, &comfyui_toml(""), nvml.path(), &[]);
    until_ready(m.port).await;
    nvml.lose(0);
    let ready = wait_until(Duration::from_secs(10), "/ready to refuse", || {
        let (code, r) = futures_executor(get_json(m.port, "/ready"));
        (code == 503).then_some(r)
    });
    let why = ready["not_claiming"]["lost-gpu0"].as_str().unwrap();
    assert!(why.contains("GPU is lost"), "{ready}");
    let (health, _) = http_get(m.port, "/health").await;
    assert_eq!(health, 200, "the machine runs on; only its GPU is gone");
    let (_, metrics) = http_get(m.port, "/metrics").await;
    assert!(
        metrics.contains("machine_worker_held{worker=\"lost-gpu0\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("machine_worker_quarantined{worker=\"lost-gpu0\"} 0"),
        "{metrics}"
    );
    let url = format!("http://127.0.0.1:{}", m.port);
    let (out, stdout, stderr) = crate::support::run(machine().args(["status", "--url", &url]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("FAULTED: GPU is lost"), "{stdout}");
}

/// A GPU worker that a reload added is the one a fault on its GPU isolates: its service stops
/// (the fault handler follows the running plan, not the plan of the start).
#[tokio::test(flavor = "multi_thread")]
async fn a_fault_after_a_reload_is_handled_against_the_new_workers() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let nvml = testkit::fake_nvml::Control::new(dir.path().join("nvml-control"));
    let m = start(
        dir.path(),
        "rlx",
        &redis.url(),
        1,
        &comfyui_toml(""),
        nvml.path(),
        &[("WORKER_CONNECTORS", "simulation:1")],
    );
    until_ready(m.port).await;
    std::fs::write(dir.path().join("ws/worker_connectors"), "comfyui\n").unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(m.child.id()).unwrap()),
        nix::sys::signal::Signal::SIGHUP,
    )
    .unwrap();
    let service_state = |state: &'static str| {
        move || {
            let (_, s) = futures_executor(get_json(m.port, "/status"));
            s["services"]
                .as_array()?
                .iter()
                .find(|v| v["name"] == "comfyui-gpu0")
                .filter(|v| v["state"] == state)
                .cloned()
        }
    };
    wait_until(
        Duration::from_secs(30),
        "the reload's ComfyUI to run",
        service_state("running"),
    );
    nvml.xid(0, 79);
    wait_until(
        Duration::from_secs(20),
        "the faulted GPU's service to stop",
        service_state("stopped"),
    );
}

//! Services under real faults, on the real binary: `machine run` supervises the fake ComfyUI
//! (`examples/fake_comfyui.rs`) as its own process, as it supervises ComfyUI, and the tests do
//! to it what happens to ComfyUI in production: SIGSTOP mid-job, a cancel while a node without
//! progress hook runs, a crash loop that an operator fixes. Each test checks the time the
//! machine takes to notice, against a real Redis.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use redis::AsyncCommands;
use serde_json::{Value, json};

use crate::e2e::{fake_comfyui, http_get, submit, two_free_ports};
use crate::support::{machine, run};

/// A `machine run` with one fake GPU serving `comfyui`; killed (with its services) on drop.
struct Machine {
    child: crate::support::KillOnDrop,
    port: u16,
    redis_url: String,
    dir: tempfile::TempDir,
}

impl Machine {
    /// Starts the machine with `toml` as its configuration file (`{fake}` is replaced with the
    /// fake ComfyUI's path).
    fn start(redis_url: &str, toml: &str) -> Machine {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("machine.toml");
        std::fs::write(&config, toml.replace("{fake}", &fake_comfyui().display().to_string())).unwrap();
        let log = std::fs::File::create(dir.path().join("machine.log")).unwrap();
        let port = testkit::free_port();
        let child = machine()
            .arg("run")
            .env("MACHINE_CONFIG", &config)
            .env("MACHINE_ID", "f")
            .env("MACHINE_WORKSPACE", dir.path().join("ws"))
            .env("MACHINE_HEALTH_PORT", port.to_string())
            .env("HUB_REDIS_URL", redis_url)
            .env("WORKER_CONNECTORS", "comfyui")
            .env("COMFYUI_BASE_PORT", two_free_ports().to_string())
            .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
            .env("FAKE_NVML_GPUS", "1")
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        Machine {
            child: child.into(),
            port,
            redis_url: redis_url.to_owned(),
            dir,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.path("machine.log")).unwrap_or_default()
    }

    /// A `machine` command that finds this machine through its workspace's control socket.
    fn cli(&self, args: &[&str]) -> (bool, String, String) {
        let (out, stdout, stderr) = run(machine().env("MACHINE_WORKSPACE", self.path("ws")).args(args));
        (out.status.success(), stdout, stderr)
    }

    async fn status(&self) -> Value {
        let (_, body) = http_get(self.port, "/status").await;
        serde_json::from_str(&body).unwrap_or(Value::Null)
    }

    /// The `comfyui-gpu0` entry of `/status`.
    async fn comfyui(&self) -> Value {
        let status = self.status().await;
        status["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "comfyui-gpu0").cloned())
            .unwrap_or(Value::Null)
    }

    async fn wait_ready(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let (code, body) = http_get(self.port, "/ready").await;
            if code == 200 {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the machine never became ready: {body}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn submit(&self, payload: &Value) -> String {
        submit(
            &self.redis_url,
            &["--service", "comfyui", "--payload", &payload.to_string()],
        )
    }
}

async fn job(conn: &mut redis::aio::MultiplexedConnection, id: &str) -> BTreeMap<String, String> {
    conn.hgetall(format!("job:{id}")).await.unwrap()
}

/// Waits until job `id` has `status` (within `within`) and returns its hash.
async fn wait_status(
    conn: &mut redis::aio::MultiplexedConnection,
    id: &str,
    status: &str,
    within: Duration,
) -> BTreeMap<String, String> {
    let deadline = Instant::now() + within;
    loop {
        let j = job(conn, id).await;
        if j.get("status").map(String::as_str) == Some(status) {
            return j;
        }
        assert!(Instant::now() < deadline, "job {id} never became {status}: {j:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn comfyui_config(extra: &str) -> String {
    format!(
        r#"
[connectors.comfyui]
command = ["{{fake}}", "--port", "{{port}}"]
{extra}
"#
    )
}

/// SIGSTOPs ComfyUI while a job runs and checks that the job leaves `in_progress` within the
/// stall timeout plus 5 s, that `/ready` names the frozen service meanwhile (which still shows
/// as running, not `starting`), and that the frozen process is killed without a grace period.
async fn a_frozen_comfyui_is_caught(stall_timeout: Option<u64>) {
    let redis = testkit::RedisServer::start();
    let client = redis::Client::open(redis.url().as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let extra = stall_timeout.map_or_else(String::new, |s| format!("stall_timeout = \"{s}s\""));
    let m = Machine::start(&redis.url(), &comfyui_config(&extra));
    m.wait_ready(Duration::from_secs(60)).await;

    // A job that reports progress every 100 ms for hours: only the freeze can stop it.
    let id = m.submit(&json!({"workflow": {
        "1": {"class_type": "KSampler", "inputs": {"steps": 1_000_000, "step_ms": 100}},
        "9": {"class_type": "SaveImage", "inputs": {}}
    }}));
    wait_status(&mut conn, &id, "in_progress", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = m.comfyui().await["pid"].as_u64().expect("comfyui runs") as i32;
    kill(Pid::from_raw(pid), Signal::SIGSTOP).unwrap();
    let frozen_at = Instant::now();

    let timeout = Duration::from_secs(stall_timeout.unwrap_or(120));
    let mut named_on_ready = false;
    let mut shown_starting = false;
    let ended = loop {
        // Given back as a service fault, the job may be claimed again at once (no delay), so
        // its fault count says it left as well as its status.
        let j = job(&mut conn, &id).await;
        if j.get("status").map(String::as_str) != Some("in_progress") || j.contains_key("service_faults") {
            break j;
        }
        assert!(
            frozen_at.elapsed() <= timeout + Duration::from_secs(5),
            "the job is still in progress {:?} after ComfyUI froze (stall timeout {timeout:?}): {j:?}\n{}",
            frozen_at.elapsed(),
            m.log()
        );
        let (code, body) = http_get(m.port, "/ready").await;
        named_on_ready |= code == 503 && body.contains("comfyui-gpu0");
        let service = m.comfyui().await;
        shown_starting |= service["pid"].as_u64() == Some(pid as u64) && service["state"] == "starting";
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let left = frozen_at.elapsed();
    assert!(left <= timeout + Duration::from_secs(5), "{left:?}");
    assert!(
        named_on_ready,
        "/ready never answered 503 naming the frozen comfyui-gpu0"
    );
    assert!(
        !shown_starting,
        "a frozen process up for a while was shown as `starting`"
    );
    if stall_timeout.is_some() {
        // The first stall of a job is given back as a service fault, with the reason kept.
        let reasons = ended.get("machine_return_reasons").cloned().unwrap_or_default();
        assert!(reasons.contains("said nothing"), "{ended:?}");
        assert_eq!(ended.get("retry_count").map(String::as_str), Some("0"), "{ended:?}");
    }

    // The frozen process goes without a grace period (10 s by default): a new one serves soon.
    let deadline = Instant::now() + Duration::from_secs(8);
    loop {
        let service = m.comfyui().await;
        let now = service["pid"].as_u64();
        if now.is_some() && now != Some(pid as u64) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the frozen ComfyUI was not replaced within 8 s of its job's end: {service}\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(m.log().contains("without grace"), "{}", m.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_comfyui_is_caught_by_a_20s_stall_timeout() {
    a_frozen_comfyui_is_caught(Some(20)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_frozen_comfyui_is_caught_by_the_default_stall_timeout() {
    a_frozen_comfyui_is_caught(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_claimed_right_after_a_cancel_waits_until_comfyui_is_idle() {
    let redis = testkit::RedisServer::start();
    let client = redis::Client::open(redis.url().as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    // A short stall timeout: a job sent to a ComfyUI still busy with the cancelled prompt would
    // wait behind it in silence and stall.
    let m = Machine::start(&redis.url(), &comfyui_config("stall_timeout = \"2s\""));
    m.wait_ready(Duration::from_secs(60)).await;

    // A node that works 6 s without a word and without looking at interrupts (the job raises
    // its own stall timeout), as an upstream VAE decode does.
    let first = m.submit(&json!({
        "workflow": {
            "1": {"class_type": "VAEDecode", "inputs": {"busy_ms": 6000}},
            "9": {"class_type": "SaveImage", "inputs": {}}
        },
        "stall_timeout_seconds": 60
    }));
    wait_status(&mut conn, &first, "in_progress", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (ok, _, stderr) = m.cli(&["jobs", "cancel", &first, "--redis-url", &redis.url()]);
    assert!(ok, "{stderr}");
    let second = m.submit(&json!({"workflow": {"9": {"class_type": "SaveImage", "inputs": {}}}}));
    let done = wait_status(&mut conn, &second, "completed", Duration::from_secs(40)).await;
    assert_eq!(
        done.get("retry_count").map(String::as_str).unwrap_or("0"),
        "0",
        "the second job was sent to a busy ComfyUI and stalled: {done:?}\n{}",
        m.log()
    );
    assert!(m.log().contains("the service is idle again"), "{}", m.log());
}

/// `sh -c` that fails (saying why) until the file `fixed` exists, then becomes the fake.
fn crashing_until_fixed(fixed: &Path) -> String {
    format!(
        r#"command = ["/bin/sh", "-c", "if [ ! -e {fixed} ]; then echo 'OSError: [Errno 98] address already in use'; exit 1; fi; exec {{fake}} --port {{port}}"]"#,
        fixed = fixed.display()
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn restarting_a_crash_looping_service_clears_its_crash_loop_and_names_its_cause() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fixed");
    // The next automatic try is 30 s away once in crash loop, and a run must last the default
    // `stable_after` (60 s) to end it on its own: only the operator's restart can be quick.
    let toml = format!(
        r#"
[connectors.comfyui]
{}
[supervisor]
crash_loop_failures = 2
crash_loop_window = "1m"
backoff_max = "30s"
"#,
        crashing_until_fixed(&fixed)
    );
    let m = Machine::start(&redis.url(), &toml);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let s = m.comfyui().await;
        if s["crash_loop"] == true && s["state"] == "backoff" {
            let reason = s["reason"].as_str().unwrap_or_default();
            assert!(
                reason.contains("exited with code 1") && reason.contains("address already in use"),
                "REASON is not the last exit's cause: {s}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "never in crash loop: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // `logs` and `restart` take the connector's name; an unknown name lists the valid ones.
    let (ok, out, stderr) = m.cli(&["logs", "comfyui"]);
    assert!(ok && out.contains("address already in use"), "{out}{stderr}");
    let (ok, _, stderr) = m.cli(&["logs", "nosuch"]);
    assert!(!ok && stderr.contains("comfyui-gpu0"), "{stderr}");

    std::fs::write(&fixed, "").unwrap();
    let (ok, out, stderr) = m.cli(&["restart", "comfyui"]);
    assert!(ok, "{stderr}");
    assert!(out.contains("restarted comfyui-gpu0"), "{out}");
    let restarted = Instant::now();
    loop {
        let s = m.comfyui().await;
        if s["state"] == "running" && s["ready"] == true {
            assert_eq!(s["crash_loop"], false, "the restart left the crash loop on: {s}");
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "not running 10 s after the restart: {s}\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(m.log().contains("the crash loop is over"), "{}", m.log());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_warm_up_runs_as_soon_as_a_crash_looping_comfyui_serves_and_the_ready_line_follows_ready() {
    let redis = testkit::RedisServer::start();
    let dir = tempfile::tempdir().unwrap();
    let fixed = dir.path().join("fixed");
    let warmup = dir.path().join("warmup.json");
    std::fs::write(
        &warmup,
        json!({"9": {"class_type": "SaveImage", "inputs": {}}}).to_string(),
    )
    .unwrap();
    let toml = format!(
        r#"
[connectors.comfyui]
{}
warmup = "{}"
[supervisor]
crash_loop_failures = 2
crash_loop_window = "1m"
backoff_max = "1s"
"#,
        crashing_until_fixed(&fixed),
        warmup.display()
    );
    let started = Instant::now();
    let m = Machine::start(&redis.url(), &toml);
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.comfyui().await["crash_loop"] != true {
        assert!(Instant::now() < deadline, "never in crash loop");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    std::fs::write(&fixed, "").unwrap();
    let fixed_after = started.elapsed();

    // From the moment it serves (crash-loop flag still up for `stable_after`) to the worker
    // claiming after its warm-up.
    let deadline = Instant::now() + Duration::from_secs(20);
    let serving = loop {
        let s = m.comfyui().await;
        if s["state"] == "running" && s["ready"] == true {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "never served: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    m.wait_ready(Duration::from_secs(20)).await;
    let warmed = serving.elapsed();
    assert!(
        warmed < Duration::from_secs(2),
        "the worker claimed {warmed:?} after its ComfyUI served\n{}",
        m.log()
    );
    assert!(m.log().contains("warm-up done"), "{}", m.log());

    // The ready line says when `/ready` became 200, which was after the fix at the earliest.
    // It is written by the task that watches readiness, which may run a moment after `/ready`
    // answered (seen under a loaded full suite).
    let deadline = Instant::now() + Duration::from_secs(5);
    let log = loop {
        let log = m.log();
        if log.contains("machine ready in") {
            break log;
        }
        assert!(Instant::now() < deadline, "no ready line:\n{log}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let line = log
        .lines()
        .find(|l| l.contains("machine ready in"))
        .expect("a ready line");
    let secs: f64 = line
        .split("machine ready in ")
        .nth(1)
        .and_then(|r| r.split('s').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        secs >= fixed_after.as_secs_f64() - 0.5,
        "`{line}` before the service could serve ({fixed_after:?})"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn machine_install_is_refused_while_a_machine_runs_on_the_workspace() {
    let redis = testkit::RedisServer::start();
    let m = Machine::start(&redis.url(), &comfyui_config(""));
    m.wait_ready(Duration::from_secs(60)).await;
    let (out, stdout, stderr) = run(machine()
        .env("MACHINE_WORKSPACE", m.path("ws"))
        .env("WORKER_CONNECTORS", "comfyui")
        .args(["install", "--only", "comfyui"]));
    assert!(!out.status.success(), "{stdout}{stderr}");
    let pid = m.child.id().to_string();
    assert!(
        stderr.contains("refusing to install") && stderr.contains(&format!("pid {pid}")),
        "{stderr}"
    );
    assert!(
        !m.path("ws/ComfyUI").exists(),
        "the refused install touched the workspace"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_job_whose_comfyui_is_killed_runs_again_as_soon_as_comfyui_is_back_and_a_second_kill_is_its_own() {
    let redis = testkit::RedisServer::start();
    let client = redis::Client::open(redis.url().as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let m = Machine::start(&redis.url(), &comfyui_config(""));
    m.wait_ready(Duration::from_secs(60)).await;
    let id = m.submit(&json!({"workflow": {
        "1": {"class_type": "KSampler", "inputs": {"steps": 30, "step_ms": 100}},
        "9": {"class_type": "SaveImage", "inputs": {}}
    }}));

    // kill -9 mid-job, and wait for the new ComfyUI to serve.
    let kill_mid_job = |pid: u64| kill(Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    wait_status(&mut conn, &id, "in_progress", Duration::from_secs(20)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let pid = m.comfyui().await["pid"].as_u64().expect("comfyui runs");
    kill_mid_job(pid);
    let deadline = Instant::now() + Duration::from_secs(30);
    let back = loop {
        let s = m.comfyui().await;
        if s["state"] == "running" && s["ready"] == true && s["pid"].as_u64().is_some_and(|p| p != pid) {
            break Instant::now();
        }
        assert!(Instant::now() < deadline, "ComfyUI never came back: {s}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // The job did nothing wrong: no retry spent, no delay, no hold-off of this worker.
    let done = wait_status(&mut conn, &id, "completed", Duration::from_secs(30)).await;
    assert!(
        back.elapsed() < Duration::from_secs(15),
        "completed {:?} after ComfyUI was back\n{}",
        back.elapsed(),
        m.log()
    );
    assert_eq!(
        done.get("retry_count").map(String::as_str).unwrap_or("0"),
        "0",
        "{done:?}"
    );
    assert_eq!(done["service_faults"], "1", "{done:?}");

    // A job whose ComfyUI dies a second time (on any machine) is suspected: a retry spent.
    let second = m.submit(&json!({"workflow": {
        "1": {"class_type": "KSampler", "inputs": {"steps": 100, "step_ms": 100}},
        "9": {"class_type": "SaveImage", "inputs": {}}
    }}));
    for _ in 0..2 {
        let deadline = Instant::now() + Duration::from_secs(30);
        let pid = loop {
            let j = job(&mut conn, &second).await;
            let s = m.comfyui().await;
            if j.get("status").map(String::as_str) == Some("in_progress") && s["ready"] == true {
                break s["pid"].as_u64().expect("comfyui runs");
            }
            assert!(Instant::now() < deadline, "the job never ran again: {j:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        tokio::time::sleep(Duration::from_millis(500)).await;
        let faults = |j: &BTreeMap<String, String>| j.get("service_faults").cloned();
        let before = faults(&job(&mut conn, &second).await);
        kill_mid_job(pid);
        // The first return is free (no delay), so the job may be claimed again within
        // milliseconds: its fault count says it left as well as its status.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let j = job(&mut conn, &second).await;
            if j.get("status").map(String::as_str) != Some("in_progress") || faults(&j) != before {
                break;
            }
            assert!(Instant::now() < deadline, "the job stayed in progress");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let j = job(&mut conn, &second).await;
    assert_eq!(j["service_faults"], "2", "{j:?}");
    assert_eq!(j["retry_count"], "1", "{j:?}");
}

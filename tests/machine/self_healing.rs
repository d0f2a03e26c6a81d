//! A machine that heals itself (issue 13, hung jobs): a job whose service goes silent is
//! interrupted and returned to the queue with the reason, then failed with it after its retries;
//! a long node that still reports progress is left alone. Against the protocol fakes of ComfyUI
//! and A1111 and a real redis-server, with stall timeouts shortened to fractions of a second.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::job;
use machine::broker::{Broker, BrokerOptions, Capabilities, NewJob};
use machine::config::RedisUrl;
use machine::connectors::a1111::A1111Connector;
use machine::connectors::comfyui::ComfyuiConnector;
use machine::connectors::store::OutputStore;
use machine::connectors::{Connector, ConnectorError, ErrorClass, Job, JobOutput, ProgressSink};
use machine::worker::{Worker, WorkerSettings};
use serde_json::{Value, json};
use testkit::{FakeA1111, FakeComfyui, RedisServer};
use tokio_util::sync::CancellationToken;

/// The stall timeout of these tests.
const STALL: Duration = Duration::from_millis(400);

async fn run(c: &dyn Connector, job: &Job) -> Result<JobOutput, ConnectorError> {
    let (sink, _rx) = ProgressSink::new();
    tokio::time::timeout(Duration::from_secs(30), c.run(job, &sink, &CancellationToken::new()))
        .await
        .expect("the connector finishes within the test's limit")
}

fn comfy(fake: &FakeComfyui) -> ComfyuiConnector {
    ComfyuiConnector::new(fake.url().parse().expect("a fake's URL parses")).with_stall_timeout(STALL)
}

/// A workflow with `node` between a loader and a saver.
fn workflow(node: Value) -> Value {
    json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"cached": true}},
        "5": node,
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "healed"}}
    })
}

#[tokio::test]
async fn a_silent_comfyui_prompt_is_interrupted_as_stalled() {
    let fake = FakeComfyui::start();
    let started = Instant::now();
    let r = run(
        &comfy(&fake),
        &job("comfyui", workflow(json!({"class_type": "FakeStall", "inputs": {}}))),
    )
    .await;
    let e = r.expect_err("a silent prompt stalls");
    assert!(matches!(e, ConnectorError::Stalled { answers: true, .. }), "{e:?}");
    assert_eq!(e.class(), ErrorClass::Retryable);
    assert!(e.to_string().contains("comfyui said nothing about the job for"), "{e}");
    assert!(fake.interrupts() >= 1, "ComfyUI was asked to interrupt the prompt");
    let took = started.elapsed();
    assert!(took >= STALL && took < STALL * 10, "stalled after {took:?}");
    // The interrupted prompt left the fake; the next job runs.
    let ok = run(
        &comfy(&fake),
        &job(
            "comfyui",
            workflow(json!({"class_type": "KSampler", "inputs": {"steps": 2}})),
        ),
    )
    .await;
    assert!(ok.is_ok(), "{ok:?}");
}

#[tokio::test]
async fn a_wedged_comfyui_is_reported_as_not_answering() {
    let fake = FakeComfyui::start();
    let e = run(
        &comfy(&fake),
        &job(
            "comfyui",
            workflow(json!({"class_type": "FakeStall", "inputs": {"hang": true}})),
        ),
    )
    .await
    .expect_err("a wedged server stalls");
    assert!(matches!(e, ConnectorError::Stalled { answers: false, .. }), "{e:?}");
    assert!(e.to_string().contains("does not answer its health check"), "{e}");
}

#[tokio::test]
async fn a_long_node_that_reports_progress_is_not_a_stall() {
    let fake = FakeComfyui::start();
    // Ten steps 150 ms apart: 1.5 s in all, far past the stall timeout, with a word every step.
    let node = json!({"class_type": "KSampler", "inputs": {"steps": 10, "step_ms": 150}});
    let started = Instant::now();
    let out = run(&comfy(&fake), &job("comfyui", workflow(node))).await;
    assert!(out.is_ok(), "{out:?}");
    assert!(started.elapsed() > STALL * 3);
    assert_eq!(fake.interrupts(), 0);
}

#[tokio::test]
async fn a_job_may_raise_its_stall_timeout() {
    let fake = FakeComfyui::start();
    // Silent for twice the connector's stall timeout, within the job's own.
    let node = json!({"class_type": "FakeStall", "inputs": {"silent_ms": 800}});
    let mut payload = json!({"workflow": workflow(node)});
    payload["stall_timeout_seconds"] = json!(5);
    let out = run(&comfy(&fake), &job("comfyui", payload)).await;
    assert!(out.is_ok(), "{out:?}");
    assert_eq!(fake.interrupts(), 0);
}

#[tokio::test]
async fn a1111_progress_that_stops_moving_is_a_stall_and_moving_progress_is_not() {
    let fake = FakeA1111::start();
    let c = A1111Connector::new(fake.url().parse().expect("a fake's URL parses"))
        .with_poll_period(Duration::from_millis(20))
        .with_stall_timeout(STALL);
    let e = run(&c, &job("a1111", json!({"prompt": "FAKE_STALL", "steps": 5})))
        .await
        .expect_err("a generation whose progress stops moving stalls");
    assert!(matches!(e, ConnectorError::Stalled { answers: true, .. }), "{e:?}");
    assert!(fake.interrupts() >= 1);
    let out = run(&c, &job("a1111", json!({"prompt": "slow", "steps": 8, "step_ms": 150}))).await;
    assert!(out.is_ok(), "1.2 s of moving progress is not a stall: {out:?}");
}

/// A worker (real broker, real Redis) runs a ComfyUI job that stalls on every attempt: each
/// attempt is returned to the queue with the reason, and once its retries are spent the job
/// fails with it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_that_stalls_every_time_fails_with_the_reason_after_its_retries() {
    let server = RedisServer::start();
    let url = RedisUrl::parse(&server.url()).expect("testkit URLs are valid");
    let opts = BrokerOptions {
        failed_holdoff: Duration::from_millis(50),
        safety_poll: Duration::from_millis(200),
        ..BrokerOptions::default()
    };
    let broker = Broker::connect(&url, opts).await.expect("connect");
    broker.ensure_functions().await.expect("install the library");
    let shutdown = CancellationToken::new();
    let events = tokio::spawn({
        let (b, s) = (broker.clone(), shutdown.clone());
        async move { b.run_events(s).await.expect("the event loop ends cleanly") }
    });
    let fake = FakeComfyui::start();
    let dir = tempfile::tempdir().expect("temp dir");
    let connectors: HashMap<String, Arc<dyn Connector>> =
        HashMap::from([("comfyui".to_owned(), Arc::new(comfy(&fake)) as Arc<dyn Connector>)]);
    let settings = WorkerSettings {
        heartbeat: Duration::from_millis(200),
        drain: Duration::from_secs(2),
        job_timeout: Duration::from_secs(30),
        progress_every: Duration::from_secs(1),
    };
    let worker = Worker::new(
        Capabilities::new("w1", "m1", &["comfyui"]),
        connectors,
        settings,
        Arc::new(OutputStore::new(dir.path().join("outputs"))),
    );
    let task = tokio::spawn({
        let (b, s) = (broker.clone(), shutdown.clone());
        async move { worker.run(b, s).await.expect("the worker ends cleanly") }
    });
    let mut stalling = NewJob::new(
        "comfyui",
        json!({"workflow": workflow(json!({"class_type": "FakeStall", "inputs": {}}))}),
    );
    stalling.max_retries = 2;
    let id = broker.submit(&stalling).await.expect("submit");
    let job = wait_for_status(&broker, &id, "failed").await;
    assert_eq!(
        job["retry_count"], "2",
        "returned once with the reason, then failed: {job:?}"
    );
    assert!(job["error"].contains("said nothing about the job"), "{job:?}");
    // The first stall may be the service's fault: it is given back without spending a retry.
    // From the second on the job is suspected of stalling its service and each is its own.
    assert_eq!(job["service_faults"], "3", "{job:?}");
    assert_eq!(fake.prompts_accepted(), 3, "each attempt ran");
    assert!(fake.interrupts() >= 3, "each attempt was interrupted");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(20), task)
        .await
        .expect("the worker stops")
        .expect("the worker does not panic");
    events.await.expect("the event loop does not panic");
}

async fn wait_for_status(broker: &Broker, id: &str, status: &str) -> BTreeMap<String, String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let job = broker
            .show(id)
            .await
            .expect("show")
            .expect("the job exists")
            .job
            .stored()
            .clone();
        if job.get("status").map(String::as_str) == Some(status) {
            return job;
        }
        assert!(Instant::now() < deadline, "job {id} never became {status}: {job:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `machine run` (not as PID 1) with one fake GPU whose ComfyUI service is the fake ComfyUI,
/// `[connectors.comfyui]` extended by `comfyui`; killed on drop.
struct Machine {
    _child: crate::support::KillOnDrop,
    port: u16,
    comfy_port: u16,
    redis: RedisServer,
    conn: redis::aio::MultiplexedConnection,
    _dir: tempfile::TempDir,
}

impl Machine {
    async fn start(comfyui: &str) -> Machine {
        let m = Machine::spawn(comfyui, "").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while crate::e2e::http_get(m.port, "/ready").await.0 != 200 {
            assert!(Instant::now() < deadline, "the machine never became ready");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        m
    }

    /// Starts the machine with `comfyui` under `[connectors.comfyui]` and `extra` at the end of
    /// its configuration, without waiting for it to be ready.
    async fn spawn(comfyui: &str, extra: &str) -> Machine {
        Machine::spawn_running(comfyui, extra, "comfyui").await
    }

    /// As [`Machine::spawn`], running the `connectors` (`WORKER_CONNECTORS`).
    async fn spawn_running(comfyui: &str, extra: &str, connectors: &str) -> Machine {
        let redis = RedisServer::start();
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("machine.toml");
        std::fs::write(
            &config,
            format!(
                "[connectors.comfyui]\ncommand = [\"{fake}\", \"--port\", \"{{port}}\"]\n{comfyui}\n[worker]\ndrain = \"1s\"\n[worker.retry_delay]\ninitial = \"100ms\"\n{extra}\n",
                fake = crate::e2e::fake_comfyui().display()
            ),
        )
        .expect("write the config");
        let port = testkit::free_port();
        let comfy_port = testkit::free_port();
        let child = crate::support::machine()
            .arg("run")
            .env("MACHINE_CONFIG", &config)
            .env("MACHINE_ID", "heal")
            .env("MACHINE_WORKSPACE", dir.path().join("ws"))
            .env("MACHINE_HEALTH_PORT", port.to_string())
            .env("HUB_REDIS_URL", redis.url())
            .env("WORKER_CONNECTORS", connectors)
            .env("COMFYUI_BASE_PORT", comfy_port.to_string())
            .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
            .env("FAKE_NVML_GPUS", "1")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("machine.log")).expect("a log file"))
            .spawn()
            .expect("the machine starts");
        let conn = redis::Client::open(redis.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        Machine {
            _child: child.into(),
            port,
            comfy_port,
            redis,
            conn,
            _dir: dir,
        }
    }

    /// The completion record of a completed job.
    async fn completion(&mut self, id: &str) -> String {
        redis::AsyncCommands::hget(&mut self.conn, "jobs:completed", id)
            .await
            .expect("a completion record")
    }

    /// Submits through `machine jobs submit`; `max_retries` counts retries after the first attempt.
    fn submit(&self, payload: &Value, max_retries: u32) -> String {
        crate::e2e::submit(
            &self.redis.url(),
            &[
                "--service",
                "comfyui",
                "--max-retries",
                &max_retries.to_string(),
                "--payload",
                &payload.to_string(),
            ],
        )
    }

    async fn job(&mut self, id: &str) -> BTreeMap<String, String> {
        redis::AsyncCommands::hgetall(&mut self.conn, format!("job:{id}"))
            .await
            .expect("read the job")
    }

    /// Waits until the job reaches `status`.
    async fn wait_job(&mut self, id: &str, status: &str) -> BTreeMap<String, String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let j = self.job(id).await;
            if j.get("status").map(String::as_str) == Some(status) {
                return j;
            }
            assert!(Instant::now() < deadline, "job {id} never became {status}: {j:?}");
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The planned restarts of `comfyui-gpu0` for `reason`, from `/metrics`.
    async fn planned_restarts(&self, reason: &str) -> u64 {
        let (_, metrics) = crate::e2e::http_get(self.port, "/metrics").await;
        let line = format!("machine_service_planned_restarts_total{{service=\"comfyui-gpu0\",reason=\"{reason}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line)?.trim().parse().ok())
            .unwrap_or(0)
    }

    /// `comfyui-gpu0` as `/status` shows it.
    async fn service(&self) -> Value {
        let (_, body) = crate::e2e::http_get(self.port, "/status").await;
        let doc: Value = serde_json::from_str(&body).expect("/status is JSON");
        doc["services"]
            .as_array()
            .and_then(|s| s.iter().find(|s| s["name"] == "comfyui-gpu0").cloned())
            .expect("the ComfyUI service is on /status")
    }

    async fn wait_planned(&self, reason: &str, n: u64) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while self.planned_restarts(reason).await < n {
            assert!(Instant::now() < deadline, "never {n} planned restart(s) for {reason}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A ComfyUI worker that a reload adds has the upkeep of its service, as one built at start
/// does: `restart_every_jobs = 1` restarts the service after its first job, between jobs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_added_by_a_reload_has_its_service_kept_up() {
    let mut m = Machine::spawn_running("restart_every_jobs = 1", "", "simulation:1").await;
    let ws = m._dir.path().join("ws");
    let deadline = Instant::now() + Duration::from_secs(60);
    while crate::e2e::http_get(m.port, "/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "the machine never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    std::fs::write(ws.join("worker_connectors"), "simulation:1,comfyui\n").expect("write the connectors");
    let (out, stdout, stderr) = crate::support::run(
        crate::support::machine()
            .arg("reload")
            .env("MACHINE_WORKSPACE", &ws)
            .env("MACHINE_HEALTH_PORT", m.port.to_string())
            .env_remove("MACHINE_CONTROL_TOKEN"),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(stdout.contains("heal-gpu0"), "the ComfyUI worker is added: {stdout}");
    let id = m.submit(&quick_workflow(), 0);
    m.wait_job(&id, "completed").await;
    m.wait_planned("every_jobs", 1).await;
    let id = m.submit(&quick_workflow(), 0);
    let j = m.wait_job(&id, "completed").await;
    assert_eq!(j["retry_count"], "0", "no job failed: {j:?}");
}

fn quick_workflow() -> Value {
    json!({"workflow": workflow(json!({"class_type": "KSampler", "inputs": {"steps": 2, "step_ms": 5}}))})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_every_jobs_restarts_comfyui_between_jobs_and_fails_none() {
    let mut m = Machine::start("restart_every_jobs = 2").await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let id = m.submit(&quick_workflow(), 0);
        // One after the other, so the restarts fall between known jobs.
        let j = m.wait_job(&id, "completed").await;
        assert_eq!(j["retry_count"], "0", "no job failed: {j:?}");
        ids.push(id);
    }
    m.wait_planned("every_jobs", 2).await;
    let svc = m.service().await;
    assert_eq!(svc["restarts"], 2, "{svc}");
    assert_eq!(m.planned_restarts("rss").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_whose_memory_grows_past_its_limit_is_restarted_between_jobs() {
    let mut m = Machine::start("restart_above_rss = 209715200").await;
    // The job leaves 300 MiB behind in the service, resident.
    let grow = json!({"workflow": workflow(json!({"class_type": "FakeGrow", "inputs": {"mb": 300}}))});
    let id = m.submit(&grow, 0);
    let j = m.wait_job(&id, "completed").await;
    assert_eq!(j["retry_count"], "0", "{j:?}");
    m.wait_planned("rss", 1).await;
    // The fresh service is small again and the next job runs on it.
    let id = m.submit(&quick_workflow(), 0);
    m.wait_job(&id, "completed").await;
    assert_eq!(m.planned_restarts("rss").await, 1, "a fresh service is below the limit");
    assert!(m.service().await["restarts"].as_u64() >= Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wedged_comfyui_is_restarted_before_the_next_claim_and_its_stalled_job_fails_with_the_reason() {
    let mut m = Machine::start("stall_timeout = \"1s\"").await;
    let wedge = json!({"workflow": workflow(json!({"class_type": "FakeStall", "inputs": {"hang": true}}))});
    // No retry: the first stall gives the job back without spending one (the service may be at
    // fault), the second fails it.
    let id = m.submit(&wedge, 0);
    let j = m.wait_job(&id, "failed").await;
    assert_eq!(j["retry_count"], "1", "{j:?}");
    assert_eq!(j["service_faults"], "2", "{j:?}");
    assert!(
        j["error"].contains("said nothing about the job") && j["error"].contains("does not answer its health check"),
        "{j:?}"
    );
    // The attempt wedged the service; it was restarted before the next claim, which runs.
    m.wait_planned("unresponsive", 1).await;
    let id = m.submit(&quick_workflow(), 0);
    m.wait_job(&id, "completed").await;
}

/// A warm-up workflow in a file, as `[connectors.comfyui] warmup` names it.
fn warmup_file(dir: &std::path::Path, node: Value) -> String {
    let path = dir.join("warmup.json");
    let w = json!({"5": node, "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "warmup"}}});
    std::fs::write(&path, w.to_string()).expect("write the warm-up workflow");
    path.display().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_up_runs_before_the_first_claim_and_after_every_restart() {
    let dir = tempfile::tempdir().expect("temp dir");
    // A warm-up of about two seconds, so that the reports can be seen saying so.
    let warmup = warmup_file(
        dir.path(),
        json!({"class_type": "KSampler", "inputs": {"steps": 20, "step_ms": 100}}),
    );
    let mut m = Machine::spawn(&format!("warmup = \"{warmup}\"\nrestart_every_jobs = 1"), "").await;
    // The warm-up is told on /status, in `machine status` and in the fleet message.
    let reason = "warming up comfyui-gpu0";
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut on_status, mut on_cli, mut on_fleet) = (false, false, false);
    while !(on_status && on_cli && on_fleet) {
        let (_, body) = crate::e2e::http_get(m.port, "/status").await;
        let doc: Value = serde_json::from_str(&body).unwrap_or_default();
        on_status |= doc["workers"][0]["reason"].as_str() == Some(reason);
        let (_, stdout, _) = crate::support::run(
            crate::support::machine()
                .arg("status")
                .env("MACHINE_WORKSPACE", m._dir.path().join("ws"))
                .env("MACHINE_HEALTH_PORT", m.port.to_string())
                .env("COLUMNS", "200"),
        );
        on_cli |= stdout.contains(reason);
        let fleet: Option<String> = redis::AsyncCommands::get(&mut m.conn, "machine:heal:status")
            .await
            .expect("read the fleet message");
        let fleet: Value = fleet.and_then(|f| serde_json::from_str(&f).ok()).unwrap_or_default();
        on_fleet |= fleet["status"]["workers"]["heal-gpu0"]["reason"].as_str() == Some(reason);
        assert!(
            Instant::now() < deadline,
            "the warm-up was not told everywhere: /status {on_status}, machine status {on_cli}, fleet {on_fleet}: {body}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let job = json!({"workflow": {"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "job"}}}});
    for round in 0..2 {
        let id = m.submit(&job, 0);
        m.wait_job(&id, "completed").await;
        // The fake numbers its prompts and outputs with one counter per process: the warm-up of
        // this run of ComfyUI took 0 (prompt) and 1 (image), so the job (2, 3) came after it.
        let record = m.completion(&id).await;
        assert!(record.contains("job_00003_.png"), "round {round}: {record}");
        m.wait_planned("every_jobs", round + 1).await;
    }
    let (_, metrics) = crate::e2e::http_get(m.port, "/metrics").await;
    assert!(
        metrics.contains("machine_service_warmup_seconds{service=\"comfyui-gpu0\"}"),
        "{metrics}"
    );
    let view = "/view?filename=warmup_00001_.png&subfolder=&type=output";
    // The last job's planned restart warms the next run up too, without any job to wait for.
    let deadline = Instant::now() + Duration::from_secs(30);
    while crate::e2e::http_get(m.comfy_port, view).await.0 != 200 {
        assert!(Instant::now() < deadline, "the last restart never warmed up");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_warm_up_is_a_failed_start_that_ends_in_crash_loop_with_its_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let warmup = warmup_file(
        dir.path(),
        json!({"class_type": "FakeError", "inputs": {"exception_type": "RuntimeError", "message": "warm-up boom"}}),
    );
    let mut m = Machine::spawn(
        &format!("warmup = \"{warmup}\""),
        "[supervisor]\ncrash_loop_failures = 2\nbackoff_initial = \"50ms\"\nbackoff_max = \"200ms\"\n",
    )
    .await;
    let id = m.submit(&quick_workflow(), 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let svc = loop {
        let (code, body) = crate::e2e::http_get(m.port, "/status").await;
        if code == 200 {
            let svc = m.service().await;
            if svc["crash_loop"] == true {
                break svc;
            }
        }
        assert!(Instant::now() < deadline, "never in crash loop: {body}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let reason = svc["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("warm-up failed") && reason.contains("warm-up boom"),
        "{svc}"
    );
    assert_eq!(
        m.job(&id).await["status"],
        "pending",
        "no job is claimed before a warm-up succeeds"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_gpu_using_more_memory_than_allowed_has_its_service_restarted() {
    // The fake NVML reports 256 MiB used on GPU 0, above this 100 MiB limit: the idle worker's
    // ComfyUI is restarted while no job runs.
    let m = Machine::start("restart_above_idle_vram = 104857600").await;
    m.wait_planned("idle_vram", 1).await;
    assert_eq!(m.planned_restarts("every_jobs").await, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.service().await["restarts"].as_u64() < Some(1) {
        assert!(Instant::now() < deadline, "the service was never restarted");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

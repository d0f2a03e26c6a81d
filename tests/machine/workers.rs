//! Workers against a real redis-server (the jobMatching library loaded) and the protocol
//! fakes: every connector end to end, progress in order, each failure class, cancellation,
//! leases renewed past their period, shutdown returning a job, malformed payloads, readiness
//! gating, dropped Redis connections, and many jobs across several workers each run once.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use machine::broker::{Broker, BrokerOptions, Capabilities, NewJob};
use machine::config::{self, OpenaiConfig, RedisUrl, SimulationConfig};
use machine::connectors::Connector;
use machine::connectors::a1111::A1111Connector;
use machine::connectors::comfyui::ComfyuiConnector;
use machine::connectors::openai::OpenaiConnector;
use machine::connectors::simulation::SimulationConnector;
use machine::connectors::store::OutputStore;
use machine::gpu::{HostInfo, Probe};
use machine::plan::Plan;
use machine::worker::hold::HoldKind;
use machine::worker::{Readiness, UploadLimits, Worker, WorkerSettings, WorkerState, WorkerStatus, Workers};
use redis::AsyncCommands;
use serde_json::{Value, json};
use testkit::{ComfyuiSeen, FakeA1111, FakeComfyui, FakeOpenai, RedisServer, TINY_PNG};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::within;

/// Each test's hard limit.
const HARD_LIMIT: Duration = Duration::from_secs(120);

const LIMIT: Duration = Duration::from_secs(60);

/// A Redis with the library loaded, a broker with its event loop, and a temp dir for outputs.
struct Rig {
    server: RedisServer,
    broker: Broker,
    shutdown: CancellationToken,
    events: Option<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl Rig {
    async fn start(opts: BrokerOptions) -> Rig {
        let server = RedisServer::start();
        let url = RedisUrl::parse(&server.url()).expect("testkit URLs are valid");
        let broker = Broker::connect(&url, opts).await.expect("connect");
        broker.ensure_functions().await.expect("install the library");
        let shutdown = CancellationToken::new();
        let events = tokio::spawn({
            let b = broker.clone();
            let s = shutdown.clone();
            async move {
                b.run_events(s).await.expect("the event loop ends cleanly");
            }
        });
        Rig {
            server,
            broker,
            shutdown,
            events: Some(events),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn url(&self) -> String {
        self.server.url()
    }

    fn store(&self) -> Arc<OutputStore> {
        Arc::new(OutputStore::new(self.dir.path().join("outputs")))
    }

    /// A worker serving `services` through the given connectors.
    fn worker(&self, id: &str, connectors: &[(&str, Arc<dyn Connector>)], settings: WorkerSettings) -> Worker {
        let services: Vec<&str> = connectors.iter().map(|(s, _)| *s).collect();
        let caps = Capabilities::new(id, "m1", &services);
        let map: HashMap<String, Arc<dyn Connector>> =
            connectors.iter().map(|(s, c)| ((*s).to_owned(), c.clone())).collect();
        Worker::new(caps, map, settings, self.store())
    }

    fn spawn(&self, worker: Worker) -> (JoinHandle<()>, watch::Receiver<WorkerStatus>) {
        let status = worker.status();
        let broker = self.broker.clone();
        let shutdown = self.shutdown.clone();
        let task = tokio::spawn(async move {
            worker.run(broker, shutdown).await.expect("a worker ends cleanly");
        });
        (task, status)
    }

    async fn submit(&self, service: &str, payload: Value) -> String {
        self.submit_job(NewJob::new(service, payload)).await
    }

    async fn submit_job(&self, job: NewJob) -> String {
        self.broker.submit(&job).await.expect("submit")
    }

    async fn job(&self, id: &str) -> BTreeMap<String, String> {
        self.broker
            .show(id)
            .await
            .expect("show")
            .expect("the job exists")
            .job
            .stored()
            .clone()
    }

    /// Waits until the job's status is one of `statuses`; returns the job hash.
    async fn wait_status(&self, id: &str, statuses: &[&str]) -> BTreeMap<String, String> {
        let deadline = Instant::now() + LIMIT;
        loop {
            let job = self.job(id).await;
            if statuses.contains(&job.get("status").map(String::as_str).unwrap_or_default()) {
                return job;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never reached {statuses:?}: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn raw(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect")
    }

    async fn stop(mut self, workers: Vec<JoinHandle<()>>) {
        self.shutdown.cancel();
        for w in workers {
            tokio::time::timeout(LIMIT, w)
                .await
                .expect("workers stop after shutdown")
                .expect("worker tasks do not panic");
        }
        if let Some(e) = self.events.take() {
            e.await.expect("the event loop does not panic");
        }
    }
}

fn settings() -> WorkerSettings {
    WorkerSettings {
        heartbeat: Duration::from_millis(200),
        drain: Duration::from_secs(5),
        job_timeout: Duration::from_secs(30),
        progress_every: Duration::from_secs(1),
    }
}

fn simulation() -> Arc<dyn Connector> {
    Arc::new(SimulationConnector::new(SimulationConfig {
        duration: Duration::from_millis(20),
        steps: 4,
        failure_rate: 0.0,
    }))
}

fn quick_opts() -> BrokerOptions {
    BrokerOptions {
        failed_holdoff: Duration::from_millis(50),
        safety_poll: Duration::from_millis(500),
        ..BrokerOptions::default()
    }
}

async fn completed_record(rig: &Rig, id: &str) -> Value {
    let mut conn = rig.raw().await;
    let raw: String = conn.hget("jobs:completed", id).await.expect("a completion record");
    serde_json::from_str(&raw).expect("the record is JSON")
}

fn file_of(url: &str) -> std::path::PathBuf {
    std::path::PathBuf::from(url.strip_prefix("file://").expect("local outputs have file URLs"))
}

/// Waits briefly until the worker's job counts satisfy `ok`: the runner counts an outcome just
/// after Redis shows it, so reading the counts the instant Redis does races.
async fn counted(status: &watch::Receiver<WorkerStatus>, ok: impl Fn(&machine::worker::JobCounts) -> bool) {
    let mut st = status.clone();
    tokio::time::timeout(Duration::from_secs(5), st.wait_for(|s| ok(&s.counts)))
        .await
        .expect("the worker's counts catch up within 5 s")
        .expect("the worker's status channel is open");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_connector_end_to_end_through_redis() {
    within(HARD_LIMIT, async {
        // The progress stream is optional (off by default); on here, with every report written,
        // it holds the whole sequence.
        let rig = Rig::start(BrokerOptions {
            progress_stream: true,
            ..quick_opts()
        })
        .await;
        let comfy = FakeComfyui::start();
        let a1111 = FakeA1111::start();
        let openai = FakeOpenai::start(Some("sk-test"));
        let oa: Arc<dyn Connector> = Arc::new(OpenaiConnector::new(
            OpenaiConfig {
                base_url: openai.base_url(),
                api_key_env: "OPENAI_API_KEY".into(),
                text_model: "gpt-test".into(),
                image_model: "img-test".into(),
                max_attempts: 3,
                backoff_initial: Duration::from_millis(10),
                backoff_max: Duration::from_secs(2),
                limits: Default::default(),
                prices: Default::default(),
            },
            Some("sk-test".into()),
        ));
        let connectors: Vec<(&str, Arc<dyn Connector>)> = vec![
            ("comfyui", Arc::new(ComfyuiConnector::new(comfy.url().parse().unwrap()))),
            (
                "a1111",
                Arc::new(A1111Connector::new(a1111.url().parse().unwrap()).with_poll_period(Duration::from_millis(10))),
            ),
            ("openai_text", oa.clone()),
            ("openai_image", oa),
            ("simulation", simulation()),
        ];
        let workflow = json!({
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"cached": true}},
            "3": {"class_type": "KSampler", "inputs": {"steps": 10, "step_ms": 5}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "../../escape"}}
        });
        let mut comfy_job = NewJob::new("comfyui", json!({"workflow": workflow}));
        comfy_job.customer_id = "c1".into();
        let comfy_id = rig.submit_job(comfy_job).await;
        rig.broker
            .connection()
            .hset::<_, _, _, ()>(
                format!("job:{comfy_id}"),
                "ctx",
                json!({"storage": {"provider": "local"}, "prefix": "users/c1/x", "filename": "final"}).to_string(),
            )
            .await
            .unwrap();
        let ids = [
            comfy_id.clone(),
            rig.submit("a1111", json!({"prompt": "a cat", "steps": 5, "step_ms": 10}))
                .await,
            rig.submit("openai_text", json!({"prompt": "hello world"})).await,
            rig.submit("openai_image", json!({"prompt": "a dog"})).await,
            rig.submit("simulation", json!({"steps": 3, "artifact": "sim"})).await,
        ];
        // Started after the jobs are written, so the worker sees the ctx set above.
        let every_report = WorkerSettings {
            progress_every: Duration::ZERO,
            ..settings()
        };
        let (w, status) = rig.spawn(rig.worker("m1-gpu0", &connectors, every_report));
        for id in &ids {
            let job = rig.wait_status(id, &["completed", "failed"]).await;
            assert_eq!(job["status"], "completed", "{job:?}");
            assert_eq!(job["worker_id"], "m1-gpu0");
        }

        // ComfyUI's output went where ctx said, under ctx's name (the service's own
        // `../../escape` never reaches the key), and only its URL is in Redis.
        let rec = completed_record(&rig, &comfy_id).await;
        assert_eq!(rec["success"], true);
        let artifacts = rec["data"]["artifacts"].as_array().expect("artifacts listed").clone();
        assert_eq!(artifacts.len(), 1);
        assert_eq!(artifacts[0]["name"], "final.png");
        let url = artifacts[0]["url"].as_str().unwrap();
        assert!(url.ends_with("/users/c1/x/final.png"), "{url}");
        assert_eq!(std::fs::read(file_of(url)).unwrap(), TINY_PNG);
        let mut conn = rig.raw().await;
        let raw: String = conn.hget("jobs:completed", &comfy_id).await.unwrap();
        assert!(raw.len() < 4096, "no binary in Redis: {} bytes", raw.len());

        // Progress arrived in order.
        let entries: Vec<(String, HashMap<String, String>)> = redis::cmd("XRANGE")
            .arg(format!("progress:{comfy_id}"))
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        let values: Vec<f64> = entries
            .iter()
            .map(|(_, f)| f["progress"].parse::<f64>().unwrap())
            .collect();
        assert!(values.len() >= 3, "several progress reports: {values:?}");
        assert!(values.windows(2).all(|w| w[0] <= w[1]), "in order: {values:?}");

        let rec = completed_record(&rig, &ids[1]).await;
        assert_eq!(rec["data"]["artifacts"][0]["content_type"], "image/png");
        let rec = completed_record(&rig, &ids[2]).await;
        assert_eq!(rec["data"]["text"], "echo: hello world");
        let rec = completed_record(&rig, &ids[3]).await;
        assert!(file_of(rec["data"]["artifacts"][0]["url"].as_str().unwrap()).exists());
        let rec = completed_record(&rig, &ids[4]).await;
        let sim = file_of(rec["data"]["artifacts"][0]["url"].as_str().unwrap());
        assert_eq!(std::fs::read_to_string(sim).unwrap(), "sim");

        counted(&status, |c| c.completed == 5).await;
        rig.stop(vec![w]).await;
        assert_eq!(status.borrow().state, WorkerState::Stopped);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_failure_class_is_reported() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let comfy = FakeComfyui::start();
        let connectors: Vec<(&str, Arc<dyn Connector>)> = vec![
            ("comfyui", Arc::new(ComfyuiConnector::new(comfy.url().parse().unwrap()))),
            ("simulation", simulation()),
        ];
        let (w, status) = rig.spawn(rig.worker("w1", &connectors, settings()));

        // Not retryable: the workflow is invalid.
        let invalid = rig
            .submit(
                "comfyui",
                json!({"1": {"class_type": "FakeInvalid", "inputs": {}}, "9": {"class_type": "SaveImage", "inputs": {}}}),
            )
            .await;
        let job = rig.wait_status(&invalid, &["failed"]).await;
        assert!(job["error"].contains("Required input is missing"), "{job:?}");
        assert_eq!(job["retry_count"], "1", "failed once, for good");

        // Retryable: re-queued until max_retries, then failed.
        let mut flaky = NewJob::new("simulation", json!({"fail": "retryable", "duration_ms": 0}));
        flaky.max_retries = 2;
        let flaky = rig.submit_job(flaky).await;
        let job = rig.wait_status(&flaky, &["failed"]).await;
        assert_eq!(job["retry_count"], "2", "{job:?}");
        assert!(job["error"].contains("simulated failure"));

        // Timeout: the job's own limit stops it; retryable, so with no retries left it fails.
        let mut slow = NewJob::new("simulation", json!({"duration_ms": 60_000, "timeout_seconds": 0.3}));
        slow.max_retries = 0;
        let slow = rig.submit_job(slow).await;
        let job = rig.wait_status(&slow, &["failed"]).await;
        assert!(job["error"].contains("timed out"), "{job:?}");

        counted(&status, |c| c.failed == 4).await;
        rig.stop(vec![w]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancellation_interrupts_comfyui_and_discards_the_result() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let comfy = FakeComfyui::start();
        let connectors: Vec<(&str, Arc<dyn Connector>)> = vec![
            ("comfyui", Arc::new(ComfyuiConnector::new(comfy.url().parse().unwrap()))),
            ("simulation", simulation()),
        ];
        let (w, status) = rig.spawn(rig.worker("w1", &connectors, settings()));
        let id = rig
            .submit(
                "comfyui",
                json!({"3": {"class_type": "KSampler", "inputs": {"steps": 2000, "step_ms": 5}},
                       "9": {"class_type": "SaveImage", "inputs": {}}}),
            )
            .await;
        rig.wait_status(&id, &["in_progress"]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        rig.broker.cancel(&id).await.expect("cancel");
        let deadline = Instant::now() + Duration::from_secs(10);
        while comfy.interrupts() == 0 || comfy.busy() {
            assert!(Instant::now() < deadline, "ComfyUI was interrupted");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let mut st = status.clone();
        st.wait_for(|s| s.counts.cancelled == 1).await.unwrap();
        let job = rig.job(&id).await;
        assert_eq!(job["status"], "failed");
        assert_eq!(job["error"], "Job cancelled by user");
        // The worker goes on.
        let next = rig.submit("simulation", json!({})).await;
        rig.wait_status(&next, &["completed"]).await;
        assert_eq!(rig.job(&id).await["status"], "failed", "never overwritten as completed");
        rig.stop(vec![w]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_job_keeps_its_lease() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(BrokerOptions {
            lease: Duration::from_secs(1),
            ..quick_opts()
        })
        .await;
        let reaper = tokio::spawn({
            let b = rig.broker.clone();
            let s = rig.shutdown.clone();
            async move { b.run_reaper(Duration::from_millis(100), s).await.unwrap() }
        });
        let (w, _) = rig.spawn(rig.worker("w1", &[("simulation", simulation())], settings()));
        let id = rig.submit("simulation", json!({"duration_ms": 3500, "steps": 7})).await;
        rig.wait_status(&id, &["in_progress"]).await;
        let job = rig.wait_status(&id, &["completed", "failed", "pending"]).await;
        assert_eq!(job["status"], "completed", "{job:?}");
        assert_eq!(job["retry_count"], "0", "the reaper never took it back");
        rig.stop(vec![w, reaper]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_the_in_flight_job_after_the_drain() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let drain = WorkerSettings {
            drain: Duration::from_millis(300),
            ..settings()
        };
        let (w, status) = rig.spawn(rig.worker("w1", &[("simulation", simulation())], drain));
        let id = rig.submit("simulation", json!({"duration_ms": 60_000})).await;
        rig.wait_status(&id, &["in_progress"]).await;
        let started = Instant::now();
        let shutdown = rig.shutdown.clone();
        let broker = rig.broker.clone();
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), w).await.unwrap().unwrap();
        assert!(
            started.elapsed() >= Duration::from_millis(300),
            "it waited for the drain"
        );
        counted(&status, |c| c.returned == 1).await;
        let job = broker.show(&id).await.unwrap().unwrap().job.stored().clone();
        assert_eq!(job["status"], "pending", "{job:?}");
        assert_eq!(job["retry_count"], "0", "returned without penalty");
        let mut conn = rig.raw().await;
        let score: Option<f64> = conn.zscore("jobs:pending", &id).await.unwrap();
        assert!(score.is_some(), "back in the queue");
        rig.stop(vec![]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_short_job_finish() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let (w, _) = rig.spawn(rig.worker("w1", &[("simulation", simulation())], settings()));
        let id = rig.submit("simulation", json!({"duration_ms": 500})).await;
        rig.wait_status(&id, &["in_progress"]).await;
        rig.shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(5), w).await.unwrap().unwrap();
        assert_eq!(rig.job(&id).await["status"], "completed");
        rig.stop(vec![]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_payloads_fail_with_a_reason_and_the_worker_goes_on() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let (w, _) = rig.spawn(rig.worker("w1", &[("simulation", simulation())], settings()));
        // Written as the API writes jobs, with a payload that is not JSON.
        let mut conn = rig.raw().await;
        let id = "bad-payload-1";
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let _: () = redis::pipe()
            .hset_multiple(
                format!("job:{id}"),
                &[
                    ("id", id),
                    ("service_required", "simulation"),
                    ("priority", "50"),
                    ("payload", "{not json"),
                    ("requirements", ""),
                    ("customer_id", ""),
                    ("created_at", "2026-01-01T00:00:00.000Z"),
                    ("status", "pending"),
                    ("retry_count", "0"),
                    ("max_retries", "3"),
                ],
            )
            .zadd(
                "jobs:pending",
                id,
                machine::broker::pending_score(50, None, now_ms, None),
            )
            .publish(
                "job_submitted",
                json!({"job_id": id, "service_required": "simulation", "priority": 50}).to_string(),
            )
            .query_async(&mut conn)
            .await
            .unwrap();
        let job = rig.wait_status(id, &["failed", "unworkable"]).await;
        assert!(
            !job.get("error").is_none_or(String::is_empty),
            "a reason is given: {job:?}"
        );
        // Valid JSON the connector cannot use fails without retry, with the reason.
        let wrong = rig.submit("simulation", json!({"steps": "many"})).await;
        let job = rig.wait_status(&wrong, &["failed"]).await;
        assert!(job["error"].contains("invalid job payload: `steps`"), "{job:?}");
        assert_eq!(job["retry_count"], "1");
        let good = rig.submit("simulation", json!({})).await;
        rig.wait_status(&good, &["completed"]).await;
        rig.stop(vec![w]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_claims_only_while_its_services_are_ready() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let (ready_tx, ready_rx) = watch::channel(false);
        let mut worker = rig.worker("w1", &[("simulation", simulation())], settings());
        worker.wait_for(vec![ready_rx]);
        let (w, mut status) = rig.spawn(worker);
        status
            .wait_for(|s| s.state == WorkerState::WaitingForServices)
            .await
            .unwrap();
        let id = rig.submit("simulation", json!({})).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(rig.job(&id).await["status"], "pending", "no claim while not ready");
        ready_tx.send(true).unwrap();
        rig.wait_status(&id, &["completed"]).await;
        // A service that stops being ready (crash loop) stops claiming again.
        status.wait_for(|s| s.state == WorkerState::Idle).await.unwrap();
        ready_tx.send(false).unwrap();
        status
            .wait_for(|s| s.state == WorkerState::WaitingForServices)
            .await
            .unwrap();
        let id = rig.submit("simulation", json!({})).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        assert_eq!(rig.job(&id).await["status"], "pending");
        ready_tx.send(true).unwrap();
        rig.wait_status(&id, &["completed"]).await;
        rig.stop(vec![w]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_redis_connections_do_not_lose_the_job() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let (w, status) = rig.spawn(rig.worker("w1", &[("simulation", simulation())], settings()));
        let id = rig
            .submit("simulation", json!({"duration_ms": 1500, "steps": 15}))
            .await;
        rig.wait_status(&id, &["in_progress"]).await;
        let mut conn = rig.raw().await;
        for _ in 0..5 {
            // Kills every client connection but this one's (SKIPME yes is the default).
            let _: redis::Value = redis::cmd("CLIENT")
                .arg(&["KILL", "TYPE", "normal"])
                .query_async(&mut conn)
                .await
                .unwrap();
            let _: redis::Value = redis::cmd("CLIENT")
                .arg(&["KILL", "TYPE", "pubsub"])
                .query_async(&mut conn)
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let job = rig.wait_status(&id, &["completed", "failed"]).await;
        assert_eq!(job["status"], "completed", "{job:?}");
        counted(&status, |c| c.completed == 1).await;
        assert_eq!(status.borrow().counts.claimed, 1);
        rig.stop(vec![w]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_jobs_across_four_workers_each_complete_once() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let mut tasks = Vec::new();
        let mut statuses = Vec::new();
        for i in 0..4 {
            let (t, s) = rig.spawn(rig.worker(&format!("w{i}"), &[("simulation", simulation())], settings()));
            tasks.push(t);
            statuses.push(s);
        }
        let mut ids = Vec::new();
        for i in 0..100 {
            ids.push(
                rig.submit("simulation", json!({"duration_ms": i % 7, "steps": 1}))
                    .await,
            );
        }
        for id in &ids {
            assert_eq!(
                rig.wait_status(id, &["completed", "failed"]).await["status"],
                "completed"
            );
        }
        let mut conn = rig.raw().await;
        let completed: usize = conn.hlen("jobs:completed").await.unwrap();
        assert_eq!(completed, 100);
        for st in &statuses {
            counted(st, |c| c.claimed == c.completed).await;
        }
        let claimed: u64 = statuses.iter().map(|s| s.borrow().counts.claimed).sum();
        let done: u64 = statuses.iter().map(|s| s.borrow().counts.completed).sum();
        assert_eq!(
            (claimed, done),
            (100, 100),
            "each job claimed and completed exactly once"
        );
        assert!(
            statuses.iter().filter(|s| s.borrow().counts.completed > 0).count() >= 2,
            "the work was shared"
        );
        rig.stop(tasks).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_built_from_the_plan_run_jobs_and_report_installed_models() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let comfy = FakeComfyui::start();
        let workspace = rig.dir.path().join("ws");
        let checkpoints = workspace.join("ComfyUI/models/checkpoints");
        std::fs::create_dir_all(&checkpoints).unwrap();
        std::fs::write(checkpoints.join("sd15.safetensors"), b"weights").unwrap();
        let env = BTreeMap::from([
            ("MACHINE_ID", "m1".to_owned()),
            ("MACHINE_WORKSPACE", workspace.display().to_string()),
            ("WORKER_CONNECTORS", "comfyui,simulation:2".to_owned()),
            ("COMFYUI_BASE_PORT", comfy.addr().port().to_string()),
        ]);
        let env: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let config = config::load_str(None, &env).expect("valid config");
        let probe = Probe::from_parts(
            Vec::new(),
            HostInfo {
                cpu_cores: 4,
                ram_total_bytes: 8 << 30,
                ram_available_bytes: 4 << 30,
                disk_free_bytes: None,
            },
        );
        let plan = Plan::build(&config, &probe).expect("valid plan");
        let workers = Workers::build(&config, &probe, &plan).expect("workers build");
        let ids: Vec<String> = workers.workers().iter().map(|w| w.id().to_owned()).collect();
        assert_eq!(ids, ["m1-cpu0", "m1-simulation-1", "m1-simulation-2"]);
        let caps = workers.workers()[0].capabilities().clone();
        assert!(caps.models.is_empty(), "models are scanned when the worker starts");
        assert_eq!(caps.hardware.gpu_count, 0);
        assert_eq!(caps.hardware.cpu_cores, 4);
        let statuses = workers.statuses();
        let mut reports = workers.reports();
        let (ready_tx, ready_rx) = watch::channel(true);
        let readiness: Readiness = BTreeMap::from([("comfyui-cpu0".to_owned(), ready_rx)]);
        let run = tokio::spawn({
            let broker = rig.broker.clone();
            let shutdown = rig.shutdown.clone();
            async move { workers.run(broker, &readiness, shutdown).await.unwrap() }
        });
        let mut needs_model = NewJob::new(
            "comfyui",
            json!({"3": {"class_type": "KSampler", "inputs": {}}, "9": {"class_type": "SaveImage", "inputs": {}}}),
        );
        needs_model.requirements = json!({"models": ["sd15"]}).to_string();
        let a = rig.submit_job(needs_model).await;
        let mut missing = NewJob::new("comfyui", json!({"9": {"class_type": "SaveImage", "inputs": {}}}));
        missing.requirements = json!({"models": ["sdxl"]}).to_string();
        let b = rig.submit_job(missing).await;
        let sim = rig.submit("simulation", json!({"duration_ms": 1})).await;
        rig.wait_status(&a, &["completed"]).await;
        rig.wait_status(&sim, &["completed"]).await;
        let report = reports.recv().await.unwrap();
        assert!(report.total >= report.run);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(rig.job(&b).await["status"], "pending", "no worker has sdxl");
        drop(ready_tx);
        rig.shutdown.cancel();
        run.await.unwrap();
        assert!(statuses.iter().all(|(_, s)| s.borrow().state == WorkerState::Stopped));
        rig.stop(vec![]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn machine_run_start_up_runs_the_broker_and_the_plans_workers_until_shutdown() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let workspace = rig.dir.path().join("ws");
        let env: BTreeMap<String, String> = [
            ("MACHINE_ID", "m2".to_owned()),
            ("MACHINE_WORKSPACE", workspace.display().to_string()),
            ("WORKER_CONNECTORS", "simulation:2".to_owned()),
            ("HUB_REDIS_URL", rig.url()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        let config = config::load_str(None, &env).expect("valid config");
        let probe = Probe::from_parts(
            Vec::new(),
            HostInfo {
                cpu_cores: 2,
                ram_total_bytes: 4 << 30,
                ram_available_bytes: 2 << 30,
                disk_free_bytes: None,
            },
        );
        let plan = Plan::build(&config, &probe).expect("valid plan");
        let shutdown = CancellationToken::new();
        // The start-up of `machine run`: build from the plan, connect, run.
        let workers = Workers::build(&config, &probe, &plan).expect("workers build");
        let serve = tokio::spawn({
            let shutdown = shutdown.clone();
            async move {
                let broker = Broker::connect_machine(&config.machine, &machine::broker::RedisHealth::new(), &shutdown)
                    .await
                    .expect("redis answers");
                workers.run(broker, &Readiness::new(), shutdown).await.unwrap()
            }
        });
        let id = rig
            .submit("simulation", json!({"duration_ms": 5, "artifact": "x"}))
            .await;
        let job = rig.wait_status(&id, &["completed"]).await;
        assert!(job["worker_id"].starts_with("m2-simulation-"), "{job:?}");
        let rec = completed_record(&rig, &id).await;
        let url = rec["data"]["artifacts"][0]["url"].as_str().unwrap().to_owned();
        assert!(
            file_of(&url).starts_with(workspace.join("outputs").canonicalize().unwrap()),
            "{url}"
        );
        shutdown.cancel();
        tokio::time::timeout(Duration::from_secs(10), serve)
            .await
            .unwrap()
            .unwrap();
        rig.stop(vec![]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_worker_keeps_its_heartbeat() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let (w, mut status) = rig.spawn(rig.worker("w-idle", &[("simulation", simulation())], settings()));
        status.wait_for(|s| s.state == WorkerState::Idle).await.unwrap();
        let mut conn = rig.raw().await;
        let first: String = conn.hget("worker:w-idle", "last_heartbeat").await.unwrap();
        tokio::time::sleep(Duration::from_millis(700)).await;
        let later: String = conn.hget("worker:w-idle", "last_heartbeat").await.unwrap();
        assert!(
            later.parse::<u64>().unwrap() > first.parse::<u64>().unwrap(),
            "{first} then {later}"
        );
        let ttl: i64 = conn.ttl("worker:w-idle:heartbeat").await.unwrap();
        assert!((1..=60).contains(&ttl), "the heartbeat key expires: {ttl}");
        assert_eq!(status.borrow().state, WorkerState::Idle);
        rig.stop(vec![w]).await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_outage_keeps_the_job_and_reports_it_when_redis_is_back() {
    within(HARD_LIMIT, async {
        let mut rig = Rig::start(quick_opts()).await;
        let (w, status) = rig.spawn(rig.worker("w1", &[("simulation", simulation())], settings()));
        let id = rig.submit("simulation", json!({"duration_ms": 800, "steps": 4})).await;
        rig.wait_status(&id, &["in_progress"]).await;
        rig.server.stop_keeping_data();
        // The job finishes while Redis is down; its completion cannot be written yet.
        let mut st = status.clone();
        tokio::time::timeout(Duration::from_secs(20), st.wait_for(|s| s.last_error.is_some()))
            .await
            .expect("the failed write is reported in the status")
            .unwrap();
        {
            let s = status.borrow();
            assert_eq!(s.counts.completed, 0, "nothing could be written: {s:?}");
            assert_eq!(
                s.current_job.as_ref().map(|j| j.job_id.as_str()),
                Some(id.as_str()),
                "still held"
            );
            assert!(s.last_error.is_some(), "the outage is visible: {s:?}");
        }
        rig.server.start_again();
        let job = rig.wait_status(&id, &["completed", "failed", "pending"]).await;
        assert_eq!(job["status"], "completed", "{job:?}");
        st.wait_for(|s| s.counts.completed == 1).await.unwrap();
        assert_eq!(status.borrow().counts.claimed, 1);
        // The worker claims again after the outage.
        let next = rig.submit("simulation", json!({"duration_ms": 1})).await;
        rig.wait_status(&next, &["completed"]).await;
        rig.stop(vec![w]).await;
    })
    .await;
}

/// A job reporting 30 steps in 3 s: Redis gets its first report, then at most one a second;
/// the completion that follows at once carries the final state (100 %, completed), so the last
/// report is not written separately; `machine jobs show`'s progress hash moves while it runs;
/// the page's status sees every report; no `progress:<id>` stream by default.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_is_coalesced_to_one_write_a_second_and_the_completion_carries_the_last_state() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let mut pubsub = redis::Client::open(rig.url())
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        pubsub
            .subscribe(&["update_job_progress", "complete_job"])
            .await
            .unwrap();
        let id = rig
            .submit("simulation", json!({"steps": 30, "duration_ms": 3000}))
            .await;
        let (w, status) = rig.spawn(rig.worker("w1", &[("simulation", simulation())], settings()));
        let mut seen_live = std::collections::BTreeSet::new();
        let mut messages = Vec::new();
        let mut stream = pubsub.on_message();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let next = tokio::time::timeout_at(deadline, stream.next()).await;
            let msg = next.expect("the job completes").expect("the subscription stays");
            let channel = msg.get_channel_name().to_owned();
            let doc: Value = serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
            if channel == "update_job_progress" && doc.get("status").is_some() {
                // What `machine jobs show` prints moves while the job runs.
                let view = rig.broker.show(&id).await.unwrap().unwrap();
                if view.job.state().name() == "in_progress" {
                    seen_live.insert(view.progress.stored()["progress"].clone());
                }
            }
            let done = channel == "complete_job";
            messages.push((channel, doc));
            if done {
                break;
            }
        }
        let reports: Vec<&Value> = messages
            .iter()
            .filter(|(c, d)| c == "update_job_progress" && d.get("status").is_some())
            .map(|(_, d)| d)
            .collect();
        // 30 reports over 3 s: the first and about one a second; the last is the completion.
        assert!(
            (2..=5).contains(&reports.len()),
            "{} progress writes for 30 reports: {reports:?}",
            reports.len()
        );
        let (_, completion) = messages.last().unwrap();
        assert_eq!(completion["progress"], 100);
        assert_eq!(completion["status"], "completed");
        let view = rig.broker.show(&id).await.unwrap().unwrap();
        assert_eq!(view.progress.stored()["progress"], "100", "{:?}", view.progress);
        assert_eq!(view.progress.stored()["status"], "completed", "{:?}", view.progress);
        assert!(
            seen_live.len() >= 2,
            "the progress hash moved while the job ran: {seen_live:?}"
        );
        let mut conn = rig.raw().await;
        let streams: bool = conn.exists(format!("progress:{id}")).await.unwrap();
        assert!(!streams, "no progress stream unless configured");
        counted(&status, |c| c.completed == 1).await;
        rig.stop(vec![w]).await;
    })
    .await;
}

/// A ComfyUI workflow writing one output named `prefix`, whose `/view` takes `view_ms`.
fn comfy_workflow(prefix: &str, view_ms: u64) -> Value {
    json!({
        "3": {"class_type": "KSampler", "inputs": {"steps": 2, "step_ms": 5}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "view_ms": view_ms}}
    })
}

/// A ComfyUI worker with an upload stage of `limits`, storing in the rig's temp dir.
fn comfy_worker(rig: &Rig, comfy: &FakeComfyui, limits: UploadLimits) -> Worker {
    let connector: Arc<dyn Connector> = Arc::new(ComfyuiConnector::new(comfy.url().parse().unwrap()));
    let mut w = rig.worker("w1", &[("comfyui", connector)], settings());
    w.upload_alongside(limits);
    w
}

/// Queues ComfyUI jobs in this order (each a step lower in priority: jobs queued within one
/// second are otherwise claimed in no set order).
async fn queue_comfy(rig: &Rig, workflows: &[Value]) -> Vec<String> {
    let mut ids = Vec::new();
    for (i, w) in workflows.iter().enumerate() {
        let mut job = NewJob::new("comfyui", json!({"workflow": w}));
        job.priority = 100 - i64::try_from(i).unwrap();
        ids.push(rig.submit_job(job).await);
    }
    ids
}

/// Where the first request matching `f` is in what the fake saw.
fn at(seen: &[ComfyuiSeen], what: &str, f: impl Fn(&ComfyuiSeen) -> bool) -> usize {
    seen.iter()
        .position(f)
        .unwrap_or_else(|| panic!("the fake never saw {what}: {seen:?}"))
}

fn viewed(prefix: &'static str) -> impl Fn(&ComfyuiSeen) -> bool {
    move |s| matches!(s, ComfyuiSeen::ViewEnded(f) if f.starts_with(&format!("{prefix}_")))
}

/// The stored output of a completed job, read back from its URL.
async fn stored_output(rig: &Rig, id: &str) -> (Vec<u8>, Value) {
    let rec = completed_record(rig, id).await;
    let a = rec["data"]["artifacts"][0].clone();
    let bytes = std::fs::read(file_of(a["url"].as_str().expect("a stored output"))).unwrap();
    (bytes, a)
}

/// ComfyUI's outputs are fetched by the upload stage (issue 27): the worker submits its next
/// prompt while the previous job's `/view` is still being answered, the fetched size counts in
/// the pending upload as soon as the headers tell it, and both jobs complete with their outputs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_outputs_are_fetched_while_the_next_prompt_runs() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let comfy = FakeComfyui::start();
        let ids = queue_comfy(&rig, &[comfy_workflow("a", 1500), comfy_workflow("b", 0)]).await;
        let limits = UploadLimits {
            jobs: 2,
            bytes: 1 << 30,
        };
        let (w, status) = rig.spawn(comfy_worker(&rig, &comfy, limits));
        let mut st = status.clone();
        let png = u64::try_from(TINY_PNG.len()).unwrap();
        tokio::time::timeout(
            LIMIT,
            st.wait_for(|s| s.uploads.iter().any(|u| u.job_id == ids[0] && u.bytes == png)),
        )
        .await
        .expect("the fetch's size shows in the pending upload while its body comes")
        .unwrap();
        for id in &ids {
            let job = rig.wait_status(id, &["completed", "failed"]).await;
            assert_eq!(job["status"], "completed", "{job:?}");
            assert_eq!(job["retry_count"], "0", "{job:?}");
        }
        let seen = comfy.seen();
        let b_submitted = at(&seen, "the second prompt", |s| *s == ComfyuiSeen::Prompt("b".into()));
        assert!(
            b_submitted < at(&seen, "the first output's /view end", viewed("a")),
            "the next prompt went in while the first job's output was fetched: {seen:?}"
        );
        for id in &ids {
            let (bytes, artifact) = stored_output(&rig, id).await;
            assert_eq!(bytes, TINY_PNG, "{artifact}");
            assert_eq!(artifact["content_type"], "image/png");
        }
        counted(&status, |c| c.completed == 2 && c.failed == 0).await;
        rig.stop(vec![w]).await;
    })
    .await;
}

/// A `/view` that fails after the hand-off (ComfyUI restarting under it, while it already runs
/// the next prompt) fails the job retryably, as when the connector fetched it: it goes back to
/// the queue with a retry spent, runs again and completes once; nothing is lost, nothing
/// completed twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_fetch_after_the_hand_off_returns_the_job_to_the_queue() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let comfy = FakeComfyui::start();
        comfy.fail_views(1);
        let ids = queue_comfy(&rig, &[comfy_workflow("a", 800), comfy_workflow("b", 0)]).await;
        let limits = UploadLimits {
            jobs: 2,
            bytes: 1 << 30,
        };
        let (w, status) = rig.spawn(comfy_worker(&rig, &comfy, limits));
        for id in &ids {
            let job = rig.wait_status(id, &["completed", "failed"]).await;
            assert_eq!(job["status"], "completed", "{job:?}");
        }
        let first = rig.job(&ids[0]).await;
        assert_eq!(
            first["retry_count"], "1",
            "one retry spent on the failed fetch: {first:?}"
        );
        assert!(
            first["error"].contains("503"),
            "the fetch's failure is the job's last error: {first:?}"
        );
        assert_eq!(rig.job(&ids[1]).await["retry_count"], "0");
        let seen = comfy.seen();
        let prompts_a = seen.iter().filter(|s| **s == ComfyuiSeen::Prompt("a".into())).count();
        assert_eq!(prompts_a, 2, "the first job ran again: {seen:?}");
        let b_submitted = at(&seen, "the second prompt", |s| *s == ComfyuiSeen::Prompt("b".into()));
        assert!(
            b_submitted < at(&seen, "the failed /view", viewed("a")),
            "the fetch failed after the hand-off: {seen:?}"
        );
        for id in &ids {
            assert_eq!(stored_output(&rig, id).await.0, TINY_PNG);
        }
        counted(&status, |c| c.completed == 2 && c.failed == 1).await;
        let c = status.borrow().counts;
        assert_eq!((c.completed, c.failed, c.returned, c.lost), (2, 1, 0, 0), "{c:?}");
        rig.stop(vec![w]).await;
    })
    .await;
}

/// Fetched outputs count against the byte budget once their size is known: a worker waiting
/// for its next job while a fetch fills the budget stops waiting and waits for its uploads, so
/// a job queued meanwhile is not claimed until the fetch and its upload end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_that_fills_the_byte_budget_holds_the_claims() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let comfy = FakeComfyui::start();
        let first = queue_comfy(&rig, &[comfy_workflow("a", 1500)]).await;
        let limits = UploadLimits { jobs: 4, bytes: 10 };
        let (w, status) = rig.spawn(comfy_worker(&rig, &comfy, limits));
        let mut st = status.clone();
        let held = tokio::time::timeout(
            LIMIT,
            st.wait_for(|s| s.state == WorkerState::WaitingForUploads && !s.uploads.is_empty()),
        )
        .await
        .expect("the worker waits for its uploads once the fetched size fills the budget")
        .unwrap()
        .clone();
        assert_eq!(held.uploads[0].job_id, first[0]);
        assert!(
            !comfy.seen().iter().any(viewed("a")),
            "still fetching: {:?}",
            comfy.seen()
        );
        let second = queue_comfy(&rig, &[comfy_workflow("b", 0)]).await;
        for id in first.iter().chain(&second) {
            let job = rig.wait_status(id, &["completed", "failed"]).await;
            assert_eq!(job["status"], "completed", "{job:?}");
        }
        let seen = comfy.seen();
        let b_submitted = at(&seen, "the second prompt", |s| *s == ComfyuiSeen::Prompt("b".into()));
        assert!(
            b_submitted > at(&seen, "the first output's /view end", viewed("a")),
            "no claim while the fetched output filled the budget: {seen:?}"
        );
        rig.stop(vec![w]).await;
    })
    .await;
}

/// An idle worker waits in the fleet's park (so a submission wakes it); held (a GPU fault, a
/// quarantine, a planned restart...) it leaves the park at once, so the fleet's indexer wakes
/// no one in vain; released, it parks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_worker_leaves_the_fleets_park_and_parks_again_when_released() {
    within(LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let worker = rig.worker("w1", &[("simulation", simulation())], settings());
        let holds = worker.holds();
        let (w, status) = rig.spawn(worker);
        let mut conn = rig.raw().await;
        let parked = async |conn: &mut redis::aio::MultiplexedConnection| -> bool {
            conn.hexists("jobs:idx:parked", "w1").await.unwrap()
        };
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !parked(&mut conn).await {
            assert!(tokio::time::Instant::now() < deadline, "the idle worker never parked");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        holds.set(HoldKind::GpuFault, "gpu faulted: XID 79 (test)");
        let held = tokio::time::Instant::now();
        while parked(&mut conn).await {
            assert!(
                held.elapsed() < Duration::from_secs(1),
                "the held worker stayed in the park"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // The worker leaves the park as it stops claiming and shows itself held a moment later.
        let mut watch = status.clone();
        // (The watch's guard is dropped at once: held, it would block the worker's next send.)
        let shown = tokio::time::timeout(Duration::from_secs(5), watch.wait_for(|s| s.state == WorkerState::Held))
            .await
            .is_ok_and(|r| r.is_ok());
        assert!(
            shown,
            "the worker that left the park shows itself held: {:?}",
            status.borrow().state
        );
        holds.clear(HoldKind::GpuFault);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !parked(&mut conn).await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the released worker never parked again"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        rig.stop(vec![w]).await;
    })
    .await;
}

/// What the scripted connector does next.
#[derive(Debug)]
enum Script {
    /// Report this percentage and message.
    Report(f64, &'static str),
    /// End the job with a failure that is not retried, first saying so on the channel.
    Fail(tokio::sync::oneshot::Sender<()>),
}

/// A connector that reports and ends as the test tells it, one step at a time.
#[derive(Debug)]
struct Scripted {
    steps: tokio::sync::Mutex<tokio::sync::mpsc::UnboundedReceiver<Script>>,
}

impl Connector for Scripted {
    fn kind(&self) -> config::ConnectorKind {
        config::ConnectorKind::Simulation
    }

    fn run<'a>(
        &'a self,
        _job: &'a machine::connectors::Job,
        progress: &'a machine::connectors::ProgressSink,
        _cancel: &'a CancellationToken,
    ) -> futures_util::future::BoxFuture<'a, Result<machine::connectors::JobOutput, machine::connectors::ConnectorError>>
    {
        Box::pin(async move {
            let mut steps = self.steps.lock().await;
            loop {
                match steps.recv().await {
                    Some(Script::Report(percent, message)) => progress.report(machine::connectors::Progress {
                        percent,
                        message: message.to_owned(),
                        current_step: None,
                        total_steps: None,
                    }),
                    Some(Script::Fail(said)) => {
                        let _ = said.send(());
                        return Err(machine::connectors::ConnectorError::Failed {
                            message: "the render failed".into(),
                            retryable: false,
                        });
                    }
                    None => std::future::pending().await,
                }
            }
        })
    }
}

/// The ids of the server's clients, and which of them are blocked (a paused write among them).
async fn clients(conn: &mut redis::aio::MultiplexedConnection) -> Vec<(u64, bool)> {
    let list: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await.unwrap();
    list.lines()
        .filter_map(|l| {
            let field = |name: &str| l.split(' ').find_map(|kv| kv.strip_prefix(name));
            Some((field("id=")?.parse().ok()?, field("flags=")?.contains('b')))
        })
        .collect()
}

/// Coalescing never loses the last state, even when Redis is slow to store the report before
/// it: the job's first report is written at once and Redis holds that write (`CLIENT PAUSE
/// WRITE`, released by the test, not after a time); the job's next report, held by the
/// coalescing meanwhile, is its last, and the job fails while the first write is still held.
/// Once Redis takes writes again the held report is written, before the failure, so the job's
/// progress stays at its last report and `update_job_progress` carried it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_held_last_report_is_written_when_the_write_before_it_was_slow() {
    within(HARD_LIMIT, async {
        let rig = Rig::start(quick_opts()).await;
        let mut conn = rig.raw().await;
        // The worker's own broker: on its connection only the worker's calls travel, so a
        // blocked client of it is the progress write.
        let before: Vec<u64> = clients(&mut conn).await.into_iter().map(|(id, _)| id).collect();
        let url = RedisUrl::parse(&rig.url()).expect("testkit URLs are valid");
        let broker = Broker::connect(&url, quick_opts()).await.expect("connect");
        let worker_clients: Vec<u64> = clients(&mut conn)
            .await
            .into_iter()
            .map(|(id, _)| id)
            .filter(|id| !before.contains(id))
            .collect();
        assert!(!worker_clients.is_empty(), "the worker's broker has a connection");
        let (script, steps) = tokio::sync::mpsc::unbounded_channel();
        let connector: Arc<dyn Connector> = Arc::new(Scripted {
            steps: tokio::sync::Mutex::new(steps),
        });
        let worker = rig.worker(
            "w1",
            &[("simulation", connector)],
            WorkerSettings {
                // No heartbeat and no second report due while the test runs: only the first
                // report's write can be held.
                heartbeat: Duration::from_secs(600),
                progress_every: Duration::from_secs(600),
                ..settings()
            },
        );
        let shutdown = rig.shutdown.clone();
        let task = tokio::spawn(async move { worker.run(broker, shutdown).await.expect("a worker ends cleanly") });
        let mut pubsub = redis::Client::open(rig.url())
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        pubsub.subscribe(&["update_job_progress", "job_failed"]).await.unwrap();
        let id = rig.submit("simulation", json!({})).await;
        rig.wait_status(&id, &["in_progress"]).await;

        let _: () = redis::cmd("CLIENT")
            .arg("PAUSE")
            .arg(60_000)
            .arg("WRITE")
            .query_async(&mut conn)
            .await
            .unwrap();
        script.send(Script::Report(10.0, "step 1 of 3")).unwrap();
        let deadline = Instant::now() + LIMIT;
        while !clients(&mut conn)
            .await
            .iter()
            .any(|(id, blocked)| *blocked && worker_clients.contains(id))
        {
            assert!(
                Instant::now() < deadline,
                "the first report's write never reached Redis"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Redis holds the first report's write; the last report comes and the job fails.
        script.send(Script::Report(90.0, "step 3 of 3")).unwrap();
        let (said, failing) = tokio::sync::oneshot::channel();
        script.send(Script::Fail(said)).unwrap();
        failing.await.unwrap();
        let _: () = redis::cmd("CLIENT")
            .arg("UNPAUSE")
            .query_async(&mut conn)
            .await
            .unwrap();

        let mut reports = Vec::new();
        let mut stream = pubsub.on_message();
        let deadline = tokio::time::Instant::now() + LIMIT;
        loop {
            let msg = tokio::time::timeout_at(deadline, stream.next())
                .await
                .expect("the job fails")
                .expect("the subscription stays");
            let doc: Value = serde_json::from_str(&msg.get_payload::<String>().unwrap()).unwrap();
            if msg.get_channel_name() == "job_failed" {
                break;
            }
            if doc.get("status").is_some() {
                reports.push((doc["progress"].clone(), doc["message"].clone()));
            }
        }
        assert_eq!(
            reports,
            vec![(json!(10), json!("step 1 of 3")), (json!(90), json!("step 3 of 3"))],
            "both reports are written, the held last one before the failure"
        );
        let view = rig.broker.show(&id).await.unwrap().unwrap();
        assert_eq!(view.progress.stored()["progress"], "90", "{:?}", view.progress);
        assert_eq!(view.job.stored()["status"], "failed");
        drop(stream);
        rig.stop(vec![task]).await;
    })
    .await;
}

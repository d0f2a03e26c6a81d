//! The external API connectors (Replicate, RunPod, OpenAI) run by real workers against a real
//! redis-server and the protocol fakes: jobs complete with stored outputs and their billing,
//! cancellation reaches the API, input errors fail without retry, `Retry-After` is honoured,
//! a fleet-wide rate limit holds across two machines, and a used-up daily quota leaves jobs
//! pending with the reason while the worker takes other work.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use machine::broker::{Broker, BrokerOptions, Capabilities, NewJob};
use machine::config::{Config, RedisUrl, SimulationConfig, load_str};
use machine::connectors::limits::Limiter;
use machine::connectors::openai::OpenaiConnector;
use machine::connectors::replicate::ReplicateConnector;
use machine::connectors::runpod::RunpodConnector;
use machine::connectors::simulation::SimulationConnector;
use machine::connectors::store::OutputStore;
use machine::connectors::{Billing, Connector};
use machine::worker::{Worker, WorkerSettings};
use redis::AsyncCommands;
use serde_json::{Value, json};
use testkit::{FakeOpenai, FakeReplicate, FakeRunpod, RedisServer};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::{subscribed, within};

/// Each test's hard limit.
const HARD_LIMIT: Duration = Duration::from_secs(120);

const LIMIT: Duration = Duration::from_secs(60);

fn config(toml: &str) -> Config {
    load_str(Some(("test.toml", toml)), &BTreeMap::<&str, &str>::new()).expect("a valid test configuration")
}

/// One machine's broker (its own connection and event loop) on a shared Redis.
struct Machine {
    broker: Broker,
    events: JoinHandle<()>,
}

async fn machine(url: &str, shutdown: &CancellationToken) -> Machine {
    let url = RedisUrl::parse(url).expect("testkit URLs are valid");
    // Progress is read back from the optional progress:<id> stream, every report written.
    let opts = BrokerOptions {
        failed_holdoff: Duration::from_millis(50),
        safety_poll: Duration::from_millis(300),
        progress_stream: true,
        ..BrokerOptions::default()
    };
    let broker = Broker::connect(&url, opts).await.expect("connect");
    broker.ensure_functions().await.expect("install the library");
    let events = tokio::spawn({
        let (b, s) = (broker.clone(), shutdown.clone());
        async move { b.run_events(s).await.expect("the event loop ends cleanly") }
    });
    Machine { broker, events }
}

struct Rig {
    server: RedisServer,
    shutdown: CancellationToken,
    machines: Vec<Machine>,
    workers: Vec<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl Rig {
    async fn start(machines: usize) -> Rig {
        let server = RedisServer::start();
        let shutdown = CancellationToken::new();
        let mut ms = Vec::new();
        for _ in 0..machines {
            ms.push(machine(&server.url(), &shutdown).await);
        }
        Rig {
            server,
            shutdown,
            machines: ms,
            workers: Vec::new(),
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    fn broker(&self) -> &Broker {
        &self.machines[0].broker
    }

    /// Starts a worker on machine `m` serving each service through its connector.
    fn spawn(&mut self, m: usize, id: &str, connectors: &[(&str, Arc<dyn Connector>)]) {
        let services: Vec<&str> = connectors.iter().map(|(s, _)| *s).collect();
        let caps = Capabilities::new(id, format!("m{m}"), &services);
        let map: HashMap<String, Arc<dyn Connector>> =
            connectors.iter().map(|(s, c)| ((*s).to_owned(), c.clone())).collect();
        let settings = WorkerSettings {
            heartbeat: Duration::from_millis(200),
            drain: Duration::from_secs(2),
            job_timeout: Duration::from_secs(30),
            progress_every: Duration::ZERO,
        };
        let store = Arc::new(OutputStore::new(self.dir.path().join("outputs")));
        let mut worker = Worker::new(caps, map, settings, store);
        worker.recheck_holds_every(Duration::from_millis(300));
        let broker = self.machines[m].broker.clone();
        let shutdown = self.shutdown.clone();
        self.workers.push(tokio::spawn(async move {
            worker.run(broker, shutdown).await.expect("a worker ends cleanly");
        }));
    }

    async fn submit(&self, service: &str, payload: Value, customer: &str) -> String {
        let mut job = NewJob::new(service, payload);
        job.customer_id = customer.to_owned();
        self.broker().submit(&job).await.expect("submit")
    }

    async fn job(&self, id: &str) -> BTreeMap<String, String> {
        self.broker()
            .show(id)
            .await
            .expect("show")
            .expect("the job exists")
            .job
            .stored()
            .clone()
    }

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
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn result(&self, id: &str) -> Value {
        let raw = self.completion_record(id).await;
        let record: Value = serde_json::from_str(&raw).expect("the record is JSON");
        record["data"].clone()
    }

    /// The job's record in `jobs:completed`, as Redis holds it.
    async fn completion_record(&self, id: &str) -> String {
        let mut conn = redis::Client::open(self.server.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        conn.hget("jobs:completed", id).await.expect("a completion record")
    }

    /// The `progress` values reported with `message`, from the job's progress stream.
    async fn progress(&self, id: &str, message: &str) -> Vec<f64> {
        let mut conn = redis::Client::open(self.server.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let entries: redis::streams::StreamRangeReply =
            conn.xrange_all(format!("progress:{id}")).await.expect("XRANGE");
        entries
            .ids
            .iter()
            .filter(|e| e.get::<String>("message").as_deref() == Some(message))
            .filter_map(|e| e.get::<String>("progress")?.parse().ok())
            .collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for w in self.workers {
            tokio::time::timeout(LIMIT, w)
                .await
                .expect("workers stop after shutdown")
                .expect("worker tasks do not panic");
        }
        for m in self.machines {
            m.events.await.expect("the event loop does not panic");
        }
    }
}

fn stored_file(artifact: &Value) -> std::path::PathBuf {
    let url = artifact["url"].as_str().expect("a stored artifact has a url");
    std::path::PathBuf::from(url.strip_prefix("file://").expect("local outputs have file URLs"))
}

fn replicate(fake: &FakeReplicate, extra: &str) -> ReplicateConnector {
    let c = config(&format!(
        "[connectors.replicate]\nbase_url = \"{}\"\npoll_interval = \"50ms\"\nbackoff_initial = \"20ms\"\n{extra}\n[connectors.replicate.prices]\nper_second = 0.5\ncurrency = \"USD\"\n",
        fake.base_url()
    ));
    ReplicateConnector::new(c.plan.replicate, Some("r8-test".into()))
}

fn runpod(fake: &FakeRunpod) -> RunpodConnector {
    runpod_with(fake, "").0
}

/// A RunPod connector with `extra` settings (and sections) after its own, and its limiter
/// when `extra` sets limits (attached to a broker by the caller).
fn runpod_with(fake: &FakeRunpod, extra: &str) -> (RunpodConnector, Arc<Limiter>) {
    let c = config(&format!(
        "[connectors.runpod]\nbase_url = \"{}\"\nendpoint_id = \"ep-default\"\npoll_interval = \"50ms\"\nsync_wait = \"5s\"\nbackoff_initial = \"20ms\"\n{extra}\n[connectors.runpod.prices]\nper_second = 2.0\nper_request = 0.01\n",
        fake.base_url()
    ));
    let limiter = Arc::new(Limiter::new("runpod", c.plan.runpod.limits.clone()));
    let connector = RunpodConnector::new(c.plan.runpod, Some("rp-test".into()));
    if extra.contains("limits") {
        (connector.with_limiter(limiter.clone()), limiter)
    } else {
        (connector, limiter)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_replicate_jobs_complete_with_stored_outputs_and_cost() {
    within(HARD_LIMIT, async {
        let fake = FakeReplicate::start(Some("r8-test"));
        let mut rig = Rig::start(1).await;
        let streamed: Arc<dyn Connector> = Arc::new(replicate(&fake, "stream = true"));
        let polled: Arc<dyn Connector> = Arc::new(replicate(
            &fake,
            "stream = false\n[connectors.replicate.aliases]\nflux = \"bfl/flux-schnell\"",
        ));
        rig.spawn(0, "w-stream", &[("replicate", streamed)]);
        let id = rig
            .submit(
                "replicate",
                json!({"model": "acme/painter", "input": {"prompt": "a cat", "fake_ms": 400}}),
                "c1",
            )
            .await;
        rig.wait_status(&id, &["completed"]).await;
        let data = rig.result(&id).await;
        assert_eq!(data["status"], "succeeded");
        assert_eq!(data["model"], "acme/painter");
        let artifact = &data["artifacts"][0];
        assert_eq!(
            std::fs::read(stored_file(artifact)).expect("the output is stored"),
            testkit::TINY_PNG
        );
        let billing = Billing::from_result(&data).expect("the result carries its billing");
        assert_eq!(
            (billing.connector.as_str(), billing.customer.as_str(), billing.requests),
            ("replicate", "c1", 1)
        );
        assert!((billing.predict_seconds - 0.4).abs() < 1e-6, "{billing:?}");
        assert!((billing.cost - 0.2).abs() < 1e-6, "0.4 s at 0.5 USD/s: {billing:?}");
        assert_eq!(fake.streams(), 1, "the prediction was followed through urls.stream");
        let reported = rig.progress(&id, "running on Replicate").await;
        assert!(
            reported.iter().any(|p| *p >= 10.0 && *p < 100.0),
            "progress from the logs' percentages reached Redis: {reported:?}"
        );
        let polls_after_stream = fake.polls();
        assert!(
            polls_after_stream <= 2,
            "the stream needs one read of the result, not polling: {polls_after_stream}"
        );

        // An alias service, followed by polling.
        rig.spawn(0, "w-poll", &[("replicate:flux", polled)]);
        let id = rig
            .submit("replicate:flux", json!({"prompt": "a dog", "fake_ms": 300}), "")
            .await;
        rig.wait_status(&id, &["completed"]).await;
        let data = rig.result(&id).await;
        assert!(data["artifacts"][0]["url"].is_string(), "{data}");
        assert_eq!(fake.creates().last().expect("a create").0, "bfl/flux-schnell");
        assert!(fake.polls() > polls_after_stream + 2, "polling mode polls urls.get");
        assert_eq!(fake.streams(), 1);
        rig.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_replicate_cancel_reaches_the_api_and_input_errors_do_not_retry() {
    within(HARD_LIMIT, async {
        let fake = FakeReplicate::start(None);
        let mut rig = Rig::start(1).await;
        let c: Arc<dyn Connector> = Arc::new(replicate(&fake, "stream = true"));
        rig.spawn(0, "w1", &[("replicate", c)]);

        let id = rig
            .submit(
                "replicate",
                json!({"model": "acme/slow", "input": {"fake_ms": 20000}}),
                "",
            )
            .await;
        rig.wait_status(&id, &["in_progress"]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cancelled_at = Instant::now();
        rig.broker().cancel(&id).await.expect("cancel");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.cancels().is_empty() {
            assert!(Instant::now() < deadline, "the cancel never reached Replicate");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        println!("cancel reached the API after {:?}", cancelled_at.elapsed());
        assert_eq!(fake.cancels().len(), 1);

        let id = rig
            .submit("replicate", json!({"version": "bad-version", "input": {}}), "")
            .await;
        let job = rig.wait_status(&id, &["failed"]).await;
        let error = &job["error"];
        assert!(
            error.contains("Invalid version or not permitted") && error.contains("HTTP 422"),
            "{error}"
        );
        assert_eq!(job["retry_count"], "1", "an input error is not retried: {job:?}");

        // A 429 with Retry-After: 1 is honoured, then the prediction is created.
        fake.fail_next(429, Some("1"));
        let before = fake.creates().len();
        let id = rig
            .submit("replicate", json!({"model": "acme/x", "input": {"fake_ms": 100}}), "")
            .await;
        rig.wait_status(&id, &["completed"]).await;
        let creates = fake.creates();
        let gap = creates[before + 1].1 - creates[before].1;
        assert!(gap >= Duration::from_millis(950), "Retry-After: 1 waited only {gap:?}");
        let billing = Billing::from_result(&rig.result(&id).await).expect("billing");
        assert_eq!(billing.requests, 1, "a request refused with 429 is not billed");
        rig.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_runpod_jobs_run_sync_and_async_and_cancel() {
    within(HARD_LIMIT, async {
        let fake = FakeRunpod::start(Some("rp-test"));
        let mut rig = Rig::start(1).await;
        let c: Arc<dyn Connector> = Arc::new(runpod(&fake));
        rig.spawn(0, "w1", &[("runpod", c)]);

        let id = rig
            .submit("runpod", json!({"input": {"prompt": "p1", "fake_ms": 500}}), "c9")
            .await;
        rig.wait_status(&id, &["completed"]).await;
        let data = rig.result(&id).await;
        assert_eq!(
            (data["status"].as_str(), data["endpoint_id"].as_str()),
            (Some("COMPLETED"), Some("ep-default"))
        );
        assert_eq!(data["output"]["prompt"], "p1");
        assert_eq!(
            std::fs::read(stored_file(&data["artifacts"][0])).expect("stored"),
            testkit::TINY_PNG
        );
        let b = Billing::from_result(&data).expect("billing");
        assert!(
            (b.predict_seconds - 0.4).abs() < 1e-6 && (b.cost - (0.01 + 0.8)).abs() < 1e-6,
            "{b:?}"
        );
        assert!(fake.statuses() >= 2, "the job was followed through /status");

        let statuses = fake.statuses();
        let id = rig
            .submit(
                "runpod",
                json!({"endpoint_id": "ep-other", "sync": true, "input": {"prompt": "p2", "fake_ms": 200}}),
                "",
            )
            .await;
        rig.wait_status(&id, &["completed"]).await;
        assert_eq!(fake.runsyncs(), 0, "a sync job's id is known before it is waited on");
        assert!(fake.statuses() > statuses, "a sync job is followed through /status");
        assert_eq!(fake.runs().last().expect("a run").0, "ep-other");

        // A sync job cancelled while it is waited on: the cancel reaches RunPod.
        let id = rig
            .submit("runpod", json!({"sync": true, "input": {"fake_ms": 20000}}), "")
            .await;
        rig.wait_status(&id, &["in_progress"]).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        rig.broker().cancel(&id).await.expect("cancel");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.cancels().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the cancel of a sync job never reached RunPod"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(fake.jobs().iter().filter(|(_, s)| s == "CANCELLED").count(), 1);

        let id = rig.submit("runpod", json!({"input": {"fake_ms": 20000}}), "").await;
        rig.wait_status(&id, &["in_progress"]).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
        rig.broker().cancel(&id).await.expect("cancel");
        let deadline = Instant::now() + Duration::from_secs(5);
        while fake.cancels().len() < 2 {
            assert!(Instant::now() < deadline, "the cancel never reached RunPod");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }

        let id = rig
            .submit(
                "runpod",
                json!({"endpoint_id": "ep1", "input": {"fake_fail": "CUDA out of memory"}}),
                "",
            )
            .await;
        let job = rig.wait_status(&id, &["failed"]).await;
        assert!(job["error"].contains("CUDA out of memory"), "{job:?}");
        rig.stop().await;
    })
    .await;
}

fn limited_openai(fake: &FakeOpenai, limits: &str, broker: &Broker) -> Arc<dyn Connector> {
    limited_openai_with(fake, limits, broker).0
}

fn limited_openai_with(fake: &FakeOpenai, limits: &str, broker: &Broker) -> (Arc<dyn Connector>, Arc<Limiter>) {
    let c = config(&format!(
        "[connectors.openai]\nbase_url = \"{}\"\nbackoff_initial = \"20ms\"\n[connectors.openai.limits]\n{limits}\n[connectors.openai.prices]\nper_1k_input_tokens = 1.0\nper_1k_output_tokens = 2.0\n",
        fake.base_url()
    ));
    let limiter = Arc::new(Limiter::new("openai", c.plan.openai.limits.clone()));
    limiter.attach(broker.clone());
    (
        Arc::new(OpenaiConnector::new(c.plan.openai, None).with_limiter(limiter.clone())),
        limiter,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn external_fleet_rate_limit_holds_across_two_machines() {
    within(HARD_LIMIT, async {
        let fake = FakeOpenai::start(None);
        let mut rig = Rig::start(2).await;
        for m in 0..2 {
            // Each machine has its own limiter and broker; only Redis is shared.
            let c = limited_openai(&fake, "requests_per_second = 5", &rig.machines[m].broker);
            for w in 0..3 {
                rig.spawn(m, &format!("m{m}-openai-{w}"), &[("openai_text", c.clone())]);
            }
        }
        let started = Instant::now();
        let mut ids = Vec::new();
        for i in 0..30 {
            ids.push(
                rig.submit("openai_text", json!({"prompt": format!("job {i}")}), "")
                    .await,
            );
        }
        for id in &ids {
            rig.wait_status(id, &["completed"]).await;
        }
        let took = started.elapsed();
        let arrivals: Vec<Instant> = fake.requests().into_iter().map(|(_, t)| t).collect();
        assert_eq!(arrivals.len(), 30);
        // The most requests in any one-second window, checked from each arrival.
        let max_in_window = arrivals
            .iter()
            .map(|a| {
                arrivals
                    .iter()
                    .filter(|b| **b >= *a && **b < *a + Duration::from_secs(1))
                    .count()
            })
            .max()
            .unwrap_or(0);
        println!("30 requests through a 5/s fleet limit took {took:?}; busiest 1 s window: {max_in_window}");
        // Tolerance of one: requests are admitted by Redis' clock and counted on arrival at the
        // fake, so network jitter can move one arrival across a window's edge.
        assert!(max_in_window <= 6, "a one-second window saw {max_in_window} requests");
        assert!(
            took >= Duration::from_millis(5500),
            "30 requests at 5/s cannot finish in {took:?}"
        );
        rig.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_daily_quota_keeps_jobs_pending_with_the_reason() {
    within(HARD_LIMIT, async {
        let fake = FakeOpenai::start(None);
        let mut rig = Rig::start(1).await;
        let (c, limiter) = limited_openai_with(
            &fake,
            "daily_requests = 2\nzone = \"Europe/Paris\"\n[connectors.openai.limits.customer]\ndaily_requests = 1",
            rig.broker(),
        );
        let sim: Arc<dyn Connector> = Arc::new(SimulationConnector::new(SimulationConfig {
            duration: Duration::from_millis(20),
            steps: 2,
            failure_rate: 0.0,
        }));
        rig.spawn(0, "w1", &[("openai_text", c), ("simulation", sim)]);

        // Customer c1 may make one request a day: its second job waits, c2's job runs.
        let a = rig
            .submit("openai_text", json!({"prompt": "one two three"}), "c1")
            .await;
        rig.wait_status(&a, &["completed"]).await;
        let data = rig.result(&a).await;
        let b = Billing::from_result(&data).expect("billing");
        assert_eq!((b.input_tokens, b.output_tokens), (3, 4), "{data}");
        assert!((b.cost - (0.003 + 0.008)).abs() < 1e-9, "{b:?}");
        let waiting = rig.submit("openai_text", json!({"prompt": "again"}), "c1").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut job = rig.job(&waiting).await;
        while !job.contains_key("limit_reason") {
            assert!(Instant::now() < deadline, "no reason recorded: {job:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
            job = rig.job(&waiting).await;
        }
        assert_eq!(job["status"], "pending", "{job:?}");
        assert!(
            job["limit_reason"].contains("customer c1") && job["limit_reason"].contains("1 requests"),
            "{job:?}"
        );
        let other = rig
            .submit("openai_text", json!({"prompt": "other customer"}), "c2")
            .await;
        rig.wait_status(&other, &["completed"]).await;
        assert!(job.contains_key("limit_until"), "{job:?}");

        // Now the API's own quota (2) is used up: every openai job waits; other work goes on.
        let third = rig.submit("openai_text", json!({"prompt": "c3"}), "c3").await;
        let sim_job = rig.submit("simulation", json!({}), "").await;
        rig.wait_status(&sim_job, &["completed"]).await;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let job = rig.job(&third).await;
            if job.get("limit_reason").is_some_and(|r| r.contains("the openai API")) {
                assert_eq!(job["status"], "pending");
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the API quota never stopped the job: {job:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            fake.requests().len(),
            2,
            "no request beyond the daily quota reached the API"
        );
        assert_eq!(rig.job(&waiting).await["status"], "pending");
        // What /status, /metrics and the fleet status show, read from Redis.
        let usage = limiter.usage().await.expect("usage");
        assert_eq!(
            (usage.requests, usage.tokens, usage.daily_requests),
            (2, (3 + 4) + (2 + 3), Some(2)),
            "{usage:?}"
        );
        let stats = limiter.stats();
        assert_eq!((stats.admitted, stats.quota_refusals), (2, 2), "{stats:?}");

        // The reason is what `machine jobs show` prints.
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_machine"))
            .args(["jobs", "show", &third])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HUB_REDIS_URL", rig.server.url())
            .output()
            .expect("the machine binary runs");
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            stdout.contains("limit_reason") && stdout.contains("daily quota"),
            "{stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        rig.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_runpod_key_refusals_are_not_retried_and_name_the_apis_message() {
    within(HARD_LIMIT, async {
        let fake = FakeRunpod::start(Some("rp-right"));
        let c = config(&format!(
            "[connectors.runpod]\nbase_url = \"{}\"\nendpoint_id = \"ep\"\nbackoff_initial = \"20ms\"\n",
            fake.base_url()
        ));
        let connector = RunpodConnector::new(c.plan.runpod, Some("rp-wrong".into()));
        let job = machine::connectors::Job {
            id: "j1".into(),
            service_required: "runpod".into(),
            payload: json!({"input": {"prompt": "x"}}),
            customer_id: String::new(),
            ctx: Value::Null,
            timeout: None,
        };
        let (sink, _rx) = machine::connectors::ProgressSink::new();
        let err = connector
            .run(&job, &sink, &CancellationToken::new())
            .await
            .expect_err("a wrong key is refused");
        // The machine's key, not the job, is refused: the worker holds, the job is not failed.
        assert!(
            matches!(&err, machine::connectors::ConnectorError::CredentialsRefused { api, credit: false, .. } if api == "runpod"),
            "{err:?}"
        );
        assert!(
            err.chain().contains("HTTP 401") && err.chain().contains("Unauthorized"),
            "{}",
            err.chain()
        );
        assert_eq!(fake.runs().len(), 1, "a 4xx is not retried");
    })
    .await;
}

/// The whole machine with an OpenAI worker: a job's usage and cost reach `/status`, `/metrics`
/// and the fleet status message, as the operator and the fleet monitor read them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_usage_and_cost_reach_status_metrics_and_the_fleet() {
    let server = RedisServer::start();
    let fake = FakeOpenai::start(Some("sk-e2e"));
    let ws = tempfile::tempdir().expect("temp dir");
    let port = testkit::free_port();
    let config = ws.path().join("machine.toml");
    std::fs::write(
        &config,
        format!(
            "[connectors.openai]\nbase_url = \"{}\"\n[connectors.openai.limits]\ndaily_requests = 100\n\
             [connectors.openai.prices]\nper_request = 0.25\n[health]\nmetrics_customers = [\"c9\"]\n",
            fake.base_url()
        ),
    )
    .expect("write the config");
    /// Kills the machine when the test ends, passed or not.
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _machine = Kill(
        crate::support::machine()
            .arg("run")
            .env("MACHINE_CONFIG", &config)
            .env("MACHINE_ID", "xm1")
            .env("MACHINE_HEALTH_PORT", port.to_string())
            .env("MACHINE_WORKSPACE", ws.path())
            .env("HUB_REDIS_URL", server.url())
            .env("WORKER_CONNECTORS", "openai:1")
            .env("OPENAI_API_KEY", "sk-e2e")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the machine starts"),
    );

    let shutdown = CancellationToken::new();
    let m = machine(&server.url(), &shutdown).await;
    let mut job = NewJob::new("openai_text", json!({"prompt": "one two three"}));
    job.customer_id = "c9".to_owned();
    let id = m.broker.submit(&job).await.expect("submit");
    let http = reqwest::Client::new();
    let base = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + LIMIT;
    loop {
        let view = m.broker.show(&id).await.expect("show").expect("the job exists");
        if view.job.state() == machine::broker::JobState::Completed {
            break;
        }
        assert!(Instant::now() < deadline, "the job never completed: {:?}", view.job);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // /metrics: the job's cost and requests, per connector and customer.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = match http.get(format!("{base}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        let has = |line: &str| metrics.lines().any(|l| l.starts_with(line));
        if has("machine_external_cost_total{connector=\"openai\",customer=\"c9\",currency=\"USD\"} 0.25")
            && has("machine_external_requests_total{connector=\"openai\",customer=\"c9\"} 1")
            && has("machine_limit_requests_today{api=\"openai\"} 1")
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "usage and cost never reached /metrics:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // /status and the fleet status message: today's fleet-wide usage of the API.
    let status: Value = http
        .get(format!("{base}/status"))
        .send()
        .await
        .expect("/status answers")
        .json()
        .await
        .expect("/status is JSON");
    let api = &status["external_apis"]["openai"];
    assert_eq!(api["today"]["requests"], 1, "{status}");
    assert_eq!(api["today"]["daily_requests"], 100, "{status}");
    assert_eq!(api["this_machine"]["admitted"], 1, "{status}");
    let customer = &api["customers"]["c9"];
    assert_eq!(
        (customer["requests"].as_u64(), customer["cost"].as_f64()),
        (Some(1), Some(0.25)),
        "{status}"
    );

    let mut conn = redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let stored: Option<String> = conn.get("machine:xm1:status").await.expect("read the stored status");
        let msg: Value = stored
            .as_deref()
            .and_then(|s| serde_json::from_str(s).ok())
            .unwrap_or(Value::Null);
        if msg["status"]["external_apis"]["openai"]["today"]["requests"] == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the fleet status never carried the usage: {msg}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    shutdown.cancel();
    let _ = m.events.await;
}

/// Outputs inline in an API's answer (RunPod worker-comfyui's base64 images, Replicate `data:`
/// URIs) and files nested in objects of lists are stored, never left in Redis; a result that
/// would still be too large for Redis fails loudly instead of being written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_inline_and_nested_outputs_are_stored_never_left_in_redis() {
    within(HARD_LIMIT, async {
        let runpod_fake = FakeRunpod::start(Some("rp-test"));
        let replicate_fake = FakeReplicate::start(Some("r8-test"));
        let mut rig = Rig::start(1).await;
        let rp: Arc<dyn Connector> = Arc::new(runpod(&runpod_fake));
        let r8: Arc<dyn Connector> = Arc::new(replicate(&replicate_fake, "stream = false"));
        rig.spawn(0, "w1", &[("runpod", rp), ("replicate", r8)]);

        // RunPod's worker-comfyui default: a 3 MiB image inline as base64.
        let size = 3 * 1024 * 1024;
        let id = rig
            .submit(
                "runpod",
                json!({"input": {"fake_output": "worker-comfyui", "fake_image_bytes": size, "fake_ms": 100}}),
                "",
            )
            .await;
        rig.wait_status(&id, &["completed"]).await;
        let record = rig.completion_record(&id).await;
        assert!(record.len() < 8 * 1024, "{} bytes in jobs:completed", record.len());
        let data = rig.result(&id).await;
        let stored = std::fs::read(stored_file(&data["artifacts"][0])).expect("the image is stored");
        assert_eq!(stored.len(), size);
        assert!(stored.starts_with(&testkit::TINY_PNG[..8]), "a PNG");
        assert_eq!(data["image_url"], data["artifacts"][0]["url"], "{data}");
        assert_eq!(data["output"]["images"][0]["data"], "artifacts[0]", "{data}");
        assert_eq!(data["output"]["images"][0]["filename"], "ComfyUI_00001_.png");

        // Replicate: Cog's Output(BaseModel), an object of lists, and a data: URI.
        let files = replicate_fake.base_url().replace("/v1", "/files");
        let png = base64::engine::general_purpose::STANDARD.encode(testkit::TINY_PNG);
        let output = json!({"images": [format!("{files}/a.png"), format!("{files}/b.png")], "seed": 7,
                            "preview": {"thumb": format!("data:image/png;base64,{png}")}});
        let id = rig
            .submit(
                "replicate",
                json!({"model": "acme/cog", "input": {"fake_ms": 100, "fake_output": output}}),
                "",
            )
            .await;
        rig.wait_status(&id, &["completed"]).await;
        let data = rig.result(&id).await;
        let artifacts = data["artifacts"].as_array().expect("artifacts");
        assert_eq!(artifacts.len(), 3, "{data}");
        for a in artifacts {
            assert_eq!(std::fs::read(stored_file(a)).expect("stored"), testkit::TINY_PNG, "{a}");
        }
        assert_eq!(data["output"]["seed"], 7);
        assert_eq!(data["output"]["preview"]["thumb"], "artifacts[2]", "{data}");

        // Text too large for Redis (no file to store): the job fails, without retry, saying so.
        let big = "x".repeat(machine::connectors::store::MAX_RESULT_BYTES + 10);
        let id = rig
            .submit(
                "runpod",
                json!({"input": {"fake_ms": 50, "fake_output": {"text": big}}}),
                "",
            )
            .await;
        let job = rig.wait_status(&id, &["failed"]).await;
        assert!(job["error"].contains("a result may hold in Redis"), "{}", job["error"]);
        assert_eq!(job["retry_count"], "1", "not retried: {job:?}");
        rig.stop().await;
    })
    .await;
}

/// A create answered with a 5xx, or not at all, after the API acted on it is not sent again:
/// the job goes back to the queue as the machine's fault (no retry spent) with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_creates_are_not_repeated_once_the_api_may_have_acted() {
    within(HARD_LIMIT, async {
        let r8 = FakeReplicate::start(Some("r8-test"));
        let rp = FakeRunpod::start(Some("rp-test"));
        let mut rig = Rig::start(1).await;
        let replicate_c: Arc<dyn Connector> = Arc::new(replicate(&r8, "stream = false"));
        let runpod_c: Arc<dyn Connector> = Arc::new(runpod_with(&rp, "request_timeout = \"500ms\"").0);
        rig.spawn(0, "w1", &[("replicate", replicate_c), ("runpod", runpod_c)]);

        for (service, payload) in [
            ("replicate", json!({"model": "acme/x", "input": {"fake_ms": 100}})),
            ("runpod", json!({"input": {"fake_ms": 100}})),
        ] {
            if service == "replicate" {
                r8.act_then_fail(Some(500));
            } else {
                rp.act_then_fail(None);
            }
            let id = rig.submit(service, payload, "").await;
            let job = rig.wait_status(&id, &["completed"]).await;
            assert_eq!(job.get("machine_returns").map(String::as_str), Some("1"), "{job:?}");
            let reasons = job.get("machine_return_reasons").cloned().unwrap_or_default();
            assert!(reasons.contains("may have been created upstream"), "{reasons}");
            assert_eq!(
                job.get("retry_count").map(String::as_str),
                Some("0"),
                "no retry spent: {job:?}"
            );
        }
        // One create per attempt: the unanswered one was not repeated at once.
        assert_eq!(r8.creates().len(), 2);
        assert_eq!(r8.predictions().len(), 2);
        assert_eq!(rp.runs().len(), 2);
        rig.stop().await;
    })
    .await;
}

/// Providers bill failed and cancelled work: every attempt's usage is on the job, and a request
/// refused with 429 is not charged.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_usage_is_recorded_for_every_billed_attempt() {
    within(HARD_LIMIT, async {
        let r8 = FakeReplicate::start(Some("r8-test"));
        let rp = FakeRunpod::start(Some("rp-test"));
        let mut rig = Rig::start(1).await;
        let replicate_c: Arc<dyn Connector> = Arc::new(replicate(&r8, "stream = false"));
        let runpod_c: Arc<dyn Connector> = Arc::new(runpod(&rp));
        rig.spawn(0, "w1", &[("replicate", replicate_c), ("runpod", runpod_c)]);
        let usage = |job: &BTreeMap<String, String>, field: &str| -> f64 {
            job.get(field).and_then(|v| v.parse().ok()).unwrap_or(0.0)
        };

        // A failed prediction ran 0.4 s: billed at 0.5/s.
        let id = rig
            .submit(
                "replicate",
                json!({"model": "acme/x", "input": {"fake_ms": 400, "fake_fail": "NSFW content detected"}}),
                "c1",
            )
            .await;
        let job = rig.wait_status(&id, &["failed"]).await;
        assert_eq!(usage(&job, "usage_requests"), 1.0, "{job:?}");
        assert!((usage(&job, "usage_predict_seconds") - 0.4).abs() < 1e-6, "{job:?}");
        assert!((usage(&job, "usage_cost") - 0.2).abs() < 1e-6, "{job:?}");
        assert_eq!(job.get("usage_currency").map(String::as_str), Some("USD"));

        // A RunPod job cancelled while running: the request and the time it ran are billed.
        // (It waits in RunPod's queue for 0.6 s, then runs until cancelled.)
        let id = rig.submit("runpod", json!({"input": {"fake_ms": 3000}}), "c1").await;
        rig.wait_status(&id, &["in_progress"]).await;
        tokio::time::sleep(Duration::from_millis(1200)).await;
        rig.broker().cancel(&id).await.expect("cancel");
        let deadline = Instant::now() + Duration::from_secs(10);
        let job = loop {
            let job = rig.job(&id).await;
            if job.contains_key("usage_requests") {
                break job;
            }
            assert!(Instant::now() < deadline, "no usage recorded: {job:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(usage(&job, "usage_requests"), 1.0, "{job:?}");
        let ran = usage(&job, "usage_predict_seconds");
        assert!(ran > 0.1 && ran < 2.4, "{job:?}");
        assert!((usage(&job, "usage_cost") - (0.01 + 2.0 * ran)).abs() < 1e-6, "{job:?}");
        rig.stop().await;
    })
    .await;
}

/// What a job says while it waits, RunPod's `{"progress": N}` updates, and Replicate
/// deployments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_progress_messages_and_deployments() {
    within(HARD_LIMIT, async {
        let r8 = FakeReplicate::start(Some("r8-test"));
        let rp = FakeRunpod::start(Some("rp-test"));
        let mut rig = Rig::start(1).await;
        let (runpod_c, limiter) = runpod_with(&rp, "[connectors.runpod.limits]\nrequests_per_minute = 20");
        limiter.attach(rig.broker().clone());
        let runpod_c: Arc<dyn Connector> = Arc::new(runpod_c);
        let replicate_c: Arc<dyn Connector> = Arc::new(replicate(&r8, "stream = false"));
        rig.spawn(0, "w1", &[("runpod", runpod_c), ("replicate", replicate_c)]);

        let first = rig
            .submit(
                "runpod",
                json!({"input": {"fake_ms": 1500, "fake_progress": "object"}}),
                "",
            )
            .await;
        let second = rig.submit("runpod", json!({"input": {"fake_ms": 50}}), "").await;
        rig.wait_status(&first, &["completed"]).await;
        let reported = rig.progress(&first, "running on RunPod").await;
        assert!(
            reported.iter().any(|p| *p > 5.0 && *p < 100.0),
            "{{\"progress\": N}} updates reached Redis: {reported:?}"
        );
        rig.wait_status(&second, &["completed"]).await;
        let waited = rig
            .progress(&second, "waiting for the fleet-wide rate limit of the runpod API")
            .await;
        assert!(!waited.is_empty(), "the wait for the rate limit was reported");

        let id = rig
            .submit(
                "replicate",
                json!({"deployment": "acme/sdxl-prod", "input": {"fake_ms": 100}}),
                "",
            )
            .await;
        rig.wait_status(&id, &["completed"]).await;
        assert_eq!(r8.creates().last().expect("a create").0, "deployments/acme/sdxl-prod");
        assert_eq!(rig.result(&id).await["model"], "deployments/acme/sdxl-prod");
        rig.stop().await;
    })
    .await;
}

/// The whole machine with a RunPod worker: a worker-comfyui base64 image lands in the output
/// store, a `/run` answered 500 after RunPod queued the job is not repeated and is counted as a
/// possible orphan, and a sync job cancelled while it is waited on is cancelled at RunPod.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_runpod_on_the_whole_machine() {
    let server = RedisServer::start();
    let fake = FakeRunpod::start(Some("rp-e2e"));
    let ws = tempfile::tempdir().expect("temp dir");
    let port = testkit::free_port();
    let config = ws.path().join("machine.toml");
    std::fs::write(
        &config,
        format!(
            "[connectors.runpod]\nbase_url = \"{}\"\nendpoint_id = \"ep\"\npoll_interval = \"100ms\"\n",
            fake.base_url()
        ),
    )
    .expect("write the config");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _machine = Kill(
        crate::support::machine()
            .arg("run")
            .env("MACHINE_CONFIG", &config)
            .env("MACHINE_ID", "xm2")
            .env("MACHINE_HEALTH_PORT", port.to_string())
            .env("MACHINE_WORKSPACE", ws.path())
            .env("HUB_REDIS_URL", server.url())
            .env("WORKER_CONNECTORS", "runpod:1")
            .env("RUNPOD_API_KEY", "rp-e2e")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("the machine starts"),
    );
    let shutdown = CancellationToken::new();
    let m = machine(&server.url(), &shutdown).await;
    let wait = |id: String, status: &'static str| {
        let broker = m.broker.clone();
        async move {
            let deadline = Instant::now() + LIMIT;
            loop {
                let job = broker
                    .show(&id)
                    .await
                    .expect("show")
                    .expect("the job exists")
                    .job
                    .stored()
                    .clone();
                if job.get("status").map(String::as_str) == Some(status) {
                    return job;
                }
                assert!(Instant::now() < deadline, "the job never became {status}: {job:?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // A 1 MiB image inline as base64: stored in the workspace, only its URL in Redis.
    let job = NewJob::new(
        "runpod",
        json!({"input": {"fake_output": "worker-comfyui", "fake_image_bytes": 1 << 20, "fake_ms": 100}}),
    );
    let id = m.broker.submit(&job).await.expect("submit");
    wait(id.clone(), "completed").await;
    let mut conn = redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let raw: String = conn.hget("jobs:completed", &id).await.expect("a completion record");
    assert!(raw.len() < 8 * 1024, "{} bytes in jobs:completed", raw.len());
    let record: Value = serde_json::from_str(&raw).expect("JSON");
    let stored = std::fs::read(stored_file(&record["data"]["artifacts"][0])).expect("the image is stored");
    assert_eq!(stored.len(), 1 << 20);

    // RunPod queues the job, then answers 500: not sent again, counted, the job returned.
    fake.act_then_fail(Some(500));
    let id = m
        .broker
        .submit(&NewJob::new("runpod", json!({"input": {"fake_ms": 100}})))
        .await
        .expect("submit");
    let job = wait(id, "completed").await;
    assert_eq!(job.get("machine_returns").map(String::as_str), Some("1"), "{job:?}");
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = match http.get(format!("http://127.0.0.1:{port}/metrics")).send().await {
            Ok(r) => r.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if metrics.contains("machine_external_possible_orphans_total{api=\"runpod\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "no possible orphan counted:\n{metrics}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A sync job cancelled while the machine waits on it: the cancel reaches RunPod.
    let id = m
        .broker
        .submit(&NewJob::new(
            "runpod",
            json!({"sync": true, "input": {"fake_ms": 20000}}),
        ))
        .await
        .expect("submit");
    wait(id.clone(), "in_progress").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    m.broker.cancel(&id).await.expect("cancel");
    let deadline = Instant::now() + Duration::from_secs(10);
    while fake.cancels().is_empty() {
        assert!(Instant::now() < deadline, "the cancel never reached RunPod");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(fake.runsyncs(), 0);
    assert!(
        fake.jobs().iter().all(|(_, s)| s != "IN_PROGRESS" && s != "IN_QUEUE"),
        "{:?}",
        fake.jobs()
    );
    shutdown.cancel();
    let _ = m.events.await;
}

/// A refused key, or an account out of credit, is the machine's problem, not the jobs': the job
/// goes back untouched, the worker stops taking that API's work, re-checks, and carries on once
/// the API accepts it again; no job fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_refused_credentials_hold_the_worker_not_fail_the_queue() {
    within(HARD_LIMIT, async {
        // The API expects another token than the machine's: every request is refused (401).
        let fake = FakeReplicate::start(Some("r8-rotated"));
        let mut rig = Rig::start(1).await;
        let c: Arc<dyn Connector> = Arc::new(replicate(&fake, "stream = false"));
        rig.spawn(0, "w1", &[("replicate", c)]);
        let mut ids = Vec::new();
        for i in 0..3 {
            ids.push(
                rig.submit(
                    "replicate",
                    json!({"model": "acme/x", "input": {"fake_ms": 50, "i": i}}),
                    "",
                )
                .await,
            );
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while fake.creates().is_empty() {
            assert!(Instant::now() < deadline, "no create was tried");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(2500)).await;
        assert_eq!(fake.creates().len(), 1, "a held worker takes no more of the API's jobs");
        for id in &ids {
            let job = rig.job(id).await;
            assert_eq!(job["status"], "pending", "{job:?}");
            assert_eq!(
                job.get("retry_count").map(String::as_str).unwrap_or("0"),
                "0",
                "{job:?}"
            );
        }

        // The key is accepted again (the cheap re-check passes): every job completes.
        fake.set_key("r8-test");
        for id in &ids {
            rig.wait_status(id, &["completed"]).await;
        }

        // Out of credit: held again, released by one real request once credit is back.
        fake.set_out_of_credit(true);
        let before = fake.creates().len();
        let id = rig
            .submit("replicate", json!({"model": "acme/x", "input": {"fake_ms": 50}}), "")
            .await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while fake.creates().len() == before {
            assert!(Instant::now() < deadline, "no create was tried");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Probed with the job itself at a growing interval (the re-check period, 300 ms here,
        // doubling with each refusal): never failed, never a retry spent.
        tokio::time::sleep(Duration::from_millis(6000)).await;
        let job = rig.job(&id).await;
        assert!(matches!(job["status"].as_str(), "pending" | "in_progress"), "{job:?}");
        let probes: Vec<Instant> = fake.creates()[before..].iter().map(|(_, at)| *at).collect();
        let gaps: Vec<Duration> = probes.windows(2).map(|w| w[1] - w[0]).collect();
        // At a fixed 300 ms there would be some 15 probes in 6 s; doubling gives about 5.
        assert!(
            (3..=7).contains(&probes.len()) && *gaps.last().expect("gaps") > 2 * gaps[0],
            "each probe waits longer than the ones before: {gaps:?}"
        );
        fake.set_out_of_credit(false);
        let job = rig.wait_status(&id, &["completed"]).await;
        assert_eq!(job.get("retry_count").map(String::as_str), Some("0"), "{job:?}");
        rig.stop().await;
    })
    .await;
}

/// A machine process for the whole-machine tests below, killed when dropped.
struct WholeMachine {
    _child: crate::support::KillOnDrop,
    port: u16,
    dir: tempfile::TempDir,
}

const CONTROL: &str = "external-control-token";

impl WholeMachine {
    /// Starts `machine run` with `connectors` (as `WORKER_CONNECTORS`), the file `toml` and the
    /// variables `env`, its log in the workspace folder.
    fn start(redis_url: &str, connectors: &str, toml: &str, env: &[(&str, String)]) -> WholeMachine {
        let dir = tempfile::tempdir().expect("temp dir");
        let config = dir.path().join("machine.toml");
        std::fs::write(&config, toml).expect("write the config");
        let port = testkit::free_port();
        let log = std::fs::File::create(dir.path().join("machine.log")).expect("log file");
        let mut cmd = crate::support::machine();
        cmd.arg("run")
            .env("MACHINE_CONFIG", &config)
            .env("MACHINE_ID", "xk")
            .env("MACHINE_HEALTH_PORT", port.to_string())
            .env("MACHINE_WORKSPACE", dir.path().join("ws"))
            .env("MACHINE_CONTROL_TOKEN", CONTROL)
            .env("HUB_REDIS_URL", redis_url)
            .env("WORKER_CONNECTORS", connectors)
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("the machine starts");
        WholeMachine {
            _child: child.into(),
            port,
            dir,
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("machine.log")).unwrap_or_default()
    }

    /// `machine status --json` of this machine.
    fn status(&self) -> Option<Value> {
        let out = crate::support::machine()
            .args(["status", "--json", "--url", &self.url()])
            .env("MACHINE_CONTROL_TOKEN", CONTROL)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// `machine jobs show <id>`'s output.
    fn show(&self, redis_url: &str, id: &str) -> String {
        let out = crate::support::machine()
            .args(["jobs", "show", id, "--redis-url", redis_url])
            .output()
            .expect("the machine binary runs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// The real binary with a key that every API refuses, each given in the file its `<NAME>_FILE`
/// names: no job fails or spends a retry, each API's worker is held with the reason on
/// `machine status` and `/ready`, and once the corrected keys are in the files, `machine reload`
/// reads them and every job completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_revoked_keys_hold_each_api_until_a_reload_reads_the_corrected_key_files() {
    let server = RedisServer::start();
    let openai = FakeOpenai::start(Some("sk-good"));
    let r8 = FakeReplicate::start(Some("r8-good"));
    let rp = FakeRunpod::start(Some("rp-good"));
    let keys = tempfile::tempdir().expect("temp dir");
    let files = [
        ("OPENAI_API_KEY", "sk-good"),
        ("REPLICATE_API_TOKEN", "r8-good"),
        ("RUNPOD_API_KEY", "rp-good"),
    ];
    let mut env: Vec<(&str, String)> = Vec::new();
    for (var, file_var) in [
        ("OPENAI_API_KEY", "OPENAI_API_KEY_FILE"),
        ("REPLICATE_API_TOKEN", "REPLICATE_API_TOKEN_FILE"),
        ("RUNPOD_API_KEY", "RUNPOD_API_KEY_FILE"),
    ] {
        let path = keys.path().join(var);
        std::fs::write(&path, "revoked\n").expect("write a key file");
        env.push((file_var, path.display().to_string()));
    }
    let toml = format!(
        "[worker]\nhold_recheck = \"1s\"\n\n[connectors.openai]\nbase_url = \"{}\"\n\n\
         [connectors.replicate]\nbase_url = \"{}\"\nstream = false\n\n\
         [connectors.runpod]\nbase_url = \"{}\"\nendpoint_id = \"ep\"\npoll_interval = \"100ms\"\n",
        openai.base_url(),
        r8.base_url(),
        rp.base_url()
    );
    let m = WholeMachine::start(&server.url(), "openai:1,replicate:1,runpod:1", &toml, &env);
    let shutdown = CancellationToken::new();
    let client = machine(&server.url(), &shutdown).await;
    let broker = client.broker.clone();
    let jobs = [
        ("openai_text", json!({"prompt": "one two three"})),
        ("replicate", json!({"model": "acme/x", "input": {"fake_ms": 50}})),
        ("runpod", json!({"input": {"fake_ms": 50}})),
    ];
    let mut ids = Vec::new();
    for (service, payload) in &jobs {
        ids.push(
            broker
                .submit(&NewJob::new(*service, payload.clone()))
                .await
                .expect("submit"),
        );
    }

    // Every API's worker is held with its API's words; /ready names them as not claiming.
    let deadline = Instant::now() + LIMIT;
    let reasons = loop {
        let reasons: Vec<String> = m
            .status()
            .and_then(|doc| doc["workers"].as_array().cloned())
            .unwrap_or_default()
            .iter()
            .filter_map(|w| w["reason"].as_str().map(str::to_owned))
            .collect();
        if reasons.len() == 3 {
            break reasons;
        }
        assert!(
            Instant::now() < deadline,
            "not every API's worker was held: {reasons:?}\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for api in ["openai", "replicate", "runpod"] {
        assert!(
            reasons
                .iter()
                .any(|r| r.contains(&format!("the {api} API refuses this machine's key"))),
            "{reasons:?}"
        );
    }
    let ready = reqwest::get(format!("{}/ready", m.url()))
        .await
        .expect("/ready answers");
    assert_eq!(ready.status(), 503, "no worker claims");
    let ready: Value = ready.json().await.expect("JSON");
    assert!(
        ready["not_claiming"].to_string().contains("refuses this machine's key"),
        "{ready}"
    );
    // Held, the jobs are back in the queue untouched, and stay there.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for id in &ids {
        let job = broker
            .show(id)
            .await
            .expect("show")
            .expect("the job exists")
            .job
            .stored()
            .clone();
        assert_eq!(job.get("status").map(String::as_str), Some("pending"), "{job:?}");
        assert_eq!(
            job.get("retry_count").map(String::as_str).unwrap_or("0"),
            "0",
            "{job:?}"
        );
        assert!(!job.contains_key("started_at"), "a pending job shows no start: {job:?}");
    }

    // The corrected keys in the files, read by a reload: every job completes.
    for (var, good) in files {
        std::fs::write(keys.path().join(var), format!("{good}\n")).expect("write a key file");
    }
    let out = crate::support::machine()
        .args(["reload", "--url", &m.url()])
        .env("MACHINE_CONFIG", m.dir.path().join("machine.toml"))
        .env("MACHINE_CONTROL_TOKEN", CONTROL)
        .output()
        .expect("reload runs");
    assert!(
        out.status.success(),
        "reload: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    for id in &ids {
        let deadline = Instant::now() + LIMIT;
        loop {
            let job = broker
                .show(id)
                .await
                .expect("show")
                .expect("the job exists")
                .job
                .stored()
                .clone();
            if job.get("status").map(String::as_str) == Some("completed") {
                assert_eq!(
                    job.get("retry_count").map(String::as_str).unwrap_or("0"),
                    "0",
                    "{job:?}"
                );
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the job never completed: {job:?}\n{}",
                m.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let doc = m.status().expect("status");
    assert!(
        doc["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .all(|w| w["reason"].is_null()),
        "released: {doc}"
    );
    shutdown.cancel();
    let _ = client.events.await;
}

/// The real binary with the openai API's daily quota used up: the job it stopped is back in
/// the queue with the reason and without the times of its attempt, and `machine jobs show`
/// names the quota for a job queued afterwards, which no worker has tried.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_a_used_up_quota_is_named_for_jobs_no_worker_has_tried() {
    let server = RedisServer::start();
    let openai = FakeOpenai::start(Some("sk-good"));
    let toml = format!(
        "[connectors.openai]\nbase_url = \"{}\"\n\n[connectors.openai.limits]\ndaily_requests = 1\n",
        openai.base_url()
    );
    let m = WholeMachine::start(
        &server.url(),
        "openai:1",
        &toml,
        &[("OPENAI_API_KEY", "sk-good".to_owned())],
    );
    let shutdown = CancellationToken::new();
    let client = machine(&server.url(), &shutdown).await;
    let broker = client.broker.clone();
    let submit = |prompt: &str| NewJob::new("openai_text", json!({ "prompt": prompt }));
    let wait = |id: String, what: &'static str, f: fn(&BTreeMap<String, String>) -> bool| {
        let broker = broker.clone();
        let log = m.log();
        async move {
            let deadline = Instant::now() + LIMIT;
            loop {
                let job = broker
                    .show(&id)
                    .await
                    .expect("show")
                    .expect("the job exists")
                    .job
                    .stored()
                    .clone();
                if f(&job) {
                    return job;
                }
                assert!(Instant::now() < deadline, "{what}: {job:?}\n{log}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let first = broker.submit(&submit("one")).await.expect("submit");
    wait(first, "the first job completes", |j| {
        j.get("status").map(String::as_str) == Some("completed")
    })
    .await;
    let stopped = broker.submit(&submit("two")).await.expect("submit");
    let job = wait(stopped.clone(), "the quota stops the second job", |j| {
        j.contains_key("limit_reason")
    })
    .await;
    assert_eq!(job.get("status").map(String::as_str), Some("pending"), "{job:?}");
    assert!(
        !job.contains_key("assigned_at") && !job.contains_key("started_at"),
        "returned, it shows no attempt in progress: {job:?}"
    );
    // Queued after the quota was reached: no worker tries it, yet `jobs show` says why it waits.
    let later = broker.submit(&submit("three")).await.expect("submit");
    let deadline = Instant::now() + LIMIT;
    loop {
        let shown = m.show(&server.url(), &later);
        if shown.contains("waits for a daily quota") && shown.contains("the openai API") {
            assert!(!shown.contains("so the next claim should take it"), "{shown}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "why it waits never names the quota:\n{shown}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(openai.requests().len(), 1, "only the first job reached the API");
    shutdown.cancel();
    let _ = client.events.await;
}

/// A worker whose every service waits for a daily quota claims nothing until the quota resets:
/// it is out of the fleet's park meanwhile, so no submission wakes it in vain (a wake goes to
/// a worker that answers, or to nobody); the jobs wait with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn external_a_worker_whose_services_all_wait_for_a_quota_is_not_woken() {
    within(HARD_LIMIT, async {
        let fake = FakeOpenai::start(None);
        let mut rig = Rig::start(1).await;
        let (c, _limiter) = limited_openai_with(&fake, "daily_requests = 1\nzone = \"UTC\"", rig.broker());
        rig.spawn(0, "w1", &[("openai_text", c)]);
        let mut conn = redis::Client::open(rig.server.url())
            .expect("client")
            .get_multiplexed_async_connection()
            .await
            .expect("connect");
        let first = rig.submit("openai_text", json!({"prompt": "one"}), "").await;
        rig.wait_status(&first, &["completed"]).await;
        let stopped = rig.submit("openai_text", json!({"prompt": "two"}), "").await;
        let deadline = Instant::now() + Duration::from_secs(10);
        while !rig.job(&stopped).await.contains_key("limit_reason") {
            assert!(Instant::now() < deadline, "the quota never stopped the job");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut wakes = subscribed(&rig.server.url(), "jobs:wake:m0").await;
        // Longer than a few safety polls (300 ms): a worker still claiming would have parked.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let parked: bool = conn.hexists("jobs:idx:parked", "w1").await.unwrap();
        assert!(!parked, "the worker waiting for the quota is in the park");
        let later = rig.submit("openai_text", json!({"prompt": "three"}), "").await;
        let mut msgs = wakes.on_message();
        let woken = tokio::time::timeout(Duration::from_secs(1), futures_util::StreamExt::next(&mut msgs)).await;
        assert!(woken.is_err(), "the worker waiting for the quota was woken: {woken:?}");
        assert_eq!(rig.job(&later).await["status"], "pending");
        assert_eq!(fake.requests().len(), 1, "no request beyond the daily quota");
        drop(msgs);
        rig.stop().await;
    })
    .await;
}

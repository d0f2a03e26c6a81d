//! Outputs to real object-store servers (Azurite, moto's S3, the GCS emulator, each started by
//! testkit on a free port) through real workers and a real Redis: what a ComfyUI job (the
//! protocol fake) and a simulation job store is listed and downloaded byte-identical by an
//! independent client with the right content type; a retry never overwrites an earlier
//! attempt's object; a missing bucket fails the job once, without retry, with the store's
//! words and no secret; a wrong key gives the job back and holds the worker until the
//! store accepts its credentials; a 20 s outage is waited out within the upload window and
//! leaves no partial object. And a `ctx` that is not usable fails the job before its connector
//! runs.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use machine::broker::{Broker, BrokerOptions, Capabilities, NewJob, RetryDelay};
use machine::config::{ConnectorKind, RedisUrl, SimulationConfig};
use machine::connectors::comfyui::ComfyuiConnector;
use machine::connectors::simulation::SimulationConnector;
use machine::connectors::store::{OutputStore, StoreOptions};
use machine::connectors::{Connector, ConnectorError, Job, JobOutput, ProgressSink};
use machine::worker::{Worker, WorkerSettings};
use redis::AsyncCommands;
use serde_json::{Value, json};
use testkit::{FakeComfyui, ObjectServer, RedisServer, StoreKind, TINY_PNG};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::support::within;

/// Each test's hard limit.
const HARD_LIMIT: Duration = Duration::from_secs(240);

const LIMIT: Duration = Duration::from_secs(90);
const BUCKET: &str = "outputs";

/// A Redis with the job library, a broker with its event loop, and a temp dir.
struct Rig {
    _server: RedisServer,
    broker: Broker,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    dir: tempfile::TempDir,
}

impl Rig {
    async fn start(failed_holdoff: Duration) -> Rig {
        Rig::start_leased(failed_holdoff, BrokerOptions::default().lease).await
    }

    /// A rig whose claims are leased for `lease`, with the lease reaper running (every quarter
    /// lease), so a lease that is not renewed is taken back.
    async fn start_leased(failed_holdoff: Duration, lease: Duration) -> Rig {
        let server = RedisServer::start();
        let url = RedisUrl::parse(&server.url()).expect("testkit URLs are valid");
        let opts = BrokerOptions {
            failed_holdoff,
            safety_poll: Duration::from_millis(300),
            // Retries come soon: these tests are about what a retry writes, not when it runs.
            retry_delay: RetryDelay {
                initial: Duration::from_millis(200),
                factor: 1.0,
                max: Duration::from_millis(200),
                jitter: 0.0,
            },
            lease,
            ..BrokerOptions::default()
        };
        let broker = Broker::connect(&url, opts).await.expect("connect");
        broker.ensure_functions().await.expect("install the library");
        let shutdown = CancellationToken::new();
        let events = tokio::spawn({
            let b = broker.clone();
            let s = shutdown.clone();
            async move { b.run(lease / 4, s).await.expect("the broker's work ends cleanly") }
        });
        Rig {
            _server: server,
            broker,
            shutdown,
            tasks: vec![events],
            dir: tempfile::tempdir().expect("temp dir"),
        }
    }

    /// Starts one worker serving `connectors`, storing through `store`.
    fn worker(&mut self, connectors: &[(&str, Arc<dyn Connector>)], store: OutputStore) {
        self.worker_on(connectors, Arc::new(store));
    }

    /// [`Rig::worker`] with a store the test keeps a handle on; holds are re-checked every
    /// second. Returns the worker's status.
    fn worker_on(
        &mut self,
        connectors: &[(&str, Arc<dyn Connector>)],
        store: Arc<OutputStore>,
    ) -> tokio::sync::watch::Receiver<machine::worker::WorkerStatus> {
        let services: Vec<&str> = connectors.iter().map(|(s, _)| *s).collect();
        let caps = Capabilities::new("m1-w0", "m1", &services);
        let map: HashMap<String, Arc<dyn Connector>> =
            connectors.iter().map(|(s, c)| ((*s).to_owned(), c.clone())).collect();
        let settings = WorkerSettings {
            heartbeat: Duration::from_millis(200),
            drain: Duration::from_secs(5),
            job_timeout: Duration::from_secs(60),
            progress_every: Duration::from_secs(1),
        };
        let mut worker = Worker::new(caps, map, settings, store);
        worker.recheck_holds_every(Duration::from_secs(1));
        let status = worker.status();
        let broker = self.broker.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.push(tokio::spawn(async move {
            worker.run(broker, shutdown).await.expect("a worker ends cleanly");
        }));
        status
    }

    /// Submits a job and writes its `ctx` (a string, stored verbatim) as the API does.
    async fn submit(&self, service: &str, payload: Value, ctx: &str, max_retries: u32) -> String {
        let mut job = NewJob::new(service, payload);
        job.max_retries = max_retries;
        let id = self.broker.submit(&job).await.expect("submit");
        self.broker
            .connection()
            .hset::<_, _, _, ()>(format!("job:{id}"), "ctx", ctx)
            .await
            .expect("write ctx");
        id
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

    async fn wait_for(
        &self,
        id: &str,
        what: &str,
        ok: impl Fn(&BTreeMap<String, String>) -> bool,
    ) -> BTreeMap<String, String> {
        let deadline = Instant::now() + LIMIT;
        loop {
            let job = self.job(id).await;
            if ok(&job) {
                return job;
            }
            assert!(Instant::now() < deadline, "job {id} never {what}: {job:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    async fn ended(&self, id: &str) -> BTreeMap<String, String> {
        self.wait_for(id, "ended", |j| {
            matches!(j.get("status").map(String::as_str), Some("completed" | "failed"))
        })
        .await
    }

    async fn completed_record(&self, id: &str) -> Value {
        let raw: String = self
            .broker
            .connection()
            .hget("jobs:completed", id)
            .await
            .expect("a completion record");
        serde_json::from_str(&raw).expect("the record is JSON")
    }

    /// Every `complete_job` message from now on.
    async fn completions(&mut self) -> tokio::sync::mpsc::UnboundedReceiver<Value> {
        let client = redis::Client::open(self._server.url()).expect("a redis URL");
        let mut pubsub = client.get_async_pubsub().await.expect("subscribe");
        pubsub.subscribe("complete_job").await.expect("subscribe");
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let shutdown = self.shutdown.clone();
        self.tasks.push(tokio::spawn(async move {
            let mut messages = pubsub.into_on_message();
            loop {
                let m = tokio::select! {
                    () = shutdown.cancelled() => break,
                    m = futures_util::StreamExt::next(&mut messages) => m,
                };
                let Some(m) = m else { break };
                let text: String = m.get_payload().expect("a text message");
                if tx.send(serde_json::from_str(&text).expect("JSON")).is_err() {
                    break;
                }
            }
        }));
        rx
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        for t in self.tasks.drain(..) {
            tokio::time::timeout(LIMIT, t)
                .await
                .expect("tasks stop after shutdown")
                .expect("tasks do not panic");
        }
    }
}

fn simulation(duration: Duration) -> Arc<dyn Connector> {
    Arc::new(SimulationConnector::new(SimulationConfig {
        duration,
        steps: 2,
        failure_rate: 0.0,
    }))
}

fn store_for(rig: &Rig, env: Vec<(String, String)>, options: StoreOptions) -> OutputStore {
    OutputStore::with_env(rig.dir.path().join("local"), env, options)
}

fn ctx(kind: StoreKind, bucket: &str, extra: Value) -> String {
    let mut c = json!({"storage": {"provider": kind.provider(), "bucket": bucket}, "prefix": "users/u1/"});
    if let (Value::Object(c), Value::Object(extra)) = (&mut c, extra) {
        c.extend(extra);
    }
    c.to_string()
}

/// A ComfyUI job with two outputs and a simulation job (in the flat `ctx` shape, with a
/// `filename`) land in the bucket; an independent client reads them back byte-identical with
/// the right content type, and the result names their URLs as the API and monitor read them.
async fn outputs_are_stored(kind: StoreKind) {
    let server = ObjectServer::start(kind);
    server.create_bucket(BUCKET);
    let mut rig = Rig::start(Duration::from_millis(50)).await;
    let comfy = FakeComfyui::start();
    let workflow = json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"cached": true}},
        "3": {"class_type": "KSampler", "inputs": {"steps": 2, "step_ms": 5}},
        "8": {"class_type": "SaveImage", "inputs": {"filename_prefix": "a"}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "b"}}
    });
    let comfy_id = rig
        .submit(
            "comfyui",
            json!({"workflow": workflow}),
            &ctx(kind, BUCKET, json!({})),
            3,
        )
        .await;
    let flat = json!({"provider": kind.provider(), "bucket": BUCKET, "prefix": "flat", "filename": "result.jpg"});
    let sim_id = rig
        .submit(
            "simulation",
            json!({"artifact": "simulated text"}),
            &flat.to_string(),
            3,
        )
        .await;
    // Started after the jobs and their ctx are written, so each claim sees its ctx.
    let store = store_for(&rig, server.env(), StoreOptions::default());
    rig.worker(
        &[
            ("comfyui", Arc::new(ComfyuiConnector::new(comfy.url().parse().unwrap()))),
            ("simulation", simulation(Duration::from_millis(20))),
        ],
        store,
    );
    for id in [&comfy_id, &sim_id] {
        let job = rig.ended(id).await;
        assert_eq!(job["status"], "completed", "{job:?}");
    }

    let rec = rig.completed_record(&comfy_id).await;
    let images = rec["data"]["images"]
        .as_array()
        .expect("image URLs under `images`")
        .clone();
    assert_eq!(images.len(), 2, "{rec}");
    assert_eq!(rec["data"]["image_url"], images[0]);
    let artifacts = rec["data"]["artifacts"].as_array().unwrap().clone();
    let sim = rig.completed_record(&sim_id).await;
    let sim_artifact = sim["data"]["artifacts"][0].clone();
    assert_eq!(sim_artifact["key"], "flat/result.txt", "{sim}");
    assert!(sim.to_string().len() < 4096, "no bytes in Redis");

    let listed = server.list(BUCKET);
    assert_eq!(listed.len(), 3, "{listed:?}");
    for a in artifacts.iter().chain([&sim_artifact]) {
        let key = a["key"].as_str().unwrap();
        let url = a["url"].as_str().unwrap();
        assert!(url.ends_with(&format!("/{BUCKET}/{key}")), "{url} names the object");
        let (bytes, content_type) = server.get(BUCKET, key);
        let (want, want_type): (&[u8], &str) = if key.starts_with("users/u1/") {
            assert!(
                key.starts_with(&format!("users/u1/{comfy_id}_")) && key.ends_with(".png"),
                "{key}"
            );
            (TINY_PNG, "image/png")
        } else {
            (b"simulated text", "text/plain")
        };
        assert_eq!(bytes, want, "{key} downloads byte-identical");
        assert_eq!(a["content_type"], want_type);
        if kind != StoreKind::Gcs || content_type.is_some() {
            assert_eq!(content_type.as_deref(), Some(want_type), "{key}'s stored content type");
        }
        assert!(
            listed.iter().any(|l| l.name == key && l.size == want.len() as u64),
            "{key} listed"
        );
    }
    rig.stop().await;
}

/// A retried job writes under `_r<N>` and leaves the first attempt's object as it was. The
/// first attempt fails after its upload because the CDN never serves the object (the bounded
/// CDN wait, here 1 s).
async fn retries_do_not_overwrite(kind: StoreKind) {
    let server = ObjectServer::start(kind);
    server.create_bucket(BUCKET);
    let mut rig = Rig::start(Duration::from_millis(50)).await;
    let dead_cdn = format!("127.0.0.1:{}", testkit::free_port());
    let options = StoreOptions {
        cdn_wait: Duration::from_secs(1),
        ..StoreOptions::default()
    };
    let c = ctx(
        kind,
        BUCKET,
        json!({"filename": "final.txt", "cdnUrl": format!("http://{dead_cdn}")}),
    );
    let id = rig.submit("simulation", json!({"artifact": "attempt"}), &c, 2).await;
    let store = store_for(&rig, server.env(), options);
    rig.worker(&[("simulation", simulation(Duration::from_millis(10)))], store);
    let job = rig.ended(&id).await;
    assert_eq!(job["status"], "failed", "{job:?}");
    assert!(job["error"].contains("the CDN did not serve"), "{job:?}");
    let names: Vec<String> = server.list(BUCKET).into_iter().map(|o| o.name).collect();
    assert!(names.len() >= 2, "one object per attempt: {names:?}");
    assert!(names.contains(&"users/u1/final.txt".to_owned()), "{names:?}");
    assert!(names.contains(&"users/u1/final_r1.txt".to_owned()), "{names:?}");
    assert_eq!(server.get(BUCKET, "users/u1/final.txt").0, b"attempt");
    rig.stop().await;
}

/// A missing bucket fails the job on its first attempt, without retry, with the store's own
/// words and no secret in them: the job's destination is the job's fault.
async fn refusals_fail_once(kind: StoreKind) {
    let server = ObjectServer::start(kind);
    server.create_bucket(BUCKET);
    /// The store's variables, the bucket, and words one of which the error must contain.
    type Case<'a> = (Vec<(String, String)>, &'a str, Vec<&'a str>);
    let cases: Vec<Case> = vec![(
        server.env(),
        "nosuchbucket",
        vec!["not found", "notfound", "does not exist", "nosuchbucket"],
    )];
    for (env, bucket, words) in cases {
        let secrets: Vec<String> = env
            .iter()
            .filter(|(k, _)| k.contains("KEY") || k.contains("SECRET"))
            .map(|(_, v)| v.clone())
            .collect();
        let mut rig = Rig::start(Duration::from_millis(50)).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let counted: Arc<dyn Connector> = Arc::new(Counted {
            inner: simulation(Duration::from_millis(10)),
            runs: runs.clone(),
        });
        let id = rig
            .submit("simulation", json!({"artifact": "x"}), &ctx(kind, bucket, json!({})), 3)
            .await;
        rig.worker(
            &[("simulation", counted)],
            store_for(&rig, env, StoreOptions::default()),
        );
        let job = rig.ended(&id).await;
        assert_eq!(job["status"], "failed", "{job:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "one attempt only: {job:?}");
        let error = job["error"].to_ascii_lowercase();
        assert!(error.contains("failed to upload users/u1/"), "{error}");
        assert!(
            words.iter().any(|w| error.contains(w)),
            "the store's words ({words:?}) in: {error}"
        );
        for s in &secrets {
            assert!(!job["error"].contains(s.as_str()), "a secret leaked: {error}");
        }
        rig.stop().await;
    }
}

/// A key the store refuses is the machine's fault: the job goes back untouched (no retry
/// spent, nothing stored), the worker is held with the reason and claims nothing more; once the
/// store has the corrected key (what a reload that read a `<NAME>_FILE` again does), the
/// worker's re-check against the job's own bucket passes, the hold is lifted and the job
/// completes with one object.
async fn a_refused_key_holds_the_worker_until_the_store_accepts_it(kind: StoreKind) {
    let server = ObjectServer::start(kind);
    server.create_bucket(BUCKET);
    let mut rig = Rig::start(Duration::from_millis(50)).await;
    let runs = Arc::new(AtomicUsize::new(0));
    let counted: Arc<dyn Connector> = Arc::new(Counted {
        inner: simulation(Duration::from_millis(10)),
        runs: runs.clone(),
    });
    let c = ctx(kind, BUCKET, json!({"filename": "held.txt"}));
    let id = rig.submit("simulation", json!({"artifact": "x"}), &c, 3).await;
    let wrong = server.env_with_wrong_key().expect("the server checks keys");
    let store = Arc::new(store_for(&rig, wrong, StoreOptions::default()));
    let mut status = rig.worker_on(&[("simulation", counted)], store.clone());
    let job = rig
        .wait_for(&id, "was given back", |j| {
            j.get("machine_returns").map(String::as_str) == Some("1")
        })
        .await;
    assert_eq!(job["retry_count"], "0", "no retry spent: {job:?}");
    assert_ne!(job["status"], "failed", "{job:?}");
    let held = tokio::time::timeout(
        LIMIT,
        status.wait_for(|s| {
            s.hold
                .as_deref()
                .is_some_and(|h| h.contains("output store refuses the credentials"))
        }),
    )
    .await
    .expect("the worker is held")
    .unwrap()
    .clone();
    assert!(
        held.hold.as_deref().is_some_and(
            |h| ["SignatureDoesNotMatch", "AuthorizationFailure", "AuthenticationFailed"]
                .iter()
                .any(|c| h.contains(c))
        ),
        "the store's code in the reason: {held:?}"
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(runs.load(Ordering::SeqCst), 1, "held: nothing claimed meanwhile");
    assert!(server.list(BUCKET).is_empty());

    assert!(store.renew(server.env()), "new credentials");
    let job = rig.ended(&id).await;
    assert_eq!(job["status"], "completed", "{job:?}");
    assert_eq!(job["retry_count"], "0", "{job:?}");
    let names: Vec<String> = server.list(BUCKET).into_iter().map(|o| o.name).collect();
    assert_eq!(names, ["users/u1/held.txt"], "one object");
    assert!(status.borrow().hold.is_none(), "released");
    rig.stop().await;
}

/// A bucket the machine's key may not write (`AccessDenied` on the bucket the job names) is the
/// job's destination's fault: the job fails at once, without retry, and the worker is not held.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_bucket_the_key_may_not_write_fails_the_job_at_once() {
    within(HARD_LIMIT, async {
        let server = ObjectServer::start(StoreKind::S3);
        server.create_bucket("readonly");
        let mut rig = Rig::start(Duration::from_millis(50)).await;
        let c = ctx(StoreKind::S3, "readonly", json!({}));
        let id = rig.submit("simulation", json!({"artifact": "x"}), &c, 3).await;
        let store = Arc::new(store_for(&rig, server.env(), StoreOptions::default()));
        let status = rig.worker_on(&[("simulation", simulation(Duration::from_millis(10)))], store);
        let job = rig.ended(&id).await;
        assert_eq!(job["status"], "failed", "{job:?}");
        assert_eq!(job["retry_count"], "1", "failed once, not retried: {job:?}");
        assert!(job["error"].contains("AccessDenied"), "{job:?}");
        assert!(
            status.borrow().hold.is_none(),
            "the worker is not held: {:?}",
            status.borrow()
        );
        rig.stop().await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_a_refused_key_holds_the_worker_until_the_store_accepts_it() {
    within(
        HARD_LIMIT,
        a_refused_key_holds_the_worker_until_the_store_accepts_it(StoreKind::Azure),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_a_refused_key_holds_the_worker_until_the_store_accepts_it() {
    within(
        HARD_LIMIT,
        a_refused_key_holds_the_worker_until_the_store_accepts_it(StoreKind::S3),
    )
    .await;
}

/// The server stops answering while the job runs, for 20 s: the upload keeps trying within
/// the upload window (30 s), and once the server answers again the same attempt stores the
/// whole object and completes the job: no retry spent, no `_r` name, nothing partial.
async fn outages_within_the_window_complete_without_a_retry(kind: StoreKind) {
    let mut server = ObjectServer::start(kind);
    server.create_bucket(BUCKET);
    let mut rig = Rig::start(Duration::from_millis(200)).await;
    let body = "0123456789abcdef".repeat(64 * 1024);
    let id = rig
        .submit(
            "simulation",
            json!({"artifact": body}),
            &ctx(kind, BUCKET, json!({})),
            10,
        )
        .await;
    // A frozen server answers nothing: a short request timeout ends each try soon.
    let mut env = server.env();
    env.push(("AWS_TIMEOUT".to_owned(), "2s".to_owned()));
    env.push(("AZURE_TIMEOUT".to_owned(), "2s".to_owned()));
    let store = store_for(&rig, env, StoreOptions::default());
    rig.worker(&[("simulation", simulation(Duration::from_millis(1500)))], store);
    rig.wait_for(&id, "started", |j| {
        j.get("status").map(String::as_str) == Some("in_progress")
    })
    .await;
    server.interrupt();
    tokio::time::sleep(Duration::from_secs(20)).await;
    let job = rig.job(&id).await;
    assert_eq!(job["status"], "in_progress", "still trying: {job:?}");
    server.restore();
    let job = rig.ended(&id).await;
    assert_eq!(job["status"], "completed", "{job:?}");
    assert_eq!(job["retry_count"], "0", "no retry spent: {job:?}");
    assert!(!job.contains_key("machine_returns"), "not given back: {job:?}");
    let rec = rig.completed_record(&id).await;
    let key = rec["data"]["artifacts"][0]["key"].as_str().unwrap().to_owned();
    assert!(!key.contains("_r"), "written by the first attempt: {key}");
    let listed = server.list(BUCKET);
    assert_eq!(listed.len(), 1, "one object: {listed:?}");
    assert_eq!(listed[0].name, key);
    assert_eq!(listed[0].size, body.len() as u64, "no partial object: {listed:?}");
    assert_eq!(server.get(BUCKET, &key).0, body.as_bytes());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_outputs_are_stored() {
    within(HARD_LIMIT, outputs_are_stored(StoreKind::Azure)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outputs_are_stored() {
    within(HARD_LIMIT, outputs_are_stored(StoreKind::S3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "gcp-storage-emulator answers an object PUT without the ETag header object_store's GCS client requires (see docs/connectors.md)"]
async fn gcs_outputs_are_stored() {
    within(HARD_LIMIT, outputs_are_stored(StoreKind::Gcs)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_retries_do_not_overwrite() {
    within(HARD_LIMIT, retries_do_not_overwrite(StoreKind::Azure)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_retries_do_not_overwrite() {
    within(HARD_LIMIT, retries_do_not_overwrite(StoreKind::S3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "gcp-storage-emulator answers an object PUT without the ETag header object_store's GCS client requires (see docs/connectors.md)"]
async fn gcs_retries_do_not_overwrite() {
    within(HARD_LIMIT, retries_do_not_overwrite(StoreKind::Gcs)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_refusals_fail_once() {
    within(HARD_LIMIT, refusals_fail_once(StoreKind::Azure)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_refusals_fail_once() {
    within(HARD_LIMIT, refusals_fail_once(StoreKind::S3)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "gcp-storage-emulator answers an object PUT without the ETag header object_store's GCS client requires (see docs/connectors.md)"]
async fn gcs_refusals_fail_once() {
    within(HARD_LIMIT, refusals_fail_once(StoreKind::Gcs)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn azure_outages_within_the_window_complete_without_a_retry() {
    within(
        HARD_LIMIT,
        outages_within_the_window_complete_without_a_retry(StoreKind::Azure),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_outages_within_the_window_complete_without_a_retry() {
    within(
        HARD_LIMIT,
        outages_within_the_window_complete_without_a_retry(StoreKind::S3),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "gcp-storage-emulator answers an object PUT without the ETag header object_store's GCS client requires (see docs/connectors.md)"]
async fn gcs_outages_within_the_window_complete_without_a_retry() {
    within(
        HARD_LIMIT,
        outages_within_the_window_complete_without_a_retry(StoreKind::Gcs),
    )
    .await;
}

/// A TCP proxy to `upstream` that holds each request `delay` before passing it on: an upload
/// through it takes longer than `delay`. Runs until the test ends.
pub(crate) async fn slow_proxy(upstream: String, delay: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = upstream.trim_start_matches("http://").to_owned();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let upstream = upstream.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                    return;
                };
                let (mut cr, mut cw) = client.into_split();
                let (mut sr, mut sw) = server.into_split();
                let up = async move {
                    tokio::time::sleep(delay).await;
                    let _ = tokio::io::copy(&mut cr, &mut sw).await;
                };
                let down = async move {
                    let _ = tokio::io::copy(&mut sr, &mut cw).await;
                };
                tokio::join!(up, down);
            });
        }
    });
    format!("http://{addr}")
}

/// The store's variables with its endpoint replaced by `endpoint`.
pub(crate) fn through(env: Vec<(String, String)>, endpoint: &str) -> Vec<(String, String)> {
    env.into_iter()
        .map(|(k, v)| {
            if k == "AWS_ENDPOINT" {
                (k, endpoint.to_owned())
            } else {
                (k, v)
            }
        })
        .collect()
}

/// An upload slower than the lease (5 s through a slow proxy, lease 2 s): the lease is renewed
/// until the job's end is written, so the job completes once, on its first attempt, with one
/// object; nobody else ran it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_an_upload_slower_than_the_lease_completes_once() {
    within(HARD_LIMIT, async {
        let server = ObjectServer::start(StoreKind::S3);
        server.create_bucket(BUCKET);
        let mut rig = Rig::start_leased(Duration::from_millis(50), Duration::from_secs(2)).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let counted: Arc<dyn Connector> = Arc::new(Counted {
            inner: simulation(Duration::from_millis(10)),
            runs: runs.clone(),
        });
        let c = ctx(StoreKind::S3, BUCKET, json!({"filename": "slow.txt"}));
        let id = rig.submit("simulation", json!({"artifact": "slow"}), &c, 3).await;
        let proxy = slow_proxy(server.endpoint(), Duration::from_secs(5)).await;
        let store = store_for(&rig, through(server.env(), &proxy), StoreOptions::default());
        rig.worker(&[("simulation", counted)], store);
        let job = rig.ended(&id).await;
        assert_eq!(job["status"], "completed", "{job:?}");
        assert_eq!(job["retry_count"], "0", "{job:?}");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "run once");
        let names: Vec<String> = server.list(BUCKET).into_iter().map(|o| o.name).collect();
        assert_eq!(names, ["users/u1/slow.txt"], "one object");
        rig.stop().await;
    })
    .await;
}

/// Shutdown while an upload hangs (a proxy that holds it 60 s): the upload gets the drain period
/// (5 s), then the job goes back to the queue in its place (pending, no retry spent) and the
/// worker stops: nothing is left in progress for the lease to find.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_shutdown_mid_upload_returns_the_job() {
    within(HARD_LIMIT, async {
        let server = ObjectServer::start(StoreKind::S3);
        server.create_bucket(BUCKET);
        let mut rig = Rig::start(Duration::from_millis(50)).await;
        let c = ctx(StoreKind::S3, BUCKET, json!({}));
        let id = rig.submit("simulation", json!({"artifact": "x"}), &c, 3).await;
        let proxy = slow_proxy(server.endpoint(), Duration::from_secs(60)).await;
        let store = store_for(&rig, through(server.env(), &proxy), StoreOptions::default());
        let status = rig.worker_on(
            &[("simulation", simulation(Duration::from_millis(10)))],
            Arc::new(store),
        );
        rig.wait_for(&id, "started", |j| {
            j.get("status").map(String::as_str) == Some("in_progress")
        })
        .await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        let stopping = Instant::now();
        rig.shutdown.cancel();
        let job = rig
            .wait_for(&id, "was returned", |j| {
                j.get("status").map(String::as_str) == Some("pending")
            })
            .await;
        assert!(
            stopping.elapsed() < Duration::from_secs(15),
            "within the drain: {:?}",
            stopping.elapsed()
        );
        assert_eq!(job["retry_count"], "0", "{job:?}");
        assert_eq!(job.get("worker_id").map(String::as_str).unwrap_or(""), "", "{job:?}");
        rig.stop().await;
        assert_eq!(status.borrow().counts.returned, 1, "{:?}", status.borrow());
        assert!(server.list(BUCKET).is_empty(), "nothing stored");
    })
    .await;
}

/// Counts how often the connector is asked to run a job.
#[derive(Debug)]
struct Counted {
    inner: Arc<dyn Connector>,
    runs: Arc<AtomicUsize>,
}

impl Connector for Counted {
    fn kind(&self) -> ConnectorKind {
        self.inner.kind()
    }

    fn run<'a>(
        &'a self,
        job: &'a Job,
        progress: &'a ProgressSink,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<JobOutput, ConnectorError>> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        self.inner.run(job, progress, cancel)
    }
}

/// A `ctx` that is not JSON, names an unknown provider, or lacks a field fails the job at once,
/// without retry and before the connector runs, with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_ctx_fails_before_the_connector_runs() {
    within(HARD_LIMIT, async {
        let mut rig = Rig::start(Duration::from_millis(50)).await;
        let runs = Arc::new(AtomicUsize::new(0));
        let counted: Arc<dyn Connector> = Arc::new(Counted {
            inner: simulation(Duration::from_millis(10)),
            runs: runs.clone(),
        });
        let cases = [
            ("{not json", "ctx is not JSON"),
            (
                r#"{"storage": {"provider": "ftp", "bucket": "b"}, "prefix": "p"}"#,
                "unknown provider `ftp`",
            ),
            (
                r#"{"storage": {"provider": "azure", "bucket": "b"}}"#,
                "`prefix` is missing",
            ),
            (r#"{"provider": "s3", "prefix": "p"}"#, "`bucket` is missing"),
            (r#"{"bucket": "b", "prefix": "p"}"#, "`provider` is missing"),
            // Storage settings without a provider or bucket are not the machine's disk.
            (
                r#"{"storage": {"cdnUrl": "cdn.example.test"}, "prefix": "p", "filename": "f.png"}"#,
                "`provider` is missing",
            ),
            (r#"{"storage": {}}"#, "`provider` is missing"),
            (
                r#"{"storage": {"provider": "s3", "cdnUrl": "cdn.example.test"}, "prefix": "p"}"#,
                "`bucket` is missing",
            ),
            (
                r#"{"storage": {"provider": "s3", "bucket": "b"}, "prefix": "users/../../etc"}"#,
                "`prefix` has a `..` segment",
            ),
            (
                r#"{"storage": {"provider": "s3", "bucket": "b"}, "prefix": "p", "filename": "a\u0007b.png"}"#,
                "`filename` has a control character",
            ),
        ];
        let mut ids = Vec::new();
        for (c, _) in cases {
            ids.push(rig.submit("simulation", json!({"artifact": "x"}), c, 3).await);
        }
        // No storage setting at all: the machine's own output directory.
        let good = rig
            .submit(
                "simulation",
                json!({"artifact": "x"}),
                r#"{"workflow_context": {"retry_attempt": 0}}"#,
                3,
            )
            .await;
        let store = store_for(&rig, Vec::new(), StoreOptions::default());
        rig.worker(&[("simulation", counted)], store);
        for ((c, reason), id) in cases.into_iter().zip(&ids) {
            let job = rig.ended(id).await;
            assert_eq!(job["status"], "failed", "{c}: {job:?}");
            assert_eq!(job["retry_count"], "1", "failed once, not retried: {job:?}");
            assert!(job["error"].contains(reason), "{c}: {job:?}");
            assert!(job["error"].contains("invalid ctx"), "{c}: {job:?}");
        }
        // A usable ctx still runs, and it is the only job the connector saw.
        assert_eq!(rig.ended(&good).await["status"], "completed");
        assert_eq!(runs.load(Ordering::SeqCst), 1, "the connector never ran the bad ones");
        rig.stop().await;
    })
    .await;
}

/// The asset locations the existing API finds in a `complete_job` message's `result`, by its
/// rules (`lightweight-api-server.ts` `extractAssetLocations`): a URL string, the URL fields of
/// the result and of `result.data`, `result.outputs[]`, `result.output_files[].metadata.cdn_url`;
/// each once.
fn api_asset_locations(result: &Value) -> Vec<String> {
    const URL_FIELDS: [&str; 5] = ["url", "output_url", "asset_url", "image_url", "file_url"];
    let mut found: Vec<String> = Vec::new();
    let fields = |v: &Value, found: &mut Vec<String>| {
        for f in URL_FIELDS {
            if let Some(u) = v.get(f).and_then(Value::as_str) {
                found.push(u.to_owned());
            }
        }
    };
    match result {
        Value::String(s) if s.starts_with("http://") || s.starts_with("https://") => found.push(s.clone()),
        Value::Object(_) => {
            fields(result, &mut found);
            if result["data"].is_object() {
                fields(&result["data"], &mut found);
            }
            for o in result["outputs"].as_array().into_iter().flatten() {
                match o {
                    Value::String(s) if s.starts_with("http://") || s.starts_with("https://") => found.push(s.clone()),
                    Value::Object(_) => fields(o, &mut found),
                    _ => {}
                }
            }
            for f in result["output_files"].as_array().into_iter().flatten() {
                if let Some(u) = f["metadata"]["cdn_url"].as_str() {
                    found.push(u.to_owned());
                }
            }
        }
        _ => {}
    }
    let mut unique = Vec::new();
    for u in found {
        if !unique.contains(&u) {
            unique.push(u);
        }
    }
    unique
}

/// The URL the API completes a workflow with (`workflow_output`):
/// `result.data.image_url || result.image_url`.
fn api_workflow_output(result: &Value) -> Option<&str> {
    result["data"]["image_url"]
        .as_str()
        .or_else(|| result["image_url"].as_str())
}

/// A connector whose every job yields one output (`name`, `bytes`), as a service that renders a
/// video would.
#[derive(Debug)]
struct OneOutput {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

impl Connector for OneOutput {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Simulation
    }

    fn run<'a>(
        &'a self,
        _job: &'a Job,
        _progress: &'a ProgressSink,
        _cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<JobOutput, ConnectorError>> {
        Box::pin(async move {
            Ok(JobOutput {
                data: json!({"rendered": true}),
                artifacts: vec![machine::connectors::Artifact {
                    name: self.name.to_owned(),
                    content_type: self.content_type.to_owned(),
                    body: machine::connectors::ArtifactBody::Bytes(bytes::Bytes::from_static(self.bytes)),
                }],
            })
        })
    }
}

/// An MP4's first box (`ftyp`), enough for its type to be read from its bytes.
const MP4: &[u8] = b"\x00\x00\x00\x18ftypmp42\x00\x00\x00\x00mp42isom\x00\x00\x00\x08free";

/// Issue 23: a video-only and a text-only job complete with what the existing asset saver
/// writes (`data.image_url`, `mime_type`, `content_type`, `output_files[].metadata.cdn_url`), so
/// the API's reader finds each asset in the `complete_job` message and its `workflow_output` is
/// the asset's URL; the keys are the ones the original builds (`users/My Session x/` kept as
/// written) and an `http://` CDN stays `http://`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_video_only_and_text_only_jobs_yield_their_asset_to_the_api_reader() {
    within(HARD_LIMIT, async {
        let server = ObjectServer::start(StoreKind::S3);
        server.create_bucket(BUCKET);
        let mut rig = Rig::start(Duration::from_millis(50)).await;
        let mut completions = rig.completions().await;
        // Kept as written (the machine used to rewrite it to `users/My_Session_x`). An `@` is
        // kept too (see the destination's unit test), but moto's signature check reads it
        // decoded while every SigV4 client sends it encoded, so it is not used here.
        let prefix = "users/My Session x";
        let video_ctx = json!({"storage": {"provider": "s3", "bucket": BUCKET, "cdnUrl": "http://cdn.example.test"},
            "prefix": prefix, "filename": "clip.bin"});
        let video = rig.submit("video", json!({}), &video_ctx.to_string(), 1).await;
        let text_ctx = json!({"storage": {"provider": "s3", "bucket": BUCKET}, "prefix": format!("{prefix}/"),
            "filename": "notes"});
        let text = rig
            .submit("simulation", json!({"artifact": "the text"}), &text_ctx.to_string(), 1)
            .await;
        let renderer: Arc<dyn Connector> = Arc::new(OneOutput {
            name: "out.mp4",
            content_type: "video/mp4",
            bytes: MP4,
        });
        let store = store_for(&rig, server.env(), StoreOptions::default());
        rig.worker(
            &[
                ("video", renderer),
                ("simulation", simulation(Duration::from_millis(10))),
            ],
            store,
        );
        for id in [&video, &text] {
            let job = rig.ended(id).await;
            assert_eq!(job["status"], "completed", "{job:?}");
        }
        let mut results = BTreeMap::new();
        while results.len() < 2 {
            let m = tokio::time::timeout(Duration::from_secs(5), completions.recv())
                .await
                .expect("a complete_job message")
                .expect("the subscription runs");
            results.insert(m["job_id"].as_str().unwrap().to_owned(), m["result"].clone());
        }
        let cases = [
            (
                &video,
                "clip.mp4",
                "video/mp4",
                "video",
                MP4,
                "http://cdn.example.test/",
            ),
            (&text, "notes.txt", "text/plain", "binary", &b"the text"[..], ""),
        ];
        for (id, name, mime, asset_type, bytes, cdn) in cases {
            let result = &results[id.as_str()];
            let key = format!("{prefix}/{name}");
            let locations = api_asset_locations(result);
            assert_eq!(locations.len(), 1, "the API finds the asset: {result}");
            let url = &locations[0];
            if cdn.is_empty() {
                assert!(url.ends_with(&format!("/{BUCKET}/{key}")), "{url}");
            } else {
                assert_eq!(url, &format!("{cdn}{key}"), "an http CDN stays http");
            }
            assert_eq!(api_workflow_output(result), Some(url.as_str()), "{result}");
            assert_eq!(result["data"]["mime_type"], mime, "{result}");
            assert_eq!(result["data"]["content_type"], asset_type, "{result}");
            let file = &result["output_files"][0];
            assert_eq!(file["filename"], name, "{result}");
            assert_eq!(file["path"], key.as_str(), "{result}");
            assert_eq!(file["mime_type"], mime, "{result}");
            let (stored, _) = server.get(BUCKET, &key);
            assert_eq!(stored, bytes, "{key} is where the original puts it");
        }
        assert!(
            results[video.as_str()].get("image_url").is_none(),
            "the monitor does not show a video as an image"
        );
        assert_eq!(
            results[video.as_str()]["video_url"],
            results[video.as_str()]["data"]["image_url"]
        );
        assert_eq!(server.list(BUCKET).len(), 2);
        rig.stop().await;
    })
    .await;
}

//! Uploads while the next job runs (issue 27), on the real binary against a real Redis and
//! moto's S3 server behind a delaying TCP proxy ([`testkit::SlowProxy`]): every job's
//! guarantee holds with the upload stage on. A machine killed with uploads pending loses
//! nothing; SIGTERM lets pending uploads finish within the drain, or returns their jobs; a store
//! outage during an overlapped upload is ridden out within the upload window; the byte budget
//! holds the claims back under a store slower than the jobs; the lease is renewed across an
//! upload longer than itself; an earlier job's completion never marks the worker, busy with the
//! next one, idle in `worker:<id>`.

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::{Duration, Instant};

use machine::broker::{Broker, BrokerOptions, NewJob};
use machine::config::RedisUrl;
use nix::sys::signal::Signal;
use redis::AsyncCommands;
use serde_json::{Value, json};
use testkit::{ObjectServer, RedisServer, SlowProxy, StoreKind};

use crate::support::{machine, within};

/// Each test's hard limit.
const HARD_LIMIT: Duration = Duration::from_secs(240);

const TOKEN: &str = "pipeline-test-token";
const BUCKET: &str = "outputs";
/// Far longer than any test: a proxy holding requests this long is a store that hangs.
const HANG: Duration = Duration::from_secs(3600);

/// A machine run by a test; killed on drop.
struct Machine {
    child: crate::support::KillOnDrop,
    port: u16,
    log: std::path::PathBuf,
}

impl Machine {
    /// `/status`, as `machine status --json` reads it.
    fn status(&self) -> Option<Value> {
        let out = machine()
            .args(["status", "--json", "--url", &format!("http://127.0.0.1:{}", self.port)])
            .env("MACHINE_CONTROL_TOKEN", TOKEN)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    /// The first worker's entry in `/status`.
    fn worker(&self) -> Option<Value> {
        self.status().map(|s| s["workers"][0].clone())
    }

    fn signal(&self, sig: Signal) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("a pid fits i32"));
        nix::sys::signal::kill(pid, sig).expect("signalling the machine");
    }

    /// Waits up to `limit` for the machine to exit; its exit code.
    fn exited(&mut self, limit: Duration) -> Option<i32> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// A Redis, an S3 server with its bucket, and the proxy in front of the store.
struct Rig {
    redis: RedisServer,
    store: ObjectServer,
    proxy: SlowProxy,
    dir: tempfile::TempDir,
    broker: Broker,
    machines: usize,
    submitted: i64,
}

impl Rig {
    async fn start(delay: Duration) -> Rig {
        let store = ObjectServer::start(StoreKind::S3);
        store.create_bucket(BUCKET);
        let proxy = SlowProxy::start(&store.endpoint(), delay);
        let redis = RedisServer::start();
        let url = RedisUrl::parse(&redis.url()).expect("testkit URLs are valid");
        let broker = Broker::connect(&url, BrokerOptions::default()).await.expect("connect");
        broker.ensure_functions().await.expect("install the library");
        Rig {
            redis,
            store,
            proxy,
            dir: tempfile::tempdir().expect("a temp dir"),
            broker,
            machines: 0,
            submitted: 0,
        }
    }

    /// Queues `n` simulation jobs, each producing one output of `bytes` (and running
    /// `duration_ms` when given), storing to the bucket; their ids in queue order (each job a
    /// step lower in priority than the one before, as jobs queued within one second are
    /// otherwise claimed in no set order).
    async fn submit(&mut self, n: usize, bytes: usize, duration_ms: Option<u64>) -> Vec<String> {
        let ctx = json!({"storage": {"provider": "s3", "bucket": BUCKET}, "prefix": "users/u1"});
        let mut ids = Vec::with_capacity(n);
        for _ in 0..n {
            let mut payload = json!({"artifact": "p", "artifact_bytes": bytes});
            if let Some(ms) = duration_ms {
                payload["duration_ms"] = json!(ms);
            }
            let mut job = NewJob::new("simulation", payload);
            job.priority = 1000 - self.submitted;
            self.submitted += 1;
            let id = self.broker.submit(&job).await.expect("submit");
            // The machine starts after every job is queued, so none is claimed without its ctx.
            self.broker
                .connection()
                .hset::<_, _, _, ()>(format!("job:{id}"), "ctx", ctx.to_string())
                .await
                .expect("write ctx");
            ids.push(id);
        }
        ids
    }

    /// Starts a machine with one simulation worker storing through the proxy; `worker` is the
    /// `[worker]` section's lines and `run` the simulated jobs' duration.
    fn machine(&mut self, run: &str, worker: &str) -> Machine {
        self.machines += 1;
        let dir = self.dir.path().join(format!("m{}", self.machines));
        std::fs::create_dir_all(&dir).unwrap();
        let config = dir.join("machine.toml");
        std::fs::write(
            &config,
            format!("[connectors.simulation]\nduration = \"{run}\"\nsteps = 1\n\n[worker]\nhold_recheck = \"1s\"\n{worker}\n"),
        )
        .unwrap();
        let port = testkit::free_port();
        let log = dir.join("machine.log");
        let out = std::fs::File::create(&log).unwrap();
        let mut cmd = machine();
        cmd.arg("run")
            .env("MACHINE_CONFIG", &config)
            .env("MACHINE_ID", format!("pl{}", self.machines))
            .env("MACHINE_WORKSPACE", dir.join("ws"))
            .env("MACHINE_HEALTH_PORT", port.to_string())
            .env("MACHINE_CONTROL_TOKEN", TOKEN)
            .env("HUB_REDIS_URL", self.redis.url())
            .env("WORKER_CONNECTORS", "simulation:1")
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out);
        for (k, v) in self.store.env() {
            let v = if k == "AWS_ENDPOINT" { self.proxy.url() } else { v };
            cmd.env(k, v);
        }
        Machine {
            child: cmd.spawn().unwrap().into(),
            port,
            log,
        }
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

    async fn statuses(&self, ids: &[String]) -> Vec<String> {
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            out.push(self.job(id).await.get("status").cloned().unwrap_or_default());
        }
        out
    }

    /// Waits until every job in `ids` is completed.
    async fn all_completed(&self, ids: &[String], m: &Machine) {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let statuses = self.statuses(ids).await;
            if statuses.iter().all(|s| s == "completed") {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "not all completed: {statuses:?}\n{}",
                m.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Polls `f` every 50 ms until it gives a value, for at most `limit`.
async fn until<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The uploads the worker shows as pending, by job id.
fn pending(worker: &Value) -> Vec<String> {
    worker["uploads"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|u| u["job_id"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn sizes(store: &ObjectServer) -> Vec<u64> {
    store.list(BUCKET).into_iter().map(|o| o.size).collect()
}

/// SIGKILL with two uploads pending (a store that hangs): nothing is lost. The jobs stay in
/// progress under their leases, which expire; a second machine (the store answering again)
/// runs them again and every job completes once, with one whole object each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_uploads_pending_loses_nothing() {
    within(HARD_LIMIT, async {
        let mut rig = Rig::start(HANG).await;
        let ids = rig.submit(4, 64 * 1024, None).await;
        let worker = "lease = \"3s\"\nheartbeat = \"1s\"\npending_uploads = 2\n";
        let mut first = rig.machine("200ms", worker);
        let w = until(Duration::from_secs(60), "two uploads pending", || {
            first.worker().filter(|w| pending(w).len() == 2)
        })
        .await;
        assert_eq!(pending(&w), ids[..2], "the first two jobs upload: {w}");
        assert_eq!(w["state"], "waiting_for_uploads", "{w}");
        first.signal(Signal::SIGKILL);
        assert!(first.exited(Duration::from_secs(10)).is_some(), "killed");
        assert_eq!(
            rig.statuses(&ids[..2]).await,
            ["in_progress", "in_progress"],
            "the killed machine's pending uploads stay with their leases"
        );
        assert!(rig.store.list(BUCKET).is_empty(), "no partial object");
        rig.proxy.set_delay(Duration::ZERO);
        let second = rig.machine("200ms", worker);
        rig.all_completed(&ids, &second).await;
        assert_eq!(sizes(&rig.store), [64 * 1024; 4], "one whole object per job");
        let w = second.worker().expect("status");
        assert_eq!(w["counts"]["completed"], 4, "{w}");
    })
    .await;
}

/// SIGTERM with uploads pending to a slow store (1.5 s a request): they finish within the drain
/// period, every job ends completed, and the machine exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_pending_uploads_finish_within_the_drain() {
    within(HARD_LIMIT, async {
        let mut rig = Rig::start(Duration::from_millis(1500)).await;
        let ids = rig.submit(3, 64 * 1024, None).await;
        let mut m = rig.machine("300ms", "drain = \"20s\"\npending_uploads = 2\n");
        until(Duration::from_secs(60), "two uploads pending", || {
            m.worker().filter(|w| pending(w).len() == 2)
        })
        .await;
        m.signal(Signal::SIGTERM);
        let code = m.exited(Duration::from_secs(30));
        assert_eq!(code, Some(0), "exits 0 within the drain:\n{}", m.log());
        let statuses = rig.statuses(&ids).await;
        assert_eq!(
            statuses[..2],
            ["completed", "completed"],
            "the pending uploads finished"
        );
        assert!(
            statuses[2] == "completed" || statuses[2] == "pending",
            "the third ended or went back: {statuses:?}"
        );
        let done = statuses.iter().filter(|s| *s == "completed").count();
        assert_eq!(rig.store.list(BUCKET).len(), done, "one object per completed job");
    })
    .await;
}

/// SIGTERM with uploads pending to a store that hangs: after the drain period their jobs go
/// back to the queue in their place (no retry spent) and the machine exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_returns_pending_uploads_the_drain_cannot_finish() {
    within(HARD_LIMIT, async {
        let mut rig = Rig::start(HANG).await;
        let ids = rig.submit(3, 64 * 1024, None).await;
        let mut m = rig.machine("200ms", "drain = \"2s\"\npending_uploads = 2\n");
        until(Duration::from_secs(60), "two uploads pending", || {
            m.worker().filter(|w| pending(w).len() == 2)
        })
        .await;
        let stopping = Instant::now();
        m.signal(Signal::SIGTERM);
        let code = m.exited(Duration::from_secs(30));
        assert_eq!(code, Some(0), "exits 0:\n{}", m.log());
        assert!(stopping.elapsed() < Duration::from_secs(15), "{:?}", stopping.elapsed());
        for id in &ids[..2] {
            let j = rig.job(id).await;
            assert_eq!(j["status"], "pending", "returned: {j:?}");
            assert_eq!(j["retry_count"], "0", "no retry spent: {j:?}");
        }
        assert!(rig.store.list(BUCKET).is_empty(), "nothing stored");
    })
    .await;
}

/// The store goes away while a finished job's outputs upload and the next job runs: the
/// upload keeps trying within the upload window, and once the store is back both jobs
/// complete on their first attempt, without a return, one object each. The second job ran
/// while the first one's upload waited.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_outage_during_an_overlapped_upload_is_ridden_out() {
    within(HARD_LIMIT, async {
        let mut rig = Rig::start(Duration::ZERO).await;
        rig.proxy.set_down(true);
        let ids = rig.submit(2, 64 * 1024, None).await;
        let m = rig.machine("1s", "upload_window = \"60s\"\npending_uploads = 2\n");
        let w = until(
            Duration::from_secs(60),
            "the second job running beside the first's upload",
            || {
                m.worker()
                    .filter(|w| pending(w) == ids[..1] && w["current_job"]["job_id"] == ids[1].as_str())
            },
        )
        .await;
        assert_eq!(w["state"], "busy", "{w}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        assert_eq!(rig.job(&ids[0]).await["status"], "in_progress", "still uploading");
        rig.proxy.set_down(false);
        rig.all_completed(&ids, &m).await;
        for id in &ids {
            let j = rig.job(id).await;
            assert_eq!(j["retry_count"], "0", "{j:?}");
            assert!(j.get("machine_returns").is_none_or(|r| r == "0"), "{j:?}");
        }
        assert_eq!(sizes(&rig.store), [64 * 1024; 2], "one object per job");
    })
    .await;
}

/// A store slower than the jobs (1 s a request, jobs of 100 ms) with a byte budget of 2 MiB and
/// outputs of 1 MiB: the worker never holds more than two pending uploads although it may have
/// eight, waits for them instead of claiming, and never has more than three jobs in progress.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_byte_budget_holds_under_a_slow_store() {
    within(HARD_LIMIT, async {
        let mut rig = Rig::start(Duration::from_secs(1)).await;
        let ids = rig.submit(8, 1024 * 1024, None).await;
        let m = rig.machine("100ms", "pending_uploads = 8\npending_upload_mb = 2\n");
        let mut most_pending = 0;
        let mut most_in_progress = 0;
        let mut waited = false;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let statuses = rig.statuses(&ids).await;
            if statuses.iter().all(|s| s == "completed") {
                break;
            }
            assert!(Instant::now() < deadline, "{statuses:?}\n{}", m.log());
            most_in_progress = most_in_progress.max(statuses.iter().filter(|s| *s == "in_progress").count());
            if let Some(w) = m.worker() {
                most_pending = most_pending.max(pending(&w).len());
                let bytes: u64 = w["uploads"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|u| u["bytes"].as_u64()).sum())
                    .unwrap_or(0);
                assert!(bytes <= 2 * 1024 * 1024, "{w}");
                waited |= w["state"] == "waiting_for_uploads";
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        assert_eq!(most_pending, 2, "the budget is reached and held");
        assert!(
            most_in_progress <= 3,
            "at most two uploading and one running: {most_in_progress}"
        );
        assert!(waited, "the worker waited for its uploads");
        assert_eq!(sizes(&rig.store), [1024 * 1024; 8]);
    })
    .await;
}

/// An overlapped upload longer than the lease (two requests of 2.5 s, lease 2 s): the lease is
/// renewed until the job's end is written, so each job completes once, on its first attempt,
/// with one object, and nobody else ran it meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_renewed_across_an_upload_longer_than_the_lease() {
    within(HARD_LIMIT, async {
        let mut rig = Rig::start(Duration::from_millis(2500)).await;
        let ids = rig.submit(2, 1024, None).await;
        let m = rig.machine("200ms", "lease = \"2s\"\nheartbeat = \"500ms\"\npending_uploads = 2\n");
        until(Duration::from_secs(60), "an upload pending", || {
            m.worker().filter(|w| !pending(w).is_empty())
        })
        .await;
        rig.all_completed(&ids, &m).await;
        for id in &ids {
            let j = rig.job(id).await;
            assert_eq!(j["retry_count"], "0", "{j:?}");
        }
        assert_eq!(sizes(&rig.store), [1024; 2], "one object per job");
        let w = m.worker().expect("status");
        assert_eq!(w["counts"]["claimed"], 2, "claimed once each: {w}");
        assert_eq!(w["counts"]["lost"], 0, "{w}");
    })
    .await;
}

/// The first job's completion is written while the worker runs the second: `worker:<id>` still
/// says busy with the second job (the library's `worker_idle` checks `current_job_id`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_earlier_completion_does_not_mark_the_busy_worker_idle() {
    within(HARD_LIMIT, async {
        let mut rig = Rig::start(Duration::from_millis(700)).await;
        let first = rig.submit(1, 1024, Some(200)).await;
        let second = rig.submit(1, 1024, Some(5000)).await;
        let m = rig.machine("200ms", "pending_uploads = 2\n");
        let deadline = Instant::now() + Duration::from_secs(60);
        while rig.job(&first[0]).await["status"] != "completed" {
            assert!(Instant::now() < deadline, "{}", m.log());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let worker_id = m.worker().expect("status")["worker_id"].as_str().unwrap().to_owned();
        let w: BTreeMap<String, String> = rig
            .broker
            .connection()
            .hgetall(format!("worker:{worker_id}"))
            .await
            .unwrap();
        let seen = format!(
            "{w:?}\nfirst: {:?}\nsecond: {:?}\n{}",
            rig.job(&first[0]).await,
            rig.job(&second[0]).await,
            m.log()
        );
        assert_eq!(w["status"], "busy", "{seen}");
        assert_eq!(w["current_job_id"], second[0], "{seen}");
        assert_eq!(rig.job(&second[0]).await["status"], "in_progress");
        rig.all_completed(&second, &m).await;
        let w: BTreeMap<String, String> = rig
            .broker
            .connection()
            .hgetall(format!("worker:{worker_id}"))
            .await
            .unwrap();
        assert_eq!(w["status"], "idle", "idle once its last job ended: {w:?}");
    })
    .await;
}

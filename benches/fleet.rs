//! The Redis cost of a job as the fleet grows: N machines on one real redis-server (N = 1, 10,
//! 100), each with its own broker (its own command and pub/sub connections, the event loop,
//! reaper, sweeper and probe of `Broker::run`) and one worker running the real job runner with
//! the simulation connector, while jobs trickle in written as the API writes them (`MULTI`:
//! `ZADD jobs:pending`, `HSET job:<id>`, `PUBLISH job_submitted`).
//!
//! Server time is read from the server itself: `INFO commandstats` (the `FCALL` time, the
//! library's work, as issue 29 measured it) and `INFO cpu` (the main thread's CPU time: every
//! command, the pub/sub fan-out and the networking). Each fleet is first measured idle
//! (heartbeats, safety polls, reaper, sweeper, indexer lease) for as long, and that is
//! subtracted from the trickle, so a job's figure is what the job alone costs.
//!
//! Prints per N: FCALLs and server µs per job, empty claims per job, idle cost per machine per
//! second, submit -> claim p50; the time of each library function per job (N = 1, and the
//! ComfyUI-shaped run) and per idle machine per second (N = 100), from the slow log; the
//! all-in figure for a ComfyUI-shaped job (10 s, 30 sampler steps) with 100 machines and its
//! progress writes; then one line per goal, `met` or `NOT met`.
//!
//! Run with `cargo bench --bench fleet`.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, UNIX_EPOCH};

use futures_util::StreamExt;
use machine::broker::{Broker, BrokerOptions, Capabilities, NewJob};
use machine::config::{RedisUrl, SimulationConfig};
use machine::connectors::Connector;
use machine::connectors::simulation::SimulationConnector;
use machine::connectors::store::OutputStore;
use machine::worker::{Fate, JobReport, Worker, WorkerSettings};
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use testkit::RedisServer;
use tokio::sync::broadcast;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Jobs per second of the trickle, and for how long.
const TRICKLE_RATE: f64 = 10.0;
const TRICKLE_JOBS: usize = 100;
/// The trickle's job: 50 ms, 2 progress steps (issue 29's measurement).
const TRICKLE_JOB_MS: u64 = 50;
/// The ComfyUI-shaped job: 10 s, 30 sampler steps, 5 submitted per second.
const COMFY_JOB_MS: u64 = 10_000;
const COMFY_STEPS: u32 = 30;
const COMFY_RATE: f64 = 5.0;
const COMFY_JOBS: usize = 50;
/// How long each fleet is measured idle.
const IDLE: Duration = Duration::from_secs(10);

/// Server time counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
struct Counters {
    fcall_calls: u64,
    fcall_usec: f64,
    cpu_usec: f64,
}

impl std::ops::Sub for Counters {
    type Output = Counters;
    fn sub(self, o: Counters) -> Counters {
        Counters {
            fcall_calls: self.fcall_calls - o.fcall_calls,
            fcall_usec: self.fcall_usec - o.fcall_usec,
            cpu_usec: self.cpu_usec - o.cpu_usec,
        }
    }
}

async fn info(conn: &mut MultiplexedConnection, section: &str) -> String {
    redis::cmd("INFO").arg(section).query_async(conn).await.expect("INFO")
}

/// `FCALL` calls and time since the last `CONFIG RESETSTAT`, and the main thread's CPU time.
async fn counters(conn: &mut MultiplexedConnection) -> Counters {
    let stats = info(conn, "commandstats").await;
    let mut c = Counters::default();
    for line in stats.lines() {
        if let Some(rest) = line.strip_prefix("cmdstat_fcall:") {
            for kv in rest.split(',') {
                match kv.split_once('=') {
                    Some(("calls", v)) => c.fcall_calls = v.parse().unwrap_or(0),
                    Some(("usec", v)) => c.fcall_usec = v.parse().unwrap_or(0.0),
                    _ => {}
                }
            }
        }
    }
    let cpu = info(conn, "cpu").await;
    let field = |name: &str| -> f64 {
        cpu.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}:")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0.0)
    };
    // The main thread where the server reports it (7.0+), else the whole process.
    let main = field("used_cpu_user_main_thread") + field("used_cpu_sys_main_thread");
    c.cpu_usec = if main > 0.0 {
        main
    } else {
        field("used_cpu_user") + field("used_cpu_sys")
    } * 1e6;
    c
}

/// Server time of the library's functions, by function, from the slow log with a threshold of
/// 0 (it also logs the commands a script runs, inside their `FCALL`'s time, and not `EXEC`, so
/// only `FCALL`s are counted here; the API's submission and the heartbeats' transactions are in
/// the CPU figure).
type Breakdown = BTreeMap<String, (u64, f64)>;

async fn breakdown(conn: &mut MultiplexedConnection) -> Breakdown {
    let entries: Vec<redis::Value> = redis::cmd("SLOWLOG")
        .arg("GET")
        .arg(-1)
        .query_async(conn)
        .await
        .expect("SLOWLOG GET");
    let text = |v: &redis::Value| match v {
        redis::Value::BulkString(b) => String::from_utf8_lossy(b).into_owned(),
        redis::Value::SimpleString(s) => s.clone(),
        _ => String::new(),
    };
    let mut out = Breakdown::new();
    for e in entries {
        let redis::Value::Array(fields) = e else { continue };
        let (Some(redis::Value::Int(us)), Some(redis::Value::Array(args))) = (fields.get(2), fields.get(3)) else {
            continue;
        };
        if !args.first().map(text).unwrap_or_default().eq_ignore_ascii_case("FCALL") {
            continue;
        }
        let name = args.get(1).map(text).unwrap_or_default();
        let slot = out.entry(name).or_default();
        slot.0 += 1;
        slot.1 += *us as f64;
    }
    out
}

/// Prints a breakdown per job (or per machine per second, with `per` the divisor).
fn print_breakdown(title: &str, b: &Breakdown, per: f64, unit: &str) {
    println!("  {title}");
    println!(
        "    {:<20} {:>12} {:>12} {:>12}",
        "function",
        format!("calls/{unit}"),
        "us/call",
        format!("us/{unit}")
    );
    let mut rows: Vec<_> = b.iter().collect();
    rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
    for (name, (calls, us)) in rows {
        println!(
            "    {:<20} {:>12.2} {:>12.1} {:>12.1}",
            name,
            *calls as f64 / per,
            us / *calls as f64,
            us / per
        );
    }
}

/// Counts claims and empty claims across the fleet.
#[derive(Debug, Default)]
struct ClaimCount {
    claims: AtomicU64,
    empty: AtomicU64,
}

/// N machines, one worker each.
struct Fleet {
    n: usize,
    url: String,
    api: Broker,
    conn: MultiplexedConnection,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
    reports: broadcast::Receiver<JobReport>,
    claims: Arc<ClaimCount>,
    _out: tempfile::TempDir,
}

async fn fleet(server: &RedisServer, n: usize) -> Fleet {
    let url = RedisUrl::parse(&server.url()).expect("testkit URLs are valid");
    let shutdown = CancellationToken::new();
    let out = tempfile::tempdir().expect("temp dir");
    let store = Arc::new(OutputStore::new(out.path()));
    let connector: Arc<dyn Connector> = Arc::new(SimulationConnector::new(SimulationConfig {
        duration: Duration::from_millis(TRICKLE_JOB_MS),
        steps: 2,
        failure_rate: 0.0,
    }));
    let (tx, reports) = broadcast::channel(8192);
    let claims = Arc::new(ClaimCount::default());
    let mut tasks = Vec::new();
    for i in 0..n {
        let broker = Broker::connect(&url, BrokerOptions::default()).await.expect("connect");
        broker.ensure_functions().await.expect("install the library");
        let count = claims.clone();
        broker.observe_claims(Arc::new(move |_, claimed| {
            count.claims.fetch_add(1, Ordering::Relaxed);
            if !claimed {
                count.empty.fetch_add(1, Ordering::Relaxed);
            }
        }));
        tasks.push(tokio::spawn({
            let b = broker.clone();
            let s = shutdown.clone();
            async move {
                b.run(Duration::from_secs(5), s)
                    .await
                    .expect("the broker's work ends cleanly")
            }
        }));
        let mut worker = Worker::new(
            Capabilities::new(format!("m{i}-gpu0"), format!("m{i}"), &["simulation"]),
            HashMap::from([("simulation".to_owned(), connector.clone())]),
            WorkerSettings {
                heartbeat: Duration::from_secs(10),
                drain: Duration::from_secs(10),
                job_timeout: Duration::from_secs(60),
                progress_every: Duration::from_secs(1),
            },
            store.clone(),
        );
        worker.report_to(tx.clone());
        tasks.push(tokio::spawn({
            let s = shutdown.clone();
            async move { worker.run(broker, s).await.expect("the worker ends cleanly") }
        }));
    }
    let api = Broker::connect(&url, BrokerOptions::default()).await.expect("connect");
    // Reading a large slow log takes a while: no response timeout.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let conn = redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect");
    // Every top-level command and its time go to the slow log (see `breakdown`).
    for (k, v) in [("slowlog-log-slower-than", "0"), ("slowlog-max-len", "500000")] {
        let mut c = conn.clone();
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(k)
            .arg(v)
            .query_async(&mut c)
            .await
            .expect("CONFIG SET");
    }
    // Registration, the first claims, the indexer lease and the first heartbeats settle.
    tokio::time::sleep(Duration::from_secs(3)).await;
    Fleet {
        n,
        url: server.url(),
        api,
        conn,
        shutdown,
        tasks,
        reports,
        claims,
        _out: out,
    }
}

impl Fleet {
    async fn reset(&mut self) -> Counters {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut self.conn)
            .await
            .expect("CONFIG RESETSTAT");
        let _: () = redis::cmd("SLOWLOG")
            .arg("RESET")
            .query_async(&mut self.conn)
            .await
            .expect("SLOWLOG RESET");
        counters(&mut self.conn).await
    }

    /// Server time per second of the idle fleet, and by function.
    async fn idle(&mut self) -> (Counters, Breakdown) {
        let before = self.reset().await;
        tokio::time::sleep(IDLE).await;
        let d = counters(&mut self.conn).await - before;
        let secs = IDLE.as_secs_f64();
        let by = breakdown(&mut self.conn).await;
        (
            Counters {
                fcall_calls: (d.fcall_calls as f64 / secs).round() as u64,
                fcall_usec: d.fcall_usec / secs,
                cpu_usec: d.cpu_usec / secs,
            },
            by,
        )
    }

    /// Submits `jobs` jobs at `rate` per second as the API does and waits until every one
    /// completed; returns the server time and how long it all took.
    async fn trickle(&mut self, jobs: usize, rate: f64, payload: Value) -> Trickle {
        while self.reports.try_recv().is_ok() {}
        let claims0 = self.claims.claims.load(Ordering::Relaxed);
        let empty0 = self.claims.empty.load(Ordering::Relaxed);
        let mut pubsub = self.api_pubsub().await;
        let before = self.reset().await;
        let started = Instant::now();
        let every = Duration::from_secs_f64(1.0 / rate);
        let mut ids = Vec::with_capacity(jobs);
        let mut done = 0;
        let mut progress_writes = 0u64;
        let mut tick = tokio::time::interval(every);
        let mut messages = pubsub.on_message();
        while done < jobs {
            tokio::select! {
                _ = tick.tick(), if ids.len() < jobs => {
                    ids.push(self.api.submit(&NewJob::new("simulation", payload.clone())).await.expect("submit"));
                }
                r = self.reports.recv() => {
                    let r = r.expect("every job is reported");
                    assert_eq!(r.outcome, Fate::Completed, "{r:?}");
                    done += 1;
                }
                Some(m) = messages.next() => {
                    let doc: Value = serde_json::from_str(&m.get_payload::<String>().unwrap_or_default()).unwrap_or(Value::Null);
                    // The worker's progress writes carry a status; the claim's own does not.
                    if doc.get("status").is_some() {
                        progress_writes += 1;
                    }
                }
            }
        }
        let elapsed = started.elapsed();
        let server = counters(&mut self.conn).await - before;
        let by = breakdown(&mut self.conn).await;
        drop(messages);
        let latencies = self.claim_latencies(&ids).await;
        Trickle {
            jobs,
            elapsed,
            server,
            claims: self.claims.claims.load(Ordering::Relaxed) - claims0,
            empty: self.claims.empty.load(Ordering::Relaxed) - empty0,
            progress_writes,
            claim_p50: percentile(latencies, 0.5),
            by,
        }
    }

    async fn api_pubsub(&self) -> redis::aio::PubSub {
        let client = redis::Client::open(self.url.as_str()).expect("client");
        let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
        pubsub.subscribe("update_job_progress").await.expect("subscribe");
        pubsub
    }

    /// Submit -> claim of each job, from its own hash (`created_at`, `assigned_at`, ms).
    async fn claim_latencies(&mut self, ids: &[String]) -> Vec<f64> {
        let mut out = Vec::new();
        for id in ids {
            let (created, assigned): (Option<String>, Option<String>) = redis::cmd("HMGET")
                .arg(format!("job:{id}"))
                .arg("created_at")
                .arg("assigned_at")
                .query_async(&mut self.conn)
                .await
                .expect("HMGET");
            if let (Some(c), Some(a)) = (created.as_deref().and_then(ms), assigned.as_deref().and_then(ms)) {
                out.push((a - c) as f64);
            }
        }
        out
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(30), t).await;
        }
    }
}

fn ms(iso: &str) -> Option<i64> {
    let t = humantime::parse_rfc3339_weak(iso.trim_end_matches('Z')).ok()?;
    Some(t.duration_since(UNIX_EPOCH).ok()?.as_millis() as i64)
}

fn percentile(mut v: Vec<f64>, q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 - 1.0) * q).round() as usize]
}

/// One trickle's outcome.
#[derive(Debug)]
struct Trickle {
    jobs: usize,
    elapsed: Duration,
    server: Counters,
    claims: u64,
    empty: u64,
    progress_writes: u64,
    claim_p50: f64,
    by: Breakdown,
}

impl Trickle {
    /// Server time per job with the idle fleet's time over as long taken out.
    fn per_job(&self, idle: Counters) -> PerJob {
        let secs = self.elapsed.as_secs_f64();
        let jobs = self.jobs as f64;
        PerJob {
            fcalls: (self.server.fcall_calls as f64 - idle.fcall_calls as f64 * secs) / jobs,
            fcall_us: (self.server.fcall_usec - idle.fcall_usec * secs) / jobs,
            cpu_us: (self.server.cpu_usec - idle.cpu_usec * secs) / jobs,
        }
    }
}

/// A job's share of the server's work.
#[derive(Debug, Clone, Copy)]
struct PerJob {
    fcalls: f64,
    fcall_us: f64,
    cpu_us: f64,
}

/// One fleet size's figures.
#[derive(Debug, Clone, Copy)]
struct Row {
    per: PerJob,
    idle: Counters,
    claim_p50: f64,
}

/// The same trickle through real `machine run` processes (one simulation worker each): the
/// in-process fleets above stand for machines only if the real binary makes the same calls.
/// Returns FCALLs and FCALL µs per job, idle subtracted.
async fn real_machines(n: usize, jobs: usize) -> PerJob {
    let server = RedisServer::start();
    let dirs: Vec<tempfile::TempDir> = (0..n).map(|_| tempfile::tempdir().expect("temp dir")).collect();
    let mut children = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let config = dir.path().join("machine.toml");
        std::fs::write(&config, "[connectors.simulation]\nduration = \"50ms\"\nsteps = 2\n").expect("config");
        let log = std::fs::File::create(dir.path().join("machine.log")).expect("log");
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_machine"))
            .arg("run")
            .env("MACHINE_CONFIG", &config)
            .env("MACHINE_ID", format!("real{i}"))
            .env("MACHINE_WORKSPACE", dir.path().join("ws"))
            .env("MACHINE_HEALTH_PORT", testkit::free_port().to_string())
            .env("HUB_REDIS_URL", server.url())
            .env("WORKER_CONNECTORS", "simulation:1")
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("the machine binary starts");
        children.push(child);
    }
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    let mut conn = redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect");
    let count = async |conn: &mut MultiplexedConnection, cmd: &str, key: &str| -> usize {
        redis::cmd(cmd).arg(key).query_async(conn).await.unwrap_or(0)
    };
    let started = Instant::now();
    while count(&mut conn, "HLEN", "jobs:idx:parked").await < n {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the real machines never got ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let reset = async |conn: &mut MultiplexedConnection| {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(conn)
            .await
            .expect("RESETSTAT");
        counters(conn).await
    };
    let before = reset(&mut conn).await;
    tokio::time::sleep(IDLE).await;
    let idle = counters(&mut conn).await - before;
    let url = RedisUrl::parse(&server.url()).expect("testkit URLs are valid");
    let api = Broker::connect(&url, BrokerOptions::default()).await.expect("connect");
    let before = reset(&mut conn).await;
    let t0 = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / TRICKLE_RATE));
    for _ in 0..jobs {
        tick.tick().await;
        api.submit(&NewJob::new(
            "simulation",
            json!({"duration_ms": TRICKLE_JOB_MS, "steps": 2}),
        ))
        .await
        .expect("submit");
    }
    while count(&mut conn, "HLEN", "jobs:completed").await < jobs {
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "the real machines did not complete every job"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let elapsed = t0.elapsed().as_secs_f64();
    let d = counters(&mut conn).await - before;
    for mut c in children {
        let _ = c.kill();
        let _ = c.wait();
    }
    let idle_secs = IDLE.as_secs_f64();
    PerJob {
        fcalls: (d.fcall_calls as f64 - idle.fcall_calls as f64 / idle_secs * elapsed) / jobs as f64,
        fcall_us: (d.fcall_usec - idle.fcall_usec / idle_secs * elapsed) / jobs as f64,
        cpu_us: (d.cpu_usec - idle.cpu_usec / idle_secs * elapsed) / jobs as f64,
    }
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "NOT met" }
}

/// The bench as one script, each fleet size and check in the order it is printed. Long (about
/// 150 lines) on purpose: a reader follows the README's figures down it.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("\nfleet bench: one redis-server, N machines (own connections each), one worker per machine");
    println!(
        "trickle: {TRICKLE_JOBS} jobs at {TRICKLE_RATE}/s, {TRICKLE_JOB_MS} ms and 2 progress steps each, written as the API writes them\n"
    );
    println!(
        "{:>4} {:>10} {:>14} {:>14} {:>13} {:>16} {:>16} {:>14}",
        "N",
        "FCALL/job",
        "FCALL us/job",
        "CPU us/job",
        "empty cl/job",
        "idle FCALL us/s/m",
        "idle CPU us/s/m",
        "submit->claim"
    );
    let mut rows: BTreeMap<usize, Row> = BTreeMap::new();
    let mut comfy = None;
    for n in [1usize, 10, 100] {
        let server = RedisServer::start();
        let mut f = fleet(&server, n).await;
        let (idle, idle_by) = f.idle().await;
        let t = f
            .trickle(
                TRICKLE_JOBS,
                TRICKLE_RATE,
                json!({"duration_ms": TRICKLE_JOB_MS, "steps": 2}),
            )
            .await;
        let per = t.per_job(idle);
        println!(
            "{:>4} {:>10.1} {:>14.0} {:>14.0} {:>13.2} {:>16.1} {:>16.1} {:>11.2} ms",
            n,
            per.fcalls,
            per.fcall_us,
            per.cpu_us,
            t.empty as f64 / t.jobs as f64,
            idle.fcall_usec / f.n as f64,
            idle.cpu_usec / f.n as f64,
            t.claim_p50
        );
        let _ = t.claims;
        rows.insert(
            n,
            Row {
                per,
                idle,
                claim_p50: t.claim_p50,
            },
        );
        if n == 1 {
            print_breakdown(
                "N=1 trickle, by function (per job, idle not subtracted):",
                &t.by,
                t.jobs as f64,
                "job",
            );
        }
        if n == 100 {
            print_breakdown(
                "N=100 idle, by function (per machine per second):",
                &idle_by,
                IDLE.as_secs_f64() * 100.0,
                "m/s",
            );
            let c = f
                .trickle(
                    COMFY_JOBS,
                    COMFY_RATE,
                    json!({"duration_ms": COMFY_JOB_MS, "steps": COMFY_STEPS}),
                )
                .await;
            print_breakdown(
                "N=100 ComfyUI-shaped jobs, by function (per job, idle not subtracted):",
                &c.by,
                c.jobs as f64,
                "job",
            );
            comfy = Some((c.per_job(idle), c.progress_writes as f64 / c.jobs as f64, c.claim_p50));
        }
        f.stop().await;
    }
    let (comfy_per, comfy_progress, comfy_p50) = comfy.expect("the 100-machine fleet ran the ComfyUI-shaped jobs");
    let real = real_machines(3, 60).await;
    println!(
        "\nthe same trickle (60 jobs) through 3 real `machine run` processes: {:.1} FCALLs, {:.0} us FCALL, {:.0} us CPU per job, idle subtracted",
        real.fcalls, real.fcall_us, real.cpu_us
    );
    println!(
        "\nComfyUI-shaped job ({} s, {COMFY_STEPS} sampler steps, {COMFY_JOBS} jobs at {COMFY_RATE}/s) with 100 machines, idle subtracted:",
        COMFY_JOB_MS / 1000
    );
    println!(
        "  all-in: {:.0} us FCALL time per job ({:.1} FCALLs), {:.0} us main-thread CPU per job; {:.1} progress writes per job; submit->claim p50 {:.2} ms",
        comfy_per.fcall_us, comfy_per.fcalls, comfy_per.cpu_us, comfy_progress, comfy_p50
    );
    let one = rows[&1];
    let hundred = rows[&100];
    println!(
        "periodic (heartbeats, safety polls, reaper, sweeper, indexer lease) per machine per second: N=1 {:.1} us FCALL / {:.1} us CPU, N=100 {:.1} us FCALL / {:.1} us CPU",
        one.idle.fcall_usec,
        one.idle.cpu_usec,
        hundred.idle.fcall_usec / 100.0,
        hundred.idle.cpu_usec / 100.0
    );
    println!("\ngoals:");
    let in_process = rows[&10].per.fcalls;
    println!(
        "real machines make the calls the in-process fleet makes: {:.1} vs {in_process:.1} FCALLs per job (goal: within 1 call): {}",
        real.fcalls,
        verdict((real.fcalls - in_process).abs() <= 1.0)
    );
    let ratio_fcall = hundred.per.fcall_us / one.per.fcall_us;
    let ratio_cpu = hundred.per.cpu_us / one.per.cpu_us;
    println!(
        "job path FCALL us/job at N=100 is {ratio_fcall:.2}x N=1 (goal <= 1.2x): {}",
        verdict(ratio_fcall <= 1.2)
    );
    println!(
        "job path main-thread CPU us/job at N=100 is {ratio_cpu:.2}x N=1 (goal <= 1.2x): {}",
        verdict(ratio_cpu <= 1.2)
    );
    let worst_p50 = rows.values().map(|r| r.claim_p50).fold(0.0, f64::max);
    println!(
        "submit->claim p50 at most {worst_p50:.2} ms over N=1,10,100 (goal <= 5 ms): {}",
        verdict(worst_p50 <= 5.0)
    );
    println!(
        "all-in FCALL us per ComfyUI-shaped job with 100 machines {:.0} (goal <= 400 us): {}",
        comfy_per.fcall_us,
        verdict(comfy_per.fcall_us <= 400.0)
    );
    println!(
        "all-in main-thread CPU us per ComfyUI-shaped job with 100 machines {:.0} (goal <= 400 us): {}",
        comfy_per.cpu_us,
        verdict(comfy_per.cpu_us <= 400.0)
    );
    let allowed = (COMFY_JOB_MS / 1000) as f64 + 2.0;
    println!(
        "progress writes per {} s job {comfy_progress:.1} (goal <= one a second, plus the first and the last: {allowed}): {}",
        COMFY_JOB_MS / 1000,
        verdict(comfy_progress <= allowed)
    );
    let per_machine_1 = one.idle.fcall_usec;
    let per_machine_100 = hundred.idle.fcall_usec / 100.0;
    println!(
        "periodic FCALL us/s per machine at N=100 {per_machine_100:.1} vs {per_machine_1:.1} at N=1 (goal: fixed, <= 1.5x): {}",
        verdict(per_machine_100 <= per_machine_1 * 1.5)
    );
}

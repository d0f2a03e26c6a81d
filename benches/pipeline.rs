//! Busy fraction of the GPU workers with outputs uploaded while the next job runs, against
//! uploaded before the next claim, on the real binary.
//!
//! `machine run` with 4 simulation workers whose jobs run 2 s each and produce one 4 MiB output,
//! stored in a real local S3 server (moto) behind a delaying TCP proxy (each request held
//! `PIPELINE_BENCH_DELAY_MS`, 220 ms unless set: a PUT and the HEAD that verifies it make an
//! upload of about 0.5 s), a real redis-server and a saturated queue (every job queued before
//! the machine starts). It runs once with `worker.pending_uploads = 2` (overlap on) and once
//! with 0 (off), and prints side by side, per worker, the busy fraction: time in the connector
//! over wall time, from the start of its first job to the start of its last (the jobs' own
//! `started_at`), so start-up and the last upload do not count. The time a job adds to its
//! worker's cycle with overlap off is printed as the measured upload (plus the completion
//! write and the next claim).
//!
//! Goal: at least 97 % busy with overlap on, where off is about 80 %.
//!
//! Run with `cargo bench --bench pipeline` (scripts/install-deps.sh --test installs moto).

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use machine::broker::{Broker, BrokerOptions, NewJob};
use machine::config::RedisUrl;
use redis::AsyncCommands;
use serde_json::json;
use testkit::{ObjectServer, RedisServer, SlowProxy, StoreKind};

const WORKERS: usize = 4;
const JOBS_PER_WORKER: usize = 8;
const RUN: Duration = Duration::from_secs(2);
const OUTPUT: usize = 4 * 1024 * 1024;
const BUCKET: &str = "bench";
const GOAL: f64 = 0.97;

/// One phase's result: each worker's busy fraction and mean gap between its jobs.
struct Phase {
    busy: Vec<f64>,
    gap: Duration,
    wall: Duration,
}

fn parse_ms(iso: &str) -> i64 {
    // `2026-01-01T00:00:00.000Z`: the time of day is all that differs within a run.
    let t = &iso[11..23];
    let h: i64 = t[0..2].parse().expect("hours");
    let m: i64 = t[3..5].parse().expect("minutes");
    let s: i64 = t[6..8].parse().expect("seconds");
    let ms: i64 = t[9..12].parse().expect("milliseconds");
    let day: i64 = iso[8..10].parse().expect("day");
    (((day * 24 + h) * 60 + m) * 60 + s) * 1000 + ms
}

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn phase(
    name: &str,
    pending_uploads: u32,
    redis: &RedisServer,
    broker: &Broker,
    store: &ObjectServer,
    proxy: &SlowProxy,
) -> Phase {
    let ctx = json!({"storage": {"provider": "s3", "bucket": BUCKET}, "prefix": name});
    let mut ids = Vec::new();
    for _ in 0..WORKERS * JOBS_PER_WORKER {
        let id = broker
            .submit(&NewJob::new("simulation", json!({"artifact_bytes": OUTPUT})))
            .await
            .expect("submit");
        broker
            .connection()
            .hset::<_, _, _, ()>(format!("job:{id}"), "ctx", ctx.to_string())
            .await
            .expect("ctx");
        ids.push(id);
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("machine.toml");
    std::fs::write(
        &config,
        format!(
            "[connectors.simulation]\nduration = \"{}ms\"\nsteps = 4\n\n[worker]\npending_uploads = {pending_uploads}\n",
            RUN.as_millis()
        ),
    )
    .expect("config");
    let log = std::fs::File::create(dir.path().join("machine.log")).expect("log");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_machine"));
    cmd.arg("run")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", format!("bench-{name}"))
        .env("MACHINE_WORKSPACE", dir.path().join("ws"))
        .env("MACHINE_HEALTH_PORT", testkit::free_port().to_string())
        .env("HUB_REDIS_URL", redis.url())
        .env("WORKER_CONNECTORS", format!("simulation:{WORKERS}"))
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    for (k, v) in store.env() {
        let v = if k == "AWS_ENDPOINT" { proxy.url() } else { v };
        cmd.env(k, v);
    }
    let started = Instant::now();
    let mut running = Running(cmd.spawn().expect("start the machine"));
    let deadline = Instant::now() + Duration::from_secs(600);
    let jobs = loop {
        let mut jobs = Vec::with_capacity(ids.len());
        for id in &ids {
            let j: BTreeMap<String, String> = broker.connection().hgetall(format!("job:{id}")).await.expect("job");
            jobs.push(j);
        }
        if jobs
            .iter()
            .all(|j| j.get("status").map(String::as_str) == Some("completed"))
        {
            break jobs;
        }
        assert!(
            Instant::now() < deadline,
            "the {name} phase did not finish; log:\n{}",
            std::fs::read_to_string(dir.path().join("machine.log")).unwrap_or_default()
        );
        assert!(running.0.try_wait().expect("try_wait").is_none(), "the machine exited");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let wall = started.elapsed();
    drop(running);
    let mut starts: BTreeMap<String, Vec<i64>> = BTreeMap::new();
    for j in &jobs {
        starts
            .entry(j["worker_id"].clone())
            .or_default()
            .push(parse_ms(&j["started_at"]));
    }
    let mut busy = Vec::new();
    let mut gaps = Vec::new();
    for s in starts.values_mut() {
        s.sort_unstable();
        if s.len() < 2 {
            continue;
        }
        let span = Duration::from_millis(u64::try_from(s[s.len() - 1] - s[0]).expect("ordered"));
        let cycles = u32::try_from(s.len() - 1).expect("few jobs");
        busy.push(RUN.as_secs_f64() * f64::from(cycles) / span.as_secs_f64());
        gaps.push(span / cycles - RUN.min(span / cycles));
    }
    let gap = gaps.iter().sum::<Duration>() / u32::try_from(gaps.len().max(1)).expect("few workers");
    Phase { busy, gap, wall }
}

fn percent(v: f64) -> String {
    format!("{:.1} %", v * 100.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let delay = std::env::var("PIPELINE_BENCH_DELAY_MS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_millis(220), Duration::from_millis);
    let redis = RedisServer::start();
    let store = ObjectServer::start(StoreKind::S3);
    store.create_bucket(BUCKET);
    let proxy = SlowProxy::start(&store.endpoint(), delay);
    let url = RedisUrl::parse(&redis.url()).expect("testkit URLs are valid");
    let broker = Broker::connect(&url, BrokerOptions::default()).await.expect("connect");
    broker.ensure_functions().await.expect("install the library");

    let on = phase("on", 2, &redis, &broker, &store, &proxy).await;
    let off = phase("off", 0, &redis, &broker, &store, &proxy).await;

    println!(
        "\n{WORKERS} simulation workers, {JOBS_PER_WORKER} jobs each of {} s with one {} MiB output, S3 (moto) behind a proxy holding each request {} ms\n",
        RUN.as_secs(),
        OUTPUT / (1024 * 1024),
        delay.as_millis()
    );
    println!("{:<34} {:>14} {:>14}", "", "overlap on", "overlap off");
    let min = |v: &[f64]| v.iter().copied().fold(f64::INFINITY, f64::min);
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    println!(
        "{:<34} {:>14} {:>14}",
        "busy fraction, mean of workers",
        percent(mean(&on.busy)),
        percent(mean(&off.busy))
    );
    println!(
        "{:<34} {:>14} {:>14}",
        "busy fraction, least busy worker",
        percent(min(&on.busy)),
        percent(min(&off.busy))
    );
    println!(
        "{:<34} {:>14} {:>14}",
        "idle between jobs, mean",
        format!("{:.3} s", on.gap.as_secs_f64()),
        format!("{:.3} s", off.gap.as_secs_f64())
    );
    println!(
        "{:<34} {:>14} {:>14}",
        "wall time of the phase",
        format!("{:.1} s", on.wall.as_secs_f64()),
        format!("{:.1} s", off.wall.as_secs_f64())
    );
    println!(
        "\nmeasured upload + completion per job (overlap off): {:.3} s",
        off.gap.as_secs_f64()
    );
    println!(
        "busy fraction with overlap on (goal >= 97 % busy with 2 s jobs and 0.5 s uploads): {}",
        if min(&on.busy) >= GOAL { "met" } else { "NOT met" }
    );
}

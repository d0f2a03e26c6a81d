//! Overhead of the machine per job: 1,000 ComfyUI jobs through one worker against a fake
//! ComfyUI that finishes instantly and a real redis-server, both on this host.
//!
//! Prints, per job, the raw round trip of the fake ComfyUI through the connector alone (the
//! baseline: WebSocket, `/prompt`, events, `/history`, `/view`), the worker's total from claim
//! to result written in Redis, and the machine's added latency (total minus the connector's own
//! run): p50, p99 and mean. Goal: added p50 at most 5 ms.
//!
//! Run with `cargo bench --bench worker`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use machine::broker::{Broker, BrokerOptions, Capabilities, NewJob};
use machine::config::RedisUrl;
use machine::connectors::comfyui::ComfyuiConnector;
use machine::connectors::store::OutputStore;
use machine::connectors::{Connector, Job, ProgressSink};
use machine::worker::{Fate, Worker, WorkerSettings};
use serde_json::json;
use testkit::{FakeComfyui, RedisServer};
use tokio_util::sync::CancellationToken;

const JOBS: usize = 1000;

fn workflow() -> serde_json::Value {
    json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors"}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "bench"}}
    })
}

fn stats(mut v: Vec<Duration>) -> (Duration, Duration, Duration) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize];
    let mean = v.iter().sum::<Duration>() / v.len() as u32;
    (at(0.50), at(0.99), mean)
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let server = RedisServer::start();
    let comfy = FakeComfyui::start();
    let connector: Arc<dyn Connector> = Arc::new(ComfyuiConnector::new(comfy.url().parse().expect("URL")));

    // Baseline: the fake ComfyUI round trip through the connector alone.
    let mut baseline = Vec::with_capacity(JOBS);
    let (sink, _rx) = ProgressSink::new();
    let cancel = CancellationToken::new();
    for i in 0..JOBS {
        let job = Job {
            id: format!("baseline-{i}"),
            service_required: "comfyui".into(),
            payload: workflow(),
            customer_id: String::new(),
            ctx: serde_json::Value::Null,
            timeout: None,
        };
        let t = Instant::now();
        connector
            .run(&job, &sink, &cancel)
            .await
            .expect("the fake ComfyUI job succeeds");
        baseline.push(t.elapsed());
    }

    // The worker: claim -> start -> connector -> store outputs -> complete, from Redis.
    let url = RedisUrl::parse(&server.url()).expect("testkit URLs are valid");
    let broker = Broker::connect(&url, BrokerOptions::default()).await.expect("connect");
    broker.ensure_functions().await.expect("install the library");
    let shutdown = CancellationToken::new();
    let events = tokio::spawn({
        let b = broker.clone();
        let s = shutdown.clone();
        async move { b.run_events(s).await }
    });
    for _ in 0..JOBS {
        broker
            .submit(&NewJob::new("comfyui", json!({"workflow": workflow()})))
            .await
            .expect("submit");
    }
    let out = tempfile::tempdir().expect("temp dir");
    let mut worker = Worker::new(
        Capabilities::new("bench-gpu0", "bench", &["comfyui"]),
        HashMap::from([("comfyui".to_owned(), connector.clone())]),
        WorkerSettings {
            heartbeat: Duration::from_secs(10),
            drain: Duration::from_secs(10),
            job_timeout: Duration::from_secs(60),
            progress_every: Duration::from_secs(1),
        },
        Arc::new(OutputStore::new(out.path())),
    );
    let (tx, mut reports) = tokio::sync::broadcast::channel(JOBS * 2);
    worker.report_to(tx);
    let started = Instant::now();
    let run = tokio::spawn({
        let b = broker.clone();
        let s = shutdown.clone();
        async move { worker.run(b, s).await }
    });
    let mut total = Vec::with_capacity(JOBS);
    let mut added = Vec::with_capacity(JOBS);
    while total.len() < JOBS {
        let r = reports.recv().await.expect("every job is reported");
        assert_eq!(r.outcome, Fate::Completed, "{r:?}");
        total.push(r.total);
        added.push(r.total.saturating_sub(r.run));
    }
    let elapsed = started.elapsed();
    shutdown.cancel();
    run.await
        .expect("the worker task ends")
        .expect("the worker ends cleanly");
    events
        .await
        .expect("the event task ends")
        .expect("the event loop ends cleanly");

    let rows = [
        ("fake ComfyUI round trip (connector alone, baseline)", stats(baseline)),
        ("worker: claim -> result written", stats(total)),
        ("machine added latency (total - connector run)", stats(added.clone())),
    ];
    println!("\n{JOBS} ComfyUI jobs through one worker (real redis-server, instant fake ComfyUI)\n");
    println!("{:<55} {:>10} {:>10} {:>10}", "per job", "p50 ms", "p99 ms", "mean ms");
    for (name, (p50, p99, mean)) in rows {
        println!("{name:<55} {:>10} {:>10} {:>10}", ms(p50), ms(p99), ms(mean));
    }
    println!(
        "\nthroughput: {:.0} jobs/s; goal: added p50 <= 5 ms -> {}",
        JOBS as f64 / elapsed.as_secs_f64(),
        if stats(added).0 <= Duration::from_millis(5) {
            "met"
        } else {
            "NOT met"
        }
    );
}

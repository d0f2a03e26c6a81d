//! Models and the broker: a worker advertises the models really on its disk, including those
//! that arrive after it was built (the installers run after the workers are built) or while it
//! runs, and stops advertising those that leave; jobs that require a model follow.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use machine::config::{self, RedisUrl};
use machine::gpu::{HostInfo, Probe};
use machine::matcher::{Broker, BrokerOptions, NewJob};
use machine::plan::Plan;
use machine::worker::{Readiness, Workers};
use redis::AsyncCommands;
use serde_json::{Value, json};
use testkit::{FakeComfyui, RedisServer};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(60);

async fn advertised(conn: &mut redis::aio::MultiplexedConnection, worker: &str) -> Vec<String> {
    let caps: Option<String> = conn.hget(format!("worker:{worker}"), "capabilities").await.unwrap();
    let caps: Value = caps.map_or(Value::Null, |c| serde_json::from_str(&c).unwrap());
    caps.pointer("/models/comfyui")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).map(str::to_owned).collect())
        .unwrap_or_default()
}

async fn wait_for(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(15);
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn capabilities_follow_the_models_on_disk() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start();
        let url = RedisUrl::parse(&server.url()).unwrap();
        let opts = BrokerOptions {
            safety_poll: Duration::from_millis(200),
            ..BrokerOptions::default()
        };
        let broker = Broker::connect(&url, opts).await.unwrap();
        broker.ensure_functions().await.unwrap();
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let comfy = FakeComfyui::start();
        let dir = tempfile::tempdir().unwrap();
        let workspace = dir.path().join("ws");
        let models = workspace.join("ComfyUI/models");
        std::fs::create_dir_all(models.join("checkpoints")).unwrap();
        let env = BTreeMap::from([
            ("MACHINE_ID", "m1".to_owned()),
            ("MACHINE_WORKSPACE", workspace.display().to_string()),
            ("WORKER_CONNECTORS", "comfyui".to_owned()),
            ("COMFYUI_BASE_PORT", comfy.addr().port().to_string()),
        ]);
        let env: BTreeMap<&str, &str> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let config = config::load_str(None, &env).unwrap();
        let probe = Probe::from_parts(
            Vec::new(),
            HostInfo {
                cpu_cores: 2,
                ram_total_bytes: 4 << 30,
                ram_available_bytes: 2 << 30,
                disk_free_bytes: None,
            },
        );
        let plan = Plan::build(&config, &probe).unwrap();
        let workers = Workers::build(&config, &probe, &plan, &env).unwrap();
        // What the models installer downloads on this boot lands after the workers were built.
        std::fs::create_dir_all(models.join("loras")).unwrap();
        std::fs::write(models.join("loras/late.safetensors"), b"weights").unwrap();

        let shutdown = CancellationToken::new();
        let (_ready_tx, ready_rx) = watch::channel(true);
        let readiness: Readiness = BTreeMap::from([("comfyui-cpu0".to_owned(), ready_rx)]);
        let run = tokio::spawn({
            let (broker, shutdown) = (broker.clone(), shutdown.clone());
            async move {
                workers
                    .serve(broker, Duration::from_secs(1), &readiness, shutdown)
                    .await
                    .unwrap()
            }
        });
        wait_for("the model installed at start to be advertised", async || {
            advertised(&mut conn, "m1-cpu0")
                .await
                .contains(&"late.safetensors".to_owned())
        })
        .await;

        // A job requiring a model nobody has waits; the model arriving on disk lets it run.
        let mut job = NewJob::new(
            "comfyui",
            json!({"9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}}),
        );
        job.requirements = json!({"models": ["fresh"]}).to_string();
        let id = broker.submit(&job).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        let status = |j: Option<machine::matcher::JobView>| j.unwrap().job["status"].clone();
        assert_eq!(status(broker.show(&id).await.unwrap()), "pending");
        std::fs::write(models.join("checkpoints/fresh.safetensors"), b"weights").unwrap();
        wait_for("the job requiring the new model to complete", async || {
            status(broker.show(&id).await.unwrap()) == "completed"
        })
        .await;

        // A model that leaves the disk leaves the capabilities.
        std::fs::remove_file(models.join("checkpoints/fresh.safetensors")).unwrap();
        wait_for("the removed model to be withdrawn", async || {
            !advertised(&mut conn, "m1-cpu0").await.contains(&"fresh".to_owned())
        })
        .await;
        assert!(advertised(&mut conn, "m1-cpu0").await.contains(&"late".to_owned()));
        shutdown.cancel();
        run.await.unwrap();
    })
    .await
    .expect("the test finishes within its limit");
}

//! Models and the broker: a worker advertises the models really on its disk, including those
//! that arrive after it was built (the installers run after the workers are built) or while it
//! runs, and stops advertising those that leave; jobs that require a model follow.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use machine::broker::{Broker, BrokerOptions, NewJob};
use machine::cloud::CloudStores;
use machine::config::{self, Credentials, RedisUrl};
use machine::gpu::{HostInfo, Probe};
use machine::plan::Plan;
use machine::worker::{Readiness, Workers};
use redis::AsyncCommands;
use serde_json::{Value, json};
use testkit::{FakeComfyui, ObjectServer, RedisServer, StoreKind};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::support::sha256;

/// Cloud stores without credentials, for a models store whose sources are all HTTP.
fn no_cloud() -> Arc<CloudStores> {
    Arc::new(CloudStores::with_vars([]))
}

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
        let workers = Workers::build(&config, &probe, &plan).unwrap();
        // What the models installer downloads on this boot lands after the workers were built.
        std::fs::create_dir_all(models.join("loras")).unwrap();
        std::fs::write(models.join("loras/late.safetensors"), b"weights").unwrap();

        let shutdown = CancellationToken::new();
        let (_ready_tx, ready_rx) = watch::channel(true);
        let readiness: Readiness = BTreeMap::from([("comfyui-cpu0".to_owned(), ready_rx)]);
        let run = tokio::spawn({
            let (broker, shutdown) = (broker.clone(), shutdown.clone());
            async move { workers.run(broker, &readiness, shutdown).await.unwrap() }
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
        let status = |j: Option<machine::broker::JobView>| j.unwrap().job.state().name().to_owned();
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

/// Deterministic bytes that do not compress to nothing.
fn blob(n: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed) + 1;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

/// A workspace, a file server with models, a catalogue of them and a store over both.
struct Shelf {
    dir: tempfile::TempDir,
    server: testkit::FileServer,
    catalogue: String,
}

impl Shelf {
    fn new() -> Shelf {
        Shelf {
            dir: tempfile::tempdir().unwrap(),
            server: testkit::FileServer::start(),
            catalogue: String::new(),
        }
    }

    /// Serves `bytes` as model `name` of `kind`; `sha` overrides the catalogue's checksum.
    fn add(&mut self, name: &str, kind: &str, bytes: Vec<u8>, sha: Option<String>) {
        let sha = sha.unwrap_or_else(|| sha256(&bytes));
        self.entry(name, kind, &sha, bytes.len(), &[]);
        let path = format!("/m/{name}");
        self.server.add(&path, bytes, "application/octet-stream");
    }

    /// Catalogues `bytes` as model `name` of `kind` from `sources` first, then the file server.
    fn add_with_sources(&mut self, name: &str, kind: &str, bytes: Vec<u8>, sources: &[String]) {
        self.entry(name, kind, &sha256(&bytes), bytes.len(), sources);
        let path = format!("/m/{name}");
        self.server.add(&path, bytes, "application/octet-stream");
    }

    fn entry(&mut self, name: &str, kind: &str, sha: &str, size: usize, first: &[String]) {
        let mut sources: Vec<String> = first.iter().map(|s| format!("\"{s}\"")).collect();
        sources.push(format!("\"{}\"", self.server.url(&format!("/m/{name}"))));
        self.catalogue.push_str(&format!(
            "[[model]]\nname = \"{name}\"\nkind = \"{kind}\"\nsha256 = \"{sha}\"\nsize = {size}\nsources = [{}]\n\n",
            sources.join(", ")
        ));
    }

    fn link_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("ws/ComfyUI/models")
    }

    fn shared_dir(&self) -> std::path::PathBuf {
        self.dir.path().join("ws/models")
    }

    fn store(&self, budget: Option<u64>, pinned: &[&str]) -> machine::models::ModelStore {
        let file = self.dir.path().join("catalogue.toml");
        std::fs::write(&file, &self.catalogue).unwrap();
        std::fs::create_dir_all(self.link_dir()).unwrap();
        let settings = machine::models::StoreSettings {
            catalogue: Some(file),
            shared_dir: self.shared_dir(),
            link_dir: self.link_dir(),
            budget,
            pinned: pinned.iter().map(|p| (*p).to_owned()).collect(),
            loader_inputs: vec!["ckpt_name".to_owned(), "lora_name".to_owned()],
        };
        machine::models::ModelStore::new(settings, no_cloud(), &Credentials::default()).unwrap()
    }

    fn downloads_of(&self, name: &str) -> usize {
        self.server
            .seen()
            .iter()
            .filter(|r| r.path == format!("/m/{name}"))
            .count()
    }
}

fn lora_job(lora: &str, steps: u64) -> machine::connectors::Job {
    machine::connectors::Job {
        id: format!("job-{lora}"),
        service_required: "comfyui".into(),
        payload: json!({
            "1": {"class_type": "LoraLoader", "inputs": {"lora_name": lora}},
            "3": {"class_type": "KSampler", "inputs": {"steps": steps, "step_ms": 10}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "x"}}
        }),
        customer_id: String::new(),
        ctx: Value::Null,
        timeout: None,
    }
}

async fn run_job(
    c: &machine::connectors::comfyui::ComfyuiConnector,
    job: &machine::connectors::Job,
) -> (
    Result<machine::connectors::JobOutput, machine::connectors::ConnectorError>,
    Vec<String>,
) {
    use machine::connectors::{Connector, ProgressSink};
    let (sink, mut rx) = ProgressSink::new();
    let seen = tokio::spawn(async move {
        let mut seen = Vec::new();
        while rx.changed().await.is_ok() {
            seen.push(rx.borrow_and_update().1.message.clone());
        }
        seen
    });
    let r = tokio::time::timeout(LIMIT, c.run(job, &sink, &CancellationToken::new()))
        .await
        .expect("the job ends within the limit");
    drop(sink);
    (r, seen.await.unwrap())
}

fn connector(
    fake: &FakeComfyui,
    store: &machine::models::ModelStore,
) -> machine::connectors::comfyui::ComfyuiConnector {
    machine::connectors::comfyui::ComfyuiConnector::new(fake.url().parse().unwrap()).with_models(store.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_lora_is_fetched_once_while_two_gpus_ask_for_it() {
    let mut shelf = Shelf::new();
    let lora = blob(3_000_000, 1);
    shelf.add("detail.safetensors", "loras", lora.clone(), None);
    let store = shelf.store(None, &[]);
    // ComfyUI refuses a workflow naming a LoRA its models folder lacks, as upstream does.
    let (gpu0, gpu1) = (
        FakeComfyui::start_with_models(&shelf.link_dir()),
        FakeComfyui::start_with_models(&shelf.link_dir()),
    );
    let (c0, c1) = (connector(&gpu0, &store), connector(&gpu1, &store));
    let job = lora_job("detail.safetensors", 2);
    let ((r0, p0), (r1, _)) = tokio::join!(run_job(&c0, &job), run_job(&c1, &job));
    r0.expect("GPU 0's job completes");
    r1.expect("GPU 1's job completes");
    assert_eq!(shelf.downloads_of("detail.safetensors"), 1, "{:?}", shelf.server.seen());
    assert_eq!(store.downloads(), 1);
    assert!(
        p0.iter().any(|m| m.starts_with("downloading model detail.safetensors")),
        "{p0:?}"
    );
    assert_eq!(
        std::fs::read(shelf.shared_dir().join("loras/detail.safetensors")).unwrap(),
        lora
    );
    assert!(shelf.link_dir().join("loras/detail.safetensors").is_file());

    // A second job finds it on disk.
    let (r, _) = run_job(&c1, &job).await;
    r.expect("the second job completes");
    assert_eq!(shelf.downloads_of("detail.safetensors"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_unknown_model_fails_the_job_and_leaves_nothing() {
    use machine::connectors::ErrorClass;
    let mut shelf = Shelf::new();
    shelf.add("bad.safetensors", "loras", blob(500_000, 2), Some("0".repeat(64)));
    let store = shelf.store(None, &[]);
    let fake = FakeComfyui::start_with_models(&shelf.link_dir());
    let c = connector(&fake, &store);

    let (r, _) = run_job(&c, &lora_job("bad.safetensors", 1)).await;
    let e = r.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Fatal, "{}", e.chain());
    assert!(
        e.chain().contains("sha256") && e.chain().contains(&shelf.server.url("/m/bad.safetensors")),
        "the reason names the checksum and the source: {}",
        e.chain()
    );
    let loras = shelf.shared_dir().join("loras");
    let left: Vec<_> = std::fs::read_dir(&loras)
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "no partial or wrong file is left: {left:?}");

    let (r, _) = run_job(&c, &lora_job("nowhere.safetensors", 1)).await;
    let e = r.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Fatal, "{}", e.chain());
    assert!(e.chain().contains("`nowhere.safetensors`"), "{}", e.chain());
    assert_eq!(fake.prompts_accepted(), 0);
}

/// A transfer cut short fails the attempt retryably and keeps the partial file; the next attempt
/// asks only for the rest (`Range: bytes=N-`), and the whole file verifies.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_download_resumes_where_it_stopped() {
    let mut shelf = Shelf::new();
    let lora = blob(1_000_000, 30);
    shelf.add("cut.safetensors", "loras", lora.clone(), None);
    shelf.server.cut_first("/m/cut.safetensors", 400_000);
    let store = shelf.store(None, &[]);
    let names = ["cut.safetensors".to_owned()];

    let e = store.ensure(&names, &|_, _, _| {}).await.unwrap_err();
    assert!(e.is_retryable(), "{e}");
    let part = shelf.shared_dir().join("loras/cut.safetensors.part");
    let kept = std::fs::metadata(&part).expect("the partial file is kept").len();
    assert_eq!(
        kept, 400_000,
        "every byte the server sent is on disk once the attempt has failed"
    );
    assert!(!shelf.shared_dir().join("loras/cut.safetensors").exists());

    store.ensure(&names, &|_, _, _| {}).await.unwrap();
    assert_eq!(
        std::fs::read(shelf.link_dir().join("loras/cut.safetensors")).unwrap(),
        lora
    );
    assert!(!part.exists());
    let ranges: Vec<_> = shelf
        .server
        .seen()
        .into_iter()
        .filter(|r| r.path == "/m/cut.safetensors")
        .map(|r| r.range)
        .collect();
    assert_eq!(ranges, [None, Some(format!("bytes={kept}-"))]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_under_a_small_budget_keeps_models_in_use_and_pinned() {
    let mut shelf = Shelf::new();
    for (i, name) in ["a.safetensors", "b.safetensors", "c.safetensors"].iter().enumerate() {
        shelf.add(name, "loras", blob(400_000, i as u8 + 10), None);
    }
    // A pinned model (the manifest's), the least recently used of all.
    let pinned = shelf.shared_dir().join("checkpoints/pinned.safetensors");
    std::fs::create_dir_all(pinned.parent().unwrap()).unwrap();
    std::fs::write(&pinned, blob(100_000, 3)).unwrap();
    let store = shelf.store(Some(1_050_000), &["checkpoints/pinned.safetensors"]);
    let fake_a = FakeComfyui::start_with_models(&shelf.link_dir());
    let fake_b = FakeComfyui::start_with_models(&shelf.link_dir());
    let (ca, cb) = (connector(&fake_a, &store), connector(&fake_b, &store));

    // A runs long on GPU 0 while GPU 1 runs B, then C: C needs room, and only B may go.
    let long = tokio::spawn({
        let ca = ca.clone();
        async move { run_job(&ca, &lora_job("a.safetensors", 150)).await.0 }
    });
    wait_for("job A to run", async || fake_a.busy()).await;
    run_job(&cb, &lora_job("b.safetensors", 1)).await.0.expect("B runs");
    run_job(&cb, &lora_job("c.safetensors", 1)).await.0.expect("C runs");
    let loras = shelf.shared_dir().join("loras");
    assert!(loras.join("a.safetensors").is_file(), "the model in use stays");
    assert!(
        !loras.join("b.safetensors").exists(),
        "the least recently used free model goes"
    );
    assert!(!shelf.link_dir().join("loras/b.safetensors").exists(), "and its link");
    assert!(loras.join("c.safetensors").is_file());
    assert!(pinned.is_file(), "the pinned model stays");
    assert_eq!(store.evictions(), 1);
    long.await.unwrap().expect("A completes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_worker_wins_the_job_and_a_cold_one_takes_it_after_the_wait() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start();
        let url = RedisUrl::parse(&server.url()).unwrap();
        let broker = Broker::connect(&url, BrokerOptions::default()).await.unwrap();
        broker.ensure_functions().await.unwrap();
        let mut warm = machine::broker::Capabilities::new("warm", "m1", &["comfyui"]);
        warm.models
            .insert("comfyui".to_owned(), vec!["detail.safetensors".to_owned()]);
        let mut cold = machine::broker::Capabilities::new("cold", "m2", &["comfyui"]);
        cold.custom.insert("models_on_demand_after_ms".to_owned(), json!(400));
        let plain = machine::broker::Capabilities::new("plain", "m3", &["comfyui"]);
        let needs = || {
            let mut j = NewJob::new("comfyui", json!({}));
            j.requirements = json!({"models": ["detail.safetensors"]}).to_string();
            j
        };

        // Warm machines win: the cold worker passes the fresh job by, the warm one takes it.
        let first = broker.submit(&needs()).await.unwrap();
        assert!(broker.claim(&cold).await.unwrap().is_none());
        assert_eq!(broker.claim(&warm).await.unwrap().unwrap().id, first);

        // A cold fleet still makes progress: after the wait the cold worker takes it; a worker
        // that cannot fetch models never does.
        let second = broker.submit(&needs()).await.unwrap();
        assert!(broker.claim(&cold).await.unwrap().is_none());
        assert!(broker.claim(&plain).await.unwrap().is_none());
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert!(broker.claim(&plain).await.unwrap().is_none());
        assert_eq!(broker.claim(&cold).await.unwrap().unwrap().id, second);
    })
    .await
    .expect("the test finishes within its limit");
}

/// `machine run` over a shelf: the fake ComfyUI as each GPU's service (validating loader inputs
/// against its models folder, as upstream does), a real Redis, the fake NVML with `gpus` GPUs,
/// and the shelf's catalogue (written now). Killed when dropped; [`Machine::stop`] stops it as
/// an orchestrator does and checks the exit.
struct Machine {
    child: crate::support::KillOnDrop,
    port: u16,
    log: std::path::PathBuf,
    url: String,
    conn: redis::aio::MultiplexedConnection,
    _redis: Option<RedisServer>,
}

impl Machine {
    /// Starts the machine `id` and waits until it is ready. `toml` is appended to its
    /// configuration file; `env` is passed on (cloud credentials).
    async fn start(shelf: &Shelf, id: &str, gpus: u32, toml: &str, env: &[(String, String)]) -> Machine {
        Machine::start_in(shelf, id, gpus, toml, env, "ws", None).await
    }

    /// [`Machine::start`] in the workspace `<shelf>/<workspace>`, on `redis` when given (several
    /// machines of one fleet) or on a Redis of its own.
    async fn start_in(
        shelf: &Shelf,
        id: &str,
        gpus: u32,
        toml: &str,
        env: &[(String, String)],
        workspace: &str,
        redis: Option<&str>,
    ) -> Machine {
        let (redis, url) = match redis {
            Some(url) => (None, url.to_owned()),
            None => {
                let r = RedisServer::start();
                let url = r.url();
                (Some(r), url)
            }
        };
        let conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let catalogue = shelf.dir.path().join("catalogue.toml");
        std::fs::write(&catalogue, &shelf.catalogue).unwrap();
        let config = shelf.dir.path().join(format!("{id}.toml"));
        std::fs::write(
            &config,
            format!(
                r#"
[connectors.comfyui]
command = ["{fake}", "--port", "{{port}}", "--models", "{{workspace}}/ComfyUI/models"]
{toml}
"#,
                fake = crate::e2e::fake_comfyui().display()
            ),
        )
        .unwrap();
        let port = testkit::free_port();
        let log = shelf.dir.path().join(format!("{id}.log"));
        let child = crate::support::machine()
            .arg("run")
            .env("MACHINE_CONFIG", &config)
            .env("MACHINE_ID", id)
            .env("MACHINE_WORKSPACE", shelf.dir.path().join(workspace))
            .env("MACHINE_HEALTH_PORT", port.to_string())
            .env("HUB_REDIS_URL", &url)
            .env("WORKER_CONNECTORS", "comfyui")
            .env("COMFYUI_BASE_PORT", crate::e2e::two_free_ports().to_string())
            .env("COMFYUI_MODELS_CATALOGUE", &catalogue)
            .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
            .env("FAKE_NVML_GPUS", gpus.to_string())
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let m = Machine {
            child: child.into(),
            port,
            log,
            url,
            conn,
            _redis: redis,
        };
        let deadline = Instant::now() + LIMIT;
        while crate::e2e::http_get(port, "/ready").await.0 != 200 {
            assert!(Instant::now() < deadline, "never ready: {}", m.log());
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        m
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Submits a ComfyUI job whose workflow loads `lora`, with at most `max_retries` retries.
    fn submit(&self, lora: &str, max_retries: u32) -> String {
        self.submit_with(lora, 3, 5, max_retries, None)
    }

    /// [`Machine::submit`] with a sampler of `steps` steps `step_ms` apart, and `requirements`
    /// (JSON) when given.
    fn submit_with(
        &self,
        lora: &str,
        steps: u64,
        step_ms: u64,
        max_retries: u32,
        requirements: Option<&str>,
    ) -> String {
        let workflow = json!({"workflow": {
            "1": {"class_type": "LoraLoader", "inputs": {"lora_name": lora}},
            "3": {"class_type": "KSampler", "inputs": {"steps": steps, "step_ms": step_ms}},
            "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "md"}}
        }});
        let (workflow, retries) = (workflow.to_string(), max_retries.to_string());
        let mut args = vec![
            "--service",
            "comfyui",
            "--payload",
            &workflow,
            "--max-retries",
            &retries,
        ];
        if let Some(r) = requirements {
            args.extend(["--requirements", r]);
        }
        crate::e2e::submit(&self.url, &args)
    }

    async fn job(&mut self, id: &str) -> BTreeMap<String, String> {
        self.conn.hgetall(format!("job:{id}")).await.unwrap()
    }

    /// Waits until job `id` reaches `status` and returns its hash.
    async fn wait_status(&mut self, id: &str, status: &str) -> BTreeMap<String, String> {
        let deadline = Instant::now() + LIMIT;
        loop {
            let j = self.job(id).await;
            if j.get("status").map(String::as_str) == Some(status) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job {id} never {status}: {j:?}\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn metrics(&self) -> String {
        crate::e2e::http_get(self.port, "/metrics").await.1
    }

    /// SIGTERM, then the exit within 30 s, which must be clean.
    fn stop(mut self) {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let child = &mut self.child;
        let exit = crate::support::wait_until(Duration::from_secs(30), "the machine to exit", || {
            child.try_wait().unwrap()
        });
        assert!(exit.success(), "{exit:?}");
    }
}

/// The whole product: `machine run` with the fake ComfyUI as its service, a real Redis, and a
/// catalogue whose model is served by a local file server. A job naming a LoRA absent from disk
/// gets it downloaded once, completes, and the worker's advertised models gain it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_machine_fetches_a_missing_lora_for_a_job_and_advertises_it() {
    let mut shelf = Shelf::new();
    shelf.add("detail.safetensors", "loras", blob(2_000_000, 7), None);
    let mut m = Machine::start(&shelf, "md", 1, "", &[]).await;
    assert!(
        !advertised(&mut m.conn, "md-gpu0")
            .await
            .contains(&"detail.safetensors".to_owned()),
        "the LoRA is not on disk yet"
    );

    let id = m.submit("detail.safetensors", 3);
    let j = m.wait_status(&id, "completed").await;
    assert_eq!(j["worker_id"], "md-gpu0", "{j:?}");
    assert_eq!(shelf.downloads_of("detail.safetensors"), 1, "downloaded once");
    assert!(
        shelf.link_dir().join("loras/detail.safetensors").is_file(),
        "linked into ComfyUI's models folder"
    );
    wait_for("the worker to advertise the LoRA", async || {
        advertised(&mut m.conn, "md-gpu0")
            .await
            .contains(&"detail.safetensors".to_owned())
    })
    .await;

    // A second job finds it on disk: no second download.
    let id = m.submit("detail.safetensors", 3);
    m.wait_status(&id, "completed").await;
    assert_eq!(shelf.downloads_of("detail.safetensors"), 1, "{}", m.log());
    let metrics = m.metrics().await;
    for line in [
        "machine_model_downloads_total 1",
        "machine_model_download_bytes_total 2000000",
        "machine_model_evictions_total 0",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    m.stop();
}

/// A model source that holds every connection (having read the request) until released, then
/// closes it unanswered: a network failure, after which the fetcher tries the next source.
/// It lets a test keep a download in flight for as long as it needs.
struct Gate {
    port: u16,
    accepted: Arc<AtomicUsize>,
    release: Arc<(Mutex<bool>, Condvar)>,
}

impl Gate {
    fn start() -> Gate {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let release = Arc::new((Mutex::new(false), Condvar::new()));
        let (n, r) = (accepted.clone(), release.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming().flatten() {
                n.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                std::thread::spawn(move || {
                    use std::io::BufRead as _;
                    let mut reader = std::io::BufReader::new(conn);
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                        line.clear();
                    }
                    let (lock, cv) = &*r;
                    let mut open = lock.lock().unwrap();
                    while !*open {
                        open = cv.wait(open).unwrap();
                    }
                });
            }
        });
        Gate {
            port,
            accepted,
            release,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    fn open(&self) {
        *self.release.0.lock().unwrap() = true;
        self.release.1.notify_all();
    }
}

/// Two GPUs of one machine claim two jobs needing the same missing LoRA while its download is
/// held open: the machine fetches it once (one connection to the held source, one request to
/// the file server it falls back to), and both jobs complete, one on each GPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_gpus_needing_one_missing_model_download_it_once() {
    let mut shelf = Shelf::new();
    let gate = Gate::start();
    let lora = blob(3_000_000, 21);
    shelf.add_with_sources(
        "shared.safetensors",
        "loras",
        lora.clone(),
        &[gate.url("/shared.safetensors")],
    );
    let mut m = Machine::start(&shelf, "mg", 2, "", &[]).await;
    let ids = [m.submit("shared.safetensors", 0), m.submit("shared.safetensors", 0)];
    for id in &ids {
        let deadline = Instant::now() + LIMIT;
        while m.job(id).await.get("worker_id").is_none_or(String::is_empty) {
            assert!(Instant::now() < deadline, "job {id} never claimed: {}", m.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Both GPUs have claimed their job and wait for the one download.
    assert_eq!(gate.accepted.load(Ordering::SeqCst), 1, "{}", m.log());
    gate.open();
    let mut workers = BTreeSet::new();
    for id in &ids {
        workers.insert(m.wait_status(id, "completed").await["worker_id"].clone());
    }
    assert_eq!(workers, BTreeSet::from(["mg-gpu0".to_owned(), "mg-gpu1".to_owned()]));
    assert_eq!(gate.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(shelf.downloads_of("shared.safetensors"), 1, "{:?}", shelf.server.seen());
    assert_eq!(
        std::fs::read(shelf.shared_dir().join("loras/shared.safetensors")).unwrap(),
        lora
    );
    assert!(m.metrics().await.contains("machine_model_downloads_total 1"));
    m.stop();
}

/// A download whose bytes do not match the catalogue fails the job (once, without retry: the
/// source serves wrong bytes, another attempt gets the same) with a reason that names the model
/// and the source, and leaves neither the model nor a partial file in the models folder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_download_fails_the_job_naming_the_model_and_leaves_no_file() {
    let mut shelf = Shelf::new();
    shelf.add("bad.safetensors", "loras", blob(700_000, 22), Some("0".repeat(64)));
    let mut m = Machine::start(&shelf, "mc", 1, "", &[]).await;
    let id = m.submit("bad.safetensors", 3);
    let j = m.wait_status(&id, "failed").await;
    let error = &j["error"];
    assert!(
        error.contains("`bad.safetensors`")
            && error.contains("sha256")
            && error.contains(&shelf.server.url("/m/bad.safetensors")),
        "the reason names the model, the checksum and the source: {j:?}"
    );
    // Failed with retries left (3), after one attempt: one download, not retried.
    assert_eq!(shelf.downloads_of("bad.safetensors"), 1, "not retried: {j:?}");
    for dir in [shelf.shared_dir().join("loras"), shelf.link_dir().join("loras")] {
        let left: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(left.is_empty(), "nothing is left in {}: {left:?}", dir.display());
    }
    m.stop();
}

/// With `models.cache_max_gb` room for one model, fetching a second evicts the least recently
/// used one (its file and its link go, the worker stops advertising it) and `/metrics` counts
/// the eviction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_model_evicts_the_least_recently_used_one_and_metrics_count_it() {
    let mut shelf = Shelf::new();
    shelf.add("first.safetensors", "loras", blob(600_000, 23), None);
    shelf.add("second.safetensors", "loras", blob(600_000, 24), None);
    // 1 MB: room for one of the two.
    let mut m = Machine::start(&shelf, "me", 1, "[models]\ncache_max_gb = 0.001\n", &[]).await;
    let id = m.submit("first.safetensors", 0);
    m.wait_status(&id, "completed").await;
    wait_for("the first model to be advertised", async || {
        advertised(&mut m.conn, "me-gpu0")
            .await
            .contains(&"first.safetensors".to_owned())
    })
    .await;
    assert!(m.metrics().await.contains("machine_model_evictions_total 0"));

    let id = m.submit("second.safetensors", 0);
    m.wait_status(&id, "completed").await;
    let loras = shelf.shared_dir().join("loras");
    assert!(!loras.join("first.safetensors").exists(), "the LRU model is evicted");
    assert!(
        !shelf.link_dir().join("loras/first.safetensors").exists(),
        "with its link"
    );
    assert!(loras.join("second.safetensors").is_file());
    let metrics = m.metrics().await;
    for line in ["machine_model_evictions_total 1", "machine_model_downloads_total 2"] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }
    wait_for("the evicted model to be withdrawn", async || {
        !advertised(&mut m.conn, "me-gpu0")
            .await
            .contains(&"first.safetensors".to_owned())
    })
    .await;
    assert!(m.log().contains("evicted a model to make room"), "{}", m.log());
    m.stop();
}

/// A model whose source is an object in a bucket (`s3://` on moto, `az://` on Azurite), put
/// there by the provider's own SDK, is fetched by the machine itself with the standard
/// credential variables it was started with (the same builder as the outputs) and the job
/// completes.
async fn a_model_is_fetched_from_a_bucket(kind: StoreKind) {
    let server = ObjectServer::start(kind);
    server.create_bucket("models");
    let mut shelf = Shelf::new();
    let lora = blob(1_500_000, 25);
    let file = shelf.dir.path().join("upload.bin");
    std::fs::write(&file, &lora).unwrap();
    match kind {
        StoreKind::S3 | StoreKind::Azure => {
            server.sdk_put_many("models", "loras", &file, 1, 1, 1);
        }
        // The script's SDK upload knows no GCS; the emulator's JSON API is as independent.
        StoreKind::Gcs => {
            reqwest::Client::new()
                .post(format!(
                    "{}/upload/storage/v1/b/models/o?uploadType=media&name=loras/0/0.png",
                    server.endpoint()
                ))
                .body(lora.clone())
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap();
        }
    }
    let scheme = match kind {
        StoreKind::S3 => "s3",
        StoreKind::Azure => "az",
        StoreKind::Gcs => "gs",
    };
    // The SDK's key for one upload of one round.
    shelf.add_with_sources(
        "bucket.safetensors",
        "loras",
        lora.clone(),
        &[format!("{scheme}://models/loras/0/0.png")],
    );
    let mut m = Machine::start(&shelf, "mb", 1, "", &server.env()).await;
    let id = m.submit("bucket.safetensors", 0);
    m.wait_status(&id, "completed").await;
    assert_eq!(
        std::fs::read(shelf.shared_dir().join("loras/bucket.safetensors")).unwrap(),
        lora
    );
    assert_eq!(
        shelf.downloads_of("bucket.safetensors"),
        0,
        "the bucket served it, not the fallback source: {}",
        m.log()
    );
    assert!(m.metrics().await.contains("machine_model_download_bytes_total 1500000"));
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_is_fetched_from_s3() {
    a_model_is_fetched_from_a_bucket(StoreKind::S3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_is_fetched_from_azure() {
    a_model_is_fetched_from_a_bucket(StoreKind::Azure).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "gcp-storage-emulator answers GETs without the Last-Modified and ETag headers object_store's GCS client requires (see docs/models.md)"]
async fn a_model_is_fetched_from_gcs() {
    a_model_is_fetched_from_a_bucket(StoreKind::Gcs).await;
}

/// The example binary the machine runs as ComfyUI refuses, as upstream does, a workflow whose
/// loader names a file absent from its models folder, and accepts it once the file is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fake_comfyui_example_refuses_a_loader_naming_an_absent_file() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(models.join("loras")).unwrap();
    let port = testkit::free_port();
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _child = Killed(
        std::process::Command::new(crate::e2e::fake_comfyui())
            .args(["--port", &port.to_string(), "--models"])
            .arg(&models)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let prompt = json!({"prompt": {
        "1": {"class_type": "LoraLoader", "inputs": {"lora_name": "absent.safetensors"}},
        "9": {"class_type": "SaveImage", "inputs": {}}
    }});
    let post = || async {
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{port}/prompt"))
            .json(&prompt)
            .send()
            .await;
        match r {
            Ok(r) => Some((r.status().as_u16(), r.text().await.unwrap())),
            Err(_) => None,
        }
    };
    let deadline = Instant::now() + Duration::from_secs(15);
    let (code, body) = loop {
        if let Some(r) = post().await {
            break r;
        }
        assert!(Instant::now() < deadline, "the fake never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(code, 400, "{body}");
    assert!(
        body.contains("value_not_in_list") && body.contains("absent.safetensors"),
        "{body}"
    );
    std::fs::write(models.join("loras/absent.safetensors"), b"x").unwrap();
    let (code, body) = post().await.unwrap();
    assert_eq!(code, 200, "{body}");
}

/// The catalogue may be a URL: fetched when the store is built, with the bearer token of
/// `COMFYUI_MODELS_CATALOGUE_TOKEN`; one that cannot be fetched fails the start naming it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catalogue_url_is_fetched_with_its_token_and_a_bad_one_is_named() {
    let mut shelf = Shelf::new();
    let lora = blob(100_000, 5);
    shelf.add("remote.safetensors", "loras", lora.clone(), None);
    shelf.server.add(
        "/catalogue.toml",
        shelf.catalogue.clone().into_bytes(),
        "application/toml",
    );
    std::fs::create_dir_all(shelf.link_dir()).unwrap();
    let settings = |catalogue: String| machine::models::StoreSettings {
        catalogue: Some(catalogue.into()),
        shared_dir: shelf.shared_dir(),
        link_dir: shelf.link_dir(),
        budget: None,
        pinned: Default::default(),
        loader_inputs: vec!["lora_name".to_owned()],
    };
    let env = Credentials::from_parts(
        [],
        [("COMFYUI_MODELS_CATALOGUE_TOKEN".to_owned(), "cat-t0ken".to_owned())],
    );
    let store =
        machine::models::ModelStore::new(settings(shelf.server.url("/catalogue.toml")), no_cloud(), &env).unwrap();
    let fetched: Vec<_> = shelf
        .server
        .seen()
        .into_iter()
        .filter(|r| r.path == "/catalogue.toml")
        .collect();
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].authorization.as_deref(), Some("Bearer cat-t0ken"));
    // The catalogue's model is fetched on demand.
    store
        .ensure(&["remote.safetensors".to_owned()], &|_, _, _| {})
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(shelf.link_dir().join("loras/remote.safetensors")).unwrap(),
        lora
    );

    let missing = shelf.server.url("/nope.toml");
    let e = machine::models::ModelStore::new(settings(missing.clone()), no_cloud(), &env)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&missing) && e.contains("404"), "{e}");
    let closed = format!("http://127.0.0.1:{}/catalogue.toml", testkit::free_port());
    let e = machine::models::ModelStore::new(settings(closed.clone()), no_cloud(), &env)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&closed) && e.contains("cannot be fetched"), "{e}");
}

/// A model the installers download on this boot is in the capabilities the worker registers
/// with: the real binary installs ComfyUI (a local git repository whose `main.py` starts the
/// fake ComfyUI, in a real venv) and the manifest's model from a local file server, then
/// starts its service and worker. The first capabilities Redis sees already name the model;
/// capabilities scanned before the installers ran would name none until a later rescan.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn models_installed_on_this_boot_are_advertised_when_the_worker_registers() {
    use crate::e2e::{http_get, two_free_ports};

    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    let (src, commit) = crate::e2e::comfyui_repository(root);

    let files = testkit::FileServer::start();
    let weights = blob(300_000, 3);
    files.add("/m/boot.safetensors", weights.clone(), "application/octet-stream");
    let manifest = root.join("models.toml");
    std::fs::write(
        &manifest,
        format!(
            "[[model]]\nurl = \"{}\"\nsha256 = \"{}\"\nsize = {}\ndest = \"checkpoints\"\n",
            files.url("/m/boot.safetensors"),
            sha256(&weights),
            weights.len()
        ),
    )
    .unwrap();
    let nodes = root.join("nodes.toml");
    std::fs::write(&nodes, "").unwrap();

    let port = testkit::free_port();
    let log = root.join("machine.log");
    let mut child = crate::support::machine()
        .arg("run")
        .env("MACHINE_ID", "mb")
        .env("MACHINE_WORKSPACE", root.join("ws"))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("MACHINE_GPU_COUNT", "0")
        .env("HUB_REDIS_URL", redis.url())
        .env("WORKER_CONNECTORS", "comfyui")
        .env("COMFYUI_BASE_PORT", two_free_ports().to_string())
        .env("COMFYUI_REPO_URL", &src)
        .env("COMFYUI_REF", &commit)
        .env("COMFYUI_NODES_FILE", &nodes)
        .env("COMFYUI_MODELS_MANIFEST", &manifest)
        .env("COMFYUI_EXTRA_PACKAGES", "none")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    // Polled often, so the capabilities read are the ones the worker registered with (an idle
    // worker rescans its models every few seconds).
    let deadline = Instant::now() + Duration::from_secs(180);
    let first: Option<String> = loop {
        let caps: Option<String> = conn.hget("worker:mb-cpu0", "capabilities").await.unwrap();
        if caps.is_some() {
            break caps;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the machine exited: {}",
            log_text()
        );
        assert!(Instant::now() < deadline, "the worker never registered: {}", log_text());
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let first: Value = serde_json::from_str(&first.unwrap()).unwrap();
    let models: Vec<&str> = first
        .pointer("/models/comfyui")
        .and_then(Value::as_array)
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    assert!(
        models.contains(&"boot.safetensors") && models.contains(&"boot"),
        "registered with models {models:?}, not the one installed on this boot: {first}"
    );
    assert_eq!(first["services"], json!(["comfyui"]), "the wire names stay: {first}");
    let (_, status) = http_get(port, "/status").await;
    assert!(status.contains("comfyui-models"), "{status}");

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = crate::support::wait_until(Duration::from_secs(30), "the machine to exit", || {
        child.try_wait().unwrap()
    });
    assert!(exit.success(), "{exit:?}: {}", log_text());
}

/// Waits up to [`LIMIT`] until `check` holds, naming `what` and showing the machine's `log`
/// otherwise.
async fn wait_on(log: &std::path::Path, what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + LIMIT;
    while !check().await {
        let log = std::fs::read_to_string(log).unwrap_or_default();
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {log}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// The real binary with two GPUs and room for one model (`models.cache_max_gb`): while GPU 0's
/// job uses model A, GPU 1's job needs model B, which would need A's space. A is not evicted:
/// B's job fails retryably with the reason that the models in use fill the budget (the design,
/// docs/models.md), nothing of B is fetched, and A's job goes on. Once A's job has ended, the
/// retry evicts A and runs B.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_model_in_use_is_not_evicted_and_the_job_needing_its_room_is_retried() {
    let mut shelf = Shelf::new();
    shelf.add("inuse.safetensors", "loras", blob(600_000, 40), None);
    shelf.add("later.safetensors", "loras", blob(600_000, 41), None);
    let toml = "[models]\ncache_max_gb = 0.001\n\n[worker.retry_delay]\ninitial = \"1s\"\nfactor = 1.0\nmax = \"1s\"\njitter = 0.0\n";
    let mut m = Machine::start(&shelf, "mu", 2, toml, &[]).await;
    let loras = shelf.shared_dir().join("loras");

    // A: 80 steps 100 ms apart, about 8 s with its model held in use.
    let a = m.submit_with("inuse.safetensors", 80, 100, 0, None);
    wait_on(&m.log.clone(), "job A to run with its model", async || {
        loras.join("inuse.safetensors").is_file()
    })
    .await;
    let b = m.submit("later.safetensors", 3);
    let failed = {
        let deadline = Instant::now() + LIMIT;
        loop {
            let j = m.job(&b).await;
            let ended = matches!(j.get("status").map(String::as_str), Some("completed" | "failed"));
            if j.get("retry_count").map(String::as_str) == Some("1") || ended {
                break j;
            }
            assert!(Instant::now() < deadline, "job B never failed once: {j:?}\n{}", m.log());
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    assert_eq!(
        m.job(&a).await["status"],
        "in_progress",
        "A still runs when B fails: {}",
        m.log()
    );
    assert_eq!(
        failed["status"], "pending",
        "B neither ran (evicting the model in use) nor failed for good: {failed:?}"
    );
    let error = &failed["error"];
    assert!(
        error.contains("`later.safetensors`") && error.contains("models.cache_max_gb"),
        "the reason names the model and the budget: {failed:?}"
    );
    assert!(loras.join("inuse.safetensors").is_file(), "the model in use stays");
    assert!(
        shelf.link_dir().join("loras/inuse.safetensors").is_file(),
        "with its link"
    );
    assert!(!loras.join("later.safetensors").exists());
    assert_eq!(
        shelf.downloads_of("later.safetensors"),
        0,
        "B is not fetched without room"
    );
    assert!(m.metrics().await.contains("machine_model_evictions_total 0"));

    // A ends; its model may go now, and B's retry takes its room.
    m.wait_status(&a, "completed").await;
    m.wait_status(&b, "completed").await;
    assert!(
        !loras.join("inuse.safetensors").exists(),
        "A's model is evicted once free"
    );
    assert!(loras.join("later.safetensors").is_file());
    assert_eq!(shelf.downloads_of("later.safetensors"), 1);
    let metrics = m.metrics().await;
    assert!(metrics.contains("machine_model_evictions_total 1"), "{metrics}");
    m.stop();
}

/// Two real machines on one Redis, both fetching models on demand with a 2 s
/// `models.affinity_wait`: "warm" has the LoRA on disk, "cold" must download it. With both idle,
/// every job requiring the LoRA goes to the warm machine. While the warm machine is busy, the
/// cold one takes the next such job, but only after the wait, and downloads the LoRA for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_machine_wins_the_job_and_a_cold_one_takes_it_after_the_wait() {
    let mut shelf = Shelf::new();
    let lora = blob(500_000, 42);
    shelf.add("affine.safetensors", "loras", lora.clone(), None);
    let warm_loras = shelf.dir.path().join("ws-warm/ComfyUI/models/loras");
    std::fs::create_dir_all(&warm_loras).unwrap();
    std::fs::write(warm_loras.join("affine.safetensors"), &lora).unwrap();
    let toml = "[models]\naffinity_wait = \"2s\"\n";
    let redis = RedisServer::start();
    let mut cold = Machine::start_in(&shelf, "cold", 1, toml, &[], "ws-cold", Some(&redis.url())).await;
    let mut warm = Machine::start_in(&shelf, "warm", 1, toml, &[], "ws-warm", Some(&redis.url())).await;
    wait_on(
        &warm.log.clone(),
        "the warm machine to advertise the LoRA",
        async || {
            advertised(&mut warm.conn, "warm-gpu0")
                .await
                .contains(&"affine.safetensors".to_owned())
        },
    )
    .await;
    wait_on(&cold.log.clone(), "the cold machine to register", async || {
        let caps: Option<String> = cold.conn.hget("worker:cold-gpu0", "capabilities").await.unwrap();
        caps.is_some()
    })
    .await;
    let needs = r#"{"models": ["affine.safetensors"]}"#;

    // Both idle: the warm machine wins every time, though the cold one could take the job.
    for _ in 0..3 {
        let id = warm.submit_with("affine.safetensors", 1, 1, 0, Some(needs));
        let j = warm.wait_status(&id, "completed").await;
        assert_eq!(j["worker_id"], "warm-gpu0", "{j:?}\n{}", cold.log());
    }
    assert_eq!(shelf.downloads_of("affine.safetensors"), 0);

    // The warm machine busy for about 10 s: the cold one takes the next job after the wait.
    let long = warm.submit_with("affine.safetensors", 100, 100, 0, Some(needs));
    wait_on(&warm.log.clone(), "the warm machine to take the long job", async || {
        warm.job(&long).await.get("worker_id").is_some_and(|w| !w.is_empty())
    })
    .await;
    assert_eq!(warm.job(&long).await["worker_id"], "warm-gpu0");
    let submitted = Instant::now();
    let next = warm.submit_with("affine.safetensors", 1, 1, 0, Some(needs));
    let mut claimed_after = None;
    wait_on(&cold.log.clone(), "the cold machine to take the job", async || {
        let w = cold.job(&next).await.get("worker_id").cloned().unwrap_or_default();
        if !w.is_empty() {
            claimed_after = Some(submitted.elapsed());
        }
        !w.is_empty()
    })
    .await;
    let claimed_after = claimed_after.unwrap();
    let j = cold.wait_status(&next, "completed").await;
    assert_eq!(j["worker_id"], "cold-gpu0", "{j:?}");
    assert!(
        claimed_after >= Duration::from_secs(2),
        "the cold machine waited models.affinity_wait: claimed after {claimed_after:?}"
    );
    assert_eq!(
        warm.job(&long).await["status"],
        "in_progress",
        "taken while the warm machine was still busy"
    );
    assert_eq!(
        shelf.downloads_of("affine.safetensors"),
        1,
        "the cold machine fetched it"
    );
    assert_eq!(
        std::fs::read(shelf.dir.path().join("ws-cold/ComfyUI/models/loras/affine.safetensors")).unwrap(),
        lora
    );
    cold.stop();
    warm.stop();
}

/// While a job's model downloads (throttled to about 1 MB/s), the job's progress in Redis
/// (`job:<id>:progress`) is the download: a message naming the model and its size, and a
/// percentage that rises.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_download_is_the_jobs_progress_in_redis() {
    let mut shelf = Shelf::new();
    shelf.add("slow.safetensors", "loras", blob(4_000_000, 43), None);
    shelf.server.throttle("/m/slow.safetensors", 1_000_000);
    let mut m = Machine::start(&shelf, "mp", 1, "", &[]).await;
    let id = m.submit("slow.safetensors", 0);
    let mut seen: Vec<(f64, String)> = Vec::new();
    let deadline = Instant::now() + LIMIT;
    loop {
        let p: BTreeMap<String, String> = m.conn.hgetall(format!("job:{id}:progress")).await.unwrap();
        if let (Some(percent), Some(message)) = (p.get("progress"), p.get("message"))
            && message.starts_with("downloading model")
        {
            let sample = (percent.parse::<f64>().unwrap(), message.clone());
            if seen.last() != Some(&sample) {
                seen.push(sample);
            }
        }
        if m.job(&id).await.get("status").map(String::as_str) == Some("completed") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the job never completed: {seen:?}\n{}",
            m.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Throttled, the 4 MB take about 4 s: reported as they arrive, not only at the end (one
    // write a second at most, worker.progress_every).
    assert!(
        seen.len() >= 3,
        "the download's progress was reported as it went: {seen:?}"
    );
    for (percent, message) in &seen {
        assert!(
            message.starts_with("downloading model slow.safetensors: ") && message.ends_with(" of 4 MB"),
            "{message}"
        );
        assert!((0.0..100.0).contains(percent), "{seen:?}");
    }
    assert!(
        seen.windows(2).all(|w| w[0].0 <= w[1].0),
        "the percentage never goes back: {seen:?}"
    );
    let (first, last) = (seen[0].0, seen[seen.len() - 1].0);
    assert!(last >= first + 50.0, "the percentage rises with the download: {seen:?}");
    m.stop();
}

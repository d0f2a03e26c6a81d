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

fn sha256(b: &[u8]) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(b))
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
        let path = format!("/m/{name}");
        self.catalogue.push_str(&format!(
            "[[model]]\nname = \"{name}\"\nkind = \"{kind}\"\nsha256 = \"{}\"\nsize = {}\nsources = [\"{}\"]\n\n",
            sha.unwrap_or_else(|| sha256(&bytes)),
            bytes.len(),
            self.server.url(&path)
        ));
        self.server.add(&path, bytes, "application/octet-stream");
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
        machine::models::ModelStore::new(settings, &BTreeMap::<&str, &str>::new()).unwrap()
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
        let mut warm = machine::matcher::Capabilities::new("warm", "m1", &["comfyui"]);
        warm.models
            .insert("comfyui".to_owned(), vec!["detail.safetensors".to_owned()]);
        let mut cold = machine::matcher::Capabilities::new("cold", "m2", &["comfyui"]);
        cold.custom.insert("models_on_demand_after_ms".to_owned(), json!(400));
        let plain = machine::matcher::Capabilities::new("plain", "m3", &["comfyui"]);
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

/// The whole product: `machine run` with the fake ComfyUI (validating loader inputs against its
/// models folder, as upstream does) as its service, a real Redis, and a catalogue whose model is
/// served by a local file server. A job naming a LoRA absent from disk gets it downloaded once,
/// completes, and the worker's advertised models gain it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_machine_fetches_a_missing_lora_for_a_job_and_advertises_it() {
    use crate::e2e::{completed, fake_comfyui, http_get, submit, two_free_ports};

    let redis = RedisServer::start();
    let url = redis.url();
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();

    let mut shelf = Shelf::new();
    shelf.add("detail.safetensors", "loras", blob(2_000_000, 7), None);
    let catalogue = shelf.dir.path().join("catalogue.toml");
    std::fs::write(&catalogue, &shelf.catalogue).unwrap();
    let config = shelf.dir.path().join("machine.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[connectors.comfyui]
command = ["{fake}", "--port", "{{port}}", "--models", "{{workspace}}/ComfyUI/models"]
"#,
            fake = fake_comfyui().display()
        ),
    )
    .unwrap();
    let port = testkit::free_port();
    let log = shelf.dir.path().join("machine.log");
    let mut child = crate::support::machine()
        .arg("run")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", "md")
        .env("MACHINE_WORKSPACE", shelf.dir.path().join("ws"))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("HUB_REDIS_URL", &url)
        .env("WORKER_CONNECTORS", "comfyui")
        .env("COMFYUI_BASE_PORT", two_free_ports().to_string())
        .env("COMFYUI_MODELS_CATALOGUE", &catalogue)
        .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
        .env("FAKE_NVML_GPUS", "1")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let log_text = || std::fs::read_to_string(&log).unwrap_or_default();

    let deadline = Instant::now() + LIMIT;
    while http_get(port, "/ready").await.0 != 200 {
        assert!(Instant::now() < deadline, "never ready: {}", log_text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !advertised(&mut conn, "md-gpu0")
            .await
            .contains(&"detail.safetensors".to_owned()),
        "the LoRA is not on disk yet"
    );

    let workflow = json!({"workflow": {
        "1": {"class_type": "LoraLoader", "inputs": {"lora_name": "detail.safetensors"}},
        "3": {"class_type": "KSampler", "inputs": {"steps": 3, "step_ms": 5}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "md"}}
    }});
    let id = submit(&url, &["--service", "comfyui", "--payload", &workflow.to_string()]);
    let j = completed(&mut conn, &id, Instant::now() + LIMIT).await;
    assert_eq!(j["worker_id"], "md-gpu0", "{j:?}");
    assert_eq!(shelf.downloads_of("detail.safetensors"), 1, "downloaded once");
    assert!(
        shelf.link_dir().join("loras/detail.safetensors").is_file(),
        "linked into ComfyUI's models folder"
    );
    wait_for("the worker to advertise the LoRA", async || {
        advertised(&mut conn, "md-gpu0")
            .await
            .contains(&"detail.safetensors".to_owned())
    })
    .await;

    // A second job finds it on disk: no second download.
    let id = submit(&url, &["--service", "comfyui", "--payload", &workflow.to_string()]);
    completed(&mut conn, &id, Instant::now() + LIMIT).await;
    assert_eq!(shelf.downloads_of("detail.safetensors"), 1, "{}", log_text());
    let (_, metrics) = http_get(port, "/metrics").await;
    for line in [
        "machine_model_downloads_total 1",
        "machine_model_download_bytes_total 2000000",
        "machine_model_evictions_total 0",
    ] {
        assert!(metrics.contains(line), "{line} missing from\n{metrics}");
    }

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let exit = crate::support::wait_until(Duration::from_secs(30), "the machine to exit", || {
        child.try_wait().unwrap()
    });
    assert!(exit.success(), "{exit:?}");
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
    let env = BTreeMap::from([("COMFYUI_MODELS_CATALOGUE_TOKEN", "cat-t0ken")]);
    let store = machine::models::ModelStore::new(settings(shelf.server.url("/catalogue.toml")), &env).unwrap();
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
    let e = machine::models::ModelStore::new(settings(missing.clone()), &env)
        .unwrap_err()
        .to_string();
    assert!(e.contains(&missing) && e.contains("404"), "{e}");
    let closed = format!("http://127.0.0.1:{}/catalogue.toml", testkit::free_port());
    let e = machine::models::ModelStore::new(settings(closed.clone()), &env)
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
    use crate::e2e::{fake_comfyui, http_get, two_free_ports};

    let redis = RedisServer::start();
    let client = redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();

    let src = root.join("comfy-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(
        src.join("main.py"),
        format!(
            r#"import os, sys
if "--quick-test-for-ci" in sys.argv:
    sys.exit(0)
port = sys.argv[sys.argv.index("--port") + 1]
models = os.path.join(os.path.dirname(os.path.abspath(__file__)), "models")
os.execv({fake:?}, [{fake:?}, "--port", port, "--models", models])
"#,
            fake = fake_comfyui().display().to_string()
        ),
    )
    .unwrap();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(args)
            .current_dir(&src)
            .output()
            .unwrap();
        assert!(out.status.success(), "git {args:?}: {out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["init", "--quiet", "--initial-branch=main"]);
    git(&["add", "-A"]);
    git(&[
        "-c",
        "user.name=t",
        "-c",
        "user.email=t@t",
        "commit",
        "--quiet",
        "-m",
        "init",
    ]);
    let commit = git(&["rev-parse", "HEAD"]);

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

//! Each connector against its protocol fake: a job end to end, progress in order, every failure
//! class, and cancellation reaching the service.

use std::time::Duration;

use crate::support::job;
use machine::config::{OpenaiConfig, SimulationConfig};
use machine::connectors::a1111::A1111Connector;
use machine::connectors::comfyui::ComfyuiConnector;
use machine::connectors::openai::OpenaiConnector;
use machine::connectors::simulation::SimulationConnector;
use machine::connectors::{
    ArtifactBody, Connector, ConnectorError, ErrorClass, Job, JobOutput, Progress, ProgressSink,
};
use serde_json::{Value, json};
use testkit::{ComfyuiSeen, FakeA1111, FakeComfyui, FakeOpenai, TINY_PNG};
use tokio_util::sync::CancellationToken;

const LIMIT: Duration = Duration::from_secs(30);

/// Runs a job, collecting every progress report the sink forwarded, in order.
async fn run(
    c: &dyn Connector,
    job: &Job,
    cancel: &CancellationToken,
) -> (Result<JobOutput, ConnectorError>, Vec<Progress>) {
    let (sink, mut rx) = ProgressSink::new();
    let collector = tokio::spawn(async move {
        let mut seen = Vec::new();
        while rx.changed().await.is_ok() {
            seen.push(rx.borrow_and_update().1.clone());
        }
        seen
    });
    let result = tokio::time::timeout(LIMIT, c.run(job, &sink, cancel))
        .await
        .expect("the connector finishes within the test's limit");
    drop(sink);
    (result, collector.await.expect("the collector does not panic"))
}

fn comfy(url: &str) -> ComfyuiConnector {
    ComfyuiConnector::new(url.parse().expect("a fake's URL parses"))
}

fn workflow(extra: Value) -> Value {
    let mut w = json!({
        "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd15.safetensors", "cached": true}},
        "3": {"class_type": "KSampler", "inputs": {"steps": 5, "step_ms": 2}},
        "9": {"class_type": "SaveImage", "inputs": {"filename_prefix": "ComfyUI"}}
    });
    if let (Some(w), Value::Object(extra)) = (w.as_object_mut(), extra) {
        w.extend(extra);
    }
    w
}

fn assert_in_order(progress: &[Progress]) {
    assert!(!progress.is_empty());
    for pair in progress.windows(2) {
        assert!(
            pair[1].percent >= pair[0].percent,
            "progress went backwards: {:?} then {:?}",
            pair[0],
            pair[1]
        );
    }
}

#[tokio::test]
async fn comfyui_runs_a_workflow_end_to_end() {
    let fake = FakeComfyui::start();
    let c = comfy(&fake.url());
    let (r, progress) = run(
        &c,
        &job("comfyui", json!({"workflow": workflow(json!({}))})),
        &CancellationToken::new(),
    )
    .await;
    let out = r.expect("the workflow succeeds");
    assert_eq!(out.artifacts.len(), 1, "{out:?}");
    assert_eq!(out.artifacts[0].content_type, "image/png");
    assert!(out.artifacts[0].name.starts_with("ComfyUI_"));
    // The output is left at ComfyUI, for the worker's upload stage to fetch from `/view`.
    let ArtifactBody::Fetch(fetch) = &out.artifacts[0].body else {
        panic!("an output to fetch: {out:?}");
    };
    assert!(
        fake.seen().iter().all(|s| matches!(s, ComfyuiSeen::Prompt(_))),
        "{:?}",
        fake.seen()
    );
    assert!(fetch.url().contains("/view?filename=ComfyUI_"), "{fetch:?}");
    let mut told = None;
    let got = fetch.get(|n| told = Some(n)).await.expect("/view serves the output");
    assert_eq!(got.bytes, TINY_PNG);
    assert_eq!(got.content_type.as_deref(), Some("image/png"));
    assert_eq!(told, Some(u64::try_from(TINY_PNG.len()).unwrap()), "its size is told");
    assert!(out.data["prompt_id"].is_string());
    assert!(out.data["outputs"]["9"]["images"].is_array());
    assert_in_order(&progress);
    assert!(
        progress.iter().any(|p| p.message.contains("of 5")),
        "per-node progress is forwarded: {progress:?}"
    );
    assert_eq!(progress.last().unwrap().total_steps, Some(3));
}

#[tokio::test]
async fn comfyui_node_errors_fail_without_retry() {
    let fake = FakeComfyui::start();
    let c = comfy(&fake.url());
    let w = workflow(json!({"5": {"class_type": "FakeInvalid", "inputs": {}}}));
    let (r, _) = run(&c, &job("comfyui", w), &CancellationToken::new()).await;
    let e = r.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Fatal);
    assert!(
        e.to_string()
            .contains("node 5 (FakeInvalid): Required input is missing: model"),
        "{e}"
    );
    assert_eq!(fake.prompts_accepted(), 0);
}

#[tokio::test]
async fn comfyui_execution_errors_are_classified() {
    let fake = FakeComfyui::start();
    let c = comfy(&fake.url());
    let w = workflow(
        json!({"5": {"class_type": "FakeError", "inputs": {"exception_type": "ValueError", "message": "bad latent"}}}),
    );
    let (r, _) = run(&c, &job("comfyui", w), &CancellationToken::new()).await;
    let e = r.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Fatal);
    assert!(
        e.to_string()
            .contains("node 5 (FakeError) raised ValueError: bad latent"),
        "{e}"
    );
    let w = workflow(
        json!({"5": {"class_type": "FakeError", "inputs": {"exception_type": "torch.OutOfMemoryError", "message": "CUDA out of memory"}}}),
    );
    let (r, _) = run(&c, &job("comfyui", w), &CancellationToken::new()).await;
    assert_eq!(r.unwrap_err().class(), ErrorClass::Retryable);
    let (r, _) = run(&c, &job("comfyui", json!([1, 2])), &CancellationToken::new()).await;
    assert!(matches!(r, Err(ConnectorError::BadPayload(_))));
}

#[tokio::test]
async fn comfyui_recovers_from_a_dropped_websocket() {
    let fake = FakeComfyui::start();
    let c = comfy(&fake.url());
    let w = workflow(json!({
        "5": {"class_type": "FakeDropSocket", "inputs": {}},
        "6": {"class_type": "KSampler", "inputs": {"steps": 3, "step_ms": 100}}
    }));
    let (r, _) = run(&c, &job("comfyui", w), &CancellationToken::new()).await;
    let out = r.expect("the outcome is recovered after the socket drops");
    assert_eq!(out.artifacts.len(), 1);
    assert!(fake.ws_connections() >= 2, "the connector reconnected");
}

#[tokio::test]
async fn comfyui_cancellation_interrupts_the_prompt() {
    let fake = FakeComfyui::start();
    let c = comfy(&fake.url());
    let w = workflow(json!({"3": {"class_type": "KSampler", "inputs": {"steps": 500, "step_ms": 10}}}));
    let cancel = CancellationToken::new();
    let canceller = {
        let cancel = cancel.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            cancel.cancel();
        })
    };
    let started = std::time::Instant::now();
    let (r, progress) = run(&c, &job("comfyui", w), &cancel).await;
    canceller.await.unwrap();
    assert!(matches!(r, Err(ConnectorError::Cancelled)), "{r:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        progress.iter().any(|p| p.message.contains("step")),
        "it was running: {progress:?}"
    );
    assert_eq!(fake.interrupts(), 1);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fake.busy() {
        assert!(std::time::Instant::now() < deadline, "ComfyUI stopped the prompt");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls `busy` until it says a job runs on the fake.
async fn until_busy(busy: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !busy() {
        assert!(std::time::Instant::now() < deadline, "the job never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn comfyui_restarted_mid_job_fails_the_job_retryably_at_once() {
    let port = testkit::free_port();
    let fake = FakeComfyui::start_on(port);
    let c = comfy(&fake.url());
    let w = workflow(json!({"3": {"class_type": "KSampler", "inputs": {"steps": 400, "step_ms": 50}}}));
    let running = tokio::spawn(async move {
        let (r, _) = run(&c, &job("comfyui", w), &CancellationToken::new()).await;
        r
    });
    until_busy(|| fake.busy()).await;
    // The supervisor restarts a killed ComfyUI on the same port; the new one knows no prompt.
    drop(fake);
    let restarted_at = std::time::Instant::now();
    let _fresh = FakeComfyui::start_on(port);
    let e = running.await.unwrap().unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{}", e.chain());
    assert!(e.to_string().contains("no longer knows prompt"), "{}", e.chain());
    assert!(
        restarted_at.elapsed() < Duration::from_secs(5),
        "failed {:?} after the restart",
        restarted_at.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a1111_restarted_mid_job_fails_the_job_retryably_at_once() {
    let port = testkit::free_port();
    let fake = FakeA1111::start_on(port);
    let c = a1111(&fake);
    let running = tokio::spawn(async move {
        let payload = json!({"prompt": "cat", "steps": 400, "step_ms": 50});
        let (r, _) = run(&c, &job("a1111", payload), &CancellationToken::new()).await;
        r
    });
    until_busy(|| fake.busy()).await;
    drop(fake);
    let restarted_at = std::time::Instant::now();
    let _fresh = FakeA1111::start_on(port);
    let e = running.await.unwrap().unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{}", e.chain());
    assert!(
        restarted_at.elapsed() < Duration::from_secs(5),
        "failed {:?} after the restart",
        restarted_at.elapsed()
    );
}

#[tokio::test]
async fn comfyui_unreachable_is_retryable() {
    let c = comfy(&format!("http://127.0.0.1:{}", testkit::free_port()));
    let (r, _) = run(&c, &job("comfyui", workflow(json!({}))), &CancellationToken::new()).await;
    let e = r.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Retryable, "{}", e.chain());
}

fn a1111(fake: &FakeA1111) -> A1111Connector {
    A1111Connector::new(fake.url().parse().unwrap()).with_poll_period(Duration::from_millis(10))
}

#[tokio::test]
async fn a1111_txt2img_end_to_end_with_progress() {
    let fake = FakeA1111::start();
    let c = a1111(&fake);
    let payload = json!({"prompt": "a cat", "steps": 10, "step_ms": 30, "batch_size": 2});
    let (r, progress) = run(&c, &job("a1111", payload), &CancellationToken::new()).await;
    let out = r.expect("txt2img succeeds");
    assert_eq!(out.artifacts.len(), 2);
    assert_eq!(out.artifacts[0].name, "txt2img_0.png");
    assert_eq!(out.artifacts[1].body, ArtifactBody::Bytes(TINY_PNG.into()));
    assert_eq!(out.data["info"]["seed"], 1234, "info is parsed: {}", out.data);
    assert!(fake.progress_polls() > 0);
    assert!(
        progress
            .iter()
            .any(|p| p.total_steps == Some(10) && p.current_step.is_some_and(|s| s > 0)),
        "{progress:?}"
    );
    assert_in_order(&progress);
    let (r, _) = run(
        &c,
        &job("a1111", json!({"init_images": ["x"], "prompt": "dog", "steps": 1})),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(r.unwrap().artifacts[0].name, "img2img_0.png");
}

#[tokio::test]
async fn a1111_failures_are_classified() {
    let fake = FakeA1111::start();
    let c = a1111(&fake);
    let (r, _) = run(
        &c,
        &job("a1111", json!({"prompt": "FAIL_OOM"})),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(r.unwrap_err().class(), ErrorClass::Retryable);
    let (r, _) = run(
        &c,
        &job("a1111", json!({"prompt": "x", "steps": "ten"})),
        &CancellationToken::new(),
    )
    .await;
    let e = r.unwrap_err();
    assert_eq!(e.class(), ErrorClass::Fatal, "{}", e.chain());
    assert!(e.to_string().contains("422"), "{e}");
}

#[tokio::test]
async fn a1111_cancellation_interrupts() {
    let fake = FakeA1111::start();
    let c = a1111(&fake);
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        c2.cancel();
    });
    let (r, _) = run(
        &c,
        &job("a1111", json!({"prompt": "x", "steps": 1000, "step_ms": 10})),
        &cancel,
    )
    .await;
    assert!(matches!(r, Err(ConnectorError::Cancelled)));
    assert_eq!(fake.interrupts(), 1);
}

fn openai(fake: &FakeOpenai, key: Option<&str>) -> OpenaiConnector {
    OpenaiConnector::new(
        OpenaiConfig {
            base_url: fake.base_url(),
            api_key_env: "OPENAI_API_KEY".into(),
            text_model: "gpt-test".into(),
            image_model: "img-test".into(),
            max_attempts: 3,
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_secs(5),
            limits: Default::default(),
            prices: Default::default(),
        },
        key.map(str::to_owned),
    )
}

#[tokio::test]
async fn openai_text_streams() {
    let fake = FakeOpenai::start(Some("sk-test"));
    let c = openai(&fake, Some("sk-test"));
    let (r, progress) = run(
        &c,
        &job("openai_text", json!({"prompt": "hello there world"})),
        &CancellationToken::new(),
    )
    .await;
    let out = r.expect("the completion succeeds");
    assert_eq!(out.data["text"], "echo: hello there world");
    assert_eq!(out.data["finish_reason"], "stop");
    assert_eq!(out.data["model"], "gpt-test");
    assert_in_order(&progress);
    assert!(progress.iter().any(|p| p.message.contains("chunk")));
}

#[tokio::test]
async fn openai_honours_retry_after_then_succeeds() {
    let fake = FakeOpenai::start(None);
    let c = openai(&fake, None);
    fake.fail_next(429, Some("1"));
    fake.fail_next(503, None);
    let (r, _) = run(
        &c,
        &job("openai_text", json!({"prompt": "hi"})),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(r.expect("the third attempt succeeds").data["text"], "echo: hi");
    let reqs = fake.requests();
    assert_eq!(reqs.len(), 3);
    let waited = reqs[1].1 - reqs[0].1;
    assert!(
        waited >= Duration::from_millis(950),
        "Retry-After: 1 was honoured ({waited:?})"
    );
    assert!(
        reqs[2].1 - reqs[1].1 < Duration::from_millis(900),
        "own backoff is short"
    );
}

#[tokio::test]
async fn openai_failures_are_classified() {
    let fake = FakeOpenai::start(Some("sk-right"));
    let c = openai(&fake, Some("sk-wrong"));
    let (r, _) = run(
        &c,
        &job("openai_text", json!({"prompt": "hi"})),
        &CancellationToken::new(),
    )
    .await;
    let e = r.unwrap_err();
    // A refused key is the machine's problem (its worker holds), not the job's.
    assert!(
        matches!(&e, ConnectorError::CredentialsRefused { credit: false, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("Incorrect API key"), "{e}");
    assert_eq!(fake.requests().len(), 1, "a 4xx is not retried");

    let fake = FakeOpenai::start(None);
    let c = openai(&fake, None);
    for _ in 0..3 {
        fake.fail_next(500, None);
    }
    let (r, _) = run(
        &c,
        &job("openai_text", json!({"prompt": "hi"})),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(r.unwrap_err().class(), ErrorClass::Retryable);
    assert_eq!(fake.requests().len(), 3, "max_attempts bounds the tries");
    let (r, _) = run(
        &c,
        &job("openai_text", json!({"prompt": "hi", "model": "missing-model"})),
        &CancellationToken::new(),
    )
    .await;
    assert_eq!(r.unwrap_err().class(), ErrorClass::Fatal);
    let (r, _) = run(
        &c,
        &job("openai_text", json!({"temperature": 1})),
        &CancellationToken::new(),
    )
    .await;
    assert!(matches!(r, Err(ConnectorError::BadPayload(_))));
}

#[tokio::test]
async fn openai_images_as_base64_and_url() {
    let fake = FakeOpenai::start(None);
    let c = openai(&fake, None);
    let (r, _) = run(
        &c,
        &job("openai_image", json!({"prompt": "a cat", "n": 2})),
        &CancellationToken::new(),
    )
    .await;
    let out = r.expect("generation succeeds");
    assert_eq!(out.artifacts.len(), 2);
    assert_eq!(out.artifacts[0].body, ArtifactBody::Bytes(TINY_PNG.into()));
    let (r, _) = run(
        &c,
        &job("openai_image", json!({"prompt": "a cat", "response_format": "url"})),
        &CancellationToken::new(),
    )
    .await;
    let out = r.expect("generation succeeds");
    assert_eq!(
        out.artifacts[0].body,
        ArtifactBody::Bytes(TINY_PNG.into()),
        "URL images are downloaded"
    );
}

#[tokio::test]
async fn openai_cancellation_aborts_the_stream() {
    let fake = FakeOpenai::start(None);
    let c = openai(&fake, None);
    let cancel = CancellationToken::new();
    let c2 = cancel.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(150)).await;
        c2.cancel();
    });
    let long = "word ".repeat(200);
    let (r, _) = run(
        &c,
        &job("openai_text", json!({"prompt": long, "fake_chunk_ms": 20})),
        &cancel,
    )
    .await;
    assert!(matches!(r, Err(ConnectorError::Cancelled)));
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while fake.streams_aborted() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the server saw the request dropped"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn simulation_runs_from_config_and_payload() {
    let c = SimulationConnector::new(SimulationConfig {
        duration: Duration::from_millis(50),
        steps: 5,
        failure_rate: 0.0,
    });
    let (r, progress) = run(&c, &job("simulation", json!({"steps": 3})), &CancellationToken::new()).await;
    assert_eq!(r.unwrap().data["steps"], 3);
    assert_eq!(
        progress
            .iter()
            .filter_map(|p| p.current_step)
            .collect::<Vec<_>>()
            .last(),
        Some(&3)
    );
}

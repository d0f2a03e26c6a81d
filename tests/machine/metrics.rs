//! `/metrics` of the real binary after a job has run, checked by `promtool check metrics`
//! (Debian's `prometheus` package, installed by scripts/test-deps.sh), and the OpenMetrics
//! exposition a Prometheus server asks for.

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{machine, run};

/// `promtool check metrics` on `text`: its exit status and what it said.
fn promtool(text: &str) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs (Debian's `prometheus` package: run scripts/test-deps.sh)");
    child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), said)
}

#[test]
fn promtool_rejects_what_prometheus_conventions_reject() {
    // The check the next test relies on must be able to fail.
    let (ok, said) = promtool("# HELP jobs Jobs.\n# TYPE jobs counter\njobs_total 1\n");
    assert!(!ok, "{said}");
    assert!(said.contains("no help text"), "{said}");
}

#[test]
fn every_family_passes_promtool() {
    // Families the local-mode run below leaves empty (GPUs, external APIs, limiters, models),
    // filled as the product fills them.
    let m = machine::health::Metrics::new(&["c1".to_owned()]);
    m.claimed("openai");
    m.job("openai", "completed");
    m.claim(0.01, true);
    m.claim(1.0, false);
    m.job_duration("openai", 2.5);
    m.set_service("comfyui-gpu0", 2, true);
    m.set_workers([("m-gpu0", true)]);
    m.set_queue_depth("comfyui", 3);
    m.set_gpu(&machine::gpu::GpuLive {
        index: 0,
        utilization_percent: Some(90),
        memory_used_bytes: Some(1 << 30),
        memory_total_bytes: Some(8 << 30),
        temperature_c: Some(70),
    });
    m.billing(&machine::connectors::Billing {
        connector: "openai".into(),
        customer: "c1".into(),
        requests: 1,
        input_tokens: 10,
        output_tokens: 20,
        predict_seconds: 1.5,
        cost: 0.01,
        currency: "USD".into(),
    });
    m.set_limiter(
        "openai",
        Some(&machine::connectors::limits::DailyUsage {
            requests: 1,
            tokens: 30,
            ..Default::default()
        }),
        machine::connectors::limits::LimiterStats {
            admitted: 1,
            waits: 1,
            waited_ms: 100,
            quota_refusals: 0,
        },
    );
    m.set_models(1, 1000, 0);
    // Customers are free text in jobs: only the configured one is named, the rest are `other`.
    for i in 0..50 {
        m.billing(&machine::connectors::Billing {
            connector: "openai".into(),
            customer: format!("someone {i}"),
            requests: 1,
            ..Default::default()
        });
    }
    let (_, text) = m.exposition(None);
    assert!(text.contains("machine_gpu_utilization_ratio{gpu=\"0\"} 0.9"), "{text}");
    let series = text
        .lines()
        .filter(|l| l.starts_with("machine_external_requests_total{"))
        .count();
    assert_eq!(series, 2, "c1 and other:\n{text}");
    for family in [
        "machine_gpu_utilization_ratio",
        "machine_jobs_claimed_total",
        "machine_external_cost_total",
        "machine_external_predict_seconds_total",
        "machine_limit_wait_seconds",
        "machine_model_download_bytes_total",
    ] {
        assert!(
            text.contains(&format!("# TYPE {family} ")),
            "{family} missing from\n{text}"
        );
    }
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool check metrics failed:\n{said}\n--- metrics\n{text}");
    assert!(said.trim().is_empty(), "promtool found problems:\n{said}");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_after_a_job_pass_promtool() {
    let ws = tempfile::tempdir().unwrap();
    let port = testkit::free_port();
    let mut child = machine()
        .arg("run")
        .env("MACHINE_ID", "metrics1")
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("MACHINE_WORKSPACE", ws.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stop = scopeguard(child.id());
    let deadline = Instant::now() + Duration::from_secs(30);
    while !reqwest::get(format!("http://127.0.0.1:{port}/ready"))
        .await
        .is_ok_and(|r| r.status().as_u16() == 200)
    {
        assert!(Instant::now() < deadline, "the machine never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (out, id, stderr) = run(machine()
        .args([
            "jobs",
            "submit",
            "--service",
            "simulation",
            "--payload",
            r#"{"duration_ms": 20}"#,
        ])
        .env("MACHINE_WORKSPACE", ws.path()));
    assert!(out.status.success(), "{stderr}");
    let id = id.trim().to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, shown, _) = run(machine()
            .args(["jobs", "show", &id, "--json"])
            .env("MACHINE_WORKSPACE", ws.path()));
        if shown.contains("\"completed\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the job never completed: {shown}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let url = format!("http://127.0.0.1:{port}/metrics");
    // The job's report reaches the metrics feed and the queue sample comes within seconds.
    let deadline = Instant::now() + Duration::from_secs(15);
    let text = loop {
        let r = reqwest::get(&url).await.unwrap();
        assert_eq!(r.headers()["content-type"], "text/plain; version=0.0.4; charset=utf-8");
        let text = r.text().await.unwrap();
        if text.contains(r#"machine_jobs_total{service="simulation",outcome="completed"} 1"#)
            && text.contains(r#"machine_queue_depth{service="simulation"} 0"#)
        {
            break text;
        }
        assert!(
            Instant::now() < deadline,
            "the job or the queue depth is missing:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let (ok, said) = promtool(&text);
    assert!(ok, "promtool check metrics failed:\n{said}\n--- metrics\n{text}");
    assert!(said.trim().is_empty(), "promtool found problems:\n{said}");
    for line in [
        "machine_build_info{version=\"",
        "machine_claim_duration_seconds_count 1\n",
        "machine_service_restarts_total{service=\"redis\"} 0",
        "machine_service_up{service=\"redis\"} 1",
        "machine_worker_busy{worker=\"metrics1-simulation-1\"} 0",
        "machine_jobs_running 0",
        "machine_job_duration_seconds_count{service=\"simulation\"} 1",
        "machine_jobs_claimed_total{service=\"simulation\"} 1",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
    assert!(!text.contains(&id), "a job id in a label:\n{text}");
    // Each job ends once in `machine_jobs_total`, so a sum over outcomes counts jobs.
    assert!(!text.contains("outcome=\"claimed\""), "{text}");

    // A Prometheus server asks for OpenMetrics and gets it, with the crate's content type.
    let r = reqwest::Client::new()
        .get(&url)
        .header(
            "accept",
            "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
        )
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["content-type"],
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    let open = r.text().await.unwrap();
    assert!(open.ends_with("# EOF\n"), "{open}");
    assert!(open.contains("# TYPE machine_jobs counter\n"), "{open}");

    // A job this machine cannot run (it has no 80 GB GPU) waits in the queue, and the depth
    // shows it.
    let (out, _, stderr) = run(machine()
        .args([
            "jobs",
            "submit",
            "--service",
            "simulation",
            "--requirements",
            r#"{"hardware":{"gpu_memory_gb":80}}"#,
        ])
        .env("MACHINE_WORKSPACE", ws.path()));
    assert!(out.status.success(), "{stderr}");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        if text.contains(r#"machine_queue_depth{service="simulation"} 1"#) {
            break;
        }
        assert!(Instant::now() < deadline, "the waiting job is not counted:\n{text}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    drop(stop);
    let status = child.wait().unwrap();
    assert!(status.success(), "{status:?}");
}

/// SIGTERMs the machine when dropped, so a failed assertion does not leave it running.
fn scopeguard(pid: u32) -> impl Drop {
    struct Term(u32);
    impl Drop for Term {
        fn drop(&mut self) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(self.0 as i32),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
    }
    Term(pid)
}

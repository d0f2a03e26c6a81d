//! Every job's guarantees on the real binary (issue 23), against a real Redis and moto's S3
//! server with auth on: a key the store refuses gives the job back untouched and holds the
//! worker, shown on `/status` and `/ready`; the corrected key, written to the file
//! `AWS_SECRET_ACCESS_KEY_FILE` names and read by `machine reload`, releases the worker and the
//! job completes with one object.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::{Value, json};
use testkit::{ObjectServer, RedisServer, StoreKind};

use crate::e2e::{completed, submit};
use crate::support::{machine, run, wait_until};

const TOKEN: &str = "guarantees-test-token";
const BUCKET: &str = "outputs";

struct Machine {
    child: crate::support::KillOnDrop,
    port: u16,
}

impl Machine {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn status(&self) -> Option<Value> {
        let out = machine()
            .args(["status", "--json", "--url", &self.url()])
            .env("MACHINE_CONTROL_TOKEN", TOKEN)
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    }

    fn ready(&self) -> Option<Value> {
        self.ready_code().map(|(_, doc)| doc)
    }

    /// `/ready`'s status code and document.
    fn ready_code(&self) -> Option<(u16, Value)> {
        let out = std::process::Command::new("curl")
            .args(["-s", "-w", "\n%{http_code}", &format!("{}/ready", self.url())])
            .output()
            .ok()?
            .stdout;
        let text = String::from_utf8(out).ok()?;
        let (body, code) = text.rsplit_once('\n')?;
        Some((code.trim().parse().ok()?, serde_json::from_str(body).ok()?))
    }
}

/// Starts the machine with one simulation worker, the store's variables in `env`.
fn start(dir: &Path, redis_url: &str, env: &[(String, String)]) -> Machine {
    start_with(dir, redis_url, env, "simulation:1", "")
}

/// Starts the machine with the simulation workers of `workers`, `extra` added to its
/// configuration file.
fn start_with(dir: &Path, redis_url: &str, env: &[(String, String)], workers: &str, extra: &str) -> Machine {
    let config = dir.join("machine.toml");
    std::fs::write(
        &config,
        format!(
            "[connectors.simulation]\nduration = \"200ms\"\nsteps = 2\n\n[worker]\nhold_recheck = \"1s\"\nupload_window = \"2s\"\n{extra}"
        ),
    )
    .unwrap();
    let port = testkit::free_port();
    let log = std::fs::File::create(dir.join("machine.log")).unwrap();
    let mut cmd = machine();
    cmd.arg("run")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", "gt")
        .env("MACHINE_WORKSPACE", dir.join("ws"))
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("MACHINE_CONTROL_TOKEN", TOKEN)
        .env("HUB_REDIS_URL", redis_url)
        .env("WORKER_CONNECTORS", workers)
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    for (k, v) in env {
        cmd.env(k, v);
    }
    Machine {
        child: cmd.spawn().unwrap().into(),
        port,
    }
}

async fn job(conn: &mut redis::aio::MultiplexedConnection, id: &str) -> std::collections::BTreeMap<String, String> {
    conn.hgetall(format!("job:{id}")).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_key_holds_the_worker_until_a_reload_reads_the_corrected_key_file() {
    let test = async {
        let store = ObjectServer::start(StoreKind::S3);
        store.create_bucket(BUCKET);
        let redis = RedisServer::start();
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let secret_file = dir.path().join("aws-secret");
        let good = store.env();
        let wrong = store.env_with_wrong_key().unwrap();
        let secret = |env: &[(String, String)]| {
            env.iter()
                .find(|(k, _)| k == "AWS_SECRET_ACCESS_KEY")
                .map(|(_, v)| v.clone())
                .unwrap()
        };
        std::fs::write(&secret_file, format!("{}\n", secret(&wrong))).unwrap();
        let mut env: Vec<(String, String)> = good
            .iter()
            .filter(|(k, _)| k != "AWS_SECRET_ACCESS_KEY")
            .cloned()
            .collect();
        env.push((
            "AWS_SECRET_ACCESS_KEY_FILE".to_owned(),
            secret_file.display().to_string(),
        ));

        let id = submit(
            &redis.url(),
            &["--service", "simulation", "--payload", r#"{"artifact": "hello"}"#],
        );
        let ctx = json!({"storage": {"provider": "s3", "bucket": BUCKET}, "prefix": "users/u1", "filename": "out.txt"});
        let () = conn.hset(format!("job:{id}"), "ctx", ctx.to_string()).await.unwrap();
        let m = start(dir.path(), &redis.url(), &env);

        // The job goes back untouched: pending, no retry spent, one return for the machine.
        let deadline = Instant::now() + Duration::from_secs(60);
        let returned = loop {
            let j = job(&mut conn, &id).await;
            if j.get("machine_returns").map(String::as_str) == Some("1") {
                break j;
            }
            assert!(Instant::now() < deadline, "the job was not given back: {j:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(returned["retry_count"], "0", "no retry spent: {returned:?}");
        assert_ne!(returned["status"], "failed", "{returned:?}");
        let reason = wait_until(Duration::from_secs(20), "the worker to show its hold", || {
            let doc = m.status()?;
            let r = doc["workers"][0]["reason"].as_str()?.to_owned();
            r.contains("output store refuses the credentials").then_some(r)
        });
        assert!(reason.contains("SignatureDoesNotMatch"), "{reason}");
        let ready = m.ready().expect("/ready answers");
        let not_claiming = ready["not_claiming"].to_string();
        assert!(not_claiming.contains("output store refuses the credentials"), "{ready}");
        // Held, it claims nothing more: the job stays given back.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let j = job(&mut conn, &id).await;
        assert_eq!(j["machine_returns"], "1", "claimed again while held: {j:?}");

        // The corrected key in the file, read by a reload: released, and the job completes.
        std::fs::write(&secret_file, format!("{}\n", secret(&good))).unwrap();
        let (out, stdout, stderr) = run(machine()
            .args(["reload", "--json", "--url", &m.url()])
            .env("MACHINE_CONFIG", dir.path().join("machine.toml"))
            .env("MACHINE_CONTROL_TOKEN", TOKEN));
        assert!(out.status.success(), "reload: {stdout} {stderr}");
        assert!(stdout.contains("output store credentials"), "{stdout}");
        let log = dir.path().join("machine.log");
        let done = tokio::time::timeout(
            Duration::from_secs(30),
            completed(&mut conn, &id, Instant::now() + Duration::from_secs(60)),
        )
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the job did not complete; log:\n{}",
                std::fs::read_to_string(&log).unwrap()
            )
        });
        assert_eq!(done["retry_count"], "0", "{done:?}");
        let listed: Vec<String> = store.list(BUCKET).into_iter().map(|o| o.name).collect();
        assert_eq!(listed, ["users/u1/out.txt"], "one object");
        let doc = m.status().unwrap();
        assert!(doc["workers"][0]["reason"].is_null(), "released: {doc}");
    };
    tokio::time::timeout(Duration::from_secs(180), test)
        .await
        .expect("the test finishes within its hard limit");
}

/// A job's own failure, retryable or not, spends the job's retries and never counts towards
/// quarantine: jobs failing with `{"fail": "retryable"}` on a 2-worker machine leave both
/// workers claiming and `/ready` at 200 (they quarantined both workers for 3 minutes).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_s_own_retryable_failures_do_not_quarantine_the_machine() {
    let test = async {
        let redis = RedisServer::start();
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let m = start_with(
            dir.path(),
            &redis.url(),
            &[],
            "simulation:2",
            "\n[worker.retry_delay]\ninitial = \"100ms\"\nmax = \"100ms\"\njitter = 0.0\n",
        );
        wait_until(Duration::from_secs(60), "the machine to be ready", || {
            m.ready_code().filter(|(code, _)| *code == 200)
        });
        // Four jobs, two attempts each: eight failures over two workers, so at least one
        // worker sees three distinct jobs fail (the default `quarantine_after`).
        let ids: Vec<String> = (0..4)
            .map(|_| {
                submit(
                    &redis.url(),
                    &[
                        "--service",
                        "simulation",
                        "--payload",
                        r#"{"fail": "retryable", "duration_ms": 50}"#,
                        "--max-retries",
                        "1",
                    ],
                )
            })
            .collect();
        for id in &ids {
            let deadline = Instant::now() + Duration::from_secs(60);
            let failed = loop {
                let j = job(&mut conn, id).await;
                if j.get("status").map(String::as_str) == Some("failed") {
                    break j;
                }
                assert!(
                    Instant::now() < deadline,
                    "job {id} did not fail: {j:?}; /ready: {:?}",
                    m.ready_code()
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            };
            assert_eq!(failed["retry_count"], "2", "the job's retries were spent: {failed:?}");
            assert!(failed["error"].contains("simulated failure"), "{failed:?}");
        }
        let (code, ready) = m.ready_code().expect("/ready answers");
        assert_eq!(code, 200, "the job's failures are not the machine's: {ready}");
        assert_eq!(ready["not_claiming"], json!({}), "{ready}");
        let doc = m.status().expect("/status answers");
        for w in doc["workers"].as_array().unwrap() {
            assert!(w["reason"].is_null(), "no worker is held: {doc}");
        }
        // Both workers claim on: a good job completes at once.
        let good = submit(&redis.url(), &["--service", "simulation", "--payload", "{}"]);
        completed(&mut conn, &good, Instant::now() + Duration::from_secs(10)).await;
    };
    tokio::time::timeout(Duration::from_secs(180), test)
        .await
        .expect("the test finishes within its hard limit");
}

/// SIGTERM while an output uploads (through a proxy that holds it 60 s) on the real binary:
/// the upload gets the drain period (3 s), then the job goes back to the queue in its place
/// (pending, no retry spent, nobody's) and the machine exits 0 at once, every worker stopped
/// within the drain; nothing is stored and nothing is left in progress for a lease to find.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_upload_returns_the_job_and_the_machine_exits_within_the_drain() {
    let test = async {
        let store = ObjectServer::start(StoreKind::S3);
        store.create_bucket(BUCKET);
        let redis = RedisServer::start();
        let mut conn = redis::Client::open(redis.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let proxy = crate::stores::slow_proxy(store.endpoint(), Duration::from_secs(60)).await;
        let env = crate::stores::through(store.env(), &proxy);
        let id = submit(
            &redis.url(),
            &["--service", "simulation", "--payload", r#"{"artifact": "held up"}"#],
        );
        let ctx = json!({"storage": {"provider": "s3", "bucket": BUCKET}, "prefix": "users/u1"});
        let () = conn.hset(format!("job:{id}"), "ctx", ctx.to_string()).await.unwrap();
        let mut m = start_with(dir.path(), &redis.url(), &env, "simulation:1", "drain = \"3s\"\n");
        let deadline = Instant::now() + Duration::from_secs(60);
        while job(&mut conn, &id).await.get("status").map(String::as_str) != Some("in_progress") {
            assert!(Instant::now() < deadline, "the job never started");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The simulated run takes 200 ms; then the upload hangs in the proxy.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let signalled = Instant::now();
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(m.child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        let exit = wait_until(Duration::from_secs(20), "the machine to exit", || {
            m.child.try_wait().unwrap()
        });
        let took = signalled.elapsed();
        let log = std::fs::read_to_string(dir.path().join("machine.log")).unwrap();
        assert_eq!(exit.code(), Some(0), "{exit:?}; log:\n{log}");
        assert!(
            took < Duration::from_secs(10),
            "exited {took:?} after SIGTERM; log:\n{log}"
        );
        assert!(!log.contains("did not stop within"), "log:\n{log}");
        let j = job(&mut conn, &id).await;
        assert_eq!(j["status"], "pending", "returned to the queue: {j:?}");
        assert_eq!(j["retry_count"], "0", "no retry spent: {j:?}");
        assert_eq!(j.get("worker_id").map(String::as_str).unwrap_or(""), "", "{j:?}");
        assert!(store.list(BUCKET).is_empty(), "nothing stored");
    };
    tokio::time::timeout(Duration::from_secs(180), test)
        .await
        .expect("the test finishes within its hard limit");
}

//! `machine functions ...`: install, list, delete and self-check the jobMatching library in
//! the broker's Redis (`HUB_REDIS_URL`, `--redis-url`, else this machine's own).

use serde_json::Value;

use super::args::{FunctionsCommand, RedisArgs};
use super::common::{Threads, block_on, redis_url};
use super::exit::{CliError, Outcome};
use crate::broker::library::Library;
use crate::broker::reference::{self, PendingJob};
use crate::broker::{Broker, BrokerError, BrokerOptions, Cancellation, Capabilities, LeaseStatus, NewJob};
use crate::config::RedisUrl;

/// Runs `machine functions <command>`.
pub(super) fn functions(
    args: &RedisArgs,
    command: &FunctionsCommand,
    machine: Option<RedisUrl>,
) -> Result<Outcome, CliError> {
    let url = redis_url(args, machine)?;
    block_on(Threads::One, async {
        match command {
            FunctionsCommand::Install => {
                let broker = Broker::connect(&url, BrokerOptions::default()).await?;
                let r = broker.ensure_functions().await?;
                let action = if r.loaded { "loaded" } else { "already loaded" };
                println!(
                    "jobMatching {} {action} (redis {}, previous {}, mode {:?})",
                    r.version,
                    r.server_version,
                    r.previous.as_deref().unwrap_or("none"),
                    r.mode
                );
                Ok(Outcome::Success)
            }
            FunctionsCommand::List => {
                let broker = Broker::connect(&url, BrokerOptions::default()).await?;
                let ours = Library::new().version().to_owned();
                match broker.loaded_library().await? {
                    None => println!("jobMatching: not loaded (this binary has {ours})"),
                    Some((v, functions)) => {
                        let same = if v == ours {
                            "current"
                        } else {
                            "differs from this binary"
                        };
                        println!("jobMatching {v} ({same})");
                        for f in functions {
                            let flags = if f.flags.is_empty() {
                                String::new()
                            } else {
                                format!(" [{}]", f.flags.join(","))
                            };
                            println!("  {}{flags}", f.name);
                        }
                    }
                }
                Ok(Outcome::Success)
            }
            FunctionsCommand::Delete => {
                let broker = Broker::connect(&url, BrokerOptions::default()).await?;
                if broker.delete_library().await? {
                    println!("jobMatching deleted");
                } else {
                    println!("jobMatching was not loaded");
                }
                Ok(Outcome::Success)
            }
            FunctionsCommand::Test => self_test(&url).await,
        }
    })?
}

/// Claims through the loaded library on scratch keys and compares every claim with the
/// reference matcher; then checks fencing and cancellation.
async fn self_test(url: &RedisUrl) -> Result<Outcome, CliError> {
    let prefix = format!("machine-selftest:{:016x}:", rand::random::<u64>());
    let opts = BrokerOptions {
        key_prefix: prefix.clone(),
        failed_holdoff: std::time::Duration::ZERO,
        ..BrokerOptions::default()
    };
    let broker = Broker::connect(url, opts).await?;
    broker.ensure_functions().await?;
    let outcome = self_test_on(&broker).await;
    broker.purge_scratch_keys().await?;
    match outcome? {
        Ok(checks) => {
            println!("jobMatching self-test passed ({checks} checks, prefix {prefix})");
            Ok(Outcome::Success)
        }
        Err(problem) => Err(CliError::Failed(format!("jobMatching self-test FAILED: {problem}"))),
    }
}

async fn self_test_on(broker: &Broker) -> Result<Result<usize, String>, BrokerError> {
    let cases: [(&str, &str, i64); 5] = [
        ("comfyui", r#"{"hardware":{"gpu_memory_gb":48}}"#, 90),
        ("comfyui", r#"{"models":["sdxl"]}"#, 70),
        ("a1111", "", 80),
        ("comfyui", "", 50),
        ("comfyui", r#"{"supports_controlnet":true}"#, 60),
    ];
    let mut pending = Vec::new();
    for (service, reqs, priority) in cases {
        let mut job = NewJob::new(service, Value::Object(serde_json::Map::new()));
        job.requirements = reqs.to_owned();
        job.priority = priority;
        let id = broker.submit(&job).await?;
        let score = crate::broker::pending_score(priority, None, 0, None);
        pending.push(PendingJob {
            id,
            score,
            service: service.to_owned(),
            requirements: reqs.to_owned(),
            customer_id: String::new(),
            workflow_id: String::new(),
            payload: "{}".to_owned(),
            held_off_worker: None,
            created_ms: 0,
            seq: 0,
        });
    }
    let mut caps = Capabilities::new("selftest-w1", "selftest", &["comfyui"]);
    caps.hardware.gpu_memory_gb = 24.0;
    caps.models.insert("comfyui".to_owned(), vec!["sdxl".to_owned()]);
    let mut checks = 0;
    loop {
        let want = reference::pick(&caps, &pending).map(|j| j.id.clone());
        let got = broker.claim(&caps).await?;
        checks += 1;
        if got.as_ref().map(|j| &j.id) != want.as_ref() {
            return Ok(Err(format!(
                "claimed {:?}, the reference matcher picks {want:?}",
                got.map(|j| j.id)
            )));
        }
        let Some(job) = got else { break };
        pending.retain(|p| p.id != job.id);
        broker.start(&job).await?;
        broker.progress(&job, 50.0, "half way", None).await?;
        broker.complete(&job, &serde_json::json!({"ok": true})).await?;
        checks += 1;
        // A completion repeated by its worker is recognised as done; anyone else's is fenced.
        broker.complete(&job, &Value::Null).await?;
        let mut intruder = job.clone();
        intruder.worker_id = "selftest-intruder".to_owned();
        if !matches!(
            broker.complete(&intruder, &Value::Null).await,
            Err(BrokerError::LeaseLost { .. })
        ) {
            return Ok(Err("a completion by another worker was not fenced off".to_owned()));
        }
        checks += 1;
    }
    // Cancellation: the remaining a1111 job, claimed then cancelled, rejects its worker.
    let a1111 = Capabilities::new("selftest-w2", "selftest", &["a1111"]);
    let Some(job) = broker.claim(&a1111).await? else {
        return Ok(Err("the a1111 job was not claimable".to_owned()));
    };
    if broker.cancel(&job.id).await? != Cancellation::Cancelled {
        return Ok(Err("cancel did not cancel".to_owned()));
    }
    if broker.renew_lease(&job).await? != LeaseStatus::Cancelled {
        return Ok(Err("lease renewal did not report the cancellation".to_owned()));
    }
    Ok(Ok(checks + 2))
}

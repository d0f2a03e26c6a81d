//! `machine functions ...` and `machine jobs ...`: operator commands against the broker's Redis.
//!
//! They talk to `HUB_REDIS_URL` (or `--redis-url`), else to this machine's own Redis (local
//! mode's private redis-server); they write exactly what the API writes (jobs
//! submitted here are indistinguishable from the API's), and exit 0 on success, 1 on a runtime
//! failure, 2 on bad usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;

use super::broker::{Broker, BrokerOptions, CancelOutcome, NewJob};
use super::capabilities::Capabilities;
use super::installer::{self, Library};
use super::reference::{self, PendingJob};
use super::{BrokerError, LeaseStatus};
use crate::config::RedisUrl;

const EXIT_INVALID: u8 = 2;

/// Where the broker's Redis is.
#[derive(Debug, Args)]
pub struct RedisArgs {
    /// The broker's Redis URL (`redis://` or `rediss://`, with credentials if needed).
    #[arg(
        long,
        global = true,
        env = "HUB_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    redis_url: Option<String>,
}

/// `machine functions ...`
#[derive(Debug, Subcommand)]
pub enum FunctionsCommand {
    /// Load the jobMatching library if the loaded version differs, then verify it.
    Install,
    /// Show the loaded library's version and functions.
    List,
    /// Delete the jobMatching library.
    Delete,
    /// Self-check: claims and lifecycle against a scratch key prefix, compared with the
    /// reference matcher. Leaves no keys behind.
    Test,
}

/// `machine jobs ...`
#[derive(Debug, Subcommand)]
pub enum JobsCommand {
    /// Submit a job exactly as the API does; prints its id.
    Submit {
        /// `service_required`, e.g. `simulation`.
        #[arg(long)]
        service: String,
        /// The payload: JSON, or `@FILE` to read it from a file.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Requirements JSON.
        #[arg(long)]
        requirements: Option<String>,
        /// Priority (higher runs first).
        #[arg(long, default_value_t = 50)]
        priority: i64,
        /// Customer id.
        #[arg(long, default_value = "")]
        customer: String,
        /// Workflow id.
        #[arg(long, default_value = "")]
        workflow: String,
        /// Retries allowed after a retryable failure.
        #[arg(long, default_value_t = 3)]
        max_retries: u32,
    },
    /// Print a job's hash and progress.
    Show {
        /// The job id.
        id: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs with this status (pending, assigned, in_progress, completed, failed, ...).
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job as the API does.
    Cancel {
        /// The job id.
        id: String,
    },
    /// Claim one job as a worker and hold it (renewing its lease) until SIGINT/SIGTERM, then
    /// return it to the queue; prints the job id. For debugging matching and leases.
    Claim {
        /// Services the worker accepts (repeat or comma-separate).
        #[arg(long, value_delimiter = ',', required = true)]
        service: Vec<String>,
        /// The worker id.
        #[arg(long, default_value = "operator")]
        worker: String,
        /// Full capabilities JSON instead of --service/--worker.
        #[arg(long)]
        capabilities: Option<String>,
        /// Lease length in seconds.
        #[arg(long, default_value_t = 60)]
        lease_secs: u64,
    },
}

fn runtime() -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("machine: failed to start the async runtime: {e}");
            ExitCode::FAILURE
        })
}

/// The Redis to talk to: `--redis-url`/`HUB_REDIS_URL`, else the machine's own (in local mode,
/// the private redis-server's socket under the workspace).
fn redis_url(args: &RedisArgs, machine: Option<RedisUrl>) -> Result<RedisUrl, ExitCode> {
    let Some(raw) = args.redis_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) else {
        return machine.ok_or_else(|| {
            eprintln!("machine: no Redis: set HUB_REDIS_URL or pass --redis-url");
            ExitCode::from(EXIT_INVALID)
        });
    };
    RedisUrl::parse(raw).map_err(|e| {
        eprintln!("machine: {e}");
        ExitCode::from(EXIT_INVALID)
    })
}

fn report(e: &BrokerError) -> ExitCode {
    eprintln!("machine: {e}");
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        eprintln!("  caused by: {s}");
        source = s.source();
    }
    ExitCode::FAILURE
}

/// Runs `machine functions <command>`.
pub fn functions(args: &RedisArgs, command: &FunctionsCommand, machine: Option<RedisUrl>) -> ExitCode {
    let url = match redis_url(args, machine) {
        Ok(u) => u,
        Err(code) => return code,
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    let result = rt.block_on(async {
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
                Ok(ExitCode::SUCCESS)
            }
            FunctionsCommand::List => {
                let broker = Broker::connect(&url, BrokerOptions::default()).await?;
                let mut conn = broker.connection();
                let loaded = installer::loaded_version(&mut conn).await?;
                let functions = installer::list(&mut conn).await?;
                match loaded {
                    None => println!("jobMatching: not loaded (this binary has {})", Library::new().version()),
                    Some(v) => {
                        let same = if v == Library::new().version() {
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
                Ok(ExitCode::SUCCESS)
            }
            FunctionsCommand::Delete => {
                let broker = Broker::connect(&url, BrokerOptions::default()).await?;
                let mut conn = broker.connection();
                if installer::delete(&mut conn).await? {
                    println!("jobMatching deleted");
                } else {
                    println!("jobMatching was not loaded");
                }
                Ok(ExitCode::SUCCESS)
            }
            FunctionsCommand::Test => self_test(&url).await,
        }
    });
    result.unwrap_or_else(|e| report(&e))
}

/// Claims through the loaded library on scratch keys and compares every claim with the
/// reference matcher; then checks fencing and cancellation.
async fn self_test(url: &RedisUrl) -> Result<ExitCode, BrokerError> {
    let prefix = format!("machine-selftest:{:016x}:", rand::random::<u64>());
    let opts = BrokerOptions {
        key_prefix: prefix.clone(),
        failed_holdoff: std::time::Duration::ZERO,
        ..BrokerOptions::default()
    };
    let broker = Broker::connect(url, opts).await?;
    broker.ensure_functions().await?;
    let outcome = self_test_on(&broker).await;
    // SCAN rather than KEYS: the self-check may run against a busy production Redis.
    let mut conn = broker.connection();
    let mut cursor: u64 = 0;
    loop {
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .query_async(&mut conn)
            .await
            .map_err(|source| BrokerError::Redis { op: "SCAN", source })?;
        if !keys.is_empty() {
            let _: () = redis::cmd("DEL")
                .arg(&keys)
                .query_async(&mut conn)
                .await
                .map_err(|source| BrokerError::Redis { op: "DEL", source })?;
        }
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    match outcome? {
        Ok(checks) => {
            println!("jobMatching self-test passed ({checks} checks, prefix {prefix})");
            Ok(ExitCode::SUCCESS)
        }
        Err(problem) => {
            eprintln!("machine: jobMatching self-test FAILED: {problem}");
            Ok(ExitCode::FAILURE)
        }
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
        let score = super::pending_score(priority, None, 0, None);
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
    if broker.cancel(&job.id).await? != CancelOutcome::Cancelled {
        return Ok(Err("cancel did not cancel".to_owned()));
    }
    if broker.renew_lease(&job).await? != LeaseStatus::Cancelled {
        return Ok(Err("lease renewal did not report the cancellation".to_owned()));
    }
    Ok(Ok(checks + 2))
}

/// Runs `machine jobs <command>`.
pub fn jobs(args: &RedisArgs, command: &JobsCommand, machine: Option<RedisUrl>) -> ExitCode {
    let url = match redis_url(args, machine) {
        Ok(u) => u,
        Err(code) => return code,
    };
    let new_job = match command {
        JobsCommand::Submit {
            service,
            payload,
            requirements,
            priority,
            customer,
            workflow,
            max_retries,
        } => match build_job(
            service,
            payload,
            requirements.as_deref(),
            *priority,
            customer,
            workflow,
            *max_retries,
        ) {
            Ok(j) => Some(j),
            Err(problem) => {
                eprintln!("machine: {problem}");
                return ExitCode::from(EXIT_INVALID);
            }
        },
        _ => None,
    };
    let rt = match runtime() {
        Ok(r) => r,
        Err(code) => return code,
    };
    if let JobsCommand::Claim {
        service,
        worker,
        capabilities,
        lease_secs,
    } = command
    {
        let caps = match capabilities {
            Some(doc) => match serde_json::from_str::<Capabilities>(doc) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("machine: --capabilities: {e}");
                    return ExitCode::from(EXIT_INVALID);
                }
            },
            None => {
                let services: Vec<&str> = service.iter().map(String::as_str).collect();
                Capabilities::new(worker.as_str(), "operator", &services)
            }
        };
        let lease = std::time::Duration::from_secs((*lease_secs).max(1));
        return rt
            .block_on(claim_and_hold(&url, caps, lease))
            .unwrap_or_else(|e| report(&e));
    }
    let result = rt.block_on(async {
        let broker = Broker::connect(&url, BrokerOptions::default()).await?;
        match command {
            JobsCommand::Submit { .. } => {
                let job = new_job.expect("a submit command built its job above");
                println!("{}", broker.submit(&job).await?);
                Ok(ExitCode::SUCCESS)
            }
            JobsCommand::Show { id, json } => match broker.show(id).await? {
                None => {
                    eprintln!("machine: no job {id}");
                    Ok(ExitCode::FAILURE)
                }
                Some(view) => {
                    if *json {
                        println!("{}", serde_json::to_string_pretty(&view).unwrap_or_default());
                    } else {
                        for (k, v) in &view.job {
                            println!("{k:<20} {v}");
                        }
                        if let Some(why) = &view.waiting {
                            println!("{:<20} {why}", "waiting");
                        }
                        if !view.progress.is_empty() {
                            println!("progress:");
                            for (k, v) in &view.progress {
                                println!("  {k:<18} {v}");
                            }
                        }
                    }
                    Ok(ExitCode::SUCCESS)
                }
            },
            JobsCommand::List { status, limit, json } => {
                let jobs = broker.list(status.as_deref(), *limit).await?;
                if *json {
                    println!("{}", serde_json::to_string_pretty(&jobs).unwrap_or_default());
                } else {
                    let get =
                        |j: &std::collections::BTreeMap<String, String>, k: &str| j.get(k).cloned().unwrap_or_default();
                    println!(
                        "{:<36}  {:<12}  {:<14}  {:>8}  {:<24}  WORKER",
                        "ID", "STATUS", "SERVICE", "PRIORITY", "CREATED"
                    );
                    for j in &jobs {
                        println!(
                            "{:<36}  {:<12}  {:<14}  {:>8}  {:<24}  {}",
                            get(j, "id"),
                            get(j, "status"),
                            get(j, "service_required"),
                            get(j, "priority"),
                            get(j, "created_at"),
                            get(j, "worker_id")
                        );
                    }
                }
                Ok(ExitCode::SUCCESS)
            }
            JobsCommand::Claim { .. } => unreachable!("claim is handled before connecting"),
            JobsCommand::Cancel { id } => match broker.cancel(id).await? {
                CancelOutcome::Cancelled => {
                    println!("cancelled {id}");
                    Ok(ExitCode::SUCCESS)
                }
                CancelOutcome::NotFound => {
                    eprintln!("machine: no job {id}");
                    Ok(ExitCode::FAILURE)
                }
                CancelOutcome::AlreadyEnded(status) => {
                    eprintln!("machine: job {id} already ended ({status})");
                    Ok(ExitCode::FAILURE)
                }
            },
        }
    });
    result.unwrap_or_else(|e: BrokerError| report(&e))
}

async fn claim_and_hold(
    url: &RedisUrl,
    caps: Capabilities,
    lease: std::time::Duration,
) -> Result<ExitCode, BrokerError> {
    use std::io::Write as _;
    let opts = BrokerOptions {
        lease,
        safety_poll: std::time::Duration::from_millis(500),
        ..BrokerOptions::default()
    };
    let broker = Broker::connect(url, opts).await?;
    broker.ensure_functions().await?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let signals = {
        let shutdown = shutdown.clone();
        async move {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                Some(()) = async { match term.as_mut() { Some(t) => t.recv().await, None => std::future::pending().await } } => {}
            }
            shutdown.cancel();
        }
    };
    let work = async {
        let Some(job) = broker.claim_next(&caps, &shutdown).await? else {
            return Ok(ExitCode::SUCCESS);
        };
        println!("{}", job.id);
        let _ = std::io::stdout().flush();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    broker.return_job(&job).await?;
                    eprintln!("returned {}", job.id);
                    return Ok(ExitCode::SUCCESS);
                }
                () = tokio::time::sleep(lease / 3) => match broker.renew_lease(&job).await? {
                    LeaseStatus::Held => {}
                    other => {
                        eprintln!("machine: job {} is no longer held: {other:?}", job.id);
                        return Ok(ExitCode::FAILURE);
                    }
                },
            }
        }
    };
    // The signal listener only cancels; the claim loop still returns the job it holds.
    let listener = tokio::spawn(signals);
    let result = work.await;
    listener.abort();
    let _ = listener.await;
    result
}

fn build_job(
    service: &str,
    payload: &str,
    requirements: Option<&str>,
    priority: i64,
    customer: &str,
    workflow: &str,
    max_retries: u32,
) -> Result<NewJob, String> {
    let text = match payload.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(PathBuf::from(path))
            .map_err(|e| format!("failed to read the payload file {path}: {e}"))?,
        None => payload.to_owned(),
    };
    let payload: Value = serde_json::from_str(&text).map_err(|e| format!("--payload is not JSON: {e}"))?;
    let requirements = match requirements {
        None => String::new(),
        Some(r) => {
            super::Requirements::parse(r).map_err(|e| format!("--requirements: {e}"))?;
            r.to_owned()
        }
    };
    if service.trim().is_empty() {
        return Err("--service must not be empty".to_owned());
    }
    let mut job = NewJob::new(service.trim(), payload);
    job.requirements = requirements;
    job.priority = priority;
    job.customer_id = customer.to_owned();
    job.workflow_id = workflow.to_owned();
    job.max_retries = max_retries;
    Ok(job)
}

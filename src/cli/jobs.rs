//! `machine jobs ...`: submit, show, list, cancel and claim jobs on the broker's Redis
//! (`HUB_REDIS_URL`, `--redis-url`, else this machine's own), writing exactly what the API
//! writes, so that jobs submitted here are indistinguishable from the API's.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::args::{JobsCommand, RedisArgs};
use super::commands::{Threads, block_on, redis_url};
use super::exit::{CliError, Outcome};
use crate::config::RedisUrl;
use crate::matcher::{Broker, BrokerOptions, CancelOutcome, Capabilities, LeaseStatus, NewJob, Requirements};

/// Runs `machine jobs <command>`.
pub(super) fn jobs(args: &RedisArgs, command: &JobsCommand, machine: Option<RedisUrl>) -> Result<Outcome, CliError> {
    let url = redis_url(args, machine)?;
    match command {
        JobsCommand::Submit {
            service,
            payload,
            requirements,
            priority,
            customer,
            workflow,
            max_retries,
        } => {
            let job = build_job(
                service,
                payload,
                requirements.as_deref(),
                *priority,
                customer,
                workflow,
                *max_retries,
            )
            .map_err(CliError::Usage)?;
            block_on(Threads::One, async {
                let broker = Broker::connect(&url, BrokerOptions::default()).await?;
                println!("{}", broker.submit(&job).await?);
                Ok(Outcome::Success)
            })?
        }
        JobsCommand::Claim {
            service,
            worker,
            capabilities,
            lease_secs,
        } => {
            let caps = match capabilities {
                Some(doc) => serde_json::from_str::<Capabilities>(doc)
                    .map_err(|e| CliError::Usage(format!("--capabilities: {e}")))?,
                None => {
                    let services: Vec<&str> = service.iter().map(String::as_str).collect();
                    Capabilities::new(worker.as_str(), "operator", &services)
                }
            };
            let lease = Duration::from_secs((*lease_secs).max(1));
            block_on(Threads::One, claim_and_hold(&url, caps, lease))?
        }
        JobsCommand::Show { id, json } => block_on(Threads::One, async {
            let broker = Broker::connect(&url, BrokerOptions::default()).await?;
            let Some(view) = broker.show(id).await? else {
                return Err(CliError::Failed(format!("no job {id}")));
            };
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
            Ok(Outcome::Success)
        })?,
        JobsCommand::List { status, limit, json } => block_on(Threads::One, async {
            let broker = Broker::connect(&url, BrokerOptions::default()).await?;
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
            Ok(Outcome::Success)
        })?,
        JobsCommand::Cancel { id } => block_on(Threads::One, async {
            let broker = Broker::connect(&url, BrokerOptions::default()).await?;
            match broker.cancel(id).await? {
                CancelOutcome::Cancelled => {
                    println!("cancelled {id}");
                    Ok(Outcome::Success)
                }
                CancelOutcome::NotFound => Err(CliError::Failed(format!("no job {id}"))),
                CancelOutcome::AlreadyEnded(status) => {
                    Err(CliError::Failed(format!("job {id} already ended ({status})")))
                }
            }
        })?,
    }
}

/// Claims one job as a worker would and holds its lease until SIGINT/SIGTERM, then returns it.
async fn claim_and_hold(url: &RedisUrl, caps: Capabilities, lease: Duration) -> Result<Outcome, CliError> {
    let opts = BrokerOptions {
        lease,
        safety_poll: Duration::from_millis(500),
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
            return Ok(Outcome::Success);
        };
        println!("{}", job.id);
        let _ = std::io::stdout().flush();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    broker.return_job(&job).await?;
                    eprintln!("returned {}", job.id);
                    return Ok(Outcome::Success);
                }
                () = tokio::time::sleep(lease / 3) => match broker.renew_lease(&job).await? {
                    LeaseStatus::Held => {}
                    other => return Err(CliError::Failed(format!("job {} is no longer held: {other:?}", job.id))),
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

/// The job `machine jobs submit` describes, or what is wrong with the description.
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
            Requirements::parse(r).map_err(|e| format!("--requirements: {e}"))?;
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

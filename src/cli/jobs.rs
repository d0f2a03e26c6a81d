//! `machine jobs ...`: submit, show, list, cancel and claim jobs on the broker's Redis
//! (`HUB_REDIS_URL`, `--redis-url`, else this machine's own), writing exactly what the API
//! writes, so that jobs submitted here are indistinguishable from the API's.

use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::args::{JobsCommand, RedisArgs};
use super::common::{Threads, block_on, print_json, redis_url};
use super::exit::{CliError, Outcome};
use crate::broker::{
    Broker, BrokerOptions, Cancellation, Capabilities, JobField, JobRecord, JobState, JobView, LeaseStatus, Meaning,
    NewJob, Requirements,
};
use crate::config::RedisUrl;

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
            block_on(Threads::One, submit(&url, job))?
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
        JobsCommand::Show { id, json } => block_on(Threads::One, show(&url, id, *json))?,
        JobsCommand::List { status, limit, json } => block_on(Threads::One, list(&url, status.clone(), *limit, *json))?,
        JobsCommand::Cancel { id } => block_on(Threads::One, cancel(&url, id))?,
    }
}

/// `jobs submit`: submits `job` and warns when no machine ever offered its service.
async fn submit(url: &RedisUrl, job: NewJob) -> Result<Outcome, CliError> {
    let broker = Broker::connect(url, BrokerOptions::default()).await?;
    println!("{}", broker.submit(&job).await?);
    let offered = broker.offered_services().await?;
    if !offered.contains(&job.service) {
        let known: Vec<&str> = offered.iter().map(String::as_str).collect();
        eprintln!(
            "warning: no machine has ever registered service `{}` (services offered: {}); the job waits until one does",
            job.service,
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        );
    }
    Ok(Outcome::Success)
}

/// `jobs show`.
async fn show(url: &RedisUrl, id: &str, json: bool) -> Result<Outcome, CliError> {
    let broker = Broker::connect(url, BrokerOptions::default()).await?;
    let Some(view) = broker.show(id).await? else {
        return Err(CliError::Failed(format!("no job {id}")));
    };
    if json {
        print_json(&json_view(&view));
    } else {
        print!("{}", render_view(&view));
    }
    Ok(Outcome::Success)
}

/// `jobs list`.
async fn list(url: &RedisUrl, status: Option<JobState>, limit: usize, json: bool) -> Result<Outcome, CliError> {
    let broker = Broker::connect(url, BrokerOptions::default()).await?;
    let jobs = broker.list(status.as_ref(), limit).await?;
    if json {
        print_json(&jobs);
    } else {
        print!("{}", render_list(&jobs));
    }
    Ok(Outcome::Success)
}

/// `jobs cancel`.
async fn cancel(url: &RedisUrl, id: &str) -> Result<Outcome, CliError> {
    let broker = Broker::connect(url, BrokerOptions::default()).await?;
    match broker.cancel(id).await? {
        Cancellation::Cancelled => {
            println!("cancelled {id}");
            Ok(Outcome::Success)
        }
        Cancellation::NotFound => Err(CliError::Failed(format!("no job {id}"))),
        Cancellation::AlreadyEnded(status) => Err(CliError::Failed(format!("job {id} already ended ({status})"))),
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

/// `jobs show --json`: the job, its progress, the result and artifact URLs, all typed.
fn json_view(view: &JobView) -> Value {
    let mut doc = serde_json::json!({
        "job": view.job,
        "progress": view.progress,
        "result": view.result,
        "artifacts": artifact_urls(view.result.as_ref()),
    });
    if let Some(why) = &view.waiting {
        doc["waiting"] = Value::String(why.clone());
    }
    doc
}

/// Every URL in a result (the stored artifacts' and any the connector returned), in order,
/// each once. Outputs kept on the machine (no storage in the job's `ctx`) have `file://` URLs.
fn artifact_urls(result: Option<&Value>) -> Vec<String> {
    fn walk(v: &Value, out: &mut Vec<String>) {
        const SCHEMES: [&str; 3] = ["https://", "http://", "file://"];
        match v {
            Value::String(s) if SCHEMES.iter().any(|p| s.starts_with(p)) && !out.contains(s) => {
                out.push(s.clone());
            }
            Value::Array(items) => items.iter().for_each(|i| walk(i, out)),
            Value::Object(map) => map.values().for_each(|i| walk(i, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    if let Some(r) = result {
        walk(r, &mut out);
    }
    out
}

/// The fields `jobs show` prints first, in this order (what a job is and where it stands);
/// the others follow alphabetically.
const FIRST_FIELDS: &[&str] = &[
    "id",
    "status",
    "service_required",
    "worker_id",
    "priority",
    "customer_id",
    "workflow_id",
    "retry_count",
    "max_retries",
    "created_at",
    "assigned_at",
    "started_at",
    "completed_at",
    "failed_at",
    "cancelled_at",
    "processing_time",
];

/// A job field's value as `jobs show` prints it: the status a cancelled job has for an
/// operator (the API stores it as `failed`), retries as `submit --max-retries` counts them
/// (the hash counts attempts), a time with its unit.
fn shown_value(field: &JobField<'_>) -> String {
    match &field.meaning {
        Meaning::State(state) => state.name().to_owned(),
        Meaning::Attempts(attempts) => format!("{} ({attempts} attempts in all)", attempts.saturating_sub(1)),
        Meaning::Took(took) => super::status_view::duration(*took),
        Meaning::Plain | Meaning::Payload | Meaning::Error => field.text.to_owned(),
    }
}

/// `jobs show`: the job's fields (status first, none empty), then what the operator came for:
/// why it waits, its progress, why it failed, its result and its artifacts.
fn render_view(view: &JobView) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let mut fields: Vec<JobField<'_>> = view.job.fields().collect();
    // Stable: the fields not in `FIRST_FIELDS` keep their alphabetical order.
    fields.sort_by_key(|f| {
        FIRST_FIELDS
            .iter()
            .position(|n| *n == f.name)
            .unwrap_or(FIRST_FIELDS.len())
    });
    let mut payload = None;
    let mut error = None;
    for f in fields {
        match f.meaning {
            Meaning::Payload => payload = Some(f.value),
            Meaning::Error => error = Some(f.text).filter(|e| !e.is_empty()),
            _ if f.text.trim().is_empty() => {}
            _ => {
                let _ = writeln!(out, "{:<20} {}", f.name, shown_value(&f));
            }
        }
    }
    if let Some(payload) = payload {
        let _ = writeln!(out, "{:<20} {}", "payload", pretty(&payload));
    }
    if let Some(why) = &view.waiting {
        let _ = writeln!(out, "{:<20} {why}", "waiting");
    }
    let progress: Vec<_> = view.progress.fields().filter(|f| !f.text.trim().is_empty()).collect();
    if !progress.is_empty() {
        let _ = writeln!(out, "progress:");
        for f in progress {
            let _ = writeln!(out, "  {:<18} {}", f.name, f.text);
        }
    }
    if let Some(error) = error {
        let _ = writeln!(out, "{:<20} {error}", "error");
    }
    if let Some(result) = &view.result {
        let _ = writeln!(out, "result:\n{}", indent(&pretty(result)));
    }
    let urls = artifact_urls(view.result.as_ref());
    if !urls.is_empty() {
        let _ = writeln!(out, "artifacts:");
        for u in urls {
            let _ = writeln!(out, "  {u}");
        }
    }
    out
}

/// `jobs list`: one line per job; the id column is as wide as an id, so ids never misalign.
fn render_list(jobs: &[JobRecord]) -> String {
    use std::fmt::Write as _;
    let mut out = format!(
        "{:<36}  {:<12}  {:<14}  {:>8}  {:<24}  WORKER\n",
        "ID", "STATUS", "SERVICE", "PRIORITY", "CREATED"
    );
    for j in jobs {
        let _ = writeln!(
            out,
            "{:<36}  {:<12}  {:<14}  {:>8}  {:<24}  {}",
            j.id(),
            j.state().name(),
            j.service(),
            j.priority(),
            j.created_at(),
            j.worker_id()
        );
    }
    out
}

fn pretty(v: &Value) -> String {
    serde_json::to_string_pretty(v).unwrap_or_default()
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n")
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
    // The contract's `max_retries` counts attempts (a job fails for good once `retry_count`
    // reaches it); the flag counts retries after the first attempt.
    job.max_retries = max_retries.saturating_add(1);
    Ok(job)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::broker::{CANCEL_ERROR, JobProgress};

    #[test]
    fn every_url_of_a_result_once() {
        let result = serde_json::json!({
            "image_url": "https://cdn/a.png",
            "images": ["https://cdn/a.png", "https://cdn/b.png"],
            "artifacts": [{"name": "a.png", "url": "https://cdn/a.png"}, {"name": "c.png", "url": "file:///ws/outputs/j/c.png"}],
            "note": "not a url"
        });
        assert_eq!(
            artifact_urls(Some(&result)),
            ["https://cdn/a.png", "file:///ws/outputs/j/c.png", "https://cdn/b.png"]
        );
    }

    #[test]
    fn max_retries_counts_retries_after_the_first_attempt() {
        let job = build_job("simulation", "{}", None, 50, "", "", 0).expect("a job");
        assert_eq!(job.max_retries, 1, "no retry: one attempt");
        let job = build_job("simulation", "{}", None, 50, "", "", 2).expect("a job");
        assert_eq!(job.max_retries, 3, "the API's default");
    }

    #[test]
    fn show_leads_with_the_status_and_says_what_was_given() {
        let job = JobRecord::new(BTreeMap::from(
            [
                ("id", "j1"),
                ("status", "failed"),
                ("error", CANCEL_ERROR),
                ("service_required", "simulation"),
                ("max_retries", "3"),
                ("retry_count", "0"),
                ("processing_time", "2001"),
                ("workflow_id", ""),
                ("assigned_at", "2026-01-01T00:00:00.000Z"),
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned())),
        ));
        let view = JobView {
            job,
            progress: JobProgress::new(BTreeMap::from([("message".to_owned(), String::new())])),
            waiting: None,
            result: None,
        };
        let text = render_view(&view);
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].starts_with("id ") && lines[1].starts_with("status "), "{text}");
        assert!(lines[1].ends_with(" cancelled"), "{text}");
        assert!(text.contains("max_retries          2 (3 attempts in all)\n"), "{text}");
        assert!(text.contains("processing_time      2s\n"), "{text}");
        assert!(
            !text.contains("workflow_id") && !text.contains("progress:"),
            "no empty field: {text}"
        );
    }
}

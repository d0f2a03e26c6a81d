//! `machine jobs ...`: submit, show, list, cancel and claim jobs on the broker's Redis
//! (`HUB_REDIS_URL`, `--redis-url`, else this machine's own), writing exactly what the API
//! writes, so that jobs submitted here are indistinguishable from the API's.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use super::args::{JobStatus, JobsCommand, RedisArgs};
use super::commands::{Threads, block_on, print_json, redis_url};
use super::exit::{CliError, Outcome};
use crate::broker::{
    Broker, BrokerOptions, CANCEL_ERROR, CancelOutcome, Capabilities, JobView, LeaseStatus, NewJob, Requirements,
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
            block_on(Threads::One, async {
                let broker = Broker::connect(&url, BrokerOptions::default()).await?;
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
                print_json(&typed_view(&view));
            } else {
                print!("{}", render_view(&view));
            }
            Ok(Outcome::Success)
        })?,
        JobsCommand::List { status, limit, json } => block_on(Threads::One, async {
            let broker = Broker::connect(&url, BrokerOptions::default()).await?;
            // `cancelled` and `failed` are told apart by the error the API writes, so the
            // filter is applied here rather than by the status field alone.
            let jobs: Vec<_> = broker
                .list(None, usize::MAX)
                .await?
                .into_iter()
                .filter(|j| status.is_none_or(|s| s.matches(j)))
                .take(*limit)
                .collect();
            if *json {
                print_json(&jobs.iter().map(typed_job).collect::<Vec<_>>());
            } else {
                print!("{}", render_list(&jobs));
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

/// Job hash fields that hold numbers.
const NUMBER_FIELDS: &[&str] = &[
    "priority",
    "retry_count",
    "max_retries",
    "workflow_priority",
    "workflow_datetime",
    "current_step",
    "total_steps",
    "step_number",
    "processing_time",
    "progress",
];

/// Job hash fields that hold JSON documents.
const JSON_FIELDS: &[&str] = &["payload", "requirements", "ctx", "result"];

impl JobStatus {
    /// Whether the job hash `job` has this status. The API stores a cancelled job as `failed`
    /// with its cancel error, so `cancelled` finds those and `failed` leaves them out.
    pub(super) fn matches(self, job: &BTreeMap<String, String>) -> bool {
        let status = job.get("status").map_or("", String::as_str);
        let cancelled =
            status == "cancelled" || (status == "failed" && job.get("error").is_some_and(|e| e == CANCEL_ERROR));
        match self {
            JobStatus::Cancelled => cancelled,
            JobStatus::Failed => status == "failed" && !cancelled,
            other => status == other.name(),
        }
    }

    /// The contract's word for the status.
    fn name(self) -> &'static str {
        match self {
            JobStatus::Pending => "pending",
            JobStatus::Queued => "queued",
            JobStatus::Assigned => "assigned",
            JobStatus::Accepted => "accepted",
            JobStatus::InProgress => "in_progress",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
            JobStatus::Timeout => "timeout",
            JobStatus::Unworkable => "unworkable",
        }
    }
}

/// A stored field's text as the value it stands for: numbers as numbers, JSON documents as
/// JSON (an empty one as null); text that does not read as its kind stays text.
fn typed(field: &str, text: &str) -> Value {
    if NUMBER_FIELDS.contains(&field) {
        if let Ok(n) = text.trim().parse::<i64>() {
            return Value::from(n);
        }
        if let Some(n) = text.trim().parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
            return Value::Number(n);
        }
    } else if JSON_FIELDS.contains(&field) {
        if text.trim().is_empty() {
            return Value::Null;
        }
        if let Ok(v) = serde_json::from_str(text) {
            return v;
        }
    }
    Value::String(text.to_owned())
}

/// A job hash with typed values.
fn typed_job(job: &BTreeMap<String, String>) -> Value {
    Value::Object(job.iter().map(|(k, v)| (k.clone(), typed(k, v))).collect())
}

/// `jobs show --json`: the job, its progress, the result and artifact URLs, all typed.
fn typed_view(view: &JobView) -> Value {
    let mut doc = serde_json::json!({
        "job": typed_job(&view.job),
        "progress": typed_job(&view.progress),
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
fn shown_value(job: &BTreeMap<String, String>, field: &str, value: &str) -> String {
    match field {
        "status" if JobStatus::Cancelled.matches(job) => "cancelled".to_owned(),
        "max_retries" => match value.trim().parse::<u64>() {
            Ok(attempts) => format!("{} ({attempts} attempts in all)", attempts.saturating_sub(1)),
            Err(_) => value.to_owned(),
        },
        "processing_time" => match value.trim().parse::<u64>() {
            Ok(ms) => super::status_view::duration(Duration::from_millis(ms)),
            Err(_) => value.to_owned(),
        },
        _ => value.to_owned(),
    }
}

/// `jobs show`: the job's fields (status first, none empty), then what the operator came for:
/// why it waits, its progress, why it failed, its result and its artifacts.
fn render_view(view: &JobView) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let rest = view.job.keys().filter(|k| !FIRST_FIELDS.contains(&k.as_str()));
    for k in FIRST_FIELDS.iter().copied().chain(rest.map(String::as_str)) {
        let Some(v) = view.job.get(k).filter(|v| !v.trim().is_empty()) else {
            continue;
        };
        if k == "payload" || k == "error" {
            continue;
        }
        let _ = writeln!(out, "{k:<20} {}", shown_value(&view.job, k, v));
    }
    if let Some(payload) = view.job.get("payload") {
        let _ = writeln!(out, "{:<20} {}", "payload", pretty(&typed("payload", payload)));
    }
    if let Some(why) = &view.waiting {
        let _ = writeln!(out, "{:<20} {why}", "waiting");
    }
    let progress: Vec<_> = view.progress.iter().filter(|(_, v)| !v.trim().is_empty()).collect();
    if !progress.is_empty() {
        let _ = writeln!(out, "progress:");
        for (k, v) in progress {
            let _ = writeln!(out, "  {k:<18} {v}");
        }
    }
    if let Some(error) = view.job.get("error").filter(|e| !e.is_empty()) {
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
fn render_list(jobs: &[BTreeMap<String, String>]) -> String {
    use std::fmt::Write as _;
    let get = |j: &BTreeMap<String, String>, k: &str| j.get(k).cloned().unwrap_or_default();
    let mut out = format!(
        "{:<36}  {:<12}  {:<14}  {:>8}  {:<24}  WORKER\n",
        "ID", "STATUS", "SERVICE", "PRIORITY", "CREATED"
    );
    for j in jobs {
        let status = if JobStatus::Cancelled.matches(j) {
            "cancelled".to_owned()
        } else {
            get(j, "status")
        };
        let _ = writeln!(
            out,
            "{:<36}  {:<12}  {:<14}  {:>8}  {:<24}  {}",
            get(j, "id"),
            status,
            get(j, "service_required"),
            get(j, "priority"),
            get(j, "created_at"),
            get(j, "worker_id")
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
    use super::*;

    #[test]
    fn stored_text_becomes_typed_values() {
        let job = BTreeMap::from([
            ("id".to_owned(), "0042".to_owned()),
            ("priority".to_owned(), "50".to_owned()),
            ("payload".to_owned(), r#"{"steps":3}"#.to_owned()),
            ("requirements".to_owned(), String::new()),
            ("customer_id".to_owned(), "7".to_owned()),
        ]);
        assert_eq!(
            typed_job(&job),
            serde_json::json!({"id": "0042", "priority": 50, "payload": {"steps": 3}, "requirements": null, "customer_id": "7"})
        );
    }

    #[test]
    fn cancelled_jobs_are_not_failures() {
        let job = |status: &str, error: &str| {
            BTreeMap::from([
                ("status".to_owned(), status.to_owned()),
                ("error".to_owned(), error.to_owned()),
            ])
        };
        assert!(JobStatus::Cancelled.matches(&job("failed", CANCEL_ERROR)));
        assert!(!JobStatus::Failed.matches(&job("failed", CANCEL_ERROR)));
        assert!(JobStatus::Failed.matches(&job("failed", "boom")));
        assert!(JobStatus::InProgress.matches(&job("in_progress", "")));
    }

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
        let job = BTreeMap::from(
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
        );
        let view = JobView {
            job,
            progress: BTreeMap::from([("message".to_owned(), String::new())]),
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

//! What operators (`machine jobs`) and tests do the way the API does: submit, cancel, show
//! (with why a waiting job waits) and list jobs.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde_json::Value;

use super::record::{JobProgress, JobRecord, JobState};
use super::reply::Reply;
use super::{Broker, redis_err, scan};
use crate::broker::reference::{PendingJob, job_matches};
use crate::broker::{BrokerError, CANCEL_ERROR};

/// What cancelling a job did ([`Broker::cancel`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Cancellation {
    /// The job was cancelled as the API does it.
    Cancelled,
    /// No such job.
    NotFound,
    /// The job had already ended with this status.
    AlreadyEnded(String),
}

/// A job to submit the way the API does.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// `service_required`.
    pub service: String,
    /// `payload`.
    pub payload: Value,
    /// `requirements`, stored verbatim (empty for none).
    pub requirements: String,
    /// `priority` (default 50).
    pub priority: i64,
    /// `customer_id` ("" for none).
    pub customer_id: String,
    /// `workflow_id` ("" for none).
    pub workflow_id: String,
    /// `workflow_priority`, when the job is a workflow step.
    pub workflow_priority: Option<i64>,
    /// `workflow_datetime` (epoch ms), when the job is a workflow step.
    pub workflow_datetime: Option<i64>,
    /// `max_retries` (default 3).
    pub max_retries: u32,
}

impl NewJob {
    /// A job for `service` with the API's defaults.
    pub fn new(service: impl Into<String>, payload: Value) -> Self {
        Self {
            service: service.into(),
            payload,
            requirements: String::new(),
            priority: 50,
            customer_id: String::new(),
            workflow_id: String::new(),
            workflow_priority: None,
            workflow_datetime: None,
            max_retries: 3,
        }
    }
}

/// The contract's score: `effective_priority * 1e15 - floor(effective_time_ms / 1000)`, the
/// effective values chosen as the API does with JS `||`: a workflow priority or time of 0 falls
/// back to the job's own.
pub fn pending_score(priority: i64, workflow_priority: Option<i64>, created_ms: i64, workflow_ms: Option<i64>) -> f64 {
    let p = workflow_priority.filter(|p| *p != 0).unwrap_or(priority) as f64;
    let t = workflow_ms.filter(|t| *t != 0).unwrap_or(created_ms) as f64;
    p * 1e15 - (t / 1000.0).floor()
}

/// A job and its progress, as `machine jobs show` prints them.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct JobView {
    /// `job:<id>`.
    pub job: JobRecord,
    /// `job:<id>:progress`.
    pub progress: JobProgress,
    /// For a job still waiting: why no registered worker took it, or how many could.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
    /// For a completed job: its result (`data` of its `jobs:completed` record), while the
    /// record is kept.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Value>,
}

impl Broker {
    /// Submits a job exactly as the API does: the job hash, `jobs:pending` with the contract's
    /// score, and `job_submitted`. Returns the job id.
    pub async fn submit(&self, job: &NewJob) -> Result<String, BrokerError> {
        let id = new_job_id();
        let created = SystemTime::now();
        let created_ms = i64::try_from(crate::clock::epoch_ms(created)).unwrap_or(i64::MAX);
        let created_at = humantime::format_rfc3339_millis(created).to_string();
        let score = pending_score(job.priority, job.workflow_priority, created_ms, job.workflow_datetime);
        let mut fields: Vec<(&str, String)> = vec![
            ("id", id.clone()),
            ("service_required", job.service.clone()),
            ("priority", job.priority.to_string()),
            ("payload", job.payload.to_string()),
            ("requirements", job.requirements.clone()),
            ("customer_id", job.customer_id.clone()),
            ("created_at", created_at),
            ("status", "pending".to_owned()),
            ("retry_count", "0".to_owned()),
            ("max_retries", job.max_retries.to_string()),
            ("workflow_id", job.workflow_id.clone()),
        ];
        if let Some(p) = job.workflow_priority {
            fields.push(("workflow_priority", p.to_string()));
        }
        if let Some(t) = job.workflow_datetime {
            fields.push(("workflow_datetime", t.to_string()));
        }
        let message = serde_json::json!({
            "job_id": id,
            "service_required": job.service,
            "priority": job.priority,
            "requirements": job.requirements,
            "customer_id": job.customer_id,
            "workflow_id": job.workflow_id,
            "timestamp": created_ms,
        });
        let mut conn = self.connection();
        redis::pipe()
            .atomic()
            .zadd(self.key("jobs:pending"), &id, score)
            .ignore()
            .hset_multiple(self.key(&format!("job:{id}")), &fields)
            .ignore()
            .publish(self.key("job_submitted"), message.to_string())
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err("submit job"))?;
        Ok(id)
    }

    /// Cancels a job the way the API does (`failed`, "Job cancelled by user", `cancel_job`).
    pub async fn cancel(&self, job_id: &str) -> Result<Cancellation, BrokerError> {
        let r: String = self
            .call("cancelJob", &[&self.inner.opts.key_prefix, job_id, CANCEL_ERROR])
            .await?;
        Ok(match Reply::parse("cancelJob", &r)? {
            Reply::Cancelled => Cancellation::Cancelled,
            Reply::NotFound => Cancellation::NotFound,
            Reply::AlreadyEnded(status) => Cancellation::AlreadyEnded(status),
            other => {
                return Err(BrokerError::Protocol {
                    op: "cancelJob",
                    detail: format!("unexpected reply {other:?}"),
                });
            }
        })
    }

    /// The job hash and its progress hash; `None` when the job does not exist.
    pub async fn show(&self, job_id: &str) -> Result<Option<JobView>, BrokerError> {
        let mut conn = self.connection();
        let (job, progress, completed): (BTreeMap<String, String>, BTreeMap<String, String>, Option<String>) =
            redis::pipe()
                .hgetall(self.key(&format!("job:{job_id}")))
                .hgetall(self.key(&format!("job:{job_id}:progress")))
                .hget(self.key("jobs:completed"), job_id)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("show job"))?;
        if job.is_empty() {
            return Ok(None);
        }
        let job = JobRecord::new(job);
        let waiting = if job.state().is_waiting() {
            Some(
                self.why_waiting(job_id, job.stored())
                    .await
                    .unwrap_or_else(|e| format!("cannot tell which workers could run it: {e}")),
            )
        } else {
            None
        };
        let result = completed
            .and_then(|r| serde_json::from_str::<Value>(&r).ok())
            .and_then(|mut r| r.get_mut("data").map(Value::take));
        Ok(Some(JobView {
            job,
            progress: JobProgress::new(progress),
            waiting,
            result,
        }))
    }

    /// Every service a worker of this broker's Redis has ever registered (what `machine jobs
    /// submit` checks a new job's service against): the set our registrations add to, and the
    /// services in the capabilities of every worker registered now (an original worker's too).
    pub async fn offered_services(&self) -> Result<std::collections::BTreeSet<String>, BrokerError> {
        let mut conn = self.connection();
        let mut offered: std::collections::BTreeSet<String> = redis::cmd("SMEMBERS")
            .arg(self.key(super::registry::OFFERED_SERVICES))
            .query_async(&mut conn)
            .await
            .map_err(redis_err("offered services"))?;
        let pattern = self.key("worker:*");
        let prefix_len = pattern.len() - 1;
        let mut keys = scan(&mut conn, &pattern, "SCAN").await?;
        keys.retain(|k| k.get(prefix_len..).is_some_and(|id| !id.contains(':')));
        if keys.is_empty() {
            return Ok(offered);
        }
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.hget(k, "capabilities");
        }
        let caps: Vec<Option<String>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(redis_err("offered services"))?;
        for doc in caps
            .iter()
            .flatten()
            .filter_map(|c| serde_json::from_str::<Value>(c).ok())
        {
            for key in ["job_service_required_map", "services"] {
                let names = doc.get(key).and_then(Value::as_array).into_iter().flatten();
                offered.extend(names.filter_map(Value::as_str).map(str::to_owned));
            }
        }
        Ok(offered)
    }

    /// Why a waiting job waits: its retry delay, a service no worker ever offered, or which
    /// registered workers (`worker:*` with capabilities) could run it and whether those may
    /// claim now (their machine's status message says which are held, e.g. quarantined).
    async fn why_waiting(&self, job_id: &str, job: &BTreeMap<String, String>) -> Result<String, BrokerError> {
        let mut conn = self.connection();
        let delayed_until: Option<f64> = redis::cmd("ZSCORE")
            .arg(self.key("jobs:idx:delayed"))
            .arg(job_id)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("show job"))?;
        let now = crate::clock::now_ms();
        if let Some(until) = delayed_until.filter(|u| *u > now as f64) {
            return Ok(format!(
                "it waits out its retry delay after attempt {} of {}: claimable in {}s",
                job.get("retry_count").map_or("?", String::as_str),
                job.get("max_retries").map_or("?", String::as_str),
                ((until - now as f64) / 1000.0).ceil()
            ));
        }
        let field = |k: &str| job.get(k).cloned().unwrap_or_default();
        let service = Some(field("service_required"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| field("job_type"));
        if !self.offered_services().await?.contains(&service) {
            return Ok(format!(
                "no machine offers service `{service}`: no worker has ever registered it"
            ));
        }
        let pattern = self.key("worker:*");
        let prefix_len = pattern.len() - 1;
        let mut keys = scan(&mut conn, &pattern, "SCAN").await?;
        // `worker:<id>` only, not the `worker:<id>:...` keys beside it.
        keys.retain(|k| k.get(prefix_len..).is_some_and(|id| !id.contains(':')));
        if keys.is_empty() {
            return Ok("no worker is registered: no machine is running, or none has reached Redis".to_owned());
        }
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.hget(k, "capabilities");
        }
        let caps: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(redis_err("show job"))?;
        let pending = PendingJob {
            id: job_id.to_owned(),
            score: 0.0,
            created_ms: 0,
            seq: 0,
            service: service.clone(),
            requirements: field("requirements"),
            customer_id: field("customer_id"),
            workflow_id: field("workflow_id"),
            payload: field("payload"),
            held_off_worker: None,
        };
        let workers: Vec<Value> = caps
            .into_iter()
            .flatten()
            .filter_map(|c| serde_json::from_str(&c).ok())
            .collect();
        let accepting = workers
            .iter()
            .filter(|w| {
                ["job_service_required_map", "services"].iter().any(|k| {
                    w.get(*k)
                        .and_then(Value::as_array)
                        .is_some_and(|l| l.iter().any(|s| s.as_str() == Some(service.as_str())))
                })
            })
            .count();
        let able: Vec<&Value> = workers.iter().filter(|w| job_matches(w, &pending)).collect();
        if accepting == 0 {
            return Ok(format!(
                "no registered worker accepts service `{service}` ({} workers registered)",
                workers.len()
            ));
        }
        if able.is_empty() {
            return Ok(format!(
                "{accepting} registered workers accept `{service}`, but none meets the job's requirements, customer or workflow"
            ));
        }
        let presence = self.presence(&able, &service, &field("customer_id")).await?;
        Ok(waiting_for(&presence))
    }

    /// What each worker's machine last said of it: held (with the reason), holding back jobs
    /// of `service` or `customer` for a daily quota, busy or free. A worker whose machine's
    /// status message is gone counts as free: nothing says otherwise.
    async fn presence(
        &self,
        workers: &[&Value],
        service: &str,
        customer: &str,
    ) -> Result<Vec<(String, Presence)>, BrokerError> {
        let field = |w: &Value, k: &str| w.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
        let mut machines: BTreeMap<String, Value> = BTreeMap::new();
        let mut conn = self.connection();
        let now = crate::clock::now_ms();
        for w in workers {
            let machine = field(w, "machine_id");
            if machines.contains_key(&machine) {
                continue;
            }
            let raw: Option<String> = redis::cmd("GET")
                .arg(self.key(&format!("machine:{machine}:status")))
                .query_async(&mut conn)
                .await
                .map_err(redis_err("show job"))?;
            let doc = raw.and_then(|r| serde_json::from_str(&r).ok()).unwrap_or(Value::Null);
            machines.insert(machine, doc);
        }
        Ok(workers
            .iter()
            .map(|w| {
                let id = field(w, "worker_id");
                let said = &machines[&field(w, "machine_id")]["status"]["workers"][id.as_str()];
                let quota = said["quota_waits"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|q| serde_json::from_value::<QuotaWaitSaid>(q.clone()).ok())
                    .find(|q| q.until_ms > now && q.covers(service, customer));
                let presence = match (said["reason"].as_str(), quota, said["status"].as_str()) {
                    (Some(reason), _, _) => Presence::Held(reason.to_owned()),
                    (None, Some(q), _) => Presence::Quota {
                        reason: q.reason,
                        resets_in_s: (q.until_ms - now).div_ceil(1000),
                    },
                    (None, None, Some("busy")) => Presence::Busy,
                    _ => Presence::Free,
                };
                (id, presence)
            })
            .collect())
    }

    /// How many jobs wait for each of `services`, claimable now: the sizes of the matching
    /// index's groups of the service (retries waiting out their delay are not counted). At most
    /// one `SSCAN` step of a service's groups is read, so a sample costs a bounded number of
    /// commands whatever the queue holds (with very many groups the figure is a lower bound).
    pub async fn queue_depth(&self, services: &[String]) -> Result<Vec<(String, u64)>, BrokerError> {
        let mut conn = self.connection();
        let mut pipe = redis::pipe();
        for service in services {
            pipe.cmd("SSCAN")
                .arg(self.key(&format!("jobs:idx:svc:{service}")))
                .arg(0)
                .arg("COUNT")
                .arg(256);
        }
        let scans: Vec<(u64, Vec<String>)> = pipe.query_async(&mut conn).await.map_err(redis_err("SSCAN"))?;
        let mut pipe = redis::pipe();
        for (_, groups) in &scans {
            for gid in groups {
                pipe.zcard(self.key(&format!("jobs:idx:g:{gid}")));
            }
        }
        let sizes: Vec<u64> = if scans.iter().all(|(_, groups)| groups.is_empty()) {
            Vec::new()
        } else {
            pipe.query_async(&mut conn).await.map_err(redis_err("ZCARD"))?
        };
        let mut sizes = sizes.into_iter();
        Ok(services
            .iter()
            .zip(&scans)
            .map(|(service, (_, groups))| (service.clone(), sizes.by_ref().take(groups.len()).sum()))
            .collect())
    }

    /// Jobs, optionally only those in `state`, newest first, at most `limit`.
    pub async fn list(&self, state: Option<&JobState>, limit: usize) -> Result<Vec<JobRecord>, BrokerError> {
        let mut conn = self.connection();
        let pattern = self.key("job:*");
        let mut keys = scan(&mut conn, &pattern, "SCAN").await?;
        keys.retain(|k| !k.ends_with(":progress"));
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.hgetall(k);
        }
        let hashes: Vec<BTreeMap<String, String>> =
            pipe.query_async(&mut conn).await.map_err(redis_err("list jobs"))?;
        let mut jobs: Vec<JobRecord> = hashes
            .into_iter()
            .filter(|h| !h.is_empty())
            .map(JobRecord::new)
            .filter(|j| state.is_none_or(|s| j.state() == *s))
            .collect();
        jobs.sort_by(|a, b| b.created_at().cmp(a.created_at()));
        jobs.truncate(limit);
        Ok(jobs)
    }
}

fn new_job_id() -> String {
    let b: u128 = rand::random();
    // A version-4 UUID, as the API generates.
    let b = (b & !(0xF000u128 << 64) | (0x4000u128 << 64)) & !(0xC000u128 << 48) | (0x8000u128 << 48);
    let h = format!("{b:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Work a daily quota holds back from a worker, as its machine's status message says it
/// (`status.workers.<id>.quota_waits[]`, written by the worker).
#[derive(Debug, serde::Deserialize)]
struct QuotaWaitSaid {
    #[serde(default)]
    services: Vec<String>,
    #[serde(default)]
    customer: Option<String>,
    reason: String,
    until_ms: u64,
}

impl QuotaWaitSaid {
    fn covers(&self, service: &str, customer: &str) -> bool {
        self.services.iter().any(|s| s == service)
            || self.customer.as_deref().is_some_and(|c| !c.is_empty() && c == customer)
    }
}

/// What a worker that could run a waiting job is doing, as its machine last said.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Presence {
    /// It may not claim: quarantined, its GPU faulted, ... (the reason).
    Held(String),
    /// It claims other work, not this job's: a daily quota holds it back until it resets.
    Quota {
        /// The limiter's words.
        reason: String,
        /// Seconds until the quota resets.
        resets_in_s: u64,
    },
    /// It runs a job.
    Busy,
    /// It may claim.
    Free,
}

/// Why a job that `workers` could run still waits, as an operator needs to read it.
fn waiting_for(workers: &[(String, Presence)]) -> String {
    let held: Vec<String> = workers
        .iter()
        .filter_map(|(id, p)| match p {
            Presence::Held(reason) => Some(format!("{id} ({reason})")),
            Presence::Quota { reason, resets_in_s } => Some(format!(
                "{id} (waits for a daily quota to reset in {}: {reason})",
                humantime::format_duration(std::time::Duration::from_secs(*resets_in_s))
            )),
            _ => None,
        })
        .collect();
    let busy = workers.iter().filter(|(_, p)| *p == Presence::Busy).count();
    let free = workers.len() - held.len() - busy;
    if held.len() == workers.len() {
        return format!(
            "the only registered workers that can run it may not claim now: {}",
            held.join("; ")
        );
    }
    let mut text = format!("{} registered workers can run it", workers.len());
    if free > 0 {
        text.push_str(&format!("; {free} of them free, so the next claim should take it"));
    } else {
        text.push_str(&format!("; it waits for one of the {busy} busy to be free"));
    }
    if !held.is_empty() {
        text.push_str(&format!("; held: {}", held.join("; ")));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_follows_the_contract() {
        // Higher priority wins; within a priority the older job wins.
        let old = pending_score(50, None, 1_750_000_000_000, None);
        let new = pending_score(50, None, 1_750_000_100_000, None);
        assert!(old > new);
        assert!(pending_score(60, None, 1_750_000_100_000, None) > old);
        // A workflow's priority and start time replace the job's own.
        assert_eq!(
            pending_score(10, Some(70), 1_750_000_100_000, Some(1_750_000_000_999)),
            70.0 * 1e15 - 1_750_000_000.0
        );
    }

    #[test]
    fn job_ids_are_uuid_v4() {
        let id = new_job_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }

    #[test]
    fn why_a_job_waits_says_who_may_not_claim() {
        let held = |r: &str| Presence::Held(r.to_owned());
        let only_held = waiting_for(&[("w1".into(), held("quarantined for 5m 0s"))]);
        assert_eq!(
            only_held,
            "the only registered workers that can run it may not claim now: w1 (quarantined for 5m 0s)"
        );
        let busy = waiting_for(&[("w1".into(), Presence::Busy), ("w2".into(), held("gpu faulted"))]);
        assert!(
            busy.contains("waits for one of the 1 busy") && busy.contains("held: w2 (gpu faulted)"),
            "{busy}"
        );
        let free = waiting_for(&[("w1".into(), Presence::Free)]);
        assert!(free.contains("1 of them free"), "{free}");
        // A worker that claims other work but holds this job back for a daily quota is not
        // "free": it is named with the quota and when it resets.
        let quota = Presence::Quota {
            reason: "the openai API's daily quota of 2 requests is used up".into(),
            resets_in_s: 3600,
        };
        let waiting = waiting_for(&[("w1".into(), quota)]);
        assert_eq!(
            waiting,
            "the only registered workers that can run it may not claim now: w1 (waits for a daily \
             quota to reset in 1h: the openai API's daily quota of 2 requests is used up)"
        );
    }
}

//! The fenced lifecycle writes of a claimed job (start, progress, complete, fail, return,
//! defer, lease renewal) and the reaper of expired leases.

use std::time::Duration;

use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::reply::Reply;
use super::{Broker, ClaimedJob};
use crate::broker::BrokerError;

/// What one attempt of a job used at a paid API, as [`Broker::record_usage`] adds it to the
/// job's `usage_*` totals.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttemptUsage<'a> {
    /// Requests the API accepted.
    pub requests: u64,
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// Predict / execution time the API reported, in seconds.
    pub predict_seconds: f64,
    /// The cost from the price table.
    pub cost: f64,
    /// The price table's currency.
    pub currency: &'a str,
}

/// What renewing a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// The worker still holds the job; the lease was extended.
    Held,
    /// The job was cancelled: stop and discard the result.
    Cancelled,
    /// The job is no longer this worker's (lease expired and re-queued, or re-assigned).
    Lost,
}

/// What a failure reported with [`Broker::fail`] led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Back in the queue with its original score (`retry_count` + 1).
    Retried,
    /// Failed for good.
    Failed,
}

/// Whose fault it is that a claimed job is given back unfinished ([`Broker::return_for_fault`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// The machine's own: refused store credentials, a store outage, a GPU fault. The job keeps
    /// its retries and its place and is claimable at once.
    Machine,
    /// The job's service crashed or stalled while running it. The first time (on any machine)
    /// it is a [`Fault::Machine`] return; the second time the job is suspected of bringing its
    /// service down, and it fails as [`Broker::fail`] with a retryable error does.
    Service,
}

/// Where a job given back with [`Broker::return_for_fault`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Back in the queue in its place, no retry spent, claimable at once (this worker included).
    Returned,
    /// A second service fault: counted as the job's own failure, back in the queue after the
    /// retry delay (`retry_count` + 1, this worker held off).
    Retried,
    /// Failed for good: returned more than five times for machines' faults (the error lists
    /// their reasons), or a second service fault on its last retry.
    Failed,
}

/// What the reaper did in one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Jobs whose lease expired and that went back to the queue.
    pub requeued: u64,
    /// Jobs whose lease expired on their last attempt and failed for good.
    pub failed: u64,
    /// Lease records of jobs that had already ended (cancelled, ...), removed.
    pub cleaned: u64,
}

impl Broker {
    /// Calls a fenced lifecycle function for `job`; the fence's `cancelled` and `lost` become
    /// [`BrokerError::Cancelled`] and [`BrokerError::LeaseLost`], any other word is returned.
    async fn lifecycle(&self, function: &'static str, job: &ClaimedJob, args: &[&str]) -> Result<Reply, BrokerError> {
        let mut all = Vec::with_capacity(3 + args.len());
        all.extend_from_slice(&[
            self.inner.opts.key_prefix.as_str(),
            job.id.as_str(),
            job.worker_id.as_str(),
        ]);
        all.extend_from_slice(args);
        let word: String = self.call(function, &all).await?;
        match Reply::parse(function, &word)? {
            Reply::Cancelled => Err(BrokerError::Cancelled { job_id: job.id.clone() }),
            Reply::Lost => Err(BrokerError::LeaseLost {
                job_id: job.id.clone(),
                worker_id: job.worker_id.clone(),
            }),
            reply => Ok(reply),
        }
    }

    /// Marks the job `in_progress`.
    pub async fn start(&self, job: &ClaimedJob) -> Result<(), BrokerError> {
        self.lifecycle("startJob", job, &[]).await.map(drop)
    }

    /// Reports progress (0-100, rounded to a whole percentage); `step` is (current_step,
    /// total_steps), else the job's own.
    pub async fn progress(
        &self,
        job: &ClaimedJob,
        pct: f64,
        message: &str,
        step: Option<(u32, u32)>,
    ) -> Result<(), BrokerError> {
        // Whole percentages: the API and monitor show them as they are, and 33.333333333333336
        // helps nobody (nor does NaN, which no JSON reader takes).
        let pct = if pct.is_nan() { 0.0 } else { pct };
        let pct = format!("{}", pct.clamp(0.0, 100.0).round());
        let (current, total) = match step {
            Some((c, t)) => (c.to_string(), t.to_string()),
            None => (
                job.field("current_step").unwrap_or_default().to_owned(),
                job.field("total_steps").unwrap_or_default().to_owned(),
            ),
        };
        if self.inner.opts.progress_stream {
            // The stream's entry names each field: the library's own form writes it.
            return self
                .lifecycle("updateJobProgress", job, &[&pct, message, &current, &total, "1"])
                .await
                .map(drop);
        }
        // update_job_progress encoded here, as for complete_job: the same bytes, with the
        // encoding off the one Redis thread. Timed here too (`updateJobProgressAt`), as the
        // original workers time their reports: the server's clock was a seventh of the write.
        let mut doc = String::with_capacity(128 + job.id.len() + job.worker_id.len() + message.len());
        doc.push_str("{\"job_id\":");
        cjson_str(&mut doc, &job.id);
        doc.push_str(",\"worker_id\":");
        cjson_str(&mut doc, &job.worker_id);
        doc.push_str(",\"progress\":");
        doc.push_str(&pct);
        doc.push_str(",\"status\":\"in_progress\",\"message\":");
        cjson_str(&mut doc, message);
        doc.push_str(",\"current_step\":");
        cjson_str(&mut doc, &current);
        doc.push_str(",\"total_steps\":");
        cjson_str(&mut doc, &total);
        doc.push_str(",\"timestamp\":");
        let (ms, at) = crate::clock::now_stamp();
        doc.push_str(&ms.to_string());
        doc.push('}');
        self.lifecycle("updateJobProgressAt", job, &[&pct, message, &doc, &at])
            .await
            .map(drop)
    }

    /// Completes the job with its result (any JSON).
    pub async fn complete(&self, job: &ClaimedJob, result: &Value) -> Result<(), BrokerError> {
        let result = result.to_string();
        // Redis runs every function on its one thread, while a fleet has a worker process per
        // GPU: what only the worker knows is encoded here, and the function splices in the
        // result and its own time (`completeJobText`). complete_job names the job's workflow
        // and steps; the API writes them at submission only, so the claim's copy serves.
        let field = |name| job.field(name).unwrap_or_default();
        let mut head = String::with_capacity(96 + job.id.len() + job.worker_id.len());
        head.push_str("{\"job_id\":");
        cjson_str(&mut head, &job.id);
        head.push_str(",\"worker_id\":");
        cjson_str(&mut head, &job.worker_id);
        head.push_str(",\"progress\":100,\"status\":\"completed\",\"message\":\"completed\",\"result\":");
        let mut tail = String::with_capacity(64);
        tail.push_str(",\"workflow_id\":");
        cjson_str(&mut tail, field("workflow_id"));
        tail.push_str(",\"current_step\":");
        cjson_str(&mut tail, field("current_step"));
        tail.push_str(",\"total_steps\":");
        cjson_str(&mut tail, field("total_steps"));
        tail.push('}');
        self.lifecycle("completeJobText", job, &[&result, &head, &tail])
            .await
            .map(drop)
    }

    /// Fails the job; a retryable failure re-queues it (original score, `retry_count` + 1,
    /// this worker held off it) until `max_retries` (at most `BrokerOptions::max_retries_cap`).
    pub async fn fail(&self, job: &ClaimedJob, error: &str, retryable: bool) -> Result<Failure, BrokerError> {
        let (holdoff, delay) = self.retry_timing(job);
        let cap = self.inner.opts.max_retries_cap.to_string();
        let r = self
            .lifecycle(
                "failJob",
                job,
                &[error, if retryable { "1" } else { "0" }, &holdoff, &delay, &cap],
            )
            .await?;
        Ok(if r == Reply::Retried {
            Failure::Retried
        } else {
            Failure::Failed
        })
    }

    /// Ends a job its worker found can run nowhere (see the claim) as `unworkable`, with the
    /// reason; not an attempt, so its `retry_count` stays.
    pub(super) async fn fail_unworkable(&self, job: &ClaimedJob, reason: &str) -> Result<Failure, BrokerError> {
        self.lifecycle("failJob", job, &[reason, "u"]).await?;
        Ok(Failure::Failed)
    }

    /// Gives the job back because of `fault`, not the job's own (see [`Fault`]); `reason` is
    /// kept in the job hash (`machine_return_reasons`) and named when the returns fail it.
    pub async fn return_for_fault(
        &self,
        job: &ClaimedJob,
        fault: Fault,
        reason: &str,
    ) -> Result<Disposition, BrokerError> {
        let (holdoff, delay) = self.retry_timing(job);
        let kind = match fault {
            Fault::Machine => "machine",
            Fault::Service => "service",
        };
        let cap = self.inner.opts.max_retries_cap.to_string();
        match self
            .lifecycle("returnForFault", job, &[kind, reason, &holdoff, &delay, &cap])
            .await?
        {
            Reply::Ok => Ok(Disposition::Returned),
            Reply::Retried => Ok(Disposition::Retried),
            Reply::Failed => Ok(Disposition::Failed),
            other => Err(BrokerError::Protocol {
                op: "returnForFault",
                detail: format!("unexpected reply {other:?}"),
            }),
        }
    }

    /// The hold-off and the retry delay (milliseconds, as text) of a job's next retryable
    /// failure.
    fn retry_timing(&self, job: &ClaimedJob) -> (String, String) {
        let holdoff = self.inner.opts.failed_holdoff.as_millis().to_string();
        let delay = self
            .inner
            .opts
            .retry_delay
            .delay(job.retry_count(), -rand::random::<f64>())
            .as_millis()
            .to_string();
        (holdoff, delay)
    }

    /// Returns the job to the queue without penalty (graceful shutdown).
    pub async fn return_job(&self, job: &ClaimedJob) -> Result<(), BrokerError> {
        self.lifecycle("returnJob", job, &["returned"]).await.map(drop)
    }

    /// Extends the lease by the configured lease time.
    pub async fn renew_lease(&self, job: &ClaimedJob) -> Result<LeaseStatus, BrokerError> {
        let lease = self.lease().as_millis().to_string();
        match self.lifecycle("renewLease", job, &[&lease]).await {
            Ok(_) => Ok(LeaseStatus::Held),
            Err(BrokerError::Cancelled { .. }) => Ok(LeaseStatus::Cancelled),
            Err(BrokerError::LeaseLost { .. }) => Ok(LeaseStatus::Lost),
            Err(e) => Err(e),
        }
    }

    /// Returns expired leases' jobs to the queue (or fails them after `max_retries`). Safe to
    /// run from every machine at once. (It repairs no part of the index: that is the fleet's
    /// one sweeper's, [`Broker::run_sweeper`], so the cost does not grow with the machines.)
    pub async fn reap_expired_leases(&self) -> Result<ReapReport, BrokerError> {
        let cap = self.inner.opts.max_retries_cap.to_string();
        let counts: Vec<u64> = self
            .call("reapExpiredLeases", &[&self.inner.opts.key_prefix, "100", "0", &cap])
            .await?;
        Ok(ReapReport {
            requeued: counts.first().copied().unwrap_or(0),
            failed: counts.get(1).copied().unwrap_or(0),
            cleaned: counts.get(2).copied().unwrap_or(0),
        })
    }

    /// Runs the reaper every `every` until `shutdown`; errors are logged and retried.
    pub async fn run_reaper(&self, every: Duration, shutdown: CancellationToken) -> Result<(), BrokerError> {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(every) => {}
            }
            match self.reap_expired_leases().await {
                Ok(r) if r.requeued + r.failed > 0 => {
                    tracing::info!(
                        requeued = r.requeued,
                        failed = r.failed,
                        "returned jobs whose lease expired"
                    );
                }
                Ok(_) => {}
                Err(e) if super::super::outage::is_outage(&e) => {
                    tracing::debug!(error = %crate::logging::error_chain(&e), "failed to reap expired leases")
                }
                Err(e) => tracing::warn!(error = %crate::logging::error_chain(&e), "failed to reap expired leases"),
            }
        }
    }

    /// Returns the job to the queue in its place because a daily quota stops it, recording
    /// `reason` and `until_ms` (epoch ms) in the job for `machine jobs show`.
    /// Adds what one attempt of job `id` used at a paid API to the job's `usage_*` totals.
    pub async fn record_usage(&self, id: &str, b: &AttemptUsage<'_>) -> Result<(), BrokerError> {
        let args = [
            b.requests.to_string(),
            b.input_tokens.to_string(),
            b.output_tokens.to_string(),
            format!("{:.6}", b.predict_seconds),
            format!("{:.8}", b.cost),
        ];
        let [r, i, o, p, c] = args.each_ref().map(String::as_str);
        self.call_limits::<i64>("recordJobUsage", &[id, r, i, o, p, c, b.currency])
            .await
            .map(drop)
    }

    pub async fn defer(&self, job: &ClaimedJob, reason: &str, until_ms: i64) -> Result<(), BrokerError> {
        let until = until_ms.to_string();
        self.lifecycle("deferJob", job, &[reason, &until]).await.map(drop)
    }
}

/// Appends `s` as a JSON string exactly as the library's `cjson.encode` writes it (what the
/// messages' readers got before the worker encoded them): `"`, `\\`, `/` and control
/// characters escaped (`\b \t \n \f \r`, else `\u00XX`, DEL included), the rest as it is.
fn cjson_str(out: &mut String, s: &str) {
    out.push('"');
    // Ids and names seldom need escaping: copy those whole.
    if !s.bytes().any(|b| matches!(b, b'"' | b'\\' | b'/' | 0..0x20 | 0x7f)) {
        out.push_str(s);
        out.push('"');
        return;
    }
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '/' => out.push_str("\\/"),
            '\u{8}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                use std::fmt::Write as _;
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::cjson_str;

    #[test]
    fn strings_are_encoded_byte_for_byte_as_the_librarys_cjson_encodes_them() {
        // What Redis 7.0's cjson.encode returned for the characters 0-127 and "é".
        let expected = r##""\u0000\u0001\u0002\u0003\u0004\u0005\u0006\u0007\b\t\n\u000b\f\r\u000e\u000f\u0010\u0011\u0012\u0013\u0014\u0015\u0016\u0017\u0018\u0019\u001a\u001b\u001c\u001d\u001e\u001f !\"#$%&'()*+,-.\/0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefghijklmnopqrstuvwxyz{|}~\u007fé""##;
        let mut input: String = (0u8..128).map(char::from).collect();
        input.push('é');
        let mut out = String::new();
        cjson_str(&mut out, &input);
        assert_eq!(out, expected);
        // Each character alone (a string with nothing to escape is copied whole) as within.
        let alone: String = input
            .chars()
            .map(|c| {
                let mut one = String::new();
                cjson_str(&mut one, &c.to_string());
                one[1..one.len() - 1].to_owned()
            })
            .collect();
        assert_eq!(format!("\"{alone}\""), expected);
        let mut plain = String::new();
        cjson_str(&mut plain, "m1-gpu0 job é");
        assert_eq!(plain, "\"m1-gpu0 job é\"");
    }
}

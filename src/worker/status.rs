//! What a worker tells the rest of the machine: its state and counts (on a watch channel, for
//! `/status`, the page and the fleet message) and a report of each job it ends (for metrics and
//! the benchmark).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::hold::{Blame, HoldKind};
use crate::connectors::Billing;

/// The state of a worker, for the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Registering with the broker.
    Starting,
    /// Its services are not ready (starting, or crash-looping); it does not claim.
    WaitingForServices,
    /// A hold keeps it from claiming (its GPU faulted, it is quarantined, ...); the status's
    /// `reason` says which.
    Held,
    /// Waiting for a job.
    Idle,
    /// Not claiming until one of its pending uploads ends: it has as many as
    /// `worker.pending_uploads` allows, or their outputs fill `worker.pending_upload_mb`.
    WaitingForUploads,
    /// Running a job.
    Busy,
    /// Shutting down; its job may finish within the drain period.
    Draining,
    /// Stopped.
    Stopped,
}

/// The job a worker runs now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurrentJob {
    /// The job id.
    pub job_id: String,
    /// Its `service_required`.
    pub service: String,
    /// Last reported progress, 0-100.
    pub progress: f64,
    /// Last progress message.
    pub message: String,
}

/// A finished job whose outputs are being stored while its worker goes on (its lease is kept
/// until its end is written).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PendingUpload {
    /// The job id.
    pub job_id: String,
    /// Its `service_required`.
    pub service: String,
    /// The bytes of its outputs held in memory.
    pub bytes: u64,
    /// When its service work ended and the upload began, epoch milliseconds.
    pub since_ms: u64,
    /// Whether outputs are still being fetched from the job's service (ComfyUI's `/view`): until
    /// they are, a restart of that service between jobs waits ([`super::pause::parked`]).
    pub fetching: bool,
}

/// How many jobs ended which way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JobCounts {
    /// Jobs claimed.
    pub claimed: u64,
    /// Jobs completed.
    pub completed: u64,
    /// Jobs failed (whether or not the broker re-queued them).
    pub failed: u64,
    /// Jobs returned to the queue at shutdown, or because a daily quota stopped them.
    pub returned: u64,
    /// Jobs cancelled by the API while running here.
    pub cancelled: u64,
    /// Jobs whose lease this worker lost.
    pub lost: u64,
}

/// What a worker is doing, published on a watch channel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerStatus {
    /// The worker id.
    pub worker_id: String,
    /// Its state.
    pub state: WorkerState,
    /// The job it runs, when busy.
    pub current_job: Option<CurrentJob>,
    /// Outcomes so far.
    pub counts: JobCounts,
    /// The last error it met (a Redis outage, a failed job), for operators.
    pub last_error: Option<String>,
    /// When its state or job last changed, epoch milliseconds.
    pub last_activity_ms: u64,
    /// Why it must not claim now (its holds' reasons), when it must not.
    pub hold: Option<String>,
    /// The kinds of its holds.
    pub held_by: Vec<HoldKind>,
    /// Finished jobs whose outputs it is storing while it goes on, oldest first.
    pub uploads: Vec<PendingUpload>,
    /// Work a daily quota holds back from it until the quota resets (it claims the rest).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub quota_waits: Vec<QuotaWait>,
}

impl WorkerStatus {
    /// The bytes its pending uploads hold.
    pub fn upload_bytes(&self) -> u64 {
        self.uploads.iter().map(|u| u.bytes).sum()
    }
}

/// Work a worker leaves alone until a daily quota resets: an API's quota holds back the job
/// services of that API, a customer's own quota that customer's jobs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaWait {
    /// The job services it does not claim (an API's quota); empty for a customer's quota.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub services: Vec<String>,
    /// The customer whose jobs it does not claim (the customer's own quota).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer: Option<String>,
    /// The limiter's words (which quota, how much).
    pub reason: String,
    /// When the quota resets, epoch milliseconds.
    pub until_ms: u64,
}

impl QuotaWait {
    /// Whether it holds back a job of `service` for `customer` (empty: none).
    pub fn covers(&self, service: &str, customer: &str) -> bool {
        self.services.iter().any(|s| s == service)
            || self.customer.as_deref().is_some_and(|c| c == customer && !c.is_empty())
    }
}

/// What became of a job on this worker: how it ended here, with what the worker knows of why
/// (the status page keeps only its word, `health::JobEnd`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Fate {
    /// Completed; the result was written.
    Completed,
    /// Failed; `requeued` when the broker put it back for another attempt.
    Failed {
        /// Whether the failure was retryable.
        retryable: bool,
        /// Whose fault it was.
        blame: Blame,
        /// Whether the broker re-queued it.
        requeued: bool,
        /// The reason written to the job.
        error: String,
    },
    /// Returned to the queue at shutdown, or because a daily quota stopped it.
    Returned,
    /// Cancelled by the API; the result was discarded.
    Cancelled,
    /// The lease was lost (or the outcome could not be reported before shutdown).
    Lost,
}

impl Fate {
    /// The outcome's word, as metrics and logs name it.
    pub fn name(&self) -> &'static str {
        match self {
            Fate::Completed => "completed",
            Fate::Failed { .. } => "failed",
            Fate::Returned => "returned",
            Fate::Cancelled => "cancelled",
            Fate::Lost => "lost",
        }
    }
}

/// One finished job, for metrics and the benchmark.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobReport {
    /// The worker.
    pub worker_id: String,
    /// The job.
    pub job_id: String,
    /// Its `service_required`.
    pub service: String,
    /// How it ended.
    pub outcome: Fate,
    /// Time spent in the connector.
    #[serde(with = "humantime_serde")]
    pub run: Duration,
    /// Time from the claim to the outcome written in Redis.
    #[serde(with = "humantime_serde")]
    pub total: Duration,
    /// How long the worker's service sat idle for the machine's own reasons before this job
    /// ran: from the previous job's run ending to this one's starting, less the time the claim
    /// waited for the broker (writing the previous outcome, storing its outputs when they are
    /// not uploaded alongside, waiting for the upload budget).
    #[serde(with = "humantime_serde")]
    pub idle_before: Duration,
    /// What the attempt used and cost at a paid API, whatever its outcome (providers bill
    /// failed and cancelled work too).
    pub billing: Option<Billing>,
    /// The API whose work this attempt may have created upstream without a clear answer (a
    /// create answered with a 5xx or not at all); the job was returned, not retried.
    pub possible_orphan: Option<String>,
}

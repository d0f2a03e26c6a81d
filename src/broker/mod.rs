//! The job broker in Redis: the `jobMatching` function library (claiming, lifecycle, leases,
//! the pending-queue index), its loader (library.rs), the capabilities types, the pure-Rust
//! reference matcher, and the async [`Broker`] API that the workers and the `machine functions` /
//! `machine jobs` operator commands use.
//!
//! It promises the wire contract of /work/shared/redis-contract.md (docs/redis-protocol.md says
//! how each write maps to it) and the matching semantics of docs/matching.md, with claims that
//! find a runnable job anywhere in the queue at a cost that does not grow with the backlog the
//! worker cannot run.

pub mod capabilities;
mod client;
pub mod library;
pub mod outage;
pub mod reference;
pub mod retry;
pub mod sentinel;

pub use capabilities::{Capabilities, CustomerAccess, Hardware, Requirements};
#[cfg(test)]
pub(crate) use client::JobFields;
pub use client::{
    AttemptUsage, Broker, BrokerOptions, Cancellation, ClaimObserver, ClaimedJob, DEFAULT_RETRY_DELAY, Disposition,
    Failure, Fault, JobField, JobProgress, JobRecord, JobState, JobView, LeaseStatus, LimitAnswer, LimitBudget,
    Meaning, NewJob, QuotaDay, ReapReport, RetryDelay, SWEEP_EVERY, SweepReport, pending_score,
};
pub use outage::{FaultKind, RedisHealth, RedisState};

/// The `error` the API writes when a user cancels a job.
pub const CANCEL_ERROR: &str = "Job cancelled by user";

/// Errors of the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The Redis URL or the first connection failed.
    #[error("failed to connect to redis at {url}")]
    Connect {
        /// The URL with its password masked.
        url: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// A command failed (the connection reconnects by itself; the caller may retry).
    #[error("failed to run {op} on redis")]
    Redis {
        /// The command or function.
        op: &'static str,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// Redis answered something this version does not understand.
    #[error("failed to read the reply of {op}: {detail}")]
    Protocol {
        /// The command or function.
        op: &'static str,
        /// What was wrong.
        detail: String,
    },
    /// After loading, another version of the library was found (machines of several versions
    /// loading at once).
    #[error("failed to install the jobMatching library: version {expected} expected, {found:?} loaded")]
    VersionMismatch {
        /// This binary's version.
        expected: String,
        /// What is loaded.
        found: Option<String>,
    },
    /// The job was cancelled; the write was rejected.
    #[error("job {job_id} was cancelled")]
    Cancelled {
        /// The job.
        job_id: String,
    },
    /// The job is no longer assigned to this worker (lease expired, re-queued or re-assigned);
    /// the write was rejected.
    #[error("job {job_id} is no longer held by worker {worker_id}")]
    LeaseLost {
        /// The job.
        job_id: String,
        /// The worker that tried to write.
        worker_id: String,
    },
}

/// Maps a failed Redis command `op` to [`BrokerError::Redis`].
pub(crate) fn redis_err(op: &'static str) -> impl FnOnce(redis::RedisError) -> BrokerError {
    move |source| BrokerError::Redis { op, source }
}

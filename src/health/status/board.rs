//! The services and workers as the status documents show them: mirrors of the supervisor's
//! and the workers' status types, with exhaustive conversions from them, so that a state or field
//! added there fails to compile here until the page says how it shows it.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

use crate::supervisor::{ExitInfo, ServiceState, ServiceStatus};
use crate::worker::{CurrentJob, JobCounts, WorkerState, WorkerStatus};

/// A supervised service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// The service name.
    pub name: String,
    /// Where it is in its life.
    pub state: ServiceStage,
    /// The pid of its running process.
    pub pid: Option<u32>,
    /// How many times it was started again.
    pub restarts: u32,
    /// How its last run ended.
    pub last_exit: Option<Exit>,
    /// Whether it is ready.
    pub ready: bool,
    /// Whether its liveness probe passes.
    pub live: bool,
    /// Whether it failed too often within the crash-loop window.
    pub crash_loop: bool,
    /// When its current (or last) run started, RFC 3339.
    pub started_at: Option<String>,
    /// The GPU it is pinned to.
    pub gpu: Option<u32>,
    /// Whether its failure shuts the machine down.
    pub critical: bool,
    /// Why it is not healthy, when it is not.
    pub reason: Option<String>,
}

/// A service's state, as the supervisor names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceStage {
    /// Waiting for the services it starts after.
    Waiting,
    /// Started, not ready yet.
    Starting,
    /// Running and ready.
    Running,
    /// Waiting out its restart delay.
    Backoff,
    /// Being stopped.
    Stopping,
    /// Stopped on request or at shutdown.
    Stopped,
    /// Exited and not started again.
    Exited,
    /// Failed and not started again.
    Failed,
}

impl From<ServiceState> for ServiceStage {
    fn from(s: ServiceState) -> ServiceStage {
        match s {
            ServiceState::Waiting => ServiceStage::Waiting,
            ServiceState::Starting(_) => ServiceStage::Starting,
            ServiceState::Running { .. } => ServiceStage::Running,
            ServiceState::Backoff => ServiceStage::Backoff,
            ServiceState::Stopping { .. } => ServiceStage::Stopping,
            ServiceState::Stopped => ServiceStage::Stopped,
            ServiceState::Exited => ServiceStage::Exited,
            ServiceState::Failed => ServiceStage::Failed,
        }
    }
}

/// How a run of a service ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// When it ended, RFC 3339.
    pub at: String,
}

/// A time as the status page writes it: RFC 3339 with milliseconds, UTC.
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl From<&ExitInfo> for Exit {
    fn from(e: &ExitInfo) -> Exit {
        Exit {
            code: e.code,
            signal: e.signal,
            at: rfc3339(e.at),
        }
    }
}

impl From<&ServiceStatus> for Service {
    fn from(s: &ServiceStatus) -> Service {
        let ServiceStatus {
            name,
            state,
            restarts,
            last_exit,
            crash_loop,
            gpu,
            critical,
            reason,
        } = s;
        let run = state.run();
        Service {
            name: name.clone(),
            state: (*state).into(),
            pid: run.map(|r| r.pid),
            restarts: *restarts,
            last_exit: last_exit.as_ref().map(Exit::from),
            ready: state.ready(),
            live: state.live(),
            crash_loop: *crash_loop,
            started_at: run.map(|r| rfc3339(r.started)),
            gpu: *gpu,
            critical: *critical,
            reason: reason.clone(),
        }
    }
}

/// A worker, and why it waits when it has a reason to report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    /// The worker id.
    pub worker_id: String,
    /// Its state.
    pub state: WorkerStage,
    /// The job it runs, when busy.
    pub current_job: Option<Job>,
    /// Outcomes so far.
    pub counts: Counts,
    /// The last error it met.
    pub last_error: Option<String>,
    /// When its state or job last changed, epoch milliseconds.
    pub last_activity_ms: u64,
    /// Why the worker cannot claim: its holds (a GPU fault, a quarantine, ...) or a service
    /// of its in crash loop or failed.
    pub reason: Option<String>,
    /// Finished jobs whose outputs it is storing while it goes on, oldest first.
    #[serde(default)]
    pub uploads: Vec<Upload>,
    /// Whether it is quarantined (an operator may lift it: `machine quarantine clear`, the
    /// page's button).
    #[serde(default)]
    pub quarantined: bool,
    /// Work a daily quota holds back from it until the quota resets (it claims the rest).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quota_waits: Vec<crate::worker::QuotaWait>,
}

/// A finished job whose outputs a worker is storing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upload {
    /// The job id.
    pub job_id: String,
    /// Its `service_required`.
    pub service: String,
    /// The bytes of its outputs.
    pub bytes: u64,
    /// When the upload began, epoch milliseconds.
    pub since_ms: u64,
}

impl Worker {
    /// The worker as its status says, with the reason it waits.
    pub fn new(status: &WorkerStatus, reason: Option<String>) -> Worker {
        let WorkerStatus {
            worker_id,
            state,
            current_job,
            counts,
            last_error,
            last_activity_ms,
            hold,
            held_by,
            uploads,
            quota_waits,
        } = status;
        Worker {
            worker_id: worker_id.clone(),
            state: (*state).into(),
            current_job: current_job.as_ref().map(Job::from),
            counts: counts.into(),
            last_error: last_error.clone(),
            last_activity_ms: *last_activity_ms,
            reason: hold.clone().or(reason),
            uploads: uploads
                .iter()
                .map(|u| Upload {
                    job_id: u.job_id.clone(),
                    service: u.service.clone(),
                    bytes: u.bytes,
                    since_ms: u.since_ms,
                })
                .collect(),
            quarantined: held_by.contains(&crate::worker::hold::HoldKind::Quarantine),
            quota_waits: quota_waits.clone(),
        }
    }
}

/// A worker's state, as the workers name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerStage {
    /// Registering with the broker.
    Starting,
    /// Its services are not ready; it does not claim.
    WaitingForServices,
    /// A hold keeps it from claiming; `reason` says which.
    Held,
    /// Waiting for a job.
    Idle,
    /// Not claiming until one of its pending uploads ends.
    WaitingForUploads,
    /// Running a job.
    Busy,
    /// Shutting down.
    Draining,
    /// Stopped.
    Stopped,
}

impl From<WorkerState> for WorkerStage {
    fn from(s: WorkerState) -> WorkerStage {
        match s {
            WorkerState::Starting => WorkerStage::Starting,
            WorkerState::WaitingForServices => WorkerStage::WaitingForServices,
            WorkerState::Held => WorkerStage::Held,
            WorkerState::Idle => WorkerStage::Idle,
            WorkerState::WaitingForUploads => WorkerStage::WaitingForUploads,
            WorkerState::Busy => WorkerStage::Busy,
            WorkerState::Draining => WorkerStage::Draining,
            WorkerState::Stopped => WorkerStage::Stopped,
        }
    }
}

/// The job a worker runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The job id.
    pub job_id: String,
    /// Its `service_required`.
    pub service: String,
    /// Last reported progress, 0-100.
    pub progress: f64,
    /// Last progress message.
    pub message: String,
}

impl From<&CurrentJob> for Job {
    fn from(j: &CurrentJob) -> Job {
        let CurrentJob {
            job_id,
            service,
            progress,
            message,
        } = j;
        Job {
            job_id: job_id.clone(),
            service: service.clone(),
            progress: *progress,
            message: message.clone(),
        }
    }
}

/// How many jobs ended which way on a worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Claimed.
    pub claimed: u64,
    /// Completed.
    pub completed: u64,
    /// Failed.
    pub failed: u64,
    /// Returned to the queue.
    pub returned: u64,
    /// Cancelled by the API while running here.
    pub cancelled: u64,
    /// Whose lease this worker lost.
    pub lost: u64,
}

impl From<&JobCounts> for Counts {
    fn from(c: &JobCounts) -> Counts {
        let JobCounts {
            claimed,
            completed,
            failed,
            returned,
            cancelled,
            lost,
        } = *c;
        Counts {
            claimed,
            completed,
            failed,
            returned,
            cancelled,
            lost,
        }
    }
}

impl ServiceStage {
    /// The name the document gives the state.
    pub fn name(self) -> &'static str {
        match self {
            ServiceStage::Waiting => "waiting",
            ServiceStage::Starting => "starting",
            ServiceStage::Running => "running",
            ServiceStage::Backoff => "backoff",
            ServiceStage::Stopping => "stopping",
            ServiceStage::Stopped => "stopped",
            ServiceStage::Exited => "exited",
            ServiceStage::Failed => "failed",
        }
    }
}

impl WorkerStage {
    /// The name the document gives the state.
    pub fn name(self) -> &'static str {
        match self {
            WorkerStage::Starting => "starting",
            WorkerStage::WaitingForServices => "waiting_for_services",
            WorkerStage::Held => "held",
            WorkerStage::Idle => "idle",
            WorkerStage::WaitingForUploads => "waiting_for_uploads",
            WorkerStage::Busy => "busy",
            WorkerStage::Draining => "draining",
            WorkerStage::Stopped => "stopped",
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::Value;

    use super::*;

    #[test]
    fn the_names_are_the_wire_names() {
        for s in [ServiceStage::Waiting, ServiceStage::Backoff, ServiceStage::Failed] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        for s in [
            WorkerStage::WaitingForServices,
            WorkerStage::Idle,
            WorkerStage::Draining,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
    }

    /// The mirrors write what the page reads: a service's pid, start and readiness only in the
    /// states where a process runs; workers as the workers' own type writes them.
    #[test]
    fn services_and_workers_serialise_like_their_sources() {
        let ms = |ms| SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(ms);
        let run = crate::supervisor::Run {
            pid: 42,
            started: ms(1_750_000_000_000),
        };
        let mut service = ServiceStatus::new("svc", Some(1), true);
        service.last_exit = Some(ExitInfo {
            code: Some(1),
            signal: None,
            at: ms(1_750_000_000_123),
        });
        // (state, state word, pid, ready, live, started_at): what runs shows, what is down does
        // not.
        let started = Some("2025-06-15T15:06:40.000Z");
        let cases = [
            (ServiceState::Waiting, "waiting", None, false, true, None),
            (ServiceState::Starting(run), "starting", Some(42), false, true, started),
            (
                ServiceState::Running { run, ready: true },
                "running",
                Some(42),
                true,
                true,
                started,
            ),
            (
                ServiceState::Running { run, ready: false },
                "running",
                Some(42),
                false,
                true,
                started,
            ),
            (ServiceState::Backoff, "backoff", None, false, true, None),
            (
                ServiceState::Stopping { run, live: false },
                "stopping",
                Some(42),
                false,
                false,
                started,
            ),
            (ServiceState::Stopped, "stopped", None, false, true, None),
            (ServiceState::Exited, "exited", None, false, true, None),
            (ServiceState::Failed, "failed", None, false, true, None),
        ];
        for (state, word, pid, ready, live, started_at) in cases {
            service.state = state;
            assert_eq!(
                serde_json::to_value(Service::from(&service)).unwrap(),
                serde_json::json!({
                    "name": "svc",
                    "state": word,
                    "pid": pid,
                    "restarts": 0,
                    "last_exit": {"code": 1, "signal": null, "at": "2025-06-15T15:06:40.123Z"},
                    "ready": ready,
                    "live": live,
                    "crash_loop": false,
                    "started_at": started_at,
                    "gpu": 1,
                    "critical": true,
                    "reason": null,
                }),
                "{state:?}"
            );
        }
        for s in [
            WorkerState::Starting,
            WorkerState::WaitingForServices,
            WorkerState::Held,
            WorkerState::Idle,
            WorkerState::Busy,
            WorkerState::Draining,
            WorkerState::Stopped,
        ] {
            let status = WorkerStatus {
                worker_id: "w".into(),
                state: s,
                current_job: Some(CurrentJob {
                    job_id: "j".into(),
                    service: "s".into(),
                    progress: 1.5,
                    message: "m".into(),
                }),
                counts: JobCounts {
                    claimed: 1,
                    completed: 2,
                    failed: 3,
                    returned: 4,
                    cancelled: 5,
                    lost: 6,
                },
                last_error: Some("e".into()),
                last_activity_ms: 7,
                hold: None,
                held_by: Vec::new(),
                uploads: Vec::new(),
                quota_waits: vec![crate::worker::QuotaWait {
                    services: vec!["openai_text".into()],
                    customer: None,
                    reason: "q".into(),
                    until_ms: 8,
                }],
            };
            let mut expected = serde_json::to_value(&status).unwrap();
            expected.as_object_mut().unwrap().remove("hold");
            expected.as_object_mut().unwrap().remove("held_by");
            expected["reason"] = Value::Null;
            expected["quarantined"] = Value::Bool(false);
            assert_eq!(serde_json::to_value(Worker::new(&status, None)).unwrap(), expected);
        }
    }
}

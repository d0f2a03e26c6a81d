//! The worker board: what each worker is doing right now, written by the workers and read by
//! the status page, the readiness check and the fleet status message.
//!
//! Writers never wait on readers: every update is a short critical section on a std mutex, and
//! a `watch` channel tells the fleet publisher that something changed so it can publish at once.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use tokio::sync::watch;

/// What a worker is doing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "state", content = "reason")]
pub enum WorkerState {
    /// Not started yet.
    Starting,
    /// Waiting for its services to become ready.
    WaitingForServices,
    /// Claiming jobs, none in hand.
    Idle,
    /// Running a job.
    Busy,
    /// Not claiming, for the reason given (a service crash-loops, Redis is unreachable, ...).
    Paused(String),
    /// Draining and returning work at shutdown.
    Stopping,
    /// Finished.
    Stopped,
}

impl WorkerState {
    /// Whether the worker counts as up for `/ready`: claiming, busy, or paused with a reported
    /// reason.
    pub fn is_settled(&self) -> bool {
        matches!(self, WorkerState::Idle | WorkerState::Busy | WorkerState::Paused(_))
    }
}

/// One worker's row on the board.
#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    /// Worker id.
    pub id: String,
    /// Current state.
    #[serde(flatten)]
    pub state: WorkerState,
    /// The job in hand, if any.
    pub current_job_id: Option<String>,
    /// The job's `service_required`, if any.
    pub current_service: Option<String>,
    /// The job's last reported progress (0-100).
    pub progress: Option<u8>,
    /// Jobs completed since start.
    pub completed: u64,
    /// Jobs failed since start.
    pub failed: u64,
    /// Jobs returned to the queue since start.
    pub returned: u64,
    /// Jobs cancelled while in hand since start.
    pub cancelled: u64,
    /// Last state change or progress, epoch milliseconds.
    pub last_activity_ms: u64,
}

/// How a job ended, as counted on the board.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    /// Completed successfully.
    Completed,
    /// Failed (retry or final).
    Failed,
    /// Returned to the queue.
    Returned,
    /// Cancelled by the API.
    Cancelled,
}

/// The shared board. Cloning is cheap and shares the board.
#[derive(Debug, Clone)]
pub struct WorkerBoard {
    rows: Arc<Mutex<BTreeMap<String, WorkerStatus>>>,
    changed: Arc<watch::Sender<u64>>,
}

impl WorkerBoard {
    /// A board with one `Starting` row per worker id.
    pub fn new<'a>(ids: impl IntoIterator<Item = &'a str>) -> Self {
        let now = now_ms();
        let rows = ids
            .into_iter()
            .map(|id| {
                (
                    id.to_owned(),
                    WorkerStatus {
                        id: id.to_owned(),
                        state: WorkerState::Starting,
                        current_job_id: None,
                        current_service: None,
                        progress: None,
                        completed: 0,
                        failed: 0,
                        returned: 0,
                        cancelled: 0,
                        last_activity_ms: now,
                    },
                )
            })
            .collect();
        WorkerBoard {
            rows: Arc::new(Mutex::new(rows)),
            changed: Arc::new(watch::channel(0).0),
        }
    }

    fn update(&self, id: &str, notify: bool, f: impl FnOnce(&mut WorkerStatus)) {
        {
            // A poisoned lock only means a writer panicked mid-update; the rows are still usable.
            let mut rows = self.rows.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(row) = rows.get_mut(id) {
                f(row);
                row.last_activity_ms = now_ms();
            }
        }
        if notify {
            self.changed.send_modify(|n| *n += 1);
        }
    }

    /// Sets a worker's state (a state change is published to the fleet at once).
    pub fn set_state(&self, id: &str, state: WorkerState) {
        self.update(id, true, |row| row.state = state);
    }

    /// Marks a worker busy with a job.
    pub fn job_started(&self, id: &str, job_id: &str, service: &str) {
        self.update(id, true, |row| {
            row.state = WorkerState::Busy;
            row.current_job_id = Some(job_id.to_owned());
            row.current_service = Some(service.to_owned());
            row.progress = Some(0);
        });
    }

    /// Records a job's progress (not a fleet event by itself).
    pub fn job_progress(&self, id: &str, progress: u8) {
        self.update(id, false, |row| row.progress = Some(progress.min(100)));
    }

    /// Records how a job ended and puts the worker back to idle.
    pub fn job_ended(&self, id: &str, end: JobEnd) {
        self.update(id, true, |row| {
            match end {
                JobEnd::Completed => row.completed += 1,
                JobEnd::Failed => row.failed += 1,
                JobEnd::Returned => row.returned += 1,
                JobEnd::Cancelled => row.cancelled += 1,
            }
            row.current_job_id = None;
            row.current_service = None;
            row.progress = None;
            if row.state == WorkerState::Busy {
                row.state = WorkerState::Idle;
            }
        });
    }

    /// A copy of every row, ordered by worker id.
    pub fn snapshot(&self) -> Vec<WorkerStatus> {
        self.rows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .cloned()
            .collect()
    }

    /// Whether every worker is claiming, busy, or paused with a reason.
    pub fn all_settled(&self) -> bool {
        self.rows
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .all(|r| r.state.is_settled())
    }

    /// A receiver that changes whenever a worker changes state.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tracks_jobs_and_readiness() {
        let board = WorkerBoard::new(["w1", "w2"]);
        let mut changes = board.subscribe();
        assert!(!board.all_settled());
        board.set_state("w1", WorkerState::Idle);
        board.set_state("w2", WorkerState::Paused("comfyui-gpu1 is in crash loop".into()));
        assert!(board.all_settled());
        assert!(changes.has_changed().unwrap());
        changes.mark_unchanged();
        board.job_started("w1", "j1", "comfyui");
        board.job_progress("w1", 150);
        let row = &board.snapshot()[0];
        assert_eq!((row.state.clone(), row.progress), (WorkerState::Busy, Some(100)));
        board.job_ended("w1", JobEnd::Completed);
        let row = &board.snapshot()[0];
        assert_eq!(
            (row.state.clone(), row.completed, row.current_job_id.clone()),
            (WorkerState::Idle, 1, None)
        );
        assert!(changes.has_changed().unwrap());
        board.set_state("unknown", WorkerState::Idle);
        assert_eq!(board.snapshot().len(), 2);
    }
}

//! What a supervised service is, as its actor publishes it ([`ServiceStatus`]: its
//! [`ServiceState`], a [`Run`] while a process runs, the last [`ExitInfo`]) and the
//! [`Command`]s the actor takes. Read by the handle, written by the actor.

use std::time::SystemTime;

use tokio::sync::oneshot;

/// One run of a service's process: what exists only while a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// The pid of the process (also its process group id).
    pub pid: u32,
    /// When it was started.
    pub started: SystemTime,
}

/// Where a service is in its life. A pid, a start time and readiness exist only in the states
/// where a process runs, so a stopped service cannot be ready nor have a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceState {
    /// Waiting for the services in its `after` list to be ready.
    Waiting,
    /// Started, its readiness probe has not passed yet.
    Starting(Run),
    /// Started and its readiness probe passed once; `ready` is false while it fails again.
    Running {
        /// The process.
        run: Run,
        /// Whether its readiness probe passes now (always, without one).
        ready: bool,
    },
    /// Exited; waiting out the backoff delay before it is started again.
    Backoff,
    /// Being stopped (SIGTERM sent, grace running).
    Stopping {
        /// The process being stopped.
        run: Run,
        /// False when a failed liveness probe is why it is stopped.
        live: bool,
    },
    /// Stopped on request or at shutdown.
    Stopped,
    /// Exited and, by its restart policy, not started again.
    Exited,
    /// Failed and not started again (restart policy, or it could not be spawned).
    Failed,
}

/// The states in which no process of the service runs and none will start on its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Down {
    Stopped,
    Exited,
    Failed,
}

impl From<Down> for ServiceState {
    fn from(d: Down) -> ServiceState {
        match d {
            Down::Stopped => ServiceState::Stopped,
            Down::Exited => ServiceState::Exited,
            Down::Failed => ServiceState::Failed,
        }
    }
}

impl ServiceState {
    /// Whether no process of the service runs and none will start on its own.
    pub fn is_down(self) -> bool {
        matches!(
            self,
            ServiceState::Stopped | ServiceState::Exited | ServiceState::Failed
        )
    }

    /// The process running now, in the states that have one.
    pub fn run(self) -> Option<Run> {
        match self {
            ServiceState::Starting(run) | ServiceState::Running { run, .. } | ServiceState::Stopping { run, .. } => {
                Some(run)
            }
            ServiceState::Waiting
            | ServiceState::Backoff
            | ServiceState::Stopped
            | ServiceState::Exited
            | ServiceState::Failed => None,
        }
    }

    /// The pid of the process running now.
    pub fn pid(self) -> Option<u32> {
        self.run().map(|r| r.pid)
    }

    /// Whether it is running with its readiness probe passing.
    pub fn ready(self) -> bool {
        matches!(self, ServiceState::Running { ready: true, .. })
    }

    /// Whether its liveness probe passes: false only while it is stopped for failing it.
    pub fn live(self) -> bool {
        !matches!(self, ServiceState::Stopping { live: false, .. })
    }
}

/// How a run of a service ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// When it ended.
    pub at: SystemTime,
}

/// A service as the supervisor publishes it: its state and what holds across its runs.
#[derive(Debug, Clone, PartialEq)]
pub struct ServiceStatus {
    /// The service name.
    pub name: String,
    /// Where it is in its life, with what exists in that state.
    pub state: ServiceState,
    /// How many times it was started again after the first start.
    pub restarts: u32,
    /// How its previous run ended, whatever the state now (a restarted service shows why it
    /// was restarted).
    pub last_exit: Option<ExitInfo>,
    /// Whether it failed too often within the crash-loop window.
    pub crash_loop: bool,
    /// The GPU the service is pinned to.
    pub gpu: Option<u32>,
    /// Whether its failure shuts the machine down.
    pub critical: bool,
    /// Why it is not healthy, in words, when it is not.
    pub reason: Option<String>,
}

impl ServiceStatus {
    pub(crate) fn new(name: &str, gpu: Option<u32>, critical: bool) -> ServiceStatus {
        ServiceStatus {
            name: name.to_owned(),
            state: ServiceState::Waiting,
            restarts: 0,
            last_exit: None,
            crash_loop: false,
            gpu,
            critical,
            reason: None,
        }
    }

    /// Whether work may be sent to the service: running, ready, live and not crash-looping.
    pub fn healthy(&self) -> bool {
        self.serving() && !self.crash_loop
    }

    /// Whether the service serves now: running with its readiness probe passing, crash loop or
    /// not (the crash-loop flag stays up until a run lasted `stable_after`; it is for operators
    /// and backoff, not a reason to keep a working service idle). A running service is live: a
    /// failed liveness probe stops it.
    pub fn serving(&self) -> bool {
        self.state.ready()
    }
}

/// A request to one service's actor; the reply says it was carried out.
#[derive(Debug)]
pub(crate) enum Command {
    Start(oneshot::Sender<()>),
    Stop(oneshot::Sender<()>),
    Restart(oneshot::Sender<()>),
    /// The running service failed a check made outside its probes (a failed warm-up): stop it
    /// and count a failure, as a failed liveness probe does.
    Fail(String, oneshot::Sender<()>),
}

//! The PID-1 supervisor: reaping, signals, supervised services as actors, probes, logs, and the
//! ordered shutdown. See docs/supervisor.md for the design.
//!
//! Other subsystems use [`SupervisorHandle`] (start/stop/restart, status, log tail, health
//! watches, critical failures) and must start every child process through [`spawn`] or
//! [`output`], so that the orphan reaper never takes the exit status of a child the crate is
//! waiting for.

pub(crate) mod env;
mod growth;
mod handle;
mod logs;
mod memory;
mod pidfile;
mod policy;
mod probe;
mod readiness;
mod reaper;
mod service;
mod signals;
mod status;
mod sys;
mod tree;

pub use handle::{ServicesWatch, SupervisorError, SupervisorHandle};
pub use logs::{LineSplitter, RotatingFile};
pub use memory::group_rss;
pub use policy::{Decision, Ending, History, Policy};
pub use probe::check;
pub use reaper::{GroupKill, ManagedChild, ReaperError, output, spawn, spawn_group};
pub use signals::{SignalError, Signals};
pub use status::{ExitInfo, Run, ServiceState, ServiceStatus};
pub use tree::Supervisor;

pub use sys::raise_open_files_limit;

/// Reaps orphaned children until the token is cancelled; see [`reaper`].
pub use reaper::run as run_reaper;
/// Stops and reaps whatever is left at the very end of `machine run`.
pub use reaper::sweep;

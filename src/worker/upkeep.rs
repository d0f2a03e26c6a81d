//! Upkeep of a GPU worker's services: restarts planned **between jobs**, so that memory growth
//! or a wedged service costs no job.
//!
//! Each GPU worker whose plan runs services of its own (ComfyUI, A1111, the render service) has
//! one upkeep task. After every job (the worker waits for its decision, see [`super::pause`]) and
//! every few seconds while the worker is idle, it reads each service: jobs since its start, the
//! resident memory of its process group, and its GPU's used memory (idle, between jobs). A
//! reading past the connector's `restart_every_jobs`, `restart_above_rss` or
//! `restart_above_idle_vram` holds the worker with the reason, waits until it is parked between
//! jobs, restarts the service through the supervisor, waits until it is healthy again and lets
//! the worker claim. A failed job whose service then does not answer its health check (a stalled
//! ComfyUI that is wedged, not just silent) restarts it the same way, before the next claim,
//! instead of waiting out the liveness probe's failures. Each planned restart is logged with its
//! reason and counted (`machine_service_planned_restarts_total{service,reason}`).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::pause::Pause;
use super::{JobOutcome, WorkerState, WorkerStatus};
use crate::config::{ProbeSpec, ServiceConnectorConfig};
use crate::supervisor::SupervisorHandle;

/// How often an idle worker's services are read.
const IDLE_CHECK: Duration = Duration::from_secs(2);

/// Told of each planned restart: the service and the reason's label.
pub type OnRestart = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// The used memory of a GPU in bytes, by NVML index, when it can be read.
pub type GpuMemoryUsed = Arc<dyn Fn(u32) -> Option<u64> + Send + Sync>;

/// What the upkeep needs from the rest of the machine.
#[derive(Clone)]
pub struct KeepUp {
    /// Restarts the services and reads their pids.
    pub supervisor: SupervisorHandle,
    /// Told of each planned restart: the service and the reason's label.
    pub on_restart: OnRestart,
    /// The used memory of a GPU in bytes, by NVML index, when it can be read.
    pub gpu_memory_used: GpuMemoryUsed,
}

impl std::fmt::Debug for KeepUp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeepUp").finish_non_exhaustive()
    }
}

/// When a service is restarted between jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Limits {
    /// Resident bytes of its process group.
    pub rss: Option<u64>,
    /// Used bytes of its GPU while the worker is idle.
    pub idle_vram: Option<u64>,
    /// Jobs since its start.
    pub every_jobs: Option<u32>,
}

impl Limits {
    /// The limits a connector's configuration sets.
    pub fn of(c: &ServiceConnectorConfig) -> Limits {
        Limits {
            rss: c.restart_above_rss,
            idle_vram: c.restart_above_idle_vram,
            every_jobs: c.restart_every_jobs,
        }
    }
}

/// What was read of a service between jobs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reading {
    /// Jobs the worker ran since the service's current run started.
    pub jobs: u32,
    /// Resident bytes of its process group.
    pub rss: Option<u64>,
    /// Used bytes of its GPU, read while no job runs.
    pub idle_vram: Option<u64>,
}

/// Why a restart is planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Its resident memory crossed `restart_above_rss`.
    Rss,
    /// Its GPU's idle memory crossed `restart_above_idle_vram`.
    IdleVram,
    /// It ran `restart_every_jobs` jobs.
    EveryJobs,
    /// A job failed and the service no longer answers its health check.
    Unresponsive,
}

impl Reason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Rss => "rss",
            Reason::IdleVram => "idle_vram",
            Reason::EveryJobs => "every_jobs",
            Reason::Unresponsive => "unresponsive",
        }
    }
}

/// The restart a reading calls for, with the reason in words; memory first (it is what kills
/// machines), then the job count.
pub fn planned(limits: &Limits, r: &Reading) -> Option<(Reason, String)> {
    const MIB: u64 = 1 << 20;
    if let (Some(limit), Some(rss)) = (limits.rss, r.rss) {
        if rss > limit {
            return Some((
                Reason::Rss,
                format!(
                    "resident memory {} MiB above restart_above_rss {} MiB",
                    rss / MIB,
                    limit / MIB
                ),
            ));
        }
    }
    if let (Some(limit), Some(used)) = (limits.idle_vram, r.idle_vram) {
        if used > limit {
            return Some((
                Reason::IdleVram,
                format!(
                    "idle GPU memory {} MiB above restart_above_idle_vram {} MiB",
                    used / MIB,
                    limit / MIB
                ),
            ));
        }
    }
    match limits.every_jobs {
        Some(n) if r.jobs >= n => Some((
            Reason::EveryJobs,
            format!("{} jobs run (restart_every_jobs {n})", r.jobs),
        )),
        _ => None,
    }
}

/// One service the upkeep looks after.
#[derive(Debug)]
pub struct Kept {
    /// The service name.
    pub name: String,
    /// Its GPU.
    pub gpu: Option<u32>,
    /// When to restart it.
    pub limits: Limits,
    /// Its health check (the plan's readiness probe).
    pub health: Option<ProbeSpec>,
    jobs: u32,
    pid: Option<u32>,
}

impl Kept {
    /// A service to look after.
    pub fn new(name: String, gpu: Option<u32>, limits: Limits, health: Option<ProbeSpec>) -> Kept {
        Kept {
            name,
            gpu,
            limits,
            health,
            jobs: 0,
            pid: None,
        }
    }
}

/// The upkeep of one worker's services.
#[derive(Debug)]
pub struct Upkeep {
    worker: String,
    services: Vec<Kept>,
    keep: KeepUp,
    pause: Pause,
    status: watch::Receiver<WorkerStatus>,
}

impl Upkeep {
    /// The upkeep of `services` for the worker `worker`, holding it through `pause` and reading
    /// its state from `status`.
    pub fn new(
        worker: String,
        services: Vec<Kept>,
        keep: KeepUp,
        pause: Pause,
        status: watch::Receiver<WorkerStatus>,
    ) -> Upkeep {
        Upkeep {
            worker,
            services,
            keep,
            pause,
            status,
        }
    }

    /// Looks after the services until `stop` (or until the worker is gone).
    pub async fn run(mut self, stop: CancellationToken) {
        let mut idle = tokio::time::interval(IDLE_CHECK);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let due = tokio::select! {
                () = stop.cancelled() => return,
                ended = self.pause.ended.recv() => {
                    let Some(ended) = ended else { return };
                    for s in &mut self.services {
                        s.jobs += 1;
                    }
                    let due = self.due(&ended.outcome).await;
                    if let Some((i, _, text)) = &due {
                        self.pause.hold(format!("restarting {} between jobs: {text}", self.services[*i].name));
                    }
                    // The worker claims again only after this answer, so a planned restart is
                    // held before it could.
                    let _ = ended.decided.send(());
                    due
                }
                _ = idle.tick() => {
                    if self.status.borrow().state != WorkerState::Idle {
                        continue;
                    }
                    let due = self.due(&JobOutcome::Completed).await;
                    if let Some((i, _, text)) = &due {
                        self.pause.hold(format!("restarting {} between jobs: {text}", self.services[*i].name));
                    }
                    due
                }
            };
            if let Some((i, reason, text)) = due {
                if !self.restart(i, reason, &text, &stop).await {
                    return;
                }
            }
        }
    }

    /// The first service due for a restart, reading each one now.
    async fn due(&mut self, outcome: &JobOutcome) -> Option<(usize, Reason, String)> {
        for i in 0..self.services.len() {
            let status = self.keep.supervisor.service(&self.services[i].name).ok()?;
            let s = &mut self.services[i];
            // A run the upkeep did not start (a crash, a liveness restart) starts the count again.
            if status.pid != s.pid {
                if s.pid.is_some() {
                    s.jobs = 0;
                }
                s.pid = status.pid;
            }
            if matches!(outcome, JobOutcome::Failed { .. }) {
                if let Some(h) = &s.health {
                    if let Err(why) = crate::supervisor::check(&h.check, h.timeout).await {
                        return Some((
                            i,
                            Reason::Unresponsive,
                            format!("a job failed and it does not answer: {why}"),
                        ));
                    }
                }
            }
            let reading = Reading {
                jobs: s.jobs,
                rss: status.pid.and_then(crate::supervisor::group_rss),
                idle_vram: s.gpu.and_then(|g| (self.keep.gpu_memory_used)(g)),
            };
            if let Some((reason, text)) = planned(&s.limits, &reading) {
                return Some((i, reason, text));
            }
        }
        None
    }

    /// Restarts service `i` once the worker is parked between jobs, waits until it is healthy
    /// and releases the worker; `false` when stopped meanwhile.
    async fn restart(&mut self, i: usize, reason: Reason, text: &str, stop: &CancellationToken) -> bool {
        let name = self.services[i].name.clone();
        tokio::select! {
            () = stop.cancelled() => return false,
            parked = self.pause.parked() => if !parked { return false },
        }
        tracing::info!(worker = %self.worker, service = %name, reason = reason.label(), why = %text, "restarting the service between jobs");
        (self.keep.on_restart)(&name, reason.label());
        if let Err(e) = self.keep.supervisor.restart(&name).await {
            tracing::warn!(service = %name, error = %e, "failed to restart the service");
        }
        self.services[i].jobs = 0;
        self.services[i].pid = self.keep.supervisor.service(&name).ok().and_then(|s| s.pid);
        if let Ok(mut watch) = self.keep.supervisor.watch(std::slice::from_ref(&name)) {
            self.pause.hold(format!(
                "waiting for {name} to be healthy after its planned restart ({text})"
            ));
            tokio::select! {
                () = stop.cancelled() => return false,
                _ = watch.wait_healthy() => {}
            }
        }
        self.pause.release();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readings_past_a_limit_plan_a_restart() {
        let limits = Limits {
            rss: Some(100 << 20),
            idle_vram: Some(1 << 30),
            every_jobs: Some(3),
        };
        let r = |jobs, rss, vram| Reading {
            jobs,
            rss: Some(rss),
            idle_vram: Some(vram),
        };
        assert_eq!(planned(&limits, &r(2, 50 << 20, 1 << 29)), None);
        let (reason, text) = planned(&limits, &r(0, 200 << 20, 0)).unwrap();
        assert_eq!(reason, Reason::Rss);
        assert_eq!(text, "resident memory 200 MiB above restart_above_rss 100 MiB");
        assert_eq!(planned(&limits, &r(0, 0, 2 << 30)).unwrap().0, Reason::IdleVram);
        assert_eq!(planned(&limits, &r(3, 0, 0)).unwrap().0, Reason::EveryJobs);
        // Memory is named first when both are due.
        assert_eq!(planned(&limits, &r(3, 200 << 20, 0)).unwrap().0, Reason::Rss);
        // No limits, or nothing read: nothing planned.
        assert_eq!(planned(&Limits::default(), &r(1000, u64::MAX, u64::MAX)), None);
        assert_eq!(planned(&limits, &Reading::default()), None);
    }
}

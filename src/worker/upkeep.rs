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
//!
//! After a job that did not complete (cancelled, stalled, failed), the service may still run
//! what the job left: ComfyUI stops an interrupted prompt only at the end of its node. A job
//! claimed meanwhile would wait behind it and that wait would count as silence, so the worker
//! is held (`service_busy`) until the connector says the service is idle
//! ([`Connector::idle`]), at most the connector's `idle_wait`; past it the service is
//! restarted like any planned restart (reason `busy`).
//!
//! A service with a warm-up job (`warmup`: a ComfyUI workflow, an A1111 prompt) runs it on each
//! run of the service (its first start and every restart, planned or not) once the service is
//! healthy, while the worker is held: the worker claims only after a warm-up succeeded. Its time
//! is logged and reported (`machine_service_warmup_seconds{service}`). A failing warm-up is a
//! failed start: the supervisor stops the service with the warm-up's error and its restart
//! policy applies (backoff, crash loop).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::hold::{HoldKind, Holds};
use super::pause::JobEnded;
use super::{Fate, WorkerState, WorkerStatus};
use crate::config::{ProbeSpec, ServiceConnectorConfig};
use crate::connectors::{Connector, Job, ProgressSink};
use crate::supervisor::SupervisorHandle;

/// How often an idle worker's services are read.
const IDLE_CHECK: Duration = Duration::from_secs(2);

/// Told of each planned restart: the service and the reason's label.
pub type OnRestart = Arc<dyn Fn(&str, &str) + Send + Sync>;

/// The used memory of a GPU in bytes, by NVML index, when it can be read.
pub type GpuMemoryUsed = Arc<dyn Fn(u32) -> Option<u64> + Send + Sync>;

/// Told of each successful warm-up: the service and its time in seconds.
pub type OnWarmup = Arc<dyn Fn(&str, f64) + Send + Sync>;

/// What the upkeep needs from the rest of the machine.
#[derive(Clone)]
pub struct KeepUp {
    /// Restarts the services and reads their pids.
    pub supervisor: SupervisorHandle,
    /// Told of each planned restart: the service and the reason's label.
    pub on_restart: OnRestart,
    /// The used memory of a GPU in bytes, by NVML index, when it can be read.
    pub gpu_memory_used: GpuMemoryUsed,
    /// Told of each successful warm-up.
    pub on_warmup: OnWarmup,
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
    /// After a job that did not complete, the service stayed busy for its `idle_wait`.
    Busy,
}

impl Reason {
    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Reason::Rss => "rss",
            Reason::IdleVram => "idle_vram",
            Reason::EveryJobs => "every_jobs",
            Reason::Unresponsive => "unresponsive",
            Reason::Busy => "busy",
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
    /// Its warm-up job and the connector that runs it.
    pub warmup: Option<(Arc<dyn Connector>, Job)>,
    /// The connector that talks to it, asked whether it is idle after a job that did not
    /// complete, and how long to wait for that.
    pub idle: Option<(Arc<dyn Connector>, Duration)>,
    jobs: u32,
    pid: Option<u32>,
    /// The run (pid) whose warm-up succeeded.
    warmed: Option<u32>,
}

impl Kept {
    /// A service to look after.
    pub fn new(name: String, gpu: Option<u32>, limits: Limits, health: Option<ProbeSpec>) -> Kept {
        Kept {
            name,
            gpu,
            limits,
            health,
            warmup: None,
            idle: None,
            jobs: 0,
            pid: None,
            warmed: None,
        }
    }

    /// Whether the service's current run still needs its warm-up.
    fn cold(&self, pid: Option<u32>) -> bool {
        self.warmup.is_some() && (pid.is_none() || pid != self.warmed)
    }
}

/// The upkeep of one worker's services.
#[derive(Debug)]
pub struct Upkeep {
    worker: String,
    services: Vec<Kept>,
    keep: KeepUp,
    /// The worker's holds, which the upkeep sets with [`HoldKind::PlannedRestart`] and
    /// [`HoldKind::WarmingUp`].
    holds: Holds,
    /// The worker's job ends, in order.
    ended: mpsc::Receiver<JobEnded>,
    status: watch::Receiver<WorkerStatus>,
}

impl Upkeep {
    /// The upkeep of `services` for the worker `worker`, holding it through `holds`, hearing of
    /// its job ends on `ended` and reading its state from `status`.
    pub fn new(
        worker: String,
        services: Vec<Kept>,
        keep: KeepUp,
        holds: Holds,
        ended: mpsc::Receiver<JobEnded>,
        status: watch::Receiver<WorkerStatus>,
    ) -> Upkeep {
        Upkeep {
            worker,
            services,
            keep,
            holds,
            ended,
            status,
        }
    }

    /// Looks after the services until `stop` (or until the worker is gone).
    pub async fn run(mut self, stop: CancellationToken) {
        let mut idle = tokio::time::interval(IDLE_CHECK);
        idle.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // A run of a service that has not warmed up (the first start, any restart) holds
            // the worker until its warm-up succeeded.
            if self.any_cold() {
                self.holds.set(HoldKind::WarmingUp, "warming up its services");
                if !self.warm_up(&stop).await {
                    return;
                }
                self.holds.clear(HoldKind::WarmingUp);
            }
            let due = tokio::select! {
                () = stop.cancelled() => return,
                ended = self.ended.recv() => {
                    let Some(ended) = ended else { return };
                    for s in &mut self.services {
                        s.jobs += 1;
                    }
                    let mut due = self.due(&ended.outcome).await;
                    let mut busy = Vec::new();
                    if let Some((i, _, text)) = &due {
                        self.holds.set(HoldKind::PlannedRestart, format!("restarting {} between jobs: {text}", self.services[*i].name));
                    } else {
                        if ended.outcome != Fate::Completed {
                            busy = self.busy().await;
                        }
                        if let Some(&i) = busy.first() {
                            let name = &self.services[i].name;
                            self.holds.set(HoldKind::ServiceBusy, format!("waiting for {name} to finish what the last job left"));
                        } else if self.any_cold() {
                            self.holds.set(HoldKind::WarmingUp, "warming up its services");
                        }
                    }
                    // The worker claims again only after this answer, so a planned restart (or
                    // a busy service) is held before it could.
                    let _ = ended.decided.send(());
                    if !busy.is_empty() {
                        match self.until_idle(&busy, &stop).await {
                            None => return,
                            Some(restart) => due = restart,
                        }
                        if let Some((i, _, text)) = &due {
                            self.holds.set(HoldKind::PlannedRestart, format!("restarting {} between jobs: {text}", self.services[*i].name));
                        }
                        self.holds.clear(HoldKind::ServiceBusy);
                    }
                    due
                }
                _ = idle.tick() => {
                    if self.status.borrow().state != WorkerState::Idle || self.any_cold() {
                        continue;
                    }
                    let due = self.due(&Fate::Completed).await;
                    if let Some((i, _, text)) = &due {
                        self.holds.set(HoldKind::PlannedRestart, format!("restarting {} between jobs: {text}", self.services[*i].name));
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

    /// The services whose connector says they still run something (a service that cannot be
    /// asked counts as idle: a dead one is the probes' business).
    async fn busy(&self) -> Vec<usize> {
        let mut busy = Vec::new();
        for (i, s) in self.services.iter().enumerate() {
            if let Some((connector, _)) = &s.idle {
                if matches!(connector.idle().await, Ok(false)) {
                    busy.push(i);
                }
            }
        }
        busy
    }

    /// Waits until the `busy` services are idle, each at most its `idle_wait`; returns the
    /// restart of the first that stayed busy (`Some(None)`: all idle; `None`: stopped).
    async fn until_idle(&self, busy: &[usize], stop: &CancellationToken) -> Option<Option<(usize, Reason, String)>> {
        const POLL: Duration = Duration::from_millis(100);
        let started = tokio::time::Instant::now();
        for &i in busy {
            let Some((connector, wait)) = &self.services[i].idle else {
                continue;
            };
            loop {
                match connector.idle().await {
                    Ok(false) => {}
                    Ok(true) | Err(_) => break,
                }
                if started.elapsed() >= *wait {
                    let text = format!(
                        "still busy {} after a job that did not complete (idle_wait)",
                        humantime::format_duration(*wait)
                    );
                    return Some(Some((i, Reason::Busy, text)));
                }
                tokio::select! {
                    () = stop.cancelled() => return None,
                    () = tokio::time::sleep(POLL) => {}
                }
            }
            tracing::info!(worker = %self.worker, service = %self.services[i].name, waited = ?started.elapsed(), "the service is idle again");
        }
        Some(None)
    }

    /// Whether a service's current run has not warmed up yet.
    fn any_cold(&self) -> bool {
        self.services.iter().any(|s| {
            let pid = self.keep.supervisor.service(&s.name).ok().and_then(|st| st.state.pid());
            s.cold(pid)
        })
    }

    /// Warms up every cold service: waits until it is healthy, runs its warm-up job, and on
    /// failure has the supervisor fail the run and waits for the next one. Returns `false` when
    /// stopped meanwhile.
    async fn warm_up(&mut self, stop: &CancellationToken) -> bool {
        for i in 0..self.services.len() {
            loop {
                let name = self.services[i].name.clone();
                let Ok(mut watch) = self.keep.supervisor.watch(std::slice::from_ref(&name)) else {
                    break;
                };
                // As soon as it serves, crash loop or not: the crash-loop flag stays up for
                // `stable_after`, and the worker waits for this warm-up.
                tokio::select! {
                    () = stop.cancelled() => return false,
                    r = watch.wait_serving() => if r.is_err() { return false },
                }
                let pid = self.keep.supervisor.service(&name).ok().and_then(|s| s.state.pid());
                let Some((connector, job)) = self.services[i].warmup.clone().filter(|_| self.services[i].cold(pid))
                else {
                    break;
                };
                self.holds.set(HoldKind::WarmingUp, format!("warming up {name}"));
                tracing::info!(worker = %self.worker, service = %name, "running the warm-up job");
                let started = std::time::Instant::now();
                let (sink, _progress) = ProgressSink::new();
                let cancel = stop.child_token();
                let ran = tokio::select! {
                    () = stop.cancelled() => return false,
                    r = connector.run(&job, &sink, &cancel) => r,
                };
                match ran {
                    Ok(_) => {
                        let took = started.elapsed();
                        tracing::info!(worker = %self.worker, service = %name, ?took, "warm-up done");
                        (self.keep.on_warmup)(&name, took.as_secs_f64());
                        self.services[i].warmed = pid;
                        break;
                    }
                    Err(e) => {
                        let reason = format!("warm-up failed: {}", e.chain());
                        tracing::warn!(worker = %self.worker, service = %name, %reason, "the service failed its warm-up");
                        if let Err(e) = self.keep.supervisor.fail(&name, &reason).await {
                            tracing::warn!(service = %name, error = %e, "failed to fail the service");
                        }
                        // Wait for the next run: the failed one is stopped and the restart
                        // policy decides when (and whether) it starts again.
                        let mut watch = match self.keep.supervisor.watch(std::slice::from_ref(&name)) {
                            Ok(w) => w,
                            Err(_) => break,
                        };
                        loop {
                            let now = self.keep.supervisor.service(&name).ok().and_then(|s| s.state.pid());
                            if now.is_some() && now != pid {
                                break;
                            }
                            tokio::select! {
                                () = stop.cancelled() => return false,
                                r = watch.changed() => if r.is_err() { return false },
                            }
                        }
                    }
                }
            }
        }
        true
    }

    /// The first service due for a restart, reading each one now.
    async fn due(&mut self, outcome: &Fate) -> Option<(usize, Reason, String)> {
        for i in 0..self.services.len() {
            let status = self.keep.supervisor.service(&self.services[i].name).ok()?;
            let s = &mut self.services[i];
            // A run the upkeep did not start (a crash, a liveness restart) starts the count again.
            if status.state.pid() != s.pid {
                if s.pid.is_some() {
                    s.jobs = 0;
                }
                s.pid = status.state.pid();
            }
            if matches!(outcome, Fate::Failed { .. }) {
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
                rss: status.state.pid().and_then(crate::supervisor::group_rss),
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
            parked = super::pause::parked(&mut self.status) => if !parked { return false },
        }
        tracing::info!(worker = %self.worker, service = %name, reason = reason.label(), why = %text, "restarting the service between jobs");
        (self.keep.on_restart)(&name, reason.label());
        if let Err(e) = self.keep.supervisor.restart(&name).await {
            tracing::warn!(service = %name, error = %e, "failed to restart the service");
        }
        self.services[i].jobs = 0;
        self.services[i].pid = self.keep.supervisor.service(&name).ok().and_then(|s| s.state.pid());
        if let Ok(mut watch) = self.keep.supervisor.watch(std::slice::from_ref(&name)) {
            self.holds.set(
                HoldKind::PlannedRestart,
                format!("waiting for {name} to be healthy after its planned restart ({text})"),
            );
            tokio::select! {
                () = stop.cancelled() => return false,
                _ = watch.wait_healthy() => {}
            }
        }
        // A new run that warms up stays held, now for its warm-up: the loop warms it up before
        // releasing.
        if self.any_cold() {
            self.holds.set(HoldKind::WarmingUp, "warming up its services");
        }
        self.holds.clear(HoldKind::PlannedRestart);
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

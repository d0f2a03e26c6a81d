//! Reloading a running machine: re-read the configuration, check all of it, and apply only the
//! difference between the running plan and the new one, without a restart.
//!
//! One operation, [`Reloader::reload`], reached three ways (SIGHUP, `POST /reload` with the
//! control token, `machine reload`), one at a time through [`serve`]. A dry run
//! (`POST /reload?dry_run=true`, what `machine config check --diff` asks) loads and compares
//! exactly as a reload does, in the machine with its environment, and changes nothing. It loads the
//! configuration file again, with `WORKER_CONNECTORS` taken from `<workspace>/worker_connectors`
//! when that file exists (a running process cannot see new environment variables), builds and
//! checks the new plan and its workers, and refuses an invalid one with every problem listed
//! before anything changes. Then it applies the [`PlanDiff`]:
//!
//! 1. removed and changed workers stop claiming and drain (in parallel; a job that does not
//!    finish within `drain` is returned to the queue with its place) and leave Redis;
//! 2. removed and changed services stop, in reverse dependency order;
//! 3. the installers of added connectors run (their progress on the status page);
//! 4. added and changed services start, in dependency order;
//! 5. added and changed workers start, each claiming once its services are ready;
//! 6. the status page, `/plan` and the fleet status show the new plan at once.
//!
//! Untouched services and workers keep running (same PIDs, warm models, jobs in flight).
//! Settings that belong to the machine as a whole ([`crate::config::MachineConfig`]: its id,
//! workspace, Redis, health port, GPU selection, supervisor, logging, the workers' timing) are
//! not changed by a reload: the report lists them as applying at the next restart (the lease
//! alone applies in place). What changed is compared as typed values ([`Config::changes`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, ConfigError, Problem, ProcessEnv};
use crate::gpu::Probe;
use crate::health::{HealthState, ReloadError, ReloadReport, ReloadRequest, Running};
use crate::installers::InstallProgress;
use crate::plan::{Plan, PlanDiff};
use crate::supervisor::SupervisorHandle;
use crate::worker::{Readiness, Worker, WorkerPool, WorkerStatus};

/// The running machine as a reload changes it. One per machine; [`serve`] runs its reloads one
/// at a time.
#[derive(Debug)]
pub struct Reloader {
    path: Option<PathBuf>,
    probe: Arc<Probe>,
    services: SupervisorHandle,
    pool: WorkerPool,
    readiness: Readiness,
    state: Arc<HealthState>,
    tracker: InstallProgress,
    shutdown: CancellationToken,
    /// Stops the readiness feeds of the services a reload started.
    feeds_stop: CancellationToken,
    feeds: Vec<JoinHandle<()>>,
}

/// What a reloader changes: the running machine's parts. The running configuration and plan
/// are the health state's [`crate::health::Running`], which a reload publishes.
#[derive(Debug)]
pub struct Parts {
    /// The configuration file `machine run` read, read again at each reload.
    pub path: Option<PathBuf>,
    /// The GPU probe of the start.
    pub probe: Arc<Probe>,
    /// The supervisor.
    pub services: SupervisorHandle,
    /// The workers.
    pub pool: WorkerPool,
    /// The readiness channels the running workers wait on.
    pub readiness: Readiness,
    /// The status page's state.
    pub state: Arc<HealthState>,
    /// The installers' progress, shown on the status page.
    pub tracker: InstallProgress,
    /// The machine's shutdown; a reload stops waiting for installers when it comes.
    pub shutdown: CancellationToken,
}

impl Reloader {
    /// A reloader of the running machine, reading the process environment.
    pub fn new(running: Parts) -> Reloader {
        Reloader {
            path: running.path,
            probe: running.probe,
            services: running.services,
            pool: running.pool,
            readiness: running.readiness,
            state: running.state,
            tracker: running.tracker,
            shutdown: running.shutdown,
            feeds_stop: CancellationToken::new(),
            feeds: Vec::new(),
        }
    }

    /// Loads, checks and applies the configuration as it is now (with `dry_run`, loads and
    /// checks only, and answers what a reload would do); see the module docs.
    pub async fn reload(&mut self, dry_run: bool) -> Result<ReloadReport, ReloadError> {
        if self.shutdown.is_cancelled() {
            return Err(ReloadError::Unavailable("it is shutting down"));
        }
        let running = self.state.running().borrow().clone();
        let next = self.prepare(&running)?;
        let mut report = ReloadReport {
            diff: next.diff.clone(),
            restart_required: next.restart_required.clone(),
            applied: next.new_lease.iter().map(|l| lease_applied(*l)).collect(),
            warnings: next.plan.warnings.clone(),
            config_file: self.path.clone(),
            dry_run,
        };
        if dry_run {
            return Ok(report);
        }
        // Workers are built before anything stops: one that cannot be built (an API key
        // missing) refuses the reload like any other problem.
        let starting = next.diff.workers_to_start(&next.plan);
        let built = self
            .pool
            .build(&next.applied, &self.probe, &next.plan, &starting)
            .map_err(|e| {
                ReloadError::Invalid(ConfigError::Invalid(vec![Problem {
                    key: "WORKER_CONNECTORS".to_owned(),
                    message: e.to_string(),
                }]))
            })?;
        report.applied = self.apply_settings(&next);
        if next.diff.is_empty() {
            tracing::info!("reload: nothing to change");
            // The settings outside the plan (a lease) are the running ones from now on.
            self.state.reloaded(&next.applied, &running.plan, Vec::new());
            return Ok(report);
        }
        let statuses = self.apply_plan(&running.plan, &next, built).await?;
        self.state.reloaded(&next.applied, &next.plan, statuses);
        Ok(report)
    }

    /// Loads the configuration, compares it with the running one and makes the new plan,
    /// changing nothing.
    fn prepare(&self, running: &Running) -> Result<Prepared, ReloadError> {
        let config = config::load_in(self.path.as_deref(), &ProcessEnv, &running.config.machine.workspace)
            .map_err(ReloadError::Invalid)?;
        let changes = running.config.changes(&config);
        let mut restart_required: Vec<String> = changes.restart.iter().map(|k| (*k).to_owned()).collect();
        // The lease alone of `[worker]` applies in place, from the next claim and renewal,
        // when the running heartbeat still renews it at least three times per lease.
        let old = &running.config.machine;
        let new_lease = old
            .lease_alone_changed(&config.machine)
            .filter(|lease| *lease >= old.worker.heartbeat * 3);
        if new_lease.is_some() {
            restart_required.retain(|k| k != "worker");
        }
        // What only a restart applies stays as it runs, and the new plan is made with it: a new
        // workspace or grace must not look like a change of every service.
        let mut machine = old.clone();
        machine.worker.lease = new_lease.unwrap_or(old.worker.lease);
        let applied = Config { machine, ..config };
        let plan = Plan::build(&applied, &self.probe)
            .and_then(|p| {
                let missing = p.missing_programs();
                if missing.is_empty() { Ok(p) } else { Err(missing) }
            })
            .map_err(|problems| ReloadError::Invalid(ConfigError::Invalid(problems)))?;
        let diff = PlanDiff::between(&running.plan, &plan, &changes.connectors);
        Ok(Prepared {
            applied,
            plan,
            diff,
            restart_required,
            new_lease,
        })
    }

    /// Applies the settings that change in place (the store's credentials, the lease); returns
    /// what was applied, in words.
    fn apply_settings(&self, next: &Prepared) -> Vec<String> {
        let mut applied = Vec::new();
        if self.pool.renew_credentials(&next.applied.plan.credentials) {
            tracing::info!("reload: the object stores (outputs and models) use the credentials read now");
            applied.push("output store credentials (read again)".to_owned());
        }
        if let Some(lease) = next.new_lease {
            if self.pool.set_lease(lease) {
                tracing::info!(lease = ?lease, "reload: the lease applies from the next claim");
            }
            applied.push(lease_applied(lease));
        }
        applied
    }

    /// Moves from the running plan to the new one: drains the workers that go, stops the
    /// services that go (reverse dependency order), installs what added connectors need, starts
    /// the added services and then the `built` workers. Returns the new workers' statuses.
    async fn apply_plan(
        &mut self,
        old: &Plan,
        next: &Prepared,
        built: Vec<(Worker, Vec<String>)>,
    ) -> Result<Vec<(String, watch::Receiver<WorkerStatus>)>, ReloadError> {
        let diff = &next.diff;
        tracing::info!(
            added = ?diff.workers.added,
            removed = ?diff.workers.removed,
            changed = ?diff.workers.changed,
            services_added = ?diff.services.added,
            services_removed = ?diff.services.removed,
            services_changed = ?diff.services.changed,
            "reload: applying the new plan"
        );

        let stopping: Vec<String> = diff.workers_to_stop().into_iter().map(str::to_owned).collect();
        let drains = stopping.iter().map(|id| self.pool.remove(id));
        for (id, drained) in stopping.iter().zip(futures_util::future::join_all(drains).await) {
            drained.map_err(|e| apply(format!("stop worker {id}"), e))?;
        }
        self.state.forget_workers(&stopping);

        for spec in diff.services_to_stop(old) {
            self.services
                .remove(&spec.name)
                .await
                .map_err(|e| apply(format!("stop service {}", spec.name), e))?;
            self.readiness.remove(&spec.name);
        }

        let new_installers: Vec<&'static str> = next
            .plan
            .installers
            .iter()
            .copied()
            .filter(|i| !old.installers.contains(i))
            .collect();
        if !new_installers.is_empty() {
            tokio::select! {
                r = crate::installers::before_services(&next.applied, &new_installers, &self.tracker, self.shutdown.child_token()) => {
                    r.map_err(|e| apply("install the added connectors".to_owned(), e))?;
                }
                () = self.shutdown.cancelled() => return Err(ReloadError::Unavailable("it is shutting down")),
            }
        }

        for spec in diff.services_to_start(&next.plan) {
            self.services
                .add(spec.clone())
                .map_err(|e| apply(format!("start service {}", spec.name), e))?;
            if let Some((rx, feed)) = self.services.readiness(&spec.name, &self.feeds_stop) {
                self.readiness.insert(spec.name.clone(), rx);
                self.feeds.push(feed);
            }
        }

        let mut statuses = Vec::new();
        for (worker, waits_for) in built {
            let gates = waits_for
                .iter()
                .filter_map(|s| self.readiness.get(s).cloned())
                .collect();
            statuses.push((worker.id().to_owned(), worker.status()));
            let id = worker.id().to_owned();
            self.pool
                .add(worker, gates)
                .map_err(|e| apply(format!("start worker {id}"), e))?;
        }
        Ok(statuses)
    }

    /// Stops the readiness feeds this reloader started.
    pub async fn stop(self) {
        self.feeds_stop.cancel();
        for feed in self.feeds {
            let _ = feed.await;
        }
    }
}

/// How the report names a lease applied in place.
/// A reload made and compared, before anything changes.
struct Prepared {
    /// The new configuration, with what only a restart applies kept as it runs.
    applied: Config,
    plan: Plan,
    diff: PlanDiff,
    /// The settings that changed but apply only at the next start.
    restart_required: Vec<String>,
    /// The lease that applies in place, when it alone of `[worker]` changed.
    new_lease: Option<std::time::Duration>,
}

fn lease_applied(lease: std::time::Duration) -> String {
    format!(
        "worker.lease = {} (from the next claim)",
        humantime::format_duration(lease)
    )
}

fn apply(step: String, e: impl std::error::Error + Send + Sync + 'static) -> ReloadError {
    ReloadError::Apply {
        step,
        source: Box::new(e),
    }
}

/// Runs reloads one at a time until `stop` or the machine's shutdown (no reload starts once it
/// has begun): each request's result goes back to its sender, and each `hup` (SIGHUP) reloads
/// with the result logged.
pub async fn serve(
    mut reloader: Reloader,
    mut requests: mpsc::Receiver<ReloadRequest>,
    hup: Arc<Notify>,
    stop: CancellationToken,
) {
    let shutdown = reloader.shutdown.clone();
    loop {
        let request = tokio::select! {
            () = stop.cancelled() => break,
            () = shutdown.cancelled() => break,
            () = hup.notified() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                None
            }
            Some(request) = requests.recv() => Some(request),
        };
        let dry_run = request.as_ref().is_some_and(|r| r.dry_run);
        let result = reloader.reload(dry_run).await;
        match &result {
            // A dry run changed nothing: not news for the log.
            _ if dry_run => tracing::debug!(ok = result.is_ok(), "reload dry run answered"),
            Ok(report) => tracing::info!(
                restart_required = ?report.restart_required,
                "reload done: {}",
                report.diff.to_string().trim_end().replace('\n', "; ")
            ),
            Err(e) => {
                let problems: BTreeMap<&str, &str> = e
                    .problems()
                    .iter()
                    .map(|p| (p.key.as_str(), p.message.as_str()))
                    .collect();
                tracing::error!(?problems, "reload failed: {}", crate::logging::error_chain(e));
            }
        }
        if let Some(request) = request {
            let _ = request.reply.send(result);
        }
    }
    reloader.stop().await;
}

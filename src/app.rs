//! The top level of `machine run`: starts the subsystems as named tasks in order, waits for a
//! shutdown signal (SIGTERM/SIGINT, `POST /shutdown`) or a failed critical service, and stops
//! them in the reverse order.
//!
//! Start: open-files limit → workspace and its lock (one machine per workspace) → the health
//! port is bound → signals and the orphan reaper → health server (it answers from the first
//! moment, `starting`) → installers → supervisor (services in dependency order; in local mode
//! the private redis-server first) → broker (retried until Redis answers) → workers and the
//! fleet status publisher.
//!
//! Stop: workers stop claiming and drain (a job that does not finish within the drain period is
//! returned to the queue) while their services still run → the supervisor stops the services
//! (reverse dependency order, each within its grace) → the last fleet message (`shutdown`; in
//! local mode before the services stop, as its Redis is one of them) →
//! the sweep kills and reaps whatever is left (as PID 1: everything in the namespace) → the
//! health server stops.
//!
//! While it runs, a reload (SIGHUP, `POST /reload`, `machine reload`) changes the services and
//! workers in place; see [`crate::reload`].
//!
//! A second SIGTERM/SIGINT skips the drain: workers return their jobs at once, services and
//! leftovers are SIGKILLed, and the machine exits within a second.
//!
//! How it ended is an [`Ended`], which the CLI maps to the exit code (beside its 2 for invalid
//! configuration): 0 after a clean shutdown, 1 when a subsystem could not start (before any job
//! is claimed, with the reason), 3 when a `critical` service failed, 4 when a second signal
//! forced the shutdown, 5 when a GPU faulted and `gpu.on_fault = "exit"` (after the workers
//! returned their jobs).
//!
//! Beside the workers, the GPU health monitor ([`crate::gpu::watch_health`]) runs from the
//! start; a GPU that faults holds its worker (which returns its job), and once that worker is
//! off the job its services are stopped, or the whole machine exits (`on_fault = "exit"`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Env, ProcessEnv};
use crate::gpu::Probe;
use crate::health::{self, HealthState, Sources};
use crate::installers::{self, Tracker};
use crate::logging::error_chain;
use crate::plan::Plan;
use crate::supervisor::{self, ServiceState, ServicesWatch, Signals, Supervisor, SupervisorHandle};
use crate::worker::{self, JobOutcome, Readiness, Workers};

/// How `machine run` ended; the CLI maps it to the exit code (`cli/exit.rs`). The reason for a
/// failure has been logged by then, through the machine's log (text or JSON).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// A clean shutdown.
    Stopped,
    /// A subsystem could not start (before any job was claimed).
    FailedToStart,
    /// A `critical` service failed and took the machine down.
    CriticalFailed,
    /// A second SIGTERM/SIGINT stopped everything at once.
    Forced,
    /// A GPU faulted and `gpu.on_fault = "exit"` asked the fleet to replace the box.
    GpuFault,
}

/// How long the final sweep gives leftover processes between SIGTERM and SIGKILL.
const SWEEP_GRACE: Duration = Duration::from_secs(2);
/// Slack beyond the workers' drain period before the machine stops waiting for them.
const DRAIN_SLACK: Duration = Duration::from_secs(10);

/// How long forced workers get to return their jobs before the machine stops waiting.
const FORCED_RETURN: Duration = Duration::from_millis(500);

/// Why `machine run` could not start; each is exit 1, logged before any job is claimed.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The workspace directories could not be created.
    #[error("failed to prepare the workspace {path}")]
    Workspace {
        /// The workspace.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another machine runs on this workspace.
    #[error("the workspace {path} is in use by another machine (pid {pid}); one workspace runs one machine")]
    Locked {
        /// The lock file.
        path: PathBuf,
        /// The holder's pid as it wrote it, or `unknown`.
        pid: String,
    },
    /// The lock file could not be opened or locked.
    #[error("failed to lock the workspace through {path}")]
    Lock {
        /// The lock file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The health server's port could not be bound.
    #[error("failed to start the health server")]
    Health(#[source] health::HealthError),
}

/// Runs the machine until it is asked to stop.
/// `path` is the configuration file, read again at each reload.
pub async fn run(config: Config, probe: Probe, plan: Plan, path: Option<&Path>) -> Ended {
    tracing::info!(
        machine_id = %config.machine_id,
        gpus = probe.gpus.len(),
        workers = plan.workers.len(),
        services = plan.services.len(),
        redis = %config.broker_url().masked(),
        local_mode = config.redis.is_none(),
        pid1 = std::process::id() == 1,
        "machine starting"
    );
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    for worker in &plan.workers {
        let connectors: Vec<&str> = worker.connectors.iter().map(|c| c.kind.name()).collect();
        tracing::info!(worker = %worker.id, ?connectors, waits_for = ?worker.waits_for, "worker planned");
    }
    supervisor::raise_open_files_limit();
    let started = async {
        prepare_workspace(&config).map_err(|source| StartError::Workspace {
            path: config.workspace.clone(),
            source,
        })?;
        let lock = lock_workspace(&config)?;
        let listener = health::bind(config.health_port).await.map_err(StartError::Health)?;
        Ok::<_, StartError>((lock, listener))
    };
    let (_lock, listener) = match started.await {
        Ok(started) => started,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return Ended::FailedToStart;
        }
    };

    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return Ended::FailedToStart;
        }
    };
    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    let finished = CancellationToken::new();
    let hup = Arc::new(Notify::new());
    let signal_task = tokio::spawn(signals.run(shutdown.clone(), force.clone(), finished.clone(), hup.clone()));
    let reaper_stop = CancellationToken::new();
    let reaper = tokio::spawn(supervisor::run_reaper(reaper_stop.clone()));

    let reload = ReloadInputs {
        path: path.map(Path::to_path_buf),
        hup,
    };
    let ended = run_subsystems(&config, probe, &plan, listener, &shutdown, &force, reload).await;

    supervisor::sweep(if force.is_cancelled() {
        Duration::ZERO
    } else {
        SWEEP_GRACE
    })
    .await;
    reaper_stop.cancel();
    match reaper.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("{}", error_chain(&e)),
        Err(e) => tracing::error!("the reaper task failed: {e}"),
    }
    finished.cancel();
    let _ = signal_task.await;
    tracing::info!("machine stopped");
    ended
}

/// What the reloader needs from `run`: the configuration file and the SIGHUP requests.
struct ReloadInputs {
    path: Option<PathBuf>,
    hup: Arc<Notify>,
}

/// Everything between the signal handlers and the final sweep.
async fn run_subsystems(
    config: &Config,
    probe: Probe,
    plan: &Plan,
    listener: tokio::net::TcpListener,
    shutdown: &CancellationToken,
    force: &CancellationToken,
    reload: ReloadInputs,
) -> Ended {
    let probe = Arc::new(probe);
    let services = plan.start_order().into_iter().cloned().collect();
    let supervisor = match Supervisor::new(services, &config.supervisor, &config.workspace) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return Ended::FailedToStart;
        }
    };
    let handle = supervisor.handle();
    let mut workers = match Workers::build(config, &probe, plan, &ProcessEnv) {
        Ok(mut w) => {
            w.force_on(force);
            w
        }
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return Ended::FailedToStart;
        }
    };
    let tracker = Tracker::new();
    let state = HealthState::new(
        config,
        plan,
        probe.clone(),
        Sources {
            services: handle.clone(),
            workers: workers.statuses(),
            installs: tracker.subscribe(),
            models: workers.models(),
            force: force.clone(),
        },
        shutdown.clone(),
    );
    workers.keep_up(keep_up(&handle, &state, probe.clone()));
    let server_stop = CancellationToken::new();
    // Without its socket the machine still runs; the commands then reach it on the health port.
    let control = health::control::bind(&config.workspace)
        .inspect_err(|e| tracing::error!("{}", error_chain(e)))
        .ok();
    let server = spawn_named(
        "health",
        health::run(state.clone(), listener, control, server_stop.clone()),
    );
    let gpu_watch = tokio::spawn(crate::gpu::watch_health(
        probe.clone(),
        config.gpu.health_poll,
        server_stop.clone(),
    ));

    // Installers feed the services, so they run first; a shutdown meanwhile kills their commands.
    // The workers scan their models only when they start, after this, so what the installers
    // download on this boot is in the capabilities they register with.
    let installed = tokio::select! {
        r = installers::before_services(config, plan, &tracker, shutdown.child_token()) => r.map(|_| ()),
        () = shutdown.cancelled() => Ok(()),
    };
    let ended = match installed {
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            Ended::FailedToStart
        }
        Ok(()) if shutdown.is_cancelled() => Ended::Stopped,
        Ok(()) => {
            let reloader = |services, pool, readiness| {
                crate::reload::Reloader::new(crate::reload::Running {
                    path: reload.path,
                    config: config.clone(),
                    plan: plan.clone(),
                    probe,
                    services,
                    pool,
                    readiness,
                    state: state.clone(),
                    tracker,
                    shutdown: shutdown.clone(),
                })
            };
            run_services_and_workers(
                config,
                plan,
                supervisor,
                workers,
                &state,
                shutdown,
                force,
                (reloader, reload.hup),
            )
            .await
        }
    };

    server_stop.cancel();
    join("health", server).await;
    join("gpu-health", gpu_watch).await;
    ended
}

#[expect(
    clippy::too_many_arguments,
    reason = "the machine's parts, each used once, in one place"
)]
async fn run_services_and_workers(
    config: &Config,
    plan: &Plan,
    supervisor: Supervisor,
    workers: Workers,
    state: &Arc<HealthState>,
    shutdown: &CancellationToken,
    force: &CancellationToken,
    (reloader, hup): (
        impl FnOnce(SupervisorHandle, worker::WorkerPool, Readiness) -> crate::reload::Reloader,
        Arc<Notify>,
    ),
) -> Ended {
    let handle = supervisor.handle();
    let gpu_exit = CancellationToken::new();
    // The services outlive the workers: they stop only after the workers have drained.
    let services_stop = CancellationToken::new();
    let sup_task = tokio::spawn(supervisor.run(services_stop.clone(), force.clone()));
    let feeds_stop = CancellationToken::new();
    let mut feeds = Vec::new();
    let readiness = readiness(&handle, plan, &feeds_stop, &mut feeds);
    feeds.push(spawn_metrics_feed(state, workers.reports(), feeds_stop.clone()));
    feeds.push(spawn_limits_feed(state, workers.pool(), feeds_stop.clone()));
    // Reloads run one at a time on their own task, from SIGHUP and `POST /reload`.
    let reload_stop = CancellationToken::new();
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(8);
    state.serve_reloads(reload_tx);
    let reloads = tokio::spawn(crate::reload::serve(
        reloader(handle.clone(), workers.pool(), readiness.clone()),
        reload_rx,
        hup,
        reload_stop.clone(),
    ));
    feeds.push(tokio::spawn(on_gpu_faults(
        state.gpu_health(),
        plan.clone(),
        handle.clone(),
        workers.statuses(),
        config.gpu.on_fault,
        gpu_exit.clone(),
        feeds_stop.clone(),
    )));

    let workers_stop = CancellationToken::new();
    let fleet_stop = CancellationToken::new();
    feeds.push(spawn_ready_line(state, feeds_stop.clone()));
    let jobs = {
        let (config, state, workers_stop, fleet_stop, feeds_stop) = (
            config.clone(),
            state.clone(),
            workers_stop.clone(),
            fleet_stop.clone(),
            feeds_stop.clone(),
        );
        let job_services: Vec<String> = plan
            .workers
            .iter()
            .flat_map(|w| w.job_services())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        tokio::spawn(async move {
            let failed = |error: &str| {
                state.set_redis(|r| {
                    r.connected = false;
                    r.last_error = Some(error.to_owned());
                });
            };
            let Some(broker) = worker::connect_broker(&config, &workers_stop, &failed).await else {
                return (Ok(()), None, None);
            };
            state.set_redis(|r| {
                r.connected = true;
                r.last_error = None;
            });
            state.set_broker(broker.clone());
            // `connect_broker` loaded the library, so Redis runs this binary's version.
            state.set_redis(|r| r.function_version = Some(broker.library_version().to_owned()));
            let metrics = state.metrics().clone();
            broker.observe_claims(Arc::new(move |took, claimed| {
                metrics.claim(took.as_secs_f64(), claimed)
            }));
            let health_url = format!(
                "http://{}:{}/health",
                ProcessEnv.hostname().unwrap_or_else(|| "localhost".to_owned()),
                config.health_port
            );
            let fleet = tokio::spawn(health::fleet::run(
                state.clone(),
                broker.clone(),
                health_url,
                fleet_stop,
            ));
            let queue = spawn_queue_feed(&state, broker.clone(), job_services, feeds_stop);
            let result = workers.run(broker, &readiness, workers_stop).await;
            (result, Some(fleet), Some(queue))
        })
    };

    tokio::select! {
        () = shutdown.cancelled() => {}
        name = handle.critical_failure() => {
            tracing::error!(service = %name, "a critical service failed; shutting the machine down");
            shutdown.cancel();
        }
        () = gpu_exit.cancelled() => {
            tracing::error!("a GPU faulted and gpu.on_fault = \"exit\": returning every job and exiting");
            // The box is to be replaced: no job waits out the drain on it.
            force.cancel();
            shutdown.cancel();
        }
    }

    reload_stop.cancel();
    workers_stop.cancel();
    // A second signal cuts the drain short: the workers return their jobs at once (see
    // `Workers::force_on`), and the machine waits for that only briefly.
    let drained = async {
        tokio::select! {
            r = jobs => Ok(r),
            () = async {
                force.cancelled().await;
                tokio::time::sleep(FORCED_RETURN).await;
            } => Err(()),
        }
    };
    let (mut fleet, queue) = match tokio::time::timeout(config.worker.drain + DRAIN_SLACK, drained).await {
        Ok(Err(())) => {
            tracing::warn!("the workers did not return their jobs in time; their leases will");
            (None, None)
        }
        Ok(Ok(Ok((result, fleet, queue)))) => {
            if let Err(e) = result {
                tracing::error!("{}", error_chain(&e));
            }
            (fleet, queue)
        }
        Ok(Ok(Err(e))) => {
            tracing::error!("the workers' task failed: {e}");
            (None, None)
        }
        Err(_) => {
            tracing::error!("the workers did not stop within the drain period");
            (None, None)
        }
    };
    feeds.extend(queue);
    // In local mode Redis is one of the services: the last fleet message goes out before it
    // stops. Otherwise the last message comes after the services stopped, and shows them so.
    if config.redis.is_none() {
        fleet_stop.cancel();
        if let Some(fleet) = fleet.take() {
            join("fleet-status", fleet).await;
        }
    }
    services_stop.cancel();
    match sup_task.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("{}", error_chain(&e)),
        Err(e) => tracing::error!("the supervisor task failed: {e}"),
    }
    fleet_stop.cancel();
    if let Some(fleet) = fleet {
        join("fleet-status", fleet).await;
    }
    join("reload", reloads).await;
    feeds_stop.cancel();
    for feed in feeds {
        join("feed", feed).await;
    }
    if gpu_exit.is_cancelled() {
        Ended::GpuFault
    } else if handle.critical_failed().is_some() {
        Ended::CriticalFailed
    } else if force.is_cancelled() {
        Ended::Forced
    } else {
        Ended::Stopped
    }
}

/// Reacts to GPUs that fault: with `on_fault = "exit"` cancels `exit`; otherwise, once the
/// faulted GPU's worker is off its job (it returns it, see [`crate::worker::hold`]), stops the
/// services that worker waits for, so nothing keeps using the broken GPU.
async fn on_gpu_faults(
    mut faults: watch::Receiver<Vec<crate::gpu::GpuHealth>>,
    plan: Plan,
    handle: SupervisorHandle,
    statuses: Vec<(String, watch::Receiver<worker::WorkerStatus>)>,
    on_fault: crate::config::OnFault,
    exit: CancellationToken,
    stop: CancellationToken,
) {
    let mut handled = BTreeSet::new();
    loop {
        let faulted: Vec<u32> = faults
            .borrow_and_update()
            .iter()
            .filter(|g| g.health == crate::gpu::Condition::Faulted && !handled.contains(&g.index))
            .map(|g| g.index)
            .collect();
        for index in faulted {
            handled.insert(index);
            if on_fault == crate::config::OnFault::Exit {
                exit.cancel();
                return;
            }
            for wp in plan.workers.iter().filter(|w| w.gpu == Some(index)) {
                if let Some((_, status)) = statuses.iter().find(|(id, _)| *id == wp.id) {
                    let mut status = status.clone();
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = status.wait_for(|s| s.current_job.is_none()) => {}
                    }
                }
                for service in &wp.waits_for {
                    tracing::warn!(gpu = index, service = %service, "stopping a service of the faulted GPU");
                    if let Err(e) = handle.stop(service).await {
                        tracing::warn!(service = %service, error = %error_chain(&e), "failed to stop a service of the faulted GPU");
                    }
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = faults.changed() => if changed.is_err() { return },
        }
    }
}

/// What the upkeep of the workers' services uses: the supervisor, the metrics that count its
/// planned restarts, and the GPUs' used memory.
fn keep_up(handle: &SupervisorHandle, state: &Arc<HealthState>, probe: Arc<Probe>) -> worker::upkeep::KeepUp {
    let (metrics, warmups) = (state.metrics().clone(), state.metrics().clone());
    worker::upkeep::KeepUp {
        supervisor: handle.clone(),
        on_restart: Arc::new(move |service, reason| metrics.planned_restart(service, reason)),
        on_warmup: Arc::new(move |service, seconds| warmups.warmup(service, seconds)),
        gpu_memory_used: Arc::new(move |gpu| {
            probe
                .live()
                .into_iter()
                .find(|g| g.index == gpu)
                .and_then(|g| g.memory_used_bytes)
        }),
    }
}

/// One readiness channel per service a worker waits for, fed from the supervisor: `true` while
/// the service is running, its readiness probe passes and it is live. A service recovering from
/// a crash loop counts as ready as soon as its probe passes again: the crash-loop flag, which
/// stays up until the run has lasted `stable_after`, is for operators and restart backoff, not
/// a reason to keep a working service idle for a minute.
fn readiness(
    handle: &SupervisorHandle,
    plan: &Plan,
    stop: &CancellationToken,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Readiness {
    let names: BTreeSet<&String> = plan.workers.iter().flat_map(|w| &w.waits_for).collect();
    let mut readiness = Readiness::new();
    for name in names {
        if let Some((rx, task)) = readiness_feed(handle, name, stop) {
            tasks.push(task);
            readiness.insert(name.clone(), rx);
        }
    }
    readiness
}

/// The readiness channel of one service and the task that feeds it, until `stop` or until the
/// service is removed; `None` when the supervisor has no such service.
pub(crate) fn readiness_feed(
    handle: &SupervisorHandle,
    name: &str,
    stop: &CancellationToken,
) -> Option<(watch::Receiver<bool>, JoinHandle<()>)> {
    let mut watch = handle.watch(&[name.to_owned()]).ok()?;
    let (tx, rx) = watch::channel(serving(&watch));
    let stop = stop.clone();
    let task = tokio::spawn(async move {
        loop {
            let _ = tx.send(serving(&watch));
            tokio::select! {
                () = stop.cancelled() => break,
                changed = watch.changed() => if changed.is_err() { break },
            }
        }
    });
    Some((rx, task))
}

/// Every few seconds, reads the fleet-wide usage of each limited external API from Redis into
/// the metrics, `/status` and the fleet status.
fn spawn_limits_feed(state: &Arc<HealthState>, pool: worker::WorkerPool, stop: CancellationToken) -> JoinHandle<()> {
    let state = state.clone();
    tokio::spawn(async move {
        loop {
            // Read each round: a reload may add an API.
            for limiter in &pool.limiters() {
                let usage = limiter.usage().await.ok();
                let stats = limiter.stats();
                state.metrics().set_limiter(limiter.api(), usage.as_ref(), stats);
                state.set_external_api(
                    limiter.api(),
                    serde_json::json!({ "today": usage, "this_machine": stats }),
                );
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    })
}

/// Logs once, when the machine first becomes ready, how long that took since it started.
fn spawn_ready_line(state: &Arc<HealthState>, stop: CancellationToken) -> JoinHandle<()> {
    let state = state.clone();
    tokio::spawn(async move {
        // Readiness is derived from the installers', services' and workers' channels on every
        // read; a short poll reads it without a second copy of that rule.
        loop {
            if state.phase() == health::Phase::Ready {
                let took = crate::logging::started().elapsed();
                tracing::info!(
                    seconds = took.as_secs_f64(),
                    "machine ready in {:.2}s",
                    took.as_secs_f64()
                );
                break;
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    })
}

/// Every few seconds, reads from Redis how many jobs wait for each service the workers serve,
/// into the metrics; a sample that fails keeps the last figures.
fn spawn_queue_feed(
    state: &Arc<HealthState>,
    broker: crate::broker::Broker,
    services: Vec<String>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let metrics = state.metrics().clone();
    tokio::spawn(async move {
        if services.is_empty() {
            return;
        }
        loop {
            match tokio::time::timeout(Duration::from_secs(2), broker.queue_depth(&services)).await {
                Ok(Ok(depths)) => {
                    for (service, depth) in depths {
                        metrics.set_queue_depth(&service, depth);
                    }
                }
                Ok(Err(e)) => tracing::debug!("failed to sample the queue depth: {}", error_chain(&e)),
                Err(_) => tracing::debug!("sampling the queue depth timed out"),
            }
            tokio::select! {
                () = stop.cancelled() => break,
                () = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    })
}

/// Whether every watched service runs with its readiness and liveness probes passing.
fn serving(watch: &ServicesWatch) -> bool {
    watch
        .statuses()
        .iter()
        .all(|s| s.state == ServiceState::Running && s.ready && s.live)
}

/// Records every finished job in the metrics and in the status page's recent jobs.
fn spawn_metrics_feed(
    state: &Arc<HealthState>,
    mut reports: tokio::sync::broadcast::Receiver<worker::JobReport>,
    stop: CancellationToken,
) -> JoinHandle<()> {
    let metrics = state.metrics().clone();
    let state = Arc::clone(state);
    tokio::spawn(async move {
        loop {
            let report = tokio::select! {
                () = stop.cancelled() => break,
                r = reports.recv() => match r {
                    Ok(r) => r,
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                        tracing::warn!(missed = n, "metrics fell behind the job reports");
                        continue;
                    }
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
                },
            };
            let outcome = match report.outcome {
                JobOutcome::Completed => "completed",
                JobOutcome::Failed { .. } => "failed",
                JobOutcome::Returned => "returned",
                JobOutcome::Cancelled => "cancelled",
                JobOutcome::Lost => "lost",
            };
            state.record_job(&report);
            metrics.job(&report.service, "claimed");
            metrics.job(&report.service, outcome);
            metrics.job_duration(&report.service, report.run.as_secs_f64());
            if let Some(billing) = &report.billing {
                metrics.billing(billing);
            }
        }
    })
}

/// Creates the workspace and, in local mode, the private redis-server's socket and data
/// directories (redis-server refuses to start without them).
fn prepare_workspace(config: &Config) -> std::io::Result<()> {
    std::fs::create_dir_all(&config.workspace)?;
    if config.redis.is_none() {
        if let Some(dir) = config.local_redis_socket().parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::create_dir_all(config.local_redis_dir())?;
    }
    Ok(())
}

/// Takes the exclusive lock of the workspace for as long as the returned file is open, and
/// writes this process's pid into it for the next one to name. The lock is `flock(2)`, so the
/// kernel releases it however this process ends; the file is close-on-exec, so no service
/// inherits it.
fn lock_workspace(config: &Config) -> Result<std::fs::File, StartError> {
    use fs4::fs_std::FileExt;
    use std::io::{Read, Seek, Write};
    let path = config.workspace.join("machine.lock");
    let failed = |source| StartError::Lock {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(failed)?;
    if !file.try_lock_exclusive().map_err(failed)? {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let pid = holder.trim();
        return Err(StartError::Locked {
            path,
            pid: if pid.is_empty() {
                "unknown".to_owned()
            } else {
                pid.to_owned()
            },
        });
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(failed)?;
    Ok(file)
}

/// Spawns a subsystem as a task that logs its error.
fn spawn_named<E: std::error::Error + Send + 'static>(
    name: &'static str,
    fut: impl Future<Output = Result<(), E>> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = fut.await {
            tracing::error!(task = name, "{}", error_chain(&e));
        }
    })
}

async fn join(name: &str, task: JoinHandle<()>) {
    match tokio::time::timeout(Duration::from_secs(10), task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(task = name, "task panicked: {e}"),
        Err(_) => tracing::error!(task = name, "task did not stop within 10 s"),
    }
}

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

mod feeds;
pub mod reload;
mod workspace;

pub(crate) use feeds::readiness_feed;
pub(crate) use workspace::{lock_path, machine_holds};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, Env, ProcessEnv};
use crate::gpu::Probe;
use crate::health::{self, HealthState, Sources};
use crate::installers::{self, Tracker};
use crate::logging::error_chain;
use crate::plan::Plan;
use crate::supervisor::{self, Signals, Supervisor, SupervisorHandle};
use crate::worker::{self, Readiness, Workers};
use feeds::{
    keep_up, on_gpu_faults, readiness, spawn_limits_feed, spawn_metrics_feed, spawn_queue_feed, spawn_ready_line,
};
pub(crate) use workspace::lock_workspace;
use workspace::prepare_workspace;

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
/// Slack beyond the workers' drain period before the machine stops waiting for them: enough
/// to return the jobs the drain cut off, short enough that a Redis that never answers does not
/// hold the machine past the drain plus a second (the leases return those jobs instead).
const DRAIN_SLACK: Duration = Duration::from_millis(800);

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
        machine_id = %config.machine.machine_id,
        gpus = probe.gpus.len(),
        workers = plan.workers.len(),
        services = plan.services.len(),
        redis = %config.machine.broker_url().masked(),
        local_mode = config.machine.redis.is_none(),
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
            path: config.machine.workspace.clone(),
            source,
        })?;
        let lock = lock_workspace(&config)?;
        let listener = health::bind(config.machine.health_port)
            .await
            .map_err(StartError::Health)?;
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
    let supervisor = match Supervisor::new(services, &config.machine.supervisor, &config.machine.workspace) {
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
    let redis_health = crate::broker::RedisHealth::new();
    let state = HealthState::new(
        health::Running {
            config: config.clone(),
            plan: plan.clone(),
            workers: workers.statuses(),
        },
        probe.clone(),
        Sources {
            services: handle.clone(),
            installs: tracker.subscribe(),
            models: workers.models(),
            force: force.clone(),
            redis: redis_health.clone(),
        },
        shutdown.clone(),
    );
    workers.keep_up(keep_up(&handle, &state, probe.clone()));
    let server_stop = CancellationToken::new();
    // Without its socket the machine still runs; the commands then reach it on the health port.
    let control = health::control::bind(&config.machine.workspace)
        .inspect_err(|e| tracing::error!("{}", error_chain(e)))
        .ok();
    let server = spawn_named(
        "health",
        health::run(state.clone(), listener, control, server_stop.clone()),
    );
    let gpu_watch = tokio::spawn(crate::gpu::watch_health(
        probe.clone(),
        config.machine.gpu.health_poll,
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
                reload::Reloader::new(reload::Parts {
                    path: reload.path,
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
        impl FnOnce(SupervisorHandle, worker::WorkerPool, Readiness) -> reload::Reloader,
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
    state.serve_workers(workers.pool());
    let reloads = tokio::spawn(reload::serve(
        reloader(handle.clone(), workers.pool(), readiness.clone()),
        reload_rx,
        hup,
        reload_stop.clone(),
    ));
    feeds.push(tokio::spawn(on_gpu_faults(
        state.gpu_health(),
        state.running(),
        handle.clone(),
        config.machine.gpu.on_fault,
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
        tokio::spawn(async move {
            let Some(broker) = worker::connect_broker(&config, state.redis_health(), &workers_stop).await else {
                return (Ok(()), None, None);
            };
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
                config.machine.health_port
            );
            let fleet = tokio::spawn(health::fleet::run(
                state.clone(),
                broker.clone(),
                health_url,
                fleet_stop,
            ));
            let queue = spawn_queue_feed(&state, broker.clone(), feeds_stop);
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
    let (mut fleet, queue) = match tokio::time::timeout(config.machine.worker.drain + DRAIN_SLACK, drained).await {
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
    if config.machine.redis.is_none() {
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

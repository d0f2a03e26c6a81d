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
//! Each of them is one entry in one ordered list ([`subsystems`]), and the stop is that list
//! drained in reverse, each within its deadline: workers stop claiming and drain (a job that does
//! not finish within the drain period is returned to the queue) while their services still run
//! → the supervisor stops the services (reverse dependency order, each within its grace) → the
//! last fleet message (`shutdown`; in local mode before the services stop, as its Redis is one
//! of them) → the reloads and feeds → the health server stops → the sweep kills and reaps
//! whatever is left (as PID 1: everything in the namespace).
//!
//! While it runs, a reload (SIGHUP, `POST /reload`, `machine reload`) changes the services and
//! workers in place; see [`reload`].
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
mod subsystems;
mod workspace;

pub(crate) use workspace::{lock_path, machine_holds};

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::{Config, Env, ProcessEnv};
use crate::gpu::Probe;
use crate::health::{self, HealthState, Sources};
use crate::installers::{self, InstallProgress};
use crate::logging::error_chain;
use crate::plan::Plan;
use crate::supervisor::{self, Signals, Supervisor, SupervisorHandle};
use crate::worker::Workers;
use feeds::{keep_up, limits_feed, metrics_feed, on_gpu_faults, queue_feed, readiness, ready_line};
use subsystems::{Deadline, Subsystems};
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
    log_start(&config, &probe, &plan);
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

    let machine = Machine {
        shutdown: CancellationToken::new(),
        force: CancellationToken::new(),
        hup: Arc::new(Notify::new()),
        path: path.map(Path::to_path_buf),
    };
    let mut subsystems = Subsystems::new(machine.force.clone());
    // The signal handlers stop last: a second signal forces even the end of the drain.
    subsystems.start("signals", Deadline::of(STOP), |stop| {
        signals.run(
            machine.shutdown.clone(),
            machine.force.clone(),
            stop,
            machine.hup.clone(),
        )
    });
    subsystems.start("reaper", Deadline::of(STOP), |stop| {
        logged("reaper", supervisor::run_reaper(stop))
    });
    // The sweep kills and reaps whatever is left once everything started after it has stopped.
    let force = machine.force.clone();
    subsystems.start("sweep", Deadline::of(SWEEP_GRACE + STOP), |stop| async move {
        stop.cancelled().await;
        supervisor::sweep(if force.is_cancelled() {
            Duration::ZERO
        } else {
            SWEEP_GRACE
        })
        .await;
    });

    let outcome = start_subsystems(&mut subsystems, &machine, &config, probe, &plan, listener).await;
    subsystems.drain().await;
    tracing::info!("machine stopped");
    outcome.ended(&machine.force)
}

/// Logs what the machine is about to run.
fn log_start(config: &Config, probe: &Probe, plan: &Plan) {
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
}

/// How long a subsystem other than the workers and the supervisor gets to stop.
const STOP: Duration = Duration::from_secs(10);

/// What every part of the running machine shares: the shutdown (the first signal, `POST
/// /shutdown`, a critical failure), the forced shutdown (a second signal), the SIGHUP reload
/// requests and the configuration file a reload reads again.
struct Machine {
    shutdown: CancellationToken,
    force: CancellationToken,
    hup: Arc<Notify>,
    path: Option<PathBuf>,
}

/// How far the start got, and what tells how the run ended once everything has stopped.
enum Reached {
    /// A subsystem could not start.
    FailedToStart,
    /// A shutdown came before the services started.
    StoppedEarly,
    /// The services and workers ran.
    Ran {
        /// Cancelled when a GPU faulted and `gpu.on_fault = "exit"`.
        gpu_exit: CancellationToken,
        /// The supervisor, which knows whether a critical service failed.
        services: SupervisorHandle,
    },
}

impl Reached {
    fn ended(&self, force: &CancellationToken) -> Ended {
        match self {
            Reached::FailedToStart => Ended::FailedToStart,
            Reached::StoppedEarly => Ended::Stopped,
            Reached::Ran { gpu_exit, services } => {
                if gpu_exit.is_cancelled() {
                    Ended::GpuFault
                } else if services.critical_failed().is_some() {
                    Ended::CriticalFailed
                } else if force.is_cancelled() {
                    Ended::Forced
                } else {
                    Ended::Stopped
                }
            }
        }
    }
}

/// Starts everything between the signal handlers and the final sweep, in order, and waits for
/// the shutdown.
async fn start_subsystems(
    subsystems: &mut Subsystems,
    machine: &Machine,
    config: &Config,
    probe: Probe,
    plan: &Plan,
    listener: tokio::net::TcpListener,
) -> Reached {
    let probe = Arc::new(probe);
    let services = plan.start_order().into_iter().cloned().collect();
    let supervisor = match Supervisor::new(services, &config.machine.supervisor, &config.machine.workspace) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return Reached::FailedToStart;
        }
    };
    let handle = supervisor.handle();
    let mut workers = match Workers::build(config, &probe, plan) {
        Ok(mut w) => {
            w.force_on(&machine.force);
            w
        }
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return Reached::FailedToStart;
        }
    };
    let tracker = InstallProgress::new();
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
            force: machine.force.clone(),
            redis: crate::broker::RedisHealth::new(),
        },
        machine.shutdown.clone(),
    );
    workers.keep_up(keep_up(&handle, &state, probe.clone()));
    // Without its socket the machine still runs; the commands then reach it on the health port.
    let control = health::control::bind(&config.machine.workspace)
        .inspect_err(|e| tracing::error!("{}", error_chain(e)))
        .ok();
    subsystems.start("health", Deadline::of(STOP), |stop| {
        logged("health", health::run(state.clone(), listener, control, stop))
    });
    let poll = config.machine.gpu.health_poll;
    subsystems.start("gpu-health", Deadline::of(STOP), |stop| {
        crate::gpu::watch_health(probe.clone(), poll, stop)
    });

    // Installers feed the services, so they run first; a shutdown meanwhile kills their commands.
    // The workers scan their models only when they start, after this, so what the installers
    // download on this boot is in the capabilities they register with.
    let shutdown = &machine.shutdown;
    let installed = tokio::select! {
        r = installers::before_services(config, &plan.installers, &tracker, shutdown.child_token()) => r.map(|_| ()),
        () = shutdown.cancelled() => Ok(()),
    };
    match installed {
        Err(e) => {
            tracing::error!("{}", error_chain(&e));
            return Reached::FailedToStart;
        }
        Ok(()) if shutdown.is_cancelled() => return Reached::StoppedEarly,
        Ok(()) => {}
    }
    let parts = Parts {
        config,
        plan,
        state: &state,
        probe,
        tracker,
    };
    let gpu_exit = start_services_and_workers(subsystems, machine, parts, supervisor, workers);
    until_stopped(machine, &handle, &gpu_exit).await;
    Reached::Ran {
        gpu_exit,
        services: handle,
    }
}

/// Waits for what ends a running machine: the shutdown signal, a critical service's failure, or
/// a GPU fault with `gpu.on_fault = "exit"`; each of the last two starts the shutdown.
async fn until_stopped(machine: &Machine, services: &SupervisorHandle, gpu_exit: &CancellationToken) {
    let shutdown = &machine.shutdown;
    tokio::select! {
        () = shutdown.cancelled() => {}
        name = services.critical_failure() => {
            tracing::error!(service = %name, "a critical service failed; shutting the machine down");
            shutdown.cancel();
        }
        () = gpu_exit.cancelled() => {
            tracing::error!("a GPU faulted and gpu.on_fault = \"exit\": returning every job and exiting");
            // The box is to be replaced: no job waits out the drain on it.
            machine.force.cancel();
            shutdown.cancel();
        }
    }
}

/// What the services and workers are started with, beside the supervisor and the workers.
struct Parts<'a> {
    config: &'a Config,
    plan: &'a Plan,
    state: &'a Arc<HealthState>,
    probe: Arc<Probe>,
    tracker: InstallProgress,
}

/// Starts the feeds, the reloads, the supervisor, the broker connection, the fleet status
/// publisher and the workers; returns the token a GPU fault cancels when `gpu.on_fault =
/// "exit"`.
///
/// They stop in reverse: the workers drain (their jobs finish or are returned) while their
/// services still run → the broker connection, if it is still being made → the supervisor stops
/// the services → the reloads (none starts once the machine shuts down) and the feeds. The last
/// fleet message goes out after the services stopped, so it shows them so; in local mode Redis
/// is one of the services, so it goes out before they stop.
fn start_services_and_workers(
    subsystems: &mut Subsystems,
    machine: &Machine,
    parts: Parts<'_>,
    supervisor: Supervisor,
    workers: Workers,
) -> CancellationToken {
    let Parts {
        config,
        plan,
        state,
        probe,
        tracker,
    } = parts;
    let handle = supervisor.handle();
    let (broker_tx, broker_rx) = watch::channel(None);
    let connected = Connected(broker_rx);
    let gpu_exit = CancellationToken::new();

    let feeds_stop = CancellationToken::new();
    let mut feeds = Vec::new();
    let readiness = readiness(&handle, plan, &feeds_stop, &mut feeds);
    subsystems.adopt("readiness", Deadline::of(STOP), feeds_stop, joined(feeds));
    let reports = workers.reports();
    subsystems.start("job-metrics", Deadline::of(STOP), |stop| {
        metrics_feed(state.clone(), reports, stop)
    });
    let pool = workers.pool();
    subsystems.start("api-limits", Deadline::of(STOP), |stop| {
        limits_feed(state.clone(), pool, stop)
    });
    let broker = connected.clone();
    subsystems.start("queue-depth", Deadline::of(STOP), |stop| {
        queue_feed(state.clone(), broker, stop)
    });
    let (faults, running, on_fault) = (state.gpu_health(), state.running(), config.machine.gpu.on_fault);
    let (services, exit) = (handle.clone(), gpu_exit.clone());
    subsystems.start("gpu-faults", Deadline::of(STOP), |stop| {
        on_gpu_faults(faults, running, services, on_fault, exit, stop)
    });
    subsystems.start("ready-line", Deadline::of(STOP), |stop| ready_line(state.clone(), stop));

    // Reloads run one at a time on their own task, from SIGHUP and `POST /reload`.
    let (reload_tx, reload_rx) = tokio::sync::mpsc::channel(8);
    state.serve_reloads(reload_tx);
    state.serve_workers(workers.pool());
    let reloader = reload::Reloader::new(reload::Parts {
        path: machine.path.clone(),
        probe,
        services: handle.clone(),
        pool: workers.pool(),
        readiness: readiness.clone(),
        state: state.clone(),
        tracker,
        shutdown: machine.shutdown.clone(),
    });
    let hup = machine.hup.clone();
    subsystems.start("reload", Deadline::of(STOP), |stop| {
        reload::serve(reloader, reload_rx, hup, stop)
    });

    let local = config.machine.redis.is_none();
    if !local {
        start_fleet_status(subsystems, config, state, &connected);
    }
    let force = machine.force.clone();
    subsystems.start("supervisor", Deadline::own(), |stop| {
        logged("supervisor", supervisor.run(stop, force))
    });
    if local {
        start_fleet_status(subsystems, config, state, &connected);
    }
    let (config_now, state_now) = (config.clone(), state.clone());
    subsystems.start("broker", Deadline::of(STOP), |stop| {
        connect(config_now, state_now, broker_tx, stop)
    });
    let deadline = Deadline::of(config.machine.worker.drain + DRAIN_SLACK).forced(FORCED_RETURN);
    subsystems.start("workers", deadline, |stop| async move {
        let Some(broker) = connected.broker(&stop).await else {
            return;
        };
        if let Err(e) = workers.run(broker, &readiness, stop).await {
            tracing::error!("{}", error_chain(&e));
        }
    });
    gpu_exit
}

/// Starts the fleet status publisher, which runs once the broker is connected.
fn start_fleet_status(subsystems: &mut Subsystems, config: &Config, state: &Arc<HealthState>, connected: &Connected) {
    let health_url = format!(
        "http://{}:{}/health",
        ProcessEnv.hostname().unwrap_or_else(|| "localhost".to_owned()),
        config.machine.health_port
    );
    let (state, connected) = (state.clone(), connected.clone());
    subsystems.start("fleet-status", Deadline::of(STOP), |stop| async move {
        if let Some(broker) = connected.broker(&stop).await {
            health::fleet::run(state, broker, health_url, stop).await;
        }
    });
}

/// Connects the broker (retried until Redis answers or `stop`) and hands it to everyone who
/// waits on `connected`.
async fn connect(
    config: Config,
    state: Arc<HealthState>,
    connected: watch::Sender<Option<Broker>>,
    stop: CancellationToken,
) {
    let Some(broker) = Broker::connect_machine(&config.machine, state.redis_health(), &stop).await else {
        return;
    };
    state.set_broker(broker.clone());
    // `connect_machine` loaded the library, so Redis runs this binary's version.
    state.set_redis(|r| r.function_version = Some(broker.library_version().to_owned()));
    let metrics = state.metrics().clone();
    broker.observe_claims(Arc::new(move |took, claimed| {
        metrics.claim(took.as_secs_f64(), claimed)
    }));
    connected.send_replace(Some(broker));
}

/// The broker once the `broker` subsystem has connected it.
#[derive(Clone)]
struct Connected(watch::Receiver<Option<Broker>>);

impl Connected {
    /// Waits for the broker; `None` when `stop` comes first or the connection was given up.
    async fn broker(mut self, stop: &CancellationToken) -> Option<Broker> {
        tokio::select! {
            () = stop.cancelled() => None,
            broker = self.0.wait_for(Option::is_some) => broker.ok().and_then(|b| b.clone()),
        }
    }
}

/// Runs a subsystem, logging its error.
async fn logged<E: std::error::Error>(name: &'static str, run: impl Future<Output = Result<(), E>>) {
    if let Err(e) = run.await {
        tracing::error!(task = name, "{}", error_chain(&e));
    }
}

/// One task that ends when all of `tasks` have.
fn joined(tasks: Vec<JoinHandle<()>>) -> JoinHandle<()> {
    tokio::spawn(async move {
        for task in tasks {
            if let Err(e) = task.await {
                tracing::error!("task panicked: {e}");
            }
        }
    })
}

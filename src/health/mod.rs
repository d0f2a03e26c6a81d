//! What operators see and touch: the health/status HTTP server on `MACHINE_HEALTH_PORT`, the
//! worker board it reads, Prometheus metrics, the fleet status message in Redis, and the
//! `machine status` client. The documents the server answers are typed in [`status`], which
//! both the server and the client use.
//!
//! `GET /` serves the status page (`assets/page/index.html`, embedded), which reads the same
//! document live from `/events` ([`events`]); [`history`] keeps the recent jobs and GPU
//! readings it shows.
//!
//! The server runs on its own task and reads only shared state (the board, live readings), so
//! it answers even when every worker is busy, and it keeps answering (with 503 on `/health`)
//! while the machine shuts down.

mod access;
pub mod client;
pub mod control;
mod events;
pub mod fleet;
pub mod history;
mod metrics;
mod reload;
mod server;
pub mod status;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

pub use metrics::Metrics;
pub use reload::{ReloadError, ReloadReport, ReloadRequest};
pub use server::{HEADER_READ_TIMEOUT, HealthError, IDLE_TIMEOUT, MAX_CONNECTIONS, bind, run};
pub use status::{RedisStatus, StatusDocument};

use tokio::sync::watch;

use crate::broker::Broker;
use crate::config::{Config, HealthAccess, Secret};
use crate::gpu::Probe;
use crate::installers::InstallStates;
use crate::plan::Plan;
use crate::supervisor::{ServiceStatus, SupervisorHandle};
use crate::worker::{WorkerState, WorkerStatus};

/// The machine's phase, as the fleet status message names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Installing, starting services, or workers not yet claiming.
    Starting,
    /// Every worker is claiming (or has reported why not).
    Ready,
    /// Shutting down.
    Shutdown,
}

impl Phase {
    /// The name the documents give the phase.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Ready => "ready",
            Phase::Shutdown => "shutdown",
        }
    }
}

/// Everything the health server and the fleet publisher read. Shared behind an `Arc`; every
/// field is either fixed at start or a channel its owner writes, so reading never blocks them.
#[derive(Debug)]
pub struct HealthState {
    machine_id: String,
    started: Instant,
    started_ms: u64,
    /// The machine as it runs: the one copy of the running configuration, plan and workers,
    /// which every task follows; a reload replaces it.
    running: watch::Sender<Running>,
    probe: Arc<Probe>,
    services: SupervisorHandle,
    /// Where `POST /reload` sends its request, once the machine's services run.
    reload: OnceLock<tokio::sync::mpsc::Sender<ReloadRequest>>,
    /// The running workers, once they run: `POST /workers/quarantine/clear` lifts
    /// quarantines through it.
    workers: OnceLock<crate::worker::WorkerPool>,
    installs: watch::Receiver<InstallStates>,
    metrics: Metrics,
    control_token: Option<Secret>,
    access: HealthAccess,
    shutdown: CancellationToken,
    /// Cancelled by `machine stop --now`, as a second signal does.
    force: CancellationToken,
    /// A random bearer token, new each start, that the control socket sends on behalf of its
    /// callers (see [`control`]); it never leaves the process.
    local_token: control::LocalToken,
    /// What the broker's connection is (its URL, the library version); the rest of
    /// `/status`'s `redis` comes from `redis_health`.
    redis: Mutex<RedisStatus>,
    /// What every Redis command's outcome says of Redis: `/ready`, `/status`, `/metrics`.
    redis_health: crate::broker::RedisHealth,
    external_apis: Mutex<BTreeMap<String, serde_json::Value>>,
    /// What each customer's jobs used at each external API since the machine started, every
    /// billed attempt counted: by connector, then customer.
    external_usage: Mutex<BTreeMap<String, BTreeMap<String, crate::connectors::Billing>>>,
    models: Option<crate::models::ModelStore>,
    recent_jobs: Mutex<history::RecentJobs>,
    gpu_history: Mutex<history::GpuHistory>,
    /// Set once the broker has connected; `/fleet` reads the fleet through it.
    broker: OnceLock<Broker>,
    /// This run, as the fleet message names it.
    instance: fleet::Instance,
    /// The last other run seen publishing under this machine id.
    duplicate: Mutex<Option<fleet::Duplicate>>,
}

/// The machine as it runs now: the configuration and plan that the start or the last reload
/// applied, and its workers. Published on one `watch` ([`HealthState::running`]) that every
/// task follows (the status documents, the fleet publisher, the queue-depth feed, the GPU-fault
/// handler, the reloader); only a reload changes it ([`HealthState::reloaded`]).
#[derive(Debug, Clone)]
pub struct Running {
    /// The configuration.
    pub config: Config,
    /// Its plan.
    pub plan: Plan,
    /// Each running worker's id and status channel, in plan order.
    pub workers: Vec<(String, watch::Receiver<WorkerStatus>)>,
}

/// What the health state reads from the other subsystems.
#[derive(Debug)]
pub struct Sources {
    /// The supervisor's handle (services, logs, restarts).
    pub services: SupervisorHandle,
    /// The installers' progress.
    pub installs: watch::Receiver<InstallStates>,
    /// The models store, when ComfyUI fetches models on demand here (for metrics).
    pub models: Option<crate::models::ModelStore>,
    /// The machine's forced-stop trigger (what a second signal cancels).
    pub force: CancellationToken,
    /// Where the broker records each command's outcome.
    pub redis: crate::broker::RedisHealth,
}

impl HealthState {
    /// The state of a machine about to start; `shutdown` is the machine's shutdown trigger
    /// (`POST /shutdown` cancels it, and once cancelled the phase is `shutdown`).
    pub fn new(running: Running, probe: Arc<Probe>, sources: Sources, shutdown: CancellationToken) -> Arc<HealthState> {
        let config = &running.config;
        Arc::new(HealthState {
            machine_id: config.machine.machine_id.clone(),
            started: Instant::now(),
            started_ms: crate::clock::now_ms(),
            probe,
            services: sources.services,
            reload: OnceLock::new(),
            workers: OnceLock::new(),
            installs: sources.installs,
            metrics: Metrics::new(&config.machine.health_access.metrics_customers),
            control_token: config.machine.control_token.clone(),
            access: config.machine.health_access.clone(),
            shutdown,
            force: sources.force,
            local_token: control::LocalToken::new(),
            redis: Mutex::new(RedisStatus {
                url: Some(config.machine.broker_url().masked()),
                ..RedisStatus::default()
            }),
            redis_health: sources.redis,
            external_apis: Mutex::new(BTreeMap::new()),
            external_usage: Mutex::new(BTreeMap::new()),
            models: sources.models,
            recent_jobs: Mutex::default(),
            gpu_history: Mutex::default(),
            broker: OnceLock::new(),
            instance: fleet::Instance::this_run(&config.machine.workspace),
            duplicate: Mutex::new(None),
            running: watch::channel(running).0,
        })
    }

    /// This run of the machine.
    pub fn instance(&self) -> &fleet::Instance {
        &self.instance
    }

    /// Another live run publishing under this machine id, seen in the last
    /// [`fleet::DUPLICATE_FRESH_MS`].
    pub fn duplicate(&self) -> Option<fleet::Duplicate> {
        let seen = self.duplicate.lock().unwrap_or_else(|p| p.into_inner());
        seen.clone()
            .filter(|d| crate::clock::now_ms().saturating_sub(d.seen_at_ms) < fleet::DUPLICATE_FRESH_MS)
    }

    /// Records another live run under this machine id; warns the first time it is seen. The
    /// machine goes on: a duplicate is an operator's mistake to fix, and refusing to start
    /// would also stop a restarted container whose predecessor only looks alive.
    pub fn saw_duplicate(&self, other: fleet::Duplicate) {
        let mut seen = self.duplicate.lock().unwrap_or_else(|p| p.into_inner());
        let new = seen
            .as_ref()
            .is_none_or(|d| d.instance.instance_id != other.instance.instance_id);
        if new {
            tracing::warn!(
                machine_id = %self.machine_id,
                host = %other.instance.host,
                workspace = %other.instance.workspace,
                instance = %other.instance.instance_id,
                "another machine runs with this machine id, on host {} in workspace {}: both register the same worker ids; give each machine its own MACHINE_ID",
                other.instance.host,
                other.instance.workspace,
            );
        }
        *seen = Some(other);
    }

    /// Hands the connected broker to the health server (for `/fleet`); only the first is kept.
    pub fn set_broker(&self, broker: Broker) {
        let _ = self.broker.set(broker);
    }

    /// The broker, once it has connected.
    fn broker(&self) -> Option<&Broker> {
        self.broker.get()
    }

    /// Records a finished job for the status document's `recent_jobs`, and what it used at an
    /// external API for the per-customer usage under `external_apis`.
    pub fn record_job(&self, report: &crate::worker::JobReport) {
        self.recent_jobs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(report, crate::clock::now_ms());
        if let Some(b) = &report.billing {
            self.external_usage
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(b.connector.clone())
                .or_default()
                .entry(b.customer.clone())
                .or_insert_with(|| crate::connectors::Billing {
                    connector: b.connector.clone(),
                    customer: b.customer.clone(),
                    ..crate::connectors::Billing::default()
                })
                .add(b);
        }
    }

    /// Records the GPUs' live readings of `doc` in the GPU history.
    fn record_gpus(&self, doc: &StatusDocument) {
        self.gpu_history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(&doc.gpus, crate::clock::now_ms());
    }

    /// The GPU readings of the last minutes.
    fn gpu_history(&self) -> history::HistoryDocument {
        self.gpu_history.lock().unwrap_or_else(|p| p.into_inner()).document()
    }

    /// The metrics the workers record into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The machine id.
    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }

    /// Follows the machine as it runs: the value changes at each reload.
    pub fn running(&self) -> watch::Receiver<Running> {
        self.running.subscribe()
    }

    /// The plan this machine runs (the latest reload's).
    pub fn plan(&self) -> Plan {
        self.running.borrow().plan.clone()
    }

    /// The running configuration as `/plan` shows it (secrets masked: `RedisUrl` and `Secret`
    /// serialise as `***`).
    pub fn config_document(&self) -> serde_json::Value {
        serde_json::to_value(&self.running.borrow().config).unwrap_or(serde_json::Value::Null)
    }

    /// Drops stopped workers (a reload removed them) from the running machine.
    pub fn forget_workers(&self, ids: &[String]) {
        self.running
            .send_modify(|r| r.workers.retain(|(id, _)| !ids.contains(id)));
    }

    /// Publishes a reload's result: the new configuration and plan, and the workers it started
    /// (all listed in plan order). Every task following [`HealthState::running`] sees it at
    /// once; the fleet status is published at once.
    pub fn reloaded(&self, config: &Config, plan: &Plan, workers: Vec<(String, watch::Receiver<WorkerStatus>)>) {
        self.running.send_modify(|r| {
            r.config = config.clone();
            r.plan = plan.clone();
            r.workers.extend(workers);
            // In plan order, as at start.
            let position = |id: &str| plan.workers.iter().position(|w| w.id == id).unwrap_or(usize::MAX);
            r.workers.sort_by_key(|(id, _)| position(id));
        });
    }

    /// Lets `POST /reload` reach the machine's reloader.
    pub fn serve_reloads(&self, requests: tokio::sync::mpsc::Sender<ReloadRequest>) {
        let _ = self.reload.set(requests);
    }

    /// Lets the operator's routes reach the running workers (lifting a quarantine).
    pub fn serve_workers(&self, pool: crate::worker::WorkerPool) {
        let _ = self.workers.set(pool);
    }

    /// The running workers; `None` until they run.
    pub(crate) fn workers(&self) -> Option<&crate::worker::WorkerPool> {
        self.workers.get()
    }

    /// Where `POST /reload` sends its request; `None` until the services run.
    pub(crate) fn reload_requests(&self) -> Option<tokio::sync::mpsc::Sender<ReloadRequest>> {
        self.reload.get().cloned()
    }

    /// Follows the GPUs' health.
    pub fn gpu_health(&self) -> watch::Receiver<Vec<crate::gpu::GpuHealth>> {
        self.probe.health()
    }

    /// The supervisor's handle.
    pub fn services(&self) -> &SupervisorHandle {
        &self.services
    }

    /// Milliseconds since start.
    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Every worker's current status, in plan order.
    pub fn worker_statuses(&self) -> Vec<WorkerStatus> {
        let running = self.running.borrow();
        running.workers.iter().map(|(_, rx)| rx.borrow().clone()).collect()
    }

    /// Receivers that change whenever a worker changes (for the fleet publisher).
    pub(crate) fn worker_receivers(&self) -> Vec<watch::Receiver<WorkerStatus>> {
        let running = self.running.borrow();
        running.workers.iter().map(|(_, rx)| rx.clone()).collect()
    }

    /// Why a worker is not claiming, when it has a reason to report: one of its services is in
    /// crash loop or failed, or, while it runs a job, stopped answering (a frozen ComfyUI holds
    /// its job until the stall timeout; the machine must not look ready meanwhile). A worker
    /// still waiting for a starting service has none.
    fn blocked_reason(&self, status: &WorkerStatus, services: &[ServiceStatus]) -> Option<String> {
        let busy = status.state == WorkerState::Busy;
        if status.state != WorkerState::WaitingForServices && !busy {
            return None;
        }
        let running = self.running.borrow();
        let wanted = &running
            .plan
            .workers
            .iter()
            .find(|w| w.id == status.worker_id)?
            .waits_for;
        if busy {
            return services
                .iter()
                .filter(|s| wanted.contains(&s.name))
                .find(|s| !s.serving())
                .map(|s| match &s.reason {
                    Some(why) => format!("{} is not ready while a job runs on it: {why}", s.name),
                    None => format!("{} is not ready while a job runs on it", s.name),
                });
        }
        services
            .iter()
            .filter(|s| wanted.contains(&s.name))
            .find(|s| s.crash_loop || s.state == crate::supervisor::ServiceState::Failed)
            .map(|s| {
                format!(
                    "{} is {}",
                    s.name,
                    if s.crash_loop { "in crash loop" } else { "failed" }
                )
            })
    }

    /// Whether every worker is claiming, busy, or has reported why it cannot, and no installer
    /// is still running.
    fn all_settled(&self) -> bool {
        let services = self.services.status();
        let installing = self.installs.borrow().values().any(|s| {
            !matches!(
                s,
                crate::installers::InstallState::Done { .. } | crate::installers::InstallState::Failed { .. }
            )
        });
        !installing
            && self.worker_statuses().iter().all(|w| {
                matches!(w.state, WorkerState::Idle | WorkerState::Busy | WorkerState::Held)
                    || self.blocked_reason(w, &services).is_some()
            })
    }

    /// The current phase, derived from the shutdown trigger, the installers and the workers.
    pub fn phase(&self) -> Phase {
        if self.shutdown.is_cancelled() {
            Phase::Shutdown
        } else if self.all_settled() {
            Phase::Ready
        } else {
            Phase::Starting
        }
    }

    fn critical_failure(&self) -> Option<String> {
        self.services.critical_failed()
    }

    /// Updates the broker connection status.
    pub fn set_redis(&self, f: impl FnOnce(&mut RedisStatus)) {
        f(&mut self.redis.lock().unwrap_or_else(|p| p.into_inner()));
    }

    /// The broker connection status, from one reading of [`Self::redis_health`].
    fn redis(&self) -> RedisStatus {
        let mut r = self.redis.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let now = self.redis_health.snapshot();
        r.connected = now.up;
        r.not_ready = now.not_ready(Instant::now());
        r.error_kind = now.fault.as_ref().map(|(kind, _)| kind.name().to_owned());
        r.last_error = now.fault.map(|(_, cause)| cause);
        r.errors = now.errors.iter().map(|(k, n)| (k.name().to_owned(), *n)).collect();
        r
    }

    /// What each command's outcome says of Redis.
    pub(crate) fn redis_health(&self) -> &crate::broker::RedisHealth {
        &self.redis_health
    }

    /// Why no worker can claim because of Redis, once it has failed for
    /// [`crate::broker::outage::NOT_READY_AFTER`].
    pub(crate) fn redis_not_ready(&self) -> Option<String> {
        self.redis_health.snapshot().not_ready(Instant::now())
    }

    /// Sets what `/status` and the fleet status show of one external API's fleet-wide usage
    /// and limits.
    pub fn set_external_api(&self, api: &str, doc: serde_json::Value) {
        self.external_apis
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(api.to_owned(), doc);
    }

    /// The external APIs' usage, by API: the limiter's fleet-wide document, and under
    /// `customers` what each customer's jobs used here since the start (an empty customer is
    /// keyed `""`).
    pub fn external_apis(&self) -> BTreeMap<String, serde_json::Value> {
        let mut apis = self.external_apis.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let usage = self.external_usage.lock().unwrap_or_else(|p| p.into_inner());
        for (connector, customers) in usage.iter() {
            let doc = apis.entry(connector.clone()).or_insert_with(|| serde_json::json!({}));
            if let serde_json::Value::Object(map) = doc {
                let customers = serde_json::to_value(customers).expect("billing is plain data");
                map.insert("customers".to_owned(), customers);
            }
        }
        apis
    }

    /// The workers as `/status` and `/ready` show them: their status plus the reason a
    /// waiting worker gives. Every worker claims through the one broker: `redis`, why Redis
    /// takes no claims, is each one's reason; the caller reads it once for its whole document,
    /// which then names one cause (read twice, a fault whose detail changed in between, a
    /// worker's error and then the probe's, was told two ways in one answer).
    fn workers_document(&self, redis: Option<&str>) -> Vec<status::Worker> {
        let services = self.services.status();
        self.worker_statuses()
            .iter()
            .map(|w| {
                status::Worker::new(
                    w,
                    self.blocked_reason(w, &services).or_else(|| redis.map(str::to_owned)),
                )
            })
            .collect()
    }

    /// The document served on `/ready`: ready while at least one worker can claim (a machine
    /// without workers: by its phase); the workers that cannot are listed with why, whatever
    /// the answer. The ready line of the log reads it too, so it says what `/ready` says.
    pub fn ready_document(&self) -> status::ReadyDocument {
        let phase = self.phase();
        let redis = self.redis_not_ready();
        let workers = self.workers_document(redis.as_deref());
        let ready = is_ready(phase, &workers);
        let not_claiming = workers
            .iter()
            .filter(|w| !can_claim(w))
            .map(|w| {
                let why = w.reason.clone().unwrap_or_else(|| w.state.name().replace('_', " "));
                (w.worker_id.clone(), why)
            })
            .collect();
        status::ReadyDocument {
            ready,
            phase,
            not_claiming,
            workers,
            redis,
        }
    }

    /// The full status document served on `/status`.
    pub fn status_document(&self) -> StatusDocument {
        let live = self.probe.live();
        let health = self.probe.health_now();
        let phase = self.phase();
        let redis = self.redis();
        let workers = self.workers_document(redis.not_ready.as_deref());
        StatusDocument {
            machine: status::Machine {
                id: self.machine_id.clone(),
                phase,
                ready: is_ready(phase, &workers),
                uptime_ms: self.uptime_ms(),
                started_at_ms: self.started_ms,
                version: env!("CARGO_PKG_VERSION").to_owned(),
                critical_failure: self.critical_failure(),
                instance_id: self.instance.instance_id.clone(),
                duplicate: self.duplicate(),
            },
            gpus: self
                .probe
                .gpus
                .iter()
                .map(|g| {
                    status::Gpu::new(
                        g,
                        live.iter().find(|l| l.index == g.index),
                        health.iter().find(|h| h.index == g.index),
                    )
                })
                .collect(),
            host: (&self.probe.host).into(),
            installs: self
                .installs
                .borrow()
                .iter()
                .map(|(k, v)| (k.clone(), v.into()))
                .collect(),
            services: self.services.status().iter().map(status::Service::from).collect(),
            workers,
            recent_jobs: self.recent_jobs.lock().unwrap_or_else(|p| p.into_inner()).list(),
            redis,
            external_apis: self.external_apis(),
            config: self.config_document(),
        }
    }
}

/// Whether a worker can claim now: it is idle or busy and nothing holds it.
fn can_claim(w: &status::Worker) -> bool {
    w.reason.is_none()
        && matches!(
            w.state,
            status::WorkerStage::Idle | status::WorkerStage::Busy | status::WorkerStage::WaitingForUploads
        )
}

/// What `/ready` answers: the phase is `ready` and at least one worker can claim (a machine
/// without workers: by its phase alone).
fn is_ready(phase: Phase, workers: &[status::Worker]) -> bool {
    phase == Phase::Ready && (workers.is_empty() || workers.iter().any(can_claim))
}

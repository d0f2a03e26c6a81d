//! Workers: one task per planned worker (one per GPU serving every GPU-bound connector of that
//! GPU, plus the external connectors' workers) that claims jobs from the broker and runs them
//! through its connectors.
//!
//! Start-up is one path, the same for `machine run` and the tests: [`Workers::build`] turns the
//! plan into workers (capabilities from facts, [`capabilities::build`]; one connector per
//! planned connector, wired to the endpoint the plan gives it; the output store), before the
//! installers run so the status page can show them. [`connect_broker`] connects the machine's
//! one broker, and [`Workers::run`] runs the broker's background work and every worker until
//! shutdown, returning when every worker has finished or returned its job. Each worker scans
//! its models when it starts, after the installers, so what this boot installed is in the
//! capabilities it registers with. The loop of one worker, and the promise that each job ends
//! in exactly one outcome, live in [`runner`].
//!
//! A reload changes the running set through [`WorkerPool`]: it builds workers for added
//! planned workers with the same output store, limiters, models store and reports channel, and
//! adds them; a removed worker stops claiming and drains (its running job finishes within
//! `drain`, else it is returned to the queue with its place), and its registration is deleted
//! from Redis. The other workers run on untouched.

pub mod capabilities;
pub mod hold;
pub mod pause;
pub mod quarantine;
mod runner;
mod status;
pub mod upkeep;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::broker::Broker;
use crate::config::{Config, ConnectorKind, Env};
use crate::connectors::Connector;
use crate::connectors::a1111::A1111Connector;
use crate::connectors::comfyui::ComfyuiConnector;
use crate::connectors::limits::Limiter;
use crate::connectors::openai::OpenaiConnector;
use crate::connectors::playwright::PlaywrightConnector;
use crate::connectors::replicate::ReplicateConnector;
use crate::connectors::runpod::RunpodConnector;
use crate::connectors::simulation::SimulationConnector;
use crate::connectors::store::{OutputStore, StoreOptions};
use crate::gpu::Probe;
use crate::models::{ModelStore, StoreSettings};
use crate::plan::{ConnectorPlan, Plan, WorkerPlan};

pub use runner::{Worker, WorkerSettings};
pub use status::{CurrentJob, JobCounts, JobOutcome, JobReport, WorkerState, WorkerStatus};

/// Why the workers could not be set up or run.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// A planned worker cannot be built.
    #[error("failed to set up worker {worker}: {message}")]
    Setup {
        /// The worker id.
        worker: String,
        /// What is missing.
        message: String,
    },
    /// The workers have stopped (the machine is shutting down), so none can be added or removed.
    #[error("failed to change the workers: they have stopped")]
    Stopped,
    /// A worker task panicked.
    #[error("worker task {worker} failed")]
    Task {
        /// The worker id.
        worker: String,
        /// The join error.
        #[source]
        source: tokio::task::JoinError,
    },
}

/// Readiness of the supervised services, by service name (`true` = ready). The supervisor
/// publishes these; a worker claims only while every service it waits for is ready.
pub type Readiness = BTreeMap<String, watch::Receiver<bool>>;

/// The machine's workers, built from the plan.
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
    /// The supervised services each worker waits for, by position.
    waits_for: Vec<Vec<String>>,
    /// How often the broker's lease reaper runs.
    reap_every: Duration,
    kit: Arc<Mutex<Kit>>,
    changes_tx: mpsc::UnboundedSender<Change>,
    changes: mpsc::UnboundedReceiver<Change>,
}

/// What every worker of the machine shares, kept so that a reload builds its workers alike.
#[derive(Debug)]
struct Kit {
    store: Arc<OutputStore>,
    reports: broadcast::Sender<JobReport>,
    /// One limiter per limited external API, shared by all of its workers on this machine
    /// (the limits themselves are fleet-wide, in Redis).
    limiters: BTreeMap<ConnectorKind, Arc<Limiter>>,
    models: Option<ModelStore>,
    /// The machine's second signal, which makes workers return their jobs at once.
    force: Option<CancellationToken>,
    /// The broker, once the workers run, for the limiters of APIs a reload adds.
    broker: Option<Broker>,
    /// What the upkeep of the workers' own services uses, once [`Workers::keep_up`] set it:
    /// each worker started from then on (at start or by a reload) has its upkeep.
    keep: Option<upkeep::KeepUp>,
}

/// A change a reload makes to the running workers.
#[derive(Debug)]
enum Change {
    /// Run this worker too, gated on these services' readiness.
    Add(Box<Worker>, Vec<watch::Receiver<bool>>),
    /// Stop this worker (it drains); answer once it has stopped.
    Remove(String, oneshot::Sender<()>),
}

/// A handle on the running workers, for a reload. Cheap to clone.
#[derive(Debug, Clone)]
pub struct WorkerPool {
    kit: Arc<Mutex<Kit>>,
    changes: mpsc::UnboundedSender<Change>,
}

impl WorkerPool {
    /// Changes the lease of every worker's next claim (a reload); `false` while the workers
    /// have no broker yet, when the configuration's lease applies anyway.
    pub fn set_lease(&self, lease: Duration) -> bool {
        let kit = self.kit.lock().unwrap_or_else(PoisonError::into_inner);
        kit.broker.as_ref().inspect(|b| b.set_lease(lease)).is_some()
    }

    /// Builds the workers of `which` (planned workers of `plan`, the new plan) the way
    /// [`Workers::build`] does, sharing the running workers' store, limiters, models store and
    /// reports. Nothing runs until [`WorkerPool::add`].
    pub fn build(
        &self,
        config: &Config,
        probe: &Probe,
        plan: &Plan,
        which: &[&WorkerPlan],
        env: &dyn Env,
    ) -> Result<Vec<(Worker, Vec<String>)>, WorkerError> {
        let mut kit = self.kit.lock().unwrap_or_else(PoisonError::into_inner);
        let broker = kit.broker.clone();
        for (kind, limiter) in limiters(config) {
            kit.limiters.entry(kind).or_insert_with(|| {
                if let Some(b) = &broker {
                    limiter.attach(b.clone());
                }
                limiter
            });
        }
        if kit.models.is_none() {
            kit.models = model_store(config, plan, env)?;
        }
        which
            .iter()
            .map(|wp| Ok((worker_for(wp, plan, config, probe, env, &kit)?, wp.waits_for.clone())))
            .collect()
    }

    /// The fleet-wide limiters of this machine's external APIs, those a reload added included.
    pub fn limiters(&self) -> Vec<Arc<Limiter>> {
        self.kit
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .limiters
            .values()
            .cloned()
            .collect()
    }

    /// Starts a worker built by [`WorkerPool::build`]; it claims once every service whose
    /// readiness is in `gates` is ready.
    pub fn add(&self, worker: Worker, gates: Vec<watch::Receiver<bool>>) -> Result<(), WorkerError> {
        self.changes
            .send(Change::Add(Box::new(worker), gates))
            .map_err(|_| WorkerError::Stopped)
    }

    /// Stops a worker: it stops claiming, its running job finishes within the drain period or
    /// is returned to the queue, and its registration is deleted from Redis. Returns once it
    /// has stopped.
    pub async fn remove(&self, id: &str) -> Result<(), WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.changes
            .send(Change::Remove(id.to_owned(), tx))
            .map_err(|_| WorkerError::Stopped)?;
        rx.await.map_err(|_| WorkerError::Stopped)
    }
}

impl Workers {
    /// Builds one worker per planned worker. `env` supplies the API keys named in the
    /// configuration.
    pub fn build(config: &Config, probe: &Probe, plan: &Plan, env: &dyn Env) -> Result<Workers, WorkerError> {
        let options = StoreOptions {
            cdn_wait: config.worker.cdn_wait,
            ..StoreOptions::default()
        };
        let vars = std::env::vars();
        let store = Arc::new(OutputStore::with_env(config.worker.output_dir.clone(), vars, options));
        let (reports, _) = broadcast::channel(1024);
        let kit = Kit {
            store,
            reports,
            limiters: limiters(config),
            models: model_store(config, plan, env)?,
            force: None,
            broker: None,
            keep: None,
        };
        let mut workers = Vec::with_capacity(plan.workers.len());
        let mut waits_for = Vec::with_capacity(plan.workers.len());
        for wp in &plan.workers {
            workers.push(worker_for(wp, plan, config, probe, env, &kit)?);
            waits_for.push(wp.waits_for.clone());
        }
        let (changes_tx, changes) = mpsc::unbounded_channel();
        Ok(Workers {
            workers,
            waits_for,
            reap_every: config.worker.lease / 2,
            kit: Arc::new(Mutex::new(kit)),
            changes_tx,
            changes,
        })
    }

    /// The handle a reload adds and removes workers through, while [`Workers::run`] runs.
    pub fn pool(&self) -> WorkerPool {
        WorkerPool {
            kit: Arc::clone(&self.kit),
            changes: self.changes_tx.clone(),
        }
    }

    /// Looks after the services each worker runs on its GPU (ComfyUI, A1111, the render
    /// service) from now on, for the workers built at start and those a reload adds: restarts
    /// planned between jobs by the connectors' `restart_*` limits, restarts of a service that
    /// no longer answers after a failed job, and warm-ups (see [`upkeep`]).
    pub fn keep_up(&mut self, keep: upkeep::KeepUp) {
        self.kit().keep = Some(keep);
    }

    fn kit(&self) -> std::sync::MutexGuard<'_, Kit> {
        self.kit.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Makes every worker return its job at once when `force` is cancelled (a second signal),
    /// instead of letting it run out the drain period.
    pub fn force_on(&mut self, force: &CancellationToken) {
        for w in &mut self.workers {
            w.force_on(force.clone());
        }
        self.kit().force = Some(force.clone());
    }

    /// The fleet-wide limiters of this machine's external APIs (for status and metrics).
    pub fn limiters(&self) -> Vec<Arc<Limiter>> {
        self.kit().limiters.values().cloned().collect()
    }

    /// The machine's models store, when its ComfyUI workers fetch models on demand.
    pub fn models(&self) -> Option<ModelStore> {
        self.kit().models.clone()
    }

    /// The workers, e.g. to read their capabilities.
    pub fn workers(&self) -> &[Worker] {
        &self.workers
    }

    /// Each worker's id and status channel, for the status page.
    pub fn statuses(&self) -> Vec<(String, watch::Receiver<WorkerStatus>)> {
        self.workers.iter().map(|w| (w.id().to_owned(), w.status())).collect()
    }

    /// Finished-job reports of every worker (for metrics); slow readers miss reports, never
    /// slow the workers.
    pub fn reports(&self) -> broadcast::Receiver<JobReport> {
        self.kit().reports.subscribe()
    }

    /// Runs the broker's background work (event subscription, index catch-up, the lease reaper
    /// every half lease) and every worker until `shutdown`, each worker gated on the readiness
    /// of the services it waits for (a service missing from `readiness` is one this machine
    /// does not supervise, e.g. in tests, and does not gate). Returns when every worker has
    /// stopped, each having finished or returned its job; call it before the supervisor stops
    /// the services, so jobs drain while their services still run.
    pub async fn run(
        self,
        broker: Broker,
        readiness: &Readiness,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        {
            let mut kit = self.kit();
            for limiter in kit.limiters.values() {
                limiter.attach(broker.clone());
            }
            kit.broker = Some(broker.clone());
        }
        let background_stop = CancellationToken::new();
        let background = tokio::spawn({
            let (b, stop, every) = (broker.clone(), background_stop.clone(), self.reap_every);
            async move { b.run(every, stop).await }
        });
        let result = self.run_workers(broker, readiness, shutdown).await;
        background_stop.cancel();
        match background.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the broker's background work failed"),
            Err(e) => tracing::error!(error = %e, "the broker's background task failed"),
        }
        result
    }

    /// Runs every worker as a task until `shutdown`, each under its own child token so that a
    /// reload can stop one alone; returns when all have stopped.
    async fn run_workers(
        self,
        broker: Broker,
        readiness: &Readiness,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        let mut running = Running::default();
        let keep = self.kit().keep.clone();
        for (mut worker, waits_for) in self.workers.into_iter().zip(self.waits_for) {
            worker.wait_for(waits_for.iter().filter_map(|s| readiness.get(s).cloned()).collect());
            running.spawn(worker, &broker, &shutdown, keep.as_ref());
        }
        let mut changes = self.changes;
        // The pool's own sender lives in `self`; dropping it lets `recv` end with the handles.
        drop(self.changes_tx);
        let mut first_error = None;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(change) = changes.recv() => match change {
                    Change::Add(worker, gates) => {
                        let mut worker = *worker;
                        worker.wait_for(gates);
                        if let Some(force) = &self.kit.lock().unwrap_or_else(PoisonError::into_inner).force {
                            worker.force_on(force.clone());
                        }
                        tracing::info!(worker = %worker.id(), "worker added");
                        running.spawn(worker, &broker, &shutdown, keep.as_ref());
                    }
                    Change::Remove(id, reply) => running.remove(&id, reply),
                },
                Some(joined) = running.tasks.join_next_with_id() => {
                    if let Some(e) = running.ended(joined, &broker).await {
                        first_error.get_or_insert(e);
                    }
                }
            }
        }
        while let Some(joined) = running.tasks.join_next_with_id().await {
            if let Some(e) = running.ended(joined, &broker).await {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The running workers: each under its own child of the shutdown token.
#[derive(Default)]
struct Running {
    tasks: tokio::task::JoinSet<Result<(), WorkerError>>,
    ids: HashMap<tokio::task::Id, String>,
    tokens: BTreeMap<String, (tokio::task::Id, CancellationToken)>,
    /// Removals waiting for their worker to stop.
    removing: HashMap<tokio::task::Id, oneshot::Sender<()>>,
}

impl Running {
    /// Runs `worker` under its own child of `shutdown`, with the upkeep of its services when
    /// `keep` is set and it has some: the upkeep runs for as long as the worker does.
    fn spawn(
        &mut self,
        mut worker: Worker,
        broker: &Broker,
        shutdown: &CancellationToken,
        keep: Option<&upkeep::KeepUp>,
    ) {
        let id = worker.id().to_owned();
        let own = shutdown.child_token();
        let kept = worker.take_kept();
        let upkeep = keep.filter(|_| !kept.is_empty()).map(|keep| {
            let holds = worker.holds();
            if kept.iter().any(|k| k.warmup.is_some()) {
                // Held from the start: the first claim waits for the warm-up.
                holds.set(hold::HoldKind::WarmingUp, "warming up its services");
            }
            let (ends, ended) = pause::job_ends();
            worker.tell_job_ends(ends);
            upkeep::Upkeep::new(id.clone(), kept, keep.clone(), holds, ended, worker.status())
        });
        let run = worker.run(broker.clone(), own.clone());
        let worker_id = id.clone();
        let task = self
            .tasks
            .spawn(async move {
                let Some(upkeep) = upkeep else {
                    return run.await;
                };
                let stop = CancellationToken::new();
                let upkeep = tokio::spawn(upkeep.run(stop.clone()));
                let result = run.await;
                // Stopped only once the worker has: its last job end still gets an answer.
                stop.cancel();
                if let Err(e) = upkeep.await {
                    tracing::error!(worker = %worker_id, error = %e, "an upkeep task failed");
                }
                result
            })
            .id();
        self.tokens.insert(id.clone(), (task, own));
        self.ids.insert(task, id);
    }

    fn remove(&mut self, id: &str, reply: oneshot::Sender<()>) {
        match self.tokens.remove(id) {
            Some((task, own)) => {
                tracing::info!(worker = %id, "worker removed; it stops claiming and drains");
                own.cancel();
                self.removing.insert(task, reply);
            }
            None => {
                let _ = reply.send(());
            }
        }
    }

    /// Notes a worker's end; a removed one's registration is deleted, so the fleet stops
    /// counting it at once. Returns the worker's error.
    async fn ended(
        &mut self,
        joined: Result<(tokio::task::Id, Result<(), WorkerError>), tokio::task::JoinError>,
        broker: &Broker,
    ) -> Option<WorkerError> {
        let task = match &joined {
            Ok((task, _)) => *task,
            Err(e) => e.id(),
        };
        let id = self.ids.remove(&task).unwrap_or_default();
        let error = match joined {
            Ok((_, Ok(()))) => None,
            Ok((_, Err(e))) => {
                tracing::error!(worker = %id, error = %e, "worker stopped with an error");
                Some(e)
            }
            Err(source) => Some(WorkerError::Task {
                worker: id.clone(),
                source,
            }),
        };
        if let Some(reply) = self.removing.remove(&task) {
            if let Err(e) = broker.unregister_worker(&id).await {
                tracing::warn!(worker = %id, error = %crate::logging::error_chain(&e), "failed to delete the removed worker's registration; it expires");
            }
            let _ = reply.send(());
        }
        error
    }
}

/// One limiter per limited external API the configuration runs.
fn limiters(config: &Config) -> BTreeMap<ConnectorKind, Arc<Limiter>> {
    [
        (ConnectorKind::Openai, &config.openai.limits),
        (ConnectorKind::Replicate, &config.replicate.limits),
        (ConnectorKind::Runpod, &config.runpod.limits),
    ]
    .into_iter()
    .filter(|(kind, limits)| config.connectors.get(*kind).is_some() && !limits.is_unlimited())
    .map(|(kind, limits)| (kind, Arc::new(Limiter::new(kind.name(), limits.clone()))))
    .collect()
}

/// One planned worker, built: capabilities from facts, one connector per planned connector.
fn worker_for(
    wp: &WorkerPlan,
    plan: &Plan,
    config: &Config,
    probe: &Probe,
    env: &dyn Env,
    kit: &Kit,
) -> Result<Worker, WorkerError> {
    let settings = WorkerSettings {
        heartbeat: config.worker.heartbeat,
        drain: config.worker.drain,
        job_timeout: config.worker.job_timeout,
    };
    let mut caps = capabilities::build(wp, &plan.machine_id, probe, &config.worker);
    if kit.models.is_some() && config.models.catalogue.is_some() && wp.runs(ConnectorKind::Comfyui) {
        // This worker can fetch a job's missing models: the broker gives it such a job once the
        // job has waited models.affinity_wait for a worker that has them.
        let wait = u64::try_from(config.models.affinity_wait.as_millis()).unwrap_or(u64::MAX);
        caps.custom
            .insert("models_on_demand_after_ms".to_owned(), serde_json::json!(wait));
    }
    let mut connectors: HashMap<String, Arc<dyn Connector>> = HashMap::new();
    for planned in &wp.connectors {
        let connector = connector_for(
            planned,
            config,
            env,
            kit.limiters.get(&planned.kind).cloned(),
            kit.models.as_ref(),
        )
        .map_err(|message| WorkerError::Setup {
            worker: wp.id.clone(),
            message,
        })?;
        for service in &planned.job_services {
            connectors.insert(service.clone(), connector.clone());
        }
    }
    let mut worker = Worker::new(caps, connectors, settings, kit.store.clone());
    worker.follow_models(capabilities::ModelDirs::of(wp, &config.workspace));
    worker.quarantine_on(quarantine_policy(wp, config));
    if let Some(index) = wp.gpu {
        // A fault of its GPU holds the worker (and returns its job).
        worker.follow_gpu(index, probe.health());
    }
    worker.report_to(kit.reports.clone());
    let kept = kept_services(wp, plan, config, &worker);
    worker.keep(kept);
    Ok(worker)
}

/// The services the upkeep looks after for a worker (see [`upkeep`]): those its ComfyUI, A1111
/// and Playwright connectors talk to, as the plan's endpoints name them, with their restart
/// limits and warm-up job.
fn kept_services(wp: &WorkerPlan, plan: &Plan, config: &Config, worker: &Worker) -> Vec<upkeep::Kept> {
    wp.connectors
        .iter()
        .filter_map(|c| {
            let settings = match c.kind {
                ConnectorKind::Comfyui => &config.comfyui,
                ConnectorKind::A1111 => &config.a1111,
                ConnectorKind::Playwright => &config.playwright,
                _ => return None,
            };
            let endpoint = c.endpoint.as_ref()?;
            let s = plan.services.iter().find(|s| s.name == endpoint.service)?;
            let mut kept = upkeep::Kept::new(s.name.clone(), s.gpu, upkeep::Limits::of(settings), s.ready.clone());
            kept.warmup = warmup_job(c.kind, settings, &s.name)
                .zip(worker.connector(c.kind))
                .map(|(j, c)| (c, j));
            Some(kept)
        })
        .collect()
}

/// The worker's quarantine policy: a connector's own settings win, the first of the worker's in
/// plan order, else the `[worker]` defaults.
fn quarantine_policy(wp: &WorkerPlan, config: &Config) -> quarantine::QuarantinePolicy {
    let (after, cooldown) = wp
        .connectors
        .iter()
        .find_map(|c| config.worker.quarantine.get(&c.kind))
        .map_or(
            (config.worker.quarantine_after, config.worker.quarantine_cooldown),
            |q| (q.after, q.cooldown),
        );
    quarantine::QuarantinePolicy { after, cooldown }
}

/// The broker options the configuration asks for.
pub fn broker_options(config: &Config) -> crate::broker::BrokerOptions {
    crate::broker::BrokerOptions {
        lease: config.worker.lease,
        retry_delay: config.worker.retry_delay,
        ..crate::broker::BrokerOptions::default()
    }
}

/// Connects the machine's one broker to [`Config::broker_url`] and loads the function library,
/// retrying with backoff while Redis is unreachable (in local mode it is still starting); `None`
/// when `shutdown` comes first. Each failure is logged with its whole cause chain and passed to
/// `failed` (for the status page).
pub async fn connect_broker(
    config: &Config,
    shutdown: &CancellationToken,
    failed: &(dyn Fn(&str) + Sync),
) -> Option<Broker> {
    let url = config.broker_url();
    let opts = broker_options(config);
    let backoff = crate::backoff::Backoff::doubling(Duration::from_millis(50), Duration::from_secs(10));
    let mut failures = 0;
    loop {
        let attempt = async {
            let broker = Broker::connect(&url, opts.clone()).await?;
            broker.ensure_functions().await?;
            Ok::<_, crate::broker::BrokerError>(broker)
        };
        match attempt.await {
            Ok(b) => return Some(b),
            Err(e) => {
                let error = crate::logging::error_chain(&e);
                let delay = backoff.delay(failures, 0.0);
                tracing::warn!(redis = %url.masked(), error = %error, ?delay, "failed to set up the broker; retrying");
                failed(&error);
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(delay) => {}
                }
                failures = failures.saturating_add(1);
            }
        }
    }
}

/// The warm-up job of `service` (a connector of `kind`), when its configuration sets one: the
/// ComfyUI workflow file (checked when the configuration was loaded) or the A1111 prompt.
fn warmup_job(
    kind: ConnectorKind,
    settings: &crate::config::ServiceConnectorConfig,
    service: &str,
) -> Option<crate::connectors::Job> {
    let warmup = settings.warmup.as_deref()?;
    let payload = match kind {
        ConnectorKind::Comfyui => serde_json::from_str(&std::fs::read_to_string(warmup).ok()?).ok()?,
        ConnectorKind::A1111 => serde_json::json!({ "prompt": warmup }),
        _ => return None,
    };
    Some(crate::connectors::Job {
        id: format!("warmup-{service}"),
        service_required: kind.name().to_owned(),
        payload,
        customer_id: String::new(),
        ctx: serde_json::Value::Null,
        timeout: None,
    })
}

/// The machine's one models store, when a ComfyUI connector runs here.
fn model_store(config: &Config, plan: &Plan, env: &dyn Env) -> Result<Option<ModelStore>, WorkerError> {
    if !plan.workers.iter().any(|w| w.runs(ConnectorKind::Comfyui)) {
        return Ok(None);
    }
    let cc = &config.install.comfyui;
    // The manifest's models are installed at start and always present: never evicted.
    let pinned = match &cc.models_manifest {
        Some(path) => crate::installers::manifest_ids(path).unwrap_or_default(),
        None => Default::default(),
    };
    let settings = StoreSettings {
        catalogue: config.models.catalogue.clone(),
        shared_dir: cc.models_dir.clone(),
        link_dir: config.workspace.join("ComfyUI").join("models"),
        budget: config.models.cache_max_bytes,
        pinned,
        loader_inputs: config.models.loader_inputs.clone(),
    };
    ModelStore::new(settings, env)
        .map(Some)
        .map_err(|e| WorkerError::Setup {
            worker: "models".to_owned(),
            message: e.to_string(),
        })
}

/// The connector the plan describes: a GPU-bound connector talks to the service at its
/// endpoint. The error says what is missing.
fn connector_for(
    planned: &ConnectorPlan,
    config: &Config,
    env: &dyn Env,
    limiter: Option<Arc<Limiter>>,
    models: Option<&ModelStore>,
) -> Result<Arc<dyn Connector>, String> {
    let kind = planned.kind;
    let service_url = || {
        planned
            .endpoint
            .as_ref()
            .map(|e| e.url.clone())
            .ok_or_else(|| format!("the plan gives its {kind} connector no service"))
    };
    Ok(match kind {
        ConnectorKind::Comfyui => {
            let c = ComfyuiConnector::new(service_url()?).with_stall_timeout(config.comfyui.stall_timeout);
            Arc::new(match models {
                Some(store) => c.with_models(store.clone()),
                None => c,
            })
        }
        ConnectorKind::A1111 => {
            Arc::new(A1111Connector::new(service_url()?).with_stall_timeout(config.a1111.stall_timeout))
        }
        ConnectorKind::Openai => {
            let c = OpenaiConnector::new(config.openai.clone(), env.var(&config.openai.api_key_env));
            Arc::new(match limiter {
                Some(l) => c.with_limiter(l),
                None => c,
            })
        }
        ConnectorKind::Replicate => {
            let c = ReplicateConnector::new(config.replicate.clone(), env.var(&config.replicate.api_key_env));
            Arc::new(match limiter {
                Some(l) => c.with_limiter(l),
                None => c,
            })
        }
        ConnectorKind::Runpod => {
            let c = RunpodConnector::new(config.runpod.clone(), env.var(&config.runpod.api_key_env));
            Arc::new(match limiter {
                Some(l) => c.with_limiter(l),
                None => c,
            })
        }
        ConnectorKind::Simulation => Arc::new(SimulationConnector::new(config.simulation.clone())),
        ConnectorKind::Playwright => {
            Arc::new(PlaywrightConnector::new(service_url()?).with_stall_timeout(config.playwright.stall_timeout))
        }
    })
}

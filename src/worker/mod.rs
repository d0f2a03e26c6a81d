//! Workers: one task per planned worker (one per GPU serving every GPU-bound connector of that
//! GPU, plus the external connectors' workers) that claims jobs from the broker and runs them
//! through its connectors.
//!
//! [`Workers::build`] turns the plan into workers: capabilities from facts
//! ([`capabilities::build`]), one connector per connector kind wired to the plan's service port
//! on that GPU, and the output store. [`Workers::run`] runs them all until shutdown and returns
//! when every worker has finished or returned its job. The loop of one worker, and the promise
//! that each job ends in exactly one outcome, live in [`runner`].

pub mod capabilities;
mod runner;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

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
use crate::matcher::Broker;
use crate::models::{ModelStore, StoreSettings};
use crate::plan::{Plan, WorkerPlan};

pub use runner::{CurrentJob, JobCounts, JobOutcome, JobReport, Worker, WorkerSettings, WorkerState, WorkerStatus};

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
/// publishes these; a worker claims only while all of its plan's services are ready.
pub type Readiness = BTreeMap<String, watch::Receiver<bool>>;

/// The machine's workers, built from the plan.
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
    /// The plan's services each worker waits for, by position.
    services: Vec<Vec<String>>,
    reports: broadcast::Sender<JobReport>,
    limiters: Vec<Arc<Limiter>>,
    models: Option<ModelStore>,
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
        let settings = WorkerSettings {
            heartbeat: config.worker.heartbeat,
            drain: config.worker.drain,
            job_timeout: config.worker.job_timeout,
        };
        let (reports, _) = broadcast::channel(1024);
        let models = model_store(config, plan, env)?;
        let mut workers = Vec::with_capacity(plan.workers.len());
        let mut services = Vec::with_capacity(plan.workers.len());
        // One limiter per limited external API, shared by all of its workers on this machine
        // (the limits themselves are fleet-wide, in Redis).
        let limiters: BTreeMap<ConnectorKind, Arc<Limiter>> = [
            (ConnectorKind::Openai, &config.openai.limits),
            (ConnectorKind::Replicate, &config.replicate.limits),
            (ConnectorKind::Runpod, &config.runpod.limits),
        ]
        .into_iter()
        .filter(|(kind, limits)| config.connectors.get(*kind).is_some() && !limits.is_unlimited())
        .map(|(kind, limits)| (kind, Arc::new(Limiter::new(kind.name(), limits.clone()))))
        .collect();
        for wp in &plan.workers {
            let mut caps = capabilities::build(wp, &plan.machine_id, probe, &config.workspace, &config.worker);
            if models.is_some() && config.models.catalogue.is_some() && wp.connectors.contains(&ConnectorKind::Comfyui)
            {
                // This worker can fetch a job's missing models: the broker gives it such a job
                // once the job has waited models.affinity_wait for a worker that has them.
                let wait = u64::try_from(config.models.affinity_wait.as_millis()).unwrap_or(u64::MAX);
                caps.custom
                    .insert("models_on_demand_after_ms".to_owned(), serde_json::json!(wait));
            }
            let mut connectors: HashMap<String, Arc<dyn Connector>> = HashMap::new();
            for &kind in &wp.connectors {
                let connector = connector_for(
                    kind,
                    wp,
                    plan,
                    config,
                    env,
                    limiters.get(&kind).cloned(),
                    models.as_ref(),
                )?;
                for service in kind.job_services() {
                    connectors.insert((*service).to_owned(), connector.clone());
                }
                // Model-family aliases are services of their own (`replicate:<alias>`).
                for service in wp.job_services.iter().filter(|s| s.starts_with(&format!("{kind}:"))) {
                    connectors.insert(service.clone(), connector.clone());
                }
            }
            let mut worker = Worker::new(caps, connectors, settings.clone(), store.clone());
            worker.follow_models(capabilities::ModelDirs::of(wp, &config.workspace));
            worker.report_to(reports.clone());
            workers.push(worker);
            services.push(wp.services.clone());
        }
        Ok(Workers {
            workers,
            services,
            reports,
            limiters: limiters.into_values().collect(),
            models,
        })
    }

    /// Makes every worker return its job at once when `force` is cancelled (a second signal),
    /// instead of letting it run out the drain period.
    pub fn force_on(&mut self, force: &CancellationToken) {
        for w in &mut self.workers {
            w.force_on(force.clone());
        }
    }

    /// The fleet-wide limiters of this machine's external APIs (for status and metrics).
    pub fn limiters(&self) -> Vec<Arc<Limiter>> {
        self.limiters.clone()
    }

    /// The machine's models store, when its ComfyUI workers fetch models on demand.
    pub fn models(&self) -> Option<ModelStore> {
        self.models.clone()
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
        self.reports.subscribe()
    }

    /// Runs every worker until `shutdown`, each gated on the readiness of its plan's services
    /// (a service missing from `readiness` is one this machine does not supervise, e.g. in
    /// tests, and does not gate). Returns when all have stopped.
    pub async fn run(
        self,
        broker: Broker,
        readiness: &Readiness,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        let mut tasks = tokio::task::JoinSet::new();
        for (mut worker, services) in self.workers.into_iter().zip(self.services) {
            worker.wait_for(services.iter().filter_map(|s| readiness.get(s).cloned()).collect());
            let id = worker.id().to_owned();
            let broker = broker.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move { (id, worker.run(broker, shutdown).await) });
        }
        let mut first_error = None;
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok((_, Ok(()))) => {}
                Ok((id, Err(e))) => {
                    tracing::error!(worker = %id, error = %e, "worker stopped with an error");
                    first_error.get_or_insert(e);
                }
                Err(source) => {
                    first_error.get_or_insert(WorkerError::Task {
                        worker: "?".to_owned(),
                        source,
                    });
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// Everything job-related of `machine run`: connects the broker (retrying while Redis is
/// unreachable), loads the function library, runs the machine's one event subscription and the
/// lease reaper beside the plan's workers, and returns once the workers have stopped after
/// `shutdown` (each having finished or returned its job). Call it before the supervisor stops
/// the services, so jobs drain while their services still run.
pub async fn serve(
    config: &Config,
    probe: &Probe,
    plan: &Plan,
    env: &(dyn Env + Sync),
    readiness: &Readiness,
    shutdown: CancellationToken,
) -> Result<(), WorkerError> {
    let workers = Workers::build(config, probe, plan, env)?;
    let Some(broker) = connect_broker(config, &shutdown, &|_| {}).await else {
        return Ok(());
    };
    workers
        .serve(broker, config.worker.lease / 2, readiness, shutdown)
        .await
}

/// The broker options the configuration asks for.
pub fn broker_options(config: &Config) -> crate::matcher::BrokerOptions {
    crate::matcher::BrokerOptions {
        lease: config.worker.lease,
        retry_delay: config.worker.retry_delay,
        ..crate::matcher::BrokerOptions::default()
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
    let backoff =
        crate::backoff::Backoff::doubling(std::time::Duration::from_millis(50), std::time::Duration::from_secs(10));
    let mut failures = 0;
    loop {
        let attempt = async {
            let broker = Broker::connect(&url, opts.clone()).await?;
            broker.ensure_functions().await?;
            Ok::<_, crate::matcher::BrokerError>(broker)
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

impl Workers {
    /// Runs the broker's background work (event subscription, index catch-up, the lease reaper
    /// every `reap_every`) beside the workers, until the workers have stopped after `shutdown`.
    pub async fn serve(
        self,
        broker: Broker,
        reap_every: std::time::Duration,
        readiness: &Readiness,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        for limiter in &self.limiters {
            limiter.attach(broker.clone());
        }
        let background_stop = CancellationToken::new();
        let background = tokio::spawn({
            let (b, stop) = (broker.clone(), background_stop.clone());
            async move { b.run(reap_every, stop).await }
        });
        let result = self.run(broker, readiness, shutdown).await;
        background_stop.cancel();
        match background.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "the broker's background work failed"),
            Err(e) => tracing::error!(error = %e, "the broker's background task failed"),
        }
        result
    }
}

/// The machine's one models store, when a ComfyUI connector runs here.
fn model_store(config: &Config, plan: &Plan, env: &dyn Env) -> Result<Option<ModelStore>, WorkerError> {
    if !plan
        .workers
        .iter()
        .any(|w| w.connectors.contains(&ConnectorKind::Comfyui))
    {
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

/// The connector of `kind` for worker `wp`: GPU-bound connectors talk to the plan's service of
/// that kind on the worker's GPU.
fn connector_for(
    kind: ConnectorKind,
    wp: &WorkerPlan,
    plan: &Plan,
    config: &Config,
    env: &dyn Env,
    limiter: Option<Arc<Limiter>>,
    models: Option<&ModelStore>,
) -> Result<Arc<dyn Connector>, WorkerError> {
    let service_url = || {
        plan.services
            .iter()
            .find(|s| s.connector == Some(kind) && wp.services.contains(&s.name))
            .and_then(|s| s.port)
            .map(|port| {
                url::Url::parse(&format!("http://127.0.0.1:{port}")).expect("a loopback URL with a port parses")
            })
            .ok_or_else(|| WorkerError::Setup {
                worker: wp.id.clone(),
                message: format!("the plan has no {kind} service with a port for this worker"),
            })
    };
    Ok(match kind {
        ConnectorKind::Comfyui => {
            let c = ComfyuiConnector::new(service_url()?);
            Arc::new(match models {
                Some(store) => c.with_models(store.clone()),
                None => c,
            })
        }
        ConnectorKind::A1111 => Arc::new(A1111Connector::new(service_url()?)),
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
        ConnectorKind::Playwright => Arc::new(PlaywrightConnector::new(service_url()?)),
    })
}

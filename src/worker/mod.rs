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

pub mod capabilities;
pub mod hold;
pub mod quarantine;
mod runner;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

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
use crate::plan::{ConnectorPlan, Plan};

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
/// publishes these; a worker claims only while every service it waits for is ready.
pub type Readiness = BTreeMap<String, watch::Receiver<bool>>;

/// The machine's workers, built from the plan.
#[derive(Debug)]
pub struct Workers {
    workers: Vec<Worker>,
    /// The supervised services each worker waits for, by position.
    waits_for: Vec<Vec<String>>,
    /// The GPU each worker runs on, by position.
    gpus: Vec<Option<u32>>,
    /// The GPUs' health, which holds a worker whose GPU faulted.
    gpu_health: watch::Receiver<Vec<crate::gpu::GpuHealth>>,
    /// How often the broker's lease reaper runs.
    reap_every: Duration,
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
        // A connector's own quarantine settings win, the first of the worker's in plan order.
        let quarantine = |wp: &crate::plan::WorkerPlan| {
            let (after, cooldown) = wp
                .connectors
                .iter()
                .find_map(|c| config.worker.quarantine.get(&c.kind))
                .map_or(
                    (config.worker.quarantine_after, config.worker.quarantine_cooldown),
                    |q| (q.after, q.cooldown),
                );
            quarantine::QuarantinePolicy { after, cooldown }
        };
        let (reports, _) = broadcast::channel(1024);
        let models = model_store(config, plan, env)?;
        let mut workers = Vec::with_capacity(plan.workers.len());
        let mut waits_for = Vec::with_capacity(plan.workers.len());
        let mut gpus = Vec::with_capacity(plan.workers.len());
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
            let mut caps = capabilities::build(wp, &plan.machine_id, probe, &config.worker);
            if models.is_some() && config.models.catalogue.is_some() && wp.runs(ConnectorKind::Comfyui) {
                // This worker can fetch a job's missing models: the broker gives it such a job
                // once the job has waited models.affinity_wait for a worker that has them.
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
                    limiters.get(&planned.kind).cloned(),
                    models.as_ref(),
                )
                .map_err(|message| WorkerError::Setup {
                    worker: wp.id.clone(),
                    message,
                })?;
                for service in &planned.job_services {
                    connectors.insert(service.clone(), connector.clone());
                }
            }
            let mut worker = Worker::new(caps, connectors, settings.clone(), store.clone());
            worker.follow_models(capabilities::ModelDirs::of(wp, &config.workspace));
            worker.quarantine_on(quarantine(wp));
            worker.report_to(reports.clone());
            workers.push(worker);
            waits_for.push(wp.waits_for.clone());
            gpus.push(wp.gpu);
        }
        Ok(Workers {
            workers,
            waits_for,
            gpus,
            gpu_health: probe.health(),
            reap_every: config.worker.lease / 2,
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
        for limiter in &self.limiters {
            limiter.attach(broker.clone());
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

    /// Runs every worker as a task until `shutdown`; returns when all have stopped.
    async fn run_workers(
        self,
        broker: Broker,
        readiness: &Readiness,
        shutdown: CancellationToken,
    ) -> Result<(), WorkerError> {
        let mut tasks = tokio::task::JoinSet::new();
        let follow_stop = CancellationToken::new();
        let mut follows = Vec::new();
        for (worker, gpu) in self.workers.iter().zip(&self.gpus) {
            if let Some(index) = *gpu {
                follows.push(tokio::spawn(hold::follow_gpu(
                    index,
                    self.gpu_health.clone(),
                    worker.holds(),
                    follow_stop.clone(),
                )));
            }
        }
        for (mut worker, waits_for) in self.workers.into_iter().zip(self.waits_for) {
            worker.wait_for(waits_for.iter().filter_map(|s| readiness.get(s).cloned()).collect());
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
        follow_stop.cancel();
        for f in follows {
            let _ = f.await;
        }
        first_error.map_or(Ok(()), Err)
    }
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
    let backoff = crate::backoff::Backoff::doubling(Duration::from_millis(50), Duration::from_secs(10));
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

//! Workers: one task per planned worker (one per GPU serving every GPU-bound connector of that
//! GPU, plus the external connectors' workers) that claims jobs from the broker and runs them
//! through its connectors.
//!
//! Start-up is one path, the same for `machine run` and the tests: [`Workers::build`] turns the
//! plan into workers (capabilities from facts, [`capabilities::build`]; one connector per
//! planned connector, wired to the endpoint the plan gives it; the output store), before the
//! installers run so the status page can show them. `Broker::connect_machine` connects the machine's
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

mod build;
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
use crate::cloud::CloudStores;
use crate::config::{Config, ConnectorKind};
use crate::connectors::limits::Limiter;
use crate::connectors::store::{OutputStore, StoreOptions};
use crate::gpu::Probe;
use crate::models::ModelStore;
use crate::plan::{Plan, WorkerPlan};

use build::{limiters, model_setup, model_store, worker_for};
pub use runner::{UploadLimits, Worker, WorkerSettings};
pub use status::{CurrentJob, Fate, JobCounts, JobReport, PendingUpload, QuotaWait, WorkerState, WorkerStatus};

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
    /// No worker of this machine has that id.
    #[error("no worker `{worker}` on this machine (its workers: {})", known.join(", "))]
    UnknownWorker {
        /// The id asked for.
        worker: String,
        /// The workers it has.
        known: Vec<String>,
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
    /// How often the broker's lease reaper runs.
    reap_every: Duration,
    kit: Arc<Mutex<Kit>>,
    changes_tx: mpsc::UnboundedSender<Change>,
    changes: mpsc::UnboundedReceiver<Change>,
}

/// What every worker of the machine shares, kept so that a reload builds its workers alike.
#[derive(Debug)]
struct Kit {
    /// The machine's one set of cloud clients: the output store's and the models store's,
    /// renewed in one place when a reload reads new storage credentials.
    cloud: Arc<CloudStores>,
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
    /// Lift the quarantine of this worker (of every worker with `None`); answer the workers
    /// whose quarantine was lifted.
    ClearQuarantine(Option<String>, oneshot::Sender<Result<Vec<String>, WorkerError>>),
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
        // A running store takes the reload's settings and catalogue (its tokens read again) once
        // every worker is built, so that a refused reload changes nothing.
        let setup = match &kit.models {
            None => {
                kit.models = model_store(config, plan, &kit.cloud)?;
                None
            }
            Some(_) => Some(model_setup(config)?),
        };
        let built = which
            .iter()
            .map(|wp| Ok((worker_for(wp, plan, config, probe, &kit)?, wp.waits_for.clone())))
            .collect::<Result<Vec<_>, WorkerError>>()?;
        if let (Some(models), Some(setup)) = (&kit.models, setup) {
            if models.reconfigure(setup) {
                tracing::info!("reload: the models store uses the settings and catalogue read now");
            }
        }
        Ok(built)
    }

    /// Gives the cloud stores the credentials a reload read (`<NAME>_FILE` files read again);
    /// `true` when they changed. The running workers use them from their next upload, their
    /// next re-check of refused credentials and their next model fetched from a bucket.
    pub fn renew_credentials(&self, credentials: &crate::config::Credentials) -> bool {
        let kit = self.kit.lock().unwrap_or_else(PoisonError::into_inner);
        kit.cloud.renew(credentials.storage().clone())
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

    /// Lifts the quarantine of `worker` (of every worker with `None`) at once, as an operator
    /// does with `machine quarantine clear`: it claims again, and its failures so far are
    /// forgotten. Returns the workers that were quarantined (none is not an error).
    pub async fn clear_quarantine(&self, worker: Option<&str>) -> Result<Vec<String>, WorkerError> {
        let (tx, rx) = oneshot::channel();
        self.changes
            .send(Change::ClearQuarantine(worker.map(str::to_owned), tx))
            .map_err(|_| WorkerError::Stopped)?;
        rx.await.map_err(|_| WorkerError::Stopped)?
    }
}

impl Workers {
    /// Builds one worker per planned worker, with the credentials the configuration read.
    pub fn build(config: &Config, probe: &Probe, plan: &Plan) -> Result<Workers, WorkerError> {
        let options = StoreOptions {
            cdn_wait: config.machine.worker.cdn_wait,
            upload_window: config.machine.worker.upload_window,
            ..StoreOptions::default()
        };
        let cloud = Arc::new(CloudStores::with_vars(config.plan.credentials.storage().clone()));
        let store = Arc::new(OutputStore::with_cloud(
            config.machine.worker.output_dir.clone(),
            cloud.clone(),
            options,
        ));
        let (reports, _) = broadcast::channel(1024);
        let kit = Kit {
            models: model_store(config, plan, &cloud)?,
            cloud,
            store,
            reports,
            limiters: limiters(config),
            force: None,
            broker: None,
            keep: None,
        };
        let mut workers = Vec::with_capacity(plan.workers.len());
        let mut waits_for = Vec::with_capacity(plan.workers.len());
        for wp in &plan.workers {
            workers.push(worker_for(wp, plan, config, probe, &kit)?);
            waits_for.push(wp.waits_for.clone());
        }
        let (changes_tx, changes) = mpsc::unbounded_channel();
        Ok(Workers {
            workers,
            waits_for,
            reap_every: config.machine.worker.lease / 2,
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
            Ok(Err(e)) => {
                tracing::error!(error = %crate::logging::error_chain(&e), "the broker's background work failed")
            }
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
                    Change::ClearQuarantine(id, reply) => {
                        let _ = reply.send(running.clear_quarantine(id.as_deref()));
                    }
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
    /// Each running worker's holds, for an operator lifting a quarantine.
    holds: BTreeMap<String, hold::Holds>,
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
        self.holds.insert(id.clone(), worker.holds());
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

    /// Lifts the quarantine hold of worker `id` (of every worker with `None`); the worker
    /// sees its hold gone and ends its quarantine. Returns the workers that were quarantined.
    fn clear_quarantine(&self, id: Option<&str>) -> Result<Vec<String>, WorkerError> {
        if let Some(id) = id.filter(|id| !self.holds.contains_key(*id)) {
            return Err(WorkerError::UnknownWorker {
                worker: id.to_owned(),
                known: self.holds.keys().cloned().collect(),
            });
        }
        let mut cleared = Vec::new();
        for (worker, holds) in &self.holds {
            if id.is_none_or(|id| id == worker) && holds.has(hold::HoldKind::Quarantine) {
                holds.clear(hold::HoldKind::Quarantine);
                tracing::info!(worker = %worker, "quarantine lifted by the operator");
                cleared.push(worker.clone());
            }
        }
        Ok(cleared)
    }

    fn remove(&mut self, id: &str, reply: oneshot::Sender<()>) {
        self.holds.remove(id);
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
        if self.tokens.get(&id).is_none_or(|(t, _)| *t == task) {
            // Unless a reload started a new worker under the same id.
            self.holds.remove(&id);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::HostInfo;

    /// A small host without GPUs, for workers that need none.
    fn gpuless_host() -> Probe {
        Probe::from_parts(
            Vec::new(),
            HostInfo {
                cpu_cores: 2,
                ram_total_bytes: 4 << 30,
                ram_available_bytes: 2 << 30,
                disk_free_bytes: None,
            },
        )
    }

    /// The output store and the models store reach the cloud through one `CloudStores`: the
    /// storage key a reload renews (a rotated `<NAME>_FILE` read again) is the one the models'
    /// `s3://`, `az://` and `gs://` sources are fetched with from then on.
    #[test]
    fn a_renewed_storage_key_reaches_the_models_store_too() {
        let env = [
            ("WORKER_CONNECTORS", "comfyui"),
            ("MACHINE_WORKSPACE", "/nonexistent/ws"),
            ("AWS_SECRET_ACCESS_KEY", "old-key"),
        ];
        let config = Config::for_tests(&env);
        let probe = gpuless_host();
        let plan = Plan::build(&config, &probe).expect("a plan");
        let workers = Workers::build(&config, &probe, &plan).expect("workers");
        let models = workers.models().expect("a ComfyUI worker has a models store");
        assert_eq!(&*models.cloud().secrets(), ["old-key".to_owned()]);
        let rotated =
            crate::config::Credentials::from_parts([("AWS_SECRET_ACCESS_KEY".to_owned(), "new-key".to_owned())], []);
        assert!(workers.pool().renew_credentials(&rotated));
        assert_eq!(&*models.cloud().secrets(), ["new-key".to_owned()]);
    }

    /// A reload's `[models]` and the tokens its catalogue names reach the running models store:
    /// the store the running ComfyUI workers hold knows the catalogue's new model and uses the
    /// rotated token from then on (it kept the catalogue read at start before).
    #[test]
    fn a_reload_reaches_the_running_models_store() {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let sha = "a".repeat(64);
        let entry = |name: &str| {
            format!(
                "[[model]]\nname = \"{name}\"\nkind = \"loras\"\nsha256 = \"{sha}\"\nsize = 3\n\
                 sources = [\"https://hub.example/{name}\"]\ntoken_env = \"HUB_TOKEN\"\n"
            )
        };
        let first = dir.path().join("first.toml");
        std::fs::write(&first, entry("a.safetensors")).expect("a catalogue");
        let second = dir.path().join("second.toml");
        std::fs::write(&second, entry("a.safetensors") + &entry("b.safetensors")).expect("a catalogue");
        let config_with = |catalogue: &std::path::Path, token: &str| {
            Config::for_tests(&[
                ("WORKER_CONNECTORS", "comfyui"),
                ("MACHINE_WORKSPACE", "/nonexistent/ws"),
                ("COMFYUI_MODELS_CATALOGUE", catalogue.to_str().expect("a UTF-8 path")),
                ("HUB_TOKEN", token),
            ])
        };
        let probe = gpuless_host();
        let config = config_with(&first, "old-token");
        let plan = Plan::build(&config, &probe).expect("a plan");
        let workers = Workers::build(&config, &probe, &plan).expect("workers");
        let models = workers.models().expect("a ComfyUI worker has a models store");
        assert_eq!(
            models.catalogue_token("a.safetensors"),
            Some(Some("old-token".to_owned()))
        );
        assert_eq!(models.catalogue_token("b.safetensors"), None);

        let reloaded = config_with(&second, "new-token");
        let plan = Plan::build(&reloaded, &probe).expect("a plan");
        workers
            .pool()
            .build(&reloaded, &probe, &plan, &[])
            .expect("the reload's workers");
        assert_eq!(
            models.catalogue_token("a.safetensors"),
            Some(Some("new-token".to_owned()))
        );
        assert_eq!(
            models.catalogue_token("b.safetensors"),
            Some(Some("new-token".to_owned()))
        );

        // A catalogue that cannot be read refuses the reload and leaves the store as it was.
        let broken = config_with(&second, "new-token");
        std::fs::write(&second, "[[model]]\nname = 1\n").expect("a broken catalogue");
        assert!(workers.pool().build(&broken, &probe, &plan, &[]).is_err());
        assert_eq!(
            models.catalogue_token("b.safetensors"),
            Some(Some("new-token".to_owned()))
        );
    }
}

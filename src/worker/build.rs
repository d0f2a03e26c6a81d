//! What a worker is built from: its connectors (each with its service's URL, limits, output
//! store and models), the upkeep of its services, its quarantine policy, and the broker it
//! claims through.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use crate::cloud::CloudStores;
use crate::config::{Config, ConnectorKind, Warmup};
use crate::connectors::Connector;
use crate::connectors::a1111::A1111Connector;
use crate::connectors::comfyui::ComfyuiConnector;
use crate::connectors::limits::Limiter;
use crate::connectors::openai::OpenaiConnector;
use crate::connectors::playwright::PlaywrightConnector;
use crate::connectors::replicate::ReplicateConnector;
use crate::connectors::runpod::RunpodConnector;
use crate::connectors::simulation::SimulationConnector;
use crate::gpu::Probe;
use crate::models::{self, ModelStore, StoreSettings};
use crate::plan::{ConnectorPlan, Plan, WorkerPlan};

use super::{Kit, UploadLimits, Worker, WorkerError, WorkerSettings, capabilities, quarantine, upkeep};

/// One limiter per limited external API the configuration runs.
pub(super) fn limiters(config: &Config) -> BTreeMap<ConnectorKind, Arc<Limiter>> {
    [
        (ConnectorKind::Openai, &config.plan.openai.limits),
        (ConnectorKind::Replicate, &config.plan.replicate.limits),
        (ConnectorKind::Runpod, &config.plan.runpod.limits),
    ]
    .into_iter()
    .filter(|(kind, limits)| config.plan.connectors.get(*kind).is_some() && !limits.is_unlimited())
    .map(|(kind, limits)| (kind, Arc::new(Limiter::new(kind.name(), limits.clone()))))
    .collect()
}

/// One planned worker, built: capabilities from facts, one connector per planned connector.
pub(super) fn worker_for(
    wp: &WorkerPlan,
    plan: &Plan,
    config: &Config,
    probe: &Probe,
    kit: &Kit,
) -> Result<Worker, WorkerError> {
    let settings = WorkerSettings {
        heartbeat: config.machine.worker.heartbeat,
        drain: config.machine.worker.drain,
        job_timeout: config.machine.worker.job_timeout,
        progress_every: config.machine.worker.progress_every,
    };
    let mut caps = capabilities::build(wp, &plan.machine_id, probe, &config.machine.worker);
    if kit.models.is_some() && config.plan.models.catalogue.is_some() && wp.runs(ConnectorKind::Comfyui) {
        // This worker can fetch a job's missing models: the broker gives it such a job once the
        // job has waited models.affinity_wait for a worker that has them.
        let wait = u64::try_from(config.plan.models.affinity_wait.as_millis()).unwrap_or(u64::MAX);
        caps.custom
            .insert("models_on_demand_after_ms".to_owned(), serde_json::json!(wait));
    }
    let mut connectors: HashMap<String, Arc<dyn Connector>> = HashMap::new();
    for planned in &wp.connectors {
        let connector = connector_for(
            planned,
            config,
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
    worker.follow_models(capabilities::ModelDirs::of(wp, &config.machine.workspace));
    worker.quarantine_on(quarantine_policy(wp, config));
    worker.upload_alongside(UploadLimits {
        jobs: config.machine.worker.pending_uploads,
        bytes: config.machine.worker.pending_upload_mb.saturating_mul(1024 * 1024),
    });
    worker.recheck_holds_every(config.machine.worker.hold_recheck);
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
                ConnectorKind::Comfyui => &config.plan.comfyui,
                ConnectorKind::A1111 => &config.plan.a1111,
                ConnectorKind::Playwright => &config.plan.playwright,
                _ => return None,
            };
            let endpoint = c.endpoint.as_ref()?;
            let s = plan.services.iter().find(|s| s.name == endpoint.service)?;
            let mut kept = upkeep::Kept::new(s.name.clone(), s.gpu, upkeep::Limits::of(settings), s.ready.clone());
            kept.warmup = warmup_job(c.kind, settings, &s.name)
                .zip(worker.connector(c.kind))
                .map(|(j, c)| (c, j));
            kept.idle = worker.connector(c.kind).map(|c| (c, settings.idle_wait));
            Some(kept)
        })
        .collect()
}

/// The worker's quarantine policy: a connector's own settings win, the first of the worker's in
/// plan order, else the `[worker]` defaults.
fn quarantine_policy(wp: &WorkerPlan, config: &Config) -> quarantine::QuarantinePolicy {
    let (after, cooldown) = config
        .machine
        .worker
        .quarantine_of(wp.connectors.iter().map(|c| c.kind));
    quarantine::QuarantinePolicy { after, cooldown }
}

/// The warm-up job of `service` (a connector of `kind`), when its configuration sets one: the
/// ComfyUI workflow or the A1111 prompt, as the configuration read them.
fn warmup_job(
    kind: ConnectorKind,
    settings: &crate::config::ServiceConnectorConfig,
    service: &str,
) -> Option<crate::connectors::Job> {
    let payload = match settings.warmup.as_ref()? {
        Warmup::Workflow { workflow, .. } => serde_json::Value::Object(workflow.clone()),
        Warmup::Prompt(prompt) => serde_json::json!({ "prompt": prompt }),
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

/// The machine's one models store, when a ComfyUI connector runs here; its object-store sources
/// go through `cloud`, the output store's.
pub(super) fn model_store(
    config: &Config,
    plan: &Plan,
    cloud: &Arc<CloudStores>,
) -> Result<Option<ModelStore>, WorkerError> {
    if !plan.workers.iter().any(|w| w.runs(ConnectorKind::Comfyui)) {
        return Ok(None);
    }
    ModelStore::new(store_settings(config), cloud.clone(), &config.plan.credentials)
        .map(Some)
        .map_err(models_error)
}

/// The models store's settings and catalogue as `config` has them (a reload's, its tokens read
/// again), for [`ModelStore::reconfigure`].
pub(super) fn model_setup(config: &Config) -> Result<models::Setup, WorkerError> {
    models::Setup::read(store_settings(config), &config.plan.credentials).map_err(models_error)
}

fn store_settings(config: &Config) -> StoreSettings {
    let cc = &config.plan.install.comfyui;
    // The manifest's models are installed at start and always present: never evicted.
    let pinned = match &cc.models_manifest {
        Some(path) => crate::installers::manifest_ids(path).unwrap_or_default(),
        None => Default::default(),
    };
    StoreSettings {
        catalogue: config.plan.models.catalogue.clone(),
        shared_dir: cc.models_dir.clone(),
        link_dir: config.machine.workspace.join("ComfyUI").join("models"),
        budget: config.plan.models.cache_max_bytes(),
        pinned,
        loader_inputs: config.plan.models.loader_inputs.clone(),
    }
}

fn models_error(e: models::ModelError) -> WorkerError {
    WorkerError::Setup {
        worker: "models".to_owned(),
        message: e.to_string(),
    }
}

/// The connector the plan describes: a GPU-bound connector talks to the service at its
/// endpoint. The error says what is missing.
fn connector_for(
    planned: &ConnectorPlan,
    config: &Config,
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
            let c = ComfyuiConnector::new(service_url()?).with_stall_timeout(config.plan.comfyui.stall_timeout);
            Arc::new(match models {
                Some(store) => c.with_models(store.clone()),
                None => c,
            })
        }
        ConnectorKind::A1111 => {
            Arc::new(A1111Connector::new(service_url()?).with_stall_timeout(config.plan.a1111.stall_timeout))
        }
        ConnectorKind::Openai => {
            let c = OpenaiConnector::new(
                config.plan.openai.clone(),
                config
                    .plan
                    .credentials
                    .get(&config.plan.openai.api_key_env)
                    .map(str::to_owned),
            );
            Arc::new(match limiter {
                Some(l) => c.with_limiter(l),
                None => c,
            })
        }
        ConnectorKind::Replicate => {
            let c = ReplicateConnector::new(
                config.plan.replicate.clone(),
                config
                    .plan
                    .credentials
                    .get(&config.plan.replicate.api_key_env)
                    .map(str::to_owned),
            );
            Arc::new(match limiter {
                Some(l) => c.with_limiter(l),
                None => c,
            })
        }
        ConnectorKind::Runpod => {
            let c = RunpodConnector::new(
                config.plan.runpod.clone(),
                config
                    .plan
                    .credentials
                    .get(&config.plan.runpod.api_key_env)
                    .map(str::to_owned),
            );
            Arc::new(match limiter {
                Some(l) => c.with_limiter(l),
                None => c,
            })
        }
        ConnectorKind::Simulation => Arc::new(SimulationConnector::new(config.plan.simulation.clone())),
        ConnectorKind::Playwright => {
            Arc::new(PlaywrightConnector::new(service_url()?).with_stall_timeout(config.plan.playwright.stall_timeout))
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The workflow a ComfyUI warm-up runs is the one read when the configuration was loaded:
    /// the file is read once, so a file gone since cannot silently mean "no warm-up".
    #[test]
    fn the_warmup_workflow_is_the_one_read_at_load() {
        let dir = tempfile::tempdir().expect("a temp dir");
        let file = dir.path().join("warmup.json");
        std::fs::write(&file, r#"{"9": {"class_type": "SaveImage", "inputs": {}}}"#).expect("written");
        let toml = format!("[connectors.comfyui]\nwarmup = \"{}\"\n", file.display());
        let env = BTreeMap::<String, String>::new();
        let config = crate::config::load_str(Some(("m.toml", &toml)), &env).expect("a valid configuration");
        std::fs::remove_file(&file).expect("removed");
        let job = warmup_job(ConnectorKind::Comfyui, &config.plan.comfyui, "comfyui-gpu0").expect("a warm-up job");
        assert_eq!(job.payload["9"]["class_type"], "SaveImage");
        let toml = "[connectors.a1111]\nwarmup = \"a red fox\"\n";
        let config = crate::config::load_str(Some(("m.toml", toml)), &env).expect("a valid configuration");
        let job = warmup_job(ConnectorKind::A1111, &config.plan.a1111, "a1111-gpu0").expect("a warm-up job");
        assert_eq!(job.payload["prompt"], "a red fox");
    }
}

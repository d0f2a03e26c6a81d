//! Reloading a running machine: re-read the configuration, check all of it, and apply only the
//! difference between the running plan and the new one, without a restart.
//!
//! One operation, [`Reloader::reload`], reached three ways (SIGHUP, `POST /reload` with the
//! control token, `machine reload`), one at a time through [`serve`]. It loads the
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
//! Settings that belong to the machine as a whole (its id, workspace, Redis, health port, GPU
//! selection, supervisor, logging, the workers' timing) are not changed by a reload: the report
//! lists them as applying at the next restart.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{self, Config, ConfigError, ConnectorKind, Env, Problem, ProcessEnv, WorkerConfig};
use crate::gpu::Probe;
use crate::health::HealthState;
use crate::installers::Tracker;
use crate::plan::{Plan, PlanDiff};
use crate::supervisor::SupervisorHandle;
use crate::worker::{Readiness, WorkerPool};

/// The file in the workspace whose content overrides `WORKER_CONNECTORS` (at start and at each
/// reload).
pub const CONNECTORS_FILE: &str = "worker_connectors";

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// What changed, and what was kept running.
    pub diff: PlanDiff,
    /// Settings that changed but apply only at the next restart.
    pub restart_required: Vec<String>,
    /// Machine-wide settings a reload applied in place (`worker.lease`, from the next claim).
    pub applied: Vec<String>,
    /// The new plan's adjustments (counts capped, CPU mode).
    pub warnings: Vec<String>,
}

/// Why a reload failed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration is invalid; nothing changed.
    #[error("the new configuration is refused, nothing changed")]
    Invalid(#[source] ConfigError),
    /// A step of applying the new plan failed; what was applied before it stays.
    #[error("failed to {step}")]
    Apply {
        /// The step, in words.
        step: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The machine is shutting down or not yet running its services.
    #[error("the machine cannot reload now: {0}")]
    Unavailable(&'static str),
}

impl ReloadError {
    /// Every problem of a refused configuration (empty for other errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ReloadError::Invalid(e) => e.problems(),
            _ => &[],
        }
    }
}

/// A reload request: the caller's reply channel.
pub type ReloadRequest = oneshot::Sender<Result<ReloadReport, ReloadError>>;

/// The environment a reload reads: the process's, with `WORKER_CONNECTORS` taken from
/// `<workspace>/worker_connectors` when that file exists.
struct OverlayEnv<'a> {
    base: &'a dyn Env,
    connectors: Option<String>,
}

impl Env for OverlayEnv<'_> {
    fn var(&self, key: &str) -> Option<String> {
        match (key, &self.connectors) {
            ("WORKER_CONNECTORS", Some(c)) => Some(c.clone()),
            _ => self.base.var(key),
        }
    }

    fn names(&self) -> Vec<String> {
        self.base.names()
    }
}

/// Loads the configuration as `machine run` and `config check` do: the file and `env`, with
/// `WORKER_CONNECTORS` from `<workspace>/worker_connectors` when that file exists (its content
/// trimmed; lines starting with `#` are comments). When the configuration does not load, the
/// workspace is `MACHINE_WORKSPACE`, so that the file's problems are listed with the others.
pub fn load_config(path: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
    let workspace = match config::load(path, env) {
        Ok(c) if read_connectors_file(&c.workspace).is_none() => return Ok(c),
        Ok(c) => c.workspace,
        Err(e) => match env.var("MACHINE_WORKSPACE").filter(|w| !w.trim().is_empty()) {
            Some(ws) => PathBuf::from(ws.trim()),
            None => return Err(e),
        },
    };
    load_in(path, env, &workspace)
}

/// Loads the configuration with `WORKER_CONNECTORS` from `<workspace>/worker_connectors` when
/// that file exists; a reload reads the running machine's workspace.
pub fn load_in(path: Option<&Path>, env: &dyn Env, workspace: &Path) -> Result<Config, ConfigError> {
    config::load(
        path,
        &OverlayEnv {
            base: env,
            connectors: read_connectors_file(workspace),
        },
    )
}

fn read_connectors_file(workspace: &Path) -> Option<String> {
    let text = std::fs::read_to_string(workspace.join(CONNECTORS_FILE)).ok()?;
    let value: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .collect();
    Some(value.join(","))
}

/// The top-level configuration sections a reload does not apply, by the key the report names.
const RESTART_ONLY: &[&str] = &[
    "machine_id",
    "workspace",
    "redis",
    "health_port",
    "gpu",
    "visible_devices",
    "supervisor",
    "log",
    "control_token",
    "health_access",
    "worker",
    "install_timeout",
];

/// The sections of connector settings that are not in the plan, by the connector they concern.
const CONNECTOR_SECTIONS: &[(&str, ConnectorKind)] = &[
    ("openai", ConnectorKind::Openai),
    ("replicate", ConnectorKind::Replicate),
    ("runpod", ConnectorKind::Runpod),
    ("simulation", ConnectorKind::Simulation),
    ("comfyui", ConnectorKind::Comfyui),
    ("a1111", ConnectorKind::A1111),
    ("playwright", ConnectorKind::Playwright),
    ("models", ConnectorKind::Comfyui),
];

/// Compares two configurations as they serialise (secrets masked): the connector kinds whose
/// settings changed (their workers are rebuilt), and the changed settings a reload does not
/// apply.
pub fn settings_changes(old: &Value, new: &Value) -> (BTreeSet<ConnectorKind>, Vec<String>) {
    let differs = |key: &str| old.get(key) != new.get(key);
    let touched = CONNECTOR_SECTIONS
        .iter()
        .filter(|(key, _)| differs(key))
        .map(|(_, kind)| *kind)
        .collect();
    let restart = RESTART_ONLY
        .iter()
        .filter(|k| differs(k))
        .map(|k| (*k).to_owned())
        .collect();
    (touched, restart)
}

/// What changed among the secrets, which the configuration's serialised form masks: the
/// external connectors whose API key changed, and the token settings that changed.
fn credential_changes(old: &Config, new: &Config) -> (Vec<ConnectorKind>, Vec<&'static str>) {
    let key = |c: &Config, kind: ConnectorKind| {
        let var = match kind {
            ConnectorKind::Openai => &c.openai.api_key_env,
            ConnectorKind::Replicate => &c.replicate.api_key_env,
            _ => &c.runpod.api_key_env,
        };
        c.credentials.get(var).map(str::to_owned)
    };
    let keys = [ConnectorKind::Openai, ConnectorKind::Replicate, ConnectorKind::Runpod]
        .into_iter()
        .filter(|k| key(old, *k) != key(new, *k))
        .collect();
    let mut tokens = Vec::new();
    if old.control_token != new.control_token {
        tokens.push("control_token");
    }
    if old.health_access.read_token != new.health_access.read_token {
        tokens.push("health_access");
    }
    (keys, tokens)
}

/// The running machine as a reload changes it. One per machine; [`serve`] runs its reloads one
/// at a time.
#[derive(Debug)]
pub struct Reloader {
    path: Option<PathBuf>,
    config: Config,
    plan: Plan,
    probe: Arc<Probe>,
    services: SupervisorHandle,
    pool: WorkerPool,
    readiness: Readiness,
    state: Arc<HealthState>,
    tracker: Tracker,
    shutdown: CancellationToken,
    /// Stops the readiness feeds of the services a reload started.
    feeds_stop: CancellationToken,
    feeds: Vec<JoinHandle<()>>,
}

/// What a reloader starts from: the running machine's parts.
#[derive(Debug)]
pub struct Running {
    /// The configuration file `machine run` read, read again at each reload.
    pub path: Option<PathBuf>,
    /// The running configuration.
    pub config: Config,
    /// The running plan.
    pub plan: Plan,
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
    pub tracker: Tracker,
    /// The machine's shutdown; a reload stops waiting for installers when it comes.
    pub shutdown: CancellationToken,
}

impl Reloader {
    /// A reloader of the running machine, reading the process environment.
    pub fn new(running: Running) -> Reloader {
        Reloader {
            path: running.path,
            config: running.config,
            plan: running.plan,
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

    /// Loads, checks and applies the configuration as it is now; see the module docs.
    pub async fn reload(&mut self) -> Result<ReloadReport, ReloadError> {
        if self.shutdown.is_cancelled() {
            return Err(ReloadError::Unavailable("it is shutting down"));
        }
        let config =
            load_in(self.path.as_deref(), &ProcessEnv, &self.config.workspace).map_err(ReloadError::Invalid)?;
        let old_json = serde_json::to_value(&self.config).unwrap_or(Value::Null);
        let new_json = serde_json::to_value(&config).unwrap_or(Value::Null);
        let (mut touched, mut restart_required) = settings_changes(&old_json, &new_json);
        // Secrets are not serialised: their changes are found here. A rotated API key rebuilds
        // its connector's workers; the tokens apply at the next restart.
        let (keys_changed, tokens_changed) = credential_changes(&self.config, &config);
        touched.extend(keys_changed);
        for key in tokens_changed {
            if !restart_required.iter().any(|k| k == key) {
                restart_required.push(key.to_owned());
            }
        }
        // The lease alone of `[worker]` applies in place, from the next claim and renewal,
        // when the running heartbeat still renews it at least three times per lease.
        let lease_only = {
            let mut new_worker = new_json.get("worker").cloned().unwrap_or(Value::Null);
            if let (Some(w), Some(old_lease)) = (new_worker.as_object_mut(), old_json["worker"].get("lease")) {
                w.insert("lease".to_owned(), old_lease.clone());
            }
            old_json.get("worker") == Some(&new_worker)
        };
        let new_lease = (config.worker.lease != self.config.worker.lease
            && lease_only
            && config.worker.lease >= self.config.worker.heartbeat * 3)
            .then_some(config.worker.lease);
        if new_lease.is_some() {
            restart_required.retain(|k| k != "worker");
        }
        // Restart-only settings stay as they run (see RESTART_ONLY), and the new plan is made
        // with them: a new workspace or grace must not look like a change of every service.
        let old = &self.config;
        let applied = Config {
            machine_id: old.machine_id.clone(),
            workspace: old.workspace.clone(),
            redis: old.redis.clone(),
            health_port: old.health_port,
            gpu: old.gpu.clone(),
            visible_devices: old.visible_devices.clone(),
            supervisor: old.supervisor.clone(),
            log: old.log.clone(),
            control_token: old.control_token.clone(),
            health_access: old.health_access.clone(),
            worker: WorkerConfig {
                lease: new_lease.unwrap_or(old.worker.lease),
                ..old.worker.clone()
            },
            install_timeout: old.install_timeout,
            ..config
        };
        let plan = Plan::build(&applied, &self.probe)
            .and_then(|p| {
                let missing = p.missing_programs();
                if missing.is_empty() { Ok(p) } else { Err(missing) }
            })
            .map_err(|problems| ReloadError::Invalid(ConfigError::Invalid(problems)))?;
        let diff = PlanDiff::between(&self.plan, &plan, &touched);
        // Workers are built before anything stops: one that cannot be built (an API key
        // missing) refuses the reload like any other problem.
        let starting = diff.workers_to_start(&plan);
        let built = self
            .pool
            .build(&applied, &self.probe, &plan, &starting, &ProcessEnv)
            .map_err(|e| {
                ReloadError::Invalid(ConfigError::Invalid(vec![Problem {
                    key: "WORKER_CONNECTORS".to_owned(),
                    message: e.to_string(),
                }]))
            })?;
        let mut applied_settings = Vec::new();
        if self.pool.renew_credentials(&applied.credentials) {
            tracing::info!("reload: the output store uses the credentials read now");
            applied_settings.push("output store credentials (read again)".to_owned());
        }
        if let Some(lease) = new_lease {
            if self.pool.set_lease(lease) {
                tracing::info!(lease = ?lease, "reload: the lease applies from the next claim");
            }
            applied_settings.push(format!(
                "worker.lease = {} (from the next claim)",
                humantime::format_duration(lease)
            ));
        }
        let report = ReloadReport {
            diff: diff.clone(),
            restart_required,
            applied: applied_settings,
            warnings: plan.warnings.clone(),
        };
        if diff.is_empty() {
            tracing::info!("reload: nothing to change");
            self.config = applied;
            return Ok(report);
        }
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

        for spec in diff.services_to_stop(&self.plan) {
            self.services
                .remove(&spec.name)
                .await
                .map_err(|e| apply(format!("stop service {}", spec.name), e))?;
            self.readiness.remove(&spec.name);
        }

        let new_installers: Vec<&'static str> = plan
            .installers
            .iter()
            .copied()
            .filter(|i| !self.plan.installers.contains(i))
            .collect();
        if !new_installers.is_empty() {
            let mut only = plan.clone();
            only.installers = new_installers;
            tokio::select! {
                r = crate::installers::before_services(&applied, &only, &self.tracker, self.shutdown.child_token()) => {
                    r.map_err(|e| apply("install the added connectors".to_owned(), e))?;
                }
                () = self.shutdown.cancelled() => return Err(ReloadError::Unavailable("it is shutting down")),
            }
        }

        for spec in diff.services_to_start(&plan) {
            self.services
                .add(spec.clone())
                .map_err(|e| apply(format!("start service {}", spec.name), e))?;
            if let Some((rx, feed)) = crate::app::readiness_feed(&self.services, &spec.name, &self.feeds_stop) {
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
        self.state.reloaded(&applied, &plan, statuses);
        self.config = applied;
        self.plan = plan;
        Ok(report)
    }

    /// Stops the readiness feeds this reloader started.
    pub async fn stop(self) {
        self.feeds_stop.cancel();
        for feed in self.feeds {
            let _ = feed.await;
        }
    }
}

fn apply(step: String, e: impl std::error::Error + Send + Sync + 'static) -> ReloadError {
    ReloadError::Apply {
        step,
        source: Box::new(e),
    }
}

/// Runs reloads one at a time until `stop`: each request's result goes back to its sender, and
/// each `hup` (SIGHUP) reloads with the result logged.
pub async fn serve(
    mut reloader: Reloader,
    mut requests: mpsc::Receiver<ReloadRequest>,
    hup: Arc<Notify>,
    stop: CancellationToken,
) {
    loop {
        let reply = tokio::select! {
            () = stop.cancelled() => break,
            () = hup.notified() => {
                tracing::info!("SIGHUP received: reloading the configuration");
                None
            }
            Some(reply) = requests.recv() => Some(reply),
        };
        let result = reloader.reload().await;
        match &result {
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
        if let Some(reply) = reply {
            let _ = reply.send(result);
        }
    }
    reloader.stop().await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn settings_changes_sort_connectors_from_restart_only() {
        let old =
            json!({ "openai": { "base_url": "a" }, "health_port": 1, "worker": { "lease": "60s" }, "simulation": {} });
        let new =
            json!({ "openai": { "base_url": "b" }, "health_port": 2, "worker": { "lease": "60s" }, "simulation": {} });
        let (touched, restart) = settings_changes(&old, &new);
        assert_eq!(touched, BTreeSet::from([ConnectorKind::Openai]));
        assert_eq!(restart, ["health_port"]);
        assert_eq!(settings_changes(&old, &old), (BTreeSet::new(), Vec::new()));
    }

    #[test]
    fn every_compared_section_is_a_key_of_the_configuration() {
        let c = serde_json::to_value(Config::for_tests(&[("OPENAI_API_KEY", "k")])).unwrap();
        for key in RESTART_ONLY.iter().chain(CONNECTOR_SECTIONS.iter().map(|(k, _)| k)) {
            assert!(c.get(key).is_some(), "`{key}` is not a key of the serialised Config");
        }
    }

    #[test]
    fn the_workspace_file_overrides_worker_connectors() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().display().to_string();
        let env: BTreeMap<String, String> = [
            ("MACHINE_WORKSPACE", ws.as_str()),
            ("WORKER_CONNECTORS", "simulation:1"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        assert_eq!(load_config(None, &env).unwrap().connectors.to_string(), "simulation:1");
        std::fs::write(dir.path().join(CONNECTORS_FILE), "# reloaded\nsimulation:3\n").unwrap();
        assert_eq!(load_config(None, &env).unwrap().connectors.to_string(), "simulation:3");
        std::fs::write(dir.path().join(CONNECTORS_FILE), "nope:1\n").unwrap();
        let problems = load_config(None, &env).unwrap_err();
        assert!(
            problems.problems().iter().any(|p| p.key == "WORKER_CONNECTORS"),
            "{problems:?}"
        );
    }
}

//! The plan: from the configuration and the probe, one value that says what this machine runs.
//!
//! Per GPU one worker (`<machine>-gpu<i>`) serves every GPU-bound connector on that GPU, since a
//! GPU runs one heavy job at a time; each GPU-bound connector gets a service on that GPU
//! (`comfyui-gpu<i>` on `base_port + i` with `CUDA_VISIBLE_DEVICES=i`). Without a GPU the
//! GPU-bound connectors share one `<machine>-cpu0` worker whose services run in CPU mode.
//! External connectors get `count` workers each (`<machine>-openai-1`, ...). User-defined
//! services join the plan's, and the whole service graph is checked here: unique names, known
//! `after` targets, no cycles, no port clashes.
//!
//! The plan is the one place that derives what the rest of the machine reads: each worker's
//! connectors with the job services each one runs and, for a GPU-bound connector, the
//! supervised service it talks to and that service's URL; the services each worker waits for;
//! and the installers `machine run` runs before the services start.
//!
//! [`PlanDiff`] compares two plans (the running one and a reloaded one): which workers and
//! services are added, removed, changed or kept. It is pure, so `machine reload` applies and
//! `machine config check --diff` prints the same answer.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use url::Url;

use crate::config::{
    Config, ConnectorKind, ProbeCheck, ProbeSpec, Problem, RestartPolicy, ServiceConnectorConfig, ServiceSpec,
};
use crate::gpu::Probe;

/// What this machine runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The machine id.
    pub machine_id: String,
    /// Number of GPUs in use (0 means CPU mode for GPU-bound connectors).
    pub gpu_count: usize,
    /// Workers, GPU workers first.
    pub workers: Vec<WorkerPlan>,
    /// Every supervised service: the connectors' and the user's.
    pub services: Vec<ServiceSpec>,
    /// The installers `machine run` runs before starting the services, in report order.
    #[serde(skip_deserializing)]
    pub installers: Vec<&'static str>,
    /// Adjustments made while planning (counts capped, CPU mode), for the log.
    pub warnings: Vec<String>,
}

/// One worker: a task that claims and runs jobs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WorkerPlan {
    /// Worker id in the fleet.
    pub id: String,
    /// The GPU the worker owns; `None` for CPU-mode and external workers.
    pub gpu: Option<u32>,
    /// What kind of worker this is.
    pub kind: WorkerKind,
    /// Connectors the worker runs jobs through, each with the job services it runs.
    pub connectors: Vec<ConnectorPlan>,
    /// Supervised services that must be ready before the worker claims.
    pub waits_for: Vec<String>,
}

/// One connector of a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConnectorPlan {
    /// Which connector.
    pub kind: ConnectorKind,
    /// The job `service_required` values it runs: the kind's own, and for Replicate the
    /// model-family aliases (`replicate:<alias>`).
    pub job_services: Vec<String>,
    /// The supervised service a GPU-bound connector talks to; `None` for external connectors.
    pub endpoint: Option<Endpoint>,
}

/// Where a connector reaches its supervised service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// The service's name in the plan (`comfyui-gpu0`).
    pub service: String,
    /// Its base URL on the loopback interface.
    #[serde(serialize_with = "as_str", deserialize_with = "from_str")]
    pub url: Url,
}

fn as_str<S: serde::Serializer>(url: &Url, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(url.as_str())
}

fn from_str<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Url, D::Error> {
    let s = String::deserialize(d)?;
    Url::parse(&s).map_err(serde::de::Error::custom)
}

impl WorkerPlan {
    /// The job `service_required` values the worker accepts (its `job_service_required_map`),
    /// connector by connector.
    pub fn job_services(&self) -> Vec<String> {
        self.connectors
            .iter()
            .flat_map(|c| c.job_services.iter().cloned())
            .collect()
    }

    /// Whether one of its connectors is `kind`.
    pub fn runs(&self, kind: ConnectorKind) -> bool {
        self.connectors.iter().any(|c| c.kind == kind)
    }
}

/// The kind of a worker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerKind {
    /// Owns one GPU.
    Gpu,
    /// Runs GPU-bound connectors without a GPU.
    Cpu,
    /// Runs an external connector (HTTP API, simulation).
    External,
}

/// The GPU-bound connectors with how many GPUs each runs on (`kind:N` capped at the GPUs
/// there are, one slot without a GPU); a warning for each cap.
fn gpu_bound(config: &Config, probe: &Probe, warnings: &mut Vec<String>) -> Vec<(ConnectorKind, usize)> {
    config
        .plan
        .connectors
        .entries()
        .iter()
        .filter(|r| r.kind.gpu_bound())
        .map(|r| {
            let slots = probe.gpus.len().max(1);
            let wanted = r.count.map_or(slots, |n| n.get() as usize);
            if wanted > slots {
                warnings.push(format!(
                    "{}:{wanted} capped at {slots}: {}",
                    r.kind,
                    if probe.gpus.is_empty() {
                        "without a GPU one CPU-mode worker runs GPU-bound connectors".to_owned()
                    } else {
                        format!("this machine has {slots} GPU(s)")
                    }
                ));
            }
            (r.kind, wanted.min(slots))
        })
        .collect()
}

/// The workers of the connectors that call an external API: `count` each, no GPU, no service.
fn external_workers(config: &Config) -> Vec<WorkerPlan> {
    let id = &config.machine.machine_id;
    let mut workers = Vec::new();
    for r in config.plan.connectors.entries().iter().filter(|r| !r.kind.gpu_bound()) {
        let count = r.count.map_or(1, |n| n.get());
        let mut job_services = own_job_services(r.kind);
        // Replicate model-family aliases are services of their own: a job of
        // `replicate:<alias>` runs the model the alias names.
        if r.kind == ConnectorKind::Replicate {
            job_services.extend(config.plan.replicate.aliases.keys().map(|a| format!("replicate:{a}")));
        }
        for n in 1..=count {
            let connector = ConnectorPlan {
                kind: r.kind,
                job_services: job_services.clone(),
                endpoint: None,
            };
            workers.push(worker(
                format!("{id}-{}-{n}", r.kind),
                None,
                WorkerKind::External,
                vec![connector],
            ));
        }
    }
    workers
}

impl Plan {
    /// Derives the plan; problems are configuration problems naming the key to fix.
    pub fn build(config: &Config, probe: &Probe) -> Result<Plan, Vec<Problem>> {
        let mut warnings = Vec::new();
        let mut workers = Vec::new();
        let mut services: Vec<ServiceSpec> = Vec::new();
        let id = &config.machine.machine_id;

        let gpu_bound = gpu_bound(config, probe, &mut warnings);

        if !gpu_bound.is_empty() {
            if probe.gpus.is_empty() {
                warnings.push("no GPU: GPU-bound connectors run in CPU mode on worker cpu0".to_owned());
                let kinds: Vec<ConnectorKind> = gpu_bound.iter().map(|(k, _)| *k).collect();
                let connectors = service_connectors(config, &kinds, None, &mut services);
                workers.push(worker(format!("{id}-cpu0"), None, WorkerKind::Cpu, connectors));
            } else {
                for (slot, gpu) in probe.gpus.iter().enumerate() {
                    let kinds: Vec<ConnectorKind> =
                        gpu_bound.iter().filter(|(_, n)| slot < *n).map(|(k, _)| *k).collect();
                    if kinds.is_empty() {
                        continue;
                    }
                    let connectors = service_connectors(config, &kinds, Some(gpu.index), &mut services);
                    workers.push(worker(
                        format!("{id}-gpu{}", gpu.index),
                        Some(gpu.index),
                        WorkerKind::Gpu,
                        connectors,
                    ));
                }
            }
        }

        workers.extend(external_workers(config));

        let mut problems = Vec::new();
        if config.machine.redis.is_none() {
            services.insert(0, local_redis_service(config, &mut problems));
        }
        for user in &config.plan.services {
            if services.iter().any(|s| s.name == user.name) {
                problems.push(Problem {
                    key: format!("services.{}", user.name),
                    message: "this name is taken by a service of the plan; choose another".to_owned(),
                });
            }
        }
        services.extend(config.plan.services.iter().cloned());
        check_graph(&services, &mut problems);
        check_ports(config, &services, &mut problems);
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Plan {
            machine_id: id.clone(),
            gpu_count: probe.gpus.len(),
            workers,
            services,
            installers: crate::installers::needed(config),
            warnings,
        })
    }

    /// Service names in start order: every service after the ones it waits for (ties by name).
    pub fn start_order(&self) -> Vec<&ServiceSpec> {
        let mut done: BTreeSet<&str> = BTreeSet::new();
        let mut order = Vec::new();
        // The graph was checked acyclic in `build`, so each round places at least one service.
        while order.len() < self.services.len() {
            for s in &self.services {
                if !done.contains(s.name.as_str()) && s.after.iter().all(|d| done.contains(d.as_str())) {
                    order.push(s);
                }
            }
            for s in &order {
                done.insert(s.name.as_str());
            }
        }
        order
    }
}

/// What changes between a running plan and a new one, by name: the answer of a reload.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlanDiff {
    /// Workers by id.
    pub workers: Changes,
    /// Supervised services by name.
    pub services: Changes,
}

/// Names sorted by what happens to them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    /// In the new plan only: started.
    pub added: Vec<String>,
    /// In the running plan only: stopped.
    pub removed: Vec<String>,
    /// In both, but different: stopped (a worker drains first) and started again as planned.
    pub changed: Vec<String>,
    /// In both and the same: left running untouched.
    pub kept: Vec<String>,
}

impl Changes {
    /// Whether nothing is added, removed or changed.
    pub fn is_empty(&self) -> bool {
        self.added.is_empty() && self.removed.is_empty() && self.changed.is_empty()
    }
}

impl PlanDiff {
    /// Compares `old` (running) with `new`. A worker counts as changed when its plan differs,
    /// when one of the services it waits for changed (it must drain before its service
    /// restarts, so that the service restarts between jobs), or when it runs a connector kind
    /// in `touched` (connector settings that are not part of the plan changed, e.g. an API's
    /// base URL or the simulation's timing). Lists follow the plans' order.
    pub fn between(old: &Plan, new: &Plan, touched: &BTreeSet<ConnectorKind>) -> PlanDiff {
        let mut services = Changes::default();
        for s in &new.services {
            match old.services.iter().find(|o| o.name == s.name) {
                None => services.added.push(s.name.clone()),
                Some(o) if o != s => services.changed.push(s.name.clone()),
                Some(_) => services.kept.push(s.name.clone()),
            }
        }
        services.removed = old
            .services
            .iter()
            .filter(|o| !new.services.iter().any(|s| s.name == o.name))
            .map(|o| o.name.clone())
            .collect();
        let mut workers = Changes::default();
        for w in &new.workers {
            match old.workers.iter().find(|o| o.id == w.id) {
                None => workers.added.push(w.id.clone()),
                Some(o)
                    if o != w
                        || w.waits_for.iter().any(|s| services.changed.contains(s))
                        || w.connectors.iter().any(|c| touched.contains(&c.kind)) =>
                {
                    workers.changed.push(w.id.clone());
                }
                Some(_) => workers.kept.push(w.id.clone()),
            }
        }
        workers.removed = old
            .workers
            .iter()
            .filter(|o| !new.workers.iter().any(|w| w.id == o.id))
            .map(|o| o.id.clone())
            .collect();
        PlanDiff { workers, services }
    }

    /// Whether applying the diff would change nothing.
    pub fn is_empty(&self) -> bool {
        self.workers.is_empty() && self.services.is_empty()
    }

    /// The workers to drain and stop: the removed and the changed.
    pub fn workers_to_stop(&self) -> Vec<&str> {
        self.workers
            .removed
            .iter()
            .chain(&self.workers.changed)
            .map(String::as_str)
            .collect()
    }

    /// The workers to start from the new plan: the added and the changed, in its order.
    pub fn workers_to_start<'p>(&self, new: &'p Plan) -> Vec<&'p WorkerPlan> {
        new.workers
            .iter()
            .filter(|w| self.workers.added.contains(&w.id) || self.workers.changed.contains(&w.id))
            .collect()
    }

    /// The services to stop, the removed and the changed, in reverse start order of `old`:
    /// a service stops after every service that starts after it.
    pub fn services_to_stop<'p>(&self, old: &'p Plan) -> Vec<&'p ServiceSpec> {
        let mut order: Vec<&ServiceSpec> = old
            .start_order()
            .into_iter()
            .filter(|s| self.services.removed.contains(&s.name) || self.services.changed.contains(&s.name))
            .collect();
        order.reverse();
        order
    }

    /// The services to start, the added and the changed, in start order of `new`.
    pub fn services_to_start<'p>(&self, new: &'p Plan) -> Vec<&'p ServiceSpec> {
        new.start_order()
            .into_iter()
            .filter(|s| self.services.added.contains(&s.name) || self.services.changed.contains(&s.name))
            .collect()
    }
}

impl std::fmt::Display for PlanDiff {
    /// One line per worker and service that a reload would touch, then a count of the kept.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (what, c) in [("worker", &self.workers), ("service", &self.services)] {
            for (sign, verb, names) in [
                ('+', "added", &c.added),
                ('-', "removed", &c.removed),
                ('~', "changed (restarted)", &c.changed),
            ] {
                for n in names {
                    writeln!(f, "{sign} {what} {n} {verb}")?;
                }
            }
        }
        if self.is_empty() {
            writeln!(f, "no change")?;
        }
        writeln!(
            f,
            "unchanged: {} worker(s), {} service(s) keep running",
            self.workers.kept.len(),
            self.services.kept.len()
        )
    }
}

/// Local mode: the private redis-server the machine supervises when no `HUB_REDIS_URL` is set.
/// It listens only on a Unix socket under the workspace (no port to clash with), keeps its data
/// in an append-only file there, and is critical: without it no worker can do anything.
fn local_redis_service(config: &Config, problems: &mut Vec<Problem>) -> ServiceSpec {
    let socket = config.machine.local_redis_socket();
    // sun_path holds 108 bytes including the terminating NUL.
    if socket.as_os_str().len() > 107 {
        problems.push(Problem {
            key: "MACHINE_WORKSPACE".to_owned(),
            message: format!(
                "local mode puts redis.sock at {}, longer than a Unix socket path may be; use a shorter workspace or set HUB_REDIS_URL",
                socket.display()
            ),
        });
    }
    let dir = config.machine.local_redis_dir();
    let s = |v: &str| v.to_owned();
    ServiceSpec {
        name: LOCAL_REDIS.to_owned(),
        command: vec![
            s("redis-server"),
            s("--port"),
            s("0"),
            s("--unixsocket"),
            socket.display().to_string(),
            s("--unixsocketperm"),
            s("700"),
            s("--dir"),
            dir.display().to_string(),
            s("--appendonly"),
            s("yes"),
            s("--save"),
            String::new(),
        ],
        env: BTreeMap::new(),
        pass_env: Vec::new(),
        cwd: None,
        restart: RestartPolicy::Always,
        ready: Some(ProbeSpec {
            check: ProbeCheck::Command(vec![s("redis-cli"), s("-s"), socket.display().to_string(), s("ping")]),
            // Probed every 100 ms until it first answers (see the supervisor's probes), then
            // rarely: each check spawns redis-cli.
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(2),
            failure_threshold: 1,
            initial_delay: Duration::ZERO,
        }),
        liveness: None,
        after: Vec::new(),
        critical: true,
        grace: config.machine.supervisor.grace,
        connector: None,
        gpu: None,
        port: None,
    }
}

/// The name of the local-mode redis-server service.
pub const LOCAL_REDIS: &str = "redis";

impl Plan {
    /// Programs the plan runs that must be on `PATH` (commands given as bare names), each with
    /// the key to fix when one is missing. Kept apart from `build` so planning stays pure.
    pub fn missing_programs(&self) -> Vec<Problem> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let on_path = |prog: &str| std::env::split_paths(&path).any(|d| d.join(prog).is_file());
        self.services
            .iter()
            .filter_map(|s| {
                let prog = s.command.first()?;
                if prog.contains('/') || on_path(prog) {
                    return None;
                }
                let (key, hint) = match (s.name == LOCAL_REDIS, s.connector) {
                    (true, None) => (
                        "HUB_REDIS_URL".to_owned(),
                        " (local mode runs a private redis-server: apt-get install redis-server, or set HUB_REDIS_URL)",
                    ),
                    (_, Some(k)) => (format!("connectors.{k}.command"), ""),
                    (false, None) => (format!("services.{}.command", s.name), ""),
                };
                Some(Problem {
                    key,
                    message: format!("`{prog}` is not on PATH{hint}"),
                })
            })
            .collect()
    }
}

fn worker(id: String, gpu: Option<u32>, kind: WorkerKind, connectors: Vec<ConnectorPlan>) -> WorkerPlan {
    let waits_for = connectors
        .iter()
        .filter_map(|c| c.endpoint.as_ref().map(|e| e.service.clone()))
        .collect();
    WorkerPlan {
        id,
        gpu,
        kind,
        connectors,
        waits_for,
    }
}

fn own_job_services(kind: ConnectorKind) -> Vec<String> {
    kind.job_services().iter().map(|s| (*s).to_owned()).collect()
}

/// The GPU-bound connectors `kinds` on `gpu` (`None`: CPU mode), each with its service, which
/// joins `services`.
fn service_connectors(
    config: &Config,
    kinds: &[ConnectorKind],
    gpu: Option<u32>,
    services: &mut Vec<ServiceSpec>,
) -> Vec<ConnectorPlan> {
    kinds
        .iter()
        .map(|&kind| {
            let endpoint = connector_service(config, kind, gpu).map(|(spec, endpoint)| {
                services.push(spec);
                endpoint
            });
            ConnectorPlan {
                kind,
                job_services: own_job_services(kind),
                endpoint,
            }
        })
        .collect()
}

fn service_name(kind: ConnectorKind, gpu: Option<u32>) -> String {
    match gpu {
        Some(i) => format!("{kind}-gpu{i}"),
        None => format!("{kind}-cpu0"),
    }
}

/// The settings of a connector that runs as a supervised service; `None` for the external
/// connectors (HTTP APIs and the simulation), which need none.
fn service_settings(config: &Config, kind: ConnectorKind) -> Option<&ServiceConnectorConfig> {
    match kind {
        ConnectorKind::Comfyui => Some(&config.plan.comfyui),
        ConnectorKind::A1111 => Some(&config.plan.a1111),
        ConnectorKind::Playwright => Some(&config.plan.playwright),
        ConnectorKind::Openai | ConnectorKind::Replicate | ConnectorKind::Runpod | ConnectorKind::Simulation => None,
    }
}

/// The service a GPU-bound connector needs on one GPU (or in CPU mode when `gpu` is `None`),
/// and the connector's endpoint on it; `None` for a connector that runs no service.
fn connector_service(config: &Config, kind: ConnectorKind, gpu: Option<u32>) -> Option<(ServiceSpec, Endpoint)> {
    let settings = service_settings(config, kind)?;
    let port = settings.base_port.saturating_add(gpu.unwrap_or(0) as u16);
    let ws = &config.machine.workspace;
    let launch = crate::installers::launch(kind, ws, port, gpu)?;
    let health_path = launch.health_path;
    let (command, cwd) = match &settings.command {
        Some(template) => (
            template
                .iter()
                .map(|a| {
                    a.replace("{port}", &port.to_string())
                        .replace("{gpu}", &gpu.map_or_else(|| "cpu".to_owned(), |g| g.to_string()))
                        .replace("{workspace}", &ws.display().to_string())
                })
                .collect(),
            None,
        ),
        None => {
            let mut c = launch.command;
            c.extend(settings.extra_args.iter().cloned());
            (c, Some(launch.cwd))
        }
    };
    let mut env = BTreeMap::new();
    // NVML numbers GPUs in PCI bus order; CUDA must use the same order for index i to mean the
    // same GPU.
    env.insert("CUDA_DEVICE_ORDER".to_owned(), "PCI_BUS_ID".to_owned());
    env.insert(
        "CUDA_VISIBLE_DEVICES".to_owned(),
        gpu.map_or_else(String::new, |g| g.to_string()),
    );
    let url = format!("http://127.0.0.1:{port}{health_path}");
    let endpoint = Endpoint {
        service: service_name(kind, gpu),
        url: Url::parse(&format!("http://127.0.0.1:{port}")).expect("a loopback URL with a port parses"),
    };
    let spec = ServiceSpec {
        name: endpoint.service.clone(),
        command,
        env,
        pass_env: Vec::new(),
        cwd,
        restart: RestartPolicy::Always,
        ready: Some(ProbeSpec {
            check: ProbeCheck::Http(url.clone()),
            interval: Duration::from_millis(500),
            timeout: Duration::from_secs(2),
            failure_threshold: 1,
            initial_delay: Duration::ZERO,
        }),
        liveness: Some(ProbeSpec {
            check: ProbeCheck::Http(url),
            interval: Duration::from_secs(10),
            timeout: Duration::from_secs(5),
            failure_threshold: 6,
            initial_delay: Duration::from_secs(30),
        }),
        after: Vec::new(),
        critical: false,
        grace: config.machine.supervisor.grace,
        connector: Some(kind),
        gpu,
        port: Some(port),
    };
    Some((spec, endpoint))
}

fn check_graph(services: &[ServiceSpec], problems: &mut Vec<Problem>) {
    let names: BTreeSet<&str> = services.iter().map(|s| s.name.as_str()).collect();
    let mut graph_ok = true;
    for s in services {
        for dep in &s.after {
            if !names.contains(dep.as_str()) {
                graph_ok = false;
                problems.push(Problem {
                    key: format!("services.{}.after", s.name),
                    message: format!(
                        "`{dep}` is not a service of this machine (services: {})",
                        names.iter().copied().collect::<Vec<_>>().join(", ")
                    ),
                });
            }
        }
    }
    if !graph_ok {
        return;
    }
    // Kahn's algorithm: what cannot be placed lies on or behind a cycle.
    let mut placed: BTreeSet<&str> = BTreeSet::new();
    loop {
        let before = placed.len();
        for s in services {
            if s.after.iter().all(|d| placed.contains(d.as_str())) {
                placed.insert(s.name.as_str());
            }
        }
        if placed.len() == before {
            break;
        }
    }
    let stuck: Vec<&str> = services
        .iter()
        .map(|s| s.name.as_str())
        .filter(|n| !placed.contains(n))
        .collect();
    if !stuck.is_empty() {
        problems.push(Problem {
            key: format!("services.{}.after", stuck[0]),
            message: format!("`after` forms a cycle among: {}", stuck.join(", ")),
        });
    }
}

fn check_ports(config: &Config, services: &[ServiceSpec], problems: &mut Vec<Problem>) {
    let mut seen: BTreeMap<u16, &str> = BTreeMap::new();
    seen.insert(config.machine.health_port, "the health server");
    for s in services {
        if let Some(p) = s.port {
            if let Some(other) = seen.insert(p, &s.name) {
                let kind = s.connector.map_or("services", |k| k.name());
                problems.push(Problem {
                    key: format!("connectors.{kind}.base_port"),
                    message: format!("port {p} of `{}` is also used by {other}", s.name),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuInfo, HostInfo};

    fn probe(n: u32) -> Probe {
        let host = HostInfo {
            cpu_cores: 8,
            ram_total_bytes: 32 << 30,
            ram_available_bytes: 16 << 30,
            disk_free_bytes: None,
        };
        Probe::from_parts(
            (0..n)
                .map(|index| GpuInfo {
                    index,
                    name: "RTX".into(),
                    uuid: None,
                    memory_total_bytes: 24 << 30,
                    memory_free_bytes: 0,
                })
                .collect(),
            host,
        )
    }

    fn plan(n: u32, env: &[(&str, &str)]) -> Plan {
        let mut all = vec![("MACHINE_ID", "m1"), ("HUB_REDIS_URL", "redis://hub:6379")];
        all.extend_from_slice(env);
        Plan::build(&Config::for_tests(&all), &probe(n)).unwrap()
    }

    fn ids(p: &Plan) -> Vec<&str> {
        p.workers.iter().map(|w| w.id.as_str()).collect()
    }

    #[test]
    fn replicate_aliases_are_services_of_its_workers() {
        let env: BTreeMap<&str, &str> = [
            ("MACHINE_ID", "m1"),
            ("HUB_REDIS_URL", "redis://hub:6379"),
            ("WORKER_CONNECTORS", "replicate:2,runpod"),
            ("REPLICATE_API_TOKEN", "r8"),
            ("RUNPOD_API_KEY", "rp"),
        ]
        .into_iter()
        .collect();
        let file = "[connectors.replicate.aliases]\nflux = \"bfl/flux-schnell\"\nsdxl = \"stability/sdxl:abc\"\n";
        let config = crate::config::load_str(Some(("f.toml", file)), &env).unwrap();
        let p = Plan::build(&config, &probe(1)).unwrap();
        assert_eq!(ids(&p), ["m1-replicate-1", "m1-replicate-2", "m1-runpod-1"]);
        assert_eq!(
            p.workers[1].job_services(),
            ["replicate", "replicate:flux", "replicate:sdxl"]
        );
        assert_eq!(p.workers[2].job_services(), ["runpod"]);
        assert!(p.workers.iter().all(|w| w.kind == WorkerKind::External));
    }

    #[test]
    fn two_gpus_comfyui_and_openai() {
        let p = plan(
            2,
            &[("WORKER_CONNECTORS", "comfyui,openai:2"), ("OPENAI_API_KEY", "sk-test")],
        );
        assert_eq!(ids(&p), ["m1-gpu0", "m1-gpu1", "m1-openai-1", "m1-openai-2"]);
        let c1 = &p.services[1];
        assert_eq!(c1.name, "comfyui-gpu1");
        assert_eq!(c1.port, Some(8189));
        assert_eq!(c1.env["CUDA_VISIBLE_DEVICES"], "1");
        assert!(c1.command.contains(&"8189".to_owned()));
        assert_eq!(p.workers[1].waits_for, ["comfyui-gpu1"]);
        let comfy = &p.workers[1].connectors[0];
        assert_eq!(
            comfy.endpoint,
            Some(Endpoint {
                service: "comfyui-gpu1".to_owned(),
                url: Url::parse("http://127.0.0.1:8189").unwrap(),
            })
        );
        assert_eq!(comfy.job_services, ["comfyui"]);
        assert_eq!(p.workers[2].connectors[0].endpoint, None);
        assert!(p.workers[2].waits_for.is_empty());
        assert_eq!(p.installers, ["comfyui", "comfyui-nodes", "comfyui-models"]);
        assert_eq!(p.workers[2].job_services().len(), 4);
    }

    #[test]
    fn gpu_worker_serves_every_gpu_bound_connector() {
        let p = plan(2, &[("WORKER_CONNECTORS", "comfyui,a1111:1,playwright:5,simulation:4")]);
        let kinds = |w: &WorkerPlan| w.connectors.iter().map(|c| c.kind).collect::<Vec<_>>();
        assert_eq!(
            kinds(&p.workers[0]),
            [ConnectorKind::Comfyui, ConnectorKind::A1111, ConnectorKind::Playwright]
        );
        assert_eq!(
            kinds(&p.workers[1]),
            [ConnectorKind::Comfyui, ConnectorKind::Playwright]
        );
        assert_eq!(
            p.workers[0].waits_for,
            ["comfyui-gpu0", "a1111-gpu0", "playwright-gpu0"]
        );
        assert_eq!(
            p.workers[0].connectors[2].job_services,
            ["playwright", "p5", "html_render"],
            "each connector carries the job services it runs"
        );
        assert_eq!(
            p.installers,
            ["comfyui", "comfyui-nodes", "comfyui-models", "playwright"]
        );
        assert_eq!(
            p.workers[0].job_services(),
            ["comfyui", "a1111", "playwright", "p5", "html_render"]
        );
        assert!(
            p.warnings.iter().any(|w| w.contains("playwright:5 capped at 2")),
            "{:?}",
            p.warnings
        );
        assert_eq!(
            ids(&p)[2..],
            [
                "m1-simulation-1",
                "m1-simulation-2",
                "m1-simulation-3",
                "m1-simulation-4"
            ]
        );
        assert_eq!(
            p.services.iter().find(|s| s.name == "a1111-gpu0").unwrap().port,
            Some(7860)
        );
    }

    #[test]
    fn no_gpu_means_cpu_mode() {
        let p = plan(
            0,
            &[("WORKER_CONNECTORS", "comfyui,openai"), ("OPENAI_API_KEY", "sk-test")],
        );
        assert_eq!(ids(&p), ["m1-cpu0", "m1-openai-1"]);
        assert_eq!(p.services[0].name, "comfyui-cpu0");
        assert!(p.services[0].command.contains(&"--cpu".to_owned()));
        assert_eq!(p.services[0].env["CUDA_VISIBLE_DEVICES"], "");
        assert_eq!(p.gpu_count, 0);
    }

    #[test]
    fn default_is_one_simulation_worker_in_local_mode() {
        let c = Config::for_tests(&[("MACHINE_ID", "m1"), ("MACHINE_WORKSPACE", "/ws")]);
        let p = Plan::build(&c, &probe(4)).unwrap();
        assert_eq!(ids(&p), ["m1-simulation-1"]);
        let redis = &p.services[0];
        assert_eq!(redis.name, "redis");
        assert!(redis.critical);
        assert!(redis.command.contains(&"/ws/run/redis.sock".to_owned()));
        let with_hub = plan(4, &[("HUB_REDIS_URL", "redis://h:6379")]);
        assert!(with_hub.services.is_empty());
    }

    #[test]
    fn missing_programs_name_the_key() {
        let file = "[services.x]\ncommand = [\"no-such-program-xyz\"]\n[services.y]\ncommand = [\"/bin/sh\"]\n";
        let c = crate::config::load_str(Some(("f", file)), &BTreeMap::from([("HUB_REDIS_URL", "redis://h")])).unwrap();
        let p = Plan::build(&c, &probe(0)).unwrap();
        let missing = p.missing_programs();
        assert_eq!(missing.len(), 1, "{missing:?}");
        assert_eq!(missing[0].key, "services.x.command");
    }

    #[test]
    fn command_template_is_filled_in() {
        let file = "[connectors.comfyui]\ncommand = [\"fake-comfy\", \"--port={port}\", \"--gpu\", \"{gpu}\", \"{workspace}\"]\n";
        let c = crate::config::load_str(
            Some(("f", file)),
            &BTreeMap::from([
                ("MACHINE_ID", "m"),
                ("WORKER_CONNECTORS", "comfyui"),
                ("HUB_REDIS_URL", "redis://h"),
            ]),
        )
        .unwrap();
        let p = Plan::build(&c, &probe(2)).unwrap();
        assert_eq!(
            p.services[1].command,
            ["fake-comfy", "--port=8189", "--gpu", "1", "/workspace"]
        );
        assert!(p.installers.is_empty(), "an overridden command installs nothing");
    }

    #[test]
    fn service_graph_is_checked() {
        let file = r#"
[services.a]
command = ["x"]
after = ["b"]
[services.b]
command = ["x"]
after = ["a"]
[services.c]
command = ["x"]
after = ["nope"]
[services.comfyui-gpu0]
command = ["x"]
"#;
        let c =
            crate::config::load_str(Some(("f", file)), &BTreeMap::from([("WORKER_CONNECTORS", "comfyui")])).unwrap();
        let problems = Plan::build(&c, &probe(1)).unwrap_err();
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["services.comfyui-gpu0", "services.c.after"], "{problems:?}");
        let file =
            "[services.a]\ncommand = [\"x\"]\nafter = [\"b\"]\n[services.b]\ncommand = [\"x\"]\nafter = [\"a\"]\n";
        let c = crate::config::load_str(Some(("f", file)), &BTreeMap::<&str, &str>::new()).unwrap();
        let problems = Plan::build(&c, &probe(1)).unwrap_err();
        assert!(problems[0].message.contains("cycle among: a, b"), "{problems:?}");
    }

    #[test]
    fn start_order_respects_after() {
        let file =
            "[services.a]\ncommand = [\"x\"]\nafter = [\"b\", \"comfyui-gpu0\"]\n[services.b]\ncommand = [\"x\"]\n";
        let c =
            crate::config::load_str(Some(("f", file)), &BTreeMap::from([("WORKER_CONNECTORS", "comfyui")])).unwrap();
        let p = Plan::build(&c, &probe(1)).unwrap();
        let order: Vec<&str> = p.start_order().iter().map(|s| s.name.as_str()).collect();
        assert_eq!(order, ["redis", "comfyui-gpu0", "b", "a"], "local mode: redis first");
    }

    #[test]
    fn port_clashes_are_reported() {
        let c = crate::config::load_str(
            Some(("f", "[connectors.a1111]\nbase_port = 8189\n")),
            &BTreeMap::from([("WORKER_CONNECTORS", "comfyui,a1111")]),
        )
        .unwrap();
        let problems = Plan::build(&c, &probe(2)).unwrap_err();
        assert_eq!(
            problems[0].message,
            "port 8189 of `comfyui-gpu1` is also used by a1111-gpu0"
        );
    }

    fn local_plan(connectors: &str, file: &str) -> Plan {
        let env = BTreeMap::from([
            ("MACHINE_ID", "m1"),
            ("MACHINE_WORKSPACE", "/ws"),
            ("WORKER_CONNECTORS", connectors),
            ("OPENAI_API_KEY", "sk-test"),
        ]);
        let c = crate::config::load_str(Some(("f", file)), &env).unwrap();
        Plan::build(&c, &probe(1)).unwrap()
    }

    #[test]
    fn diff_of_equal_plans_is_empty() {
        let a = local_plan("simulation:1,comfyui", "");
        let d = PlanDiff::between(&a, &a.clone(), &BTreeSet::new());
        assert!(d.is_empty(), "{d:?}");
        assert_eq!(d.workers.kept, ["m1-gpu0", "m1-simulation-1"]);
        assert_eq!(d.services.kept, ["redis", "comfyui-gpu0"]);
        assert_eq!(
            d.to_string(),
            "no change\nunchanged: 2 worker(s), 2 service(s) keep running\n"
        );
    }

    #[test]
    fn diff_adds_workers_and_keeps_the_rest() {
        let old = local_plan("simulation:1,comfyui", "");
        let new = local_plan("simulation:2,comfyui,openai:1", "");
        let d = PlanDiff::between(&old, &new, &BTreeSet::new());
        assert_eq!(d.workers.added, ["m1-simulation-2", "m1-openai-1"]);
        assert_eq!(d.workers.kept, ["m1-gpu0", "m1-simulation-1"]);
        assert!(d.workers.removed.is_empty() && d.workers.changed.is_empty());
        assert!(d.services.is_empty(), "{d:?}");
        assert!(d.services_to_start(&new).is_empty());
        let started: Vec<&str> = d.workers_to_start(&new).iter().map(|w| w.id.as_str()).collect();
        assert_eq!(started, ["m1-simulation-2", "m1-openai-1"]);
    }

    #[test]
    fn diff_removes_workers_and_their_services() {
        let old = local_plan("simulation:2,comfyui,openai:1", "");
        let new = local_plan("openai:1", "");
        let d = PlanDiff::between(&old, &new, &BTreeSet::new());
        assert_eq!(d.workers.removed, ["m1-gpu0", "m1-simulation-1", "m1-simulation-2"]);
        assert_eq!(d.workers.kept, ["m1-openai-1"]);
        assert_eq!(d.services.removed, ["comfyui-gpu0"]);
        assert_eq!(d.services.kept, ["redis"], "the private redis-server is never touched");
        assert_eq!(d.workers_to_stop(), ["m1-gpu0", "m1-simulation-1", "m1-simulation-2"]);
        assert!(d.to_string().contains("- service comfyui-gpu0 removed\n"), "{d}");
    }

    #[test]
    fn a_changed_service_changes_the_workers_that_wait_for_it() {
        let old = local_plan("simulation:1,comfyui", "");
        let new = local_plan(
            "simulation:1,comfyui",
            "[connectors.comfyui]\nextra_args = [\"--lowvram\"]\n",
        );
        let d = PlanDiff::between(&old, &new, &BTreeSet::new());
        assert_eq!(d.services.changed, ["comfyui-gpu0"]);
        assert_eq!(d.workers.changed, ["m1-gpu0"], "it drains before its service restarts");
        assert_eq!(d.workers.kept, ["m1-simulation-1"]);
        assert!(
            d.to_string().contains("~ service comfyui-gpu0 changed (restarted)\n"),
            "{d}"
        );
    }

    #[test]
    fn touched_connector_settings_change_their_workers_only() {
        let p = local_plan("simulation:2,openai:1", "");
        let d = PlanDiff::between(&p, &p, &BTreeSet::from([ConnectorKind::Simulation]));
        assert_eq!(d.workers.changed, ["m1-simulation-1", "m1-simulation-2"]);
        assert_eq!(d.workers.kept, ["m1-openai-1"]);
    }

    #[test]
    fn services_stop_in_reverse_dependency_order_and_start_in_order() {
        let file = "[services.a]\ncommand = [\"x\"]\nafter = [\"b\"]\n[services.b]\ncommand = [\"x\"]\n";
        let old = local_plan("simulation", file);
        let new = local_plan("simulation", "");
        let d = PlanDiff::between(&old, &new, &BTreeSet::new());
        let stop: Vec<&str> = d.services_to_stop(&old).iter().map(|s| s.name.as_str()).collect();
        assert_eq!(stop, ["a", "b"]);
        let back = PlanDiff::between(&new, &old, &BTreeSet::new());
        let start: Vec<&str> = back.services_to_start(&old).iter().map(|s| s.name.as_str()).collect();
        assert_eq!(start, ["b", "a"]);
    }

    #[test]
    fn a_plan_survives_json() {
        let p = local_plan("simulation:1,comfyui,openai", "");
        let back: Plan = serde_json::from_value(serde_json::to_value(&p).unwrap()).unwrap();
        assert!(PlanDiff::between(&p, &back, &BTreeSet::new()).is_empty());
    }
}

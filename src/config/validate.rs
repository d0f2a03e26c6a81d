//! Validation: the typed document (`super::raw`) and what only the environment sets
//! (`super::overlay::EnvOnly`) checked section by section into a [`Config`]. Every check runs
//! whatever the others found, so every problem is reported at once; each is reported at its key
//! path, which [`Problems`] turns into the variable's name when the environment set the value.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use super::apis;
use super::connectors::{ConnectorKind, ConnectorList};
use super::credentials::Credentials;
use super::env::Env;
use super::error::Problems;
use super::model::{
    Config, GpuOverrides, HealthAccess, InstallConfig, LogConfig, MachineConfig, ModelsConfig, PlanConfig, RedisUrl,
    SentinelTarget, ServiceConnectorConfig, SupervisorConfig, Warmup,
};
use super::overlay::EnvOnly;
use super::raw::{RawConfig, RawConnectors, RawInstall, RawMachine, RawRedis, RawServiceConnector};
use super::service::RawService;
use super::{service, worker};

/// The most GPUs `MACHINE_GPU_COUNT` may name (each one plans a worker and its services).
pub const MAX_GPUS: u32 = 64;

pub(super) fn validate(
    raw: RawConfig,
    env_only: EnvOnly,
    env: &dyn Env,
    credentials: Credentials,
    problems: &mut Problems,
) -> Config {
    let (machine_id, workspace) = machine(&raw.machine, env, problems);
    let redis = redis(raw.redis, problems);
    let connectors = ConnectorList::parse(&raw.machine.worker_connectors).unwrap_or_else(|ps| {
        for p in ps {
            problems.at("machine.worker_connectors", p);
        }
        ConnectorList::default_list()
    });
    if raw.health.port == 0 {
        problems.at("health.port", "must be a port number (1-65535)");
    }
    gpu(&raw.gpu, problems);
    log(&raw.log, problems);
    supervisor(&raw.supervisor, problems);
    let c = raw.connectors;
    let (comfyui, a1111, playwright) = service_connectors(&c, problems);
    let install_timeout = raw.install.timeout;
    if install_timeout.is_zero() {
        problems.at("install.timeout", "must be more than 0");
    }
    let install = install(raw.install, &workspace, problems);
    let services = services(&raw.services, raw.supervisor.grace, problems);
    let list = problems.list_mut();
    let worker = worker::validate_worker(raw.worker, &workspace, list);
    let openai = worker::validate_openai(c.openai, list);
    let replicate = apis::validate_replicate(c.replicate, list);
    let runpod = apis::validate_runpod(c.runpod, list);
    api_keys_set(
        &connectors,
        [
            (ConnectorKind::Openai, &openai.api_key_env),
            (ConnectorKind::Replicate, &replicate.api_key_env),
            (ConnectorKind::Runpod, &runpod.api_key_env),
        ],
        &credentials,
        problems,
    );
    let simulation = worker::validate_simulation(c.simulation, problems.list_mut());
    let models = models(raw.models, problems);
    Config {
        machine: MachineConfig {
            machine_id,
            workspace,
            redis,
            health_port: raw.health.port,
            gpu: raw.gpu,
            visible_devices: env_only.visible_devices,
            install_timeout,
            log: raw.log,
            supervisor: raw.supervisor,
            control_token: env_only.control_token,
            health_access: HealthAccess {
                read_token: env_only.read_token,
                open_logs: raw.health.open_logs,
                guard_status: raw.health.guard_status,
                guard_metrics: raw.health.guard_metrics,
                metrics_customers: raw.health.metrics_customers,
            },
            worker,
        },
        plan: PlanConfig {
            connectors,
            install,
            comfyui,
            a1111,
            playwright,
            services,
            openai,
            replicate,
            runpod,
            simulation,
            models,
            credentials,
        },
        warnings: Vec::new(),
    }
}

/// `[services.*]`: the user's services, each validated with the supervisor's grace as default.
fn services(
    raw: &BTreeMap<String, RawService>,
    grace: std::time::Duration,
    problems: &mut Problems,
) -> Vec<service::ServiceSpec> {
    let mut found = Vec::new();
    let services = raw
        .iter()
        .filter_map(|(name, svc)| service::validate_service(name, svc, grace, &mut found))
        .collect();
    for (key, message) in found {
        problems.at(&key, message);
    }
    services
}

/// External connectors need their credentials: a missing key is found now, not at the first
/// job, and the problem names the variable to set.
fn api_keys_set(
    connectors: &ConnectorList,
    keys: [(ConnectorKind, &String); 3],
    credentials: &Credentials,
    problems: &mut Problems,
) {
    for (kind, key_env) in keys {
        if connectors.get(kind).is_some()
            && !key_env.is_empty()
            && credentials.get(key_env).is_none_or(|v| v.trim().is_empty())
        {
            problems.other(
                key_env,
                format!("the {kind} connector is listed in WORKER_CONNECTORS but its API key variable is not set"),
            );
        }
    }
}

/// `[machine]`: the id (from the hostname when unset) and the workspace.
fn machine(m: &RawMachine, env: &dyn Env, problems: &mut Problems) -> (String, PathBuf) {
    let machine_id =
        m.id.clone()
            .unwrap_or_else(|| machine_id_from_hostname(env.hostname().as_deref()));
    if !valid_machine_id(&machine_id) {
        problems.at(
            "machine.id",
            format!("`{machine_id}` is not a valid machine id (1-63 characters of a-z, A-Z, 0-9, `-`, `_`, `.`)"),
        );
    }
    if !m.workspace.is_absolute() {
        problems.at(
            "machine.workspace",
            format!("`{}` is not an absolute path", m.workspace.display()),
        );
    }
    (machine_id, m.workspace.clone())
}

fn gpu(gpu: &GpuOverrides, problems: &mut Problems) {
    if gpu.count.is_some_and(|n| n > MAX_GPUS) {
        problems.at(
            "gpu.count",
            format!("is more than the most GPUs a machine has ({MAX_GPUS})"),
        );
    }
    if gpu.memory_gb.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
        problems.at("gpu.memory_gb", "must be a positive number");
    }
    if gpu.health_poll < std::time::Duration::from_millis(50) {
        problems.at("gpu.health_poll", "must be at least 50ms");
    }
}

fn log(log: &LogConfig, problems: &mut Problems) {
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&log.filter) {
        problems.at("log.filter", format!("`{}` is not a valid log filter: {e}", log.filter));
    }
}

fn supervisor(s: &SupervisorConfig, problems: &mut Problems) {
    if !(0.0..=1.0).contains(&s.backoff_jitter) {
        problems.at("supervisor.backoff_jitter", "must be between 0 and 1");
    }
    if s.backoff_initial.is_zero() || s.backoff_max < s.backoff_initial {
        problems.at(
            "supervisor.backoff_max",
            "needs backoff_initial > 0 and backoff_max >= backoff_initial",
        );
    }
    if s.crash_loop_failures == 0 {
        problems.at("supervisor.crash_loop_failures", "must be at least 1");
    }
    if s.log_max_bytes < 1024 {
        problems.at("supervisor.log_max_bytes", "must be at least 1024");
    }
    if s.log_max_line_bytes < 80 {
        problems.at("supervisor.log_max_line_bytes", "must be at least 80");
    }
}

/// The connectors that run one service per GPU: `[connectors.comfyui]`, `[connectors.a1111]`
/// and `[connectors.playwright]`.
fn service_connectors(
    c: &RawConnectors,
    problems: &mut Problems,
) -> (ServiceConnectorConfig, ServiceConnectorConfig, ServiceConnectorConfig) {
    let playwright = ServiceConnectorConfig {
        base_port: c.playwright.base_port,
        extra_args: Vec::new(),
        command: c.playwright.command.clone(),
        stall_timeout: c.playwright.stall_timeout,
        restart_above_rss: c.playwright.restart_above_rss,
        restart_above_idle_vram: c.playwright.restart_above_idle_vram,
        restart_every_jobs: c.playwright.restart_every_jobs,
        warmup: None,
        idle_wait: c.playwright.idle_wait,
    };
    let comfyui_warmup = c.comfyui.warmup.as_deref().and_then(|path| match workflow(path) {
        Ok(workflow) => Some(Warmup::Workflow {
            path: PathBuf::from(path),
            workflow,
        }),
        Err(e) => {
            problems.at("connectors.comfyui.warmup", e);
            None
        }
    });
    let comfyui = service_connector(&c.comfyui, comfyui_warmup);
    let a1111 = service_connector(&c.a1111, c.a1111.warmup.clone().map(Warmup::Prompt));
    for (name, cc) in [("comfyui", &comfyui), ("a1111", &a1111), ("playwright", &playwright)] {
        if cc.base_port == 0 {
            problems.at(&format!("connectors.{name}.base_port"), "must be a port number");
        }
        if cc.restart_every_jobs == Some(0) {
            problems.at(&format!("connectors.{name}.restart_every_jobs"), "must be at least 1");
        }
        if cc.stall_timeout.is_zero() {
            problems.at(&format!("connectors.{name}.stall_timeout"), "must be longer than 0s");
        }
        if cc
            .command
            .as_ref()
            .is_some_and(|c| c.first().is_none_or(|a| a.is_empty()))
        {
            problems.at(&format!("connectors.{name}.command"), "the command is empty");
        }
    }
    (comfyui, a1111, playwright)
}

/// The checked settings of `[connectors.comfyui]` or `[connectors.a1111]`, with their warm-up.
fn service_connector(raw: &RawServiceConnector, warmup: Option<Warmup>) -> ServiceConnectorConfig {
    ServiceConnectorConfig {
        base_port: raw.base_port,
        extra_args: raw.extra_args.clone(),
        command: raw.command.clone(),
        stall_timeout: raw.stall_timeout,
        restart_above_rss: raw.restart_above_rss,
        restart_above_idle_vram: raw.restart_above_idle_vram,
        restart_every_jobs: raw.restart_every_jobs,
        warmup,
        idle_wait: raw.idle_wait,
    }
}

/// A ComfyUI warm-up workflow (API format, a JSON object) read from the file at `path`; the
/// problem names the file.
fn workflow(path: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("failed to read {path}: {e}"))?;
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(serde_json::Value::Object(workflow)) => Ok(workflow),
        Ok(_) => Err(format!("{path}: not a workflow (a JSON object)")),
        Err(e) => Err(format!("failed to read {path}: {e}")),
    }
}

/// `[install]`; the models directory defaults to `<workspace>/models`.
fn install(i: RawInstall, workspace: &Path, problems: &mut Problems) -> InstallConfig {
    let mut comfyui = i.comfyui;
    comfyui.torch_index_url = comfyui.torch_index_url.filter(|u| !u.trim().is_empty());
    let set_models_dir = !comfyui.models_dir.as_os_str().is_empty();
    if !set_models_dir {
        comfyui.models_dir = workspace.join("models");
    }
    let install = InstallConfig {
        concurrency: i.concurrency,
        strict: i.strict,
        comfyui,
        playwright: i.playwright,
    };
    if install.concurrency == 0 {
        problems.at("install.concurrency", "must be at least 1");
    }
    let comfyui = &install.comfyui;
    if comfyui.repo_url.trim().is_empty() {
        problems.at("install.comfyui.repo_url", "is empty");
    }
    // A ref starting with `-` would be read by git as an option.
    if comfyui.git_ref.trim().is_empty() || comfyui.git_ref.starts_with('-') {
        problems.at("install.comfyui.ref", format!("`{}` is not a git ref", comfyui.git_ref));
    }
    // A specifier starting with `-` would be read by pip as an option.
    for p in comfyui.extra_packages.iter().filter(|p| p.starts_with('-')) {
        problems.at(
            "install.comfyui.extra_packages",
            format!("`{p}` is not a package (pip options are not allowed here)"),
        );
    }
    // Unset, it lies under the workspace, whose own problem already says what to fix.
    if set_models_dir && !comfyui.models_dir.is_absolute() {
        problems.at(
            "install.comfyui.models_dir",
            format!("`{}` is not an absolute path", comfyui.models_dir.display()),
        );
    }
    let playwright = &install.playwright;
    for (key, v) in [
        ("install.playwright.playwright_core", &playwright.playwright_core),
        ("install.playwright.p5", &playwright.p5),
    ] {
        if v.is_empty()
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
        {
            problems.at(key, format!("`{v}` is not an npm version"));
        }
    }
    install
}

/// Checks `[models]`.
fn models(m: ModelsConfig, problems: &mut Problems) -> ModelsConfig {
    if !(m.cache_max_gb.is_finite() && m.cache_max_gb >= 0.0) {
        problems.at(
            "models.cache_max_gb",
            format!("`{}` is not a size in GB (0 = no limit)", m.cache_max_gb),
        );
    }
    if m.loader_inputs.iter().any(|i| i.trim().is_empty()) {
        problems.at("models.loader_inputs", "an input name is empty");
    }
    m
}

/// Checks `[redis]`: the URL, and the Sentinel settings, which come both or neither. With
/// Sentinels the URL is optional and its host and port are not used (the master's address is
/// the Sentinels' answer): it gives the scheme (`rediss://` for TLS), user, password and
/// database, and without it the master is reached with `redis://`, no password, database 0.
fn redis(r: RawRedis, problems: &mut Problems) -> Option<RedisUrl> {
    let url = r
        .url
        .filter(|u| !u.trim().is_empty())
        .and_then(|u| RedisUrl::parse(&u).map_err(|m| problems.at("redis.url", m)).ok());
    let master = r.sentinel_master.map(|m| m.trim().to_owned()).filter(|m| !m.is_empty());
    match (r.sentinels.is_empty(), master) {
        (true, None) => url,
        (true, Some(_)) => {
            problems.at(
                "redis.sentinels",
                "is empty while redis.sentinel_master is set: give both or neither",
            );
            None
        }
        (false, None) => {
            problems.at(
                "redis.sentinel_master",
                "is not set while redis.sentinels is: give both or neither (the master's name as the Sentinels know it)",
            );
            None
        }
        (false, Some(master)) => {
            let mut nodes = Vec::new();
            for node in &r.sentinels {
                match sentinel_node(node) {
                    Ok(n) => nodes.push(n),
                    Err(m) => problems.at("redis.sentinels", m),
                }
            }
            if nodes.len() != r.sentinels.len() {
                return None;
            }
            if let Some(u) = url
                .as_ref()
                .filter(|u| u.expose().starts_with("unix:") || u.expose().starts_with("redis+unix:"))
            {
                problems.at(
                    "redis.url",
                    format!(
                        "`{}` is a Unix socket; with Sentinels it must be redis:// or rediss://",
                        u.masked()
                    ),
                );
                return None;
            }
            let url = url.unwrap_or_else(|| RedisUrl::plain("redis://sentinel-master".to_owned()));
            Some(url.with_sentinels(SentinelTarget { nodes, master }))
        }
    }
}

/// One Sentinel's `host:port`.
fn sentinel_node(node: &str) -> Result<(String, u16), String> {
    let bad = || format!("`{node}` is not host:port (a Sentinel's address, e.g. `10.0.0.5:26379`)");
    let (host, port) = node.trim().rsplit_once(':').ok_or_else(bad)?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port: u16 = port.parse().map_err(|_| bad())?;
    if host.is_empty() || port == 0 || host.contains(['/', '@', ' ']) {
        return Err(bad());
    }
    Ok((host.to_owned(), port))
}

fn valid_machine_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 63
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Derives a machine id from the hostname: the same hostname always gives the same id, so a
/// restarted container keeps its identity (and its jobs' leases) in the fleet.
fn machine_id_from_hostname(hostname: Option<&str>) -> String {
    let cleaned: String = hostname
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' })
        .collect();
    let cleaned = cleaned.trim_matches('-');
    if cleaned.is_empty() {
        return "machine".to_owned();
    }
    let short: String = cleaned.chars().take(55).collect();
    format!("machine-{}", short.trim_end_matches('-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_id_is_stable_and_clean() {
        assert_eq!(machine_id_from_hostname(Some("GPU_Box.local")), "machine-gpu-box-local");
        assert_eq!(
            machine_id_from_hostname(Some("a1b2c3")),
            machine_id_from_hostname(Some("a1b2c3"))
        );
        assert_eq!(machine_id_from_hostname(None), "machine");
        assert!(valid_machine_id(&machine_id_from_hostname(Some(&"x".repeat(300)))));
    }

    #[test]
    fn self_healing_keys_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("warmup.json");
        std::fs::write(&good, r#"{"9": {"class_type": "SaveImage", "inputs": {}}}"#).unwrap();
        let bad = dir.path().join("list.json");
        std::fs::write(&bad, "[1]").unwrap();
        let load =
            |toml: String| super::super::load::load_str(Some(("m.toml", &toml)), &BTreeMap::<String, String>::new());
        let c = load(format!(
            "[connectors.comfyui]\nwarmup = \"{}\"\nstall_timeout = \"30s\"\nrestart_every_jobs = 2\n",
            good.display()
        ))
        .unwrap();
        assert_eq!(c.plan.comfyui.stall_timeout, std::time::Duration::from_secs(30));
        assert_eq!(c.plan.comfyui.restart_every_jobs, Some(2));
        let e = load(format!(
            "[connectors.comfyui]\nwarmup = \"{}\"\nrestart_every_jobs = 0\n[connectors.a1111]\nstall_timeout = \"0s\"\n",
            bad.display()
        ))
        .unwrap_err();
        let keys: Vec<&str> = e.problems().iter().map(|p| p.key.as_str()).collect();
        for key in [
            "connectors.comfyui.warmup",
            "connectors.comfyui.restart_every_jobs",
            "connectors.a1111.stall_timeout",
        ] {
            assert!(keys.contains(&key), "{key} missing from {keys:?}");
        }
        let missing = dir.path().join("gone.json");
        let e = load(format!("[connectors.comfyui]\nwarmup = \"{}\"\n", missing.display())).unwrap_err();
        let problem = e.problems().iter().find(|p| p.key == "connectors.comfyui.warmup");
        assert!(
            problem.is_some_and(|p| p.message.contains(&missing.display().to_string())),
            "an unreadable warm-up file is a problem naming it: {:?}",
            e.problems()
        );
    }
}

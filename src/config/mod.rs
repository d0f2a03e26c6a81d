//! Configuration: the embedded default TOML, the user's file merged over it, environment
//! variables over both, validated into one [`Config`] before anything runs.
//!
//! [`load`] has no side effects beyond reading the file. It reports every problem at once, each
//! naming the TOML key or environment variable it is about, so an operator fixes a bad
//! deployment in one round.

mod connectors;
mod env;
mod raw;
mod service;
mod worker;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;

pub use connectors::{
    Budget, ConnectorKind, ConnectorList, ConnectorRequest, Limits, Prices, Rate, ReplicateConfig, RunpodConfig,
    parse_model_ref, valid_endpoint_id,
};
pub use env::{Env, ProcessEnv};
pub use service::{ProbeCheck, ProbeSpec, RestartPolicy, ServiceSpec};
pub use worker::{CustomerAccess, OpenaiConfig, SimulationConfig, WorkerConfig};

use raw::RawConfig;

/// The most GPUs `MACHINE_GPU_COUNT` may name (each one plans a worker and its services).
pub const MAX_GPUS: u32 = 64;

/// The built-in configuration, also the reference for every key.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// The validated configuration of this machine.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// This machine's id in the fleet.
    pub machine_id: String,
    /// Where installs, models, logs and state live.
    pub workspace: PathBuf,
    /// The hub's Redis; `None` means local mode (a private redis-server).
    pub redis: Option<RedisUrl>,
    /// Port of the health/status HTTP server.
    pub health_port: u16,
    /// The parsed `WORKER_CONNECTORS`.
    #[serde(serialize_with = "serialize_display")]
    pub connectors: ConnectorList,
    /// GPU facts to use when NVML cannot tell (or to use fewer GPUs).
    pub gpu: GpuOverrides,
    /// `CUDA_VISIBLE_DEVICES` as the machine respects it.
    pub visible_devices: VisibleDevices,
    /// Limit for each installer.
    #[serde(with = "humantime_serde")]
    pub install_timeout: Duration,
    /// What the installers install and how.
    pub install: InstallConfig,
    /// Logging output.
    pub log: LogConfig,
    /// Supervisor knobs.
    pub supervisor: SupervisorConfig,
    /// Per-connector settings for the plan's services.
    pub comfyui: ServiceConnectorConfig,
    /// Per-connector settings for the plan's services.
    pub a1111: ServiceConnectorConfig,
    /// Per-connector settings for the plan's services.
    pub playwright: ServiceConnectorConfig,
    /// User-defined `[services.NAME]`, sorted by name.
    pub services: Vec<ServiceSpec>,
    /// `MACHINE_CONTROL_TOKEN`: the bearer token of the health server's control routes; without
    /// one those routes are refused.
    pub control_token: Option<Secret>,
    /// Who may read the health server's `/logs`, `/status` and `/metrics`.
    pub health_access: HealthAccess,
    /// How workers claim, hold and report jobs.
    pub worker: WorkerConfig,
    /// The OpenAI-compatible API of the `openai` connector.
    pub openai: OpenaiConfig,
    /// Replicate, for the `replicate` connector.
    pub replicate: ReplicateConfig,
    /// RunPod serverless endpoints, for the `runpod` connector.
    pub runpod: RunpodConfig,
    /// The simulation connector's defaults.
    pub simulation: SimulationConfig,
    /// Things that are not wrong enough to refuse, such as unknown `MACHINE_*` variables; the
    /// caller logs them once logging is set up.
    #[serde(skip)]
    pub warnings: Vec<Problem>,
    /// Models on demand (`[models]`).
    pub models: ModelsConfig,
}

/// Models fetched on demand for ComfyUI jobs (`[models]`).
#[derive(Debug, Clone, Serialize)]
pub struct ModelsConfig {
    /// The models catalogue (`COMFYUI_MODELS_CATALOGUE`); `None`: nothing is fetched.
    pub catalogue: Option<PathBuf>,
    /// Budget of the shared models directory in bytes; `None`: no limit.
    pub cache_max_bytes: Option<u64>,
    /// How long a job requiring models waits for a worker that has them before one that must
    /// download them may take it.
    #[serde(with = "humantime_serde")]
    pub affinity_wait: Duration,
    /// Workflow inputs that name model files.
    pub loader_inputs: Vec<String>,
}

impl Config {
    /// The Redis the machine talks to: the hub's, or in local mode the private redis-server
    /// the machine supervises on a Unix socket under the workspace.
    pub fn broker_url(&self) -> RedisUrl {
        self.redis
            .clone()
            .unwrap_or_else(|| RedisUrl(format!("unix://{}", self.local_redis_socket().display())))
    }

    /// The Unix socket of the local-mode redis-server.
    pub fn local_redis_socket(&self) -> PathBuf {
        self.workspace.join("run/redis.sock")
    }

    /// The data directory of the local-mode redis-server.
    pub fn local_redis_dir(&self) -> PathBuf {
        self.workspace.join("redis")
    }
}

/// A secret taken from the environment: usable, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret's value, for the one place that needs it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

/// A validated Redis URL (`redis://`, `rediss://`, `redis+unix://` or `unix://`).
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Validates a URL given outside the configuration (e.g. `--redis-url`).
    pub fn parse(u: &str) -> Result<RedisUrl, String> {
        validate_redis_url(u)
    }

    /// The URL with its credentials, for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`, for logs and status pages.
    pub fn masked(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                u.to_string()
            }
            _ => self.0.clone(),
        }
    }
}

impl fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RedisUrl({})", self.masked())
    }
}

impl Serialize for RedisUrl {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.masked())
    }
}

/// GPU facts given by configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct GpuOverrides {
    /// `MACHINE_GPU_COUNT`: the number of GPUs to use.
    pub count: Option<u32>,
    /// `MACHINE_GPU_MEMORY_GB`: memory per GPU when NVML cannot tell.
    pub memory_gb: Option<f64>,
    /// `MACHINE_GPU_MODEL`: model name when NVML cannot tell.
    pub model: Option<String>,
}

/// `CUDA_VISIBLE_DEVICES` as CUDA reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "mode", content = "devices")]
pub enum VisibleDevices {
    /// Unset: every GPU.
    All,
    /// Empty (or `-1`): no GPU.
    None,
    /// Only these GPUs, by index or UUID, in this order.
    List(Vec<DeviceSelector>),
}

/// One entry of `CUDA_VISIBLE_DEVICES`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceSelector {
    /// A GPU index as NVML numbers them (PCI bus order).
    Index(u32),
    /// A GPU UUID (`GPU-...`) or UUID prefix.
    Uuid(String),
}

/// Who may read what on the health server (`[health]`). `/health` and `/ready` are always open.
#[derive(Debug, Clone, Serialize)]
pub struct HealthAccess {
    /// `MACHINE_READ_TOKEN`: a bearer token that reads the guarded routes but controls nothing
    /// (the control token reads them too).
    pub read_token: Option<Secret>,
    /// Whether `/logs` is open to anyone (it can show prompts and customer data).
    pub open_logs: bool,
    /// Whether `/status` needs a token.
    pub guard_status: bool,
    /// Whether `/metrics` needs a token.
    pub guard_metrics: bool,
}

/// Logging output.
#[derive(Debug, Clone, Serialize)]
pub struct LogConfig {
    /// Human-readable or JSON lines.
    pub format: LogFormat,
    /// A tracing `EnvFilter` directive (`RUST_LOG`).
    pub filter: String,
}

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Supervisor knobs shared by every service.
#[derive(Debug, Clone, Serialize)]
pub struct SupervisorConfig {
    /// Default SIGTERM → SIGKILL delay.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// First restart delay.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Restart delay cap.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Fraction by which each delay varies (0..=1).
    pub backoff_jitter: f64,
    /// Uptime after which the backoff resets.
    #[serde(with = "humantime_serde")]
    pub stable_after: Duration,
    /// Failures within `crash_loop_window` that mean crash loop.
    pub crash_loop_failures: u32,
    /// The crash-loop window.
    #[serde(with = "humantime_serde")]
    pub crash_loop_window: Duration,
    /// Size at which a service log file rotates.
    pub log_max_bytes: u64,
    /// Rotated log files kept per service.
    pub log_files: u32,
    /// Lines kept in memory per service.
    pub log_tail_lines: usize,
    /// Longest line kept; the rest of a longer line is dropped.
    pub log_max_line_bytes: usize,
}

/// Settings of a connector that runs one service per GPU.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceConnectorConfig {
    /// GPU i listens on `base_port + i`.
    pub base_port: u16,
    /// Arguments appended to the default command.
    pub extra_args: Vec<String>,
    /// A full command replacing the default; `{port}`, `{gpu}` and `{workspace}` are filled in.
    pub command: Option<Vec<String>>,
}

/// What the installers install and how (`[install]`).
#[derive(Debug, Clone, Serialize)]
pub struct InstallConfig {
    /// Custom nodes and model downloads run at once (at least 1).
    pub concurrency: usize,
    /// Whether a failed custom node or model fails the whole install.
    pub strict: bool,
    /// The ComfyUI source and its extras.
    pub comfyui: ComfyuiInstallConfig,
    /// The Playwright render service.
    pub playwright: PlaywrightInstallConfig,
}

/// Where ComfyUI, its custom nodes and its models come from.
#[derive(Debug, Clone, Serialize)]
pub struct ComfyuiInstallConfig {
    /// Git URL (or local path) of the ComfyUI repository.
    pub repo_url: String,
    /// Tag, commit or branch to check out.
    pub git_ref: String,
    /// The interpreter that creates the venv.
    pub python: String,
    /// `pip --extra-index-url` for torch wheels.
    pub torch_index_url: Option<String>,
    /// The custom-node catalogue; `None` means the built-in one.
    pub nodes_file: Option<PathBuf>,
    /// The model manifest; `None` means no models.
    pub models_manifest: Option<PathBuf>,
    /// The shared models directory linked into ComfyUI.
    pub models_dir: PathBuf,
    /// Packages pip installs into the venv beside `requirements.txt`: what the pinned ref
    /// imports without listing it (upstream imports `requests` unlisted).
    pub extra_packages: Vec<String>,
    /// A pip constraints file (`pip -c`) for every pip install in ComfyUI's venv.
    pub constraints: Option<PathBuf>,
    /// Arguments to the venv's python, run in the checkout after every install; a failure fails
    /// the install with its traceback. Empty: no smoke test.
    pub smoke_test: Vec<String>,
}

/// The Playwright render service's install.
#[derive(Debug, Clone, Serialize)]
pub struct PlaywrightInstallConfig {
    /// The browser executable; `None` means auto-detect.
    pub chromium: Option<PathBuf>,
    /// npm version of `playwright-core`.
    pub playwright_core: String,
    /// npm version of `p5`.
    pub p5: String,
}

/// One configuration problem: the key or variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// A TOML key path (`services.sidecar.command`) or an environment variable name.
    pub key: String,
    /// What is wrong, as a sentence fragment.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// One or more problems, all listed.
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The problems, when the configuration was read but is invalid.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
            ConfigError::Read { .. } => &[],
        }
    }
}

/// Reads `file` (if any) over the embedded defaults, overlays `env`, and validates.
pub fn load(file: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
    let user = match file {
        Some(path) => Some((
            path.display().to_string(),
            std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
        )),
        None => None,
    };
    load_str(user.as_ref().map(|(p, s)| (p.as_str(), s.as_str())), env)
}

/// What is not wrong enough to refuse the configuration: `MACHINE_*`, `WORKER_*`, `COMFYUI_*`
/// and `HUB_*` variables the machine does not read, each naming the closest one it does. Also
/// in [`Config::warnings`]; this is for callers that have no `Config` because it was invalid.
pub fn warnings(env: &dyn Env) -> Vec<Problem> {
    env::unknown_variables(env)
        .into_iter()
        .map(|(key, message)| Problem { key, message })
        .collect()
}

/// Like [`load`] with the file's name and contents already in hand.
pub fn load_str(file: Option<(&str, &str)>, env: &dyn Env) -> Result<Config, ConfigError> {
    let (raw, mut problems) = parse_merged(file);
    // Environment problems are reported even when the file is broken, so one run shows both.
    let overlay = EnvOverlay::read(env, &mut problems);
    let Some(raw) = raw else {
        return Err(ConfigError::Invalid(problems));
    };
    let mut config = validate(raw, overlay, env, &mut problems);
    config.warnings = warnings(env);
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// The most problems one file reports; past it the file is not worth reading further.
const MAX_FILE_PROBLEMS: usize = 50;

/// The merged document, and every problem of the file. The document is `None` when the file
/// is not TOML or could not be set right; otherwise it has the default in place of each bad
/// value, so that validation can go on to find the problems beyond the file's.
fn parse_merged(file: Option<(&str, &str)>) -> (Option<RawConfig>, Vec<Problem>) {
    let defaults: toml::Table = DEFAULT_TOML
        .parse()
        .expect("the embedded default configuration is valid TOML (a unit test checks it)");
    let mut merged = defaults.clone();
    if let Some((name, text)) = file {
        match text.parse::<toml::Table>() {
            Ok(user) => merge(&mut merged, user),
            Err(e) => {
                let problem = Problem {
                    key: name.to_owned(),
                    message: format!("not valid TOML: {}", e.to_string().trim_end()),
                };
                return (None, vec![problem]);
            }
        }
    }
    // Deserialisation stops at the first problem. To list them all, each one found is set
    // right (the default put back, or the key removed) and the document is read again.
    let mut problems = Vec::new();
    loop {
        match serde_path_to_error::deserialize::<_, RawConfig>(toml::Value::Table(merged.clone())) {
            Ok(raw) => return (Some(raw), problems),
            Err(e) => {
                let segments: Vec<String> = e
                    .path()
                    .iter()
                    .map(|s| match s {
                        serde_path_to_error::Segment::Map { key } => key.clone(),
                        other => other.to_string(),
                    })
                    .collect();
                // toml repeats the path on a line of its own; the problem's key already says it.
                let message = e
                    .inner()
                    .to_string()
                    .lines()
                    .next()
                    .unwrap_or_default()
                    .trim_end()
                    .to_owned();
                let repaired = repair(&mut merged, &defaults, &segments, &message);
                problems.push(Problem {
                    key: e.path().to_string(),
                    message,
                });
                if !repaired || problems.len() >= MAX_FILE_PROBLEMS {
                    return (None, problems);
                }
            }
        }
    }
}

/// Sets right the key at `path` that failed with `message`: an unknown key is removed; a bad
/// value gets the default's value back, or is removed when the defaults have none. Returns
/// whether anything changed (if not, reading again would fail the same way).
fn repair(doc: &mut toml::Table, defaults: &toml::Table, path: &[String], message: &str) -> bool {
    let unknown = message
        .strip_prefix("unknown field `")
        .and_then(|m| m.split_once('`'))
        .map(|(name, _)| name.to_owned());
    let mut full = path.to_vec();
    if let Some(name) = unknown {
        if full.last() != Some(&name) {
            full.push(name);
        }
        return remove_at(doc, &full);
    }
    let Some((last, parents)) = full.split_last() else {
        return false;
    };
    let default = lookup(defaults, &full).cloned();
    let Some(table) = table_at(doc, parents) else {
        return false;
    };
    match default {
        Some(d) if table.get(last) != Some(&d) => {
            table.insert(last.clone(), d);
            true
        }
        _ => table.remove(last).is_some(),
    }
}

fn table_at<'a>(doc: &'a mut toml::Table, path: &[String]) -> Option<&'a mut toml::Table> {
    let mut t = doc;
    for k in path {
        t = t.get_mut(k)?.as_table_mut()?;
    }
    Some(t)
}

fn lookup<'a>(doc: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut t = doc;
    for k in parents {
        t = t.get(k)?.as_table()?;
    }
    t.get(last)
}

fn remove_at(doc: &mut toml::Table, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    table_at(doc, parents).is_some_and(|t| t.remove(last).is_some())
}

fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// Values taken from the environment, already parsed; a variable that failed to parse is
/// reported and left out.
#[derive(Debug, Default)]
struct EnvOverlay {
    machine_id: Option<String>,
    redis_url: Option<String>,
    connectors: Option<(String, String)>,
    health_port: Option<u16>,
    workspace: Option<PathBuf>,
    gpu_count: Option<u32>,
    gpu_memory_gb: Option<f64>,
    gpu_model: Option<String>,
    visible_devices: Option<VisibleDevices>,
    install_timeout: Option<Duration>,
    log_format: Option<String>,
    log_filter: Option<String>,
    comfyui_base_port: Option<u16>,
    control_token: Option<Secret>,
    read_token: Option<Secret>,
    install_concurrency: Option<usize>,
    install_strict: Option<bool>,
    comfyui_repo_url: Option<String>,
    comfyui_ref: Option<String>,
    comfyui_python: Option<String>,
    comfyui_torch_index_url: Option<String>,
    comfyui_nodes_file: Option<PathBuf>,
    comfyui_models_manifest: Option<PathBuf>,
    comfyui_models_dir: Option<PathBuf>,
    comfyui_extra_packages: Option<Vec<String>>,
    comfyui_constraints: Option<PathBuf>,
    models_catalogue: Option<PathBuf>,
    playwright_chromium: Option<PathBuf>,
}

impl EnvOverlay {
    fn read(env: &dyn Env, problems: &mut Vec<Problem>) -> Self {
        let mut bad = |key: &str, message: String| {
            problems.push(Problem {
                key: key.to_owned(),
                message,
            })
        };
        let set = |key: &str| env.var(key).filter(|v| !v.trim().is_empty());
        let mut o = EnvOverlay {
            machine_id: set("MACHINE_ID").map(|v| v.trim().to_owned()),
            redis_url: set("HUB_REDIS_URL").map(|v| v.trim().to_owned()),
            workspace: set("MACHINE_WORKSPACE").map(PathBuf::from),
            gpu_model: set("MACHINE_GPU_MODEL").map(|v| v.trim().to_owned()),
            log_format: set("LOG_FORMAT"),
            log_filter: set("RUST_LOG"),
            control_token: set("MACHINE_CONTROL_TOKEN").map(|t| Secret(t.trim().to_owned())),
            read_token: set("MACHINE_READ_TOKEN").map(|t| Secret(t.trim().to_owned())),
            comfyui_repo_url: set("COMFYUI_REPO_URL").map(|v| v.trim().to_owned()),
            comfyui_ref: set("COMFYUI_REF").map(|v| v.trim().to_owned()),
            comfyui_python: set("COMFYUI_PYTHON").map(|v| v.trim().to_owned()),
            comfyui_torch_index_url: set("COMFYUI_TORCH_INDEX_URL").map(|v| v.trim().to_owned()),
            comfyui_nodes_file: set("COMFYUI_NODES_FILE").map(PathBuf::from),
            comfyui_models_manifest: set("COMFYUI_MODELS_MANIFEST").map(PathBuf::from),
            comfyui_models_dir: set("COMFYUI_MODELS_DIR").map(PathBuf::from),
            // Comma- or space-separated pip requirement specifiers; `none` installs none.
            comfyui_extra_packages: set("COMFYUI_EXTRA_PACKAGES").map(|v| {
                v.split([',', ' ', '\n'])
                    .map(str::trim)
                    .filter(|p| !p.is_empty() && *p != "none")
                    .map(str::to_owned)
                    .collect()
            }),
            comfyui_constraints: set("COMFYUI_CONSTRAINTS").map(PathBuf::from),
            models_catalogue: set("COMFYUI_MODELS_CATALOGUE").map(PathBuf::from),
            playwright_chromium: set("PLAYWRIGHT_CHROMIUM_PATH").map(PathBuf::from),
            ..EnvOverlay::default()
        };
        if let Some(v) = set("INSTALL_CONCURRENCY") {
            match v.trim().parse::<usize>() {
                Ok(n) if n > 0 => o.install_concurrency = Some(n),
                _ => bad("INSTALL_CONCURRENCY", format!("`{v}` is not a positive whole number")),
            }
        }
        if let Some(v) = set("INSTALL_STRICT") {
            match v.trim().to_ascii_lowercase().as_str() {
                "1" | "true" | "yes" | "on" => o.install_strict = Some(true),
                "0" | "false" | "no" | "off" => o.install_strict = Some(false),
                _ => bad("INSTALL_STRICT", format!("`{v}` is not true or false")),
            }
        }
        o.connectors = match (env.var("WORKER_CONNECTORS"), env.var("WORKERS")) {
            (Some(a), Some(b)) if a.trim() != b.trim() => {
                bad(
                    "WORKER_CONNECTORS",
                    format!("is `{a}` but its alias WORKERS is `{b}`; set only one"),
                );
                None
            }
            (Some(a), _) => Some(("WORKER_CONNECTORS".to_owned(), a)),
            (None, Some(b)) => Some(("WORKERS".to_owned(), b)),
            (None, None) => None,
        };
        if let Some(v) = set("MACHINE_HEALTH_PORT") {
            match v.trim().parse::<u16>() {
                Ok(p) if p > 0 => o.health_port = Some(p),
                _ => bad("MACHINE_HEALTH_PORT", format!("`{v}` is not a port number (1-65535)")),
            }
        }
        if let Some(v) = set("COMFYUI_BASE_PORT") {
            match v.trim().parse::<u16>() {
                Ok(p) if p > 0 => o.comfyui_base_port = Some(p),
                _ => bad("COMFYUI_BASE_PORT", format!("`{v}` is not a port number (1-65535)")),
            }
        }
        if let Some(v) = set("MACHINE_GPU_COUNT") {
            match v.trim().parse::<u32>() {
                Ok(n) => o.gpu_count = Some(n),
                Err(_) => bad("MACHINE_GPU_COUNT", format!("`{v}` is not a whole number")),
            }
        }
        if let Some(v) = set("MACHINE_GPU_MEMORY_GB") {
            match v.trim().parse::<f64>() {
                Ok(n) if n.is_finite() && n > 0.0 => o.gpu_memory_gb = Some(n),
                _ => bad("MACHINE_GPU_MEMORY_GB", format!("`{v}` is not a positive number")),
            }
        }
        if let Some(v) = set("SERVICE_INSTALL_TIMEOUT") {
            match parse_seconds_or_duration(&v) {
                Some(d) if !d.is_zero() => o.install_timeout = Some(d),
                _ => bad(
                    "SERVICE_INSTALL_TIMEOUT",
                    format!("`{v}` is not a number of seconds or a duration like `5m`"),
                ),
            }
        }
        if let Some(v) = env.var("CUDA_VISIBLE_DEVICES") {
            match parse_visible_devices(&v) {
                Ok(d) => o.visible_devices = Some(d),
                Err(m) => bad("CUDA_VISIBLE_DEVICES", m),
            }
        }
        o
    }
}

fn parse_seconds_or_duration(v: &str) -> Option<Duration> {
    let v = v.trim();
    match v.parse::<u64>() {
        Ok(secs) => Some(Duration::from_secs(secs)),
        Err(_) => humantime::parse_duration(v).ok(),
    }
}

/// Parses `CUDA_VISIBLE_DEVICES`: comma-separated indices or `GPU-`/`MIG-` UUIDs; empty or a
/// negative index hides every GPU, as CUDA does.
fn parse_visible_devices(v: &str) -> Result<VisibleDevices, String> {
    let v = v.trim();
    if v.is_empty() || v == "NoDevFiles" {
        return Ok(VisibleDevices::None);
    }
    let mut list = Vec::new();
    for entry in v.split(',').map(str::trim) {
        if entry.starts_with('-') && entry[1..].parse::<u32>().is_ok() {
            // CUDA stops at the first negative index; what came before it stays visible.
            break;
        }
        if let Ok(i) = entry.parse::<u32>() {
            list.push(DeviceSelector::Index(i));
        } else if entry.starts_with("GPU-") || entry.starts_with("MIG-") {
            list.push(DeviceSelector::Uuid(entry.to_owned()));
        } else {
            return Err(format!("entry `{entry}` is neither a GPU index nor a GPU-/MIG- UUID"));
        }
    }
    if list.is_empty() {
        return Ok(VisibleDevices::None);
    }
    Ok(VisibleDevices::List(list))
}

fn validate(raw: RawConfig, o: EnvOverlay, env: &dyn Env, problems: &mut Vec<Problem>) -> Config {
    let mut bad = |key: &str, message: String| {
        problems.push(Problem {
            key: key.to_owned(),
            message,
        })
    };

    let (id_key, machine_id) = match (o.machine_id, raw.machine.id) {
        (Some(id), _) => ("MACHINE_ID", id),
        (None, Some(id)) => ("machine.id", id),
        (None, None) => ("MACHINE_ID", machine_id_from_hostname(env.hostname().as_deref())),
    };
    if !valid_machine_id(&machine_id) {
        bad(
            id_key,
            format!("`{machine_id}` is not a valid machine id (1-63 characters of a-z, A-Z, 0-9, `-`, `_`, `.`)"),
        );
    }

    let workspace = o.workspace.unwrap_or(raw.machine.workspace);
    if !workspace.is_absolute() {
        bad(
            "MACHINE_WORKSPACE",
            format!("`{}` is not an absolute path", workspace.display()),
        );
    }

    let redis = match (o.redis_url, raw.redis.url) {
        (Some(u), _) => Some(("HUB_REDIS_URL", u)),
        (None, Some(u)) if !u.trim().is_empty() => Some(("redis.url", u)),
        _ => None,
    }
    .and_then(|(key, u)| match validate_redis_url(&u) {
        Ok(url) => Some(url),
        Err(m) => {
            bad(key, m);
            None
        }
    });

    let (conn_key, conn_text) = o
        .connectors
        .unwrap_or_else(|| ("machine.worker_connectors".to_owned(), raw.machine.worker_connectors));
    let connectors = ConnectorList::parse(&conn_text).unwrap_or_else(|ps| {
        for p in ps {
            bad(&conn_key, p);
        }
        ConnectorList::default_list()
    });

    let health_port = o.health_port.unwrap_or(raw.health.port);
    if health_port == 0 {
        bad("health.port", "must be a port number (1-65535)".to_owned());
    }

    let gpu = GpuOverrides {
        count: o.gpu_count.or(raw.gpu.count),
        memory_gb: o.gpu_memory_gb.or(raw.gpu.memory_gb),
        model: o.gpu_model.or(raw.gpu.model),
    };
    if gpu.count.is_some_and(|n| n > MAX_GPUS) {
        bad(
            "MACHINE_GPU_COUNT",
            format!("is more than the most GPUs a machine has ({MAX_GPUS})"),
        );
    }
    if gpu.memory_gb.is_some_and(|m| !(m.is_finite() && m > 0.0)) {
        bad("gpu.memory_gb", "must be a positive number".to_owned());
    }

    let log_format = o.log_format.unwrap_or(raw.log.format);
    let format = match log_format.trim().to_ascii_lowercase().as_str() {
        "text" => LogFormat::Text,
        "json" => LogFormat::Json,
        _ => {
            bad("LOG_FORMAT", format!("`{log_format}` is not `text` or `json`"));
            LogFormat::Text
        }
    };
    let filter = o.log_filter.unwrap_or(raw.log.filter);
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&filter) {
        bad("RUST_LOG", format!("`{filter}` is not a valid log filter: {e}"));
    }

    let s = raw.supervisor;
    let supervisor = SupervisorConfig {
        grace: s.grace,
        backoff_initial: s.backoff_initial,
        backoff_max: s.backoff_max,
        backoff_jitter: s.backoff_jitter,
        stable_after: s.stable_after,
        crash_loop_failures: s.crash_loop_failures,
        crash_loop_window: s.crash_loop_window,
        log_max_bytes: s.log_max_bytes,
        log_files: s.log_files,
        log_tail_lines: s.log_tail_lines,
        log_max_line_bytes: s.log_max_line_bytes,
    };
    if !(0.0..=1.0).contains(&supervisor.backoff_jitter) {
        bad("supervisor.backoff_jitter", "must be between 0 and 1".to_owned());
    }
    if supervisor.backoff_initial.is_zero() || supervisor.backoff_max < supervisor.backoff_initial {
        bad(
            "supervisor.backoff_max",
            "needs backoff_initial > 0 and backoff_max >= backoff_initial".to_owned(),
        );
    }
    if supervisor.crash_loop_failures == 0 {
        bad("supervisor.crash_loop_failures", "must be at least 1".to_owned());
    }
    if supervisor.log_max_bytes < 1024 {
        bad("supervisor.log_max_bytes", "must be at least 1024".to_owned());
    }
    if supervisor.log_max_line_bytes < 80 {
        bad("supervisor.log_max_line_bytes", "must be at least 80".to_owned());
    }

    let c = raw.connectors;
    let comfyui = ServiceConnectorConfig {
        base_port: o.comfyui_base_port.unwrap_or(c.comfyui.base_port),
        extra_args: c.comfyui.extra_args,
        command: c.comfyui.command,
    };
    let a1111 = ServiceConnectorConfig {
        base_port: c.a1111.base_port,
        extra_args: c.a1111.extra_args,
        command: c.a1111.command,
    };
    let playwright = ServiceConnectorConfig {
        base_port: c.playwright.base_port,
        extra_args: Vec::new(),
        command: c.playwright.command,
    };
    for (name, cc) in [("comfyui", &comfyui), ("a1111", &a1111), ("playwright", &playwright)] {
        if cc.base_port == 0 {
            bad(
                &format!("connectors.{name}.base_port"),
                "must be a port number".to_owned(),
            );
        }
        if cc
            .command
            .as_ref()
            .is_some_and(|c| c.first().is_none_or(|a| a.is_empty()))
        {
            bad(&format!("connectors.{name}.command"), "the command is empty".to_owned());
        }
    }

    let i = raw.install;
    let install = InstallConfig {
        concurrency: o.install_concurrency.unwrap_or(i.concurrency),
        strict: o.install_strict.unwrap_or(i.strict),
        comfyui: ComfyuiInstallConfig {
            repo_url: o.comfyui_repo_url.unwrap_or(i.comfyui.repo_url),
            git_ref: o.comfyui_ref.unwrap_or(i.comfyui.git_ref),
            python: o.comfyui_python.unwrap_or(i.comfyui.python),
            torch_index_url: o
                .comfyui_torch_index_url
                .or(i.comfyui.torch_index_url)
                .filter(|u| !u.trim().is_empty()),
            nodes_file: o.comfyui_nodes_file.or(i.comfyui.nodes),
            models_manifest: o.comfyui_models_manifest.or(i.comfyui.models),
            models_dir: o
                .comfyui_models_dir
                .or(i.comfyui.models_dir)
                .unwrap_or_else(|| workspace.join("models")),
            extra_packages: o.comfyui_extra_packages.unwrap_or(i.comfyui.extra_packages),
            constraints: o.comfyui_constraints.or(i.comfyui.constraints),
            smoke_test: i.comfyui.smoke_test,
        },
        playwright: PlaywrightInstallConfig {
            chromium: o.playwright_chromium.or(i.playwright.chromium),
            playwright_core: i.playwright.playwright_core,
            p5: i.playwright.p5,
        },
    };
    if install.concurrency == 0 {
        bad("install.concurrency", "must be at least 1".to_owned());
    }
    if install.comfyui.repo_url.trim().is_empty() {
        bad("COMFYUI_REPO_URL", "is empty".to_owned());
    }
    // A ref starting with `-` would be read by git as an option.
    if install.comfyui.git_ref.trim().is_empty() || install.comfyui.git_ref.starts_with('-') {
        bad("COMFYUI_REF", format!("`{}` is not a git ref", install.comfyui.git_ref));
    }
    // A specifier starting with `-` would be read by pip as an option.
    for p in install.comfyui.extra_packages.iter().filter(|p| p.starts_with('-')) {
        bad(
            "COMFYUI_EXTRA_PACKAGES",
            format!("`{p}` is not a package (pip options are not allowed here)"),
        );
    }
    if !install.comfyui.models_dir.is_absolute() {
        bad(
            "COMFYUI_MODELS_DIR",
            format!("`{}` is not an absolute path", install.comfyui.models_dir.display()),
        );
    }
    for (key, v) in [
        (
            "install.playwright.playwright_core",
            &install.playwright.playwright_core,
        ),
        ("install.playwright.p5", &install.playwright.p5),
    ] {
        if v.is_empty()
            || !v
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'+'))
        {
            bad(key, format!("`{v}` is not an npm version"));
        }
    }

    let mut raw_problems = Vec::new();
    let services = raw
        .services
        .iter()
        .filter_map(|(name, svc)| service::validate_service(name, svc, supervisor.grace, &mut raw_problems))
        .collect();
    for (key, message) in raw_problems {
        bad(&key, message);
    }
    let worker = worker::validate_worker(raw.worker, &workspace, problems);
    let openai = worker::validate_openai(c.openai, problems);
    let replicate = connectors::validate_replicate(c.replicate, problems);
    let runpod = connectors::validate_runpod(c.runpod, problems);
    // External connectors need their credentials; a missing key is found now, not at the first
    // job, and the problem names the variable to set.
    for (kind, key_env) in [
        (ConnectorKind::Openai, &openai.api_key_env),
        (ConnectorKind::Replicate, &replicate.api_key_env),
        (ConnectorKind::Runpod, &runpod.api_key_env),
    ] {
        if connectors.get(kind).is_some() && !key_env.is_empty() && env.var(key_env).is_none_or(|v| v.trim().is_empty())
        {
            problems.push(Problem {
                key: key_env.clone(),
                message: format!(
                    "the {kind} connector is listed in WORKER_CONNECTORS but its API key variable is not set"
                ),
            });
        }
    }
    let simulation = worker::validate_simulation(c.simulation, problems);

    let m = raw.models;
    if !(m.cache_max_gb.is_finite() && m.cache_max_gb >= 0.0) {
        problems.push(Problem {
            key: "models.cache_max_gb".to_owned(),
            message: format!("`{}` is not a size in GB (0 = no limit)", m.cache_max_gb),
        });
    }
    if m.loader_inputs.iter().any(|i| i.trim().is_empty()) {
        problems.push(Problem {
            key: "models.loader_inputs".to_owned(),
            message: "an input name is empty".to_owned(),
        });
    }
    let models = ModelsConfig {
        catalogue: o.models_catalogue.or(m.catalogue),
        cache_max_bytes: (m.cache_max_gb > 0.0).then_some((m.cache_max_gb * 1e9) as u64),
        affinity_wait: m.affinity_wait,
        loader_inputs: m.loader_inputs,
    };
    Config {
        machine_id,
        workspace,
        redis,
        health_port,
        connectors,
        gpu,
        visible_devices: o.visible_devices.unwrap_or(VisibleDevices::All),
        install_timeout: o.install_timeout.unwrap_or(i.timeout),
        install,
        log: LogConfig { format, filter },
        supervisor,
        comfyui,
        a1111,
        playwright,
        services,
        control_token: o.control_token,
        health_access: HealthAccess {
            read_token: o.read_token,
            open_logs: raw.health.open_logs,
            guard_status: raw.health.guard_status,
            guard_metrics: raw.health.guard_metrics,
        },
        worker,
        openai,
        replicate,
        runpod,
        simulation,
        warnings: Vec::new(),
        models,
    }
}

fn validate_redis_url(u: &str) -> Result<RedisUrl, String> {
    let parsed = url::Url::parse(u).map_err(|e| format!("`{}` is not a URL: {e}", mask_text(u)))?;
    if !matches!(parsed.scheme(), "redis" | "rediss" | "unix" | "redis+unix") {
        return Err(format!(
            "scheme `{}` is not redis://, rediss://, unix:// or redis+unix://",
            parsed.scheme()
        ));
    }
    redis::IntoConnectionInfo::into_connection_info(u)
        .map_err(|e| format!("`{}` is not a usable Redis URL: {e}", mask_text(u)))?;
    Ok(RedisUrl(u.to_owned()))
}

/// Masks what looks like a password in a URL that may not even parse.
fn mask_text(u: &str) -> String {
    match (u.find("://"), u.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &u[..s], &u[at + 1..]),
        _ => u.to_owned(),
    }
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

fn serialize_display<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

impl Config {
    /// A configuration from the defaults alone with the given environment, for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(env: &[(&str, &str)]) -> Config {
        let map: std::collections::BTreeMap<String, String> =
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        load_str(None, &map).expect("test configuration is valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn problems(file: Option<&str>, pairs: &[(&str, &str)]) -> Vec<Problem> {
        load_str(file.map(|f| ("machine.toml", f)), &env(pairs))
            .expect_err("configuration should be invalid")
            .problems()
            .to_vec()
    }

    #[test]
    fn defaults_alone_are_valid() {
        let c = load_str(None, &env(&[("HOSTNAME", "box-7")])).unwrap();
        assert_eq!(c.machine_id, "machine-box-7");
        assert_eq!(c.health_port, 9092);
        assert_eq!(c.workspace, PathBuf::from("/workspace"));
        assert!(c.redis.is_none());
        assert_eq!(c.connectors, ConnectorList::default_list());
        assert_eq!(c.comfyui.base_port, 8188);
        assert_eq!(c.visible_devices, VisibleDevices::All);
        assert_eq!(c.install_timeout, Duration::from_secs(1800));
    }

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
    fn the_issue_example_parses() {
        let file = r#"
[machine]
id = "m1"
[redis]
url = "redis://127.0.0.1:6379"
[health]
port = 9092
[services.sidecar]
command = ["/usr/bin/env", "sleep", "1000"]
restart = "always"
ready = { tcp = "127.0.0.1:7000" }
"#;
        let c = load_str(Some(("f.toml", file)), &env(&[])).unwrap();
        assert_eq!(c.machine_id, "m1");
        assert_eq!(c.redis.unwrap().expose(), "redis://127.0.0.1:6379");
        let s = &c.services[0];
        assert_eq!(s.name, "sidecar");
        assert_eq!(s.restart, RestartPolicy::Always);
        assert_eq!(
            s.ready.as_ref().unwrap().check,
            ProbeCheck::Tcp("127.0.0.1:7000".into())
        );
        assert_eq!(s.grace, Duration::from_secs(10));
    }

    #[test]
    fn environment_overrides_the_file() {
        let file = "[machine]\nid = \"from-file\"\nworker_connectors = \"comfyui\"\n[health]\nport = 1234\n";
        let c = load_str(
            Some(("f.toml", file)),
            &env(&[
                ("MACHINE_ID", "from-env"),
                ("WORKERS", "openai:2"),
                ("OPENAI_API_KEY", "sk-test"),
                ("MACHINE_HEALTH_PORT", "9999"),
                ("SERVICE_INSTALL_TIMEOUT", "300"),
                ("LOG_FORMAT", "JSON"),
                ("HUB_REDIS_URL", "rediss://user:secret@redis.example:6380/0"),
                ("MACHINE_CONTROL_TOKEN", "tok3n"),
            ]),
        )
        .unwrap();
        assert_eq!(c.machine_id, "from-env");
        assert_eq!(c.connectors.to_string(), "openai:2");
        assert_eq!(c.health_port, 9999);
        assert_eq!(c.install_timeout, Duration::from_secs(300));
        assert_eq!(c.log.format, LogFormat::Json);
        let url = c.redis.unwrap();
        assert_eq!(url.masked(), "rediss://user:***@redis.example:6380/0");
        assert!(!format!("{url:?}").contains("secret"));
        let token = c.control_token.unwrap();
        assert_eq!(token.expose(), "tok3n");
        assert!(!format!("{token:?}").contains("tok3n"));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let ps = problems(
            None,
            &[
                ("WORKER_CONNECTORS", "comfyui:x,bogus"),
                ("MACHINE_HEALTH_PORT", "http"),
                ("HUB_REDIS_URL", "http://nope"),
                ("MACHINE_GPU_COUNT", "two"),
                ("LOG_FORMAT", "xml"),
                ("CUDA_VISIBLE_DEVICES", "0,banana"),
            ],
        );
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "MACHINE_HEALTH_PORT",
                "MACHINE_GPU_COUNT",
                "CUDA_VISIBLE_DEVICES",
                "HUB_REDIS_URL",
                "WORKER_CONNECTORS",
                "WORKER_CONNECTORS",
                "LOG_FORMAT"
            ],
            "{ps:#?}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_name_the_path() {
        let ps = problems(
            Some("[services.x]\ncommand = [\"a\"]\nrestrat = \"always\"\nrestrt = 1\n"),
            &[],
        );
        assert_eq!(ps.len(), 2, "{ps:?}");
        assert!(ps[0].key.starts_with("services.x"), "{ps:?}");
        assert!(ps[0].message.contains("restrat"), "{ps:?}");
        let ps = problems(Some("[health]\nport = \"high\"\n"), &[("MACHINE_GPU_COUNT", "x")]);
        assert_eq!(
            ps.len(),
            2,
            "file and environment problems are reported together: {ps:?}"
        );
        assert_eq!(ps[0].key, "health.port");
        let ps = problems(Some("[machine\n"), &[]);
        assert!(ps[0].message.contains("not valid TOML"));
    }

    #[test]
    fn every_problem_of_the_file_is_listed() {
        let file = r#"
[machine]
workspace = 7
bogus = 1
[health]
port = "high"
[supervisor]
grace = 5
extra = true
[services.x]
command = ["a"]
restrat = "always"
"#;
        let ps = problems(Some(file), &[("MACHINE_GPU_COUNT", "x")]);
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(ps.len(), 7, "{ps:#?}");
        for key in ["machine", "health.port", "supervisor.grace", "MACHINE_GPU_COUNT"] {
            assert!(
                keys.contains(&key) || keys.iter().any(|k| k.starts_with(key)),
                "{key} in {ps:#?}"
            );
        }
        for word in ["bogus", "extra", "restrat"] {
            assert!(
                ps.iter().any(|p| p.message.contains(word) || p.key.contains(word)),
                "{word} in {ps:#?}"
            );
        }
    }

    #[test]
    fn unknown_machine_variables_warn_with_the_closest_name() {
        let c = load_str(
            None,
            &env(&[
                ("WORKER_CONNECTOR", "simulation"),
                ("HUB_REDIS_ULR", "x"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("HUB_REDIS_ULR") && w[0].contains("`HUB_REDIS_URL`"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("WORKER_CONNECTOR:") && w[1].contains("`WORKER_CONNECTORS`"),
            "{w:?}"
        );
        let ps = problems(
            None,
            &[
                ("WORKER_CONNECTORS", "simulation:100000"),
                ("MACHINE_GPU_COUNT", "1000"),
            ],
        );
        assert_eq!(ps.len(), 2, "{ps:#?}");
    }

    #[test]
    fn service_problems_are_all_listed() {
        let file = r#"
[services.a]
command = []
ready = { tcp = "nohost", http = "http://x" }
[services.b]
command = ["x"]
liveness = { tcp = "localhost:0" }
after = ["b"]
env = { "A=B" = "1" }
"#;
        let ps = problems(Some(file), &[]);
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "services.a.command",
                "services.a.ready",
                "services.b.env",
                "services.b.after",
                "services.b.liveness.tcp"
            ],
            "{ps:#?}"
        );
    }

    #[test]
    fn aliases_must_agree() {
        let ps = problems(None, &[("WORKER_CONNECTORS", "comfyui"), ("WORKERS", "openai")]);
        assert_eq!(ps[0].key, "WORKER_CONNECTORS");
        let c = load_str(
            None,
            &env(&[("WORKER_CONNECTORS", "comfyui"), ("WORKERS", " comfyui ")]),
        )
        .unwrap();
        assert_eq!(c.connectors.to_string(), "comfyui");
    }

    #[test]
    fn cuda_visible_devices_follows_cuda() {
        assert_eq!(parse_visible_devices("").unwrap(), VisibleDevices::None);
        assert_eq!(parse_visible_devices("-1").unwrap(), VisibleDevices::None);
        assert_eq!(
            parse_visible_devices("1, 0,-1,2").unwrap(),
            VisibleDevices::List(vec![DeviceSelector::Index(1), DeviceSelector::Index(0)])
        );
        assert_eq!(
            parse_visible_devices("GPU-abc").unwrap(),
            VisibleDevices::List(vec![DeviceSelector::Uuid("GPU-abc".into())])
        );
        assert!(parse_visible_devices("zero").is_err());
    }

    #[test]
    fn external_connectors_need_their_keys() {
        let ps = problems(None, &[("WORKER_CONNECTORS", "comfyui,openai")]);
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert_eq!(ps[0].key, "OPENAI_API_KEY");
        let file = "[connectors.openai]\napi_key_env = \"MY_KEY\"\n";
        let ps = problems(Some(file), &[("WORKER_CONNECTORS", "openai"), ("OPENAI_API_KEY", "x")]);
        assert_eq!(ps[0].key, "MY_KEY");
        assert!(
            load_str(
                Some(("f", file)),
                &env(&[("WORKER_CONNECTORS", "openai"), ("MY_KEY", "x")])
            )
            .is_ok()
        );
    }

    #[test]
    fn install_settings_come_from_file_and_environment() {
        let c = load_str(
            None,
            &env(&[
                ("MACHINE_WORKSPACE", "/ws"),
                ("COMFYUI_REPO_URL", "/srv/comfy.git"),
                ("COMFYUI_REF", "abc123"),
                ("INSTALL_STRICT", "true"),
                ("INSTALL_CONCURRENCY", "2"),
                ("PLAYWRIGHT_CHROMIUM_PATH", "/opt/chrome"),
            ]),
        )
        .unwrap();
        assert_eq!(c.install.comfyui.repo_url, "/srv/comfy.git");
        assert_eq!(c.install.comfyui.git_ref, "abc123");
        assert_eq!(c.install.comfyui.models_dir, PathBuf::from("/ws/models"));
        assert!(c.install.strict);
        assert_eq!(c.install.concurrency, 2);
        assert_eq!(c.install.playwright.chromium, Some(PathBuf::from("/opt/chrome")));
        let ps = problems(None, &[("COMFYUI_REF", "--upload-pack=x"), ("INSTALL_STRICT", "maybe")]);
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["INSTALL_STRICT", "COMFYUI_REF"]);
    }

    #[test]
    fn install_timeout_accepts_seconds_and_durations() {
        assert_eq!(parse_seconds_or_duration("300"), Some(Duration::from_secs(300)));
        assert_eq!(parse_seconds_or_duration("5m"), Some(Duration::from_secs(300)));
        assert_eq!(parse_seconds_or_duration("soon"), None);
    }
}

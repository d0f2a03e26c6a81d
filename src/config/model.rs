//! The validated configuration: [`Config`] and one type per section. Sections that need no
//! conversion (`[gpu]`, `[log]`, `[supervisor]`, `[connectors.comfyui]`, `[connectors.a1111]`,
//! `[install.playwright]`) are also what the TOML deserializes into, so there is no raw twin to
//! copy field by field; `super::validate` only checks them.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::Problem;
use super::apis::{ReplicateConfig, RunpodConfig};
use super::connectors::ConnectorList;
use super::credentials::Credentials;
use super::service::ServiceSpec;
use super::worker::{OpenaiConfig, SimulationConfig, WorkerConfig};

/// The validated configuration of this machine, split by what applies it: [`MachineConfig`]
/// only a restart applies, [`PlanConfig`] (the credentials included) is what the plan and its
/// workers are built from and a reload applies. Both serialise flat, as the file's sections
/// read; the credentials never do.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Config {
    /// What only a restart applies: the machine as a whole.
    #[serde(flatten)]
    pub machine: MachineConfig,
    /// What the plan is built from: connectors, services, installs and the connectors'
    /// settings. A reload applies it.
    #[serde(flatten)]
    pub plan: PlanConfig,
    /// Things that are not wrong enough to refuse, such as unknown `MACHINE_*` variables; the
    /// caller logs them once logging is set up.
    #[serde(skip)]
    pub warnings: Vec<Problem>,
}

/// The settings that belong to the machine as a whole; a reload keeps them as they run and
/// reports a change as applying at the next restart (`worker.lease` alone applies in place).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MachineConfig {
    /// This machine's id in the fleet.
    pub machine_id: String,
    /// Where installs, models, logs and state live.
    pub workspace: PathBuf,
    /// The hub's Redis; `None` means local mode (a private redis-server).
    pub redis: Option<RedisUrl>,
    /// Port of the health/status HTTP server.
    pub health_port: u16,
    /// GPU facts to use when NVML cannot tell (or to use fewer GPUs).
    pub gpu: GpuOverrides,
    /// `CUDA_VISIBLE_DEVICES` as the machine respects it.
    pub visible_devices: VisibleDevices,
    /// Limit for each installer.
    #[serde(with = "humantime_serde")]
    pub install_timeout: Duration,
    /// Logging output.
    pub log: LogConfig,
    /// Supervisor knobs.
    pub supervisor: SupervisorConfig,
    /// `MACHINE_CONTROL_TOKEN`: the bearer token of the health server's control routes; without
    /// one those routes are refused.
    pub control_token: Option<Secret>,
    /// Who may read the health server's `/logs`, `/status` and `/metrics`.
    pub health_access: HealthAccess,
    /// How workers claim, hold and report jobs.
    pub worker: WorkerConfig,
}

/// What the plan is built from: which connectors run, the user's services, what the installers
/// install, and each connector's settings. A reload applies a change to any of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanConfig {
    /// The parsed `WORKER_CONNECTORS`.
    #[serde(serialize_with = "serialize_display")]
    pub connectors: ConnectorList,
    /// What the installers install and how.
    pub install: InstallConfig,
    /// Per-connector settings for the plan's services.
    pub comfyui: ServiceConnectorConfig,
    /// Per-connector settings for the plan's services.
    pub a1111: ServiceConnectorConfig,
    /// Per-connector settings for the plan's services.
    pub playwright: ServiceConnectorConfig,
    /// User-defined `[services.NAME]`, sorted by name.
    pub services: Vec<ServiceSpec>,
    /// The OpenAI-compatible API of the `openai` connector.
    pub openai: OpenaiConfig,
    /// Replicate, for the `replicate` connector.
    pub replicate: ReplicateConfig,
    /// RunPod serverless endpoints, for the `runpod` connector.
    pub runpod: RunpodConfig,
    /// The simulation connector's defaults.
    pub simulation: SimulationConfig,
    /// Models on demand (`[models]`).
    pub models: ModelsConfig,
    /// The secrets the workers authenticate with (store keys, API keys, the catalogue's token),
    /// each from its variable or its `<NAME>_FILE`; never serialised. A reload reads them again
    /// and applies them: store keys in place, an API key by rebuilding its connector's workers
    /// (the health server's tokens are [`MachineConfig`]'s, read from here at start).
    #[serde(skip)]
    pub credentials: Credentials,
}

/// Models fetched on demand for ComfyUI jobs (`[models]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ModelsConfig {
    /// The models catalogue (`COMFYUI_MODELS_CATALOGUE`); `None`: nothing is fetched.
    pub catalogue: Option<PathBuf>,
    /// Budget of the shared models directory in GB (10^9 bytes); 0: no limit. See
    /// [`ModelsConfig::cache_max_bytes`].
    pub cache_max_gb: f64,
    /// How long a job requiring models waits for a worker that has them before one that must
    /// download them may take it.
    #[serde(with = "humantime_serde")]
    pub affinity_wait: Duration,
    /// Workflow inputs that name model files.
    pub loader_inputs: Vec<String>,
}

impl ModelsConfig {
    /// The budget of the shared models directory in bytes; `None`: no limit.
    pub fn cache_max_bytes(&self) -> Option<u64> {
        // A float-to-integer `as` saturates; the checks refused what is not a size.
        (self.cache_max_gb > 0.0).then_some((self.cache_max_gb * 1e9) as u64)
    }
}

impl MachineConfig {
    /// The Redis the machine talks to: the hub's, or in local mode the private redis-server
    /// the machine supervises on a Unix socket under the workspace.
    pub fn broker_url(&self) -> RedisUrl {
        self.redis
            .clone()
            .unwrap_or_else(|| RedisUrl::plain(format!("unix://{}", self.local_redis_socket().display())))
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
pub struct Secret(pub(super) String);

impl Secret {
    /// A secret read from where the configuration names it (an API key the credentials hold).
    pub fn new(value: String) -> Secret {
        Secret(value)
    }

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

/// A validated Redis URL (`redis://`, `rediss://`, `redis+unix://` or `unix://`), and the
/// Sentinels that say where its master is when the Redis is replicated.
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl {
    url: String,
    sentinel: Option<SentinelTarget>,
}

/// `HUB_REDIS_SENTINELS` and `HUB_REDIS_SENTINEL_MASTER`: the master is whatever node these
/// Sentinels name for `master`, and the URL then gives only the scheme, user, password and
/// database (its host and port are not used).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SentinelTarget {
    /// Each Sentinel's host and port.
    pub nodes: Vec<(String, u16)>,
    /// The master's name as the Sentinels know it (`sentinel monitor <name> ...`).
    pub master: String,
}

impl RedisUrl {
    /// A URL the validation accepted (or the local-mode socket the machine makes itself).
    pub(super) fn plain(url: String) -> RedisUrl {
        RedisUrl { url, sentinel: None }
    }

    /// This URL's credentials, database and TLS, its master found through `target`.
    pub fn with_sentinels(mut self, target: SentinelTarget) -> RedisUrl {
        self.sentinel = Some(target);
        self
    }

    /// The Sentinels that name the master, when there are any.
    pub fn sentinels(&self) -> Option<&SentinelTarget> {
        self.sentinel.as_ref()
    }

    /// Validates a URL given outside the configuration (e.g. `--redis-url`).
    pub fn parse(u: &str) -> Result<RedisUrl, String> {
        redis_url(u)
    }

    /// The URL with its credentials, for connecting.
    pub fn expose(&self) -> &str {
        &self.url
    }

    /// The URL with any password replaced by `***`, for logs and status pages; with
    /// Sentinels, the master's name and the Sentinels instead of the URL's unused host.
    pub fn masked(&self) -> String {
        let url = match url::Url::parse(&self.url) {
            Ok(mut u) if u.password().is_some() => {
                let _ = u.set_password(Some("***"));
                u.to_string()
            }
            _ => self.url.clone(),
        };
        match &self.sentinel {
            None => url,
            Some(s) => {
                let nodes: Vec<String> = s.nodes.iter().map(|(h, p)| format!("{h}:{p}")).collect();
                format!("sentinel master `{}` via {} ({url})", s.master, nodes.join(","))
            }
        }
    }
}

/// Validates a Redis URL; the error masks any password in it.
fn redis_url(u: &str) -> Result<RedisUrl, String> {
    let parsed = url::Url::parse(u).map_err(|e| format!("`{}` is not a URL: {e}", mask_text(u)))?;
    if !matches!(parsed.scheme(), "redis" | "rediss" | "unix" | "redis+unix") {
        return Err(format!(
            "scheme `{}` is not redis://, rediss://, unix:// or redis+unix://",
            parsed.scheme()
        ));
    }
    redis::IntoConnectionInfo::into_connection_info(u)
        .map_err(|e| format!("`{}` is not a usable Redis URL: {e}", mask_text(u)))?;
    Ok(RedisUrl::plain(u.to_owned()))
}

/// Masks what looks like a password in a URL that may not even parse.
fn mask_text(u: &str) -> String {
    match (u.find("://"), u.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &u[..s], &u[at + 1..]),
        _ => u.to_owned(),
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
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuOverrides {
    /// `MACHINE_GPU_COUNT`: the number of GPUs to use.
    pub count: Option<u32>,
    /// `MACHINE_GPU_MEMORY_GB`: memory per GPU when NVML cannot tell.
    pub memory_gb: Option<f64>,
    /// `MACHINE_GPU_MODEL`: model name when NVML cannot tell.
    pub model: Option<String>,
    /// `MACHINE_GPU_ON_FAULT`: what a fatal GPU fault (critical XID, double-bit ECC, GPU lost)
    /// does to the machine.
    #[serde(default)]
    pub on_fault: OnFault,
    /// How often the GPU health monitor reads throttling, temperature and page retirement (and
    /// the longest it waits on NVML events between checks for shutdown).
    #[serde(default = "default_health_poll", with = "humantime_serde")]
    pub health_poll: Duration,
}

fn default_health_poll() -> Duration {
    Duration::from_secs(5)
}

/// `gpu.on_fault`: what a GPU with a fatal fault does to the machine.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFault {
    /// Its worker stops claiming and returns its job; the other GPUs go on.
    #[default]
    Isolate,
    /// The machine returns every job and exits with code 5 (`cli/exit.rs`), so the
    /// fleet replaces the whole box.
    Exit,
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
#[derive(Debug, Clone, Serialize, PartialEq)]
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
    /// The customers `/metrics` names in the external APIs' usage; jobs of any other customer
    /// count as `other` (a job's customer is free text, and a label value per customer would
    /// grow the metrics without bound).
    pub metrics_customers: Vec<String>,
}

/// Logging output.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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

impl<'de> Deserialize<'de> for LogFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const FORMATS: [LogFormat; 2] = [LogFormat::Text, LogFormat::Json];
        Ok(FORMATS[super::enums::variant(d, &["text", "json"])?])
    }
}

/// Supervisor knobs shared by every service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
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
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ServiceConnectorConfig {
    /// GPU i listens on `base_port + i`.
    pub base_port: u16,
    /// Arguments appended to the default command.
    pub extra_args: Vec<String>,
    /// A full command replacing the default; `{port}`, `{gpu}` and `{workspace}` are filled in.
    pub command: Option<Vec<String>>,
    /// How long a running job may go without a word from the service about it before it is
    /// interrupted and returned to the queue as stalled (a job's `stall_timeout_seconds` may
    /// raise it).
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    /// Restart the service between jobs once its process group's resident memory is above this
    /// many bytes.
    #[serde(default)]
    pub restart_above_rss: Option<u64>,
    /// Restart the service between jobs once its GPU's used memory, read while the worker is
    /// idle, is above this many bytes.
    #[serde(default)]
    pub restart_above_idle_vram: Option<u64>,
    /// Restart the service between jobs after this many jobs.
    #[serde(default)]
    pub restart_every_jobs: Option<u32>,
    /// A warm-up job run on each start of the service before its worker claims. A failing
    /// warm-up is a failed start.
    pub warmup: Option<Warmup>,
    /// After a job that did not complete (cancelled, stalled, failed), how long the worker
    /// waits for the service to finish what it still runs before its next claim; past it the
    /// service is restarted.
    #[serde(with = "humantime_serde")]
    pub idle_wait: Duration,
}

/// A service's warm-up job, as its connector takes it; read and parsed once, when the
/// configuration is loaded (an unreadable file is a problem of the configuration, naming it).
/// Shown as it is written: the workflow's path, or the prompt.
#[derive(Debug, Clone, PartialEq)]
pub enum Warmup {
    /// ComfyUI: a workflow in API format, read from `path`.
    Workflow {
        /// The file it was read from, as configured.
        path: PathBuf,
        /// The workflow.
        workflow: serde_json::Map<String, serde_json::Value>,
    },
    /// A1111: a prompt.
    Prompt(String),
}

impl Serialize for Warmup {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Warmup::Workflow { path, .. } => path.serialize(s),
            Warmup::Prompt(prompt) => prompt.serialize(s),
        }
    }
}

/// What the installers install and how (`[install]`).
#[derive(Debug, Clone, Serialize, PartialEq)]
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

/// Where ComfyUI, its custom nodes and its models come from (`[install.comfyui]`, read as it
/// is written; the keys keep their file names where the field's differs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ComfyuiInstallConfig {
    /// Git URL (or local path) of the ComfyUI repository.
    pub repo_url: String,
    /// Tag, commit or branch to check out.
    #[serde(rename = "ref")]
    pub git_ref: String,
    /// The interpreter that creates the venv.
    pub python: String,
    /// `pip --extra-index-url` for torch wheels.
    pub torch_index_url: Option<String>,
    /// The custom-node catalogue; `None` means the built-in one.
    #[serde(rename = "nodes")]
    pub nodes_file: Option<PathBuf>,
    /// The model manifest; `None` means no models.
    #[serde(rename = "models")]
    pub models_manifest: Option<PathBuf>,
    /// The shared models directory linked into ComfyUI (unset: `<workspace>/models`).
    #[serde(default)]
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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PlaywrightInstallConfig {
    /// The browser executable; `None` means auto-detect.
    pub chromium: Option<PathBuf>,
    /// npm version of `playwright-core`.
    pub playwright_core: String,
    /// npm version of `p5`.
    pub p5: String,
}

fn serialize_display<T: fmt::Display, S: serde::Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

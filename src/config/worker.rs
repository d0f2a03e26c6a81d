//! Configuration of the workers and of the connectors that need no supervised service:
//! `[worker]` (lease, heartbeat, drain, job timeout, customer access, workflow pinning, custom
//! capabilities, where outputs go by default), `[connectors.openai]` and
//! `[connectors.simulation]`. Each section deserializes straight into its type; the checks
//! then normalise it in place and name every problem's key.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use super::Problem;

/// How workers claim, hold and report jobs (`[worker]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WorkerConfig {
    /// How long a claimed job is held without renewal before the broker may take it back.
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    /// Time between heartbeats (at most a third of the lease; the lease itself is renewed every
    /// third of it, never more often than this).
    #[serde(with = "humantime_serde")]
    pub heartbeat: Duration,
    /// On shutdown, how long a running job may continue before it is returned to the queue.
    #[serde(with = "humantime_serde")]
    pub drain: Duration,
    /// Time limit of a job that does not carry its own.
    #[serde(with = "humantime_serde")]
    pub job_timeout: Duration,
    /// Default output directory for artifacts when a job's `ctx` names no storage (absolute).
    pub output_dir: PathBuf,
    /// How long to wait, after each upload to a `ctx` with a `cdnUrl`, for the CDN to serve it
    /// before completing the job (zero: do not wait; at most 5 minutes).
    #[serde(with = "humantime_serde")]
    pub cdn_wait: Duration,
    /// How long an upload keeps trying a store that does not answer or answers 5xx (a store
    /// briefly down) before the job is given back to the queue; zero tries once.
    #[serde(with = "humantime_serde")]
    pub upload_window: Duration,
    /// How often a worker held for something outside it (refused credentials) checks whether
    /// that is over, with a cheap authenticated request.
    #[serde(with = "humantime_serde")]
    pub hold_recheck: Duration,
    /// How many finished jobs a worker may have waiting on their uploads while it already runs
    /// the next one (0: upload before claiming again, one job at a time).
    #[serde(default = "default_pending_uploads")]
    pub pending_uploads: u32,
    /// The outputs a worker's pending uploads may hold in memory, in MiB, before it waits for
    /// them instead of claiming.
    #[serde(default = "default_pending_upload_mb")]
    pub pending_upload_mb: u64,
    /// When non-empty, workers only take jobs of this workflow.
    pub workflow_id: String,
    /// A worker whose last this many jobs all failed for the machine's reasons (not the
    /// job's) stops claiming for a cool-down; 0 never quarantines.
    pub quarantine_after: u32,
    /// The first cool-down of a quarantine; it doubles per repeat (up to 16 times this) until a
    /// job completes.
    #[serde(with = "humantime_serde")]
    pub quarantine_cooldown: Duration,
    /// A job's `max_retries` counts as at most this (0: no cap), so that a job asking for a
    /// billion retries does not circle the fleet for years.
    #[serde(default = "default_max_retries_cap")]
    pub max_retries_cap: u32,
    /// A running job's progress is written to Redis at most once per this (its first report
    /// at once, unchanged reports never, the last one before the job ends always); zero writes
    /// every report.
    #[serde(default = "default_progress_every", with = "humantime_serde")]
    pub progress_every: Duration,
    /// Whether progress updates also append to the `progress:<id>` stream, which nothing in
    /// the existing broker reads (capped at about 1,000 entries, expiring after a day).
    #[serde(default)]
    pub progress_stream: bool,
    /// Per connector, by name (`[worker.quarantine.<connector>]`): a worker running one of
    /// these connectors uses the first one's (in its plan's order) instead of
    /// `quarantine_after`/`quarantine_cooldown`; see [`WorkerConfig::quarantine_of`].
    #[serde(default)]
    pub quarantine: std::collections::BTreeMap<String, Quarantine>,
    /// Which customers' jobs the workers take.
    pub customer_access: CustomerAccess,
    /// How long a retryable failure waits before its job can be claimed again.
    pub retry_delay: crate::backoff::Backoff,
    /// Custom capabilities merged into every worker's capabilities JSON.
    #[serde(default)]
    pub capabilities: serde_json::Map<String, serde_json::Value>,
}

impl WorkerConfig {
    /// The quarantine of a worker running `connectors` (in plan order): the first one's own
    /// settings, each unset one from the `[worker]` defaults.
    pub fn quarantine_of(&self, connectors: impl IntoIterator<Item = super::ConnectorKind>) -> (u32, Duration) {
        let own = connectors.into_iter().find_map(|k| self.quarantine.get(k.name()));
        (
            own.and_then(|q| q.after).unwrap_or(self.quarantine_after),
            own.and_then(|q| q.cooldown).unwrap_or(self.quarantine_cooldown),
        )
    }
}

/// A connector's own quarantine settings (`[worker.quarantine.<connector>]`); each unset one
/// is the `[worker]` default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quarantine {
    /// Machine-blamed failures in a row that quarantine; 0 never does.
    pub after: Option<u32>,
    /// The first cool-down.
    #[serde(default, with = "humantime_serde")]
    pub cooldown: Option<Duration>,
}

/// The `customer_access` capability (`[worker.customer_access]`, read as it is written).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerAccess {
    /// `loose` or `strict`.
    pub isolation: Isolation,
    /// When non-empty, only these customers' jobs are taken.
    pub allowed_customers: Vec<String>,
    /// These customers' jobs are never taken.
    pub denied_customers: Vec<String>,
}

/// A worker's customer isolation: strict workers alone take `customer_isolation = "strict"`
/// jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Isolation {
    /// Takes any job its customer lists allow.
    #[default]
    Loose,
    /// Also takes the jobs that demand strict isolation.
    Strict,
}

impl Isolation {
    /// The name workers advertise in their capabilities.
    pub fn as_str(self) -> &'static str {
        match self {
            Isolation::Loose => "loose",
            Isolation::Strict => "strict",
        }
    }
}

impl<'de> Deserialize<'de> for Isolation {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        const ISOLATIONS: [Isolation; 2] = [Isolation::Loose, Isolation::Strict];
        Ok(ISOLATIONS[super::enums::variant(d, &["loose", "strict"])?])
    }
}

/// The OpenAI-compatible API the `openai` connector calls (`[connectors.openai]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OpenaiConfig {
    /// Base URL ending before `/chat/completions`, e.g. `https://api.openai.com/v1`.
    pub base_url: String,
    /// Name of the environment variable holding the API key (the key itself is never in config).
    pub api_key_env: String,
    /// Model used when a text job names none.
    pub text_model: String,
    /// Model used when an image job names none.
    pub image_model: String,
    /// Attempts per request when the API answers 429 or 5xx (1 = no retry).
    pub max_attempts: u32,
    /// First retry delay (doubling), unless the API sends `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest retry delay, `Retry-After` included.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Fleet-wide limits (`[connectors.openai.limits]`).
    #[serde(default)]
    pub limits: super::Limits,
    /// Prices (`[connectors.openai.prices]`).
    #[serde(default)]
    pub prices: super::Prices,
}

/// The simulation connector's defaults (a job's payload may override each); also what
/// `[connectors.simulation]` deserializes into.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SimulationConfig {
    /// How long a simulated job takes.
    #[serde(with = "humantime_serde")]
    pub duration: Duration,
    /// Progress steps reported.
    pub steps: u32,
    /// Probability (0..=1) that a job fails (retryably).
    pub failure_rate: f64,
}

pub(super) fn validate_worker(mut c: WorkerConfig, workspace: &Path, problems: &mut Vec<Problem>) -> WorkerConfig {
    let mut bad = |key: &str, message: &str| {
        problems.push(Problem {
            key: key.to_owned(),
            message: message.to_owned(),
        })
    };
    if c.lease < Duration::from_secs(1) {
        bad("worker.lease", "must be at least 1s");
    }
    if c.heartbeat.is_zero() || c.heartbeat.saturating_mul(3) > c.lease {
        bad(
            "worker.heartbeat",
            "must be more than 0 and at most a third of worker.lease, so one lost renewal never loses the job",
        );
    }
    if c.quarantine_after > 0 && c.quarantine_cooldown.is_zero() {
        bad(
            "worker.quarantine_cooldown",
            "must be more than 0 (set quarantine_after = 0 to never quarantine)",
        );
    }
    for (name, q) in &c.quarantine {
        if super::ConnectorKind::from_name(name).is_none() {
            bad(&format!("worker.quarantine.{name}"), "names no connector");
            continue;
        }
        let after = q.after.unwrap_or(c.quarantine_after);
        let cooldown = q.cooldown.unwrap_or(c.quarantine_cooldown);
        if after > 0 && cooldown.is_zero() {
            bad(&format!("worker.quarantine.{name}.cooldown"), "must be more than 0");
        }
    }
    if c.job_timeout.is_zero() {
        bad("worker.job_timeout", "must be more than 0");
    }
    let rd = &c.retry_delay;
    if !(rd.factor.is_finite() && rd.factor >= 1.0) {
        bad("worker.retry_delay.factor", "must be a number of at least 1");
    }
    if !(0.0..=1.0).contains(&rd.jitter) {
        bad("worker.retry_delay.jitter", "must be between 0 and 1");
    }
    if rd.max < rd.initial {
        bad("worker.retry_delay.max", "must be at least worker.retry_delay.initial");
    }
    const RESERVED: [&str; 7] = [
        "worker_id",
        "machine_id",
        "services",
        "job_service_required_map",
        "hardware",
        "models",
        "customer_access",
    ];
    if c.upload_window > Duration::from_secs(600) {
        bad("worker.upload_window", "must be at most 10m");
    }
    if c.hold_recheck < Duration::from_secs(1) {
        bad("worker.hold_recheck", "must be at least 1s");
    }
    if c.pending_uploads > 16 {
        bad(
            "worker.pending_uploads",
            "must be at most 16 (each pending upload keeps its job's lease and outputs)",
        );
    }
    if c.pending_upload_mb == 0 || c.pending_upload_mb > 65_536 {
        bad("worker.pending_upload_mb", "must be between 1 and 65536");
    }
    if c.cdn_wait > Duration::from_secs(300) {
        bad(
            "worker.cdn_wait",
            "must be at most 5m (a job waits this long per output)",
        );
    }
    for key in c.capabilities.keys() {
        if RESERVED.contains(&key.as_str()) || key == "workflow_id" {
            bad(
                &format!("worker.capabilities.{key}"),
                "is computed by the machine and cannot be set here",
            );
        }
    }
    c.output_dir = workspace.join(&c.output_dir);
    c.workflow_id = c.workflow_id.trim().to_owned();
    c
}

pub(super) fn validate_openai(mut c: OpenaiConfig, problems: &mut Vec<Problem>) -> OpenaiConfig {
    c.base_url = super::apis::validate_api("openai", &c.base_url, &c.api_key_env, c.max_attempts, problems);
    c.api_key_env = c.api_key_env.trim().to_owned();
    c.limits = super::apis::validate_limits("openai", c.limits, problems);
    c.prices = super::apis::validate_prices("openai", c.prices, problems);
    c
}

pub(super) fn validate_simulation(mut s: SimulationConfig, problems: &mut Vec<Problem>) -> SimulationConfig {
    if !(0.0..=1.0).contains(&s.failure_rate) {
        problems.push(Problem {
            key: "connectors.simulation.failure_rate".to_owned(),
            message: "must be between 0 and 1".to_owned(),
        });
    }
    // `steps = 0` is read as one step rather than refused, as it always has been.
    s.steps = s.steps.max(1);
    s
}

/// `worker.pending_uploads` when a configuration written before it leaves it out.
fn default_pending_uploads() -> u32 {
    2
}

/// `worker.pending_upload_mb` when a configuration written before it leaves it out.
fn default_pending_upload_mb() -> u64 {
    1024
}

/// `worker.max_retries_cap` when a configuration written before it leaves it out.
fn default_max_retries_cap() -> u32 {
    10
}

/// `worker.progress_every` when a configuration written before it leaves it out.
fn default_progress_every() -> Duration {
    Duration::from_secs(1)
}

#[cfg(test)]
mod tests {
    use super::super::{Problem, load_str};
    use std::collections::BTreeMap;
    use std::time::Duration;

    fn problems(file: &str) -> Vec<Problem> {
        load_str(Some(("f.toml", file)), &BTreeMap::<&str, &str>::new())
            .expect_err("invalid")
            .problems()
            .to_vec()
    }

    #[test]
    fn defaults_and_overrides() {
        let file = r#"
[worker]
lease = "30s"
heartbeat = "5s"
workflow_id = " wf-1 "
[worker.customer_access]
isolation = "STRICT"
allowed_customers = ["c1"]
[worker.capabilities]
supports_controlnet = true
max_batch_size = 4
[connectors.openai]
base_url = "http://localhost:8000/v1/"
[connectors.simulation]
failure_rate = 0.25
"#;
        let c = load_str(Some(("f.toml", file)), &BTreeMap::from([("MACHINE_WORKSPACE", "/ws")])).unwrap();
        assert_eq!(c.machine.worker.lease, Duration::from_secs(30));
        assert_eq!(c.machine.worker.drain, Duration::from_secs(30));
        assert_eq!(c.machine.worker.output_dir, std::path::PathBuf::from("/ws/outputs"));
        assert_eq!(c.machine.worker.workflow_id, "wf-1");
        assert_eq!(c.machine.worker.customer_access.isolation, super::Isolation::Strict);
        assert_eq!(c.machine.worker.capabilities["max_batch_size"], 4);
        assert_eq!(c.plan.openai.base_url, "http://localhost:8000/v1");
        assert_eq!(c.plan.openai.api_key_env, "OPENAI_API_KEY");
        assert_eq!(c.plan.simulation.failure_rate, 0.25);
        assert_eq!(
            (c.machine.worker.quarantine_after, c.machine.worker.quarantine_cooldown),
            (3, Duration::from_secs(180))
        );
    }

    #[test]
    fn quarantine_per_connector() {
        use super::super::ConnectorKind;
        let file = "[worker]\nquarantine_after = 4\n[worker.quarantine.comfyui]\ncooldown = \"10s\"\n[worker.quarantine.openai]\nafter = 0\n";
        let c = load_str(Some(("f.toml", file)), &BTreeMap::<&str, &str>::new()).unwrap();
        let w = &c.machine.worker;
        assert_eq!(
            w.quarantine_of([ConnectorKind::Comfyui, ConnectorKind::Openai]),
            (4, Duration::from_secs(10))
        );
        assert_eq!(
            w.quarantine_of([ConnectorKind::Playwright, ConnectorKind::Openai]),
            (0, Duration::from_secs(180)),
            "the first connector with settings of its own"
        );
        assert_eq!(
            w.quarantine_of([ConnectorKind::Playwright]),
            (4, Duration::from_secs(180))
        );
        let ps = problems("[worker.quarantine.nope]\nafter = 1\n");
        assert_eq!(ps[0].key, "worker.quarantine.nope", "{ps:?}");
    }

    #[test]
    fn problems_name_their_keys() {
        let ps = problems(
            "[worker]\nheartbeat = \"30s\"\n[worker.customer_access]\nisolation = \"sometimes\"\n[worker.capabilities]\nmodels = 1\n[connectors.simulation]\nfailure_rate = 2.0\n[connectors.openai]\nbase_url = \"ftp://x\"\nmax_attempts = 0\n",
        );
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                // Found when the document is read, before the checks that need whole sections.
                "worker.customer_access.isolation",
                "worker.heartbeat",
                "worker.capabilities.models",
                "connectors.openai.base_url",
                "connectors.openai.max_attempts",
                "connectors.simulation.failure_rate"
            ],
            "{ps:#?}"
        );
    }
}

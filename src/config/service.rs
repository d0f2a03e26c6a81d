//! Supervised services as configuration: the validated [`ServiceSpec`] that the plan hands to the
//! supervisor, with its restart policy and probes, the raw `[services.NAME]` table as written
//! ([`RawService`], unset fields resolved from per-kind defaults), and the checks that turn one
//! into the other.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::ConnectorKind;

/// When a service that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Always restart, whatever the exit status.
    Always,
    /// Restart only after a non-zero exit or a signal.
    OnFailure,
    /// Never restart.
    Never,
}

/// What a probe checks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProbeCheck {
    /// `GET url` answers 2xx.
    Http(String),
    /// A TCP connection to `host:port` succeeds.
    Tcp(String),
    /// The command (argv, no shell) exits 0.
    Command(Vec<String>),
}

/// A readiness or liveness probe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProbeSpec {
    /// What is checked.
    pub check: ProbeCheck,
    /// Time between checks.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// How long one check may take before it counts as failed.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// Consecutive failures before the probe's verdict flips to failed.
    pub failure_threshold: u32,
    /// Delay after start before the first check.
    #[serde(with = "humantime_serde")]
    pub initial_delay: Duration,
}

/// One service the supervisor runs: a user-defined `[services.NAME]` or a service of the plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceSpec {
    /// Unique service name (`comfyui-gpu0`, `sidecar`).
    pub name: String,
    /// The argv vector; never passed through a shell.
    pub command: Vec<String>,
    /// The child's own variables, on top of the few it gets from the machine (see
    /// `supervisor::env`: a service never inherits the machine's whole environment).
    pub env: BTreeMap<String, String>,
    /// Variables of the machine's environment passed to the child by name (`pass_env`).
    pub pass_env: Vec<String>,
    /// Working directory, or the machine's when `None`.
    pub cwd: Option<PathBuf>,
    /// When to restart after an exit.
    pub restart: RestartPolicy,
    /// Readiness probe; without one the service is ready once started.
    pub ready: Option<ProbeSpec>,
    /// Liveness probe; failing it restarts the service.
    pub liveness: Option<ProbeSpec>,
    /// Services that must be ready before this one starts.
    pub after: Vec<String>,
    /// If it fails for good (crash loop), the whole machine shuts down.
    pub critical: bool,
    /// Time between SIGTERM and SIGKILL at stop.
    #[serde(with = "humantime_serde")]
    pub grace: Duration,
    /// The connector this service backs, for the plan's services.
    pub connector: Option<ConnectorKind>,
    /// The GPU index the service is pinned to, for the plan's per-GPU services.
    pub gpu: Option<u32>,
    /// The loopback port the service listens on, when the plan assigned one.
    pub port: Option<u16>,
}

/// Defaults for probes that do not set their own timing.
pub(crate) const PROBE_INTERVAL: Duration = Duration::from_secs(2);
pub(crate) const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
pub(crate) const PROBE_FAILURES: u32 = 3;

/// Returns whether `name` is a valid service or worker name: 1-63 of `[a-z0-9_-]`, starting
/// with a letter or digit.
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
        && name.as_bytes()[0].is_ascii_alphanumeric()
}

pub(crate) fn validate_probe(key: &str, raw: &RawProbe, problems: &mut Vec<(String, String)>) -> Option<ProbeSpec> {
    let given = [raw.http.is_some(), raw.tcp.is_some(), raw.command.is_some()]
        .into_iter()
        .filter(|g| *g)
        .count();
    if given != 1 {
        problems.push((
            key.to_owned(),
            "a probe needs exactly one of `http`, `tcp` or `command`".to_owned(),
        ));
        return None;
    }
    let check = if let Some(url) = &raw.http {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            problems.push((
                format!("{key}.http"),
                format!("`{url}` is not an http:// or https:// URL"),
            ));
            return None;
        }
        ProbeCheck::Http(url.clone())
    } else if let Some(addr) = &raw.tcp {
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok {
            problems.push((format!("{key}.tcp"), format!("`{addr}` is not a host:port address")));
            return None;
        }
        ProbeCheck::Tcp(addr.clone())
    } else {
        let argv = raw.command.clone().unwrap_or_default();
        if argv.first().is_none_or(|c| c.is_empty()) {
            problems.push((format!("{key}.command"), "the probe command is empty".to_owned()));
            return None;
        }
        ProbeCheck::Command(argv)
    };
    let failure_threshold = raw.failures.unwrap_or(PROBE_FAILURES);
    if failure_threshold == 0 {
        problems.push((format!("{key}.failures"), "must be at least 1".to_owned()));
    }
    let interval = raw.interval.unwrap_or(PROBE_INTERVAL);
    if interval.is_zero() {
        problems.push((format!("{key}.interval"), "must be greater than zero".to_owned()));
    }
    let timeout = raw.timeout.unwrap_or(PROBE_TIMEOUT);
    if timeout.is_zero() {
        problems.push((format!("{key}.timeout"), "must be greater than zero".to_owned()));
    }
    Some(ProbeSpec {
        check,
        interval,
        timeout,
        failure_threshold,
        initial_delay: raw.initial_delay.unwrap_or_default(),
    })
}

/// Validates one `[services.NAME]` table; problems are pushed as (key, message).
pub(crate) fn validate_service(
    name: &str,
    raw: &RawService,
    default_grace: Duration,
    problems: &mut Vec<(String, String)>,
) -> Option<ServiceSpec> {
    let key = format!("services.{name}");
    let before = problems.len();
    if !valid_name(name) {
        problems.push((
            key.clone(),
            "service names are 1-63 characters of a-z, 0-9, `-` and `_`".to_owned(),
        ));
    }
    if raw.command.first().is_none_or(|c| c.is_empty()) {
        problems.push((format!("{key}.command"), "the command is empty".to_owned()));
    }
    for var in raw.env.keys() {
        if var.is_empty() || var.contains('=') || var.contains('\0') {
            problems.push((format!("{key}.env"), format!("`{var}` is not a valid variable name")));
        }
    }
    for var in &raw.pass_env {
        if var.is_empty() || var.contains('=') || var.contains('\0') {
            problems.push((
                format!("{key}.pass_env"),
                format!("`{var}` is not a valid variable name"),
            ));
        }
    }
    for dep in &raw.after {
        if dep == name {
            problems.push((format!("{key}.after"), "a service cannot wait for itself".to_owned()));
        }
    }
    let ready = raw
        .ready
        .as_ref()
        .and_then(|p| validate_probe(&format!("{key}.ready"), p, problems));
    let liveness = raw
        .liveness
        .as_ref()
        .and_then(|p| validate_probe(&format!("{key}.liveness"), p, problems));
    if problems.len() > before {
        return None;
    }
    Some(ServiceSpec {
        name: name.to_owned(),
        command: raw.command.clone(),
        env: raw.env.clone(),
        pass_env: raw.pass_env.clone(),
        cwd: raw.cwd.clone(),
        restart: raw.restart.unwrap_or(RestartPolicy::Always),
        ready,
        liveness,
        after: raw.after.clone(),
        critical: raw.critical,
        grace: raw.grace.unwrap_or(default_grace),
        connector: None,
        gpu: None,
        port: None,
    })
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawService {
    pub command: Vec<String>,
    pub restart: Option<RestartPolicy>,
    pub ready: Option<RawProbe>,
    pub liveness: Option<RawProbe>,
    #[serde(default)]
    pub after: Vec<String>,
    #[serde(default)]
    pub critical: bool,
    #[serde(default, with = "humantime_serde")]
    pub grace: Option<Duration>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub pass_env: Vec<String>,
    pub cwd: Option<PathBuf>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawProbe {
    pub http: Option<String>,
    pub tcp: Option<String>,
    pub command: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    pub interval: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    pub failures: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    pub initial_delay: Option<Duration>,
}

#[cfg(test)]
impl ServiceSpec {
    /// A service running `command` with every default, for tests.
    pub(crate) fn for_tests(name: &str, command: &[&str]) -> ServiceSpec {
        ServiceSpec {
            name: name.to_owned(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            cwd: None,
            restart: RestartPolicy::Never,
            ready: None,
            liveness: None,
            after: Vec::new(),
            critical: false,
            grace: Duration::from_secs(1),
            connector: None,
            gpu: None,
            port: None,
        }
    }
}

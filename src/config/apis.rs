//! The settings of the external API connectors (Replicate, RunPod; OpenAI's own settings live
//! in `worker.rs`) with the fleet-wide limits and the price table every external connector
//! shares.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Problem;

/// Fleet-wide limits of one external API (`[connectors.<api>.limits]`, read as it is written),
/// enforced in Redis by every machine together. Everything unset means no limit. The API's own
/// budget is written flat in the section, not through `serde(flatten)`: a flattened struct
/// drops the keys it does not know without telling `serde_ignored`, so an unknown key here would
/// go unreported (a test in `load.rs` writes one into every section). [`Limits::api`] gives the
/// budget as a [`Budget`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Limits {
    /// The API's sustained rate, per second ...
    pub requests_per_second: Option<f64>,
    /// ... or per minute (one of the two).
    pub requests_per_minute: Option<f64>,
    /// Requests allowed back to back after a quiet spell (default 1).
    pub burst: Option<u32>,
    /// Requests per day.
    pub daily_requests: Option<u64>,
    /// Tokens (input + output) per day, for APIs that report tokens.
    pub daily_tokens: Option<u64>,
    /// The local hour (0-23) at which the daily quotas start again.
    pub reset_hour: u8,
    /// The IANA time zone of `reset_hour` (e.g. `UTC`, `America/New_York`).
    pub zone: String,
    /// The limits of each customer on this API (`[connectors.<api>.limits.customer]`); jobs
    /// without a customer only count against the API's own.
    pub customer: Option<Budget>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            requests_per_second: None,
            requests_per_minute: None,
            burst: None,
            daily_requests: None,
            daily_tokens: None,
            reset_hour: 0,
            zone: "UTC".to_owned(),
            customer: None,
        }
    }
}

impl Limits {
    /// The limits of the API as a whole.
    pub fn api(&self) -> Budget {
        Budget {
            requests_per_second: self.requests_per_second,
            requests_per_minute: self.requests_per_minute,
            burst: self.burst,
            daily_requests: self.daily_requests,
            daily_tokens: self.daily_tokens,
        }
    }

    /// Whether anything is limited at all (then no limiter is needed).
    pub fn is_unlimited(&self) -> bool {
        self.api().is_unlimited() && self.customer.as_ref().is_none_or(Budget::is_unlimited)
    }
}

/// The rate limit and daily quotas of one scope (the API, or each customer), as written.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    /// Sustained requests per second ...
    pub requests_per_second: Option<f64>,
    /// ... or per minute (one of the two).
    pub requests_per_minute: Option<f64>,
    /// Requests allowed back to back after a quiet spell (default 1).
    pub burst: Option<u32>,
    /// Requests per day.
    pub daily_requests: Option<u64>,
    /// Tokens (input + output) per day, for APIs that report tokens.
    pub daily_tokens: Option<u64>,
}

impl Budget {
    /// The rate limit, a per-minute rate given as its per-second rate; `None` when no rate is
    /// set (or, in a configuration that failed its checks, when it is not a usable one).
    pub fn rate(&self) -> Option<Rate> {
        let per_second = self
            .requests_per_second
            .or_else(|| self.requests_per_minute.map(|m| m / 60.0))?;
        (per_second.is_finite() && per_second > 0.0 && per_second <= MAX_PER_SECOND).then(|| Rate {
            per_second,
            burst: self.burst.unwrap_or(1).max(1),
        })
    }

    /// Whether this scope has no limit.
    pub fn is_unlimited(&self) -> bool {
        self.rate().is_none() && self.daily_requests.is_none() && self.daily_tokens.is_none()
    }
}

/// The highest rate a budget may set.
const MAX_PER_SECOND: f64 = 100_000.0;

/// A rate limit: requests spaced `1 / per_second` apart, with up to `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Rate {
    /// Sustained requests per second.
    pub per_second: f64,
    /// Requests allowed back to back after a quiet spell (1 = always evenly spaced, which is
    /// what keeps every one-second window within the rate).
    pub burst: u32,
}

/// The price table of one external API (`[connectors.<api>.prices]`, read as it is written;
/// an unset price is 0); the cost of a job is the sum of each price times its usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Prices {
    /// Per API request that created work (a completion, a prediction, an endpoint run).
    pub per_request: f64,
    /// Per 1000 input (prompt) tokens.
    pub per_1k_input_tokens: f64,
    /// Per 1000 output (completion) tokens.
    pub per_1k_output_tokens: f64,
    /// Per second of predict / execution time.
    pub per_second: f64,
    /// The currency of the prices, e.g. `USD`.
    pub currency: String,
}

impl Default for Prices {
    fn default() -> Self {
        Prices {
            per_request: 0.0,
            per_1k_input_tokens: 0.0,
            per_1k_output_tokens: 0.0,
            per_second: 0.0,
            currency: "USD".to_owned(),
        }
    }
}

/// The `replicate` connector's API (`[connectors.replicate]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ReplicateConfig {
    /// Base URL ending before `/predictions`, e.g. `https://api.replicate.com/v1`.
    pub base_url: String,
    /// Name of the environment variable holding the API token.
    pub api_key_env: String,
    /// Time between polls of a prediction that is followed by polling.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Whether to follow a prediction through its `urls.stream` (server-sent events) when it
    /// has one, rather than by polling.
    pub stream: bool,
    /// Limit of one HTTP request (not of the prediction, which the job timeout bounds).
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Attempts per request on 429/5xx.
    pub max_attempts: u32,
    /// First retry delay (doubling), unless the API sends `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest retry delay, `Retry-After` included.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Model-family aliases: a job of service `replicate:<alias>`, or a payload `model` equal
    /// to `<alias>`, runs the model reference given here (`owner/name` or
    /// `owner/name:version`).
    #[serde(default)]
    pub aliases: BTreeMap<String, String>,
    /// Fleet-wide limits.
    #[serde(default)]
    pub limits: Limits,
    /// Prices.
    #[serde(default)]
    pub prices: Prices,
}

/// The `runpod` connector's API (`[connectors.runpod]`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct RunpodConfig {
    /// Base URL ending before `/<endpoint id>/run`, e.g. `https://api.runpod.ai/v2`.
    pub base_url: String,
    /// Name of the environment variable holding the API key.
    pub api_key_env: String,
    /// The endpoint of jobs whose payload names none.
    pub endpoint_id: Option<String>,
    /// Time between `/status` polls.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long the status of a short job (payload `"sync": true`) is read every 100 ms before
    /// it is followed at `poll_interval` like any other.
    #[serde(with = "humantime_serde")]
    pub sync_wait: Duration,
    /// Limit of one HTTP request.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Attempts per request on 429/5xx.
    pub max_attempts: u32,
    /// First retry delay (doubling), unless the API sends `Retry-After`.
    #[serde(with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest retry delay, `Retry-After` included.
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Fleet-wide limits.
    #[serde(default)]
    pub limits: Limits,
    /// Prices.
    #[serde(default)]
    pub prices: Prices,
}

fn problem(problems: &mut Vec<Problem>, key: String, message: impl Into<String>) {
    problems.push(Problem {
        key,
        message: message.into(),
    });
}

/// Checks an API's base URL, key variable and attempts; returns the URL without its trailing
/// slash.
pub(crate) fn validate_api(
    name: &str,
    base_url: &str,
    api_key_env: &str,
    max_attempts: u32,
    problems: &mut Vec<Problem>,
) -> String {
    match url::Url::parse(base_url.trim()) {
        Ok(u) if matches!(u.scheme(), "http" | "https") => {}
        _ => problem(
            problems,
            format!("connectors.{name}.base_url"),
            format!("`{base_url}` is not an http(s) URL"),
        ),
    }
    if api_key_env.trim().is_empty() {
        problem(
            problems,
            format!("connectors.{name}.api_key_env"),
            "must name an environment variable",
        );
    }
    if max_attempts == 0 {
        problem(
            problems,
            format!("connectors.{name}.max_attempts"),
            "must be at least 1",
        );
    }
    base_url.trim().trim_end_matches('/').to_owned()
}

/// Checks one scope's budget (`key` is its section).
fn check_budget(key: &str, b: &Budget, problems: &mut Vec<Problem>) {
    let written = match (b.requests_per_second, b.requests_per_minute) {
        (Some(_), Some(_)) => {
            problem(
                problems,
                format!("{key}.requests_per_minute"),
                "set requests_per_second or requests_per_minute, not both",
            );
            None
        }
        (Some(r), None) => Some((r, "requests_per_second")),
        (None, Some(r)) => Some((r / 60.0, "requests_per_minute")),
        (None, None) => None,
    };
    if let Some((r, name)) = written {
        if !(r.is_finite() && r > 0.0 && r <= MAX_PER_SECOND) {
            problem(
                problems,
                format!("{key}.{name}"),
                "must be a positive number (at most 100000 per second)",
            );
        }
    }
    let both = b.requests_per_second.is_some() && b.requests_per_minute.is_some();
    if b.burst == Some(0) {
        problem(problems, format!("{key}.burst"), "must be at least 1");
    } else if b.burst.is_some() && written.is_none() && !both {
        problem(
            problems,
            format!("{key}.burst"),
            "needs requests_per_second or requests_per_minute",
        );
    }
    for (name, v) in [("daily_requests", b.daily_requests), ("daily_tokens", b.daily_tokens)] {
        if v == Some(0) {
            problem(
                problems,
                format!("{key}.{name}"),
                "must be at least 1 (leave it out for no quota)",
            );
        }
    }
}

/// Checks `[connectors.<name>.limits]`; the zone is trimmed.
pub(crate) fn validate_limits(name: &str, mut limits: Limits, problems: &mut Vec<Problem>) -> Limits {
    let key = format!("connectors.{name}.limits");
    check_budget(&key, &limits.api(), problems);
    if let Some(c) = &limits.customer {
        check_budget(&format!("{key}.customer"), c, problems);
    }
    if limits.reset_hour > 23 {
        problem(problems, format!("{key}.reset_hour"), "must be an hour from 0 to 23");
    }
    limits.zone = limits.zone.trim().to_owned();
    if let Err(e) = jiff::tz::TimeZone::get(&limits.zone) {
        problem(
            problems,
            format!("{key}.zone"),
            format!("`{}` is not a known IANA time zone: {e}", limits.zone),
        );
    }
    limits
}

/// Validates `[connectors.<name>.prices]`.
pub(crate) fn validate_prices(name: &str, mut prices: Prices, problems: &mut Vec<Problem>) -> Prices {
    for (field, v) in [
        ("per_request", prices.per_request),
        ("per_1k_input_tokens", prices.per_1k_input_tokens),
        ("per_1k_output_tokens", prices.per_1k_output_tokens),
        ("per_second", prices.per_second),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            problem(
                problems,
                format!("connectors.{name}.prices.{field}"),
                "must be a number of at least 0",
            );
        }
    }
    prices.currency = prices.currency.trim().to_owned();
    if prices.currency.is_empty() {
        problem(problems, format!("connectors.{name}.prices.currency"), "is empty");
    }
    prices
}

pub(crate) fn validate_replicate(mut c: ReplicateConfig, problems: &mut Vec<Problem>) -> ReplicateConfig {
    c.base_url = validate_api("replicate", &c.base_url, &c.api_key_env, c.max_attempts, problems);
    c.api_key_env = c.api_key_env.trim().to_owned();
    if c.poll_interval.is_zero() {
        problem(
            problems,
            "connectors.replicate.poll_interval".to_owned(),
            "must be more than 0",
        );
    }
    for (alias, model) in &c.aliases {
        if alias.is_empty()
            || !alias
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            problem(
                problems,
                format!("connectors.replicate.aliases.{alias}"),
                "an alias is made of a-z, A-Z, 0-9, `-`, `_` and `.`",
            );
        }
        if parse_model_ref(model).is_none() {
            problem(
                problems,
                format!("connectors.replicate.aliases.{alias}"),
                format!("`{model}` is not `owner/name` or `owner/name:version`"),
            );
        }
    }
    c.limits = validate_limits("replicate", c.limits, problems);
    c.prices = validate_prices("replicate", c.prices, problems);
    c
}

pub(crate) fn validate_runpod(mut c: RunpodConfig, problems: &mut Vec<Problem>) -> RunpodConfig {
    c.base_url = validate_api("runpod", &c.base_url, &c.api_key_env, c.max_attempts, problems);
    c.api_key_env = c.api_key_env.trim().to_owned();
    if c.poll_interval.is_zero() {
        problem(
            problems,
            "connectors.runpod.poll_interval".to_owned(),
            "must be more than 0",
        );
    }
    c.endpoint_id = c.endpoint_id.map(|e| e.trim().to_owned()).filter(|e| !e.is_empty());
    if let Some(e) = &c.endpoint_id {
        if !valid_endpoint_id(e) {
            problem(
                problems,
                "connectors.runpod.endpoint_id".to_owned(),
                format!("`{e}` is not an endpoint id (a-z, A-Z, 0-9, `-`, `_`)"),
            );
        }
    }
    c.sync_wait = c.sync_wait.clamp(Duration::from_secs(1), Duration::from_secs(300));
    c.limits = validate_limits("runpod", c.limits, problems);
    c.prices = validate_prices("runpod", c.prices, problems);
    c
}

/// Whether `id` can be a RunPod endpoint id (it becomes a URL path segment).
pub fn valid_endpoint_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Splits a Replicate model reference `owner/name` or `owner/name:version` into its parts.
pub fn parse_model_ref(model: &str) -> Option<(&str, &str, Option<&str>)> {
    let (path, version) = match model.split_once(':') {
        Some((p, v)) => (p, Some(v)),
        None => (model, None),
    };
    let (owner, name) = path.split_once('/')?;
    let ok = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if !ok(owner) || !ok(name) || version.is_some_and(|v| !ok(v)) {
        return None;
    }
    Some((owner, name, version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ConnectorKind;

    fn load(file: &str, env: &[(&str, &str)]) -> Result<super::super::Config, Vec<String>> {
        let env: BTreeMap<&str, &str> = env.iter().copied().collect();
        super::super::load_str(Some(("f.toml", file)), &env)
            .map_err(|e| e.problems().iter().map(ToString::to_string).collect())
    }

    #[test]
    fn limits_and_prices_are_validated_with_their_keys() {
        let c = load(
            "[connectors.openai.limits]\nrequests_per_minute = 300\nburst = 3\ndaily_tokens = 1000\nreset_hour = 6\nzone = \"Asia/Tokyo\"\n[connectors.openai.limits.customer]\nrequests_per_second = 1\n[connectors.runpod.prices]\nper_second = 0.0004\n",
            &[],
        )
        .unwrap();
        let l = &c.plan.openai.limits;
        assert_eq!(
            l.api().rate(),
            Some(Rate {
                per_second: 5.0,
                burst: 3
            })
        );
        assert_eq!(
            (l.daily_tokens, l.reset_hour, l.zone.as_str()),
            (Some(1000), 6, "Asia/Tokyo")
        );
        assert_eq!(l.customer.as_ref().and_then(Budget::rate).map(|r| r.burst), Some(1));
        assert!(c.plan.replicate.limits.is_unlimited() && !l.is_unlimited());
        assert_eq!(c.plan.runpod.prices.per_second, 0.0004);
        let problems = load(
            "[connectors.openai.limits]\nrequests_per_second = 1\nrequests_per_minute = 60\ndaily_requests = 0\nreset_hour = 24\nzone = \"Mars/Olympus\"\n[connectors.replicate.limits.customer]\nrequests_per_second = -1\n[connectors.replicate.aliases]\nflux = \"not a model\"\n[connectors.runpod]\nendpoint_id = \"a/b\"\n[connectors.runpod.prices]\nper_request = -1\n",
            &[],
        )
        .unwrap_err();
        let want = [
            "connectors.openai.limits.requests_per_minute",
            "connectors.openai.limits.daily_requests",
            "connectors.openai.limits.reset_hour",
            "connectors.openai.limits.zone",
            "connectors.replicate.aliases.flux",
            "connectors.replicate.limits.customer.requests_per_second",
            "connectors.runpod.endpoint_id",
            "connectors.runpod.prices.per_request",
        ];
        for key in want {
            assert!(
                problems.iter().any(|p| p.starts_with(&format!("{key}:"))),
                "{key} not in {problems:#?}"
            );
        }
        assert_eq!(problems.len(), want.len(), "{problems:#?}");
    }

    #[test]
    fn external_connectors_need_their_keys() {
        let problems = load("", &[("WORKER_CONNECTORS", "replicate,runpod")]).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:#?}");
        assert!(problems[0].starts_with("REPLICATE_API_TOKEN: the replicate connector"));
        assert!(problems[1].starts_with("RUNPOD_API_KEY: the runpod connector"));
        let c = load(
            "",
            &[
                ("WORKER_CONNECTORS", "replicate:2,runpod"),
                ("REPLICATE_API_TOKEN", "r8_x"),
                ("RUNPOD_API_KEY", "rp_x"),
            ],
        )
        .unwrap();
        assert_eq!(c.plan.connectors.to_string(), "replicate:2,runpod");
        assert!(ConnectorKind::Replicate.external_api() && !ConnectorKind::Replicate.gpu_bound());
    }
}

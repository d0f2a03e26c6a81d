//! The Replicate connector: a job is one prediction on Replicate's HTTP API.
//!
//! - Service `replicate`: the payload names the model, `{"model": "owner/name", "input": {..}}`
//!   (an official model, `POST /models/<owner>/<name>/predictions`) or with a version
//!   (`"owner/name:<version>"`, or `"version": "<id>"`: `POST /predictions`). `model` may also
//!   be an alias of `[connectors.replicate.aliases]`. Without `input`, the rest of the payload
//!   is the input.
//!   `{"deployment": "owner/name", "input": {..}}` runs a deployment
//!   (`POST /deployments/<owner>/<name>/predictions`).
//! - Service `replicate:<alias>`: the alias names the model; the payload is as above without
//!   `model`.
//!
//! The prediction is followed through its `urls.stream` (server-sent `output`, `logs`, `error`
//! and `done` events) when it has one and streaming is on, else by polling `urls.get`; either
//! way the final prediction is read from `urls.get`. Progress comes from the last percentage in
//! the prediction's logs (tqdm bars: ` 45%|####  | 9/20`). On cancellation `urls.cancel` is
//! POSTed before returning. The output's files, at any depth (URLs, `data:` URIs; see
//! `connectors/outputs.rs`), become artifacts, which the worker stores through the job's `ctx`; the
//! rest of the output stays in the result. The result carries a
//! `billing` record with Replicate's `metrics.predict_time`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::http::{self, Backoff, Retrying};
use super::json_kind;
use super::limits::Limiter;
use super::openai::SseReader;
use super::outputs;
use super::{Billing, Connector, ConnectorError, Job, JobOutput, ProgressSink, or_cancelled};
use crate::config::{ConnectorKind, ReplicateConfig, Secret, parse_model_ref};

/// Runs jobs as Replicate predictions.
#[derive(Debug, Clone)]
pub struct ReplicateConnector {
    config: ReplicateConfig,
    token: Option<Secret>,
    client: reqwest::Client,
    limiter: Option<Arc<Limiter>>,
}

/// Where a prediction is, from the create answer.
#[derive(Debug)]
struct Urls {
    get: String,
    cancel: String,
    stream: Option<String>,
}

impl ReplicateConnector {
    /// A connector for `config.base_url` with the token from `config.api_key_env`.
    pub fn new(config: ReplicateConfig, token: Option<String>) -> Self {
        ReplicateConnector {
            config,
            token: token.filter(|t| !t.trim().is_empty()).map(Secret::new),
            client: http::client(),
            limiter: None,
        }
    }

    /// Sends every prediction through `limiter` first (the fleet-wide limits of this API).
    pub fn with_limiter(mut self, limiter: Arc<Limiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.client.request(method, url);
        match &self.token {
            Some(t) => req.bearer_auth(t.expose()),
            None => req,
        }
    }

    /// How a request is sent: `creates` for the create that starts a paid prediction (limited,
    /// and never repeated once Replicate may have acted on it), else a read.
    fn retrying<'a>(&'a self, what: &'a str, customer: &'a str, creates: Option<&'a ProgressSink>) -> Retrying<'a> {
        Retrying {
            what,
            api: "replicate",
            attempts: self.config.max_attempts,
            backoff: Backoff::doubling(self.config.backoff_initial, self.config.backoff_max),
            timeout: Some(self.config.request_timeout),
            limiter: creates.and(self.limiter.as_deref().map(|l| (l, customer))),
            creates: creates.map(|_| "replicate"),
            progress: creates,
        }
    }

    async fn json(
        &self,
        resp: reqwest::Response,
        what: &str,
        cancel: &CancellationToken,
    ) -> Result<Value, ConnectorError> {
        or_cancelled(cancel, async {
            resp.json::<Value>().await.map_err(|e| http::send_error(what, e))
        })
        .await
    }

    /// Creates the prediction; returns it.
    /// Creates the prediction; returns it, counting the request in `billing` once Replicate
    /// accepted it.
    async fn create(
        &self,
        job: &Job,
        billing: &mut Billing,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<Value, ConnectorError> {
        let (url, body) = prediction_request(&self.config, &job.service_required, &job.payload)?;
        let resp = http::send_retrying(
            || self.request(reqwest::Method::POST, &url).json(&body),
            self.retrying("create a Replicate prediction", &job.customer_id, Some(progress)),
            api_error_message,
            cancel,
        )
        .await?;
        billing.requests += 1;
        // Accepted but unreadable: the prediction exists, and its id is lost with the answer.
        self.json(resp, "read the created prediction", cancel)
            .await
            .map_err(|e| match e {
                ConnectorError::Cancelled => e,
                e => http::maybe_created("replicate", e),
            })
    }

    async fn get(&self, url: &str, customer: &str, cancel: &CancellationToken) -> Result<Value, ConnectorError> {
        let resp = http::send_retrying(
            || self.request(reqwest::Method::GET, url),
            self.retrying("read a Replicate prediction", customer, None),
            api_error_message,
            cancel,
        )
        .await?;
        self.json(resp, "read a Replicate prediction", cancel).await
    }

    /// Asks Replicate to stop the prediction; bounded, so a cancelled job returns promptly.
    /// Returns the prediction as the cancel answered it (with the predict time it bills).
    async fn cancel_prediction(&self, urls: &Urls) -> Option<Value> {
        let sent = self
            .request(reqwest::Method::POST, &urls.cancel)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => {
                tracing::info!(url = %urls.cancel, "cancelled the Replicate prediction");
                r.json::<Value>().await.ok()
            }
            Ok(r) => {
                tracing::warn!(url = %urls.cancel, status = %r.status(), "Replicate refused to cancel the prediction");
                None
            }
            Err(e) => {
                tracing::warn!(url = %urls.cancel, error = %e, "failed to cancel the Replicate prediction");
                None
            }
        }
    }

    /// Follows the prediction until it ends: through its stream when possible, else by polling.
    async fn follow(
        &self,
        urls: &Urls,
        mut prediction: Value,
        customer: &str,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<Value, ConnectorError> {
        if let Some(stream) = urls.stream.as_deref().filter(|_| self.config.stream) {
            if !terminal(&prediction) {
                match self.stream(stream, progress, cancel).await {
                    Ok(()) => {}
                    Err(ConnectorError::Cancelled) => return Err(ConnectorError::Cancelled),
                    Err(e) => tracing::info!(error = %e.chain(), "the prediction stream failed; polling instead"),
                }
            }
        }
        let mut last_logs_len = 0;
        loop {
            report_logs(&prediction, &mut last_logs_len, progress);
            if terminal(&prediction) {
                return Ok(prediction);
            }
            tokio::select! {
                () = cancel.cancelled() => return Err(ConnectorError::Cancelled),
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
            prediction = self.get(&urls.get, customer, cancel).await?;
        }
    }

    /// Reads the prediction's event stream until `done`, reporting progress from `logs` events.
    async fn stream(
        &self,
        url: &str,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<(), ConnectorError> {
        let resp = or_cancelled(cancel, async {
            self.request(reqwest::Method::GET, url)
                .header(reqwest::header::ACCEPT, "text/event-stream")
                .header(reqwest::header::CACHE_CONTROL, "no-store")
                .send()
                .await
                .map_err(|e| http::send_error("open the prediction stream", e))
        })
        .await?;
        if !resp.status().is_success() {
            return Err(http::status_error("open the prediction stream", resp.status(), ""));
        }
        let mut body = resp.bytes_stream();
        let mut sse = SseReader::default();
        let mut logs = String::new();
        loop {
            let chunk = tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(ConnectorError::Cancelled),
                c = body.next() => c,
            };
            let Some(chunk) = chunk else {
                return Err(ConnectorError::Unavailable {
                    message: "the prediction stream ended before `done`".to_owned(),
                    source: None,
                });
            };
            let chunk = chunk.map_err(|e| http::send_error("read the prediction stream", e))?;
            for (event, data) in sse.push_events(&chunk) {
                match event.as_str() {
                    "logs" => {
                        logs.push_str(&data);
                        logs.push('\n');
                        if let Some(p) = last_percent(&logs) {
                            progress.percent(p.min(99.0), "running on Replicate");
                        }
                    }
                    "done" => return Ok(()),
                    // `output` chunks and `error` are in the final prediction read afterwards.
                    _ => {}
                }
            }
        }
    }

    /// Runs one attempt, recording what Replicate bills in `billing` as it goes, so that a
    /// failed or cancelled prediction is billed too.
    async fn attempt(
        &self,
        job: &Job,
        progress: &ProgressSink,
        cancel: &CancellationToken,
        billing: &mut Billing,
    ) -> Result<JobOutput, ConnectorError> {
        progress.percent(0.0, "creating the prediction");
        let created = self.create(job, billing, progress, cancel).await?;
        let urls = prediction_urls(&created, &self.config.base_url)?;
        progress.percent(1.0, "prediction created");
        let followed = self.follow(&urls, created, &job.customer_id, progress, cancel).await;
        let prediction = match followed {
            Ok(p) => p,
            Err(e) => {
                // Whether cancelled or no longer followed, the prediction must not run on
                // unwatched.
                if let Some(p) = self.cancel_prediction(&urls).await {
                    billing.predict_seconds = predict_seconds(&p);
                }
                return Err(e);
            }
        };
        billing.predict_seconds = predict_seconds(&prediction);
        let status = prediction.get("status").and_then(Value::as_str).unwrap_or_default();
        match status {
            "succeeded" => {}
            "failed" => {
                let error = prediction.get("error").map_or_else(String::new, |e| match e {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
                return Err(ConnectorError::Failed {
                    message: format!("the Replicate prediction failed: {}", http::snippet(&error)),
                    retryable: false,
                });
            }
            other => {
                return Err(ConnectorError::Failed {
                    message: format!("the Replicate prediction ended as `{other}` without being asked to"),
                    retryable: true,
                });
            }
        }
        let mut output = prediction.get("output").cloned().unwrap_or(Value::Null);
        let found = outputs::take_files(&mut output)?;
        let artifacts = outputs::artifacts(&self.client, found, cancel).await?;
        let data = json!({
            "prediction_id": prediction.get("id").cloned().unwrap_or(Value::Null),
            "model": prediction.get("model").cloned().unwrap_or(Value::Null),
            "version": prediction.get("version").cloned().unwrap_or(Value::Null),
            "status": status,
            "output": output,
            "metrics": prediction.get("metrics").cloned().unwrap_or(Value::Null),
        });
        Ok(JobOutput { data, artifacts })
    }

    async fn run_job(
        &self,
        job: &Job,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<JobOutput, ConnectorError> {
        let mut billing = Billing::for_job("replicate", job);
        let result = self.attempt(job, progress, cancel, &mut billing).await;
        billing.settle(&self.config.prices, progress, result)
    }
}

impl Connector for ReplicateConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Replicate
    }

    /// `GET /account`: Replicate's cheapest authenticated request.
    fn check_credentials(&self) -> BoxFuture<'_, Result<(), String>> {
        let url = format!("{}/account", self.config.base_url);
        Box::pin(http::check(self.request(reqwest::Method::GET, &url)))
    }

    fn run<'a>(
        &'a self,
        job: &'a Job,
        progress: &'a ProgressSink,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<JobOutput, ConnectorError>> {
        Box::pin(self.run_job(job, progress, cancel))
    }
}

/// The create request for a job: its URL and body.
fn prediction_request(
    config: &ReplicateConfig,
    service: &str,
    payload: &Value,
) -> Result<(String, Value), ConnectorError> {
    let Value::Object(obj) = payload else {
        return Err(ConnectorError::BadPayload(format!(
            "a replicate payload is a JSON object, not {}",
            json_kind(payload)
        )));
    };
    let mut obj = obj.clone();
    let from_service = match service.split_once(':') {
        Some(("replicate", alias)) => Some(config.aliases.get(alias).cloned().ok_or_else(|| {
            ConnectorError::BadPayload(format!(
                "`{alias}` is not an alias of [connectors.replicate.aliases] on this machine"
            ))
        })?),
        _ => None,
    };
    let named = take_model(&mut obj, config)?;
    let version = take_version(&mut obj)?;
    let deployment = take_deployment(&mut obj)?;
    let model = from_service.or(named);
    if deployment.is_some() && (model.is_some() || version.is_some()) {
        return Err(ConnectorError::BadPayload(
            "a job names a `deployment` or a `model`/`version`, not both".to_owned(),
        ));
    }
    let input = take_input(obj)?;
    let parsed = match &model {
        Some(m) => Some(parse_model_ref(m).ok_or_else(|| {
            ConnectorError::BadPayload(format!(
                "model `{m}` is neither `owner/name[:version]` nor an alias of [connectors.replicate.aliases]"
            ))
        })?),
        None => None,
    };
    if let Some(d) = deployment {
        // A deployment runs the model and hardware its owner set up; the request names neither.
        return Ok((
            format!("{}/deployments/{d}/predictions", config.base_url),
            json!({"input": input}),
        ));
    }
    let version = version.or_else(|| parsed.and_then(|(_, _, v)| v.map(str::to_owned)));
    match (version, parsed) {
        (Some(v), _) => Ok((
            format!("{}/predictions", config.base_url),
            json!({"version": v, "input": input}),
        )),
        (None, Some((owner, name, _))) => Ok((
            format!("{}/models/{owner}/{name}/predictions", config.base_url),
            json!({"input": input}),
        )),
        (None, None) => Err(ConnectorError::BadPayload(
            "a replicate job needs `model` (`owner/name[:version]` or an alias) or `version`".to_owned(),
        )),
    }
}

/// The payload's `model`, an alias of `[connectors.replicate.aliases]` resolved.
fn take_model(obj: &mut Map<String, Value>, config: &ReplicateConfig) -> Result<Option<String>, ConnectorError> {
    match obj.remove("model") {
        None => Ok(None),
        Some(Value::String(m)) => Ok(Some(config.aliases.get(&m).cloned().unwrap_or(m))),
        Some(other) => Err(ConnectorError::BadPayload(format!(
            "`model` must be a string, not {}",
            json_kind(&other)
        ))),
    }
}

/// The payload's `version`: a version id.
fn take_version(obj: &mut Map<String, Value>) -> Result<Option<String>, ConnectorError> {
    match obj.remove("version") {
        None => Ok(None),
        Some(Value::String(v)) if !v.trim().is_empty() => Ok(Some(v.trim().to_owned())),
        Some(other) => Err(ConnectorError::BadPayload(format!(
            "`version` must be a version id string, not {other}"
        ))),
    }
}

/// The payload's `deployment`, as `owner/name`.
fn take_deployment(obj: &mut Map<String, Value>) -> Result<Option<String>, ConnectorError> {
    match obj.remove("deployment") {
        None => Ok(None),
        Some(Value::String(d)) => match parse_model_ref(d.trim()) {
            Some((owner, name, None)) => Ok(Some(format!("{owner}/{name}"))),
            _ => Err(ConnectorError::BadPayload(format!(
                "deployment `{d}` is not `owner/name`"
            ))),
        },
        Some(other) => Err(ConnectorError::BadPayload(format!(
            "`deployment` must be a string, not {}",
            json_kind(&other)
        ))),
    }
}

/// The prediction's input: the payload's `input` object, else what is left of the payload.
fn take_input(mut obj: Map<String, Value>) -> Result<Value, ConnectorError> {
    match obj.remove("input") {
        Some(Value::Object(i)) => Ok(Value::Object(i)),
        Some(other) => Err(ConnectorError::BadPayload(format!(
            "`input` must be a JSON object, not {}",
            json_kind(&other)
        ))),
        None => Ok(Value::Object(obj)),
    }
}

/// The prediction's URLs; `get` and `cancel` default to Replicate's documented paths.
fn prediction_urls(prediction: &Value, base_url: &str) -> Result<Urls, ConnectorError> {
    let id = prediction.get("id").and_then(Value::as_str);
    let url = |name: &str| {
        prediction
            .pointer(&format!("/urls/{name}"))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    let by_id = |suffix: &str| id.map(|id| format!("{base_url}/predictions/{id}{suffix}"));
    match (
        url("get").or_else(|| by_id("")),
        url("cancel").or_else(|| by_id("/cancel")),
    ) {
        (Some(get), Some(cancel)) => Ok(Urls {
            get,
            cancel,
            stream: url("stream"),
        }),
        _ => Err(ConnectorError::Failed {
            message: format!(
                "Replicate answered without a prediction id or urls: {}",
                http::snippet(&prediction.to_string())
            ),
            retryable: true,
        }),
    }
}

/// The predict time Replicate bills (`metrics.predict_time`, seconds), whatever the outcome.
fn predict_seconds(prediction: &Value) -> f64 {
    prediction
        .pointer("/metrics/predict_time")
        .and_then(Value::as_f64)
        .unwrap_or(0.0)
}

fn terminal(prediction: &Value) -> bool {
    matches!(
        prediction.get("status").and_then(Value::as_str),
        Some("succeeded" | "failed" | "canceled")
    )
}

/// Reports the logs' last percentage when the logs grew.
fn report_logs(prediction: &Value, seen: &mut usize, progress: &ProgressSink) {
    let Some(logs) = prediction.get("logs").and_then(Value::as_str) else {
        return;
    };
    if logs.len() == *seen {
        return;
    }
    *seen = logs.len();
    if let Some(p) = last_percent(logs) {
        progress.percent(p.min(99.0), "running on Replicate");
    }
}

/// The last `NN%` in some logs (tqdm progress bars print ` 45%|####      | 9/20`).
fn last_percent(logs: &str) -> Option<f64> {
    let bytes = logs.as_bytes();
    let mut i = bytes.len();
    while i > 0 {
        i -= 1;
        if bytes[i] != b'%' {
            continue;
        }
        let end = i;
        let mut start = end;
        while start > 0 && (bytes[start - 1].is_ascii_digit() || bytes[start - 1] == b'.') {
            start -= 1;
        }
        if start < end {
            if let Ok(v) = logs[start..end].parse::<f64>() {
                if (0.0..=100.0).contains(&v) {
                    return Some(v);
                }
            }
        }
    }
    None
}

/// Replicate's error body (`{"title", "detail", "status"}`), as one message.
fn api_error_message(text: &str) -> String {
    let v: Option<Value> = serde_json::from_str(text).ok();
    let get = |k: &str| {
        v.as_ref()
            .and_then(|v| v.get(k))
            .and_then(Value::as_str)
            .map(str::to_owned)
    };
    match (get("title"), get("detail")) {
        (Some(t), Some(d)) => format!("{t}: {d}"),
        (None, Some(d)) => d,
        _ => text.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_TOML, load_str};
    use std::collections::BTreeMap;

    fn config() -> ReplicateConfig {
        let file = "[connectors.replicate]\nbase_url = \"http://r/v1\"\n[connectors.replicate.aliases]\nflux = \"bfl/flux-schnell\"\nsdxl = \"stability/sdxl:abc123\"\n";
        let _ = DEFAULT_TOML;
        load_str(Some(("f.toml", file)), &BTreeMap::<&str, &str>::new())
            .expect("valid")
            .plan
            .replicate
    }

    #[test]
    fn requests_follow_the_model_reference() {
        let c = config();
        let (url, body) = prediction_request(&c, "replicate", &json!({"model": "a/b", "input": {"p": 1}})).unwrap();
        assert_eq!(url, "http://r/v1/models/a/b/predictions");
        assert_eq!(body, json!({"input": {"p": 1}}));
        let (url, body) = prediction_request(&c, "replicate", &json!({"model": "sdxl", "prompt": "x"})).unwrap();
        assert_eq!(url, "http://r/v1/predictions");
        assert_eq!(body, json!({"version": "abc123", "input": {"prompt": "x"}}));
        let (url, _) = prediction_request(&c, "replicate:flux", &json!({"input": {}})).unwrap();
        assert_eq!(url, "http://r/v1/models/bfl/flux-schnell/predictions");
        let (url, body) = prediction_request(&c, "replicate", &json!({"version": "v9", "input": {}})).unwrap();
        assert_eq!(
            (url.as_str(), &body["version"]),
            ("http://r/v1/predictions", &json!("v9"))
        );
        for bad in [
            json!({"input": {}}),
            json!({"model": "nope"}),
            json!({"model": "a/b", "input": 3}),
            json!([1]),
        ] {
            assert!(matches!(
                prediction_request(&c, "replicate", &bad),
                Err(ConnectorError::BadPayload(_))
            ));
        }
        assert!(prediction_request(&c, "replicate:unknown", &json!({})).is_err());
        let (url, body) = prediction_request(
            &c,
            "replicate",
            &json!({"deployment": "acme/sdxl-prod", "input": {"p": 1}}),
        )
        .unwrap();
        assert_eq!(url, "http://r/v1/deployments/acme/sdxl-prod/predictions");
        assert_eq!(body, json!({"input": {"p": 1}}));
        for bad in [
            json!({"deployment": "acme", "input": {}}),
            json!({"deployment": "acme/x:v1", "input": {}}),
            json!({"deployment": "acme/x", "model": "a/b", "input": {}}),
        ] {
            assert!(
                matches!(
                    prediction_request(&c, "replicate", &bad),
                    Err(ConnectorError::BadPayload(_))
                ),
                "{bad}"
            );
        }
    }

    #[test]
    fn percentages_come_from_the_last_progress_bar() {
        assert_eq!(last_percent("start\n 10%|#  | 1/10\n 45%|####  | 9/20\n"), Some(45.0));
        assert_eq!(last_percent("no bar"), None);
        assert_eq!(last_percent("100%|##########| 20/20"), Some(100.0));
        assert_eq!(last_percent("used 250% cpu"), None);
    }

    #[test]
    fn error_bodies_and_urls() {
        assert_eq!(
            api_error_message(r#"{"title":"Invalid version","detail":"not permitted","status":422}"#),
            "Invalid version: not permitted"
        );
        let u = prediction_urls(&json!({"id": "p1"}), "http://r/v1").unwrap();
        assert_eq!(u.cancel, "http://r/v1/predictions/p1/cancel");
        assert!(prediction_urls(&json!({}), "http://r/v1").is_err());
    }
}

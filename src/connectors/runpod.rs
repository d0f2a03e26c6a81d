//! The RunPod connector: a job is one job of a RunPod serverless (queue-based) endpoint.
//!
//! The payload is `{"endpoint_id": "...", "input": {..}}`; the endpoint defaults to
//! `[connectors.runpod] endpoint_id`, and without `input` the rest of the payload is the input
//! (`policy`, `webhook` and `s3Config` are passed through beside it). The job is submitted with
//! `POST /<endpoint>/run` and followed with `GET /<endpoint>/status/<id>` until it is
//! `COMPLETED`, `FAILED`, `CANCELLED` or `TIMED_OUT`; a payload with `"sync": true` is
//! submitted the same way (never `/runsync`, which hides the job's id until it is done) and its
//! status read every 100 ms during its first `sync_wait`. On cancellation, and whenever the job
//! stops being followed, `POST /<endpoint>/cancel/<id>` is sent before returning. A `/run`
//! answered with a 5xx or not at all is not sent again (see `http::send_retrying`). The output's files, at any depth (URLs, worker-comfyui's base64 images; see
//! `connectors/outputs.rs`), become artifacts, which the worker stores through the job's `ctx`; the
//! rest of the output stays in the result with a `billing` record whose predict
//! time is RunPod's `executionTime`.

use std::sync::Arc;
use std::time::Duration;

use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use super::http::{self, Backoff, Retrying};
use super::json_kind;
use super::limits::Limiter;
use super::outputs;
use super::{Billing, Connector, ConnectorError, Job, JobOutput, ProgressSink, or_cancelled};
use crate::config::{ConnectorKind, RunpodConfig, Secret, valid_endpoint_id};

/// Runs jobs on RunPod serverless endpoints.
#[derive(Debug, Clone)]
pub struct RunpodConnector {
    config: RunpodConfig,
    api_key: Option<Secret>,
    client: reqwest::Client,
    limiter: Option<Arc<Limiter>>,
}

/// How often a sync job's status is read during its `sync_wait` (at most).
const SYNC_POLL: Duration = Duration::from_millis(100);

/// RunPod's `executionTime` (ms) in seconds: what it bills, whatever the job's outcome.
fn execution_seconds(status: &Value) -> f64 {
    status.get("executionTime").and_then(Value::as_f64).unwrap_or(0.0) / 1000.0
}

/// Keys of a payload sent beside `input` rather than in it.
const BESIDE_INPUT: [&str; 3] = ["policy", "webhook", "s3Config"];

impl RunpodConnector {
    /// A connector for `config.base_url` with the key from `config.api_key_env`.
    pub fn new(config: RunpodConfig, api_key: Option<String>) -> Self {
        RunpodConnector {
            config,
            api_key: api_key.filter(|k| !k.trim().is_empty()).map(Secret::new),
            client: http::client(),
            limiter: None,
        }
    }

    /// Sends every endpoint run through `limiter` first (the fleet-wide limits of this API).
    pub fn with_limiter(mut self, limiter: Arc<Limiter>) -> Self {
        self.limiter = Some(limiter);
        self
    }

    fn request(&self, method: reqwest::Method, url: &str) -> reqwest::RequestBuilder {
        let req = self.client.request(method, url);
        match &self.api_key {
            Some(k) => req.bearer_auth(k.expose()),
            None => req,
        }
    }

    /// How a request is sent: `creates` for the `/run` that starts paid work (limited, and
    /// never repeated once RunPod may have acted on it), else a read.
    fn retrying<'a>(&'a self, what: &'a str, customer: &'a str, creates: Option<&'a ProgressSink>) -> Retrying<'a> {
        Retrying {
            what,
            api: "runpod",
            attempts: self.config.max_attempts,
            backoff: Backoff::doubling(self.config.backoff_initial, self.config.backoff_max),
            timeout: Some(self.config.request_timeout),
            limiter: creates.and(self.limiter.as_deref().map(|l| (l, customer))),
            creates: creates.map(|_| "runpod"),
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

    /// Asks RunPod to stop the job, then reads its status once for the execution time it bills
    /// (`None` when either fails); bounded, so a cancelled job returns promptly.
    async fn cancel_job(&self, endpoint: &str, id: &str) -> Option<Value> {
        let url = format!("{}/{endpoint}/cancel/{id}", self.config.base_url);
        let sent = self
            .request(reqwest::Method::POST, &url)
            .timeout(Duration::from_secs(5))
            .send()
            .await;
        match sent {
            Ok(r) if r.status().is_success() => tracing::info!(%url, "cancelled the RunPod job"),
            Ok(r) => tracing::warn!(%url, status = %r.status(), "RunPod refused to cancel the job"),
            Err(e) => tracing::warn!(%url, error = %e, "failed to cancel the RunPod job"),
        }
        let url = format!("{}/{endpoint}/status/{id}", self.config.base_url);
        let read = self
            .request(reqwest::Method::GET, &url)
            .timeout(Duration::from_secs(5))
            .send()
            .await
            .ok()?;
        read.json::<Value>().await.ok()
    }

    async fn follow(
        &self,
        endpoint: &str,
        mut status: Value,
        customer: &str,
        sync: bool,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<Value, ConnectorError> {
        let id = job_id(&status)?;
        let url = format!("{}/{endpoint}/status/{id}", self.config.base_url);
        // A sync job is short: its status is read often for its first `sync_wait`.
        let fast_until = sync.then(|| std::time::Instant::now() + self.config.sync_wait);
        loop {
            match status.get("status").and_then(Value::as_str).unwrap_or_default() {
                "COMPLETED" | "FAILED" | "CANCELLED" | "TIMED_OUT" => return Ok(status),
                "IN_QUEUE" => progress.percent(1.0, "queued at the RunPod endpoint"),
                _ => {
                    let p = status.get("output").and_then(progress_of).unwrap_or(5.0);
                    progress.percent(p.min(99.0), "running on RunPod");
                }
            }
            let interval = match fast_until {
                Some(t) if std::time::Instant::now() < t => self.config.poll_interval.min(SYNC_POLL),
                _ => self.config.poll_interval,
            };
            tokio::select! {
                () = cancel.cancelled() => return Err(ConnectorError::Cancelled),
                () = tokio::time::sleep(interval) => {}
            }
            let resp = http::send_retrying(
                || self.request(reqwest::Method::GET, &url),
                self.retrying("read a RunPod job status", customer, None),
                api_error_message,
                cancel,
            )
            .await?;
            status = self.json(resp, "read a RunPod job status", cancel).await?;
        }
    }

    /// Runs one attempt, recording what RunPod bills in `billing` as it goes, so that a
    /// failed or cancelled attempt is billed too.
    async fn attempt(
        &self,
        job: &Job,
        progress: &ProgressSink,
        cancel: &CancellationToken,
        billing: &mut Billing,
    ) -> Result<JobOutput, ConnectorError> {
        let (endpoint, body, sync) = run_request(&self.config, &job.payload)?;
        // Sync jobs go through `/run` too: the job's id is known before any wait, so a cancel,
        // a time limit or a forced stop always reaches RunPod (`/runsync` hides it until done).
        let url = format!("{}/{endpoint}/run", self.config.base_url);
        progress.percent(0.0, "submitting to the RunPod endpoint");
        let resp = http::send_retrying(
            || self.request(reqwest::Method::POST, &url).json(&body),
            self.retrying("submit a RunPod job", &job.customer_id, Some(progress)),
            api_error_message,
            cancel,
        )
        .await?;
        billing.requests += 1;
        let submitted = self
            .json(resp, "read the submitted RunPod job", cancel)
            .await
            .map_err(|e| match e {
                ConnectorError::Cancelled => e,
                e => http::maybe_created("runpod", e),
            })?;
        let id = job_id(&submitted)?;
        let followed = self
            .follow(&endpoint, submitted, &job.customer_id, sync, progress, cancel)
            .await;
        let status = match followed {
            Ok(s) => s,
            Err(e) => {
                // Whether cancelled or no longer followed, the job must not run on unwatched.
                if let Some(s) = self.cancel_job(&endpoint, &id).await {
                    billing.predict_seconds = execution_seconds(&s);
                }
                return Err(e);
            }
        };
        billing.predict_seconds = execution_seconds(&status);
        let state = status.get("status").and_then(Value::as_str).unwrap_or_default();
        let error = || {
            status.get("error").map_or_else(String::new, |e| match e {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
        };
        match state {
            "COMPLETED" => {}
            "FAILED" => {
                return Err(ConnectorError::Failed {
                    message: format!("the RunPod job failed: {}", http::snippet(&error())),
                    retryable: false,
                });
            }
            other => {
                return Err(ConnectorError::Failed {
                    message: format!("the RunPod job ended as {other}: {}", http::snippet(&error())),
                    retryable: true,
                });
            }
        }
        let mut output = status.get("output").cloned().unwrap_or(Value::Null);
        let found = outputs::take_files(&mut output)?;
        let artifacts = outputs::artifacts(&self.client, found, cancel).await?;
        let data = json!({
            "runpod_id": id,
            "endpoint_id": endpoint,
            "status": state,
            "output": output,
            "delay_time_ms": status.get("delayTime").cloned().unwrap_or(Value::Null),
            "execution_time_ms": status.get("executionTime").cloned().unwrap_or(Value::Null),
        });
        Ok(JobOutput { data, artifacts })
    }

    async fn run_job(
        &self,
        job: &Job,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<JobOutput, ConnectorError> {
        let mut billing = Billing::for_job("runpod", job);
        let result = self.attempt(job, progress, cancel, &mut billing).await;
        billing.settle(&self.config.prices, progress, result)
    }
}

impl Connector for RunpodConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Runpod
    }

    /// `GET /<endpoint>/health` of the default endpoint; without one a real job is the check.
    fn check_credentials(&self) -> BoxFuture<'_, Result<(), String>> {
        let Some(endpoint) = &self.config.endpoint_id else {
            return Box::pin(async { Ok(()) });
        };
        let url = format!("{}/{endpoint}/health", self.config.base_url);
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

/// The endpoint, the `/run` body and whether the job is a short (`sync`) one, from a payload.
fn run_request(config: &RunpodConfig, payload: &Value) -> Result<(String, Value, bool), ConnectorError> {
    let Value::Object(obj) = payload else {
        return Err(ConnectorError::BadPayload(format!(
            "a runpod payload is a JSON object, not {}",
            json_kind(payload)
        )));
    };
    let mut obj = obj.clone();
    let endpoint = match obj.remove("endpoint_id") {
        Some(Value::String(e)) => e.trim().to_owned(),
        Some(other) => {
            return Err(ConnectorError::BadPayload(format!(
                "`endpoint_id` must be a string, not {}",
                json_kind(&other)
            )));
        }
        None => config.endpoint_id.clone().ok_or_else(|| {
            ConnectorError::BadPayload(
                "the payload names no `endpoint_id` and [connectors.runpod] endpoint_id is not set".to_owned(),
            )
        })?,
    };
    if !valid_endpoint_id(&endpoint) {
        return Err(ConnectorError::BadPayload(format!(
            "`{endpoint}` is not a RunPod endpoint id"
        )));
    }
    let sync = match obj.remove("sync") {
        None => false,
        Some(Value::Bool(b)) => b,
        Some(other) => {
            return Err(ConnectorError::BadPayload(format!(
                "`sync` must be true or false, not {other}"
            )));
        }
    };
    let mut body = Map::new();
    for key in BESIDE_INPUT {
        if let Some(v) = obj.remove(key) {
            body.insert(key.to_owned(), v);
        }
    }
    let input = match obj.remove("input") {
        Some(Value::Object(i)) => Value::Object(i),
        Some(other) => {
            return Err(ConnectorError::BadPayload(format!(
                "`input` must be a JSON object, not {}",
                json_kind(&other)
            )));
        }
        None => Value::Object(obj),
    };
    body.insert("input".to_owned(), input);
    Ok((endpoint, Value::Object(body), sync))
}

fn job_id(status: &Value) -> Result<String, ConnectorError> {
    status
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| {
            !id.is_empty()
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
        })
        .map(str::to_owned)
        .ok_or_else(|| ConnectorError::Failed {
            message: format!(
                "RunPod answered without a job id: {}",
                http::snippet(&status.to_string())
            ),
            retryable: true,
        })
}

/// A percentage from a progress update (`runpod.serverless.progress_update`): a number, a
/// text holding `NN%`, or an object with it under `progress` or `percent` (`{"progress": 40}`).
fn progress_of(output: &Value) -> Option<f64> {
    match output {
        Value::Object(map) => map.get("progress").or_else(|| map.get("percent")).and_then(progress_of),
        Value::Number(n) => n.as_f64().filter(|p| (0.0..=100.0).contains(p)),
        Value::String(s) => {
            let i = s.find('%')?;
            let start = s[..i]
                .rfind(|c: char| !(c.is_ascii_digit() || c == '.'))
                .map_or(0, |j| j + 1);
            s[start..i].parse::<f64>().ok().filter(|p| (0.0..=100.0).contains(p))
        }
        _ => None,
    }
}

/// RunPod's error body (`{"error": "..."}`), or the body.
fn api_error_message(text: &str) -> String {
    serde_json::from_str::<Value>(text)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use std::collections::BTreeMap;

    fn config(endpoint: Option<&str>) -> RunpodConfig {
        let file = match endpoint {
            Some(e) => format!("[connectors.runpod]\nendpoint_id = \"{e}\"\n"),
            None => String::new(),
        };
        load_str(Some(("f.toml", &file)), &BTreeMap::<&str, &str>::new())
            .expect("valid")
            .plan
            .runpod
    }

    #[test]
    fn run_requests_from_payloads() {
        let (e, body, sync) =
            run_request(&config(Some("ep1")), &json!({"prompt": "x", "webhook": "http://h"})).unwrap();
        assert_eq!(e, "ep1");
        assert_eq!(body, json!({"input": {"prompt": "x"}, "webhook": "http://h"}));
        assert!(!sync);
        let (e, body, sync) = run_request(
            &config(None),
            &json!({"endpoint_id": "ep2", "input": {"a": 1}, "sync": true}),
        )
        .unwrap();
        assert_eq!((e.as_str(), body, sync), ("ep2", json!({"input": {"a": 1}}), true));
        for bad in [
            json!({"input": {}}),
            json!({"endpoint_id": "../x"}),
            json!({"endpoint_id": "e", "input": []}),
            json!({"endpoint_id": "e", "sync": "yes"}),
        ] {
            assert!(
                matches!(run_request(&config(None), &bad), Err(ConnectorError::BadPayload(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn progress_and_urls() {
        assert_eq!(progress_of(&json!(40)), Some(40.0));
        assert_eq!(progress_of(&json!("step 3: 62.5% done")), Some(62.5));
        assert_eq!(progress_of(&json!("working")), None);
        assert_eq!(progress_of(&json!({"progress": 40})), Some(40.0));
        assert_eq!(progress_of(&json!({"percent": "12%", "stage": "sampling"})), Some(12.0));
        assert_eq!(progress_of(&json!({"stage": "sampling"})), None);
        assert_eq!(api_error_message(r#"{"error":"bad input"}"#), "bad input");
    }
}

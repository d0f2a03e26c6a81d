//! The A1111 connector: runs txt2img and img2img on the Stable Diffusion WebUI (AUTOMATIC1111)
//! server of this worker's GPU through its `/sdapi/v1` API.
//!
//! The payload is the WebUI's own request body; `endpoint` (`txt2img` or `img2img`, removed
//! before sending) chooses the call, and without it a payload with `init_images` goes to
//! img2img. While the request runs, `GET /sdapi/v1/progress` is polled for progress. The
//! base64 `images` of the answer become artifacts; `parameters` and `info` become the result.
//! Cancellation sends `POST /sdapi/v1/interrupt` and drops the request.
//!
//! A progress reading that moved (fraction, sampling step, job number) is the WebUI's word about
//! the job; a request with no such word for the stall timeout is interrupted and fails
//! retryably as stalled ([`super::stall`]).

use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use url::Url;

use super::http;
use super::json_kind;
use super::stall::StallClock;
use super::{Artifact, ArtifactBody, Connector, ConnectorError, Job, JobOutput, Progress, ProgressSink};
use crate::config::ConnectorKind;

/// How often progress is polled while an image is generated.
const POLL_EVERY: Duration = Duration::from_millis(500);

/// Runs txt2img/img2img on one A1111 server.
#[derive(Debug, Clone)]
pub struct A1111Connector {
    base: Url,
    client: reqwest::Client,
    poll_every: Duration,
    stall_timeout: Duration,
}

impl A1111Connector {
    /// A connector for the WebUI at `base` (e.g. `http://127.0.0.1:7860`).
    pub fn new(base: Url) -> Self {
        A1111Connector {
            base,
            client: http::client(),
            poll_every: POLL_EVERY,
            stall_timeout: super::stall::DEFAULT_TIMEOUT,
        }
    }

    /// The same connector giving up on a request after `timeout` without its progress moving
    /// (a job's `stall_timeout_seconds` may raise it).
    pub fn with_stall_timeout(mut self, timeout: Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Whether the WebUI answers its health check (`/sdapi/v1/progress`) within a few seconds.
    async fn answers(&self) -> bool {
        http::answers(&self.client, self.url("/sdapi/v1/progress")).await
    }

    /// The same connector polling progress at another period (tests use a short one).
    pub fn with_poll_period(mut self, every: Duration) -> Self {
        self.poll_every = every;
        self
    }

    fn url(&self, path: &str) -> Url {
        let mut u = self.base.clone();
        u.set_path(path);
        u.set_query(None);
        u
    }

    /// Polls progress until the job stalls (its readings stop moving for the clock's timeout);
    /// returns the clock then.
    async fn poll_progress(&self, progress: &ProgressSink, mut clock: StallClock) -> StallClock {
        let mut tick = tokio::time::interval(self.poll_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut url = self.url("/sdapi/v1/progress");
        url.set_query(Some("skip_current_image=true"));
        // The WebUI reports 0 again between jobs (and just before the answer arrives); keep
        // progress monotonic.
        let mut best = 0.0;
        let mut last_reading = None;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = clock.expired() => return clock,
            }
            let read = async {
                let resp = self
                    .client
                    .get(url.clone())
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await
                    .ok()?;
                resp.json::<Value>().await.ok()
            };
            let v = tokio::select! {
                v = read => v,
                () = clock.expired() => return clock,
            };
            let Some(v) = v else { continue };
            let reading = moving_parts(&v);
            if last_reading.as_ref() != Some(&reading) {
                clock.heard();
                last_reading = Some(reading);
            }
            if let Some(p) = progress_of(&v).filter(|p| p.percent >= best) {
                best = p.percent;
                progress.report(p);
            }
        }
    }

    async fn interrupt(&self) {
        let sent = self
            .client
            .post(self.url("/sdapi/v1/interrupt"))
            .timeout(Duration::from_secs(2))
            .send()
            .await;
        if let Err(e) = sent {
            tracing::warn!(error = %e, "failed to interrupt A1111");
        }
    }

    async fn run_job(
        &self,
        job: &Job,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<JobOutput, ConnectorError> {
        let (endpoint, body) = request_of(&job.payload)?;
        let request = async {
            let resp = self
                .client
                .post(self.url(&format!("/sdapi/v1/{endpoint}")))
                .json(&body)
                .send()
                .await
                .map_err(|e| http::send_error(&format!("call A1111 {endpoint}"), e))?;
            let status = resp.status();
            let text = resp
                .text()
                .await
                .map_err(|e| http::send_error(&format!("read A1111's {endpoint} answer"), e))?;
            if !status.is_success() {
                return Err(a1111_error(endpoint, status, &text));
            }
            serde_json::from_str::<Value>(&text).map_err(|e| ConnectorError::Unavailable {
                message: format!("A1111 answered {endpoint} with something that is not JSON"),
                source: Some(Box::new(e)),
            })
        };
        progress.percent(0.0, format!("{endpoint} submitted"));
        let answer = tokio::select! {
            biased;
            () = cancel.cancelled() => {
                self.interrupt().await;
                return Err(ConnectorError::Cancelled);
            }
            answer = request => answer?,
            clock = self.poll_progress(progress, StallClock::start(self.stall_timeout, job)) => {
                let silent_for = clock.silent_for();
                // Both at once, so the stall is declared within a few seconds of its deadline.
                let ((), answers) = tokio::join!(self.interrupt(), self.answers());
                let e = clock.stalled("a1111", silent_for, answers);
                tracing::warn!(job_id = %job.id, error = %e, "the request stalled; interrupted it");
                return Err(e);
            }
        };
        let images = answer
            .get("images")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        let mut artifacts = Vec::with_capacity(images.len());
        for (i, image) in images.iter().enumerate() {
            let Some(b64) = image.as_str() else { continue };
            // Some extensions return data URLs.
            let b64 = b64.split_once("base64,").map_or(b64, |(_, rest)| rest);
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(b64.trim())
                .map_err(|e| ConnectorError::Failed {
                    message: format!("A1111 returned image {i} that is not valid base64: {e}"),
                    retryable: false,
                })?;
            let (ext, content_type) = sniff_image(&bytes);
            artifacts.push(Artifact {
                name: format!("{endpoint}_{i}.{ext}"),
                content_type: content_type.to_owned(),
                body: ArtifactBody::Bytes(Bytes::from(bytes)),
            });
        }
        // `info` is a JSON document inside a string; keep it structured when it parses.
        let info = match answer.get("info") {
            Some(Value::String(s)) => serde_json::from_str(s).unwrap_or(Value::String(s.clone())),
            Some(other) => other.clone(),
            None => Value::Null,
        };
        Ok(JobOutput {
            data: serde_json::json!({
                "endpoint": endpoint,
                "parameters": answer.get("parameters").cloned().unwrap_or(Value::Null),
                "info": info,
            }),
            artifacts,
        })
    }
}

impl Connector for A1111Connector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::A1111
    }

    fn run<'a>(
        &'a self,
        job: &'a Job,
        progress: &'a ProgressSink,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<JobOutput, ConnectorError>> {
        Box::pin(self.run_job(job, progress, cancel))
    }

    /// Idle when `/sdapi/v1/progress` reports no job (`state.job_count` 0): an interrupted
    /// generation counts until the WebUI has stopped it.
    fn idle(&self) -> BoxFuture<'_, Result<bool, ConnectorError>> {
        Box::pin(async {
            let resp = self
                .client
                .get(self.url("/sdapi/v1/progress"))
                .timeout(Duration::from_secs(5))
                .send()
                .await
                .map_err(|e| http::send_error("read A1111's progress", e))?;
            let v: Value = resp
                .json()
                .await
                .map_err(|e| http::send_error("parse A1111's progress", e))?;
            Ok(v.pointer("/state/job_count").and_then(Value::as_u64).unwrap_or(0) == 0)
        })
    }
}

/// The endpoint and request body a payload asks for.
fn request_of(payload: &Value) -> Result<(&'static str, Value), ConnectorError> {
    let Value::Object(obj) = payload else {
        return Err(ConnectorError::BadPayload(format!(
            "an A1111 payload is a JSON object, not {}",
            json_kind(payload)
        )));
    };
    let mut body = obj.clone();
    let endpoint = match body.remove("endpoint") {
        None => {
            if body.contains_key("init_images") {
                "img2img"
            } else {
                "txt2img"
            }
        }
        Some(Value::String(e)) if e == "txt2img" => "txt2img",
        Some(Value::String(e)) if e == "img2img" => "img2img",
        Some(other) => {
            return Err(ConnectorError::BadPayload(format!(
                "`endpoint` must be \"txt2img\" or \"img2img\", not {other}"
            )));
        }
    };
    if endpoint == "img2img" && !body.get("init_images").is_some_and(Value::is_array) {
        return Err(ConnectorError::BadPayload(
            "img2img needs `init_images`, a list of base64 images".to_owned(),
        ));
    }
    Ok((endpoint, Value::Object(body)))
}

/// The parts of a progress reading that move while the WebUI works on a job (the ETA is left
/// out: it changes on every reading, even of a job that hangs).
fn moving_parts(v: &Value) -> [Value; 4] {
    let state = |k: &str| v.pointer(&format!("/state/{k}")).cloned().unwrap_or(Value::Null);
    [
        v.get("progress").cloned().unwrap_or(Value::Null),
        state("sampling_step"),
        state("job_no"),
        state("job_timestamp"),
    ]
}

/// Reads `/sdapi/v1/progress`; `None` while nothing runs.
fn progress_of(v: &Value) -> Option<Progress> {
    let fraction = v.get("progress").and_then(Value::as_f64)?;
    let state = v.get("state");
    let idle = state.and_then(|s| s.get("job_count")).and_then(Value::as_u64) == Some(0);
    if idle && fraction == 0.0 {
        return None;
    }
    let step = state.and_then(|s| s.get("sampling_step")).and_then(Value::as_u64);
    let steps = state.and_then(|s| s.get("sampling_steps")).and_then(Value::as_u64);
    let eta = v.get("eta_relative").and_then(Value::as_f64).unwrap_or(0.0);
    Some(Progress {
        percent: (fraction * 100.0).min(99.0),
        message: match (step, steps) {
            (Some(a), Some(b)) if b > 0 => format!("sampling step {a} of {b}, eta {eta:.1}s"),
            _ => format!("eta {eta:.1}s"),
        },
        current_step: step.map(|s| s as u32),
        total_steps: steps.map(|s| s as u32),
    })
}

/// Classifies an A1111 error answer: 422 and other 4xx mean the request is wrong; an
/// out-of-memory error is the GPU's (the machine's fault; it may succeed later); other 5xx are
/// failures of this attempt.
fn a1111_error(endpoint: &str, status: reqwest::StatusCode, text: &str) -> ConnectorError {
    let v: Value = serde_json::from_str(text).unwrap_or(Value::Null);
    let errors = v
        .get("errors")
        .and_then(Value::as_str)
        .or_else(|| v.get("error").and_then(Value::as_str))
        .unwrap_or_default();
    let lower = format!("{errors} {text}").to_ascii_lowercase();
    if status.is_server_error() && (lower.contains("out of memory") || lower.contains("outofmemory")) {
        return ConnectorError::MachineFault {
            message: format!("A1111 {endpoint} ran out of GPU memory: {}", http::snippet(text)),
        };
    }
    http::status_error(&format!("A1111 {endpoint}"), status, text)
}

/// The extension and MIME type of an image from its first bytes.
fn sniff_image(bytes: &[u8]) -> (&'static str, &'static str) {
    if bytes.starts_with(b"\x89PNG") {
        ("png", "image/png")
    } else if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        ("jpg", "image/jpeg")
    } else if bytes.len() > 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        ("webp", "image/webp")
    } else if bytes.starts_with(b"GIF8") {
        ("gif", "image/gif")
    } else {
        ("bin", "application/octet-stream")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::ErrorClass;
    use serde_json::json;

    #[test]
    fn endpoint_is_chosen_from_the_payload() {
        assert_eq!(request_of(&json!({"prompt": "cat"})).unwrap().0, "txt2img");
        let (e, body) = request_of(&json!({"endpoint": "img2img", "init_images": ["x"]})).unwrap();
        assert_eq!(e, "img2img");
        assert!(body.get("endpoint").is_none());
        assert_eq!(request_of(&json!({"init_images": []})).unwrap().0, "img2img");
        assert!(request_of(&json!({"endpoint": "img2img"})).is_err());
        assert!(request_of(&json!({"endpoint": "upscale"})).is_err());
        assert!(request_of(&json!(null)).is_err());
    }

    #[test]
    fn progress_is_read() {
        let p = progress_of(&json!({"progress": 0.5, "eta_relative": 2.0,
            "state": {"sampling_step": 10, "sampling_steps": 20}}))
        .unwrap();
        assert_eq!(p.percent, 50.0);
        assert_eq!((p.current_step, p.total_steps), (Some(10), Some(20)));
        assert!(progress_of(&json!({})).is_none());
        assert!(progress_of(&json!({"progress": 0.0, "state": {"job_count": 0}})).is_none());
    }

    #[test]
    fn errors_are_classified() {
        use reqwest::StatusCode;
        let oom = a1111_error(
            "txt2img",
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":"OutOfMemoryError","errors":"CUDA out of memory"}"#,
        );
        assert_eq!(oom.class(), ErrorClass::Retryable);
        let bad = a1111_error("txt2img", StatusCode::UNPROCESSABLE_ENTITY, r#"{"detail":[]}"#);
        assert_eq!(bad.class(), ErrorClass::Fatal);
        assert_eq!(sniff_image(b"\x89PNG\r\n"), ("png", "image/png"));
    }
}

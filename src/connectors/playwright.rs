//! The Playwright connector: renders `playwright`, `p5` and `html_render` jobs on the render
//! service of this worker's GPU (the Node server the `playwright` installer puts in the
//! workspace) and returns the PNG as an artifact.
//!
//! A `p5` job's payload carries the sketch as `code`, an `html_render` job's the markup as
//! `html`; a `playwright` job names its `kind` (`p5`, `html` or `url`) or is recognised by which
//! of `code`, `html` and `url` it has. `width`, `height`, `wait_ms` and `device_scale` pass
//! through; the service checks them and its 4xx answers fail the job without retry.
//! Cancellation drops the request, which closes the page's context in the service.
//!
//! The render service answers a render in one response and says nothing before it, so its
//! answer is its only word about the job: a render unanswered for the stall timeout is dropped
//! and fails retryably as stalled ([`super::stall`]), noting whether `/health` still answers.

use futures_util::future::BoxFuture;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use url::Url;

use super::http;
use super::stall::StallClock;
use super::{Artifact, ArtifactBody, Connector, ConnectorError, Job, JobOutput, ProgressSink, or_cancelled};
use crate::config::ConnectorKind;

/// Renders jobs on one render service.
#[derive(Debug, Clone)]
pub struct PlaywrightConnector {
    base: Url,
    client: reqwest::Client,
    stall_timeout: std::time::Duration,
}

impl PlaywrightConnector {
    /// A connector for the render service at `base` (e.g. `http://127.0.0.1:9400`).
    pub fn new(base: Url) -> Self {
        PlaywrightConnector {
            base,
            client: http::client(),
            stall_timeout: super::stall::DEFAULT_TIMEOUT,
        }
    }

    /// The same connector giving up on a render unanswered after `timeout` (a job's
    /// `stall_timeout_seconds` may raise it).
    pub fn with_stall_timeout(mut self, timeout: std::time::Duration) -> Self {
        self.stall_timeout = timeout;
        self
    }

    /// Whether the render service answers its health check (`/health`) within a few seconds.
    async fn answers(&self) -> bool {
        let mut url = self.base.clone();
        url.set_path("/health");
        http::answers(&self.client, url).await
    }

    /// Renders unless the service stays silent for the stall timeout.
    async fn render_watched(&self, job: &Job, progress: &ProgressSink) -> Result<JobOutput, ConnectorError> {
        let clock = StallClock::start(self.stall_timeout, job);
        tokio::select! {
            r = self.render(job, progress) => r,
            () = clock.expired() => {
                let silent_for = clock.silent_for();
                let e = clock.stalled("playwright", silent_for, self.answers().await);
                tracing::warn!(job_id = %job.id, error = %e, "the render stalled; dropped it");
                Err(e)
            }
        }
    }
}

/// The render request for a job, or why the payload does not make one.
pub(crate) fn render_request(service: &str, payload: &Value) -> Result<Value, String> {
    let p = payload
        .as_object()
        .ok_or_else(|| "the payload must be a JSON object".to_owned())?;
    let kind = match service {
        "p5" => "p5",
        "html_render" => "html",
        _ => match p.get("kind").and_then(Value::as_str) {
            Some(k @ ("p5" | "html" | "url")) => k,
            Some(other) => {
                return Err(format!("kind `{other}` is not p5, html or url"));
            }
            None if p.contains_key("url") => "url",
            None if p.contains_key("html") => "html",
            None if p.contains_key("code") || p.contains_key("sketch") => "p5",
            None => {
                return Err("a playwright job needs `kind` or one of `code`, `html`, `url`".to_owned());
            }
        },
    };
    let (field, value) = match kind {
        "p5" => ("code", p.get("code").or_else(|| p.get("sketch"))),
        "html" => ("html", p.get("html")),
        _ => ("url", p.get("url")),
    };
    let Some(Value::String(source)) = value else {
        return Err(format!("a {kind} render needs `{field}` as a string"));
    };
    let mut req = Map::new();
    req.insert("kind".to_owned(), json!(kind));
    req.insert(field.to_owned(), json!(source));
    for key in ["width", "height", "wait_ms", "device_scale"] {
        if let Some(v) = p.get(key) {
            req.insert(key.to_owned(), v.clone());
        }
    }
    Ok(Value::Object(req))
}

/// Width and height from a PNG's IHDR chunk.
pub(crate) fn png_size(png: &[u8]) -> Option<(u32, u32)> {
    const SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";
    if png.len() < 24 || &png[..8] != SIGNATURE || &png[12..16] != b"IHDR" {
        return None;
    }
    let w = u32::from_be_bytes(png[16..20].try_into().ok()?);
    let h = u32::from_be_bytes(png[20..24].try_into().ok()?);
    Some((w, h))
}

impl PlaywrightConnector {
    async fn render(&self, job: &Job, progress: &ProgressSink) -> Result<JobOutput, ConnectorError> {
        let req = render_request(&job.service_required, &job.payload).map_err(ConnectorError::BadPayload)?;
        let kind = req["kind"].as_str().unwrap_or_default().to_owned();
        progress.percent(5.0, format!("rendering {kind}"));
        let mut url = self.base.clone();
        url.set_path("/render");
        let resp = self
            .client
            .post(url)
            .json(&req)
            .send()
            .await
            .map_err(|e| http::send_error("send the render request", e))?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| http::send_error("read the rendered image", e))?;
        if !status.is_success() {
            return Err(http::status_error("render", status, &String::from_utf8_lossy(&body)));
        }
        let Some((width, height)) = png_size(&body) else {
            return Err(ConnectorError::MachineFault {
                message: "the render service answered with something that is not a PNG".to_owned(),
            });
        };
        progress.percent(100.0, format!("rendered {width}x{height}"));
        Ok(JobOutput {
            data: json!({ "kind": kind, "width": width, "height": height, "bytes": body.len() }),
            artifacts: vec![Artifact {
                name: "render.png".to_owned(),
                content_type: "image/png".to_owned(),
                body: ArtifactBody::Bytes(body),
            }],
        })
    }
}

impl Connector for PlaywrightConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Playwright
    }

    fn run<'a>(
        &'a self,
        job: &'a Job,
        progress: &'a ProgressSink,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<JobOutput, ConnectorError>> {
        Box::pin(or_cancelled(cancel, self.render_watched(job, progress)))
    }

    /// Idle when `/health` reports no render running, waiting or still settling after its
    /// client went away (`active`, `queued`, `rendering`).
    fn idle(&self) -> BoxFuture<'_, Result<bool, ConnectorError>> {
        Box::pin(async {
            let mut url = self.base.clone();
            url.set_path("/health");
            let resp = self
                .client
                .get(url)
                .timeout(std::time::Duration::from_secs(5))
                .send()
                .await
                .map_err(|e| http::send_error("read the render service's health", e))?;
            let v: Value = resp
                .json()
                .await
                .map_err(|e| http::send_error("parse the render service's health", e))?;
            let count = |k: &str| v.get(k).and_then(Value::as_u64).unwrap_or(0);
            Ok(count("active") + count("queued") + count("rendering") == 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn job_services_choose_the_kind() {
        let r = render_request("p5", &json!({"code": "x", "width": 10, "extra": 1})).unwrap();
        assert_eq!(r, json!({"kind": "p5", "code": "x", "width": 10}));
        let r = render_request("html_render", &json!({"html": "<p>"})).unwrap();
        assert_eq!(r["kind"], "html");
        let r = render_request("playwright", &json!({"url": "https://x"})).unwrap();
        assert_eq!(r["kind"], "url");
        let r = render_request("playwright", &json!({"kind": "p5", "sketch": "s"})).unwrap();
        assert_eq!(r["code"], "s");
        for bad in [
            json!([]),
            json!({}),
            json!({"kind": "pdf"}),
            json!({"kind": "html", "html": 3}),
        ] {
            assert!(render_request("playwright", &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn png_sizes_are_read_from_the_header() {
        let mut png = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR".to_vec();
        png.extend(300u32.to_be_bytes());
        png.extend(200u32.to_be_bytes());
        assert_eq!(png_size(&png), Some((300, 200)));
        assert_eq!(png_size(b"{\"error\":1}"), None);
    }
}

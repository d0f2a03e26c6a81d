//! The simulation connector: a job that takes a configured time, reports evenly spaced progress
//! steps, and fails (retryably) with a configured probability. Used for demos, load tests and
//! the machine's local mode.
//!
//! The payload may override each setting: `duration_ms`, `steps`, `failure_rate`; `fail`
//! (`"retryable"` or `"fatal"`) forces a failure of that class, and `artifact` (a string) makes
//! the job produce it as `simulation.txt`; `artifact_bytes` makes that output exactly this many
//! bytes (the string repeated, `x` without one; at most 1 GiB), for outputs of a fixed size. A payload that is not a JSON object, or whose
//! overrides have the wrong type, fails without retry.

use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use super::{Artifact, ArtifactBody, Connector, ConnectorError, Job, JobOutput, Progress, ProgressSink, json_kind};
use crate::config::{ConnectorKind, SimulationConfig};

/// Runs simulated jobs.
#[derive(Debug, Clone)]
pub struct SimulationConnector {
    defaults: SimulationConfig,
}

/// The settings of one simulated job.
#[derive(Debug, Clone, PartialEq)]
struct Plan {
    duration: Duration,
    steps: u32,
    failure_rate: f64,
    fail: Option<bool>,
    artifact: Option<String>,
    artifact_bytes: Option<usize>,
}

/// The largest `artifact_bytes`.
const MAX_ARTIFACT_BYTES: f64 = 1024.0 * 1024.0 * 1024.0;

impl SimulationConnector {
    /// A connector with these defaults.
    pub fn new(defaults: SimulationConfig) -> Self {
        SimulationConnector { defaults }
    }

    fn plan(&self, payload: &serde_json::Value) -> Result<Plan, ConnectorError> {
        let obj = match payload {
            serde_json::Value::Object(o) => o,
            serde_json::Value::Null => &serde_json::Map::new(),
            other => {
                return Err(ConnectorError::BadPayload(format!(
                    "a simulation payload is a JSON object, not {}",
                    json_kind(other)
                )));
            }
        };
        let number = |key: &str| -> Result<Option<f64>, ConnectorError> {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|n| n.is_finite() && *n >= 0.0)
                    .map(Some)
                    .ok_or_else(|| ConnectorError::BadPayload(format!("`{key}` must be a non-negative number"))),
            }
        };
        let duration = number("duration_ms")?.map_or(self.defaults.duration, |ms| {
            Duration::from_secs_f64(ms.min(86_400_000.0) / 1000.0)
        });
        let steps = number("steps")?.map_or(self.defaults.steps, |s| s.clamp(1.0, 10_000.0) as u32);
        let failure_rate = number("failure_rate")?.unwrap_or(self.defaults.failure_rate);
        if failure_rate > 1.0 {
            return Err(ConnectorError::BadPayload(
                "`failure_rate` must be between 0 and 1".into(),
            ));
        }
        let fail = match obj.get("fail").map(|v| v.as_str()) {
            None => None,
            Some(Some("retryable")) => Some(true),
            Some(Some("fatal")) => Some(false),
            Some(_) => {
                return Err(ConnectorError::BadPayload(
                    "`fail` must be \"retryable\" or \"fatal\"".into(),
                ));
            }
        };
        let artifact = match obj.get("artifact") {
            None => None,
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(_) => return Err(ConnectorError::BadPayload("`artifact` must be a string".into())),
        };
        let artifact_bytes = match number("artifact_bytes")? {
            None => None,
            Some(n) if n.fract() == 0.0 && n <= MAX_ARTIFACT_BYTES => Some(n as usize),
            Some(_) => {
                return Err(ConnectorError::BadPayload(
                    "`artifact_bytes` must be a whole number of at most 1 GiB".into(),
                ));
            }
        };
        Ok(Plan {
            duration,
            steps,
            failure_rate,
            fail,
            artifact,
            artifact_bytes,
        })
    }

    async fn run_job(
        &self,
        job: &Job,
        progress: &ProgressSink,
        cancel: &CancellationToken,
    ) -> Result<JobOutput, ConnectorError> {
        let plan = self.plan(&job.payload)?;
        let per_step = plan.duration / plan.steps;
        let start = tokio::time::Instant::now();
        for step in 1..=plan.steps {
            // Sleeping to an absolute deadline keeps the total duration exact however long each
            // progress report takes.
            let deadline = start + per_step * step;
            tokio::select! {
                biased;
                () = cancel.cancelled() => return Err(ConnectorError::Cancelled),
                () = tokio::time::sleep_until(deadline) => {}
            }
            progress.report(Progress {
                percent: f64::from(step) * 100.0 / f64::from(plan.steps),
                message: format!("simulated step {step} of {}", plan.steps),
                current_step: Some(step),
                total_steps: Some(plan.steps),
            });
        }
        let fail = plan
            .fail
            .or_else(|| (plan.failure_rate > 0.0 && rand::random_bool(plan.failure_rate)).then_some(true));
        if let Some(retryable) = fail {
            return Err(ConnectorError::Failed {
                message: "simulated failure".to_owned(),
                retryable,
            });
        }
        let body = match (plan.artifact, plan.artifact_bytes) {
            (text, Some(n)) => {
                let unit = text.filter(|t| !t.is_empty()).unwrap_or_else(|| "x".to_owned());
                // Whole copies of the string, then cut: cheap for outputs of many MiB.
                let mut bytes = unit.repeat(n.div_ceil(unit.len())).into_bytes();
                bytes.truncate(n);
                Some(bytes)
            }
            (Some(text), None) => Some(text.into_bytes()),
            (None, None) => None,
        };
        let artifacts = body
            .map(|text| Artifact {
                name: "simulation.txt".to_owned(),
                content_type: "text/plain".to_owned(),
                body: ArtifactBody::Bytes(Bytes::from(text)),
            })
            .into_iter()
            .collect();
        Ok(JobOutput {
            data: serde_json::json!({
                "simulated": true,
                "steps": plan.steps,
                "duration_ms": plan.duration.as_millis() as u64,
            }),
            artifacts,
        })
    }
}

impl Connector for SimulationConnector {
    fn kind(&self) -> ConnectorKind {
        ConnectorKind::Simulation
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::ErrorClass;

    fn connector() -> SimulationConnector {
        SimulationConnector::new(SimulationConfig {
            duration: Duration::from_millis(40),
            steps: 4,
            failure_rate: 0.0,
        })
    }

    fn job(payload: serde_json::Value) -> Job {
        Job {
            id: "j".into(),
            service_required: "simulation".into(),
            payload,
            customer_id: String::new(),
            ctx: serde_json::Value::Null,
            timeout: None,
        }
    }

    #[tokio::test]
    async fn runs_with_progress_in_order() {
        let c = connector();
        let (sink, mut rx) = ProgressSink::new();
        let watcher = tokio::spawn(async move {
            let mut seen = Vec::new();
            while rx.changed().await.is_ok() {
                seen.push(rx.borrow_and_update().1.current_step);
            }
            seen
        });
        let j = job(serde_json::json!({"steps": 4, "artifact": "hi"}));
        let out = c.run(&j, &sink, &CancellationToken::new()).await.unwrap();
        drop(sink);
        assert_eq!(out.data["steps"], 4);
        assert_eq!(out.artifacts[0].body, ArtifactBody::Bytes(Bytes::from_static(b"hi")));
        let seen = watcher.await.unwrap();
        assert_eq!(seen.last(), Some(&Some(4)));
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    }

    #[tokio::test]
    async fn outputs_of_a_fixed_size() {
        let c = connector();
        let (sink, _rx) = ProgressSink::new();
        let cancel = CancellationToken::new();
        let run = |payload| {
            let j = job(payload);
            let c = c.clone();
            let sink = sink.clone();
            let cancel = cancel.clone();
            async move { c.run(&j, &sink, &cancel).await }
        };
        let out = run(serde_json::json!({"duration_ms": 0, "artifact": "ab", "artifact_bytes": 5}))
            .await
            .unwrap();
        assert_eq!(out.artifacts[0].body, ArtifactBody::Bytes(Bytes::from_static(b"ababa")));
        let out = run(serde_json::json!({"duration_ms": 0, "artifact_bytes": 3}))
            .await
            .unwrap();
        assert_eq!(out.artifacts[0].body, ArtifactBody::Bytes(Bytes::from_static(b"xxx")));
        let err = run(serde_json::json!({"duration_ms": 0, "artifact_bytes": 1.5}))
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Fatal);
    }

    #[tokio::test]
    async fn failures_and_bad_payloads_are_classified() {
        let c = connector();
        let (sink, _rx) = ProgressSink::new();
        let cancel = CancellationToken::new();
        let err = c
            .run(
                &job(serde_json::json!({"fail": "fatal", "duration_ms": 0})),
                &sink,
                &cancel,
            )
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Fatal);
        let err = c
            .run(
                &job(serde_json::json!({"failure_rate": 1, "duration_ms": 0})),
                &sink,
                &cancel,
            )
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Retryable);
        let err = c.run(&job(serde_json::json!([1])), &sink, &cancel).await.unwrap_err();
        assert!(err.to_string().contains("not an array"), "{err}");
        let err = c
            .run(&job(serde_json::json!({"steps": "many"})), &sink, &cancel)
            .await
            .unwrap_err();
        assert_eq!(err.class(), ErrorClass::Fatal);
    }

    #[tokio::test]
    async fn cancellation_stops_promptly() {
        let c = connector();
        let (sink, _rx) = ProgressSink::new();
        let cancel = CancellationToken::new();
        let j = job(serde_json::json!({"duration_ms": 60_000}));
        let t = tokio::time::Instant::now();
        let (r, ()) = tokio::join!(c.run(&j, &sink, &cancel), async {
            tokio::time::sleep(Duration::from_millis(20)).await;
            cancel.cancel();
        });
        assert!(matches!(r, Err(ConnectorError::Cancelled)));
        assert!(t.elapsed() < Duration::from_secs(1));
    }
}

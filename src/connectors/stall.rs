//! Hung jobs: the clock of the last word a service said about the job it runs.
//!
//! A service whose process lives but whose job went quiet (a ComfyUI WebSocket that stays open
//! and silent, an A1111 whose progress no longer moves) holds its worker forever unless someone
//! notices the silence. Each connector that drives a service keeps a [`StallClock`]: it is
//! wound on every message about the job (a ComfyUI event of its prompt, `progress_state`
//! included; a changed A1111 progress reading; a Playwright page event), so a long node that
//! still reports progress never stalls, and a job with no word for its stall timeout is
//! interrupted and ends with [`ConnectorError::Stalled`], a retryable failure: the broker
//! returns it to the queue with that reason until its retries are spent, then fails it with it.

use std::time::Duration;

use tokio::time::Instant;

use super::{ConnectorError, Job};

/// How long a job may go without a word from its service unless configured otherwise.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// The payload key with which a job raises its connector's stall timeout (in seconds), for
/// workflows known to stay silent for long (a node that reports no progress).
pub const PAYLOAD_KEY: &str = "stall_timeout_seconds";

/// When the service last said something about the running job, and how long it may stay
/// silent.
#[derive(Debug, Clone)]
pub struct StallClock {
    timeout: Duration,
    last_word: Instant,
}

impl StallClock {
    /// Starts the clock for `job`: the connector's `timeout`, raised (never lowered) by the
    /// job's `stall_timeout_seconds`.
    pub fn start(timeout: Duration, job: &Job) -> StallClock {
        StallClock {
            timeout: timeout.max(payload_timeout(&job.payload).unwrap_or_default()),
            last_word: Instant::now(),
        }
    }

    /// The service said something about the job.
    pub fn heard(&mut self) {
        self.last_word = Instant::now();
    }

    /// The moment the job counts as stalled unless the service speaks before.
    pub fn deadline(&self) -> Instant {
        self.last_word + self.timeout
    }

    /// Resolves at [`StallClock::deadline`] (as it is when called).
    pub async fn expired(&self) {
        tokio::time::sleep_until(self.deadline()).await;
    }

    /// Runs `fut` unless the clock runs out first (`None` then): every call a connector makes
    /// to its service while a job runs goes through here, so no answer that never comes can
    /// hold the job past its stall timeout.
    pub async fn within<T>(&self, fut: impl Future<Output = T>) -> Option<T> {
        tokio::select! {
            biased;
            r = fut => Some(r),
            () = self.expired() => None,
        }
    }

    /// How long the service has been silent.
    pub fn silent_for(&self) -> Duration {
        self.last_word.elapsed()
    }

    /// The error that ends a job stalled after `silent_for`; `answers` says whether the service
    /// still answered its health check after the silence.
    pub fn stalled(&self, service: &str, silent_for: Duration, answers: bool) -> ConnectorError {
        ConnectorError::Stalled {
            service: service.to_owned(),
            silent_for,
            timeout: self.timeout,
            answers,
        }
    }
}

/// The job's own stall timeout (`stall_timeout_seconds`, a positive number), when it sets one.
fn payload_timeout(payload: &serde_json::Value) -> Option<Duration> {
    let secs = payload.get(PAYLOAD_KEY)?.as_f64()?;
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs.min(86_400.0 * 365.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn job(payload: serde_json::Value) -> Job {
        Job {
            id: "j".into(),
            service_required: "comfyui".into(),
            payload,
            customer_id: String::new(),
            ctx: serde_json::Value::Null,
            timeout: None,
        }
    }

    #[test]
    fn the_payload_raises_the_timeout_never_lowers_it() {
        let base = Duration::from_secs(120);
        let t = |p| StallClock::start(base, &job(p)).timeout;
        assert_eq!(t(json!({})), base);
        assert_eq!(t(json!({"stall_timeout_seconds": 600})), Duration::from_secs(600));
        assert_eq!(t(json!({"stall_timeout_seconds": 5})), base);
        assert_eq!(t(json!({"stall_timeout_seconds": -1})), base);
        assert_eq!(t(json!({"stall_timeout_seconds": "600"})), base);
    }

    #[tokio::test]
    async fn a_word_moves_the_deadline() {
        let mut clock = StallClock::start(Duration::from_secs(10), &job(json!({})));
        let first = clock.deadline();
        tokio::time::sleep(Duration::from_millis(20)).await;
        clock.heard();
        assert!(clock.deadline() >= first + Duration::from_millis(20));
        let e = clock.stalled("comfyui", clock.silent_for(), true);
        assert!(e.is_retryable(), "{e}");
    }
}

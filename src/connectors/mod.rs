//! Connectors: the seam between a worker and the thing that really runs a job (a ComfyUI or
//! A1111 server on this GPU, an OpenAI-compatible HTTP API, a simulation).
//!
//! Every connector implements [`Connector`]: it runs one [`Job`] while reporting [`Progress`]
//! through a [`ProgressSink`] that never blocks, stops promptly when its cancellation token fires
//! (interrupting the service it drives), and returns a [`JobOutput`] (JSON `data` plus
//! [`Artifact`]s) or a classified [`ConnectorError`]. Connectors never write to Redis and never
//! store artifacts themselves: the worker stores artifacts through [`store::OutputStore`] so that
//! only URLs reach Redis.
//!
//! The external API connectors (OpenAI, Replicate, RunPod) also go through the fleet-wide
//! [`limits::Limiter`] before each request, and put a [`Billing`] (usage and cost from the
//! configured price table) in their result under `billing`.

pub mod a1111;
pub mod comfyui;
pub mod fetch;
mod http;
pub mod limits;
pub mod openai;
mod outputs;
pub mod playwright;
pub mod replicate;
pub mod runpod;
pub mod simulation;
pub mod stall;
pub mod store;

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{ConnectorKind, Prices};

/// One job as a connector sees it: what to run and where its outputs go.
#[derive(Debug, Clone, PartialEq)]
pub struct Job {
    /// The broker's job id.
    pub id: String,
    /// The job's `service_required` (e.g. `comfyui`, `openai_text`).
    pub service_required: String,
    /// The job's `payload`, parsed.
    pub payload: serde_json::Value,
    /// The job's `customer_id` (empty: none); external APIs limit and bill per customer.
    pub customer_id: String,
    /// The job's `ctx` (storage destination, prefix, file name), parsed; `Null` when absent.
    pub ctx: serde_json::Value,
    /// The time the job may take, when the job or the configuration says.
    pub timeout: Option<Duration>,
}

/// One progress report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Progress {
    /// Overall progress, 0 to 100.
    pub percent: f64,
    /// What is happening, for people.
    pub message: String,
    /// The current step, when the connector knows steps.
    pub current_step: Option<u32>,
    /// The number of steps, when the connector knows steps.
    pub total_steps: Option<u32>,
}

/// Where a connector reports progress, and what the job's attempt used at a paid API.
/// Reporting never blocks and never fails: the latest report replaces any the worker has not
/// yet forwarded, so a slow Redis costs intermediate reports, never connector time. Reports are
/// forwarded in the order they were made. Usage ([`ProgressSink::bill`]) is read by the worker
/// once the connector returns, whatever the outcome: providers bill failed and cancelled work.
#[derive(Debug, Clone)]
pub struct ProgressSink {
    tx: watch::Sender<(u64, Progress)>,
    usage: Arc<Mutex<Option<Billing>>>,
}

/// The worker's end of a [`ProgressSink`]: the latest report and its sequence number (starting
/// at 1; 0 means nothing reported yet).
pub type ProgressReceiver = watch::Receiver<(u64, Progress)>;

impl ProgressSink {
    /// A sink and the receiver the worker forwards from.
    pub fn new() -> (ProgressSink, ProgressReceiver) {
        let (tx, rx) = watch::channel((0, Progress::default()));
        let usage = Arc::new(Mutex::new(None));
        (ProgressSink { tx, usage }, rx)
    }

    /// Records what the attempt used and cost so far (replacing an earlier record).
    pub fn bill(&self, billing: Billing) {
        *self.usage.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(billing);
    }

    /// What the attempt used and cost, when the connector billed anything.
    pub fn usage(&self) -> Option<Billing> {
        self.usage
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Reports progress; the percentage is clamped to 0..=100 (NaN counts as 0).
    pub fn report(&self, mut progress: Progress) {
        progress.percent = if progress.percent.is_nan() {
            0.0
        } else {
            progress.percent.clamp(0.0, 100.0)
        };
        // `send_modify` stores the value even when no receiver is left, so it cannot fail.
        self.tx.send_modify(|(seq, p)| {
            *seq += 1;
            *p = progress;
        });
    }

    /// Shorthand for a report with a percentage and a message.
    pub fn percent(&self, percent: f64, message: impl Into<String>) {
        self.report(Progress {
            percent,
            message: message.into(),
            ..Progress::default()
        });
    }
}

/// What a job produced.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobOutput {
    /// The JSON result the broker records (`data` of the completion record).
    pub data: serde_json::Value,
    /// Files the job produced; the worker stores them and adds their URLs to the result.
    pub artifacts: Vec<Artifact>,
}

/// One file a job produced.
#[derive(Debug, Clone, PartialEq)]
pub struct Artifact {
    /// The name the service gave it (sanitised before it becomes a storage key).
    pub name: String,
    /// Its MIME type.
    pub content_type: String,
    /// The bytes, or where they already are.
    pub body: ArtifactBody,
}

/// The content of an [`Artifact`].
#[derive(Clone, PartialEq)]
pub enum ArtifactBody {
    /// The bytes, to be stored by the worker.
    Bytes(Bytes),
    /// Already stored elsewhere (e.g. an image URL returned by an API); recorded as is.
    Url(String),
    /// Still at the service, which serves it (ComfyUI's `/view`): fetched by the worker's
    /// upload stage, under the job's lease, while the service runs the next job.
    Fetch(fetch::Fetch),
}

impl fmt::Debug for ArtifactBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ArtifactBody::Bytes(b) => write!(f, "Bytes({} bytes)", b.len()),
            ArtifactBody::Url(u) => write!(f, "Url({u})"),
            ArtifactBody::Fetch(fetch) => write!(f, "{fetch:?}"),
        }
    }
}

/// How a failed job should be treated by the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// Another attempt (maybe on another worker) may succeed: service down, 5xx, rate limited.
    Retryable,
    /// The job itself is wrong or was refused: another attempt would fail the same way.
    Fatal,
    /// The job was cancelled; its result is discarded.
    Cancelled,
    /// The job ran past its time limit.
    Timeout,
}

/// Why a connector could not complete a job.
#[derive(Debug, thiserror::Error)]
pub enum ConnectorError {
    /// The payload is not what the connector needs.
    #[error("invalid job payload: {0}")]
    BadPayload(String),
    /// The service refused the job as invalid (e.g. ComfyUI `node_errors`, an HTTP 4xx).
    #[error("the service rejected the job: {message}")]
    Rejected {
        /// What the service said.
        message: String,
    },
    /// The service could not be reached or answered with a server error.
    #[error("failed to reach the service: {message}")]
    Unavailable {
        /// What went wrong.
        message: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The service ran the job and reported a failure: the job's own, which spends its
    /// retries and says nothing about this machine.
    #[error("the job failed in the service: {message}")]
    Failed {
        /// What the service said.
        message: String,
        /// Whether another attempt may succeed.
        retryable: bool,
    },
    /// The machine failed the job, not the job itself: its GPU ran out of memory under it, its
    /// service was interrupted by someone else or answered nonsense, the connector crashed.
    /// Another attempt may succeed; it counts towards the worker's quarantine.
    #[error("{message}")]
    MachineFault {
        /// What happened, for the job's `error`.
        message: String,
    },
    /// The service said nothing about the job for its stall timeout; the job was interrupted.
    #[error("{service} said nothing about the job for {} (stall timeout {}){}", humantime::format_duration(round_ms(*silent_for)), humantime::format_duration(*timeout), if *answers { "" } else { " and does not answer its health check" })]
    Stalled {
        /// The connector's service (`comfyui`, `a1111`, `playwright`).
        service: String,
        /// How long it had been silent.
        silent_for: Duration,
        /// The stall timeout that applied.
        timeout: Duration,
        /// Whether the service still answered its health check after the silence.
        answers: bool,
    },
    /// The service crashed (or restarted) while running the job and lost it: it no longer knows
    /// the job, or stayed unreachable.
    #[error("{service} lost the job: {message}")]
    ServiceLost {
        /// The connector's service (`comfyui`).
        service: String,
        /// What was seen.
        message: String,
    },
    /// The cancellation token fired.
    #[error("the job was cancelled")]
    Cancelled,
    /// The job ran longer than allowed.
    #[error("the job timed out after {0:?}")]
    Timeout(Duration),
    /// A daily quota of an external API (or of the job's customer on it) is used up. The
    /// worker returns the job to the queue with `reason` instead of failing it.
    #[error("{reason}")]
    QuotaReached {
        /// The API.
        api: String,
        /// The customer whose own quota is used up; `None` when the API's quota is.
        customer: Option<String>,
        /// Why, for people (shown in `machine jobs show`).
        reason: String,
        /// Time until the quota day ends.
        resets_in: Duration,
    },
    /// A request that creates paid work at an external API got no clear answer (a 5xx, a
    /// timeout, a dropped connection): the work may exist upstream, so it is not sent again.
    /// The worker returns the job as the machine's fault and counts a possible orphan.
    #[error("{message}; the {api} job may have been created upstream, so the request was not sent again")]
    MaybeCreated {
        /// The API (`replicate`, `runpod`, `openai`).
        api: String,
        /// What happened to the request.
        message: String,
    },
    /// An external API refused this machine's credentials (its key, or its account is out of
    /// credit): not the job's fault. The worker returns the job and holds that API's work
    /// until a re-check passes.
    #[error("{}: {message}", if *credit { format!("the {api} account is out of credit") } else { format!("the {api} API refuses this machine's key") })]
    CredentialsRefused {
        /// The API (`replicate`, `runpod`, `openai`).
        api: String,
        /// The account is out of credit (re-checked by one real request), rather than the key
        /// refused (re-checked by a cheap authenticated request).
        credit: bool,
        /// What the API answered.
        message: String,
    },
    /// The job's output destination (`ctx`) is unusable; found before the job runs.
    #[error("the job's output destination was refused")]
    Destination(#[source] Box<store::StoreError>),
    /// An output could not be stored.
    #[error("failed to store output `{name}`")]
    Storage {
        /// The artifact's name.
        name: String,
        /// The store's error (boxed: it is large, and every connector returns this error type).
        #[source]
        source: Box<store::StoreError>,
    },
}

impl ConnectorError {
    /// How the broker should treat this failure.
    pub fn class(&self) -> ErrorClass {
        match self {
            ConnectorError::BadPayload(_) | ConnectorError::Rejected { .. } => ErrorClass::Fatal,
            ConnectorError::Unavailable { .. }
            | ConnectorError::MaybeCreated { .. }
            | ConnectorError::CredentialsRefused { .. }
            | ConnectorError::QuotaReached { .. }
            | ConnectorError::Stalled { .. }
            | ConnectorError::MachineFault { .. }
            | ConnectorError::ServiceLost { .. } => ErrorClass::Retryable,
            ConnectorError::Storage { source, .. } | ConnectorError::Destination(source) => {
                if source.is_retryable() {
                    ErrorClass::Retryable
                } else {
                    ErrorClass::Fatal
                }
            }
            ConnectorError::Failed { retryable, .. } => {
                if *retryable {
                    ErrorClass::Retryable
                } else {
                    ErrorClass::Fatal
                }
            }
            ConnectorError::Cancelled => ErrorClass::Cancelled,
            ConnectorError::Timeout(_) => ErrorClass::Timeout,
        }
    }

    /// Whether the job's service crashed or stalled under it (a fault that may be the
    /// service's, not the job's: the broker gives the job back without spending a retry the
    /// first time, see `Broker::return_for_fault`).
    pub fn is_service_fault(&self) -> bool {
        matches!(
            self,
            ConnectorError::Stalled { .. } | ConnectorError::ServiceLost { .. }
        )
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.class(), ErrorClass::Retryable | ErrorClass::Timeout)
    }

    /// An `Unavailable` error from any error type.
    pub(crate) fn unavailable(
        message: impl Into<String>,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> Self {
        ConnectorError::Unavailable {
            message: message.into(),
            source: Some(Box::new(source)),
        }
    }

    /// The error and its sources as one line, for the job's `error` field.
    pub fn chain(&self) -> String {
        crate::logging::error_chain(self)
    }
}

/// What one attempt of an external job used and cost: in a completed job's result under
/// `billing`, added to the job's `usage_*` totals and counted in the machine's metrics whatever
/// the attempt's outcome.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Billing {
    /// The connector (`openai`, `replicate`, `runpod`).
    pub connector: String,
    /// The job's customer (empty: none).
    pub customer: String,
    /// Requests the API accepted (a request refused with a 429 or an error is not billed).
    pub requests: u64,
    /// Input (prompt) tokens.
    pub input_tokens: u64,
    /// Output (completion) tokens.
    pub output_tokens: u64,
    /// Predict / execution time the API reported, in seconds.
    pub predict_seconds: f64,
    /// The cost from the price table.
    pub cost: f64,
    /// The price table's currency.
    pub currency: String,
}

impl Billing {
    /// What the attempt used, as the broker adds it to the job's totals.
    pub fn attempt_usage(&self) -> crate::broker::AttemptUsage<'_> {
        crate::broker::AttemptUsage {
            requests: self.requests,
            input_tokens: self.input_tokens,
            output_tokens: self.output_tokens,
            predict_seconds: self.predict_seconds,
            cost: self.cost,
            currency: &self.currency,
        }
    }

    /// An empty billing of one job's attempt through `connector`.
    pub fn for_job(connector: &str, job: &Job) -> Billing {
        Billing {
            connector: connector.to_owned(),
            customer: job.customer_id.clone(),
            ..Billing::default()
        }
    }

    /// Ends an attempt: prices what it used, reports that whatever the outcome (providers bill
    /// failed and cancelled work too), and adds it to a completed result under `billing`.
    pub fn settle(
        self,
        prices: &Prices,
        progress: &ProgressSink,
        result: Result<JobOutput, ConnectorError>,
    ) -> Result<JobOutput, ConnectorError> {
        let billing = self.priced(prices);
        progress.bill(billing.clone());
        result.map(|mut out| {
            billing.attach(&mut out.data);
            out
        })
    }

    /// Fills in `cost` and `currency` from `prices`.
    pub fn priced(mut self, prices: &Prices) -> Billing {
        self.cost = prices.per_request * self.requests as f64
            + prices.per_1k_input_tokens * self.input_tokens as f64 / 1000.0
            + prices.per_1k_output_tokens * self.output_tokens as f64 / 1000.0
            + prices.per_second * self.predict_seconds;
        self.currency.clone_from(&prices.currency);
        self
    }

    /// Adds `other`'s usage and cost to this one (the same connector and customer).
    pub fn add(&mut self, other: &Billing) {
        self.requests += other.requests;
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.predict_seconds += other.predict_seconds;
        self.cost += other.cost;
        if self.currency.is_empty() {
            self.currency.clone_from(&other.currency);
        }
    }

    /// The billing recorded in a job's result (`billing`), if any.
    pub fn from_result(result: &serde_json::Value) -> Option<Billing> {
        serde_json::from_value(result.get("billing")?.clone()).ok()
    }

    /// Adds this billing to a result object under `billing`.
    pub fn attach(&self, data: &mut serde_json::Value) {
        if let serde_json::Value::Object(map) = data {
            map.insert(
                "billing".to_owned(),
                serde_json::to_value(self).expect("billing is plain data"),
            );
        }
    }
}

/// Runs jobs of one kind. Object-safe: workers hold `Box<dyn Connector>`.
///
/// `run` must return promptly (within a second or two) once `cancel` fires, after asking the
/// service to stop (ComfyUI `POST /interrupt`, A1111 `/sdapi/v1/interrupt`, dropping an HTTP
/// request), with [`ConnectorError::Cancelled`].
pub trait Connector: Send + Sync + fmt::Debug {
    /// Which connector this is.
    fn kind(&self) -> ConnectorKind;

    /// Runs one job.
    fn run<'a>(
        &'a self,
        job: &'a Job,
        progress: &'a ProgressSink,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<JobOutput, ConnectorError>>;

    /// One cheap authenticated request that says whether the API accepts this machine's key
    /// again (after a [`ConnectorError::CredentialsRefused`]); `Err` with why not. Connectors
    /// with no such request answer `Ok`, and a real job is the check.
    fn check_credentials(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { Ok(()) })
    }

    /// Whether the service has no work left running or waiting (ComfyUI's `/queue` empty, no
    /// A1111 job, no render in flight). A job interrupted by a cancel, a stall or an error
    /// runs on in the service to the end of its current step, and a job sent meanwhile would
    /// wait behind it; the worker asks this before its next claim. Connectors without a
    /// service of their own are always idle.
    fn idle(&self) -> BoxFuture<'_, Result<bool, ConnectorError>> {
        Box::pin(async { Ok(true) })
    }
}

/// `d` to the millisecond, so a reason reads "2s 3ms", not nanoseconds.
fn round_ms(d: Duration) -> Duration {
    Duration::from_millis(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Runs `fut` unless `cancel` fires first, in which case the future is dropped (aborting an
/// HTTP request in flight) and `Cancelled` is returned.
pub(crate) async fn or_cancelled<T>(
    cancel: &CancellationToken,
    fut: impl Future<Output = Result<T, ConnectorError>>,
) -> Result<T, ConnectorError> {
    tokio::select! {
        biased;
        () = cancel.cancelled() => Err(ConnectorError::Cancelled),
        r = fut => r,
    }
}

/// A MIME type from a file name, for servers that send none.
pub(crate) fn guess_content_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "webp" => "image/webp",
        "gif" => "image/gif",
        "mp4" => "video/mp4",
        "webm" => "video/webm",
        "wav" => "audio/wav",
        "mp3" => "audio/mpeg",
        "flac" => "audio/flac",
        "json" => "application/json",
        "txt" => "text/plain",
        "glb" => "model/gltf-binary",
        _ => "application/octet-stream",
    }
}

/// The JSON type of a value, for error messages.
pub(crate) fn json_kind(v: &serde_json::Value) -> &'static str {
    match v {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_coalesces_and_clamps() {
        let (sink, rx) = ProgressSink::new();
        assert_eq!(rx.borrow().0, 0);
        sink.percent(10.0, "a");
        sink.percent(250.0, "b");
        let (seq, p) = rx.borrow().clone();
        assert_eq!(seq, 2);
        assert_eq!(p.percent, 100.0);
        assert_eq!(p.message, "b");
        sink.percent(f64::NAN, "c");
        assert_eq!(rx.borrow().1.percent, 0.0);
        drop(rx);
        sink.percent(1.0, "nobody listens, nothing fails");
    }

    #[test]
    fn errors_are_classified() {
        assert_eq!(ConnectorError::BadPayload("x".into()).class(), ErrorClass::Fatal);
        assert_eq!(
            ConnectorError::Failed {
                message: "oom".into(),
                retryable: true
            }
            .class(),
            ErrorClass::Retryable
        );
        assert_eq!(ConnectorError::Cancelled.class(), ErrorClass::Cancelled);
        assert!(ConnectorError::Timeout(Duration::from_secs(1)).is_retryable());
        let e = ConnectorError::unavailable("connect", std::io::Error::other("refused"));
        assert_eq!(e.chain(), "failed to reach the service: connect: refused");
    }

    #[test]
    fn billing_is_priced_and_round_trips_through_a_result() {
        let prices = Prices {
            per_request: 0.01,
            per_1k_input_tokens: 0.5,
            per_1k_output_tokens: 1.5,
            per_second: 0.002,
            currency: "EUR".into(),
        };
        let b = Billing {
            connector: "openai".into(),
            requests: 2,
            input_tokens: 1000,
            output_tokens: 2000,
            predict_seconds: 10.0,
            ..Billing::default()
        }
        .priced(&prices);
        assert!((b.cost - (0.02 + 0.5 + 3.0 + 0.02)).abs() < 1e-9, "{}", b.cost);
        assert_eq!(b.currency, "EUR");
        let mut data = serde_json::json!({"text": "hi"});
        b.attach(&mut data);
        assert_eq!(Billing::from_result(&data), Some(b));
        assert_eq!(Billing::from_result(&serde_json::json!({})), None);
    }
}

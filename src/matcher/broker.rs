//! The async broker API the workers use: claim, lifecycle, leases, heartbeats, wake-ups.
//!
//! One [`Broker`] per machine holds ONE multiplexed command connection (a `ConnectionManager`,
//! which reconnects by itself) shared by every worker, plus — while [`Broker::run_events`]
//! runs — ONE pub/sub connection that fans `job_submitted` / `job_requeued` wake-ups out to
//! waiting claimers (per service) and `cancel_job` notices to a broadcast channel. Every write
//! goes through an atomic function of the `jobMatching` library, and every lifecycle write is
//! fenced: a job cancelled or re-assigned meanwhile yields [`BrokerError::Cancelled`] or
//! [`BrokerError::LeaseLost`] instead of a silent overwrite.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, FromRedisValue, RedisError, ServerErrorKind, cmd};
use serde_json::Value;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::capabilities::Capabilities;
use super::installer::{self, InstallReport, Library, Mode};
use super::{BrokerError, CANCEL_ERROR};
use crate::config::RedisUrl;

/// How long a worker hash outlives its last heartbeat: a machine that is gone (killed, its
/// container removed) must not leave its workers in Redis forever.
const WORKER_TTL_SECS: i64 = 300;

/// Tunables of the broker; the defaults are the contract's.
#[derive(Debug, Clone)]
pub struct BrokerOptions {
    /// How long a claim holds a job without renewal (default 60 s).
    pub lease: Duration,
    /// How often an idle claimer retries without a wake-up (default 5 s).
    pub safety_poll: Duration,
    /// How long a worker that failed a job is held off it once its retry delay is over, so that
    /// another capable worker takes it first (default 30 s).
    pub failed_holdoff: Duration,
    /// How long a retryable failure waits before the job can be claimed again.
    pub retry_delay: RetryDelay,
    /// `findMatchingJob`'s second argument: how many held-off jobs of one group it skips.
    pub max_examine: u32,
    /// Prefix of every key and channel ("" in production; scratch prefixes for self-checks).
    pub key_prefix: String,
}

impl Default for BrokerOptions {
    fn default() -> Self {
        Self {
            lease: Duration::from_secs(60),
            safety_poll: Duration::from_secs(5),
            failed_holdoff: Duration::from_secs(30),
            retry_delay: RetryDelay::default(),
            max_examine: 100,
            key_prefix: String::new(),
        }
    }
}

/// How long a retryable failure waits before its job can be claimed again: `initial` before the
/// first retry, `factor` times more before each further one, never more than `max`, and each
/// shortened by a random part of up to `jitter` (0 to 1) so that jobs that failed together (an
/// outage of a storage bucket) do not all return at once.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct RetryDelay {
    /// The delay before the first retry (default 5 s).
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Growth per further retry (default 2).
    pub factor: f64,
    /// The longest delay (default 5 min).
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// The largest fraction taken off at random (default 0.2).
    pub jitter: f64,
}

impl Default for RetryDelay {
    fn default() -> Self {
        Self {
            initial: Duration::from_secs(5),
            factor: 2.0,
            max: Duration::from_secs(300),
            jitter: 0.2,
        }
    }
}

impl RetryDelay {
    /// The delay before retry number `retry` (0 for the first), with `random` (0 to 1) choosing
    /// the jitter.
    pub fn delay(&self, retry: u32, random: f64) -> Duration {
        let grown = self.initial.as_secs_f64() * self.factor.max(1.0).powi(retry.min(1024) as i32);
        let capped = grown.min(self.max.as_secs_f64());
        let cut = self.jitter.clamp(0.0, 1.0) * random.clamp(0.0, 1.0);
        Duration::try_from_secs_f64(capped * (1.0 - cut)).unwrap_or(self.max)
    }
}

/// A job this machine claimed.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedJob {
    /// The job id.
    pub id: String,
    /// The worker the job is assigned to.
    pub worker_id: String,
    /// `service_required` (or the legacy `job_type`).
    pub service: String,
    /// The decoded `payload` (`{}` when empty).
    pub payload: Value,
    /// Every field of the job hash at claim time.
    pub fields: BTreeMap<String, String>,
}

impl ClaimedJob {
    /// A field of the job hash at claim time.
    pub fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    /// `retry_count` (0 when absent).
    pub fn retry_count(&self) -> u32 {
        self.field("retry_count").and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// `ctx` decoded, when present and valid.
    pub fn ctx(&self) -> Option<Value> {
        self.field("ctx").and_then(|v| serde_json::from_str(v).ok())
    }
}

/// What renewing a lease found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseStatus {
    /// The worker still holds the job; the lease was extended.
    Held,
    /// The job was cancelled: stop and discard the result.
    Cancelled,
    /// The job is no longer this worker's (lease expired and re-queued, or re-assigned).
    Lost,
}

/// What failing a job did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailOutcome {
    /// Back in the queue with its original score (`retry_count` + 1).
    Retried,
    /// Failed for good.
    Failed,
}

/// What the reaper did in one pass.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReapReport {
    /// Jobs whose lease expired and that went back to the queue.
    pub requeued: u64,
    /// Jobs whose lease expired on their last attempt and failed for good.
    pub failed: u64,
    /// Lease records of jobs that had already ended (cancelled, ...), removed.
    pub cleaned: u64,
}

/// What cancelling a job did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelOutcome {
    /// The job was cancelled as the API does it.
    Cancelled,
    /// No such job.
    NotFound,
    /// The job had already ended with this status.
    AlreadyEnded(String),
}

/// A job to submit the way the API does.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    /// `service_required`.
    pub service: String,
    /// `payload`.
    pub payload: Value,
    /// `requirements`, stored verbatim (empty for none).
    pub requirements: String,
    /// `priority` (default 50).
    pub priority: i64,
    /// `customer_id` ("" for none).
    pub customer_id: String,
    /// `workflow_id` ("" for none).
    pub workflow_id: String,
    /// `workflow_priority`, when the job is a workflow step.
    pub workflow_priority: Option<i64>,
    /// `workflow_datetime` (epoch ms), when the job is a workflow step.
    pub workflow_datetime: Option<i64>,
    /// `max_retries` (default 3).
    pub max_retries: u32,
}

impl NewJob {
    /// A job for `service` with the API's defaults.
    pub fn new(service: impl Into<String>, payload: Value) -> Self {
        Self {
            service: service.into(),
            payload,
            requirements: String::new(),
            priority: 50,
            customer_id: String::new(),
            workflow_id: String::new(),
            workflow_priority: None,
            workflow_datetime: None,
            max_retries: 3,
        }
    }
}

/// The contract's score: `effective_priority * 1e15 - floor(effective_time_ms / 1000)`.
pub fn pending_score(priority: i64, workflow_priority: Option<i64>, created_ms: i64, workflow_ms: Option<i64>) -> f64 {
    let p = workflow_priority.unwrap_or(priority) as f64;
    let t = workflow_ms.unwrap_or(created_ms) as f64;
    p * 1e15 - (t / 1000.0).floor()
}

/// A job hash and its progress, as `machine jobs show` prints them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct JobView {
    /// `job:<id>`.
    pub job: BTreeMap<String, String>,
    /// `job:<id>:progress`.
    pub progress: BTreeMap<String, String>,
    /// For a job still waiting: why no registered worker took it, or how many could.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// The broker handle; cheap to clone, shared by all workers of a machine.
#[derive(Debug, Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

struct Inner {
    client: redis::Client,
    conn: ConnectionManager,
    lib: Library,
    mode: RwLock<Mode>,
    opts: BrokerOptions,
    wake: Mutex<HashMap<String, watch::Sender<u64>>>,
    cancels: broadcast::Sender<String>,
    observer: std::sync::OnceLock<ClaimObserver>,
    /// The workers this broker registered, to register again when Redis comes back empty.
    registered: Mutex<HashMap<String, Capabilities>>,
    /// The state of [`Broker::run_events`]' index catch-up: claimers wait for it (see
    /// [`Broker::claim_next`]).
    catch_up: watch::Sender<CatchUp>,
}

/// Whether jobs queued while no machine listened are in the index yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CatchUp {
    /// [`Broker::run_events`] is not running: claims repair the index themselves.
    NotRunning,
    /// The first catch-up after subscribing is running.
    Running,
    /// Done (or failed; claims then repair the index in steps).
    Done,
}

/// Told the round-trip time of every `findMatchingJob` call and whether it claimed a job (for
/// the machine's metrics).
pub type ClaimObserver = Arc<dyn Fn(Duration, bool) + Send + Sync>;

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Broker")
            .field("version", &self.lib.version())
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

fn redis_err(op: &'static str) -> impl FnOnce(RedisError) -> BrokerError {
    move |source| BrokerError::Redis { op, source }
}

impl Broker {
    /// Connects the command connection. Pub/sub starts with [`Broker::run_events`].
    pub async fn connect(url: &RedisUrl, opts: BrokerOptions) -> Result<Broker, BrokerError> {
        let client = redis::Client::open(url.expose()).map_err(|source| BrokerError::Connect {
            url: url.masked(),
            source,
        })?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(5)))
            .set_response_timeout(Some(Duration::from_secs(10)))
            .set_number_of_retries(3)
            .set_max_delay(Duration::from_secs(5));
        let conn = client
            .get_connection_manager_with_config(config)
            .await
            .map_err(|source| BrokerError::Connect {
                url: url.masked(),
                source,
            })?;
        let (cancels, _) = broadcast::channel(256);
        Ok(Broker {
            inner: Arc::new(Inner {
                client,
                conn,
                lib: Library::new(),
                mode: RwLock::new(Mode::Functions),
                opts,
                wake: Mutex::new(HashMap::new()),
                cancels,
                observer: std::sync::OnceLock::new(),
                registered: Mutex::new(HashMap::new()),
                catch_up: watch::channel(CatchUp::NotRunning).0,
            }),
        })
    }

    /// The options this broker runs with.
    pub fn options(&self) -> &BrokerOptions {
        &self.inner.opts
    }

    /// Sets the observer of claim calls; only the first one set is kept.
    pub fn observe_claims(&self, observer: ClaimObserver) {
        let _ = self.inner.observer.set(observer);
    }

    /// A clone of the shared command connection (for operator commands and tests).
    pub fn connection(&self) -> ConnectionManager {
        self.inner.conn.clone()
    }

    /// Loads the library when needed (see [`installer::install`]) and remembers how to call it.
    pub async fn ensure_functions(&self) -> Result<InstallReport, BrokerError> {
        let mut conn = self.connection();
        let report = installer::install(&mut conn, &self.inner.lib).await?;
        *self
            .inner
            .mode
            .write()
            .expect("the mode lock is never poisoned: no panics while held") = report.mode.clone();
        Ok(report)
    }

    /// Runs the library through `EVALSHA` even on Redis 7 (tests of the < 7.0 path).
    pub async fn use_eval_mode(&self) -> Result<(), BrokerError> {
        let mut conn = self.connection();
        let sha = installer::load_script(&mut conn, &self.inner.lib).await?;
        *self
            .inner
            .mode
            .write()
            .expect("the mode lock is never poisoned: no panics while held") = Mode::Eval { sha };
        Ok(())
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.inner.opts.key_prefix)
    }

    fn command(&self, function: &str, args: &[&str]) -> redis::Cmd {
        let mode = self
            .inner
            .mode
            .read()
            .expect("the mode lock is never poisoned: no panics while held")
            .clone();
        match mode {
            Mode::Functions => {
                let mut c = cmd("FCALL");
                c.arg(function).arg(0).arg(args);
                c
            }
            Mode::Eval { sha } => {
                let mut c = cmd("EVALSHA");
                c.arg(sha).arg(0).arg(function).arg(args);
                c
            }
        }
    }

    /// Calls a library function. When the library is missing (a restarted or flushed Redis, or
    /// a script cache without our script), it is loaded again and the call retried once, so a
    /// worker never idles silently on a missing function (defect 4).
    async fn call<T: FromRedisValue>(&self, function: &'static str, args: &[&str]) -> Result<T, BrokerError> {
        let mut conn = self.connection();
        match self.command(function, args).query_async::<T>(&mut conn).await {
            Ok(v) => Ok(v),
            Err(e) if self.library_missing(&e).await => {
                tracing::warn!(function, "the jobMatching library is missing; loading it again");
                self.ensure_functions().await?;
                // A Redis that lost the library (restarted empty) lost the workers too.
                self.register_again().await;
                self.command(function, args)
                    .query_async::<T>(&mut conn)
                    .await
                    .map_err(redis_err(function))
            }
            Err(source) => Err(BrokerError::Redis { op: function, source }),
        }
    }

    async fn library_missing(&self, e: &RedisError) -> bool {
        match e.kind() {
            ErrorKind::Server(ServerErrorKind::NoScript) => true,
            ErrorKind::Server(ServerErrorKind::ResponseError) => {
                let functions = matches!(
                    *self
                        .inner
                        .mode
                        .read()
                        .expect("the mode lock is never poisoned: no panics while held"),
                    Mode::Functions
                );
                let mut conn = self.connection();
                functions
                    && installer::loaded_version(&mut conn)
                        .await
                        .is_ok_and(|v| v.as_deref() != Some(self.inner.lib.version()))
            }
            _ => false,
        }
    }

    /// One claim attempt: the best job this worker can run, or `None`.
    pub async fn claim(&self, caps: &Capabilities) -> Result<Option<ClaimedJob>, BrokerError> {
        self.claim_json(&caps.to_json()).await
    }

    async fn claim_json(&self, caps_json: &str) -> Result<Option<ClaimedJob>, BrokerError> {
        let max = self.inner.opts.max_examine.to_string();
        let lease = self.inner.opts.lease.as_millis().to_string();
        loop {
            let started = std::time::Instant::now();
            // Bytes, not a string: a job field with invalid UTF-8 must fail that job, not the call.
            let reply: Option<Vec<u8>> = self
                .call(
                    "findMatchingJob",
                    &[caps_json, &max, &lease, &self.inner.opts.key_prefix],
                )
                .await?;
            if let Some(observe) = self.inner.observer.get() {
                observe(started.elapsed(), reply.is_some());
            }
            let Some(reply) = reply else { return Ok(None) };
            let job = match String::from_utf8(reply) {
                Ok(text) => parse_claim(&text)?,
                Err(e) => {
                    let field = invalid_utf8_field(e.as_bytes());
                    let mut job = parse_claim(&String::from_utf8_lossy(e.as_bytes()))?;
                    job.payload_error = Some(format!("invalid UTF-8 in job field `{field}`"));
                    job
                }
            };
            match job.payload_error {
                None => return Ok(Some(job.job)),
                Some(reason) => {
                    // The job cannot run anywhere; fail it at once with the reason.
                    tracing::warn!(job_id = %job.job.id, %reason, "claimed a job that cannot run; failing it");
                    match self.fail(&job.job, &reason, false).await {
                        Ok(_) => {}
                        // An id that is not UTF-8 itself cannot be named back; its lease runs out.
                        Err(BrokerError::LeaseLost { .. } | BrokerError::Cancelled { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    fn receiver(&self, service: &str) -> watch::Receiver<u64> {
        let mut map = self
            .inner
            .wake
            .lock()
            .expect("the wake lock is never poisoned: no panics while held");
        map.entry(service.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    fn wake(&self, service: Option<&str>) {
        let map = self
            .inner
            .wake
            .lock()
            .expect("the wake lock is never poisoned: no panics while held");
        match service.and_then(|s| map.get(s)) {
            Some(tx) => tx.send_modify(|v| *v = v.wrapping_add(1)),
            None if service.is_none() => {
                for tx in map.values() {
                    tx.send_modify(|v| *v = v.wrapping_add(1));
                }
            }
            None => {}
        }
    }

    /// Waits until a job this worker can run is claimed, or `shutdown` (then `None`).
    ///
    /// Claims at once; when nothing matches it waits for a wake-up of one of its services
    /// (`job_submitted`, `job_requeued`, delivered by [`Broker::run_events`]) or the safety
    /// poll, then tries again.
    pub async fn claim_next(
        &self,
        caps: &Capabilities,
        shutdown: &CancellationToken,
    ) -> Result<Option<ClaimedJob>, BrokerError> {
        let caps_json = caps.to_json();
        let services = if caps.job_service_required_map.is_empty() {
            &caps.connectors
        } else {
            &caps.job_service_required_map
        };
        let mut rxs: Vec<watch::Receiver<u64>> = services.iter().map(|s| self.receiver(s)).collect();
        // A backlog queued while no machine listened is claimed in order only once it is in
        // the index: wait for run_events' catch-up (it indexes 100,000 jobs in seconds), but
        // not longer than a safety poll at a time, so a slow catch-up never stalls a worker.
        let mut catch_up = self.inner.catch_up.subscribe();
        while *catch_up.borrow_and_update() == CatchUp::Running {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                _ = catch_up.changed() => {}
                () = tokio::time::sleep(self.inner.opts.safety_poll) => break,
            }
        }
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            for rx in &mut rxs {
                rx.borrow_and_update();
            }
            if let Some(job) = self.claim_json(&caps_json).await? {
                return Ok(Some(job));
            }
            let woken = async {
                if rxs.is_empty() {
                    std::future::pending::<()>().await;
                }
                let _ = futures_util::future::select_all(rxs.iter_mut().map(|rx| Box::pin(rx.changed()))).await;
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = woken => {}
                () = tokio::time::sleep(self.inner.opts.safety_poll) => {}
            }
        }
    }

    /// `cancel_job` notices (job ids) seen by [`Broker::run_events`].
    pub fn cancellations(&self) -> broadcast::Receiver<String> {
        self.inner.cancels.subscribe()
    }

    /// The machine's one pub/sub connection: indexes submitted jobs, wakes claimers, forwards
    /// cancellations. Reconnects with backoff until `shutdown`; after a reconnect every waiter
    /// is woken because messages may have been missed.
    pub async fn run_events(&self, shutdown: CancellationToken) -> Result<(), BrokerError> {
        let channels = [
            self.key("job_submitted"),
            self.key("job_requeued"),
            self.key("cancel_job"),
        ];
        // Claimers wait for the first catch-up from now on (until Done).
        self.inner.catch_up.send_if_modified(|c| {
            let first = *c == CatchUp::NotRunning;
            if first {
                *c = CatchUp::Running;
            }
            first
        });
        let mut backoff = Duration::from_millis(100);
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            match self.subscribe(&channels).await {
                Ok(mut pubsub) => {
                    backoff = Duration::from_millis(100);
                    // Jobs submitted while we were not listening are indexed before waking.
                    if let Err(e) = self.catch_up_index().await {
                        tracing::warn!(error = %e, "failed to catch up the pending index; claims repair it in steps");
                    }
                    self.inner.catch_up.send_replace(CatchUp::Done);
                    self.wake(None);
                    let mut messages = pubsub.on_message();
                    loop {
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            msg = messages.next() => match msg {
                                Some(msg) => self.handle_message(&channels, &msg).await,
                                None => break,
                            },
                        }
                    }
                    tracing::warn!("the redis subscription dropped; reconnecting");
                }
                Err(e) => tracing::warn!(error = %e, "failed to subscribe to the broker channels; retrying"),
            }
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(10));
        }
    }

    async fn subscribe(&self, channels: &[String]) -> Result<redis::aio::PubSub, BrokerError> {
        let mut pubsub = self
            .inner
            .client
            .get_async_pubsub()
            .await
            .map_err(redis_err("SUBSCRIBE"))?;
        pubsub.subscribe(channels).await.map_err(redis_err("SUBSCRIBE"))?;
        Ok(pubsub)
    }

    async fn handle_message(&self, channels: &[String; 3], msg: &redis::Msg) {
        let channel = msg.get_channel_name();
        let payload: String = msg.get_payload().unwrap_or_default();
        let doc: Value = serde_json::from_str(&payload).unwrap_or(Value::Null);
        let job_id = doc.get("job_id").and_then(Value::as_str).unwrap_or_default();
        let service = doc.get("service_required").and_then(Value::as_str);
        if channel == channels[0] {
            // Jobs the API adds go into jobs:pending only; index them before anyone claims.
            if !job_id.is_empty()
                && let Err(e) = self.index_job(job_id).await
            {
                tracing::debug!(job_id, error = %e, "failed to index a submitted job; the claim-side sweep will");
            }
            self.wake(service);
        } else if channel == channels[1] {
            self.wake(service);
        } else if channel == channels[2] && !job_id.is_empty() {
            // The API may have taken a pending job out of jobs:pending; drop it from the index.
            if let Err(e) = self.index_job(job_id).await {
                tracing::debug!(job_id, error = %e, "failed to re-check a cancelled job's index entry");
            }
            let _ = self.inner.cancels.send(job_id.to_owned());
        }
    }

    /// Indexes the jobs the API added while no machine listened, in bounded steps, until the
    /// index and `jobs:pending` agree or one full pass over `jobs:pending` is done.
    pub async fn catch_up_index(&self) -> Result<(), BrokerError> {
        let mut wrapped = 0;
        loop {
            let r: Vec<u64> = self.call("sweepIndex", &[&self.inner.opts.key_prefix, "5000"]).await?;
            if r.first() == r.get(1) {
                return Ok(());
            }
            if r.get(2) == Some(&0) {
                wrapped += 1;
                if wrapped >= 2 {
                    return Ok(());
                }
            }
        }
    }

    /// Puts a job of `jobs:pending` into the matching index (idempotent).
    pub async fn index_job(&self, job_id: &str) -> Result<String, BrokerError> {
        self.call("indexJob", &[&self.inner.opts.key_prefix, job_id]).await
    }

    async fn lifecycle(&self, function: &'static str, job: &ClaimedJob, args: &[&str]) -> Result<String, BrokerError> {
        let mut all = vec![
            self.inner.opts.key_prefix.as_str(),
            job.id.as_str(),
            job.worker_id.as_str(),
        ];
        all.extend_from_slice(args);
        let status: String = self.call(function, &all).await?;
        match status.as_str() {
            "cancelled" => Err(BrokerError::Cancelled { job_id: job.id.clone() }),
            "lost" => Err(BrokerError::LeaseLost {
                job_id: job.id.clone(),
                worker_id: job.worker_id.clone(),
            }),
            _ => Ok(status),
        }
    }

    /// Marks the job `in_progress`.
    pub async fn start(&self, job: &ClaimedJob) -> Result<(), BrokerError> {
        self.lifecycle("startJob", job, &[]).await.map(drop)
    }

    /// Reports progress (0-100, rounded to a whole percentage); `step` is (current_step,
    /// total_steps), else the job's own.
    pub async fn progress(
        &self,
        job: &ClaimedJob,
        pct: f64,
        message: &str,
        step: Option<(u32, u32)>,
    ) -> Result<(), BrokerError> {
        // Whole percentages: the API and monitor show them as they are, and 33.333333333333336
        // helps nobody.
        let pct = format!("{}", pct.clamp(0.0, 100.0).round());
        let (current, total) = match step {
            Some((c, t)) => (c.to_string(), t.to_string()),
            None => (
                job.field("current_step").unwrap_or_default().to_owned(),
                job.field("total_steps").unwrap_or_default().to_owned(),
            ),
        };
        self.lifecycle("updateJobProgress", job, &[&pct, message, &current, &total])
            .await
            .map(drop)
    }

    /// Completes the job with its result (any JSON).
    pub async fn complete(&self, job: &ClaimedJob, result: &Value) -> Result<(), BrokerError> {
        let result = result.to_string();
        self.lifecycle("completeJob", job, &[&result, "completed"])
            .await
            .map(drop)
    }

    /// Fails the job; a retryable failure re-queues it (original score, `retry_count` + 1,
    /// this worker held off it) until `max_retries`.
    pub async fn fail(&self, job: &ClaimedJob, error: &str, retryable: bool) -> Result<FailOutcome, BrokerError> {
        let holdoff = self.inner.opts.failed_holdoff.as_millis().to_string();
        let delay = self
            .inner
            .opts
            .retry_delay
            .delay(job.retry_count(), rand::random::<f64>())
            .as_millis()
            .to_string();
        let r = self
            .lifecycle(
                "failJob",
                job,
                &[error, if retryable { "1" } else { "0" }, &holdoff, &delay],
            )
            .await?;
        Ok(if r == "retried" {
            FailOutcome::Retried
        } else {
            FailOutcome::Failed
        })
    }

    /// Returns the job to the queue without penalty (graceful shutdown).
    pub async fn return_job(&self, job: &ClaimedJob) -> Result<(), BrokerError> {
        self.lifecycle("returnJob", job, &["returned"]).await.map(drop)
    }

    /// Extends the lease by the configured lease time.
    pub async fn renew_lease(&self, job: &ClaimedJob) -> Result<LeaseStatus, BrokerError> {
        let lease = self.inner.opts.lease.as_millis().to_string();
        match self.lifecycle("renewLease", job, &[&lease]).await {
            Ok(_) => Ok(LeaseStatus::Held),
            Err(BrokerError::Cancelled { .. }) => Ok(LeaseStatus::Cancelled),
            Err(BrokerError::LeaseLost { .. }) => Ok(LeaseStatus::Lost),
            Err(e) => Err(e),
        }
    }

    /// Returns expired leases' jobs to the queue (or fails them after `max_retries`) and repairs
    /// a bounded part of the index. Safe to run from every machine at once.
    pub async fn reap_expired_leases(&self) -> Result<ReapReport, BrokerError> {
        let counts: Vec<u64> = self
            .call("reapExpiredLeases", &[&self.inner.opts.key_prefix, "100", "1000"])
            .await?;
        Ok(ReapReport {
            requeued: counts.first().copied().unwrap_or(0),
            failed: counts.get(1).copied().unwrap_or(0),
            cleaned: counts.get(2).copied().unwrap_or(0),
        })
    }

    /// Runs the reaper every `every` until `shutdown`; errors are logged and retried.
    pub async fn run_reaper(&self, every: Duration, shutdown: CancellationToken) -> Result<(), BrokerError> {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(every) => {}
            }
            match self.reap_expired_leases().await {
                Ok(r) if r.requeued + r.failed > 0 => {
                    tracing::info!(
                        requeued = r.requeued,
                        failed = r.failed,
                        "returned jobs whose lease expired"
                    );
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "failed to reap expired leases"),
            }
        }
    }

    /// The machine's background broker work until `shutdown`: the event subscription
    /// ([`Broker::run_events`]) and the reaper every `reap_every` ([`Broker::run_reaper`]).
    pub async fn run(&self, reap_every: Duration, shutdown: CancellationToken) -> Result<(), BrokerError> {
        let (events, reaper) = tokio::join!(self.run_events(shutdown.clone()), self.run_reaper(reap_every, shutdown));
        events.and(reaper)
    }

    /// Registers a worker in `worker:<id>` (idle) with its capabilities; it is registered again
    /// by itself whenever Redis is found empty.
    pub async fn register_worker(&self, caps: &Capabilities) -> Result<(), BrokerError> {
        self.inner
            .registered
            .lock()
            .expect("the registry lock is never poisoned: no panics while held")
            .insert(caps.worker_id.clone(), caps.clone());
        self.write_registration(caps).await
    }

    /// Registers every worker of this broker again (Redis came back without them).
    async fn register_again(&self) {
        let all: Vec<Capabilities> = self
            .inner
            .registered
            .lock()
            .expect("the registry lock is never poisoned: no panics while held")
            .values()
            .cloned()
            .collect();
        for caps in all {
            match self.write_registration(&caps).await {
                Ok(()) => tracing::info!(worker_id = %caps.worker_id, "registered the worker again in an empty redis"),
                Err(e) => {
                    tracing::warn!(worker_id = %caps.worker_id, error = %e, "failed to register the worker again")
                }
            }
        }
    }

    async fn write_registration(&self, caps: &Capabilities) -> Result<(), BrokerError> {
        let now = now_ms();
        let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let key = self.key(&format!("worker:{}", caps.worker_id));
        let mut conn = self.connection();
        redis::pipe()
            .atomic()
            .hset_multiple(
                &key,
                &[
                    ("worker_id", caps.worker_id.clone()),
                    ("machine_id", caps.machine_id.clone()),
                    ("status", "idle".to_owned()),
                    ("current_job_id", String::new()),
                    ("capabilities", caps.to_json()),
                    ("connected_at", at.clone()),
                    ("last_status_change", at),
                    ("last_heartbeat", now.to_string()),
                ],
            )
            .ignore()
            .expire(&key, WORKER_TTL_SECS)
            .ignore()
            .set_ex(format!("{key}:heartbeat"), now.to_string(), 60)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err("register worker"))
    }

    /// Rewrites the `capabilities` of a registered worker, e.g. when the models on its disk
    /// changed; the next claim matches against them.
    pub async fn update_capabilities(&self, caps: &Capabilities) -> Result<(), BrokerError> {
        let key = self.key(&format!("worker:{}", caps.worker_id));
        let mut conn = self.connection();
        cmd("HSET")
            .arg(&key)
            .arg("capabilities")
            .arg(caps.to_json())
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err("update worker capabilities"))
    }

    /// The contract's heartbeat: `worker:<id>` `last_heartbeat` and `worker:<id>:heartbeat`
    /// (60 s TTL), and the hash's own expiry pushed back. Call every 30 s or sooner. A worker
    /// whose registration is gone (Redis came back empty) is registered again.
    pub async fn heartbeat(&self, worker_id: &str) -> Result<(), BrokerError> {
        let now = now_ms().to_string();
        let key = self.key(&format!("worker:{worker_id}"));
        let mut conn = self.connection();
        let (registered,): (bool,) = redis::pipe()
            .atomic()
            .hexists(&key, "worker_id")
            .hset(&key, "last_heartbeat", &now)
            .ignore()
            .expire(&key, WORKER_TTL_SECS)
            .ignore()
            .set_ex(format!("{key}:heartbeat"), &now, 60)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(redis_err("heartbeat"))?;
        if !registered {
            let caps = self
                .inner
                .registered
                .lock()
                .expect("the registry lock is never poisoned: no panics while held")
                .get(worker_id)
                .cloned();
            if let Some(caps) = caps {
                tracing::info!(worker_id, "the worker's registration is gone; registering it again");
                self.write_registration(&caps).await?;
            }
        }
        Ok(())
    }

    /// Submits a job exactly as the API does: the job hash, `jobs:pending` with the contract's
    /// score, and `job_submitted`. Returns the job id.
    pub async fn submit(&self, job: &NewJob) -> Result<String, BrokerError> {
        let id = new_job_id();
        let created = SystemTime::now();
        let created_ms = created
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX));
        let created_at = humantime::format_rfc3339_millis(created).to_string();
        let score = pending_score(job.priority, job.workflow_priority, created_ms, job.workflow_datetime);
        let mut fields: Vec<(&str, String)> = vec![
            ("id", id.clone()),
            ("service_required", job.service.clone()),
            ("priority", job.priority.to_string()),
            ("payload", job.payload.to_string()),
            ("requirements", job.requirements.clone()),
            ("customer_id", job.customer_id.clone()),
            ("created_at", created_at),
            ("status", "pending".to_owned()),
            ("retry_count", "0".to_owned()),
            ("max_retries", job.max_retries.to_string()),
            ("workflow_id", job.workflow_id.clone()),
        ];
        if let Some(p) = job.workflow_priority {
            fields.push(("workflow_priority", p.to_string()));
        }
        if let Some(t) = job.workflow_datetime {
            fields.push(("workflow_datetime", t.to_string()));
        }
        let message = serde_json::json!({
            "job_id": id,
            "service_required": job.service,
            "priority": job.priority,
            "requirements": job.requirements,
            "customer_id": job.customer_id,
            "workflow_id": job.workflow_id,
            "timestamp": created_ms,
        });
        let mut conn = self.connection();
        redis::pipe()
            .atomic()
            .zadd(self.key("jobs:pending"), &id, score)
            .ignore()
            .hset_multiple(self.key(&format!("job:{id}")), &fields)
            .ignore()
            .publish(self.key("job_submitted"), message.to_string())
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err("submit job"))?;
        Ok(id)
    }

    /// Cancels a job the way the API does (`failed`, "Job cancelled by user", `cancel_job`).
    pub async fn cancel(&self, job_id: &str) -> Result<CancelOutcome, BrokerError> {
        let r: String = self
            .call("cancelJob", &[&self.inner.opts.key_prefix, job_id, CANCEL_ERROR])
            .await?;
        Ok(match r.as_str() {
            "cancelled" => CancelOutcome::Cancelled,
            "not_found" => CancelOutcome::NotFound,
            other => CancelOutcome::AlreadyEnded(other.trim_start_matches("already_").to_owned()),
        })
    }

    /// The job hash and its progress hash; `None` when the job does not exist.
    pub async fn show(&self, job_id: &str) -> Result<Option<JobView>, BrokerError> {
        let mut conn = self.connection();
        let (job, progress): (BTreeMap<String, String>, BTreeMap<String, String>) = redis::pipe()
            .hgetall(self.key(&format!("job:{job_id}")))
            .hgetall(self.key(&format!("job:{job_id}:progress")))
            .query_async(&mut conn)
            .await
            .map_err(redis_err("show job"))?;
        if job.is_empty() {
            return Ok(None);
        }
        let waiting = match job.get("status").map(String::as_str) {
            None | Some("" | "pending" | "queued") => Some(
                self.why_waiting(job_id, &job)
                    .await
                    .unwrap_or_else(|e| format!("cannot tell which workers could run it: {e}")),
            ),
            Some(_) => None,
        };
        Ok(Some(JobView { job, progress, waiting }))
    }

    /// Which registered workers (`worker:*` with capabilities) could run a waiting job.
    async fn why_waiting(&self, job_id: &str, job: &BTreeMap<String, String>) -> Result<String, BrokerError> {
        let mut conn = self.connection();
        let pattern = self.key("worker:*");
        let prefix_len = pattern.len() - 1;
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("SCAN"))?;
            // `worker:<id>` only, not the `worker:<id>:...` keys beside it.
            keys.extend(
                batch
                    .into_iter()
                    .filter(|k| k.get(prefix_len..).is_some_and(|id| !id.contains(':'))),
            );
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.hget(k, "capabilities");
        }
        let caps: Vec<Option<String>> = pipe.query_async(&mut conn).await.map_err(redis_err("show job"))?;
        let field = |k: &str| job.get(k).cloned().unwrap_or_default();
        let service = Some(field("service_required"))
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| field("job_type"));
        let pending = super::reference::PendingJob {
            id: job_id.to_owned(),
            score: 0.0,
            created_ms: 0,
            seq: 0,
            service: service.clone(),
            requirements: field("requirements"),
            customer_id: field("customer_id"),
            workflow_id: field("workflow_id"),
            payload: field("payload"),
            held_off_worker: None,
        };
        let workers: Vec<Value> = caps
            .into_iter()
            .flatten()
            .filter_map(|c| serde_json::from_str(&c).ok())
            .collect();
        let accepting = workers
            .iter()
            .filter(|w| {
                ["job_service_required_map", "services"].iter().any(|k| {
                    w.get(*k)
                        .and_then(Value::as_array)
                        .is_some_and(|l| l.iter().any(|s| s.as_str() == Some(service.as_str())))
                })
            })
            .count();
        let able = workers
            .iter()
            .filter(|w| super::reference::job_matches(w, &pending))
            .count();
        Ok(if accepting == 0 {
            format!(
                "no registered worker accepts service `{service}` ({} workers registered)",
                workers.len()
            )
        } else if able == 0 {
            format!(
                "{accepting} registered workers accept `{service}`, but none meets the job's requirements, customer or workflow"
            )
        } else {
            format!("{able} registered workers can run it; it waits for one of them to be free")
        })
    }

    /// Jobs (id and hash), optionally only those with `status`, newest first, at most `limit`.
    pub async fn list(&self, status: Option<&str>, limit: usize) -> Result<Vec<BTreeMap<String, String>>, BrokerError> {
        let mut conn = self.connection();
        let pattern = self.key("job:*");
        let mut keys: Vec<String> = Vec::new();
        let mut cursor: u64 = 0;
        loop {
            let (next, batch): (u64, Vec<String>) = cmd("SCAN")
                .arg(cursor)
                .arg("MATCH")
                .arg(&pattern)
                .arg("COUNT")
                .arg(1000)
                .query_async(&mut conn)
                .await
                .map_err(redis_err("SCAN"))?;
            keys.extend(batch.into_iter().filter(|k| !k.ends_with(":progress")));
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.hgetall(k);
        }
        let hashes: Vec<BTreeMap<String, String>> =
            pipe.query_async(&mut conn).await.map_err(redis_err("list jobs"))?;
        let mut jobs: Vec<BTreeMap<String, String>> = hashes
            .into_iter()
            .filter(|h| !h.is_empty())
            .filter(|h| status.is_none_or(|s| h.get("status").map(String::as_str) == Some(s)))
            .collect();
        jobs.sort_by(|a, b| b.get("created_at").cmp(&a.get("created_at")));
        jobs.truncate(limit);
        Ok(jobs)
    }
}

/// The external-API limits section of the library (`acquireLimit`, `recordLimitUsage`,
/// `deferJob`, `clearLimitReason`), used by `connectors::limits` and the workers.
impl Broker {
    /// Calls a limits function with the key prefix as its first argument.
    pub(crate) async fn call_limits<T: FromRedisValue>(
        &self,
        function: &'static str,
        args: &[&str],
    ) -> Result<T, BrokerError> {
        let mut all = vec![self.inner.opts.key_prefix.as_str()];
        all.extend_from_slice(args);
        self.call(function, &all).await
    }

    /// The key prefix of every key this broker touches (`""` in production).
    pub(crate) fn key_prefix(&self) -> &str {
        &self.inner.opts.key_prefix
    }

    /// Returns the job to the queue in its place because a daily quota stops it, recording
    /// `reason` and `until_ms` (epoch ms) in the job for `machine jobs show`.
    pub async fn defer(&self, job: &ClaimedJob, reason: &str, until_ms: i64) -> Result<(), BrokerError> {
        let until = until_ms.to_string();
        self.lifecycle("deferJob", job, &[reason, &until]).await.map(drop)
    }
}

fn new_job_id() -> String {
    let b: u128 = rand::random();
    // A version-4 UUID, as the API generates.
    let b = (b & !(0xF000u128 << 64) | (0x4000u128 << 64)) & !(0xC000u128 << 48) | (0x8000u128 << 48);
    let h = format!("{b:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The job field whose value (or name) is not UTF-8 in a raw claim reply, `?` when the reply
/// cannot be read that far. The reply is `{"jobId":..,"job":{..}}` and, a job being a Redis
/// hash, every field of `job` is a string.
fn invalid_utf8_field(reply: &[u8]) -> String {
    const JOB: &[u8] = b"\"job\":{";
    let Some(start) = reply.windows(JOB.len()).position(|w| w == JOB) else {
        return "?".to_owned();
    };
    let mut at = start + JOB.len();
    while let Some((key, after_key)) = json_string(reply, at) {
        let Some((value, after_value)) = json_string(reply, after_key + 1) else {
            break;
        };
        if std::str::from_utf8(key).is_err() || std::str::from_utf8(value).is_err() {
            return String::from_utf8_lossy(key).into_owned();
        }
        at = after_value + 1;
    }
    "?".to_owned()
}

/// The raw bytes inside the JSON string that starts at `at`, and the index after it.
fn json_string(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let mut j = at + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some((&b[at + 1..j], j + 1)),
            _ => j += 1,
        }
    }
    None
}

struct ParsedClaim {
    job: ClaimedJob,
    payload_error: Option<String>,
}

fn parse_claim(reply: &str) -> Result<ParsedClaim, BrokerError> {
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "jobId")]
        job_id: String,
        job: BTreeMap<String, Value>,
    }
    let r: Reply = serde_json::from_str(reply).map_err(|e| BrokerError::Protocol {
        op: "findMatchingJob",
        detail: e.to_string(),
    })?;
    let fields: BTreeMap<String, String> = r
        .job
        .into_iter()
        .map(|(k, v)| {
            let v = match v {
                Value::String(s) => s,
                other => other.to_string(),
            };
            (k, v)
        })
        .collect();
    let worker_id = fields.get("worker_id").cloned().unwrap_or_default();
    let service = fields
        .get("service_required")
        .filter(|s| !s.is_empty())
        .or_else(|| fields.get("job_type"))
        .cloned()
        .unwrap_or_default();
    let raw_payload = fields.get("payload").map(String::as_str).unwrap_or_default();
    let (payload, payload_error) = if raw_payload.trim().is_empty() {
        (Value::Object(serde_json::Map::new()), None)
    } else {
        match serde_json::from_str(raw_payload) {
            Ok(v) => (v, None),
            Err(e) => (Value::Null, Some(format!("malformed payload JSON: {e}"))),
        }
    };
    Ok(ParsedClaim {
        job: ClaimedJob {
            id: r.job_id,
            worker_id,
            service,
            payload,
            fields,
        },
        payload_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn score_follows_the_contract() {
        // Higher priority wins; within a priority the older job wins.
        let old = pending_score(50, None, 1_750_000_000_000, None);
        let new = pending_score(50, None, 1_750_000_100_000, None);
        assert!(old > new);
        assert!(pending_score(60, None, 1_750_000_100_000, None) > old);
        // A workflow's priority and start time replace the job's own.
        assert_eq!(
            pending_score(10, Some(70), 1_750_000_100_000, Some(1_750_000_000_999)),
            70.0 * 1e15 - 1_750_000_000.0
        );
    }

    #[test]
    fn job_ids_are_uuid_v4() {
        let id = new_job_id();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }

    #[test]
    fn invalid_utf8_names_its_field() {
        let mut reply = br#"{"jobId":"j1","job":{"id":"j1","payload":"{\"a\":\"x"#.to_vec();
        reply.extend_from_slice(&[0xff, 0xfe]);
        reply.extend_from_slice(br#"\"}","status":"assigned"}}"#);
        assert_eq!(invalid_utf8_field(&reply), "payload");
        assert_eq!(invalid_utf8_field(b"nonsense"), "?");
    }

    #[test]
    fn retry_delays_grow_are_capped_and_jittered() {
        let d = RetryDelay::default();
        assert_eq!(d.delay(0, 0.0), Duration::from_secs(5));
        assert_eq!(d.delay(1, 0.0), Duration::from_secs(10));
        assert_eq!(d.delay(30, 0.0), Duration::from_secs(300));
        assert_eq!(d.delay(0, 1.0), Duration::from_secs(4));
    }

    proptest::proptest! {
        #[test]
        fn retry_delays_stay_within_their_bounds(
            initial_ms in 0u64..60_000, factor in 1.0f64..5.0, max_ms in 0u64..600_000,
            jitter in 0.0f64..1.0, retry in 0u32..200, random in 0.0f64..1.0,
        ) {
            let p = RetryDelay {
                initial: Duration::from_millis(initial_ms),
                factor,
                max: Duration::from_millis(max_ms),
                jitter,
            };
            let d = p.delay(retry, random);
            proptest::prop_assert!(d <= p.max);
            proptest::prop_assert!(p.delay(retry + 1, random) >= d);
        }
    }

    #[test]
    fn claim_replies_parse() {
        let r = parse_claim(
            r#"{"jobId":"j1","job":{"id":"j1","service_required":"comfyui","payload":"{\"a\":1}","worker_id":"w"}}"#,
        )
        .expect("a well-formed reply parses");
        assert_eq!(r.job.payload["a"], 1);
        assert_eq!(r.job.service, "comfyui");
        assert!(r.payload_error.is_none());
        let bad = parse_claim(r#"{"jobId":"j1","job":{"payload":"{oops"}}"#).expect("parses");
        assert!(bad.payload_error.is_some());
    }
}

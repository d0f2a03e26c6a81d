//! One worker: the loop that waits for its services, claims a job, runs it through the right
//! connector with heartbeats, lease renewal, progress, cancellation and a time limit beside it,
//! and reports exactly one outcome.
//!
//! A claimed job ends in exactly one of: completed, failed (retryable or not; the broker decides
//! whether a retryable failure is re-queued), returned (shutdown), cancelled (the API said so;
//! the result is discarded) or lost (the lease went to someone else; nothing is written).
//! Redis errors never end the worker: claims back off and retry, and an outcome is reported
//! again and again until Redis answers (its fencing then decides whether it still counts).
//!
//! A job stopped by an external API's daily quota is returned to the queue in its place with
//! the reason (`limit_reason`, `limit_until`), and until the quota day ends the worker claims
//! without the services of that API (or, for a customer's own quota, without that customer's
//! jobs), so it takes other work meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::capabilities::ModelDirs;
use super::hold::{Blame, HoldKind, Holds};
use super::pause::JobEnds;
use super::quarantine::{Quarantine, QuarantinePolicy};
use crate::broker::{Broker, BrokerError, Capabilities, ClaimedJob, FailOutcome, LeaseStatus};
use crate::connectors::store::{self, OutputStore, OutputTarget};
use crate::connectors::{
    Billing, Connector, ConnectorError, ErrorClass, Job, JobOutput, ProgressReceiver, ProgressSink,
};
use crate::logging::error_chain;

/// How often an idle worker rescans its models folders, so that models arriving or leaving
/// (a download, an eviction, an operator) reach its advertised capabilities.
const MODELS_RESCAN: Duration = Duration::from_secs(2);

/// The state of a worker, for the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerState {
    /// Registering with the broker.
    Starting,
    /// Its services are not ready (starting, or crash-looping); it does not claim.
    WaitingForServices,
    /// A hold keeps it from claiming (its GPU faulted, it is quarantined, ...); the status's
    /// `reason` says which.
    Held,
    /// Waiting for a job.
    Idle,
    /// Running a job.
    Busy,
    /// Shutting down; its job may finish within the drain period.
    Draining,
    /// Stopped.
    Stopped,
}

/// The job a worker runs now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CurrentJob {
    /// The job id.
    pub job_id: String,
    /// Its `service_required`.
    pub service: String,
    /// Last reported progress, 0-100.
    pub progress: f64,
    /// Last progress message.
    pub message: String,
}

/// How many jobs ended which way.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct JobCounts {
    /// Jobs claimed.
    pub claimed: u64,
    /// Jobs completed.
    pub completed: u64,
    /// Jobs failed (whether or not the broker re-queued them).
    pub failed: u64,
    /// Jobs returned to the queue at shutdown, or because a daily quota stopped them.
    pub returned: u64,
    /// Jobs cancelled by the API while running here.
    pub cancelled: u64,
    /// Jobs whose lease this worker lost.
    pub lost: u64,
}

/// What a worker is doing, published on a watch channel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkerStatus {
    /// The worker id.
    pub worker_id: String,
    /// Its state.
    pub state: WorkerState,
    /// The job it runs, when busy.
    pub current_job: Option<CurrentJob>,
    /// Outcomes so far.
    pub counts: JobCounts,
    /// The last error it met (a Redis outage, a failed job), for operators.
    pub last_error: Option<String>,
    /// When its state or job last changed, epoch milliseconds.
    pub last_activity_ms: u64,
    /// Why it must not claim now (its holds' reasons), when it must not.
    pub hold: Option<String>,
    /// The kinds of its holds.
    pub held_by: Vec<HoldKind>,
}

/// How a job ended here.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum JobOutcome {
    /// Completed; the result was written.
    Completed,
    /// Failed; `requeued` when the broker put it back for another attempt.
    Failed {
        /// Whether the failure was retryable.
        retryable: bool,
        /// Whose fault it was.
        blame: Blame,
        /// Whether the broker re-queued it.
        requeued: bool,
        /// The reason written to the job.
        error: String,
    },
    /// Returned to the queue at shutdown, or because a daily quota stopped it.
    Returned,
    /// Cancelled by the API; the result was discarded.
    Cancelled,
    /// The lease was lost (or the outcome could not be reported before shutdown).
    Lost,
}

/// One finished job, for metrics and the benchmark.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct JobReport {
    /// The worker.
    pub worker_id: String,
    /// The job.
    pub job_id: String,
    /// Its `service_required`.
    pub service: String,
    /// How it ended.
    pub outcome: JobOutcome,
    /// Time spent in the connector.
    #[serde(with = "humantime_serde")]
    pub run: Duration,
    /// Time from the claim to the outcome written in Redis.
    #[serde(with = "humantime_serde")]
    pub total: Duration,
    /// What an external job used and cost (from its result's `billing`), when it completed.
    pub billing: Option<Billing>,
}

/// Timing knobs of a worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Heartbeat and lease renewal period.
    pub heartbeat: Duration,
    /// How long a running job may go on after shutdown before it is returned.
    pub drain: Duration,
    /// Time limit of a job that does not set its own.
    pub job_timeout: Duration,
}

/// Why a running job was stopped before its connector returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    Cancelled,
    Lost,
    Timeout,
    Shutdown,
    /// A hold that returns the job (its GPU faulted).
    Held,
}

/// A claimed job ready to run: its input and its checked output destination.
#[derive(Debug)]
struct Prepared {
    input: Job,
    target: OutputTarget,
}

/// A lifecycle write that the broker refused, or that could not be made before shutdown.
#[derive(Debug)]
enum NotWritten {
    Cancelled,
    Lost,
    GaveUp(BrokerError),
}

/// One worker, ready to run.
#[derive(Debug)]
pub struct Worker {
    caps: Capabilities,
    connectors: HashMap<String, Arc<dyn Connector>>,
    settings: WorkerSettings,
    store: Arc<OutputStore>,
    ready: Vec<watch::Receiver<bool>>,
    status: Arc<watch::Sender<WorkerStatus>>,
    reports: Option<broadcast::Sender<JobReport>>,
    /// Cancelled by a second signal: a running job is returned at once, without the drain.
    force: CancellationToken,
    deferrals: Vec<Deferral>,
    /// Where its models live; `None` keeps `caps.models` as given.
    models: Option<ModelDirs>,
    /// Why it must not claim now (see [`super::hold`]).
    holds: Holds,
    /// The GPU whose faults hold this worker, and their feed.
    gpu_watch: Option<(u32, watch::Receiver<Vec<crate::gpu::GpuHealth>>)>,
    quarantine: Quarantine,
    /// Told of each job's end, when the upkeep of its services looks after it.
    job_ends: Option<JobEnds>,
    /// The services its upkeep looks after, until the worker is started (see [`super::upkeep`]).
    kept: Vec<super::upkeep::Kept>,
}

/// Work this worker leaves alone until a daily quota resets.
#[derive(Debug, Clone)]
struct Deferral {
    /// Job services not claimed (an API's quota), or none.
    job_services: Vec<String>,
    /// A customer whose jobs are not claimed (the customer's own quota on an API).
    customer: Option<String>,
    until: Instant,
}

/// Aborts a spawned task when dropped, so no task outlives the job it belongs to.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Worker {
    /// A worker with these capabilities; `connectors` must serve every service in
    /// `caps.job_service_required_map` (checked by [`super::Workers::build`]).
    pub fn new(
        caps: Capabilities,
        connectors: HashMap<String, Arc<dyn Connector>>,
        settings: WorkerSettings,
        store: Arc<OutputStore>,
    ) -> Worker {
        let (status, _) = watch::channel(WorkerStatus {
            worker_id: caps.worker_id.clone(),
            state: WorkerState::Starting,
            current_job: None,
            counts: JobCounts::default(),
            last_error: None,
            last_activity_ms: crate::clock::now_ms(),
            hold: None,
            held_by: Vec::new(),
        });
        Worker {
            caps,
            connectors,
            settings,
            store,
            ready: Vec::new(),
            status: Arc::new(status),
            reports: None,
            force: CancellationToken::new(),
            deferrals: Vec::new(),
            models: None,
            holds: Holds::new(),
            gpu_watch: None,
            quarantine: Quarantine::new(QuarantinePolicy {
                after: 0,
                cooldown: Duration::ZERO,
            }),
            job_ends: None,
            kept: Vec::new(),
        }
    }

    /// Quarantines the worker by `policy` (a new worker never does).
    pub fn quarantine_on(&mut self, policy: QuarantinePolicy) {
        self.quarantine = Quarantine::new(policy);
    }

    /// Holds the worker while GPU `index` is faulted, as `health` reports it; followed for as
    /// long as the worker runs.
    pub fn follow_gpu(&mut self, index: u32, health: watch::Receiver<Vec<crate::gpu::GpuHealth>>) {
        self.gpu_watch = Some((index, health));
    }

    /// The worker's holds, for the sources that hold it (its GPU's health, upkeep).
    pub fn holds(&self) -> Holds {
        self.holds.clone()
    }

    /// The connector of `kind` this worker runs jobs through, if it has one.
    pub fn connector(&self, kind: crate::config::ConnectorKind) -> Option<Arc<dyn Connector>> {
        self.connectors.values().find(|c| c.kind() == kind).cloned()
    }

    /// Tells `ends` of every job's end and waits for its answer before claiming again (see
    /// [`super::pause`]).
    pub fn tell_job_ends(&mut self, ends: JobEnds) {
        self.job_ends = Some(ends);
    }

    /// Notes the services the upkeep looks after for this worker, set up when it starts.
    pub(super) fn keep(&mut self, kept: Vec<super::upkeep::Kept>) {
        self.kept = kept;
    }

    /// The services its upkeep looks after, taken when the worker starts.
    pub(super) fn take_kept(&mut self) -> Vec<super::upkeep::Kept> {
        std::mem::take(&mut self.kept)
    }

    /// Advertises the models found in `dirs`: scanned when the worker starts (after the
    /// installers) and rescanned while it waits for a job, so its capabilities follow the disk.
    pub fn follow_models(&mut self, dirs: ModelDirs) {
        self.models = Some(dirs);
    }

    /// The models on disk now, by job service; `None` when the worker follows no folders.
    async fn scan_models(&self) -> Option<BTreeMap<String, Vec<String>>> {
        let dirs = self.models.clone()?;
        // Walking a large models tree is blocking file-system work.
        tokio::task::spawn_blocking(move || dirs.scan()).await.ok()
    }

    /// Rescans the models folders; `true` when the advertised models changed.
    async fn rescan_models(&mut self) -> bool {
        let Some(models) = self.scan_models().await else {
            return false;
        };
        if models == self.caps.models {
            return false;
        }
        tracing::info!(worker = %self.id(), models = ?models, "the models on disk changed");
        self.caps.models = models;
        true
    }

    /// Writes changed capabilities to the broker, retrying through Redis outages until
    /// `shutdown`.
    async fn publish_capabilities(&self, broker: &Broker, shutdown: &CancellationToken) {
        let mut backoff = RedisBackoff::default();
        while let Err(e) = broker.update_capabilities(&self.caps).await {
            tracing::warn!(worker = %self.id(), error = %error_chain(&e), "failed to update capabilities; retrying");
            if !backoff.sleep(shutdown).await {
                return;
            }
        }
    }

    /// The worker id.
    pub fn id(&self) -> &str {
        &self.caps.worker_id
    }

    /// Its capabilities.
    pub fn capabilities(&self) -> &Capabilities {
        &self.caps
    }

    /// Gates claiming on these readiness signals (one per service, `true` = ready): the worker
    /// claims only while all are `true`.
    pub fn wait_for(&mut self, ready: Vec<watch::Receiver<bool>>) {
        self.ready = ready;
    }

    /// Returns a running job at once when `force` is cancelled (after `shutdown`).
    pub fn force_on(&mut self, force: CancellationToken) {
        self.force = force;
    }

    /// Publishes a [`JobReport`] for each finished job on `reports`.
    pub fn report_to(&mut self, reports: broadcast::Sender<JobReport>) {
        self.reports = Some(reports);
    }

    /// Follows the worker's status.
    pub fn status(&self) -> watch::Receiver<WorkerStatus> {
        self.status.subscribe()
    }

    fn set_state(&self, state: WorkerState) {
        self.status.send_if_modified(|s| {
            let changed = s.state != state;
            if changed {
                s.last_activity_ms = crate::clock::now_ms();
            }
            s.state = state;
            changed
        });
    }

    fn note_error(&self, e: &dyn std::fmt::Display) {
        let text = e.to_string();
        self.status.send_modify(|s| s.last_error = Some(text));
    }

    fn all_ready(&self) -> bool {
        self.ready.iter().all(|r| *r.borrow())
    }

    /// Resolves once every readiness signal is `true` (at once when there are none).
    async fn until_ready(&mut self) {
        for rx in &mut self.ready {
            // A closed channel means its service is gone for good: never ready again.
            if rx.wait_for(|r| *r).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Runs until `shutdown`: claims and runs jobs one at a time. Returns after its last job
    /// has been completed, failed or returned.
    pub async fn run(mut self, broker: Broker, shutdown: CancellationToken) -> Result<(), super::WorkerError> {
        let mut backoff = RedisBackoff::default();
        // Aborted when the worker's run ends, whichever way.
        let _gpu_follow = self.gpu_watch.take().map(|(index, health)| {
            AbortOnDrop(tokio::spawn(super::hold::follow_gpu(
                index,
                health,
                self.holds(),
                CancellationToken::new(),
            )))
        });
        // The models are scanned now, not when the worker was built: the installers ran since,
        // and what they downloaded on this boot belongs in the capabilities it registers with.
        if let Some(models) = self.scan_models().await {
            tracing::info!(worker = %self.id(), models = ?models, "models on disk");
            self.caps.models = models;
        }
        while !shutdown.is_cancelled() {
            match broker.register_worker(&self.caps).await {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(worker = %self.id(), error = %error_chain(&e), "failed to register; retrying");
                    self.note_error(&error_chain(&e));
                    if !backoff.sleep(&shutdown).await {
                        break;
                    }
                }
            }
        }
        // Heartbeats go on whatever the worker does (idle, waiting, busy), so the fleet sees it
        // alive; stopped (and awaited) when the worker stops.
        let heartbeats = AbortOnDrop(tokio::spawn(heartbeat(
            broker.clone(),
            self.caps.worker_id.clone(),
            self.settings.heartbeat,
        )));
        let mirror = AbortOnDrop(tokio::spawn(mirror_holds(self.holds.subscribe(), self.status.clone())));
        while !shutdown.is_cancelled() {
            if self.quarantine.until(Instant::now()).is_none() {
                self.holds.clear(HoldKind::Quarantine);
            }
            if let Some(reason) = self.holds.reason() {
                self.set_state(WorkerState::Held);
                tracing::warn!(worker = %self.id(), %reason, "not claiming");
                let until = self.quarantine.until(Instant::now());
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = self.holds.released() => {}
                    () = async { tokio::time::sleep_until(until.expect("guarded").into()).await }, if until.is_some() => {
                        tracing::info!(worker = %self.id(), "the quarantine is over; claiming again");
                    }
                }
                continue;
            }
            if !self.all_ready() {
                self.set_state(WorkerState::WaitingForServices);
                tracing::info!(worker = %self.id(), "waiting for its services to be ready");
                // A hold set meanwhile (the upkeep restarting the service it waits for) is
                // parked on at once, not after the service is ready again.
                let holds = self.holds.clone();
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = self.until_ready() => {}
                    () = holds.held() => {}
                }
                continue;
            }
            self.set_state(WorkerState::Idle);
            if self.rescan_models().await {
                self.publish_capabilities(&broker, &shutdown).await;
            }
            let Some(caps) = self.claim_capabilities() else {
                // Every service this worker has waits for a quota: nothing to claim until then.
                let until = self
                    .deferrals
                    .iter()
                    .map(|d| d.until)
                    .min()
                    .unwrap_or_else(Instant::now);
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep_until(until.into()) => {}
                }
                continue;
            };
            let claimed = self.claim(&broker, &caps, &shutdown).await;
            match claimed {
                Ok(Some(job)) => {
                    backoff.reset();
                    let outcome = self.run_job(&broker, job, &shutdown).await;
                    self.judge(&outcome);
                    if let Some(ends) = &self.job_ends {
                        // A restart planned for after this job is held before the next claim.
                        ends.job_ended(&outcome).await;
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(worker = %self.id(), error = %error_chain(&e), "failed to claim; retrying");
                    self.note_error(&error_chain(&e));
                    backoff.sleep(&shutdown).await;
                }
            }
        }
        let mut heartbeats = heartbeats;
        heartbeats.0.abort();
        let _ = (&mut heartbeats.0).await;
        drop(mirror);
        self.set_state(WorkerState::Stopped);
        Ok(())
    }

    /// Claims the next job, giving up (with `Ok(None)`) when a service stops being ready, when
    /// it is time to rescan the models, or at shutdown. The claim is stopped through its token
    /// rather than dropped, so a claim that Redis already made is never lost.
    async fn claim(
        &mut self,
        broker: &Broker,
        caps: &Capabilities,
        shutdown: &CancellationToken,
    ) -> Result<Option<ClaimedJob>, BrokerError> {
        let stop = shutdown.child_token();
        let claim = broker.claim_next(caps, &stop);
        tokio::pin!(claim);
        let mut unready = Box::pin(services_lost(&mut self.ready));
        // When a deferral ends, the claim starts again with the work it left out.
        let deferral_ends = self.deferrals.iter().map(|d| d.until).min();
        let mut resume = Box::pin(async move {
            match deferral_ends {
                Some(t) => tokio::time::sleep_until(t.into()).await,
                None => std::future::pending().await,
            }
        });
        let follows_models = self.models.is_some();
        let rescan = tokio::time::sleep(MODELS_RESCAN);
        tokio::pin!(rescan);
        let held = self.holds.held();
        tokio::pin!(held);
        loop {
            tokio::select! {
                r = &mut claim => return r,
                () = &mut held, if !stop.is_cancelled() => stop.cancel(),
                () = &mut unready, if !stop.is_cancelled() => {
                    tracing::warn!(worker = %self.caps.worker_id, "a service stopped being ready; not claiming");
                    stop.cancel();
                }
                () = &mut resume, if !stop.is_cancelled() => stop.cancel(),
                () = &mut rescan, if follows_models && !stop.is_cancelled() => stop.cancel(),
            }
        }
    }

    /// The capabilities to claim with: this worker's, without the work a daily quota holds
    /// back; `None` when that is all of its services.
    fn claim_capabilities(&mut self) -> Option<Capabilities> {
        let now = Instant::now();
        self.deferrals.retain(|d| d.until > now);
        if self.deferrals.is_empty() {
            return Some(self.caps.clone());
        }
        let mut caps = self.caps.clone();
        for d in &self.deferrals {
            caps.job_service_required_map.retain(|s| !d.job_services.contains(s));
            caps.connectors.retain(|s| !d.job_services.contains(s));
            if let Some(c) = &d.customer {
                if !caps.customer_access.denied_customers.contains(c) {
                    caps.customer_access.denied_customers.push(c.clone());
                }
            }
        }
        (!caps.job_service_required_map.is_empty()).then_some(caps)
    }

    /// Returns a job a daily quota stopped to the queue with the reason, and holds the API's
    /// services (or the customer) back from this worker's claims until the quota resets.
    async fn defer(
        &mut self,
        broker: &Broker,
        claimed: &ClaimedJob,
        e: &ConnectorError,
        shutdown: &CancellationToken,
    ) -> JobOutcome {
        let ConnectorError::QuotaReached {
            api,
            customer,
            reason,
            resets_in,
        } = e
        else {
            return self.write_failure(broker, claimed, e, shutdown).await;
        };
        let until_ms = i64::try_from(crate::clock::now_ms()).unwrap_or(i64::MAX)
            + i64::try_from(resets_in.as_millis()).unwrap_or(i64::MAX / 2);
        tracing::info!(job_id = %claimed.id, %reason, ?resets_in, "a daily quota stops the job; returning it to the queue");
        let job_services = match customer {
            Some(_) => Vec::new(),
            None => {
                let mut s: Vec<String> = self
                    .connectors
                    .iter()
                    .filter(|(_, c)| c.kind().name() == api)
                    .map(|(service, _)| service.clone())
                    .collect();
                s.sort();
                s
            }
        };
        self.deferrals.push(Deferral {
            job_services,
            customer: customer.clone(),
            until: Instant::now() + *resets_in,
        });
        match self.write(shutdown, || broker.defer(claimed, reason, until_ms)).await {
            Ok(()) => JobOutcome::Returned,
            Err(not) => self.not_written(not),
        }
    }

    /// The job as its connector sees it, and where its outputs go: a `ctx` that is not JSON or
    /// names no usable destination is refused here, before anything runs.
    fn job_input(&self, claimed: &ClaimedJob) -> Result<Prepared, ConnectorError> {
        let refused = |e| ConnectorError::Destination(Box::new(e));
        let job = Job {
            id: claimed.id.clone(),
            service_required: claimed.service.clone(),
            payload: claimed.payload.clone(),
            customer_id: claimed.field("customer_id").unwrap_or_default().to_owned(),
            ctx: store::parse_ctx(claimed.field("ctx")).map_err(refused)?,
            timeout: job_timeout(claimed),
        };
        let target = self.store.target(&job, claimed.retry_count()).map_err(refused)?;
        Ok(Prepared { input: job, target })
    }

    /// Counts a finished job towards the worker's quarantine, and holds the worker when it
    /// starts one.
    fn judge(&mut self, outcome: &JobOutcome) {
        match outcome {
            JobOutcome::Completed => self.quarantine.completed(),
            JobOutcome::Failed { blame, error, .. } => {
                if let Some((cooldown, reason)) = self.quarantine.failed(*blame, error, Instant::now()) {
                    tracing::warn!(worker = %self.id(), ?cooldown, %reason, "quarantined");
                    self.holds.set(HoldKind::Quarantine, reason);
                }
            }
            JobOutcome::Returned | JobOutcome::Cancelled | JobOutcome::Lost => {}
        }
    }

    async fn run_job(&mut self, broker: &Broker, claimed: ClaimedJob, shutdown: &CancellationToken) -> JobOutcome {
        let claimed_at = Instant::now();
        let mut cancels = broker.cancellations();
        self.status.send_modify(|s| {
            s.state = WorkerState::Busy;
            s.last_activity_ms = crate::clock::now_ms();
            s.counts.claimed += 1;
            s.current_job = Some(CurrentJob {
                job_id: claimed.id.clone(),
                service: claimed.service.clone(),
                progress: 0.0,
                message: String::new(),
            });
        });
        tracing::info!(worker = %self.id(), job_id = %claimed.id, service = %claimed.service, "claimed a job");
        let (outcome, run, billing) = match (self.connectors.get(&claimed.service).cloned(), self.job_input(&claimed)) {
            (None, _) => {
                let e = ConnectorError::BadPayload(format!(
                    "worker {} has no connector for `{}`",
                    self.id(),
                    claimed.service
                ));
                (
                    self.write_failure(broker, &claimed, &e, shutdown).await,
                    Duration::ZERO,
                    None,
                )
            }
            (Some(_), Err(e)) => (
                self.write_failure(broker, &claimed, &e, shutdown).await,
                Duration::ZERO,
                None,
            ),
            (Some(connector), Ok(prepared)) => match self.write(shutdown, || broker.start(&claimed)).await {
                Err(not) => (self.not_written(not), Duration::ZERO, None),
                Ok(()) => {
                    if claimed.field("limit_reason").is_some_and(|r| !r.is_empty()) {
                        // It waited for a quota before; if it still must, deferJob says so again.
                        let cleared: Result<i64, _> = broker.call_limits("clearLimitReason", &[&claimed.id]).await;
                        if let Err(e) = cleared {
                            tracing::debug!(job_id = %claimed.id, error = %error_chain(&e), "limit reason not cleared");
                        }
                    }
                    self.supervise(broker, &claimed, &prepared, connector, &mut cancels, shutdown)
                        .await
                }
            },
        };
        let total = claimed_at.elapsed();
        tracing::info!(worker = %self.id(), job_id = %claimed.id, outcome = ?outcome, ?run, ?total, "job ended");
        self.status.send_modify(|s| {
            s.current_job = None;
            s.last_activity_ms = crate::clock::now_ms();
            match &outcome {
                JobOutcome::Completed => s.counts.completed += 1,
                JobOutcome::Failed { error, .. } => {
                    s.counts.failed += 1;
                    s.last_error = Some(error.clone());
                }
                JobOutcome::Returned => s.counts.returned += 1,
                JobOutcome::Cancelled => s.counts.cancelled += 1,
                JobOutcome::Lost => s.counts.lost += 1,
            }
        });
        if let Some(tx) = &self.reports {
            let _ = tx.send(JobReport {
                worker_id: self.caps.worker_id.clone(),
                job_id: claimed.id.clone(),
                service: claimed.service.clone(),
                outcome: outcome.clone(),
                run,
                total,
                billing,
            });
        }
        outcome
    }

    /// Runs the connector with the lease keeper, progress, cancellation, time limit and drain
    /// around it, then writes the outcome. Returns the outcome, the connector's run time and,
    /// for a completed external job, its billing.
    async fn supervise(
        &mut self,
        broker: &Broker,
        claimed: &ClaimedJob,
        prepared: &Prepared,
        connector: Arc<dyn Connector>,
        cancels: &mut broadcast::Receiver<String>,
        shutdown: &CancellationToken,
    ) -> (JobOutcome, Duration, Option<Billing>) {
        let Prepared { input, target } = prepared;
        let (sink, progress) = ProgressSink::new();
        let job_cancel = CancellationToken::new();
        let started = Instant::now();
        let mut task = AbortOnDrop(tokio::spawn({
            let input = input.clone();
            let cancel = job_cancel.clone();
            async move {
                let r = connector.run(&input, &sink, &cancel).await;
                (r, started.elapsed())
            }
        }));
        let (stop_tx, mut stop_rx) = mpsc::channel(2);
        let keeper = AbortOnDrop(tokio::spawn(keep_lease(
            broker.clone(),
            claimed.clone(),
            self.settings.heartbeat,
            stop_tx.clone(),
        )));
        // Progress goes to Redis from its own task, so a slow or absent Redis never delays
        // noticing that the job ended, was cancelled or ran out of time.
        let forwarder = AbortOnDrop(tokio::spawn(forward_progress(
            broker.clone(),
            claimed.clone(),
            progress,
            self.status.clone(),
            stop_tx,
        )));
        let timeout = input.timeout.unwrap_or(self.settings.job_timeout);
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut drain: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut stop: Option<Stop> = None;
        let mut cancels_open = true;
        let (result, run) = loop {
            tokio::select! {
                biased;
                joined = &mut task.0 => break match joined {
                    Ok(r) => r,
                    Err(e) => (Err(ConnectorError::Failed { message: format!("the connector task failed: {e}"), retryable: true }), started.elapsed()),
                },
                Some(s) = stop_rx.recv(), if stop.is_none() => {
                    stop = Some(s);
                    job_cancel.cancel();
                }
                msg = cancels.recv(), if stop.is_none() && cancels_open => match msg {
                    Ok(id) if id == claimed.id => {
                        tracing::info!(job_id = %claimed.id, "the job was cancelled; interrupting it");
                        stop = Some(Stop::Cancelled);
                        job_cancel.cancel();
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => cancels_open = false,
                },
                () = &mut deadline, if stop.is_none() => {
                    tracing::warn!(job_id = %claimed.id, ?timeout, "the job ran past its time limit; stopping it");
                    stop = Some(Stop::Timeout);
                    job_cancel.cancel();
                }
                () = shutdown.cancelled(), if drain.is_none() && stop.is_none() => {
                    tracing::info!(job_id = %claimed.id, drain = ?self.settings.drain, "shutdown: letting the job finish within the drain period");
                    self.set_state(WorkerState::Draining);
                    drain = Some(Box::pin(tokio::time::sleep(self.settings.drain)));
                }
                () = async { drain.as_mut().expect("guarded by is_some").await }, if drain.is_some() && stop.is_none() => {
                    stop = Some(Stop::Shutdown);
                    job_cancel.cancel();
                }
                reason = self.holds.returning_job(), if stop.is_none() => {
                    tracing::warn!(job_id = %claimed.id, %reason, "returning the job: its worker cannot go on");
                    stop = Some(Stop::Held);
                    job_cancel.cancel();
                }
                () = self.force.cancelled(), if stop.is_none() => {
                    tracing::info!(job_id = %claimed.id, "forced shutdown: returning the job now");
                    stop = Some(Stop::Shutdown);
                    job_cancel.cancel();
                }
            }
        };
        drop(keeper);
        drop(forwarder);
        let mut billing = None;
        let outcome = match (stop, result) {
            (Some(Stop::Cancelled), _) => JobOutcome::Cancelled,
            (Some(Stop::Lost), _) => JobOutcome::Lost,
            (_, Ok(output)) => {
                billing = Billing::from_result(&output.data);
                self.write_success(broker, claimed, target, output, shutdown).await
            }
            (Some(Stop::Shutdown | Stop::Held), Err(_)) => {
                match self.write(shutdown, || broker.return_job(claimed)).await {
                    Ok(()) => JobOutcome::Returned,
                    Err(not) => self.not_written(not),
                }
            }
            (Some(Stop::Timeout), Err(_)) => {
                let e = ConnectorError::Timeout(timeout);
                self.write_failure(broker, claimed, &e, shutdown).await
            }
            (None, Err(e @ ConnectorError::QuotaReached { .. })) => self.defer(broker, claimed, &e, shutdown).await,
            (None, Err(e)) => self.write_failure(broker, claimed, &e, shutdown).await,
        };
        if outcome != JobOutcome::Completed {
            billing = None;
        }
        (outcome, run, billing)
    }

    async fn write_success(
        &self,
        broker: &Broker,
        claimed: &ClaimedJob,
        target: &OutputTarget,
        output: JobOutput,
        shutdown: &CancellationToken,
    ) -> JobOutcome {
        let stored = match target.store(output.artifacts).await {
            Ok(s) => s,
            Err(e) => return self.write_failure(broker, claimed, &e, shutdown).await,
        };
        let mut result = output.data;
        store::add_to_result(&mut result, &stored);
        match self.write(shutdown, || broker.complete(claimed, &result)).await {
            Ok(()) => JobOutcome::Completed,
            Err(not) => self.not_written(not),
        }
    }

    async fn write_failure(
        &self,
        broker: &Broker,
        claimed: &ClaimedJob,
        e: &ConnectorError,
        shutdown: &CancellationToken,
    ) -> JobOutcome {
        let error = e.chain();
        // A connector that reports cancellation without being asked has lost its service.
        let retryable = e.is_retryable() || e.class() == ErrorClass::Cancelled;
        tracing::warn!(job_id = %claimed.id, retryable, error = %error, "the job failed");
        match self.write(shutdown, || broker.fail(claimed, &error, retryable)).await {
            Ok(o) => JobOutcome::Failed {
                retryable,
                blame: Blame::of(e),
                requeued: o == FailOutcome::Retried,
                error,
            },
            Err(not) => self.not_written(not),
        }
    }

    fn not_written(&self, not: NotWritten) -> JobOutcome {
        match not {
            NotWritten::Cancelled => JobOutcome::Cancelled,
            NotWritten::Lost => JobOutcome::Lost,
            NotWritten::GaveUp(e) => {
                // The lease expires and the reaper gives the job to another worker.
                tracing::error!(worker = %self.id(), error = %error_chain(&e), "gave up reporting a job at shutdown");
                JobOutcome::Lost
            }
        }
    }

    /// Makes a lifecycle write, retrying through Redis outages until it is written or fenced.
    /// After shutdown it tries for one more drain period, then gives up (the lease then returns
    /// the job).
    async fn write<T, F, Fut>(&self, shutdown: &CancellationToken, mut op: F) -> Result<T, NotWritten>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BrokerError>>,
    {
        let mut backoff = RedisBackoff::default();
        let mut shutdown_seen: Option<Instant> = None;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(BrokerError::Cancelled { .. }) => return Err(NotWritten::Cancelled),
                Err(BrokerError::LeaseLost { .. }) => return Err(NotWritten::Lost),
                Err(e) => {
                    tracing::warn!(worker = %self.id(), error = %error_chain(&e), "failed to write to redis; retrying");
                    self.note_error(&error_chain(&e));
                    if shutdown.is_cancelled() {
                        let since = *shutdown_seen.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.settings.drain {
                            return Err(NotWritten::GaveUp(e));
                        }
                    }
                    tokio::time::sleep(backoff.next()).await;
                }
            }
        }
    }
}

/// Writes each progress report (the latest, when several came while a write was in flight) and
/// shows it in the worker's status; a write the broker fences tells the job to stop.
async fn forward_progress(
    broker: Broker,
    job: ClaimedJob,
    mut progress: ProgressReceiver,
    status: Arc<watch::Sender<WorkerStatus>>,
    stop: mpsc::Sender<Stop>,
) {
    while progress.changed().await.is_ok() {
        let p = progress.borrow_and_update().1.clone();
        status.send_modify(|s| {
            if let Some(j) = &mut s.current_job {
                j.progress = p.percent;
                j.message.clone_from(&p.message);
            }
        });
        let steps = p.current_step.zip(p.total_steps);
        match broker.progress(&job, p.percent, &p.message, steps).await {
            Ok(()) => {}
            Err(BrokerError::Cancelled { .. }) => {
                let _ = stop.send(Stop::Cancelled).await;
                return;
            }
            Err(BrokerError::LeaseLost { .. }) => {
                let _ = stop.send(Stop::Lost).await;
                return;
            }
            Err(e) => tracing::debug!(job_id = %job.id, error = %error_chain(&e), "progress not written"),
        }
    }
}

/// The contract's worker heartbeat every `every` (at most 30 s apart, well inside the key's
/// 60 s TTL); Redis errors are logged and retried at the next tick.
async fn heartbeat(broker: Broker, worker_id: String, every: Duration) {
    let every = every.min(Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        if let Err(e) = broker.heartbeat(&worker_id).await {
            tracing::warn!(worker = %worker_id, error = %error_chain(&e), "heartbeat failed");
        }
    }
}

/// Renews the lease every `every`, beside the job; tells the job to stop when the broker says
/// it was cancelled or is no longer ours. Redis errors are logged and retried at the next tick
/// (the lease is at least three ticks long).
async fn keep_lease(broker: Broker, job: ClaimedJob, every: Duration, stop: mpsc::Sender<Stop>) {
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match broker.renew_lease(&job).await {
            Ok(LeaseStatus::Held) => {}
            Ok(LeaseStatus::Cancelled) => {
                let _ = stop.send(Stop::Cancelled).await;
                return;
            }
            Ok(LeaseStatus::Lost) => {
                tracing::warn!(job_id = %job.id, "the lease was lost; abandoning the job");
                let _ = stop.send(Stop::Lost).await;
                return;
            }
            Err(e) => tracing::warn!(job_id = %job.id, error = %error_chain(&e), "lease renewal failed; retrying"),
        }
    }
}

/// Shows the worker's holds as its status's `hold`, as they change.
async fn mirror_holds(
    mut holds: watch::Receiver<BTreeMap<HoldKind, String>>,
    status: Arc<watch::Sender<WorkerStatus>>,
) {
    loop {
        let (reason, kinds) = {
            let h = holds.borrow_and_update();
            let reason = (!h.is_empty()).then(|| h.values().cloned().collect::<Vec<_>>().join("; "));
            (reason, h.keys().copied().collect::<Vec<_>>())
        };
        status.send_if_modified(|s| {
            let changed = s.hold != reason || s.held_by != kinds;
            s.hold.clone_from(&reason);
            s.held_by.clone_from(&kinds);
            changed
        });
        if holds.changed().await.is_err() {
            return;
        }
    }
}

/// Resolves when any readiness signal turns `false` (never when there are none).
async fn services_lost(ready: &mut [watch::Receiver<bool>]) {
    if ready.is_empty() {
        return std::future::pending().await;
    }
    let waits = ready.iter_mut().map(|rx| {
        Box::pin(async move {
            if rx.wait_for(|r| !*r).await.is_err() {
                std::future::pending::<()>().await;
            }
        })
    });
    futures_util::future::select_all(waits).await;
}

/// A job's own time limit: `payload.timeout_seconds`, else `requirements.timeout_minutes`.
fn job_timeout(claimed: &ClaimedJob) -> Option<Duration> {
    let secs = claimed
        .payload
        .get("timeout_seconds")
        .and_then(Value::as_f64)
        .or_else(|| {
            let req: Value = serde_json::from_str(claimed.field("requirements")?).ok()?;
            req.get("timeout_minutes").and_then(Value::as_f64).map(|m| m * 60.0)
        })?;
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs.min(7.0 * 86_400.0)))
}

/// Backoff between attempts against an unavailable Redis: 100 ms doubling to 10 s.
#[derive(Debug, Default)]
struct RedisBackoff {
    attempt: u32,
}

impl RedisBackoff {
    const POLICY: crate::backoff::Backoff =
        crate::backoff::Backoff::doubling(Duration::from_millis(100), Duration::from_secs(10));

    fn next(&mut self) -> Duration {
        let d = Self::POLICY.delay(self.attempt, 0.0);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Sleeps the next delay; `false` when shutdown came first.
    async fn sleep(&mut self, shutdown: &CancellationToken) -> bool {
        let d = self.next();
        tokio::select! {
            () = shutdown.cancelled() => false,
            () = tokio::time::sleep(d) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn claimed(payload: Value, requirements: &str) -> ClaimedJob {
        ClaimedJob {
            id: "j".into(),
            worker_id: "w".into(),
            service: "simulation".into(),
            payload,
            fields: BTreeMap::from([("requirements".to_owned(), requirements.to_owned())]),
        }
    }

    #[test]
    fn job_timeouts_come_from_the_job() {
        assert_eq!(
            job_timeout(&claimed(json!({"timeout_seconds": 2.5}), "")),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            job_timeout(&claimed(json!({}), r#"{"timeout_minutes": 2}"#)),
            Some(Duration::from_secs(120))
        );
        assert_eq!(job_timeout(&claimed(json!({"timeout_seconds": -1}), "")), None);
        assert_eq!(job_timeout(&claimed(json!({}), "not json")), None);
    }

    #[test]
    fn redis_backoff_doubles_to_a_cap() {
        let mut b = RedisBackoff::default();
        let delays: Vec<Duration> = (0..10).map(|_| b.next()).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[9], Duration::from_secs(10));
        b.reset();
        assert_eq!(b.next(), Duration::from_millis(100));
    }
}

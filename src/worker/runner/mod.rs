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
//!
//! The life of one claimed job, from its input to its one outcome written in Redis, is in
//! [`job`].
//!
//! With `worker.pending_uploads` above zero, a job its service finished is handed to the
//! worker's upload stage, which stores its outputs and writes its end under its lease (still
//! renewed) while the worker claims and runs the next job. The stage is bounded: the worker
//! claims only while fewer jobs than that wait on their uploads and their outputs hold less
//! than `worker.pending_upload_mb`; otherwise it waits for one to end. Outputs the stage
//! fetches from the job's service (ComfyUI's `/view`) count from the moment their size is
//! known, so a worker waiting for its next job stops waiting when a fetch fills the budget. Each upload keeps every
//! promise of a job stored in place: at shutdown it finishes within the drain period or its
//! job is returned; a refused credential gives its job back and holds the worker, which stops
//! claiming once its current job ends; a machine killed meanwhile loses nothing (the leases
//! expire and the jobs run again). The worker waits for its uploads before it stops.

mod idle;
mod job;

use std::collections::{BTreeMap, HashMap};
use std::ops::ControlFlow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::broker::outage::is_outage;
use crate::broker::retry::{RedisRetry, log_retry, retry};
use crate::broker::{Broker, BrokerError, Capabilities, ClaimedJob};
use crate::connectors::store::OutputStore;
use crate::connectors::{Connector, ConnectorError};
use crate::logging::error_chain;
use crate::worker::capabilities::ModelDirs;
use crate::worker::hold::{HoldKind, Holds, Recheck};
use crate::worker::pause::JobEnds;
use crate::worker::quarantine::{Quarantine, QuarantinePolicy};
use crate::worker::{Fate, JobCounts, JobReport, QuotaWait, WorkerState, WorkerStatus};

/// How often an idle worker rescans its models folders, so that models arriving or leaving
/// (a download, an eviction, an operator) reach its advertised capabilities.
const MODELS_RESCAN: Duration = Duration::from_secs(2);

/// Timing knobs of a worker.
#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// Heartbeat and lease renewal period.
    pub heartbeat: Duration,
    /// How long a running job may go on after shutdown before it is returned.
    pub drain: Duration,
    /// Time limit of a job that does not set its own.
    pub job_timeout: Duration,
    /// A job's progress is written to Redis at most once per this (see `forward_progress`).
    pub progress_every: Duration,
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
    /// How often a hold set with a re-check is checked again while the worker is held.
    hold_recheck: Duration,
    /// The bounds of its upload stage; no stage when `jobs` is 0.
    upload_limits: UploadLimits,
    /// The uploads of finished jobs in flight, each storing one job's outputs and writing its
    /// end; joined before the worker stops.
    upload_stage: tokio::task::JoinSet<()>,
    /// Where the upload stage tells the worker how each of its jobs ended (for the quarantine).
    upload_ends: mpsc::UnboundedSender<(String, Fate)>,
    upload_ended: mpsc::UnboundedReceiver<(String, Fate)>,
    /// Outcomes from the upload stage that reached a claim, judged once it returns.
    upload_outcomes: Vec<(String, Fate)>,
    /// Its service's idle time between jobs.
    idle: idle::IdleClock,
    /// Refusals for lack of credit since this worker last completed a job: each one waits
    /// longer before the next real request probes the account.
    credit_refusals: u32,
}

/// How many finished jobs may wait on their uploads while a worker goes on, and how many bytes
/// of outputs they may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadLimits {
    /// Finished jobs waiting on their uploads; 0 stores each job's outputs before the next
    /// claim.
    pub jobs: u32,
    /// The bytes of outputs they hold, at most (the job that fills it may pass it).
    pub bytes: u64,
}

impl UploadLimits {
    /// Whether a worker whose uploads are `status.uploads` may claim another job.
    fn room(self, status: &WorkerStatus) -> bool {
        self.jobs == 0
            || (status.uploads.len() < usize::try_from(self.jobs).unwrap_or(usize::MAX)
                && status.upload_bytes() < self.bytes)
    }
}

/// The re-check of an external API's refusal of this machine (see
/// [`Worker::hold_for_credentials`]).
#[derive(Debug)]
enum ApiRecheck {
    /// A refused key: a cheap authenticated request tells whether the API accepts it now.
    Key(Arc<dyn Connector>),
    /// An account out of credit: a cheap request passes while credit is out, so the hold is
    /// lifted at `not_before` and the next job is the (real) probe.
    Credit {
        /// When the next real request may be tried.
        not_before: Instant,
    },
}

impl Recheck for ApiRecheck {
    fn recheck(&self) -> futures_util::future::BoxFuture<'_, Result<(), String>> {
        match self {
            ApiRecheck::Key(connector) => connector.check_credentials(),
            ApiRecheck::Credit { not_before } => {
                let left = not_before.saturating_duration_since(Instant::now());
                Box::pin(async move {
                    if left.is_zero() {
                        Ok(())
                    } else {
                        Err(format!(
                            "out of credit; the next real request in {}",
                            humantime::format_duration(Duration::from_secs(left.as_secs().max(1)))
                        ))
                    }
                })
            }
        }
    }
}

/// The longest wait between two real requests that probe an account out of credit.
const CREDIT_PROBE_MAX: Duration = Duration::from_secs(30 * 60);

/// Work this worker leaves alone until a daily quota resets.
#[derive(Debug, Clone)]
struct Deferral {
    /// Job services not claimed (an API's quota), or none.
    job_services: Vec<String>,
    /// A customer whose jobs are not claimed (the customer's own quota on an API).
    customer: Option<String>,
    until: Instant,
    /// What the status shows of it (the same work, with the limiter's words).
    shown: QuotaWait,
}

/// Aborts a spawned task when dropped, so no task outlives the job it belongs to.
#[derive(Debug)]
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
            uploads: Vec::new(),
            quota_waits: Vec::new(),
        });
        let (upload_ends, upload_ended) = mpsc::unbounded_channel();
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
            hold_recheck: Duration::from_secs(15),
            upload_limits: UploadLimits { jobs: 0, bytes: 0 },
            upload_stage: tokio::task::JoinSet::new(),
            upload_ends,
            upload_ended,
            upload_outcomes: Vec::new(),
            idle: idle::IdleClock::default(),
            credit_refusals: 0,
        }
    }

    /// Stores finished jobs' outputs while it runs the next job, within `limits` (a new worker
    /// stores them before claiming again).
    pub fn upload_alongside(&mut self, limits: UploadLimits) {
        self.upload_limits = limits;
    }

    /// Whether finished jobs go to the upload stage.
    fn uploads_alongside(&self) -> bool {
        self.upload_limits.jobs > 0
    }

    /// Judges the jobs whose ends the upload stage wrote since last asked.
    fn judge_uploads(&mut self) {
        while let Ok(ended) = self.upload_ended.try_recv() {
            self.upload_outcomes.push(ended);
        }
        for (job_id, outcome) in std::mem::take(&mut self.upload_outcomes) {
            self.judge(&job_id, &outcome);
        }
        while self.upload_stage.try_join_next().is_some() {}
    }

    /// Resolves once the upload stage has room for another job.
    async fn upload_room(&self) {
        let limits = self.upload_limits;
        let mut status = self.status.subscribe();
        // The sender lives in `self`: the channel cannot close while this waits.
        let _ = status.wait_for(|s| limits.room(s)).await;
    }

    /// Checks a hold set with a re-check (refused credentials) this often while held.
    pub fn recheck_holds_every(&mut self, every: Duration) {
        self.hold_recheck = every;
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
        tracing::info!(worker = %self.id(), models = %models_text(&models), "the models on disk changed");
        self.caps.models = models;
        true
    }

    /// Writes changed capabilities to the broker, retrying through Redis outages until
    /// `shutdown`.
    async fn publish_capabilities(&self, broker: &Broker, shutdown: &CancellationToken) {
        let what = format!("update the capabilities of worker {}", self.id());
        retry(
            broker.health(),
            shutdown,
            &what,
            || broker.update_capabilities(&self.caps),
            |_| {},
        )
        .await;
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
        set_state(&self.status, state);
    }

    fn note_error(&self, e: &dyn std::fmt::Display) {
        note_error(&self.status, e);
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
        let mut backoff = RedisRetry::default();
        // Aborted when the worker's run ends, whichever way.
        let _gpu_follow = self.gpu_watch.take().map(|(index, health)| {
            AbortOnDrop(tokio::spawn(super::hold::follow_gpu(
                index,
                health,
                self.holds(),
                CancellationToken::new(),
            )))
        });
        self.register(&broker, &shutdown).await;
        // Heartbeats go on whatever the worker does (idle, waiting, busy), so the fleet sees it
        // alive; stopped (and awaited) when the worker stops.
        let heartbeats = AbortOnDrop(tokio::spawn(heartbeat(
            broker.clone(),
            self.caps.worker_id.clone(),
            self.settings.heartbeat,
        )));
        let mirror = AbortOnDrop(tokio::spawn(mirror_holds(self.holds.subscribe(), self.status.clone())));
        // Whether the last claim may have left this worker in the fleet's park (it found
        // nothing): a worker that stops claiming leaves the park, so no wake is spent on it.
        let mut parked = false;
        while !shutdown.is_cancelled() {
            let caps = match self.may_claim(&broker, &shutdown, &mut parked).await {
                ControlFlow::Break(()) => break,
                ControlFlow::Continue(None) => continue,
                ControlFlow::Continue(Some(caps)) => caps,
            };
            self.idle.claiming(Instant::now());
            let claimed = self.claim(&broker, &caps, &shutdown).await;
            parked = !matches!(claimed, Ok(Some(_)));
            match claimed {
                Ok(Some(job)) => {
                    self.idle.claimed(Instant::now());
                    backoff.reset();
                    self.run_claimed(&broker, job, &shutdown).await;
                }
                // Redis answered: the next failure starts the backoff from its first step.
                Ok(None) => backoff.reset(),
                Err(e) => {
                    log_retry(&e, &format!("claim for worker {}", self.id()));
                    self.note_error(&error_chain(&e));
                    backoff.sleep(broker.health(), &shutdown).await;
                }
            }
        }
        if parked {
            broker.leave_park(&self.caps.worker_id).await;
        }
        // The pending uploads finish within the drain period, or their jobs are returned; the
        // worker stays registered and heartbeating until they have.
        if !self.upload_stage.is_empty() {
            self.set_state(WorkerState::Draining);
            tracing::info!(worker = %self.id(), uploads = self.upload_stage.len(), "waiting for the pending uploads");
        }
        while self.upload_stage.join_next().await.is_some() {}
        self.judge_uploads();
        let mut heartbeats = heartbeats;
        heartbeats.0.abort();
        let _ = (&mut heartbeats.0).await;
        drop(mirror);
        self.set_state(WorkerState::Stopped);
        Ok(())
    }

    /// Registers the worker with the models on disk now, retrying through Redis outages until
    /// `shutdown`. The models are scanned now, not when the worker was built: the installers
    /// ran since, and what they downloaded on this boot belongs in the capabilities.
    async fn register(&mut self, broker: &Broker, shutdown: &CancellationToken) {
        if let Some(models) = self.scan_models().await {
            tracing::info!(worker = %self.id(), models = %models_text(&models), "models on disk");
            self.caps.models = models;
        }
        let what = format!("register worker {}", self.id());
        let registering = retry(
            broker.health(),
            shutdown,
            &what,
            || broker.register_worker(&self.caps),
            |e| self.note_error(&error_chain(e)),
        );
        registering.await;
    }

    /// Whether the worker may claim now: `Continue(Some(caps))` to claim with those
    /// capabilities; `Continue(None)` once it waited for what held it back (a hold, its
    /// services, room for uploads, a quota), to look again; `Break` at shutdown. A worker that
    /// stops claiming while `parked` (its last claim found nothing) leaves the fleet's park.
    async fn may_claim(
        &mut self,
        broker: &Broker,
        shutdown: &CancellationToken,
        parked: &mut bool,
    ) -> ControlFlow<(), Option<Capabilities>> {
        self.judge_uploads();
        match self.quarantine.until(Instant::now()) {
            None => self.holds.clear(HoldKind::Quarantine),
            // The hold is the quarantine's face: an operator who lifted it
            // (`machine quarantine clear`) ended the quarantine.
            Some(_) if !self.holds.has(HoldKind::Quarantine) => {
                tracing::info!(worker = %self.id(), "the quarantine was lifted by the operator; claiming again");
                self.quarantine.lift();
            }
            Some(_) => {}
        }
        let claiming =
            self.holds.reason().is_none() && self.all_ready() && self.upload_limits.room(&self.status.borrow());
        if *parked && !claiming {
            broker.leave_park(&self.caps.worker_id).await;
            *parked = false;
        }
        if let Some(reason) = self.holds.reason() {
            self.set_state(WorkerState::Held);
            tracing::warn!(worker = %self.id(), %reason, "not claiming");
            let until = self.quarantine.until(Instant::now());
            let rechecks = self.holds.has_rechecks();
            tokio::select! {
                () = shutdown.cancelled() => return ControlFlow::Break(()),
                () = self.holds.released() => {}
                () = tokio::time::sleep(self.hold_recheck), if rechecks => {
                    tokio::select! {
                        () = shutdown.cancelled() => return ControlFlow::Break(()),
                        () = self.holds.recheck(&self.caps.worker_id) => {}
                    }
                }
                () = async { tokio::time::sleep_until(until.expect("guarded").into()).await }, if until.is_some() => {
                    tracing::info!(worker = %self.id(), "the quarantine is over; claiming again");
                }
            }
            return ControlFlow::Continue(None);
        }
        if !self.all_ready() {
            self.set_state(WorkerState::WaitingForServices);
            tracing::info!(worker = %self.id(), "waiting for its services to be ready");
            // A hold set meanwhile (the upkeep restarting the service it waits for) is
            // parked on at once, not after the service is ready again.
            let holds = self.holds.clone();
            tokio::select! {
                () = shutdown.cancelled() => return ControlFlow::Break(()),
                () = self.until_ready() => {}
                () = holds.held() => {}
            }
            return ControlFlow::Continue(None);
        }
        if !self.upload_limits.room(&self.status.borrow()) {
            self.set_state(WorkerState::WaitingForUploads);
            let holds = self.holds.clone();
            tokio::select! {
                () = shutdown.cancelled() => return ControlFlow::Break(()),
                () = self.upload_room() => {}
                () = holds.held() => {}
            }
            return ControlFlow::Continue(None);
        }
        self.set_state(WorkerState::Idle);
        if self.rescan_models().await {
            self.publish_capabilities(broker, shutdown).await;
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
                () = shutdown.cancelled() => return ControlFlow::Break(()),
                () = tokio::time::sleep_until(until.into()) => {}
            }
            return ControlFlow::Continue(None);
        };
        ControlFlow::Continue(Some(caps))
    }

    /// Runs a claimed job, judges its outcome and lets a restart planned for after it happen.
    async fn run_claimed(&mut self, broker: &Broker, job: ClaimedJob, shutdown: &CancellationToken) {
        let job_id = job.id.clone();
        let outcome = self.run_job(broker, job, shutdown).await;
        if let Some(outcome) = &outcome {
            self.judge(&job_id, outcome);
        }
        if let Some(ends) = &self.job_ends {
            // A restart planned for after this job is held before the next claim.
            // A job in the upload stage is done as far as its service goes.
            ends.job_ended(outcome.as_ref().unwrap_or(&Fate::Completed)).await;
        }
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
        // Outputs fetched meanwhile may fill the byte budget: no claim past it.
        let limits = self.upload_limits;
        let mut uploads = self.status.subscribe();
        let full = async move {
            let _ = uploads.wait_for(|s| !limits.room(s)).await;
        };
        tokio::pin!(full);
        loop {
            tokio::select! {
                r = &mut claim => return r,
                () = &mut held, if !stop.is_cancelled() => stop.cancel(),
                () = &mut full, if !stop.is_cancelled() => stop.cancel(),
                // A job the upload stage ended is judged before the worker takes more work (a
                // quarantine it starts must stop this claim).
                Some(ended) = self.upload_ended.recv(), if !stop.is_cancelled() => {
                    self.upload_outcomes.push(ended);
                    stop.cancel();
                }
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
        let before = self.deferrals.len();
        self.deferrals.retain(|d| d.until > now);
        if self.deferrals.len() != before {
            self.show_deferrals();
        }
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
    ) -> Fate {
        let ConnectorError::QuotaReached {
            api,
            customer,
            reason,
            resets_in,
        } = e
        else {
            return self.ending().write_failure(broker, claimed, e, shutdown).await;
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
            shown: QuotaWait {
                services: job_services.clone(),
                customer: customer.clone(),
                reason: reason.clone(),
                until_ms: u64::try_from(until_ms).unwrap_or(u64::MAX),
            },
            job_services,
            customer: customer.clone(),
            until: Instant::now() + *resets_in,
        });
        self.show_deferrals();
        match self
            .ending()
            .write(shutdown, || broker.defer(claimed, reason, until_ms))
            .await
        {
            Ok(()) => Fate::Returned,
            Err(not) => self.ending().not_written(not),
        }
    }

    /// Shows the work daily quotas hold back on the worker's status (and so on `/status`, the
    /// page and the fleet message, where `machine jobs show` reads why a job waits).
    fn show_deferrals(&self) {
        let waits: Vec<QuotaWait> = self.deferrals.iter().map(|d| d.shown.clone()).collect();
        self.status.send_if_modified(|s| {
            let changed = s.quota_waits != waits;
            s.quota_waits.clone_from(&waits);
            changed
        });
    }

    /// Holds the worker after its API refused this machine's credentials (`e`) until the
    /// hold's re-check passes: a cheap authenticated request for a refused key; for an account
    /// out of credit the re-check lifts the hold, so that the next job tries one real request
    /// (a cheap one passes while credit is out) and holds the worker again if still refused.
    pub(super) fn hold_for_credentials(&mut self, connector: Arc<dyn Connector>, e: &ConnectorError) {
        let ConnectorError::CredentialsRefused { credit, .. } = e else {
            return;
        };
        tracing::warn!(worker = %self.id(), error = %e.chain(), "an external API refuses this machine; holding its work");
        let check = if *credit {
            // One real request at a growing interval: the hold's re-check period, doubling
            // with every refusal in a row, up to half an hour.
            let wait = crate::backoff::Backoff::doubling(self.hold_recheck, CREDIT_PROBE_MAX.max(self.hold_recheck))
                .delay(self.credit_refusals, 0.0);
            self.credit_refusals = self.credit_refusals.saturating_add(1);
            ApiRecheck::Credit {
                not_before: Instant::now() + wait,
            }
        } else {
            ApiRecheck::Key(connector)
        };
        self.holds
            .set_until(HoldKind::ApiCredentials, e.chain(), Arc::new(check));
    }

    /// Counts a finished job towards the worker's quarantine, and holds the worker when it
    /// starts one.
    fn judge(&mut self, job_id: &str, outcome: &Fate) {
        match outcome {
            Fate::Completed => {
                self.quarantine.completed();
                self.credit_refusals = 0;
            }
            Fate::Failed { blame, error, .. } => {
                if let Some((cooldown, reason)) = self.quarantine.failed(*blame, job_id, error, Instant::now()) {
                    tracing::warn!(worker = %self.id(), ?cooldown, %reason, "quarantined");
                    self.holds.set(HoldKind::Quarantine, reason);
                }
            }
            Fate::Returned | Fate::Cancelled | Fate::Lost => {}
        }
    }
}

/// Moves the worker's status to `state`, its `last_activity_ms` with it; watchers hear of it
/// only when the state changed. The one way the worker and its upload stage change the state.
fn set_state(status: &watch::Sender<WorkerStatus>, state: WorkerState) {
    status.send_if_modified(|s| {
        let changed = s.state != state;
        if changed {
            s.last_activity_ms = crate::clock::now_ms();
        }
        s.state = state;
        changed
    });
}

/// Shows `e` as the last error the worker met.
fn note_error(status: &watch::Sender<WorkerStatus>, e: &dyn std::fmt::Display) {
    let text = e.to_string();
    status.send_modify(|s| s.last_error = Some(text));
}

/// The contract's worker heartbeat every `every` (at most 30 s apart, well inside the key's
/// 60 s TTL); Redis errors are logged and retried at the next tick.
async fn heartbeat(broker: Broker, worker_id: String, every: Duration) {
    let every = every.min(Duration::from_secs(30));
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match broker.heartbeat(&worker_id).await {
            Err(e) if is_outage(&e) => {
                tracing::debug!(worker = %worker_id, error = %error_chain(&e), "heartbeat failed")
            }
            Err(e) => tracing::warn!(worker = %worker_id, error = %error_chain(&e), "heartbeat failed"),
            Ok(()) => {}
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

/// The models on disk as a log line reads them: `checkpoints: a, b; loras: c`, or `none`.
fn models_text(models: &BTreeMap<String, Vec<String>>) -> String {
    let text: Vec<String> = models
        .iter()
        .filter(|(_, files)| !files.is_empty())
        .map(|(kind, files)| format!("{kind}: {}", files.join(", ")))
        .collect();
    if text.is_empty() {
        "none".to_owned()
    } else {
        text.join("; ")
    }
}

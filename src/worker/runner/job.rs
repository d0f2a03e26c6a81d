//! One claimed job's life: its input and output destination checked, the connector run with
//! progress, lease renewal, cancellation, holds and a time limit beside it, and exactly one
//! outcome written in Redis (or given up on at shutdown).

use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::{AbortOnDrop, Worker};
use futures_util::future::BoxFuture;

use crate::broker::outage::is_outage;
use crate::broker::retry::RedisRetry;
use crate::broker::{Broker, BrokerError, ClaimedJob, Disposition, Failure, Fault, LeaseStatus};
use crate::connectors::store::{self, OutputStore, OutputTarget, StoreFault};
use crate::connectors::{
    Artifact, ArtifactBody, Billing, Connector, ConnectorError, ErrorClass, Job, JobOutput, Progress, ProgressReceiver,
    ProgressSink,
};
use crate::logging::error_chain;
use crate::worker::hold::{Blame, HoldKind, Holds, Recheck};
use crate::worker::{CurrentJob, Fate, JobReport, PendingUpload, WorkerState, WorkerStatus};

/// How long the end of a job waits for its last progress report to be written.
const PROGRESS_FLUSH: Duration = Duration::from_secs(2);

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

/// How a supervised job ended: its outcome, the connector's run time, what the attempt used at
/// a paid API, and the API whose work may exist upstream unfollowed.
#[derive(Debug)]
struct Ended {
    outcome: Fate,
    run: Duration,
    billing: Option<Billing>,
    possible_orphan: Option<String>,
    idle_before: Duration,
}

/// How a supervised job left its worker: ended, or finished by its service with its outputs
/// handed to the worker's upload stage.
#[derive(Debug)]
enum Supervised {
    Ended(Ended),
    Upload(Box<Upload>),
}

/// A job whose service work is done, on its way to the upload stage: its outputs, its lease
/// keeper (still renewing), the stops the keeper sends and its progress forwarder (holding
/// the last report until the completion makes it moot, see [`forward_progress`]).
#[derive(Debug)]
struct Upload {
    target: OutputTarget,
    output: JobOutput,
    stops: mpsc::Receiver<Stop>,
    keeper: AbortOnDrop<()>,
    progress: Option<AbortOnDrop<()>>,
    run: Duration,
    billing: Option<Billing>,
    idle_before: Duration,
}

/// What writes a job's end, shared by the worker and its upload stage (a finished job's
/// outputs stored, and its end written, while the worker already runs the next job): the
/// worker's status, reports, holds, output store, drain period and forced-shutdown token.
#[derive(Debug, Clone)]
pub(super) struct Ending {
    id: String,
    status: Arc<watch::Sender<WorkerStatus>>,
    reports: Option<broadcast::Sender<JobReport>>,
    drain: Duration,
    holds: Holds,
    store: Arc<OutputStore>,
    force: CancellationToken,
}

/// What the upload of a finished job's outputs watches: the lease keeper's stops and the drain
/// period, when shutdown began while the job ran; and the job's progress forwarder, stopped
/// once the outputs are stored (the end written next carries the final state).
struct Uploading<'a> {
    stops: &'a mut mpsc::Receiver<Stop>,
    drain: Option<Pin<Box<tokio::time::Sleep>>>,
    progress: Option<AbortOnDrop<()>>,
}

/// A job's connector running, with its lease keeper and progress forwarder beside it.
struct Running {
    task: AbortOnDrop<(Result<JobOutput, ConnectorError>, Duration)>,
    /// Stops the connector.
    cancel: CancellationToken,
    started: Instant,
    idle_before: Duration,
    /// The job's time limit.
    timeout: Duration,
    /// The connector, to re-check a refusal of the machine's credentials.
    checker: Arc<dyn Connector>,
    /// What the connector reported using at a paid API.
    usage: ProgressSink,
    /// The stops the lease keeper and the progress forwarder send.
    stops: mpsc::Receiver<Stop>,
    keeper: AbortOnDrop<()>,
    /// Taken when the connector returned and its last report was written; left, still
    /// holding that report, to go with a job whose completion follows.
    forwarder: Option<AbortOnDrop<()>>,
    progress_ended: ProgressEnd,
}

/// How the connector's run ended: its result and time, why it was stopped if it was, and the
/// drain period when shutdown began meanwhile.
struct Watched {
    result: Result<JobOutput, ConnectorError>,
    run: Duration,
    stop: Option<Stop>,
    drain: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// What a job that stays with its worker to the end is concluded from.
struct Concluding<'a> {
    result: Result<JobOutput, ConnectorError>,
    stop: Option<Stop>,
    target: OutputTarget,
    timeout: Duration,
    checker: Arc<dyn Connector>,
    uploading: Uploading<'a>,
}

/// Why a finished job's outputs were not stored: an output could not be fetched from its
/// service (blamed as the connector's own request would be), or the store refused or failed.
enum Unstored {
    Fetch(ConnectorError),
    Store(ConnectorError),
}

/// A claimed job ready to run: its input and its checked output destination.
#[derive(Debug)]
struct Prepared {
    input: Job,
    target: OutputTarget,
}

/// A lifecycle write that the broker refused, or that could not be made before shutdown.
#[derive(Debug)]
pub(super) enum NotWritten {
    Cancelled,
    Lost,
    GaveUp(BrokerError),
}

impl Worker {
    /// What writes its jobs' ends, for this worker and its upload stage.
    pub(super) fn ending(&self) -> Ending {
        Ending {
            id: self.caps.worker_id.clone(),
            status: self.status.clone(),
            reports: self.reports.clone(),
            drain: self.settings.drain,
            holds: self.holds.clone(),
            store: self.store.clone(),
            force: self.force.clone(),
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
            customer_id: claimed.customer_id().to_owned(),
            ctx: store::parse_ctx(claimed.ctx()).map_err(refused)?,
            timeout: job_timeout(claimed),
        };
        let target = self.store.target(&job, claimed.retry_count()).map_err(refused)?;
        Ok(Prepared { input: job, target })
    }

    /// Runs a claimed job; its outcome, or `None` when its outputs went to the upload stage
    /// (which writes its end, and tells the worker, later).
    pub(super) async fn run_job(
        &mut self,
        broker: &Broker,
        claimed: ClaimedJob,
        shutdown: &CancellationToken,
    ) -> Option<Fate> {
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
        let ended = |outcome| {
            Supervised::Ended(Ended {
                outcome,
                run: Duration::ZERO,
                billing: None,
                possible_orphan: None,
                idle_before: Duration::ZERO,
            })
        };
        let supervised = match (self.connectors.get(&claimed.service).cloned(), self.job_input(&claimed)) {
            (None, _) => {
                let e = ConnectorError::BadPayload(format!(
                    "worker {} has no connector for `{}`",
                    self.id(),
                    claimed.service
                ));
                ended(self.ending().write_failure(broker, &claimed, &e, shutdown).await)
            }
            (Some(_), Err(e)) => ended(self.ending().write_failure(broker, &claimed, &e, shutdown).await),
            (Some(connector), Ok(prepared)) => match self.ending().write(shutdown, || broker.start(&claimed)).await {
                Err(not) => ended(self.ending().not_written(not)),
                Ok(()) => {
                    if claimed.waited_for_a_limit() {
                        // It waited for a quota before; if it still must, deferJob says so again.
                        if let Err(e) = broker.clear_limit_reason(&claimed.id).await {
                            tracing::debug!(job_id = %claimed.id, error = %error_chain(&e), "limit reason not cleared");
                        }
                    }
                    self.supervise(broker, &claimed, prepared, connector, &mut cancels, shutdown)
                        .await
                }
            },
        };
        match supervised {
            Supervised::Ended(ended) => {
                let outcome = ended.outcome.clone();
                self.ending().finish(&claimed, ended, claimed_at, true);
                Some(outcome)
            }
            Supervised::Upload(upload) => {
                self.hand_off(broker, claimed, upload, claimed_at, shutdown);
                None
            }
        }
    }

    /// Hands a job whose service work is done to the worker's upload stage: its outputs are
    /// stored and its end written there, under its lease (still renewed), while the worker
    /// claims its next job. The stage tells the worker each outcome.
    fn hand_off(
        &mut self,
        broker: &Broker,
        claimed: ClaimedJob,
        upload: Box<Upload>,
        claimed_at: Instant,
        shutdown: &CancellationToken,
    ) {
        let bytes: u64 = upload
            .output
            .artifacts
            .iter()
            .map(|a| match &a.body {
                ArtifactBody::Bytes(b) => u64::try_from(b.len()).unwrap_or(u64::MAX),
                // Counted once fetched (`Ending::fetch`).
                ArtifactBody::Url(_) | ArtifactBody::Fetch(_) => 0,
            })
            .sum();
        tracing::debug!(worker = %self.id(), job_id = %claimed.id, bytes, "storing the outputs while the worker goes on");
        self.status.send_modify(|s| {
            s.current_job = None;
            s.last_activity_ms = crate::clock::now_ms();
            s.uploads.push(PendingUpload {
                job_id: claimed.id.clone(),
                service: claimed.service.clone(),
                bytes,
                since_ms: crate::clock::now_ms(),
                fetching: upload
                    .output
                    .artifacts
                    .iter()
                    .any(|a| matches!(a.body, ArtifactBody::Fetch(_))),
            });
        });
        let ending = self.ending();
        let broker = broker.clone();
        let shutdown = shutdown.clone();
        let done = self.upload_ends.clone();
        self.upload_stage.spawn(async move {
            let Upload {
                target,
                output,
                mut stops,
                keeper,
                progress,
                run,
                billing,
                idle_before,
            } = *upload;
            let uploading = Uploading {
                stops: &mut stops,
                drain: None,
                progress,
            };
            let outcome = ending
                .write_success(&broker, &claimed, &target, output, &shutdown, uploading)
                .await;
            // The lease is kept until the job's end is written, and no longer.
            drop(keeper);
            let ended = Ended {
                outcome: outcome.clone(),
                run,
                billing,
                possible_orphan: None,
                idle_before,
            };
            ending.finish(&claimed, ended, claimed_at, false);
            let _ = done.send((claimed.id.clone(), outcome));
        });
    }
}

impl Ending {
    fn id(&self) -> &str {
        &self.id
    }

    fn note_error(&self, e: &dyn std::fmt::Display) {
        super::note_error(&self.status, e);
    }

    fn set_state(&self, state: WorkerState) {
        super::set_state(&self.status, state);
    }

    /// Counts a job's end in the worker's status and reports it; `current` when it was the
    /// worker's current job (else it was one of its pending uploads).
    fn finish(&self, claimed: &ClaimedJob, ended: Ended, claimed_at: Instant, current: bool) {
        let Ended {
            outcome,
            run,
            billing,
            possible_orphan,
            idle_before,
        } = ended;
        let total = claimed_at.elapsed();
        tracing::info!(
            worker = %self.id(),
            job_id = %claimed.id,
            outcome = outcome.name(),
            run = %crate::logging::human_duration(run),
            total = %crate::logging::human_duration(total),
            "job ended"
        );
        self.status.send_modify(|s| {
            if current {
                s.current_job = None;
            } else {
                s.uploads.retain(|u| u.job_id != claimed.id);
            }
            s.last_activity_ms = crate::clock::now_ms();
            match &outcome {
                Fate::Completed => s.counts.completed += 1,
                Fate::Failed { error, .. } => {
                    s.counts.failed += 1;
                    s.last_error = Some(error.clone());
                }
                Fate::Returned => s.counts.returned += 1,
                Fate::Cancelled => s.counts.cancelled += 1,
                Fate::Lost => s.counts.lost += 1,
            }
        });
        if let Some(tx) = &self.reports {
            let _ = tx.send(JobReport {
                worker_id: self.id.clone(),
                job_id: claimed.id.clone(),
                service: claimed.service.clone(),
                outcome,
                run,
                total,
                billing,
                possible_orphan,
                idle_before,
            });
        }
    }
}

impl Worker {
    /// Runs the connector with the lease keeper, progress, cancellation, time limit and drain
    /// around it, then writes the outcome, or hands a finished job to the upload stage.
    async fn supervise(
        &mut self,
        broker: &Broker,
        claimed: &ClaimedJob,
        prepared: Prepared,
        connector: Arc<dyn Connector>,
        cancels: &mut broadcast::Receiver<String>,
        shutdown: &CancellationToken,
    ) -> Supervised {
        let Prepared { input, target } = prepared;
        let mut running = self.launch(broker, claimed, &input, connector);
        let Watched {
            result,
            run,
            stop,
            drain,
        } = self.watch(claimed, &mut running, cancels, shutdown).await;
        let completing = stop.is_none() && result.is_ok();
        let billing = self.wind_down(broker, claimed, &mut running, completing).await;
        let Running {
            mut stops,
            keeper,
            forwarder,
            idle_before,
            timeout,
            checker,
            ..
        } = running;
        // A job its service finished, while the worker goes on, is stored and completed by
        // the upload stage, so the service gets its next job now (at shutdown there is no next
        // job: it is stored here, within the drain).
        let result = match result {
            Ok(output) if stop.is_none() && self.uploads_alongside() && !shutdown.is_cancelled() => {
                return Supervised::Upload(Box::new(Upload {
                    target,
                    output,
                    stops,
                    keeper,
                    progress: forwarder,
                    run,
                    billing,
                    idle_before,
                }));
            }
            other => other,
        };
        let concluding = Concluding {
            result,
            stop,
            target,
            timeout,
            checker,
            uploading: Uploading {
                stops: &mut stops,
                drain,
                progress: forwarder,
            },
        };
        let (outcome, possible_orphan) = self.conclude(broker, claimed, concluding, shutdown).await;
        drop(keeper);
        Supervised::Ended(Ended {
            outcome,
            run,
            billing,
            possible_orphan,
            idle_before,
        })
    }

    /// Starts the connector on the job, with its lease keeper and progress forwarder beside it.
    fn launch(&mut self, broker: &Broker, claimed: &ClaimedJob, input: &Job, connector: Arc<dyn Connector>) -> Running {
        let (sink, progress) = ProgressSink::new();
        let usage = sink.clone();
        let cancel = CancellationToken::new();
        let started = Instant::now();
        let idle_before = self.idle.run_started(started);
        let checker = connector.clone();
        let task = AbortOnDrop(tokio::spawn({
            let input = input.clone();
            let cancel = cancel.clone();
            async move {
                let r = connector.run(&input, &sink, &cancel).await;
                (r, started.elapsed())
            }
        }));
        let (stop_tx, stops) = mpsc::channel(2);
        // Held until the job's end is written (here, or by the upload stage): the lease is
        // renewed until then.
        let keeper = AbortOnDrop(tokio::spawn(keep_lease(
            broker.clone(),
            claimed.clone(),
            self.settings.heartbeat,
            stop_tx.clone(),
        )));
        // Progress goes to Redis from its own task, so a slow or absent Redis never delays
        // noticing that the job ended, was cancelled or ran out of time.
        let progress_ended = ProgressEnd::default();
        let forwarder = AbortOnDrop(tokio::spawn(forward_progress(
            broker.clone(),
            claimed.clone(),
            progress,
            self.status.clone(),
            stop_tx,
            self.settings.progress_every,
            progress_ended.clone(),
        )));
        Running {
            task,
            cancel,
            started,
            idle_before,
            timeout: input.timeout.unwrap_or(self.settings.job_timeout),
            checker,
            usage,
            stops,
            keeper,
            forwarder: Some(forwarder),
            progress_ended,
        }
    }

    /// Waits for the connector to return, stopping it (and saying why) when the job is
    /// cancelled or lost, runs out of time, outlasts the drain, is held or forced to stop.
    async fn watch(
        &mut self,
        claimed: &ClaimedJob,
        running: &mut Running,
        cancels: &mut broadcast::Receiver<String>,
        shutdown: &CancellationToken,
    ) -> Watched {
        let timeout = running.timeout;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        let mut drain: Option<Pin<Box<tokio::time::Sleep>>> = None;
        let mut stop: Option<Stop> = None;
        let mut cancels_open = true;
        let job_cancel = running.cancel.clone();
        let (result, run) = loop {
            tokio::select! {
                biased;
                joined = &mut running.task.0 => break match joined {
                    Ok(r) => r,
                    Err(e) => (Err(ConnectorError::MachineFault { message: format!("the connector task failed: {e}") }), running.started.elapsed()),
                },
                Some(s) = running.stops.recv(), if stop.is_none() => {
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
        Watched {
            result,
            run,
            stop,
            drain,
        }
    }

    /// Once the connector returned: its progress ended and what the attempt used at a paid
    /// API added to the job. The lease is kept until the job's end is written: the fetches,
    /// uploads, the CDN wait and the outcome write that follow may outlast it (issue 23).
    async fn wind_down(
        &mut self,
        broker: &Broker,
        claimed: &ClaimedJob,
        running: &mut Running,
        completing: bool,
    ) -> Option<Billing> {
        // A job that succeeded (`completing`) is completed next, and its completion carries
        // the final state (100 %, completed): its last report, when not written yet, is held
        // and written only if the outputs take longer than a progress interval to fetch and
        // store (the forwarder goes with the upload and stops when it ends). Any other end
        // writes it now, before the outcome (a coalesced one would be lost otherwise), unless
        // Redis takes longer than PROGRESS_FLUSH to take it.
        self.idle.run_ended(Instant::now());
        if completing {
            running.progress_ended.completing.cancel();
        } else {
            running.progress_ended.now.cancel();
            if let Some(mut forwarder) = running.forwarder.take() {
                let _ = tokio::time::timeout(PROGRESS_FLUSH, &mut forwarder.0).await;
            }
        }
        // What the attempt used at a paid API is billed whatever its outcome; it is added to
        // the job's totals before the outcome is written, so a finished job shows all of it.
        let billing = running
            .usage
            .usage()
            .filter(|b| b.requests > 0 || b.predict_seconds > 0.0);
        if let Some(b) = &billing {
            if let Err(e) = broker.record_usage(&claimed.id, &b.attempt_usage()).await {
                tracing::warn!(job_id = %claimed.id, error = %error_chain(&e), "the attempt's usage was not added to the job");
            }
        }
        billing
    }

    /// Writes the outcome of a job the worker does not hand to its upload stage: its outputs
    /// stored and its completion, or why it did not complete. Also the API whose work may
    /// exist upstream unfollowed, if any.
    async fn conclude(
        &mut self,
        broker: &Broker,
        claimed: &ClaimedJob,
        concluding: Concluding<'_>,
        shutdown: &CancellationToken,
    ) -> (Fate, Option<String>) {
        let Concluding {
            result,
            stop,
            target,
            timeout,
            checker,
            uploading,
        } = concluding;
        let mut possible_orphan = None;
        let outcome = match (stop, result) {
            (Some(Stop::Cancelled), _) => Fate::Cancelled,
            (Some(Stop::Lost), _) => Fate::Lost,
            (_, Ok(output)) => {
                self.ending()
                    .write_success(broker, claimed, &target, output, shutdown, uploading)
                    .await
            }
            (Some(Stop::Shutdown | Stop::Held), Err(_)) => self.ending().return_now(broker, claimed, shutdown).await,
            (Some(Stop::Timeout), Err(_)) => {
                let e = ConnectorError::Timeout(timeout);
                self.ending().write_failure(broker, claimed, &e, shutdown).await
            }
            (None, Err(e @ ConnectorError::QuotaReached { .. })) => self.defer(broker, claimed, &e, shutdown).await,
            (None, Err(e @ ConnectorError::MaybeCreated { .. })) => {
                // Not the job's fault, and no retry spent; the operator sees what may be billed.
                if let ConnectorError::MaybeCreated { api, .. } = &e {
                    possible_orphan = Some(api.clone());
                }
                tracing::warn!(job_id = %claimed.id, error = %e.chain(), "returning the job: its work may exist upstream");
                self.ending().give_back(broker, claimed, &e.chain(), shutdown).await
            }
            (None, Err(e @ ConnectorError::CredentialsRefused { .. })) => {
                // The API refuses this machine, not the job: hand the job back untouched (not
                // counted against it: an account out of credit is probed with real jobs, which
                // must not fail them) and take no more of that API's work until a re-check passes.
                self.hold_for_credentials(checker, &e);
                self.ending().return_now(broker, claimed, shutdown).await
            }
            (None, Err(e)) => self.ending().write_error(broker, claimed, &e, shutdown).await,
        };
        (outcome, possible_orphan)
    }
}

impl Ending {
    /// Fetches the outputs still at the job's service, stores them and completes the job,
    /// under its lease (renewed beside it). The upload stops when the API cancels the job or
    /// the lease is lost, and, at shutdown, when the drain period (or a second signal) ends
    /// first: the job is then returned to the queue in its place, as a running job would be.
    /// Whole-object PUTs leave nothing partial.
    async fn write_success(
        &self,
        broker: &Broker,
        claimed: &ClaimedJob,
        target: &OutputTarget,
        output: JobOutput,
        shutdown: &CancellationToken,
        mut uploading: Uploading<'_>,
    ) -> Fate {
        let JobOutput { data, artifacts } = output;
        let upload = async {
            let fetched = self.fetch(claimed, artifacts).await;
            self.fetched(&claimed.id);
            target
                .store(fetched.map_err(Unstored::Fetch)?)
                .await
                .map_err(Unstored::Store)
        };
        tokio::pin!(upload);
        let stored = loop {
            tokio::select! {
                biased;
                r = &mut upload => break r,
                Some(s) = uploading.stops.recv() => match s {
                    Stop::Cancelled => return Fate::Cancelled,
                    Stop::Lost => return Fate::Lost,
                    Stop::Timeout | Stop::Shutdown | Stop::Held => {}
                },
                () = shutdown.cancelled(), if uploading.drain.is_none() => {
                    tracing::info!(job_id = %claimed.id, drain = ?self.drain, "shutdown: letting the upload finish within the drain period");
                    self.set_state(WorkerState::Draining);
                    uploading.drain = Some(Box::pin(tokio::time::sleep(self.drain)));
                }
                () = async { uploading.drain.as_mut().expect("guarded by is_some").await }, if uploading.drain.is_some() => {
                    tracing::warn!(job_id = %claimed.id, "the drain period ended before the upload did; returning the job");
                    return self.return_now(broker, claimed, shutdown).await;
                }
                () = self.force.cancelled() => {
                    tracing::info!(job_id = %claimed.id, "forced shutdown: returning the job now");
                    return self.return_now(broker, claimed, shutdown).await;
                }
            }
        };
        // The end written next carries the final state: a last report not written by now is
        // moot.
        drop(uploading.progress.take());
        let stored = match stored {
            Ok(s) => s,
            Err(Unstored::Fetch(e)) => {
                tracing::warn!(job_id = %claimed.id, error = %e.chain(), "an output could not be fetched from the job's service");
                return self.write_error(broker, claimed, &e, shutdown).await;
            }
            Err(Unstored::Store(e)) => return self.store_failed(broker, claimed, target, &e, shutdown).await,
        };
        let mut result = data;
        store::add_to_result(&mut result, &stored);
        if let Err(e) = store::check_result_size(&result) {
            tracing::error!(job_id = %claimed.id, error = %e.chain(), "refusing to write an oversized result to redis");
            return self.write_failure(broker, claimed, &e, shutdown).await;
        }
        match self.write(shutdown, || broker.complete(claimed, &result)).await {
            Ok(()) => Fate::Completed,
            Err(not) => self.not_written(not),
        }
    }

    /// Fetches the outputs still at the job's service ([`ArtifactBody::Fetch`]), one after
    /// the other, counting each one's bytes in the job's pending upload as soon as they are
    /// known (its `Content-Length`, else its body): from then on they count against the byte
    /// budget that holds the worker's claims back. A job stored before the next claim (no
    /// upload stage, or at shutdown) has no pending upload to count them in.
    async fn fetch(&self, claimed: &ClaimedJob, artifacts: Vec<Artifact>) -> Result<Vec<Artifact>, ConnectorError> {
        let mut fetched = Vec::with_capacity(artifacts.len());
        for artifact in artifacts {
            let ArtifactBody::Fetch(fetch) = &artifact.body else {
                fetched.push(artifact);
                continue;
            };
            let got = fetch.get(|bytes| self.count_upload_bytes(&claimed.id, bytes)).await?;
            tracing::debug!(job_id = %claimed.id, url = fetch.url(), bytes = got.bytes.len(), "fetched an output from the job's service");
            fetched.push(Artifact {
                content_type: got.content_type.unwrap_or(artifact.content_type),
                name: artifact.name,
                body: ArtifactBody::Bytes(got.bytes),
            });
        }
        Ok(fetched)
    }

    /// Notes that the job's pending upload (if it has one) no longer fetches from its service,
    /// which may now be restarted between jobs.
    fn fetched(&self, job_id: &str) {
        self.status.send_if_modified(|s| {
            let Some(upload) = s.uploads.iter_mut().find(|u| u.job_id == job_id && u.fetching) else {
                return false;
            };
            upload.fetching = false;
            true
        });
    }

    /// Adds `bytes` to the outputs the job's pending upload holds, if it has one.
    fn count_upload_bytes(&self, job_id: &str, bytes: u64) {
        self.status.send_if_modified(|s| {
            let Some(upload) = s.uploads.iter_mut().find(|u| u.job_id == job_id) else {
                return false;
            };
            upload.bytes = upload.bytes.saturating_add(bytes);
            true
        });
    }

    /// Returns the job to the queue in its place, no retry spent (shutdown, a hold, refused
    /// credentials).
    async fn return_now(&self, broker: &Broker, claimed: &ClaimedJob, shutdown: &CancellationToken) -> Fate {
        match self.write(shutdown, || broker.return_job(claimed)).await {
            Ok(()) => Fate::Returned,
            Err(not) => self.not_written(not),
        }
    }

    /// An output could not be stored: blamed by the store's own error code. Refused
    /// credentials are the machine's: the job goes back untouched and the worker is held until
    /// the store of this job's bucket accepts them. A store still down after the upload window
    /// gives the job back too (a CDN that does not serve in time fails the attempt
    /// retryably, as before). A refusal of the job's destination (access to its bucket, a
    /// missing bucket) or of the request fails the job at once.
    async fn store_failed(
        &self,
        broker: &Broker,
        claimed: &ClaimedJob,
        target: &OutputTarget,
        e: &ConnectorError,
        shutdown: &CancellationToken,
    ) -> Fate {
        let source = match e {
            ConnectorError::Storage { source, .. } => source,
            _ => return self.write_failure(broker, claimed, e, shutdown).await,
        };
        match source.fault() {
            StoreFault::Credentials => {
                let reason = format!(
                    "output store refuses the credentials: {}",
                    source.code().unwrap_or("unauthenticated")
                );
                tracing::warn!(worker = %self.id(), job_id = %claimed.id, error = %e.chain(), "{reason}; giving the job back and holding the worker");
                let check = StoreCredentialsCheck {
                    store: self.store.clone(),
                    target: target.clone(),
                };
                self.holds
                    .set_until(HoldKind::StoreCredentials, reason.clone(), Arc::new(check));
                self.give_back(broker, claimed, &format!("{reason} ({})", e.chain()), shutdown)
                    .await
            }
            // Only an upload: a CDN that does not serve the object in time is the attempt's
            // failure, retried under a new name.
            StoreFault::Unavailable if matches!(**source, store::StoreError::Put { .. }) => {
                let reason = format!("the output store is down: {}", e.chain());
                tracing::warn!(worker = %self.id(), job_id = %claimed.id, %reason, "giving the job back");
                self.give_back(broker, claimed, &reason, shutdown).await
            }
            StoreFault::Unavailable | StoreFault::Destination | StoreFault::Refused => {
                self.write_failure(broker, claimed, e, shutdown).await
            }
        }
    }

    /// Returns the job for the machine's fault, in its place and without spending a retry; the
    /// broker fails it instead once machines have returned it more than five times.
    async fn give_back(
        &self,
        broker: &Broker,
        claimed: &ClaimedJob,
        reason: &str,
        shutdown: &CancellationToken,
    ) -> Fate {
        match self
            .write(shutdown, || broker.return_for_fault(claimed, Fault::Machine, reason))
            .await
        {
            Ok(Disposition::Returned) => Fate::Returned,
            Ok(o @ (Disposition::Retried | Disposition::Failed)) => Fate::Failed {
                retryable: o == Disposition::Retried,
                blame: Blame::Machine,
                requeued: o == Disposition::Retried,
                error: reason.to_owned(),
            },
            Err(not) => self.not_written(not),
        }
    }

    /// Writes a failure that the connector's work (or the fetch of its outputs) ended in: a
    /// service that crashed or stalled under the job as the service's fault, anything else as
    /// the job's own failure, retried as its class says.
    async fn write_error(
        &self,
        broker: &Broker,
        claimed: &ClaimedJob,
        e: &ConnectorError,
        shutdown: &CancellationToken,
    ) -> Fate {
        if e.is_service_fault() {
            self.write_service_fault(broker, claimed, e, shutdown).await
        } else {
            self.write_failure(broker, claimed, e, shutdown).await
        }
    }

    pub(super) async fn write_failure(
        &self,
        broker: &Broker,
        claimed: &ClaimedJob,
        e: &ConnectorError,
        shutdown: &CancellationToken,
    ) -> Fate {
        let error = e.chain();
        // A connector that reports cancellation without being asked has lost its service.
        let retryable = e.is_retryable() || e.class() == ErrorClass::Cancelled;
        tracing::warn!(job_id = %claimed.id, retryable, error = %error, "the job failed");
        match self.write(shutdown, || broker.fail(claimed, &error, retryable)).await {
            Ok(o) => Fate::Failed {
                retryable,
                blame: Blame::of(e),
                requeued: o == Failure::Retried,
                error,
            },
            Err(not) => self.not_written(not),
        }
    }

    /// Gives back a job whose service crashed or stalled under it: the first time (on any
    /// machine) without spending a retry, waiting no delay or hold-off, so it runs as soon as a
    /// capable worker is free (this one included once its service is back); the second time
    /// as the job's own retryable failure, so a job that kills its service does not circle the
    /// fleet. Either way it is this worker's failure, for quarantine and the upkeep's checks.
    async fn write_service_fault(
        &self,
        broker: &Broker,
        claimed: &ClaimedJob,
        e: &ConnectorError,
        shutdown: &CancellationToken,
    ) -> Fate {
        let error = e.chain();
        let written = self
            .write(shutdown, || broker.return_for_fault(claimed, Fault::Service, &error))
            .await;
        match written {
            Ok(returned) => {
                tracing::warn!(job_id = %claimed.id, ?returned, error = %error, "the job's service failed under it");
                Fate::Failed {
                    retryable: true,
                    blame: Blame::of(e),
                    requeued: returned != Disposition::Failed,
                    error,
                }
            }
            Err(not) => self.not_written(not),
        }
    }

    pub(super) fn not_written(&self, not: NotWritten) -> Fate {
        match not {
            NotWritten::Cancelled => Fate::Cancelled,
            NotWritten::Lost => Fate::Lost,
            NotWritten::GaveUp(e) => {
                // The lease expires and the reaper gives the job to another worker.
                tracing::error!(worker = %self.id(), error = %error_chain(&e), "gave up reporting a job at shutdown");
                Fate::Lost
            }
        }
    }

    /// Makes a lifecycle write, retrying through Redis outages until it is written or fenced.
    /// After shutdown it tries for one more drain period, then gives up (the lease then returns
    /// the job).
    pub(super) async fn write<T, F, Fut>(&self, shutdown: &CancellationToken, mut op: F) -> Result<T, NotWritten>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, BrokerError>>,
    {
        let mut backoff = RedisRetry::default();
        let mut shutdown_seen: Option<Instant> = None;
        loop {
            match op().await {
                Ok(v) => return Ok(v),
                Err(BrokerError::Cancelled { .. }) => return Err(NotWritten::Cancelled),
                Err(BrokerError::LeaseLost { .. }) => return Err(NotWritten::Lost),
                Err(e) => {
                    if is_outage(&e) {
                        tracing::debug!(worker = %self.id(), error = %error_chain(&e), "failed to write to redis; retrying");
                    } else {
                        tracing::warn!(worker = %self.id(), error = %error_chain(&e), "failed to write to redis; retrying");
                    }
                    self.note_error(&error_chain(&e));
                    if shutdown.is_cancelled() {
                        let since = *shutdown_seen.get_or_insert_with(Instant::now);
                        if since.elapsed() >= self.drain {
                            return Err(NotWritten::GaveUp(e));
                        }
                    }
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
    }
}

/// The re-check of a worker held because the store refused its credentials: the store of the
/// job's own bucket, asked again with the credentials it holds now (a reload may have renewed
/// them).
#[derive(Debug)]
struct StoreCredentialsCheck {
    store: Arc<OutputStore>,
    target: OutputTarget,
}

impl Recheck for StoreCredentialsCheck {
    fn recheck(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(self.store.check_credentials(&self.target))
    }
}

/// When a job's progress reports go to Redis: the first at once; then at most one write per
/// `every`, carrying the latest report; a report that would show nothing new (the same whole
/// percentage, message and steps as the last one written) never. What a person watching sees
/// is the latest state within `every`, and the job's last report is written when it ends
/// ([`ProgressGate::flush`]).
#[derive(Debug)]
struct ProgressGate {
    every: Duration,
    /// The last report written, and when.
    written: Option<(Instant, Progress)>,
    /// The latest report not written yet.
    pending: Option<Progress>,
}

impl ProgressGate {
    fn new(every: Duration) -> ProgressGate {
        ProgressGate {
            every,
            written: None,
            pending: None,
        }
    }

    /// Takes a new report: `Some` when it is to be written now.
    fn report(&mut self, p: Progress, now: Instant) -> Option<Progress> {
        match &self.written {
            Some((_, last)) if shows_the_same(last, &p) => {
                self.pending = None;
                None
            }
            Some((at, _)) if now < *at + self.every => {
                self.pending = Some(p);
                None
            }
            _ => {
                self.pending = None;
                Some(p)
            }
        }
    }

    /// When the pending report is due, if there is one.
    fn due(&self) -> Option<Instant> {
        self.pending.as_ref()?;
        Some(
            self.written
                .as_ref()
                .map_or_else(Instant::now, |(at, _)| *at + self.every),
        )
    }

    /// The pending report, once due.
    fn take_due(&mut self, now: Instant) -> Option<Progress> {
        if self.due().is_some_and(|due| due <= now) {
            self.pending.take()
        } else {
            None
        }
    }

    /// The pending report whatever its time (the job ended).
    fn flush(&mut self) -> Option<Progress> {
        self.pending.take()
    }

    fn wrote(&mut self, p: Progress, now: Instant) {
        self.written = Some((now, p));
    }
}

/// Whether two reports show the same in Redis: whole percentages (what the broker writes),
/// message and steps.
fn shows_the_same(a: &Progress, b: &Progress) -> bool {
    a.percent.round() == b.percent.round()
        && a.message == b.message
        && a.current_step == b.current_step
        && a.total_steps == b.total_steps
}

/// How a job's progress forwarding ends once its connector returned.
#[derive(Debug, Clone, Default)]
struct ProgressEnd {
    /// The last report not yet written is written now (the job failed, was stopped, ...).
    now: CancellationToken,
    /// The job succeeded and its completion follows, carrying the final state: the last report
    /// not yet written is held one progress interval and written then, unless the forwarder is
    /// stopped first (the completion is being written).
    completing: CancellationToken,
}

/// Forwards a job's progress: every report to the worker's status at once (the page, the
/// fleet status), to Redis through a [`ProgressGate`], until the connector returned (`ended`).
async fn forward_progress(
    broker: Broker,
    job: ClaimedJob,
    mut progress: ProgressReceiver,
    status: Arc<watch::Sender<WorkerStatus>>,
    stop: mpsc::Sender<Stop>,
    every: Duration,
    ended: ProgressEnd,
) {
    let mut gate = ProgressGate::new(every);
    let mut open = true;
    // Once the job completes: when its last report is written if the completion is not.
    let mut last_at: Option<Instant> = None;
    let latest = |progress: &mut ProgressReceiver| {
        let p = progress.borrow_and_update().1.clone();
        status.send_modify(|s| {
            if let Some(j) = &mut s.current_job {
                j.progress = p.percent;
                j.message.clone_from(&p.message);
            }
        });
        p
    };
    loop {
        let due = gate.due().filter(|_| last_at.is_none());
        let write = tokio::select! {
            biased;
            () = ended.now.cancelled() => {
                // The connector's last report may not have been read yet.
                if progress.has_changed().unwrap_or(false) {
                    let p = latest(&mut progress);
                    if let Some(now) = gate.report(p, Instant::now()) {
                        gate.pending = Some(now);
                    }
                }
                if let Some(p) = gate.flush() {
                    // Whether the job is still ours matters no more: its end is written next.
                    let _ = write_progress(&broker, &job, &p, &stop).await;
                }
                return;
            }
            () = ended.completing.cancelled(), if last_at.is_none() => {
                if progress.has_changed().unwrap_or(false) {
                    let p = latest(&mut progress);
                    if let Some(now) = gate.report(p, Instant::now()) {
                        gate.pending = Some(now);
                    }
                }
                if gate.pending.is_none() {
                    return;
                }
                last_at = Some(Instant::now() + every);
                continue;
            }
            () = async { tokio::time::sleep_until(last_at.expect("guarded by is_some").into()).await }, if last_at.is_some() => {
                if let Some(p) = gate.flush() {
                    let _ = write_progress(&broker, &job, &p, &stop).await;
                }
                return;
            }
            changed = progress.changed(), if open && last_at.is_none() => {
                if changed.is_err() {
                    open = false;
                    continue;
                }
                let p = latest(&mut progress);
                gate.report(p, Instant::now())
            }
            () = async { tokio::time::sleep_until(due.expect("guarded by is_some").into()).await }, if due.is_some() => {
                gate.take_due(Instant::now())
            }
        };
        if let Some(p) = write {
            gate.wrote(p.clone(), Instant::now());
            if !write_progress(&broker, &job, &p, &stop).await {
                return;
            }
        }
    }
}

/// Writes one progress report; `false` when the job is no longer this worker's (the stop is
/// sent). Other errors are logged: the next report carries the state again.
#[must_use]
async fn write_progress(broker: &Broker, job: &ClaimedJob, p: &Progress, stop: &mpsc::Sender<Stop>) -> bool {
    let steps = p.current_step.zip(p.total_steps);
    match broker.progress(job, p.percent, &p.message, steps).await {
        Ok(()) => true,
        Err(BrokerError::Cancelled { .. }) => {
            let _ = stop.send(Stop::Cancelled).await;
            false
        }
        Err(BrokerError::LeaseLost { .. }) => {
            let _ = stop.send(Stop::Lost).await;
            false
        }
        Err(e) => {
            tracing::debug!(job_id = %job.id, error = %error_chain(&e), "progress not written");
            true
        }
    }
}

/// Renews the lease every third of it (and no more often than `at_most_every`, the worker's
/// heartbeat, which the configuration keeps at or under a third), beside the job; tells the
/// job to stop when the broker says it was cancelled or is no longer ours. Redis errors are
/// logged and retried at the next tick: a lease is three ticks long. A third rather than every
/// heartbeat: each renewal is a write on the shared Redis (a 10 s job renewed once at the 10 s
/// heartbeat, none at a third of the 60 s lease; issue 29's all-in cost), and a cancellation
/// reaches the job at once through `cancel_job` and its progress writes anyway. The period is
/// read again at each tick, so a reload that shortens the lease renews sooner.
async fn keep_lease(broker: Broker, job: ClaimedJob, at_most_every: Duration, stop: mpsc::Sender<Stop>) {
    loop {
        tokio::time::sleep((broker.lease() / 3).max(at_most_every)).await;
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
            Err(e) if is_outage(&e) => {
                tracing::debug!(job_id = %job.id, error = %error_chain(&e), "lease renewal failed; retrying")
            }
            Err(e) => tracing::warn!(job_id = %job.id, error = %error_chain(&e), "lease renewal failed; retrying"),
        }
    }
}

/// A job's own time limit: `payload.timeout_seconds`, else `requirements.timeout_minutes`.
fn job_timeout(claimed: &ClaimedJob) -> Option<Duration> {
    let secs = claimed
        .payload
        .get("timeout_seconds")
        .and_then(Value::as_f64)
        .or_else(|| {
            let req = claimed.requirements()?;
            req.get("timeout_minutes").and_then(Value::as_f64).map(|m| m * 60.0)
        })?;
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs.min(7.0 * 86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn claimed(payload: Value, requirements: &str) -> ClaimedJob {
        ClaimedJob {
            id: "j".into(),
            worker_id: "w".into(),
            service: "simulation".into(),
            payload,
            fields: crate::broker::JobFields::from_pairs([("requirements", requirements)]),
        }
    }

    fn report(percent: f64, message: &str) -> Progress {
        Progress {
            percent,
            message: message.to_owned(),
            current_step: None,
            total_steps: None,
        }
    }

    #[test]
    fn progress_is_written_first_then_at_most_once_per_interval_and_never_unchanged() {
        let t0 = Instant::now();
        let every = Duration::from_secs(1);
        let mut gate = ProgressGate::new(every);
        let first = gate
            .report(report(1.0, "a"), t0)
            .expect("the first report is written at once");
        gate.wrote(first, t0);
        // Within the interval: held, the latest replacing the earlier.
        assert_eq!(gate.report(report(2.0, "a"), t0 + Duration::from_millis(100)), None);
        assert_eq!(gate.report(report(3.0, "b"), t0 + Duration::from_millis(200)), None);
        assert_eq!(gate.due(), Some(t0 + every));
        assert_eq!(gate.take_due(t0 + Duration::from_millis(999)), None);
        let due = gate.take_due(t0 + every).expect("due after the interval");
        assert_eq!(due, report(3.0, "b"));
        gate.wrote(due, t0 + every);
        // The same whole percentage, message and steps: never written, even much later.
        assert_eq!(gate.report(report(3.2, "b"), t0 + Duration::from_secs(5)), None);
        assert_eq!(gate.due(), None);
        // A change after the interval is written at once.
        let later = gate.report(report(4.0, "b"), t0 + Duration::from_secs(5));
        assert_eq!(later, Some(report(4.0, "b")));
    }

    #[test]
    fn the_last_report_is_never_lost() {
        let t0 = Instant::now();
        let mut gate = ProgressGate::new(Duration::from_secs(1));
        let first = gate.report(report(10.0, "step 1 of 3"), t0).unwrap();
        gate.wrote(first, t0);
        assert_eq!(
            gate.report(report(99.0, "step 3 of 3"), t0 + Duration::from_millis(10)),
            None
        );
        assert_eq!(gate.flush(), Some(report(99.0, "step 3 of 3")));
        assert_eq!(gate.flush(), None);
        // A zero interval writes every change.
        let mut every = ProgressGate::new(Duration::ZERO);
        let a = every.report(report(1.0, "x"), t0).unwrap();
        every.wrote(a, t0);
        assert!(every.report(report(2.0, "x"), t0).is_some());
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
}

//! The machine's one pub/sub connection: `job_requeued` and the machine's wake channels wake
//! claimers, `cancel_job` notices go to a broadcast channel; the fleet's one indexer, which
//! announces each `job_submitted` once and wakes one idle worker for it; the catch-up that
//! indexes jobs queued while no machine listened; and the fleet's one sweeper, which finds jobs
//! the API put into `jobs:pending` without a message.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use super::{Broker, CatchUp, redis_err};
use crate::broker::BrokerError;
use crate::broker::retry::{RedisRetry, log_retry};
use crate::logging::error_chain;
/// How often the fleet's sweeper passes over `jobs:pending` (and other machines try to take
/// its lease): a job queued without a message is found within about this plus one pass.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// The sweeper's lease: a machine that stops sweeping hands over within this.
const SWEEP_LEASE: Duration = Duration::from_secs(6);
/// Entries of `jobs:pending` (and of the index) one sweeper step reads.
const SWEEP_STEP: u32 = 2000;
/// How often the fleet's indexer ticks (renews its lease, re-sends overdue wakes): a wake not
/// answered within [`WAKE_DEADLINE`] goes to another worker within this more. The other
/// machines try to take the lease in their sweeper's periodic call ([`SWEEP_EVERY`]), so the
/// lease costs them no call of its own.
const INDEXER_TICK: Duration = Duration::from_millis(500);
/// The indexer lease: a machine that stops ticking hands over within this (plus a try).
const INDEXER_LEASE: Duration = Duration::from_secs(3);
/// How long a woken worker has to claim before the indexer wakes another one for the job: the
/// woken machine may have died or missed the message.
pub const WAKE_DEADLINE: Duration = Duration::from_millis(750);
/// The channel (after the key prefix, before the machine id) on which the indexer wakes one
/// worker of a machine: `{"worker_id", "job_id", "timestamp"}`.
const WAKE_CHANNEL: &str = "jobs:wake:";

/// What the machine's subscription listens to besides its fixed channels.
#[derive(Debug, Default)]
struct Listening {
    /// `job_submitted`: this machine is the fleet's indexer.
    indexing: bool,
    /// The machines whose wake channel it is subscribed to.
    machines: BTreeSet<String>,
}

/// What one pass of the fleet's sweeper did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Steps (calls) the pass took.
    pub steps: u64,
    /// Jobs it put into the index: queued, re-queued or re-scored without a message.
    pub found: u64,
}

impl Broker {
    /// `cancel_job` notices (job ids) seen by [`Broker::run_events`].
    pub fn cancellations(&self) -> broadcast::Receiver<String> {
        self.inner.cancels.subscribe()
    }

    /// The machine's one pub/sub connection: wakes claimers, forwards cancellations, and while
    /// this machine is the fleet's indexer (it holds the lease `jobs:idx:indexer`, see
    /// [`Broker::indexer_tick`]) announces each submitted job once for the whole fleet.
    /// Reconnects with backoff until `shutdown`; after a reconnect every waiter is woken
    /// because messages may have been missed.
    pub async fn run_events(&self, shutdown: CancellationToken) -> Result<(), BrokerError> {
        let channels = [self.key("job_requeued"), self.key("cancel_job")];
        // Claimers wait for the first catch-up from now on (until Done).
        self.inner.catch_up.send_if_modified(|c| {
            let first = *c == CatchUp::NotRunning;
            if first {
                *c = CatchUp::Running;
            }
            first
        });
        let mut delays = RedisRetry::default();
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            match self.subscribe(&channels).await {
                Ok(pubsub) => {
                    delays.reset();
                    let (mut sink, mut messages) = pubsub.split();
                    let mut listening = Listening::default();
                    let mut machines = self.inner.wake_machines.subscribe();
                    // The indexer lease is tried before the catch-up, so that a machine alone
                    // announces what is submitted from the moment its claimers wake.
                    self.follow_machines(&mut sink, &mut machines, &mut listening).await;
                    self.indexer_tick(&mut sink, &mut listening).await;
                    // Jobs submitted while we were not listening are indexed before waking.
                    if let Err(e) = self.catch_up_index().await {
                        tracing::warn!(error = %error_chain(&e), "failed to catch up the pending index; claims repair it in steps");
                    }
                    self.inner.catch_up.send_replace(CatchUp::Done);
                    self.wake(None);
                    let mut tick = tokio::time::interval(INDEXER_TICK);
                    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            () = shutdown.cancelled() => return Ok(()),
                            msg = messages.next() => match msg {
                                Some(msg) => self.handle_message(&channels, &listening, &msg).await,
                                None => break,
                            },
                            // The holder ticks (its overdue wakes are due within a tick); the
                            // others learn from their sweeper's call that the lease is theirs.
                            _ = tick.tick(), if listening.indexing => {
                                self.indexer_tick(&mut sink, &mut listening).await;
                            }
                            () = self.inner.indexer_held.notified(), if !listening.indexing => {
                                self.indexer_tick(&mut sink, &mut listening).await;
                            }
                            Ok(()) = machines.changed() => {
                                self.follow_machines(&mut sink, &mut machines, &mut listening).await;
                            }
                        }
                    }
                    self.inner.indexing.store(false, Ordering::Relaxed);
                    // An outage is logged once by the health record; a drop alone is news.
                    tracing::info!("the redis subscription dropped; reconnecting");
                }
                Err(e) => log_retry(&e, "subscribe to the broker channels"),
            }
            if !delays.sleep(self.health(), &shutdown).await {
                return Ok(());
            }
        }
    }

    async fn subscribe(&self, channels: &[String]) -> Result<redis::aio::PubSub, BrokerError> {
        let client = self.client();
        let connect = tokio::time::timeout(super::CONNECT_TIMEOUT, client.get_async_pubsub());
        let mut pubsub = connect
            .await
            .map_err(|_| BrokerError::Redis {
                op: "SUBSCRIBE",
                source: redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::TimedOut)),
            })?
            .map_err(redis_err("SUBSCRIBE"))?;
        pubsub.subscribe(channels).await.map_err(redis_err("SUBSCRIBE"))?;
        Ok(pubsub)
    }

    /// Subscribes to the wake channels of the machines whose workers claimed here since.
    async fn follow_machines(
        &self,
        sink: &mut redis::aio::PubSubSink,
        machines: &mut watch::Receiver<BTreeSet<String>>,
        listening: &mut Listening,
    ) {
        let wanted = machines.borrow_and_update().clone();
        for machine in wanted.difference(&listening.machines.clone()) {
            let channel = self.key(&format!("{WAKE_CHANNEL}{machine}"));
            match sink.subscribe(&channel).await {
                Ok(()) => {
                    listening.machines.insert(machine.clone());
                }
                Err(e) => {
                    tracing::warn!(channel, error = %error_chain(&e), "failed to subscribe to a wake channel; the indexer wakes another worker meanwhile");
                }
            }
        }
    }

    /// One tick of the fleet's indexer lease (`fleetTick`): takes or renews it, and for its
    /// holder wakes another worker for each submission whose woken worker did not claim in
    /// time. The holder listens to `job_submitted`; a machine that loses the lease stops.
    async fn indexer_tick(&self, sink: &mut redis::aio::PubSubSink, listening: &mut Listening) {
        let lease = INDEXER_LEASE.as_millis().to_string();
        let wake = WAKE_DEADLINE.as_millis().to_string();
        let r: Result<Vec<u64>, _> = self
            .call(
                "fleetTick",
                &[&self.inner.opts.key_prefix, &self.inner.sweeper_id, &lease, &wake],
            )
            .await;
        let held = match r {
            Ok(r) => {
                if r.get(1).is_some_and(|n| *n > 0) {
                    tracing::debug!(
                        woken = r[1],
                        "woke other workers for submissions nobody claimed in time"
                    );
                }
                r.first() == Some(&1)
            }
            Err(e) => {
                tracing::debug!(error = %error_chain(&e), "the indexer lease tick failed");
                return;
            }
        };
        let channel = self.key("job_submitted");
        if held && !listening.indexing {
            if let Err(e) = sink.subscribe(&channel).await {
                tracing::warn!(error = %error_chain(&e), "failed to subscribe to job_submitted as the fleet's indexer");
                return;
            }
            listening.indexing = true;
            self.inner.indexing.store(true, Ordering::Relaxed);
            tracing::info!("this machine is the fleet's indexer");
            // Submissions made while no machine held the lease woke nobody: every idle worker
            // of the fleet claims once (their claims' repair indexes what is missing).
            if let Err(e) = self.wake_fleet().await {
                tracing::warn!(error = %error_chain(&e), "failed to wake the fleet's idle workers");
            }
        } else if !held && listening.indexing {
            listening.indexing = false;
            self.inner.indexing.store(false, Ordering::Relaxed);
            tracing::info!("another machine is the fleet's indexer now");
            if let Err(e) = sink.unsubscribe(&channel).await {
                tracing::debug!(error = %error_chain(&e), "failed to unsubscribe from job_submitted");
            }
        }
    }

    /// Asks every idle worker of the fleet to claim once: `job_requeued` without a service.
    async fn wake_fleet(&self) -> Result<(), BrokerError> {
        let doc = serde_json::json!({
            "job_id": "",
            "reason": "indexer",
            "timestamp": crate::clock::now_ms(),
        });
        let mut conn = self.connection();
        let r = redis::cmd("PUBLISH")
            .arg(self.key("job_requeued"))
            .arg(doc.to_string())
            .query_async::<u64>(&mut conn)
            .await
            .map_err(redis_err("PUBLISH"));
        self.observe(r).await.map(drop)
    }

    async fn handle_message(&self, channels: &[String; 2], listening: &Listening, msg: &redis::Msg) {
        let channel = msg.get_channel_name();
        let payload: String = msg.get_payload().unwrap_or_default();
        let doc: Value = serde_json::from_str(&payload).unwrap_or(Value::Null);
        let job_id = doc.get("job_id").and_then(Value::as_str).unwrap_or_default();
        if channel == channels[0] {
            self.wake(doc.get("service_required").and_then(Value::as_str));
        } else if channel == channels[1] {
            // The API may have taken a pending job out of jobs:pending; the indexer drops it
            // from the index (once for the fleet; a claim that meets it would too).
            if listening.indexing
                && !job_id.is_empty()
                && let Err(e) = self.index_job(job_id).await
            {
                tracing::debug!(job_id, error = %error_chain(&e), "failed to re-check a cancelled job's index entry");
            }
            if !job_id.is_empty() {
                let _ = self.inner.cancels.send(job_id.to_owned());
            }
        } else if channel == self.key("job_submitted") {
            // Jobs the API adds go into jobs:pending only: the indexer indexes each once and
            // wakes one idle worker that can run it.
            if !job_id.is_empty()
                && let Err(e) = self.announce_job(job_id).await
            {
                tracing::debug!(job_id, error = %error_chain(&e), "failed to announce a submitted job; claims index it, the safety poll claims it");
            }
        } else if let Some(worker) = doc.get("worker_id").and_then(Value::as_str) {
            // A wake channel: the indexer chose this worker for a job.
            if !self.wake_worker(worker) {
                tracing::debug!(
                    worker,
                    job_id,
                    "a wake-up for a worker that does not wait here; the indexer wakes another"
                );
            }
        }
    }

    /// Indexes a submitted job and wakes one parked worker of the fleet that can run it
    /// (`announceJob`); the woken worker's name, `None` when none waits.
    pub async fn announce_job(&self, job_id: &str) -> Result<Option<String>, BrokerError> {
        let wake = WAKE_DEADLINE.as_millis().to_string();
        let (_, woken): (String, String) = self
            .call("announceJob", &[&self.inner.opts.key_prefix, job_id, &wake])
            .await?;
        Ok((!woken.is_empty()).then_some(woken))
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

    /// One pass of the fleet's sweeper over `jobs:pending` (docs/redis-protocol.md, The fleet's
    /// sweeper), in steps of [`SWEEP_STEP`] entries, when this broker holds the fleet's sweeper
    /// lease or takes it now; `None` while another machine holds it. While this machine is not
    /// the fleet's indexer, the first step also tries the indexer lease (one periodic call per
    /// machine, not two) and tells [`Broker::run_events`] when it is this machine's.
    pub async fn sweep_pending(&self) -> Result<Option<SweepReport>, BrokerError> {
        let lease = SWEEP_LEASE.as_millis().to_string();
        let step = SWEEP_STEP.to_string();
        let indexer_lease = INDEXER_LEASE.as_millis().to_string();
        let wake = WAKE_DEADLINE.as_millis().to_string();
        let mut report = SweepReport::default();
        let mut try_indexer = !self.inner.indexing.load(Ordering::Relaxed);
        loop {
            let prefix = &self.inner.opts.key_prefix;
            let holder = &self.inner.sweeper_id;
            let args: &[&str] = if try_indexer {
                &[prefix, holder, &lease, &step, &indexer_lease, &wake]
            } else {
                &[prefix, holder, &lease, &step]
            };
            let r: Vec<u64> = self.call("sweepPending", args).await?;
            if try_indexer && r.get(3) == Some(&1) {
                self.inner.indexer_held.notify_one();
            }
            try_indexer = false;
            if r.first() != Some(&1) {
                return Ok(None);
            }
            report.steps += 1;
            report.found += r.get(1).copied().unwrap_or(0);
            if r.get(2) == Some(&1) {
                return Ok(Some(report));
            }
        }
    }

    /// Runs the fleet's sweeper: every [`SWEEP_EVERY`] a pass when this machine holds the
    /// lease (or takes it), else one cheap attempt to take it. Errors are logged and retried.
    pub async fn run_sweeper(&self, shutdown: CancellationToken) -> Result<(), BrokerError> {
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(SWEEP_EVERY) => {}
            }
            match self.sweep_pending().await {
                Ok(Some(r)) if r.found > 0 => {
                    tracing::info!(found = r.found, "found jobs queued without a message");
                    self.wake(None);
                }
                Ok(_) => {}
                Err(e) if super::super::outage::is_outage(&e) => {
                    tracing::debug!(error = %error_chain(&e), "failed to sweep the pending queue")
                }
                Err(e) => tracing::warn!(error = %error_chain(&e), "failed to sweep the pending queue"),
            }
        }
    }

    /// Puts a job of `jobs:pending` into the matching index (idempotent).
    pub async fn index_job(&self, job_id: &str) -> Result<String, BrokerError> {
        self.call("indexJob", &[&self.inner.opts.key_prefix, job_id]).await
    }
}

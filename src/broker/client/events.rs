//! The machine's one pub/sub connection: `job_submitted` / `job_requeued` wake claimers (and
//! index submitted jobs), `cancel_job` notices go to a broadcast channel, the catch-up that
//! indexes jobs queued while no machine listened, and the fleet's one sweeper, which finds jobs
//! the API put into `jobs:pending` without a message.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use super::{Broker, CatchUp, redis_err};
use crate::backoff::Backoff;
use crate::broker::BrokerError;
use crate::logging::error_chain;
/// How often the fleet's sweeper passes over `jobs:pending` (and other machines try to take
/// its lease): a job queued without a message is found within about this plus one pass.
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);
/// The sweeper's lease: a machine that stops sweeping hands over within this.
const SWEEP_LEASE: Duration = Duration::from_secs(6);
/// Entries of `jobs:pending` (and of the index) one sweeper step reads.
const SWEEP_STEP: u32 = 2000;

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
        let backoff = Backoff::doubling(Duration::from_millis(100), Duration::from_secs(10));
        let mut attempt = 0;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            match self.subscribe(&channels).await {
                Ok(mut pubsub) => {
                    attempt = 0;
                    // Jobs submitted while we were not listening are indexed before waking.
                    if let Err(e) = self.catch_up_index().await {
                        tracing::warn!(error = %error_chain(&e), "failed to catch up the pending index; claims repair it in steps");
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
                    // An outage is logged once by the health record; a drop alone is news.
                    tracing::info!("the redis subscription dropped; reconnecting");
                }
                Err(e) if super::super::health::is_outage(&e) => {
                    tracing::debug!(error = %error_chain(&e), "failed to subscribe to the broker channels; retrying")
                }
                Err(e) => {
                    tracing::warn!(error = %error_chain(&e), "failed to subscribe to the broker channels; retrying")
                }
            }
            let seen = self.health().recoveries();
            attempt = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                () = tokio::time::sleep(backoff.delay(attempt, 0.0)) => attempt.saturating_add(1),
                // Redis is back: the backoff starts again from its first step.
                () = self.health().answering_again(seen) => 0,
            };
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
                tracing::debug!(job_id, error = %error_chain(&e), "failed to index a submitted job; the claim-side sweep will");
            }
            self.wake(service);
        } else if channel == channels[1] {
            self.wake(service);
        } else if channel == channels[2] && !job_id.is_empty() {
            // The API may have taken a pending job out of jobs:pending; drop it from the index.
            if let Err(e) = self.index_job(job_id).await {
                tracing::debug!(job_id, error = %error_chain(&e), "failed to re-check a cancelled job's index entry");
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

    /// One pass of the fleet's sweeper over `jobs:pending` (docs/redis-protocol.md, The fleet's
    /// sweeper), in steps of [`SWEEP_STEP`] entries, when this broker holds the fleet's sweeper
    /// lease or takes it now; `None` while another machine holds it.
    pub async fn sweep_pending(&self) -> Result<Option<SweepReport>, BrokerError> {
        let lease = SWEEP_LEASE.as_millis().to_string();
        let step = SWEEP_STEP.to_string();
        let mut report = SweepReport::default();
        loop {
            let r: Vec<u64> = self
                .call(
                    "sweepPending",
                    &[&self.inner.opts.key_prefix, &self.inner.sweeper_id, &lease, &step],
                )
                .await?;
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
                Err(e) if super::super::health::is_outage(&e) => {
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

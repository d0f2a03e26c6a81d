//! The one thing the upkeep of a worker's services ([`super::upkeep`]) needs from the worker's
//! loop that its holds ([`super::hold`]) do not give: "a job ended; decide before I claim
//! again".
//!
//! The upkeep holds the worker through its [`Holds`](super::hold::Holds), with
//! [`HoldKind::PlannedRestart`](super::hold::HoldKind::PlannedRestart) and
//! [`HoldKind::WarmingUp`](super::hold::HoldKind::WarmingUp), like every other source of holds.
//! But a restart planned because of the job that just ended (its count, a service that stopped
//! answering) must be held before the worker can claim the next one: so after every job the
//! worker tells the upkeep ([`JobEnds::job_ended`]) and waits for its answer, which comes once
//! the upkeep has set its hold or let the worker go on. The upkeep then waits until the worker
//! is parked on its holds between jobs ([`parked`]) before it restarts anything.

use tokio::sync::{mpsc, oneshot, watch};

use super::{Fate, WorkerState, WorkerStatus};

/// A job ended; the upkeep answers on `decided` once it has held the worker or let it go on.
#[derive(Debug)]
pub struct JobEnded {
    /// How the job ended.
    pub outcome: Fate,
    /// Answered when the upkeep has decided.
    pub decided: oneshot::Sender<()>,
}

/// The worker's end: tells the upkeep of each job's end.
#[derive(Debug)]
pub struct JobEnds {
    ended: mpsc::Sender<JobEnded>,
}

/// The worker's end and the upkeep's (job ends, in order).
pub fn job_ends() -> (JobEnds, mpsc::Receiver<JobEnded>) {
    let (ended, rx) = mpsc::channel(1);
    (JobEnds { ended }, rx)
}

impl JobEnds {
    /// Tells the upkeep a job ended and returns once it has decided whether to hold the worker
    /// (at once when the upkeep is gone).
    pub async fn job_ended(&self, outcome: &Fate) {
        let (decided, answer) = oneshot::channel();
        let told = self
            .ended
            .send(JobEnded {
                outcome: outcome.clone(),
                decided,
            })
            .await;
        if told.is_ok() {
            let _ = answer.await;
        }
    }
}

/// Resolves once the worker whose status is `status` is parked on its holds, between jobs, and
/// no output of its earlier jobs is still being fetched from its services (its upload stage
/// takes ComfyUI's outputs from `/view` while the worker goes on: a restart meanwhile would cut
/// the fetch and fail the job); `false` when the worker is gone.
pub async fn parked(status: &mut watch::Receiver<WorkerStatus>) -> bool {
    status
        .wait_for(|s| {
            s.state == WorkerState::Stopped || (s.state == WorkerState::Held && !s.uploads.iter().any(|u| u.fetching))
        })
        .await
        .is_ok_and(|s| s.state == WorkerState::Held)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_job_end_waits_for_the_decision() {
        let (ends, mut rx) = job_ends();
        let holds = crate::worker::hold::Holds::new();
        let upkeep = tokio::spawn({
            let holds = holds.clone();
            async move {
                let ended = rx.recv().await.unwrap();
                holds.set(crate::worker::hold::HoldKind::PlannedRestart, "every 1 jobs");
                ended.decided.send(()).unwrap();
                rx
            }
        });
        ends.job_ended(&Fate::Completed).await;
        assert_eq!(
            holds.reason().as_deref(),
            Some("every 1 jobs"),
            "decided before the next claim"
        );
        drop(upkeep.await.unwrap());
        // With the upkeep gone, a job end does not wait.
        ends.job_ended(&Fate::Completed).await;
    }

    #[tokio::test]
    async fn parked_follows_the_worker_state() {
        let status = |state| WorkerStatus {
            worker_id: "w".into(),
            state,
            current_job: None,
            counts: crate::worker::JobCounts::default(),
            last_error: None,
            last_activity_ms: 0,
            hold: None,
            held_by: Vec::new(),
            uploads: Vec::new(),
            quota_waits: Vec::new(),
        };
        let (tx, mut rx) = watch::channel(status(WorkerState::Busy));
        let waiter = tokio::spawn(async move { parked(&mut rx).await });
        tx.send_replace(status(WorkerState::Held));
        assert!(waiter.await.unwrap(), "parked once held");
        let mut rx = tx.subscribe();
        tx.send_replace(status(WorkerState::Stopped));
        assert!(!parked(&mut rx).await, "a stopped worker never parks");
        drop(tx);

        // Held, but an earlier job's output is still being fetched from the service: not yet.
        let upload = |fetching| crate::worker::PendingUpload {
            job_id: "j1".into(),
            service: "comfyui".into(),
            bytes: 0,
            since_ms: 0,
            fetching,
        };
        let mut fetching = status(WorkerState::Held);
        fetching.uploads.push(upload(true));
        let (tx, mut rx) = watch::channel(fetching);
        let mut waiter = tokio::spawn(async move { parked(&mut rx).await });
        assert!(
            tokio::time::timeout(std::time::Duration::from_millis(100), &mut waiter)
                .await
                .is_err(),
            "not parked while an output is fetched from the service"
        );
        tx.send_modify(|s| s.uploads[0] = upload(false));
        assert!(
            waiter.await.unwrap(),
            "parked once fetched (storing it needs no service)"
        );
    }
}

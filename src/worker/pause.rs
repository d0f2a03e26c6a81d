//! A worker's pause: the small contract between a worker's loop and the upkeep of its
//! services ([`super::upkeep`]).
//!
//! The worker asks two things of it: "may I claim now, and if not, why" ([`PauseGate::reason`],
//! [`PauseGate::released`]; a claim already waiting gives up when a hold appears,
//! [`PauseGate::held`]) and, after every job, "is a service restart planned before the next
//! claim" ([`PauseGate::job_ended`], which returns once the upkeep has decided, so a planned
//! restart is always held before the worker can claim again). The upkeep holds with
//! [`Pause::hold`], waits until the worker is parked on the hold between jobs
//! ([`Pause::parked`]), restarts what it must, and releases.

use tokio::sync::{mpsc, oneshot, watch};

use super::JobOutcome;

/// A job ended; the upkeep answers on `decided` once it has held the worker or let it go on.
#[derive(Debug)]
pub struct JobEnded {
    /// How the job ended.
    pub outcome: JobOutcome,
    /// Answered when the upkeep has decided.
    pub decided: oneshot::Sender<()>,
}

/// The upkeep's end: holds and releases the worker, and hears of each job's end.
#[derive(Debug)]
pub struct Pause {
    hold: watch::Sender<Option<String>>,
    parked: watch::Receiver<bool>,
    /// Job ends, in order.
    pub ended: mpsc::Receiver<JobEnded>,
}

/// The worker's end.
#[derive(Debug)]
pub struct PauseGate {
    hold: watch::Receiver<Option<String>>,
    parked: watch::Sender<bool>,
    ended: mpsc::Sender<JobEnded>,
}

/// A pause and its gate.
pub fn pause() -> (Pause, PauseGate) {
    let (hold_tx, hold_rx) = watch::channel(None);
    let (parked_tx, parked_rx) = watch::channel(false);
    let (ended_tx, ended_rx) = mpsc::channel(1);
    (
        Pause {
            hold: hold_tx,
            parked: parked_rx,
            ended: ended_rx,
        },
        PauseGate {
            hold: hold_rx,
            parked: parked_tx,
            ended: ended_tx,
        },
    )
}

impl Pause {
    /// Stops the worker claiming, for `reason`.
    pub fn hold(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.hold.send_modify(|h| *h = Some(reason));
    }

    /// Lets the worker claim again.
    pub fn release(&self) {
        self.hold.send_modify(|h| *h = None);
    }

    /// The reason of the hold in place, if any.
    pub fn reason(&self) -> Option<String> {
        self.hold.borrow().clone()
    }

    /// Resolves once the worker is parked on the hold, between jobs; `false` when the worker
    /// is gone.
    pub async fn parked(&mut self) -> bool {
        self.parked.wait_for(|p| *p).await.is_ok()
    }
}

impl PauseGate {
    /// Why the worker must not claim now; `None`: it may.
    pub fn reason(&self) -> Option<String> {
        self.hold.borrow().clone()
    }

    /// Parks the worker until the hold is lifted (forever when the upkeep is gone).
    pub async fn released(&mut self) {
        self.parked.send_replace(true);
        let released = self.hold.wait_for(Option::is_none).await.is_ok();
        self.parked.send_replace(false);
        if !released {
            std::future::pending::<()>().await;
        }
    }

    /// Resolves when a hold is in place (never when the upkeep is gone).
    pub async fn held(&mut self) {
        if self.hold.wait_for(Option::is_some).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Tells the upkeep a job ended and returns once it has decided whether to hold the worker
    /// (at once when the upkeep is gone).
    pub async fn job_ended(&self, outcome: &JobOutcome) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_hold_parks_the_worker_until_released() {
        let (mut pause, mut gate) = pause();
        assert_eq!(gate.reason(), None);
        pause.hold("restart planned");
        assert_eq!(gate.reason().as_deref(), Some("restart planned"));
        gate.held().await;
        let worker = tokio::spawn(async move {
            gate.released().await;
            gate
        });
        assert!(pause.parked().await, "the worker parks on the hold");
        pause.release();
        let gate = worker.await.unwrap();
        assert_eq!(gate.reason(), None);
    }

    #[tokio::test]
    async fn a_job_end_waits_for_the_decision() {
        let (mut pause, gate) = pause();
        let upkeep = tokio::spawn(async move {
            let ended = pause.ended.recv().await.unwrap();
            pause.hold("every 1 jobs");
            ended.decided.send(()).unwrap();
            pause
        });
        gate.job_ended(&JobOutcome::Completed).await;
        assert_eq!(
            gate.reason().as_deref(),
            Some("every 1 jobs"),
            "decided before the next claim"
        );
        drop(upkeep.await.unwrap());
        // With the upkeep gone, a job end does not wait.
        gate.job_ended(&JobOutcome::Completed).await;
    }
}

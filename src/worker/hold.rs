//! A worker's holds: the reasons why it must not claim right now, and whom a job's failure
//! blames.
//!
//! A hold comes from one of a few sources ([`HoldKind`]: its GPU faulted, it is quarantined,
//! a planned service restart, a warm-up). Each source sets and clears its own hold on the
//! worker's [`Holds`]; the worker claims only while none is set, gives up a claim in progress
//! when one appears, and shows the reasons as its `reason` on `/status`, `/ready` and
//! `machine status`. A hold whose kind [`HoldKind::returns_job`] also stops the job the worker
//! runs and returns it to the queue in its place, without burning a retry: the machine, not
//! the job, is at fault.
//!
//! [`Blame`] is the one classification of a failed job: the job's own fault (an invalid
//! workflow or payload, a 4xx), this machine's (its service failed or said nothing, its GPU
//! faulted, the connector crashed), or something elsewhere (an output store, an external API's
//! quota). Only the machine's failures count towards a quarantine.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

use crate::connectors::ConnectorError;

/// Where a hold comes from; a worker holds at most one of each kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HoldKind {
    /// The worker's GPU has a fatal fault (`gpu faulted: XID 79 ...`).
    GpuFault,
    /// Its last jobs all failed for the machine's reasons (`quarantined until ...`).
    Quarantine,
    /// A service restart is planned before the next claim (`service restart planned: ...`).
    PlannedRestart,
    /// Its service is warming up after a (re)start.
    WarmingUp,
    /// Its service still runs what the last job left (an interrupted prompt runs to the end of
    /// its node): the next job would wait behind it.
    ServiceBusy,
}

impl HoldKind {
    /// Whether this hold also stops and returns the job the worker runs: only a GPU fault,
    /// which no job can survive. The others wait for the job to end.
    pub fn returns_job(self) -> bool {
        matches!(self, HoldKind::GpuFault)
    }
}

/// The holds of one worker; clones share them (the worker reads, the sources write).
#[derive(Debug, Clone)]
pub struct Holds {
    tx: Arc<watch::Sender<BTreeMap<HoldKind, String>>>,
}

impl Default for Holds {
    fn default() -> Holds {
        Holds::new()
    }
}

impl Holds {
    /// No hold.
    pub fn new() -> Holds {
        Holds {
            tx: Arc::new(watch::channel(BTreeMap::new()).0),
        }
    }

    /// Holds the worker for `reason` (replacing the reason of a hold of the same kind).
    pub fn set(&self, kind: HoldKind, reason: impl Into<String>) {
        let reason = reason.into();
        self.tx
            .send_if_modified(|h| h.insert(kind, reason.clone()).as_ref() != Some(&reason));
    }

    /// Lifts the hold of `kind`, if any.
    pub fn clear(&self, kind: HoldKind) {
        self.tx.send_if_modified(|h| h.remove(&kind).is_some());
    }

    /// Why the worker must not claim now, every hold's reason joined; `None`: it may.
    pub fn reason(&self) -> Option<String> {
        let h = self.tx.borrow();
        (!h.is_empty()).then(|| h.values().cloned().collect::<Vec<_>>().join("; "))
    }

    /// The reason of the hold that returns the running job, when one is set.
    pub fn returning(&self) -> Option<String> {
        self.tx
            .borrow()
            .iter()
            .find(|(k, _)| k.returns_job())
            .map(|(_, r)| r.clone())
    }

    /// Follows the holds.
    pub fn subscribe(&self) -> watch::Receiver<BTreeMap<HoldKind, String>> {
        self.tx.subscribe()
    }

    /// Resolves once no hold is set.
    pub async fn released(&self) {
        let mut rx = self.subscribe();
        // The sender lives in `self`, so the channel cannot close while we wait.
        let _ = rx.wait_for(BTreeMap::is_empty).await;
    }

    /// Resolves once a hold is set.
    pub async fn held(&self) {
        let mut rx = self.subscribe();
        let _ = rx.wait_for(|h| !h.is_empty()).await;
    }

    /// Resolves once a hold that returns the running job is set; its reason.
    pub async fn returning_job(&self) -> String {
        let mut rx = self.subscribe();
        loop {
            if let Some(r) = self.returning() {
                return r;
            }
            if rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

/// Holds `holds` while GPU `index` is faulted on `health`, with the fault's reason, until
/// `stop` (a faulted GPU stays faulted: NVML does not take a fault back).
pub async fn follow_gpu(
    index: u32,
    mut health: watch::Receiver<Vec<crate::gpu::GpuHealth>>,
    holds: Holds,
    stop: tokio_util::sync::CancellationToken,
) {
    loop {
        let fault = health
            .borrow_and_update()
            .iter()
            .find(|g| g.index == index && g.health == crate::gpu::Condition::Faulted)
            .map(|g| g.reason.clone().unwrap_or_default());
        match fault {
            Some(reason) => holds.set(HoldKind::GpuFault, format!("gpu {index} faulted: {reason}")),
            None => holds.clear(HoldKind::GpuFault),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = health.changed() => if changed.is_err() { return },
        }
    }
}

/// Whose fault a job's failure is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Blame {
    /// The job's own: an invalid workflow or payload, a request the service refused (4xx), a
    /// failure the service pins on the job, its time limit.
    Job,
    /// This machine's: its service is unreachable, failed, stalled or lost the job, the
    /// connector crashed, the GPU faulted.
    Machine,
    /// Neither: an output store or an external API's quota. It says nothing about the worker.
    Elsewhere,
}

impl Blame {
    /// Whom `e` blames. Builds on the connectors' own retryable/fatal classification: a fatal
    /// error is the job's, a retryable one from a service of this machine is the machine's.
    pub fn of(e: &ConnectorError) -> Blame {
        match e {
            ConnectorError::BadPayload(_) | ConnectorError::Rejected { .. } | ConnectorError::Timeout(_) => Blame::Job,
            ConnectorError::Failed { retryable, .. } => {
                if *retryable {
                    Blame::Machine
                } else {
                    Blame::Job
                }
            }
            // A connector that reports cancellation without being asked has lost its service;
            // a service that said nothing for its stall timeout is wedged or hung.
            ConnectorError::Unavailable { .. }
            | ConnectorError::Cancelled
            | ConnectorError::Stalled { .. }
            | ConnectorError::ServiceLost { .. } => Blame::Machine,
            ConnectorError::QuotaReached { .. } | ConnectorError::Destination(_) | ConnectorError::Storage { .. } => {
                Blame::Elsewhere
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn holds_join_their_reasons_and_release() {
        let holds = Holds::new();
        assert_eq!(holds.reason(), None);
        holds.set(HoldKind::Quarantine, "quarantined");
        holds.set(HoldKind::GpuFault, "gpu faulted: XID 79");
        assert_eq!(holds.reason().as_deref(), Some("gpu faulted: XID 79; quarantined"));
        assert_eq!(holds.returning().as_deref(), Some("gpu faulted: XID 79"));
        holds.held().await;
        let waiter = tokio::spawn({
            let holds = holds.clone();
            async move { holds.released().await }
        });
        holds.clear(HoldKind::GpuFault);
        assert_eq!(holds.returning(), None);
        assert!(!waiter.is_finished());
        holds.clear(HoldKind::Quarantine);
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .expect("released")
            .unwrap();
    }

    #[test]
    fn blame_follows_the_connector_classification() {
        assert_eq!(Blame::of(&ConnectorError::BadPayload("no".into())), Blame::Job);
        assert_eq!(
            Blame::of(&ConnectorError::Rejected { message: "400".into() }),
            Blame::Job
        );
        let failed = |retryable| ConnectorError::Failed {
            message: "x".into(),
            retryable,
        };
        assert_eq!(Blame::of(&failed(false)), Blame::Job);
        assert_eq!(Blame::of(&failed(true)), Blame::Machine);
        let down = ConnectorError::Unavailable {
            message: "refused".into(),
            source: None,
        };
        assert_eq!(Blame::of(&down), Blame::Machine);
        assert_eq!(Blame::of(&ConnectorError::Cancelled), Blame::Machine);
        let stalled = ConnectorError::Stalled {
            service: "comfyui".into(),
            silent_for: std::time::Duration::from_secs(60),
            timeout: std::time::Duration::from_secs(60),
            answers: false,
        };
        assert_eq!(Blame::of(&stalled), Blame::Machine);
    }
}

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
//! A hold on something outside the worker that may come right by itself or by an operator's
//! hand (the output store refuses the machine's credentials until they are rotated) is set
//! with a [`Recheck`]: a cheap authenticated request that says whether the cause is gone. The
//! held worker runs it every `worker.hold_recheck` and lifts the hold as soon as it passes, so
//! a corrected key (a `<NAME>_FILE` rewritten, then `machine reload`) puts the worker back to
//! work without a restart. A new kind of such hold (an external API refusing its key, or out
//! of credit) is one more [`HoldKind`] and one more [`Recheck`]; the mechanism is this one.
//!
//! [`Blame`] is the one classification of a failed job: the job's own fault (an invalid
//! workflow or payload, a 4xx, any failure the service reports for the job, retryable or
//! not), this machine's (its service crashed or said nothing, its GPU faulted or ran out of
//! memory, the connector crashed), or something elsewhere (an output store, an external API's
//! quota). Only the machine's failures count towards a quarantine.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use futures_util::future::BoxFuture;
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
    /// An external API refuses this machine's key, or its account is out of credit; lifted
    /// by its [`Recheck`] once the API accepts the machine again.
    ApiCredentials,
    /// The output store refuses the machine's credentials (`output store refuses the
    /// credentials: ...`); lifted by its [`Recheck`] once the store accepts them.
    StoreCredentials,
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

/// A cheap check of whether the cause of a hold is gone, e.g. one authenticated request to
/// the store that refused the credentials. The seam where a new cause of holds plugs in.
pub trait Recheck: Send + Sync + fmt::Debug {
    /// `Ok(())` when the hold may be lifted; else why it still applies, in words.
    fn recheck(&self) -> BoxFuture<'_, Result<(), String>>;
}

/// The longest one re-check may take; one that takes longer counts as not passed.
const RECHECK_LIMIT: Duration = Duration::from_secs(20);

/// The holds of one worker; clones share them (the worker reads, the sources write).
#[derive(Debug, Clone)]
pub struct Holds {
    tx: Arc<watch::Sender<BTreeMap<HoldKind, String>>>,
    /// The re-checks of the holds set with one, by kind.
    rechecks: Arc<Mutex<BTreeMap<HoldKind, Arc<dyn Recheck>>>>,
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
            rechecks: Arc::default(),
        }
    }

    fn rechecks(&self) -> std::sync::MutexGuard<'_, BTreeMap<HoldKind, Arc<dyn Recheck>>> {
        self.rechecks.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Holds the worker for `reason` (replacing the reason of a hold of the same kind, and
    /// its re-check: its source lifts it).
    pub fn set(&self, kind: HoldKind, reason: impl Into<String>) {
        self.rechecks().remove(&kind);
        self.put(kind, reason.into());
    }

    /// Holds the worker for `reason` until `check` passes (see [`Holds::recheck`]).
    pub fn set_until(&self, kind: HoldKind, reason: impl Into<String>, check: Arc<dyn Recheck>) {
        self.rechecks().insert(kind, check);
        self.put(kind, reason.into());
    }

    fn put(&self, kind: HoldKind, reason: String) {
        self.tx
            .send_if_modified(|h| h.insert(kind, reason.clone()).as_ref() != Some(&reason));
    }

    /// Lifts the hold of `kind`, if any.
    pub fn clear(&self, kind: HoldKind) {
        self.rechecks().remove(&kind);
        self.tx.send_if_modified(|h| h.remove(&kind).is_some());
    }

    /// Whether a hold with a re-check is set.
    pub fn has_rechecks(&self) -> bool {
        !self.rechecks().is_empty()
    }

    /// Runs the re-check of every hold set with one (each within a time limit) and lifts
    /// those that pass; a hold whose check fails stays, its reason unchanged.
    pub async fn recheck(&self, worker: &str) {
        let checks: Vec<(HoldKind, Arc<dyn Recheck>)> =
            self.rechecks().iter().map(|(k, c)| (*k, Arc::clone(c))).collect();
        for (kind, check) in checks {
            let passed = match tokio::time::timeout(RECHECK_LIMIT, check.recheck()).await {
                Ok(r) => r,
                Err(_) => Err(format!("no answer within {RECHECK_LIMIT:?}")),
            };
            match passed {
                Ok(()) => {
                    // Lifted only if it is still the hold this check was set with.
                    let same = self.rechecks().get(&kind).is_some_and(|c| Arc::ptr_eq(c, &check));
                    if same {
                        tracing::info!(worker, hold = ?kind, "the re-check passed; lifting the hold");
                        self.clear(kind);
                    }
                }
                Err(why) => tracing::info!(worker, hold = ?kind, %why, "the re-check did not pass; still held"),
            }
        }
    }

    /// Why the worker must not claim now, every hold's reason joined; `None`: it may.
    pub fn reason(&self) -> Option<String> {
        let h = self.tx.borrow();
        (!h.is_empty()).then(|| h.values().cloned().collect::<Vec<_>>().join("; "))
    }

    /// Whether a hold of `kind` is set.
    pub fn has(&self, kind: HoldKind) -> bool {
        self.tx.borrow().contains_key(&kind)
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
    /// failure the service or the API reports for the job (retryable or not), its time limit.
    Job,
    /// This machine's: its service is unreachable, stalled or lost the job, the connector
    /// crashed, the GPU faulted or ran out of memory ([`ConnectorError::MachineFault`]).
    Machine,
    /// Neither: an output store or an external API's quota. It says nothing about the worker.
    Elsewhere,
}

impl Blame {
    /// Whom `e` blames: what the connector says happened, not whether another attempt may
    /// succeed (a retryable failure of the job is still the job's).
    pub fn of(e: &ConnectorError) -> Blame {
        match e {
            // What the service or the API says of the job is the job's own, retryable or not:
            // it spends the job's retries and says nothing about this machine (issue 23: two
            // jobs failing retryably quarantined a whole machine). A connector that knows the
            // machine is at fault says so with `MachineFault`.
            ConnectorError::BadPayload(_)
            | ConnectorError::Rejected { .. }
            | ConnectorError::Timeout(_)
            | ConnectorError::Failed { .. } => Blame::Job,
            // A connector that reports cancellation without being asked has lost its service;
            // a service that said nothing for its stall timeout is wedged or hung.
            ConnectorError::Unavailable { .. }
            | ConnectorError::MaybeCreated { .. }
            | ConnectorError::Cancelled
            | ConnectorError::Stalled { .. }
            | ConnectorError::MachineFault { .. }
            | ConnectorError::ServiceLost { .. } => Blame::Machine,
            ConnectorError::QuotaReached { .. }
            | ConnectorError::CredentialsRefused { .. }
            | ConnectorError::Destination(_)
            | ConnectorError::Storage { .. } => Blame::Elsewhere,
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
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("released")
            .unwrap();
    }

    /// Passes once told to.
    #[derive(Debug, Default)]
    struct Gate(std::sync::atomic::AtomicBool);

    impl Recheck for Gate {
        fn recheck(&self) -> BoxFuture<'_, Result<(), String>> {
            let open = self.0.load(std::sync::atomic::Ordering::SeqCst);
            Box::pin(async move { if open { Ok(()) } else { Err("still refused".into()) } })
        }
    }

    #[tokio::test]
    async fn a_hold_with_a_recheck_is_lifted_when_the_check_passes() {
        let holds = Holds::new();
        let gate = Arc::new(Gate::default());
        holds.set_until(
            HoldKind::StoreCredentials,
            "output store refuses the credentials",
            gate.clone(),
        );
        holds.set(HoldKind::Quarantine, "quarantined");
        assert!(holds.has_rechecks());
        holds.recheck("w").await;
        assert_eq!(
            holds.reason().as_deref(),
            Some("quarantined; output store refuses the credentials"),
            "a failing check keeps the hold"
        );
        gate.0.store(true, std::sync::atomic::Ordering::SeqCst);
        holds.recheck("w").await;
        assert_eq!(
            holds.reason().as_deref(),
            Some("quarantined"),
            "only the checked hold is lifted"
        );
        assert!(!holds.has_rechecks());
        // A hold set again by its source without a check is its source's to lift.
        holds.set_until(HoldKind::StoreCredentials, "refused", gate.clone());
        holds.set(HoldKind::StoreCredentials, "refused for good");
        holds.recheck("w").await;
        assert!(holds.reason().unwrap().contains("refused for good"));
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
        assert_eq!(
            Blame::of(&failed(true)),
            Blame::Job,
            "a retryable failure of the job is still the job's"
        );
        let oom = ConnectorError::MachineFault {
            message: "the GPU ran out of memory".into(),
        };
        assert_eq!(Blame::of(&oom), Blame::Machine);
        assert!(oom.is_retryable());
        let down = ConnectorError::Unavailable {
            message: "refused".into(),
            source: None,
        };
        assert_eq!(Blame::of(&down), Blame::Machine);
        assert_eq!(Blame::of(&ConnectorError::Cancelled), Blame::Machine);
        let stalled = ConnectorError::Stalled {
            service: "comfyui".into(),
            silent_for: Duration::from_secs(60),
            timeout: Duration::from_secs(60),
            answers: false,
        };
        assert_eq!(Blame::of(&stalled), Blame::Machine);
    }
}

//! How the supervisor grows while it runs: [`Growth`] builds the actor of a service a reload
//! adds (and its registry [`Entry`]) and hands it to the running supervisor, or retires one.
//! The handle keeps it; the supervisor's loop receives its [`Change`]s.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};

use super::logs::ServiceLog;
use super::pidfile::PidFile;
use super::policy::{History, Policy};
use super::service::Actor;
use super::status::{Command, ServiceStatus};
use crate::config::{ServiceSpec, SupervisorConfig};
use crate::logging::Tail;

/// One supervised service as the handle reaches it: its actor's commands, its status and its
/// log tail.
#[derive(Debug)]
pub(crate) struct Entry {
    pub commands: mpsc::Sender<Command>,
    pub status: watch::Receiver<ServiceStatus>,
    pub tail: Arc<Tail>,
}

/// A change a reload makes to the running set of services.
#[derive(Debug)]
pub(crate) enum Change {
    /// Run this actor too.
    Add(Box<Actor>),
    /// Stop this service for good; answer once it has stopped.
    Remove(String, oneshot::Sender<()>),
}

/// What building an actor needs beyond its spec, kept by the handle so that a reload can add
/// services to a running supervisor.
#[derive(Debug)]
pub(crate) struct Growth {
    pub(super) cfg: SupervisorConfig,
    pub(super) log_dir: PathBuf,
    pub(super) pids: Arc<PidFile>,
    pub(super) critical: Arc<watch::Sender<Option<String>>>,
    pub(super) epoch: Instant,
    pub(super) changes: mpsc::UnboundedSender<Change>,
}

impl Growth {
    /// The actor of `spec`, publishing on `status_tx`, and its registry entry; it starts after
    /// the services its `after` names, whose statuses `status_of` gives.
    pub(crate) fn actor(
        &self,
        spec: ServiceSpec,
        status_tx: watch::Sender<ServiceStatus>,
        status_of: &dyn Fn(&str) -> Option<watch::Receiver<ServiceStatus>>,
    ) -> (Actor, Entry) {
        let deps = spec
            .after
            .iter()
            .filter_map(|d| {
                let rx = status_of(d);
                if rx.is_none() {
                    tracing::warn!(service = %spec.name, after = %d, "ignoring an unknown service in `after`");
                }
                rx
            })
            .collect();
        let (cmd_tx, cmd_rx) = mpsc::channel(8);
        let log = Arc::new(ServiceLog::new(&spec.name, &self.log_dir, &self.cfg));
        let entry = Entry {
            commands: cmd_tx,
            status: status_tx.subscribe(),
            tail: Arc::clone(log.tail()),
        };
        let actor = Actor {
            policy: Policy::new(spec.restart, &self.cfg),
            history: History::default(),
            status: status_tx,
            deps,
            dependants: Vec::new(),
            commands: cmd_rx,
            log,
            pids: Arc::clone(&self.pids),
            critical: Arc::clone(&self.critical),
            epoch: self.epoch,
            runs: 0,
            spec,
        };
        (actor, entry)
    }

    /// Hands an added service's actor to the running supervisor; `Err` once it has stopped.
    pub(crate) fn hand_over(&self, actor: Actor) -> Result<(), ()> {
        self.changes.send(Change::Add(Box::new(actor))).map_err(|_| ())
    }

    /// Stops a service for good; `Err` when the supervisor stopped first.
    pub(crate) async fn retire(&self, name: &str) -> Result<(), ()> {
        let (tx, rx) = oneshot::channel();
        self.changes.send(Change::Remove(name.to_owned(), tx)).map_err(|_| ())?;
        rx.await.map_err(|_| ())
    }
}

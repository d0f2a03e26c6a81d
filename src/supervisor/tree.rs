//! The supervisor itself: builds one actor per service from the plan, wires each to the status
//! of the services it starts after (readiness gates it) and of those that start after it (they
//! stop first), and runs them all until shutdown.
//!
//! Services are started concurrently, each as soon as its `after` services are ready; at
//! shutdown each waits for its dependants to stop before it stops, which gives reverse
//! dependency order while independent services stop in parallel.
//!
//! A reload adds and removes services while the rest run on: each actor runs under its own
//! child of the shutdown token, so removing one is its own shutdown (after its dependants, with
//! its grace), and [`Growth`] builds the actors of added services and hands them to the running
//! supervisor. A service added later is not among the dependants of the services it starts
//! after, so at machine shutdown those may stop alongside it rather than after it.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use super::growth::{Change, Growth};
use super::handle::{Registry, SupervisorError, SupervisorHandle};
use super::pidfile::PidFile;
use super::service::Actor;
use super::status::ServiceStatus;
use crate::config::{ServiceSpec, SupervisorConfig};

/// The set of supervised services, ready to run.
#[derive(Debug)]
pub struct Supervisor {
    actors: Vec<Actor>,
    changes: mpsc::UnboundedReceiver<Change>,
    handle: SupervisorHandle,
}

impl Supervisor {
    /// Prepares the services (in start order, as [`crate::plan::Plan::start_order`] gives them),
    /// creates `<workspace>/logs/`, and kills what a previous run on this workspace left running
    /// (see [`super::pidfile`]; the caller holds the workspace lock). Nothing is started until
    /// [`Supervisor::run`].
    pub fn new(
        services: Vec<ServiceSpec>,
        cfg: &SupervisorConfig,
        workspace: &Path,
    ) -> Result<Supervisor, SupervisorError> {
        let log_dir = workspace.join("logs");
        std::fs::create_dir_all(&log_dir).map_err(|source| SupervisorError::LogDir {
            path: log_dir.clone(),
            source,
        })?;
        let pids = Arc::new(PidFile::new(workspace));
        pids.kill_leftovers();
        let (critical_tx, critical_rx) = watch::channel(None);
        let (changes_tx, changes) = mpsc::unbounded_channel();
        let growth = Growth {
            cfg: cfg.clone(),
            log_dir,
            pids,
            critical: Arc::new(critical_tx),
            epoch: Instant::now(),
            changes: changes_tx,
        };
        // Statuses first, so that a service's `after` may name one listed after it.
        let mut registry = Registry::default();
        let mut senders: BTreeMap<String, watch::Sender<ServiceStatus>> = BTreeMap::new();
        let mut statuses: BTreeMap<String, watch::Receiver<ServiceStatus>> = BTreeMap::new();
        for spec in &services {
            let (tx, rx) = watch::channel(ServiceStatus::new(&spec.name, spec.gpu, spec.critical));
            senders.insert(spec.name.clone(), tx);
            statuses.insert(spec.name.clone(), rx);
        }
        let status_of = |name: &str| statuses.get(name).cloned();
        let mut actors = Vec::new();
        for spec in services {
            let name = spec.name.clone();
            let Some(tx) = senders.remove(&name) else {
                // A second service of the same name: the plan's graph check refuses that.
                continue;
            };
            let (actor, entry) = growth.actor(spec, tx, &status_of);
            registry.order.push(name.clone());
            registry.services.insert(name, entry);
            actors.push(actor);
        }
        let after: Vec<(String, Vec<String>)> = actors
            .iter()
            .map(|a| (a.spec.name.clone(), a.spec.after.clone()))
            .collect();
        for actor in &mut actors {
            actor.dependants = after
                .iter()
                .filter(|(_, deps)| deps.contains(&actor.spec.name))
                .filter_map(|(name, _)| registry.services.get(name).map(|e| e.status.clone()))
                .collect();
        }
        Ok(Supervisor {
            actors,
            changes,
            handle: SupervisorHandle::new(registry, critical_rx, growth),
        })
    }

    /// The handle other subsystems use.
    pub fn handle(&self) -> SupervisorHandle {
        self.handle.clone()
    }

    /// Runs every service until `shutdown` is cancelled, then stops them in reverse dependency
    /// order (each within its grace, or at once when `force` is cancelled) and returns when all
    /// are stopped. Meanwhile it runs the services a reload adds and stops those it removes.
    pub async fn run(self, shutdown: CancellationToken, force: CancellationToken) -> Result<(), SupervisorError> {
        let mut running = Running::default();
        for actor in self.actors {
            running.spawn(actor, &shutdown, &force);
        }
        let mut changes = self.changes;
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                Some(change) = changes.recv() => match change {
                    Change::Add(actor) => {
                        tracing::info!(service = %actor.spec.name, "service added");
                        running.spawn(*actor, &shutdown, &force);
                    }
                    Change::Remove(name, reply) => running.remove(&name, reply),
                },
                Some(joined) = running.tasks.join_next_with_id() => running.ended(joined),
            }
        }
        while let Some(joined) = running.tasks.join_next_with_id().await {
            running.ended(joined);
        }
        Ok(())
    }
}

/// The running actors: each under its own child of the shutdown token, so one can be stopped
/// alone.
#[derive(Default)]
struct Running {
    tasks: tokio::task::JoinSet<()>,
    names: HashMap<tokio::task::Id, String>,
    tokens: BTreeMap<String, (tokio::task::Id, CancellationToken)>,
    /// Removals waiting for their actor to end.
    removing: HashMap<tokio::task::Id, oneshot::Sender<()>>,
}

impl Running {
    fn spawn(&mut self, actor: Actor, shutdown: &CancellationToken, force: &CancellationToken) {
        let name = actor.spec.name.clone();
        let own = shutdown.child_token();
        let id = self.tasks.spawn(actor.run(own.clone(), force.clone())).id();
        self.tokens.insert(name.clone(), (id, own));
        self.names.insert(id, name);
    }

    fn remove(&mut self, name: &str, reply: oneshot::Sender<()>) {
        match self.tokens.remove(name) {
            Some((id, own)) => {
                tracing::info!(service = %name, "service removed; stopping it");
                own.cancel();
                self.removing.insert(id, reply);
            }
            None => {
                let _ = reply.send(());
            }
        }
    }

    fn ended(&mut self, joined: Result<(tokio::task::Id, ()), tokio::task::JoinError>) {
        let id = match &joined {
            Ok((id, ())) => *id,
            Err(e) => e.id(),
        };
        let name = self.names.remove(&id).unwrap_or_default();
        if let Err(e) = joined {
            tracing::error!(service = %name, "the service's actor failed: {e}");
        }
        if let Some(reply) = self.removing.remove(&id) {
            let _ = reply.send(());
        }
    }
}

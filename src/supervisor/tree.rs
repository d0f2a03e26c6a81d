//! The supervisor itself: builds one actor per service from the plan, wires each to the status
//! of the services it starts after (readiness gates it) and of those that start after it (they
//! stop first), and runs them all until shutdown.
//!
//! Services are started concurrently, each as soon as its `after` services are ready; at
//! shutdown each waits for its dependants to stop before it stops, which gives reverse
//! dependency order while independent services stop in parallel.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use super::handle::{Entry, ServiceStatus, SupervisorError, SupervisorHandle};
use super::logs::ServiceLog;
use super::pidfile::PidFile;
use super::policy::{History, Policy};
use super::service::Actor;
use crate::config::{ServiceSpec, SupervisorConfig};

/// The set of supervised services, ready to run.
#[derive(Debug)]
pub struct Supervisor {
    actors: Vec<Actor>,
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
        let epoch = Instant::now();
        let (critical_tx, critical_rx) = watch::channel(None);
        let critical = Arc::new(critical_tx);
        let mut statuses = BTreeMap::new();
        let mut parts = Vec::new();
        for spec in services {
            let (status_tx, status_rx) = watch::channel(ServiceStatus::new(&spec.name, spec.gpu, spec.critical));
            statuses.insert(spec.name.clone(), status_rx);
            parts.push((spec, status_tx));
        }
        let mut entries = BTreeMap::new();
        let mut actors = Vec::new();
        let order: Vec<String> = parts.iter().map(|(s, _)| s.name.clone()).collect();
        for (spec, status_tx) in parts {
            let deps = spec
                .after
                .iter()
                .filter_map(|d| {
                    let rx = statuses.get(d).cloned();
                    if rx.is_none() {
                        tracing::warn!(service = %spec.name, after = %d, "ignoring an unknown service in `after`");
                    }
                    rx
                })
                .collect();
            let (cmd_tx, cmd_rx) = mpsc::channel(8);
            let log = Arc::new(ServiceLog::new(&spec.name, &log_dir, cfg));
            entries.insert(
                spec.name.clone(),
                Entry {
                    commands: cmd_tx,
                    status: status_tx.subscribe(),
                    tail: Arc::clone(log.tail()),
                },
            );
            actors.push(Actor {
                policy: Policy::new(spec.restart, cfg),
                history: History::default(),
                status: status_tx,
                deps,
                dependants: Vec::new(),
                commands: cmd_rx,
                log,
                pids: Arc::clone(&pids),
                critical: Arc::clone(&critical),
                epoch,
                runs: 0,
                spec,
            });
        }
        let after: Vec<(String, Vec<String>)> = actors
            .iter()
            .map(|a| (a.spec.name.clone(), a.spec.after.clone()))
            .collect();
        for actor in &mut actors {
            actor.dependants = after
                .iter()
                .filter(|(_, deps)| deps.contains(&actor.spec.name))
                .filter_map(|(name, _)| statuses.get(name).cloned())
                .collect();
        }
        Ok(Supervisor {
            actors,
            handle: SupervisorHandle::new(order, entries, critical_rx),
        })
    }

    /// The handle other subsystems use.
    pub fn handle(&self) -> SupervisorHandle {
        self.handle.clone()
    }

    /// Runs every service until `shutdown` is cancelled, then stops them in reverse dependency
    /// order (each within its grace, or at once when `force` is cancelled) and returns when all
    /// are stopped.
    pub async fn run(self, shutdown: CancellationToken, force: CancellationToken) -> Result<(), SupervisorError> {
        let tasks: Vec<_> = self
            .actors
            .into_iter()
            .map(|a| {
                let name = a.spec.name.clone();
                (name, tokio::spawn(a.run(shutdown.clone(), force.clone())))
            })
            .collect();
        for (name, task) in tasks {
            if let Err(e) = task.await {
                tracing::error!(service = %name, "the service's actor failed: {e}");
            }
        }
        Ok(())
    }
}

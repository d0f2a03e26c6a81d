//! What other subsystems see of the supervisor: a cloneable [`SupervisorHandle`] that starts,
//! stops and restarts services by name, reads their [`ServiceStatus`] and log tail, watches a
//! set of services for health ([`ServicesWatch`]), and tells when a `critical` service failed.
//! A reload adds and removes services through it ([`SupervisorHandle::add`],
//! [`SupervisorHandle::remove`]) while the others run on untouched.
//!
//! The handle never blocks on a service: statuses are `tokio::sync::watch` values each actor
//! publishes, and commands are messages the actor answers when it has acted.

use std::collections::BTreeMap;
use std::sync::{Arc, PoisonError, RwLock};

use tokio::sync::{oneshot, watch};

use super::growth::{Entry, Growth};
use super::status::{Command, ServiceStatus};
use crate::logging::Tail;

/// Whether `service` is an instance of the connector `connector`, as the plan names them:
/// `<connector>-gpu<i>` or `<connector>-cpu<i>`.
fn is_instance_of(service: &str, connector: &str) -> bool {
    let Some(rest) = service.strip_prefix(connector).and_then(|r| r.strip_prefix('-')) else {
        return false;
    };
    let index = rest.strip_prefix("gpu").or_else(|| rest.strip_prefix("cpu"));
    index.is_some_and(|i| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()))
}

fn unknown(name: &str, registry: &Registry) -> SupervisorError {
    SupervisorError::UnknownService {
        name: name.to_owned(),
        known: if registry.order.is_empty() {
            "none".to_owned()
        } else {
            registry.order.join(", ")
        },
    }
}

/// Why a request to the supervisor failed.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// No service has that name (nor is it a connector with instances).
    #[error("failed to find service `{name}` (the services are: {known})")]
    UnknownService {
        /// The name asked for.
        name: String,
        /// The services there are, comma-separated.
        known: String,
    },
    /// A connector name that stands for several services where one is needed.
    #[error("`{name}` runs as {}: name one of them", .instances.join(", "))]
    Several {
        /// The connector name asked for.
        name: String,
        /// Its services.
        instances: Vec<String>,
    },
    /// The supervisor has shut down.
    #[error("failed to reach service `{0}`: the supervisor has stopped")]
    Gone(String),
    /// A service of that name is already supervised.
    #[error("failed to add service `{0}`: a service of that name runs already")]
    Exists(String),
    /// The log directory could not be created.
    #[error("failed to create the log directory {path}")]
    LogDir {
        /// The directory.
        path: std::path::PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The services supervised now; a reload changes it.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    /// Services in start order (added services last).
    pub order: Vec<String>,
    pub services: BTreeMap<String, Entry>,
}

#[derive(Debug)]
struct Inner {
    registry: RwLock<Registry>,
    critical: watch::Receiver<Option<String>>,
    /// Builds and hands over the actors of added services.
    growth: Growth,
}

/// The supervisor as every other subsystem sees it. Cheap to clone.
#[derive(Debug, Clone)]
pub struct SupervisorHandle {
    inner: Arc<Inner>,
}

impl SupervisorHandle {
    pub(crate) fn new(registry: Registry, critical: watch::Receiver<Option<String>>, growth: Growth) -> Self {
        SupervisorHandle {
            inner: Arc::new(Inner {
                registry: RwLock::new(registry),
                critical,
                growth,
            }),
        }
    }

    /// Reads one service's entry; the lock is held only while `f` runs, never across an await.
    fn entry<T>(&self, name: &str, f: impl FnOnce(&Entry) -> T) -> Result<T, SupervisorError> {
        let registry = self.inner.registry.read().unwrap_or_else(PoisonError::into_inner);
        registry
            .services
            .get(name)
            .map(f)
            .ok_or_else(|| unknown(name, &registry))
    }

    /// The services a name given by an operator stands for: the service of that name, else
    /// every instance of the connector of that name (`comfyui`: `comfyui-gpu0`,
    /// `comfyui-gpu1`, ...). An unknown name's error lists the valid ones.
    pub fn resolve(&self, name: &str) -> Result<Vec<String>, SupervisorError> {
        let registry = self.inner.registry.read().unwrap_or_else(PoisonError::into_inner);
        if registry.services.contains_key(name) {
            return Ok(vec![name.to_owned()]);
        }
        let instances: Vec<String> = registry
            .order
            .iter()
            .filter(|n| is_instance_of(n, name))
            .cloned()
            .collect();
        if instances.is_empty() {
            return Err(unknown(name, &registry));
        }
        Ok(instances)
    }

    /// The one service a name stands for (a connector with one instance is that instance).
    pub fn resolve_one(&self, name: &str) -> Result<String, SupervisorError> {
        let mut all = self.resolve(name)?;
        if all.len() > 1 {
            return Err(SupervisorError::Several {
                name: name.to_owned(),
                instances: all,
            });
        }
        Ok(all.remove(0))
    }

    async fn send(&self, name: &str, make: impl FnOnce(oneshot::Sender<()>) -> Command) -> Result<(), SupervisorError> {
        let (tx, rx) = oneshot::channel();
        let gone = || SupervisorError::Gone(name.to_owned());
        let commands = self.entry(name, |e| e.commands.clone())?;
        commands.send(make(tx)).await.map_err(|_| gone())?;
        rx.await.map_err(|_| gone())
    }

    /// Supervises a new service (a reload added it): it starts as soon as the services in its
    /// `after` list are ready. Returns once the running supervisor took it.
    pub fn add(&self, spec: crate::config::ServiceSpec) -> Result<(), SupervisorError> {
        let mut registry = self.inner.registry.write().unwrap_or_else(PoisonError::into_inner);
        if registry.services.contains_key(&spec.name) {
            return Err(SupervisorError::Exists(spec.name));
        }
        let name = spec.name.clone();
        let (status_tx, _) = watch::channel(ServiceStatus::new(&spec.name, spec.gpu, spec.critical));
        let status_of = |d: &str| registry.services.get(d).map(|e| e.status.clone());
        let (actor, entry) = self.inner.growth.actor(spec, status_tx, &status_of);
        registry.order.push(name.clone());
        registry.services.insert(name.clone(), entry);
        self.inner
            .growth
            .hand_over(actor)
            .map_err(|()| SupervisorError::Gone(name))
    }

    /// Stops a service for good (as at shutdown: SIGTERM, its grace, SIGKILL) and forgets it.
    /// Returns once it has stopped. The caller stops the services that start after it first.
    pub async fn remove(&self, name: &str) -> Result<(), SupervisorError> {
        self.entry(name, |_| ())?;
        let result = self.inner.growth.retire(name).await;
        let mut registry = self.inner.registry.write().unwrap_or_else(PoisonError::into_inner);
        registry.services.remove(name);
        registry.order.retain(|n| n != name);
        result.map_err(|()| SupervisorError::Gone(name.to_owned()))
    }

    /// Starts a stopped, exited or failed service (or cuts a backoff short), with a fresh
    /// restart history; returns once the service's actor took the request (the service may
    /// still wait for its `after` services). A running service is left alone.
    pub async fn start(&self, name: &str) -> Result<(), SupervisorError> {
        self.send(name, Command::Start).await
    }

    /// Stops a service (SIGTERM to its group, SIGKILL after its grace); it stays stopped until
    /// started again. Returns once it has stopped.
    pub async fn stop(&self, name: &str) -> Result<(), SupervisorError> {
        self.send(name, Command::Stop).await
    }

    /// Stops a service and starts it again at once; returns once it was stopped and the new run
    /// was begun.
    pub async fn restart(&self, name: &str) -> Result<(), SupervisorError> {
        self.send(name, Command::Restart).await
    }

    /// Declares the running service failed for `reason` (e.g. its warm-up job failed): it is
    /// stopped and the failure counts toward backoff and crash loop, as a failed liveness probe
    /// does. A service that is not running is left alone.
    pub async fn fail(&self, name: &str, reason: &str) -> Result<(), SupervisorError> {
        let reason = reason.to_owned();
        self.send(name, |reply| Command::Fail(reason, reply)).await
    }

    /// The status of every service, in start order.
    pub fn status(&self) -> Vec<ServiceStatus> {
        let registry = self.inner.registry.read().unwrap_or_else(PoisonError::into_inner);
        registry
            .order
            .iter()
            .filter_map(|n| registry.services.get(n))
            .map(|e| e.status.borrow().clone())
            .collect()
    }

    /// The names of the services supervised now, in start order.
    pub fn names(&self) -> Vec<String> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .order
            .clone()
    }

    /// The status of one service.
    pub fn service(&self, name: &str) -> Result<ServiceStatus, SupervisorError> {
        self.entry(name, |e| e.status.borrow().clone())
    }

    /// The last `n` lines of a service's output, oldest first.
    pub fn logs(&self, name: &str, n: usize) -> Result<Vec<String>, SupervisorError> {
        self.entry(name, |e| e.tail.last(n))
    }

    /// A service's output tail itself, for a reader that follows it.
    pub fn log_tail(&self, name: &str) -> Result<Arc<Tail>, SupervisorError> {
        self.entry(name, |e| Arc::clone(&e.tail))
    }

    /// A watch over the health of `names` (e.g. a GPU worker's services).
    pub fn watch(&self, names: &[String]) -> Result<ServicesWatch, SupervisorError> {
        let receivers = names
            .iter()
            .map(|n| self.entry(n, |e| e.status.clone()))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(ServicesWatch { receivers })
    }

    /// Waits until a `critical` service has failed for good (crash loop, or exited and not
    /// restarted) and returns its name. Never returns if none does.
    pub async fn critical_failure(&self) -> String {
        let mut rx = self.inner.critical.clone();
        match rx.wait_for(Option::is_some).await {
            Ok(name) => name.clone().unwrap_or_default(),
            // The supervisor is gone without a critical failure.
            Err(_) => std::future::pending().await,
        }
    }

    /// The critical service that failed, if one did.
    pub fn critical_failed(&self) -> Option<String> {
        self.inner.critical.borrow().clone()
    }
}

/// The health of a set of services, for a worker that must only claim jobs while they are
/// healthy: wait with [`ServicesWatch::wait_healthy`] before claiming, and check
/// [`ServicesWatch::healthy`] (or await [`ServicesWatch::changed`]) between jobs.
#[derive(Debug, Clone)]
pub struct ServicesWatch {
    receivers: Vec<watch::Receiver<ServiceStatus>>,
}

impl ServicesWatch {
    /// Whether every watched service is healthy (an empty set always is).
    pub fn healthy(&self) -> bool {
        self.receivers.iter().all(|r| r.borrow().healthy())
    }

    /// The watched services' statuses.
    pub fn statuses(&self) -> Vec<ServiceStatus> {
        self.receivers.iter().map(|r| r.borrow().clone()).collect()
    }

    /// Waits until every watched service serves ([`ServiceStatus::serving`]), crash loop or
    /// not.
    pub async fn wait_serving(&mut self) -> Result<(), SupervisorError> {
        while !self.receivers.iter().all(|r| r.borrow().serving()) {
            self.changed().await?;
        }
        Ok(())
    }

    /// Waits until every watched service is healthy.
    pub async fn wait_healthy(&mut self) -> Result<(), SupervisorError> {
        while !self.healthy() {
            self.changed().await?;
        }
        Ok(())
    }

    /// Waits until any watched service's status changes.
    pub async fn changed(&mut self) -> Result<(), SupervisorError> {
        if self.receivers.is_empty() {
            return std::future::pending().await;
        }
        let futures = self.receivers.iter_mut().map(|r| Box::pin(r.changed()));
        let (result, i, rest) = futures_util::future::select_all(futures).await;
        drop(rest);
        result.map_err(|_| SupervisorError::Gone(self.receivers[i].borrow().name.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connector_name_stands_for_its_instances_only() {
        assert!(is_instance_of("comfyui-gpu0", "comfyui"));
        assert!(is_instance_of("comfyui-gpu12", "comfyui"));
        assert!(is_instance_of("comfyui-cpu0", "comfyui"));
        assert!(!is_instance_of("comfyui-gpu", "comfyui"));
        assert!(!is_instance_of("comfyui-extra", "comfyui"));
        assert!(!is_instance_of("comfyui-gpu0x", "comfyui"));
        assert!(!is_instance_of("a1111-gpu0", "comfyui"));
        assert!(!is_instance_of("comfyui", "comfyui"));
    }
}

//! A service's readiness as the workers wait on it: one `watch` of `bool` per service, `true`
//! while it runs, its readiness probe passes and it is live, fed from the service's status
//! until the machine stops it or the service is removed.

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::{ServiceStatus, ServicesWatch, SupervisorHandle};

impl SupervisorHandle {
    /// The readiness channel of service `name` and the task that feeds it, until `stop` or
    /// until the service is removed; `None` when the supervisor has no such service.
    pub fn readiness(&self, name: &str, stop: &CancellationToken) -> Option<(watch::Receiver<bool>, JoinHandle<()>)> {
        let mut watch = self.watch(&[name.to_owned()]).ok()?;
        let (tx, rx) = watch::channel(serving(&watch));
        let stop = stop.clone();
        let task = tokio::spawn(async move {
            loop {
                let _ = tx.send(serving(&watch));
                tokio::select! {
                    () = stop.cancelled() => break,
                    changed = watch.changed() => if changed.is_err() { break },
                }
            }
        });
        Some((rx, task))
    }
}

/// Whether every watched service runs with its readiness and liveness probes passing.
fn serving(watch: &ServicesWatch) -> bool {
    watch.statuses().iter().all(ServiceStatus::serving)
}

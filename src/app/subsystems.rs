//! The running machine as one ordered list of subsystems, as linkerd2-proxy drains its own:
//! each is started in the list's order as a named task with its own stop token, and
//! [`Subsystems::drain`] stops them in the reverse order, waiting for each at most its
//! [`Deadline`] before it goes on to the next. Adding a subsystem is one [`Subsystems::start`].
//!
//! A subsystem that must outlive another is started before it: the services before the
//! workers (the workers drain while their services still run), the health server before both
//! (it answers until the end), the final sweep before the health server, the signal handlers
//! first of all (a second SIGTERM forces even the last steps of the drain).

use std::future::Future;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// How long the drain waits for a subsystem once its stop token is cancelled.
#[derive(Debug, Clone, Copy)]
pub(super) struct Deadline {
    /// The wait after a plain shutdown; `None` for a subsystem that bounds its own stop.
    drain: Option<Duration>,
    /// The wait once the shutdown is forced (a second signal), when shorter than `drain`.
    forced: Option<Duration>,
}

impl Deadline {
    /// Waits at most `drain`, forced or not.
    pub(super) const fn of(drain: Duration) -> Deadline {
        Deadline {
            drain: Some(drain),
            forced: None,
        }
    }

    /// Waits for as long as the subsystem takes: for the supervisor alone, which gives each
    /// service its own grace and then SIGKILLs it (at once when forced), so its stop is bounded
    /// by the services' configured graces, which no fixed figure here can know.
    pub(super) const fn own() -> Deadline {
        Deadline {
            drain: None,
            forced: None,
        }
    }

    /// Waits at most `forced` from the moment the shutdown is forced.
    pub(super) const fn forced(self, forced: Duration) -> Deadline {
        Deadline {
            forced: Some(forced),
            ..self
        }
    }
}

/// One started subsystem.
struct Subsystem {
    name: &'static str,
    stop: CancellationToken,
    task: JoinHandle<()>,
    deadline: Deadline,
}

/// The started subsystems, in the order they started.
pub(super) struct Subsystems {
    started: Vec<Subsystem>,
    force: CancellationToken,
}

impl Subsystems {
    /// An empty list; `force` is the forced shutdown, which cuts short the deadlines that say so.
    pub(super) fn new(force: CancellationToken) -> Subsystems {
        Subsystems {
            started: Vec::new(),
            force,
        }
    }

    /// Starts `run` as the task of the subsystem `name`, handing it the token that stops it.
    pub(super) fn start<F>(&mut self, name: &'static str, deadline: Deadline, run: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let stop = CancellationToken::new();
        let task = tokio::spawn(run(stop.clone()));
        self.adopt(name, deadline, stop, task);
    }

    /// Adds a subsystem that already runs as `task` until `stop`.
    pub(super) fn adopt(
        &mut self,
        name: &'static str,
        deadline: Deadline,
        stop: CancellationToken,
        task: JoinHandle<()>,
    ) {
        self.started.push(Subsystem {
            name,
            stop,
            task,
            deadline,
        });
    }

    /// Stops every subsystem, the last started first, each within its deadline. One that does
    /// not stop in time is logged and left behind: the next ones still stop.
    pub(super) async fn drain(mut self) {
        while let Some(sub) = self.started.pop() {
            sub.stop.cancel();
            let (deadline, force) = (sub.deadline, &self.force);
            let drained = async {
                match deadline.drain {
                    Some(drain) => tokio::time::sleep(drain).await,
                    None => std::future::pending().await,
                }
            };
            let forced = async {
                match deadline.forced {
                    Some(forced) => {
                        force.cancelled().await;
                        tokio::time::sleep(forced).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                joined = sub.task => if let Err(e) = joined {
                    tracing::error!(task = sub.name, "task panicked: {e}");
                },
                () = drained => tracing::error!(
                    task = sub.name,
                    "task did not stop within {}",
                    humantime::format_duration(deadline.drain.unwrap_or_default())
                ),
                () = forced => tracing::warn!(task = sub.name, "task did not stop in time after the forced shutdown"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn drains_in_the_reverse_order_of_the_start() {
        let stopped = Arc::new(Mutex::new(Vec::new()));
        let mut list = Subsystems::new(CancellationToken::new());
        for name in ["first", "second", "third"] {
            let stopped = stopped.clone();
            list.start(name, Deadline::of(Duration::from_secs(5)), |stop| async move {
                stop.cancelled().await;
                stopped.lock().expect("not poisoned").push(name);
            });
        }
        list.drain().await;
        assert_eq!(*stopped.lock().expect("not poisoned"), ["third", "second", "first"]);
    }

    #[tokio::test]
    async fn a_subsystem_past_its_deadline_does_not_hold_the_next() {
        let stopped = Arc::new(Mutex::new(Vec::new()));
        let mut list = Subsystems::new(CancellationToken::new());
        let first = stopped.clone();
        list.start("first", Deadline::of(Duration::from_secs(5)), |stop| async move {
            stop.cancelled().await;
            first.lock().expect("not poisoned").push("first");
        });
        list.start("stuck", Deadline::of(Duration::from_millis(300)), |_stop| {
            std::future::pending()
        });
        let started = std::time::Instant::now();
        list.drain().await;
        assert_eq!(*stopped.lock().expect("not poisoned"), ["first"]);
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(300) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }

    #[tokio::test]
    async fn a_forced_shutdown_cuts_the_deadline_that_says_so() {
        let force = CancellationToken::new();
        let mut list = Subsystems::new(force.clone());
        let deadline = Deadline::of(Duration::from_secs(60)).forced(Duration::from_millis(200));
        list.start("workers", deadline, |_stop| std::future::pending());
        let started = std::time::Instant::now();
        let forcing = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            force.cancel();
        });
        list.drain().await;
        forcing.await.expect("the forcing task runs to its end");
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(500) && took < Duration::from_secs(30),
            "{took:?}"
        );
    }
}

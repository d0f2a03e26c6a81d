//! The machine's signal handling, in one place: SIGTERM or SIGINT starts the graceful shutdown,
//! a second one turns it into an immediate stop (SIGKILL to every service group), and SIGHUP
//! asks for a reload of the configuration (see `app::reload`).
//!
//! SIGCHLD belongs to the reaper. Handlers are installed by [`Signals::install`], before any
//! child is started, so that a signal arriving during startup is not lost (as PID 1 an
//! unhandled SIGTERM would simply be ignored by the kernel).

use std::sync::Arc;

use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Why the signal handlers could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("failed to install the {signal} handler")]
pub struct SignalError {
    signal: &'static str,
    #[source]
    source: std::io::Error,
}

/// The installed handlers.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
    hup: Signal,
}

impl Signals {
    /// Installs the SIGTERM, SIGINT and SIGHUP handlers.
    pub fn install() -> Result<Signals, SignalError> {
        let install = |kind: SignalKind, signal_name: &'static str| {
            signal(kind).map_err(|source| SignalError {
                signal: signal_name,
                source,
            })
        };
        Ok(Signals {
            term: install(SignalKind::terminate(), "SIGTERM")?,
            int: install(SignalKind::interrupt(), "SIGINT")?,
            hup: install(SignalKind::hangup(), "SIGHUP")?,
        })
    }

    /// Turns signals into `shutdown` (the first SIGTERM/SIGINT), `force` (the second) and a
    /// reload request on `hup` (SIGHUP) until `stop` is cancelled.
    pub async fn run(
        mut self,
        shutdown: CancellationToken,
        force: CancellationToken,
        stop: CancellationToken,
        hup: Arc<Notify>,
    ) {
        loop {
            let name = tokio::select! {
                () = stop.cancelled() => return,
                _ = self.term.recv() => "SIGTERM",
                _ = self.int.recv() => "SIGINT",
                _ = self.hup.recv() => {
                    // Several SIGHUPs before the reloader gets to them make one reload.
                    hup.notify_one();
                    continue;
                }
            };
            if !shutdown.is_cancelled() {
                tracing::info!("{name} received, shutting down gracefully (send it again to stop at once)");
                shutdown.cancel();
            } else if !force.is_cancelled() {
                tracing::warn!("{name} received again, stopping every service at once");
                force.cancel();
            }
        }
    }
}

//! The top level of `machine run`: logs the plan, starts the subsystems, waits for a shutdown
//! signal and stops them in order.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::gpu::Probe;
use crate::plan::Plan;

/// Runs the machine until SIGTERM or SIGINT.
pub async fn run(config: Config, probe: Probe, plan: Plan) -> ExitCode {
    tracing::info!(
        machine_id = %config.machine_id,
        gpus = probe.gpus.len(),
        workers = plan.workers.len(),
        services = plan.services.len(),
        "machine planned"
    );
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    for worker in &plan.workers {
        tracing::info!(worker = %worker.id, connectors = ?worker.connectors, services = ?worker.services, "worker planned");
    }
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("failed to install the SIGTERM handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Installers run before any service they feed; the tracker will feed the status page.
    let install_tracker = crate::installers::Tracker::new();
    let install = crate::installers::before_services(&config, &install_tracker, CancellationToken::new());
    tokio::select! {
        r = install => if let Err(e) = r {
            tracing::error!("{}", crate::installers::error_report(&e));
            return ExitCode::FAILURE;
        },
        // Dropping the install kills the commands it runs.
        _ = term.recv() => {
            tracing::info!("SIGTERM received while installing, shutting down");
            return ExitCode::SUCCESS;
        }
        _ = tokio::signal::ctrl_c() => {
            tracing::info!("SIGINT received while installing, shutting down");
            return ExitCode::SUCCESS;
        }
    }
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
    ExitCode::SUCCESS
}

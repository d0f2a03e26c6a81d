//! The top level of `machine run`: logs the plan, starts the subsystems, waits for a shutdown
//! signal and stops them in order.

use std::process::ExitCode;

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
    let shutdown = tokio_util::sync::CancellationToken::new();
    let broker = match config.redis.as_ref() {
        Some(url) => start_broker(url, shutdown.clone()).await,
        None => None,
    };
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("failed to install the SIGTERM handler: {e}");
            return ExitCode::FAILURE;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received, shutting down"),
    }
    shutdown.cancel();
    if let Some(task) = broker {
        match tokio::time::timeout(std::time::Duration::from_secs(5), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the broker task failed"),
            Ok(Err(e)) => tracing::warn!(error = %e, "the broker task panicked"),
            Err(_) => tracing::warn!("the broker task did not stop within 5 s"),
        }
    }
    ExitCode::SUCCESS
}

/// Connects the machine's broker, loads the `jobMatching` library and starts its background
/// work (wake-ups, index catch-up, lease reaper). A Redis that is down is logged, not fatal.
async fn start_broker(
    url: &crate::config::RedisUrl,
    shutdown: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<Result<(), crate::matcher::BrokerError>>> {
    let broker = match crate::matcher::Broker::connect(url, crate::matcher::BrokerOptions::default()).await {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "failed to connect to the job broker");
            return None;
        }
    };
    match broker.ensure_functions().await {
        Ok(r) => {
            tracing::info!(version = %r.version, loaded = r.loaded, redis = %r.server_version, "jobMatching library ready")
        }
        Err(e) => tracing::error!(error = %e, "failed to install the jobMatching library; claims will retry it"),
    }
    Some(tokio::spawn(async move {
        broker.run(std::time::Duration::from_secs(5), shutdown).await
    }))
}

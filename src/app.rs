//! The top level of `machine run`: logs the plan, starts the subsystems, waits for a shutdown
//! signal (or a failed critical service) and stops them in order.
//!
//! Order of shutdown: the supervisor stops the services (reverse dependency order, each within
//! its grace), then the leftovers sweep stops and reaps whatever else is still alive (as PID 1:
//! everything in the namespace), and the reaper runs one last round.
//!
//! Exit codes (beside the CLI's 2 for invalid configuration): 0 after a clean shutdown, 1 when a
//! subsystem could not start, 3 when a `critical` service failed, 4 when a second signal forced
//! the shutdown.

use std::process::ExitCode;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use std::sync::Arc;

use crate::config::Config;
use crate::gpu::Probe;
use crate::health::{self, HealthState};
use crate::plan::Plan;
use crate::supervisor::{self, Signals, Supervisor};

/// Exit code when a `critical` service failed and took the machine down.
pub const EXIT_CRITICAL: u8 = 3;
/// Exit code when a second SIGTERM/SIGINT stopped everything at once.
pub const EXIT_FORCED: u8 = 4;

/// How long the final sweep gives leftover processes between SIGTERM and SIGKILL.
const SWEEP_GRACE: Duration = Duration::from_secs(2);

/// Runs the machine until SIGTERM or SIGINT (or a critical service failure).
pub async fn run(config: Config, probe: Probe, plan: Plan) -> ExitCode {
    tracing::info!(
        machine_id = %config.machine_id,
        gpus = probe.gpus.len(),
        workers = plan.workers.len(),
        services = plan.services.len(),
        pid1 = std::process::id() == 1,
        "machine planned"
    );
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    for worker in &plan.workers {
        tracing::info!(worker = %worker.id, connectors = ?worker.connectors, services = ?worker.services, "worker planned");
    }

    if let Err(e) = prepare_workspace(&config) {
        tracing::error!("failed to prepare the workspace {}: {e}", config.workspace.display());
        return ExitCode::FAILURE;
    }
    let signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            tracing::error!("{e}: {}", source_text(&e));
            return ExitCode::FAILURE;
        }
    };
    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    let finished = CancellationToken::new();
    let signal_task = tokio::spawn(signals.run(shutdown.clone(), force.clone(), finished.clone()));
    let reaper_stop = CancellationToken::new();
    let reaper = tokio::spawn(supervisor::run_reaper(reaper_stop.clone()));

    let state = HealthState::new(&config, &plan, Arc::new(probe), shutdown.clone());
    let server_stop = CancellationToken::new();
    let server = tokio::spawn(health::run(
        state.clone(),
        config.health_port,
        server_stop.clone(),
        None,
    ));
    let fleet_stop = CancellationToken::new();
    let fleet = match &config.redis {
        Some(url) => match connect(url.expose()).await {
            Ok(conn) => {
                state.set_redis(|r| r.connected = true);
                let health_url = format!("http://{}:{}/health", hostname(), config.health_port);
                let unknown = Arc::new(|_: &str| health::fleet::ServiceCondition::UNKNOWN);
                Some(tokio::spawn(health::fleet::run(
                    state.clone(),
                    conn,
                    unknown,
                    health_url,
                    fleet_stop.clone(),
                )))
            }
            Err(e) => {
                tracing::error!("failed to connect to Redis at {}: {e}", url.masked());
                state.set_redis(|r| r.last_error = Some(e.to_string()));
                None
            }
        },
        None => None,
    };

    let services = plan.start_order().into_iter().cloned().collect();
    let code = match Supervisor::new(services, &config.supervisor, &config.workspace) {
        Ok(sup) => {
            let handle = sup.handle();
            let sup_task = tokio::spawn(sup.run(shutdown.clone(), force.clone()));
            tokio::select! {
                () = shutdown.cancelled() => {}
                _ = handle.critical_failure() => shutdown.cancel(),
            }
            match sup_task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("the supervisor failed: {e}"),
                Err(e) => tracing::error!("the supervisor task failed: {e}"),
            }
            if handle.critical_failed().is_some() {
                ExitCode::from(EXIT_CRITICAL)
            } else if force.is_cancelled() {
                ExitCode::from(EXIT_FORCED)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            tracing::error!("{e}: {}", source_text(&e));
            ExitCode::FAILURE
        }
    };

    supervisor::sweep(if force.is_cancelled() {
        Duration::ZERO
    } else {
        SWEEP_GRACE
    })
    .await;
    reaper_stop.cancel();
    match reaper.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("{e}: {}", source_text(&e)),
        Err(e) => tracing::error!("the reaper task failed: {e}"),
    }
    fleet_stop.cancel();
    if let Some(fleet) = fleet {
        let _ = fleet.await;
    }
    server_stop.cancel();
    match server.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("{e}: {}", source_text(&e)),
        Err(e) => tracing::error!("the health server task failed: {e}"),
    }
    finished.cancel();
    let _ = signal_task.await;
    tracing::info!("machine stopped");
    code
}

/// Creates the workspace and, in local mode, the private redis-server's socket and data
/// directories (redis-server refuses to start without them).
fn prepare_workspace(config: &Config) -> std::io::Result<()> {
    std::fs::create_dir_all(&config.workspace)?;
    if config.redis.is_none() {
        if let Some(dir) = config.local_redis_socket().parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::create_dir_all(config.local_redis_dir())?;
    }
    Ok(())
}

async fn connect(url: &str) -> redis::RedisResult<redis::aio::ConnectionManager> {
    let client = redis::Client::open(url)?;
    let config = redis::aio::ConnectionManagerConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    redis::aio::ConnectionManager::new_with_config(client, config).await
}

fn hostname() -> String {
    nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn source_text(e: &dyn std::error::Error) -> String {
    e.source().map_or_else(String::new, ToString::to_string)
}

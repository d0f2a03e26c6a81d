//! The top level of `machine run`: starts the subsystems as named tasks, waits for a shutdown
//! signal (SIGTERM, SIGINT or `POST /shutdown`), then stops them in order and joins them with a
//! time limit.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::gpu::Probe;
use crate::health::{self, HealthState};
use crate::plan::Plan;

/// How long a subsystem may take to stop once asked.
const JOIN_LIMIT: Duration = Duration::from_secs(10);

/// Runs the machine until it is asked to stop.
pub async fn run(config: Config, probe: Probe, plan: Plan) -> ExitCode {
    tracing::info!(
        machine_id = %config.machine_id,
        gpus = probe.gpus.len(),
        workers = plan.workers.len(),
        services = plan.services.len(),
        redis = %config.redis.as_ref().map_or_else(|| "local mode".to_owned(), |u| u.masked()),
        "machine starting"
    );
    for w in &plan.warnings {
        tracing::warn!("{w}");
    }
    let shutdown = CancellationToken::new();
    let probe = Arc::new(probe);
    let state = HealthState::new(&config, &plan, probe, shutdown.clone());

    let server_stop = CancellationToken::new();
    let server = spawn_named(
        "health",
        health::run(state.clone(), config.health_port, server_stop.clone(), None),
    );

    let fleet_stop = CancellationToken::new();
    let fleet = match &config.redis {
        Some(url) => match connect(url.expose()).await {
            Ok(conn) => {
                state.set_redis(|r| r.connected = true);
                let host = hostname();
                let health_url = format!("http://{host}:{}/health", config.health_port);
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

    let code = wait_for_shutdown(&shutdown).await;
    shutdown.cancel();
    fleet_stop.cancel();
    if let Some(task) = fleet {
        join("fleet-status", task).await;
    }
    server_stop.cancel();
    join("health", server).await;
    tracing::info!("machine stopped");
    code
}

async fn wait_for_shutdown(shutdown: &CancellationToken) -> ExitCode {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        tracing::error!("failed to install the signal handlers");
        return ExitCode::FAILURE;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
        _ = shutdown.cancelled() => tracing::info!("shutdown requested"),
    }
    ExitCode::SUCCESS
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

/// Spawns a subsystem as a named task that logs its error.
fn spawn_named<E: std::error::Error + Send + 'static>(
    name: &'static str,
    fut: impl Future<Output = Result<(), E>> + Send + 'static,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        if let Err(e) = fut.await {
            tracing::error!(task = name, "{}", error_chain(&e));
        }
    })
}

/// An error and its sources as one line: "failed to bind ...: Address in use".
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

async fn join(name: &str, task: JoinHandle<()>) {
    match tokio::time::timeout(JOIN_LIMIT, task).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(task = name, "task panicked: {e}"),
        Err(_) => tracing::error!(task = name, "task did not stop within {JOIN_LIMIT:?}"),
    }
}

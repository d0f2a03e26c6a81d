//! What operators see and touch: the health/status HTTP server on `MACHINE_HEALTH_PORT`, the
//! worker board it reads, Prometheus metrics, the fleet status message in Redis, and the
//! `machine status` client.
//!
//! The server runs on its own task and reads only shared state (the board, live readings), so
//! it answers even when every worker is busy, and it keeps answering (with 503 on `/health`)
//! while the machine shuts down.

mod board;
pub mod client;
pub mod fleet;
mod metrics;
mod server;

use std::sync::{Arc, Mutex};
use std::time::Instant;

use serde::Serialize;
use tokio_util::sync::CancellationToken;

pub use board::{JobEnd, WorkerBoard, WorkerState, WorkerStatus, now_ms};
pub use metrics::Metrics;
pub use server::{HealthError, run};

use crate::config::{Config, Secret};
use crate::gpu::Probe;
use crate::plan::Plan;

/// The machine's phase, as the fleet status message names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    /// Installing, starting services, or workers not yet claiming.
    Starting,
    /// Every worker is claiming (or has reported why not).
    Ready,
    /// Shutting down.
    Shutdown,
}

/// The broker connection as the status page shows it.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RedisStatus {
    /// The URL with its password masked; `None` before the machine knows it.
    pub url: Option<String>,
    /// Whether the last command succeeded.
    pub connected: bool,
    /// The loaded `jobMatching` library version.
    pub function_version: Option<String>,
    /// The last error, if the connection is down.
    pub last_error: Option<String>,
}

/// Everything the health server and the fleet publisher read. Shared behind an `Arc`.
#[derive(Debug)]
pub struct HealthState {
    machine_id: String,
    started: Instant,
    started_ms: u64,
    config: serde_json::Value,
    plan: Plan,
    probe: Arc<Probe>,
    board: WorkerBoard,
    metrics: Metrics,
    control_token: Option<Secret>,
    shutdown: CancellationToken,
    critical_failure: Mutex<Option<String>>,
    redis: Mutex<RedisStatus>,
}

impl HealthState {
    /// The state of a machine about to start; `shutdown` is the machine's shutdown trigger
    /// (`POST /shutdown` cancels it, and once cancelled the phase is `shutdown`).
    pub fn new(config: &Config, plan: &Plan, probe: Arc<Probe>, shutdown: CancellationToken) -> Arc<HealthState> {
        let board = WorkerBoard::new(plan.workers.iter().map(|w| w.id.as_str()));
        Arc::new(HealthState {
            machine_id: config.machine_id.clone(),
            started: Instant::now(),
            started_ms: now_ms(),
            // Config serialises with secrets masked (RedisUrl and Secret print `***`).
            config: serde_json::to_value(config).unwrap_or(serde_json::Value::Null),
            plan: plan.clone(),
            probe,
            board,
            metrics: Metrics::new(),
            control_token: config.control_token.clone(),
            shutdown,
            critical_failure: Mutex::new(None),
            redis: Mutex::new(RedisStatus {
                url: config.redis.as_ref().map(|u| u.masked()),
                ..RedisStatus::default()
            }),
        })
    }

    /// The worker board the workers write to.
    pub fn board(&self) -> &WorkerBoard {
        &self.board
    }

    /// The metrics the workers record into.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The machine id.
    pub fn machine_id(&self) -> &str {
        &self.machine_id
    }

    /// The plan this machine runs.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Milliseconds since start.
    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The current phase, derived from the shutdown trigger and the board.
    pub fn phase(&self) -> Phase {
        if self.shutdown.is_cancelled() {
            Phase::Shutdown
        } else if self.board.all_settled() {
            Phase::Ready
        } else {
            Phase::Starting
        }
    }

    /// Records that a `critical` service failed: `/health` answers 503 from now on.
    pub fn set_critical_failure(&self, reason: String) {
        *self.critical_failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason);
    }

    fn critical_failure(&self) -> Option<String> {
        self.critical_failure.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Updates the broker connection status.
    pub fn set_redis(&self, f: impl FnOnce(&mut RedisStatus)) {
        f(&mut self.redis.lock().unwrap_or_else(|p| p.into_inner()));
    }

    fn redis(&self) -> RedisStatus {
        self.redis.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The full status document served on `/status`.
    pub fn status_document(&self) -> serde_json::Value {
        let live = self.probe.live();
        let gpus: Vec<serde_json::Value> = self
            .probe
            .gpus
            .iter()
            .map(|g| {
                let l = live.iter().find(|l| l.index == g.index);
                serde_json::json!({
                    "index": g.index,
                    "name": g.name,
                    "uuid": g.uuid,
                    "memory_total_bytes": g.memory_total_bytes,
                    "memory_used_bytes": l.and_then(|l| l.memory_used_bytes),
                    "utilization_percent": l.and_then(|l| l.utilization_percent),
                    "temperature_c": l.and_then(|l| l.temperature_c),
                })
            })
            .collect();
        serde_json::json!({
            "machine": {
                "id": self.machine_id,
                "phase": self.phase(),
                "uptime_ms": self.uptime_ms(),
                "started_at_ms": self.started_ms,
                "version": env!("CARGO_PKG_VERSION"),
                "critical_failure": self.critical_failure(),
            },
            "gpus": gpus,
            "host": self.probe.host,
            "workers": self.board.snapshot(),
            "redis": self.redis(),
            "config": self.config,
        })
    }
}

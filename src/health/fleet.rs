//! The machine's status message for the fleet monitor (`machine:status:<machine_id>`), in the
//! contract's shape: published every 10 s, at once when a worker or service changes, with
//! `machine_ready` when the machine first becomes ready and `shutdown` as its last word.
//!
//! Each message is also stored in `machine:<machine_id>:status` (expiring after 30 s, the
//! API's disconnect threshold) so `machine status --fleet` can read the fleet without waiting
//! for a publish round.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{HealthState, Phase, WorkerState, now_ms};
use crate::plan::WorkerKind;

/// How often the status is published when nothing changes.
pub const PERIOD: Duration = Duration::from_secs(10);
/// How long the stored copy lives without a refresh.
const STORED_TTL_SECS: u64 = 30;
/// Changes closer together than this are published as one message.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Why a message is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum UpdateType {
    /// The periodic refresh.
    Periodic,
    /// Something changed.
    EventDriven,
    /// The machine just became ready.
    MachineReady,
    /// The machine is shutting down.
    Shutdown,
}

/// A supervised service's condition as the fleet message names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceCondition {
    /// `active`, `inactive` or `unknown`.
    pub status: &'static str,
    /// `healthy`, `unhealthy` or `unknown`.
    pub health: &'static str,
}

impl ServiceCondition {
    /// Nothing is known about the service.
    pub const UNKNOWN: ServiceCondition = ServiceCondition {
        status: "unknown",
        health: "unknown",
    };
}

/// The channel a machine publishes on.
pub fn channel(machine_id: &str) -> String {
    format!("machine:status:{machine_id}")
}

/// The key holding the machine's last message.
pub fn stored_key(machine_id: &str) -> String {
    format!("machine:{machine_id}:status")
}

/// Builds the contract's status message. `service` gives the condition of a plan service by
/// name; external connectors have no service and count as active while their worker runs.
pub fn message(
    state: &HealthState,
    update_type: UpdateType,
    redis_connected: bool,
    service: &dyn Fn(&str) -> ServiceCondition,
    health_url: &str,
) -> Value {
    let plan = state.plan();
    let board: BTreeMap<String, _> = state
        .board()
        .snapshot()
        .into_iter()
        .map(|w| (w.id.clone(), w))
        .collect();
    let mut s_workers = serde_json::Map::new();
    let mut s_services = serde_json::Map::new();
    let mut st_workers = serde_json::Map::new();
    let mut st_services = serde_json::Map::new();
    let mut capabilities: Vec<&str> = Vec::new();
    for w in &plan.workers {
        let connectors: Vec<&str> = w.connectors.iter().map(|c| c.name()).collect();
        for js in &w.job_services {
            if !capabilities.contains(&js.as_str()) {
                capabilities.push(js);
            }
        }
        s_workers.insert(
            w.id.clone(),
            json!({
                "worker_id": w.id,
                "gpu_id": w.gpu,
                "worker_type": match w.kind { WorkerKind::Gpu => "gpu", WorkerKind::Cpu => "cpu", WorkerKind::External => "external" },
                "services": w.job_services,
                "connectors": connectors,
            }),
        );
        let row = board.get(&w.id);
        let running = row.is_some_and(|r| !matches!(r.state, WorkerState::Stopped | WorkerState::Starting));
        st_workers.insert(
            w.id.clone(),
            json!({
                "is_connected": redis_connected && running,
                "status": match row.map(|r| &r.state) { Some(WorkerState::Busy) => "busy", _ => "idle" },
                "current_job_id": row.and_then(|r| r.current_job_id.clone()).unwrap_or_default(),
                "last_activity": row.map_or(0, |r| r.last_activity_ms),
            }),
        );
        for connector in &w.connectors {
            let key = format!("{}.{}", w.id, connector.name());
            // The service backing this connector on this worker, if it has one.
            let backing = w.services.iter().find(|s| {
                plan.services
                    .iter()
                    .any(|p| &p.name == *s && p.connector == Some(*connector))
            });
            let cond = match backing {
                Some(name) => service(name),
                None if running => ServiceCondition {
                    status: "active",
                    health: "healthy",
                },
                None => ServiceCondition {
                    status: "inactive",
                    health: "unknown",
                },
            };
            s_services.insert(
                key.clone(),
                json!({
                    "worker_id": w.id,
                    "service_type": connector.name(),
                    "status": cond.status,
                    "health": cond.health,
                }),
            );
            st_services.insert(key, json!({ "status": cond.status, "health": cond.health }));
        }
    }
    json!({
        "machine_id": state.machine_id(),
        "timestamp": now_ms(),
        "update_type": update_type,
        "structure": {
            "gpu_count": plan.gpu_count,
            "capabilities": capabilities,
            "workers": s_workers,
            "services": s_services,
        },
        "status": {
            "machine": { "phase": state.phase(), "uptime_ms": state.uptime_ms() },
            "workers": st_workers,
            "services": st_services,
        },
        "health_url": health_url,
    })
}

/// Publishes the status until `stop` is cancelled, then publishes the `shutdown` message.
/// Redis errors are logged and retried on the next round; they never stop the machine.
pub async fn run(
    state: Arc<HealthState>,
    mut conn: redis::aio::ConnectionManager,
    service: Arc<dyn Fn(&str) -> ServiceCondition + Send + Sync>,
    health_url: String,
    stop: CancellationToken,
) {
    let mut changes = state.board().subscribe();
    let mut was_ready = false;
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        let update = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => UpdateType::Periodic,
            changed = changes.changed() => {
                if changed.is_err() {
                    break;
                }
                tokio::time::sleep(DEBOUNCE).await;
                changes.mark_unchanged();
                UpdateType::EventDriven
            }
        };
        let ready = state.phase() == Phase::Ready;
        let update = if ready && !was_ready {
            UpdateType::MachineReady
        } else {
            update
        };
        was_ready = ready;
        publish(&state, &mut conn, update, service.as_ref(), &health_url).await;
    }
    publish(&state, &mut conn, UpdateType::Shutdown, service.as_ref(), &health_url).await;
}

async fn publish(
    state: &HealthState,
    conn: &mut redis::aio::ConnectionManager,
    update: UpdateType,
    service: &(dyn Fn(&str) -> ServiceCondition + Send + Sync),
    health_url: &str,
) {
    let msg = message(state, update, true, service, health_url).to_string();
    let id = state.machine_id();
    let result: redis::RedisResult<()> = redis::pipe()
        .publish(channel(id), &msg)
        .ignore()
        .set_ex(stored_key(id), &msg, STORED_TTL_SECS)
        .ignore()
        .query_async(conn)
        .await;
    if let Err(e) = result {
        tracing::warn!("failed to publish the machine status: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::gpu::{GpuInfo, HostInfo, Probe};
    use crate::plan::Plan;

    fn state(connectors: &str) -> Arc<HealthState> {
        let config = Config::for_tests(&[("MACHINE_ID", "m1"), ("WORKER_CONNECTORS", connectors)]);
        let host = HostInfo {
            cpu_cores: 4,
            ram_total_bytes: 8 << 30,
            ram_available_bytes: 4 << 30,
            disk_free_bytes: None,
        };
        let gpu = GpuInfo {
            index: 0,
            name: "g".into(),
            uuid: None,
            memory_total_bytes: 24 << 30,
            memory_free_bytes: 0,
        };
        let probe = Arc::new(Probe::from_parts(vec![gpu], host));
        let plan = Plan::build(&config, &probe).unwrap();
        HealthState::new(&config, &plan, probe, CancellationToken::new())
    }

    #[test]
    fn message_has_the_contract_shape() {
        let s = state("comfyui,simulation");
        s.board().set_state("m1-gpu0", WorkerState::Idle);
        s.board().job_started("m1-simulation-1", "j9", "simulation");
        let healthy = |name: &str| {
            assert_eq!(name, "comfyui-gpu0");
            ServiceCondition {
                status: "active",
                health: "healthy",
            }
        };
        let m = message(&s, UpdateType::EventDriven, true, &healthy, "http://h:9092/health");
        assert_eq!(m["machine_id"], "m1");
        assert_eq!(m["update_type"], "event_driven");
        assert_eq!(m["structure"]["gpu_count"], 1);
        assert_eq!(m["structure"]["capabilities"], json!(["comfyui", "simulation"]));
        let w = &m["structure"]["workers"]["m1-gpu0"];
        assert_eq!(w["worker_id"], "m1-gpu0");
        assert_eq!(w["gpu_id"], 0);
        assert_eq!(w["worker_type"], "gpu");
        assert_eq!(w["services"], json!(["comfyui"]));
        assert_eq!(w["connectors"], json!(["comfyui"]));
        let svc = &m["structure"]["services"]["m1-gpu0.comfyui"];
        assert_eq!(svc["service_type"], "comfyui");
        assert_eq!(svc["status"], "active");
        assert_eq!(m["status"]["machine"]["phase"], "ready");
        let busy = &m["status"]["workers"]["m1-simulation-1"];
        assert_eq!(busy["status"], "busy");
        assert_eq!(busy["current_job_id"], "j9");
        assert_eq!(busy["is_connected"], true);
        assert_eq!(
            m["status"]["services"]["m1-simulation-1.simulation"]["health"],
            "healthy"
        );
        assert_eq!(m["health_url"], "http://h:9092/health");
        assert!(m["timestamp"].as_u64().unwrap() > 1_700_000_000_000);
    }
}

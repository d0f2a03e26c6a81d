//! The machine's status message for the fleet monitor (`machine:status:<machine_id>`), in the
//! contract's shape: published every 10 s, at once when a worker or service changes, with
//! `machine_ready` when the machine first becomes ready and `shutdown` as its last word.
//!
//! Each message is also stored in `machine:<machine_id>:status` (expiring after 30 s, the
//! API's disconnect threshold) so `machine status --fleet` can read the fleet without waiting
//! for a publish round. The broker makes both writes ([`Broker::publish_machine_status`]) on
//! its shared connection.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::{HealthState, Phase};
use crate::broker::Broker;
use crate::clock::now_ms;
use crate::plan::{ConnectorPlan, WorkerKind, WorkerPlan};
use crate::supervisor::{ServiceState, ServiceStatus};
use crate::worker::{WorkerState, WorkerStatus};

/// How often the status is published when nothing changes.
pub const PERIOD: Duration = Duration::from_secs(10);
/// Changes closer together than this are published as one message.
const DEBOUNCE: Duration = Duration::from_millis(100);

/// Why a message is published.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
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

/// The contract's status message, as published and stored; `machine status --fleet` reads it
/// back with the same type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetMessage {
    /// `MACHINE_ID`.
    pub machine_id: String,
    /// When it was built, epoch milliseconds.
    pub timestamp: u64,
    /// Why it was published.
    pub update_type: UpdateType,
    /// What the machine is made of (changes only with the plan).
    pub structure: Structure,
    /// How its parts are doing now.
    pub status: FleetStatus,
    /// Where its `/health` answers.
    pub health_url: String,
    /// This run of the machine (absent from older machines).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<Instance>,
    /// Another live run that publishes under the same machine id, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<Duplicate>,
}

/// One run of a machine: a random id new each start, the host it runs on and its workspace.
/// Two runs with one machine id register the same worker ids; this tells them apart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Instance {
    /// Random, new each start.
    pub instance_id: String,
    /// The host name.
    pub host: String,
    /// The workspace directory.
    pub workspace: String,
}

impl Instance {
    /// This run: a new random id, the host name and `workspace`.
    pub fn this_run(workspace: &std::path::Path) -> Instance {
        Instance {
            instance_id: format!("{:016x}", rand::random::<u64>()),
            host: nix::unistd::gethostname()
                .ok()
                .and_then(|h| h.into_string().ok())
                .unwrap_or_default(),
            workspace: workspace.display().to_string(),
        }
    }

    /// Whether `other` is the previous run of this one: the same host and workspace (a
    /// restarted container whose predecessor's message has not expired yet). Only one run can
    /// hold a workspace at a time.
    fn is_predecessor(&self, other: &Instance) -> bool {
        self.host == other.host && self.workspace == other.workspace
    }
}

/// Another live run publishing under this machine's id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Duplicate {
    /// That run.
    #[serde(flatten)]
    pub instance: Instance,
    /// When its message was last seen, epoch milliseconds.
    pub seen_at_ms: u64,
}

/// How long another run's last message keeps it reported: a few publish rounds, so that two
/// runs that overwrite each other's message every 10 s stay reported between sightings.
pub const DUPLICATE_FRESH_MS: u64 = 45_000;

/// The other live run under this machine id that `previous` (the message stored before this
/// run's last publish) shows, if it shows one: another instance id whose message is fresh and
/// that is not this workspace's previous run. Messages of older machines (no instance) are
/// not judged.
pub fn other_run(this: &Instance, previous: &FleetMessage, now_ms: u64) -> Option<Duplicate> {
    let other = previous.instance.as_ref()?;
    let fresh = now_ms.saturating_sub(previous.timestamp) < 30_000;
    let last_word = previous.update_type == UpdateType::Shutdown;
    (other.instance_id != this.instance_id && fresh && !last_word && !this.is_predecessor(other)).then(|| Duplicate {
        instance: other.clone(),
        seen_at_ms: now_ms,
    })
}

/// The machine's make-up in the status message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Structure {
    /// GPUs in use.
    pub gpu_count: usize,
    /// Every job service some worker accepts, in plan order.
    pub capabilities: Vec<String>,
    /// The workers, by id.
    pub workers: BTreeMap<String, WorkerShape>,
    /// The connectors of each worker, by `<worker_id>.<connector>`.
    pub services: BTreeMap<String, ServiceShape>,
}

/// A worker's make-up.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerShape {
    /// The worker id.
    pub worker_id: String,
    /// The GPU it owns.
    pub gpu_id: Option<u32>,
    /// `gpu`, `cpu` or `external`.
    pub worker_type: WorkerType,
    /// The job services it accepts.
    pub services: Vec<String>,
    /// The connectors it runs jobs through.
    pub connectors: Vec<String>,
}

/// The kind of a worker, as the contract names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WorkerType {
    /// Owns one GPU.
    Gpu,
    /// Runs on the CPU.
    Cpu,
    /// Calls an external API.
    External,
}

/// One connector of one worker, with its condition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceShape {
    /// The worker it belongs to.
    pub worker_id: String,
    /// The connector's name.
    pub service_type: String,
    /// Whether it runs.
    pub status: Activity,
    /// Whether it works.
    pub health: Health,
}

/// How the machine's parts are doing, in the status message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetStatus {
    /// The machine's phase and age.
    pub machine: FleetMachine,
    /// Each worker's presence, by id.
    pub workers: BTreeMap<String, WorkerPresence>,
    /// Each connector's condition, by `<worker_id>.<connector>`.
    pub services: BTreeMap<String, ServiceCondition>,
    /// Each external API's fleet-wide usage, as on `/status` (absent from older machines).
    #[serde(default)]
    pub external_apis: BTreeMap<String, Value>,
}

/// The machine's phase and age (the fleet's part of `/status`'s machine).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetMachine {
    /// Where it is in its life.
    pub phase: Phase,
    /// Milliseconds since start.
    pub uptime_ms: u64,
}

/// A worker's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerPresence {
    /// Registered and running while the broker is connected.
    pub is_connected: bool,
    /// `busy` while it runs a job.
    pub status: Occupancy,
    /// The job it runs, `""` when none.
    pub current_job_id: String,
    /// When its state or job last changed, epoch milliseconds.
    pub last_activity: u64,
    /// Why it cannot claim (its GPU faulted, it is quarantined, ...), when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Work a daily quota holds back from it (it claims the rest), so that `machine jobs
    /// show` can say why such a job waits.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub quota_waits: Vec<crate::worker::QuotaWait>,
}

/// Whether a worker runs a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Occupancy {
    /// No job.
    Idle,
    /// Running one.
    Busy,
}

/// A connector's condition as the fleet message names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceCondition {
    /// Whether it runs.
    pub status: Activity,
    /// Whether it works.
    pub health: Health,
}

/// Whether a connector runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Activity {
    /// Its process runs (or, without one, its worker does).
    Active,
    /// It does not run.
    Inactive,
    /// Not known.
    Unknown,
}

/// Whether a connector works.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Running, ready and live.
    Healthy,
    /// Starting, failing its probes, crash-looping or failed.
    Unhealthy,
    /// Not running, nothing known.
    Unknown,
}

/// The condition the fleet message gives a supervised service.
fn condition(status: &ServiceStatus) -> ServiceCondition {
    let active = status.state.run().is_some();
    ServiceCondition {
        status: if active { Activity::Active } else { Activity::Inactive },
        health: if status.crash_loop || status.state == ServiceState::Failed {
            Health::Unhealthy
        } else if status.serving() {
            Health::Healthy
        } else if active {
            Health::Unhealthy
        } else {
            Health::Unknown
        },
    }
}

/// Builds the contract's status message from the plan, the workers and the services.
/// External connectors have no service and count as active while their worker runs.
pub fn message(state: &HealthState, update_type: UpdateType, redis_connected: bool, health_url: &str) -> FleetMessage {
    let plan = state.plan();
    let services = state.services().status();
    let workers: BTreeMap<String, WorkerStatus> = state
        .worker_statuses()
        .into_iter()
        .map(|w| (w.worker_id.clone(), w))
        .collect();
    let mut structure = Structure {
        gpu_count: plan.gpu_count,
        capabilities: Vec::new(),
        workers: BTreeMap::new(),
        services: BTreeMap::new(),
    };
    let mut st_workers = BTreeMap::new();
    let mut st_services = BTreeMap::new();
    for w in &plan.workers {
        for js in w.connectors.iter().flat_map(|c| &c.job_services) {
            if !structure.capabilities.contains(js) {
                structure.capabilities.push(js.clone());
            }
        }
        structure.workers.insert(w.id.clone(), worker_shape(w));
        let status = workers.get(&w.id);
        let running = status.is_some_and(|s| !matches!(s.state, WorkerState::Stopped | WorkerState::Starting));
        st_workers.insert(w.id.clone(), worker_presence(status, redis_connected && running));
        for planned in &w.connectors {
            let key = format!("{}.{}", w.id, planned.kind.name());
            let cond = connector_condition(planned, status, running, &services);
            structure.services.insert(
                key.clone(),
                ServiceShape {
                    worker_id: w.id.clone(),
                    service_type: planned.kind.name().to_owned(),
                    status: cond.status,
                    health: cond.health,
                },
            );
            st_services.insert(key, cond);
        }
    }
    FleetMessage {
        machine_id: state.machine_id().to_owned(),
        timestamp: now_ms(),
        update_type,
        structure,
        status: FleetStatus {
            machine: FleetMachine {
                phase: state.phase(),
                uptime_ms: state.uptime_ms(),
            },
            workers: st_workers,
            services: st_services,
            external_apis: state.external_apis(),
        },
        health_url: health_url.to_owned(),
        instance: Some(state.instance().clone()),
        duplicate: state.duplicate(),
    }
}

/// What the plan says of worker `w`: its GPU, type, job services and connectors.
fn worker_shape(w: &WorkerPlan) -> WorkerShape {
    WorkerShape {
        worker_id: w.id.clone(),
        gpu_id: w.gpu,
        worker_type: match w.kind {
            WorkerKind::Gpu => WorkerType::Gpu,
            WorkerKind::Cpu => WorkerType::Cpu,
            WorkerKind::External => WorkerType::External,
        },
        services: w.job_services(),
        connectors: w.connectors.iter().map(|c| c.kind.name().to_owned()).collect(),
    }
}

/// What a worker's `status` says of it now (`None`: it has published none yet); `connected`:
/// it runs and Redis is reachable.
fn worker_presence(status: Option<&WorkerStatus>, connected: bool) -> WorkerPresence {
    WorkerPresence {
        is_connected: connected,
        status: if status.is_some_and(|s| s.state == WorkerState::Busy) {
            Occupancy::Busy
        } else {
            Occupancy::Idle
        },
        current_job_id: status
            .and_then(|s| s.current_job.as_ref())
            .map_or_else(String::new, |j| j.job_id.clone()),
        last_activity: status.map_or(0, |s| s.last_activity_ms),
        reason: status.and_then(|s| s.hold.clone()),
        quota_waits: status.map(|s| s.quota_waits.clone()).unwrap_or_default(),
    }
}

/// The condition of one planned connector of a worker: its supervised service's, when it has
/// one (unhealthy while a GPU fault holds the worker); else active while the worker `running`.
fn connector_condition(
    planned: &ConnectorPlan,
    status: Option<&WorkerStatus>,
    running: bool,
    services: &[ServiceStatus],
) -> ServiceCondition {
    // The supervised service backing this connector on this worker, if it has one.
    let backing = planned
        .endpoint
        .as_ref()
        .and_then(|e| services.iter().find(|s| s.name == e.service));
    let held = status.is_some_and(|s| s.held_by.contains(&crate::worker::hold::HoldKind::GpuFault));
    match backing {
        // A faulted GPU's services work for no one.
        Some(service) if held => ServiceCondition {
            health: Health::Unhealthy,
            ..condition(service)
        },
        Some(service) => condition(service),
        None if running => ServiceCondition {
            status: Activity::Active,
            health: Health::Healthy,
        },
        None => ServiceCondition {
            status: Activity::Inactive,
            health: Health::Unknown,
        },
    }
}

/// Publishes the status until `stop` is cancelled, then publishes the `shutdown` message.
/// Redis errors are logged and retried on the next round; they never stop the machine.
pub async fn run(state: Arc<HealthState>, broker: Broker, health_url: String, stop: CancellationToken) {
    let mut workers = state.worker_receivers();
    let names: Vec<String> = state.plan().services.iter().map(|s| s.name.clone()).collect();
    let mut services = state.services().watch(&names).ok();
    let mut reloads = state.running();
    let mut was_ready = false;
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        let changed = async {
            type Change<'a> = std::pin::Pin<Box<dyn Future<Output = ()> + Send + 'a>>;
            let mut any: Vec<Change<'_>> = workers
                .iter_mut()
                .map(|rx| -> Change<'_> {
                    Box::pin(async move {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    })
                })
                .collect();
            if let Some(s) = services.as_mut() {
                any.push(Box::pin(async move {
                    if s.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }));
            }
            // Never empty, so select_all has something to wait on.
            any.push(Box::pin(std::future::pending::<()>()));
            futures_util::future::select_all(any).await;
        };
        let update = tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => UpdateType::Periodic,
            Ok(()) = reloads.changed() => {
                // A reload changed the workers and services: follow the new ones.
                workers = state.worker_receivers();
                let names: Vec<String> = state.plan().services.iter().map(|s| s.name.clone()).collect();
                services = state.services().watch(&names).ok();
                UpdateType::EventDriven
            }
            () = changed => {
                tokio::time::sleep(DEBOUNCE).await;
                for rx in &mut workers {
                    rx.mark_unchanged();
                }
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
        // A Redis that stops answering holds a publish for the response timeout: a stop
        // meanwhile does not wait for it.
        tokio::select! {
            () = stop.cancelled() => break,
            () = publish(&state, &broker, update, &health_url) => {}
        }
    }
    // The last message is worth a short wait only: the machine's stop is bounded whatever
    // Redis does, and the API notices a silent machine within 30 s anyway.
    let last = publish(&state, &broker, UpdateType::Shutdown, &health_url);
    if tokio::time::timeout(LAST_MESSAGE_WAIT, last).await.is_err() {
        tracing::warn!("redis did not take the shutdown status message in time");
    }
}

/// How long the `shutdown` message may take before the machine stops without it.
const LAST_MESSAGE_WAIT: Duration = Duration::from_millis(150);

async fn publish(state: &HealthState, broker: &Broker, update: UpdateType, health_url: &str) {
    let msg = match serde_json::to_string(&message(state, update, true, health_url)) {
        Ok(msg) => msg,
        Err(e) => {
            tracing::warn!("failed to encode the machine status: {e}");
            return;
        }
    };
    match broker.publish_machine_status(state.machine_id(), &msg).await {
        Ok(previous) => {
            broker.health().record_ok();
            let previous = previous.and_then(|p| serde_json::from_str::<FleetMessage>(&p).ok());
            if let Some(other) = previous.and_then(|p| other_run(state.instance(), &p, now_ms())) {
                state.saw_duplicate(other);
            }
        }
        Err(e) => {
            // An outage is logged once, by the health record.
            broker.health().record_err(&e);
            if crate::broker::outage::is_outage(&e) {
                tracing::debug!(
                    "failed to publish the machine status: {}",
                    crate::logging::error_chain(&e)
                );
            } else {
                tracing::warn!(
                    "failed to publish the machine status: {}",
                    crate::logging::error_chain(&e)
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuInfo, HostInfo, Probe};
    use crate::plan::Plan;
    use crate::supervisor::Supervisor;
    use crate::worker::{CurrentJob, JobCounts};
    use serde_json::json;

    fn status(id: &str, state: WorkerState, job: Option<&str>) -> WorkerStatus {
        WorkerStatus {
            worker_id: id.to_owned(),
            state,
            current_job: job.map(|j| CurrentJob {
                job_id: j.to_owned(),
                service: "simulation".to_owned(),
                progress: 10.0,
                message: String::new(),
            }),
            counts: JobCounts::default(),
            last_error: None,
            last_activity_ms: 1_750_000_000_000,
            hold: None,
            held_by: Vec::new(),
            uploads: Vec::new(),
            quota_waits: Vec::new(),
        }
    }

    #[tokio::test]
    async fn message_has_the_contract_shape_and_follows_the_services() {
        let ws = tempfile::tempdir().unwrap();
        let file = "[connectors.comfyui]\ncommand = [\"sleep\", \"30\"]\n";
        let env = BTreeMap::from([
            ("MACHINE_ID", "m1"),
            ("WORKER_CONNECTORS", "comfyui,simulation"),
            ("HUB_REDIS_URL", "redis://127.0.0.1:1"),
            ("MACHINE_WORKSPACE", ws.path().to_str().unwrap()),
        ]);
        let config = crate::config::load_str(Some(("f", file)), &env).unwrap();
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
        let sup = Supervisor::new(
            plan.services.clone(),
            &config.machine.supervisor,
            &config.machine.workspace,
        )
        .unwrap();
        let handle = sup.handle();
        let (_gpu_tx, gpu_rx) = tokio::sync::watch::channel(status("m1-gpu0", WorkerState::Idle, None));
        let (_sim_tx, sim_rx) = tokio::sync::watch::channel(status("m1-simulation-1", WorkerState::Busy, Some("j9")));
        let installs = tokio::sync::watch::channel(Default::default()).1;
        let stop = CancellationToken::new();
        let s = HealthState::new(
            super::super::Running {
                config: config.clone(),
                plan: plan.clone(),
                workers: vec![("m1-gpu0".into(), gpu_rx), ("m1-simulation-1".into(), sim_rx)],
            },
            probe,
            super::super::Sources {
                services: handle.clone(),
                installs,
                models: None,
                force: CancellationToken::new(),
                redis: crate::broker::RedisHealth::new(),
            },
            stop.clone(),
        );

        let typed = message(&s, UpdateType::EventDriven, true, "http://h:9092/health");
        let text = serde_json::to_string(&typed).unwrap();
        assert_eq!(
            serde_json::from_str::<FleetMessage>(&text).unwrap(),
            typed,
            "round trip"
        );
        let m: Value = serde_json::from_str(&text).unwrap();
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
        assert_eq!(svc["status"], "inactive", "not started yet: {svc}");
        assert_eq!(m["status"]["machine"]["phase"], "ready");
        let busy = &m["status"]["workers"]["m1-simulation-1"];
        assert_eq!(busy["status"], "busy");
        assert_eq!(busy["current_job_id"], "j9");
        assert_eq!(busy["is_connected"], true);
        assert_eq!(busy["last_activity"], 1_750_000_000_000u64);
        assert_eq!(
            m["status"]["services"]["m1-simulation-1.simulation"]["health"],
            "healthy"
        );
        assert_eq!(m["health_url"], "http://h:9092/health");
        assert!(m["timestamp"].as_u64().unwrap() > 1_700_000_000_000);

        // Started, its readiness probe (HTTP on 8188) failing: active but unhealthy.
        let force = CancellationToken::new();
        let run = tokio::spawn(sup.run(stop.clone(), force));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = serde_json::to_value(message(&s, UpdateType::Periodic, true, "u")).unwrap();
            if m["status"]["services"]["m1-gpu0.comfyui"]["status"] == "active" {
                assert_eq!(m["status"]["services"]["m1-gpu0.comfyui"]["health"], "unhealthy");
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the service never became active");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        run.await.unwrap().unwrap();
        assert_eq!(
            message(&s, UpdateType::Shutdown, true, "u").status.machine.phase,
            Phase::Shutdown
        );
    }
}

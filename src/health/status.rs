//! The documents the health server answers, as serde types shared by the server that writes
//! them and `machine status` that reads them: [`StatusDocument`] (`/status`), [`ReadyDocument`]
//! (`/ready`) and [`HealthDocument`] (`/health`).
//!
//! These types ARE the wire contract: their field names are what operators, dashboards and
//! scripts read. They mirror the supervisor's, the workers' and the installers' own status
//! types through exhaustive conversions, so a field or state added there fails to compile here
//! until the document says how it shows it, instead of changing the page silently.

use std::collections::BTreeMap;
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Phase;
use crate::gpu::{GpuInfo, GpuLive, HostInfo};
use crate::installers::InstallState;
use crate::supervisor::{ExitInfo, ServiceState, ServiceStatus};
use crate::worker::{CurrentJob, JobCounts, WorkerState, WorkerStatus};

/// `/status`: everything the machine knows about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusDocument {
    /// Identity, phase and age.
    pub machine: Machine,
    /// The GPUs in use, with live readings where NVML gives them.
    pub gpus: Vec<Gpu>,
    /// The host's CPU, memory and disk.
    pub host: Host,
    /// Each installer's progress, by installer name.
    pub installs: BTreeMap<String, Install>,
    /// The supervised services, in plan order.
    pub services: Vec<Service>,
    /// The workers, in plan order.
    pub workers: Vec<Worker>,
    /// The broker connection.
    pub redis: RedisStatus,
    /// Each external API's fleet-wide usage and limits, by API (the limiter's document).
    pub external_apis: BTreeMap<String, Value>,
    /// The effective configuration, secrets masked.
    pub config: Value,
}

/// The machine itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// `MACHINE_ID`.
    pub id: String,
    /// Where it is in its life.
    pub phase: Phase,
    /// Milliseconds since start.
    pub uptime_ms: u64,
    /// When it started, epoch milliseconds.
    pub started_at_ms: u64,
    /// This binary's version.
    pub version: String,
    /// The critical service whose failure shuts the machine down, when one failed.
    pub critical_failure: Option<String>,
}

/// One GPU: what the probe found and what NVML reads now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Gpu {
    /// NVML index.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// `GPU-...`, when NVML reported one.
    pub uuid: Option<String>,
    /// Total memory in bytes at probe time.
    pub memory_total_bytes: u64,
    /// Memory used now, in bytes.
    pub memory_used_bytes: Option<u64>,
    /// Utilisation now, in percent.
    pub utilization_percent: Option<u32>,
    /// Core temperature now, in °C.
    pub temperature_c: Option<u32>,
}

impl Gpu {
    /// The probe's facts about `gpu` with its live reading, when there is one.
    pub fn new(gpu: &GpuInfo, live: Option<&GpuLive>) -> Gpu {
        Gpu {
            index: gpu.index,
            name: gpu.name.clone(),
            uuid: gpu.uuid.clone(),
            memory_total_bytes: gpu.memory_total_bytes,
            memory_used_bytes: live.and_then(|l| l.memory_used_bytes),
            utilization_percent: live.and_then(|l| l.utilization_percent),
            temperature_c: live.and_then(|l| l.temperature_c),
        }
    }
}

/// The host besides its GPUs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Host {
    /// Logical CPU cores.
    pub cpu_cores: u32,
    /// Total RAM in bytes.
    pub ram_total_bytes: u64,
    /// Available RAM in bytes at probe time.
    pub ram_available_bytes: u64,
    /// Free bytes on the workspace's file system.
    pub disk_free_bytes: Option<u64>,
}

impl From<&HostInfo> for Host {
    fn from(h: &HostInfo) -> Host {
        let HostInfo {
            cpu_cores,
            ram_total_bytes,
            ram_available_bytes,
            disk_free_bytes,
        } = *h;
        Host {
            cpu_cores,
            ram_total_bytes,
            ram_available_bytes,
            disk_free_bytes,
        }
    }
}

/// One installer's progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Install {
    /// Not started yet.
    Pending,
    /// Working on `step`; `done` of `total` items or bytes.
    Running {
        /// What it is doing.
        step: String,
        /// Items or bytes done.
        done: u64,
        /// Items or bytes in all, when known.
        total: Option<u64>,
        /// `items` or `bytes`.
        unit: String,
    },
    /// Finished; `skipped` when its stamp said nothing changed.
    Done {
        /// Nothing needed doing.
        skipped: bool,
        /// Wall time.
        seconds: f64,
        /// Items that failed without failing the install.
        failed_items: Vec<String>,
    },
    /// Failed.
    Failed {
        /// Why.
        reason: String,
    },
}

impl From<&InstallState> for Install {
    fn from(s: &InstallState) -> Install {
        match s {
            InstallState::Pending => Install::Pending,
            InstallState::Running {
                step,
                done,
                total,
                unit,
            } => Install::Running {
                step: step.clone(),
                done: *done,
                total: *total,
                unit: (*unit).to_owned(),
            },
            InstallState::Done {
                skipped,
                seconds,
                failed_items,
            } => Install::Done {
                skipped: *skipped,
                seconds: *seconds,
                failed_items: failed_items.clone(),
            },
            InstallState::Failed { reason } => Install::Failed { reason: reason.clone() },
        }
    }
}

/// A supervised service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Service {
    /// The service name.
    pub name: String,
    /// Where it is in its life.
    pub state: ServiceStage,
    /// The pid of its running process.
    pub pid: Option<u32>,
    /// How many times it was started again.
    pub restarts: u32,
    /// How its last run ended.
    pub last_exit: Option<Exit>,
    /// Whether it is ready.
    pub ready: bool,
    /// Whether its liveness probe passes.
    pub live: bool,
    /// Whether it failed too often within the crash-loop window.
    pub crash_loop: bool,
    /// When its current (or last) run started, RFC 3339.
    pub started_at: Option<String>,
    /// The GPU it is pinned to.
    pub gpu: Option<u32>,
    /// Whether its failure shuts the machine down.
    pub critical: bool,
    /// Why it is not healthy, when it is not.
    pub reason: Option<String>,
}

/// A service's state, as the supervisor names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceStage {
    /// Waiting for the services it starts after.
    Waiting,
    /// Started, not ready yet.
    Starting,
    /// Running and ready.
    Running,
    /// Waiting out its restart delay.
    Backoff,
    /// Being stopped.
    Stopping,
    /// Stopped on request or at shutdown.
    Stopped,
    /// Exited and not started again.
    Exited,
    /// Failed and not started again.
    Failed,
}

impl From<ServiceState> for ServiceStage {
    fn from(s: ServiceState) -> ServiceStage {
        match s {
            ServiceState::Waiting => ServiceStage::Waiting,
            ServiceState::Starting => ServiceStage::Starting,
            ServiceState::Running => ServiceStage::Running,
            ServiceState::Backoff => ServiceStage::Backoff,
            ServiceState::Stopping => ServiceStage::Stopping,
            ServiceState::Stopped => ServiceStage::Stopped,
            ServiceState::Exited => ServiceStage::Exited,
            ServiceState::Failed => ServiceStage::Failed,
        }
    }
}

/// How a run of a service ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exit {
    /// The exit code, when it exited.
    pub code: Option<i32>,
    /// The signal that ended it, when one did.
    pub signal: Option<i32>,
    /// When it ended, RFC 3339.
    pub at: String,
}

/// A time as the status page writes it: RFC 3339 with milliseconds, UTC.
fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

impl From<&ExitInfo> for Exit {
    fn from(e: &ExitInfo) -> Exit {
        Exit {
            code: e.code,
            signal: e.signal,
            at: rfc3339(e.at),
        }
    }
}

impl From<&ServiceStatus> for Service {
    fn from(s: &ServiceStatus) -> Service {
        let ServiceStatus {
            name,
            state,
            pid,
            restarts,
            last_exit,
            ready,
            live,
            crash_loop,
            started_at,
            gpu,
            critical,
            reason,
        } = s;
        Service {
            name: name.clone(),
            state: (*state).into(),
            pid: *pid,
            restarts: *restarts,
            last_exit: last_exit.as_ref().map(Exit::from),
            ready: *ready,
            live: *live,
            crash_loop: *crash_loop,
            started_at: started_at.map(rfc3339),
            gpu: *gpu,
            critical: *critical,
            reason: reason.clone(),
        }
    }
}

/// A worker, and why it waits when it has a reason to report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Worker {
    /// The worker id.
    pub worker_id: String,
    /// Its state.
    pub state: WorkerStage,
    /// The job it runs, when busy.
    pub current_job: Option<Job>,
    /// Outcomes so far.
    pub counts: Counts,
    /// The last error it met.
    pub last_error: Option<String>,
    /// When its state or job last changed, epoch milliseconds.
    pub last_activity_ms: u64,
    /// Why a waiting worker does not claim (a service of its in crash loop or failed).
    pub reason: Option<String>,
}

impl Worker {
    /// The worker as its status says, with the reason it waits.
    pub fn new(status: &WorkerStatus, reason: Option<String>) -> Worker {
        let WorkerStatus {
            worker_id,
            state,
            current_job,
            counts,
            last_error,
            last_activity_ms,
        } = status;
        Worker {
            worker_id: worker_id.clone(),
            state: (*state).into(),
            current_job: current_job.as_ref().map(Job::from),
            counts: counts.into(),
            last_error: last_error.clone(),
            last_activity_ms: *last_activity_ms,
            reason,
        }
    }
}

/// A worker's state, as the workers name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WorkerStage {
    /// Registering with the broker.
    Starting,
    /// Its services are not ready; it does not claim.
    WaitingForServices,
    /// Waiting for a job.
    Idle,
    /// Running a job.
    Busy,
    /// Shutting down.
    Draining,
    /// Stopped.
    Stopped,
}

impl From<WorkerState> for WorkerStage {
    fn from(s: WorkerState) -> WorkerStage {
        match s {
            WorkerState::Starting => WorkerStage::Starting,
            WorkerState::WaitingForServices => WorkerStage::WaitingForServices,
            WorkerState::Idle => WorkerStage::Idle,
            WorkerState::Busy => WorkerStage::Busy,
            WorkerState::Draining => WorkerStage::Draining,
            WorkerState::Stopped => WorkerStage::Stopped,
        }
    }
}

/// The job a worker runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    /// The job id.
    pub job_id: String,
    /// Its `service_required`.
    pub service: String,
    /// Last reported progress, 0-100.
    pub progress: f64,
    /// Last progress message.
    pub message: String,
}

impl From<&CurrentJob> for Job {
    fn from(j: &CurrentJob) -> Job {
        let CurrentJob {
            job_id,
            service,
            progress,
            message,
        } = j;
        Job {
            job_id: job_id.clone(),
            service: service.clone(),
            progress: *progress,
            message: message.clone(),
        }
    }
}

/// How many jobs ended which way on a worker.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    /// Claimed.
    pub claimed: u64,
    /// Completed.
    pub completed: u64,
    /// Failed.
    pub failed: u64,
    /// Returned to the queue.
    pub returned: u64,
    /// Cancelled by the API while running here.
    pub cancelled: u64,
    /// Whose lease this worker lost.
    pub lost: u64,
}

impl From<&JobCounts> for Counts {
    fn from(c: &JobCounts) -> Counts {
        let JobCounts {
            claimed,
            completed,
            failed,
            returned,
            cancelled,
            lost,
        } = *c;
        Counts {
            claimed,
            completed,
            failed,
            returned,
            cancelled,
            lost,
        }
    }
}

/// The broker connection as the status page shows it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
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

/// `/ready`: whether every worker claims, and the workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyDocument {
    /// The phase is `ready`.
    pub ready: bool,
    /// The machine's phase.
    pub phase: Phase,
    /// The workers, as in `/status`.
    pub workers: Vec<Worker>,
}

/// `/health`: the verdict Docker's HEALTHCHECK and load balancers read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HealthDocument {
    /// `ok` or `unhealthy`.
    pub status: Verdict,
    /// `MACHINE_ID`.
    pub machine_id: String,
    /// The machine's phase.
    pub phase: Phase,
    /// Milliseconds since start.
    pub uptime_ms: u64,
    /// The critical service that failed, when one did.
    pub critical_failure: Option<String>,
}

/// The `/health` verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Running, nothing critical failed.
    Ok,
    /// Shutting down or a critical service failed (answered with 503).
    Unhealthy,
}

impl ServiceStage {
    /// The name the document gives the state.
    pub fn name(self) -> &'static str {
        match self {
            ServiceStage::Waiting => "waiting",
            ServiceStage::Starting => "starting",
            ServiceStage::Running => "running",
            ServiceStage::Backoff => "backoff",
            ServiceStage::Stopping => "stopping",
            ServiceStage::Stopped => "stopped",
            ServiceStage::Exited => "exited",
            ServiceStage::Failed => "failed",
        }
    }
}

impl WorkerStage {
    /// The name the document gives the state.
    pub fn name(self) -> &'static str {
        match self {
            WorkerStage::Starting => "starting",
            WorkerStage::WaitingForServices => "waiting_for_services",
            WorkerStage::Idle => "idle",
            WorkerStage::Busy => "busy",
            WorkerStage::Draining => "draining",
            WorkerStage::Stopped => "stopped",
        }
    }
}

/// A status document with every section filled, for the tests of this module and the client.
#[cfg(test)]
pub(crate) fn sample() -> StatusDocument {
    StatusDocument {
        machine: Machine {
            id: "m1".into(),
            phase: Phase::Ready,
            uptime_ms: 5000,
            started_at_ms: 1_750_000_000_000,
            version: "0.1.0".into(),
            critical_failure: None,
        },
        gpus: vec![Gpu {
            index: 0,
            name: "RTX".into(),
            uuid: Some("GPU-1".into()),
            memory_total_bytes: 24 << 30,
            memory_used_bytes: Some(1 << 30),
            utilization_percent: Some(50),
            temperature_c: Some(60),
        }],
        host: Host {
            cpu_cores: 8,
            ram_total_bytes: 32 << 30,
            ram_available_bytes: 16 << 30,
            disk_free_bytes: None,
        },
        installs: BTreeMap::from([
            ("nodes".to_owned(), Install::Pending),
            (
                "models".to_owned(),
                Install::Running {
                    step: "fetch".into(),
                    done: 3,
                    total: Some(9),
                    unit: "bytes".into(),
                },
            ),
            (
                "pip".to_owned(),
                Install::Done {
                    skipped: true,
                    seconds: 0.5,
                    failed_items: vec!["x".into()],
                },
            ),
            ("apt".to_owned(), Install::Failed { reason: "no".into() }),
        ]),
        services: vec![Service {
            name: "comfyui-gpu0".into(),
            state: ServiceStage::Backoff,
            pid: None,
            restarts: 2,
            last_exit: Some(Exit {
                code: None,
                signal: Some(9),
                at: "2026-01-01T00:00:00.000Z".into(),
            }),
            ready: false,
            live: true,
            crash_loop: false,
            started_at: Some("2026-01-01T00:00:00.000Z".into()),
            gpu: Some(0),
            critical: false,
            reason: Some("exited".into()),
        }],
        workers: vec![Worker {
            worker_id: "m1-gpu0".into(),
            state: WorkerStage::WaitingForServices,
            current_job: Some(Job {
                job_id: "j1".into(),
                service: "comfyui".into(),
                progress: 40.0,
                message: "step".into(),
            }),
            counts: Counts {
                completed: 3,
                ..Counts::default()
            },
            last_error: None,
            last_activity_ms: 1,
            reason: Some("comfyui-gpu0 is failed".into()),
        }],
        redis: RedisStatus {
            url: Some("redis://***@h".into()),
            connected: true,
            function_version: Some("abc".into()),
            last_error: None,
        },
        external_apis: BTreeMap::from([("openai".to_owned(), serde_json::json!({"requests": 1}))]),
        config: serde_json::json!({"machine_id": "m1"}),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_status_document_round_trips() {
        let doc = sample();
        let text = serde_json::to_string(&doc).expect("serialises");
        let back: StatusDocument = serde_json::from_str(&text).expect("parses back");
        assert_eq!(back, doc);
    }

    #[test]
    fn the_wire_names_are_the_pages() {
        let v = serde_json::to_value(sample()).expect("serialises");
        assert_eq!(v["machine"]["phase"], "ready");
        assert_eq!(v["installs"]["models"]["state"], "running");
        assert_eq!(v["installs"]["models"]["unit"], "bytes");
        assert_eq!(v["installs"]["nodes"], serde_json::json!({"state": "pending"}));
        assert_eq!(v["services"][0]["state"], "backoff");
        assert_eq!(v["services"][0]["last_exit"]["signal"], 9);
        assert_eq!(v["workers"][0]["state"], "waiting_for_services");
        assert_eq!(v["workers"][0]["reason"], "comfyui-gpu0 is failed");
        assert!(v["workers"][0]["last_error"].is_null());
        assert_eq!(v["redis"]["connected"], true);
    }

    #[test]
    fn the_names_are_the_wire_names() {
        for s in [ServiceStage::Waiting, ServiceStage::Backoff, ServiceStage::Failed] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        for s in [
            WorkerStage::WaitingForServices,
            WorkerStage::Idle,
            WorkerStage::Draining,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.name());
        }
        for p in [Phase::Starting, Phase::Ready, Phase::Shutdown] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
    }

    /// The mirrors write what the subsystems' own types write, so the page is the one it was.
    #[test]
    fn the_mirrors_serialise_like_their_sources() {
        let states = [
            ServiceState::Waiting,
            ServiceState::Starting,
            ServiceState::Running,
            ServiceState::Backoff,
            ServiceState::Stopping,
            ServiceState::Stopped,
            ServiceState::Exited,
            ServiceState::Failed,
        ];
        for s in states {
            assert_eq!(
                serde_json::to_value(ServiceStage::from(s)).unwrap(),
                serde_json::to_value(s).unwrap()
            );
        }
        let mut service = ServiceStatus::new("svc", Some(1), true);
        service.last_exit = Some(ExitInfo {
            code: Some(1),
            signal: None,
            at: SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_750_000_000_123),
        });
        service.started_at = Some(SystemTime::UNIX_EPOCH + std::time::Duration::from_millis(1_750_000_000_000));
        assert_eq!(
            serde_json::to_value(Service::from(&service)).unwrap(),
            serde_json::to_value(&service).unwrap()
        );
        for s in [
            WorkerState::Starting,
            WorkerState::WaitingForServices,
            WorkerState::Idle,
            WorkerState::Busy,
            WorkerState::Draining,
            WorkerState::Stopped,
        ] {
            let status = WorkerStatus {
                worker_id: "w".into(),
                state: s,
                current_job: Some(CurrentJob {
                    job_id: "j".into(),
                    service: "s".into(),
                    progress: 1.5,
                    message: "m".into(),
                }),
                counts: JobCounts {
                    claimed: 1,
                    completed: 2,
                    failed: 3,
                    returned: 4,
                    cancelled: 5,
                    lost: 6,
                },
                last_error: Some("e".into()),
                last_activity_ms: 7,
            };
            let mut expected = serde_json::to_value(&status).unwrap();
            expected["reason"] = Value::Null;
            assert_eq!(serde_json::to_value(Worker::new(&status, None)).unwrap(), expected);
        }
        for s in [
            InstallState::Pending,
            InstallState::Running {
                step: "a".into(),
                done: 1,
                total: None,
                unit: "items",
            },
            InstallState::Done {
                skipped: false,
                seconds: 1.25,
                failed_items: vec![],
            },
            InstallState::Failed { reason: "r".into() },
        ] {
            assert_eq!(
                serde_json::to_value(Install::from(&s)).unwrap(),
                serde_json::to_value(&s).unwrap()
            );
        }
        let host = HostInfo {
            cpu_cores: 2,
            ram_total_bytes: 3,
            ram_available_bytes: 4,
            disk_free_bytes: Some(5),
        };
        assert_eq!(
            serde_json::to_value(Host::from(&host)).unwrap(),
            serde_json::to_value(&host).unwrap()
        );
    }
}

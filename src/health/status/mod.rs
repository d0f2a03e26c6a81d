//! The documents the health server answers, as serde types shared by the server that writes
//! them and `machine status` that reads them: [`StatusDocument`] (`/status`), [`ReadyDocument`]
//! (`/ready`), [`HealthDocument`] (`/health`) and [`FleetDocument`] (`/fleet`). `/events`
//! streams the [`StatusDocument`] too.
//!
//! These types ARE the wire contract: their field names are what operators, dashboards and
//! scripts read. They mirror the supervisor's, the workers' and the installers' own status
//! types through exhaustive conversions, so a field or state added there fails to compile here
//! until the document says how it shows it, instead of changing the page silently.

mod board;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::Phase;
use super::fleet::FleetMessage;
use crate::gpu::monitor::Throttle;
use crate::gpu::{Condition, GpuHealth, GpuInfo, GpuLive, HostInfo};
use crate::installers::InstallState;

pub use board::{Counts, Exit, Job, Service, ServiceStage, Upload, Worker, WorkerStage};

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
    /// The last jobs this machine finished, oldest first (absent from older machines).
    #[serde(default)]
    pub recent_jobs: Vec<RecentJob>,
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
    /// What `/ready` answers now (absent from older machines).
    #[serde(default)]
    pub ready: bool,
    /// Milliseconds since start.
    pub uptime_ms: u64,
    /// When it started, epoch milliseconds.
    pub started_at_ms: u64,
    /// This binary's version.
    pub version: String,
    /// The critical service whose failure shuts the machine down, when one failed.
    pub critical_failure: Option<String>,
    /// This run's random id, new each start (absent from older machines).
    #[serde(default)]
    pub instance_id: String,
    /// Another live run under the same machine id, when one publishes (see the fleet message).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duplicate: Option<super::fleet::Duplicate>,
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
    /// `ok`, or `faulted` (its worker does not claim).
    #[serde(default = "ok")]
    pub health: Condition,
    /// What faulted it (`XID 79: GPU has fallen off the bus`).
    #[serde(default)]
    pub reason: Option<String>,
    /// The last critical XID NVML reported, fatal or not.
    #[serde(default)]
    pub last_xid: Option<u64>,
    /// Its thermal or power throttling now, with since when.
    #[serde(default)]
    pub throttle: Option<Throttle>,
    /// Milliseconds spent throttled in episodes that ended.
    #[serde(default)]
    pub throttled_ms: u64,
}

fn ok() -> Condition {
    Condition::Ok
}

impl Gpu {
    /// The probe's facts about `gpu` with its live reading and its health, when known.
    pub fn new(gpu: &GpuInfo, live: Option<&GpuLive>, health: Option<&GpuHealth>) -> Gpu {
        Gpu {
            index: gpu.index,
            name: gpu.name.clone(),
            uuid: gpu.uuid.clone(),
            memory_total_bytes: gpu.memory_total_bytes,
            memory_used_bytes: live.and_then(|l| l.memory_used_bytes),
            utilization_percent: live.and_then(|l| l.utilization_percent),
            temperature_c: live.and_then(|l| l.temperature_c),
            health: health.map_or(Condition::Ok, |h| h.health),
            reason: health.and_then(|h| h.reason.clone()),
            last_xid: health.and_then(|h| h.last_xid),
            throttle: health.and_then(|h| h.throttle.clone()),
            throttled_ms: health.map_or(0, |h| h.throttled_ms),
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

/// A job this machine finished: who ran it, how it ended and how long it took (never its
/// payload or result).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentJob {
    /// The job id.
    pub job_id: String,
    /// The worker that ran it.
    pub worker_id: String,
    /// Its `service_required`.
    pub service: String,
    /// How it ended.
    pub outcome: JobEnd,
    /// When it was claimed, epoch milliseconds.
    pub started_at_ms: u64,
    /// When its outcome was written, epoch milliseconds.
    pub finished_at_ms: u64,
    /// From the claim to the outcome, in milliseconds.
    pub duration_ms: u64,
    /// Why it failed, when it did.
    pub error: Option<String>,
    /// A failed attempt that the broker put back in the queue for another: the job is pending,
    /// not failed (absent from older machines).
    #[serde(default)]
    pub requeued: bool,
}

/// How a job ended on this machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobEnd {
    /// Completed; the result was written.
    Completed,
    /// Failed (and perhaps re-queued by the broker).
    Failed,
    /// Returned to the queue (shutdown or a quota).
    Returned,
    /// Cancelled by the API.
    Cancelled,
    /// Its lease was lost.
    Lost,
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
    /// The kind of the last error (`unreachable`, `readonly`, `auth`, `other`).
    #[serde(default)]
    pub error_kind: Option<String>,
    /// Errors since the machine started, by kind.
    #[serde(default)]
    pub errors: BTreeMap<String, u64>,
    /// Why no worker can claim, once Redis has failed for 5 s (`/ready` is then 503).
    #[serde(default)]
    pub not_ready: Option<String>,
}

/// `/fleet`: every machine's latest fleet status message as stored in Redis, by machine id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetDocument {
    /// The machines that published within the message's lifetime (30 s).
    pub machines: Vec<FleetMessage>,
}

/// `/ready`: whether the machine takes jobs, which workers cannot and why, and the workers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReadyDocument {
    /// The phase is `ready` and at least one worker can claim (answered with 200, else 503).
    pub ready: bool,
    /// The machine's phase.
    pub phase: Phase,
    /// Every worker that cannot claim now, with why (also when `ready`).
    #[serde(default)]
    pub not_claiming: BTreeMap<String, String>,
    /// Why no claim can succeed because of Redis (failing for 5 s): not ready, yet healthy,
    /// since a restart would not help.
    #[serde(default)]
    pub redis: Option<String>,
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

/// A status document with every section filled, for the tests of this module and the client.
#[cfg(test)]
pub(crate) fn sample() -> StatusDocument {
    StatusDocument {
        machine: Machine {
            id: "m1".into(),
            phase: Phase::Ready,
            ready: true,
            uptime_ms: 5000,
            started_at_ms: 1_750_000_000_000,
            version: "0.1.0".into(),
            critical_failure: None,
            instance_id: "0123456789abcdef".into(),
            duplicate: None,
        },
        gpus: vec![Gpu {
            index: 0,
            name: "RTX".into(),
            uuid: Some("GPU-1".into()),
            memory_total_bytes: 24 << 30,
            memory_used_bytes: Some(1 << 30),
            utilization_percent: Some(50),
            temperature_c: Some(60),
            health: Condition::Ok,
            reason: None,
            last_xid: None,
            throttle: None,
            throttled_ms: 0,
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
            uploads: Vec::new(),
            quarantined: false,
            quota_waits: Vec::new(),
        }],
        recent_jobs: vec![RecentJob {
            job_id: "j0".into(),
            worker_id: "m1-gpu0".into(),
            service: "comfyui".into(),
            outcome: JobEnd::Failed,
            started_at_ms: 1_750_000_000_000,
            finished_at_ms: 1_750_000_001_500,
            duration_ms: 1500,
            error: Some("out of memory".into()),
            requeued: true,
        }],
        redis: RedisStatus {
            url: Some("redis://***@h".into()),
            connected: true,
            function_version: Some("abc".into()),
            last_error: None,
            error_kind: None,
            errors: BTreeMap::from([("unreachable".to_owned(), 2)]),
            not_ready: None,
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
        assert_eq!(v["recent_jobs"][0]["outcome"], "failed");
        assert_eq!(v["recent_jobs"][0]["duration_ms"], 1500);
    }

    #[test]
    fn a_document_without_recent_jobs_still_reads() {
        let mut v = serde_json::to_value(sample()).expect("serialises");
        v.as_object_mut().expect("an object").remove("recent_jobs");
        let doc: StatusDocument = serde_json::from_value(v).expect("older machines' documents parse");
        assert!(doc.recent_jobs.is_empty());
    }

    #[test]
    fn the_phase_names_are_the_wire_names() {
        for p in [Phase::Starting, Phase::Ready, Phase::Shutdown] {
            assert_eq!(serde_json::to_value(p).unwrap(), p.name());
        }
    }

    /// The mirrors write what the subsystems' own types write, so the page is the one it was.
    #[test]
    fn installs_and_host_serialise_like_their_sources() {
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

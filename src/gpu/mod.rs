//! What hardware this machine has: the GPUs through NVML (`nvml-wrapper`), with the
//! `MACHINE_GPU_*` overrides as fallback, and the host through `sysinfo`; and how the GPUs
//! fare while the machine runs ([`monitor`]: faults, throttling).
//!
//! The probe never fails: a machine without NVML is a CPU-only machine (or one described by its
//! overrides), and the reason is kept in [`Probe::notes`] so it can be logged and shown.

mod host;
pub mod monitor;
mod nvml;

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use serde::Serialize;

use crate::config::{DeviceSelector, GpuOverrides, VisibleDevices};

pub use host::HostInfo;
pub use monitor::{Condition, GpuHealth};

/// One GPU this machine will use.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuInfo {
    /// NVML index (PCI bus order); the value used for `CUDA_VISIBLE_DEVICES` and ports.
    pub index: u32,
    /// Product name.
    pub name: String,
    /// GPU UUID (`GPU-...`), when NVML reported one.
    pub uuid: Option<String>,
    /// Total memory in bytes (0 when unknown).
    pub memory_total_bytes: u64,
    /// Free memory in bytes at probe time (0 when unknown).
    pub memory_free_bytes: u64,
}

impl GpuInfo {
    /// Total memory in GiB, rounded down, as the job requirements compare it.
    pub fn memory_gb(&self) -> u64 {
        self.memory_total_bytes / (1024 * 1024 * 1024)
    }
}

/// Where the GPU facts came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum GpuSource {
    /// NVML answered.
    Nvml {
        /// The NVIDIA driver version.
        driver_version: String,
        /// The CUDA driver version, e.g. `12.4`.
        cuda_driver_version: Option<String>,
    },
    /// NVML was unavailable; `MACHINE_GPU_*` described the GPUs.
    Config,
    /// No GPU: NVML unavailable and no override, or none visible.
    None,
}

/// Live readings of one GPU for the status page.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GpuLive {
    /// NVML index.
    pub index: u32,
    /// GPU utilisation in percent.
    pub utilization_percent: Option<u32>,
    /// Memory used in bytes.
    pub memory_used_bytes: Option<u64>,
    /// Memory total in bytes.
    pub memory_total_bytes: Option<u64>,
    /// Core temperature in °C.
    pub temperature_c: Option<u32>,
}

/// The result of probing the machine.
#[derive(Debug, Serialize)]
pub struct Probe {
    /// The GPUs the machine will use, after `CUDA_VISIBLE_DEVICES` and overrides.
    pub gpus: Vec<GpuInfo>,
    /// Where the GPU facts came from.
    pub source: GpuSource,
    /// Host facts.
    pub host: HostInfo,
    /// Why things are as they are (NVML failures, ignored overrides), for logs and `machine gpus`.
    pub notes: Vec<String>,
    #[serde(skip)]
    nvml: Option<nvml::Nvml>,
    #[serde(skip)]
    board: monitor::Board,
}

impl Probe {
    /// Probes the GPUs (respecting `CUDA_VISIBLE_DEVICES` and the overrides) and the host;
    /// `workspace` is where free disk space is measured.
    pub fn run(overrides: &GpuOverrides, visible: &VisibleDevices, workspace: &std::path::Path) -> Probe {
        let mut notes = Vec::new();
        let host = HostInfo::probe(workspace);
        let (gpus, source, nvml) = match nvml::Nvml::open() {
            Ok(handle) => {
                let (all, source) = handle.describe(&mut notes);
                (select(all, visible, overrides, &mut notes), source, Some(handle))
            }
            Err(reason) => {
                notes.push(format!("NVML unavailable: {reason}"));
                match overrides.count {
                    Some(n) => {
                        let all = (0..n)
                            .map(|index| GpuInfo {
                                index,
                                name: overrides.model.clone().unwrap_or_else(|| "unknown".to_owned()),
                                uuid: None,
                                memory_total_bytes: overrides
                                    .memory_gb
                                    .map_or(0, |gb| (gb * 1024.0 * 1024.0 * 1024.0) as u64),
                                memory_free_bytes: 0,
                            })
                            .collect();
                        if overrides.memory_gb.is_none() {
                            notes.push("MACHINE_GPU_MEMORY_GB is unset: GPU memory reported as 0".to_owned());
                        }
                        let gpus = select(all, visible, &GpuOverrides::default(), &mut notes);
                        (gpus, GpuSource::Config, None)
                    }
                    None => (Vec::new(), GpuSource::None, None),
                }
            }
        };
        let source = if gpus.is_empty() { GpuSource::None } else { source };
        if gpus.is_empty() {
            notes.push("no GPU in use: GPU-bound connectors run in CPU mode".to_owned());
        }
        let board = monitor::Board::new(gpus.iter().map(|g| g.index));
        Probe {
            gpus,
            source,
            host,
            notes,
            nvml,
            board,
        }
    }

    /// A probe with the given GPUs and host and no NVML handle (for tests of code that plans
    /// from a probe).
    pub fn from_parts(gpus: Vec<GpuInfo>, host: HostInfo) -> Probe {
        let source = if gpus.is_empty() {
            GpuSource::None
        } else {
            GpuSource::Config
        };
        let board = monitor::Board::new(gpus.iter().map(|g| g.index));
        Probe {
            gpus,
            source,
            host,
            notes: Vec::new(),
            nvml: None,
            board,
        }
    }

    /// Follows the health of the GPUs in use (all `ok` until [`watch_health`] sees a fault).
    pub fn health(&self) -> watch::Receiver<Vec<GpuHealth>> {
        self.board.subscribe()
    }

    /// The health of the GPUs in use now.
    pub fn health_now(&self) -> Vec<GpuHealth> {
        self.board.now()
    }

    /// Marks GPU `index` faulted for `reason` (what a failed NVML call found elsewhere).
    pub fn fault(&self, index: u32, reason: String) {
        self.board.fault(index, reason);
    }

    /// Cheap live readings (utilisation, memory, temperature) of the GPUs in use; empty
    /// without NVML.
    pub fn live(&self) -> Vec<GpuLive> {
        match &self.nvml {
            Some(n) => self.gpus.iter().map(|g| n.live(g.index)).collect(),
            None => Vec::new(),
        }
    }
}

/// Watches the GPUs' health through NVML (events, and readings every `poll`) on a blocking
/// thread until `stop`; returns at once without NVML or GPUs.
pub async fn watch_health(probe: Arc<Probe>, poll: Duration, stop: CancellationToken) {
    if probe.nvml.is_none() || probe.gpus.is_empty() {
        return;
    }
    let watched = tokio::task::spawn_blocking(move || {
        if let Some(n) = &probe.nvml {
            monitor::monitor(n.handle(), &probe.board, poll, &stop);
        }
    });
    if let Err(e) = watched.await {
        tracing::error!(error = %e, "the GPU health monitor failed");
    }
}

/// Applies `CUDA_VISIBLE_DEVICES` (by index or UUID prefix, in its order) and then the count
/// override (first N) to the GPUs found.
fn select(
    all: Vec<GpuInfo>,
    visible: &VisibleDevices,
    overrides: &GpuOverrides,
    notes: &mut Vec<String>,
) -> Vec<GpuInfo> {
    let mut chosen: Vec<GpuInfo> = match visible {
        VisibleDevices::All => all,
        VisibleDevices::None => {
            notes.push("CUDA_VISIBLE_DEVICES hides every GPU".to_owned());
            Vec::new()
        }
        VisibleDevices::List(selectors) => {
            let mut out: Vec<GpuInfo> = Vec::new();
            for s in selectors {
                let found = all.iter().find(|g| match s {
                    DeviceSelector::Index(i) => g.index == *i,
                    DeviceSelector::Uuid(u) => g.uuid.as_deref().is_some_and(|id| id.starts_with(u.as_str())),
                });
                match found {
                    Some(g) if !out.iter().any(|o| o.index == g.index) => out.push(g.clone()),
                    Some(_) => notes.push(format!("CUDA_VISIBLE_DEVICES names {s:?} twice; used once")),
                    None => notes.push(format!("CUDA_VISIBLE_DEVICES entry {s:?} matches no GPU; ignored")),
                }
            }
            out
        }
    };
    if let Some(n) = overrides.count {
        let n = n as usize;
        if n < chosen.len() {
            notes.push(format!("MACHINE_GPU_COUNT={n}: using {n} of {} GPUs", chosen.len()));
            chosen.truncate(n);
        } else if n > chosen.len() {
            notes.push(format!(
                "MACHINE_GPU_COUNT={n} but only {} GPU(s) are present; using those",
                chosen.len()
            ));
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32) -> GpuInfo {
        GpuInfo {
            index,
            name: "g".into(),
            uuid: Some(format!("GPU-{index}abc")),
            memory_total_bytes: 8 << 30,
            memory_free_bytes: 0,
        }
    }

    #[test]
    fn visible_devices_select_and_order() {
        let mut notes = Vec::new();
        let list = VisibleDevices::List(vec![
            DeviceSelector::Index(2),
            DeviceSelector::Uuid("GPU-0".into()),
            DeviceSelector::Index(9),
        ]);
        let got = select((0..4).map(gpu).collect(), &list, &GpuOverrides::default(), &mut notes);
        assert_eq!(got.iter().map(|g| g.index).collect::<Vec<_>>(), [2, 0]);
        assert_eq!(notes.len(), 1, "{notes:?}");
    }

    #[test]
    fn count_override_limits() {
        let mut notes = Vec::new();
        let o = GpuOverrides {
            count: Some(2),
            ..GpuOverrides::default()
        };
        let got = select((0..4).map(gpu).collect(), &VisibleDevices::All, &o, &mut notes);
        assert_eq!(got.len(), 2);
        assert_eq!(gpu(0).memory_gb(), 8);
    }
}

//! GPU health through NVML: the monitor that listens for NVML's critical events (XID errors,
//! double-bit ECC) and reads throttling, temperature and page retirement, and the board of
//! each GPU's health it publishes.
//!
//! A fatal fault (a critical XID of [`FATAL_XIDS`], a double-bit ECC error, `GPU_IS_LOST`
//! from any call, retired pages pending a reset) marks the GPU `faulted` with its reason for
//! good: a GPU that faulted needs a reset, which is the host's business, not ours. Throttling
//! is reported with its reasons and since when, never acted on. The consumers (the GPU's
//! worker, `/status`, `/metrics`, the fleet message, `gpu.on_fault = "exit"`) follow the
//! board's channel.

use std::time::Duration;

use nvml_wrapper::Nvml;
use nvml_wrapper::bitmasks::device::ThrottleReasons;
use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::struct_wrappers::event::EventData;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Critical XID errors after which the GPU cannot be trusted until it is reset (NVIDIA's XID
/// catalogue): 48 double-bit ECC, 61/62 internal micro-controller halt, 64 row-remapping
/// failure, 74 NVLink error, 79 fallen off the bus, 94/95 contained/uncontained ECC error,
/// 119/120 GSP timeout/error, 140 unrecovered ECC. Other XIDs (13, 31, 43, 45: a program's
/// own fault) are reported as the last XID and not acted on.
pub const FATAL_XIDS: [u64; 11] = [48, 61, 62, 64, 74, 79, 94, 95, 119, 120, 140];

/// The longest the monitor waits on NVML before it looks at its stop token again.
const WAIT_SLICE: Duration = Duration::from_millis(250);

/// Whether a GPU can be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Nothing fatal seen.
    Ok,
    /// A fatal fault: its worker does not claim; `reason` says what.
    Faulted,
}

/// A GPU's throttling now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Throttle {
    /// NVML's throttle reasons (`hw_thermal_slowdown`, `sw_power_cap`, ...).
    pub reasons: Vec<String>,
    /// When this throttling began, epoch milliseconds.
    pub since_ms: u64,
}

/// One GPU's health.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuHealth {
    /// NVML index.
    pub index: u32,
    /// Usable or faulted.
    pub health: Condition,
    /// What faulted it (`XID 79: GPU has fallen off the bus`), when it did.
    pub reason: Option<String>,
    /// When it faulted, epoch milliseconds.
    pub faulted_at_ms: Option<u64>,
    /// The last critical XID NVML reported, fatal or not.
    pub last_xid: Option<u64>,
    /// Its throttling now (thermal or power), when throttled.
    pub throttle: Option<Throttle>,
    /// Time spent throttled since start, milliseconds (episodes that ended).
    pub throttled_ms: u64,
}

impl GpuHealth {
    /// A GPU with nothing to report.
    pub fn ok(index: u32) -> GpuHealth {
        GpuHealth {
            index,
            health: Condition::Ok,
            reason: None,
            faulted_at_ms: None,
            last_xid: None,
            throttle: None,
            throttled_ms: 0,
        }
    }

    /// Marks the GPU faulted for `reason` (the first fault's reason stays); `true` when it
    /// was not faulted before.
    pub fn fault(&mut self, reason: String, now_ms: u64) -> bool {
        if self.health == Condition::Faulted {
            return false;
        }
        self.health = Condition::Faulted;
        self.reason = Some(reason);
        self.faulted_at_ms = Some(now_ms);
        true
    }

    /// Records the throttle reasons read now (empty: not throttled).
    pub fn throttled(&mut self, reasons: Vec<String>, now_ms: u64) {
        match (&mut self.throttle, reasons.is_empty()) {
            (None, true) => {}
            (None, false) => {
                self.throttle = Some(Throttle {
                    reasons,
                    since_ms: now_ms,
                })
            }
            (Some(t), false) => t.reasons = reasons,
            (Some(t), true) => {
                self.throttled_ms += now_ms.saturating_sub(t.since_ms);
                self.throttle = None;
            }
        }
    }
}

/// The reason a critical XID gives, and whether it is fatal.
pub fn xid_fault(xid: u64) -> (String, bool) {
    let what = match xid {
        48 => "double-bit ECC error",
        61 | 62 => "internal micro-controller halt",
        64 => "row remapping failure",
        74 => "NVLink error",
        79 => "GPU has fallen off the bus",
        94 => "contained ECC error",
        95 => "uncontained ECC error",
        119 | 120 => "GSP error",
        140 => "unrecovered ECC error",
        13 => "graphics engine exception",
        31 => "GPU memory page fault",
        43 => "GPU stopped processing",
        45 => "preemptive cleanup",
        _ => "critical error",
    };
    (format!("XID {xid}: {what}"), FATAL_XIDS.contains(&xid))
}

/// The throttle reasons that slow a job down (not idling or an operator's clock setting).
fn throttle_names(r: ThrottleReasons) -> Vec<String> {
    [
        (ThrottleReasons::SW_POWER_CAP, "sw_power_cap"),
        (ThrottleReasons::HW_SLOWDOWN, "hw_slowdown"),
        (ThrottleReasons::SW_THERMAL_SLOWDOWN, "sw_thermal_slowdown"),
        (ThrottleReasons::HW_THERMAL_SLOWDOWN, "hw_thermal_slowdown"),
        (ThrottleReasons::HW_POWER_BRAKE_SLOWDOWN, "hw_power_brake_slowdown"),
    ]
    .into_iter()
    .filter(|(bit, _)| r.contains(*bit))
    .map(|(_, name)| name.to_owned())
    .collect()
}

/// The board: each GPU's health, published on a watch channel.
#[derive(Debug)]
pub struct Board {
    tx: watch::Sender<Vec<GpuHealth>>,
}

impl Board {
    /// Every GPU in `indices` healthy.
    pub fn new(indices: impl IntoIterator<Item = u32>) -> Board {
        Board {
            tx: watch::channel(indices.into_iter().map(GpuHealth::ok).collect()).0,
        }
    }

    /// Follows the board.
    pub fn subscribe(&self) -> watch::Receiver<Vec<GpuHealth>> {
        self.tx.subscribe()
    }

    /// The board now.
    pub fn now(&self) -> Vec<GpuHealth> {
        self.tx.borrow().clone()
    }

    /// Applies `f` to GPU `index`'s health (a GPU not on the board is not ours: ignored).
    pub fn update(&self, index: u32, f: impl FnOnce(&mut GpuHealth) -> bool) {
        self.tx
            .send_if_modified(|b| b.iter_mut().find(|g| g.index == index).is_some_and(f));
    }

    /// Marks GPU `index` faulted, logging the first fault.
    pub fn fault(&self, index: u32, reason: String) {
        let now = crate::clock::now_ms();
        self.update(index, |g| {
            let new = g.fault(reason.clone(), now);
            if new {
                tracing::error!(gpu = index, %reason, "the GPU faulted; its worker stops claiming");
            }
            new
        });
    }
}

/// Runs the monitor on a blocking thread until `stop`: NVML events for the board's GPUs, and
/// the readings every `poll`. Returns at once, doing nothing, without NVML.
pub(super) fn monitor(nvml: &Nvml, board: &Board, poll: Duration, stop: &CancellationToken) {
    let indices: Vec<u32> = board.now().iter().map(|g| g.index).collect();
    let mut events = match nvml.create_event_set() {
        Ok(set) => Some(set),
        Err(e) => {
            tracing::warn!(error = %e, "NVML events unavailable: XID errors are not watched");
            None
        }
    };
    for &index in &indices {
        let Some(set) = events.take() else { break };
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                events = Some(set);
                lost(board, index, &e);
                continue;
            }
        };
        let wanted = EventTypes::CRITICAL_XID_ERROR | EventTypes::DOUBLE_BIT_ECC_ERROR;
        let supported = device.supported_event_types().map_or(wanted, |s| s & wanted);
        if supported.is_empty() {
            // Registering nothing would fail and release the set the other GPUs need.
            tracing::warn!(
                gpu = index,
                "this GPU reports no XID or ECC events: only its readings are watched"
            );
            events = Some(set);
            continue;
        }
        match device.register_events(supported, set) {
            Ok(set) => events = Some(set),
            Err(e) => {
                // The set is released on failure: the GPUs after this one go unwatched.
                tracing::warn!(gpu = index, error = %e, "registering for NVML events failed");
            }
        }
    }
    let mut next_poll = std::time::Instant::now();
    while !stop.is_cancelled() {
        if std::time::Instant::now() >= next_poll {
            read(nvml, board, &indices);
            next_poll = std::time::Instant::now() + poll;
        }
        let slice = WAIT_SLICE.min(poll);
        match &events {
            Some(set) => match set.wait(u32::try_from(slice.as_millis()).unwrap_or(u32::MAX)) {
                Ok(event) => on_event(board, &event),
                Err(NvmlError::Timeout) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "waiting for NVML events failed");
                    std::thread::sleep(slice);
                }
            },
            None => std::thread::sleep(slice),
        }
    }
}

fn on_event(board: &Board, event: &EventData<'_>) {
    let Ok(index) = event.device.index() else { return };
    if event.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
        let xid = match event.event_data {
            Some(nvml_wrapper::enums::event::XidError::Value(v)) => v,
            _ => 999,
        };
        let (reason, fatal) = xid_fault(xid);
        board.update(index, |g| {
            g.last_xid = Some(xid);
            true
        });
        if fatal {
            board.fault(index, reason);
        } else {
            tracing::warn!(gpu = index, %reason, "a critical XID error that is the program's, not the GPU's");
        }
    }
    if event.event_type.contains(EventTypes::DOUBLE_BIT_ECC_ERROR) {
        board.fault(index, "double-bit ECC error".to_owned());
    }
}

fn lost(board: &Board, index: u32, e: &NvmlError) {
    if matches!(e, NvmlError::GpuLost) {
        board.fault(index, "GPU is lost (NVML: GPU_IS_LOST)".to_owned());
    }
}

/// Reads throttling and page retirement of each GPU not yet faulted; `GPU_IS_LOST` from any
/// call faults the GPU.
fn read(nvml: &Nvml, board: &Board, indices: &[u32]) {
    let now = crate::clock::now_ms();
    let healthy: Vec<u32> = board
        .now()
        .iter()
        .filter(|g| g.health == Condition::Ok && indices.contains(&g.index))
        .map(|g| g.index)
        .collect();
    for index in healthy {
        let device = match nvml.device_by_index(index) {
            Ok(d) => d,
            Err(e) => {
                lost(board, index, &e);
                continue;
            }
        };
        match device.current_throttle_reasons() {
            Ok(r) => board.update(index, |g| {
                let before = g.throttle.clone();
                g.throttled(throttle_names(r), now);
                if before.is_none() && g.throttle.is_some() {
                    tracing::warn!(gpu = index, reasons = ?g.throttle.as_ref().map(|t| &t.reasons), "the GPU is throttled");
                }
                before != g.throttle
            }),
            Err(e) => lost(board, index, &e),
        }
        match device.are_pages_pending_retired() {
            Ok(true) => board.fault(index, "retired pages pending: the GPU needs a reset".to_owned()),
            Ok(false) => {}
            Err(e) => lost(board, index, &e),
        }
        if let Err(e) = device.temperature(TemperatureSensor::Gpu) {
            lost(board, index, &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fatal_xids_fault_once_and_others_do_not() {
        assert!(xid_fault(79).1);
        assert!(xid_fault(48).1);
        assert!(!xid_fault(13).1);
        let mut g = GpuHealth::ok(1);
        assert!(g.fault(xid_fault(79).0, 10));
        assert!(!g.fault("later".into(), 20), "the first fault's reason stays");
        assert_eq!(g.reason.as_deref(), Some("XID 79: GPU has fallen off the bus"));
        assert_eq!(g.faulted_at_ms, Some(10));
    }

    #[test]
    fn throttling_is_timed() {
        let mut g = GpuHealth::ok(0);
        g.throttled(vec![], 0);
        assert_eq!(g.throttle, None);
        g.throttled(vec!["hw_thermal_slowdown".into()], 1_000);
        g.throttled(vec!["hw_thermal_slowdown".into(), "sw_power_cap".into()], 2_000);
        assert_eq!(g.throttle.as_ref().map(|t| t.since_ms), Some(1_000));
        g.throttled(vec![], 4_500);
        assert_eq!((g.throttle.is_none(), g.throttled_ms), (true, 3_500));
        let names = throttle_names(ThrottleReasons::HW_THERMAL_SLOWDOWN | ThrottleReasons::GPU_IDLE);
        assert_eq!(names, ["hw_thermal_slowdown"]);
    }
}

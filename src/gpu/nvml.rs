//! The NVML calls, through `nvml-wrapper`, which loads `libnvidia-ml.so.1` through the dynamic
//! loader (so `LD_LIBRARY_PATH` decides which library answers, as for any program).

use nvml_wrapper::enum_wrappers::device::TemperatureSensor;

use super::{GpuInfo, GpuLive, GpuSource};

/// An initialised NVML handle.
pub(super) struct Nvml(nvml_wrapper::Nvml);

impl std::fmt::Debug for Nvml {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Nvml")
    }
}

impl Nvml {
    /// Loads and initialises NVML; the error says why it could not.
    pub(super) fn open() -> Result<Nvml, String> {
        nvml_wrapper::Nvml::init().map(Nvml).map_err(|e| e.to_string())
    }

    /// The wrapper's handle, for the health monitor.
    pub(super) fn handle(&self) -> &nvml_wrapper::Nvml {
        &self.0
    }

    /// Every GPU NVML sees, with the driver facts.
    pub(super) fn describe(&self, notes: &mut Vec<String>) -> (Vec<GpuInfo>, GpuSource) {
        let nvml = &self.0;
        let driver_version = nvml.sys_driver_version().unwrap_or_else(|e| {
            notes.push(format!("NVML: driver version unavailable: {e}"));
            "unknown".to_owned()
        });
        let cuda_driver_version = nvml
            .sys_cuda_driver_version()
            .ok()
            .map(|v| format!("{}.{}", v / 1000, (v % 1000) / 10));
        let count = nvml.device_count().unwrap_or_else(|e| {
            notes.push(format!("NVML: device count unavailable: {e}"));
            0
        });
        let mut gpus = Vec::new();
        for index in 0..count {
            let device = match nvml.device_by_index(index) {
                Ok(d) => d,
                Err(e) => {
                    notes.push(format!("NVML: GPU {index} skipped: {e}"));
                    continue;
                }
            };
            let memory = device.memory_info().ok();
            gpus.push(GpuInfo {
                index,
                name: device.name().unwrap_or_else(|_| "unknown".to_owned()),
                uuid: device.uuid().ok(),
                memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
                memory_free_bytes: memory.as_ref().map_or(0, |m| m.free),
            });
        }
        (
            gpus,
            GpuSource::Nvml {
                driver_version,
                cuda_driver_version,
            },
        )
    }

    /// Live readings of the GPU at `index`; a reading NVML refuses is `None`.
    pub(super) fn live(&self, index: u32) -> GpuLive {
        let device = self.0.device_by_index(index).ok();
        let memory = device.as_ref().and_then(|d| d.memory_info().ok());
        GpuLive {
            index,
            utilization_percent: device.as_ref().and_then(|d| d.utilization_rates().ok()).map(|u| u.gpu),
            memory_used_bytes: memory.as_ref().map(|m| m.used),
            memory_total_bytes: memory.as_ref().map(|m| m.total),
            temperature_c: device.as_ref().and_then(|d| d.temperature(TemperatureSensor::Gpu).ok()),
        }
    }
}

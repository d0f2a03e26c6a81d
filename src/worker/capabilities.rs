//! A worker's capabilities, built from facts: the GPU it owns (model and memory from the
//! probe), the host's RAM and CPU cores, the models really present on disk for each of its
//! job services, and what the configuration says about customers, workflow pinning and custom
//! capabilities. Nothing here is a default that pretends to be a fact: a worker without a GPU
//! reports `gpu_count = 0`, and a job service without a models folder reports no models.
//!
//! The models are the one fact that changes while the machine runs (the installers download
//! the manifest's models after the workers are built, jobs fetch models on demand, the cache
//! evicts them), so [`build`] leaves them out: [`ModelDirs`] names the folders, and the worker
//! scans them when it starts (after the installers, before it registers) and again whenever
//! it looks for a job.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::broker::{Capabilities, CustomerAccess, Hardware};
use crate::config::{ConnectorKind, WorkerConfig};
use crate::gpu::Probe;
use crate::models::scan_models;
use crate::plan::WorkerPlan;

/// The folder holding a connector's models, as the installers lay out the workspace; `None`
/// for a connector that has no models on this machine.
pub(crate) fn models_dir(workspace: &Path, kind: ConnectorKind) -> Option<PathBuf> {
    match kind {
        ConnectorKind::Comfyui => Some(workspace.join("ComfyUI").join("models")),
        ConnectorKind::A1111 => Some(workspace.join("stable-diffusion-webui").join("models")),
        ConnectorKind::Playwright
        | ConnectorKind::Openai
        | ConnectorKind::Replicate
        | ConnectorKind::Runpod
        | ConnectorKind::Simulation => None,
    }
}

/// The models folders of one worker's job services: what its advertised `models` are scanned
/// from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ModelDirs {
    /// (job service, folder), one entry per job service of a connector that has models.
    dirs: Vec<(String, PathBuf)>,
}

impl ModelDirs {
    /// The folders of `plan`'s connectors under `workspace`.
    pub fn of(plan: &WorkerPlan, workspace: &Path) -> ModelDirs {
        let mut dirs = Vec::new();
        for connector in &plan.connectors {
            if let Some(dir) = models_dir(workspace, connector.kind) {
                for service in &connector.job_services {
                    dirs.push((service.clone(), dir.clone()));
                }
            }
        }
        ModelDirs { dirs }
    }

    /// The models on disk now, by job service (the `models` of the capabilities).
    pub fn scan(&self) -> BTreeMap<String, Vec<String>> {
        let mut found: BTreeMap<&Path, Vec<String>> = BTreeMap::new();
        let mut models = BTreeMap::new();
        for (service, dir) in &self.dirs {
            let names = found.entry(dir).or_insert_with(|| scan_models(dir));
            models.insert(service.clone(), names.clone());
        }
        models
    }
}

/// The capabilities of one planned worker, without its models: the worker scans those when it
/// starts, after the installers have put this boot's models on disk.
pub fn build(plan: &WorkerPlan, machine_id: &str, probe: &Probe, config: &WorkerConfig) -> Capabilities {
    let gpu = plan.gpu.and_then(|i| probe.gpus.iter().find(|g| g.index == i));
    let hardware = Hardware {
        gpu_count: u32::from(gpu.is_some()),
        gpu_memory_gb: gpu.map_or(0.0, |g| g.memory_gb() as f64),
        gpu_model: gpu.map_or_else(String::new, |g| g.name.clone()),
        ram_gb: probe.host.ram_gb() as f64,
        cpu_cores: probe.host.cpu_cores,
        extra: serde_json::Map::new(),
    };
    let mut caps = Capabilities::new(plan.id.clone(), machine_id.to_owned(), &[]);
    caps.connectors = plan.connectors.iter().map(|c| c.kind.name().to_owned()).collect();
    caps.job_service_required_map = plan.job_services();
    caps.hardware = hardware;
    caps.customer_access = CustomerAccess {
        isolation: config.customer_access.isolation,
        allowed_customers: config.customer_access.allowed_customers.clone(),
        denied_customers: config.customer_access.denied_customers.clone(),
    };
    caps.workflow_id = config.workflow_id.clone();
    caps.custom = config.capabilities.clone();
    caps
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::{GpuInfo, HostInfo};
    use crate::plan::{ConnectorPlan, Endpoint, WorkerKind};

    #[test]
    fn capabilities_come_from_the_plan_the_probe_and_the_disk() {
        // How a models folder is read is models::disk's (its tests); here, only which folder.
        let dir = tempfile::tempdir().unwrap();
        let models = dir.path().join("ComfyUI/models");
        std::fs::create_dir_all(models.join("checkpoints")).unwrap();
        std::fs::write(models.join("checkpoints/sd15.safetensors"), b"x").unwrap();
        let found = scan_models(&models);
        assert!(!found.is_empty());

        let probe = Probe::from_parts(
            vec![GpuInfo {
                index: 1,
                name: "NVIDIA GeForce RTX 4090".into(),
                uuid: None,
                memory_total_bytes: 24 << 30,
                memory_free_bytes: 0,
            }],
            HostInfo {
                cpu_cores: 16,
                ram_total_bytes: 64 << 30,
                ram_available_bytes: 0,
                disk_free_bytes: None,
            },
        );
        let plan = WorkerPlan {
            id: "m1-gpu1".into(),
            gpu: Some(1),
            kind: WorkerKind::Gpu,
            connectors: vec![ConnectorPlan {
                kind: ConnectorKind::Comfyui,
                job_services: vec!["comfyui".into()],
                endpoint: Some(Endpoint {
                    service: "comfyui-gpu1".into(),
                    url: url::Url::parse("http://127.0.0.1:8189").unwrap(),
                }),
            }],
            waits_for: vec!["comfyui-gpu1".into()],
        };
        let config = crate::config::Config::for_tests(&[]).machine.worker;
        let caps = build(&plan, "m1", &probe, &config);
        assert_eq!(caps.hardware.gpu_count, 1);
        assert_eq!(caps.hardware.gpu_memory_gb, 24.0);
        assert_eq!(caps.hardware.gpu_model, "NVIDIA GeForce RTX 4090");
        assert_eq!(caps.hardware.ram_gb, 64.0);
        assert_eq!(caps.hardware.cpu_cores, 16);
        assert!(caps.models.is_empty(), "the worker scans its models when it starts");
        assert_eq!(ModelDirs::of(&plan, dir.path()).scan()["comfyui"], found);
        assert_eq!(caps.job_service_required_map, ["comfyui"]);
        assert_eq!(caps.connectors, ["comfyui"]);
        assert_eq!(caps.customer_access.isolation, crate::config::Isolation::Loose);
        let external = WorkerPlan { gpu: None, ..plan };
        assert_eq!(build(&external, "m1", &probe, &config).hardware.gpu_count, 0);
    }
}

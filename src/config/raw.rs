//! The TOML document as serde structs; an unknown key is reported by the loader (`super::load`,
//! through `serde_ignored`), not refused here. What is read is the embedded
//! `config/default.toml` with the user's file merged over it and the environment written over
//! both, so every key the default file sets is present here; keys that may be unset are
//! `Option`. Every section whose checked form has the shape it is written in deserializes
//! straight into its `super::model` type (the checks then normalise it in place). What is raw
//! here is written in another shape than the machine uses it: the document root and
//! `[machine]` (folded into `Config`; `worker_connectors` parsed into a list), `[redis]` (a URL
//! checked into `RedisUrl`), `[health]` (the port and the access rules), `[install]` (its timeout
//! is the machine's) and `[connectors.*]` of the services (into a service connector's settings,
//! the warm-up read). `[services.*]` with their probes are `super::service`'s, raw and checked.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::model::{
    ComfyuiInstallConfig, GpuOverrides, LogConfig, ModelsConfig, PlaywrightInstallConfig, SupervisorConfig,
};

/// The built-in configuration, also the reference for every key.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Writes `over` into `base` key by key: a table merges into a table, anything else replaces.
pub(super) fn merge(base: &mut toml::Table, over: toml::Table) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (Some(toml::Value::Table(b)), toml::Value::Table(o)) => merge(b, o),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawConfig {
    pub machine: RawMachine,
    pub redis: RawRedis,
    pub health: RawHealth,
    pub gpu: GpuOverrides,
    pub install: RawInstall,
    pub log: LogConfig,
    pub supervisor: SupervisorConfig,
    pub connectors: RawConnectors,
    pub worker: super::worker::WorkerConfig,
    pub models: ModelsConfig,
    #[serde(default)]
    pub services: BTreeMap<String, super::service::RawService>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawMachine {
    pub id: Option<String>,
    pub workspace: PathBuf,
    pub worker_connectors: String,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawRedis {
    pub url: Option<String>,
    #[serde(default)]
    pub sentinels: Vec<String>,
    pub sentinel_master: Option<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawHealth {
    pub port: u16,
    pub open_logs: bool,
    pub guard_status: bool,
    pub guard_metrics: bool,
    pub metrics_customers: Vec<String>,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawInstall {
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    pub concurrency: usize,
    pub strict: bool,
    pub comfyui: ComfyuiInstallConfig,
    pub playwright: PlaywrightInstallConfig,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawConnectors {
    pub comfyui: RawServiceConnector,
    pub a1111: RawServiceConnector,
    pub playwright: RawPlaywright,
    pub openai: super::worker::OpenaiConfig,
    pub replicate: super::apis::ReplicateConfig,
    pub runpod: super::apis::RunpodConfig,
    pub simulation: super::worker::SimulationConfig,
}

/// `[connectors.comfyui]` and `[connectors.a1111]`: their warm-up is written as a file path
/// (ComfyUI) or a prompt (A1111) and checked into a [`super::model::Warmup`].
#[derive(Debug, Deserialize)]
pub(crate) struct RawServiceConnector {
    pub base_port: u16,
    pub extra_args: Vec<String>,
    pub command: Option<Vec<String>>,
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    #[serde(default)]
    pub restart_above_rss: Option<u64>,
    #[serde(default)]
    pub restart_above_idle_vram: Option<u64>,
    #[serde(default)]
    pub restart_every_jobs: Option<u32>,
    #[serde(default)]
    pub warmup: Option<String>,
    #[serde(with = "humantime_serde")]
    pub idle_wait: Duration,
}

#[derive(Debug, Deserialize)]
pub(crate) struct RawPlaywright {
    pub base_port: u16,
    pub command: Option<Vec<String>>,
    #[serde(with = "humantime_serde")]
    pub stall_timeout: Duration,
    #[serde(default)]
    pub restart_above_rss: Option<u64>,
    #[serde(default)]
    pub restart_above_idle_vram: Option<u64>,
    #[serde(default)]
    pub restart_every_jobs: Option<u32>,
    #[serde(with = "humantime_serde")]
    pub idle_wait: Duration,
}

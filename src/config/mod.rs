//! Configuration: the embedded default TOML, the user's file merged over it, environment
//! variables over both, validated into one [`Config`] before anything runs.
//!
//! [`load`] is the one loader (`machine run`, `config check`, `install`, `gpus`, a reload);
//! [`locate`] reads only where the machine is, leniently, for the commands that talk to it.
//! [`Config`] is split by type into what only a restart applies ([`MachineConfig`]) and what
//! the plan is built from ([`PlanConfig`]); [`Config::changes`] compares two typed values.
//!
//! [`load`] has no side effects beyond reading files. It reports every problem at once, each
//! naming the TOML key it is about, or the environment variable when one set the value, so an
//! operator fixes a bad deployment in one round.

mod apis;
mod changes;
mod connectors;
mod credentials;
mod enums;
mod env;
mod error;
mod load;
mod locate;
mod model;
mod overlay;
mod raw;
mod service;
mod validate;
mod worker;

pub use apis::{Budget, Limits, Prices, Rate, ReplicateConfig, RunpodConfig, parse_model_ref, valid_endpoint_id};
pub use changes::Changes;
pub use connectors::{ConnectorKind, ConnectorList, ConnectorRequest};
pub use credentials::{CATALOGUE_TOKEN, Credentials, is_storage_secret, is_storage_var, secret, storage_vars};
pub use env::{Env, ProcessEnv};
pub use error::{ConfigError, Problem};
pub use load::{load, load_in, load_str, warnings};
pub use locate::{CONNECTORS_FILE, Location, locate};
pub use model::{
    ComfyuiInstallConfig, Config, DeviceSelector, GpuOverrides, HealthAccess, InstallConfig, LogConfig, LogFormat,
    MachineConfig, ModelsConfig, OnFault, PlanConfig, PlaywrightInstallConfig, RedisUrl, Secret, SentinelTarget,
    ServiceConnectorConfig, SupervisorConfig, VisibleDevices, Warmup,
};
pub use overlay::variables;
pub use raw::DEFAULT_TOML;
pub use service::{ProbeCheck, ProbeSpec, RestartPolicy, ServiceSpec};
pub use validate::MAX_GPUS;
pub use worker::{CustomerAccess, Isolation, OpenaiConfig, Quarantine, SimulationConfig, WorkerConfig};

//! `machine run`: load and validate everything, then hand the machine to [`crate::app::run`]
//! on a runtime with a thread per core.

use std::path::Path;

use super::common::{Threads, block_on};
use super::config_check::checked_programs;
use super::exit::{CliError, Outcome};
use crate::config::ConfigError;
use crate::gpu::Probe;
use crate::plan::Plan;

/// Runs the machine until it stops; its exit code is the app's.
pub(super) fn run(path: Option<&Path>) -> Result<Outcome, CliError> {
    // `<workspace>/worker_connectors`, which a reload reads, overrides WORKER_CONNECTORS here too,
    // so that a restart keeps what the last reload applied.
    let config = crate::config::load(path, &crate::config::ProcessEnv).map_err(CliError::Config)?;
    crate::logging::init(&config.machine.log);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let probe = Probe::run(
        &config.machine.gpu,
        &config.machine.visible_devices,
        &config.machine.workspace,
    );
    for note in &probe.notes {
        tracing::info!(target: "machine::gpu", "{note}");
    }
    let plan = Plan::build(&config, &probe)
        .and_then(checked_programs)
        .map_err(|problems| CliError::Plan(ConfigError::Invalid(problems)))?;
    block_on(Threads::PerCore, crate::app::run(config, probe, plan, path)).map(Outcome::Machine)
}

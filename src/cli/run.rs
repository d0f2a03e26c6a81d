//! `machine run`: load and validate everything, then hand the machine to [`crate::app::run`]
//! on a runtime with a thread per core.

use std::path::Path;

use super::commands::{Threads, block_on, load_config};
use super::config_check::checked_programs;
use super::exit::{CliError, Outcome};
use crate::config::ConfigError;
use crate::gpu::Probe;
use crate::plan::Plan;

/// Runs the machine until it stops; its exit code is the app's.
pub(super) fn run(path: Option<&Path>) -> Result<Outcome, CliError> {
    let config = load_config(path)?;
    crate::logging::init(&config.log);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let probe = Probe::run(&config.gpu, &config.visible_devices, &config.workspace);
    for note in &probe.notes {
        tracing::info!(target: "machine::gpu", "{note}");
    }
    let plan = Plan::build(&config, &probe)
        .and_then(checked_programs)
        .map_err(|problems| CliError::Plan(ConfigError::Invalid(problems)))?;
    block_on(Threads::PerCore, crate::app::run(config, probe, plan)).map(Outcome::Machine)
}

//! Dispatch of the parsed command line to the command files. What the commands share is
//! `super::common`'s, so no command file imports the dispatcher that calls it.

use super::args::{Cli, Command, ConfigCommand, QuarantineCommand};
use super::common::machine_redis;
use super::exit::{CliError, Outcome};

/// Runs the command `cli` names (`machine run` when it names none).
pub fn run(cli: Cli) -> Result<Outcome, CliError> {
    let path = cli.config.as_deref();
    match cli.command.unwrap_or(Command::Run) {
        Command::Config {
            command: ConfigCommand::Check { json, diff, url },
        } => super::config_check::config_check(path, json, diff.then_some(url)),
        Command::Reload { json, machine } => super::reload::reload(path, &machine, json),
        Command::Gpus { json } => super::gpus::gpus(path, json),
        Command::Run => super::run::run(path),
        Command::Status(args) => super::status::status(path, &args),
        Command::Install { only } => super::install::install(path, only),
        Command::Functions { redis, command } => super::functions::functions(&redis, &command, machine_redis(path)),
        Command::Jobs { redis, command } => super::jobs::jobs(&redis, &command, machine_redis(path)),
        Command::Logs(args) => super::control::logs(path, &args),
        Command::Restart { service, machine } => super::control::restart(path, &machine, &service),
        Command::Quarantine {
            command: QuarantineCommand::Clear { worker, machine },
        } => super::control::clear_quarantine(path, &machine, worker.as_deref()),
        Command::Stop { now, no_wait, machine } => super::control::stop(path, &machine, now, !no_wait),
    }
}

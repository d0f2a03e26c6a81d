//! How a command ended, the one mapping from that to the process exit code, and the one way an
//! error reaches the operator: `machine: ` and the error with its causes on one line
//! ([`crate::logging::error_chain`]).

use std::process::ExitCode;

use super::connect::MachineError;
use crate::app::Ended;
use crate::broker::BrokerError;
use crate::config::ConfigError;
use crate::health::client::ClientError;

/// Exit code of a runtime failure.
const EXIT_FAILURE: u8 = 1;
/// Exit code of invalid configuration or usage (clap exits with it too on a usage error).
const EXIT_INVALID: u8 = 2;
/// Exit code of `machine run` when a `critical` service failed and took the machine down.
const EXIT_CRITICAL: u8 = 3;
/// Exit code of `machine run` when a second SIGTERM/SIGINT stopped everything at once.
const EXIT_FORCED: u8 = 4;
/// Exit code of `machine run` when a GPU faulted and `gpu.on_fault = "exit"`.
const EXIT_GPU_FAULT: u8 = 5;

/// How a command that ran to its end ended.
#[derive(Debug)]
pub enum Outcome {
    /// It did what it was asked.
    Success,
    /// It failed and has said why on its own output (an unhealthy `status --check`, a failed
    /// installer's line).
    Failed,
    /// It found the configuration invalid and has listed the problems on its own output
    /// (`config check --json`).
    Invalid,
    /// `machine run` ended so (its log says why).
    Machine(Ended),
}

/// Why a command did not run to its end.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The configuration failed to load or is invalid; the configuration's warnings follow it.
    #[error(transparent)]
    Config(ConfigError),
    /// The configuration loads but the plan derived from it is invalid.
    #[error(transparent)]
    Plan(ConfigError),
    /// The arguments make no sense together, or name something unusable.
    #[error("{0}")]
    Usage(String),
    /// The async runtime could not be built.
    #[error("failed to start the async runtime")]
    Runtime(#[source] std::io::Error),
    /// The broker's Redis failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
    /// The health server or the fleet's status could not be read.
    #[error(transparent)]
    Status(#[from] ClientError),
    /// The running machine could not be reached, or refused.
    #[error(transparent)]
    Machine(#[from] MachineError),
    /// The command ran into an answer it cannot proceed with (no such job, a failed self-test).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    fn code(&self) -> u8 {
        match self {
            CliError::Config(_) | CliError::Plan(_) | CliError::Usage(_) => EXIT_INVALID,
            CliError::Runtime(_)
            | CliError::Broker(_)
            | CliError::Status(_)
            | CliError::Machine(_)
            | CliError::Failed(_) => EXIT_FAILURE,
        }
    }
}

/// Prints `error` to stderr as the operator reads every error: `machine: ` and its causes.
/// Once `LOG_FORMAT=json` is set up it is a JSON log event instead, so that every line of
/// `machine run` parses.
pub(super) fn print_error(error: &dyn std::error::Error) {
    match crate::logging::format() {
        crate::config::LogFormat::Text => eprintln!("machine: {}", crate::logging::error_chain(error)),
        crate::config::LogFormat::Json => tracing::error!("{}", crate::logging::error_chain(error)),
    }
}

impl Outcome {
    fn code(&self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::Failed => EXIT_FAILURE,
            Outcome::Invalid => EXIT_INVALID,
            Outcome::Machine(ended) => match ended {
                Ended::Stopped => 0,
                Ended::FailedToStart => EXIT_FAILURE,
                Ended::CriticalFailed => EXIT_CRITICAL,
                Ended::Forced => EXIT_FORCED,
                Ended::GpuFault => EXIT_GPU_FAULT,
            },
        }
    }
}

/// The exit code of a command's result; an error is printed first.
pub fn exit_code(result: Result<Outcome, CliError>) -> ExitCode {
    match result {
        Ok(outcome) => ExitCode::from(outcome.code()),
        Err(e) => {
            print_error(&e);
            if matches!(e, CliError::Config(_)) {
                print_warnings();
            }
            ExitCode::from(e.code())
        }
    }
}

/// Prints the configuration's warnings (unknown variables) to stderr, where a configuration
/// that failed to load is reported too.
pub(super) fn print_warnings() {
    for w in crate::config::warnings(&crate::config::ProcessEnv) {
        eprintln!("machine: warning: {w}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_map_to_the_documented_codes() {
        let invalid = ConfigError::Invalid(Vec::new());
        assert_eq!(CliError::Config(invalid).code(), 2);
        assert_eq!(CliError::Usage("no Redis".into()).code(), 2);
        assert_eq!(CliError::Failed("no job j1".into()).code(), 1);
        assert_eq!(CliError::Runtime(std::io::Error::other("no threads")).code(), 1);
    }

    /// Every code a command can end with, from the one mapping above; `Ended`'s variants are
    /// listed through a match, so a new way to end fails to compile here until it is listed.
    fn every_code() -> std::collections::BTreeSet<u8> {
        let every_ended = [
            Ended::Stopped,
            Ended::FailedToStart,
            Ended::CriticalFailed,
            Ended::Forced,
            Ended::GpuFault,
        ];
        for e in &every_ended {
            match e {
                Ended::Stopped | Ended::FailedToStart | Ended::CriticalFailed | Ended::Forced | Ended::GpuFault => {}
            }
        }
        let errors = [CliError::Usage(String::new()), CliError::Failed(String::new())];
        [Outcome::Success, Outcome::Failed, Outcome::Invalid]
            .into_iter()
            .chain(every_ended.into_iter().map(Outcome::Machine))
            .map(|o| o.code())
            .chain(errors.iter().map(CliError::code))
            .collect()
    }

    /// The numbers standing alone in `text` (a code list in words).
    fn numbers(text: &str) -> std::collections::BTreeSet<u8> {
        text.split(|c: char| !c.is_ascii_digit())
            .filter_map(|n| n.parse().ok())
            .collect()
    }

    /// The exit-code lists an operator reads (this module's doc, the README, the supervisor's
    /// doc) name exactly the codes the mapping returns.
    #[test]
    fn the_documented_exit_codes_are_the_ones_returned() {
        let codes = every_code();
        assert_eq!(codes, (0..=5).collect());
        let paragraph = |text: &'static str, start: &str| -> String {
            let from = &text[text.find(start).unwrap_or_else(|| panic!("`{start}` is in the doc"))..];
            from.split("\n\n").next().unwrap().replace("//!", "")
        };
        let module = paragraph(include_str!("mod.rs"), "//! Exit codes:");
        assert_eq!(numbers(&module), codes, "cli/mod.rs: {module}");
        let readme = paragraph(include_str!("../../README.md"), "Exit codes of `machine run`:");
        assert_eq!(numbers(&readme), codes, "README.md: {readme}");
        let table = paragraph(include_str!("../../docs/supervisor.md"), "| code | meaning |");
        let rows: std::collections::BTreeSet<u8> = table
            .lines()
            .filter_map(|l| l.strip_prefix("| ")?.split(' ').next()?.parse().ok())
            .collect();
        assert_eq!(rows, codes, "docs/supervisor.md: {table}");
    }
}

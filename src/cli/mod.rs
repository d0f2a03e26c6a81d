//! The command line, the one edge of the program that prints to the operator and chooses exit
//! codes: it parses the arguments ([`Cli`]), loads and validates the configuration without side
//! effects, builds the one async runtime a command needs, runs the command, and maps how it
//! ended to the exit code ([`exit_code`]). The subsystems it calls return typed errors.
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 invalid configuration or usage; `machine run`
//! adds 3 (a critical service failed), 4 (a forced stop) and 5 (a GPU faulted with
//! `gpu.on_fault = "exit"`).

mod args;
mod commands;
mod common;
mod config_check;
mod connect;
mod control;
mod exit;
mod functions;
mod gpus;
mod install;
mod jobs;
mod reload;
mod run;
mod status;
mod status_view;

pub use args::Cli;
pub use commands::run;
pub use exit::{CliError, Outcome, exit_code};

//! The `machine` binary: parse the command line, run the command, map how it ended to the exit
//! code. Everything else lives in the library, behind [`machine::cli`].

use clap::Parser as _;

fn main() -> std::process::ExitCode {
    let cli = machine::cli::Cli::parse();
    machine::cli::exit_code(machine::cli::run(cli))
}

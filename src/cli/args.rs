//! The grammar of the command line (clap): every command, subcommand and flag, and nothing
//! that acts on them.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::broker::JobState;
use crate::installers::Installer;

/// `machine [--config PATH] [COMMAND]`.
#[derive(Debug, Parser)]
#[command(
    name = "machine",
    version,
    about = "PID 1 of a GPU worker container: installs, supervises and runs job workers"
)]
pub struct Cli {
    /// Configuration file merged over the built-in defaults.
    #[arg(long, global = true, env = "MACHINE_CONFIG", value_name = "PATH")]
    pub(super) config: Option<PathBuf>,

    #[command(subcommand)]
    pub(super) command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub(super) enum Command {
    /// Run the machine (the default with no arguments, e.g. as a container ENTRYPOINT).
    #[command(after_help = settings_help())]
    Run,
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Install what WORKER_CONNECTORS needs (ComfyUI, custom nodes, models, Playwright) without
    /// starting anything, e.g. in a Docker build stage.
    Install {
        /// Run only this installer.
        #[arg(long, value_name = "NAME")]
        only: Option<Installer>,
    },
    /// Print the GPU and host probe.
    Gpus {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Manage the jobMatching Redis Functions library.
    Functions {
        #[command(flatten)]
        redis: RedisArgs,
        #[command(subcommand)]
        command: FunctionsCommand,
    },
    /// Submit, inspect and cancel jobs on the broker.
    Jobs {
        #[command(flatten)]
        redis: RedisArgs,
        #[command(subcommand)]
        command: JobsCommand,
    },
    /// Show this machine's status, or the fleet's (from Redis).
    Status(StatusArgs),
    /// Print a service's output, or the machine's own log, with a timestamp on every line.
    Logs(LogsArgs),
    /// Restart a supervised service (stop it, then start it at once).
    Restart {
        /// The service, as `machine status` names it.
        service: String,
        #[command(flatten)]
        machine: MachineArgs,
    },
    /// Manage the workers' quarantines.
    Quarantine {
        #[command(subcommand)]
        command: QuarantineCommand,
    },
    /// Stop the machine: workers finish or return their jobs within the drain period, then the
    /// services stop, as on SIGTERM. Waits until the machine has exited, printing the drain's
    /// progress, as `systemctl stop` and `docker stop` do.
    Stop {
        /// Skip the drain, as a second SIGTERM does: jobs go back to the queue at once and the
        /// services are killed.
        #[arg(long)]
        now: bool,
        /// Return as soon as the machine has accepted the request, without waiting for it to exit.
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        machine: MachineArgs,
    },
    /// Reload the running machine's configuration (and <workspace>/worker_connectors) without a
    /// restart: only what changed is stopped, started or rebuilt. Through the control socket, or
    /// over TCP with MACHINE_CONTROL_TOKEN.
    Reload {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        machine: MachineArgs,
    },
}

#[derive(Debug, Subcommand)]
pub(super) enum QuarantineCommand {
    /// Lift a worker's quarantine now (every quarantined worker's without WORKER): it claims
    /// again, its failures so far forgotten. Through the control socket, or over TCP with
    /// MACHINE_CONTROL_TOKEN.
    Clear {
        /// The worker, as `machine status` names it.
        worker: Option<String>,
        #[command(flatten)]
        machine: MachineArgs,
    },
}

/// Where the commands that talk to a running machine find it: its control socket
/// (`<workspace>/run/control.sock`), else its health port on 127.0.0.1.
#[derive(Debug, Args)]
pub(super) struct MachineArgs {
    /// Talk to the machine whose health server is at this URL instead (over TCP, with
    /// MACHINE_CONTROL_TOKEN or MACHINE_READ_TOKEN).
    #[arg(long, value_name = "URL")]
    pub url: Option<String>,
}

/// `machine logs`.
#[derive(Debug, Args)]
pub(super) struct LogsArgs {
    /// A service, or `machine` for the machine's own log.
    #[arg(default_value = "machine", value_name = "SERVICE|machine")]
    pub name: String,
    /// Keep printing new lines as they come (until Ctrl-C or the machine stops).
    #[arg(short, long)]
    pub follow: bool,
    /// Start with the last N lines.
    #[arg(short = 'n', long = "lines", default_value_t = 100, value_name = "N")]
    pub lines: usize,
    #[command(flatten)]
    pub machine: MachineArgs,
}

#[derive(Debug, Subcommand)]
pub(super) enum ConfigCommand {
    /// Validate the configuration and print the plan; exits 2 listing every problem.
    Check {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Also print what a reload would change on the running machine (read from its
        /// health server's `/plan`).
        #[arg(long)]
        diff: bool,
        /// Base URL of the running machine's health server, for --diff
        /// [default: http://127.0.0.1:<MACHINE_HEALTH_PORT>].
        #[arg(long, requires = "diff")]
        url: Option<String>,
    },
}

#[derive(Debug, Args)]
pub(super) struct StatusArgs {
    #[command(flatten)]
    pub machine: MachineArgs,
    /// Print the status document as JSON.
    #[arg(long)]
    pub json: bool,
    /// Refresh every 2 seconds.
    #[arg(long)]
    pub watch: bool,
    /// Exit 0 when the machine is healthy and 1 when not (for a Docker HEALTHCHECK); a Redis
    /// that fails makes the machine not ready, never unhealthy (the reason is printed).
    #[arg(long, conflicts_with_all = ["json", "watch", "fleet"])]
    pub check: bool,
    /// With `--check`: exit 1 also when the machine is not ready (no worker can claim), for
    /// orchestrators that route on readiness.
    #[arg(long, requires = "check")]
    pub ready: bool,
    /// Read every machine's status from Redis instead (HUB_REDIS_URL or --redis-url, else this
    /// machine's own Redis).
    #[arg(long)]
    pub fleet: bool,
    #[command(flatten)]
    pub redis: RedisArgs,
}

/// Where the broker's Redis is.
#[derive(Debug, Args)]
pub(super) struct RedisArgs {
    /// The broker's Redis URL (`redis://` or `rediss://`, with credentials if needed).
    #[arg(
        long,
        global = true,
        env = "HUB_REDIS_URL",
        value_name = "URL",
        hide_env_values = true
    )]
    pub redis_url: Option<String>,
}

/// `machine functions ...`
#[derive(Debug, Subcommand)]
pub(super) enum FunctionsCommand {
    /// Load the jobMatching library if the loaded version differs, then verify it.
    Install,
    /// Show the loaded library's version and functions.
    List,
    /// Delete the jobMatching library.
    Delete,
    /// Self-check: claims and lifecycle against a scratch key prefix, compared with the
    /// reference matcher. Leaves no keys behind.
    Test,
}

/// `machine jobs ...`
#[derive(Debug, Subcommand)]
pub(super) enum JobsCommand {
    /// Submit a job exactly as the API does; prints its id.
    Submit {
        /// `service_required`, e.g. `simulation`.
        #[arg(long)]
        service: String,
        /// The payload: JSON, or `@FILE` to read it from a file.
        #[arg(long, default_value = "{}")]
        payload: String,
        /// Requirements JSON.
        #[arg(long)]
        requirements: Option<String>,
        /// Priority (higher runs first).
        #[arg(long, default_value_t = 50)]
        priority: i64,
        /// Customer id.
        #[arg(long, default_value = "")]
        customer: String,
        /// Workflow id.
        #[arg(long, default_value = "")]
        workflow: String,
        /// Retries allowed after the first attempt fails retryably (0: one attempt only). The
        /// default, 2, is the API's: its `max_retries` of 3 counts attempts.
        #[arg(long, default_value_t = 2, value_name = "N")]
        max_retries: u32,
    },
    /// Print a job: its fields, progress, result and artifact URLs, or why it failed.
    Show {
        /// The job id.
        id: String,
        /// Print JSON with typed values (numbers, and the payload and result as JSON).
        #[arg(long)]
        json: bool,
    },
    /// List jobs, newest first.
    List {
        /// Only jobs with this status (`cancelled`: jobs the API cancelled, which it stores as
        /// failed).
        #[arg(long, value_parser = job_state())]
        status: Option<JobState>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a job as the API does.
    Cancel {
        /// The job id.
        id: String,
    },
    /// Claim one job as a worker and hold it (renewing its lease) until SIGINT/SIGTERM, then
    /// return it to the queue; prints the job id. For debugging matching and leases.
    Claim {
        /// Services the worker accepts (repeat or comma-separate).
        #[arg(long, value_delimiter = ',', required = true)]
        service: Vec<String>,
        /// The worker id.
        #[arg(long, default_value = "operator")]
        worker: String,
        /// Full capabilities JSON instead of --service/--worker.
        #[arg(long)]
        capabilities: Option<String>,
        /// Lease length in seconds.
        #[arg(long, default_value_t = 60)]
        lease_secs: u64,
    },
}

/// A job status as `jobs list --status` takes it: the broker's [`JobState`], named by the
/// contract's words (unknown words refused with the list).
fn job_state() -> impl clap::builder::TypedValueParser<Value = JobState> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(JobState::WORDS)
        .map(|word| JobState::named(&word).expect("the parser admits only the contract's words"))
}

/// The `run --help` list of every setting's environment variable, from the configuration's own
/// table of them: the one place settings are read from the environment. What else reads it is
/// no setting: `NO_COLOR` (logging), `COLUMNS` (`machine status`), `PATH` (finding programs),
/// and the variables passed on to services and installers (`supervisor::env`).
fn settings_help() -> String {
    use std::fmt::Write as _;
    let vars = crate::config::variables();
    let width = vars.iter().map(|(v, _)| v.len()).max().unwrap_or(0);
    let mut help = String::from(
        "Settings: the built-in defaults, then the file of --config (MACHINE_CONFIG), then these \
         environment variables (variable: the configuration key it sets):\n",
    );
    for (var, key) in vars {
        let _ = writeln!(help, "  {var:<width$}  {key}");
    }
    help.push_str("\n`machine config check` prints the resulting configuration.");
    help
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grammar_is_consistent() {
        use clap::CommandFactory as _;
        Cli::command().debug_assert();
    }

    #[test]
    fn installers_are_named_on_the_command_line() {
        let cli = Cli::try_parse_from(["machine", "install", "--only", "comfyui-models"]).expect("a known installer");
        assert!(matches!(
            cli.command,
            Some(Command::Install {
                only: Some(Installer::ComfyuiModels)
            })
        ));
        let err = Cli::try_parse_from(["machine", "install", "--only", "nope"]).expect_err("an unknown installer");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("comfyui-models"), "{err}");
    }

    #[test]
    fn job_statuses_are_the_contracts_words() {
        let cli = Cli::try_parse_from(["machine", "jobs", "list", "--status", "in_progress"]).expect("a status");
        assert!(matches!(
            cli.command,
            Some(Command::Jobs {
                command: JobsCommand::List {
                    status: Some(JobState::InProgress),
                    ..
                },
                ..
            })
        ));
        let err = Cli::try_parse_from(["machine", "jobs", "list", "--status", "done"]).expect_err("unknown");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("cancelled"), "{err}");
    }
}

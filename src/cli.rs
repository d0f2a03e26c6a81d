//! The command line: parses arguments, loads and validates the configuration without side
//! effects, builds the runtime, runs the chosen command and maps its outcome to an exit code.
//!
//! Exit codes: 0 success, 1 a runtime failure, 2 invalid configuration or usage.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::config::{self, Config, ConfigError, ProcessEnv};
use crate::gpu::Probe;
use crate::plan::Plan;

/// Exit code for invalid configuration or usage.
const EXIT_INVALID: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "machine",
    version,
    about = "PID 1 of a GPU worker container: installs, supervises and runs job workers"
)]
struct Cli {
    /// Configuration file merged over the built-in defaults.
    #[arg(long, global = true, env = "MACHINE_CONFIG", value_name = "PATH")]
    config: Option<PathBuf>,

    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the machine (the default with no arguments, e.g. as a container ENTRYPOINT).
    Run,
    /// Inspect the configuration.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Install what WORKER_CONNECTORS needs (ComfyUI, custom nodes, models, Playwright) without
    /// starting anything, e.g. in a Docker build stage.
    Install {
        /// Run only this installer: comfyui, comfyui-nodes, comfyui-models or playwright.
        #[arg(long, value_name = "NAME")]
        only: Option<String>,
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
        redis: crate::matcher::cli::RedisArgs,
        #[command(subcommand)]
        command: crate::matcher::cli::FunctionsCommand,
    },
    /// Submit, inspect and cancel jobs on the broker.
    Jobs {
        #[command(flatten)]
        redis: crate::matcher::cli::RedisArgs,
        #[command(subcommand)]
        command: crate::matcher::cli::JobsCommand,
    },
    /// Show this machine's status (from its health server), or the fleet's (from Redis).
    Status(StatusArgs),
}

#[derive(Debug, clap::Args)]
struct StatusArgs {
    /// Base URL of the machine's health server [default: http://127.0.0.1:<MACHINE_HEALTH_PORT>].
    #[arg(long)]
    url: Option<String>,
    /// Print the status document as JSON.
    #[arg(long)]
    json: bool,
    /// Refresh every 2 seconds.
    #[arg(long)]
    watch: bool,
    /// Exit 0 when the machine is healthy and 1 when not (for a Docker HEALTHCHECK).
    #[arg(long, conflicts_with_all = ["json", "watch", "fleet"])]
    check: bool,
    /// Read every machine's status from Redis instead (HUB_REDIS_URL or --redis-url).
    #[arg(long)]
    fleet: bool,
    /// Redis URL for --fleet.
    #[arg(long, env = "HUB_REDIS_URL", hide_env_values = true)]
    redis_url: Option<String>,
}

#[derive(Debug, Subcommand)]
enum ConfigCommand {
    /// Validate the configuration and print the plan; exits 2 listing every problem.
    Check {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Run) {
        Command::Config {
            command: ConfigCommand::Check { json },
        } => config_check(cli.config.as_deref(), json),
        Command::Gpus { json } => gpus(cli.config.as_deref(), json),
        Command::Run => run(cli.config.as_deref()),
        Command::Status(args) => status(cli.config.as_deref(), args),
        Command::Install { only } => install(cli.config.as_deref(), only.as_deref()),
        Command::Functions { redis, command } => {
            crate::matcher::cli::functions(&redis, &command, machine_redis(cli.config.as_deref()))
        }
        Command::Jobs { redis, command } => {
            crate::matcher::cli::jobs(&redis, &command, machine_redis(cli.config.as_deref()))
        }
    }
}

fn status(path: Option<&Path>, args: StatusArgs) -> ExitCode {
    use crate::health::client;
    // The status command must work even when the configuration is broken, so it only takes
    // the port from it when it loads.
    let base = args.url.clone().unwrap_or_else(|| {
        let port = config::load(path, &ProcessEnv).map_or(9092, |c| c.health_port);
        format!("http://127.0.0.1:{port}")
    });
    let base = base.trim_end_matches('/').trim_end_matches("/status").to_owned();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("machine: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        if args.check {
            return match client::check(&base).await {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(line) => {
                    println!("{line}");
                    ExitCode::FAILURE
                }
            };
        }
        loop {
            let shown = if args.fleet {
                let Some(url) = args.redis_url.as_deref() else {
                    eprintln!("machine: --fleet needs HUB_REDIS_URL or --redis-url");
                    return ExitCode::from(EXIT_INVALID);
                };
                client::fleet(url).await
            } else {
                client::fetch(&format!("{base}/status")).await.map(|doc| {
                    if args.json {
                        serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
                    } else {
                        client::render(&doc)
                    }
                })
            };
            match shown {
                Ok(text) => {
                    if args.watch {
                        // Clear the screen and home the cursor before each refresh.
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{text}");
                }
                Err(e) => {
                    eprintln!("machine: {e}");
                    if !args.watch {
                        return ExitCode::FAILURE;
                    }
                }
            }
            if !args.watch {
                return ExitCode::SUCCESS;
            }
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
    })
}

/// This machine's Redis when the configuration loads (in local mode, the private redis-server's
/// socket), for operator commands given no `--redis-url`.
fn machine_redis(path: Option<&Path>) -> Option<config::RedisUrl> {
    config::load(path, &ProcessEnv).ok().map(|c| c.broker_url())
}

/// Loads the configuration, printing every problem when it is invalid.
fn load_config(path: Option<&Path>) -> Result<Config, ExitCode> {
    config::load(path, &ProcessEnv).map_err(|e| {
        // A read error has its cause; invalid configuration lists its problems on lines of
        // their own.
        match &e {
            ConfigError::Read { .. } => eprintln!("machine: {}", crate::logging::error_chain(&e)),
            ConfigError::Invalid(_) => eprintln!("machine: {e}"),
        }
        print_warnings();
        ExitCode::from(EXIT_INVALID)
    })
}

fn config_check(path: Option<&Path>, json: bool) -> ExitCode {
    let config = match config::load(path, &ProcessEnv) {
        Ok(c) => c,
        Err(e) => {
            if json {
                let doc = serde_json::json!({ "valid": false, "error": e.to_string(), "problems": e.problems() });
                print_json(&doc);
            } else {
                eprintln!("machine: {e}");
            }
            print_warnings();
            return ExitCode::from(EXIT_INVALID);
        }
    };
    print_warnings();
    let probe = Probe::run(&config.gpu, &config.visible_devices, &config.workspace);
    match Plan::build(&config, &probe).and_then(checked_programs) {
        Ok(plan) => {
            if json {
                let doc = serde_json::json!({ "valid": true, "config": config, "probe": probe, "plan": plan });
                print_json(&doc);
            } else {
                print!("{}", render_plan(&config, &probe, &plan, path));
            }
            ExitCode::SUCCESS
        }
        Err(problems) => {
            let e = ConfigError::Invalid(problems);
            if json {
                let doc = serde_json::json!({ "valid": false, "error": e.to_string(), "problems": e.problems() });
                print_json(&doc);
            } else {
                eprintln!("machine: {e}");
            }
            ExitCode::from(EXIT_INVALID)
        }
    }
}

fn gpus(path: Option<&Path>, json: bool) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let probe = Probe::run(&config.gpu, &config.visible_devices, &config.workspace);
    if json {
        print_json(&probe);
    } else {
        print!("{}", render_probe(&probe));
    }
    ExitCode::SUCCESS
}

fn install(path: Option<&Path>, only: Option<&str>) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init(&config.log);
    crate::installers::command(&config, only)
}

fn run(path: Option<&Path>) -> ExitCode {
    let config = match load_config(path) {
        Ok(c) => c,
        Err(code) => return code,
    };
    crate::logging::init(&config.log);
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    let probe = Probe::run(&config.gpu, &config.visible_devices, &config.workspace);
    for note in &probe.notes {
        tracing::info!(target: "machine::gpu", "{note}");
    }
    let plan = match Plan::build(&config, &probe).and_then(checked_programs) {
        Ok(p) => p,
        Err(problems) => {
            eprintln!("machine: {}", ConfigError::Invalid(problems));
            return ExitCode::from(EXIT_INVALID);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("machine: failed to start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(crate::app::run(config, probe, plan))
}

/// Prints the configuration's warnings (unknown variables) to stderr, where a configuration
/// that failed to load is reported too.
fn print_warnings() {
    for w in config::warnings(&ProcessEnv) {
        eprintln!("machine: warning: {w}");
    }
}

/// Refuses a plan whose programs are not on `PATH`, before anything starts.
fn checked_programs(plan: Plan) -> Result<Plan, Vec<config::Problem>> {
    let missing = plan.missing_programs();
    if missing.is_empty() { Ok(plan) } else { Err(missing) }
}

fn print_json<T: serde::Serialize>(value: &T) {
    let mut out = std::io::stdout().lock();
    // Serialising our own plain data types cannot fail; a closed stdout is not worth a panic.
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
}

fn gib(bytes: u64) -> String {
    format!("{:.1} GiB", bytes as f64 / (1024.0 * 1024.0 * 1024.0))
}

fn render_probe(probe: &Probe) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let source = match &probe.source {
        crate::gpu::GpuSource::Nvml {
            driver_version,
            cuda_driver_version,
        } => format!(
            "NVML (driver {driver_version}, CUDA {})",
            cuda_driver_version.as_deref().unwrap_or("unknown")
        ),
        crate::gpu::GpuSource::Config => "MACHINE_GPU_* overrides".to_owned(),
        crate::gpu::GpuSource::None => "none".to_owned(),
    };
    let _ = writeln!(s, "GPUs: {} (source: {source})", probe.gpus.len());
    for g in &probe.gpus {
        let _ = writeln!(
            s,
            "  [{}] {:<28} {:>10} total {:>10} free  {}",
            g.index,
            g.name,
            gib(g.memory_total_bytes),
            gib(g.memory_free_bytes),
            g.uuid.as_deref().unwrap_or("-")
        );
    }
    let h = &probe.host;
    let _ = writeln!(
        s,
        "Host: {} CPU cores, {} RAM ({} available), workspace disk {} free",
        h.cpu_cores,
        gib(h.ram_total_bytes),
        gib(h.ram_available_bytes),
        h.disk_free_bytes.map_or_else(|| "unknown".to_owned(), gib)
    );
    for n in &probe.notes {
        let _ = writeln!(s, "note: {n}");
    }
    s
}

fn render_plan(config: &Config, probe: &Probe, plan: &Plan, path: Option<&Path>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "configuration OK ({})",
        path.map_or_else(
            || "built-in defaults and environment".to_owned(),
            |p| format!("{} and environment", p.display())
        )
    );
    let _ = writeln!(s, "machine:    {}", config.machine_id);
    let _ = writeln!(s, "workspace:  {}", config.workspace.display());
    let _ = writeln!(
        s,
        "redis:      {}",
        config
            .redis
            .as_ref()
            .map_or_else(|| "local mode (private redis-server)".to_owned(), |u| u.masked())
    );
    let _ = writeln!(s, "health:     port {}", config.health_port);
    let _ = writeln!(s, "connectors: {}", config.connectors);
    s.push_str(&render_probe(probe));
    let _ = writeln!(s, "workers ({}):", plan.workers.len());
    for w in &plan.workers {
        let connectors: Vec<&str> = w.connectors.iter().map(|c| c.kind.name()).collect();
        let _ = writeln!(
            s,
            "  {:<28} {:<8} {:<28} waits for: {}",
            w.id,
            w.gpu.map_or_else(|| "-".to_owned(), |g| format!("gpu {g}")),
            connectors.join(","),
            if w.waits_for.is_empty() {
                "-".to_owned()
            } else {
                w.waits_for.join(", ")
            }
        );
    }
    let _ = writeln!(s, "services ({}):", plan.services.len());
    for svc in &plan.services {
        let _ = writeln!(
            s,
            "  {:<20} {:<6} {}",
            svc.name,
            svc.port.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            svc.command.join(" ")
        );
    }
    for w in &plan.warnings {
        let _ = writeln!(s, "warning: {w}");
    }
    s
}

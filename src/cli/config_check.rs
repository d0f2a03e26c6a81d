//! `machine config check`: validate the configuration, derive the plan, and print both (as
//! text or JSON), listing every problem when there are any. With `--diff` it also prints what a
//! reload would change on the running machine: the machine itself loads its configuration as a
//! reload would (`POST /reload?dry_run=true`), with its own environment and file, so the shell's
//! variables cannot show changes that are not there.

use std::path::Path;

use super::common::print_json;
use super::exit::print_warnings;
use super::exit::{CliError, Outcome};
use super::gpus::render_probe;
use crate::config::{self, Config, ConfigError, ProcessEnv};
use crate::gpu::Probe;
use crate::plan::Plan;

/// Validates the configuration and the plan; invalid is exit 2. `diff` (`Some(--url)`) adds
/// the plan diff against the running machine.
pub(super) fn config_check(path: Option<&Path>, json: bool, diff: Option<Option<String>>) -> Result<Outcome, CliError> {
    let config = match config::load(path, &ProcessEnv) {
        Ok(c) => c,
        Err(e) if json => {
            print_json(&invalid_document(&e));
            print_warnings();
            return Ok(Outcome::Invalid);
        }
        Err(e) => return Err(CliError::Config(e)),
    };
    print_warnings();
    let probe = Probe::run(
        &config.machine.gpu,
        &config.machine.visible_devices,
        &config.machine.workspace,
    );
    match Plan::build(&config, &probe).and_then(checked_programs) {
        Ok(plan) => {
            let diff = match diff {
                Some(url) => Some(running_diff(path, url)?),
                None => None,
            };
            if json {
                let doc = serde_json::json!({
                    "valid": true, "config": config, "probe": probe, "plan": plan,
                    "diff": diff.as_ref().map(|d| &d.answer),
                });
                print_json(&doc);
            } else {
                print!("{}", render_plan(&config, &probe, &plan, path));
                if let Some(d) = &diff {
                    print!("{}", render_running_diff(d, path));
                }
            }
            Ok(match &diff {
                Some(d) if d.refused => Outcome::Invalid,
                _ => Outcome::Success,
            })
        }
        Err(problems) => {
            let e = ConfigError::Invalid(problems);
            if json {
                print_json(&invalid_document(&e));
                Ok(Outcome::Invalid)
            } else {
                Err(CliError::Plan(e))
            }
        }
    }
}

/// The running machine's answer to a dry-run reload.
struct RunningDiff {
    /// The report (200) or the refusal with its problems (422), as the machine wrote it.
    answer: serde_json::Value,
    /// Whether the machine would refuse its configuration.
    refused: bool,
}

/// Asks the running machine what a reload would change (`POST /reload?dry_run=true`): it loads
/// its own configuration file with its own environment, exactly as a reload does.
fn running_diff(path: Option<&Path>, url: Option<String>) -> Result<RunningDiff, CliError> {
    let target = super::connect::Target::find(path, url.as_deref())?;
    let (status, body) = super::common::block_on(super::common::Threads::One, async move {
        target
            .exchange(
                hyper::Method::POST,
                "/reload?dry_run=true",
                std::time::Duration::from_secs(30),
            )
            .await
    })??;
    let text = String::from_utf8_lossy(&body).into_owned();
    let answer: serde_json::Value =
        serde_json::from_str(&text).unwrap_or_else(|_| serde_json::json!({ "error": text }));
    match status.as_u16() {
        200 => Ok(RunningDiff { answer, refused: false }),
        422 => Ok(RunningDiff { answer, refused: true }),
        code => Err(CliError::from(super::connect::MachineError::Refused {
            path: "/reload?dry_run=true".to_owned(),
            status: code,
            message: answer["error"].as_str().unwrap_or(&text).to_owned(),
        })),
    }
}

/// The running machine's answer, for a terminal; a note first when the machine reads another
/// file than the one checked here.
fn render_running_diff(d: &RunningDiff, path: Option<&Path>) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let theirs = d.answer["config_file"].as_str().map(Path::new);
    let same = match (theirs, path) {
        (Some(a), Some(b)) => a == b || std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok(),
        (None, None) => true,
        _ => false,
    };
    if !same {
        let _ = writeln!(
            s,
            "note: the running machine reads {}, not {}: what follows is what it would load, not the file checked above",
            theirs.map_or_else(
                || "no file (defaults and environment)".to_owned(),
                |p| p.display().to_string()
            ),
            path.map_or_else(|| "no file".to_owned(), |p| p.display().to_string()),
        );
    }
    if d.refused {
        let problems = d.answer["problems"].as_array().map_or(&[][..], Vec::as_slice);
        let _ = writeln!(
            s,
            "the running machine would refuse a reload, nothing would change; {} problem(s):",
            problems.len()
        );
        for p in problems {
            let _ = writeln!(
                s,
                "  {}: {}",
                p["key"].as_str().unwrap_or("?"),
                p["message"].as_str().unwrap_or("?")
            );
        }
        return s;
    }
    let _ = writeln!(s, "a reload of the running machine would change:");
    match serde_json::from_value::<crate::plan::PlanDiff>(d.answer["diff"].clone()) {
        Ok(diff) => s.push_str(&diff.to_string()),
        Err(_) => {
            let _ = writeln!(s, "{}", d.answer["diff"]);
        }
    }
    for setting in d.answer["applied"].as_array().into_iter().flatten() {
        let _ = writeln!(s, "applied in place: {}", setting.as_str().unwrap_or("?"));
    }
    for key in d.answer["restart_required"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "not applied by a reload: `{}` changed; it applies at the next restart",
            key.as_str().unwrap_or("?")
        );
    }
    s
}

fn invalid_document(e: &ConfigError) -> serde_json::Value {
    serde_json::json!({ "valid": false, "error": e.to_string(), "problems": e.problems() })
}

/// Refuses a plan whose programs are not on `PATH`, before anything starts.
pub(super) fn checked_programs(plan: Plan) -> Result<Plan, Vec<config::Problem>> {
    let missing = plan.missing_programs();
    if missing.is_empty() { Ok(plan) } else { Err(missing) }
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
    let _ = writeln!(s, "machine:    {}", config.machine.machine_id);
    let _ = writeln!(s, "workspace:  {}", config.machine.workspace.display());
    let _ = writeln!(
        s,
        "redis:      {}",
        config
            .machine
            .redis
            .as_ref()
            .map_or_else(|| "local mode (private redis-server)".to_owned(), |u| u.masked())
    );
    let _ = writeln!(s, "health:     port {}", config.machine.health_port);
    let _ = writeln!(s, "connectors: {}", config.plan.connectors);
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

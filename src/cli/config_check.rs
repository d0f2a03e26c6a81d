//! `machine config check`: validate the configuration, derive the plan, and print both (as
//! text or JSON), listing every problem when there are any. With `--diff` it also prints what a
//! reload would change on the running machine, whose plan it reads from `GET /plan`.

use std::path::Path;

use super::commands::{print_json, print_warnings};
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
                Some(url) => Some(running_diff(path, url, &config, &plan)?),
                None => None,
            };
            if json {
                let doc = serde_json::json!({
                    "valid": true, "config": config, "probe": probe, "plan": plan, "diff": diff,
                });
                print_json(&doc);
            } else {
                print!("{}", render_plan(&config, &probe, &plan, path));
                if let Some((diff, restart)) = &diff {
                    println!("a reload of the running machine would change:");
                    print!("{diff}");
                    for key in restart {
                        println!("not applied by a reload: `{key}` changed; it applies at the next restart");
                    }
                }
            }
            Ok(Outcome::Success)
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

/// The diff between the running machine's plan (`GET /plan`) and `plan`, and the changed
/// settings a reload would not apply.
fn running_diff(
    path: Option<&Path>,
    url: Option<String>,
    config: &Config,
    plan: &Plan,
) -> Result<(crate::plan::PlanDiff, Vec<String>), CliError> {
    #[derive(serde::Deserialize)]
    struct Running {
        plan: Plan,
        config: serde_json::Value,
    }
    let target = super::connect::Target::find(path, url.as_deref())?;
    let running: Running =
        super::commands::block_on(super::commands::Threads::One, async move { target.get("/plan").await })??;
    let changes = Config::shown_changes(&running.config, config);
    let restart = changes.restart.iter().map(|k| (*k).to_owned()).collect();
    Ok((
        crate::plan::PlanDiff::between(&running.plan, plan, &changes.connectors),
        restart,
    ))
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

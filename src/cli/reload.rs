//! `machine reload`: asks the running machine to reload its configuration (`POST /reload`,
//! through its control socket or, over TCP, with the control token) and prints what changed, or
//! every problem of a refused configuration (exit 2). The reload itself is [`crate::app::reload`], in
//! the machine.

use std::path::Path;
use std::time::Duration;

use hyper::Method;

use super::args::MachineArgs;
use super::common::{Threads, block_on, print_json};
use super::connect::{MachineError, Target};
use super::exit::{CliError, Outcome};
use crate::health::status::{StatusDocument, WorkerStage};

/// How long the machine may take to reload: removed workers drain first, and added connectors
/// may install.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// Reloads the running machine.
pub(super) fn reload(path: Option<&Path>, machine: &MachineArgs, json: bool) -> Result<Outcome, CliError> {
    let target = Target::find(path, machine.url.as_deref())?;
    let (status, body) = block_on(Threads::One, async move {
        tokio::select! {
            answer = target.exchange(Method::POST, "/reload", RELOAD_TIMEOUT) => answer,
            never = say_what_drains(&target) => match never {},
        }
    })?
    .map_err(CliError::from)?;
    let body = String::from_utf8_lossy(&body).into_owned();
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| serde_json::json!({ "error": body }));
    if json {
        print_json(&doc);
    }
    match status.as_u16() {
        200 => {
            if !json {
                print!("{}", render_report(&doc));
            }
            Ok(Outcome::Success)
        }
        422 => {
            if !json {
                let problems = doc["problems"].as_array().map_or(0, Vec::len);
                // The error's text already lists the problems; they are printed once, below.
                if problems == 0 {
                    eprintln!(
                        "machine: {}",
                        doc["error"].as_str().unwrap_or("the new configuration is refused")
                    );
                } else {
                    eprintln!("machine: the new configuration is refused, nothing changed; {problems} problem(s):");
                }
                for p in doc["problems"].as_array().into_iter().flatten() {
                    eprintln!(
                        "  {}: {}",
                        p["key"].as_str().unwrap_or("?"),
                        p["message"].as_str().unwrap_or("?")
                    );
                }
            }
            Ok(Outcome::Invalid)
        }
        code => Err(CliError::from(MachineError::Refused {
            path: "/reload".to_owned(),
            status: code,
            message: doc["error"].as_str().unwrap_or(&body).to_owned(),
        })),
    }
}

/// While a reload runs, says on stderr which workers drain (a changed or removed worker finishes
/// its job first, for up to `worker.drain`), whenever that changes; stdout keeps the report.
async fn say_what_drains(target: &Target) -> std::convert::Infallible {
    let mut said = String::new();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let Ok(doc) = target.get::<StatusDocument>("/status").await else {
            continue;
        };
        let draining: Vec<String> = doc
            .workers
            .iter()
            .filter(|w| w.state == WorkerStage::Draining)
            .map(|w| match &w.current_job {
                Some(j) => format!("{} (job {}, {:.0}%)", w.worker_id, j.job_id, j.progress),
                None => w.worker_id.clone(),
            })
            .collect();
        let line = if draining.is_empty() {
            String::new()
        } else {
            format!("reloading: draining {}", draining.join(", "))
        };
        if !line.is_empty() && line != said {
            eprintln!("{line}");
        }
        said = line;
    }
}

fn render_report(doc: &serde_json::Value) -> String {
    use std::fmt::Write as _;
    let mut s = String::from("reloaded\n");
    match serde_json::from_value::<crate::plan::PlanDiff>(doc["diff"].clone()) {
        Ok(diff) => s.push_str(&diff.to_string()),
        Err(_) => {
            let _ = writeln!(s, "{}", doc["diff"]);
        }
    }
    for setting in doc["applied"].as_array().into_iter().flatten() {
        let _ = writeln!(s, "applied: {}", setting.as_str().unwrap_or("?"));
    }
    for key in doc["restart_required"].as_array().into_iter().flatten() {
        let _ = writeln!(
            s,
            "not applied: `{}` changed; it applies at the next restart",
            key.as_str().unwrap_or("?")
        );
    }
    for w in doc["warnings"].as_array().into_iter().flatten() {
        let _ = writeln!(s, "warning: {}", w.as_str().unwrap_or("?"));
    }
    s
}

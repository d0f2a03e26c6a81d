//! `machine install [--only NAME]`: runs the installers, starts nothing, prints one line per
//! installer. Exit 0 when everything needed is installed, 1 otherwise (clap refuses an unknown
//! name with 2).

use std::io::Write as _;
use std::path::Path;

use tokio_util::sync::CancellationToken;

use super::common::{Threads, block_on, load_config};
use super::exit::{CliError, Outcome};
use crate::config::{LogFormat, ProcessEnv};
use crate::installers::{self, InstallProgress, InstallState, Installer};

/// Installs what the configuration needs, or only `only`.
pub(super) fn install(path: Option<&Path>, only: Option<Installer>) -> Result<Outcome, CliError> {
    let config = load_config(path)?;
    crate::logging::init(&config.machine.log);
    let names = installers::selected(&config, only);
    if names.is_empty() {
        let summary = format!(
            "nothing to install for WORKER_CONNECTORS={} (installers exist for comfyui and playwright)",
            config.plan.connectors
        );
        match crate::logging::format() {
            LogFormat::Text => println!("{summary}"),
            LogFormat::Json => println!(
                "{}",
                serde_json::json!({
                    "timestamp": crate::logging::timestamp(),
                    "level": "INFO",
                    "summary": summary,
                    "target": "machine::install",
                })
            ),
        }
        return Ok(Outcome::Success);
    }
    // The running machine's services use what the installers replace: installing under a live
    // ComfyUI put it into a crash loop at its next start. One workspace, one writer.
    std::fs::create_dir_all(&config.machine.workspace).map_err(|e| {
        CliError::Failed(format!(
            "failed to create the workspace {}: {e}",
            config.machine.workspace.display()
        ))
    })?;
    let _lock = crate::app::lock_workspace(&config).map_err(|e| match e {
        crate::app::StartError::Locked { pid, .. } => CliError::Failed(format!(
            "refusing to install: a machine (pid {pid}) runs on the workspace {}; stop it first (`machine stop`)",
            config.machine.workspace.display()
        )),
        other => CliError::Failed(crate::logging::error_chain(&other)),
    })?;
    let tracker = InstallProgress::new();
    let cancel = CancellationToken::new();
    let result = block_on(Threads::PerCore, async {
        let stop = cancel.clone();
        let interrupt = async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                tracing::warn!("interrupted; stopping the installers");
                stop.cancel();
            }
            std::future::pending::<()>().await;
        };
        tokio::select! {
            r = installers::install(&config, &ProcessEnv, &names, &tracker, cancel.clone()) => r,
            () = interrupt => unreachable!("the interrupt future never completes"),
        }
    })?;
    let states = tracker.snapshot();
    let mut out = std::io::stdout().lock();
    for name in &names {
        let line = match states.get(*name) {
            Some(InstallState::Done { skipped: true, .. }) => "up to date".to_owned(),
            Some(InstallState::Done {
                seconds, failed_items, ..
            }) if failed_items.is_empty() => format!("installed in {seconds:.1}s"),
            Some(InstallState::Done {
                seconds, failed_items, ..
            }) => format!(
                "installed in {seconds:.1}s; {} failed:\n    {}",
                failed_items.len(),
                failed_items.join("\n    ")
            ),
            Some(InstallState::Failed { reason }) => format!("FAILED: {reason}"),
            other => format!("{other:?}"),
        };
        // With LOG_FORMAT=json the summary is JSON too, so that every line of the output parses.
        let _ = match crate::logging::format() {
            LogFormat::Text => writeln!(out, "{name:<16} {line}"),
            // A line like the log's: time and level first, so a shipper files it with them.
            LogFormat::Json => writeln!(
                out,
                "{}",
                serde_json::json!({
                    "timestamp": crate::logging::timestamp(),
                    "level": if matches!(states.get(*name), Some(InstallState::Failed { .. })) { "ERROR" } else { "INFO" },
                    "installer": name,
                    "state": states.get(*name),
                    "summary": line,
                    "target": "machine::install",
                })
            ),
        };
    }
    // Each installer's line above says what failed.
    Ok(if result.is_ok() {
        Outcome::Success
    } else {
        Outcome::Failed
    })
}

//! `machine reload`: asks the running machine to reload its configuration (`POST /reload` on its
//! health server, with the control token) and prints what changed, or every problem of a
//! refused configuration (exit 2). The reload itself is [`crate::reload`], in the machine.

use std::path::Path;
use std::time::Duration;

use super::commands::{Threads, block_on, print_json};
use super::exit::{CliError, Outcome};
use crate::config::{self, ProcessEnv};

/// How long the machine may take to reload: removed workers drain first, and added connectors
/// may install.
const RELOAD_TIMEOUT: Duration = Duration::from_secs(3600);

/// The running machine's health server: `--url`, else the configured port on the loopback.
pub(super) fn machine_url(path: Option<&Path>, url: Option<String>) -> String {
    let base = url.unwrap_or_else(|| {
        let port = config::load(path, &ProcessEnv).map_or(9092, |c| c.health_port);
        format!("http://127.0.0.1:{port}")
    });
    base.trim_end_matches('/').to_owned()
}

/// Reloads the running machine.
pub(super) fn reload(path: Option<&Path>, url: Option<String>, json: bool) -> Result<Outcome, CliError> {
    let base = machine_url(path, url);
    let token = std::env::var("MACHINE_CONTROL_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .or_else(|| {
            config::load(path, &ProcessEnv)
                .ok()
                .and_then(|c| c.control_token)
                .map(|t| t.expose().to_owned())
        })
        .ok_or_else(|| {
            CliError::Usage("machine reload needs the control token: set MACHINE_CONTROL_TOKEN".to_owned())
        })?;
    let url = format!("{base}/reload");
    let answer = block_on(Threads::One, async {
        let client = reqwest::Client::builder()
            .timeout(RELOAD_TIMEOUT)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        let resp = client.post(&url).bearer_auth(token.trim()).send().await?;
        let status = resp.status().as_u16();
        let body = resp.text().await?;
        Ok::<_, reqwest::Error>((status, body))
    })?
    .map_err(|e| CliError::Failed(format!("failed to reach {url}: {}", crate::logging::error_chain(&e))))?;
    let (status, body) = answer;
    let doc: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| serde_json::json!({ "error": body }));
    if json {
        print_json(&doc);
    }
    match status {
        200 => {
            if !json {
                print!("{}", render_report(&doc));
            }
            Ok(Outcome::Success)
        }
        422 => {
            if !json {
                eprintln!(
                    "machine: {}",
                    doc["error"].as_str().unwrap_or("the new configuration is refused")
                );
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
        _ => Err(CliError::Failed(format!(
            "{url} answered {status}: {}",
            doc["error"].as_str().unwrap_or(&body)
        ))),
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

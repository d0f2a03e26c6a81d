//! `machine status`: this machine's status (through its control socket or health port), or the
//! fleet's from Redis; `--check` for a Docker HEALTHCHECK, `--watch` to refresh.

use std::path::Path;

use super::args::StatusArgs;
use super::common::{Threads, block_on, machine_redis, redis_url};
use super::connect::{MachineError, Target};
use super::exit::{CliError, Outcome, print_error};
use super::status_view::render;
use crate::broker::{Broker, BrokerOptions};
use crate::health::client;
use crate::health::status::{HealthDocument, ReadyDocument, StatusDocument};

/// The fleet view from the Redis at `url`, connected again at each refresh (a watch outlasts a
/// Redis that restarts).
async fn fleet_view(url: &crate::config::RedisUrl) -> Result<String, client::ClientError> {
    let broker = Broker::connect(url, BrokerOptions::default())
        .await
        .map_err(client::ClientError::Broker)?;
    client::fleet(&broker).await
}

/// How often `--watch` refreshes.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Shows the status once, or every [`WATCH_EVERY`] with `--watch`.
pub(super) fn status(path: Option<&Path>, args: &StatusArgs) -> Result<Outcome, CliError> {
    let target = Target::find(path, args.machine.url.as_deref())?;
    let fleet = if args.fleet {
        Some(redis_url(&args.redis, machine_redis(path))?)
    } else {
        None
    };
    block_on(Threads::One, async move {
        if args.check {
            return Ok(check(&target, args.ready).await);
        }
        loop {
            let shown = match &fleet {
                Some(url) => fleet_view(url).await.map_err(CliError::from),
                None => target
                    .get::<StatusDocument>("/status")
                    .await
                    .map_err(CliError::from)
                    .map(|doc| {
                        if args.json {
                            serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
                        } else {
                            render(&doc, terminal_width(), std::time::SystemTime::now())
                        }
                    }),
            };
            match shown {
                Ok(text) => {
                    if args.watch {
                        // Clear the screen and home the cursor before each refresh.
                        print!("\x1b[2J\x1b[H");
                    }
                    print!("{text}");
                }
                // Watching outlasts a machine that restarts: the error shows until it answers.
                Err(e) if args.watch => print_error(&e),
                Err(e) => return Err(e),
            }
            if !args.watch {
                return Ok(Outcome::Success);
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    })?
}

/// `--check`: success when `/health` says ok and, as `/ready` rules, at least one worker can
/// claim (or the machine is still starting: a healthcheck must not fail a long install, or
/// Redis fails: a restart would not bring it back, and a fleet-wide outage must not get every
/// container replaced); the verdict is printed either way, with every worker that cannot claim
/// and why. With `need_ready` (`--ready`), not ready is a failure too.
async fn check(target: &Target, need_ready: bool) -> Outcome {
    match target.get::<HealthDocument>("/health").await {
        Ok(h) => {
            // `/ready` answers 503 with the same document when no worker can claim.
            let ready = match target
                .exchange(hyper::Method::GET, "/ready", std::time::Duration::from_secs(5))
                .await
            {
                Ok((_, body)) => match serde_json::from_slice::<ReadyDocument>(&body) {
                    Ok(r) => r,
                    Err(e) => {
                        println!("unhealthy: /ready is not what this version reads: {e}");
                        return Outcome::Failed;
                    }
                },
                Err(e) => {
                    println!("unhealthy: {}", crate::logging::error_chain(&e));
                    return Outcome::Failed;
                }
            };
            let why = ready
                .not_claiming
                .iter()
                .map(|(w, reason)| format!("{w}: {reason}"))
                .collect::<Vec<_>>()
                .join("; ");
            if need_ready && !ready.ready {
                println!("not ready: no worker of {} can claim: {why}", h.machine_id);
                Outcome::Failed
            } else if ready.ready || h.phase == crate::health::Phase::Starting || ready.redis.is_some() {
                let mut line = format!("healthy: {} is {}", h.machine_id, h.phase.name());
                if let Some(redis) = ready.redis.as_deref().filter(|_| !ready.ready) {
                    line.push_str(&format!(", not ready: {redis}"));
                } else if !why.is_empty() {
                    line.push_str(&format!(" (not claiming: {why})"));
                }
                println!("{line}");
                Outcome::Success
            } else {
                println!("unhealthy: no worker of {} can claim: {why}", h.machine_id);
                Outcome::Failed
            }
        }
        Err(MachineError::Refused { message, .. }) => {
            let why = serde_json::from_str::<HealthDocument>(&message).map_or(message, |h| {
                format!(
                    "{} is {}{}",
                    h.machine_id,
                    h.phase.name(),
                    h.critical_failure
                        .map(|f| format!(", critical service failed: {f}"))
                        .unwrap_or_default()
                )
            });
            println!("unhealthy: {why}");
            Outcome::Failed
        }
        Err(e) => {
            println!("unhealthy: {}", crate::logging::error_chain(&e));
            Outcome::Failed
        }
    }
}

/// The width to fit: `COLUMNS` when set (shells export it, and tests set it), else the
/// terminal's when stdout is one; `None` for a pipe, where nothing needs to wrap. A width of 0
/// (a pty of size 0x0, as `script` makes) is no width: the status renders as for a pipe.
fn terminal_width() -> Option<u16> {
    if let Some(columns) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<u16>().ok())
        .filter(|c| *c > 0)
    {
        return Some(columns);
    }
    let mut probe = comfy_table::Table::new();
    probe.set_content_arrangement(comfy_table::ContentArrangement::Dynamic);
    probe.width()
}

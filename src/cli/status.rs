//! `machine status`: this machine's status from its health server, or the fleet's from Redis;
//! `--check` for a Docker HEALTHCHECK, `--watch` to refresh.

use std::path::Path;

use super::args::StatusArgs;
use super::commands::{Threads, block_on};
use super::exit::{CliError, Outcome, print_error};
use crate::config::{self, ProcessEnv};
use crate::health::client;

/// How often `--watch` refreshes.
const WATCH_EVERY: std::time::Duration = std::time::Duration::from_secs(2);

/// Shows the status once, or every [`WATCH_EVERY`] with `--watch`.
pub(super) fn status(path: Option<&Path>, args: &StatusArgs) -> Result<Outcome, CliError> {
    // The status command must work even when the configuration is broken, so it only takes
    // the port from it when it loads.
    let base = args.url.clone().unwrap_or_else(|| {
        let port = config::load(path, &ProcessEnv).map_or(9092, |c| c.health_port);
        format!("http://127.0.0.1:{port}")
    });
    let base = base.trim_end_matches('/').trim_end_matches("/status").to_owned();
    block_on(Threads::One, async move {
        if args.check {
            return Ok(match client::check(&base).await {
                Ok(line) => {
                    println!("{line}");
                    Outcome::Success
                }
                Err(line) => {
                    println!("{line}");
                    Outcome::Failed
                }
            });
        }
        loop {
            let shown = if args.fleet {
                let Some(url) = args.redis_url.as_deref() else {
                    return Err(CliError::Usage("--fleet needs HUB_REDIS_URL or --redis-url".to_owned()));
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
                // Watching outlasts a machine that restarts: the error shows until it answers.
                Err(e) if args.watch => print_error(&e),
                Err(e) => return Err(e.into()),
            }
            if !args.watch {
                return Ok(Outcome::Success);
            }
            tokio::time::sleep(WATCH_EVERY).await;
        }
    })?
}

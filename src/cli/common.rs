//! What the commands share: loading the configuration, the one async runtime builder, the
//! Redis an operator command talks to, and printing JSON.

use std::future::Future;
use std::io::Write as _;
use std::path::Path;

use super::args::RedisArgs;
use super::exit::CliError;
use crate::config::{self, Config, ProcessEnv};

/// How many threads a command's runtime has.
#[derive(Debug, Clone, Copy)]
pub(super) enum Threads {
    /// One: an operator command that waits on one thing at a time.
    One,
    /// One per core: the machine itself and the installers.
    PerCore,
}

/// Builds the command's async runtime and runs `work` on it to the end.
pub(super) fn block_on<F: Future>(threads: Threads, work: F) -> Result<F::Output, CliError> {
    let mut builder = match threads {
        Threads::One => tokio::runtime::Builder::new_current_thread(),
        Threads::PerCore => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = builder.enable_all().build().map_err(CliError::Runtime)?;
    Ok(runtime.block_on(work))
}

/// Loads and validates the configuration through the one loader (`<workspace>/worker_connectors`
/// honoured); a failure lists every problem.
pub(super) fn load_config(path: Option<&Path>) -> Result<Config, CliError> {
    config::load(path, &ProcessEnv).map_err(CliError::Config)
}

/// This machine's Redis when the configuration loads (in local mode, the private redis-server's
/// socket), for operator commands given no `--redis-url`.
pub(super) fn machine_redis(path: Option<&Path>) -> Option<config::RedisUrl> {
    config::load(path, &ProcessEnv).ok().map(|c| c.machine.broker_url())
}

/// The Redis to talk to: `--redis-url`/`HUB_REDIS_URL`, else the machine's own (in local mode,
/// the private redis-server's socket under the workspace). The machine's Sentinels
/// (`HUB_REDIS_SENTINELS`, `[redis] sentinels`) hold for a given URL too: it then gives the
/// credentials, database and TLS, as `HUB_REDIS_URL` does for the machine.
pub(super) fn redis_url(args: &RedisArgs, machine: Option<config::RedisUrl>) -> Result<config::RedisUrl, CliError> {
    let Some(raw) = args.redis_url.as_deref().map(str::trim).filter(|u| !u.is_empty()) else {
        let machine =
            machine.ok_or_else(|| CliError::Usage("no Redis: set HUB_REDIS_URL or pass --redis-url".to_owned()))?;
        // In local mode the machine's Redis is its private redis-server's socket, which exists
        // only while that machine runs: say so rather than "No such file or directory".
        if let Some(socket) = machine.expose().strip_prefix("unix://") {
            if !Path::new(socket).exists() {
                return Err(CliError::Failed(format!(
                    "no Redis: no local-mode redis-server socket at {socket} (is the machine running on this \
                     workspace?); set HUB_REDIS_URL or pass --redis-url"
                )));
            }
        }
        return Ok(machine);
    };
    let given = config::RedisUrl::parse(raw).map_err(|e| CliError::Usage(e.to_string()))?;
    Ok(match machine.as_ref().and_then(|m| m.sentinels()) {
        Some(target) => given.with_sentinels(target.clone()),
        None => given,
    })
}

/// Prints `value` as pretty JSON on stdout.
pub(super) fn print_json<T: serde::Serialize>(value: &T) {
    let mut out = std::io::stdout().lock();
    // Serialising our own plain data types cannot fail; a closed stdout is not worth a panic.
    let _ = serde_json::to_writer_pretty(&mut out, value);
    let _ = writeln!(out);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_url_the_machines_redis_is_used_and_a_missing_socket_named() {
        let none = RedisArgs { redis_url: None };
        let hub = config::RedisUrl::parse("redis://h:6379").expect("a URL");
        assert_eq!(
            redis_url(&none, Some(hub.clone())).expect("the machine's").expose(),
            hub.expose()
        );
        let local = config::RedisUrl::parse("unix:///nowhere/run/redis.sock").expect("a URL");
        let e = redis_url(&none, Some(local)).expect_err("no socket there");
        assert!(e.to_string().contains("/nowhere/run/redis.sock"), "{e}");
        let given = RedisArgs {
            redis_url: Some("redis://other:1".into()),
        };
        assert_eq!(
            redis_url(&given, Some(hub)).expect("the flag's").expose(),
            "redis://other:1"
        );
    }
}

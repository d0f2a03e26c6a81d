//! What `machine status` reads besides this machine's own documents (which the CLI reads
//! through the control socket): any health server's JSON documents over HTTP, and with
//! `--fleet` every machine's last status message from Redis.

use std::fmt::Write as _;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::fleet::{FleetMessage, Occupancy};

/// Why a status read failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The HTTP request failed.
    #[error("failed to reach {url}")]
    Http {
        /// The URL.
        url: String,
        /// The cause.
        #[source]
        source: reqwest::Error,
    },
    /// The machine answered something that is not a status document.
    #[error("{url} answered {status}: {body}")]
    Answer {
        /// The URL.
        url: String,
        /// The HTTP status.
        status: u16,
        /// The body, cut short.
        body: String,
    },
    /// No HTTP client could be built.
    #[error("failed to build an HTTP client")]
    Build(#[source] reqwest::Error),
    /// Redis failed.
    #[error("failed to read the fleet from Redis")]
    Redis(#[source] redis::RedisError),
}

fn client() -> Result<reqwest::Client, ClientError> {
    crate::http_client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .map_err(ClientError::Build)
}

/// Fetches a JSON document from `url` as `T`; any non-2xx answer, or a body that is not a `T`,
/// is an error carrying the body. The machine's guarded routes take the read token or the
/// control token, whichever the operator's environment has.
pub async fn fetch<T: DeserializeOwned>(url: &str) -> Result<T, ClientError> {
    let mut request = client()?.get(url);
    if let Some(token) = ["MACHINE_READ_TOKEN", "MACHINE_CONTROL_TOKEN"]
        .iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
    {
        request = request.bearer_auth(token.trim());
    }
    let resp = request.send().await.map_err(|source| ClientError::Http {
        url: url.to_owned(),
        source,
    })?;
    let status = resp.status().as_u16();
    let text = resp.text().await.map_err(|source| ClientError::Http {
        url: url.to_owned(),
        source,
    })?;
    match serde_json::from_str(&text) {
        Ok(v) if (200..300).contains(&status) => Ok(v),
        _ => Err(ClientError::Answer {
            url: url.to_owned(),
            status,
            body: text.chars().take(500).collect(),
        }),
    }
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    if then_ms > 0 {
        format!("{}s ago", now_ms.saturating_sub(then_ms) / 1000)
    } else {
        "-".to_owned()
    }
}

/// `--fleet`: every machine's stored status message and every worker's heartbeat, as one line
/// per machine and per worker.
pub async fn fleet(redis_url: &crate::config::RedisUrl) -> Result<String, ClientError> {
    // Through the Sentinels when the URL has them, like every connection of the machine.
    let client = crate::broker::sentinel::client(redis_url)
        .await
        .map_err(ClientError::Redis)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(ClientError::Redis)?;
    let mut keys: Vec<String> = Vec::new();
    let mut cursor: u64 = 0;
    loop {
        let (next, batch): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg("machine:*:status")
            .arg("COUNT")
            .arg(500)
            .query_async(&mut conn)
            .await
            .map_err(ClientError::Redis)?;
        keys.extend(batch);
        cursor = next;
        if cursor == 0 {
            break;
        }
    }
    keys.sort();
    let now = crate::clock::now_ms();
    let mut out = String::new();
    let _ = writeln!(out, "MACHINE                  PHASE      GPUS  WORKERS  LAST SEEN");
    if keys.is_empty() {
        let _ = writeln!(out, "(no machine has published a status in the last 30 s)");
    }
    let mut worker_lines = String::new();
    for key in keys {
        let raw: Option<String> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut conn)
            .await
            .map_err(ClientError::Redis)?;
        let Some(msg) = raw.and_then(|r| serde_json::from_str::<FleetMessage>(&r).ok()) else {
            continue;
        };
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:<5} {:<8} {}",
            msg.machine_id,
            msg.status.machine.phase.name(),
            msg.structure.gpu_count,
            msg.status.workers.len(),
            ago(now, msg.timestamp)
        );
        for (id, w) in &msg.status.workers {
            let heartbeat: Option<String> = redis::cmd("HGET")
                .arg(format!("worker:{id}"))
                .arg("last_heartbeat")
                .query_async(&mut conn)
                .await
                .map_err(ClientError::Redis)?;
            let _ = writeln!(
                worker_lines,
                "  {:<30} {:<6} {:<25} connected {:<5} heartbeat {}",
                id,
                match w.status {
                    Occupancy::Idle => "idle",
                    Occupancy::Busy => "busy",
                },
                w.current_job_id,
                w.is_connected,
                heartbeat.unwrap_or_else(|| "-".to_owned())
            );
        }
    }
    if !worker_lines.is_empty() {
        let _ = writeln!(out, "\nWORKERS");
        out.push_str(&worker_lines);
    }
    Ok(out)
}

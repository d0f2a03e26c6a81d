//! `machine status`: reads this machine's `/status` (or another's with `--url`) and prints a
//! readable table, the JSON document, or a health verdict for Docker's HEALTHCHECK; with
//! `--fleet` it reads every machine's last status message from Redis instead.

use std::fmt::Write as _;
use std::time::Duration;

use serde::de::DeserializeOwned;

use super::fleet::{FleetMessage, Occupancy};
use super::status::{Exit, HealthDocument, ReadyDocument, StatusDocument};

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
    /// Redis failed.
    #[error("failed to read the fleet from Redis")]
    Redis(#[source] redis::RedisError),
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap_or_else(|_| reqwest::Client::new())
}

/// Fetches a JSON document from `url` as `T`; any non-2xx answer, or a body that is not a `T`,
/// is an error carrying the body. The machine's guarded routes take the read token or the
/// control token, whichever the operator's environment has.
pub async fn fetch<T: DeserializeOwned>(url: &str) -> Result<T, ClientError> {
    let mut request = client().get(url);
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

/// `--check`: `Ok(summary)` when `/health` answers 200, else the reason.
pub async fn check(base: &str) -> Result<String, String> {
    let url = format!("{base}/health");
    let h = match fetch::<HealthDocument>(&url).await {
        Ok(h) => h,
        Err(ClientError::Answer { body, .. }) => return Err(format!("unhealthy: {body}")),
        Err(e) => return Err(format!("unhealthy: {e}")),
    };
    // The same rule as /ready: healthy while at least one worker can claim (or while the
    // machine is still starting, which /health already tells apart).
    let ready = match fetch::<ReadyDocument>(&format!("{base}/ready")).await {
        Ok(r) => r,
        Err(ClientError::Answer { body, .. }) => match serde_json::from_str::<ReadyDocument>(&body) {
            Ok(r) => r,
            Err(_) => return Err(format!("unhealthy: {body}")),
        },
        Err(e) => return Err(format!("unhealthy: {e}")),
    };
    let why = |r: &ReadyDocument| {
        r.not_claiming
            .iter()
            .map(|(w, reason)| format!("{w}: {reason}"))
            .collect::<Vec<_>>()
            .join("; ")
    };
    if ready.ready || h.phase == super::Phase::Starting {
        let mut line = format!("healthy: {} is {}", h.machine_id, h.phase.name());
        if !ready.not_claiming.is_empty() {
            line.push_str(&format!(" (not claiming: {})", why(&ready)));
        }
        Ok(line)
    } else {
        Err(format!(
            "unhealthy: no worker of {} can claim: {}",
            h.machine_id,
            why(&ready)
        ))
    }
}

/// An optional value as a table cell: `-` when absent.
fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

fn ago(now_ms: u64, then_ms: u64) -> String {
    if then_ms > 0 {
        format!("{}s ago", now_ms.saturating_sub(then_ms) / 1000)
    } else {
        "-".to_owned()
    }
}

/// Renders `/status` as text tables.
pub fn render(doc: &StatusDocument) -> String {
    let mut out = String::new();
    let m = &doc.machine;
    let _ = writeln!(
        out,
        "machine {}  phase {}  up {}s  version {}",
        m.id,
        m.phase.name(),
        m.uptime_ms / 1000,
        m.version
    );
    if let Some(failure) = &m.critical_failure {
        let _ = writeln!(out, "CRITICAL: {failure}");
    }
    let r = &doc.redis;
    let _ = writeln!(
        out,
        "redis   {}  connected {}  functions {}{}",
        or_dash(r.url.as_deref()),
        r.connected,
        or_dash(r.function_version.as_deref()),
        r.last_error
            .as_deref()
            .map(|e| format!("  error: {e}"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "\nGPU  NAME                          UTIL  MEM USED/TOTAL         TEMP"
    );
    if doc.gpus.is_empty() {
        let _ = writeln!(out, "-    (none: CPU mode)");
    }
    let gib = |b: u64| format!("{:.1}", b as f64 / 1073741824.0);
    for g in &doc.gpus {
        let _ = writeln!(
            out,
            "{:<4} {:<29} {:>4}  {:>8}/{:<8} GiB  {}",
            g.index,
            g.name,
            or_dash(g.utilization_percent.map(|u| format!("{u}%"))),
            or_dash(g.memory_used_bytes.map(gib)),
            gib(g.memory_total_bytes),
            or_dash(g.temperature_c.map(|t| format!("{t}C")))
        );
        if let Some(reason) = &g.reason {
            let _ = writeln!(out, "     FAULTED: {reason}");
        }
        if let Some(t) = &g.throttle {
            let _ = writeln!(
                out,
                "     throttled for {}s: {}",
                crate::clock::now_ms().saturating_sub(t.since_ms) / 1000,
                t.reasons.join(", ")
            );
        }
    }
    let _ = writeln!(
        out,
        "\nSERVICE              STATE         PID      RESTARTS  READY  LAST EXIT"
    );
    for v in &doc.services {
        let _ = writeln!(
            out,
            "{:<20} {:<13} {:<8} {:<9} {:<6} {}",
            v.name,
            v.state.name(),
            or_dash(v.pid),
            v.restarts,
            v.ready,
            match &v.last_exit {
                Some(Exit { code: Some(c), .. }) => format!("code {c}"),
                Some(Exit { signal: Some(sig), .. }) => format!("signal {sig}"),
                _ => "-".to_owned(),
            }
        );
    }
    let now = crate::clock::now_ms();
    let _ = writeln!(
        out,
        "\nWORKER                         STATE        JOB                       PROGRESS  DONE  FAILED  RETURNED  ACTIVE"
    );
    for w in &doc.workers {
        let state = match &w.reason {
            Some(reason) => format!("{} ({reason})", w.state.name()),
            None => w.state.name().to_owned(),
        };
        let job = w.current_job.as_ref();
        let _ = writeln!(
            out,
            "{:<30} {:<12} {:<25} {:<9} {:<5} {:<7} {:<9} {}",
            w.worker_id,
            state,
            or_dash(job.map(|j| j.job_id.as_str())),
            or_dash(job.map(|j| format!("{:.0}%", j.progress))),
            w.counts.completed,
            w.counts.failed,
            w.counts.returned,
            ago(now, w.last_activity_ms)
        );
    }
    out
}

/// `--fleet`: every machine's stored status message and every worker's heartbeat, as one line
/// per machine and per worker.
pub async fn fleet(redis_url: &str) -> Result<String, ClientError> {
    let client = redis::Client::open(redis_url).map_err(ClientError::Redis)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_every_section() {
        let text = render(&super::super::status::sample());
        assert!(text.contains("machine m1  phase ready  up 5s  version 0.1.0"), "{text}");
        assert!(
            text.contains("redis   redis://***@h  connected true  functions abc\n"),
            "{text}"
        );
        assert!(
            text.contains("RTX") && text.contains("50%") && text.contains("60C") && text.contains("1.0/24.0"),
            "{text}"
        );
        assert!(
            text.contains("comfyui-gpu0") && text.contains("backoff") && text.contains("signal 9"),
            "{text}"
        );
        assert!(
            text.contains("m1-gpu0") && text.contains("waiting_for_services (comfyui-gpu0 is failed)"),
            "{text}"
        );
        assert!(text.contains("j1") && text.contains("40%"), "{text}");
    }
}

//! `machine status`: reads this machine's `/status` (or another's with `--url`) and prints a
//! readable table, the JSON document, or a health verdict for Docker's HEALTHCHECK; with
//! `--fleet` it reads every machine's last status message from Redis instead.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::Value;

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

/// Fetches a JSON document from `url`; any non-2xx answer is an error carrying the body.
/// The machine's guarded routes take the read token or the control token, whichever the
/// operator's environment has.
pub async fn fetch(url: &str) -> Result<Value, ClientError> {
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
    match fetch(&url).await {
        Ok(v) => Ok(format!(
            "healthy: {} is {}",
            v["machine_id"].as_str().unwrap_or("?"),
            v["phase"].as_str().unwrap_or("?")
        )),
        Err(ClientError::Answer { body, .. }) => Err(format!("unhealthy: {body}")),
        Err(e) => Err(format!("unhealthy: {e}")),
    }
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn ago(now_ms: u64, then: &Value) -> String {
    match then.as_u64() {
        Some(t) if t > 0 => format!("{}s ago", now_ms.saturating_sub(t) / 1000),
        _ => "-".to_owned(),
    }
}

/// Renders `/status` as text tables.
pub fn render(doc: &Value) -> String {
    let mut out = String::new();
    let m = &doc["machine"];
    let _ = writeln!(
        out,
        "machine {}  phase {}  up {}s  version {}",
        s(&m["id"]),
        s(&m["phase"]),
        m["uptime_ms"].as_u64().unwrap_or(0) / 1000,
        s(&m["version"])
    );
    if !m["critical_failure"].is_null() {
        let _ = writeln!(out, "CRITICAL: {}", s(&m["critical_failure"]));
    }
    let r = &doc["redis"];
    let _ = writeln!(
        out,
        "redis   {}  connected {}  functions {}{}",
        s(&r["url"]),
        s(&r["connected"]),
        s(&r["function_version"]),
        r["last_error"]
            .as_str()
            .map(|e| format!("  error: {e}"))
            .unwrap_or_default()
    );
    let gpus = doc["gpus"].as_array().cloned().unwrap_or_default();
    let _ = writeln!(
        out,
        "\nGPU  NAME                          UTIL  MEM USED/TOTAL         TEMP"
    );
    if gpus.is_empty() {
        let _ = writeln!(out, "-    (none: CPU mode)");
    }
    for g in &gpus {
        let gib = |v: &Value| {
            v.as_u64()
                .map_or("-".to_owned(), |b| format!("{:.1}", b as f64 / 1073741824.0))
        };
        let _ = writeln!(
            out,
            "{:<4} {:<29} {:>4}  {:>8}/{:<8} GiB  {}",
            s(&g["index"]),
            s(&g["name"]),
            g["utilization_percent"]
                .as_u64()
                .map_or("-".to_owned(), |u| format!("{u}%")),
            gib(&g["memory_used_bytes"]),
            gib(&g["memory_total_bytes"]),
            g["temperature_c"].as_u64().map_or("-".to_owned(), |t| format!("{t}C"))
        );
    }
    if let Some(services) = doc["services"].as_array() {
        let _ = writeln!(
            out,
            "\nSERVICE              STATE         PID      RESTARTS  READY  LAST EXIT"
        );
        for v in services {
            let _ = writeln!(
                out,
                "{:<20} {:<13} {:<8} {:<9} {:<6} {}",
                s(&v["name"]),
                s(&v["state"]),
                s(&v["pid"]),
                s(&v["restarts"]),
                s(&v["ready"]),
                match (&v["last_exit"]["code"], &v["last_exit"]["signal"]) {
                    (Value::Number(c), _) => format!("code {c}"),
                    (_, Value::Number(sig)) => format!("signal {sig}"),
                    _ => "-".to_owned(),
                }
            );
        }
    }
    let now = crate::clock::now_ms();
    let _ = writeln!(
        out,
        "\nWORKER                         STATE        JOB                       PROGRESS  DONE  FAILED  RETURNED  ACTIVE"
    );
    for w in doc["workers"].as_array().cloned().unwrap_or_default() {
        let state = match w["reason"].as_str() {
            Some(reason) => format!("{} ({reason})", s(&w["state"])),
            None => s(&w["state"]),
        };
        let job = &w["current_job"];
        let counts = &w["counts"];
        let _ = writeln!(
            out,
            "{:<30} {:<12} {:<25} {:<9} {:<5} {:<7} {:<9} {}",
            s(&w["worker_id"]),
            state,
            s(&job["job_id"]),
            job["progress"].as_f64().map_or("-".to_owned(), |p| format!("{p:.0}%")),
            s(&counts["completed"]),
            s(&counts["failed"]),
            s(&counts["returned"]),
            ago(now, &w["last_activity_ms"])
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
        let Some(doc) = raw.and_then(|r| serde_json::from_str::<Value>(&r).ok()) else {
            continue;
        };
        let workers = doc["status"]["workers"].as_object().cloned().unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:<5} {:<8} {}",
            s(&doc["machine_id"]),
            s(&doc["status"]["machine"]["phase"]),
            s(&doc["structure"]["gpu_count"]),
            workers.len(),
            ago(now, &doc["timestamp"])
        );
        for (id, w) in workers {
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
                s(&w["status"]),
                s(&w["current_job_id"]),
                s(&w["is_connected"]),
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
        let doc = serde_json::json!({
            "machine": {"id": "m1", "phase": "ready", "uptime_ms": 5000, "version": "0.1.0", "critical_failure": null},
            "redis": {"url": "redis://***@h", "connected": true, "function_version": "abc", "last_error": null},
            "gpus": [{"index": 0, "name": "RTX", "utilization_percent": 50, "memory_used_bytes": 1073741824u64, "memory_total_bytes": 25769803776u64, "temperature_c": 60}],
            "services": [{"name": "comfyui-gpu0", "state": "running", "pid": 42, "restarts": 1, "ready": true, "last_exit": null}],
            "workers": [{"worker_id": "m1-gpu0", "state": "busy", "current_job": {"job_id": "j1", "progress": 40.0}, "counts": {"completed": 3, "failed": 0, "returned": 0}, "last_activity_ms": 0, "reason": null}],
        });
        let text = render(&doc);
        assert!(text.contains("machine m1  phase ready  up 5s"), "{text}");
        assert!(
            text.contains("RTX") && text.contains("50%") && text.contains("60C"),
            "{text}"
        );
        assert!(text.contains("comfyui-gpu0") && text.contains("running"), "{text}");
        assert!(
            text.contains("m1-gpu0") && text.contains("j1") && text.contains("40%"),
            "{text}"
        );
    }
}

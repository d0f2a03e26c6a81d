//! What `machine status --fleet` reads besides this machine's own documents (which the CLI
//! reads through the control socket or the health port): every machine's last status message
//! and its workers' heartbeats, through the broker.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::fleet::{FleetMessage, Occupancy};
use crate::broker::Broker;

/// Why the fleet could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Redis failed.
    #[error("failed to read the fleet from Redis")]
    Broker(#[source] crate::broker::BrokerError),
}

/// A worker's state in the fleet view: `busy`, `idle`, or `held` when it may not claim (its GPU
/// faulted, it is quarantined, ...; the reason follows on the line). An idle worker that may
/// not claim is not idle to an operator.
fn presence(w: &super::fleet::WorkerPresence) -> &'static str {
    match (w.status, &w.reason) {
        (Occupancy::Busy, _) => "busy",
        (Occupancy::Idle, Some(_)) => "held",
        (Occupancy::Idle, None) => "idle",
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
/// per machine and per worker, read through the broker (its key prefix, its Sentinels).
pub async fn fleet(broker: &Broker) -> Result<String, ClientError> {
    let mut machines = Vec::new();
    for raw in broker.machine_statuses().await.map_err(ClientError::Broker)? {
        let Ok(msg) = serde_json::from_str::<FleetMessage>(&raw) else {
            continue;
        };
        let ids: Vec<String> = msg.status.workers.keys().cloned().collect();
        let heartbeats = broker.worker_heartbeats(&ids).await.map_err(ClientError::Broker)?;
        machines.push((msg, heartbeats));
    }
    Ok(render_fleet(&machines, crate::clock::now_ms()))
}

/// The fleet view of `machines` (each message with its workers' heartbeats, epoch
/// milliseconds) at `now_ms`: one line per machine, then one per worker.
fn render_fleet(machines: &[(FleetMessage, BTreeMap<String, Option<u64>>)], now_ms: u64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "MACHINE                  PHASE      GPUS  WORKERS  LAST SEEN");
    if machines.is_empty() {
        let _ = writeln!(out, "(no machine has published a status in the last 30 s)");
    }
    let mut worker_lines = String::new();
    for (msg, heartbeats) in machines {
        let _ = writeln!(
            out,
            "{:<24} {:<10} {:<5} {:<8} {}",
            msg.machine_id,
            msg.status.machine.phase.name(),
            msg.structure.gpu_count,
            msg.status.workers.len(),
            ago(now_ms, msg.timestamp)
        );
        // Two runs under one id overwrite each other's message: whichever is stored names the
        // other, so the fleet view says so whichever won.
        if let Some(d) = &msg.duplicate {
            let _ = writeln!(
                out,
                "  DUPLICATE: another machine runs as {} on host {} in workspace {} (seen {})",
                msg.machine_id,
                d.instance.host,
                d.instance.workspace,
                ago(now_ms, d.seen_at_ms)
            );
        }
        for (id, w) in &msg.status.workers {
            // The heartbeat is epoch milliseconds in Redis; an operator reads its age.
            let heartbeat = heartbeats
                .get(id)
                .copied()
                .flatten()
                .map_or_else(|| "-".to_owned(), |ms| ago(now_ms, ms));
            let _ = writeln!(
                worker_lines,
                "  {:<30} {:<6} {:<25} connected {:<5} heartbeat {}{}",
                id,
                presence(w),
                w.current_job_id,
                w.is_connected,
                heartbeat,
                w.reason.as_ref().map(|r| format!("  ({r})")).unwrap_or_default()
            );
        }
    }
    if !worker_lines.is_empty() {
        let _ = writeln!(out, "\nWORKERS");
        out.push_str(&worker_lines);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(now_ms: u64) -> FleetMessage {
        serde_json::from_value(serde_json::json!({
            "machine_id": "m1",
            "timestamp": now_ms - 2_000,
            "update_type": "periodic",
            "structure": {"gpu_count": 1, "capabilities": [], "workers": {}, "services": {}},
            "status": {
                "machine": {"phase": "ready", "uptime_ms": 60_000},
                "workers": {
                    "m1-gpu0": {"is_connected": true, "status": "idle", "current_job_id": "",
                        "last_activity": 0, "reason": "quarantined for 5m 0s (until 10:05:00)"},
                    "m1-gpu1": {"is_connected": true, "status": "idle", "current_job_id": "",
                        "last_activity": 0}
                },
                "services": {}
            },
            "health_url": "http://h:9092/health"
        }))
        .expect("a fleet message")
    }

    #[test]
    fn the_fleet_view_gives_ages_and_says_a_held_worker_is_held() {
        let now = 1_800_000_000_000;
        let beats = BTreeMap::from([("m1-gpu0".to_owned(), Some(now - 3_000)), ("m1-gpu1".to_owned(), None)]);
        let text = render_fleet(&[(message(now), beats)], now);
        let gpu0 = text.lines().find(|l| l.contains("m1-gpu0")).expect("gpu0's line");
        assert!(gpu0.contains(" held "), "{text}");
        assert!(gpu0.contains("heartbeat 3s ago"), "{text}");
        assert!(gpu0.ends_with("(quarantined for 5m 0s (until 10:05:00))"), "{text}");
        assert!(!text.contains(&now.to_string()[..8]), "no epoch milliseconds: {text}");
        let gpu1 = text.lines().find(|l| l.contains("m1-gpu1")).expect("gpu1's line");
        assert!(gpu1.contains(" idle ") && gpu1.contains("heartbeat -"), "{text}");
        assert!(text.lines().nth(1).unwrap().ends_with("2s ago"), "{text}");
        assert!(!text.contains("DUPLICATE"), "{text}");
    }

    #[test]
    fn the_fleet_view_names_another_run_under_the_same_id() {
        let now = 1_800_000_000_000;
        let mut msg = message(now);
        msg.duplicate = Some(crate::health::fleet::Duplicate {
            instance: crate::health::fleet::Instance {
                instance_id: "feedbeef".into(),
                host: "box-2".into(),
                workspace: "/data/ws2".into(),
            },
            seen_at_ms: now - 4_000,
        });
        let text = render_fleet(&[(msg, BTreeMap::new())], now);
        let line = text.lines().nth(2).expect("the line under the machine's");
        assert_eq!(
            line, "  DUPLICATE: another machine runs as m1 on host box-2 in workspace /data/ws2 (seen 4s ago)",
            "{text}"
        );
    }
}

//! `machine logs`, `machine restart`, `machine quarantine clear` and `machine stop`: the
//! commands that act on the running machine through its control socket (or its health port,
//! see [`super::connect`]).

use std::io::Write as _;
use std::path::Path;

use http_body_util::BodyExt as _;
use hyper::Method;

use super::args::{LogsArgs, MachineArgs};
use super::common::{Threads, block_on};
use super::connect::{MachineError, Target};
use super::exit::{CliError, Outcome};
use crate::health::status::StatusDocument;

/// Prints the last lines of a service's output or of the machine's log, then with `--follow`
/// every new line until Ctrl-C or the machine stops.
pub(super) fn logs(path: Option<&Path>, args: &LogsArgs) -> Result<Outcome, CliError> {
    let target = Target::find(path, args.machine.url.as_deref())?;
    let route = format!(
        "/control/logs/{}?lines={}&follow={}",
        url_segment(&args.name),
        args.lines,
        args.follow
    );
    block_on(Threads::One, async move {
        if !args.follow {
            let text = target.text(Method::GET, &route).await?;
            let _ = std::io::stdout().lock().write_all(&text);
            return Ok(Outcome::Success);
        }
        let mut body = target.send(Method::GET, &route).await?.into_body();
        let interrupted = tokio::signal::ctrl_c();
        tokio::pin!(interrupted);
        loop {
            let frame = tokio::select! {
                _ = &mut interrupted => return Ok(Outcome::Success),
                frame = body.frame() => frame,
            };
            match frame {
                Some(Ok(frame)) => {
                    if let Some(data) = frame.data_ref() {
                        let mut out = std::io::stdout().lock();
                        // A reader that went away (`| head`) ends the command quietly.
                        if out.write_all(data).and_then(|()| out.flush()).is_err() {
                            return Ok(Outcome::Success);
                        }
                    }
                }
                // The machine stopped: the log ends with it.
                Some(Err(_)) | None => {
                    eprintln!("machine: the machine closed the log (it stopped)");
                    return Ok(Outcome::Success);
                }
            }
        }
    })?
}

/// Restarts one service (or every instance of a connector) and says so once the machine has
/// begun the new runs.
pub(super) fn restart(path: Option<&Path>, machine: &MachineArgs, service: &str) -> Result<Outcome, CliError> {
    let target = Target::find(path, machine.url.as_deref())?;
    block_on(Threads::One, async move {
        let answer = target
            .post(&format!("/services/{}/restart", url_segment(service)))
            .await?;
        // A connector name restarts each of its instances; the machine names them.
        let services: Vec<&str> = answer["services"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
            .unwrap_or_default();
        if services.is_empty() || services == [service] {
            println!("restarted {service}");
        } else {
            println!("restarted {}", services.join(", "));
        }
        Ok::<_, MachineError>(Outcome::Success)
    })?
    .map_err(CliError::from)
}

/// Lifts the quarantine of `worker` (of every worker without one) and names the workers
/// that were quarantined.
pub(super) fn clear_quarantine(
    path: Option<&Path>,
    machine: &MachineArgs,
    worker: Option<&str>,
) -> Result<Outcome, CliError> {
    let target = Target::find(path, machine.url.as_deref())?;
    let route = match worker {
        Some(w) => format!("/workers/quarantine/clear?worker={}", url_segment(w)),
        None => "/workers/quarantine/clear".to_owned(),
    };
    block_on(Threads::One, async move {
        let answer = target.post(&route).await?;
        let cleared: Vec<&str> = answer["cleared"]
            .as_array()
            .map(|a| a.iter().filter_map(serde_json::Value::as_str).collect())
            .unwrap_or_default();
        match (cleared.is_empty(), worker) {
            (true, Some(w)) => println!("{w} is not quarantined"),
            (true, None) => println!("no worker is quarantined"),
            (false, _) => println!("lifted the quarantine of {}", cleared.join(", ")),
        }
        Ok::<_, MachineError>(Outcome::Success)
    })?
    .map_err(CliError::from)
}

/// Asks the machine to stop, gracefully or (`now`) at once; with `wait`, returns only once it
/// has exited, printing what it is still waiting for whenever that changes.
pub(super) fn stop(path: Option<&Path>, machine: &MachineArgs, now: bool, wait: bool) -> Result<Outcome, CliError> {
    let target = Target::find(path, machine.url.as_deref())?;
    block_on(Threads::One, async move {
        let asked = std::time::Instant::now();
        target.post(&format!("/control/stop?now={now}")).await?;
        if now {
            println!("stopping now: jobs go back to the queue and the services are killed");
        } else {
            println!("stopping: the workers drain their jobs, then the services stop");
        }
        if wait {
            wait_for_exit(&target).await;
            println!("stopped in {:.1}s", asked.elapsed().as_secs_f64());
        }
        Ok::<_, MachineError>(Outcome::Success)
    })?
    .map_err(CliError::from)
}

/// How often a waiting `stop` asks the machine how far it got.
const STOP_POLL: std::time::Duration = std::time::Duration::from_millis(200);

/// Waits until the machine has exited: its health server no longer answers and, where its
/// workspace is known, the kernel has released its workspace lock (the health server stops a
/// moment before the process ends). Prints the drain's progress as it changes.
async fn wait_for_exit(target: &Target) {
    let mut said = String::new();
    loop {
        match target.get::<StatusDocument>("/status").await {
            Ok(doc) => {
                let progress = stop_progress(&doc);
                if progress != said {
                    println!("{progress}");
                    said = progress;
                }
            }
            // Nothing answers any more, or it answers no longer as a machine does (the
            // process is tearing down its server).
            Err(_) => break,
        }
        tokio::time::sleep(STOP_POLL).await;
    }
    if let Some(lock) = target.workspace().map(crate::app::lock_path) {
        while crate::app::machine_holds(&lock) {
            tokio::time::sleep(STOP_POLL).await;
        }
    }
}

/// What a stopping machine still waits for: the jobs its workers drain, then the services
/// that still run.
fn stop_progress(doc: &StatusDocument) -> String {
    let jobs: Vec<String> = doc
        .workers
        .iter()
        .filter_map(|w| {
            w.current_job
                .as_ref()
                .map(|j| format!("{} on {} ({:.0}%)", j.job_id, w.worker_id, j.progress))
        })
        .collect();
    if !jobs.is_empty() {
        return format!("draining {} job(s): {}", jobs.len(), jobs.join(", "));
    }
    let running: Vec<&str> = doc
        .services
        .iter()
        .filter(|s| s.pid.is_some())
        .map(|s| s.name.as_str())
        .collect();
    if running.is_empty() {
        "no job running, every service stopped".to_owned()
    } else {
        format!("no job running; stopping {}", running.join(", "))
    }
}

/// `name` as one path segment: anything but unreserved characters percent-encoded.
fn url_segment(name: &str) -> String {
    name.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_one_path_segment() {
        assert_eq!(url_segment("comfyui-gpu0"), "comfyui-gpu0");
        assert_eq!(url_segment("a/b c"), "a%2Fb%20c");
    }
}

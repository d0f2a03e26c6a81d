//! `<workspace>/run/services.pids`: the process groups of the services now running, so that the
//! next run can kill what this one leaves behind when it is SIGKILLed outside a PID namespace
//! (in a container the namespace dies with its PID 1 and takes everything with it).
//!
//! Each line is `<pgid> <starttime> <service>`. The start time (clock ticks after boot, from
//! /proc) tells a leftover from an unrelated process that reused the pid: a process counts as
//! left over only when it is in a recorded group, started no earlier than that group's leader
//! did, and started before this machine did.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::sys;

/// How long the leftovers of the previous run may take to die after SIGKILL.
const KILL_WAIT: Duration = Duration::from_secs(2);

/// The pid file of this run.
#[derive(Debug)]
pub(crate) struct PidFile {
    path: PathBuf,
    running: Mutex<BTreeMap<String, (u32, u64)>>,
}

impl PidFile {
    /// The pid file under `workspace`; nothing is written until a service starts.
    pub(crate) fn new(workspace: &Path) -> PidFile {
        PidFile {
            path: workspace.join("run/services.pids"),
            running: Mutex::new(BTreeMap::new()),
        }
    }

    /// Records that `service` runs as the leader of group `pid`.
    pub(crate) fn started(&self, service: &str, pid: u32) {
        let starttime = start_time(pid).unwrap_or(0);
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        running.insert(service.to_owned(), (pid, starttime));
        self.write(&running);
    }

    /// Records that `service` is no longer running.
    pub(crate) fn stopped(&self, service: &str) {
        let mut running = self.running.lock().unwrap_or_else(PoisonError::into_inner);
        if running.remove(service).is_some() {
            self.write(&running);
        }
    }

    fn write(&self, running: &BTreeMap<String, (u32, u64)>) {
        let text: String = running
            .iter()
            .map(|(name, (pid, start))| format!("{pid} {start} {name}\n"))
            .collect();
        // Written aside and renamed, so a machine killed mid-write leaves the old file whole.
        let tmp = self.path.with_extension("pids.tmp");
        let result = self
            .path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&tmp, text))
            .and_then(|()| std::fs::rename(&tmp, &self.path));
        if let Err(e) = result {
            tracing::warn!(path = %self.path.display(), "failed to write the pid file: {e}");
        }
    }

    /// Kills the services a previous run of the machine on this workspace left running, and
    /// returns how many processes that was. Call it holding the workspace lock, before any
    /// service starts.
    pub(crate) fn kill_leftovers(&self) -> usize {
        self.kill_started_before(start_time(std::process::id()).unwrap_or(u64::MAX))
    }

    /// [`PidFile::kill_leftovers`], counting only processes started by `my_start`.
    fn kill_started_before(&self, my_start: u64) -> usize {
        let Ok(text) = std::fs::read_to_string(&self.path) else {
            return 0;
        };
        let me = std::process::id();
        let mut killed = 0;
        for line in text.lines() {
            let mut f = line.split_whitespace();
            let (Some(Ok(pgid)), Some(Ok(start)), name) = (
                f.next().map(str::parse::<u32>),
                f.next().map(str::parse::<u64>),
                f.next().unwrap_or("?"),
            ) else {
                continue;
            };
            let members = || {
                sys::proc_stats()
                    .filter(|p| {
                        p.pgrp == pgid
                            && p.pid != me
                            && p.state != 'Z'
                            && p.starttime >= start
                            && p.starttime <= my_start
                    })
                    .count()
            };
            let n = members();
            if n == 0 {
                continue;
            }
            tracing::warn!(
                service = name,
                pgid,
                processes = n,
                "killing what the previous run left of the service"
            );
            sys::signal_group(pgid, Signal::SIGKILL);
            killed += n;
            let deadline = Instant::now() + KILL_WAIT;
            while members() > 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = std::fs::remove_file(&self.path);
        killed
    }
}

fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    sys::parse_stat(&stat).map(|s| s.starttime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_previous_runs_group_is_killed_and_strangers_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let mut cmd = std::process::Command::new("/bin/sh");
        cmd.args(["-c", "sleep 30 & exec sleep 30"]);
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let mut left = cmd.spawn().unwrap();
        let mut stranger = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let old = PidFile::new(dir.path());
        old.started("left", left.id());
        // The stranger reuses nothing, but a line naming its pid with a later start time than
        // it really has must not kill it.
        std::fs::write(
            dir.path().join("run/services.pids"),
            format!(
                "{} {} left\n{} {} stranger\n",
                left.id(),
                start_time(left.id()).unwrap(),
                stranger.id(),
                start_time(stranger.id()).unwrap() + 1
            ),
        )
        .unwrap();
        // The group must have both sleeps in it before the new run looks.
        std::thread::sleep(Duration::from_millis(200));
        let killed = PidFile::new(dir.path()).kill_started_before(u64::MAX);
        assert_eq!(killed, 2);
        assert!(left.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(stranger.try_wait().unwrap().is_none(), "the stranger runs on");
        stranger.kill().unwrap();
        stranger.wait().unwrap();
        assert!(!dir.path().join("run/services.pids").exists());
    }
}

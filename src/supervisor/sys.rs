//! The PID-1 system calls, and the only `unsafe` in the crate: making a child the leader of its
//! own session (and so of its own process group) between `fork` and `exec`.
//!
//! Everything else here is a safe wrapper over `nix` that names what the supervisor needs:
//! becoming a child subreaper, signalling a process group, and asking whether a group still
//! has members.

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;

/// Returns whether this process is the init process of its PID namespace.
pub(crate) fn is_pid1() -> bool {
    std::process::id() == 1
}

/// Makes this process the reaper of its orphaned descendants when it is not PID 1 (PID 1 already
/// is). Without it, the grandchildren of a service would be re-parented past us and we could not
/// account for them.
pub(crate) fn become_subreaper() -> nix::Result<()> {
    if is_pid1() {
        return Ok(());
    }
    nix::sys::prctl::set_child_subreaper(true)
}

/// Makes the child spawned from `cmd` the leader of a new session and process group, so that
/// the whole tree of a service can be signalled at once and a terminal's signals do not reach it.
pub(crate) fn new_session(cmd: &mut tokio::process::Command) {
    #[expect(unsafe_code, reason = "pre_exec is the only way to run setsid between fork and exec")]
    // SAFETY: the closure runs in the forked child before exec. It calls only setsid(2), which is
    // async-signal-safe, allocates nothing and touches no lock the parent may have held.
    unsafe {
        cmd.pre_exec(|| nix::unistd::setsid().map(|_| ()).map_err(std::io::Error::from));
    }
}

/// Sends `signal` to every process of the group `pgid`. A group that is already gone is not an
/// error: the caller wanted it dead.
pub(crate) fn signal_group(pgid: u32, signal: Signal) {
    match killpg(as_pid(pgid), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(pgid, ?signal, "failed to signal the process group: {e}"),
    }
}

/// Returns whether the process group `pgid` still has a member that is not a zombie.
///
/// `kill(-pgid, 0)` also counts zombies, which the reaper removes on its own time, so the
/// members are checked in /proc instead.
pub(crate) fn group_alive(pgid: u32) -> bool {
    if killpg(as_pid(pgid), None).is_err() {
        return false;
    }
    proc_stats().any(|s| s.pgrp == pgid && s.state != 'Z')
}

/// Sends `signal` to every process this one may signal: in a PID namespace whose init we are,
/// that is everything in the namespace but us.
pub(crate) fn signal_all(signal: Signal) {
    match nix::sys::signal::kill(Pid::from_raw(-1), signal) {
        Ok(()) | Err(Errno::ESRCH) => {}
        Err(e) => tracing::warn!(?signal, "failed to signal every process: {e}"),
    }
}

fn as_pid(pid: u32) -> Pid {
    // Pids fit in i32 on Linux (pid_max is at most 2^22).
    Pid::from_raw(i32::try_from(pid).unwrap_or(i32::MAX))
}

/// The few fields of /proc/<pid>/stat the supervisor reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub pid: u32,
    pub state: char,
    pub ppid: u32,
    pub pgrp: u32,
}

/// Parses one /proc/<pid>/stat line. The command name is in parentheses and may itself contain
/// spaces and parentheses, so the fields are read after the last `)`.
pub(crate) fn parse_stat(line: &str) -> Option<ProcStat> {
    let (head, tail) = line.rsplit_once(')')?;
    let pid = head.split_once(' ')?.0.trim().parse().ok()?;
    let mut f = tail.split_ascii_whitespace();
    let state = f.next()?.chars().next()?;
    let ppid = f.next()?.parse().ok()?;
    let pgrp = f.next()?.parse().ok()?;
    Some(ProcStat { pid, state, ppid, pgrp })
}

/// Every process visible in /proc (those that vanish while being read are skipped).
pub(crate) fn proc_stats() -> impl Iterator<Item = ProcStat> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("stat")).ok())
        .filter_map(|s| parse_stat(&s))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let s = parse_stat("42 (a b) c)) Z 1 42 42 0 -1 4194560 0").unwrap();
        assert_eq!(
            s,
            ProcStat {
                pid: 42,
                state: 'Z',
                ppid: 1,
                pgrp: 42
            }
        );
        assert!(parse_stat("garbage").is_none());
        let me = proc_stats()
            .find(|s| s.pid == std::process::id())
            .expect("this process is in /proc");
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
    }
}

//! The PID-1 system calls, and the only `unsafe` in the crate: making a child the leader of its
//! own session (and so of its own process group), and tying its life to the machine's, between
//! `fork` and `exec`.
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
/// the whole tree of a service can be signalled at once and a terminal's signals do not reach it,
/// and asks the kernel to SIGKILL it when the machine dies (`PR_SET_PDEATHSIG`), so that outside
/// a PID namespace a SIGKILLed machine does not leave its services running. What such a leader
/// leaves behind in its group is killed by the next run through the pid file.
///
/// The death signal fires when the *thread* that forked the child exits; children are spawned
/// from the runtime's worker threads, which live as long as the machine.
pub(crate) fn new_session(cmd: &mut tokio::process::Command) {
    let parent = nix::unistd::getpid();
    #[expect(unsafe_code, reason = "pre_exec is the only way to run setsid between fork and exec")]
    // SAFETY: the closure runs in the forked child before exec. It calls only setsid(2), prctl(2)
    // and getppid(2), which are async-signal-safe, allocates nothing and touches no lock the
    // parent may have held.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // The machine died between fork and prctl: the signal will never come, so do not
            // start a service nobody supervises.
            if nix::unistd::getppid() != parent {
                return Err(std::io::Error::other("the machine exited while starting the service"));
            }
            Ok(())
        });
    }
}

/// Raises the soft limit of open files to the hard limit, as systemd does for its services: the
/// default soft limit (often 1,024) is a relic of `select(2)`, which nothing here uses, and a
/// machine serving many connections and jobs at once runs out of it. Children inherit the raised
/// limit.
pub fn raise_open_files_limit() {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) if soft < hard => match setrlimit(Resource::RLIMIT_NOFILE, hard, hard) {
            Ok(()) => tracing::info!(from = soft, to = hard, "raised the open-files limit"),
            Err(e) => tracing::warn!(soft, hard, "failed to raise the open-files limit: {e}"),
        },
        Ok(_) => {}
        Err(e) => tracing::warn!("failed to read the open-files limit: {e}"),
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

/// Whether the process `pid` is stopped (state `T`, e.g. by SIGSTOP, or `t` under a tracer):
/// it acts on no signal but SIGKILL until continued, so a grace period would only be waited
/// out.
pub(crate) fn is_stopped(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| parse_stat(&s))
        .is_some_and(|s| matches!(s.state, 'T' | 't'))
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
    /// Clock ticks after boot at which the process started; with the pid it names one process
    /// even when pids are reused.
    pub starttime: u64,
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
    // Fields 6 to 21 of stat(5) lie between the process group and the start time.
    let starttime = f.nth(16)?.parse().ok()?;
    Some(ProcStat {
        pid,
        state,
        ppid,
        pgrp,
        starttime,
    })
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
        let line = "42 (a b) c)) Z 1 42 42 0 -1 4194560 0 0 0 0 1 2 0 0 20 0 1 0 777 0 0";
        let s = parse_stat(line).unwrap();
        assert_eq!(
            s,
            ProcStat {
                pid: 42,
                state: 'Z',
                ppid: 1,
                pgrp: 42,
                starttime: 777,
            }
        );
        assert!(parse_stat("garbage").is_none());
        let me = proc_stats()
            .find(|s| s.pid == std::process::id())
            .expect("this process is in /proc");
        assert_eq!(me.ppid, std::os::unix::process::parent_id());
    }
}

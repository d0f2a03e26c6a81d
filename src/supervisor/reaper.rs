//! Reaping, and the process registry that makes it safe.
//!
//! As PID 1 (or a child subreaper) this process inherits every orphan of its descendants and
//! must reap them, or they stay zombies forever. But tokio reaps the children it spawned itself,
//! and a blanket `waitpid(-1)` would steal their exit status. So the registry decides: every
//! child this crate starts goes through [`spawn`], which records its pid under a lock held
//! across fork and registration, and forgets it once its status was collected. The reaper peeks
//! at exited children with `waitid(P_ALL, WEXITED | WNOHANG | WNOWAIT)` under the same lock and
//! reaps only pids that are not registered.
//!
//! **Every subsystem (services, probes, installers, workers) must spawn its children through
//! [`spawn`] or [`output`]**; a child spawned any other way may have its exit status taken by the
//! reaper.

use std::collections::BTreeSet;
use std::io;
use std::ops::{Deref, DerefMut};
use std::process::{ExitStatus, Output};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use nix::unistd::Pid;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Pids of the children this crate spawned and has not collected yet.
static REGISTRY: Mutex<BTreeSet<u32>> = Mutex::new(BTreeSet::new());

/// Most children reaped in one round; a round that reaches it runs again at once, so a storm of
/// orphans cannot starve the runtime thread.
const ROUND: usize = 1024;

/// How often the reaper looks even without SIGCHLD (signals coalesce; a lost one must not leave
/// zombies for long).
const TICK: Duration = Duration::from_secs(1);

fn registry() -> MutexGuard<'static, BTreeSet<u32>> {
    REGISTRY.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A child started through [`spawn`]. It dereferences to the tokio child; its pid leaves the
/// registry once its status was collected by [`ManagedChild::wait`] or when it is dropped (tokio
/// then reaps it in the background, and tolerates the reaper having done so first).
#[derive(Debug)]
pub struct ManagedChild {
    child: tokio::process::Child,
    pid: Option<u32>,
}

impl ManagedChild {
    /// Waits for the child to exit and returns its status.
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        let status = self.child.wait().await;
        self.forget();
        status
    }

    /// Waits for the child and collects its piped stdout and stderr.
    pub async fn wait_with_output(mut self) -> io::Result<Output> {
        use tokio::io::AsyncReadExt;
        let stdout = self.child.stdout.take();
        let stderr = self.child.stderr.take();
        let read_out = async {
            let mut v = Vec::new();
            if let Some(mut r) = stdout {
                r.read_to_end(&mut v).await?;
            }
            Ok::<_, io::Error>(v)
        };
        let read_err = async {
            let mut v = Vec::new();
            if let Some(mut r) = stderr {
                r.read_to_end(&mut v).await?;
            }
            Ok::<_, io::Error>(v)
        };
        let (status, stdout, stderr) = tokio::try_join!(self.wait(), read_out, read_err)?;
        Ok(Output { status, stdout, stderr })
    }

    fn forget(&mut self) {
        if let Some(pid) = self.pid.take() {
            registry().remove(&pid);
        }
    }
}

impl Deref for ManagedChild {
    type Target = tokio::process::Child;
    fn deref(&self) -> &tokio::process::Child {
        &self.child
    }
}

impl DerefMut for ManagedChild {
    fn deref_mut(&mut self) -> &mut tokio::process::Child {
        &mut self.child
    }
}

impl Drop for ManagedChild {
    fn drop(&mut self) {
        self.forget();
    }
}

/// Spawns `cmd` and registers the child so the orphan reaper leaves its status to tokio. The
/// registry lock is held across the fork so a child that exits at once is never mistaken for
/// an orphan.
pub fn spawn(cmd: &mut tokio::process::Command) -> io::Result<ManagedChild> {
    let mut reg = registry();
    let child = cmd.spawn()?;
    let pid = child.id();
    if let Some(pid) = pid {
        reg.insert(pid);
    }
    Ok(ManagedChild { child, pid })
}

/// Spawns `cmd` through [`spawn`] as the leader of a new session (its own process group, tied
/// to the machine's life, as services are), with a guard that kills the whole group when it is
/// dropped: a command abandoned by a timeout or a cancellation (a probe, an installer's pip or
/// git) leaves none of its own children behind. [`GroupKill::disarm`] keeps the group once the
/// command has ended on its own.
pub fn spawn_group(cmd: &mut tokio::process::Command) -> io::Result<(ManagedChild, Option<GroupKill>)> {
    super::sys::new_session(cmd);
    let child = spawn(cmd)?;
    let guard = child.id().map(GroupKill);
    Ok((child, guard))
}

/// Kills a process group (SIGKILL) when dropped; see [`spawn_group`].
#[derive(Debug)]
pub struct GroupKill(u32);

impl GroupKill {
    /// Leaves the group alone: its leader ended and was waited for.
    pub fn disarm(self) {
        std::mem::forget(self);
    }
}

impl Drop for GroupKill {
    fn drop(&mut self) {
        super::sys::signal_group(self.0, nix::sys::signal::Signal::SIGKILL);
    }
}

/// Runs `cmd` to completion through [`spawn`], collecting its output (like
/// `Command::output`, which would bypass the registry).
pub async fn output(cmd: &mut tokio::process::Command) -> io::Result<Output> {
    cmd.stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    spawn(cmd)?.wait_with_output().await
}

/// Why the reaper could not run.
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    /// The SIGCHLD handler could not be installed.
    #[error("failed to listen for SIGCHLD")]
    Signal(#[source] io::Error),
}

/// Reaps orphans on SIGCHLD and every second until `shutdown`, then once more.
pub async fn run(shutdown: CancellationToken) -> Result<(), ReaperError> {
    if let Err(e) = super::sys::become_subreaper() {
        // Still reap what does come to us; the orphans of services will be re-parented past us.
        tracing::warn!("failed to become a child subreaper, orphans will not be reaped here: {e}");
    }
    let mut sigchld = signal(SignalKind::child()).map_err(ReaperError::Signal)?;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            _ = sigchld.recv() => {}
            _ = tick.tick() => {}
        }
        while reap_orphans() >= ROUND {
            tokio::task::yield_now().await;
        }
    }
    reap_orphans();
    Ok(())
}

/// Reaps up to [`ROUND`] exited children that are not in the registry; returns how many.
pub fn reap_orphans() -> usize {
    let reg = registry();
    let mut reaped = 0;
    while reaped < ROUND {
        let peek = waitid(
            Id::All,
            WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
        );
        let pid = match peek {
            Ok(status) => match status.pid() {
                Some(pid) => pid,
                None => return reaped,
            },
            Err(Errno::EINTR) => continue,
            Err(_) => return reaped,
        };
        if reg.contains(&(pid.as_raw() as u32)) {
            // The first exited child is one of ours that tokio has not collected yet; P_ALL
            // would keep answering with it, so look for orphans behind it by name.
            return reaped + reap_by_scan(&reg);
        }
        if reap_one(pid) {
            reaped += 1;
        }
    }
    reaped
}

fn reap_one(pid: Pid) -> bool {
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::EINTR) => continue,
            Ok(WaitStatus::StillAlive) | Err(_) => return false,
            Ok(_) => return true,
        }
    }
}

/// Reaps the zombie children found in /proc that are not registered.
fn reap_by_scan(reg: &BTreeSet<u32>) -> usize {
    let me = std::process::id();
    super::sys::proc_stats()
        .filter(|s| s.ppid == me && s.state == 'Z' && !reg.contains(&s.pid))
        .take(ROUND)
        .filter(|s| reap_one(Pid::from_raw(s.pid as i32)))
        .count()
}

/// The last step of a PID 1: asks everything still alive in the namespace to stop, kills it after
/// `grace`, and reaps it all. Outside PID 1 it does the same to this process's own children
/// (orphans re-parented to it). Runs after every subsystem stopped.
pub async fn sweep(grace: Duration) {
    // Every subsystem has stopped by now, so even a registered child is a leftover.
    let leftovers = || {
        let me = std::process::id();
        super::sys::proc_stats()
            .filter(|s| s.pid != me && s.state != 'Z' && (super::sys::is_pid1() || s.ppid == me))
            .map(|s| s.pid)
            .collect::<Vec<u32>>()
    };
    let pids = leftovers();
    if pids.is_empty() {
        reap_all();
        return;
    }
    tracing::info!(processes = pids.len(), "stopping the processes left over");
    signal_leftovers(&pids, nix::sys::signal::Signal::SIGTERM);
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        reap_all();
        if leftovers().is_empty() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let pids = leftovers();
    tracing::warn!(
        processes = pids.len(),
        "killing the processes left over after the grace period"
    );
    signal_leftovers(&pids, nix::sys::signal::Signal::SIGKILL);
    for _ in 0..100 {
        reap_all();
        if leftovers().is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn signal_leftovers(pids: &[u32], sig: nix::sys::signal::Signal) {
    if super::sys::is_pid1() {
        super::sys::signal_all(sig);
    } else {
        for pid in pids {
            let _ = nix::sys::signal::kill(Pid::from_raw(*pid as i32), sig);
        }
    }
}

/// Reaps every exited child that is not registered, however many.
fn reap_all() {
    while reap_orphans() >= ROUND {}
}

/// Returns whether `pid` is in the registry (for tests).
#[cfg(test)]
fn registered(pid: u32) -> bool {
    registry().contains(&pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in the re-executed test process that runs [`orphans_body`].
    const CHILD_ENV: &str = "MACHINE_REAPER_TEST_CHILD";

    /// Becoming a subreaper changes the whole process, and the reaper would take the status of
    /// children other tests spawn directly, so the body runs in a fresh copy of this test binary.
    #[test]
    fn managed_children_keep_their_status_while_orphans_are_reaped() {
        let exe = std::env::current_exe().expect("the test binary knows its path");
        let dir = tempfile::tempdir().unwrap();
        let (out_path, err_path) = (dir.path().join("out"), dir.path().join("err"));
        let mut child = std::process::Command::new(exe)
            .args([
                "--exact",
                "supervisor::reaper::tests::orphans_body",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, "1")
            .stdout(std::fs::File::create(&out_path).unwrap())
            .stderr(std::fs::File::create(&err_path).unwrap())
            .spawn()
            .expect("the test binary runs");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the reaper test body did not finish within 60s");
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let out = Output {
            status,
            stdout: std::fs::read(&out_path).unwrap(),
            stderr: std::fs::read(&err_path).unwrap(),
        };
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "{text}");
        assert!(text.contains("1 passed"), "the body did not run: {text}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "runs only inside managed_children_keep_their_status_while_orphans_are_reaped"]
    async fn orphans_body() {
        assert_eq!(
            std::env::var(CHILD_ENV).as_deref(),
            Ok("1"),
            "run through the wrapper test"
        );
        let shutdown = CancellationToken::new();
        let reaper = tokio::spawn(run(shutdown.clone()));
        // 1,000 orphans: a shell starts sleepers in the background and exits; they are
        // re-parented to this process and exit a moment later, all at once.
        let mut orphan_maker = tokio::process::Command::new("/bin/sh");
        orphan_maker.args(["-c", "i=0; while [ $i -lt 1000 ]; do sleep 0.3 & i=$((i+1)); done"]);
        let mut maker = spawn(&mut orphan_maker).unwrap();
        // Managed children exiting with distinct codes at the same time.
        let mut managed = Vec::new();
        for code in 0..40 {
            let mut cmd = tokio::process::Command::new("/bin/sh");
            cmd.args(["-c", &format!("sleep 0.3; exit {code}")]);
            managed.push((code, spawn(&mut cmd).unwrap()));
        }
        assert!(maker.wait().await.unwrap().success());
        for (code, mut child) in managed {
            let pid = child.id().unwrap();
            assert!(registered(pid));
            let status = child.wait().await.unwrap();
            assert_eq!(status.code(), Some(code), "tokio kept the real exit status");
            assert!(!registered(pid));
        }
        let me = std::process::id();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let children = crate::supervisor::sys::proc_stats().filter(|s| s.ppid == me).count();
            if children == 0 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{children} children left");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        shutdown.cancel();
        reaper.await.unwrap().unwrap();
    }
}

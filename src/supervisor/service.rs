//! One supervised service as an actor: a task that owns the service's child process and is the
//! only thing that starts, signals or waits for it. Everything else talks to it through
//! [`super::SupervisorHandle`] messages and reads the status it publishes on a watch channel.
//!
//! A run: wait until the `after` services are ready, spawn the argv (no shell) in a new session
//! with its env and cwd, copy its output to the log, run its probes, and wait. When it exits on
//! its own, what is left of its process group is killed and the restart policy decides what
//! follows. A failed liveness probe stops it (SIGTERM, grace, SIGKILL to the group) and counts
//! as a failure. At shutdown the actor first waits until every service that starts after it
//! has stopped, so services stop in reverse dependency order.

use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use nix::sys::signal::Signal;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::logs::{ServiceLog, Stream};
use super::pidfile::PidFile;
use super::policy::{self, Decision, Ending, History, Policy};
use super::probe::{self, ProbeKind, Verdict};
use super::reaper::{self, ManagedChild};
use super::status::{Command, Down, ExitInfo, Run, ServiceState, ServiceStatus};
use super::sys;
use crate::config::ServiceSpec;

/// How long the output readers may take to drain after a run ended; a grandchild that escaped
/// the process group may hold the pipe open forever.
const DRAIN: Duration = Duration::from_secs(1);

/// Lines of a crashed service's output repeated in the machine's warning.
const CRASH_LINES: usize = 10;

/// How often a stopping service's process group is checked for members.
const GROUP_POLL: Duration = Duration::from_millis(20);

/// What the actor does next.
#[derive(Debug)]
enum Next {
    Start,
    Backoff(Duration),
    Idle(Down),
    Shutdown,
}

impl Next {
    /// The state published between a run's end and what comes next.
    fn state(&self) -> ServiceState {
        match self {
            // It is started again at once, once its `after` services are ready.
            Next::Start => ServiceState::Waiting,
            Next::Backoff(_) => ServiceState::Backoff,
            Next::Idle(down) => (*down).into(),
            Next::Shutdown => ServiceState::Stopped,
        }
    }
}

/// How a run ended.
#[derive(Debug)]
enum RunEnd {
    /// The process exited on its own.
    Exited(std::io::Result<ExitStatus>),
    /// The liveness probe failed and the process was stopped.
    Unhealthy(std::io::Result<ExitStatus>),
    /// A stop or restart request, or the shutdown, stopped it; the requester is answered once
    /// the status says so.
    Stopped(std::io::Result<ExitStatus>, Next, Option<oneshot::Sender<()>>),
}

/// A started process and the tasks serving it: its output readers and its probes.
struct Launched {
    child: ManagedChild,
    run: Run,
    started: Instant,
    /// Where the service's log stood when it started, to find this run's last line.
    log_cursor: u64,
    readers: Vec<JoinHandle<()>>,
    probes: Vec<JoinHandle<()>>,
    probe_stop: CancellationToken,
    verdicts: mpsc::Receiver<Verdict>,
}

/// The actor owning one service.
#[derive(Debug)]
pub(crate) struct Actor {
    pub(crate) spec: ServiceSpec,
    pub(crate) policy: Policy,
    pub(crate) history: History,
    pub(crate) status: watch::Sender<ServiceStatus>,
    /// Statuses of the services this one starts after.
    pub(crate) deps: Vec<watch::Receiver<ServiceStatus>>,
    /// Statuses of the services that start after this one, which stop before it.
    pub(crate) dependants: Vec<watch::Receiver<ServiceStatus>>,
    pub(crate) commands: mpsc::Receiver<Command>,
    pub(crate) log: Arc<ServiceLog>,
    /// Where running services are recorded for the next run.
    pub(crate) pids: Arc<PidFile>,
    /// Set to the name of the first critical service that failed for good.
    pub(crate) critical: Arc<watch::Sender<Option<String>>>,
    /// The supervisor's start, the origin of the policy's clock.
    pub(crate) epoch: Instant,
    pub(crate) runs: u32,
}

impl Actor {
    /// Supervises the service until `shutdown`; `force` turns every pending stop into SIGKILL.
    pub(crate) async fn run(mut self, shutdown: CancellationToken, force: CancellationToken) {
        let mut next = Next::Start;
        loop {
            next = match next {
                Next::Start => self.supervise(&shutdown, &force).await,
                Next::Backoff(delay) => self.backoff(delay, &shutdown).await,
                Next::Idle(down) => self.idle(down, &shutdown).await,
                Next::Shutdown => break,
            };
        }
        self.status.send_modify(|s| {
            if !s.state.is_down() {
                s.state = ServiceState::Stopped;
            }
        });
    }

    fn set(&self, f: impl FnOnce(&mut ServiceStatus)) {
        self.status.send_modify(f);
    }

    fn name(&self) -> &str {
        &self.spec.name
    }

    fn deps_ready(&self) -> bool {
        self.deps.iter().all(|d| d.borrow().serving())
    }

    /// One run: wait for the `after` services, start the process, watch it until it ends, and
    /// decide what follows.
    async fn supervise(&mut self, shutdown: &CancellationToken, force: &CancellationToken) -> Next {
        if let Some(next) = self.wait_for_deps(shutdown).await {
            return next;
        }
        if self.runs > 0 {
            self.set(|s| s.restarts += 1);
        }
        self.runs += 1;
        let mut launched = match self.launch() {
            Ok(launched) => launched,
            Err(reason) => {
                tracing::error!(service = %self.spec.name, "{reason}");
                self.set(|s| s.reason = Some(reason));
                return self.decide(Ending::Failure, Duration::ZERO);
            }
        };
        let (child, run) = (&mut launched.child, launched.run);
        let end = self
            .watch_run(child, run, &mut launched.verdicts, shutdown, force)
            .await;
        self.wind_down(&mut launched).await;
        self.conclude(end, launched.started.elapsed(), launched.log_cursor)
    }

    /// Waits until every `after` service is ready; `Some` when a stop or the shutdown came
    /// first.
    async fn wait_for_deps(&mut self, shutdown: &CancellationToken) -> Option<Next> {
        if !self.deps_ready() {
            self.set(|s| {
                s.state = ServiceState::Waiting;
                s.reason = Some("waiting for the services it starts after".to_owned());
            });
            tracing::info!(service = %self.spec.name, after = ?self.spec.after, "waiting for dependencies to be ready");
        }
        while !self.deps_ready() {
            tokio::select! {
                () = shutdown.cancelled() => return Some(Next::Shutdown),
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::Stop(reply) => {
                        let _ = reply.send(());
                        return Some(Next::Idle(Down::Stopped));
                    }
                    Command::Start(reply) | Command::Restart(reply) | Command::Fail(_, reply) => {
                        let _ = reply.send(());
                    }
                },
                () = any_changed(&mut self.deps) => {}
            }
        }
        None
    }

    /// Spawns the argv (no shell) in a new session with its env and cwd, and starts copying
    /// its output to the log and running its probes. The error is the status's reason.
    fn launch(&mut self) -> Result<Launched, String> {
        let mut cmd = tokio::process::Command::new(&self.spec.command[0]);
        cmd.args(&self.spec.command[1..])
            .env_clear()
            .envs(super::env::service_env(&self.spec, std::env::vars_os()))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(cwd) = &self.spec.cwd {
            cmd.current_dir(cwd);
        }
        sys::new_session(&mut cmd);
        let started = Instant::now();
        let log_cursor = self.log.tail().last_and_cursor(0).1;
        let mut child =
            reaper::spawn(&mut cmd).map_err(|e| format!("failed to start `{}`: {e}", self.spec.command[0]))?;
        let pid = child.id().expect("a child that was never waited for has a pid");
        tracing::info!(service = %self.spec.name, pid, "service started");
        self.pids.started(&self.spec.name, pid);
        let run = Run {
            pid,
            started: SystemTime::now(),
        };
        let has_ready_probe = self.spec.ready.is_some();
        self.set(|s| {
            s.reason = None;
            s.state = if has_ready_probe {
                ServiceState::Starting(run)
            } else {
                ServiceState::Running { run, ready: true }
            };
        });

        let mut readers: Vec<JoinHandle<()>> = Vec::new();
        if let Some(out) = child.stdout.take() {
            let log = Arc::clone(&self.log);
            readers.push(tokio::spawn(async move { log.copy(Stream::Stdout, out).await }));
        }
        if let Some(err) = child.stderr.take() {
            let log = Arc::clone(&self.log);
            readers.push(tokio::spawn(async move { log.copy(Stream::Stderr, err).await }));
        }
        let probe_stop = CancellationToken::new();
        let (verdicts_tx, verdicts) = mpsc::channel(4);
        let mut probes = Vec::new();
        for (kind, spec) in [
            (ProbeKind::Ready, &self.spec.ready),
            (ProbeKind::Live, &self.spec.liveness),
        ] {
            if let Some(spec) = spec {
                probes.push(tokio::spawn(probe::run(
                    kind,
                    spec.clone(),
                    verdicts_tx.clone(),
                    probe_stop.clone(),
                )));
            }
        }
        Ok(Launched {
            child,
            run,
            started,
            log_cursor,
            readers,
            probes,
            probe_stop,
            verdicts,
        })
    }

    /// After the leader ended: stops the probes, kills what is left of its process group and
    /// lets the output readers drain.
    async fn wind_down(&self, launched: &mut Launched) {
        launched.probe_stop.cancel();
        for p in launched.probes.drain(..) {
            let _ = p.await;
        }
        // The leader is gone; whatever is left of its group belongs to a dead service.
        sys::signal_group(launched.run.pid, Signal::SIGKILL);
        self.pids.stopped(&self.spec.name);
        for mut r in launched.readers.drain(..) {
            if tokio::time::timeout(DRAIN, &mut r).await.is_err() {
                r.abort();
                let _ = r.await;
            }
        }
    }

    /// Logs how a run ended, publishes it, answers the request that ended it, and returns
    /// what follows (the restart policy decides when it ended on its own).
    fn conclude(&mut self, end: RunEnd, uptime: Duration, log_cursor: u64) -> Next {
        let mut unhealthy = false;
        let (status, ending, next, reply) = match end {
            RunEnd::Exited(status) => {
                let ending = match &status {
                    Ok(s) if s.success() => Ending::Success,
                    _ => Ending::Failure,
                };
                (status, ending, None, None)
            }
            RunEnd::Unhealthy(status) => {
                unhealthy = true;
                (status, Ending::Failure, None, None)
            }
            RunEnd::Stopped(status, next, reply) => (status, Ending::Success, Some(next), reply),
        };
        let exit = exit_info(&status);
        let crashed = next.is_none() && ending == Ending::Failure;
        self.log_exit(&exit, crashed, uptime);
        let cause = (crashed && !unhealthy).then(|| exit_cause(&exit, self.log.tail().after(log_cursor).0.last()));
        let next = match next {
            Some(next) => next,
            None => self.decide(ending, uptime),
        };
        let state = next.state();
        self.set(|s| {
            if let Some(cause) = cause {
                // What the operator needs is why it ended, not the probe's last complaint.
                s.reason = Some(cause);
            }
            s.last_exit = Some(exit);
            s.state = state;
        });
        if let Some(reply) = reply {
            let _ = reply.send(());
        }
        next
    }

    fn log_exit(&self, exit: &ExitInfo, crashed: bool, uptime: Duration) {
        if crashed {
            // A crash is what an operator looks for; its last words say why.
            let last = self.log.tail().last(CRASH_LINES);
            // One line: the output's lines as a list, so the event's fields are not glued to
            // the service's last line and a shipper sees one event.
            tracing::warn!(
                service = %self.spec.name,
                code = exit.code,
                signal = exit.signal,
                uptime = %crate::logging::human_duration(uptime),
                last_output = ?last,
                "service crashed"
            );
        } else {
            tracing::info!(
                service = %self.spec.name,
                code = exit.code,
                signal = exit.signal,
                uptime = %crate::logging::human_duration(uptime),
                "service exited"
            );
        }
    }

    async fn watch_run(
        &mut self,
        child: &mut ManagedChild,
        run: Run,
        verdicts: &mut mpsc::Receiver<Verdict>,
        shutdown: &CancellationToken,
        force: &CancellationToken,
    ) -> RunEnd {
        let stable = tokio::time::sleep(self.policy.stable_after);
        tokio::pin!(stable);
        let mut stable_done = false;
        // Once ready, a failing readiness probe makes the service not ready, still running:
        // `starting` would say that the process never came up.
        let mut been_ready = false;
        loop {
            tokio::select! {
                status = child.wait() => return RunEnd::Exited(status),
                Some(v) = verdicts.recv() => match v.kind {
                    ProbeKind::Ready => {
                        if v.passing {
                            tracing::info!(service = %self.spec.name, "service is ready");
                        } else if been_ready {
                            tracing::warn!(service = %self.spec.name, reason = v.reason.as_deref(), "readiness probe failing");
                        } else {
                            // Every start fails its probe until the service has come up: that
                            // is no warning (a failure once it was ready is).
                            tracing::debug!(service = %self.spec.name, reason = v.reason.as_deref(), "not ready yet");
                        }
                        been_ready |= v.passing;
                        self.set(|s| {
                            s.state = if been_ready { ServiceState::Running { run, ready: v.passing } } else { ServiceState::Starting(run) };
                            s.reason = v.reason.map(|r| if been_ready { format!("readiness probe failing: {r}") } else { r });
                        });
                    }
                    ProbeKind::Live if v.passing => {}
                    ProbeKind::Live => {
                        tracing::warn!(service = %self.spec.name, reason = v.reason.as_deref(), "liveness probe failed, restarting the service");
                        self.set(|s| s.reason = v.reason.map(|r| format!("liveness probe failed: {r}")));
                        return RunEnd::Unhealthy(self.stop_child(child, run, false, force).await);
                    }
                },
                () = &mut stable, if !stable_done => {
                    stable_done = true;
                    if self.history.crash_loop {
                        tracing::info!(service = %self.spec.name, stable_after = %humantime::format_duration(self.policy.stable_after), "the crash loop is over: the service ran stable");
                    }
                    self.history.mark_stable();
                    self.set(|s| s.crash_loop = false);
                }
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::Start(reply) => {
                        let _ = reply.send(());
                    }
                    Command::Stop(reply) => {
                        tracing::info!(service = %self.spec.name, "stopping the service on request");
                        let status = self.stop_child(child, run, true, force).await;
                        return RunEnd::Stopped(status, Next::Idle(Down::Stopped), Some(reply));
                    }
                    Command::Restart(reply) => {
                        tracing::info!(service = %self.spec.name, "restarting the service on request");
                        self.fresh_history();
                        let status = self.stop_child(child, run, true, force).await;
                        return RunEnd::Stopped(status, Next::Start, Some(reply));
                    }
                    Command::Fail(reason, reply) => {
                        tracing::warn!(service = %self.spec.name, %reason, "the service failed; restarting it");
                        self.set(|s| s.reason = Some(reason));
                        let status = self.stop_child(child, run, true, force).await;
                        let _ = reply.send(());
                        return RunEnd::Unhealthy(status);
                    }
                },
                () = shutdown.cancelled() => {
                    self.wait_for_dependants(force).await;
                    return RunEnd::Stopped(self.stop_child(child, run, true, force).await, Next::Shutdown, None);
                }
            }
        }
    }

    /// Waits until every service that starts after this one is down (or `force`).
    async fn wait_for_dependants(&mut self, force: &CancellationToken) {
        let down = |d: &watch::Receiver<ServiceStatus>| d.has_changed().is_err() || d.borrow().state.is_down();
        while !force.is_cancelled() && !self.dependants.iter().all(down) {
            tokio::select! {
                () = force.cancelled() => {}
                () = any_changed(&mut self.dependants) => {}
            }
        }
    }

    /// Stops the running child: SIGTERM to its group, then SIGKILL once the grace is over (or at
    /// once on `force`). Returns when the leader was collected and the group is empty or killed.
    /// `live` is false when a failed liveness probe is why.
    async fn stop_child(
        &mut self,
        child: &mut ManagedChild,
        run: Run,
        live: bool,
        force: &CancellationToken,
    ) -> std::io::Result<ExitStatus> {
        self.set(|s| s.state = ServiceState::Stopping { run, live });
        let pid = run.pid;
        if sys::is_stopped(pid) {
            // A stopped process acts on no signal but SIGKILL: its grace would only be waited out.
            tracing::warn!(service = %self.spec.name, pid, "the service is stopped (T state); killing it without grace");
            sys::signal_group(pid, Signal::SIGKILL);
        } else {
            sys::signal_group(pid, Signal::SIGTERM);
        }
        let grace = tokio::time::sleep(self.spec.grace);
        tokio::pin!(grace);
        let mut status = None;
        loop {
            tokio::select! {
                s = child.wait(), if status.is_none() => {
                    status = Some(s);
                    if !sys::group_alive(pid) {
                        break;
                    }
                }
                () = tokio::time::sleep(GROUP_POLL), if status.is_some() => {
                    if !sys::group_alive(pid) {
                        break;
                    }
                }
                () = &mut grace => {
                    tracing::warn!(service = %self.spec.name, grace = %humantime::format_duration(self.spec.grace), "service did not stop within its grace period, killing it");
                    sys::signal_group(pid, Signal::SIGKILL);
                    break;
                }
                () = force.cancelled() => {
                    sys::signal_group(pid, Signal::SIGKILL);
                    break;
                }
            }
        }
        match status {
            Some(s) => s,
            None => child.wait().await,
        }
    }

    /// Applies the restart policy to a run that ended on its own.
    fn decide(&mut self, ending: Ending, uptime: Duration) -> Next {
        let was_looping = self.history.crash_loop;
        let sample = rand::random::<f64>() * 2.0 - 1.0;
        let decision = policy::on_exit(
            &self.policy,
            &mut self.history,
            ending,
            uptime,
            self.epoch.elapsed(),
            sample,
        );
        let looping = self.history.crash_loop;
        self.set(|s| s.crash_loop = looping);
        if was_looping && !looping {
            tracing::info!(service = %self.spec.name, "the crash loop is over: its failures left the window");
        }
        if looping && !was_looping {
            tracing::error!(
                service = %self.spec.name,
                failures = self.history.recent_failures(),
                window = %humantime::format_duration(self.policy.crash_loop_window),
                "service is in crash loop"
            );
            self.critical_failed();
        }
        match decision {
            Decision::Restart { delay } => {
                tracing::info!(service = %self.spec.name, restart_in_ms = delay.as_millis() as u64, "restarting after backoff");
                Next::Backoff(delay)
            }
            Decision::Done { failed } => {
                if failed {
                    self.critical_failed();
                    Next::Idle(Down::Failed)
                } else {
                    Next::Idle(Down::Exited)
                }
            }
        }
    }

    /// Forgets the restart history: a restart asked for (an operator after fixing the cause, a
    /// planned restart) starts with no backoff and no crash loop.
    fn fresh_history(&mut self) {
        if self.history.crash_loop {
            tracing::info!(service = %self.spec.name, "the crash loop is over: the service was restarted on request");
        }
        self.history = History::default();
        self.set(|s| s.crash_loop = false);
    }

    fn critical_failed(&self) {
        if self.spec.critical {
            let name = self.name().to_owned();
            self.critical.send_if_modified(|c| {
                if c.is_none() {
                    tracing::error!(service = %name, "a critical service failed, shutting the machine down");
                    *c = Some(name);
                    true
                } else {
                    false
                }
            });
        }
    }

    async fn backoff(&mut self, delay: Duration, shutdown: &CancellationToken) -> Next {
        self.set(|s| s.state = ServiceState::Backoff);
        tokio::select! {
            () = tokio::time::sleep(delay) => Next::Start,
            Some(cmd) = self.commands.recv() => match cmd {
                Command::Stop(reply) => {
                    let _ = reply.send(());
                    Next::Idle(Down::Stopped)
                }
                Command::Start(reply) => {
                    let _ = reply.send(());
                    Next::Start
                }
                Command::Restart(reply) => {
                    self.fresh_history();
                    let _ = reply.send(());
                    Next::Start
                }
                Command::Fail(_, reply) => {
                    let _ = reply.send(());
                    Next::Backoff(delay)
                }
            },
            () = shutdown.cancelled() => Next::Shutdown,
        }
    }

    async fn idle(&mut self, down: Down, shutdown: &CancellationToken) -> Next {
        self.set(|s| s.state = down.into());
        loop {
            tokio::select! {
                Some(cmd) = self.commands.recv() => match cmd {
                    Command::Stop(reply) | Command::Fail(_, reply) => {
                        let _ = reply.send(());
                    }
                    Command::Start(reply) | Command::Restart(reply) => {
                        // An operator starting it again gets a fresh policy history.
                        self.fresh_history();
                        let _ = reply.send(());
                        return Next::Start;
                    }
                },
                () = shutdown.cancelled() => return Next::Shutdown,
            }
        }
    }
}

/// Waits until any of `rxs` changes. A closed channel never changes again, so it is not waited
/// for (when all are closed this never returns).
async fn any_changed(rxs: &mut [watch::Receiver<ServiceStatus>]) {
    let open: Vec<_> = rxs
        .iter_mut()
        .filter(|r| r.has_changed().is_ok())
        .map(|r| Box::pin(r.changed()))
        .collect();
    if open.is_empty() {
        return std::future::pending().await;
    }
    let _ = futures_util::future::select_all(open).await;
}

/// Why a run ended, for the status's reason: its exit code or signal and its last line of
/// output (a stamped tail line; the stamp is left out), e.g. `exited with code 1: OSError:
/// [Errno 98] address already in use`.
fn exit_cause(exit: &ExitInfo, last_line: Option<&String>) -> String {
    let how = match (exit.code, exit.signal) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(s) => format!("killed by {s}"),
            Err(_) => format!("killed by signal {signal}"),
        },
        (None, None) => "ended".to_owned(),
    };
    match last_line.map(|l| l.split_once(' ').map_or(l.as_str(), |(_, rest)| rest).trim()) {
        Some(line) if !line.is_empty() => format!("{how}: {line}"),
        _ => how,
    }
}

fn exit_info(status: &std::io::Result<ExitStatus>) -> ExitInfo {
    use std::os::unix::process::ExitStatusExt;
    let (code, signal) = match status {
        Ok(s) => (s.code(), s.signal()),
        Err(_) => (None, None),
    };
    ExitInfo {
        code,
        signal,
        at: SystemTime::now(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_cause_names_the_code_or_signal_and_the_last_line() {
        let exit = |code, signal| ExitInfo {
            code,
            signal,
            at: SystemTime::now(),
        };
        let line = "2026-01-01T00:00:00.000Z OSError: [Errno 98] address already in use".to_owned();
        assert_eq!(
            exit_cause(&exit(Some(1), None), Some(&line)),
            "exited with code 1: OSError: [Errno 98] address already in use"
        );
        assert_eq!(exit_cause(&exit(None, Some(9)), None), "killed by SIGKILL");
        assert_eq!(exit_cause(&exit(None, None), None), "ended");
    }
}

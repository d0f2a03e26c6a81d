//! The supervisor with real processes: the `machine` binary runs as PID 1 of a fresh PID
//! namespace (`unshare --pid --fork --mount-proc`, we are root) with `[services.*]` from a
//! config file in a temp dir, and the tests watch its output, its log files and the processes
//! of the namespace from outside. One test drives the library's handle in-process.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use machine::supervisor::{ServiceState, ServiceStatus, Supervisor};

use crate::support::wait_until;

/// One process as /proc shows it.
#[derive(Debug, Clone)]
struct Proc {
    pid: u32,
    state: char,
}

/// `machine run` as PID 1 of its own PID namespace.
struct Machine {
    dir: tempfile::TempDir,
    unshare: Child,
    pid1: u32,
    ns: String,
    // The hub's Redis lives outside the namespace, so the namespace holds only the services
    // under test (local mode would add a redis-server of its own).
    _redis: testkit::RedisServer,
}

impl Machine {
    /// Writes `services_toml` (with `{dir}` replaced by the temp dir) after a base config and
    /// starts the machine.
    fn start(services_toml: &str) -> Machine {
        let dir = tempfile::tempdir().expect("a temp dir");
        let d = dir.path().display().to_string();
        let config = format!(
            "[machine]\nid = \"test\"\nworkspace = \"{d}/ws\"\n[log]\nformat = \"text\"\nfilter = \"info\"\n{}",
            services_toml.replace("{dir}", &d)
        );
        std::fs::write(dir.path().join("machine.toml"), config).expect("config written");
        let out = std::fs::File::create(dir.path().join("stdout")).expect("stdout file");
        let err = std::fs::File::create(dir.path().join("stderr")).expect("stderr file");
        let redis = testkit::RedisServer::start();
        let mut cmd = Command::new("unshare");
        cmd.args(["--pid", "--fork", "--mount-proc", env!("CARGO_BIN_EXE_machine"), "run"])
            .env("MACHINE_CONFIG", dir.path().join("machine.toml"))
            .env("MACHINE_WORKSPACE", dir.path().join("ws"))
            .env("MACHINE_HEALTH_PORT", testkit::free_port().to_string())
            .env("HUB_REDIS_URL", redis.url())
            .env("NO_COLOR", "1")
            .env_remove("RUST_LOG")
            .env_remove("LOG_FORMAT")
            .env_remove("WORKER_CONNECTORS")
            .env_remove("WORKERS")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        let unshare = cmd.spawn().expect("unshare runs (util-linux, as root)");
        let upid = unshare.id();
        let pid1 = wait_until(Duration::from_secs(10), "the namespace's PID 1 to appear", || {
            procs()
                .into_iter()
                .find(|(_, ppid, _)| *ppid == upid)
                .map(|(p, _, _)| p.pid)
        });
        let ns = std::fs::read_link(format!("/proc/{pid1}/ns/pid"))
            .expect("the pid namespace of PID 1 is readable as root")
            .display()
            .to_string();
        let mine = std::fs::read_link("/proc/self/ns/pid").unwrap().display().to_string();
        assert_ne!(ns, mine, "machine runs in its own PID namespace");
        let m = Machine {
            dir,
            unshare,
            pid1,
            ns,
            _redis: redis,
        };
        m.wait_for_output("machine starting", Duration::from_secs(10));
        m
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// Everything the machine printed so far (stdout, then stderr), without colours.
    fn output(&self) -> String {
        let mut s = String::new();
        for f in ["stdout", "stderr"] {
            let mut buf = Vec::new();
            if let Ok(mut file) = std::fs::File::open(self.path(f)) {
                let _ = file.read_to_end(&mut buf);
            }
            s.push_str(&strip_ansi(&String::from_utf8_lossy(&buf)));
        }
        s
    }

    fn stdout(&self) -> String {
        strip_ansi(&std::fs::read_to_string(self.path("stdout")).unwrap_or_default())
    }

    fn wait_for_output(&self, needle: &str, timeout: Duration) -> String {
        wait_until(timeout, &format!("`{needle}` in the machine's output"), || {
            let out = self.output();
            out.contains(needle).then_some(out)
        })
    }

    /// The processes of the machine's namespace (PID 1 included), as seen from outside.
    fn processes(&self) -> Vec<Proc> {
        procs()
            .into_iter()
            .filter(|(p, _, _)| {
                std::fs::read_link(format!("/proc/{}/ns/pid", p.pid)).is_ok_and(|l| l.display().to_string() == self.ns)
            })
            .map(|(p, _, _)| p)
            .collect()
    }

    fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid1 as i32), sig).expect("PID 1 can be signalled");
    }

    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.unshare.try_wait().expect("unshare can be waited for") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "machine did not exit within {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) -> ExitStatus {
        self.signal(nix::sys::signal::Signal::SIGTERM);
        self.wait_exit(Duration::from_secs(20))
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        // Killing PID 1 kills the whole namespace.
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(self.pid1 as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.unshare.kill();
        let _ = self.unshare.wait();
    }
}

/// Every process: (pid and state, ppid, pgrp).
fn procs() -> Vec<(Proc, u32, u32)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((_, tail)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = tail.split_ascii_whitespace();
        let state = f.next().and_then(|s| s.chars().next()).unwrap_or('?');
        let ppid = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        let pgrp = f.next().and_then(|s| s.parse().ok()).unwrap_or(0);
        out.push((Proc { pid, state }, ppid, pgrp));
    }
    out
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn lines_of(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

fn nanos(path: &Path) -> Vec<u128> {
    lines_of(path)
        .iter()
        .map(|l| l.trim().parse().expect("a date +%s%N line"))
        .collect()
}

#[test]
fn orphans_are_reaped_and_managed_exit_codes_survive() {
    let mut m = Machine::start(
        r#"
[services.orphans]
command = ["/bin/sh", "-c", "i=0; while [ $i -lt 1000 ]; do (sleep 0.05 &); i=$((i+1)); done; sleep 1; exit 7"]
restart = "never"
[services.bystander]
command = ["/bin/sh", "-c", "sleep 1; exit 3"]
restart = "never"
"#,
    );
    // Both exit non-zero, so both are crashes, logged with their last lines before the fields.
    let out = m.wait_for_output("service=orphans code=7", Duration::from_secs(60));
    assert!(
        out.contains("service=bystander code=3"),
        "the reaper did not take a managed child's status:\n{out}"
    );
    let left = wait_until(Duration::from_secs(10), "the namespace to hold only PID 1", || {
        let ps = m.processes();
        (ps.len() == 1).then_some(ps)
    });
    assert_eq!(left[0].pid, m.pid1);
    assert!(left.iter().all(|p| p.state != 'Z'), "{left:?}");
    let status = m.stop();
    assert_eq!(status.code(), Some(0), "{}", m.output());
}

#[test]
fn sigterm_stops_service_trees_within_their_grace() {
    let mut m = Machine::start(
        r#"
[services.tree]
command = ["/bin/sh", "-c", "sleep 1000 & sleep 1000 & wait"]
grace = "8s"
[services.stubborn]
command = ["/bin/sh", "-c", "trap '' TERM; sleep 1000 & sleep 1000 & wait"]
grace = "1s"
"#,
    );
    // PID 1, two shells and four sleepers.
    wait_until(Duration::from_secs(10), "both service trees to run", || {
        (m.processes().len() == 7).then_some(())
    });
    let started = Instant::now();
    m.signal(nix::sys::signal::Signal::SIGTERM);
    let status = m.wait_exit(Duration::from_secs(20));
    let took = started.elapsed();
    let out = m.output();
    assert_eq!(status.code(), Some(0), "{out}");
    assert!(took >= Duration::from_secs(1), "stubborn got its grace: {took:?}");
    assert!(
        took < Duration::from_secs(5),
        "tree stopped on SIGTERM, not after its 8s grace: {took:?}"
    );
    assert!(
        out.contains("service did not stop within its grace period, killing it service=stubborn"),
        "{out}"
    );
    assert!(!out.contains("killing it service=tree"), "{out}");
    assert!(out.contains("machine stopped"), "{out}");
    assert!(m.processes().is_empty(), "nothing of the namespace is left");
}

#[test]
fn a_crashing_service_backs_off_then_crash_loops() {
    let mut m = Machine::start(
        r#"
[supervisor]
backoff_initial = "100ms"
backoff_max = "5s"
backoff_jitter = 0.0
crash_loop_failures = 4
crash_loop_window = "1m"
[services.crasher]
command = ["/bin/sh", "-c", "date +%s%N >> {dir}/starts; exit 1"]
"#,
    );
    let out = m.wait_for_output("service is in crash loop service=crasher", Duration::from_secs(20));
    let delays: Vec<u64> = out
        .lines()
        .filter(|l| l.contains("restarting after backoff service=crasher"))
        .filter_map(|l| l.split("restart_in_ms=").nth(1))
        .map(|v| v.trim().parse().expect("a number of milliseconds"))
        .collect();
    assert_eq!(delays, [100, 200, 400, 5000], "{out}");
    let starts = nanos(&m.path("starts"));
    assert_eq!(starts.len(), 4, "{out}");
    let gaps: Vec<u128> = starts.windows(2).map(|w| (w[1] - w[0]) / 1_000_000).collect();
    for (gap, want) in gaps.iter().zip([100u128, 200, 400]) {
        assert!(
            *gap >= want && *gap < want + 400,
            "restart gaps {gaps:?} do not follow the backoff"
        );
    }
    assert!(gaps.windows(2).all(|w| w[0] < w[1]), "delays grow: {gaps:?}");
    assert_eq!(
        m.stop().code(),
        Some(0),
        "a non-critical crash loop does not fail the machine"
    );
}

#[test]
fn a_critical_crash_loop_shuts_the_machine_down() {
    let mut m = Machine::start(
        r#"
[supervisor]
backoff_initial = "50ms"
crash_loop_failures = 3
[services.other]
command = ["sleep", "1000"]
[services.vital]
command = ["/bin/sh", "-c", "exit 2"]
critical = true
"#,
    );
    let status = m.wait_exit(Duration::from_secs(20));
    let out = m.output();
    assert_eq!(status.code(), Some(3), "{out}");
    assert!(
        out.contains("a critical service failed, shutting the machine down service=vital"),
        "{out}"
    );
}

#[test]
fn after_holds_a_dependant_until_its_dependency_is_ready() {
    let mut m = Machine::start(
        r#"
[services.db]
command = ["/bin/sh", "-c", "sleep 1; touch {dir}/db-ready; exec sleep 1000"]
ready = { command = ["test", "-e", "{dir}/db-ready"], interval = "100ms" }
[services.app]
command = ["/bin/sh", "-c", "if [ -e {dir}/db-ready ]; then echo dependency-was-ready; else echo dependency-not-ready; fi; exec sleep 1000"]
after = ["db"]
"#,
    );
    let out = m.wait_for_output("[app] dependency-", Duration::from_secs(20));
    assert!(out.contains("[app] dependency-was-ready"), "{out}");
    let ready_at = out.find("service is ready service=db").expect("db became ready");
    let app_at = out.find("service started service=app").expect("app started");
    assert!(ready_at < app_at, "{out}");
    // Failing the probe until it came up is a normal start, not a warning.
    assert!(!out.contains("readiness probe failing"), "{out}");
    assert_eq!(m.stop().code(), Some(0));
}

#[test]
fn a_failing_liveness_probe_restarts_the_service() {
    let mut m = Machine::start(
        r#"
[services.hung]
command = ["/bin/sh", "-c", "date +%s%N >> {dir}/starts; touch {dir}/alive; exec sleep 1000"]
liveness = { command = ["test", "-e", "{dir}/alive"], interval = "100ms", failures = 2 }
grace = "1s"
"#,
    );
    let starts = m.path("starts");
    wait_until(Duration::from_secs(10), "the first start", || {
        (lines_of(&starts).len() == 1).then_some(())
    });
    // While the probe passes nothing happens.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(lines_of(&starts).len(), 1, "{}", m.output());
    std::fs::remove_file(m.path("alive")).unwrap();
    wait_until(Duration::from_secs(10), "a restart", || {
        (lines_of(&starts).len() >= 2).then_some(())
    });
    let out = m.output();
    assert!(out.contains("liveness probe failed, restarting the service"), "{out}");
    assert_eq!(m.stop().code(), Some(0));
}

#[test]
fn log_lines_are_prefixed_rotated_and_cut() {
    let mut m = Machine::start(
        r#"
[supervisor]
log_max_bytes = 2048
log_files = 2
log_max_line_bytes = 100
[services.chatty]
command = ["/bin/sh", "-c", "i=0; while [ $i -lt 1000 ]; do echo \"line $i\"; i=$((i+1)); done; head -c 100000 /dev/zero | tr '\\0' x; echo; printf 'bad \\377 byte\\n'; echo done; exec sleep 1000"]
"#,
    );
    m.wait_for_output("[chatty] done", Duration::from_secs(20));
    let stdout = m.stdout();
    for i in [0, 1, 500, 999] {
        assert!(
            stdout.contains(&format!("\n[chatty] line {i}\n")) || stdout.starts_with(&format!("[chatty] line {i}\n")),
            "line {i}"
        );
    }
    assert!(stdout.contains(&format!("[chatty] {}\n", "x".repeat(100))));
    assert!(stdout.contains("[chatty] bad \u{fffd} byte\n"));
    let logs = m.path("ws/logs");
    let current = logs.join("chatty.log");
    for f in ["chatty.log", "chatty.log.1", "chatty.log.2"] {
        let len = std::fs::metadata(logs.join(f))
            .unwrap_or_else(|e| panic!("{f}: {e}"))
            .len();
        assert!(len <= 2048, "{f} is {len} bytes");
    }
    assert!(
        !logs.join("chatty.log.3").exists(),
        "only log_files rotated files are kept"
    );
    let newest = lines_of(&current);
    assert_eq!(newest.last().map(String::as_str), Some("done"));
    assert!(
        newest.contains(&"x".repeat(100)),
        "the overlong line is cut at 100 bytes: {newest:?}"
    );
    assert_eq!(m.stop().code(), Some(0));
}

/// The handle other subsystems use: status, the in-memory tail, stop/start/restart, and the
/// health watch, with real children (in this test process, without the reaper).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_handle_controls_services_and_keeps_the_tail() {
    let dir = tempfile::tempdir().unwrap();
    let file = r#"
[supervisor]
log_tail_lines = 3
[services.talker]
command = ["/bin/sh", "-c", "for i in 1 2 3 4 5; do echo talk-$i; done; exec sleep 1000"]
grace = "2s"
[services.follower]
command = ["sleep", "1000"]
after = ["talker"]
grace = "2s"
"#;
    let env = BTreeMap::from([("MACHINE_WORKSPACE", dir.path().to_str().unwrap())]);
    let config = machine::config::load_str(Some(("machine.toml", file)), &env).unwrap();
    let services = config.plan.services.clone();
    let order: Vec<_> = ["talker", "follower"]
        .iter()
        .map(|n| services.iter().find(|s| s.name == *n).unwrap().clone())
        .collect();
    let sup = Supervisor::new(order, &config.machine.supervisor, dir.path()).unwrap();
    let handle = sup.handle();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let force = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(sup.run(shutdown.clone(), force.clone()));
    let body = async {
        let mut watch = handle.watch(&["talker".to_owned(), "follower".to_owned()]).unwrap();
        watch.wait_healthy().await.unwrap();
        while handle.logs("talker", 10).unwrap().len() < 3 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Each line carries the time it arrived in front.
        let lines = |n| -> Vec<String> {
            let logs = handle.logs("talker", n).unwrap();
            logs.iter().map(|l| l.split_once(' ').unwrap().1.to_owned()).collect()
        };
        assert_eq!(lines(10), ["talk-3", "talk-4", "talk-5"]);
        assert_eq!(lines(1), ["talk-5"]);
        let status = handle.status();
        assert_eq!(
            status.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
            ["talker", "follower"]
        );
        assert!(
            status
                .iter()
                .all(|s| matches!(s.state, ServiceState::Running { ready: true, .. }))
        );

        handle.stop("follower").await.unwrap();
        let follower = handle.service("follower").unwrap();
        assert_eq!(follower.state, ServiceState::Stopped);
        assert_eq!(follower.last_exit.as_ref().unwrap().signal, Some(15));
        assert!(!watch.healthy());
        handle.start("follower").await.unwrap();
        watch.wait_healthy().await.unwrap();

        let before = handle.service("talker").unwrap();
        handle.restart("talker").await.unwrap();
        watch.wait_healthy().await.unwrap();
        let after = handle.service("talker").unwrap();
        assert_eq!(after.restarts, before.restarts + 1);
        assert_ne!(after.state.pid(), before.state.pid());
        assert!(handle.logs("nope", 1).is_err());
    };
    tokio::time::timeout(Duration::from_secs(30), body)
        .await
        .expect("the handle answers in time");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the supervisor stops in time")
        .unwrap()
        .unwrap();
    assert!(handle.status().iter().all(|s| s.state == ServiceState::Stopped));
}

#[test]
fn a_second_signal_stops_everything_at_once_and_sighup_is_ignored() {
    let mut m = Machine::start(
        r#"
[services.stubborn]
command = ["/bin/sh", "-c", "trap '' TERM; sleep 1000 & wait"]
grace = "60s"
"#,
    );
    m.wait_for_output("service started service=stubborn", Duration::from_secs(10));
    m.signal(nix::sys::signal::Signal::SIGHUP);
    m.wait_for_output("SIGHUP received", Duration::from_secs(10));
    let started = Instant::now();
    m.signal(nix::sys::signal::Signal::SIGTERM);
    m.wait_for_output("shutting down gracefully", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(300));
    m.signal(nix::sys::signal::Signal::SIGINT);
    let status = m.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(4), "{}", m.output());
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The actor's transitions, as its handle publishes them: the pid, start and readiness come
/// with the running states and leave with them; a run's end is kept as its last exit; a
/// failed liveness probe is published as the stop of a process that is not live. The app
/// ignores SIGTERM so that each stop lasts its grace and can be seen.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_actor_publishes_each_transition_with_its_data() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_str().unwrap();
    let file = format!(
        r#"
[services.app]
command = ["/bin/sh", "-c", "trap '' TERM; exec sleep 1000"]
ready = {{ command = ["test", "-e", "{d}/ready"], interval = "50ms", failures = 1 }}
liveness = {{ command = ["test", "!", "-e", "{d}/hung"], interval = "50ms", failures = 1 }}
grace = "1s"
[services.once]
command = ["/bin/sh", "-c", "echo last words; exit 3"]
restart = "never"
"#
    );
    let env = BTreeMap::from([("MACHINE_WORKSPACE", d)]);
    let config = machine::config::load_str(Some(("machine.toml", &file)), &env).unwrap();
    let services: Vec<_> = ["app", "once"]
        .iter()
        .map(|n| config.plan.services.iter().find(|s| s.name == *n).unwrap().clone())
        .collect();
    let sup = Supervisor::new(services, &config.machine.supervisor, dir.path()).unwrap();
    let handle = sup.handle();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let force = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(sup.run(shutdown.clone(), force.clone()));
    let touch = |name: &str| std::fs::write(dir.path().join(name), "").unwrap();
    let rm = |name: &str| std::fs::remove_file(dir.path().join(name)).unwrap();
    // Polls the service's status until `want` holds (the watch keeps only the latest value).
    let until = |name: &'static str, want: fn(&ServiceStatus) -> bool| {
        let handle = handle.clone();
        async move {
            loop {
                let s = handle.service(name).unwrap();
                if want(&s) {
                    return s;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    let body = async {
        // Started, its readiness probe not passing yet: a process, not ready.
        let starting = until("app", |s| matches!(s.state, ServiceState::Starting(_))).await;
        let pid = starting.state.pid().expect("a starting service has a pid");
        assert!(!starting.serving() && starting.state.live());
        touch("ready");
        let running = until("app", |s| matches!(s.state, ServiceState::Running { ready: true, .. })).await;
        assert_eq!(running.state.pid(), Some(pid));
        assert!(running.healthy() && running.reason.is_none(), "{running:?}");
        // Once ready, a failing readiness probe leaves it running, not ready, with why.
        rm("ready");
        let unready = until("app", |s| matches!(s.state, ServiceState::Running { ready: false, .. })).await;
        assert_eq!(unready.state.pid(), Some(pid));
        assert!(
            unready
                .reason
                .as_deref()
                .unwrap()
                .starts_with("readiness probe failing"),
            "{unready:?}"
        );
        // A stop on request: the process is stopping (live), then down with how it ended.
        let stop = tokio::spawn({
            let handle = handle.clone();
            async move { handle.stop("app").await }
        });
        let stopping = until("app", |s| matches!(s.state, ServiceState::Stopping { .. })).await;
        assert_eq!(
            stopping.state,
            ServiceState::Stopping {
                run: stopping.state.run().unwrap(),
                live: true
            }
        );
        assert_eq!(stopping.state.pid(), Some(pid));
        stop.await.unwrap().unwrap();
        let stopped = handle.service("app").unwrap();
        assert_eq!(stopped.state, ServiceState::Stopped);
        assert!(stopped.state.pid().is_none() && !stopped.state.ready());
        assert_eq!(
            stopped.last_exit.as_ref().unwrap().signal,
            Some(9),
            "it ignored SIGTERM"
        );
        // Started again: a new run, counted, the last exit kept.
        touch("ready");
        handle.start("app").await.unwrap();
        let again = until("app", |s| matches!(s.state, ServiceState::Running { ready: true, .. })).await;
        assert_ne!(again.state.pid(), Some(pid));
        assert_eq!(again.restarts, 1);
        assert!(again.last_exit.is_some());
        // A failed liveness probe stops a process that is not live, then starts it again.
        touch("hung");
        let unhealthy = until("app", |s| matches!(s.state, ServiceState::Stopping { live: false, .. })).await;
        assert_eq!(unhealthy.state.pid(), again.state.pid());
        assert!(!unhealthy.serving() && !unhealthy.state.live());
        assert!(
            unhealthy
                .reason
                .as_deref()
                .unwrap()
                .starts_with("liveness probe failed"),
            "{unhealthy:?}"
        );
        rm("hung");
        let restarted = until("app", |s| s.restarts == 2 && s.state.run().is_some()).await;
        assert!(restarted.state.live());
        // A run that ended on its own and is not restarted: down, with its code and last words.
        let once = until("once", |s| s.state.is_down()).await;
        assert_eq!(once.state, ServiceState::Failed);
        assert_eq!(once.last_exit.as_ref().unwrap().code, Some(3));
        assert_eq!(once.reason.as_deref(), Some("exited with code 3: last words"));
    };
    tokio::time::timeout(Duration::from_secs(40), body)
        .await
        .expect("the transitions happen in time");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("the supervisor stops in time")
        .unwrap()
        .unwrap();
    assert!(
        handle
            .status()
            .iter()
            .all(|s| s.state.is_down() && s.state.pid().is_none())
    );
}

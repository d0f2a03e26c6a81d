//! The operator commands against the real binary: the control socket (`status`, `logs`,
//! `restart`, `stop`), finding the machine, and the `jobs` commands' contract with the broker.

use std::io::{BufRead as _, BufReader};
use std::os::unix::fs::PermissionsExt as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{machine, run, wait_until};

/// A machine running on its own workspace against a test Redis, with an `echo` service, a
/// service that crashes at once, and one simulation worker.
struct Running {
    child: crate::support::KillOnDrop,
    port: u16,
    ws: tempfile::TempDir,
    redis: String,
}

impl Running {
    fn start(redis: &testkit::RedisServer, id: &str) -> Running {
        Running::start_in(tempfile::tempdir().unwrap(), redis, id)
    }

    fn start_in(ws: tempfile::TempDir, redis: &testkit::RedisServer, id: &str) -> Running {
        let port = testkit::free_port();
        let config = ws.path().join("machine.toml");
        std::fs::write(
            &config,
            r#"
[services.echo]
command = ["/bin/sh", "-c", "echo hello from echo; exec sleep 600"]
grace = "1s"
[services.crashy]
command = ["/bin/sh", "-c", "echo about to fail; exit 1"]
[supervisor]
crash_loop_failures = 2
backoff_max = "200ms"
[worker]
drain = "3s"
"#,
        )
        .unwrap();
        let child = machine()
            .arg("run")
            .env("MACHINE_CONFIG", &config)
            .env("MACHINE_ID", id)
            .env("MACHINE_HEALTH_PORT", port.to_string())
            .env("MACHINE_WORKSPACE", ws.path())
            .env("HUB_REDIS_URL", redis.url())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let m = Running {
            child: child.into(),
            port,
            ws,
            redis: redis.url(),
        };
        wait_until(Duration::from_secs(20), "the control socket", || {
            std::os::unix::net::UnixStream::connect(m.socket()).ok()
        });
        m
    }

    fn socket(&self) -> PathBuf {
        self.ws.path().join("run/control.sock")
    }

    /// A `machine` command that finds this machine by its workspace, as an operator's would.
    fn cli(&self) -> Command {
        let mut cmd = machine();
        cmd.env("MACHINE_WORKSPACE", self.ws.path())
            .env("HUB_REDIS_URL", &self.redis);
        cmd
    }

    fn status(&self) -> Value {
        let (out, stdout, stderr) = run(self.cli().args(["status", "--json"]));
        assert!(out.status.success(), "{stderr}");
        serde_json::from_str(&stdout).unwrap()
    }

    fn service(&self, name: &str) -> Value {
        self.status()["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .cloned()
            .unwrap()
    }

    fn submit(&self, payload: &str, extra: &[&str]) -> String {
        let (out, id, stderr) = run(self
            .cli()
            .args(["jobs", "submit", "--service", "simulation", "--payload", payload])
            .args(extra));
        assert!(out.status.success(), "{stderr}");
        id.trim().to_owned()
    }

    fn show(&self, id: &str) -> Value {
        let (out, stdout, stderr) = run(self.cli().args(["jobs", "show", id, "--json"]));
        assert!(out.status.success(), "{stderr}");
        serde_json::from_str(&stdout).unwrap()
    }

    fn wait_status(&self, id: &str, status: &str) -> Value {
        wait_until(Duration::from_secs(30), &format!("job {id} {status}"), || {
            let v = self.show(id);
            (v["job"]["status"] == status).then_some(v)
        })
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "the machine did not stop within {within:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Lines a child prints, as they come.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

/// Whether `line` starts with an RFC 3339 UTC time with milliseconds.
fn stamped(line: &str) -> bool {
    line.get(..24)
        .is_some_and(|t| humantime::parse_rfc3339(t).is_ok() && t.ends_with('Z'))
}

#[test]
fn the_control_socket_serves_status_logs_restart_and_stop() {
    let redis = testkit::RedisServer::start();
    let mut m = Running::start(&redis, "cli1");

    let mode = std::fs::metadata(m.socket()).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the socket is its owner's only");

    // Logs: the last N lines of a service, each with its timestamp, and the machine's own.
    let line = wait_until(Duration::from_secs(20), "echo's output", || {
        let (out, stdout, _) = run(m.cli().args(["logs", "echo", "-n", "1"]));
        (out.status.success() && stdout.contains("hello from echo")).then_some(stdout)
    });
    assert_eq!(line.lines().count(), 1, "{line}");
    assert!(stamped(&line), "{line}");
    let (out, stdout, stderr) = run(m.cli().args(["logs", "-n", "3"]));
    assert!(out.status.success(), "{stderr}");
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    let (out, _, stderr) = run(m.cli().args(["logs", "nope"]));
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr.contains("nope"), "{stderr}");

    // Follow sees the line a restart makes, and the restart gives the service a new pid.
    let mut follower = m
        .cli()
        .args(["logs", "echo", "-f", "-n", "1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let followed = lines_of(&mut follower);
    let first = followed.recv_timeout(Duration::from_secs(10)).unwrap();
    assert!(first.contains("hello from echo"), "{first}");
    let before = m.service("echo")["pid"].as_u64().unwrap();
    let (out, stdout, stderr) = run(m.cli().args(["restart", "echo"]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("restarted echo"), "{stdout}");
    let next = followed
        .recv_timeout(Duration::from_secs(10))
        .expect("follow sees the new line");
    assert!(next.contains("hello from echo") && stamped(&next), "{next}");
    let after = wait_until(Duration::from_secs(10), "echo's new pid", || {
        m.service("echo")["pid"].as_u64().filter(|p| *p != before)
    });
    assert_ne!(before, after);
    let _ = follower.kill();
    let _ = follower.wait();

    // Over TCP, without the control token, the same route is refused: the socket granted it.
    let (out, _, stderr) = run(m
        .cli()
        .args(["restart", "echo", "--url", &format!("http://127.0.0.1:{}", m.port)]));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains("403") && stderr.contains("MACHINE_CONTROL_TOKEN"),
        "{stderr}"
    );

    // Jobs: a completed job's result is typed JSON; a failed job says why.
    let done = m.submit(r#"{"duration_ms": 20, "steps": 2}"#, &[]);
    let shown = m.wait_status(&done, "completed");
    assert_eq!(shown["job"]["priority"], 50, "numbers are numbers: {shown}");
    assert_eq!(shown["job"]["max_retries"], 3, "{shown}");
    assert!(shown["job"]["payload"].is_object(), "{shown}");
    assert!(shown["result"].is_object(), "the result is JSON: {shown}");
    let failed = m.submit(r#"{"duration_ms": 20, "fail": "fatal"}"#, &[]);
    m.wait_status(&failed, "failed");
    let (out, text, _) = run(m.cli().args(["jobs", "show", &failed]));
    assert!(out.status.success());
    let error = text.lines().find(|l| l.starts_with("error ")).expect("the error line");
    assert!(error.len() > "error ".len() + 10, "{text}");

    // Status: a 36-character job id stays whole and aligned at 80 columns; a crashing service
    // shows as crash_loop; durations read as people say them.
    let busy = m.submit(r#"{"duration_ms": 60000, "steps": 100}"#, &[]);
    m.wait_status(&busy, "in_progress");
    wait_until(Duration::from_secs(20), "crashy in crash loop", || {
        (m.service("crashy")["crash_loop"] == true).then_some(())
    });
    let (out, text, stderr) = run(m.cli().arg("status").env("COLUMNS", "80"));
    assert!(out.status.success(), "{stderr}");
    for line in text.lines() {
        assert!(line.chars().count() <= 80, "{line:?} is wider than 80:\n{text}");
    }
    let header = text.lines().find(|l| l.starts_with("WORKER")).unwrap();
    let row = text
        .lines()
        .find(|l| l.contains(&busy))
        .unwrap_or_else(|| panic!("{busy} whole on one line:\n{text}"));
    assert_eq!(row.find(&busy), header.find("JOB"), "aligned:\n{text}");
    let crashy = text.lines().find(|l| l.starts_with("crashy")).unwrap();
    assert!(crashy.contains("crash_loop"), "{text}");
    assert!(!text.contains("backoff"), "{text}");
    assert!(text.lines().next().unwrap().contains(" up "), "{text}");
    assert!(text.contains("s ago"), "{text}");
    // Columns left out to fit are named, at 80 and at 60 columns, and no cell is cut to one
    // letter a line.
    for columns in ["80", "60"] {
        let (out, text, stderr) = run(m.cli().arg("status").env("COLUMNS", columns));
        assert!(out.status.success(), "{stderr}");
        let header = text.lines().find(|l| l.starts_with("WORKER")).unwrap();
        if !header.contains("ACTIVE") {
            assert!(text.contains("ACTIVE not shown"), "{text}");
        }
        for line in text.lines() {
            assert!(line.chars().count() <= 60 || columns == "80", "{line:?}:\n{text}");
            assert_ne!(line.trim().chars().count(), 1, "a lone letter at {columns}:\n{text}");
        }
    }
    // Under `script`, stdout is a pty of 0x0 columns: the status renders whole, as for a pipe.
    let status_cmd = format!("{} status", env!("CARGO_BIN_EXE_machine"));
    let (out, text, stderr) = run(Command::new("script")
        .args(["-q", "-e", "-c", &status_cmd, "/dev/null"])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TERM", "dumb")
        .env("MACHINE_WORKSPACE", m.ws.path())
        .stdin(Stdio::null()));
    assert!(out.status.success(), "{text}{stderr}");
    let header = text
        .lines()
        .find(|l| l.starts_with("WORKER"))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(header.contains("ACTIVE") && !text.contains("not shown"), "{text}");
    for line in text.lines() {
        assert_ne!(line.trim().chars().count(), 1, "a lone letter at 0x0:\n{text}");
    }

    // Stop waits for the machine to exit, as `systemctl stop` does, saying what the drain waits
    // for: the busy job runs out the 3 s drain and goes back to the queue. When it returns, the
    // machine has exited 0 and removed its socket, so `stop && next` does not race the drain.
    let asked = Instant::now();
    let (out, stdout, stderr) = run(m.cli().arg("stop"));
    assert!(out.status.success(), "{stderr}");
    assert!(
        stdout.contains(&format!("draining 1 job(s): {busy} on ")),
        "the progress names the job: {stdout}"
    );
    assert!(stdout.contains("stopped in "), "{stdout}");
    assert!(
        asked.elapsed() >= Duration::from_secs(3),
        "it waited out the drain: {stdout}"
    );
    let status = m.wait_exit(Duration::from_secs(1));
    assert_eq!(status.code(), Some(0));
    assert!(!m.socket().exists(), "the socket is removed at exit");
    let (out, stdout, _) = run(m.cli().args(["jobs", "show", &busy, "--json"]));
    assert!(out.status.success());
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["job"]["status"], "pending", "the drained job went back: {v}");
}

#[test]
fn stop_now_skips_the_drain_as_a_second_signal_does() {
    let redis = testkit::RedisServer::start();
    // A dead machine's socket is in the way; the new machine replaces it.
    let ws = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(ws.path().join("run")).unwrap();
    drop(std::os::unix::net::UnixListener::bind(ws.path().join("run/control.sock")).unwrap());
    let mut m = Running::start_in(ws, &redis, "cli2");
    let busy = m.submit(r#"{"duration_ms": 60000, "steps": 100}"#, &[]);
    m.wait_status(&busy, "in_progress");
    let asked = Instant::now();
    // `--no-wait` returns once the machine accepted, as `machine stop` used to.
    let (out, stdout, stderr) = run(m.cli().args(["stop", "--now", "--no-wait"]));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("now") && !stdout.contains("stopped in"), "{stdout}");
    let status = m.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(4), "a forced stop");
    assert!(asked.elapsed() < Duration::from_secs(5), "{:?}", asked.elapsed());
    let (out, stdout, _) = run(m.cli().args(["jobs", "show", &busy, "--json"]));
    assert!(out.status.success());
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["job"]["status"], "pending", "the job went back to the queue: {v}");
}

#[test]
fn the_shells_configuration_need_not_validate_to_find_the_machine() {
    let redis = testkit::RedisServer::start();
    let m = Running::start(&redis, "cli3");
    let file = m.ws.path().join("machine.toml");
    let good = std::fs::read_to_string(&file).unwrap();
    // The shell's copy has a service the machine would refuse; another shell lists openai without
    // its key (the secret lives in the machine's environment only).
    let invalid = m.ws.path().join("edited.toml");
    std::fs::write(&invalid, format!("{good}\n[services.bad]\nnope = 1\n")).unwrap();
    let shells: [(&str, Option<&str>); 2] = [
        (invalid.to_str().unwrap(), None),
        (file.to_str().unwrap(), Some("openai:1")),
    ];
    for (config, connectors) in shells {
        let cli = || {
            let mut cmd = m.cli();
            cmd.env("MACHINE_CONFIG", config);
            if let Some(c) = connectors {
                cmd.env("WORKER_CONNECTORS", c);
            }
            cmd
        };
        for args in [&["status"][..], &["logs", "-n", "1"], &["restart", "echo"]] {
            let (out, stdout, stderr) = run(cli().args(args));
            assert!(out.status.success(), "{args:?} with {config}: {stdout}{stderr}");
        }
    }

    // The machine's own file refused by a reload: every problem once, exit 2, nothing changed.
    std::fs::write(&file, format!("{good}\n[services.bad]\nnope = 1\n")).unwrap();
    let (out, _, stderr) = run(m.cli().arg("reload"));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(
        stderr.matches("missing field `command`").count(),
        1,
        "each problem once: {stderr}"
    );
    std::fs::write(&file, &good).unwrap();

    // A reload that rebuilds a busy worker says what it drains while it waits.
    let busy = m.submit(r#"{"duration_ms": 60000, "steps": 100}"#, &[]);
    m.wait_status(&busy, "in_progress");
    std::fs::write(&file, format!("{good}\n[connectors.simulation]\nsteps = 20\n")).unwrap();
    let (out, stdout, stderr) = run(m.cli().arg("reload"));
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("reloading: draining cli3-") && stderr.contains(&busy),
        "{stdout}{stderr}"
    );
    std::fs::write(&file, &good).unwrap();

    // <workspace>/worker_connectors: a comment may follow the value, and a problem names the file.
    let connectors = m.ws.path().join("worker_connectors");
    std::fs::write(&connectors, "simulation:1  # as before\n").unwrap();
    let (out, stdout, stderr) = run(m.cli().arg("reload"));
    assert!(out.status.success(), "{stdout}{stderr}");
    std::fs::write(&connectors, "nope:1\n").unwrap();
    let (out, _, stderr) = run(m.cli().arg("reload"));
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&connectors.display().to_string()) && !stderr.contains("WORKER_CONNECTORS"),
        "blamed on the file: {stderr}"
    );
}

#[test]
fn without_a_machine_the_error_names_what_was_tried() {
    let ws = tempfile::tempdir().unwrap();
    let port = testkit::free_port();
    for args in [&["status"][..], &["logs"], &["restart", "echo"], &["stop"]] {
        let (out, _, stderr) = run(machine()
            .args(args)
            .env("MACHINE_WORKSPACE", ws.path())
            .env("MACHINE_HEALTH_PORT", port.to_string()));
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        let socket = ws.path().join("run/control.sock");
        assert!(
            stderr.contains(&format!("no machine: no control socket at {}", socket.display()))
                && stderr.contains(&format!("nothing answers on 127.0.0.1:{port}")),
            "{args:?}: {stderr}"
        );
    }
    // `status --check` says unhealthy and why.
    let (out, stdout, _) = run(machine()
        .args(["status", "--check"])
        .env("MACHINE_WORKSPACE", ws.path())
        .env("MACHINE_HEALTH_PORT", port.to_string()));
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.starts_with("unhealthy: no machine"), "{stdout}");
    // In local mode with no machine running, `jobs` says which Redis it looked for.
    let (out, _, stderr) = run(machine().args(["jobs", "list"]).env("MACHINE_WORKSPACE", ws.path()));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr.contains(&ws.path().join("run/redis.sock").display().to_string()),
        "{stderr}"
    );
}

#[test]
fn jobs_commands_write_and_read_the_contract() {
    let redis = testkit::RedisServer::start();
    let url = redis.url();
    let jobs = |args: &[&str]| run(machine().arg("jobs").args(args).env("HUB_REDIS_URL", &url));
    let hash = |id: &str, field: &str| -> String {
        let client = redis::Client::open(url.as_str()).unwrap();
        let mut conn = client.get_connection().unwrap();
        redis::cmd("HGET")
            .arg(format!("job:{id}"))
            .arg(field)
            .query(&mut conn)
            .unwrap()
    };
    let submit = |extra: &[&str]| {
        let (out, id, stderr) = jobs(
            &[
                &["submit", "--service", "simulation", "--payload", r#"{"n": 1}"#][..],
                extra,
            ]
            .concat(),
        );
        assert!(out.status.success(), "{stderr}");
        id.trim().to_owned()
    };

    // --max-retries counts retries after the first attempt; the wire counts attempts.
    assert_eq!(hash(&submit(&["--max-retries", "0"]), "max_retries"), "1");
    assert_eq!(hash(&submit(&["--max-retries", "4"]), "max_retries"), "5");
    let plain = submit(&["--priority", "70"]);
    assert_eq!(hash(&plain, "max_retries"), "3", "the API's default");

    // Typed JSON.
    let (out, stdout, stderr) = jobs(&["show", &plain, "--json"]);
    assert!(out.status.success(), "{stderr}");
    let v: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(v["job"]["priority"], 70);
    assert_eq!(v["job"]["retry_count"], 0);
    assert_eq!(v["job"]["payload"], serde_json::json!({"n": 1}));
    assert!(
        v["waiting"]
            .as_str()
            .unwrap()
            .starts_with("no machine offers service `simulation`"),
        "no worker: {v}"
    );
    // The text leads with what the job is and where it stands, and gives retries as submitted.
    let (out, text, stderr) = jobs(&["show", &plain]);
    assert!(out.status.success(), "{stderr}");
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("id ") && lines[1].starts_with("status "), "{text}");
    assert!(text.contains("max_retries          2 (3 attempts in all)"), "{text}");
    let bare_name = |l: &&str| !l.trim().is_empty() && l.trim().chars().all(|c| c.is_ascii_lowercase() || c == '_');
    assert!(!lines.iter().any(bare_name), "no empty field: {text}");

    // Statuses: an unknown one is refused with the known ones; cancelled finds cancelled jobs.
    let (out, _, stderr) = jobs(&["list", "--status", "done"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("cancelled") && stderr.contains("in_progress"),
        "{stderr}"
    );
    let (out, _, stderr) = jobs(&["cancel", &plain]);
    assert!(out.status.success(), "{stderr}");
    let (out, stdout, _) = jobs(&["list", "--status", "cancelled", "--json"]);
    assert!(out.status.success());
    let listed: Vec<Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.len(), 1, "{stdout}");
    assert_eq!(listed[0]["id"], plain.as_str());
    assert_eq!(listed[0]["priority"], 70);
    let (_, stdout, _) = jobs(&["list", "--status", "failed"]);
    assert!(!stdout.contains(&plain), "a cancelled job is not a failure: {stdout}");
    let (_, text, _) = jobs(&["show", &plain]);
    let status = text.lines().find(|l| l.starts_with("status ")).unwrap_or_default();
    assert!(status.ends_with(" cancelled"), "show agrees with list: {text}");
    let (_, stdout, _) = jobs(&["list", "--status", "pending"]);
    assert_eq!(stdout.lines().count(), 3, "a header and the two waiting jobs: {stdout}");
}

#[test]
fn run_help_lists_every_setting_with_its_variable() {
    let (out, stdout, _) = run(machine().args(["run", "--help"]));
    assert!(out.status.success());
    for (var, key) in machine::config::variables() {
        assert!(stdout.contains(key), "{key} missing from `run --help`:\n{stdout}");
        assert!(stdout.contains(var), "{var} missing from `run --help`:\n{stdout}");
    }
}

//! The machine's own output, from the real binary: with `LOG_FORMAT=json` every line of stdout
//! and stderr is one JSON object (events, service lines, installer progress, the ready line);
//! colour only on a terminal and never with `NO_COLOR`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::{machine, sh, wait_until};

/// A bare git repository standing in for ComfyUI: no requirements, and a `main.py` that prints
/// to stdout and stderr and answers `/system_stats` on the port it is given, as ComfyUI does.
fn fake_comfyui_repo(root: &Path) -> std::path::PathBuf {
    let src = root.join("comfy-src");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::write(src.join("requirements.txt"), "").unwrap();
    std::fs::write(
        src.join("main.py"),
        r#"import http.server, sys
if "--quick-test-for-ci" in sys.argv:
    sys.exit(0)
port = int(sys.argv[sys.argv.index("--port") + 1])
print("comfy says hello on stdout", flush=True)
print("comfy says \"hello\" on stderr\twith a tab", file=sys.stderr, flush=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"system": {}, "devices": []}')
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"#,
    )
    .unwrap();
    sh(&src, &["git", "init", "--quiet", "--initial-branch=main"]);
    sh(&src, &["git", "add", "-A"]);
    sh(
        &src,
        &[
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "--quiet",
            "-m",
            "init",
        ],
    );
    sh(root, &["git", "clone", "--quiet", "--bare", "comfy-src", "comfy.git"]);
    root.join("comfy.git")
}

fn json_lines(name: &str, text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| {
            serde_json::from_str::<Value>(line)
                .ok()
                .filter(Value::is_object)
                .unwrap_or_else(|| panic!("a line of {name} is not a JSON object: {line:?}\n--- {name}\n{text}"))
        })
        .collect()
}

#[test]
fn json_format_makes_every_line_of_a_run_one_object() {
    let root = tempfile::tempdir().unwrap();
    let repo = fake_comfyui_repo(root.path());
    let ws = root.path().join("ws");
    let config = root.path().join("machine.toml");
    std::fs::write(
        &config,
        "[install.comfyui]\nref = \"main\"\nextra_packages = []\n\n\
         [services.chatty]\ncommand = [\"/bin/sh\", \"-c\", \"echo to stdout; echo 'to stderr [x]' >&2; exec sleep 60\"]\ngrace = \"1s\"\n",
    )
    .unwrap();
    let out_path = root.path().join("stdout");
    let err_path = root.path().join("stderr");
    let port = testkit::free_port();
    let mut child = machine()
        .arg("run")
        .env("LOG_FORMAT", "json")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", "logs1")
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("MACHINE_WORKSPACE", &ws)
        .env("WORKER_CONNECTORS", "comfyui")
        .env("COMFYUI_REPO_URL", repo.display().to_string())
        .stdout(std::fs::File::create(&out_path).unwrap())
        .stderr(std::fs::File::create(&err_path).unwrap())
        .spawn()
        .unwrap();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    // Installing (git, a venv, pip) and starting the fake ComfyUI takes a few seconds.
    let ready = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        wait_until(Duration::from_secs(120), "the ready line", || {
            assert!(child.try_wait().unwrap().is_none(), "the machine exited");
            read(&err_path).contains("machine ready in").then_some(())
        });
        wait_until(Duration::from_secs(20), "the services' lines", || {
            let (out, err) = (read(&out_path), read(&err_path));
            (out.contains("to stdout") && err.contains("to stderr") && err.contains("on stderr")).then_some(())
        });
    }));
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break child.wait().unwrap();
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (stdout, stderr) = (read(&out_path), read(&err_path));
    if let Err(e) = ready {
        panic!("{e:?}\n--- stdout\n{stdout}\n--- stderr\n{stderr}");
    }
    assert!(status.success(), "{status:?}\n--- stderr\n{stderr}");
    assert!(
        !stdout.contains('\u{1b}') && !stderr.contains('\u{1b}'),
        "escape codes in a file"
    );

    let out = json_lines("stdout", &stdout);
    let err = json_lines("stderr", &stderr);
    let all: Vec<&Value> = out.iter().chain(&err).collect();
    for line in &all {
        assert!(line["timestamp"].is_string() && line["level"].is_string(), "{line}");
    }
    let service_line = |lines: &[Value], service: &str, stream: &str, text: &str| {
        lines.iter().any(|l| {
            l["service"] == service && l["stream"] == stream && l["line"].as_str().is_some_and(|s| s.contains(text))
        })
    };
    assert!(service_line(&out, "chatty", "stdout", "to stdout"), "{stdout}");
    assert!(service_line(&err, "chatty", "stderr", "to stderr [x]"), "{stderr}");
    assert!(service_line(&out, "redis", "stdout", "Redis"), "{stdout}");
    // The ComfyUI service's line, quotes and tab intact.
    assert!(
        err.iter()
            .any(|l| l["service"].as_str().is_some_and(|s| s.starts_with("comfyui"))
                && l["stream"] == "stderr"
                && l["line"] == "comfy says \"hello\" on stderr\twith a tab"),
        "{stderr}"
    );
    // The installer's progress is in the log as events.
    assert!(
        err.iter().any(|l| l["target"] == "machine::install"
            && l["installer"] == "comfyui"
            && l["message"].as_str().is_some_and(|m| m.starts_with("installed in"))),
        "{stderr}"
    );
    // pip's work is summarised in the log, not only in its file.
    assert!(
        err.iter().any(|l| l["installer"] == "comfyui"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("python pip install: "))),
        "{stderr}"
    );
    // Fields are plain values: `?`-recorded lists are arrays, absent options null.
    let planned = err
        .iter()
        .find(|l| l["message"] == "worker planned")
        .unwrap_or_else(|| panic!("no worker planned line in {stderr}"));
    assert!(planned["connectors"].is_array(), "{planned}");
    let ready = err
        .iter()
        .filter(|l| {
            l["message"]
                .as_str()
                .is_some_and(|m| m.starts_with("machine ready in "))
        })
        .collect::<Vec<_>>();
    assert_eq!(ready.len(), 1, "one ready line: {stderr}");
    assert!(
        ready[0]["seconds"].as_f64().is_some_and(|s| s > 0.0 && s < 120.0),
        "{}",
        ready[0]
    );
    // Local mode stops cleanly: the last fleet message goes out before its Redis stops, so
    // nothing after the signal is a warning.
    let stopping = err
        .iter()
        .position(|l| l["message"].as_str().is_some_and(|m| m.starts_with("SIGTERM received")))
        .unwrap_or_else(|| panic!("no line for the signal in {stderr}"));
    let warnings: Vec<&Value> = err[stopping..]
        .iter()
        .filter(|l| l["level"] == "WARN" || l["level"] == "ERROR")
        .collect();
    assert!(warnings.is_empty(), "warnings while stopping: {warnings:?}");

    // `machine install` (its stamps now current) in JSON too: the summary lines included.
    let out = machine()
        .args(["install", "--only", "comfyui"])
        .env("LOG_FORMAT", "json")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_ID", "logs1")
        .env("MACHINE_WORKSPACE", &ws)
        .env("WORKER_CONNECTORS", "comfyui")
        .env("COMFYUI_REPO_URL", repo.display().to_string())
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    );
    assert!(out.status.success(), "{stdout}\n{stderr}");
    let summary = json_lines("stdout", &stdout);
    json_lines("stderr", &stderr);
    assert_eq!(summary.len(), 1, "{stdout}");
    assert_eq!(summary[0]["installer"], "comfyui");
    assert_eq!(summary[0]["state"]["state"], "done", "{stdout}");
    // A shipper files it like every log line: by its time and level.
    assert!(
        summary[0]["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
        "{stdout}"
    );
    assert_eq!(summary[0]["level"], "INFO", "{stdout}");
}

#[test]
fn json_format_covers_a_plan_the_machine_refuses() {
    // The configuration loads (so the format is known), but a service's program is missing.
    let ws = tempfile::tempdir().unwrap();
    let config = ws.path().join("machine.toml");
    std::fs::write(&config, "[services.ghost]\ncommand = [\"no-such-program-here\"]\n").unwrap();
    let out = machine()
        .arg("run")
        .env("LOG_FORMAT", "json")
        .env("MACHINE_CONFIG", &config)
        .env("MACHINE_WORKSPACE", ws.path())
        .env("MACHINE_HEALTH_PORT", testkit::free_port().to_string())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines = json_lines("stderr", &stderr);
    assert!(
        lines.iter().any(|l| l["level"] == "ERROR"
            && l["message"]
                .as_str()
                .is_some_and(|m| m.contains("no-such-program-here"))),
        "{stderr}"
    );
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    // A quick `machine run` that logs and exits 1: its health port is taken.
    let ws = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();

    // Piped: plain text.
    let out = machine()
        .arg("run")
        .env("MACHINE_ID", "colour")
        .env("MACHINE_WORKSPACE", ws.path())
        .env("WORKER_CONNECTORS", "simulation")
        .env("MACHINE_HEALTH_PORT", &port)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("failed to start the health server"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "escape codes in a pipe: {stderr:?}");

    // On a terminal (util-linux `script` gives the command a pty): coloured, unless NO_COLOR.
    let on_tty = |no_color: Option<&str>| {
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &format!("{} run", env!("CARGO_BIN_EXE_machine")), "/dev/null"])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("MACHINE_ID", "colour")
            .env("MACHINE_HEALTH_PORT", &port)
            .env("WORKER_CONNECTORS", "simulation")
            .env("MACHINE_WORKSPACE", ws.path())
            .stdin(Stdio::null());
        if let Some(v) = no_color {
            cmd.env("NO_COLOR", v);
        }
        let out = cmd.output().expect("util-linux `script` runs (scripts/test-deps.sh)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_tty(None);
    assert!(coloured.contains("failed to start the health server"), "{coloured}");
    assert!(coloured.contains("\u{1b}["), "no colour on a terminal: {coloured:?}");
    let plain = on_tty(Some("1"));
    assert!(plain.contains("failed to start the health server"), "{plain}");
    assert!(!plain.contains('\u{1b}'), "NO_COLOR ignored: {plain:?}");
    // An empty NO_COLOR does not count (no-color.org).
    assert!(on_tty(Some("")).contains("\u{1b}["));
    drop(taken);
}

/// The text of a terminal's output with escape sequences (CSI `ESC [ ... letter`) taken out.
fn strip_escapes(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '\u{1b}' {
            out.push(c);
            continue;
        }
        if chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        }
    }
    out
}

#[test]
fn progress_bars_never_cut_a_log_line() {
    let root = tempfile::tempdir().unwrap();
    let ws = root.path().join("ws");
    // The models installer needs only ComfyUI's interpreter to exist.
    let python = ws.join("ComfyUI/venv/bin/python");
    std::fs::create_dir_all(python.parent().unwrap()).unwrap();
    std::fs::write(&python, "").unwrap();
    let server = testkit::FileServer::start();
    let mut manifest = String::new();
    for i in 0..4u8 {
        let body: Vec<u8> = (0..3_000_000u32).map(|n| (n % 251) as u8 ^ i).collect();
        let path = format!("/m/model{i}.safetensors");
        server.add(&path, body.clone(), "application/octet-stream");
        use sha2::Digest;
        manifest.push_str(&format!(
            "[[model]]\nurl = \"{}\"\nsha256 = \"{}\"\nsize = {}\ndest = \"checkpoints\"\n\n",
            server.url(&path),
            hex::encode(sha2::Sha256::digest(&body)),
            body.len()
        ));
    }
    let manifest_path = root.path().join("models.toml");
    std::fs::write(&manifest_path, manifest).unwrap();
    // On a terminal (util-linux `script`), so that bars are drawn between the log lines.
    let out = Command::new("script")
        .args([
            "-qec",
            // A pty without a size would draw bars zero columns wide.
            &format!(
                "stty cols 120 rows 40; exec {} install --only comfyui-models",
                env!("CARGO_BIN_EXE_machine")
            ),
            "/dev/null",
        ])
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("TERM", "xterm")
        .env("MACHINE_ID", "bars")
        .env("MACHINE_WORKSPACE", &ws)
        .env("WORKER_CONNECTORS", "comfyui")
        .env("COMFYUI_MODELS_MANIFEST", &manifest_path)
        .stdin(Stdio::null())
        .output()
        .expect("util-linux `script` runs");
    let raw = String::from_utf8_lossy(&out.stdout);
    let text = strip_escapes(&raw);
    assert!(out.status.success(), "{text}");
    assert!(
        text.split(['\r', '\n'])
            .any(|l| l.starts_with("comfyui-models   installed in")),
        "no summary line of its own: {raw:?}"
    );
    // A bar was drawn (its brackets or its spinner line carry the installer's name first).
    assert!(
        text.split(['\r', '\n'])
            .map(str::trim_start)
            .any(|l| l.starts_with("comfyui-models") && !l.starts_with("comfyui-models   installed")),
        "no bar drawn: {raw:?}"
    );
    // Every log line starts its own line: a bar is cleared before a line is written and drawn
    // again below it, never left in front of the line.
    let mut events = 0;
    for segment in text.split(['\r', '\n']) {
        if let Some(at) = segment.find("machine::install:") {
            events += 1;
            let start = segment[..at].trim_start();
            assert!(
                start.starts_with("20") && start.len() <= 40,
                "a log line shares its line with something else: {segment:?}\n{raw:?}"
            );
        }
    }
    assert!(events >= 2, "{text}");
}

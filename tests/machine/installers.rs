//! The ComfyUI installers end to end through `machine install`: a local bare git repository as
//! the ComfyUI source (its requirements.txt names a tiny package built here, installed by real
//! pip into a real venv), local repositories as custom nodes (one broken), and a local HTTP
//! server serving models (one with a wrong checksum, one cut off and resumed).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::support::{sh, sha256};

/// Runs `machine` with a clean environment plus `env`, killed after `limit`.
pub(crate) fn machine(args: &[&str], env: &[(&str, String)], limit: Duration) -> Output {
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=5")
        .arg(limit.as_secs().to_string())
        .arg(env!("CARGO_BIN_EXE_machine"))
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("HOME", std::env::var("HOME").unwrap_or_else(|_| "/root".into()))
        .env("MACHINE_ID", "test-machine")
        .env("RUST_LOG", "info");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("the machine binary runs");
    assert_ne!(
        out.status.code(),
        Some(124),
        "machine {args:?} ran past {limit:?}:\n{}",
        text(&out)
    );
    out
}

pub(crate) fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

/// Makes a git repository in `dir` holding `files`, committed on `main`; returns the commit.
fn repo(dir: &Path, files: &[(&str, &str)]) -> String {
    std::fs::create_dir_all(dir).unwrap();
    sh(dir, &["git", "init", "--quiet", "--initial-branch=main"]);
    for (name, body) in files {
        write(&dir.join(name), body);
    }
    sh(dir, &["git", "add", "-A"]);
    sh(
        dir,
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
    sh(dir, &["git", "rev-parse", "HEAD"])
}

/// A pure-Python package `tinypkg` with an in-tree PEP 517 backend, so pip builds it with no
/// download.
fn tiny_package(dir: &Path) {
    named_package(dir, "tinypkg");
}

/// A pure-Python package called `name`, built by pip with no download.
fn named_package(dir: &Path, name: &str) {
    write(&dir.join(name).join("__init__.py"), "VALUE = 42\n");
    write(
        &dir.join("pyproject.toml"),
        "[build-system]\nrequires = []\nbuild-backend = \"backend\"\nbackend-path = [\".\"]\n",
    );
    write(
        &dir.join("backend.py"),
        &r#"import base64, hashlib, os, zipfile

NAME, VERSION = "__NAME__", "0.1.0"
HERE = os.path.dirname(os.path.abspath(__file__))


def get_requires_for_build_wheel(config_settings=None):
    return []


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    name = f"{NAME}-{VERSION}-py3-none-any.whl"
    info = f"{NAME}-{VERSION}.dist-info"
    with open(os.path.join(HERE, NAME, "__init__.py"), "rb") as f:
        init = f.read()
    files = {
        f"{NAME}/__init__.py": init,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {NAME}\nVersion: {VERSION}\n".encode(),
        f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: tiny\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    with zipfile.ZipFile(os.path.join(wheel_directory, name), "w") as z:
        for path, data in files.items():
            z.writestr(path, data)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            record.append(f"{path},sha256={digest},{len(data)}")
        record.append(f"{info}/RECORD,,")
        z.writestr(f"{info}/RECORD", "\n".join(record) + "\n")
    return name
"#
        .replace("__NAME__", name),
    );
}

/// Deterministic bytes that do not compress to nothing.
fn blob(n: usize, seed: u8) -> Vec<u8> {
    let mut x = u32::from(seed) + 1;
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (x >> 24) as u8
        })
        .collect()
}

struct Fixture {
    _tmp: tempfile::TempDir,
    root: PathBuf,
    ws: PathBuf,
    comfy_commit: String,
    server: testkit::FileServer,
    good: Vec<u8>,
    resumed: Vec<u8>,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().to_owned();
        let pkg = root.join("tinypkg");
        tiny_package(&pkg);
        let requirements = format!("tinypkg @ file://{}\n", pkg.display());
        let src = root.join("src/comfy");
        let comfy_commit = repo(
            &src,
            &[
                ("main.py", "print('not really ComfyUI')\n"),
                ("requirements.txt", &requirements),
                ("models/checkpoints/put_checkpoints_here", ""),
            ],
        );
        sh(
            &root,
            &["git", "clone", "--quiet", "--bare", src.to_str().unwrap(), "comfy.git"],
        );

        let good = root.join("src/node-good");
        repo(
            &good,
            &[
                ("__init__.py", "NODE_CLASS_MAPPINGS = {}\n"),
                ("requirements.txt", &requirements),
                (
                    "install.py",
                    "import os, sys\nopen('installed-by.txt', 'w').write(sys.executable)\n\
                     open('installed-env.txt', 'w').write('\\n'.join(f'{k}={v}' for k, v in os.environ.items()))\n",
                ),
            ],
        );
        sh(&good, &["git", "tag", "v1"]);
        let sub = root.join("src/sub");
        repo(&sub, &[("weights.txt", "from a submodule\n")]);
        let two = root.join("src/node-two");
        repo(&two, &[("__init__.py", "")]);
        // Local submodules need file transport, which git refuses by default since 2.38; the
        // machine passes its environment on, so the test allows it through GIT_CONFIG_*.
        sh(
            &two,
            &[
                "git",
                "-c",
                "protocol.file.allow=always",
                "submodule",
                "add",
                "--quiet",
                sub.to_str().unwrap(),
                "vendor/sub",
            ],
        );
        sh(
            &two,
            &[
                "git",
                "-c",
                "user.name=t",
                "-c",
                "user.email=t@t",
                "commit",
                "--quiet",
                "-m",
                "sub",
            ],
        );

        let server = testkit::FileServer::start();
        let good_blob = blob(300_000, 1);
        let resumed = blob(1_000_000, 2);
        server.add("/m/good.safetensors", good_blob.clone(), "application/octet-stream");
        server.add("/m/bad.safetensors", blob(1000, 3), "application/octet-stream");
        server.add("/m/big.safetensors", resumed.clone(), "application/octet-stream");
        server.cut_first("/m/big.safetensors", 400_000);

        Fixture {
            ws: root.join("ws"),
            root,
            _tmp: tmp,
            comfy_commit,
            server,
            good: good_blob,
            resumed,
        }
    }

    fn nodes_file(&self, with_broken: bool) -> PathBuf {
        let mut t = format!(
            r#"[[node]]
name = "node-good"
url = "{good}"
ref = "v1"
env = {{ API_KEY = "TEST_NODE_KEY" }}
install = ["python", "install.py"]

[[node]]
name = "node-two"
url = "{two}"
ref = "main"
submodules = true
requirements = false
"#,
            good = self.root.join("src/node-good").display(),
            two = self.root.join("src/node-two").display(),
        );
        if with_broken {
            t.push_str(&format!(
                "\n[[node]]\nname = \"node-broken\"\nurl = \"{}\"\n",
                self.root.join("src/does-not-exist").display()
            ));
        }
        let path = self.root.join(format!("nodes-{with_broken}.toml"));
        write(&path, &t);
        path
    }

    fn manifest(&self, with_bad: bool) -> PathBuf {
        let mut t = format!(
            "[[model]]\nurl = \"{}\"\nsha256 = \"{}\"\nsize = {}\ndest = \"checkpoints\"\n\n\
             [[model]]\nurl = \"{}\"\nsha256 = \"{}\"\nsize = {}\ndest = \"loras\"\n",
            self.server.url("/m/good.safetensors"),
            sha256(&self.good),
            self.good.len(),
            self.server.url("/m/big.safetensors"),
            sha256(&self.resumed),
            self.resumed.len(),
        );
        if with_bad {
            t.push_str(&format!(
                "\n[[model]]\nurl = \"{}\"\nsha256 = \"{}\"\ndest = \"checkpoints\"\n",
                self.server.url("/m/bad.safetensors"),
                "0".repeat(64)
            ));
        }
        let path = self.root.join(format!("models-{with_bad}.toml"));
        write(&path, &t);
        path
    }

    fn env(&self, broken: bool) -> Vec<(&'static str, String)> {
        vec![
            ("MACHINE_WORKSPACE", self.ws.display().to_string()),
            ("WORKER_CONNECTORS", "comfyui".to_owned()),
            ("COMFYUI_REPO_URL", self.root.join("comfy.git").display().to_string()),
            ("COMFYUI_REF", self.comfy_commit.clone()),
            ("COMFYUI_NODES_FILE", self.nodes_file(broken).display().to_string()),
            ("COMFYUI_MODELS_MANIFEST", self.manifest(broken).display().to_string()),
            // The default extra package (`requests`) would come from the package registry.
            ("COMFYUI_EXTRA_PACKAGES", "none".to_owned()),
            ("TEST_NODE_KEY", "secret value #1".to_owned()),
            // Secrets an installer's commands must not see.
            ("HUB_REDIS_URL", "redis://:hub-password@hub:6379".to_owned()),
            ("MACHINE_CONTROL_TOKEN", "control-token-secret".to_owned()),
            ("OPENAI_API_KEY", "sk-openai-secret".to_owned()),
            ("GIT_CONFIG_COUNT", "1".to_owned()),
            ("GIT_CONFIG_KEY_0", "protocol.file.allow".to_owned()),
            ("GIT_CONFIG_VALUE_0", "always".to_owned()),
        ]
    }
}

#[test]
fn comfyui_nodes_and_models_install_once() {
    let f = Fixture::new();
    let limit = Duration::from_secs(240);

    // First run: everything installs except the broken node and the bad model, which are
    // reported without failing the install.
    let out = machine(&["install"], &f.env(true), limit);
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(report.contains("node-broken"), "{report}");
    assert!(
        report.contains("checkpoints/bad.safetensors") && report.contains("sha256"),
        "{report}"
    );

    let comfy = f.ws.join("ComfyUI");
    let python = comfy.join("venv/bin/python");
    let value = sh(
        &comfy,
        &[python.to_str().unwrap(), "-c", "import tinypkg; print(tinypkg.VALUE)"],
    );
    assert_eq!(value, "42");
    assert_eq!(sh(&comfy, &["git", "rev-parse", "HEAD"]), f.comfy_commit);

    let good = comfy.join("custom_nodes/node-good");
    let dotenv = std::fs::read_to_string(good.join(".env")).unwrap();
    assert_eq!(dotenv, "API_KEY='secret value #1'\n");
    let by = std::fs::read_to_string(good.join("installed-by.txt")).unwrap();
    assert!(
        by.starts_with(comfy.join("venv").to_str().unwrap()),
        "install script ran with {by}"
    );
    // The install script saw a clean environment: no secrets, not even the one its `.env` got.
    let seen = std::fs::read_to_string(good.join("installed-env.txt")).unwrap();
    for secret in [
        "hub-password",
        "control-token-secret",
        "sk-openai-secret",
        "secret value #1",
        "HUB_REDIS_URL",
    ] {
        assert!(!seen.contains(secret), "the install script saw {secret}:\n{seen}");
    }
    assert!(seen.contains("PATH="), "{seen}");
    assert_eq!(
        std::fs::read_to_string(comfy.join("custom_nodes/node-two/vendor/sub/weights.txt")).unwrap(),
        "from a submodule\n"
    );
    assert!(!comfy.join("custom_nodes/node-broken/__init__.py").exists());

    let linked = comfy.join("models/checkpoints/good.safetensors");
    assert_eq!(
        std::fs::read_link(&linked).unwrap(),
        f.ws.join("models/checkpoints/good.safetensors")
    );
    assert_eq!(std::fs::read(&linked).unwrap(), f.good);
    assert_eq!(
        std::fs::read(comfy.join("models/loras/big.safetensors")).unwrap(),
        f.resumed
    );
    let ranges: Vec<_> = f
        .server
        .seen()
        .into_iter()
        .filter(|r| r.path == "/m/big.safetensors")
        .map(|r| r.range)
        .collect();
    assert_eq!(
        ranges,
        [None, Some("bytes=400000-".to_owned())],
        "the cut download resumed"
    );
    assert!(!f.ws.join("models/checkpoints/bad.safetensors").exists());
    assert!(!f.ws.join("models/checkpoints/bad.safetensors.part").exists());
    let log = std::fs::read_to_string(f.ws.join("logs/install-comfyui.log")).unwrap();
    assert!(log.contains("$ git") && log.contains("pip install"), "{log}");

    // Strict mode: the same failures now fail the install.
    let mut strict = f.env(true);
    strict.push(("INSTALL_STRICT", "true".to_owned()));
    let out = machine(&["install"], &strict, limit);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(text(&out).contains("strict mode"), "{}", text(&out));

    // Without the broken entries everything is installed ...
    let out = machine(&["install"], &f.env(false), limit);
    assert!(out.status.success(), "{}", text(&out));

    // ... and a second run with nothing changed does nothing, fast.
    let seen_before = f.server.seen().len();
    let started = Instant::now();
    let out = machine(&["install"], &f.env(false), limit);
    let took = started.elapsed();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", text(&out));
    assert_eq!(stdout.matches("up to date").count(), 3, "{}", text(&out));
    assert!(took < Duration::from_secs(1), "the no-op run took {took:?}");
    assert_eq!(f.server.seen().len(), seen_before, "nothing was downloaded again");
}

#[test]
fn an_install_past_its_timeout_fails_and_stops_its_command() {
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    let commit = repo(&src, &[("main.py", "")]);
    // An "interpreter" that hangs where `python -m venv` would run.
    let slow = tmp.path().join("slow-python");
    let pidfile = tmp.path().join("slow.pid");
    write(
        &slow,
        &format!("#!/bin/sh\necho $$ > {}\nexec sleep 60\n", pidfile.display()),
    );
    sh(tmp.path(), &["chmod", "+x", slow.to_str().unwrap()]);
    let env = vec![
        ("MACHINE_WORKSPACE", tmp.path().join("ws").display().to_string()),
        ("WORKER_CONNECTORS", "comfyui".to_owned()),
        ("COMFYUI_REPO_URL", src.display().to_string()),
        ("COMFYUI_REF", commit),
        ("COMFYUI_PYTHON", slow.display().to_string()),
        ("SERVICE_INSTALL_TIMEOUT", "2".to_owned()),
    ];
    let started = Instant::now();
    let out = machine(&["install", "--only", "comfyui"], &env, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    assert!(started.elapsed() < Duration::from_secs(20));
    assert!(text(&out).contains("SERVICE_INSTALL_TIMEOUT"), "{}", text(&out));
    let pid = std::fs::read_to_string(&pidfile).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while Path::new(&format!("/proc/{}", pid.trim())).exists() {
        let zombie = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim()))
            .is_ok_and(|s| s.split_whitespace().nth(2) == Some("Z"));
        if zombie {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the timed-out command {pid} is still running"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn unknown_installer_names_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let env = vec![("MACHINE_WORKSPACE", tmp.path().display().to_string())];
    let out = machine(&["install", "--only", "nope"], &env, Duration::from_secs(30));
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(text(&out).contains("comfyui-models"), "{}", text(&out));
}

#[test]
fn machine_run_installs_first_and_stops_when_that_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let env = vec![
        ("MACHINE_WORKSPACE", tmp.path().join("ws").display().to_string()),
        ("WORKER_CONNECTORS", "comfyui".to_owned()),
        (
            "COMFYUI_REPO_URL",
            tmp.path().join("no-such-repo").display().to_string(),
        ),
        ("MACHINE_GPU_COUNT", "0".to_owned()),
    ];
    let out = machine(&["run"], &env, Duration::from_secs(60));
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let report = text(&out);
    assert!(
        report.contains("failed to install comfyui") && report.contains("git"),
        "{report}"
    );
    let log = std::fs::read_to_string(tmp.path().join("ws/logs/install-comfyui.log")).unwrap();
    assert!(log.contains("no-such-repo"), "{log}");
}

#[test]
fn a_comfyui_that_does_not_start_fails_its_install_with_the_traceback() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    tiny_package(&root.join("tinypkg"));
    named_package(&root.join("extrapkg"), "extrapkg");
    // Like upstream with `requests`: the entry point imports a package its requirements omit.
    let src = root.join("src/comfy");
    let commit = repo(
        &src,
        &[
            (
                "main.py",
                "import sys\nimport tinypkg\nimport extrapkg\nassert '--quick-test-for-ci' in sys.argv\n",
            ),
            (
                "requirements.txt",
                &format!("tinypkg @ file://{}\n", root.join("tinypkg").display()),
            ),
        ],
    );
    sh(
        root,
        &["git", "clone", "--quiet", "--bare", src.to_str().unwrap(), "comfy.git"],
    );
    let ws = root.join("ws");
    let env = |extra: &str, constraints: Option<&Path>| {
        let mut env = vec![
            ("MACHINE_WORKSPACE", ws.display().to_string()),
            ("WORKER_CONNECTORS", "comfyui".to_owned()),
            ("COMFYUI_REPO_URL", root.join("comfy.git").display().to_string()),
            ("COMFYUI_REF", commit.clone()),
            ("COMFYUI_EXTRA_PACKAGES", extra.to_owned()),
        ];
        if let Some(c) = constraints {
            env.push(("COMFYUI_CONSTRAINTS", c.display().to_string()));
        }
        env
    };
    let limit = Duration::from_secs(240);

    let out = machine(&["install", "--only", "comfyui"], &env("none", None), limit);
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("failed the smoke test"), "{report}");
    assert!(
        report.contains("ModuleNotFoundError: No module named 'extrapkg'"),
        "the traceback is in the error: {report}"
    );

    // With the missing package as an extra package, ComfyUI starts and the install is done.
    let extra = root.join("extrapkg").display().to_string();
    let out = machine(&["install", "--only", "comfyui"], &env(&extra, None), limit);
    assert!(out.status.success(), "{}", text(&out));
    let python = ws.join("ComfyUI/venv/bin/python");
    sh(root, &[python.to_str().unwrap(), "-c", "import extrapkg"]);

    // Every pip install runs within the constraints file: one that excludes the extra
    // package's only version fails the (re)install.
    let constraints = root.join("constraints.txt");
    write(&constraints, "extrapkg==9.9\n");
    let out = machine(
        &["install", "--only", "comfyui"],
        &env(&extra, Some(&constraints)),
        limit,
    );
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("-c") && report.contains("constraints.txt"), "{report}");
}

#[test]
fn a_failed_install_of_a_new_ref_leaves_the_working_install_in_place_and_says_why_first() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    let src = root.join("src/comfy");
    let good = repo(
        &src,
        &[("main.py", "import sys\nassert '--quick-test-for-ci' in sys.argv\n")],
    );
    sh(
        root,
        &["git", "clone", "--quiet", "--bare", src.to_str().unwrap(), "comfy.git"],
    );
    let ws = root.join("ws");
    let env = |git_ref: &str| {
        vec![
            ("MACHINE_WORKSPACE", ws.display().to_string()),
            ("WORKER_CONNECTORS", "comfyui".to_owned()),
            ("COMFYUI_REPO_URL", root.join("comfy.git").display().to_string()),
            ("COMFYUI_REF", git_ref.to_owned()),
            ("COMFYUI_EXTRA_PACKAGES", "none".to_owned()),
        ]
    };
    let limit = Duration::from_secs(240);
    let head = || sh(&ws.join("ComfyUI"), &["git", "rev-parse", "HEAD"]);
    let stamp = ws.join(".machine/install/comfyui.stamp");
    let out = machine(&["install", "--only", "comfyui"], &env(&good), limit);
    assert!(out.status.success(), "{}", text(&out));
    let stamped = std::fs::read_to_string(&stamp).unwrap();

    // A ref that does not exist: git's own reason first, nothing touched, and the next
    // attempt's error shows that attempt's output only.
    for bad in ["no-such-ref-1", "no-such-ref-2"] {
        let out = machine(&["install", "--only", "comfyui"], &env(bad), limit);
        let report = text(&out);
        assert!(!out.status.success(), "{report}");
        assert!(report.contains(&format!("couldn't find remote ref {bad}")), "{report}");
        assert!(!report.contains("does not take a path argument"), "{report}");
        assert!(
            !report.contains("no-such-ref-1") || bad == "no-such-ref-1",
            "an earlier attempt's output: {report}"
        );
        assert_eq!(head(), good);
        assert_eq!(std::fs::read_to_string(&stamp).unwrap(), stamped);
    }

    // A ref that exists but fails its smoke test: the previous checkout and stamp come back.
    write(&src.join("main.py"), "import sys\nsys.exit('this ComfyUI is broken')\n");
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
            "-am",
            "broken",
        ],
    );
    let broken = sh(&src, &["git", "rev-parse", "HEAD"]);
    sh(
        &src,
        &[
            "git",
            "push",
            "--quiet",
            root.join("comfy.git").to_str().unwrap(),
            "main",
        ],
    );
    let out = machine(&["install", "--only", "comfyui"], &env(&broken), limit);
    let report = text(&out);
    assert!(!out.status.success(), "{report}");
    assert!(report.contains("this ComfyUI is broken"), "{report}");
    assert_eq!(head(), good, "the failed install left its checkout in place");
    assert_eq!(std::fs::read_to_string(&stamp).unwrap(), stamped);

    // The install that worked is still the one in place.
    let out = machine(&["install", "--only", "comfyui"], &env(&good), limit);
    assert!(out.status.success(), "{}", text(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("up to date"),
        "{}",
        text(&out)
    );
}

/// `machine install` installs for the connectors `machine run` plans: both load through the one
/// loader, which reads `<workspace>/worker_connectors` over `WORKER_CONNECTORS`.
#[test]
fn install_plans_the_connectors_run_plans() {
    let dir = tempfile::tempdir().unwrap();
    let ws = dir.path().join("ws");
    std::fs::create_dir_all(&ws).unwrap();
    write(&ws.join("worker_connectors"), "# set by the fleet\nsimulation:1\n");
    let env = [
        ("MACHINE_WORKSPACE", ws.display().to_string()),
        ("WORKER_CONNECTORS", "comfyui".to_owned()),
        // Were ComfyUI installed after all, it would fail at once rather than reach the network.
        ("COMFYUI_REPO_URL", dir.path().join("no-repo").display().to_string()),
    ];
    let check = machine(&["config", "check", "--json"], &env, Duration::from_secs(60));
    let doc: serde_json::Value = serde_json::from_slice(&check.stdout).expect("config check prints JSON");
    assert_eq!(doc["config"]["connectors"], "simulation:1", "{}", text(&check));
    let out = machine(&["install"], &env, Duration::from_secs(60));
    let report = text(&out);
    assert!(out.status.success(), "{report}");
    assert!(
        report.contains("nothing to install for WORKER_CONNECTORS=simulation:1"),
        "{report}"
    );
}

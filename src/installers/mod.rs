//! Installers: put in place what the connectors' services run, before they start.
//!
//! For the connectors in `WORKER_CONNECTORS`: ComfyUI (`comfyui`), its custom nodes
//! (`comfyui-nodes`) and models (`comfyui-models`), and the Playwright render service
//! (`playwright`). ComfyUI goes first; its nodes and models then install side by side, and the
//! render service alongside all of them. Each installer is bounded by `SERVICE_INSTALL_TIMEOUT`
//! and skipped when its stamp says nothing that went into it changed. State is published
//! through a [`InstallProgress`] for the status page; output of every external command goes to
//! `<workspace>/logs/install-<name>.log`.
//!
//! This module also owns the install layout, so the plan takes each connector service's
//! command from [`launch`] instead of knowing where things were installed.

mod comfyui;
mod common;
mod models;
mod nodes;
mod playwright;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

pub use common::{InstallProgress, InstallState, InstallStates};

use crate::config::{Config, ConnectorKind, Env, ProcessEnv};
use crate::logging::error_chain;
use common::Progress;

/// Every installer, in the order they are reported.
pub const NAMES: [&str; 4] = ["comfyui", "comfyui-nodes", "comfyui-models", "playwright"];

/// One installer, as `machine install --only` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Installer {
    /// ComfyUI itself.
    Comfyui,
    /// ComfyUI's custom nodes.
    ComfyuiNodes,
    /// ComfyUI's models.
    ComfyuiModels,
    /// The Playwright render service.
    Playwright,
}

impl Installer {
    /// The installer's name in [`NAMES`], progress and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Installer::Comfyui => NAMES[0],
            Installer::ComfyuiNodes => NAMES[1],
            Installer::ComfyuiModels => NAMES[2],
            Installer::Playwright => NAMES[3],
        }
    }
}

/// Why an install (or one step of it) failed.
#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    /// A command could not be started.
    #[error("failed to run `{command}`")]
    Spawn {
        /// The argv, joined for display.
        command: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A command exited unsuccessfully.
    #[error("failed to run `{command}` ({status}; log {log}):\n{tail}")]
    Exit {
        /// The argv, joined for display.
        command: String,
        /// How it exited.
        status: String,
        /// The install log.
        log: PathBuf,
        /// The log's last lines.
        tail: String,
    },
    /// ComfyUI does not start in its venv after the install.
    #[error("failed the smoke test `{command}`: ComfyUI does not start in its venv")]
    SmokeTest {
        /// The smoke test, for display.
        command: String,
        /// How it failed, with the end of its output (the traceback); boxed, as it is large.
        #[source]
        source: Box<InstallError>,
    },
    /// A file operation failed.
    #[error("failed to {action} {path}")]
    Io {
        /// What was being done.
        action: &'static str,
        /// To which path.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The node catalogue or model manifest is invalid.
    #[error("failed to read {file}: {message}")]
    Manifest {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A node's `.env` names a variable that is not set.
    #[error("failed to write the .env of node `{node}`: environment variable {var} is not set")]
    MissingEnv {
        /// The variable.
        var: String,
        /// The node.
        node: String,
    },
    /// A download failed.
    #[error("failed to download {url}: {reason}")]
    Download {
        /// The URL.
        url: String,
        /// Why, with its causes.
        reason: String,
    },
    /// A downloaded file has the wrong size.
    #[error("failed to verify {file}: {actual} bytes, the manifest says {expected}")]
    Size {
        /// The file.
        file: PathBuf,
        /// The manifest's size.
        expected: u64,
        /// The downloaded size.
        actual: u64,
    },
    /// A downloaded file has the wrong checksum.
    #[error("failed to verify {file}: sha256 is {actual}, the manifest says {expected}")]
    Checksum {
        /// The file.
        file: PathBuf,
        /// The manifest's hash.
        expected: String,
        /// The downloaded file's hash.
        actual: String,
    },
    /// No browser for the render service.
    #[error(
        "failed to find Chromium (looked at {looked}); install Debian's `chromium` or set PLAYWRIGHT_CHROMIUM_PATH"
    )]
    NoChromium {
        /// Where it looked.
        looked: String,
    },
    /// An installer this one builds on failed.
    #[error("failed to start: {0} failed first")]
    Prerequisite(&'static str),
    /// ComfyUI is not installed, so its nodes and models cannot be.
    #[error("failed to find ComfyUI at {0}; run `machine install --only comfyui` first")]
    NotInstalled(PathBuf),
    /// An installer ran past `SERVICE_INSTALL_TIMEOUT`.
    #[error("failed to finish within {0:?} (SERVICE_INSTALL_TIMEOUT)")]
    Timeout(Duration),
    /// The install was cancelled (shutdown).
    #[error("failed to finish: cancelled")]
    Cancelled,
    /// Some items failed (strict mode) or an installer failed.
    #[error("failed to install {}", .0.join("; "))]
    Failed(Vec<String>),
}

impl InstallError {
    pub(crate) fn io(action: &'static str, path: &Path, source: std::io::Error) -> Self {
        InstallError::Io {
            action,
            path: path.to_owned(),
            source,
        }
    }
}

/// How a connector's service is started, as the installers lay the workspace out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Launch {
    /// The argv.
    pub command: Vec<String>,
    /// Its working directory.
    pub cwd: PathBuf,
    /// The HTTP path that answers 200 once the service is up.
    pub health_path: &'static str,
}

/// The service command of a GPU-bound connector on `port`, on `gpu` (`None`: CPU mode);
/// `None` for the external connectors, which run no service.
pub fn launch(kind: ConnectorKind, workspace: &Path, port: u16, gpu: Option<u32>) -> Option<Launch> {
    Some(match kind {
        ConnectorKind::Comfyui => comfyui::launch(workspace, port, gpu),
        ConnectorKind::Playwright => playwright::launch(workspace, port, gpu),
        // A1111 has no installer: the image is expected to hold a prepared
        // stable-diffusion-webui with its venv.
        ConnectorKind::A1111 => {
            let dir = workspace.join("stable-diffusion-webui");
            let mut command: Vec<String> = [
                dir.join("venv/bin/python").display().to_string().as_str(),
                "launch.py",
                "--api",
                "--nowebui",
                "--skip-prepare-environment",
                "--port",
            ]
            .iter()
            .map(|s| (*s).to_owned())
            .collect();
            command.push(port.to_string());
            if gpu.is_none() {
                command.extend(["--use-cpu", "all", "--skip-torch-cuda-test", "--no-half"].map(str::to_owned));
            }
            Launch {
                command,
                cwd: dir,
                health_path: "/sdapi/v1/progress",
            }
        }
        ConnectorKind::Openai | ConnectorKind::Replicate | ConnectorKind::Runpod | ConnectorKind::Simulation => {
            return None;
        }
    })
}

/// What every installer of one run shares.
#[derive(Debug)]
pub(crate) struct Ctx {
    workspace: PathBuf,
    stamps: PathBuf,
    concurrency: usize,
    cancel: CancellationToken,
    /// `pip -c` for every pip install in ComfyUI's venv (its own and its nodes' requirements).
    pip_constraints: Option<PathBuf>,
}

impl Ctx {
    /// The install log of `name`.
    fn log(&self, name: &str) -> PathBuf {
        self.workspace.join("logs").join(format!("install-{name}.log"))
    }
}

/// Whether `s` is usable as one path component: letters, digits, `.`, `_`, `-`, and not `.`
/// or `..`.
pub(crate) fn safe_name(s: &str) -> bool {
    !s.is_empty()
        && s != "."
        && s != ".."
        && !s.starts_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// The installers a connector's service needs, in report order.
fn installers_of(kind: ConnectorKind) -> &'static [&'static str] {
    match kind {
        ConnectorKind::Comfyui => &NAMES[..3],
        ConnectorKind::Playwright => &NAMES[3..],
        // A1111 has no installer (see `launch`); the external connectors run no service.
        ConnectorKind::A1111
        | ConnectorKind::Openai
        | ConnectorKind::Replicate
        | ConnectorKind::Runpod
        | ConnectorKind::Simulation => &[],
    }
}

/// The installers the configured connectors need, in report order; the plan carries them. A
/// connector whose service command is overridden (`connectors.<name>.command`) runs something
/// the operator provides, so nothing is installed for it unless asked for by name.
pub fn needed(config: &Config) -> Vec<&'static str> {
    let overridden = |kind: ConnectorKind| match kind {
        ConnectorKind::Comfyui => config.plan.comfyui.command.is_some(),
        ConnectorKind::A1111 => config.plan.a1111.command.is_some(),
        ConnectorKind::Playwright => config.plan.playwright.command.is_some(),
        ConnectorKind::Openai | ConnectorKind::Replicate | ConnectorKind::Runpod | ConnectorKind::Simulation => false,
    };
    let wanted: Vec<&str> = config
        .plan
        .connectors
        .entries()
        .iter()
        .filter(|r| !overridden(r.kind))
        .flat_map(|r| installers_of(r.kind).iter().copied())
        .collect();
    NAMES.into_iter().filter(|n| wanted.contains(n)).collect()
}

/// The installers `config` needs ([`needed`]), or just `only`.
pub fn selected(config: &Config, only: Option<Installer>) -> Vec<&'static str> {
    match only {
        Some(installer) => vec![installer.name()],
        None => needed(config),
    }
}

/// Runs the installers `names` (of [`NAMES`]), publishing progress through `tracker`. Fails
/// when an installer failed, or when an item failed in strict mode; in non-strict mode failed
/// nodes and models are listed in their installer's `Done` state.
pub async fn install(
    config: &Config,
    env: &(dyn Env + Sync),
    names: &[&'static str],
    tracker: &InstallProgress,
    cancel: CancellationToken,
) -> Result<InstallStates, InstallError> {
    for n in names {
        tracker.set(n, InstallState::Pending);
    }
    let ctx = Ctx {
        workspace: config.machine.workspace.clone(),
        stamps: config.machine.workspace.join(".machine/install"),
        concurrency: config.plan.install.concurrency,
        cancel,
        pip_constraints: config.plan.install.comfyui.constraints.clone(),
    };
    let has = |n: &str| names.contains(&n);
    let limit = config.machine.install_timeout;
    let cc = &config.plan.install.comfyui;

    let comfy_chain = async {
        if has("comfyui") {
            let p = tracker.progress("comfyui");
            let r = bounded_by(limit, &ctx, comfyui::install(&ctx, cc, &p)).await;
            if !finish(&p, r) {
                for n in ["comfyui-nodes", "comfyui-models"].into_iter().filter(|n| has(n)) {
                    tracker.progress(n).failed(&InstallError::Prerequisite("comfyui"));
                }
                return;
            }
        }
        let ready = comfyui::python(&ctx.workspace).exists();
        let nodes = async {
            if has("comfyui-nodes") {
                install_nodes(&ctx, config, env, &tracker.progress("comfyui-nodes"), ready).await;
            }
        };
        let models = async {
            if has("comfyui-models") {
                install_models(&ctx, config, &tracker.progress("comfyui-models"), ready).await;
            }
        };
        tokio::join!(nodes, models);
    };
    let render = async {
        if has("playwright") {
            let p = tracker.progress("playwright");
            let r = bounded_by(
                limit,
                &ctx,
                playwright::install(&ctx, &config.plan.install.playwright, &p),
            )
            .await;
            finish(&p, r);
        }
    };
    tokio::join!(comfy_chain, render);

    let states = tracker.snapshot();
    let failed: Vec<String> = names
        .iter()
        .filter_map(|n| match states.get(*n) {
            Some(InstallState::Failed { reason }) => Some(format!("{n}: {reason}")),
            _ => None,
        })
        .collect();
    if failed.is_empty() {
        Ok(states)
    } else {
        Err(InstallError::Failed(failed))
    }
}

/// The custom nodes of the nodes file, into the ComfyUI installed (`ready`) in the workspace.
async fn install_nodes(ctx: &Ctx, config: &Config, env: &(dyn Env + Sync), p: &Progress, ready: bool) {
    let cc = &config.plan.install.comfyui;
    if !ready {
        p.failed(&InstallError::NotInstalled(comfyui::dir(&ctx.workspace)));
        return;
    }
    let work = async {
        let specs = nodes::load(cc.nodes_file.as_deref())?;
        let resolved = nodes::resolve(specs, env);
        let names: Vec<String> = resolved
            .iter()
            .map(|r| match r {
                Ok(n) => n.name().to_owned(),
                Err((n, _)) => n.clone(),
            })
            .collect();
        p.step(&format!("{} custom nodes: {}", names.len(), names.join(", ")));
        let digest = comfyui::stamp(ctx, cc).digest().to_owned();
        let (installed, failed) = nodes::install(ctx, &digest, resolved, p).await;
        Ok((installed == 0 && failed.is_empty(), failed))
    };
    finish_items(
        p,
        bounded_by(config.machine.install_timeout, ctx, work).await,
        config.plan.install.strict,
        "custom nodes",
    );
}

/// The models of the models manifest, into the ComfyUI installed (`ready`) in the workspace.
async fn install_models(ctx: &Ctx, config: &Config, p: &Progress, ready: bool) {
    let cc = &config.plan.install.comfyui;
    if !ready {
        p.failed(&InstallError::NotInstalled(comfyui::dir(&ctx.workspace)));
        return;
    }
    let work = async {
        let specs = match &cc.models_manifest {
            Some(path) => models::load(path)?,
            None => Vec::new(),
        };
        p.step(&format!("{} models into {}", specs.len(), cc.models_dir.display()));
        let (downloaded, failed) = models::install(ctx, &cc.models_dir, specs, p).await;
        Ok((downloaded == 0 && failed.is_empty(), failed))
    };
    finish_items(
        p,
        bounded_by(config.machine.install_timeout, ctx, work).await,
        config.plan.install.strict,
        "models",
    );
}

/// Runs `fut` within the install timeout; a timeout drops it, which kills its commands.
async fn bounded_by<T>(
    limit: Duration,
    ctx: &Ctx,
    fut: impl Future<Output = Result<T, InstallError>>,
) -> Result<T, InstallError> {
    if ctx.cancel.is_cancelled() {
        return Err(InstallError::Cancelled);
    }
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or(Err(InstallError::Timeout(limit)))
}

/// Records an installer's end; returns whether it succeeded.
fn finish(p: &Progress, r: Result<bool, InstallError>) -> bool {
    match r {
        Ok(did) => {
            p.done(!did, Vec::new());
            true
        }
        Err(e) => {
            p.failed(&e);
            false
        }
    }
}

/// Records the end of an installer of many items: failed items fail it only in strict mode.
fn finish_items(p: &Progress, r: Result<(bool, Vec<(String, InstallError)>), InstallError>, strict: bool, what: &str) {
    match r {
        Ok((skipped, failed)) if failed.is_empty() => p.done(skipped, Vec::new()),
        Ok((_, failed)) => {
            let items: Vec<String> = failed.iter().map(|(n, e)| format!("{n}: {}", error_chain(e))).collect();
            if strict {
                let names: Vec<&str> = failed.iter().map(|(n, _)| n.as_str()).collect();
                p.failed(&InstallError::Failed(vec![format!(
                    "{} {what} (strict mode): {}",
                    names.len(),
                    items.join("; ")
                )]));
            } else {
                p.done(false, items);
            }
        }
        Err(e) => p.failed(&e),
    }
}

/// The models of the manifest at `path` as `folder/file` under the shared models directory.
pub fn manifest_ids(path: &Path) -> Result<std::collections::BTreeSet<String>, InstallError> {
    Ok(models::load(path)?.iter().map(models::ModelSpec::id).collect())
}

/// The installers `names` (the plan's), which `machine run` runs before it starts services,
/// with the real environment.
pub async fn before_services(
    config: &Config,
    names: &[&'static str],
    tracker: &InstallProgress,
    cancel: CancellationToken,
) -> Result<InstallStates, InstallError> {
    install(config, &ProcessEnv, names, tracker, cancel).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_safe_path_components() {
        assert!(safe_name("ComfyUI-Impact_Pack.v2"));
        for bad in ["", ".", "..", "a/b", "-x", "a b"] {
            assert!(!safe_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn installer_names_are_their_command_line_names() {
        use clap::ValueEnum as _;
        for installer in Installer::value_variants() {
            let possible = installer.to_possible_value().expect("no installer is hidden");
            assert_eq!(possible.get_name(), installer.name());
        }
        assert_eq!(Installer::value_variants().len(), NAMES.len());
    }

    #[test]
    fn installers_follow_the_connectors() {
        let c = Config::for_tests(&[("WORKER_CONNECTORS", "comfyui,playwright,simulation")]);
        assert_eq!(selected(&c, None), NAMES);
        let c = Config::for_tests(&[("WORKER_CONNECTORS", "playwright")]);
        assert_eq!(selected(&c, None), ["playwright"]);
        assert_eq!(selected(&c, Some(Installer::ComfyuiModels)), ["comfyui-models"]);
        assert!(selected(&Config::for_tests(&[]), None).is_empty());
        let file = "[connectors.comfyui]\ncommand = [\"fake-comfy\", \"{port}\"]\n";
        let env = std::collections::BTreeMap::from([("WORKER_CONNECTORS", "comfyui")]);
        let c = crate::config::load_str(Some(("f", file)), &env).unwrap();
        assert!(selected(&c, None).is_empty(), "an overridden command installs nothing");
        assert_eq!(selected(&c, Some(Installer::Comfyui)), ["comfyui"]);
    }
}

//! ComfyUI itself: the repository at the configured ref, its venv and its requirements, and the
//! command that runs it on one GPU.
//!
//! Layout: `<workspace>/ComfyUI` is a git checkout (detached at the pinned ref) with its venv in
//! `ComfyUI/venv`; custom nodes go to `ComfyUI/custom_nodes` (see `nodes`), models to the shared
//! models directory linked into `ComfyUI/models` (see `models`).
//!
//! An install is only done when ComfyUI starts in its venv: after `requirements.txt` and the
//! configured extra packages (what the ref imports without listing it), a smoke test
//! (`main.py --quick-test-for-ci --cpu` by default) runs with the venv's python, and its
//! failure fails the install with the traceback, before any service starts.

use std::path::{Path, PathBuf};

use tokio_util::sync::CancellationToken;

use super::common::{Cmd, Progress, Stamp, digest, git_checkout};
use super::{Ctx, InstallError};
use crate::config::ComfyuiInstallConfig;

/// The ComfyUI checkout under the workspace.
pub(crate) fn dir(workspace: &Path) -> PathBuf {
    workspace.join("ComfyUI")
}

/// `pip install -r <requirements>` in ComfyUI's venv, run from `cwd` (ComfyUI's own
/// requirements and every custom node's go through here), within the configured constraints.
pub(super) fn pip_install_requirements(ctx: &Ctx, requirements: &Path, cwd: &Path) -> Cmd {
    pip_install(ctx).arg("-r").arg(requirements).cwd(cwd)
}

/// `pip install` in ComfyUI's venv with the configured constraints file.
fn pip_install(ctx: &Ctx) -> Cmd {
    let pip =
        Cmd::new(python(&ctx.workspace)).args(["-m", "pip", "install", "--disable-pip-version-check", "--no-input"]);
    match &ctx.pip_constraints {
        Some(c) => pip.arg("-c").arg(c),
        None => pip,
    }
}

/// The venv's interpreter.
pub(crate) fn python(workspace: &Path) -> PathBuf {
    dir(workspace).join("venv/bin/python")
}

/// The command, working directory and health path of ComfyUI on `port`; `--cpu` without a GPU.
pub(crate) fn launch(workspace: &Path, port: u16, gpu: Option<u32>) -> super::Launch {
    let mut command = vec![
        python(workspace).display().to_string(),
        "main.py".to_owned(),
        "--listen".to_owned(),
        "127.0.0.1".to_owned(),
        "--port".to_owned(),
        port.to_string(),
    ];
    if gpu.is_none() {
        command.push("--cpu".to_owned());
    }
    super::Launch {
        command,
        cwd: dir(workspace),
        health_path: "/system_stats",
    }
}

/// The stamp of the ComfyUI install; node stamps include its digest, so a rebuilt venv
/// reinstalls every node's requirements.
pub(crate) fn stamp(ctx: &Ctx, cfg: &ComfyuiInstallConfig) -> Stamp {
    // The constraints' content counts, not only their path: editing the file reinstalls.
    let constraints = cfg
        .constraints
        .as_ref()
        .map(|c| format!("{}\n{}", c.display(), std::fs::read_to_string(c).unwrap_or_default()))
        .unwrap_or_default();
    Stamp::new(
        &ctx.stamps,
        "comfyui",
        digest(&[
            cfg.repo_url.as_str(),
            cfg.git_ref.as_str(),
            cfg.python.as_str(),
            cfg.torch_index_url.as_deref().unwrap_or(""),
            &cfg.extra_packages.join("\n"),
            &constraints,
            &cfg.smoke_test.join("\n"),
        ]),
    )
}

/// Installs ComfyUI unless its stamp is current. Returns whether anything was done.
pub(crate) async fn install(ctx: &Ctx, cfg: &ComfyuiInstallConfig, progress: &Progress) -> Result<bool, InstallError> {
    let stamp = stamp(ctx, cfg);
    let dir = dir(&ctx.workspace);
    if stamp.is_current() && python(&ctx.workspace).exists() && dir.join("main.py").exists() {
        return Ok(false);
    }
    let log = ctx.log("comfyui");
    // A failed install of a new ref leaves the install in place as it was: its checkout and its
    // stamp are put back, so the next start runs what ran before.
    let saved = stamp.saved();
    let previous = if dir.join(".git").is_dir() {
        git_in(&dir)
            .args(["rev-parse", "HEAD"])
            .output(&log, &ctx.cancel)
            .await
            .ok()
    } else {
        None
    };
    let installed = install_ref(ctx, cfg, &stamp, &log, progress).await;
    if installed.is_err() {
        if let Some(previous) = previous.map(|p| p.trim().to_owned()).filter(|p| !p.is_empty()) {
            let back = git_in(&dir)
                .args([
                    "-c",
                    "advice.detachedHead=false",
                    "checkout",
                    "--quiet",
                    "--force",
                    "--detach",
                ])
                .arg(&previous)
                .run(&log, &CancellationToken::new())
                .await;
            match back {
                Ok(()) => {
                    stamp.restore(saved);
                    tracing::warn!(target: "machine::install", commit = %previous, "the install failed; the previous ComfyUI checkout is back in place");
                }
                Err(e) => {
                    tracing::error!(target: "machine::install", error = %crate::logging::error_chain(&e), "failed to put the previous ComfyUI checkout back")
                }
            }
        }
    }
    installed.map(|()| true)
}

/// `git -C dir`.
fn git_in(dir: &Path) -> Cmd {
    Cmd::new("git").env("GIT_TERMINAL_PROMPT", "0").arg("-C").arg(dir)
}

/// Checks out the configured ref, builds the venv, installs the requirements and runs the smoke
/// test; the stamp is cleared while the checkout changes and written once all of it passed.
async fn install_ref(
    ctx: &Ctx,
    cfg: &ComfyuiInstallConfig,
    stamp: &Stamp,
    log: &Path,
    progress: &Progress,
) -> Result<(), InstallError> {
    let dir = dir(&ctx.workspace);
    let log = log.to_owned();
    stamp.clear();
    progress.step(&format!("fetching {} at {}", cfg.repo_url, cfg.git_ref));
    let sha = git_checkout(&cfg.repo_url, Some(&cfg.git_ref), &dir, false, &log, &ctx.cancel).await?;
    progress.step(&format!("checked out {sha}"));
    let venv = dir.join("venv");
    if !python(&ctx.workspace).exists() {
        progress.step("creating the venv");
        Cmd::new(&cfg.python)
            .args(["-m", "venv"])
            .arg(&venv)
            .run(&log, &ctx.cancel)
            .await?;
    }
    let requirements = dir.join("requirements.txt");
    if requirements.exists() {
        progress.step("pip install -r requirements.txt");
        let mut pip = pip_install_requirements(ctx, &requirements, &dir);
        if let Some(index) = &cfg.torch_index_url {
            pip = pip.args(["--extra-index-url", index]);
        }
        pip.run(&log, &ctx.cancel).await?;
    }
    if !cfg.extra_packages.is_empty() {
        progress.step(&format!("pip install {}", cfg.extra_packages.join(" ")));
        pip_install(ctx)
            .args(&cfg.extra_packages)
            .cwd(&dir)
            .run(&log, &ctx.cancel)
            .await?;
    }
    smoke_test(ctx, cfg, &dir, &log, progress).await?;
    stamp.write()
}

/// Runs the configured smoke test with the venv's python in the checkout; its failure carries
/// the end of its output (the traceback of a missing module, say).
async fn smoke_test(
    ctx: &Ctx,
    cfg: &ComfyuiInstallConfig,
    dir: &Path,
    log: &Path,
    progress: &Progress,
) -> Result<(), InstallError> {
    if cfg.smoke_test.is_empty() {
        return Ok(());
    }
    let command = format!("python {}", cfg.smoke_test.join(" "));
    progress.step(&format!("smoke test: {command}"));
    Cmd::new(python(&ctx.workspace))
        .args(&cfg.smoke_test)
        .cwd(dir)
        .run(log, &ctx.cancel)
        .await
        .map_err(|e| match e {
            InstallError::Exit { .. } => InstallError::SmokeTest {
                command,
                source: Box::new(e),
            },
            other => other,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launch_matches_the_layout() {
        let l = launch(Path::new("/ws"), 8189, Some(1));
        assert_eq!(
            l.command,
            [
                "/ws/ComfyUI/venv/bin/python",
                "main.py",
                "--listen",
                "127.0.0.1",
                "--port",
                "8189"
            ]
        );
        assert_eq!(l.cwd, Path::new("/ws/ComfyUI"));
        assert_eq!(launch(Path::new("/ws"), 8188, None).command.last().unwrap(), "--cpu");
    }
}

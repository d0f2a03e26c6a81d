//! The Playwright render service's install: pinned `playwright-core` and `p5` from npm in
//! `<workspace>/playwright`, the Node server shipped in this repository (`assets/playwright/
//! server.mjs`, embedded in the binary) beside them, and the Chromium it drives.
//!
//! Chromium is the configured one (`PLAYWRIGHT_CHROMIUM_PATH`), else the first of the usual
//! system locations, else Playwright's own build downloaded with `playwright-core install
//! chromium` into `<workspace>/playwright/browsers` (which needs access to Playwright's CDN).
//! The choice is written to `browser.json`, which the server reads at start. The
//! service runs `node server.mjs --port P` (plus `--gpu` on a GPU), one per GPU or one on a CPU
//! machine.

use std::path::{Path, PathBuf};

use super::common::{Cmd, Progress, Stamp, digest};
use super::{Ctx, InstallError};
use crate::config::PlaywrightInstallConfig;

/// The render server, written into the workspace by the installer.
pub(crate) const SERVER_JS: &str = include_str!("../../assets/playwright/server.mjs");

/// Where a system Chromium usually is, in the order tried.
pub(crate) const CHROMIUM_CANDIDATES: [&str; 5] = [
    "/usr/bin/chromium",
    "/usr/bin/chromium-browser",
    "/usr/bin/google-chrome",
    "/usr/bin/google-chrome-stable",
    "/snap/bin/chromium",
];

/// The install directory under the workspace.
pub(crate) fn dir(workspace: &Path) -> PathBuf {
    workspace.join("playwright")
}

/// The command, working directory and health path of the render server on `port`.
pub(crate) fn launch(workspace: &Path, port: u16, gpu: Option<u32>) -> super::Launch {
    let dir = dir(workspace);
    let mut command = vec![
        "node".to_owned(),
        dir.join("server.mjs").display().to_string(),
        "--port".to_owned(),
        port.to_string(),
    ];
    if gpu.is_some() {
        command.push("--gpu".to_owned());
    }
    super::Launch {
        command,
        cwd: dir,
        health_path: "/health",
    }
}

/// The configured Chromium, or the first system one found.
pub(crate) fn find_chromium(configured: Option<&Path>) -> Result<PathBuf, InstallError> {
    if let Some(p) = configured {
        return if is_executable(p) {
            Ok(p.to_owned())
        } else {
            Err(InstallError::NoChromium {
                looked: p.display().to_string(),
            })
        };
    }
    CHROMIUM_CANDIDATES
        .iter()
        .map(Path::new)
        .find(|p| is_executable(p))
        .map(Path::to_path_buf)
        .ok_or_else(|| InstallError::NoChromium {
            looked: CHROMIUM_CANDIDATES.join(", "),
        })
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Installs the render service unless its stamp is current. Returns whether anything was done.
pub(crate) async fn install(
    ctx: &Ctx,
    cfg: &PlaywrightInstallConfig,
    progress: &Progress,
) -> Result<bool, InstallError> {
    // A configured browser must exist; without one, a missing system browser means Playwright's.
    let system = match find_chromium(cfg.chromium.as_deref()) {
        Ok(p) => Some(p),
        Err(e) if cfg.chromium.is_some() => return Err(e),
        Err(_) => None,
    };
    let dir = dir(&ctx.workspace);
    let stamp = Stamp::new(
        &ctx.stamps,
        "playwright",
        digest(&[
            cfg.playwright_core.as_str(),
            cfg.p5.as_str(),
            SERVER_JS,
            &system
                .as_ref()
                .map_or_else(|| "playwright-download".to_owned(), |p| p.display().to_string()),
        ]),
    );
    let installed = dir.join("node_modules/playwright-core/package.json").exists()
        && dir.join("node_modules/p5/lib/p5.min.js").exists()
        && dir.join("server.mjs").exists()
        && recorded_browser(&dir).is_some_and(|b| is_executable(&b));
    if stamp.is_current() && installed {
        return Ok(false);
    }
    stamp.clear();
    let log = ctx.log("playwright");
    std::fs::create_dir_all(&dir).map_err(|e| InstallError::io("create", &dir, e))?;
    let package = serde_json::json!({
        "name": "machine-render-service",
        "private": true,
        "type": "module",
        "dependencies": {
            "playwright-core": cfg.playwright_core,
            "p5": cfg.p5,
        },
    });
    write(&dir.join("package.json"), &format!("{package:#}\n"))?;
    progress.step(&format!(
        "npm install playwright-core@{} p5@{}",
        cfg.playwright_core, cfg.p5
    ));
    Cmd::new("npm")
        .args(["install", "--no-audit", "--no-fund", "--omit=dev", "--no-package-lock"])
        .cwd(&dir)
        // playwright-core downloads no browser itself; this keeps any postinstall from trying.
        .env("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")
        .run(&log, &ctx.cancel)
        .await?;
    write(&dir.join("server.mjs"), SERVER_JS)?;
    let chromium = match system {
        Some(p) => p,
        None => {
            progress.step("no system Chromium; downloading Playwright's");
            download_chromium(ctx, &dir, &log).await?
        }
    };
    let browser = serde_json::json!({ "executable": chromium });
    write(&dir.join("browser.json"), &format!("{browser:#}\n"))?;
    progress.step(&format!("render server ready, browser {}", chromium.display()));
    stamp.write()?;
    Ok(true)
}

/// The browser `browser.json` names.
fn recorded_browser(dir: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string(dir.join("browser.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v.get("executable")?.as_str().map(PathBuf::from)
}

/// Downloads Playwright's Chromium into `<dir>/browsers` and returns its executable.
async fn download_chromium(ctx: &Ctx, dir: &Path, log: &Path) -> Result<PathBuf, InstallError> {
    let browsers = dir.join("browsers");
    let cli = dir.join("node_modules/playwright-core/cli.js");
    Cmd::new("node")
        .arg(&cli)
        .args(["install", "chromium"])
        .cwd(dir)
        .env("PLAYWRIGHT_BROWSERS_PATH", &browsers)
        .run(log, &ctx.cancel)
        .await?;
    let path = Cmd::new("node")
        .args([
            "--input-type=module",
            "-e",
            "import { chromium } from 'playwright-core'; console.log(chromium.executablePath());",
        ])
        .cwd(dir)
        .env("PLAYWRIGHT_BROWSERS_PATH", &browsers)
        .output(log, &ctx.cancel)
        .await?;
    let path = PathBuf::from(path.trim());
    if is_executable(&path) {
        Ok(path)
    } else {
        Err(InstallError::NoChromium {
            looked: format!("the system locations and Playwright's download at {}", path.display()),
        })
    }
}

fn write(path: &Path, text: &str) -> Result<(), InstallError> {
    std::fs::write(path, text).map_err(|e| InstallError::io("write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_services_get_the_gpu_flag() {
        let l = launch(Path::new("/ws"), 9401, Some(1));
        assert_eq!(
            l.command,
            ["node", "/ws/playwright/server.mjs", "--port", "9401", "--gpu"]
        );
        assert_eq!(launch(Path::new("/ws"), 9400, None).command.len(), 4);
    }

    #[test]
    fn a_configured_chromium_must_exist() {
        let e = find_chromium(Some(Path::new("/nonexistent/chrome"))).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/chrome"), "{e}");
        assert_eq!(find_chromium(Some(Path::new("/bin/sh"))).unwrap(), Path::new("/bin/sh"));
    }
}

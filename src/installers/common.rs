//! What every installer shares: stamps, the argv-only command runner, bounded concurrency and
//! the install-state reporting.
//!
//! A stamp is a file holding the SHA-256 of everything that went into one install step; the step
//! is skipped while the stamp matches and its output is in place, so a run with nothing changed
//! only hashes a few strings. Commands are argv vectors (never shell strings) whose output is
//! appended to the installer's log file; each runs in its own process group, killed as a whole
//! when the install is cancelled or times out. Progress goes three ways: tracing lines with
//! counts and bytes (with rate and time left), an indicatif bar when the logging set-up draws
//! bars, and [`InstallState`] values in a `tokio::sync::watch` channel for the status page.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::InstallError;
use crate::logging::error_chain;

/// Bumped when an installer changes what it does, so old stamps stop matching.
pub(crate) const INSTALLER_VERSION: &str = "1";

/// The state of one installer, as the status page shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum InstallState {
    /// Not started yet.
    Pending,
    /// Working on `step`; `done` of `total` items or bytes.
    Running {
        /// What it is doing.
        step: String,
        /// Items or bytes done.
        done: u64,
        /// Items or bytes in all, when known.
        total: Option<u64>,
        /// `items` or `bytes`.
        unit: &'static str,
    },
    /// Finished; `skipped` when the stamp said nothing changed.
    Done {
        /// Nothing needed doing.
        skipped: bool,
        /// Wall time.
        seconds: f64,
        /// Items that failed without failing the install (non-strict mode).
        failed_items: Vec<String>,
    },
    /// Failed.
    Failed {
        /// Why, in one message.
        reason: String,
    },
}

/// Install states by installer name.
pub type InstallStates = BTreeMap<String, InstallState>;

/// Owns the install-state channel and the terminal progress bars.
#[derive(Debug, Clone)]
pub struct InstallProgress {
    tx: watch::Sender<InstallStates>,
    bars: Option<indicatif::MultiProgress>,
}

impl Default for InstallProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl InstallProgress {
    /// A tracker; bars are drawn only where the logging set-up draws them (text format, stderr a
    /// terminal: never in container logs), in the one container the log writer hides while it
    /// writes a line.
    pub fn new() -> Self {
        InstallProgress {
            tx: watch::channel(InstallStates::new()).0,
            bars: crate::logging::progress_bars(),
        }
    }

    /// A receiver of every state change, for the health/status server.
    pub fn subscribe(&self) -> watch::Receiver<InstallStates> {
        self.tx.subscribe()
    }

    /// The states now.
    pub fn snapshot(&self) -> InstallStates {
        self.tx.borrow().clone()
    }

    pub(crate) fn set(&self, name: &str, state: InstallState) {
        self.tx.send_modify(|m| {
            m.insert(name.to_owned(), state);
        });
    }

    /// Starts reporting for installer `name`.
    pub(crate) fn progress(&self, name: &str) -> Progress {
        let bar = self.bars.as_ref().map(|m| {
            let bar = m.add(indicatif::ProgressBar::no_length());
            bar.set_style(bar_style(None, "items"));
            bar.set_prefix(name.to_owned());
            bar
        });
        Progress {
            name: name.to_owned(),
            tracker: self.clone(),
            bar,
            started: Instant::now(),
            last_log: Arc::new(Mutex::new(None)),
            step_started: Arc::new(Mutex::new(None)),
        }
    }
}

/// The bar's look: a spinner while the total is unknown (or zero: a full bar for `0/0` would
/// claim work done that never started), counts for items, and bytes with rate and ETA for
/// downloads.
fn bar_style(total: Option<u64>, unit: &str) -> indicatif::ProgressStyle {
    let template = match (total.filter(|t| *t > 0), unit) {
        (None, "bytes") => "{prefix:>16} {spinner} {binary_bytes} {binary_bytes_per_sec} {msg}",
        (None, _) => "{prefix:>16} {spinner} {msg}",
        (Some(_), "bytes") => {
            "{prefix:>16} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta} {msg}"
        }
        (Some(_), _) => "{prefix:>16} [{bar:30}] {pos}/{len} {msg}",
    };
    indicatif::ProgressStyle::with_template(template)
        .expect("the templates are valid indicatif templates")
        .progress_chars("=> ")
}

/// Reports one installer's progress to the log, the bar and the state channel.
#[derive(Debug, Clone)]
pub(crate) struct Progress {
    name: String,
    tracker: InstallProgress,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_log: Arc<Mutex<Option<Instant>>>,
    /// The step counted now and when its first count came, for the download rate.
    step_started: Arc<Mutex<Option<(String, Instant, u64)>>>,
}

/// How often byte progress is logged.
const LOG_EVERY: Duration = Duration::from_secs(5);

impl Progress {
    /// A new step with nothing counted yet.
    pub(crate) fn step(&self, step: &str) {
        tracing::info!(target: "machine::install", installer = %self.name, "{step}");
        if let Some(b) = &self.bar {
            b.unset_length();
            b.set_style(bar_style(None, "items"));
            b.set_message(step.to_owned());
        }
        self.tracker.set(
            &self.name,
            InstallState::Running {
                step: step.to_owned(),
                done: 0,
                total: None,
                unit: "items",
            },
        );
    }

    /// Items of a step done so far; every change is logged.
    pub(crate) fn items(&self, step: &str, done: u64, total: u64) {
        tracing::info!(target: "machine::install", installer = %self.name, "{step}: {done}/{total}");
        self.count(step, done, Some(total), "items");
    }

    /// Bytes of a download so far; logged at most every few seconds, with the rate and, when
    /// the size is known, the time left.
    pub(crate) fn bytes(&self, step: &str, done: u64, total: Option<u64>) {
        let now = Instant::now();
        let log = {
            let mut last = self
                .last_log
                .lock()
                .expect("the progress lock is never held across a panic");
            let due = last.is_none_or(|t| now.duration_since(t) >= LOG_EVERY) || Some(done) == total;
            if due {
                *last = Some(now);
            }
            due
        };
        if log {
            let rate = self.rate(step, done, now);
            let mut line = format!(
                "{step}: {} of {}",
                human_bytes(done),
                total.map_or_else(|| "unknown".to_owned(), human_bytes)
            );
            if let Some(rate) = rate.filter(|r| *r > 0.0) {
                line.push_str(&format!(", {}/s", human_bytes(rate as u64)));
                if let Some(total) = total.filter(|t| *t > done) {
                    let left = Duration::from_secs_f64(((total - done) as f64 / rate).ceil());
                    line.push_str(&format!(", {} left", humantime::format_duration(left)));
                }
            }
            tracing::info!(target: "machine::install", installer = %self.name, "{line}");
        }
        self.count(step, done, total, "bytes");
    }

    /// Bytes per second of `step` since its first count, once there is a measurable interval.
    fn rate(&self, step: &str, done: u64, now: Instant) -> Option<f64> {
        let mut started = self
            .step_started
            .lock()
            .expect("the progress lock is never held across a panic");
        match &*started {
            Some((s, at, first)) if s == step && done >= *first => {
                let secs = now.duration_since(*at).as_secs_f64();
                (secs >= 0.5).then(|| (done - first) as f64 / secs)
            }
            _ => {
                *started = Some((step.to_owned(), now, done));
                None
            }
        }
    }

    fn count(&self, step: &str, done: u64, total: Option<u64>, unit: &'static str) {
        if let Some(b) = &self.bar {
            // Position and length before the style, so that no draw in between shows one
            // step's count against another step's total.
            b.set_position(done);
            match total.filter(|t| *t > 0) {
                Some(t) => b.set_length(t),
                None => b.unset_length(),
            }
            b.set_style(bar_style(total, unit));
            b.set_message(step.to_owned());
        }
        self.tracker.set(
            &self.name,
            InstallState::Running {
                step: step.to_owned(),
                done,
                total,
                unit,
            },
        );
    }

    /// The installer finished.
    pub(crate) fn done(&self, skipped: bool, failed_items: Vec<String>) {
        let seconds = self.started.elapsed().as_secs_f64();
        if skipped {
            tracing::info!(target: "machine::install", installer = %self.name, "up to date, nothing to do");
        } else if failed_items.is_empty() {
            tracing::info!(target: "machine::install", installer = %self.name, "installed in {seconds:.1}s");
        } else {
            tracing::warn!(
                target: "machine::install",
                installer = %self.name,
                "installed in {seconds:.1}s, but these failed: {}",
                failed_items.join(", ")
            );
        }
        // The bar goes once its line is logged: a finished bar left on screen would be drawn
        // again below every later log line.
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        self.tracker.set(
            &self.name,
            InstallState::Done {
                skipped,
                seconds,
                failed_items,
            },
        );
    }

    /// The installer failed.
    pub(crate) fn failed(&self, error: &InstallError) {
        let reason = error_chain(error);
        tracing::error!(target: "machine::install", installer = %self.name, "{reason}");
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        self.tracker.set(&self.name, InstallState::Failed { reason });
    }
}

pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// The SHA-256 of `parts`, each length-prefixed so that no two different lists hash alike.
pub(crate) fn digest<S: AsRef<[u8]>>(parts: &[S]) -> String {
    let mut h = Sha256::new();
    h.update(INSTALLER_VERSION.as_bytes());
    for p in parts {
        let p = p.as_ref();
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    hex::encode(h.finalize())
}

/// A stamp file: `digest` recorded once a step succeeded.
#[derive(Debug, Clone)]
pub(crate) struct Stamp {
    path: PathBuf,
    digest: String,
}

impl Stamp {
    /// The stamp `name` under `dir` for a step whose inputs hash to `digest`.
    pub(crate) fn new(dir: &Path, name: &str, digest: String) -> Self {
        Stamp {
            path: dir.join(format!("{name}.stamp")),
            digest,
        }
    }

    /// Whether the step already ran with exactly these inputs.
    pub(crate) fn is_current(&self) -> bool {
        std::fs::read_to_string(&self.path).is_ok_and(|s| s.trim() == self.digest)
    }

    /// The digest of the inputs.
    pub(crate) fn digest(&self) -> &str {
        &self.digest
    }

    /// Records that the step succeeded.
    pub(crate) fn write(&self) -> Result<(), InstallError> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir).map_err(|e| InstallError::io("create", dir, e))?;
        }
        let tmp = self.path.with_extension("stamp.tmp");
        std::fs::write(&tmp, format!("{}\n", self.digest)).map_err(|e| InstallError::io("write", &tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| InstallError::io("write", &self.path, e))
    }

    /// What the stamp file holds now (the digest of the install in place), to put back with
    /// [`Stamp::restore`] when a new install fails.
    pub(crate) fn saved(&self) -> Option<String> {
        std::fs::read_to_string(&self.path).ok()
    }

    /// Puts back what [`Stamp::saved`] read (nothing: no stamp).
    pub(crate) fn restore(&self, saved: Option<String>) {
        match saved {
            Some(text) => {
                let _ = std::fs::write(&self.path, text);
            }
            None => self.clear(),
        }
    }

    /// Forgets the step, so that a failed re-install is retried next time.
    pub(crate) fn clear(&self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// An external command: a program and its arguments, never a shell string.
#[derive(Debug, Clone)]
pub(crate) struct Cmd {
    argv: Vec<OsString>,
    cwd: Option<PathBuf>,
    env: Vec<(OsString, OsString)>,
}

impl Cmd {
    pub(crate) fn new(program: impl AsRef<OsStr>) -> Self {
        Cmd {
            argv: vec![program.as_ref().to_owned()],
            cwd: None,
            env: Vec::new(),
        }
    }

    pub(crate) fn arg(mut self, a: impl AsRef<OsStr>) -> Self {
        self.argv.push(a.as_ref().to_owned());
        self
    }

    pub(crate) fn args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.argv.extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub(crate) fn cwd(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cwd = Some(dir.into());
        self
    }

    pub(crate) fn env(mut self, k: impl AsRef<OsStr>, v: impl AsRef<OsStr>) -> Self {
        self.env.push((k.as_ref().to_owned(), v.as_ref().to_owned()));
        self
    }

    fn display(&self) -> String {
        self.argv
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// Runs the command with its output appended to `log`.
    pub(crate) async fn run(&self, log: &Path, cancel: &CancellationToken) -> Result<(), InstallError> {
        self.exec(log, cancel, false).await.map(drop)
    }

    /// Runs the command and returns its standard output (standard error goes to `log`).
    pub(crate) async fn output(&self, log: &Path, cancel: &CancellationToken) -> Result<String, InstallError> {
        self.exec(log, cancel, true).await
    }

    async fn exec(&self, log: &Path, cancel: &CancellationToken, capture: bool) -> Result<String, InstallError> {
        let command = self.display();
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).map_err(|e| InstallError::io("create", dir, e))?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| InstallError::io("open", log, e))?;
        let _ = writeln!(file, "$ {command}");
        let start = file.metadata().map_or(0, |m| m.len());
        let err = file.try_clone().map_err(|e| InstallError::io("open", log, e))?;
        let mut c = tokio::process::Command::new(&self.argv[0]);
        c.args(&self.argv[1..])
            .stdin(Stdio::null())
            .stderr(Stdio::from(err))
            .kill_on_drop(true);
        if capture {
            c.stdout(Stdio::piped());
        } else {
            c.stdout(Stdio::from(file));
        }
        if let Some(d) = &self.cwd {
            c.current_dir(d);
        }
        // Third-party code (pip, npm, git hooks, a node's install script) never sees the
        // machine's secrets: the services' allow-list, plus the tools' own settings.
        c.env_clear()
            .envs(crate::supervisor::env::installer_env(std::env::vars_os()));
        for (k, v) in &self.env {
            c.env(k, v);
        }
        // Through the supervisor's registry, so the orphan reaper never takes its exit status.
        // Installers' children (pip, npm, git) start children of their own: a cancelled or
        // timed-out install must end the whole group, not only the direct child.
        let (child, guard) = crate::supervisor::spawn_group(&mut c).map_err(|source| InstallError::Spawn {
            command: command.clone(),
            source,
        })?;
        let installer = log
            .file_stem()
            .map(|s| s.to_string_lossy().trim_start_matches("install-").to_owned())
            .unwrap_or_default();
        let short = self.short();
        let started = Instant::now();
        let wait = child.wait_with_output();
        tokio::pin!(wait);
        let mut heartbeat = tokio::time::interval_at((started + HEARTBEAT).into(), HEARTBEAT);
        // A long pip or git run is summarised in the log rather than hidden in its file: what it
        // is doing now every so often, and what it installed at the end.
        let out = loop {
            tokio::select! {
                out = &mut wait => break out.map_err(|source| InstallError::Spawn { command: command.clone(), source })?,
                () = cancel.cancelled() => return Err(InstallError::Cancelled),
                _ = heartbeat.tick() => {
                    let now = last_output_line(log, start);
                    tracing::info!(
                        target: "machine::install",
                        installer = %installer,
                        "{short}: still running after {}{}",
                        humantime::format_duration(Duration::from_secs(started.elapsed().as_secs())),
                        now.map(|l| format!(" ({l})")).unwrap_or_default()
                    );
                }
            }
        };
        if let Some(guard) = guard {
            guard.disarm();
        }
        if out.status.success() {
            if let Some(summary) = self.summary(log, start) {
                tracing::info!(target: "machine::install", installer = %installer, "{short}: {summary}");
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(InstallError::Exit {
                command,
                status: out.status.to_string(),
                log: log.to_owned(),
                // This run's output only: the log is appended to by every attempt.
                tail: log_tail_from(log, start, 15),
            })
        }
    }

    /// The program and its first words, for log lines: never a URL, which may hold credentials.
    fn short(&self) -> String {
        let program = Path::new(&self.argv[0])
            .file_name()
            .map_or_else(|| self.argv[0].to_string_lossy(), |n| n.to_string_lossy())
            .into_owned();
        let words = self.argv[1..]
            .iter()
            .map(|a| a.to_string_lossy())
            .filter(|a| !a.starts_with('-') && !a.contains("://") && !a.contains('/'))
            .take(2);
        std::iter::once(program.into())
            .chain(words)
            .collect::<Vec<std::borrow::Cow<'_, str>>>()
            .join(" ")
    }

    /// What a finished pip install did, from its output in the log since `start`.
    fn summary(&self, log: &Path, start: u64) -> Option<String> {
        let is_pip_install = self.argv.iter().any(|a| a == "pip") && self.argv.iter().any(|a| a == "install");
        if !is_pip_install {
            return None;
        }
        let output = read_from(log, start, MAX_SUMMARY_READ);
        Some(pip_summary(&output))
    }
}

/// How often a running install command's progress is logged.
const HEARTBEAT: Duration = Duration::from_secs(15);
/// How much of a command's output is read for its summary.
const MAX_SUMMARY_READ: u64 = 4 << 20;

/// `Successfully installed a-1 b-2` into "installed 2 packages: a-1, b-2", else how many
/// requirements were already there.
fn pip_summary(output: &str) -> String {
    if let Some(line) = output
        .lines()
        .rev()
        .find_map(|l| l.trim().strip_prefix("Successfully installed "))
    {
        let packages: Vec<&str> = line.split_whitespace().collect();
        const SHOWN: usize = 8;
        let mut s = format!(
            "installed {} package{}: {}",
            packages.len(),
            if packages.len() == 1 { "" } else { "s" },
            packages[..packages.len().min(SHOWN)].join(", ")
        );
        if packages.len() > SHOWN {
            s.push_str(&format!(" and {} more", packages.len() - SHOWN));
        }
        s
    } else {
        let satisfied = output
            .lines()
            .filter(|l| l.starts_with("Requirement already satisfied"))
            .count();
        format!("nothing new to install ({satisfied} requirements already satisfied)")
    }
}

/// The log's text from byte `start`, at most `max` bytes (the last ones).
fn read_from(log: &Path, start: u64, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(log) else {
        return String::new();
    };
    let len = f.metadata().map_or(0, |m| m.len());
    let from = start.max(len.saturating_sub(max));
    let mut buf = Vec::new();
    if f.seek(SeekFrom::Start(from)).is_ok() {
        let _ = f.take(max).read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// The last non-empty line a command wrote to the log since `start` (progress bars' carriage
/// returns split lines too), cut to a length a log line can carry.
fn last_output_line(log: &Path, start: u64) -> Option<String> {
    let text = read_from(log, start, 4096);
    let line = text
        .split(['\n', '\r'])
        .map(str::trim)
        .rfind(|l| !l.is_empty() && !l.starts_with("$ "))?;
    Some(line.chars().take(160).collect())
}

/// Kills a child's process group when dropped before the child was waited for.
/// The last `n` lines of `path` written after byte `start` (one command's output).
fn log_tail_from(path: &Path, start: u64, n: usize) -> String {
    let text = std::fs::read(path).unwrap_or_default();
    let from = usize::try_from(start).unwrap_or(usize::MAX).min(text.len());
    let text = String::from_utf8_lossy(&text[from..]);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Runs `f` over `items` with at most `limit` at once, returning results in input order.
pub(crate) async fn bounded<T, R, F, Fut>(items: Vec<T>, limit: usize, f: F) -> Vec<R>
where
    F: Fn(T) -> Fut,
    Fut: Future<Output = R>,
{
    let mut out: Vec<(usize, R)> = futures_util::stream::iter(items.into_iter().enumerate())
        .map(|(i, item)| {
            let fut = f(item);
            async move { (i, fut.await) }
        })
        .buffer_unordered(limit.max(1))
        .collect()
        .await;
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(_, r)| r).collect()
}

/// Clones or fetches `url` into `dir` and checks out `git_ref` (a branch, tag or commit; the
/// remote's default branch when `None`), detached. Returns the commit checked out.
pub(crate) async fn git_checkout(
    url: &str,
    git_ref: Option<&str>,
    dir: &Path,
    submodules: bool,
    log: &Path,
    cancel: &CancellationToken,
) -> Result<String, InstallError> {
    // A credential prompt would hang an unattended install; fail instead.
    let git = || Cmd::new("git").env("GIT_TERMINAL_PROMPT", "0").arg("-C").arg(dir);
    if dir.join(".git").is_dir() {
        git()
            .args(["remote", "set-url", "origin", url])
            .run(log, cancel)
            .await?;
    } else {
        std::fs::create_dir_all(dir).map_err(|e| InstallError::io("create", dir, e))?;
        git().args(["init", "--quiet"]).run(log, cancel).await?;
        git().args(["remote", "add", "origin", url]).run(log, cancel).await?;
    }
    let wanted = git_ref.unwrap_or("HEAD");
    // Fetching the ref by name works for branches, tags and (on most servers) commits; a commit
    // the server will not hand out by name is found after fetching every branch and tag. The
    // target is resolved to a commit before the checkout is touched, and a ref found nowhere
    // fails with the first fetch's error (git's "couldn't find remote ref"), the root cause.
    let target = match git()
        .args(["fetch", "--quiet", "origin", wanted])
        .run(log, cancel)
        .await
    {
        Ok(()) => "FETCH_HEAD".to_owned(),
        Err(InstallError::Cancelled) => return Err(InstallError::Cancelled),
        Err(first) => {
            let all = git()
                .args([
                    "fetch",
                    "--quiet",
                    "--tags",
                    "origin",
                    "+refs/heads/*:refs/remotes/origin/*",
                ])
                .run(log, cancel)
                .await;
            let resolved = match all {
                Err(InstallError::Cancelled) => return Err(InstallError::Cancelled),
                Err(_) => None,
                Ok(()) => git()
                    .args(["rev-parse", "--verify", "--quiet", &format!("{wanted}^{{commit}}")])
                    .output(log, cancel)
                    .await
                    .ok(),
            };
            match resolved.map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()) {
                Some(sha) => sha,
                None => return Err(first),
            }
        }
    };
    git()
        .args([
            "-c",
            "advice.detachedHead=false",
            "checkout",
            "--quiet",
            "--force",
            "--detach",
        ])
        .arg(&target)
        .run(log, cancel)
        .await?;
    if submodules {
        git()
            .args(["submodule", "update", "--init", "--recursive", "--quiet"])
            .run(log, cancel)
            .await?;
    }
    let sha = git().args(["rev-parse", "HEAD"]).output(log, cancel).await?;
    Ok(sha.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_are_unambiguous() {
        assert_ne!(digest(&["ab", "c"]), digest(&["a", "bc"]));
        assert_eq!(digest(&["x"]), digest(&[String::from("x")]));
    }

    #[test]
    fn stamps_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let s = Stamp::new(dir.path(), "x", digest(&["1"]));
        assert!(!s.is_current());
        s.write().unwrap();
        assert!(s.is_current());
        assert!(!Stamp::new(dir.path(), "x", digest(&["2"])).is_current());
        s.clear();
        assert!(!s.is_current());
    }

    #[test]
    fn states_are_published_to_subscribers() {
        let tracker = InstallProgress::new();
        let mut rx = tracker.subscribe();
        tracker.set("comfyui", InstallState::Pending);
        let p = tracker.progress("comfyui");
        p.items("custom nodes", 2, 5);
        assert!(rx.has_changed().unwrap());
        assert_eq!(
            rx.borrow_and_update()["comfyui"],
            InstallState::Running {
                step: "custom nodes".into(),
                done: 2,
                total: Some(5),
                unit: "items"
            }
        );
        p.failed(&InstallError::Cancelled);
        let json = serde_json::to_value(&*rx.borrow()).unwrap();
        assert_eq!(json["comfyui"]["state"], "failed");
        assert_eq!(json["comfyui"]["reason"], "failed to finish: cancelled");
        p.done(false, vec!["a: broken".into()]);
        assert!(
            matches!(&tracker.snapshot()["comfyui"], InstallState::Done { skipped: false, failed_items, .. } if failed_items.len() == 1)
        );
    }

    #[test]
    fn pip_output_is_summarised() {
        let out = "Collecting a\nRequirement already satisfied: b in ./venv\nSuccessfully installed a-1.0 c-2.0\n";
        assert_eq!(pip_summary(out), "installed 2 packages: a-1.0, c-2.0");
        let many: Vec<String> = (0..10).map(|i| format!("p{i}-1")).collect();
        let out = format!("Successfully installed {}\n", many.join(" "));
        assert!(pip_summary(&out).ends_with("p7-1 and 2 more"), "{}", pip_summary(&out));
        let out = "Requirement already satisfied: a\nRequirement already satisfied: b\n";
        assert_eq!(
            pip_summary(out),
            "nothing new to install (2 requirements already satisfied)"
        );
    }

    #[test]
    fn command_lines_in_logs_hold_no_urls() {
        let c = Cmd::new("/venv/bin/python")
            .args([
                "-m",
                "pip",
                "install",
                "--extra-index-url",
                "https://u:secret@x/simple",
                "-r",
            ])
            .arg("/w/requirements.txt");
        assert_eq!(c.short(), "python pip install");
        let g = Cmd::new("git").args(["-C", "/w/ComfyUI", "fetch", "--quiet", "origin", "https://u:p@h/r"]);
        assert_eq!(g.short(), "git fetch origin");
    }

    #[test]
    fn the_last_output_line_skips_the_command_and_bar_redraws() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("install-x.log");
        std::fs::write(&log, "old run\n$ pip install x\nCollecting x\r 10%\r 55% |###  |\r\n").unwrap();
        assert_eq!(last_output_line(&log, 8).as_deref(), Some("55% |###  |"));
        assert_eq!(last_output_line(&log, 1000), None);
    }

    #[test]
    fn bytes_read_well() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }

    #[tokio::test]
    async fn commands_log_and_fail_with_the_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("logs/x.log");
        let cancel = CancellationToken::new();
        let out = Cmd::new("echo").arg("hi there").output(&log, &cancel).await.unwrap();
        assert_eq!(out, "hi there\n");
        let e = Cmd::new("sh")
            .args(["-c", "echo boom >&2; exit 3"])
            .run(&log, &cancel)
            .await
            .unwrap_err();
        let msg = error_chain(&e);
        assert!(msg.contains("exit status: 3") && msg.contains("boom"), "{msg}");
        assert!(std::fs::read_to_string(&log).unwrap().contains("$ sh -c"));
    }

    #[tokio::test]
    async fn cancelling_kills_the_process_group() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("x.log");
        let pidfile = dir.path().join("pid");
        let cancel = CancellationToken::new();
        let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
        let cmd = Cmd::new("sh").args(["-c", &script]);
        let run = cmd.run(&log, &cancel);
        let c2 = cancel.clone();
        let stop = async move {
            while !pidfile.exists() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            c2.cancel();
            pidfile
        };
        let (r, pidfile) = tokio::time::timeout(Duration::from_secs(10), async { tokio::join!(run, stop) })
            .await
            .unwrap();
        assert!(matches!(r, Err(InstallError::Cancelled)));
        let pid: i32 = std::fs::read_to_string(pidfile).unwrap().trim().parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        // The grandchild is gone once killed and reaped by init (or left a zombie until then).
        while Instant::now() < deadline {
            let alive = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.split_whitespace().nth(2) != Some("Z"));
            if !alive {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("the grandchild {pid} survived the cancelled install");
    }
}

//! Readiness and liveness probes: one check (HTTP GET answering 2xx, a TCP connect, or a command
//! exiting 0) bounded by its timeout, and the loop that runs it every interval and reports when
//! its verdict flips.
//!
//! A probe starts with the verdict "failing" and passes after its first successful check; it
//! fails again only after `failure_threshold` consecutive failed checks, so one slow answer
//! does not flap a service. Probe commands are spawned through [`super::spawn`] in their own
//! process group, which is killed when the check times out.

use std::process::Stdio;
use std::sync::OnceLock;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::config::{ProbeCheck, ProbeSpec};

/// Which probe a verdict is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeKind {
    /// The readiness probe.
    Ready,
    /// The liveness probe.
    Live,
}

/// A probe's verdict changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    /// Which probe.
    pub kind: ProbeKind,
    /// Whether it now passes.
    pub passing: bool,
    /// Why the last check failed, when it did.
    pub reason: Option<String>,
}

/// The HTTP client of every HTTP probe, made on first use (a machine without HTTP probes never
/// pays for its TLS setup).
fn http() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        crate::http_client::builder()
            .build()
            .expect("a builder whose roots are known to load, with nothing else set, always builds")
    })
}

/// Runs one check within `timeout`; `Err` says why it failed.
pub async fn check(check: &ProbeCheck, timeout: Duration) -> Result<(), String> {
    match tokio::time::timeout(timeout, run_check(check, http())).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {}", humantime::format_duration(timeout))),
    }
}

async fn run_check(check: &ProbeCheck, http: &reqwest::Client) -> Result<(), String> {
    match check {
        ProbeCheck::Http(url) => {
            let resp = http
                .get(url)
                .send()
                .await
                .map_err(|e| format!("GET {url} failed: {e}"))?;
            if resp.status().is_success() {
                Ok(())
            } else {
                Err(format!("GET {url} answered {}", resp.status()))
            }
        }
        ProbeCheck::Tcp(addr) => tokio::net::TcpStream::connect(addr.as_str())
            .await
            .map(drop)
            .map_err(|e| format!("connect to {addr} failed: {e}")),
        ProbeCheck::Command(argv) => {
            let mut cmd = tokio::process::Command::new(&argv[0]);
            // A probe is configured code like its service, and gets no more of the machine's
            // environment than a service does.
            cmd.args(&argv[1..])
                .env_clear()
                .envs(std::env::vars_os().filter(|(k, _)| k.to_str().is_some_and(super::env::allowed)))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            // If the timeout drops this future, the guard kills the probe's whole group.
            let (mut child, _guard) =
                super::reaper::spawn_group(&mut cmd).map_err(|e| format!("failed to run {}: {e}", argv[0]))?;
            let status = child
                .wait()
                .await
                .map_err(|e| format!("failed to wait for {}: {e}", argv[0]))?;
            if status.success() {
                Ok(())
            } else {
                Err(format!("{} exited with {status}", argv[0]))
            }
        }
    }
}

/// The verdict state machine of one probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threshold {
    threshold: u32,
    failures: u32,
    passing: bool,
}

impl Threshold {
    /// A tracker that flips to failing after `threshold` consecutive failures.
    pub fn new(threshold: u32) -> Threshold {
        Threshold {
            threshold: threshold.max(1),
            failures: 0,
            passing: false,
        }
    }

    /// Records one check; returns the new verdict when it changed.
    pub fn record(&mut self, ok: bool) -> Option<bool> {
        let before = self.passing;
        if ok {
            self.failures = 0;
            self.passing = true;
        } else {
            self.failures = self.failures.saturating_add(1);
            if self.failures >= self.threshold {
                self.passing = false;
            }
        }
        (self.passing != before || (!ok && self.failures == self.threshold)).then_some(self.passing)
    }
}

/// Until a probe first passes, it checks at most this far apart (or its own interval, if
/// shorter): a service that becomes ready is noticed within this, while a ready service is
/// checked only at its configured interval.
const STARTUP_INTERVAL: Duration = Duration::from_millis(100);

/// Runs `spec` until `stop` is cancelled, sending a [`Verdict`] whenever it changes. A liveness
/// probe also reports each time it reaches the threshold, so the actor can act on it.
pub async fn run(kind: ProbeKind, spec: ProbeSpec, out: mpsc::Sender<Verdict>, stop: CancellationToken) {
    let _ = stop
        .run_until_cancelled(async {
            tokio::time::sleep(spec.initial_delay).await;
            let mut tracker = Threshold::new(spec.failure_threshold);
            let mut passed_once = false;
            loop {
                let result = check(&spec.check, spec.timeout).await;
                passed_once |= result.is_ok();
                if let Some(passing) = tracker.record(result.is_ok()) {
                    let verdict = Verdict {
                        kind,
                        passing,
                        reason: result.err(),
                    };
                    if out.send(verdict).await.is_err() {
                        return;
                    }
                }
                let wait = if passed_once || kind != ProbeKind::Ready {
                    spec.interval
                } else {
                    spec.interval.min(STARTUP_INTERVAL)
                };
                tokio::time::sleep(wait).await;
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_verdict_flips_after_the_threshold() {
        let mut t = Threshold::new(3);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), Some(true));
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), Some(true));
    }

    #[test]
    fn a_probe_that_never_passed_reports_reaching_the_threshold() {
        let mut t = Threshold::new(2);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), Some(false));
    }

    #[tokio::test]
    async fn checks_talk_to_real_things() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let t = Duration::from_secs(5);
        check(&ProbeCheck::Tcp(addr.clone()), t).await.unwrap();
        drop(listener);
        assert!(check(&ProbeCheck::Tcp(addr), t).await.is_err());
        check(&ProbeCheck::Command(vec!["true".into()]), t).await.unwrap();
        let err = check(&ProbeCheck::Command(vec!["false".into()]), t).await.unwrap_err();
        assert!(err.contains("exited"), "{err}");
        let started = std::time::Instant::now();
        let err = check(
            &ProbeCheck::Command(vec!["sleep".into(), "30".into()]),
            Duration::from_millis(200),
        )
        .await
        .unwrap_err();
        assert!(err.contains("no answer"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn http_checks_want_2xx() {
        let app = axum::Router::new()
            .route("/ok", axum::routing::get(|| async { "ok" }))
            .route(
                "/bad",
                axum::routing::get(|| async { (axum::http::StatusCode::SERVICE_UNAVAILABLE, "no") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });
        let t = Duration::from_secs(5);
        check(&ProbeCheck::Http(format!("http://{addr}/ok")), t).await.unwrap();
        let err = check(&ProbeCheck::Http(format!("http://{addr}/bad")), t)
            .await
            .unwrap_err();
        assert!(err.contains("503"), "{err}");
        server.abort();
    }
}

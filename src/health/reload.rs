//! The reload as the server's `POST /reload` asks for it: the request it hands to `app`'s
//! reloader (`app/reload.rs`, which SIGHUP and `machine reload` reach too) and the answer it
//! sends back. They live here, below `app`, so the server names them without importing `app`.

use std::path::PathBuf;

use serde::Serialize;
use tokio::sync::oneshot;

use crate::config::{ConfigError, Problem};
use crate::plan::PlanDiff;

/// What a reload did.
#[derive(Debug, Clone, Serialize)]
pub struct ReloadReport {
    /// What changed, and what was kept running.
    pub diff: PlanDiff,
    /// Settings that changed but apply only at the next restart.
    pub restart_required: Vec<String>,
    /// Machine-wide settings a reload applied in place (`worker.lease`, from the next claim).
    pub applied: Vec<String>,
    /// The new plan's adjustments (counts capped, CPU mode).
    pub warnings: Vec<String>,
    /// The configuration file the machine read (none: defaults and environment only).
    pub config_file: Option<PathBuf>,
    /// A dry run: what a reload would do; nothing was applied.
    pub dry_run: bool,
}

/// Why a reload failed.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The new configuration is invalid; nothing changed.
    #[error("the new configuration is refused, nothing changed")]
    Invalid(#[source] ConfigError),
    /// A step of applying the new plan failed; what was applied before it stays.
    #[error("failed to {step}")]
    Apply {
        /// The step, in words.
        step: String,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The machine is shutting down or not yet running its services.
    #[error("the machine cannot reload now: {0}")]
    Unavailable(&'static str),
}

impl ReloadError {
    /// Every problem of a refused configuration (empty for other errors).
    pub fn problems(&self) -> &[Problem] {
        match self {
            ReloadError::Invalid(e) => e.problems(),
            _ => &[],
        }
    }
}

/// A reload request: whether it is a dry run, and the caller's reply channel.
#[derive(Debug)]
pub struct ReloadRequest {
    /// Load and compare only; change nothing.
    pub dry_run: bool,
    /// Where the report goes.
    pub reply: oneshot::Sender<Result<ReloadReport, ReloadError>>,
}

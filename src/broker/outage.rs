//! What the machine knows of its Redis: whether the last command succeeded, since when commands
//! fail and why (unreachable, read-only, refused credentials, ...), and how many errors of each
//! kind there were. The broker records every library call here, and so does the start-up loop
//! before the broker exists; `/ready`, `/status`, `/metrics` and the workers' backoff read it.
//!
//! It promises one answer to "can a claim succeed now?": a Redis failing for
//! [`NOT_READY_AFTER`] makes the machine not ready with the cause ([`RedisState::not_ready`]),
//! and the first success after failures wakes everyone waiting on
//! [`RedisHealth::answering_again`], so that no retry sleeps out a long backoff after Redis is
//! back.
//!
//! It is also where an outage is told in the log, once when it starts and once when it ends:
//! every caller that meets an outage error ([`is_outage`]) logs it at debug level only, so that
//! a Redis gone for 25 s is two WARN lines, not one per retry of every loop.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redis::{ErrorKind, RedisError, ServerErrorKind};
use tokio::sync::watch;

use super::BrokerError;

/// How long commands must fail before the machine says it cannot claim: a blip (one dropped
/// connection, a failover that takes a second) does not flip `/ready`.
pub const NOT_READY_AFTER: Duration = Duration::from_secs(5);

/// What kind of Redis failure an error is, as `/metrics` counts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// No connection: refused, reset, DNS, TLS, or no answer in time.
    Unreachable,
    /// The node is a replica (`READONLY`): a failover moved the master.
    ReadOnly,
    /// The credentials were refused (`WRONGPASS`, `NOAUTH`, ...).
    Auth,
    /// Anything else Redis refused (a missing database, a script error, ...).
    Other,
}

impl FaultKind {
    /// Whether this kind is Redis failing as a whole (gone, moved, or refusing this machine),
    /// which every command meets until it ends, rather than one command's own error.
    pub fn is_outage(self) -> bool {
        matches!(self, FaultKind::Unreachable | FaultKind::ReadOnly | FaultKind::Auth)
    }

    /// The label of `machine_redis_errors_total` and the word `/ready` uses.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Unreachable => "unreachable",
            FaultKind::ReadOnly => "readonly",
            FaultKind::Auth => "auth",
            FaultKind::Other => "other",
        }
    }

    /// Every kind, for metrics that list each at 0 from the start.
    pub const ALL: [FaultKind; 4] = [
        FaultKind::Unreachable,
        FaultKind::ReadOnly,
        FaultKind::Auth,
        FaultKind::Other,
    ];

    /// The kind of a client error.
    pub fn of(e: &RedisError) -> FaultKind {
        match e.kind() {
            ErrorKind::Server(ServerErrorKind::ReadOnly) => FaultKind::ReadOnly,
            ErrorKind::AuthenticationFailed => FaultKind::Auth,
            ErrorKind::Io => FaultKind::Unreachable,
            _ if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() => {
                FaultKind::Unreachable
            }
            _ => {
                let text = e.to_string();
                if text.contains("NOAUTH") || text.contains("WRONGPASS") || text.contains("NOPERM") {
                    FaultKind::Auth
                } else if text.contains("READONLY") {
                    FaultKind::ReadOnly
                } else {
                    FaultKind::Other
                }
            }
        }
    }

    /// The kind of a broker error, `None` for errors that are not Redis failing (a fenced
    /// write that lost its job, a reply of another version).
    pub fn of_broker(e: &BrokerError) -> Option<FaultKind> {
        match e {
            BrokerError::Connect { source, .. } | BrokerError::Redis { source, .. } => Some(FaultKind::of(source)),
            _ => None,
        }
    }
}

/// One snapshot of the link to Redis.
#[derive(Debug, Clone, Default)]
pub struct RedisState {
    /// Whether the last command succeeded (false before the first).
    pub up: bool,
    /// The first failure since the last success.
    pub failing_since: Option<Instant>,
    /// The last failure: its kind and its whole cause.
    pub fault: Option<(FaultKind, String)>,
    /// Failures so far, by kind.
    pub errors: BTreeMap<FaultKind, u64>,
    /// Incremented each time Redis answers again after failures.
    pub recoveries: u64,
    /// Since when an outage ([`FaultKind::is_outage`]) lasts, once its start was logged.
    pub outage_since: Option<Instant>,
}

/// Whether `e` is Redis failing as a whole, which [`RedisHealth`] logs once per outage: the
/// caller logs it at debug level, any other error as it always did.
pub fn is_outage(e: &BrokerError) -> bool {
    FaultKind::of_broker(e).is_some_and(FaultKind::is_outage)
}

impl RedisState {
    /// Why no claim can succeed, once commands have failed for [`NOT_READY_AFTER`].
    pub fn not_ready(&self, now: Instant) -> Option<String> {
        let since = self.failing_since?;
        if now.saturating_duration_since(since) < NOT_READY_AFTER {
            return None;
        }
        let (kind, cause) = self.fault.as_ref()?;
        let what = match kind {
            FaultKind::Unreachable => "redis is unreachable",
            FaultKind::ReadOnly => "redis is read-only (a replica)",
            FaultKind::Auth => "redis refuses the credentials",
            FaultKind::Other => "redis refuses the commands",
        };
        Some(format!(
            "{what} for {}s: {cause}",
            now.saturating_duration_since(since).as_secs()
        ))
    }
}

/// The shared record of the link to Redis; cheap to clone.
#[derive(Debug, Clone)]
pub struct RedisHealth {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: watch::Sender<RedisState>,
    /// Whether the state is that of a link that answers and has nothing to clear (`up`, no
    /// failure, no outage), so that a success changes nothing: every command of every worker
    /// records its outcome, and a success then reads this instead of taking the state's lock.
    /// Written only with the state's lock held.
    clean: AtomicBool,
}

impl Default for RedisHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl RedisHealth {
    /// A link with no command run yet.
    pub fn new() -> RedisHealth {
        RedisHealth {
            shared: Arc::new(Shared {
                state: watch::channel(RedisState::default()).0,
                clean: AtomicBool::new(false),
            }),
        }
    }

    /// The current state.
    pub fn snapshot(&self) -> RedisState {
        self.shared.state.borrow().clone()
    }

    /// A command succeeded.
    pub fn record_ok(&self) {
        if self.shared.clean.load(Ordering::Acquire) {
            return;
        }
        let mut ended = None;
        self.shared.state.send_if_modified(|s| {
            self.shared.clean.store(true, Ordering::Release);
            let changed = !s.up || s.failing_since.is_some();
            if s.failing_since.is_some() {
                s.recoveries = s.recoveries.wrapping_add(1);
            }
            ended = s
                .outage_since
                .take()
                .map(|since| (since.elapsed(), s.errors.values().sum::<u64>()));
            s.up = true;
            s.failing_since = None;
            s.fault = None;
            changed
        });
        if let Some((lasted, _)) = ended {
            tracing::warn!(
                lasted = %crate::logging::human_duration(lasted),
                "redis answers again; the outage is over"
            );
        }
    }

    /// A command failed with `kind`, `cause` being its whole error chain. The first failure of
    /// an outage is logged (WARN); the others are only counted.
    pub fn record_fault(&self, kind: FaultKind, cause: String) {
        let mut started = None;
        self.shared.state.send_modify(|s| {
            self.shared.clean.store(false, Ordering::Release);
            s.up = false;
            s.failing_since.get_or_insert_with(Instant::now);
            *s.errors.entry(kind).or_default() += 1;
            if kind.is_outage() && s.outage_since.is_none() {
                s.outage_since = Some(Instant::now());
                started = Some(cause.clone());
            }
            s.fault = Some((kind, cause));
        });
        if let Some(cause) = started {
            let what = match kind {
                FaultKind::ReadOnly => "redis is read-only (a replica)",
                FaultKind::Auth => "redis refuses the credentials",
                _ => "redis is unreachable",
            };
            tracing::warn!(
                error = %cause,
                "{what}; every loop retries quietly, and the end of the outage is logged"
            );
        }
    }

    /// Records a broker error when it is Redis failing; returns its kind.
    pub fn record_err(&self, e: &BrokerError) -> Option<FaultKind> {
        let kind = FaultKind::of_broker(e)?;
        self.record_fault(kind, crate::logging::error_chain(e));
        Some(kind)
    }

    /// Resolves once Redis answers again after failures (at once if it answers now, having
    /// failed since `seen`, the [`RedisState::recoveries`] a waiter read before it slept).
    pub async fn answering_again(&self, seen: u64) {
        let mut rx = self.shared.state.subscribe();
        let _ = rx.wait_for(|s| s.recoveries != seen && s.up).await;
    }

    /// How many recoveries there were so far (see [`RedisHealth::answering_again`]).
    pub fn recoveries(&self) -> u64 {
        self.shared.state.borrow().recoveries
    }

    /// Whether the last command failed.
    pub fn failing(&self) -> bool {
        self.shared.state.borrow().failing_since.is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_make_it_not_ready_only_after_the_grace_and_a_success_ends_it() {
        let h = RedisHealth::new();
        h.record_ok();
        h.record_fault(
            FaultKind::ReadOnly,
            "READONLY You can't write against a read only replica.".into(),
        );
        let s = h.snapshot();
        let since = s.failing_since.expect("failing");
        assert_eq!(s.not_ready(since + Duration::from_secs(4)), None);
        let why = s.not_ready(since + NOT_READY_AFTER).expect("not ready");
        assert!(why.contains("read-only") && why.contains("READONLY"), "{why}");
        h.record_fault(FaultKind::Unreachable, "refused".into());
        assert_eq!(h.snapshot().failing_since, Some(since), "the first failure counts");
        assert_eq!(h.snapshot().errors[&FaultKind::ReadOnly], 1);
        assert!(h.snapshot().outage_since.is_some(), "an outage");
        let before = h.recoveries();
        h.record_ok();
        assert_eq!(h.recoveries(), before + 1);
        assert_eq!(h.snapshot().outage_since, None, "it ended");
        assert_eq!(h.snapshot().not_ready(Instant::now() + NOT_READY_AFTER), None);
        // Further successes change nothing; a failure after them is recorded as the first was.
        h.record_ok();
        assert_eq!(h.recoveries(), before + 1);
        assert!(h.snapshot().up);
        h.record_fault(FaultKind::Unreachable, "refused".into());
        assert!(!h.snapshot().up && h.failing());
        h.record_ok();
        assert_eq!(h.recoveries(), before + 2);
        assert!(h.snapshot().up && !h.failing());
    }

    #[test]
    fn a_command_error_is_no_outage() {
        let h = RedisHealth::new();
        h.record_fault(FaultKind::Other, "ERR Function not found".into());
        assert_eq!(h.snapshot().outage_since, None);
        assert!(!is_outage(&BrokerError::Redis {
            op: "FCALL",
            source: RedisError::from((ErrorKind::Server(ServerErrorKind::ResponseError), "Function not found")),
        }));
        assert!(is_outage(&BrokerError::Redis {
            op: "FCALL",
            source: RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        }));
    }

    #[test]
    fn kinds_of_client_errors() {
        let io = RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(FaultKind::of(&io), FaultKind::Unreachable);
    }
}

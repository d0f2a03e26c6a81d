//! The one way to wait out an unavailable Redis: [`RedisRetry`], the backoff between attempts
//! (100 ms doubling to 10 s, from its first step again as soon as Redis answers), and
//! [`retry`], which repeats one operation with it until it succeeds or the caller stops.
//!
//! An outage is told by [`RedisHealth`] once when it starts and once when it ends, so a failed
//! attempt during one is only a debug line; any other failure is a warning.

use std::future::Future;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::BrokerError;
use super::outage::{RedisHealth, is_outage};
use crate::backoff::Backoff;
use crate::logging::error_chain;

/// The delays between attempts against an unavailable Redis.
#[derive(Debug, Default)]
pub struct RedisRetry {
    attempt: u32,
}

impl RedisRetry {
    /// The policy: 100 ms doubling to 10 s.
    pub const POLICY: Backoff = Backoff::doubling(Duration::from_millis(100), Duration::from_secs(10));

    /// The next delay.
    pub fn next_delay(&mut self) -> Duration {
        let d = Self::POLICY.delay(self.attempt, 0.0);
        self.attempt = self.attempt.saturating_add(1);
        d
    }

    /// Starts again from the first delay (after an attempt succeeded).
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    /// Sleeps the next delay, or until Redis answers again after failing (the broker's probe
    /// sees that within a fraction of a second; the backoff then starts again from its first
    /// step); `false` when `stop` came first.
    pub async fn sleep(&mut self, health: &RedisHealth, stop: &CancellationToken) -> bool {
        let seen = health.recoveries();
        let d = self.next_delay();
        tokio::select! {
            () = stop.cancelled() => false,
            () = tokio::time::sleep(d) => true,
            () = health.answering_again(seen) => {
                self.reset();
                true
            }
        }
    }
}

/// Runs `op` until it succeeds, waiting [`RedisRetry`]'s delays between attempts; `None` when
/// `stop` comes first (an attempt under way gives way to it too). Each failure is logged as
/// "failed to {what}; retrying" and then handed to `failed`.
pub async fn retry<T, Fut>(
    health: &RedisHealth,
    stop: &CancellationToken,
    what: &str,
    mut op: impl FnMut() -> Fut,
    mut failed: impl FnMut(&BrokerError),
) -> Option<T>
where
    Fut: Future<Output = Result<T, BrokerError>>,
{
    let mut delays = RedisRetry::default();
    loop {
        let attempt = tokio::select! {
            () = stop.cancelled() => return None,
            r = op() => r,
        };
        match attempt {
            Ok(v) => return Some(v),
            Err(e) => {
                log_retry(&e, what);
                failed(&e);
                if !delays.sleep(health, stop).await {
                    return None;
                }
            }
        }
    }
}

/// Logs a failed attempt at `what` that is tried again: a debug line during an outage (which
/// [`RedisHealth`] tells once), a warning otherwise.
pub fn log_retry(e: &BrokerError, what: &str) {
    if is_outage(e) {
        tracing::debug!(error = %error_chain(e), "failed to {what}; retrying");
    } else {
        tracing::warn!(error = %error_chain(e), "failed to {what}; retrying");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_retry_doubles_to_a_cap() {
        let mut b = RedisRetry::default();
        let delays: Vec<Duration> = (0..10).map(|_| b.next_delay()).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[9], Duration::from_secs(10));
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(100));
    }

    fn refused() -> BrokerError {
        BrokerError::Redis {
            op: "PING",
            source: redis::RedisError::from(std::io::Error::from(std::io::ErrorKind::ConnectionRefused)),
        }
    }

    #[tokio::test]
    async fn retry_waits_the_policy_between_attempts_until_one_succeeds() {
        let health = RedisHealth::default();
        let start = std::time::Instant::now();
        let mut attempts = 0;
        let mut failures = 0;
        let got = retry(
            &health,
            &CancellationToken::new(),
            "ping",
            || {
                attempts += 1;
                let n = attempts;
                async move { if n < 4 { Err(refused()) } else { Ok(n) } }
            },
            |_| failures += 1,
        )
        .await;
        assert_eq!((got, failures), (Some(4), 3));
        let waited = start.elapsed();
        assert!(waited >= Duration::from_millis(100 + 200 + 400), "{waited:?}");
    }

    #[tokio::test]
    async fn retry_gives_way_to_a_stop() {
        let stop = CancellationToken::new();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(250)).await;
            stopper.cancel();
        });
        let got: Option<()> = retry(
            &RedisHealth::default(),
            &stop,
            "ping",
            || async { Err(refused()) },
            |_| {},
        )
        .await;
        assert_eq!(got, None);
    }
}

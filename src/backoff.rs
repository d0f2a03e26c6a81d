//! The one exponential backoff policy, as data plus a pure function: every retry delay of the
//! machine (service restarts, API retries, job retries, reconnecting to Redis) is a [`Backoff`].
//!
//! Nothing here reads a clock or a random source: callers pass the attempt number and a jitter
//! sample, so the rules are checked by proptest. The promises: without jitter the delay never
//! shrinks from one attempt to the next, it starts at `initial` (or `max`, if smaller), and no
//! delay is ever longer than `max`; jitter moves a delay by at most `jitter` times itself.

use std::time::Duration;

/// Exponential backoff: `initial` before the first retry, `factor` times more before each
/// further one, never more than `max`, varied by up to `jitter` (0 to 1) of itself.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Backoff {
    /// The delay before the first retry.
    #[serde(with = "humantime_serde")]
    pub initial: Duration,
    /// Growth per further retry (values below 1 count as 1).
    pub factor: f64,
    /// The longest delay.
    #[serde(with = "humantime_serde")]
    pub max: Duration,
    /// The largest fraction (0 to 1) by which a delay varies.
    pub jitter: f64,
}

impl Backoff {
    /// A delay that doubles from `initial` up to `max`, without jitter.
    pub const fn doubling(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            factor: 2.0,
            max,
            jitter: 0.0,
        }
    }

    /// The delay before retry number `attempt` (0 for the first). `jitter_sample` (-1 to 1,
    /// values outside are clamped) moves the delay by that part of `jitter`: a caller that wants
    /// delays only ever shortened passes a sample from -1 to 0, one that wants them spread both
    /// ways a sample from -1 to 1. The result is never longer than `max`.
    pub fn delay(&self, attempt: u32, jitter_sample: f64) -> Duration {
        let max = self.max.as_secs_f64();
        // A factor below 1 (or NaN) would make the delays shrink; the exponent is bounded so
        // that `powi` stays defined, and the cap absorbs an infinite growth.
        let grown = self.initial.as_secs_f64() * self.factor.max(1.0).powi(attempt.min(1024) as i32);
        let base = grown.min(max);
        let varied = base * (1.0 + self.jitter.clamp(0.0, 1.0) * jitter_sample.clamp(-1.0, 1.0));
        Duration::try_from_secs_f64(varied.clamp(0.0, max)).unwrap_or(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn doubling_delays_are_exact_and_capped() {
        let b = Backoff::doubling(Duration::from_millis(50), Duration::from_secs(30));
        let ds: Vec<u128> = (0..4).map(|n| b.delay(n, 0.0).as_millis()).collect();
        assert_eq!(ds, [50, 100, 200, 400]);
        assert_eq!(b.delay(40, 0.0), Duration::from_secs(30));
        assert_eq!(b.delay(u32::MAX, 1.0), Duration::from_secs(30));
    }

    #[test]
    fn jitter_moves_a_delay_by_its_fraction() {
        let b = Backoff {
            initial: Duration::from_secs(5),
            factor: 2.0,
            max: Duration::from_secs(300),
            jitter: 0.2,
        };
        assert_eq!(b.delay(0, -1.0), Duration::from_secs(4));
        assert_eq!(b.delay(0, 1.0), Duration::from_secs(6));
        assert_eq!(
            b.delay(30, 1.0),
            Duration::from_secs(300),
            "jitter never passes the cap"
        );
    }

    fn backoff() -> impl Strategy<Value = Backoff> {
        (0u64..60_000, 0.0f64..5.0, 0u64..600_000, 0.0f64..=1.0).prop_map(|(initial, factor, max, jitter)| Backoff {
            initial: Duration::from_millis(initial),
            factor,
            max: Duration::from_millis(max),
            jitter,
        })
    }

    proptest! {
        #[test]
        fn without_jitter_delays_never_shrink(b in backoff(), attempt in 0u32..2000) {
            prop_assert!(b.delay(attempt + 1, 0.0) >= b.delay(attempt, 0.0));
            prop_assert!(b.delay(attempt, 0.0) >= b.initial.min(b.max));
        }

        #[test]
        fn delays_are_capped(b in backoff(), attempt in any::<u32>(), sample in -10.0f64..10.0) {
            prop_assert!(b.delay(attempt, sample) <= b.max);
        }

        #[test]
        fn jitter_stays_within_its_fraction(b in backoff(), attempt in 0u32..200, sample in -1.0f64..=1.0) {
            let base = b.delay(attempt, 0.0).as_secs_f64();
            let d = b.delay(attempt, sample).as_secs_f64();
            prop_assert!(d >= base * (1.0 - b.jitter) - 1e-9);
            prop_assert!(d <= base * (1.0 + b.jitter) + 1e-9);
        }
    }
}

//! The restart policy as data plus pure functions: whether a service that exited is started
//! again, after which delay, and when it counts as crash-looping.
//!
//! Nothing here reads a clock or a random source; callers pass the current time (as the time
//! since the supervisor started) and a jitter sample, so every rule is checked by proptest.
//!
//! The rules: the delay is the shared [`Backoff`] policy, doubling from `backoff_initial` with
//! each consecutive restart up to `backoff_max`, varied by up to `jitter` either way but never
//! above the cap. A run that
//! lasted at least `stable_after` resets the doubling and the crash-loop state. Failures (a
//! non-zero exit, a signal, a failed liveness probe) are remembered for `crash_loop_window`;
//! `crash_loop_failures` of them within the window put the service in crash loop. A service in
//! crash loop is still restarted, at `backoff_max`, so it recovers on its own when its cause goes
//! away (a model finishes downloading, a port frees up).

use std::collections::VecDeque;
use std::time::Duration;

use crate::backoff::Backoff;
use crate::config::{RestartPolicy, SupervisorConfig};

/// The restart rules for one service.
#[derive(Debug, Clone, PartialEq)]
pub struct Policy {
    /// When to restart at all.
    pub restart: RestartPolicy,
    /// The restart delays: doubling, capped, jittered either way.
    pub backoff: Backoff,
    /// A run this long resets the backoff and the crash-loop state.
    pub stable_after: Duration,
    /// Failures within the window that mean crash loop.
    pub crash_loop_failures: u32,
    /// The window.
    pub crash_loop_window: Duration,
}

impl Policy {
    /// The policy of a service with restart policy `restart` under the supervisor's knobs.
    pub fn new(restart: RestartPolicy, cfg: &SupervisorConfig) -> Policy {
        Policy {
            restart,
            backoff: Backoff {
                jitter: cfg.backoff_jitter.clamp(0.0, 1.0),
                ..Backoff::doubling(cfg.backoff_initial, cfg.backoff_max)
            },
            stable_after: cfg.stable_after,
            crash_loop_failures: cfg.crash_loop_failures.max(1),
            crash_loop_window: cfg.crash_loop_window,
        }
    }
}

/// What the policy remembers of a service's past runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct History {
    /// Restarts since the last stable run; the exponent of the backoff.
    pub consecutive: u32,
    /// Times of the failures still inside the crash-loop window, oldest first.
    failures: VecDeque<Duration>,
    /// Whether the service is in crash loop.
    pub crash_loop: bool,
}

/// How a run ended, as far as the policy cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Exit code 0.
    Success,
    /// A non-zero exit, a signal, or a liveness failure.
    Failure,
}

/// What to do after a run ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    /// Start again after `delay`.
    Restart {
        /// The delay before the next start.
        delay: Duration,
    },
    /// Do not start again; `failed` says whether it ended in failure.
    Done {
        /// Whether the last run failed.
        failed: bool,
    },
}

impl History {
    /// The number of failures inside the window as of the last decision.
    pub fn recent_failures(&self) -> usize {
        self.failures.len()
    }

    /// Records that the current run has stayed up for `stable_after`: the next failure starts
    /// the backoff from the beginning and the crash-loop state is over.
    pub fn mark_stable(&mut self) {
        self.consecutive = 0;
        self.crash_loop = false;
    }
}

/// Decides what follows a run that ended at `now` after `uptime`. `jitter_sample` is uniform in
/// [-1, 1] (values outside are clamped).
pub fn on_exit(
    policy: &Policy,
    history: &mut History,
    ending: Ending,
    uptime: Duration,
    now: Duration,
    jitter_sample: f64,
) -> Decision {
    if uptime >= policy.stable_after {
        history.mark_stable();
    }
    if ending == Ending::Failure {
        history.failures.push_back(now);
    }
    while history
        .failures
        .front()
        .is_some_and(|t| now.saturating_sub(*t) > policy.crash_loop_window)
    {
        history.failures.pop_front();
    }
    if history.failures.len() >= policy.crash_loop_failures as usize {
        history.crash_loop = true;
    }
    let restart = match policy.restart {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => ending == Ending::Failure,
        RestartPolicy::Never => false,
    };
    if !restart {
        return Decision::Done {
            failed: ending == Ending::Failure,
        };
    }
    let delay = if history.crash_loop {
        policy.backoff.max
    } else {
        policy.backoff.delay(history.consecutive, jitter_sample)
    };
    history.consecutive = history.consecutive.saturating_add(1);
    Decision::Restart { delay }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(restart: RestartPolicy, jitter: f64) -> Policy {
        Policy {
            restart,
            backoff: Backoff {
                jitter,
                ..Backoff::doubling(Duration::from_millis(50), Duration::from_secs(30))
            },
            stable_after: Duration::from_secs(60),
            crash_loop_failures: 5,
            crash_loop_window: Duration::from_secs(120),
        }
    }

    fn delay(d: Decision) -> Duration {
        match d {
            Decision::Restart { delay } => delay,
            Decision::Done { .. } => panic!("expected a restart, got {d:?}"),
        }
    }

    #[test]
    fn delays_double_from_the_initial_delay() {
        let p = policy(RestartPolicy::Always, 0.0);
        let mut h = History::default();
        let ds: Vec<u64> = (0..4)
            .map(|i| {
                delay(on_exit(
                    &p,
                    &mut h,
                    Ending::Success,
                    Duration::ZERO,
                    Duration::from_secs(i),
                    0.0,
                ))
                .as_millis() as u64
            })
            .collect();
        assert_eq!(ds, [50, 100, 200, 400]);
    }

    #[test]
    fn restart_policies_decide_whether_to_restart() {
        let mut h = History::default();
        let never = policy(RestartPolicy::Never, 0.0);
        assert_eq!(
            on_exit(&never, &mut h, Ending::Failure, Duration::ZERO, Duration::ZERO, 0.0),
            Decision::Done { failed: true }
        );
        let on_failure = policy(RestartPolicy::OnFailure, 0.0);
        assert_eq!(
            on_exit(
                &on_failure,
                &mut h,
                Ending::Success,
                Duration::ZERO,
                Duration::ZERO,
                0.0
            ),
            Decision::Done { failed: false }
        );
        assert!(matches!(
            on_exit(
                &on_failure,
                &mut h,
                Ending::Failure,
                Duration::ZERO,
                Duration::ZERO,
                0.0
            ),
            Decision::Restart { .. }
        ));
    }

    proptest! {
        #[test]
        fn crash_loop_iff_enough_failures_in_window(gaps in proptest::collection::vec(0u64..200_000, 1..30)) {
            let p = policy(RestartPolicy::Always, 0.0);
            let mut h = History::default();
            let mut now = Duration::ZERO;
            let mut times = Vec::new();
            for g in gaps {
                now += Duration::from_millis(g);
                times.push(now);
                let was = h.crash_loop;
                on_exit(&p, &mut h, Ending::Failure, Duration::from_secs(1), now, 0.0);
                let in_window = times.iter().filter(|t| now - **t <= p.crash_loop_window).count();
                prop_assert_eq!(h.recent_failures(), in_window);
                // Crash loop starts exactly when the window holds enough failures, and only a
                // stable run ends it.
                prop_assert_eq!(h.crash_loop, was || in_window >= p.crash_loop_failures as usize);
            }
        }

        #[test]
        fn a_stable_run_resets_the_backoff(fails in 1u32..40, sample in -1.0f64..=1.0) {
            let p = policy(RestartPolicy::OnFailure, 0.5);
            let mut h = History::default();
            for i in 0..fails {
                on_exit(&p, &mut h, Ending::Failure, Duration::ZERO, Duration::from_secs(u64::from(i) * 1000), sample);
            }
            let now = Duration::from_secs(u64::from(fails) * 1000 + 60);
            let d = delay(on_exit(&p, &mut h, Ending::Failure, p.stable_after, now, sample));
            prop_assert!(!h.crash_loop);
            prop_assert_eq!(d, p.backoff.delay(0, sample));
            prop_assert_eq!(h.consecutive, 1);
        }

        #[test]
        fn crash_loop_restarts_at_the_cap(sample in -1.0f64..=1.0) {
            let p = policy(RestartPolicy::Always, 0.2);
            let mut h = History::default();
            let mut last = Duration::ZERO;
            for i in 0..p.crash_loop_failures {
                last = delay(on_exit(&p, &mut h, Ending::Failure, Duration::ZERO, Duration::from_millis(u64::from(i)), sample));
            }
            prop_assert!(h.crash_loop);
            prop_assert_eq!(last, p.backoff.max);
        }
    }
}

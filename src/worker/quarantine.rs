//! Quarantine: a worker whose last `after` jobs all failed for the machine's reasons
//! ([`super::hold::Blame::Machine`]) stops claiming for a cool-down, reported with the
//! failures, then tries again.
//!
//! The policy is data plus pure functions over job ends. A failure that is the job's fault or
//! someone else's neither counts nor breaks the run (it says nothing about the worker); a
//! completed job ends it and forgets earlier quarantines. After a cool-down the worker is on
//! probation: the next machine failure quarantines it again at once, for the next cool-down of
//! the project's one [`Backoff`] policy (doubling, up to 16 times the first). An operator may
//! lift a quarantine early (`machine quarantine clear`), which forgets it as a completed job
//! does.

use std::time::{Duration, Instant};

use super::hold::Blame;
use crate::backoff::Backoff;

/// How many failures quarantine a worker, and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuarantinePolicy {
    /// Machine failures in a row that quarantine; 0 never does.
    pub after: u32,
    /// The first cool-down.
    pub cooldown: Duration,
}

/// One worker's quarantine state.
#[derive(Debug, Clone)]
pub struct Quarantine {
    policy: QuarantinePolicy,
    /// The machine failures of the current run, oldest first: the job and the error. One job
    /// failing again on this worker counts once: quarantine is about the machine, and one bad
    /// job says less about it than several.
    failures: Vec<(String, String)>,
    /// Quarantines since the last completed job.
    repeats: u32,
    /// Until when the worker is quarantined, when it is.
    until: Option<Instant>,
}

impl Quarantine {
    /// No failure yet.
    pub fn new(policy: QuarantinePolicy) -> Quarantine {
        Quarantine {
            policy,
            failures: Vec::new(),
            repeats: 0,
            until: None,
        }
    }

    /// A job completed: the run and earlier quarantines are forgotten.
    pub fn completed(&mut self) {
        self.failures.clear();
        self.repeats = 0;
    }

    /// The job `job` failed with `error`, blamed on `blame`. Returns the quarantine it starts,
    /// if any: how long it lasts and the reason to show.
    pub fn failed(&mut self, blame: Blame, job: &str, error: &str, now: Instant) -> Option<(Duration, String)> {
        if blame != Blame::Machine || self.policy.after == 0 {
            return None;
        }
        match self.failures.iter_mut().find(|(j, _)| j == job) {
            Some(seen) => seen.1 = error.to_owned(),
            None => self.failures.push((job.to_owned(), error.to_owned())),
        }
        // On probation after a quarantine, one more machine failure is enough.
        let needed = if self.repeats > 0 {
            1
        } else {
            self.policy.after as usize
        };
        if self.failures.len() < needed {
            return None;
        }
        let backoff = Backoff::doubling(self.policy.cooldown, self.policy.cooldown.saturating_mul(16));
        let cooldown = backoff.delay(self.repeats, 0.0);
        self.repeats = self.repeats.saturating_add(1);
        self.until = Some(now + cooldown);
        let count = self.failures.len();
        let last = self.failures.last().map(|(_, e)| e.clone()).unwrap_or_default();
        let reason = format!(
            "quarantined for {} (until {}) after {count} failure{} not the job's fault; last: {last}",
            humantime::format_duration(cooldown),
            humantime::format_rfc3339_seconds(std::time::SystemTime::now() + cooldown),
            if count == 1 { "" } else { "s" },
        );
        self.failures.clear();
        Some((cooldown, reason))
    }

    /// The operator lifted the quarantine (`machine quarantine clear`): it ends now, and the
    /// failures and earlier quarantines are forgotten, as after a completed job.
    pub fn lift(&mut self) {
        self.failures.clear();
        self.repeats = 0;
        self.until = None;
    }

    /// Until when the worker is quarantined, when it still is at `now`.
    pub fn until(&self, now: Instant) -> Option<Instant> {
        self.until.filter(|u| *u > now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A new job id for each failure.
    fn job() -> String {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        format!("job-{}", NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed))
    }

    #[test]
    fn one_job_failing_again_counts_once() {
        let mut q = Quarantine::new(policy());
        let now = Instant::now();
        for _ in 0..5 {
            assert_eq!(q.failed(Blame::Machine, "same", "down", now), None);
        }
        assert_eq!(q.failed(Blame::Job, "a", "its own", now), None);
        assert_eq!(q.failed(Blame::Machine, "b", "down", now), None);
        assert!(
            q.failed(Blame::Machine, "c", "down", now).is_some(),
            "three distinct jobs"
        );
    }

    fn policy() -> QuarantinePolicy {
        QuarantinePolicy {
            after: 3,
            cooldown: Duration::from_secs(180),
        }
    }

    #[test]
    fn three_machine_failures_quarantine_and_the_job_s_own_do_not_count() {
        let now = Instant::now();
        let mut q = Quarantine::new(policy());
        assert_eq!(q.failed(Blame::Machine, &job(), "down", now), None);
        assert_eq!(q.failed(Blame::Job, &job(), "invalid workflow", now), None);
        assert_eq!(q.failed(Blame::Elsewhere, &job(), "s3", now), None);
        assert_eq!(q.failed(Blame::Machine, &job(), "down", now), None);
        let (d, reason) = q
            .failed(Blame::Machine, &job(), "refused", now)
            .expect("third machine failure");
        assert_eq!(d, Duration::from_secs(180));
        assert!(
            reason.contains("after 3 failures") && reason.contains("refused"),
            "{reason}"
        );
        assert_eq!(q.until(now), Some(now + d));
        assert_eq!(q.until(now + d), None, "over after the cool-down");
        // On probation: one more failure doubles the cool-down.
        let (d2, _) = q.failed(Blame::Machine, &job(), "down", now).expect("probation");
        assert_eq!(d2, Duration::from_secs(360));
        q.completed();
        assert_eq!(q.failed(Blame::Machine, &job(), "down", now), None, "a success forgets");
    }

    #[test]
    fn a_success_breaks_the_run() {
        let now = Instant::now();
        let mut q = Quarantine::new(policy());
        q.failed(Blame::Machine, &job(), "a", now);
        q.failed(Blame::Machine, &job(), "b", now);
        q.completed();
        assert_eq!(q.failed(Blame::Machine, &job(), "c", now), None);
    }

    #[test]
    fn a_lifted_quarantine_is_over_and_forgotten() {
        let now = Instant::now();
        let mut q = Quarantine::new(policy());
        for _ in 0..3 {
            q.failed(Blame::Machine, &job(), "down", now);
        }
        assert!(q.until(now).is_some());
        q.lift();
        assert_eq!(q.until(now), None);
        assert_eq!(
            q.failed(Blame::Machine, &job(), "down", now),
            None,
            "no probation after a lift"
        );
    }

    #[test]
    fn zero_never_quarantines() {
        let mut q = Quarantine::new(QuarantinePolicy { after: 0, ..policy() });
        for _ in 0..10 {
            assert_eq!(q.failed(Blame::Machine, &job(), "x", Instant::now()), None);
        }
    }

    proptest! {
        #[test]
        fn cool_downs_never_exceed_sixteen_times_the_first(n in 1u32..40) {
            let now = Instant::now();
            let mut q = Quarantine::new(policy());
            let mut last = Duration::ZERO;
            for _ in 0..n * 3 {
                if let Some((d, _)) = q.failed(Blame::Machine, &job(), "x", now) {
                    prop_assert!(d >= last);
                    prop_assert!(d <= Duration::from_secs(180 * 16));
                    last = d;
                }
            }
        }
    }
}

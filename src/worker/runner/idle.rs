//! How long a worker's service sits idle between jobs for the machine's own reasons: from one
//! job's run ending to the next one's starting, less the time its claims wait on the broker
//! (an empty queue is the fleet's business, not this machine's). With the upload stage on,
//! only writing the outcome, claiming and starting the next job remain; with it off, storing
//! the outputs is added; waiting for room in the upload stage is added either way.

use std::time::{Duration, Instant};

/// The clock of one worker's idle time between jobs.
#[derive(Debug, Default)]
pub(super) struct IdleClock {
    /// When the last run ended, until the next claim begins.
    ended: Option<Instant>,
    /// When the last claim got a job, until that job runs.
    claimed: Option<Instant>,
    /// Idle time counted so far towards the next run.
    counted: Duration,
}

impl IdleClock {
    /// A job's run ended at `at`.
    pub(super) fn run_ended(&mut self, at: Instant) {
        self.ended = Some(at);
    }

    /// A claim begins at `at`: the time since the last run ended (or since a job was claimed
    /// that never ran) counts; the claim's own wait does not.
    pub(super) fn claiming(&mut self, at: Instant) {
        for since in [self.ended.take(), self.claimed.take()].into_iter().flatten() {
            self.counted += at.saturating_duration_since(since);
        }
    }

    /// A claim got a job at `at`.
    pub(super) fn claimed(&mut self, at: Instant) {
        self.claimed = Some(at);
    }

    /// A job's run starts at `at`: the idle time before it, counted since the previous run.
    pub(super) fn run_started(&mut self, at: Instant) -> Duration {
        if let Some(since) = self.claimed.take() {
            self.counted += at.saturating_duration_since(since);
        }
        self.ended = None;
        std::mem::take(&mut self.counted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claims_wait_is_not_idle_time() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut c = IdleClock::default();
        // The first job: nothing ran before it.
        c.claiming(ms(0));
        c.claimed(ms(1000));
        assert_eq!(c.run_started(ms(1003)), Duration::from_millis(3));
        // Its run ends at 3000; storing its outputs takes 500 ms, then the claim waits 2 s for
        // work, and the job starts 4 ms after it is claimed.
        c.run_ended(ms(3000));
        c.claiming(ms(3500));
        c.claimed(ms(5500));
        assert_eq!(c.run_started(ms(5504)), Duration::from_millis(504));
    }

    #[test]
    fn claims_that_found_nothing_and_jobs_that_never_ran_count_once() {
        let t0 = Instant::now();
        let ms = |n| t0 + Duration::from_millis(n);
        let mut c = IdleClock::default();
        c.run_ended(ms(0));
        // A claim stopped without a job (a rescan), then another.
        c.claiming(ms(10));
        c.claiming(ms(500));
        // A job claimed and failed before running (a bad ctx), then the next one runs.
        c.claimed(ms(600));
        c.claiming(ms(620));
        c.claimed(ms(700));
        assert_eq!(c.run_started(ms(701)), Duration::from_millis(10 + 20 + 1));
        assert_eq!(c.run_started(ms(800)), Duration::ZERO);
    }
}

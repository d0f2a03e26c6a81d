//! What the status page shows of the recent past, kept in memory and bounded: the last jobs
//! this machine finished ([`RecentJobs`], fed from the workers' job reports) and the last
//! minutes of GPU readings ([`GpuHistory`], sampled by the event publisher) so that a page
//! opened now draws its charts with history instead of starting empty.
//!
//! Neither keeps anything of a job's payload or result: only ids, timing and the outcome.

use std::collections::VecDeque;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::status::{Gpu, JobEnd, RecentJob};
use crate::worker::{Fate, JobReport};

/// How many finished jobs the status document lists.
pub const RECENT_JOBS: usize = 50;

/// How far back the GPU history reaches.
pub const GPU_HISTORY: Duration = Duration::from_secs(5 * 60);

/// The most samples kept per GPU, whatever the sampling rate (one a second fills it).
const MAX_SAMPLES: usize = 300;

/// The last [`RECENT_JOBS`] finished jobs, oldest first.
#[derive(Debug, Default)]
pub struct RecentJobs(VecDeque<RecentJob>);

impl RecentJobs {
    /// Records a finished job; `finished_at_ms` is when its report arrived.
    pub fn record(&mut self, report: &JobReport, finished_at_ms: u64) {
        let (outcome, error, requeued) = match &report.outcome {
            Fate::Completed => (JobEnd::Completed, None, false),
            Fate::Failed { error, requeued, .. } => (JobEnd::Failed, Some(error.clone()), *requeued),
            Fate::Returned => (JobEnd::Returned, None, false),
            Fate::Cancelled => (JobEnd::Cancelled, None, false),
            Fate::Lost => (JobEnd::Lost, None, false),
        };
        let duration_ms = u64::try_from(report.total.as_millis()).unwrap_or(u64::MAX);
        if self.0.len() == RECENT_JOBS {
            self.0.pop_front();
        }
        self.0.push_back(RecentJob {
            job_id: report.job_id.clone(),
            worker_id: report.worker_id.clone(),
            service: report.service.clone(),
            outcome,
            started_at_ms: finished_at_ms.saturating_sub(duration_ms),
            finished_at_ms,
            duration_ms,
            error,
            requeued,
        });
    }

    /// The jobs, oldest first.
    pub fn list(&self) -> Vec<RecentJob> {
        self.0.iter().cloned().collect()
    }
}

/// One GPU reading as the charts draw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSample {
    /// When it was read, epoch milliseconds.
    pub at_ms: u64,
    /// Utilisation in percent.
    pub utilization_percent: Option<u32>,
    /// Memory used, in bytes.
    pub memory_used_bytes: Option<u64>,
    /// Core temperature in °C.
    pub temperature_c: Option<u32>,
}

/// One GPU's samples, oldest first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GpuSeries {
    /// NVML index.
    pub index: u32,
    /// The samples of the last [`GPU_HISTORY`].
    pub samples: Vec<GpuSample>,
}

/// The `history` event of `/events`: the GPU readings of the last minutes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryDocument {
    /// How far back the samples reach, in milliseconds.
    pub window_ms: u64,
    /// Each GPU's samples, by index.
    pub gpus: Vec<GpuSeries>,
}

/// The GPU readings of the last [`GPU_HISTORY`], per GPU.
#[derive(Debug, Default)]
pub struct GpuHistory(Vec<(u32, VecDeque<GpuSample>)>);

impl GpuHistory {
    /// Records the live readings of `gpus` at `at_ms`; GPUs without any reading (no NVML)
    /// record nothing, and samples older than the window are dropped.
    pub fn record(&mut self, gpus: &[Gpu], at_ms: u64) {
        for g in gpus {
            if g.utilization_percent.is_none() && g.memory_used_bytes.is_none() && g.temperature_c.is_none() {
                continue;
            }
            let series = match self.0.iter().position(|(i, _)| *i == g.index) {
                Some(p) => &mut self.0[p].1,
                None => {
                    self.0.push((g.index, VecDeque::new()));
                    &mut self.0.last_mut().expect("just pushed").1
                }
            };
            series.push_back(GpuSample {
                at_ms,
                utilization_percent: g.utilization_percent,
                memory_used_bytes: g.memory_used_bytes,
                temperature_c: g.temperature_c,
            });
            let oldest = at_ms.saturating_sub(GPU_HISTORY.as_millis() as u64);
            while series.len() > MAX_SAMPLES || series.front().is_some_and(|s| s.at_ms < oldest) {
                series.pop_front();
            }
        }
    }

    /// The history as the `history` event sends it.
    pub fn document(&self) -> HistoryDocument {
        HistoryDocument {
            window_ms: GPU_HISTORY.as_millis() as u64,
            gpus: self
                .0
                .iter()
                .map(|(index, samples)| GpuSeries {
                    index: *index,
                    samples: samples.iter().copied().collect(),
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(id: &str, outcome: Fate, total_ms: u64) -> JobReport {
        JobReport {
            worker_id: "w1".into(),
            job_id: id.into(),
            service: "simulation".into(),
            outcome,
            run: Duration::from_millis(total_ms / 2),
            total: Duration::from_millis(total_ms),
            billing: None,
            possible_orphan: None,
            idle_before: Duration::ZERO,
        }
    }

    #[test]
    fn recent_jobs_keep_the_last_fifty_with_their_timing() {
        let mut jobs = RecentJobs::default();
        for i in 0..60u64 {
            jobs.record(&report(&format!("j{i}"), Fate::Completed, 1500), 10_000 + i);
        }
        jobs.record(
            &report(
                "bad",
                Fate::Failed {
                    retryable: false,
                    requeued: false,
                    error: "boom".into(),
                    blame: crate::worker::hold::Blame::Job,
                },
                250,
            ),
            20_000,
        );
        let list = jobs.list();
        assert_eq!(list.len(), RECENT_JOBS);
        assert_eq!(list[0].job_id, "j11", "the oldest were dropped");
        let last = list.last().unwrap();
        assert_eq!(last.outcome, JobEnd::Failed);
        assert_eq!(last.error.as_deref(), Some("boom"));
        assert_eq!(
            (last.started_at_ms, last.finished_at_ms, last.duration_ms),
            (19_750, 20_000, 250)
        );
        assert!(!last.requeued, "a final failure");
        let v = serde_json::to_value(last).unwrap();
        assert_eq!(v["outcome"], "failed");
        assert_eq!(v["worker_id"], "w1");
        assert_eq!(
            serde_json::to_value(&list[0]).unwrap()["error"],
            serde_json::Value::Null
        );
    }

    #[test]
    fn a_requeued_failure_is_marked_so() {
        let mut jobs = RecentJobs::default();
        let failed = |requeued| Fate::Failed {
            retryable: true,
            requeued,
            error: "busy".into(),
            blame: crate::worker::hold::Blame::Job,
        };
        jobs.record(&report("j1", failed(true), 10), 1_000);
        jobs.record(&report("j1", failed(false), 10), 2_000);
        let list = jobs.list();
        assert!(list[0].requeued, "the first attempt went back to the queue");
        assert!(!list[1].requeued, "the last one failed the job");
        assert_eq!(serde_json::to_value(&list[0]).unwrap()["requeued"], true);
    }

    fn gpu(index: u32, util: Option<u32>) -> Gpu {
        Gpu {
            index,
            name: "g".into(),
            uuid: None,
            memory_total_bytes: 100,
            memory_used_bytes: util.map(u64::from),
            utilization_percent: util,
            temperature_c: util,
            health: crate::gpu::Condition::Ok,
            reason: None,
            last_xid: None,
            throttle: None,
            throttled_ms: 0,
        }
    }

    #[test]
    fn gpu_history_keeps_the_window_per_gpu() {
        let mut h = GpuHistory::default();
        let window = GPU_HISTORY.as_millis() as u64;
        h.record(&[gpu(0, Some(1)), gpu(1, None)], 1_000);
        h.record(&[gpu(0, Some(2)), gpu(1, Some(7))], 2_000);
        let doc = h.document();
        assert_eq!(doc.window_ms, window);
        assert_eq!(doc.gpus.len(), 2);
        assert_eq!(doc.gpus[0].index, 0);
        assert_eq!(doc.gpus[0].samples.len(), 2);
        assert_eq!(doc.gpus[1].samples.len(), 1, "a GPU without readings records nothing");
        assert_eq!(doc.gpus[1].samples[0].utilization_percent, Some(7));

        // A sample past the window pushes the old ones out.
        h.record(&[gpu(0, Some(3))], 2_000 + window);
        let doc = h.document();
        assert_eq!(
            doc.gpus[0].samples.iter().map(|s| s.at_ms).collect::<Vec<_>>(),
            vec![2_000, 2_000 + window]
        );

        // However often it is sampled, it stays bounded.
        for t in 0..1000 {
            h.record(&[gpu(0, Some(4))], 3_000 + window + t);
        }
        assert_eq!(h.document().gpus[0].samples.len(), MAX_SAMPLES);
    }
}

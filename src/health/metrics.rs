//! Prometheus metrics (`GET /metrics`), through `prometheus-client`.
//!
//! Job counters and histograms are recorded by the workers as things happen; service restarts
//! and GPU readings are set from live state at scrape time, so they are never stale.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A job event, labelled by service and outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// The job's `service_required`.
    pub service: String,
    /// `claimed`, `completed`, `failed`, `returned` or `cancelled`.
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabel {
    gpu: String,
}

/// The machine's metrics. Cloning shares them.
#[derive(Debug, Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    registry: Registry,
    jobs: Family<JobLabels, Counter>,
    claim_seconds: Histogram,
    job_seconds: Family<ServiceLabel, Histogram>,
    match_misses: Counter,
    service_restarts: Family<ServiceLabel, Gauge>,
    gpu_utilization: Family<GpuLabel, Gauge>,
    gpu_memory_used: Family<GpuLabel, Gauge>,
    gpu_temperature: Family<GpuLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric family registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("machine");
        let jobs = Family::<JobLabels, Counter>::default();
        registry.register("jobs", "Jobs by service and outcome", jobs.clone());
        // 1 ms .. ~16 s: a claim that waits for work is bounded by the safety poll.
        let claim_seconds = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        registry.register(
            "claim_duration_seconds",
            "Time from asking the broker for a job to getting one",
            claim_seconds.clone(),
        );
        // 10 ms .. ~2.9 h.
        let job_seconds = Family::<ServiceLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.01, 2.0, 21))
        });
        registry.register("job_duration_seconds", "Job run time by service", job_seconds.clone());
        let match_misses = Counter::default();
        registry.register(
            "match_misses",
            "Claims that found no runnable job",
            match_misses.clone(),
        );
        let service_restarts = Family::<ServiceLabel, Gauge>::default();
        registry.register(
            "service_restarts",
            "Restarts of each supervised service since the machine started",
            service_restarts.clone(),
        );
        let gpu_utilization = Family::<GpuLabel, Gauge>::default();
        registry.register("gpu_utilization_percent", "GPU utilisation", gpu_utilization.clone());
        let gpu_memory_used = Family::<GpuLabel, Gauge>::default();
        registry.register("gpu_memory_used_bytes", "GPU memory used", gpu_memory_used.clone());
        let gpu_temperature = Family::<GpuLabel, Gauge>::default();
        registry.register(
            "gpu_temperature_celsius",
            "GPU core temperature",
            gpu_temperature.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                registry,
                jobs,
                claim_seconds,
                job_seconds,
                match_misses,
                service_restarts,
                gpu_utilization,
                gpu_memory_used,
                gpu_temperature,
            }),
        }
    }

    /// Counts a job event.
    pub fn job(&self, service: &str, outcome: &str) {
        self.inner
            .jobs
            .get_or_create(&JobLabels {
                service: service.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Records how long a successful claim took.
    pub fn claim_duration(&self, seconds: f64) {
        self.inner.claim_seconds.observe(seconds);
    }

    /// Counts a claim that found nothing.
    pub fn match_miss(&self) {
        self.inner.match_misses.inc();
    }

    /// Records a job's run time.
    pub fn job_duration(&self, service: &str, seconds: f64) {
        self.inner
            .job_seconds
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .observe(seconds);
    }

    /// Sets a service's restart count (at scrape time).
    pub fn set_service_restarts(&self, service: &str, restarts: u64) {
        self.inner
            .service_restarts
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .set(restarts as i64);
    }

    /// Sets a GPU's live readings (at scrape time).
    pub fn set_gpu(&self, gpu: &crate::gpu::GpuLive) {
        let label = GpuLabel {
            gpu: gpu.index.to_string(),
        };
        if let Some(u) = gpu.utilization_percent {
            self.inner.gpu_utilization.get_or_create(&label).set(i64::from(u));
        }
        if let Some(m) = gpu.memory_used_bytes {
            self.inner.gpu_memory_used.get_or_create(&label).set(m as i64);
        }
        if let Some(t) = gpu.temperature_c {
            self.inner.gpu_temperature.get_or_create(&label).set(i64::from(t));
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_recorded_values() {
        let m = Metrics::new();
        m.job("comfyui", "completed");
        m.job("comfyui", "completed");
        m.match_miss();
        m.claim_duration(0.002);
        m.job_duration("comfyui", 1.5);
        m.set_service_restarts("comfyui-gpu0", 3);
        m.set_gpu(&crate::gpu::GpuLive {
            index: 1,
            utilization_percent: Some(87),
            memory_used_bytes: Some(1024),
            memory_total_bytes: Some(4096),
            temperature_c: Some(61),
        });
        let text = m.encode();
        assert!(
            text.contains("machine_jobs_total{service=\"comfyui\",outcome=\"completed\"} 2"),
            "{text}"
        );
        assert!(text.contains("machine_match_misses_total 1"), "{text}");
        assert!(text.contains("machine_claim_duration_seconds_count 1"), "{text}");
        assert!(
            text.contains("machine_job_duration_seconds_sum{service=\"comfyui\"} 1.5"),
            "{text}"
        );
        assert!(
            text.contains("machine_service_restarts{service=\"comfyui-gpu0\"} 3"),
            "{text}"
        );
        assert!(text.contains("machine_gpu_utilization_percent{gpu=\"1\"} 87"), "{text}");
        assert!(text.contains("machine_gpu_temperature_celsius{gpu=\"1\"} 61"), "{text}");
    }
}

//! Prometheus metrics (`GET /metrics`), through `prometheus-client`.
//!
//! Job counters and histograms are recorded by the workers as things happen; service restarts
//! and GPU readings are set from live state at scrape time, so they are never stale. External
//! jobs add their usage and cost (per connector and customer) as they complete, and the
//! fleet-wide limiters' daily usage is set by a feed that reads it from Redis. The models
//! store's downloads and evictions are counted by the store and copied in at scrape time.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

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
struct WorkerLabel {
    worker: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GpuLabel {
    gpu: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UsageLabels {
    connector: String,
    customer: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CostLabels {
    connector: String,
    customer: String,
    currency: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    connector: String,
    customer: String,
    direction: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ApiLabel {
    api: String,
}

type FloatCounter = Counter<f64, AtomicU64>;
type FloatGauge = Gauge<f64, AtomicU64>;

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
    gpu_faulted: Family<GpuLabel, Gauge>,
    gpu_throttled: Family<GpuLabel, Gauge>,
    worker_quarantined: Family<WorkerLabel, Gauge>,
    worker_held: Family<WorkerLabel, Gauge>,
    external_requests: Family<UsageLabels, Counter>,
    external_tokens: Family<TokenLabels, Counter>,
    external_predict_seconds: Family<UsageLabels, FloatCounter>,
    external_cost: Family<CostLabels, FloatCounter>,
    limit_requests_today: Family<ApiLabel, Gauge>,
    limit_tokens_today: Family<ApiLabel, Gauge>,
    limit_waits: Family<ApiLabel, Gauge>,
    limit_wait_seconds: Family<ApiLabel, FloatGauge>,
    limit_quota_refusals: Family<ApiLabel, Gauge>,
    model_downloads: Counter,
    model_download_bytes: Counter,
    model_evictions: Counter,
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
        let external_requests = Family::<UsageLabels, Counter>::default();
        registry.register(
            "external_requests",
            "Requests completed external jobs made to their API, by connector and customer",
            external_requests.clone(),
        );
        let external_tokens = Family::<TokenLabels, Counter>::default();
        registry.register(
            "external_tokens",
            "Tokens used by completed external jobs, by connector, customer and direction (input/output)",
            external_tokens.clone(),
        );
        let external_predict_seconds = Family::<UsageLabels, FloatCounter>::default();
        registry.register(
            "external_predict_seconds",
            "Predict / execution time external APIs reported for completed jobs",
            external_predict_seconds.clone(),
        );
        let external_cost = Family::<CostLabels, FloatCounter>::default();
        registry.register(
            "external_cost",
            "Cost of completed external jobs from the configured price tables",
            external_cost.clone(),
        );
        let limit_requests_today = Family::<ApiLabel, Gauge>::default();
        registry.register(
            "limit_requests_today",
            "Requests admitted today by the fleet-wide limiter, fleet-wide",
            limit_requests_today.clone(),
        );
        let limit_tokens_today = Family::<ApiLabel, Gauge>::default();
        registry.register(
            "limit_tokens_today",
            "Tokens recorded today against the fleet-wide quota, fleet-wide",
            limit_tokens_today.clone(),
        );
        let limit_waits = Family::<ApiLabel, Gauge>::default();
        registry.register(
            "limit_waits",
            "Times this machine's requests waited for a fleet-wide rate limit",
            limit_waits.clone(),
        );
        let limit_wait_seconds = Family::<ApiLabel, FloatGauge>::default();
        registry.register(
            "limit_wait_seconds",
            "Time this machine's requests spent waiting for a fleet-wide rate limit",
            limit_wait_seconds.clone(),
        );
        let limit_quota_refusals = Family::<ApiLabel, Gauge>::default();
        registry.register(
            "limit_quota_refusals",
            "Jobs this machine returned to the queue because a daily quota was used up",
            limit_quota_refusals.clone(),
        );
        let gpu_faulted = Family::<GpuLabel, Gauge>::default();
        registry.register(
            "gpu_faulted",
            "1 while the GPU has a fatal fault (critical XID, double-bit ECC, lost); its worker does not claim",
            gpu_faulted.clone(),
        );
        let gpu_throttled = Family::<GpuLabel, Gauge>::default();
        registry.register(
            "gpu_throttled",
            "1 while the GPU's clocks are thermally or power throttled",
            gpu_throttled.clone(),
        );
        let worker_quarantined = Family::<WorkerLabel, Gauge>::default();
        registry.register(
            "worker_quarantined",
            "1 while the worker is quarantined after failures that were not its jobs' fault",
            worker_quarantined.clone(),
        );
        let worker_held = Family::<WorkerLabel, Gauge>::default();
        registry.register(
            "worker_held",
            "1 while a hold (GPU fault, quarantine, planned restart, warm-up) keeps the worker from claiming",
            worker_held.clone(),
        );
        let model_downloads = Counter::default();
        registry.register(
            "model_downloads",
            "Models fetched on demand (downloads started)",
            model_downloads.clone(),
        );
        let model_download_bytes = Counter::default();
        registry.register(
            "model_download_bytes",
            "Bytes of models fetched on demand",
            model_download_bytes.clone(),
        );
        let model_evictions = Counter::default();
        registry.register(
            "model_evictions",
            "Models evicted from the shared models directory to stay within models.cache_max_gb",
            model_evictions.clone(),
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
                gpu_faulted,
                gpu_throttled,
                worker_quarantined,
                worker_held,
                external_requests,
                external_tokens,
                external_predict_seconds,
                external_cost,
                limit_requests_today,
                limit_tokens_today,
                limit_waits,
                limit_wait_seconds,
                limit_quota_refusals,
                model_downloads,
                model_download_bytes,
                model_evictions,
            }),
        }
    }

    /// Counts what a completed external job used and cost.
    pub fn billing(&self, b: &crate::connectors::Billing) {
        let usage = UsageLabels {
            connector: b.connector.clone(),
            customer: b.customer.clone(),
        };
        let i = &self.inner;
        i.external_requests.get_or_create(&usage).inc_by(b.requests);
        for (direction, n) in [("input", b.input_tokens), ("output", b.output_tokens)] {
            i.external_tokens
                .get_or_create(&TokenLabels {
                    connector: b.connector.clone(),
                    customer: b.customer.clone(),
                    direction: direction.to_owned(),
                })
                .inc_by(n);
        }
        if b.predict_seconds.is_finite() && b.predict_seconds > 0.0 {
            i.external_predict_seconds
                .get_or_create(&usage)
                .inc_by(b.predict_seconds);
        }
        if b.cost.is_finite() && b.cost > 0.0 {
            i.external_cost
                .get_or_create(&CostLabels {
                    connector: b.connector.clone(),
                    customer: b.customer.clone(),
                    currency: b.currency.clone(),
                })
                .inc_by(b.cost);
        }
    }

    /// Sets a limiter's figures: today's fleet-wide usage (when Redis answered) and this
    /// machine's waits and refusals.
    pub fn set_limiter(
        &self,
        api: &str,
        usage: Option<&crate::connectors::limits::DailyUsage>,
        stats: crate::connectors::limits::LimiterStats,
    ) {
        let label = ApiLabel { api: api.to_owned() };
        let i = &self.inner;
        if let Some(u) = usage {
            i.limit_requests_today
                .get_or_create(&label)
                .set(i64::try_from(u.requests).unwrap_or(i64::MAX));
            i.limit_tokens_today
                .get_or_create(&label)
                .set(i64::try_from(u.tokens).unwrap_or(i64::MAX));
        }
        i.limit_waits
            .get_or_create(&label)
            .set(i64::try_from(stats.waits).unwrap_or(i64::MAX));
        i.limit_wait_seconds
            .get_or_create(&label)
            .set(stats.waited_ms as f64 / 1000.0);
        i.limit_quota_refusals
            .get_or_create(&label)
            .set(i64::try_from(stats.quota_refusals).unwrap_or(i64::MAX));
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

    /// Sets a GPU's health (at scrape time).
    pub fn set_gpu_health(&self, gpu: &crate::gpu::GpuHealth) {
        let label = GpuLabel {
            gpu: gpu.index.to_string(),
        };
        let i = &self.inner;
        i.gpu_faulted
            .get_or_create(&label)
            .set(i64::from(gpu.health == crate::gpu::Condition::Faulted));
        i.gpu_throttled
            .get_or_create(&label)
            .set(i64::from(gpu.throttle.is_some()));
    }

    /// Sets whether a worker is held, and whether by a quarantine (at scrape time).
    pub fn set_worker_hold(&self, worker: &str, held: bool, quarantined: bool) {
        let label = WorkerLabel {
            worker: worker.to_owned(),
        };
        self.inner.worker_held.get_or_create(&label).set(i64::from(held));
        self.inner
            .worker_quarantined
            .get_or_create(&label)
            .set(i64::from(quarantined));
    }

    /// Sets the models store's counts (at scrape time); they only grow, and so do the counters.
    pub fn set_models(&self, downloads: u64, bytes: u64, evictions: u64) {
        let i = &self.inner;
        for (counter, value) in [
            (&i.model_downloads, downloads),
            (&i.model_download_bytes, bytes),
            (&i.model_evictions, evictions),
        ] {
            let seen = counter.get();
            if value > seen {
                counter.inc_by(value - seen);
            }
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

    #[test]
    fn exposes_the_models_stores_counts() {
        let m = Metrics::new();
        m.set_models(2, 3_000, 1);
        // A later scrape sees larger counts; counters never go back.
        m.set_models(3, 5_000, 1);
        m.set_models(3, 5_000, 1);
        let text = m.encode();
        for line in [
            "machine_model_downloads_total 3",
            "machine_model_download_bytes_total 5000",
            "machine_model_evictions_total 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }

    #[test]
    fn exposes_external_usage_and_cost() {
        let m = Metrics::new();
        let b = crate::connectors::Billing {
            connector: "openai".into(),
            customer: "c1".into(),
            requests: 2,
            input_tokens: 10,
            output_tokens: 20,
            predict_seconds: 0.0,
            cost: 0.25,
            currency: "USD".into(),
        };
        m.billing(&b);
        m.billing(&b);
        m.set_limiter(
            "openai",
            Some(&crate::connectors::limits::DailyUsage {
                requests: 7,
                tokens: 60,
                ..Default::default()
            }),
            crate::connectors::limits::LimiterStats {
                admitted: 7,
                waits: 3,
                waited_ms: 1500,
                quota_refusals: 1,
            },
        );
        let text = m.encode();
        for line in [
            "machine_external_requests_total{connector=\"openai\",customer=\"c1\"} 4",
            "machine_external_tokens_total{connector=\"openai\",customer=\"c1\",direction=\"output\"} 40",
            "machine_external_cost_total{connector=\"openai\",customer=\"c1\",currency=\"USD\"} 0.5",
            "machine_limit_requests_today{api=\"openai\"} 7",
            "machine_limit_wait_seconds{api=\"openai\"} 1.5",
            "machine_limit_quota_refusals{api=\"openai\"} 1",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
    }
}

//! Prometheus metrics (`GET /metrics`), through `prometheus-client`.
//!
//! A scraper that accepts OpenMetrics (Prometheus does) gets it as `prometheus-client` encodes
//! it, with the content type the crate documents; any other client (curl, `promtool check
//! metrics`) gets the Prometheus text format 0.0.4, where a counter's HELP and TYPE name the
//! sample (`machine_jobs_total`) and there is no `# EOF`. Counters end in `_total`, and no label
//! holds a job id: label values are services, workers, GPUs, connectors, customers and APIs,
//! all bounded by the configuration. A customer comes from free text in jobs, so only those
//! listed in `health.metrics_customers` are named; every other one counts as `other`.
//!
//! Job counters and histograms are recorded by the workers as things happen; service restarts
//! and state, worker state and GPU readings are set from live state at scrape time, so they are
//! never stale; the queue depth is sampled from Redis by a feed every few seconds. External
//! jobs add their usage and cost (per connector and customer) as they complete, and the
//! fleet-wide limiters' daily usage is set by a feed that reads it from Redis. The models
//! store's downloads and evictions are counted by the store and copied in at scrape time.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};

/// A job's end, labelled by service and outcome.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct JobLabels {
    /// The job's `service_required`.
    pub service: String,
    /// `completed`, `failed`, `returned`, `cancelled` or `lost`: each job once, so `sum()` over
    /// outcomes counts jobs (claims have their own counter).
    pub outcome: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabel {
    worker: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PlannedRestartLabels {
    service: String,
    reason: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: String,
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
    /// The customers the external metrics name; any other is `other`.
    customers: std::collections::BTreeSet<String>,
    jobs: JobMetrics,
    services: ServiceMetrics,
    workers: WorkerMetrics,
    gpus: GpuMetrics,
    external: ExternalMetrics,
    limits: LimitMetrics,
    redis: RedisMetrics,
    models: ModelMetrics,
}

/// The jobs: claimed, ended, how long they took, how many run and wait.
#[derive(Debug)]
struct JobMetrics {
    ended: Family<JobLabels, Counter>,
    claimed: Family<ServiceLabel, Counter>,
    claim_seconds: Histogram,
    seconds: Family<ServiceLabel, Histogram>,
    match_misses: Counter,
    running: Gauge,
    queue_depth: Family<ServiceLabel, Gauge>,
}

impl JobMetrics {
    fn register(r: &mut Registry) -> JobMetrics {
        JobMetrics {
            ended: register(r, "jobs", "Jobs that ended, by service and outcome", Default::default()),
            claimed: register(r, "jobs_claimed", "Jobs claimed, by service", Default::default()),
            // 1 ms .. ~16 s: a claim that waits for work is bounded by the safety poll.
            claim_seconds: register(
                r,
                "claim_duration_seconds",
                "Time from asking the broker for a job to getting one, for claims that got a job",
                Histogram::new(exponential_buckets(0.001, 2.0, 15)),
            ),
            // 10 ms .. ~2.9 h.
            seconds: register(
                r,
                "job_duration_seconds",
                "Job run time by service",
                Family::new_with_constructor(|| Histogram::new(exponential_buckets(0.01, 2.0, 21))),
            ),
            match_misses: register(
                r,
                "match_misses",
                "Claims that found no runnable job",
                Default::default(),
            ),
            running: register(
                r,
                "jobs_running",
                "Jobs running on this machine now",
                Default::default(),
            ),
            queue_depth: register(
                r,
                "queue_depth",
                "Jobs waiting in the fleet's queue for each service this machine serves (sampled)",
                Default::default(),
            ),
        }
    }
}

/// The supervised services: restarts, planned and not, readiness, warm-ups.
#[derive(Debug)]
struct ServiceMetrics {
    restarts: Family<ServiceLabel, Counter>,
    planned_restarts: Family<PlannedRestartLabels, Counter>,
    warmup_seconds: Family<ServiceLabel, FloatGauge>,
    up: Family<ServiceLabel, Gauge>,
}

impl ServiceMetrics {
    fn register(r: &mut Registry) -> ServiceMetrics {
        ServiceMetrics {
            restarts: register(
                r,
                "service_restarts",
                "Restarts of each supervised service since the machine started",
                Default::default(),
            ),
            planned_restarts: register(
                r,
                "service_planned_restarts",
                "Restarts of a service planned between jobs, by reason (rss, idle_vram, every_jobs, unresponsive)",
                Default::default(),
            ),
            warmup_seconds: register(
                r,
                "service_warmup_seconds",
                "Time of the last successful warm-up job of each service",
                Default::default(),
            ),
            up: register(
                r,
                "service_up",
                "1 while a supervised service runs and its readiness probe passes, else 0",
                Default::default(),
            ),
        }
    }
}

/// The workers: busy, held, quarantined, storing outputs, idle between jobs.
#[derive(Debug)]
struct WorkerMetrics {
    busy: Family<WorkerLabel, Gauge>,
    quarantined: Family<WorkerLabel, Gauge>,
    held: Family<WorkerLabel, Gauge>,
    uploads: Family<WorkerLabel, Gauge>,
    idle_seconds: Family<WorkerLabel, FloatCounter>,
}

impl WorkerMetrics {
    fn register(r: &mut Registry) -> WorkerMetrics {
        WorkerMetrics {
            busy: register(
                r,
                "worker_busy",
                "1 while a worker runs a job, else 0",
                Default::default(),
            ),
            quarantined: register(
                r,
                "worker_quarantined",
                "1 while the worker is quarantined after failures that were not its jobs' fault",
                Default::default(),
            ),
            held: register(
                r,
                "worker_held",
                "1 while a hold (GPU fault, quarantine, planned restart, warm-up) keeps the worker from claiming",
                Default::default(),
            ),
            uploads: register(
                r,
                "worker_uploads_pending",
                "Finished jobs whose outputs the worker is storing while it goes on",
                Default::default(),
            ),
            idle_seconds: register(
                r,
                "worker_idle_between_jobs_seconds",
                "Time the worker's GPU sat idle between jobs for the machine's own reasons: from a job's run ending to the next one's starting, less the claims' wait for work",
                Default::default(),
            ),
        }
    }
}

/// The GPUs' live readings and health.
#[derive(Debug)]
struct GpuMetrics {
    utilization: Family<GpuLabel, FloatGauge>,
    memory_used: Family<GpuLabel, Gauge>,
    temperature: Family<GpuLabel, Gauge>,
    faulted: Family<GpuLabel, Gauge>,
    throttled: Family<GpuLabel, Gauge>,
}

impl GpuMetrics {
    fn register(r: &mut Registry) -> GpuMetrics {
        GpuMetrics {
            utilization: register(
                r,
                "gpu_utilization_ratio",
                "GPU utilisation, 0 to 1",
                Default::default(),
            ),
            memory_used: register(r, "gpu_memory_used_bytes", "GPU memory used", Default::default()),
            temperature: register(r, "gpu_temperature_celsius", "GPU core temperature", Default::default()),
            faulted: register(
                r,
                "gpu_faulted",
                "1 while the GPU has a fatal fault (critical XID, double-bit ECC, lost); its worker does not claim",
                Default::default(),
            ),
            throttled: register(
                r,
                "gpu_throttled",
                "1 while the GPU's clocks are thermally or power throttled",
                Default::default(),
            ),
        }
    }
}

/// What external jobs used and cost, by connector and customer.
#[derive(Debug)]
struct ExternalMetrics {
    requests: Family<UsageLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    predict_seconds: Family<UsageLabels, FloatCounter>,
    cost: Family<CostLabels, FloatCounter>,
    possible_orphans: Family<ApiLabel, Counter>,
}

impl ExternalMetrics {
    fn register(r: &mut Registry) -> ExternalMetrics {
        ExternalMetrics {
            requests: register(
                r,
                "external_requests",
                "Requests external APIs accepted (and bill), for every attempt, by connector and customer",
                Default::default(),
            ),
            tokens: register(
                r,
                "external_tokens",
                "Tokens used by external jobs (every attempt the API bills), by connector, customer and direction (input/output)",
                Default::default(),
            ),
            predict_seconds: register(
                r,
                "external_predict_seconds",
                "Predict / execution time external APIs reported, for every attempt they bill",
                Default::default(),
            ),
            cost: register(
                r,
                "external_cost",
                "Cost of external jobs (every attempt the API bills) from the configured price tables",
                Default::default(),
            ),
            possible_orphans: register(
                r,
                "external_possible_orphans",
                "Creates of paid work answered with a 5xx or not at all: the work may exist upstream, unfollowed and billed",
                Default::default(),
            ),
        }
    }
}

/// The fleet-wide API limiters: today's usage, and this machine's waits and refusals.
#[derive(Debug)]
struct LimitMetrics {
    requests_today: Family<ApiLabel, Gauge>,
    tokens_today: Family<ApiLabel, Gauge>,
    waits: Family<ApiLabel, Gauge>,
    wait_seconds: Family<ApiLabel, FloatGauge>,
    quota_refusals: Family<ApiLabel, Gauge>,
}

impl LimitMetrics {
    fn register(r: &mut Registry) -> LimitMetrics {
        LimitMetrics {
            requests_today: register(
                r,
                "limit_requests_today",
                "Requests admitted today by the fleet-wide limiter, fleet-wide",
                Default::default(),
            ),
            tokens_today: register(
                r,
                "limit_tokens_today",
                "Tokens recorded today against the fleet-wide quota, fleet-wide",
                Default::default(),
            ),
            waits: register(
                r,
                "limit_waits",
                "Times this machine's requests waited for a fleet-wide rate limit",
                Default::default(),
            ),
            wait_seconds: register(
                r,
                "limit_wait_seconds",
                "Time this machine's requests spent waiting for a fleet-wide rate limit",
                Default::default(),
            ),
            quota_refusals: register(
                r,
                "limit_quota_refusals",
                "Jobs this machine returned to the queue because a daily quota was used up",
                Default::default(),
            ),
        }
    }
}

/// The machine's Redis connection.
#[derive(Debug)]
struct RedisMetrics {
    up: Gauge,
    errors: Family<KindLabel, Counter>,
}

impl RedisMetrics {
    fn register(r: &mut Registry) -> RedisMetrics {
        let metrics = RedisMetrics {
            up: register(
                r,
                "redis_up",
                "1 while the last Redis command succeeded",
                Default::default(),
            ),
            errors: register(
                r,
                "redis_errors",
                "Failed Redis commands by kind (unreachable, readonly, auth, other)",
                Default::default(),
            ),
        };
        for kind in crate::broker::FaultKind::ALL {
            let _ = metrics.errors.get_or_create(&KindLabel {
                kind: kind.name().to_owned(),
            });
        }
        metrics
    }
}

/// The models fetched on demand.
#[derive(Debug)]
struct ModelMetrics {
    downloads: Counter,
    download_bytes: Counter,
    evictions: Counter,
}

impl ModelMetrics {
    fn register(r: &mut Registry) -> ModelMetrics {
        ModelMetrics {
            downloads: register(
                r,
                "model_downloads",
                "Models fetched on demand (downloads started)",
                Default::default(),
            ),
            download_bytes: register(
                r,
                "model_download_bytes",
                "Bytes of models fetched on demand",
                Default::default(),
            ),
            evictions: register(
                r,
                "model_evictions",
                "Models evicted from the shared models directory to stay within models.cache_max_gb",
                Default::default(),
            ),
        }
    }
}

/// Registers `metric` as `machine_<name>` with its `help`, and returns it for recording.
fn register<M: Metric + Clone>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M {
    registry.register(name, help, metric.clone());
    metric
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(&[])
    }
}

/// The label a job's customer gets: itself when configured, none when the job has none, else
/// `other` (a job's customer is free text; a label per value would grow without bound).
const OTHER_CUSTOMER: &str = "other";

impl Metrics {
    /// A fresh registry with every metric family registered; the external metrics name the
    /// `customers` listed and count every other customer as `other`.
    pub fn new(customers: &[String]) -> Self {
        let mut r = Registry::with_prefix("machine");
        let build_info: Family<BuildLabels, Gauge> = register(
            &mut r,
            "build_info",
            "The machine's version; always 1",
            Family::default(),
        );
        build_info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION").to_owned(),
            })
            .set(1);
        Metrics {
            inner: Arc::new(Inner {
                customers: customers.iter().cloned().collect(),
                jobs: JobMetrics::register(&mut r),
                services: ServiceMetrics::register(&mut r),
                workers: WorkerMetrics::register(&mut r),
                gpus: GpuMetrics::register(&mut r),
                external: ExternalMetrics::register(&mut r),
                limits: LimitMetrics::register(&mut r),
                redis: RedisMetrics::register(&mut r),
                models: ModelMetrics::register(&mut r),
                registry: r,
            }),
        }
    }

    /// The label for `customer`: see [`OTHER_CUSTOMER`].
    fn customer(&self, customer: &str) -> String {
        if customer.is_empty() || self.inner.customers.contains(customer) {
            customer.to_owned()
        } else {
            OTHER_CUSTOMER.to_owned()
        }
    }

    /// Counts a create whose work may exist upstream unfollowed (see `ConnectorError::MaybeCreated`).
    pub fn possible_orphan(&self, api: &str) {
        self.inner
            .external
            .possible_orphans
            .get_or_create(&ApiLabel { api: api.to_owned() })
            .inc();
    }

    /// Counts what one attempt of an external job used and cost, whatever its outcome.
    pub fn billing(&self, b: &crate::connectors::Billing) {
        let customer = self.customer(&b.customer);
        let usage = UsageLabels {
            connector: b.connector.clone(),
            customer: customer.clone(),
        };
        let i = &self.inner;
        i.external.requests.get_or_create(&usage).inc_by(b.requests);
        for (direction, n) in [("input", b.input_tokens), ("output", b.output_tokens)] {
            i.external
                .tokens
                .get_or_create(&TokenLabels {
                    connector: b.connector.clone(),
                    customer: customer.clone(),
                    direction: direction.to_owned(),
                })
                .inc_by(n);
        }
        if b.predict_seconds.is_finite() && b.predict_seconds > 0.0 {
            i.external
                .predict_seconds
                .get_or_create(&usage)
                .inc_by(b.predict_seconds);
        }
        if b.cost.is_finite() && b.cost > 0.0 {
            i.external
                .cost
                .get_or_create(&CostLabels {
                    connector: b.connector.clone(),
                    customer: customer.clone(),
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
            i.limits
                .requests_today
                .get_or_create(&label)
                .set(i64::try_from(u.requests).unwrap_or(i64::MAX));
            i.limits
                .tokens_today
                .get_or_create(&label)
                .set(i64::try_from(u.tokens).unwrap_or(i64::MAX));
        }
        i.limits
            .waits
            .get_or_create(&label)
            .set(i64::try_from(stats.waits).unwrap_or(i64::MAX));
        i.limits
            .wait_seconds
            .get_or_create(&label)
            .set(stats.waited_ms as f64 / 1000.0);
        i.limits
            .quota_refusals
            .get_or_create(&label)
            .set(i64::try_from(stats.quota_refusals).unwrap_or(i64::MAX));
    }

    /// Counts a job claimed for `service`.
    pub fn claimed(&self, service: &str) {
        self.inner
            .jobs
            .claimed
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .inc();
    }

    /// Counts a job's end.
    pub fn job(&self, service: &str, outcome: &str) {
        self.inner
            .jobs
            .ended
            .get_or_create(&JobLabels {
                service: service.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Records one claim: how long it took when it got a job, a miss when it found none (a
    /// miss's time is how long the broker had nothing, not how fast claiming is).
    pub fn claim(&self, seconds: f64, claimed: bool) {
        if claimed {
            self.inner.jobs.claim_seconds.observe(seconds);
        } else {
            self.inner.jobs.match_misses.inc();
        }
    }

    /// Records a job's run time.
    pub fn job_duration(&self, service: &str, seconds: f64) {
        self.inner
            .jobs
            .seconds
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .observe(seconds);
    }

    /// Sets a service's restart count and whether it is up (at scrape time). The count only
    /// grows while the machine runs, and so does the counter.
    pub fn set_service(&self, service: &str, restarts: u64, up: bool) {
        let label = ServiceLabel {
            service: service.to_owned(),
        };
        let counter = self.inner.services.restarts.get_or_create(&label);
        let seen = counter.get();
        if restarts > seen {
            counter.inc_by(restarts - seen);
        }
        self.inner.services.up.get_or_create(&label).set(i64::from(up));
    }

    /// Sets which workers run a job (at scrape time), and so how many jobs run.
    pub fn set_workers<'a>(&self, workers: impl IntoIterator<Item = (&'a str, bool)>) {
        let mut running = 0;
        for (worker, busy) in workers {
            running += i64::from(busy);
            self.inner
                .workers
                .busy
                .get_or_create(&WorkerLabel {
                    worker: worker.to_owned(),
                })
                .set(i64::from(busy));
        }
        self.inner.jobs.running.set(running);
    }

    /// Sets `machine_redis_up` and brings `machine_redis_errors_total` up to `errors`.
    pub fn set_redis(&self, up: bool, errors: &BTreeMap<crate::broker::FaultKind, u64>) {
        self.inner.redis.up.set(i64::from(up));
        for (kind, n) in errors {
            let counter = self.inner.redis.errors.get_or_create(&KindLabel {
                kind: kind.name().to_owned(),
            });
            let seen = counter.get();
            if *n > seen {
                counter.inc_by(n - seen);
            }
        }
    }

    /// Sets how many jobs wait in the queue for `service`.
    pub fn set_queue_depth(&self, service: &str, depth: u64) {
        self.inner
            .jobs
            .queue_depth
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .set(i64::try_from(depth).unwrap_or(i64::MAX));
    }

    /// Counts a restart of `service` planned between jobs, for `reason`.
    pub fn planned_restart(&self, service: &str, reason: &str) {
        self.inner
            .services
            .planned_restarts
            .get_or_create(&PlannedRestartLabels {
                service: service.to_owned(),
                reason: reason.to_owned(),
            })
            .inc();
    }

    /// Records the time of `service`'s last successful warm-up.
    pub fn warmup(&self, service: &str, seconds: f64) {
        self.inner
            .services
            .warmup_seconds
            .get_or_create(&ServiceLabel {
                service: service.to_owned(),
            })
            .set(seconds);
    }

    /// Sets a GPU's live readings (at scrape time).
    pub fn set_gpu(&self, gpu: &crate::gpu::GpuLive) {
        let label = GpuLabel {
            gpu: gpu.index.to_string(),
        };
        if let Some(u) = gpu.utilization_percent {
            // Prometheus wants a ratio; NVML gives a percent.
            self.inner
                .gpus
                .utilization
                .get_or_create(&label)
                .set(f64::from(u.min(100)) / 100.0);
        }
        if let Some(m) = gpu.memory_used_bytes {
            self.inner.gpus.memory_used.get_or_create(&label).set(m as i64);
        }
        if let Some(t) = gpu.temperature_c {
            self.inner.gpus.temperature.get_or_create(&label).set(i64::from(t));
        }
    }

    /// Sets a GPU's health (at scrape time).
    pub fn set_gpu_health(&self, gpu: &crate::gpu::GpuHealth) {
        let label = GpuLabel {
            gpu: gpu.index.to_string(),
        };
        let i = &self.inner;
        i.gpus
            .faulted
            .get_or_create(&label)
            .set(i64::from(gpu.health == crate::gpu::Condition::Faulted));
        i.gpus
            .throttled
            .get_or_create(&label)
            .set(i64::from(gpu.throttle.is_some()));
    }

    /// Sets whether a worker is held, and whether by a quarantine (at scrape time).
    pub fn set_worker_hold(&self, worker: &str, held: bool, quarantined: bool) {
        let label = WorkerLabel {
            worker: worker.to_owned(),
        };
        self.inner.workers.held.get_or_create(&label).set(i64::from(held));
        self.inner
            .workers
            .quarantined
            .get_or_create(&label)
            .set(i64::from(quarantined));
    }

    /// Sets how many finished jobs a worker is storing the outputs of (at scrape time).
    pub fn set_worker_uploads(&self, worker: &str, pending: usize) {
        self.inner
            .workers
            .uploads
            .get_or_create(&WorkerLabel {
                worker: worker.to_owned(),
            })
            .set(i64::try_from(pending).unwrap_or(i64::MAX));
    }

    /// Adds time a worker's GPU sat idle between jobs.
    pub fn worker_idle(&self, worker: &str, seconds: f64) {
        self.inner
            .workers
            .idle_seconds
            .get_or_create(&WorkerLabel {
                worker: worker.to_owned(),
            })
            .inc_by(seconds);
    }

    /// Sets the models store's counts (at scrape time); they only grow, and so do the counters.
    pub fn set_models(&self, downloads: u64, bytes: u64, evictions: u64) {
        let i = &self.inner;
        for (counter, value) in [
            (&i.models.downloads, downloads),
            (&i.models.download_bytes, bytes),
            (&i.models.evictions, evictions),
        ] {
            let seen = counter.get();
            if value > seen {
                counter.inc_by(value - seen);
            }
        }
    }

    /// The OpenMetrics exposition of every metric, as `prometheus-client` writes it.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry);
        out
    }

    /// The body and content type for a scraper that sent `accept`: OpenMetrics when it accepts
    /// it, else the Prometheus text format 0.0.4.
    pub fn exposition(&self, accept: Option<&str>) -> (&'static str, String) {
        let open_metrics = accept.is_some_and(|a| a.contains("application/openmetrics-text"));
        if open_metrics {
            (OPENMETRICS, self.encode())
        } else {
            (TEXT_0_0_4, to_text_format(&self.encode()))
        }
    }
}

impl super::HealthState {
    /// Sets the figures read from live state (GPUs, services, workers, the models store) and
    /// encodes every metric for a scraper that sent `accept`.
    pub(super) fn scrape_metrics(&self, accept: Option<&str>) -> (&'static str, String) {
        for gpu in self.probe.live() {
            self.metrics.set_gpu(&gpu);
        }
        for gpu in self.probe.health_now() {
            self.metrics.set_gpu_health(&gpu);
        }
        for service in self.services.status() {
            let up = service.state.ready();
            self.metrics.set_service(&service.name, u64::from(service.restarts), up);
        }
        let redis = self.redis_health().snapshot();
        self.metrics.set_redis(redis.up, &redis.errors);
        let workers = self.worker_statuses();
        self.metrics
            .set_workers(workers.iter().map(|w| (w.worker_id.as_str(), w.current_job.is_some())));
        for w in &workers {
            let quarantined = w.held_by.contains(&crate::worker::hold::HoldKind::Quarantine);
            self.metrics
                .set_worker_hold(&w.worker_id, w.hold.is_some(), quarantined);
            self.metrics.set_worker_uploads(&w.worker_id, w.uploads.len());
        }
        if let Some(m) = &self.models {
            self.metrics
                .set_models(m.downloads(), m.downloaded_bytes(), m.evictions());
        }
        self.metrics.exposition(accept)
    }
}

/// The content type `prometheus-client` documents for its output.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the Prometheus text format.
pub const TEXT_0_0_4: &str = "text/plain; version=0.0.4; charset=utf-8";

/// OpenMetrics as `prometheus-client` writes it, turned into the Prometheus text format: a
/// counter family `x` (samples `x_total`) is described as `x_total`, `unknown` is `untyped`,
/// and `# EOF` and `# UNIT` lines go.
fn to_text_format(open_metrics: &str) -> String {
    let lines: Vec<&str> = open_metrics.lines().collect();
    let mut out = String::with_capacity(open_metrics.len());
    for (i, line) in lines.iter().enumerate() {
        if *line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let family = |kind: &str| line.strip_prefix(kind).and_then(|r| r.split(' ').next());
        if let Some(name) = family("# HELP ") {
            // prometheus-client writes HELP just before TYPE.
            let is_counter = lines
                .get(i + 1)
                .is_some_and(|next| *next == format!("# TYPE {name} counter"));
            if is_counter && !name.ends_with("_total") {
                out.push_str(&format!(
                    "# HELP {name}_total{}\n",
                    &line["# HELP ".len() + name.len()..]
                ));
                continue;
            }
        } else if let Some(name) = family("# TYPE ") {
            let kind = &line["# TYPE ".len() + name.len()..];
            match kind.trim() {
                "counter" if !name.ends_with("_total") => {
                    out.push_str(&format!("# TYPE {name}_total counter\n"));
                    continue;
                }
                "unknown" => {
                    out.push_str(&format!("# TYPE {name} untyped\n"));
                    continue;
                }
                _ => {}
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_recorded_values() {
        let m = Metrics::new(&[]);
        m.claimed("comfyui");
        m.job("comfyui", "completed");
        m.job("comfyui", "completed");
        m.claim(0.5, false);
        m.claim(0.002, true);
        m.job_duration("comfyui", 1.5);
        m.set_service("comfyui-gpu0", 3, true);
        m.set_service("comfyui-gpu0", 3, false);
        m.set_workers([("w0", true), ("w1", false)]);
        m.worker_idle("w0", 0.25);
        m.worker_idle("w0", 0.5);
        m.set_worker_uploads("w0", 2);
        m.set_queue_depth("comfyui", 7);
        m.planned_restart("comfyui-gpu0", "rss");
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
        assert!(
            text.contains("machine_worker_idle_between_jobs_seconds_total{worker=\"w0\"} 0.75"),
            "{text}"
        );
        assert!(
            text.contains("machine_worker_uploads_pending{worker=\"w0\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("machine_jobs_claimed_total{service=\"comfyui\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("machine_service_planned_restarts_total{service=\"comfyui-gpu0\",reason=\"rss\"} 1"),
            "{text}"
        );
        assert!(text.contains("machine_claim_duration_seconds_count 1"), "{text}");
        assert!(
            text.contains("machine_job_duration_seconds_sum{service=\"comfyui\"} 1.5"),
            "{text}"
        );
        assert!(
            text.contains("machine_service_restarts_total{service=\"comfyui-gpu0\"} 3"),
            "{text}"
        );
        assert!(text.contains("machine_claim_duration_seconds_sum 0.002"), "{text}");
        assert!(
            text.contains("machine_service_up{service=\"comfyui-gpu0\"} 0"),
            "{text}"
        );
        assert!(text.contains("machine_worker_busy{worker=\"w0\"} 1"), "{text}");
        assert!(text.contains("machine_jobs_running 1"), "{text}");
        assert!(text.contains("machine_queue_depth{service=\"comfyui\"} 7"), "{text}");
        assert!(text.contains("machine_build_info{version=\""), "{text}");
        assert!(text.contains("machine_gpu_utilization_ratio{gpu=\"1\"} 0.87"), "{text}");
        assert!(text.contains("machine_gpu_temperature_celsius{gpu=\"1\"} 61"), "{text}");
    }

    #[test]
    fn text_format_names_counters_by_their_samples() {
        let m = Metrics::new(&[]);
        m.job("simulation", "completed");
        let (kind, open) = m.exposition(Some("application/openmetrics-text;version=1.0.0,text/plain;q=0.5"));
        assert_eq!(kind, OPENMETRICS);
        assert!(open.ends_with("# EOF\n"), "{open}");
        assert!(open.contains("# TYPE machine_jobs counter\n"), "{open}");
        let (kind, text) = m.exposition(None);
        assert_eq!(kind, TEXT_0_0_4);
        assert!(!text.contains("# EOF"), "{text}");
        assert!(
            text.contains(
                "# HELP machine_jobs_total Jobs that ended, by service and outcome.\n# TYPE machine_jobs_total counter\n"
            ),
            "{text}"
        );
        assert!(text.contains("# TYPE machine_jobs_running gauge\n"), "{text}");
        // Every sample's family is described right above it.
        let mut described = std::collections::BTreeSet::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                described.insert(rest.split(' ').next().unwrap().to_owned());
            } else if !line.starts_with('#') {
                let name = line.split(['{', ' ']).next().unwrap();
                let family = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|f| described.contains(*f)))
                    .unwrap_or(name);
                assert!(described.contains(family), "{name} has no TYPE in\n{text}");
            }
        }
    }

    #[test]
    fn exposes_the_models_stores_counts() {
        let m = Metrics::new(&[]);
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
        let m = Metrics::new(&["c1".to_owned()]);
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
        m.possible_orphan("runpod");
        let text = m.encode();
        for line in [
            "machine_external_possible_orphans_total{api=\"runpod\"} 1",
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

    #[test]
    fn only_configured_customers_are_named() {
        let m = Metrics::new(&["acme".to_owned()]);
        let billing = |customer: &str| crate::connectors::Billing {
            connector: "openai".into(),
            customer: customer.into(),
            requests: 1,
            input_tokens: 1,
            output_tokens: 1,
            predict_seconds: 1.0,
            cost: 0.1,
            currency: "USD".into(),
        };
        for i in 0..100 {
            m.billing(&billing(&format!("free text {i}")));
        }
        m.billing(&billing("acme"));
        m.billing(&billing(""));
        let text = m.encode();
        let customers: std::collections::BTreeSet<&str> = text
            .lines()
            .filter(|l| l.starts_with("machine_external_"))
            .filter_map(|l| l.split("customer=\"").nth(1)?.split('"').next())
            .collect();
        assert_eq!(customers, ["", "acme", "other"].into(), "{text}");
        assert!(
            text.contains("machine_external_requests_total{connector=\"openai\",customer=\"other\"} 100"),
            "{text}"
        );
    }
}

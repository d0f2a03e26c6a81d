//! The small tasks `machine run` keeps beside its subsystems, each feeding one thing into
//! another: service readiness into the workers, GPU faults into the supervisor, the upkeep's
//! tools, API limits, queue depth and finished jobs into the health state, and the one line
//! that says the machine is ready.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::gpu::Probe;
use crate::health::{HealthState, Running};
use crate::logging::error_chain;
use crate::plan::Plan;
use crate::supervisor::SupervisorHandle;
use crate::worker::{self, Readiness};

use super::Connected;

/// Reacts to GPUs that fault: with `on_fault = "exit"` cancels `exit`; otherwise, once the
/// faulted GPU's worker is off its job (it returns it, see [`crate::worker::hold`]), stops the
/// services that worker waits for, so nothing keeps using the broken GPU.
pub(super) async fn on_gpu_faults(
    mut faults: watch::Receiver<Vec<crate::gpu::GpuHealth>>,
    running: watch::Receiver<Running>,
    handle: SupervisorHandle,
    on_fault: crate::config::OnFault,
    exit: CancellationToken,
    stop: CancellationToken,
) {
    let mut handled = BTreeSet::new();
    loop {
        let faulted: Vec<u32> = faults
            .borrow_and_update()
            .iter()
            .filter(|g| g.health == crate::gpu::Condition::Faulted && !handled.contains(&g.index))
            .map(|g| g.index)
            .collect();
        for index in faulted {
            handled.insert(index);
            if on_fault == crate::config::OnFault::Exit {
                exit.cancel();
                return;
            }
            // The workers as they run now: a reload may have added or replaced the GPU's.
            let now = running.borrow().clone();
            for wp in now.plan.workers.iter().filter(|w| w.gpu == Some(index)) {
                if let Some((_, status)) = now.workers.iter().find(|(id, _)| *id == wp.id) {
                    let mut status = status.clone();
                    tokio::select! {
                        () = stop.cancelled() => return,
                        _ = status.wait_for(|s| s.current_job.is_none()) => {}
                    }
                }
                for service in &wp.waits_for {
                    tracing::warn!(gpu = index, service = %service, "stopping a service of the faulted GPU");
                    if let Err(e) = handle.stop(service).await {
                        tracing::warn!(service = %service, error = %error_chain(&e), "failed to stop a service of the faulted GPU");
                    }
                }
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            changed = faults.changed() => if changed.is_err() { return },
        }
    }
}

/// What the upkeep of the workers' services uses: the supervisor, the metrics that count its
/// planned restarts, and the GPUs' used memory.
pub(super) fn keep_up(
    handle: &SupervisorHandle,
    state: &Arc<HealthState>,
    probe: Arc<Probe>,
) -> worker::upkeep::KeepUp {
    let (metrics, warmups) = (state.metrics().clone(), state.metrics().clone());
    worker::upkeep::KeepUp {
        supervisor: handle.clone(),
        on_restart: Arc::new(move |service, reason| metrics.planned_restart(service, reason)),
        on_warmup: Arc::new(move |service, seconds| warmups.warmup(service, seconds)),
        gpu_memory_used: Arc::new(move |gpu| {
            probe
                .live()
                .into_iter()
                .find(|g| g.index == gpu)
                .and_then(|g| g.memory_used_bytes)
        }),
    }
}

/// One readiness channel per service a worker waits for, fed from the supervisor: `true` while
/// the service is running, its readiness probe passes and it is live. A service recovering from
/// a crash loop counts as ready as soon as its probe passes again: the crash-loop flag, which
/// stays up until the run has lasted `stable_after`, is for operators and restart backoff, not
/// a reason to keep a working service idle for a minute.
pub(super) fn readiness(
    handle: &SupervisorHandle,
    plan: &Plan,
    stop: &CancellationToken,
    tasks: &mut Vec<JoinHandle<()>>,
) -> Readiness {
    let names: BTreeSet<&String> = plan.workers.iter().flat_map(|w| &w.waits_for).collect();
    let mut readiness = Readiness::new();
    for name in names {
        if let Some((rx, task)) = handle.readiness(name, stop) {
            tasks.push(task);
            readiness.insert(name.clone(), rx);
        }
    }
    readiness
}

/// Every few seconds, reads the fleet-wide usage of each limited external API from Redis into
/// the metrics, `/status` and the fleet status.
pub(super) async fn limits_feed(state: Arc<HealthState>, pool: worker::WorkerPool, stop: CancellationToken) {
    loop {
        // Read each round: a reload may add an API.
        for limiter in &pool.limiters() {
            let usage = limiter.usage().await.ok();
            let stats = limiter.stats();
            state.metrics().set_limiter(limiter.api(), usage.as_ref(), stats);
            state.set_external_api(
                limiter.api(),
                serde_json::json!({ "today": usage, "this_machine": stats }),
            );
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Logs once, when the machine first becomes ready (`/ready` answers 200), how long that took
/// since it started.
pub(super) async fn ready_line(state: Arc<HealthState>, stop: CancellationToken) {
    // Readiness is derived from the installers', services' and workers' channels on every
    // read; a short poll reads it without a second copy of that rule.
    loop {
        if state.ready_document().ready {
            let took = crate::logging::started().elapsed();
            tracing::info!(
                seconds = took.as_secs_f64(),
                "machine ready in {:.2}s",
                took.as_secs_f64()
            );
            break;
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_millis(50)) => {}
        }
    }
}

/// Every few seconds once the broker is connected, reads from Redis how many jobs wait for each
/// service the running workers serve (those of the running plan, which a reload changes), into
/// the metrics; a sample that fails keeps the last figures.
pub(super) async fn queue_feed(state: Arc<HealthState>, connected: Connected, stop: CancellationToken) {
    let Some(broker) = connected.broker(&stop).await else {
        return;
    };
    let metrics = state.metrics().clone();
    let running = state.running();
    loop {
        let services: Vec<String> = running
            .borrow()
            .plan
            .workers
            .iter()
            .flat_map(|w| w.job_services())
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect();
        let sample = async {
            if services.is_empty() {
                return Ok(Ok(Vec::new()));
            }
            tokio::time::timeout(Duration::from_secs(2), broker.queue_depth(&services)).await
        };
        // A stop does not wait for a sample that Redis is slow to answer.
        let sample = tokio::select! {
            () = stop.cancelled() => break,
            r = sample => r,
        };
        match sample {
            Ok(Ok(depths)) => {
                for (service, depth) in depths {
                    metrics.set_queue_depth(&service, depth);
                }
            }
            Ok(Err(e)) => tracing::debug!("failed to sample the queue depth: {}", error_chain(&e)),
            Err(_) => tracing::debug!("sampling the queue depth timed out"),
        }
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Records every finished job in the metrics and in the status page's recent jobs.
pub(super) async fn metrics_feed(
    state: Arc<HealthState>,
    mut reports: tokio::sync::broadcast::Receiver<worker::JobReport>,
    stop: CancellationToken,
) {
    let metrics = state.metrics().clone();
    loop {
        let report = tokio::select! {
            () = stop.cancelled() => break,
            r = reports.recv() => match r {
                Ok(r) => r,
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "metrics fell behind the job reports");
                    continue;
                }
                Err(tokio::sync::broadcast::error::RecvError::Closed) => break,
            },
        };
        let outcome = report.outcome.name();
        state.record_job(&report);
        metrics.claimed(&report.service);
        metrics.job(&report.service, outcome);
        metrics.job_duration(&report.service, report.run.as_secs_f64());
        metrics.worker_idle(&report.worker_id, report.idle_before.as_secs_f64());
        if let Some(billing) = &report.billing {
            metrics.billing(billing);
        }
        if let Some(api) = &report.possible_orphan {
            metrics.possible_orphan(api);
        }
    }
}

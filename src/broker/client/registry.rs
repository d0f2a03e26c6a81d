//! The machine's presence in Redis: its workers' registration in `worker:<id>` and their
//! heartbeats (a registration Redis lost, restarted empty, is written again), and the machine's
//! status message for the fleet monitor.

use std::time::SystemTime;

use redis::cmd;

use super::{Broker, redis_err, scan};
use crate::broker::BrokerError;
use crate::broker::capabilities::Capabilities;
use crate::clock::now_ms;
/// How long the stored copy of a machine's status message lives without a refresh: the API's
/// disconnect threshold.
const MACHINE_STATUS_TTL_SECS: u64 = 30;

/// How long a worker hash outlives its last heartbeat: a machine that is gone (killed, its
/// container removed) must not leave its workers in Redis forever.
const WORKER_TTL_SECS: i64 = 300;

/// The set of every service any worker has registered (never trimmed: a handful of names).
pub(super) const OFFERED_SERVICES: &str = "workers:services";

impl Broker {
    /// Registers a worker in `worker:<id>` (idle) with its capabilities; it is registered again
    /// by itself whenever Redis is found empty.
    pub async fn register_worker(&self, caps: &Capabilities) -> Result<(), BrokerError> {
        self.inner
            .registered
            .lock()
            .expect("the registry lock is never poisoned: no panics while held")
            .insert(caps.worker_id.clone(), caps.clone());
        self.write_registration(caps).await
    }

    /// Deletes a worker's registration (a reload removed it) and forgets it, so that it is
    /// neither matched nor registered again.
    pub async fn unregister_worker(&self, worker_id: &str) -> Result<(), BrokerError> {
        self.inner
            .registered
            .lock()
            .expect("the registry lock is never poisoned: no panics while held")
            .remove(worker_id);
        let key = self.key(&format!("worker:{worker_id}"));
        let mut conn = self.connection();
        cmd("DEL")
            .arg(&key)
            .arg(format!("{key}:heartbeat"))
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err("unregister worker"))
    }

    /// Registers every worker of this broker again (Redis came back without them).
    pub(super) async fn register_again(&self) {
        let all: Vec<Capabilities> = self
            .inner
            .registered
            .lock()
            .expect("the registry lock is never poisoned: no panics while held")
            .values()
            .cloned()
            .collect();
        for caps in all {
            match self.write_registration(&caps).await {
                Ok(()) => tracing::info!(worker_id = %caps.worker_id, "registered the worker again in an empty redis"),
                Err(e) if super::super::outage::is_outage(&e) => {
                    tracing::debug!(worker_id = %caps.worker_id, error = %crate::logging::error_chain(&e), "failed to register the worker again")
                }
                Err(e) => {
                    tracing::warn!(worker_id = %caps.worker_id, error = %crate::logging::error_chain(&e), "failed to register the worker again")
                }
            }
        }
    }

    async fn write_registration(&self, caps: &Capabilities) -> Result<(), BrokerError> {
        let now = now_ms();
        let at = humantime::format_rfc3339_millis(SystemTime::now()).to_string();
        let key = self.key(&format!("worker:{}", caps.worker_id));
        let mut conn = self.connection();
        let services = caps.accepted_services();
        let mut pipe = redis::pipe();
        if !services.is_empty() {
            // Every service any worker ever offered, so that a job for a service no machine has
            // (a typo) is told apart from one whose workers are all busy or gone for now.
            pipe.sadd(self.key(OFFERED_SERVICES), services).ignore();
        }
        pipe.atomic()
            .hset_multiple(
                &key,
                &[
                    ("worker_id", caps.worker_id.clone()),
                    ("machine_id", caps.machine_id.clone()),
                    ("status", "idle".to_owned()),
                    ("current_job_id", String::new()),
                    ("capabilities", caps.to_json()),
                    ("connected_at", at.clone()),
                    ("last_status_change", at),
                    ("last_heartbeat", now.to_string()),
                ],
            )
            .ignore()
            .expire(&key, WORKER_TTL_SECS)
            .ignore()
            .set_ex(format!("{key}:heartbeat"), now.to_string(), 60)
            .ignore()
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err("register worker"))
    }

    /// Rewrites the `capabilities` of a registered worker, e.g. when the models on its disk
    /// changed; the next claim matches against them.
    pub async fn update_capabilities(&self, caps: &Capabilities) -> Result<(), BrokerError> {
        let key = self.key(&format!("worker:{}", caps.worker_id));
        let mut conn = self.connection();
        cmd("HSET")
            .arg(&key)
            .arg("capabilities")
            .arg(caps.to_json())
            .query_async::<()>(&mut conn)
            .await
            .map_err(redis_err("update worker capabilities"))
    }

    /// The contract's heartbeat: `worker:<id>` `last_heartbeat` and `worker:<id>:heartbeat`
    /// (60 s TTL), and the hash's own expiry pushed back. Call every 30 s or sooner. A worker
    /// whose registration is gone (Redis came back empty) is registered again.
    pub async fn heartbeat(&self, worker_id: &str) -> Result<(), BrokerError> {
        let now = now_ms().to_string();
        let key = self.key(&format!("worker:{worker_id}"));
        let mut conn = self.connection();
        let (registered,): (bool,) = redis::pipe()
            .atomic()
            .hexists(&key, "worker_id")
            .hset(&key, "last_heartbeat", &now)
            .ignore()
            .expire(&key, WORKER_TTL_SECS)
            .ignore()
            .set_ex(format!("{key}:heartbeat"), &now, 60)
            .ignore()
            .query_async(&mut conn)
            .await
            .map_err(redis_err("heartbeat"))?;
        if !registered {
            let caps = self
                .inner
                .registered
                .lock()
                .expect("the registry lock is never poisoned: no panics while held")
                .get(worker_id)
                .cloned();
            if let Some(caps) = caps {
                tracing::info!(worker_id, "the worker's registration is gone; registering it again");
                self.write_registration(&caps).await?;
            }
        }
        Ok(())
    }

    /// Publishes the machine's status message on `machine:status:<machine_id>` and stores it in
    /// `machine:<machine_id>:status` (expiring after 30 s) so that `machine status --fleet`
    /// reads the fleet without waiting for a publish round. One pipeline on the shared command
    /// connection. Answers the message stored before (`SET ... GET`, one atomic step), so that
    /// a machine learns when another one publishes under its id.
    pub async fn publish_machine_status(&self, machine_id: &str, message: &str) -> Result<Option<String>, BrokerError> {
        let mut conn = self.connection();
        let (previous,): (Option<String>,) = redis::pipe()
            .publish(self.key(&format!("machine:status:{machine_id}")), message)
            .ignore()
            .cmd("SET")
            .arg(self.key(&format!("machine:{machine_id}:status")))
            .arg(message)
            .arg("EX")
            .arg(MACHINE_STATUS_TTL_SECS)
            .arg("GET")
            .query_async(&mut conn)
            .await
            .map_err(redis_err("publish the machine status"))?;
        Ok(previous)
    }

    /// Every machine's stored status message (`machine:<id>:status`, see
    /// [`Broker::publish_machine_status`]), as stored; for the status page's fleet view. SCAN,
    /// not KEYS, so that a large Redis is not blocked.
    pub async fn machine_statuses(&self) -> Result<Vec<String>, BrokerError> {
        let mut conn = self.connection();
        let prefix: String = self
            .key("")
            .chars()
            .flat_map(|c| match c {
                '*' | '?' | '[' | ']' | '\\' => vec!['\\', c],
                c => vec![c],
            })
            .collect();
        let pattern = format!("{prefix}machine:*:status");
        let mut keys = scan(&mut conn, &pattern, "scan the machines' status").await?;
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        keys.sort();
        keys.dedup();
        let values: Vec<Option<String>> = cmd("MGET")
            .arg(&keys)
            .query_async(&mut conn)
            .await
            .map_err(redis_err("read the machines' status"))?;
        // A key that expired between SCAN and MGET reads as nil.
        Ok(values.into_iter().flatten().collect())
    }

    /// Each of `worker_ids`' last heartbeat (`worker:<id>` `last_heartbeat`, epoch
    /// milliseconds), `None` for a worker that has none (never registered, or expired); one
    /// pipeline. For `machine status --fleet`.
    pub async fn worker_heartbeats(
        &self,
        worker_ids: &[String],
    ) -> Result<std::collections::BTreeMap<String, Option<u64>>, BrokerError> {
        if worker_ids.is_empty() {
            return Ok(std::collections::BTreeMap::new());
        }
        let mut conn = self.connection();
        let mut pipe = redis::pipe();
        for id in worker_ids {
            pipe.hget(self.key(&format!("worker:{id}")), "last_heartbeat");
        }
        let beats: Vec<Option<String>> = pipe
            .query_async(&mut conn)
            .await
            .map_err(redis_err("read the workers' heartbeats"))?;
        Ok(worker_ids
            .iter()
            .cloned()
            .zip(beats.into_iter().map(|b| b.and_then(|b| b.trim().parse::<u64>().ok())))
            .collect())
    }
}

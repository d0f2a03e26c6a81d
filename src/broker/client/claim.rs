//! Claiming: one `findMatchingJob` attempt, the wait for a wake-up between attempts, and the
//! reading of a claim reply (a job that cannot run is failed at once with the reason).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::{Broker, CatchUp};

/// How long a worker that stops claiming waits for Redis to take it out of the park.
const LEAVE_PARK_WITHIN: Duration = Duration::from_secs(1);
/// Workers whose capabilities' JSON is kept (`Broker::caps_json`); a machine has a few.
const CAPS_JSON_MAX: usize = 4096;
use crate::broker::BrokerError;
use crate::broker::capabilities::{Capabilities, payload_problem};

/// A job this machine claimed.
#[derive(Debug, Clone, PartialEq)]
pub struct ClaimedJob {
    /// The job id.
    pub id: String,
    /// The worker the job is assigned to.
    pub worker_id: String,
    /// `service_required` (or the legacy `job_type`).
    pub service: String,
    /// The decoded `payload` (`{}` when empty).
    pub payload: Value,
    /// Every field of the job hash at claim time; read through the typed accessors, so that
    /// only the broker names the hash's fields.
    pub(crate) fields: JobFields,
}

/// The fields of a job hash as a claim read them: every name and value, unescaped, in one
/// buffer. A machine holds each claimed job for as long as it runs, and a job hash has a dozen
/// fields or more: one buffer and one index instead of two strings per field in a tree was a
/// sixth of the client's work per claim and completion (issue 27), most of it the allocator's.
#[derive(Debug, Clone, PartialEq, Default)]
pub(crate) struct JobFields {
    text: String,
    /// Per field, where its name starts, where its value starts (the name's end) and where the
    /// value ends, in `text`, in the order the reply listed them.
    spans: Vec<[u32; 3]>,
}

impl JobFields {
    /// The fields `pairs` names; a name given twice keeps its last value, as a map would.
    pub(crate) fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> JobFields {
        let mut fields = JobFields::default();
        for (name, value) in pairs {
            let start = fields.mark();
            fields.text.push_str(name);
            let value_start = fields.mark();
            fields.text.push_str(value);
            fields.spans.push([start, value_start, fields.mark()]);
        }
        fields
    }

    /// The value of field `name`; the last one when the reply named it twice.
    pub(crate) fn get(&self, name: &str) -> Option<&str> {
        self.spans.iter().rev().find_map(|&[start, value, end]| {
            (&self.text[start as usize..value as usize] == name).then(|| &self.text[value as usize..end as usize])
        })
    }

    /// Where the next text written starts.
    fn mark(&self) -> u32 {
        // A claim reply is a Redis bulk string (at most 512 MB), so every offset fits.
        u32::try_from(self.text.len()).expect("a job hash is smaller than 4 GB")
    }
}

impl<'de> serde::Deserialize<'de> for JobFields {
    /// Reads a JSON object whose values are all strings (a Redis hash as `cjson.encode` writes
    /// it) straight into the buffer; any other value is an error (the caller's fallback reads
    /// those).
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::{DeserializeSeed, MapAccess, Visitor};

        /// Appends the string it reads to the buffer.
        struct Append<'b>(&'b mut String);
        impl<'de> DeserializeSeed<'de> for Append<'_> {
            type Value = ();
            fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
                deserializer.deserialize_str(self)
            }
        }
        impl Visitor<'_> for Append<'_> {
            type Value = ();
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<(), E> {
                self.0.push_str(v);
                Ok(())
            }
        }

        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = JobFields;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a job hash as a JSON object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<JobFields, A::Error> {
                let mut fields = JobFields {
                    text: String::with_capacity(512),
                    spans: Vec::with_capacity(map.size_hint().unwrap_or(16)),
                };
                loop {
                    let start = fields.mark();
                    if map.next_key_seed(Append(&mut fields.text))?.is_none() {
                        return Ok(fields);
                    }
                    let value = fields.mark();
                    map.next_value_seed(Append(&mut fields.text))?;
                    fields.spans.push([start, value, fields.mark()]);
                }
            }
        }
        deserializer.deserialize_map(Fields)
    }
}

impl ClaimedJob {
    /// A field of the job hash at claim time.
    pub(super) fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name)
    }

    /// `customer_id` (empty when absent).
    pub fn customer_id(&self) -> &str {
        self.field("customer_id").unwrap_or_default()
    }

    /// `ctx` as written (JSON text), when present.
    pub fn ctx(&self) -> Option<&str> {
        self.field("ctx")
    }

    /// Whether the job last waited for an API quota (`limit_reason` set by `deferJob`).
    pub fn waited_for_a_limit(&self) -> bool {
        self.field("limit_reason").is_some_and(|r| !r.is_empty())
    }

    /// `requirements` decoded, when present and valid JSON.
    pub fn requirements(&self) -> Option<Value> {
        serde_json::from_str(self.field("requirements")?).ok()
    }

    /// `retry_count` (0 when absent).
    pub fn retry_count(&self) -> u32 {
        self.field("retry_count").and_then(|v| v.parse().ok()).unwrap_or(0)
    }
}

impl Broker {
    /// One claim attempt: the best job this worker can run, or `None`.
    pub async fn claim(&self, caps: &Capabilities) -> Result<Option<ClaimedJob>, BrokerError> {
        self.claim_json(&self.caps_json(caps), false).await
    }

    /// The capabilities' JSON, serialised once per worker and capabilities.
    fn caps_json(&self, caps: &Capabilities) -> Arc<str> {
        let mut cache = self
            .inner
            .caps_json
            .lock()
            .expect("the caps lock is never poisoned: no panics while held");
        if let Some((cached, json)) = cache.get(&caps.worker_id)
            && cached == caps
        {
            return json.clone();
        }
        let json: Arc<str> = caps.to_json().into();
        if cache.len() >= CAPS_JSON_MAX {
            cache.clear();
        }
        cache.insert(caps.worker_id.clone(), (caps.clone(), json.clone()));
        json
    }

    /// One claim attempt; with `park`, a worker that finds nothing is parked as waiting
    /// (`claimOrPark`), so that the fleet's indexer wakes it for a job it can run.
    async fn claim_json(&self, caps_json: &str, park: bool) -> Result<Option<ClaimedJob>, BrokerError> {
        let max = &self.inner.max_examine_arg;
        let lease = self.lease().as_millis().to_string();
        let park_ms = &self.inner.park_ms_arg;
        loop {
            let started = std::time::Instant::now();
            let prefix = &self.inner.opts.key_prefix;
            // Bytes, not a string: a job field with invalid UTF-8 must fail that job, not the call.
            let reply: Option<Vec<u8>> = if park {
                self.call("claimOrPark", &[caps_json, max, &lease, prefix, park_ms])
                    .await?
            } else {
                self.call("findMatchingJob", &[caps_json, max, &lease, prefix]).await?
            };
            if let Some(observe) = self.inner.observer.get() {
                observe(started.elapsed(), reply.is_some());
            }
            let Some(reply) = reply else { return Ok(None) };
            let job = match String::from_utf8(reply) {
                Ok(text) => parse_claim(&text)?,
                Err(e) => {
                    let field = invalid_utf8_field(e.as_bytes());
                    let mut job = parse_claim(&String::from_utf8_lossy(e.as_bytes()))?;
                    job.payload_error = Some(Unrunnable {
                        reason: format!("invalid UTF-8 in job field `{field}`"),
                        unworkable: false,
                    });
                    job
                }
            };
            match job.payload_error {
                None => return Ok(Some(job.job)),
                Some(Unrunnable { reason, unworkable }) => {
                    // The job cannot run anywhere; end it at once with the reason.
                    tracing::warn!(job_id = %job.job.id, %reason, "claimed a job that cannot run; failing it");
                    let ended = if unworkable {
                        self.fail_unworkable(&job.job, &reason).await
                    } else {
                        self.fail(&job.job, &reason, false).await
                    };
                    match ended {
                        Ok(_) => {}
                        // An id that is not UTF-8 itself cannot be named back; its lease runs out.
                        Err(BrokerError::LeaseLost { .. } | BrokerError::Cancelled { .. }) => {}
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    pub(super) fn receiver(&self, service: &str) -> watch::Receiver<u64> {
        let mut map = self
            .inner
            .wake
            .lock()
            .expect("the wake lock is never poisoned: no panics while held");
        map.entry(service.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// The wake-ups of one worker alone (the fleet's indexer chose it for a job).
    fn worker_receiver(&self, worker: &str) -> watch::Receiver<u64> {
        let mut map = self
            .inner
            .wake_workers
            .lock()
            .expect("the wake lock is never poisoned: no panics while held");
        map.entry(worker.to_owned())
            .or_insert_with(|| watch::channel(0).0)
            .subscribe()
    }

    /// Wakes one worker of this machine; `false` when no worker of that id waits here.
    pub(super) fn wake_worker(&self, worker: &str) -> bool {
        let map = self
            .inner
            .wake_workers
            .lock()
            .expect("the wake lock is never poisoned: no panics while held");
        match map.get(worker) {
            Some(tx) => {
                tx.send_modify(|v| *v = v.wrapping_add(1));
                true
            }
            None => false,
        }
    }

    /// Makes [`Broker::run_events`] listen to the wake channel of `machine`.
    fn listen_for_wakes(&self, machine: &str) {
        self.inner.wake_machines.send_if_modified(|m| {
            if m.contains(machine) {
                false
            } else {
                m.insert(machine.to_owned());
                true
            }
        });
    }

    pub(super) fn wake(&self, service: Option<&str>) {
        let map = self
            .inner
            .wake
            .lock()
            .expect("the wake lock is never poisoned: no panics while held");
        match service.and_then(|s| map.get(s)) {
            Some(tx) => tx.send_modify(|v| *v = v.wrapping_add(1)),
            None if service.is_none() => {
                for tx in map.values() {
                    tx.send_modify(|v| *v = v.wrapping_add(1));
                }
            }
            None => {}
        }
    }

    /// Waits until a job this worker can run is claimed, or `shutdown` (then `None`).
    ///
    /// Claims at once; when nothing matches the worker is parked in Redis as waiting and waits
    /// for a wake-up: its own (the fleet's indexer chose it for a submitted job), one of its
    /// services' (`job_requeued`, delivered by [`Broker::run_events`]) or the safety poll, then
    /// tries again.
    pub async fn claim_next(
        &self,
        caps: &Capabilities,
        shutdown: &CancellationToken,
    ) -> Result<Option<ClaimedJob>, BrokerError> {
        let caps_json = self.caps_json(caps);
        let services = if caps.job_service_required_map.is_empty() {
            &caps.connectors
        } else {
            &caps.job_service_required_map
        };
        let mut rxs: Vec<watch::Receiver<u64>> = services.iter().map(|s| self.receiver(s)).collect();
        self.listen_for_wakes(&caps.machine_id);
        rxs.push(self.worker_receiver(&caps.worker_id));
        // A backlog queued while no machine listened is claimed in order only once it is in
        // the index: wait for run_events' catch-up (it indexes 100,000 jobs in seconds), but
        // not longer than a safety poll at a time, so a slow catch-up never stalls a worker.
        let mut catch_up = self.inner.catch_up.subscribe();
        while *catch_up.borrow_and_update() == CatchUp::Running {
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                _ = catch_up.changed() => {}
                () = tokio::time::sleep(self.inner.opts.safety_poll) => break,
            }
        }
        loop {
            if shutdown.is_cancelled() {
                return Ok(None);
            }
            for rx in &mut rxs {
                rx.borrow_and_update();
            }
            if let Some(job) = self.claim_json(&caps_json, true).await? {
                return Ok(Some(job));
            }
            let woken = async {
                let _ = futures_util::future::select_all(rxs.iter_mut().map(|rx| Box::pin(rx.changed()))).await;
            };
            tokio::select! {
                () = shutdown.cancelled() => return Ok(None),
                () = woken => {}
                () = tokio::time::sleep(self.inner.opts.safety_poll) => {}
            }
        }
    }

    /// Takes a worker that stops claiming (held, quarantined, draining, waiting for its
    /// services or uploads, stopping) out of the fleet's park, where its last claim
    /// ([`Broker::claim_next`]) left it, so that the indexer wakes no one in vain for the next
    /// submissions (its park would last three safety polls otherwise). Best effort and
    /// bounded: a Redis that does not answer leaves it to the park's own end.
    pub async fn leave_park(&self, worker: &str) {
        let args = [self.inner.opts.key_prefix.as_str(), worker];
        let call = self.call::<u64>("leavePark", &args);
        match tokio::time::timeout(LEAVE_PARK_WITHIN, call).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                tracing::debug!(worker, error = %crate::logging::error_chain(&e), "failed to leave the park; it ends by itself")
            }
            Err(_) => tracing::debug!(worker, "leaving the park took too long; it ends by itself"),
        }
    }
}

/// The job field whose value (or name) is not UTF-8 in a raw claim reply, `?` when the reply
/// cannot be read that far. The reply is `{"jobId":..,"job":{..}}` and, a job being a Redis
/// hash, every field of `job` is a string.
fn invalid_utf8_field(reply: &[u8]) -> String {
    const JOB: &[u8] = b"\"job\":{";
    let Some(start) = reply.windows(JOB.len()).position(|w| w == JOB) else {
        return "?".to_owned();
    };
    let mut at = start + JOB.len();
    while let Some((key, after_key)) = json_string(reply, at) {
        let Some((value, after_value)) = json_string(reply, after_key + 1) else {
            break;
        };
        if std::str::from_utf8(key).is_err() || std::str::from_utf8(value).is_err() {
            return String::from_utf8_lossy(key).into_owned();
        }
        at = after_value + 1;
    }
    "?".to_owned()
}

/// The raw bytes inside the JSON string that starts at `at`, and the index after it.
fn json_string(b: &[u8], at: usize) -> Option<(&[u8], usize)> {
    if b.get(at) != Some(&b'"') {
        return None;
    }
    let mut j = at + 1;
    while j < b.len() {
        match b[j] {
            b'\\' => j += 2,
            b'"' => return Some((&b[at + 1..j], j + 1)),
            _ => j += 1,
        }
    }
    None
}

struct ParsedClaim {
    job: ClaimedJob,
    payload_error: Option<Unrunnable>,
}

/// Why a claimed job cannot run anywhere: its worker ends it at once with the reason.
struct Unrunnable {
    reason: String,
    /// `unworkable` (a payload that is not JSON or asks for a time limit that is no positive
    /// number: the library no longer decodes payloads when it indexes them, so the claiming
    /// worker is the first to see it) rather than `failed` (a field that is not UTF-8).
    unworkable: bool,
}

fn parse_claim(reply: &str) -> Result<ParsedClaim, BrokerError> {
    // A job is a Redis hash, so every field the library sends is a string: read them as such
    // at once, and only a reply that is not (none the library writes) through JSON values.
    #[derive(serde::Deserialize)]
    struct Reply {
        #[serde(rename = "jobId")]
        job_id: String,
        job: JobFields,
    }
    #[derive(serde::Deserialize)]
    struct AnyReply {
        #[serde(rename = "jobId")]
        job_id: String,
        job: BTreeMap<String, Value>,
    }
    let r = match serde_json::from_str::<Reply>(reply) {
        Ok(r) => r,
        Err(_) => {
            let r: AnyReply = serde_json::from_str(reply).map_err(|e| BrokerError::Protocol {
                op: "findMatchingJob",
                detail: e.to_string(),
            })?;
            let texts: Vec<(&str, String)> = r
                .job
                .iter()
                .map(|(k, v)| {
                    let v = match v {
                        Value::String(s) => s.clone(),
                        other => other.to_string(),
                    };
                    (k.as_str(), v)
                })
                .collect();
            Reply {
                job_id: r.job_id,
                job: JobFields::from_pairs(texts.iter().map(|(k, v)| (*k, v.as_str()))),
            }
        }
    };
    let fields = r.job;
    let worker_id = fields.get("worker_id").unwrap_or_default().to_owned();
    let service = fields
        .get("service_required")
        .filter(|s| !s.is_empty())
        .or_else(|| fields.get("job_type"))
        .unwrap_or_default()
        .to_owned();
    let raw_payload = fields.get("payload").unwrap_or_default();
    let (payload, payload_error) = if raw_payload.trim().is_empty() {
        (Value::Object(serde_json::Map::new()), None)
    } else {
        let unworkable = |reason: String| {
            Some(Unrunnable {
                reason,
                unworkable: true,
            })
        };
        match serde_json::from_str(raw_payload) {
            Ok(v) => {
                let problem = payload_problem(&v).and_then(|p| unworkable(p.to_owned()));
                (v, problem)
            }
            Err(e) => (Value::Null, unworkable(format!("malformed payload JSON: {e}"))),
        }
    };
    Ok(ParsedClaim {
        job: ClaimedJob {
            id: r.job_id,
            worker_id,
            service,
            payload,
            fields,
        },
        payload_error,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_utf8_names_its_field() {
        let mut reply = br#"{"jobId":"j1","job":{"id":"j1","payload":"{\"a\":\"x"#.to_vec();
        reply.extend_from_slice(&[0xff, 0xfe]);
        reply.extend_from_slice(br#"\"}","status":"assigned"}}"#);
        assert_eq!(invalid_utf8_field(&reply), "payload");
        assert_eq!(invalid_utf8_field(b"nonsense"), "?");
    }

    #[test]
    fn claim_replies_parse() {
        let r = parse_claim(
            r#"{"jobId":"j1","job":{"id":"j1","service_required":"comfyui","payload":"{\"a\":1}","worker_id":"w"}}"#,
        )
        .expect("a well-formed reply parses");
        assert_eq!(r.job.payload["a"], 1);
        assert_eq!(r.job.service, "comfyui");
        assert!(r.payload_error.is_none());
        let bad = parse_claim(r#"{"jobId":"j1","job":{"payload":"{oops"}}"#).expect("parses");
        assert!(
            bad.payload_error
                .is_some_and(|e| e.unworkable && e.reason.starts_with("malformed payload JSON"))
        );
        // The library no longer checks payloads when it indexes them: the claim does.
        let limit = parse_claim(r#"{"jobId":"j1","job":{"payload":"{\"timeout_seconds\":0}"}}"#).expect("parses");
        assert!(
            limit
                .payload_error
                .is_some_and(|e| e.unworkable && e.reason.contains("payload.timeout_seconds"))
        );
        let fine = parse_claim(r#"{"jobId":"j1","job":{"payload":"{\"timeout_seconds\":\"30\"}"}}"#).expect("parses");
        assert!(fine.payload_error.is_none());
        // A field that is not a string (no library reply has one) is kept as its JSON text.
        let odd = parse_claim(r#"{"jobId":"j1","job":{"priority":50,"payload":"{}"}}"#).expect("parses");
        assert_eq!(odd.job.field("priority"), Some("50"));
        assert!(parse_claim("nonsense").is_err());
    }

    #[test]
    fn job_fields_read_escapes_and_keep_a_repeated_names_last_value() {
        let r = parse_claim(
            r#"{"jobId":"a\/b","job":{"ctx":"{\"k\":\"l\u00e9\\n\"}","payload":"{}","x":"1","ctx2":"","x":"2"}}"#,
        )
        .expect("parses");
        assert_eq!(r.job.id, "a/b");
        assert_eq!(r.job.ctx(), Some(r#"{"k":"lé\n"}"#));
        assert_eq!(r.job.field("ctx2"), Some(""));
        assert_eq!(r.job.field("x"), Some("2"));
        assert_eq!(r.job.field("c"), None);
        assert_eq!(
            r.job.fields,
            JobFields::from_pairs([
                ("ctx", r#"{"k":"lé\n"}"#),
                ("payload", "{}"),
                ("x", "1"),
                ("ctx2", ""),
                ("x", "2"),
            ])
        );
        // The fields of a reply that is not all strings read as they did through JSON values.
        let odd =
            parse_claim(r#"{"jobId":"j1","job":{"priority":50,"payload":"{}","n":null,"l":[1,"a"]}}"#).expect("parses");
        assert_eq!(odd.job.field("n"), Some("null"));
        assert_eq!(odd.job.field("l"), Some(r#"[1,"a"]"#));
    }
}

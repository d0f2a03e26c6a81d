//! The job broker against a real redis-server: contract shapes, matching semantics (and the
//! differential property test against the reference matcher), starvation, fencing, leases and
//! the reaper (with a SIGKILLed claimer), concurrency, malformed jobs, wake-ups, the installer
//! and the operator commands.

use std::collections::{BTreeMap, HashSet};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use machine::broker::reference::{self, PendingJob};
use machine::broker::{
    Broker, BrokerError, BrokerOptions, Cancellation, Capabilities, Failure, LeaseStatus, NewJob, RetryDelay, library,
};
use machine::config::RedisUrl;
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use testkit::RedisServer;
use tokio_util::sync::CancellationToken;

use crate::support::{subscribed, within};

const LIMIT: Duration = Duration::from_secs(120);

fn url(server: &RedisServer) -> RedisUrl {
    RedisUrl::parse(&server.url()).expect("testkit URLs are valid")
}

async fn broker_with(server: &RedisServer, opts: BrokerOptions) -> Broker {
    let b = Broker::connect(&url(server), opts).await.expect("connect");
    b.ensure_functions().await.expect("install the library");
    b
}

async fn broker(server: &RedisServer) -> Broker {
    broker_with(server, BrokerOptions::default()).await
}

async fn raw(server: &RedisServer) -> MultiplexedConnection {
    // Bulk loads run for seconds: no response timeout.
    let config = redis::AsyncConnectionConfig::new().set_response_timeout(None);
    redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .expect("connect")
}

async fn hgetall(conn: &mut MultiplexedConnection, key: &str) -> BTreeMap<String, String> {
    redis::cmd("HGETALL").arg(key).query_async(conn).await.expect("HGETALL")
}

/// Writes a job the way the existing API does (ZADD, HSET), without indexing it.
async fn api_add(conn: &mut MultiplexedConnection, id: &str, score: f64, fields: &[(&str, &str)]) {
    let mut all: Vec<(&str, &str)> = vec![
        ("id", id),
        ("status", "pending"),
        ("retry_count", "0"),
        ("max_retries", "3"),
    ];
    all.extend_from_slice(fields);
    let _: () = redis::pipe()
        .zadd("jobs:pending", id, score)
        .hset_multiple(format!("job:{id}"), &all)
        .query_async(conn)
        .await
        .expect("API-style write");
}

/// Options whose retries are claimable at once (the delay has its own test).
fn no_retry_delay() -> BrokerOptions {
    BrokerOptions {
        retry_delay: RetryDelay {
            initial: Duration::ZERO,
            ..machine::broker::DEFAULT_RETRY_DELAY
        },
        ..BrokerOptions::default()
    }
}

fn caps(worker: &str, services: &[&str]) -> Capabilities {
    Capabilities::new(worker, "m1", services)
}

/// Collects messages of `channels` until `n` arrived or 5 s passed.
async fn collect(pubsub: &mut redis::aio::PubSub, n: usize) -> Vec<(String, Value)> {
    let mut out = Vec::new();
    let mut stream = pubsub.on_message();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while out.len() < n {
        match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(msg)) => {
                let payload: String = msg.get_payload().expect("string payload");
                out.push((
                    msg.get_channel_name().to_owned(),
                    serde_json::from_str(&payload).expect("JSON message"),
                ));
            }
            _ => break,
        }
    }
    out
}

fn message<'a>(msgs: &'a [(String, Value)], channel: &str) -> &'a Value {
    &msgs
        .iter()
        .find(|(c, _)| c == channel)
        .unwrap_or_else(|| panic!("no {channel} message in {msgs:?}"))
        .1
}

fn has_keys(v: &Value, keys: &[&str]) {
    for k in keys {
        assert!(v.get(*k).is_some(), "missing {k} in {v}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_write_and_message_has_the_contract_shape() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let mut pubsub = redis::Client::open(server.url())
            .unwrap()
            .get_async_pubsub()
            .await
            .unwrap();
        pubsub
            .subscribe(&[
                "job_submitted",
                "job_claimed",
                "update_job_progress",
                "complete_job",
                "worker_status",
                "job_failed",
                "cancel_job",
            ])
            .await
            .unwrap();

        // Submission, as the API writes it.
        let mut job = NewJob::new("comfyui", json!({"workflow": {"1": {}}}));
        job.requirements = r#"{"hardware":{"gpu_memory_gb":16}}"#.to_owned();
        job.priority = 70;
        job.customer_id = "cust".to_owned();
        let before = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        let id = b.submit(&job).await.unwrap();
        let h = hgetall(&mut conn, &format!("job:{id}")).await;
        for k in [
            "id",
            "service_required",
            "priority",
            "payload",
            "requirements",
            "customer_id",
            "created_at",
            "status",
            "retry_count",
            "max_retries",
            "workflow_id",
        ] {
            assert!(h.contains_key(k), "job hash lacks {k}: {h:?}");
        }
        assert_eq!(h["status"], "pending");
        assert_eq!(h["priority"], "70");
        assert_eq!(h["max_retries"], "3");
        assert!(
            h["created_at"].ends_with('Z') && h["created_at"].contains('T'),
            "ISO time: {}",
            h["created_at"]
        );
        let score: f64 = redis::cmd("ZSCORE")
            .arg("jobs:pending")
            .arg(&id)
            .query_async(&mut conn)
            .await
            .unwrap();
        let expect = 70.0 * 1e15 - (before as f64 / 1000.0).floor();
        assert!((score - expect).abs() <= 32.0, "score {score} vs {expect}");
        let msgs = collect(&mut pubsub, 1).await;
        has_keys(
            message(&msgs, "job_submitted"),
            &[
                "job_id",
                "service_required",
                "priority",
                "requirements",
                "customer_id",
                "workflow_id",
                "timestamp",
            ],
        );

        // Claim.
        let mut c = caps("m1-gpu0", &["comfyui"]);
        c.hardware.gpu_memory_gb = 24.0;
        let claimed = b.claim(&c).await.unwrap().expect("the job matches");
        assert_eq!(claimed.id, id);
        assert_eq!(claimed.payload["workflow"], json!({"1": {}}));
        let h = hgetall(&mut conn, &format!("job:{id}")).await;
        assert_eq!(h["status"], "assigned");
        assert_eq!(h["worker_id"], "m1-gpu0");
        assert!(h.contains_key("assigned_at"));
        let active = hgetall(&mut conn, "jobs:active:m1-gpu0").await;
        let snap: Value = serde_json::from_str(&active[&id]).expect("active snapshot is JSON");
        assert_eq!(snap["id"], id.as_str());
        assert_eq!(snap["status"], "assigned");
        let w = hgetall(&mut conn, "worker:m1-gpu0").await;
        assert_eq!(w["status"], "busy");
        assert_eq!(w["current_job_id"], id);
        assert!(w.contains_key("last_status_change"));
        let msgs = collect(&mut pubsub, 2).await;
        let claimed_msg = message(&msgs, "job_claimed");
        has_keys(
            claimed_msg,
            &[
                "job_id",
                "worker_id",
                "status",
                "claimed_at",
                "timestamp",
                "service_required",
                "customer_id",
                "workflow_id",
                "message",
            ],
        );
        assert_eq!(claimed_msg["status"], "claimed");
        assert_eq!(claimed_msg["customer_id"], "cust");
        // The original's claim-time progress message: no status (the API would turn one into
        // an extra `job_assigned` client event on every claim).
        let p0 = message(&msgs, "update_job_progress");
        let mut keys: Vec<&str> = p0.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        assert_eq!(keys, ["job_id", "progress", "timestamp", "worker_id"], "{p0}");
        assert_eq!(p0["progress"], 0);
        // Nothing reads progress:<id> at claim time; the claim does not create it.
        let exists: bool = redis::cmd("EXISTS")
            .arg(format!("progress:{id}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(!exists, "the claim created progress:{id}");

        // Start and progress.
        b.start(&claimed).await.unwrap();
        let h = hgetall(&mut conn, &format!("job:{id}")).await;
        assert_eq!(h["status"], "in_progress");
        assert!(h.contains_key("started_at"));
        b.progress(&claimed, 40.0, "sampling", Some((2, 5))).await.unwrap();
        let p = hgetall(&mut conn, &format!("job:{id}:progress")).await;
        assert_eq!(p["progress"], "40");
        assert_eq!(p["status"], "in_progress");
        assert_eq!(p["message"], "sampling");
        assert!(p.contains_key("updated_at"));
        let msgs = collect(&mut pubsub, 1).await;
        let pm = message(&msgs, "update_job_progress");
        has_keys(
            pm,
            &[
                "job_id",
                "worker_id",
                "progress",
                "status",
                "message",
                "current_step",
                "total_steps",
                "timestamp",
            ],
        );
        assert_eq!(pm["progress"], 40);
        assert_eq!(pm["current_step"], "2");
        assert!(pm["timestamp"].as_i64().unwrap() > 1_600_000_000_000, "timestamp in ms");
        // No progress:<id> stream unless configured; configured, it is capped and expires.
        let ttl = |conn: &mut MultiplexedConnection| {
            let mut conn = conn.clone();
            let key = format!("progress:{id}");
            async move { redis::cmd("TTL").arg(key).query_async::<i64>(&mut conn).await.unwrap() }
        };
        assert_eq!(ttl(&mut conn).await, -2, "no progress stream by default");
        let streaming = broker_with(
            &server,
            BrokerOptions {
                progress_stream: true,
                ..BrokerOptions::default()
            },
        )
        .await;
        streaming
            .progress(&claimed, 41.0, "rendering", Some((2, 5)))
            .await
            .unwrap();
        assert_eq!(collect(&mut pubsub, 1).await[0].1["progress"], 41);
        let left = ttl(&mut conn).await;
        assert!(left > 0 && left <= 86400, "progress stream TTL {left}");

        // Complete.
        b.complete(&claimed, &json!({"images": ["a.png"]})).await.unwrap();
        let h = hgetall(&mut conn, &format!("job:{id}")).await;
        assert_eq!(h["status"], "completed");
        assert!(h.contains_key("completed_at"));
        assert!(h.contains_key("processing_time"));
        assert!(!hgetall(&mut conn, "jobs:active:m1-gpu0").await.contains_key(&id));
        let done: String = redis::cmd("HGET")
            .arg("jobs:completed")
            .arg(&id)
            .query_async(&mut conn)
            .await
            .unwrap();
        let done: Value = serde_json::from_str(&done).unwrap();
        assert_eq!(done["success"], true);
        assert_eq!(done["data"]["images"][0], "a.png");
        assert!(done.get("completed_at").is_some());
        let ttl: i64 = redis::cmd("TTL")
            .arg(format!("job:{id}"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0, "a finished job hash expires");
        let w = hgetall(&mut conn, "worker:m1-gpu0").await;
        assert_eq!(w["status"], "idle");
        assert_eq!(w["current_job_id"], "");
        let msgs = collect(&mut pubsub, 2).await;
        let cm = message(&msgs, "complete_job");
        has_keys(
            cm,
            &[
                "job_id",
                "worker_id",
                "progress",
                "status",
                "message",
                "result",
                "timestamp",
                "workflow_id",
                "current_step",
                "total_steps",
            ],
        );
        assert_eq!(cm["progress"], 100);
        assert_eq!(cm["status"], "completed");
        let ws = message(&msgs, "worker_status");
        has_keys(
            ws,
            &["worker_id", "old_status", "new_status", "current_job_id", "timestamp"],
        );
        assert_eq!(ws["old_status"], "busy");
        assert_eq!(ws["new_status"], "idle");

        // Final failure.
        let mut job = NewJob::new("comfyui", json!({}));
        job.max_retries = 0;
        let id2 = b.submit(&job).await.unwrap();
        let _ = collect(&mut pubsub, 1).await;
        let claimed = b.claim(&c).await.unwrap().expect("claimable");
        assert_eq!(claimed.id, id2);
        let _ = collect(&mut pubsub, 2).await;
        assert_eq!(b.fail(&claimed, "boom", true).await.unwrap(), Failure::Failed);
        let h = hgetall(&mut conn, &format!("job:{id2}")).await;
        assert_eq!(h["status"], "failed");
        assert_eq!(h["error"], "boom");
        assert!(h.contains_key("failed_at"));
        let rec: String = redis::cmd("HGET")
            .arg("jobs:failed")
            .arg(&id2)
            .query_async(&mut conn)
            .await
            .unwrap();
        has_keys(
            &serde_json::from_str(&rec).unwrap(),
            &["error", "failed_at", "retry_count"],
        );
        let msgs = collect(&mut pubsub, 2).await;
        let fm = message(&msgs, "job_failed");
        has_keys(
            fm,
            &[
                "job_id",
                "worker_id",
                "status",
                "error",
                "failed_at",
                "retry_count",
                "can_retry",
                "timestamp",
            ],
        );
        assert_eq!(fm["status"], "failed");
        assert_eq!(fm["can_retry"], false);

        // Cancel, as the API does it.
        let id3 = b.submit(&NewJob::new("comfyui", json!({}))).await.unwrap();
        let _ = collect(&mut pubsub, 1).await;
        let claimed = b.claim(&c).await.unwrap().expect("claimable");
        assert_eq!(claimed.id, id3);
        let _ = collect(&mut pubsub, 2).await;
        assert_eq!(b.cancel(&id3).await.unwrap(), Cancellation::Cancelled);
        let h = hgetall(&mut conn, &format!("job:{id3}")).await;
        assert_eq!(h["status"], "failed");
        assert_eq!(h["error"], "Job cancelled by user");
        assert!(!hgetall(&mut conn, "jobs:active:m1-gpu0").await.contains_key(&id3));
        let msgs = collect(&mut pubsub, 1).await;
        let xm = message(&msgs, "cancel_job");
        has_keys(xm, &["job_id", "worker_id", "reason", "timestamp"]);
        assert_eq!(xm["worker_id"], "m1-gpu0");

        // Heartbeat.
        b.heartbeat("m1-gpu0").await.unwrap();
        assert!(
            hgetall(&mut conn, "worker:m1-gpu0")
                .await
                .contains_key("last_heartbeat")
        );
        let ttl: i64 = redis::cmd("TTL")
            .arg("worker:m1-gpu0:heartbeat")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(ttl > 0 && ttl <= 60, "heartbeat TTL {ttl}");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_semantics_table_holds_in_lua() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let worker: Capabilities = serde_json::from_value(reference::example_capabilities()).unwrap();
        for (i, (name, service, reqs, want)) in reference::EXAMPLES.iter().enumerate() {
            let id = format!("case-{i}");
            api_add(
                &mut conn,
                &id,
                100.0,
                &[("service_required", service), ("requirements", reqs), ("payload", "{}")],
            )
            .await;
            let got = b.claim(&worker).await.unwrap();
            assert_eq!(
                got.as_ref().map(|j| j.id.as_str()),
                want.then_some(id.as_str()),
                "case {name}"
            );
            if let Some(job) = got {
                b.complete(&job, &Value::Null).await.unwrap();
            } else {
                // Removed as the API's cancel does; its cancel_job notice makes the machine
                // drop the job from the index (index_job), as here.
                let _: () = redis::pipe()
                    .zrem("jobs:pending", &id)
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                b.index_job(&id).await.unwrap();
            }
        }
    })
    .await;
}

/// A Lua bulk loader: `n` jobs as the API writes them, in one round trip.
async fn bulk_load(conn: &mut MultiplexedConnection, prefix: &str, n: usize, service: &str, reqs: &str, priority: i64) {
    let script = r"
        for i = 1, tonumber(ARGV[2]) do
          local id = ARGV[1] .. i
          redis.call('HSET', 'job:' .. id, 'id', id, 'service_required', ARGV[3], 'requirements', ARGV[4],
            'priority', ARGV[5], 'payload', '{}', 'status', 'pending', 'customer_id', '', 'retry_count', '0',
            'max_retries', '3')
          redis.call('ZADD', 'jobs:pending', tonumber(ARGV[5]) * 1e15 - i, id)
        end
        return 1";
    let _: i64 = redis::cmd("EVAL")
        .arg(script)
        .arg(0)
        .arg(prefix)
        .arg(n)
        .arg(service)
        .arg(reqs)
        .arg(priority)
        .query_async(conn)
        .await
        .expect("bulk load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_runnable_job_behind_100000_unrunnable_is_claimed() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        bulk_load(
            &mut conn,
            "big-",
            100_000,
            "comfyui",
            r#"{"hardware":{"gpu_memory_gb":80}}"#,
            90,
        )
        .await;
        bulk_load(&mut conn, "other-", 1000, "a1111", "", 95).await;
        api_add(
            &mut conn,
            "runnable",
            10.0,
            &[("service_required", "comfyui"), ("payload", "{}")],
        )
        .await;
        // What the machines' job_submitted handling does for jobs added while nobody listened.
        b.catch_up_index().await.unwrap();
        let mut c = caps("w", &["comfyui"]);
        c.hardware.gpu_memory_gb = 24.0;
        let started = Instant::now();
        let got = b.claim(&c).await.unwrap().expect("the runnable job is found");
        assert_eq!(got.id, "runnable");
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "claim took {:?}",
            started.elapsed()
        );
        assert!(b.claim(&c).await.unwrap().is_none());
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_the_api_adds_alone_are_absorbed_by_the_claim() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        api_add(&mut conn, "api-1", 5.0, &[("service_required", "simulation")]).await;
        api_add(
            &mut conn,
            "api-2",
            7.0,
            &[("job_type", "simulation"), ("payload", "{}")],
        )
        .await;
        let c = caps("w", &["simulation"]);
        assert_eq!(
            b.claim(&c).await.unwrap().unwrap().id,
            "api-2",
            "legacy job_type, higher score"
        );
        assert_eq!(b.claim(&c).await.unwrap().unwrap().id, "api-1");
        // The API removing a job behind our back leaves no ghost claim.
        api_add(&mut conn, "api-3", 9.0, &[("service_required", "simulation")]).await;
        b.index_job("api-3").await.unwrap();
        let _: () = redis::pipe()
            .zrem("jobs:pending", "api-3")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(b.claim(&c).await.unwrap().is_none());
    })
    .await;
}

/// The claim takes the best job of a worker's only group out of the group as it reads it (issue
/// 27): a top that turns out not to be claimable (its hash says it ended, it left
/// `jobs:pending`, or it was re-submitted for another service) is dropped or moved, the next
/// job is claimed in the same call, and the index is left consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_top_job_that_is_not_claimable_gives_way_to_the_next_in_the_same_claim() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        for (id, score) in [
            ("ended", 9.0),
            ("gone", 8.0),
            ("moved", 7.0),
            ("next", 6.0),
            ("last", 5.0),
        ] {
            api_add(&mut conn, id, score, &[("service_required", "simulation")]).await;
            b.index_job(id).await.unwrap();
        }
        // Behind the index's back: one ended, one left jobs:pending, one is now another
        // service's job.
        let _: () = redis::pipe()
            .hset("job:ended", "status", "completed")
            .zrem("jobs:pending", "gone")
            .hset("job:moved", "service_required", "a1111")
            .query_async(&mut conn)
            .await
            .unwrap();
        let c = caps("w", &["simulation"]);
        assert_eq!(b.claim(&c).await.unwrap().unwrap().id, "next");
        assert_eq!(b.claim(&c).await.unwrap().unwrap().id, "last");
        assert!(b.claim(&c).await.unwrap().is_none());
        assert_eq!(
            b.claim(&caps("a", &["a1111"])).await.unwrap().unwrap().id,
            "moved",
            "the re-submitted job went to its new service's group"
        );
        let pending: Vec<String> = redis::cmd("ZRANGE")
            .arg("jobs:pending")
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await
            .unwrap();
        let indexed: BTreeMap<String, String> = hgetall(&mut conn, "jobs:idx:job").await;
        // The ended job may stay in jobs:pending until a claim's repair drops it, never claimed.
        assert!(pending.iter().all(|id| id == "ended"), "{pending:?}");
        assert!(indexed.is_empty(), "{indexed:?}");
        assert_eq!(hgetall(&mut conn, "job:ended").await["status"], "completed");
    })
    .await;
}

/// A worker held off the best job of its only group (it just failed it) takes the next one, and
/// the held job keeps its place for the others: the claim takes a sole group's top out as it
/// reads it (issue 27), so a held top must go back exactly where it was.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_off_top_job_goes_back_to_its_place_in_its_group() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker_with(&server, no_retry_delay()).await;
        let mut conn = raw(&server).await;
        for (id, score) in [("a", 9.0), ("b", 8.0), ("c", 7.0)] {
            api_add(&mut conn, id, score, &[("service_required", "simulation")]).await;
            b.index_job(id).await.unwrap();
        }
        let w1 = caps("w1", &["simulation"]);
        let w2 = caps("w2", &["simulation"]);
        let a = b.claim(&w1).await.unwrap().unwrap();
        assert_eq!(a.id, "a");
        assert_eq!(b.fail(&a, "flaky", true).await.unwrap(), Failure::Retried);
        assert_eq!(b.claim(&w1).await.unwrap().unwrap().id, "b", "w1 is held off a");
        assert_eq!(b.claim(&w2).await.unwrap().unwrap().id, "a", "a is still ahead of c");
        assert_eq!(b.claim(&w1).await.unwrap().unwrap().id, "c");
        assert!(b.claim(&w2).await.unwrap().is_none());
    })
    .await;
}

/// The library memoises decoded capabilities and group verdicts across calls (docs/redis-protocol.md):
/// a verdict must stay right when its group empties and is built again, and claims must stay
/// right after the memo fills up and is dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memoised_capabilities_and_group_verdicts_stay_right() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let big = [
            ("service_required", "comfyui"),
            ("requirements", r#"{"hardware":{"gpu_memory_gb":80}}"#),
        ];
        let plain = [("service_required", "comfyui")];
        let mut small = caps("small", &["comfyui"]);
        small.hardware.gpu_memory_gb = 24.0;
        let mut large = caps("large", &["comfyui"]);
        large.hardware.gpu_memory_gb = 80.0;
        let claim_id = |c: Capabilities| {
            let b = b.clone();
            async move { b.claim(&c).await.expect("claim").map(|j| j.id) }
        };

        api_add(&mut conn, "big-1", 9e15, &big).await;
        api_add(&mut conn, "ok-1", 5e15, &plain).await;
        assert_eq!(claim_id(small.clone()).await.as_deref(), Some("ok-1"));
        assert_eq!(
            claim_id(small.clone()).await,
            None,
            "the memoised 'no' for big-1's group"
        );
        // ok-1's group emptied and was removed; the same group built again is still a 'yes'.
        api_add(&mut conn, "ok-2", 5e15, &plain).await;
        assert_eq!(claim_id(small.clone()).await.as_deref(), Some("ok-2"));
        assert_eq!(claim_id(large.clone()).await.as_deref(), Some("big-1"));

        // More distinct capability texts than the memo holds: it is dropped and rebuilt.
        for i in 0..4200 {
            assert_eq!(claim_id(caps(&format!("other-{i}"), &["a1111"])).await, None);
        }
        api_add(&mut conn, "big-2", 9e15, &big).await;
        api_add(&mut conn, "ok-3", 5e15, &plain).await;
        assert_eq!(claim_id(small.clone()).await.as_deref(), Some("ok-3"));
        assert_eq!(claim_id(small).await, None);
        assert_eq!(claim_id(large).await.as_deref(), Some("big-2"));
    })
    .await;
}

/// Lua's collector in the functions' VM, read by a probe library loaded beside ours: its
/// `stepmul` (set and put back), the heap now and the heap after a full collection, in KB.
async fn lua_gc(conn: &mut MultiplexedConnection, what: &str) -> f64 {
    let _: String = redis::cmd("FUNCTION")
        .arg("LOAD")
        .arg("REPLACE")
        .arg(
            "#!lua name=gcProbe\n\
             redis.register_function('gcProbe', function(_, a)\n\
               if a[1] == 'stepmul' then\n\
                 local was = collectgarbage('setstepmul', 200)\n\
                 collectgarbage('setstepmul', was)\n\
                 return tostring(was)\n\
               end\n\
               if a[1] == 'live' then collectgarbage('collect') end\n\
               return tostring(collectgarbage('count'))\n\
             end)",
        )
        .query_async(conn)
        .await
        .expect("load the collector probe");
    let v: String = redis::cmd("FCALL")
        .arg("gcProbe")
        .arg(0)
        .arg(what)
        .query_async(conn)
        .await
        .expect("collector probe");
    v.parse().expect("a number")
}

/// Redis steps Lua's collector every 50 calls by work in proportion to `stepmul`, whatever the
/// calls allocated: at the default 200 our memos (1,000 workers' decoded capabilities, 3 MB) were
/// walked over and over. The library sets 50 on its first call, and the collector must still
/// finish its cycles: the heap stays within a small multiple of what is live.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_slows_lua_s_collector_and_the_heap_stays_bounded() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        assert_eq!(
            lua_gc(&mut conn, "stepmul").await,
            200.0,
            "Lua's default before any call"
        );
        const JOBS: usize = 4000;
        bulk_load(&mut conn, "j-", JOBS, "comfyui", "", 50).await;
        b.catch_up_index().await.expect("index");
        assert_eq!(
            lua_gc(&mut conn, "stepmul").await,
            50.0,
            "set by the library's first call"
        );
        let mut peak: f64 = 0.0;
        let workers: Vec<Capabilities> = (0..400).map(|i| caps(&format!("w-{i}"), &["comfyui"])).collect();
        let mut done = 0;
        while done < JOBS {
            let claims = workers.iter().map(|w| {
                let b = b.clone();
                async move {
                    if let Some(job) = b.claim(w).await.expect("claim") {
                        b.complete(&job, &json!({"ok": true})).await.expect("complete");
                        1
                    } else {
                        0
                    }
                }
            });
            done += futures_util::future::join_all(claims).await.into_iter().sum::<usize>();
            peak = peak.max(lua_gc(&mut conn, "count").await);
        }
        let live = lua_gc(&mut conn, "live").await;
        assert!(
            peak < 3.0 * live,
            "the heap peaked at {peak:.0} KB for {live:.0} KB live: the collector falls behind"
        );
    })
    .await;
}

/// A requirement may name any capability, the worker's id too: workers whose capabilities differ
/// only in it are each judged with their own, memoised verdicts included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_requirement_on_worker_id_is_judged_with_each_workers_own_id() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let (w1, w2) = (caps("w-1", &["comfyui"]), caps("w-2", &["comfyui"]));
        // The second job finds both workers' verdicts memoised.
        for id in ["pinned", "pinned-again"] {
            let fields = [
                ("service_required", "comfyui"),
                ("requirements", r#"{"worker_id":"w-2"}"#),
            ];
            api_add(&mut conn, id, 9e15, &fields).await;
            assert!(b.claim(&w1).await.unwrap().is_none(), "w-1 is not the pinned worker");
            assert_eq!(b.claim(&w2).await.unwrap().map(|j| j.id).as_deref(), Some(id));
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn late_writes_after_cancel_or_lease_expiry_are_rejected() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let opts = BrokerOptions {
            lease: Duration::from_millis(300),
            ..BrokerOptions::default()
        };
        let b = broker_with(&server, opts).await;
        let mut conn = raw(&server).await;
        let c = caps("w1", &["simulation"]);

        // Cancelled while running: complete is rejected, the job stays cancelled.
        let id = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = b.claim(&c).await.unwrap().expect("claimable");
        assert_eq!(job.id, id);
        b.start(&job).await.unwrap();
        b.cancel(&id).await.unwrap();
        assert!(matches!(
            b.complete(&job, &json!(1)).await,
            Err(BrokerError::Cancelled { .. })
        ));
        assert!(matches!(
            b.progress(&job, 5.0, "x", None).await,
            Err(BrokerError::Cancelled { .. })
        ));
        let h = hgetall(&mut conn, &format!("job:{id}")).await;
        assert_eq!(h["status"], "failed");
        assert_eq!(h["error"], "Job cancelled by user");

        // Lease expired and re-queued: the late complete is rejected, the new holder's is not.
        let id = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = b.claim(&c).await.unwrap().expect("claimable");
        tokio::time::sleep(Duration::from_millis(400)).await;
        let r = b.reap_expired_leases().await.unwrap();
        assert_eq!(r.requeued, 1);
        assert!(matches!(
            b.complete(&job, &json!(1)).await,
            Err(BrokerError::LeaseLost { .. })
        ));
        assert_eq!(b.renew_lease(&job).await.unwrap(), LeaseStatus::Lost);
        let other = b.claim(&caps("w2", &["simulation"])).await.unwrap().expect("re-queued");
        assert_eq!(other.id, id);
        assert_eq!(other.retry_count(), 1);
        assert_eq!(b.renew_lease(&other).await.unwrap(), LeaseStatus::Held);
        b.complete(&other, &json!(2)).await.unwrap();
        assert!(matches!(
            b.complete(&job, &json!(1)).await,
            Err(BrokerError::LeaseLost { .. })
        ));
        assert_eq!(hgetall(&mut conn, &format!("job:{id}")).await["worker_id"], "w2");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retried_and_returned_jobs_keep_their_place_and_skip_the_failed_worker() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker_with(&server, no_retry_delay()).await;
        let mut conn = raw(&server).await;
        // Scores near 5e16 are spaced 8 apart (the contract's formula in doubles), so "older"
        // must be seconds older: a workflow that started a minute ago.
        let mut first = NewJob::new("simulation", json!({}));
        first.workflow_id = "wf".to_owned();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64;
        first.workflow_datetime = Some(now - 60_000);
        let old = b.submit(&first).await.unwrap();
        let score: f64 = redis::cmd("ZSCORE")
            .arg("jobs:pending")
            .arg(&old)
            .query_async(&mut conn)
            .await
            .unwrap();
        let newer = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let w1 = caps("w1", &["simulation"]);
        let w2 = caps("w2", &["simulation"]);
        let job = b.claim(&w1).await.unwrap().unwrap();
        assert_eq!(job.id, old, "the older job first");
        assert_eq!(b.fail(&job, "flaky", true).await.unwrap(), Failure::Retried);
        let again: f64 = redis::cmd("ZSCORE")
            .arg("jobs:pending")
            .arg(&old)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(again, score, "a retried job keeps its score");
        let h = hgetall(&mut conn, &format!("job:{old}")).await;
        assert_eq!((h["status"].as_str(), h["worker_id"].as_str()), ("pending", ""));
        assert_eq!(h["last_failed_worker"], "w1");
        assert_eq!(h["retry_count"], "1");
        // w1 just failed it: it gets the newer job, w2 gets the retried one first in line.
        assert_eq!(b.claim(&w1).await.unwrap().unwrap().id, newer);
        let retried = b.claim(&w2).await.unwrap().unwrap();
        assert_eq!(retried.id, old);
        // A graceful return keeps score and retry count.
        b.return_job(&retried).await.unwrap();
        let back: f64 = redis::cmd("ZSCORE")
            .arg("jobs:pending")
            .arg(&old)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(back, score);
        assert_eq!(hgetall(&mut conn, &format!("job:{old}")).await["retry_count"], "1");
        assert_eq!(b.claim(&w2).await.unwrap().unwrap().id, old);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigkilled_claimer_loses_no_job() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let id = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let score: f64 = redis::cmd("ZSCORE")
            .arg("jobs:pending")
            .arg(&id)
            .query_async(&mut conn)
            .await
            .unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_machine"))
            .args([
                "jobs",
                "claim",
                "--service",
                "simulation",
                "--worker",
                "doomed",
                "--lease-secs",
                "2",
            ])
            .arg("--redis-url")
            .arg(server.url())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn machine");
        let stdout = child.stdout.take().unwrap();
        let line = tokio::task::spawn_blocking(move || {
            let mut line = String::new();
            std::io::BufRead::read_line(&mut std::io::BufReader::new(stdout), &mut line).map(|_| line)
        })
        .await
        .unwrap()
        .unwrap();
        assert_eq!(line.trim(), id, "the child claimed the job");
        assert_eq!(hgetall(&mut conn, &format!("job:{id}")).await["worker_id"], "doomed");
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        )
        .unwrap();
        let _ = child.wait();
        // Before the lease runs out the job is still held.
        assert_eq!(b.reap_expired_leases().await.unwrap().requeued, 0);
        tokio::time::sleep(Duration::from_millis(2300)).await;
        assert_eq!(b.reap_expired_leases().await.unwrap().requeued, 1);
        let h = hgetall(&mut conn, &format!("job:{id}")).await;
        assert_eq!(h["status"], "pending");
        assert_eq!(h["retry_count"], "1");
        let back: f64 = redis::cmd("ZSCORE")
            .arg("jobs:pending")
            .arg(&id)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(back, score);
        assert_eq!(hgetall(&mut conn, "worker:doomed").await["status"], "idle");
        assert_eq!(b.claim(&caps("w", &["simulation"])).await.unwrap().unwrap().id, id);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_claimers_never_share_a_job() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        bulk_load(&mut conn, "c-", 3000, "simulation", "", 50).await;
        b.catch_up_index().await.unwrap();
        let mut tasks = Vec::new();
        for w in 0..64 {
            let b = b.clone();
            tasks.push(tokio::spawn(async move {
                let c = caps(&format!("w{w}"), &["simulation"]);
                let mut got = Vec::new();
                while let Some(job) = b.claim(&c).await.unwrap() {
                    b.complete(&job, &Value::Null).await.unwrap();
                    got.push(job.id);
                }
                got
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap());
        }
        let unique: HashSet<&String> = all.iter().collect();
        assert_eq!(all.len(), 3000, "every job claimed");
        assert_eq!(unique.len(), 3000, "no job claimed twice");
    })
    .await;
}

/// Requirements are checked when the job is indexed; the payload by the worker that claims it
/// (the library does not decode payloads), which ends it as unworkable and claims on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_requirements_or_payload_make_the_job_unworkable() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        api_add(
            &mut conn,
            "bad-reqs",
            30.0,
            &[("service_required", "simulation"), ("requirements", "{\"hardware\":")],
        )
        .await;
        api_add(
            &mut conn,
            "bad-list",
            25.0,
            &[("service_required", "simulation"), ("requirements", "[\"gpu\"]")],
        )
        .await;
        api_add(
            &mut conn,
            "bad-payload",
            20.0,
            &[("service_required", "simulation"), ("payload", "{not json")],
        )
        .await;
        api_add(
            &mut conn,
            "good",
            10.0,
            &[("service_required", "simulation"), ("payload", "{}")],
        )
        .await;
        let got = b
            .claim(&caps("w", &["simulation"]))
            .await
            .unwrap()
            .expect("the good job");
        assert_eq!(got.id, "good");
        for (id, reason) in [
            ("bad-reqs", "malformed requirements JSON"),
            ("bad-list", "malformed requirements JSON"),
            ("bad-payload", "malformed payload JSON"),
        ] {
            let h = hgetall(&mut conn, &format!("job:{id}")).await;
            assert_eq!(h["status"], "unworkable", "{id}");
            // The payload's reason goes on with serde's own words: where the JSON breaks.
            assert!(
                h["error"] == reason || h["error"].starts_with(&format!("{reason}: ")),
                "{id}: {h:?}"
            );
            // Not an attempt: the job never ran.
            assert_eq!(h.get("retry_count").map(String::as_str), Some("0"), "{id}");
            let s: Option<f64> = redis::cmd("ZSCORE")
                .arg("jobs:pending")
                .arg(id)
                .query_async(&mut conn)
                .await
                .unwrap();
            assert!(s.is_none(), "{id} left jobs:pending");
        }
        // Malformed capabilities are the caller's bug: a typed error, and the server lives on.
        let r: redis::RedisResult<Option<String>> = redis::cmd("FCALL")
            .arg("findMatchingJob")
            .arg(0)
            .arg("{nope")
            .arg(10)
            .query_async(&mut conn)
            .await;
        assert!(r.is_err());
        assert!(b.claim(&caps("w", &["simulation"])).await.unwrap().is_none());
    })
    .await;
}

/// Waits until the machine's event connection listens on `job_submitted`.
async fn wait_for_subscriber(server: &RedisServer) {
    let mut conn = raw(server).await;
    for _ in 0..500 {
        let (_, n): (String, i64) = redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg("job_submitted")
            .query_async(&mut conn)
            .await
            .unwrap();
        if n > 0 {
            // The catch-up pass runs right after subscribing; give it a moment to finish.
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the event connection never subscribed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_waiters_wake_on_submission_and_requeue() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let shutdown = CancellationToken::new();
        let events = tokio::spawn({
            let b = b.clone();
            let s = shutdown.clone();
            async move { b.run_events(s).await }
        });
        wait_for_subscriber(&server).await;
        let waiter = tokio::spawn({
            let b = b.clone();
            let s = shutdown.clone();
            async move { b.claim_next(&caps("w", &["simulation"]), &s).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        // The API's way: jobs:pending and the hash, then job_submitted; no index call.
        let submitted = Instant::now();
        let id = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = waiter.await.unwrap().unwrap().expect("woken with the job");
        let latency = submitted.elapsed();
        assert_eq!(job.id, id);
        assert!(
            latency < Duration::from_secs(1),
            "woken after {latency:?}, not by the 5 s poll"
        );
        // A return wakes a waiter too.
        let waiter = tokio::spawn({
            let b = b.clone();
            let s = shutdown.clone();
            async move { b.claim_next(&caps("w2", &["simulation"]), &s).await }
        });
        tokio::time::sleep(Duration::from_millis(200)).await;
        let returned = Instant::now();
        b.return_job(&job).await.unwrap();
        let again = waiter.await.unwrap().unwrap().expect("woken by the requeue");
        assert_eq!(again.id, id);
        assert!(returned.elapsed() < Duration::from_secs(1));
        // Cancellation notices reach subscribers.
        let mut cancels = b.cancellations();
        b.cancel(&id).await.unwrap();
        let seen = tokio::time::timeout(Duration::from_secs(5), cancels.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(seen, id);
        // Shutdown ends a waiting claim with None.
        let waiter = tokio::spawn({
            let b = b.clone();
            let s = shutdown.clone();
            async move { b.claim_next(&caps("w3", &["simulation"]), &s).await }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        shutdown.cancel();
        assert!(waiter.await.unwrap().unwrap().is_none());
        events.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_library_loads_once_recovers_and_runs_through_evalsha() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let u = url(&server);
        // Many machines starting at once.
        let mut tasks = Vec::new();
        for _ in 0..8 {
            let u = u.clone();
            tasks.push(tokio::spawn(async move {
                let b = Broker::connect(&u, BrokerOptions::default()).await.unwrap();
                b.ensure_functions().await.unwrap()
            }));
        }
        for t in tasks {
            let r = t.await.unwrap();
            assert_eq!(r.version, library::Library::new().version());
        }
        let b = broker(&server).await;
        let again = b.ensure_functions().await.unwrap();
        assert!(!again.loaded, "an equal version is not loaded again");
        assert_eq!(again.previous.as_deref(), Some(library::Library::new().version()));
        let mut conn = b.connection();
        let names: Vec<String> = library::list(&mut conn)
            .await
            .unwrap()
            .into_iter()
            .map(|f| f.name)
            .collect();
        assert!(names.contains(&"findMatchingJob".to_owned()));

        // A flushed library is loaded again by the next call instead of idling silently.
        let mut raw_conn = raw(&server).await;
        let _: () = redis::cmd("FUNCTION")
            .arg("FLUSH")
            .query_async(&mut raw_conn)
            .await
            .unwrap();
        let id = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        assert_eq!(b.claim(&caps("w", &["simulation"])).await.unwrap().unwrap().id, id);

        // The script path used on Redis < 7 runs the same Lua.
        b.use_eval_mode().await.unwrap();
        let id = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = b.claim(&caps("w", &["simulation"])).await.unwrap().unwrap();
        assert_eq!(job.id, id);
        b.complete(&job, &json!({"ok": true})).await.unwrap();
        let _: () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut raw_conn)
            .await
            .unwrap();
        assert!(
            b.claim(&caps("w", &["simulation"])).await.unwrap().is_none(),
            "NOSCRIPT reloads the script"
        );
    })
    .await;
}

fn machine(server: &RedisServer, args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_machine"))
        .args(args)
        .env("HUB_REDIS_URL", server.url())
        .output()
        .expect("run machine")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operator_commands() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let out = machine(&server, &["functions", "install"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let out = machine(&server, &["functions", "list"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(text.contains("findMatchingJob") && text.contains("(current)"), "{text}");
        let out = machine(&server, &["functions", "test"]);
        assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut conn = raw(&server).await;
        let left: Vec<String> = redis::cmd("KEYS")
            .arg("machine-selftest:*")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(left.is_empty(), "self-test left {left:?}");

        let out = machine(
            &server,
            &[
                "jobs",
                "submit",
                "--service",
                "simulation",
                "--payload",
                r#"{"steps":3}"#,
                "--priority",
                "60",
                "--customer",
                "c1",
                "--requirements",
                r#"{"hardware":{"gpu_memory_gb":8}}"#,
            ],
        );
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let h = hgetall(&mut conn, &format!("job:{id}")).await;
        assert_eq!(h["priority"], "60");
        assert_eq!(h["customer_id"], "c1");
        assert_eq!(h["payload"], r#"{"steps":3}"#);
        let out = machine(&server, &["jobs", "show", &id]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("simulation"));
        let out = machine(&server, &["jobs", "list", "--status", "pending"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains(&id));
        let out = machine(&server, &["jobs", "list", "--status", "completed"]);
        assert!(!String::from_utf8_lossy(&out.stdout).contains(&id));
        let out = machine(&server, &["jobs", "cancel", &id]);
        assert!(out.status.success());
        assert_eq!(
            hgetall(&mut conn, &format!("job:{id}")).await["error"],
            "Job cancelled by user"
        );
        let out = machine(&server, &["jobs", "cancel", &id]);
        assert!(!out.status.success(), "a finished job cannot be cancelled again");
        let out = machine(
            &server,
            &["jobs", "submit", "--service", "simulation", "--requirements", "{oops"],
        );
        assert_eq!(out.status.code(), Some(2));
        let out = machine(&server, &["functions", "delete"]);
        assert!(out.status.success());
        let out = machine(&server, &["functions", "list"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("not loaded"));
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// What the real API and monitor write, a mixed fleet, retries, exact order (issue 10)
// ---------------------------------------------------------------------------------------------

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

/// Writes a job exactly as the API does: the hash with `priority` and `created_at` (ISO, ms),
/// `jobs:pending` with the contract's score, and `job_submitted` when `publish`. Later fields
/// override the defaults.
async fn api_submit(
    conn: &mut MultiplexedConnection,
    id: &str,
    created_ms: i64,
    fields: &[(&str, &str)],
    publish: bool,
) {
    let created_at =
        humantime::format_rfc3339_millis(std::time::UNIX_EPOCH + Duration::from_millis(created_ms as u64)).to_string();
    let mut all: Vec<(&str, &str)> = vec![
        ("id", id),
        ("status", "pending"),
        ("retry_count", "0"),
        ("max_retries", "3"),
        ("priority", "50"),
        ("payload", "{}"),
        ("customer_id", ""),
        ("workflow_id", ""),
        ("requirements", ""),
        ("service_required", "comfyui"),
        ("created_at", &created_at),
    ];
    all.extend_from_slice(fields);
    let get = |k: &str| {
        all.iter()
            .rev()
            .find(|(f, _)| *f == k)
            .map(|(_, v)| *v)
            .unwrap_or_default()
    };
    let priority: i64 = get("priority").parse().unwrap();
    let workflow_priority = get("workflow_priority").parse().ok();
    let workflow_ms = get("workflow_datetime").parse().ok();
    let score = machine::broker::pending_score(priority, workflow_priority, created_ms, workflow_ms);
    let message = json!({
        "job_id": id, "service_required": get("service_required"), "priority": priority,
        "requirements": get("requirements"), "customer_id": "", "workflow_id": "", "timestamp": created_ms,
    });
    let mut pipe = redis::pipe();
    pipe.zadd("jobs:pending", id, score)
        .ignore()
        .hset_multiple(format!("job:{id}"), &all)
        .ignore();
    if publish {
        pipe.publish("job_submitted", message.to_string()).ignore();
    }
    let _: () = pipe.query_async(conn).await.expect("API-style submission");
}

/// Claims with `w` until nothing is left, completing each job; the ids in claim order.
async fn drain(b: &Broker, w: &Capabilities) -> Vec<String> {
    let mut out = Vec::new();
    while let Some(job) = b.claim(w).await.unwrap() {
        b.complete(&job, &Value::Null).await.unwrap();
        out.push(job.id);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirement_shapes_of_the_api_and_monitor_match() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let t = now_ms() - 60_000;
        let jobs = [
            ("empty-list", "[]"),
            ("one-model-string", r#"{"positive_requirements":{"models":"sdxl"}}"#),
            (
                "models-by-service",
                r#"{"models":{"comfyui":["sdxl"],"a1111":["other"]}}"#,
            ),
            ("gpu-substring", r#"{"hardware":{"gpu_model":"A100"}}"#),
            (
                "number-as-string",
                r#"{"hardware":{"gpu_memory_gb":"16","ram_gb":"32.5"}}"#,
            ),
            ("needs-flux", r#"{"models":{"comfyui":["flux"]}}"#),
            ("needs-4090", r#"{"hardware":{"gpu_model":"4090"}}"#),
        ];
        for (i, (id, reqs)) in jobs.iter().enumerate() {
            api_submit(
                &mut conn,
                id,
                t + i as i64 * 1000,
                &[("requirements", reqs)],
                i % 2 == 0,
            )
            .await;
        }
        let mut a100 = caps("a100", &["comfyui"]);
        a100.hardware.gpu_model = "NVIDIA A100-SXM4-80GB".to_owned();
        a100.hardware.gpu_memory_gb = 80.0;
        a100.hardware.ram_gb = 64.0;
        a100.models.insert("comfyui".to_owned(), vec!["sdxl".to_owned()]);
        assert_eq!(
            drain(&b, &a100).await,
            [
                "empty-list",
                "one-model-string",
                "models-by-service",
                "gpu-substring",
                "number-as-string"
            ]
        );
        let mut rtx = caps("rtx", &["comfyui"]);
        rtx.hardware.gpu_model = "NVIDIA GeForce RTX 4090".to_owned();
        assert_eq!(drain(&b, &rtx).await, ["needs-4090"]);
        let h = hgetall(&mut conn, "job:needs-flux").await;
        assert_eq!(h["status"], "pending", "a worker with flux may come");
    })
    .await;
}

/// The API scores with JS `||`: a workflow priority or datetime of 0 falls back to the job's
/// own priority / `created_at`, while the hash keeps `"0"`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_workflow_priority_or_datetime_of_zero_is_scored_as_the_api_scores_it() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let t = now_ms() - 60_000;
        for indexed in [true, false] {
            api_submit(
                &mut conn,
                "wfp0",
                t,
                &[("workflow_id", "wf-a"), ("workflow_priority", "0")],
                indexed,
            )
            .await;
            api_submit(&mut conn, "plain", t + 1000, &[], indexed).await;
            api_submit(
                &mut conn,
                "wfd0",
                t + 2000,
                &[("workflow_id", "wf-b"), ("workflow_datetime", "0")],
                indexed,
            )
            .await;
            if indexed {
                for id in ["wfp0", "plain", "wfd0"] {
                    b.index_job(id).await.unwrap();
                }
            }
            assert_eq!(
                hgetall(&mut conn, "job:wfp0").await["workflow_priority"],
                "0",
                "the hash keeps 0"
            );
            assert_eq!(
                drain(&b, &caps("w", &["comfyui"])).await,
                ["wfp0", "plain", "wfd0"],
                "indexed on the message: {indexed}"
            );
        }
    })
    .await;
}

/// The monitor's form turns a typed `4090` into a number; it is compared as its decimal text.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gpu_model_given_as_a_number_is_compared_as_its_decimal_text() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let t = now_ms() - 60_000;
        let jobs = [
            ("number", r#"{"hardware":{"gpu_model":4090}}"#),
            ("in-a-list", r#"{"hardware":{"gpu_model":["A100",4090]}}"#),
            ("dotted", r#"{"hardware.gpu_model":4090}"#),
            (
                "not-3090",
                r#"{"negative_requirements":{"hardware":{"gpu_model":3090}}}"#,
            ),
            ("other-number", r#"{"hardware":{"gpu_model":3090}}"#),
        ];
        for (i, (id, reqs)) in jobs.iter().enumerate() {
            api_submit(&mut conn, id, t + i as i64 * 1000, &[("requirements", reqs)], false).await;
        }
        let mut rtx = caps("rtx", &["comfyui"]);
        rtx.hardware.gpu_model = "NVIDIA GeForce RTX 4090".to_owned();
        assert_eq!(drain(&b, &rtx).await, ["number", "in-a-list", "dotted", "not-3090"]);
        let h = hgetall(&mut conn, "job:other-number").await;
        assert_eq!(h["status"], "pending", "not unworkable: a 3090 may come; {h:?}");
    })
    .await;
}

/// `job_claimed` carries the step fields only when the job has them, as the original's
/// `cjson.encode` of a missing field leaves the key out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn job_claimed_leaves_out_step_fields_the_job_lacks() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let mut pubsub = subscribed(&server.url(), "job_claimed").await;
        let t = now_ms() - 60_000;
        api_submit(&mut conn, "no-steps", t, &[], false).await;
        api_submit(
            &mut conn,
            "steps",
            t + 1000,
            &[("step_number", "2"), ("total_steps", "3")],
            false,
        )
        .await;
        let w = caps("w", &["comfyui"]);
        assert_eq!(drain(&b, &w).await, ["no-steps", "steps"]);
        let msgs = collect(&mut pubsub, 2).await;
        let plain = &msgs[0].1;
        assert_eq!(plain["job_id"], "no-steps");
        assert!(
            plain.get("step_number").is_none() && plain.get("total_steps").is_none(),
            "{plain}"
        );
        has_keys(plain, &["service_required", "customer_id", "workflow_id"]);
        let steps = &msgs[1].1;
        assert_eq!(
            (steps["step_number"].as_str(), steps["total_steps"].as_str()),
            (Some("2"), Some("3")),
            "{steps}"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requirements_that_can_never_compare_fail_with_the_reason_and_show_says_why_a_job_waits() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let t = now_ms() - 60_000;
        let bad = [
            ("hw-null", r#"{"hardware":null}"#, "requirements.hardware is null"),
            (
                "list-for-number",
                r#"{"hardware":{"gpu_memory_gb":[16]}}"#,
                r#"hardware.gpu_memory_gb must be a number or "all""#,
            ),
            (
                "models-number",
                r#"{"models":5}"#,
                r#"models must be a list of names, a name, "all" or an object by service"#,
            ),
            (
                "neg-null",
                r#"{"negative_requirements":{"region":null}}"#,
                "negative_requirements.region is null",
            ),
        ];
        for (i, (id, reqs, _)) in bad.iter().enumerate() {
            api_submit(&mut conn, id, t + i as i64, &[("requirements", reqs)], false).await;
        }
        api_submit(
            &mut conn,
            "huge",
            t + 10,
            &[("requirements", r#"{"hardware":{"gpu_memory_gb":1e999}}"#)],
            false,
        )
        .await;
        api_submit(
            &mut conn,
            "nobody",
            t + 11,
            &[("service_required", "nobody_has_it")],
            false,
        )
        .await;
        let w = caps("w", &["comfyui"]);
        b.register_worker(&w).await.unwrap();
        assert!(b.claim(&w).await.unwrap().is_none());
        for (id, _, reason) in bad {
            let h = hgetall(&mut conn, &format!("job:{id}")).await;
            assert_eq!(h["status"], "unworkable", "{id}");
            assert_eq!(h["error"], reason, "{id}");
        }
        let h = hgetall(&mut conn, "job:huge").await;
        assert_eq!(h["status"], "unworkable");
        assert!(!h["error"].is_empty());
        // A service no machine registered: the job waits, and `jobs show` says why.
        let view = b.show("nobody").await.unwrap().unwrap();
        assert_eq!(view.job.state().name(), "pending");
        let why = view.waiting.expect("a waiting job says why");
        assert!(why.contains("no machine offers service `nobody_has_it`"), "{why}");
        let out = machine(&server, &["jobs", "show", "nobody"]);
        assert!(String::from_utf8_lossy(&out.stdout).contains("no machine offers service"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_resubmitted_under_the_same_id_is_matched_on_its_hash_now() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let t = now_ms() - 5_000;
        api_submit(&mut conn, "msg-1", t, &[("service_required", "comfyui")], true).await;
        b.index_job("msg-1").await.unwrap();
        // The client sends the same message id again with another service; the API rewrites
        // the hash and the score.
        api_submit(&mut conn, "msg-1", t, &[("service_required", "a1111")], true).await;
        assert!(b.claim(&caps("comfy", &["comfyui"])).await.unwrap().is_none());
        let got = b
            .claim(&caps("a1111", &["a1111"]))
            .await
            .unwrap()
            .expect("the a1111 worker");
        assert_eq!(got.id, "msg-1");
        assert_eq!(got.service, "a1111");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_jobs_one_second_apart_are_claimed_oldest_first_to_the_millisecond() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let shutdown = CancellationToken::new();
        let events = tokio::spawn({
            let b = b.clone();
            let s = shutdown.clone();
            async move { b.run_events(s).await }
        });
        wait_for_subscriber(&server).await;
        let t = now_ms() - 60_000;
        let mut want = Vec::new();
        for i in 0..20 {
            let id = format!("fifo-{i:02}");
            api_submit(&mut conn, &id, t + i * 1000, &[], true).await;
            want.push(id);
        }
        // Two more in the last second, 1 ms apart, and two in the same millisecond (submission
        // order decides).
        for (id, ms) in [
            ("ms-a", 19_001),
            ("ms-b", 19_002),
            ("same-1", 19_003),
            ("same-2", 19_003),
        ] {
            api_submit(&mut conn, id, t + ms, &[], true).await;
            want.push(id.to_owned());
        }
        // The machine indexes on job_submitted; wait until it has seen every message.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let n: usize = redis::cmd("HLEN")
                .arg("jobs:idx:job")
                .query_async(&mut conn)
                .await
                .unwrap();
            if n == want.len() || Instant::now() > deadline {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(drain(&b, &caps("w", &["comfyui"])).await, want);
        shutdown.cancel();
        events.await.unwrap().unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_queued_without_a_message_are_claimed_next_in_order() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let t = now_ms() - 600_000;
        // 300 jobs 1 s and a few ms apart, written in a scrambled order; a third were indexed
        // (job_submitted seen), the rest the API re-queued or queued while no machine listened.
        let mut order: Vec<i64> = (0..300).collect();
        order.sort_by_key(|i| (i * 7919) % 300);
        for i in &order {
            let id = format!("q-{i:03}");
            api_submit(&mut conn, &id, t + i * 1000 + i % 7, &[], false).await;
            if i % 3 == 0 {
                b.index_job(&id).await.unwrap();
            }
        }
        let want: Vec<String> = (0..300).map(|i| format!("q-{i:03}")).collect();
        assert_eq!(drain(&b, &caps("w", &["comfyui"])).await, want);
    })
    .await;
}

/// A time limit of 0 or less is a mistake, not "no limit": the job fails naming the field
/// (`hardware: "all"` still means no constraint).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_with_a_time_limit_of_zero_or_less_fails_naming_the_field() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let t = now_ms() - 60_000;
        let jobs: [(&str, &str, &str, Option<&str>); 5] = [
            (
                "zero-seconds",
                r#"{"timeout_seconds":0}"#,
                "",
                Some("payload.timeout_seconds"),
            ),
            (
                "minus-one",
                r#"{"timeout_seconds":-1}"#,
                "",
                Some("payload.timeout_seconds"),
            ),
            (
                "minus-five-minutes",
                "{}",
                r#"{"timeout_minutes":-5}"#,
                Some("requirements.timeout_minutes"),
            ),
            (
                "fine",
                r#"{"timeout_seconds":30}"#,
                r#"{"hardware":"all","timeout_minutes":3}"#,
                None,
            ),
            ("fine-as-text", r#"{"timeout_seconds":"30"}"#, "", None),
        ];
        for (i, (id, payload, reqs, _)) in jobs.iter().enumerate() {
            api_submit(
                &mut conn,
                id,
                t + i as i64 * 1000,
                &[("payload", payload), ("requirements", reqs)],
                i % 2 == 0,
            )
            .await;
        }
        assert_eq!(drain(&b, &caps("w", &["comfyui"])).await, ["fine", "fine-as-text"]);
        for (id, _, _, field) in jobs {
            let Some(field) = field else { continue };
            let h = hgetall(&mut conn, &format!("job:{id}")).await;
            assert_eq!(h["status"], "unworkable", "{id}: {h:?}");
            assert!(h["error"].contains(field), "{id}: {}", h["error"]);
        }
    })
    .await;
}

/// `machine jobs submit` for a service no machine has ever registered (a typo) warns, and
/// `machine jobs show` says no machine offers it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_for_a_service_no_machine_ever_offered_is_called_out() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        b.register_worker(&caps("w", &["simulation"])).await.unwrap();
        let out = machine(&server, &["jobs", "submit", "--service", "simulation"]);
        assert!(out.status.success(), "{out:?}");
        assert!(!String::from_utf8_lossy(&out.stderr).contains("warning"), "{out:?}");
        let out = machine(&server, &["jobs", "submit", "--service", "simulaton"]);
        assert!(out.status.success(), "{out:?}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("warning") && stderr.contains("`simulaton`") && stderr.contains("simulation"),
            "{stderr}"
        );
        let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        let show = machine(&server, &["jobs", "show", &id]);
        let text = String::from_utf8_lossy(&show.stdout);
        assert!(text.contains("no machine offers service `simulaton`"), "{text}");
    })
    .await;
}

/// One claim as an original worker makes it: the contract's two arguments only.
async fn original_claim(conn: &mut MultiplexedConnection, caps_json: &str) -> Option<String> {
    let reply: Option<String> = redis::cmd("FCALL")
        .arg("findMatchingJob")
        .arg(0)
        .arg(caps_json)
        .arg(100)
        .query_async(conn)
        .await
        .unwrap();
    reply.map(|r| {
        let doc: Value = serde_json::from_str(&r).unwrap();
        doc["jobId"].as_str().unwrap().to_owned()
    })
}

async fn pending_count(conn: &mut MultiplexedConnection) -> usize {
    redis::cmd("ZCARD").arg("jobs:pending").query_async(conn).await.unwrap()
}

/// With only original workers claiming and no machine of ours subscribed, nothing indexes the
/// jobs but the claims themselves; the order must hold all the same, and no claim may come back
/// empty while a job waits. The ids sort otherwise than their times, and jobs of one second tie
/// in `jobs:pending` (doubles near 5e16 are 8 apart).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn original_workers_alone_claim_in_order_and_never_empty_while_jobs_wait() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let _b = broker(&server).await;
        let mut conn = raw(&server).await;
        let caps_json = caps("orig", &["comfyui"]).to_json();
        let id = |round: i64, i: i64| format!("{:04x}-{round}-{i:03}", (i * 7919 + 13) % 65521);

        // Queued first, 7 ms apart, then claimed.
        let t = now_ms() - 60_000;
        for i in 0..100 {
            api_submit(&mut conn, &id(0, i), t + i * 7, &[], true).await;
        }
        let mut got = Vec::new();
        while got.len() < 100 {
            let waiting = pending_count(&mut conn).await;
            match original_claim(&mut conn, &caps_json).await {
                Some(job) => got.push(job),
                None => panic!("an empty reply while {waiting} jobs wait, after {got:?}"),
            }
        }
        assert_eq!(got, (0..100).map(|i| id(0, i)).collect::<Vec<_>>());

        // Queued 7 ms apart while a slower original worker claims.
        let submitter = tokio::spawn({
            let mut conn = raw(&server).await;
            async move {
                for i in 0..100 {
                    api_submit(&mut conn, &id(1, i), now_ms(), &[], true).await;
                    tokio::time::sleep(Duration::from_millis(7)).await;
                }
            }
        });
        let mut got = Vec::new();
        let mut empty_while_waiting = 0;
        while got.len() < 100 {
            // A job being written may be in jobs:pending before its hash: count an empty reply
            // only when another job waits too.
            let waiting = pending_count(&mut conn).await;
            match original_claim(&mut conn, &caps_json).await {
                Some(job) => {
                    got.push(job);
                    tokio::time::sleep(Duration::from_millis(12)).await;
                }
                None => {
                    if waiting >= 2 {
                        empty_while_waiting += 1;
                    }
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
        }
        submitter.await.unwrap();
        assert_eq!(got, (0..100).map(|i| id(1, i)).collect::<Vec<_>>());
        assert_eq!(empty_while_waiting, 0, "empty replies while jobs waited");
    })
    .await;
}

/// The API re-submits a pending id at a new priority (its hash and its `jobs:pending` score)
/// and the machine misses the message: the fleet's sweeper finds the new score, and the job
/// takes its new place.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pending_job_resubmitted_at_a_new_priority_without_a_message_takes_its_new_place() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let t = now_ms() - 60_000;
        for (i, id) in ["a", "b", "c"].iter().enumerate() {
            api_submit(&mut conn, id, t + i as i64 * 1000, &[], true).await;
            b.index_job(id).await.unwrap();
        }
        api_submit(&mut conn, "c", t + 2000, &[("priority", "90")], false).await;
        api_submit(&mut conn, "a", t, &[("priority", "10")], false).await;
        let swept = b
            .sweep_pending()
            .await
            .unwrap()
            .expect("the only machine holds the sweeper lease");
        assert_eq!(swept.found, 2, "{swept:?}");
        assert_eq!(drain(&b, &caps("w", &["comfyui"])).await, ["c", "b", "a"]);
    })
    .await;
}

/// The original worker's retry and the API's delete-machine clean-up put a job back into
/// `jobs:pending` without any message, at a score near 9.0e15 (the original's formula), deep
/// behind every job of priority 10 and up. An idle worker gets it within 10 s whatever the
/// depth; one sweeper for the fleet finds it (three machines run here, one sweeps).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_put_back_deep_without_a_message_is_claimed_within_ten_seconds() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let mut conn = raw(&server).await;
        bulk_load(
            &mut conn,
            "blocked-",
            20_000,
            "comfyui",
            r#"{"hardware":{"gpu_memory_gb":80}}"#,
            90,
        )
        .await;
        let shutdown = CancellationToken::new();
        let mut machines = Vec::new();
        for _ in 0..3 {
            let b = broker(&server).await;
            let s = shutdown.clone();
            let run = tokio::spawn({
                let b = b.clone();
                async move { b.run(Duration::from_secs(5), s).await }
            });
            machines.push((b, run));
        }
        let b = machines[0].0.clone();
        let w = caps("w", &["comfyui"]);
        let claimer = tokio::spawn({
            let (b, s) = (b.clone(), shutdown.clone());
            async move { b.claim_next(&w, &s).await }
        });
        wait_for_subscriber(&server).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(!claimer.is_finished(), "nothing runnable yet");
        // The original worker's retry: the hash back to pending, the original's score.
        let created = now_ms() - 600_000;
        api_submit(&mut conn, "put-back", created, &[("retry_count", "1")], false).await;
        let original_score = 50.0 * 1e6 + (9_007_199_254_740_991.0 - created as f64);
        let _: () = redis::cmd("ZADD")
            .arg("jobs:pending")
            .arg(original_score)
            .arg("put-back")
            .query_async(&mut conn)
            .await
            .unwrap();
        let put_back = Instant::now();
        let job = tokio::time::timeout(Duration::from_secs(10), claimer)
            .await
            .expect("claimed within 10 s")
            .unwrap()
            .unwrap()
            .expect("a job");
        assert_eq!(job.id, "put-back");
        eprintln!("claimed {:?} after it was put back", put_back.elapsed());
        shutdown.cancel();
        for (_, run) in machines {
            run.await.unwrap().unwrap();
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_in_a_job_field_fails_the_job_at_once_naming_the_field() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let t = now_ms() - 10_000;
        api_submit(&mut conn, "bad-bytes", t, &[], false).await;
        api_submit(&mut conn, "good", t + 1000, &[], false).await;
        let mut payload = br#"{"prompt":"caf"#.to_vec();
        payload.extend_from_slice(&[0xe9, 0xff]);
        payload.extend_from_slice(br#""}"#);
        let _: () = redis::cmd("HSET")
            .arg("job:bad-bytes")
            .arg("payload")
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
        let started = Instant::now();
        let got = b.claim(&caps("w", &["comfyui"])).await.unwrap().expect("the good job");
        assert_eq!(got.id, "good", "the worker went on to the next job");
        assert!(started.elapsed() < Duration::from_secs(5));
        // The hash keeps its bytes (nothing is lost); read the two fields that say what happened.
        let (status, error): (String, String) = redis::cmd("HMGET")
            .arg("job:bad-bytes")
            .arg("status")
            .arg("error")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(status, "failed");
        assert_eq!(error, "invalid UTF-8 in job field `payload`");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_original_workers_job_is_never_reaped_or_run_twice() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker_with(
            &server,
            BrokerOptions {
                lease: Duration::from_millis(300),
                ..BrokerOptions::default()
            },
        )
        .await;
        let mut conn = raw(&server).await;
        let t = now_ms() - 10_000;
        api_submit(&mut conn, "old-worker-job", t, &[], true).await;
        api_submit(&mut conn, "our-job", t + 1000, &[], true).await;
        // An original worker passes the contract's two arguments only.
        let old_caps = caps("old-worker", &["comfyui"]).to_json();
        let reply: Option<String> = redis::cmd("FCALL")
            .arg("findMatchingJob")
            .arg(0)
            .arg(&old_caps)
            .arg(100)
            .query_async(&mut conn)
            .await
            .unwrap();
        let reply: Value = serde_json::from_str(&reply.expect("the old worker claims")).unwrap();
        assert_eq!(reply["jobId"], "old-worker-job");
        let ours = b.claim(&caps("ours", &["comfyui"])).await.unwrap().unwrap();
        assert_eq!(ours.id, "our-job");
        // Both hold their job past the lease; our reaper runs.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let r = b.reap_expired_leases().await.unwrap();
        assert_eq!(r.requeued, 1, "only our worker's job had a lease");
        let h = hgetall(&mut conn, "job:old-worker-job").await;
        assert_eq!(
            (h["status"].as_str(), h["worker_id"].as_str()),
            ("assigned", "old-worker")
        );
        let again = b.claim(&caps("ours-2", &["comfyui"])).await.unwrap().unwrap();
        assert_eq!(again.id, "our-job", "the old worker's job is never handed out again");
        assert!(b.claim(&caps("ours-3", &["comfyui"])).await.unwrap().is_none());
        tokio::time::sleep(Duration::from_millis(700)).await;
        b.reap_expired_leases().await.unwrap();
        let h = hgetall(&mut conn, "job:old-worker-job").await;
        assert_eq!((h["status"].as_str(), h["retry_count"].as_str()), ("assigned", "0"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_waits_its_delay_goes_to_another_worker_and_keeps_its_place() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let delay = Duration::from_millis(1500);
        let b = broker_with(
            &server,
            BrokerOptions {
                retry_delay: RetryDelay {
                    initial: delay,
                    factor: 2.0,
                    max: Duration::from_secs(60),
                    jitter: 0.0,
                },
                failed_holdoff: Duration::from_secs(30),
                ..BrokerOptions::default()
            },
        )
        .await;
        let mut conn = raw(&server).await;
        let t = now_ms() - 60_000;
        api_submit(&mut conn, "flaky", t, &[("max_retries", "5")], true).await;
        let (w1, w2) = (caps("w1", &["comfyui"]), caps("w2", &["comfyui"]));
        let job = b.claim(&w1).await.unwrap().unwrap();
        let failed_at = Instant::now();
        assert_eq!(
            b.fail(&job, "bucket unavailable", true).await.unwrap(),
            Failure::Retried
        );
        // Pending for the API, but nobody claims it during the delay.
        let h = hgetall(&mut conn, "job:flaky").await;
        assert_eq!(h["status"], "pending");
        api_submit(&mut conn, "newer", t + 30_000, &[], true).await;
        assert_eq!(b.claim(&w2).await.unwrap().unwrap().id, "newer");
        assert!(b.claim(&w2).await.unwrap().is_none(), "still in its delay");
        assert!(
            failed_at.elapsed() < delay,
            "the machine was too slow to test the delay"
        );
        tokio::time::sleep(delay.saturating_sub(failed_at.elapsed()) + Duration::from_millis(200)).await;
        // Over: the failing worker is held off while another capable worker exists.
        assert!(b.claim(&w1).await.unwrap().is_none(), "w1 just failed it");
        let again = b.claim(&w2).await.unwrap().expect("another worker takes it");
        assert_eq!(again.id, "flaky");
        // The second retry waits twice as long.
        let second = Instant::now();
        assert_eq!(
            b.fail(&again, "bucket unavailable", true).await.unwrap(),
            Failure::Retried
        );
        tokio::time::sleep(delay + Duration::from_millis(200)).await;
        if second.elapsed() < delay * 2 {
            assert!(
                b.claim(&caps("w3", &["comfyui"])).await.unwrap().is_none(),
                "the second delay is longer"
            );
        }
        tokio::time::sleep((delay * 2).saturating_sub(second.elapsed()) + Duration::from_millis(200)).await;
        assert_eq!(b.claim(&caps("w3", &["comfyui"])).await.unwrap().unwrap().id, "flaky");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_completion_is_recognised_as_done() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = b.claim(&caps("w", &["simulation"])).await.unwrap().unwrap();
        b.complete(&job, &json!({"ok": 1})).await.unwrap();
        // The reply was lost (a Redis restart); the worker sends the completion again.
        b.complete(&job, &json!({"ok": 1}))
            .await
            .expect("already done, not lost");
        // Another worker's completion of a job it does not hold is still refused.
        let mut other = job.clone();
        other.worker_id = "intruder".to_owned();
        assert!(matches!(
            b.complete(&other, &Value::Null).await,
            Err(BrokerError::LeaseLost { .. })
        ));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_register_again_when_redis_comes_back_empty() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        let w = caps("w-reg", &["comfyui"]);
        b.register_worker(&w).await.unwrap();
        // Redis restarted without its data: no keys, no functions.
        let _: () = redis::cmd("FUNCTION")
            .arg("FLUSH")
            .query_async(&mut conn)
            .await
            .unwrap();
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
        assert!(b.claim(&w).await.unwrap().is_none());
        let h = hgetall(&mut conn, "worker:w-reg").await;
        assert_eq!(h.get("machine_id").map(String::as_str), Some("m1"), "{h:?}");
        assert!(h["capabilities"].contains("comfyui"));
        // Emptied with the library kept: the next heartbeat registers the worker again.
        let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
        b.heartbeat("w-reg").await.unwrap();
        let h = hgetall(&mut conn, "worker:w-reg").await;
        assert_eq!(h.get("status").map(String::as_str), Some("idle"), "{h:?}");
        assert!(h["capabilities"].contains("comfyui"));
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_starting_on_a_backlog_claims_it_in_order() {
    within(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server).await;
        let mut conn = raw(&server).await;
        // Queued while no machine listened: 20,000 jobs this worker cannot run ahead, then the
        // runnable ones one second apart.
        bulk_load(
            &mut conn,
            "blocked-",
            20_000,
            "comfyui",
            r#"{"hardware":{"gpu_memory_gb":80}}"#,
            90,
        )
        .await;
        let t = now_ms() - 100_000;
        for i in 0..40 {
            api_submit(&mut conn, &format!("r-{i:02}"), t + i * 1000, &[], false).await;
        }
        let shutdown = CancellationToken::new();
        let events = tokio::spawn({
            let b = b.clone();
            let s = shutdown.clone();
            async move { b.run_events(s).await }
        });
        wait_for_subscriber(&server).await;
        let w = caps("w", &["comfyui"]);
        let first = b.claim_next(&w, &shutdown).await.unwrap().expect("a job");
        assert_eq!(first.id, "r-00", "the very first claim takes the oldest runnable job");
        b.complete(&first, &Value::Null).await.unwrap();
        let want: Vec<String> = (1..40).map(|i| format!("r-{i:02}")).collect();
        assert_eq!(drain(&b, &w).await, want);
        shutdown.cancel();
        events.await.unwrap().unwrap();
    })
    .await;
}

mod differential {
    use proptest::prelude::*;
    use proptest::test_runner::{Config, TestRunner};

    use super::*;

    const SERVICES: [&str; 3] = ["comfyui", "a1111", "simulation"];
    const REQS: [&str; 28] = [
        "",
        "{}",
        r#"{"hardware":{"gpu_memory_gb":16}}"#,
        r#"{"hardware":{"gpu_memory_gb":32,"cpu_cores":"all"}}"#,
        r#"{"models":["sdxl"]}"#,
        r#"{"models":["sdxl","flux"]}"#,
        r#"{"models":"all"}"#,
        r#"{"customer_isolation":"strict"}"#,
        r#"{"supports_controlnet":true}"#,
        r#"{"max_batch_size":4}"#,
        r#"{"features":["upscale"]}"#,
        r#"{"region.zone":"eu","quality_level":"high"}"#,
        r#"{"positive_requirements":{"hardware":{"gpu_memory_gb":8}},"negative_requirements":{"hardware.gpu_model":"RTX 3090"}}"#,
        r#"{"negative_requirements":{"models":["sd15"]}}"#,
        r#"{"hardware":"#,
        r#"{"component":"x","timeout_minutes":3}"#,
        "[]",
        r#"{"positive_requirements":{"models":"sdxl"}}"#,
        r#"{"models":{"comfyui":["sdxl"],"a1111":"flux"}}"#,
        r#"{"hardware":{"gpu_model":"a100"}}"#,
        r#"{"hardware":{"gpu_model":["4090","H100"],"gpu_memory_gb":"16"}}"#,
        r#"{"negative_requirements":{"hardware":{"gpu_model":"RTX"}}}"#,
        r#"{"hardware":null}"#,
        r#"{"hardware":{"ram_gb":[8]}}"#,
        r#"{"max_batch_size":"3"}"#,
        r#"{"hardware":{"gpu_model":4090}}"#,
        r#"{"hardware":{"gpu_model":["A100",4090]}}"#,
        r#"{"negative_requirements":{"hardware":{"gpu_model":4090}}}"#,
    ];

    /// How a job reaches `jobs:pending` (issue 23's wire points 3-5).
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Queued {
        /// With the `job_submitted` message seen (indexed at once).
        Message,
        /// Without a message: the claims' own repair or the fleet's sweeper must find it.
        Silently,
        /// Put back without a message at the original's score (near 9.0e15), as an original
        /// worker's retry and the API's clean-ups do.
        PutBackDeep,
        /// Indexed, then re-submitted at the priority `new_priority` without a message.
        Resubmitted,
    }

    #[derive(Debug, Clone)]
    struct GenJob {
        service: usize,
        reqs: usize,
        priority: i64,
        customer: usize,
        workflow: usize,
        bad_payload: bool,
        queued: Queued,
        /// 0: no workflow scoring fields; 1: `workflow_priority` "0"; 2: `workflow_datetime` "0"
        /// (both fall back as the API's `||` does); 3: a workflow priority of its own.
        wf_scoring: u8,
        /// Seconds older than the newest; jobs of one second tie in `jobs:pending`.
        age_s: i64,
        new_priority: i64,
    }

    fn job() -> impl Strategy<Value = GenJob> {
        (
            (0..3usize, 0..REQS.len(), 0..5i64, 0..4usize, 0..3usize),
            prop::bool::weighted(0.05),
            prop::sample::select(vec![
                Queued::Message,
                Queued::Silently,
                Queued::PutBackDeep,
                Queued::Resubmitted,
            ]),
            (0..4u8, 0..3i64, 0..5i64),
        )
            .prop_map(
                |(
                    (service, reqs, priority, customer, workflow),
                    bad_payload,
                    queued,
                    (wf_scoring, age_s, new_priority),
                )| GenJob {
                    service,
                    reqs,
                    priority,
                    customer,
                    workflow,
                    bad_payload,
                    queued,
                    wf_scoring,
                    age_s,
                    new_priority,
                },
            )
    }

    fn worker(i: usize) -> impl Strategy<Value = Capabilities> {
        (
            prop::sample::subsequence(SERVICES.to_vec(), 1..=3),
            prop::sample::select(vec![8.0, 16.0, 24.0, 48.0]),
            prop::sample::subsequence(vec!["sdxl", "sd15", "flux"], 0..=3),
            any::<bool>(),
            (0..4usize, 0..4usize, 0..3usize),
            (
                any::<bool>(),
                1..8i64,
                prop::sample::subsequence(vec!["upscale", "inpaint"], 0..=2),
                any::<bool>(),
            ),
            0..3usize,
        )
            .prop_map(
                move |(services, gpu, models, strict, (deny, allow, pin), (cn, batch, features, eu), on_demand)| {
                    let mut c = Capabilities::new(format!("w{i}"), "m", &services);
                    c.hardware.gpu_memory_gb = gpu;
                    c.hardware.gpu_model = if gpu >= 48.0 {
                        "NVIDIA A100-SXM4-80GB"
                    } else {
                        "NVIDIA GeForce RTX 4090"
                    }
                    .to_owned();
                    for s in &services {
                        c.models
                            .insert((*s).to_owned(), models.iter().map(|m| (*m).to_owned()).collect());
                    }
                    if strict {
                        c.customer_access.isolation = machine::config::Isolation::Strict;
                    }
                    if deny > 0 {
                        c.customer_access.denied_customers = vec![format!("cust{deny}")];
                    }
                    if allow > 0 {
                        c.customer_access.allowed_customers = vec![format!("cust{allow}"), "cust1".to_owned()];
                    }
                    if pin == 1 {
                        c.workflow_id = "wf1".to_owned();
                    }
                    c.custom.insert("supports_controlnet".to_owned(), json!(cn));
                    c.custom.insert("max_batch_size".to_owned(), json!(batch));
                    c.custom.insert("features".to_owned(), json!(features));
                    c.custom
                        .insert("region".to_owned(), json!({"zone": if eu { "eu" } else { "us" }}));
                    // Affinity without starvation: a cold worker that takes jobs needing models
                    // at once, one that would wait an hour, and one that cannot fetch.
                    match on_demand {
                        1 => drop(c.custom.insert("models_on_demand_after_ms".to_owned(), json!(0))),
                        2 => drop(
                            c.custom
                                .insert("models_on_demand_after_ms".to_owned(), json!(3_600_000)),
                        ),
                        _ => {}
                    }
                    c
                },
            )
    }

    /// Writes generated job `i` as the API does and queues it the way it says; returns it as
    /// the reference matcher sees it.
    async fn queue(conn: &mut MultiplexedConnection, b: &Broker, i: usize, j: &GenJob, base_ms: i64) -> PendingJob {
        let id = format!("job-{i:02}");
        let customer = if j.customer == 0 {
            String::new()
        } else {
            format!("cust{}", j.customer)
        };
        let workflow = if j.workflow == 0 {
            String::new()
        } else {
            format!("wf{}", j.workflow)
        };
        let payload = if j.bad_payload { "{bad" } else { "{}" };
        // Distinct milliseconds, so the order among tied scores never rests on the index's
        // sequence (which the claims' repair assigns in its own order).
        let created = base_ms - j.age_s * 1000 + i as i64 * 7;
        let priority = j.priority.to_string();
        let mut fields = vec![
            ("service_required", SERVICES[j.service].to_owned()),
            ("requirements", REQS[j.reqs].to_owned()),
            ("customer_id", customer.clone()),
            ("workflow_id", workflow.clone()),
            ("payload", payload.to_owned()),
            ("priority", priority),
        ];
        let mut wfp = None;
        match j.wf_scoring {
            1 => fields.push(("workflow_priority", "0".to_owned())),
            2 => fields.push(("workflow_datetime", "0".to_owned())),
            3 => {
                wfp = Some(j.priority + 2);
                fields.push(("workflow_priority", (j.priority + 2).to_string()));
            }
            _ => {}
        }
        let borrowed =
            |fields: &[(&'static str, String)]| fields.iter().map(|(k, v)| (*k, v.clone())).collect::<Vec<_>>();
        let fs = borrowed(&fields);
        let refs: Vec<(&str, &str)> = fs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        api_submit(conn, &id, created, &refs, false).await;
        let mut priority = j.priority;
        match j.queued {
            Queued::Message => {
                b.index_job(&id).await.unwrap();
            }
            Queued::Silently => {}
            Queued::PutBackDeep => {
                let score = priority as f64 * 1e6 + (9_007_199_254_740_991.0 - created as f64);
                let _: () = redis::cmd("ZADD")
                    .arg("jobs:pending")
                    .arg(score)
                    .arg(&id)
                    .query_async(conn)
                    .await
                    .unwrap();
            }
            Queued::Resubmitted => {
                b.index_job(&id).await.unwrap();
                priority = j.new_priority;
                fields.retain(|(k, _)| *k != "priority");
                fields.push(("priority", priority.to_string()));
                let fs = borrowed(&fields);
                let refs: Vec<(&str, &str)> = fs.iter().map(|(k, v)| (*k, v.as_str())).collect();
                api_submit(conn, &id, created, &refs, false).await;
            }
        }
        PendingJob {
            score: machine::broker::pending_score(priority, wfp, created, None),
            id,
            service: SERVICES[j.service].to_owned(),
            requirements: REQS[j.reqs].to_owned(),
            customer_id: customer,
            workflow_id: workflow,
            payload: payload.to_owned(),
            held_off_worker: None,
            created_ms: created,
            seq: i as u64,
        }
    }

    #[test]
    fn lua_claims_equal_the_reference_matcher() {
        let server = RedisServer::start();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let b = rt.block_on(broker(&server));
        let conn = rt.block_on(raw(&server));
        let strategy = (
            prop::collection::vec(job(), 1..30),
            (worker(0), worker(1), worker(2)),
            prop::collection::vec((0..3usize, prop::bool::weighted(0.3)), 1..30),
        );
        let mut runner = TestRunner::new(Config::with_cases(64));
        let started = Instant::now();
        let base_ms = now_ms() - 60_000;
        runner
            .run(&strategy, |(jobs, (w0, w1, w2), order)| {
                let mut conn = conn.clone();
                rt.block_on(async {
                    let _: () = redis::cmd("FLUSHALL").query_async(&mut conn).await.unwrap();
                    let mut pending = Vec::new();
                    for (i, j) in jobs.iter().enumerate() {
                        pending.push(queue(&mut conn, &b, i, j, base_ms).await);
                    }
                    // Jobs queued deep or re-scored without a message: the fleet's sweeper
                    // finds them within seconds (a_job_put_back_deep_... shows the timing).
                    if jobs
                        .iter()
                        .any(|j| matches!(j.queued, Queued::PutBackDeep | Queued::Resubmitted))
                    {
                        b.sweep_pending().await.unwrap().expect("the only sweeper");
                    }
                    let workers = [&w0, &w1, &w2];
                    for (w, original) in order {
                        let mut want = reference::pick(workers[w], &pending).map(|j| j.id.clone());
                        // Our worker ends a job whose payload it cannot run as unworkable and
                        // claims on; an original worker gets it.
                        while !original
                            && let Some(bad) = pending
                                .iter()
                                .find(|p| Some(&p.id) == want.as_ref() && !p.payload_runs())
                        {
                            let bad = bad.id.clone();
                            pending.retain(|p| p.id != bad);
                            want = reference::pick(workers[w], &pending).map(|j| j.id.clone());
                        }
                        // An original worker passes two arguments: no lease, nothing to complete.
                        let got_id = if original {
                            original_claim(&mut conn, &workers[w].to_json()).await
                        } else {
                            let got = b.claim(workers[w]).await.unwrap();
                            if let Some(job) = &got {
                                b.complete(job, &Value::Null).await.unwrap();
                            }
                            got.map(|j| j.id)
                        };
                        prop_assert_eq!(&got_id, &want, "worker {:?} (original: {})", workers[w], original);
                        if let Some(id) = got_id {
                            pending.retain(|p| p.id != id);
                        }
                    }
                    Ok(())
                })
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(
            started.elapsed() < LIMIT,
            "the property test took {:?}",
            started.elapsed()
        );
    }
}

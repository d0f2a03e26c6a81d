//! The claim record in the job hash (issue 27, the broker's cost per job): our claims keep their
//! record (`claim_ms`, `claim_score`, `claim_order`) in `job:<id>` next to `worker_id` instead of
//! `jobs:claims`; a job claimed by the library before the move keeps working after an upgrade
//! (complete, requeue in its place, reaped); an original worker's claim never carries a record;
//! completion records older than 7 days are still trimmed.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::support::subscribed;
use machine::broker::{Broker, BrokerOptions, Capabilities, NewJob};
use machine::config::RedisUrl;
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use testkit::RedisServer;

const LIMIT: Duration = Duration::from_secs(60);

async fn broker(server: &RedisServer, lease: Duration) -> Broker {
    let url = RedisUrl::parse(&server.url()).expect("testkit URLs are valid");
    let b = Broker::connect(
        &url,
        BrokerOptions {
            lease,
            ..BrokerOptions::default()
        },
    )
    .await
    .expect("connect");
    b.ensure_functions().await.expect("install the library");
    b
}

async fn raw(server: &RedisServer) -> MultiplexedConnection {
    redis::Client::open(server.url())
        .expect("client")
        .get_multiplexed_async_connection()
        .await
        .expect("connect")
}

async fn job_hash(conn: &mut MultiplexedConnection, id: &str) -> BTreeMap<String, String> {
    conn.hgetall(format!("job:{id}")).await.expect("HGETALL")
}

fn caps(worker: &str) -> Capabilities {
    Capabilities::new(worker, "m1", &["simulation"])
}

const RECORD: [&str; 3] = ["claim_ms", "claim_score", "claim_order"];

/// Rewrites a claim of ours into the layout of the library before the record moved into the job
/// hash: `jobs:claims` id → `{w, s, m, t, q}`, nothing in the job hash.
async fn as_claimed_before_the_upgrade(conn: &mut MultiplexedConnection, id: &str) {
    let h = job_hash(conn, id).await;
    let order = &h["claim_order"];
    let seq = 999_999_999_999u64 - order[14..26].parse::<u64>().unwrap();
    let record = json!({
        "w": h["worker_id"], "s": h["claim_score"], "m": "m1",
        "t": h["claim_ms"].parse::<u64>().unwrap(), "q": seq,
    });
    let _: () = redis::pipe()
        .hdel(format!("job:{id}"), &RECORD[..])
        .ignore()
        .hset("jobs:claims", id, record.to_string())
        .ignore()
        .query_async(conn)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_record_lives_in_the_job_hash_and_leaves_with_the_claim() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server, Duration::from_secs(60)).await;
        let mut conn = raw(&server).await;
        let id = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let pending_score: f64 = conn.zscore("jobs:pending", &id).await.unwrap();

        let job = b.claim(&caps("w1")).await.unwrap().expect("claimed");
        let h = job_hash(&mut conn, &id).await;
        for f in RECORD {
            assert!(h.contains_key(f), "{f} missing from {h:?}");
        }
        assert_eq!(h["worker_id"], "w1");
        assert!(
            !conn.exists::<_, bool>("jobs:claims").await.unwrap(),
            "no jobs:claims any more"
        );
        // The worker's copy of the job (jobs:active) is the job as the API wrote it.
        let snapshot: String = conn.hget("jobs:active:w1", &id).await.unwrap();
        let snapshot: Value = serde_json::from_str(&snapshot).unwrap();
        assert_eq!(snapshot["status"], "assigned");
        for f in RECORD {
            assert!(snapshot.get(f).is_none(), "{f} in the claimed job");
        }

        // Given back: in its place again, and no record is left behind.
        b.return_job(&job).await.unwrap();
        let h = job_hash(&mut conn, &id).await;
        assert_eq!(h["status"], "pending");
        for f in RECORD {
            assert!(!h.contains_key(f), "{f} left after the return: {h:?}");
        }
        let again: f64 = conn.zscore("jobs:pending", &id).await.unwrap();
        assert_eq!(again, pending_score, "the returned job keeps its score");

        // Claimed, started and completed: processing_time counts from the start.
        let job = b.claim(&caps("w2")).await.unwrap().expect("claimed again");
        b.start(&job).await.unwrap();
        b.complete(&job, &json!({"url": "https://cdn/x.png"})).await.unwrap();
        let h = job_hash(&mut conn, &id).await;
        assert_eq!(h["status"], "completed");
        assert!(h["processing_time"].parse::<u64>().is_ok(), "{h:?}");
        let lease: Option<f64> = conn.zscore("jobs:leases", &id).await.unwrap();
        assert_eq!(lease, None, "the lease ends with the job");
        let done: String = conn.hget("jobs:completed", &id).await.unwrap();
        let done: Value = serde_json::from_str(&done).unwrap();
        assert_eq!(done["data"], json!({"url": "https://cdn/x.png"}));
    })
    .await
    .expect("within the limit");
}

/// processing_time is the plain number of milliseconds since the claim (or start) at any size:
/// the library writes it from three-digit groups rather than with string.format (issue 27).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn processing_time_is_the_whole_milliseconds_since_the_start_at_any_size() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server, Duration::from_secs(60)).await;
        let mut conn = raw(&server).await;
        for ago in [0_u64, 7, 1_000, 1_001, 86_400_123, 999_999_999, 1_000_000_007] {
            let id = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
            let job = b.claim(&caps("w")).await.unwrap().expect("claimed");
            assert_eq!(job.id, id);
            let claim_ms: u64 = job_hash(&mut conn, &id).await["claim_ms"].parse().unwrap();
            let _: () = conn
                .hset(format!("job:{id}"), "claim_ms", (claim_ms - ago).to_string())
                .await
                .unwrap();
            b.complete(&job, &json!({})).await.unwrap();
            let h = job_hash(&mut conn, &id).await;
            let text = &h["processing_time"];
            let took: u64 = text.parse().unwrap_or_else(|_| panic!("{text:?} for {ago}"));
            assert_eq!(&took.to_string(), text, "no padding or fraction");
            assert!((ago..ago + 5_000).contains(&took), "{took} for {ago}");
        }
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_claimed_before_the_upgrade_complete_requeue_and_are_reaped() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server, Duration::from_millis(300)).await;
        let mut conn = raw(&server).await;

        // Completed after the upgrade.
        let first = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = b.claim(&caps("w1")).await.unwrap().expect("claimed");
        as_claimed_before_the_upgrade(&mut conn, &first).await;
        b.renew_lease(&job).await.unwrap();
        b.complete(&job, &json!({"ok": true})).await.unwrap();
        assert_eq!(job_hash(&mut conn, &first).await["status"], "completed");
        let left: Option<String> = conn.hget("jobs:claims", &first).await.unwrap();
        assert_eq!(left, None, "the old record goes with the claim");

        // Returned after the upgrade: back in its place.
        let second = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let score: f64 = conn.zscore("jobs:pending", &second).await.unwrap();
        let job = b.claim(&caps("w1")).await.unwrap().expect("claimed");
        as_claimed_before_the_upgrade(&mut conn, &second).await;
        b.return_job(&job).await.unwrap();
        let again: f64 = conn.zscore("jobs:pending", &second).await.unwrap();
        assert_eq!(again, score);

        // Its worker died before the upgrade: the reaper returns it when the lease runs out.
        let job = b.claim(&caps("w2")).await.unwrap().expect("claimed");
        assert_eq!(job.id, second);
        as_claimed_before_the_upgrade(&mut conn, &second).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let r = b.reap_expired_leases().await.unwrap();
        assert_eq!(r.requeued, 1, "{r:?}");
        let h = job_hash(&mut conn, &second).await;
        assert_eq!((h["status"].as_str(), h["retry_count"].as_str()), ("pending", "1"));
        let again: f64 = conn.zscore("jobs:pending", &second).await.unwrap();
        assert_eq!(again, score, "reaped into its place");
        let left: Option<String> = conn.hget("jobs:claims", &second).await.unwrap();
        assert_eq!(left, None);
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_original_workers_claim_never_carries_an_old_claim_record() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server, Duration::from_secs(60)).await;
        let mut conn = raw(&server).await;
        let id = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = b.claim(&caps("w1")).await.unwrap().expect("claimed");
        b.complete(&job, &Value::Null).await.unwrap();
        // The API submits the same id again (a client's message id): our record of the ended
        // claim is still in the hash when an original worker claims it.
        let _: () = redis::pipe()
            .hset("job:".to_owned() + &id, "status", "pending")
            .ignore()
            .zadd("jobs:pending", &id, 5e16)
            .ignore()
            .query_async(&mut conn)
            .await
            .unwrap();
        let reply: Option<String> = redis::cmd("FCALL")
            .arg("findMatchingJob")
            .arg(0)
            .arg(caps("original").to_json())
            .arg(100)
            .query_async(&mut conn)
            .await
            .unwrap();
        let reply: Value = serde_json::from_str(&reply.expect("the original worker claims")).unwrap();
        assert_eq!(reply["jobId"], id.as_str());
        let h = job_hash(&mut conn, &id).await;
        assert_eq!(h["worker_id"], "original");
        for f in RECORD {
            assert!(!h.contains_key(f), "{f} of the ended claim kept: {h:?}");
            assert!(reply["job"].get(f).is_none(), "{f} in the original worker's copy");
        }
        // So nothing of ours takes it for our own.
        assert!(matches!(
            b.complete(&job, &Value::Null).await,
            Err(machine::broker::BrokerError::LeaseLost { .. })
        ));
    })
    .await
    .expect("within the limit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_records_older_than_seven_days_are_trimmed() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server, Duration::from_secs(60)).await;
        let mut conn = raw(&server).await;
        // Records of a week and a day ago, as the library wrote them then.
        let old_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as i64
            - 8 * 86_400_000;
        for i in 0..150 {
            let _: () = redis::pipe()
                .hset("jobs:completed", format!("old-{i}"), r#"{"success":true}"#)
                .ignore()
                .zadd("jobs:completed:at", format!("old-{i}"), old_ms + i)
                .ignore()
                .query_async(&mut conn)
                .await
                .unwrap();
        }
        // At most 100 go per completion, so two completions take all 150.
        for _ in 0..2 {
            b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
            let job = b.claim(&caps("w1")).await.unwrap().expect("claimed");
            b.complete(&job, &Value::Null).await.unwrap();
        }
        let n: usize = conn.hlen("jobs:completed").await.unwrap();
        assert_eq!(n, 2, "only the two fresh records remain");
        let n: usize = conn.zcard("jobs:completed:at").await.unwrap();
        assert_eq!(n, 2);
    })
    .await
    .expect("within the limit");
}

/// The text between `"<name>":` and the next `,` or `}` replaced by `T` (times differ per call).
fn without_time(s: &str, name: &str) -> String {
    let key = format!("\"{name}\":");
    let Some(at) = s.find(&key) else { return s.to_owned() };
    let start = at + key.len();
    let end = start + s[start..].find([',', '}']).expect("a value ends");
    format!("{}T{}", &s[..start], &s[end..])
}

/// The worker encodes complete_job's parts itself (`completeJobText`); older machines still call
/// `completeJob`, which encodes them in the library. Both must write the same bytes, names that
/// need escaping included (`/`, quotes, DEL, non-ASCII, a newline).
#[tokio::test]
async fn a_completion_encoded_by_the_worker_writes_the_bytes_the_library_wrote() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server, Duration::from_secs(60)).await;
        let mut conn = raw(&server).await;
        let mut pubsub = subscribed(&server.url(), "complete_job").await;
        let worker = "m1/gpu \"0\" é\u{7f}";
        let result = json!({"url": "https://cdn/x/a.png", "n": 1.5, "s": "tab\there"});
        let mut sent = Vec::new();
        for new_form in [true, false] {
            let mut job = NewJob::new("simulation", json!({}));
            job.workflow_id = "wf/1\n\"x\"".to_owned();
            let id = b.submit(&job).await.unwrap();
            let _: () = conn
                .hset_multiple(format!("job:{id}"), &[("current_step", "2/3"), ("total_steps", "3")])
                .await
                .unwrap();
            let claimed = b.claim(&caps(worker)).await.unwrap().expect("claimed");
            assert_eq!(claimed.id, id);
            if new_form {
                b.complete(&claimed, &result).await.unwrap();
            } else {
                let word: String = redis::cmd("FCALL")
                    .arg("completeJob")
                    .arg(0)
                    .arg("")
                    .arg(&id)
                    .arg(worker)
                    .arg(result.to_string())
                    .arg("completed")
                    .arg(&job.workflow_id)
                    .arg("2/3")
                    .arg("3")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert_eq!(word, "ok");
            }
            let msg: String = futures_util::StreamExt::next(&mut pubsub.on_message())
                .await
                .unwrap()
                .get_payload()
                .unwrap();
            let record: String = conn.hget("jobs:completed", &id).await.unwrap();
            sent.push((
                without_time(&msg.replace(&id, "ID"), "timestamp"),
                without_time(&record, "completed_at"),
            ));
        }
        assert_eq!(sent[0], sent[1]);
        // And what the readers decode is what was sent.
        let msg: Value = serde_json::from_str(&sent[0].0.replace(":T", ":0")).unwrap();
        assert_eq!(msg["worker_id"], worker);
        assert_eq!(msg["workflow_id"], "wf/1\n\"x\"");
        assert_eq!(msg["current_step"], "2/3");
        assert_eq!(msg["result"], result);
    })
    .await
    .expect("within the limit");
}

/// A progress write is timed by its worker, as the original workers time theirs: Redis' clock
/// (`TIME`, about a seventh of the write) is not read, and the hash's `updated_at` and the
/// message's `timestamp` are one instant of the worker's clock.
#[tokio::test]
async fn a_progress_write_is_timed_by_its_worker_not_by_the_servers_clock() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server, Duration::from_secs(60)).await;
        let mut conn = raw(&server).await;
        let mut pubsub = subscribed(&server.url(), "update_job_progress").await;
        let id = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let claimed = b.claim(&caps("w1")).await.unwrap().expect("claimed");
        assert_eq!(claimed.id, id);
        let mut messages = pubsub.on_message();
        let _claims_own: String = futures_util::StreamExt::next(&mut messages)
            .await
            .unwrap()
            .get_payload()
            .unwrap();
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query_async(&mut conn)
            .await
            .unwrap();
        let before = std::time::SystemTime::now();
        b.progress(&claimed, 40.0, "sampling", Some((2, 5))).await.unwrap();
        let after = std::time::SystemTime::now();
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(stats.contains("cmdstat_fcall:"), "{stats}");
        assert!(!stats.contains("cmdstat_time:"), "the write read Redis' clock: {stats}");
        let msg: String = futures_util::StreamExt::next(&mut messages)
            .await
            .unwrap()
            .get_payload()
            .unwrap();
        let msg: Value = serde_json::from_str(&msg).unwrap();
        let hash: BTreeMap<String, String> = conn.hgetall(format!("job:{id}:progress")).await.unwrap();
        let at = humantime::parse_rfc3339(&hash["updated_at"]).expect("updated_at is ISO-8601");
        let ms = |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        assert_eq!(msg["timestamp"].as_u64(), Some(ms(at)), "one instant: {msg} {hash:?}");
        assert!(
            ms(before) <= ms(at) && ms(at) <= ms(after),
            "the worker's clock during the call"
        );
        assert_eq!(msg["progress"], 40);
        assert_eq!(hash["progress"], "40");
    })
    .await
    .expect("within the limit");
}

/// The worker encodes update_job_progress itself (`updateJobProgressAt`);
/// older machines still call `updateJobProgress`, which encodes it in the library. Both must
/// write the same message and progress hash, names and messages that need escaping included.
#[tokio::test]
async fn a_progress_write_encoded_by_the_worker_writes_the_bytes_the_library_wrote() {
    tokio::time::timeout(LIMIT, async {
        let server = RedisServer::start();
        let b = broker(&server, Duration::from_secs(60)).await;
        let mut conn = raw(&server).await;
        let mut pubsub = subscribed(&server.url(), "update_job_progress").await;
        let worker = "m1/gpu \"0\" é\u{7f}";
        let message = "step 2/3: \"sampling\"\n\té";
        let mut sent = Vec::new();
        for new_form in [true, false] {
            let id = b.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
            let claimed = b.claim(&caps(worker)).await.unwrap().expect("claimed");
            assert_eq!(claimed.id, id);
            // The claim's own update_job_progress (progress 0) comes first.
            let mut messages = pubsub.on_message();
            let first: String = futures_util::StreamExt::next(&mut messages)
                .await
                .unwrap()
                .get_payload()
                .unwrap();
            assert!(first.contains("\"progress\":0"), "{first}");
            if new_form {
                b.progress(&claimed, 66.6, message, Some((2, 3))).await.unwrap();
            } else {
                let word: String = redis::cmd("FCALL")
                    .arg("updateJobProgress")
                    .arg(0)
                    .arg("")
                    .arg(&id)
                    .arg(worker)
                    .arg("67")
                    .arg(message)
                    .arg("2")
                    .arg("3")
                    .arg("0")
                    .query_async(&mut conn)
                    .await
                    .unwrap();
                assert_eq!(word, "ok");
            }
            let msg: String = futures_util::StreamExt::next(&mut messages)
                .await
                .unwrap()
                .get_payload()
                .unwrap();
            drop(messages);
            let mut hash: BTreeMap<String, String> = conn.hgetall(format!("job:{id}:progress")).await.unwrap();
            hash.insert("updated_at".to_owned(), "T".to_owned());
            sent.push((without_time(&msg.replace(&id, "ID"), "timestamp"), hash));
        }
        assert_eq!(sent[0], sent[1]);
        let msg: Value = serde_json::from_str(&sent[0].0.replace(":T", ":0")).unwrap();
        assert_eq!(msg["worker_id"], worker);
        assert_eq!(msg["message"], message);
        assert_eq!(msg["progress"], 67);
        assert_eq!(msg["status"], "in_progress");
        assert_eq!(msg["current_step"], "2");
        assert_eq!(msg["total_steps"], "3");
        assert_eq!(sent[0].1["progress"], "67");
        assert_eq!(sent[0].1["message"], message);
        assert_eq!(sent[0].1["status"], "in_progress");
    })
    .await
    .expect("within the limit");
}

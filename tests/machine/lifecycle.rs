//! The lifecycle functions against a real redis-server: `job:<id>:progress` follows the job
//! (whole percentages while it runs, its real state once it failed, was cancelled or went back
//! to the queue), and returns for faults that are not the job's own are free but bounded.

use std::collections::BTreeMap;
use std::time::Duration;

use machine::broker::{Broker, BrokerOptions, Capabilities, Disposition, Fault, NewJob, RetryDelay};
use machine::config::RedisUrl;
use serde_json::json;
use testkit::RedisServer;

#[tokio::test]
async fn job_progress_follows_the_job() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let server = RedisServer::start();
        let url = RedisUrl::parse(&server.url()).unwrap();
        let opts = BrokerOptions {
            failed_holdoff: Duration::ZERO,
            // The retry is claimed again at once: this test follows the progress hash, not the delay.
            retry_delay: RetryDelay {
                initial: Duration::ZERO,
                factor: 1.0,
                max: Duration::ZERO,
                jitter: 0.0,
            },
            ..BrokerOptions::default()
        };
        let broker = Broker::connect(&url, opts).await.unwrap();
        broker.ensure_functions().await.unwrap();
        let caps = Capabilities::new("w1", "m1", &["simulation"]);
        let progress = async |id: &str| broker.show(id).await.unwrap().unwrap().progress.stored().clone();

        let id = broker.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = broker.claim(&caps).await.unwrap().expect("the job is claimed");
        broker.start(&job).await.unwrap();
        broker
            .progress(&job, 100.0 / 3.0, "executing node 3", None)
            .await
            .unwrap();
        let p = progress(&id).await;
        assert_eq!(
            (p["progress"].as_str(), p["status"].as_str()),
            ("33", "in_progress"),
            "{p:?}"
        );

        // A retryable failure puts the job back in the queue, and its progress says so.
        broker.fail(&job, "ComfyUI restarted", true).await.unwrap();
        let p = progress(&id).await;
        assert_eq!(p["status"], "pending", "{p:?}");
        assert!(p["message"].contains("retry"), "{p:?}");

        // A final failure.
        let job = broker.claim(&caps).await.unwrap().expect("claimed again");
        broker.start(&job).await.unwrap();
        broker.progress(&job, 50.0, "executing node 3", None).await.unwrap();
        broker.fail(&job, "bad workflow", false).await.unwrap();
        let p = progress(&id).await;
        assert_eq!(
            (p["status"].as_str(), p["message"].as_str()),
            ("failed", "bad workflow"),
            "{p:?}"
        );

        // A cancellation while it runs.
        let id = broker.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = broker.claim(&caps).await.unwrap().expect("the job is claimed");
        broker.start(&job).await.unwrap();
        broker.progress(&job, 10.0, "executing node 3", None).await.unwrap();
        broker.cancel(&id).await.unwrap();
        assert_eq!(progress(&id).await["status"], "cancelled");

        // Returned at shutdown.
        let id = broker.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = broker.claim(&caps).await.unwrap().expect("the job is claimed");
        broker.start(&job).await.unwrap();
        broker.progress(&job, 10.0, "executing node 3", None).await.unwrap();
        broker.return_job(&job).await.unwrap();
        assert_eq!(progress(&id).await["status"], "pending");
    })
    .await
    .expect("the test finishes within its limit");
}

async fn job_hash(server: &RedisServer, id: &str) -> BTreeMap<String, String> {
    let mut conn = redis::Client::open(server.url())
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap();
    redis::cmd("HGETALL")
        .arg(format!("job:{id}"))
        .query_async(&mut conn)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_job_returned_six_times_for_the_machines_faults_fails_with_the_reasons() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let server = RedisServer::start();
        let url = RedisUrl::parse(&server.url()).unwrap();
        let broker = Broker::connect(&url, BrokerOptions::default()).await.unwrap();
        broker.ensure_functions().await.unwrap();
        let caps = Capabilities::new("w1", "m1", &["simulation"]);
        let id = broker.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        for n in 1..=5 {
            // Claimable again at once, by the same worker too: no delay, no hold-off.
            let job = broker
                .claim(&caps)
                .await
                .unwrap()
                .expect("returned jobs are claimable at once");
            assert_eq!(job.id, id);
            broker.start(&job).await.unwrap();
            let r = broker
                .return_for_fault(
                    &job,
                    Fault::Machine,
                    &format!("output store refuses the credentials ({n})"),
                )
                .await
                .unwrap();
            assert_eq!(r, Disposition::Returned, "return {n}");
            let h = job_hash(&server, &id).await;
            assert_eq!(
                (
                    h["status"].as_str(),
                    h["retry_count"].as_str(),
                    h["machine_returns"].as_str()
                ),
                ("pending", "0", n.to_string().as_str()),
                "{h:?}"
            );
        }
        let job = broker.claim(&caps).await.unwrap().expect("claimable a sixth time");
        let r = broker
            .return_for_fault(&job, Fault::Machine, "GPU fell off the bus")
            .await
            .unwrap();
        assert_eq!(r, Disposition::Failed);
        let h = job_hash(&server, &id).await;
        assert_eq!(
            (h["status"].as_str(), h["retry_count"].as_str()),
            ("failed", "0"),
            "{h:?}"
        );
        let error = &h["error"];
        assert!(error.contains("returned 6 times"), "{error}");
        assert!(error.contains("refuses the credentials (1)"), "{error}");
        assert!(error.contains("GPU fell off the bus"), "{error}");
        assert!(broker.claim(&caps).await.unwrap().is_none());
    })
    .await
    .expect("the test finishes within its limit");
}

#[tokio::test]
async fn a_service_fault_is_free_the_first_time_and_the_jobs_own_the_second() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let server = RedisServer::start();
        let url = RedisUrl::parse(&server.url()).unwrap();
        let opts = BrokerOptions {
            failed_holdoff: Duration::from_secs(60),
            retry_delay: RetryDelay {
                initial: Duration::from_secs(60),
                factor: 1.0,
                max: Duration::from_secs(60),
                jitter: 0.0,
            },
            ..BrokerOptions::default()
        };
        let broker = Broker::connect(&url, opts).await.unwrap();
        broker.ensure_functions().await.unwrap();
        let w1 = Capabilities::new("w1", "m1", &["simulation"]);
        let w2 = Capabilities::new("w2", "m2", &["simulation"]);
        let id = broker.submit(&NewJob::new("simulation", json!({}))).await.unwrap();

        // First crash: no retry spent, no delay, no hold-off: the same worker runs it again.
        let job = broker.claim(&w1).await.unwrap().unwrap();
        broker.start(&job).await.unwrap();
        let r = broker
            .return_for_fault(&job, Fault::Service, "comfyui exited with signal 9")
            .await
            .unwrap();
        assert_eq!(r, Disposition::Returned);
        let job = broker
            .claim(&w1)
            .await
            .unwrap()
            .expect("claimable at once, by the same worker");
        assert_eq!((job.id.as_str(), job.retry_count()), (id.as_str(), 0));

        // Second crash (on another machine it would be the same): the job's own failure.
        let r = broker
            .return_for_fault(&job, Fault::Service, "comfyui stalled for 300 s")
            .await
            .unwrap();
        assert_eq!(r, Disposition::Retried);
        let h = job_hash(&server, &id).await;
        assert_eq!(
            (
                h["status"].as_str(),
                h["retry_count"].as_str(),
                h["service_faults"].as_str()
            ),
            ("pending", "1", "2"),
            "{h:?}"
        );
        assert_eq!(h["error"], "comfyui stalled for 300 s");
        // The retry delay holds it from every worker, and `machine jobs show` says so.
        assert!(broker.claim(&w2).await.unwrap().is_none());
        assert!(broker.claim(&w1).await.unwrap().is_none());
        let why = broker
            .show(&id)
            .await
            .unwrap()
            .expect("the job exists")
            .waiting
            .unwrap_or_default();
        assert!(
            why.starts_with("it waits out its retry delay after attempt 1 of ") && why.contains("claimable in"),
            "{why}"
        );
    })
    .await
    .expect("the test finishes within its limit");
}

#[tokio::test]
async fn max_retries_is_capped_and_the_job_says_so() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let server = RedisServer::start();
        let url = RedisUrl::parse(&server.url()).unwrap();
        let opts = BrokerOptions {
            failed_holdoff: Duration::ZERO,
            retry_delay: RetryDelay {
                initial: Duration::ZERO,
                factor: 1.0,
                max: Duration::ZERO,
                jitter: 0.0,
            },
            max_retries_cap: 2,
            ..BrokerOptions::default()
        };
        let broker = Broker::connect(&url, opts).await.unwrap();
        broker.ensure_functions().await.unwrap();
        let caps = Capabilities::new("w1", "m1", &["simulation"]);
        let mut job = NewJob::new("simulation", json!({}));
        job.max_retries = 1_000_000_000;
        let id = broker.submit(&job).await.unwrap();
        let claimed = broker.claim(&caps).await.unwrap().unwrap();
        assert_eq!(
            broker.fail(&claimed, "flaky", true).await.unwrap(),
            machine::broker::Failure::Retried
        );
        let claimed = broker.claim(&caps).await.unwrap().unwrap();
        assert_eq!(
            broker.fail(&claimed, "flaky", true).await.unwrap(),
            machine::broker::Failure::Failed
        );
        let h = job_hash(&server, &id).await;
        assert_eq!(
            (
                h["status"].as_str(),
                h["retry_count"].as_str(),
                h["max_retries_cap"].as_str()
            ),
            ("failed", "2", "2"),
            "{h:?}"
        );
        assert_eq!(h["max_retries"], "1000000000", "the job's own field is kept");
    })
    .await
    .expect("the test finishes within its limit");
}

/// A completion rewrites `job:<id>:progress` (100 %, `completed`) and renews its day only when
/// the job reported progress: a job that reported none gets no hash.
#[tokio::test]
async fn a_completion_ends_the_progress_hash_only_when_there_is_one() {
    tokio::time::timeout(Duration::from_secs(30), async {
        let server = RedisServer::start();
        let url = RedisUrl::parse(&server.url()).unwrap();
        let broker = Broker::connect(&url, BrokerOptions::default()).await.unwrap();
        broker.ensure_functions().await.unwrap();
        let mut conn = redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let caps = Capabilities::new("w1", "m1", &["simulation"]);

        let id = broker.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = broker.claim(&caps).await.unwrap().expect("claimed");
        broker.start(&job).await.unwrap();
        broker.progress(&job, 40.0, "executing node 3", None).await.unwrap();
        let key = format!("job:{id}:progress");
        // An older TTL, to see the completion renew it.
        let _: () = redis::cmd("EXPIRE")
            .arg(&key)
            .arg(100)
            .query_async(&mut conn)
            .await
            .unwrap();
        broker.complete(&job, &json!({"ok": true})).await.unwrap();
        let p: BTreeMap<String, String> = redis::cmd("HGETALL").arg(&key).query_async(&mut conn).await.unwrap();
        assert_eq!(
            (p["progress"].as_str(), p["status"].as_str(), p["message"].as_str()),
            ("100", "completed", "completed"),
            "{p:?}"
        );
        let ttl: i64 = redis::cmd("TTL").arg(&key).query_async(&mut conn).await.unwrap();
        assert!(ttl > 86_000, "the completion renews the hash's day: {ttl}");

        let id = broker.submit(&NewJob::new("simulation", json!({}))).await.unwrap();
        let job = broker.claim(&caps).await.unwrap().expect("claimed");
        broker.start(&job).await.unwrap();
        broker.complete(&job, &json!({"ok": true})).await.unwrap();
        let exists: i64 = redis::cmd("EXISTS")
            .arg(format!("job:{id}:progress"))
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(exists, 0, "no progress reported, no hash");
    })
    .await
    .expect("the test finishes within its limit");
}

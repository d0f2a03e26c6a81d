//! `job:<id>:progress` follows the job through the lifecycle functions: whole percentages while
//! it runs, and the job's real state once it failed, was cancelled or went back to the queue.

use std::time::Duration;

use machine::broker::{Broker, BrokerOptions, Capabilities, NewJob, RetryDelay};
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
        let progress = async |id: &str| broker.show(id).await.unwrap().unwrap().progress;

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

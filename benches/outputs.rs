//! Cost of storing outputs: 10 outputs of 4 MB each, uploaded by the machine's output store to
//! a local Azurite and a local S3 server (moto), against the same bytes uploaded by the
//! provider's own SDK (azure-storage-blob, boto3; timed inside the client, so interpreter start
//! is not counted) with the same parallelism, and against bare `object_store` PUTs (no naming,
//! no verification).
//!
//! The machine's path adds sniffing the format, naming, the content type and a HEAD per object
//! to verify the upload. Goal: at most 1.2x the SDK's time, uploads of several outputs in
//! parallel (4 at a time, the store's default).
//!
//! Run with `cargo bench --bench outputs` (scripts/test-deps.sh installs the servers).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::StreamExt;
use machine::connectors::store::{OutputStore, StoreOptions};
use machine::connectors::{Artifact, ArtifactBody, Job};
use object_store::ObjectStoreExt;
use object_store::path::Path;
use testkit::{ObjectServer, StoreKind};

const OUTPUTS: usize = 10;
const SIZE: usize = 4 * 1024 * 1024;
const ROUNDS: usize = 5;
const PARALLEL: usize = 4;
const BUCKET: &str = "bench";

/// 4 MB that sniff as PNG (the signature and an IHDR chunk header), the rest noise.
fn payload(seed: u8) -> Bytes {
    let mut v = Vec::with_capacity(SIZE);
    v.extend_from_slice(b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR");
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    while v.len() < SIZE {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(SIZE);
    Bytes::from(v)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

async fn machine_rounds(server: &ObjectServer, dir: &std::path::Path) -> Vec<Duration> {
    let store = OutputStore::with_env(
        dir,
        server.env(),
        StoreOptions {
            parallel_uploads: PARALLEL,
            ..StoreOptions::default()
        },
    );
    let data: Vec<Bytes> = (0..OUTPUTS).map(|i| payload(i as u8)).collect();
    let mut times = Vec::with_capacity(ROUNDS);
    for r in 0..ROUNDS {
        let job = Job {
            id: format!("bench-{r}"),
            service_required: "comfyui".into(),
            payload: serde_json::Value::Null,
            customer_id: String::new(),
            ctx: serde_json::json!({"storage": {"provider": server.kind().provider(), "bucket": BUCKET}, "prefix": format!("machine/{r}")}),
            timeout: None,
        };
        let target = store.target(&job, 0).expect("a valid destination");
        let artifacts: Vec<Artifact> = data
            .iter()
            .enumerate()
            .map(|(i, b)| Artifact {
                name: format!("out{i}.png"),
                content_type: "image/png".into(),
                body: ArtifactBody::Bytes(b.clone()),
            })
            .collect();
        let started = Instant::now();
        let stored = target.store(artifacts).await.expect("stored");
        times.push(started.elapsed());
        assert_eq!(stored.len(), OUTPUTS);
    }
    times
}

async fn bare_rounds(server: &ObjectServer) -> Vec<Duration> {
    let store: Arc<dyn object_store::ObjectStore> = match server.kind() {
        StoreKind::Azure => {
            let mut b = object_store::azure::MicrosoftAzureBuilder::new().with_container_name(BUCKET);
            for (k, v) in server.env() {
                if let Ok(key) = k.to_ascii_lowercase().parse() {
                    b = b.with_config(key, v);
                }
            }
            Arc::new(b.build().expect("azure client"))
        }
        _ => {
            let mut b = object_store::aws::AmazonS3Builder::new().with_bucket_name(BUCKET);
            for (k, v) in server.env() {
                if let Ok(key) = k.to_ascii_lowercase().parse() {
                    b = b.with_config(key, v);
                }
            }
            Arc::new(b.build().expect("s3 client"))
        }
    };
    let data: Vec<Bytes> = (0..OUTPUTS).map(|i| payload(i as u8)).collect();
    let mut times = Vec::with_capacity(ROUNDS);
    for r in 0..ROUNDS {
        let started = Instant::now();
        futures_util::stream::iter(data.iter().enumerate())
            .map(|(i, b)| {
                let store = store.clone();
                let b = b.clone();
                async move { store.put(&Path::from(format!("bare/{r}/{i}.png")), b.into()).await }
            })
            .buffer_unordered(PARALLEL)
            .for_each(|r| async move {
                r.expect("put");
            })
            .await;
        times.push(started.elapsed());
    }
    times
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("payload.png");
    std::fs::write(&file, payload(0)).expect("write the payload");
    println!(
        "{OUTPUTS} outputs x {} MB, {PARALLEL} in parallel, median of {ROUNDS} rounds",
        SIZE / (1024 * 1024)
    );
    println!(
        "{:<8} {:>12} {:>12} {:>12} {:>10}",
        "store", "sdk ms", "bare ms", "machine ms", "vs sdk"
    );
    for kind in [StoreKind::Azure, StoreKind::S3] {
        let server = ObjectServer::start(kind);
        server.create_bucket(BUCKET);
        // One warm-up round each, so neither side pays the server's first-request costs.
        server.sdk_put_many(BUCKET, "warm", &file, 2, PARALLEL, 1);
        let sdk = median(server.sdk_put_many(BUCKET, "sdk", &file, OUTPUTS, PARALLEL, ROUNDS));
        let bare = median(bare_rounds(&server).await);
        let machine = median(machine_rounds(&server, &dir.path().join("local")).await);
        println!(
            "{:<8} {:>12} {:>12} {:>12} {:>9.2}x",
            kind.provider(),
            ms(sdk),
            ms(bare),
            ms(machine),
            machine.as_secs_f64() / sdk.as_secs_f64()
        );
    }
}

//! Models on demand: the time a ComfyUI job spends before its submission on the model it names.
//!
//! A model of `MODELS_BENCH_MB` MB (default 1024) is served by `testkit::FileServer` on this host.
//! Prints the time of a plain `curl` of the file (the baseline), the store's fetch of the same
//! file (download, sha256 as the bytes arrive, fsync, rename, link), and, with the model cached,
//! the time the store adds before submission (p50, p99 over 200 asks). Goals: fetch at most
//! 1.1 × curl, cached at most 5 ms.
//!
//! Run with `cargo bench --bench models`.

use std::time::{Duration, Instant};

use machine::models::{ModelStore, StoreSettings};
use sha2::Digest as _;

const ROUNDS: usize = 3;
const CACHED_ASKS: usize = 200;

fn secs(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let mb: usize = std::env::var("MODELS_BENCH_MB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let bytes: Vec<u8> = (0..mb * 1_000_000)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let sha = hex::encode(sha2::Sha256::digest(&bytes));
    let size = bytes.len();
    let server = testkit::FileServer::start();
    server.add("/m/big.safetensors", bytes, "application/octet-stream");
    let url = server.url("/m/big.safetensors");

    let dir = tempfile::tempdir().expect("temp dir");
    let catalogue = dir.path().join("catalogue.toml");
    std::fs::write(
        &catalogue,
        format!(
            "[[model]]\nname = \"big.safetensors\"\nkind = \"checkpoints\"\nsha256 = \"{sha}\"\nsize = {size}\nsources = [\"{url}\"]\n"
        ),
    )
    .expect("write the catalogue");
    let shared = dir.path().join("models");
    let link = dir.path().join("ComfyUI/models");
    let store = ModelStore::new(
        StoreSettings {
            catalogue: Some(catalogue),
            shared_dir: shared.clone(),
            link_dir: link.clone(),
            budget: None,
            pinned: Default::default(),
            loader_inputs: vec!["ckpt_name".to_owned()],
        },
        std::sync::Arc::new(machine::cloud::CloudStores::with_vars([])),
        &machine::config::Credentials::default(),
    )
    .expect("the store builds");
    let names = vec!["big.safetensors".to_owned()];
    let quiet = |_: &str, _: u64, _: u64| {};

    let mut curl = Vec::new();
    let mut fetch = Vec::new();
    for _ in 0..ROUNDS {
        let out = dir.path().join("curl.out");
        let t = Instant::now();
        let status = std::process::Command::new("curl")
            .args(["-sS", "-o"])
            .arg(&out)
            .arg(&url)
            .status()
            .expect("curl runs");
        curl.push(t.elapsed());
        assert!(status.success(), "curl failed");
        std::fs::remove_file(&out).expect("remove curl's file");

        let _ = std::fs::remove_file(shared.join("checkpoints/big.safetensors"));
        let _ = std::fs::remove_file(link.join("checkpoints/big.safetensors"));
        let t = Instant::now();
        let held = store.ensure(&names, &quiet).await.expect("the fetch succeeds");
        fetch.push(t.elapsed());
        drop(held);
    }
    let mut cached = Vec::with_capacity(CACHED_ASKS);
    for _ in 0..CACHED_ASKS {
        let t = Instant::now();
        let held = store.ensure(&names, &quiet).await.expect("cached");
        cached.push(t.elapsed());
        drop(held);
    }
    cached.sort();
    let best = |v: &[Duration]| *v.iter().min().expect("rounds ran");
    println!("model size:            {mb} MB");
    println!("curl (best of {ROUNDS}):      {} s", secs(best(&curl)));
    println!("store fetch (best of {ROUNDS}): {} s", secs(best(&fetch)));
    println!(
        "fetch / curl:          {:.2} (goal <= 1.10)",
        best(&fetch).as_secs_f64() / best(&curl).as_secs_f64()
    );
    println!(
        "cached, added before submission: p50 {:.3} ms, p99 {:.3} ms (goal <= 5 ms)",
        cached[CACHED_ASKS / 2].as_secs_f64() * 1000.0,
        cached[CACHED_ASKS * 99 / 100].as_secs_f64() * 1000.0
    );
    println!("downloads: {}", store.downloads());
}

//! The GPU probe through the real nvml-wrapper path, answered by the fake `libnvidia-ml.so.1`
//! that the test harness builds from C source, found through `LD_LIBRARY_PATH`.

use crate::support::{machine, run};

fn probe(envs: &[(&str, &str)]) -> serde_json::Value {
    let mut cmd = machine();
    cmd.args(["gpus", "--json"])
        .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
        .env("MACHINE_WORKSPACE", std::env::temp_dir());
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let (out, stdout, stderr) = run(&mut cmd);
    assert!(out.status.success(), "stderr: {stderr}");
    serde_json::from_str(&stdout).unwrap()
}

fn plan(envs: &[(&str, &str)]) -> serde_json::Value {
    let mut cmd = machine();
    cmd.args(["config", "check", "--json"])
        .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
        .env("HUB_REDIS_URL", "redis://127.0.0.1:6390")
        .env("MACHINE_ID", "m1");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let (out, stdout, stderr) = run(&mut cmd);
    assert!(out.status.success(), "stderr: {stderr}");
    serde_json::from_str::<serde_json::Value>(&stdout).unwrap()["plan"].clone()
}

#[test]
fn four_gpus_with_every_fact() {
    let doc = probe(&[
        ("FAKE_NVML_GPUS", "4"),
        ("FAKE_NVML_NAME", "NVIDIA H100 80GB HBM3"),
        ("FAKE_NVML_MEMORY_MIB", "81559"),
    ]);
    let gpus = doc["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 4);
    for (i, g) in gpus.iter().enumerate() {
        assert_eq!(g["index"], i);
        assert_eq!(g["name"], "NVIDIA H100 80GB HBM3");
        assert_eq!(g["uuid"], format!("GPU-fa4e0000-0000-4000-8000-{i:012}"));
        assert_eq!(g["memory_total_bytes"], 81559u64 * 1024 * 1024);
        assert_eq!(
            g["memory_free_bytes"],
            81559u64 * 1024 * 1024 - (i as u64 + 1) * 256 * 1024 * 1024
        );
    }
    assert_eq!(doc["source"]["kind"], "nvml");
    assert_eq!(doc["source"]["driver_version"], "550.54.15");
    assert_eq!(doc["source"]["cuda_driver_version"], "12.4");
    assert!(doc["host"]["cpu_cores"].as_u64().unwrap() >= 1);
    assert!(doc["host"]["ram_total_bytes"].as_u64().unwrap() > 0);
}

#[test]
fn one_gpu() {
    let doc = probe(&[("FAKE_NVML_GPUS", "1")]);
    assert_eq!(doc["gpus"].as_array().unwrap().len(), 1);
    assert_eq!(doc["gpus"][0]["name"], "NVIDIA GeForce RTX 4090");
}

#[test]
fn zero_gpus_is_cpu_mode_not_an_error() {
    let doc = probe(&[("FAKE_NVML_GPUS", "0")]);
    assert_eq!(doc["gpus"].as_array().unwrap().len(), 0);
    assert_eq!(doc["source"]["kind"], "none");
    let plan = plan(&[("FAKE_NVML_GPUS", "0"), ("WORKER_CONNECTORS", "comfyui")]);
    assert_eq!(plan["workers"][0]["id"], "m1-cpu0");
    assert!(
        plan["services"][0]["command"]
            .as_array()
            .unwrap()
            .iter()
            .any(|a| a == "--cpu")
    );
}

#[test]
fn init_failure_falls_back_to_overrides_then_to_cpu() {
    let doc = probe(&[("FAKE_NVML_INIT_ERROR", "9")]);
    assert_eq!(doc["gpus"].as_array().unwrap().len(), 0);
    let notes = doc["notes"].to_string();
    assert!(notes.contains("NVML unavailable"), "{notes}");
    assert!(
        notes.contains("Driver Not Loaded") || notes.contains("driver"),
        "{notes}"
    );

    let doc = probe(&[
        ("FAKE_NVML_INIT_ERROR", "9"),
        ("MACHINE_GPU_COUNT", "2"),
        ("MACHINE_GPU_MEMORY_GB", "24"),
        ("MACHINE_GPU_MODEL", "RTX 4090"),
    ]);
    assert_eq!(doc["source"]["kind"], "config");
    assert_eq!(doc["gpus"][1]["index"], 1);
    assert_eq!(doc["gpus"][1]["name"], "RTX 4090");
    assert_eq!(doc["gpus"][1]["memory_total_bytes"], 24u64 << 30);
}

#[test]
fn cuda_visible_devices_and_count_select_gpus() {
    let plan = plan(&[
        ("FAKE_NVML_GPUS", "4"),
        ("CUDA_VISIBLE_DEVICES", "3,1"),
        ("WORKER_CONNECTORS", "comfyui"),
    ]);
    let ids: Vec<&str> = plan["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["m1-gpu3", "m1-gpu1"]);
    assert_eq!(plan["services"][0]["port"], 8191);
    assert_eq!(plan["services"][0]["env"]["CUDA_VISIBLE_DEVICES"], "3");

    let doc = probe(&[("FAKE_NVML_GPUS", "4"), ("MACHINE_GPU_COUNT", "2")]);
    assert_eq!(doc["gpus"].as_array().unwrap().len(), 2);
    let doc = probe(&[("FAKE_NVML_GPUS", "4"), ("CUDA_VISIBLE_DEVICES", "")]);
    assert_eq!(doc["gpus"].as_array().unwrap().len(), 0);
}

#[test]
fn text_output_names_the_gpus() {
    let (out, stdout, _) = run(machine()
        .arg("gpus")
        .env("LD_LIBRARY_PATH", testkit::fake_nvml::library_dir())
        .env("FAKE_NVML_GPUS", "2"));
    assert!(out.status.success());
    assert!(
        stdout.contains("GPUs: 2 (source: NVML (driver 550.54.15, CUDA 12.4))"),
        "{stdout}"
    );
    assert!(stdout.contains("[1] NVIDIA GeForce RTX 4090"), "{stdout}");
}

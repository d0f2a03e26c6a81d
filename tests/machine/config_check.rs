//! `machine config check`: the plan for valid configurations, exit 2 naming every problem.

use crate::support::{machine, run};

#[test]
fn two_gpus_comfyui_and_openai_plan() {
    let ws = tempfile::tempdir().unwrap();
    let (out, stdout, stderr) = run(machine()
        .args(["config", "check", "--json"])
        .env("MACHINE_GPU_COUNT", "2")
        .env("WORKER_CONNECTORS", "comfyui,openai:2")
        .env("MACHINE_ID", "m1")
        .env("OPENAI_API_KEY", "sk-test")
        .env("HUB_REDIS_URL", "redis://127.0.0.1:6390")
        .env("MACHINE_WORKSPACE", ws.path()));
    assert!(out.status.success(), "stderr: {stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let workers: Vec<&str> = doc["plan"]["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["id"].as_str().unwrap())
        .collect();
    assert_eq!(workers, ["m1-gpu0", "m1-gpu1", "m1-openai-1", "m1-openai-2"]);
    let services: Vec<(&str, u64)> = doc["plan"]["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| (s["name"].as_str().unwrap(), s["port"].as_u64().unwrap()))
        .collect();
    assert_eq!(services, [("comfyui-gpu0", 8188), ("comfyui-gpu1", 8189)]);
    assert_eq!(doc["plan"]["services"][1]["env"]["CUDA_VISIBLE_DEVICES"], "1");
}

#[test]
fn bad_connectors_exit_2_naming_both_problems() {
    let (out, stdout, stderr) = run(machine()
        .args(["config", "check"])
        .env("WORKER_CONNECTORS", "comfyui:x,bogus"));
    assert_eq!(out.status.code(), Some(2), "stdout: {stdout}");
    assert!(stderr.contains("WORKER_CONNECTORS"), "{stderr}");
    assert!(stderr.contains("count `x` is not a positive integer"), "{stderr}");
    assert!(stderr.contains("unknown connector `bogus`"), "{stderr}");
    assert!(
        stderr.contains("comfyui, a1111, playwright, openai, replicate, runpod, simulation"),
        "{stderr}"
    );
}

#[test]
fn json_errors_list_every_problem() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("machine.toml");
    std::fs::write(
        &file,
        "[services.a]\ncommand = []\n[services.b]\ncommand = [\"x\"]\nafter = [\"zz\"]\n",
    )
    .unwrap();
    let (out, stdout, _) = run(machine()
        .args(["config", "check", "--json", "--config"])
        .arg(&file)
        .env("MACHINE_HEALTH_PORT", "0"));
    assert_eq!(out.status.code(), Some(2));
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["valid"], false);
    let keys: Vec<&str> = doc["problems"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, ["MACHINE_HEALTH_PORT", "services.a.command"]);
}

#[test]
fn problems_name_the_file_key_or_the_variable_that_set_the_value() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("machine.toml");
    std::fs::write(&file, "[gpu]\ncount = 1000\n[log]\nformat = \"xml\"\n").unwrap();
    let (out, stdout, stderr) = run(machine()
        .args(["config", "check", "--config"])
        .arg(&file)
        .env("MACHINE_HEALTH_PORT", "http"));
    assert_eq!(out.status.code(), Some(2), "stdout: {stdout}");
    for line in [
        "gpu.count: is more than the most GPUs a machine has",
        "log.format: unknown variant `xml`, expected `text` or `json`",
        "MACHINE_HEALTH_PORT: invalid type: string \"http\", expected u16 (sets `health.port`)",
    ] {
        assert!(stderr.contains(line), "{line} in {stderr}");
    }
    for var in ["MACHINE_GPU_COUNT", "LOG_FORMAT"] {
        assert!(!stderr.contains(var), "{var} was not set: {stderr}");
    }
}

#[test]
fn config_file_from_environment_and_missing_file() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("m.toml");
    std::fs::write(
        &file,
        "[machine]\nid = \"from-file\"\n[redis]\nurl = \"redis://:hunter2@127.0.0.1:6390\"\n",
    )
    .unwrap();
    let (out, stdout, stderr) = run(machine().args(["config", "check"]).env("MACHINE_CONFIG", &file));
    assert!(out.status.success(), "{stderr}");
    assert!(stdout.contains("machine:    from-file"), "{stdout}");
    assert!(stdout.contains("redis://:***@127.0.0.1:6390"), "{stdout}");
    assert!(
        !stdout.contains("hunter2"),
        "the password must never be printed: {stdout}"
    );

    let (out, _, stderr) = run(machine().args(["config", "check", "--config", "/nonexistent/m.toml"]));
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr.contains("/nonexistent/m.toml"), "{stderr}");
}

#[test]
fn machine_id_is_stable_across_runs() {
    let id = |_: ()| {
        let (out, stdout, _) = run(machine()
            .args(["config", "check", "--json"])
            .env("HOSTNAME", "gpu-box-17"));
        assert!(out.status.success());
        let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
        doc["config"]["machine_id"].as_str().unwrap().to_owned()
    };
    let first = id(());
    assert_eq!(first, id(()));
    let host = nix::unistd::gethostname()
        .unwrap()
        .into_string()
        .unwrap()
        .to_ascii_lowercase();
    assert!(
        first.starts_with("machine-") && first.len() > "machine-".len(),
        "{first} from {host}"
    );
}

#[test]
fn shipped_examples_are_valid() {
    for entry in std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/config/examples")).unwrap() {
        let path = entry.unwrap().path();
        let (out, stdout, stderr) = run(machine()
            .args(["config", "check", "--config"])
            .arg(&path)
            .env("OPENAI_API_KEY", "sk-test"));
        assert!(out.status.success(), "{}: {stderr}{stdout}", path.display());
    }
}

#[test]
fn local_mode_plans_a_private_redis_and_needs_redis_server() {
    let ws = tempfile::tempdir().unwrap();
    let (out, stdout, stderr) = run(machine()
        .args(["config", "check", "--json"])
        .env("MACHINE_WORKSPACE", ws.path()));
    assert!(out.status.success(), "{stderr}");
    let doc: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(doc["plan"]["services"][0]["name"], "redis");
    assert_eq!(doc["plan"]["services"][0]["critical"], true);

    let (out, _, stderr) = run(machine()
        .args(["config", "check"])
        .env("PATH", "/nonexistent")
        .env("MACHINE_WORKSPACE", ws.path()));
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr.contains("HUB_REDIS_URL: `redis-server` is not on PATH"),
        "{stderr}"
    );
}

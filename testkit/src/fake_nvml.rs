//! Builds the fake `libnvidia-ml.so.1` from `testkit/nvml/fake_nvml.c` with the system `cc`.
//!
//! The product loads it exactly as it loads the real library (by name, through the dynamic
//! loader), so a test points `LD_LIBRARY_PATH` at [`library_dir`] and sets the `FAKE_NVML_*`
//! variables documented in the C source.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/nvml/fake_nvml.c");

/// The directory holding the built `libnvidia-ml.so.1` (built once per test process).
pub fn library_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(build)
}

fn build() -> PathBuf {
    // Each test binary builds its own copy so parallel test binaries never race on one file.
    let dir = std::env::temp_dir().join(format!("machine-fake-nvml-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("creating the fake NVML directory");
    let out = dir.join("libnvidia-ml.so.1");
    let status = Command::new(std::env::var("CC").unwrap_or_else(|_| "cc".to_owned()))
        .args(["-shared", "-fPIC", "-O1", "-o"])
        .arg(&out)
        .arg(SOURCE)
        .status()
        .expect("running cc to build the fake NVML library (gcc is installed by scripts/test.sh)");
    assert!(status.success(), "building the fake NVML library failed");
    // Some loaders look for the unversioned name too.
    let _ = std::fs::remove_file(dir.join("libnvidia-ml.so"));
    std::os::unix::fs::symlink("libnvidia-ml.so.1", dir.join("libnvidia-ml.so")).ok();
    dir
}

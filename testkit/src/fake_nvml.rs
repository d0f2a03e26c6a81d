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

/// The control file a test injects GPU events and readings through: set `FAKE_NVML_CONTROL`
/// to [`Control::path`] for the process that loads the fake, then call the methods (the fake
/// reads each appended line once; see the C source for the commands).
#[derive(Debug, Clone)]
pub struct Control {
    path: PathBuf,
}

impl Control {
    /// A control file at `path` (created empty).
    pub fn new(path: impl Into<PathBuf>) -> Control {
        let path = path.into();
        std::fs::write(&path, "").expect("creating the fake NVML control file");
        Control { path }
    }

    /// The value for `FAKE_NVML_CONTROL`.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one whole line, so the fake never reads half of it.
    fn send(&self, line: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.path)
            .expect("opening the fake NVML control file");
        f.write_all(format!("{line}\n").as_bytes())
            .expect("writing the fake NVML control file");
    }

    /// A critical XID error `code` on `gpu` (delivered by the next event wait).
    pub fn xid(&self, gpu: u32, code: u64) {
        self.send(&format!("xid {gpu} {code}"));
    }

    /// A double-bit ECC error on `gpu`.
    pub fn double_bit_ecc(&self, gpu: u32) {
        self.send(&format!("dbe {gpu}"));
    }

    /// `gpu` falls off the bus: every later call about it returns `GPU_IS_LOST`.
    pub fn lose(&self, gpu: u32) {
        self.send(&format!("lost {gpu}"));
    }

    /// `gpu`'s clocks throttle reasons become `bits` (NVML's `nvmlClocksThrottleReason*`).
    pub fn throttle(&self, gpu: u32, bits: u64) {
        self.send(&format!("throttle {gpu} {bits}"));
    }

    /// `gpu`'s core temperature becomes `celsius`.
    pub fn temperature(&self, gpu: u32, celsius: u32) {
        self.send(&format!("temp {gpu} {celsius}"));
    }

    /// `gpu` has retired pages pending (it needs a reset).
    pub fn pages_pending(&self, gpu: u32) {
        self.send(&format!("pending {gpu}"));
    }
}

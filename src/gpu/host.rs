//! Host facts through `sysinfo`: CPU cores, memory, and free disk of the workspace.

use std::path::Path;

use serde::Serialize;
use sysinfo::{Disks, MemoryRefreshKind, RefreshKind, System};

/// What the host offers besides GPUs.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostInfo {
    /// Logical CPU cores.
    pub cpu_cores: u32,
    /// Total RAM in bytes.
    pub ram_total_bytes: u64,
    /// Available RAM in bytes at probe time.
    pub ram_available_bytes: u64,
    /// Free bytes on the file system holding the workspace (or its nearest existing parent).
    pub disk_free_bytes: Option<u64>,
}

impl HostInfo {
    /// Reads the host's facts.
    pub fn probe(workspace: &Path) -> HostInfo {
        let system =
            System::new_with_specifics(RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram()))
                .ok();
        let cpu_cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        HostInfo {
            cpu_cores,
            ram_total_bytes: system.as_ref().map_or(0, System::total_memory),
            ram_available_bytes: system.as_ref().map_or(0, System::available_memory),
            disk_free_bytes: disk_free(workspace),
        }
    }

    /// Total RAM in GiB, rounded down, as job requirements compare it.
    pub fn ram_gb(&self) -> u64 {
        self.ram_total_bytes / (1024 * 1024 * 1024)
    }
}

/// Free space of the mounted file system whose mount point is the longest prefix of the
/// workspace path (the workspace may not exist yet before installers run).
fn disk_free(workspace: &Path) -> Option<u64> {
    let disks = Disks::new_with_refreshed_list().ok()?;
    let mut probe = workspace;
    while !probe.exists() {
        probe = probe.parent()?;
    }
    let probe = probe.canonicalize().ok()?;
    disks
        .iter()
        .filter(|d| probe.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map(|d| d.available_space())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_this_host() {
        let h = HostInfo::probe(Path::new("/definitely/not/here"));
        assert!(h.cpu_cores >= 1);
        assert!(h.ram_total_bytes > 0);
        assert!(h.disk_free_bytes.is_some_and(|b| b > 0), "falls back to `/`: {h:?}");
    }
}

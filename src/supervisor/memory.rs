//! The resident memory of a service: the sum over every process of its process group (each
//! service runs in its own session and group, so a ComfyUI and the workers it forks count
//! together), read from `/proc`.

use super::sys;

/// Resident bytes of the processes whose process group is `pgid`; `None` when no process of
/// the group could be read.
pub fn group_rss(pgid: u32) -> Option<u64> {
    let mut total = None;
    for p in sys::proc_stats().filter(|p| p.pgrp == pgid) {
        // A process may exit between the listing and this read: it no longer counts.
        let Some(kib) = std::fs::read_to_string(format!("/proc/{}/status", p.pid))
            .ok()
            .and_then(|s| vm_rss_kib(&s))
        else {
            continue;
        };
        *total.get_or_insert(0) += kib * 1024;
    }
    total
}

/// `VmRSS` of a `/proc/<pid>/status` (absent for kernel threads and zombies).
fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_rss_is_read_in_kib() {
        assert_eq!(vm_rss_kib("Name:\tx\nVmRSS:\t  2048 kB\n"), Some(2048));
        assert_eq!(vm_rss_kib("Name:\tkthreadd\n"), None);
    }

    #[test]
    fn this_process_group_has_resident_memory() {
        let pgid = nix::unistd::getpgrp().as_raw().unsigned_abs();
        let rss = group_rss(pgid).expect("the test's own group is in /proc");
        assert!(rss > 1 << 20, "{rss}");
        assert_eq!(group_rss(u32::MAX - 1), None);
    }
}

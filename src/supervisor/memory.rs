//! The resident memory of a service: the sum over every process of its process group (each
//! service runs in its own session and group, so a ComfyUI and the workers it forks count
//! together), read from `/proc`.

use std::path::Path;

/// Resident bytes of the processes whose process group is `pgid`; `None` when `/proc` cannot
/// be read or no process is in the group.
pub fn group_rss(pgid: u32) -> Option<u64> {
    group_rss_in(Path::new("/proc"), pgid)
}

fn group_rss_in(proc: &Path, pgid: u32) -> Option<u64> {
    let mut total = None;
    for entry in std::fs::read_dir(proc).ok()?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        // A process may exit between the listing and the reads: it no longer counts.
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        if stat_pgrp(&stat) != Some(pgid) {
            continue;
        }
        let Some(kib) = std::fs::read_to_string(entry.path().join("status"))
            .ok()
            .and_then(|s| vm_rss_kib(&s))
        else {
            continue;
        };
        *total.get_or_insert(0) += kib * 1024;
    }
    total
}

/// The process group of a `/proc/<pid>/stat` line. The command name (field 2) is in
/// parentheses and may itself hold spaces and parentheses, so fields are counted from the last
/// `)`: state, ppid, pgrp.
fn stat_pgrp(stat: &str) -> Option<u32> {
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(2)?.parse().ok()
}

/// `VmRSS` of a `/proc/<pid>/status` (absent for kernel threads).
fn vm_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_group_is_read_past_odd_command_names() {
        assert_eq!(stat_pgrp("12 (python) S 1 12 12 0 -1"), Some(12));
        assert_eq!(stat_pgrp("13 (a) b (c)) R 12 12 12 0"), Some(12));
        assert_eq!(stat_pgrp("garbage"), None);
        assert_eq!(vm_rss_kib("Name:\tx\nVmRSS:\t  2048 kB\n"), Some(2048));
    }

    #[test]
    fn this_process_group_has_resident_memory() {
        let pgid = nix::unistd::getpgrp().as_raw().unsigned_abs();
        let rss = group_rss(pgid).expect("the test's own group is in /proc");
        assert!(rss > 1 << 20, "{rss}");
        assert_eq!(group_rss(u32::MAX - 1), None);
    }
}

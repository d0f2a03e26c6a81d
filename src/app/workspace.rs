//! The workspace of one machine: its directories, and the lock that keeps a second machine off
//! it.

use super::StartError;
use crate::config::Config;

/// Creates the workspace and, in local mode, the private redis-server's socket and data
/// directories (redis-server refuses to start without them).
pub(super) fn prepare_workspace(config: &Config) -> std::io::Result<()> {
    std::fs::create_dir_all(&config.machine.workspace)?;
    if config.machine.redis.is_none() {
        if let Some(dir) = config.machine.local_redis_socket().parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::create_dir_all(config.machine.local_redis_dir())?;
    }
    Ok(())
}

/// The workspace's lock file: held by the machine running on it, released when it exits.
pub fn lock_path(workspace: &std::path::Path) -> std::path::PathBuf {
    workspace.join("machine.lock")
}

/// Whether a machine holds the lock at `path` now. A machine is gone when the kernel has
/// released its lock, whatever its health server still answers. The probe takes a shared lock
/// for an instant; a missing file means no machine ever ran there.
pub fn machine_holds(path: &std::path::Path) -> bool {
    use fs4::fs_std::FileExt;
    let Ok(file) = std::fs::File::open(path) else {
        return false;
    };
    // An error taking the lock cannot tell either way: say held, so a wait goes on asking.
    !FileExt::try_lock_shared(&file).unwrap_or(false)
}

/// Takes the exclusive lock of the workspace for as long as the returned file is open, and
/// writes this process's pid into it for the next one to name. The lock is `flock(2)`, so the
/// kernel releases it however this process ends; the file is close-on-exec, so no service
/// inherits it.
pub(crate) fn lock_workspace(config: &Config) -> Result<std::fs::File, StartError> {
    use fs4::fs_std::FileExt;
    use std::io::{Read, Seek, Write};
    let path = lock_path(&config.machine.workspace);
    let failed = |source| StartError::Lock {
        path: path.clone(),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(failed)?;
    if !file.try_lock_exclusive().map_err(failed)? {
        let mut holder = String::new();
        let _ = file.read_to_string(&mut holder);
        let pid = holder.trim();
        return Err(StartError::Locked {
            path,
            pid: if pid.is_empty() {
                "unknown".to_owned()
            } else {
                pid.to_owned()
            },
        });
    }
    file.set_len(0)
        .and_then(|()| file.rewind())
        .and_then(|()| writeln!(file, "{}", std::process::id()))
        .map_err(failed)?;
    Ok(file)
}

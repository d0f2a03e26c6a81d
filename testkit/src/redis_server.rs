//! A private `redis-server` per test: free port, temp dir, no persistence, killed on drop.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running `redis-server` owned by one test.
#[derive(Debug)]
pub struct RedisServer {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl RedisServer {
    /// Starts `redis-server` (from `PATH`, or `REDIS_SERVER_BIN`) on a free loopback port.
    ///
    /// Panics with a clear message when the binary is missing: the test script installs it, so a
    /// missing server is a broken set-up, not a reason to skip.
    pub fn start() -> Self {
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned());
        let dir = tempfile::Builder::new()
            .prefix("machine-redis-")
            .tempdir()
            .expect("creating a temp dir");
        // A port can be taken between probing and binding; retry a few times on a fresh one.
        for _ in 0..5 {
            let port = crate::free_port();
            let mut child = spawn(&bin, port, dir.path());
            if wait_for_ping(port, Duration::from_secs(10)) {
                return Self { child, port, dir };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!(
            "redis-server did not come up; see its logs under {}",
            dir.path().display()
        );
    }

    /// The server's TCP port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A `redis://` URL for this server.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's private directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The server's log file.
    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("redis.log")
    }

    /// Sends one inline command and returns the raw reply (for harness-level checks only).
    pub fn raw_command(&self, line: &str) -> String {
        raw(self.port, line).unwrap_or_default()
    }

    /// The OS process id of the server.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl RedisServer {
    /// Simulates an outage: saves the data (`SAVE`, functions included), kills the server and
    /// leaves the port closed until [`RedisServer::start_again`].
    pub fn stop_keeping_data(&mut self) {
        let saved = self.raw_command("SAVE");
        assert!(saved.starts_with("+OK"), "SAVE failed: {saved:?}");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the data saved by
    /// [`RedisServer::stop_keeping_data`].
    pub fn start_again(&mut self) {
        let bin = std::env::var("REDIS_SERVER_BIN").unwrap_or_else(|_| "redis-server".to_owned());
        self.child = spawn(&bin, self.port, self.dir.path());
        assert!(
            wait_for_ping(self.port, Duration::from_secs(10)),
            "redis-server did not come back on port {}; see {}",
            self.port,
            self.log_path().display()
        );
    }
}

/// Starts `redis-server` on `port` with its files in `dir` (loading `dir/dump.rdb` if present).
fn spawn(bin: &str, port: u16, dir: &Path) -> Child {
    Command::new(bin)
        .args(["--port", &port.to_string()])
        .args(["--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(dir)
        .arg("--logfile")
        .arg(dir.join("redis.log"))
        .args(["--enable-debug-command", "yes"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {bin}: {e}; run scripts/test.sh, which installs redis-server"))
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn wait_for_ping(port: u16, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if raw(port, "PING").is_some_and(|r| r.starts_with("+PONG")) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

fn raw(port: u16, line: &str) -> Option<String> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream.write_all(format!("{line}\r\n").as_bytes()).ok()?;
    let mut buf = [0u8; 4096];
    let n = stream.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_a_private_server_and_cleans_up() {
        let a = RedisServer::start();
        let b = RedisServer::start();
        assert_ne!(a.port(), b.port());
        assert_ne!(a.port(), 6379, "never the shared server");
        assert!(a.raw_command("SET k v").starts_with("+OK"));
        assert!(b.raw_command("GET k").starts_with("$-1"), "servers are isolated");
        let dir = a.dir().to_owned();
        let pid = a.pid();
        drop(a);
        assert!(!dir.exists(), "temp dir removed");
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "server killed and reaped"
        );
    }
}

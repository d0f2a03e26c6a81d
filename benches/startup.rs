//! Start → `/ready` of `machine run` with nothing to install and simulation workers.
//!
//! `cargo bench --bench startup` starts the release binary again and again and times how long it
//! takes until `GET /ready` answers 200: with the hub's Redis given (`HUB_REDIS_URL`), and in
//! local mode (the machine starts its own redis-server first). The baseline, from the same run,
//! is the floor under local mode: a bare `redis-server` from spawn to its first PONG.
//! Goal: at most 0.5 s.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RUNS: usize = 10;
const GOAL: Duration = Duration::from_millis(500);

fn ready(port: u16) -> bool {
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
    if s.write_all(b"GET /ready HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut buf = [0u8; 16];
    s.read(&mut buf).is_ok_and(|n| buf[..n].starts_with(b"HTTP/1.1 200"))
}

/// One start of the machine: spawn → `/ready` 200, then a clean SIGTERM stop.
fn start_once(hub: Option<&str>, connectors: &str) -> Duration {
    let ws = tempfile::tempdir().expect("a temp dir");
    let port = testkit::free_port();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_machine"));
    cmd.arg("run")
        .env("MACHINE_ID", "bench")
        .env("MACHINE_WORKSPACE", ws.path())
        .env("MACHINE_HEALTH_PORT", port.to_string())
        .env("WORKER_CONNECTORS", connectors)
        .env("RUST_LOG", "warn")
        .env_remove("HUB_REDIS_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(url) = hub {
        cmd.env("HUB_REDIS_URL", url);
    }
    let started = Instant::now();
    let mut child = cmd.spawn().expect("the machine binary runs");
    let deadline = started + Duration::from_secs(30);
    while !ready(port) {
        assert!(Instant::now() < deadline, "the machine never became ready");
        std::thread::sleep(Duration::from_millis(2));
    }
    let took = started.elapsed();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .expect("signal the machine");
    let status = child.wait().expect("wait for the machine");
    assert!(status.success(), "the machine exited with {status:?}");
    took
}

fn summary(mut d: Vec<Duration>) -> (Duration, Duration, Duration) {
    d.sort();
    (d[0], d[d.len() / 2], d[d.len() - 1])
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() {
    let hub = testkit::RedisServer::start();
    let url = hub.url();
    // One warm-up start so page cache and the function library load are not in the figures.
    start_once(Some(&url), "simulation:1");

    let baseline: Vec<Duration> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            let r = testkit::RedisServer::start();
            let took = t.elapsed();
            drop(r);
            took
        })
        .collect();
    let hub_runs: Vec<Duration> = (0..RUNS).map(|_| start_once(Some(&url), "simulation:1")).collect();
    let hub4: Vec<Duration> = (0..RUNS).map(|_| start_once(Some(&url), "simulation:4")).collect();
    let local: Vec<Duration> = (0..RUNS).map(|_| start_once(None, "simulation:1")).collect();

    let (_, base_p50, _) = summary(baseline.clone());
    println!("machine start -> /ready 200 ({RUNS} runs each, release build, nothing to install)");
    println!(
        "{:<44} {:>8} {:>8} {:>8} {:>10} {:>9}",
        "scenario", "min ms", "p50 ms", "max ms", "x baseline", "goal"
    );
    let rows = [
        ("baseline: bare redis-server spawn -> PONG", baseline),
        ("machine, hub Redis, simulation:1", hub_runs),
        ("machine, hub Redis, simulation:4", hub4),
        ("machine, local mode (own redis), simulation:1", local),
    ];
    for (name, runs) in rows {
        let (min, p50, max) = summary(runs);
        let goal = if name.starts_with("baseline") {
            "-".to_owned()
        } else if p50 <= GOAL {
            "met".to_owned()
        } else {
            "not met".to_owned()
        };
        println!(
            "{:<44} {:>8} {:>8} {:>8} {:>10.2} {:>9}",
            name,
            ms(min),
            ms(p50),
            ms(max),
            p50.as_secs_f64() / base_p50.as_secs_f64(),
            goal
        );
    }
    println!("goal: p50 start -> /ready <= {} ms", GOAL.as_millis());
}

//! Test-only support for `machine`.
//!
//! Everything here talks a real protocol: [`RedisServer`] is a real `redis-server` process on a
//! free loopback port in its own temp dir (never the shared one on 6379), and [`fake_nvml`] builds
//! a real shared library exporting NVML's C symbols from the C source kept in this crate. Nothing
//! in this crate is linked into the product.

pub mod fake_nvml;
mod file_server;
mod redis_server;

pub use file_server::{FileServer, SeenRequest};
pub use redis_server::RedisServer;

use std::net::TcpListener;

/// Returns a loopback TCP port that was free a moment ago.
///
/// The port is released before returning, so a racing process could take it; tests that bind
/// it immediately after are fine in practice on a test machine.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port cannot fail on loopback");
    listener.local_addr().expect("a bound listener has an address").port()
}

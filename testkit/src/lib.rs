//! Test-only support for `machine`.
//!
//! Everything here talks a real protocol: [`RedisServer`] is a real `redis-server` process on a
//! free loopback port in its own temp dir (never the shared one on 6379), and [`fake_nvml`] builds
//! a real shared library exporting NVML's C symbols from the C source kept in this crate. Nothing
//! in this crate is linked into the product. [`FakeComfyui`], [`FakeA1111`], [`FakeOpenai`],
//! [`FakeReplicate`] and [`FakeRunpod`] are HTTP (and WebSocket) servers speaking those services'
//! real wire formats, scriptable by tests. [`ObjectServer`] runs a real object-store server
//! (Azurite, moto's S3, a GCS emulator); [`SlowProxy`] delays (or cuts) the requests to one.

mod fake_a1111;
mod fake_comfyui;
pub mod fake_nvml;
mod fake_openai;
mod fake_replicate;
mod fake_runpod;
mod file_server;
mod object_server;
mod redis_server;
mod serve;
mod slow_proxy;

pub use fake_a1111::FakeA1111;
pub use fake_comfyui::{FakeComfyui, Seen as ComfyuiSeen};
pub use fake_openai::FakeOpenai;
pub use fake_replicate::FakeReplicate;
pub use fake_runpod::FakeRunpod;
pub use file_server::{FileServer, SeenRequest};
pub use object_server::{AZURITE_ACCOUNT, AZURITE_KEY, ListedObject, ObjectServer, StoreKind};
pub use redis_server::RedisServer;
pub use serve::TINY_PNG;
pub use slow_proxy::SlowProxy;

use std::net::TcpListener;

/// Returns a loopback TCP port that was free a moment ago.
///
/// The port is released before returning, so a racing process could take it; tests that bind
/// it immediately after are fine in practice on a test machine.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port cannot fail on loopback");
    listener.local_addr().expect("a bound listener has an address").port()
}

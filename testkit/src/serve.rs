//! Runs an axum router on its own thread and runtime, so a fake keeps answering however busy (or
//! blocked) the test's own runtime is, and stops when its handle is dropped.

use std::net::SocketAddr;
use std::thread::JoinHandle;

use axum::Router;
use tokio::sync::oneshot;

/// A server running on a background thread; stopped on drop.
#[derive(Debug)]
pub(crate) struct Served {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

/// Binds `127.0.0.1:port` (0 = any free port) and serves the router `make` builds (inside the
/// server's runtime, so it may spawn tasks).
pub(crate) fn serve(port: u16, make: impl FnOnce() -> Router + Send + 'static) -> Served {
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop, stop_rx) = oneshot::channel::<()>();
    let thread = std::thread::Builder::new()
        .name("testkit-fake".to_owned())
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("a test machine can build a tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
                    .await
                    .unwrap_or_else(|e| panic!("cannot bind 127.0.0.1:{port}: {e}"));
                let addr = listener.local_addr().expect("a bound listener has an address");
                let router = make();
                let _ = addr_tx.send(addr);
                tokio::select! {
                    r = axum::serve(listener, router) => {
                        if let Err(e) = r {
                            eprintln!("fake server stopped: {e}");
                        }
                    }
                    _ = stop_rx => {}
                }
            });
            // Dropping the runtime here aborts every connection and task of the fake.
        })
        .expect("spawning a thread cannot fail on a test machine");
    let addr = addr_rx
        .recv()
        .expect("the fake server thread reports its address or panics");
    Served {
        addr,
        stop: Some(stop),
        thread: Some(thread),
    }
}

impl Served {
    /// Blocks until the server stops (for the standalone fake binaries).
    pub(crate) fn wait(mut self) {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A 1×1 PNG, the image every fake returns.
pub const TINY_PNG: &[u8] = &[
    0x89, 0x50, 0x4E, 0x47, 0x0D, 0x0A, 0x1A, 0x0A, 0x00, 0x00, 0x00, 0x0D, 0x49, 0x48, 0x44, 0x52, 0x00, 0x00, 0x00,
    0x01, 0x00, 0x00, 0x00, 0x01, 0x08, 0x06, 0x00, 0x00, 0x00, 0x1F, 0x15, 0xC4, 0x89, 0x00, 0x00, 0x00, 0x0D, 0x49,
    0x44, 0x41, 0x54, 0x78, 0x9C, 0x63, 0xF8, 0xCF, 0xC0, 0xF0, 0x1F, 0x00, 0x05, 0x00, 0x01, 0xFF, 0x89, 0x99, 0x3D,
    0x1D, 0x00, 0x00, 0x00, 0x00, 0x49, 0x45, 0x4E, 0x44, 0xAE, 0x42, 0x60, 0x82,
];

//! A delaying TCP proxy in front of a real server (an object store): each request is held for
//! the proxy's delay before it is passed on, and the proxy can be taken down (connections are
//! cut and new ones closed at once, as a store that went away) and brought back. The bytes pass
//! unchanged, so the server and its client speak their real protocol through it.
//!
//! A request is told from the bytes: the first bytes a client sends on a connection, and the
//! first it sends after the server answered, start one.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Debug, Default)]
struct State {
    delay_ms: AtomicU64,
    down: AtomicBool,
    requests: AtomicUsize,
}

/// A running proxy, stopped on drop.
#[derive(Debug)]
pub struct SlowProxy {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl SlowProxy {
    /// A proxy on a free loopback port to `upstream` (`http://host:port` or `host:port`) that
    /// holds each request `delay`.
    pub fn start(upstream: &str, delay: Duration) -> SlowProxy {
        let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_owned();
        let state = Arc::new(State::default());
        state.delay_ms.store(millis(delay), Ordering::SeqCst);
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("binding loopback");
        listener.set_nonblocking(true).expect("a non-blocking listener");
        let addr = listener.local_addr().expect("a bound listener has an address");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn({
            let state = state.clone();
            move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .enable_all()
                    .build()
                    .expect("a runtime for the proxy");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener).expect("a tokio listener");
                    tokio::select! {
                        _ = stopped => {}
                        () = accept(listener, upstream, state) => {}
                    }
                });
                rt.shutdown_background();
            }
        });
        SlowProxy {
            addr,
            state,
            stop: Some(stop),
            thread: Some(thread),
        }
    }

    /// The proxy's base URL, `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Holds each request from now on this long.
    pub fn set_delay(&self, delay: Duration) {
        self.state.delay_ms.store(millis(delay), Ordering::SeqCst);
    }

    /// Takes the proxy down (`true`: open connections are cut, new ones closed at once) or
    /// brings it back.
    pub fn set_down(&self, down: bool) {
        self.state.down.store(down, Ordering::SeqCst);
    }

    /// The requests seen so far.
    pub fn requests(&self) -> usize {
        self.state.requests.load(Ordering::SeqCst)
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

async fn accept(listener: TcpListener, upstream: String, state: Arc<State>) {
    while let Ok((client, _)) = listener.accept().await {
        if state.down.load(Ordering::SeqCst) {
            drop(client);
            continue;
        }
        tokio::spawn(relay(client, upstream.clone(), state.clone()));
    }
}

/// Passes one connection's bytes both ways, holding each request the delay.
async fn relay(client: TcpStream, upstream: String, state: Arc<State>) {
    let Ok(server) = TcpStream::connect(&upstream).await else {
        return;
    };
    let answered = Arc::new(AtomicBool::new(true));
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = server.into_split();
    let up = {
        let state = state.clone();
        let answered = answered.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match cr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if answered.swap(false, Ordering::SeqCst) {
                    state.requests.fetch_add(1, Ordering::SeqCst);
                    let delay = state.delay_ms.load(Ordering::SeqCst);
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                }
                if state.down.load(Ordering::SeqCst) || sw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let down = {
        let state = state.clone();
        async move {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = match sr.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                answered.store(true, Ordering::SeqCst);
                if state.down.load(Ordering::SeqCst) || cw.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    };
    let cut = async {
        while !state.down.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // Whichever way ends first ends the connection (both halves are dropped with it).
    tokio::select! {
        () = up => {}
        () = down => {}
        () = cut => {}
    }
}

//! A small real HTTP/1.1 file server for download tests: serves fixed files, honours
//! `Range: bytes=N-` with `206 Partial Content`, records every request's path and range, and can
//! cut a file's first full response short (the promised `Content-Length`, fewer bytes, then the
//! connection closes) to simulate an interrupted download, and can throttle a file's responses
//! to a rate so a download lasts long enough to be watched.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// One request the server saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeenRequest {
    /// The request path.
    pub path: String,
    /// The `Range` header, if any.
    pub range: Option<String>,
    /// The `Authorization` header, if any.
    pub authorization: Option<String>,
}

#[derive(Debug, Default)]
struct State {
    // Shared, so serving a large file (the models benchmark's 1 GB) copies nothing.
    files: BTreeMap<String, (Arc<Vec<u8>>, String)>,
    cut_first: BTreeMap<String, usize>,
    throttle: BTreeMap<String, usize>,
    seen: Vec<SeenRequest>,
}

/// A running file server on a loopback port; stops when dropped.
#[derive(Debug)]
pub struct FileServer {
    port: u16,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl FileServer {
    /// Starts a server with no files.
    pub fn start() -> FileServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding an ephemeral port cannot fail on loopback");
        let port = listener.local_addr().expect("a bound listener has an address").port();
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (state.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    break;
                }
                if let Ok(conn) = conn {
                    let s = s.clone();
                    std::thread::spawn(move || serve(conn, &s));
                }
            }
        });
        FileServer {
            port,
            state,
            stop,
            thread: Some(thread),
        }
    }

    /// Serves `body` at `path` with `content_type`.
    pub fn add(&self, path: &str, body: Vec<u8>, content_type: &str) {
        self.lock()
            .files
            .insert(path.to_owned(), (Arc::new(body), content_type.to_owned()));
    }

    /// Cuts the first full (non-range) response of `path` after `bytes` bytes.
    pub fn cut_first(&self, path: &str, bytes: usize) {
        self.lock().cut_first.insert(path.to_owned(), bytes);
    }

    /// Sends every later response body of `path` at about `bytes_per_sec` (in 64 KiB pieces).
    pub fn throttle(&self, path: &str, bytes_per_sec: usize) {
        self.lock().throttle.insert(path.to_owned(), bytes_per_sec.max(1));
    }

    /// `http://127.0.0.1:<port><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.lock().seen.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state
            .lock()
            .expect("the file server never panics while holding its lock")
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve(conn: TcpStream, state: &Mutex<State>) {
    let mut reader = BufReader::new(match conn.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut out = conn;
    let mut line = String::new();
    if reader.read_line(&mut line).unwrap_or(0) == 0 {
        return;
    }
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let mut range = None;
    let mut authorization = None;
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = h.split_once(':') {
            if k.trim().eq_ignore_ascii_case("range") {
                range = Some(v.trim().to_owned());
            } else if k.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_owned());
            }
        }
    }
    let (file, cut, rate) = {
        let mut s = state
            .lock()
            .expect("the file server never panics while holding its lock");
        s.seen.push(SeenRequest {
            path: path.clone(),
            range: range.clone(),
            authorization,
        });
        let cut = if range.is_none() {
            s.cut_first.remove(&path)
        } else {
            None
        };
        (s.files.get(&path).cloned(), cut, s.throttle.get(&path).copied())
    };
    let Some((body, ctype)) = file else {
        let _ = out.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        return;
    };
    let start = range
        .as_deref()
        .and_then(|r| r.strip_prefix("bytes="))
        .and_then(|r| r.strip_suffix('-'))
        .and_then(|n| n.parse::<usize>().ok());
    match start {
        Some(s) if s >= body.len() => {
            let _ = write!(
                out,
                "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                body.len()
            );
        }
        Some(s) => {
            let _ = write!(
                out,
                "HTTP/1.1 206 Partial Content\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nContent-Range: bytes {s}-{}/{}\r\nConnection: close\r\n\r\n",
                body.len() - s,
                body.len() - 1,
                body.len()
            );
            write_body(&mut out, &body[s..], rate);
        }
        None => {
            let _ = write!(
                out,
                "HTTP/1.1 200 OK\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nAccept-Ranges: bytes\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let n = cut.unwrap_or(body.len()).min(body.len());
            write_body(&mut out, &body[..n], rate);
        }
    }
    let _ = out.flush();
    let _ = out.shutdown(std::net::Shutdown::Both);
}

/// Writes `body`, at about `rate` bytes a second when throttled.
fn write_body(out: &mut TcpStream, body: &[u8], rate: Option<usize>) {
    let Some(rate) = rate else {
        let _ = out.write_all(body);
        return;
    };
    const PIECE: usize = 64 * 1024;
    let pause = std::time::Duration::from_secs_f64(PIECE as f64 / rate as f64);
    for piece in body.chunks(PIECE) {
        if out.write_all(piece).and_then(|()| out.flush()).is_err() {
            return;
        }
        std::thread::sleep(pause);
    }
}

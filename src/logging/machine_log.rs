//! The machine's own log lines, kept as a bounded in-memory tail so that `machine logs machine`
//! shows and follows them like a service's output.
//!
//! The log subscriber writes through [`TeeStderr`]: each formatted event goes out through
//! [`super::Console`] as before, and its lines (without colour codes) into the tail. The tail is process-wide because
//! the subscriber is: there is one machine log per process.

use std::io::{self, Write};
use std::sync::{Arc, OnceLock};

use super::Tail;

/// The name `machine logs` and the log routes give the machine's own log.
pub const MACHINE_LOG: &str = "machine";

/// How many of the machine's own log lines are kept.
pub const MACHINE_LOG_LINES: usize = 2000;

/// The machine's own log tail.
pub fn machine_log() -> Arc<Tail> {
    static TAIL: OnceLock<Arc<Tail>> = OnceLock::new();
    // The formatter stamps each line itself (text and JSON alike), so the tail does not.
    Arc::clone(TAIL.get_or_init(|| Arc::new(Tail::unstamped(MACHINE_LOG_LINES))))
}

/// A `tracing_subscriber` writer: stderr, and a copy of each line into [`machine_log`].
#[derive(Debug, Clone, Copy, Default)]
pub struct TeeStderr;

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for TeeStderr {
    type Writer = TeeWriter;

    fn make_writer(&'a self) -> TeeWriter {
        TeeWriter { event: Vec::new() }
    }
}

/// The writer of one event: written through to stderr, kept whole until the event is done.
#[derive(Debug)]
pub struct TeeWriter {
    event: Vec<u8>,
}

impl Write for TeeWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        super::Console.write_all(buf)?;
        self.event.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        super::Console.flush()
    }
}

impl Drop for TeeWriter {
    fn drop(&mut self) {
        if self.event.is_empty() {
            return;
        }
        let tail = machine_log();
        for line in String::from_utf8_lossy(&self.event).lines() {
            tail.push(strip_ansi(line));
        }
    }
}

/// `line` without ANSI escape sequences (`ESC [ ... letter`), which a terminal reads as colour
/// but a log reader as noise.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if c.is_ascii_alphabetic() {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn colour_codes_are_dropped() {
        assert_eq!(
            strip_ansi("\x1b[2m2026-01-01T00:00:00Z\x1b[0m \x1b[32m INFO\x1b[0m machine: up"),
            "2026-01-01T00:00:00Z  INFO machine: up"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn each_line_of_an_event_is_kept() {
        let (_, before) = machine_log().last_and_cursor(0);
        {
            let mut w = TeeWriter { event: Vec::new() };
            let _ = w.write_all(b"first line\nsecond ");
            let _ = w.write_all(b"line\n");
        }
        let (lines, _) = machine_log().after(before);
        assert!(
            lines.ends_with(&["first line".to_owned(), "second line".to_owned()]),
            "{lines:?}"
        );
    }
}

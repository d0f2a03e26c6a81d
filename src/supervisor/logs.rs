//! Service output: split into lines with a hard length limit, copied to the machine's own
//! stdout/stderr (`[name] line`, or one JSON object per line with `LOG_FORMAT=json`, through
//! [`crate::logging::service_line`]), appended to a size-rotated file per service under
//! `<workspace>/logs/`, and kept as an in-memory tail for the status API.
//!
//! Memory is bounded whatever a child prints: a line longer than `max_line_bytes` is cut there
//! and the rest of it is dropped (and counted), bytes that are not UTF-8 are replaced, and the
//! tail keeps at most `tail_lines` lines. Writing a log file never fails a service: an I/O error
//! is reported once and the file is reopened on the next line.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use tokio::io::{AsyncRead, AsyncReadExt};

use crate::config::SupervisorConfig;
use crate::logging::{Output, Tail};

/// Splits a byte stream into lines of at most `max` bytes.
#[derive(Debug)]
pub struct LineSplitter {
    buf: Vec<u8>,
    max: usize,
    /// Whether the current line already hit `max` and its remaining bytes are being dropped.
    cutting: bool,
    dropped: u64,
}

impl LineSplitter {
    /// A splitter that cuts lines at `max` bytes (at least 1).
    pub fn new(max: usize) -> LineSplitter {
        LineSplitter {
            buf: Vec::new(),
            max: max.max(1),
            cutting: false,
            dropped: 0,
        }
    }

    /// Feeds `bytes`, calling `emit` with each complete line (without its `\n`, and without a
    /// trailing `\r`). A line that reaches `max` bytes is emitted at once, cut; the rest of it,
    /// up to the next `\n`, is dropped.
    pub fn push(&mut self, mut bytes: &[u8], mut emit: impl FnMut(&[u8])) {
        while !bytes.is_empty() {
            let newline = bytes.iter().position(|b| *b == b'\n');
            let (part, rest, ends) = match newline {
                Some(i) => (&bytes[..i], &bytes[i + 1..], true),
                None => (bytes, &[][..], false),
            };
            bytes = rest;
            if self.cutting {
                self.dropped += part.len() as u64;
            } else {
                let room = self.max - self.buf.len();
                let take = part.len().min(room);
                self.buf.extend_from_slice(&part[..take]);
                self.dropped += (part.len() - take) as u64;
                if self.buf.len() == self.max && !ends {
                    emit(trim_cr(&self.buf));
                    self.buf.clear();
                    self.cutting = true;
                }
            }
            if ends {
                if self.cutting {
                    self.cutting = false;
                } else {
                    emit(trim_cr(&self.buf));
                    self.buf.clear();
                }
            }
        }
    }

    /// Emits what is left of an unterminated last line.
    pub fn finish(&mut self, mut emit: impl FnMut(&[u8])) {
        if !self.buf.is_empty() {
            emit(trim_cr(&self.buf));
            self.buf.clear();
        }
        self.cutting = false;
    }

    /// Bytes dropped so far from lines that were too long.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }
}

fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// A log file that rotates by size: `name.log` is renamed to `name.log.1` (which moves to
/// `name.log.2`, ...) once the next line would take it past `max_bytes`; `keep` rotated files
/// are kept.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<File>,
    size: u64,
    failed: bool,
}

impl RotatingFile {
    /// A rotating file at `path`; it is opened (appending) on the first write.
    pub fn new(path: PathBuf, max_bytes: u64, keep: u32) -> RotatingFile {
        RotatingFile {
            path,
            max_bytes,
            keep,
            file: None,
            size: 0,
            failed: false,
        }
    }

    /// Appends `line` and a newline, rotating first when needed. Errors are logged once per
    /// failure streak and otherwise ignored: a full disk must not take a service down.
    pub fn write_line(&mut self, line: &[u8]) {
        match self.try_write(line) {
            Ok(()) => self.failed = false,
            Err(e) => {
                if !self.failed {
                    tracing::warn!(path = %self.path.display(), "failed to write the service log: {e}");
                }
                self.failed = true;
                self.file = None;
            }
        }
    }

    fn try_write(&mut self, line: &[u8]) -> io::Result<()> {
        let len = line.len() as u64 + 1;
        if self.file.is_none() {
            let f = OpenOptions::new().create(true).append(true).open(&self.path)?;
            self.size = f.metadata()?.len();
            self.file = Some(f);
        }
        if self.size > 0 && self.size + len > self.max_bytes {
            self.rotate()?;
        }
        let f = self.file.as_mut().expect("the file was opened above");
        let mut rec = Vec::with_capacity(line.len() + 1);
        rec.extend_from_slice(line);
        rec.push(b'\n');
        f.write_all(&rec)?;
        self.size += len;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        if self.keep == 0 {
            std::fs::remove_file(&self.path)?;
        } else {
            for i in (1..self.keep).rev() {
                let from = numbered(&self.path, i);
                if from.exists() {
                    std::fs::rename(&from, numbered(&self.path, i + 1))?;
                }
            }
            std::fs::rename(&self.path, numbered(&self.path, 1))?;
        }
        self.file = Some(OpenOptions::new().create(true).append(true).open(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

fn numbered(path: &Path, i: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{i}"));
    PathBuf::from(s)
}

/// Which of the machine's outputs a stream is copied to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    /// The machine's stdout.
    Stdout,
    /// The machine's stderr.
    Stderr,
}

/// Everything one service's output goes to; shared by its stdout and stderr readers.
#[derive(Debug)]
pub struct ServiceLog {
    name: String,
    file: Mutex<RotatingFile>,
    tail: Arc<Tail>,
    max_line_bytes: usize,
}

impl ServiceLog {
    /// The log of service `name`, writing `<dir>/<name>.log`.
    pub fn new(name: &str, dir: &Path, cfg: &SupervisorConfig) -> ServiceLog {
        ServiceLog {
            name: name.to_owned(),
            file: Mutex::new(RotatingFile::new(
                dir.join(format!("{name}.log")),
                cfg.log_max_bytes,
                cfg.log_files,
            )),
            tail: Arc::new(Tail::new(cfg.log_tail_lines)),
            max_line_bytes: cfg.log_max_line_bytes,
        }
    }

    /// The in-memory tail.
    pub fn tail(&self) -> &Arc<Tail> {
        &self.tail
    }

    /// Records one line of output.
    pub fn line(&self, stream: Stream, raw: &[u8]) {
        let text = String::from_utf8_lossy(raw);
        let output = match stream {
            Stream::Stdout => Output::Stdout,
            Stream::Stderr => Output::Stderr,
        };
        crate::logging::service_line(&self.name, output, &text);
        self.file
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .write_line(text.as_bytes());
        self.tail.push(text.into_owned());
    }

    /// Copies `reader` into the log until it ends, one line at a time.
    pub async fn copy(&self, stream: Stream, mut reader: impl AsyncRead + Unpin) {
        let mut splitter = LineSplitter::new(self.max_line_bytes);
        let mut buf = vec![0u8; 8192];
        loop {
            match reader.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => splitter.push(&buf[..n], |l| self.line(stream, l)),
            }
        }
        splitter.finish(|l| self.line(stream, l));
        if splitter.dropped() > 0 {
            tracing::warn!(
                service = %self.name,
                bytes = splitter.dropped(),
                "cut overlong output lines"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn split(max: usize, chunks: &[&[u8]]) -> Vec<Vec<u8>> {
        let mut s = LineSplitter::new(max);
        let mut out = Vec::new();
        for c in chunks {
            s.push(c, |l| out.push(l.to_vec()));
        }
        s.finish(|l| out.push(l.to_vec()));
        out
    }

    #[test]
    fn lines_split_across_chunks() {
        assert_eq!(
            split(100, &[b"ab", b"c\nde\r\n", b"\nf"]),
            [b"abc".to_vec(), b"de".to_vec(), b"".to_vec(), b"f".to_vec()]
        );
    }

    #[test]
    fn long_lines_are_cut_and_the_rest_dropped() {
        let mut s = LineSplitter::new(4);
        let mut out = Vec::new();
        s.push(b"abcdefgh", |l| out.push(l.to_vec()));
        s.push(b"ij\nxy\n", |l| out.push(l.to_vec()));
        assert_eq!(out, [b"abcd".to_vec(), b"xy".to_vec()]);
        assert_eq!(s.dropped(), 6);
    }

    proptest! {
        #[test]
        fn splitting_is_bounded_and_chunking_does_not_matter(
            data in proptest::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..2000),
            cut in 0usize..2000,
            max in 1usize..64,
        ) {
            let cut = cut.min(data.len());
            let whole = split(max, &[&data]);
            let parts = split(max, &[&data[..cut], &data[cut..]]);
            prop_assert_eq!(&whole, &parts);
            prop_assert!(whole.iter().all(|l| l.len() <= max));
            // With no overlong line, splitting is exactly `split(b'\n')` (less a final empty line).
            if data.split(|b| *b == b'\n').all(|l| l.len() < max) {
                let mut expected: Vec<Vec<u8>> = data
                    .split(|b| *b == b'\n')
                    .map(|l| l.strip_suffix(b"\r").unwrap_or(l).to_vec())
                    .collect();
                // Only a trailing newline leaves an empty piece that is not a line; a final "\r"
                // is a (partial) line of its own, empty once its "\r" is stripped.
                if data.is_empty() || data.last() == Some(&b'\n') {
                    expected.pop();
                }
                prop_assert_eq!(whole, expected);
            }
        }
    }

    #[test]
    fn files_rotate_at_the_size_and_keep_the_count() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("svc.log");
        let mut f = RotatingFile::new(path.clone(), 100, 2);
        for i in 0..50 {
            f.write_line(format!("line {i:03} ........").as_bytes());
        }
        let sizes: Vec<u64> = ["svc.log", "svc.log.1", "svc.log.2"]
            .iter()
            .map(|n| std::fs::metadata(dir.path().join(n)).unwrap().len())
            .collect();
        assert!(sizes.iter().all(|s| *s <= 100), "{sizes:?}");
        assert!(!dir.path().join("svc.log.3").exists());
        let newest = std::fs::read_to_string(&path).unwrap();
        assert!(newest.ends_with("line 049 ........\n"), "{newest}");
        let older = std::fs::read_to_string(dir.path().join("svc.log.1")).unwrap();
        let first_newest: u32 = newest[5..8].parse().unwrap();
        let last_older: u32 = older.lines().last().unwrap()[5..8].parse().unwrap();
        assert_eq!(last_older + 1, first_newest, "rotation loses no line");
    }

    #[test]
    fn tail_keeps_the_last_lines_and_replaces_bad_utf8() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = crate::config::Config::for_tests(&[]).machine.supervisor;
        cfg.log_tail_lines = 3;
        cfg.log_max_line_bytes = 80;
        let log = ServiceLog::new("t", dir.path(), &cfg);
        for i in 0..10 {
            log.line(Stream::Stdout, format!("l{i}").as_bytes());
        }
        log.line(Stream::Stderr, b"bad \xff byte");
        // Each kept line starts with the time it arrived.
        let unstamped = |lines: Vec<String>| -> Vec<String> {
            lines
                .iter()
                .map(|l| l.split_once(' ').expect("stamped").1.to_owned())
                .collect()
        };
        assert_eq!(unstamped(log.tail().last(10)), ["l8", "l9", "bad \u{fffd} byte"]);
        assert_eq!(unstamped(log.tail().last(1)), ["bad \u{fffd} byte"]);
        let file = std::fs::read_to_string(dir.path().join("t.log")).unwrap();
        assert_eq!(file.lines().count(), 11);
    }
}

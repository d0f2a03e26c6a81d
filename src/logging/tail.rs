//! A bounded in-memory tail of log lines, numbered as they arrive: a service's output (kept by
//! the supervisor) or the machine's own log ([`super::machine_log`]), read by the status API
//! and followed by `machine logs -f`.

use std::collections::VecDeque;
use std::sync::{Mutex, PoisonError};

/// The last lines of a service's output (or of the machine's own log), shared between the
/// writer and the status API. Each line is numbered as it arrives, so a reader that follows the
/// log asks for the lines after the last one it saw ([`Tail::after`]) without missing or
/// repeating any while the tail rotates.
#[derive(Debug)]
pub struct Tail {
    lines: Mutex<Lines>,
    cap: usize,
    /// Whether each line gets the time it arrived in front (service output has none of its own;
    /// the machine's log lines carry theirs).
    stamp: bool,
}

#[derive(Debug, Default)]
struct Lines {
    kept: VecDeque<String>,
    /// How many lines were ever pushed: the number the next one gets.
    total: u64,
}

impl Tail {
    /// An empty tail keeping at most `cap` lines, each stamped with the time it arrived.
    pub fn new(cap: usize) -> Tail {
        Tail {
            lines: Mutex::new(Lines {
                kept: VecDeque::with_capacity(cap.min(64)),
                total: 0,
            }),
            cap,
            stamp: true,
        }
    }

    /// An empty tail keeping at most `cap` lines as they are given (already stamped).
    pub fn unstamped(cap: usize) -> Tail {
        Tail {
            stamp: false,
            ..Tail::new(cap)
        }
    }

    /// Appends one line, dropping the oldest at the cap.
    pub(crate) fn push(&self, line: String) {
        if self.cap == 0 {
            return;
        }
        let line = if self.stamp {
            format!(
                "{} {line}",
                humantime::format_rfc3339_millis(std::time::SystemTime::now())
            )
        } else {
            line
        };
        let mut lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        if lines.kept.len() == self.cap {
            lines.kept.pop_front();
        }
        lines.kept.push_back(line);
        lines.total += 1;
    }

    /// The last `n` lines, oldest first.
    pub fn last(&self, n: usize) -> Vec<String> {
        self.last_and_cursor(n).0
    }

    /// The last `n` lines, oldest first, and the cursor to pass to [`Tail::after`] for the
    /// lines that follow them.
    pub fn last_and_cursor(&self, n: usize) -> (Vec<String>, u64) {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let kept = &lines.kept;
        (
            kept.iter().skip(kept.len().saturating_sub(n)).cloned().collect(),
            lines.total,
        )
    }

    /// The lines pushed since `cursor` (those already dropped from the tail are skipped), and
    /// the cursor after them.
    pub fn after(&self, cursor: u64) -> (Vec<String>, u64) {
        let lines = self.lines.lock().unwrap_or_else(PoisonError::into_inner);
        let first = lines.total - lines.kept.len() as u64;
        let skip = usize::try_from(cursor.saturating_sub(first)).unwrap_or(usize::MAX);
        (lines.kept.iter().skip(skip).cloned().collect(), lines.total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_follower_sees_every_kept_line_once() {
        let tail = Tail::unstamped(3);
        tail.push("a".into());
        let (first, cursor) = tail.last_and_cursor(10);
        assert_eq!(first, ["a"]);
        for l in ["b", "c", "d", "e"] {
            tail.push(l.into());
        }
        // "b" rotated out before the follower came back; the rest arrive once, in order.
        assert_eq!(tail.after(cursor), (vec!["c".into(), "d".into(), "e".into()], 5));
        assert_eq!(tail.after(5), (vec![], 5));
        let stamped = Tail::new(2);
        stamped.push("x".into());
        let line = &stamped.last(1)[0];
        assert!(
            line.ends_with("Z x") && line.len() == "2026-01-01T00:00:00.000Z x".len(),
            "{line}"
        );
    }
}

//! Everything the machine writes to its own stdout and stderr while it runs: log events (through
//! `tracing-subscriber`, filtered by `RUST_LOG`), the supervised services' lines, and the
//! installers' progress bars.
//!
//! There is one writer ([`Console`]): every line goes out whole, and while progress bars are
//! drawn the bars are hidden for the line and redrawn below it, so a bar never cuts a log line.
//! Bars are drawn only in text format with stderr a terminal.
//!
//! With `LOG_FORMAT=json` every line is one JSON object: events carry `timestamp`, `level`,
//! `message`, their fields and `target`, with fields as plain JSON values (numbers, booleans,
//! `null`, arrays, strings), never Rust `Debug` text; a service's line is
//! `{"timestamp", "level", "service", "stream", "line", "target"}`. In text format, colour is
//! used only when stderr is a terminal and `NO_COLOR` is unset or empty (<https://no-color.org>),
//! so files and pipes get no escape codes.
//!
//! Every event is also kept in the machine's own log tail ([`machine_log`]), which `machine logs
//! machine` shows and follows: a [`Tail`], the bounded numbered buffer of lines the supervisor
//! keeps for each service's output too.

mod machine_log;
mod tail;

use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::sync::OnceLock;
use std::time::Instant;

use serde_json::Value;
use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, MakeWriter};
use tracing_subscriber::registry::LookupSpan;

use crate::config::{LogConfig, LogFormat};

pub use machine_log::{MACHINE_LOG, MACHINE_LOG_LINES, TeeStderr, machine_log};
pub use tail::Tail;

/// What `init` decided, for the parts that write without going through `tracing`.
#[derive(Debug)]
struct Setup {
    format: LogFormat,
    bars: Option<indicatif::MultiProgress>,
}

static SETUP: OnceLock<Setup> = OnceLock::new();
static STARTED: OnceLock<Instant> = OnceLock::new();

/// Installs the global subscriber and decides the output format and colour. Calling it twice
/// keeps the first set-up.
pub fn init(log: &LogConfig) {
    STARTED.get_or_init(Instant::now);
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let terminal = io::stderr().is_terminal();
    if SETUP
        .set(Setup {
            format: log.format,
            // Bars redraw in place, which only a terminal shows; in JSON they would be noise.
            bars: (log.format == LogFormat::Text && terminal).then(indicatif::MultiProgress::new),
        })
        .is_err()
    {
        return;
    }
    let filter = EnvFilter::try_new(&log.filter).unwrap_or_else(|_| EnvFilter::new("info"));
    // Through the tee: each event goes out through `Console` (which keeps it clear of the
    // progress bars) and into the machine's own log tail for `machine logs`.
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(TeeStderr);
    let _ = match log.format {
        LogFormat::Text => builder.with_ansi(terminal && !no_color).try_init(),
        LogFormat::Json => builder.event_format(JsonLines).try_init(),
    };
}

/// When the machine started (the first `init`), for the "ready in" line.
pub fn started() -> Instant {
    *STARTED.get_or_init(Instant::now)
}

/// The log format `init` set (text before it ran).
pub fn format() -> LogFormat {
    SETUP.get().map_or(LogFormat::Text, |s| s.format)
}

/// The progress bars' container, when bars are drawn (text format, stderr a terminal). Every
/// bar must be added to this one, so that [`Console`] can hide them while it writes a line.
pub fn progress_bars() -> Option<indicatif::MultiProgress> {
    SETUP.get().and_then(|s| s.bars.clone())
}

/// Which of the machine's own outputs a line goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    /// The machine's stdout.
    Stdout,
    /// The machine's stderr.
    Stderr,
}

/// Writes `bytes` (whole lines) to the machine's stdout or stderr with the progress bars, if
/// any, hidden meanwhile. The machine's own output is the container log: when it is closed
/// there is nobody to tell, so errors are ignored.
pub fn write(output: Output, bytes: &[u8]) {
    let put = || {
        let _ = match output {
            Output::Stdout => io::stdout().lock().write_all(bytes),
            Output::Stderr => io::stderr().lock().write_all(bytes),
        };
    };
    match SETUP.get().and_then(|s| s.bars.as_ref()) {
        Some(bars) => bars.suspend(put),
        None => put(),
    }
}

/// Writes one line a supervised service printed: `[name] line` in text format, an object with
/// `service`, `stream` and `line` in JSON format.
pub fn service_line(service: &str, output: Output, line: &str) {
    let mut out = match format() {
        LogFormat::Text => format!("[{service}] {line}"),
        LogFormat::Json => {
            let stream = match output {
                Output::Stdout => "stdout",
                Output::Stderr => "stderr",
            };
            let record = Fields(vec![
                ("timestamp".to_owned(), Value::String(timestamp())),
                ("level".to_owned(), Value::String("INFO".to_owned())),
                ("service".to_owned(), Value::String(service.to_owned())),
                ("stream".to_owned(), Value::String(stream.to_owned())),
                ("line".to_owned(), Value::String(line.to_owned())),
                ("target".to_owned(), Value::String("machine::service".to_owned())),
            ]);
            record.to_json()
        }
    };
    out.push('\n');
    write(output, out.as_bytes());
}

/// Now as the JSON lines' `timestamp` writes it, for a command's own JSON lines.
pub(crate) fn timestamp() -> String {
    let mut s = String::new();
    // Writing into a String cannot fail.
    let _ = tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut s));
    s
}

/// The `MakeWriter` of the subscriber: every event goes through [`write()`], on stderr.
#[derive(Debug, Clone, Copy)]
pub struct Console;

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        // The formatter hands over a whole event at once, so the line is never split.
        write(Output::Stderr, buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        io::stderr().flush()
    }
}

impl<'a> MakeWriter<'a> for Console {
    type Writer = Console;

    fn make_writer(&'a self) -> Self::Writer {
        Console
    }
}

/// The JSON event format: one object per line, fields as plain values.
#[derive(Debug, Clone, Copy)]
struct JsonLines;

impl<S, N> FormatEvent<S, N> for JsonLines
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(&self, _ctx: &FmtContext<'_, S, N>, mut writer: Writer<'_>, event: &Event<'_>) -> fmt::Result {
        let meta = event.metadata();
        let mut fields = Fields(vec![
            ("timestamp".to_owned(), Value::String(timestamp())),
            ("level".to_owned(), Value::String(meta.level().as_str().to_owned())),
        ]);
        event.record(&mut fields);
        fields
            .0
            .push(("target".to_owned(), Value::String(meta.target().to_owned())));
        writeln!(writer, "{}", fields.to_json())
    }
}

/// An event's fields in the order they were recorded.
struct Fields(Vec<(String, Value)>);

impl Fields {
    fn put(&mut self, field: &Field, value: Value) {
        // tracing's `log` bridge names its fields `log.*`; keep the names as they are.
        self.0.push((field.name().to_owned(), value));
    }

    fn to_json(&self) -> String {
        let mut s = String::from("{");
        for (i, (k, v)) in self.0.iter().enumerate() {
            if i > 0 {
                s.push(',');
            }
            s.push_str(&Value::String(k.clone()).to_string());
            s.push(':');
            s.push_str(&v.to_string());
        }
        s.push('}');
        s
    }
}

impl Visit for Fields {
    fn record_f64(&mut self, field: &Field, value: f64) {
        let v = serde_json::Number::from_f64(value).map_or_else(|| Value::String(value.to_string()), Value::Number);
        self.put(field, v);
    }

    fn record_i64(&mut self, field: &Field, value: i64) {
        self.put(field, Value::from(value));
    }

    fn record_u64(&mut self, field: &Field, value: u64) {
        self.put(field, Value::from(value));
    }

    fn record_bool(&mut self, field: &Field, value: bool) {
        self.put(field, Value::Bool(value));
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        self.put(field, Value::String(value.to_owned()));
    }

    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.put(field, Value::String(error_chain(value)));
    }

    fn record_debug(&mut self, field: &Field, value: &dyn fmt::Debug) {
        let text = format!("{value:?}");
        // The message is format arguments, whose Debug is their text.
        let v = if field.name() == "message" {
            Value::String(text)
        } else {
            plain(&text)
        };
        self.put(field, v);
    }
}

/// A field recorded with `?` (or `%`, which arrives the same way) as a plain JSON value: Rust's
/// `Debug` notation of the common shapes is undone (`None` is `null`, `Some(x)` is `x`, a quoted
/// string is the string, `[a, b]` is an array, `Name { a: 1 }` is `{"type": "Name", "a": 1}`, an
/// integer or a boolean is itself); anything else (a `Duration` like `1.5s`, a unit enum variant)
/// stays the text it is.
fn plain(text: &str) -> Value {
    let t = text.trim();
    if t == "None" {
        return Value::Null;
    }
    if t == "true" || t == "false" {
        return Value::Bool(t == "true");
    }
    if let Ok(n) = t.parse::<i64>()
        && n.to_string() == t
    {
        return Value::from(n);
    }
    if let Some(inner) = t.strip_prefix("Some(").and_then(|r| r.strip_suffix(')'))
        && balanced(inner)
    {
        return plain(inner);
    }
    if t.len() >= 2 && t.starts_with('"') && t.ends_with('"') {
        return Value::String(unquote(&t[1..t.len() - 1]));
    }
    if let Some(inner) = t.strip_prefix('[').and_then(|r| r.strip_suffix(']'))
        && balanced(inner)
    {
        return Value::Array(split_top(inner).into_iter().map(plain).collect());
    }
    if let Some((name, inner)) = t.split_once(" { ")
        && let Some(inner) = inner.strip_suffix(" }")
        && is_ident(name)
        && balanced(inner)
    {
        // A struct or struct variant: its fields, with its name as `type`.
        let mut object = serde_json::Map::new();
        object.insert("type".to_owned(), Value::String(name.to_owned()));
        for field in split_top(inner) {
            let Some((k, v)) = field.split_once(": ").filter(|(k, _)| is_ident(k)) else {
                return Value::String(text.to_owned());
            };
            object.insert(k.to_owned(), plain(v));
        }
        return Value::Object(object);
    }
    Value::String(text.to_owned())
}

fn is_ident(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_alphanumeric() || c == '_')
}

/// Whether brackets and quotes in `s` are balanced, so that it is one value (or a list's items).
fn balanced(s: &str) -> bool {
    let mut depth = 0i32;
    let mut quoted = false;
    let mut escaped = false;
    for c in s.chars() {
        if quoted {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            _ => {}
        }
    }
    depth == 0 && !quoted
}

/// Splits a list's inside at its top-level commas.
fn split_top(s: &str) -> Vec<&str> {
    if s.trim().is_empty() {
        return Vec::new();
    }
    let mut parts = Vec::new();
    let (mut depth, mut quoted, mut escaped, mut start) = (0i32, false, false, 0);
    for (i, c) in s.char_indices() {
        if quoted {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => quoted = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => quoted = true,
            '(' | '[' | '{' => depth += 1,
            ')' | ']' | '}' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(s[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(s[start..].trim());
    parts
}

/// Undoes the escapes of Rust's `Debug` for strings (`\"`, `\\`, `\n`, `\t`, `\r`, `\0`, `\'`,
/// `\u{..}`).
fn unquote(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('0') => out.push('\0'),
            Some('u') => {
                let code: String = chars.by_ref().skip(1).take_while(|c| *c != '}').collect();
                out.extend(u32::from_str_radix(&code, 16).ok().and_then(char::from_u32));
            }
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// An error and its sources as one line ("failed to bind ...: Address in use"), for logs and
/// status fields that have room for one line only.
///
/// (See [`human_duration`] for the one way a duration is written for people.)
///
/// Some errors (redis's among them) already print their source in their own message; a cause
/// that the line already ends with is not repeated.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !s.ends_with(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        cause = c.source();
    }
    s
}

/// A duration as people say it: `850ms`, `12s`, `3m 12s`, `2h 5m`, `3d 4h`; the one way logs,
/// `machine status` and `jobs show` write a duration for people.
pub fn human_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    match s {
        0 => format!("{}ms", d.as_millis()),
        1..60 => format!("{s}s"),
        60..3600 => format!("{}m {}s", s / 60, s % 60),
        3600..86400 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86400, s % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[derive(Debug, thiserror::Error)]
    #[error("failed to connect: {0}")]
    struct Echoing(#[source] io::Error);

    #[derive(Debug, thiserror::Error)]
    #[error("failed to start")]
    struct Outer(#[source] Echoing);

    #[test]
    fn every_cause_once() {
        let e = Outer(Echoing(io::Error::other("refused")));
        assert_eq!(error_chain(&e), "failed to start: failed to connect: refused");
    }

    #[derive(Debug)]
    enum Connector {
        Simulation,
    }

    #[derive(Debug)]
    #[expect(dead_code, reason = "the fields are read through Debug")]
    enum Attempt {
        Failed { retryable: bool, reason: String },
    }

    #[test]
    fn debug_text_becomes_plain_values() {
        let d = |v: &dyn fmt::Debug| plain(&format!("{v:?}"));
        assert_eq!(d(&None::<String>), Value::Null);
        assert_eq!(d(&Some("4383")), Value::from("4383"));
        assert_eq!(d(&Some(3)), Value::from(3));
        assert_eq!(d(&vec![Connector::Simulation]), serde_json::json!(["Simulation"]));
        assert_eq!(d(&Vec::<String>::new()), serde_json::json!([]));
        assert_eq!(
            d(&vec!["a, b".to_owned(), "q\"uote\n".to_owned()]),
            serde_json::json!(["a, b", "q\"uote\n"])
        );
        assert_eq!(d(&Duration::from_millis(1500)), Value::from("1.5s"));
        assert_eq!(d(&Some(Duration::from_secs(2))), Value::from("2s"));
        assert_eq!(d(&true), Value::Bool(true));
        assert_eq!(
            d(&Attempt::Failed {
                retryable: true,
                reason: "a, b: c".into()
            }),
            serde_json::json!({"type": "Failed", "retryable": true, "reason": "a, b: c"})
        );
        assert_eq!(d(&"\u{1b}[0m"), Value::from("\u{1b}[0m"));
        // Text that only looks like a number or a list stays text.
        assert_eq!(plain("001"), Value::from("001"));
        assert_eq!(plain("1e5"), Value::from("1e5"));
        assert_eq!(plain("[a] (b]"), Value::from("[a] (b]"));
    }

    /// Captures what the JSON format writes for events emitted under it.
    #[derive(Clone, Default)]
    struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn json_events_are_one_object_per_line_with_plain_fields() {
        let out = Captured::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .event_format(JsonLines)
            .with_writer(move || sink.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let connectors = vec![Connector::Simulation];
            let previous: Option<String> = None;
            let e = Outer(Echoing(io::Error::other("refused")));
            tracing::info!(worker = %"w1", ?connectors, ?previous, port = 9092u16, ok = true, "worker planned");
            tracing::warn!(error = &e as &dyn std::error::Error, "multi\nline");
        });
        let text = String::from_utf8(out.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert_eq!(lines[0]["message"], "worker planned");
        assert_eq!(lines[0]["level"], "INFO");
        assert_eq!(lines[0]["worker"], "w1");
        assert_eq!(lines[0]["connectors"], serde_json::json!(["Simulation"]));
        assert_eq!(lines[0]["previous"], Value::Null);
        assert_eq!(lines[0]["port"], 9092);
        assert_eq!(lines[0]["ok"], true);
        assert!(
            lines[0]["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')),
            "{text}"
        );
        assert_eq!(lines[1]["message"], "multi\nline");
        assert_eq!(lines[1]["error"], "failed to start: failed to connect: refused");
    }
}

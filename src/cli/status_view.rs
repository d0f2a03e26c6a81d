//! `machine status` as an operator reads it: the typed [`StatusDocument`] as tables that fit
//! the terminal (`COLUMNS`, else the terminal's width; no limit when printing to a pipe),
//! states by their wire names (`crash_loop` rather than the backoff it sits in), why a worker
//! does not claim, install progress, the broker's last error, and durations as people say them
//! (`3m 12s`, `4s ago`).
//!
//! Ids never wrap: a column holding ids keeps its content's width, so a 36-character job id
//! stays whole on one line and the other columns wrap around it.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use comfy_table::{ColumnConstraint, ContentArrangement, Table, Width};

use crate::health::status::{Gpu, Install, Machine, RedisStatus, Service, StatusDocument, Worker};

/// Renders the document for a terminal `width` columns wide (`None`, or a terminal that says
/// it has 0 columns: as wide as it needs).
pub(super) fn render(doc: &StatusDocument, width: Option<u16>, now: SystemTime) -> String {
    let width = width.filter(|w| *w > 0);
    let mut out = String::new();
    machine_lines(&mut out, &doc.machine, width);
    redis_lines(&mut out, &doc.redis, width);
    gpu_table(&mut out, &doc.gpus, width, now);
    install_table(&mut out, &doc.installs, width);
    service_table(&mut out, &doc.services, width, now);
    worker_table(&mut out, &doc.workers, width, now);
    out
}

/// The machine's line, and its critical failure or duplicate when it has one.
fn machine_lines(out: &mut String, m: &Machine, width: Option<u16>) {
    // The lines above the tables wrap between words like the notes below them.
    let line = format!(
        "machine {}  phase {}  up {}  version {}",
        m.id,
        m.phase.name(),
        duration(Duration::from_millis(m.uptime_ms)),
        m.version
    );
    out.push_str(&wrap(&line, width));
    if let Some(failure) = &m.critical_failure {
        out.push_str(&wrap(&format!("CRITICAL: {failure}"), width));
    }
    if let Some(d) = &m.duplicate {
        out.push_str(&wrap(
            &format!(
                "DUPLICATE: another machine runs as {} on host {} in workspace {}: both register the same worker ids; give each its own MACHINE_ID",
                m.id, d.instance.host, d.instance.workspace
            ),
            width,
        ));
    }
}

/// Redis: where, whether connected, the library's version, the last error and the counts.
fn redis_lines(out: &mut String, r: &RedisStatus, width: Option<u16>) {
    let mut line = format!(
        "redis   {}  {}",
        r.url.as_deref().unwrap_or("-"),
        if r.connected { "connected" } else { "NOT CONNECTED" }
    );
    if let Some(v) = &r.function_version {
        let _ = write!(line, "  functions {v}");
    }
    out.push_str(&wrap(&line, width));
    // The error is printed whole, on lines of its own: it is what the operator needs to read.
    if let Some(e) = &r.last_error {
        out.push_str(&wrap(&format!("redis error: {e}"), width));
    }
    if let Some(why) = &r.not_ready {
        let _ = writeln!(out, "NOT READY: {why}");
    }
    if r.errors.values().any(|n| *n > 0) {
        let counts: Vec<String> = r.errors.iter().map(|(kind, n)| format!("{kind} {n}")).collect();
        let _ = writeln!(out, "redis errors: {}", counts.join(", "));
    }
}

/// The GPUs' table: readings and health (a line saying CPU mode when there is none).
fn gpu_table(out: &mut String, gpus: &[Gpu], width: Option<u16>, now: SystemTime) {
    let now_ms = crate::clock::epoch_ms(now);
    let mut rows = Vec::new();
    for g in gpus {
        let mut health = match (&g.health, &g.reason) {
            (crate::gpu::Condition::Faulted, Some(reason)) => format!("FAULTED: {reason}"),
            (crate::gpu::Condition::Faulted, None) => "FAULTED".to_owned(),
            (crate::gpu::Condition::Ok, _) => "ok".to_owned(),
        };
        if let Some(t) = &g.throttle {
            let _ = write!(
                health,
                "; throttled for {} ({})",
                duration(Duration::from_millis(now_ms.saturating_sub(t.since_ms))),
                t.reasons.join(", ")
            );
        }
        rows.push(vec![
            g.index.to_string(),
            g.name.clone(),
            or_dash(g.utilization_percent.map(|u| format!("{u}%"))),
            format!(
                "{} / {}",
                or_dash(g.memory_used_bytes.map(bytes)),
                bytes(g.memory_total_bytes)
            ),
            or_dash(g.temperature_c.map(|t| format!("{t}°C"))),
            health,
        ]);
    }
    if gpus.is_empty() {
        rows.push(["-", "(none: CPU mode)", "", "", "", ""].map(str::to_owned).to_vec());
    }
    let header = ["GPU", "NAME", "UTIL", "MEMORY", "TEMP", "HEALTH"];
    let drops = Drops {
        first: &[],
        last: &[4, 2],
    };
    section(out, &fit(width, &header, rows, &[], &drops), width);
}

/// The installers' table, when any ran.
fn install_table(out: &mut String, installs: &BTreeMap<String, Install>, width: Option<u16>) {
    if !installs.is_empty() {
        let rows = installs
            .iter()
            .map(|(name, state)| {
                let (state, progress) = install(state);
                vec![name.clone(), state, progress]
            })
            .collect();
        let drops = Drops { first: &[], last: &[] };
        section(
            out,
            &fit(width, &["INSTALL", "STATE", "PROGRESS"], rows, &[0], &drops),
            width,
        );
    }
}

/// The services' table.
fn service_table(out: &mut String, services: &[Service], width: Option<u16>, now: SystemTime) {
    let fitted = fit(
        width,
        &[
            "SERVICE",
            "STATE",
            "PID",
            "RESTARTS",
            "READY",
            "UP",
            "LAST EXIT",
            "REASON",
        ],
        services.iter().map(|s| service_row(s, now)).collect(),
        &[0],
        &Drops {
            first: &[5, 4, 2],
            last: &[],
        },
    );
    section(out, &fitted, width);
}

/// The workers' table, and below it why each worker that does not claim does not.
fn worker_table(out: &mut String, workers: &[Worker], width: Option<u16>, now: SystemTime) {
    let now_ms = crate::clock::epoch_ms(now);
    let fitted = fit(
        width,
        &[
            "WORKER", "STATE", "JOB", "PROGRESS", "UPLOADS", "DONE", "FAILED", "ACTIVE",
        ],
        workers.iter().map(|w| worker_row(w, now_ms)).collect(),
        &[0, 2],
        // The counts go first; the job id last, when even the worker and its state barely fit.
        &Drops {
            first: &[7, 6, 5, 4],
            last: &[3, 2],
        },
    );
    section(out, &fitted, width);
    // Why a worker does not claim, or what last went wrong, is a sentence: it gets its own line
    // rather than a column squeezed to a few letters.
    for w in workers {
        let note = match (&w.reason, &w.last_error) {
            (Some(reason), _) => format!("{} does not claim: {reason}", w.worker_id),
            (None, Some(e)) => format!("{} last error: {e}", w.worker_id),
            (None, None) => continue,
        };
        out.push_str(&wrap(&note, width));
    }
}

/// `text` broken at spaces into lines of at most `width` characters (a longer word stands on
/// its own line), the lines after the first indented by two spaces.
fn wrap(text: &str, width: Option<u16>) -> String {
    let Some(width) = width.map(usize::from) else {
        return format!("{text}\n");
    };
    let mut out = String::new();
    let mut line = String::new();
    for word in text.split(' ') {
        let len = line.chars().count();
        if len > 2 && len + 1 + word.chars().count() > width {
            out.push_str(&line);
            out.push('\n');
            line = "  ".to_owned();
        } else if !line.is_empty() && line != "  " {
            line.push(' ');
        }
        line.push_str(word);
    }
    out.push_str(&line);
    out.push('\n');
    out
}

/// A table fitted to the terminal, with the headers of the columns left out to fit it.
struct Fitted {
    table: Table,
    dropped: Vec<String>,
}

/// The columns a table may leave out to fit the terminal, least needed first.
struct Drops<'a> {
    /// Left out while the table does not fit unwrapped (counts, ages).
    first: &'a [usize],
    /// Left out only while the table cannot fit even wrapped between words.
    last: &'a [usize],
}

/// A table of `rows` that fits `width`: the least needed columns (`drops.first`) are left out
/// while the table is too wide, then the remaining columns wrap between words, never inside
/// one (a column is at least as wide as its longest word), and those in `whole` (ids) not at
/// all; `drops.last` are left out while even that is too wide. Where nothing more may go, the
/// lines run long and the terminal folds them, rather than the table standing one letter a line.
fn fit(width: Option<u16>, header: &[&str], rows: Vec<Vec<String>>, whole: &[usize], drops: &Drops<'_>) -> Fitted {
    let mut shown: Vec<usize> = (0..header.len()).collect();
    let pick = |shown: &[usize], cells: &[String]| -> Vec<String> {
        shown
            .iter()
            .map(|&i| cells.get(i).cloned().unwrap_or_default())
            .collect()
    };
    let header: Vec<String> = header.iter().map(|h| (*h).to_owned()).collect();
    let build = |shown: &[usize], arrangement: ContentArrangement| {
        let mut t = Table::new();
        t.load_style(comfy_table::presets::NOTHING)
            .set_header(pick(shown, &header))
            .set_content_arrangement(arrangement);
        for row in &rows {
            t.add_row(pick(shown, row));
        }
        t
    };
    let dropped = |shown: &[usize]| -> Vec<String> {
        (0..header.len())
            .filter(|i| !shown.contains(i))
            .map(|i| header[i].clone())
            .collect()
    };
    let Some(width) = width else {
        return Fitted {
            table: build(&shown, ContentArrangement::Disabled),
            dropped: Vec::new(),
        };
    };
    // The narrowest a column may be: its content for an id, else its longest word.
    let narrowest = |column: usize| -> usize {
        let cells = std::iter::once(&header[column]).chain(rows.iter().filter_map(|r| r.get(column)));
        if whole.contains(&column) {
            cells.map(|c| c.chars().count()).max().unwrap_or(1)
        } else {
            cells
                .flat_map(|cell| cell.split_whitespace())
                .map(|w| w.chars().count())
                .max()
                .unwrap_or(1)
        }
    };
    // Two spaces between columns.
    let least = |shown: &[usize]| shown.iter().map(|&c| narrowest(c) + 2).sum::<usize>().saturating_sub(2);
    let mut first = drops.first.iter();
    loop {
        let t = build(&shown, ContentArrangement::Disabled);
        // Less the one space of left padding that `section` takes off.
        let natural = t
            .lines()
            .map(|l| l.trim_end().chars().count().saturating_sub(1))
            .max()
            .unwrap_or(0);
        if natural <= usize::from(width) {
            return Fitted {
                table: t,
                dropped: dropped(&shown),
            };
        }
        match first.next() {
            Some(d) => shown.retain(|i| i != d),
            None => break,
        }
    }
    for d in drops.last {
        if least(&shown) <= usize::from(width) {
            break;
        }
        shown.retain(|i| i != d);
    }
    let mut t = build(&shown, ContentArrangement::Dynamic);
    t.set_width(width);
    for (position, &column) in shown.iter().enumerate() {
        let constraint = if whole.contains(&column) {
            ColumnConstraint::ContentWidth
        } else {
            // The boundary counts the column's padding, one space either side.
            let least = u16::try_from(narrowest(column) + 2).unwrap_or(u16::MAX);
            ColumnConstraint::LowerBoundary(Width::Fixed(least))
        };
        if let Some(c) = t.column_mut(position) {
            c.set_constraint(constraint);
        }
    }
    Fitted {
        table: t,
        dropped: dropped(&shown),
    }
}

fn section(out: &mut String, fitted: &Fitted, width: Option<u16>) {
    out.push('\n');
    for line in fitted.table.lines() {
        // Every line has the style's one space of left padding; the tables start at the margin.
        out.push_str(line.strip_prefix(' ').unwrap_or(&line).trim_end());
        out.push('\n');
    }
    // A column left out to fit is said, so an operator does not take its absence for nothing.
    if !fitted.dropped.is_empty() {
        let note = format!(
            "({} not shown at this width; --json shows everything)",
            fitted.dropped.join(", ")
        );
        out.push_str(&wrap(&note, width));
    }
}

fn service_row(s: &Service, now: SystemTime) -> Vec<String> {
    // A service that keeps crashing sits in backoff between runs; what the operator needs to
    // know is that it is in a crash loop.
    let state = if s.crash_loop { "crash_loop" } else { s.state.name() };
    let up = s
        .started_at
        .as_deref()
        .filter(|_| s.pid.is_some())
        .and_then(|t| since(t, now))
        .map_or_else(|| "-".to_owned(), duration);
    let last_exit = match &s.last_exit {
        Some(exit) => {
            let how = match (exit.code, exit.signal) {
                (Some(c), _) => format!("code {c}"),
                (None, Some(sig)) => format!("signal {sig}"),
                (None, None) => "exited".to_owned(),
            };
            match since(&exit.at, now) {
                Some(ago) => format!("{how}, {} ago", duration(ago)),
                None => how,
            }
        }
        None => "-".to_owned(),
    };
    vec![
        s.name.clone(),
        state.to_owned(),
        or_dash(s.pid),
        s.restarts.to_string(),
        if s.ready { "yes" } else { "no" }.to_owned(),
        up,
        last_exit,
        s.reason.clone().unwrap_or_else(|| "-".to_owned()),
    ]
}

fn worker_row(w: &Worker, now_ms: u64) -> Vec<String> {
    let state = w.state.name().to_owned();
    let job = w.current_job.as_ref();
    vec![
        w.worker_id.clone(),
        state,
        or_dash(job.map(|j| j.job_id.clone())),
        or_dash(job.map(|j| format!("{:.0}%", j.progress))),
        if w.uploads.is_empty() {
            "-".to_owned()
        } else {
            format!(
                "{} ({})",
                w.uploads.len(),
                bytes(w.uploads.iter().map(|u| u.bytes).sum())
            )
        },
        w.counts.completed.to_string(),
        w.counts.failed.to_string(),
        if w.last_activity_ms > 0 {
            format!(
                "{} ago",
                duration(Duration::from_millis(now_ms.saturating_sub(w.last_activity_ms)))
            )
        } else {
            "-".to_owned()
        },
    ]
}

/// An installer's state and progress cells.
fn install(state: &Install) -> (String, String) {
    match state {
        Install::Pending => ("pending".to_owned(), "-".to_owned()),
        Install::Running {
            step,
            done,
            total,
            unit,
        } => {
            let amount = |n: u64| if unit == "bytes" { bytes(n) } else { n.to_string() };
            let progress = match total {
                Some(t) if *t > 0 => format!(
                    "{step}: {} / {} ({:.0}%)",
                    amount(*done),
                    amount(*t),
                    *done as f64 * 100.0 / *t as f64
                ),
                _ => format!("{step}: {}", amount(*done)),
            };
            ("running".to_owned(), progress)
        }
        Install::Done {
            skipped,
            seconds,
            failed_items,
        } => {
            let mut text = if *skipped {
                "up to date".to_owned()
            } else {
                format!("in {}", duration(Duration::from_secs_f64(seconds.max(0.0))))
            };
            if !failed_items.is_empty() {
                let _ = write!(text, "; {} failed: {}", failed_items.len(), failed_items.join(", "));
            }
            ("done".to_owned(), text)
        }
        Install::Failed { reason } => ("FAILED".to_owned(), reason.clone()),
    }
}

/// How long ago the RFC 3339 time `at` was; `None` when it does not parse.
fn since(at: &str, now: SystemTime) -> Option<Duration> {
    let then = humantime::parse_rfc3339_weak(at).ok()?;
    Some(now.duration_since(then).unwrap_or_default())
}

pub(super) use crate::logging::human_duration as duration;

/// Bytes in binary units: `512 B`, `1.5 KiB`, `23.6 GiB`.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn or_dash<T: std::fmt::Display>(v: Option<T>) -> String {
    v.map_or_else(|| "-".to_owned(), |v| v.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::status::sample;

    #[test]
    fn durations_read_as_people_say_them() {
        assert_eq!(duration(Duration::from_millis(850)), "850ms");
        assert_eq!(duration(Duration::from_secs(4)), "4s");
        assert_eq!(duration(Duration::from_secs(192)), "3m 12s");
        assert_eq!(duration(Duration::from_secs(7500)), "2h 5m");
        assert_eq!(duration(Duration::from_secs(3 * 86400 + 4 * 3600)), "3d 4h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(24 << 30), "24.0 GiB");
    }

    #[test]
    fn renders_every_section() {
        let mut doc = sample();
        doc.services[0].crash_loop = true;
        doc.redis.connected = false;
        doc.redis.last_error = Some("failed to connect: Connection refused".into());
        let now = humantime::parse_rfc3339("2026-01-01T00:03:12Z").unwrap();
        let text = render(&doc, None, now);
        assert!(text.contains("machine m1  phase ready  up 5s  version 0.1.0"), "{text}");
        assert!(text.contains("NOT CONNECTED"), "{text}");
        assert!(
            text.contains("redis error: failed to connect: Connection refused\n"),
            "{text}"
        );
        assert!(
            text.contains("RTX") && text.contains("50%") && text.contains("1.0 GiB / 24.0 GiB"),
            "{text}"
        );
        assert!(text.contains("crash_loop") && !text.contains("backoff"), "{text}");
        assert!(text.contains("signal 9, 3m 12s ago"), "{text}");
        assert!(text.contains("waiting_for_services"), "{text}");
        assert!(
            text.contains("\nm1-gpu0 does not claim: comfyui-gpu0 is failed\n"),
            "{text}"
        );
        assert!(text.contains("fetch: 3 B / 9 B (33%)"), "{text}");
        assert!(
            text.contains("FAILED") && text.contains("up to date; 1 failed: x"),
            "{text}"
        );
    }

    /// Every age on the page is measured from the one `now` it is rendered at (the throttle's
    /// too, which once read the wall clock itself).
    #[test]
    fn a_throttle_s_age_is_counted_from_the_render_s_now() {
        let mut doc = sample();
        let now = humantime::parse_rfc3339("2026-01-01T00:03:12Z").unwrap();
        doc.gpus[0].throttle = Some(crate::gpu::monitor::Throttle {
            reasons: vec!["hw_thermal_slowdown".into()],
            since_ms: crate::clock::epoch_ms(now) - 90_000,
        });
        let text = render(&doc, None, now);
        assert!(text.contains("throttled for 1m 30s (hw_thermal_slowdown)"), "{text}");
    }

    #[test]
    fn notes_wrap_at_the_width() {
        assert_eq!(wrap("a bb ccc dddd", Some(6)), "a bb\n  ccc\n  dddd\n");
        assert_eq!(wrap("a bb ccc", None), "a bb ccc\n");
        assert_eq!(wrap("averylongword x", Some(4)), "averylongword\n  x\n");
    }

    #[test]
    fn a_uuid_stays_whole_in_eighty_columns() {
        let mut doc = sample();
        let id = "0b8f8a5e-6f1c-4a57-9d3e-2f1a7c9e4b10";
        doc.workers[0].worker_id = "m1-comfyui-gpu0-worker".into();
        // A worker with a job is busy (a longer state word leaves the id no room at 80).
        doc.workers[0].state = crate::health::status::WorkerStage::Busy;
        doc.workers[0].current_job.as_mut().unwrap().job_id = id.into();
        doc.workers[0].reason = Some("comfyui-gpu0 is in crash loop after 5 restarts in 60s".into());
        let text = render(&doc, Some(80), SystemTime::now());
        for line in text.lines() {
            assert!(line.chars().count() <= 80, "{line:?} is wider than 80:\n{text}");
        }
        let row = text
            .lines()
            .find(|l| l.contains(id))
            .unwrap_or_else(|| panic!("{id} whole:\n{text}"));
        let header = text.lines().find(|l| l.starts_with("WORKER")).expect("the header");
        assert_eq!(
            row.find(id),
            header.find("JOB"),
            "the id starts under its header:\n{text}"
        );
    }

    /// Every word of `cells` appears whole in `text`: nothing was wrapped inside a word.
    fn whole_words(text: &str, doc: &StatusDocument) {
        let now = SystemTime::now();
        let now_ms = crate::clock::epoch_ms(now);
        let cells = doc
            .services
            .iter()
            .map(|s| service_row(s, now))
            .chain(doc.workers.iter().map(|w| worker_row(w, now_ms)))
            .flatten();
        let words: Vec<&str> = text.split_whitespace().collect();
        for cell in cells {
            for word in cell.split_whitespace() {
                // A dropped column's words are not there at all, which the notice says.
                if text.contains(word) {
                    assert!(words.iter().any(|w| w.contains(word)), "{word:?} is cut:\n{text}");
                }
            }
        }
    }

    #[test]
    fn no_width_breaks_a_word_and_what_is_left_out_is_said() {
        let mut doc = sample();
        doc.workers[0].worker_id = "m1-comfyui-gpu0-worker".into();
        doc.workers[0].current_job.as_mut().unwrap().job_id = "0b8f8a5e-6f1c-4a57-9d3e-2f1a7c9e4b10".into();
        doc.services[0].reason = Some("its readiness probe fails: connection refused".into());
        let now = SystemTime::now();
        // A terminal of 0 columns (a pty of size 0x0) is one that does not know its width.
        assert_eq!(render(&doc, Some(0), now), render(&doc, None, now));
        let full = render(&doc, None, now);
        assert!(!full.contains("not shown"), "{full}");
        for width in [60u16, 80] {
            let text = render(&doc, Some(width), now);
            for line in text.lines() {
                assert!(
                    line.chars().count() <= usize::from(width),
                    "{line:?} is wider than {width}:\n{text}"
                );
                // One letter a line is what a table squeezed below its words looks like.
                assert!(line.trim().chars().count() != 1, "a lone letter at {width}:\n{text}");
            }
            whole_words(&text, &doc);
            let header = text.lines().find(|l| l.starts_with("WORKER")).expect("the header");
            let dropped: Vec<&str> = ["JOB", "PROGRESS", "UPLOADS", "DONE", "FAILED", "ACTIVE"]
                .into_iter()
                .filter(|h| !header.contains(h))
                .collect();
            if !dropped.is_empty() {
                assert!(
                    text.contains(&format!("({}", dropped.join(", "))) && text.contains("not shown at this width"),
                    "the dropped columns are named at {width}:\n{text}"
                );
            }
        }
        let narrow = render(&doc, Some(60), now);
        assert!(narrow.contains("not shown at this width"), "{narrow}");
    }
}

//! Output file names and formats, as the existing fleet names them.
//!
//! The format comes from the bytes (their magic numbers, through `infer`), not from what a
//! service called the file: a PNG named `x.jpg` is stored as `x.png` with `image/png`. A job's
//! `ctx.filename` keeps its stem and takes the real extension; without one, the name is
//! `<job id>_<time>_<content hash>` so that nothing collides. On a retried attempt the stem gets
//! `_r<N>`, so a retry never overwrites what an earlier attempt stored. A `ctx.filename` is kept
//! as the job wrote it, as the existing workers keep it (its `..` segments and control
//! characters are refused when `ctx` is read); a name a service chose is sanitised: nothing a
//! service chose can climb out of its prefix.

use std::time::SystemTime;

use sha2::{Digest, Sha256};

/// The format of one output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Format {
    pub content_type: String,
    pub ext: String,
}

/// Known MIME types and their extensions (the existing workers' table).
const KNOWN: &[(&str, &str)] = &[
    ("image/png", "png"),
    ("image/jpeg", "jpg"),
    ("image/jpg", "jpg"),
    ("image/webp", "webp"),
    ("image/gif", "gif"),
    ("video/mp4", "mp4"),
    ("video/webm", "webm"),
    ("audio/wav", "wav"),
    ("audio/wave", "wav"),
    ("audio/x-wav", "wav"),
    ("audio/mpeg", "mp3"),
    ("audio/mp3", "mp3"),
    ("text/plain", "txt"),
    ("text/html", "html"),
    ("application/json", "json"),
    ("application/pdf", "pdf"),
];

/// The real format of `bytes`: sniffed when the bytes say, else the declared content type, else
/// the declared name's extension, else `application/octet-stream` / `bin`.
pub(super) fn format_of(bytes: &[u8], declared_type: &str, declared_name: &str) -> Format {
    if let Some(t) = infer::get(bytes) {
        let content_type = match t.mime_type() {
            "audio/x-wav" => "audio/wav",
            other => other,
        };
        let ext = match t.extension() {
            "jpeg" => "jpg",
            other => other,
        };
        return Format {
            content_type: content_type.to_owned(),
            ext: ext.to_owned(),
        };
    }
    let declared = declared_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    if let Some((ct, ext)) = KNOWN.iter().find(|(ct, _)| *ct == declared) {
        return Format {
            content_type: (*ct).to_owned(),
            ext: (*ext).to_owned(),
        };
    }
    let name_ext = split_ext(declared_name).1.map(str::to_ascii_lowercase);
    if let Some((ct, ext)) = name_ext
        .as_deref()
        .and_then(|e| KNOWN.iter().find(|(_, ext)| *ext == e))
    {
        return Format {
            content_type: (*ct).to_owned(),
            ext: (*ext).to_owned(),
        };
    }
    Format {
        content_type: if declared.contains('/') {
            declared
        } else {
            "application/octet-stream".to_owned()
        },
        ext: name_ext.unwrap_or_else(|| "bin".to_owned()),
    }
}

/// What names one job's outputs: the job, the attempt and `ctx.filename`.
#[derive(Debug, Clone)]
pub(super) struct Namer<'a> {
    pub job_id: &'a str,
    /// 0 for the first attempt.
    pub attempt: u32,
    pub filename: Option<&'a str>,
    pub now: SystemTime,
}

impl Namer<'_> {
    /// One name per output (`bytes`, real extension), unique within the job.
    pub fn names(&self, outputs: &[(&[u8], &str)]) -> Vec<String> {
        let retry = if self.attempt > 0 {
            format!("_r{}", self.attempt)
        } else {
            String::new()
        };
        let time = humantime::format_rfc3339_millis(self.now)
            .to_string()
            .replace([':', '.'], "-");
        let job = sanitise_segment(self.job_id).unwrap_or_else(|| "job".to_owned());
        let mut names: Vec<String> = Vec::with_capacity(outputs.len());
        for (i, (bytes, ext)) in outputs.iter().enumerate() {
            let stem = match self.filename {
                Some(f) => {
                    let stem = split_ext(f).0;
                    if i == 0 { stem.to_owned() } else { format!("{stem}_{i}") }
                }
                None => format!("{job}_{time}_{}", content_tag(bytes)),
            };
            let base = format!("{stem}{retry}");
            let mut name = format!("{base}.{ext}");
            let mut n = 1;
            while names.contains(&name) {
                name = format!("{base}_{n}.{ext}");
                n += 1;
            }
            names.push(name);
        }
        names
    }
}

/// 8 hex digits naming the content: a SHA-256 of its length and its first 64 KiB. Names also
/// carry the job id and the time, so this only has to tell apart outputs of one job; hashing
/// whole multi-megabyte outputs cost more than their upload to a local store.
fn content_tag(bytes: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update((bytes.len() as u64).to_le_bytes());
    h.update(&bytes[..bytes.len().min(64 * 1024)]);
    hex::encode(&h.finalize()[..4])
}

pub(super) fn split_ext(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && !ext.is_empty() => (stem, Some(ext)),
        _ => (name, None),
    }
}

/// One path segment made safe: only `[A-Za-z0-9._-]`, no leading dots, at most 200 bytes;
/// `None` when nothing usable is left (e.g. `..`).
pub(super) fn sanitise_segment(raw: &str) -> Option<String> {
    let cleaned: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let trimmed = cleaned.trim_start_matches('.');
    let trimmed: String = trimmed.chars().take(200).collect();
    if trimmed.is_empty() || trimmed.chars().all(|c| c == '_') {
        None
    } else {
        Some(trimmed)
    }
}

/// A file name made safe: its last path component, sanitised; `output` when nothing is left.
pub fn sanitise_file_name(raw: &str) -> String {
    raw.rsplit(['/', '\\'])
        .find(|s| !s.is_empty())
        .and_then(sanitise_segment)
        .unwrap_or_else(|| "output".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::time::Duration;

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

    #[test]
    fn names_cannot_escape() {
        assert_eq!(sanitise_file_name("../../etc/passwd"), "passwd");
        assert_eq!(sanitise_file_name("..\\..\\boot.ini"), "boot.ini");
        assert_eq!(sanitise_file_name(".."), "output");
        assert_eq!(sanitise_file_name("/"), "output");
        assert_eq!(sanitise_file_name("a b$c.png"), "a_b_c.png");
        assert_eq!(sanitise_file_name(".hidden"), "hidden");
    }

    proptest! {
        #[test]
        fn sanitised_names_are_single_safe_segments(raw in ".{0,300}") {
            let n = sanitise_file_name(&raw);
            prop_assert!(!n.is_empty() && n.len() <= 200);
            prop_assert!(!n.starts_with('.'));
            prop_assert!(n.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_')));
        }
    }

    #[test]
    fn the_format_comes_from_the_bytes() {
        let f = format_of(PNG, "image/jpeg", "x.jpg");
        assert_eq!((f.content_type.as_str(), f.ext.as_str()), ("image/png", "png"));
        let f = format_of(b"hello", "text/plain", "x");
        assert_eq!((f.content_type.as_str(), f.ext.as_str()), ("text/plain", "txt"));
        let f = format_of(b"{}", "", "r.json");
        assert_eq!((f.content_type.as_str(), f.ext.as_str()), ("application/json", "json"));
        let f = format_of(b"\x00\x01", "", "blob");
        assert_eq!(
            (f.content_type.as_str(), f.ext.as_str()),
            ("application/octet-stream", "bin")
        );
    }

    #[test]
    fn ctx_filename_takes_the_real_extension() {
        let namer = Namer {
            job_id: "j1",
            attempt: 0,
            filename: Some("x.jpg"),
            now: SystemTime::UNIX_EPOCH,
        };
        assert_eq!(namer.names(&[(PNG, "png")]), ["x.png"]);
        assert_eq!(namer.names(&[(PNG, "png"), (PNG, "png")]), ["x.png", "x_1.png"]);
        let retry = Namer { attempt: 2, ..namer };
        assert_eq!(retry.names(&[(PNG, "png")]), ["x_r2.png"]);
    }

    #[test]
    fn generated_names_are_unique_and_marked_on_retries() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        let namer = Namer {
            job_id: "job/1",
            attempt: 0,
            filename: None,
            now,
        };
        let names = namer.names(&[(PNG, "png"), (PNG, "png"), (b"other", "txt")]);
        let hash = content_tag(PNG);
        assert_eq!(names[0], format!("job_1_2023-11-14T22-13-20-123Z_{hash}.png"));
        assert_eq!(names[1], format!("job_1_2023-11-14T22-13-20-123Z_{hash}_1.png"));
        assert!(names[2].ends_with(".txt"));
        let retry = Namer { attempt: 1, ..namer };
        assert_eq!(
            retry.names(&[(PNG, "png")]),
            [format!("job_1_2023-11-14T22-13-20-123Z_{hash}_r1.png")]
        );
    }
}

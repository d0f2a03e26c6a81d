//! Model files from a manifest: URL, sha256, size and destination folder.
//!
//! Files download into the shared models directory (`<models_dir>/<folder>/<file>`, default
//! `<workspace>/models`) so that several ComfyUI installs or image rebuilds share them, and each
//! is linked into `ComfyUI/models/<folder>/`. A download goes to `<file>.part` and resumes with an
//! HTTP `Range` request after an interruption (a server that ignores the range makes it start
//! over); a few attempts are made per run. The complete file is hashed and only renamed into
//! place when size and SHA-256 match; a mismatch deletes the partial file.

use std::io::{Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::common::{Progress, Stamp, bounded, digest};
use super::{Ctx, InstallError};

/// Attempts per model and run; each later attempt resumes where the previous one stopped.
const ATTEMPTS: u32 = 3;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Manifest {
    #[serde(default)]
    model: Vec<ModelSpec>,
}

/// One model of the manifest.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ModelSpec {
    url: String,
    sha256: String,
    size: Option<u64>,
    /// Folder under `models/` (`checkpoints`, `loras`, ...).
    dest: String,
    /// File name; the URL's last path segment when unset.
    name: Option<String>,
}

impl ModelSpec {
    fn file_name(&self) -> &str {
        self.name.as_deref().unwrap_or_else(|| {
            let path = self.url.split(['?', '#']).next().unwrap_or_default();
            path.rsplit('/').next().unwrap_or_default()
        })
    }

    /// `dest/name`, the model's id in logs and failure lists.
    pub(crate) fn id(&self) -> String {
        format!("{}/{}", self.dest, self.file_name())
    }
}

/// Reads and checks the manifest.
pub(crate) fn load(path: &Path) -> Result<Vec<ModelSpec>, InstallError> {
    let text = std::fs::read_to_string(path).map_err(|e| InstallError::io("read", path, e))?;
    parse(&path.display().to_string(), &text)
}

fn parse(name: &str, text: &str) -> Result<Vec<ModelSpec>, InstallError> {
    let bad = |message: String| InstallError::Manifest {
        file: name.to_owned(),
        message,
    };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| bad(e.to_string()))?;
    let m: Manifest = serde_path_to_error::deserialize(toml::Value::Table(table))
        .map_err(|e| bad(format!("{}: {}", e.path(), e.inner())))?;
    let mut seen = std::collections::BTreeSet::new();
    for s in &m.model {
        let parsed = url::Url::parse(&s.url).map_err(|e| bad(format!("`{}` is not a URL: {e}", s.url)))?;
        if !matches!(parsed.scheme(), "http" | "https") {
            return Err(bad(format!("`{}`: only http and https downloads are supported", s.url)));
        }
        if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(bad(format!("`{}`: sha256 must be 64 hex digits", s.url)));
        }
        // Folder and file become paths: one safe component each, nothing that climbs out.
        if !s.dest.split('/').all(super::safe_name) {
            return Err(bad(format!(
                "`{}`: dest `{}` is not a models folder name",
                s.url, s.dest
            )));
        }
        if !super::safe_name(s.file_name()) {
            return Err(bad(format!(
                "`{}`: `{}` is not a usable file name; set `name`",
                s.url,
                s.file_name()
            )));
        }
        if !seen.insert(s.id()) {
            return Err(bad(format!("`{}` is listed twice", s.id())));
        }
    }
    Ok(m.model)
}

fn stamp(ctx: &Ctx, models_dir: &Path, s: &ModelSpec) -> Stamp {
    Stamp::new(
        &ctx.stamps,
        &format!("model-{}", s.id().replace('/', "--")),
        digest(&[
            s.url.as_str(),
            &s.sha256.to_ascii_lowercase(),
            &s.size.map_or_else(String::new, |n| n.to_string()),
            &models_dir.display().to_string(),
        ]),
    )
}

/// Downloads and links every model not already current; returns how many were downloaded and
/// the failures.
pub(crate) async fn install(
    ctx: &Ctx,
    models_dir: &Path,
    specs: Vec<ModelSpec>,
    progress: &Progress,
) -> (usize, Vec<(String, InstallError)>) {
    let client = match crate::http_client::builder()
        .connect_timeout(Duration::from_secs(30))
        .read_timeout(Duration::from_secs(120))
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            let all = specs
                .iter()
                .map(|s| {
                    (
                        s.id(),
                        InstallError::Download {
                            url: s.url.clone(),
                            reason: e.to_string(),
                        },
                    )
                })
                .collect();
            return (0, all);
        }
    };
    let total = specs.len() as u64;
    let finished = std::sync::atomic::AtomicU64::new(0);
    let results = bounded(specs, ctx.concurrency, |spec| {
        let client = &client;
        let finished = &finished;
        async move {
            let stamp = stamp(ctx, models_dir, &spec);
            let file = models_dir.join(&spec.dest).join(spec.file_name());
            let r = if stamp.is_current() && file.is_file() {
                link(ctx, &spec, &file).map(|()| false)
            } else {
                stamp.clear();
                match fetch(ctx, client, &spec, &file, progress).await {
                    Ok(()) => link(ctx, &spec, &file).and_then(|()| stamp.write()).map(|()| true),
                    Err(e) => Err(e),
                }
            };
            let n = finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress.items("models", n, total);
            (spec.id(), r)
        }
    })
    .await;
    let mut downloaded = 0;
    let mut failed = Vec::new();
    for (id, r) in results {
        match r {
            Ok(true) => downloaded += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(target: "machine::install", model = %id, "model failed: {}", crate::logging::error_chain(&e));
                failed.push((id, e));
            }
        }
    }
    (downloaded, failed)
}

/// Links the shared file into `ComfyUI/models/<dest>/`, replacing a stale link.
fn link(ctx: &Ctx, spec: &ModelSpec, file: &Path) -> Result<(), InstallError> {
    let dir = super::comfyui::dir(&ctx.workspace).join("models").join(&spec.dest);
    std::fs::create_dir_all(&dir).map_err(|e| InstallError::io("create", &dir, e))?;
    let at = dir.join(spec.file_name());
    if std::fs::read_link(&at).is_ok_and(|t| t == file) {
        return Ok(());
    }
    if at.symlink_metadata().is_ok() {
        std::fs::remove_file(&at).map_err(|e| InstallError::io("replace", &at, e))?;
    }
    std::os::unix::fs::symlink(file, &at).map_err(|e| InstallError::io("link", &at, e))
}

/// Makes `file` hold the model: verifies one already there, otherwise downloads it.
async fn fetch(
    ctx: &Ctx,
    client: &reqwest::Client,
    spec: &ModelSpec,
    file: &Path,
    progress: &Progress,
) -> Result<(), InstallError> {
    let dir = file.parent().expect("a model path is models_dir/dest/name");
    std::fs::create_dir_all(dir).map_err(|e| InstallError::io("create", dir, e))?;
    let expected = spec.sha256.to_ascii_lowercase();
    if file.is_file() {
        // Left by an earlier install whose stamp changed (or a copy placed by hand): keep it when
        // it is the right file.
        let (len, hash) = hash_file(file)?;
        if hash == expected && spec.size.is_none_or(|s| s == len) {
            return Ok(());
        }
        std::fs::remove_file(file).map_err(|e| InstallError::io("remove", file, e))?;
    }
    let part = PathBuf::from(format!("{}.part", file.display()));
    let mut last = None;
    for attempt in 1..=ATTEMPTS {
        match download(ctx, client, spec, &part, progress).await {
            Ok(()) => {
                last = None;
                break;
            }
            Err(InstallError::Cancelled) => return Err(InstallError::Cancelled),
            Err(e) => {
                tracing::warn!(
                    target: "machine::install",
                    model = %spec.id(),
                    "download attempt {attempt}/{ATTEMPTS} failed: {}",
                    crate::logging::error_chain(&e)
                );
                last = Some(e);
                if attempt < ATTEMPTS {
                    tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
                }
            }
        }
    }
    if let Some(e) = last {
        return Err(e);
    }
    let (len, actual) = hash_file(&part)?;
    if let Some(size) = spec.size.filter(|s| *s != len) {
        let _ = std::fs::remove_file(&part);
        return Err(InstallError::Size {
            file: file.to_owned(),
            expected: size,
            actual: len,
        });
    }
    if actual != expected {
        let _ = std::fs::remove_file(&part);
        return Err(InstallError::Checksum {
            file: file.to_owned(),
            expected,
            actual,
        });
    }
    std::fs::rename(&part, file).map_err(|e| InstallError::io("rename", &part, e))
}

/// One attempt: continues `part` from its current length.
async fn download(
    ctx: &Ctx,
    client: &reqwest::Client,
    spec: &ModelSpec,
    part: &Path,
    progress: &Progress,
) -> Result<(), InstallError> {
    let dl = |e: reqwest::Error| InstallError::Download {
        url: spec.url.clone(),
        reason: crate::logging::error_chain(&e),
    };
    let mut have = std::fs::metadata(part).map(|m| m.len()).unwrap_or(0);
    if spec.size.is_some_and(|s| have >= s) {
        // Complete (or overlong, which the size check then rejects); nothing to ask for.
        return Ok(());
    }
    let mut req = client.get(&spec.url);
    if have > 0 {
        req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
    }
    let resp = tokio::select! {
        r = req.send() => r.map_err(dl)?,
        () = ctx.cancel.cancelled() => return Err(InstallError::Cancelled),
    };
    let status = resp.status();
    if status == reqwest::StatusCode::RANGE_NOT_SATISFIABLE && spec.size.is_none() {
        // The server has nothing past what we hold: the file is complete.
        return Ok(());
    }
    let resp = resp.error_for_status().map_err(dl)?;
    let resumed = have > 0 && resp.status() == reqwest::StatusCode::PARTIAL_CONTENT;
    if !resumed {
        have = 0;
    }
    let total = resp.content_length().map(|n| n + have).or(spec.size);
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(false)
        .open(part)
        .map_err(|e| InstallError::io("open", part, e))?;
    if resumed {
        out.seek(std::io::SeekFrom::End(0))
            .map_err(|e| InstallError::io("seek", part, e))?;
        tracing::info!(target: "machine::install", model = %spec.id(), "resuming at {}", super::common::human_bytes(have));
    } else {
        out.set_len(0).map_err(|e| InstallError::io("truncate", part, e))?;
    }
    let step = format!("downloading {}", spec.id());
    let mut body = resp.bytes_stream();
    loop {
        let chunk = tokio::select! {
            c = body.next() => c,
            () = ctx.cancel.cancelled() => return Err(InstallError::Cancelled),
        };
        let Some(chunk) = chunk else { break };
        let chunk = chunk.map_err(dl)?;
        out.write_all(&chunk).map_err(|e| InstallError::io("write", part, e))?;
        have += chunk.len() as u64;
        progress.bytes(&step, have, total);
    }
    out.flush().map_err(|e| InstallError::io("write", part, e))?;
    Ok(())
}

/// Length and SHA-256 of a file.
fn hash_file(path: &Path) -> Result<(u64, String), InstallError> {
    let mut f = std::fs::File::open(path).map_err(|e| InstallError::io("open", path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| InstallError::io("read", path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hex::encode(h.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn manifest_entries_are_checked() {
        let ok = format!(
            "[[model]]\nurl = \"https://h/x/a.safetensors?dl=1\"\nsha256 = \"{SHA}\"\ndest = \"checkpoints\"\n"
        );
        let m = parse("f", &ok).unwrap();
        assert_eq!(m[0].id(), "checkpoints/a.safetensors");
        for bad in [
            format!("[[model]]\nurl = \"https://h/a\"\nsha256 = \"{SHA}\"\ndest = \"../etc\"\n"),
            "[[model]]\nurl = \"https://h/a\"\nsha256 = \"abc\"\ndest = \"x\"\n".to_owned(),
            format!("[[model]]\nurl = \"file:///etc/passwd\"\nsha256 = \"{SHA}\"\ndest = \"x\"\n"),
            format!("[[model]]\nurl = \"https://h/\"\nsha256 = \"{SHA}\"\ndest = \"x\"\n"),
            format!("[[model]]\nurl = \"https://h/a\"\nsha256 = \"{SHA}\"\ndest = \"x\"\nname = \"..\"\n"),
        ] {
            assert!(parse("f", &bad).is_err(), "{bad}");
        }
    }
}

//! Downloads one catalogue model into its place: each source in turn, into `<file>.part`,
//! resuming a partial file (HTTP `Range`, object-store ranged reads), hashing as the bytes
//! arrive, and renaming into place only when size and sha256 match. A mismatch deletes the
//! partial file, so nothing half-written or wrong is ever found under the model's name.

use std::path::{Path, PathBuf};

use futures_util::{Stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;

use super::ModelError;
use super::catalogue::Entry;
use crate::cloud::CloudStores;

/// Where models come from: HTTP(S) through one client, object stores through the buckets the
/// outputs use too (one builder, the same `AWS_*`/`AZURE_*`/`GOOGLE_*` credentials).
#[derive(Debug)]
pub(crate) struct Sources {
    pub http: reqwest::Client,
    pub cloud: std::sync::Arc<CloudStores>,
}

/// Fetches `entry` to `dest`, publishing the bytes on disk so far on `progress`.
pub(crate) async fn fetch(
    client: &Sources,
    entry: &Entry,
    dest: &Path,
    progress: &watch::Sender<u64>,
) -> Result<(), ModelError> {
    let dir = dest.parent().expect("a model's path has a folder");
    tokio::fs::create_dir_all(dir).await.map_err(|e| io(entry, dir, e))?;
    let part = part_path(dest);
    let mut last = None;
    for source in &entry.sources {
        match fetch_from(client, entry, source, &part, progress).await {
            Ok(()) => {
                tokio::fs::rename(&part, dest).await.map_err(|e| io(entry, dest, e))?;
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(model = %entry.name, source = %source, error = %e, "model source failed");
                last = Some(e);
            }
        }
    }
    Err(last.expect("a catalogue entry has at least one source"))
}

/// `<file>.part`, beside the file so the final rename stays on one file system.
pub(crate) fn part_path(dest: &Path) -> PathBuf {
    let mut name = dest.file_name().unwrap_or_default().to_os_string();
    name.push(".part");
    dest.with_file_name(name)
}

fn io(entry: &Entry, path: &Path, source: std::io::Error) -> ModelError {
    ModelError::Io {
        name: entry.name.clone(),
        path: path.to_owned(),
        source: std::sync::Arc::new(source),
    }
}

fn download(entry: &Entry, source: &url::Url, reason: impl std::fmt::Display) -> ModelError {
    ModelError::Download {
        name: entry.name.clone(),
        source_url: redact(source),
        reason: reason.to_string(),
    }
}

/// A source for messages: without credentials or query (signed URLs carry secrets there).
fn redact(u: &url::Url) -> String {
    let mut u = u.clone();
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.set_query(None);
    u.to_string()
}

async fn fetch_from(
    client: &Sources,
    entry: &Entry,
    source: &url::Url,
    part: &Path,
    progress: &watch::Sender<u64>,
) -> Result<(), ModelError> {
    // What a previous attempt left: hashed first, then continued.
    let mut hasher = Sha256::new();
    let mut have = match tokio::fs::read(part).await {
        Ok(bytes) if (bytes.len() as u64) < entry.size => {
            hasher.update(&bytes);
            bytes.len() as u64
        }
        _ => {
            let _ = tokio::fs::remove_file(part).await;
            0
        }
    };
    let (stream, resumed) = open(client, entry, source, have).await?;
    if !resumed && have > 0 {
        hasher = Sha256::new();
        have = 0;
    }
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(resumed)
        .truncate(!resumed)
        .open(part)
        .await
        .map_err(|e| io(entry, part, e))?;
    let cut = save(file, stream, entry.size, &mut hasher, &mut have, progress)
        .await
        .map_err(|e| io(entry, part, e))?;
    if let Some(reason) = cut {
        return Err(download(entry, source, reason));
    }
    let actual = hex::encode(hasher.finalize());
    if have != entry.size || actual != entry.sha256 {
        let _ = tokio::fs::remove_file(part).await;
        if have < entry.size {
            return Err(download(
                entry,
                source,
                format!("the transfer ended after {have} of {} bytes", entry.size),
            ));
        }
        return Err(ModelError::Checksum {
            name: entry.name.clone(),
            source_url: redact(source),
            expected: format!("{} bytes, sha256 {}", entry.size, entry.sha256),
            actual: format!("{have} bytes, sha256 {actual}"),
        });
    }
    Ok(())
}

/// Writes `stream` to `file`, hashing and counting into `hasher` and `have` and stopping past
/// `size`; `Some(reason)` when the stream broke. Whatever happened, the file is flushed and
/// synced before this returns: tokio hands each write to a blocking thread, and a file dropped
/// with a write in flight grows after the attempt has failed, under the next attempt that
/// already measured it and asks for a `Range` short of the bytes that land (which appends them
/// twice).
async fn save(
    mut file: tokio::fs::File,
    mut stream: ByteStream,
    size: u64,
    hasher: &mut Sha256,
    have: &mut u64,
    progress: &watch::Sender<u64>,
) -> std::io::Result<Option<String>> {
    let mut cut = None;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(chunk) => chunk,
            Err(reason) => {
                cut = Some(reason);
                break;
            }
        };
        hasher.update(&chunk);
        file.write_all(&chunk).await?;
        *have += chunk.len() as u64;
        progress.send_replace(*have);
        if *have > size {
            break;
        }
    }
    file.flush().await?;
    file.sync_all().await?;
    Ok(cut)
}

type ByteStream = std::pin::Pin<Box<dyn Stream<Item = Result<bytes::Bytes, String>> + Send>>;

/// Opens the source from byte `from`; `true` when the answer continues there (else it starts
/// at 0).
async fn open(client: &Sources, entry: &Entry, source: &url::Url, from: u64) -> Result<(ByteStream, bool), ModelError> {
    match source.scheme() {
        "http" | "https" => {
            let mut req = client.http.get(source.clone());
            if let Some(token) = &entry.token {
                req = req.bearer_auth(token);
            }
            if from > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={from}-"));
            }
            let resp = req.send().await.map_err(|e| download(entry, source, error_chain(&e)))?;
            let status = resp.status();
            if !status.is_success() {
                return Err(download(entry, source, format!("HTTP {status}")));
            }
            let resumed = from > 0 && status == reqwest::StatusCode::PARTIAL_CONTENT;
            let stream = resp.bytes_stream().map(|r| r.map_err(|e| error_chain(&e)));
            Ok((Box::pin(stream), resumed))
        }
        _ => {
            let (store, path) = client
                .cloud
                .object(source)
                .map_err(|e| download(entry, source, error_chain(&e)))?;
            let opts = object_store::GetOptions {
                range: (from > 0).then_some(object_store::GetRange::Offset(from)),
                ..object_store::GetOptions::default()
            };
            let got = store
                .get_opts(&path, opts)
                .await
                .map_err(|e| download(entry, source, error_chain(&e)))?;
            let stream = got.into_stream().map(|r| r.map_err(|e| e.to_string()));
            Ok((Box::pin(stream), from > 0))
        }
    }
}

fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    crate::logging::error_chain(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// CI saw a resume ask for `bytes=400000-` after the failed attempt had left 397,312 bytes on
    /// disk: the last write was still on its way when the error returned. One blocking thread,
    /// held for a while, makes that write wait in its queue every time.
    #[test]
    fn a_broken_stream_leaves_every_received_byte_on_disk_before_it_returns() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .max_blocking_threads(1)
            .build()
            .unwrap();
        rt.block_on(async {
            let dir = tempfile::tempdir().unwrap();
            let part = dir.path().join("m.safetensors.part");
            let file = tokio::fs::File::create(&part).await.unwrap();
            let busy = tokio::task::spawn_blocking(|| std::thread::sleep(std::time::Duration::from_millis(300)));
            let stream: ByteStream = Box::pin(futures_util::stream::iter([
                Ok(bytes::Bytes::from(vec![7u8; 100_000])),
                Err("connection reset by peer".to_owned()),
            ]));
            let (progress, _) = watch::channel(0);
            let (mut hasher, mut have) = (Sha256::new(), 0);

            let cut = save(file, stream, 1_000_000, &mut hasher, &mut have, &progress)
                .await
                .unwrap();

            assert_eq!(cut.as_deref(), Some("connection reset by peer"));
            assert_eq!(have, 100_000);
            assert_eq!(
                std::fs::metadata(&part).unwrap().len(),
                have,
                "every counted byte is on disk"
            );
            busy.await.unwrap();
        });
    }
}

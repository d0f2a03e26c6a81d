//! One job's checked destination: its outputs named, written (bytes or a stream), verified,
//! waited for on the CDN when asked, and added to the job's result as URLs.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{Attribute, Attributes, ObjectStore, ObjectStoreExt, PutOptions, PutPayload};
use serde_json::Value;

use super::naming::{self, sanitise_file_name};
use super::{StoreError, StoreFault, StoreOptions, StoredArtifact, fault, storage_error};
use crate::cloud::{Bucket, Provider, redact};
use crate::connectors::{Artifact, ArtifactBody, ConnectorError};

/// One job's checked destination, ready to take its outputs.
#[derive(Debug, Clone)]
pub struct OutputTarget {
    pub(super) bucket: Bucket,
    /// The cloud bucket it names, to build its client again with renewed credentials.
    pub(super) place: Option<(Provider, String)>,
    pub(super) local: bool,
    /// The CDN's URL base (scheme included), when `ctx` names one.
    pub(super) cdn: Option<String>,
    /// The key prefix, ending with `/`.
    pub(super) prefix: String,
    pub(super) filename: Option<String>,
    pub(super) job_id: String,
    pub(super) attempt: u32,
    pub(super) options: StoreOptions,
    pub(super) secrets: Arc<[String]>,
    pub(super) http: reqwest::Client,
}

impl OutputTarget {
    /// Stores every byte artifact (several at once) and returns the result entries in the same
    /// order; URL artifacts are passed through. Fails on the first output that cannot be stored.
    ///
    /// # Panics
    ///
    /// On an output still to be fetched ([`ArtifactBody::Fetch`]): its bytes are fetched first,
    /// and blamed apart from the store's faults (the worker's upload stage does both).
    pub async fn store(&self, artifacts: Vec<Artifact>) -> Result<Vec<StoredArtifact>, ConnectorError> {
        let formats: Vec<Option<naming::Format>> = artifacts
            .iter()
            .map(|a| match &a.body {
                ArtifactBody::Bytes(b) => Some(naming::format_of(b, &a.content_type, &a.name)),
                ArtifactBody::Url(_) | ArtifactBody::Fetch(_) => None,
            })
            .collect();
        let byte_outputs: Vec<(&[u8], &str)> = artifacts
            .iter()
            .zip(&formats)
            .filter_map(|(a, f)| match (&a.body, f) {
                (ArtifactBody::Bytes(b), Some(f)) => Some((b.as_ref(), f.ext.as_str())),
                _ => None,
            })
            .collect();
        let namer = naming::Namer {
            job_id: &self.job_id,
            attempt: self.attempt,
            filename: self.filename.as_deref(),
            now: SystemTime::now(),
        };
        let mut names = namer.names(&byte_outputs).into_iter();
        let mut jobs = Vec::with_capacity(artifacts.len());
        for (artifact, format) in artifacts.into_iter().zip(formats) {
            jobs.push(match (artifact.body, format) {
                (ArtifactBody::Bytes(bytes), Some(format)) => {
                    let name = names.next().expect("one name per byte output");
                    Upload::Bytes { name, bytes, format }
                }
                (body, _) => Upload::Passed {
                    name: sanitise_file_name(&artifact.name),
                    content_type: artifact.content_type,
                    body,
                },
            });
        }
        futures_util::stream::iter(jobs)
            .map(|job| self.upload(job))
            .buffered(self.options.parallel_uploads.max(1))
            .try_collect()
            .await
    }

    async fn upload(&self, job: Upload) -> Result<StoredArtifact, ConnectorError> {
        let (name, bytes, format) = match job {
            Upload::Passed {
                name,
                content_type,
                body,
            } => {
                let url = match body {
                    ArtifactBody::Url(u) => u,
                    ArtifactBody::Bytes(_) => unreachable!("byte outputs are uploaded"),
                    // The worker fetches every output before it stores them (its upload stage).
                    ArtifactBody::Fetch(f) => unreachable!("an output to fetch reached the store: {f:?}"),
                };
                return Ok(StoredArtifact {
                    name,
                    content_type,
                    url,
                    key: None,
                    size: None,
                });
            }
            Upload::Bytes { name, bytes, format } => (name, bytes, format),
        };
        let key = format!("{}{name}", self.prefix);
        let size = bytes.len();
        self.put_within_window(&key, bytes, &format.content_type)
            .await
            .map_err(|e| storage_error(&name, e))?;
        let url = match &self.cdn {
            Some(cdn) => format!("{cdn}/{key}"),
            None => format!("{}/{key}", self.bucket.url_base),
        };
        if self.cdn.is_some() && !self.options.cdn_wait.is_zero() {
            self.wait_for_cdn(&url).await.map_err(|e| storage_error(&name, e))?;
        }
        Ok(StoredArtifact {
            name,
            content_type: format.content_type,
            url,
            key: Some(key),
            size: Some(size),
        })
    }

    /// [`OutputTarget::put`], tried again while the store is down (no answer, 5xx), for at
    /// most the upload window: a store that is back within it completes the job on this
    /// attempt. A refusal (credentials, destination, a bad request) is not tried again.
    async fn put_within_window(&self, key: &str, bytes: Bytes, content_type: &str) -> Result<(), StoreError> {
        const BACKOFF: crate::backoff::Backoff =
            crate::backoff::Backoff::doubling(Duration::from_millis(250), Duration::from_secs(4));
        let started = Instant::now();
        let mut attempt = 0;
        loop {
            match self.put(key, bytes.clone(), content_type).await {
                Err(e) if e.fault() == StoreFault::Unavailable => {
                    // The last try starts as the window closes, so a store back just before
                    // then still takes the object.
                    let left = self.options.upload_window.saturating_sub(started.elapsed());
                    if left.is_zero() {
                        return Err(e);
                    }
                    let delay = BACKOFF.delay(attempt, 0.0).min(left);
                    tracing::info!(key, error = %crate::logging::error_chain(&e), ?delay, "the store is down; trying the upload again");
                    attempt += 1;
                    tokio::time::sleep(delay).await;
                }
                other => return other,
            }
        }
    }

    /// Writes one object in a single PUT (atomic: readers see all of it or nothing) and reads
    /// its size back.
    async fn put(&self, key: &str, bytes: Bytes, content_type: &str) -> Result<(), StoreError> {
        let path = Path::from(key);
        let size = bytes.len() as u64;
        // The local filesystem keeps no attributes (and refuses them).
        let attributes = if self.local {
            Attributes::new()
        } else {
            Attributes::from_iter([(Attribute::ContentType, content_type.to_owned())])
        };
        let opts = PutOptions {
            attributes,
            ..PutOptions::default()
        };
        let put_err = |e: object_store::Error| {
            let source = redact(&self.secrets, &e);
            StoreError::Put {
                key: key.to_owned(),
                fault: fault::fault_of(&e, &source.0),
                source,
            }
        };
        self.bucket
            .store
            .put_opts(&path, PutPayload::from(bytes), opts)
            .await
            .map_err(put_err)?;
        let meta = self.bucket.store.head(&path).await.map_err(|e| StoreError::Verify {
            key: key.to_owned(),
            detail: redact(&self.secrets, &e).0,
        })?;
        if meta.size != size {
            return Err(StoreError::Verify {
                key: key.to_owned(),
                detail: format!("the store holds {} bytes, {size} were written", meta.size),
            });
        }
        Ok(())
    }

    /// Polls the public URL with HEAD until it answers 200, for at most `cdn_wait`.
    async fn wait_for_cdn(&self, url: &str) -> Result<(), StoreError> {
        let started = Instant::now();
        let wait = self.options.cdn_wait;
        loop {
            let left = wait.saturating_sub(started.elapsed());
            let probe = self
                .http
                .head(url)
                .timeout(left.clamp(Duration::from_millis(100), Duration::from_secs(5)));
            if let Ok(r) = probe.send().await
                && r.status() == reqwest::StatusCode::OK
            {
                return Ok(());
            }
            if started.elapsed() + Duration::from_millis(500) >= wait {
                return Err(StoreError::Cdn {
                    url: url.to_owned(),
                    waited: started.elapsed(),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// One output on its way to the store.
enum Upload {
    Bytes {
        name: String,
        bytes: Bytes,
        format: naming::Format,
    },
    Passed {
        name: String,
        content_type: String,
        body: ArtifactBody,
    },
}

/// The most a job's result may hold in Redis, as JSON: 1 MiB. Results are read whole by the
/// API and the monitor, and copied into `jobs:completed`; outputs belong in the output store, so
/// a result this large means an output's bytes were left in it.
pub const MAX_RESULT_BYTES: usize = 1 << 20;

/// Refuses a result larger than [`MAX_RESULT_BYTES`]: the job fails, without retry (another
/// attempt would answer the same), rather than put an output's bytes in Redis.
pub fn check_result_size(result: &Value) -> Result<(), ConnectorError> {
    let size = serde_json::to_vec(result).map_or(0, |v| v.len());
    if size <= MAX_RESULT_BYTES {
        return Ok(());
    }
    Err(ConnectorError::Failed {
        message: format!(
            "the result is {size} bytes, over the {MAX_RESULT_BYTES} a result may hold in Redis \
             (an output's bytes were left in it instead of being stored)"
        ),
        retryable: false,
    })
}

/// Adds the stored outputs to a job's result under the names the existing API and monitor read:
/// `image_url` and `images` (image URLs), `video_url` and `videos` (what the monitor shows),
/// `artifacts` (every output with its name, content type, URL, key and size), and what the
/// existing workers' asset saver writes for every saved output, video and text included, which
/// the API reads to find a job's assets (`extractAssetLocations`, `workflow_output`):
/// `data.image_url` (the first image, else the first output), `data.mime_type`,
/// `data.content_type` (`image`, `video`, `audio` or `binary`, from the extension as the
/// original decides it) and `output_files[]` with `metadata.cdn_url`. A result that is not an
/// object is kept under `data.result`.
pub fn add_to_result(result: &mut Value, stored: &[StoredArtifact]) {
    if stored.is_empty() {
        return;
    }
    if !result.is_object() {
        *result = serde_json::json!({"data": {"result": result.take()}});
    }
    let map = result.as_object_mut().expect("made an object above");
    let saved: Vec<&StoredArtifact> = stored.iter().filter(|s| s.key.is_some()).collect();
    let main = saved
        .iter()
        .find(|s| s.content_type.starts_with("image/"))
        .or(saved.first());
    if let Some(main) = main {
        let data = map
            .entry("data")
            .or_insert_with(|| Value::Object(serde_json::Map::new()));
        if !data.is_object() {
            *data = serde_json::json!({"result": data.take()});
        }
        let data = data.as_object_mut().expect("made an object above");
        data.insert("image_url".to_owned(), Value::String(main.url.clone()));
        data.insert("mime_type".to_owned(), Value::String(main.content_type.clone()));
        data.insert(
            "content_type".to_owned(),
            Value::String(asset_type(&main.name).to_owned()),
        );
        let files = map.entry("output_files").or_insert_with(|| Value::Array(Vec::new()));
        if let Value::Array(files) = files {
            files.extend(saved.iter().map(|s| {
                serde_json::json!({
                    "filename": s.name,
                    "path": s.key,
                    "type": asset_type(&s.name),
                    "size_bytes": s.size.unwrap_or(0),
                    "mime_type": s.content_type,
                    "metadata": {"cdn_url": s.url},
                })
            }));
        }
    }
    let urls = |kind: &str| -> Vec<Value> {
        stored
            .iter()
            .filter(|s| s.content_type.starts_with(kind))
            .map(|s| Value::String(s.url.clone()))
            .collect()
    };
    for (kind, one, many) in [("image/", "image_url", "images"), ("video/", "video_url", "videos")] {
        let list = urls(kind);
        if let Some(first) = list.first() {
            map.insert(one.to_owned(), first.clone());
            map.insert(many.to_owned(), Value::Array(list));
        }
    }
    map.insert(
        "artifacts".to_owned(),
        serde_json::to_value(stored).expect("stored artifacts are plain data"),
    );
}

/// What the existing workers call an asset's type, decided as they decide it: from the file's
/// extension (a text output is `binary` there too).
fn asset_type(name: &str) -> &'static str {
    let ext = name
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "png" | "jpg" | "jpeg" | "webp" | "gif" => "image",
        "mp4" | "webm" | "avi" => "video",
        "mp3" | "wav" | "ogg" => "audio",
        _ => "binary",
    }
}

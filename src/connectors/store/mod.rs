//! Where outputs go: the job's `ctx` names an Azure container, an S3 bucket or a GCS bucket (or,
//! when it names none, the machine's local output directory), and the worker writes each output
//! there through `object_store` before it completes the job. Only URLs enter the job's result,
//! so no output's bytes ever reach Redis.
//!
//! The destination is checked when the job is claimed ([`OutputStore::target`]), before its
//! connector runs: a `ctx` that is not JSON or names no usable destination fails the job at once,
//! without retry. Each upload is verified (a HEAD of the object, its size compared) and, when
//! the operator asks, waited for on the CDN for a bounded time. Whole-object PUTs are atomic on
//! every provider, so an interrupted upload leaves no partial object; it fails the attempt
//! retryably and the broker's retry writes under a new `_r<N>` name.
//!
//! The buckets are reached through [`crate::cloud::CloudStores`], which the models fetched on
//! demand share: one builder, one reading of the credentials.
//!
//! Credentials come only from the standard environment variables (`AWS_*`, `AZURE_*`, `GOOGLE_*`;
//! see docs/connectors.md), read once when the store is made; never from `ctx`, which lives in
//! Redis. Error messages keep the store's own words with every configured secret value removed.

mod destination;
mod fault;
mod naming;
mod target;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;

use destination::Place;
pub use destination::parse_ctx;
pub use fault::StoreFault;
pub use naming::sanitise_file_name;
pub use target::{MAX_RESULT_BYTES, OutputTarget, add_to_result, check_result_size};

use super::{Artifact, ConnectorError, Job};
use crate::cloud::{Bucket, CloudError, CloudStores, Redacted};

/// Why outputs could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The job's `ctx` names no usable destination.
    #[error("invalid ctx: {0}")]
    BadCtx(String),
    /// The store could not be built (credentials, endpoint, the local directory).
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// The upload failed.
    #[error("failed to upload {key}")]
    Put {
        /// The object key.
        key: String,
        /// Whose fault it is, from the store's error code (see [`StoreFault`]).
        fault: StoreFault,
        /// The store's error, secrets removed.
        #[source]
        source: Redacted,
    },
    /// The upload could not be confirmed by reading the object back.
    #[error("failed to verify the upload of {key}: {detail}")]
    Verify {
        /// The object key.
        key: String,
        /// What was wrong.
        detail: String,
    },
    /// The CDN did not serve the object in time.
    #[error("the CDN did not serve {url} within {waited:?}")]
    Cdn {
        /// The public URL.
        url: String,
        /// How long the machine waited.
        waited: Duration,
    },
    /// The local directory could not be created.
    #[error("failed to create {}", path.display())]
    CreateDir {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// Whether another attempt may succeed: the store was unreachable or failing.
    pub fn is_retryable(&self) -> bool {
        self.fault() == StoreFault::Unavailable
    }

    /// Whose fault it is: the machine's credentials, the job's destination, a store down for
    /// now, or a refusal for good.
    pub fn fault(&self) -> StoreFault {
        match self {
            StoreError::BadCtx(_) | StoreError::Cloud(CloudError::BadUrl(_)) => StoreFault::Destination,
            StoreError::Cloud(CloudError::Configure { .. }) => StoreFault::Refused,
            StoreError::Put { fault, .. } => *fault,
            StoreError::Verify { .. } | StoreError::Cdn { .. } | StoreError::CreateDir { .. } => {
                StoreFault::Unavailable
            }
        }
    }

    /// The store's own error code (`SignatureDoesNotMatch`, `AccessDenied`, ...), when it gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            StoreError::Put { source, .. } => fault::error_code(&source.0),
            _ => None,
        }
    }
}

/// One stored output as it appears in the job's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredArtifact {
    /// The stored file name.
    pub name: String,
    /// Its MIME type (from its bytes, when the machine stored it).
    pub content_type: String,
    /// Where it can be fetched: the CDN URL when `ctx` names one.
    pub url: String,
    /// Its object key (prefix and name), when the machine stored it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<String>,
    /// Its size in bytes, when the machine stored it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
}

/// Operator settings of the store.
#[derive(Debug, Clone)]
pub struct StoreOptions {
    /// How long to wait for the CDN to serve each output before completing the job (the
    /// existing workers always waited up to a minute); zero does not wait.
    pub cdn_wait: Duration,
    /// How many outputs of one job are uploaded at once.
    pub parallel_uploads: usize,
    /// How long one output keeps being tried while the store is down (no answer, 5xx) before
    /// the upload gives up; zero tries once.
    pub upload_window: Duration,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            cdn_wait: Duration::ZERO,
            parallel_uploads: 4,
            upload_window: Duration::from_secs(30),
        }
    }
}

/// Stores outputs; shared by every worker of the machine.
#[derive(Debug)]
pub struct OutputStore {
    local_root: PathBuf,
    cloud: Arc<CloudStores>,
    options: StoreOptions,
    http: reqwest::Client,
    local: Mutex<Option<Arc<dyn ObjectStore>>>,
}

impl OutputStore {
    /// A store whose default destination is the local directory `root` (created on first use),
    /// without cloud credentials, with default options (tests and benches).
    pub fn new(root: impl Into<PathBuf>) -> OutputStore {
        OutputStore::with_env(root, [], StoreOptions::default())
    }

    /// A store configured from these variables (the storage ones among them are kept).
    pub fn with_env(
        root: impl Into<PathBuf>,
        vars: impl IntoIterator<Item = (String, String)>,
        options: StoreOptions,
    ) -> OutputStore {
        OutputStore::with_cloud(root, Arc::new(CloudStores::with_vars(vars)), options)
    }

    /// A store whose cloud destinations go through `cloud`, the machine's one [`CloudStores`]
    /// that the models store fetches through too: credentials renewed there are renewed for
    /// both.
    pub fn with_cloud(root: impl Into<PathBuf>, cloud: Arc<CloudStores>, options: StoreOptions) -> OutputStore {
        OutputStore {
            local_root: root.into(),
            cloud,
            options,
            http: crate::connectors::http::client(),
            local: Mutex::new(None),
        }
    }

    /// Uses these storage variables from now on (a reload read new credentials): the clients
    /// built with the old ones are dropped, so the next job and the next re-check of a held
    /// worker use the new ones. `false` when they did not change.
    pub fn renew(&self, vars: impl IntoIterator<Item = (String, String)>) -> bool {
        self.cloud.renew(vars)
    }

    /// Checks where `job`'s outputs go and prepares the client; `retry_count` is the job's
    /// `retry_count` at claim time (0 on the first attempt). Called before the job runs.
    pub fn target(&self, job: &Job, retry_count: u32) -> Result<OutputTarget, StoreError> {
        let spec = destination::spec(&job.ctx)?;
        let (bucket, cdn) = match &spec.place {
            Place::Local => (self.local_bucket()?, None),
            Place::Cloud { provider, bucket, cdn } => (self.cloud.bucket(*provider, bucket)?, cdn.clone()),
        };
        // The key is built as the existing workers build it: the prefix, a `/` unless it ends
        // with one, the name. Local outputs of a job that names no prefix go under its id.
        let mut prefix = if spec.prefix.is_empty() {
            naming::sanitise_segment(&job.id).unwrap_or_else(|| "job".to_owned())
        } else {
            spec.prefix
        };
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let place = match &spec.place {
            Place::Local => None,
            Place::Cloud { provider, bucket, .. } => Some((*provider, bucket.clone())),
        };
        Ok(OutputTarget {
            bucket,
            place,
            local: spec.place == Place::Local,
            cdn,
            prefix,
            filename: spec.filename,
            job_id: job.id.clone(),
            attempt: retry_count.max(spec.retry_hint),
            options: self.options.clone(),
            secrets: self.cloud.secrets(),
            http: self.http.clone(),
        })
    }

    /// Whether the store of `target`'s bucket accepts the machine's credentials now, with the
    /// credentials it holds now (those a reload read included): one authenticated read of an
    /// object nobody writes, the cheapest request every provider answers with its error code
    /// (a listing is signed differently by some stores). `NoSuchKey`, or any answer that is not
    /// about the credentials (the key may not read, say), says they were accepted; a store that
    /// does not answer says nothing, and counts as not yet.
    pub async fn check_credentials(&self, target: &OutputTarget) -> Result<(), String> {
        let Some((provider, bucket)) = &target.place else {
            return Ok(());
        };
        let store = self.cloud.bucket(*provider, bucket).map_err(|e| e.to_string())?.store;
        let probe = Path::from(format!("{}.machine-credentials-check", target.prefix));
        match store.get(&probe).await {
            Ok(_) => Ok(()),
            Err(e) => {
                let text = self.cloud.redact(&e).0;
                match fault::fault_of(&e, &text) {
                    StoreFault::Credentials => Err(format!(
                        "the store still refuses them: {}",
                        fault::error_code(&text).unwrap_or("401")
                    )),
                    StoreFault::Unavailable => Err(format!("the store does not answer: {text}")),
                    StoreFault::Destination | StoreFault::Refused => Ok(()),
                }
            }
        }
    }

    /// Stores `artifacts` where the job's `ctx` says (first attempt); see [`OutputTarget::store`].
    pub async fn store(&self, job: &Job, artifacts: Vec<Artifact>) -> Result<Vec<StoredArtifact>, ConnectorError> {
        let target = self.target(job, 0).map_err(|e| storage_error("outputs", e))?;
        target.store(artifacts).await
    }

    fn local_bucket(&self) -> Result<Bucket, StoreError> {
        let mut local = self
            .local
            .lock()
            .expect("the store cache lock is never held across a panic");
        let root = self.local_root.clone();
        let mkdir_err = |source| StoreError::CreateDir {
            path: root.clone(),
            source,
        };
        std::fs::create_dir_all(&self.local_root).map_err(mkdir_err)?;
        let root = self.local_root.canonicalize().map_err(mkdir_err)?;
        let url_base = format!("file://{}", root.display()).trim_end_matches('/').to_owned();
        if let Some(store) = &*local {
            return Ok(Bucket {
                store: store.clone(),
                url_base,
            });
        }
        let store: Arc<dyn ObjectStore> = Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(&root).map_err(|e| CloudError::Configure {
                provider: "local",
                source: self.cloud.redact(&e),
            })?,
        );
        *local = Some(store.clone());
        Ok(Bucket { store, url_base })
    }
}

fn storage_error(name: &str, e: StoreError) -> ConnectorError {
    ConnectorError::Storage {
        name: name.to_owned(),
        source: Box::new(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::ArtifactBody;
    use bytes::Bytes;
    use serde_json::Value;

    fn artifact(name: &str, bytes: &'static [u8]) -> Artifact {
        Artifact {
            name: name.to_owned(),
            content_type: "image/png".to_owned(),
            body: ArtifactBody::Bytes(Bytes::from_static(bytes)),
        }
    }

    fn job(ctx: Value) -> Job {
        Job {
            id: "job-1".into(),
            service_required: "comfyui".into(),
            payload: Value::Null,
            customer_id: String::new(),
            ctx,
            timeout: None,
        }
    }

    const PNG: &[u8] = b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR";

    #[tokio::test]
    async fn stores_locally_under_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutputStore::with_env(dir.path().join("outputs"), [], StoreOptions::default());
        let j =
            job(serde_json::json!({"storage": {"provider": "local"}, "prefix": "users/7/", "filename": "evil.jpg"}));
        let stored = store.store(&j, vec![artifact("../../x.jpg", PNG)]).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].name, "evil.png");
        for (ctx, field) in [
            (
                serde_json::json!({"storage": {"provider": "local"}, "prefix": "../../users/7/"}),
                "`prefix`",
            ),
            (
                serde_json::json!({"storage": {"provider": "local"}, "prefix": "p", "filename": "../evil.jpg"}),
                "`filename`",
            ),
        ] {
            let e = store.store(&job(ctx), vec![artifact("x.png", PNG)]).await.unwrap_err();
            assert!(
                e.chain().contains(&format!("{field} has a `..` segment")),
                "{}",
                e.chain()
            );
        }
        assert_eq!(stored[0].content_type, "image/png");
        let root = dir.path().join("outputs").canonicalize().unwrap();
        assert_eq!(stored[0].url, format!("file://{}/users/7/evil.png", root.display()));
        assert_eq!(std::fs::read(root.join("users/7/evil.png")).unwrap(), PNG);
        let stored = store
            .store(&job(Value::Null), vec![artifact("a.png", PNG)])
            .await
            .unwrap();
        assert!(stored[0].url.contains("/job-1/job-1_"), "{stored:?}");
    }

    #[test]
    fn bad_destinations_fail_before_anything_runs_and_are_not_retryable() {
        let store = OutputStore::with_env("/nonexistent", [], StoreOptions::default());
        let e = store
            .target(
                &job(serde_json::json!({"storage": {"provider": "ftp", "bucket": "b"}, "prefix": "p"})),
                0,
            )
            .unwrap_err();
        assert!(e.to_string().contains("unknown provider `ftp`"), "{e}");
        assert!(!e.is_retryable());
        let e = storage_error("x", e);
        assert!(!e.is_retryable());
    }

    #[test]
    fn cdn_and_provider_urls() {
        let store = OutputStore::with_env(
            "/nonexistent",
            [
                ("AZURE_STORAGE_ACCOUNT".to_owned(), "acct".to_owned()),
                ("AZURE_STORAGE_KEY".to_owned(), "a2V5".to_owned()),
            ],
            StoreOptions::default(),
        );
        let t = store
            .target(
                &job(serde_json::json!({"storage": {"provider": "azure", "bucket": "c"}, "prefix": "p"})),
                0,
            )
            .unwrap();
        assert_eq!(t.bucket.url_base, "https://acct.blob.core.windows.net/c");
        let t = store
            .target(&job(serde_json::json!({"provider": "azure", "bucket": "c", "prefix": "p", "cdnUrl": "http://cdn.example/"})), 0)
            .unwrap();
        assert_eq!(t.cdn.as_deref(), Some("http://cdn.example"), "an http CDN stays http");
        assert_eq!(t.prefix, "p/");
    }

    #[test]
    fn results_name_urls_as_the_monitor_reads_them() {
        let s = |url: &str, ct: &str| StoredArtifact {
            name: "n".into(),
            content_type: ct.into(),
            url: url.into(),
            key: None,
            size: None,
        };
        let mut r = serde_json::json!({"prompt_id": "p"});
        add_to_result(
            &mut r,
            &[s("u1", "image/png"), s("u2", "image/png"), s("t", "text/plain")],
        );
        assert_eq!(r["image_url"], "u1");
        assert_eq!(r["images"], serde_json::json!(["u1", "u2"]));
        assert!(r.get("video_url").is_none());
        assert_eq!(r["artifacts"].as_array().unwrap().len(), 3);
        assert!(r.get("output_files").is_none(), "nothing was saved, only passed on");
        let mut r = serde_json::json!("text");
        add_to_result(&mut r, &[s("v", "video/mp4")]);
        assert_eq!(r["data"]["result"], "text");
        assert_eq!(r["videos"], serde_json::json!(["v"]));
    }

    #[test]
    fn every_saved_output_is_written_as_the_existing_asset_saver_writes_it() {
        let saved = |name: &str, ct: &str| StoredArtifact {
            name: name.into(),
            content_type: ct.into(),
            url: format!("https://cdn.example/p/{name}"),
            key: Some(format!("p/{name}")),
            size: Some(3),
        };
        // A video-only job: the API finds the video under data.image_url.
        let mut r = serde_json::json!({"data": {"own": 1}});
        add_to_result(&mut r, &[saved("clip.mp4", "video/mp4")]);
        assert_eq!(r["data"]["own"], 1, "the connector's data is kept");
        assert_eq!(r["data"]["image_url"], "https://cdn.example/p/clip.mp4");
        assert_eq!(r["data"]["mime_type"], "video/mp4");
        assert_eq!(r["data"]["content_type"], "video");
        assert!(r.get("image_url").is_none(), "the monitor does not show it as an image");
        assert_eq!(
            r["output_files"],
            serde_json::json!([{"filename": "clip.mp4", "path": "p/clip.mp4", "type": "video",
                "size_bytes": 3, "mime_type": "video/mp4",
                "metadata": {"cdn_url": "https://cdn.example/p/clip.mp4"}}])
        );
        // Text is `binary` there; an image comes first when there is one.
        let mut r = serde_json::json!({});
        add_to_result(&mut r, &[saved("notes.txt", "text/plain"), saved("a.png", "image/png")]);
        assert_eq!(r["data"]["image_url"], "https://cdn.example/p/a.png");
        assert_eq!(r["output_files"][0]["type"], "binary");
        assert_eq!(r["output_files"].as_array().unwrap().len(), 2);
    }
}

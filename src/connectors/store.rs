//! Where artifacts go: the job's `ctx` names a bucket (S3, Azure Blob, GCS) or, when it names
//! none, the machine's default local directory. Artifacts are written through `object_store`,
//! and only their URLs enter the job's result, so no large binary ever reaches Redis.
//!
//! Object keys are built from sanitised parts only: a name that a service (or a job) chose can
//! never climb out of its prefix (`..`, absolute paths and odd characters are neutralised).
//! Cloud credentials come from the standard environment variables that `object_store`'s
//! `from_env` builders read (`AWS_*`, `AZURE_STORAGE_*`, `GOOGLE_*`; see docs/connectors.md).

use std::collections::HashMap;
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use serde::Serialize;

use super::{Artifact, ArtifactBody, ConnectorError, Job};

/// Why an artifact could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The job's `ctx.storage` is unusable.
    #[error("invalid ctx.storage: {0}")]
    BadDestination(String),
    /// The store could not be built from the environment.
    #[error("failed to configure {provider} storage")]
    Configure {
        /// The provider.
        provider: String,
        /// The builder's error.
        #[source]
        source: object_store::Error,
    },
    /// The upload failed.
    #[error("failed to write {key}")]
    Put {
        /// The object key.
        key: String,
        /// The store's error.
        #[source]
        source: object_store::Error,
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

/// One stored artifact as it appears in the job's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredArtifact {
    /// The sanitised file name.
    pub name: String,
    /// Its MIME type.
    pub content_type: String,
    /// Where it can be fetched.
    pub url: String,
    /// Its size in bytes, when the machine wrote it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<usize>,
}

/// A cloud provider named by `ctx.storage.provider`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Provider {
    S3,
    Azure,
    Gcs,
}

impl Provider {
    fn parse(name: &str) -> Option<Provider> {
        match name.trim().to_ascii_lowercase().as_str() {
            "s3" | "aws" | "amazon" | "r2" | "minio" => Some(Provider::S3),
            "azure" | "azblob" | "azure_blob" | "blob" => Some(Provider::Azure),
            "gcs" | "gcp" | "google" => Some(Provider::Gcs),
            _ => None,
        }
    }
}

/// A place artifacts are written and the URL under which each key is published.
#[derive(Debug, Clone)]
struct Destination {
    store: Arc<dyn ObjectStore>,
    url_base: String,
}

/// Stores artifacts; shared by every worker of the machine.
#[derive(Debug)]
pub struct OutputStore {
    local_root: PathBuf,
    local: Mutex<Option<Destination>>,
    cloud: Mutex<HashMap<(Provider, String), Destination>>,
}

impl OutputStore {
    /// A store whose default destination is the local directory `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> OutputStore {
        OutputStore {
            local_root: root.into(),
            local: Mutex::new(None),
            cloud: Mutex::new(HashMap::new()),
        }
    }

    /// The local default directory.
    pub fn local_root(&self) -> &FsPath {
        &self.local_root
    }

    /// Stores every byte artifact where the job's `ctx` says and returns the result entries in
    /// the same order; URL artifacts are passed through.
    pub async fn store(&self, job: &Job, artifacts: Vec<Artifact>) -> Result<Vec<StoredArtifact>, ConnectorError> {
        if artifacts.is_empty() {
            return Ok(Vec::new());
        }
        let to_err = |name: &str, source| ConnectorError::Storage {
            name: name.to_owned(),
            source: Box::new(source),
        };
        let first_name = artifacts[0].name.clone();
        let dest = self.destination(&job.ctx).map_err(|e| to_err(&first_name, e))?;
        let prefix = key_prefix(job);
        let names = file_names(&job.ctx, &artifacts);
        let mut out = Vec::with_capacity(artifacts.len());
        for (artifact, name) in artifacts.into_iter().zip(names) {
            match artifact.body {
                ArtifactBody::Url(url) => out.push(StoredArtifact {
                    name,
                    content_type: artifact.content_type,
                    url,
                    size: None,
                }),
                ArtifactBody::Bytes(bytes) => {
                    let mut parts = prefix.clone();
                    parts.push(name.clone());
                    let key = Path::from_iter(parts.iter().map(String::as_str));
                    let size = bytes.len();
                    dest.store.put(&key, PutPayload::from(bytes)).await.map_err(|source| {
                        to_err(
                            &name,
                            StoreError::Put {
                                key: key.to_string(),
                                source,
                            },
                        )
                    })?;
                    out.push(StoredArtifact {
                        url: format!("{}/{}", dest.url_base, parts.join("/")),
                        name,
                        content_type: artifact.content_type,
                        size: Some(size),
                    });
                }
            }
        }
        Ok(out)
    }

    fn destination(&self, ctx: &serde_json::Value) -> Result<Destination, StoreError> {
        let storage = ctx.get("storage").filter(|s| !s.is_null());
        let Some(storage) = storage else {
            return self.local_destination();
        };
        let provider_name = storage.get("provider").and_then(|p| p.as_str()).unwrap_or_default();
        if provider_name.is_empty() || provider_name.eq_ignore_ascii_case("local") {
            return self.local_destination();
        }
        let provider = Provider::parse(provider_name).ok_or_else(|| {
            StoreError::BadDestination(format!(
                "unknown provider `{provider_name}` (known: s3, azure, gcs, local)"
            ))
        })?;
        let bucket = storage
            .get("bucket")
            .or_else(|| storage.get("container"))
            .and_then(|b| b.as_str())
            .filter(|b| !b.trim().is_empty())
            .ok_or_else(|| StoreError::BadDestination("`bucket` is missing".to_owned()))?
            .trim()
            .to_owned();
        let cdn = storage
            .get("cdnUrl")
            .or_else(|| storage.get("cdn_url"))
            .and_then(|c| c.as_str())
            .map(|c| c.trim().trim_end_matches('/').to_owned())
            .filter(|c| !c.is_empty());
        let mut cache = self
            .cloud
            .lock()
            .expect("the store cache lock is never held across a panic");
        let dest = match cache.get(&(provider, bucket.clone())) {
            Some(d) => d.clone(),
            None => {
                let d = cloud_destination(provider, &bucket)?;
                cache.insert((provider, bucket), d.clone());
                d
            }
        };
        Ok(match cdn {
            Some(url_base) => Destination { url_base, ..dest },
            None => dest,
        })
    }

    fn local_destination(&self) -> Result<Destination, StoreError> {
        let mut local = self
            .local
            .lock()
            .expect("the store cache lock is never held across a panic");
        if let Some(d) = &*local {
            return Ok(d.clone());
        }
        std::fs::create_dir_all(&self.local_root).map_err(|source| StoreError::CreateDir {
            path: self.local_root.clone(),
            source,
        })?;
        let root = self.local_root.canonicalize().map_err(|source| StoreError::CreateDir {
            path: self.local_root.clone(),
            source,
        })?;
        let store =
            object_store::local::LocalFileSystem::new_with_prefix(&root).map_err(|source| StoreError::Configure {
                provider: "local".to_owned(),
                source,
            })?;
        let d = Destination {
            store: Arc::new(store),
            url_base: format!("file://{}", root.display()).trim_end_matches('/').to_owned(),
        };
        *local = Some(d.clone());
        Ok(d)
    }
}

fn cloud_destination(provider: Provider, bucket: &str) -> Result<Destination, StoreError> {
    let configure = |name: &str| {
        let name = name.to_owned();
        move |source| StoreError::Configure { provider: name, source }
    };
    Ok(match provider {
        Provider::S3 => {
            let b = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            let endpoint = b.get_config_value(&object_store::aws::AmazonS3ConfigKey::Endpoint);
            let region = b
                .get_config_value(&object_store::aws::AmazonS3ConfigKey::Region)
                .unwrap_or_else(|| "us-east-1".to_owned());
            let url_base = match endpoint {
                Some(e) => format!("{}/{bucket}", e.trim_end_matches('/')),
                None => format!("https://{bucket}.s3.{region}.amazonaws.com"),
            };
            Destination {
                store: Arc::new(b.build().map_err(configure("s3"))?),
                url_base,
            }
        }
        Provider::Azure => {
            let b = object_store::azure::MicrosoftAzureBuilder::from_env().with_container_name(bucket);
            let account = b
                .get_config_value(&object_store::azure::AzureConfigKey::AccountName)
                .unwrap_or_default();
            Destination {
                store: Arc::new(b.build().map_err(configure("azure"))?),
                url_base: format!("https://{account}.blob.core.windows.net/{bucket}"),
            }
        }
        Provider::Gcs => {
            let b = object_store::gcp::GoogleCloudStorageBuilder::from_env().with_bucket_name(bucket);
            Destination {
                store: Arc::new(b.build().map_err(configure("gcs"))?),
                url_base: format!("https://storage.googleapis.com/{bucket}"),
            }
        }
    })
}

/// The key prefix: `ctx.prefix` split into sanitised segments, or the job id.
fn key_prefix(job: &Job) -> Vec<String> {
    let from_ctx: Vec<String> = job
        .ctx
        .get("prefix")
        .and_then(|p| p.as_str())
        .map(|p| p.split(['/', '\\']).filter_map(sanitise_segment).collect())
        .unwrap_or_default();
    if from_ctx.is_empty() {
        vec![sanitise_segment(&job.id).unwrap_or_else(|| "job".to_owned())]
    } else {
        from_ctx
    }
}

/// The stored names: `ctx.filename` (numbered when there are several artifacts, keeping each
/// artifact's extension when the filename has none), else each artifact's sanitised name;
/// duplicates get a numeric suffix.
fn file_names(ctx: &serde_json::Value, artifacts: &[Artifact]) -> Vec<String> {
    let wanted = ctx
        .get("filename")
        .and_then(|f| f.as_str())
        .and_then(|f| f.rsplit(['/', '\\']).next())
        .map(sanitise_file_name)
        .filter(|f| f != "output");
    let mut names: Vec<String> = Vec::with_capacity(artifacts.len());
    for (i, a) in artifacts.iter().enumerate() {
        let own = sanitise_file_name(&a.name);
        let mut name = match &wanted {
            None => own,
            Some(w) => {
                let (stem, ext) = split_ext(w);
                let ext = ext.or_else(|| split_ext(&own).1);
                let stem = if artifacts.len() > 1 {
                    format!("{stem}_{i}")
                } else {
                    stem.to_owned()
                };
                match ext {
                    Some(e) => format!("{stem}.{e}"),
                    None => stem,
                }
            }
        };
        let base = name.clone();
        let mut n = 1;
        while names.contains(&name) {
            let (stem, ext) = split_ext(&base);
            name = match ext {
                Some(e) => format!("{stem}_{n}.{e}"),
                None => format!("{stem}_{n}"),
            };
            n += 1;
        }
        names.push(name);
    }
    names
}

fn split_ext(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once('.') {
        Some((stem, ext)) if !stem.is_empty() && !ext.is_empty() => (stem, Some(ext)),
        _ => (name, None),
    }
}

/// One path segment made safe: only `[A-Za-z0-9._-]`, no leading dots, at most 200 bytes;
/// `None` when nothing usable is left (e.g. `..`).
fn sanitise_segment(raw: &str) -> Option<String> {
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
    use bytes::Bytes;
    use proptest::prelude::*;

    fn artifact(name: &str) -> Artifact {
        Artifact {
            name: name.to_owned(),
            content_type: "image/png".to_owned(),
            body: ArtifactBody::Bytes(Bytes::from_static(b"png")),
        }
    }

    fn job(ctx: serde_json::Value) -> Job {
        Job {
            id: "job-1".into(),
            service_required: "comfyui".into(),
            payload: serde_json::Value::Null,
            customer_id: String::new(),
            ctx,
            timeout: None,
        }
    }

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
    fn ctx_filename_and_duplicates() {
        let ctx = serde_json::json!({"filename": "../final"});
        assert_eq!(file_names(&ctx, &[artifact("x.png")]), ["final.png"]);
        assert_eq!(
            file_names(&ctx, &[artifact("x.png"), artifact("y.png")]),
            ["final_0.png", "final_1.png"]
        );
        assert_eq!(
            file_names(&serde_json::Value::Null, &[artifact("a.png"), artifact("a.png")]),
            ["a.png", "a_1.png"]
        );
    }

    #[tokio::test]
    async fn stores_locally_under_the_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutputStore::new(dir.path().join("outputs"));
        let j = job(serde_json::json!({"prefix": "../../users/7/", "storage": null}));
        let stored = store.store(&j, vec![artifact("../../evil.png")]).await.unwrap();
        assert_eq!(stored.len(), 1);
        assert_eq!(stored[0].name, "evil.png");
        let root = dir.path().join("outputs").canonicalize().unwrap();
        assert_eq!(stored[0].url, format!("file://{}/users/7/evil.png", root.display()));
        assert_eq!(std::fs::read(root.join("users/7/evil.png")).unwrap(), b"png");
        let stored = store
            .store(&job(serde_json::Value::Null), vec![artifact("a.png")])
            .await
            .unwrap();
        assert!(stored[0].url.ends_with("/job-1/a.png"), "{stored:?}");
    }

    #[tokio::test]
    async fn bad_destinations_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let store = OutputStore::new(dir.path());
        let err = store
            .store(
                &job(serde_json::json!({"storage": {"provider": "ftp", "bucket": "b"}})),
                vec![artifact("a.png")],
            )
            .await
            .unwrap_err();
        assert!(err.chain().contains("unknown provider `ftp`"), "{}", err.chain());
        let err = store
            .store(
                &job(serde_json::json!({"storage": {"provider": "s3"}})),
                vec![artifact("a.png")],
            )
            .await
            .unwrap_err();
        assert!(err.chain().contains("`bucket` is missing"), "{}", err.chain());
    }

    #[test]
    fn cdn_url_is_used_for_cloud_destinations() {
        let store = OutputStore::new("/nonexistent");
        let d = store
            .destination(
                &serde_json::json!({"storage": {"provider": "gcs", "bucket": "b", "cdnUrl": "https://cdn.example/x/"}}),
            )
            .unwrap();
        assert_eq!(d.url_base, "https://cdn.example/x");
        let d = store
            .destination(&serde_json::json!({"storage": {"provider": "gcs", "bucket": "b"}}))
            .unwrap();
        assert_eq!(d.url_base, "https://storage.googleapis.com/b");
    }
}

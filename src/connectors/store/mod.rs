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
//! The buckets are reached through [`CloudStores`], which the models fetched on demand
//! (`s3://`, `az://`, `gs://` sources, see `crate::models`) share: one builder, one reading of
//! the credentials.
//!
//! Credentials come only from the standard environment variables (`AWS_*`, `AZURE_*`, `GOOGLE_*`;
//! see docs/connectors.md), read once when the store is made; never from `ctx`, which lives in
//! Redis. Error messages keep the store's own words with every configured secret value removed.

mod destination;
mod fault;
mod naming;
mod target;

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt};
use serde::Serialize;
use serde_json::Value;

pub use destination::parse_ctx;
use destination::{Place, Provider};
pub use fault::StoreFault;
pub use naming::sanitise_file_name;
pub use target::{MAX_RESULT_BYTES, OutputTarget, add_to_result, check_result_size};

use super::{Artifact, ConnectorError, Job};

/// Why outputs could not be stored.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The job's `ctx` names no usable destination.
    #[error("invalid ctx: {0}")]
    BadCtx(String),
    /// An object URL (a model's source) names no usable bucket and object.
    #[error("invalid object URL {0}")]
    BadUrl(String),
    /// The store could not be built from the environment (credentials, endpoint).
    #[error("failed to configure {provider} storage")]
    Configure {
        /// The provider.
        provider: &'static str,
        /// The builder's error, secrets removed.
        #[source]
        source: Redacted,
    },
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
            StoreError::BadCtx(_) | StoreError::BadUrl(_) => StoreFault::Destination,
            StoreError::Configure { .. } => StoreFault::Refused,
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

/// A store's error message with every configured secret value cut out.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Redacted(String);

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

/// One cloud bucket's client and the URL under which its keys are published.
#[derive(Debug, Clone)]
struct Bucket {
    store: Arc<dyn ObjectStore>,
    url_base: String,
}

/// Stores outputs; shared by every worker of the machine.
#[derive(Debug)]
pub struct OutputStore {
    local_root: PathBuf,
    cloud: CloudStores,
    options: StoreOptions,
    http: reqwest::Client,
    local: Mutex<Option<Arc<dyn ObjectStore>>>,
}

/// The cloud buckets this machine can reach, configured from the standard environment
/// variables (`AWS_*`, `AZURE_*`, `AZURITE_*`, `GOOGLE_*`; secrets possibly from their
/// `<NAME>_FILE`, see `crate::config::Credentials`), one client per bucket built on first use and
/// then kept until the credentials are renewed (a reload that read new ones). One builder for
/// everything the machine moves through object stores: the outputs of jobs and the models
/// fetched on demand ([`CloudStores::object`]).
#[derive(Debug)]
pub struct CloudStores {
    keys: Mutex<Arc<Keys>>,
    cache: Mutex<HashMap<(Provider, String), Bucket>>,
}

/// One reading of the store variables, and the secret values among them (cut from messages).
#[derive(Debug)]
struct Keys {
    vars: BTreeMap<String, String>,
    secrets: Arc<[String]>,
}

impl OutputStore {
    /// A store whose default destination is the local directory `root` (created on first use),
    /// with cloud credentials from the process environment and default options.
    pub fn new(root: impl Into<PathBuf>) -> OutputStore {
        // Unreadable secret files are the configuration loader's to report.
        let vars = crate::config::storage_vars(&crate::config::ProcessEnv, &mut Vec::new());
        OutputStore::with_env(root, vars, StoreOptions::default())
    }

    /// A store configured from these variables (the storage ones among them are kept).
    pub fn with_env(
        root: impl Into<PathBuf>,
        vars: impl IntoIterator<Item = (String, String)>,
        options: StoreOptions,
    ) -> OutputStore {
        OutputStore {
            local_root: root.into(),
            cloud: CloudStores::with_vars(vars),
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

    /// The cloud stores behind the outputs.
    pub fn cloud(&self) -> &CloudStores {
        &self.cloud
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
            secrets: self.cloud.keys().secrets.clone(),
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
            object_store::local::LocalFileSystem::new_with_prefix(&root).map_err(|e| StoreError::Configure {
                provider: "local",
                source: self.cloud.redact(&e),
            })?,
        );
        *local = Some(store.clone());
        Ok(Bucket { store, url_base })
    }
}

impl CloudStores {
    /// Cloud stores configured from `env` (the storage variables among its names, secrets
    /// possibly from their `<NAME>_FILE`).
    pub fn from_env(env: &dyn crate::config::Env) -> CloudStores {
        // Unreadable secret files are the configuration loader's to report.
        CloudStores::with_vars(crate::config::storage_vars(env, &mut Vec::new()))
    }

    /// Cloud stores configured from these variables (the storage ones among them are kept).
    pub fn with_vars(vars: impl IntoIterator<Item = (String, String)>) -> CloudStores {
        CloudStores {
            keys: Mutex::new(Arc::new(Keys::new(vars))),
            cache: Mutex::new(HashMap::new()),
        }
    }

    /// Uses these variables from now on, dropping the clients built with the old ones; `false`
    /// when they did not change.
    pub fn renew(&self, vars: impl IntoIterator<Item = (String, String)>) -> bool {
        let keys = Keys::new(vars);
        let mut current = self.keys.lock().expect("the keys lock is never held across a panic");
        if current.vars == keys.vars {
            return false;
        }
        *current = Arc::new(keys);
        // Cleared while the keys are locked, so no client built with the old keys is cached
        // after this (see `bucket`).
        self.cache
            .lock()
            .expect("the store cache lock is never held across a panic")
            .clear();
        true
    }

    fn keys(&self) -> Arc<Keys> {
        self.keys
            .lock()
            .expect("the keys lock is never held across a panic")
            .clone()
    }

    /// The store and object path an `s3://bucket/key`, `az://container/blob` or
    /// `gs://bucket/object` URL names, through the same builder (and credentials) as the
    /// outputs. Errors name the URL without its query, which may hold a signature.
    pub fn object(&self, url: &url::Url) -> Result<(Arc<dyn ObjectStore>, Path), StoreError> {
        let bad = |why: &str| {
            let mut shown = url.clone();
            shown.set_query(None);
            StoreError::BadUrl(format!("{shown}: {why}"))
        };
        let provider = match url.scheme() {
            "s3" => Provider::S3,
            "az" => Provider::Azure,
            "gs" => Provider::Gcs,
            _ => return Err(bad("not an s3://, az:// or gs:// URL")),
        };
        let bucket = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or_else(|| bad("it names no bucket"))?;
        let path = Path::from_url_path(url.path().trim_start_matches('/')).map_err(|e| bad(&e.to_string()))?;
        if path.as_ref().is_empty() {
            return Err(bad("it names no object"));
        }
        Ok((self.bucket(provider, bucket)?.store, path))
    }

    /// The client of `bucket` at `provider`, built on first use.
    fn bucket(&self, provider: Provider, bucket: &str) -> Result<Bucket, StoreError> {
        // The keys' lock is taken first, as `renew` does, so a renewal and a build never cross.
        let keys = self.keys.lock().expect("the keys lock is never held across a panic");
        let mut cache = self
            .cache
            .lock()
            .expect("the store cache lock is never held across a panic");
        if let Some(b) = cache.get(&(provider, bucket.to_owned())) {
            return Ok(b.clone());
        }
        let b = keys.build(provider, bucket)?;
        cache.insert((provider, bucket.to_owned()), b.clone());
        Ok(b)
    }

    fn redact(&self, e: &dyn std::error::Error) -> Redacted {
        self.keys().redact(e)
    }
}

impl Keys {
    fn new(vars: impl IntoIterator<Item = (String, String)>) -> Keys {
        let vars: BTreeMap<String, String> = vars
            .into_iter()
            .filter(|(k, _)| crate::config::is_storage_var(k))
            .collect();
        let secrets: Vec<String> = vars
            .iter()
            .filter(|(k, v)| v.len() >= 4 && crate::config::is_storage_secret(k))
            .map(|(_, v)| v.clone())
            .collect();
        Keys {
            vars,
            secrets: secrets.into(),
        }
    }

    /// The variables with `prefix`, lower-cased as `object_store`'s config keys spell them.
    fn config_vars(&self, prefix: &str) -> impl Iterator<Item = (String, &str)> {
        self.vars
            .iter()
            .filter(move |(k, _)| k.starts_with(prefix))
            .map(|(k, v)| (k.to_ascii_lowercase(), v.as_str()))
    }

    fn build(&self, provider: Provider, bucket: &str) -> Result<Bucket, StoreError> {
        use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
        use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
        use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};

        let configure = |provider: &'static str| {
            move |e: object_store::Error| StoreError::Configure {
                provider,
                source: self.redact(&e),
            }
        };
        Ok(match provider {
            Provider::S3 => {
                let mut b = AmazonS3Builder::new();
                for (k, v) in self.config_vars("AWS_") {
                    if let Ok(key) = k.parse::<AmazonS3ConfigKey>() {
                        b = b.with_config(key, v);
                    }
                }
                let b = b.with_bucket_name(bucket).with_retry(retry_config());
                let region = b
                    .get_config_value(&AmazonS3ConfigKey::Region)
                    .unwrap_or_else(|| "us-east-1".to_owned());
                let url_base = match b.get_config_value(&AmazonS3ConfigKey::Endpoint) {
                    Some(e) => format!("{}/{bucket}", e.trim_end_matches('/')),
                    None => format!("https://{bucket}.s3.{region}.amazonaws.com"),
                };
                Bucket {
                    store: Arc::new(b.build().map_err(configure("s3"))?),
                    url_base,
                }
            }
            Provider::Azure => {
                let mut b = MicrosoftAzureBuilder::new();
                // The existing workers read AZURE_STORAGE_ACCOUNT and AZURE_STORAGE_KEY;
                // `object_store` spells them with `_NAME` and `_ACCOUNT_KEY`.
                let aliases = [
                    ("AZURE_STORAGE_ACCOUNT", AzureConfigKey::AccountName),
                    ("AZURE_STORAGE_KEY", AzureConfigKey::AccessKey),
                ];
                for (var, key) in aliases {
                    if let Some(v) = self.vars.get(var) {
                        b = b.with_config(key, v);
                    }
                }
                for (k, v) in self.config_vars("AZURE_") {
                    if let Ok(key) = k.parse::<AzureConfigKey>() {
                        b = b.with_config(key, v);
                    }
                }
                let b = b.with_container_name(bucket).with_retry(retry_config());
                let account = b.get_config_value(&AzureConfigKey::AccountName).unwrap_or_default();
                let emulator = b
                    .get_config_value(&AzureConfigKey::UseEmulator)
                    .is_some_and(|v| v.eq_ignore_ascii_case("true"));
                let url_base = match b.get_config_value(&AzureConfigKey::Endpoint) {
                    Some(e) if !emulator => format!("{}/{bucket}", e.trim_end_matches('/')),
                    _ if emulator => {
                        let base = self
                            .vars
                            .get("AZURITE_BLOB_STORAGE_URL")
                            .map_or("http://127.0.0.1:10000", String::as_str);
                        let account = if account.is_empty() {
                            "devstoreaccount1"
                        } else {
                            &account
                        };
                        format!("{}/{account}/{bucket}", base.trim_end_matches('/'))
                    }
                    _ => format!("https://{account}.blob.core.windows.net/{bucket}"),
                };
                Bucket {
                    store: Arc::new(b.build().map_err(configure("azure"))?),
                    url_base,
                }
            }
            Provider::Gcs => {
                let mut b = GoogleCloudStorageBuilder::new();
                for (k, v) in self.config_vars("GOOGLE_") {
                    if let Ok(key) = k.parse::<GoogleConfigKey>() {
                        b = b.with_config(key, v);
                    }
                }
                let base = self
                    .gcs_base_url()
                    .unwrap_or_else(|| "https://storage.googleapis.com".to_owned());
                let b = b.with_bucket_name(bucket).with_retry(retry_config());
                Bucket {
                    store: Arc::new(b.build().map_err(configure("gcs"))?),
                    url_base: format!("{}/{bucket}", base.trim_end_matches('/')),
                }
            }
        })
    }

    /// The `gcs_base_url` of the service account key, when it names one (emulators, proxies).
    fn gcs_base_url(&self) -> Option<String> {
        let key = match self.vars.get("GOOGLE_SERVICE_ACCOUNT_KEY") {
            Some(k) => k.clone(),
            None => {
                let path = [
                    "GOOGLE_SERVICE_ACCOUNT",
                    "GOOGLE_SERVICE_ACCOUNT_PATH",
                    "GOOGLE_APPLICATION_CREDENTIALS",
                ]
                .iter()
                .find_map(|v| self.vars.get(*v))?;
                std::fs::read_to_string(path).ok()?
            }
        };
        let v: Value = serde_json::from_str(&key).ok()?;
        v.get("gcs_base_url").and_then(Value::as_str).map(str::to_owned)
    }

    fn redact(&self, e: &dyn std::error::Error) -> Redacted {
        redact(&self.secrets, e)
    }
}

fn redact(secrets: &[String], e: &dyn std::error::Error) -> Redacted {
    let mut text = crate::logging::error_chain(e);
    for s in secrets {
        text = text.replace(s.as_str(), "[redacted]");
    }
    Redacted(text)
}

/// Bounded retries inside one upload: a store that is down fails the attempt within seconds
/// (the broker then retries the job) instead of holding the worker for `object_store`'s default
/// three minutes.
fn retry_config() -> object_store::RetryConfig {
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries: 3,
        retry_timeout: Duration::from_secs(30),
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
    fn object_urls_name_a_provider_bucket_and_path_and_share_the_outputs_builder() {
        let gcs_key = serde_json::json!({"gcs_base_url": "http://127.0.0.1:9", "disable_oauth": true,
            "client_email": "", "private_key": "", "private_key_id": ""})
        .to_string();
        let env = BTreeMap::from([
            ("AWS_ACCESS_KEY_ID", "AKIAEXAMPLE"),
            ("AWS_SECRET_ACCESS_KEY", "s3cr3t-s3cr3t"),
            ("AWS_REGION", "eu-west-1"),
            ("AZURE_STORAGE_ACCOUNT", "acct"),
            ("AZURE_STORAGE_KEY", "a2V5a2V5a2V5"),
            ("GOOGLE_SERVICE_ACCOUNT_KEY", gcs_key.as_str()),
            ("HOME", "/root"),
        ]);
        let stores = CloudStores::from_env(&env);
        assert!(
            !stores.keys().vars.contains_key("HOME"),
            "only storage variables are kept"
        );
        let cases = [
            (
                "s3://weights/loras/a b.safetensors",
                Provider::S3,
                "weights",
                "loras/a b.safetensors",
            ),
            (
                "s3://weights/loras/a%20b.safetensors",
                Provider::S3,
                "weights",
                "loras/a b.safetensors",
            ),
            ("az://models/ckpt/x.ckpt", Provider::Azure, "models", "ckpt/x.ckpt"),
            ("gs://bucket/x.pt", Provider::Gcs, "bucket", "x.pt"),
        ];
        for (url, provider, bucket, path) in cases {
            let (_, p) = stores.object(&url::Url::parse(url).unwrap()).unwrap();
            assert_eq!(p.as_ref(), path, "{url}");
            let cache = stores.cache.lock().unwrap();
            assert!(
                cache.contains_key(&(provider, bucket.to_owned())),
                "{url}: {provider:?} {bucket}"
            );
        }
        // One client per bucket, whoever asks.
        let n = stores.cache.lock().unwrap().len();
        stores.object(&url::Url::parse("s3://weights/other").unwrap()).unwrap();
        assert_eq!(stores.cache.lock().unwrap().len(), n);

        for bad in ["https://host/x", "s3://bucket/", "s3://bucket", "file:///x"] {
            let e = stores.object(&url::Url::parse(bad).unwrap()).err().unwrap();
            assert!(matches!(e, StoreError::BadUrl(_)) && !e.is_retryable(), "{bad}: {e}");
        }
        let e = stores
            .object(&url::Url::parse("az://c/?sig=abc").unwrap())
            .err()
            .unwrap();
        assert!(
            !e.to_string().contains("sig="),
            "the query (a signature) is not shown: {e}"
        );
    }

    #[test]
    fn secrets_are_cut_from_messages() {
        let secrets: Vec<String> = vec!["s3cr3t-value".into()];
        let e = std::io::Error::other("denied for key s3cr3t-value");
        assert_eq!(redact(&secrets, &e).to_string(), "denied for key [redacted]");
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

//! The cloud object stores this machine reaches (S3, Azure Blob Storage, GCS): one builder of
//! their clients from the standard environment variables (`AWS_*`, `AZURE_*`, `AZURITE_*`,
//! `GOOGLE_*`; see docs/connectors.md), one reading of the credentials, one client per bucket.
//! The outputs of jobs (`connectors::store`) and the models fetched on demand (`models`, from
//! `s3://`, `az://` and `gs://` sources) both go through it. Error messages keep the store's own
//! words with every configured secret value removed.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use object_store::ObjectStore;
use object_store::path::Path;
use serde_json::Value;

/// A cloud provider.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// Amazon S3 and the stores that speak its API (R2, MinIO).
    S3,
    /// Azure Blob Storage.
    Azure,
    /// Google Cloud Storage.
    Gcs,
}

/// Why a store could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum CloudError {
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
}

/// A store's error message with every configured secret value cut out.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Redacted(pub(crate) String);

/// One cloud bucket's client and the URL under which its keys are published.
#[derive(Debug, Clone)]
pub struct Bucket {
    /// The client.
    pub store: Arc<dyn ObjectStore>,
    /// The URL its keys are published under.
    pub url_base: String,
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

impl CloudStores {
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

    /// The secret values among the variables, which every message of a store leaves out.
    pub fn secrets(&self) -> Arc<[String]> {
        self.keys().secrets.clone()
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
    pub fn object(&self, url: &url::Url) -> Result<(Arc<dyn ObjectStore>, Path), CloudError> {
        let bad = |why: &str| {
            let mut shown = url.clone();
            shown.set_query(None);
            CloudError::BadUrl(format!("{shown}: {why}"))
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
    pub fn bucket(&self, provider: Provider, bucket: &str) -> Result<Bucket, CloudError> {
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

    /// `e`'s message with the secret values cut out.
    pub fn redact(&self, e: &dyn std::error::Error) -> Redacted {
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

    fn build(&self, provider: Provider, bucket: &str) -> Result<Bucket, CloudError> {
        use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
        use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
        use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};

        let configure = |provider: &'static str| {
            move |e: object_store::Error| CloudError::Configure {
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

/// `e`'s message with each of `secrets` cut out.
pub fn redact(secrets: &[String], e: &dyn std::error::Error) -> Redacted {
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

#[cfg(test)]
mod tests {
    use super::*;

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
        let stores = CloudStores::with_vars(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
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
            assert!(matches!(e, CloudError::BadUrl(_)), "{bad}: {e}");
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
}

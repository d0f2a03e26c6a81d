//! Models on demand: the machine's one [`ModelStore`], shared by the ComfyUI connectors of all
//! its GPUs. Before a job is submitted, the connector asks the store for the model files its
//! workflow names ([`references`]); the store finds the ones missing on disk and fetches them
//! from the [`catalogue`]: once per machine however many jobs ask at the same time
//! (single flight), resumable, checksum-verified, renamed into the shared models directory only
//! when complete, and linked into `ComfyUI/models/<kind>/`.
//!
//! Disk budget: with `models.cache_max_gb`, the least recently used models in the shared
//! directory are evicted to make room for a download, never one a running job uses (the
//! [`ModelsInUse`] guard of each job) and never a pinned one (the models manifest, installed at
//! start, is the catalogue's "always present" subset). Evictions are logged and counted. The
//! workers rescan the models folders, so the capabilities they advertise follow the disk.

mod catalogue;
mod disk;
mod fetch;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use serde_json::{Map, Value};
use tokio::sync::watch;

use crate::cloud::CloudStores;
use crate::config::Credentials;
use catalogue::{Catalogue, Entry};
pub use disk::scan_models;

/// Why a model could not be made available.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ModelError {
    /// The workflow names a file neither on disk nor in the catalogue.
    #[error("failed to find model `{0}`: it is neither on disk nor in the models catalogue")]
    Unknown(String),
    /// The catalogue is invalid.
    #[error("failed to read the models catalogue {file}: {message}")]
    Catalogue {
        /// The catalogue file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A source could not be read (network, HTTP error, cut transfer): another try may work.
    #[error("failed to download model `{name}` from {source_url}: {reason}")]
    Download {
        /// The model.
        name: String,
        /// The source, without credentials.
        source_url: String,
        /// Why.
        reason: String,
    },
    /// The downloaded bytes are not the catalogue's.
    #[error("failed to verify model `{name}` from {source_url}: got {actual}, the catalogue says {expected}")]
    Checksum {
        /// The model.
        name: String,
        /// The source, without credentials.
        source_url: String,
        /// The catalogue's size and hash.
        expected: String,
        /// What arrived.
        actual: String,
    },
    /// A file operation failed.
    #[error("failed to store model `{name}` at {}: {source}", path.display())]
    Io {
        /// The model.
        name: String,
        /// The path.
        path: PathBuf,
        /// Why (shared between the jobs waiting for one download).
        source: Arc<std::io::Error>,
    },
    /// The models in use and the pinned ones leave no room under the budget.
    #[error(
        "failed to make room for model `{name}` ({need} bytes): models in use and pinned models fill models.cache_max_gb"
    )]
    NoRoom {
        /// The model.
        name: String,
        /// Its size.
        need: u64,
    },
}

impl From<(String, PathBuf, std::io::Error)> for ModelError {
    fn from((name, path, e): (String, PathBuf, std::io::Error)) -> Self {
        ModelError::Io {
            name,
            path,
            source: Arc::new(e),
        }
    }
}

impl ModelError {
    /// Whether another attempt (later, or on another machine) may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            ModelError::Download { .. } | ModelError::Io { .. } | ModelError::NoRoom { .. }
        )
    }
}

/// How the store is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreSettings {
    /// The catalogue file (TOML, or JSON by extension); `None`: nothing is fetched.
    pub catalogue: Option<PathBuf>,
    /// Where downloads go: `<shared_dir>/<kind>/<name>`.
    pub shared_dir: PathBuf,
    /// ComfyUI's models folder, where the files are linked and looked for.
    pub link_dir: PathBuf,
    /// The shared directory's budget in bytes; `None`: no limit.
    pub budget: Option<u64>,
    /// Paths relative to `shared_dir` (`kind/name`) never evicted.
    pub pinned: BTreeSet<String>,
    /// The workflow inputs that name a model file.
    pub loader_inputs: Vec<String>,
}

/// The machine's models on demand; cheap to clone.
#[derive(Debug, Clone)]
pub struct ModelStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// The settings and catalogue in force; a reload replaces them whole (a job keeps the ones
    /// it started with), the downloads, uses and eviction order stay.
    setup: std::sync::RwLock<Arc<Setup>>,
    sources: fetch::Sources,
    state: Mutex<State>,
    downloads: AtomicU64,
    downloaded_bytes: AtomicU64,
    evictions: AtomicU64,
}

/// What a store is set up with: its settings and the catalogue read with them.
#[derive(Debug)]
pub struct Setup {
    settings: StoreSettings,
    catalogue: Catalogue,
}

impl Setup {
    /// Reads and checks the catalogue `settings` name, its tokens from `credentials`.
    pub fn read(settings: StoreSettings, credentials: &Credentials) -> Result<Setup, ModelError> {
        let catalogue = match &settings.catalogue {
            Some(path) => catalogue::load(path, credentials)?,
            None => Catalogue::new(),
        };
        Ok(Setup { settings, catalogue })
    }
}

type Flight = Shared<BoxFuture<'static, Result<(), ModelError>>>;

#[derive(Debug, Default)]
struct State {
    /// Downloads running now, by model name, with their byte counts.
    inflight: HashMap<String, (Flight, watch::Receiver<u64>)>,
    /// How many running jobs use each model (by `kind/name` under the shared directory).
    in_use: HashMap<String, usize>,
    /// When each model was last asked for (a counter: larger is more recent).
    last_used: HashMap<String, u64>,
    tick: u64,
}

/// The models one job uses; they cannot be evicted until it is dropped.
#[derive(Debug)]
pub struct ModelsInUse {
    store: ModelStore,
    keys: Vec<String>,
}

impl Drop for ModelsInUse {
    fn drop(&mut self) {
        let mut st = self
            .store
            .inner
            .state
            .lock()
            .expect("the model store's lock is never poisoned");
        for k in &self.keys {
            if let Some(n) = st.in_use.get_mut(k) {
                *n -= 1;
                if *n == 0 {
                    st.in_use.remove(k);
                }
            }
        }
    }
}

impl ModelStore {
    /// A store fetching object-store sources through `cloud` (the output store's); the
    /// catalogue is read and checked now, its tokens from `credentials`.
    pub fn new(
        settings: StoreSettings,
        cloud: Arc<CloudStores>,
        credentials: &Credentials,
    ) -> Result<ModelStore, ModelError> {
        let setup = Setup::read(settings, credentials)?;
        let client = crate::http_client::builder()
            .connect_timeout(Duration::from_secs(30))
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| ModelError::Catalogue {
                file: "(http client)".to_owned(),
                message: e.to_string(),
            })?;
        let sources = fetch::Sources { http: client, cloud };
        Ok(ModelStore {
            inner: Arc::new(Inner {
                setup: std::sync::RwLock::new(Arc::new(setup)),
                sources,
                state: Mutex::new(State::default()),
                downloads: AtomicU64::new(0),
                downloaded_bytes: AtomicU64::new(0),
                evictions: AtomicU64::new(0),
            }),
        })
    }

    /// The cloud stores the `s3://`, `az://` and `gs://` sources are fetched through: the
    /// output store's, so a reload's renewed credentials reach both.
    #[cfg(test)]
    pub(crate) fn cloud(&self) -> &CloudStores {
        &self.inner.sources.cloud
    }

    /// The workflow inputs that name model files.
    pub fn loader_inputs(&self) -> Vec<String> {
        self.setup().settings.loader_inputs.clone()
    }

    /// Puts `setup` (a reload's settings and catalogue, its tokens read again) in force: the
    /// next job's models are looked for, fetched and evicted by it; the jobs running keep theirs,
    /// and the downloads under way, the models in use and the eviction order stay. Returns
    /// whether anything changed.
    pub fn reconfigure(&self, setup: Setup) -> bool {
        let mut current = self
            .inner
            .setup
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = current.settings != setup.settings || current.catalogue != setup.catalogue;
        if changed {
            *current = Arc::new(setup);
        }
        changed
    }

    /// The bearer token the catalogue in force gives `model`; `None` when it does not list it.
    #[cfg(test)]
    pub(crate) fn catalogue_token(&self, model: &str) -> Option<Option<String>> {
        self.setup().catalogue.get(model).map(|e| e.token.clone())
    }

    /// The settings and catalogue in force now.
    fn setup(&self) -> Arc<Setup> {
        self.inner
            .setup
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Downloads started so far.
    pub fn downloads(&self) -> u64 {
        self.inner.downloads.load(Ordering::Relaxed)
    }

    /// Bytes of models fetched completely so far (a resumed download counts whole).
    pub fn downloaded_bytes(&self) -> u64 {
        self.inner.downloaded_bytes.load(Ordering::Relaxed)
    }

    /// Models evicted so far.
    pub fn evictions(&self) -> u64 {
        self.inner.evictions.load(Ordering::Relaxed)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.inner
            .state
            .lock()
            .expect("the model store's lock is never poisoned")
    }

    /// Makes every model in `names` present, fetching missing catalogue models (reporting
    /// `(model, bytes so far, size)` on `progress`), and holds them in use until the returned
    /// guard is dropped.
    pub async fn ensure(
        &self,
        names: &[String],
        progress: &(dyn Fn(&str, u64, u64) + Send + Sync),
    ) -> Result<ModelsInUse, ModelError> {
        let setup = self.setup();
        let link_dir = &setup.settings.link_dir;
        let mut on_disk: Option<BTreeSet<String>> = None;
        let mut guard = ModelsInUse {
            store: self.clone(),
            keys: Vec::new(),
        };
        for name in names {
            let Some(entry) = setup.catalogue.get(name) else {
                // Not ours to fetch: fine when ComfyUI has it (installed, baked in, a node's).
                let found = on_disk.get_or_insert_with(|| scan_models(link_dir).into_iter().collect());
                if found.contains(name) {
                    continue;
                }
                return Err(ModelError::Unknown(name.clone()));
            };
            let key = format!("{}/{}", entry.kind, entry.name);
            {
                let mut st = self.lock();
                *st.in_use.entry(key.clone()).or_default() += 1;
                st.tick += 1;
                let t = st.tick;
                st.last_used.insert(key.clone(), t);
            }
            guard.keys.push(key);
            if link_dir.join(&entry.kind).join(&entry.name).exists() {
                continue;
            }
            let (flight, mut bytes) = self.flight(entry);
            let size = entry.size;
            let watch_progress = async {
                loop {
                    progress(name, *bytes.borrow_and_update(), size);
                    if bytes.changed().await.is_err() {
                        std::future::pending::<()>().await;
                    }
                }
            };
            tokio::select! {
                r = flight => r?,
                () = watch_progress => unreachable!("progress is followed until the download ends"),
            }
            progress(name, size, size);
        }
        Ok(guard)
    }

    /// The running download of `entry`, or a new one.
    fn flight(&self, entry: &Entry) -> (Flight, watch::Receiver<u64>) {
        let mut st = self.lock();
        if let Some((f, rx)) = st.inflight.get(&entry.name) {
            return (f.clone(), rx.clone());
        }
        let (tx, rx) = watch::channel(0u64);
        let store = self.clone();
        let name = entry.name.clone();
        let entry = entry.clone();
        // The download is its own task: a job that is cancelled while waiting stops waiting, not
        // the download the other jobs (or its retry) need.
        let task = tokio::spawn(async move {
            let r = store.download(&entry, &tx).await;
            store.lock().inflight.remove(&entry.name);
            r
        });
        let failed_name = name.clone();
        let fut = async move {
            task.await.unwrap_or_else(|e| {
                Err(ModelError::Download {
                    name: failed_name,
                    source_url: "(none)".to_owned(),
                    reason: format!("the download task failed: {e}"),
                })
            })
        }
        .boxed()
        .shared();
        st.inflight.insert(name, (fut.clone(), rx.clone()));
        (fut, rx)
    }

    async fn download(&self, entry: &Entry, tx: &watch::Sender<u64>) -> Result<(), ModelError> {
        let setup = self.setup();
        let s = &setup.settings;
        let dest = s.shared_dir.join(&entry.kind).join(&entry.name);
        if !dest.is_file() {
            self.make_room(s, entry)?;
            self.inner.downloads.fetch_add(1, Ordering::Relaxed);
            tracing::info!(model = %entry.name, kind = %entry.kind, size = entry.size, "fetching a model on demand");
            fetch::fetch(&self.inner.sources, entry, &dest, tx).await?;
            self.inner.downloaded_bytes.fetch_add(entry.size, Ordering::Relaxed);
        }
        let at = s.link_dir.join(&entry.kind).join(&entry.name);
        if at != dest {
            link(&dest, &at).map_err(|e| ModelError::from((entry.name.clone(), at.clone(), e)))?;
        }
        Ok(())
    }

    /// Evicts least recently used models from the shared directory until `entry` fits the
    /// budget; never a model in use or pinned.
    fn make_room(&self, settings: &StoreSettings, entry: &Entry) -> Result<(), ModelError> {
        let Some(budget) = settings.budget else {
            return Ok(());
        };
        let shared = &settings.shared_dir;
        let mut files = Vec::new();
        walk(shared, shared, 0, &mut files);
        let mut used: u64 = files.iter().map(|(_, size)| size).sum();
        if used + entry.size <= budget {
            return Ok(());
        }
        let st = self.lock();
        let mut candidates: Vec<(u64, String, u64)> = files
            .into_iter()
            .filter(|(key, _)| !st.in_use.contains_key(key) && !settings.pinned.contains(key))
            .map(|(key, size)| (st.last_used.get(&key).copied().unwrap_or(0), key, size))
            .collect();
        drop(st);
        candidates.sort();
        for (_, key, size) in candidates {
            if used + entry.size <= budget {
                break;
            }
            let file = shared.join(&key);
            if let Err(e) = std::fs::remove_file(&file) {
                tracing::warn!(model = %key, error = %e, "failed to evict a model");
                continue;
            }
            let link = settings.link_dir.join(&key);
            if link != file && std::fs::read_link(&link).is_ok_and(|t| t == file) {
                let _ = std::fs::remove_file(&link);
            }
            used -= size;
            self.inner.evictions.fetch_add(1, Ordering::Relaxed);
            tracing::info!(model = %key, bytes = size, for_model = %entry.name, "evicted a model to make room");
        }
        if used + entry.size > budget {
            return Err(ModelError::NoRoom {
                name: entry.name.clone(),
                need: entry.size,
            });
        }
        Ok(())
    }
}

/// Links `file` at `at`, replacing a stale link.
fn link(file: &Path, at: &Path) -> std::io::Result<()> {
    if let Some(dir) = at.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::read_link(at).is_ok_and(|t| t == file) {
        return Ok(());
    }
    if at.symlink_metadata().is_ok() {
        std::fs::remove_file(at)?;
    }
    std::os::unix::fs::symlink(file, at)
}

/// Model files under `dir` as (`kind/name` relative to `root`, size); partial downloads are
/// not models.
fn walk(root: &Path, dir: &Path, depth: usize, out: &mut Vec<(String, u64)>) {
    if depth > 4 {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let path = e.path();
        let Ok(meta) = e.metadata() else { continue };
        if meta.is_dir() {
            walk(root, &path, depth + 1, out);
        } else if meta.is_file() && path.extension().is_none_or(|x| x != "part") {
            if let Ok(rel) = path.strip_prefix(root) {
                out.push((rel.to_string_lossy().into_owned(), meta.len()));
            }
        }
    }
}

/// The model files a ComfyUI workflow (API format) names through `inputs`, in order, once each.
pub fn references(workflow: &Map<String, Value>, inputs: &[String]) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for node in workflow.values() {
        let Some(Value::Object(node_inputs)) = node.get("inputs") else {
            continue;
        };
        for input in inputs {
            if let Some(Value::String(name)) = node_inputs.get(input) {
                if !name.is_empty() && seen.insert(name.clone()) {
                    out.push(name.clone());
                }
            }
        }
    }
    out
}

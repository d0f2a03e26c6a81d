//! The environment seam: configuration reads variables through [`Env`] so tests pass a map
//! instead of mutating the process environment.

use std::collections::BTreeMap;

/// A source of environment variables.
pub trait Env {
    /// The value of `key`, or `None` when unset. Values that are not valid Unicode count as
    /// unset for configuration purposes.
    fn var(&self, key: &str) -> Option<String>;

    /// The names of every variable set, to warn about the ones the machine does not know.
    fn names(&self) -> Vec<String>;

    /// The host's name, from which a default machine id is derived. Test maps answer with their
    /// `HOSTNAME` entry.
    fn hostname(&self) -> Option<String> {
        self.var("HOSTNAME")
    }
}

/// The real process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, key: &str) -> Option<String> {
        std::env::var(key).ok()
    }

    fn names(&self) -> Vec<String> {
        std::env::vars_os().filter_map(|(k, _)| k.into_string().ok()).collect()
    }

    fn hostname(&self) -> Option<String> {
        nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok())
    }
}

impl Env for BTreeMap<String, String> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).cloned()
    }

    fn names(&self) -> Vec<String> {
        self.keys().cloned().collect()
    }
}

impl Env for BTreeMap<&str, &str> {
    fn var(&self, key: &str) -> Option<String> {
        self.get(key).map(|v| (*v).to_owned())
    }

    fn names(&self) -> Vec<String> {
        self.keys().map(|k| (*k).to_owned()).collect()
    }
}

/// Every variable of the machine's own prefixes that it reads.
pub(crate) const KNOWN: &[&str] = &[
    "MACHINE_ID",
    "MACHINE_WORKSPACE",
    "MACHINE_CONFIG",
    "MACHINE_HEALTH_PORT",
    "MACHINE_GPU_COUNT",
    "MACHINE_GPU_MEMORY_GB",
    "MACHINE_GPU_MODEL",
    "MACHINE_CONTROL_TOKEN",
    "MACHINE_READ_TOKEN",
    "WORKER_CONNECTORS",
    "HUB_REDIS_URL",
    "COMFYUI_BASE_PORT",
    "COMFYUI_REPO_URL",
    "COMFYUI_REF",
    "COMFYUI_PYTHON",
    "COMFYUI_TORCH_INDEX_URL",
    "COMFYUI_NODES_FILE",
    "COMFYUI_MODELS_MANIFEST",
    "COMFYUI_MODELS_DIR",
];

/// The prefixes the machine owns: a variable with one of them that it does not read is most
/// likely a typo of one it does.
const PREFIXES: &[&str] = &["MACHINE_", "WORKER_", "COMFYUI_", "HUB_"];

/// A warning for each variable of the machine's prefixes that it does not read, naming the
/// closest one it does.
pub(crate) fn unknown_variables(env: &dyn Env) -> Vec<(String, String)> {
    let mut names = env.names();
    names.sort();
    names
        .into_iter()
        .filter(|n| PREFIXES.iter().any(|p| n.starts_with(p)) && !KNOWN.contains(&n.as_str()))
        .map(|n| {
            let closest = KNOWN
                .iter()
                .min_by_key(|k| strsim::damerau_levenshtein(&n, k))
                .expect("KNOWN is not empty");
            let message = format!("is not a variable the machine reads; did you mean `{closest}`?");
            (n, message)
        })
        .collect()
}

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

/// Variables of the machine's prefixes read outside the configuration overlay: the CLI's
/// `--config`, the models catalogue's bearer token, and the secrets given in files.
const READ_ELSEWHERE: &[&str] = &[
    "MACHINE_CONFIG",
    "COMFYUI_MODELS_CATALOGUE_TOKEN",
    // Secrets given in files (see `super::credentials`).
    "MACHINE_CONTROL_TOKEN_FILE",
    "MACHINE_READ_TOKEN_FILE",
    "COMFYUI_MODELS_CATALOGUE_TOKEN_FILE",
];

/// Every variable the machine reads: the overlay's table ([`super::overlay::variables`], the
/// one list `machine run --help` prints too) and [`READ_ELSEWHERE`].
fn known() -> Vec<&'static str> {
    let mut known: Vec<&'static str> = super::overlay::variables().into_iter().map(|(var, _)| var).collect();
    known.extend(READ_ELSEWHERE);
    known
}

/// The prefixes the machine owns: a variable with one of them that it does not read is most
/// likely a typo of one it does.
const PREFIXES: &[&str] = &["MACHINE_", "WORKER_", "COMFYUI_", "HUB_"];

/// A warning for each variable of the machine's prefixes that it does not read, naming the
/// closest one it does.
pub(crate) fn unknown_variables(env: &dyn Env) -> Vec<(String, String)> {
    let known = known();
    let mut names = env.names();
    names.sort();
    names
        .into_iter()
        .filter(|n| PREFIXES.iter().any(|p| n.starts_with(p)) && !known.contains(&n.as_str()))
        .map(|n| {
            let closest = known
                .iter()
                .min_by_key(|k| strsim::damerau_levenshtein(&n, k))
                .expect("the overlay's table is not empty");
            let message = format!("is not a variable the machine reads; did you mean `{closest}`?");
            (n, message)
        })
        .collect()
}

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

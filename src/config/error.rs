//! What goes wrong: one [`Problem`] per bad key or variable, all of them gathered into one
//! [`ConfigError`] so an operator fixes a deployment in one round. [`Problems`] names each
//! problem after where its value came from: the TOML key, or the environment variable that set
//! it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Serialize;

/// One configuration problem: the key or variable, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    /// A TOML key path (`services.sidecar.command`) or an environment variable name.
    pub key: String,
    /// What is wrong, as a sentence fragment.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.key, self.message)
    }
}

/// Why the configuration could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("failed to read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// One or more problems, all listed.
    #[error("invalid configuration:\n{}", .0.iter().map(|p| format!("  - {p}")).collect::<Vec<_>>().join("\n"))]
    Invalid(Vec<Problem>),
}

impl ConfigError {
    /// The problems, when the configuration was read but is invalid.
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid(p) => p,
            ConfigError::Read { .. } => &[],
        }
    }
}

/// The environment variable that set each overlaid key path, so a problem with the value names
/// the variable the operator has to fix rather than a file key they never wrote.
#[derive(Debug, Default)]
pub(super) struct Origins(BTreeMap<String, &'static str>);

impl Origins {
    /// Records that `var` set `path`.
    pub(super) fn set(&mut self, path: &str, var: &'static str) {
        self.0.insert(path.to_owned(), var);
    }

    /// The variable that set `path`, if one did.
    pub(super) fn var(&self, path: &str) -> Option<&'static str> {
        self.0.get(path).copied()
    }
}

/// Every problem found so far, each named after where its value came from.
#[derive(Debug)]
pub(super) struct Problems {
    origins: Origins,
    list: Vec<Problem>,
}

impl Problems {
    pub(super) fn new(origins: Origins) -> Problems {
        Problems {
            origins,
            list: Vec::new(),
        }
    }

    /// A problem with the value at the TOML key `path`. When an environment variable set that
    /// value, the problem is the variable's and says which key it set; otherwise it is the
    /// key's.
    pub(super) fn at(&mut self, path: &str, message: impl Into<String>) {
        let message = message.into();
        let problem = match self.origins.var(path) {
            Some(var) => Problem {
                key: var.to_owned(),
                message: format!("{message} (sets `{path}`)"),
            },
            None => Problem {
                key: path.to_owned(),
                message,
            },
        };
        self.list.push(problem);
    }

    /// A problem with something that is not a TOML key: an environment variable only the
    /// environment can set, or the file as a whole.
    pub(super) fn other(&mut self, key: &str, message: impl Into<String>) {
        self.list.push(Problem {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    /// The list itself, for the section validators whose keys no variable sets.
    pub(super) fn list_mut(&mut self) -> &mut Vec<Problem> {
        &mut self.list
    }

    pub(super) fn into_vec(self) -> Vec<Problem> {
        self.list
    }
}

/// The name of `known` that `name` most likely misspells: the closest by edit distance
/// (Damerau-Levenshtein), when it is within two edits or a third of its length.
pub(crate) fn closest<'a>(name: &str, known: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    known
        .into_iter()
        .map(|k| (strsim::damerau_levenshtein(name, k), k))
        .filter(|(distance, k)| *distance <= 2.max(k.len() / 3))
        .min()
        .map(|(_, k)| k)
}

//! Credentials: every secret the machine authenticates with, read in the one configuration
//! loader, so they are read at start and read again by every reload.
//!
//! Each secret may be given in its variable or, as Docker and Kubernetes mount secrets, in the
//! file its `<NAME>_FILE` variable names (the file's trailing newline is not part of the
//! secret). That covers the output stores' keys (every `AWS_*`, `AZURE_*` or `GOOGLE_*`
//! variable whose name says key, secret, token, SAS or password), the external APIs' keys
//! (the variables their `api_key_env` names), the health server's tokens
//! (`MACHINE_CONTROL_TOKEN`, `MACHINE_READ_TOKEN`) and the models catalogue's token. A key
//! rotated in a mounted secret file reaches the running machine with `machine reload`; a file
//! that cannot be read, or a secret given both ways, is a configuration problem naming the
//! variable.

use std::collections::BTreeMap;
use std::fmt;

use super::env::Env;
use super::error::Problem;

/// The bearer token of a models catalogue given as a URL.
pub const CATALOGUE_TOKEN: &str = "COMFYUI_MODELS_CATALOGUE_TOKEN";

/// The prefixes of the variables that configure the object stores (outputs and models).
const STORAGE_PREFIXES: &[&str] = &["AWS_", "AZURE_", "AZURITE_", "GOOGLE_"];

/// Words that make a storage variable a secret (its value is redacted from messages and may
/// come from a file).
const SECRET_WORDS: &[&str] = &["KEY", "SECRET", "TOKEN", "SAS", "PASSWORD"];

/// Storage variables that end in `_FILE` and are themselves paths the store reads, not secrets
/// given in a file.
const FILE_VARIABLES: &[&str] = &["AWS_WEB_IDENTITY_TOKEN_FILE"];

/// Whether `name` configures an object store.
pub fn is_storage_var(name: &str) -> bool {
    STORAGE_PREFIXES.iter().any(|p| name.starts_with(p))
}

/// Whether the storage variable `name` holds a secret.
pub fn is_storage_secret(name: &str) -> bool {
    is_storage_var(name) && SECRET_WORDS.iter().any(|w| name.contains(w))
}

/// The value of the secret `key`: its variable, else the content of the file `<key>_FILE`
/// names, its trailing line ending removed. `Ok(None)` when neither is set; an error (in words,
/// naming the variable) when the file cannot be read or both are set.
pub fn secret(env: &dyn Env, key: &str) -> Result<Option<String>, Problem> {
    let file_var = format!("{key}_FILE");
    let direct = env.var(key).filter(|v| !v.is_empty());
    let path = env.var(&file_var).filter(|p| !p.trim().is_empty());
    match (direct, path) {
        (Some(_), Some(_)) => Err(Problem {
            key: file_var,
            message: format!("both {key} and {key}_FILE are set; set one of them"),
        }),
        (Some(v), None) => Ok(Some(v)),
        (None, None) => Ok(None),
        (None, Some(path)) => match std::fs::read_to_string(path.trim()) {
            Ok(text) => Ok(Some(text.trim_end_matches(['\n', '\r']).to_owned())),
            Err(e) => Err(Problem {
                key: file_var,
                message: format!("cannot read the {key} file {}: {e}", path.trim()),
            }),
        },
    }
}

/// The storage variables of `env`, each secret read from its `_FILE` when given so; problems
/// (unreadable files) are pushed to `problems`.
pub fn storage_vars(env: &dyn Env, problems: &mut Vec<Problem>) -> BTreeMap<String, String> {
    let mut vars = BTreeMap::new();
    for name in env.names() {
        if !is_storage_var(&name) {
            continue;
        }
        let key = match name.strip_suffix("_FILE") {
            Some(key) if is_storage_secret(key) && !FILE_VARIABLES.contains(&name.as_str()) => key,
            _ => &name,
        };
        if vars.contains_key(key) {
            continue;
        }
        if is_storage_secret(key) {
            match secret(env, key) {
                Ok(Some(v)) => {
                    vars.insert(key.to_owned(), v);
                }
                Ok(None) => {}
                Err(p) => problems.push(p),
            }
        } else if let Some(v) = env.var(&name) {
            vars.insert(name, v);
        }
    }
    vars
}

/// The credentials the configuration read: the storage variables and the named secrets (API
/// keys, tokens). Never printed or serialised.
#[derive(Clone, Default)]
pub struct Credentials {
    storage: BTreeMap<String, String>,
    named: BTreeMap<String, String>,
    /// The environment the loader read, for the secrets that only a data file names (a models
    /// catalogue's `token_env`), read with the same rules when that file is read
    /// ([`Credentials::secret`]). Not compared: the process environment does not change while the
    /// machine runs; the secrets read from files are in `storage` and `named`.
    env: std::sync::Arc<BTreeMap<String, String>>,
}

impl PartialEq for Credentials {
    fn eq(&self, other: &Credentials) -> bool {
        self.storage == other.storage && self.named == other.named
    }
}

impl Eq for Credentials {}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("storage", &self.storage.keys().collect::<Vec<_>>())
            .field("named", &self.named.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Credentials {
    /// Reads the storage variables and the secrets named in `named` from `env`.
    pub(super) fn read(env: &dyn Env, named: &[&str], problems: &mut Vec<Problem>) -> Credentials {
        let storage = storage_vars(env, problems);
        let mut found = BTreeMap::new();
        for key in named.iter().filter(|k| !k.is_empty()) {
            match secret(env, key) {
                Ok(Some(v)) => {
                    found.insert((*key).to_owned(), v);
                }
                Ok(None) => {}
                Err(p) => problems.push(p),
            }
        }
        let env = env
            .names()
            .into_iter()
            .filter_map(|n| Some((n.clone(), env.var(&n)?)))
            .collect();
        Credentials {
            storage,
            named: found,
            env: std::sync::Arc::new(env),
        }
    }

    /// Credentials from these storage variables and named secrets (tests, benches).
    pub fn from_parts(
        storage: impl IntoIterator<Item = (String, String)>,
        named: impl IntoIterator<Item = (String, String)>,
    ) -> Credentials {
        Credentials {
            storage: storage.into_iter().filter(|(k, _)| is_storage_var(k)).collect(),
            named: named.into_iter().collect(),
            env: Default::default(),
        }
    }

    /// The object stores' variables, secrets read from their files.
    pub fn storage(&self) -> &BTreeMap<String, String> {
        &self.storage
    }

    /// The secret in the variable `key` (an API key, a token), when set.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.named.get(key).map(String::as_str)
    }

    /// The secret in the variable `key` or the file its `<key>_FILE` names, for a variable the
    /// configuration does not name but a file it points to does (a models catalogue's
    /// `token_env`): read now, from the environment the configuration was loaded with.
    /// `Ok(None)` when neither is set; the problem names the variable.
    pub fn secret(&self, key: &str) -> Result<Option<String>, Problem> {
        match self.get(key) {
            Some(v) => Ok(Some(v.to_owned())),
            None => secret(&*self.env, key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_come_from_their_variable_or_their_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("key");
        std::fs::write(&file, "from-file\n").unwrap();
        let path = file.to_str().unwrap();
        let env = BTreeMap::from([
            ("AWS_SECRET_ACCESS_KEY_FILE", path),
            ("AWS_REGION", "eu-west-1"),
            ("AWS_WEB_IDENTITY_TOKEN_FILE", "/var/run/token"),
            ("AZURE_STORAGE_KEY", "direct"),
            ("MY_API_KEY_FILE", path),
            ("MACHINE_CONTROL_TOKEN", "tok"),
            ("HOME", "/root"),
        ]);
        let mut problems = Vec::new();
        let c = Credentials::read(&env, &["MY_API_KEY", "MACHINE_CONTROL_TOKEN", "UNSET"], &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(c.storage()["AWS_SECRET_ACCESS_KEY"], "from-file");
        assert_eq!(c.storage()["AWS_REGION"], "eu-west-1");
        assert_eq!(
            c.storage()["AWS_WEB_IDENTITY_TOKEN_FILE"],
            "/var/run/token",
            "a path the store reads itself stays a path"
        );
        assert_eq!(c.storage()["AZURE_STORAGE_KEY"], "direct");
        assert!(!c.storage().contains_key("HOME"));
        assert_eq!(c.get("MY_API_KEY"), Some("from-file"));
        assert_eq!(c.get("MACHINE_CONTROL_TOKEN"), Some("tok"));
        assert_eq!(c.get("UNSET"), None);
        assert!(!format!("{c:?}").contains("from-file"), "never printed");
    }

    #[test]
    fn an_unreadable_file_or_both_ways_is_a_problem_naming_the_variable() {
        let env = BTreeMap::from([
            ("AWS_SECRET_ACCESS_KEY_FILE", "/nonexistent/key"),
            ("MY_API_KEY", "a"),
            ("MY_API_KEY_FILE", "/nonexistent/key"),
        ]);
        let mut problems = Vec::new();
        Credentials::read(&env, &["MY_API_KEY"], &mut problems);
        let keys: Vec<&str> = problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["AWS_SECRET_ACCESS_KEY_FILE", "MY_API_KEY_FILE"], "{problems:?}");
        assert!(problems[0].message.contains("cannot read"), "{problems:?}");
        assert!(problems[1].message.contains("set one of them"), "{problems:?}");
    }
}

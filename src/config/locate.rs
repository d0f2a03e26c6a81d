//! What the configuration says before it is validated: where the machine's workspace is (and
//! with it `<workspace>/worker_connectors`, which overrides `WORKER_CONNECTORS`), its health
//! address and its tokens. [`locate`] reads these leniently, so that the commands that only talk
//! to a running machine find it even when the shell's configuration does not validate; a value
//! that cannot be read is the default's.

use std::path::{Path, PathBuf};

use super::env::Env;
use super::error::{ConfigError, Problem};
use super::model::Secret;
use super::overlay;
use super::raw::{DEFAULT_TOML, merge};

/// The file in the workspace whose content overrides `WORKER_CONNECTORS` (at start and at each
/// reload): a running process cannot see new environment variables.
pub const CONNECTORS_FILE: &str = "worker_connectors";

/// Where a machine of this configuration is, read leniently (see the module docs).
#[derive(Debug, Clone)]
pub struct Location {
    /// `machine.workspace` (`MACHINE_WORKSPACE`): the control socket lives under it.
    pub workspace: PathBuf,
    /// `health.port` (`MACHINE_HEALTH_PORT`).
    pub health_port: u16,
    /// `MACHINE_CONTROL_TOKEN`.
    pub control_token: Option<Secret>,
    /// `MACHINE_READ_TOKEN`.
    pub read_token: Option<Secret>,
}

/// Reads the workspace, health port and tokens from `file` over the defaults and `env` over
/// both, validating nothing else; an unreadable file counts as absent.
pub fn locate(file: Option<&Path>, env: &dyn Env) -> Location {
    let text = file.and_then(|p| std::fs::read_to_string(p).ok());
    locate_str(text.as_deref(), env)
}

/// [`locate`] with the file's text in hand.
pub(super) fn locate_str(file: Option<&str>, env: &dyn Env) -> Location {
    let defaults: toml::Table = DEFAULT_TOML
        .parse()
        .expect("the embedded default configuration is valid TOML (a unit test checks it)");
    let mut doc = defaults.clone();
    if let Some(user) = file.and_then(|t| t.parse::<toml::Table>().ok()) {
        merge(&mut doc, user);
    }
    overlay::apply(&mut doc, env, &mut Vec::new());
    // The value as written, else the default's when the written one is not of its kind.
    let values = |section: &str, key: &str| -> Vec<toml::Value> {
        [&doc, &defaults]
            .iter()
            .filter_map(|d| d.get(section)?.get(key).cloned())
            .collect()
    };
    let workspace = values("machine", "workspace")
        .iter()
        .find_map(|v| v.as_str().map(str::trim).filter(|s| !s.is_empty()).map(PathBuf::from))
        .unwrap_or_default();
    let health_port = values("health", "port")
        .iter()
        .find_map(|v| v.as_integer().and_then(|p| u16::try_from(p).ok()).filter(|p| *p != 0))
        .unwrap_or_default();
    let secret = |var: &str| {
        env.var(var)
            .filter(|v| !v.trim().is_empty())
            .map(|v| Secret(v.trim().to_owned()))
    };
    Location {
        workspace,
        health_port,
        control_token: secret("MACHINE_CONTROL_TOKEN"),
        read_token: secret("MACHINE_READ_TOKEN"),
    }
}

/// The environment the configuration is read through: the process's, with `WORKER_CONNECTORS`
/// taken from `<workspace>/worker_connectors` when that file exists.
pub(super) struct WithConnectorsFile<'a> {
    base: &'a dyn Env,
    connectors: Option<String>,
    /// The connectors file, when it exists.
    path: PathBuf,
}

impl<'a> WithConnectorsFile<'a> {
    /// `base`, with the connectors file of `workspace` when there is one (its lines trimmed and
    /// joined by commas; what follows a `#` is a comment, blank lines are skipped).
    pub(super) fn new(base: &'a dyn Env, workspace: &Path) -> WithConnectorsFile<'a> {
        let path = workspace.join(CONNECTORS_FILE);
        let connectors = std::fs::read_to_string(&path).ok().map(|text| {
            text.lines()
                .map(|l| l.split('#').next().unwrap_or_default().trim())
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        });
        WithConnectorsFile { base, connectors, path }
    }

    /// `error` with the problems of `WORKER_CONNECTORS` blamed on the connectors file when
    /// that is where the value came from: the operator must edit the file, not the variable.
    pub(super) fn blame(&self, error: ConfigError) -> ConfigError {
        if self.connectors.is_none() {
            return error;
        }
        let file = self.path.display().to_string();
        match error {
            ConfigError::Invalid(problems) => ConfigError::Invalid(
                problems
                    .into_iter()
                    .map(|p| {
                        if p.key == "WORKER_CONNECTORS" {
                            Problem {
                                key: file.clone(),
                                message: p.message.replace("WORKER_CONNECTORS", &file),
                            }
                        } else {
                            p
                        }
                    })
                    .collect(),
            ),
            other => other,
        }
    }
}

impl Env for WithConnectorsFile<'_> {
    fn var(&self, key: &str) -> Option<String> {
        match (key, &self.connectors) {
            ("WORKER_CONNECTORS", Some(c)) => Some(c.clone()),
            _ => self.base.var(key),
        }
    }

    fn names(&self) -> Vec<String> {
        self.base.names()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn a_configuration_that_does_not_validate_still_says_where_the_machine_is() {
        let file = "[machine]\nworkspace = \"/ws\"\n[health]\nport = 9100\n[services.bad]\nnope = 1\n";
        let at = locate_str(Some(file), &env(&[("MACHINE_CONTROL_TOKEN", " t ")]));
        assert_eq!(at.workspace, PathBuf::from("/ws"));
        assert_eq!(at.health_port, 9100);
        assert_eq!(at.control_token.as_ref().map(Secret::expose), Some("t"));
        assert!(at.read_token.is_none());
        let at = locate_str(
            Some("not toml ["),
            &env(&[("MACHINE_WORKSPACE", "/env"), ("MACHINE_HEALTH_PORT", "x")]),
        );
        assert_eq!(at.workspace, PathBuf::from("/env"));
        assert_eq!(at.health_port, 9092);
    }

    #[test]
    fn the_workspace_file_overrides_worker_connectors() {
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().display().to_string();
        let env = env(&[
            ("MACHINE_WORKSPACE", ws.as_str()),
            ("WORKER_CONNECTORS", "simulation:1"),
        ]);
        let load = || crate::config::load(None, &env);
        assert_eq!(load().unwrap().plan.connectors.to_string(), "simulation:1");
        std::fs::write(dir.path().join(CONNECTORS_FILE), "# reloaded\nsimulation:3\n").unwrap();
        assert_eq!(load().unwrap().plan.connectors.to_string(), "simulation:3");
        std::fs::write(dir.path().join(CONNECTORS_FILE), "nope:1\n").unwrap();
        let problems = load().unwrap_err();
        let file = dir.path().join(CONNECTORS_FILE).display().to_string();
        assert!(
            problems.problems().iter().any(|p| p.key == file),
            "blamed on the file: {problems:?}"
        );
        assert!(
            !problems.to_string().contains("WORKER_CONNECTORS"),
            "not on the variable: {problems}"
        );
        // A comment may follow the value on its line.
        std::fs::write(dir.path().join(CONNECTORS_FILE), "simulation:2  # two for the launch\n").unwrap();
        assert_eq!(load().unwrap().plan.connectors.to_string(), "simulation:2");
    }
}

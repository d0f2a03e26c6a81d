//! The environment a service starts with. A service is third-party code (ComfyUI and its custom
//! nodes, A1111, whatever `[services.*]` names), so it does not inherit the machine's
//! environment, which holds the broker's password, the control token and the API keys. It gets
//! a small allow-list of the machine's variables that programs need to run at all (locale, home,
//! path, CUDA and NVIDIA runtime settings), the variables its configuration names in `pass_env`,
//! and its own `env` (the plan's or the user's), in that order of precedence.
//!
//! Installers' commands (git, pip, npm, a custom node's install script) are third-party code
//! too: they get the same allow-list plus their tools' own settings and the network's (proxies,
//! CA bundles), never the machine's secrets. A custom node's `.env` is written by the machine
//! from the variables the node names, so the node's code still gets those.

use std::collections::BTreeMap;
use std::ffi::{OsStr, OsString};

use crate::config::ServiceSpec;

/// Variables passed through by name.
const ALLOWED: &[&str] = &[
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LANGUAGE",
    "TZ",
    "TERM",
    "TMPDIR",
    "HOSTNAME",
    "LD_LIBRARY_PATH",
];

/// Variables passed through by prefix: the locale, and the CUDA and NVIDIA container runtime
/// settings a GPU program reads.
const ALLOWED_PREFIXES: &[&str] = &["LC_", "CUDA_", "NVIDIA_"];

/// Whether the machine's variable `key` reaches every service.
pub(crate) fn allowed(key: &str) -> bool {
    ALLOWED.contains(&key) || ALLOWED_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// Variables installers' tools also read: proxies and CA bundles (downloads go through them).
const INSTALLER_ALLOWED: &[&str] = &[
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE",
    "CURL_CA_BUNDLE",
    "NODE_EXTRA_CA_CERTS",
];

/// Installers' tools' own settings, by prefix: git (e.g. `GIT_CONFIG_*`), pip (an index
/// mirror), npm.
const INSTALLER_PREFIXES: &[&str] = &["GIT_", "PIP_", "NPM_CONFIG_", "npm_config_"];

/// The machine's variables an installer's command gets (before the installer's own).
pub(crate) fn installer_env(
    parent: impl IntoIterator<Item = (OsString, OsString)>,
) -> impl Iterator<Item = (OsString, OsString)> {
    parent.into_iter().filter(|(k, _)| {
        k.to_str().is_some_and(|k| {
            allowed(k) || INSTALLER_ALLOWED.contains(&k) || INSTALLER_PREFIXES.iter().any(|p| k.starts_with(p))
        })
    })
}

/// The complete environment of `spec`'s process, built from the machine's `parent` environment.
pub(crate) fn service_env(
    spec: &ServiceSpec,
    parent: impl IntoIterator<Item = (OsString, OsString)>,
) -> BTreeMap<OsString, OsString> {
    let named = |k: &OsStr| {
        k.to_str()
            .is_some_and(|k| allowed(k) || spec.pass_env.iter().any(|p| p == k))
    };
    let mut env: BTreeMap<OsString, OsString> = parent.into_iter().filter(|(k, _)| named(k)).collect();
    env.extend(spec.env.iter().map(|(k, v)| (OsString::from(k), OsString::from(v))));
    env
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(pass_env: &[&str], env: &[(&str, &str)]) -> ServiceSpec {
        let mut s = ServiceSpec::for_tests("svc", &["/bin/true"]);
        s.pass_env = pass_env.iter().map(|s| (*s).to_owned()).collect();
        s.env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        s
    }

    fn parent() -> Vec<(OsString, OsString)> {
        [
            ("PATH", "/usr/bin"),
            ("LC_ALL", "C.UTF-8"),
            ("CUDA_VISIBLE_DEVICES", "0,1"),
            ("NVIDIA_DRIVER_CAPABILITIES", "all"),
            ("HUB_REDIS_URL", "redis://:pw@hub:6379"),
            ("MACHINE_CONTROL_TOKEN", "tok"),
            ("OPENAI_API_KEY", "sk-1"),
            ("AWS_SECRET_ACCESS_KEY", "aws"),
            ("HF_TOKEN", "hf"),
        ]
        .into_iter()
        .map(|(k, v)| (k.into(), v.into()))
        .collect()
    }

    #[test]
    fn secrets_stay_unless_named_and_own_env_wins() {
        let env = service_env(&spec(&["HF_TOKEN"], &[("CUDA_VISIBLE_DEVICES", "1")]), parent());
        let keys: Vec<&str> = env.keys().map(|k| k.to_str().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "CUDA_VISIBLE_DEVICES",
                "HF_TOKEN",
                "LC_ALL",
                "NVIDIA_DRIVER_CAPABILITIES",
                "PATH"
            ]
        );
        assert_eq!(env[OsStr::new("CUDA_VISIBLE_DEVICES")], "1");
        let none = service_env(&spec(&[], &[]), parent());
        assert!(!none.contains_key(OsStr::new("HF_TOKEN")));
        assert!(!none.contains_key(OsStr::new("HUB_REDIS_URL")));
    }

    #[test]
    fn installers_get_their_tools_settings_and_no_secrets() {
        let mut p = parent();
        p.push(("GIT_CONFIG_COUNT".into(), "1".into()));
        p.push(("PIP_INDEX_URL".into(), "https://mirror/simple".into()));
        p.push(("HTTPS_PROXY".into(), "http://proxy:3128".into()));
        let env: BTreeMap<OsString, OsString> = installer_env(p).collect();
        let keys: Vec<&str> = env.keys().map(|k| k.to_str().unwrap()).collect();
        assert_eq!(
            keys,
            [
                "CUDA_VISIBLE_DEVICES",
                "GIT_CONFIG_COUNT",
                "HTTPS_PROXY",
                "LC_ALL",
                "NVIDIA_DRIVER_CAPABILITIES",
                "PATH",
                "PIP_INDEX_URL"
            ]
        );
    }
}

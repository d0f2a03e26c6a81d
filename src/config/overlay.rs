//! The environment over the file: each variable that stands for a TOML key is written into the
//! merged document at that key before it is deserialized, so a bad value is found by the same
//! typed pass as a bad value in the file, and [`Origins`] remembers which variable set which key
//! so the problem names the variable. The few variables that have no key (the tokens and
//! `CUDA_VISIBLE_DEVICES`) are read into [`EnvOnly`].

use super::Problem;
use super::credentials::Credentials;
use super::env::Env;
use super::error::{Origins, closest};
use super::model::{DeviceSelector, Secret, VisibleDevices};

/// How a variable's text becomes a TOML value. Text that does not read as the kind is written
/// as a string, so deserializing names the type the key wants.
#[derive(Debug, Clone, Copy)]
enum Kind {
    /// Trimmed text.
    Text,
    /// A path, kept as written.
    Path,
    /// A whole number.
    Integer,
    /// A number.
    Float,
    /// `true`/`false`, also `1`/`0`, `yes`/`no`, `on`/`off`.
    Bool,
    /// A number of seconds or a humantime duration (`5m`).
    Duration,
    /// Comma- or space-separated words; `none` stands for no word.
    List,
}

/// Each variable that stands for a TOML key, the key's path, and how its text is read.
const BINDINGS: &[(&str, &str, Kind)] = &[
    ("MACHINE_ID", "machine.id", Kind::Text),
    ("MACHINE_WORKSPACE", "machine.workspace", Kind::Path),
    ("HUB_REDIS_URL", "redis.url", Kind::Text),
    ("HUB_REDIS_SENTINELS", "redis.sentinels", Kind::List),
    ("HUB_REDIS_SENTINEL_MASTER", "redis.sentinel_master", Kind::Text),
    ("MACHINE_HEALTH_PORT", "health.port", Kind::Integer),
    ("MACHINE_GPU_COUNT", "gpu.count", Kind::Integer),
    ("MACHINE_GPU_MEMORY_GB", "gpu.memory_gb", Kind::Float),
    ("MACHINE_GPU_MODEL", "gpu.model", Kind::Text),
    ("MACHINE_GPU_ON_FAULT", "gpu.on_fault", Kind::Text),
    ("SERVICE_INSTALL_TIMEOUT", "install.timeout", Kind::Duration),
    ("INSTALL_CONCURRENCY", "install.concurrency", Kind::Integer),
    ("INSTALL_STRICT", "install.strict", Kind::Bool),
    ("COMFYUI_REPO_URL", "install.comfyui.repo_url", Kind::Text),
    ("COMFYUI_REF", "install.comfyui.ref", Kind::Text),
    ("COMFYUI_PYTHON", "install.comfyui.python", Kind::Text),
    ("COMFYUI_TORCH_INDEX_URL", "install.comfyui.torch_index_url", Kind::Text),
    ("COMFYUI_NODES_FILE", "install.comfyui.nodes", Kind::Path),
    ("COMFYUI_MODELS_MANIFEST", "install.comfyui.models", Kind::Path),
    ("COMFYUI_MODELS_DIR", "install.comfyui.models_dir", Kind::Path),
    ("COMFYUI_EXTRA_PACKAGES", "install.comfyui.extra_packages", Kind::List),
    ("COMFYUI_CONSTRAINTS", "install.comfyui.constraints", Kind::Path),
    ("PLAYWRIGHT_CHROMIUM_PATH", "install.playwright.chromium", Kind::Path),
    ("LOG_FORMAT", "log.format", Kind::Text),
    ("RUST_LOG", "log.filter", Kind::Text),
    ("COMFYUI_BASE_PORT", "connectors.comfyui.base_port", Kind::Integer),
    ("COMFYUI_MODELS_CATALOGUE", "models.catalogue", Kind::Path),
];

/// Every environment variable the configuration reads, with the TOML key it sets or what it
/// is, in a stable order: what `machine run --help` lists. `MACHINE_CONFIG` (the file itself)
/// is the command line's.
pub fn variables() -> Vec<(&'static str, &'static str)> {
    let mut vars: Vec<(&'static str, &'static str)> = BINDINGS.iter().map(|&(var, key, _)| (var, key)).collect();
    vars.extend([
        ("WORKER_CONNECTORS", CONNECTORS_KEY),
        ("WORKERS", "alias of WORKER_CONNECTORS"),
        ("MACHINE_CONTROL_TOKEN", "bearer token of the control routes over TCP"),
        ("MACHINE_READ_TOKEN", "bearer token of the guarded read routes over TCP"),
        ("CUDA_VISIBLE_DEVICES", "the GPUs the machine may use"),
    ]);
    vars
}

/// The key `WORKER_CONNECTORS` (or its alias `WORKERS`) sets.
const CONNECTORS_KEY: &str = "machine.worker_connectors";

/// Writes every set variable into `doc` at its key and returns which variable set which key.
/// A variable that is set but blank counts as unset. The only problem found here is
/// `WORKER_CONNECTORS` and `WORKERS` disagreeing; every other is left to deserialization.
pub(super) fn apply(doc: &mut toml::Table, env: &dyn Env, problems: &mut Vec<Problem>) -> Origins {
    let mut origins = Origins::default();
    for &(var, path, kind) in BINDINGS {
        if let Some(text) = env.var(var).filter(|v| !v.trim().is_empty()) {
            if insert(doc, path, value(&text, kind)) {
                origins.set(path, var);
            }
        }
    }
    // An empty WORKER_CONNECTORS is meaningful (the default list), so it is not "unset".
    let connectors = match (env.var("WORKER_CONNECTORS"), env.var("WORKERS")) {
        (Some(a), Some(b)) if a.trim() != b.trim() => {
            problems.push(Problem {
                key: "WORKER_CONNECTORS".to_owned(),
                message: format!("is `{a}` but its alias WORKERS is `{b}`; set only one"),
            });
            None
        }
        (Some(a), _) => Some(("WORKER_CONNECTORS", a)),
        (None, Some(b)) => Some(("WORKERS", b)),
        (None, None) => None,
    };
    if let Some((var, text)) = connectors {
        if insert(doc, CONNECTORS_KEY, toml::Value::String(text)) {
            origins.set(CONNECTORS_KEY, var);
        }
    }
    origins
}

/// The TOML value for a variable's text.
fn value(text: &str, kind: Kind) -> toml::Value {
    let trimmed = text.trim();
    let fallback = || toml::Value::String(trimmed.to_owned());
    match kind {
        Kind::Text => fallback(),
        Kind::Path => toml::Value::String(text.to_owned()),
        Kind::Integer => trimmed.parse::<i64>().map_or_else(|_| fallback(), toml::Value::Integer),
        Kind::Float => trimmed.parse::<f64>().map_or_else(|_| fallback(), toml::Value::Float),
        Kind::Bool => match trimmed.to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => toml::Value::Boolean(true),
            "0" | "false" | "no" | "off" => toml::Value::Boolean(false),
            _ => fallback(),
        },
        // The file takes durations only as humantime text; a bare number of seconds, which the
        // variable has always accepted, is spelled as one.
        Kind::Duration => match trimmed.parse::<u64>() {
            Ok(secs) => toml::Value::String(format!("{secs}s")),
            Err(_) => fallback(),
        },
        Kind::List => toml::Value::Array(
            text.split([',', ' ', '\n'])
                .map(str::trim)
                .filter(|p| !p.is_empty() && *p != "none")
                .map(|p| toml::Value::String(p.to_owned()))
                .collect(),
        ),
    }
}

/// Sets `path` (dotted) in `doc`, making the tables on the way. Returns false, writing nothing,
/// when the file put a value where one of those tables belongs: deserializing then reports the
/// file's key, which is what has to be fixed first.
fn insert(doc: &mut toml::Table, path: &str, value: toml::Value) -> bool {
    let mut segments: Vec<&str> = path.split('.').collect();
    let last = segments.pop().expect("a binding's path is not empty");
    let mut table = doc;
    for segment in segments {
        let entry = table
            .entry(segment)
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(inner) = entry.as_table_mut() else {
            return false;
        };
        table = inner;
    }
    table.insert(last.to_owned(), value);
    true
}

/// What only the environment sets: values no TOML key stands for.
#[derive(Debug)]
pub(super) struct EnvOnly {
    /// `MACHINE_CONTROL_TOKEN`.
    pub control_token: Option<Secret>,
    /// `MACHINE_READ_TOKEN`.
    pub read_token: Option<Secret>,
    /// `CUDA_VISIBLE_DEVICES`.
    pub visible_devices: VisibleDevices,
}

impl EnvOnly {
    pub(super) fn read(env: &dyn Env, credentials: &Credentials, problems: &mut Vec<Problem>) -> EnvOnly {
        // The tokens may come from `<NAME>_FILE`: the credentials read both.
        let secret = |var: &str| {
            credentials
                .get(var)
                .filter(|v| !v.trim().is_empty())
                .map(|v| Secret(v.trim().to_owned()))
        };
        let visible_devices = match env.var("CUDA_VISIBLE_DEVICES").map(|v| parse_visible_devices(&v)) {
            None => VisibleDevices::All,
            Some(Ok(devices)) => devices,
            Some(Err(message)) => {
                problems.push(Problem {
                    key: "CUDA_VISIBLE_DEVICES".to_owned(),
                    message,
                });
                VisibleDevices::All
            }
        };
        EnvOnly {
            control_token: secret("MACHINE_CONTROL_TOKEN"),
            read_token: secret("MACHINE_READ_TOKEN"),
            visible_devices,
        }
    }
}

/// Parses `CUDA_VISIBLE_DEVICES`: comma-separated indices or `GPU-`/`MIG-` UUIDs; empty or a
/// negative index hides every GPU, as CUDA does.
pub(super) fn parse_visible_devices(v: &str) -> Result<VisibleDevices, String> {
    let v = v.trim();
    if v.is_empty() || v == "NoDevFiles" {
        return Ok(VisibleDevices::None);
    }
    let mut list = Vec::new();
    for entry in v.split(',').map(str::trim) {
        if entry.starts_with('-') && entry[1..].parse::<u32>().is_ok() {
            // CUDA stops at the first negative index; what came before it stays visible.
            break;
        }
        if let Ok(i) = entry.parse::<u32>() {
            list.push(DeviceSelector::Index(i));
        } else if entry.starts_with("GPU-") || entry.starts_with("MIG-") {
            list.push(DeviceSelector::Uuid(entry.to_owned()));
        } else {
            return Err(format!("entry `{entry}` is neither a GPU index nor a GPU-/MIG- UUID"));
        }
    }
    if list.is_empty() {
        return Ok(VisibleDevices::None);
    }
    Ok(VisibleDevices::List(list))
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

/// Every variable the machine reads: the overlay's table ([`variables`], the
/// one list `machine run --help` prints too) and [`READ_ELSEWHERE`].
fn known() -> Vec<&'static str> {
    let mut known: Vec<&'static str> = variables().into_iter().map(|(var, _)| var).collect();
    known.extend(READ_ELSEWHERE);
    known
}

/// The prefixes the machine owns: a variable with one of them that it does not read is most
/// likely a typo of one it does.
const PREFIXES: &[&str] = &["MACHINE_", "WORKER_", "COMFYUI_", "HUB_"];

/// A warning for each variable of the machine's prefixes that it does not read, naming the
/// closest one it does when one is close enough to be what was meant.
pub(crate) fn unknown_variables(env: &dyn Env) -> Vec<(String, String)> {
    let known = known();
    let mut names = env.names();
    names.sort();
    names
        .into_iter()
        .filter(|n| PREFIXES.iter().any(|p| n.starts_with(p)) && !known.contains(&n.as_str()))
        .map(|n| {
            let message = match closest(&n, known.iter().copied()) {
                Some(k) => format!("is not a variable the machine reads; did you mean `{k}`?"),
                None => "is not a variable the machine reads".to_owned(),
            };
            (n, message)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    #[test]
    fn variables_become_typed_values_at_their_keys() {
        let env = BTreeMap::from([
            ("MACHINE_HEALTH_PORT", " 9999 "),
            ("SERVICE_INSTALL_TIMEOUT", "300"),
            ("INSTALL_STRICT", "Yes"),
            ("COMFYUI_EXTRA_PACKAGES", "a, b none"),
            ("MACHINE_GPU_COUNT", "two"),
            ("MACHINE_ID", "   "),
            ("WORKERS", "openai"),
        ]);
        let mut doc = toml::Table::new();
        let mut problems = Vec::new();
        let origins = apply(&mut doc, &env, &mut problems);
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!(doc["health"]["port"], toml::Value::Integer(9999));
        assert_eq!(doc["install"]["timeout"].as_str(), Some("300s"));
        assert_eq!(doc["install"]["strict"], toml::Value::Boolean(true));
        assert_eq!(
            doc["install"]["comfyui"]["extra_packages"],
            toml::Value::from(vec!["a", "b"])
        );
        assert_eq!(doc["gpu"]["count"].as_str(), Some("two"), "left for serde to refuse");
        assert!(doc["machine"].get("id").is_none(), "a blank variable is unset");
        assert_eq!(doc["machine"]["worker_connectors"].as_str(), Some("openai"));
        assert_eq!(origins.var("health.port"), Some("MACHINE_HEALTH_PORT"));
        assert_eq!(origins.var(CONNECTORS_KEY), Some("WORKERS"));
        assert_eq!(origins.var("machine.id"), None);
    }

    #[test]
    fn a_variable_does_not_replace_a_value_the_file_put_where_its_section_belongs() {
        let mut doc: toml::Table = "gpu = 5\n".parse().unwrap();
        let env = BTreeMap::from([("MACHINE_GPU_COUNT", "2")]);
        let origins = apply(&mut doc, &env, &mut Vec::new());
        assert_eq!(doc["gpu"], toml::Value::Integer(5));
        assert_eq!(origins.var("gpu.count"), None);
        let ps = crate::config::load_str(Some(("f.toml", "gpu = 5\n")), &env).unwrap_err();
        assert_eq!(ps.problems()[0].key, "gpu", "{ps}");
    }

    #[test]
    fn cuda_visible_devices_follows_cuda() {
        assert_eq!(parse_visible_devices("").unwrap(), VisibleDevices::None);
        assert_eq!(parse_visible_devices("-1").unwrap(), VisibleDevices::None);
        assert_eq!(
            parse_visible_devices("1, 0,-1,2").unwrap(),
            VisibleDevices::List(vec![DeviceSelector::Index(1), DeviceSelector::Index(0)])
        );
        assert_eq!(
            parse_visible_devices("GPU-abc").unwrap(),
            VisibleDevices::List(vec![DeviceSelector::Uuid("GPU-abc".into())])
        );
        assert!(parse_visible_devices("zero").is_err());
    }
}

//! Loading: the embedded default TOML, the user's file merged over it, the environment written
//! over both (`super::overlay`), then one typed pass with `serde_path_to_error` that names the
//! key of each bad value and `serde_ignored` that names each unknown key, and validation (`super::validate`). Nothing here has a side effect
//! beyond reading the file.

use std::path::Path;

use super::credentials::{CATALOGUE_TOKEN, Credentials};
use super::env::Env;
use super::error::{ConfigError, Problem, Problems, closest};
use super::locate::{WithConnectorsFile, locate_str};
use super::model::Config;
use super::overlay::{self, EnvOnly};
use super::raw::{DEFAULT_TOML, RawConfig, merge};
use super::validate;

/// The most problems one document reports; past it the document is not worth reading further.
const MAX_FILE_PROBLEMS: usize = 50;

/// The one loader of the configuration: reads `file` (if any) over the embedded defaults,
/// overlays `env` with `WORKER_CONNECTORS` taken from `<workspace>/worker_connectors` when that
/// file exists (the workspace as [`locate`](super::locate) reads it), and validates.
pub fn load(file: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
    let user = read(file)?;
    let user = user.as_ref().map(|(p, s)| (p.as_str(), s.as_str()));
    let workspace = locate_str(user.map(|(_, text)| text), env).workspace;
    let env = WithConnectorsFile::new(env, &workspace);
    load_str(user, &env).map_err(|e| env.blame(e))
}

/// [`load`] for a running machine, whose workspace is the one it runs on (a reload).
pub fn load_in(file: Option<&Path>, env: &dyn Env, workspace: &Path) -> Result<Config, ConfigError> {
    let user = read(file)?;
    let env = WithConnectorsFile::new(env, workspace);
    load_str(user.as_ref().map(|(p, s)| (p.as_str(), s.as_str())), &env).map_err(|e| env.blame(e))
}

/// The configuration file's name and text.
fn read(file: Option<&Path>) -> Result<Option<(String, String)>, ConfigError> {
    let Some(path) = file else { return Ok(None) };
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    Ok(Some((path.display().to_string(), text)))
}

/// What is not wrong enough to refuse the configuration: `MACHINE_*`, `WORKER_*`, `COMFYUI_*`
/// and `HUB_*` variables the machine does not read, each naming the closest one it does. Also
/// in [`Config::warnings`]; this is for callers that have no `Config` because it was invalid.
pub fn warnings(env: &dyn Env) -> Vec<Problem> {
    overlay::unknown_variables(env)
        .into_iter()
        .map(|(key, message)| Problem { key, message })
        .collect()
}

/// Like [`load`] with the file's name and contents already in hand, and without the workspace's
/// connectors file: what tests load.
pub fn load_str(file: Option<(&str, &str)>, env: &dyn Env) -> Result<Config, ConfigError> {
    let defaults: toml::Table = DEFAULT_TOML
        .parse()
        .expect("the embedded default configuration is valid TOML (a unit test checks it)");
    let mut doc = defaults.clone();
    let mut early = Vec::new();
    let mut file_readable = true;
    if let Some((name, text)) = file {
        match text.parse::<toml::Table>() {
            Ok(user) => merge(&mut doc, user),
            Err(e) => {
                early.push(Problem {
                    key: name.to_owned(),
                    message: format!("not valid TOML: {}", e.to_string().trim_end()),
                });
                file_readable = false;
            }
        }
    }
    let origins = overlay::apply(&mut doc, env, &mut early);
    let mut problems = Problems::new(origins);
    for p in early {
        problems.other(&p.key, p.message);
    }
    // The environment is read even when the file is broken, so one run shows both.
    let raw = deserialize(doc, &defaults, &mut problems);
    let credentials = {
        let c = raw.as_ref().map(|r| &r.connectors);
        let api_keys = c.map_or([""; 3], |c| {
            [
                c.openai.api_key_env.trim(),
                c.replicate.api_key_env.trim(),
                c.runpod.api_key_env.trim(),
            ]
        });
        let mut named = vec!["MACHINE_CONTROL_TOKEN", "MACHINE_READ_TOKEN", CATALOGUE_TOKEN];
        named.extend(api_keys);
        Credentials::read(env, &named, problems.list_mut())
    };
    let env_only = EnvOnly::read(env, &credentials, problems.list_mut());
    let Some(raw) = raw.filter(|_| file_readable) else {
        return Err(ConfigError::Invalid(problems.into_vec()));
    };
    let mut config = validate::validate(raw, env_only, env, credentials, &mut problems);
    config.warnings = warnings(env);
    let problems = problems.into_vec();
    if problems.is_empty() {
        Ok(config)
    } else {
        Err(ConfigError::Invalid(problems))
    }
}

/// The typed document, and a problem for each bad key. An unknown key is found by
/// `serde_ignored` (the sections do not deny unknown fields: each one ignored is reported at
/// its exact key path, and reading goes on). A bad value stops deserialization; to list them
/// all, each one found is set right (the default put back, or the key removed) and the document
/// is read again. The result is `None` when a problem could not be set right; otherwise it holds
/// the default in place of each bad value, so that validation can go on to find the problems
/// beyond these.
fn deserialize(mut doc: toml::Table, defaults: &toml::Table, problems: &mut Problems) -> Option<RawConfig> {
    // Each reading sees the unknown keys before its bad value again: each is reported once.
    let mut unknown: Vec<Vec<String>> = Vec::new();
    let mut found = 0;
    loop {
        let mut ignored = Vec::new();
        let mut note = |path: serde_ignored::Path<'_>| ignored.push(segments_of(&path));
        let value = serde_ignored::Deserializer::new(toml::Value::Table(doc.clone()), &mut note);
        let result = serde_path_to_error::deserialize::<_, RawConfig>(value);
        for path in ignored {
            if !unknown.contains(&path) {
                problems.at(&path.join("."), unknown_key(&path, defaults));
                unknown.push(path);
            }
        }
        let e = match result {
            Ok(raw) => return Some(raw),
            Err(e) => e,
        };
        let segments: Vec<String> = e
            .path()
            .iter()
            .map(|s| match s {
                serde_path_to_error::Segment::Map { key } => key.clone(),
                other => other.to_string(),
            })
            .collect();
        // toml repeats the path on a line of its own; the problem's key already says it.
        let message = e
            .inner()
            .to_string()
            .lines()
            .next()
            .unwrap_or_default()
            .trim_end()
            .to_owned();
        let repaired = repair(&mut doc, defaults, &segments);
        problems.at(&e.path().to_string(), message);
        found += 1;
        if !repaired || found >= MAX_FILE_PROBLEMS {
            return None;
        }
    }
}

/// The key path `serde_ignored` reports, one segment per table key (or array index).
fn segments_of(path: &serde_ignored::Path<'_>) -> Vec<String> {
    use serde_ignored::Path;
    let mut segments = match path {
        Path::Root => return Vec::new(),
        Path::Seq { parent, .. }
        | Path::Map { parent, .. }
        | Path::Some { parent }
        | Path::NewtypeStruct { parent }
        | Path::NewtypeVariant { parent } => segments_of(parent),
    };
    match path {
        Path::Seq { index, .. } => segments.push(index.to_string()),
        Path::Map { key, .. } => segments.push(key.clone()),
        _ => {}
    }
    segments
}

/// What an unknown key is told: its name, and the closest key its section knows (from the
/// defaults, which set every key of the sections they have) when one is close enough to be a
/// typo of it.
fn unknown_key(path: &[String], defaults: &toml::Table) -> String {
    let Some((name, parents)) = path.split_last() else {
        return "unknown key".to_owned();
    };
    let mut section = Some(defaults);
    for k in parents {
        section = section.and_then(|t| t.get(k)).and_then(toml::Value::as_table);
    }
    match closest(name, section.into_iter().flat_map(|t| t.keys().map(String::as_str))) {
        Some(k) => format!("unknown key `{name}`; did you mean `{k}`?"),
        None => format!("unknown key `{name}`"),
    }
}

/// Sets right the bad value at `path`: it gets the default's value back, or is removed when the
/// defaults have none. Returns whether anything changed (if not, reading again would fail the
/// same way).
fn repair(doc: &mut toml::Table, defaults: &toml::Table, path: &[String]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let default = lookup(defaults, path).cloned();
    let Some(table) = table_at(doc, parents) else {
        return false;
    };
    match default {
        Some(d) if table.get(last) != Some(&d) => {
            table.insert(last.clone(), d);
            true
        }
        _ => table.remove(last).is_some(),
    }
}

fn table_at<'a>(doc: &'a mut toml::Table, path: &[String]) -> Option<&'a mut toml::Table> {
    let mut t = doc;
    for k in path {
        t = t.get_mut(k)?.as_table_mut()?;
    }
    Some(t)
}

fn lookup<'a>(doc: &'a toml::Table, path: &[String]) -> Option<&'a toml::Value> {
    let (last, parents) = path.split_last()?;
    let mut t = doc;
    for k in parents {
        t = t.get(k)?.as_table()?;
    }
    t.get(last)
}

impl Config {
    /// A configuration from the defaults alone with the given environment, for tests.
    #[cfg(test)]
    pub(crate) fn for_tests(env: &[(&str, &str)]) -> Config {
        let map: std::collections::BTreeMap<String, String> =
            env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        load_str(None, &map).expect("test configuration is valid")
    }
}

#[cfg(test)]
mod tests {
    use crate::config::*;
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::time::Duration;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    fn problems(file: Option<&str>, pairs: &[(&str, &str)]) -> Vec<Problem> {
        load_str(file.map(|f| ("machine.toml", f)), &env(pairs))
            .expect_err("configuration should be invalid")
            .problems()
            .to_vec()
    }

    #[test]
    fn defaults_alone_are_valid() {
        let c = load_str(None, &env(&[("HOSTNAME", "box-7")])).unwrap();
        assert_eq!(c.machine.machine_id, "machine-box-7");
        assert_eq!(c.machine.health_port, 9092);
        assert_eq!(c.machine.workspace, PathBuf::from("/workspace"));
        assert!(c.machine.redis.is_none());
        assert_eq!(c.plan.connectors, ConnectorList::default_list());
        assert_eq!(c.plan.comfyui.base_port, 8188);
        assert_eq!(c.machine.visible_devices, VisibleDevices::All);
        assert_eq!(c.machine.install_timeout, Duration::from_secs(1800));
    }

    #[test]
    fn the_issue_example_parses() {
        let file = r#"
[machine]
id = "m1"
[redis]
url = "redis://127.0.0.1:6379"
[health]
port = 9092
[services.sidecar]
command = ["/usr/bin/env", "sleep", "1000"]
restart = "always"
ready = { tcp = "127.0.0.1:7000" }
"#;
        let c = load_str(Some(("f.toml", file)), &env(&[])).unwrap();
        assert_eq!(c.machine.machine_id, "m1");
        assert_eq!(c.machine.redis.unwrap().expose(), "redis://127.0.0.1:6379");
        let s = &c.plan.services[0];
        assert_eq!(s.name, "sidecar");
        assert_eq!(s.restart, RestartPolicy::Always);
        assert_eq!(
            s.ready.as_ref().unwrap().check,
            ProbeCheck::Tcp("127.0.0.1:7000".into())
        );
        assert_eq!(s.grace, Duration::from_secs(10));
    }

    #[test]
    fn environment_overrides_the_file() {
        let file = "[machine]\nid = \"from-file\"\nworker_connectors = \"comfyui\"\n[health]\nport = 1234\n";
        let c = load_str(
            Some(("f.toml", file)),
            &env(&[
                ("MACHINE_ID", "from-env"),
                ("WORKERS", "openai:2"),
                ("OPENAI_API_KEY", "sk-test"),
                ("MACHINE_HEALTH_PORT", "9999"),
                ("SERVICE_INSTALL_TIMEOUT", "300"),
                ("LOG_FORMAT", "JSON"),
                ("HUB_REDIS_URL", "rediss://user:secret@redis.example:6380/0"),
                ("MACHINE_CONTROL_TOKEN", "tok3n"),
            ]),
        )
        .unwrap();
        assert_eq!(c.machine.machine_id, "from-env");
        assert_eq!(c.plan.connectors.to_string(), "openai:2");
        assert_eq!(c.machine.health_port, 9999);
        assert_eq!(c.machine.install_timeout, Duration::from_secs(300));
        assert_eq!(c.machine.log.format, LogFormat::Json);
        let url = c.machine.redis.unwrap();
        assert_eq!(url.masked(), "rediss://user:***@redis.example:6380/0");
        assert!(!format!("{url:?}").contains("secret"));
        let token = c.machine.control_token.unwrap();
        assert_eq!(token.expose(), "tok3n");
        assert!(!format!("{token:?}").contains("tok3n"));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let ps = problems(
            None,
            &[
                ("WORKER_CONNECTORS", "comfyui:x,bogus"),
                ("MACHINE_HEALTH_PORT", "http"),
                ("HUB_REDIS_URL", "http://nope"),
                ("MACHINE_GPU_COUNT", "two"),
                ("LOG_FORMAT", "xml"),
                ("CUDA_VISIBLE_DEVICES", "0,banana"),
            ],
        );
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                // Typed keys, in the order the document is read (by key).
                "MACHINE_GPU_COUNT",
                "MACHINE_HEALTH_PORT",
                "LOG_FORMAT",
                // What only the environment sets.
                "CUDA_VISIBLE_DEVICES",
                // Then the checks of whole values.
                "HUB_REDIS_URL",
                "WORKER_CONNECTORS",
                "WORKER_CONNECTORS",
            ],
            "{ps:#?}"
        );
    }

    #[test]
    fn sentinels_come_with_a_master_name_in_host_port_form() {
        let c = load_str(
            None,
            &env(&[
                ("HUB_REDIS_SENTINELS", "10.0.0.5:26379, 10.0.0.6:26380"),
                ("HUB_REDIS_SENTINEL_MASTER", "jobs"),
                ("HUB_REDIS_URL", "rediss://:secret@ignored/2"),
            ]),
        )
        .unwrap();
        let url = c.machine.broker_url();
        let target = url.sentinels().expect("sentinels");
        assert_eq!(target.master, "jobs");
        assert_eq!(
            target.nodes,
            [("10.0.0.5".to_owned(), 26379), ("10.0.0.6".to_owned(), 26380)]
        );
        assert!(!url.masked().contains("secret"), "{}", url.masked());
        // Without a URL: no password, database 0 (not local mode).
        let c = load_str(
            None,
            &env(&[("HUB_REDIS_SENTINELS", "s:1"), ("HUB_REDIS_SENTINEL_MASTER", "m")]),
        )
        .unwrap();
        assert!(c.machine.redis.is_some_and(|u| u.sentinels().is_some()));

        let ps = problems(None, &[("HUB_REDIS_SENTINELS", "s:1")]);
        assert!(
            ps.len() == 1 && ps[0].key == "redis.sentinel_master" && ps[0].message.contains("both or neither"),
            "{ps:?}"
        );
        let ps = problems(None, &[("HUB_REDIS_SENTINEL_MASTER", "m")]);
        // The missing key is named (no variable set it).
        assert!(ps.len() == 1 && ps[0].key == "redis.sentinels", "{ps:?}");
        let ps = problems(
            None,
            &[
                ("HUB_REDIS_SENTINELS", "s:1,nope,t:x"),
                ("HUB_REDIS_SENTINEL_MASTER", "m"),
            ],
        );
        assert!(
            ps.len() == 2
                && ps
                    .iter()
                    .all(|p| p.key == "HUB_REDIS_SENTINELS" && p.message.contains("host:port")),
            "{ps:?}"
        );
    }

    #[test]
    fn unknown_keys_and_bad_types_name_the_path() {
        let ps = problems(
            Some("[services.x]\ncommand = [\"a\"]\nrestrat = \"always\"\nrestrt = 1\n"),
            &[],
        );
        assert_eq!(ps.len(), 2, "{ps:?}");
        assert!(ps[0].key.starts_with("services.x"), "{ps:?}");
        assert!(ps[0].message.contains("restrat"), "{ps:?}");
        let ps = problems(Some("[health]\nport = \"high\"\n"), &[("MACHINE_GPU_COUNT", "x")]);
        assert_eq!(
            ps.len(),
            2,
            "file and environment problems are reported together: {ps:?}"
        );
        assert!(ps.iter().any(|p| p.key == "health.port"), "{ps:?}");
        let ps = problems(Some("[machine\n"), &[]);
        assert!(ps[0].message.contains("not valid TOML"));
    }

    #[test]
    fn every_problem_of_the_file_is_listed() {
        let file = r#"
[machine]
workspace = 7
bogus = 1
[health]
port = "high"
[supervisor]
grace = 5
extra = true
[services.x]
command = ["a"]
restrat = "always"
"#;
        let ps = problems(Some(file), &[("MACHINE_GPU_COUNT", "x")]);
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(ps.len(), 7, "{ps:#?}");
        for key in ["machine", "health.port", "supervisor.grace", "MACHINE_GPU_COUNT"] {
            assert!(
                keys.contains(&key) || keys.iter().any(|k| k.starts_with(key)),
                "{key} in {ps:#?}"
            );
        }
        for word in ["bogus", "extra", "restrat"] {
            assert!(
                ps.iter().any(|p| p.message.contains(word) || p.key.contains(word)),
                "{word} in {ps:#?}"
            );
        }
    }

    /// Every section reports a key it does not know at its exact path, sections with a map of
    /// their own (`services.NAME`, a probe, a customer budget) included: a section read through
    /// `serde(flatten)` would drop it silently, and this test would name it.
    #[test]
    fn an_unknown_key_is_named_by_its_exact_path_in_every_section() {
        fn sections(table: &toml::Table, path: &mut Vec<String>, out: &mut Vec<String>) {
            out.push(path.join("."));
            for (key, value) in table {
                if let toml::Value::Table(t) = value {
                    path.push(key.clone());
                    sections(t, path, out);
                    path.pop();
                }
            }
        }
        let defaults: toml::Table = DEFAULT_TOML.parse().unwrap();
        let mut all = Vec::new();
        sections(&defaults, &mut Vec::new(), &mut all);
        // Tables that are maps by design: any key is an alias or a capability.
        all.retain(|s| !["connectors.replicate.aliases", "worker.capabilities"].contains(&s.as_str()));
        all.extend(
            [
                "services.x",
                "services.x.ready",
                "services.x.liveness",
                "connectors.openai.limits.customer",
                "connectors.runpod.limits.customer",
                "worker.quarantine.comfyui",
            ]
            .map(str::to_owned),
        );
        let mut file = toml::Table::new();
        for section in &all {
            let mut t = &mut file;
            for k in section.split('.').filter(|k| !k.is_empty()) {
                t = t
                    .entry(k.to_owned())
                    .or_insert_with(|| toml::Value::Table(toml::Table::new()))
                    .as_table_mut()
                    .unwrap();
            }
            t.insert("zz_unknown".to_owned(), toml::Value::Integer(1));
        }
        file["services"]["x"]
            .as_table_mut()
            .unwrap()
            .insert("command".to_owned(), toml::Value::Array(vec!["a".into()]));
        for probe in ["ready", "liveness"] {
            file["services"]["x"][probe]
                .as_table_mut()
                .unwrap()
                .insert("tcp".to_owned(), "127.0.0.1:1".into());
        }
        let ps = problems(Some(&file.to_string()), &[]);
        let mut keys: Vec<String> = ps.iter().map(|p| p.key.clone()).collect();
        let mut want: Vec<String> = all
            .iter()
            .map(|s| {
                if s.is_empty() {
                    "zz_unknown".to_owned()
                } else {
                    format!("{s}.zz_unknown")
                }
            })
            .collect();
        keys.sort();
        want.sort();
        assert_eq!(keys, want, "{ps:#?}");
        assert!(ps.iter().all(|p| p.message == "unknown key `zz_unknown`"), "{ps:#?}");
    }

    /// Found by their key path, not by the words of serde's message: a key named like the section
    /// it is in, and one with a backtick in its name, are each one problem, and the problems after
    /// them are still listed.
    #[test]
    fn unknown_keys_are_found_by_their_path_not_by_the_message() {
        let file = "[machine]\nmachine = 1\n\"we`ird\" = 2\n[supervisor]\ngrace = 5\n[worker]\nleas = \"1m\"\n";
        let ps = problems(Some(file), &[]);
        let shown: Vec<String> = ps.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "machine.machine: unknown key `machine`",
                "machine.we`ird: unknown key `we`ird`",
                "supervisor.grace: invalid type: integer `5`, expected a duration",
                "worker.leas: unknown key `leas`; did you mean `lease`?",
            ],
            "{ps:#?}"
        );
    }

    #[test]
    fn every_variable_the_machine_reads_is_known() {
        // Each variable of the machine's prefixes that it reads somewhere, set together: none
        // may be warned about as unknown.
        let mut vars: Vec<(&str, &str)> = variables().into_iter().map(|(var, _)| (var, "")).collect();
        vars.extend([
            ("MACHINE_CONFIG", ""),
            ("COMFYUI_MODELS_CATALOGUE_TOKEN", ""),
            ("WORKERS", ""),
        ]);
        let set: Vec<(&str, &str)> = vars
            .iter()
            .filter(|(var, _)| {
                ["MACHINE_", "WORKER_", "COMFYUI_", "HUB_"]
                    .iter()
                    .any(|p| var.starts_with(p))
            })
            .copied()
            .collect();
        let warned = overlay::unknown_variables(&env(&set));
        assert!(warned.is_empty(), "{warned:?}");
    }

    #[test]
    fn unknown_machine_variables_warn_with_the_closest_name() {
        let c = load_str(
            None,
            &env(&[
                ("WORKER_CONNECTOR", "simulation"),
                ("HUB_REDIS_ULR", "x"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        let w: Vec<String> = c.warnings.iter().map(ToString::to_string).collect();
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(
            w[0].starts_with("HUB_REDIS_ULR") && w[0].contains("`HUB_REDIS_URL`"),
            "{w:?}"
        );
        assert!(
            w[1].starts_with("WORKER_CONNECTOR:") && w[1].contains("`WORKER_CONNECTORS`"),
            "{w:?}"
        );
        let ps = problems(
            None,
            &[
                ("WORKER_CONNECTORS", "simulation:100000"),
                ("MACHINE_GPU_COUNT", "1000"),
            ],
        );
        assert_eq!(ps.len(), 2, "{ps:#?}");
    }

    #[test]
    fn service_problems_are_all_listed() {
        let file = r#"
[services.a]
command = []
ready = { tcp = "nohost", http = "http://x" }
[services.b]
command = ["x"]
liveness = { tcp = "localhost:0" }
after = ["b"]
env = { "A=B" = "1" }
"#;
        let ps = problems(Some(file), &[]);
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "services.a.command",
                "services.a.ready",
                "services.b.env",
                "services.b.after",
                "services.b.liveness.tcp"
            ],
            "{ps:#?}"
        );
    }

    #[test]
    fn aliases_must_agree() {
        let ps = problems(None, &[("WORKER_CONNECTORS", "comfyui"), ("WORKERS", "openai")]);
        assert_eq!(ps[0].key, "WORKER_CONNECTORS");
        let c = load_str(
            None,
            &env(&[("WORKER_CONNECTORS", "comfyui"), ("WORKERS", " comfyui ")]),
        )
        .unwrap();
        assert_eq!(c.plan.connectors.to_string(), "comfyui");
    }

    #[test]
    fn external_connectors_need_their_keys() {
        let ps = problems(None, &[("WORKER_CONNECTORS", "comfyui,openai")]);
        assert_eq!(ps.len(), 1, "{ps:?}");
        assert_eq!(ps[0].key, "OPENAI_API_KEY");
        let file = "[connectors.openai]\napi_key_env = \"MY_KEY\"\n";
        let ps = problems(Some(file), &[("WORKER_CONNECTORS", "openai"), ("OPENAI_API_KEY", "x")]);
        assert_eq!(ps[0].key, "MY_KEY");
        assert!(
            load_str(
                Some(("f", file)),
                &env(&[("WORKER_CONNECTORS", "openai"), ("MY_KEY", "x")])
            )
            .is_ok()
        );
    }

    #[test]
    fn install_settings_come_from_file_and_environment() {
        let c = load_str(
            None,
            &env(&[
                ("MACHINE_WORKSPACE", "/ws"),
                ("COMFYUI_REPO_URL", "/srv/comfy.git"),
                ("COMFYUI_REF", "abc123"),
                ("INSTALL_STRICT", "true"),
                ("INSTALL_CONCURRENCY", "2"),
                ("PLAYWRIGHT_CHROMIUM_PATH", "/opt/chrome"),
            ]),
        )
        .unwrap();
        assert_eq!(c.plan.install.comfyui.repo_url, "/srv/comfy.git");
        assert_eq!(c.plan.install.comfyui.git_ref, "abc123");
        assert_eq!(c.plan.install.comfyui.models_dir, PathBuf::from("/ws/models"));
        assert!(c.plan.install.strict);
        assert_eq!(c.plan.install.concurrency, 2);
        assert_eq!(c.plan.install.playwright.chromium, Some(PathBuf::from("/opt/chrome")));
        let ps = problems(None, &[("COMFYUI_REF", "--upload-pack=x"), ("INSTALL_STRICT", "maybe")]);
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["INSTALL_STRICT", "COMFYUI_REF"]);
    }

    #[test]
    fn a_bad_value_in_the_file_is_reported_under_its_key() {
        // Each of these values comes from the file; none of the variables is set. The problems
        // must name the file's keys, not the variables that could have set them.
        let file = r#"
[machine]
workspace = "relative/ws"
[gpu]
count = 1000
[log]
format = "xml"
[install.comfyui]
ref = "--upload-pack=x"
"#;
        let ps = problems(Some(file), &[]);
        let keys: Vec<&str> = ps.iter().map(|p| p.key.as_str()).collect();
        let expected = ["machine.workspace", "gpu.count", "log.format", "install.comfyui.ref"];
        for key in expected {
            assert!(keys.contains(&key), "{key} in {ps:#?}");
        }
        for var in [
            "MACHINE_WORKSPACE",
            "MACHINE_GPU_COUNT",
            "LOG_FORMAT",
            "COMFYUI_REF",
            "COMFYUI_MODELS_DIR",
        ] {
            assert!(!keys.contains(&var), "{var} is not set, yet named: {ps:#?}");
        }
        assert_eq!(ps.len(), expected.len(), "{ps:#?}");
    }

    #[test]
    fn install_timeout_takes_seconds_or_a_duration() {
        for (text, secs) in [("300", 300), (" 5m ", 300), ("1h 30m", 5400)] {
            let c = load_str(None, &env(&[("SERVICE_INSTALL_TIMEOUT", text)])).unwrap();
            assert_eq!(c.machine.install_timeout, Duration::from_secs(secs), "{text}");
        }
        for text in ["soon", "0"] {
            let ps = problems(None, &[("SERVICE_INSTALL_TIMEOUT", text)]);
            assert_eq!(ps.len(), 1, "{ps:#?}");
            assert_eq!(ps[0].key, "SERVICE_INSTALL_TIMEOUT", "{ps:#?}");
            assert!(ps[0].message.contains("`install.timeout`"), "{ps:#?}");
        }
    }

    #[test]
    fn a_bad_variable_names_the_variable_and_the_key_it_sets() {
        let file = "[health]\nport = 1234\n[install]\nconcurrency = 2\n";
        let ps = problems(
            Some(file),
            &[
                ("MACHINE_HEALTH_PORT", "http"),
                ("INSTALL_CONCURRENCY", "0"),
                ("MACHINE_WORKSPACE", "ws"),
            ],
        );
        let shown: Vec<String> = ps.iter().map(ToString::to_string).collect();
        assert_eq!(ps.len(), 3, "{shown:#?}");
        // A value of the wrong type, found by deserializing.
        assert_eq!(ps[0].key, "MACHINE_HEALTH_PORT", "{shown:#?}");
        assert!(
            shown[0].contains("(sets `health.port`)") && shown[0].contains("http"),
            "{shown:#?}"
        );
        // Values of the right type that validation refuses.
        assert_eq!(ps[1].key, "MACHINE_WORKSPACE", "{shown:#?}");
        assert!(shown[1].contains("(sets `machine.workspace`)"), "{shown:#?}");
        assert_eq!(ps[2].key, "INSTALL_CONCURRENCY", "{shown:#?}");
        assert!(shown[2].contains("(sets `install.concurrency`)"), "{shown:#?}");
        // The file's own values are not blamed for what the environment set.
        assert!(!ps.iter().any(|p| p.key.contains('.')), "{shown:#?}");
    }

    #[test]
    fn enums_are_read_directly_and_an_unknown_name_lists_the_allowed_ones() {
        let c = load_str(
            Some(("f.toml", "[worker.customer_access]\nisolation = \" Strict \"\n")),
            &env(&[("LOG_FORMAT", "Json")]),
        )
        .unwrap();
        assert_eq!(c.machine.log.format, LogFormat::Json);
        assert_eq!(c.machine.worker.customer_access.isolation, Isolation::Strict);

        let ps = problems(
            Some("[worker.customer_access]\nisolation = \"sometimes\"\n"),
            &[("LOG_FORMAT", "xml")],
        );
        let shown: Vec<String> = ps.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            [
                "LOG_FORMAT: unknown variant `xml`, expected `text` or `json` (sets `log.format`)",
                "worker.customer_access.isolation: unknown variant `sometimes`, expected `loose` or `strict`",
            ]
        );
        let ps = problems(Some("[log]\nformat = \"yaml\"\n"), &[]);
        assert_eq!(
            ps[0].to_string(),
            "log.format: unknown variant `yaml`, expected `text` or `json`"
        );
    }
}

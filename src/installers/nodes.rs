//! ComfyUI custom nodes from a catalogue (`config/comfyui-nodes.toml` built in, or the file
//! `COMFYUI_NODES_FILE` names).
//!
//! Each node is cloned into `ComfyUI/custom_nodes/<name>` at its ref, optionally with submodules,
//! its `requirements.txt` installed into ComfyUI's venv, its `.env` written from machine
//! environment variables the catalogue names (the catalogue holds names, never values), and an
//! optional install script run. Nodes install concurrently up to the configured limit, except
//! that pip runs one at a time because concurrent pips in one venv corrupt it. One node failing
//! does not stop the others; the caller decides (strict mode) whether failures are fatal.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use tokio::sync::Mutex;

use super::common::{Cmd, Progress, Stamp, bounded, digest, git_checkout};
use super::{Ctx, InstallError};
use crate::config::Env;

/// The built-in catalogue.
pub(crate) const DEFAULT_CATALOGUE: &str = include_str!("../../config/comfyui-nodes.toml");

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Catalogue {
    #[serde(default)]
    node: Vec<NodeSpec>,
}

/// One custom node of the catalogue.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct NodeSpec {
    name: String,
    url: String,
    #[serde(default, rename = "ref")]
    git_ref: Option<String>,
    #[serde(default)]
    submodules: bool,
    #[serde(default = "yes")]
    requirements: bool,
    #[serde(default)]
    install: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

fn yes() -> bool {
    true
}

/// A node ready to install: its spec and the `.env` values read from the environment.
#[derive(Debug, Clone)]
pub(crate) struct Node {
    spec: NodeSpec,
    dotenv: BTreeMap<String, String>,
}

impl Node {
    pub(crate) fn name(&self) -> &str {
        &self.spec.name
    }
}

/// Reads and checks the catalogue (`None`: the built-in one).
pub(crate) fn load(path: Option<&Path>) -> Result<Vec<NodeSpec>, InstallError> {
    let (name, text) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).map_err(|e| InstallError::io("read", p, e))?,
        ),
        None => (
            "the built-in config/comfyui-nodes.toml".to_owned(),
            DEFAULT_CATALOGUE.to_owned(),
        ),
    };
    parse(&name, &text)
}

fn parse(name: &str, text: &str) -> Result<Vec<NodeSpec>, InstallError> {
    let bad = |message: String| InstallError::Manifest {
        file: name.to_owned(),
        message,
    };
    let table: toml::Table = text.parse().map_err(|e: toml::de::Error| bad(e.to_string()))?;
    let cat: Catalogue = serde_path_to_error::deserialize(toml::Value::Table(table))
        .map_err(|e| bad(format!("{}: {}", e.path(), e.inner())))?;
    let mut seen = std::collections::BTreeSet::new();
    for n in &cat.node {
        if !super::safe_name(&n.name) {
            return Err(bad(format!(
                "node name `{}` must be letters, digits, `.`, `_` or `-` (it names a folder)",
                n.name
            )));
        }
        if !seen.insert(n.name.as_str()) {
            return Err(bad(format!("node `{}` is listed twice", n.name)));
        }
        // Leading dashes would be read by git as options.
        if n.url.is_empty() || n.url.starts_with('-') {
            return Err(bad(format!("node `{}`: `{}` is not a git URL", n.name, n.url)));
        }
        if n.git_ref.as_deref().is_some_and(|r| r.is_empty() || r.starts_with('-')) {
            return Err(bad(format!("node `{}`: ref is not a git ref", n.name)));
        }
        if n.install.first().is_some_and(|a| a.is_empty()) {
            return Err(bad(format!("node `{}`: the install command is empty", n.name)));
        }
        if let Some(k) = n.env.keys().find(|k| !super::safe_name(k) || k.contains('.')) {
            return Err(bad(format!("node `{}`: `{k}` is not a .env variable name", n.name)));
        }
    }
    Ok(cat.node)
}

/// Reads each node's `.env` values from the environment. A missing variable fails that node
/// (named in the error), not the others.
pub(crate) fn resolve(specs: Vec<NodeSpec>, env: &dyn Env) -> Vec<Result<Node, (String, InstallError)>> {
    specs
        .into_iter()
        .map(|spec| {
            let mut dotenv = BTreeMap::new();
            for (key, var) in &spec.env {
                match env.var(var) {
                    Some(v) => {
                        dotenv.insert(key.clone(), v);
                    }
                    None => {
                        return Err((
                            spec.name.clone(),
                            InstallError::MissingEnv {
                                var: var.clone(),
                                node: spec.name.clone(),
                            },
                        ));
                    }
                }
            }
            Ok(Node { spec, dotenv })
        })
        .collect()
}

fn node_stamp(ctx: &Ctx, comfyui_digest: &str, node: &Node) -> Stamp {
    let s = &node.spec;
    let mut parts = vec![
        comfyui_digest.to_owned(),
        s.url.clone(),
        s.git_ref.clone().unwrap_or_default(),
        s.submodules.to_string(),
        s.requirements.to_string(),
        s.install.join("\u{1f}"),
    ];
    // The values are hashed with the rest, so a rotated secret rewrites the .env; the stamp
    // file holds only the digest.
    for (k, v) in &node.dotenv {
        parts.push(format!("{k}={v}"));
    }
    Stamp::new(&ctx.stamps, &format!("node-{}", s.name), digest(&parts))
}

/// Installs every node not already current; returns the names of the nodes that failed with
/// their errors, and how many were installed.
pub(crate) async fn install(
    ctx: &Ctx,
    comfyui_digest: &str,
    nodes: Vec<Result<Node, (String, InstallError)>>,
    progress: &Progress,
) -> (usize, Vec<(String, InstallError)>) {
    let total = nodes.len() as u64;
    let mut failed = Vec::new();
    let mut todo = Vec::new();
    for n in nodes {
        match n {
            Ok(n) => todo.push(n),
            Err(e) => failed.push(e),
        }
    }
    let pip_lock = Mutex::new(());
    let finished = std::sync::atomic::AtomicU64::new(failed.len() as u64);
    let results = bounded(todo, ctx.concurrency, |node| {
        let pip_lock = &pip_lock;
        let finished = &finished;
        async move {
            let stamp = node_stamp(ctx, comfyui_digest, &node);
            let dir = node_dir(&ctx.workspace, node.name());
            let r = if stamp.is_current() && dir.is_dir() {
                Ok(false)
            } else {
                stamp.clear();
                match install_one(ctx, &node, &dir, pip_lock).await {
                    Ok(()) => stamp.write().map(|()| true),
                    Err(e) => Err(e),
                }
            };
            let n = finished.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress.items("custom nodes", n, total);
            (node.name().to_owned(), r)
        }
    })
    .await;
    let mut installed = 0;
    for (name, r) in results {
        match r {
            Ok(true) => installed += 1,
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(target: "machine::install", node = %name, "custom node failed: {}", crate::logging::error_chain(&e));
                failed.push((name, e));
            }
        }
    }
    (installed, failed)
}

fn node_dir(workspace: &Path, name: &str) -> PathBuf {
    super::comfyui::dir(workspace).join("custom_nodes").join(name)
}

async fn install_one(ctx: &Ctx, node: &Node, dir: &Path, pip_lock: &Mutex<()>) -> Result<(), InstallError> {
    let s = &node.spec;
    let log = ctx.log(&format!("node-{}", s.name));
    git_checkout(&s.url, s.git_ref.as_deref(), dir, s.submodules, &log, &ctx.cancel).await?;
    let requirements = dir.join("requirements.txt");
    if s.requirements && requirements.exists() {
        let _one_pip_at_a_time = pip_lock.lock().await;
        super::comfyui::pip_install_requirements(ctx, &requirements, dir)
            .run(&log, &ctx.cancel)
            .await?;
    }
    if !node.dotenv.is_empty() {
        let path = dir.join(".env");
        let text: String = node
            .dotenv
            .iter()
            .map(|(k, v)| format!("{k}={}\n", dotenv_quote(v)))
            .collect();
        write_private(&path, &text)?;
    }
    if let Some((program, args)) = s.install.split_first() {
        // The venv's bin first on PATH, so `python` and `pip` in the script mean the venv's.
        let python = super::comfyui::python(&ctx.workspace);
        let venv_bin = python.parent().map(Path::to_path_buf).unwrap_or_default();
        let path = match std::env::var_os("PATH") {
            Some(p) => {
                let mut all = vec![venv_bin.clone()];
                all.extend(std::env::split_paths(&p));
                std::env::join_paths(all).unwrap_or(p)
            }
            None => venv_bin.clone().into_os_string(),
        };
        let _one_pip_at_a_time = pip_lock.lock().await;
        Cmd::new(program)
            .args(args)
            .cwd(dir)
            .env("PATH", path)
            .env("VIRTUAL_ENV", venv_bin.parent().unwrap_or(&venv_bin))
            .run(&log, &ctx.cancel)
            .await?;
    }
    Ok(())
}

/// Quotes a `.env` value so that spaces, `#` and quotes survive python-dotenv's parser.
fn dotenv_quote(v: &str) -> String {
    if v.bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-_./:@+,=".contains(&b))
    {
        v.to_owned()
    } else {
        format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
    }
}

/// Writes a file readable by its owner only: a `.env` holds secrets.
fn write_private(path: &Path, text: &str) -> Result<(), InstallError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| InstallError::io("write", path, e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| InstallError::io("write", path, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_catalogue_parses() {
        assert!(load(None).unwrap().is_empty());
    }

    #[test]
    fn catalogue_entries_are_checked() {
        let ok = "[[node]]\nname = \"a\"\nurl = \"/srv/a.git\"\nenv = { KEY = \"MY_KEY\" }\n";
        let specs = parse("f", ok).unwrap();
        assert!(specs[0].requirements);
        for bad in [
            "[[node]]\nname = \"../x\"\nurl = \"u\"\n",
            "[[node]]\nname = \"a\"\nurl = \"--upload-pack=x\"\n",
            "[[node]]\nname = \"a\"\nurl = \"u\"\n[[node]]\nname = \"a\"\nurl = \"v\"\n",
            "[[node]]\nname = \"a\"\nurl = \"u\"\nsecret = \"x\"\n",
        ] {
            assert!(parse("f", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn env_values_come_from_the_environment() {
        let specs = parse("f", "[[node]]\nname = \"a\"\nurl = \"u\"\nenv = { KEY = \"MY_KEY\" }\n").unwrap();
        let env = BTreeMap::from([("MY_KEY", "s3cret")]);
        let nodes = resolve(specs.clone(), &env);
        assert_eq!(nodes[0].as_ref().unwrap().dotenv["KEY"], "s3cret");
        let nodes = resolve(specs, &BTreeMap::<&str, &str>::new());
        let (name, e) = nodes[0].as_ref().unwrap_err();
        assert_eq!(name, "a");
        assert!(e.to_string().contains("MY_KEY"), "{e}");
    }

    #[test]
    fn dotenv_values_are_quoted_when_needed() {
        assert_eq!(dotenv_quote("sk-abc_1"), "sk-abc_1");
        assert_eq!(dotenv_quote("a b#c'd"), "'a b#c\\'d'");
    }
}

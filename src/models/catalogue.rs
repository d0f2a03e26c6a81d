//! The models catalogue: what this machine may fetch on demand. Each model has a file name (as
//! workflows name it), a kind (the ComfyUI models folder: `checkpoints`, `loras`, ...), its
//! sha256 and size, and one or more sources tried in order: `https://` (or `http://`),
//! `s3://`, `az://`, `gs://`. A source may name an environment variable holding a bearer token
//! (hubs); its value is read when the catalogue is loaded, never written anywhere.
//!
//! TOML (`[[model]]` tables) or JSON (`{"model": [...]}`), chosen by the file's extension.
//!
//! The catalogue may be a file or an `https://` (or `http://`) URL, fetched once when the
//! workers are built, with the bearer token in `COMFYUI_MODELS_CATALOGUE_TOKEN` when set. A
//! catalogue that cannot be fetched fails the start, naming the URL, like a bad catalogue file:
//! the machine never runs with a catalogue it has not read (its orchestrator's restart is the
//! retry).

use std::collections::BTreeMap;
use std::path::Path;

use serde::Deserialize;

use super::ModelError;
use crate::config::Credentials;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalogue {
    #[serde(default)]
    model: Vec<RawModel>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawModel {
    name: String,
    kind: String,
    sha256: String,
    size: u64,
    sources: Vec<String>,
    /// Environment variable holding a bearer token for the `https` sources.
    token_env: Option<String>,
}

/// One model the machine may fetch.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct Entry {
    pub name: String,
    pub kind: String,
    pub sha256: String,
    pub size: u64,
    pub sources: Vec<url::Url>,
    pub token: Option<String>,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("size", &self.size)
            .field("sources", &self.sources)
            .field("token", &self.token.as_ref().map(|_| "<redacted>"))
            .finish_non_exhaustive()
    }
}

/// The catalogue, by file name.
pub(crate) type Catalogue = BTreeMap<String, Entry>;

/// Reads and checks the catalogue at `path`; every problem names the model and the field.
pub(crate) fn load(path: &Path, credentials: &Credentials) -> Result<Catalogue, ModelError> {
    let name = path.to_string_lossy();
    let text = if name.starts_with("https://") || name.starts_with("http://") {
        let url = url::Url::parse(&name).map_err(|e| bad(path, format!("is not a URL: {e}")))?;
        // The configuration loader read it (and reported an unreadable token file).
        let token = credentials.get(TOKEN_VAR).filter(|t| !t.is_empty()).map(str::to_owned);
        fetch_text(&url, token).map_err(|e| ModelError::Catalogue {
            file: redacted(&url),
            message: format!("cannot be fetched: {e}"),
        })?
    } else {
        std::fs::read_to_string(path).map_err(|e| bad(path, format!("cannot be read: {e}")))?
    };
    let is_json = Path::new(name.split(['?', '#']).next().unwrap_or_default())
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    parse(path, &text, is_json, credentials)
}

/// The variable holding the bearer token of a catalogue URL.
const TOKEN_VAR: &str = crate::config::CATALOGUE_TOKEN;

/// How long fetching a catalogue may take, connection included.
const FETCH_LIMIT: std::time::Duration = std::time::Duration::from_secs(30);

/// A URL for messages: without credentials or query.
fn redacted(u: &url::Url) -> String {
    let mut u = u.clone();
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.set_query(None);
    u.to_string()
}

/// Fetches a catalogue's text. The store is built synchronously, maybe on a thread of the
/// machine's runtime, so the request is made with reqwest's blocking client on a thread of its
/// own (the blocking client must not be used from a runtime's thread).
fn fetch_text(url: &url::Url, token: Option<String>) -> Result<String, String> {
    let url = url.clone();
    let run = move || -> Result<String, String> {
        let client = crate::http_client::blocking_builder()
            .timeout(FETCH_LIMIT)
            .build()
            .map_err(|e| e.to_string())?;
        let mut req = client.get(url);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().map_err(|e| crate::logging::error_chain(&e))?;
        let status = resp.status();
        if !status.is_success() {
            return Err(format!("HTTP {status}"));
        }
        resp.text().map_err(|e| crate::logging::error_chain(&e))
    };
    std::thread::scope(|s| {
        s.spawn(run)
            .join()
            .unwrap_or_else(|_| Err("the fetching thread panicked".to_owned()))
    })
}

fn bad(path: &Path, message: String) -> ModelError {
    ModelError::Catalogue {
        file: path.display().to_string(),
        message,
    }
}

pub(crate) fn parse(
    path: &Path,
    text: &str,
    is_json: bool,
    credentials: &Credentials,
) -> Result<Catalogue, ModelError> {
    let raw: RawCatalogue = if is_json {
        let de = &mut serde_json::Deserializer::from_str(text);
        serde_path_to_error::deserialize(de).map_err(|e| bad(path, format!("{}: {}", e.path(), e.inner())))?
    } else {
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| bad(path, e.to_string()))?;
        serde_path_to_error::deserialize(toml::Value::Table(table))
            .map_err(|e| bad(path, format!("{}: {}", e.path(), e.inner())))?
    };
    let mut out = Catalogue::new();
    for m in raw.model {
        let here = |what: String| bad(path, format!("model `{}`: {what}", m.name));
        if !crate::installers::safe_name(&m.name) {
            return Err(here("the name is not a plain file name".to_owned()));
        }
        if !m.kind.split('/').all(crate::installers::safe_name) {
            return Err(here(format!("kind `{}` is not a models folder name", m.kind)));
        }
        if m.sha256.len() != 64 || !m.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(here("sha256 must be 64 hex digits".to_owned()));
        }
        if m.sources.is_empty() {
            return Err(here("it has no sources".to_owned()));
        }
        let mut sources = Vec::new();
        for s in &m.sources {
            let u = url::Url::parse(s).map_err(|e| here(format!("source `{s}` is not a URL: {e}")))?;
            if !matches!(u.scheme(), "http" | "https" | "s3" | "az" | "gs") {
                return Err(here(format!(
                    "source `{s}`: only https, http, s3, az and gs sources are supported"
                )));
            }
            sources.push(u);
        }
        let token = match &m.token_env {
            Some(var) => Some(
                credentials
                    .secret(var)
                    .map_err(|p| here(p.message))?
                    .filter(|v| !v.is_empty())
                    .ok_or_else(|| here(format!("its token variable {var} (or {var}_FILE) is not set")))?,
            ),
            None => None,
        };
        let entry = Entry {
            name: m.name.clone(),
            kind: m.kind.clone(),
            sha256: m.sha256.to_ascii_lowercase(),
            size: m.size,
            sources,
            token,
        };
        if out.insert(m.name.clone(), entry).is_some() {
            return Err(bad(path, format!("model `{}` is listed twice", m.name)));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catalogues_parse_and_bad_entries_are_named() {
        let env = Credentials::from_parts([], [("HUB_TOKEN".to_owned(), "t0k".to_owned())]);
        let sha = "a".repeat(64);
        let toml = format!(
            "[[model]]\nname = \"detail.safetensors\"\nkind = \"loras\"\nsha256 = \"{sha}\"\nsize = 3\n\
             sources = [\"https://hub.example/detail.safetensors\", \"s3://bucket/detail.safetensors\"]\n\
             token_env = \"HUB_TOKEN\"\n"
        );
        let c = parse(Path::new("c.toml"), &toml, false, &env).unwrap();
        assert_eq!(c["detail.safetensors"].kind, "loras");
        assert_eq!(c["detail.safetensors"].sources.len(), 2);
        assert_eq!(c["detail.safetensors"].token.as_deref(), Some("t0k"));
        assert!(!format!("{:?}", c["detail.safetensors"]).contains("t0k"));

        let json = format!(
            r#"{{"model": [{{"name": "x.ckpt", "kind": "checkpoints", "sha256": "{sha}", "size": 1, "sources": ["ftp://x/y"]}}]}}"#
        );
        let e = parse(Path::new("c.json"), &json, true, &env).unwrap_err().to_string();
        assert!(e.contains("model `x.ckpt`") && e.contains("ftp://x/y"), "{e}");
        let e = parse(Path::new("c.toml"), "[[model]]\nname = \"a\"\n", false, &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("model[0]"), "{e}");
        let missing_token = toml.replace("HUB_TOKEN", "NOPE");
        let e = parse(Path::new("c.toml"), &missing_token, false, &env)
            .unwrap_err()
            .to_string();
        assert!(e.contains("NOPE") && e.contains("is not set"), "{e}");
    }
}

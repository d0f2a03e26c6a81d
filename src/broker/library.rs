//! Loading the `jobMatching` library into Redis.
//!
//! The library's version is a checksum of its Lua source, returned by `FCALL jobMatchingVersion`.
//! [`install`] loads the library only when the loaded version differs, so many machines
//! starting at once mostly find it loaded; `FUNCTION LOAD REPLACE` is atomic, so a racing load
//! of the same source is harmless, and the result is verified afterwards. On Redis older than
//! 7.0 (read from `INFO server`'s `redis_version`, never from error strings) the same Lua runs
//! as a script through `EVALSHA`, with a warning.

use redis::aio::ConnectionManager;
use redis::{Value, cmd};
use sha2::{Digest, Sha256};

use super::{BrokerError, redis_err};

/// The library name the API and every machine agree on.
pub const LIBRARY_NAME: &str = "jobMatching";

const SOURCE: &str = include_str!("job_matching.lua");
const VERSION_PLACEHOLDER: &str = "__MATCHER_VERSION__";

/// The Lua library, with its version filled in.
#[derive(Debug, Clone)]
pub struct Library {
    code: String,
    version: String,
}

impl Default for Library {
    fn default() -> Self {
        Self::new()
    }
}

impl Library {
    /// The library embedded in this binary.
    pub fn new() -> Self {
        let digest = Sha256::digest(SOURCE.as_bytes());
        let version = hex::encode(&digest[..8]);
        Self {
            code: SOURCE.replacen(VERSION_PLACEHOLDER, &version, 1),
            version,
        }
    }

    /// The checksum of the Lua source: what `jobMatchingVersion` returns once loaded.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The source for `FUNCTION LOAD`.
    pub fn function_code(&self) -> &str {
        &self.code
    }

    /// The same library as one script for `EVAL`/`EVALSHA` on Redis without Functions: the
    /// registrations fill a local table, and `ARGV[1]` names the function to call with the
    /// remaining arguments.
    pub fn eval_script(&self) -> String {
        let body = self
            .code
            .split_once('\n')
            .map_or(self.code.as_str(), |(first, rest)| {
                if first.starts_with("#!") { rest } else { &self.code }
            })
            .replace("redis.register_function", "__register");
        format!(
            "local __fns = {{}}\n\
             local function __register(a, b)\n  if type(a) == 'table' then __fns[a.function_name] = a.callback else __fns[a] = b end\nend\n\
             {body}\n\
             local __f = __fns[ARGV[1]]\n\
             if not __f then return redis.error_reply('ERR unknown jobMatching function ' .. tostring(ARGV[1])) end\n\
             local __args = {{}}\n\
             for i = 2, #ARGV do __args[i - 1] = ARGV[i] end\n\
             return __f(KEYS, __args)\n"
        )
    }
}

/// How this server runs the library.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Redis 7+: `FCALL`.
    Functions,
    /// Redis < 7: `EVALSHA <sha> 0 <function> <args...>`.
    Eval {
        /// SHA1 of [`Library::eval_script`].
        sha: String,
    },
}

/// What [`install`] found and did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallReport {
    /// The server's `redis_version`.
    pub server_version: String,
    /// How calls are made from now on.
    pub mode: Mode,
    /// The version that was loaded before, if any.
    pub previous: Option<String>,
    /// Whether this call loaded the library.
    pub loaded: bool,
    /// The version now loaded (equal to this binary's).
    pub version: String,
}

/// One function of the loaded library, as `FUNCTION LIST` describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FunctionInfo {
    /// The function name.
    pub name: String,
    /// Its flags, e.g. `no-writes`.
    pub flags: Vec<String>,
}

/// Reads `redis_version` from `INFO server` as (major, minor, patch) plus the raw string.
pub async fn server_version(conn: &mut ConnectionManager) -> Result<((u32, u32, u32), String), BrokerError> {
    let info: String = cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .map_err(redis_err("INFO server"))?;
    let raw = info
        .lines()
        .find_map(|l| l.strip_prefix("redis_version:"))
        .map(|v| v.trim().to_owned())
        .ok_or_else(|| BrokerError::Protocol {
            op: "INFO server",
            detail: "no redis_version line".to_owned(),
        })?;
    let mut parts = raw.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let v = (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    );
    Ok((v, raw))
}

/// Whether this server has Redis Functions (7.0+).
pub fn has_functions(version: (u32, u32, u32)) -> bool {
    version.0 >= 7
}

/// The functions of the loaded `jobMatching` library; empty when it is not loaded.
pub async fn list(conn: &mut ConnectionManager) -> Result<Vec<FunctionInfo>, BrokerError> {
    let reply: Value = cmd("FUNCTION")
        .arg("LIST")
        .arg("LIBRARYNAME")
        .arg(LIBRARY_NAME)
        .query_async(conn)
        .await
        .map_err(redis_err("FUNCTION LIST"))?;
    let mut out = Vec::new();
    for lib in as_seq(&reply) {
        let fields = as_pairs(lib);
        let is_ours = fields
            .iter()
            .any(|(k, v)| k == "library_name" && as_string(v).as_deref() == Some(LIBRARY_NAME));
        if !is_ours {
            continue;
        }
        for (k, v) in &fields {
            if k != "functions" {
                continue;
            }
            for f in as_seq(v) {
                let ff = as_pairs(f);
                let name = ff.iter().find(|(k, _)| k == "name").and_then(|(_, v)| as_string(v));
                let flags = ff
                    .iter()
                    .find(|(k, _)| k == "flags")
                    .map(|(_, v)| as_seq(v).iter().filter_map(as_string).collect())
                    .unwrap_or_default();
                if let Some(name) = name {
                    out.push(FunctionInfo { name, flags });
                }
            }
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// The version of the loaded library, or `None` when it is not loaded.
pub async fn loaded_version(conn: &mut ConnectionManager) -> Result<Option<String>, BrokerError> {
    let functions = list(conn).await?;
    if !functions.iter().any(|f| f.name == "jobMatchingVersion") {
        // Not loaded, or loaded by an older loader without a version: either way not ours.
        return Ok(if functions.is_empty() {
            None
        } else {
            Some(String::new())
        });
    }
    let v: String = cmd("FCALL")
        .arg("jobMatchingVersion")
        .arg(0)
        .query_async(conn)
        .await
        .map_err(redis_err("FCALL jobMatchingVersion"))?;
    Ok(Some(v))
}

/// Loads the library when the loaded version differs from this binary's, then verifies it.
pub async fn install(conn: &mut ConnectionManager, lib: &Library) -> Result<InstallReport, BrokerError> {
    let (version, raw) = server_version(conn).await?;
    if !has_functions(version) {
        tracing::warn!(
            redis_version = %raw,
            "redis has no Functions (needs 7.0+); running the jobMatching library as a script through EVALSHA"
        );
        let sha = load_script(conn, lib).await?;
        return Ok(InstallReport {
            server_version: raw,
            mode: Mode::Eval { sha },
            previous: None,
            loaded: true,
            version: lib.version().to_owned(),
        });
    }
    let previous = loaded_version(conn).await?;
    let installed = |server_version, previous, loaded| InstallReport {
        server_version,
        mode: Mode::Functions,
        previous,
        loaded,
        version: lib.version().to_owned(),
    };
    let mut loaded = false;
    // Another machine may load a different version between our load and our check; a few
    // attempts settle the common case of machines of one version starting together.
    for attempt in 0..3 {
        let current = if attempt == 0 {
            previous.clone()
        } else {
            loaded_version(conn).await?
        };
        if current.as_deref() == Some(lib.version()) {
            return Ok(installed(raw, previous, loaded));
        }
        let _: String = cmd("FUNCTION")
            .arg("LOAD")
            .arg("REPLACE")
            .arg(lib.function_code())
            .query_async(conn)
            .await
            .map_err(redis_err("FUNCTION LOAD REPLACE"))?;
        loaded = true;
        tracing::info!(
            version = lib.version(),
            previous = previous.as_deref().unwrap_or("none"),
            "loaded the jobMatching library"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20 * (attempt + 1))).await;
    }
    let found = loaded_version(conn).await?;
    if found.as_deref() == Some(lib.version()) {
        return Ok(installed(raw, previous, loaded));
    }
    Err(BrokerError::VersionMismatch {
        expected: lib.version().to_owned(),
        found,
    })
}

/// Loads the script form and returns its SHA1.
pub async fn load_script(conn: &mut ConnectionManager, lib: &Library) -> Result<String, BrokerError> {
    cmd("SCRIPT")
        .arg("LOAD")
        .arg(lib.eval_script())
        .query_async(conn)
        .await
        .map_err(redis_err("SCRIPT LOAD"))
}

/// Deletes the library; returns whether it was loaded.
pub async fn delete(conn: &mut ConnectionManager) -> Result<bool, BrokerError> {
    if list(conn).await?.is_empty() {
        return Ok(false);
    }
    let _: () = cmd("FUNCTION")
        .arg("DELETE")
        .arg(LIBRARY_NAME)
        .query_async(conn)
        .await
        .map_err(redis_err("FUNCTION DELETE"))?;
    Ok(true)
}

fn as_seq(v: &Value) -> &[Value] {
    match v {
        Value::Array(items) | Value::Set(items) => items,
        _ => &[],
    }
}

/// A RESP2 flat key/value array or a RESP3 map as pairs with string keys.
fn as_pairs(v: &Value) -> Vec<(String, &Value)> {
    match v {
        Value::Map(pairs) => pairs.iter().filter_map(|(k, v)| as_string(k).map(|k| (k, v))).collect(),
        Value::Array(items) => items
            .chunks(2)
            .filter_map(|c| match c {
                [k, v] => as_string(k).map(|k| (k, v)),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    }
}

fn as_string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => Some(String::from_utf8_lossy(b).into_owned()),
        Value::SimpleString(s) => Some(s.clone()),
        Value::VerbatimString { text, .. } => Some(text.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_is_a_checksum_of_the_source_and_is_filled_in() {
        let lib = Library::new();
        assert_eq!(lib.version().len(), 16);
        assert!(lib.function_code().contains(lib.version()));
        assert!(!lib.function_code().contains(VERSION_PLACEHOLDER));
        assert!(lib.function_code().starts_with("#!lua name=jobMatching"));
    }

    #[test]
    fn eval_script_has_no_shebang_and_no_register_calls() {
        let s = Library::new().eval_script();
        assert!(!s.contains("#!lua"));
        assert!(!s.contains("redis.register_function"));
        assert!(s.contains("__register('findMatchingJob'"));
    }

    #[test]
    fn functions_start_at_redis_7() {
        assert!(!has_functions((6, 2, 14)));
        assert!(has_functions((7, 0, 15)));
    }
}

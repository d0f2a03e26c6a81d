//! The contract's capabilities JSON (what a worker can run) and job requirements (what a job
//! needs), as serde types.
//!
//! [`Capabilities`] is what a worker sends with every claim; unknown keys are kept in
//! `custom` so custom capabilities survive a round trip. [`Requirements`] parses a job's
//! `requirements` field exactly as the Lua library does: empty, `null` or `{}` is "no
//! requirements"; anything that is not a JSON object (or whose `positive_requirements` /
//! `negative_requirements` is not an object) is malformed and makes the job unworkable.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::config::Isolation;

/// A worker's capabilities, sent as the first argument of `findMatchingJob`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The worker's id, e.g. `m1-gpu0`.
    pub worker_id: String,
    /// The machine the worker runs on.
    #[serde(default)]
    pub machine_id: String,
    /// The worker's connectors: the contract's informational `services` field, which matching
    /// reads (as the Lua library does) only when `job_service_required_map` is empty.
    #[serde(default, rename = "services")]
    pub connectors: Vec<String>,
    /// The `service_required` values this worker accepts (what matching reads).
    #[serde(default)]
    pub job_service_required_map: Vec<String>,
    /// Hardware facts.
    #[serde(default)]
    pub hardware: Hardware,
    /// Installed models per service.
    #[serde(default)]
    pub models: BTreeMap<String, Vec<String>>,
    /// Which customers this worker serves.
    #[serde(default)]
    pub customer_access: CustomerAccess,
    /// When non-empty, the worker only takes jobs of this workflow.
    #[serde(default)]
    pub workflow_id: String,
    /// Custom capabilities: every other key, compared with a job's custom requirements.
    #[serde(flatten)]
    pub custom: Map<String, Value>,
}

impl Capabilities {
    /// Capabilities of a worker that accepts the job services `job_services` and has nothing
    /// else declared (its connectors named as those job services).
    pub fn new(worker_id: impl Into<String>, machine_id: impl Into<String>, job_services: &[&str]) -> Self {
        let job_services: Vec<String> = job_services.iter().map(|s| (*s).to_owned()).collect();
        Self {
            worker_id: worker_id.into(),
            machine_id: machine_id.into(),
            job_service_required_map: job_services.clone(),
            connectors: job_services,
            hardware: Hardware::default(),
            models: BTreeMap::new(),
            customer_access: CustomerAccess::default(),
            workflow_id: String::new(),
            custom: Map::new(),
        }
    }

    /// The `service_required` values this worker accepts: `job_service_required_map`, or its
    /// connectors when the map is empty (as the library reads it).
    pub fn accepted_services(&self) -> &[String] {
        if self.job_service_required_map.is_empty() {
            &self.connectors
        } else {
            &self.job_service_required_map
        }
    }

    /// The JSON document sent to Redis.
    pub fn to_json(&self) -> String {
        // A struct of strings, numbers, lists and maps with string keys always serialises.
        serde_json::to_string(self).expect("capabilities serialise to JSON")
    }
}

/// Hardware facts of a worker.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Hardware {
    /// GPUs this worker uses.
    #[serde(default)]
    pub gpu_count: u32,
    /// Memory per GPU in GB.
    #[serde(default)]
    pub gpu_memory_gb: f64,
    /// GPU model name.
    #[serde(default)]
    pub gpu_model: String,
    /// Host RAM in GB.
    #[serde(default)]
    pub ram_gb: f64,
    /// Host CPU cores.
    #[serde(default)]
    pub cpu_cores: u32,
    /// Other hardware facts.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// Customer isolation of a worker, as its capabilities carry it (the configuration's
/// `[worker.customer_access]`, with defaults for what a reader finds missing).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct CustomerAccess {
    /// `loose` or `strict` on the wire.
    #[serde(default)]
    pub isolation: Isolation,
    /// When non-empty, only these customers' jobs are taken.
    #[serde(default)]
    pub allowed_customers: Vec<String>,
    /// These customers' jobs are never taken.
    #[serde(default)]
    pub denied_customers: Vec<String>,
}

/// A job's parsed `requirements`.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirements {
    /// What the worker must have.
    pub positive: Map<String, Value>,
    /// What the worker must not have (any listed item that would match refuses the job).
    pub negative: Option<Map<String, Value>>,
}

/// The job's `requirements` can never match: not a JSON object, or a requirement that can
/// never be compared. The reason is what the job's `error` says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}")]
pub struct MalformedRequirements {
    /// Why, e.g. `malformed requirements JSON` or `requirements.hardware is null`.
    pub reason: String,
}

impl MalformedRequirements {
    fn new(reason: impl Into<String>) -> Self {
        Self { reason: reason.into() }
    }

    fn json() -> Self {
        Self::new("malformed requirements JSON")
    }
}

/// Hardware keys that need a number (or `"all"`).
const HW_NUMBERS: [&str; 4] = ["gpu_memory_gb", "cpu_cores", "ram_gb", "gpu_count"];

/// A number, or a number written as a string (`"16"`, `"-2.5"`), as the Lua library reads it.
pub(crate) fn as_number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => {
            let digits = s.strip_prefix('-').unwrap_or(s);
            let (int, frac) = match digits.split_once('.') {
                Some((i, f)) => (i, Some(f)),
                None => (digits, None),
            };
            let all_digits = |t: &str| !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit());
            (all_digits(int) && frac.is_none_or(all_digits))
                .then(|| s.parse().ok())
                .flatten()
        }
        _ => None,
    }
}

/// Why a job's payload makes it unworkable beside malformed JSON (a `timeout_seconds` that is
/// not a positive number), as the Lua library decides it; `None` when it does not.
pub(crate) fn payload_problem(payload: &Value) -> Option<&'static str> {
    let limit = payload.get("timeout_seconds")?;
    (limit != &Value::Bool(false) && !as_number(limit).is_some_and(|n| n > 0.0))
        .then_some("payload.timeout_seconds must be a positive number of seconds")
}

/// A `hardware.gpu_model` name as text: a string as it is, a number as its decimal text (the
/// monitor's form turns a typed `4090` into a number), as the Lua library reads it: an integer
/// below 1e15 without a fraction, any other number in its shortest form (the two agree for
/// numbers of up to 14 significant digits).
pub(crate) fn gpu_name(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => {
            let f = n.as_f64()?;
            Some(if f.fract() == 0.0 && f.abs() < 1e15 {
                format!("{f:.0}")
            } else {
                format!("{f}")
            })
        }
        _ => None,
    }
}

fn is_gpu_names(v: &Value) -> bool {
    gpu_name(v).is_some() || matches!(v, Value::Array(a) if !a.is_empty() && a.iter().all(|x| gpu_name(x).is_some()))
}

fn is_name_list(v: &Value) -> bool {
    matches!(v, Value::Array(a) if !a.is_empty() && a.iter().all(Value::is_string))
}

fn is_empty(v: &Value) -> bool {
    matches!(v, Value::Array(a) if a.is_empty()) || matches!(v, Value::Object(o) if o.is_empty())
}

/// Why a requirement can never be compared (a null anywhere), or `None`. Numbers beyond the
/// float range do not get here: they do not parse.
fn uncomparable(v: &Value, path: &str) -> Option<String> {
    match v {
        Value::Null => Some(format!("{path} is null")),
        Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| uncomparable(x, &format!("{path}[{i}]"))),
        Value::Object(o) => o.iter().find_map(|(k, x)| uncomparable(x, &format!("{path}.{k}"))),
        _ => None,
    }
}

/// Why the positive requirements can never match a worker: a named key of the wrong kind.
fn wrong_kind(pos: &Map<String, Value>) -> Option<String> {
    // A descriptive key, but a negative time limit is a mistake the job must hear of.
    if pos.get("timeout_minutes").and_then(as_number).is_some_and(|m| m < 0.0) {
        return Some("requirements.timeout_minutes must not be negative".to_owned());
    }
    if let Some(hw) = pos.get("hardware")
        && hw.as_str() != Some("all")
        && !is_empty(hw)
    {
        let Value::Object(hw) = hw else {
            return Some(r#"hardware must be an object or "all""#.to_owned());
        };
        for (k, v) in hw {
            if v.as_str() == Some("all") {
                continue;
            }
            if HW_NUMBERS.contains(&k.as_str()) && as_number(v).is_none() {
                return Some(format!(r#"hardware.{k} must be a number or "all""#));
            }
            if k == "gpu_model" && !is_gpu_names(v) {
                return Some("hardware.gpu_model must be a name or a list of names".to_owned());
            }
        }
    }
    if let Some(models) = pos.get("models")
        && !models.is_string()
        && !is_empty(models)
        && !is_name_list(models)
    {
        let Value::Object(by_service) = models else {
            return Some(r#"models must be a list of names, a name, "all" or an object by service"#.to_owned());
        };
        for (service, list) in by_service {
            if !list.is_string() && !is_empty(list) && !is_name_list(list) {
                return Some(format!(r#"models.{service} must be a list of names, a name or "all""#));
            }
        }
    }
    None
}

impl Requirements {
    /// Parses a `requirements` field the way the Lua library does: empty, `null`, `{}` and
    /// `[]` (what the API stores for an empty list) are no requirements; anything else must be
    /// an object whose requirements can be compared.
    pub fn parse(raw: &str) -> Result<Self, MalformedRequirements> {
        let s = raw.trim_matches(|c: char| c.is_ascii_whitespace());
        if s.is_empty() || s == "null" || s == "[]" {
            return Ok(Self::none());
        }
        if !s.starts_with('{') {
            return Err(MalformedRequirements::json());
        }
        let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(s) else {
            return Err(MalformedRequirements::json());
        };
        let pos = doc.get("positive_requirements");
        let neg = doc.get("negative_requirements");
        let parsed = if pos.is_none() && neg.is_none() {
            Self {
                positive: doc,
                negative: None,
            }
        } else {
            let part = |v: Option<&Value>| -> Result<Option<Map<String, Value>>, MalformedRequirements> {
                match v {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::Object(m)) => Ok(Some(m.clone())),
                    // Lua cannot tell `[]` from `{}`; both mean "nothing".
                    Some(Value::Array(a)) if a.is_empty() => Ok(Some(Map::new())),
                    Some(_) => Err(MalformedRequirements::json()),
                }
            };
            Self {
                positive: part(pos)?.unwrap_or_default(),
                negative: part(neg)?,
            }
        };
        let why = parsed
            .positive
            .iter()
            .find_map(|(k, v)| uncomparable(v, &format!("requirements.{k}")))
            .or_else(|| {
                parsed.negative.as_ref().and_then(|n| {
                    n.iter()
                        .find_map(|(k, v)| uncomparable(v, &format!("negative_requirements.{k}")))
                })
            })
            .or_else(|| wrong_kind(&parsed.positive));
        match why {
            Some(reason) => Err(MalformedRequirements::new(reason)),
            None => Ok(parsed),
        }
    }

    /// No requirements at all.
    pub fn none() -> Self {
        Self {
            positive: Map::new(),
            negative: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The isolation is typed, and the wire keeps its words: `loose` when a reader finds none.
    #[test]
    fn customer_isolation_is_typed_with_the_wire_words() {
        let read = |v: Value| serde_json::from_value::<CustomerAccess>(v).unwrap().isolation;
        assert_eq!(read(serde_json::json!({})), Isolation::Loose);
        assert_eq!(read(serde_json::json!({"isolation": "strict"})), Isolation::Strict);
        let strict = CustomerAccess {
            isolation: Isolation::Strict,
            ..CustomerAccess::default()
        };
        assert_eq!(serde_json::to_value(&strict).unwrap()["isolation"], "strict");
        assert!(serde_json::from_value::<CustomerAccess>(serde_json::json!({"isolation": "sometimes"})).is_err());
    }

    #[test]
    fn capabilities_round_trip_the_contract_example() {
        let doc = r#"{
          "worker_id": "m1-gpu0", "machine_id": "m1",
          "services": ["comfyui", "a1111"],
          "job_service_required_map": ["comfyui", "a1111"],
          "hardware": {"gpu_count": 1, "gpu_memory_gb": 24, "gpu_model": "NVIDIA GeForce RTX 4090", "ram_gb": 64, "cpu_cores": 16},
          "models": {"comfyui": ["sdxl", "sd15"], "a1111": ["anything-v3"]},
          "customer_access": {"isolation": "loose", "allowed_customers": [], "denied_customers": []},
          "workflow_id": "",
          "supports_controlnet": true, "max_batch_size": 4
        }"#;
        let caps: Capabilities = serde_json::from_str(doc).expect("the contract example parses");
        assert_eq!(caps.hardware.gpu_memory_gb, 24.0);
        assert_eq!(caps.custom.get("supports_controlnet"), Some(&Value::Bool(true)));
        let back: Value = serde_json::from_str(&caps.to_json()).expect("our JSON parses");
        assert_eq!(back["max_batch_size"], 4);
        assert_eq!(back["models"]["comfyui"][1], "sd15");
    }

    #[test]
    fn requirements_forms() {
        assert_eq!(Requirements::parse("").unwrap(), Requirements::none());
        assert_eq!(Requirements::parse(" null ").unwrap(), Requirements::none());
        assert_eq!(Requirements::parse("{}").unwrap(), Requirements::none());
        let split =
            Requirements::parse(r#"{"positive_requirements":{"a":1},"negative_requirements":{"b":2}}"#).unwrap();
        assert_eq!(split.positive.get("a"), Some(&Value::from(1)));
        assert!(split.negative.is_some());
        assert_eq!(Requirements::parse("[]").unwrap(), Requirements::none());
        let json = Err(MalformedRequirements::json());
        assert_eq!(Requirements::parse("[1]"), json);
        assert_eq!(Requirements::parse("{oops"), json);
        assert_eq!(Requirements::parse("42"), json);
        assert_eq!(Requirements::parse(r#"{"positive_requirements":[1]}"#), json);
        assert_eq!(Requirements::parse(r#"{"hardware":1e999}"#), json);
        let why = |r: &str| Requirements::parse(r).unwrap_err().reason;
        assert_eq!(why(r#"{"hardware":null}"#), "requirements.hardware is null");
        assert_eq!(
            why(r#"{"hardware":{"gpu_memory_gb":[16]}}"#),
            r#"hardware.gpu_memory_gb must be a number or "all""#
        );
        assert_eq!(
            why(r#"{"models":5}"#),
            r#"models must be a list of names, a name, "all" or an object by service"#
        );
        assert!(Requirements::parse(r#"{"hardware":{"gpu_memory_gb":"16","gpu_model":"A100"}}"#).is_ok());
        assert!(Requirements::parse(r#"{"positive_requirements":{"models":"sdxl"}}"#).is_ok());
        assert!(Requirements::parse(r#"{"models":{"comfyui":["sdxl"]}}"#).is_ok());
        assert_eq!(as_number(&Value::from("16")), Some(16.0));
        assert_eq!(as_number(&Value::from("-2.5")), Some(-2.5));
        for s in ["1e3", "inf", " 16", "0x10", "", "-", "1."] {
            assert_eq!(as_number(&Value::from(s)), None, "{s}");
        }
    }
}

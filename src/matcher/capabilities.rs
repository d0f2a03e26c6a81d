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

/// A worker's capabilities, sent as the first argument of `findMatchingJob`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Capabilities {
    /// The worker's id, e.g. `m1-gpu0`.
    pub worker_id: String,
    /// The machine the worker runs on.
    #[serde(default)]
    pub machine_id: String,
    /// Informational list of services.
    #[serde(default)]
    pub services: Vec<String>,
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
    /// Capabilities of a worker that accepts `services` and has nothing else declared.
    pub fn new(worker_id: impl Into<String>, machine_id: impl Into<String>, services: &[&str]) -> Self {
        let services: Vec<String> = services.iter().map(|s| (*s).to_owned()).collect();
        Self {
            worker_id: worker_id.into(),
            machine_id: machine_id.into(),
            job_service_required_map: services.clone(),
            services,
            hardware: Hardware::default(),
            models: BTreeMap::new(),
            customer_access: CustomerAccess::default(),
            workflow_id: String::new(),
            custom: Map::new(),
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

/// Customer isolation of a worker.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CustomerAccess {
    /// `loose` or `strict`.
    #[serde(default = "loose")]
    pub isolation: String,
    /// When non-empty, only these customers' jobs are taken.
    #[serde(default)]
    pub allowed_customers: Vec<String>,
    /// These customers' jobs are never taken.
    #[serde(default)]
    pub denied_customers: Vec<String>,
}

fn loose() -> String {
    "loose".to_owned()
}

impl Default for CustomerAccess {
    fn default() -> Self {
        Self {
            isolation: loose(),
            allowed_customers: Vec::new(),
            denied_customers: Vec::new(),
        }
    }
}

/// A job's parsed `requirements`.
#[derive(Debug, Clone, PartialEq)]
pub struct Requirements {
    /// What the worker must have.
    pub positive: Map<String, Value>,
    /// What the worker must not have (any listed item that would match refuses the job).
    pub negative: Option<Map<String, Value>>,
}

/// The job's `requirements` is not a JSON object.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed requirements JSON")]
pub struct MalformedRequirements;

impl Requirements {
    /// Parses a `requirements` field the way the Lua library does.
    pub fn parse(raw: &str) -> Result<Self, MalformedRequirements> {
        let s = raw.trim_matches(|c: char| c.is_ascii_whitespace());
        if s.is_empty() || s == "null" {
            return Ok(Self::none());
        }
        if !s.starts_with('{') {
            return Err(MalformedRequirements);
        }
        let Ok(Value::Object(doc)) = serde_json::from_str::<Value>(s) else {
            return Err(MalformedRequirements);
        };
        let pos = doc.get("positive_requirements");
        let neg = doc.get("negative_requirements");
        if pos.is_none() && neg.is_none() {
            return Ok(Self {
                positive: doc,
                negative: None,
            });
        }
        let part = |v: Option<&Value>| -> Result<Option<Map<String, Value>>, MalformedRequirements> {
            match v {
                None | Some(Value::Null) => Ok(None),
                Some(Value::Object(m)) => Ok(Some(m.clone())),
                // Lua cannot tell `[]` from `{}`; both mean "nothing".
                Some(Value::Array(a)) if a.is_empty() => Ok(Some(Map::new())),
                Some(_) => Err(MalformedRequirements),
            }
        };
        Ok(Self {
            positive: part(pos)?.unwrap_or_default(),
            negative: part(neg)?,
        })
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
        assert_eq!(Requirements::parse("[1]"), Err(MalformedRequirements));
        assert_eq!(Requirements::parse("{oops"), Err(MalformedRequirements));
        assert_eq!(Requirements::parse("42"), Err(MalformedRequirements));
        assert_eq!(
            Requirements::parse(r#"{"positive_requirements":[1]}"#),
            Err(MalformedRequirements)
        );
    }
}

//! The reference matcher: the contract's matching semantics in plain Rust, rule for rule the
//! same as `job_matching.lua` (docs/matching.md). The differential test claims through the Lua
//! function on a real Redis and checks each claim against [`pick`]; `machine functions test`
//! uses it as well. It works on the capabilities as JSON, exactly as Lua sees them.

use serde_json::{Map, Value};

use super::capabilities::{Capabilities, Requirements, as_number, gpu_name, payload_problem};

/// Requirement keys that describe a job and are not capabilities.
pub const DESCRIPTIVE_KEYS: [&str; 5] = [
    "service_type",
    "component",
    "workflow",
    "timeout_minutes",
    "quality_level",
];

/// One pending job as matching sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingJob {
    /// The job id.
    pub id: String,
    /// Its score (higher is claimed first): the contract's score computed from the job hash, or
    /// its score in `jobs:pending` when the hash lacks priority or time.
    pub score: f64,
    /// Effective time in epoch milliseconds (0 when unknown); among equal scores the older job
    /// is claimed first.
    pub created_ms: i64,
    /// Order of indexing; among equal scores and times the earlier one is claimed first.
    pub seq: u64,
    /// `service_required` (or the legacy `job_type`).
    pub service: String,
    /// The raw `requirements` field.
    pub requirements: String,
    /// `customer_id`; empty means none.
    pub customer_id: String,
    /// `workflow_id`; empty means none.
    pub workflow_id: String,
    /// The raw `payload` field.
    pub payload: String,
    /// The worker that just failed the job and is held off it, if any.
    pub held_off_worker: Option<String>,
}

impl PendingJob {
    /// Whether the job can be claimed at all: well-formed requirements, a service. (Its payload
    /// is the claiming worker's to check: a malformed one is claimed and ended as unworkable.)
    pub fn workable(&self) -> bool {
        !self.service.is_empty() && Requirements::parse(&self.requirements).is_ok()
    }

    /// Whether the worker that claims the job can run its payload (empty, or JSON without a
    /// `timeout_seconds` that is no positive number); `Broker::claim` ends any other as
    /// unworkable and claims on.
    pub fn payload_runs(&self) -> bool {
        self.payload.trim().is_empty()
            || serde_json::from_str::<Value>(&self.payload).is_ok_and(|p| payload_problem(&p).is_none())
    }
}

/// The job the worker claims next: the matching job with the highest score, then the oldest
/// time, then the first indexed, skipping jobs the worker is held off.
pub fn pick<'a>(caps: &Capabilities, jobs: &'a [PendingJob]) -> Option<&'a PendingJob> {
    let doc = serde_json::to_value(caps).expect("capabilities serialise to JSON");
    jobs.iter()
        .filter(|j| j.held_off_worker.as_deref() != Some(caps.worker_id.as_str()))
        .filter(|j| job_matches(&doc, j) || cold_now(&doc, j))
        .max_by(|a, b| {
            a.score
                .total_cmp(&b.score)
                .then_with(|| b.created_ms.cmp(&a.created_ms))
                .then_with(|| b.seq.cmp(&a.seq))
        })
}

/// Affinity without starvation: a worker advertising `models_on_demand_after_ms` may take a job
/// whose required models it lacks (everything else matching) once the job has waited that long
/// since a cold worker first saw it. The reference has no clock, so it models the two cases a
/// test can pin down: a wait of 0 takes such a job at once, any other wait not on first sight.
fn cold_now(caps: &Value, job: &PendingJob) -> bool {
    if caps.get("models_on_demand_after_ms").and_then(Value::as_f64) != Some(0.0) {
        return false;
    }
    let Ok(mut reqs) = Requirements::parse(&job.requirements) else {
        return false;
    };
    if reqs.positive.remove("models").is_none() {
        return false;
    }
    matches_with(caps, job, &reqs)
}

/// Whether a worker (capabilities as JSON) can run the job.
pub fn job_matches(caps: &Value, job: &PendingJob) -> bool {
    match Requirements::parse(&job.requirements) {
        Ok(reqs) => matches_with(caps, job, &reqs),
        Err(_) => false,
    }
}

fn matches_with(caps: &Value, job: &PendingJob, reqs: &Requirements) -> bool {
    if !job.workable() {
        return false;
    }
    if let Some(Value::String(pin)) = caps.get("workflow_id")
        && !pin.is_empty()
        && *pin != job.workflow_id
    {
        return false;
    }
    if !worker_services(caps).iter().any(|s| *s == job.service) {
        return false;
    }
    if !customer_ok(&job.customer_id, caps) {
        return false;
    }
    if !positive_ok(&reqs.positive, caps, &job.service) {
        return false;
    }
    !reqs
        .negative
        .as_ref()
        .is_some_and(|n| negative_hit(n, caps, &job.service))
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind<'a> {
    Nil,
    Empty,
    List(&'a [Value]),
    Object(&'a Map<String, Value>),
    Number(f64),
    Str(&'a str),
    Bool(bool),
}

fn kind(v: Option<&Value>) -> Kind<'_> {
    match v {
        None | Some(Value::Null) => Kind::Nil,
        Some(Value::Array(a)) if a.is_empty() => Kind::Empty,
        Some(Value::Object(o)) if o.is_empty() => Kind::Empty,
        Some(Value::Array(a)) => Kind::List(a),
        Some(Value::Object(o)) => Kind::Object(o),
        Some(Value::Number(n)) => Kind::Number(n.as_f64().unwrap_or(f64::NAN)),
        Some(Value::String(s)) => Kind::Str(s),
        Some(Value::Bool(b)) => Kind::Bool(*b),
    }
}

fn scalar_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::String(x), Value::String(y)) => x == y,
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Bool(x), Value::Bool(y)) => x == y,
        _ => false,
    }
}

fn list_has(list: &[Value], x: &Value) -> bool {
    list.iter().any(|v| scalar_eq(v, x))
}

fn satisfies(req: &Value, have: Option<&Value>) -> bool {
    let kh = kind(have);
    let kr = kind(Some(req));
    if kh == Kind::Nil || kr == Kind::Nil {
        return false;
    }
    match kr {
        Kind::Empty => matches!(kh, Kind::List(_) | Kind::Object(_) | Kind::Empty),
        Kind::Object(r) => match kh {
            Kind::Object(h) => r.iter().all(|(k, v)| satisfies(v, h.get(k))),
            _ => false,
        },
        Kind::List(r) => match kh {
            Kind::List(h) => r.iter().all(|v| list_has(h, v)),
            _ => false,
        },
        _ => match kh {
            Kind::List(h) => list_has(h, req),
            _ => {
                let have = have.expect("a non-nil kind has a value");
                if (matches!(kr, Kind::Number(_)) || matches!(kh, Kind::Number(_)))
                    && let (Some(r), Some(h)) = (as_number(req), as_number(have))
                {
                    return h >= r;
                }
                scalar_eq(req, have)
            }
        },
    }
}

/// `hardware.gpu_model`: a name matches the worker's model case-insensitively as a substring
/// (a number as its decimal text); a list matches when any of its names does.
fn gpu_model_ok(req: &Value, have: Option<&Value>) -> bool {
    let Some(Value::String(have)) = have else {
        return false;
    };
    let have = have.to_ascii_lowercase();
    let fits = |name: &Value| gpu_name(name).is_some_and(|n| have.contains(&n.to_ascii_lowercase()));
    match kind(Some(req)) {
        Kind::Str(_) | Kind::Number(_) => fits(req),
        Kind::List(names) => names.iter().any(fits),
        _ => false,
    }
}

fn any_item(req: &Value, have: Option<&Value>) -> bool {
    match kind(Some(req)) {
        Kind::List(r) => r.iter().any(|x| any_item(x, have)),
        Kind::Object(r) => match kind(have) {
            Kind::Object(h) => r.iter().any(|(k, x)| any_item(x, h.get(k))),
            _ => false,
        },
        Kind::Empty => false,
        _ => satisfies(req, have),
    }
}

fn lookup<'a>(caps: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = caps.get(path) {
        return Some(v);
    }
    if !path.contains('.') {
        return None;
    }
    let mut v = caps;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        if !matches!(v, Value::Array(_) | Value::Object(_)) {
            return None;
        }
        v = v.get(part)?;
    }
    Some(v)
}

fn hw_value<'a>(caps: &'a Value, key: &str) -> Option<&'a Value> {
    caps.get("hardware").and_then(|h| h.get(key))
}

fn worker_models<'a>(caps: &'a Value, service: &str) -> Option<&'a Value> {
    caps.get("models").and_then(|m| m.get(service))
}

/// The models a requirement lists: `Ok(None)` no constraint, `Err(())` unusable.
fn model_list<'a>(req: &'a Value, service: &str) -> Result<Option<Vec<&'a Value>>, ()> {
    if req.as_str() == Some("all") {
        return Ok(None);
    }
    let mut req = req;
    if let Kind::Object(o) = kind(Some(req)) {
        match o.get(service) {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) if s == "all" => return Ok(None),
            Some(v) => req = v,
        }
    }
    match kind(Some(req)) {
        Kind::Str(_) => Ok(Some(vec![req])),
        Kind::Empty | Kind::Nil => Ok(None),
        Kind::List(l) => Ok(Some(l.iter().collect())),
        _ => Err(()),
    }
}

fn strict_worker(caps: &Value) -> bool {
    caps.get("customer_access")
        .and_then(|c| c.get("isolation"))
        .and_then(Value::as_str)
        == Some("strict")
}

fn positive_ok(reqs: &Map<String, Value>, caps: &Value, service: &str) -> bool {
    reqs.iter()
        .filter(|(k, _)| !DESCRIPTIVE_KEYS.contains(&k.as_str()))
        .all(|(k, v)| match k.as_str() {
            "hardware" => match kind(Some(v)) {
                Kind::Empty => true,
                Kind::Str("all") => true,
                Kind::Object(o) => o.iter().all(|(hk, hv)| {
                    hv.as_str() == Some("all")
                        || if hk == "gpu_model" {
                            gpu_model_ok(hv, hw_value(caps, hk))
                        } else {
                            satisfies(hv, hw_value(caps, hk))
                        }
                }),
                _ => satisfies(v, caps.get("hardware")),
            },
            "models" => match model_list(v, service) {
                Ok(None) => true,
                Err(()) => false,
                Ok(Some(list)) => match kind(worker_models(caps, service)) {
                    Kind::List(have) => list.iter().all(|m| list_has(have, m)),
                    _ => false,
                },
            },
            "customer_isolation" => v.as_str() != Some("strict") || strict_worker(caps),
            "hardware.gpu_model" => gpu_model_ok(v, hw_value(caps, "gpu_model")),
            _ => satisfies(v, lookup(caps, k)),
        })
}

fn negative_hit(reqs: &Map<String, Value>, caps: &Value, service: &str) -> bool {
    reqs.iter()
        .filter(|(k, _)| !DESCRIPTIVE_KEYS.contains(&k.as_str()))
        .any(|(k, v)| match k.as_str() {
            "hardware" => match kind(Some(v)) {
                Kind::Object(o) => o.iter().any(|(hk, hv)| {
                    hv.as_str() != Some("all")
                        && if hk == "gpu_model" {
                            gpu_model_ok(hv, hw_value(caps, hk))
                        } else {
                            any_item(hv, hw_value(caps, hk))
                        }
                }),
                _ => false,
            },
            "models" => match (model_list(v, service), kind(worker_models(caps, service))) {
                (Ok(Some(list)), Kind::List(have)) => list.iter().any(|m| list_has(have, m)),
                _ => false,
            },
            "customer_isolation" => v.as_str() == Some("strict") && strict_worker(caps),
            "hardware.gpu_model" => gpu_model_ok(v, hw_value(caps, "gpu_model")),
            _ => any_item(v, lookup(caps, k)),
        })
}

fn customer_ok(customer: &str, caps: &Value) -> bool {
    if customer.is_empty() {
        return true;
    }
    let Some(access) = caps.get("customer_access").filter(|a| a.is_object()) else {
        return true;
    };
    let customer = Value::String(customer.to_owned());
    if let Kind::List(denied) = kind(access.get("denied_customers"))
        && list_has(denied, &customer)
    {
        return false;
    }
    if let Kind::List(allowed) = kind(access.get("allowed_customers"))
        && !list_has(allowed, &customer)
    {
        return false;
    }
    true
}

fn worker_services(caps: &Value) -> Vec<&str> {
    let mut map = caps.get("job_service_required_map");
    if kind(map) == Kind::Nil {
        map = caps.get("services");
    }
    match kind(map) {
        Kind::List(l) => l.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    }
}

/// The matching semantics table of docs/matching.md: (case, job service, job requirements,
/// whether a worker with [`example_capabilities`] matches). The unit test checks it here, the
/// integration test through the Lua function.
pub const EXAMPLES: &[(&str, &str, &str, bool)] = &[
    ("service in map", "comfyui", "", true),
    ("service not in map", "openai_text", "", false),
    (
        "gpu memory enough",
        "comfyui",
        r#"{"hardware":{"gpu_memory_gb":16}}"#,
        true,
    ),
    (
        "gpu memory too little",
        "comfyui",
        r#"{"hardware":{"gpu_memory_gb":48}}"#,
        false,
    ),
    (
        "hardware all",
        "comfyui",
        r#"{"hardware":{"gpu_memory_gb":"all","cpu_cores":8}}"#,
        true,
    ),
    ("models present", "comfyui", r#"{"models":["sdxl"]}"#, true),
    ("model missing", "comfyui", r#"{"models":["flux"]}"#, false),
    ("models of another service", "a1111", r#"{"models":["sdxl"]}"#, false),
    ("models all", "comfyui", r#"{"models":"all"}"#, true),
    (
        "strict isolation needs strict worker",
        "comfyui",
        r#"{"customer_isolation":"strict"}"#,
        false,
    ),
    ("loose isolation", "comfyui", r#"{"customer_isolation":"loose"}"#, true),
    (
        "descriptive keys ignored",
        "comfyui",
        r#"{"service_type":"x","component":"y","workflow":"z","timeout_minutes":5,"quality_level":"high"}"#,
        true,
    ),
    ("custom bool", "comfyui", r#"{"supports_controlnet":true}"#, true),
    (
        "custom bool mismatch",
        "comfyui",
        r#"{"supports_controlnet":false}"#,
        false,
    ),
    (
        "custom number worker >= required",
        "comfyui",
        r#"{"max_batch_size":2}"#,
        true,
    ),
    ("custom number too big", "comfyui", r#"{"max_batch_size":8}"#, false),
    (
        "custom list all present",
        "comfyui",
        r#"{"features":["upscale"]}"#,
        true,
    ),
    (
        "custom list missing item",
        "comfyui",
        r#"{"features":["upscale","video"]}"#,
        false,
    ),
    (
        "worker list contains scalar",
        "comfyui",
        r#"{"features":"inpaint"}"#,
        true,
    ),
    ("dotted path", "comfyui", r#"{"region.zone":"eu"}"#, true),
    (
        "object key by key",
        "comfyui",
        r#"{"region":{"zone":"eu","tier":1}}"#,
        true,
    ),
    ("object key mismatch", "comfyui", r#"{"region":{"zone":"us"}}"#, false),
    ("missing worker value", "comfyui", r#"{"has_tpu":true}"#, false),
    (
        "negative on a key the worker lacks",
        "comfyui",
        r#"{"negative_requirements":{"gpu_model":"NVIDIA GeForce RTX 4090"}}"#,
        true,
    ),
    (
        "negative miss",
        "comfyui",
        r#"{"positive_requirements":{"hardware":{"gpu_memory_gb":16}},"negative_requirements":{"hardware.gpu_model":"RTX 3090"}}"#,
        true,
    ),
    (
        "negative hit dotted",
        "comfyui",
        r#"{"negative_requirements":{"hardware.gpu_model":"NVIDIA GeForce RTX 4090"}}"#,
        false,
    ),
    (
        "negative model",
        "comfyui",
        r#"{"negative_requirements":{"models":["sd15"]}}"#,
        false,
    ),
    ("malformed", "comfyui", r#"{"hardware":"#, false),
    ("empty list is no requirements", "comfyui", "[]", true),
    (
        "one model as a string",
        "comfyui",
        r#"{"positive_requirements":{"models":"sdxl"}}"#,
        true,
    ),
    (
        "models by service",
        "comfyui",
        r#"{"models":{"comfyui":["sdxl"],"a1111":["x"]}}"#,
        true,
    ),
    (
        "models by service missing",
        "comfyui",
        r#"{"models":{"comfyui":["flux"]}}"#,
        false,
    ),
    (
        "gpu model substring",
        "comfyui",
        r#"{"hardware":{"gpu_model":"4090"}}"#,
        true,
    ),
    (
        "gpu model any case",
        "comfyui",
        r#"{"hardware":{"gpu_model":"geforce rtx"}}"#,
        true,
    ),
    (
        "gpu model other",
        "comfyui",
        r#"{"hardware":{"gpu_model":"A100"}}"#,
        false,
    ),
    (
        "gpu model one of",
        "comfyui",
        r#"{"hardware":{"gpu_model":["A100","4090"]}}"#,
        true,
    ),
    (
        "gpu model as a number",
        "comfyui",
        r#"{"hardware":{"gpu_model":4090}}"#,
        true,
    ),
    (
        "gpu model as another number",
        "comfyui",
        r#"{"hardware":{"gpu_model":3090}}"#,
        false,
    ),
    (
        "gpu model numbers in a list",
        "comfyui",
        r#"{"hardware":{"gpu_model":["A100",4090]}}"#,
        true,
    ),
    (
        "gpu model as a number dotted",
        "comfyui",
        r#"{"hardware.gpu_model":4090}"#,
        true,
    ),
    (
        "number as a string",
        "comfyui",
        r#"{"hardware":{"gpu_memory_gb":"16"}}"#,
        true,
    ),
    (
        "number as a string too big",
        "comfyui",
        r#"{"hardware":{"gpu_memory_gb":"48"}}"#,
        false,
    ),
    ("hardware null", "comfyui", r#"{"hardware":null}"#, false),
    (
        "list where a number is needed",
        "comfyui",
        r#"{"hardware":{"gpu_memory_gb":[16]}}"#,
        false,
    ),
    (
        "negative gpu model substring",
        "comfyui",
        r#"{"negative_requirements":{"hardware":{"gpu_model":"rtx 4090"}}}"#,
        false,
    ),
];

/// The worker of [`EXAMPLES`]: the contract's example plus a few custom capabilities.
pub fn example_capabilities() -> Value {
    serde_json::json!({
      "worker_id": "m1-gpu0", "machine_id": "m1",
      "services": ["comfyui", "a1111"],
      "job_service_required_map": ["comfyui", "a1111"],
      "hardware": {"gpu_count": 1, "gpu_memory_gb": 24, "gpu_model": "NVIDIA GeForce RTX 4090", "ram_gb": 64, "cpu_cores": 16},
      "models": {"comfyui": ["sdxl", "sd15"], "a1111": ["anything-v3"]},
      "customer_access": {"isolation": "loose", "allowed_customers": [], "denied_customers": ["evil"]},
      "workflow_id": "",
      "supports_controlnet": true, "max_batch_size": 4, "features": ["upscale", "inpaint"],
      "region": {"zone": "eu", "tier": 2}
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn job(service: &str, reqs: &str) -> PendingJob {
        PendingJob {
            id: "j".to_owned(),
            score: 1.0,
            service: service.to_owned(),
            requirements: reqs.to_owned(),
            customer_id: String::new(),
            workflow_id: String::new(),
            payload: "{}".to_owned(),
            held_off_worker: None,
            created_ms: 0,
            seq: 0,
        }
    }

    #[test]
    fn semantics_table() {
        let c = example_capabilities();
        for (name, service, reqs, want) in EXAMPLES {
            assert_eq!(job_matches(&c, &job(service, reqs)), *want, "{name}");
        }
    }

    #[test]
    fn customers_and_workflow_pinning() {
        let mut c = example_capabilities();
        let mut j = job("comfyui", "");
        j.customer_id = "evil".to_owned();
        assert!(!job_matches(&c, &j), "denied customer");
        j.customer_id = "good".to_owned();
        assert!(job_matches(&c, &j));
        c["customer_access"]["allowed_customers"] = json!(["other"]);
        assert!(!job_matches(&c, &j), "not in a non-empty allow list");
        j.customer_id = String::new();
        assert!(job_matches(&c, &j), "an empty customer_id is no customer");
        c["workflow_id"] = json!("wf1");
        assert!(!job_matches(&c, &j));
        j.workflow_id = "wf1".to_owned();
        assert!(job_matches(&c, &j));
    }

    #[test]
    fn pick_takes_the_highest_score_and_skips_hold_offs() {
        let caps = Capabilities::new("w1", "m1", &["comfyui"]);
        let mut a = job("comfyui", "");
        a.id = "a".to_owned();
        a.score = 5.0;
        let mut b = job("comfyui", "");
        b.id = "b".to_owned();
        b.score = 7.0;
        let mut c = job("a1111", "");
        c.id = "c".to_owned();
        c.score = 9.0;
        let jobs = vec![a, b.clone(), c];
        assert_eq!(pick(&caps, &jobs).map(|j| j.id.as_str()), Some("b"));
        let mut held = jobs.clone();
        held[1].held_off_worker = Some("w1".to_owned());
        assert_eq!(pick(&caps, &held).map(|j| j.id.as_str()), Some("a"));
    }
}

//! A stored job read through the contract: [`JobRecord`] (`job:<id>`) and [`JobProgress`]
//! (`job:<id>:progress`) say what each field holds (the status as an operator counts it,
//! numbers, JSON documents), so that the operator commands render typed values and only the
//! broker names a hash field.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use crate::broker::CANCEL_ERROR;

/// A job's status as an operator counts it: the contract's words, with a job the API cancelled
/// (stored as `failed` with [`CANCEL_ERROR`]) told apart from one that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobState {
    /// Waiting in `jobs:pending`.
    Pending,
    /// Queued (the API's word for pending).
    Queued,
    /// Claimed by a worker.
    Assigned,
    /// Accepted by a worker.
    Accepted,
    /// Running.
    InProgress,
    /// Finished with a result.
    Completed,
    /// Failed for good.
    Failed,
    /// Cancelled by the API or an operator.
    Cancelled,
    /// Timed out.
    Timeout,
    /// No worker can ever run it.
    Unworkable,
    /// A word the contract does not have (empty when the hash has no status), kept as written.
    Other(String),
}

impl JobState {
    /// The contract's words for the states an operator can name (`jobs list --status`).
    pub const WORDS: [&'static str; 10] = [
        "pending",
        "queued",
        "assigned",
        "accepted",
        "in_progress",
        "completed",
        "failed",
        "cancelled",
        "timeout",
        "unworkable",
    ];

    /// The state an operator names with one of [`Self::WORDS`]; `None` for any other word.
    pub fn named(word: &str) -> Option<JobState> {
        match Self::read(word, "") {
            Self::Other(_) => None,
            state => Some(state),
        }
    }

    /// The state of a job with `status` and `error` as stored.
    fn read(status: &str, error: &str) -> Self {
        match status {
            "pending" => Self::Pending,
            "queued" => Self::Queued,
            "assigned" => Self::Assigned,
            "accepted" => Self::Accepted,
            "in_progress" => Self::InProgress,
            "completed" => Self::Completed,
            "failed" if error == CANCEL_ERROR => Self::Cancelled,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            "timeout" => Self::Timeout,
            "unworkable" => Self::Unworkable,
            other => Self::Other(other.to_owned()),
        }
    }

    /// The contract's word for the state (`cancelled` for a cancelled job, however stored).
    pub fn name(&self) -> &str {
        match self {
            Self::Pending => "pending",
            Self::Queued => "queued",
            Self::Assigned => "assigned",
            Self::Accepted => "accepted",
            Self::InProgress => "in_progress",
            Self::Completed => "completed",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Timeout => "timeout",
            Self::Unworkable => "unworkable",
            Self::Other(word) => word,
        }
    }

    /// Whether the job still waits for a worker (no status yet, `pending` or `queued`).
    pub fn is_waiting(&self) -> bool {
        matches!(self, Self::Pending | Self::Queued) || *self == Self::Other(String::new())
    }
}

/// Job hash fields that hold numbers.
const NUMBER_FIELDS: &[&str] = &[
    "priority",
    "retry_count",
    "max_retries",
    "workflow_priority",
    "workflow_datetime",
    "current_step",
    "total_steps",
    "step_number",
    "processing_time",
    "progress",
];

/// Job hash fields that hold JSON documents.
const JSON_FIELDS: &[&str] = &["payload", "requirements", "ctx", "result"];

/// One field of a job as stored, with the value it stands for.
#[derive(Debug, Clone, PartialEq)]
pub struct JobField<'a> {
    /// The contract's name of the field.
    pub name: &'a str,
    /// The text as stored.
    pub text: &'a str,
    /// What the text stands for: numbers as numbers, JSON documents as JSON (an empty one as
    /// null); text that does not read as its kind stays text.
    pub value: Value,
    /// What the field means, where an operator reads it differently from its text.
    pub meaning: Meaning,
}

/// What a field means beyond its text.
#[derive(Debug, Clone, PartialEq)]
pub enum Meaning {
    /// Nothing more than its value.
    Plain,
    /// `status`: the job's state as an operator counts it.
    State(JobState),
    /// `max_retries`: how many attempts the job has in all (the contract counts attempts).
    Attempts(u32),
    /// `processing_time`: how long the job ran.
    Took(Duration),
    /// `payload`: the job's input document.
    Payload,
    /// `error`: why the job failed.
    Error,
}

/// A job hash (`job:<id>`) read through the contract.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobRecord {
    fields: BTreeMap<String, String>,
}

impl JobRecord {
    /// The record of the job hash `fields`.
    pub(crate) fn new(fields: BTreeMap<String, String>) -> Self {
        Self { fields }
    }

    fn text(&self, name: &str) -> &str {
        self.fields.get(name).map_or("", String::as_str)
    }

    /// `id`.
    pub fn id(&self) -> &str {
        self.text("id")
    }

    /// The job's state as an operator counts it.
    pub fn state(&self) -> JobState {
        JobState::read(self.text("status"), self.text("error"))
    }

    /// `service_required`.
    pub fn service(&self) -> &str {
        self.text("service_required")
    }

    /// `worker_id` (empty while no worker holds the job).
    pub fn worker_id(&self) -> &str {
        self.text("worker_id")
    }

    /// `priority` as stored.
    pub fn priority(&self) -> &str {
        self.text("priority")
    }

    /// `created_at` (ISO time) as stored.
    pub fn created_at(&self) -> &str {
        self.text("created_at")
    }

    /// Every field, in name order, with what it stands for.
    pub fn fields(&self) -> impl Iterator<Item = JobField<'_>> {
        self.fields.iter().map(|(name, text)| JobField {
            name,
            text,
            value: typed(name, text),
            meaning: self.meaning(name, text),
        })
    }

    /// What the field `name` with `text` means.
    fn meaning(&self, name: &str, text: &str) -> Meaning {
        match name {
            "status" => Meaning::State(self.state()),
            "max_retries" => text.trim().parse().map_or(Meaning::Plain, Meaning::Attempts),
            "processing_time" => text
                .trim()
                .parse()
                .map_or(Meaning::Plain, |ms| Meaning::Took(Duration::from_millis(ms))),
            "payload" => Meaning::Payload,
            "error" => Meaning::Error,
            _ => Meaning::Plain,
        }
    }

    /// The hash as stored, for a check of the wire contract itself (tests, diagnostics).
    pub fn stored(&self) -> &BTreeMap<String, String> {
        &self.fields
    }
}

/// `jobs ... --json`: every field with the value it stands for.
impl serde::Serialize for JobRecord {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.fields().map(|f| (f.name, f.value)))
    }
}

/// A job's progress hash (`job:<id>:progress`) read through the contract.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct JobProgress {
    fields: BTreeMap<String, String>,
}

impl JobProgress {
    /// The record of the progress hash `fields`.
    pub(crate) fn new(fields: BTreeMap<String, String>) -> Self {
        Self { fields }
    }

    /// Every field, in name order, with what it stands for.
    pub fn fields(&self) -> impl Iterator<Item = JobField<'_>> {
        self.fields.iter().map(|(name, text)| JobField {
            name,
            text,
            value: typed(name, text),
            meaning: Meaning::Plain,
        })
    }

    /// The hash as stored, for a check of the wire contract itself (tests, diagnostics).
    pub fn stored(&self) -> &BTreeMap<String, String> {
        &self.fields
    }
}

/// `jobs show --json`: every field with the value it stands for.
impl serde::Serialize for JobProgress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.fields().map(|f| (f.name, f.value)))
    }
}

/// A stored field's text as the value it stands for.
fn typed(field: &str, text: &str) -> Value {
    if NUMBER_FIELDS.contains(&field) {
        if let Ok(n) = text.trim().parse::<i64>() {
            return Value::from(n);
        }
        if let Some(n) = text.trim().parse::<f64>().ok().and_then(serde_json::Number::from_f64) {
            return Value::Number(n);
        }
    } else if JSON_FIELDS.contains(&field) {
        if text.trim().is_empty() {
            return Value::Null;
        }
        if let Ok(v) = serde_json::from_str(text) {
            return v;
        }
    }
    Value::String(text.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(fields: &[(&str, &str)]) -> JobRecord {
        JobRecord::new(fields.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect())
    }

    #[test]
    fn stored_text_becomes_typed_values() {
        let job = record(&[
            ("id", "0042"),
            ("priority", "50"),
            ("payload", r#"{"steps":3}"#),
            ("requirements", ""),
            ("customer_id", "7"),
        ]);
        assert_eq!(
            serde_json::to_value(&job).expect("a record serialises"),
            serde_json::json!({"id": "0042", "priority": 50, "payload": {"steps": 3}, "requirements": null, "customer_id": "7"})
        );
    }

    #[test]
    fn cancelled_jobs_are_not_failures() {
        let state = |status: &str, error: &str| record(&[("status", status), ("error", error)]).state();
        assert_eq!(state("failed", CANCEL_ERROR), JobState::Cancelled);
        assert_eq!(state("failed", "boom"), JobState::Failed);
        assert_eq!(state("in_progress", ""), JobState::InProgress);
        assert_eq!(state("cancelled", ""), JobState::Cancelled);
        assert_eq!(state("weird", "").name(), "weird");
        assert!(record(&[]).state().is_waiting());
    }

    #[test]
    fn fields_say_what_they_mean() {
        let job = record(&[("max_retries", "3"), ("processing_time", "2001"), ("retry_count", "x")]);
        let meanings: Vec<_> = job.fields().map(|f| (f.name, f.meaning, f.value)).collect();
        assert_eq!(
            meanings,
            [
                ("max_retries", Meaning::Attempts(3), Value::from(3)),
                (
                    "processing_time",
                    Meaning::Took(Duration::from_millis(2001)),
                    Value::from(2001)
                ),
                ("retry_count", Meaning::Plain, Value::from("x")),
            ]
        );
    }
}

//! What ComfyUI says about one prompt, read: the WebSocket events that drive its progress and
//! end it ([`PromptTracker`]), and the `/history` and `/queue` answers that tell its fate when the
//! socket cannot.

use std::collections::{HashMap, HashSet};

use serde_json::{Map, Value};

use crate::connectors::{Progress, ProgressSink};

/// How a prompt ended, as ComfyUI reported it.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum PromptEnd {
    Success,
    /// `gpu`: the GPU ran out of memory under the prompt, which is the machine's fault (another
    /// attempt, maybe on another GPU, may succeed), not the workflow's.
    Error {
        message: String,
        gpu: bool,
    },
    Interrupted,
}

/// The outcome an `execution_error` describes; an out-of-memory error is the GPU's.
fn execution_error(data: &Value) -> PromptEnd {
    let s = |k: &str| data.get(k).and_then(Value::as_str).unwrap_or_default();
    let message = format!(
        "node {} ({}) raised {}: {}",
        s("node_id"),
        s("node_type"),
        s("exception_type"),
        s("exception_message").trim()
    );
    let lower = format!("{} {}", s("exception_type"), s("exception_message")).to_ascii_lowercase();
    let gpu = lower.contains("outofmemory") || lower.contains("out of memory");
    PromptEnd::Error { message, gpu }
}

/// Whether a `GET /queue` answer lists `prompt_id` as running or pending (items are
/// `[number, prompt_id, prompt, extra_data, outputs_to_execute]`).
pub(super) fn queue_lists(queue: &Value, prompt_id: &str) -> bool {
    ["queue_running", "queue_pending"].iter().any(|k| {
        queue.get(*k).and_then(Value::as_array).is_some_and(|items| {
            items
                .iter()
                .any(|i| i.get(1).and_then(Value::as_str) == Some(prompt_id))
        })
    })
}

/// Whether a `GET /queue` answer lists nothing running and nothing pending.
pub(super) fn queue_is_empty(queue: &Value) -> bool {
    ["queue_running", "queue_pending"]
        .iter()
        .all(|k| queue.get(*k).and_then(Value::as_array).is_none_or(Vec::is_empty))
}

/// The outcome a finished history entry records; `None` while the prompt is not finished.
pub(super) fn history_outcome(entry: &Value) -> Option<PromptEnd> {
    let status = entry.get("status")?;
    let messages = status.get("messages").and_then(Value::as_array);
    let find = |name: &str| {
        messages.and_then(|m| {
            m.iter()
                .find(|x| x.get(0).and_then(Value::as_str) == Some(name))
                .and_then(|x| x.get(1))
        })
    };
    if let Some(data) = find("execution_error") {
        return Some(execution_error(data));
    }
    if find("execution_interrupted").is_some() {
        return Some(PromptEnd::Interrupted);
    }
    match status.get("status_str").and_then(Value::as_str) {
        Some("success") => Some(PromptEnd::Success),
        Some("error") => Some(PromptEnd::Error {
            message: "ComfyUI recorded the prompt as failed".to_owned(),
            gpu: false,
        }),
        _ if status.get("completed").and_then(Value::as_bool) == Some(true) => Some(PromptEnd::Success),
        _ => None,
    }
}

/// Follows one prompt's events and turns them into progress and, at the end, an outcome.
///
/// Overall progress counts finished nodes (executed or cached) out of the workflow's nodes, plus
/// the running node's `value / max`.
#[derive(Debug)]
pub(super) struct PromptTracker {
    prompt_id: String,
    total: usize,
    done: HashSet<String>,
    current: Option<String>,
    class_of: HashMap<String, String>,
    node_fraction: f64,
    /// `executing` with no node arrived: the server is done with the prompt, history written.
    pub(super) finished: bool,
    /// Messages about this prompt so far, of any type (`progress_state` included): the
    /// connector's stall clock is wound whenever this grows.
    pub(super) words: u64,
}

impl PromptTracker {
    pub(super) fn new(prompt_id: String, workflow: &Map<String, Value>) -> PromptTracker {
        PromptTracker {
            prompt_id,
            total: workflow.len().max(1),
            done: HashSet::new(),
            current: None,
            class_of: workflow
                .iter()
                .map(|(id, n)| {
                    let class = n.get("class_type").and_then(Value::as_str).unwrap_or_default();
                    (id.clone(), class.to_owned())
                })
                .collect(),
            node_fraction: 0.0,
            finished: false,
            words: 0,
        }
    }

    fn report(&self, progress: &ProgressSink, message: String) {
        let done = self.done.len().min(self.total);
        let percent = (done as f64 + self.node_fraction) * 100.0 / self.total as f64;
        progress.report(Progress {
            // 100 is reserved for the end, after the outputs are collected.
            percent: percent.min(99.0),
            message,
            current_step: Some(done as u32),
            total_steps: Some(self.total as u32),
        });
    }

    fn node_label(&self, node: &str) -> String {
        match self.class_of.get(node).filter(|c| !c.is_empty()) {
            Some(class) => format!("{node} ({class})"),
            None => node.to_owned(),
        }
    }

    /// Handles one text message; returns the outcome when the prompt has finished.
    pub(super) fn handle(&mut self, text: &str, progress: &ProgressSink) -> Option<PromptEnd> {
        let msg: Value = serde_json::from_str(text).ok()?;
        let kind = msg.get("type").and_then(Value::as_str)?;
        let data = msg.get("data").cloned().unwrap_or(Value::Null);
        // Events of other prompts (other clients of the same server) are not ours. Events with no
        // prompt id (`progress` on older servers) belong to whatever runs now.
        match data.get("prompt_id").and_then(Value::as_str) {
            Some(id) if id != self.prompt_id => return None,
            None if kind != "progress" => return None,
            None if self.current.is_none() => return None,
            _ => {}
        }
        self.words += 1;
        match kind {
            "execution_start" => self.report(progress, "started".to_owned()),
            "execution_cached" => {
                if let Some(nodes) = data.get("nodes").and_then(Value::as_array) {
                    self.done
                        .extend(nodes.iter().filter_map(Value::as_str).map(str::to_owned));
                }
                self.report(progress, format!("{} cached node(s)", self.done.len()));
            }
            "executing" => match data.get("node").and_then(Value::as_str) {
                Some(node) => {
                    if let Some(prev) = self.current.replace(node.to_owned()) {
                        self.done.insert(prev);
                    }
                    self.node_fraction = 0.0;
                    self.report(progress, format!("executing node {}", self.node_label(node)));
                }
                // `executing` with a null node is how older servers say the prompt finished.
                None => {
                    self.finished = true;
                    return Some(PromptEnd::Success);
                }
            },
            "progress" => {
                let value = data.get("value").and_then(Value::as_f64).unwrap_or(0.0);
                let max = data.get("max").and_then(Value::as_f64).unwrap_or(0.0);
                if max > 0.0 {
                    self.node_fraction = (value / max).clamp(0.0, 1.0);
                }
                let node = data
                    .get("node")
                    .and_then(Value::as_str)
                    .map(str::to_owned)
                    .or_else(|| self.current.clone())
                    .unwrap_or_default();
                self.report(
                    progress,
                    format!("node {}: step {value} of {max}", self.node_label(&node)),
                );
            }
            "executed" => {
                if let Some(node) = data.get("node").and_then(Value::as_str) {
                    self.done.insert(node.to_owned());
                    if self.current.as_deref() == Some(node) {
                        self.current = None;
                    }
                    self.node_fraction = 0.0;
                    self.report(progress, format!("node {} done", self.node_label(node)));
                }
            }
            "execution_success" => return Some(PromptEnd::Success),
            "execution_error" => return Some(execution_error(&data)),
            "execution_interrupted" => return Some(PromptEnd::Interrupted),
            _ => {}
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn workflow() -> Value {
        json!({
            "3": {"class_type": "KSampler", "inputs": {}},
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {}},
            "9": {"class_type": "SaveImage", "inputs": {}}
        })
    }

    #[test]
    fn an_interrupted_prompt_keeps_the_queue_busy_until_it_leaves_it() {
        let running = json!({"queue_running": [[0, "p1", {}, {}, []]], "queue_pending": []});
        assert!(!queue_is_empty(&running));
        assert!(queue_lists(&running, "p1"));
        let pending = json!({"queue_running": [], "queue_pending": [[1, "p2", {}, {}, []]]});
        assert!(!queue_is_empty(&pending));
        assert!(queue_is_empty(&json!({"queue_running": [], "queue_pending": []})));
        assert!(
            queue_is_empty(&json!({})),
            "an answer without the lists has nothing queued"
        );
    }

    #[test]
    fn tracker_maps_events_to_progress_and_outcome() {
        let w = workflow();
        let mut t = PromptTracker::new("p1".into(), w.as_object().unwrap());
        let (sink, rx) = ProgressSink::new();
        let ev = |t: &mut PromptTracker, v: Value| t.handle(&v.to_string(), &sink);
        assert_eq!(ev(&mut t, json!({"type": "status", "data": {"status": {}}})), None);
        ev(
            &mut t,
            json!({"type": "execution_cached", "data": {"nodes": ["4"], "prompt_id": "p1"}}),
        );
        assert_eq!(rx.borrow().1.current_step, Some(1));
        ev(
            &mut t,
            json!({"type": "executing", "data": {"node": "3", "prompt_id": "p1"}}),
        );
        ev(
            &mut t,
            json!({"type": "progress", "data": {"value": 10, "max": 20, "node": "3", "prompt_id": "p1"}}),
        );
        assert!((rx.borrow().1.percent - 50.0).abs() < 1e-9, "{:?}", rx.borrow());
        // Another prompt's events change nothing.
        ev(
            &mut t,
            json!({"type": "progress", "data": {"value": 20, "max": 20, "prompt_id": "other"}}),
        );
        assert!((rx.borrow().1.percent - 50.0).abs() < 1e-9);
        // Words about this prompt are counted for the stall clock, whatever their type; the
        // `status` broadcast and the other prompt's event were not about it.
        assert_eq!(t.words, 3);
        ev(
            &mut t,
            json!({"type": "progress_state", "data": {"prompt_id": "p1", "nodes": {}}}),
        );
        assert_eq!(t.words, 4);
        ev(
            &mut t,
            json!({"type": "executed", "data": {"node": "3", "output": {}, "prompt_id": "p1"}}),
        );
        assert_eq!(rx.borrow().1.current_step, Some(2));
        assert_eq!(
            ev(
                &mut t,
                json!({"type": "execution_success", "data": {"prompt_id": "p1"}})
            ),
            Some(PromptEnd::Success)
        );
        let oom = ev(
            &mut t,
            json!({"type": "execution_error", "data": {"prompt_id": "p1", "node_id": "3", "node_type": "KSampler",
                "exception_type": "torch.OutOfMemoryError", "exception_message": "CUDA out of memory"}}),
        );
        assert!(matches!(oom, Some(PromptEnd::Error { gpu: true, .. })), "{oom:?}");
        assert_eq!(
            ev(
                &mut t,
                json!({"type": "executing", "data": {"node": null, "prompt_id": "p1"}})
            ),
            Some(PromptEnd::Success)
        );
    }

    #[test]
    fn the_queue_lists_running_and_pending_prompts() {
        let q = json!({"queue_running": [[0, "a", {}, {}, []]], "queue_pending": [[1, "b", {}, {}, []]]});
        assert!(queue_lists(&q, "a"));
        assert!(queue_lists(&q, "b"));
        assert!(!queue_lists(&q, "c"));
        assert!(!queue_lists(&json!({}), "a"));
    }

    #[test]
    fn history_outcomes() {
        assert_eq!(history_outcome(&json!({"outputs": {}})), None);
        assert_eq!(
            history_outcome(&json!({"status": {"status_str": "success", "completed": true, "messages": []}})),
            Some(PromptEnd::Success)
        );
        let e = history_outcome(
            &json!({"status": {"status_str": "error", "completed": false, "messages": [
                ["execution_start", {}],
                ["execution_error", {"node_id": "3", "node_type": "KSampler", "exception_type": "ValueError", "exception_message": "bad"}]
            ]}}),
        );
        assert_eq!(
            e,
            Some(PromptEnd::Error {
                message: "node 3 (KSampler) raised ValueError: bad".into(),
                gpu: false
            })
        );
    }
}

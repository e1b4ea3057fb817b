//! What a ComfyUI server answers: a queued prompt (`{"prompt_id", "number", "node_errors"}`), a
//! refused graph (400 `{"error": {"type", "message", "details"}, "node_errors": {NODE: {"errors",
//! "class_type"}}}`), a history entry (`{ID: {"outputs", "status"}}`, or `{}`), a job of the
//! newer jobs API (`{"id", "status", "outputs", ...}`, 404 `{"error": "Job not found"}`), the
//! queue (`{"queue_running": [[number, id, ...]], "queue_pending": [...]}`) and its length
//! (`{"exec_info": {"queue_remaining"}}`).
//!
//! The traps: `/history/ID` answers `{}` both while the prompt waits or runs and when the server
//! never had it (or forgot it in a restart: history and queue live in memory), so "not done" and
//! "lost" are told apart only by the queue (or the jobs API); a graph error names its node only
//! in `node_errors`; a prompt that failed while running is an `error` entry whose
//! `execution_error` message says which node and why; and a server that already holds the
//! prompt's id waiting or running refuses it again with 409.

pub mod workflow;

use serde::Deserialize;
use serde::de::{IgnoredAny, SeqAccess, Visitor};
use serde_json::Value;

use crate::domain::error::{ErrorKind, Failure, ProviderDetail};
use crate::http::{billed_failure, by_status};

/// One image a finished prompt saved (to fetch from `/view`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ImageRef {
    pub filename: String,
    #[serde(default)]
    pub subfolder: String,
    #[serde(default, rename = "type")]
    pub kind: String,
}

/// Where a prompt is, by its history entry or its job.
#[derive(Debug, Clone, PartialEq)]
pub enum PromptState {
    /// Nothing about it: waiting, running, or never there (history alone cannot tell).
    Unknown,
    /// Waiting in the server's queue (the jobs API says so).
    Queued,
    /// Running (the jobs API says so).
    Running,
    /// Done: the images its output nodes saved, and the seconds it ran (when the server said).
    Done {
        images: Vec<ImageRef>,
        seconds: Option<f64>,
    },
    /// It failed while running.
    Failed(ExecutionError),
    /// Someone interrupted it.
    Interrupted,
}

/// Why a prompt failed while running.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ExecutionError {
    pub node_id: String,
    pub node_type: String,
    pub exception_type: String,
    pub message: String,
}

impl ExecutionError {
    /// Whether running it again may work: the GPU ran out of memory (other prompts held it).
    pub fn transient(&self) -> bool {
        let t = format!("{} {}", self.exception_type, self.message).to_lowercase();
        t.contains("outofmemory") || t.contains("out of memory")
    }
}

/// The answer to an accepted `POST /prompt`: the prompt's place in the queue.
pub fn read_queued(body: &[u8]) -> Result<u64, Failure> {
    #[derive(Deserialize)]
    struct Queued {
        #[serde(default)]
        number: Option<f64>,
    }
    let q: Queued = serde_json::from_slice(body).map_err(|e| {
        Failure::transient(format!(
            "the server's answer to the prompt could not be read: {e}"
        ))
    })?;
    Ok(q.number.map_or(0, |n| n.max(0.0) as u64))
}

/// Whether a refused submit says the server already holds the prompt's id (waiting or running):
/// 409, `duplicate_prompt_id` or "prompt_id already exists".
pub fn is_duplicate(status: u16, body: &[u8]) -> bool {
    status == 409 && {
        let text = String::from_utf8_lossy(&body[..body.len().min(4096)]);
        text.contains("duplicate_prompt_id") || text.contains("already exists")
    }
}

/// A refused `POST /prompt`. A graph error (400) is permanent and names its node and input:
/// running it again cannot work.
pub fn submit_failure(status: u16, body: &[u8]) -> Failure {
    let detail = Box::new(ProviderDetail {
        status: Some(status),
        ..ProviderDetail::default()
    });
    let value: Option<Value> = serde_json::from_slice(body).ok();
    let error = value.as_ref().and_then(|v| v.get("error"));
    let code = error
        .and_then(|e| e.get("type"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut message = match error {
        Some(Value::String(s)) => s.clone(),
        Some(e) => e
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or("the server refused the prompt")
            .to_string(),
        None => format!(
            "HTTP {status}: {}",
            String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
        ),
    };
    let nodes = value
        .as_ref()
        .and_then(|v| v.get("node_errors"))
        .map(node_errors)
        .unwrap_or_default();
    if !nodes.is_empty() {
        message = format!("{message}: {nodes}");
    } else if let Some(extra) = error
        .and_then(|e| e.get("details"))
        .and_then(Value::as_str)
        .filter(|d| !d.is_empty())
    {
        message = format!("{message} ({extra})");
    }
    let message: String = message.chars().take(1000).collect();
    if status == 400 {
        let mut detail = detail;
        detail.code = code;
        return Failure::Permanent {
            kind: ErrorKind::InvalidRequest,
            message,
            detail,
        };
    }
    let mut failure = by_status(status, message, None, None, detail);
    failure.detail_mut().code = code;
    failure
}

/// `node_errors` as text: `node 3 (KSampler): Required input is missing: seed; ...`.
fn node_errors(errors: &Value) -> String {
    let Some(nodes) = errors.as_object() else {
        return String::new();
    };
    nodes
        .iter()
        .map(|(id, node)| {
            let class = node
                .get("class_type")
                .and_then(Value::as_str)
                .unwrap_or("?");
            let what: Vec<String> = node
                .get("errors")
                .and_then(Value::as_array)
                .map(|errors| {
                    errors
                        .iter()
                        .map(|e| {
                            let message = e.get("message").and_then(Value::as_str).unwrap_or("");
                            match e.get("details").and_then(Value::as_str) {
                                Some(d) if !d.is_empty() => format!("{message}: {d}"),
                                _ => message.to_string(),
                            }
                        })
                        .collect()
                })
                .unwrap_or_default();
            format!("node {id} ({class}): {}", what.join(", "))
        })
        .collect::<Vec<_>>()
        .join("; ")
}

#[derive(Deserialize)]
struct Entry {
    #[serde(default)]
    outputs: serde_json::Map<String, Value>,
    #[serde(default)]
    status: Option<Status>,
}

#[derive(Deserialize)]
struct Status {
    #[serde(default)]
    status_str: Option<String>,
    #[serde(default)]
    messages: Vec<(String, Value)>,
}

/// Reads `GET /history/ID`: `{}` is [`PromptState::Unknown`]. `output_node`: only that node's
/// images (else every node's saved images, `type` `output`). An unreadable answer is a
/// transient failure (a history read buys nothing).
pub fn read_history(
    body: &[u8],
    prompt_id: &str,
    output_node: Option<&str>,
) -> Result<PromptState, Failure> {
    let mut all: serde_json::Map<String, Value> = serde_json::from_slice(body)
        .map_err(|e| Failure::transient(format!("the server's history could not be read: {e}")))?;
    let Some(entry) = all.remove(prompt_id) else {
        return Ok(PromptState::Unknown);
    };
    let entry: Entry = serde_json::from_value(entry).map_err(|e| {
        Failure::transient(format!("the prompt's history entry could not be read: {e}"))
    })?;
    let status = entry.status.unwrap_or(Status {
        status_str: None,
        messages: Vec::new(),
    });
    let seconds = run_seconds(&status.messages);
    if status.status_str.as_deref() == Some("error") {
        return Ok(failed(&status.messages));
    }
    Ok(PromptState::Done {
        images: saved_images(&entry.outputs, output_node),
        seconds,
    })
}

/// Reads `GET /api/jobs/ID` (200): `pending`, `in_progress`, `completed` (with `outputs`),
/// `failed` (with `execution_error`) or `cancelled`.
pub fn read_job(body: &[u8], output_node: Option<&str>) -> Result<PromptState, Failure> {
    #[derive(Deserialize)]
    struct Job {
        #[serde(default)]
        status: String,
        #[serde(default)]
        outputs: serde_json::Map<String, Value>,
        #[serde(default)]
        execution_start_time: Option<f64>,
        #[serde(default)]
        execution_end_time: Option<f64>,
        #[serde(default)]
        execution_error: Option<Value>,
    }
    let job: Job = serde_json::from_slice(body)
        .map_err(|e| Failure::transient(format!("the server's job could not be read: {e}")))?;
    Ok(match job.status.as_str() {
        "pending" => PromptState::Queued,
        "in_progress" => PromptState::Running,
        "completed" => PromptState::Done {
            images: saved_images(&job.outputs, output_node),
            seconds: match (job.execution_start_time, job.execution_end_time) {
                (Some(start), Some(end)) if end >= start => Some((end - start) / 1000.0),
                _ => None,
            },
        },
        "failed" => {
            PromptState::Failed(job.execution_error.map(execution_error).unwrap_or_default())
        }
        "cancelled" => PromptState::Interrupted,
        other => {
            return Err(Failure::transient(format!(
                "the server's job has a status this worker does not know: {other:?}"
            )));
        }
    })
}

/// Whether a 404 of `GET /api/jobs/ID` is the jobs API saying it has no such job (JSON
/// `{"error": ...}`), rather than a server without the jobs API (a plain 404 page).
pub fn is_unknown_job(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body)
        .ok()
        .is_some_and(|v| v.get("error").is_some())
}

fn saved_images(outputs: &serde_json::Map<String, Value>, only: Option<&str>) -> Vec<ImageRef> {
    outputs
        .iter()
        .filter(|(node, _)| only.is_none_or(|o| o == node.as_str()))
        .filter_map(|(_, output)| output.get("images"))
        .filter_map(|images| serde_json::from_value::<Vec<ImageRef>>(images.clone()).ok())
        .flatten()
        .filter(|i| only.is_some() || i.kind.is_empty() || i.kind == "output")
        .collect()
}

/// Seconds from `execution_start` to `execution_success`, by their timestamps (ms).
fn run_seconds(messages: &[(String, Value)]) -> Option<f64> {
    let at = |event: &str| {
        messages
            .iter()
            .find(|(name, _)| name == event)
            .and_then(|(_, data)| data.get("timestamp"))
            .and_then(Value::as_f64)
    };
    match (at("execution_start"), at("execution_success")) {
        (Some(start), Some(end)) if end >= start => Some((end - start) / 1000.0),
        _ => None,
    }
}

fn failed(messages: &[(String, Value)]) -> PromptState {
    if messages.iter().any(|(n, _)| n == "execution_interrupted") {
        return PromptState::Interrupted;
    }
    let error = messages
        .iter()
        .find(|(n, _)| n == "execution_error")
        .map(|(_, data)| execution_error(data.clone()))
        .unwrap_or_default();
    PromptState::Failed(error)
}

fn execution_error(data: Value) -> ExecutionError {
    let text = |key: &str| {
        data.get(key)
            .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
            .unwrap_or_default()
    };
    ExecutionError {
        node_id: text("node_id"),
        node_type: text("node_type"),
        exception_type: text("exception_type"),
        message: text("exception_message").chars().take(1000).collect(),
    }
}

/// Where the queue (`GET /queue`) has a prompt: running, waiting, or not at all. Only the ids
/// are read; each item's graph is skipped.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum InQueue {
    Running,
    Waiting,
    Absent,
}

/// Reads `GET /queue` for one prompt's place.
pub fn queue_place(body: &[u8], prompt_id: &str) -> Result<InQueue, Failure> {
    #[derive(Deserialize)]
    struct Queue {
        #[serde(default)]
        queue_running: Vec<Item>,
        #[serde(default)]
        queue_pending: Vec<Item>,
    }
    let q: Queue = serde_json::from_slice(body)
        .map_err(|e| Failure::transient(format!("the server's queue could not be read: {e}")))?;
    Ok(if q.queue_running.iter().any(|i| i.0 == prompt_id) {
        InQueue::Running
    } else if q.queue_pending.iter().any(|i| i.0 == prompt_id) {
        InQueue::Waiting
    } else {
        InQueue::Absent
    })
}

/// A queue item, `[number, prompt_id, prompt, extra_data, outputs]`: its id only.
struct Item(String);

impl<'de> Deserialize<'de> for Item {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Item;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a queue item [number, prompt_id, ...]")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Item, A::Error> {
                let _number: Option<IgnoredAny> = seq.next_element()?;
                let id: Option<String> = seq.next_element()?;
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Item(id.unwrap_or_default()))
            }
        }
        d.deserialize_seq(V)
    }
}

/// Reads `GET /prompt`: the prompts waiting or running.
pub fn queue_remaining(body: &[u8]) -> Result<u64, Failure> {
    let v: Value = serde_json::from_slice(body).map_err(|e| {
        Failure::transient(format!("the server's queue length could not be read: {e}"))
    })?;
    v.pointer("/exec_info/queue_remaining")
        .and_then(Value::as_u64)
        .ok_or_else(|| Failure::transient("the server's answer has no exec_info.queue_remaining"))
}

/// A prompt that failed while running: an out-of-memory is worth a new run (another prompt
/// held the GPU); any other error is permanent and names the node. Either was run, so charged.
pub fn execution_failure(error: &ExecutionError, prompt_id: &str) -> Failure {
    let message = format!(
        "the prompt failed at node {} ({}): {}{}",
        if error.node_id.is_empty() {
            "?"
        } else {
            &error.node_id
        },
        if error.node_type.is_empty() {
            "?"
        } else {
            &error.node_type
        },
        if error.exception_type.is_empty() {
            String::new()
        } else {
            format!("{}: ", error.exception_type)
        },
        error.message
    );
    let detail = ProviderDetail {
        request_id: Some(prompt_id.to_string()),
        code: Some("execution_error".into()),
        charged: true,
        ..ProviderDetail::default()
    };
    if error.transient() {
        let mut f = billed_failure(message);
        *f.detail_mut() = detail;
        return f;
    }
    Failure::Permanent {
        kind: ErrorKind::InvalidRequest,
        message,
        detail: Box::new(detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_graph_error_is_permanent_and_names_its_node() {
        let body = br#"{"error":{"type":"prompt_outputs_failed_validation","message":"Prompt outputs failed validation","details":"","extra_info":{}},
            "node_errors":{"3":{"errors":[{"type":"required_input_missing","message":"Required input is missing","details":"seed","extra_info":{"input_name":"seed"}}],"dependent_outputs":["9"],"class_type":"KSampler"}}}"#;
        let f = submit_failure(400, body);
        assert_eq!(f.kind(), Some(ErrorKind::InvalidRequest));
        assert!(
            f.message()
                .contains("node 3 (KSampler): Required input is missing: seed"),
            "{f}"
        );
        assert_eq!(
            f.detail().code.as_deref(),
            Some("prompt_outputs_failed_validation")
        );
        assert!(submit_failure(503, b"busy").is_retryable());
        assert!(is_duplicate(
            409,
            br#"{"error":{"type":"duplicate_prompt_id","message":"x"},"node_errors":{}}"#
        ));
        assert!(is_duplicate(
            409,
            br#"{"error": "prompt_id already exists"}"#
        ));
        assert!(!is_duplicate(
            400,
            br#"{"error": "prompt_id already exists"}"#
        ));
    }

    #[test]
    fn history_tells_done_failed_and_nothing() {
        assert_eq!(
            read_history(b"{}", "p", None).unwrap(),
            PromptState::Unknown
        );
        let done = br#"{"p":{"prompt":[1,"p",{},{},["9"]],
            "outputs":{"9":{"images":[{"filename":"a_00001_.png","subfolder":"x","type":"output"}]},
                       "10":{"images":[{"filename":"t.png","subfolder":"","type":"temp"}]}},
            "status":{"status_str":"success","completed":true,"messages":[
                ["execution_start",{"prompt_id":"p","timestamp":1000}],
                ["execution_success",{"prompt_id":"p","timestamp":3500}]]}}}"#;
        let PromptState::Done { images, seconds } = read_history(done, "p", None).unwrap() else {
            panic!()
        };
        assert_eq!(images.len(), 1, "previews are not outputs");
        assert_eq!(images[0].filename, "a_00001_.png");
        assert_eq!(seconds, Some(2.5));
        let error = br#"{"p":{"outputs":{},"status":{"status_str":"error","completed":false,"messages":[
            ["execution_error",{"prompt_id":"p","node_id":"3","node_type":"KSampler","exception_type":"torch.OutOfMemoryError","exception_message":"CUDA out of memory"}]]}}}"#;
        let PromptState::Failed(e) = read_history(error, "p", None).unwrap() else {
            panic!()
        };
        assert!(e.transient());
        assert!(execution_failure(&e, "p").is_retryable());
        let bad = ExecutionError {
            node_id: "4".into(),
            node_type: "CheckpointLoaderSimple".into(),
            exception_type: "FileNotFoundError".into(),
            message: "no such file".into(),
        };
        let f = execution_failure(&bad, "p");
        assert!(
            f.message().contains("node 4 (CheckpointLoaderSimple)"),
            "{f}"
        );
        assert!(f.detail().charged);
        assert!(read_history(b"[", "p", None).is_err());
    }

    #[test]
    fn the_queue_is_read_for_ids_only() {
        let q = br#"{"queue_running":[[3,"a",{"1":{}},{"client_id":"c"},["9"]]],
                    "queue_pending":[[4,"b",{},{},["9"]],[5,"c",{},{},["9"],{"x":1}]]}"#;
        assert_eq!(queue_place(q, "a").unwrap(), InQueue::Running);
        assert_eq!(queue_place(q, "c").unwrap(), InQueue::Waiting);
        assert_eq!(queue_place(q, "z").unwrap(), InQueue::Absent);
        assert_eq!(
            queue_remaining(br#"{"exec_info":{"queue_remaining":7}}"#).unwrap(),
            7
        );
    }

    #[test]
    fn jobs_are_read_by_status() {
        assert_eq!(
            read_job(br#"{"id":"p","status":"pending"}"#, None).unwrap(),
            PromptState::Queued
        );
        let done = br#"{"id":"p","status":"completed","execution_start_time":1000,"execution_end_time":2000,
            "outputs":{"9":{"images":[{"filename":"a.png","subfolder":"","type":"output"}]}}}"#;
        assert!(matches!(
            read_job(done, Some("9")).unwrap(),
            PromptState::Done {
                seconds: Some(1.0),
                ..
            }
        ));
        assert!(is_unknown_job(br#"{"error":"Job not found"}"#));
        assert!(!is_unknown_job(b"404: Not Found"));
    }
}

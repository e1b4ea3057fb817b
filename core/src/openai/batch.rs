//! What the OpenAI Batch API answers: its batch objects (`/v1/batches`), the files it keeps
//! (`/v1/files`), and the lines of a batch's output and error files.
//!
//! A line of an output file holds one request's answer, exactly as the live endpoint would have
//! given it (`response.body`: for images, megabytes of base64), so a line is read without a
//! tree of it: the body stays raw, borrowed from the line, and is decoded by the live answer's
//! own reader.

use std::borrow::Cow;

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// What a batch says of itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchObject {
    pub id: String,
    pub status: String,
    #[serde(default)]
    pub endpoint: String,
    #[serde(default)]
    pub input_file_id: String,
    #[serde(default)]
    pub output_file_id: Option<String>,
    #[serde(default)]
    pub error_file_id: Option<String>,
    /// Unix seconds.
    #[serde(default)]
    pub created_at: i64,
    #[serde(default)]
    pub request_counts: Option<RequestCounts>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    /// Why the batch failed (its input file did not validate), as the API lists it.
    #[serde(default)]
    pub errors: Option<Value>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    #[serde(default)]
    pub total: u64,
    #[serde(default)]
    pub completed: u64,
    #[serde(default)]
    pub failed: u64,
}

/// Where a batch stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchState {
    /// `validating`, `in_progress`, `finalizing`, `cancelling`: look again later.
    Running,
    /// Every request ran: the output (and error) file holds every line.
    Completed,
    /// The input file did not validate: nothing ran, nothing was billed.
    Failed,
    /// The window passed: the lines that ran are in the output file, the rest did not run.
    Expired,
    /// Cancelled: likewise.
    Cancelled,
}

impl BatchObject {
    pub fn state(&self) -> BatchState {
        match self.status.as_str() {
            "completed" => BatchState::Completed,
            "failed" => BatchState::Failed,
            "expired" => BatchState::Expired,
            "cancelled" => BatchState::Cancelled,
            _ => BatchState::Running,
        }
    }

    /// A metadata value.
    pub fn meta(&self, key: &str) -> Option<&str> {
        self.metadata.as_ref()?.get(key)?.as_str()
    }

    /// The first reason the API gives for a failed batch.
    pub fn first_error(&self) -> Option<String> {
        let first = self.errors.as_ref()?.get("data")?.as_array()?.first()?;
        let code = first.get("code").and_then(Value::as_str).unwrap_or("");
        let message = first.get("message").and_then(Value::as_str).unwrap_or("");
        Some(format!("{code}: {message}"))
    }
}

/// A page of `GET /v1/batches` (newest first).
#[derive(Debug, Clone, Deserialize)]
pub struct BatchList {
    pub data: Vec<BatchObject>,
    #[serde(default)]
    pub has_more: bool,
    #[serde(default)]
    pub last_id: Option<String>,
}

/// A file the API keeps (`POST /v1/files` answers one).
#[derive(Debug, Clone, Deserialize)]
pub struct FileObject {
    pub id: String,
    #[serde(default)]
    pub bytes: u64,
}

/// One line of an output or error file.
#[derive(Debug, Deserialize)]
pub struct OutputLine<'a> {
    #[serde(borrow)]
    pub custom_id: Cow<'a, str>,
    #[serde(default, borrow)]
    pub response: Option<LineResponse<'a>>,
    #[serde(default)]
    pub error: Option<LineError>,
}

/// The answer a request got, as the live endpoint gives it.
#[derive(Debug, Deserialize)]
pub struct LineResponse<'a> {
    pub status_code: u16,
    #[serde(default)]
    pub request_id: Option<String>,
    /// The answer's body, as written in the line.
    #[serde(borrow)]
    pub body: &'a RawValue,
}

/// Why a request got no answer (the batch expired or was cancelled before it ran, ...).
#[derive(Debug, Clone, Deserialize)]
pub struct LineError {
    #[serde(default)]
    pub code: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
}

/// What a line says of its request.
#[derive(Debug)]
pub enum LineOutcome<'a> {
    /// The request was answered (a 2xx with images, or an error the live endpoint would give).
    Answered {
        status: u16,
        request_id: Option<String>,
        body: &'a [u8],
    },
    /// It never ran: the batch expired or was cancelled first. Not billed.
    NotRun { code: String },
    /// It got no answer for another reason.
    Error { code: String, message: String },
}

/// Codes of lines whose request never ran.
const NOT_RUN: &[&str] = &["batch_expired", "batch_cancelled"];

impl<'a> OutputLine<'a> {
    /// Reads one line (without its newline).
    pub fn parse(line: &'a [u8]) -> Result<Self, String> {
        serde_json::from_slice(line).map_err(|e| format!("not a batch output line: {e}"))
    }

    pub fn outcome(&self) -> LineOutcome<'a> {
        if let Some(r) = &self.response {
            return LineOutcome::Answered {
                status: r.status_code,
                request_id: r.request_id.clone(),
                body: r.body.get().as_bytes(),
            };
        }
        let (code, message) = self
            .error
            .as_ref()
            .map(|e| {
                (
                    e.code.clone().unwrap_or_default(),
                    e.message.clone().unwrap_or_default(),
                )
            })
            .unwrap_or_default();
        if NOT_RUN.contains(&code.as_str()) {
            LineOutcome::NotRun { code }
        } else {
            LineOutcome::Error { code, message }
        }
    }
}

/// A job's `custom_id` in a batch: `{batch}/{job}` (job ids are unique only within a batch, and
/// a `custom_id` given twice fails a whole file). `_` stands for no batch.
pub fn custom_id(batch: Option<&str>, job: &str) -> String {
    format!("{}/{job}", batch.unwrap_or(crate::domain::keys::NO_BATCH))
}

/// `(batch, job)` of a `custom_id`.
pub fn parse_custom_id(id: &str) -> Option<(Option<&str>, &str)> {
    let (batch, job) = id.split_once('/')?;
    let valid = crate::domain::job::is_valid_name;
    if !valid(batch) || !valid(job) {
        return None;
    }
    Some((
        (batch != crate::domain::keys::NO_BATCH).then_some(batch),
        job,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_answered_line_keeps_its_body_raw() {
        let line = br#"{"id":"batch_req_1","custom_id":"b/j1","response":{"status_code":200,"request_id":"req_1","body":{"created":1,"data":[{"b64_json":"iVBORw=="}]}},"error":null}"#;
        let parsed = OutputLine::parse(line).unwrap();
        assert_eq!(parsed.custom_id, "b/j1");
        match parsed.outcome() {
            LineOutcome::Answered {
                status,
                request_id,
                body,
            } => {
                assert_eq!(status, 200);
                assert_eq!(request_id.as_deref(), Some("req_1"));
                assert_eq!(body, br#"{"created":1,"data":[{"b64_json":"iVBORw=="}]}"#);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn expired_lines_did_not_run_and_other_errors_say_why() {
        let line = br#"{"id":"x","custom_id":"_/j","response":null,"error":{"code":"batch_expired","message":"This request could not be executed before the completion window expired."}}"#;
        assert!(matches!(
            OutputLine::parse(line).unwrap().outcome(),
            LineOutcome::NotRun { code } if code == "batch_expired"
        ));
        let line = br#"{"id":"x","custom_id":"_/j","response":null,"error":{"code":"server_error","message":"boom"}}"#;
        assert!(matches!(
            OutputLine::parse(line).unwrap().outcome(),
            LineOutcome::Error { code, .. } if code == "server_error"
        ));
        assert!(OutputLine::parse(b"{\"custom_id\": 3}").is_err());
    }

    #[test]
    fn custom_ids_round_trip_and_refuse_what_no_job_has() {
        assert_eq!(custom_id(Some("b"), "j"), "b/j");
        assert_eq!(parse_custom_id("b/j"), Some((Some("b"), "j")));
        assert_eq!(parse_custom_id(&custom_id(None, "j")), Some((None, "j")));
        for bad in ["j", "b/../x", "../j", "b/j/k", "/j"] {
            assert_eq!(parse_custom_id(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_batch_says_where_it_stands() {
        let b: BatchObject = serde_json::from_value(serde_json::json!({
            "id": "batch_1", "status": "failed", "input_file_id": "file-1", "created_at": 5,
            "metadata": {"imagegen_file": "f1"},
            "errors": {"object": "list", "data": [{"code": "duplicate_custom_id", "message": "twice", "line": 2}]}
        }))
        .unwrap();
        assert_eq!(b.state(), BatchState::Failed);
        assert_eq!(b.meta("imagegen_file"), Some("f1"));
        assert_eq!(
            b.first_error().as_deref(),
            Some("duplicate_custom_id: twice")
        );
    }
}

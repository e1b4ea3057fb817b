//! The Batch API (`/v1/batches`) for the image endpoints, on a short clock.
//!
//! What the provider documents (API reference "Batch", the Batch guide, and the OpenAPI spec's
//! `Batch`, `BatchError`, `BatchRequestCounts`, `BatchRequestOutput` schemas):
//!
//! - `POST /v1/batches` `{input_file_id, endpoint, completion_window: "24h", metadata?,
//!   output_expires_after?}` answers the Batch object, `status: "validating"`. The input file must
//!   have purpose `batch`: JSONL, up to 50,000 lines and 200 MB, each line `{"custom_id",
//!   "method": "POST", "url": <the batch's endpoint>, "body": {...}}` with a `custom_id` unique
//!   in the file and one model for all lines. `metadata`: at most 16 pairs, keys up to 64
//!   characters, values strings up to 512.
//! - The batch goes `validating` -> `in_progress` -> `finalizing` -> `completed`; or `failed`
//!   (the file did not validate: `errors: {"object": "list", "data": [{code, message, param,
//!   line}]}`, nothing runs); or `expired` (not done within the window: finished lines are in the
//!   output file and billed, unfinished ones are cancelled and written to the error file as
//!   `{"id", "custom_id", "response": null, "error": {"code": "batch_expired", "message": "This
//!   request could not be executed before the completion window expired."}}`, not billed); or
//!   `cancelling` -> `cancelled` (`POST /v1/batches/{id}/cancel`: in-flight lines finish, the
//!   output file has the partial results, the rest is `batch_cancelled`).
//! - `GET /v1/batches/{id}`; `GET /v1/batches?limit=20&after=ID` (newest first, `limit` 1..=100,
//!   `{"object": "list", "data", "first_id", "last_id", "has_more"}`).
//! - Output lines (one per successful request; order not guaranteed): `{"id": "batch_req_...",
//!   "custom_id", "response": {"status_code": 200, "request_id": "req_...", "body": <the live
//!   endpoint's JSON answer>}, "error": null}`. Failed requests go to the error file, with the
//!   live endpoint's status and error body in `response`. Both are files of purpose
//!   `batch_output` (see [`super::files`]).
//! - Batch lines have their own rate-limit pool: they do not touch the account's live limits.
//!
//! The fake runs each line as the live endpoint would answer it: the same validation, the same
//! [`super::Rule`]s (taken by the line's prompt, in line order), the same body. A line that
//! succeeds is billed like a live call (`billed_for(prompt)`), and counted in [`BatchStats`].
//! Output files are never held: each line keeps what regenerates it (its ids, the call's
//! sequence number, the head of its prompt, the answer's small fields), and a download renders
//! the lines one at a time, identical at every download, with a `content-length` computed up
//! front. A file of 2,000 lines of 500 KB images is 1.4 GB and costs the fake a few MB.
//!
//! Where the fake differs from the provider:
//! - Time is scaled by [`BatchOptions`]: "24h" is `window` (a minute by default), lines take
//!   `per_line` each, `parallel` at a time, in input order; output lines come in input order.
//!   `expires_at` is `created_at` plus the scaled window. Timestamps are real Unix seconds.
//! - Only `/v1/images/generations` and `/v1/images/edits` are served (the provider also takes
//!   `/v1/responses`, `/v1/chat/completions`, `/v1/embeddings`, `/v1/completions`,
//!   `/v1/moderations` and `/v1/videos`; the fake refuses them with a 400).
//! - `request_counts.failed` counts every line of the error file, including the lines that never
//!   ran (`batch_expired`, `batch_cancelled`) once the batch has ended.
//! - The validation error codes `duplicate_custom_id`, `invalid_json_line`, `invalid_url`,
//!   `mismatched_model`, `too_many_requests`, `empty_file` and the wording of the messages are the
//!   fake's best guess (the provider does not document them); at most 100 are listed.
//! - A line whose [`Fault::Reset`] would drop a live connection has no response: `{"response":
//!   null, "error": {"code": "request_timeout", ...}}` (a documented code), not billed.
//! - JSON edits (`images: [{"file_id"} | {"image_url"}]`, `mask`) take files of purpose `vision`
//!   or `user_data`; an `http(s)` `image_url` is accepted unread (there is no network), a data URL
//!   is decoded and checked like an upload.
//! - On demand ([`FakeApi::fail_next_batches`], [`FakeApi::expire_next_batches`],
//!   [`FakeApi::hold_batches`]) batches fail at validation (`token_limit_exceeded`, as an
//!   organization over its enqueued-token limit sees), expire after half their lines, or stay
//!   in `validating` until released.

use std::collections::{HashSet, VecDeque};
use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::Stream;
use serde_json::{Map, Value, json};

use super::edits::{EditSeen, check_files};
use super::errors::ApiError;
use super::files::{self, Content, StoredFile, THIRTY_DAYS, now};
use super::generate::{answer_meta, image_text};
use super::validate::{GenRequest, validate};
use super::{FakeApi, Fault, lock};
use crate::digest;
use crate::png::PngTemplate;

/// The endpoints the fake runs batches for.
pub const GENERATIONS: &str = "/v1/images/generations";
pub const EDITS: &str = "/v1/images/edits";

/// Every endpoint the provider takes batches for.
const PROVIDER_ENDPOINTS: [&str; 8] = [
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    GENERATIONS,
    EDITS,
    "/v1/videos",
];

/// Most lines an input file may have.
pub const MAX_LINES: usize = 50_000;
/// Largest batch input file: 200 MB.
pub const MAX_INPUT_FILE_BYTES: u64 = 200 * 1024 * 1024;
/// Most validation errors listed in a failed batch.
const MAX_ERRORS: usize = 100;
/// How often a waiting batch looks at its flags (cancel, hold).
const TICK: Duration = Duration::from_millis(5);
/// The head of a prompt a line keeps: more than an image's text keeps of it.
const PROMPT_KEPT: usize = 256;

const EXPIRED: (&str, &str) = (
    "batch_expired",
    "This request could not be executed before the completion window expired.",
);
const CANCELLED: (&str, &str) = (
    "batch_cancelled",
    "This request was not executed because the batch was cancelled.",
);
const TIMED_OUT: (&str, &str) = (
    "request_timeout",
    "The underlying call to the model timed out.",
);

/// The batch clock and limits. Defaults are fast: a small batch completes in well under a second.
#[derive(Clone, Debug)]
pub struct BatchOptions {
    /// How long a batch stays in `validating` (longer while [`FakeApi::hold_batches`] holds).
    pub validating: Duration,
    /// The simulated work of one line.
    pub per_line: Duration,
    /// How many lines run at a time (each wave takes `per_line`, plus any [`Fault::Hang`]).
    pub parallel: usize,
    /// How long a batch stays in `finalizing` before `completed`.
    pub finalizing: Duration,
    /// How long a batch stays in `cancelling` (after its in-flight lines) before `cancelled`.
    pub cancelling: Duration,
    /// What the "24h" completion window maps to, counted from creation: a batch not done by
    /// then expires.
    pub window: Duration,
    /// The largest batch input file accepted at upload (200 MB).
    pub max_input_file_bytes: u64,
    /// Most lines in an input file (50,000); more fails the batch at validation.
    pub max_lines: usize,
}

impl Default for BatchOptions {
    fn default() -> Self {
        Self {
            validating: Duration::from_millis(20),
            per_line: Duration::from_millis(2),
            parallel: 8,
            finalizing: Duration::from_millis(20),
            cancelling: Duration::from_millis(20),
            window: Duration::from_secs(60),
            max_input_file_bytes: MAX_INPUT_FILE_BYTES,
            max_lines: MAX_LINES,
        }
    }
}

/// Files and batches since the fake was created: what a test reads to prove that nothing was
/// paid for twice (billed batch lines are also in the per-prompt counts, `billed_for`).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct BatchStats {
    /// Successful `POST /v1/files`.
    pub files_uploaded: u64,
    /// Successful `DELETE /v1/files/{id}`.
    pub files_deleted: u64,
    /// Successful `POST /v1/batches`.
    pub batches_created: u64,
    pub batches_completed: u64,
    /// Batches that failed validation.
    pub batches_failed: u64,
    pub batches_cancelled: u64,
    pub batches_expired: u64,
    /// Lines answered 200: billed, as many live calls would be.
    pub lines_billed: u64,
    /// Lines that ran and got an error answer (or no answer): not billed.
    pub lines_failed: u64,
    /// Lines that never ran (`batch_expired`, `batch_cancelled`): not billed.
    pub lines_not_run: u64,
    /// Images in billed lines.
    pub images: u64,
    /// Bytes of batch output and error files sent to clients.
    pub output_bytes_served: u64,
}

/// How batches behave now: the options and the on-demand misbehaviours.
#[derive(Default)]
pub(super) struct Control {
    options: std::sync::Mutex<BatchOptions>,
    hold: AtomicBool,
    fail_next: AtomicU64,
    expire_next: AtomicU64,
}

impl Control {
    pub(super) fn new(options: BatchOptions) -> Self {
        Self {
            options: std::sync::Mutex::new(options),
            ..Self::default()
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Validating => "validating",
            Status::Failed => "failed",
            Status::InProgress => "in_progress",
            Status::Finalizing => "finalizing",
            Status::Completed => "completed",
            Status::Expired => "expired",
            Status::Cancelling => "cancelling",
            Status::Cancelled => "cancelled",
        }
    }
}

/// Batches in creation order.
#[derive(Default)]
pub(super) struct BatchStore {
    batches: Vec<BatchState>,
}

impl BatchStore {
    fn get_mut(&mut self, id: &str) -> Option<&mut BatchState> {
        self.batches.iter_mut().find(|b| b.id == id)
    }

    fn get(&self, id: &str) -> Option<&BatchState> {
        self.batches.iter().find(|b| b.id == id)
    }
}

struct BatchState {
    id: String,
    endpoint: &'static str,
    input_file_id: String,
    metadata: Option<Map<String, Value>>,
    model: Option<String>,
    status: Status,
    errors: Vec<Value>,
    output_file_id: Option<String>,
    error_file_id: Option<String>,
    created_at: u64,
    expires_at: u64,
    in_progress_at: Option<u64>,
    finalizing_at: Option<u64>,
    completed_at: Option<u64>,
    failed_at: Option<u64>,
    expired_at: Option<u64>,
    cancelling_at: Option<u64>,
    cancelled_at: Option<u64>,
    total: u64,
    completed: u64,
    failed: u64,
    input_tokens: u64,
    output_tokens: u64,
}

impl BatchState {
    /// The Batch object.
    fn object(&self) -> Value {
        let errors = if self.errors.is_empty() {
            Value::Null
        } else {
            json!({"object": "list", "data": self.errors})
        };
        let usage = self.in_progress_at.map(|_| {
            json!({
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            })
        });
        json!({
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": errors,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status.as_str(),
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "in_progress_at": self.in_progress_at,
            "expires_at": self.expires_at,
            "finalizing_at": self.finalizing_at,
            "completed_at": self.completed_at,
            "failed_at": self.failed_at,
            "expired_at": self.expired_at,
            "cancelling_at": self.cancelling_at,
            "cancelled_at": self.cancelled_at,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "usage": usage,
            "metadata": self.metadata,
        })
    }
}

/// What a batch's task needs, fixed at creation.
struct Job {
    id: String,
    endpoint: &'static str,
    input: Bytes,
    /// When the window closes.
    deadline: Instant,
    validating_until: Instant,
    fail: bool,
    expire_early: bool,
    /// The `Host` the batch was created through, for answers given by URL.
    host: Option<String>,
    /// `output_expires_after.seconds`.
    output_ttl: u64,
}

/// A line of the input file that validated.
#[derive(Debug)]
struct InputLine {
    custom_id: String,
    body: Value,
}

/// One line of a batch's results: enough to write it again, not the images.
pub(super) struct LineRecord {
    custom_id: String,
    /// `batch_req_...`.
    id: String,
    outcome: Outcome,
}

enum Outcome {
    /// 200 with base64 images, made again at each download from the call's sequence number and
    /// prompt.
    Images {
        request_id: String,
        seq: u64,
        n: u64,
        prompt_head: String,
        /// The answer's fields but `data` ([`answer_meta`]).
        meta: String,
    },
    /// 200 with a small body kept as it is (images by URL, or not an image).
    Literal { request_id: String, body: String },
    /// The live endpoint's error answer.
    Failed {
        request_id: String,
        status: u16,
        body: Value,
    },
    /// No answer: `response: null` and an `error`.
    NoResponse {
        code: &'static str,
        message: &'static str,
    },
}

/// What a line that ran costs, applied when its result is recorded.
struct Bill {
    prompt: String,
    images: u64,
    tokens: (u64, u64),
}

/// How a batch ends.
#[derive(Clone, Copy, PartialEq, Eq)]
enum End {
    Completed,
    Cancelled,
    Expired,
}

const SUCCESS_TAIL: &str = "},\"error\":null}\n";
const DATA_OPEN: &str = "{\"data\":[";
const IMAGE_OPEN: &str = "{\"b64_json\":\"";
const IMAGE_CLOSE: &str = "\"}";
const DATA_CLOSE: &str = "],";

impl LineRecord {
    fn succeeded(&self) -> bool {
        matches!(
            self.outcome,
            Outcome::Images { .. } | Outcome::Literal { .. }
        )
    }

    fn success_head(&self, request_id: &str) -> String {
        format!(
            "{{\"id\":\"{}\",\"custom_id\":{},\"response\":{{\"status_code\":200,\"request_id\":\"{request_id}\",\"body\":",
            self.id,
            Value::from(self.custom_id.as_str())
        )
    }

    /// The line as the output or error file has it, newline included.
    fn render(&self, png: &PngTemplate) -> String {
        match &self.outcome {
            Outcome::Images {
                request_id,
                seq,
                n,
                prompt_head,
                meta,
            } => {
                let head = self.success_head(request_id);
                let mut out = String::with_capacity(self.rendered_len(png));
                out.push_str(&head);
                out.push_str(DATA_OPEN);
                for i in 0..*n {
                    if i > 0 {
                        out.push(',');
                    }
                    out.push_str(IMAGE_OPEN);
                    png.write_b64(&image_text(*seq, i, prompt_head), &mut out);
                    out.push_str(IMAGE_CLOSE);
                }
                out.push_str(DATA_CLOSE);
                out.push_str(&meta[1..]);
                out.push_str(SUCCESS_TAIL);
                out
            }
            Outcome::Literal { request_id, body } => {
                format!("{}{body}{SUCCESS_TAIL}", self.success_head(request_id))
            }
            Outcome::Failed {
                request_id,
                status,
                body,
            } => format!(
                "{{\"id\":\"{}\",\"custom_id\":{},\"response\":{{\"status_code\":{status},\"request_id\":\"{request_id}\",\"body\":{body}}},\"error\":null}}\n",
                self.id,
                Value::from(self.custom_id.as_str())
            ),
            Outcome::NoResponse { code, message } => format!(
                "{{\"id\":\"{}\",\"custom_id\":{},\"response\":null,\"error\":{}}}\n",
                self.id,
                Value::from(self.custom_id.as_str()),
                json!({"code": code, "message": message})
            ),
        }
    }

    /// The length of [`Self::render`], without making the images.
    fn rendered_len(&self, png: &PngTemplate) -> usize {
        match &self.outcome {
            Outcome::Images {
                request_id,
                seq,
                n,
                prompt_head,
                meta,
            } => {
                let images: usize = (0..*n)
                    .map(|i| {
                        IMAGE_OPEN.len()
                            + png.b64_len(&image_text(*seq, i, prompt_head))
                            + IMAGE_CLOSE.len()
                    })
                    .sum();
                self.success_head(request_id).len()
                    + DATA_OPEN.len()
                    + images
                    + (*n as usize).saturating_sub(1)
                    + DATA_CLOSE.len()
                    + meta.len()
                    - 1
                    + SUCCESS_TAIL.len()
            }
            _ => self.render(png).len(),
        }
    }
}

/// A batch's output file (its successful lines) or error file (the others), made when read.
pub(super) struct OutputFile {
    lines: Arc<Vec<LineRecord>>,
    errors: bool,
}

impl OutputFile {
    fn includes(&self, line: &LineRecord) -> bool {
        line.succeeded() != self.errors
    }

    fn len(&self, png: &PngTemplate) -> u64 {
        self.lines
            .iter()
            .filter(|l| self.includes(l))
            .map(|l| l.rendered_len(png) as u64)
            .sum()
    }

    /// The file's lines, each made when the client is ready for it.
    pub(super) fn stream(
        self: Arc<Self>,
        api: FakeApi,
    ) -> impl Stream<Item = Result<Bytes, Infallible>> + Send + 'static {
        futures_util::stream::unfold((self, api, 0usize), |(file, api, mut next)| async move {
            while let Some(line) = file.lines.get(next) {
                next += 1;
                if file.includes(line) {
                    let text = line.render(&api.inner.png);
                    lock(&api.inner.counters).stats.batch.output_bytes_served += text.len() as u64;
                    return Some((Ok(Bytes::from(text)), (file, api, next)));
                }
            }
            None
        })
    }
}

fn new_hex_id(prefix: &str) -> String {
    format!("{prefix}{:032x}", fastrand::u128(..))
}

fn bad_request(
    param: Option<&str>,
    code: Option<&'static str>,
    message: impl Into<String>,
) -> ApiError {
    ApiError::request_error(StatusCode::BAD_REQUEST, param, code, message)
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn no_such_batch(id: &str) -> ApiError {
    ApiError::request_error(
        StatusCode::NOT_FOUND,
        Some("batch_id"),
        None,
        format!("No batch found with id '{id}'."),
    )
}

/// `metadata` as the provider checks it.
fn check_metadata(value: Option<&Value>) -> Result<Option<Map<String, Value>>, ApiError> {
    let map = match value {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(bad_request(
                Some("metadata"),
                Some("invalid_type"),
                format!(
                    "Invalid type for 'metadata': expected an object, but got {} instead.",
                    json_type(other)
                ),
            ));
        }
    };
    if map.len() > 16 {
        return Err(bad_request(
            Some("metadata"),
            Some("object_above_max_properties"),
            format!(
                "Invalid 'metadata': too many properties. Expected an object with at most 16 \
                 properties, but got an object with {} properties instead.",
                map.len()
            ),
        ));
    }
    for (key, value) in map {
        if key.chars().count() > 64 {
            return Err(bad_request(
                Some("metadata"),
                Some("string_above_max_length"),
                format!(
                    "Invalid 'metadata': string too long. Expected a key with maximum length 64, \
                     but got a key with length {} instead.",
                    key.chars().count()
                ),
            ));
        }
        let param = format!("metadata.{key}");
        match value {
            Value::String(s) if s.chars().count() > 512 => {
                return Err(bad_request(
                    Some(&param),
                    Some("string_above_max_length"),
                    format!(
                        "Invalid '{param}': string too long. Expected a string with maximum \
                         length 512, but got a string with length {} instead.",
                        s.chars().count()
                    ),
                ));
            }
            Value::String(_) => {}
            other => {
                return Err(bad_request(
                    Some(&param),
                    Some("invalid_type"),
                    format!(
                        "Invalid type for '{param}': expected a string, but got {} instead.",
                        json_type(other)
                    ),
                ));
            }
        }
    }
    Ok(Some(map.clone()))
}

/// `POST /v1/batches`.
pub(super) async fn create(
    State(api): State<FakeApi>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    match api.create_batch(&headers, &body) {
        Ok(object) => Json(object).into_response(),
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/batches/{id}`.
pub(super) async fn retrieve(
    State(api): State<FakeApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    match api.batch(&id) {
        Some(object) => Json(object).into_response(),
        None => no_such_batch(&id).into_response(),
    }
}

/// `POST /v1/batches/{id}/cancel`: a batch still validating or running goes to `cancelling`
/// (its task ends it); one already cancelling is answered as it is; any other is refused.
pub(super) async fn cancel(
    State(api): State<FakeApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    let mut store = lock(&api.inner.batches);
    let Some(batch) = store.get_mut(&id) else {
        return no_such_batch(&id).into_response();
    };
    match batch.status {
        Status::Validating | Status::InProgress => {
            batch.status = Status::Cancelling;
            batch.cancelling_at = Some(now());
        }
        Status::Cancelling => {}
        other => {
            return bad_request(
                None,
                None,
                format!("Cannot cancel a batch with status '{}'.", other.as_str()),
            )
            .into_response();
        }
    }
    Json(batch.object()).into_response()
}

#[derive(serde::Deserialize)]
pub(super) struct ListQuery {
    limit: Option<String>,
    after: Option<String>,
}

/// `GET /v1/batches`: newest first.
pub(super) async fn list(
    State(api): State<FakeApi>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    let limit = match files::parse_limit(q.limit.as_deref(), 20, 100) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let mut objects = api.batches();
    objects.reverse();
    Json(files::page(objects, q.after.as_deref(), limit)).into_response()
}

/// The input file's lines, or why the batch fails (`errors.data`).
fn parse_input(
    input: &[u8],
    endpoint: &str,
    max_lines: usize,
) -> Result<Vec<InputLine>, Vec<Value>> {
    let error = |code: &str, message: String, param: Option<&str>, line: Option<usize>| json!({"code": code, "message": message, "param": param, "line": line});
    let mut raw: Vec<&[u8]> = input.split(|&b| b == b'\n').collect();
    if raw.last().is_some_and(|l| l.is_empty()) {
        raw.pop();
    }
    if raw.is_empty() {
        return Err(vec![error(
            "empty_file",
            "The batch input file is empty.".into(),
            None,
            None,
        )]);
    }
    if raw.len() > max_lines {
        return Err(vec![error(
            "too_many_requests",
            format!(
                "The batch input file has {} requests; a batch can have at most {max_lines}.",
                raw.len()
            ),
            None,
            None,
        )]);
    }
    let mut errors = Vec::new();
    let mut lines = Vec::with_capacity(raw.len());
    let mut seen: HashSet<String> = HashSet::new();
    let mut model: Option<String> = None;
    for (i, text) in raw.iter().enumerate() {
        let n = Some(i + 1);
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let Ok(Value::Object(mut obj)) = serde_json::from_slice::<Value>(text) else {
            errors.push(error(
                "invalid_json_line",
                "This line is not parseable as valid JSON.".into(),
                None,
                n,
            ));
            continue;
        };
        let missing = |name: &str| {
            error(
                "missing_required_parameter",
                format!("Missing required parameter: '{name}'."),
                Some(name),
                n,
            )
        };
        let custom_id = match obj.get("custom_id") {
            None | Some(Value::Null) => {
                errors.push(missing("custom_id"));
                continue;
            }
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                errors.push(error(
                    "invalid_type",
                    format!(
                        "Invalid type for 'custom_id': expected a string, but got {} instead.",
                        json_type(other)
                    ),
                    Some("custom_id"),
                    n,
                ));
                continue;
            }
        };
        match obj.get("method") {
            None | Some(Value::Null) => {
                errors.push(missing("method"));
                continue;
            }
            Some(Value::String(m)) if m == "POST" => {}
            Some(other) => {
                errors.push(error(
                    "invalid_value",
                    format!("Invalid value: {other}. Supported values are: 'POST'."),
                    Some("method"),
                    n,
                ));
                continue;
            }
        }
        match obj.get("url") {
            None | Some(Value::Null) => {
                errors.push(missing("url"));
                continue;
            }
            Some(Value::String(u)) if u == endpoint => {}
            Some(_) => {
                errors.push(error(
                    "invalid_url",
                    "The URL provided for this request does not match the batch endpoint.".into(),
                    Some("url"),
                    n,
                ));
                continue;
            }
        }
        let body = match obj.remove("body") {
            None | Some(Value::Null) => {
                errors.push(missing("body"));
                continue;
            }
            Some(body @ Value::Object(_)) => body,
            Some(other) => {
                errors.push(error(
                    "invalid_type",
                    format!(
                        "Invalid type for 'body': expected an object, but got {} instead.",
                        json_type(&other)
                    ),
                    Some("body"),
                    n,
                ));
                continue;
            }
        };
        if !seen.insert(custom_id.clone()) {
            errors.push(error(
                "duplicate_custom_id",
                "The custom_id for this request is a duplicate of another request. The custom_id \
                 parameter must be unique for each request in a batch."
                    .into(),
                Some("custom_id"),
                n,
            ));
            continue;
        }
        let line_model = body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("gpt-image-2");
        match &model {
            None => model = Some(line_model.to_owned()),
            Some(m) if m == line_model => {}
            Some(m) => {
                errors.push(error(
                    "mismatched_model",
                    format!(
                        "The model '{line_model}' of this request differs from the model '{m}' of \
                         the other requests: a batch can only include requests to a single model."
                    ),
                    Some("body.model"),
                    n,
                ));
                continue;
            }
        }
        lines.push(InputLine { custom_id, body });
    }
    if errors.is_empty() {
        Ok(lines)
    } else {
        errors.truncate(MAX_ERRORS);
        Err(errors)
    }
}

/// An image of a JSON edit: its bytes when the fake can read them, and what identifies it.
fn image_ref(
    api: &FakeApi,
    value: &Value,
    param: &str,
) -> Result<(Option<Bytes>, String), ApiError> {
    let obj = value.as_object();
    let url = obj
        .and_then(|o| o.get("image_url"))
        .filter(|v| !v.is_null());
    let file_id = obj.and_then(|o| o.get("file_id")).filter(|v| !v.is_null());
    match (url, file_id) {
        (Some(Value::String(url)), None) => {
            if url.starts_with("http://") || url.starts_with("https://") {
                return Ok((None, digest(url.as_bytes())));
            }
            let input = json!({ "image_url": url });
            match crate::data_uri_images(&input) {
                Ok(mut found) if !found.is_empty() => {
                    let (_, bytes) = found.remove(0);
                    let id = digest(&bytes);
                    Ok((Some(Bytes::from(bytes)), id))
                }
                _ => Err(bad_request(
                    Some(&format!("{param}.image_url")),
                    Some("invalid_image_url"),
                    format!(
                        "Invalid '{param}.image_url': expected a URL or a base64-encoded data URL \
                         of an image."
                    ),
                )),
            }
        }
        (None, Some(Value::String(id))) => {
            let store = lock(&api.inner.uploads);
            let Some(file) = store.get(id) else {
                return Err(bad_request(
                    Some(&format!("{param}.file_id")),
                    Some("invalid_value"),
                    format!("No such File object: {id}"),
                ));
            };
            match (&file.content, file.purpose.as_str()) {
                (Content::Uploaded(bytes), "vision" | "user_data") => {
                    Ok((Some(bytes.clone()), digest(bytes)))
                }
                _ => Err(bad_request(
                    Some(&format!("{param}.file_id")),
                    Some("invalid_value"),
                    format!(
                        "Invalid file '{id}' for '{param}.file_id': it has purpose '{}', expected \
                         'vision' or 'user_data'.",
                        file.purpose
                    ),
                )),
            }
        }
        _ => Err(bad_request(
            Some(param),
            Some("invalid_value"),
            format!("Invalid '{param}': provide exactly one of 'image_url' or 'file_id'."),
        )),
    }
}

impl FakeApi {
    /// The batch options in force.
    pub fn batch_options(&self) -> BatchOptions {
        lock(&self.inner.batch_control.options).clone()
    }

    /// Sets the batch options from now on (the window of a batch is fixed when it is created).
    pub fn set_batch_options(&self, options: BatchOptions) {
        *lock(&self.inner.batch_control.options) = options;
    }

    /// Keeps every batch in `validating` (those created later too) until
    /// [`Self::release_batches`]: a test can cancel a batch before anything of it runs.
    pub fn hold_batches(&self) {
        self.inner.batch_control.hold.store(true, Ordering::Release);
    }

    /// Lets held batches go on (their validation ends at once if its time has passed).
    pub fn release_batches(&self) {
        self.inner
            .batch_control
            .hold
            .store(false, Ordering::Release);
    }

    /// The next `n` batches created fail at validation (`token_limit_exceeded`), running nothing.
    pub fn fail_next_batches(&self, n: u64) {
        self.inner
            .batch_control
            .fail_next
            .store(n, Ordering::Release);
    }

    /// The next `n` batches created expire once half their lines (rounded down) have run: the
    /// rest is `batch_expired`, unbilled.
    pub fn expire_next_batches(&self, n: u64) {
        self.inner
            .batch_control
            .expire_next
            .store(n, Ordering::Release);
    }

    pub fn batch_stats(&self) -> BatchStats {
        lock(&self.inner.counters).stats.batch.clone()
    }

    /// Every batch object, oldest first, as `GET /v1/batches/{id}` answers it.
    pub fn batches(&self) -> Vec<Value> {
        lock(&self.inner.batches)
            .batches
            .iter()
            .map(BatchState::object)
            .collect()
    }

    /// One batch object, as `GET /v1/batches/{id}` answers it.
    pub fn batch(&self, id: &str) -> Option<Value> {
        lock(&self.inner.batches).get(id).map(BatchState::object)
    }

    /// Every file object (uploads and batch outputs), oldest first.
    pub fn stored_files(&self) -> Vec<Value> {
        lock(&self.inner.uploads).objects()
    }

    fn take_one(counter: &AtomicU64) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Checks a create request and starts the batch's task.
    fn create_batch(&self, headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
        let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(body) else {
            return Err(ApiError::unparsable_body());
        };
        let text = |name: &str| match req.get(name) {
            None | Some(Value::Null) => Err(bad_request(
                Some(name),
                Some("missing_required_parameter"),
                format!("Missing required parameter: '{name}'."),
            )),
            Some(Value::String(s)) => Ok(s.clone()),
            Some(other) => Err(bad_request(
                Some(name),
                Some("invalid_type"),
                format!(
                    "Invalid type for '{name}': expected a string, but got {} instead.",
                    json_type(other)
                ),
            )),
        };
        let input_file_id = text("input_file_id")?;
        let endpoint = text("endpoint")?;
        let window = text("completion_window")?;
        let endpoint = match endpoint.as_str() {
            GENERATIONS => GENERATIONS,
            EDITS => EDITS,
            other if PROVIDER_ENDPOINTS.contains(&other) => {
                return Err(bad_request(
                    Some("endpoint"),
                    Some("invalid_value"),
                    format!(
                        "The fake serves batches for '{GENERATIONS}' and '{EDITS}' only, not \
                         '{other}'."
                    ),
                ));
            }
            other => {
                return Err(bad_request(
                    Some("endpoint"),
                    Some("invalid_value"),
                    format!(
                        "Invalid value: '{other}'. Supported values are: '{}'.",
                        PROVIDER_ENDPOINTS.join("', '")
                    ),
                ));
            }
        };
        if window != "24h" {
            return Err(bad_request(
                Some("completion_window"),
                Some("invalid_value"),
                format!("Invalid value: '{window}'. Supported values are: '24h'."),
            ));
        }
        let metadata = check_metadata(req.get("metadata"))?;
        let output_ttl = match req.get("output_expires_after") {
            None | Some(Value::Null) => THIRTY_DAYS,
            Some(v) => match (v.get("anchor"), v.get("seconds").and_then(Value::as_u64)) {
                (Some(a), Some(s)) if a == "created_at" && (3600..=THIRTY_DAYS).contains(&s) => s,
                _ => {
                    return Err(bad_request(
                        Some("output_expires_after"),
                        Some("invalid_value"),
                        "Invalid 'output_expires_after': expected {\"anchor\": \"created_at\", \
                         \"seconds\": 3600 to 2592000}.",
                    ));
                }
            },
        };
        let input = {
            let store = lock(&self.inner.uploads);
            let Some(file) = store.get(&input_file_id) else {
                return Err(ApiError::request_error(
                    StatusCode::NOT_FOUND,
                    Some("input_file_id"),
                    None,
                    format!("No such File object: {input_file_id}"),
                ));
            };
            match (&file.content, file.purpose.as_str()) {
                (Content::Uploaded(bytes), "batch") => bytes.clone(),
                _ => {
                    return Err(bad_request(
                        Some("input_file_id"),
                        Some("invalid_value"),
                        format!(
                            "The file '{input_file_id}' has purpose '{}': a batch's input file \
                             must be uploaded with purpose 'batch'.",
                            file.purpose
                        ),
                    ));
                }
            }
        };

        let opts = self.batch_options();
        let started = Instant::now();
        let created_at = now();
        let id = new_hex_id("batch_");
        let state = BatchState {
            id: id.clone(),
            endpoint,
            input_file_id,
            metadata,
            model: None,
            status: Status::Validating,
            errors: Vec::new(),
            output_file_id: None,
            error_file_id: None,
            created_at,
            expires_at: created_at + opts.window.as_secs_f64().ceil() as u64,
            in_progress_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            total: 0,
            completed: 0,
            failed: 0,
            input_tokens: 0,
            output_tokens: 0,
        };
        let object = state.object();
        lock(&self.inner.batches).batches.push(state);
        lock(&self.inner.counters).stats.batch.batches_created += 1;
        let control = &self.inner.batch_control;
        let job = Job {
            id,
            endpoint,
            input,
            deadline: started + opts.window,
            validating_until: started + opts.validating,
            fail: Self::take_one(&control.fail_next),
            expire_early: Self::take_one(&control.expire_next),
            host: headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_owned),
            output_ttl,
        };
        tokio::spawn(self.clone().run_batch(job));
        Ok(object)
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut BatchState)) {
        if let Some(batch) = lock(&self.inner.batches).get_mut(id) {
            f(batch);
        }
    }

    fn cancel_requested(&self, id: &str) -> bool {
        lock(&self.inner.batches)
            .get(id)
            .is_some_and(|b| b.status == Status::Cancelling)
    }

    /// A batch's life, from `validating` to its end.
    async fn run_batch(self, job: Job) {
        // Validating: until its time is up and no hold keeps it, unless cancelled or out of time.
        loop {
            if self.cancel_requested(&job.id) {
                return self
                    .finish(&job, Vec::new(), VecDeque::new(), End::Cancelled)
                    .await;
            }
            let now_i = Instant::now();
            if now_i >= job.deadline {
                return self
                    .finish(&job, Vec::new(), VecDeque::new(), End::Expired)
                    .await;
            }
            let held = self.inner.batch_control.hold.load(Ordering::Acquire);
            if !held && now_i >= job.validating_until {
                break;
            }
            let wait = if held {
                TICK
            } else {
                TICK.min(job.validating_until - now_i)
            };
            tokio::time::sleep(wait).await;
        }
        let max_lines = self.batch_options().max_lines;
        let parsed = if job.fail {
            Err(vec![json!({
                "code": "token_limit_exceeded",
                "message": "Enqueued token limit reached for gpt-image-2 in organization \
                            org-fake. Limit: 0 enqueued tokens. Please try submitting an equal or \
                            smaller batch once your ongoing batches have completed.",
                "param": null,
                "line": null,
            })])
        } else {
            parse_input(&job.input, job.endpoint, max_lines)
        };
        let lines = match parsed {
            Ok(lines) => lines,
            Err(errors) => {
                self.update(&job.id, |b| {
                    b.status = Status::Failed;
                    b.failed_at = Some(now());
                    b.errors = errors;
                });
                lock(&self.inner.counters).stats.batch.batches_failed += 1;
                return;
            }
        };
        let total = lines.len();
        let model = lines[0]
            .body
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("gpt-image-2")
            .to_owned();
        let mut cancelled_early = false;
        {
            let mut store = lock(&self.inner.batches);
            if let Some(b) = store.get_mut(&job.id) {
                // A cancel may have arrived since the last look.
                if b.status == Status::Cancelling {
                    cancelled_early = true;
                } else {
                    b.status = Status::InProgress;
                }
                b.in_progress_at = Some(now());
                b.total = total as u64;
                b.model = Some(model);
            }
        }
        let mut pending: VecDeque<InputLine> = lines.into();
        if cancelled_early {
            return self.finish(&job, Vec::new(), pending, End::Cancelled).await;
        }

        let expire_at = job.expire_early.then_some(total / 2);
        let mut done: Vec<LineRecord> = Vec::with_capacity(total);
        let end = loop {
            if pending.is_empty() {
                break End::Completed;
            }
            if self.cancel_requested(&job.id) {
                break End::Cancelled;
            }
            if Instant::now() >= job.deadline || expire_at == Some(done.len()) {
                break End::Expired;
            }
            let opts = self.batch_options();
            let mut take = opts.parallel.max(1).min(pending.len());
            if let Some(limit) = expire_at {
                take = take.min(limit - done.len());
            }
            let mut wave = Vec::with_capacity(take);
            let mut extra = Duration::ZERO;
            for line in pending.drain(..take) {
                let (record, bill, hang) = self.run_line(&job, line);
                extra = extra.max(hang);
                wave.push((record, bill));
            }
            // In flight: these lines finish (and are billed) whatever happens meanwhile.
            tokio::time::sleep(opts.per_line + extra).await;
            for (record, bill) in wave {
                self.record_line(&job.id, &record, bill);
                done.push(record);
            }
        };
        self.finish(&job, done, pending, end).await;
    }

    /// Runs one line as the live endpoint would answer it. Returns its record, what it costs if
    /// it succeeded, and how much longer than `per_line` it takes.
    fn run_line(&self, job: &Job, line: InputLine) -> (LineRecord, Option<Bill>, Duration) {
        let InputLine { custom_id, body } = line;
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let request_id = new_hex_id("req_");
        let record = |outcome| LineRecord {
            custom_id: custom_id.clone(),
            id: new_hex_id("batch_req_"),
            outcome,
        };
        let failed = |e: ApiError| Outcome::Failed {
            request_id: request_id.clone(),
            status: e.status.as_u16(),
            body: e.body(),
        };
        let prompt = body.get("prompt").and_then(Value::as_str);
        {
            let mut counters = lock(&self.inner.counters);
            if let Some(p) = prompt {
                counters.per_prompt.entry(p.to_owned()).or_default().0 += 1;
            }
        }
        // An edit's images are checked first, as the live endpoint reads its files first.
        let fields = if job.endpoint == EDITS {
            match self.json_edit(&body) {
                Ok(fields) => fields,
                Err(e) => return (record(failed(e)), None, Duration::ZERO),
            }
        } else {
            body.clone()
        };
        let mut hang = Duration::ZERO;
        let mut not_an_image = false;
        let result = match self.take_fault(prompt) {
            Some(Fault::Reset) => {
                let (code, message) = TIMED_OUT;
                return (record(Outcome::NoResponse { code, message }), None, hang);
            }
            Some(Fault::Hang { secs }) => {
                hang = Duration::try_from_secs_f64(secs).unwrap_or_default();
                validate(&fields)
            }
            Some(Fault::NotAnImage) => {
                not_an_image = true;
                validate(&fields)
            }
            Some(fault) => Err(ApiError::from_fault(&fault, &body, &request_id)),
            None => validate(&fields),
        };
        let req: GenRequest = match result {
            Ok(req) => req,
            Err(e) => return (record(failed(e)), None, hang),
        };
        let bill = Bill {
            prompt: req.prompt.clone(),
            images: req.n,
            tokens: req.usage_tokens(),
        };
        let outcome = if not_an_image || req.response_format.as_deref() == Some("url") {
            Outcome::Literal {
                body: self.success_body(&req, seq, job.host.as_deref(), not_an_image),
                request_id,
            }
        } else {
            Outcome::Images {
                meta: answer_meta(&req),
                prompt_head: req.prompt.chars().take(PROMPT_KEPT).collect(),
                n: req.n,
                seq,
                request_id,
            }
        };
        (record(outcome), Some(bill), hang)
    }

    /// A JSON edit's images, checked as an upload's would be and recorded as an edit; the fields
    /// left are validated like a generation's.
    fn json_edit(&self, body: &Value) -> Result<Value, ApiError> {
        let model = body.get("model").and_then(Value::as_str);
        if model.is_some_and(|m| m.starts_with("dall-e")) {
            return Err(bad_request(
                Some("model"),
                Some("invalid_value"),
                "JSON image edits support GPT image models only; use multipart/form-data for \
                 dall-e-2.",
            ));
        }
        let images = match body.get("images") {
            None | Some(Value::Null) => {
                return Err(bad_request(
                    Some("images"),
                    Some("missing_required_parameter"),
                    "Missing required parameter: 'images'.",
                ));
            }
            Some(Value::Array(a)) if a.is_empty() => {
                return Err(bad_request(
                    Some("images"),
                    Some("empty_array"),
                    "Invalid 'images': empty array. Expected an array with minimum length 1, but \
                     got an empty array instead.",
                ));
            }
            Some(Value::Array(a)) if a.len() > 16 => {
                return Err(bad_request(
                    Some("images"),
                    Some("array_above_max_length"),
                    format!(
                        "Invalid 'images': array too long. Expected an array with maximum length \
                         16, but got an array with length {} instead.",
                        a.len()
                    ),
                ));
            }
            Some(Value::Array(a)) => a,
            Some(other) => {
                return Err(bad_request(
                    Some("images"),
                    Some("invalid_type"),
                    format!(
                        "Invalid type for 'images': expected an array, but got {} instead.",
                        json_type(other)
                    ),
                ));
            }
        };
        let mut bytes = Vec::new();
        let mut seen = EditSeen {
            prompt: body
                .get("prompt")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned(),
            ..EditSeen::default()
        };
        for (i, image) in images.iter().enumerate() {
            let (data, id) = image_ref(self, image, &format!("images[{i}]"))?;
            bytes.extend(data);
            seen.images.push(id);
        }
        let mask = match body.get("mask") {
            None | Some(Value::Null) => None,
            Some(m) => {
                let (data, id) = image_ref(self, m, "mask")?;
                seen.mask = Some(id);
                data
            }
        };
        if !bytes.is_empty() {
            check_files(&bytes, mask.as_deref())?;
        }
        lock(&self.inner.edits).push(seen);
        let mut fields = body.clone();
        if let Some(obj) = fields.as_object_mut() {
            obj.remove("images");
            obj.remove("mask");
        }
        Ok(fields)
    }

    /// A line's result is in: its batch's counts and, if it succeeded, its bill.
    fn record_line(&self, id: &str, record: &LineRecord, bill: Option<Bill>) {
        let succeeded = record.succeeded();
        {
            let mut counters = lock(&self.inner.counters);
            match &bill {
                Some(bill) => {
                    counters.stats.batch.lines_billed += 1;
                    counters.stats.batch.images += bill.images;
                    let prompt = bill.prompt.clone();
                    counters.per_prompt.entry(prompt).or_default().1 += 1;
                }
                None => counters.stats.batch.lines_failed += 1,
            }
        }
        self.update(id, |b| {
            if succeeded {
                b.completed += 1;
            } else {
                b.failed += 1;
            }
            if let Some(bill) = &bill {
                b.input_tokens += bill.tokens.0;
                b.output_tokens += bill.tokens.1;
            }
        });
    }

    /// Ends a batch: the lines that did not run are written as such, the output and error files
    /// are made (those that have lines), and the batch takes its final status.
    async fn finish(
        &self,
        job: &Job,
        mut done: Vec<LineRecord>,
        pending: VecDeque<InputLine>,
        end: End,
    ) {
        let opts = self.batch_options();
        match end {
            End::Completed => {
                self.update(&job.id, |b| {
                    b.status = Status::Finalizing;
                    b.finalizing_at = Some(now());
                });
                tokio::time::sleep(opts.finalizing).await;
            }
            End::Cancelled => tokio::time::sleep(opts.cancelling).await,
            End::Expired => {}
        }
        let (code, message) = if end == End::Cancelled {
            CANCELLED
        } else {
            EXPIRED
        };
        let not_run = pending.len() as u64;
        done.extend(pending.into_iter().map(|line| LineRecord {
            custom_id: line.custom_id,
            id: new_hex_id("batch_req_"),
            outcome: Outcome::NoResponse { code, message },
        }));
        let lines = Arc::new(done);
        let succeeded = lines.iter().filter(|l| l.succeeded()).count() as u64;
        let failed = lines.len() as u64 - succeeded;
        let created_at = now();
        let make_file = |errors: bool, count: u64| {
            if count == 0 {
                return None;
            }
            let output = OutputFile {
                lines: lines.clone(),
                errors,
            };
            let kind = if errors { "error" } else { "output" };
            let file = StoredFile {
                id: files::new_file_id(),
                filename: format!("{}_{kind}.jsonl", job.id),
                purpose: "batch_output".into(),
                created_at,
                expires_at: Some(created_at + job.output_ttl),
                bytes: output.len(&self.inner.png),
                content: Content::Batch(Arc::new(output)),
            };
            let id = file.id.clone();
            lock(&self.inner.uploads).insert(file);
            Some(id)
        };
        let output_file_id = make_file(false, succeeded);
        let error_file_id = make_file(true, failed);
        self.update(&job.id, |b| {
            let at = Some(now());
            match end {
                End::Completed => {
                    b.status = Status::Completed;
                    b.completed_at = at;
                }
                End::Cancelled => {
                    b.status = Status::Cancelled;
                    b.cancelled_at = at;
                }
                End::Expired => {
                    b.status = Status::Expired;
                    b.expired_at = at;
                }
            }
            b.output_file_id = output_file_id;
            b.error_file_id = error_file_id;
            b.completed = succeeded;
            b.failed = failed;
        });
        let mut counters = lock(&self.inner.counters);
        let stats = &mut counters.stats.batch;
        stats.lines_not_run += not_run;
        match end {
            End::Completed => stats.batches_completed += 1,
            End::Cancelled => stats.batches_cancelled += 1,
            End::Expired => stats.batches_expired += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rendered_lengths_are_exact() {
        let png = PngTemplate::sized(3000, 8);
        let req = |prompt: &str, n| GenRequest {
            model: "gpt-image-2".into(),
            prompt: prompt.into(),
            n,
            size: None,
            quality: Some("low".into()),
            output_format: None,
            background: None,
            response_format: None,
        };
        let long = format!("caf\u{e9} \"quoted\" {}", "x".repeat(600));
        for (prompt, n) in [("a fox", 1), ("two \"owls\"", 3), (long.as_str(), 2)] {
            let r = req(prompt, n);
            let line = LineRecord {
                custom_id: format!("id \"{prompt}\""),
                id: new_hex_id("batch_req_"),
                outcome: Outcome::Images {
                    request_id: new_hex_id("req_"),
                    seq: 12,
                    n,
                    prompt_head: r.prompt.chars().take(PROMPT_KEPT).collect(),
                    meta: answer_meta(&r),
                },
            };
            let text = line.render(&png);
            assert_eq!(text.len(), line.rendered_len(&png));
            assert!(text.ends_with('\n'));
            let parsed: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(parsed["custom_id"], json!(format!("id \"{prompt}\"")));
            assert_eq!(parsed["response"]["status_code"], 200);
            let data = parsed["response"]["body"]["data"].as_array().unwrap();
            assert_eq!(data.len(), n as usize);
            assert_eq!(parsed["response"]["body"]["quality"], "low");
            assert_eq!(parsed["error"], Value::Null);
        }
    }

    #[test]
    fn input_files_are_validated_like_the_provider() {
        let ok = br#"{"custom_id":"a","method":"POST","url":"/v1/images/generations","body":{"prompt":"p"}}
{"custom_id":"b","method":"POST","url":"/v1/images/generations","body":{"prompt":"q"}}
"#;
        assert_eq!(parse_input(ok, GENERATIONS, 10).unwrap().len(), 2);
        let errors = parse_input(ok, EDITS, 10).unwrap_err();
        assert_eq!(errors.len(), 2);
        assert_eq!(errors[0]["code"], "invalid_url");
        assert_eq!(errors[1]["line"], 2);
        assert_eq!(
            parse_input(ok, GENERATIONS, 1).unwrap_err()[0]["code"],
            "too_many_requests"
        );
        assert_eq!(
            parse_input(b"", GENERATIONS, 1).unwrap_err()[0]["code"],
            "empty_file"
        );
        let bad = br#"not json
{"custom_id":"a","method":"GET","url":"/v1/images/generations","body":{}}
{"method":"POST","url":"/v1/images/generations","body":{}}
{"custom_id":"b","method":"POST","url":"/v1/images/generations"}
{"custom_id":"c","method":"POST","url":"/v1/images/generations","body":{"model":"gpt-image-1"}}
{"custom_id":"c","method":"POST","url":"/v1/images/generations","body":{"model":"gpt-image-1"}}
{"custom_id":"d","method":"POST","url":"/v1/images/generations","body":{"model":"gpt-image-2"}}
"#;
        let errors = parse_input(bad, GENERATIONS, 100).unwrap_err();
        let codes: Vec<(&str, u64)> = errors
            .iter()
            .map(|e| (e["code"].as_str().unwrap(), e["line"].as_u64().unwrap()))
            .collect();
        assert_eq!(
            codes,
            [
                ("invalid_json_line", 1),
                ("invalid_value", 2),
                ("missing_required_parameter", 3),
                ("missing_required_parameter", 4),
                ("duplicate_custom_id", 6),
                ("mismatched_model", 7),
            ]
        );
    }
}

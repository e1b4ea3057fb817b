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
//!   in `validating` until released. So that a test can kill a client at a precise moment,
//!   uploads and creates are answered late after their work is done
//!   ([`FakeApi::hang_next_uploads`], [`FakeApi::hang_next_creates`]), and output and error files
//!   are sent slowly ([`FakeApi::slow_content`]).
//!
//! The code: the options, counters and knobs here; the batches' state and the rendering of their
//! output lines in `state`; the routes in `http`; a create request's checks in `create`; the
//! input file's in `input`; a batch's run in `run`, its JSON edit lines' images in `edit`.

mod create;
mod edit;
mod http;
mod input;
mod run;
mod state;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::http::StatusCode;
use serde_json::Value;

#[cfg(doc)]
use super::Fault;
use super::errors::ApiError;
use super::{FakeApi, lock};
pub(super) use http::{cancel, create, list, retrieve};
use state::BatchState;
pub(super) use state::{BatchStore, OutputFile};

/// The endpoints the fake runs batches for.
pub const GENERATIONS: &str = "/v1/images/generations";
pub const EDITS: &str = "/v1/images/edits";

/// Most lines an input file may have.
pub const MAX_LINES: usize = 50_000;
/// Largest batch input file: 200 MB.
pub const MAX_INPUT_FILE_BYTES: u64 = 200 * 1024 * 1024;

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
    /// Uploads answered late ([`FakeApi::hang_next_uploads`]).
    hang_uploads: std::sync::Mutex<Hang>,
    /// Creates answered late ([`FakeApi::hang_next_creates`]).
    hang_creates: std::sync::Mutex<Hang>,
    /// The wait before each line of a batch output's download ([`FakeApi::slow_content`]).
    slow_content: std::sync::Mutex<Duration>,
}

/// The next `left` answers of one kind are sent `delay` late.
#[derive(Clone, Copy, Debug, Default)]
struct Hang {
    left: u64,
    delay: Duration,
}

impl Hang {
    /// Takes one use: how late this answer is sent, if it is.
    fn take(&mut self) -> Option<Duration> {
        self.left = self.left.checked_sub(1)?;
        Some(self.delay)
    }
}

impl Control {
    pub(super) fn new(options: BatchOptions) -> Self {
        Self {
            options: std::sync::Mutex::new(options),
            ..Self::default()
        }
    }

    /// How late the answer to an upload just stored is sent, if it is (takes one use).
    pub(super) fn upload_hang(&self) -> Option<Duration> {
        lock(&self.hang_uploads).take()
    }

    /// How late the answer to a batch just created is sent, if it is (takes one use).
    fn create_hang(&self) -> Option<Duration> {
        lock(&self.hang_creates).take()
    }

    /// The wait before the next line of a batch output's download.
    fn content_wait(&self) -> Duration {
        *lock(&self.slow_content)
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

    /// The next `n` uploads (`POST /v1/files`) are stored and counted as usual, but their
    /// answer is sent only `delay` later: a client that dies meanwhile never learns the file's
    /// id. Refused uploads are answered at once and do not count; `n = 0` ends the hang.
    pub fn hang_next_uploads(&self, n: u64, delay: Duration) {
        *lock(&self.inner.batch_control.hang_uploads) = Hang { left: n, delay };
    }

    /// The next `n` batches created (`POST /v1/batches`) start at once (listed, and run as
    /// usual unless [`Self::hold_batches`] holds them), but their answer (the Batch object as it
    /// was at creation) is sent only `delay` later: a client that dies meanwhile never learns the
    /// batch's id. Refused creates are answered at once and do not count; `n = 0` ends the hang.
    pub fn hang_next_creates(&self, n: u64, delay: Duration) {
        *lock(&self.inner.batch_control.hang_creates) = Hang { left: n, delay };
    }

    /// Every download (`GET /v1/files/{id}/content`) of a batch's output or error file waits
    /// `per_line` before each line it sends, from the next line on for downloads under way;
    /// `Duration::ZERO` turns this off. Uploaded files are sent at once.
    pub fn slow_content(&self, per_line: Duration) {
        *lock(&self.inner.batch_control.slow_content) = per_line;
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
}

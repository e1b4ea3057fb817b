//! The Files API (`/v1/files`), as far as the Batch API and JSON image edits need it.
//!
//! - `POST /v1/files`, multipart/form-data: `purpose` (`assistants`, `batch`, `fine-tune`,
//!   `vision`, `user_data` or `evals`), `file`, and optionally `expires_after[anchor]`
//!   (`created_at`) with `expires_after[seconds]` (3600 to 2592000). Answers the File object
//!   `{"id": "file-...", "object": "file", "bytes", "created_at", "expires_at", "filename",
//!   "purpose", "status": "processed", "status_details": null}`. Any file may be up to 512 MB; a
//!   `batch` file must be named `*.jsonl` (else 400 "Invalid file format for Batch API. Must be
//!   .jsonl", the provider's words) and hold at most 200 MB ([`super::BatchOptions`]'s
//!   `max_input_file_bytes`). By default `batch` files (and the batches' outputs) expire after 30
//!   days and others never do; the fake reports `expires_at` but deletes nothing.
//! - `GET /v1/files` (`purpose`, `limit` 1..=10000, `order` `asc`/`desc`, `after`), `GET
//!   /v1/files/{id}`, `GET /v1/files/{id}/content`, `DELETE /v1/files/{id}` (answers `{"id",
//!   "object": "file", "deleted": true}`). An unknown id gets the provider's 404 "No such File
//!   object: ID" (param `id`).
//!
//! Uploads are kept in memory (tests upload a few MB). The output and error files of batches
//! (purpose `batch_output`) are not: they are made line by line while they are downloaded (see
//! [`super::batch`]), with their length known in advance (`bytes`, and `content-length`).
//!
//! Where the fake differs: uploads are not rate-limited; the wording of the size refusals and of
//! an unknown purpose is the fake's own; the content of a file of any purpose can be downloaded.
//!
//! On demand, uploads are answered late once stored ([`FakeApi::hang_next_uploads`]) and batch
//! outputs are sent slowly ([`FakeApi::slow_content`]).

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::multipart::MultipartRejection;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::batch::OutputFile;
use super::errors::ApiError;
use super::{FakeApi, lock};

/// The purposes an upload may have (`batch_output` and the like are the provider's own).
const PURPOSES: [&str; 6] = [
    "assistants",
    "batch",
    "fine-tune",
    "vision",
    "user_data",
    "evals",
];

/// The largest file the provider takes, whatever its purpose.
pub const MAX_FILE_BYTES: u64 = 512 * 1024 * 1024;

/// How long `batch` files and batch outputs are kept by default.
pub(super) const THIRTY_DAYS: u64 = 30 * 24 * 3600;

/// Files in upload order.
#[derive(Default)]
pub(super) struct FileStore {
    files: Vec<StoredFile>,
}

pub(super) struct StoredFile {
    pub(super) id: String,
    pub(super) filename: String,
    pub(super) purpose: String,
    pub(super) created_at: u64,
    pub(super) expires_at: Option<u64>,
    pub(super) bytes: u64,
    pub(super) content: Content,
}

#[derive(Clone)]
pub(super) enum Content {
    Uploaded(Bytes),
    /// A batch's output or error file, made when it is read.
    Batch(Arc<OutputFile>),
}

impl StoredFile {
    /// The File object.
    pub(super) fn object(&self) -> Value {
        json!({
            "id": self.id,
            "object": "file",
            "bytes": self.bytes,
            "created_at": self.created_at,
            "expires_at": self.expires_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": null,
        })
    }
}

impl FileStore {
    pub(super) fn insert(&mut self, file: StoredFile) {
        self.files.push(file);
    }

    pub(super) fn get(&self, id: &str) -> Option<&StoredFile> {
        self.files.iter().find(|f| f.id == id)
    }

    fn remove(&mut self, id: &str) -> Option<StoredFile> {
        let idx = self.files.iter().position(|f| f.id == id)?;
        Some(self.files.remove(idx))
    }

    pub(super) fn objects(&self) -> Vec<Value> {
        self.files.iter().map(StoredFile::object).collect()
    }
}

/// A new file id, shaped like the provider's (`file-` and 22 letters and digits).
pub(super) fn new_file_id() -> String {
    let mut id = String::from("file-");
    id.extend(std::iter::repeat_with(fastrand::alphanumeric).take(22));
    id
}

/// Now, in Unix seconds.
pub(super) fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The provider's 404 for a file id it does not know.
pub(super) fn no_such_file(id: &str) -> ApiError {
    ApiError::request_error(
        StatusCode::NOT_FOUND,
        Some("id"),
        None,
        format!("No such File object: {id}"),
    )
}

fn invalid(
    param: Option<&str>,
    code: Option<&'static str>,
    message: impl Into<String>,
) -> Response {
    ApiError::request_error(StatusCode::BAD_REQUEST, param, code, message).into_response()
}

/// `POST /v1/files`. The file is stored at once; its answer may be sent late
/// ([`FakeApi::hang_next_uploads`]).
pub(super) async fn upload(
    State(api): State<FakeApi>,
    headers: HeaderMap,
    multipart: Result<Multipart, MultipartRejection>,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    let Ok(mut multipart) = multipart else {
        return invalid(
            None,
            Some("invalid_content_type"),
            "Invalid Content-Type header, expected multipart/form-data.",
        );
    };
    let batch_limit = api.batch_options().max_input_file_bytes;
    let mut purpose: Option<String> = None;
    // (filename, the bytes kept, the size received)
    let mut file: Option<(String, Vec<u8>, u64)> = None;
    let mut anchor: Option<String> = None;
    let mut seconds: Option<String> = None;
    loop {
        let mut field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return invalid(
                    None,
                    Some("invalid_multipart"),
                    format!("Invalid body: {e}"),
                );
            }
        };
        let name = field.name().unwrap_or_default().to_string();
        if name == "file" {
            let filename = field.file_name().unwrap_or("file").to_string();
            // Past the limit that applies, the rest is read (so that the client gets the
            // answer, not a closed connection) but not kept.
            let cap = match purpose.as_deref() {
                Some("batch") => batch_limit.min(MAX_FILE_BYTES),
                _ => MAX_FILE_BYTES,
            };
            let mut data = Vec::new();
            let mut size = 0u64;
            loop {
                match field.chunk().await {
                    Ok(Some(chunk)) => {
                        size += chunk.len() as u64;
                        if size <= cap {
                            data.extend_from_slice(&chunk);
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        return invalid(
                            None,
                            Some("invalid_multipart"),
                            format!("Invalid body: {e}"),
                        );
                    }
                }
            }
            file = Some((filename, data, size));
            continue;
        }
        let Ok(text) = field.text().await else {
            return invalid(None, Some("invalid_multipart"), "Invalid body.");
        };
        match name.as_str() {
            "purpose" => purpose = Some(text),
            "expires_after[anchor]" => anchor = Some(text),
            "expires_after[seconds]" => seconds = Some(text),
            other => {
                return invalid(
                    Some(other),
                    Some("unknown_parameter"),
                    format!("Unknown parameter: '{other}'."),
                );
            }
        }
    }
    let Some((filename, data, size)) = file else {
        return invalid(
            Some("file"),
            Some("missing_required_parameter"),
            "Missing required parameter: 'file'.",
        );
    };
    let Some(purpose) = purpose else {
        return invalid(
            Some("purpose"),
            Some("missing_required_parameter"),
            "Missing required parameter: 'purpose'.",
        );
    };
    if !PURPOSES.contains(&purpose.as_str()) {
        return invalid(
            Some("purpose"),
            Some("invalid_value"),
            format!(
                "Invalid value: '{purpose}'. Supported values are: 'assistants', 'batch', \
                 'fine-tune', 'vision', 'user_data', and 'evals'."
            ),
        );
    }
    if size > MAX_FILE_BYTES {
        return invalid(
            Some("file"),
            None,
            format!(
                "File is too large: {size} bytes. Files can be at most {MAX_FILE_BYTES} bytes \
                 (512 MB)."
            ),
        );
    }
    if purpose == "batch" {
        if !filename.ends_with(".jsonl") {
            return invalid(
                None,
                None,
                "Invalid file format for Batch API. Must be .jsonl",
            );
        }
        if size > batch_limit {
            return invalid(
                Some("file"),
                None,
                format!(
                    "Batch input file is too large: {size} bytes. A batch input file can be at \
                     most {batch_limit} bytes."
                ),
            );
        }
    }
    let created_at = now();
    let expires_at = match (anchor.as_deref(), seconds.as_deref()) {
        (None, None) => (purpose == "batch").then_some(created_at + THIRTY_DAYS),
        (Some("created_at"), Some(s)) => match s.parse::<u64>() {
            Ok(s) if (3600..=THIRTY_DAYS).contains(&s) => Some(created_at + s),
            _ => {
                return invalid(
                    Some("expires_after.seconds"),
                    Some("invalid_value"),
                    format!(
                        "Invalid 'expires_after.seconds': expected an integer between 3600 and \
                         2592000, but got '{s}' instead."
                    ),
                );
            }
        },
        _ => {
            return invalid(
                Some("expires_after"),
                Some("invalid_value"),
                "Invalid 'expires_after': expected 'anchor' ('created_at') and 'seconds'.",
            );
        }
    };
    let stored = StoredFile {
        id: new_file_id(),
        filename,
        purpose,
        created_at,
        expires_at,
        bytes: size,
        content: Content::Uploaded(Bytes::from(data)),
    };
    let object = stored.object();
    lock(&api.inner.uploads).insert(stored);
    lock(&api.inner.counters).stats.batch.files_uploaded += 1;
    // Stored and counted: a client that gives up while the answer is held never learns the id.
    if let Some(delay) = api.inner.batch_control.upload_hang() {
        tokio::time::sleep(delay).await;
    }
    Json(object).into_response()
}

#[derive(serde::Deserialize)]
pub(super) struct ListQuery {
    purpose: Option<String>,
    limit: Option<String>,
    order: Option<String>,
    after: Option<String>,
}

/// `GET /v1/files`: newest first unless `order=asc`.
pub(super) async fn list(
    State(api): State<FakeApi>,
    headers: HeaderMap,
    Query(q): Query<ListQuery>,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    let limit = match parse_limit(q.limit.as_deref(), 10_000, 10_000) {
        Ok(l) => l,
        Err(e) => return e.into_response(),
    };
    let ascending = match q.order.as_deref() {
        None | Some("desc") => false,
        Some("asc") => true,
        Some(other) => {
            return invalid(
                Some("order"),
                Some("invalid_value"),
                format!("Invalid value: '{other}'. Supported values are: 'asc' and 'desc'."),
            );
        }
    };
    let mut objects: Vec<Value> = {
        let store = lock(&api.inner.uploads);
        store
            .files
            .iter()
            .filter(|f| q.purpose.as_ref().is_none_or(|p| *p == f.purpose))
            .map(StoredFile::object)
            .collect()
    };
    if !ascending {
        objects.reverse();
    }
    Json(page(objects, q.after.as_deref(), limit)).into_response()
}

/// `limit` as the provider checks it: an integer in `1..=max`, `default` when absent.
pub(super) fn parse_limit(
    raw: Option<&str>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    let Some(raw) = raw else {
        return Ok(default);
    };
    let bad = |code, message: String| {
        ApiError::request_error(StatusCode::BAD_REQUEST, Some("limit"), Some(code), message)
    };
    match raw.parse::<i64>() {
        Err(_) => Err(bad(
            "invalid_type",
            format!("Invalid 'limit': expected an integer, but got '{raw}' instead."),
        )),
        Ok(n) if n < 1 => Err(bad(
            "integer_below_min_value",
            format!(
                "Invalid 'limit': integer below minimum value. Expected a value >= 1, but got {n} \
                 instead."
            ),
        )),
        Ok(n) if n as u64 > max as u64 => Err(bad(
            "integer_above_max_value",
            format!(
                "Invalid 'limit': integer above maximum value. Expected a value <= {max}, but got \
                 {n} instead."
            ),
        )),
        Ok(n) => Ok(n as usize),
    }
}

/// A cursor page of `objects` (already in list order): those after the one whose id is `after`
/// (all of them without a cursor; none for an unknown one), at most `limit`.
pub(super) fn page(objects: Vec<Value>, after: Option<&str>, limit: usize) -> Value {
    let start = match after {
        None => 0,
        Some(id) => objects
            .iter()
            .position(|o| o["id"] == id)
            .map_or(objects.len(), |i| i + 1),
    };
    let rest = objects.len().saturating_sub(start);
    let data: Vec<Value> = objects.into_iter().skip(start).take(limit).collect();
    json!({
        "object": "list",
        "first_id": data.first().map(|o| o["id"].clone()),
        "last_id": data.last().map(|o| o["id"].clone()),
        "has_more": rest > data.len(),
        "data": data,
    })
}

/// `GET /v1/files/{id}`.
pub(super) async fn retrieve(
    State(api): State<FakeApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    match lock(&api.inner.uploads).get(&id) {
        Some(f) => Json(f.object()).into_response(),
        None => no_such_file(&id).into_response(),
    }
}

/// `DELETE /v1/files/{id}`.
pub(super) async fn delete(
    State(api): State<FakeApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    if lock(&api.inner.uploads).remove(&id).is_none() {
        return no_such_file(&id).into_response();
    }
    lock(&api.inner.counters).stats.batch.files_deleted += 1;
    Json(json!({"id": id, "object": "file", "deleted": true})).into_response()
}

/// `GET /v1/files/{id}/content`: an upload as it was sent; a batch's output made line by line
/// as the client reads it, so that a file of gigabytes is never held.
pub(super) async fn content(
    State(api): State<FakeApi>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    let found = lock(&api.inner.uploads)
        .get(&id)
        .map(|f| (f.content.clone(), f.bytes));
    let Some((content, bytes)) = found else {
        return no_such_file(&id).into_response();
    };
    let body = match content {
        Content::Uploaded(data) => Body::from(data),
        Content::Batch(output) => Body::from_stream(output.stream(api.clone())),
    };
    let mut response = ([(header::CONTENT_TYPE, "application/octet-stream")], body).into_response();
    // Known in advance: hyper frames the streamed body by it rather than chunked.
    response
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes));
    response
}

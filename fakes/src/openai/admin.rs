//! Everything but the generation endpoint: the `/_fake/` endpoints through which another process
//! (a benchmark, the demo, a shell) drives the fake as a test does through [`FakeApi`]'s methods,
//! the images answered by URL, and the provider's 404 for any other path.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::errors::ApiError;
use super::{FakeApi, Rule, Stats, lock};

pub(super) async fn push_rule(State(api): State<FakeApi>, Json(rule): Json<Rule>) -> StatusCode {
    api.push_rule(rule);
    StatusCode::NO_CONTENT
}

pub(super) async fn clear_rules(State(api): State<FakeApi>) -> StatusCode {
    api.clear_rules();
    StatusCode::NO_CONTENT
}

pub(super) async fn stats(State(api): State<FakeApi>) -> Json<Stats> {
    Json(api.stats())
}

#[derive(serde::Deserialize)]
pub(super) struct CallsQuery {
    #[serde(default)]
    prompt_contains: String,
}

pub(super) async fn calls(State(api): State<FakeApi>, Query(q): Query<CallsQuery>) -> Json<Value> {
    let (calls, billed) = api.per_prompt(&q.prompt_contains);
    Json(json!({ "calls": calls, "billed": billed }))
}

#[derive(serde::Deserialize)]
pub(super) struct LatencyBody {
    ms: u64,
}

pub(super) async fn latency(
    State(api): State<FakeApi>,
    Json(body): Json<LatencyBody>,
) -> StatusCode {
    api.set_latency(Duration::from_millis(body.ms));
    StatusCode::NO_CONTENT
}

#[derive(serde::Deserialize)]
pub(super) struct LimitsBody {
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
}

pub(super) async fn limits(State(api): State<FakeApi>, Json(body): Json<LimitsBody>) -> StatusCode {
    api.set_limits(body.requests_per_minute, body.tokens_per_minute);
    StatusCode::NO_CONTENT
}

/// `POST /_fake/batch`: any of the batch options (durations in milliseconds), the hold, the
/// number of batches to fail or expire next, the uploads and creates to answer late
/// (`{"n": 1, "ms": 2000}`) and the wait before each line of a batch output's download
/// (`slow_content_ms`, 0: none). Unknown fields are refused (422), so that a typo does not go
/// unnoticed.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct BatchBody {
    validating_ms: Option<u64>,
    per_line_ms: Option<u64>,
    parallel: Option<usize>,
    finalizing_ms: Option<u64>,
    cancelling_ms: Option<u64>,
    window_ms: Option<u64>,
    max_input_file_bytes: Option<u64>,
    max_lines: Option<usize>,
    hold: Option<bool>,
    fail_next: Option<u64>,
    expire_next: Option<u64>,
    hang_next_uploads: Option<HangBody>,
    hang_next_creates: Option<HangBody>,
    slow_content_ms: Option<u64>,
}

/// The next `n` answers of a kind, sent `ms` milliseconds late.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct HangBody {
    n: u64,
    ms: u64,
}

pub(super) async fn batch(State(api): State<FakeApi>, Json(body): Json<BatchBody>) -> StatusCode {
    let mut opts = api.batch_options();
    let ms = Duration::from_millis;
    opts.validating = body.validating_ms.map_or(opts.validating, ms);
    opts.per_line = body.per_line_ms.map_or(opts.per_line, ms);
    opts.parallel = body.parallel.unwrap_or(opts.parallel);
    opts.finalizing = body.finalizing_ms.map_or(opts.finalizing, ms);
    opts.cancelling = body.cancelling_ms.map_or(opts.cancelling, ms);
    opts.window = body.window_ms.map_or(opts.window, ms);
    opts.max_input_file_bytes = body
        .max_input_file_bytes
        .unwrap_or(opts.max_input_file_bytes);
    opts.max_lines = body.max_lines.unwrap_or(opts.max_lines);
    api.set_batch_options(opts);
    match body.hold {
        Some(true) => api.hold_batches(),
        Some(false) => api.release_batches(),
        None => {}
    }
    if let Some(n) = body.fail_next {
        api.fail_next_batches(n);
    }
    if let Some(n) = body.expire_next {
        api.expire_next_batches(n);
    }
    if let Some(HangBody { n, ms }) = body.hang_next_uploads {
        api.hang_next_uploads(n, Duration::from_millis(ms));
    }
    if let Some(HangBody { n, ms }) = body.hang_next_creates {
        api.hang_next_creates(n, Duration::from_millis(ms));
    }
    if let Some(ms) = body.slow_content_ms {
        api.slow_content(Duration::from_millis(ms));
    }
    StatusCode::NO_CONTENT
}

/// `GET /_fake/batches`: every batch object, oldest first.
pub(super) async fn batches(State(api): State<FakeApi>) -> Json<Vec<Value>> {
    Json(api.batches())
}

/// An image given out by URL (`"response_format": "url"`), while it is kept. No key is asked
/// for: the provider's URLs are pre-signed.
pub(super) async fn file(State(api): State<FakeApi>, Path(name): Path<String>) -> Response {
    let failing = &api.inner.failing_files;
    if failing
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "try again\n").into_response();
    }
    let found = lock(&api.inner.files)
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| bytes.clone());
    match found {
        Some(bytes) => {
            lock(&api.inner.counters).stats.files_served += 1;
            ([(header::CONTENT_TYPE, "image/png")], bytes).into_response()
        }
        None => (StatusCode::NOT_FOUND, "expired or unknown image\n").into_response(),
    }
}

/// `GET /v1/models/{model}`: the model, to a client with a valid key (as the API answers).
pub(super) async fn model(
    State(api): State<FakeApi>,
    Path(model): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    Json(json!({"id": model, "object": "model", "created": 1_745_000_000, "owned_by": "system"}))
        .into_response()
}

pub(super) async fn unknown_url(method: Method, uri: Uri) -> Response {
    ApiError::unknown_url(method.as_str(), uri.path()).into_response()
}

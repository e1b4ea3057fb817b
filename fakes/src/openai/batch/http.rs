//! The routes of the Batch API: create, retrieve, cancel and list batches.

use axum::Json;
use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};

use super::bad_request;
use super::state::Status;
use crate::openai::errors::ApiError;
use crate::openai::files::{self, now};
use crate::openai::{FakeApi, lock};

fn no_such_batch(id: &str) -> ApiError {
    ApiError::request_error(
        StatusCode::NOT_FOUND,
        Some("batch_id"),
        None,
        format!("No batch found with id '{id}'."),
    )
}

/// `POST /v1/batches`. The batch starts at once; its answer may be sent late
/// ([`FakeApi::hang_next_creates`]).
pub(in crate::openai) async fn create(
    State(api): State<FakeApi>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    match api.create_batch(&headers, &body) {
        Ok(object) => {
            if let Some(delay) = api.inner.batch_control.create_hang() {
                tokio::time::sleep(delay).await;
            }
            Json(object).into_response()
        }
        Err(e) => e.into_response(),
    }
}

/// `GET /v1/batches/{id}`.
pub(in crate::openai) async fn retrieve(
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
pub(in crate::openai) async fn cancel(
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
pub(in crate::openai) struct ListQuery {
    limit: Option<String>,
    after: Option<String>,
}

/// `GET /v1/batches`: newest first.
pub(in crate::openai) async fn list(
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

//! `POST /v1/batches`: the request's checks, and the batch it starts.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use axum::http::{HeaderMap, StatusCode, header};
use serde_json::{Map, Value};

use super::run::Job;
use super::state::{BatchState, Status};
use super::{EDITS, GENERATIONS, bad_request, json_type, new_hex_id};
use crate::openai::errors::ApiError;
use crate::openai::files::{Content, THIRTY_DAYS, now};
use crate::openai::{FakeApi, lock};

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

impl FakeApi {
    fn take_one(counter: &AtomicU64) -> bool {
        counter
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1))
            .is_ok()
    }

    /// Checks a create request and starts the batch's task.
    pub(super) fn create_batch(&self, headers: &HeaderMap, body: &[u8]) -> Result<Value, ApiError> {
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
}

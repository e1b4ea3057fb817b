//! What fal's queue answers: a submit (`{"request_id", "status_url", "response_url",
//! "cancel_url"}`), a status (`{"status": "IN_QUEUE" | "IN_PROGRESS" | "COMPLETED"}`, HTTP 202
//! until done), a result (`{"images": [{"url", "content_type", "width", "height"}], "seed",
//! "has_nsfw_concepts"}`) and errors (FastAPI's `{"detail": ...}`).
//!
//! The traps: the URLs to poll come in the answer and must be used as given; an image its safety
//! checker flagged is delivered (black) with `has_nsfw_concepts: [true]`, which is a refusal, not
//! a success; a locked account (its balance exhausted) answers 403, which is not a wrong key.

use serde::Deserialize;
use serde_json::Value;

use crate::domain::error::{ErrorKind, Failure, ProviderDetail, StopReason};
use crate::http::{billed_failure, by_status};

/// A request the queue accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub request_id: String,
    pub status_url: String,
    pub response_url: String,
    pub cancel_url: Option<String>,
}

/// Reads the answer to an accepted submit. It was accepted, so a failure here is billed.
pub fn read_submit(body: &[u8]) -> Result<Queued, Failure> {
    let object: serde_json::Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
        billed_failure(format!(
            "the provider's answer to the submit could not be read: {e}"
        ))
    })?;
    let text = |key: &str| {
        object
            .get(key)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    match (text("request_id"), text("status_url"), text("response_url")) {
        (Some(request_id), Some(status_url), Some(response_url)) => Ok(Queued {
            request_id,
            status_url,
            response_url,
            cancel_url: text("cancel_url"),
        }),
        _ => Err(billed_failure(
            "the provider accepted the submit without its request_id, status_url and response_url"
                .into(),
        )),
    }
}

/// Where a queued request is.
#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Queued { position: Option<u64> },
    InProgress,
    Completed,
}

/// Reads a status answer; `Err` says why it is not one.
pub fn read_status(body: &[u8]) -> Result<Status, String> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| format!("the status could not be read: {e}"))?;
    match value.get("status").and_then(Value::as_str) {
        Some("IN_QUEUE") => Ok(Status::Queued {
            position: value.get("queue_position").and_then(Value::as_u64),
        }),
        Some("IN_PROGRESS") => Ok(Status::InProgress),
        Some("COMPLETED") => Ok(Status::Completed),
        Some(other) => Err(format!(
            "the status {:?} is not one the API documents",
            other.chars().take(64).collect::<String>()
        )),
        None => Err("the status answer has no status".into()),
    }
}

/// One image of a result.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultImage {
    pub url: String,
    pub width: Option<u32>,
    pub height: Option<u32>,
    /// Its safety checker flagged it (the image is blacked out).
    pub nsfw: bool,
}

#[derive(Deserialize)]
struct ResultBody {
    #[serde(default)]
    images: Vec<Value>,
    #[serde(default)]
    has_nsfw_concepts: Vec<Value>,
}

/// Reads a result. The request ran, so a failure here is billed.
pub fn read_result(body: &[u8]) -> Result<Vec<ResultImage>, Failure> {
    let parsed: ResultBody = serde_json::from_slice::<serde_json::Map<String, Value>>(body)
        .and_then(|m| serde_json::from_value(Value::Object(m)))
        .map_err(|e| billed_failure(format!("the provider's result could not be read: {e}")))?;
    let images: Vec<ResultImage> = parsed
        .images
        .iter()
        .enumerate()
        .filter_map(|(i, image)| {
            let url = image.get("url")?.as_str().filter(|u| !u.is_empty())?;
            let side = |k: &str| {
                image
                    .get(k)
                    .and_then(Value::as_u64)
                    .and_then(|v| u32::try_from(v).ok())
            };
            Some(ResultImage {
                url: url.to_string(),
                width: side("width"),
                height: side("height"),
                nsfw: parsed.has_nsfw_concepts.get(i).and_then(Value::as_bool) == Some(true),
            })
        })
        .collect();
    if images.is_empty() {
        return Err(billed_failure(
            "the provider's result holds no image".into(),
        ));
    }
    Ok(images)
}

/// The refusal of a result whose images its safety checker flagged.
pub fn flagged(request_id: Option<String>) -> Failure {
    Failure::Permanent {
        kind: ErrorKind::ContentPolicy,
        message: "the provider's safety checker flagged the image it made (has_nsfw_concepts)"
            .into(),
        detail: Box::new(ProviderDetail {
            status: Some(200),
            code: Some("has_nsfw_concepts".into()),
            request_id,
            // The request ran: it is charged, flagged or not.
            charged: true,
            ..ProviderDetail::default()
        }),
    }
}

/// The `detail` of an error body, as text (FastAPI's).
pub use crate::http::fastapi_detail as error_detail;

/// Classifies an error answer: a 403 of a locked account (its balance exhausted) pauses the
/// provider for quota, other 401 and 403 stop it (the key); 400, 404 and 422 fail the job; the
/// rest by status.
pub fn classify(status: u16, body: &[u8], after: Option<std::time::Duration>) -> Failure {
    let message = error_detail(body).unwrap_or_else(|| format!("HTTP {status}"));
    let detail = Box::new(ProviderDetail {
        status: Some(status),
        ..ProviderDetail::default()
    });
    let lower = message.to_lowercase();
    let refused = serde_json::from_slice::<Value>(body).is_ok_and(|v| {
        v.get("detail")
            .and_then(Value::as_array)
            .is_some_and(|items| {
                items.iter().any(|i| {
                    i.get("type").and_then(Value::as_str) == Some("content_policy_violation")
                })
            })
    });
    if refused {
        return Failure::Permanent {
            kind: ErrorKind::ContentPolicy,
            message: format!("the provider refused the request: {message}"),
            detail,
        };
    }
    match status {
        402 => Failure::Stop {
            reason: StopReason::QuotaExhausted,
            message: format!("the account cannot pay: {message}"),
            detail,
        },
        403 if lower.contains("locked") || lower.contains("balance") => Failure::Stop {
            reason: StopReason::QuotaExhausted,
            message: format!("the account cannot pay: {message}"),
            detail,
        },
        400 | 404 | 422 => Failure::Permanent {
            kind: ErrorKind::InvalidRequest,
            message,
            detail,
        },
        _ => by_status(status, message, after, None, detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn submits_statuses_and_results_are_read_as_the_queue_writes_them() {
        let q = read_submit(br#"{"request_id":"r1","response_url":"https://queue.fal.run/fal-ai/flux/requests/r1","status_url":"https://queue.fal.run/fal-ai/flux/requests/r1/status","cancel_url":"https://queue.fal.run/fal-ai/flux/requests/r1/cancel","queue_position":0}"#).unwrap();
        assert_eq!(q.request_id, "r1");
        assert!(q.cancel_url.is_some());
        assert!(
            read_submit(br#"{"request_id":"r1"}"#)
                .unwrap_err()
                .possibly_billed()
        );
        assert_eq!(
            read_status(br#"{"status":"IN_QUEUE","queue_position":3}"#).unwrap(),
            Status::Queued { position: Some(3) }
        );
        assert_eq!(
            read_status(br#"{"status":"COMPLETED","logs":null}"#).unwrap(),
            Status::Completed
        );
        assert!(read_status(br#"{"status":"DONE"}"#).is_err());
        let images = read_result(br#"{"images":[{"url":"https://v3.fal.media/files/a.png","width":1024,"height":768,"content_type":"image/png"}],"seed":7,"has_nsfw_concepts":[false]}"#).unwrap();
        assert_eq!((images[0].width, images[0].nsfw), (Some(1024), false));
        let flagged_one =
            read_result(br#"{"images":[{"url":"u"}],"has_nsfw_concepts":[true]}"#).unwrap();
        assert!(flagged_one[0].nsfw);
        assert!(
            read_result(br#"{"images":[]}"#)
                .unwrap_err()
                .possibly_billed()
        );
    }

    #[test]
    fn errors_are_classified() {
        assert!(matches!(
            classify(403, br#"{"detail":"User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."}"#, None),
            Failure::Stop { reason: StopReason::QuotaExhausted, .. }
        ));
        assert!(matches!(
            classify(
                401,
                br#"{"detail":"No user found for Key ID and Secret"}"#,
                None
            ),
            Failure::Stop {
                reason: StopReason::Unauthorized,
                ..
            }
        ));
        let invalid = classify(422, br#"{"detail":[{"loc":["body","num_images"],"msg":"ensure this value is less than or equal to 4","type":"value_error"}]}"#, None);
        assert_eq!(invalid.kind(), Some(ErrorKind::InvalidRequest));
        assert!(invalid.message().contains("body.num_images"));
        assert!(classify(429, b"{}", None).is_retryable());
        let refused = classify(422, br#"{"detail":[{"loc":["body","prompt"],"msg":"The content could not be processed because it contained material flagged by a content checker.","type":"content_policy_violation"}]}"#, None);
        assert_eq!(refused.kind(), Some(ErrorKind::ContentPolicy));
        assert!(classify(503, b"", None).is_retryable());
    }
}

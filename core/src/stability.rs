//! What Stability AI's Stable Image API (v2beta) answers: an image, as raw bytes (`Accept:
//! image/*`, its finish reason and seed in headers) or as JSON (`{"image", "finish_reason",
//! "seed"}`), and errors as `{"id", "name", "errors": [...]}`.
//!
//! The traps: a filtered image is HTTP 200 with `finish-reason: CONTENT_FILTERED` (a blurred
//! image that must never be stored as a success, and was charged); a prompt refused by the
//! moderation is a 403 `content_moderation` (not charged), not a credentials problem; a 429 times
//! the account out for 60 seconds; a 402 means the credits are gone.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::domain::error::{ErrorKind, Failure, ProviderDetail, StopReason};
use crate::http::{billed_failure, by_status, decode_owned};

/// How an answer ended, by its finish reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    Success,
    /// The image was filtered (and charged): a refusal.
    Filtered,
    /// A reason the API does not document.
    Other(String),
}

impl Finish {
    /// The `finish-reason` header or `finish_reason` field; none: success (older answers).
    pub fn parse(reason: Option<&str>) -> Self {
        match reason.map(str::trim) {
            None | Some("SUCCESS") => Finish::Success,
            Some("CONTENT_FILTERED") => Finish::Filtered,
            Some(other) => Finish::Other(other.chars().take(64).collect()),
        }
    }

    /// `Err`: the failure of an answer that is not a stored success.
    pub fn check(&self, request_id: Option<String>) -> Result<(), Failure> {
        match self {
            Finish::Success => Ok(()),
            Finish::Filtered => Err(Failure::Permanent {
                kind: ErrorKind::ContentPolicy,
                message: "the provider filtered the image it made (finish reason CONTENT_FILTERED)"
                    .into(),
                detail: Box::new(ProviderDetail {
                    status: Some(200),
                    code: Some("CONTENT_FILTERED".into()),
                    request_id,
                    // A filtered image is charged like any other.
                    charged: true,
                    ..ProviderDetail::default()
                }),
            }),
            Finish::Other(reason) => Err(billed_failure(format!(
                "the provider's answer ended with the finish reason {reason:?}, which it does not document"
            ))),
        }
    }
}

/// A JSON answer's image, decoded, with its finish reason and seed.
#[derive(Debug, Clone, PartialEq)]
pub struct JsonImage {
    pub image: bytes::Bytes,
    pub finish: Finish,
    pub seed: Option<u64>,
}

#[derive(Deserialize)]
struct JsonAnswer {
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    finish_reason: Option<String>,
    #[serde(default)]
    seed: Option<Value>,
}

/// Reads a 200 answer sent as JSON. The call was answered, so a failure here was charged.
pub fn read_json(body: &[u8]) -> Result<JsonImage, Failure> {
    let answer: JsonAnswer = serde_json::from_slice(body)
        .map_err(|e| billed_failure(format!("the provider's answer could not be read: {e}")))?;
    let finish = Finish::parse(answer.finish_reason.as_deref());
    let image = match answer.image.as_deref() {
        Some(b64) if !b64.is_empty() => decode_owned(b64)?,
        // A filtered answer may leave the image out; the finish reason says why.
        _ if finish == Finish::Filtered => bytes::Bytes::new(),
        _ => {
            return Err(billed_failure(
                "the provider's answer holds no image".into(),
            ));
        }
    };
    Ok(JsonImage {
        image,
        finish,
        seed: answer.seed.as_ref().and_then(seed),
    })
}

/// A seed, as a number or a string of one (headers and some answers send strings).
pub fn seed(value: &Value) -> Option<u64> {
    match value {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

#[derive(Deserialize, Default)]
struct ErrorBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    errors: Vec<Value>,
    #[serde(default)]
    id: Option<String>,
}

/// How long a 429 times the account out, when the answer names no delay.
pub const RATE_LIMIT_TIMEOUT: Duration = Duration::from_secs(60);

/// Classifies an error answer: 403 `content_moderation` is a refusal of the prompt (never
/// retried, not charged); 402 pauses the provider (credits); 401 and other 403s stop it (the
/// key); 429 waits out the minute's time-out (or the delay it names); 400, 404, 413 and 422 fail
/// the job; the rest by status.
pub fn classify(status: u16, body: &[u8], after: Option<Duration>) -> Failure {
    let parsed: ErrorBody = serde_json::from_slice(body).unwrap_or_default();
    let name: Option<String> = parsed.name.map(|n| n.chars().take(64).collect());
    let errors: String = parsed
        .errors
        .iter()
        .map(|e| e.as_str().map_or_else(|| e.to_string(), str::to_string))
        .collect::<Vec<_>>()
        .join("; ")
        .chars()
        .take(1000)
        .collect();
    let message = match (&name, errors.trim().is_empty()) {
        (Some(n), false) => format!("{n}: {errors}"),
        (Some(n), true) => n.clone(),
        (None, false) => errors,
        (None, true) => format!("HTTP {status}"),
    };
    let detail = Box::new(ProviderDetail {
        status: Some(status),
        code: name.clone(),
        request_id: parsed.id.map(|i| i.chars().take(128).collect()),
        ..ProviderDetail::default()
    });
    match (status, name.as_deref()) {
        (403, Some("content_moderation")) | (422, Some("content_moderation")) => {
            Failure::Permanent {
                kind: ErrorKind::ContentPolicy,
                message: format!("the provider refused the prompt: {message}"),
                detail,
            }
        }
        (402, _) => Failure::Stop {
            reason: StopReason::QuotaExhausted,
            message: format!("the account's credits are used up: {message}"),
            detail,
        },
        (429, _) => Failure::Retryable {
            message,
            after: Some(after.unwrap_or(RATE_LIMIT_TIMEOUT)),
            possibly_billed: false,
            detail,
        },
        (400 | 404 | 413 | 422, _) => Failure::Permanent {
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
    fn a_filtered_image_is_a_refusal_never_a_success() {
        assert_eq!(Finish::parse(Some("SUCCESS")), Finish::Success);
        assert_eq!(Finish::parse(None), Finish::Success);
        let f = Finish::parse(Some("CONTENT_FILTERED"))
            .check(Some("r".into()))
            .unwrap_err();
        assert_eq!(f.kind(), Some(ErrorKind::ContentPolicy));
        assert!(!f.is_retryable());
        assert!(
            Finish::parse(Some("ERROR"))
                .check(None)
                .unwrap_err()
                .possibly_billed()
        );
        let json =
            read_json(br#"{"image":"","finish_reason":"CONTENT_FILTERED","seed":7}"#).unwrap();
        assert_eq!(json.finish, Finish::Filtered);
        assert_eq!(json.seed, Some(7));
        let ok = read_json(br#"{"image":"iVBORw0KGgo=","finish_reason":"SUCCESS","seed":"42"}"#)
            .unwrap();
        assert!(ok.image.starts_with(b"\x89PNG"));
        assert_eq!(ok.seed, Some(42));
        assert!(
            read_json(br#"{"finish_reason":"SUCCESS"}"#)
                .unwrap_err()
                .possibly_billed()
        );
    }

    #[test]
    fn errors_are_classified_by_status_and_name() {
        let moderation = classify(
            403,
            br#"{"id":"e1","name":"content_moderation","errors":["Your request was flagged by our content moderation system, as a result your request was denied and you were not charged."]}"#,
            None,
        );
        assert_eq!(moderation.kind(), Some(ErrorKind::ContentPolicy));
        assert_eq!(moderation.detail().request_id.as_deref(), Some("e1"));
        assert!(matches!(
            classify(403, br#"{"name":"forbidden","errors":["bad key"]}"#, None),
            Failure::Stop {
                reason: StopReason::Unauthorized,
                ..
            }
        ));
        assert!(matches!(
            classify(
                402,
                br#"{"name":"payment_required","errors":["You lack sufficient credits"]}"#,
                None
            ),
            Failure::Stop {
                reason: StopReason::QuotaExhausted,
                ..
            }
        ));
        let limited = classify(
            429,
            br#"{"name":"rate_limit_exceeded","errors":["timed out for 60 seconds"]}"#,
            None,
        );
        assert!(
            matches!(limited, Failure::Retryable { after: Some(d), .. } if d == RATE_LIMIT_TIMEOUT)
        );
        let bad = classify(
            400,
            br#"{"name":"bad_request","errors":["aspect_ratio: must be one of"]}"#,
            None,
        );
        assert_eq!(bad.kind(), Some(ErrorKind::InvalidRequest));
        assert!(bad.message().contains("aspect_ratio"));
        assert!(classify(500, b"<html>", None).is_retryable());
    }
}

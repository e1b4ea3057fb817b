//! What the Black Forest Labs API answers: the submit (`{"id", "polling_url"}`), the poll
//! (`{"id", "status", "result": {"sample", "seed"}, "progress", "details"}`) and its errors
//! (FastAPI's `{"detail": ...}`, a string or a list of field errors).
//!
//! The traps: a moderated request or image comes back as a poll *status*, not an HTTP error; a
//! 429 at submit is the account's cap on active tasks (wait, nothing was bought), a 402 means
//! the credits are gone (nothing will work until someone pays).

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::domain::error::{ErrorKind, Failure, ProviderDetail, StopReason};
use crate::http::{billed_failure, by_status};

/// A task the API accepted.
#[derive(Debug, Clone, PartialEq)]
pub struct Submitted {
    pub id: String,
    pub polling_url: String,
    /// What it costs, in credits, when the answer says.
    pub cost: Option<f64>,
}

/// Reads the answer to an accepted submit (a JSON object). It was accepted, so a failure here
/// is billed: the task exists, and nothing says where.
pub fn read_submit(body: &[u8]) -> Result<Submitted, Failure> {
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
    match (text("id"), text("polling_url")) {
        (Some(id), Some(polling_url)) => Ok(Submitted {
            id,
            polling_url,
            cost: object
                .get("cost")
                .and_then(Value::as_f64)
                .filter(|c| c.is_finite() && *c >= 0.0),
        }),
        _ => Err(billed_failure(
            "the provider accepted the submit without an id and a polling_url".into(),
        )),
    }
}

/// Where a task is.
#[derive(Debug, Clone, PartialEq)]
pub enum Polled {
    Pending {
        progress: Option<f64>,
    },
    Ready {
        sample: String,
        seed: Option<u64>,
    },
    /// The input was refused (`Request Moderated`) or the image was (`Content Moderated`).
    Moderated {
        status: String,
        details: Option<Value>,
    },
    /// The task failed at the provider.
    Error {
        message: String,
    },
    /// The provider does not know the task (`Task not found`).
    NotFound,
}

#[derive(Deserialize)]
struct PollBody {
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    progress: Option<Value>,
    #[serde(default)]
    details: Option<Value>,
}

/// Reads the answer to a poll; `Err` says why it is not one.
pub fn read_poll(body: &[u8]) -> Result<Polled, String> {
    let parsed: PollBody = serde_json::from_slice(body)
        .map_err(|e| format!("the poll's answer could not be read: {e}"))?;
    let status = parsed.status.unwrap_or_default();
    Ok(match status.as_str() {
        "Pending" | "Queued" | "Processing" => Polled::Pending {
            progress: parsed.progress.as_ref().and_then(Value::as_f64),
        },
        "Ready" => {
            let result = parsed.result.unwrap_or(Value::Null);
            let sample = result
                .get("sample")
                .and_then(Value::as_str)
                .filter(|s| !s.is_empty())
                .ok_or("a Ready task without result.sample")?;
            Polled::Ready {
                sample: sample.to_string(),
                seed: result.get("seed").and_then(Value::as_u64),
            }
        }
        "Request Moderated" | "Content Moderated" => Polled::Moderated {
            status,
            details: parsed.details,
        },
        "Error" | "Failed" => Polled::Error {
            message: parsed
                .details
                .map(|d| d.to_string())
                .unwrap_or_else(|| "the task failed at the provider".into()),
        },
        "Task not found" => Polled::NotFound,
        other => {
            return Err(format!(
                "the poll's status {:?} is not one the API documents",
                other.chars().take(64).collect::<String>()
            ));
        }
    })
}

/// The failure of a moderated task: `content_policy`, the status as its code.
pub fn moderated(status: &str, details: Option<Value>, request_id: Option<String>) -> Failure {
    let what = if status == "Request Moderated" {
        "refused the request"
    } else {
        "refused the image it made"
    };
    Failure::Permanent {
        kind: ErrorKind::ContentPolicy,
        message: format!("the provider {what} ({status})"),
        detail: Box::new(ProviderDetail {
            status: Some(200),
            code: Some(status.to_string()),
            request_id,
            refusal: details,
            rate_limits: None,
            // A task is billed when its submit is accepted, moderated or not.
            charged: true,
        }),
    }
}

/// The `detail` of an error body, as text (FastAPI's, shared with fal).
pub use crate::http::fastapi_detail as error_detail;

/// Classifies an error answer (to a submit or a poll): 402 pauses the provider (credits),
/// 429 is a wait (the cap on active tasks; nothing was bought), 401 and 403 stop it (the key),
/// 400, 404 and 422 fail the job, the rest by status.
pub fn classify(status: u16, body: &[u8], after: Option<Duration>) -> Failure {
    let message = error_detail(body).unwrap_or_else(|| format!("HTTP {status}"));
    let detail = Box::new(ProviderDetail {
        status: Some(status),
        ..ProviderDetail::default()
    });
    match status {
        402 => Failure::Stop {
            reason: StopReason::QuotaExhausted,
            message: format!("the account's credits are used up: {message}"),
            detail,
        },
        422 => Failure::Permanent {
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
    fn submits_and_polls_are_read_as_the_api_writes_them() {
        let s = read_submit(br#"{"id":"t-1","polling_url":"https://api.eu.bfl.ai/v1/get_result?id=t-1","cost":3.0}"#).unwrap();
        assert_eq!((s.id.as_str(), s.cost), ("t-1", Some(3.0)));
        assert!(
            read_submit(br#"{"id":"t-1"}"#)
                .unwrap_err()
                .possibly_billed()
        );
        assert!(read_submit(b"<html>").unwrap_err().possibly_billed());
        assert!(
            read_submit(br#"["i","h"]"#).is_err(),
            "an object, not an array"
        );
        assert_eq!(
            read_poll(br#"{"id":"t","status":"Pending","result":null,"progress":0.4}"#).unwrap(),
            Polled::Pending {
                progress: Some(0.4)
            }
        );
        assert_eq!(
            read_poll(br#"{"status":"Ready","result":{"sample":"https://delivery-eu1.bfl.ai/x.png?sig=1","seed":7}}"#).unwrap(),
            Polled::Ready { sample: "https://delivery-eu1.bfl.ai/x.png?sig=1".into(), seed: Some(7) }
        );
        assert!(read_poll(br#"{"status":"Ready","result":{}}"#).is_err());
        assert_eq!(
            read_poll(br#"{"status":"Task not found"}"#).unwrap(),
            Polled::NotFound
        );
        assert!(matches!(
            read_poll(br#"{"status":"Error"}"#).unwrap(),
            Polled::Error { .. }
        ));
        assert!(read_poll(br#"{"status":"Exploded"}"#).is_err());
        let Polled::Moderated { status, details } =
            read_poll(br#"{"status":"Content Moderated","details":{"Moderation Reasons":["x"]}}"#)
                .unwrap()
        else {
            panic!("moderated")
        };
        let f = moderated(&status, details, Some("t".into()));
        assert_eq!(f.kind(), Some(ErrorKind::ContentPolicy));
        assert_eq!(f.detail().code.as_deref(), Some("Content Moderated"));
    }

    #[test]
    fn errors_are_classified_by_what_they_mean_at_this_provider() {
        assert!(matches!(
            classify(402, br#"{"detail":"Insufficient credits"}"#, None),
            Failure::Stop {
                reason: StopReason::QuotaExhausted,
                ..
            }
        ));
        let cap = classify(
            429,
            br#"{"detail":"too many active tasks"}"#,
            Some(Duration::from_secs(2)),
        );
        assert!(matches!(
            cap,
            Failure::Retryable {
                possibly_billed: false,
                after: Some(_),
                ..
            }
        ));
        assert!(matches!(
            classify(403, br#"{"detail":"Invalid API key"}"#, None),
            Failure::Stop {
                reason: StopReason::Unauthorized,
                ..
            }
        ));
        let invalid = classify(
            422,
            br#"{"detail":[{"loc":["body","width"],"msg":"Input should be a multiple of 16","type":"multiple_of"}]}"#,
            None,
        );
        assert_eq!(invalid.kind(), Some(ErrorKind::InvalidRequest));
        assert_eq!(
            invalid.message(),
            "body.width: Input should be a multiple of 16"
        );
        assert!(classify(503, b"", None).is_retryable());
        for empty in [
            &br#"{"detail":[]}"#[..],
            br#"{"detail":""}"#,
            br#"{"detail":"  "}"#,
        ] {
            assert_eq!(classify(422, empty, None).message(), "HTTP 422");
        }
        assert_eq!(
            classify(404, br#"{"detail":"Not Found"}"#, None).kind(),
            Some(ErrorKind::InvalidRequest)
        );
    }
}

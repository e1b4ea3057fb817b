//! What Replicate's predictions API answers: a prediction (`{"id", "status", "urls": {"get",
//! "cancel"}, "output", "error", "metrics"}`) to a create and to each poll, and errors as
//! problem details (`{"title", "detail", "status"}`; a 429 as `{"detail": "Request was
//! throttled. Expected available in N seconds."}`).
//!
//! The traps: a prediction that `failed` was run (and billed), and its `error` is free text in
//! which a safety checker's refusal ("NSFW content detected") must be told from a crash; a
//! prediction `canceled` by someone else is not the job's failure; `output` is a URL or a list
//! of URLs (some models answer a data URI), and the files are deleted after an hour.

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::domain::error::{ErrorKind, Failure, ProviderDetail, StopReason};
use crate::http::{billed_failure, by_status};

/// A prediction, as created or polled.
#[derive(Debug, Clone, PartialEq)]
pub struct Prediction {
    pub id: String,
    /// `urls.get`: where to poll it.
    pub get: String,
    /// `urls.cancel`, when given.
    pub cancel: Option<String>,
    pub state: State,
    /// `metrics.predict_time`, in seconds.
    pub predict_time: Option<f64>,
}

/// Where a prediction is.
#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// `starting` or `processing`.
    Running,
    /// `succeeded`, with the URLs of its outputs.
    Succeeded(Vec<String>),
    /// `failed`, refused by a safety checker.
    Refused(String),
    /// `failed` otherwise.
    Failed(String),
    /// `canceled`.
    Canceled,
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    urls: Option<Urls>,
    #[serde(default)]
    output: Option<Value>,
    #[serde(default)]
    error: Option<Value>,
    #[serde(default)]
    metrics: Option<Value>,
}

#[derive(Deserialize)]
struct Urls {
    #[serde(default)]
    get: Option<String>,
    #[serde(default)]
    cancel: Option<String>,
}

/// Words by which the models' safety checkers say they refused.
const REFUSALS: &[&str] = &["nsfw", "safety", "sensitive", "flagged", "moderat"];

/// Reads a prediction (the answer to a create, or to a poll). A create was accepted, so a
/// failure to read its answer is billed: the prediction exists, and nothing says where.
pub fn read_prediction(body: &[u8]) -> Result<Prediction, Failure> {
    let parsed: Body = serde_json::from_slice::<serde_json::Map<String, Value>>(body)
        .and_then(|m| serde_json::from_value(Value::Object(m)))
        .map_err(|e| billed_failure(format!("the provider's prediction could not be read: {e}")))?;
    let urls = parsed.urls;
    let (Some(id), Some(get)) = (
        parsed.id.filter(|i| !i.is_empty()),
        urls.as_ref()
            .and_then(|u| u.get.clone())
            .filter(|g| !g.is_empty()),
    ) else {
        return Err(billed_failure(
            "the provider's prediction has no id or no urls.get".into(),
        ));
    };
    let error = parsed.error.as_ref().map(|e| {
        e.as_str()
            .map_or_else(|| e.to_string(), str::to_string)
            .chars()
            .take(1000)
            .collect::<String>()
    });
    let state = match parsed.status.as_deref().unwrap_or("") {
        "starting" | "processing" => State::Running,
        "succeeded" => {
            let outputs = outputs(parsed.output.as_ref());
            if outputs.is_empty() {
                return Err(billed_failure(
                    "the provider's prediction succeeded without an output".into(),
                ));
            }
            State::Succeeded(outputs)
        }
        "failed" => {
            let message = error.unwrap_or_else(|| "the prediction failed".into());
            let lower = message.to_lowercase();
            if REFUSALS.iter().any(|w| lower.contains(w)) {
                State::Refused(message)
            } else {
                State::Failed(message)
            }
        }
        "canceled" | "aborted" => State::Canceled,
        other => {
            return Err(billed_failure(format!(
                "the prediction's status {:?} is not one the API documents",
                other.chars().take(64).collect::<String>()
            )));
        }
    };
    Ok(Prediction {
        id,
        get: get.to_string(),
        cancel: urls.and_then(|u| u.cancel).filter(|c| !c.is_empty()),
        state,
        predict_time: parsed
            .metrics
            .as_ref()
            .and_then(|m| m.get("predict_time"))
            .and_then(Value::as_f64)
            .filter(|t| t.is_finite() && *t >= 0.0),
    })
}

/// The output's URLs: a string, or the strings of a list (other values are not images).
fn outputs(output: Option<&Value>) -> Vec<String> {
    match output {
        Some(Value::String(s)) if !s.is_empty() => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

/// The failure of a prediction that ran and did not succeed.
pub fn failure(state: &State, id: &str) -> Failure {
    // A prediction that ran (refused by its safety checker, or failed) was charged for its time.
    let detail = |code: &str| {
        Box::new(ProviderDetail {
            status: Some(200),
            code: Some(code.into()),
            request_id: Some(id.to_string()),
            charged: code == "failed",
            ..ProviderDetail::default()
        })
    };
    match state {
        State::Refused(message) => Failure::Permanent {
            kind: ErrorKind::ContentPolicy,
            message: format!("the model refused: {message}"),
            detail: detail("failed"),
        },
        State::Failed(message) => Failure::Retryable {
            message: format!("the prediction failed: {message}"),
            after: None,
            possibly_billed: true,
            detail: detail("failed"),
        },
        State::Canceled => Failure::Retryable {
            message: "the prediction was canceled at the provider".into(),
            after: None,
            possibly_billed: true,
            detail: detail("canceled"),
        },
        State::Running | State::Succeeded(_) => Failure::transient("the prediction has not failed"),
    }
}

#[derive(Deserialize, Default)]
struct Problem {
    #[serde(default)]
    title: Option<String>,
    #[serde(default)]
    detail: Option<Value>,
}

/// The words of an error body: its `detail` (and `title`).
pub fn problem(body: &[u8]) -> Option<String> {
    let p: Problem = serde_json::from_slice(body).ok()?;
    let detail = p
        .detail
        .map(|d| d.as_str().map_or_else(|| d.to_string(), str::to_string));
    let text = match (p.title, detail) {
        (Some(t), Some(d)) if !d.trim().is_empty() => format!("{t}: {d}"),
        (Some(t), _) => t,
        (None, Some(d)) => d,
        (None, None) => return None,
    };
    Some(text.chars().take(1000).collect()).filter(|t: &String| !t.trim().is_empty())
}

/// The delay a 429's detail names ("Expected available in 3 seconds.").
fn throttled_for(text: &str) -> Option<Duration> {
    let after = text.split("available in").nth(1)?;
    let number: String = after
        .trim_start()
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    number
        .parse::<f64>()
        .ok()
        .filter(|s| s.is_finite() && *s >= 0.0 && *s < 3600.0)
        .map(Duration::from_secs_f64)
}

/// Classifies an error answer to a create or a poll: 402 pauses the provider (billing); 401 and
/// 403 stop it (the token); 429 waits the delay it names; 404 and 422 fail the job (no such
/// model, invalid input); the rest by status.
pub fn classify(status: u16, body: &[u8], after: Option<Duration>) -> Failure {
    let message = problem(body).unwrap_or_else(|| format!("HTTP {status}"));
    let detail = Box::new(ProviderDetail {
        status: Some(status),
        ..ProviderDetail::default()
    });
    match status {
        402 => Failure::Stop {
            reason: StopReason::QuotaExhausted,
            message: format!("the account cannot pay: {message}"),
            detail,
        },
        429 => Failure::Retryable {
            after: after.or_else(|| throttled_for(&message)),
            message,
            possibly_billed: false,
            detail,
        },
        404 | 422 => Failure::Permanent {
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
    fn predictions_are_read_in_every_state() {
        let p = read_prediction(br#"{"id":"p1","status":"starting","urls":{"get":"https://api.replicate.com/v1/predictions/p1","cancel":"https://api.replicate.com/v1/predictions/p1/cancel"},"output":null}"#).unwrap();
        assert_eq!(p.state, State::Running);
        assert_eq!(
            p.cancel.as_deref(),
            Some("https://api.replicate.com/v1/predictions/p1/cancel")
        );
        let done = read_prediction(br#"{"id":"p1","status":"succeeded","urls":{"get":"g"},"output":["https://replicate.delivery/a.png","https://replicate.delivery/b.png"],"metrics":{"predict_time":2.5}}"#).unwrap();
        assert_eq!(
            done.state,
            State::Succeeded(vec![
                "https://replicate.delivery/a.png".into(),
                "https://replicate.delivery/b.png".into()
            ])
        );
        assert_eq!(done.predict_time, Some(2.5));
        let one = read_prediction(br#"{"id":"p1","status":"succeeded","urls":{"get":"g"},"output":"https://replicate.delivery/a.webp"}"#).unwrap();
        assert_eq!(
            one.state,
            State::Succeeded(vec!["https://replicate.delivery/a.webp".into()])
        );
        let nsfw = read_prediction(br#"{"id":"p1","status":"failed","urls":{"get":"g"},"error":"All generated images contained NSFW content. Try running it again with a different prompt."}"#).unwrap();
        assert!(matches!(nsfw.state, State::Refused(_)));
        assert_eq!(
            failure(&nsfw.state, "p1").kind(),
            Some(ErrorKind::ContentPolicy)
        );
        let crash = read_prediction(
            br#"{"id":"p1","status":"failed","urls":{"get":"g"},"error":"CUDA out of memory"}"#,
        )
        .unwrap();
        assert!(failure(&crash.state, "p1").possibly_billed());
        assert!(
            read_prediction(br#"{"id":"p1","status":"succeeded","urls":{"get":"g"},"output":[]}"#)
                .unwrap_err()
                .possibly_billed()
        );
        assert!(
            read_prediction(br#"{"id":"p1","status":"starting"}"#).is_err(),
            "no urls.get"
        );
        assert!(read_prediction(br#"["p1"]"#).is_err());
    }

    #[test]
    fn errors_are_classified() {
        let t = classify(
            429,
            br#"{"detail":"Request was throttled. Expected available in 3 seconds.","status":429}"#,
            None,
        );
        assert!(
            matches!(t, Failure::Retryable { after: Some(d), .. } if d == Duration::from_secs(3))
        );
        assert!(matches!(classify(402, br#"{"title":"Insufficient credit","detail":"You have insufficient credit to run this model.","status":402}"#, None), Failure::Stop { reason: StopReason::QuotaExhausted, .. }));
        let invalid = classify(422, br#"{"title":"Input validation failed","detail":"- input.width: Must be less than or equal to 1440","status":422}"#, None);
        assert_eq!(invalid.kind(), Some(ErrorKind::InvalidRequest));
        assert!(invalid.message().contains("input.width"));
        assert!(matches!(classify(401, br#"{"title":"Unauthenticated","detail":"You did not pass a valid authentication token","status":401}"#, None), Failure::Stop { reason: StopReason::Unauthorized, .. }));
        assert!(classify(503, b"", None).is_retryable());
    }
}

//! Reading an error answer of the Gemini API: `{"error": {"code", "status", "message",
//! "details": [...]}}` (google.rpc.Status), where `details` may hold a `QuotaFailure` (which quota
//! was exceeded), a `RetryInfo` (`retryDelay` like `"17s"`) and an `ErrorInfo` (`reason` such as
//! `API_KEY_INVALID`).

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::domain::error::{ErrorKind, Failure, ProviderDetail, StopReason};
use crate::domain::limits::reported_delay;
use crate::http::by_status;

#[derive(Debug, Default, Deserialize)]
struct Envelope {
    #[serde(default)]
    error: Option<Status>,
}

/// The `error` of an error answer.
#[derive(Debug, Default, Clone, Deserialize)]
pub struct Status {
    #[serde(default)]
    pub code: Option<i64>,
    #[serde(default)]
    pub status: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default)]
    pub details: Vec<Value>,
}

impl Status {
    /// Reads an error body; anything unreadable is an empty status (the HTTP status decides).
    pub fn parse(body: &[u8]) -> Status {
        serde_json::from_slice::<Envelope>(body)
            .ok()
            .and_then(|e| e.error)
            .unwrap_or_default()
    }

    fn details_of<'a>(&'a self, type_suffix: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
        self.details.iter().filter(move |d| {
            d.get("@type")
                .and_then(Value::as_str)
                .is_some_and(|t| t.ends_with(type_suffix))
        })
    }

    /// The ids of the quotas a `QuotaFailure` names (`quotaId`, else `quotaMetric`).
    pub fn quota_ids(&self) -> Vec<String> {
        self.details_of("google.rpc.QuotaFailure")
            .filter_map(|d| d.get("violations").and_then(Value::as_array))
            .flatten()
            .filter_map(|v| {
                v.get("quotaId")
                    .or_else(|| v.get("quotaMetric"))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .collect()
    }

    /// The delay a `RetryInfo` asks for, else the "Please retry in 36.4s." of the message.
    pub fn retry_delay(&self) -> Option<Duration> {
        let from_info = self
            .details_of("google.rpc.RetryInfo")
            .find_map(|d| d.get("retryDelay").and_then(Value::as_str))
            .and_then(|s| s.trim().strip_suffix('s')?.parse::<f64>().ok());
        let from_message = || {
            let message = self.message.as_deref()?;
            let at = message.find("retry in ")? + "retry in ".len();
            let rest = &message[at..];
            let end = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .unwrap_or(rest.len());
            let secs = rest[..end].parse::<f64>().ok()?;
            rest[end..].starts_with('s').then_some(secs)
        };
        from_info.or_else(from_message).and_then(reported_delay)
    }

    /// The `reason` of an `ErrorInfo` (`API_KEY_INVALID`, `RATE_LIMIT_EXCEEDED`).
    pub fn reason(&self) -> Option<String> {
        self.details_of("google.rpc.ErrorInfo")
            .find_map(|d| d.get("reason").and_then(Value::as_str))
            .map(str::to_string)
    }
}

/// Whether a quota id names a daily quota (`GenerateRequestsPerDayPerProjectPerModel`).
fn per_day(quota_id: &str) -> bool {
    let id = quota_id.to_ascii_lowercase();
    id.contains("perday") || id.contains("per_day") || id.contains("daily")
}

/// Classifies an error answer: a per-day quota pauses the provider (nothing works until it
/// resets; its probes find out when it has); any other `RESOURCE_EXHAUSTED` is a rate limit,
/// retried after its delay; a refused or invalid key stops it; the rest by status.
pub fn classify(
    status: u16,
    body: &Status,
    after: Option<Duration>,
    request_id: Option<String>,
) -> Failure {
    let grpc = body.status.clone();
    let reason = body.reason();
    let message = body
        .message
        .clone()
        .filter(|m| !m.trim().is_empty())
        .unwrap_or_else(|| format!("HTTP {status}"));
    let message: String = message.chars().take(1000).collect();
    let detail = Box::new(ProviderDetail {
        status: Some(status),
        code: grpc.clone().or_else(|| reason.clone()),
        request_id,
        refusal: None,
        rate_limits: None,
        charged: false,
    });
    if status == 429 || grpc.as_deref() == Some("RESOURCE_EXHAUSTED") {
        let quotas = body.quota_ids();
        if let Some(daily) = quotas.iter().find(|q| per_day(q)) {
            return Failure::Stop {
                reason: StopReason::QuotaExhausted,
                message: format!("the per-day quota {daily} is used up: {message}"),
                detail,
            };
        }
        return Failure::Retryable {
            message,
            after: body.retry_delay().or(after),
            possibly_billed: false,
            detail,
        };
    }
    // An invalid key is a 400 INVALID_ARGUMENT with reason API_KEY_INVALID: not the job's fault.
    if matches!(
        reason.as_deref(),
        Some("API_KEY_INVALID" | "API_KEY_EXPIRED" | "SERVICE_DISABLED")
    ) || grpc.as_deref() == Some("UNAUTHENTICATED")
    {
        return Failure::Stop {
            reason: StopReason::Unauthorized,
            message,
            detail,
        };
    }
    if status == 400 && grpc.as_deref() == Some("FAILED_PRECONDITION") {
        // "User location is not supported", billing not enabled: the account, not the job.
        return Failure::Stop {
            reason: StopReason::Unauthorized,
            message,
            detail,
        };
    }
    if status == 404 {
        return Failure::Permanent {
            kind: ErrorKind::InvalidRequest,
            message,
            detail,
        };
    }
    by_status(status, message, after, None, detail)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn failure(status: u16, json: &str) -> Failure {
        classify(status, &Status::parse(json.as_bytes()), None, None)
    }

    #[test]
    fn resource_exhausted_per_minute_is_retried_after_its_delay() {
        let f = failure(
            429,
            r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"You exceeded your current quota. Please retry in 36.42s.",
            "details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaMetric":"generativelanguage.googleapis.com/generate_content_paid_tier_requests","quotaId":"GenerateRequestsPerMinutePerProjectPerModel"}]},
                       {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"17s"}]}}"#,
        );
        match f {
            Failure::Retryable {
                after,
                possibly_billed,
                ..
            } => {
                assert_eq!(after, Some(Duration::from_secs(17)));
                assert!(!possibly_billed);
            }
            other => panic!("{other:?}"),
        }
        // Without RetryInfo, the message's own delay.
        let f = failure(
            429,
            r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"Quota exceeded. Please retry in 2.5s."}}"#,
        );
        assert!(
            matches!(f, Failure::Retryable { after: Some(d), .. } if d == Duration::from_millis(2500))
        );
    }

    #[test]
    fn resource_exhausted_per_day_pauses_the_provider() {
        let f = failure(
            429,
            r#"{"error":{"code":429,"status":"RESOURCE_EXHAUSTED","message":"You exceeded your current quota",
            "details":[{"@type":"type.googleapis.com/google.rpc.QuotaFailure","violations":[{"quotaId":"GenerateRequestsPerDayPerProjectPerModel-FreeTier"}]},
                       {"@type":"type.googleapis.com/google.rpc.RetryInfo","retryDelay":"36s"}]}}"#,
        );
        match f {
            Failure::Stop {
                reason, message, ..
            } => {
                assert_eq!(reason, StopReason::QuotaExhausted);
                assert!(message.contains("PerDay"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn keys_accounts_arguments_and_outages_are_told_apart() {
        let key = failure(
            400,
            r#"{"error":{"code":400,"message":"API key not valid. Please pass a valid API key.","status":"INVALID_ARGUMENT",
            "details":[{"@type":"type.googleapis.com/google.rpc.ErrorInfo","reason":"API_KEY_INVALID","domain":"googleapis.com"}]}}"#,
        );
        assert!(
            matches!(
                key,
                Failure::Stop {
                    reason: StopReason::Unauthorized,
                    ..
                }
            ),
            "{key:?}"
        );
        let denied = failure(
            403,
            r#"{"error":{"code":403,"status":"PERMISSION_DENIED","message":"denied"}}"#,
        );
        assert!(matches!(
            denied,
            Failure::Stop {
                reason: StopReason::Unauthorized,
                ..
            }
        ));
        let bad = failure(
            400,
            r#"{"error":{"code":400,"status":"INVALID_ARGUMENT","message":"Invalid aspect ratio"}}"#,
        );
        assert_eq!(bad.kind(), Some(ErrorKind::InvalidRequest));
        assert_eq!(bad.message(), "Invalid aspect ratio");
        let model = failure(
            404,
            r#"{"error":{"code":404,"status":"NOT_FOUND","message":"models/x is not found"}}"#,
        );
        assert_eq!(model.kind(), Some(ErrorKind::InvalidRequest));
        for status in [500, 503, 504] {
            assert!(failure(status, r#"{"error":{"status":"UNAVAILABLE"}}"#).is_retryable());
        }
        let garbage = failure(502, "<html>bad gateway</html>");
        assert_eq!(garbage.message(), "HTTP 502");
        assert!(garbage.is_retryable());
    }
}

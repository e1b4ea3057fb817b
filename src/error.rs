//! The one error taxonomy of a job, and the one place that classifies provider answers into it.
//!
//! Every failure a job can meet ends up as a [`Failure`]:
//! - **permanent**: retrying cannot help (a refused prompt, a bad request, a bad job): fail the job
//!   once, dead-letter it, pay nothing more;
//! - **retryable**: transient (429 rate limit, 408, 409, 5xx, connection errors, timeouts), with an
//!   optional server-given delay;
//! - **stop**: nothing will work until an operator acts (out of quota, bad credentials): stop
//!   taking jobs and give the current ones back untouched.

use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a job failed, as carried in `data.error.kind` of a `job.failed` event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The provider's safety system refused the prompt.
    ContentPolicy,
    /// The provider rejected the request's parameters (other 4xx).
    InvalidRequest,
    /// The job message itself is malformed or breaks the contract.
    InvalidJob,
    /// Transient failures persisted past the configured attempts or total delay.
    RetriesExhausted,
    /// The job's batch reached its spend cap (`budget.max_batch_usd`); no provider call was made.
    BudgetExceeded,
    /// The job's batch was cancelled (`imagegen cancel`) before the job started.
    Cancelled,
    /// The job's `deadline` passed before it started.
    Expired,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::ContentPolicy => "content_policy",
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::InvalidJob => "invalid_job",
            ErrorKind::RetriesExhausted => "retries_exhausted",
            ErrorKind::BudgetExceeded => "budget_exceeded",
            ErrorKind::Cancelled => "cancelled",
            ErrorKind::Expired => "expired",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why the worker must stop taking jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The account is out of quota or credit (429 `insufficient_quota` and the billing codes).
    QuotaExhausted,
    /// The credentials are wrong or not allowed (401, and 403 that concern the whole account).
    Unauthorized,
    /// The object store keeps failing: buying images that cannot be stored must stop.
    StorageUnavailable,
    /// This worker reached its spend cap (`budget.max_worker_usd`).
    BudgetExhausted,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::QuotaExhausted => "quota_exhausted",
            StopReason::Unauthorized => "unauthorized",
            StopReason::StorageUnavailable => "storage_unavailable",
            StopReason::BudgetExhausted => "budget_exhausted",
        })
    }
}

/// What the provider said, kept for events and logs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProviderDetail {
    pub status: Option<u16>,
    pub code: Option<String>,
    pub request_id: Option<String>,
    /// Refusal details (moderation categories) when the provider gave them.
    pub refusal: Option<serde_json::Value>,
    /// The response's rate-limit headers, for the throttle.
    pub rate_limits: Option<crate::throttle::RateLimits>,
}

/// A classified failure. (The provider's detail is boxed to keep `Result<_, Failure>` small.)
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    Permanent {
        kind: ErrorKind,
        message: String,
        detail: Box<ProviderDetail>,
    },
    Retryable {
        message: String,
        /// The server's own delay (retry-after-ms / retry-after), to be honoured.
        after: Option<Duration>,
        /// The request may have reached the provider and been billed (timeout or reset after sending).
        possibly_billed: bool,
        detail: Box<ProviderDetail>,
    },
    Stop {
        reason: StopReason,
        message: String,
        detail: Box<ProviderDetail>,
    },
}

impl Failure {
    pub fn invalid_job(message: impl Into<String>) -> Self {
        Failure::Permanent {
            kind: ErrorKind::InvalidJob,
            message: message.into(),
            detail: Box::default(),
        }
    }

    pub fn transient(message: impl Into<String>) -> Self {
        Failure::Retryable {
            message: message.into(),
            after: None,
            possibly_billed: false,
            detail: Box::default(),
        }
    }

    pub fn message(&self) -> &str {
        match self {
            Failure::Permanent { message, .. }
            | Failure::Retryable { message, .. }
            | Failure::Stop { message, .. } => message,
        }
    }

    pub fn detail(&self) -> &ProviderDetail {
        match self {
            Failure::Permanent { detail, .. }
            | Failure::Retryable { detail, .. }
            | Failure::Stop { detail, .. } => detail,
        }
    }

    pub fn detail_mut(&mut self) -> &mut ProviderDetail {
        match self {
            Failure::Permanent { detail, .. }
            | Failure::Retryable { detail, .. }
            | Failure::Stop { detail, .. } => detail,
        }
    }

    /// What the failure says about the provider's load, for the throttle: a 429 that is not
    /// about money, or a 503, is pushback.
    pub fn feedback(&self) -> crate::throttle::Feedback {
        match self {
            Failure::Retryable { detail, .. } if matches!(detail.status, Some(429 | 503)) => {
                crate::throttle::Feedback::Pushback
            }
            _ => crate::throttle::Feedback::Ignore,
        }
    }

    /// A storage failure that outlived its retries: stop taking jobs until storage is back.
    pub fn storage_down(self) -> Failure {
        match self {
            Failure::Retryable {
                message, detail, ..
            } => Failure::Stop {
                reason: StopReason::StorageUnavailable,
                message,
                detail,
            },
            other => other,
        }
    }

    pub fn is_retryable(&self) -> bool {
        matches!(self, Failure::Retryable { .. })
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Permanent { kind, message, .. } => write!(f, "{kind}: {message}"),
            Failure::Retryable { message, .. } => write!(f, "transient: {message}"),
            Failure::Stop {
                reason, message, ..
            } => write!(f, "{reason}: {message}"),
        }
    }
}

impl std::error::Error for Failure {}

/// The error object of an OpenAI-style error body: `{"error": {"message", "type", "param", "code"}}`.
#[derive(Debug, Default, Deserialize)]
pub struct ApiErrorBody {
    #[serde(default)]
    pub message: Option<String>,
    #[serde(default, rename = "type")]
    pub kind: Option<String>,
    #[serde(default)]
    pub param: Option<serde_json::Value>,
    #[serde(default)]
    pub code: Option<serde_json::Value>,
    /// Azure: `inner_error` / `innererror` with the content filter's verdict.
    #[serde(default, alias = "innererror")]
    pub inner_error: Option<serde_json::Value>,
    #[serde(default)]
    pub moderation_details: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct ApiErrorEnvelope {
    error: ApiErrorBody,
}

impl ApiErrorBody {
    /// Parses an error body; anything unparseable gives an empty body (the status still decides).
    pub fn parse(body: &[u8]) -> Self {
        serde_json::from_slice::<ApiErrorEnvelope>(body)
            .map(|e| e.error)
            .unwrap_or_default()
    }

    fn code_str(&self) -> Option<String> {
        match &self.code {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        }
    }
}

/// Billing codes that mean "out of money": not retryable, stop taking jobs.
const QUOTA_CODES: &[&str] = &[
    "insufficient_quota",
    "billing_hard_limit_reached",
    "credit_balance_exhausted",
    "organization_spend_limit_exceeded",
    "project_spend_limit_exceeded",
    "organization_usage_limit_exceeded",
];

/// Codes of a safety refusal.
const REFUSAL_CODES: &[&str] = &[
    "moderation_blocked",
    "content_policy_violation",
    "contentFilter",
    "content_filter",
    "ResponsibleAIPolicyViolation",
];

/// 403 codes that concern one request (a model this account may not use), not the whole account.
const PER_JOB_FORBIDDEN_CODES: &[&str] =
    &["model_not_found", "model_not_allowed", "unsupported_model"];

/// An error with its causes, outermost first: "error sending request: connection refused".
pub fn with_causes(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    message
}

/// Classifies an HTTP error answer of an image API. `should_retry` is the `x-should-retry` header,
/// which overrides the status-based decision as in the official SDKs (but never turns a refusal,
/// a quota or a credentials problem into a retry).
pub fn classify_http(
    status: u16,
    body: &ApiErrorBody,
    after: Option<Duration>,
    should_retry: Option<bool>,
    request_id: Option<String>,
) -> Failure {
    let code = body.code_str();
    let kind = body.kind.clone();
    let message = body
        .message
        .clone()
        .filter(|m| !m.is_empty())
        .unwrap_or_else(|| format!("HTTP {status}"));
    let detail = Box::new(ProviderDetail {
        status: Some(status),
        code: code.clone().or_else(|| kind.clone()),
        request_id,
        refusal: body
            .moderation_details
            .clone()
            .or_else(|| body.inner_error.clone()),
        rate_limits: None,
    });
    let is = |list: &[&str], v: &Option<String>| v.as_deref().is_some_and(|v| list.contains(&v));
    let inner_code = body
        .inner_error
        .as_ref()
        .and_then(|v| v.get("code"))
        .and_then(|v| v.as_str())
        .map(str::to_string);

    if is(QUOTA_CODES, &code) || is(QUOTA_CODES, &kind) {
        return Failure::Stop {
            reason: StopReason::QuotaExhausted,
            message,
            detail,
        };
    }
    if is(REFUSAL_CODES, &code) || is(REFUSAL_CODES, &inner_code) {
        return Failure::Permanent {
            kind: ErrorKind::ContentPolicy,
            message,
            detail,
        };
    }
    // A 403 about a model the account may not use ("must be verified to use the model X",
    // model_not_found) fails only the jobs that ask for it; any other 403 (IP not allowed,
    // region, organisation) concerns the whole account: stop.
    let forbidden_model = status == 403
        && (is(PER_JOB_FORBIDDEN_CODES, &code) || message.to_ascii_lowercase().contains("model"));
    if status == 401 || (status == 403 && !forbidden_model) {
        return Failure::Stop {
            reason: StopReason::Unauthorized,
            message,
            detail,
        };
    }
    let retryable_status = matches!(status, 408 | 409 | 429) || status >= 500;
    let retry = match should_retry {
        Some(explicit) => explicit,
        None => retryable_status,
    };
    if retry {
        Failure::Retryable {
            message,
            after,
            possibly_billed: false,
            detail,
        }
    } else {
        Failure::Permanent {
            kind: ErrorKind::InvalidRequest,
            message,
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_shown_with_their_causes() {
        #[derive(Debug, thiserror::Error)]
        #[error("error sending request")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::new(
            std::io::ErrorKind::ConnectionRefused,
            "connection refused",
        ));
        assert_eq!(with_causes(&e), "error sending request: connection refused");
    }

    fn body(json: &str) -> ApiErrorBody {
        ApiErrorBody::parse(json.as_bytes())
    }

    fn classify(status: u16, json: &str) -> Failure {
        classify_http(status, &body(json), None, None, None)
    }

    #[test]
    fn moderation_is_permanent_content_policy_with_details() {
        let f = classify(
            400,
            r#"{"error":{"message":"Your request was rejected by the safety system.","type":"image_generation_user_error","param":null,"code":"moderation_blocked","moderation_details":{"categories":["violence"]}}}"#,
        );
        match f {
            Failure::Permanent { kind, detail, .. } => {
                assert_eq!(kind, ErrorKind::ContentPolicy);
                assert_eq!(detail.code.as_deref(), Some("moderation_blocked"));
                assert_eq!(detail.refusal.unwrap()["categories"][0], "violence");
            }
            other => panic!("{other:?}"),
        }
        let azure = classify(
            400,
            r#"{"error":{"code":"content_policy_violation","message":"filtered","inner_error":{"code":"ResponsibleAIPolicyViolation"}}}"#,
        );
        assert!(matches!(
            azure,
            Failure::Permanent {
                kind: ErrorKind::ContentPolicy,
                ..
            }
        ));
    }

    #[test]
    fn rate_limits_and_server_errors_retry_with_the_server_delay() {
        let f = classify_http(
            429,
            &body(
                r#"{"error":{"message":"Rate limit reached","type":"requests","code":"rate_limit_exceeded"}}"#,
            ),
            Some(Duration::from_millis(1500)),
            None,
            Some("req_1".into()),
        );
        match f {
            Failure::Retryable { after, detail, .. } => {
                assert_eq!(after, Some(Duration::from_millis(1500)));
                assert_eq!(detail.request_id.as_deref(), Some("req_1"));
            }
            other => panic!("{other:?}"),
        }
        for status in [408, 409, 500, 502, 503, 504] {
            assert!(classify(status, "not json").is_retryable(), "{status}");
        }
    }

    #[test]
    fn out_of_money_stops_the_worker_not_the_job() {
        for json in [
            r#"{"error":{"message":"You exceeded your current quota","type":"insufficient_quota","code":"insufficient_quota"}}"#,
            r#"{"error":{"message":"x","type":"requests","code":"credit_balance_exhausted"}}"#,
            r#"{"error":{"message":"x","type":"invalid_request_error","code":"organization_spend_limit_exceeded"}}"#,
        ] {
            assert!(
                matches!(
                    classify(429, json),
                    Failure::Stop {
                        reason: StopReason::QuotaExhausted,
                        ..
                    }
                ),
                "{json}"
            );
        }
    }

    #[test]
    fn credentials_stop_but_a_forbidden_model_fails_one_job() {
        assert!(matches!(
            classify(
                401,
                r#"{"error":{"code":"invalid_api_key","message":"bad key"}}"#
            ),
            Failure::Stop {
                reason: StopReason::Unauthorized,
                ..
            }
        ));
        assert!(matches!(
            classify(
                403,
                r#"{"error":{"code":"unsupported_country_region_territory"}}"#
            ),
            Failure::Stop {
                reason: StopReason::Unauthorized,
                ..
            }
        ));
        assert!(matches!(
            classify(
                403,
                r#"{"error":{"code":"model_not_found","message":"no access"}}"#
            ),
            Failure::Permanent {
                kind: ErrorKind::InvalidRequest,
                ..
            }
        ));
        assert!(matches!(
            classify(
                403,
                r#"{"error":{"type":"invalid_request_error","code":null,"message":"Your organization must be verified to use the model `gpt-image-2`."}}"#
            ),
            Failure::Permanent {
                kind: ErrorKind::InvalidRequest,
                ..
            }
        ));
    }

    #[test]
    fn other_client_errors_are_permanent_and_x_should_retry_overrides() {
        for status in [400, 404, 413, 422] {
            assert!(
                matches!(
                    classify(status, "{}"),
                    Failure::Permanent {
                        kind: ErrorKind::InvalidRequest,
                        ..
                    }
                ),
                "{status}"
            );
        }
        assert!(classify_http(400, &body("{}"), None, Some(true), None).is_retryable());
        assert!(!classify_http(503, &body("{}"), None, Some(false), None).is_retryable());
        // x-should-retry never makes a refusal retryable.
        assert!(
            !classify_http(
                400,
                &body(r#"{"error":{"code":"moderation_blocked"}}"#),
                None,
                Some(true),
                None
            )
            .is_retryable()
        );
    }
}

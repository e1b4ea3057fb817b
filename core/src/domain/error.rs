//! The one error taxonomy of a job. Each provider classifies its own answers into it (it knows
//! its protocol: see `provider::http` for the status-code defaults they share); the worker acts
//! on the taxonomy alone.
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
    /// The job's `deadline` passed before its images were made (no call is made after it).
    Expired,
    /// The job's id (in its batch) was used before by a job with other fields: the stored
    /// result belongs to that one, and is not handed to this one.
    Conflict,
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
            ErrorKind::Conflict => "conflict",
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
    /// The object store refuses the worker (access denied, no such bucket): not an outage, a
    /// configuration to fix. Nothing is retried until then.
    StorageRefused,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StopReason::QuotaExhausted => "quota_exhausted",
            StopReason::Unauthorized => "unauthorized",
            StopReason::StorageUnavailable => "storage_unavailable",
            StopReason::BudgetExhausted => "budget_exhausted",
            StopReason::StorageRefused => "storage_refused",
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
    pub rate_limits: Option<super::limits::RateLimits>,
    /// The provider charged for this answer though it holds no image (an image it made, then
    /// refused): its cost is counted at the request's estimate.
    pub charged: bool,
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

    /// Whether the provider may have billed the call although it failed (a timeout or reset
    /// after the request was sent, an answer too big, unreadable or not downloadable).
    pub fn possibly_billed(&self) -> bool {
        matches!(
            self,
            Failure::Retryable {
                possibly_billed: true,
                ..
            }
        )
    }

    /// The kind of a permanent failure.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            Failure::Permanent { kind, .. } => Some(*kind),
            _ => None,
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

    #[test]
    fn only_transient_storage_failures_become_a_storage_stop() {
        assert!(matches!(
            Failure::transient("503").storage_down(),
            Failure::Stop {
                reason: StopReason::StorageUnavailable,
                ..
            }
        ));
        assert!(matches!(
            Failure::invalid_job("bad").storage_down(),
            Failure::Permanent { .. }
        ));
    }
}

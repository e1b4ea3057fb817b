//! The provider's error answers: `{"error": {"message", "type", "param", "code"}}` with its
//! status codes, wording and retry headers, for the faults a test injects and for the requests
//! the fake itself refuses. Clients classify errors by these fields (a moderation refusal is final,
//! a quota error stops the worker, a 429 is retried after the given delay), so they must match
//! what the provider sends.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::Fault;
use super::limits::{Refusal, go_duration};

/// An error answer: `{"error": {"message", "type", "param", "code"}}` plus retry headers.
pub(super) struct ApiError {
    pub(super) status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    /// Adds `moderation_details` to the body.
    moderation_blocked: bool,
    /// `retry-after` / `retry-after-ms`.
    pub(super) headers: Vec<(&'static str, String)>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
            moderation_blocked: false,
            headers: Vec::new(),
        }
    }

    pub(super) fn invalid(
        param: Option<&str>,
        code: &'static str,
        message: impl Into<String>,
    ) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some(code),
            message,
        );
        e.param = param.map(str::to_owned);
        e
    }

    /// Any other error of type `invalid_request_error`, with its own status, param and code:
    /// the Files and Batch endpoints' refusals.
    pub(super) fn request_error(
        status: StatusCode,
        param: Option<&str>,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        let mut e = Self::new(status, "invalid_request_error", code, message);
        e.param = param.map(str::to_owned);
        e
    }

    /// 429 for an account rate limit, with the provider's wording and delay headers.
    pub(super) fn rate_limited(model: &str, refusal: &Refusal) -> Self {
        let Refusal { what, limit, wait } = *refusal;
        let kind = if what.starts_with("tokens") {
            "tokens"
        } else {
            "requests"
        };
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            kind,
            Some("rate_limit_exceeded"),
            format!(
                "Rate limit reached for {model} in organization org-fake on {what}: Limit {limit}, \
                 Used {limit}, Requested 1. Please try again in {}. Visit \
                 https://platform.openai.com/account/rate-limits to learn more.",
                go_duration(wait)
            ),
        );
        let ms = (wait.as_secs_f64() * 1000.0).ceil();
        e.headers.push(("retry-after-ms", format!("{ms}")));
        e.headers
            .push(("retry-after", format!("{}", (ms / 1000.0).ceil() as u64)));
        e
    }

    pub(super) fn unparsable_body() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't \
             using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was \
             sent was not valid JSON. If you have trouble figuring out how to fix this, please \
             contact us through our help center at help.openai.com.)",
        )
    }

    pub(super) fn missing_key() -> Self {
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            "You didn't provide an API key. You need to provide your API key in an Authorization \
             header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password \
             field (with blank username) if you're accessing the API from your browser and are \
             prompted for a username. You can obtain an API key from \
             https://platform.openai.com/account/api-keys.",
        )
    }

    /// 404 for a path the API does not have, as its router answers it.
    pub(super) fn unknown_url(method: &str, path: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "invalid_request_error",
            None,
            format!("Invalid URL ({method} {path})"),
        )
    }

    pub(super) fn incorrect_key(key: &str) -> Self {
        let shown: String = if key.chars().count() > 8 {
            let tail: String = key
                .chars()
                .rev()
                .take(4)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!(
                "{}{}{tail}",
                key.chars().take(3).collect::<String>(),
                "*".repeat(8)
            )
        } else {
            "*".repeat(key.chars().count())
        };
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            format!(
                "Incorrect API key provided: {shown}. You can find your API key at \
                 https://platform.openai.com/account/api-keys."
            ),
        )
    }

    pub(super) fn from_fault(fault: &Fault, request: &Value, request_id: &str) -> Self {
        let model = request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("gpt-image-2");
        match fault {
            Fault::RateLimited {
                retry_after_secs,
                retry_after_ms,
            } => {
                let wait = retry_after_ms
                    .map(|ms| ms / 1000.0)
                    .or(*retry_after_secs)
                    .unwrap_or(1.0);
                let mut e = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "requests",
                    Some("rate_limit_exceeded"),
                    format!(
                        "Rate limit reached for {model} in organization org-fake on requests per min \
                         (RPM): Limit 500, Used 500, Requested 1. Please try again in {wait:.3}s. Visit \
                         https://platform.openai.com/account/rate-limits to learn more."
                    ),
                );
                if let Some(secs) = retry_after_secs {
                    let secs = secs.max(0.0).ceil() as u64;
                    e.headers.push(("retry-after", secs.to_string()));
                }
                if let Some(ms) = retry_after_ms {
                    e.headers.push(("retry-after-ms", ms.max(0.0).to_string()));
                }
                e.headers
                    .push(("x-ratelimit-remaining-requests", "0".into()));
                e
            }
            Fault::ServerError { status } => {
                let status = StatusCode::from_u16(*status)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    Self::new(
                        status,
                        "server_error",
                        Some("server_is_overloaded"),
                        "The server is overloaded or not ready yet.",
                    )
                } else {
                    Self::new(
                        status,
                        "server_error",
                        Some("server_error"),
                        format!(
                            "The server had an error while processing your request. Sorry about that! \
                             You can retry your request, or contact us through our help center at \
                             help.openai.com if the error persists. (Please include the request ID \
                             {request_id} in your message.)"
                        ),
                    )
                }
            }
            Fault::Moderation => {
                let mut e = Self::new(
                    StatusCode::BAD_REQUEST,
                    "image_generation_user_error",
                    Some("moderation_blocked"),
                    format!(
                        "Your request was rejected by the safety system. If you believe this is an \
                         error, contact us at help.openai.com and include the request ID {request_id}."
                    ),
                );
                e.moderation_blocked = true;
                e
            }
            Fault::ContentPolicy => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("content_policy_violation"),
                "Your request was rejected as a result of our safety system. Your prompt may contain \
                 text that is not allowed by our safety system.",
            ),
            Fault::InvalidRequest { param } => {
                let message = match param {
                    Some(p) => format!("Invalid value for '{p}'."),
                    None => "Invalid request.".to_owned(),
                };
                let mut e = Self::invalid(param.as_deref(), "invalid_value", message);
                if param.is_none() {
                    e.code = None;
                }
                e
            }
            Fault::ModelNotFound => Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                format!("The model '{model}' does not exist or you do not have access to it."),
            ),
            Fault::QuotaExhausted => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("insufficient_quota"),
                "You exceeded your current quota, please check your plan and billing details. For \
                 more information on this error, read the docs: \
                 https://platform.openai.com/docs/guides/error-codes/api-errors.",
            ),
            Fault::Unauthorized => Self::incorrect_key("sk-fake-revoked-key"),
            Fault::Forbidden => Self::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                None,
                format!(
                    "Your organization must be verified to use the model `{model}`. Please go to: \
                     https://platform.openai.com/settings/organization/general and click on Verify \
                     Organization. If you just verified, it can take up to 15 minutes for access to \
                     propagate."
                ),
            ),
            // Handled before errors are built; kept total for safety.
            Fault::Hang { .. } | Fault::Reset | Fault::NotAnImage => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                Some("server_error"),
                "The server had an error while processing your request.",
            ),
        }
    }

    pub(super) fn body(&self) -> Value {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        });
        if self.moderation_blocked {
            error["moderation_details"] = json!({ "categories": ["violence"] });
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

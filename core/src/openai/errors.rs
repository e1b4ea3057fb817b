//! What the Images API says besides images: its error bodies, classified into the taxonomy, and
//! its rate-limit headers, read for the throttle.
//!
//! Error body: `{"error": {"message", "type", "param", "code"}}` (Azure adds `inner_error` with
//! the content filter's verdict). Rate limits: `x-ratelimit-{limit,remaining,reset}-{requests,
//! tokens}`, the reset as a Go duration (`6m0s`).

use std::time::Duration;

use http::HeaderMap;
use serde::Deserialize;

use crate::domain::error::{ErrorKind, Failure, ProviderDetail, StopReason};
use crate::domain::limits::{MAX_REPORTED_COUNT, MAX_REPORTED_DELAY, Quota, RateLimits};
use crate::http::by_status;

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

/// Classifies an error answer of the Images API (and of Azure OpenAI, which shares its shape).
/// `should_retry` is the `x-should-retry` header, which overrides the status-based decision as
/// in the official SDKs (but never turns a refusal, a quota or a credentials problem into a
/// retry).
pub fn classify(
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
        charged: false,
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
    if forbidden_model {
        return Failure::Permanent {
            kind: ErrorKind::InvalidRequest,
            message,
            detail,
        };
    }
    by_status(status, message, after, should_retry, detail)
}

/// Reads the `x-ratelimit-{limit,remaining,reset}-{requests,tokens}` headers; `None` when the
/// answer has none.
pub fn rate_limits(headers: &HeaderMap) -> Option<RateLimits> {
    let quota = |what: &str| {
        let get = |name: String| headers.get(name)?.to_str().ok().map(str::trim);
        let limit = get(format!("x-ratelimit-limit-{what}"))?
            .parse::<f64>()
            .ok()?;
        let remaining = get(format!("x-ratelimit-remaining-{what}"))?
            .parse::<f64>()
            .ok()?;
        let reset = get(format!("x-ratelimit-reset-{what}"))
            .and_then(parse_go_duration)
            .unwrap_or(Duration::from_secs(60))
            .min(MAX_REPORTED_DELAY);
        // A limit below one a minute is no limit an account has: the header is broken.
        (limit.is_finite() && limit >= 1.0 && remaining.is_finite()).then(|| {
            let limit = limit.min(MAX_REPORTED_COUNT);
            Quota {
                limit,
                remaining: remaining.clamp(0.0, limit),
                reset,
            }
        })
    };
    let limits = RateLimits {
        requests: quota("requests"),
        tokens: quota("tokens"),
    };
    (limits.requests.is_some() || limits.tokens.is_some()).then_some(limits)
}

/// Parses a Go duration as OpenAI sends it: `1s`, `6m0s`, `12ms`, `1h2m3.5s`, `250us`.
pub fn parse_go_duration(s: &str) -> Option<Duration> {
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    let mut total = 0.0_f64;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let value: f64 = rest[..number_len].parse().ok()?;
        rest = &rest[number_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return None,
        };
        rest = &rest[unit_len..];
        total += value * scale;
    }
    Duration::try_from_secs_f64(total).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn go_durations_parse_like_openai_sends_them() {
        assert_eq!(parse_go_duration("1s"), Some(Duration::from_secs(1)));
        assert_eq!(parse_go_duration("6m0s"), Some(Duration::from_secs(360)));
        assert_eq!(parse_go_duration("12ms"), Some(Duration::from_millis(12)));
        assert_eq!(
            parse_go_duration("1h2m3.5s"),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(parse_go_duration("250us"), Some(Duration::from_micros(250)));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("soon"), None);
        assert_eq!(parse_go_duration("5"), None);
        assert_eq!(parse_go_duration(""), None);
    }

    #[test]
    fn headers_are_read_and_clamped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("x-ratelimit-limit-requests", "500"),
            ("x-ratelimit-remaining-requests", "499"),
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-limit-tokens", "1000"),
            ("x-ratelimit-remaining-tokens", "2000"),
        ] {
            h.insert(k, HeaderValue::from_static(v));
        }
        let limits = rate_limits(&h).unwrap();
        assert_eq!(
            limits.requests,
            Some(Quota {
                limit: 500.0,
                remaining: 499.0,
                reset: Duration::from_millis(120)
            })
        );
        let tokens = limits.tokens.unwrap();
        assert_eq!(tokens.remaining, 1000.0, "clamped to the limit");
        assert_eq!(
            tokens.reset,
            Duration::from_secs(60),
            "a missing reset means a minute"
        );
        assert_eq!(rate_limits(&HeaderMap::new()), None);

        // Hostile values: a limit too small to be one is ignored, huge ones are bounded.
        let of = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            rate_limits(&h)
        };
        for tiny in ["0", "1e-300", "-5", "NaN"] {
            let h = [
                ("x-ratelimit-limit-requests", tiny),
                ("x-ratelimit-remaining-requests", "0"),
            ];
            assert_eq!(of(&h), None, "{tiny}");
        }
        let huge = of(&[
            ("x-ratelimit-limit-requests", "1e308"),
            ("x-ratelimit-remaining-requests", "1e308"),
            ("x-ratelimit-reset-requests", "99999999999h"),
        ])
        .unwrap()
        .requests
        .unwrap();
        assert_eq!(huge.limit, MAX_REPORTED_COUNT);
        assert_eq!(huge.remaining, MAX_REPORTED_COUNT);
        assert_eq!(huge.reset, MAX_REPORTED_DELAY);
    }

    fn body(json: &str) -> ApiErrorBody {
        ApiErrorBody::parse(json.as_bytes())
    }

    fn of(status: u16, json: &str) -> Failure {
        classify(status, &body(json), None, None, None)
    }

    #[test]
    fn moderation_is_permanent_content_policy_with_details() {
        let f = of(
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
        let azure = of(
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
        let f = classify(
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
            assert!(of(status, "not json").is_retryable(), "{status}");
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
                    of(429, json),
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
        // Each case: status, body, and whether the answer stops the worker (bad credentials or
        // a region without access) rather than failing the one job.
        let cases = [
            (
                401,
                r#"{"error":{"code":"invalid_api_key","message":"bad key"}}"#,
                true,
            ),
            (
                403,
                r#"{"error":{"code":"unsupported_country_region_territory"}}"#,
                true,
            ),
            (
                403,
                r#"{"error":{"code":"model_not_found","message":"no access"}}"#,
                false,
            ),
            (
                403,
                r#"{"error":{"type":"invalid_request_error","code":null,"message":"Your organization must be verified to use the model `gpt-image-2`."}}"#,
                false,
            ),
        ];
        for (status, json, stops) in cases {
            let failure = of(status, json);
            let ok = if stops {
                matches!(
                    failure,
                    Failure::Stop {
                        reason: StopReason::Unauthorized,
                        ..
                    }
                )
            } else {
                matches!(
                    failure,
                    Failure::Permanent {
                        kind: ErrorKind::InvalidRequest,
                        ..
                    }
                )
            };
            assert!(ok, "{status} {json}: {failure:?}");
        }
    }

    #[test]
    fn other_client_errors_are_permanent_and_x_should_retry_overrides() {
        for status in [400, 404, 413, 422] {
            assert!(
                matches!(
                    of(status, "{}"),
                    Failure::Permanent {
                        kind: ErrorKind::InvalidRequest,
                        ..
                    }
                ),
                "{status}"
            );
        }
        assert!(classify(400, &body("{}"), None, Some(true), None).is_retryable());
        assert!(!classify(503, &body("{}"), None, Some(false), None).is_retryable());
        // x-should-retry never makes a refusal retryable.
        assert!(
            !classify(
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

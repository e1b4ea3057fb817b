//! What the Microsoft Entra ID token endpoint answers to a client-credentials grant: a bearer
//! token with its lifetime (RFC 6749 section 5.1), or an error (section 5.2) whose code says
//! whether the credentials are wrong (an operator must act) or the service is unwell (retry).

use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;

use crate::domain::error::{Failure, StopReason};

/// A token the endpoint granted.
#[derive(Debug, Clone, PartialEq)]
pub struct Grant {
    pub access_token: String,
    pub lifetime: Duration,
}

#[derive(Deserialize)]
struct Answer {
    access_token: String,
    #[serde(default)]
    token_type: Option<String>,
    /// A number; some of Entra's older endpoints send a string.
    expires_in: Value,
}

#[derive(Deserialize, Default)]
struct ErrorAnswer {
    #[serde(default)]
    error: String,
    #[serde(default)]
    error_description: String,
}

/// The longest lifetime believed (Entra's tokens live about an hour; a day is far beyond).
const MAX_LIFETIME: Duration = Duration::from_secs(86_400);

/// Reads the endpoint's answer of HTTP `status`.
pub fn read_grant(status: u16, body: &[u8]) -> Result<Grant, Failure> {
    if status != 200 {
        let error: ErrorAnswer = serde_json::from_slice(body).unwrap_or_default();
        return Err(grant_failure(
            status,
            &error.error,
            &error.error_description,
        ));
    }
    let answer: Answer = serde_json::from_slice(body).map_err(|e| {
        Failure::transient(format!(
            "the Entra ID token endpoint answered no token: {e}"
        ))
    })?;
    if answer
        .token_type
        .as_deref()
        .is_some_and(|t| !t.eq_ignore_ascii_case("bearer"))
    {
        return Err(Failure::transient(
            "the Entra ID token endpoint answered a token that is not a bearer token",
        ));
    }
    if answer.access_token.is_empty() || !answer.access_token.bytes().all(|b| b.is_ascii_graphic())
    {
        return Err(Failure::transient(
            "the Entra ID token endpoint answered a token that cannot be sent in a header",
        ));
    }
    let secs = match &answer.expires_in {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
    .filter(|s| *s > 0)
    .ok_or_else(|| Failure::transient("the Entra ID token has no usable expires_in"))?;
    Ok(Grant {
        access_token: answer.access_token,
        lifetime: Duration::from_secs(secs).min(MAX_LIFETIME),
    })
}

/// A refused grant: wrong credentials or an application not allowed stop the provider (an
/// operator must act); a throttled or failing endpoint is retried.
fn grant_failure(status: u16, error: &str, description: &str) -> Failure {
    // The description names the AADSTS code and the cause, then trace ids; it holds no secret.
    let first_line: String = description
        .lines()
        .next()
        .unwrap_or("")
        .trim()
        .chars()
        .take(300)
        .collect();
    let code: String = error.chars().take(64).collect();
    let message = format!(
        "the Entra ID token endpoint refused the grant (HTTP {status}, {}): {first_line}",
        if code.is_empty() {
            "no error code"
        } else {
            &code
        }
    );
    let refused = matches!(
        error,
        "invalid_client"
            | "unauthorized_client"
            | "invalid_grant"
            | "invalid_scope"
            | "invalid_request"
            | "unsupported_grant_type"
    ) || matches!(status, 400 | 401 | 403);
    if refused && status != 429 && status < 500 {
        Failure::Stop {
            reason: StopReason::Unauthorized,
            message,
            detail: Box::default(),
        }
    } else {
        Failure::Retryable {
            message,
            after: None,
            possibly_billed: false,
            detail: Box::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grant_gives_its_token_and_lifetime() {
        let g = read_grant(
            200,
            br#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0.abc"}"#,
        )
        .unwrap();
        assert_eq!(g.access_token, "eyJ0.abc");
        assert_eq!(g.lifetime, Duration::from_secs(3599));
        let s = read_grant(200, br#"{"expires_in":"60","access_token":"t"}"#).unwrap();
        assert_eq!(s.lifetime, Duration::from_secs(60));
        for bad in [
            &br#"{"token_type":"pop","expires_in":60,"access_token":"t"}"#[..],
            br#"{"expires_in":60,"access_token":"a b"}"#,
            br#"{"expires_in":0,"access_token":"t"}"#,
            br#"{"access_token":"t"}"#,
            b"<html>",
        ] {
            assert!(read_grant(200, bad).unwrap_err().is_retryable());
        }
    }

    #[test]
    fn refused_credentials_stop_and_outages_are_retried() {
        let f = read_grant(
            401,
            br#"{"error":"invalid_client","error_description":"AADSTS7000215: Invalid client secret provided.\r\nTrace ID: x"}"#,
        )
        .unwrap_err();
        assert!(matches!(
            f,
            Failure::Stop {
                reason: StopReason::Unauthorized,
                ..
            }
        ));
        assert!(f.message().contains("AADSTS7000215"), "{f:?}");
        assert!(!f.message().contains("Trace ID"), "first line only");
        assert!(read_grant(503, b"").unwrap_err().is_retryable());
        assert!(read_grant(429, b"{}").unwrap_err().is_retryable());
    }
}

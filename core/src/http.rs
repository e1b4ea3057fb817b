//! What every HTTP provider's answers share, read without doing any I/O: the standard
//! `retry-after` header, failures that may have been billed, and the status-code defaults of the
//! taxonomy. Each provider reads its own error bodies first and falls back to [`by_status`].

use std::time::Duration;

use http::HeaderMap;
use serde_json::Value;

use crate::domain::error::{ErrorKind, Failure, ProviderDetail, StopReason};
use crate::domain::limits::{MAX_REPORTED_DELAY, reported_delay};

/// A header's value as text, when it is text.
/// Where an answer's body goes as it arrives, chunk by chunk.
pub trait BodySink {
    fn push(&mut self, chunk: &[u8]) -> Result<(), Failure>;
    /// Bytes taken so far (to keep to a size limit).
    fn taken(&self) -> usize;
}

/// A plain buffer: the body as it arrived.
impl BodySink for crate::buffers::PooledBuf {
    fn push(&mut self, chunk: &[u8]) -> Result<(), Failure> {
        self.extend_from_slice(chunk);
        Ok(())
    }
    fn taken(&self) -> usize {
        self.len()
    }
}

impl BodySink for Vec<u8> {
    fn push(&mut self, chunk: &[u8]) -> Result<(), Failure> {
        self.extend_from_slice(chunk);
        Ok(())
    }
    fn taken(&self) -> usize {
        self.len()
    }
}

pub fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The server's requested delay: `retry-after-ms` (float milliseconds, as OpenAI and Azure
/// send it), else `retry-after` (seconds, or an HTTP date).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(after) = header_str(headers, "retry-after-ms")
        .and_then(|v| v.trim().parse::<f64>().ok())
        .and_then(|ms| reported_delay(ms / 1000.0))
    {
        return Some(after);
    }
    let value = header_str(headers, "retry-after")?;
    let value = value.trim();
    if let Ok(secs) = value.parse::<f64>() {
        return reported_delay(secs);
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(
        at.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO)
            .min(MAX_REPORTED_DELAY),
    )
}

/// A failure after the request may have reached the provider: it may have been billed.
pub fn billed_failure(message: String) -> Failure {
    Failure::Retryable {
        message,
        after: None,
        possibly_billed: true,
        detail: Box::default(),
    }
}

/// Decodes the base64 at `span` of an answer's body in place (SIMD), where the image then is.
/// Invalid base64 is a billed failure: the answer came, its image cannot be read.
pub fn decode_in_place(
    body: &mut [u8],
    span: std::ops::Range<usize>,
) -> Result<std::ops::Range<usize>, Failure> {
    let n = base64_simd::STANDARD
        .decode_inplace(&mut body[span.clone()])
        .map_err(invalid_base64)?
        .len();
    Ok(span.start..span.start + n)
}

/// Decodes base64 the JSON parser had to unescape (so not in the body) into an image of its own.
pub fn decode_owned(b64: &str) -> Result<bytes::Bytes, Failure> {
    base64_simd::STANDARD
        .decode_to_vec(b64.as_bytes())
        .map(bytes::Bytes::from)
        .map_err(invalid_base64)
}

fn invalid_base64(e: base64_simd::Error) -> Failure {
    billed_failure(format!("the provider returned invalid base64: {e}"))
}

/// Attaches the provider's request id to a retryable failure.
pub fn with_request_id(mut failure: Failure, request_id: &Option<String>) -> Failure {
    if let Failure::Retryable { detail, .. } = &mut failure {
        detail.request_id.clone_from(request_id);
    }
    failure
}

/// The taxonomy's defaults by status, for an answer whose body said nothing more precise:
/// 401 and 403 stop taking jobs (credentials, account); 408, 409, 429 and 5xx are retried
/// (after `after` when the server gave it); any other status is a permanent `invalid_request`.
/// `should_retry` (a provider's explicit hint, such as OpenAI's `x-should-retry`) overrides the
/// retry decision, never a stop.
pub fn by_status(
    status: u16,
    message: String,
    after: Option<Duration>,
    should_retry: Option<bool>,
    detail: Box<ProviderDetail>,
) -> Failure {
    if matches!(status, 401 | 403) {
        return Failure::Stop {
            reason: StopReason::Unauthorized,
            message,
            detail,
        };
    }
    let retryable_status = matches!(status, 408 | 409 | 429) || status >= 500;
    if should_retry.unwrap_or(retryable_status) {
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

/// The `detail` of a FastAPI error body (BFL's, fal's), as text: a string, or the field errors
/// of a 422 joined; `None` when it says nothing.
pub fn fastapi_detail(body: &[u8]) -> Option<String> {
    let value: Value = serde_json::from_slice(body).ok()?;
    let text = match value.get("detail")? {
        Value::String(s) => s.clone(),
        Value::Array(items) => items
            .iter()
            .map(|i| {
                let loc = i
                    .get("loc")
                    .and_then(Value::as_array)
                    .map(|l| {
                        l.iter()
                            .map(|p| p.as_str().map_or_else(|| p.to_string(), str::to_string))
                            .collect::<Vec<_>>()
                            .join(".")
                    })
                    .unwrap_or_default();
                let msg = i.get("msg").and_then(Value::as_str).unwrap_or("invalid");
                if loc.is_empty() {
                    msg.to_string()
                } else {
                    format!("{loc}: {msg}")
                }
            })
            .collect::<Vec<_>>()
            .join("; "),
        other => other.to_string(),
    };
    // An empty detail (`""`, `[]`) says nothing: the status speaks instead.
    Some(text.chars().take(1000).collect()).filter(|t: &String| !t.trim().is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_prefers_milliseconds_then_seconds_then_dates() {
        assert_eq!(
            retry_after(&headers(&[
                ("retry-after-ms", "1500.5"),
                ("retry-after", "9")
            ])),
            Some(Duration::from_secs_f64(1.5005))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")])),
            Some(Duration::from_secs(2))
        );
        let later = std::time::SystemTime::now() + Duration::from_secs(30);
        let d = retry_after(&headers(&[(
            "retry-after",
            &httpdate::fmt_http_date(later),
        )]))
        .unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        // Hostile values are bounded, never a panic or a wait of years.
        for (name, value) in [
            ("retry-after", "1e300"),
            ("retry-after", "18446744073709551616"),
            ("retry-after-ms", "1e300"),
            ("retry-after", "Fri, 31 Dec 9999 23:59:59 GMT"),
        ] {
            assert_eq!(
                retry_after(&headers(&[(name, value)])),
                Some(MAX_REPORTED_DELAY),
                "{name}: {value}"
            );
        }
        assert_eq!(retry_after(&headers(&[("retry-after", "-5")])), None);
        assert_eq!(retry_after(&headers(&[("retry-after", "NaN")])), None);
        assert_eq!(retry_after(&headers(&[])), None);
    }

    #[test]
    fn statuses_default_to_the_taxonomy_and_a_hint_overrides_retries_only() {
        let of = |status, hint| by_status(status, "m".into(), None, hint, Box::default());
        for status in [408, 409, 429, 500, 502, 503, 504] {
            assert!(of(status, None).is_retryable(), "{status}");
        }
        for status in [400, 404, 413, 422] {
            assert!(
                matches!(
                    of(status, None),
                    Failure::Permanent {
                        kind: ErrorKind::InvalidRequest,
                        ..
                    }
                ),
                "{status}"
            );
        }
        assert!(matches!(of(401, None), Failure::Stop { .. }));
        assert!(matches!(of(403, Some(true)), Failure::Stop { .. }));
        assert!(of(400, Some(true)).is_retryable());
        assert!(!of(503, Some(false)).is_retryable());
    }
}

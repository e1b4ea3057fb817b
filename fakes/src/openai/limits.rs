//! The account's rate limits: requests and tokens per minute, each a token bucket, reported on
//! every response in the `x-ratelimit-*` headers so that a client can pace itself from them.

use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use crate::bucket::TokenBucket;

/// Limits reported when none is set: large enough never to bind, and a client reading the headers
/// sees plausible numbers rather than none.
const UNLIMITED_RPM: u64 = 1_000_000;
const UNLIMITED_TPM: u64 = 1_000_000_000;

/// Why a request was refused: which limit (in the provider's words), its value, and how long
/// until the request would fit.
#[derive(Clone, Copy, Debug)]
pub(super) struct Refusal {
    pub what: &'static str,
    pub limit: u64,
    pub wait: Duration,
}

pub(super) struct AccountLimits {
    requests: (u64, TokenBucket),
    tokens: (u64, TokenBucket),
}

impl AccountLimits {
    /// Full buckets; `None` is unlimited.
    pub(super) fn new(rpm: Option<u64>, tpm: Option<u64>) -> Self {
        let bucket = |per_minute: u64| (per_minute, TokenBucket::per_minute(per_minute));
        Self {
            requests: bucket(rpm.unwrap_or(UNLIMITED_RPM).max(1)),
            tokens: bucket(tpm.unwrap_or(UNLIMITED_TPM).max(1)),
        }
    }

    /// Takes one request and `tokens` tokens, or neither.
    pub(super) fn admit(&mut self, tokens: u64) -> Result<(), Refusal> {
        if let Err(wait) = self.requests.1.try_take(1.0) {
            return Err(Refusal {
                what: "requests per min (RPM)",
                limit: self.requests.0,
                wait,
            });
        }
        // A request larger than the whole bucket would never pass: it costs a full bucket instead.
        let tokens = (tokens as f64).min(self.tokens.1.capacity());
        if let Err(wait) = self.tokens.1.try_take(tokens) {
            self.requests.1.give_back(1.0);
            return Err(Refusal {
                what: "tokens per min (TPM)",
                limit: self.tokens.0,
                wait,
            });
        }
        Ok(())
    }

    pub(super) fn set_headers(&mut self, h: &mut HeaderMap) {
        for (name, (limit, bucket)) in [
            ("requests", &mut self.requests),
            ("tokens", &mut self.tokens),
        ] {
            let remaining = bucket.available().max(0.0).floor() as u64;
            let reset = go_duration(bucket.until_full());
            set_dyn(h, &format!("x-ratelimit-limit-{name}"), *limit);
            set_dyn(h, &format!("x-ratelimit-remaining-{name}"), remaining);
            set_dyn(h, &format!("x-ratelimit-reset-{name}"), reset);
        }
    }
}

/// A duration as Go prints it, as the provider's headers and messages carry it: `120ms`, `1.5s`,
/// `6m0s`.
pub(super) fn go_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let secs = format!("{:.3}", d.as_secs_f64());
        format!("{}s", secs.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

fn set_dyn(headers: &mut HeaderMap, name: &str, value: impl ToString) {
    if let (Ok(n), Ok(v)) = (
        HeaderName::try_from(name),
        HeaderValue::try_from(value.to_string()),
    ) {
        headers.insert(n, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_printed_as_go_does() {
        assert_eq!(go_duration(Duration::from_millis(120)), "120ms");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(go_duration(Duration::from_secs(20)), "20s");
        assert_eq!(go_duration(Duration::from_millis(59_999)), "59.999s");
        assert_eq!(go_duration(Duration::from_secs(360)), "6m0s");
        assert_eq!(go_duration(Duration::from_secs(61)), "1m1s");
    }

    #[test]
    fn a_refused_request_costs_nothing() {
        let mut limits = AccountLimits::new(Some(2), Some(1000));
        limits.admit(600).unwrap();
        let refusal = limits.admit(600).unwrap_err();
        assert_eq!(
            (refusal.what, refusal.limit),
            ("tokens per min (TPM)", 1000)
        );
        // The request refused for its tokens was given back: one more small one fits.
        limits.admit(10).unwrap();
        let refusal = limits.admit(10).unwrap_err();
        assert_eq!(refusal.limit, 2);
    }

    #[test]
    fn headers_report_the_buckets() {
        let mut limits = AccountLimits::new(Some(3), None);
        limits.admit(5).unwrap();
        let mut h = HeaderMap::new();
        limits.set_headers(&mut h);
        assert_eq!(h["x-ratelimit-limit-requests"], "3");
        assert_eq!(h["x-ratelimit-remaining-requests"], "2");
        assert_eq!(h["x-ratelimit-limit-tokens"], "1000000000");
        // One request comes back every 20 s.
        let reset = h["x-ratelimit-reset-requests"].to_str().unwrap();
        assert!(reset == "20s" || reset.starts_with("19.9"), "{reset}");
    }
}

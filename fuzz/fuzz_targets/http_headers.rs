//! The retry and rate-limit headers of provider answers: whatever their values, a delay is at
//! most `MAX_REPORTED_DELAY` and a quota is finite, at least 1 and never below what remains.
#![no_main]

use http::{HeaderMap, HeaderName, HeaderValue};
use imagegen_core::domain::limits::{MAX_REPORTED_COUNT, MAX_REPORTED_DELAY};
use imagegen_core::http::retry_after;
use imagegen_core::openai::errors::{parse_go_duration, rate_limits};
use libfuzzer_sys::fuzz_target;

/// Header names the readers look at; a line `N:value` sets the `N`th (mod their count), a line
/// `name: value` any other.
const NAMES: &[&str] = &[
    "retry-after",
    "retry-after-ms",
    "x-ratelimit-limit-requests",
    "x-ratelimit-remaining-requests",
    "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens",
    "x-ratelimit-remaining-tokens",
    "x-ratelimit-reset-tokens",
];

fuzz_target!(|data: &[u8]| {
    let mut headers = HeaderMap::new();
    for line in data.split(|&b| b == b'\n') {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let name = match name {
            [n] => HeaderName::from_static(NAMES[usize::from(*n) % NAMES.len()]),
            _ => match HeaderName::from_bytes(name) {
                Ok(name) => name,
                Err(_) => continue,
            },
        };
        if let Ok(value) = HeaderValue::from_bytes(value) {
            if let Ok(text) = value.to_str() {
                if let Some(d) = parse_go_duration(text) {
                    assert!(d.as_secs_f64().is_finite());
                }
            }
            headers.append(name, value);
        }
    }
    if let Some(after) = retry_after(&headers) {
        assert!(after <= MAX_REPORTED_DELAY, "{after:?}");
    }
    if let Some(limits) = rate_limits(&headers) {
        for quota in [limits.requests, limits.tokens].into_iter().flatten() {
            assert!((1.0..=MAX_REPORTED_COUNT).contains(&quota.limit), "{quota:?}");
            assert!((0.0..=quota.limit).contains(&quota.remaining), "{quota:?}");
            assert!(quota.reset <= MAX_REPORTED_DELAY, "{quota:?}");
        }
    }
});

//! A provider's rate limits as it reports them on its answers. Each provider reads its own
//! headers into these (OpenAI's `x-ratelimit-*`, say); the worker's throttle paces calls by them.

use std::time::Duration;

/// The longest delay a provider's answer may ask for (`retry-after`, a reset time): a longer
/// one is read as this, so that a hostile or broken header cannot overflow a timer or park a
/// job for years.
pub const MAX_REPORTED_DELAY: Duration = Duration::from_secs(24 * 3600);

/// The largest rate limit (per minute) or usage count (tokens of one call) believed from an
/// answer; a larger number is read as this, so that arithmetic on it stays finite.
pub const MAX_REPORTED_COUNT: f64 = 1e12;

/// A delay a provider reported, in seconds: `None` when it is not a number of seconds at all,
/// bounded by [`MAX_REPORTED_DELAY`].
pub fn reported_delay(secs: f64) -> Option<Duration> {
    (secs.is_finite() && secs >= 0.0)
        .then(|| Duration::from_secs_f64(secs.min(MAX_REPORTED_DELAY.as_secs_f64())))
}

/// One rate limit: how much of it is left and when it is full again.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quota {
    /// Per minute.
    pub limit: f64,
    pub remaining: f64,
    /// Until the bucket is full again.
    pub reset: Duration,
}

/// The rate limits reported by one answer (success or error).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RateLimits {
    /// Requests per minute.
    pub requests: Option<Quota>,
    /// Provider tokens per minute (for token-billed models).
    pub tokens: Option<Quota>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reported_delays_are_bounded_and_nonsense_is_none() {
        assert_eq!(reported_delay(1.5), Some(Duration::from_millis(1500)));
        assert_eq!(reported_delay(1e300), Some(MAX_REPORTED_DELAY));
        assert_eq!(reported_delay(f64::INFINITY), None);
        assert_eq!(reported_delay(f64::NAN), None);
        assert_eq!(reported_delay(-1.0), None);
    }
}

//! A provider's rate limits as it reports them on its answers. Each provider reads its own
//! headers into these (OpenAI's `x-ratelimit-*`, say); the worker's throttle paces calls by them.

use std::time::Duration;

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

//! The token bucket of the local rate limits.

use std::time::Duration;

use tokio::time::Instant;

/// A token bucket refilled continuously at `per_minute / 60` tokens a second, holding at most
/// `capacity`.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    per_sec: f64,
    capacity: f64,
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub fn new(per_minute: f64, capacity: f64) -> Self {
        Self {
            per_sec: per_minute / 60.0,
            capacity: capacity.max(1.0),
            tokens: capacity.max(1.0),
            at: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        self.tokens =
            (self.tokens + (now - self.at).as_secs_f64() * self.per_sec).min(self.capacity);
        self.at = now;
    }

    /// Takes `n` tokens now, going into debt if need be; returns how long to wait until the debt
    /// is paid (zero when the tokens were there).
    pub fn take_with_debt(&mut self, n: f64) -> Duration {
        self.refill();
        self.tokens -= n;
        if self.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-self.tokens / self.per_sec)
        }
    }

    /// Takes `n` tokens if they are there; else returns how long until they will be.
    pub fn try_take(&mut self, n: f64) -> Result<(), Duration> {
        self.refill();
        if self.tokens >= n {
            self.tokens -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - self.tokens) / self.per_sec))
        }
    }

    /// Tokens now (negative while in debt).
    pub fn tokens(&mut self) -> f64 {
        self.refill();
        self.tokens
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }

    /// Time until the bucket is full again.
    pub fn until_full(&mut self) -> Duration {
        self.refill();
        Duration::from_secs_f64(((self.capacity - self.tokens) / self.per_sec).max(0.0))
    }
}

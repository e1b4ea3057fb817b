//! A token bucket, the way providers meter an account: it holds a minute's worth of the limit and
//! refills continuously, so a burst of a whole minute's requests is allowed after a quiet minute
//! and, once empty, capacity comes back a little at a time rather than at the top of the minute.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub(crate) struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    tokens: f64,
    /// When `tokens` was last brought up to date.
    at: Instant,
}

impl TokenBucket {
    /// A full bucket for a limit of `per_minute` (at least 1, so that it always refills).
    pub(crate) fn per_minute(per_minute: u64) -> Self {
        let capacity = per_minute.max(1) as f64;
        Self {
            capacity,
            per_sec: capacity / 60.0,
            tokens: capacity,
            at: Instant::now(),
        }
    }

    pub(crate) fn capacity(&self) -> f64 {
        self.capacity
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let earned = now.saturating_duration_since(self.at).as_secs_f64() * self.per_sec;
        self.tokens = (self.tokens + earned).min(self.capacity);
        self.at = now;
    }

    /// Takes `n` tokens if they are all there. Otherwise takes none and says how long until they
    /// will be, which is what a refused client is told to wait.
    pub(crate) fn try_take(&mut self, n: f64) -> Result<(), Duration> {
        self.refill();
        let short = n - self.tokens;
        if short > 0.0 {
            return Err(Duration::from_secs_f64(short / self.per_sec));
        }
        self.tokens -= n;
        Ok(())
    }

    /// Returns tokens taken for something that was not admitted after all.
    pub(crate) fn give_back(&mut self, n: f64) {
        self.refill();
        self.tokens = (self.tokens + n).min(self.capacity);
    }

    /// Tokens there now; fractions are tokens still refilling.
    pub(crate) fn available(&mut self) -> f64 {
        self.refill();
        self.tokens
    }

    pub(crate) fn until_full(&mut self) -> Duration {
        self.refill();
        Duration::from_secs_f64(((self.capacity - self.tokens) / self.per_sec).max(0.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Moves the bucket's clock back, as if `d` had passed since it was last used.
    fn age(bucket: &mut TokenBucket, d: Duration) {
        bucket.at -= d;
    }

    #[test]
    fn a_full_bucket_holds_a_minute_and_then_refuses() {
        let mut b = TokenBucket::per_minute(60);
        assert_eq!(b.capacity(), 60.0);
        assert_eq!(b.until_full(), Duration::ZERO);
        for _ in 0..60 {
            b.try_take(1.0).unwrap();
        }
        let wait = b.try_take(1.0).unwrap_err();
        assert!(
            wait > Duration::from_millis(990) && wait <= Duration::from_secs(1),
            "{wait:?}"
        );
        let full = b.until_full();
        assert!(
            full > Duration::from_secs(59) && full <= Duration::from_secs(60),
            "{full:?}"
        );
    }

    #[test]
    fn it_refills_continuously_up_to_its_capacity() {
        let mut b = TokenBucket::per_minute(120);
        b.try_take(120.0).unwrap();
        age(&mut b, Duration::from_secs(15));
        let tokens = b.available();
        assert!((30.0..30.1).contains(&tokens), "{tokens}");
        age(&mut b, Duration::from_secs(3600));
        assert_eq!(b.available(), 120.0, "never more than a minute's worth");
    }

    #[test]
    fn a_refused_take_takes_nothing_and_given_back_tokens_count() {
        let mut b = TokenBucket::per_minute(10);
        b.try_take(8.0).unwrap();
        assert!(b.try_take(5.0).is_err());
        let left = b.available();
        assert!((2.0..2.01).contains(&left), "{left}");
        b.give_back(8.0);
        assert_eq!(b.available(), 10.0, "capped at the capacity");
    }

    #[test]
    fn a_zero_limit_still_refills() {
        let mut b = TokenBucket::per_minute(0);
        assert_eq!(b.capacity(), 1.0);
        b.try_take(1.0).unwrap();
        assert!(b.try_take(1.0).unwrap_err() <= Duration::from_secs(60));
    }
}

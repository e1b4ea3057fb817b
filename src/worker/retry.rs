//! Retries of transient failures, as plain decisions: after each failure, [`Retries::next`]
//! says retry after a wait, defer (the wait is too long to hold the message), or give up.
//!
//! Waits grow exponentially (backon's builder) with full jitter and a cap; the server's own delay
//! (`retry-after`) is honoured when it gives one; attempts and the total wait are bounded. A wait
//! longer than `max_in_process_wait` is not slept in-process (a message must never be held near
//! the broker's consumer timeout): the caller republishes the job to a delay queue. Failures
//! after which the request may have been billed (a timeout or reset after sending) are retried
//! at most `max_possibly_billed_retries` times.

use std::future::Future;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::config::RetrySettings;
use crate::domain::error::Failure;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub max_total_delay: Duration,
    pub max_in_process_wait: Duration,
    pub max_possibly_billed_retries: u32,
}

/// What to do after a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again after this wait, holding the message.
    Retry(Duration),
    /// Try again after this wait, which is too long to hold the message: through a delay queue.
    Defer(Duration),
    /// Give up: the failure is permanent, or the attempts, billed retries or total wait ran out.
    GiveUp,
}

/// The retries of one operation within one delivery of a job.
pub struct Retries<'p> {
    policy: &'p RetryPolicy,
    /// Attempts this delivery may make.
    allowed: u32,
    failed: u32,
    waited: Duration,
    possibly_billed: u32,
    backoff: backon::ExponentialBackoff,
}

impl Retries<'_> {
    /// Decides what follows `failure` (which counts as a failed attempt).
    pub fn next(&mut self, failure: &Failure) -> Decision {
        self.failed += 1;
        let after = match failure {
            Failure::Retryable {
                possibly_billed,
                after,
                ..
            } => {
                if *possibly_billed {
                    self.possibly_billed += 1;
                    if self.possibly_billed > self.policy.max_possibly_billed_retries {
                        return Decision::GiveUp;
                    }
                }
                *after
            }
            _ => return Decision::GiveUp,
        };
        if self.failed >= self.allowed {
            return Decision::GiveUp;
        }
        let Some(computed) = self.backoff.next() else {
            return Decision::GiveUp;
        };
        let wait = after.unwrap_or_else(|| computed.mul_f64(fastrand::f64()));
        if wait > self.policy.max_in_process_wait {
            return Decision::Defer(wait.max(Duration::from_nanos(1)));
        }
        if self.waited + wait > self.policy.max_total_delay {
            return Decision::GiveUp;
        }
        self.waited += wait;
        Decision::Retry(wait)
    }

    /// Failed attempts so far.
    pub fn failed(&self) -> u32 {
        self.failed
    }

    /// The sum of the waits so far.
    pub fn waited(&self) -> Duration {
        self.waited
    }

    /// Failures after which the request may have been billed.
    pub fn possibly_billed(&self) -> u32 {
        self.possibly_billed
    }
}

/// What a retried operation came to.
#[derive(Debug)]
pub struct RetryOutcome<T> {
    /// The value, or the last failure (retryable when attempts or total delay ran out).
    pub result: Result<T, Failure>,
    /// How many times the operation ran.
    pub attempts: u32,
    /// The sum of the waits between attempts.
    pub waited: Duration,
    /// The next attempt should come after this wait, which is too long to hold the message.
    pub deferred: Option<Duration>,
    /// Failures after which the request may have been billed.
    pub possibly_billed: u32,
}

impl RetryPolicy {
    pub fn from_settings(s: &RetrySettings) -> Self {
        Self {
            max_attempts: s.max_attempts,
            initial_delay: Duration::from_millis(s.initial_delay_ms),
            max_delay: Duration::from_millis(s.max_delay_ms),
            max_total_delay: Duration::from_secs(s.max_total_delay_secs),
            max_in_process_wait: Duration::from_secs(s.max_in_process_wait_secs),
            max_possibly_billed_retries: s.max_possibly_billed_retries,
        }
    }

    /// The retries of a delivery, with `used` attempts spent on earlier ones (at least one
    /// attempt is always allowed).
    pub fn retries(&self, used: u32) -> Retries<'_> {
        Retries {
            policy: self,
            allowed: self.max_attempts.saturating_sub(used).max(1),
            failed: 0,
            waited: Duration::ZERO,
            possibly_billed: 0,
            // Jitter is applied as full jitter (uniform in [0, delay]); backon's own jitter only
            // adds to the delay.
            backoff: ExponentialBuilder::default()
                .with_min_delay(self.initial_delay)
                .with_max_delay(self.max_delay)
                .with_factor(2.0)
                .without_max_times()
                .build(),
        }
    }

    /// Runs `op` until it succeeds, fails for good, or the attempts or total delay run out.
    /// `on_retry` sees each retryable failure and the wait before the next attempt.
    pub async fn run<T, F, Fut>(
        &self,
        op: F,
        on_retry: impl FnMut(&Failure, Duration),
    ) -> RetryOutcome<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        self.run_from(0, op, on_retry).await
    }

    /// Like [`run`](Self::run), with `used` attempts already spent (on earlier deliveries).
    pub async fn run_from<T, F, Fut>(
        &self,
        used: u32,
        mut op: F,
        mut on_retry: impl FnMut(&Failure, Duration),
    ) -> RetryOutcome<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let mut retries = self.retries(used);
        let mut runs = 0;
        loop {
            runs += 1;
            let failure = match op().await {
                Ok(value) => {
                    return RetryOutcome {
                        result: Ok(value),
                        attempts: runs,
                        waited: retries.waited,
                        deferred: None,
                        possibly_billed: retries.possibly_billed,
                    };
                }
                Err(failure) => failure,
            };
            let deferred = match retries.next(&failure) {
                Decision::Retry(wait) => {
                    super::metrics::retry();
                    on_retry(&failure, wait);
                    tokio::time::sleep(wait).await;
                    continue;
                }
                Decision::Defer(wait) => Some(wait),
                Decision::GiveUp => None,
            };
            return RetryOutcome {
                result: Err(failure),
                attempts: runs,
                waited: retries.waited,
                deferred,
                possibly_billed: retries.possibly_billed,
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::error::ErrorKind;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            max_total_delay: Duration::from_secs(30),
            max_in_process_wait: Duration::from_secs(10),
            max_possibly_billed_retries: 1,
        }
    }

    fn after(secs: u64) -> Failure {
        Failure::Retryable {
            message: "429".into(),
            after: Some(Duration::from_secs(secs)),
            possibly_billed: false,
            detail: Box::default(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn retries_until_success_honouring_the_server_delay() {
        let mut calls = 0;
        let start = tokio::time::Instant::now();
        let out = policy(5)
            .run(
                || {
                    calls += 1;
                    let n = calls;
                    async move { if n < 3 { Err(after(3)) } else { Ok(n) } }
                },
                |_, _| {},
            )
            .await;
        assert_eq!(out.result.unwrap(), 3);
        assert_eq!(out.attempts, 3);
        assert_eq!(out.waited, Duration::from_secs(6));
        assert!(start.elapsed() >= Duration::from_secs(6));
    }

    #[tokio::test(start_paused = true)]
    async fn stops_after_max_attempts_with_the_last_failure() {
        let out = policy(4)
            .run(
                || async { Err::<(), _>(Failure::transient("503")) },
                |_, _| {},
            )
            .await;
        assert_eq!(out.attempts, 4);
        assert!(out.result.unwrap_err().is_retryable());
        // Full jitter: never more than the capped exponential delays.
        assert!(out.waited <= Duration::from_millis(100 + 200 + 400));
    }

    #[tokio::test(start_paused = true)]
    async fn permanent_failures_are_not_retried() {
        let out = policy(5)
            .run(
                || async { Err::<(), _>(Failure::invalid_job("bad")) },
                |_, _| {},
            )
            .await;
        assert_eq!(out.attempts, 1);
        assert!(matches!(
            out.result,
            Err(Failure::Permanent {
                kind: ErrorKind::InvalidJob,
                ..
            })
        ));
    }

    #[tokio::test(start_paused = true)]
    async fn a_server_delay_beyond_the_limit_is_deferred_not_slept() {
        let mut notified = 0;
        let out = policy(5)
            .run(|| async { Err::<(), _>(after(60)) }, |_, _| notified += 1)
            .await;
        assert_eq!(out.attempts, 1);
        assert_eq!(notified, 0);
        assert_eq!(out.waited, Duration::ZERO);
        assert_eq!(out.deferred, Some(Duration::from_secs(60)));
    }

    #[tokio::test(start_paused = true)]
    async fn attempts_spent_on_earlier_deliveries_count() {
        let out = policy(5)
            .run_from(
                3,
                || async { Err::<(), _>(Failure::transient("503")) },
                |_, _| {},
            )
            .await;
        assert_eq!(out.attempts, 2);
        assert_eq!(out.deferred, None);
    }

    #[tokio::test(start_paused = true)]
    async fn possibly_billed_failures_are_retried_at_most_the_configured_times() {
        let ambiguous = || async {
            Err::<(), _>(Failure::Retryable {
                message: "timed out after sending".into(),
                after: None,
                possibly_billed: true,
                detail: Box::default(),
            })
        };
        let out = policy(10).run(ambiguous, |_, _| {}).await;
        // The first ambiguous failure is retried once; the second ends it.
        assert_eq!(out.attempts, 2);
        assert_eq!(out.possibly_billed, 2);
        let mut none = policy(10);
        none.max_possibly_billed_retries = 0;
        assert_eq!(none.run(ambiguous, |_, _| {}).await.attempts, 1);
    }

    #[tokio::test(start_paused = true)]
    async fn the_total_delay_is_capped() {
        let mut p = policy(100);
        p.max_total_delay = Duration::from_secs(7);
        let out = p.run(|| async { Err::<(), _>(after(3)) }, |_, _| {}).await;
        // 3 s + 3 s fit in 7 s; a third wait would not.
        assert_eq!(out.attempts, 3);
        assert_eq!(out.waited, Duration::from_secs(6));
    }

    #[test]
    fn decisions_follow_the_failure() {
        let p = policy(3);
        let mut r = p.retries(0);
        assert!(matches!(
            r.next(&Failure::transient("503")),
            Decision::Retry(_)
        ));
        assert_eq!(r.next(&after(3)), Decision::Retry(Duration::from_secs(3)));
        // The third failure of three allowed attempts.
        assert_eq!(r.next(&Failure::transient("503")), Decision::GiveUp);
        assert_eq!(r.failed(), 3);
        let mut r = p.retries(0);
        assert_eq!(r.next(&after(11)), Decision::Defer(Duration::from_secs(11)));
        assert_eq!(r.next(&Failure::invalid_job("bad")), Decision::GiveUp);
        // Attempts spent on earlier deliveries leave one at least.
        let mut r = p.retries(10);
        assert_eq!(r.next(&Failure::transient("503")), Decision::GiveUp);
    }
}

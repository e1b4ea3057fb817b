//! Retries of transient failures: exponential backoff with full jitter and a cap (backon), a
//! bound on attempts and on the total wait, and the server's own delay honoured when it gives one.
//!
//! A wait longer than `max_in_process_wait` is not slept in-process (a message must never be held
//! near the broker's consumer timeout): the outcome says `deferred`, and the caller republishes
//! the job to a delay queue. Failures after which the request may have been billed (a timeout or
//! reset after sending) are retried at most `max_possibly_billed_retries` times.

use std::future::Future;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder, Retryable};

use crate::config::RetrySettings;
use crate::error::Failure;

#[derive(Debug, Clone)]
pub struct RetryPolicy {
    pub max_attempts: u32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub max_total_delay: Duration,
    pub max_in_process_wait: Duration,
    pub max_possibly_billed_retries: u32,
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

    fn backoff(&self, attempts: u32) -> impl BackoffBuilder {
        // Jitter is applied below as full jitter (uniform in [0, delay]); backon's own jitter only
        // adds to the delay.
        ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_max_times(attempts.saturating_sub(1) as usize)
    }

    /// The wait before the next attempt. `computed` is the exponential delay (None once the
    /// attempts are used up).
    fn next_wait(&self, failure: &Failure, computed: Option<Duration>) -> Option<Duration> {
        let computed = computed?;
        Some(match failure {
            Failure::Retryable {
                after: Some(after), ..
            } => *after,
            _ => computed.mul_f64(fastrand::f64()),
        })
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
        op: F,
        mut on_retry: impl FnMut(&Failure, Duration),
    ) -> RetryOutcome<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let allowed = self.max_attempts.saturating_sub(used).max(1);
        let attempts = AtomicU32::new(0);
        let billed = AtomicU32::new(0);
        let waited_ns = AtomicU64::new(0);
        let deferred_ns = AtomicU64::new(0);
        let mut op = op;
        let result = (|| {
            attempts.fetch_add(1, Ordering::Relaxed);
            op()
        })
        .retry(self.backoff(allowed))
        .sleep(tokio::time::sleep)
        .when(|failure| match failure {
            Failure::Retryable {
                possibly_billed: true,
                ..
            } => billed.fetch_add(1, Ordering::Relaxed) < self.max_possibly_billed_retries,
            other => other.is_retryable(),
        })
        .adjust(|failure, computed| {
            let wait = self.next_wait(failure, computed)?;
            if wait > self.max_in_process_wait {
                deferred_ns.store(wait.as_nanos().max(1) as u64, Ordering::Relaxed);
                return None;
            }
            let waited = Duration::from_nanos(waited_ns.load(Ordering::Relaxed));
            if waited + wait > self.max_total_delay {
                return None;
            }
            waited_ns.fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
            Some(wait)
        })
        .notify(|failure, wait| {
            crate::metrics::retry();
            on_retry(failure, wait)
        })
        .await;
        let deferred = deferred_ns.load(Ordering::Relaxed);
        RetryOutcome {
            result,
            attempts: attempts.load(Ordering::Relaxed),
            waited: Duration::from_nanos(waited_ns.load(Ordering::Relaxed)),
            deferred: (deferred > 0).then(|| Duration::from_nanos(deferred)),
            possibly_billed: billed.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

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
}

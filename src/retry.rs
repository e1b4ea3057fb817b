//! Retries of transient failures: exponential backoff with full jitter and a cap (backon), a
//! bound on attempts and on the total wait, and the server's own delay honoured when it gives one.

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
    pub max_retry_after: Duration,
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
}

impl RetryPolicy {
    pub fn from_settings(s: &RetrySettings) -> Self {
        Self {
            max_attempts: s.max_attempts,
            initial_delay: Duration::from_millis(s.initial_delay_ms),
            max_delay: Duration::from_millis(s.max_delay_ms),
            max_total_delay: Duration::from_secs(s.max_total_delay_secs),
            max_retry_after: Duration::from_secs(s.max_retry_after_secs),
        }
    }

    fn backoff(&self) -> impl BackoffBuilder {
        // Jitter is applied below as full jitter (uniform in [0, delay]); backon's own jitter only
        // adds to the delay.
        ExponentialBuilder::default()
            .with_min_delay(self.initial_delay)
            .with_max_delay(self.max_delay)
            .with_factor(2.0)
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
    }

    /// The wait before the next attempt, or `None` to give up. `computed` is the exponential
    /// delay (None once the attempts are used up); `waited` is what was already waited.
    fn next_wait(
        &self,
        failure: &Failure,
        computed: Option<Duration>,
        waited: Duration,
    ) -> Option<Duration> {
        let computed = computed?;
        let wait = match failure {
            Failure::Retryable {
                after: Some(after), ..
            } => {
                if *after > self.max_retry_after {
                    return None;
                }
                *after
            }
            _ => computed.mul_f64(fastrand::f64()),
        };
        (waited + wait <= self.max_total_delay).then_some(wait)
    }

    /// Runs `op` until it succeeds, fails for good, or the attempts or total delay run out.
    /// `on_retry` sees each retryable failure and the wait before the next attempt.
    pub async fn run<T, F, Fut>(
        &self,
        op: F,
        mut on_retry: impl FnMut(&Failure, Duration),
    ) -> RetryOutcome<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, Failure>>,
    {
        let attempts = AtomicU32::new(0);
        let waited_ns = AtomicU64::new(0);
        let mut op = op;
        let result = (|| {
            attempts.fetch_add(1, Ordering::Relaxed);
            op()
        })
        .retry(self.backoff())
        .sleep(tokio::time::sleep)
        .when(Failure::is_retryable)
        .adjust(|failure, computed| {
            let waited = Duration::from_nanos(waited_ns.load(Ordering::Relaxed));
            let wait = self.next_wait(failure, computed, waited)?;
            waited_ns.fetch_add(wait.as_nanos() as u64, Ordering::Relaxed);
            Some(wait)
        })
        .notify(|failure, wait| on_retry(failure, wait))
        .await;
        RetryOutcome {
            result,
            attempts: attempts.load(Ordering::Relaxed),
            waited: Duration::from_nanos(waited_ns.load(Ordering::Relaxed)),
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
            max_retry_after: Duration::from_secs(10),
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
    async fn a_server_delay_beyond_the_limit_gives_up_at_once() {
        let mut notified = 0;
        let out = policy(5)
            .run(|| async { Err::<(), _>(after(60)) }, |_, _| notified += 1)
            .await;
        assert_eq!(out.attempts, 1);
        assert_eq!(notified, 0);
        assert_eq!(out.waited, Duration::ZERO);
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

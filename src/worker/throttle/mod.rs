//! How fast the worker calls a provider (one throttle per provider): adaptive concurrency, local
//! rate limits, and pacing driven by the provider's own rate-limit headers (each provider reads
//! its headers into [`RateLimits`]).
//!
//! Three gates, passed in this order before every provider call:
//!
//! 1. **Adaptive concurrency (AIMD)**, in the spirit of Vector's adaptive request concurrency:
//!    calls in flight float between `limits.min_concurrency` and the provider's concurrency. The limit
//!    starts at `limits.initial_concurrency` (by default the maximum, so an unthrottled provider is
//!    used fully at once), shrinks multiplicatively on pushback (a 429 or a 503: x
//!    `limits.decrease_ratio`; a round trip much slower than usual: x 0.9), at most once per round
//!    trip, and grows by one per round trip in which it was reached without pushback.
//! 2. **Local token buckets**: `limits.requests_per_minute` and `limits.images_per_minute`, shared
//!    by every task of the process. A call takes its tokens at once and waits while the bucket is
//!    in debt, so a job that needs more images than the bucket holds is served (later), never
//!    stuck.
//! 3. **Header-driven pacing**: the provider's `x-ratelimit-remaining-*` and
//!    `x-ratelimit-reset-*` headers describe the *account's* bucket, which every replica of the
//!    fleet drains. While the remaining fraction `f` of a limit is above `limits.pacing_reserve`
//!    (`R`), calls are spaced by at most `1 / (rate * (f/R)^2)`, which is no constraint when the
//!    account has room; below it, by `1 / (rate * f/R)` (and never slower than rate / 16). Each
//!    replica slows down as the account's bucket empties, *before* the 429: with `k` replicas the
//!    bucket settles where `k * rate * f/R = rate`, that is at `f = R / k`, and the fleet as a
//!    whole sends exactly the account's rate, whatever `k` autoscaling picks.

use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;
use tracing::{debug, info};

use crate::config::ProviderSettings;
use crate::domain::error::Failure;
use crate::domain::limits::{MAX_REPORTED_COUNT, RateLimits};

mod bucket;
pub use bucket::TokenBucket;

/// Pacing never spaces calls by more than this many times the limit's own period.
const MAX_SLOWDOWN: f64 = 16.0;
/// A round trip this much slower than the moving average counts as pushback...
const LATENCY_DECREASE_RATIO: f64 = 0.9;
/// ...and only if it is also at least this much slower (milliseconds of jitter are not pushback).
const MIN_LATENCY_RISE: Duration = Duration::from_millis(500);
/// How often a call waiting for its pacing turn looks at the latest headers again.
const PACING_RECHECK: Duration = Duration::from_millis(100);
/// Weight of the newest round trip in the latency moving average.
const LATENCY_EWMA_WEIGHT: f64 = 0.3;

/// How a provider call ended, for the concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Feedback {
    /// An answer (an image, or a refusal about the job itself): the latency counts.
    Done,
    /// The provider pushed back: 429 rate limited, 503 overloaded.
    Pushback,
    /// Nothing to learn about load (a transport error, a quota stop, a cancelled call, a poll,
    /// an answer that only says "queued": provider queue time is not latency).
    Ignore,
}

impl Feedback {
    /// What a failure says about the provider's load: a 429 that is not about money, or a 503,
    /// is pushback.
    pub fn of(failure: &Failure) -> Feedback {
        match failure {
            Failure::Retryable { detail, .. } if matches!(detail.status, Some(429 | 503)) => {
                Feedback::Pushback
            }
            _ => Feedback::Ignore,
        }
    }
}

/// The tunables of [`Throttle`] (a provider's `limits` and `concurrency`).
#[derive(Debug, Clone)]
pub struct ThrottleConfig {
    /// The provider's name, for logs and metrics.
    pub provider: String,
    pub max_concurrency: usize,
    pub min_concurrency: usize,
    pub initial_concurrency: usize,
    pub adaptive: bool,
    pub decrease_ratio: f64,
    pub latency_threshold: f64,
    pub requests_per_minute: f64,
    pub images_per_minute: f64,
    pub burst_secs: f64,
    pub pacing_reserve: f64,
}

impl ThrottleConfig {
    pub fn from_settings(settings: &ProviderSettings) -> Self {
        let l = &settings.limits;
        let max = settings.concurrency;
        let initial = if l.initial_concurrency == 0 {
            max
        } else {
            l.initial_concurrency.min(max)
        };
        Self {
            provider: settings.name.clone(),
            max_concurrency: max,
            min_concurrency: l.min_concurrency.clamp(1, max),
            initial_concurrency: initial.max(l.min_concurrency.clamp(1, max)),
            adaptive: l.adaptive,
            decrease_ratio: l.decrease_ratio,
            latency_threshold: l.latency_threshold,
            requests_per_minute: l.requests_per_minute as f64,
            images_per_minute: l.images_per_minute as f64,
            burst_secs: l.burst_secs as f64,
            pacing_reserve: l.pacing_reserve,
        }
    }
}

/// What the throttle is doing, for logs and metrics.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ThrottleState {
    pub limit: usize,
    pub in_flight: usize,
    /// Latency moving average, milliseconds.
    pub latency_ms: u64,
    /// Current spacing of calls imposed by the provider's headers, milliseconds (0: none).
    pub pacing_ms: u64,
    /// Provider's remaining requests / tokens, as last reported.
    pub remaining_requests: Option<f64>,
    pub remaining_tokens: Option<f64>,
    /// Local buckets' tokens (negative: in debt).
    pub request_tokens: Option<f64>,
    pub image_tokens: Option<f64>,
}

/// Gates provider calls; shared by every task of the process.
pub struct Throttle {
    config: ThrottleConfig,
    state: Mutex<State>,
    /// Woken when a slot frees or the limit grows.
    slots: Notify,
    /// Held by the call waiting for its turn in the pacing.
    pacer: tokio::sync::Mutex<()>,
}

struct State {
    limit: f64,
    in_flight: usize,
    /// Latency moving average (None before the first answer).
    latency: Option<Duration>,
    window: Window,
    /// Until then no further decrease: one per round trip.
    no_decrease_until: Instant,
    requests: Option<TokenBucket>,
    images: Option<TokenBucket>,
    /// Last rate-limit headers and when they arrived.
    observed: Option<(RateLimits, Instant)>,
    /// Moving average of provider tokens per call, to read the tokens limit in calls.
    tokens_per_call: Option<f64>,
    /// When the last call was let through the pacer.
    last_send: Instant,
}

/// Answers of the current round trip.
struct Window {
    started: Instant,
    latency_sum: Duration,
    answers: u32,
    pushback: bool,
    /// The limit was reached during the window: more concurrency might have been used.
    saturated: bool,
}

impl Window {
    fn new() -> Self {
        Self {
            started: Instant::now(),
            latency_sum: Duration::ZERO,
            answers: 0,
            pushback: false,
            saturated: false,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A held call slot; dropping it (a cancelled wait, a failed call) frees the slot.
pub struct Permit<'a> {
    throttle: &'a Throttle,
    sent: Instant,
    finished: bool,
}

impl Permit<'_> {
    /// Frees the slot and tells the throttle how the call went. `limits` are the response's
    /// rate-limit headers; `tokens` the provider tokens the call used, when known.
    pub fn finish(mut self, feedback: Feedback, limits: Option<RateLimits>, tokens: Option<f64>) {
        self.finished = true;
        let latency = self.sent.elapsed();
        self.throttle.release(feedback, latency, limits, tokens);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.throttle
                .release(Feedback::Ignore, Duration::ZERO, None, None);
        }
    }
}

impl Throttle {
    pub fn new(config: ThrottleConfig) -> Self {
        let bucket = |per_minute: f64| {
            (per_minute > 0.0)
                .then(|| TokenBucket::new(per_minute, per_minute / 60.0 * config.burst_secs))
        };
        let state = State {
            limit: config.initial_concurrency as f64,
            in_flight: 0,
            latency: None,
            window: Window::new(),
            no_decrease_until: Instant::now(),
            requests: bucket(config.requests_per_minute),
            images: bucket(config.images_per_minute),
            observed: None,
            tokens_per_call: None,
            last_send: Instant::now(),
        };
        super::metrics::concurrency_limit(&config.provider, config.initial_concurrency);
        Self {
            config,
            state: Mutex::new(state),
            slots: Notify::new(),
            pacer: tokio::sync::Mutex::new(()),
        }
    }

    pub fn from_settings(settings: &ProviderSettings) -> Self {
        Self::new(ThrottleConfig::from_settings(settings))
    }

    /// Waits for a call slot, then for the rate limits (`images`: how many the call asks for;
    /// 0 for a poll, which takes a request only); the call may start when this returns.
    /// Cancel-safe: dropping the future holds nothing.
    pub async fn acquire(&self, images: u32) -> Permit<'_> {
        let mut permit = self.slot().await;
        let wait = self.take_tokens(images);
        if !wait.is_zero() {
            debug!(
                wait_ms = wait.as_millis() as u64,
                "waiting for the rate limit"
            );
            tokio::time::sleep(wait).await;
        }
        self.pace().await;
        permit.sent = Instant::now();
        permit
    }

    /// Waits for this call's turn in the pacing the provider's headers call for. One call at a
    /// time waits; the spacing is read afresh while waiting, so newer headers apply at once.
    async fn pace(&self) {
        let _turn = self.pacer.lock().await;
        loop {
            let now = Instant::now();
            let due = {
                let s = lock(&self.state);
                s.last_send + self.pacing_interval(&s, now)
            };
            if now >= due {
                lock(&self.state).last_send = now;
                return;
            }
            tokio::time::sleep((due - now).min(PACING_RECHECK)).await;
        }
    }

    async fn slot(&self) -> Permit<'_> {
        loop {
            let notified = self.slots.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut s = lock(&self.state);
                let limit = s.limit.floor().max(1.0) as usize;
                if s.in_flight < limit {
                    s.in_flight += 1;
                    if s.in_flight >= limit {
                        s.window.saturated = true;
                    }
                    return Permit {
                        throttle: self,
                        sent: Instant::now(),
                        finished: false,
                    };
                }
                s.window.saturated = true;
            }
            notified.await;
        }
    }

    /// Takes the call's tokens from the local buckets; returns how long to wait for them.
    fn take_tokens(&self, images: u32) -> Duration {
        let mut s = lock(&self.state);
        let mut wait = Duration::ZERO;
        if let Some(bucket) = s.requests.as_mut() {
            wait = wait.max(bucket.take_with_debt(1.0));
        }
        if images > 0
            && let Some(bucket) = s.images.as_mut()
        {
            wait = wait.max(bucket.take_with_debt(images as f64));
        }
        wait
    }

    /// The spacing between calls that the provider's last rate-limit headers call for.
    fn pacing_interval(&self, s: &State, now: Instant) -> Duration {
        let Some((limits, seen)) = s.observed else {
            return Duration::ZERO;
        };
        let reserve = self.config.pacing_reserve;
        if reserve <= 0.0 {
            return Duration::ZERO;
        }
        let mut slowest = Duration::ZERO;
        let dimensions = [
            (limits.requests, Some(1.0)),
            (limits.tokens, s.tokens_per_call),
        ];
        for (quota, per_call) in dimensions {
            let (Some(q), Some(per_call)) = (quota, per_call) else {
                continue;
            };
            // Stale: the account's bucket has refilled since.
            if now.duration_since(seen) > q.reset || per_call <= 0.0 {
                continue;
            }
            let calls_per_sec = q.limit / 60.0 / per_call;
            let x = (q.remaining / q.limit) / reserve;
            let speed = if x <= 1.0 {
                x.max(1.0 / MAX_SLOWDOWN)
            } else {
                x * x
            };
            // Never longer than until the account's bucket is full again, whatever the numbers
            // (a tiny limit, a huge usage per call).
            let interval = Duration::try_from_secs_f64(1.0 / (calls_per_sec * speed))
                .unwrap_or(q.reset)
                .min(q.reset);
            slowest = slowest.max(interval);
        }
        slowest
    }

    fn release(
        &self,
        feedback: Feedback,
        latency: Duration,
        limits: Option<RateLimits>,
        tokens: Option<f64>,
    ) {
        let mut s = lock(&self.state);
        s.in_flight = s.in_flight.saturating_sub(1);
        if let Some(limits) = limits {
            s.observed = Some((limits, Instant::now()));
        }
        if let Some(tokens) = tokens
            .filter(|t| *t > 0.0 && t.is_finite())
            .map(|t| t.min(MAX_REPORTED_COUNT))
        {
            s.tokens_per_call = Some(match s.tokens_per_call {
                Some(avg) => avg * 0.9 + tokens * 0.1,
                None => tokens,
            });
        }
        let before = s.limit;
        match feedback {
            Feedback::Ignore => {}
            Feedback::Pushback => {
                s.window.pushback = true;
                self.decrease(&mut s, self.config.decrease_ratio, "provider pushback");
            }
            Feedback::Done => {
                s.window.answers += 1;
                s.window.latency_sum += latency;
                self.end_window_if_due(&mut s);
            }
        }
        let grew = s.limit.floor() > before.floor();
        drop(s);
        if grew {
            self.slots.notify_waiters();
        }
        self.slots.notify_one();
    }

    fn decrease(&self, s: &mut State, ratio: f64, why: &str) {
        let now = Instant::now();
        if !self.config.adaptive || now < s.no_decrease_until {
            return;
        }
        let before = s.limit;
        s.limit = (s.limit * ratio).max(self.config.min_concurrency as f64);
        super::metrics::concurrency_limit(&self.config.provider, s.limit.floor() as usize);
        s.no_decrease_until = now + s.latency.unwrap_or(Duration::from_secs(1));
        if s.limit.floor() < before.floor() {
            info!(
                provider = %self.config.provider,
                limit = s.limit.floor() as u64,
                from = before.floor() as u64,
                reason = why,
                in_flight = s.in_flight,
                "provider concurrency limit lowered"
            );
        }
    }

    /// Ends the round trip's window once it has lasted a round trip: grows the limit by one if it
    /// was reached without pushback, or lowers it if latency rose.
    fn end_window_if_due(&self, s: &mut State) {
        let now = Instant::now();
        let rtt = s.latency.unwrap_or(Duration::ZERO);
        if now.duration_since(s.window.started) < rtt || s.window.answers == 0 {
            return;
        }
        let mean = s.window.latency_sum / s.window.answers;
        let window = std::mem::replace(&mut s.window, Window::new());
        let rose = s.latency.is_some_and(|avg| {
            mean > avg.mul_f64(1.0 + self.config.latency_threshold) && mean > avg + MIN_LATENCY_RISE
        });
        s.latency = Some(match s.latency {
            Some(avg) => avg.mul_f64(1.0 - LATENCY_EWMA_WEIGHT) + mean.mul_f64(LATENCY_EWMA_WEIGHT),
            None => mean,
        });
        if !self.config.adaptive || window.pushback {
            return;
        }
        if rose {
            self.decrease(s, LATENCY_DECREASE_RATIO, "provider latency rising");
        } else if window.saturated && s.limit < self.config.max_concurrency as f64 {
            s.limit = (s.limit + 1.0).min(self.config.max_concurrency as f64);
            super::metrics::concurrency_limit(&self.config.provider, s.limit.floor() as usize);
            debug!(limit = s.limit as u64, "provider concurrency limit raised");
        }
    }

    /// The current limit, calls in flight, and rate state.
    pub fn state(&self) -> ThrottleState {
        let mut s = lock(&self.state);
        let now = Instant::now();
        let pacing = self.pacing_interval(&s, now);
        let observed = s.observed.map(|(l, _)| l);
        ThrottleState {
            limit: s.limit.floor() as usize,
            in_flight: s.in_flight,
            latency_ms: s.latency.unwrap_or_default().as_millis() as u64,
            pacing_ms: pacing.as_millis() as u64,
            remaining_requests: observed.and_then(|l| l.requests).map(|q| q.remaining),
            remaining_tokens: observed.and_then(|l| l.tokens).map(|q| q.remaining),
            request_tokens: s.requests.as_mut().map(|b| b.tokens().floor()),
            image_tokens: s.images.as_mut().map(|b| b.tokens().floor()),
        }
    }

    /// Logs the throttle's state every `every` while the future is polled.
    pub async fn report(&self, every: Duration) {
        let mut last = None;
        loop {
            tokio::time::sleep(every).await;
            let state = self.state();
            if last.as_ref() == Some(&state) {
                continue;
            }
            info!(
                provider = %self.config.provider,
                limit = state.limit,
                in_flight = state.in_flight,
                latency_ms = state.latency_ms,
                pacing_ms = state.pacing_ms,
                remaining_requests = state.remaining_requests.map(|v| v as i64),
                remaining_tokens = state.remaining_tokens.map(|v| v as i64),
                request_tokens = state.request_tokens.map(|v| v as i64),
                image_tokens = state.image_tokens.map(|v| v as i64),
                "provider throttle"
            );
            last = Some(state);
        }
    }
}

#[cfg(test)]
mod tests;

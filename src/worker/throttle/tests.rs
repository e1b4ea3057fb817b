use super::*;
use crate::domain::limits::Quota;

fn config(max: usize) -> ThrottleConfig {
    ThrottleConfig {
        provider: "test".into(),
        max_concurrency: max,
        min_concurrency: 1,
        initial_concurrency: max,
        adaptive: true,
        decrease_ratio: 0.5,
        latency_threshold: 1.0,
        requests_per_minute: 0.0,
        images_per_minute: 0.0,
        burst_secs: 10.0,
        pacing_reserve: 0.2,
    }
}

#[tokio::test(start_paused = true)]
async fn a_bucket_in_debt_serves_big_requests_late_but_serves_them() {
    // 60 images a minute (one a second), holding 10: a job of 25 images is not refused.
    let mut cfg = config(4);
    cfg.images_per_minute = 60.0;
    let throttle = Throttle::new(cfg);
    let start = Instant::now();
    throttle
        .acquire(25)
        .await
        .finish(Feedback::Done, None, None);
    assert!(
        start.elapsed() >= Duration::from_secs(15),
        "{:?}",
        start.elapsed()
    );
    assert!(start.elapsed() < Duration::from_secs(16));
    // The debt is paid: the bucket refills from zero.
    throttle.acquire(1).await.finish(Feedback::Done, None, None);
    assert!(start.elapsed() < Duration::from_secs(17));
}

#[tokio::test(start_paused = true)]
async fn requests_per_minute_spaces_calls_after_the_burst() {
    let mut cfg = config(8);
    cfg.requests_per_minute = 120.0; // 2 a second, 20 in the bucket
    let throttle = Throttle::new(cfg);
    let start = Instant::now();
    for _ in 0..40 {
        throttle.acquire(1).await.finish(Feedback::Done, None, None);
    }
    // 20 from the bucket at once, then 20 more at 2 a second.
    let took = start.elapsed();
    assert!(
        took >= Duration::from_secs(10) && took < Duration::from_secs(11),
        "{took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn the_limit_halves_on_pushback_once_per_round_trip_and_grows_back() {
    let throttle = Throttle::new(config(32));
    assert_eq!(throttle.state().limit, 32);
    // Establish a round trip of 1 s.
    let p = throttle.acquire(1).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    p.finish(Feedback::Done, None, None);
    // A burst of 429s from calls that were in flight together: one decrease only.
    let permits: Vec<_> =
        futures_util::future::join_all((0..10).map(|_| throttle.acquire(1))).await;
    for p in permits {
        p.finish(Feedback::Pushback, None, None);
    }
    assert_eq!(throttle.state().limit, 16);
    // A round trip later, more pushback: halved again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    throttle
        .acquire(1)
        .await
        .finish(Feedback::Pushback, None, None);
    assert_eq!(throttle.state().limit, 8);
    // Healthy and saturated round trips: +1 each.
    for _ in 0..5 {
        let n = throttle.state().limit;
        let permits: Vec<_> =
            futures_util::future::join_all((0..n).map(|_| throttle.acquire(1))).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        for p in permits {
            p.finish(Feedback::Done, None, None);
        }
    }
    let limit = throttle.state().limit;
    assert!((12..=13).contains(&limit), "{limit}");
}

#[tokio::test(start_paused = true)]
async fn the_limit_bounds_calls_in_flight() {
    let mut cfg = config(8);
    cfg.initial_concurrency = 3;
    let throttle = Throttle::new(cfg);
    let a = throttle.acquire(1).await;
    let _b = throttle.acquire(1).await;
    let _c = throttle.acquire(1).await;
    let fourth = tokio::time::timeout(Duration::from_secs(5), throttle.acquire(1)).await;
    assert!(fourth.is_err(), "a fourth call must wait");
    drop(a);
    let fourth = tokio::time::timeout(Duration::from_secs(5), throttle.acquire(1)).await;
    assert!(fourth.is_ok(), "a freed slot lets it through");
}

#[tokio::test(start_paused = true)]
async fn rising_latency_lowers_the_limit() {
    let throttle = Throttle::new(config(20));
    for secs in [1, 1, 1, 1] {
        let p = throttle.acquire(1).await;
        tokio::time::sleep(Duration::from_secs(secs)).await;
        p.finish(Feedback::Done, None, None);
    }
    assert_eq!(throttle.state().limit, 20);
    let p = throttle.acquire(1).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    p.finish(Feedback::Done, None, None);
    assert_eq!(throttle.state().limit, 18);
}

#[tokio::test(start_paused = true)]
async fn headers_pace_calls_before_the_account_runs_out() {
    let throttle = Throttle::new(config(8));
    let limits = |remaining: f64| RateLimits {
        requests: Some(Quota {
            limit: 600.0, // 10 a second
            remaining,
            reset: Duration::from_secs(60),
        }),
        tokens: None,
    };
    // Plenty left: no pacing.
    throttle
        .acquire(1)
        .await
        .finish(Feedback::Done, Some(limits(590.0)), None);
    assert!(throttle.state().pacing_ms <= 5, "{:?}", throttle.state());
    // At the reserve (20 %): exactly the account's rate.
    throttle
        .acquire(1)
        .await
        .finish(Feedback::Done, Some(limits(120.0)), None);
    assert_eq!(throttle.state().pacing_ms, 100);
    // Half the reserve: half the rate.
    throttle
        .acquire(1)
        .await
        .finish(Feedback::Done, Some(limits(60.0)), None);
    assert_eq!(throttle.state().pacing_ms, 200);
    // Empty: the slowest pace, not a stop.
    throttle
        .acquire(1)
        .await
        .finish(Feedback::Done, Some(limits(0.0)), None);
    assert_eq!(throttle.state().pacing_ms, 1600);
    let start = Instant::now();
    throttle.acquire(1).await.finish(Feedback::Done, None, None);
    throttle.acquire(1).await.finish(Feedback::Done, None, None);
    assert!(start.elapsed() >= Duration::from_millis(1600));
    // Headers older than their reset are forgotten.
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert_eq!(throttle.state().pacing_ms, 0);
    // Hostile numbers (a limit of one a minute, a call that reports 1e300 tokens) pace no
    // longer than the bucket's reset, and never panic.
    let hostile = RateLimits {
        requests: None,
        tokens: Some(Quota {
            limit: 1.0,
            remaining: 0.0,
            reset: Duration::from_secs(5),
        }),
    };
    throttle
        .acquire(1)
        .await
        .finish(Feedback::Done, Some(hostile), Some(1e300));
    assert_eq!(throttle.state().pacing_ms, 5000);
}

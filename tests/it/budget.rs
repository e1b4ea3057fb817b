//! Spend caps: per batch across the fleet, and per worker process.

use std::time::Duration;

use imagegen::domain::error::ErrorKind;
use imagegen::domain::event::Status;
use serde_json::json;

use crate::dlq::dlq_replay;
use crate::helpers::{Store, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

/// What one job of a three-word prompt costs at the default prices (gpt-image-2: $5 per 1M text
/// tokens, $30 per 1M image output tokens; the fake reports 1056 output tokens per image).
const JOB_USD: f64 = (3.0 * 5.0 + 1056.0 * 30.0) / 1e6;

#[tokio::test]
async fn a_batch_over_its_cap_fails_fast_without_provider_calls_and_replays_after_raising_it() {
    let cap = 10.5 * JOB_USD; // the 11th job crosses it
    let env = TestEnv::with(
        Store::S3,
        &[
            ("budget.max_batch_usd", cap.to_string()),
            ("budget.refresh_secs", "0".into()),
        ],
    )
    .await;
    env.fake().set_latency(Duration::from_millis(100));
    let mut listener = env.listen().await;
    env.publish_many((0..40).map(
        |i| json!({"id": format!("c{i}"), "batch": "capped", "prompt": format!("capped job {i}")}),
    ))
    .await;
    env.publish_many((0..10).map(
        |i| json!({"id": format!("o{i}"), "batch": "other", "prompt": format!("other job {i}")}),
    ))
    .await;
    // Two workers, each with its own view of the batch's spend, as two replicas would have.
    let workers = [env.start_worker().await, env.start_worker().await];
    let events = env.events(&mut listener, 50, WAIT).await;
    for worker in workers {
        worker.shutdown().await.expect("worker stops cleanly");
    }

    let capped: Vec<_> = events
        .iter()
        .filter(|e| e.data.batch.as_deref() == Some("capped"))
        .collect();
    let bought = capped
        .iter()
        .filter(|e| e.data.status == Status::Succeeded)
        .count();
    let refused: Vec<_> = capped
        .iter()
        .filter(|e| e.data.status == Status::Failed)
        .collect();
    // The fleet overshoots by at most the calls in flight: 2 workers x concurrency 4.
    assert!(
        (11..=11 + 8).contains(&bought),
        "{bought} capped jobs were bought"
    );
    assert_eq!(bought + refused.len(), 40);
    for event in &refused {
        let error = event.data.error.as_ref().unwrap();
        assert_eq!(error.kind, ErrorKind::BudgetExceeded, "{event:?}");
        assert!(
            error.message.contains("budget.max_batch_usd"),
            "{}",
            error.message
        );
        assert_eq!(event.data.attempts, 0, "no provider call for a refused job");
        assert_eq!(event.data.cost_usd, Some(0.0));
    }
    assert_eq!(
        env.fake().calls_for("capped job"),
        bought as u64,
        "refused jobs never reached the provider"
    );
    // Another batch is not held back by it.
    let other = events
        .iter()
        .filter(|e| e.data.batch.as_deref() == Some("other"))
        .count();
    assert_eq!(other, 10);
    assert!(
        events
            .iter()
            .filter(|e| e.data.batch.as_deref() == Some("other"))
            .all(|e| e.data.status == Status::Succeeded)
    );
    // The spend is visible to any worker, under the batch's spend prefix.
    let store = env.store().await;
    let markers =
        imagegen::storage::list_all(&*store, &format!("it/{}/spend/capped/", env.id), None)
            .await
            .unwrap();
    assert_eq!(markers.len(), bought);

    // Raised cap: the dead-lettered jobs are replayed and bought, and nothing twice.
    env.wait_dead_letters(refused.len() as u32, WAIT).await;
    let mut settings = env.settings.clone();
    settings.budget.max_batch_usd = 100.0;
    let worker = env.start_worker_with(settings).await;
    let report = dlq_replay(&env, &[]);
    assert_eq!(report["replayed"], refused.len(), "{report}");
    let replayed = env.events(&mut listener, refused.len(), WAIT).await;
    assert!(
        replayed.iter().all(|e| e.data.status == Status::Succeeded),
        "{replayed:?}"
    );
    worker.shutdown().await.unwrap();
    assert_eq!(env.fake().calls_for("capped job"), 40);
    assert_eq!(env.fake().billed_for("capped job"), 40);
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_over_its_cap_stops_taking_jobs_and_leaves_them_queued() {
    let cap = 2.5 * JOB_USD; // the third job crosses it
    let env = TestEnv::with(
        Store::Fs,
        &[
            ("budget.max_worker_usd", cap.to_string()),
            ("worker.concurrency", "1".into()),
            ("worker.pause_probe_secs", "1".into()),
        ],
    )
    .await;
    let mut listener = env.listen().await;
    env.publish_many(
        (0..10).map(|i| json!({"id": format!("w{i}"), "prompt": format!("worker job {i}")})),
    )
    .await;
    let worker = env.start_worker().await;
    let events = env.events(&mut listener, 3, WAIT).await;
    assert!(events.iter().all(|e| e.data.status == Status::Succeeded));
    // Paused for good: no probes, no more calls, no failed events; the rest wait in the queue.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(env.fake().stats().billed, 3);
    assert!(
        listener
            .next(Duration::from_millis(500))
            .await
            .unwrap()
            .is_none()
    );
    worker.shutdown().await.expect("worker stops cleanly");
    let jobs_queue = env.settings.amqp.jobs_queue.clone();
    let mut ready = 0;
    for _ in 0..50 {
        ready = env.ready(&jobs_queue).await;
        if ready == 7 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(ready, 7, "the jobs the worker did not buy are still queued");
    env.cleanup().await;
}

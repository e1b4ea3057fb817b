//! The `fal` provider end to end, against the fake of fal's queue: submit, status (202 until
//! done), result, images downloaded at once; fal's own retries turned off; a flagged image; its
//! 429; a locked account; an outage that moves jobs to the fallback provider; a worker killed
//! while its request is queued; and a cancelled batch that cancels its queued request.

use std::time::{Duration, Instant};

use imagegen::domain::event::Status;
use imagegen_fakes::fal::{FalFake, FalOptions, FalServer, Fault};
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json, killed_while_queued, rule};

const WAIT: Duration = Duration::from_secs(30);

async fn fake(opts: FalOptions) -> FalServer {
    FalFake::new(FalOptions {
        api_key: Some("fal-test-key".into()),
        image_bytes: 20_000,
        ..opts
    })
    .start()
    .await
    .expect("fake fal queue starts")
}

/// The settings that make `fal` the default provider, served by `fake`.
fn settings(fake: &FalServer) -> Vec<(&'static str, String)> {
    vec![
        ("providers.fal.kind", "fal".to_string()),
        ("providers.fal.base_url", fake.base_url()),
        ("providers.fal.api_key", "fal-test-key".into()),
        ("providers.fal.poll_min_ms", "100".into()),
        ("providers.fal.poll_max_secs", "1".into()),
        ("worker.default_provider", "fal".into()),
    ]
}

#[tokio::test]
async fn a_fal_request_is_queued_once_followed_and_its_images_stored() {
    let fake = fake(FalOptions::default()).await;
    let env = TestEnv::with(Store::S3, &settings(&fake)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "f1", "prompt": "a fal fox", "n": 2, "size": "16:9", "seed": 7}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_valid("result-event.schema.json", &event_json(&event));
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(event.data.images.len(), 2);
    assert_eq!(
        fake.api.calls_for("fal fox"),
        1,
        "num_images = 2: one request"
    );
    assert_eq!(fake.api.billed_for("fal fox"), 1);
    assert!(fake.api.polls() >= 1);
    assert_eq!(
        fake.api.retrying_submits(),
        0,
        "x-fal-no-retry on every submit"
    );
    let store = env.store().await;
    for image in &event.data.images {
        assert_eq!(image.content_type, "image/png");
        let bytes = store.get(&image.key).await.unwrap().expect("stored");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 15_000);
    }
    // Two 1024x576 images of flux/schnell at $0.003 a megapixel.
    let cost = event.data.cost_usd.expect("priced");
    assert!(
        (cost - 2.0 * 1024.0 * 576.0 / 1e6 * 0.003).abs() < 1e-6,
        "{cost}"
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_flagged_image_fails_once_and_a_failed_run_is_submitted_again_by_the_worker() {
    let fake = fake(FalOptions::default()).await;
    fake.api.push_rule(rule("flagged fox", Fault::Nsfw, None));
    fake.api
        .push_rule(rule("failing fox", Fault::Fails, Some(1)));
    let env = TestEnv::with(Store::S3, &settings(&fake)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "n1", "prompt": "a flagged fox"}))
        .await;
    env.publish(json!({"id": "n2", "prompt": "a failing fox"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    let (flagged, failed) = (&events[0], &events[1]);
    assert_eq!(flagged.kind, "imagegen.job.failed");
    let error = flagged.data.error.as_ref().unwrap();
    assert_eq!(error.kind.as_str(), "content_policy");
    assert_eq!(error.provider_code.as_deref(), Some("has_nsfw_concepts"));
    assert!(
        flagged.data.images.is_empty(),
        "a flagged image is never stored"
    );
    assert_eq!(
        fake.api.calls_for("flagged fox"),
        1,
        "a refusal is never retried"
    );
    // The failed run was the worker's to retry (fal's own retries are off): one more request,
    // counted as an attempt, and two runs billed.
    assert_eq!(
        failed.data.status,
        Status::Succeeded,
        "{:?}",
        failed.data.error
    );
    assert_eq!(fake.api.calls_for("failing fox"), 2);
    assert_eq!(failed.data.attempts, 2);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_429_is_retried_and_a_locked_account_pauses_the_provider() {
    let fake = fake(FalOptions::default()).await;
    fake.api
        .push_rule(rule("busy fox", Fault::RateLimited, Some(1)));
    fake.api
        .push_rule(rule("broke fox", Fault::Locked, Some(1)));
    let mut vars = settings(&fake);
    vars.push(("worker.pause_probe_secs", "1".into()));
    let env = TestEnv::with(Store::S3, &vars).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "b1", "prompt": "a busy fox"}))
        .await;
    let busy = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(busy.data.status, Status::Succeeded);
    assert_eq!(fake.api.calls_for("busy fox"), 2);
    assert_eq!(fake.api.billed_for("busy fox"), 1);
    let started = Instant::now();
    env.publish(json!({"id": "b2", "prompt": "a broke fox"}))
        .await;
    let broke = env.events(&mut listener, 1, WAIT).await.remove(0);
    // Paused, not failed: the job waited for the probe, no attempt counted.
    assert_eq!(
        broke.data.status,
        Status::Succeeded,
        "{:?}",
        broke.data.error
    );
    assert_eq!(broke.data.attempts, 1);
    assert!(started.elapsed() >= Duration::from_millis(800));
    assert_eq!(fake.api.calls_for("broke fox"), 2);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_fal_outage_moves_the_job_to_the_fallback_provider() {
    let fake = fake(FalOptions::default()).await;
    fake.api
        .push_rule(rule("outage fox", Fault::Unavailable, None));
    let mut vars = settings(&fake);
    vars.push(("providers.fal.fallback", "openai".into()));
    vars.push(("retry.max_attempts", "2".into()));
    let env = TestEnv::with(Store::S3, &vars).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "o1", "prompt": "an outage fox"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(event.data.providers_tried, ["fal", "openai"]);
    assert_eq!(fake.api.calls_for("outage fox"), 2);
    assert_eq!(fake.api.billed_for("outage fox"), 0);
    assert_eq!(env.fake().billed_for("outage fox"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_cancelled_batch_cancels_its_queued_request() {
    let fake = fake(FalOptions::default()).await;
    fake.api
        .push_rule(rule("endless fox", Fault::NeverCompletes, None));
    let env = TestEnv::with(Store::S3, &settings(&fake)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "c1", "prompt": "an endless fox", "batch": "fc"}))
        .await;
    let deadline = Instant::now() + WAIT;
    while fake.api.polls() < 1 {
        assert!(Instant::now() < deadline, "never polled");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = env.store().await;
    imagegen::storage::batches::cancel(&*store, &env.settings.storage.prefix, "fc")
        .await
        .unwrap();
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Failed);
    assert_eq!(
        event.data.error.as_ref().unwrap().kind.as_str(),
        "cancelled"
    );
    assert_eq!(fake.api.calls_for("endless fox"), 1);
    assert_eq!(fake.api.cancels(), 1, "canceled at the provider");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_while_its_request_is_queued_costs_no_second_request() {
    let fake = fake(FalOptions {
        generation: Duration::from_secs(3),
        ..FalOptions::default()
    })
    .await;
    let event = killed_while_queued(
        "fal",
        &fake.base_url(),
        "fal-test-key",
        "kf",
        "a patient fal",
        || fake.api.billed_for("patient fal") == 1,
    )
    .await;
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(fake.api.calls_for("patient fal"), 1, "exactly one request");
    assert_eq!(fake.api.billed_for("patient fal"), 1);
}

#[tokio::test]
async fn a_reference_goes_to_the_apps_image_url_as_a_data_uri() {
    let fake = fake(FalOptions::default()).await;
    let env = TestEnv::with(Store::Fs, &settings(&fake)).await;
    let (key, png) = crate::helpers::stored_png(&env, "plate.png", 16, [4, 5, 6]).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"version": 3, "id": "f1", "prompt": "image to image", "images": [key]}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(
        fake.api.inputs(),
        vec![vec![format!("image_url={}", imagegen_fakes::digest(&png))]]
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

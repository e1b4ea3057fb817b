//! The `replicate` provider end to end, against the fake of Replicate's predictions API: create,
//! poll, download at once; a safety checker's refusal; its 429; an outage that moves jobs to the
//! fallback provider; a worker killed while its prediction runs; and a job past its deadline that
//! cancels its prediction.

use std::time::{Duration, Instant};

use imagegen::domain::event::Status;
use imagegen_fakes::replicate::{Fault, ReplicateFake, ReplicateOptions, ReplicateServer};
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json, killed_while_queued, rule};

const WAIT: Duration = Duration::from_secs(30);

async fn fake(opts: ReplicateOptions) -> ReplicateServer {
    ReplicateFake::new(ReplicateOptions {
        api_key: Some("r8_test".into()),
        image_bytes: 20_000,
        ..opts
    })
    .start()
    .await
    .expect("fake Replicate API starts")
}

/// The settings that make `replicate` the default provider, served by `fake`.
fn settings(fake: &ReplicateServer) -> Vec<(&'static str, String)> {
    vec![
        ("providers.replicate.kind", "replicate".to_string()),
        ("providers.replicate.base_url", fake.base_url()),
        ("providers.replicate.api_key", "r8_test".into()),
        ("providers.replicate.poll_min_ms", "100".into()),
        ("providers.replicate.poll_max_secs", "1".into()),
        ("worker.default_provider", "replicate".into()),
    ]
}

#[tokio::test]
async fn a_prediction_is_created_once_polled_and_its_outputs_stored() {
    let fake = fake(ReplicateOptions::default()).await;
    let mut vars = settings(&fake);
    vars.push(("providers.replicate.images_per_call", "2".into()));
    let env = TestEnv::with(Store::S3, &vars).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(
        json!({"id": "p1", "prompt": "a replicated fox", "n": 2, "size": "16:9", "seed": 7}),
    )
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
        fake.api.calls_for("replicated fox"),
        1,
        "num_outputs = 2: one prediction"
    );
    assert_eq!(fake.api.billed_for("replicated fox"), 1);
    assert!(fake.api.polls() >= 1);
    let store = env.store().await;
    let mut seen = Vec::new();
    for image in &event.data.images {
        assert_eq!(image.content_type, "image/png");
        let bytes = store.get(&image.key).await.unwrap().expect("stored");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 15_000);
        seen.push(bytes);
    }
    assert_ne!(seen[0], seen[1], "both outputs, not one twice");
    // Two flux-schnell images at $0.003.
    assert_eq!(event.data.cost_usd, Some(0.006));
    assert_eq!(
        event.data.model.as_deref(),
        Some("black-forest-labs/flux-schnell")
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn an_nsfw_refusal_fails_once_and_a_crash_is_created_again() {
    let fake = fake(ReplicateOptions::default()).await;
    fake.api.push_rule(rule("unsafe fox", Fault::Nsfw, None));
    fake.api
        .push_rule(rule("crashing fox", Fault::Crash, Some(1)));
    let env = TestEnv::with(Store::S3, &settings(&fake)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "n1", "prompt": "an unsafe fox"}))
        .await;
    env.publish(json!({"id": "n2", "prompt": "a crashing fox"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    let (refused, crashed) = (&events[0], &events[1]);
    assert_eq!(refused.kind, "imagegen.job.failed");
    let error = refused.data.error.as_ref().unwrap();
    assert_eq!(error.kind.as_str(), "content_policy");
    assert!(error.message.contains("NSFW"), "{}", error.message);
    assert_eq!(
        fake.api.calls_for("unsafe fox"),
        1,
        "a refusal is never retried"
    );
    // A prediction that crashed was forgotten and created again, not polled for ever.
    assert_eq!(
        crashed.data.status,
        Status::Succeeded,
        "{:?}",
        crashed.data.error
    );
    assert_eq!(fake.api.calls_for("crashing fox"), 2);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_throttled_create_is_retried_after_the_delay_it_names() {
    let fake = fake(ReplicateOptions::default()).await;
    fake.api
        .push_rule(rule("busy fox", Fault::Throttled { secs: 1 }, Some(1)));
    let env = TestEnv::with(Store::S3, &settings(&fake)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let started = Instant::now();
    env.publish(json!({"id": "t1", "prompt": "a busy fox"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Succeeded);
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(fake.api.calls_for("busy fox"), 2);
    assert_eq!(
        fake.api.billed_for("busy fox"),
        1,
        "a throttled create is not billed"
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_replicate_outage_moves_the_job_to_the_fallback_provider() {
    let fake = fake(ReplicateOptions::default()).await;
    fake.api
        .push_rule(rule("outage fox", Fault::Unavailable, None));
    let mut vars = settings(&fake);
    vars.push(("providers.replicate.fallback", "openai".into()));
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
    assert_eq!(event.data.providers_tried, ["replicate", "openai"]);
    assert_eq!(fake.api.calls_for("outage fox"), 2);
    assert_eq!(fake.api.billed_for("outage fox"), 0);
    assert_eq!(env.fake().billed_for("outage fox"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_past_its_deadline_cancels_its_prediction() {
    let fake = fake(ReplicateOptions::default()).await;
    fake.api
        .push_rule(rule("endless fox", Fault::NeverCompletes, None));
    let env = TestEnv::with(Store::S3, &settings(&fake)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let deadline = time::OffsetDateTime::now_utc() + time::Duration::seconds(2);
    let deadline = deadline
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    env.publish(json!({"id": "d1", "prompt": "an endless fox", "deadline": deadline}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Failed);
    assert_eq!(event.data.error.as_ref().unwrap().kind.as_str(), "expired");
    assert_eq!(
        fake.api.calls_for("endless fox"),
        1,
        "polled, never created again"
    );
    assert_eq!(fake.api.cancels(), 1, "and canceled at the provider");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_while_its_prediction_runs_costs_no_second_prediction() {
    let fake = fake(ReplicateOptions {
        generation: Duration::from_secs(3),
        ..ReplicateOptions::default()
    })
    .await;
    let event = killed_while_queued(
        "replicate",
        &fake.base_url(),
        "r8_test",
        "kr",
        "a patient replica",
        || fake.api.billed_for("patient replica") == 1,
    )
    .await;
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(
        fake.api.calls_for("patient replica"),
        1,
        "exactly one prediction"
    );
    assert_eq!(fake.api.billed_for("patient replica"), 1);
}

#[tokio::test]
async fn a_reference_goes_to_the_models_image_input_as_a_data_uri() {
    let fake = fake(ReplicateOptions::default()).await;
    let mut vars = settings(&fake);
    vars.push(("providers.replicate.image_input", "input_image".into()));
    let env = TestEnv::with(Store::Fs, &vars).await;
    let (key, png) = crate::helpers::stored_png(&env, "plate.png", 16, [1, 2, 3]).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"version": 3, "id": "r1", "prompt": "a kontext edit", "images": [key]}))
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
        vec![vec![format!(
            "input_image={}",
            imagegen_fakes::digest(&png)
        )]]
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

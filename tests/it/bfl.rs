//! The `bfl` provider end to end, against the fake of the BFL API: submit, poll, download, on the
//! real broker and store; moderation as a poll status; the account's cap on active tasks; a
//! sample that expired; and a worker killed while its job waits at the provider.

use std::time::Duration;

use imagegen::domain::event::Status;
use imagegen_fakes::bfl::{BflFake, BflOptions, BflServer, Fault};
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json, killed_while_queued, rule};

const WAIT: Duration = Duration::from_secs(30);

async fn fake(opts: BflOptions) -> BflServer {
    BflFake::new(BflOptions {
        api_key: Some("bfl-test-key".into()),
        image_bytes: 20_000,
        ..opts
    })
    .start()
    .await
    .expect("fake BFL API starts")
}

/// The settings that make `bfl` the default provider, served by `fake`.
fn bfl_settings(fake: &BflServer) -> Vec<(&'static str, String)> {
    vec![
        ("providers.bfl.kind", "bfl".to_string()),
        ("providers.bfl.base_url", fake.base_url()),
        ("providers.bfl.api_key", "bfl-test-key".into()),
        ("providers.bfl.poll_min_ms", "100".into()),
        ("providers.bfl.poll_max_secs", "1".into()),
        ("worker.default_provider", "bfl".into()),
    ]
}

#[tokio::test]
async fn a_bfl_job_is_submitted_once_polled_and_its_sample_stored() {
    let fake = fake(BflOptions::default()).await;
    let env = TestEnv::with(Store::S3, &bfl_settings(&fake)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "b1", "prompt": "a flux fox", "size": "512x512", "n": 2, "seed": 7}))
        .await;
    env.publish(json!({"id": "b2", "prompt": "an odd flux fox", "size": "500x500"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    let (ok, refused) = (&events[0], &events[1]);
    assert_valid("result-event.schema.json", &event_json(ok));
    assert_eq!(ok.data.status, Status::Succeeded, "{:?}", ok.data.error);
    assert_eq!(ok.data.images.len(), 2);
    // One call per image, each counted once across the deliveries the job spanned.
    assert_eq!(ok.data.attempts, 2);
    assert_eq!(fake.api.calls_for("a flux fox"), 2, "one task per image");
    assert_eq!(fake.api.billed_for("a flux fox"), 2);
    assert!(fake.api.polls() >= 2);
    let store = env.store().await;
    for image in &ok.data.images {
        assert_eq!(image.content_type, "image/png");
        let bytes = store.get(&image.key).await.unwrap().expect("stored");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 15_000);
    }
    // Two images of 0.262 megapixels at $0.03 per megapixel.
    let cost = ok.data.cost_usd.expect("priced");
    assert!((0.0157..0.0158).contains(&cost), "{cost}");
    assert!(ok.data.provider_request_id.is_some());
    // Sides that are not multiples of 16 fail before any submit, saying what is taken.
    let error = refused.data.error.as_ref().unwrap();
    assert_eq!(error.kind.as_str(), "invalid_job");
    assert!(
        error.message.contains("multiple of 16"),
        "{}",
        error.message
    );
    assert_eq!(fake.api.calls_for("odd flux fox"), 0);
    assert_eq!(fake.api.active(), 0);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn moderation_is_a_content_policy_failure_after_one_billed_submit() {
    let fake = fake(BflOptions::default()).await;
    fake.api
        .push_rule(rule("forbidden flux", Fault::RequestModerated, None));
    fake.api
        .push_rule(rule("unsafe flux", Fault::ContentModerated, None));
    let env = TestEnv::with(Store::S3, &bfl_settings(&fake)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "m1", "prompt": "a forbidden flux"}))
        .await;
    env.publish(json!({"id": "m2", "prompt": "an unsafe flux"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    for (event, code, prompt) in [
        (&events[0], "Request Moderated", "forbidden flux"),
        (&events[1], "Content Moderated", "unsafe flux"),
    ] {
        assert_eq!(event.kind, "imagegen.job.failed");
        let error = event.data.error.as_ref().unwrap();
        assert_eq!(error.kind.as_str(), "content_policy");
        assert_eq!(error.provider_code.as_deref(), Some(code));
        assert_eq!(fake.api.calls_for(prompt), 1, "never submitted again");
        assert_eq!(fake.api.billed_for(prompt), 1);
    }
    env.wait_dead_letters(2, WAIT).await;
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn the_active_task_cap_is_waited_out_and_an_expired_sample_is_bought_again() {
    let fake = fake(BflOptions::default()).await;
    fake.api
        .push_rule(rule("capped flux", Fault::TooManyActive, Some(2)));
    fake.api
        .push_rule(rule("late flux", Fault::SampleExpired, Some(1)));
    let env = TestEnv::with(Store::S3, &bfl_settings(&fake)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "c1", "prompt": "a capped flux"}))
        .await;
    env.publish(json!({"id": "c2", "prompt": "a late flux"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    let (capped, late) = (&events[0], &events[1]);
    assert_eq!(capped.data.status, Status::Succeeded);
    // Two 429s at submit, waited out: not attempts, and not billed.
    assert_eq!(capped.data.attempts, 1);
    assert_eq!(fake.api.calls_for("capped flux"), 3);
    assert_eq!(fake.api.billed_for("capped flux"), 1);
    // The sample had expired: the image is lost with it, and the job submits anew.
    assert_eq!(late.data.status, Status::Succeeded);
    assert_eq!(fake.api.calls_for("late flux"), 2);
    assert_eq!(fake.api.billed_for("late flux"), 2);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_worker_killed_while_its_job_waits_at_the_provider_costs_no_second_submit() {
    let fake = fake(BflOptions {
        generation: Duration::from_secs(3),
        ..BflOptions::default()
    })
    .await;
    let event = killed_while_queued(
        "bfl",
        &fake.base_url(),
        "bfl-test-key",
        "kb",
        "a patient flux",
        || fake.api.billed_for("patient flux") == 1,
    )
    .await;
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(fake.api.calls_for("patient flux"), 1, "exactly one submit");
    assert_eq!(fake.api.billed_for("patient flux"), 1);
}

#[tokio::test]
async fn polling_a_task_that_never_completes_ends_at_the_jobs_deadline() {
    let fake = fake(BflOptions::default()).await;
    fake.api
        .push_rule(rule("endless flux", Fault::NeverCompletes, None));
    let env = TestEnv::with(Store::S3, &bfl_settings(&fake)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let deadline = time::OffsetDateTime::now_utc() + time::Duration::seconds(3);
    let deadline = deadline
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap();
    env.publish(json!({"id": "e1", "prompt": "an endless flux", "deadline": deadline}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Failed);
    assert_eq!(event.data.error.as_ref().unwrap().kind.as_str(), "expired");
    assert_eq!(
        fake.api.calls_for("endless flux"),
        1,
        "polled, never submitted again"
    );
    assert!(fake.api.polls() >= 2);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_submit_whose_answer_is_lost_is_counted_as_possibly_billed() {
    let fake = fake(BflOptions::default()).await;
    fake.api
        .push_rule(rule("lost flux", Fault::ResetAfterSubmit, Some(1)));
    let env = TestEnv::with(Store::S3, &bfl_settings(&fake)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "l1", "prompt": "a lost flux"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Succeeded);
    // The one window that can pay twice: the task was accepted, its answer never arrived.
    assert_eq!(fake.api.billed_for("lost flux"), 2);
    assert_eq!(event.data.possibly_billed, 1);
    assert!(
        event.data.cost_estimated,
        "the lost task is charged at an estimate"
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn reference_images_go_in_as_input_images() {
    let fake = fake(BflOptions::default()).await;
    let env = TestEnv::with(Store::Fs, &bfl_settings(&fake)).await;
    let refs = [
        crate::helpers::stored_png(&env, "0.png", 16, [10, 0, 0]).await,
        crate::helpers::stored_png(&env, "1.png", 16, [200, 0, 0]).await,
    ];
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(
        json!({"version": 3, "id": "k1", "prompt": "the plate's style",
        "images": [refs[0].0, refs[1].0]}),
    )
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
        vec![vec![
            imagegen_fakes::digest(&refs[0].1),
            imagegen_fakes::digest(&refs[1].1)
        ]]
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

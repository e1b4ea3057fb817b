//! The `stability` provider end to end, against the fake of Stability AI's v2beta API: multipart
//! requests, raw image answers, a filtered image on HTTP 200 that is never stored, one image per
//! call (a partial set completed when the job comes back), credits, its 429 time-out, and an
//! outage that moves jobs to the fallback provider.

use std::time::{Duration, Instant};

use imagegen::domain::event::Status;
use imagegen_fakes::stability::{Fault, StabilityFake, StabilityOptions, StabilityServer};
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json, rule};

const WAIT: Duration = Duration::from_secs(30);

async fn stability_env(
    opts: StabilityOptions,
    extra: &[(&str, String)],
) -> (TestEnv, StabilityServer) {
    let fake = StabilityFake::new(StabilityOptions {
        api_key: Some("sk-stability".into()),
        image_bytes: 30_000,
        ..opts
    })
    .start()
    .await
    .expect("fake Stability AI starts");
    let mut settings = vec![
        ("providers.stability.kind", "stability".to_string()),
        ("providers.stability.base_url", fake.base_url()),
        ("providers.stability.api_key", "sk-stability".into()),
        ("providers.stability.rate_limit_wait_secs", "1".into()),
        ("worker.default_provider", "stability".into()),
    ];
    settings.extend(extra.iter().cloned());
    (TestEnv::with(Store::S3, &settings).await, fake)
}

#[tokio::test]
async fn a_job_of_two_images_makes_two_calls_and_a_partial_set_is_completed_after_a_top_up() {
    // Credits for one Core image (3 credits), then none: the second call is refused (402), the
    // provider pauses with the job's first image stored; once someone pays, the job comes back
    // and buys only the missing one.
    let (env, fake) = stability_env(
        StabilityOptions {
            credits: Some(4.0),
            ..StabilityOptions::default()
        },
        &[("worker.pause_probe_secs", "2".into())],
    )
    .await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(
        json!({"id": "s1", "prompt": "a stable fox", "n": 2, "size": "1344x768", "seed": 7}),
    )
    .await;
    // Wait for the refusal, then pay.
    let deadline = Instant::now() + WAIT;
    while fake.api.calls_for("stable fox") < 2 {
        assert!(Instant::now() < deadline, "the second call never came");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    fake.api.set_credits(Some(100.0));
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
        fake.api.calls_for("stable fox"),
        3,
        "one refused for credits"
    );
    assert_eq!(
        fake.api.billed_for("stable fox"),
        2,
        "the stored image was not bought again"
    );
    let store = env.store().await;
    for image in &event.data.images {
        assert_eq!(image.content_type, "image/png");
        let bytes = store.get(&image.key).await.unwrap().expect("stored");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 20_000);
    }
    // Two Core images at $0.03.
    assert_eq!(event.data.cost_usd, Some(0.06));
    assert_eq!(event.data.model.as_deref(), Some("core"));
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_filtered_image_and_a_moderated_prompt_fail_once_as_content_policy() {
    let (env, fake) = stability_env(StabilityOptions::default(), &[]).await;
    fake.api
        .push_rule(rule("blurred", Fault::ContentFiltered, None));
    fake.api.push_rule(rule("flagged", Fault::Moderated, None));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "f1", "prompt": "a blurred fox"}))
        .await;
    env.publish(json!({"id": "f2", "prompt": "a flagged fox"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    for (event, prompt, code, billed) in [
        (&events[0], "blurred", "CONTENT_FILTERED", 1),
        (&events[1], "flagged", "content_moderation", 0),
    ] {
        assert_eq!(event.kind, "imagegen.job.failed");
        assert!(
            event.data.images.is_empty(),
            "a filtered image is never stored"
        );
        let error = event.data.error.as_ref().unwrap();
        assert_eq!(error.kind.as_str(), "content_policy");
        assert_eq!(error.provider_code.as_deref(), Some(code));
        assert_eq!(event.data.attempts, 1);
        assert_eq!(fake.api.calls_for(prompt), 1, "a refusal is never retried");
        assert_eq!(fake.api.billed_for(prompt), billed);
        // A filtered image is charged (a Core image, $0.03); a refused prompt is not.
        assert_eq!(
            event.data.cost_usd.unwrap_or(0.0),
            0.03 * billed as f64,
            "{prompt}"
        );
    }
    let store = env.store().await;
    let listed = imagegen::storage::list_all(
        &*store,
        &format!("{}images/", env.settings.storage.prefix),
        None,
    )
    .await
    .unwrap();
    assert!(
        !listed.iter().any(|k| k.ends_with(".png")),
        "no image stored: {listed:?}"
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_429_waits_out_the_time_out_before_the_next_call() {
    let (env, fake) = stability_env(StabilityOptions::default(), &[]).await;
    fake.api
        .push_rule(rule("busy fox", Fault::RateLimited, Some(1)));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let started = Instant::now();
    env.publish(json!({"id": "r1", "prompt": "a busy fox"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.attempts, 2);
    // The retry policy's own delays are at most 200 ms here: the 1 s is the time-out's.
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(fake.api.calls_for("busy fox"), 2);
    assert_eq!(fake.api.billed_for("busy fox"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_stability_outage_moves_the_job_to_the_fallback_provider() {
    let (env, fake) = stability_env(
        StabilityOptions::default(),
        &[
            ("providers.stability.fallback", "openai".into()),
            ("retry.max_attempts", "2".into()),
        ],
    )
    .await;
    fake.api
        .push_rule(rule("outage fox", Fault::ServerError { status: 500 }, None));
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
    assert_eq!(event.data.provider.as_deref(), Some("openai"));
    assert_eq!(event.data.providers_tried, ["stability", "openai"]);
    assert_eq!(fake.api.calls_for("outage fox"), 2);
    assert_eq!(fake.api.billed_for("outage fox"), 0);
    assert_eq!(env.fake().billed_for("outage fox"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_reference_makes_an_image_to_image_call_and_core_refuses_one() {
    let (env, fake) = stability_env(StabilityOptions::default(), &[]).await;
    let (key, png) = crate::helpers::stored_png(&env, "plate.png", 20, [9, 9, 9]).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(
        json!({"version": 3, "id": "i2i", "prompt": "the same, in winter",
        "model": "sd3.5-large", "size": "16:9", "images": [key]}),
    )
    .await;
    env.publish(json!({"version": 3, "id": "core", "prompt": "core cannot",
        "model": "core", "images": [key]}))
        .await;
    let events = env.events(&mut listener, 2, WAIT).await;
    let ok = events.iter().find(|e| e.data.job_id == "i2i").unwrap();
    assert_eq!(ok.data.status, Status::Succeeded, "{:?}", ok.data.error);
    assert_eq!(fake.api.inputs(), vec![imagegen_fakes::digest(&png)]);
    let core = events.iter().find(|e| e.data.job_id == "core").unwrap();
    assert_eq!(core.data.status, Status::Failed);
    assert!(
        core.data
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("core model takes no reference"),
        "{:?}",
        core.data.error
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

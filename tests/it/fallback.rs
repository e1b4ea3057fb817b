//! Falling back: a job whose provider is out of service for it (an outage that outlasts its
//! retries, a quota that pauses the provider) moves to the provider's `fallback` providers; a
//! content refusal does not, unless configured. The event says who made the image, who was
//! tried, and what each cost.

use std::time::Duration;

use imagegen::domain::event::Status;
use imagegen_fakes::gemini::{GeminiFake, GeminiOptions, GeminiServer};
use imagegen_fakes::openai::Fault;
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json, rule};

const WAIT: Duration = Duration::from_secs(30);

/// The OpenAI fake as the default provider `openai`, falling back to `gemini` (its own fake).
async fn env_with_fallback(extra: &[(&str, String)]) -> (TestEnv, GeminiServer) {
    let gemini = GeminiFake::new(GeminiOptions::default())
        .start()
        .await
        .expect("fake Gemini API starts");
    let mut settings = vec![
        ("providers.gemini.kind", "gemini".to_string()),
        ("providers.gemini.base_url", gemini.base_url()),
        ("providers.gemini.api_key", "g-key".into()),
        ("providers.openai.fallback", "gemini".into()),
        ("worker.default_provider", "openai".into()),
        ("retry.max_attempts", "3".into()),
    ];
    settings.extend(extra.iter().cloned());
    (TestEnv::with(Store::S3, &settings).await, gemini)
}

#[tokio::test]
async fn an_outage_that_outlasts_the_retries_moves_the_job_to_the_fallback() {
    let (env, gemini) = env_with_fallback(&[]).await;
    env.fake()
        .push_rule(rule("outage", Fault::ServerError { status: 503 }, None));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "o1", "prompt": "an outage fox", "size": "1024x1024"}))
        .await;
    env.publish(json!({"id": "o2", "prompt": "a calm fox"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    let (moved, stayed) = (&events[0], &events[1]);
    assert_valid("result-event.schema.json", &event_json(moved));
    assert_eq!(
        moved.data.status,
        Status::Succeeded,
        "{:?}",
        moved.data.error
    );
    assert_eq!(moved.data.provider.as_deref(), Some("gemini"));
    assert_eq!(moved.data.providers_tried, ["openai", "gemini"]);
    assert_eq!(env.fake().calls_for("outage fox"), 3, "its retries first");
    assert_eq!(env.fake().billed_for("outage fox"), 0);
    assert_eq!(gemini.api.billed_for("outage fox"), 1);
    let by = moved.data.cost_by_provider.as_ref().unwrap();
    assert_eq!(by["openai"], Some(0.0));
    let at_gemini = by["gemini"].unwrap();
    assert!(at_gemini > 0.038, "{at_gemini}");
    assert_eq!(moved.data.cost_usd, Some(at_gemini));
    // A job its provider serves stays there.
    assert_eq!(stayed.data.provider.as_deref(), Some("openai"));
    assert_eq!(stayed.data.providers_tried, ["openai"]);
    assert_eq!(gemini.api.calls_for("calm fox"), 0);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_paused_provider_sends_its_jobs_to_the_fallback_at_once() {
    let (env, gemini) = env_with_fallback(&[("worker.pause_probe_secs", "60".into())]).await;
    env.fake()
        .push_rule(rule("quota", Fault::QuotaExhausted, None));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "q1", "prompt": "quota job one"}))
        .await;
    let first = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(first.data.status, Status::Succeeded);
    assert_eq!(first.data.providers_tried, ["openai", "gemini"]);
    // The provider is paused now: the next jobs go to the fallback without calling it.
    for i in 2..5 {
        env.publish(json!({"id": format!("q{i}"), "prompt": format!("quota job {i}")}))
            .await;
    }
    let events = env.events(&mut listener, 3, WAIT).await;
    assert!(events.iter().all(
        |e| e.data.status == Status::Succeeded && e.data.provider.as_deref() == Some("gemini")
    ));
    assert_eq!(
        env.fake().calls_for("quota job"),
        1,
        "one refusal, then the pause"
    );
    assert_eq!(gemini.api.billed_for("quota job"), 4);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_refusal_is_not_sent_elsewhere_unless_configured() {
    let (env, gemini) = env_with_fallback(&[]).await;
    env.fake()
        .push_rule(rule("forbidden", Fault::Moderation, None));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "f1", "prompt": "a forbidden fox"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Failed);
    assert_eq!(
        event.data.error.as_ref().unwrap().kind.as_str(),
        "content_policy"
    );
    assert_eq!(event.data.providers_tried, ["openai"]);
    assert_eq!(gemini.api.calls_for("forbidden"), 0);
    worker.shutdown().await.unwrap();
    env.cleanup().await;

    let (env, gemini) =
        env_with_fallback(&[("providers.openai.fallback_on_refusal", "true".into())]).await;
    env.fake()
        .push_rule(rule("forbidden", Fault::Moderation, None));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "f2", "prompt": "a forbidden fox"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.providers_tried, ["openai", "gemini"]);
    assert_eq!(
        env.fake().calls_for("forbidden"),
        1,
        "a refusal is never retried"
    );
    assert_eq!(gemini.api.billed_for("forbidden"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_gemini_outage_moves_its_jobs_to_a_queued_provider() {
    let gemini = GeminiFake::new(GeminiOptions::default())
        .start()
        .await
        .expect("fake Gemini API starts");
    gemini.api.push_rule(imagegen_fakes::gemini::Rule {
        prompt_contains: None,
        fault: imagegen_fakes::gemini::Fault::ServerError { status: 503 },
        times: None,
    });
    let bfl = imagegen_fakes::bfl::BflFake::new(Default::default())
        .start()
        .await
        .expect("fake BFL API starts");
    let env = TestEnv::with(
        Store::S3,
        &[
            ("providers.gemini.kind", "gemini".to_string()),
            ("providers.gemini.base_url", gemini.base_url()),
            ("providers.gemini.api_key", "g-key".into()),
            ("providers.gemini.fallback", "flux".into()),
            ("providers.flux.kind", "bfl".into()),
            ("providers.flux.base_url", bfl.base_url()),
            ("providers.flux.api_key", "b-key".into()),
            ("providers.flux.poll_min_ms", "100".into()),
            ("worker.default_provider", "gemini".into()),
            ("retry.max_attempts", "2".into()),
        ],
    )
    .await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "g1", "prompt": "a down fox", "size": "1024x1024", "n": 2}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(event.data.images.len(), 2);
    assert_eq!(event.data.provider.as_deref(), Some("flux"));
    assert_eq!(event.data.providers_tried, ["gemini", "flux"]);
    assert_eq!(gemini.api.billed_for("down fox"), 0);
    assert_eq!(bfl.api.billed_for("down fox"), 2);
    // Two 1-megapixel images at $0.03 each, nothing at Gemini.
    let by = event.data.cost_by_provider.as_ref().unwrap();
    assert_eq!(by["gemini"], Some(0.0));
    assert!((0.0629..0.063).contains(&by["flux"].unwrap()), "{by:?}");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

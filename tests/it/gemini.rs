//! The `gemini` provider end to end, against the fake of the Gemini API: the real broker, the
//! real store, refusals that arrive as HTTP 200, and both kinds of `RESOURCE_EXHAUSTED`.

use std::time::{Duration, Instant};

use imagegen::domain::event::Status;
use imagegen_fakes::gemini::{Fault, GeminiFake, GeminiOptions, GeminiServer};
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json, rule};

const WAIT: Duration = Duration::from_secs(30);

/// A test environment whose default provider is `gemini`, served by its own fake.
async fn gemini_env(extra: &[(&str, String)]) -> (TestEnv, GeminiServer) {
    let fake = GeminiFake::new(GeminiOptions {
        api_key: Some("g-test-key".into()),
        image_bytes: 40_000,
        ..GeminiOptions::default()
    })
    .start()
    .await
    .expect("fake Gemini API starts");
    let mut settings = vec![
        ("providers.gemini.kind", "gemini".to_string()),
        ("providers.gemini.base_url", fake.base_url()),
        ("providers.gemini.api_key", "g-test-key".into()),
        ("worker.default_provider", "gemini".into()),
    ];
    settings.extend(extra.iter().cloned());
    (TestEnv::with(Store::S3, &settings).await, fake)
}

#[tokio::test]
async fn a_gemini_job_stores_the_answered_png_and_prices_its_tokens() {
    let (env, fake) = gemini_env(&[]).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "g1", "prompt": "a gemini fox", "size": "16:9", "n": 2}))
        .await;
    env.publish(json!({"id": "g2", "prompt": "a wide gemini fox", "size": "1000x700"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    let (ok, refused) = (&events[0], &events[1]);
    assert_valid("result-event.schema.json", &event_json(ok));
    assert_eq!(ok.data.status, Status::Succeeded, "{:?}", ok.data.error);
    assert_eq!(ok.data.images.len(), 2, "one image per call, two calls");
    assert_eq!(fake.api.billed_for("a gemini fox"), 2);
    let store = env.store().await;
    let mut seen = Vec::new();
    for image in &ok.data.images {
        assert_eq!(image.content_type, "image/png");
        let bytes = store.get(&image.key).await.unwrap().expect("stored");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(
            bytes.len() > 30_000,
            "the fake's image, whole: {}",
            bytes.len()
        );
        seen.push(bytes);
    }
    assert_ne!(seen[0], seen[1], "two different images");
    // 2 x 1290 output image tokens at $30 per million, and the prompt's few text tokens.
    let cost = ok.data.cost_usd.expect("priced");
    assert!((0.0774..0.0776).contains(&cost), "{cost}");
    assert!(!ok.data.cost_estimated);
    assert_eq!(ok.data.model.as_deref(), Some("gemini-2.5-flash-image"));
    // A size the API cannot express fails before any call, saying what it takes.
    assert_eq!(refused.data.status, Status::Failed);
    let error = refused.data.error.as_ref().unwrap();
    assert_eq!(error.kind.as_str(), "invalid_job");
    assert!(error.message.contains("16:9"), "{}", error.message);
    assert_eq!(fake.api.calls_for("wide gemini fox"), 0);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn refusals_on_http_200_fail_once_as_content_policy() {
    let (env, fake) = gemini_env(&[]).await;
    fake.api.push_rule(rule(
        "forbidden prompt",
        Fault::BlockedPrompt {
            reason: "PROHIBITED_CONTENT".into(),
        },
        None,
    ));
    fake.api.push_rule(rule(
        "unsafe picture",
        Fault::RefusedImage {
            reason: "IMAGE_SAFETY".into(),
        },
        None,
    ));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "r1", "prompt": "a forbidden prompt"}))
        .await;
    env.publish(json!({"id": "r2", "prompt": "an unsafe picture"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    for (event, code, prompt) in [
        (&events[0], "PROHIBITED_CONTENT", "forbidden prompt"),
        (&events[1], "IMAGE_SAFETY", "unsafe picture"),
    ] {
        assert_eq!(event.kind, "imagegen.job.failed");
        assert!(event.data.images.is_empty());
        let error = event.data.error.as_ref().unwrap();
        assert_eq!(error.kind.as_str(), "content_policy");
        assert_eq!(error.provider_code.as_deref(), Some(code));
        assert_eq!(event.data.attempts, 1);
        assert_eq!(fake.api.calls_for(prompt), 1, "a refusal is never retried");
        assert_eq!(fake.api.billed_for(prompt), 1);
    }
    env.wait_dead_letters(2, WAIT).await;
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_per_minute_limit_is_retried_after_the_delay_it_names() {
    let (env, fake) = gemini_env(&[]).await;
    fake.api.push_rule(rule(
        "busy fox",
        Fault::RateLimited {
            retry_delay_secs: 1.0,
        },
        Some(2),
    ));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let started = Instant::now();
    env.publish(json!({"id": "rl", "prompt": "a busy fox"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    let elapsed = started.elapsed();
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.attempts, 3);
    // The retry policy's own delays are at most 200 ms here: only the RetryInfo waits 1 s.
    assert!(
        elapsed >= Duration::from_secs(2),
        "two 1 s delays, took {elapsed:?}"
    );
    assert_eq!(fake.api.calls_for("busy fox"), 3);
    assert_eq!(fake.api.billed_for("busy fox"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_per_day_quota_pauses_the_provider_and_loses_nothing() {
    let (env, fake) = gemini_env(&[("worker.pause_probe_secs", "2".into())]).await;
    fake.api
        .push_rule(rule("daily", Fault::DailyQuota, Some(1)));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let started = Instant::now();
    for i in 0..4 {
        env.publish(json!({"id": format!("d{i}"), "prompt": format!("daily job {i}")}))
            .await;
    }
    let events = env.events(&mut listener, 4, WAIT).await;
    assert!(events.iter().all(|e| e.data.status == Status::Succeeded));
    // A pause counts no attempt (a retry would have), and lasts until a probe gets through.
    assert!(events.iter().all(|e| e.data.attempts == 1), "{events:?}");
    assert!(started.elapsed() >= Duration::from_millis(1500));
    let stats = fake.api.stats();
    assert_eq!(stats.billed, 4);
    // One refusal, then the pause: no job was sent to be refused again (a retry would have
    // been), and none failed.
    assert_eq!(stats.errors_by_status.get(&429), Some(&1));
    assert_eq!(stats.requests, 5);
    assert_eq!(env.ready(&env.settings.amqp.dead_letter_queue).await, 0);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

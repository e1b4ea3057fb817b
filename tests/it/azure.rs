//! The `azure-openai` provider end to end, against the fake of Azure OpenAI and its Entra ID
//! token endpoint: classic deployment URLs (the `api-version` kept as a query string), the v1
//! surface, keys and refreshed bearer tokens, Azure's content-filter refusals, its 429s, and an
//! outage that moves jobs to the fallback provider.

use std::time::{Duration, Instant};

use imagegen::domain::event::Status;
use imagegen_fakes::azure::{AzureFake, AzureOptions, AzureServer, Fault};
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json, rule};

const WAIT: Duration = Duration::from_secs(30);

async fn azure_fake(opts: AzureOptions) -> AzureServer {
    AzureFake::new(AzureOptions {
        image_bytes: 30_000,
        ..opts
    })
    .start()
    .await
    .expect("fake Azure OpenAI starts")
}

/// A test environment whose default provider `azure` is the fake, on the classic surface by key.
async fn azure_env(fake: &AzureServer, extra: &[(&str, String)]) -> TestEnv {
    let mut settings = vec![
        ("providers.azure.kind", "azure-openai".to_string()),
        ("providers.azure.endpoint", fake.endpoint()),
        ("providers.azure.api_key", "azure-test-key".into()),
        ("worker.default_provider", "azure".into()),
    ];
    settings.extend(extra.iter().cloned());
    TestEnv::with(Store::S3, &settings).await
}

#[tokio::test]
async fn a_classic_deployment_by_key_stores_the_image_and_webp_is_refused_before_any_call() {
    let fake = azure_fake(AzureOptions::default()).await;
    let env = azure_env(&fake, &[]).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "a1", "prompt": "an azure fox", "n": 2}))
        .await;
    env.publish(json!({"id": "a2", "prompt": "a webp fox", "output_format": "webp"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    let (ok, refused) = (&events[0], &events[1]);
    assert_valid("result-event.schema.json", &event_json(ok));
    assert_eq!(ok.data.status, Status::Succeeded, "{:?}", ok.data.error);
    assert_eq!(ok.data.images.len(), 2);
    assert_eq!(ok.data.provider.as_deref(), Some("azure"));
    assert_eq!(fake.api.calls_for("azure fox"), 1, "two images in one call");
    assert_eq!(fake.api.billed_for("azure fox"), 1);
    let store = env.store().await;
    for image in &ok.data.images {
        assert_eq!(image.content_type, "image/png");
        let bytes = store.get(&image.key).await.unwrap().expect("stored");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 20_000);
    }
    // Priced as the deployment's name (gpt-image-1), from the usage the answer reported.
    assert!(ok.data.cost_usd.is_some_and(|c| c > 0.0));
    assert!(!ok.data.cost_estimated);
    let error = refused.data.error.as_ref().expect("refused");
    assert_eq!(error.kind.as_str(), "invalid_job");
    assert!(error.message.contains("png, jpeg"), "{}", error.message);
    assert_eq!(fake.api.calls_for("webp fox"), 0, "refused before any call");
    assert_eq!(fake.api.token_stats().refused_requests, 0);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn entra_tokens_from_a_rotated_federated_token_file_are_refreshed_before_they_expire() {
    let fake = azure_fake(AzureOptions {
        client_secret: None,
        assertion: Some("federated-token-1".into()),
        token_lifetime: Duration::from_secs(2),
        ..AzureOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("azure-identity-token");
    std::fs::write(&token_file, "federated-token-1\n").unwrap();
    let o = AzureOptions::default();
    let env = azure_env(
        &fake,
        &[
            ("providers.azure.surface", "v1".into()),
            ("providers.azure.auth", "entra".into()),
            ("providers.azure.api_key", String::new()),
            ("providers.azure.authority_host", fake.endpoint()),
            ("providers.azure.tenant_id", o.tenant.clone()),
            ("providers.azure.client_id", o.client_id.clone()),
            (
                "providers.azure.federated_token_file",
                token_file.display().to_string(),
            ),
        ],
    )
    .await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    for round in 0..4 {
        if round == 2 {
            // The kubelet rotates the projected token: only the new one is accepted from now on.
            std::fs::write(&token_file, "federated-token-2\n").unwrap();
            fake.api.set_assertion("federated-token-2");
        }
        env.publish(json!({"id": format!("e{round}"), "prompt": format!("entra fox {round}")}))
            .await;
        let event = env.events(&mut listener, 1, WAIT).await.remove(0);
        assert_eq!(
            event.data.status,
            Status::Succeeded,
            "round {round}: {:?}",
            event.data.error
        );
        tokio::time::sleep(Duration::from_millis(1100)).await;
    }
    let tokens = fake.api.token_stats();
    // Rounds 1.1 s apart with tokens of 2 s, refreshed after half their life: a new token for
    // most rounds, and never a request with an expired one.
    assert!(tokens.issued >= 3, "{tokens:?}");
    assert_eq!(tokens.refused_requests, 0, "{tokens:?}");
    assert_eq!(tokens.refused_grants, 0, "the rotated file was read again");
    assert_eq!(fake.api.stats().billed, 4);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn content_filter_refusals_fail_once_as_content_policy() {
    let fake = azure_fake(AzureOptions::default()).await;
    fake.api
        .push_rule(rule("filtered prompt", Fault::PromptFiltered, None));
    fake.api
        .push_rule(rule("filtered picture", Fault::OutputFiltered, None));
    let env = azure_env(&fake, &[]).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "c1", "prompt": "a filtered prompt"}))
        .await;
    env.publish(json!({"id": "c2", "prompt": "a filtered picture"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    for (event, prompt, billed) in [
        (&events[0], "filtered prompt", 0),
        (&events[1], "filtered picture", 1),
    ] {
        assert_eq!(event.kind, "imagegen.job.failed");
        let error = event.data.error.as_ref().unwrap();
        assert_eq!(error.kind.as_str(), "content_policy", "{error:?}");
        assert_eq!(event.data.attempts, 1);
        assert_eq!(fake.api.calls_for(prompt), 1, "a refusal is never retried");
        assert_eq!(fake.api.billed_for(prompt), billed);
    }
    env.wait_dead_letters(2, WAIT).await;
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_429_is_retried_after_the_delay_azure_names() {
    let fake = azure_fake(AzureOptions::default()).await;
    fake.api.push_rule(rule(
        "busy fox",
        Fault::RateLimited {
            retry_after_ms: 1500,
        },
        Some(1),
    ));
    let env = azure_env(&fake, &[]).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let started = Instant::now();
    env.publish(json!({"id": "r1", "prompt": "a busy fox"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.attempts, 2);
    // The retry policy's own delays are at most 200 ms here: only retry-after-ms waits 1.5 s.
    assert!(started.elapsed() >= Duration::from_millis(1500));
    assert_eq!(fake.api.calls_for("busy fox"), 2);
    assert_eq!(fake.api.billed_for("busy fox"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn an_azure_outage_moves_the_job_to_the_fallback_provider() {
    let fake = azure_fake(AzureOptions::default()).await;
    fake.api
        .push_rule(rule("outage fox", Fault::ServerError { status: 503 }, None));
    let env = azure_env(
        &fake,
        &[
            ("providers.azure.fallback", "openai".into()),
            ("retry.max_attempts", "2".into()),
        ],
    )
    .await;
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
    assert_eq!(event.data.providers_tried, ["azure", "openai"]);
    assert_eq!(fake.api.calls_for("outage fox"), 2, "its retries first");
    assert_eq!(fake.api.billed_for("outage fox"), 0);
    assert_eq!(env.fake().billed_for("outage fox"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

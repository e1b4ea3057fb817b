//! The worker end to end: jobs in, images in the store, events out, messages settled.

use std::time::{Duration, Instant};

use imagegen::domain::event::Status;
use imagegen::storage::PutObject;
use imagegen_fakes::openai::{Fault, Rule};
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json, rule};

const WAIT: Duration = Duration::from_secs(30);

#[tokio::test]
async fn happy_path_n1_and_n3_on_s3() {
    let env = TestEnv::new(Store::S3).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "one", "prompt": "a red fox", "batch": "b1", "metadata": {"row": 1}}))
        .await;
    env.publish(json!({"id": "three", "prompt": "three blue whales", "batch": "b1", "n": 3, "output_format": "png"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by_key(|e| e.data.images.len());
    let store = env.store().await;
    for (event, n) in events.iter().zip([1usize, 3]) {
        assert_valid("result-event.schema.json", &event_json(event));
        assert_eq!(event.kind, "imagegen.job.succeeded");
        assert_eq!(event.data.status, Status::Succeeded);
        assert_eq!(event.data.images.len(), n);
        assert_eq!(event.data.attempts, 1);
        assert!(
            event.data.usage.as_ref().unwrap()["output_tokens"]
                .as_u64()
                .unwrap()
                > 0
        );
        assert!(
            event
                .data
                .provider_request_id
                .as_deref()
                .unwrap()
                .starts_with("req_")
        );
        for (i, image) in event.data.images.iter().enumerate() {
            assert_eq!(image.index as usize, i);
            assert_eq!(image.bucket, "imagegen-dev");
            assert_eq!(
                image.key,
                format!("it/{}/images/b1/{}/{i}.png", env.id, event.data.job_id)
            );
            assert_eq!(image.uri, format!("s3://imagegen-dev/{}", image.key));
            let info = store.head(&image.key).await.unwrap().expect("image stored");
            assert_eq!(info.content_type.as_deref(), Some("image/png"));
            assert_eq!(info.sha256.as_deref(), Some(image.sha256.as_str()));
            let bytes = store.get(&image.key).await.unwrap().unwrap();
            assert_eq!(bytes.len() as u64, image.bytes);
            assert!(bytes.starts_with(b"\x89PNG"));
        }
        // The result record next to the images is the event itself.
        let record = store
            .get(&format!(
                "it/{}/images/b1/{}/result.json",
                env.id, event.data.job_id
            ))
            .await
            .unwrap()
            .expect("result record stored");
        let stored: imagegen::domain::event::CloudEvent = serde_json::from_slice(&record).unwrap();
        assert_eq!(&stored, event);
    }
    assert_eq!(events[0].data.metadata, json!({"row": 1}));
    // Priced from the reported usage and config's gpt-image-2 token prices.
    for e in &events {
        let usage = e.data.usage.as_ref().unwrap();
        let text_in = usage["input_tokens_details"]["text_tokens"]
            .as_f64()
            .unwrap();
        let image_out = usage["output_tokens_details"]["image_tokens"]
            .as_f64()
            .unwrap();
        let expected = text_in * 5.0 / 1e6 + image_out * 30.0 / 1e6;
        assert!(
            (e.data.cost_usd.unwrap() - expected).abs() < 1e-9,
            "{:?}",
            e.data.cost_usd
        );
        assert!(!e.data.cost_estimated);
    }
    assert_eq!(env.fake().stats().billed, 2);
    assert_eq!(env.fake().stats().images, 4);
    // The durable results queue kept the events too, and the jobs are all acked.
    assert_eq!(env.take_results_queue(2).await.len(), 2);
    worker.shutdown().await.unwrap();
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 0);
    assert_eq!(env.ready(&env.settings.amqp.dead_letter_queue).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn rate_limit_with_retry_after_is_honoured_then_succeeds() {
    let env = TestEnv::new(Store::S3).await;
    env.fake().push_rule(rule(
        "slow fox",
        Fault::RateLimited {
            retry_after_secs: Some(1.0),
            retry_after_ms: None,
        },
        Some(2),
    ));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let started = Instant::now();
    env.publish(json!({"id": "rl", "prompt": "a slow fox"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    let elapsed = started.elapsed();
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.attempts, 3);
    assert!(
        elapsed >= Duration::from_secs(2),
        "two retry-after: 1 waits, took {elapsed:?}"
    );
    assert_eq!(env.fake().calls_for("slow fox"), 3);
    assert_eq!(env.fake().billed_for("slow fox"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn server_errors_are_retried_then_succeed() {
    let env = TestEnv::new(Store::S3).await;
    env.fake()
        .push_rule(rule("flaky", Fault::ServerError { status: 503 }, Some(1)));
    env.fake()
        .push_rule(rule("flaky", Fault::ServerError { status: 500 }, Some(1)));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "flaky-1", "prompt": "a flaky lighthouse"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.attempts, 3);
    assert_eq!(env.fake().calls_for("flaky"), 3);
    assert_eq!(env.fake().billed_for("flaky"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn an_answer_that_is_not_an_image_is_a_billed_provider_error_not_a_png() {
    let env = TestEnv::new(Store::S3).await;
    // The first answer is a 200 whose b64_json holds an HTML page; the retry gets an image.
    env.fake()
        .push_rule(rule("html page", Fault::NotAnImage, Some(1)));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "nai", "prompt": "an html page"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.attempts, 2);
    assert_eq!(event.data.possibly_billed, 1);
    assert!(
        event.data.cost_estimated,
        "the unanswered call is charged as an estimate"
    );
    assert_eq!(env.fake().billed_for("html page"), 2);
    let store = env.store().await;
    let bytes = store
        .get(&event.data.images[0].key)
        .await
        .unwrap()
        .expect("image stored");
    assert!(
        bytes.starts_with(b"\x89PNG"),
        "only the real image is stored"
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn retries_are_bounded_and_end_in_retries_exhausted() {
    let env = TestEnv::with(Store::Fs, &[("retry.max_attempts", "3".into())]).await;
    env.fake()
        .push_rule(rule("doomed", Fault::ServerError { status: 502 }, None));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "doomed", "prompt": "a doomed request"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_valid("result-event.schema.json", &event_json(&event));
    let error = event.data.error.as_ref().unwrap();
    assert_eq!(error.kind.as_str(), "retries_exhausted");
    assert_eq!(error.provider_status, Some(502));
    assert_eq!(event.data.attempts, 3);
    assert_eq!(env.fake().calls_for("doomed"), 3);
    env.wait_dead_letters(1, WAIT).await;
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn moderation_refusal_fails_once_and_is_dead_lettered() {
    let env = TestEnv::new(Store::S3).await;
    env.fake()
        .push_rule(rule("forbidden scene", Fault::Moderation, None));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "mod-1", "prompt": "a forbidden scene", "metadata": {"k": "v"}}))
        .await;
    env.publish(json!({"id": "fine-1", "prompt": "a harmless meadow"}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    let (fine, refused) = (&events[0], &events[1]);
    assert_eq!(fine.data.status, Status::Succeeded);
    assert_valid("result-event.schema.json", &event_json(refused));
    assert_eq!(refused.kind, "imagegen.job.failed");
    let error = refused.data.error.as_ref().unwrap();
    assert_eq!(error.kind.as_str(), "content_policy");
    assert_eq!(error.provider_status, Some(400));
    assert_eq!(error.provider_code.as_deref(), Some("moderation_blocked"));
    assert_eq!(
        refused.data.refusal.as_ref().unwrap()["categories"][0],
        "violence"
    );
    assert_eq!(refused.data.metadata, json!({"k": "v"}));
    assert_eq!(refused.data.attempts, 1);
    assert_eq!(
        env.fake().calls_for("forbidden scene"),
        1,
        "a refusal is never retried"
    );
    env.wait_dead_letters(1, WAIT).await;
    let dead = env.drain_dead_letters().await;
    assert_eq!(dead.len(), 1);
    let body: serde_json::Value = serde_json::from_slice(&dead[0].0).unwrap();
    assert_eq!(body["id"], "mod-1");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn bad_inputs_are_dead_lettered_and_the_next_job_still_runs() {
    let env = TestEnv::new(Store::Fs).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let long_prompt = "x".repeat(32_001);
    let big_metadata = json!({"blob": "y".repeat(20_000)});
    let bad: Vec<(Vec<u8>, Option<&str>, &str)> = vec![
        (b"definitely not json".to_vec(), Some("m1"), "not JSON"),
        (vec![0xc3, 0x28, 0xa0], Some("m2"), "UTF-8"),
        (br#"{"id":"t1","prompt":42}"#.to_vec(), None, "invalid type"),
        (br#"{"id":"t2"}"#.to_vec(), None, "`prompt` is required"),
        (
            br#"{"id":"t3","prompt":"p","sise":"1024x1024"}"#.to_vec(),
            None,
            "sise",
        ),
        (
            br#"{"id":"t4","prompt":"p","n":11}"#.to_vec(),
            None,
            "`n` is 11",
        ),
        (
            br#"{"id":"t5","prompt":"p","n":0}"#.to_vec(),
            None,
            "`n` is 0",
        ),
        (
            br#"{"id":"a/b","prompt":"p"}"#.to_vec(),
            None,
            "must be 1-128",
        ),
        (
            br#"{"id":"..","prompt":"p"}"#.to_vec(),
            None,
            "must be 1-128",
        ),
        (
            br#"{"id":"t6","prompt":"p","params":{"model":"other"}}"#.to_vec(),
            None,
            "params.model",
        ),
        (
            serde_json::to_vec(&json!({"id": "t7", "prompt": long_prompt})).unwrap(),
            None,
            "max_prompt_chars",
        ),
        (
            serde_json::to_vec(&json!({"id": "t8", "prompt": "p", "metadata": big_metadata}))
                .unwrap(),
            None,
            "max_metadata_bytes",
        ),
        (br#"{"prompt":"no id anywhere"}"#.to_vec(), None, "no `id`"),
    ];
    for (body, message_id, _) in &bad {
        env.publish_raw(body, *message_id).await;
    }
    env.publish(json!({"id": "good-after-bad", "prompt": "a good job"}))
        .await;
    let events = env.events(&mut listener, bad.len() + 1, WAIT).await;
    let good = events
        .iter()
        .find(|e| e.data.job_id == "good-after-bad")
        .expect("good job event");
    assert_eq!(good.data.status, Status::Succeeded);
    let failed: Vec<_> = events
        .iter()
        .filter(|e| e.data.status == Status::Failed)
        .collect();
    assert_eq!(failed.len(), bad.len());
    for (_, _, expected) in &bad {
        assert!(
            failed
                .iter()
                .any(|e| e.data.error.as_ref().unwrap().message.contains(expected)),
            "no invalid_job event mentions {expected:?}"
        );
    }
    for e in &failed {
        assert_valid("result-event.schema.json", &event_json(e));
        assert_eq!(e.data.error.as_ref().unwrap().kind.as_str(), "invalid_job");
        assert_eq!(e.data.attempts, 0);
    }
    // The message_id stands in for a missing body id.
    assert!(failed.iter().any(|e| e.data.job_id == "m1"));
    assert_eq!(
        env.fake().stats().requests,
        1,
        "only the good job reached the provider"
    );
    env.wait_dead_letters(bad.len() as u32, WAIT).await;
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_redelivered_job_with_a_stored_result_costs_nothing_and_repeats_its_event() {
    let env = TestEnv::new(Store::S3).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let job = json!({"id": "again", "batch": "re", "prompt": "a job delivered twice", "n": 2});
    env.publish(job.clone()).await;
    let first = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(env.fake().stats().billed, 1);
    env.publish(job).await;
    let second = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(first, second, "the same event, time and id included");
    assert_eq!(
        env.fake().stats().requests,
        1,
        "no provider call for a stored result"
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn only_missing_images_are_generated_again() {
    let env = TestEnv::new(Store::S3).await;
    // An earlier delivery stored image 1 of 3, then died before the record.
    let store = env.store().await;
    let key = format!("it/{}/images/_/partial/1.png", env.id);
    let earlier = bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\nearlier image");
    store
        .put(PutObject {
            key: &key,
            data: earlier.clone(),
            content_type: "image/png",
            metadata: &[],
            sha256: None,
        })
        .await
        .unwrap();
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "partial", "prompt": "three of a kind", "n": 3}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.images.len(), 3);
    assert_eq!(
        env.fake().stats().images,
        2,
        "only images 0 and 2 were bought"
    );
    assert_eq!(
        store.get(&key).await.unwrap().unwrap(),
        earlier,
        "image 1 kept"
    );
    let sha: String = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&earlier))
    };
    assert_eq!(event.data.images[1].sha256, sha);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn images_of_another_job_under_the_same_id_are_not_reused() {
    let env = TestEnv::new(Store::S3).await;
    // Another job under this id stored image 0 of its own, then died before its record.
    let store = env.store().await;
    let key = format!("it/{}/images/_/reused-id/0.png", env.id);
    store
        .put(PutObject {
            key: &key,
            data: bytes::Bytes::from_static(b"\x89PNG\r\n\x1a\nsomeone else's"),
            content_type: "image/png",
            metadata: &[("job-fingerprint", "f1-of-another-job".into())],
            sha256: None,
        })
        .await
        .unwrap();
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "reused-id", "prompt": "my own picture"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_valid("result-event.schema.json", &event_json(&event));
    assert_eq!(event.data.status, Status::Failed);
    assert_eq!(event.data.error.as_ref().unwrap().kind.as_str(), "conflict");
    assert!(event.data.images.is_empty());
    assert_eq!(env.fake().stats().requests, 0, "nothing bought");
    env.wait_dead_letters(1, WAIT).await;
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn an_invalid_job_is_reported_with_the_producers_message_and_correlation_ids() {
    let env = TestEnv::new(Store::Fs).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    // The job's own id is invalid: the event's job id is a digest, and the producer matches
    // it by the ids it gave the message.
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_message_id("msg-0042".into())
        .with_correlation_id("req-7f3a".into());
    env.publish_with(br#"{"id":"bad/id","prompt":"p"}"#, props)
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_valid("result-event.schema.json", &event_json(&event));
    assert_eq!(
        event.data.error.as_ref().unwrap().kind.as_str(),
        "invalid_job"
    );
    assert!(
        event.data.job_id.starts_with("invalid-"),
        "{}",
        event.data.job_id
    );
    assert_eq!(event.data.message_id.as_deref(), Some("msg-0042"));
    assert_eq!(event.data.correlation_id.as_deref(), Some("req-7f3a"));
    env.wait_dead_letters(1, WAIT).await;
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn metadata_comes_back_in_the_event_and_the_record_exactly_as_written() {
    let env = TestEnv::new(Store::Fs).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let written = r#"{"z":1,"a":1e29,"b":100.0,"c":-0.0,"row":"\u00e9"}"#;
    let body = format!(r#"{{"id":"exact","prompt":"p","metadata":{written}}}"#);
    env.publish_raw(body.as_bytes(), None).await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(event.data.metadata.get(), written);
    let record = env
        .store()
        .await
        .get(&format!("it/{}/images/_/exact/result.json", env.id))
        .await
        .unwrap()
        .expect("record stored");
    let record = String::from_utf8(record.to_vec()).unwrap();
    assert!(
        record.contains(&format!(r#""metadata":{written}"#)),
        "{record}"
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn quota_exhausted_stops_taking_jobs_and_loses_nothing() {
    let env = TestEnv::new(Store::Fs).await;
    env.fake().push_rule(Rule {
        prompt_contains: None,
        fault: Fault::QuotaExhausted,
        times: None,
    });
    let mut listener = env.listen().await;
    for i in 0..6 {
        env.publish(json!({"id": format!("q{i}"), "prompt": format!("quota job {i}")}))
            .await;
    }
    let worker = env.start_worker().await;
    // Wait until the worker has met the quota error and given every job back.
    let deadline = Instant::now() + WAIT;
    loop {
        let ready = env.ready(&env.settings.amqp.jobs_queue).await;
        if env.fake().stats().requests > 0 && ready == 6 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "jobs not returned: {ready} ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Still paused a moment later: no more calls, no events, nothing dead-lettered.
    let calls = env.fake().stats().requests;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        env.fake().stats().requests,
        calls,
        "a paused worker makes no calls"
    );
    assert!(
        calls <= env.settings.worker.concurrency as u64,
        "at most one call per slot: {calls}"
    );
    assert!(
        listener
            .next(Duration::from_millis(300))
            .await
            .unwrap()
            .is_none(),
        "no event"
    );
    assert_eq!(env.ready(&env.settings.amqp.dead_letter_queue).await, 0);
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 6);
    assert!(
        !worker.task.is_finished(),
        "the worker waits, paused, for an operator"
    );
    worker
        .shutdown()
        .await
        .expect("a paused worker still stops cleanly");
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 6);
    env.cleanup().await;
}

#[tokio::test]
async fn fs_storage_with_the_placeholder_provider() {
    let env = TestEnv::with(
        Store::Fs,
        &[
            ("providers.placeholder.kind", "placeholder".into()),
            ("worker.default_provider", "placeholder".into()),
        ],
    )
    .await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(
        json!({"id": "ph", "batch": "local", "prompt": "a placeholder", "size": "256x128", "n": 2}),
    )
    .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_valid("result-event.schema.json", &event_json(&event));
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(
        env.fake().stats().requests,
        0,
        "placeholder never calls the network"
    );
    for image in &event.data.images {
        let path = image.uri.strip_prefix("file://").unwrap();
        let bytes = std::fs::read(path).unwrap();
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let info = decoder.read_info().unwrap();
        assert_eq!((info.info().width, info.info().height), (256, 128));
        assert!(path.ends_with(&format!("images/local/ph/{}.png", image.index)));
    }
    assert_ne!(event.data.images[0].sha256, event.data.images[1].sha256);
    assert_eq!(event.data.cost_usd, Some(0.0), "the placeholder is free");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn unauthorized_key_pauses_the_worker_like_quota() {
    let env = TestEnv::new(Store::Fs).await;
    env.fake().push_rule(Rule {
        prompt_contains: None,
        fault: Fault::Unauthorized,
        times: None,
    });
    env.publish(json!({"id": "auth-1", "prompt": "any"})).await;
    let worker = env.start_worker().await;
    let deadline = Instant::now() + WAIT;
    while env.fake().stats().requests == 0 || env.ready(&env.settings.amqp.jobs_queue).await != 1 {
        assert!(Instant::now() < deadline, "job not returned");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(env.ready(&env.settings.amqp.dead_letter_queue).await, 0);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn images_answered_by_url_are_downloaded_and_a_failed_download_is_retried_not_rebought() {
    // A host that answers with URLs (DALL-E, several OpenAI-compatible hosts).
    let env = TestEnv::with(
        Store::S3,
        &[
            ("providers.openai.model", "flux-schnell".into()),
            ("providers.openai.response_format", "url".into()),
        ],
    )
    .await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    // The first two downloads fail (503): the image is paid for, so the download is retried,
    // not the call.
    env.fake().fail_file_downloads(2);
    env.publish(json!({"id": "by-url", "prompt": "a moth on a lamp", "batch": "u"}))
        .await;
    env.publish(json!({"id": "by-url-2", "prompt": "two moths on a lamp", "batch": "u", "n": 2}))
        .await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by_key(|e| e.data.images.len());
    let store = env.store().await;
    for (event, n) in events.iter().zip([1usize, 2]) {
        assert_eq!(event.data.status, Status::Succeeded, "{event:?}");
        assert_eq!(event.data.images.len(), n);
        assert_eq!(event.data.attempts, 1);
        for image in &event.data.images {
            let bytes = store.get(&image.key).await.unwrap().expect("image stored");
            assert!(bytes.starts_with(b"\x89PNG"));
            assert_eq!(bytes.len() as u64, image.bytes);
            // The fake writes the job's prompt into each image it makes.
            let prompt = if n == 1 {
                "prompt=a moth"
            } else {
                "prompt=two moths"
            };
            assert!(bytes.windows(prompt.len()).any(|w| w == prompt.as_bytes()));
        }
    }
    let stats = env.fake().stats();
    assert_eq!(stats.requests, 2, "no image bought twice");
    assert_eq!(stats.billed, 2);
    assert_eq!(stats.files_served, 3);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

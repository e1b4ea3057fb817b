//! The `automatic1111` provider end to end, against a fake of the web UI's API: a batch stored
//! without the grid the server puts first, behind HTTP Basic auth; an answer lost after the run
//! (possibly billed, run again); a GPU out of memory (retried).

use std::time::Duration;

use imagegen::domain::event::Status;
use imagegen_fakes::automatic1111::{A1111Fake, A1111Options, A1111Server, Fault};
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json, rule};

const WAIT: Duration = Duration::from_secs(30);

async fn fake() -> A1111Server {
    A1111Fake::new(A1111Options {
        auth: Some(("artist".into(), "p4ss".into())),
        image_bytes: 20_000,
        ..A1111Options::default()
    })
    .start()
    .await
    .expect("fake AUTOMATIC1111 server starts")
}

fn settings(fake: &A1111Server) -> Vec<(&'static str, String)> {
    vec![
        ("providers.sd.kind", "automatic1111".to_string()),
        ("providers.sd.base_url", fake.base_url()),
        ("providers.sd.username", "artist".into()),
        ("providers.sd.password", "p4ss".into()),
        ("providers.sd.retry.initial_delay_ms", "50".into()),
        ("worker.default_provider", "sd".into()),
    ]
}

#[tokio::test]
async fn a_batch_is_stored_without_the_servers_grid() {
    let sd = fake().await;
    let env = TestEnv::with(Store::S3, &settings(&sd)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "a1", "prompt": "a gridded keep", "n": 3, "size": "512x768"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_valid("result-event.schema.json", &event_json(&event));
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(event.data.images.len(), 3);
    assert_eq!(sd.api.stats().requests, 1, "batch_size 3: one call");
    let store = env.store().await;
    for image in &event.data.images {
        let bytes = store.get(&image.key).await.unwrap().expect("stored");
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"));
        assert!(
            !bytes.windows(5).any(|w| w == b"grid "),
            "the grid is not one of the images"
        );
    }
    assert!(
        event.data.provider_request_id.is_some(),
        "the force_task_id"
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_lost_answer_is_counted_as_possibly_billed_and_an_out_of_memory_retried() {
    let sd = fake().await;
    sd.api
        .push_rule(rule("a lost keep", Fault::ResetAfterRun, Some(1)));
    sd.api
        .push_rule(rule("a crowded keep", Fault::OutOfMemory, Some(1)));
    let env = TestEnv::with(Store::Fs, &settings(&sd)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "l1", "prompt": "a lost keep"}))
        .await;
    env.publish(json!({"id": "o1", "prompt": "a crowded keep"}))
        .await;
    let events = env.events(&mut listener, 2, WAIT).await;
    for event in &events {
        assert_eq!(
            event.data.status,
            Status::Succeeded,
            "{:?}",
            event.data.error
        );
    }
    let lost = events.iter().find(|e| e.data.job_id == "l1").unwrap();
    assert_eq!(
        lost.data.possibly_billed, 1,
        "its run was spent, its images lost"
    );
    assert_eq!(sd.api.runs_for("a lost keep"), 2);
    let crowded = events.iter().find(|e| e.data.job_id == "o1").unwrap();
    assert_eq!(crowded.data.possibly_billed, 0);
    assert_eq!(sd.api.runs_for("a crowded keep"), 2);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

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

#[tokio::test]
async fn a_reference_and_a_mask_go_to_img2img() {
    let sd = fake().await;
    let env = TestEnv::with(Store::Fs, &settings(&sd)).await;
    let store = env.store().await;
    let prefix = env.settings.storage.prefix.clone();
    let png = |alpha: bool| {
        let image = image::RgbaImage::from_fn(32, 32, |x, _| {
            image::Rgba([200, 100, 50, if alpha && x < 16 { 0 } else { 255 }])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    };
    let (init, mask) = (png(false), png(true));
    for (name, data) in [("init.png", &init), ("mask.png", &mask)] {
        store
            .put(imagegen::storage::PutObject {
                key: &format!("{prefix}refs/{name}"),
                data: bytes::Bytes::from(data.clone()),
                content_type: "image/png",
                metadata: &[],
                sha256: None,
            })
            .await
            .unwrap();
    }
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(
        json!({"version": 3, "id": "i1", "prompt": "a repainted keep",
        "images": [format!("{prefix}refs/init.png")], "mask": format!("{prefix}refs/mask.png")}),
    )
    .await;
    // Two references: more than AUTOMATIC1111 takes.
    env.publish(json!({"version": 3, "id": "i2", "prompt": "two keeps",
        "images": [format!("{prefix}refs/init.png"), format!("{prefix}refs/init.png")]}))
        .await;
    let events = env.events(&mut listener, 2, WAIT).await;
    let ok = events.iter().find(|e| e.data.job_id == "i1").unwrap();
    assert_eq!(ok.data.status, Status::Succeeded, "{:?}", ok.data.error);
    let inputs = sd.api.img2img_inputs();
    assert_eq!(inputs.len(), 1);
    assert_eq!(inputs[0].0, vec![imagegen_fakes::digest(&init)]);
    let sent_mask = inputs[0].1.as_ref().expect("the mask was sent");
    assert_ne!(
        sent_mask,
        &imagegen_fakes::digest(&mask),
        "as the server's black and white mask"
    );
    let refused = events.iter().find(|e| e.data.job_id == "i2").unwrap();
    assert_eq!(refused.data.status, Status::Failed);
    assert!(
        refused
            .data
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("at most 1 reference"),
        "{:?}",
        refused.data.error
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

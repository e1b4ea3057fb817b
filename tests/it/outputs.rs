//! A job's `outputs` end to end: variants stored beside each image, decoded back at their size
//! and in their format; a redelivery that makes only the variants missing; a transparent
//! background the provider ignored (said in the event, or the job failed when it asked).

use std::time::Duration;

use bytes::Bytes;
use imagegen::domain::error::ErrorKind;
use imagegen::domain::event::Status;
use imagegen::storage::PutObject;
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json};

const WAIT: Duration = Duration::from_secs(30);

fn outputs() -> serde_json::Value {
    json!([
        {"name": "tile", "size": "32x32", "format": "png"},
        {"name": "web", "size": "48x24", "fit": "inside", "format": "webp", "quality": 80},
        {"name": "lossless", "size": "40x40", "format": "webp", "lossless": true},
        {"name": "thumb", "size": "16x8", "format": "jpeg", "quality": 70, "strip_metadata": true}
    ])
}

#[tokio::test]
async fn variants_are_stored_beside_each_image_at_their_size_and_format() {
    let env = TestEnv::new(Store::S3).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(
        json!({"version": 3, "id": "v1", "prompt": "a tileable wall", "n": 2,
        "outputs": outputs()}),
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
    let store = env.store().await;
    // The fake answers 64x64 PNGs.
    let expected = [
        ("tile", (32, 32), image::ImageFormat::Png, "image/png"),
        ("web", (24, 24), image::ImageFormat::WebP, "image/webp"),
        ("lossless", (40, 40), image::ImageFormat::WebP, "image/webp"),
        ("thumb", (16, 8), image::ImageFormat::Jpeg, "image/jpeg"),
    ];
    assert_eq!(event.data.images.len(), 2);
    for image in &event.data.images {
        assert_eq!((image.width, image.height), (Some(64), Some(64)));
        assert!(
            store.get(&image.key).await.unwrap().is_some(),
            "the original is kept"
        );
        assert_eq!(image.variants.len(), 4);
        for (variant, (name, size, format, content_type)) in image.variants.iter().zip(expected) {
            assert_eq!(variant.name, name);
            let ext = if format == image::ImageFormat::Jpeg {
                "jpeg"
            } else {
                &content_type[6..]
            };
            assert!(
                variant
                    .key
                    .ends_with(&format!("/v1/variants/{name}/{}.{ext}", image.index)),
                "{}",
                variant.key
            );
            assert_eq!(variant.content_type, content_type);
            assert_eq!((variant.width, variant.height), size);
            let bytes = store
                .get(&variant.key)
                .await
                .unwrap()
                .expect("variant stored");
            assert_eq!(bytes.len() as u64, variant.bytes);
            assert_eq!(
                hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes)),
                variant.sha256
            );
            assert_eq!(image::guess_format(&bytes).unwrap(), format, "{name}");
            let decoded = image::load_from_memory(&bytes).unwrap();
            assert_eq!((decoded.width(), decoded.height()), size, "{name}");
        }
    }
    assert_eq!(env.fake().stats().requests, 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_redelivery_makes_only_the_missing_variants_from_the_stored_original() {
    let env = TestEnv::new(Store::Fs).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let job = json!({"version": 3, "id": "r1", "prompt": "a redelivered wall",
        "outputs": [{"name": "a", "size": "20x20"}, {"name": "b", "size": "10x10", "format": "jpeg"}]});
    env.publish(job.clone()).await;
    let first = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(
        first.data.status,
        Status::Succeeded,
        "{:?}",
        first.data.error
    );
    let store = env.store().await;
    let image = &first.data.images[0];
    let (a, b) = (&image.variants[0], &image.variants[1]);
    // As if the worker had died after variant a: b and the record are not stored. Variant a
    // is replaced by other bytes, to tell whether it is made again.
    let record = imagegen::domain::keys::record(image.key.rsplit_once('/').unwrap().0);
    store.delete(&record).await.unwrap();
    store.delete(&b.key).await.unwrap();
    let marker = tiny_png();
    store
        .put(PutObject {
            key: &a.key,
            data: Bytes::from(marker.clone()),
            content_type: "image/png",
            metadata: &[],
            sha256: None,
        })
        .await
        .unwrap();
    env.publish(job).await;
    let second = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(
        second.data.status,
        Status::Succeeded,
        "{:?}",
        second.data.error
    );
    assert_eq!(
        env.fake().stats().requests,
        1,
        "the image is not bought again"
    );
    let again = &second.data.images[0];
    assert_eq!(again.sha256, image.sha256, "the same original");
    assert_eq!(
        store.get(&a.key).await.unwrap().unwrap().to_vec(),
        marker,
        "variant a was stored: not made again"
    );
    assert_eq!(
        (again.variants[0].width, again.variants[0].height),
        (20, 20)
    );
    let remade = store
        .get(&b.key)
        .await
        .unwrap()
        .expect("variant b made again");
    assert_eq!(
        image::guess_format(&remade).unwrap(),
        image::ImageFormat::Jpeg
    );
    assert_eq!(
        again.variants[1].sha256, b.sha256,
        "made again, from the same original"
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_transparent_background_the_provider_ignored_is_said_or_fails_the_job() {
    let env = TestEnv::new(Store::Fs).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    // The fake's images are opaque, whatever the request says.
    env.publish(
        json!({"version": 3, "id": "t1", "prompt": "a sprite", "background": "transparent"}),
    )
    .await;
    env.publish(
        json!({"version": 3, "id": "t2", "prompt": "a strict sprite",
        "background": "transparent", "fail_if_opaque": true}),
    )
    .await;
    let events = env.events(&mut listener, 2, WAIT).await;
    let said = events.iter().find(|e| e.data.job_id == "t1").unwrap();
    assert_valid("result-event.schema.json", &event_json(said));
    assert_eq!(said.data.status, Status::Succeeded, "{:?}", said.data.error);
    assert!(said.data.background_ignored);
    assert_eq!(said.data.images[0].alpha, Some(false));
    let failed = events.iter().find(|e| e.data.job_id == "t2").unwrap();
    assert_eq!(failed.data.status, Status::Failed);
    let error = failed.data.error.as_ref().unwrap();
    assert_eq!(error.kind, ErrorKind::InvalidRequest);
    assert!(
        error.message.contains("fail_if_opaque"),
        "{}",
        error.message
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

/// A valid 2x2 PNG.
fn tiny_png() -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    image::RgbImage::new(2, 2)
        .write_to(&mut out, image::ImageFormat::Png)
        .unwrap();
    out.into_inner()
}

#[tokio::test]
async fn the_gallery_and_the_manifest_list_each_images_variants() {
    let env = TestEnv::new(Store::Fs).await;
    let dir = tempfile::tempdir().unwrap();
    let jobs = dir.path().join("jobs.jsonl");
    std::fs::write(
        &jobs,
        r#"{"id": "g1", "prompt": "a gallery wall", "outputs": [{"name": "thumb", "size": "16x16", "format": "webp"}]}
"#,
    )
    .unwrap();
    let enqueued = env
        .command()
        .args(["enqueue", jobs.to_str().unwrap(), "--batch", "vg", "--yes"])
        .output()
        .unwrap();
    assert!(
        enqueued.status.success(),
        "{}",
        String::from_utf8_lossy(&enqueued.stderr)
    );
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    worker.shutdown().await.unwrap();

    let out = dir.path().join("gallery");
    let made = env
        .command()
        .args(["gallery", "--batch", "vg", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(
        html.contains("thumb #0 16x16"),
        "the variant is on its card"
    );
    assert!(html.contains("variants/thumb/0.webp"), "with a link to it");

    let watched = env
        .command()
        .args(["watch", "--batch", "vg", "--timeout", "10", "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        watched.status.success(),
        "{}",
        String::from_utf8_lossy(&watched.stderr)
    );
    let row: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(dir.path().join("manifest-vg.jsonl"))
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    let uri = row["variants"]["thumb"][0].as_str().unwrap();
    assert!(uri.ends_with("/vg/g1/variants/thumb/0.webp"), "{row}");
    let csv = std::fs::read_to_string(dir.path().join("manifest-vg.csv")).unwrap();
    assert!(csv.contains(&format!("thumb={uri}")), "{csv}");
    env.cleanup().await;
}

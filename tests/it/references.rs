//! Reference images end to end, with real image bytes on the real store: an edit with a mask
//! through the OpenAI edits fake; a URL and an earlier job's image (which the job waits for)
//! through Gemini's inline parts; one reference shared by a burst of jobs, read once; and the
//! references a worker refuses (outside the allowed prefixes, not an image, a decompression
//! bomb, more than the provider takes).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use imagegen::domain::error::ErrorKind;
use imagegen::domain::event::Status;
use imagegen::storage::{ObjectStore, PutObject};
use imagegen_fakes::digest;
use imagegen_fakes::gemini::{GeminiFake, GeminiOptions};
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json};

const WAIT: Duration = Duration::from_secs(30);

/// A PNG of `side` x `side`, transparent on its left half when `alpha`.
fn png(side: u32, alpha: bool, tint: u8) -> Vec<u8> {
    let image = image::RgbaImage::from_fn(side, side, |x, y| {
        let a = if alpha && x < side / 2 { 0 } else { 255 };
        image::Rgba([tint, (x * 4) as u8, (y * 4) as u8, a])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    image.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn put(store: &Arc<dyn ObjectStore>, key: &str, data: &[u8]) {
    store
        .put(PutObject {
            key,
            data: Bytes::copy_from_slice(data),
            content_type: "image/png",
            metadata: &[],
            sha256: None,
        })
        .await
        .unwrap();
}

/// Serves `/plate.png` over plain HTTP on loopback, counting its reads.
async fn plate_server(plate: Vec<u8>) -> (String, Arc<AtomicUsize>) {
    let hits = Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    let app = axum::Router::new().route(
        "/plate.png",
        axum::routing::get(move || {
            let counted = counted.clone();
            let plate = plate.clone();
            async move {
                counted.fetch_add(1, Ordering::SeqCst);
                // Slow enough that a burst of jobs all miss the cache at once.
                tokio::time::sleep(Duration::from_millis(200)).await;
                ([("content-type", "image/png")], plate)
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr.to_string(), hits)
}

#[tokio::test]
async fn an_edit_with_a_mask_sends_the_reference_and_mask_to_openai_edits() {
    let env = TestEnv::new(Store::S3).await;
    let store = env.store().await;
    let prefix = env.settings.storage.prefix.clone();
    let (plate, mask) = (png(64, false, 10), png(64, true, 20));
    put(&store, &format!("{prefix}refs/plate.png"), &plate).await;
    put(&store, &format!("{prefix}refs/mask.png"), &mask).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"version": 3, "id": "e1", "prompt": "paint a door",
        "images": [format!("{prefix}refs/plate.png")], "mask": format!("{prefix}refs/mask.png")}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_valid("result-event.schema.json", &event_json(&event));
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    let edits = env.fake().edits();
    assert_eq!(edits.len(), 1, "one edit request");
    assert_eq!(edits[0].prompt, "paint a door");
    assert_eq!(edits[0].images, vec![digest(&plate)]);
    assert_eq!(edits[0].mask, Some(digest(&mask)));
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn references_the_worker_refuses_fail_the_job_before_any_call() {
    let env = TestEnv::with(
        Store::Fs,
        &[
            ("providers.dry.kind", "placeholder".to_string()),
            ("providers.openai.kind", "openai".into()),
            ("worker.default_provider", "openai".into()),
        ],
    )
    .await;
    let store = env.store().await;
    let prefix = env.settings.storage.prefix.clone();
    // A PNG header that promises 60000 x 60000 pixels.
    let mut bomb = Vec::new();
    let mut encoder = png::Encoder::new(&mut bomb, 60_000, 60_000);
    encoder.set_color(png::ColorType::Rgba);
    drop(encoder.write_header().unwrap());
    put(&store, &format!("{prefix}refs/bomb.png"), &bomb).await;
    put(
        &store,
        &format!("{prefix}refs/page.png"),
        b"<html>not an image</html>",
    )
    .await;
    put(&store, "elsewhere/plate.png", &png(8, false, 1)).await;
    put(&store, &format!("{prefix}refs/ok.png"), &png(8, false, 1)).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    for (id, images, provider) in [
        ("outside", json!(["elsewhere/plate.png"]), "openai"),
        ("bomb", json!([format!("{prefix}refs/bomb.png")]), "openai"),
        ("page", json!([format!("{prefix}refs/page.png")]), "openai"),
        ("none", json!([format!("{prefix}refs/ok.png")]), "dry"),
    ] {
        env.publish(
            json!({"version": 3, "id": id, "prompt": "x", "images": images,
            "provider": provider}),
        )
        .await;
    }
    let events = env.events(&mut listener, 4, WAIT).await;
    for (id, why) in [
        ("outside", "outside the prefixes"),
        ("bomb", "60000x60000"),
        ("page", "not a PNG, JPEG or WebP"),
        ("none", "takes no reference images"),
    ] {
        let event = events.iter().find(|e| e.data.job_id == id).unwrap();
        assert_eq!(event.data.status, Status::Failed, "{id}");
        let error = event.data.error.as_ref().unwrap();
        assert_eq!(error.kind, ErrorKind::InvalidJob, "{id}");
        assert!(error.message.contains(why), "{id}: {}", error.message);
    }
    assert_eq!(env.fake().stats().requests, 0, "no call was made");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_url_and_an_earlier_jobs_image_go_to_gemini_and_the_job_waits_for_it() {
    let gemini = GeminiFake::new(GeminiOptions {
        api_key: Some("g".into()),
        image_bytes: 4000,
        ..GeminiOptions::default()
    })
    .start()
    .await
    .unwrap();
    let plate = png(32, false, 99);
    let (host, hits) = plate_server(plate.clone()).await;
    let env = TestEnv::with(
        Store::S3,
        &[
            ("providers.gemini.kind", "gemini".to_string()),
            ("providers.gemini.base_url", gemini.base_url()),
            ("providers.gemini.api_key", "g".into()),
            ("worker.default_provider", "gemini".into()),
            ("references.download_hosts", host.clone()),
        ],
    )
    .await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    // The job that uses the other's image comes first: it waits for it.
    env.publish(
        json!({"version": 3, "id": "later", "batch": "rb", "prompt": "the same castle at night",
        "images": [format!("http://{host}/plate.png"), "job:first"]}),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    env.publish(json!({"id": "first", "batch": "rb", "prompt": "a castle"}))
        .await;
    let events = env.events(&mut listener, 2, WAIT).await;
    let first = events.iter().find(|e| e.data.job_id == "first").unwrap();
    let later = events.iter().find(|e| e.data.job_id == "later").unwrap();
    assert_eq!(
        later.data.status,
        Status::Succeeded,
        "{:?}",
        later.data.error
    );
    assert_eq!(later.data.attempts, 1, "the wait counted no attempt");
    let store = env.store().await;
    let made = store.get(&first.data.images[0].key).await.unwrap().unwrap();
    let inputs = gemini.api.inputs();
    assert!(
        inputs.contains(&vec![digest(&plate), digest(&made)]),
        "the URL's bytes, then the earlier job's image: {inputs:?}"
    );
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_reference_shared_by_a_burst_of_jobs_is_read_once() {
    let plate = png(48, false, 7);
    let (host, hits) = plate_server(plate.clone()).await;
    let env = TestEnv::with(
        Store::Fs,
        &[
            ("references.download_hosts", host.clone()),
            ("worker.concurrency", "16".into()),
        ],
    )
    .await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    for i in 0..40 {
        env.publish(
            json!({"version": 3, "id": format!("s{i}"), "prompt": format!("tile {i}"),
            "images": [format!("http://{host}/plate.png")]}),
        )
        .await;
    }
    let events = env.events(&mut listener, 40, WAIT).await;
    assert!(events.iter().all(|e| e.data.status == Status::Succeeded));
    assert_eq!(hits.load(Ordering::SeqCst), 1, "read once for 40 jobs");
    let edits = env.fake().edits();
    assert_eq!(edits.len(), 40);
    assert!(edits.iter().all(|e| e.images == vec![digest(&plate)]));
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn enqueue_reference_uploads_a_file_once_and_names_it_in_every_job() {
    let env = TestEnv::new(Store::Fs).await;
    let dir = tempfile::tempdir().unwrap();
    let plate = png(40, false, 3);
    let file = dir.path().join("plate.png");
    std::fs::write(&file, &plate).unwrap();
    let prompts = dir.path().join("prompts.txt");
    std::fs::write(&prompts, "a red door\na blue door\n").unwrap();
    for _ in 0..2 {
        // Twice: the second finds the file stored.
        let out = env
            .command()
            .args([
                "enqueue",
                prompts.to_str().unwrap(),
                "--batch",
                "refs",
                "--yes",
                "--reference",
            ])
            .arg(&file)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let events = env.events(&mut listener, 2, WAIT).await;
    assert!(events.iter().all(|e| e.data.status == Status::Succeeded));
    let edits = env.fake().edits();
    assert!(edits.len() >= 2);
    assert!(edits.iter().all(|e| e.images == vec![digest(&plate)]));
    let store = env.store().await;
    let stored = imagegen::storage::list_all(
        &*store,
        &format!("{}references/", env.settings.storage.prefix),
        None,
    )
    .await
    .unwrap();
    assert_eq!(stored.len(), 1, "{stored:?}");
    assert!(
        events.iter().all(|e| e.data.references == stored),
        "listed in each event"
    );
    worker.shutdown().await.unwrap();
    // The gallery shows each card's references, linked.
    let out = dir.path().join("gallery");
    let made = env
        .command()
        .args(["gallery", "--batch", "refs", "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(html.contains(&stored[0]), "the reference is on the cards");
    env.cleanup().await;
}

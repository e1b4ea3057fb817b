//! The Files and Batch APIs as a client sees them, continued: listing by cursor, requests the
//! API refuses, edit lines, the admin endpoints, and an output file too large to hold.

use super::batch_client::*;
use super::batch_client::{get, post};
use super::*;

#[tokio::test]
async fn batches_are_listed_newest_first_by_cursor() {
    let server = serve(fast()).await;
    let file_id = upload_jsonl(&server, &[line("a", GEN, json!({"prompt": "p"}))]).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(create(&server, &file_id, GEN).await["id"].clone());
    }
    ids.reverse();
    let page = get_json(&server, "/batches?limit=2").await;
    assert_eq!(page["object"], "list");
    let listed: Vec<Value> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].clone())
        .collect();
    assert_eq!(listed, ids[..2]);
    assert_eq!(page["first_id"], ids[0]);
    assert_eq!(page["last_id"], ids[1]);
    assert_eq!(page["has_more"], true);
    let page = get_json(
        &server,
        &format!("/batches?limit=2&after={}", ids[1].as_str().unwrap()),
    )
    .await;
    let listed: Vec<Value> = page["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["id"].clone())
        .collect();
    assert_eq!(listed, ids[2..4]);
    assert_eq!(page["has_more"], true);
    let page = get_json(
        &server,
        &format!("/batches?after={}", ids[3].as_str().unwrap()),
    )
    .await;
    assert_eq!(page["data"].as_array().unwrap().len(), 1);
    assert_eq!(page["data"][0]["id"], ids[4]);
    assert_eq!(page["has_more"], false);
    assert_eq!(
        get_json(&server, "/batches").await["data"]
            .as_array()
            .unwrap()
            .len(),
        5
    );
    let resp = get(&server, "/batches?limit=101").await;
    assert_eq!(resp.status(), 400);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["param"], "limit");
    let missing = get(&server, "/batches/batch_nope").await;
    assert_eq!(missing.status(), 404);
    // Output files are listed with the uploads.
    for id in &ids {
        wait_for(&server, id.as_str().unwrap(), &["completed"]).await;
    }
    let outputs = get_json(&server, "/files?purpose=batch_output").await;
    assert_eq!(outputs["data"].as_array().unwrap().len(), 5);
}

#[tokio::test]
async fn bad_files_and_batch_requests_are_refused_like_the_api() {
    let server = serve(FakeOptions {
        batch: BatchOptions {
            max_input_file_bytes: 1000,
            ..BatchOptions::default()
        },
        ..fast()
    })
    .await;
    let message = |resp: reqwest::Response| async move {
        let status = resp.status().as_u16();
        let body: Value = resp.json().await.unwrap();
        (
            status,
            body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        )
    };
    let (status, text) = message(upload(&server, "batch", "input.json", b"{}\n").await).await;
    assert_eq!(status, 400);
    assert_eq!(text, "Invalid file format for Batch API. Must be .jsonl");
    let (status, text) = message(upload(&server, "batch", "big.jsonl", &[b'x'; 4000]).await).await;
    assert_eq!(status, 400);
    assert!(text.contains("too large"), "{text}");
    let (status, _) = message(upload(&server, "pictures", "a.png", b"x").await).await;
    assert_eq!(status, 400);
    // Larger than the web framework's default body limit: uploads are limited by purpose only.
    let big = vec![b'y'; 3 << 20];
    let resp = upload(&server, "user_data", "big.bin", &big).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["bytes"], 3 << 20);
    let unauthenticated = client()
        .get(format!("{}/files/file-x", server.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(unauthenticated.status(), 401);
    assert_eq!(get(&server, "/files/file-nope/content").await.status(), 404);

    let vision = upload(&server, "vision", "a.png", b"\x89PNG").await;
    let vision: Value = vision.json().await.unwrap();
    assert_eq!(vision["expires_at"], Value::Null);
    let input = upload_jsonl(&server, &[line("a", GEN, json!({"prompt": "p"}))]).await;
    let cases = [
        (
            json!({"input_file_id": vision["id"], "endpoint": GEN, "completion_window": "24h"}),
            400,
            "input_file_id",
        ),
        (
            json!({"input_file_id": "file-nope", "endpoint": GEN, "completion_window": "24h"}),
            404,
            "input_file_id",
        ),
        (
            json!({"input_file_id": input, "endpoint": GEN, "completion_window": "1h"}),
            400,
            "completion_window",
        ),
        (
            json!({"input_file_id": input, "endpoint": "/v1/images/variations", "completion_window": "24h"}),
            400,
            "endpoint",
        ),
        (
            json!({"input_file_id": input, "completion_window": "24h"}),
            400,
            "endpoint",
        ),
        (
            json!({"input_file_id": input, "endpoint": GEN, "completion_window": "24h",
                   "metadata": (0..17).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
            400,
            "metadata",
        ),
        (
            json!({"input_file_id": input, "endpoint": GEN, "completion_window": "24h",
                   "metadata": {"k": "v".repeat(513)}}),
            400,
            "metadata.k",
        ),
    ];
    for (body, status, param) in cases {
        let resp = post(&server, "/batches", body.clone()).await;
        assert_eq!(resp.status(), status, "{body}");
        let error: Value = resp.json().await.unwrap();
        assert_eq!(error["error"]["param"], param, "{body}");
        assert_eq!(error["error"]["type"], "invalid_request_error");
    }
    assert_eq!(server.api.batch_stats().batches_created, 0);
}

#[tokio::test]
async fn edit_lines_take_uploaded_files_and_data_urls() {
    let server = serve(fast()).await;
    let image = crate::png::PngTemplate::new(500).encode("source");
    let resp = upload(&server, "vision", "source.png", &image).await;
    let image_id = resp.json::<Value>().await.unwrap()["id"].clone();
    let data_url = format!("data:image/png;base64,{}", BASE64.encode_to_string(&image));
    let edits = "/v1/images/edits";
    let lines = [
        line(
            "by-file",
            edits,
            json!({"model": "gpt-image-1", "prompt": "edit by file", "images": [{"file_id": image_id}]}),
        ),
        line(
            "by-url",
            edits,
            json!({"model": "gpt-image-1", "prompt": "edit by url", "images": [{"image_url": data_url}, {"image_url": "https://example.com/a.png"}]}),
        ),
        line(
            "unknown",
            edits,
            json!({"model": "gpt-image-1", "prompt": "edit unknown", "images": [{"file_id": "file-nope"}]}),
        ),
        line(
            "none",
            edits,
            json!({"model": "gpt-image-1", "prompt": "edit none"}),
        ),
    ];
    let done = run(&server, &lines, edits).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(
        done["request_counts"],
        json!({"total": 4, "completed": 2, "failed": 2})
    );
    let output = by_custom_id(&download(&server, &done["output_file_id"]).await);
    assert_eq!(output.len(), 2);
    let png = png_of(&output["by-file"]["response"]["body"]["data"][0]["b64_json"]);
    assert_eq!(decode_png(&png), (64, 64));
    let errors = by_custom_id(&download(&server, &done["error_file_id"]).await);
    assert_eq!(errors["unknown"]["response"]["status_code"], 400);
    assert_eq!(
        errors["none"]["response"]["body"]["error"]["code"],
        "missing_required_parameter"
    );
    let seen = server.api.edits();
    assert_eq!(seen.len(), 2);
    assert_eq!(seen[0].prompt, "edit by file");
    assert_eq!(seen[0].images, [crate::digest(&image)]);
    assert_eq!(seen[1].images[0], crate::digest(&image));
    assert_eq!(server.api.billed_for("edit"), 2);
}

#[tokio::test]
async fn admin_endpoints_drive_batches() {
    let server = serve(fast()).await;
    let admin = format!("http://{}/_fake/batch", server.addr);
    let resp = client()
        .post(&admin)
        .json(&json!({"window_ms": 5000, "per_line_ms": 1, "parallel": 2, "expire_next": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let opts = server.api.batch_options();
    assert_eq!(opts.window, Duration::from_secs(5));
    assert_eq!(opts.parallel, 2);
    let typo = client()
        .post(&admin)
        .json(&json!({"windw_ms": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(typo.status(), 422);
    let lines = [
        line("a", GEN, json!({"prompt": "x"})),
        line("b", GEN, json!({"prompt": "y"})),
    ];
    let done = run(&server, &lines, GEN).await;
    assert_eq!(done["status"], "expired");
    assert_eq!(done["expires_at"], done["created_at"].as_u64().unwrap() + 5);
    let listed: Vec<Value> = admin_json(&server, "batches").await;
    assert_eq!(listed, vec![done]);
    let stats: Stats = admin_json(&server, "stats").await;
    assert_eq!(stats.batch.batches_expired, 1);
    assert_eq!(stats.batch.lines_billed, 1);
}

/// This process's resident memory, in bytes (Linux; 0 elsewhere).
fn rss() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            let line = s.lines().find(|l| l.starts_with("VmRSS:"))?.to_owned();
            line.split_whitespace().nth(1)?.parse::<u64>().ok()
        })
        .map_or(0, |kb| kb * 1024)
}

/// 450 lines of 500 KB images make a 300 MB output file: it is made while it is read, so neither
/// the fake (nor this client, which keeps nothing) holds it.
#[tokio::test]
async fn a_large_output_file_is_streamed_not_held() {
    let server = serve(FakeOptions {
        image_bytes: 500_000,
        batch: BatchOptions {
            parallel: 64,
            per_line: Duration::ZERO,
            ..BatchOptions::default()
        },
        ..FakeOptions::default()
    })
    .await;
    let lines: Vec<Value> = (0..450)
        .map(|i| {
            line(
                &format!("big{i}"),
                GEN,
                json!({"prompt": format!("big image {i}")}),
            )
        })
        .collect();
    let done = run(&server, &lines, GEN).await;
    assert_eq!(done["status"], "completed");
    let file_id = done["output_file_id"].as_str().unwrap();
    let size = get_json(&server, &format!("/files/{file_id}")).await["bytes"]
        .as_u64()
        .unwrap();
    assert!(size > 290_000_000, "{size}");

    let before = rss();
    let mut resp = get(&server, &format!("/files/{file_id}/content")).await;
    assert_eq!(header(&resp, "content-length"), size.to_string());
    let first = resp.chunk().await.unwrap().unwrap();
    let served = server.api.batch_stats().output_bytes_served;
    assert!(served < size / 10, "made {served} of {size} bytes up front");

    let mut received = first.len() as u64;
    let mut newlines = first.iter().filter(|&&b| b == b'\n').count();
    let mut head = first.to_vec();
    let mut peak = rss();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        received += chunk.len() as u64;
        if newlines == 0 {
            head.extend_from_slice(&chunk);
        }
        newlines += chunk.iter().filter(|&&b| b == b'\n').count();
        peak = peak.max(rss());
    }
    assert_eq!(received, size);
    assert_eq!(newlines, 450);
    let end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let first_line: Value = serde_json::from_slice(&head[..end]).unwrap();
    assert_eq!(first_line["custom_id"], "big0");
    let png = png_of(&first_line["response"]["body"]["data"][0]["b64_json"]);
    assert!((490_000..510_000).contains(&png.len()), "{}", png.len());
    assert_eq!(decode_png(&png), (64, 64));
    let growth = peak.saturating_sub(before);
    eprintln!("{size} bytes streamed; resident memory grew by {growth} bytes");
    assert!(
        growth < size / 3,
        "memory grew by {growth} bytes for a {size}-byte file"
    );
}

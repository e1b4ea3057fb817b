//! The Files and Batch APIs' fault knobs, as a client sees them: uploads and creates whose work is
//! done at once but whose answer comes late, so that a client can be killed in between, and batch
//! outputs sent slowly, so that one can be killed mid-download.

use tokio::task::JoinHandle;

use super::batch_client::{
    GEN, create, download, fast, get, get_json, jsonl, line, multipart, run, upload, upload_jsonl,
    wait_for,
};
use super::*;

/// Polls `done` until it holds, for at most 10 s.
async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "not in time: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// A batch input file uploaded by a task of its own: a client that can be killed while it waits.
fn spawn_upload(
    server: &FakeServer,
    name: &str,
    data: &[u8],
) -> JoinHandle<reqwest::Result<reqwest::Response>> {
    let (content_type, body) = multipart(&[("purpose", "batch")], Some((name, data)));
    let request = client()
        .post(format!("{}/files", server.base_url()))
        .bearer_auth("sk-test")
        .header("content-type", content_type)
        .body(body);
    tokio::spawn(request.send())
}

/// A batch created by a task of its own: a client that can be killed while it waits.
fn spawn_create(
    server: &FakeServer,
    file_id: &str,
) -> JoinHandle<reqwest::Result<reqwest::Response>> {
    let request = client()
        .post(format!("{}/batches", server.base_url()))
        .bearer_auth("sk-test")
        .json(&json!({"input_file_id": file_id, "endpoint": GEN, "completion_window": "24h"}));
    tokio::spawn(request.send())
}

#[tokio::test]
async fn a_hung_upload_is_stored_at_once_and_answered_late() {
    let server = serve(fast()).await;
    let delay = Duration::from_millis(800);
    server.api.hang_next_uploads(2, delay);
    let input = jsonl(&[line("a", GEN, json!({"prompt": "late upload"}))]);

    // A client killed while it waits: the file is stored and counted, its id never sent.
    let killed = spawn_upload(&server, "killed.jsonl", &input);
    until("the upload is stored", || {
        server.api.batch_stats().files_uploaded == 1
    })
    .await;
    let files = server.api.stored_files();
    assert_eq!(files.len(), 1);
    assert_eq!(files[0]["filename"], "killed.jsonl");
    assert_eq!(files[0]["bytes"], input.len());
    assert!(!killed.is_finished(), "answered before its delay");
    killed.abort();

    // Waited for, the answer comes after the delay, with the file it stored.
    let started = Instant::now();
    let resp = upload(&server, "batch", "late.jsonl", &input).await;
    assert_eq!(resp.status(), 200);
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    let file: Value = resp.json().await.unwrap();
    assert_eq!(server.api.stored_files()[1]["id"], file["id"]);
    assert_eq!(
        get_json(&server, &format!("/files/{}", file["id"].as_str().unwrap())).await,
        file
    );

    // Two were hung; the next is answered at once.
    let started = Instant::now();
    assert_eq!(
        upload(&server, "batch", "fast.jsonl", &input)
            .await
            .status(),
        200
    );
    assert!(started.elapsed() < delay, "{:?}", started.elapsed());

    // A refused upload is answered at once and does not use a hang up.
    server.api.hang_next_uploads(1, delay);
    let started = Instant::now();
    let refused = upload(&server, "batch", "input.txt", &input).await;
    assert_eq!(refused.status(), 400);
    assert!(started.elapsed() < delay, "{:?}", started.elapsed());
    let started = Instant::now();
    assert_eq!(
        upload(&server, "batch", "late.jsonl", &input)
            .await
            .status(),
        200
    );
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    assert_eq!(server.api.batch_stats().files_uploaded, 4);
}

#[tokio::test]
async fn a_hung_create_starts_the_batch_at_once_and_answers_late() {
    let server = serve(fast()).await;
    let file_id = upload_jsonl(&server, &[line("a", GEN, json!({"prompt": "late create"}))]).await;
    let delay = Duration::from_millis(1500);
    server.api.hang_next_creates(2, delay);

    // A client killed while it waits: the batch is listed and runs to its end, its id never sent.
    let killed = spawn_create(&server, &file_id);
    until("the batch is created", || server.api.batches().len() == 1).await;
    let listed = get_json(&server, "/batches").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    let id = listed["data"][0]["id"].as_str().unwrap().to_owned();
    let done = wait_for(&server, &id, &["completed"]).await;
    assert_eq!(done["request_counts"]["completed"], 1);
    assert!(!killed.is_finished(), "answered before its delay");
    killed.abort();
    assert_eq!(server.api.billed_for("late create"), 1);
    assert_eq!(server.api.batch_stats().batches_created, 1);

    // Held, a batch whose answer is late stays in validating; the answer is the Batch object as
    // it was created.
    server.api.hold_batches();
    let started = Instant::now();
    let batch = create(&server, &file_id, GEN).await;
    assert!(started.elapsed() >= delay, "{:?}", started.elapsed());
    assert_eq!(batch["status"], "validating");
    let id = batch["id"].as_str().unwrap();
    let now = get_json(&server, &format!("/batches/{id}")).await;
    assert_eq!(now["status"], "validating");
    assert_eq!(now["created_at"], batch["created_at"]);
    server.api.release_batches();
    wait_for(&server, id, &["completed"]).await;

    // A refused create is answered at once and does not use a hang up; then none is left.
    let delay = Duration::from_millis(600);
    server.api.hang_next_creates(1, delay);
    let started = Instant::now();
    let body = json!({"input_file_id": file_id, "endpoint": GEN, "completion_window": "1h"});
    let refused = client()
        .post(format!("{}/batches", server.base_url()))
        .bearer_auth("sk-test")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 400);
    assert!(started.elapsed() < delay, "{:?}", started.elapsed());
    for late in [true, false] {
        let started = Instant::now();
        create(&server, &file_id, GEN).await;
        assert_eq!(started.elapsed() >= delay, late, "{:?}", started.elapsed());
    }
    assert_eq!(server.api.batch_stats().batches_created, 4);
}

#[tokio::test]
async fn batch_outputs_can_be_sent_slowly() {
    let server = serve(fast()).await;
    let mut lines: Vec<Value> = (0..4)
        .map(|i| {
            line(
                &format!("s{i}"),
                GEN,
                json!({"prompt": format!("slow {i}")}),
            )
        })
        .collect();
    lines.push(line("bad", GEN, json!({"prompt": "slow bad", "n": 0})));
    let done = run(&server, &lines, GEN).await;
    assert_eq!(done["status"], "completed");
    let output_id = done["output_file_id"].as_str().unwrap();
    let per_line = Duration::from_millis(250);
    server.api.slow_content(per_line);

    // Each line of the output file waits its turn.
    let started = Instant::now();
    let mut resp = get(&server, &format!("/files/{output_id}/content")).await;
    assert_eq!(resp.status(), 200);
    let mut first = None;
    let mut newlines = 0;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        first.get_or_insert(started.elapsed());
        newlines += chunk.iter().filter(|&&b| b == b'\n').count();
    }
    assert_eq!(newlines, 4);
    assert!(first.unwrap() >= per_line, "{first:?}");
    assert!(started.elapsed() >= per_line * 4, "{:?}", started.elapsed());

    // The error file too; the content is what it would be at full speed.
    let started = Instant::now();
    let errors = download(&server, &done["error_file_id"]).await;
    assert!(started.elapsed() >= per_line, "{:?}", started.elapsed());
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "bad");

    // An uploaded file is sent at once.
    let started = Instant::now();
    let input = get(
        &server,
        &format!("/files/{}/content", done["input_file_id"].as_str().unwrap()),
    )
    .await;
    assert_eq!(input.bytes().await.unwrap(), jsonl(&lines));
    assert!(started.elapsed() < per_line, "{:?}", started.elapsed());

    // Turned off mid-download, the rest comes at once.
    let started = Instant::now();
    let mut resp = get(&server, &format!("/files/{output_id}/content")).await;
    let mut newlines = 0;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        server.api.slow_content(Duration::ZERO);
        newlines += chunk.iter().filter(|&&b| b == b'\n').count();
    }
    assert_eq!(newlines, 4);
    assert!(started.elapsed() < per_line * 4, "{:?}", started.elapsed());
    let output = download(&server, &done["output_file_id"]).await;
    assert_eq!(output.len(), 4);
    assert_eq!(server.api.billed_for("slow"), 4);
}

#[tokio::test]
async fn admin_endpoint_sets_the_fault_knobs() {
    let server = serve(fast()).await;
    let admin = |body: Value| {
        client()
            .post(format!("http://{}/_fake/batch", server.addr))
            .json(&body)
            .send()
    };
    let resp = admin(json!({
        "hang_next_uploads": {"n": 1, "ms": 300},
        "hang_next_creates": {"n": 1, "ms": 400},
        "slow_content_ms": 100,
    }))
    .await
    .unwrap();
    assert_eq!(resp.status(), 204);
    for typo in [
        json!({"hang_next_uploads": {"n": 1}}),
        json!({"hang_next_creates": {"n": 1, "ms": 5, "delay": 5}}),
        json!({"hang_next_uploads": 1}),
    ] {
        assert_eq!(admin(typo).await.unwrap().status(), 422);
    }

    let lines: Vec<Value> = (0..3)
        .map(|i| {
            line(
                &format!("k{i}"),
                GEN,
                json!({"prompt": format!("knob {i}")}),
            )
        })
        .collect();
    let started = Instant::now();
    let file_id = upload_jsonl(&server, &lines).await;
    assert!(started.elapsed() >= Duration::from_millis(300));
    let started = Instant::now();
    let batch = create(&server, &file_id, GEN).await;
    assert!(started.elapsed() >= Duration::from_millis(400));
    let done = wait_for(&server, batch["id"].as_str().unwrap(), &["completed"]).await;
    let started = Instant::now();
    assert_eq!(download(&server, &done["output_file_id"]).await.len(), 3);
    assert!(started.elapsed() >= Duration::from_millis(300));

    let resp = admin(json!({"slow_content_ms": 0})).await.unwrap();
    assert_eq!(resp.status(), 204);
    let started = Instant::now();
    assert_eq!(download(&server, &done["output_file_id"]).await.len(), 3);
    assert!(started.elapsed() < Duration::from_millis(300));
}

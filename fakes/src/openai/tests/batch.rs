//! The Files and Batch APIs as a client sees them: upload, create, poll, download, and what was
//! billed.

use super::*;

pub(super) const GEN: &str = "/v1/images/generations";

/// Options with small images and a fast batch clock.
pub(super) fn fast() -> FakeOptions {
    FakeOptions {
        image_bytes: 3000,
        ..FakeOptions::default()
    }
}

/// A multipart/form-data body: text fields, then the file.
pub(super) fn multipart(fields: &[(&str, &str)], file: Option<(&str, &[u8])>) -> (String, Vec<u8>) {
    let boundary = "fake-b0undary-7x";
    let mut body = Vec::new();
    for (k, v) in fields {
        body.extend_from_slice(
            format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n")
                .as_bytes(),
        );
    }
    if let Some((name, data)) = file {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; \
                 filename=\"{name}\"\r\nContent-Type: application/octet-stream\r\n\r\n"
            )
            .as_bytes(),
        );
        body.extend_from_slice(data);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

pub(super) async fn upload(
    server: &FakeServer,
    purpose: &str,
    name: &str,
    data: &[u8],
) -> reqwest::Response {
    let (content_type, body) = multipart(&[("purpose", purpose)], Some((name, data)));
    client()
        .post(format!("{}/files", server.base_url()))
        .bearer_auth("sk-test")
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .unwrap()
}

/// Uploads a batch input file; its id.
pub(super) async fn upload_jsonl(server: &FakeServer, lines: &[Value]) -> String {
    let resp = upload(server, "batch", "input.jsonl", &jsonl(lines)).await;
    assert_eq!(resp.status(), 200);
    let file: Value = resp.json().await.unwrap();
    file["id"].as_str().unwrap().to_owned()
}

pub(super) fn jsonl(lines: &[Value]) -> Vec<u8> {
    let mut out = Vec::new();
    for line in lines {
        out.extend_from_slice(line.to_string().as_bytes());
        out.push(b'\n');
    }
    out
}

pub(super) fn line(custom_id: &str, url: &str, body: Value) -> Value {
    json!({"custom_id": custom_id, "method": "POST", "url": url, "body": body})
}

async fn post(server: &FakeServer, path: &str, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}{path}", server.base_url()))
        .bearer_auth("sk-test")
        .json(&body)
        .send()
        .await
        .unwrap()
}

pub(super) async fn get(server: &FakeServer, path: &str) -> reqwest::Response {
    client()
        .get(format!("{}{path}", server.base_url()))
        .bearer_auth("sk-test")
        .send()
        .await
        .unwrap()
}

pub(super) async fn get_json(server: &FakeServer, path: &str) -> Value {
    let resp = get(server, path).await;
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.json().await.unwrap()
}

/// Creates a batch over an uploaded file; the Batch object.
pub(super) async fn create(server: &FakeServer, file_id: &str, endpoint: &str) -> Value {
    let body = json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h"});
    let resp = post(server, "/batches", body).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
}

/// Polls a batch until its status is one of `statuses`.
pub(super) async fn wait_for(server: &FakeServer, id: &str, statuses: &[&str]) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let batch = get_json(server, &format!("/batches/{id}")).await;
        if statuses.contains(&batch["status"].as_str().unwrap()) {
            return batch;
        }
        assert!(Instant::now() < deadline, "still {}", batch["status"]);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Uploads `lines`, runs them as a batch to its end; the final Batch object.
pub(super) async fn run(server: &FakeServer, lines: &[Value], endpoint: &str) -> Value {
    let file_id = upload_jsonl(server, lines).await;
    let batch = create(server, &file_id, endpoint).await;
    let id = batch["id"].as_str().unwrap();
    wait_for(server, id, &["completed", "failed", "expired", "cancelled"]).await
}

/// A file's content as JSON lines, checking that its length was announced right.
pub(super) async fn download(server: &FakeServer, file_id: &Value) -> Vec<Value> {
    let id = file_id.as_str().expect("a file id");
    let resp = get(server, &format!("/files/{id}/content")).await;
    assert_eq!(resp.status(), 200);
    let length: usize = header(&resp, "content-length").parse().unwrap();
    let bytes = resp.bytes().await.unwrap();
    assert_eq!(bytes.len(), length);
    let object = get_json(server, &format!("/files/{id}")).await;
    assert_eq!(object["bytes"], length);
    assert_eq!(object["purpose"], "batch_output");
    String::from_utf8(bytes.to_vec())
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn by_custom_id(lines: &[Value]) -> BTreeMap<String, Value> {
    lines
        .iter()
        .map(|l| (l["custom_id"].as_str().unwrap().to_owned(), l.clone()))
        .collect()
}

fn png_of(b64: &Value) -> Vec<u8> {
    BASE64.decode_to_vec(b64.as_str().unwrap()).unwrap()
}

#[tokio::test]
async fn a_batch_runs_its_lines_like_live_calls_and_bills_them_once() {
    let server = serve(fast()).await;
    server
        .api
        .push_rule(rule(Some("forbidden fox"), Fault::Moderation, None));
    let lines = [
        line(
            "one",
            GEN,
            json!({"model": "gpt-image-1", "prompt": "a red fox", "quality": "low"}),
        ),
        line(
            "two",
            GEN,
            json!({"model": "gpt-image-1", "prompt": "a red fox", "n": 2}),
        ),
        line(
            "mod",
            GEN,
            json!({"model": "gpt-image-1", "prompt": "a forbidden fox"}),
        ),
        line(
            "bad",
            GEN,
            json!({"model": "gpt-image-1", "prompt": "a fox", "n": 0}),
        ),
        line(
            "owl",
            GEN,
            json!({"model": "gpt-image-1", "prompt": "an owl"}),
        ),
    ];
    let input = jsonl(&lines);
    let resp = upload(&server, "batch", "requests.jsonl", &input).await;
    assert_eq!(resp.status(), 200);
    let file: Value = resp.json().await.unwrap();
    assert!(file["id"].as_str().unwrap().starts_with("file-"));
    assert_eq!(file["object"], "file");
    assert_eq!(file["bytes"], input.len());
    assert_eq!(file["filename"], "requests.jsonl");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["status"], "processed");
    let file_id = file["id"].as_str().unwrap();
    assert_eq!(get_json(&server, &format!("/files/{file_id}")).await, file);
    let content = get(&server, &format!("/files/{file_id}/content")).await;
    assert_eq!(content.bytes().await.unwrap(), input);

    let body = json!({
        "input_file_id": file_id,
        "endpoint": GEN,
        "completion_window": "24h",
        "metadata": {"job": "nightly"},
    });
    let resp = post(&server, "/batches", body).await;
    assert_eq!(resp.status(), 200);
    let batch: Value = resp.json().await.unwrap();
    assert!(batch["id"].as_str().unwrap().starts_with("batch_"));
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["status"], "validating");
    assert_eq!(batch["endpoint"], GEN);
    assert_eq!(batch["completion_window"], "24h");
    assert_eq!(batch["errors"], Value::Null);
    assert_eq!(batch["output_file_id"], Value::Null);
    assert_eq!(batch["metadata"], json!({"job": "nightly"}));
    assert_eq!(
        batch["request_counts"],
        json!({"total": 0, "completed": 0, "failed": 0})
    );
    let created = batch["created_at"].as_u64().unwrap();
    assert_eq!(batch["expires_at"].as_u64().unwrap(), created + 60);

    let id = batch["id"].as_str().unwrap();
    let done = wait_for(&server, id, &["completed"]).await;
    assert_eq!(
        done["request_counts"],
        json!({"total": 5, "completed": 3, "failed": 2})
    );
    assert_eq!(done["model"], "gpt-image-1");
    for at in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[at].as_u64().unwrap() >= created, "{at}");
    }
    for at in ["failed_at", "expired_at", "cancelling_at", "cancelled_at"] {
        assert_eq!(done[at], Value::Null, "{at}");
    }
    assert_eq!(done["usage"]["output_tokens"], 272 + 2 * 1056 + 1056);

    let output = download(&server, &done["output_file_id"]).await;
    assert_eq!(output.len(), 3);
    let output = by_custom_id(&output);
    let mut images = Vec::new();
    for (custom_id, n) in [("one", 1), ("two", 2), ("owl", 1)] {
        let l = &output[custom_id];
        assert!(l["id"].as_str().unwrap().starts_with("batch_req_"));
        assert_eq!(l["error"], Value::Null);
        assert_eq!(l["response"]["status_code"], 200);
        assert!(
            l["response"]["request_id"]
                .as_str()
                .unwrap()
                .starts_with("req_")
        );
        let body = &l["response"]["body"];
        assert_eq!(body["output_format"], "png");
        assert!(body["usage"]["total_tokens"].as_u64().unwrap() > 0);
        let data = body["data"].as_array().unwrap();
        assert_eq!(data.len(), n);
        for d in data {
            let png = png_of(&d["b64_json"]);
            assert_eq!(decode_png(&png), (64, 64));
            images.push(png);
        }
    }
    assert_eq!(output["one"]["response"]["body"]["quality"], "low");
    images.sort();
    images.dedup();
    assert_eq!(images.len(), 4, "every image differs");

    let errors = by_custom_id(&download(&server, &done["error_file_id"]).await);
    assert_eq!(errors.len(), 2);
    let moderated = &errors["mod"]["response"];
    assert_eq!(moderated["status_code"], 400);
    assert_eq!(moderated["body"]["error"]["code"], "moderation_blocked");
    assert_eq!(
        moderated["body"]["error"]["type"],
        "image_generation_user_error"
    );
    let bad = &errors["bad"]["response"];
    assert_eq!(bad["status_code"], 400);
    assert_eq!(bad["body"]["error"]["code"], "integer_below_min_value");
    assert_eq!(bad["body"]["error"]["param"], "n");
    assert_eq!(errors["bad"]["error"], Value::Null);

    // The same bytes at every download.
    let again = get(
        &server,
        &format!(
            "/files/{}/content",
            done["output_file_id"].as_str().unwrap()
        ),
    )
    .await
    .bytes()
    .await
    .unwrap();
    let first = get(
        &server,
        &format!(
            "/files/{}/content",
            done["output_file_id"].as_str().unwrap()
        ),
    )
    .await
    .bytes()
    .await
    .unwrap();
    assert_eq!(again, first);

    // Billed like live calls, once each; the live counters saw no call.
    assert_eq!(server.api.billed_for("red fox"), 2);
    assert_eq!(server.api.calls_for("red fox"), 2);
    assert_eq!(server.api.billed_for("forbidden"), 0);
    assert_eq!(server.api.calls_for("forbidden"), 1);
    assert_eq!(server.api.billed_for("owl"), 1);
    let stats = server.api.stats();
    assert_eq!((stats.requests, stats.billed), (0, 0));
    let batch_stats = server.api.batch_stats();
    assert_eq!(batch_stats, stats.batch);
    assert_eq!(
        (
            batch_stats.files_uploaded,
            batch_stats.batches_created,
            batch_stats.batches_completed,
            batch_stats.lines_billed,
            batch_stats.lines_failed,
            batch_stats.lines_not_run,
            batch_stats.images,
        ),
        (1, 1, 1, 3, 2, 0, 4)
    );
    assert!(batch_stats.output_bytes_served > 0);
    assert_eq!(server.api.batches(), vec![done.clone()]);

    // Deleting a file.
    let resp = client()
        .delete(format!("{}/files/{file_id}", server.base_url()))
        .bearer_auth("sk-test")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let deleted: Value = resp.json().await.unwrap();
    assert_eq!(
        deleted,
        json!({"id": file_id, "object": "file", "deleted": true})
    );
    let gone = get(&server, &format!("/files/{file_id}")).await;
    assert_eq!(gone.status(), 404);
    let gone: Value = gone.json().await.unwrap();
    assert_eq!(
        gone["error"]["message"],
        format!("No such File object: {file_id}")
    );
    assert_eq!(gone["error"]["type"], "invalid_request_error");
    assert_eq!(server.api.batch_stats().files_deleted, 1);
}

#[tokio::test]
async fn a_duplicate_custom_id_fails_the_whole_batch() {
    let server = serve(fast()).await;
    let lines = [
        line("same", GEN, json!({"prompt": "a cat"})),
        line("other", GEN, json!({"prompt": "a dog"})),
        line("same", GEN, json!({"prompt": "a cow"})),
    ];
    let done = run(&server, &lines, GEN).await;
    assert_eq!(done["status"], "failed");
    assert!(done["failed_at"].as_u64().is_some());
    assert_eq!(done["in_progress_at"], Value::Null);
    assert_eq!(done["errors"]["object"], "list");
    let error = &done["errors"]["data"][0];
    assert_eq!(error["code"], "duplicate_custom_id");
    assert_eq!(error["line"], 3);
    assert_eq!(error["param"], "custom_id");
    assert_eq!(done["output_file_id"], Value::Null);
    assert_eq!(done["error_file_id"], Value::Null);
    assert_eq!(
        done["request_counts"],
        json!({"total": 0, "completed": 0, "failed": 0})
    );
    assert_eq!(server.api.calls_for("a c"), 0);
    let stats = server.api.batch_stats();
    assert_eq!((stats.batches_failed, stats.lines_billed), (1, 0));

    // A line for another endpoint fails it too.
    let lines = [line("a", "/v1/images/edits", json!({"prompt": "a cat"}))];
    let done = run(&server, &lines, GEN).await;
    assert_eq!(done["errors"]["data"][0]["code"], "invalid_url");

    // And so does an organization out of enqueued tokens, on demand.
    server.api.fail_next_batches(1);
    let lines = [line("a", GEN, json!({"prompt": "a cat"}))];
    let done = run(&server, &lines, GEN).await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["errors"]["data"][0]["code"], "token_limit_exceeded");
    assert_eq!(run(&server, &lines, GEN).await["status"], "completed");
    assert_eq!(server.api.billed_for("a cat"), 1);
}

#[tokio::test]
async fn a_cancelled_batch_keeps_what_ran_and_bills_nothing_else() {
    let server = serve(fast()).await;
    // Held in validating, a duplicate batch is cancelled before anything of it runs.
    server.api.hold_batches();
    let file_id = upload_jsonl(&server, &[line("a", GEN, json!({"prompt": "held"}))]).await;
    let batch = create(&server, &file_id, GEN).await;
    let id = batch["id"].as_str().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        get_json(&server, &format!("/batches/{id}")).await["status"],
        "validating"
    );
    let resp = post(&server, &format!("/batches/{id}/cancel"), json!({})).await;
    assert_eq!(resp.status(), 200);
    let cancelling: Value = resp.json().await.unwrap();
    assert_eq!(cancelling["status"], "cancelling");
    assert!(cancelling["cancelling_at"].as_u64().is_some());
    let cancelled = wait_for(&server, id, &["cancelled"]).await;
    assert!(cancelled["cancelled_at"].as_u64().is_some());
    assert_eq!(cancelled["output_file_id"], Value::Null);
    assert_eq!(cancelled["error_file_id"], Value::Null);
    assert_eq!(server.api.calls_for("held"), 0);
    server.api.release_batches();
    // Cancelling again is refused.
    let resp = post(&server, &format!("/batches/{id}/cancel"), json!({})).await;
    assert_eq!(resp.status(), 400);

    // Cancelled half way: the lines that ran are in the output file, and billed.
    server.api.set_batch_options(BatchOptions {
        per_line: Duration::from_millis(40),
        parallel: 1,
        ..BatchOptions::default()
    });
    let lines: Vec<Value> = (0..10)
        .map(|i| {
            line(
                &format!("c{i}"),
                GEN,
                json!({"prompt": format!("slow {i}")}),
            )
        })
        .collect();
    let file_id = upload_jsonl(&server, &lines).await;
    let id = create(&server, &file_id, GEN).await["id"]
        .as_str()
        .unwrap()
        .to_owned();
    loop {
        let b = get_json(&server, &format!("/batches/{id}")).await;
        if b["request_counts"]["completed"].as_u64().unwrap() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let resp = post(&server, &format!("/batches/{id}/cancel"), json!({})).await;
    assert_eq!(resp.status(), 200);
    let done = wait_for(&server, &id, &["cancelled"]).await;
    let completed = done["request_counts"]["completed"].as_u64().unwrap();
    assert!((2..10).contains(&completed), "{completed}");
    assert_eq!(
        done["request_counts"]["failed"].as_u64().unwrap(),
        10 - completed
    );
    let output = download(&server, &done["output_file_id"]).await;
    assert_eq!(output.len() as u64, completed);
    let errors = download(&server, &done["error_file_id"]).await;
    assert_eq!(errors.len() as u64, 10 - completed);
    for e in &errors {
        assert_eq!(e["response"], Value::Null);
        assert_eq!(e["error"]["code"], "batch_cancelled");
    }
    assert_eq!(server.api.billed_for("slow"), completed);
    assert_eq!(server.api.calls_for("slow"), completed);
    let stats = server.api.batch_stats();
    assert_eq!(stats.batches_cancelled, 2);
    assert_eq!(stats.lines_not_run, 10 - completed);
}

#[tokio::test]
async fn an_expired_batch_keeps_what_ran_and_reports_the_rest() {
    let server = serve(fast()).await;
    // On demand: expires after half its lines.
    server.api.expire_next_batches(1);
    let lines: Vec<Value> = (0..6)
        .map(|i| {
            line(
                &format!("e{i}"),
                GEN,
                json!({"prompt": format!("late {i}")}),
            )
        })
        .collect();
    let done = run(&server, &lines, GEN).await;
    assert_eq!(done["status"], "expired");
    assert!(done["expired_at"].as_u64().is_some());
    assert_eq!(done["completed_at"], Value::Null);
    assert_eq!(
        done["request_counts"],
        json!({"total": 6, "completed": 3, "failed": 3})
    );
    let output = by_custom_id(&download(&server, &done["output_file_id"]).await);
    assert_eq!(output.keys().collect::<Vec<_>>(), ["e0", "e1", "e2"]);
    let errors = download(&server, &done["error_file_id"]).await;
    assert_eq!(errors.len(), 3);
    for e in &errors {
        assert_eq!(e["response"], Value::Null);
        assert_eq!(e["error"]["code"], "batch_expired");
        assert_eq!(
            e["error"]["message"],
            "This request could not be executed before the completion window expired."
        );
    }
    assert_eq!(server.api.billed_for("late"), 3);

    // By the clock: a "24h" window of 300 ms is too short for 10 lines of 100 ms.
    server.api.set_batch_options(BatchOptions {
        per_line: Duration::from_millis(100),
        parallel: 1,
        window: Duration::from_millis(300),
        ..BatchOptions::default()
    });
    let lines: Vec<Value> = (0..10)
        .map(|i| {
            line(
                &format!("w{i}"),
                GEN,
                json!({"prompt": format!("window {i}")}),
            )
        })
        .collect();
    let done = run(&server, &lines, GEN).await;
    assert_eq!(done["status"], "expired");
    let completed = done["request_counts"]["completed"].as_u64().unwrap();
    assert!((1..10).contains(&completed), "{completed}");
    assert_eq!(server.api.billed_for("window"), completed);
    let stats = server.api.batch_stats();
    assert_eq!(stats.batches_expired, 2);
    assert_eq!(stats.lines_not_run, 3 + 10 - completed);
}

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
    let listed: Vec<Value> = client()
        .get(format!("http://{}/_fake/batches", server.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed, vec![done]);
    let stats: Stats = client()
        .get(format!("http://{}/_fake/stats", server.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
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

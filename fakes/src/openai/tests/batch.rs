//! The Files and Batch APIs as a client sees them: upload, create, poll, download, and what was
//! billed; a file that does not validate, cancellation and expiry.

use super::batch_client::*;
use super::batch_client::{get, post};
use super::*;

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

//! Talking to the fake's Files and Batch APIs over HTTP, as a client would: the helpers of the
//! batch tests.

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

pub(super) async fn post(server: &FakeServer, path: &str, body: Value) -> reqwest::Response {
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

pub(super) fn by_custom_id(lines: &[Value]) -> BTreeMap<String, Value> {
    lines
        .iter()
        .map(|l| (l["custom_id"].as_str().unwrap().to_owned(), l.clone()))
        .collect()
}

pub(super) fn png_of(b64: &Value) -> Vec<u8> {
    BASE64.decode_to_vec(b64.as_str().unwrap()).unwrap()
}

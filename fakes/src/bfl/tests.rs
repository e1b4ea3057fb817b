use std::time::Duration;

use serde_json::{Value, json};

use super::*;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn submit(server: &BflServer, prompt: &str) -> (u16, Value) {
    let response = client()
        .post(format!("{}/flux-2-pro", server.base_url()))
        .header("x-key", "k")
        .json(&json!({"prompt": prompt, "width": 512, "height": 512, "output_format": "png"}))
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap())
}

async fn poll(url: &str) -> Value {
    client()
        .get(url)
        .header("x-key", "k")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test]
async fn a_task_is_pending_then_ready_with_a_sample_that_expires() {
    let server = BflFake::new(BflOptions {
        generation: Duration::from_millis(200),
        sample_ttl: Duration::from_millis(400),
        ..BflOptions::default()
    })
    .start()
    .await
    .unwrap();
    let (status, body) = submit(&server, "a fox").await;
    assert_eq!(status, 200, "{body}");
    let url = body["polling_url"].as_str().unwrap().to_string();
    assert_eq!(poll(&url).await["status"], "Pending");
    assert_eq!(server.api.active(), 1);
    tokio::time::sleep(Duration::from_millis(250)).await;
    let ready = poll(&url).await;
    assert_eq!(ready["status"], "Ready", "{ready}");
    let sample = ready["result"]["sample"].as_str().unwrap();
    let image = client().get(sample).send().await.unwrap();
    assert_eq!(image.status(), 200);
    assert!(image.bytes().await.unwrap().starts_with(b"\x89PNG"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(client().get(sample).send().await.unwrap().status(), 403);
    assert_eq!(server.api.billed_for("a fox"), 1);
    let unknown = url.replace("id=", "id=x");
    assert_eq!(poll(&unknown).await["status"], "Task not found");
}

#[tokio::test]
async fn the_active_task_cap_refuses_without_billing_and_faults_apply() {
    let server = BflFake::new(BflOptions {
        generation: Duration::from_secs(30),
        max_active: 2,
        ..BflOptions::default()
    })
    .start()
    .await
    .unwrap();
    server.api.push_rule(Rule {
        prompt_contains: Some("moderated".into()),
        fault: Fault::RequestModerated,
        times: None,
    });
    let (status, body) = submit(&server, "a moderated fox").await;
    assert_eq!(status, 200);
    let url = body["polling_url"].as_str().unwrap().to_string();
    assert_eq!(poll(&url).await["status"], "Request Moderated");
    assert_eq!(submit(&server, "one").await.0, 200);
    assert_eq!(submit(&server, "two").await.0, 200);
    let (status, body) = submit(&server, "three").await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(server.api.billed_for("three"), 0);
    let response = client()
        .post(format!("{}/flux-2-pro", server.base_url()))
        .json(&json!({"prompt": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = client()
        .post(format!("{}/flux-2-pro", server.base_url()))
        .header("x-key", "k")
        .json(&json!({"prompt": "p", "width": 1000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 422);
}

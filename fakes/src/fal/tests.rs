use super::*;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

#[tokio::test]
async fn a_request_is_queued_answered_202_until_done_then_its_result_served() {
    let server = FalFake::new(FalOptions {
        generation: Duration::from_millis(300),
        ..FalOptions::default()
    })
    .start()
    .await
    .unwrap();
    let queued: Value = client()
        .post(format!("{}/fal-ai/flux/schnell", server.base_url()))
        .header("authorization", "Key k")
        .header("x-fal-no-retry", "1")
        .json(&json!({"prompt": "a fox", "num_images": 2, "image_size": "landscape_16_9"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let status_url = queued["status_url"].as_str().unwrap().to_owned();
    let suffix = format!(
        "/fal-ai/flux/requests/{}/status",
        queued["request_id"].as_str().unwrap()
    );
    assert!(status_url.ends_with(&suffix), "{status_url}");
    let first = client()
        .get(&status_url)
        .header("authorization", "Key k")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 202);
    tokio::time::sleep(Duration::from_millis(350)).await;
    let done = client()
        .get(&status_url)
        .header("authorization", "Key k")
        .send()
        .await
        .unwrap();
    assert_eq!(done.status(), 200);
    let result: Value = client()
        .get(queued["response_url"].as_str().unwrap())
        .header("authorization", "Key k")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(result["images"].as_array().unwrap().len(), 2);
    assert_eq!(result["images"][0]["width"], 1024);
    assert_eq!(server.api.retrying_submits(), 0);
    assert_eq!(
        client().get(&status_url).send().await.unwrap().status(),
        401
    );
}

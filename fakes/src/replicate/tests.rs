use super::*;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

#[tokio::test]
async fn a_prediction_starts_runs_and_leaves_its_files_for_a_while() {
    let server = ReplicateFake::new(ReplicateOptions {
        generation: Duration::from_millis(200),
        output_ttl: Duration::from_millis(300),
        ..ReplicateOptions::default()
    })
    .start()
    .await
    .unwrap();
    let created: Value = client()
        .post(format!(
            "{}/v1/models/black-forest-labs/flux-schnell/predictions",
            server.base_url()
        ))
        .bearer_auth("r8_x")
        .json(&json!({"input": {"prompt": "a fox", "num_outputs": 2}}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(created["status"], "starting");
    let get = created["urls"]["get"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(250)).await;
    let done: Value = client()
        .get(&get)
        .bearer_auth("r8_x")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(done["status"], "succeeded", "{done}");
    let outputs = done["output"].as_array().unwrap();
    assert_eq!(outputs.len(), 2);
    let url = outputs[0].as_str().unwrap();
    let png = client()
        .get(url)
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        client().get(url).send().await.unwrap().status(),
        404,
        "deleted"
    );
    assert_eq!(server.api.stats().billed, 1);
    let unauthenticated = client().get(&get).send().await.unwrap();
    assert_eq!(unauthenticated.status(), 401);
}

use super::*;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

#[tokio::test]
async fn a_batch_comes_after_its_grid_and_auth_is_basic() {
    let server = A1111Fake::new(A1111Options {
        auth: Some(("art".into(), "s3cret".into())),
        ..A1111Options::default()
    })
    .start()
    .await
    .unwrap();
    let url = format!("{}/sdapi/v1/txt2img", server.base_url());
    let body = json!({"prompt": "a keep", "batch_size": 3, "seed": 7, "force_task_id": "t-1"});
    let r = client().post(&url).json(&body).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let e: Value = r.json().await.unwrap();
    assert_eq!(e["detail"], "Not authenticated");
    let r = client()
        .post(&url)
        .basic_auth("art", Some("wrong"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let answer: Value = client()
        .post(&url)
        .basic_auth("art", Some("s3cret"))
        .json(&body)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        answer["images"].as_array().unwrap().len(),
        4,
        "a grid and three images"
    );
    let info: Value = serde_json::from_str(answer["info"].as_str().unwrap()).unwrap();
    assert_eq!(info["index_of_first_image"], 1);
    assert_eq!(info["all_seeds"], json!([7, 8, 9]));
    let progress: Value = client()
        .post(format!("{}/internal/progress", server.base_url()))
        .json(&json!({"id_task": "t-1"}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(progress["completed"], true);
    let bad = client()
        .post(&url)
        .basic_auth("art", Some("s3cret"))
        .json(&json!({"prompt": "x", "steps": "many"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 422);
    assert_eq!(server.api.stats().billed, 1, "refused calls never ran");
}

#[tokio::test]
async fn calls_run_one_at_a_time() {
    let server = A1111Fake::new(A1111Options {
        generation: Duration::from_millis(150),
        ..A1111Options::default()
    })
    .start()
    .await
    .unwrap();
    let url = format!("{}/sdapi/v1/txt2img", server.base_url());
    let started = std::time::Instant::now();
    let calls = (0..3).map(|i| {
        let url = url.clone();
        async move {
            client()
                .post(url)
                .json(&json!({"prompt": format!("p{i}")}))
                .send()
                .await
                .unwrap()
                .status()
        }
    });
    let statuses = futures_util::future::join_all(calls).await;
    assert!(statuses.iter().all(|s| s.as_u16() == 200));
    assert!(
        started.elapsed() >= Duration::from_millis(450),
        "three runs in a row"
    );
    assert_eq!(server.api.stats().billed, 3);
}

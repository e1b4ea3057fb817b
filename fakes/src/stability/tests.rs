use super::*;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

fn form(fields: &[(&str, &str)]) -> (String, String) {
    let boundary = "b0undary";
    let mut body = String::new();
    for (k, v) in fields {
        body.push_str(&format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"{k}\"\r\n\r\n{v}\r\n"
        ));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    (format!("multipart/form-data; boundary={boundary}"), body)
}

#[tokio::test]
async fn only_multipart_is_taken_and_filtered_images_say_so() {
    let server = StabilityFake::new(StabilityOptions {
        credits: Some(10.0),
        ..StabilityOptions::default()
    })
    .start()
    .await
    .unwrap();
    server.api.push_rule(crate::rules::Rule {
        prompt_contains: Some("blurred".into()),
        fault: Fault::ContentFiltered,
        times: None,
    });
    let url = format!("{}/v2beta/stable-image/generate/core", server.base_url());
    let json = client()
        .post(&url)
        .bearer_auth("k")
        .json(&json!({"prompt": "a fox"}))
        .send()
        .await
        .unwrap();
    assert_eq!(json.status(), 400, "JSON is refused");
    let (ct, body) = form(&[("prompt", "a fox"), ("aspect_ratio", "16:9")]);
    let ok = client()
        .post(&url)
        .bearer_auth("k")
        .header("content-type", &ct)
        .header("accept", "image/*")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);
    assert_eq!(ok.headers()["finish-reason"], "SUCCESS");
    assert!(ok.bytes().await.unwrap().starts_with(b"\x89PNG"));
    let (ct, body) = form(&[("prompt", "a blurred fox")]);
    let filtered = client()
        .post(&url)
        .bearer_auth("k")
        .header("content-type", &ct)
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(filtered.headers()["finish-reason"], "CONTENT_FILTERED");
    // 10 credits, 3 a Core image: the fourth is refused.
    let (ct, body) = form(&[("prompt", "one more fox")]);
    assert_eq!(
        client()
            .post(&url)
            .bearer_auth("k")
            .header("content-type", &ct)
            .body(body.clone())
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    assert_eq!(
        client()
            .post(&url)
            .bearer_auth("k")
            .header("content-type", &ct)
            .body(body)
            .send()
            .await
            .unwrap()
            .status(),
        402
    );
    assert_eq!(server.api.stats().billed, 3);
    assert_eq!(server.api.credits(), Some(1.0));
}

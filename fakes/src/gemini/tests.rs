use serde_json::{Value, json};

use super::*;

async fn call(server: &GeminiServer, key: Option<&str>, model: &str, body: Value) -> (u16, Value) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut request = reqwest::Client::new()
        .post(format!(
            "{}/models/{model}:generateContent",
            server.base_url()
        ))
        .json(&body);
    if let Some(key) = key {
        request = request.header("x-goog-api-key", key);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

fn image_request(prompt: &str) -> Value {
    json!({"contents": [{"parts": [{"text": prompt}]}],
           "generationConfig": {"responseModalities": ["IMAGE"], "imageConfig": {"aspectRatio": "16:9"}}})
}

#[tokio::test]
async fn answers_an_image_part_beside_text_with_usage() {
    let server = GeminiFake::new(GeminiOptions::default())
        .start()
        .await
        .unwrap();
    let (status, body) = call(
        &server,
        Some("k"),
        "gemini-2.5-flash-image",
        image_request("a fox"),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let parts = &body["candidates"][0]["content"]["parts"];
    let data = parts[1]["inlineData"]["data"].as_str().unwrap();
    let png = base64_simd::STANDARD.decode_to_vec(data).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    assert_eq!(body["usageMetadata"]["candidatesTokenCount"], 1290);
    assert_eq!(server.api.billed_for("a fox"), 1);
}

#[tokio::test]
async fn keys_fields_and_sizes_are_checked_as_the_api_does() {
    let server = GeminiFake::new(GeminiOptions {
        api_key: Some("right".into()),
        ..GeminiOptions::default()
    })
    .start()
    .await
    .unwrap();
    let model = "gemini-2.5-flash-image";
    let (status, body) = call(&server, None, model, image_request("p")).await;
    assert_eq!(
        (status, body["error"]["status"].as_str()),
        (403, Some("PERMISSION_DENIED"))
    );
    let (status, body) = call(&server, Some("wrong"), model, image_request("p")).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"]["details"][0]["reason"], "API_KEY_INVALID");
    let mut unknown = image_request("p");
    unknown["n"] = json!(2);
    let (status, body) = call(&server, Some("right"), model, unknown).await;
    assert_eq!(status, 400);
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("Unknown name \"n\"")
    );
    let mut ratio = image_request("p");
    ratio["generationConfig"]["imageConfig"]["aspectRatio"] = json!("7:4");
    assert_eq!(call(&server, Some("right"), model, ratio).await.0, 400);
    assert_eq!(server.api.stats().billed, 0);
}

#[tokio::test]
async fn refusals_and_quotas_come_as_the_api_sends_them() {
    let server = GeminiFake::new(GeminiOptions {
        requests_per_day: Some(1),
        ..GeminiOptions::default()
    })
    .start()
    .await
    .unwrap();
    server.api.push_rule(Rule {
        prompt_contains: Some("blocked".into()),
        fault: Fault::BlockedPrompt {
            reason: "PROHIBITED_CONTENT".into(),
        },
        times: None,
    });
    let model = "gemini-3-pro-image";
    let (status, body) = call(&server, Some("k"), model, image_request("blocked one")).await;
    assert_eq!(status, 200);
    assert_eq!(body["promptFeedback"]["blockReason"], "PROHIBITED_CONTENT");
    assert!(body.get("candidates").is_none());
    assert_eq!(server.api.billed_for("blocked"), 1);
    assert_eq!(
        call(&server, Some("k"), model, image_request("first"))
            .await
            .0,
        200
    );
    let (status, body) = call(&server, Some("k"), model, image_request("second")).await;
    assert_eq!(status, 429);
    assert_eq!(body["error"]["status"], "RESOURCE_EXHAUSTED");
    let id = &body["error"]["details"][0]["violations"][0]["quotaId"];
    assert!(id.as_str().unwrap().contains("PerDay"), "{id}");
}

use super::*;

fn client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

async fn post_form(url: &str, form: &str) -> (u16, Value) {
    let r = client()
        .post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form.to_owned())
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn tokens_are_issued_to_proven_clients_and_expire() {
    let server = AzureFake::new(AzureOptions {
        token_lifetime: Duration::from_millis(300),
        ..AzureOptions::default()
    })
    .start()
    .await
    .unwrap();
    let o = AzureOptions::default();
    let url = format!("{}/{}/oauth2/v2.0/token", server.endpoint(), o.tenant);
    let scope = "https%3A%2F%2Fcognitiveservices.azure.com%2F.default";
    let (status, body) = post_form(
        &url,
        &format!(
            "grant_type=client_credentials&client_id={}&scope={scope}&client_secret=wrong",
            o.client_id
        ),
    )
    .await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], "invalid_client");
    let (status, body) = post_form(
        &url,
        &format!("grant_type=client_credentials&client_id={}&scope={scope}&client_secret=azure-client-secret", o.client_id),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let token = body["access_token"].as_str().unwrap().to_owned();
    let list = |auth: String| {
        let url = format!("{}/openai/v1/models", server.endpoint());
        async move {
            client()
                .get(url)
                .header("authorization", auth)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        }
    };
    assert_eq!(list(format!("Bearer {token}")).await, 200);
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(list(format!("Bearer {token}")).await, 401, "expired");
    let stats = server.api.token_stats();
    assert_eq!(
        (stats.issued, stats.refused_grants, stats.refused_requests),
        (1, 1, 1)
    );
}

#[tokio::test]
async fn classic_urls_need_their_api_version_and_refuse_webp() {
    let server = AzureFake::new(AzureOptions::default())
        .start()
        .await
        .unwrap();
    let post = |path: &str, body: Value| {
        let url = format!("{}{path}", server.endpoint());
        async move {
            let r = client()
                .post(url)
                .header("api-key", "azure-test-key")
                .json(&body)
                .send()
                .await
                .unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let base = "/openai/deployments/gpt-image-1/images/generations";
    let (status, _) = post(base, json!({"prompt": "a"})).await;
    assert_eq!(status, 404, "no api-version");
    let with = format!("{base}?api-version=2025-04-01-preview");
    let (status, body) = post(&with, json!({"prompt": "a fox", "output_format": "webp"})).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = post(&with, json!({"prompt": "a fox"})).await;
    assert_eq!(status, 200, "{body}");
    assert!(body["data"][0]["b64_json"].is_string());
    let (status, body) = post(
        "/openai/v1/images/generations",
        json!({"prompt": "a fox", "model": "unknown"}),
    )
    .await;
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (404, Some("DeploymentNotFound"))
    );
    assert_eq!(server.api.billed_for("a fox"), 1);
}

//! Injected faults, refused requests and broken connections, as a client sees them: the error the
//! provider would send, and what was billed.

use super::*;

#[tokio::test]
async fn rate_limit_rule_applies_times_then_succeeds() {
    let server = FakeApi::new(FakeOptions::default()).start().await.unwrap();
    let fault = Fault::RateLimited {
        retry_after_secs: Some(1.5),
        retry_after_ms: Some(1500.0),
    };
    server.api.push_rule(rule(Some("busy"), fault, Some(2)));
    let ok = generate(&server, json!({"prompt": "calm"})).await;
    assert_eq!(ok.status(), 200, "rule only matches its prompt");
    for _ in 0..2 {
        let resp = generate(&server, json!({"prompt": "busy day"})).await;
        assert_eq!(resp.status(), 429);
        assert_eq!(header(&resp, "retry-after"), "2");
        assert_eq!(header(&resp, "retry-after-ms"), "1500");
        assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), "0");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["type"], "requests");
        assert_eq!(body["error"]["code"], "rate_limit_exceeded");
        assert_eq!(body["error"]["param"], Value::Null);
    }
    assert_eq!(status_of(&server, json!({"prompt": "busy day"})).await, 200);
    let stats = server.api.stats();
    assert_eq!((stats.requests, stats.billed), (4, 2));
    assert_eq!(stats.errors_by_status, BTreeMap::from([(429, 2)]));
    assert_eq!(
        (server.api.calls_for("busy"), server.api.billed_for("busy")),
        (3, 1)
    );
}

#[tokio::test]
async fn fault_bodies_match_the_provider() {
    let server = FakeApi::new(FakeOptions::default()).start().await.unwrap();
    let cases = [
        (
            Fault::QuotaExhausted,
            429,
            "insufficient_quota",
            Some("insufficient_quota"),
        ),
        (
            Fault::Moderation,
            400,
            "image_generation_user_error",
            Some("moderation_blocked"),
        ),
        (
            Fault::ContentPolicy,
            400,
            "invalid_request_error",
            Some("content_policy_violation"),
        ),
        (
            Fault::ModelNotFound,
            404,
            "invalid_request_error",
            Some("model_not_found"),
        ),
        (
            Fault::Unauthorized,
            401,
            "invalid_request_error",
            Some("invalid_api_key"),
        ),
        (Fault::Forbidden, 403, "invalid_request_error", None),
        (
            Fault::ServerError { status: 503 },
            503,
            "server_error",
            Some("server_is_overloaded"),
        ),
        (
            Fault::ServerError { status: 502 },
            502,
            "server_error",
            Some("server_error"),
        ),
    ];
    for (fault, status, kind, code) in cases {
        server.api.push_rule(rule(None, fault.clone(), Some(1)));
        let resp = generate(&server, json!({"model": "gpt-image-2", "prompt": "p"})).await;
        assert_eq!(resp.status(), status, "{fault:?}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"]["type"], kind, "{fault:?}");
        assert_eq!(body["error"]["code"], json!(code), "{fault:?}");
        if let Fault::QuotaExhausted = fault {
            let message = body["error"]["message"].as_str().unwrap();
            assert!(message.starts_with("You exceeded your current quota"));
        }
        if let Fault::Moderation = fault {
            assert_eq!(
                body["error"]["moderation_details"]["categories"][0],
                "violence"
            );
        }
    }
    assert_eq!(server.api.stats().billed, 0);
}

#[tokio::test]
async fn auth_is_checked_first() {
    let server = serve(FakeOptions {
        api_key: Some("sk-right-key-1234".into()),
        ..FakeOptions::default()
    })
    .await;
    let url = format!("{}/images/generations", server.base_url());
    let resp = client()
        .post(&url)
        .json(&json!({"prompt": "p"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    assert!(header(&resp, "x-request-id").starts_with("req_"));
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["code"], "invalid_api_key");
    assert_eq!(body["error"]["type"], "invalid_request_error");
    assert_eq!(body["error"]["param"], Value::Null);

    let wrong = client()
        .post(&url)
        .bearer_auth("sk-wrong-key-9999")
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    let body: Value = wrong.json().await.unwrap();
    assert!(
        !body["error"]["message"].as_str().unwrap().contains("wrong"),
        "key is masked"
    );

    let right = client()
        .post(&url)
        .bearer_auth("sk-right-key-1234")
        .json(&json!({"prompt": "p"}));
    assert_eq!(right.send().await.unwrap().status(), 200);
    let stats = server.api.stats();
    assert_eq!((stats.requests, stats.billed), (3, 1));
    assert_eq!(stats.errors_by_status, BTreeMap::from([(401, 2)]));
}

#[tokio::test]
async fn invalid_requests_are_rejected_like_the_api() {
    let server = FakeApi::new(FakeOptions::default()).start().await.unwrap();
    let cases = [
        (json!({"n": 1}), "prompt", "missing_required_parameter"),
        (json!({"prompt": ""}), "prompt", "empty_string"),
        (json!({"prompt": 7}), "prompt", "invalid_type"),
        (
            json!({"prompt": "p", "n": 0}),
            "n",
            "integer_below_min_value",
        ),
        (
            json!({"prompt": "p", "n": 11}),
            "n",
            "integer_above_max_value",
        ),
        (json!({"prompt": "p", "n": "2"}), "n", "invalid_type"),
        (json!({"prompt": "p", "model": 3}), "model", "invalid_type"),
        (
            json!({"prompt": "p", "model": "gpt-image-2", "response_format": "b64_json"}),
            "response_format",
            "unknown_parameter",
        ),
    ];
    for (body, param, code) in cases {
        let resp = generate(&server, body.clone()).await;
        assert_eq!(resp.status(), 400, "{body}");
        let err: Value = resp.json().await.unwrap();
        assert_eq!(err["error"]["type"], "invalid_request_error", "{body}");
        assert_eq!(err["error"]["param"], param, "{body}");
        assert_eq!(err["error"]["code"], code, "{body}");
    }
    let resp = client()
        .post(format!("{}/images/generations", server.base_url()))
        .bearer_auth("k")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(
        server.api.stats().errors_by_status,
        BTreeMap::from([(400, 9)])
    );
    assert_eq!(
        status_of(
            &server,
            json!({"prompt": "p", "model": "dall-e-3", "response_format": "b64_json"})
        )
        .await,
        200
    );
}

#[tokio::test]
async fn reset_drops_the_connection_without_a_response() {
    let server = FakeApi::new(FakeOptions::default()).start().await.unwrap();
    server
        .api
        .push_rule(rule(Some("doomed"), Fault::Reset, Some(1)));
    let err = client()
        .post(format!("{}/images/generations", server.base_url()))
        .bearer_auth("k")
        .json(&json!({"prompt": "doomed"}))
        .send()
        .await
        .expect_err("no response");
    assert!(err.status().is_none(), "{err:?}");
    assert_eq!(
        io_error_kind(&err),
        Some(std::io::ErrorKind::ConnectionReset)
    );
    assert_eq!(status_of(&server, json!({"prompt": "doomed"})).await, 200);
    let stats = server.api.stats();
    assert_eq!((stats.requests, stats.billed), (2, 1));
    assert!(stats.errors_by_status.is_empty());
}

#[tokio::test]
async fn reset_without_serve_breaks_the_response() {
    let api = FakeApi::new(FakeOptions::default());
    api.push_rule(rule(None, Fault::Reset, None));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(axum::serve(listener, api.router()).into_future());
    let result = client()
        .post(format!("http://{addr}/v1/images/generations"))
        .bearer_auth("k")
        .json(&json!({"prompt": "p"}))
        .send()
        .await;
    let err = result.expect_err("no response");
    assert!(err.status().is_none(), "{err:?}");
    task.abort();
}

#[tokio::test]
async fn hang_outlives_a_client_timeout_and_is_still_billed() {
    let server = FakeApi::new(FakeOptions::default()).start().await.unwrap();
    server
        .api
        .push_rule(rule(None, Fault::Hang { secs: 0.4 }, Some(1)));
    let err = client()
        .post(format!("{}/images/generations", server.base_url()))
        .bearer_auth("k")
        .timeout(Duration::from_millis(100))
        .json(&json!({"prompt": "slow"}))
        .send()
        .await
        .expect_err("client gives up");
    assert!(err.is_timeout(), "{err:?}");
    assert_eq!(server.api.billed_for("slow"), 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.api.billed_for("slow") == 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        server.api.billed_for("slow"),
        1,
        "finished and billed anyway"
    );
}

//! The `/_fake/` endpoints, as another process drives the fake through them.

use super::*;

#[tokio::test]
async fn admin_endpoints_drive_the_fake() {
    let server = serve(FakeOptions::default()).await;
    let admin = |path: &str| format!("http://{}/_fake/{path}", server.addr);
    let http = client();
    let r = rule(None, Fault::ServerError { status: 500 }, None);
    let resp = http.post(admin("rules")).json(&r).send().await.unwrap();
    assert_eq!(resp.status(), 204);
    assert_eq!(status_of(&server, json!({"prompt": "x"})).await, 500);
    assert_eq!(status_of(&server, json!({"prompt": "x"})).await, 500);
    assert_eq!(
        http.delete(admin("rules")).send().await.unwrap().status(),
        204
    );
    let resp = http
        .post(admin("latency"))
        .json(&json!({"ms": 150}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let started = Instant::now();
    assert_eq!(status_of(&server, json!({"prompt": "x"})).await, 200);
    assert!(started.elapsed() >= Duration::from_millis(150));

    let stats: Stats = admin_json(&server, "stats").await;
    assert_eq!((stats.requests, stats.billed, stats.images), (3, 1, 1));
    assert_eq!(stats.errors_by_status, BTreeMap::from([(500, 2)]));
    let calls: Value = admin_json(&server, "calls?prompt_contains=x").await;
    assert_eq!(calls, json!({"calls": 3, "billed": 1}));

    let missing = http
        .post(format!("{}/images/variations", server.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), 404);
}

#[test]
fn rules_are_serde_tagged() {
    let r: Rule = serde_json::from_value(json!({
        "prompt_contains": null,
        "fault": {"kind": "rate_limited", "retry_after_secs": 2.0, "retry_after_ms": null},
        "times": 3
    }))
    .unwrap();
    assert!(matches!(
        r.fault,
        Fault::RateLimited {
            retry_after_secs: Some(_),
            retry_after_ms: None
        }
    ));
    let hang = serde_json::to_value(Fault::Hang { secs: 1.0 }).unwrap();
    assert_eq!(hang, json!({"kind": "hang", "secs": 1.0}));
}

#[tokio::test]
async fn stats_say_when_the_first_call_arrived() {
    let server = serve(FakeOptions::default()).await;
    assert_eq!(server.api.stats().first_call_unix_ms, None);
    let unix_ms = || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64
    };
    let before = unix_ms();
    assert_eq!(status_of(&server, json!({"prompt": "first"})).await, 200);
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(status_of(&server, json!({"prompt": "second"})).await, 200);
    let after = unix_ms();
    let first = server.api.stats().first_call_unix_ms.unwrap();
    assert!(
        (before.saturating_sub(1)..after.saturating_sub(40)).contains(&first),
        "{before} <= {first}, well before the second call (by {after})"
    );
}

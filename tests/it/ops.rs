//! The worker's HTTP listener: health, readiness (paused or not) and Prometheus metrics, scraped
//! from a running worker process while it works and while it is paused.

use std::time::{Duration, Instant};

use imagegen_fakes::openai::{Fault, Rule};
use serde_json::{Value, json};

use crate::helpers::{Store, TestEnv, stop_cleanly};

/// The value of the first sample of `name` whose labels include every one of `labels`.
fn sample(text: &str, name: &str, labels: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .find(|l| labels.iter().all(|want| l.contains(want)))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
}

async fn get(url: &str) -> (u16, String) {
    match reqwest::get(url).await {
        Ok(r) => (r.status().as_u16(), r.text().await.unwrap_or_default()),
        Err(_) => (0, String::new()),
    }
}

/// Polls `url` until `check` holds on its (status, body); panics after 30 s.
async fn until(url: &str, what: &str, check: impl Fn(u16, &str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get(url).await;
        if check(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: last answer {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn health_readiness_and_metrics_follow_the_work_and_the_pause() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let base = format!("http://{listen}");
    let env = TestEnv::with(Store::Fs, &[("http.listen", listen.clone())]).await;
    let data = tempfile::tempdir().unwrap();
    let worker = env.spawn_worker(
        data.path(),
        &[
            ("IMAGEGEN__WORKER__PAUSE_PROBE_SECS", "1"),
            ("IMAGEGEN__WORKER__CONCURRENCY", "4"),
        ],
    );
    until(&format!("{base}/healthz"), "healthz", |s, b| {
        s == 200 && b.trim() == "ok"
    })
    .await;
    let ready = until(&format!("{base}/readyz"), "ready", |s, _| s == 200).await;
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(
        ready,
        json!({"ready": true, "broker_connected": true, "paused": false, "pause_reason": null})
    );
    let metrics = until(&format!("{base}/metrics"), "metrics", |s, _| s == 200).await;
    assert_eq!(
        sample(&metrics, "imagegen_provider_concurrency_limit", &[]),
        Some(4.0)
    );
    assert_eq!(
        sample(&metrics, "imagegen_paused", &["quota_exhausted"]),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, "imagegen_jobs_total", &[]),
        None,
        "no job yet"
    );
    assert_eq!(
        sample(&metrics, "imagegen_answer_memory_limit_bytes", &[]),
        Some(48.0 * 1024.0 * 1024.0)
    );
    assert_eq!(
        sample(&metrics, "imagegen_answer_memory_bytes", &[]),
        Some(0.0)
    );

    let mut listener = env.listen().await;
    for i in 0..3 {
        env.publish(json!({"id": format!("m{i}"), "prompt": format!("metered job {i}")}))
            .await;
    }
    env.events(&mut listener, 3, Duration::from_secs(30)).await;
    let metrics = until(&format!("{base}/metrics"), "jobs counted", |_, b| {
        sample(b, "imagegen_jobs_total", &["outcome=\"succeeded\""]) == Some(3.0)
    })
    .await;
    assert_eq!(
        sample(
            &metrics,
            "imagegen_provider_requests_total",
            &["status=\"200\""]
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(
            &metrics,
            "imagegen_provider_request_duration_seconds_count",
            &[]
        ),
        Some(3.0)
    );
    assert_eq!(
        sample(&metrics, "imagegen_images_generated_total", &[]),
        Some(3.0)
    );
    assert!(sample(&metrics, "imagegen_uploaded_bytes_total", &[]).unwrap() > 3.0 * 100.0);
    let cost = sample(&metrics, "imagegen_cost_usd_total", &[]).unwrap();
    assert!(
        (cost - 3.0 * (3.0 * 5.0 + 1056.0 * 30.0) / 1e6).abs() < 1e-6,
        "{cost}"
    );
    assert!(metrics.contains("# TYPE imagegen_provider_request_duration_seconds histogram"));
    assert_eq!(sample(&metrics, "imagegen_jobs_in_flight", &[]), Some(0.0));

    // Out of quota: paused, and still ready (a paused fleet can be rolled and drained).
    env.fake().push_rule(Rule {
        prompt_contains: None,
        fault: Fault::QuotaExhausted,
        times: None,
    });
    env.publish(json!({"id": "blocked", "prompt": "a job during the outage"}))
        .await;
    let ready = until(&format!("{base}/readyz"), "paused", |s, b| {
        s == 200 && b.contains("\"paused\":true")
    })
    .await;
    let ready: Value = serde_json::from_str(&ready).unwrap();
    assert_eq!(ready["pause_reason"], "quota_exhausted");
    assert_eq!(ready["ready"], true);
    let metrics = get(&format!("{base}/metrics")).await.1;
    assert_eq!(
        sample(&metrics, "imagegen_paused", &["quota_exhausted"]),
        Some(1.0)
    );
    assert!(
        sample(
            &metrics,
            "imagegen_provider_requests_total",
            &["status=\"429\""]
        )
        .unwrap()
            >= 1.0
    );

    // Quota back: the probe gets through and the worker resumes by itself.
    env.fake().clear_rules();
    env.events(&mut listener, 1, Duration::from_secs(30)).await;
    until(&format!("{base}/readyz"), "resumed", |s, b| {
        s == 200 && b.contains("\"paused\":false")
    })
    .await;
    let metrics = get(&format!("{base}/metrics")).await.1;
    assert_eq!(
        sample(&metrics, "imagegen_paused", &["quota_exhausted"]),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, "imagegen_jobs_total", &["outcome=\"succeeded\""]),
        Some(4.0)
    );
    stop_cleanly([worker]).await;
    env.cleanup().await;
}

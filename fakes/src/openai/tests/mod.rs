//! The fake seen from a client: each behaviour through real HTTP requests, as the worker and the
//! benchmark see it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use base64_simd::STANDARD as BASE64;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use super::*;

mod admin;
mod batch;
mod batch_client;
mod batch_faults;
mod batch_more;
mod faults;

fn client() -> reqwest::Client {
    // Built with the workspace's features, the client wants a process-wide crypto provider even
    // for plain HTTP.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::new()
}

/// A fake with these options, serving on loopback.
async fn serve(opts: FakeOptions) -> FakeServer {
    FakeApi::new(opts).start().await.unwrap()
}

/// Options with images of about this many bytes.
/// What `GET /_fake/{path}` answers, as another process reads it.
async fn admin_json<T: serde::de::DeserializeOwned>(server: &FakeServer, path: &str) -> T {
    client()
        .get(format!("http://{}/_fake/{path}", server.addr))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

fn sized(image_bytes: usize) -> FakeOptions {
    FakeOptions {
        image_bytes,
        ..FakeOptions::default()
    }
}

/// The status of one generation request.
async fn status_of(server: &FakeServer, body: Value) -> u16 {
    generate(server, body).await.status().as_u16()
}

async fn generate(server: &FakeServer, body: Value) -> reqwest::Response {
    client()
        .post(format!("{}/images/generations", server.base_url()))
        .bearer_auth("sk-test")
        .json(&body)
        .send()
        .await
        .expect("request reaches the fake")
}

fn rule(prompt: Option<&str>, fault: Fault, times: Option<u32>) -> Rule {
    Rule {
        prompt_contains: prompt.map(str::to_owned),
        fault,
        times,
    }
}

fn header<'a>(resp: &'a reqwest::Response, name: &str) -> &'a str {
    resp.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

fn io_error_kind(err: &(dyn std::error::Error + 'static)) -> Option<std::io::ErrorKind> {
    let mut cause = Some(err);
    while let Some(e) = cause {
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            return Some(io.kind());
        }
        cause = e.source();
    }
    None
}

fn decode_png(bytes: &[u8]) -> (u32, u32) {
    let decoder = ::png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("valid PNG header");
    let mut buf = vec![0; reader.output_buffer_size()];
    let info = reader.next_frame(&mut buf).expect("valid PNG data");
    (info.width, info.height)
}

/// Reads a Go duration as the rate-limit headers carry it (`120ms`, `1.5s`, `6m0s`), written apart
/// from the code that prints them.
fn go_duration(s: &str) -> Duration {
    let mut total = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or_else(|| panic!("no unit in {s:?}"));
        let value: f64 = rest[..digits].parse().expect("a number");
        rest = &rest[digits..];
        let unit = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        total += value
            * match &rest[..unit] {
                "h" => 3600.0,
                "m" => 60.0,
                "s" => 1.0,
                "ms" => 0.001,
                other => panic!("unit {other:?} in {s:?}"),
            };
        rest = &rest[unit..];
    }
    Duration::from_secs_f64(total)
}

#[test]
fn go_durations_are_read() {
    assert_eq!(go_duration("120ms"), Duration::from_millis(120));
    assert_eq!(go_duration("1.5s"), Duration::from_millis(1500));
    assert_eq!(go_duration("6m0s"), Duration::from_secs(360));
    assert_eq!(go_duration("1h2m3s"), Duration::from_secs(3723));
}

#[tokio::test]
async fn success_returns_n_distinct_valid_pngs() {
    let server = serve(sized(20_000)).await;
    let body = json!({"model": "gpt-image-2", "prompt": "a red fox in snow", "n": 3, "quality": "low", "extra": 1});
    let resp = generate(&server, body.clone()).await;
    assert_eq!(resp.status(), 200);
    assert!(header(&resp, "x-request-id").starts_with("req_"));
    assert_eq!(header(&resp, "x-ratelimit-limit-requests"), "1000000");
    assert!(!header(&resp, "x-ratelimit-reset-tokens").is_empty());
    assert!(!header(&resp, "openai-processing-ms").is_empty());
    let json: Value = resp.json().await.unwrap();
    assert_eq!(json["output_format"], "png");
    assert_eq!(json["size"], "1024x1024");
    assert_eq!(json["quality"], "low");
    assert_eq!(json["background"], "opaque");
    assert_eq!(json["usage"]["input_tokens"], 5);
    assert_eq!(json["usage"]["output_tokens"], 3 * 272);
    assert_eq!(json["usage"]["total_tokens"], 5 + 3 * 272);

    let again: Value = generate(&server, body).await.json().await.unwrap();
    let mut images = Vec::new();
    for item in json["data"]
        .as_array()
        .unwrap()
        .iter()
        .chain(again["data"].as_array().unwrap())
    {
        let png = BASE64
            .decode_to_vec(item["b64_json"].as_str().unwrap())
            .unwrap();
        assert_eq!(decode_png(&png), (64, 64));
        assert!((18_000..22_000).contains(&png.len()), "size {}", png.len());
        images.push(png);
    }
    assert_eq!(images.len(), 6);
    images.sort();
    images.dedup();
    assert_eq!(images.len(), 6, "every image differs");

    let stats = server.api.stats();
    assert_eq!((stats.requests, stats.billed, stats.images), (2, 2, 6));
    assert!(stats.errors_by_status.is_empty());
    assert_eq!(server.api.calls_for("red fox"), 2);
    assert_eq!(server.api.billed_for("fox"), 2);
    assert_eq!(server.api.billed_for("wolf"), 0);
}

#[tokio::test]
async fn url_answers_serve_their_images_until_they_expire() {
    let server = serve(sized(5_000)).await;
    let body = json!({"model": "dall-e-2", "prompt": "a kite", "n": 2, "response_format": "url"});
    let json: Value = generate(&server, body).await.json().await.unwrap();
    let urls: Vec<&str> = json["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert!(d.get("b64_json").is_none());
            d["url"].as_str().unwrap()
        })
        .collect();
    assert_eq!(urls.len(), 2);
    let first = urls[0].to_string();
    for url in &urls {
        assert!(url.starts_with(&format!("http://{}/_fake/files/", server.addr)));
        // Pre-signed: no API key needed.
        let resp = client().get(*url).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "content-type"), "image/png");
        assert_eq!(decode_png(&resp.bytes().await.unwrap()), (64, 64));
    }
    assert_eq!(server.api.stats().files_served, 2);

    server.api.fail_file_downloads(1);
    assert_eq!(client().get(&first).send().await.unwrap().status(), 503);
    assert_eq!(client().get(&first).send().await.unwrap().status(), 200);

    // Only the last FILES_KEPT images stay downloadable.
    for _ in 0..=FILES_KEPT / 10 {
        let body =
            json!({"model": "dall-e-2", "prompt": "a kite", "n": 10, "response_format": "url"});
        assert_eq!(generate(&server, body).await.status(), 200);
    }
    assert_eq!(client().get(&first).send().await.unwrap().status(), 404);

    let bad = json!({"model": "dall-e-2", "prompt": "a kite", "response_format": "gif"});
    let resp = generate(&server, bad).await;
    assert_eq!(resp.status(), 400);
    let error: Value = resp.json().await.unwrap();
    assert_eq!(error["error"]["param"], "response_format");
}

#[tokio::test]
async fn account_rate_limits_are_token_buckets_with_honest_headers() {
    let server = serve(FakeOptions {
        requests_per_minute: Some(3),
        ..FakeOptions::default()
    })
    .await;
    for left in ["2", "1", "0"] {
        let resp = generate(&server, json!({"prompt": "a fox"})).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(header(&resp, "x-ratelimit-limit-requests"), "3");
        assert_eq!(header(&resp, "x-ratelimit-remaining-requests"), left);
    }
    let refused = generate(&server, json!({"prompt": "a fox"})).await;
    assert_eq!(refused.status(), 429);
    assert_eq!(header(&refused, "x-ratelimit-remaining-requests"), "0");
    // One request comes back every 20 s; the bucket is full again in about a minute.
    let wait_ms: f64 = header(&refused, "retry-after-ms").parse().unwrap();
    assert!((19_000.0..=20_000.0).contains(&wait_ms), "{wait_ms}");
    assert_eq!(header(&refused, "retry-after"), "20");
    let reset = go_duration(header(&refused, "x-ratelimit-reset-requests"));
    assert!(
        reset > Duration::from_secs(59) && reset <= Duration::from_secs(60),
        "{reset:?}"
    );
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "rate_limit_exceeded");
    assert_eq!(body["error"]["type"], "requests");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("requests per min (RPM): Limit 3"),
        "{body}"
    );
    let stats = server.api.stats();
    assert_eq!((stats.requests, stats.billed), (4, 3));
    // Tokens: a request for 2 medium images costs 2 x 1056 + 2 tokens.
    server.api.set_limits(None, Some(3000));
    let resp = generate(&server, json!({"prompt": "a fox", "n": 2})).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "x-ratelimit-remaining-tokens"), "886");
    let resp = generate(&server, json!({"prompt": "a fox", "n": 2})).await;
    assert_eq!(resp.status(), 429);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"]["type"], "tokens");
}

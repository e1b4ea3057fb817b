//! The API key goes to the provider's own host alone, and images answered by URL come only from
//! where the fetch rules allow: checked against local servers that count who reaches them.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use futures_util::future::BoxFuture;

use super::*;
use crate::provider::Journal;

/// A server that counts requests, and whether any carried a credential.
struct Counter {
    hits: Arc<AtomicU32>,
    with_key: Arc<AtomicU32>,
    addr: std::net::SocketAddr,
}

async fn counter() -> Counter {
    let hits = Arc::new(AtomicU32::new(0));
    let with_key = Arc::new(AtomicU32::new(0));
    let (h, k) = (hits.clone(), with_key.clone());
    let app = Router::new().fallback(move |headers: HeaderMap| {
        h.fetch_add(1, Ordering::SeqCst);
        if headers.contains_key("api-key") || headers.contains_key(header::AUTHORIZATION) {
            k.fetch_add(1, Ordering::SeqCst);
        }
        async { (StatusCode::OK, "{}") }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    Counter {
        hits,
        with_key,
        addr,
    }
}

/// A provider host that answers every request with `status`, `location` and `body`.
async fn provider_host(status: StatusCode, location: Option<String>, body: String) -> String {
    let app = Router::new().fallback(move || {
        let location = location.clone();
        let body = body.clone();
        async move {
            let mut headers = HeaderMap::new();
            if let Some(l) = location {
                headers.insert(header::LOCATION, l.parse().unwrap());
            }
            headers.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
            (status, headers, body)
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/v1")
}

pub(super) struct NoJournal;

impl Journal for NoJournal {
    fn record<'a>(
        &'a self,
        _: &'a crate::provider::Handle,
        _: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async { Ok(()) })
    }
}

/// The settings of a provider of kind openai at `base_url`, its key sent as `api-key`, with
/// `extra` settings of its own.
pub(super) fn settings(base_url: &str, extra: &[(&str, &str)]) -> OpenAiSettings {
    let mut overrides = vec![
        ("providers.openai.kind".to_string(), "openai".to_string()),
        ("providers.openai.api_key".into(), "sk-secret".into()),
        ("providers.openai.auth".into(), "api-key".into()),
        ("providers.openai.base_url".into(), base_url.into()),
    ];
    overrides.extend(
        extra
            .iter()
            .map(|(k, v)| (format!("providers.openai.{k}"), v.to_string())),
    );
    let overrides: Vec<(&str, String)> = overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let settings = crate::config::Settings::load_with_overrides(
        &crate::config::Sources::default(),
        &overrides,
    )
    .unwrap();
    let crate::config::KindSettings::Openai(openai) = &settings.default_provider().kind else {
        panic!("kind openai")
    };
    openai.clone()
}

fn provider(base_url: &str) -> OpenAi {
    OpenAi::new(&settings(base_url, &[]), BufferPool::unbounded()).unwrap()
}

pub(super) fn request() -> ImageRequest {
    ImageRequest {
        model: "gpt-image-2".into(),
        prompt: "p".into(),
        negative_prompt: None,
        size: Size::parse("1024x1024"),
        count: 1,
        output_format: None,
        quality: None,
        background: None,
        seed: None,
        reference_count: 0,
        masked: false,
        refs: Default::default(),
        params: Map::new(),
    }
}

#[tokio::test]
async fn the_api_key_never_follows_a_redirect() {
    let elsewhere = counter().await;
    let base = provider_host(
        StatusCode::TEMPORARY_REDIRECT,
        Some(format!("http://{}/steal", elsewhere.addr)),
        String::new(),
    )
    .await;
    let answer = provider(&base).submit(&request(), &NoJournal).await;
    assert!(answer.is_err(), "a redirect is not an answer");
    assert_eq!(elsewhere.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn images_answered_by_url_come_only_from_allowed_hosts() {
    let elsewhere = counter().await;
    // Plain http to a host that is not the provider's: refused before any connection.
    let base = provider_host(
        StatusCode::OK,
        None,
        format!(
            r#"{{"data":[{{"url":"http://{}/image.png"}}]}}"#,
            elsewhere.addr
        ),
    )
    .await;
    let failure = provider(&base)
        .submit(&request(), &NoJournal)
        .await
        .expect_err("refused");
    assert!(failure.possibly_billed(), "{failure:?}");
    assert!(failure.message().contains("refused"), "{failure:?}");
    // An address that is not public, even over https.
    let base = provider_host(
        StatusCode::OK,
        None,
        r#"{"data":[{"url":"https://169.254.169.254/latest/meta-data"}]}"#.into(),
    )
    .await;
    let failure = provider(&base)
        .submit(&request(), &NoJournal)
        .await
        .expect_err("refused");
    assert!(failure.message().contains("public"), "{failure:?}");
    assert_eq!(elsewhere.hits.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_download_redirected_off_the_allowed_hosts_is_refused() {
    let elsewhere = counter().await;
    // The provider's own host (allowed) answers the image's URL with a redirect elsewhere.
    let redirecting = provider_host(
        StatusCode::FOUND,
        Some(format!("http://{}/image.png", elsewhere.addr)),
        String::new(),
    )
    .await;
    let file_url = redirecting.replace("/v1", "/file.png");
    let base = provider_host(
        StatusCode::OK,
        None,
        format!(r#"{{"data":[{{"url":"{file_url}"}}]}}"#),
    )
    .await;
    let file_host = file_url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let mut openai = settings(&base, &[]);
    openai.download_hosts = vec![file_host];
    let failure = OpenAi::new(&openai, BufferPool::unbounded())
        .unwrap()
        .submit(&request(), &NoJournal)
        .await
        .expect_err("refused");
    assert!(failure.message().contains("redirect"), "{failure:?}");
    assert_eq!(elsewhere.hits.load(Ordering::SeqCst), 0);
    assert_eq!(elsewhere.with_key.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn an_answer_or_a_download_over_the_size_cap_is_cut_off_as_billed() {
    let big = "x".repeat(8 * 1024);
    let limited = |base: &str| {
        OpenAi::new(
            &settings(base, &[("max_response_bytes", "4096")]),
            BufferPool::unbounded(),
        )
        .unwrap()
    };
    // The answer itself.
    let base = provider_host(
        StatusCode::OK,
        None,
        format!(r#"{{"data":[],"x":"{big}"}}"#),
    )
    .await;
    let failure = limited(&base)
        .submit(&request(), &NoJournal)
        .await
        .expect_err("too big");
    assert!(failure.possibly_billed(), "{failure:?}");
    assert!(
        failure.message().contains("max_response_bytes"),
        "{failure:?}"
    );
    // An image answered by URL, from the provider's own host.
    let file = provider_host(StatusCode::OK, None, big).await;
    let file_url = file.replace("/v1", "/image.png");
    let base = provider_host(
        StatusCode::OK,
        None,
        format!(r#"{{"data":[{{"url":"{file_url}"}}]}}"#),
    )
    .await;
    let mut provider = limited(&base);
    provider.downloads.rules = FetchRules::exempting([file.as_str()]);
    let failure = provider
        .submit(&request(), &NoJournal)
        .await
        .expect_err("too big");
    assert!(
        failure.message().contains("max_response_bytes"),
        "{failure:?}"
    );
}

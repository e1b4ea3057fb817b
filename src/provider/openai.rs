//! The OpenAI Images API (`POST {base_url}/images/generations`) and compatible hosts (Azure
//! OpenAI's v1 surface, Together, DeepInfra, ...).
//!
//! Response types are tolerant: every field is optional and open, because a parse failure after
//! a 200 would throw away an image that was already paid for.

use std::borrow::Cow;
use std::ops::Range;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{GeneratedImage, Generation, ImageProvider, ImageRequest, Journal, sniff};
use crate::buffers::{BufferPool, PooledBuf};
use crate::config::{AuthScheme, ProviderSettings};
use crate::error::{ApiErrorBody, Failure, classify_http};
use crate::throttle::RateLimits;

/// Retries of one image download (the image is paid for: retrying the call would buy it again).
const DOWNLOAD_RETRIES: usize = 3;

/// Error bodies are small; never read more than this of one.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub struct OpenAi {
    client: reqwest::Client,
    /// For images answered by URL: no API key (the URLs are pre-signed, maybe on another host).
    /// Made on first use: most models answer with base64.
    downloads: tokio::sync::OnceCell<reqwest::Client>,
    connect_timeout: Duration,
    request_timeout: Duration,
    endpoint: String,
    response_format: Option<String>,
    max_response_bytes: usize,
    /// Answers are read into these, decoded in place and uploaded from there.
    buffers: BufferPool,
}

impl OpenAi {
    /// `buffers`: how many answer buffers are kept for reuse (the worker's concurrency).
    pub fn new(settings: &ProviderSettings, buffers: usize) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let mut headers = HeaderMap::new();
        let key = settings.api_key.expose_secret();
        let (name, value) = match settings.auth {
            AuthScheme::Bearer => ("authorization", format!("Bearer {key}")),
            AuthScheme::ApiKey => ("api-key", key.to_string()),
        };
        let mut value = HeaderValue::from_str(&value).map_err(|_| {
            anyhow::anyhow!("provider.api_key contains characters not allowed in an HTTP header")
        })?;
        value.set_sensitive(true);
        headers.insert(name, value);
        let client = reqwest::Client::builder()
            .user_agent(concat!("imagegen/", env!("CARGO_PKG_VERSION")))
            .default_headers(headers)
            .connect_timeout(Duration::from_secs(settings.connect_timeout_secs))
            .timeout(Duration::from_secs(settings.request_timeout_secs))
            .pool_idle_timeout(Duration::from_secs(90))
            .build()?;
        Ok(Self {
            client,
            downloads: tokio::sync::OnceCell::new(),
            connect_timeout: Duration::from_secs(settings.connect_timeout_secs),
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
            endpoint: format!(
                "{}/images/generations",
                settings.base_url.trim_end_matches('/')
            ),
            response_format: Some(settings.response_format.clone()).filter(|f| !f.is_empty()),
            max_response_bytes: settings.max_response_bytes,
            buffers: BufferPool::new(buffers),
        })
    }

    fn body(&self, request: ImageRequest<'_>) -> Value {
        let job = request.job;
        let mut body: Map<String, Value> = job.params.clone();
        body.insert("model".into(), job.model.clone().into());
        body.insert("prompt".into(), job.prompt.clone().into());
        body.insert("n".into(), request.n().into());
        body.insert("size".into(), job.size.clone().into());
        body.insert("quality".into(), job.quality.clone().into());
        body.insert("output_format".into(), job.output_format.clone().into());
        if let Some(background) = &job.background {
            body.insert("background".into(), background.clone().into());
        }
        if let Some(format) = &self.response_format {
            body.insert("response_format".into(), format.clone().into());
        }
        Value::Object(body)
    }

    async fn call(&self, request: ImageRequest<'_>) -> Result<Generation, Failure> {
        let response = self
            .client
            .post(&self.endpoint)
            .json(&self.body(request))
            .send()
            .await
            .map_err(transport_failure)?;
        let status = response.status().as_u16();
        let request_id = header_str(response.headers(), "x-request-id");
        let rate_limits = RateLimits::from_headers(response.headers());
        if !(200..300).contains(&status) {
            let after = retry_after(response.headers());
            let should_retry =
                header_str(response.headers(), "x-should-retry").map(|v| v == "true");
            let mut body = Vec::new();
            let _ = read_limited(response, MAX_ERROR_BODY, &mut body).await;
            let mut failure = classify_http(
                status,
                &ApiErrorBody::parse(&body),
                after,
                should_retry,
                request_id,
            );
            failure.detail_mut().rate_limits = rate_limits;
            return Err(failure);
        }
        let expected = response.content_length().unwrap_or(0) as usize;
        let mut body = self.buffers.take(expected.min(self.max_response_bytes));
        read_limited(response, self.max_response_bytes, &mut body)
            .await
            .map_err(|f| with_request_id(f, &request_id))?;
        let answer = decode_answer(body).map_err(|f| with_request_id(f, &request_id))?;
        let declared = answer
            .output_format
            .unwrap_or_else(|| request.job.output_format.clone());
        let usage = answer.usage;
        let mut images = Vec::with_capacity(answer.images.len());
        for (data, revised_prompt) in answer.images {
            let data = match data {
                ImageBytes::Decoded(data) => data,
                ImageBytes::Url(url) => self.download(&url).await?,
            };
            let (content_type, extension) = sniff(&data, &declared);
            images.push(GeneratedImage {
                data,
                content_type,
                extension,
                revised_prompt,
            });
        }
        Ok(Generation {
            images,
            usage,
            model: Some(request.job.model.clone()),
            request_id,
            rate_limits,
        })
    }

    /// Fetches an image given by URL (DALL-E style `url` responses, valid for an hour). The
    /// image is paid for already: a transport error, a 429 or a 5xx is retried here, a few
    /// times, rather than by buying the image again.
    async fn download(&self, url: &str) -> Result<Bytes, Failure> {
        let client = self
            .downloads
            .get_or_try_init(|| async {
                reqwest::Client::builder()
                    .user_agent(concat!("imagegen/", env!("CARGO_PKG_VERSION")))
                    .connect_timeout(self.connect_timeout)
                    .timeout(self.request_timeout)
                    .build()
            })
            .await
            .map_err(|e| billed_failure(format!("no HTTP client for the image download: {e}")))?;
        let fetch = || async {
            let response = client
                .get(url)
                .send()
                .await
                .map_err(|e| (true, format!("downloading the generated image failed: {e}")))?;
            let status = response.status();
            if !status.is_success() {
                let transient = status.is_server_error() || status.as_u16() == 429;
                return Err((
                    transient,
                    format!("downloading the generated image failed with HTTP {status}"),
                ));
            }
            // Too large is final; a connection lost mid-body is worth another try.
            let too_large = response
                .content_length()
                .is_some_and(|n| n > self.max_response_bytes as u64);
            let mut body = Vec::new();
            read_limited(response, self.max_response_bytes, &mut body)
                .await
                .map_err(|f| (!too_large, f.to_string()))?;
            Ok(Bytes::from(body))
        };
        fetch
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(250))
                    .with_max_times(DOWNLOAD_RETRIES),
            )
            .when(|(transient, _)| *transient)
            .notify(|(_, message), after| {
                tracing::warn!(error = %message, after_ms = after.as_millis() as u64, "retrying the image download");
            })
            .await
            .map_err(|(_, message)| billed_failure(message))
    }
}

impl ImageProvider for OpenAi {
    fn name(&self) -> &'static str {
        "openai"
    }

    fn generate<'a>(
        &'a self,
        request: ImageRequest<'a>,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Generation, Failure>> {
        Box::pin(self.call(request))
    }
}

#[derive(Deserialize)]
struct ImagesResponse<'a> {
    #[serde(default, borrow)]
    data: Vec<ImageData<'a>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    output_format: Option<String>,
}

#[derive(Deserialize)]
struct ImageData<'a> {
    /// Borrowed from the response body when it has no escapes (base64 never does): no copy.
    #[serde(default, borrow)]
    b64_json: Option<Borrowed<'a>>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default, borrow)]
    revised_prompt: Option<Cow<'a, str>>,
}

/// A string borrowed from the response body when it has no escapes (serde only borrows a `Cow`
/// field directly, not inside an `Option`, hence the wrapper).
#[derive(Deserialize)]
struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);

fn header_str(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
}

/// The server's requested delay: `retry-after-ms` (float milliseconds), else `retry-after`
/// (seconds, or an HTTP date).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    if let Some(ms) =
        header_str(headers, "retry-after-ms").and_then(|v| v.trim().parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        return Some(Duration::from_secs_f64(ms / 1000.0));
    }
    let value = header_str(headers, "retry-after")?;
    if let Ok(secs) = value.trim().parse::<f64>() {
        return (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs));
    }
    let when = httpdate::parse_http_date(value.trim()).ok()?;
    Some(
        when.duration_since(std::time::SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// Where an answer's image is.
enum ImageBytes {
    Decoded(Bytes),
    Url(String),
}

/// A 200 answer, its images decoded.
struct Answer {
    images: Vec<(ImageBytes, Option<String>)>,
    usage: Option<Value>,
    output_format: Option<String>,
}

/// Parses a 200 answer and decodes its base64 images *in the body's own buffer* (SIMD): each
/// image is written over the text it came from. No second copy of an image ever exists: the
/// peak is the body itself (4/3 of the images), and the images are uploaded from it; it goes
/// back to its pool when the last of them is dropped.
fn decode_answer(mut body: PooledBuf) -> Result<Answer, Failure> {
    // The megabytes of base64 are located with a SIMD search for their closing quotes, and the
    // JSON parser only reads the rest (a few hundred bytes). When that is not possible (an
    // escape inside the base64), the parser reads the whole answer.
    let located = base64_spans(&body).and_then(|spans| {
        let mut skeleton = Vec::with_capacity(1024);
        let mut from = 0;
        for span in &spans {
            skeleton.extend_from_slice(&body[from..span.start]);
            from = span.end;
        }
        skeleton.extend_from_slice(&body[from..]);
        let parsed: ImagesResponse<'_> = serde_json::from_slice(&skeleton).ok()?;
        // Every span must be the `b64_json` of a `data` item, in order; else read it all.
        let in_data = parsed.data.iter().filter(|i| i.b64_json.is_some()).count();
        if in_data != spans.len() {
            return None;
        }
        let mut spans = spans.into_iter();
        Some(sources_of(parsed, |_| spans.next()))
    });
    let (sources, usage, output_format) = match located {
        Some(found) => found,
        None => {
            let parsed: ImagesResponse<'_> = serde_json::from_slice(&body).map_err(|e| {
                billed_failure(format!(
                    "the provider's 200 response could not be read: {e}"
                ))
            })?;
            let base = body.as_ptr() as usize;
            sources_of(parsed, |b64| {
                let start = b64.as_ptr() as usize - base;
                Some(start..start + b64.len())
            })
        }
    };
    let invalid = |e: base64_simd::Error| {
        billed_failure(format!("the provider returned invalid base64: {e}"))
    };
    let mut spans = Vec::with_capacity(sources.len());
    for (source, _) in &sources {
        if let Source::InBody(span) = source {
            let n = base64_simd::STANDARD
                .decode_inplace(&mut body[span.clone()])
                .map_err(invalid)?
                .len();
            spans.push(span.start..span.start + n);
        }
    }
    let decoded = body.freeze();
    let mut spans = spans.into_iter();
    let mut images = Vec::with_capacity(sources.len());
    for (source, revised_prompt) in sources {
        let data = match source {
            Source::InBody(..) => ImageBytes::Decoded(decoded.slice(spans.next().unwrap_or(0..0))),
            Source::Owned(b64) => ImageBytes::Decoded(Bytes::from(
                base64_simd::STANDARD
                    .decode_to_vec(b64.as_bytes())
                    .map_err(invalid)?,
            )),
            Source::Url(url) => ImageBytes::Url(url),
        };
        images.push((data, revised_prompt));
    }
    Ok(Answer {
        images,
        usage,
        output_format,
    })
}

enum Source {
    /// Where the base64 text is within the body.
    InBody(Range<usize>),
    /// Base64 with JSON escapes (`\/`), unescaped by the parser.
    Owned(String),
    Url(String),
}

type Sources = (Vec<(Source, Option<String>)>, Option<Value>, Option<String>);

/// The images of a parsed answer; `in_body` locates a borrowed base64 string in the body.
fn sources_of(
    parsed: ImagesResponse<'_>,
    mut in_body: impl FnMut(&str) -> Option<Range<usize>>,
) -> Sources {
    let sources = parsed
        .data
        .into_iter()
        .filter_map(|item| {
            let source = match (item.b64_json, item.url) {
                (Some(Borrowed(Cow::Borrowed(b64))), _) => Source::InBody(in_body(b64)?),
                (Some(Borrowed(Cow::Owned(b64))), _) => Source::Owned(b64),
                (None, Some(url)) => Source::Url(url),
                (None, None) => return None,
            };
            Some((source, item.revised_prompt.map(Cow::into_owned)))
        })
        .collect();
    (sources, parsed.usage, parsed.output_format)
}

/// The values of the `"b64_json"` keys of an answer, found by a SIMD search for their closing
/// quotes instead of a character-by-character parse. `None` when one has an escape (`\/`),
/// which only the JSON parser reads right. The key only matches where it is a key: inside a
/// JSON string its quotes would be escaped.
fn base64_spans(body: &[u8]) -> Option<Vec<Range<usize>>> {
    const KEY: &[u8] = b"\"b64_json\"";
    let skip_space = |mut i: usize| {
        while body.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let finder = memchr::memmem::Finder::new(KEY);
    let mut spans = Vec::new();
    let mut at = 0;
    while let Some(found) = finder.find(&body[at..]) {
        let colon = skip_space(at + found + KEY.len());
        if body.get(colon) != Some(&b':') {
            return None;
        }
        let quote = skip_space(colon + 1);
        if body.get(quote) != Some(&b'"') {
            // null or something else: the parser decides.
            at = quote;
            continue;
        }
        let start = quote + 1;
        let end = start + memchr::memchr2(b'"', b'\\', &body[start..])?;
        if body[end] != b'"' {
            return None;
        }
        spans.push(start..end);
        at = end + 1;
    }
    Some(spans)
}

/// Reads a body into `buf`, refusing more than `limit` bytes.
async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
    buf: &mut Vec<u8>,
) -> Result<(), Failure> {
    let expected = response.content_length().unwrap_or(0) as usize;
    if expected > limit {
        return Err(billed_failure(format!(
            "the provider's response is {expected} bytes, more than provider.max_response_bytes ({limit})"
        )));
    }
    buf.reserve(expected);
    while let Some(chunk) = response.chunk().await.map_err(transport_failure)? {
        if buf.len() + chunk.len() > limit {
            return Err(billed_failure(format!(
                "the provider's response exceeds provider.max_response_bytes ({limit})"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(())
}

/// A failure after the request may have reached the provider: it may have been billed.
fn billed_failure(message: String) -> Failure {
    Failure::Retryable {
        message,
        after: None,
        possibly_billed: true,
        detail: Box::default(),
    }
}

fn with_request_id(mut failure: Failure, request_id: &Option<String>) -> Failure {
    if let Failure::Retryable { detail, .. } = &mut failure {
        detail.request_id.clone_from(request_id);
    }
    failure
}

/// Classifies a transport error: a connection that never opened cannot have been billed; a
/// timeout or reset after the request was sent may have been.
fn transport_failure(error: reqwest::Error) -> Failure {
    let possibly_billed = !error.is_connect() && !error.is_builder();
    Failure::Retryable {
        message: crate::error::with_causes(&error),
        after: None,
        possibly_billed,
        detail: Box::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn retry_after_prefers_milliseconds_then_seconds_then_dates() {
        assert_eq!(
            retry_after(&headers(&[
                ("retry-after-ms", "1500.5"),
                ("retry-after", "9")
            ])),
            Some(Duration::from_secs_f64(1.5005))
        );
        assert_eq!(
            retry_after(&headers(&[("retry-after", "2")])),
            Some(Duration::from_secs(2))
        );
        let later = std::time::SystemTime::now() + Duration::from_secs(30);
        let d = retry_after(&headers(&[(
            "retry-after",
            &httpdate::fmt_http_date(later),
        )]))
        .unwrap();
        assert!(
            d > Duration::from_secs(25) && d <= Duration::from_secs(30),
            "{d:?}"
        );
        assert_eq!(retry_after(&headers(&[("retry-after", "soon")])), None);
        assert_eq!(retry_after(&headers(&[])), None);
    }

    #[test]
    fn tolerant_parsing_keeps_images_with_unexpected_fields() {
        let body = br#"{"created":1,"data":[{"b64_json":"aGk=","future_field":1}],"size":"4096x4096",
            "quality":"ultra","output_format":"avif","usage":{"input_tokens":3,"new":{"x":1}},"extra":[]}"#;
        let parsed: ImagesResponse<'_> = serde_json::from_slice(body).unwrap();
        assert_eq!(parsed.data.len(), 1);
        assert!(matches!(
            parsed.data[0].b64_json,
            Some(Borrowed(Cow::Borrowed("aGk=")))
        ));
        assert_eq!(parsed.usage.unwrap()["input_tokens"], 3);
    }

    fn pooled(pool: &BufferPool, text: &str) -> PooledBuf {
        let mut buf = pool.take(text.len());
        buf.extend_from_slice(text.as_bytes());
        buf
    }

    #[test]
    fn base64_is_located_without_parsing_it_and_odd_answers_fall_back_to_the_parser() {
        let b64 = |data: &[u8]| base64_simd::STANDARD.encode_to_string(data);
        let image: Vec<u8> = (0..30_000u32).map(|i| (i * 13 % 256) as u8).collect();
        let decoded = |body: &str| -> Vec<(Vec<u8>, Option<String>)> {
            let pool = BufferPool::new(1);
            decode_answer(pooled(&pool, body))
                .unwrap()
                .images
                .into_iter()
                .map(|(data, revised)| match data {
                    ImageBytes::Decoded(d) => (d.to_vec(), revised),
                    ImageBytes::Url(u) => (u.into_bytes(), revised),
                })
                .collect()
        };
        // The key's text inside a string has escaped quotes: it is not taken for a key.
        let tricky = r#"say \"b64_json\": \"AAAA\""#;
        let plain = format!(
            r#"{{"created":1,"data":[{{"revised_prompt":"{tricky}","b64_json" : "{}"}},
            {{"b64_json":"{}"}}],"usage":{{"total_tokens":2}}}}"#,
            b64(&image),
            b64(&image[..10])
        );
        assert_eq!(base64_spans(plain.as_bytes()).map(|s| s.len()), Some(2));
        let got = decoded(&plain);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, image);
        assert_eq!(got[0].1.as_deref(), Some(r#"say "b64_json": "AAAA""#));
        assert_eq!(got[1], (image[..10].to_vec(), None));
        // A b64_json outside `data`: the spans do not match the items, the parser reads it all.
        let outside = format!(
            r#"{{"extra":{{"b64_json":"AAAA"}},"data":[{{"b64_json":"{}"}}]}}"#,
            b64(&image)
        );
        assert_eq!(base64_spans(outside.as_bytes()).map(|s| s.len()), Some(2));
        assert_eq!(decoded(&outside), vec![(image.clone(), None)]);
        // An escaped slash: only the parser can read it.
        let escaped = format!(
            r#"{{"data":[{{"b64_json":"{}"}}]}}"#,
            b64(&[0xff, 0xff, 0xfe])
        )
        .replace('/', "\\/");
        assert!(base64_spans(escaped.as_bytes()).is_none());
        assert_eq!(decoded(&escaped), vec![(vec![0xff, 0xff, 0xfe], None)]);
        // null, with a URL instead.
        let null = r#"{"data":[{"b64_json": null, "url":"https://x/y.png"}]}"#;
        assert_eq!(base64_spans(null.as_bytes()).map(|s| s.len()), Some(0));
        assert_eq!(decoded(null), vec![(b"https://x/y.png".to_vec(), None)]);
    }

    #[test]
    fn images_are_decoded_in_the_body_buffer_in_order() {
        let b64 = |data: &[u8]| base64_simd::STANDARD.encode_to_string(data);
        let first: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let second: Vec<u8> = (0..5u8).collect();
        // `/` may be escaped as `\/` in JSON: that image is unescaped by the parser instead.
        let third = [0xffu8, 0xff, 0xfe];
        let third_b64 = b64(&third).replace('/', "\\/");
        let body = format!(
            r#"{{"created":1,"data":[{{"b64_json":"{}","revised_prompt":"r1"}},{{"url":"https://x/y.png"}},
            {{"b64_json":"{}"}},{{"b64_json":"{third_b64}"}}],"usage":{{"total_tokens":9}},"output_format":"webp"}}"#,
            b64(&first),
            b64(&second)
        );
        let pool = BufferPool::new(1);
        let answer = decode_answer(pooled(&pool, &body)).unwrap();
        assert_eq!(answer.usage.unwrap()["total_tokens"], 9);
        assert_eq!(answer.output_format.as_deref(), Some("webp"));
        let got: Vec<_> = answer
            .images
            .into_iter()
            .map(|(data, revised)| match data {
                ImageBytes::Decoded(d) => (d.to_vec(), revised),
                ImageBytes::Url(u) => (u.into_bytes(), revised),
            })
            .collect();
        assert_eq!(got[0], (first.clone(), Some("r1".to_string())));
        assert_eq!(got[1], (b"https://x/y.png".to_vec(), None));
        assert_eq!(got[2], (second, None));
        assert_eq!(got[3], (third.to_vec(), None));
        assert_eq!(
            pool.idle(),
            1,
            "the images dropped, their buffer is back in the pool"
        );

        let broken = format!(r#"{{"data":[{{"b64_json":"{}!"}}]}}"#, b64(&first));
        match decode_answer(pooled(&pool, &broken)) {
            Err(Failure::Retryable {
                possibly_billed,
                message,
                ..
            }) => {
                assert!(possibly_billed);
                assert!(message.contains("invalid base64"), "{message}");
            }
            Ok(_) => panic!("invalid base64 accepted"),
            Err(other) => panic!("{other:?}"),
        }
    }

    #[test]
    fn params_pass_through_and_worker_fields_win() {
        let settings = crate::config::Settings::load_with_overrides(
            &crate::config::Sources::default(),
            &[
                ("provider.kind", "openai".into()),
                ("provider.api_key", "sk-test".into()),
            ],
        )
        .unwrap();
        let provider = OpenAi::new(&settings.provider, 1).unwrap();
        let rules = crate::job::JobRules::from_settings(&settings);
        let job = crate::job::Job::parse(
            br#"{"id":"a","prompt":"p","n":3,"params":{"user":"u-1","output_compression":80}}"#,
            None,
            &rules,
        )
        .unwrap();
        let body = provider.body(ImageRequest {
            job: &job,
            indices: &[1, 2],
        });
        assert_eq!(body["n"], 2);
        assert_eq!(body["model"], "gpt-image-2");
        assert_eq!(body["user"], "u-1");
        assert_eq!(body["output_compression"], 80);
        assert!(body.get("response_format").is_none());
        assert!(body.get("background").is_none());
    }
}

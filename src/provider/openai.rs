//! The OpenAI Images API (`POST {base_url}/images/generations`) and compatible hosts (Azure
//! OpenAI's v1 surface, Together, DeepInfra, ...).
//!
//! Response types are tolerant: every field is optional and open, because a parse failure after
//! a 200 would throw away an image that was already paid for.

use std::borrow::Cow;
use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures_util::future::BoxFuture;
use reqwest::header::{HeaderMap, HeaderValue};
use secrecy::ExposeSecret;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::{GeneratedImage, Generation, ImageProvider, ImageRequest, Journal, sniff};
use crate::config::{AuthScheme, ProviderSettings};
use crate::error::{ApiErrorBody, Failure, classify_http};
use crate::throttle::RateLimits;

/// Error bodies are small; never read more than this of one.
const MAX_ERROR_BODY: usize = 64 * 1024;

pub struct OpenAi {
    client: reqwest::Client,
    endpoint: String,
    response_format: Option<String>,
    max_response_bytes: usize,
}

impl OpenAi {
    pub fn new(settings: &ProviderSettings) -> anyhow::Result<Self> {
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
            endpoint: format!(
                "{}/images/generations",
                settings.base_url.trim_end_matches('/')
            ),
            response_format: Some(settings.response_format.clone()).filter(|f| !f.is_empty()),
            max_response_bytes: settings.max_response_bytes,
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
            let body = read_limited(response, MAX_ERROR_BODY)
                .await
                .unwrap_or_default();
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
        let body = read_limited(response, self.max_response_bytes)
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

    /// Fetches an image given by URL (DALL-E style `url` responses, valid for an hour).
    async fn download(&self, url: &str) -> Result<Bytes, Failure> {
        // A fresh request without the API key: the URL is pre-signed, and may be on another host.
        let response = reqwest::Client::new()
            .get(url)
            .timeout(Duration::from_secs(120))
            .send()
            .await
            .map_err(|e| billed_failure(format!("downloading the generated image failed: {e}")))?;
        if !response.status().is_success() {
            return Err(billed_failure(format!(
                "downloading the generated image failed with HTTP {}",
                response.status()
            )));
        }
        read_limited(response, self.max_response_bytes)
            .await
            .map(BytesMut::freeze)
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

/// Parses a 200 answer and decodes its base64 images *in the body's own buffer*: each image is
/// written over the text it came from, compacted to the front, and the buffer is then shrunk. No
/// second full copy of an image ever exists: the peak is the body itself (4/3 of the images),
/// and what stays alive for the upload is the images alone.
fn decode_answer(mut body: BytesMut) -> Result<Answer, Failure> {
    enum Source {
        /// Offset and length of the base64 text within the body.
        InBody(usize, usize),
        /// Base64 with JSON escapes (`\/`), unescaped by the parser.
        Owned(String),
        Url(String),
    }
    let (sources, usage, output_format) = {
        let parsed: ImagesResponse<'_> = serde_json::from_slice(&body).map_err(|e| {
            billed_failure(format!(
                "the provider's 200 response could not be read: {e}"
            ))
        })?;
        let base = body.as_ptr() as usize;
        let sources: Vec<(Source, Option<String>)> = parsed
            .data
            .into_iter()
            .filter_map(|item| {
                let source = match (item.b64_json, item.url) {
                    (Some(Borrowed(Cow::Borrowed(b64))), _) => {
                        Source::InBody(b64.as_ptr() as usize - base, b64.len())
                    }
                    (Some(Borrowed(Cow::Owned(b64))), _) => Source::Owned(b64),
                    (None, Some(url)) => Source::Url(url),
                    (None, None) => return None,
                };
                Some((source, item.revised_prompt.map(Cow::into_owned)))
            })
            .collect();
        (sources, parsed.usage, parsed.output_format)
    };
    let invalid = |e: base64::DecodeSliceError| {
        billed_failure(format!("the provider returned invalid base64: {e}"))
    };
    // Decode each in-body image to the front of the buffer, in order: the write position never
    // passes the read position, since base64 is 4/3 of what it encodes.
    let mut written = 0;
    let mut spans = Vec::with_capacity(sources.len());
    for (source, _) in &sources {
        if let Source::InBody(start, len) = *source {
            let n = decode_in_place(&mut body, start, len, written).map_err(invalid)?;
            spans.push((written, n));
            written += n;
        }
    }
    body.truncate(written);
    let mut decoded = Vec::from(body);
    decoded.shrink_to_fit();
    let decoded = Bytes::from(decoded);
    let mut spans = spans.into_iter();
    let mut images = Vec::with_capacity(sources.len());
    for (source, revised_prompt) in sources {
        let data = match source {
            Source::InBody(..) => {
                let (at, n) = spans.next().unwrap_or_default();
                ImageBytes::Decoded(decoded.slice(at..at + n))
            }
            Source::Owned(b64) => ImageBytes::Decoded(Bytes::from(
                base64::engine::general_purpose::STANDARD
                    .decode(b64.as_bytes())
                    .map_err(|e| {
                        billed_failure(format!("the provider returned invalid base64: {e}"))
                    })?,
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

/// Decodes the base64 at `buf[start..start + len]` into `buf[to..]` (`to <= start`), a block at a
/// time through a small stack buffer; returns the decoded length.
fn decode_in_place(
    buf: &mut [u8],
    start: usize,
    len: usize,
    to: usize,
) -> Result<usize, base64::DecodeSliceError> {
    const BLOCK: usize = 16 * 1024; // a multiple of 4: padding can only be in the last block
    let mut out = [0u8; BLOCK / 4 * 3];
    let engine = &base64::engine::general_purpose::STANDARD;
    let mut written = 0;
    let mut read = 0;
    while read < len {
        let take = BLOCK.min(len - read);
        let n = engine.decode_slice(&buf[start + read..start + read + take], &mut out)?;
        buf[to + written..to + written + n].copy_from_slice(&out[..n]);
        written += n;
        read += take;
    }
    Ok(written)
}

/// Reads a body, refusing more than `limit` bytes.
async fn read_limited(mut response: reqwest::Response, limit: usize) -> Result<BytesMut, Failure> {
    let expected = response.content_length().unwrap_or(0) as usize;
    if expected > limit {
        return Err(billed_failure(format!(
            "the provider's response is {expected} bytes, more than provider.max_response_bytes ({limit})"
        )));
    }
    let mut buf = BytesMut::with_capacity(expected);
    while let Some(chunk) = response.chunk().await.map_err(transport_failure)? {
        if buf.len() + chunk.len() > limit {
            return Err(billed_failure(format!(
                "the provider's response exceeds provider.max_response_bytes ({limit})"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf)
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
    let mut message = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(s) = source {
        message.push_str(": ");
        message.push_str(&s.to_string());
        source = s.source();
    }
    Failure::Retryable {
        message,
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

    #[test]
    fn images_are_decoded_in_the_body_buffer_in_order() {
        let b64 = |data: &[u8]| base64::engine::general_purpose::STANDARD.encode(data);
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
        let answer = decode_answer(BytesMut::from(body.as_bytes())).unwrap();
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

        let broken = format!(r#"{{"data":[{{"b64_json":"{}!"}}]}}"#, b64(&first));
        match decode_answer(BytesMut::from(broken.as_bytes())) {
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
        let provider = OpenAi::new(&settings.provider).unwrap();
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

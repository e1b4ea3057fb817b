//! `POST /v1/images/generations`. The key is checked first, then an injected fault takes the place
//! of the answer, then the body is validated and the account's rate limits are applied: a client
//! gets the error the provider would give first, with the same headers on every answer.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Extension;
use axum::body::Bytes;
use axum::extract::State;
use axum::extract::connect_info::ConnectInfo;
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::errors::ApiError;
use super::validate::{GenRequest, validate};
use super::{FILES_KEPT, FakeApi, Fault, lock};
use crate::net::{self, ResetHandle};

enum Outcome {
    Reply(Response),
    Reset,
}

pub(super) async fn generations(
    State(api): State<FakeApi>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Spawned, so that a client that gives up does not cancel the work: the provider finishes
    // (and bills) a request whatever happens to its connection.
    match tokio::spawn(api.process(headers, body)).await {
        Ok(Outcome::Reply(response)) => response,
        Ok(Outcome::Reset) => net::reset(conn),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

impl FakeApi {
    /// Everything after reading the request.
    async fn process(self, headers: HeaderMap, body: Bytes) -> Outcome {
        let received = Instant::now();
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let request_id = format!("req_{:032x}", fastrand::u128(..));
        let parsed = serde_json::from_slice::<Value>(&body);
        let prompt = parsed.as_ref().ok().and_then(|v| v.get("prompt")?.as_str());
        {
            let mut counters = lock(&self.inner.counters);
            counters.stats.requests += 1;
            if let Some(p) = prompt {
                counters.per_prompt.entry(p.to_owned()).or_default().0 += 1;
            }
        }

        let mut delay = self.delay_of(seq);
        let mut not_an_image = false;
        let result = match (self.check_auth(&headers), &parsed) {
            (Err(e), _) => Err(e),
            (Ok(()), Err(_)) => Err(ApiError::unparsable_body()),
            (Ok(()), Ok(value)) => match self.take_fault(prompt) {
                Some(Fault::Reset) => {
                    tokio::time::sleep(delay).await;
                    return Outcome::Reset;
                }
                Some(Fault::Hang { secs }) => {
                    delay += Duration::try_from_secs_f64(secs).unwrap_or_default();
                    validate(value)
                }
                Some(Fault::NotAnImage) => {
                    not_an_image = true;
                    validate(value)
                }
                Some(fault) => Err(ApiError::from_fault(&fault, value, &request_id)),
                None => validate(value),
            },
        };
        // Rate limits are checked on arrival, as the provider does; a refused request is answered
        // at once.
        let result = result.and_then(|req| {
            let (text, image) = req.usage_tokens();
            match lock(&self.inner.limits).admit(text + image) {
                Ok(()) => Ok(req),
                Err(refusal) => {
                    delay = Duration::ZERO;
                    Err(ApiError::rate_limited(&req.model, &refusal))
                }
            }
        });
        tokio::time::sleep(delay).await;

        let (status, body, extra) = match result {
            Ok(req) => {
                let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
                let body = self.success_body(&req, seq, host, not_an_image);
                let mut counters = lock(&self.inner.counters);
                counters.stats.billed += 1;
                counters.stats.images += req.n;
                counters.per_prompt.entry(req.prompt).or_default().1 += 1;
                (StatusCode::OK, body, Vec::new())
            }
            Err(e) => {
                let status = e.status;
                *lock(&self.inner.counters)
                    .stats
                    .errors_by_status
                    .entry(status.as_u16())
                    .or_default() += 1;
                (status, e.body().to_string(), e.headers)
            }
        };

        let json_type = [(header::CONTENT_TYPE, "application/json")];
        let mut response = (status, json_type, body).into_response();
        let h = response.headers_mut();
        set(h, "x-request-id", request_id);
        set(h, "openai-processing-ms", received.elapsed().as_millis());
        set(h, "openai-version", "2020-10-01");
        lock(&self.inner.limits).set_headers(h);
        for (name, value) in extra {
            set(h, name, value);
        }
        Outcome::Reply(response)
    }

    pub(super) fn check_auth(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match (token, &self.inner.api_key) {
            (None, _) => Err(ApiError::missing_key()),
            (Some(t), Some(k)) if t != k => Err(ApiError::incorrect_key(t)),
            _ => Ok(()),
        }
    }

    /// The 200 body. Base64 needs no JSON escaping, so the images are written directly rather
    /// than through serde_json (which is slow on large strings in unoptimised test builds).
    pub(super) fn success_body(
        &self,
        req: &GenRequest,
        seq: u64,
        host: Option<&str>,
        not_an_image: bool,
    ) -> String {
        let meta = answer_meta(req);
        let png = &self.inner.png;
        let by_url = req.response_format.as_deref() == Some("url");
        let per_image = if by_url { 128 } else { png.b64_len_estimate() };
        let mut out = String::with_capacity(req.n as usize * (per_image + 16) + meta.len());
        out.push_str("{\"data\":[");
        for i in 0..req.n {
            if i > 0 {
                out.push(',');
            }
            let text = image_text(seq, i, &req.prompt);
            if by_url {
                let name = format!("{seq}-{i}.png");
                let url = format!("http://{}/_fake/files/{name}", host.unwrap_or("127.0.0.1"));
                let bytes = Bytes::from(png.encode(&text));
                let mut files = lock(&self.inner.files);
                if files.len() == FILES_KEPT {
                    files.pop_front();
                }
                files.push_back((name, bytes));
                out.push_str(&json!({ "url": url }).to_string());
            } else if not_an_image {
                let page = b"<html><head><title>502 Bad Gateway</title></head></html>";
                out.push_str("{\"b64_json\":\"");
                out.push_str(&base64_simd::STANDARD.encode_to_string(page));
                out.push_str("\"}");
            } else {
                out.push_str("{\"b64_json\":\"");
                png.write_b64(&text, &mut out);
                out.push_str("\"}");
            }
        }
        out.push_str("],");
        out.push_str(&meta[1..]);
        out
    }
}

/// Every field of a 200 body but `data`, as a JSON object: when it was made, the options it was
/// made with, and the usage it is billed for.
pub(super) fn answer_meta(req: &GenRequest) -> String {
    let (text_tokens, image_tokens) = req.usage_tokens();
    let created = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    json!({
        "created": created,
        "background": req.background.as_deref().unwrap_or("opaque"),
        "output_format": req.output_format.as_deref().unwrap_or("png"),
        "quality": req.quality.as_deref().unwrap_or("auto"),
        "size": req.size.as_deref().unwrap_or("1024x1024"),
        "usage": {
            "input_tokens": text_tokens,
            "input_tokens_details": { "text_tokens": text_tokens, "image_tokens": 0 },
            "output_tokens": image_tokens,
            "output_tokens_details": { "image_tokens": image_tokens, "text_tokens": 0 },
            "total_tokens": text_tokens + image_tokens,
        },
    })
    .to_string()
}

/// The text the `index`-th image of the `seq`-th call carries (in its PNG `tEXt` chunk): what
/// makes every image different, and tells a test which call and prompt it came from.
pub(super) fn image_text(seq: u64, index: u64, prompt: &str) -> String {
    format!("imagegen-fake seq={seq} index={index} prompt={prompt}")
}

fn set(headers: &mut HeaderMap, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::try_from(value.to_string()) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

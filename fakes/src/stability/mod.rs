//! A fake of Stability AI's Stable Image API (v2beta).
//!
//! Written from Stability's API reference:
//! - `POST /v2beta/stable-image/generate/{ultra|core|sd3}` with `Authorization: Bearer KEY` and a
//!   `multipart/form-data` body (anything else is a 400): `prompt` (required), `negative_prompt`,
//!   `aspect_ratio` (1:1, 16:9, 21:9, 2:3, 3:2, 4:5, 5:4, 9:16, 9:21), `seed` (0 to 4294967294),
//!   `output_format` (png, jpeg, webp), `style_preset`, and for `sd3` `model` and `cfg_scale`.
//! - `Accept: image/*` (or none) answers the image's bytes, with `finish-reason`, `seed` and
//!   `x-request-id` headers; `Accept: application/json` answers `{"image", "finish_reason",
//!   "seed"}`.
//! - Errors are `{"id", "name", "errors": [...]}`: 400 `bad_request`, 401 `unauthorized`, 402
//!   `payment_required` when the credits are gone, 403 `content_moderation` for a refused prompt
//!   (not charged), 429 `rate_limit_exceeded` over 150 requests in 10 s (then the account is timed
//!   out for 60 s), 500 `internal_error`.
//! - A filtered image is HTTP 200 with `finish-reason: CONTENT_FILTERED` (charged).
//! - `GET /v1/user/balance` answers `{"credits"}`. Each image costs its model's credits.
//!
//! Admin endpoints, as the other fakes': `GET /_fake/stats`, `GET /_fake/calls?prompt_contains=X`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Multipart, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::net::ResetHandle;
use crate::png::PngTemplate;
use crate::rules::{Ledger, Rules, Stats, lock};

/// A fault injected into the next matching requests.
pub type Rule = crate::rules::Rule<Fault>;

/// What a matching request gets instead of its image.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// 200 with `finish-reason: CONTENT_FILTERED` and a blurred image (charged).
    ContentFiltered,
    /// 403 `content_moderation` (not charged).
    Moderated,
    /// 429 `rate_limit_exceeded`.
    RateLimited,
    /// 402 `payment_required`.
    NoCredits,
    /// A 5xx `internal_error`.
    ServerError { status: u16 },
    /// The image is made and charged, then the connection is reset before the answer.
    ResetAfterBilling,
}

/// How the fake behaves when no [`Rule`] applies.
#[derive(Clone, Debug)]
pub struct StabilityOptions {
    /// `None`: any non-empty key; `Some(k)`: only `k`.
    pub api_key: Option<String>,
    /// Added before every answer.
    pub latency: Duration,
    /// Approximate size in bytes of each image.
    pub image_bytes: usize,
    /// The account's credits; `None`: unlimited.
    pub credits: Option<f64>,
    /// Requests allowed in any 10 s; `None`: unlimited.
    pub requests_per_10s: Option<usize>,
    /// How long an account over the limit is timed out.
    pub timeout: Duration,
}

impl Default for StabilityOptions {
    fn default() -> Self {
        Self {
            api_key: None,
            latency: Duration::ZERO,
            image_bytes: 2048,
            credits: None,
            requests_per_10s: Some(150),
            timeout: Duration::from_secs(60),
        }
    }
}

const RATIOS: &[&str] = &[
    "1:1", "16:9", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21",
];
const SD3_MODELS: &[(&str, f64)] = &[
    ("sd3.5-large", 6.5),
    ("sd3.5-large-turbo", 4.0),
    ("sd3.5-medium", 3.5),
    ("sd3.5-flash", 2.5),
];

#[derive(Clone)]
pub struct StabilityFake {
    inner: Arc<Inner>,
}

struct Inner {
    opts: StabilityOptions,
    rules: Rules<Fault>,
    ledger: Ledger,
    png: PngTemplate,
    credits: Mutex<Option<f64>>,
    /// Arrivals in the last 10 s, and the end of a time-out.
    window: Mutex<(VecDeque<Instant>, Option<Instant>)>,
    /// The [`crate::digest`] of each accepted image-to-image call's image.
    inputs: Mutex<Vec<String>>,
}

pub type StabilityServer = crate::Running<StabilityFake>;

impl crate::Running<StabilityFake> {
    /// `https://api.stability.ai` in real life.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Serves the fake on `listener` (connections can be reset).
pub async fn serve(listener: TcpListener, api: StabilityFake) -> std::io::Result<()> {
    crate::net::serve(listener, api.router()).await
}

/// Stability's error shape.
fn error(status: StatusCode, name: &str, message: &str) -> Response {
    (
        status,
        Json(json!({"id": format!("{:032x}", fastrand::u128(..)), "name": name, "errors": [message]})),
    )
        .into_response()
}

impl StabilityFake {
    pub fn new(opts: StabilityOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                png: PngTemplate::new(opts.image_bytes),
                credits: Mutex::new(opts.credits),
                opts,
                rules: Rules::default(),
                ledger: Ledger::default(),
                window: Mutex::default(),
                inputs: Mutex::default(),
            }),
        }
    }

    pub async fn start(self) -> std::io::Result<StabilityServer> {
        let router = self.router();
        crate::Running::start(self, router, "fake Stability AI").await
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v2beta/stable-image/generate/{endpoint}", post(generate))
            .route("/v1/user/balance", get(balance))
            .route(
                "/_fake/stats",
                get(|State(f): State<StabilityFake>| async move { Json(f.stats()) }),
            )
            .route("/_fake/calls", get(calls))
            .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "Not Found") })
            .with_state(self.clone())
    }

    pub fn push_rule(&self, rule: Rule) {
        self.inner.rules.push(rule);
    }

    /// The [`crate::digest`] of each accepted image-to-image call's image, in order.
    pub fn inputs(&self) -> Vec<String> {
        lock(&self.inner.inputs).clone()
    }

    pub fn stats(&self) -> Stats {
        self.inner.ledger.stats()
    }

    /// Generation requests whose prompt contains `needle`.
    pub fn calls_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).0
    }

    /// Of those, the ones charged.
    pub fn billed_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).1
    }

    /// Sets the account's credits (`None`: unlimited): someone paid.
    pub fn set_credits(&self, credits: Option<f64>) {
        *lock(&self.inner.credits) = credits;
    }

    /// The credits left, when the account has a balance.
    pub fn credits(&self) -> Option<f64> {
        *lock(&self.inner.credits)
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|k| !k.trim().is_empty());
        match (key, &self.inner.opts.api_key) {
            (None, _) => false,
            (Some(k), Some(want)) => k == want,
            (Some(_), None) => true,
        }
    }

    /// `Err`: over the account's rate, or timed out for having been.
    fn admit(&self) -> Result<(), ()> {
        let Some(limit) = self.inner.opts.requests_per_10s else {
            return Ok(());
        };
        let now = Instant::now();
        let mut w = lock(&self.inner.window);
        if w.1.is_some_and(|until| now < until) {
            return Err(());
        }
        while w
            .0
            .front()
            .is_some_and(|t| now.duration_since(*t) > Duration::from_secs(10))
        {
            w.0.pop_front();
        }
        if w.0.len() >= limit {
            w.1 = Some(now + self.inner.opts.timeout);
            return Err(());
        }
        w.0.push_back(now);
        Ok(())
    }
}

/// The text fields and the files of a multipart body, or the 400 of one that is not.
async fn fields(
    headers: &HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Result<(HashMap<String, String>, HashMap<String, axum::body::Bytes>), Response> {
    let is_multipart = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("multipart/form-data"));
    let Ok(mut multipart) = multipart.ok().filter(|_| is_multipart).ok_or(()) else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            "content-type: must be multipart/form-data",
        ));
    };
    let mut fields = HashMap::new();
    let mut files = HashMap::new();
    loop {
        match multipart.next_field().await {
            Ok(Some(field)) if field.file_name().is_some() => {
                let name = field.name().unwrap_or("").to_owned();
                match field.bytes().await {
                    Ok(data) => {
                        files.insert(name, data);
                    }
                    Err(e) => {
                        return Err(error(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            &format!("body: {e}"),
                        ));
                    }
                }
            }
            Ok(Some(field)) => {
                let name = field.name().unwrap_or("").to_owned();
                match field.text().await {
                    Ok(text) => {
                        fields.insert(name, text);
                    }
                    Err(e) => {
                        return Err(error(
                            StatusCode::BAD_REQUEST,
                            "bad_request",
                            &format!("body: {e}"),
                        ));
                    }
                }
            }
            Ok(None) => return Ok((fields, files)),
            Err(e) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "bad_request",
                    &format!("body: {e}"),
                ));
            }
        }
    }
}

/// The credits an image of `endpoint` (and `model`) costs, or the 400 of a request the API
/// refuses.
/// Image-to-image: an `image` file with a `strength` (0 to 1), on ultra, or on sd3 with `mode`
/// `image-to-image`; no `aspect_ratio` then (the image's own is kept). Core takes no image.
fn validate_image(
    endpoint: &str,
    f: &HashMap<String, String>,
    files: &HashMap<String, axum::body::Bytes>,
) -> Result<(), String> {
    let image = files.get("image");
    let i2i = f.get("mode").map(String::as_str) == Some("image-to-image");
    match (endpoint, image) {
        ("core", Some(_)) => return Err("image: not a parameter of this endpoint".into()),
        ("sd3", Some(_)) if !i2i => {
            return Err("mode: must be image-to-image when an image is given".into());
        }
        ("sd3", None) if i2i => return Err("image: required in image-to-image mode".into()),
        (_, None) => return Ok(()),
        _ => {}
    }
    if f.contains_key("aspect_ratio") {
        return Err("aspect_ratio: not a parameter of image-to-image".into());
    }
    if !f
        .get("strength")
        .and_then(|s| s.parse::<f64>().ok())
        .is_some_and(|s| (0.0..=1.0).contains(&s))
    {
        return Err("strength: required, a number between 0 and 1".into());
    }
    let data = image.map(|d| d.as_ref()).unwrap_or_default();
    let is_image = data.starts_with(b"\x89PNG")
        || data.starts_with(&[0xff, 0xd8, 0xff])
        || data.get(8..12) == Some(b"WEBP".as_slice());
    if !is_image {
        return Err("image: must be a png, jpeg or webp image".into());
    }
    Ok(())
}

fn validate(endpoint: &str, f: &HashMap<String, String>) -> Result<f64, String> {
    let credits = match endpoint {
        "ultra" => 8.0,
        "core" => 3.0,
        "sd3" => {
            let model = f.get("model").map(String::as_str).unwrap_or("sd3.5-large");
            SD3_MODELS
                .iter()
                .find(|(m, _)| *m == model)
                .map(|(_, c)| *c)
                .ok_or_else(|| {
                    format!(
                        "model: must be one of {}",
                        SD3_MODELS
                            .iter()
                            .map(|m| m.0)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?
        }
        _ => return Err("endpoint: not found".into()),
    };
    if f.get("prompt").is_none_or(|p| p.trim().is_empty()) {
        return Err("prompt: cannot be empty".into());
    }
    if let Some(r) = f.get("aspect_ratio")
        && !RATIOS.contains(&r.as_str())
    {
        return Err(format!(
            "aspect_ratio: must be one of {}",
            RATIOS.join(", ")
        ));
    }
    if let Some(o) = f.get("output_format")
        && !matches!(o.as_str(), "png" | "jpeg" | "webp")
    {
        return Err("output_format: must be one of png, jpeg, webp".into());
    }
    if let Some(s) = f.get("seed")
        && s.parse::<u64>().ok().is_none_or(|s| s > 4_294_967_294)
    {
        return Err("seed: must be a number between 0 and 4294967294".into());
    }
    if endpoint != "sd3" && (f.contains_key("model") || f.contains_key("cfg_scale")) {
        return Err("model: not a parameter of this endpoint".into());
    }
    Ok(credits)
}

async fn generate(
    State(fake): State<StabilityFake>,
    Path(endpoint): Path<String>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    if !fake.authorized(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "authorization: invalid or missing header value",
        );
    }
    let (f, files) = match fields(&headers, multipart).await {
        Ok(f) => f,
        Err(refused) => return refused,
    };
    let prompt = f.get("prompt").cloned().unwrap_or_default();
    let ledger = &fake.inner.ledger;
    ledger.request(Some(&prompt));
    let refuse = |response: Response| {
        ledger.error(response.status().as_u16());
        response
    };
    if fake.admit().is_err() {
        return refuse(error(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limit_exceeded",
            "You have exceeded the rate limit of 150 requests within a 10 second period, and \
             have been timed out for 60 seconds.",
        ));
    }
    let credits = match validate(&endpoint, &f).and_then(|c| {
        validate_image(&endpoint, &f, &files)?;
        Ok(c)
    }) {
        Ok(c) => c,
        Err(e) if e.starts_with("endpoint") => {
            return refuse(error(StatusCode::NOT_FOUND, "not_found", &e));
        }
        Err(e) => return refuse(error(StatusCode::BAD_REQUEST, "bad_request", &e)),
    };
    let json_answer = match headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()) {
        // What an HTTP client sends by default counts as image/*.
        None | Some("image/*" | "*/*") => false,
        Some("application/json") => true,
        Some(_) => {
            return refuse(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                "accept: must be image/* or application/json",
            ));
        }
    };
    tokio::time::sleep(fake.inner.opts.latency).await;
    let fault = fake.inner.rules.take(Some(&prompt));
    let filtered = match fault {
        None => false,
        Some(Fault::ContentFiltered) => true,
        Some(Fault::Moderated) => {
            return refuse(error(
                StatusCode::FORBIDDEN,
                "content_moderation",
                "Your request was flagged by our content moderation system, as a result your \
                 request was denied and you were not charged.",
            ));
        }
        Some(Fault::RateLimited) => {
            return refuse(error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_exceeded",
                "You have exceeded the rate limit of 150 requests within a 10 second period, \
                 and have been timed out for 60 seconds.",
            ));
        }
        Some(Fault::NoCredits) => return refuse(no_credits()),
        Some(Fault::ServerError { status }) => {
            return refuse(error(
                StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                "internal_error",
                "An unexpected server error has occurred, please try again later.",
            ));
        }
        Some(Fault::ResetAfterBilling) => {
            ledger.billed(&prompt, 1);
            return crate::net::reset(conn);
        }
    };
    {
        let mut balance = lock(&fake.inner.credits);
        if let Some(left) = balance.as_mut() {
            if *left < credits {
                drop(balance);
                return refuse(no_credits());
            }
            *left -= credits;
        }
    }
    ledger.billed(&prompt, 1);
    if let Some(image) = files.get("image") {
        lock(&fake.inner.inputs).push(crate::digest(image));
    }
    let seed = f
        .get("seed")
        .and_then(|s| s.parse::<u64>().ok())
        .unwrap_or_else(|| fastrand::u64(..4_294_967_295));
    let reason = if filtered {
        "CONTENT_FILTERED"
    } else {
        "SUCCESS"
    };
    let png = fake.inner.png.encode(&format!("{prompt} {seed}"));
    let request_id = format!("{:032x}", fastrand::u128(..));
    if json_answer {
        let mut image = String::new();
        base64_simd::STANDARD.encode_append(&png, &mut image);
        let mut r =
            Json(json!({"image": image, "finish_reason": reason, "seed": seed})).into_response();
        r.headers_mut()
            .insert("x-request-id", request_id.parse().unwrap());
        return r;
    }
    let mut r = png.into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, "image/png".parse().unwrap());
    h.insert("finish-reason", reason.parse().unwrap());
    h.insert("seed", seed.to_string().parse().unwrap());
    h.insert("x-request-id", request_id.parse().unwrap());
    r
}

fn no_credits() -> Response {
    error(
        StatusCode::PAYMENT_REQUIRED,
        "payment_required",
        "You lack sufficient credits to make this request. Please purchase more credits at \
         https://platform.stability.ai/account/credits and try again.",
    )
}

async fn balance(State(fake): State<StabilityFake>, headers: HeaderMap) -> Response {
    if !fake.authorized(&headers) {
        return error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "authorization: invalid or missing header value",
        );
    }
    Json(json!({"credits": fake.credits().unwrap_or(1_000_000.0)})).into_response()
}

async fn calls(
    State(fake): State<StabilityFake>,
    Query(q): Query<HashMap<String, String>>,
) -> Json<Value> {
    let needle = q.get("prompt_contains").map(String::as_str).unwrap_or("");
    Json(json!({"calls": fake.calls_for(needle), "billed": fake.billed_for(needle)}))
}

#[cfg(test)]
mod tests;

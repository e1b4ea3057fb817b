//! A fake of the OpenAI Images API (`POST /v1/images/generations`) for tests, benchmarks and demos.
//!
//! There is no network where tests run, so this server speaks the real protocol: the same request
//! validation, JSON response, error bodies, status codes and rate-limit headers as the provider.
//! It misbehaves on demand through [`Rule`]s and counts every call, so a test can prove that nothing
//! was paid for twice. It runs in-process ([`FakeApi::start`] binds `127.0.0.1:0`) or as a
//! standalone server ([`serve`]); admin endpoints under `/_fake/` let another process drive it:
//!
//! - `POST /_fake/rules` appends a JSON [`Rule`]; `DELETE /_fake/rules` removes all rules;
//! - `GET /_fake/stats` returns [`Stats`]; `GET /_fake/calls?prompt_contains=X` returns
//!   `{"calls": N, "billed": M}`;
//! - `POST /_fake/latency` with `{"ms": 500}` sets the latency added before every response;
//! - `POST /_fake/limits` with `{"requests_per_minute": 300, "tokens_per_minute": null}` sets the
//!   account's rate limits (`null`: unlimited).
//!
//! A request with `"response_format": "url"` (refused for GPT image models, as the provider does;
//! DALL-E and compatible hosts answer this way) gets `{"url": ...}` entries instead of `b64_json`:
//! `GET /_fake/files/{name}` serves those images, without authentication, as a pre-signed URL
//! would. The last [`FILES_KEPT`] images are kept; older URLs answer 404, as expired ones do.
//!
//! Rate limits are real token buckets, as the provider's are: each holds a minute's worth and
//! refills continuously; a request that finds its bucket empty gets a 429 `rate_limit_exceeded`
//! with `retry-after` / `retry-after-ms`, and every response carries the buckets' state in
//! `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`. Unlimited buckets are reported as very
//! large ones.
//!
//! Each request is processed in a detached task: like the real provider, a request whose client
//! gave up (timeout, disconnect) still runs to completion and is billed.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::throttle::TokenBucket;
use axum::body::{Body, Bytes};
use axum::extract::connect_info::{ConnectInfo, Connected};
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::{IncomingStream, Listener};
use axum::{Extension, Json, Router};
use base64_simd::STANDARD as BASE64;
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};

/// How the fake behaves when no [`Rule`] applies.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// Added before every response, success or error.
    pub latency: Duration,
    /// Approximate size in bytes of each generated PNG.
    pub image_bytes: usize,
    /// `None`: any non-empty Bearer token is accepted; `Some(k)`: only `k`, else 401.
    pub api_key: Option<String>,
    /// The account's requests per minute; `None`: unlimited.
    pub requests_per_minute: Option<u64>,
    /// The account's tokens per minute (a request costs its reported usage); `None`: unlimited.
    pub tokens_per_minute: Option<u64>,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            image_bytes: 2048,
            api_key: None,
            requests_per_minute: None,
            tokens_per_minute: None,
        }
    }
}

/// A fault injected into the next matching requests.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Rule {
    /// Only requests whose prompt contains this; `None` matches every request.
    pub prompt_contains: Option<String>,
    pub fault: Fault,
    /// `None`: forever; `Some(k)`: the next `k` matching requests.
    pub times: Option<u32>,
}

/// What a matching request gets instead of a normal answer.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// 429 `rate_limit_exceeded` (type `requests`), with `retry-after` / `retry-after-ms` when given.
    RateLimited {
        retry_after_secs: Option<f64>,
        retry_after_ms: Option<f64>,
    },
    /// 5xx `server_error`; 503 answers `server_is_overloaded`.
    ServerError { status: u16 },
    /// 400 `moderation_blocked`, type `image_generation_user_error`, with `moderation_details`.
    Moderation,
    /// 400 `content_policy_violation` (older and Azure style).
    ContentPolicy,
    /// 400 `invalid_request_error`.
    InvalidRequest { param: Option<String> },
    /// 404 `model_not_found`.
    ModelNotFound,
    /// 429 `insufficient_quota`: out of money, not retryable.
    QuotaExhausted,
    /// 401 `invalid_api_key`.
    Unauthorized,
    /// 403: the organization may not use this model.
    Forbidden,
    /// Wait this long, then answer normally (billed if it completes, even if the client left).
    Hang { secs: f64 },
    /// Close the connection abruptly (TCP reset) after reading the request, without a response.
    Reset,
}

/// Counters since the fake was created.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Every `POST /v1/images/generations` received.
    pub requests: u64,
    /// 200 responses sent (one per request, not per image).
    pub billed: u64,
    /// Images returned in 200 responses.
    pub images: u64,
    /// Error responses by HTTP status (a reset connection has no status and is not counted).
    pub errors_by_status: BTreeMap<u16, u64>,
    /// Images fetched from `/_fake/files/` (answers to `"response_format": "url"`).
    #[serde(default)]
    pub files_served: u64,
}

/// A handle on the fake's state; clones share it.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Inner>,
}

struct Inner {
    api_key: Option<String>,
    latency: Mutex<Duration>,
    rules: Mutex<Vec<Rule>>,
    counters: Mutex<Counters>,
    seq: AtomicU64,
    png: PngTemplate,
    limits: Mutex<AccountLimits>,
    /// Images given out by URL, oldest first.
    files: Mutex<VecDeque<(String, Bytes)>>,
    /// The next this many downloads of such images answer 503.
    failing_files: AtomicU64,
}

/// How many images given out by URL stay downloadable.
pub const FILES_KEPT: usize = 256;

/// Limits reported when none is set: large enough never to bind.
const UNLIMITED_RPM: u64 = 1_000_000;
const UNLIMITED_TPM: u64 = 1_000_000_000;

/// The account's rate limits, as token buckets holding a minute's worth.
struct AccountLimits {
    requests: (u64, TokenBucket),
    tokens: (u64, TokenBucket),
}

impl AccountLimits {
    fn new(rpm: Option<u64>, tpm: Option<u64>) -> Self {
        let bucket = |per_minute: u64| {
            (
                per_minute,
                TokenBucket::new(per_minute as f64, per_minute as f64),
            )
        };
        Self {
            requests: bucket(rpm.unwrap_or(UNLIMITED_RPM).max(1)),
            tokens: bucket(tpm.unwrap_or(UNLIMITED_TPM).max(1)),
        }
    }

    /// Takes one request and `tokens` tokens, or says which limit is reached and for how long.
    fn admit(&mut self, tokens: u64) -> Result<(), (&'static str, u64, Duration)> {
        if let Err(wait) = self.requests.1.try_take(1.0) {
            return Err(("requests per min (RPM)", self.requests.0, wait));
        }
        let tokens = (tokens as f64).min(self.tokens.1.capacity());
        if let Err(wait) = self.tokens.1.try_take(tokens) {
            // Not admitted: give the request back.
            self.requests.1.take_with_debt(-1.0);
            return Err(("tokens per min (TPM)", self.tokens.0, wait));
        }
        Ok(())
    }

    fn set_headers(&mut self, h: &mut HeaderMap) {
        for (name, (limit, bucket)) in [
            ("requests", &mut self.requests),
            ("tokens", &mut self.tokens),
        ] {
            let remaining = bucket.tokens().max(0.0).floor() as u64;
            let reset = go_duration(bucket.until_full());
            set_dyn(h, &format!("x-ratelimit-limit-{name}"), *limit);
            set_dyn(h, &format!("x-ratelimit-remaining-{name}"), remaining);
            set_dyn(h, &format!("x-ratelimit-reset-{name}"), reset);
        }
    }
}

/// A duration as Go prints it, as the provider's headers carry it: `120ms`, `1.5s`, `6m0s`.
fn go_duration(d: Duration) -> String {
    let ms = d.as_millis() as u64;
    if ms < 1000 {
        format!("{ms}ms")
    } else if ms < 60_000 {
        let secs = format!("{:.3}", d.as_secs_f64());
        format!("{}s", secs.trim_end_matches('0').trim_end_matches('.'))
    } else {
        format!("{}m{}s", ms / 60_000, (ms % 60_000) / 1000)
    }
}

#[derive(Default)]
struct Counters {
    stats: Stats,
    /// prompt -> (requests, billed)
    per_prompt: HashMap<String, (u64, u64)>,
}

/// A running in-process fake; the server task is aborted on drop.
pub struct FakeServer {
    pub api: FakeApi,
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl FakeServer {
    /// The base URL a client appends `/images/generations` to: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl FakeApi {
    pub fn new(opts: FakeOptions) -> Self {
        let inner = Inner {
            api_key: opts.api_key,
            latency: Mutex::new(opts.latency),
            rules: Mutex::default(),
            counters: Mutex::default(),
            seq: AtomicU64::new(0),
            png: PngTemplate::new(opts.image_bytes),
            files: Mutex::default(),
            failing_files: AtomicU64::new(0),
            limits: Mutex::new(AccountLimits::new(
                opts.requests_per_minute,
                opts.tokens_per_minute,
            )),
        };
        Self {
            inner: Arc::new(inner),
        }
    }

    /// Binds `127.0.0.1:0` and serves in a background task.
    pub async fn start(self) -> std::io::Result<FakeServer> {
        let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await?;
        let addr = listener.local_addr()?;
        let api = self.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = serve(listener, api).await {
                tracing::error!(error = %e, "fake image API stopped");
            }
        });
        Ok(FakeServer {
            api: self,
            addr,
            task,
        })
    }

    /// The routes. Prefer [`serve`]: served any other way, [`Fault::Reset`] degrades to a
    /// response body that fails before anything is written, so hyper closes the connection
    /// (cleanly, not with an RST) and the client sees an incomplete message without a status.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/images/generations", post(generations))
            .route(
                "/_fake/rules",
                post(admin_push_rule).delete(admin_clear_rules),
            )
            .route("/_fake/stats", get(admin_stats))
            .route("/_fake/calls", get(admin_calls))
            .route("/_fake/latency", post(admin_latency))
            .route("/_fake/limits", post(admin_limits))
            .route("/_fake/files/{name}", get(file))
            .fallback(unknown_url)
            .with_state(self.clone())
    }

    pub fn push_rule(&self, rule: Rule) {
        lock(&self.inner.rules).push(rule);
    }

    pub fn clear_rules(&self) {
        lock(&self.inner.rules).clear();
    }

    pub fn set_latency(&self, d: Duration) {
        *lock(&self.inner.latency) = d;
    }

    /// Sets the account's rate limits (`None`: unlimited), with full buckets.
    pub fn set_limits(&self, requests_per_minute: Option<u64>, tokens_per_minute: Option<u64>) {
        *lock(&self.inner.limits) = AccountLimits::new(requests_per_minute, tokens_per_minute);
    }

    /// The next `n` downloads of images given out by URL answer 503 (a storage hiccup).
    pub fn fail_file_downloads(&self, n: u64) {
        self.inner.failing_files.store(n, Ordering::Relaxed);
    }

    pub fn stats(&self) -> Stats {
        lock(&self.inner.counters).stats.clone()
    }

    /// Requests received whose prompt contains `prompt_substring`.
    pub fn calls_for(&self, prompt_substring: &str) -> u64 {
        self.per_prompt(prompt_substring).0
    }

    /// 200 responses sent for prompts containing `prompt_substring`.
    pub fn billed_for(&self, prompt_substring: &str) -> u64 {
        self.per_prompt(prompt_substring).1
    }

    fn per_prompt(&self, needle: &str) -> (u64, u64) {
        let counters = lock(&self.inner.counters);
        counters
            .per_prompt
            .iter()
            .filter(|(prompt, _)| prompt.contains(needle))
            .fold((0, 0), |acc, (_, c)| (acc.0 + c.0, acc.1 + c.1))
    }

    /// The first rule matching `prompt` with uses left; consumes one use.
    fn take_fault(&self, prompt: Option<&str>) -> Option<Fault> {
        let mut rules = lock(&self.inner.rules);
        let idx = rules.iter().position(|r| {
            r.times != Some(0)
                && match &r.prompt_contains {
                    None => true,
                    Some(s) => prompt.is_some_and(|p| p.contains(s.as_str())),
                }
        })?;
        let fault = rules[idx].fault.clone();
        if let Some(left) = rules[idx].times.as_mut() {
            *left -= 1;
            if *left == 0 {
                rules.remove(idx);
            }
        }
        Some(fault)
    }

    /// Everything after reading the request: runs detached from the connection.
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

        let mut delay = *lock(&self.inner.latency);
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
                Err((what, limit, wait)) => {
                    delay = Duration::ZERO;
                    Err(ApiError::rate_limited(&req.model, what, limit, wait))
                }
            }
        });
        tokio::time::sleep(delay).await;

        let (status, body, extra) = match result {
            Ok(req) => {
                let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
                let body = self.success_body(&req, seq, host);
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

    fn check_auth(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty());
        match (token, &self.inner.api_key) {
            (None, _) => Err(ApiError::new(
                StatusCode::UNAUTHORIZED,
                "invalid_request_error",
                Some("invalid_api_key"),
                "You didn't provide an API key. You need to provide your API key in an Authorization \
                 header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password \
                 field (with blank username) if you're accessing the API from your browser and are \
                 prompted for a username. You can obtain an API key from \
                 https://platform.openai.com/account/api-keys.",
            )),
            (Some(t), Some(k)) if t != k => Err(ApiError::incorrect_key(t)),
            _ => Ok(()),
        }
    }

    /// The 200 body. Base64 needs no JSON escaping, so the images are written directly rather
    /// than through serde_json (which is slow on large strings in unoptimised test builds).
    fn success_body(&self, req: &GenRequest, seq: u64, host: Option<&str>) -> String {
        let (text_tokens, image_tokens) = req.usage_tokens();
        let created = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let meta = json!({
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
        .to_string();
        let png = &self.inner.png;
        let mut out = String::with_capacity(req.n as usize * (png.b64_len() + 16) + meta.len());
        out.push_str("{\"data\":[");
        for i in 0..req.n {
            if i > 0 {
                out.push(',');
            }
            let text = format!("imagegen-fake seq={seq} index={i} prompt={}", req.prompt);
            if req.response_format.as_deref() == Some("url") {
                let name = format!("{seq}-{i}.png");
                let url = format!("http://{}/_fake/files/{name}", host.unwrap_or("127.0.0.1"));
                let mut b64 = String::with_capacity(png.b64_len());
                png.write_b64(&text, &mut b64);
                let bytes = BASE64
                    .decode_to_vec(b64)
                    .expect("the template is valid base64");
                let mut files = lock(&self.inner.files);
                if files.len() == FILES_KEPT {
                    files.pop_front();
                }
                files.push_back((name, Bytes::from(bytes)));
                out.push_str(&json!({ "url": url }).to_string());
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

/// Serves the fake on `listener` until the task is dropped. Unlike serving [`FakeApi::router`]
/// directly, connections can be reset, so [`Fault::Reset`] is a real TCP reset.
pub async fn serve(listener: TcpListener, api: FakeApi) -> std::io::Result<()> {
    let app = api
        .router()
        .into_make_service_with_connect_info::<ResetHandle>();
    axum::serve(ResettableListener(listener), app).await
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn set_dyn(headers: &mut HeaderMap, name: &str, value: impl ToString) {
    if let (Ok(n), Ok(v)) = (
        HeaderName::try_from(name),
        HeaderValue::try_from(value.to_string()),
    ) {
        headers.insert(n, v);
    }
}

fn set(headers: &mut HeaderMap, name: &'static str, value: impl ToString) {
    if let Ok(v) = HeaderValue::try_from(value.to_string()) {
        headers.insert(HeaderName::from_static(name), v);
    }
}

enum Outcome {
    Reply(Response),
    Reset,
}

async fn generations(
    State(api): State<FakeApi>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    match tokio::spawn(api.process(headers, body)).await {
        Ok(Outcome::Reply(response)) => response,
        Ok(Outcome::Reset) => match conn {
            Some(Extension(ConnectInfo(handle))) => {
                // Writing this response fails, so hyper drops the socket, which sends an RST.
                handle.0.store(true, Ordering::Release);
                StatusCode::OK.into_response()
            }
            None => {
                let broken = futures_util::stream::iter([Err::<Bytes, _>(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))]);
                Body::from_stream(broken).into_response()
            }
        },
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// An image given out by URL (`"response_format": "url"`), while it is kept.
async fn file(State(api): State<FakeApi>, Path(name): Path<String>) -> Response {
    let failing = &api.inner.failing_files;
    if failing
        .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
        .is_ok()
    {
        return (StatusCode::SERVICE_UNAVAILABLE, "try again\n").into_response();
    }
    let found = lock(&api.inner.files)
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, bytes)| bytes.clone());
    match found {
        Some(bytes) => {
            lock(&api.inner.counters).stats.files_served += 1;
            ([(header::CONTENT_TYPE, "image/png")], bytes).into_response()
        }
        None => (StatusCode::NOT_FOUND, "expired or unknown image\n").into_response(),
    }
}

async fn admin_push_rule(State(api): State<FakeApi>, Json(rule): Json<Rule>) -> StatusCode {
    api.push_rule(rule);
    StatusCode::NO_CONTENT
}

async fn admin_clear_rules(State(api): State<FakeApi>) -> StatusCode {
    api.clear_rules();
    StatusCode::NO_CONTENT
}

async fn admin_stats(State(api): State<FakeApi>) -> Json<Stats> {
    Json(api.stats())
}

#[derive(serde::Deserialize)]
struct CallsQuery {
    #[serde(default)]
    prompt_contains: String,
}

async fn admin_calls(State(api): State<FakeApi>, Query(q): Query<CallsQuery>) -> Json<Value> {
    let (calls, billed) = api.per_prompt(&q.prompt_contains);
    Json(json!({ "calls": calls, "billed": billed }))
}

#[derive(serde::Deserialize)]
struct LatencyBody {
    ms: u64,
}

#[derive(serde::Deserialize)]
struct LimitsBody {
    requests_per_minute: Option<u64>,
    tokens_per_minute: Option<u64>,
}

async fn admin_limits(State(api): State<FakeApi>, Json(body): Json<LimitsBody>) -> StatusCode {
    api.set_limits(body.requests_per_minute, body.tokens_per_minute);
    StatusCode::NO_CONTENT
}

async fn admin_latency(State(api): State<FakeApi>, Json(body): Json<LatencyBody>) -> StatusCode {
    api.set_latency(Duration::from_millis(body.ms));
    StatusCode::NO_CONTENT
}

async fn unknown_url(method: Method, uri: Uri) -> Response {
    let message = format!("Invalid URL ({method} {})", uri.path());
    ApiError::new(
        StatusCode::NOT_FOUND,
        "invalid_request_error",
        None,
        message,
    )
    .into_response()
}

/// A validated generation request.
struct GenRequest {
    model: String,
    prompt: String,
    n: u64,
    size: Option<String>,
    quality: Option<String>,
    output_format: Option<String>,
    background: Option<String>,
    response_format: Option<String>,
}

impl GenRequest {
    /// (text input tokens, image output tokens), as the usage of the answer reports them.
    fn usage_tokens(&self) -> (u64, u64) {
        let text_tokens = self.prompt.split_whitespace().count().max(1) as u64;
        let per_image = match self.quality.as_deref() {
            Some("low") => 272,
            Some("high") => 4160,
            _ => 1056,
        };
        (text_tokens, per_image * self.n)
    }
}

/// Validates like the real API: prompt required (1..=32000 chars), n in 1..=10, string options,
/// no `response_format` for GPT image models. Unknown fields are accepted.
fn validate(v: &Value) -> Result<GenRequest, ApiError> {
    let Some(obj) = v.as_object() else {
        return Err(ApiError::invalid(
            None,
            "invalid_type",
            format!(
                "Invalid type for request body: expected an object, but got {} instead.",
                json_type(v)
            ),
        ));
    };
    let prompt = match obj.get("prompt") {
        None | Some(Value::Null) => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "missing_required_parameter",
                "Missing required parameter: 'prompt'.",
            ));
        }
        Some(Value::String(s)) if s.is_empty() => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "empty_string",
                "Invalid 'prompt': empty string. Expected a string with minimum length 1, but got an \
                 empty string instead.",
            ));
        }
        Some(Value::String(s)) if s.chars().count() > 32_000 => {
            return Err(ApiError::invalid(
                Some("prompt"),
                "string_above_max_length",
                format!(
                    "Invalid 'prompt': string too long. Expected a string with maximum length 32000, \
                     but got a string with length {} instead.",
                    s.chars().count()
                ),
            ));
        }
        Some(Value::String(s)) => s.clone(),
        Some(other) => return Err(wrong_type("prompt", "a string", other)),
    };
    let n = match obj.get("n") {
        None | Some(Value::Null) => 1,
        Some(Value::Number(num)) if num.is_i64() || num.is_u64() => {
            let n = num.as_i64().unwrap_or(i64::MAX);
            if n < 1 {
                return Err(ApiError::invalid(
                    Some("n"),
                    "integer_below_min_value",
                    format!(
                        "Invalid 'n': integer below minimum value. Expected a value >= 1, but got {n} instead."
                    ),
                ));
            }
            if n > 10 {
                return Err(ApiError::invalid(
                    Some("n"),
                    "integer_above_max_value",
                    format!(
                        "Invalid 'n': integer above maximum value. Expected a value <= 10, but got {num} instead."
                    ),
                ));
            }
            n as u64
        }
        Some(other) => return Err(wrong_type("n", "an integer", other)),
    };
    let text = |name: &str| match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(other) => Err(wrong_type(name, "a string", other)),
    };
    let model = text("model")?;
    let req = GenRequest {
        model: model.clone().unwrap_or_else(|| "gpt-image-2".into()),
        prompt,
        n,
        size: text("size")?,
        quality: text("quality")?,
        output_format: text("output_format")?,
        background: text("background")?,
        response_format: text("response_format")?,
    };
    let gpt_image = model.as_deref().is_some_and(|m| m.starts_with("gpt-image"));
    if gpt_image && obj.get("response_format").is_some_and(|v| !v.is_null()) {
        return Err(ApiError::invalid(
            Some("response_format"),
            "unknown_parameter",
            "Unknown parameter: 'response_format'.",
        ));
    }
    if let Some(format) = req.response_format.as_deref()
        && format != "url"
        && format != "b64_json"
    {
        return Err(ApiError::invalid(
            Some("response_format"),
            "invalid_value",
            format!("Invalid value: '{format}'. Supported values are: 'url' and 'b64_json'."),
        ));
    }
    Ok(req)
}

fn wrong_type(param: &str, expected: &str, got: &Value) -> ApiError {
    ApiError::invalid(
        Some(param),
        "invalid_type",
        format!(
            "Invalid type for '{param}': expected {expected}, but got {} instead.",
            json_type(got)
        ),
    )
}

fn json_type(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a decimal",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// An error answer: `{"error": {"message", "type", "param", "code"}}` plus retry headers.
struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<String>,
    code: Option<&'static str>,
    /// Adds `moderation_details` to the body.
    moderation_blocked: bool,
    /// `retry-after` / `retry-after-ms`.
    headers: Vec<(&'static str, String)>,
}

impl ApiError {
    fn new(
        status: StatusCode,
        kind: &'static str,
        code: Option<&'static str>,
        message: impl Into<String>,
    ) -> Self {
        Self {
            status,
            message: message.into(),
            kind,
            param: None,
            code,
            moderation_blocked: false,
            headers: Vec::new(),
        }
    }

    fn invalid(param: Option<&str>, code: &'static str, message: impl Into<String>) -> Self {
        let mut e = Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            Some(code),
            message,
        );
        e.param = param.map(str::to_owned);
        e
    }

    /// 429 for an account rate limit, with the provider's wording and delay headers.
    fn rate_limited(model: &str, what: &str, limit: u64, wait: Duration) -> Self {
        let kind = if what.starts_with("tokens") {
            "tokens"
        } else {
            "requests"
        };
        let mut e = Self::new(
            StatusCode::TOO_MANY_REQUESTS,
            kind,
            Some("rate_limit_exceeded"),
            format!(
                "Rate limit reached for {model} in organization org-fake on {what}: Limit {limit}, \
                 Used {limit}, Requested 1. Please try again in {}. Visit \
                 https://platform.openai.com/account/rate-limits to learn more.",
                go_duration(wait)
            ),
        );
        let ms = (wait.as_secs_f64() * 1000.0).ceil();
        e.headers.push(("retry-after-ms", format!("{ms}")));
        e.headers
            .push(("retry-after", format!("{}", (ms / 1000.0).ceil() as u64)));
        e
    }

    fn unparsable_body() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
            None,
            "We could not parse the JSON body of your request. (HINT: This likely means you aren't \
             using your HTTP library correctly. The OpenAI API expects a JSON payload, but what was \
             sent was not valid JSON. If you have trouble figuring out how to fix this, please \
             contact us through our help center at help.openai.com.)",
        )
    }

    fn incorrect_key(key: &str) -> Self {
        let shown: String = if key.chars().count() > 8 {
            let tail: String = key
                .chars()
                .rev()
                .take(4)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect();
            format!(
                "{}{}{tail}",
                key.chars().take(3).collect::<String>(),
                "*".repeat(8)
            )
        } else {
            "*".repeat(key.chars().count())
        };
        Self::new(
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            Some("invalid_api_key"),
            format!(
                "Incorrect API key provided: {shown}. You can find your API key at \
                 https://platform.openai.com/account/api-keys."
            ),
        )
    }

    fn from_fault(fault: &Fault, request: &Value, request_id: &str) -> Self {
        let model = request
            .get("model")
            .and_then(Value::as_str)
            .unwrap_or("gpt-image-2");
        match fault {
            Fault::RateLimited {
                retry_after_secs,
                retry_after_ms,
            } => {
                let wait = retry_after_ms
                    .map(|ms| ms / 1000.0)
                    .or(*retry_after_secs)
                    .unwrap_or(1.0);
                let mut e = Self::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    "requests",
                    Some("rate_limit_exceeded"),
                    format!(
                        "Rate limit reached for {model} in organization org-fake on requests per min \
                         (RPM): Limit 500, Used 500, Requested 1. Please try again in {wait:.3}s. Visit \
                         https://platform.openai.com/account/rate-limits to learn more."
                    ),
                );
                if let Some(secs) = retry_after_secs {
                    let secs = secs.max(0.0).ceil() as u64;
                    e.headers.push(("retry-after", secs.to_string()));
                }
                if let Some(ms) = retry_after_ms {
                    e.headers.push(("retry-after-ms", ms.max(0.0).to_string()));
                }
                e.headers
                    .push(("x-ratelimit-remaining-requests", "0".into()));
                e
            }
            Fault::ServerError { status } => {
                let status = StatusCode::from_u16(*status)
                    .ok()
                    .filter(|s| s.is_client_error() || s.is_server_error())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                if status == StatusCode::SERVICE_UNAVAILABLE {
                    Self::new(
                        status,
                        "server_error",
                        Some("server_is_overloaded"),
                        "The server is overloaded or not ready yet.",
                    )
                } else {
                    Self::new(
                        status,
                        "server_error",
                        Some("server_error"),
                        format!(
                            "The server had an error while processing your request. Sorry about that! \
                             You can retry your request, or contact us through our help center at \
                             help.openai.com if the error persists. (Please include the request ID \
                             {request_id} in your message.)"
                        ),
                    )
                }
            }
            Fault::Moderation => {
                let mut e = Self::new(
                    StatusCode::BAD_REQUEST,
                    "image_generation_user_error",
                    Some("moderation_blocked"),
                    format!(
                        "Your request was rejected by the safety system. If you believe this is an \
                         error, contact us at help.openai.com and include the request ID {request_id}."
                    ),
                );
                e.moderation_blocked = true;
                e
            }
            Fault::ContentPolicy => Self::new(
                StatusCode::BAD_REQUEST,
                "invalid_request_error",
                Some("content_policy_violation"),
                "Your request was rejected as a result of our safety system. Your prompt may contain \
                 text that is not allowed by our safety system.",
            ),
            Fault::InvalidRequest { param } => {
                let message = match param {
                    Some(p) => format!("Invalid value for '{p}'."),
                    None => "Invalid request.".to_owned(),
                };
                let mut e = Self::invalid(param.as_deref(), "invalid_value", message);
                if param.is_none() {
                    e.code = None;
                }
                e
            }
            Fault::ModelNotFound => Self::new(
                StatusCode::NOT_FOUND,
                "invalid_request_error",
                Some("model_not_found"),
                format!("The model '{model}' does not exist or you do not have access to it."),
            ),
            Fault::QuotaExhausted => Self::new(
                StatusCode::TOO_MANY_REQUESTS,
                "insufficient_quota",
                Some("insufficient_quota"),
                "You exceeded your current quota, please check your plan and billing details. For \
                 more information on this error, read the docs: \
                 https://platform.openai.com/docs/guides/error-codes/api-errors.",
            ),
            Fault::Unauthorized => Self::incorrect_key("sk-fake-revoked-key"),
            Fault::Forbidden => Self::new(
                StatusCode::FORBIDDEN,
                "invalid_request_error",
                None,
                format!(
                    "Your organization must be verified to use the model `{model}`. Please go to: \
                     https://platform.openai.com/settings/organization/general and click on Verify \
                     Organization. If you just verified, it can take up to 15 minutes for access to \
                     propagate."
                ),
            ),
            // Handled before errors are built; kept total for safety.
            Fault::Hang { .. } | Fault::Reset => Self::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "server_error",
                Some("server_error"),
                "The server had an error while processing your request.",
            ),
        }
    }

    fn body(&self) -> Value {
        let mut error = json!({
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        });
        if self.moderation_blocked {
            error["moderation_details"] = json!({ "categories": ["violence"] });
        }
        json!({ "error": error })
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body())).into_response()
    }
}

/// A valid 64x64 PNG padded to about the wanted size, with room for a per-image `tEXt` chunk.
///
/// Layout: signature + IHDR | tEXt | padding chunk (random bytes) + IDAT + IEND. The head is
/// 33 bytes and the tEXt chunk is padded to a multiple of 3 bytes, so the base64 of the fixed tail
/// is computed once and appended.
struct PngTemplate {
    head: Vec<u8>,
    tail_b64: String,
}

/// Bytes reserved for the per-image tEXt chunk when sizing the padding.
const TEXT_ESTIMATE: usize = 96;

impl PngTemplate {
    fn new(target_bytes: usize) -> Self {
        let (w, h) = (64u32, 64u32);
        let pixels: Vec<u8> = (0..w * h)
            .flat_map(|i| {
                let (x, y) = (i % w, i / w);
                [(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8]
            })
            .collect();
        let mut encoded = Vec::new();
        let mut encoder = png::Encoder::new(&mut encoded, w, h);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder
            .write_header()
            .and_then(|mut writer| {
                writer
                    .write_image_data(&pixels)
                    .and_then(|()| writer.finish())
            })
            .expect("encoding a small in-memory PNG cannot fail");
        const HEAD: usize = 8 + 25; // signature + IHDR chunk
        let mut tail = Vec::new();
        let pad = target_bytes.saturating_sub(encoded.len() + 12 + TEXT_ESTIMATE);
        if pad > 0 {
            let mut noise = vec![0u8; pad];
            fastrand::fill(&mut noise);
            // Ancillary, private, safe-to-copy: decoders skip it.
            push_chunk(&mut tail, b"fkPd", &noise);
        }
        tail.extend_from_slice(&encoded[HEAD..]);
        Self {
            head: encoded[..HEAD].to_vec(),
            tail_b64: BASE64.encode_to_string(tail),
        }
    }

    /// Length of [`Self::write_b64`]'s output, give or take the text.
    fn b64_len(&self) -> usize {
        self.tail_b64.len() + 400
    }

    /// Appends the base64 of the template with a `tEXt` "Comment" chunk holding `text`
    /// (non-ASCII becomes '?').
    fn write_b64(&self, text: &str, out: &mut String) {
        let mut data = b"Comment\0".to_vec();
        data.extend(text.chars().take(240).map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c as u8
            } else {
                b'?'
            }
        }));
        while !data.len().is_multiple_of(3) {
            data.push(b' ');
        }
        let mut head = self.head.clone();
        push_chunk(&mut head, b"tEXt", &data);
        debug_assert_eq!(
            head.len() % 3,
            0,
            "base64 pieces must split on 3-byte boundaries"
        );
        BASE64.encode_append(head, out);
        out.push_str(&self.tail_b64);
    }
}

fn push_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    out.extend_from_slice(&crc32(&[kind, data]).to_be_bytes());
}

const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut n = 0;
    while n < 256 {
        let mut c = n as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        table[n] = c;
        n += 1;
    }
    table
};

/// CRC-32 as PNG chunks use it (ISO 3309), over the concatenation of `parts`.
fn crc32(parts: &[&[u8]]) -> u32 {
    let mut c = !0u32;
    for part in parts {
        for &b in *part {
            c = CRC_TABLE[((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
    }
    !c
}

/// A TCP listener whose connections a handler can reset (for [`Fault::Reset`]).
struct ResettableListener(TcpListener);

struct ResettableStream {
    io: TcpStream,
    reset: Arc<AtomicBool>,
}

/// Connect info given to handlers: set it to reset the request's connection.
#[derive(Clone)]
struct ResetHandle(Arc<AtomicBool>);

impl Listener for ResettableListener {
    type Io = ResettableStream;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        let (io, addr) = Listener::accept(&mut self.0).await;
        (
            ResettableStream {
                io,
                reset: Arc::default(),
            },
            addr,
        )
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.0.local_addr()
    }
}

impl Connected<IncomingStream<'_, ResettableListener>> for ResetHandle {
    fn connect_info(stream: IncomingStream<'_, ResettableListener>) -> Self {
        Self(stream.io().reset.clone())
    }
}

impl ResettableStream {
    /// Once reset is requested every I/O call fails; with SO_LINGER 0 the close sends an RST.
    fn check(&self) -> std::io::Result<()> {
        if self.reset.load(Ordering::Acquire) {
            let _ = self.io.set_zero_linger();
            return Err(std::io::ErrorKind::ConnectionReset.into());
        }
        Ok(())
    }
}

impl AsyncRead for ResettableStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for ResettableStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        this.check()?;
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
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
        let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("valid PNG header");
        let mut buf = vec![0; reader.output_buffer_size()];
        let info = reader.next_frame(&mut buf).expect("valid PNG data");
        (info.width, info.height)
    }

    #[tokio::test]
    async fn success_returns_n_distinct_valid_pngs() {
        let opts = FakeOptions {
            image_bytes: 20_000,
            ..FakeOptions::default()
        };
        let server = FakeApi::new(opts).start().await.unwrap();
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
        let opts = FakeOptions {
            image_bytes: 5_000,
            ..FakeOptions::default()
        };
        let server = FakeApi::new(opts).start().await.unwrap();
        let body =
            json!({"model": "dall-e-2", "prompt": "a kite", "n": 2, "response_format": "url"});
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
        let opts = FakeOptions {
            requests_per_minute: Some(3),
            ..FakeOptions::default()
        };
        let server = FakeApi::new(opts).start().await.unwrap();
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
        let reset =
            crate::throttle::parse_go_duration(header(&refused, "x-ratelimit-reset-requests"))
                .unwrap();
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
        assert_eq!(
            generate(&server, json!({"prompt": "busy day"}))
                .await
                .status(),
            200
        );
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
        let opts = FakeOptions {
            api_key: Some("sk-right-key-1234".into()),
            ..FakeOptions::default()
        };
        let server = FakeApi::new(opts).start().await.unwrap();
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
            generate(
                &server,
                json!({"prompt": "p", "model": "dall-e-3", "response_format": "b64_json"})
            )
            .await
            .status(),
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
        assert_eq!(
            generate(&server, json!({"prompt": "doomed"}))
                .await
                .status(),
            200
        );
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

    #[tokio::test]
    async fn admin_endpoints_drive_the_fake() {
        let server = FakeApi::new(FakeOptions::default()).start().await.unwrap();
        let admin = |path: &str| format!("http://{}/_fake/{path}", server.addr);
        let http = client();
        let r = rule(None, Fault::ServerError { status: 500 }, None);
        let resp = http.post(admin("rules")).json(&r).send().await.unwrap();
        assert_eq!(resp.status(), 204);
        assert_eq!(
            generate(&server, json!({"prompt": "x"})).await.status(),
            500
        );
        assert_eq!(
            generate(&server, json!({"prompt": "x"})).await.status(),
            500
        );
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
        assert_eq!(
            generate(&server, json!({"prompt": "x"})).await.status(),
            200
        );
        assert!(started.elapsed() >= Duration::from_millis(150));

        let stats: Stats = http
            .get(admin("stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!((stats.requests, stats.billed, stats.images), (3, 1, 1));
        assert_eq!(stats.errors_by_status, BTreeMap::from([(500, 2)]));
        let calls: Value = http
            .get(admin("calls?prompt_contains=x"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(calls, json!({"calls": 3, "billed": 1}));

        let missing = http
            .post(format!("{}/images/edits", server.base_url()))
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

    #[test]
    fn crc_matches_the_png_reference_value() {
        assert_eq!(crc32(&[b"IEND"]), 0xAE42_6082);
        assert_eq!(crc32(&[b"123456789"]), 0xCBF4_3926);
    }
}

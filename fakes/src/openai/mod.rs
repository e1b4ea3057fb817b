//! A fake of the OpenAI Images API (`POST /v1/images/generations`).
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
//! - `GET /v1/models/{model}` answers the model to a client with a valid key, as the API does;
//! - `POST /_fake/latency` with `{"ms": 500}` sets the latency added before every response (the
//!   standalone server also takes a seeded jitter and a tick: [`crate::latency::Schedule`]);
//! - `POST /_fake/limits` with `{"requests_per_minute": 300, "tokens_per_minute": null}` sets the
//!   account's rate limits (`null`: unlimited);
//! - `POST /_fake/batch` with any of `{"validating_ms", "per_line_ms", "parallel",
//!   "finalizing_ms", "cancelling_ms", "window_ms", "max_input_file_bytes", "max_lines", "hold",
//!   "fail_next", "expire_next", "hang_next_uploads", "hang_next_creates", "slow_content_ms"}`
//!   sets the batch clock ([`BatchOptions`]) and misbehaviours (the two hangs take
//!   `{"n": 1, "ms": 2000}`: [`FakeApi::hang_next_uploads`], [`FakeApi::hang_next_creates`];
//!   [`FakeApi::slow_content`]); `GET /_fake/batches` returns every batch object, oldest first
//!   (no key needed).
//!
//! The Files and Batch APIs (`/v1/files`, `/v1/batches`) run queued image requests as the
//! provider's half-price lane does, on a clock a test sets ([`BatchOptions`]): see [`files`] and
//! [`batch`]. Each batch line is answered as the live endpoint would answer it, and billed the
//! same way (`billed_for`); [`BatchStats`] counts files, batches and lines.
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

mod admin;
pub mod batch;
pub mod edits;
mod errors;
pub mod files;
mod generate;
mod limits;
#[cfg(test)]
mod tests;
mod validate;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};
use tokio::net::TcpListener;

use crate::latency::Schedule;
use crate::png::PngTemplate;
pub(crate) use crate::rules::lock;
pub use batch::{BatchOptions, BatchStats};
use limits::AccountLimits;

/// How the fake behaves when no [`Rule`] applies.
#[derive(Clone, Debug)]
pub struct FakeOptions {
    /// Added before every response, success or error: the mean latency (see `jitter`, `tick`).
    pub latency: Duration,
    /// Each call's latency is drawn from `latency ± jitter`, by the seed and the call's number
    /// ([`Schedule`]): the same run, the same latencies.
    pub jitter: Duration,
    pub seed: u64,
    /// Answers are held until the next multiple of this after their latency, counted from the
    /// first call: a wave of calls is answered at one moment.
    pub tick: Option<Duration>,
    /// Approximate size in bytes of each generated PNG.
    pub image_bytes: usize,
    /// Width and height of each generated PNG, in pixels.
    pub image_side: u32,
    /// `None`: any non-empty Bearer token is accepted; `Some(k)`: only `k`, else 401.
    pub api_key: Option<String>,
    /// The account's requests per minute; `None`: unlimited.
    pub requests_per_minute: Option<u64>,
    /// The account's tokens per minute (a request costs its reported usage); `None`: unlimited.
    pub tokens_per_minute: Option<u64>,
    /// The Batch API's clock and limits (batches have their own rate-limit pool).
    pub batch: BatchOptions,
}

impl Default for FakeOptions {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            jitter: Duration::ZERO,
            seed: 0,
            tick: None,
            image_bytes: 2048,
            image_side: 64,
            api_key: None,
            requests_per_minute: None,
            tokens_per_minute: None,
            batch: BatchOptions::default(),
        }
    }
}

/// A fault injected into the next matching requests.
pub type Rule = crate::rules::Rule<Fault>;

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
    /// A 200 answer, billed, whose `b64_json` holds no image but an HTML error page (what a
    /// broken gateway or a provider bug hands back).
    NotAnImage,
}

/// Counters since the fake was created. All but `batch` count live calls only; a batch's lines
/// are counted in `batch` (and, like live calls, in the per-prompt counts).
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
    /// The Files and Batch APIs.
    #[serde(default)]
    pub batch: BatchStats,
    /// When the first call arrived (the origin of the ticks), in Unix milliseconds.
    #[serde(default)]
    pub first_call_unix_ms: Option<u64>,
}

/// How many images given out by URL stay downloadable.
pub const FILES_KEPT: usize = 256;

/// A handle on the fake's state; clones share it.
#[derive(Clone)]
pub struct FakeApi {
    inner: Arc<Inner>,
}

struct Inner {
    api_key: Option<String>,
    latency: Mutex<Schedule>,
    /// When the first call arrived: the origin of the schedule's ticks.
    first_call: std::sync::OnceLock<std::time::Instant>,
    rules: crate::rules::Rules<Fault>,
    counters: Mutex<Counters>,
    seq: AtomicU64,
    png: PngTemplate,
    limits: Mutex<AccountLimits>,
    /// Images given out by URL, oldest first.
    files: Mutex<VecDeque<(String, Bytes)>>,
    /// The next this many downloads of such images answer 503.
    failing_files: AtomicU64,
    /// What each edit request carried, in order (batch lines of JSON edits too).
    edits: Mutex<Vec<edits::EditSeen>>,
    /// Files uploaded through `/v1/files`, and the batches' output files.
    uploads: Mutex<files::FileStore>,
    batches: Mutex<batch::BatchStore>,
    batch_control: batch::Control,
}

#[derive(Default)]
struct Counters {
    stats: Stats,
    /// prompt -> (requests, billed)
    per_prompt: HashMap<String, (u64, u64)>,
}

/// A running in-process fake; the server task is aborted on drop.
pub type FakeServer = crate::Running<FakeApi>;

impl crate::Running<FakeApi> {
    /// The base URL a client appends `/images/generations` to: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// Serves the fake on `listener` until the task is dropped. Unlike serving [`FakeApi::router`]
/// directly, connections can be reset, so [`Fault::Reset`] is a real TCP reset.
pub async fn serve(listener: TcpListener, api: FakeApi) -> std::io::Result<()> {
    crate::net::serve(listener, api.router()).await
}

impl FakeApi {
    pub fn new(opts: FakeOptions) -> Self {
        let inner = Inner {
            api_key: opts.api_key,
            latency: Mutex::new(Schedule {
                base: opts.latency,
                jitter: opts.jitter,
                seed: opts.seed,
                tick: opts.tick,
            }),
            first_call: std::sync::OnceLock::new(),
            rules: crate::rules::Rules::default(),
            counters: Mutex::default(),
            seq: AtomicU64::new(0),
            png: PngTemplate::sized(opts.image_bytes, opts.image_side),
            files: Mutex::default(),
            failing_files: AtomicU64::new(0),
            edits: Mutex::default(),
            uploads: Mutex::default(),
            batches: Mutex::default(),
            batch_control: batch::Control::new(opts.batch),
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
        let router = self.router();
        crate::Running::start(self, router, "fake image API").await
    }

    /// The routes. Prefer [`serve`]: served any other way, [`Fault::Reset`] degrades to a
    /// response body that fails before anything is written, so hyper closes the connection
    /// (cleanly, not with an RST) and the client sees an incomplete message without a status.
    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/images/generations", post(generate::generations))
            .route("/v1/images/edits", post(edits::edits))
            .route(
                "/v1/files",
                post(files::upload)
                    .get(files::list)
                    // Batch input files reach 200 MB: the handler enforces its own limits.
                    .layer(DefaultBodyLimit::disable()),
            )
            .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
            .route("/v1/files/{id}/content", get(files::content))
            .route("/v1/batches", post(batch::create).get(batch::list))
            .route("/v1/batches/{id}", get(batch::retrieve))
            .route("/v1/batches/{id}/cancel", post(batch::cancel))
            .route(
                "/_fake/rules",
                post(admin::push_rule).delete(admin::clear_rules),
            )
            .route("/_fake/stats", get(admin::stats))
            .route("/_fake/calls", get(admin::calls))
            .route("/_fake/latency", post(admin::latency))
            .route("/_fake/limits", post(admin::limits))
            .route("/_fake/batch", post(admin::batch))
            .route("/_fake/batches", get(admin::batches))
            .route("/_fake/files/{name}", get(admin::file))
            .route("/v1/models/{model}", get(admin::model))
            .fallback(admin::unknown_url)
            .with_state(self.clone())
    }

    pub fn push_rule(&self, rule: Rule) {
        self.inner.rules.push(rule);
    }

    /// Answers a `POST /v1/images/generations` as this fake does: for a host that speaks the
    /// same protocol at its own URLs, with its own checks first (Azure OpenAI).
    pub(crate) async fn generations(
        &self,
        conn: Option<axum::Extension<axum::extract::ConnectInfo<crate::net::ResetHandle>>>,
        headers: axum::http::HeaderMap,
        body: Bytes,
    ) -> axum::response::Response {
        generate::generations(axum::extract::State(self.clone()), conn, headers, body).await
    }

    pub fn clear_rules(&self) {
        self.inner.rules.clear();
    }

    /// A constant latency from now on.
    pub fn set_latency(&self, d: Duration) {
        *lock(&self.inner.latency) = Schedule::constant(d);
    }

    /// The latencies of the calls from now on.
    pub fn set_schedule(&self, schedule: Schedule) {
        *lock(&self.inner.latency) = schedule;
    }

    /// How long the `n`-th call (from 0), arriving now, waits before its answer.
    fn delay_of(&self, n: u64) -> Duration {
        let first = *self.inner.first_call.get_or_init(std::time::Instant::now);
        let arrival = first.elapsed();
        lock(&self.inner.latency).answer_at(n, arrival) - arrival
    }

    /// Sets the account's rate limits (`None`: unlimited), with full buckets.
    pub fn set_limits(&self, requests_per_minute: Option<u64>, tokens_per_minute: Option<u64>) {
        *lock(&self.inner.limits) = AccountLimits::new(requests_per_minute, tokens_per_minute);
    }

    /// The next `n` downloads of images given out by URL answer 503 (a storage hiccup).
    pub fn fail_file_downloads(&self, n: u64) {
        self.inner
            .failing_files
            .store(n, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn stats(&self) -> Stats {
        let mut stats = lock(&self.inner.counters).stats.clone();
        stats.first_call_unix_ms = self.inner.first_call.get().map(|first| {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            now.saturating_sub(first.elapsed()).as_millis() as u64
        });
        stats
    }

    /// What each edit request (`/v1/images/edits`) carried, in order.
    pub fn edits(&self) -> Vec<edits::EditSeen> {
        lock(&self.inner.edits).clone()
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
        self.inner.rules.take(prompt)
    }
}

//! A fake of the Gemini API's image generation: `POST /v1beta/models/MODEL:generateContent`.
//!
//! Written from the API's documentation: the key in `x-goog-api-key` (or `?key=`), a missing key
//! answered 403 `PERMISSION_DENIED` and a wrong one 400 `INVALID_ARGUMENT` with an `ErrorInfo`
//! of reason `API_KEY_INVALID`; unknown request fields refused as the API's proto parser does;
//! `generationConfig.imageConfig.aspectRatio` and `imageSize` checked against the documented
//! lists; one image per answer as an `inlineData` part (camelCase, as the REST API writes it)
//! beside a text part, with `usageMetadata` counting the image as 1290 output tokens.
//!
//! Misbehaviour on demand ([`Fault`]): refusals that arrive as HTTP 200 (a `blockReason`, or a
//! refusing `finishReason`), a text-only answer, `RESOURCE_EXHAUSTED` per minute (with
//! `QuotaFailure` and `RetryInfo` details) or per day, 500/503/504, a hang, a connection reset
//! after the work was billed. The account's requests per minute and per day are enforced the
//! same way. The API sends no rate-limit headers; its 429 bodies are the only signal.
//!
//! Admin endpoints, as the OpenAI fake's: `POST/DELETE /_fake/rules`, `GET /_fake/stats`,
//! `GET /_fake/calls?prompt_contains=X`.

mod generate;
#[cfg(test)]
mod tests;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::bucket::TokenBucket;
use crate::png::PngTemplate;
use crate::rules::{Ledger, Rules, Stats, lock};

/// A fault injected into the next matching requests.
pub type Rule = crate::rules::Rule<Fault>;

/// How the fake behaves when no [`Rule`] applies.
#[derive(Clone, Debug)]
pub struct GeminiOptions {
    /// Added before every answer.
    pub latency: Duration,
    /// Approximate size in bytes of each generated PNG.
    pub image_bytes: usize,
    /// `None`: any non-empty key is accepted; `Some(k)`: only `k`.
    pub api_key: Option<String>,
    /// The project's requests per minute for the model; `None`: unlimited.
    pub requests_per_minute: Option<u64>,
    /// The project's requests per day; `None`: unlimited.
    pub requests_per_day: Option<u64>,
}

impl Default for GeminiOptions {
    fn default() -> Self {
        Self {
            latency: Duration::ZERO,
            image_bytes: 2048,
            api_key: None,
            requests_per_minute: None,
            requests_per_day: None,
        }
    }
}

/// What a matching request gets instead of a normal answer.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// 429 `RESOURCE_EXHAUSTED` of the per-minute quota, with a `RetryInfo` of this delay.
    RateLimited { retry_delay_secs: f64 },
    /// 429 `RESOURCE_EXHAUSTED` of the per-day quota (its `RetryInfo` says 36 s all the same).
    DailyQuota,
    /// 500 `INTERNAL`, 503 `UNAVAILABLE` or 504 `DEADLINE_EXCEEDED`.
    ServerError { status: u16 },
    /// 200 with `promptFeedback.blockReason` and no candidate; billed (the prompt was read).
    BlockedPrompt { reason: String },
    /// 200 with a candidate whose `finishReason` refuses (`IMAGE_SAFETY`, `NO_IMAGE`) and no
    /// image; billed.
    RefusedImage { reason: String },
    /// 200 with a text part and no image, `finishReason` `STOP`; billed.
    TextOnly,
    /// Wait this long, then answer normally (billed even if the client left).
    Hang { secs: f64 },
    /// Make the image (billed), then reset the connection instead of answering.
    ResetAfterBilling,
}

/// A handle on the fake's state; clones share it.
#[derive(Clone)]
pub struct GeminiFake {
    inner: Arc<Inner>,
}

struct Inner {
    api_key: Option<String>,
    latency: Mutex<Duration>,
    rules: Rules<Fault>,
    ledger: Ledger,
    seq: AtomicU64,
    png: PngTemplate,
    per_minute: Mutex<Option<TokenBucket>>,
    per_day: Option<u64>,
    /// Requests counted against the per-day quota.
    today: AtomicU64,
    /// The [`crate::digest`] of each request's input images (`inline_data` parts), in order.
    inputs: Mutex<Vec<Vec<String>>>,
}

/// A running in-process fake; the server task is aborted on drop.
pub type GeminiServer = crate::Running<GeminiFake>;

impl crate::Running<GeminiFake> {
    /// The base URL of the API version: `http://127.0.0.1:PORT/v1beta`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1beta", self.addr)
    }
}

impl GeminiFake {
    pub fn new(opts: GeminiOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                api_key: opts.api_key,
                latency: Mutex::new(opts.latency),
                rules: Rules::default(),
                ledger: Ledger::default(),
                seq: AtomicU64::new(0),
                png: PngTemplate::new(opts.image_bytes),
                per_minute: Mutex::new(opts.requests_per_minute.map(TokenBucket::per_minute)),
                per_day: opts.requests_per_day,
                today: AtomicU64::new(0),
                inputs: Mutex::default(),
            }),
        }
    }

    /// Binds `127.0.0.1:0` and serves in a background task.
    pub async fn start(self) -> std::io::Result<GeminiServer> {
        let router = self.router();
        crate::Running::start(self, router, "fake Gemini API").await
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/v1beta/models/{call}",
                post(generate::generate_content).get(generate::get_model),
            )
            .route(
                "/_fake/rules",
                post(push_rule).delete(|State(api): State<GeminiFake>| async move {
                    api.clear_rules();
                    StatusCode::NO_CONTENT
                }),
            )
            .route(
                "/_fake/stats",
                get(|State(api): State<GeminiFake>| async move { Json(api.stats()) }),
            )
            .route("/_fake/calls", get(calls))
            .fallback(generate::not_found)
            .with_state(self.clone())
    }

    pub fn push_rule(&self, rule: Rule) {
        self.inner.rules.push(rule);
    }

    pub fn clear_rules(&self) {
        self.inner.rules.clear();
    }

    pub fn set_latency(&self, latency: Duration) {
        *lock(&self.inner.latency) = latency;
    }

    pub fn stats(&self) -> Stats {
        self.inner.ledger.stats()
    }

    /// The [`crate::digest`] of each request's input images, in order.
    pub fn inputs(&self) -> Vec<Vec<String>> {
        lock(&self.inner.inputs).clone()
    }

    /// Requests received whose prompt contains `needle`.
    pub fn calls_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).0
    }

    /// Requests billed whose prompt contains `needle`.
    pub fn billed_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).1
    }
}

/// Serves the fake on `listener`, with connections that a fault can reset.
pub async fn serve(listener: TcpListener, api: GeminiFake) -> std::io::Result<()> {
    crate::net::serve(listener, api.router()).await
}

async fn push_rule(State(api): State<GeminiFake>, Json(rule): Json<Rule>) -> StatusCode {
    api.push_rule(rule);
    StatusCode::NO_CONTENT
}

#[derive(serde::Deserialize)]
struct CallsQuery {
    #[serde(default)]
    prompt_contains: String,
}

async fn calls(State(api): State<GeminiFake>, Query(q): Query<CallsQuery>) -> Json<Value> {
    let (calls, billed) = api.inner.ledger.per_prompt(&q.prompt_contains);
    Json(json!({ "calls": calls, "billed": billed }))
}

//! A fake of the Black Forest Labs API (FLUX): submit, then poll.
//!
//! Written from BFL's documentation: `GET /v1/credits` answers the account's credits; `POST /v1/{model}` with the key in `x-key` answers
//! `{"id", "polling_url"}`; `GET` of the polling URL (with `x-key`) answers `{"id", "status",
//! "result", "progress"}` with `status` one of `Pending`, `Ready` (then `result.sample` is a
//! signed URL that expires after ten minutes), `Request Moderated`, `Content Moderated`,
//! `Error` or `Task not found`. At most `max_active` tasks of the account are pending at once: a
//! submit above it is refused with 429 and not billed; 402 when the credits are gone; request
//! errors are FastAPI's 422 `{"detail": [...]}`.
//!
//! A task is billed when its submit is accepted, and made in `generation` time. Misbehaviour on
//! demand ([`Fault`]): moderation either way, a task that errors or never completes, a sample
//! that has expired, a submit refused over the cap or for credits, a 503, and a submit whose
//! answer is lost after the task was accepted (the window in which a client can pay twice).
//!
//! Admin endpoints, as the other fakes': `POST/DELETE /_fake/rules`, `GET /_fake/stats`,
//! `GET /_fake/calls?prompt_contains=X` (calls are submits), `GET /_fake/tasks` (`{"active",
//! "polls"}`).

mod api;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::png::PngTemplate;
use crate::rules::{Ledger, Rules, Stats, lock};

/// A fault injected into the next matching submits.
pub type Rule = crate::rules::Rule<Fault>;

/// How the fake behaves when no [`Rule`] applies.
#[derive(Clone, Debug)]
pub struct BflOptions {
    /// How long a task takes to make its image.
    pub generation: Duration,
    /// Added before every answer to a submit.
    pub latency: Duration,
    /// Approximate size in bytes of each generated PNG.
    pub image_bytes: usize,
    /// `None`: any non-empty key; `Some(k)`: only `k`.
    pub api_key: Option<String>,
    /// Tasks of the account pending at once; a submit above it is answered 429.
    pub max_active: usize,
    /// How long a sample URL stays valid.
    pub sample_ttl: Duration,
}

impl Default for BflOptions {
    fn default() -> Self {
        Self {
            generation: Duration::from_millis(300),
            latency: Duration::ZERO,
            image_bytes: 2048,
            api_key: None,
            max_active: 24,
            sample_ttl: Duration::from_secs(600),
        }
    }
}

/// What a matching submit gets instead of the normal course.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// 429: over the account's active-task cap (not billed).
    TooManyActive,
    /// 402: out of credits (not billed).
    NoCredits,
    /// 503 at submit (not billed).
    Unavailable,
    /// Accepted and billed; its poll says `Request Moderated`.
    RequestModerated,
    /// Accepted and billed; made, then its poll says `Content Moderated`.
    ContentModerated,
    /// Accepted and billed; its poll says `Error`.
    TaskError,
    /// Accepted and billed; its poll says `Pending` forever.
    NeverCompletes,
    /// Accepted and billed; its sample URL has expired by the time it is Ready.
    SampleExpired,
    /// Accepted and billed, then the connection is reset instead of the answer.
    ResetAfterSubmit,
}

/// What happens to a task.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Normal,
    RequestModerated,
    ContentModerated,
    Error,
    NeverCompletes,
    SampleExpired,
}

struct Task {
    prompt: String,
    seed: u64,
    width: u32,
    height: u32,
    output_format: String,
    ready_at: Instant,
    fate: Fate,
    /// The image, made when the task is first seen Ready.
    sample: Option<(axum::body::Bytes, Instant)>,
}

/// A handle on the fake's state; clones share it.
#[derive(Clone)]
pub struct BflFake {
    inner: Arc<Inner>,
}

struct Inner {
    opts: BflOptions,
    rules: Rules<Fault>,
    ledger: Ledger,
    seq: AtomicU64,
    polls: AtomicU64,
    png: PngTemplate,
    tasks: Mutex<HashMap<String, Task>>,
    /// The reference images of each accepted task, in order ([`crate::digest`]s).
    inputs: Mutex<Vec<Vec<String>>>,
}

/// A running in-process fake; the server task is aborted on drop.
pub type BflServer = crate::Running<BflFake>;

impl crate::Running<BflFake> {
    /// The API's base URL: `http://127.0.0.1:PORT/v1`.
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

impl BflFake {
    pub fn new(opts: BflOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                png: PngTemplate::new(opts.image_bytes),
                opts,
                rules: Rules::default(),
                ledger: Ledger::default(),
                seq: AtomicU64::new(0),
                polls: AtomicU64::new(0),
                tasks: Mutex::default(),
                inputs: Mutex::default(),
            }),
        }
    }

    /// Binds `127.0.0.1:0` and serves in a background task.
    pub async fn start(self) -> std::io::Result<BflServer> {
        let router = self.router();
        crate::Running::start(self, router, "fake BFL API").await
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/v1/get_result", get(api::get_result))
            .route("/v1/credits", get(api::credits))
            .route("/v1/{model}", post(api::submit))
            .route("/_fake/samples/{name}", get(api::sample))
            .route(
                "/_fake/rules",
                post(
                    |State(api): State<BflFake>, Json(rule): Json<Rule>| async move {
                        api.push_rule(rule);
                        StatusCode::NO_CONTENT
                    },
                )
                .delete(|State(api): State<BflFake>| async move {
                    api.clear_rules();
                    StatusCode::NO_CONTENT
                }),
            )
            .route(
                "/_fake/stats",
                get(|State(api): State<BflFake>| async move { Json(api.stats()) }),
            )
            .route("/_fake/calls", get(calls))
            .route(
                "/_fake/tasks",
                get(|State(api): State<BflFake>| async move {
                    Json(json!({"active": api.active(), "polls": api.polls()}))
                }),
            )
            .fallback(api::not_found)
            .with_state(self.clone())
    }

    pub fn push_rule(&self, rule: Rule) {
        self.inner.rules.push(rule);
    }

    pub fn clear_rules(&self) {
        self.inner.rules.clear();
    }

    /// Requests counted: `requests` are submits, `billed` accepted tasks.
    pub fn stats(&self) -> Stats {
        self.inner.ledger.stats()
    }

    /// Submits whose prompt contains `needle`.
    pub fn calls_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).0
    }

    /// Accepted (billed) tasks whose prompt contains `needle`.
    pub fn billed_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).1
    }

    /// The reference images of each accepted task (`input_image`..`input_image_8`), in order.
    pub fn inputs(&self) -> Vec<Vec<String>> {
        lock(&self.inner.inputs).clone()
    }

    /// Tasks pending now (they count against the active-task cap).
    pub fn active(&self) -> usize {
        let now = Instant::now();
        lock(&self.inner.tasks)
            .values()
            .filter(|t| match t.fate {
                Fate::NeverCompletes => true,
                Fate::RequestModerated => false,
                _ => t.ready_at > now,
            })
            .count()
    }

    /// Polls answered so far.
    pub fn polls(&self) -> u64 {
        self.inner.polls.load(Ordering::Relaxed)
    }
}

/// Serves the fake on `listener`, with connections that a fault can reset.
pub async fn serve(listener: TcpListener, api: BflFake) -> std::io::Result<()> {
    crate::net::serve(listener, api.router()).await
}

#[derive(serde::Deserialize)]
struct CallsQuery {
    #[serde(default)]
    prompt_contains: String,
}

async fn calls(State(api): State<BflFake>, Query(q): Query<CallsQuery>) -> Json<Value> {
    let (calls, billed) = api.inner.ledger.per_prompt(&q.prompt_contains);
    Json(json!({ "calls": calls, "billed": billed }))
}

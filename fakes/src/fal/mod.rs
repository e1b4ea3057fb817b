//! A fake of fal's queue.
//!
//! Written from fal's queue documentation:
//! - `POST /{owner}/{app}[/{path}]` with `Authorization: Key KEY` and the model's input as JSON
//!   answers `{"request_id", "response_url", "status_url", "cancel_url", "queue_position"}`.
//! - `GET {status_url}` answers 202 `{"status": "IN_QUEUE", "queue_position"}` or 202
//!   `{"status": "IN_PROGRESS"}` until done, then 200 `{"status": "COMPLETED"}`.
//! - `GET {response_url}` answers the result, `{"images": [{"url", "content_type", "width",
//!   "height"}], "seed", "has_nsfw_concepts", "timings", "prompt"}`, or the request's error.
//! - `PUT {cancel_url}` answers 202 `{"status": "CANCELLATION_REQUESTED"}` (400 once done).
//! - fal retries some failures on its own unless the submit says `x-fal-no-retry: 1`: a request
//!   that fails here without it is run (and billed) a second time.
//! - Errors are FastAPI's `{"detail": ...}`: 401, 403 `User is locked. Reason: Exhausted
//!   balance.`, 422 with field errors, 429.
//!
//! Admin: `GET /_fake/stats`, `GET /_fake/calls?prompt_contains=X` (calls are submits).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Extension, Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::net::ResetHandle;
use crate::png::PngTemplate;
use crate::rules::{Ledger, Rules, Stats, lock};

/// A fault injected into the next matching submits.
pub type Rule = crate::rules::Rule<Fault>;

/// What a matching submit gets instead of the normal course.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// 429 at submit (not billed).
    RateLimited,
    /// 403, the account locked for its balance (not billed).
    Locked,
    /// 503 at submit (not billed).
    Unavailable,
    /// Runs, billed; the safety checker flags the image (`has_nsfw_concepts: [true]`).
    Nsfw,
    /// Runs, billed, and fails (500 at the response URL). Without `x-fal-no-retry`, fal runs it
    /// again on its own, billed again, and that run succeeds.
    Fails,
    /// Stays in the queue for ever (until canceled).
    NeverCompletes,
    /// Accepted and billed, then the connection is reset instead of the answer.
    ResetAfterSubmit,
}

/// How the fake behaves when no [`Rule`] applies.
#[derive(Clone, Debug)]
pub struct FalOptions {
    /// How long a request takes once submitted (queued for the first third).
    pub generation: Duration,
    pub image_bytes: usize,
    /// `None`: any non-empty key; `Some(k)`: only `k`.
    pub api_key: Option<String>,
}

impl Default for FalOptions {
    fn default() -> Self {
        Self {
            generation: Duration::from_millis(300),
            image_bytes: 2048,
            api_key: None,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Normal,
    Nsfw,
    Fails,
    NeverCompletes,
}

struct Request {
    prompt: String,
    images: u32,
    width: u32,
    height: u32,
    seed: u64,
    submitted: Instant,
    fate: Fate,
    canceled: bool,
}

#[derive(Clone)]
pub struct FalFake {
    inner: Arc<Inner>,
}

struct Inner {
    opts: FalOptions,
    rules: Rules<Fault>,
    ledger: Ledger,
    /// Each accepted request's inline images, as `field=digest` ([`crate::digest`]).
    inputs: Mutex<Vec<Vec<String>>>,
    polls: AtomicU64,
    cancels: AtomicU64,
    /// Submits that came without `x-fal-no-retry`.
    retrying_submits: AtomicU64,
    png: PngTemplate,
    requests: Mutex<HashMap<String, Request>>,
}

pub type FalServer = crate::Running<FalFake>;

impl crate::Running<FalFake> {
    /// `https://queue.fal.run` in real life.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Serves the fake on `listener`, with connections that a fault can reset.
pub async fn serve(listener: TcpListener, api: FalFake) -> std::io::Result<()> {
    crate::net::serve(listener, api.router()).await
}

fn detail(status: StatusCode, detail: Value) -> Response {
    (status, Json(json!({ "detail": detail }))).into_response()
}

fn named_size(name: &str) -> Option<(u32, u32)> {
    Some(match name {
        "square_hd" => (1024, 1024),
        "square" => (512, 512),
        "portrait_4_3" => (768, 1024),
        "portrait_16_9" => (576, 1024),
        "landscape_4_3" => (1024, 768),
        "landscape_16_9" => (1024, 576),
        _ => return None,
    })
}

impl FalFake {
    pub fn new(opts: FalOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                png: PngTemplate::new(opts.image_bytes),
                opts,
                rules: Rules::default(),
                ledger: Ledger::default(),
                inputs: Mutex::default(),
                polls: AtomicU64::new(0),
                cancels: AtomicU64::new(0),
                retrying_submits: AtomicU64::new(0),
                requests: Mutex::default(),
            }),
        }
    }

    pub async fn start(self) -> std::io::Result<FalServer> {
        let router = self.router();
        crate::Running::start(self, router, "fake fal queue").await
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/_fake/stats",
                get(|State(f): State<FalFake>| async move { Json(f.stats()) }),
            )
            .route("/_fake/calls", get(calls))
            .route("/_fake/files/{id}/{n}", get(file))
            .route("/{owner}/{app}/requests/{id}/status", get(status))
            .route("/{owner}/{app}/requests/{id}/cancel", put(cancel))
            .route("/{owner}/{app}/requests/{id}", get(result))
            .route("/{owner}/{app}", post(submit))
            .route("/{owner}/{app}/{path}", post(submit_path))
            .with_state(self.clone())
    }

    pub fn push_rule(&self, rule: Rule) {
        self.inner.rules.push(rule);
    }

    /// `requests` are submits, `billed` runs (a run fal retried on its own counts twice).
    /// Each request's inline images (data URIs), as `field=digest` ([`crate::digest`]).
    pub fn inputs(&self) -> Vec<Vec<String>> {
        lock(&self.inner.inputs).clone()
    }

    pub fn stats(&self) -> Stats {
        self.inner.ledger.stats()
    }

    pub fn calls_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).0
    }

    pub fn billed_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).1
    }

    pub fn polls(&self) -> u64 {
        self.inner.polls.load(Ordering::Relaxed)
    }

    pub fn cancels(&self) -> u64 {
        self.inner.cancels.load(Ordering::Relaxed)
    }

    /// Submits that left fal free to retry on its own.
    pub fn retrying_submits(&self) -> u64 {
        self.inner.retrying_submits.load(Ordering::Relaxed)
    }

    fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        let key = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Key "))
            .filter(|k| !k.trim().is_empty());
        let ok = match (key, &self.inner.opts.api_key) {
            (None, _) => false,
            (Some(k), Some(want)) => k == want,
            (Some(_), None) => true,
        };
        (!ok).then(|| {
            detail(
                StatusCode::UNAUTHORIZED,
                json!("No user found for Key ID and Secret"),
            )
        })
    }

    async fn submit(
        &self,
        model: String,
        conn: Option<Extension<ConnectInfo<ResetHandle>>>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Response {
        if let Some(refused) = self.refusal(&headers) {
            return refused;
        }
        let Ok(input) = serde_json::from_slice::<Value>(&body) else {
            return detail(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!([{"loc": ["body"], "msg": "Expecting value", "type": "value_error.jsondecode"}]),
            );
        };
        let prompt = input
            .get("prompt")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let ledger = &self.inner.ledger;
        ledger.request(Some(&prompt));
        let refuse = |r: Response| {
            ledger.error(r.status().as_u16());
            r
        };
        if prompt.is_empty() {
            return refuse(detail(
                StatusCode::UNPROCESSABLE_ENTITY,
                json!([{"loc": ["body", "prompt"], "msg": "field required", "type": "value_error.missing"}]),
            ));
        }
        let inline = match crate::data_uri_images(&input) {
            Ok(images) => images,
            Err(field) => {
                return refuse(detail(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    json!([{"loc": ["body", field], "msg": "Invalid data URI", "type": "value_error"}]),
                ));
            }
        };
        lock(&self.inner.inputs).push(
            inline
                .iter()
                .map(|(field, bytes)| format!("{field}={}", crate::digest(bytes)))
                .collect(),
        );
        let images = match input.get("num_images") {
            None => 1,
            Some(n) => match n.as_u64() {
                Some(n @ 1..=4) => n as u32,
                _ => {
                    return refuse(detail(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!([{"loc": ["body", "num_images"], "msg": "ensure this value is less than or equal to 4", "type": "value_error.number.not_le"}]),
                    ));
                }
            },
        };
        let (width, height) = match input.get("image_size") {
            None => (1024, 768),
            Some(Value::String(name)) => match named_size(name) {
                Some(s) => s,
                None => {
                    return refuse(detail(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!([{"loc": ["body", "image_size"], "msg": "unexpected value", "type": "value_error"}]),
                    ));
                }
            },
            Some(v) => match (
                v.get("width").and_then(Value::as_u64),
                v.get("height").and_then(Value::as_u64),
            ) {
                (Some(w @ 1..=14142), Some(h @ 1..=14142)) => (w as u32, h as u32),
                _ => {
                    return refuse(detail(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        json!([{"loc": ["body", "image_size"], "msg": "invalid size", "type": "value_error"}]),
                    ));
                }
            },
        };
        let no_retry = headers.get("x-fal-no-retry").and_then(|v| v.to_str().ok()) == Some("1");
        if !no_retry {
            self.inner.retrying_submits.fetch_add(1, Ordering::Relaxed);
        }
        let mut fate = Fate::Normal;
        let mut reset = false;
        match self.inner.rules.take(Some(&prompt)) {
            None => {}
            Some(Fault::RateLimited) => {
                return refuse(detail(
                    StatusCode::TOO_MANY_REQUESTS,
                    json!("Too many requests"),
                ));
            }
            Some(Fault::Locked) => {
                return refuse(detail(
                    StatusCode::FORBIDDEN,
                    json!(
                        "User is locked. Reason: Exhausted balance. Top up your balance at fal.ai/dashboard/billing."
                    ),
                ));
            }
            Some(Fault::Unavailable) => {
                return refuse(detail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!("Service temporarily unavailable"),
                ));
            }
            Some(Fault::Nsfw) => fate = Fate::Nsfw,
            // fal retries a failed run on its own unless told not to: billed twice, then fine.
            Some(Fault::Fails) if !no_retry => ledger.billed(&prompt, 0),
            Some(Fault::Fails) => fate = Fate::Fails,
            Some(Fault::NeverCompletes) => fate = Fate::NeverCompletes,
            Some(Fault::ResetAfterSubmit) => reset = true,
        }
        ledger.billed(&prompt, u64::from(images));
        let id = format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            fastrand::u32(..),
            fastrand::u16(..),
            fastrand::u16(..0xfff),
            fastrand::u16(..0xfff),
            fastrand::u64(..1 << 48)
        );
        let seed = input
            .get("seed")
            .and_then(Value::as_u64)
            .unwrap_or_else(|| fastrand::u64(..1 << 31));
        lock(&self.inner.requests).insert(
            id.clone(),
            Request {
                prompt,
                images,
                width,
                height,
                seed,
                submitted: Instant::now(),
                fate,
                canceled: false,
            },
        );
        if reset {
            return crate::net::reset(conn);
        }
        let host = host(&headers);
        // The URLs name the app without its path, as fal's do.
        let app = model.split('/').take(2).collect::<Vec<_>>().join("/");
        Json(json!({
            "request_id": id,
            "response_url": format!("http://{host}/{app}/requests/{id}"),
            "status_url": format!("http://{host}/{app}/requests/{id}/status"),
            "cancel_url": format!("http://{host}/{app}/requests/{id}/cancel"),
            "queue_position": 0
        }))
        .into_response()
    }

    /// `None`: queued; `Some(false)`: in progress; `Some(true)`: done.
    fn progress(&self, r: &Request) -> Option<bool> {
        let elapsed = r.submitted.elapsed();
        let generation = self.inner.opts.generation;
        if r.canceled {
            return Some(true);
        }
        if r.fate == Fate::NeverCompletes || elapsed < generation / 3 {
            None
        } else {
            Some(elapsed >= generation)
        }
    }
}

fn host(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned()
}

async fn submit(
    State(fake): State<FalFake>,
    Path((owner, app)): Path<(String, String)>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.submit(format!("{owner}/{app}"), conn, headers, body)
        .await
}

async fn submit_path(
    State(fake): State<FalFake>,
    Path((owner, app, path)): Path<(String, String, String)>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.submit(format!("{owner}/{app}/{path}"), conn, headers, body)
        .await
}

async fn status(
    State(fake): State<FalFake>,
    Path((_, _, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = fake.refusal(&headers) {
        return refused;
    }
    fake.inner.polls.fetch_add(1, Ordering::Relaxed);
    let requests = lock(&fake.inner.requests);
    let Some(r) = requests.get(&id) else {
        return detail(StatusCode::NOT_FOUND, json!("Request not found"));
    };
    match fake.progress(r) {
        None => (StatusCode::ACCEPTED, Json(json!({"status": "IN_QUEUE", "queue_position": 0}))).into_response(),
        Some(false) => (StatusCode::ACCEPTED, Json(json!({"status": "IN_PROGRESS", "logs": null}))).into_response(),
        Some(true) => Json(json!({"status": "COMPLETED", "logs": null, "metrics": {"inference_time": fake.inner.opts.generation.as_secs_f64()}})).into_response(),
    }
}

async fn result(
    State(fake): State<FalFake>,
    Path((_, _, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = fake.refusal(&headers) {
        return refused;
    }
    let host = host(&headers);
    let requests = lock(&fake.inner.requests);
    let Some(r) = requests.get(&id) else {
        return detail(StatusCode::NOT_FOUND, json!("Request not found"));
    };
    if r.canceled {
        return detail(StatusCode::BAD_REQUEST, json!("Request was cancelled"));
    }
    if fake.progress(r) != Some(true) {
        return detail(
            StatusCode::BAD_REQUEST,
            json!("Request is still in progress"),
        );
    }
    if r.fate == Fate::Fails {
        return detail(
            StatusCode::INTERNAL_SERVER_ERROR,
            json!("Internal server error during inference"),
        );
    }
    let images: Vec<Value> = (0..r.images)
        .map(|n| json!({"url": format!("http://{host}/_fake/files/{id}/{n}.png"), "content_type": "image/png", "width": r.width, "height": r.height}))
        .collect();
    let nsfw: Vec<bool> = (0..r.images).map(|_| r.fate == Fate::Nsfw).collect();
    Json(json!({"images": images, "seed": r.seed, "has_nsfw_concepts": nsfw, "prompt": r.prompt, "timings": {"inference": fake.inner.opts.generation.as_secs_f64()}})).into_response()
}

async fn cancel(
    State(fake): State<FalFake>,
    Path((_, _, id)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = fake.refusal(&headers) {
        return refused;
    }
    let mut requests = lock(&fake.inner.requests);
    let Some(r) = requests.get_mut(&id) else {
        return detail(StatusCode::NOT_FOUND, json!("Request not found"));
    };
    if fake.progress(r) == Some(true) {
        return (
            StatusCode::BAD_REQUEST,
            Json(json!({"status": "ALREADY_COMPLETED"})),
        )
            .into_response();
    }
    r.canceled = true;
    fake.inner.cancels.fetch_add(1, Ordering::Relaxed);
    (
        StatusCode::ACCEPTED,
        Json(json!({"status": "CANCELLATION_REQUESTED"})),
    )
        .into_response()
}

async fn file(State(fake): State<FalFake>, Path((id, name)): Path<(String, String)>) -> Response {
    let n: Option<u32> = name.strip_suffix(".png").and_then(|n| n.parse().ok());
    let requests = lock(&fake.inner.requests);
    match (requests.get(&id), n) {
        (Some(r), Some(n)) if n < r.images => {
            let png = fake.inner.png.encode(&format!("{} {id} {n}", r.prompt));
            ([(header::CONTENT_TYPE, "image/png")], png).into_response()
        }
        _ => StatusCode::NOT_FOUND.into_response(),
    }
}

#[derive(serde::Deserialize)]
struct CallsQuery {
    #[serde(default)]
    prompt_contains: String,
}

async fn calls(State(fake): State<FalFake>, Query(q): Query<CallsQuery>) -> Json<Value> {
    let (calls, billed) = fake.inner.ledger.per_prompt(&q.prompt_contains);
    Json(json!({ "calls": calls, "billed": billed }))
}

#[cfg(test)]
mod tests;

//! A fake of Replicate's predictions API.
//!
//! Written from Replicate's HTTP API reference:
//! - `POST /v1/models/{owner}/{name}/predictions` with `{"input": {...}}`, or `POST
//!   /v1/predictions` with `{"version", "input"}`, and `Authorization: Bearer TOKEN`, answers 201
//!   with the prediction: `{"id", "model", "version", "input", "status": "starting", "output":
//!   null, "error": null, "urls": {"get", "cancel", "web"}, "created_at"}`.
//! - `GET /v1/predictions/{id}` answers it again: `starting`, `processing`, then `succeeded`
//!   (`output`: a list of file URLs, and `metrics.predict_time`), `failed` (`error`) or
//!   `canceled`. `POST /v1/predictions/{id}/cancel` cancels it.
//! - Output files are served for `output_ttl` (an hour in real life), then answer 404.
//! - Errors are problem details: 401 `Unauthenticated`, 402 `Insufficient credit`, 404, 422
//!   `Input validation failed`, 429 `{"detail": "Request was throttled. Expected available in N
//!   seconds."}` with `retry-after`.
//! - `GET /v1/account` answers the account.
//!
//! A prediction is billed when it runs (succeeded or failed after it ran). Admin: `GET
//! /_fake/stats`, `GET /_fake/calls?prompt_contains=X` (calls are creates).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::net::ResetHandle;
use crate::png::PngTemplate;
use crate::rules::{Ledger, Rules, Stats, lock};

/// A fault injected into the next matching creates.
pub type Rule = crate::rules::Rule<Fault>;

/// What a matching create gets instead of the normal course.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// 429, throttled for this many seconds (not billed).
    Throttled { secs: u64 },
    /// 402 (not billed).
    NoCredit,
    /// 503 at create (not billed).
    Unavailable,
    /// Runs, billed, and fails: the safety checker found NSFW content.
    Nsfw,
    /// Runs, billed, and fails with a crash.
    Crash,
    /// Runs for ever (until canceled).
    NeverCompletes,
    /// Succeeds, but its output files are gone when fetched.
    OutputExpired,
    /// Created and billed, then the connection is reset instead of the answer.
    ResetAfterCreate,
}

/// How the fake behaves when no [`Rule`] applies.
#[derive(Clone, Debug)]
pub struct ReplicateOptions {
    /// How long a prediction runs (it is `starting` for the first tenth).
    pub generation: Duration,
    /// Approximate size in bytes of each image.
    pub image_bytes: usize,
    /// `None`: any non-empty token; `Some(t)`: only `t`.
    pub api_key: Option<String>,
    /// How long output files stay.
    pub output_ttl: Duration,
}

impl Default for ReplicateOptions {
    fn default() -> Self {
        Self {
            generation: Duration::from_millis(300),
            image_bytes: 2048,
            api_key: None,
            output_ttl: Duration::from_secs(3600),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Fate {
    Normal,
    Nsfw,
    Crash,
    NeverCompletes,
    OutputExpired,
}

struct Prediction {
    prompt: String,
    model: String,
    input: Value,
    outputs: u32,
    created: Instant,
    fate: Fate,
    canceled: bool,
}

#[derive(Clone)]
pub struct ReplicateFake {
    inner: Arc<Inner>,
}

struct Inner {
    opts: ReplicateOptions,
    rules: Rules<Fault>,
    ledger: Ledger,
    /// Each accepted request's inline images, as `field=digest` ([`crate::digest`]).
    inputs: Mutex<Vec<Vec<String>>>,
    seq: AtomicU64,
    polls: AtomicU64,
    cancels: AtomicU64,
    png: PngTemplate,
    predictions: Mutex<HashMap<String, Prediction>>,
}

pub type ReplicateServer = crate::Running<ReplicateFake>;

impl crate::Running<ReplicateFake> {
    /// `https://api.replicate.com` in real life.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Serves the fake on `listener`, with connections that a fault can reset.
pub async fn serve(listener: TcpListener, api: ReplicateFake) -> std::io::Result<()> {
    crate::net::serve(listener, api.router()).await
}

fn problem(status: StatusCode, title: &str, detail: &str) -> Response {
    (
        status,
        Json(json!({"title": title, "detail": detail, "status": status.as_u16()})),
    )
        .into_response()
}

impl ReplicateFake {
    pub fn new(opts: ReplicateOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                png: PngTemplate::new(opts.image_bytes),
                opts,
                rules: Rules::default(),
                ledger: Ledger::default(),
                inputs: Mutex::default(),
                seq: AtomicU64::new(0),
                polls: AtomicU64::new(0),
                cancels: AtomicU64::new(0),
                predictions: Mutex::default(),
            }),
        }
    }

    pub async fn start(self) -> std::io::Result<ReplicateServer> {
        let router = self.router();
        crate::Running::start(self, router, "fake Replicate API").await
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route(
                "/v1/models/{owner}/{name}/predictions",
                post(create_by_model),
            )
            .route("/v1/predictions", post(create_by_version))
            .route("/v1/predictions/{id}", get(poll))
            .route("/v1/predictions/{id}/cancel", post(cancel))
            .route("/v1/account", get(account))
            .route("/_fake/files/{id}/{n}", get(file))
            .route(
                "/_fake/stats",
                get(|State(f): State<ReplicateFake>| async move { Json(f.stats()) }),
            )
            .route("/_fake/calls", get(calls))
            .fallback(|| async {
                problem(
                    StatusCode::NOT_FOUND,
                    "Not found",
                    "The requested resource could not be found.",
                )
            })
            .with_state(self.clone())
    }

    pub fn push_rule(&self, rule: Rule) {
        self.inner.rules.push(rule);
    }

    /// `requests` are creates, `billed` predictions that ran.
    /// Each request's inline images (data URIs), as `field=digest` ([`crate::digest`]).
    pub fn inputs(&self) -> Vec<Vec<String>> {
        lock(&self.inner.inputs).clone()
    }

    pub fn stats(&self) -> Stats {
        self.inner.ledger.stats()
    }

    /// Creates whose prompt contains `needle`.
    pub fn calls_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).0
    }

    /// Predictions that ran (and were billed) whose prompt contains `needle`.
    pub fn billed_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).1
    }

    /// Polls answered so far.
    pub fn polls(&self) -> u64 {
        self.inner.polls.load(Ordering::Relaxed)
    }

    /// Predictions canceled through the API.
    pub fn cancels(&self) -> u64 {
        self.inner.cancels.load(Ordering::Relaxed)
    }

    /// The 401 of a request without a valid token; `None`: it is valid.
    fn refusal(&self, headers: &HeaderMap) -> Option<Response> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .filter(|t| !t.trim().is_empty());
        let ok = match (token, &self.inner.opts.api_key) {
            (None, _) => false,
            (Some(t), Some(want)) => t == want,
            (Some(_), None) => true,
        };
        (!ok).then(|| {
            problem(
                StatusCode::UNAUTHORIZED,
                "Unauthenticated",
                "You did not pass a valid authentication token",
            )
        })
    }

    /// The prediction as the API shows it, `host` the one the client called.
    fn view(&self, id: &str, p: &Prediction, host: &str) -> Value {
        let elapsed = p.created.elapsed();
        let generation = self.inner.opts.generation;
        let status = if p.canceled {
            "canceled"
        } else if p.fate == Fate::NeverCompletes || elapsed < generation {
            if elapsed < generation / 10 {
                "starting"
            } else {
                "processing"
            }
        } else {
            match p.fate {
                Fate::Nsfw | Fate::Crash => "failed",
                _ => "succeeded",
            }
        };
        let error = match (status, p.fate) {
            ("failed", Fate::Nsfw) => json!(
                "All generated images contained NSFW content. Try running it again with a different prompt."
            ),
            ("failed", _) => json!("CUDA error: out of memory"),
            _ => Value::Null,
        };
        let output = if status == "succeeded" {
            json!(
                (0..p.outputs)
                    .map(|n| format!("http://{host}/_fake/files/{id}/{n}.png"))
                    .collect::<Vec<_>>()
            )
        } else {
            Value::Null
        };
        let metrics = if status == "succeeded" || status == "failed" {
            json!({"predict_time": generation.as_secs_f64()})
        } else {
            json!({})
        };
        json!({
            "id": id,
            "model": p.model,
            "version": "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637",
            "input": p.input,
            "logs": "",
            "output": output,
            "error": error,
            "status": status,
            "metrics": metrics,
            "urls": {
                "get": format!("http://{host}/v1/predictions/{id}"),
                "cancel": format!("http://{host}/v1/predictions/{id}/cancel"),
                "web": format!("https://replicate.com/p/{id}"),
            }
        })
    }

    async fn create(
        &self,
        model: String,
        conn: Option<Extension<ConnectInfo<ResetHandle>>>,
        headers: HeaderMap,
        body: Bytes,
        by_version: bool,
    ) -> Response {
        if let Some(refused) = self.refusal(&headers) {
            return refused;
        }
        let Ok(request) = serde_json::from_slice::<Value>(&body) else {
            return problem(
                StatusCode::BAD_REQUEST,
                "Invalid JSON",
                "The request body is not valid JSON.",
            );
        };
        let input = request.get("input").cloned().unwrap_or(Value::Null);
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
        let version = request.get("version").and_then(Value::as_str);
        if by_version && version.is_none_or(|v| v.len() != 64) {
            return refuse(problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Invalid version or not permitted",
                "The specified version does not exist (or perhaps you don't have permission to use it?)",
            ));
        }
        if !input.is_object() || prompt.is_empty() {
            return refuse(problem(
                StatusCode::UNPROCESSABLE_ENTITY,
                "Input validation failed",
                "- input: prompt is required",
            ));
        }
        let images = match crate::data_uri_images(&input) {
            Ok(images) => images,
            Err(field) => {
                return refuse(problem(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "Input validation failed",
                    &format!("- input.{field}: Invalid data URI"),
                ));
            }
        };
        lock(&self.inner.inputs).push(
            images
                .iter()
                .map(|(field, bytes)| format!("{field}={}", crate::digest(bytes)))
                .collect(),
        );
        let outputs = match input.get("num_outputs") {
            None => 1,
            Some(n) => match n.as_u64() {
                Some(n @ 1..=4) => n as u32,
                _ => {
                    return refuse(problem(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        "Input validation failed",
                        "- input.num_outputs: Must be less than or equal to 4",
                    ));
                }
            },
        };
        let mut fate = Fate::Normal;
        let mut reset = false;
        match self.inner.rules.take(Some(&prompt)) {
            None => {}
            Some(Fault::Throttled { secs }) => {
                let mut r = problem(
                    StatusCode::TOO_MANY_REQUESTS,
                    "Request was throttled.",
                    &format!("Request was throttled. Expected available in {secs} seconds."),
                );
                r.headers_mut()
                    .insert("retry-after", secs.to_string().parse().unwrap());
                return refuse(r);
            }
            Some(Fault::NoCredit) => {
                return refuse(problem(
                    StatusCode::PAYMENT_REQUIRED,
                    "Insufficient credit",
                    "You have insufficient credit to run this model. Go to https://replicate.com/account/billing#billing to purchase credit.",
                ));
            }
            Some(Fault::Unavailable) => {
                return refuse(problem(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "Service unavailable",
                    "The service is temporarily unavailable.",
                ));
            }
            Some(Fault::Nsfw) => fate = Fate::Nsfw,
            Some(Fault::Crash) => fate = Fate::Crash,
            Some(Fault::NeverCompletes) => fate = Fate::NeverCompletes,
            Some(Fault::OutputExpired) => fate = Fate::OutputExpired,
            Some(Fault::ResetAfterCreate) => reset = true,
        }
        let id = format!(
            "{:x}{:04x}",
            fastrand::u64(..),
            self.inner.seq.fetch_add(1, Ordering::Relaxed) % 0x10000
        );
        ledger.billed(&prompt, u64::from(outputs));
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1")
            .to_owned();
        let prediction = Prediction {
            prompt,
            model,
            input,
            outputs,
            created: Instant::now(),
            fate,
            canceled: false,
        };
        let view = self.view(&id, &prediction, &host);
        lock(&self.inner.predictions).insert(id, prediction);
        if reset {
            return crate::net::reset(conn);
        }
        (StatusCode::CREATED, Json(view)).into_response()
    }
}

async fn create_by_model(
    State(fake): State<ReplicateFake>,
    Path((owner, name)): Path<(String, String)>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.create(format!("{owner}/{name}"), conn, headers, body, false)
        .await
}

async fn create_by_version(
    State(fake): State<ReplicateFake>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    fake.create("by-version".into(), conn, headers, body, true)
        .await
}

async fn poll(
    State(fake): State<ReplicateFake>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = fake.refusal(&headers) {
        return refused;
    }
    fake.inner.polls.fetch_add(1, Ordering::Relaxed);
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned();
    let predictions = lock(&fake.inner.predictions);
    match predictions.get(&id) {
        Some(p) => Json(fake.view(&id, p, &host)).into_response(),
        None => problem(
            StatusCode::NOT_FOUND,
            "Not found",
            "The requested resource could not be found.",
        ),
    }
}

async fn cancel(
    State(fake): State<ReplicateFake>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Some(refused) = fake.refusal(&headers) {
        return refused;
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_owned();
    let mut predictions = lock(&fake.inner.predictions);
    match predictions.get_mut(&id) {
        Some(p) => {
            p.canceled = true;
            fake.inner.cancels.fetch_add(1, Ordering::Relaxed);
            Json(fake.view(&id, p, &host)).into_response()
        }
        None => problem(
            StatusCode::NOT_FOUND,
            "Not found",
            "The requested resource could not be found.",
        ),
    }
}

async fn file(
    State(fake): State<ReplicateFake>,
    Path((id, name)): Path<(String, String)>,
) -> Response {
    let n: Option<u32> = name.strip_suffix(".png").and_then(|n| n.parse().ok());
    let predictions = lock(&fake.inner.predictions);
    let Some((p, n)) = predictions.get(&id).zip(n) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let expired = p.fate == Fate::OutputExpired
        || p.created.elapsed() > fake.inner.opts.generation + fake.inner.opts.output_ttl;
    if expired || n >= p.outputs {
        return StatusCode::NOT_FOUND.into_response();
    }
    let png = fake.inner.png.encode(&format!("{} {id} {n}", p.prompt));
    ([(header::CONTENT_TYPE, "image/png")], png).into_response()
}

async fn account(State(fake): State<ReplicateFake>, headers: HeaderMap) -> Response {
    if let Some(refused) = fake.refusal(&headers) {
        return refused;
    }
    Json(json!({"type": "organization", "username": "imagegen-fake", "name": "imagegen fake", "github_url": null})).into_response()
}

#[derive(serde::Deserialize)]
struct CallsQuery {
    #[serde(default)]
    prompt_contains: String,
}

async fn calls(State(fake): State<ReplicateFake>, Query(q): Query<CallsQuery>) -> Json<Value> {
    let (calls, billed) = fake.inner.ledger.per_prompt(&q.prompt_contains);
    Json(json!({ "calls": calls, "billed": billed }))
}

#[cfg(test)]
mod tests;

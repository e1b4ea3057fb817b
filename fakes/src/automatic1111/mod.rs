//! A fake of AUTOMATIC1111's web UI API (and Forge's, its fork), as started with `--api`.
//!
//! Written from its API code: `POST /sdapi/v1/txt2img` takes the generation fields (`prompt`,
//! `negative_prompt`, `seed` (-1: random), `width`, `height`, `batch_size`, `n_iter`, `steps`,
//! `force_task_id`, `override_settings`, ...) and answers, when the batch is made, `{"images":
//! [BASE64 PNG...], "parameters": {...}, "info": "JSON TEXT"}`; with more than one image a grid of
//! them comes first (its `return_grid` option), and `info.index_of_first_image` says so. Calls run
//! one at a time (the web UI's queue lock): others wait. `--api-auth` is HTTP Basic; its refusals,
//! like every error but FastAPI's 422 for a body it cannot read, are `{"error", "detail", "body",
//! "errors"}`. `POST /internal/progress` tells a task (by its `force_task_id`) queued, active or
//! completed; `GET /sdapi/v1/sd-models` lists the checkpoints.
//!
//! Billed work is GPU time: a call is counted when its run starts. Misbehaviour on demand
//! ([`Fault`]): the GPU runs out of memory (500), and a run whose answer is lost (the connection
//! is reset after the images were made: nothing can fetch them again).
//!
//! Admin endpoints: `POST/DELETE /_fake/rules`, `GET /_fake/stats`, `GET
//! /_fake/calls?prompt_contains=X`.

#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use base64_simd::STANDARD as BASE64;
use serde_json::{Value, json};
use tokio::net::TcpListener;

use crate::net::ResetHandle;
use crate::png::PngTemplate;
use crate::rules::{Ledger, Rules, Stats, lock};

/// A fault injected into the next matching calls.
pub type Rule = crate::rules::Rule<Fault>;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// The run fails: 500 `OutOfMemoryError`.
    OutOfMemory,
    /// The run completes, then the connection is reset instead of the answer.
    ResetAfterRun,
}

#[derive(Clone, Debug)]
pub struct A1111Options {
    /// How long one call's run takes.
    pub generation: Duration,
    /// Approximate size of each PNG.
    pub image_bytes: usize,
    /// `--api-auth USER:PASSWORD`; `None`: no auth.
    pub auth: Option<(String, String)>,
    /// The `return_grid` option: a grid first when a call makes more than one image.
    pub return_grid: bool,
}

impl Default for A1111Options {
    fn default() -> Self {
        Self {
            generation: Duration::from_millis(100),
            image_bytes: 2048,
            auth: None,
            return_grid: true,
        }
    }
}

/// A handle on the fake's state; clones share it.
#[derive(Clone)]
pub struct A1111Fake {
    inner: Arc<Inner>,
}

struct Inner {
    opts: A1111Options,
    rules: Rules<Fault>,
    ledger: Ledger,
    png: PngTemplate,
    /// The web UI's queue lock: one run at a time.
    gpu: tokio::sync::Mutex<()>,
    /// The [`crate::digest`] of each img2img call's init images, then its mask's when it had one.
    img2img: Mutex<Vec<(Vec<String>, Option<String>)>>,
    tasks: Mutex<Tasks>,
}

#[derive(Default)]
struct Tasks {
    queued: Vec<String>,
    current: Option<String>,
    /// The last 16 finished, as the web UI keeps them.
    finished: VecDeque<String>,
}

/// A running in-process fake; the server task is aborted on drop.
pub type A1111Server = crate::Running<A1111Fake>;

impl crate::Running<A1111Fake> {
    /// The server's base URL: `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn http_exception(status: StatusCode, detail: &str) -> Response {
    (
        status,
        Json(
            json!({"error": "HTTPException", "detail": detail, "body": "",
            "errors": format!("{}: {detail}", status.as_u16())}),
        ),
    )
        .into_response()
}

impl A1111Fake {
    pub fn new(opts: A1111Options) -> Self {
        Self {
            inner: Arc::new(Inner {
                png: PngTemplate::new(opts.image_bytes),
                opts,
                rules: Rules::default(),
                ledger: Ledger::default(),
                gpu: tokio::sync::Mutex::new(()),
                img2img: Mutex::default(),
                tasks: Mutex::default(),
            }),
        }
    }

    pub async fn start(self) -> std::io::Result<A1111Server> {
        let router = self.router();
        crate::Running::start(self, router, "fake AUTOMATIC1111 server").await
    }

    pub fn router(&self) -> Router {
        Router::new()
            .route("/sdapi/v1/txt2img", post(txt2img))
            .route("/sdapi/v1/img2img", post(img2img))
            .route("/sdapi/v1/sd-models", get(sd_models))
            .route("/internal/progress", post(progress))
            .route(
                "/_fake/rules",
                post(
                    |State(f): State<A1111Fake>, Json(rule): Json<Rule>| async move {
                        f.push_rule(rule);
                        StatusCode::NO_CONTENT
                    },
                )
                .delete(|State(f): State<A1111Fake>| async move {
                    f.inner.rules.clear();
                    StatusCode::NO_CONTENT
                }),
            )
            .route(
                "/_fake/stats",
                get(|State(f): State<A1111Fake>| async move { Json(f.stats()) }),
            )
            .route("/_fake/calls", get(calls))
            .fallback(|| async { http_exception(StatusCode::NOT_FOUND, "Not Found") })
            .with_state(self.clone())
    }

    pub fn push_rule(&self, rule: Rule) {
        self.inner.rules.push(rule);
    }

    /// `requests`: calls; `billed`: runs started; `images`: images made.
    pub fn stats(&self) -> Stats {
        self.inner.ledger.stats()
    }

    /// What each img2img call was given: its init images' digests, and its mask's.
    pub fn img2img_inputs(&self) -> Vec<(Vec<String>, Option<String>)> {
        lock(&self.inner.img2img).clone()
    }

    /// Runs started for prompts that contain `needle`.
    pub fn runs_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).1
    }

    /// `--api-auth`: `Err` with the refusal's detail (answered 401).
    fn authorize(&self, headers: &HeaderMap) -> Result<(), &'static str> {
        let Some((user, password)) = &self.inner.opts.auth else {
            return Ok(());
        };
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Basic "))
        else {
            self.inner.ledger.error(401);
            return Err("Not authenticated");
        };
        let decoded = BASE64.decode_to_vec(given.trim()).unwrap_or_default();
        if decoded != format!("{user}:{password}").into_bytes() {
            self.inner.ledger.error(401);
            return Err("Incorrect username or password");
        }
        Ok(())
    }
}

/// Serves the fake on `listener`, with connections that a fault can reset.
pub async fn serve(listener: TcpListener, api: A1111Fake) -> std::io::Result<()> {
    crate::net::serve(listener, api.router()).await
}

/// FastAPI's 422 for a field of the wrong type.
fn invalid(field: &str, kind: &str) -> Response {
    (
        StatusCode::UNPROCESSABLE_ENTITY,
        Json(json!({"detail": [{"loc": ["body", field], "msg": format!("value is not a valid {kind}"),
            "type": format!("type_error.{kind}")}]})),
    )
        .into_response()
}

async fn txt2img(
    State(f): State<A1111Fake>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(f, conn, headers, body, false).await
}

/// `init_images` (base64 strings or data URIs; 404 "Init image not found" without them, 500
/// "Invalid encoded image" for bytes that are not base64) and an optional `mask` (white:
/// where to paint), then as txt2img.
async fn img2img(
    State(f): State<A1111Fake>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    generate(f, conn, headers, body, true).await
}

fn decode_image(v: &Value) -> Option<Vec<u8>> {
    let s = v.as_str()?;
    let b64 = match s.split_once(";base64,") {
        Some((_, data)) if s.starts_with("data:") => data,
        _ => s,
    };
    BASE64.decode_to_vec(b64.as_bytes()).ok()
}

async fn generate(
    f: A1111Fake,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    body: Bytes,
    img2img: bool,
) -> Response {
    if let Err(detail) = f.authorize(&headers) {
        return http_exception(StatusCode::UNAUTHORIZED, detail);
    }
    let Ok(Value::Object(req)) = serde_json::from_slice::<Value>(&body) else {
        f.inner.ledger.error(422);
        return (
            StatusCode::UNPROCESSABLE_ENTITY,
            Json(
                json!({"detail": [{"loc": ["body", 0], "msg": "Expecting value",
                "type": "value_error.jsondecode"}]}),
            ),
        )
            .into_response();
    };
    for field in ["width", "height", "batch_size", "n_iter", "steps", "seed"] {
        if req.get(field).is_some_and(|v| !v.is_i64() && !v.is_u64()) {
            f.inner.ledger.error(422);
            return invalid(field, "integer");
        }
    }
    if img2img {
        let Some(inits) = req
            .get("init_images")
            .and_then(Value::as_array)
            .filter(|a| !a.is_empty())
        else {
            return http_exception(StatusCode::NOT_FOUND, "Init image not found");
        };
        let Some(images) = inits.iter().map(decode_image).collect::<Option<Vec<_>>>() else {
            return http_exception(StatusCode::INTERNAL_SERVER_ERROR, "Invalid encoded image");
        };
        let mask = match req.get("mask").filter(|m| !m.is_null()) {
            None => None,
            Some(m) => match decode_image(m) {
                Some(bytes) => Some(crate::digest(&bytes)),
                None => {
                    return http_exception(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        "Invalid encoded image",
                    );
                }
            },
        };
        lock(&f.inner.img2img).push((images.iter().map(|i| crate::digest(i)).collect(), mask));
    }
    let int = |k: &str, d: i64| req.get(k).and_then(Value::as_i64).unwrap_or(d);
    let prompt = req
        .get("prompt")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_string();
    let n = (int("batch_size", 1).clamp(1, 64) * int("n_iter", 1).clamp(1, 64)) as usize;
    let (width, height) = (int("width", 512), int("height", 512));
    let task = req
        .get("force_task_id")
        .and_then(Value::as_str)
        .map_or_else(
            || format!("task({:016x})", fastrand::u64(..)),
            str::to_string,
        );
    f.inner.ledger.request(Some(&prompt));
    lock(&f.inner.tasks).queued.push(task.clone());
    let gpu = f.inner.gpu.lock().await;
    {
        let mut t = lock(&f.inner.tasks);
        t.queued.retain(|q| *q != task);
        t.current = Some(task.clone());
    }
    f.inner.ledger.billed(&prompt, n as u64);
    let fault = f.inner.rules.take(Some(&prompt));
    tokio::time::sleep(f.inner.opts.generation).await;
    drop(gpu);
    if matches!(fault, Some(Fault::OutOfMemory)) {
        // A failed run is never marked finished.
        f.inner.ledger.error(500);
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(
                json!({"error": "OutOfMemoryError", "detail": "", "body": "",
                "errors": "CUDA out of memory. Tried to allocate 2.00 GiB"}),
            ),
        )
            .into_response();
    }
    {
        let mut t = lock(&f.inner.tasks);
        t.current = None;
        t.finished.push_back(task.clone());
        if t.finished.len() > 16 {
            t.finished.pop_front();
        }
    }
    if matches!(fault, Some(Fault::ResetAfterRun)) {
        return crate::net::reset(conn);
    }
    let seed = match int("seed", -1) {
        -1 => fastrand::i64(0..1 << 32),
        s => s,
    };
    let grid = f.inner.opts.return_grid && n > 1;
    let mut images = Vec::with_capacity(n + 1);
    if grid {
        images.push(String::new());
        f.inner
            .png
            .write_b64(&format!("grid {task}"), &mut images[0]);
    }
    for i in 0..n {
        let mut b64 = String::new();
        f.inner
            .png
            .write_b64(&format!("{task} {i} {width}x{height} {prompt}"), &mut b64);
        images.push(b64);
    }
    let seeds: Vec<i64> = (0..n as i64).map(|i| seed + i).collect();
    let info = json!({"prompt": prompt, "all_prompts": vec![&prompt; n], "seed": seed,
        "all_seeds": seeds, "width": width, "height": height, "batch_size": int("batch_size", 1),
        "index_of_first_image": usize::from(grid), "job_timestamp": "20261207120000",
        "sd_model_name": "sd_xl_base_1.0", "version": "v1.10.1"});
    let mut parameters = req.clone();
    parameters.insert("seed".into(), seed.into());
    Json(json!({"images": images, "parameters": parameters, "info": info.to_string()}))
        .into_response()
}

async fn sd_models(State(f): State<A1111Fake>, headers: HeaderMap) -> Response {
    if let Err(detail) = f.authorize(&headers) {
        return http_exception(StatusCode::UNAUTHORIZED, detail);
    }
    Json(
        json!([{"title": "sd_xl_base_1.0.safetensors [31e35c80fc]", "model_name": "sd_xl_base_1.0",
        "hash": "31e35c80fc", "sha256": null, "filename": "/models/sd_xl_base_1.0.safetensors",
        "config": null}]),
    )
    .into_response()
}

async fn progress(State(f): State<A1111Fake>, Json(req): Json<Value>) -> Json<Value> {
    let id = req["id_task"].as_str().unwrap_or_default();
    let t = lock(&f.inner.tasks);
    let active = t.current.as_deref() == Some(id);
    let queued = t.queued.iter().any(|q| q == id);
    let completed = t.finished.iter().any(|q| q == id);
    Json(
        json!({"active": active, "queued": queued, "completed": completed,
        "progress": if active { json!(0.5) } else { Value::Null }, "eta": null,
        "live_preview": null, "id_live_preview": -1,
        "textinfo": if queued { "In queue" } else { "Waiting..." }}),
    )
}

#[derive(serde::Deserialize)]
struct CallsQuery {
    #[serde(default)]
    prompt_contains: String,
}

async fn calls(State(f): State<A1111Fake>, Query(q): Query<CallsQuery>) -> Json<Value> {
    let (calls, runs) = f.inner.ledger.per_prompt(&q.prompt_contains);
    Json(json!({ "calls": calls, "billed": runs }))
}

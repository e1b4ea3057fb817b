//! A fake of a ComfyUI server: one GPU, one prompt at a time, a queue that grows.
//!
//! Written from ComfyUI's server code and documentation: `POST /prompt` (`{"prompt": GRAPH,
//! "client_id", "prompt_id"}`) checks the graph (400 with `node_errors`, see [`graph`]), takes a
//! client-chosen `prompt_id` only as a canonical lowercase UUID, refuses one already waiting or
//! running with 409 `duplicate_prompt_id`, and answers `{"prompt_id", "number", "node_errors"}`.
//! Prompts run one at a time in `number` order. `GET /history/ID` is `{}` until the prompt is
//! done (the same as for a prompt it never had), then `{ID: {"prompt", "outputs", "status",
//! "meta"}}`; `GET /queue`, `GET /prompt` (`exec_info.queue_remaining`), `POST /queue`
//! (`delete`, `clear`), `POST /interrupt` (by `prompt_id`, or whatever runs), `GET /view`,
//! `GET /system_stats`; the jobs API (`GET /api/jobs/ID`, 404 `{"error": "Job not found"}`, and
//! `POST /api/jobs/ID/cancel`) when [`ComfyOptions::jobs_api`] says the server is recent enough.
//! Every route is served under `/api` too, as ComfyUI does. Queue and history live in memory: a
//! restart ([`ComfyFake::restart`]) forgets both, and the prompt running then; saved files stay.
//!
//! Billed work is GPU time: each run of a prompt is counted when it starts, per prompt id and per
//! prompt text, so a test can prove a prompt ran once. Misbehaviour on demand ([`Fault`]): a run
//! that fails at a node, one that runs out of GPU memory, a submit answered 503, and a submit
//! whose answer is lost after the prompt was queued. A server can also go down (every connection
//! reset) and come back.
//!
//! Admin endpoints: `POST/DELETE /_fake/rules`, `GET /_fake/stats`, `GET
//! /_fake/calls?prompt_contains=X`, `GET /_fake/runs` (`{"runs": {ID: n}, "total"}`), `POST
//! /_fake/restart`, `POST /_fake/down` (`{"down": bool}`).

mod graph;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;

use crate::net::ResetHandle;
use crate::png::PngTemplate;
use crate::rules::{Ledger, Rules, Stats, lock};

/// A fault injected into the next matching prompts (matched on their text inputs).
pub type Rule = crate::rules::Rule<Fault>;

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Fault {
    /// The run fails at the sampler with this exception.
    ExecutionError {
        exception_type: String,
        message: String,
    },
    /// The run fails: the GPU is out of memory.
    OutOfMemory,
    /// 503 at submit (nothing queued).
    Unavailable,
    /// Queued, then the connection is reset instead of the answer.
    ResetAfterSubmit,
}

#[derive(Clone, Debug)]
pub struct ComfyOptions {
    /// How long one run takes.
    pub generation: Duration,
    /// Approximate size of each saved PNG.
    pub image_bytes: usize,
    /// Whether the server has the jobs API (`/api/jobs`, from late 2025).
    pub jobs_api: bool,
    /// The checkpoints it has (a graph naming another is refused); empty: any.
    pub checkpoints: Vec<String>,
}

impl Default for ComfyOptions {
    fn default() -> Self {
        Self {
            generation: Duration::from_millis(200),
            image_bytes: 2048,
            jobs_api: true,
            checkpoints: Vec::new(),
        }
    }
}

struct Item {
    number: u64,
    id: String,
    prompt: Map<String, Value>,
    extra: Value,
    outputs: Vec<String>,
    fault: Option<Fault>,
    created: u64,
}

struct Running {
    item: Item,
    started: u64,
    interrupted: bool,
}

#[derive(Default)]
struct Server {
    pending: Vec<Item>,
    running: Option<Running>,
    /// In insertion order, as ComfyUI keeps it.
    history: Vec<(String, Value)>,
    /// Saved files by (subfolder, filename): on disk, so a restart keeps them.
    files: HashMap<(String, String), Bytes>,
    counters: HashMap<String, u32>,
    next_number: u64,
    /// Runs started, by prompt id.
    runs: HashMap<String, u64>,
    /// The input folder (uploads), by name (`subfolder/name`): on disk, kept in a restart.
    uploads: HashMap<String, Bytes>,
    /// The digests of the input files each run loaded, in order.
    loaded: Vec<Vec<String>>,
}

/// A handle on the fake's state; clones share it.
#[derive(Clone)]
pub struct ComfyFake {
    inner: Arc<Inner>,
}

struct Inner {
    opts: ComfyOptions,
    rules: Rules<Fault>,
    ledger: Ledger,
    png: PngTemplate,
    server: Mutex<Server>,
    down: AtomicBool,
    executor: std::sync::Once,
}

/// A running in-process fake; the server task is aborted on drop.
pub type ComfyServer = crate::Running<ComfyFake>;

impl crate::Running<ComfyFake> {
    /// The server's base URL: `http://127.0.0.1:PORT`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// `str(uuid.UUID(v)) == v`: lowercase, hyphenated, 8-4-4-4-12 hex.
fn canonical_uuid(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

impl ComfyFake {
    pub fn new(opts: ComfyOptions) -> Self {
        Self {
            inner: Arc::new(Inner {
                png: PngTemplate::new(opts.image_bytes),
                opts,
                rules: Rules::default(),
                ledger: Ledger::default(),
                server: Mutex::default(),
                down: AtomicBool::new(false),
                executor: std::sync::Once::new(),
            }),
        }
    }

    /// Binds `127.0.0.1:0` and serves in a background task.
    pub async fn start(self) -> std::io::Result<ComfyServer> {
        let router = self.router();
        crate::Running::start(self, router, "fake ComfyUI server").await
    }

    /// The routes (starting the GPU's executor, once, on the current runtime).
    pub fn router(&self) -> Router {
        self.inner.executor.call_once(|| {
            tokio::spawn(execute(self.clone()));
        });
        let api = Router::new()
            .route("/prompt", post(submit).get(queue_length))
            .route("/queue", get(queue).post(edit_queue))
            .route("/history", get(all_history))
            .route("/history/{id}", get(one_history))
            .route("/interrupt", post(interrupt))
            .route("/view", get(view))
            .route("/upload/image", post(upload_image))
            .route("/system_stats", get(system_stats));
        let jobs = Router::new()
            .route("/api/jobs/{id}", get(job))
            .route("/api/jobs/{id}/cancel", post(cancel_job));
        Router::new()
            .merge(api.clone())
            .nest("/api", api)
            .merge(jobs)
            .route(
                "/_fake/rules",
                post(
                    |State(f): State<ComfyFake>, Json(rule): Json<Rule>| async move {
                        f.push_rule(rule);
                        StatusCode::NO_CONTENT
                    },
                )
                .delete(|State(f): State<ComfyFake>| async move {
                    f.inner.rules.clear();
                    StatusCode::NO_CONTENT
                }),
            )
            .route(
                "/_fake/stats",
                get(|State(f): State<ComfyFake>| async move { Json(f.stats()) }),
            )
            .route("/_fake/calls", get(calls))
            .route(
                "/_fake/runs",
                get(|State(f): State<ComfyFake>| async move {
                    let runs = lock(&f.inner.server).runs.clone();
                    let total: u64 = runs.values().sum();
                    Json(json!({"runs": runs, "total": total}))
                }),
            )
            .route(
                "/_fake/restart",
                post(|State(f): State<ComfyFake>| async move {
                    f.restart();
                    StatusCode::NO_CONTENT
                }),
            )
            .route(
                "/_fake/down",
                post(
                    |State(f): State<ComfyFake>, Json(v): Json<Value>| async move {
                        f.set_down(v["down"].as_bool().unwrap_or(true));
                        StatusCode::NO_CONTENT
                    },
                ),
            )
            .layer(axum::middleware::from_fn_with_state(
                self.clone(),
                when_down,
            ))
            .with_state(self.clone())
    }

    pub fn push_rule(&self, rule: Rule) {
        self.inner.rules.push(rule);
    }

    /// `requests`: submits; `billed`: runs started; `images`: images saved.
    pub fn stats(&self) -> Stats {
        self.inner.ledger.stats()
    }

    /// Runs started of prompts whose text contains `needle`.
    pub fn runs_for(&self, needle: &str) -> u64 {
        self.inner.ledger.per_prompt(needle).1
    }

    /// Runs started, by prompt id.
    pub fn runs(&self) -> HashMap<String, u64> {
        lock(&self.inner.server).runs.clone()
    }

    /// The [`crate::digest`] of the input files each run loaded (its load-image nodes'), in order.
    pub fn loaded(&self) -> Vec<Vec<String>> {
        lock(&self.inner.server).loaded.clone()
    }

    /// Prompts waiting or running.
    pub fn queue_remaining(&self) -> usize {
        let s = lock(&self.inner.server);
        s.pending.len() + usize::from(s.running.is_some())
    }

    /// The server restarts: its queue, its history and the prompt it runs are gone (the GPU
    /// time spent on that one is not); its saved files stay.
    pub fn restart(&self) {
        let mut s = lock(&self.inner.server);
        s.pending.clear();
        s.running = None;
        s.history.clear();
        tracing::info!("fake ComfyUI server restarted: queue and history forgotten");
    }

    /// While down, every request's connection is reset (the prompts keep running).
    pub fn set_down(&self, down: bool) {
        self.inner.down.store(down, Ordering::Release);
    }
}

/// Serves the fake on `listener`.
pub async fn serve(listener: TcpListener, api: ComfyFake) -> std::io::Result<()> {
    crate::net::serve(listener, api.router()).await
}

async fn when_down(
    State(f): State<ComfyFake>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    request: Request,
    next: Next,
) -> Response {
    if f.inner.down.load(Ordering::Acquire) && !request.uri().path().starts_with("/_fake/") {
        return crate::net::reset(conn);
    }
    next.run(request).await
}

/// The GPU: runs the waiting prompt of lowest number, one at a time.
async fn execute(f: ComfyFake) {
    loop {
        let started = {
            let mut s = lock(&f.inner.server);
            if s.running.is_none() && !s.pending.is_empty() {
                let i = (0..s.pending.len())
                    .min_by_key(|&i| s.pending[i].number)
                    .unwrap_or(0);
                let item = s.pending.remove(i);
                *s.runs.entry(item.id.clone()).or_default() += 1;
                let plan = graph::plan(&item.prompt);
                f.inner.ledger.billed(&plan.text, u64::from(plan.batch));
                let loaded = plan
                    .loads
                    .iter()
                    .filter_map(|name| s.uploads.get(name).map(|b| crate::digest(b)))
                    .collect();
                s.loaded.push(loaded);
                let id = item.id.clone();
                s.running = Some(Running {
                    item,
                    started: now_ms(),
                    interrupted: false,
                });
                Some(id)
            } else {
                None
            }
        };
        let Some(id) = started else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let until = tokio::time::Instant::now() + f.inner.opts.generation;
        loop {
            tokio::time::sleep(Duration::from_millis(10)).await;
            let s = lock(&f.inner.server);
            let still = s.running.as_ref().is_some_and(|r| r.item.id == id);
            let interrupted = s.running.as_ref().is_some_and(|r| r.interrupted);
            if !still || interrupted || tokio::time::Instant::now() >= until {
                break;
            }
        }
        let mut s = lock(&f.inner.server);
        // A restart took it: nothing is recorded.
        if s.running.as_ref().is_none_or(|r| r.item.id != id) {
            continue;
        }
        let Some(run) = s.running.take() else {
            continue;
        };
        let entry = finish(&f, &mut s, run);
        s.history.retain(|(i, _)| *i != id);
        if s.history.len() >= 10_000 {
            s.history.remove(0);
        }
        s.history.push((id, entry));
    }
}

/// The history entry of a finished run, its images saved.
fn finish(f: &ComfyFake, s: &mut Server, run: Running) -> Value {
    let item = run.item;
    let at = |event: &str, ts: u64| json!([event, {"prompt_id": item.id, "timestamp": ts}]);
    let start = at("execution_start", run.started);
    let prompt = json!([item.number, item.id, item.prompt, item.extra, item.outputs]);
    let error = |exception_type: &str, message: &str| {
        json!({"prompt": prompt, "outputs": {}, "status": {"status_str": "error", "completed": false,
            "messages": [start, ["execution_error", {"prompt_id": item.id, "node_id": "3",
                "node_type": "KSampler", "executed": [], "exception_message": message,
                "exception_type": exception_type, "traceback": [], "current_inputs": {},
                "current_outputs": [], "timestamp": now_ms()}]]}, "meta": {}})
    };
    if run.interrupted {
        return json!({"prompt": prompt, "outputs": {}, "status": {"status_str": "error",
            "completed": false, "messages": [start, ["execution_interrupted", {"prompt_id": item.id,
            "node_id": "3", "node_type": "KSampler", "executed": [], "timestamp": now_ms()}]]},
            "meta": {}});
    }
    match &item.fault {
        Some(Fault::ExecutionError {
            exception_type,
            message,
        }) => return error(exception_type, message),
        Some(Fault::OutOfMemory) => {
            return error(
                "torch.OutOfMemoryError",
                "Allocation on device \nThis error means you ran out of memory on your GPU.",
            );
        }
        _ => {}
    }
    let plan = graph::plan(&item.prompt);
    let mut outputs = Map::new();
    let mut meta = Map::new();
    for (node, prefix, kind) in &plan.outputs {
        let (subfolder, base) = match prefix.rsplit_once('/') {
            Some((dir, base)) => (dir.to_string(), base.to_string()),
            None => (String::new(), prefix.clone()),
        };
        let mut images = Vec::new();
        for b in 0..plan.batch {
            let counter = s.counters.entry(format!("{subfolder}/{base}")).or_insert(0);
            *counter += 1;
            let filename = format!(
                "{}_{:05}_.png",
                base.replace("%batch_num%", &b.to_string()),
                counter
            );
            let png = f.inner.png.encode(&format!(
                "{} {}x{} {}",
                item.id, plan.width, plan.height, filename
            ));
            s.files
                .insert((subfolder.clone(), filename.clone()), Bytes::from(png));
            images.push(json!({"filename": filename, "subfolder": subfolder, "type": kind}));
        }
        outputs.insert(node.clone(), json!({ "images": images }));
        meta.insert(
            node.clone(),
            json!({"node_id": node, "display_node": node, "parent_node": null, "real_node_id": node}),
        );
    }
    json!({"prompt": prompt, "outputs": outputs,
        "status": {"status_str": "success", "completed": true, "messages": [start,
            ["execution_cached", {"nodes": [], "prompt_id": item.id, "timestamp": run.started}],
            at("execution_success", now_ms())]},
        "meta": meta})
}

fn bad(body: Value) -> Response {
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

async fn submit(
    State(f): State<ComfyFake>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    body: Bytes,
) -> Response {
    let Ok(json) = serde_json::from_slice::<Value>(&body) else {
        // aiohttp's answer when the handler's json() raises.
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "500 Internal Server Error",
        )
            .into_response();
    };
    let Some(prompt) = json.get("prompt").and_then(Value::as_object).cloned() else {
        return bad(
            json!({"error": {"type": "no_prompt", "message": "No prompt provided",
            "details": "No prompt provided", "extra_info": {}}, "node_errors": {}}),
        );
    };
    let plan = graph::plan(&prompt);
    f.inner.ledger.request(Some(&plan.text));
    let fault = f.inner.rules.take(Some(&plan.text));
    if matches!(fault, Some(Fault::Unavailable)) {
        f.inner.ledger.error(503);
        return (StatusCode::SERVICE_UNAVAILABLE, "503 Service Unavailable").into_response();
    }
    let id = match json.get("prompt_id") {
        None | Some(Value::Null) => random_id(),
        Some(Value::String(id)) if canonical_uuid(id) => id.clone(),
        Some(_) => {
            f.inner.ledger.error(400);
            return bad(json!({"error": {"type": "invalid_prompt_id",
                "message": "prompt_id must be a valid UUID",
                "details": "prompt_id must be a UUID string in canonical lowercase hyphenated form; omit it to let the server generate one",
                "extra_info": {}}, "node_errors": {}}));
        }
    };
    let mut s = lock(&f.inner.server);
    let uploads = &s.uploads;
    if let Err(body) = graph::validate(&prompt, &f.inner.opts.checkpoints, &|name| {
        uploads.contains_key(name)
    }) {
        f.inner.ledger.error(400);
        return bad(body);
    }
    let held =
        s.pending.iter().any(|i| i.id == id) || s.running.as_ref().is_some_and(|r| r.item.id == id);
    if held {
        f.inner.ledger.error(409);
        return (
            StatusCode::CONFLICT,
            Json(json!({"error": {"type": "duplicate_prompt_id",
                "message": format!("prompt_id '{id}' already exists"), "details": "",
                "extra_info": {}}, "node_errors": {}})),
        )
            .into_response();
    }
    let number = s.next_number;
    s.next_number += 1;
    let outputs: Vec<String> = plan.outputs.iter().map(|o| o.0.clone()).collect();
    let mut extra = json.get("extra_data").cloned().unwrap_or_else(|| json!({}));
    if let Some(e) = extra.as_object_mut() {
        e.insert(
            "client_id".into(),
            json.get("client_id").cloned().unwrap_or(Value::Null),
        );
        e.insert("create_time".into(), now_ms().into());
    }
    s.pending.push(Item {
        number,
        id: id.clone(),
        prompt,
        extra,
        outputs,
        fault: fault.clone(),
        created: now_ms(),
    });
    drop(s);
    if matches!(fault, Some(Fault::ResetAfterSubmit)) {
        return crate::net::reset(conn);
    }
    Json(json!({"prompt_id": id, "number": number, "node_errors": {}})).into_response()
}

/// A server-chosen id, as ComfyUI's `uuid4()`.
fn random_id() -> String {
    let h = format!("{:032x}", fastrand::u128(..));
    format!(
        "{}-{}-4{}-{:x}{}-{}",
        &h[..8],
        &h[8..12],
        &h[13..16],
        8 + fastrand::u8(..4),
        &h[17..20],
        &h[20..]
    )
}

/// `POST /upload/image`: multipart `image` (the file, named by its filename), `subfolder`,
/// `type` (`input`, `temp` or `output`), `overwrite`. Answers `{name, subfolder, type}`; a name
/// taken by other bytes without `overwrite` becomes `name (1).ext`.
async fn upload_image(
    State(f): State<ComfyFake>,
    multipart: Result<axum::extract::Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    let Ok(mut multipart) = multipart else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    let (mut file, mut subfolder, mut kind, mut overwrite) =
        (None, String::new(), "input".to_string(), false);
    while let Ok(Some(field)) = multipart.next_field().await {
        let name = field.name().unwrap_or_default().to_string();
        let filename = field.file_name().map(str::to_string);
        let Ok(data) = field.bytes().await else {
            return StatusCode::BAD_REQUEST.into_response();
        };
        let text = || String::from_utf8_lossy(&data).into_owned();
        match name.as_str() {
            "image" => file = filename.map(|f| (f, data.clone())),
            "subfolder" => subfolder = text(),
            "type" => kind = text(),
            "overwrite" => overwrite = matches!(text().as_str(), "true" | "1"),
            _ => {}
        }
    }
    let Some((filename, data)) = file.filter(|(n, _)| !n.is_empty()) else {
        return StatusCode::BAD_REQUEST.into_response();
    };
    if filename.contains("..") || filename.contains('/') || subfolder.contains("..") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    if kind != "input" {
        // Only the input folder is kept by the fake.
        return StatusCode::BAD_REQUEST.into_response();
    }
    let key = |n: &str| {
        if subfolder.is_empty() {
            n.to_string()
        } else {
            format!("{subfolder}/{n}")
        }
    };
    let mut s = lock(&f.inner.server);
    let mut name = filename.clone();
    let mut i = 1;
    while !overwrite && s.uploads.get(&key(&name)).is_some_and(|b| *b != data) {
        let (stem, ext) = filename.rsplit_once('.').unwrap_or((&filename, ""));
        name = format!("{stem} ({i}).{ext}");
        i += 1;
    }
    s.uploads.insert(key(&name), data);
    Json(json!({"name": name, "subfolder": subfolder, "type": kind})).into_response()
}

async fn queue_length(State(f): State<ComfyFake>) -> Json<Value> {
    Json(json!({"exec_info": {"queue_remaining": f.queue_remaining()}}))
}

fn item_json(i: &Item) -> Value {
    json!([i.number, i.id, i.prompt, i.extra, i.outputs])
}

async fn queue(State(f): State<ComfyFake>) -> Json<Value> {
    let s = lock(&f.inner.server);
    let running: Vec<Value> = s.running.iter().map(|r| item_json(&r.item)).collect();
    let pending: Vec<Value> = s.pending.iter().map(item_json).collect();
    Json(json!({"queue_running": running, "queue_pending": pending}))
}

async fn edit_queue(State(f): State<ComfyFake>, body: Bytes) -> Response {
    let Ok(json) = serde_json::from_slice::<Value>(&body) else {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            "500 Internal Server Error",
        )
            .into_response();
    };
    let mut s = lock(&f.inner.server);
    if json["clear"].as_bool() == Some(true) {
        s.pending.clear();
    }
    if let Some(ids) = json["delete"].as_array() {
        s.pending
            .retain(|i| !ids.iter().any(|d| d.as_str() == Some(i.id.as_str())));
    }
    StatusCode::OK.into_response()
}

async fn interrupt(State(f): State<ComfyFake>, body: Bytes) -> StatusCode {
    let target = serde_json::from_slice::<Value>(&body)
        .ok()
        .and_then(|v| v["prompt_id"].as_str().map(str::to_string));
    let mut s = lock(&f.inner.server);
    if let Some(r) = s.running.as_mut()
        && target.as_deref().is_none_or(|t| t == r.item.id)
    {
        r.interrupted = true;
    }
    StatusCode::OK
}

#[derive(serde::Deserialize)]
struct HistoryQuery {
    max_items: Option<usize>,
}

async fn all_history(State(f): State<ComfyFake>, Query(q): Query<HistoryQuery>) -> Json<Value> {
    let s = lock(&f.inner.server);
    let skip = q.max_items.map_or(0, |n| s.history.len().saturating_sub(n));
    let map: Map<String, Value> = s.history[skip..].iter().cloned().collect();
    Json(Value::Object(map))
}

async fn one_history(State(f): State<ComfyFake>, Path(id): Path<String>) -> Json<Value> {
    let s = lock(&f.inner.server);
    let mut map = Map::new();
    if let Some((_, entry)) = s.history.iter().find(|(i, _)| *i == id) {
        map.insert(id, entry.clone());
    }
    Json(Value::Object(map))
}

#[derive(serde::Deserialize)]
struct ViewQuery {
    #[serde(default)]
    filename: String,
    #[serde(default)]
    subfolder: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

async fn view(State(f): State<ComfyFake>, Query(q): Query<ViewQuery>) -> Response {
    if q.filename.is_empty() {
        return StatusCode::NOT_FOUND.into_response();
    }
    if q.filename.starts_with('/') || q.filename.contains("..") {
        return StatusCode::BAD_REQUEST.into_response();
    }
    if q.subfolder.contains("..") {
        return StatusCode::FORBIDDEN.into_response();
    }
    if !matches!(
        q.kind.as_deref().unwrap_or("output"),
        "output" | "input" | "temp"
    ) {
        return StatusCode::BAD_REQUEST.into_response();
    }
    let s = lock(&f.inner.server);
    match s.files.get(&(q.subfolder.clone(), q.filename.clone())) {
        Some(bytes) => (
            [
                (header::CONTENT_TYPE, "image/png".to_string()),
                (
                    header::CONTENT_DISPOSITION,
                    format!("filename=\"{}\"", q.filename),
                ),
            ],
            bytes.clone(),
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

async fn system_stats() -> Json<Value> {
    Json(
        json!({"system": {"os": "linux", "ram_total": 68_719_476_736u64, "ram_free": 34_359_738_368u64,
        "comfyui_version": "0.4.0", "python_version": "3.12.3", "pytorch_version": "2.8.0",
        "embedded_python": false, "argv": ["main.py"]},
        "devices": [{"name": "cuda:0 NVIDIA L40S", "type": "cuda", "index": 0,
            "vram_total": 48_318_382_080u64, "vram_free": 47_000_000_000u64,
            "torch_vram_total": 0, "torch_vram_free": 0}]}),
    )
}

fn not_found() -> Response {
    // aiohttp's own 404, as a server without the jobs API answers.
    (StatusCode::NOT_FOUND, "404: Not Found").into_response()
}

async fn job(State(f): State<ComfyFake>, Path(id): Path<String>) -> Response {
    if !f.inner.opts.jobs_api {
        return not_found();
    }
    let s = lock(&f.inner.server);
    if let Some(r) = s.running.as_ref().filter(|r| r.item.id == id) {
        return Json(
            json!({"id": id, "status": "in_progress", "priority": r.item.number,
            "create_time": r.item.created, "outputs_count": 0, "previewable_outputs_count": 0}),
        )
        .into_response();
    }
    if let Some(i) = s.pending.iter().find(|i| i.id == id) {
        return Json(json!({"id": id, "status": "pending", "priority": i.number,
            "create_time": i.created, "outputs_count": 0, "previewable_outputs_count": 0}))
        .into_response();
    }
    let Some((_, entry)) = s.history.iter().find(|(i, _)| *i == id) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({"error": "Job not found"})),
        )
            .into_response();
    };
    let messages = entry["status"]["messages"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let at = |event: &str| {
        messages
            .iter()
            .find(|m| m[0] == event)
            .map(|m| m[1].clone())
    };
    let status = match entry["status"]["status_str"].as_str() {
        Some("error") if at("execution_interrupted").is_some() => "cancelled",
        Some("error") => "failed",
        _ => "completed",
    };
    let outputs = entry["outputs"].clone();
    let count = outputs.as_object().map_or(0, |o| {
        o.values()
            .map(|v| v["images"].as_array().map_or(0, Vec::len))
            .sum::<usize>()
    });
    let mut job = json!({"id": id, "status": status, "priority": entry["prompt"][0],
        "create_time": entry["prompt"][3]["create_time"],
        "execution_start_time": at("execution_start").map(|d| d["timestamp"].clone()),
        "execution_end_time": at("execution_success").or_else(|| at("execution_error"))
            .or_else(|| at("execution_interrupted")).map(|d| d["timestamp"].clone()),
        "outputs_count": count, "previewable_outputs_count": count,
        "outputs": outputs, "execution_status": entry["status"]});
    if let Some(error) = at("execution_error") {
        job["execution_error"] = error;
    }
    Json(job).into_response()
}

async fn cancel_job(State(f): State<ComfyFake>, Path(id): Path<String>) -> Response {
    if !f.inner.opts.jobs_api {
        return not_found();
    }
    let mut s = lock(&f.inner.server);
    let before = s.pending.len();
    s.pending.retain(|i| i.id != id);
    let mut cancelled = s.pending.len() < before;
    if let Some(r) = s.running.as_mut().filter(|r| r.item.id == id) {
        r.interrupted = true;
        cancelled = true;
    }
    Json(json!({ "cancelled": cancelled })).into_response()
}

#[derive(serde::Deserialize)]
struct CallsQuery {
    #[serde(default)]
    prompt_contains: String,
}

async fn calls(State(f): State<ComfyFake>, Query(q): Query<CallsQuery>) -> Json<Value> {
    let (calls, runs) = f.inner.ledger.per_prompt(&q.prompt_contains);
    Json(json!({ "calls": calls, "billed": runs }))
}

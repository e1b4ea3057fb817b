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

mod api;
mod graph;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;
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

pub(super) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
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
            .route("/prompt", post(api::submit).get(api::queue_length))
            .route("/queue", get(api::queue).post(api::edit_queue))
            .route("/history", get(api::all_history))
            .route("/history/{id}", get(api::one_history))
            .route("/interrupt", post(api::interrupt))
            .route("/view", get(api::view))
            .route("/upload/image", post(api::upload_image))
            .route("/system_stats", get(api::system_stats));
        let jobs = Router::new()
            .route("/api/jobs/{id}", get(api::job))
            .route("/api/jobs/{id}/cancel", post(api::cancel_job));
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
            .route("/_fake/calls", get(api::calls))
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

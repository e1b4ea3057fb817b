//! The fake ComfyUI server's HTTP API: submitting a prompt (its checks), uploads, the queue,
//! interrupts, history, saved images, the jobs API, and the admin counters.

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Map, Value, json};

use super::{ComfyFake, Fault, Item, graph, now_ms};
use crate::net::ResetHandle;
use crate::rules::lock;

/// `str(uuid.UUID(v)) == v`: lowercase, hyphenated, 8-4-4-4-12 hex.
fn canonical_uuid(v: &str) -> bool {
    let parts: Vec<&str> = v.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        })
}

fn bad(body: Value) -> Response {
    (StatusCode::BAD_REQUEST, Json(body)).into_response()
}

pub(super) async fn submit(
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
pub(super) async fn upload_image(
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

pub(super) async fn queue_length(State(f): State<ComfyFake>) -> Json<Value> {
    Json(json!({"exec_info": {"queue_remaining": f.queue_remaining()}}))
}

fn item_json(i: &Item) -> Value {
    json!([i.number, i.id, i.prompt, i.extra, i.outputs])
}

pub(super) async fn queue(State(f): State<ComfyFake>) -> Json<Value> {
    let s = lock(&f.inner.server);
    let running: Vec<Value> = s.running.iter().map(|r| item_json(&r.item)).collect();
    let pending: Vec<Value> = s.pending.iter().map(item_json).collect();
    Json(json!({"queue_running": running, "queue_pending": pending}))
}

pub(super) async fn edit_queue(State(f): State<ComfyFake>, body: Bytes) -> Response {
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

pub(super) async fn interrupt(State(f): State<ComfyFake>, body: Bytes) -> StatusCode {
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
pub(super) struct HistoryQuery {
    max_items: Option<usize>,
}

pub(super) async fn all_history(
    State(f): State<ComfyFake>,
    Query(q): Query<HistoryQuery>,
) -> Json<Value> {
    let s = lock(&f.inner.server);
    let skip = q.max_items.map_or(0, |n| s.history.len().saturating_sub(n));
    let map: Map<String, Value> = s.history[skip..].iter().cloned().collect();
    Json(Value::Object(map))
}

pub(super) async fn one_history(State(f): State<ComfyFake>, Path(id): Path<String>) -> Json<Value> {
    let s = lock(&f.inner.server);
    let mut map = Map::new();
    if let Some((_, entry)) = s.history.iter().find(|(i, _)| *i == id) {
        map.insert(id, entry.clone());
    }
    Json(Value::Object(map))
}

#[derive(serde::Deserialize)]
pub(super) struct ViewQuery {
    #[serde(default)]
    filename: String,
    #[serde(default)]
    subfolder: String,
    #[serde(default, rename = "type")]
    kind: Option<String>,
}

pub(super) async fn view(State(f): State<ComfyFake>, Query(q): Query<ViewQuery>) -> Response {
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

pub(super) async fn system_stats() -> Json<Value> {
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

pub(super) async fn job(State(f): State<ComfyFake>, Path(id): Path<String>) -> Response {
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

pub(super) async fn cancel_job(State(f): State<ComfyFake>, Path(id): Path<String>) -> Response {
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
pub(super) struct CallsQuery {
    #[serde(default)]
    prompt_contains: String,
}

pub(super) async fn calls(State(f): State<ComfyFake>, Query(q): Query<CallsQuery>) -> Json<Value> {
    let (calls, runs) = f.inner.ledger.per_prompt(&q.prompt_contains);
    Json(json!({ "calls": calls, "billed": runs }))
}

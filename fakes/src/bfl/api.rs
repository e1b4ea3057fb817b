//! The API's endpoints: submit a task, poll its result, fetch its sample.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use serde_json::{Value, json};

use super::{BflFake, Fate, Fault, Task};
use crate::net::{self, ResetHandle};
use crate::rules::lock;

/// The models the fake knows (the API's names; others are 404).
const MODELS: &[&str] = &[
    "flux-2-pro",
    "flux-2-max",
    "flux-2-flex",
    "flux-2-klein-4b",
    "flux-2-klein-9b",
    "flux-kontext-pro",
    "flux-kontext-max",
    "flux-pro-1.1",
    "flux-pro-1.1-ultra",
    "flux-dev",
];

fn detail(status: StatusCode, detail: Value) -> Response {
    (status, Json(json!({ "detail": detail }))).into_response()
}

pub(super) async fn not_found() -> Response {
    detail(StatusCode::NOT_FOUND, json!("Not Found"))
}

impl BflFake {
    fn authorized(&self, headers: &HeaderMap) -> Result<(), Box<Response>> {
        let key = headers.get("x-key").and_then(|v| v.to_str().ok());
        match (key, &self.inner.opts.api_key) {
            (None, _) => Err(Box::new(detail(
                StatusCode::FORBIDDEN,
                json!("Not authenticated"),
            ))),
            (Some(k), Some(want)) if k != want => Err(Box::new(detail(
                StatusCode::FORBIDDEN,
                json!("Invalid API key"),
            ))),
            (Some(k), _) if k.trim().is_empty() => Err(Box::new(detail(
                StatusCode::FORBIDDEN,
                json!("Invalid API key"),
            ))),
            _ => Ok(()),
        }
    }

    fn error(&self, response: Response) -> Response {
        self.inner.ledger.error(response.status().as_u16());
        response
    }
}

/// FastAPI's answer to a request that does not validate.
fn unprocessable(field: &str, msg: &str, kind: &str) -> Box<Response> {
    Box::new(detail(
        StatusCode::UNPROCESSABLE_ENTITY,
        json!([{"loc": ["body", field], "msg": msg, "type": kind}]),
    ))
}

struct Valid {
    prompt: String,
    width: u32,
    height: u32,
    seed: u64,
    output_format: String,
    /// The reference images: their digests (or `url:` and the URL).
    inputs: Vec<String>,
}

fn validate(body: &Value) -> Result<Valid, Box<Response>> {
    let prompt = match body.get("prompt") {
        Some(Value::String(p)) if !p.trim().is_empty() => p.clone(),
        Some(Value::String(_)) => {
            return Err(unprocessable(
                "prompt",
                "String should have at least 1 character",
                "string_too_short",
            ));
        }
        _ => return Err(unprocessable("prompt", "Field required", "missing")),
    };
    let side = |name: &str| -> Result<u32, Box<Response>> {
        match body.get(name) {
            None | Some(Value::Null) => Ok(1024),
            Some(v) => {
                let n = v.as_u64().ok_or_else(|| {
                    unprocessable(name, "Input should be a valid integer", "int_type")
                })?;
                if !(64..=4096).contains(&n) {
                    return Err(unprocessable(
                        name,
                        "Input should be between 64 and 4096",
                        "value_error",
                    ));
                }
                if n % 16 != 0 {
                    return Err(unprocessable(
                        name,
                        "Input should be a multiple of 16",
                        "multiple_of",
                    ));
                }
                Ok(n as u32)
            }
        }
    };
    let (width, height) = (side("width")?, side("height")?);
    if u64::from(width) * u64::from(height) > 4_194_304 {
        return Err(unprocessable(
            "width",
            "The image may have at most 4 megapixels",
            "value_error",
        ));
    }
    let seed = match body.get("seed") {
        None | Some(Value::Null) => fastrand::u64(..u64::from(u32::MAX)),
        Some(v) => v
            .as_u64()
            .ok_or_else(|| unprocessable("seed", "Input should be a valid integer", "int_type"))?,
    };
    let output_format = match body.get("output_format") {
        None | Some(Value::Null) => "jpeg".to_string(),
        Some(Value::String(f)) if f == "jpeg" || f == "png" => f.clone(),
        Some(_) => {
            return Err(unprocessable(
                "output_format",
                "Input should be 'jpeg' or 'png'",
                "enum",
            ));
        }
    };
    // Reference images: input_image, input_image_2 .. input_image_8, each a URL or base64.
    let mut inputs = Vec::new();
    for i in 1..=8 {
        let name = if i == 1 {
            "input_image".to_string()
        } else {
            format!("input_image_{i}")
        };
        match body.get(&name) {
            None | Some(Value::Null) => {}
            Some(Value::String(v)) if v.starts_with("https://") || v.starts_with("http://") => {
                inputs.push(format!("url:{v}"));
            }
            Some(Value::String(v)) => {
                let Ok(bytes) = base64_simd::STANDARD.decode_to_vec(v.as_bytes()) else {
                    return Err(unprocessable(
                        &name,
                        "Input should be a valid URL or base64 encoded image",
                        "value_error",
                    ));
                };
                inputs.push(crate::digest(&bytes));
            }
            Some(_) => {
                return Err(unprocessable(
                    &name,
                    "Input should be a valid string",
                    "string_type",
                ));
            }
        }
    }
    Ok(Valid {
        prompt,
        width,
        height,
        seed,
        output_format,
        inputs,
    })
}

pub(super) async fn submit(
    State(api): State<BflFake>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    Path(model): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Spawned: a client that gives up does not take back a task the API accepted.
    match tokio::spawn(api.clone().accept(model, headers, body)).await {
        Ok(Some(response)) => response,
        Ok(None) => net::reset(conn),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

impl BflFake {
    async fn accept(self, model: String, headers: HeaderMap, body: Bytes) -> Option<Response> {
        let parsed = serde_json::from_slice::<Value>(&body).ok();
        let prompt = parsed
            .as_ref()
            .and_then(|v| v.get("prompt")?.as_str().map(str::to_string));
        self.inner.ledger.request(prompt.as_deref());
        if let Err(refused) = self.authorized(&headers) {
            return Some(self.error(*refused));
        }
        if !MODELS.contains(&model.as_str()) {
            return Some(self.error(not_found().await));
        }
        let Some(parsed) = parsed else {
            return Some(self.error(*unprocessable("body", "JSON decode error", "json_invalid")));
        };
        let valid = match validate(&parsed) {
            Ok(v) => v,
            Err(refused) => return Some(self.error(*refused)),
        };
        tokio::time::sleep(self.inner.opts.latency).await;
        let fault = self.inner.rules.take(Some(&valid.prompt));
        let fate = match fault {
            Some(Fault::TooManyActive) => return Some(self.error(over_cap())),
            Some(Fault::NoCredits) => {
                return Some(self.error(detail(
                    StatusCode::PAYMENT_REQUIRED,
                    json!("Insufficient credits. Add credits at https://dashboard.bfl.ai"),
                )));
            }
            Some(Fault::Unavailable) => {
                return Some(self.error(detail(
                    StatusCode::SERVICE_UNAVAILABLE,
                    json!("Service temporarily unavailable"),
                )));
            }
            Some(Fault::RequestModerated) => Fate::RequestModerated,
            Some(Fault::ContentModerated) => Fate::ContentModerated,
            Some(Fault::TaskError) => Fate::Error,
            Some(Fault::NeverCompletes) => Fate::NeverCompletes,
            Some(Fault::SampleExpired) => Fate::SampleExpired,
            Some(Fault::ResetAfterSubmit) | None => Fate::Normal,
        };
        if self.active() >= self.inner.opts.max_active {
            return Some(self.error(over_cap()));
        }
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let id = format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            fastrand::u32(..),
            seq & 0xffff,
            fastrand::u16(..0xfff),
            fastrand::u16(..0xfff),
            fastrand::u64(..1 << 48)
        );
        let megapixels = f64::from(valid.width) * f64::from(valid.height) / 1e6;
        lock(&self.inner.tasks).insert(
            id.clone(),
            Task {
                prompt: valid.prompt.clone(),
                seed: valid.seed,
                width: valid.width,
                height: valid.height,
                output_format: valid.output_format,
                ready_at: Instant::now() + self.inner.opts.generation,
                fate,
                sample: None,
            },
        );
        self.inner.ledger.billed(&valid.prompt, 1);
        lock(&self.inner.inputs).push(valid.inputs);
        if matches!(fault, Some(Fault::ResetAfterSubmit)) {
            return None;
        }
        let host = headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or("127.0.0.1");
        Some(
            Json(json!({
                "id": id,
                "polling_url": format!("http://{host}/v1/get_result?id={id}"),
                "cost": (megapixels * 3.0 * 10.0).round() / 10.0,
                "input_mp": 0.0,
                "output_mp": (megapixels * 100.0).round() / 100.0,
            }))
            .into_response(),
        )
    }
}

fn over_cap() -> Response {
    detail(
        StatusCode::TOO_MANY_REQUESTS,
        json!(
            "You have exceeded the number of active tasks (24). Please wait for some tasks to finish."
        ),
    )
}

/// `GET /v1/credits`: what the account has left.
pub(super) async fn credits(State(api): State<BflFake>, headers: HeaderMap) -> Response {
    if let Err(refused) = api.authorized(&headers) {
        return *refused;
    }
    let spent = api.inner.ledger.stats().billed as f64 * 3.0;
    Json(json!({ "credits": (10_000.0 - spent).max(0.0) })).into_response()
}

#[derive(serde::Deserialize)]
pub(super) struct ResultQuery {
    #[serde(default)]
    id: String,
}

pub(super) async fn get_result(
    State(api): State<BflFake>,
    Query(q): Query<ResultQuery>,
    headers: HeaderMap,
) -> Response {
    if let Err(refused) = api.authorized(&headers) {
        return *refused;
    }
    api.inner.polls.fetch_add(1, Ordering::Relaxed);
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("127.0.0.1")
        .to_string();
    let now = Instant::now();
    let mut tasks = lock(&api.inner.tasks);
    let Some(task) = tasks.get_mut(&q.id) else {
        return Json(json!({"id": q.id, "status": "Task not found", "result": null}))
            .into_response();
    };
    let status = |s: &str| Json(json!({"id": q.id, "status": s, "result": null, "progress": null}));
    match task.fate {
        Fate::RequestModerated => {
            return Json(
                json!({"id": q.id, "status": "Request Moderated", "result": null,
                "details": {"Moderation Reasons": ["Derivative Works Filter"]}}),
            )
            .into_response();
        }
        Fate::NeverCompletes => return status("Pending").into_response(),
        _ if now < task.ready_at => {
            let left = task.ready_at - now;
            let total = api.inner.opts.generation.as_secs_f64().max(1e-3);
            let progress = (1.0 - left.as_secs_f64() / total).clamp(0.0, 0.99);
            return Json(
                json!({"id": q.id, "status": "Pending", "result": null, "progress": progress}),
            )
            .into_response();
        }
        Fate::ContentModerated => {
            return Json(
                json!({"id": q.id, "status": "Content Moderated", "result": null,
                "details": {"Moderation Reasons": ["Content Moderated"]}}),
            )
            .into_response();
        }
        Fate::Error => return status("Error").into_response(),
        Fate::Normal | Fate::SampleExpired => {}
    }
    if task.sample.is_none() {
        let image = api.inner.png.encode(&format!("{} #{}", task.prompt, q.id));
        let made = if task.fate == Fate::SampleExpired {
            now.checked_sub(api.inner.opts.sample_ttl + Duration::from_secs(1))
                .unwrap_or(now)
        } else {
            now
        };
        task.sample = Some((Bytes::from(image), made));
    }
    let expires = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        + api.inner.opts.sample_ttl;
    let started = task.ready_at - api.inner.opts.generation;
    Json(json!({
        "id": q.id,
        "status": "Ready",
        "result": {
            "sample": format!("http://{host}/_fake/samples/{}.png?se={}&sp=r&sig={:016x}",
                q.id, expires.as_secs(), fastrand::u64(..)),
            "prompt": task.prompt,
            "seed": task.seed,
            "width": task.width,
            "height": task.height,
            "output_format": task.output_format,
            "start_time": 0,
            "end_time": 0,
            "duration": (task.ready_at - started).as_secs_f64(),
        },
        "progress": null,
    }))
    .into_response()
}

/// A sample, by its signed URL (no key: the signature is the credential), while it is valid.
pub(super) async fn sample(State(api): State<BflFake>, Path(name): Path<String>) -> Response {
    let id = name.trim_end_matches(".png");
    let tasks = lock(&api.inner.tasks);
    match tasks.get(id).and_then(|t| t.sample.clone()) {
        Some((bytes, made)) if made.elapsed() <= api.inner.opts.sample_ttl => {
            ([(header::CONTENT_TYPE, "image/png")], bytes).into_response()
        }
        _ => (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "application/xml")],
            "<?xml version=\"1.0\" encoding=\"utf-8\"?><Error><Code>AuthenticationFailed</Code>\
             <Message>Signed expiry time has to be after signed start time</Message></Error>",
        )
            .into_response(),
    }
}

//! `POST /v1beta/models/MODEL:generateContent`: the key first, then the request's shape, then an
//! injected fault or the project's quotas, then the answer.

use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::Extension;
use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::{Fault, GeminiFake};
use crate::net::{self, ResetHandle};
use crate::rules::lock;

/// The aspect ratios `imageConfig.aspectRatio` takes.
pub const ASPECT_RATIOS: &[&str] = &[
    "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9",
];
/// The sizes `imageConfig.imageSize` takes.
pub const IMAGE_SIZES: &[&str] = &["1K", "2K", "4K"];

const TOP_LEVEL: &[&str] = &[
    "contents",
    "generationConfig",
    "generation_config",
    "safetySettings",
    "safety_settings",
    "systemInstruction",
    "system_instruction",
    "tools",
    "toolConfig",
    "tool_config",
    "cachedContent",
    "cached_content",
];

/// An error answer in the shape of google.rpc.Status.
struct ApiError {
    status: StatusCode,
    body: Value,
}

impl ApiError {
    fn new(status: u16, grpc: &str, message: &str, details: Value) -> Self {
        let mut error = json!({"code": status, "message": message, "status": grpc});
        if details.as_array().is_some_and(|d| !d.is_empty()) {
            error["details"] = details;
        }
        Self {
            status: StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            body: json!({ "error": error }),
        }
    }

    fn invalid(message: &str) -> Self {
        Self::new(400, "INVALID_ARGUMENT", message, json!([]))
    }

    fn quota(per: &str, retry_delay_secs: f64) -> Self {
        let quota_id = format!("GenerateRequestsPer{per}PerProjectPerModel");
        Self::new(
            429,
            "RESOURCE_EXHAUSTED",
            &format!(
                "You exceeded your current quota, please check your plan and billing details.\n* \
                 Quota exceeded for metric: generativelanguage.googleapis.com/generate_content_requests, \
                 limit: 0\nPlease retry in {retry_delay_secs}s."
            ),
            json!([
                {"@type": "type.googleapis.com/google.rpc.QuotaFailure", "violations": [{
                    "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                    "quotaId": quota_id,
                }]},
                {"@type": "type.googleapis.com/google.rpc.Help", "links": [{
                    "description": "Learn more about Gemini API quotas",
                    "url": "https://ai.google.dev/gemini-api/docs/rate-limits"}]},
                {"@type": "type.googleapis.com/google.rpc.RetryInfo",
                 "retryDelay": format!("{}s", retry_delay_secs.ceil() as u64)},
            ]),
        )
    }

    fn into_response(self) -> Response {
        (
            self.status,
            [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
            self.body.to_string(),
        )
            .into_response()
    }
}

/// A request the API would take.
struct Request {
    model: String,
    prompt: String,
    wants_image: bool,
    image_size: String,
}

pub(super) async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        [(header::CONTENT_TYPE, "text/html; charset=UTF-8")],
        "<!DOCTYPE html><html><title>Error 404 (Not Found)!!1</title></html>",
    )
        .into_response()
}

/// `GET /v1beta/models/MODEL`: the model's description, to a client with a valid key.
pub(super) async fn get_model(
    State(api): State<GeminiFake>,
    Path(model): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    // The key check of a generation, on a call that buys nothing.
    if let Err(e) = api.check(
        &format!("{model}:generateContent"),
        query.as_deref(),
        &headers,
        Some(&json!({"contents": [{"parts": [{"text": "-"}]}]})),
    ) && e.status != StatusCode::NOT_FOUND
    {
        return e.into_response();
    }
    ok(json!({
        "name": format!("models/{model}"),
        "version": "001",
        "displayName": model,
        "inputTokenLimit": 32768,
        "outputTokenLimit": 32768,
        "supportedGenerationMethods": ["generateContent", "countTokens"],
    }))
}

pub(super) async fn generate_content(
    State(api): State<GeminiFake>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    Path(call): Path<String>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Spawned: a client that gives up does not stop (or unbill) the work.
    match tokio::spawn(api.process(call, query, headers, body)).await {
        Ok(Some(response)) => response,
        Ok(None) => net::reset(conn),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

impl GeminiFake {
    /// The answer, or `None` to reset the connection.
    async fn process(
        self,
        call: String,
        query: Option<String>,
        headers: HeaderMap,
        body: Bytes,
    ) -> Option<Response> {
        let seq = self.inner.seq.fetch_add(1, Ordering::Relaxed);
        let parsed = serde_json::from_slice::<Value>(&body).ok();
        let prompt = parsed.as_ref().and_then(prompt_of);
        self.inner.ledger.request(prompt.as_deref());
        let result = self.check(&call, query.as_deref(), &headers, parsed.as_ref());
        let request = match result {
            Ok(request) => request,
            Err(e) => return Some(self.error(e)),
        };
        let mut latency = *lock(&self.inner.latency);
        match self.inner.rules.take(Some(&request.prompt)) {
            Some(Fault::RateLimited { retry_delay_secs }) => {
                return Some(self.error(ApiError::quota("Minute", retry_delay_secs)));
            }
            Some(Fault::DailyQuota) => return Some(self.error(ApiError::quota("Day", 36.0))),
            Some(Fault::ServerError { status }) => {
                let (grpc, message) = match status {
                    503 => (
                        "UNAVAILABLE",
                        "The model is overloaded. Please try again later.",
                    ),
                    504 => (
                        "DEADLINE_EXCEEDED",
                        "Deadline expired before operation could complete.",
                    ),
                    _ => (
                        "INTERNAL",
                        "An internal error has occurred. Please retry or report in https://developers.generativeai.google/guide/troubleshooting",
                    ),
                };
                tokio::time::sleep(latency).await;
                return Some(self.error(ApiError::new(status, grpc, message, json!([]))));
            }
            Some(Fault::BlockedPrompt { reason }) => {
                self.inner.ledger.billed(&request.prompt, 0);
                return Some(ok(json!({
                    "promptFeedback": {"blockReason": reason},
                    "usageMetadata": usage(&request, 0),
                    "modelVersion": request.model,
                    "responseId": response_id(seq),
                })));
            }
            Some(Fault::RefusedImage { reason }) => {
                tokio::time::sleep(latency).await;
                self.inner.ledger.billed(&request.prompt, 0);
                return Some(ok(json!({
                    "candidates": [{"content": {"role": "model", "parts": [
                        {"text": "I'm unable to create this image."}]},
                        "finishReason": reason, "index": 0}],
                    "usageMetadata": usage(&request, 0),
                    "modelVersion": request.model,
                    "responseId": response_id(seq),
                })));
            }
            Some(Fault::TextOnly) => {
                tokio::time::sleep(latency).await;
                self.inner.ledger.billed(&request.prompt, 0);
                return Some(ok(json!({
                    "candidates": [{"content": {"role": "model", "parts": [
                        {"text": "What kind of fox would you like?"}]},
                        "finishReason": "STOP", "index": 0}],
                    "usageMetadata": usage(&request, 0),
                    "modelVersion": request.model,
                    "responseId": response_id(seq),
                })));
            }
            Some(Fault::Hang { secs }) => {
                latency += Duration::try_from_secs_f64(secs).unwrap_or_default();
            }
            Some(Fault::ResetAfterBilling) => {
                tokio::time::sleep(latency).await;
                self.inner.ledger.billed(&request.prompt, 1);
                return None;
            }
            None => {}
        }
        if let Err(e) = self.admit() {
            return Some(self.error(e));
        }
        tokio::time::sleep(latency).await;
        if !request.wants_image {
            self.inner.ledger.billed(&request.prompt, 0);
            return Some(ok(json!({
                "candidates": [{"content": {"role": "model", "parts": [{"text": "A fox."}]},
                    "finishReason": "STOP", "index": 0}],
                "usageMetadata": usage(&request, 0),
                "modelVersion": request.model,
                "responseId": response_id(seq),
            })));
        }
        let mut data = String::new();
        self.inner
            .png
            .write_b64(&format!("{} #{seq}", request.prompt), &mut data);
        self.inner.ledger.billed(&request.prompt, 1);
        Some(ok(json!({
            "candidates": [{"content": {"role": "model", "parts": [
                {"text": "Here is the image you asked for."},
                {"inlineData": {"mimeType": "image/png", "data": data}}]},
                "finishReason": "STOP", "index": 0}],
            "usageMetadata": usage(&request, 1),
            "modelVersion": request.model,
            "responseId": response_id(seq),
        })))
    }

    fn error(&self, e: ApiError) -> Response {
        self.inner.ledger.error(e.status.as_u16());
        e.into_response()
    }

    /// The project's quotas: per day first (it says so), then per minute.
    fn admit(&self) -> Result<(), ApiError> {
        if let Some(limit) = self.inner.per_day
            && self.inner.today.fetch_add(1, Ordering::Relaxed) >= limit
        {
            return Err(ApiError::quota("Day", 36.0));
        }
        if let Some(bucket) = lock(&self.inner.per_minute).as_mut()
            && let Err(wait) = bucket.try_take(1.0)
        {
            return Err(ApiError::quota("Minute", wait.as_secs_f64().max(1.0)));
        }
        Ok(())
    }

    fn check(
        &self,
        call: &str,
        query: Option<&str>,
        headers: &HeaderMap,
        body: Option<&Value>,
    ) -> Result<Request, ApiError> {
        let key = headers
            .get("x-goog-api-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .or_else(|| {
                query?
                    .split('&')
                    .find_map(|kv| kv.strip_prefix("key=").map(str::to_string))
            });
        match (key, &self.inner.api_key) {
            (None, _) => {
                return Err(ApiError::new(
                    403,
                    "PERMISSION_DENIED",
                    "Method doesn't allow unregistered callers (callers without established \
                     identity). Please use API Key or other form of API consumer identity to call \
                     this API.",
                    json!([]),
                ));
            }
            (Some(k), Some(want)) if k != *want => return Err(bad_key()),
            (Some(k), _) if k.trim().is_empty() => return Err(bad_key()),
            _ => {}
        }
        let Some((model, "generateContent")) = call.split_once(':') else {
            return Err(ApiError::new(
                404,
                "NOT_FOUND",
                &format!("Method not found: {call}"),
                json!([]),
            ));
        };
        let body = body
            .ok_or_else(|| ApiError::invalid("Invalid JSON payload received. Unexpected token."))?;
        let object = body.as_object().ok_or_else(|| {
            ApiError::invalid("Invalid JSON payload received. Expected an object.")
        })?;
        if let Some(unknown) = object.keys().find(|k| !TOP_LEVEL.contains(&k.as_str())) {
            return Err(ApiError::invalid(&format!(
                "Invalid JSON payload received. Unknown name \"{unknown}\": Cannot find field."
            )));
        }
        let prompt = prompt_of(body).ok_or_else(|| {
            ApiError::invalid("* GenerateContentRequest.contents: contents is not specified")
        })?;
        let inputs = input_images(body)?;
        let config = object
            .get("generationConfig")
            .or_else(|| object.get("generation_config"));
        let field = |v: Option<&Value>, camel: &str, snake: &str| {
            v.and_then(|v| v.get(camel).or_else(|| v.get(snake)))
                .cloned()
        };
        let modalities = field(config, "responseModalities", "response_modalities");
        let wants_image = modalities
            .as_ref()
            .and_then(Value::as_array)
            .is_some_and(|m| {
                m.iter()
                    .any(|v| v.as_str().is_some_and(|s| s.eq_ignore_ascii_case("IMAGE")))
            });
        if !model.contains("image") {
            if wants_image {
                return Err(ApiError::invalid(
                    "Model does not support the requested response modalities: image",
                ));
            }
            return Err(ApiError::new(
                404,
                "NOT_FOUND",
                &format!(
                    "models/{model} is not found for API version v1beta, or is not supported for generateContent."
                ),
                json!([]),
            ));
        }
        let image_config = field(config, "imageConfig", "image_config");
        let ratio = field(image_config.as_ref(), "aspectRatio", "aspect_ratio");
        if let Some(r) = &ratio
            && !r.as_str().is_some_and(|r| ASPECT_RATIOS.contains(&r))
        {
            return Err(ApiError::invalid(&format!(
                "* GenerateContentRequest.generation_config.image_config.aspect_ratio: unsupported aspect ratio {r}"
            )));
        }
        let size = field(image_config.as_ref(), "imageSize", "image_size");
        if let Some(s) = &size
            && !s.as_str().is_some_and(|s| IMAGE_SIZES.contains(&s))
        {
            return Err(ApiError::invalid(&format!(
                "* GenerateContentRequest.generation_config.image_config.image_size: unsupported image size {s}"
            )));
        }
        lock(&self.inner.inputs).push(inputs);
        Ok(Request {
            model: model.to_string(),
            prompt,
            wants_image,
            image_size: size
                .and_then(|s| s.as_str().map(str::to_string))
                .unwrap_or_else(|| "1K".into()),
        })
    }
}

fn bad_key() -> ApiError {
    ApiError::new(
        400,
        "INVALID_ARGUMENT",
        "API key not valid. Please pass a valid API key.",
        json!([{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID",
                "domain": "googleapis.com",
                "metadata": {"service": "generativelanguage.googleapis.com"}}]),
    )
}

/// The images of the request's parts (`inline_data` or `inlineData`: `mime_type`, base64
/// `data`), as digests; a part the API could not read is its 400.
fn input_images(body: &Value) -> Result<Vec<String>, ApiError> {
    let mut out = Vec::new();
    let contents = body.get("contents").and_then(Value::as_array);
    for (c, content) in contents.into_iter().flatten().enumerate() {
        let parts = content.get("parts").and_then(Value::as_array);
        for (p, part) in parts.into_iter().flatten().enumerate() {
            let Some(inline) = part.get("inline_data").or_else(|| part.get("inlineData")) else {
                continue;
            };
            let mime = inline
                .get("mime_type")
                .or_else(|| inline.get("mimeType"))
                .and_then(Value::as_str)
                .unwrap_or("");
            if !matches!(
                mime,
                "image/png" | "image/jpeg" | "image/webp" | "image/heic" | "image/heif"
            ) {
                return Err(ApiError::invalid(&format!(
                    "Unsupported MIME type: {mime} at contents[{c}].parts[{p}].inline_data"
                )));
            }
            let data = inline.get("data").and_then(Value::as_str).unwrap_or("");
            let Ok(bytes) = base64_simd::STANDARD.decode_to_vec(data.as_bytes()) else {
                return Err(ApiError::invalid(&format!(
                    "Invalid value at 'contents[{c}].parts[{p}].inline_data.data' (TYPE_BYTES), \
                     Base64 decoding failed"
                )));
            };
            out.push(crate::digest(&bytes));
        }
    }
    Ok(out)
}

/// The text of the request's last turn.
fn prompt_of(body: &Value) -> Option<String> {
    let contents = body.get("contents")?.as_array()?;
    let parts = contents.last()?.get("parts")?.as_array()?;
    let text: Vec<&str> = parts
        .iter()
        .filter_map(|p| p.get("text")?.as_str())
        .collect();
    (!text.is_empty()).then(|| text.join("\n"))
}

fn response_id(seq: u64) -> String {
    format!("fk{seq:016x}{:08x}", fastrand::u32(..))
}

/// The usage of an answer: about four characters a prompt token, and the documented output
/// tokens of an image by its size.
fn usage(request: &Request, images: u64) -> Value {
    let prompt = (request.prompt.chars().count() as u64).div_ceil(4);
    let per_image = match request.image_size.as_str() {
        "2K" => 1680,
        "4K" => 2520,
        _ => 1290,
    };
    let out = per_image * images;
    json!({
        "promptTokenCount": prompt,
        "candidatesTokenCount": out,
        "totalTokenCount": prompt + out,
        "promptTokensDetails": [{"modality": "TEXT", "tokenCount": prompt}],
        "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": out}],
    })
}

fn ok(body: Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json; charset=UTF-8")],
        body.to_string(),
    )
        .into_response()
}

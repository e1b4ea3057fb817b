//! The OpenAI Images API (`POST {base_url}/images/generations`) and compatible hosts (Azure
//! OpenAI's v1 surface, Together, DeepInfra, ...): synchronous, up to 10 images a call, sizes and
//! formats as open strings. Its answers are read in [`answer`], its errors and rate-limit headers
//! in [`errors`].

/// Reading its answers, error bodies and rate-limit headers: in the core crate, fuzzed there.
pub use imagegen_core::openai::{answer, errors, stream};

pub mod batch;
mod edits;

use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::{Map, Value};

use self::answer::ImageBytes;
use self::errors::{ApiErrorBody, classify, rate_limits};
use self::stream::AnswerReader;
use super::azure::entra::EntraTokens;
use super::buffers::BufferPool;
use super::download::Downloads;
use super::fetch::FetchRules;
use super::http::{
    Clock, api_client, billed_failure, header_str, retry_after, secret_header, with_request_id,
};
use super::{
    Answer, BatchFiles, Capabilities, GeneratedImage, Generation, ImageProvider, ImageRequest,
    JobDefaults, Journal, Mode, Size, Sizes, check_image,
};
use crate::config::{AuthScheme, OpenAiSettings};
use crate::domain::cost::Usage;
use crate::domain::error::Failure;

const CAPABILITIES: Capabilities = Capabilities {
    images_per_call: 10,
    sizes: Sizes::Any,
    formats: None,
    seed: false,
    negative_prompt: false,
    transparency: true,
    mode: Mode::Synchronous,
    references: 16,
    mask: true,
    // The request fields of the Images API that have no neutral field (image-apis.md), and
    // `style` of the DALL-E-style hosts that still take it.
    params: &["user", "moderation", "output_compression", "style"],
};

/// Where its requests go.
pub(crate) enum Target {
    /// `{images}/generations` and `{images}/edits` (`{images}` is `{base}/images`), the model
    /// in the body.
    Fixed(String),
    /// `{base}/{model}/images/{generations|edits}?api-version=V`: Azure's classic deployment
    /// URLs, the query after the path (never a path joined after a query).
    Deployments { base: String, api_version: String },
}

impl Target {
    /// The URL of `endpoint` (`generations` or `edits`) for `model`.
    fn url(&self, model: &str, endpoint: &str) -> String {
        match self {
            Target::Fixed(images) => format!("{images}/{endpoint}"),
            Target::Deployments { base, api_version } => {
                let mut url = reqwest::Url::parse(base).expect("validated at start-up");
                url.path_segments_mut()
                    .expect("an http(s) URL")
                    .pop_if_empty()
                    .extend([model, "images", endpoint]);
                url.query_pairs_mut()
                    .append_pair("api-version", api_version);
                url.into()
            }
        }
    }
}

pub struct OpenAi {
    /// `openai`, or the kind of a host that speaks its protocol.
    kind: &'static str,
    capabilities: &'static Capabilities,
    client: reqwest::Client,
    target: Target,
    /// The cheapest authenticated `GET`, for `imagegen providers`.
    check_url: String,
    /// Bearer tokens fetched per request (Entra ID), when the client holds no key of its own.
    tokens: Option<std::sync::Arc<EntraTokens>>,
    /// For images answered by URL (pre-signed, maybe on another host: no API key).
    downloads: Downloads,
    request_timeout: Duration,
    response_format: Option<String>,
    max_response_bytes: usize,
    /// The worker's answer memory: answers are read into its buffers once it has room for them,
    /// decoded in place and uploaded from there.
    buffers: BufferPool,
    defaults: JobDefaults,
}

/// The key, as the account's API takes it (`Authorization: Bearer`, or `api-key`).
pub(crate) fn auth_headers(settings: &OpenAiSettings) -> anyhow::Result<HeaderMap> {
    let mut headers = HeaderMap::new();
    let key = settings.api_key.expose_secret();
    let (name, value) = match settings.auth {
        AuthScheme::Bearer => ("authorization", format!("Bearer {key}")),
        AuthScheme::ApiKey => ("api-key", key.to_string()),
    };
    if !key.is_empty() {
        headers.insert(name, secret_header(&value)?);
    }
    Ok(headers)
}

fn optional(s: &str) -> Option<String> {
    Some(s.to_string()).filter(|s| !s.is_empty())
}

impl OpenAi {
    /// `buffers`: the worker's answer memory, shared by its providers.
    pub fn new(settings: &OpenAiSettings, buffers: BufferPool) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let client = api_client(
            auth_headers(settings)?,
            Duration::from_secs(settings.connect_timeout_secs),
        )?;
        let base = settings.base_url.trim_end_matches('/');
        Ok(Self {
            kind: "openai",
            capabilities: &CAPABILITIES,
            client,
            target: Target::Fixed(format!("{base}/images")),
            check_url: format!("{base}/models/{}", settings.model),
            tokens: None,
            downloads: Downloads::new(
                FetchRules::exempting(
                    std::iter::once(settings.base_url.as_str())
                        .chain(settings.download_hosts.iter().map(String::as_str)),
                ),
                Duration::from_secs(settings.connect_timeout_secs),
                Duration::from_secs(settings.request_timeout_secs),
                settings.max_response_bytes,
                buffers.clone(),
            ),
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
            response_format: optional(&settings.response_format),
            max_response_bytes: settings.max_response_bytes,
            buffers,
            defaults: JobDefaults {
                model: settings.model.clone(),
                size: settings.size.clone(),
                quality: optional(&settings.quality),
                output_format: optional(&settings.output_format),
                background: optional(&settings.background),
            },
        })
    }

    /// The same protocol at another host's URLs: Azure OpenAI's (`kind`, what it can make, where
    /// its requests and its check go, and its tokens when it has no key).
    pub(crate) fn speaking_for(
        mut self,
        kind: &'static str,
        capabilities: &'static Capabilities,
        target: Target,
        check_url: String,
        tokens: Option<std::sync::Arc<EntraTokens>>,
    ) -> Self {
        self.kind = kind;
        self.capabilities = capabilities;
        self.target = target;
        self.check_url = check_url;
        self.tokens = tokens;
        self
    }

    /// One request; with Entra ID tokens, a refused token is dropped and the request made once
    /// more with a fresh one (a 401 is never billed).
    async fn generate(&self, request: &ImageRequest) -> Result<Generation, Failure> {
        match self.call(request).await {
            Err(Failure::Stop {
                reason: crate::domain::error::StopReason::Unauthorized,
                ..
            }) if self.tokens.is_some() => {
                if let Some(tokens) = &self.tokens {
                    tokens.forget().await;
                }
                tracing::info!("the provider refused the Entra ID token: asking for a new one");
                self.call(request).await
            }
            other => other,
        }
    }

    /// The request body: the job's `params`, then the fields the worker controls over them.
    fn body(&self, request: &ImageRequest) -> Value {
        let mut body: Map<String, Value> = request.params.clone();
        body.insert("model".into(), request.model.clone().into());
        body.insert("prompt".into(), request.prompt.clone().into());
        body.insert("n".into(), request.count.into());
        body.insert("size".into(), request.size.to_string().into());
        for (field, value) in [
            ("quality", &request.quality),
            ("output_format", &request.output_format),
            ("background", &request.background),
            ("response_format", &self.response_format),
        ] {
            if let Some(value) = value {
                body.insert(field.into(), value.clone().into());
            }
        }
        Value::Object(body)
    }

    async fn call(&self, request: &ImageRequest) -> Result<Generation, Failure> {
        // With reference images, an edit (multipart); else a generation (JSON).
        let (endpoint, content_type, body) = if request.refs.images.is_empty() {
            let body = serde_json::to_vec(&self.body(request)).map_err(|e| Failure::Permanent {
                kind: crate::domain::error::ErrorKind::InvalidRequest,
                message: format!("the request could not be written as JSON: {e}"),
                detail: Box::default(),
            })?;
            (
                "generations",
                "application/json".to_string(),
                bytes::Bytes::from(body),
            )
        } else {
            let form = self.edit_form(request)?;
            let content_type = form.content_type();
            ("edits", content_type, form.finish())
        };
        let mut builder = self
            .client
            .post(self.target.url(&request.model, endpoint))
            .header(reqwest::header::CONTENT_TYPE, content_type);
        if let Some(tokens) = &self.tokens {
            builder = builder.header(reqwest::header::AUTHORIZATION, tokens.header().await?);
        }
        // The request body counts in the answer memory while it is being sent.
        let sending = self.buffers.reserve(body.len()).await;
        let mut clock = Clock::start(self.request_timeout);
        let response = clock.send(builder.body(body)).await;
        drop(sending);
        let response = response?;
        let status = response.status().as_u16();
        let request_id = header_str(response.headers(), "x-request-id");
        let rate_limits = rate_limits(response.headers());
        if !(200..300).contains(&status) {
            let after = retry_after(response.headers());
            let should_retry =
                header_str(response.headers(), "x-should-retry").map(|v| v == "true");
            let body = clock.read_error(response).await;
            let mut failure = classify(
                status,
                &ApiErrorBody::parse(&body),
                after,
                should_retry,
                request_id,
            );
            failure.detail_mut().rate_limits = rate_limits;
            return Err(failure);
        }
        // The images take 3/4 of the base64 they arrive as; the rest of the answer is small.
        let reader = clock
            .read_with(
                &self.buffers,
                response,
                self.max_response_bytes,
                |n| n / 4 * 3 + 4096,
                AnswerReader::new,
            )
            .await
            .map_err(|f| with_request_id(f, &request_id))?;
        let answer = reader
            .finish()
            .map_err(|f| with_request_id(f, &request_id))?;
        self.generation(answer, request, request_id, rate_limits)
            .await
    }

    /// What an answer bought: its images (downloaded when given by URL) checked, its usage.
    async fn generation(
        &self,
        answer: answer::Answer,
        request: &ImageRequest,
        request_id: Option<String>,
        rate_limits: Option<crate::domain::limits::RateLimits>,
    ) -> Result<Generation, Failure> {
        let mut images = Vec::with_capacity(answer.images.len());
        if answer.images.len() > request.count as usize {
            tracing::warn!(
                answered = answer.images.len(),
                asked = request.count,
                "the provider answered more images than asked: only the first are taken"
            );
        }
        for (data, revised_prompt) in answer.images.into_iter().take(request.count as usize) {
            let data = match data {
                ImageBytes::Decoded(data) => data,
                ImageBytes::Url(url) => self.downloads.get(&url).await?,
            };
            let (content_type, extension) = check_image(&data).map_err(|why| {
                with_request_id(
                    billed_failure(format!("the provider's image is not one: {why}")),
                    &request_id,
                )
            })?;
            if let Some(declared) = &answer.output_format
                && declared.as_str() != extension
                && !(declared == "jpg" && extension == "jpeg")
            {
                // The bytes decide; the answer's own word is only worth a note.
                tracing::debug!(declared = %declared, actual = extension,
                    "the provider's output_format does not match its image");
            }
            images.push(GeneratedImage {
                data,
                content_type,
                extension,
                revised_prompt,
            });
        }
        let usage = match &answer.usage {
            Some(reported) => reported_usage(reported, images.len() as u32),
            None => estimate_images(request, images.len() as u32),
        };
        Ok(Generation {
            images,
            reported_usage: answer.usage,
            usage,
            model: Some(request.model.clone()),
            request_id,
            rate_limits,
        })
    }
}

impl ImageProvider for OpenAi {
    fn kind(&self) -> &'static str {
        self.kind
    }

    fn capabilities(&self) -> &Capabilities {
        self.capabilities
    }

    fn defaults(&self) -> &JobDefaults {
        &self.defaults
    }

    fn estimate(&self, request: &ImageRequest) -> Usage {
        estimate(request)
    }

    fn submit<'a>(
        &'a self,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(async move { self.generate(request).await.map(Answer::Done) })
    }

    /// At OpenAI itself (a host that speaks the same protocol has no batch API of this shape): a
    /// generation, or with reference images an edit in its JSON form, the images named by the
    /// ids of their uploaded files (inline data would fill an input file with a few jobs).
    fn batch_line(
        &self,
        request: &ImageRequest,
        files: &BatchFiles,
    ) -> Option<(&'static str, Value)> {
        if self.kind != "openai" {
            return None;
        }
        let mut body = self.body(request);
        if request.reference_count == 0 {
            return Some(("/v1/images/generations", body));
        }
        if files.images.len() != request.reference_count as usize
            || files.mask.is_some() != request.masked
        {
            return None;
        }
        let file = |id: &String| serde_json::json!({ "file_id": id });
        body["images"] = Value::Array(files.images.iter().map(file).collect());
        if let Some(mask) = &files.mask {
            body["mask"] = file(mask);
        }
        Some(("/v1/images/edits", body))
    }

    fn read_batch_line<'a>(
        &'a self,
        status: u16,
        body: &'a [u8],
        request_id: Option<String>,
        request: &'a ImageRequest,
    ) -> BoxFuture<'a, Result<Generation, Failure>> {
        Box::pin(async move {
            if !(200..300).contains(&status) {
                return Err(classify(
                    status,
                    &ApiErrorBody::parse(body),
                    None,
                    None,
                    request_id,
                ));
            }
            // The body is decoded in place, in a buffer of the answer memory, as a live one.
            let mut buf = self.buffers.take(body.len()).await;
            buf.extend_from_slice(body);
            let answer = answer::decode_answer(buf).map_err(|f| with_request_id(f, &request_id))?;
            self.generation(answer, request, request_id, None).await
        })
    }

    /// `GET {base_url}/models/{model}` (Azure: its list of models): free, and refused with a
    /// wrong key.
    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let mut get = self.client.get(&self.check_url);
            if let Some(tokens) = &self.tokens {
                get = get.header(
                    reqwest::header::AUTHORIZATION,
                    tokens.header().await.map_err(|f| f.to_string())?,
                );
            }
            super::http::check_get(get, Duration::from_secs(10), |v| {
                match v.get("data").and_then(Value::as_array) {
                    Some(models) => format!("answers: {} models available", models.len()),
                    None => format!(
                        "answers: model {} is available",
                        v.get("id")
                            .and_then(Value::as_str)
                            .unwrap_or(&self.defaults.model)
                    ),
                }
            })
            .await
        })
    }
}

fn tokens(usage: &Value, path: &[&str]) -> Option<f64> {
    path.iter()
        .try_fold(usage, |v, k| v.get(k))
        .and_then(Value::as_f64)
}

/// The usage an answer reports, in the neutral units: text and image input tokens, image and
/// text output tokens (`output_tokens` when it has no details).
fn reported_usage(usage: &Value, images: u32) -> Usage {
    let input = tokens(usage, &["input_tokens"]).unwrap_or(0.0);
    Usage {
        input_text_tokens: tokens(usage, &["input_tokens_details", "text_tokens"]).unwrap_or(input),
        input_image_tokens: tokens(usage, &["input_tokens_details", "image_tokens"]).unwrap_or(0.0),
        output_image_tokens: tokens(usage, &["output_tokens_details", "image_tokens"])
            .or_else(|| tokens(usage, &["output_tokens"]))
            .unwrap_or(0.0),
        output_text_tokens: tokens(usage, &["output_tokens_details", "text_tokens"]).unwrap_or(0.0),
        images,
        ..Usage::default()
    }
}

/// What a request uses when the answer reports nothing: about four characters a token for the
/// prompt, and the output tokens GPT image models document per image (by quality, for
/// 1024x1024; other sizes scale with their pixel count).
pub fn estimate(request: &ImageRequest) -> Usage {
    estimate_images(request, request.count.into())
}

fn estimate_images(request: &ImageRequest, images: u32) -> Usage {
    let per_image = match request.quality.as_deref() {
        Some("low") => 272.0,
        Some("high") => 4160.0,
        Some("xhigh" | "max") => 8320.0,
        _ => 1056.0,
    };
    let pixels = match request.size {
        Size::Pixels { width, height } => width as f64 * height as f64,
        _ => 1024.0 * 1024.0,
    };
    Usage {
        input_text_tokens: (request.prompt.chars().count() as f64 / 4.0).ceil(),
        output_image_tokens: per_image * pixels / (1024.0 * 1024.0) * images as f64,
        images,
        estimated: true,
        ..Usage::default()
    }
}

#[cfg(test)]
mod hosts_tests;
#[cfg(test)]
mod memory_tests;

#[cfg(test)]
mod tests;

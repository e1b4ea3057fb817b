//! The Gemini API's image models: `POST {base_url}/models/{model}:generateContent` with
//! `responseModalities: ["IMAGE"]`, synchronous, one image per call. Its answers and errors are
//! read in the core crate ([`answer`], [`errors`]): a refusal arrives as HTTP 200 and fails the
//! job as `content_policy`; a per-day quota pauses the provider, a per-minute limit is retried
//! after the delay it names.
//!
//! Sizes are not pixels here: a job's size maps to one of the API's aspect ratios and resolution
//! tiers ([`Sizes::AspectTiers`]), and a size it cannot express is refused before any call.

pub use imagegen_core::gemini::{answer, errors};

use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};

use self::errors::{Status, classify};
use super::buffers::BufferPool;
use super::http::{Clock, api_client, billed_failure, retry_after, secret_header, with_request_id};
use super::request::aspect_tier;
use super::{
    Answer, Capabilities, GeneratedImage, Generation, ImageProvider, ImageRequest, JobDefaults,
    Journal, Mode, Sizes, check_image,
};
use crate::config::GeminiSettings;
use crate::domain::cost::Usage;
use crate::domain::error::{ErrorKind, Failure};

/// The aspect ratios `imageConfig.aspectRatio` takes.
const RATIOS: &[&str] = &[
    "1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9",
];
/// The resolution tiers `imageConfig.imageSize` takes, with the long side each makes at most.
const TIERS: &[(&str, u32)] = &[("1K", 1536), ("2K", 3072), ("4K", 6144)];

/// Fields of `params` that go into `generationConfig`.
const GENERATION_PARAMS: &[&str] = &["temperature", "topP", "topK"];

const CAPABILITIES: Capabilities = Capabilities {
    images_per_call: 1,
    sizes: Sizes::AspectTiers {
        ratios: RATIOS,
        tiers: TIERS,
    },
    formats: Some(&["png"]),
    seed: true,
    negative_prompt: false,
    transparency: false,
    mode: Mode::Synchronous,
    references: 14,
    mask: false,
    params: &["temperature", "topP", "topK", "safetySettings"],
};

pub struct Gemini {
    client: reqwest::Client,
    base_url: String,
    request_timeout: Duration,
    max_response_bytes: usize,
    buffers: BufferPool,
    defaults: JobDefaults,
}

impl Gemini {
    /// `buffers`: the worker's answer memory, shared by its providers.
    pub fn new(settings: &GeminiSettings, buffers: BufferPool) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-goog-api-key",
            secret_header(settings.api_key.expose_secret())?,
        );
        Ok(Self {
            client: api_client(headers, Duration::from_secs(settings.connect_timeout_secs))?,
            base_url: settings.base_url.trim_end_matches('/').to_string(),
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
            max_response_bytes: settings.max_response_bytes,
            buffers,
            defaults: JobDefaults {
                model: settings.model.clone(),
                size: settings.size.clone(),
                quality: None,
                output_format: None,
                background: None,
            },
        })
    }

    /// The request body; `Err` when the size is one the API cannot express (checked before any
    /// call by the capabilities, so only a bug reaches it).
    fn body(&self, request: &ImageRequest) -> Result<Value, String> {
        let (ratio, tier) = aspect_tier(RATIOS, TIERS, &request.size)?;
        let mut image_config = Map::new();
        if let Some(ratio) = ratio {
            image_config.insert("aspectRatio".into(), ratio.into());
        }
        // The smallest tier is every model's default, and models before gemini-3 take no other:
        // it is only sent when a larger one is wanted.
        if let Some(tier) = tier.filter(|t| *t != TIERS[0].0) {
            image_config.insert("imageSize".into(), tier.into());
        }
        let mut config = Map::new();
        config.insert("responseModalities".into(), json!(["IMAGE"]));
        if !image_config.is_empty() {
            config.insert("imageConfig".into(), Value::Object(image_config));
        }
        if let Some(seed) = request.seed {
            // The API's seed is an int32: a job's u64 seed is folded into it, the same way
            // every time.
            config.insert("seed".into(), ((seed % (1 << 31)) as i64).into());
        }
        for key in GENERATION_PARAMS {
            if let Some(v) = request.params.get(*key) {
                config.insert((*key).into(), v.clone());
            }
        }
        let mut parts = vec![json!({"text": request.prompt})];
        // Reference images go in as more parts, after the prompt.
        for image in &request.refs.images {
            parts.push(json!({"inline_data": {
                "mime_type": image.content_type,
                "data": &*image.base64(),
            }}));
        }
        let mut body = json!({
            "contents": [{"role": "user", "parts": parts}],
            "generationConfig": config,
        });
        if let Some(safety) = request.params.get("safetySettings") {
            body["safetySettings"] = safety.clone();
        }
        Ok(body)
    }

    async fn call(&self, request: &ImageRequest) -> Result<Generation, Failure> {
        let invalid = |message: String| Failure::Permanent {
            kind: ErrorKind::InvalidJob,
            message,
            detail: Box::default(),
        };
        let body = serde_json::to_vec(&self.body(request).map_err(invalid)?)
            .map_err(|e| invalid(format!("the request could not be written as JSON: {e}")))?;
        let url = format!(
            "{}/models/{}:generateContent",
            self.base_url,
            percent_encoding::utf8_percent_encode(&request.model, MODEL)
        );
        let sending = self.buffers.reserve(body.len()).await;
        let mut clock = Clock::start(self.request_timeout);
        let response = clock
            .send(
                self.client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body),
            )
            .await;
        drop(sending);
        let response = response?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let after = retry_after(response.headers());
            let body = clock.read_error(response).await;
            return Err(classify(status, &Status::parse(&body), after, None));
        }
        // The answer is read whole into the answer memory, and its base64 decoded in place.
        let body = clock
            .read(&self.buffers, response, self.max_response_bytes)
            .await?;
        let answer = answer::decode_answer(body)?;
        let request_id = answer.response_id.clone();
        let mut images = Vec::with_capacity(answer.images.len());
        for image in answer
            .images
            .into_iter()
            .take(request.count.max(1) as usize)
        {
            let (content_type, extension) = check_image(&image.data).map_err(|why| {
                with_request_id(
                    billed_failure(format!("the provider's image is not one: {why}")),
                    &request_id,
                )
            })?;
            images.push(GeneratedImage {
                data: image.data,
                content_type,
                extension,
                revised_prompt: None,
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
            rate_limits: None,
        })
    }
}

/// A model name is one path segment (with its `:method` after it).
const MODEL: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

impl ImageProvider for Gemini {
    fn kind(&self) -> &'static str {
        "gemini"
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    fn defaults(&self) -> &JobDefaults {
        &self.defaults
    }

    fn estimate(&self, request: &ImageRequest) -> Usage {
        estimate_images(request, request.count.into())
    }

    fn submit<'a>(
        &'a self,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(async move { self.call(request).await.map(Answer::Done) })
    }

    /// `GET {base_url}/models/{model}`: free, and refused with a wrong key.
    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let url = format!(
                "{}/models/{}",
                self.base_url,
                percent_encoding::utf8_percent_encode(&self.defaults.model, MODEL)
            );
            super::http::check_get(self.client.get(&url), Duration::from_secs(10), |v| {
                let methods = v
                    .get("supportedGenerationMethods")
                    .and_then(Value::as_array)
                    .map(|m| {
                        m.iter()
                            .filter_map(Value::as_str)
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default();
                format!("answers: model {} ({methods})", self.defaults.model)
            })
            .await
        })
    }
}

/// Token counts of `usageMetadata` by modality (`promptTokensDetails`,
/// `candidatesTokensDetails`); without details, the prompt counts as text and the output as
/// image tokens.
fn reported_usage(usage: &Value, images: u32) -> Usage {
    let count = |key: &str| usage.get(key).and_then(Value::as_f64);
    let by_modality = |key: &str, modality: &str| {
        usage.get(key).and_then(Value::as_array).map(|details| {
            details
                .iter()
                .filter(|d| d.get("modality").and_then(Value::as_str) == Some(modality))
                .filter_map(|d| d.get("tokenCount").and_then(Value::as_f64))
                .sum::<f64>()
        })
    };
    let prompt = count("promptTokenCount").unwrap_or(0.0);
    let output = count("candidatesTokenCount").unwrap_or(0.0);
    let input_image = by_modality("promptTokensDetails", "IMAGE").unwrap_or(0.0);
    let output_text = by_modality("candidatesTokensDetails", "TEXT").unwrap_or(0.0);
    Usage {
        input_text_tokens: by_modality("promptTokensDetails", "TEXT")
            .unwrap_or(prompt - input_image),
        input_image_tokens: input_image,
        output_image_tokens: by_modality("candidatesTokensDetails", "IMAGE")
            .unwrap_or(output - output_text),
        output_text_tokens: output_text,
        images,
        ..Usage::default()
    }
}

/// Usage when the answer reports none: about four characters a prompt token, and the output
/// tokens the API documents per image (1290 at 1K; 4K images cost about twice as much).
fn estimate_images(request: &ImageRequest, images: u32) -> Usage {
    let per_image = match aspect_tier(RATIOS, TIERS, &request.size) {
        Ok((_, Some("4K"))) => 2580.0,
        _ => 1290.0,
    };
    Usage {
        input_text_tokens: (request.prompt.chars().count() as f64 / 4.0).ceil(),
        output_image_tokens: per_image * images as f64,
        images,
        estimated: true,
        ..Usage::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::Size;

    fn request(size: &str) -> ImageRequest {
        ImageRequest {
            model: "gemini-3-pro-image".into(),
            prompt: "a fox".into(),
            negative_prompt: None,
            size: Size::parse(size),
            count: 1,
            output_format: None,
            quality: None,
            background: None,
            seed: Some(u64::MAX),
            reference_count: 0,
            masked: false,
            refs: Default::default(),
            params: serde_json::from_value(json!({"temperature": 0.4})).unwrap(),
        }
    }

    fn provider() -> Gemini {
        let settings: GeminiSettings = serde_json::from_value(json!({
            "base_url": "https://example.test/v1beta", "api_key": "k", "model": "m", "size": "1:1",
            "request_timeout_secs": 5, "connect_timeout_secs": 5, "max_response_bytes": 4096
        }))
        .unwrap();
        Gemini::new(&settings, BufferPool::unbounded()).unwrap()
    }

    #[test]
    fn sizes_map_to_aspect_ratios_and_tiers_or_are_refused_saying_what_is_taken() {
        let p = provider();
        let body = p.body(&request("16:9")).unwrap();
        assert_eq!(
            body["generationConfig"]["imageConfig"],
            json!({"aspectRatio": "16:9"})
        );
        assert_eq!(
            body["generationConfig"]["responseModalities"],
            json!(["IMAGE"])
        );
        assert_eq!(body["generationConfig"]["temperature"], 0.4);
        let seed = body["generationConfig"]["seed"].as_i64().unwrap();
        assert!((0..1 << 31).contains(&seed));
        let body = p.body(&request("2048x2048")).unwrap();
        assert_eq!(
            body["generationConfig"]["imageConfig"],
            json!({"aspectRatio": "1:1", "imageSize": "2K"})
        );
        let body = p.body(&request("1344x768")).unwrap();
        assert_eq!(
            body["generationConfig"]["imageConfig"]["aspectRatio"],
            "16:9"
        );
        assert!(
            p.body(&request("auto")).unwrap()["generationConfig"]
                .get("imageConfig")
                .is_none()
        );
        for size in ["1000x700", "7:4", "8000x8000", "portrait"] {
            let why = CAPABILITIES.refusal(&request(size)).expect(size);
            assert!(why.contains("16:9") && why.contains("auto"), "{why}");
            assert!(p.body(&request(size)).is_err());
        }
        assert!(CAPABILITIES.refusal(&request("1024x1024")).is_none());
    }

    #[test]
    fn usage_is_read_by_modality() {
        let u = reported_usage(
            &json!({"promptTokenCount": 12, "candidatesTokenCount": 1300,
                "promptTokensDetails": [{"modality": "TEXT", "tokenCount": 12}],
                "candidatesTokensDetails": [{"modality": "IMAGE", "tokenCount": 1290},
                                            {"modality": "TEXT", "tokenCount": 10}]}),
            1,
        );
        assert_eq!(
            (
                u.input_text_tokens,
                u.output_image_tokens,
                u.output_text_tokens,
                u.images
            ),
            (12.0, 1290.0, 10.0, 1)
        );
        assert!(!u.estimated);
        let plain = reported_usage(
            &json!({"promptTokenCount": 5, "candidatesTokenCount": 1290}),
            1,
        );
        assert_eq!(
            (plain.input_text_tokens, plain.output_image_tokens),
            (5.0, 1290.0)
        );
    }
}

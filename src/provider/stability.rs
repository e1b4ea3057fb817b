//! Stability AI's Stable Image API (v2beta): `POST {base_url}/v2beta/stable-image/generate/
//! {ultra|core|sd3}`, synchronous, one image per call (a job of n images makes n calls; the
//! images already stored are kept when a job is delivered again, so only the missing ones are
//! bought).
//!
//! The body is `multipart/form-data` even without files: the API refuses JSON. The answer is
//! asked for as raw bytes (`Accept: image/*`), with the finish reason and seed in headers; an
//! answer in JSON is read too. Its answers and errors are read in the core crate ([`answer`]):
//! `finish-reason: CONTENT_FILTERED` on HTTP 200 is a refusal, never a stored success.
//!
//! A job's `model` picks the endpoint: `ultra`, `core`, or an SD 3.5 model (`sd3.5-large`,
//! `sd3.5-large-turbo`, `sd3.5-medium`, `sd3.5-flash`) sent to `sd3` as its `model` field. Sizes
//! are the API's aspect ratios.

/// Reading its answers and errors: in the core crate, fuzzed there.
pub use imagegen_core::stability as answer;

use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::Value;

use self::answer::{Finish, classify, read_json};
use super::buffers::BufferPool;
use super::http::{
    Clock, api_client, billed_failure, header_str, retry_after, secret_header, with_request_id,
};
use super::multipart::Form;
use super::request::aspect_tier;
use super::{
    Answer, Capabilities, GeneratedImage, Generation, ImageProvider, ImageRequest, JobDefaults,
    Journal, Mode, Sizes, check_image,
};
use crate::config::StabilitySettings;
use crate::domain::cost::Usage;
use crate::domain::error::{ErrorKind, Failure};

/// The aspect ratios `aspect_ratio` takes.
const RATIOS: &[&str] = &[
    "1:1", "16:9", "21:9", "2:3", "3:2", "4:5", "5:4", "9:16", "9:21",
];
/// About a megapixel whatever the ratio: 1536 is the long side of 21:9.
const TIERS: &[(&str, u32)] = &[("1MP", 1536)];

/// The endpoints by model, and the SD 3.5 models the `sd3` endpoint takes.
const SD3_MODELS: &[&str] = &[
    "sd3.5-large",
    "sd3.5-large-turbo",
    "sd3.5-medium",
    "sd3.5-flash",
];

const CAPABILITIES: Capabilities = Capabilities {
    images_per_call: 1,
    sizes: Sizes::AspectTiers {
        ratios: RATIOS,
        tiers: TIERS,
    },
    formats: Some(&["png", "jpeg", "webp"]),
    seed: true,
    negative_prompt: true,
    transparency: false,
    mode: Mode::Synchronous,
    references: 1,
    mask: false,
    params: &["style_preset", "cfg_scale", "strength"],
};

pub struct Stability {
    client: reqwest::Client,
    base_url: String,
    request_timeout: Duration,
    /// The wait after a 429, which names none.
    rate_limit_wait: Duration,
    max_response_bytes: usize,
    buffers: BufferPool,
    defaults: JobDefaults,
}

impl Stability {
    /// `buffers`: the worker's answer memory, shared by its providers.
    pub fn new(settings: &StabilitySettings, buffers: BufferPool) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            secret_header(&format!("Bearer {}", settings.api_key.expose_secret()))?,
        );
        Ok(Self {
            client: api_client(headers, Duration::from_secs(settings.connect_timeout_secs))?,
            base_url: settings.base_url.trim_end_matches('/').to_string(),
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
            rate_limit_wait: Duration::from_secs(settings.rate_limit_wait_secs),
            max_response_bytes: settings.max_response_bytes,
            buffers,
            defaults: JobDefaults {
                model: settings.model.clone(),
                size: settings.size.clone(),
                quality: None,
                output_format: Some(settings.output_format.clone()),
                background: None,
            },
        })
    }

    /// The endpoint of a model, and the `model` field it needs (`Err`: not a model the API has).
    fn endpoint(model: &str) -> Result<(&'static str, Option<&str>), String> {
        match model {
            "ultra" => Ok(("ultra", None)),
            "core" => Ok(("core", None)),
            m if SD3_MODELS.contains(&m) => Ok(("sd3", Some(m))),
            m => Err(format!(
                "the Stability AI provider takes the models ultra, core, {}; not {m:?}",
                SD3_MODELS.join(", ")
            )),
        }
    }

    /// The multipart body; `Err` when the job asks for what the API cannot express (checked
    /// before any call).
    fn form(request: &ImageRequest) -> Result<Form, String> {
        let (_, model) = Self::endpoint(&request.model)?;
        let (ratio, _) = aspect_tier(RATIOS, TIERS, &request.size)?;
        let mut form = Form::new();
        form.text("prompt", &request.prompt);
        if let Some(negative) = &request.negative_prompt {
            form.text("negative_prompt", negative);
        }
        let reference = request.refs.images.first();
        // Image-to-image keeps its image's aspect: no aspect_ratio then.
        if let Some(ratio) = ratio.filter(|_| reference.is_none()) {
            form.text("aspect_ratio", ratio);
        }
        if let Some(seed) = request.seed {
            // The API's seeds are 0..=4294967294: a job's u64 seed is folded into them.
            form.text("seed", &(seed % 4_294_967_295).to_string());
        }
        if let Some(format) = &request.output_format {
            form.text("output_format", format);
        }
        if let Some(model) = model {
            form.text("model", model);
        }
        if let Some(image) = reference {
            if request.model == "core" {
                return Err(
                    "Stability's core model takes no reference image (ultra and the SD 3.5 \
                     models do)"
                        .into(),
                );
            }
            if model.is_some() {
                form.text("mode", "image-to-image");
            }
            if !request.params.contains_key("strength") {
                // How much of the image is remade: the API requires it.
                form.text("strength", "0.6");
            }
            form.file(
                "image",
                &format!("reference.{}", image.extension),
                image.content_type,
                &image.data,
            );
        }
        for (key, value) in &request.params {
            let text = match value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            form.text(key, &text);
        }
        Ok(form)
    }

    async fn call(&self, request: &ImageRequest) -> Result<Generation, Failure> {
        let form = Self::form(request).map_err(|message| Failure::Permanent {
            kind: ErrorKind::InvalidJob,
            message,
            detail: Box::default(),
        })?;
        let (path, _) = Self::endpoint(&request.model).map_err(Failure::invalid_job)?;
        let content_type = form.content_type();
        let body = form.finish();
        let url = format!("{}/v2beta/stable-image/generate/{path}", self.base_url);
        let sending = self.buffers.reserve(body.len()).await;
        let mut clock = Clock::start(self.request_timeout);
        let response = clock
            .send(
                self.client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, content_type)
                    .header(reqwest::header::ACCEPT, "image/*")
                    .body(body),
            )
            .await;
        drop(sending);
        let response = response?;
        let status = response.status().as_u16();
        let request_id = header_str(response.headers(), "x-request-id");
        if !(200..300).contains(&status) {
            let after =
                retry_after(response.headers()).or((status == 429).then_some(self.rate_limit_wait));
            let body = clock.read_error(response).await;
            let mut failure = classify(status, &body, after);
            if failure.detail().request_id.is_none() {
                failure.detail_mut().request_id = request_id;
            }
            return Err(failure);
        }
        let json = header_str(response.headers(), "content-type")
            .is_some_and(|t| t.starts_with("application/json"));
        let header_finish =
            Finish::parse(header_str(response.headers(), "finish-reason").as_deref());
        let body = clock
            .read(&self.buffers, response, self.max_response_bytes)
            .await
            .map_err(|f| with_request_id(f, &request_id))?;
        let (data, finish): (bytes::Bytes, Finish) = if json {
            let answer = read_json(&body).map_err(|f| with_request_id(f, &request_id))?;
            // Filtered if either the header or the body says so.
            let finish = if answer.finish == Finish::Success {
                header_finish
            } else {
                answer.finish
            };
            (answer.image, finish)
        } else {
            (body.freeze(), header_finish)
        };
        finish.check(request_id.clone())?;
        let (content_type, extension) = check_image(&data).map_err(|why| {
            with_request_id(
                billed_failure(format!("the provider's image is not one: {why}")),
                &request_id,
            )
        })?;
        Ok(Generation {
            images: vec![GeneratedImage {
                data,
                content_type,
                extension,
                revised_prompt: None,
            }],
            reported_usage: None,
            usage: Usage {
                images: 1,
                ..Usage::default()
            },
            model: Some(request.model.clone()),
            request_id,
            rate_limits: None,
        })
    }
}

impl ImageProvider for Stability {
    fn kind(&self) -> &'static str {
        "stability"
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    fn defaults(&self) -> &JobDefaults {
        &self.defaults
    }

    fn submit<'a>(
        &'a self,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(async move { self.call(request).await.map(Answer::Done) })
    }

    /// `GET {base_url}/v1/user/balance`: free, and refused with a wrong key.
    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let url = format!("{}/v1/user/balance", self.base_url);
            super::http::check_get(self.client.get(&url), Duration::from_secs(10), |v| match v
                .get("credits")
                .and_then(Value::as_f64)
            {
                Some(credits) => format!("answers: {credits} credits left"),
                None => "answers".into(),
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(model: &str, size: &str) -> ImageRequest {
        ImageRequest {
            model: model.into(),
            prompt: "a fox".into(),
            negative_prompt: Some("blur".into()),
            size: super::super::Size::parse(size),
            count: 1,
            output_format: Some("webp".into()),
            quality: None,
            background: None,
            seed: Some(u64::MAX),
            reference_count: 0,
            masked: false,
            refs: Default::default(),
            params: serde_json::json!({"style_preset": "pixel-art", "cfg_scale": 4.5})
                .as_object()
                .unwrap()
                .clone(),
        }
    }

    #[test]
    fn the_form_carries_the_job_in_the_apis_fields() {
        let form = Stability::form(&request("sd3.5-large", "1344x768")).unwrap();
        let body = String::from_utf8(form.finish().to_vec()).unwrap();
        for (name, value) in [
            ("prompt", "a fox"),
            ("negative_prompt", "blur"),
            ("aspect_ratio", "16:9"),
            ("seed", "0"),
            ("output_format", "webp"),
            ("model", "sd3.5-large"),
            ("style_preset", "pixel-art"),
            ("cfg_scale", "4.5"),
        ] {
            assert!(
                body.contains(&format!("name=\"{name}\"\r\n\r\n{value}\r\n")),
                "{name}: {body}"
            );
        }
        let core = String::from_utf8(
            Stability::form(&request("core", "auto"))
                .unwrap()
                .finish()
                .to_vec(),
        )
        .unwrap();
        assert!(!core.contains("name=\"model\"") && !core.contains("aspect_ratio"));
        assert!(
            Stability::form(&request("sdxl", "1:1"))
                .unwrap_err()
                .contains("ultra, core")
        );
        assert!(Stability::form(&request("core", "1000x1000x")).is_err());
    }
}

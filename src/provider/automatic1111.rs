//! A self-hosted AUTOMATIC1111 web UI, or Forge (its fork), started with `--api`: `POST
//! {base_url}/sdapi/v1/txt2img` makes a batch of images and answers them, base64, when done;
//! `img2img` does the same from a job's reference image (its `init_images`), repainting where a
//! job's mask is transparent (sent as the server's mask: white where to paint).
//! The answers are read in the core crate ([`imagegen_core::automatic1111`]).
//!
//! It is synchronous, and nothing in an answer can be fetched again: a call lost after it was
//! sent is counted as possibly billed (its GPU time was spent), like OpenAI's. Each call carries
//! a `force_task_id` of the worker's choosing, which is its request id in events and logs (and
//! the id the server's progress endpoint knows it by). The server runs one call at a time, so
//! `request_timeout_secs` covers the wait behind other calls too; keep the provider's
//! `concurrency` near the number of calls a server should hold at once.
//!
//! `--api-auth USER:PASSWORD` is HTTP Basic. A job's `model` is a checkpoint, sent as
//! `override_settings.sd_model_checkpoint` (the server loads it: slow the first time).

use std::time::{Duration, Instant};

use futures_util::future::BoxFuture;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};

use super::buffers::BufferPool;
use super::http::{Clock, api_client, billed_failure, secret_header, with_request_id};
use super::{
    Answer, Capabilities, GeneratedImage, Generation, ImageProvider, ImageRequest, JobDefaults,
    Journal, Mode, Size, Sizes, check_image,
};
use crate::config::Automatic1111Settings;
use crate::domain::cost::Usage;
use crate::domain::error::{ErrorKind, Failure};
use imagegen_core::automatic1111::{classify, read_answer};
use imagegen_core::comfyui::workflow::new_prompt_id;

const CAPABILITIES: Capabilities = Capabilities {
    images_per_call: 4,
    sizes: Sizes::Pixels {
        max_side: 16_384,
        multiple_of: 8,
        max_pixels: 16_384 * 16_384,
    },
    formats: Some(&["png"]),
    seed: true,
    negative_prompt: true,
    transparency: false,
    mode: Mode::Synchronous,
    references: 1,
    mask: true,
    params: &[
        "steps",
        "cfg_scale",
        "sampler_name",
        "scheduler",
        "denoising_strength",
        "enable_hr",
        "hr_scale",
        "hr_upscaler",
        "hr_second_pass_steps",
        "restore_faces",
        "tiling",
        "clip_skip",
        "styles",
    ],
};

pub struct Automatic1111 {
    capabilities: Capabilities,
    client: reqwest::Client,
    base_url: String,
    request_timeout: Duration,
    max_response_bytes: usize,
    buffers: BufferPool,
    seconds_per_image: f64,
    defaults: JobDefaults,
}

impl Automatic1111 {
    /// `buffers`: the worker's answer memory, shared by its providers.
    pub fn new(settings: &Automatic1111Settings, buffers: BufferPool) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let mut headers = HeaderMap::new();
        if !settings.username.is_empty() {
            let pair = format!(
                "{}:{}",
                settings.username,
                settings.password.expose_secret()
            );
            let encoded = base64_simd::STANDARD.encode_to_string(pair.as_bytes());
            headers.insert(
                reqwest::header::AUTHORIZATION,
                secret_header(&format!("Basic {encoded}"))?,
            );
        }
        Ok(Self {
            capabilities: Capabilities {
                images_per_call: settings.images_per_call,
                ..CAPABILITIES
            },
            client: api_client(headers, Duration::from_secs(settings.connect_timeout_secs))?,
            base_url: settings.base_url.trim_end_matches('/').to_string(),
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
            max_response_bytes: settings.max_response_bytes,
            buffers,
            seconds_per_image: settings.seconds_per_image,
            defaults: JobDefaults {
                model: settings.model.clone(),
                size: settings.size.clone(),
                quality: None,
                output_format: Some("png".into()),
                background: None,
            },
        })
    }

    /// The `txt2img` body, or `img2img`'s with the request's reference as its init image
    /// (`mask`: the job's mask as the server takes it, white where to paint). `Err`: a size it
    /// cannot take, before any call.
    fn body(request: &ImageRequest, task_id: &str, mask: Option<&[u8]>) -> Result<Value, Failure> {
        let mut body: Map<String, Value> = request.params.clone();
        body.insert("prompt".into(), request.prompt.clone().into());
        if let Some(negative) = &request.negative_prompt {
            body.insert("negative_prompt".into(), negative.clone().into());
        }
        match &request.size {
            Size::Auto => {}
            Size::Pixels { width, height } => {
                body.insert("width".into(), (*width).into());
                body.insert("height".into(), (*height).into());
            }
            other => {
                return Err(Failure::invalid_job(format!(
                    "the automatic1111 provider takes sizes as WIDTHxHEIGHT or auto; not {other}"
                )));
            }
        }
        body.insert("batch_size".into(), request.count.max(1).into());
        body.insert("n_iter".into(), 1.into());
        // -1: the server's random seed.
        body.insert("seed".into(), request.seed.map_or(json!(-1), |s| json!(s)));
        if !request.model.is_empty() {
            body.insert(
                "override_settings".into(),
                json!({ "sd_model_checkpoint": request.model }),
            );
        }
        body.insert("send_images".into(), true.into());
        body.insert("save_images".into(), false.into());
        body.insert("force_task_id".into(), task_id.into());
        if let Some(init) = request.refs.images.first() {
            body.insert("init_images".into(), json!([&*init.base64()]));
            if let Some(mask) = mask {
                body.insert(
                    "mask".into(),
                    base64_simd::STANDARD.encode_to_string(mask).into(),
                );
            }
        }
        Ok(Value::Object(body))
    }

    async fn call(&self, request: &ImageRequest) -> Result<Generation, Failure> {
        let task_id = new_prompt_id();
        let mask = match &request.refs.mask {
            Some(mask) => {
                let png = mask.data.clone();
                Some(
                    tokio::task::spawn_blocking(move || crate::imaging::paint_mask(&png))
                        .await
                        .map_err(|e| Failure::transient(e.to_string()))?
                        .map_err(Failure::invalid_job)?,
                )
            }
            None => None,
        };
        let body = Self::body(request, &task_id, mask.as_deref())?;
        let endpoint = if request.refs.images.is_empty() {
            "txt2img"
        } else {
            "img2img"
        };
        let body = serde_json::to_vec(&body).map_err(|e| Failure::Permanent {
            kind: ErrorKind::InvalidRequest,
            message: format!("the request could not be written as JSON: {e}"),
            detail: Box::default(),
        })?;
        let request_id = Some(task_id);
        let started = Instant::now();
        // The body (with a reference, its base64) counts in the answer memory while it is sent.
        let sending = self.buffers.reserve(body.len()).await;
        let mut clock = Clock::start(self.request_timeout);
        let response = clock
            .send(
                self.client
                    .post(format!("{}/sdapi/v1/{endpoint}", self.base_url))
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .body(body),
            )
            .await;
        drop(sending);
        let response = response.map_err(|f| with_request_id(f, &request_id))?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            let body = clock.read_error(response).await;
            let mut failure = classify(status, &body);
            failure.detail_mut().request_id.clone_from(&request_id);
            return Err(failure);
        }
        let answer = clock
            .read(&self.buffers, response, self.max_response_bytes)
            .await
            .map_err(|f| with_request_id(f, &request_id))?;
        // The server reports no run time: the call's is counted (it includes any wait behind
        // other calls at the server).
        let seconds = started.elapsed().as_secs_f64();
        let generated = read_answer(&answer).map_err(|f| with_request_id(f, &request_id))?;
        drop(answer);
        let mut images = Vec::with_capacity(generated.images.len());
        for data in generated
            .images
            .into_iter()
            .take(request.count.max(1).into())
        {
            let (content_type, extension) = check_image(&data).map_err(|why| {
                with_request_id(
                    billed_failure(format!("the server's image is not one: {why}")),
                    &request_id,
                )
            })?;
            images.push(GeneratedImage {
                data,
                content_type,
                extension,
                revised_prompt: None,
            });
        }
        Ok(Generation {
            usage: Usage {
                images: images.len() as u32,
                gpu_seconds: seconds,
                ..Usage::default()
            },
            images,
            reported_usage: Some(json!({ "seconds": seconds, "seeds": generated.seeds })),
            model: Some(request.model.clone()),
            request_id,
            rate_limits: None,
        })
    }
}

impl ImageProvider for Automatic1111 {
    fn kind(&self) -> &'static str {
        "automatic1111"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn defaults(&self) -> &JobDefaults {
        &self.defaults
    }

    fn estimate(&self, request: &ImageRequest) -> Usage {
        super::request::gpu_estimate(request, self.seconds_per_image)
    }

    fn submit<'a>(
        &'a self,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(async move { self.call(request).await.map(Answer::Done) })
    }

    /// `GET {base_url}/sdapi/v1/sd-models`: cheap, and behind `--api-auth`.
    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let url = format!("{}/sdapi/v1/sd-models", self.base_url);
            super::http::check_get(self.client.get(&url), Duration::from_secs(10), |v| {
                let n = v.as_array().map_or(0, Vec::len);
                format!("answers: {n} checkpoints")
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_body_carries_the_job_and_the_task_id() {
        let request = ImageRequest {
            model: "sdxl.safetensors".into(),
            prompt: "a keep".into(),
            negative_prompt: Some("blur".into()),
            size: Size::parse("832x1216"),
            count: 3,
            output_format: None,
            quality: None,
            background: None,
            seed: None,
            reference_count: 0,
            masked: false,
            refs: Default::default(),
            params: json!({"steps": 30}).as_object().unwrap().clone(),
        };
        let body = Automatic1111::body(&request, "t-1", None).unwrap();
        assert_eq!(body["width"], 832);
        assert_eq!(body["height"], 1216);
        assert_eq!(body["batch_size"], 3);
        assert_eq!(body["seed"], -1);
        assert_eq!(body["steps"], 30);
        assert_eq!(body["force_task_id"], "t-1");
        assert_eq!(
            body["override_settings"]["sd_model_checkpoint"],
            "sdxl.safetensors"
        );
        let bad = ImageRequest {
            size: Size::parse("16:9"),
            ..request
        };
        assert!(Automatic1111::body(&bad, "t", None).is_err());
    }
}

//! fal: `POST {base_url}/{model}` puts a request in fal's queue and answers its `request_id`,
//! `status_url`, `response_url` and `cancel_url`, used as given; the status URL answers 202
//! until the request is done, then the response URL holds its images, downloaded at once (fal
//! keeps them about an hour). The answers are read in the core crate ([`imagegen_core::fal`]).
//!
//! The provider names the request: the pipeline writes the handle to the job's journal the moment
//! the submit is answered, and a redelivered job polls that request instead of paying for
//! another. fal retries some failures on its own; `x-fal-no-retry: 1` turns that off, so that
//! only the worker decides (and counts) what is tried again. A job cancelled or past its deadline
//! while queued cancels its request.
//!
//! The key (`Authorization: Key ...`) goes to the base URL's host and to fal's own
//! (`https://*.fal.run`), never elsewhere; images are fetched without it.

use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};

use super::download::Downloads;
use super::fetch::FetchRules;
use super::http::{
    Clock, MAX_SMALL_ANSWER, api_client, retry_after, secret_header, with_request_id,
};
use super::queued::{by_age, fetch_image, lost, origin, unbilled, unix_ms};
use super::{
    Answer, Capabilities, Generation, Handle, ImageProvider, ImageRequest, JobDefaults, Journal,
    Mode, Size, Sizes,
};
use crate::config::FalSettings;
use crate::domain::cost::Usage;
use crate::domain::error::{ErrorKind, Failure};
use imagegen_core::fal::{Status, classify, flagged, read_result, read_status, read_submit};

/// fal's named sizes, by aspect ratio (its `image_size` takes these or `{width, height}`).
const NAMED_SIZES: &[(&str, &str)] = &[
    ("1:1", "square_hd"),
    ("4:3", "landscape_4_3"),
    ("16:9", "landscape_16_9"),
    ("3:4", "portrait_4_3"),
    ("9:16", "portrait_16_9"),
];

const CAPABILITIES: Capabilities = Capabilities {
    images_per_call: 4,
    sizes: Sizes::Any,
    formats: Some(&["png", "jpeg"]),
    seed: true,
    negative_prompt: false,
    transparency: false,
    mode: Mode::SubmitAndPoll,
    references: 1,
    mask: false,
    params: &[
        "num_inference_steps",
        "guidance_scale",
        "enable_safety_checker",
        "safety_tolerance",
        "acceleration",
        "loras",
    ],
};

pub struct Fal {
    client: reqwest::Client,
    base_url: String,
    /// Scheme, host and port of the base URL: status URLs there get the key.
    base_origin: String,
    downloads: Downloads,
    request_timeout: Duration,
    poll_min: Duration,
    poll_max: Duration,
    defaults: JobDefaults,
    /// The input a reference image goes to.
    image_input: String,
}

/// What a request's handle holds (in the job's journal).
#[derive(serde::Serialize, serde::Deserialize)]
struct RequestHandle {
    request_id: String,
    status_url: String,
    response_url: String,
    #[serde(default)]
    cancel_url: Option<String>,
    /// When it was submitted (Unix ms): polls back off with its age.
    submitted_unix_ms: u64,
}

impl Fal {
    /// `buffers`: the worker's answer memory, shared by its providers.
    pub fn new(
        settings: &FalSettings,
        buffers: super::buffers::BufferPool,
    ) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            secret_header(&format!("Key {}", settings.api_key.expose_secret()))?,
        );
        let base = reqwest::Url::parse(&settings.base_url)?;
        Ok(Self {
            client: api_client(headers, Duration::from_secs(settings.connect_timeout_secs))?,
            base_url: settings.base_url.trim_end_matches('/').to_string(),
            base_origin: origin(&base),
            downloads: Downloads::new(
                FetchRules::exempting(
                    std::iter::once(settings.base_url.as_str())
                        .chain(settings.download_hosts.iter().map(String::as_str)),
                ),
                Duration::from_secs(settings.connect_timeout_secs),
                Duration::from_secs(settings.request_timeout_secs),
                settings.max_response_bytes,
                buffers,
            ),
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
            poll_min: Duration::from_millis(settings.poll_min_ms),
            poll_max: Duration::from_secs(settings.poll_max_secs),
            image_input: settings.image_input.clone(),
            defaults: JobDefaults {
                model: settings.model.clone(),
                size: settings.size.clone(),
                quality: None,
                output_format: Some(settings.output_format.clone()),
                background: None,
            },
        })
    }

    /// The submit's body, a reference image at `image_input` as a data URI (`Err`: a size fal
    /// cannot take, before any call).
    fn body(request: &ImageRequest, image_input: &str) -> Result<Value, String> {
        let mut body: Map<String, Value> = request.params.clone();
        body.insert("prompt".into(), request.prompt.clone().into());
        match &request.size {
            Size::Auto => {}
            Size::Pixels { width, height } => {
                body.insert(
                    "image_size".into(),
                    json!({"width": width, "height": height}),
                );
            }
            Size::Aspect { .. } => {
                let ratio = request.size.to_string();
                let named = NAMED_SIZES
                    .iter()
                    .find(|(r, _)| *r == ratio)
                    .map(|(_, n)| *n)
                    .ok_or_else(|| {
                        format!(
                            "the fal provider takes the aspect ratios {}, WIDTHxHEIGHT or auto; not {ratio}",
                            NAMED_SIZES.iter().map(|(r, _)| *r).collect::<Vec<_>>().join(", ")
                        )
                    })?;
                body.insert("image_size".into(), named.into());
            }
            Size::Named(size) => {
                return Err(format!(
                    "the fal provider takes sizes as WIDTHxHEIGHT, W:H or auto; not {size}"
                ));
            }
        }
        body.insert("num_images".into(), request.count.into());
        if let Some(seed) = request.seed {
            body.insert("seed".into(), seed.into());
        }
        if let Some(format) = &request.output_format {
            body.insert("output_format".into(), format.clone().into());
        }
        if let Some(image) = request.refs.images.first() {
            body.insert(image_input.into(), image.data_uri().into());
        }
        Ok(Value::Object(body))
    }

    /// Whether the key may go to `url`: the base URL's own origin, or an https host of fal's.
    fn trusted(&self, url: &reqwest::Url) -> bool {
        origin(url) == self.base_origin
            || (url.scheme() == "https"
                && url
                    .host_str()
                    .is_some_and(|h| h == "fal.run" || h.ends_with(".fal.run")))
    }

    /// A URL of the handle, if the key may go there.
    fn url_of(&self, url: &str, id: &str) -> Result<reqwest::Url, Failure> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| lost(format!("the request's URL is not a URL ({e})"), Some(id)))?;
        if !self.trusted(&parsed) {
            return Err(Failure::Permanent {
                kind: ErrorKind::InvalidRequest,
                message: format!(
                    "the provider's URL points to {}, which is not the base URL's host nor one of \
                     fal's: the key is not sent there",
                    parsed.host_str().unwrap_or("no host")
                ),
                detail: Box::default(),
            });
        }
        Ok(parsed)
    }

    async fn submit_request(&self, request: &ImageRequest) -> Result<Answer, Failure> {
        let body = Self::body(request, &self.image_input).map_err(Failure::invalid_job)?;
        let body = serde_json::to_vec(&body).map_err(|e| Failure::Permanent {
            kind: ErrorKind::InvalidRequest,
            message: format!("the request could not be written as JSON: {e}"),
            detail: Box::default(),
        })?;
        let url = format!("{}/{}", self.base_url, request.model);
        // The body (with a reference, its data URI) counts in the answer memory while sent.
        let sending = self.downloads.memory().reserve(body.len()).await;
        let clock = Clock::start(self.request_timeout);
        let response = clock
            .send(
                self.client
                    .post(&url)
                    .header(reqwest::header::CONTENT_TYPE, "application/json")
                    .header("x-fal-no-retry", "1")
                    .body(body),
            )
            .await;
        drop(sending);
        let response = response?;
        let status = response.status().as_u16();
        let after = retry_after(response.headers());
        if !(200..300).contains(&status) {
            let text = clock.read_error(response).await;
            return Err(classify(status, &text, after));
        }
        // Queued: an answer that does not read whole may have been billed.
        let text = clock.read_small(response, MAX_SMALL_ANSWER).await?;
        let queued = read_submit(&text)?;
        let handle = RequestHandle {
            request_id: queued.request_id.clone(),
            status_url: queued.status_url,
            response_url: queued.response_url,
            cancel_url: queued.cancel_url,
            submitted_unix_ms: unix_ms(),
        };
        Ok(Answer::Pending {
            after: self.poll_min,
            handle: Handle(serde_json::to_value(&handle).unwrap_or_default()),
            request_id: Some(queued.request_id),
        })
    }

    async fn poll_request(
        &self,
        handle: &Handle,
        request: &ImageRequest,
    ) -> Result<Answer, Failure> {
        let h: RequestHandle = serde_json::from_value(handle.0.clone()).map_err(|e| {
            lost(
                format!("the journal's handle of the request cannot be read ({e})"),
                None,
            )
        })?;
        let request_id = Some(h.request_id.clone());
        let status_url = self.url_of(&h.status_url, &h.request_id)?;
        let clock = Clock::start(self.request_timeout);
        let response = clock
            .send(self.client.get(status_url))
            .await
            .map_err(unbilled)?;
        let status = response.status().as_u16();
        let after = retry_after(response.headers());
        if status == 404 {
            return Err(lost(
                "the provider does not know the request".into(),
                Some(&h.request_id),
            ));
        }
        if !(200..300).contains(&status) {
            let text = clock.read_error(response).await;
            return Err(with_request_id(classify(status, &text, after), &request_id));
        }
        let text = clock
            .read_small(response, MAX_SMALL_ANSWER)
            .await
            .map_err(|f| with_request_id(unbilled(f), &request_id))?;
        match read_status(&text)
            .map_err(|why| with_request_id(Failure::transient(why), &request_id))?
        {
            Status::Queued { .. } | Status::InProgress => {
                return Ok(Answer::Pending {
                    after: by_age(h.submitted_unix_ms, self.poll_min, self.poll_max),
                    handle: handle.clone(),
                    request_id,
                });
            }
            Status::Completed => {}
        }
        let response_url = self.url_of(&h.response_url, &h.request_id)?;
        let clock = Clock::start(self.request_timeout);
        let response = clock
            .send(self.client.get(response_url))
            .await
            .map_err(unbilled)?;
        let status = response.status().as_u16();
        let after = retry_after(response.headers());
        if status == 404 || status == 410 {
            return Err(lost(
                "the request's result is gone".into(),
                Some(&h.request_id),
            ));
        }
        if !(200..300).contains(&status) {
            // The request ran and failed: its result is the error. A new request is needed.
            let text = clock.read_error(response).await;
            let failure = classify(status, &text, after);
            return Err(match failure {
                Failure::Permanent { .. } | Failure::Stop { .. } => {
                    with_request_id(failure, &request_id)
                }
                other => {
                    let mut failed = lost(
                        format!("the request failed at the provider: {}", other.message()),
                        Some(&h.request_id),
                    );
                    // It ran: it was charged.
                    failed.detail_mut().charged = true;
                    failed
                }
            });
        }
        let text = clock
            .read_small(response, MAX_SMALL_ANSWER)
            .await
            .map_err(|f| with_request_id(unbilled(f), &request_id))?;
        let images = read_result(&text).map_err(|f| with_request_id(f, &request_id))?;
        if images.iter().any(|i| i.nsfw) {
            return Err(flagged(request_id));
        }
        let mut out = Vec::with_capacity(images.len());
        let mut megapixels = 0.0;
        for image in images.iter().take(request.count.max(1) as usize) {
            let generated = fetch_image(&self.downloads, &image.url, &h.request_id).await?;
            let (w, h) = match (image.width, image.height, &request.size) {
                (Some(w), Some(h), _) => (w, h),
                (_, _, Size::Pixels { width, height }) => (*width, *height),
                _ => (1024, 1024),
            };
            megapixels += f64::from(w) * f64::from(h) / 1e6;
            out.push(generated);
        }
        Ok(Answer::Done(Generation {
            usage: Usage {
                images: out.len() as u32,
                megapixels,
                ..Usage::default()
            },
            images: out,
            reported_usage: None,
            model: Some(request.model.clone()),
            request_id,
            rate_limits: None,
        }))
    }

    async fn cancel_request(&self, handle: &Handle) {
        let Ok(h) = serde_json::from_value::<RequestHandle>(handle.0.clone()) else {
            return;
        };
        let Some(url) = h.cancel_url.as_deref() else {
            return;
        };
        let Ok(url) = self.url_of(url, &h.request_id) else {
            return;
        };
        let clock = Clock::start(self.request_timeout);
        match clock.send(self.client.put(url)).await {
            Ok(r) if r.status().is_success() => {
                tracing::info!(request = %h.request_id, "canceled the job's request at the provider");
            }
            Ok(r) => tracing::warn!(request = %h.request_id, status = r.status().as_u16(),
                "the provider did not cancel the job's request"),
            Err(f) => tracing::warn!(request = %h.request_id, error = %f,
                "could not cancel the job's request"),
        }
    }
}

impl ImageProvider for Fal {
    fn kind(&self) -> &'static str {
        "fal"
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    fn defaults(&self) -> &JobDefaults {
        &self.defaults
    }

    fn estimate(&self, request: &ImageRequest) -> Usage {
        let (width, height) = match request.size {
            Size::Pixels { width, height } => (width, height),
            _ => (1024, 1024),
        };
        Usage {
            images: request.count.into(),
            megapixels: f64::from(width) * f64::from(height) / 1e6 * f64::from(request.count),
            estimated: true,
            ..Usage::default()
        }
    }

    fn submit<'a>(
        &'a self,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(self.submit_request(request))
    }

    fn poll<'a>(
        &'a self,
        handle: &'a Handle,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(self.poll_request(handle, request))
    }

    fn cancel<'a>(&'a self, handle: &'a Handle) -> BoxFuture<'a, ()> {
        Box::pin(self.cancel_request(handle))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(size: &str) -> ImageRequest {
        ImageRequest {
            model: "fal-ai/flux/schnell".into(),
            prompt: "a fox".into(),
            negative_prompt: None,
            size: Size::parse(size),
            count: 2,
            output_format: Some("jpeg".into()),
            quality: None,
            background: None,
            seed: Some(7),
            reference_count: 0,
            masked: false,
            refs: Default::default(),
            params: Map::new(),
        }
    }

    #[test]
    fn sizes_map_to_fals_image_size() {
        assert_eq!(
            Fal::body(&request("16:9"), "image_url").unwrap()["image_size"],
            "landscape_16_9"
        );
        assert_eq!(
            Fal::body(&request("768x512"), "image_url").unwrap()["image_size"],
            json!({"width": 768, "height": 512})
        );
        let body = Fal::body(&request("auto"), "image_url").unwrap();
        assert!(body.get("image_size").is_none());
        assert_eq!(
            (body["num_images"].as_u64(), body["seed"].as_u64()),
            (Some(2), Some(7))
        );
        assert!(
            Fal::body(&request("21:9"), "image_url")
                .unwrap_err()
                .contains("16:9")
        );
    }
}

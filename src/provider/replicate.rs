//! Replicate: `POST {base_url}/v1/models/{owner}/{name}/predictions` (or `/v1/predictions` with a
//! `version`) creates a prediction and answers its id and `urls.get`; `GET` of that URL says
//! where it is; a succeeded prediction's `output` holds the URLs of its files, deleted after an
//! hour, so they are downloaded at once. The answers are read in the core crate
//! ([`imagegen_core::replicate`]).
//!
//! The provider names the prediction: the pipeline writes the handle to the job's journal the
//! moment the create is answered, and a redelivered job polls that prediction instead of paying
//! for another. A prediction the provider failed, canceled or forgot is forgotten
//! ([`HANDLE_LOST`]) and created anew. A job cancelled or past its deadline while its prediction
//! runs cancels it (`urls.cancel`).
//!
//! A job's `model` is `owner/name` (an official model, priced per image), `owner/name:VERSION`
//! or a bare version id. Its inputs are the model's own: the worker sends `prompt`, and
//! `negative_prompt`, `width`/`height` or `aspect_ratio`, `num_outputs`, `seed` and
//! `output_format` when the job sets them; `params` adds the model's other inputs.

use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};

use super::download::Downloads;
use super::fetch::FetchRules;
use super::http::{
    Clock, MAX_SMALL_ANSWER, api_client, billed_failure, decode_owned, retry_after, secret_header,
    with_request_id,
};
use super::queued::{by_age, fetch_image, lost, origin, unbilled, unix_ms};
use super::{
    Answer, Capabilities, GeneratedImage, Generation, Handle, ImageProvider, ImageRequest,
    JobDefaults, Journal, Mode, Size, Sizes, check_image,
};
use crate::config::ReplicateSettings;
use crate::domain::cost::Usage;
use crate::domain::error::{ErrorKind, Failure};
use imagegen_core::replicate::{Prediction, State, classify, failure, read_prediction};

/// What it can do; `images_per_call` is the provider's setting.
const CAPABILITIES: Capabilities = Capabilities {
    images_per_call: 1,
    sizes: Sizes::Any,
    formats: Some(&["png", "jpeg", "webp"]),
    seed: true,
    negative_prompt: true,
    transparency: false,
    mode: Mode::SubmitAndPoll,
    references: 1,
    mask: false,
    // The inputs most image models on Replicate take; `params_allowed` adds a model's others.
    params: &[
        "guidance",
        "guidance_scale",
        "num_inference_steps",
        "output_quality",
        "megapixels",
        "go_fast",
        "disable_safety_checker",
        "safety_tolerance",
        "prompt_upsampling",
        "scheduler",
        "lora_scale",
        "style",
    ],
};

pub struct Replicate {
    capabilities: Capabilities,
    client: reqwest::Client,
    base_url: String,
    /// Scheme, host and port of the base URL: prediction URLs there get the token.
    base_origin: String,
    downloads: Downloads,
    request_timeout: Duration,
    /// The largest prediction read (outputs may come inline, as data URIs).
    max_answer: usize,
    poll_min: Duration,
    poll_max: Duration,
    defaults: JobDefaults,
    /// The input a reference image goes to.
    image_input: String,
}

/// What a prediction's handle holds (in the job's journal).
#[derive(serde::Serialize, serde::Deserialize)]
struct PredictionHandle {
    id: String,
    get: String,
    #[serde(default)]
    cancel: Option<String>,
    /// When it was created (Unix ms): polls back off with its age.
    created_unix_ms: u64,
}

/// Where a model's predictions are created, and the version to name in the body.
fn route(model: &str) -> Result<(String, Option<&str>), String> {
    let is_version = |v: &str| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit());
    let segment = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    };
    if is_version(model) {
        return Ok(("/v1/predictions".into(), Some(model)));
    }
    let (name, version) = match model.split_once(':') {
        Some((name, version)) if is_version(version) => (name, Some(version)),
        Some(_) => return Err(format!("{model:?} names no 64-hex version after its ':'")),
        None => (model, None),
    };
    match name.split_once('/') {
        Some((owner, model_name)) if segment(owner) && segment(model_name) => Ok(match version {
            Some(v) => ("/v1/predictions".into(), Some(v)),
            None => (format!("/v1/models/{owner}/{model_name}/predictions"), None),
        }),
        _ => Err(format!(
            "the Replicate provider takes models as owner/name, owner/name:VERSION or a version \
             id; not {model:?}"
        )),
    }
}

impl Replicate {
    /// `buffers`: the worker's answer memory, shared by its providers.
    pub fn new(
        settings: &ReplicateSettings,
        buffers: super::buffers::BufferPool,
    ) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let mut headers = HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            secret_header(&format!("Bearer {}", settings.api_key.expose_secret()))?,
        );
        let base = reqwest::Url::parse(&settings.base_url)?;
        Ok(Self {
            capabilities: Capabilities {
                images_per_call: settings.images_per_call,
                ..CAPABILITIES
            },
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
            max_answer: settings.max_response_bytes.max(MAX_SMALL_ANSWER),
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

    /// The create's path (after the base URL) and body, a reference image at `image_input` as a
    /// data URI (`Err`: what the model or size cannot be, before any call).
    fn body(request: &ImageRequest, image_input: &str) -> Result<(String, Value), String> {
        let (path, version) = route(&request.model)?;
        let mut input: Map<String, Value> = request.params.clone();
        input.insert("prompt".into(), request.prompt.clone().into());
        if let Some(negative) = &request.negative_prompt {
            input.insert("negative_prompt".into(), negative.clone().into());
        }
        match &request.size {
            Size::Auto => {}
            Size::Pixels { width, height } => {
                input.insert("width".into(), (*width).into());
                input.insert("height".into(), (*height).into());
            }
            Size::Aspect { .. } => {
                input.insert("aspect_ratio".into(), request.size.to_string().into());
            }
            Size::Named(size) => {
                return Err(format!(
                    "the Replicate provider takes sizes as WIDTHxHEIGHT, W:H or auto; not {size}"
                ));
            }
        }
        if request.count > 1 {
            input.insert("num_outputs".into(), request.count.into());
        }
        if let Some(seed) = request.seed {
            input.insert("seed".into(), seed.into());
        }
        if let Some(format) = &request.output_format {
            // The models' own word for JPEG.
            let format = if format == "jpeg" { "jpg" } else { format };
            input.insert("output_format".into(), format.into());
        }
        if let Some(image) = request.refs.images.first() {
            input.insert(image_input.into(), image.data_uri().into());
        }
        let mut body = json!({ "input": input });
        if let Some(version) = version {
            body["version"] = version.into();
        }
        Ok((path, body))
    }

    /// Whether the token may go to `url`: the base URL's own origin only.
    fn trusted(&self, url: &reqwest::Url) -> bool {
        origin(url) == self.base_origin
    }

    async fn create(&self, request: &ImageRequest) -> Result<Answer, Failure> {
        let (path, body) = Self::body(request, &self.image_input).map_err(Failure::invalid_job)?;
        let body = serde_json::to_vec(&body).map_err(|e| Failure::Permanent {
            kind: ErrorKind::InvalidRequest,
            message: format!("the request could not be written as JSON: {e}"),
            detail: Box::default(),
        })?;
        let url = format!("{}{path}", self.base_url);
        // The body (with a reference, its data URI) counts in the answer memory while sent.
        let sending = self.downloads.memory().reserve(body.len()).await;
        let clock = Clock::start(self.request_timeout);
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
        let after = retry_after(response.headers());
        if !(200..300).contains(&status) {
            let text = clock.read_error(response).await;
            return Err(classify(status, &text, after));
        }
        // Created: an answer that does not read whole may have been billed.
        let text = clock.read_small(response, self.max_answer).await?;
        let prediction = read_prediction(&text)?;
        let handle = PredictionHandle {
            id: prediction.id.clone(),
            get: prediction.get.clone(),
            cancel: prediction.cancel.clone(),
            created_unix_ms: unix_ms(),
        };
        self.settle(prediction, &handle, request).await
    }

    async fn poll_prediction(
        &self,
        handle: &Handle,
        request: &ImageRequest,
    ) -> Result<Answer, Failure> {
        let p: PredictionHandle = serde_json::from_value(handle.0.clone()).map_err(|e| {
            lost(
                format!("the journal's handle of the prediction cannot be read ({e})"),
                None,
            )
        })?;
        let url = reqwest::Url::parse(&p.get).map_err(|e| {
            lost(
                format!("the prediction's urls.get is not a URL ({e})"),
                Some(&p.id),
            )
        })?;
        if !self.trusted(&url) {
            return Err(Failure::Permanent {
                kind: ErrorKind::InvalidRequest,
                message: format!(
                    "the prediction's urls.get points to {}, which is not the base URL's host: \
                     the token is not sent there",
                    url.host_str().unwrap_or("no host")
                ),
                detail: Box::default(),
            });
        }
        let clock = Clock::start(self.request_timeout);
        let response = clock.send(self.client.get(url)).await.map_err(unbilled)?;
        let status = response.status().as_u16();
        let request_id = Some(p.id.clone());
        let after = retry_after(response.headers());
        if status == 404 {
            return Err(lost(
                "the provider does not know the prediction".into(),
                Some(&p.id),
            ));
        }
        if !(200..300).contains(&status) {
            let text = clock.read_error(response).await;
            return Err(with_request_id(classify(status, &text, after), &request_id));
        }
        let text = clock
            .read_small(response, self.max_answer)
            .await
            .map_err(|f| with_request_id(unbilled(f), &request_id))?;
        let prediction =
            read_prediction(&text).map_err(|f| with_request_id(unbilled(f), &request_id))?;
        self.settle(prediction, &p, request).await
    }

    /// What a prediction's state means for the job.
    async fn settle(
        &self,
        prediction: Prediction,
        handle: &PredictionHandle,
        request: &ImageRequest,
    ) -> Result<Answer, Failure> {
        let request_id = Some(prediction.id.clone());
        match &prediction.state {
            State::Running => Ok(Answer::Pending {
                after: by_age(handle.created_unix_ms, self.poll_min, self.poll_max),
                handle: Handle(serde_json::to_value(handle).unwrap_or_default()),
                request_id,
            }),
            State::Refused(_) => Err(failure(&prediction.state, &prediction.id)),
            State::Failed(_) | State::Canceled => {
                let f = failure(&prediction.state, &prediction.id);
                let mut gone = lost(f.message().to_string(), Some(&prediction.id));
                // A prediction that ran and failed was charged for its time.
                gone.detail_mut().charged = f.detail().charged;
                Err(gone)
            }
            State::Succeeded(outputs) => {
                let mut images = Vec::with_capacity(outputs.len());
                for output in outputs.iter().take(request.count.max(1) as usize) {
                    let image = match output.strip_prefix("data:") {
                        Some(uri) => {
                            let data = decode_data_uri(uri)?;
                            let (content_type, extension) = check_image(&data).map_err(|why| {
                                with_request_id(
                                    billed_failure(format!(
                                        "the provider's image is not one: {why}"
                                    )),
                                    &request_id,
                                )
                            })?;
                            GeneratedImage {
                                data,
                                content_type,
                                extension,
                                revised_prompt: None,
                            }
                        }
                        None => fetch_image(&self.downloads, output, &prediction.id).await?,
                    };
                    images.push(image);
                }
                Ok(Answer::Done(Generation {
                    usage: Usage {
                        images: images.len() as u32,
                        ..Usage::default()
                    },
                    images,
                    reported_usage: prediction
                        .predict_time
                        .map(|t| json!({ "predict_time": t })),
                    model: Some(request.model.clone()),
                    request_id,
                    rate_limits: None,
                }))
            }
        }
    }

    async fn cancel_prediction(&self, handle: &Handle) {
        let Ok(p) = serde_json::from_value::<PredictionHandle>(handle.0.clone()) else {
            return;
        };
        let Some(url) = p
            .cancel
            .as_deref()
            .and_then(|u| reqwest::Url::parse(u).ok())
        else {
            return;
        };
        if !self.trusted(&url) {
            return;
        }
        let clock = Clock::start(self.request_timeout);
        match clock.send(self.client.post(url)).await {
            Ok(r) if r.status().is_success() => {
                tracing::info!(prediction = %p.id, "canceled the job's prediction at the provider");
            }
            Ok(r) => tracing::warn!(prediction = %p.id, status = r.status().as_u16(),
                "the provider did not cancel the job's prediction"),
            Err(f) => tracing::warn!(prediction = %p.id, error = %f,
                "could not cancel the job's prediction"),
        }
    }
}

/// `data:image/png;base64,...` (models run with `sync` output answer so).
fn decode_data_uri(uri: &str) -> Result<bytes::Bytes, Failure> {
    let (meta, data) = uri
        .split_once(',')
        .ok_or_else(|| billed_failure("the provider's data URI has no data".into()))?;
    if !meta.ends_with(";base64") {
        return Err(billed_failure(
            "the provider's data URI is not base64".into(),
        ));
    }
    decode_owned(data)
}

impl ImageProvider for Replicate {
    fn kind(&self) -> &'static str {
        "replicate"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn defaults(&self) -> &JobDefaults {
        &self.defaults
    }

    fn submit<'a>(
        &'a self,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(self.create(request))
    }

    fn poll<'a>(
        &'a self,
        handle: &'a Handle,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(self.poll_prediction(handle, request))
    }

    fn cancel<'a>(&'a self, handle: &'a Handle) -> BoxFuture<'a, ()> {
        Box::pin(self.cancel_prediction(handle))
    }

    /// `GET {base_url}/v1/account`: free, and refused with a wrong token.
    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let url = format!("{}/v1/account", self.base_url);
            super::http::check_get(self.client.get(&url), Duration::from_secs(10), |v| match v
                .get("username")
                .and_then(Value::as_str)
            {
                Some(user) => format!("answers: account {user}"),
                None => "answers".into(),
            })
            .await
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_route_to_their_endpoint() {
        let v = "5599ed30703defd1d160a25a63321b4dec97101d98b4674bcc56e41f62f35637";
        assert_eq!(
            route("black-forest-labs/flux-schnell").unwrap(),
            (
                "/v1/models/black-forest-labs/flux-schnell/predictions".into(),
                None
            )
        );
        assert_eq!(
            route(&format!("stability-ai/sdxl:{v}")).unwrap(),
            ("/v1/predictions".into(), Some(v))
        );
        assert_eq!(route(v).unwrap(), ("/v1/predictions".into(), Some(v)));
        for bad in ["flux", "a/b/c", "a/b:short", "../x/y", "a/ b"] {
            assert!(route(bad).is_err(), "{bad}");
        }
    }
}

//! Self-hosted ComfyUI: the job's fields go into a workflow ([`Workflow`], checked at start-up),
//! which is queued on one of the provider's servers (`POST {host}/prompt`) and followed until it
//! is done; its images are fetched from `/view`. The answers are read in the core crate
//! ([`imagegen_core::comfyui`]).
//!
//! The worker names the prompt: its `prompt_id` (a UUID), with the server that gets it, is
//! recorded in the job's journal *before* the submit. Whoever handles the job next (after a
//! crash, a lost answer, a redelivery) looks that prompt up instead of running another:
//!
//! - by the jobs API (`GET /api/jobs/ID`) where the server has it: `pending`, `in_progress`,
//!   `completed`, `failed`, `cancelled`, or 404 for a prompt it does not know;
//! - else by `GET /history/ID`, which answers `{}` both while the prompt waits or runs and when
//!   the server never got it (or forgot it: queue and history live in memory, and a restart
//!   loses them), so a `{}` is followed by the queue (`GET /queue`), then the history again
//!   (it may have finished in between).
//!
//! A prompt the server does not know is queued again under the same id (a server that still
//! holds it answers 409, which is fine). A server that refuses connections, or fails three
//! requests in a row, is out of the rotation for `host_probe_secs`: the prompts it held are
//! placed anew on another server (its queue is gone with it).

pub mod hosts;

use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use self::hosts::Hosts;
use super::buffers::BufferPool;
use super::http::{Clock, MAX_SMALL_ANSWER, api_client, billed_failure, secret_header};
use super::queued::{by_age, lost, unbilled, unix_ms};
use super::{
    Answer, Capabilities, GeneratedImage, Generation, Handle, ImageProvider, ImageRequest,
    JobDefaults, Journal, Mode, Size, Sizes, check_image,
};
use crate::config::ComfyUiSettings;
use crate::config::selfhosted::Workflow;
use crate::domain::cost::Usage;
use crate::domain::error::Failure;
use imagegen_core::comfyui::workflow::{Values, new_prompt_id};
use imagegen_core::comfyui::{
    ImageRef, InQueue, PromptState, execution_failure, is_duplicate, is_unknown_job, queue_place,
    read_history, read_job, read_queued, submit_failure,
};

/// What a prompt's handle holds (in the job's journal).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct PromptHandle {
    /// The server's base URL.
    host: String,
    prompt_id: String,
    /// The seed it was queued with (queued again, it makes the same images).
    seed: u64,
    submitted_unix_ms: u64,
}

pub struct ComfyUi {
    capabilities: Capabilities,
    defaults: JobDefaults,
    workflow: Workflow,
    hosts: Hosts,
    client: reqwest::Client,
    buffers: BufferPool,
    request_timeout: Duration,
    max_response_bytes: usize,
    poll_min: Duration,
    poll_max: Duration,
    seconds_per_image: f64,
}

/// Where a prompt is, as far as the server knows.
enum Found {
    At(PromptState),
    /// Neither queued, running nor in the history: never arrived, or forgotten.
    Nowhere,
}

impl ComfyUi {
    /// `buffers`: the worker's answer memory, shared by its providers.
    pub fn new(settings: &ComfyUiSettings, buffers: BufferPool) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let workflow = settings.load_workflow().map_err(anyhow::Error::msg)?;
        let mut headers = HeaderMap::new();
        if !settings.api_key.expose_secret().is_empty() {
            headers.insert(
                reqwest::header::AUTHORIZATION,
                secret_header(&format!("Bearer {}", settings.api_key.expose_secret()))?,
            );
        }
        let model = match (settings.model.as_str(), workflow.own_model()) {
            ("", Some(own)) => own.to_string(),
            ("", None) => "comfyui".to_string(),
            (model, _) => model.to_string(),
        };
        let per_call = if workflow.takes_count() {
            settings.images_per_call
        } else {
            1
        };
        Ok(Self {
            capabilities: Capabilities {
                images_per_call: per_call,
                sizes: Sizes::Pixels {
                    max_side: 16_384,
                    multiple_of: 8,
                    max_pixels: 16_384 * 16_384,
                },
                formats: Some(&["png"]),
                seed: workflow.takes_seed(),
                negative_prompt: workflow.takes_negative_prompt(),
                transparency: false,
                mode: Mode::SubmitAndPoll,
                references: workflow.image_points().min(16) as u8,
                mask: false,
                params: &[],
            },
            defaults: JobDefaults {
                model,
                size: settings.size.clone(),
                quality: None,
                output_format: Some("png".into()),
                background: None,
            },
            hosts: Hosts::new(
                &settings.hosts,
                Duration::from_secs(settings.host_probe_secs),
            ),
            client: api_client(headers, Duration::from_secs(settings.connect_timeout_secs))?,
            workflow,
            buffers,
            request_timeout: Duration::from_secs(settings.request_timeout_secs),
            max_response_bytes: settings.max_response_bytes,
            poll_min: Duration::from_millis(settings.poll_min_ms),
            poll_max: Duration::from_secs(settings.poll_max_secs),
            seconds_per_image: settings.seconds_per_image,
        })
    }

    /// The workflow with the request's fields in it, `images` (the uploaded references' file
    /// names) at its image points (`Err`: a field it has no point for).
    fn graph(
        &self,
        request: &ImageRequest,
        seed: u64,
        images: &[String],
    ) -> Result<Value, Failure> {
        let size = match &request.size {
            Size::Auto => None,
            Size::Pixels { .. } if !self.workflow.takes_size() => {
                return Err(Failure::invalid_job(
                    "this provider's workflow has no width and height inputs: its jobs take no size",
                ));
            }
            Size::Pixels { width, height } => Some((*width, *height)),
            other => {
                return Err(Failure::invalid_job(format!(
                    "the comfyui provider takes sizes as WIDTHxHEIGHT or auto; not {other}"
                )));
            }
        };
        let model = if request.model == self.defaults.model {
            None
        } else if self.workflow.takes_model() {
            Some(request.model.as_str())
        } else {
            return Err(Failure::invalid_job(format!(
                "this provider's workflow has no model input: it runs {} only",
                self.defaults.model
            )));
        };
        Ok(Value::Object(self.workflow.fill(&Values {
            prompt: &request.prompt,
            negative_prompt: request.negative_prompt.as_deref(),
            seed,
            size,
            count: request.count.max(1).into(),
            model,
            images,
        })))
    }

    /// Uploads the request's reference images to server `i` (`POST /upload/image`, each named
    /// by its content, so an upload again replaces a file with the same bytes): their names, for
    /// the workflow's load-image nodes.
    async fn upload(&self, i: usize, request: &ImageRequest) -> Result<Vec<String>, Failure> {
        let host = &self.hosts.hosts[i].url;
        let mut names = Vec::with_capacity(request.refs.images.len());
        for image in &request.refs.images {
            let mut form = super::multipart::Form::new();
            form.file(
                "image",
                &format!("imagegen-{}.{}", &image.sha256[..32], image.extension),
                image.content_type,
                &image.data,
            );
            form.text("type", "input").text("overwrite", "true");
            let content_type = form.content_type();
            let (status, body) = self
                .exchange(
                    i,
                    self.client
                        .post(format!("{host}/upload/image"))
                        .header(reqwest::header::CONTENT_TYPE, content_type)
                        .body(form.finish()),
                )
                .await?;
            if status != 200 {
                return Err(http_failure(status, &body));
            }
            let answer: Value = serde_json::from_slice(&body).map_err(|e| {
                Failure::transient(format!(
                    "the server's answer to an upload could not be read: {e}"
                ))
            })?;
            let name = answer["name"].as_str().unwrap_or_default();
            if name.is_empty() {
                return Err(Failure::transient(
                    "the server's answer to an upload has no name",
                ));
            }
            names.push(match answer["subfolder"].as_str().unwrap_or("") {
                "" => name.to_string(),
                sub => format!("{sub}/{name}"),
            });
        }
        Ok(names)
    }

    /// Queues the prompt on its server (its references uploaded there first). A server that
    /// holds it already (409) is fine.
    async fn queue(
        &self,
        i: usize,
        p: &PromptHandle,
        request: &ImageRequest,
    ) -> Result<(), Failure> {
        let images = self.upload(i, request).await?;
        let graph = self.graph(request, p.seed, &images)?;
        let body = json!({
            "prompt": graph,
            "client_id": "imagegen",
            "prompt_id": p.prompt_id,
        });
        let (status, answer) = self
            .exchange(
                i,
                self.client.post(format!("{}/prompt", p.host)).json(&body),
            )
            .await?;
        if status == 200 {
            read_queued(&answer)?;
            return Ok(());
        }
        if is_duplicate(status, &answer) {
            return Ok(());
        }
        let mut failure = submit_failure(status, &answer);
        failure.detail_mut().request_id = Some(p.prompt_id.clone());
        Err(failure)
    }

    /// One small exchange with server `i`: its status and body. A transport failure counts
    /// against the server (one that refuses connections is out at once); none is billed.
    async fn exchange(
        &self,
        i: usize,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Vec<u8>), Failure> {
        let clock = Clock::start(self.request_timeout);
        let response = match clock.within(request.send()).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                self.hosts.failed(i, e.is_connect());
                return Err(unbilled(super::http::transport_failure(e)));
            }
            Err(timeout) => {
                self.hosts.failed(i, false);
                return Err(unbilled(timeout));
            }
        };
        let status = response.status().as_u16();
        let body = if status < 300 {
            clock.read_small(response, MAX_SMALL_ANSWER).await
        } else {
            Ok(clock.read_error(response).await)
        };
        match body {
            Ok(body) => {
                if status >= 500 {
                    self.hosts.failed(i, false);
                } else {
                    self.hosts.answered(i);
                }
                Ok((status, body))
            }
            Err(f) => {
                self.hosts.failed(i, false);
                Err(unbilled(f))
            }
        }
    }

    async fn submit_prompt(
        &self,
        request: &ImageRequest,
        journal: &dyn Journal,
    ) -> Result<Answer, Failure> {
        let seed = request.seed.unwrap_or_else(|| fastrand::u64(..1 << 53));
        // Refused before any server is asked: a field the workflow cannot take.
        self.graph(request, seed, &[])?;
        let i = self.hosts.place(&self.client).await?;
        let p = PromptHandle {
            host: self.hosts.hosts[i].url.clone(),
            prompt_id: new_prompt_id(),
            seed,
            submitted_unix_ms: unix_ms(),
        };
        let handle = Handle(serde_json::to_value(&p).unwrap_or_default());
        journal.record(&handle, Some(&p.prompt_id)).await?;
        self.queue(i, &p, request).await?;
        tracing::debug!(prompt_id = %p.prompt_id, host = %p.host, "queued the prompt");
        Ok(Answer::Pending {
            handle,
            after: self.poll_min,
            request_id: Some(p.prompt_id),
        })
    }

    async fn poll_prompt(
        &self,
        handle: &Handle,
        request: &ImageRequest,
    ) -> Result<Answer, Failure> {
        let p: PromptHandle = serde_json::from_value(handle.0.clone()).map_err(|e| {
            lost(
                format!("the journal's handle of the prompt cannot be read ({e})"),
                None,
            )
        })?;
        let id = Some(p.prompt_id.as_str());
        let Some(i) = self.hosts.find(&p.host) else {
            return Err(lost(
                format!(
                    "the prompt's server {} is no longer one of the provider's",
                    p.host
                ),
                id,
            ));
        };
        if self.hosts.is_out(i) {
            return Err(lost(
                format!(
                    "the prompt's server {} stopped answering: its queue is lost or out of reach",
                    p.host
                ),
                id,
            ));
        }
        let state = match self.find(i, &p).await {
            Ok(found) => found,
            // A server that just went out takes its prompts with it.
            Err(_) if self.hosts.is_out(i) => {
                return Err(lost(
                    format!("the prompt's server {} stopped answering", p.host),
                    id,
                ));
            }
            Err(f) => return Err(with_id(f, &p.prompt_id)),
        };
        let pending = || Answer::Pending {
            handle: handle.clone(),
            after: by_age(p.submitted_unix_ms, self.poll_min, self.poll_max),
            request_id: Some(p.prompt_id.clone()),
        };
        match state {
            Found::At(PromptState::Queued | PromptState::Running) => Ok(pending()),
            Found::Nowhere => {
                tracing::warn!(prompt_id = %p.prompt_id, host = %p.host,
                    "the server does not know the prompt (it never arrived, or the server \
                     restarted): queued again under the same id");
                self.queue(i, &p, request)
                    .await
                    .map_err(|f| with_id(f, &p.prompt_id))?;
                Ok(pending())
            }
            // Seen through the history alone, a prompt not done is not told from a lost one:
            // `find` asked the queue already, so this is not reached.
            Found::At(PromptState::Unknown) => Ok(pending()),
            Found::At(PromptState::Done { images, seconds }) => {
                self.collect(i, &p, request, images, seconds).await
            }
            Found::At(PromptState::Failed(error)) => {
                let failure = execution_failure(&error, &p.prompt_id);
                if failure.is_retryable() {
                    // It ran out of memory: run it again, as a new prompt.
                    let mut gone = lost(failure.message().to_string(), id);
                    gone.detail_mut().charged = true;
                    return Err(gone);
                }
                Err(failure)
            }
            Found::At(PromptState::Interrupted) => {
                Err(lost("the prompt was interrupted at the server".into(), id))
            }
        }
    }

    /// Where the server has the prompt: by the jobs API where it has one, else by history,
    /// queue and history again.
    async fn find(&self, i: usize, p: &PromptHandle) -> Result<Found, Failure> {
        let output = self.workflow.output_node();
        if self.hosts.jobs_api(i) != Some(false) {
            let url = format!("{}/api/jobs/{}", p.host, p.prompt_id);
            let (status, body) = self.exchange(i, self.client.get(url)).await?;
            match status {
                200 => {
                    self.hosts.set_jobs_api(i, true);
                    return read_job(&body, output).map(Found::At);
                }
                404 if is_unknown_job(&body) => {
                    self.hosts.set_jobs_api(i, true);
                    return Ok(Found::Nowhere);
                }
                404 | 405 => self.hosts.set_jobs_api(i, false),
                _ => return Err(http_failure(status, &body)),
            }
        }
        let history = format!("{}/history/{}", p.host, p.prompt_id);
        let state = self.history(i, &history, p, output).await?;
        if state != PromptState::Unknown {
            return Ok(Found::At(state));
        }
        let (status, body) = self
            .exchange(i, self.client.get(format!("{}/queue", p.host)))
            .await?;
        if status != 200 {
            return Err(http_failure(status, &body));
        }
        match queue_place(&body, &p.prompt_id)? {
            InQueue::Running => return Ok(Found::At(PromptState::Running)),
            InQueue::Waiting => return Ok(Found::At(PromptState::Queued)),
            InQueue::Absent => {}
        }
        // Done between the two reads, or nowhere.
        Ok(match self.history(i, &history, p, output).await? {
            PromptState::Unknown => Found::Nowhere,
            state => Found::At(state),
        })
    }

    async fn history(
        &self,
        i: usize,
        url: &str,
        p: &PromptHandle,
        output: Option<&str>,
    ) -> Result<PromptState, Failure> {
        let (status, body) = self.exchange(i, self.client.get(url)).await?;
        if status != 200 {
            return Err(http_failure(status, &body));
        }
        read_history(&body, &p.prompt_id, output)
    }

    /// Fetches a finished prompt's images from `/view` (at most the request's count).
    async fn collect(
        &self,
        i: usize,
        p: &PromptHandle,
        request: &ImageRequest,
        images: Vec<ImageRef>,
        seconds: Option<f64>,
    ) -> Result<Answer, Failure> {
        if images.is_empty() {
            return Err(lost(
                "the prompt finished without saving an image (has the workflow a SaveImage \
                 node, and is output_node right?)"
                    .into(),
                Some(&p.prompt_id),
            ));
        }
        let mut out = Vec::new();
        for image in images.iter().take(request.count.max(1).into()) {
            out.push(self.view(i, p, image).await?);
        }
        let estimated = seconds.is_none();
        let gpu_seconds = seconds.unwrap_or(self.seconds_per_image * out.len() as f64);
        Ok(Answer::Done(Generation {
            usage: Usage {
                images: out.len() as u32,
                gpu_seconds,
                estimated,
                ..Usage::default()
            },
            images: out,
            reported_usage: seconds.map(|s| json!({ "gpu_seconds": s })),
            model: Some(request.model.clone()),
            request_id: Some(p.prompt_id.clone()),
            rate_limits: None,
        }))
    }

    /// One saved image, by `GET /view?filename=&subfolder=&type=` on the prompt's server.
    async fn view(
        &self,
        i: usize,
        p: &PromptHandle,
        image: &ImageRef,
    ) -> Result<GeneratedImage, Failure> {
        let mut url = reqwest::Url::parse(&format!("{}/view", p.host))
            .map_err(|e| Failure::transient(format!("the server's URL: {e}")))?;
        url.query_pairs_mut()
            .append_pair("filename", &image.filename)
            .append_pair("subfolder", &image.subfolder)
            .append_pair(
                "type",
                if image.kind.is_empty() {
                    "output"
                } else {
                    &image.kind
                },
            );
        let request_id = Some(p.prompt_id.clone());
        let mut clock = Clock::start(self.request_timeout);
        let response = clock.send(self.client.get(url)).await.map_err(|f| {
            self.hosts.failed(i, false);
            with_id(unbilled(f), &p.prompt_id)
        })?;
        let status = response.status().as_u16();
        if status == 404 {
            return Err(lost(
                format!("the server no longer has the image {}", image.filename),
                Some(&p.prompt_id),
            ));
        }
        if status != 200 {
            let body = clock.read_error(response).await;
            return Err(with_id(http_failure(status, &body), &p.prompt_id));
        }
        let data = clock
            .read(&self.buffers, response, self.max_response_bytes)
            .await
            .map_err(|f| with_id(unbilled(f), &p.prompt_id))?
            .freeze();
        let (content_type, extension) = check_image(&data).map_err(|why| {
            super::http::with_request_id(
                billed_failure(format!("the server's image is not one: {why}")),
                &request_id,
            )
        })?;
        Ok(GeneratedImage {
            data,
            content_type,
            extension,
            revised_prompt: None,
        })
    }

    /// Takes a queued prompt off its server: the jobs API's cancel where there is one, else a
    /// waiting prompt is deleted from the queue and a running one interrupted (by its id: a
    /// server too old to take the id interrupts whatever runs, so the queue is asked first).
    async fn cancel_prompt(&self, handle: &Handle) {
        let Ok(p) = serde_json::from_value::<PromptHandle>(handle.0.clone()) else {
            return;
        };
        let Some(i) = self.hosts.find(&p.host) else {
            return;
        };
        let done = if self.hosts.jobs_api(i) == Some(true) {
            let url = format!("{}/api/jobs/{}/cancel", p.host, p.prompt_id);
            self.exchange(i, self.client.post(url)).await
        } else {
            match self
                .exchange(i, self.client.get(format!("{}/queue", p.host)))
                .await
            {
                Ok((200, body)) => match queue_place(&body, &p.prompt_id) {
                    Ok(InQueue::Waiting) => {
                        let body = json!({ "delete": [p.prompt_id] });
                        let url = format!("{}/queue", p.host);
                        self.exchange(i, self.client.post(url).json(&body)).await
                    }
                    Ok(InQueue::Running) => {
                        let body = json!({ "prompt_id": p.prompt_id });
                        let url = format!("{}/interrupt", p.host);
                        self.exchange(i, self.client.post(url).json(&body)).await
                    }
                    _ => return,
                },
                other => other,
            }
        };
        match done {
            Ok((status, _)) if status < 300 => {
                tracing::info!(prompt_id = %p.prompt_id, "took the job's prompt off its server")
            }
            Ok((status, _)) => tracing::warn!(prompt_id = %p.prompt_id, status,
                "the server did not take the job's prompt off"),
            Err(f) => tracing::warn!(prompt_id = %p.prompt_id, error = %f,
                "could not take the job's prompt off its server"),
        }
    }
}

/// A status no answer above expects: by the taxonomy's defaults, never billed.
fn http_failure(status: u16, body: &[u8]) -> Failure {
    unbilled(submit_failure(status, body))
}

fn with_id(mut failure: Failure, prompt_id: &str) -> Failure {
    failure.detail_mut().request_id = Some(prompt_id.to_string());
    failure
}

impl ImageProvider for ComfyUi {
    fn kind(&self) -> &'static str {
        "comfyui"
    }

    fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    fn defaults(&self) -> &JobDefaults {
        &self.defaults
    }

    fn estimate(&self, request: &ImageRequest) -> Usage {
        Usage {
            images: request.count.into(),
            gpu_seconds: self.seconds_per_image * f64::from(request.count),
            estimated: true,
            ..Usage::default()
        }
    }

    fn submit<'a>(
        &'a self,
        request: &'a ImageRequest,
        journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(self.submit_prompt(request, journal))
    }

    fn poll<'a>(
        &'a self,
        handle: &'a Handle,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(self.poll_prompt(handle, request))
    }

    fn cancel<'a>(&'a self, handle: &'a Handle) -> BoxFuture<'a, ()> {
        Box::pin(self.cancel_prompt(handle))
    }

    /// `GET {host}/system_stats` of each server.
    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let mut answers = Vec::new();
            let mut errors = Vec::new();
            for host in &self.hosts.hosts {
                let url = format!("{}/system_stats", host.url);
                match super::http::check_get(self.client.get(&url), Duration::from_secs(10), |v| {
                    v.pointer("/system/comfyui_version")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_string()
                })
                .await
                {
                    Ok(version) => answers.push(format!("{} ({version})", host.url)),
                    Err(e) => errors.push(format!("{}: {e}", host.url)),
                }
            }
            let n = self.hosts.hosts.len();
            if answers.is_empty() {
                return Err(format!("no server answers: {}", errors.join("; ")));
            }
            let mut text = format!(
                "{} of {n} servers answer: {}",
                answers.len(),
                answers.join(", ")
            );
            if !errors.is_empty() {
                text.push_str(&format!("; not {}", errors.join("; ")));
            }
            Ok(text)
        })
    }
}

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
mod server;

use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::{Value, json};

use self::hosts::Hosts;
use self::server::with_id;
use super::buffers::BufferPool;
use super::http::{api_client, secret_header};
use super::queued::{by_age, lost, unix_ms};
use super::{
    Answer, Capabilities, Generation, Handle, ImageProvider, ImageRequest, JobDefaults, Journal,
    Mode, Size, Sizes,
};
use crate::config::ComfyUiSettings;
use crate::config::selfhosted::Workflow;
use crate::domain::cost::Usage;
use crate::domain::error::Failure;
use imagegen_core::comfyui::workflow::{Values, new_prompt_id};
use imagegen_core::comfyui::{
    ImageRef, PromptState, execution_failure, is_duplicate, read_queued, submit_failure,
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
        super::request::gpu_estimate(request, self.seconds_per_image)
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

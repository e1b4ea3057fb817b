//! Black Forest Labs' FLUX models: `POST {base_url}/{model}` queues a task and answers its id and
//! `polling_url`; `GET` of that URL says where the task is; a Ready task's `result.sample` is a
//! signed URL, valid ten minutes, downloaded at once. The answers are read in the core crate
//! ([`imagegen_core::bfl`]).
//!
//! The provider names the task, so the worker writes the handle to the job's journal the moment
//! the submit is answered (the pipeline does, before it waits): a redelivered job, or another
//! worker after a crash, polls that task instead of paying for another. Only a submit whose
//! answer is lost can pay twice, and it is counted as `possibly_billed`.
//!
//! The key (`x-key`) goes to the base URL's host and to BFL's own hosts (`*.bfl.ai`, where
//! regional polling URLs point), never to a polling URL elsewhere; samples are fetched without it.

use std::time::Duration;

use futures_util::future::BoxFuture;
use reqwest::header::HeaderMap;
use secrecy::ExposeSecret;
use serde_json::{Map, Value, json};
use tokio::time::Instant;

mod active;

use self::active::Active;
use super::download::Downloads;
use super::fetch::FetchRules;
use super::http::{
    Clock, MAX_SMALL_ANSWER, api_client, retry_after, secret_header, with_request_id,
};
use super::queued::{fetch_image, lost, origin, unbilled, unix_ms};
use super::{
    Answer, Capabilities, Generation, Handle, ImageProvider, ImageRequest, JobDefaults, Journal,
    Mode, Size, Sizes,
};
use crate::config::BflSettings;
use crate::domain::cost::Usage;
use crate::domain::error::{ErrorKind, Failure};
use imagegen_core::bfl::{Polled, classify, moderated, read_poll, read_submit};

const CAPABILITIES: Capabilities = Capabilities {
    images_per_call: 1,
    sizes: Sizes::Pixels {
        max_side: 4096,
        multiple_of: 16,
        max_pixels: 4_194_304,
    },
    formats: Some(&["png", "jpeg"]),
    seed: true,
    negative_prompt: false,
    transparency: false,
    mode: Mode::SubmitAndPoll,
    references: 8,
    mask: false,
    params: &[
        "safety_tolerance",
        "prompt_upsampling",
        "raw",
        "steps",
        "guidance",
    ],
};

/// The longest wait between two polls when the provider reports its progress (the time left
/// is then known, roughly).
const PROGRESS_WAIT_MAX: Duration = Duration::from_secs(60);

/// The longest a submit waits for room among this worker's active tasks (`max_active`) before
/// its job goes to a delay queue, no attempt counted.
const ROOM_WAIT: Duration = Duration::from_secs(60);

/// The longest a submit waits out the account's cap on active tasks before it counts as a
/// failed attempt.
const CAP_WAIT: Duration = Duration::from_secs(120);

pub struct Bfl {
    client: reqwest::Client,
    base_url: String,
    /// Scheme, host and port of the base URL: polling URLs there get the key.
    base_origin: String,
    downloads: Downloads,
    request_timeout: Duration,
    poll_min: Duration,
    poll_max: Duration,
    active: Active,
    defaults: JobDefaults,
}

/// What a task's handle holds (in the job's journal).
#[derive(serde::Serialize, serde::Deserialize)]
struct TaskHandle {
    id: String,
    polling_url: String,
    /// When it was submitted (Unix ms): polls back off with its age.
    submitted_unix_ms: u64,
    /// The credits the submit said it costs.
    #[serde(default)]
    cost: Option<f64>,
}

impl Bfl {
    /// `buffers`: the worker's answer memory, shared by its providers.
    pub fn new(
        settings: &BflSettings,
        buffers: super::buffers::BufferPool,
    ) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        let mut headers = HeaderMap::new();
        headers.insert("x-key", secret_header(settings.api_key.expose_secret())?);
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
            active: Active::new(settings.max_active),
            defaults: JobDefaults {
                model: settings.model.clone(),
                size: settings.size.clone(),
                quality: None,
                output_format: Some(settings.output_format.clone()),
                background: None,
            },
        })
    }

    /// The submit's body: the job's `params`, then the fields the worker controls over them.
    fn body(request: &ImageRequest) -> Value {
        let mut body: Map<String, Value> = request.params.clone();
        body.insert("prompt".into(), request.prompt.clone().into());
        if let Size::Pixels { width, height } = request.size {
            body.insert("width".into(), width.into());
            body.insert("height".into(), height.into());
        }
        if let Some(seed) = request.seed {
            body.insert("seed".into(), seed.into());
        }
        if let Some(format) = &request.output_format {
            body.insert("output_format".into(), format.clone().into());
        }
        // Reference images: input_image, then input_image_2 .. input_image_8, base64.
        for (i, image) in request.refs.images.iter().enumerate() {
            let name = match i {
                0 => "input_image".to_string(),
                i => format!("input_image_{}", i + 1),
            };
            body.insert(name, (*image.base64()).into());
        }
        Value::Object(body)
    }

    /// Whether the key may go to `url`: the base URL's own origin, or an https host of BFL's.
    fn trusted(&self, url: &reqwest::Url) -> bool {
        origin(url) == self.base_origin
            || (url.scheme() == "https"
                && url
                    .host_str()
                    .is_some_and(|h| h == "bfl.ai" || h.ends_with(".bfl.ai")))
    }

    /// When to look at a task again. With the progress the provider reports (a share of the
    /// work done), just after the time left at the pace so far; without it, an eighth of the
    /// task's age (a task is then seen ready at most about 12 % after it is). Within
    /// `poll_min_ms` and, without progress, `poll_max_secs` ([`PROGRESS_WAIT_MAX`] with it).
    fn next_poll(&self, handle: &TaskHandle, progress: Option<f64>) -> Duration {
        let age = Duration::from_millis(unix_ms().saturating_sub(handle.submitted_unix_ms));
        match progress.filter(|p| p.is_finite() && *p > 0.0 && *p < 1.0) {
            Some(done) => {
                let left = age.mul_f64((1.0 - done) / done);
                (left + left / 50 + Duration::from_millis(50))
                    .clamp(self.poll_min, PROGRESS_WAIT_MAX.max(self.poll_min))
            }
            None => (age / 8).clamp(self.poll_min, self.poll_max),
        }
    }

    async fn submit_task(&self, request: &ImageRequest) -> Result<Answer, Failure> {
        let body = serde_json::to_vec(&Self::body(request)).map_err(|e| Failure::Permanent {
            kind: ErrorKind::InvalidRequest,
            message: format!("the request could not be written as JSON: {e}"),
            detail: Box::default(),
        })?;
        // Room among this worker's active tasks, waited for a while; past that the job waits in
        // a delay queue rather than holding its message (the jobs whose polls would make room
        // may be queued behind it).
        let Ok(ticket) = tokio::time::timeout(ROOM_WAIT, self.active.admit()).await else {
            return Ok(Answer::Busy {
                after: Duration::from_secs(5),
            });
        };
        let url = format!("{}/{}", self.base_url, request.model);
        let waiting_since = Instant::now();
        let mut cap_wait = Duration::from_secs(1);
        loop {
            // The body (with references, their base64) counts in the answer memory while sent.
            let sending = self.downloads.memory().reserve(body.len()).await;
            let clock = Clock::start(self.request_timeout);
            let response = clock
                .send(
                    self.client
                        .post(&url)
                        .header(reqwest::header::CONTENT_TYPE, "application/json")
                        .body(body.clone()),
                )
                .await;
            drop(sending);
            let response = response?;
            let status = response.status().as_u16();
            if (200..300).contains(&status) {
                // Accepted: an answer that does not read whole may have been billed.
                let text = clock.read_small(response, MAX_SMALL_ANSWER).await?;
                let submitted = read_submit(&text)?;
                ticket.bind(&submitted.id);
                let handle = TaskHandle {
                    id: submitted.id.clone(),
                    polling_url: submitted.polling_url,
                    submitted_unix_ms: unix_ms(),
                    cost: submitted.cost,
                };
                return Ok(Answer::Pending {
                    after: self.poll_min,
                    handle: Handle(serde_json::to_value(&handle).unwrap_or_default()),
                    request_id: Some(submitted.id),
                });
            }
            let after = retry_after(response.headers());
            let text = clock.read_error(response).await;
            // Over the account's cap on active tasks: nothing was bought, and the job is not
            // at fault. Wait for a task to finish, a while, before it counts as an attempt.
            if status == 429 && waiting_since.elapsed() < CAP_WAIT {
                let wait = after.unwrap_or(cap_wait).min(Duration::from_secs(10));
                tracing::debug!(
                    wait_ms = wait.as_millis() as u64,
                    "the provider's cap on active tasks is reached: waiting"
                );
                tokio::time::sleep(wait).await;
                cap_wait = (cap_wait * 2).min(Duration::from_secs(8));
                continue;
            }
            return Err(classify(status, &text, after));
        }
    }

    async fn poll_task(&self, handle: &Handle, request: &ImageRequest) -> Result<Answer, Failure> {
        let task: TaskHandle = serde_json::from_value(handle.0.clone()).map_err(|e| {
            lost(
                format!("the journal's handle of the task cannot be read ({e}): submitting anew"),
                None,
            )
        })?;
        let url = reqwest::Url::parse(&task.polling_url).map_err(|e| {
            lost(
                format!("the task's polling_url is not a URL ({e})"),
                Some(&task.id),
            )
        })?;
        if !self.trusted(&url) {
            // The key would go to a host that is not BFL's: refused, whatever the answer said.
            self.active.finished(&task.id);
            return Err(Failure::Permanent {
                kind: ErrorKind::InvalidRequest,
                message: format!(
                    "the provider's polling_url points to {}, which is not the base URL's host \
                     nor one of BFL's: the key is not sent there",
                    url.host_str().unwrap_or("no host")
                ),
                detail: Box::default(),
            });
        }
        let clock = Clock::start(self.request_timeout);
        let response = clock.send(self.client.get(url)).await.map_err(unbilled)?;
        let status = response.status().as_u16();
        let request_id = Some(task.id.clone());
        if !(200..300).contains(&status) {
            let after = retry_after(response.headers());
            let text = clock.read_error(response).await;
            return Err(with_request_id(classify(status, &text, after), &request_id));
        }
        let text = clock
            .read_small(response, MAX_SMALL_ANSWER)
            .await
            .map_err(|f| with_request_id(unbilled(f), &request_id))?;
        let polled = read_poll(&text)
            .map_err(|why| with_request_id(Failure::transient(why), &request_id))?;
        match polled {
            Polled::Pending { progress } => Ok(Answer::Pending {
                after: self.next_poll(&task, progress),
                handle: handle.clone(),
                request_id,
            }),
            Polled::Moderated { status, details } => {
                self.active.finished(&task.id);
                Err(moderated(&status, details, request_id))
            }
            Polled::Error { message } => {
                self.active.finished(&task.id);
                Err(lost(
                    format!("the task failed at the provider: {message}"),
                    Some(&task.id),
                ))
            }
            Polled::NotFound => {
                self.active.finished(&task.id);
                Err(lost(
                    "the provider does not know the task".into(),
                    Some(&task.id),
                ))
            }
            Polled::Ready { sample, .. } => {
                self.active.finished(&task.id);
                let image = fetch_image(&self.downloads, &sample, &task.id).await?;
                let (width, height) = match request.size {
                    Size::Pixels { width, height } => (width, height),
                    _ => (1024, 1024),
                };
                Ok(Answer::Done(Generation {
                    images: vec![image],
                    reported_usage: task.cost.map(|c| json!({ "credits": c })),
                    usage: Usage {
                        images: 1,
                        megapixels: f64::from(width) * f64::from(height) / 1e6,
                        credits: task.cost.unwrap_or(0.0),
                        estimated: task.cost.is_none(),
                        ..Usage::default()
                    },
                    model: Some(request.model.clone()),
                    request_id,
                    rate_limits: None,
                }))
            }
        }
    }
}

impl ImageProvider for Bfl {
    fn kind(&self) -> &'static str {
        "bfl"
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
        Box::pin(self.submit_task(request))
    }

    fn poll<'a>(
        &'a self,
        handle: &'a Handle,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(self.poll_task(handle, request))
    }

    /// `GET {base_url}/credits`: what the account has left.
    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async move {
            let url = format!("{}/credits", self.base_url);
            super::http::check_get(self.client.get(&url), Duration::from_secs(10), |v| match v
                .get("credits")
                .and_then(Value::as_f64)
            {
                Some(c) => format!("answers: {c} credits left"),
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
    fn the_key_goes_to_the_base_url_and_bfl_hosts_only() {
        let settings: BflSettings = serde_json::from_value(json!({
            "base_url": "https://api.bfl.ai/v1", "api_key": "k", "model": "flux-2-pro",
            "size": "1024x1024", "output_format": "png", "max_active": 2, "poll_min_ms": 500,
            "poll_max_secs": 10, "request_timeout_secs": 5, "connect_timeout_secs": 5,
            "max_response_bytes": 4096, "download_hosts": []
        }))
        .unwrap();
        let bfl = Bfl::new(&settings, super::super::buffers::BufferPool::unbounded()).unwrap();
        let url = |u: &str| reqwest::Url::parse(u).unwrap();
        assert!(bfl.trusted(&url("https://api.bfl.ai/v1/get_result?id=1")));
        assert!(bfl.trusted(&url("https://api.eu1.bfl.ai/v1/get_result?id=1")));
        assert!(!bfl.trusted(&url("http://api.eu1.bfl.ai/v1/get_result?id=1")));
        assert!(!bfl.trusted(&url("https://bfl.ai.evil.example/get_result")));
        assert!(!bfl.trusted(&url("https://169.254.169.254/latest/meta-data")));
        let old = TaskHandle {
            id: "t".into(),
            polling_url: String::new(),
            submitted_unix_ms: unix_ms() - 40_000,
            cost: None,
        };
        assert_eq!(bfl.next_poll(&old, None), Duration::from_secs(5));
        // 40 s for a quarter of the work: about 120 s left, waited up to a minute.
        assert_eq!(bfl.next_poll(&old, Some(0.25)), PROGRESS_WAIT_MAX);
        let wait = bfl.next_poll(&old, Some(0.8));
        assert!(
            (Duration::from_secs(10)..Duration::from_secs(11)).contains(&wait),
            "{wait:?}"
        );
        let new = TaskHandle {
            submitted_unix_ms: unix_ms(),
            ..old
        };
        assert_eq!(bfl.next_poll(&new, None), Duration::from_millis(500));
        assert_eq!(
            bfl.next_poll(&new, Some(f64::NAN)),
            Duration::from_millis(500)
        );
    }
}

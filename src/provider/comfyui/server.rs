//! Talking to one of the provider's servers: one small exchange (its failures counted against
//! the server), uploading a request's reference images, finding where the server has a prompt
//! (the jobs API, else history, queue and history again), fetching a saved image from `/view`,
//! and taking a prompt off.

use serde_json::{Value, json};

use super::super::http::{Clock, MAX_SMALL_ANSWER, billed_failure};
use super::super::queued::{lost, unbilled};
use super::super::{GeneratedImage, Handle, ImageRequest, check_image};
use super::{ComfyUi, Found, PromptHandle};
use crate::domain::error::Failure;
use imagegen_core::comfyui::{
    ImageRef, InQueue, PromptState, is_unknown_job, queue_place, read_history, read_job,
    submit_failure,
};

impl ComfyUi {
    /// Uploads the request's reference images to server `i` (`POST /upload/image`, each named
    /// by its content, so an upload again replaces a file with the same bytes): their names, for
    /// the workflow's load-image nodes.
    pub(super) async fn upload(
        &self,
        i: usize,
        request: &ImageRequest,
    ) -> Result<Vec<String>, Failure> {
        let host = &self.hosts.hosts[i].url;
        let mut names = Vec::with_capacity(request.refs.images.len());
        for image in &request.refs.images {
            let mut form = super::super::multipart::Form::new();
            form.file(
                "image",
                &format!("imagegen-{}.{}", &image.sha256[..32], image.extension),
                image.content_type,
                &image.data,
            );
            form.text("type", "input").text("overwrite", "true");
            let content_type = form.content_type();
            let upload = form.finish();
            // The upload counts in the answer memory while it is sent.
            let sending = self.buffers.reserve(upload.len()).await;
            let exchanged = self
                .exchange(
                    i,
                    self.client
                        .post(format!("{host}/upload/image"))
                        .header(reqwest::header::CONTENT_TYPE, content_type)
                        .body(upload),
                )
                .await;
            drop(sending);
            let (status, body) = exchanged?;
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

    /// One small exchange with server `i`: its status and body. A transport failure counts
    /// against the server (one that refuses connections is out at once); none is billed.
    pub(super) async fn exchange(
        &self,
        i: usize,
        request: reqwest::RequestBuilder,
    ) -> Result<(u16, Vec<u8>), Failure> {
        let clock = Clock::start(self.request_timeout);
        let response = match clock.within(request.send()).await {
            Ok(Ok(response)) => response,
            Ok(Err(e)) => {
                self.hosts.failed(i, e.is_connect());
                return Err(unbilled(super::super::http::transport_failure(e)));
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

    /// Where the server has the prompt: by the jobs API where it has one, else by history,
    /// queue and history again.
    pub(super) async fn find(&self, i: usize, p: &PromptHandle) -> Result<Found, Failure> {
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

    pub(super) async fn history(
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

    /// One saved image, by `GET /view?filename=&subfolder=&type=` on the prompt's server.
    pub(super) async fn view(
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
            super::super::http::with_request_id(
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
    pub(super) async fn cancel_prompt(&self, handle: &Handle) {
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
pub(super) fn http_failure(status: u16, body: &[u8]) -> Failure {
    unbilled(submit_failure(status, body))
}

pub(super) fn with_id(mut failure: Failure, prompt_id: &str) -> Failure {
    failure.detail_mut().request_id = Some(prompt_id.to_string());
    failure
}

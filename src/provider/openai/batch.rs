//! The OpenAI Files and Batch APIs, as the batch lane uses them: upload an input file
//! (`POST /files`, purpose `batch`), create a batch of it with metadata (`POST /batches`),
//! look at it (`GET /batches/ID`), list the account's batches newest first (to find one created
//! twice), cancel one, and stream a file's content (an output file reaches gigabytes).

use std::time::Duration;

use bytes::Bytes;
use serde_json::{Map, Value, json};

pub use imagegen_core::openai::batch::{BatchList, BatchObject, FileObject};

use super::errors::{ApiErrorBody, classify};
use crate::config::OpenAiSettings;
use crate::domain::error::Failure;
use crate::provider::http::{api_client, header_str};

/// Largest answer of a call that returns a batch, a list or a file object.
const MAX_SMALL_ANSWER: usize = 4 << 20;

/// A client of one account's Files and Batch APIs.
pub struct BatchClient {
    client: reqwest::Client,
    base: String,
    /// For calls that move little (everything but a file's content).
    timeout: Duration,
}

impl BatchClient {
    pub fn new(settings: &OpenAiSettings) -> anyhow::Result<Self> {
        crate::install_crypto_provider();
        Ok(Self {
            client: api_client(
                super::auth_headers(settings)?,
                Duration::from_secs(settings.connect_timeout_secs),
            )?,
            base: settings.base_url.trim_end_matches('/').to_string(),
            timeout: Duration::from_secs(settings.request_timeout_secs.max(30)),
        })
    }

    /// Uploads an input file (JSONL) as purpose `batch`.
    pub async fn upload(&self, filename: &str, content: Bytes) -> Result<FileObject, Failure> {
        self.upload_as("batch", filename, "application/jsonl", content)
            .await
    }

    /// Uploads a file for `purpose` (`vision` for the images a batch's edits name).
    pub async fn upload_as(
        &self,
        purpose: &str,
        filename: &str,
        content_type: &str,
        content: Bytes,
    ) -> Result<FileObject, Failure> {
        let mut form = crate::provider::multipart::Form::new();
        form.text("purpose", purpose);
        form.file("file", filename, content_type, &content);
        let content_type = form.content_type();
        // An upload of up to 200 MB: the time a slow link needs, not a small call's.
        let timeout = self.timeout + Duration::from_secs(content.len() as u64 / (256 * 1024));
        let request = self
            .client
            .post(format!("{}/files", self.base))
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .body(form.finish())
            .timeout(timeout);
        self.json(request).await
    }

    /// Creates a batch of an uploaded input file, named in `metadata`.
    pub async fn create(
        &self,
        input_file_id: &str,
        endpoint: &str,
        metadata: Map<String, Value>,
    ) -> Result<BatchObject, Failure> {
        let body = json!({
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
            "metadata": metadata,
        });
        self.json(
            self.client
                .post(format!("{}/batches", self.base))
                .json(&body),
        )
        .await
    }

    pub async fn get(&self, id: &str) -> Result<BatchObject, Failure> {
        self.json(self.client.get(format!("{}/batches/{id}", self.base)))
            .await
    }

    pub async fn cancel(&self, id: &str) -> Result<BatchObject, Failure> {
        self.json(
            self.client
                .post(format!("{}/batches/{id}/cancel", self.base)),
        )
        .await
    }

    /// Deletes a file the account keeps.
    pub async fn delete_file(&self, id: &str) -> Result<(), Failure> {
        self.json::<serde_json::Value>(self.client.delete(format!("{}/files/{id}", self.base)))
            .await
            .map(drop)
    }

    /// One page of the account's batches, newest first, after the batch `after`.
    pub async fn list(&self, after: Option<&str>, limit: u32) -> Result<BatchList, Failure> {
        let mut url = format!("{}/batches?limit={limit}", self.base);
        if let Some(after) = after {
            url.push_str("&after=");
            url.push_str(
                &percent_encoding::utf8_percent_encode(after, percent_encoding::NON_ALPHANUMERIC)
                    .to_string(),
            );
        }
        self.json(self.client.get(url)).await
    }

    /// A file's content, to be read as a stream (no timeout on the whole: a gigabyte takes
    /// what it takes; the connection's own timeouts hold).
    pub async fn content(&self, file_id: &str) -> Result<reqwest::Response, Failure> {
        let response = self
            .client
            .get(format!("{}/files/{file_id}/content", self.base))
            .send()
            .await
            .map_err(crate::provider::http::transport_failure)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(self.refusal(response).await);
        }
        Ok(response)
    }

    async fn json<T: serde::de::DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<T, Failure> {
        let response = request
            .timeout(self.timeout)
            .send()
            .await
            .map_err(crate::provider::http::transport_failure)?;
        let status = response.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(self.refusal(response).await);
        }
        let mut body = Vec::new();
        crate::provider::http::read_limited(response, MAX_SMALL_ANSWER, &mut body).await?;
        serde_json::from_slice(&body).map_err(|e| {
            Failure::transient(format!("the batch API's answer could not be read: {e}"))
        })
    }

    async fn refusal(&self, response: reqwest::Response) -> Failure {
        let status = response.status().as_u16();
        let request_id = header_str(response.headers(), "x-request-id");
        let after = crate::provider::http::retry_after(response.headers());
        let mut body = Vec::new();
        let _ = crate::provider::http::read_limited(response, 64 * 1024, &mut body).await;
        classify(status, &ApiErrorBody::parse(&body), after, None, request_id)
    }
}

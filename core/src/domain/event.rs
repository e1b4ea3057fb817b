//! The result event: one CloudEvents 1.0 event (structured JSON mode) per finished job.
//!
//! A successful job's event is also its result record, stored next to its images: a redelivered
//! job finds the record and publishes the very same event again instead of paying again.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

use super::error::{ErrorKind, Failure};
use super::json::RawJson;

/// Version of the `data` schema (`schemas/result-event.schema.json`).
pub const EVENT_SCHEMA_VERSION: u32 = 1;

pub const TYPE_SUCCEEDED: &str = "imagegen.job.succeeded";
pub const TYPE_FAILED: &str = "imagegen.job.failed";
pub const ROUTING_SUCCEEDED: &str = "job.succeeded";
pub const ROUTING_FAILED: &str = "job.failed";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Succeeded,
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudEvent {
    pub specversion: String,
    pub id: String,
    pub source: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub time: String,
    pub subject: String,
    pub datacontenttype: String,
    pub data: ResultData,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultData {
    pub schema_version: u32,
    pub job_id: String,
    pub batch: Option<String>,
    pub status: Status,
    pub images: Vec<StoredImage>,
    pub error: Option<EventError>,
    /// Provider calls made for this job, earlier deliveries' failed attempts included.
    pub attempts: u32,
    /// Failed requests that may have been billed all the same (a timeout or reset after sending).
    pub possibly_billed: u32,
    pub model: Option<String>,
    pub revised_prompt: Option<String>,
    /// Token usage as the provider reported it (summed when several calls produced the images).
    pub usage: Option<Value>,
    pub cost_usd: Option<f64>,
    /// True when `cost_usd` is an estimate (the provider reported no usage).
    pub cost_estimated: bool,
    pub duration_ms: u64,
    pub provider_request_id: Option<String>,
    /// The provider's refusal details (moderation categories) when it gave them.
    pub refusal: Option<Value>,
    /// The job's `metadata`, byte for byte as its producer wrote it.
    pub metadata: RawJson,
    /// The job's fingerprint ([`crate::domain::job::Job::fingerprint`]): a later job under the
    /// same id with another fingerprint does not receive this result. Absent from records
    /// stored before it existed (they match any job).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_fingerprint: Option<String>,
    /// The AMQP `message_id` of the message the job came in, as the producer set it, so that
    /// it can match the event to what it sent (even when the job's own id was invalid).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The AMQP `correlation_id` of the message the job came in, as the producer set it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub correlation_id: Option<String>,
    /// The configured provider that made the images (the last one the job was sent to).
    /// Absent on invalid jobs and on results stored by earlier releases.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// Every provider the job was sent to, in order: more than one when it fell back.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub providers_tried: Vec<String>,
    /// What each provider the job was sent to cost (`None`: no price), summed in `cost_usd`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost_by_provider: Option<std::collections::BTreeMap<String, Option<f64>>>,
    /// The job asked for a transparent background and an image has no transparent pixel: the
    /// provider ignored the request (its images' `alpha` says which).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub background_ignored: bool,
    /// The job's reference images, as it named them (a key, a URL without its query, or
    /// `job:ID#INDEX`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
    /// The job's mask, as it named it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<String>,
    /// `batch` when the job went through the provider's batch API (its cost at the batch
    /// price); absent for live jobs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lane: Option<String>,
    /// With `lane`: the provider's batch the job was in.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider_batch: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredImage {
    pub index: u32,
    pub bucket: String,
    pub key: String,
    pub uri: String,
    pub content_type: String,
    pub bytes: u64,
    pub sha256: String,
    /// Its size in pixels, where the worker decoded it (jobs with `outputs`, or a transparent
    /// background).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<u32>,
    /// Whether some pixel is transparent (jobs that asked for a transparent background).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alpha: Option<bool>,
    /// The variants the job asked for (`outputs`), stored beside it, in the job's order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub variants: Vec<StoredVariant>,
}

/// A variant of an image (one of the job's `outputs`), in the same bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredVariant {
    /// The output's name.
    pub name: String,
    pub key: String,
    pub uri: String,
    pub content_type: String,
    pub bytes: u64,
    pub sha256: String,
    pub width: u32,
    pub height: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventError {
    pub kind: ErrorKind,
    pub message: String,
    pub provider_status: Option<u16>,
    pub provider_code: Option<String>,
}

impl CloudEvent {
    /// Wraps result data in its envelope. The id depends only on the job and its outcome, so that
    /// consumers can de-duplicate a republished event.
    pub fn new(source: &str, data: ResultData) -> Self {
        let kind = match data.status {
            Status::Succeeded => TYPE_SUCCEEDED,
            Status::Failed => TYPE_FAILED,
        };
        let mut h = Sha256::new();
        h.update(data.batch.as_deref().unwrap_or("_"));
        h.update([0]);
        h.update(&data.job_id);
        h.update([0]);
        h.update(kind);
        let id = hex::encode(&h.finalize()[..16]);
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        CloudEvent {
            specversion: "1.0".into(),
            id,
            source: source.into(),
            kind: kind.into(),
            time,
            subject: data.job_id.clone(),
            datacontenttype: "application/json".into(),
            data,
        }
    }

    pub fn routing_key(&self) -> &'static str {
        match self.data.status {
            Status::Succeeded => ROUTING_SUCCEEDED,
            Status::Failed => ROUTING_FAILED,
        }
    }
}

impl EventError {
    pub fn from_failure(kind: ErrorKind, failure: &Failure) -> Self {
        let detail = failure.detail();
        EventError {
            kind,
            message: failure.message().to_string(),
            provider_status: detail.status,
            provider_code: detail.code.clone(),
        }
    }
}

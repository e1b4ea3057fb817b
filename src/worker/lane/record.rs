//! A lane job's record: its message (body, properties, headers), written once to the store
//! when the job goes to the lane, so that the message can be settled at once and the job still
//! be dead-lettered or sent back to be called live, exactly as it came, hours later.
//!
//! Two objects, written in this order: the open mark (`lane/{provider}/open/{batch}/{job}`,
//! the record itself: the collector reads it from there) and the job's `lane.json`. A message
//! whose `lane.json` exists is acked without anything written again: its open mark was written
//! before, whether or not it was collected since. A mark written again after it was collected
//! (a crash between the two writes) is found in its file's intent by the collector, and
//! dropped.

use lapin::BasicProperties;
use lapin::types::{FieldTable, ShortString};
use serde::{Deserialize, Serialize};

use crate::domain::keys;
use crate::storage::{ObjectStore, PutObject, StorageError};
use crate::worker::pipeline::Delivery;
use crate::worker::pipeline::lane::LaneEntry;

pub(super) use crate::provider::queued::unix_ms;
pub(super) use crate::storage::batches::now_rfc3339;

/// A lane job's message, as it came.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaneRecord {
    /// The lane's provider.
    pub provider: String,
    pub job_id: String,
    #[serde(default)]
    pub batch: Option<String>,
    /// The message body (a job is UTF-8 JSON).
    pub body: String,
    #[serde(default)]
    pub message_id: Option<String>,
    #[serde(default)]
    pub correlation_id: Option<String>,
    #[serde(default)]
    pub content_type: Option<String>,
    /// The message's headers, as the producer (and earlier workers) set them.
    #[serde(default)]
    pub headers: Option<FieldTable>,
    /// Failed provider attempts the message carried (sealed by the worker that counted them).
    #[serde(default)]
    pub attempts: u32,
    /// RFC 3339, the recording worker's clock.
    pub recorded_at: String,
    /// Unix milliseconds of the same instant (a file is closed by its oldest job's age).
    pub recorded_ms: u64,
}

impl LaneRecord {
    /// The record of a message on its way to the lane; `None` when its body is not UTF-8 (a
    /// job's never is: it was parsed before).
    pub fn new(
        entry: &LaneEntry,
        body: &[u8],
        properties: &BasicProperties,
        attempts: u32,
    ) -> Option<Self> {
        let text = |s: &Option<ShortString>| s.as_ref().map(|s| s.as_str().to_string());
        Some(Self {
            provider: entry.provider.clone(),
            job_id: entry.job_id.clone(),
            batch: entry.batch.clone(),
            body: String::from_utf8(body.to_vec()).ok()?,
            message_id: text(properties.message_id()),
            correlation_id: text(properties.correlation_id()),
            content_type: text(properties.content_type()),
            headers: properties.headers().clone(),
            attempts,
            recorded_at: now_rfc3339(),
            recorded_ms: unix_ms(),
        })
    }

    /// The message's properties, to publish it again as it came.
    pub fn properties(&self) -> BasicProperties {
        let mut p = BasicProperties::default();
        if let Some(m) = &self.message_id {
            p = p.with_message_id(m.as_str().into());
        }
        if let Some(c) = &self.correlation_id {
            p = p.with_correlation_id(c.as_str().into());
        }
        if let Some(t) = &self.content_type {
            p = p.with_content_type(t.as_str().into());
        }
        if let Some(h) = &self.headers {
            p = p.with_headers(h.clone());
        }
        p
    }

    /// The job as the pipeline takes it.
    pub fn delivery(&self) -> Delivery<'_> {
        Delivery {
            body: self.body.as_bytes(),
            message_id: self.message_id.as_deref(),
            correlation_id: self.correlation_id.as_deref(),
            attempts: self.attempts,
            probe: false,
            live_only: false,
        }
    }

    /// Its request's `custom_id` in a provider batch.
    pub fn custom_id(&self) -> String {
        imagegen_core::openai::batch::custom_id(self.batch.as_deref(), &self.job_id)
    }

    pub fn dir(&self, prefix: &str) -> String {
        keys::job_dir(prefix, self.batch.as_deref(), &self.job_id)
    }

    pub fn open_key(&self, prefix: &str) -> String {
        keys::lane_open_job(prefix, &self.provider, self.batch.as_deref(), &self.job_id)
    }

    fn bytes(&self) -> bytes::Bytes {
        bytes::Bytes::from(serde_json::to_vec(self).expect("a record serialises"))
    }
}

/// Writes a job's record: its open mark, then its `lane.json`.
pub async fn write(
    store: &dyn ObjectStore,
    prefix: &str,
    record: &LaneRecord,
) -> Result<(), StorageError> {
    let bytes = record.bytes();
    store
        .put(PutObject::json(&record.open_key(prefix), bytes.clone()))
        .await?;
    store
        .put(PutObject::json(
            &keys::lane_record(&record.dir(prefix)),
            bytes,
        ))
        .await
}

/// Marks a job open again (its file was given up before it was sent).
pub async fn reopen(
    store: &dyn ObjectStore,
    prefix: &str,
    record: &LaneRecord,
) -> Result<(), StorageError> {
    store
        .put(PutObject::json(&record.open_key(prefix), record.bytes()))
        .await
}

/// Reads a record (an open mark, or a job's `lane.json`); `None` when there is none.
pub async fn read(store: &dyn ObjectStore, key: &str) -> Result<Option<LaneRecord>, StorageError> {
    super::read_json(store, key).await
}

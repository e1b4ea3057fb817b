//! What is known of a batch, in the object store, so that any machine can follow it:
//!
//! - `{prefix}batches/{batch}.json`: the batch record, written by `enqueue` before publishing:
//!   every job id with its prompt (re-enqueueing merges by id);
//! - `{prefix}images/{batch}/{job}/result.json`: a succeeded job's event (the pipeline's record);
//! - `{prefix}images/{batch}/{job}/failed.json`: a failed job's last event (a later success
//!   wins);
//! - `{prefix}batches/{batch}.cancelled`: present when the batch was cancelled.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::event::CloudEvent;
use crate::storage::{ObjectStore, PutObject, StorageError};

/// Name of a failed job's record, next to where its images would be.
pub const FAILED_RECORD_NAME: &str = "failed.json";

/// Stored results read at once.
const READ_CONCURRENCY: usize = 16;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub batch: String,
    /// Job id -> its prompt and images asked for.
    pub jobs: BTreeMap<String, BatchJob>,
    /// What the jobs were estimated to cost when enqueued (when prices are known).
    #[serde(default)]
    pub estimated_usd: Option<f64>,
    pub updated: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct BatchJob {
    pub prompt: String,
    pub n: u32,
    #[serde(default)]
    pub size: String,
    #[serde(default)]
    pub model: String,
}

pub fn record_key(prefix: &str, batch: &str) -> String {
    format!("{prefix}batches/{batch}.json")
}

pub fn cancel_key(prefix: &str, batch: &str) -> String {
    format!("{prefix}batches/{batch}.cancelled")
}

fn images_dir(prefix: &str, batch: &str) -> String {
    format!("{prefix}images/{batch}/")
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub async fn load(
    store: &dyn ObjectStore,
    prefix: &str,
    batch: &str,
) -> Result<Option<BatchRecord>, StorageError> {
    let Some(bytes) = store.get(&record_key(prefix, batch)).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StorageError {
            op: "read",
            key: record_key(prefix, batch),
            message: format!("the batch record is not valid: {e}"),
        })
}

/// Adds jobs to the batch's record (creating it), keeping jobs already recorded.
pub async fn record_jobs(
    store: &dyn ObjectStore,
    prefix: &str,
    batch: &str,
    jobs: impl IntoIterator<Item = (String, BatchJob)>,
    estimated_usd: Option<f64>,
) -> Result<BatchRecord, StorageError> {
    let mut record = load(store, prefix, batch).await?.unwrap_or(BatchRecord {
        batch: batch.to_string(),
        ..Default::default()
    });
    let before = record.jobs.len();
    record.jobs.extend(jobs);
    if record.jobs.len() != before || record.estimated_usd.is_none() {
        record.estimated_usd = match (record.estimated_usd, estimated_usd) {
            (Some(a), Some(b)) if record.jobs.len() != before => Some(a + b),
            (a, b) => a.or(b),
        };
    }
    record.updated = now_rfc3339();
    let key = record_key(prefix, batch);
    store
        .put(PutObject {
            key: &key,
            data: Bytes::from(serde_json::to_vec(&record).unwrap_or_default()),
            content_type: "application/json",
            metadata: &[],
            sha256: None,
        })
        .await?;
    Ok(record)
}

/// The stored outcome of every job of the batch that has finished: its success record, else its
/// failure record.
pub async fn stored_results(
    store: &Arc<dyn ObjectStore>,
    prefix: &str,
    batch: &str,
) -> Result<Vec<CloudEvent>, StorageError> {
    let dir = images_dir(prefix, batch);
    // Keys are {dir}{job}/{name}: list the job directories' files, and keep one record per job.
    let keys = crate::storage::list_all(&**store, &dir, None).await?;
    let mut per_job: BTreeMap<&str, &str> = BTreeMap::new();
    for key in &keys {
        let Some((job_dir, name)) = key.rsplit_once('/') else {
            continue;
        };
        match name {
            crate::pipeline::RECORD_NAME => {
                per_job.insert(job_dir, key);
            }
            FAILED_RECORD_NAME => {
                per_job.entry(job_dir).or_insert(key);
            }
            _ => {}
        }
    }
    let records: Vec<Result<Option<CloudEvent>, StorageError>> =
        futures_util::stream::iter(per_job.into_values())
            .map(|key| {
                let store = store.clone();
                async move {
                    Ok(store
                        .get(key)
                        .await?
                        .and_then(|b| serde_json::from_slice::<CloudEvent>(&b).ok()))
                }
            })
            .buffer_unordered(READ_CONCURRENCY)
            .collect()
            .await;
    let mut out = Vec::with_capacity(records.len());
    for record in records {
        if let Some(event) = record? {
            out.push(event);
        }
    }
    Ok(out)
}

/// Marks the batch cancelled: workers end its jobs that have not started as `cancelled`.
pub async fn cancel(
    store: &dyn ObjectStore,
    prefix: &str,
    batch: &str,
) -> Result<(), StorageError> {
    let key = cancel_key(prefix, batch);
    store
        .put(PutObject {
            key: &key,
            data: Bytes::from(now_rfc3339()),
            content_type: "text/plain",
            metadata: &[],
            sha256: None,
        })
        .await
}

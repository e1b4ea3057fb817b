//! What is known of a batch, in the object store, so that any machine can follow it (the keys
//! are laid out in [`crate::domain::keys`]):
//!
//! - the batch record, written by `enqueue` before publishing: every job id with its prompt
//!   (re-enqueueing merges by id);
//! - each job's `result.json` (a succeeded job's event) or `failed.json` (a failed job's last
//!   event; a later success wins);
//! - the cancellation mark, present once the batch was cancelled.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};

use crate::domain::event::CloudEvent;
use crate::domain::keys;
use crate::storage::{ObjectStore, PutObject, StorageError, StorageErrorKind};

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

/// Now, as RFC 3339 (the times written in the store's records).
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub async fn load(
    store: &dyn ObjectStore,
    prefix: &str,
    batch: &str,
) -> Result<Option<BatchRecord>, StorageError> {
    let Some(bytes) = store.get(&keys::batch_record(prefix, batch)).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StorageError {
            op: "read",
            key: keys::batch_record(prefix, batch),
            kind: StorageErrorKind::Invalid,
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
    let key = keys::batch_record(prefix, batch);
    store
        .put(PutObject::json(
            &key,
            Bytes::from(serde_json::to_vec(&record).unwrap_or_default()),
        ))
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
    let dir = keys::batch_images(prefix, batch);
    // Keys are {dir}{job}/{name}: list the job directories' files, and keep one record per job.
    let keys = crate::storage::list_all(&**store, &dir, None).await?;
    let mut per_job: BTreeMap<&str, &str> = BTreeMap::new();
    for key in &keys {
        let Some((job_dir, name)) = key.rsplit_once('/') else {
            continue;
        };
        match name {
            keys::RECORD_NAME => {
                per_job.insert(job_dir, key);
            }
            keys::FAILED_RECORD_NAME => {
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
    let key = keys::cancelled(prefix, batch);
    store
        .put(PutObject::new(
            &key,
            Bytes::from(now_rfc3339()),
            "text/plain",
        ))
        .await
}

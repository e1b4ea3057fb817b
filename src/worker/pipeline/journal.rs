//! A job's journal: small objects under `{job dir}/journal/`, the durable notes of its progress
//! at its provider. The worker keeps there the handle of a request a provider queued
//! ([`PendingEntry`]), written before it waits, so that whoever handles the job next polls that
//! request instead of submitting (and paying for) another one. Providers keep their own notes
//! there too (a client-chosen id, before they submit).

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};

use super::events::Spent;
use crate::domain::error::Failure;
use crate::domain::keys;
use crate::provider::{Handle, Journal};
use crate::storage::{ObjectStore, PutObject};

/// When the job began to wait for an earlier job its references name.
const WAITING_NAME: &str = "reference-wait.json";

/// A request queued at a provider, waiting for its images.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PendingEntry {
    /// The configured provider that holds it.
    pub provider: String,
    pub handle: Handle,
    /// How many images it asks for.
    pub count: u8,
    /// The provider's id of the request, for logs and events.
    #[serde(default)]
    pub request_id: Option<String>,
    /// The indices of the job's images it is to fill. Once they are all stored the entry is
    /// spent: it stays in the journal (removing it would cost every queued job one more store
    /// request) and is ignored from then on. Empty in entries of earlier versions.
    #[serde(default)]
    pub indices: Vec<u32>,
}

impl PendingEntry {
    /// Whether the images it was to make are all stored already.
    pub fn answered(&self, stored: &[u32]) -> bool {
        !self.indices.is_empty() && self.indices.iter().all(|i| stored.contains(i))
    }
}

/// The journal of one job, in the object store.
pub struct StoreJournal<'a> {
    pub store: &'a dyn ObjectStore,
    pub dir: &'a str,
}

impl StoreJournal<'_> {
    /// The request the job waits for, when one was recorded.
    pub async fn pending(&self) -> Result<Option<PendingEntry>, Failure> {
        let Some(bytes) = self.get(keys::PENDING_JOURNAL_NAME).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Records the request the job now waits for.
    pub async fn set_pending(&self, entry: &PendingEntry) -> Result<(), Failure> {
        let body = serde_json::to_vec(entry).map_err(|e| Failure::transient(e.to_string()))?;
        self.put(keys::PENDING_JOURNAL_NAME, Bytes::from(body))
            .await
    }

    /// What the job's earlier deliveries bought, when one recorded it.
    pub async fn spent(&self) -> Result<Option<Spent>, Failure> {
        let Some(bytes) = self.get(keys::SPENT_JOURNAL_NAME).await? else {
            return Ok(None);
        };
        Ok(serde_json::from_slice(&bytes).ok())
    }

    /// Records what the job bought so far, for its next delivery.
    pub async fn set_spent(&self, spent: &Spent) -> Result<(), Failure> {
        let body = serde_json::to_vec(spent).map_err(|e| Failure::transient(e.to_string()))?;
        self.put(keys::SPENT_JOURNAL_NAME, Bytes::from(body)).await
    }

    /// When the job began to wait for an earlier job its references name (Unix ms).
    pub async fn waiting_since(&self) -> Result<Option<u64>, Failure> {
        Ok(self
            .get(WAITING_NAME)
            .await?
            .and_then(|b| std::str::from_utf8(&b).ok()?.trim().parse().ok()))
    }

    pub async fn set_waiting_since(&self, unix_ms: u64) -> Result<(), Failure> {
        self.put(WAITING_NAME, Bytes::from(unix_ms.to_string()))
            .await
    }

    /// The recorded request is lost at its provider: nothing to poll any more.
    pub async fn clear_pending(&self) -> Result<(), Failure> {
        let key = keys::journal(self.dir, keys::PENDING_JOURNAL_NAME);
        self.store.delete(&key).await.map_err(Failure::from)
    }
}

impl StoreJournal<'_> {
    async fn get(&self, name: &str) -> Result<Option<Bytes>, Failure> {
        let key = keys::journal(self.dir, name);
        self.store.get(&key).await.map_err(Failure::from)
    }

    async fn put(&self, name: &str, value: Bytes) -> Result<(), Failure> {
        let key = keys::journal(self.dir, name);
        self.store
            .put(PutObject::json(&key, value))
            .await
            .map_err(Failure::from)
    }
}

/// The journal one submit gets: a provider that names its request itself records it here
/// before it submits. The entry is the one the worker would write for a `Pending` answer (same
/// provider, count and image indices), written with what the job bought so far, this submit
/// counted, so that a delivery that finds it counts the call once.
pub struct Recorder<'a> {
    pub journal: &'a StoreJournal<'a>,
    /// The entry to write, its handle still to fill.
    pub template: PendingEntry,
    /// What the job bought so far, this submit counted; `None`: nothing to carry on.
    pub spent: Option<Spent>,
    /// The entry written, when the provider recorded one.
    pub recorded: std::sync::Mutex<Option<PendingEntry>>,
}

impl Recorder<'_> {
    /// The entry the provider recorded, if it did.
    pub fn recorded(&self) -> Option<PendingEntry> {
        self.recorded
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

impl Journal for Recorder<'_> {
    fn record<'a>(
        &'a self,
        handle: &'a Handle,
        request_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let entry = PendingEntry {
                handle: handle.clone(),
                request_id: request_id.map(str::to_string),
                ..self.template.clone()
            };
            if let Some(spent) = &self.spent
                && let Err(e) = self.journal.set_spent(spent).await
            {
                tracing::warn!(error = %e,
                    "could not record what the job bought so far: its event will count less");
            }
            self.journal.set_pending(&entry).await?;
            *self
                .recorded
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(entry);
            Ok(())
        })
    }
}

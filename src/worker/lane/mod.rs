//! The batch lane: jobs that can wait up to a day, bought through one provider's batch API
//! (OpenAI's Batch API: half the live price, within 24 hours, from its own rate-limit pool),
//! with a live job's guarantees (docs/reliability.md).
//!
//! - A lane job's message is settled once its record is in the store ([`record`]): from then
//!   on the store holds the job, not the broker, so no message is held for hours.
//! - One worker of the fleet at a time, the collector, acts on the records: the role goes with
//!   the ticks of a queue that has a single active consumer ([`ticks`]); each tick is a bounded
//!   step: gather open records into input files, one imagegen batch per file ([`collect`]),
//!   then take each open file one step further: upload, create its provider batch, look at it,
//!   split its output ([`files`], [`split`]).
//! - Every step writes what it is about to do, or what it did, as an object of its own, once
//!   (the store has no compare-and-swap): `lane/{provider}/files/{file}/{step}`. A collector
//!   that dies at any point leaves the next one enough to carry on without buying anything
//!   twice; two collectors that overlap for a moment are told apart by the provider batch's
//!   `metadata` (the younger of two batches of one file is cancelled before it runs) and by
//!   the age of their files (the younger of two files holding the same job is given up).
//! - Every job gets one outcome event, as a live job does ([`deliver`]): at least once,
//!   always the same event (a line split again finds the job's stored record).

mod collect;
mod deliver;
mod files;
pub use files::{FileStatus, OpenFile, open_files};
pub mod record;
mod refs;
mod send;
mod split;
pub mod ticks;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::amqp::headers::HeaderSeal;
use crate::config::{KindSettings, Settings};
use crate::domain::keys;
use crate::provider::openai::batch::BatchClient;
use crate::storage::{ObjectStore, StorageError};
use crate::worker::pipeline::Pipeline;

/// What an input file holds: written once, before the file is sent anywhere.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Intent {
    /// Its name in the store (`{unix ms}-{random}`: files sort by age).
    pub file: String,
    pub provider: String,
    /// The imagegen batch of every job in it.
    #[serde(default)]
    pub batch: Option<String>,
    pub created_ms: u64,
    /// Hex SHA-256 of the input file (named in the provider batch's metadata).
    pub sha256: String,
    pub bytes: u64,
    /// The batch API endpoint of its lines.
    pub endpoint: String,
    /// The `custom_id` of each job in it, in line order.
    pub jobs: Vec<String>,
    /// What its jobs cost at the lane's price, by the provider's estimate (`None`: unpriced).
    #[serde(default)]
    pub estimated_usd: Option<f64>,
}

/// The provider batch of a file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchRef {
    pub id: String,
    /// Unix seconds, as the provider says.
    pub created_at: i64,
}

/// The names of an input file's step objects.
mod step {
    pub const INPUT: &str = "input.jsonl";
    pub const INTENT: &str = "intent.json";
    pub const UPLOADED: &str = "uploaded.json";
    pub const CREATING: &str = "creating.json";
    pub const BATCH: &str = "batch.json";
    pub const STATUS: &str = "status.json";
    pub const DONE: &str = "done.json";
    pub const CHECKPOINTS: &str = "checkpoint/";
}

/// The lane of one worker: what a collector step needs.
pub struct Lane {
    settings: Arc<Settings>,
    pipeline: Arc<Pipeline>,
    client: BatchClient,
    seal: Arc<HeaderSeal>,
    provider: String,
    prefix: String,
    /// Intents read so far (they never change), by file.
    intents: Mutex<HashMap<String, Arc<Intent>>>,
    /// When each file's provider batch was last looked at.
    polled: Mutex<HashMap<String, std::time::Instant>>,
    /// Reference images uploaded for edits in batches: file id by SHA-256.
    reference_files: Mutex<HashMap<String, String>>,
    /// The lines of the jobs waiting for a file, by their open marks.
    lines: Mutex<HashMap<String, Arc<collect::Line>>>,
}

impl Lane {
    /// The lane of `settings`, when it has one.
    pub fn new(
        settings: Arc<Settings>,
        pipeline: Arc<Pipeline>,
        seal: Arc<HeaderSeal>,
    ) -> anyhow::Result<Option<Arc<Self>>> {
        if !settings.lane.enabled() {
            return Ok(None);
        }
        let provider = settings.lane.provider.clone();
        let Some(KindSettings::Openai(openai)) = settings.provider(&provider).map(|p| &p.kind)
        else {
            anyhow::bail!("lane.provider {provider:?} is not a provider of kind openai");
        };
        let client = BatchClient::new(openai)?;
        Ok(Some(Arc::new(Self {
            prefix: settings.storage.prefix.clone(),
            provider,
            client,
            seal,
            pipeline,
            settings,
            intents: Mutex::default(),
            polled: Mutex::default(),
            reference_files: Mutex::default(),
            lines: Mutex::default(),
        })))
    }

    fn store(&self) -> &dyn ObjectStore {
        &**self.pipeline.store()
    }

    fn file_key(&self, file: &str, step: &str) -> String {
        keys::lane_file(&self.prefix, &self.provider, file, step)
    }

    /// The mark of a file not done yet.
    fn active_key(&self, file: &str) -> String {
        format!("{}active/{file}", keys::lane(&self.prefix, &self.provider))
    }

    fn active_prefix(&self) -> String {
        format!("{}active/", keys::lane(&self.prefix, &self.provider))
    }

    /// A file's intent (read once, then kept).
    async fn intent(&self, file: &str) -> Result<Option<Arc<Intent>>, StorageError> {
        if let Some(i) = lock(&self.intents).get(file) {
            return Ok(Some(i.clone()));
        }
        let Some(intent) = self
            .read_json::<Intent>(&self.file_key(file, step::INTENT))
            .await?
        else {
            return Ok(None);
        };
        let intent = Arc::new(intent);
        lock(&self.intents).insert(file.to_string(), intent.clone());
        Ok(Some(intent))
    }

    async fn read_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, StorageError> {
        read_json(self.store(), key).await
    }

    async fn write_json<T: Serialize>(&self, key: &str, value: &T) -> Result<(), StorageError> {
        let bytes = bytes::Bytes::from(serde_json::to_vec(value).expect("serialises"));
        self.store()
            .put(crate::storage::PutObject::json(key, bytes))
            .await
    }

    /// Every key below `prefix`.
    async fn list(&self, prefix: &str) -> Result<Vec<String>, StorageError> {
        crate::storage::list_all(self.store(), prefix, None).await
    }
}

/// A lane object (a record, a step of a file); `None` when there is none.
async fn read_json<T: serde::de::DeserializeOwned>(
    store: &dyn ObjectStore,
    key: &str,
) -> Result<Option<T>, StorageError> {
    let Some(bytes) = store.get(key).await? else {
        return Ok(None);
    };
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| StorageError {
            op: "read",
            key: key.to_string(),
            kind: crate::storage::StorageErrorKind::Invalid,
            message: format!("not a lane object: {e}"),
        })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

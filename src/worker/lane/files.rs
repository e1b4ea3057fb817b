//! One input file, one step further each time the collector acts: send it ([`super::send`]:
//! upload it, create its provider batch), look at the batch, and once it ended, split its
//! output and error files ([`super::split`]) and send back (or fail) what it did not run.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use tracing::{info, warn};

use super::record::{self, unix_ms};
use super::{BatchRef, Intent, Lane, lock, step};
use crate::amqp::publisher::Publisher;
use crate::domain::error::Failure;
use crate::domain::keys;
use crate::provider::openai::batch::BatchObject;
use crate::storage::StorageError;
use crate::worker::pipeline::lane::InBatch;
use imagegen_core::openai::batch::BatchState;

/// A file whose active mark has no intent after this long was given up while it was made.
const ORPHAN_AFTER_MS: u64 = 10 * 60 * 1000;

/// What `status` shows of a file's provider batch.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileStatus {
    pub provider_batch: String,
    pub status: String,
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
    pub at: String,
}

fn storage(e: StorageError) -> String {
    e.to_string()
}

impl Lane {
    /// Takes `file` one step further.
    pub(super) async fn advance(&self, publisher: &Publisher, file: &str) -> Result<(), String> {
        let names: HashSet<String> = self
            .list(&self.file_key(file, ""))
            .await
            .map_err(storage)?
            .into_iter()
            .filter_map(|k| {
                k.rsplit_once(&format!("{file}/"))
                    .map(|(_, n)| n.to_string())
            })
            .collect();
        let Some(intent) = self.intent(file).await.map_err(storage)? else {
            let made = file.split('-').next().and_then(|ms| ms.parse::<u64>().ok());
            if made.is_some_and(|ms| unix_ms().saturating_sub(ms) > ORPHAN_AFTER_MS) {
                warn!(
                    file,
                    "an input file was given up while it was made: its jobs stay open"
                );
                self.store()
                    .delete(&self.active_key(file))
                    .await
                    .map_err(storage)?;
            }
            return Ok(());
        };
        if names.contains(step::DONE) {
            return self.retire(file).await;
        }
        if !names.contains(step::BATCH) {
            return self.start(publisher, &intent, &names).await;
        }
        let Some(batch) = self
            .read_json::<BatchRef>(&self.file_key(file, step::BATCH))
            .await
            .map_err(storage)?
        else {
            return Ok(());
        };
        let poll = Duration::from_secs(self.settings.lane.poll_secs);
        if lock(&self.polled)
            .get(file)
            .is_some_and(|at| at.elapsed() < poll)
        {
            return Ok(());
        }
        let object = self
            .client
            .get(&batch.id)
            .await
            .map_err(|f| f.to_string())?;
        lock(&self.polled).insert(file.to_string(), Instant::now());
        let counts = object.request_counts.unwrap_or_default();
        let status = FileStatus {
            provider_batch: object.id.clone(),
            status: object.status.clone(),
            total: counts.total,
            completed: counts.completed,
            failed: counts.failed,
            at: record::now_rfc3339(),
        };
        self.write_json(&self.file_key(file, step::STATUS), &status)
            .await
            .map_err(storage)?;
        let state = object.state();
        if state == BatchState::Running {
            if self.batch_cancelled(&intent).await && object.status != "cancelling" {
                info!(file, provider_batch = %object.id, "the batch was cancelled: cancelling its provider batch");
                self.client
                    .cancel(&object.id)
                    .await
                    .map_err(|f| f.to_string())?;
            }
            return Ok(());
        }
        self.finish(publisher, &intent, &object).await
    }

    /// A job's record, by its `custom_id`.
    pub(super) async fn record_of(
        &self,
        custom_id: &str,
    ) -> Result<Option<record::LaneRecord>, String> {
        let Some((batch, job)) = imagegen_core::openai::batch::parse_custom_id(custom_id) else {
            return Ok(None);
        };
        let dir = keys::job_dir(&self.prefix, batch, job);
        record::read(self.store(), &keys::lane_record(&dir))
            .await
            .map_err(storage)
    }

    pub(super) async fn batch_cancelled(&self, intent: &Intent) -> bool {
        let Some(batch) = &intent.batch else {
            return false;
        };
        matches!(
            self.store()
                .head(&keys::cancelled(&self.prefix, batch))
                .await,
            Ok(Some(_))
        )
    }

    /// The spend caps count the file at the lane's price when it is sent.
    /// The provider batch ended: its lines become outcomes, and the file is done.
    async fn finish(
        &self,
        publisher: &Publisher,
        intent: &Intent,
        object: &BatchObject,
    ) -> Result<(), String> {
        let in_batch = InBatch {
            provider_batch: object.id.clone(),
            price_factor: self.settings.lane.price_factor,
        };
        info!(file = %intent.file, provider_batch = %object.id, status = %object.status, "provider batch ended: splitting its files");
        if object.state() == BatchState::Failed {
            let why = object
                .first_error()
                .unwrap_or_else(|| "no reason given".into());
            warn!(file = %intent.file, provider_batch = %object.id, why, "the provider batch failed");
            self.end_unrun(publisher, intent, Some(&in_batch), &why, &HashSet::new())
                .await?;
            self.delete_provider_files(object).await;
            return Ok(());
        }
        let mut seen = HashSet::new();
        if let Some(output) = &object.output_file_id {
            seen.extend(
                self.split(publisher, &intent.file, "output", output, &in_batch)
                    .await?,
            );
        }
        if let Some(errors) = &object.error_file_id {
            seen.extend(
                self.split(publisher, &intent.file, "error", errors, &in_batch)
                    .await?,
            );
        }
        crate::worker::metrics::lane_batches("ended");
        // Jobs in no line (a batch cancelled or expired before it ran them may list none; a
        // split resumed from a checkpoint did not read the lines before it).
        let why = format!(
            "the provider batch ended {} without running it",
            object.status
        );
        self.end_unrun(publisher, intent, Some(&in_batch), &why, &seen)
            .await?;
        self.delete_provider_files(object).await;
        Ok(())
    }

    /// Once every job of a provider batch has its outcome, its input, output and error files
    /// are deleted at the provider (best effort: a file left there costs its storage only).
    async fn delete_provider_files(&self, object: &BatchObject) {
        let files = [
            Some(&object.input_file_id).filter(|id| !id.is_empty()),
            object.output_file_id.as_ref(),
            object.error_file_id.as_ref(),
        ];
        for id in files.into_iter().flatten() {
            if let Err(e) = self.client.delete_file(id).await {
                warn!(file_id = %id, error = %e, "a provider file could not be deleted");
            }
        }
    }

    /// Every job of a file that never ran (but those of `seen`, and those that ended or were
    /// sent back live already): back live or failed.
    pub(super) async fn end_unrun(
        &self,
        publisher: &Publisher,
        intent: &Intent,
        in_batch: Option<&InBatch>,
        why: &str,
        seen: &HashSet<String>,
    ) -> Result<(), String> {
        for job in intent.jobs.iter().filter(|j| !seen.contains(*j)) {
            let Some(r) = self.record_of(job).await? else {
                continue;
            };
            let dir = r.dir(&self.prefix);
            let ended = [
                keys::record(&dir),
                keys::failed_record(&dir),
                keys::journal(&dir, super::deliver::SENT_LIVE),
            ];
            let mut has_outcome = false;
            for key in &ended {
                has_outcome |= matches!(self.store().head(key).await, Ok(Some(_)));
            }
            if has_outcome {
                continue;
            }
            let failure = Failure::Retryable {
                message: format!("the provider batch did not run the job: {why}"),
                after: None,
                possibly_billed: false,
                detail: Box::default(),
            };
            self.unfinished(publisher, &r, r.attempts, failure, in_batch)
                .await?;
        }
        self.done(&intent.file).await
    }

    pub(super) async fn done(&self, file: &str) -> Result<(), String> {
        self.write_json(
            &self.file_key(file, step::DONE),
            &serde_json::json!({"at": record::now_rfc3339()}),
        )
        .await
        .map_err(storage)?;
        self.retire(file).await
    }

    /// A done file leaves the active files; its input is deleted (its steps stay, small).
    async fn retire(&self, file: &str) -> Result<(), String> {
        let _ = self.store().delete(&self.file_key(file, step::INPUT)).await;
        self.store()
            .delete(&self.active_key(file))
            .await
            .map_err(storage)?;
        lock(&self.intents).remove(file);
        lock(&self.polled).remove(file);
        Ok(())
    }
}

/// What `imagegen status` shows of one input file that is not done.
#[derive(Debug, Clone, Serialize)]
pub struct OpenFile {
    pub file: String,
    pub batch: Option<String>,
    pub jobs: usize,
    /// Its provider batch's latest status, once it has one.
    pub provider_batch: Option<FileStatus>,
}

/// The lane's files that are not done, oldest first, with their provider batches' counts as
/// last seen by the collector.
pub async fn open_files(
    store: &dyn crate::storage::ObjectStore,
    prefix: &str,
    provider: &str,
) -> Result<Vec<OpenFile>, StorageError> {
    let active = format!("{}active/", keys::lane(prefix, provider));
    let mut files = Vec::new();
    for key in crate::storage::list_all(store, &active, None).await? {
        let Some(file) = key.strip_prefix(&active) else {
            continue;
        };
        let read = |step: &str| keys::lane_file(prefix, provider, file, step);
        let Some(intent) = store.get(&read(step::INTENT)).await? else {
            continue;
        };
        let Ok(intent) = serde_json::from_slice::<Intent>(&intent) else {
            continue;
        };
        let status = store
            .get(&read(step::STATUS))
            .await?
            .and_then(|b| serde_json::from_slice::<FileStatus>(&b).ok());
        files.push(OpenFile {
            file: file.to_string(),
            batch: intent.batch,
            jobs: intent.jobs.len(),
            provider_batch: status,
        });
    }
    Ok(files)
}

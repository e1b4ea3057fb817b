//! One input file, one step further each time the collector acts: upload it, create its
//! provider batch, look at the batch, and once it ended, split its output and error files
//! ([`super::split`]) and send back (or fail) what it did not run.
//!
//! Creating a provider batch is the one step that buys something, and the provider names the
//! batch, not us. So the collector writes `creating.json` first, names the file in the batch's
//! `metadata`, and then lists the account's batches back to that moment: of two batches of one
//! file (two collectors overlapping, or one that died before it wrote `batch.json`), the
//! younger is cancelled and the older kept, whoever looks.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
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
/// How far before `creating.json` the provider's list is read (clocks differ).
const CLOCK_SLACK_SECS: i64 = 300;

#[derive(Serialize, Deserialize)]
struct Uploaded {
    file_id: String,
}

#[derive(Serialize, Deserialize)]
struct Creating {
    at_ms: u64,
}

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

    /// Uploads the file and creates its provider batch (or finds the one created already).
    async fn start(
        &self,
        publisher: &Publisher,
        intent: &Intent,
        names: &HashSet<String>,
    ) -> Result<(), String> {
        let file = intent.file.as_str();
        if self.batch_cancelled(intent).await {
            info!(file, "the batch was cancelled before its file was sent");
            return self
                .end_unrun(publisher, intent, None, "cancelled", &HashSet::new())
                .await;
        }
        // Another collector's file of the same jobs, made at the same moment, wins if older.
        if !names.contains(step::CREATING) && self.give_up_if_shared(intent).await? {
            return Ok(());
        }
        let uploaded = match self
            .read_json::<Uploaded>(&self.file_key(file, step::UPLOADED))
            .await
            .map_err(storage)?
        {
            Some(u) => u,
            None => {
                let input = self
                    .store()
                    .get(&self.file_key(file, step::INPUT))
                    .await
                    .map_err(storage)?
                    .ok_or("the input file is gone from the store")?;
                let object = self
                    .client
                    .upload(&format!("{file}.jsonl"), input)
                    .await
                    .map_err(|f| format!("uploading the input file failed: {f}"))?;
                let u = Uploaded { file_id: object.id };
                self.write_json(&self.file_key(file, step::UPLOADED), &u)
                    .await
                    .map_err(storage)?;
                info!(file, file_id = %u.file_id, "input file uploaded");
                u
            }
        };
        let creating = match self
            .read_json::<Creating>(&self.file_key(file, step::CREATING))
            .await
            .map_err(storage)?
        {
            Some(c) => c,
            None => {
                self.reserve_budget(intent).await?;
                let c = Creating { at_ms: unix_ms() };
                self.write_json(&self.file_key(file, step::CREATING), &c)
                    .await
                    .map_err(storage)?;
                c
            }
        };
        let since = (creating.at_ms / 1000) as i64 - CLOCK_SLACK_SECS;
        let mut found = self.batches_of(file, since).await?;
        if found.is_empty() {
            let mut metadata = Map::new();
            metadata.insert("imagegen_file".into(), Value::from(file));
            metadata.insert(
                "imagegen_sha256".into(),
                Value::from(intent.sha256.as_str()),
            );
            if let Some(b) = &intent.batch {
                metadata.insert("imagegen_batch".into(), Value::from(b.as_str()));
            }
            let created = self
                .client
                .create(&uploaded.file_id, &intent.endpoint, metadata)
                .await
                .map_err(|f| format!("creating the provider batch failed: {f}"))?;
            crate::worker::metrics::lane_batches("created");
            info!(file, provider_batch = %created.id, jobs = intent.jobs.len(), "provider batch created");
            // Read back: another collector may have created one too.
            found = self.batches_of(file, since).await?;
            if !found.iter().any(|b| b.id == created.id) {
                found.push(created);
            }
        }
        found.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        let keep = found[0].clone();
        for duplicate in &found[1..] {
            if duplicate.state() == BatchState::Running {
                warn!(file, kept = %keep.id, cancelled = %duplicate.id,
                    "a second provider batch of the same file: cancelling the younger");
                self.client
                    .cancel(&duplicate.id)
                    .await
                    .map_err(|f| f.to_string())?;
                crate::worker::metrics::lane_batches("duplicate_cancelled");
            }
        }
        self.write_json(
            &self.file_key(file, step::BATCH),
            &BatchRef {
                id: keep.id,
                created_at: keep.created_at,
            },
        )
        .await
        .map_err(storage)
    }

    /// The account's batches of `file` created since `since` (unix seconds), newest first.
    async fn batches_of(&self, file: &str, since: i64) -> Result<Vec<BatchObject>, String> {
        let mut found = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let page = self
                .client
                .list(after.as_deref(), 100)
                .await
                .map_err(|f| format!("listing the provider's batches failed: {f}"))?;
            let older = page.data.iter().any(|b| b.created_at < since);
            after = page.data.last().map(|b| b.id.clone());
            found.extend(
                page.data
                    .into_iter()
                    .filter(|b| b.meta("imagegen_file") == Some(file)),
            );
            if older || !page.has_more || after.is_none() {
                return Ok(found);
            }
        }
    }

    /// When an older active file holds one of this file's jobs, gives this one up: its jobs the
    /// older file does not hold are marked open again.
    async fn give_up_if_shared(&self, intent: &Intent) -> Result<bool, String> {
        let mut theirs: HashSet<String> = HashSet::new();
        for other in self.active_files().await.map_err(storage)? {
            if other >= intent.file {
                break;
            }
            if let Some(o) = self.intent(&other).await.map_err(storage)? {
                theirs.extend(o.jobs.iter().cloned());
            }
        }
        if !intent.jobs.iter().any(|j| theirs.contains(j)) {
            return Ok(false);
        }
        warn!(file = %intent.file, "an older file holds some of this file's jobs: this one is given up");
        for job in intent.jobs.iter().filter(|j| !theirs.contains(*j)) {
            if let Some(r) = self.record_of(job).await? {
                record::reopen(self.store(), &self.prefix, &r)
                    .await
                    .map_err(storage)?;
            }
        }
        self.store()
            .delete(&self.active_key(&intent.file))
            .await
            .map_err(storage)?;
        Ok(true)
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

    async fn batch_cancelled(&self, intent: &Intent) -> bool {
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
    async fn reserve_budget(&self, intent: &Intent) -> Result<(), String> {
        let Some(budget) = self.pipeline.budget() else {
            return Ok(());
        };
        if let Err(failure) = budget.check(intent.batch.as_deref()).await {
            return Err(format!("the file is not sent: {failure}"));
        }
        budget
            .record(
                intent.batch.as_deref(),
                &format!("lane-{}", intent.file),
                intent.estimated_usd.unwrap_or(0.0),
            )
            .await;
        Ok(())
    }

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
            return self
                .end_unrun(publisher, intent, Some(&in_batch), &why, &HashSet::new())
                .await;
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
            .await
    }

    /// Every job of a file that never ran (but those of `seen`, and those that ended or were
    /// sent back live already): back live or failed.
    async fn end_unrun(
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

    async fn done(&self, file: &str) -> Result<(), String> {
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

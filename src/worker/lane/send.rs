//! Sending an input file: upload it, then create its provider batch, the one step that buys
//! something (and whose id the provider chooses). So the collector writes `creating.json`
//! first, names the file in the batch's `metadata`, and then lists the account's batches back
//! to that moment: of two batches of one file (two collectors overlapping, or one that died
//! before it wrote `batch.json`), the younger is cancelled and the older kept, whoever looks.
//! Before that, a file whose jobs an older file also holds is given up, and the spend caps
//! count the file at the lane's price.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use tracing::{info, warn};

use super::record::{self, unix_ms};
use super::{BatchRef, Intent, Lane, step};
use crate::amqp::publisher::Publisher;
use crate::domain::error::Failure;
use crate::provider::openai::batch::BatchObject;
use crate::storage::StorageError;
use imagegen_core::openai::batch::BatchState;

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

fn storage(e: StorageError) -> String {
    e.to_string()
}

impl Lane {
    /// Uploads the file and creates its provider batch (or finds the one created already).
    pub(super) async fn start(
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
                match self.reserve_budget(intent).await {
                    Ok(()) => {}
                    Err(Some(failure)) => return self.fail_all(publisher, intent, &failure).await,
                    Err(None) => return Ok(()),
                }
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

    /// `Err(Some(failure))`: the batch's cap is reached, its jobs fail with `failure`;
    /// `Err(None)`: this worker's cap is, the file waits for another collector.
    async fn reserve_budget(&self, intent: &Intent) -> Result<(), Option<Failure>> {
        let Some(budget) = self.pipeline.budget() else {
            return Ok(());
        };
        match budget.check(intent.batch.as_deref()).await {
            Ok(()) => {}
            Err(failure @ Failure::Permanent { .. }) => return Err(Some(failure)),
            Err(failure) => {
                warn!(file = %intent.file, error = %failure, "the file is not sent: this worker's spend cap is reached");
                return Err(None);
            }
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

    /// Every job of a file not sent fails with `failure` (the batch's spend cap is reached:
    /// they are dead-lettered, to be replayed once it is raised).
    async fn fail_all(
        &self,
        publisher: &Publisher,
        intent: &Intent,
        failure: &Failure,
    ) -> Result<(), String> {
        warn!(file = %intent.file, error = %failure, "the file is not sent: its jobs fail");
        for job in &intent.jobs {
            let Some(r) = self.record_of(job).await? else {
                continue;
            };
            let outcome = self
                .pipeline
                .fail_lane_job(r.delivery(), failure.clone(), None)
                .await;
            self.deliver(publisher, &r, outcome, None).await?;
        }
        self.done(&intent.file).await
    }
}

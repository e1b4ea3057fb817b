//! Gathering open records into input files: one imagegen batch per file, at most
//! `lane.file_max_requests` lines and `lane.file_max_bytes` bytes; a file that is not full is
//! sent once its oldest job has waited `lane.file_max_age_secs`.
//!
//! A file is made in this order, each a write of its own: the file's active mark (so that no
//! other collector takes its jobs again while it is being made), its input, its intent (what it
//! holds), then the open marks of its jobs are deleted. Before that last step the file is
//! checked against the other active files: when an older one holds one of its jobs (another
//! collector made it at the same moment), this one is given up, its jobs left open.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;

use futures_util::{StreamExt, TryStreamExt};
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::record::{self, LaneRecord, unix_ms};
use super::{Intent, Lane, step};
use crate::amqp::publisher::Publisher;
use crate::domain::keys;
use crate::storage::{PutObject, StorageError};

/// Records read at once.
const READS: usize = 16;

/// A job's line, ready for a file. Kept while its job waits for a file (records never change),
/// so that a job is read and its line made once, not at every step.
pub(super) struct Line {
    record: LaneRecord,
    key: String,
    text: Vec<u8>,
    endpoint: &'static str,
    estimated_usd: Option<f64>,
}

impl Lane {
    /// One pass over the open records.
    pub(super) async fn collect(&self, publisher: &Publisher) -> Result<(), String> {
        let open = keys::lane_open(&self.prefix, &self.provider);
        let marks = self.list(&open).await.map_err(|e| e.to_string())?;
        if marks.is_empty() {
            return Ok(());
        }
        // Lines of jobs that are open no more (made into a file, by this collector or another).
        {
            let listed: HashSet<&String> = marks.iter().collect();
            super::lock(&self.lines).retain(|key, _| listed.contains(key));
        }
        let mut by_batch: BTreeMap<Option<String>, Vec<String>> = BTreeMap::new();
        for key in marks {
            if let Some((batch, _)) = keys::parse_lane_open(&open, &key) {
                by_batch
                    .entry(batch.map(str::to_string))
                    .or_default()
                    .push(key);
            }
        }
        let known = self.jobs_in_files().await.map_err(|e| e.to_string())?;
        for (batch, keys) in by_batch {
            self.collect_batch(publisher, batch, keys, &known).await?;
        }
        Ok(())
    }

    /// The `custom_id`s of the jobs in active files.
    async fn jobs_in_files(&self) -> Result<HashSet<String>, StorageError> {
        let mut known = HashSet::new();
        for file in self.active_files().await? {
            if let Some(intent) = self.intent(&file).await? {
                known.extend(intent.jobs.iter().cloned());
            }
        }
        Ok(known)
    }

    /// The files not done yet, oldest first.
    pub(super) async fn active_files(&self) -> Result<Vec<String>, StorageError> {
        let prefix = self.active_prefix();
        Ok(self
            .list(&prefix)
            .await?
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix).map(str::to_string))
            .collect())
    }

    async fn collect_batch(
        &self,
        publisher: &Publisher,
        batch: Option<String>,
        marks: Vec<String>,
        known: &HashSet<String>,
    ) -> Result<(), String> {
        let mut lines = Vec::with_capacity(marks.len());
        let mut unread = Vec::new();
        for key in marks {
            let made = super::lock(&self.lines).get(&key).cloned();
            match made {
                Some(line) if known.contains(&line.record.custom_id()) => {
                    let _ = self.store().delete(&key).await;
                }
                Some(line) => lines.push(line),
                None => unread.push(key),
            }
        }
        let records: Vec<(String, Option<LaneRecord>)> = futures_util::stream::iter(unread)
            .map(|key| async move {
                let r = record::read(self.store(), &key).await?;
                Ok::<_, StorageError>((key, r))
            })
            .buffered(READS)
            .try_collect()
            .await
            .map_err(|e| e.to_string())?;
        for (key, record) in records {
            let Some(record) = record else { continue };
            if known.contains(&record.custom_id()) {
                // Already in a file (collected, then marked again by a late redelivery).
                let _ = self.store().delete(&key).await;
                continue;
            }
            let delivery = record.delivery();
            if let Some(failure) = self
                .pipeline
                .lane_unwanted(delivery.body, delivery.message_id)
                .await
            {
                let outcome = self.pipeline.fail_lane_job(delivery, failure, None).await;
                self.deliver(publisher, &record, outcome, None).await?;
                let _ = self.store().delete(&key).await;
                continue;
            }
            let Some(files) = self.files_of(publisher, &record, &key).await? else {
                continue;
            };
            match self
                .pipeline
                .lane_line(delivery.body, delivery.message_id, &files)
            {
                Ok(line) => {
                    let mut text = serde_json::to_vec(&serde_json::json!({
                        "custom_id": record.custom_id(),
                        "method": "POST",
                        "url": line.endpoint,
                        "body": line.body,
                    }))
                    .map_err(|e| e.to_string())?;
                    text.push(b'\n');
                    let factor = self.settings.lane.price_factor;
                    let line = Arc::new(Line {
                        record,
                        key: key.clone(),
                        text,
                        endpoint: line.endpoint,
                        estimated_usd: line.estimated_usd.map(|u| u * factor),
                    });
                    super::lock(&self.lines).insert(key, line.clone());
                    lines.push(line);
                }
                Err(why) => {
                    warn!(job_id = %record.job_id, why, "a lane job cannot be sent: it runs live");
                    self.unfinished(
                        publisher,
                        &record,
                        record.attempts,
                        crate::domain::error::Failure::transient(why),
                        None,
                    )
                    .await?;
                    let _ = self.store().delete(&key).await;
                }
            }
        }
        // One endpoint per file (generations, edits), oldest jobs first.
        lines.sort_by_key(|l| (l.endpoint, l.record.recorded_ms));
        let mut by_endpoint: Vec<Vec<Arc<Line>>> = Vec::new();
        for line in lines {
            match by_endpoint.last_mut() {
                Some(group) if group[0].endpoint == line.endpoint => group.push(line),
                _ => by_endpoint.push(vec![line]),
            }
        }
        for group in by_endpoint {
            self.make_files(batch.as_deref(), group).await?;
        }
        Ok(())
    }

    /// Files of `lines` (one endpoint): as many full ones as they fill, and the rest once its
    /// oldest job has waited `lane.file_max_age_secs`.
    async fn make_files(&self, batch: Option<&str>, lines: Vec<Arc<Line>>) -> Result<(), String> {
        let lane = &self.settings.lane;
        let mut chunk: Vec<Arc<Line>> = Vec::new();
        let mut bytes = 0u64;
        let mut lines = lines.into_iter().peekable();
        while let Some(line) = lines.next() {
            bytes += line.text.len() as u64;
            chunk.push(line);
            let next_fits = lines.peek().is_some_and(|n| {
                chunk.len() < lane.file_max_requests as usize
                    && bytes + n.text.len() as u64 <= lane.file_max_bytes
            });
            if next_fits {
                continue;
            }
            let full = lines.peek().is_some();
            let oldest = chunk.first().map_or(0, |l| l.record.recorded_ms);
            let aged = unix_ms().saturating_sub(oldest) >= lane.file_max_age_secs * 1000;
            if full || aged {
                self.make_file(batch, std::mem::take(&mut chunk))
                    .await
                    .map_err(|e| e.to_string())?;
                bytes = 0;
            }
        }
        Ok(())
    }

    /// Writes an input file of `lines` and its intent, then deletes their open marks.
    async fn make_file(
        &self,
        batch: Option<&str>,
        lines: Vec<Arc<Line>>,
    ) -> Result<(), StorageError> {
        let now = unix_ms();
        let file = format!("{now:013}-{:08x}", fastrand::u32(..));
        let mut input = Vec::with_capacity(lines.iter().map(|l| l.text.len()).sum());
        for l in &lines {
            input.extend_from_slice(&l.text);
        }
        let sha256 = hex::encode(Sha256::digest(&input));
        let estimated_usd = lines
            .iter()
            .map(|l| l.estimated_usd)
            .try_fold(0.0, |sum, usd| usd.map(|u| sum + u));
        let intent = Intent {
            file: file.clone(),
            provider: self.provider.clone(),
            batch: batch.map(str::to_string),
            created_ms: now,
            sha256: sha256.clone(),
            bytes: input.len() as u64,
            endpoint: lines
                .first()
                .map_or("/v1/images/generations", |l| l.endpoint)
                .into(),
            jobs: lines.iter().map(|l| l.record.custom_id()).collect(),
            estimated_usd,
        };
        self.store()
            .put(PutObject::new(
                &self.active_key(&file),
                bytes::Bytes::new(),
                "application/octet-stream",
            ))
            .await?;
        let input_key = self.file_key(&file, step::INPUT);
        let mut put = PutObject::new(&input_key, bytes::Bytes::from(input), "application/jsonl");
        put.sha256 = Some(&sha256);
        self.store().put(put).await?;
        self.write_json(&self.file_key(&file, step::INTENT), &intent)
            .await?;
        if let Some(older) = self.older_file_sharing_jobs(&intent).await? {
            warn!(
                file,
                older,
                "another collector made a file of the same jobs at the same moment: this one is given up"
            );
            self.store().delete(&self.active_key(&file)).await?;
            return Ok(());
        }
        super::lock(&self.intents).insert(file.clone(), Arc::new(intent));
        info!(
            file,
            batch = batch.unwrap_or("_"),
            jobs = lines.len(),
            estimated_usd,
            "input file made"
        );
        {
            let mut made = super::lock(&self.lines);
            for line in &lines {
                made.remove(&line.key);
            }
        }
        futures_util::stream::iter(lines)
            .map(|l| async move { self.store().delete(&l.key).await })
            .buffer_unordered(READS)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// An active file older than `intent`'s that holds one of its jobs.
    async fn older_file_sharing_jobs(
        &self,
        intent: &Intent,
    ) -> Result<Option<String>, StorageError> {
        let mine: HashSet<&str> = intent.jobs.iter().map(String::as_str).collect();
        for file in self.active_files().await? {
            if file >= intent.file {
                break;
            }
            if let Some(other) = self.intent(&file).await?
                && other.jobs.iter().any(|j| mine.contains(j.as_str()))
            {
                return Ok(Some(file));
            }
        }
        Ok(None)
    }
}

//! Splitting a provider batch's output (or error) file into its jobs' outcomes.
//!
//! The file reaches gigabytes (each line holds a job's images, in base64), so it is read as a
//! stream, line by line: memory holds the lines being stored (at most
//! `lane.split_concurrency`), whatever the file's size. Each line is split at least once and
//! idempotently, in this order: the job's images and result record (the pipeline's own steps),
//! then its event, then, every `lane.checkpoint_lines` lines, a checkpoint (the count of lines
//! below which every line is done). A split that stops goes on from its last checkpoint; a
//! line split again finds its job's stored record and publishes the same event again.

use std::collections::{BTreeSet, HashSet};

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use imagegen_core::openai::batch::{LineOutcome, OutputLine};
use tracing::{info, warn};

use super::{Lane, step};
use crate::amqp::publisher::Publisher;
use crate::domain::error::Failure;
use crate::storage::PutObject;
use crate::worker::pipeline::lane::{InBatch, LineResult};

/// Longest line read (a job of ten 4K images in base64, and then some).
const MAX_LINE_BYTES: usize = 512 << 20;

impl Lane {
    /// Splits the file `file_id` (`which`: `output` or `error`) of `file`'s provider batch.
    pub(super) async fn split(
        &self,
        publisher: &Publisher,
        file: &str,
        which: &str,
        file_id: &str,
        in_batch: &InBatch,
    ) -> Result<HashSet<String>, String> {
        let prefix = self.file_key(file, &format!("{}{which}-", step::CHECKPOINTS));
        let from: u64 = self
            .list(&prefix)
            .await
            .map_err(|e| e.to_string())?
            .iter()
            .filter_map(|k| k.strip_prefix(&prefix)?.parse().ok())
            .max()
            .unwrap_or(0);
        let mut response = self
            .client
            .content(file_id)
            .await
            .map_err(|f| format!("reading the {which} file failed: {f}"))?;
        let concurrency = self.settings.lane.split_concurrency;
        let every = self.settings.lane.checkpoint_lines;
        let mut partial: Vec<u8> = Vec::new();
        let mut index: u64 = 0;
        let mut running = FuturesUnordered::new();
        let mut done: BTreeSet<u64> = BTreeSet::new();
        let (mut watermark, mut checkpointed) = (from, from);
        let mut failed: Option<String> = None;
        let mut seen = HashSet::new();
        let mut ended = false;
        while !ended && failed.is_none() {
            let chunk = match response.chunk().await {
                Ok(Some(c)) => c,
                Ok(None) => {
                    ended = true;
                    bytes::Bytes::new()
                }
                Err(e) => {
                    failed = Some(format!("reading the {which} file broke off: {e}"));
                    break;
                }
            };
            let mut rest = &chunk[..];
            let mut lines: Vec<bytes::Bytes> = Vec::new();
            while let Some(at) = rest.iter().position(|b| *b == b'\n') {
                partial.extend_from_slice(&rest[..at]);
                lines.push(bytes::Bytes::from(std::mem::take(&mut partial)));
                rest = &rest[at + 1..];
            }
            partial.extend_from_slice(rest);
            if ended && !partial.is_empty() {
                lines.push(bytes::Bytes::from(std::mem::take(&mut partial)));
            }
            if partial.len() > MAX_LINE_BYTES {
                failed = Some(format!(
                    "a line of the {which} file is longer than {MAX_LINE_BYTES} bytes"
                ));
                break;
            }
            for line in lines {
                if failed.is_some() {
                    break;
                }
                let n = index;
                index += 1;
                if n < from || line.iter().all(u8::is_ascii_whitespace) {
                    done.insert(n);
                    continue;
                }
                running.push(async move { (n, self.split_line(publisher, &line, in_batch).await) });
                while running.len() >= concurrency {
                    let Some(ended) = running.next().await else {
                        break;
                    };
                    tally(ended, &mut done, &mut seen, &mut failed);
                }
            }
            while done.remove(&watermark) {
                watermark += 1;
            }
            if watermark - checkpointed >= every && failed.is_none() {
                self.checkpoint(&prefix, watermark).await?;
                checkpointed = watermark;
            }
        }
        while let Some(ended) = running.next().await {
            tally(ended, &mut done, &mut seen, &mut failed);
        }
        while done.remove(&watermark) {
            watermark += 1;
        }
        if let Some(e) = failed {
            if watermark > checkpointed {
                self.checkpoint(&prefix, watermark).await?;
            }
            return Err(e);
        }
        if watermark > checkpointed {
            self.checkpoint(&prefix, watermark).await?;
        }
        info!(
            file,
            which,
            lines = index,
            resumed_at = from,
            "provider batch file split"
        );
        Ok(seen)
    }

    async fn checkpoint(&self, prefix: &str, lines: u64) -> Result<(), String> {
        self.store()
            .put(PutObject::new(
                &format!("{prefix}{lines:010}"),
                bytes::Bytes::new(),
                "application/octet-stream",
            ))
            .await
            .map_err(|e| e.to_string())
    }

    /// One line: its job's outcome, published. `Ok` with the line's `custom_id` once the job
    /// has its outcome.
    async fn split_line(
        &self,
        publisher: &Publisher,
        line: &[u8],
        in_batch: &InBatch,
    ) -> Result<Option<String>, String> {
        let parsed = match OutputLine::parse(line) {
            Ok(p) => p,
            Err(why) => {
                warn!(
                    why,
                    "a line of a provider batch's file could not be read: skipped"
                );
                return Ok(None);
            }
        };
        let Some(record) = self.record_of(&parsed.custom_id).await? else {
            warn!(custom_id = %parsed.custom_id, "a provider batch's line names no lane job: skipped");
            return Ok(None);
        };
        let delivery = record.delivery();
        let result = match parsed.outcome() {
            LineOutcome::Answered {
                status,
                body,
                request_id,
            } => {
                let line = LineResult::Answered {
                    status,
                    body,
                    request_id,
                };
                let outcome = self
                    .pipeline
                    .finish_line(delivery, line, in_batch.clone())
                    .await;
                self.deliver(publisher, &record, outcome, Some(in_batch))
                    .await
            }
            LineOutcome::NotRun { code } => {
                let failure =
                    Failure::transient(format!("the provider batch did not run it ({code})"));
                self.unfinished(publisher, &record, record.attempts, failure, Some(in_batch))
                    .await
            }
            LineOutcome::Error { code, message } => {
                let failure =
                    Failure::transient(format!("the provider batch failed it: {code}: {message}"));
                self.unfinished(publisher, &record, record.attempts, failure, Some(in_batch))
                    .await
            }
        };
        crate::worker::metrics::lane_split();
        result.map(|()| Some(parsed.custom_id.to_string()))
    }
}

/// Counts a line that ended: done (its job's `custom_id` seen), or the split's first failure.
fn tally(
    (n, result): (u64, Result<Option<String>, String>),
    done: &mut BTreeSet<u64>,
    seen: &mut HashSet<String>,
    failed: &mut Option<String>,
) {
    match result {
        Ok(id) => {
            seen.extend(id);
            done.insert(n);
        }
        Err(e) => {
            failed.get_or_insert(e);
        }
    }
}

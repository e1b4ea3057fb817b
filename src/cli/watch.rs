//! `imagegen watch`: following a batch to its end from anywhere, with a manifest of every job.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use serde::Serialize;

use super::output::{EXIT_PARTIAL, progress_bar};
use crate::amqp::connect;
use crate::amqp::results::ResultListener;
use crate::config::Settings;
use crate::domain::event::{CloudEvent, Status};
use crate::storage::batches::{self as batch, BatchRecord};

/// How long the broker keeps a watch queue without a consumer.
const WATCH_QUEUE_EXPIRES: Duration = Duration::from_secs(600);

/// One line of the manifest.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ManifestRow {
    pub job_id: String,
    pub prompt: String,
    /// succeeded, failed, or pending.
    pub status: String,
    pub images: Vec<String>,
    pub error_kind: Option<String>,
    pub error: Option<String>,
    pub cost_usd: Option<f64>,
    /// The URIs of each output's variants (one per image, in the images' order), by name.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub variants: BTreeMap<String, Vec<String>>,
    /// The job's reference images, as it named them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub references: Vec<String>,
}

/// The outcomes known so far of a batch's jobs.
pub struct Progress {
    record: BatchRecord,
    outcomes: BTreeMap<String, CloudEvent>,
}

impl Progress {
    pub fn new(record: BatchRecord) -> Self {
        Self {
            record,
            outcomes: BTreeMap::new(),
        }
    }

    /// Takes an event into account; false when it is not news (another batch, a job not in
    /// the record, a failure after a success).
    pub fn apply(&mut self, event: CloudEvent) -> bool {
        if event.data.batch.as_deref() != Some(self.record.batch.as_str())
            || !self.record.jobs.contains_key(&event.data.job_id)
        {
            return false;
        }
        match self.outcomes.get(&event.data.job_id) {
            Some(known) if known.data.status == Status::Succeeded => false,
            Some(known) if known == &event => false,
            _ => {
                self.outcomes.insert(event.data.job_id.clone(), event);
                true
            }
        }
    }

    pub fn total(&self) -> usize {
        self.record.jobs.len()
    }

    /// Jobs without an outcome yet.
    pub fn pending(&self) -> usize {
        self.total().saturating_sub(self.outcomes.len())
    }

    pub fn succeeded(&self) -> usize {
        self.count(Status::Succeeded)
    }

    pub fn failed(&self) -> usize {
        self.count(Status::Failed)
    }

    fn count(&self, status: Status) -> usize {
        self.outcomes
            .values()
            .filter(|e| e.data.status == status)
            .count()
    }

    /// Failed jobs may still be retried (a replay), but the batch has an outcome for each job.
    pub fn complete(&self) -> bool {
        self.outcomes.len() >= self.total()
    }

    pub fn cost_usd(&self) -> f64 {
        self.outcomes.values().filter_map(|e| e.data.cost_usd).sum()
    }

    pub fn manifest(&self) -> Vec<ManifestRow> {
        self.record
            .jobs
            .iter()
            .map(|(id, job)| {
                let outcome = self.outcomes.get(id);
                let data = outcome.map(|e| &e.data);
                ManifestRow {
                    job_id: id.clone(),
                    prompt: job.prompt.clone(),
                    status: match data.map(|d| d.status) {
                        Some(Status::Succeeded) => "succeeded",
                        Some(Status::Failed) => "failed",
                        None => "pending",
                    }
                    .to_string(),
                    images: data
                        .map(|d| d.images.iter().map(|i| i.uri.clone()).collect())
                        .unwrap_or_default(),
                    error_kind: data
                        .and_then(|d| d.error.as_ref())
                        .map(|e| e.kind.to_string()),
                    error: data
                        .and_then(|d| d.error.as_ref())
                        .map(|e| e.message.clone()),
                    cost_usd: data.and_then(|d| d.cost_usd),
                    variants: data.map_or_else(BTreeMap::new, |d| {
                        let mut by_name: BTreeMap<String, Vec<String>> = BTreeMap::new();
                        for v in d.images.iter().flat_map(|i| &i.variants) {
                            by_name
                                .entry(v.name.clone())
                                .or_default()
                                .push(v.uri.clone());
                        }
                        by_name
                    }),
                    references: data.map(|d| d.references.clone()).unwrap_or_default(),
                }
            })
            .collect()
    }

    pub fn outcomes(&self) -> impl Iterator<Item = &CloudEvent> {
        self.outcomes.values()
    }

    pub fn record(&self) -> &BatchRecord {
        &self.record
    }
}

/// Writes `manifest-{batch}.jsonl` and `.csv` into `dir`; returns their paths.
pub fn write_manifest(
    dir: &Path,
    batch: &str,
    rows: &[ManifestRow],
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let jsonl = dir.join(format!("manifest-{batch}.jsonl"));
    let csv_path = dir.join(format!("manifest-{batch}.csv"));
    let mut out = std::io::BufWriter::new(std::fs::File::create(&jsonl)?);
    for row in rows {
        serde_json::to_writer(&mut out, row)?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    let mut writer = csv::Writer::from_path(&csv_path)?;
    writer.write_record([
        "job_id",
        "prompt",
        "status",
        "images",
        "error_kind",
        "error",
        "cost_usd",
        "variants",
        "references",
    ])?;
    for row in rows {
        writer.write_record([
            row.job_id.as_str(),
            row.prompt.as_str(),
            row.status.as_str(),
            &row.images.join(" "),
            row.error_kind.as_deref().unwrap_or(""),
            row.error.as_deref().unwrap_or(""),
            &row.cost_usd.map(|c| format!("{c:.6}")).unwrap_or_default(),
            &row.variants
                .iter()
                .flat_map(|(name, uris)| uris.iter().map(move |u| format!("{name}={u}")))
                .collect::<Vec<_>>()
                .join(" "),
            &row.references.join(" "),
        ])?;
    }
    writer.flush()?;
    Ok((jsonl, csv_path))
}

pub(super) async fn load_record(settings: &Settings, batch: &str) -> anyhow::Result<BatchRecord> {
    let store = crate::storage::from_settings(settings).await?;
    batch::load(&*store, &settings.storage.prefix, batch)
        .await?
        .with_context(|| {
            format!(
                "no record of batch {batch:?} in the store: was it enqueued with `imagegen enqueue --batch {batch}` \
                 (with the same storage settings)?"
            )
        })
}

/// `imagegen watch`.
pub async fn command(
    settings: &Settings,
    batch: &str,
    out: &Path,
    timeout: Option<Duration>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let record = load_record(settings, batch).await?;
    let mut progress = Progress::new(record);
    // Subscribe first, then read what is stored: an event in between is seen twice, never zero
    // times.
    let connection = connect(settings, "watch").await?;
    let queue = format!(
        "{}.watch.{batch}.{:08x}",
        settings.amqp.results_exchange,
        fastrand::u32(..)
    );
    let mut listener = ResultListener::open_named(
        &connection,
        &settings.amqp.results_exchange,
        "#",
        &queue,
        WATCH_QUEUE_EXPIRES,
    )
    .await?;
    let store = crate::storage::from_settings(settings).await?;
    for event in batch::stored_results(&store, &settings.storage.prefix, batch).await? {
        progress.apply(event);
    }
    let started = Instant::now();
    let done_at_start = progress.outcomes.len();
    let bar = progress_bar(progress.total() as u64, batch);
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut timed_out = false;
    while !progress.complete() {
        let done = progress.outcomes.len();
        bar.set_position(done as u64);
        bar.set_message(format!(
            "{batch}: {} done, {} failed, {} left, ${:.2}",
            progress.succeeded(),
            progress.failed(),
            progress.total() - done,
            progress.cost_usd()
        ));
        if let Some(deadline) = deadline
            && Instant::now() >= deadline
        {
            timed_out = true;
            break;
        }
        if let Some(event) = listener.next(Duration::from_secs(1)).await? {
            progress.apply(event);
        }
    }
    bar.finish_and_clear();
    listener.close().await;
    let _ = connection.close(200, "done".into()).await;
    let rows = progress.manifest();
    let (jsonl, csv) = write_manifest(out, batch, &rows)?;
    let finished_here = progress.outcomes.len() - done_at_start;
    let summary = serde_json::json!({
        "batch": batch,
        "jobs": progress.total(),
        "succeeded": progress.succeeded(),
        "failed": progress.failed(),
        "pending": progress.total() - progress.outcomes.len(),
        "cost_usd": progress.cost_usd(),
        "manifest_jsonl": jsonl,
        "manifest_csv": csv,
    });
    if json {
        println!("{summary}");
    }
    let rate = finished_here as f64 / started.elapsed().as_secs_f64().max(0.001);
    eprintln!(
        "batch {batch}: {} jobs, {} succeeded, {} failed, {} pending; ${:.4}; {rate:.1} jobs/s while watching",
        progress.total(),
        progress.succeeded(),
        progress.failed(),
        progress.total() - progress.outcomes.len(),
        progress.cost_usd()
    );
    eprintln!("manifest: {} and {}", jsonl.display(), csv.display());
    if timed_out {
        eprintln!("error: the batch did not finish within the --timeout");
        return Ok(ExitCode::from(1));
    }
    Ok(if progress.failed() > 0 {
        ExitCode::from(EXIT_PARTIAL)
    } else {
        ExitCode::SUCCESS
    })
}

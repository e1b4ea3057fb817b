//! `imagegen run`: a worker in this process, a file's jobs, every result event, a summary: the
//! whole trip in one command (what `make run` does).

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::enqueue::{self, InputFormat};
use crate::amqp::results::ResultListener;
use crate::amqp::{connect, topology};
use crate::config::Settings;
use crate::domain::event::Status;
use crate::domain::job::is_valid_name;
use crate::worker::Worker;

fn read_jobs(
    settings: &Settings,
    file: &std::path::Path,
    batch: Option<&str>,
    format: InputFormat,
) -> anyhow::Result<enqueue::Prepared> {
    if let Some(b) = batch
        && !is_valid_name(b)
    {
        anyhow::bail!("--batch {b:?} must be 1-128 characters of [A-Za-z0-9._-]");
    }
    let text =
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))?;
    let format = match format {
        InputFormat::Auto => enqueue::detect_format(file, &text),
        f => f,
    };
    let prepared = enqueue::prepare(
        &text,
        format,
        batch,
        &enqueue::Shape::default(),
        &settings.job_rules(),
    );
    for e in &prepared.errors {
        eprintln!("{}:{}: {}", file.display(), e.line, e.message);
    }
    Ok(prepared)
}

/// `imagegen run`: a worker in this process, the file's jobs, every result event, a summary.
pub async fn run_file(
    settings: Settings,
    file: &std::path::Path,
    batch: Option<&str>,
    format: InputFormat,
    timeout: Duration,
) -> anyhow::Result<ExitCode> {
    let prepared = read_jobs(&settings, file, batch, format)?;
    if prepared.jobs.is_empty() {
        anyhow::bail!("{} has no valid job", file.display());
    }
    let started = Instant::now();
    let connection = connect(&settings, "run").await?;
    if settings.amqp.declare_topology {
        topology::declare(&connection, &settings).await?;
    }
    // Listen before enqueueing, so that no event is missed.
    let mut listener =
        ResultListener::open(&connection, &settings.amqp.results_exchange, "#").await?;
    if let Err(e) = enqueue::record_batches(&settings, &prepared.jobs, None).await {
        tracing::warn!(error = %format!("{e:#}"), "the batch record could not be written: watch and gallery will not know this batch");
    }
    // A one-off run needs no health listener (and must not collide with a running worker's).
    let mut worker_settings = settings.clone();
    worker_settings.http.listen.clear();
    let worker = Worker::from_settings(worker_settings).await?;
    let stop = CancellationToken::new();
    let worker_task = tokio::spawn(worker.run(stop.clone()));
    enqueue::publish(&settings, &prepared.jobs, |_| {}).await?;
    eprintln!(
        "enqueued {} jobs; waiting for their results",
        prepared.jobs.len()
    );

    let mut pending: BTreeMap<&str, usize> = prepared
        .jobs
        .iter()
        .map(|j| (j.id.as_str(), j.line))
        .collect();
    let mut succeeded = Vec::new();
    let mut failed = Vec::new();
    let deadline = Instant::now() + timeout;
    while !pending.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(event) = listener.next(left.min(Duration::from_secs(5))).await? else {
            if Instant::now() >= deadline || worker_task.is_finished() {
                break;
            }
            continue;
        };
        if pending.remove(event.data.job_id.as_str()).is_none() {
            continue;
        }
        match event.data.status {
            Status::Succeeded => succeeded.push(event),
            Status::Failed => failed.push(event),
        }
    }
    listener.close().await;
    let _ = connection.close(200, "done".into()).await;
    stop.cancel();
    match worker_task.await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => eprintln!("worker: {e:#}"),
        Err(e) => eprintln!("worker task: {e}"),
    }

    let images: usize = succeeded.iter().map(|e| e.data.images.len()).sum();
    println!(
        "{} jobs in {:.1} s: {} succeeded ({} images), {} failed, {} without a result",
        prepared.jobs.len(),
        started.elapsed().as_secs_f64(),
        succeeded.len(),
        images,
        failed.len(),
        pending.len()
    );
    if let Some(first) = succeeded.first().and_then(|e| e.data.images.first()) {
        let dir = first
            .uri
            .rsplit_once('/')
            .map(|(d, _)| d)
            .unwrap_or(&first.uri);
        let dir = dir.rsplit_once('/').map(|(d, _)| d).unwrap_or(dir);
        println!("images: {dir}/");
    }
    for event in &failed {
        if let Some(error) = &event.data.error {
            println!(
                "failed {}: {} ({})",
                event.data.job_id, error.kind, error.message
            );
        }
    }
    for (id, line) in &pending {
        println!("no result for {id} (line {line})");
    }
    let ok = failed.is_empty() && pending.is_empty() && prepared.errors.is_empty();
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(super::output::EXIT_PARTIAL)
    })
}

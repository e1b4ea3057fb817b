//! `imagegen status` and `imagegen cancel`: queue depths and a batch's progress, and the end of
//! a batch's unstarted jobs.

use std::process::ExitCode;

use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde::Serialize;

use super::watch::{Progress, load_record};
use crate::amqp::connect;
use crate::config::Settings;
use crate::domain::keys;
use crate::storage::batches as batch;

#[derive(Debug, Serialize)]
struct QueueState {
    queue: String,
    messages: u32,
    consumers: u32,
}

#[derive(Debug, Serialize)]
struct BatchState {
    batch: String,
    jobs: usize,
    succeeded: Option<usize>,
    failed: Option<usize>,
    pending: Option<usize>,
    cost_usd: Option<f64>,
    cancelled: bool,
}

/// `imagegen status`.
pub async fn status(
    settings: &Settings,
    batch: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let connection = connect(settings, "status").await?;
    let mut queues = Vec::new();
    let mut names = vec![settings.amqp.jobs_queue.clone()];
    names.extend(
        settings
            .amqp
            .delay_tiers_secs
            .iter()
            .map(|s| settings.delay_queue_name(*s)),
    );
    names.push(settings.amqp.dead_letter_queue.clone());
    if !settings.amqp.results_queue.is_empty() {
        names.push(settings.amqp.results_queue.clone());
    }
    for name in names {
        // A passive declare fails (and closes the channel) when the queue does not exist.
        let channel = connection.create_channel().await?;
        let declared = channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await;
        if let Ok(q) = declared {
            queues.push(QueueState {
                queue: name,
                messages: q.message_count(),
                consumers: q.consumer_count(),
            });
            let _ = channel.close(200, "ok".into()).await;
        }
    }
    let _ = connection.close(200, "done".into()).await;

    let store = crate::storage::from_settings(settings).await?;
    let prefix = &settings.storage.prefix;
    let mut batches = Vec::new();
    let names: Vec<String> = match batch {
        Some(b) => vec![b.to_string()],
        None => crate::storage::list_all(&*store, &keys::batches(prefix), None)
            .await?
            .iter()
            .filter_map(|k| keys::batch_of_record(prefix, k).map(str::to_string))
            .collect(),
    };
    for name in names {
        let Some(record) = batch::load(&*store, prefix, &name).await? else {
            anyhow::ensure!(batch.is_none(), "no record of batch {name:?} in the store");
            continue;
        };
        let cancelled = store.head(&keys::cancelled(prefix, &name)).await?.is_some();
        let mut state = BatchState {
            batch: name.clone(),
            jobs: record.jobs.len(),
            succeeded: None,
            failed: None,
            pending: None,
            cost_usd: None,
            cancelled,
        };
        // Counting outcomes reads every stored result: only for the batch asked about.
        if batch.is_some() {
            let mut progress = Progress::new(record);
            for event in batch::stored_results(&store, prefix, &name).await? {
                progress.apply(event);
            }
            state.succeeded = Some(progress.succeeded());
            state.failed = Some(progress.failed());
            state.pending = Some(progress.pending());
            state.cost_usd = Some(progress.cost_usd());
        }
        batches.push(state);
    }

    let lane = if settings.lane.enabled() {
        crate::worker::lane::open_files(&*store, prefix, &settings.lane.provider).await?
    } else {
        Vec::new()
    };
    if json {
        println!(
            "{}",
            serde_json::json!({ "queues": queues, "batches": batches, "lane_files": lane })
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!("{:<48} {:>10} {:>10}", "queue", "messages", "consumers");
    for q in &queues {
        println!("{:<48} {:>10} {:>10}", q.queue, q.messages, q.consumers);
    }
    if !batches.is_empty() {
        println!();
        println!(
            "{:<32} {:>8} {:>10} {:>8} {:>8} {:>10}",
            "batch", "jobs", "succeeded", "failed", "pending", "cost"
        );
        let opt = |v: Option<usize>| v.map_or("-".to_string(), |v| v.to_string());
        for b in &batches {
            println!(
                "{:<32} {:>8} {:>10} {:>8} {:>8} {:>10}{}",
                b.batch,
                b.jobs,
                opt(b.succeeded),
                opt(b.failed),
                opt(b.pending),
                b.cost_usd.map_or("-".to_string(), |c| format!("${c:.2}")),
                if b.cancelled { "  (cancelled)" } else { "" }
            );
        }
    }
    if !lane.is_empty() {
        println!();
        println!(
            "{:<26} {:<20} {:>6}  {:<30} {:>8} {:>10} {:>7}",
            "lane file", "batch", "jobs", "provider batch", "status", "completed", "failed"
        );
        for f in &lane {
            let (id, status, completed, failed) = match &f.provider_batch {
                Some(s) => (
                    s.provider_batch.as_str(),
                    s.status.as_str(),
                    format!("{}/{}", s.completed, s.total),
                    s.failed.to_string(),
                ),
                None => ("-", "sending", "-".to_string(), "-".to_string()),
            };
            println!(
                "{:<26} {:<20} {:>6}  {:<30} {:>8} {:>10} {:>7}",
                f.file,
                f.batch.as_deref().unwrap_or("_"),
                f.jobs,
                id,
                status,
                completed,
                failed
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `imagegen cancel`.
pub async fn cancel(settings: &Settings, batch: &str) -> anyhow::Result<ExitCode> {
    let record = load_record(settings, batch).await?;
    let store = crate::storage::from_settings(settings).await?;
    batch::cancel(&*store, &settings.storage.prefix, batch).await?;
    let mut progress = Progress::new(record);
    for event in batch::stored_results(&store, &settings.storage.prefix, batch).await? {
        progress.apply(event);
    }
    let pending = progress.pending();
    eprintln!(
        "batch {batch} cancelled: its {pending} unfinished jobs end as `cancelled` when a worker takes them, \
         without a provider call (jobs already at the provider finish)"
    );
    Ok(ExitCode::SUCCESS)
}

//! `imagegen enqueue`: reads a job file (or a template and variations alone, [`input`]), shows
//! the count and the estimated cost, records the batch, and publishes the jobs with publisher
//! confirms.

pub mod input;
mod references;

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use futures_util::StreamExt;
use lapin::BasicProperties;
use serde_json::Value;

pub use self::input::{
    InputFormat, LineError, Prepared, PreparedJob, Shape, count, detect_format, parse_vary,
    prepare, prepare_without_file,
};
use super::output::{EXIT_PARTIAL, EXIT_USAGE, progress_bar};
use crate::amqp::publisher::{Publisher, unix_now};
use crate::amqp::{connect, topology};
use crate::config::{ProviderSettings, Settings};
use crate::domain::cost::Purchase;
use crate::domain::job::{Job, is_valid_name};
use crate::provider::{ImageProvider, ImageRequest};
use crate::storage::batches::{self, BatchJob};

/// Confirms awaited at once while publishing.
const PUBLISH_WINDOW: usize = 256;

/// What `imagegen enqueue` was asked to do.
#[derive(Debug)]
pub struct EnqueueRequest {
    pub file: Option<PathBuf>,
    pub batch: Option<String>,
    pub format: InputFormat,
    pub shape: Shape,
    /// `--reference FILE`: uploaded, then named in every job's `images`.
    pub reference_files: Vec<PathBuf>,
    pub max_jobs: usize,
    pub dry_run: bool,
    pub yes: bool,
    pub json: bool,
}

/// Reads the input (or only the template and variations), checks the job count against
/// `max_jobs`, and returns the prepared jobs; errors are printed with their line numbers.
pub fn read_input(
    settings: &Settings,
    file: Option<&Path>,
    batch: Option<&str>,
    format: InputFormat,
    shape: &Shape,
    max_jobs: usize,
) -> Result<Prepared, InputError> {
    if let Some(b) = batch
        && !is_valid_name(b)
    {
        return Err(InputError::Usage(format!(
            "--batch {b:?} must be 1-128 characters of [A-Za-z0-9._-]"
        )));
    }
    let rules = settings.job_rules();
    if let Some(p) = &shape.provider
        && !rules.providers.contains(p)
    {
        return Err(InputError::Usage(format!(
            "--provider {p:?} is not a configured provider (configured: {})",
            rules.providers.join(", ")
        )));
    }
    let (count, text, format) = match file {
        Some(file) => {
            let text = std::fs::read_to_string(file).map_err(|e| {
                InputError::Other(anyhow::anyhow!("cannot read {}: {e}", file.display()))
            })?;
            let format = match format {
                InputFormat::Auto => detect_format(file, &text),
                f => f,
            };
            (count(&text, format, shape), Some(text), format)
        }
        None if shape.template.is_some() => (shape.variations(), None, format),
        None => {
            return Err(InputError::Usage(
                "give an input file, or --template (with --vary) to make jobs without one".into(),
            ));
        }
    };
    if shape.variations() > 1 {
        eprintln!(
            "{count} jobs: {} input rows x {} variations",
            count / shape.variations().max(1),
            shape.variations()
        );
    }
    if count > max_jobs {
        return Err(InputError::Usage(format!(
            "{count} jobs is more than --max-jobs {max_jobs}: check the --vary lists, or raise --max-jobs"
        )));
    }
    let prepared = match &text {
        Some(text) => prepare(text, format, batch, shape, &rules),
        None => prepare_without_file(batch, shape, &rules),
    };
    let name = file.map_or_else(|| "--template".to_string(), |f| f.display().to_string());
    for e in &prepared.errors {
        eprintln!("{name}:{}: {}", e.line, e.message);
    }
    Ok(prepared)
}

#[derive(Debug, thiserror::Error)]
pub enum InputError {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Other(#[from] anyhow::Error),
}

/// What the jobs will cost by their providers' prices, if they know the models (no usage yet:
/// each provider's estimate of its request).
pub fn estimate(settings: &Settings, jobs: &[PreparedJob]) -> Option<f64> {
    let settings_all = settings;
    let rules = settings.job_rules();
    let providers = Providers::new(settings).ok()?;
    let mut total = 0.0;
    for job in jobs {
        let bytes = serde_json::to_vec(&job.body).ok()?;
        let parsed = Job::parse(&bytes, None, &rules).ok()?;
        let (settings, provider) = providers.of(&parsed)?;
        let request = ImageRequest::for_job(&parsed, provider.defaults(), parsed.n);
        let cost = settings.pricing.cost(Purchase {
            model: &request.model,
            size: &request.size_text(),
            quality: request.quality.as_deref().unwrap_or(""),
            usage: &provider.estimate(&request),
        })?;
        // Jobs bought through the batch lane cost its share of the live price.
        let lane = &settings_all.lane;
        let in_lane = parsed.lane == Some(crate::domain::job::Lane::Batch)
            && lane.enabled()
            && settings.name == lane.provider;
        total += if in_lane {
            cost.usd * lane.price_factor
        } else {
            cost.usd
        };
    }
    Some(total)
}

/// The configured providers, for the defaults they give jobs and their estimates (no call is
/// made).
struct Providers<'a> {
    settings: &'a Settings,
    built: BTreeMap<&'a str, (&'a ProviderSettings, Arc<dyn ImageProvider>)>,
}

impl<'a> Providers<'a> {
    fn new(settings: &'a Settings) -> anyhow::Result<Self> {
        let built = settings
            .providers
            .iter()
            .map(|p| {
                Ok((
                    p.name.as_str(),
                    (
                        p,
                        crate::provider::build(
                            p,
                            &crate::provider::buffers::BufferPool::unbounded(),
                        )?,
                    ),
                ))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Self { settings, built })
    }

    /// The provider of a job, and its settings.
    fn of(&self, job: &Job) -> Option<&(&'a ProviderSettings, Arc<dyn ImageProvider>)> {
        let name = job
            .provider
            .as_deref()
            .unwrap_or(&self.settings.worker.default_provider);
        self.built.get(name)
    }
}

/// Records the jobs in their batches' records, so that `watch`, `status` and `gallery` know
/// each batch's size and prompts.
pub async fn record_batches(
    settings: &Settings,
    jobs: &[PreparedJob],
    estimated: Option<f64>,
) -> anyhow::Result<()> {
    let mut per_batch: BTreeMap<String, Vec<(String, BatchJob)>> = BTreeMap::new();
    let rules = settings.job_rules();
    let providers = Providers::new(settings)?;
    for job in jobs {
        let bytes = serde_json::to_vec(&job.body)?;
        let Ok(parsed) = Job::parse(&bytes, None, &rules) else {
            continue;
        };
        let Some(batch) = parsed.batch.clone() else {
            continue;
        };
        // As the job's provider will fill them in.
        let (size, model) = match providers.of(&parsed) {
            Some((_, provider)) => {
                let request = ImageRequest::for_job(&parsed, provider.defaults(), parsed.n);
                (request.size_text(), request.model)
            }
            None => (
                parsed.size.clone().unwrap_or_default(),
                parsed.model.clone().unwrap_or_default(),
            ),
        };
        per_batch.entry(batch).or_default().push((
            parsed.id.clone(),
            BatchJob {
                prompt: parsed.prompt,
                n: parsed.n as u32,
                size,
                model,
            },
        ));
    }
    if per_batch.is_empty() {
        return Ok(());
    }
    let store = crate::storage::from_settings(settings).await?;
    let single = per_batch.len() == 1;
    for (batch, jobs) in per_batch {
        batches::record_jobs(
            &*store,
            &settings.storage.prefix,
            &batch,
            jobs,
            estimated.filter(|_| single),
        )
        .await
        .with_context(|| format!("the record of batch {batch} could not be written"))?;
    }
    Ok(())
}

/// `imagegen enqueue`.
pub async fn command(settings: &Settings, mut request: EnqueueRequest) -> anyhow::Result<ExitCode> {
    if !request.reference_files.is_empty() {
        match references::upload(settings, &request.reference_files, request.dry_run).await {
            Ok(keys) => request.shape.references = keys,
            Err(references::RefError::Usage(message)) => {
                eprintln!("error: {message}");
                return Ok(ExitCode::from(EXIT_USAGE));
            }
            Err(references::RefError::Other(e)) => return Err(e),
        }
    }
    let prepared = match read_input(
        settings,
        request.file.as_deref(),
        request.batch.as_deref(),
        request.format,
        &request.shape,
        request.max_jobs,
    ) {
        Ok(p) => p,
        Err(InputError::Usage(message)) => {
            eprintln!("error: {message}");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        Err(InputError::Other(e)) => return Err(e),
    };
    let estimated = estimate(settings, &prepared.jobs);
    let images: u64 = prepared
        .jobs
        .iter()
        .map(|j| j.body.get("n").and_then(Value::as_u64).unwrap_or(1))
        .sum();
    let cost_text = match estimated {
        Some(usd) => format!(", estimated ${usd:.2}"),
        None => String::new(),
    };
    if request.dry_run {
        for job in &prepared.jobs {
            println!("{}", serde_json::to_string(&job.body)?);
        }
        eprintln!(
            "{} jobs ({images} images{cost_text}) would be published; {} invalid lines",
            prepared.jobs.len(),
            prepared.errors.len()
        );
        return Ok(exit_for(&prepared));
    }
    if prepared.jobs.is_empty() {
        eprintln!("error: no valid job to publish");
        return Ok(ExitCode::from(EXIT_PARTIAL));
    }
    if let Some(usd) = estimated.filter(|usd| *usd > 0.0)
        && !request.yes
    {
        let question = format!(
            "Publish {} jobs ({images} images, estimated ${usd:.2}) to {}?",
            prepared.jobs.len(),
            settings.amqp.jobs_queue
        );
        if !std::io::stdin().is_terminal() {
            eprintln!("error: {question} Pass --yes to confirm without a prompt.");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
        eprint!("{question} [y/N] ");
        let mut answer = String::new();
        std::io::stdin().read_line(&mut answer)?;
        if !matches!(answer.trim(), "y" | "Y" | "yes") {
            eprintln!("nothing published");
            return Ok(ExitCode::from(EXIT_USAGE));
        }
    }
    record_batches(settings, &prepared.jobs, estimated).await?;
    let bar = progress_bar(prepared.jobs.len() as u64, "publishing");
    let started = std::time::Instant::now();
    let published = publish(settings, &prepared.jobs, |n| bar.set_position(n as u64)).await;
    bar.finish_and_clear();
    let published = published?;
    let batches: std::collections::BTreeSet<&str> = prepared
        .jobs
        .iter()
        .filter_map(|j| j.body.get("batch").and_then(Value::as_str))
        .collect();
    if request.json {
        let summary = serde_json::json!({
            "published": published,
            "images": images,
            "invalid_lines": prepared.errors.len(),
            "queue": settings.amqp.jobs_queue,
            "batches": batches,
            "estimated_usd": estimated,
        });
        println!("{summary}");
    }
    eprintln!(
        "published {published} jobs ({images} images{cost_text}) to {} with confirms in {:.1} s{}; {} invalid lines not published",
        settings.amqp.jobs_queue,
        started.elapsed().as_secs_f64(),
        match batches.len() {
            0 => String::new(),
            _ => format!(
                " (batch {})",
                batches.into_iter().collect::<Vec<_>>().join(", ")
            ),
        },
        prepared.errors.len()
    );
    Ok(exit_for(&prepared))
}

fn exit_for(prepared: &Prepared) -> ExitCode {
    if prepared.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_PARTIAL)
    }
}

/// Publishes jobs to the jobs queue with confirms. Returns how many were confirmed; stops at the
/// first publish the broker does not confirm.
pub async fn publish(
    settings: &Settings,
    jobs: &[PreparedJob],
    mut progress: impl FnMut(usize),
) -> anyhow::Result<usize> {
    let connection = Arc::new(connect(settings, "enqueue").await?);
    if settings.amqp.declare_topology {
        topology::declare(&connection, settings).await?;
    }
    let publisher = Publisher::new(connection.clone());
    let queue = settings.amqp.jobs_queue.as_str();
    let mut confirmed = 0;
    let mut results = futures_util::stream::iter(jobs)
        .map(|job| {
            let publisher = &publisher;
            async move {
                let payload = serde_json::to_vec(&job.body)?;
                let properties = BasicProperties::default()
                    .with_content_type("application/json".into())
                    .with_message_id(job.id.as_str().into())
                    .with_app_id("imagegen".into())
                    .with_timestamp(unix_now());
                publisher.publish("", queue, &payload, properties).await?;
                anyhow::Ok(())
            }
        })
        .buffer_unordered(PUBLISH_WINDOW);
    let mut failure = None;
    while let Some(result) = results.next().await {
        match result {
            Ok(()) => {
                confirmed += 1;
                progress(confirmed);
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    drop(results);
    publisher.close().await;
    let _ = connection.close(200, "enqueued".into()).await;
    match failure {
        Some(e) => Err(e.context(format!(
            "{confirmed} of {} jobs were confirmed before the failure",
            jobs.len()
        ))),
        None => Ok(confirmed),
    }
}

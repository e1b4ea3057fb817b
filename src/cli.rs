//! The command line. `main.rs` only calls [`main`].
//!
//! Exit codes: 0 success; 1 error (configuration, broker, storage); 2 usage error; 3 the command
//! ran but some jobs or input lines failed.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::amqp::results::ResultListener;
use crate::amqp::{connect, consumer::Worker, topology};
use crate::config::{Settings, Sources};
use crate::enqueue::{self, InputFormat};
use crate::event::Status;
use crate::job::JobRules;

#[derive(Parser, Debug)]
#[command(
    name = "imagegen",
    version,
    about = "Turns queued text prompts into stored images."
)]
pub struct Cli {
    /// An extra configuration file, layered over config/default.toml and config/$APP_ENV.toml.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Consume jobs and process them until SIGTERM/SIGINT.
    #[command(
        after_help = "Example:\n  OPENAI_API_KEY=sk-... IMAGEGEN__PROVIDER__KIND=openai imagegen worker"
    )]
    Worker,
    /// Publish jobs: from JSONL (job objects), CSV (a header row; a `prompt` column or
    /// --template) or text (one prompt a line), times the --vary combinations.
    #[command(after_help = "Examples:
  imagegen enqueue prompts.txt --batch posters
  imagegen enqueue products.csv --batch catalog --template \"studio photo of {name}, {color}\"
  imagegen enqueue --batch levels --template \"pixel-art background, {biome}, {time}\" \\
      --vary biome=forest,desert,snow --vary time=day,night --dry-run
  imagegen enqueue jobs.jsonl --batch b7 --yes --json

CSV columns id, prompt, batch, model, size, quality, output_format, background, n and deadline
are job fields; other columns go to the job's metadata. Ids are derived from the batch and the
job, so enqueueing the same rows again never creates new paid work.

Exit codes: 0 published; 1 error; 2 usage (or --max-jobs exceeded, or no confirmation);
3 published, but some input lines were invalid.")]
    Enqueue {
        /// The input file; optional with --template and --vary.
        file: Option<PathBuf>,
        /// Batch name for jobs that do not name one (also part of their derived ids).
        #[arg(long)]
        batch: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        format: InputFormat,
        /// Prompt template: `{name}` is filled from the row's column (or field) and --vary values.
        #[arg(long)]
        template: Option<String>,
        /// A variation: `name=value1,value2`. Repeat it; every row is expanded into the cross product.
        #[arg(long, value_name = "NAME=V1,V2", value_parser = enqueue::parse_vary)]
        vary: Vec<(String, Vec<String>)>,
        /// Refuse to publish more jobs than this (a guard against an unintended cross product).
        #[arg(long, default_value_t = 10_000)]
        max_jobs: usize,
        /// Print the jobs (JSONL, stdout) and their count without publishing.
        #[arg(long)]
        dry_run: bool,
        /// Publish without asking for confirmation of the estimated cost.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Print the summary as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Follow a batch to its end: progress, cost, and a manifest (JSONL and CSV) of every job.
    #[command(after_help = "Examples:
  imagegen watch --batch posters
  imagegen watch --batch posters --out results/ --json

It can start before, during or after the run, on any machine: it reads the results already
stored, then follows live events on a queue of its own (bound to the results exchange; it
expires by itself if watch dies).

Exit codes: 0 every job succeeded; 1 error or --timeout; 3 the batch finished with failed jobs.")]
    Watch {
        #[arg(long)]
        batch: String,
        /// Directory for manifest-{batch}.jsonl and manifest-{batch}.csv.
        #[arg(long, default_value = ".")]
        out: PathBuf,
        /// Give up after this many seconds (default: wait for the batch to finish).
        #[arg(long)]
        timeout: Option<u64>,
        /// Print the final summary as JSON on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Queue depths and consumers, and the progress of a batch (or of every recorded batch).
    #[command(
        after_help = "Examples:\n  imagegen status\n  imagegen status --batch posters --json"
    )]
    Status {
        #[arg(long)]
        batch: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Cancel a batch: its jobs that have not started end as `cancelled`, without a provider call.
    #[command(after_help = "Example:\n  imagegen cancel --batch posters")]
    Cancel {
        #[arg(long)]
        batch: String,
    },
    /// A static HTML contact sheet of a batch: thumbnails, prompts, costs, failures.
    #[command(after_help = "Examples:
  imagegen gallery --batch posters --out posters-gallery
  imagegen gallery --batch posters --download   # full images copied next to the page

Full images are linked by presigned URLs (S3, valid for --link-hours) or relative paths (fs).")]
    Gallery {
        #[arg(long)]
        batch: String,
        /// Where to write index.html and thumbs/ (default: gallery-{batch}).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Copy the full images next to the page, so that it works offline and forever.
        #[arg(long)]
        download: bool,
        /// Validity of presigned links to full images (S3), in hours (at most 168).
        #[arg(long, default_value_t = 168)]
        link_hours: u64,
        /// Cards per page.
        #[arg(long, default_value_t = 100)]
        page_size: usize,
    },
    /// Process a file end to end in this process: start a worker, enqueue, wait for every
    /// result event, print a summary, stop.
    #[command(
        after_help = "Example (what `make run` does):\n  APP_ENV=local imagegen run examples/prompts.txt"
    )]
    Run {
        file: PathBuf,
        /// Batch name (default: the file's name without extension).
        #[arg(long)]
        batch: Option<String>,
        #[arg(long, value_enum, default_value = "auto")]
        format: InputFormat,
        /// Give up waiting for results after this many seconds.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
    },
    /// Inspect and replay the dead-letter queue.
    #[command(subcommand)]
    Dlq(DlqCommand),
    /// Ask a worker's /readyz (for container health checks): exit 0 when ready, 1 otherwise.
    #[command(
        after_help = "Example (Dockerfile):\n  HEALTHCHECK CMD [\"imagegen\", \"healthcheck\"]"
    )]
    Healthcheck {
        /// The URL to ask.
        #[arg(long, default_value = "http://127.0.0.1:9185/readyz")]
        url: String,
    },
    /// Serve the fake OpenAI Images API (for tests, benchmarks and demos; no real images).
    #[command(after_help = "Examples:
  imagegen fake-api --listen 127.0.0.1:8080 --latency-ms 500 --image-bytes 300000
  imagegen fake-api --rpm 60   # an account limited to 60 requests a minute (429 beyond)
  curl -H 'content-type: application/json' localhost:8080/_fake/rules -d '{\"fault\":{\"kind\":\"moderation\"},\"prompt_contains\":\"fox\",\"times\":1}'")]
    FakeApi {
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: String,
        /// Latency added to every answer, in milliseconds.
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Approximate size of each generated image, in bytes.
        #[arg(long, default_value_t = 2048)]
        image_bytes: usize,
        /// Enforce this many requests per minute (429 beyond it), like an account's RPM limit.
        #[arg(long)]
        rpm: Option<u64>,
        /// Enforce this many tokens per minute (a request costs its usage), like a TPM limit.
        #[arg(long)]
        tpm: Option<u64>,
    },
}

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// Show dead-lettered jobs and why they are there (they stay in the queue).
    #[command(after_help = "Example:\n  imagegen dlq list --limit 20")]
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// One JSON object a line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move dead-lettered jobs back to the jobs queue (with confirms), resetting their attempts.
    #[command(
        after_help = "Examples:\n  imagegen dlq replay --batch posters\n  imagegen dlq replay --limit 10 --include-invalid"
    )]
    Replay {
        /// Replay at most this many jobs.
        #[arg(long)]
        limit: Option<usize>,
        /// Only jobs of this batch.
        #[arg(long)]
        batch: Option<String>,
        /// Also replay jobs that failed as invalid_job (they will fail again unless fixed upstream
        /// or the workers were upgraded for a newer job version).
        #[arg(long)]
        include_invalid: bool,
    },
}

pub fn main() -> ExitCode {
    crate::tune_allocator();
    let cli = Cli::parse();
    let mut runtime = tokio::runtime::Builder::new_multi_thread();
    // A worker runs on `worker.threads` threads: its settings are read before the runtime starts.
    let mut preloaded = None;
    if let Command::Worker = cli.command {
        match load_settings(&cli.config) {
            Ok(settings) => {
                if settings.worker.threads > 0 {
                    runtime.worker_threads(settings.worker.threads);
                }
                preloaded = Some(settings);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(1);
            }
        }
    }
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: could not start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(run(cli, preloaded)) {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn load_settings(cli_config: &Option<PathBuf>) -> anyhow::Result<Settings> {
    let settings = Settings::load(&Sources::from_env(cli_config.clone()))?;
    crate::telemetry::init(&settings.log);
    Ok(settings)
}

/// `preloaded`: the settings, when `main` already read them.
async fn run(cli: Cli, preloaded: Option<Settings>) -> anyhow::Result<ExitCode> {
    match cli.command {
        Command::Worker => {
            let settings = match preloaded {
                Some(settings) => settings,
                None => load_settings(&cli.config)?,
            };
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            let worker = Worker::from_settings(settings).await?;
            // On a runtime thread, not on the thread that started the runtime: the worker spawns
            // a task per message, and a task spawned from a runtime thread starts on that
            // thread's own queue instead of waking another one.
            tokio::spawn(worker.run(shutdown)).await??;
            Ok(ExitCode::SUCCESS)
        }
        Command::Enqueue {
            file,
            batch,
            format,
            template,
            vary,
            max_jobs,
            dry_run,
            yes,
            json,
        } => {
            let settings = load_settings(&cli.config)?;
            let request = enqueue::EnqueueRequest {
                file,
                batch,
                format,
                shape: enqueue::Shape { template, vary },
                max_jobs,
                dry_run,
                yes,
                json,
            };
            enqueue::command(&settings, request).await
        }
        Command::Healthcheck { url } => {
            crate::install_crypto_provider();
            let client = reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()?;
            match client.get(&url).send().await {
                Ok(r) if r.status().is_success() => Ok(ExitCode::SUCCESS),
                Ok(r) => {
                    eprintln!("{url}: HTTP {}", r.status());
                    Ok(ExitCode::from(1))
                }
                Err(e) => {
                    eprintln!("{url}: {e}");
                    Ok(ExitCode::from(1))
                }
            }
        }
        Command::Watch {
            batch,
            out,
            timeout,
            json,
        } => {
            let settings = load_settings(&cli.config)?;
            crate::watch::command(
                &settings,
                &batch,
                &out,
                timeout.map(Duration::from_secs),
                json,
            )
            .await
        }
        Command::Status { batch, json } => {
            let settings = load_settings(&cli.config)?;
            crate::watch::status(&settings, batch.as_deref(), json).await
        }
        Command::Cancel { batch } => {
            let settings = load_settings(&cli.config)?;
            crate::watch::cancel(&settings, &batch).await
        }
        Command::Gallery {
            batch,
            out,
            download,
            link_hours,
            page_size,
        } => {
            let settings = load_settings(&cli.config)?;
            let out = out.unwrap_or_else(|| PathBuf::from(format!("gallery-{batch}")));
            let options = crate::gallery::Options {
                out,
                download,
                link_ttl: Duration::from_secs(link_hours.clamp(1, 168) * 3600),
                page_size: page_size.max(1),
            };
            crate::gallery::command(&settings, &batch, &options).await
        }
        Command::Run {
            file,
            batch,
            format,
            timeout,
        } => {
            let settings = load_settings(&cli.config)?;
            let batch =
                batch.or_else(|| file.file_stem().map(|s| s.to_string_lossy().into_owned()));
            run_file(
                settings,
                &file,
                batch.as_deref(),
                format,
                Duration::from_secs(timeout),
            )
            .await
        }
        Command::Dlq(DlqCommand::List { limit, json }) => {
            let settings = load_settings(&cli.config)?;
            let letters = crate::dlq::list(&settings, limit).await?;
            if json {
                for l in &letters {
                    println!("{}", serde_json::to_string(l)?);
                }
            } else {
                println!(
                    "{:<40} {:<16} {:<18} {:>8}  message",
                    "job", "batch", "reason", "attempts"
                );
                for l in &letters {
                    println!(
                        "{:<40} {:<16} {:<18} {:>8}  {}",
                        l.job_id.as_deref().unwrap_or("-"),
                        l.batch.as_deref().unwrap_or("-"),
                        l.reason,
                        l.attempts,
                        l.message.as_deref().unwrap_or("")
                    );
                }
                eprintln!(
                    "{} dead-lettered jobs shown (of the first {limit})",
                    letters.len()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Dlq(DlqCommand::Replay {
            limit,
            batch,
            include_invalid,
        }) => {
            let settings = load_settings(&cli.config)?;
            let filter = crate::dlq::ReplayFilter {
                limit,
                batch,
                include_invalid,
            };
            let report = crate::dlq::replay(&settings, &filter).await?;
            println!("{}", serde_json::to_string(&report)?);
            eprintln!(
                "replayed {} jobs to {}; {} left in {}",
                report.replayed,
                settings.amqp.jobs_queue,
                report.skipped,
                settings.amqp.dead_letter_queue
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::FakeApi {
            listen,
            latency_ms,
            image_bytes,
            rpm,
            tpm,
        } => {
            crate::telemetry::init(&crate::config::LogSettings {
                format: crate::config::LogFormat::Auto,
                level: "info".into(),
            });
            let api = crate::fake_api::FakeApi::new(crate::fake_api::FakeOptions {
                latency: Duration::from_millis(latency_ms),
                image_bytes,
                requests_per_minute: rpm,
                tokens_per_minute: tpm,
                ..Default::default()
            });
            let listener = tokio::net::TcpListener::bind(&listen)
                .await
                .with_context(|| format!("cannot listen on {listen}"))?;
            info!(address = %listener.local_addr()?, "fake image API listening; base URL http://{listen}/v1");
            let shutdown = CancellationToken::new();
            tokio::spawn(cancel_on_signal(shutdown.clone()));
            tokio::select! {
                served = crate::fake_api::serve(listener, api) => served?,
                _ = shutdown.cancelled() => {}
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn read_jobs(
    settings: &Settings,
    file: &std::path::Path,
    batch: Option<&str>,
    format: InputFormat,
) -> anyhow::Result<enqueue::Prepared> {
    if let Some(b) = batch
        && !crate::job::is_valid_name(b)
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
        &JobRules::from_settings(settings),
    );
    for e in &prepared.errors {
        eprintln!("{}:{}: {}", file.display(), e.line, e.message);
    }
    Ok(prepared)
}

/// `imagegen run`: a worker in this process, the file's jobs, every result event, a summary.
async fn run_file(
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
        ExitCode::from(3)
    })
}

/// Cancels `token` on SIGTERM or SIGINT.
pub async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    info!("stop requested");
    token.cancel();
}

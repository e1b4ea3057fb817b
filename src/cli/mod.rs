//! The command line. `main.rs` only calls [`main`]; each command lives in a module of its own,
//! and [`output`] holds what they share (exit codes, progress bars).

pub mod dlq;
pub mod enqueue;
pub mod gallery;
pub mod output;
pub mod providers;
pub mod run;
pub mod status;
pub mod telemetry;
pub mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use self::enqueue::InputFormat;
use crate::config::{Settings, Sources};
use crate::worker::Worker;

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

CSV columns id, prompt, batch, model, size, quality, output_format, background, n, deadline,
provider, negative_prompt, seed and lane are job fields; other columns go to the job's metadata. Ids are derived from the batch and the
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
        /// The configured provider (`[providers.NAME]`) of every job that names none; a job that
        /// names another is refused.
        #[arg(long, value_name = "NAME")]
        provider: Option<String>,
        /// A reference image for every job (a style plate, art to edit): uploaded once to the
        /// store, under `{storage.prefix}references/` by its content, and named in each job's
        /// `images`. Repeat it for several.
        #[arg(long = "reference", value_name = "FILE")]
        references: Vec<PathBuf>,
        /// The lane of every job that names none: `batch` buys them through the provider's batch
        /// API (half the price, within 24 hours; `[lane]`), `live` at once.
        #[arg(long, value_parser = ["live", "batch"])]
        lane: Option<String>,
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
    /// The configured providers: kind, model, limits, prices, fallbacks, and whether each answers
    /// with its credentials (its cheapest authenticated call, which buys nothing).
    #[command(
        after_help = "Examples:\n  imagegen providers\n  imagegen providers --offline --json\n\n\
Exit codes: 0 every provider answers (or --offline); 3 one does not."
    )]
    Providers {
        /// Do not call the providers: show the configuration only.
        #[arg(long)]
        offline: bool,
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
    telemetry::init(&settings.log);
    for warning in &settings.warnings {
        warn!("{warning}");
    }
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
            provider,
            references,
            lane,
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
                shape: enqueue::Shape {
                    template,
                    vary,
                    provider,
                    references: Vec::new(),
                    lane,
                },
                reference_files: references,
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
            watch::command(
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
            status::status(&settings, batch.as_deref(), json).await
        }
        Command::Providers { offline, json } => {
            let settings = load_settings(&cli.config)?;
            providers::providers(&settings, offline, json).await
        }
        Command::Cancel { batch } => {
            let settings = load_settings(&cli.config)?;
            status::cancel(&settings, &batch).await
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
            let options = gallery::Options {
                out,
                download,
                link_ttl: Duration::from_secs(link_hours.clamp(1, 168) * 3600),
                page_size: page_size.max(1),
            };
            gallery::command(&settings, &batch, &options).await
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
            run::run_file(
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
            let letters = dlq::list(&settings, limit).await?;
            if json {
                for l in &letters {
                    println!("{}", serde_json::to_string(l)?);
                }
            } else {
                println!(
                    "{:<40} {:<16} {:<18} {:>8}  message",
                    "job", "batch", "reason", "attempts"
                );
                // Whatever a producer put in a message reaches a terminal only escaped.
                let shown = |s: Option<&str>, none: &str| {
                    s.map_or_else(|| none.to_string(), output::printable)
                };
                for l in &letters {
                    println!(
                        "{:<40} {:<16} {:<18} {:>8}  {}",
                        shown(l.job_id.as_deref(), "-"),
                        shown(l.batch.as_deref(), "-"),
                        output::printable(&l.reason),
                        l.attempts,
                        shown(l.message.as_deref(), "")
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
            let filter = dlq::ReplayFilter {
                limit,
                batch,
                include_invalid,
            };
            let report = dlq::replay(&settings, &filter).await?;
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
    }
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

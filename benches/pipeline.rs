//! End-to-end benchmark of the worker: `make bench` (see BENCHMARKS.md).
//!
//! For each run it starts the fake image API (`imagegen-fakes openai`, its own process, with the run's
//! latency and image size), declares the run's own queues and results exchange on the local
//! RabbitMQ, binds a private queue to the results exchange, publishes N persistent jobs with
//! confirms, and only then starts the worker (`imagegen worker`, its own process) with every
//! setting at its default except the concurrency and what points it at the fake, at Garage
//! (`127.0.0.1:3900`, a prefix of its own), at the run's own queues, at a spool directory of its
//! own, and its health/metrics listener at a free loopback port. It waits for the N result
//! events, reads the worker's CPU time and peak RSS from /proc, stops it with SIGTERM, reads the
//! fake's call counters, and removes the run's queues, exchange and spool. The runs' objects are
//! deleted after the last run (see [`run_id`] for why the order of prefixes matters with Garage).
//!
//! Besides the worker it records the CPU time that RabbitMQ (beam.smp), Garage, the fake API, the
//! harness itself and everything else on the host used between the worker's start and the last
//! event, so a run shows where the time went.
//!
//! ```text
//! cargo bench --bench pipeline -- --scenario a|b|c|d|all|a,b [--n N] [--concurrency C]
//!     [--latency-ms MS] [--image-kb KB] [--repeat K] [--wait-idle-secs S]
//!     [--bin .bench/imagegen] [--out-dir .bench] [--note TEXT]
//! ```
//!
//! Needs RabbitMQ on 127.0.0.1:5672 and Garage on 127.0.0.1:3900 (`scripts/services.sh`) and a
//! copy of the release binary at `--bin` (`make bench` does all of it).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Parser;
use futures_util::StreamExt;
use imagegen::amqp::results::ResultListener;
use imagegen::amqp::{connect, topology};
use imagegen::config::{Settings, Sources};
use imagegen::domain::event::Status;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

/// Garage as `scripts/services.sh` sets it up.
const S3_ENDPOINT: &str = "http://127.0.0.1:3900";
const S3_REGION: &str = "garage";
const S3_BUCKET: &str = "imagegen-dev";
const S3_KEY_ID: &str = "GK1d3a9e0c5b7f2a4e6c8d0b1f";
const S3_SECRET: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";

/// Targets from the benchmark issue.
const TARGET_RATIO: f64 = 0.97;
const TARGET_CPU_MS_PER_JOB: f64 = 1.5;
const TARGET_RSS_MIB: f64 = 48.0;

#[derive(Parser, Debug)]
#[command(about = "End-to-end benchmark of the imagegen worker (RabbitMQ, Garage, fake image API)")]
struct Args {
    /// Scenarios to run: a, b, c, d, all, or a comma-separated list (a,b).
    #[arg(long, default_value = "all")]
    scenario: String,
    /// Override the number of jobs (not with scenario d, which compares two sizes).
    #[arg(long)]
    n: Option<usize>,
    /// Override worker.concurrency.
    #[arg(long)]
    concurrency: Option<usize>,
    /// Override the fake API's latency, in milliseconds.
    #[arg(long)]
    latency_ms: Option<u64>,
    /// Override the image size, in KB (1000 bytes).
    #[arg(long)]
    image_kb: Option<usize>,
    /// The worker binary: a copy of a release build (`make bench` makes it). Not
    /// target/release/imagegen itself: `cargo bench` relinks that one with the dev-dependencies'
    /// features (tokio's test-util), which the production binary does not have.
    #[arg(long, default_value = ".bench/imagegen")]
    bin: PathBuf,
    /// The fake provider APIs' binary (the `imagegen-fakes` crate's release build, copied by
    /// `make bench`).
    #[arg(long, default_value = ".bench/imagegen-fakes")]
    fake_bin: PathBuf,
    #[arg(long, default_value = "amqp://guest:guest@127.0.0.1:5672/%2f")]
    amqp_url: String,
    /// Where results (JSON) and per-run logs go.
    #[arg(long, default_value = ".bench")]
    out_dir: PathBuf,
    /// Give up on a run after this many seconds without all its events.
    #[arg(long, default_value_t = 1800)]
    timeout_secs: u64,
    /// Run the whole plan this many times (labels of later rounds get #2, #3, ...).
    #[arg(long, default_value_t = 1)]
    repeat: usize,
    /// Before starting each worker, wait up to this many seconds for the host to be idle (busy
    /// below --idle-below of its CPUs over 3 s): for a shared machine. 0: do not wait.
    #[arg(long, default_value_t = 0)]
    wait_idle_secs: u64,
    #[arg(long, default_value_t = 0.15)]
    idle_below: f64,
    /// Leave the run's images in the bucket (they are deleted by default).
    #[arg(long)]
    keep_objects: bool,
    /// Change a worker setting for a diagnostic run (repeatable), e.g. --set worker.prefetch=64.
    /// Such runs are not at the defaults: the results record it and the targets are not checked.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
    /// Configure the worker's provider through the `[provider]` section of earlier releases
    /// (`IMAGEGEN__PROVIDER__*`), to run a binary of one of them against this harness.
    #[arg(long)]
    legacy_provider: bool,
    /// Free text recorded with the results (e.g. what the binary was built from).
    #[arg(long)]
    note: Option<String>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// One run: a scenario's parameters.
#[derive(Debug, Clone)]
struct RunSpec {
    scenario: &'static str,
    label: String,
    n: usize,
    concurrency: usize,
    latency_ms: u64,
    image_bytes: usize,
}

fn spec(scenario: &'static str, n: usize, concurrency: usize, latency_ms: u64) -> RunSpec {
    RunSpec {
        scenario,
        label: scenario.to_string(),
        n,
        concurrency,
        latency_ms,
        image_bytes: 300_000,
    }
}

fn plan(args: &Args) -> anyhow::Result<Vec<RunSpec>> {
    let names: Vec<&str> = if args.scenario == "all" {
        vec!["a", "b", "c", "d"]
    } else {
        args.scenario.split(',').map(str::trim).collect()
    };
    let mut runs = Vec::new();
    for name in names {
        match name {
            "a" => runs.push(spec("a", 2000, 32, 500)),
            "b" => runs.push(spec("b", 1000, 32, 0)),
            "c" => runs.push(spec("c", 300, 64, 2000)),
            "d" => {
                if args.n.is_some() {
                    bail!("--n cannot be used with scenario d (it runs N=200 and N=20000)");
                }
                for n in [200, 20_000] {
                    let mut s = spec("d", n, 32, 20);
                    s.label = format!("d/{n}");
                    runs.push(s);
                }
            }
            other => bail!("unknown scenario {other:?}: expected a, b, c, d or all"),
        }
    }
    for run in &mut runs {
        if let Some(n) = args.n {
            run.n = n;
        }
        if let Some(c) = args.concurrency {
            run.concurrency = c;
        }
        if let Some(l) = args.latency_ms {
            run.latency_ms = l;
        }
        if let Some(kb) = args.image_kb {
            run.image_bytes = kb * 1000;
        }
        if run.n == 0 || run.concurrency == 0 {
            bail!("--n and --concurrency must be at least 1");
        }
    }
    let mut all = runs.clone();
    for round in 2..=args.repeat {
        all.extend(runs.iter().map(|r| RunSpec {
            label: format!("{}#{round}", r.label),
            ..r.clone()
        }));
    }
    Ok(all)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let runs = plan(&args)?;
    if let Some(bad) = args.set.iter().find(|kv| !kv.contains('=')) {
        bail!("--set {bad:?}: expected KEY=VALUE, e.g. worker.prefetch=64");
    }
    if !args.bin.exists() {
        bail!(
            "{} is missing: run `make bench`, or `cargo build --release --bin imagegen && \
             mkdir -p .bench && cp target/release/imagegen .bench/imagegen` first",
            args.bin.display()
        );
    }
    imagegen::install_crypto_provider();
    // One thread: the harness should take as little CPU from the measured processes as it can.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run_all(args, runs))
}

async fn run_all(args: Args, runs: Vec<RunSpec>) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.out_dir)?;
    let machine = machine_info(&args.bin);
    eprintln!("machine: {machine}");
    let mut results = Vec::new();
    let mut failures = Vec::new();
    let mut prefixes = Vec::new();
    for spec in &runs {
        let id = run_id();
        prefixes.push(format!("bench/{id}/"));
        eprintln!(
            "\n== run {}: N={} concurrency={} latency={} ms image={} bytes",
            spec.label, spec.n, spec.concurrency, spec.latency_ms, spec.image_bytes
        );
        let outcome = run_one(&args, spec, &id).await;
        match outcome {
            Ok(result) => {
                eprintln!("{}", serde_json::to_string(&result)?);
                results.push(result);
            }
            Err(e) => {
                eprintln!("run {} failed: {e:#}", spec.label);
                failures.push(json!({ "label": spec.label, "error": format!("{e:#}") }));
                if format!("{e:#}").contains("interrupted") {
                    break;
                }
            }
        }
    }
    // Objects go at the end, not between runs: Garage deletes the blocks of removed objects in
    // the background some minutes later, at a CPU cost that would land in a later run.
    if !args.keep_objects {
        let mut deleted = 0;
        for prefix in &prefixes {
            match delete_objects(prefix).await {
                Ok(n) => deleted += n,
                Err(e) => eprintln!("could not delete the objects under {prefix}: {e:#}"),
            }
        }
        eprintln!(
            "deleted {deleted} objects under {} prefixes of bucket {S3_BUCKET}; Garage frees their \
             blocks in the background over the next minutes (`garage stats`: resync queue length)",
            prefixes.len()
        );
    }
    let report = report(&results);
    println!("\n{report}");
    let stamp = time::OffsetDateTime::now_utc()
        .format(&time::macros::format_description!(
            "[year][month][day]T[hour][minute][second]Z"
        ))
        .unwrap_or_default();
    let record = json!({
        "time": stamp,
        "command": std::env::args().collect::<Vec<_>>(),
        "note": args.note,
        "machine": machine,
        "runs": results,
        "failed_runs": failures,
    });
    let text = serde_json::to_string_pretty(&record)?;
    let file = args
        .out_dir
        .join(format!("{stamp}-{}.json", args.scenario.replace(',', "")));
    std::fs::write(&file, &text)?;
    std::fs::write(args.out_dir.join("latest.json"), &text)?;
    std::fs::write(args.out_dir.join("latest.txt"), &report)?;
    eprintln!("results: {}", file.display());
    if !failures.is_empty() {
        bail!("{} run(s) failed", failures.len());
    }
    Ok(())
}

/// Child processes of a run, killed if still running when dropped (on error).
struct Proc {
    name: &'static str,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns the exit code.
    async fn stop(&mut self, grace: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    eprintln!("{} did not stop within {grace:?}: killing it", self.name);
                    let _ = self.child.kill();
                    return self.child.wait().ok().and_then(|s| s.code());
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A run id that sorts after every earlier one: `r` (after any hex digit of the random ids of
/// earlier versions of this harness), seconds since the epoch in hex, 4 random hex digits.
///
/// It is also the run's storage prefix. The worker lists each job's directory, and Garage's
/// listing walks forward from the prefix over deleted objects (kept as tombstones for a day) until
/// it finds live ones: with the prefixes of deleted runs sorting after this run's, that walk
/// (and Garage's CPU) would grow with every earlier run.
fn run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("r{secs:08x}{:04x}", fastrand::u16(..))
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The overrides that point a worker at this run's queues, the fake and Garage: everything else
/// stays at its default, concurrency excepted (and what `--set` changes, for diagnostics).
fn overrides(
    args: &Args,
    id: &str,
    fake_port: u16,
    spec: &RunSpec,
    spool: &Path,
) -> Vec<(String, String)> {
    let mut v: Vec<(&str, String)> = vec![
        ("amqp.url", args.amqp_url.clone()),
        ("amqp.jobs_queue", format!("bench.{id}.jobs")),
        ("amqp.dead_letter_queue", format!("bench.{id}.dead")),
        ("amqp.results_exchange", format!("bench.{id}.results")),
        ("amqp.results_queue", format!("bench.{id}.results")),
        ("amqp.connection_name", format!("bench-{id}")),
        ("providers.openai.kind", "openai".into()),
        (
            "providers.openai.base_url",
            format!("http://127.0.0.1:{fake_port}/v1"),
        ),
        ("providers.openai.api_key", "sk-bench".into()),
        ("storage.kind", "s3".into()),
        ("storage.bucket", S3_BUCKET.into()),
        ("storage.endpoint_url", S3_ENDPOINT.into()),
        ("storage.region", S3_REGION.into()),
        ("storage.access_key_id", S3_KEY_ID.into()),
        ("storage.secret_access_key", S3_SECRET.into()),
        ("storage.prefix", format!("bench/{id}/")),
        ("spool.dir", spool.display().to_string()),
        // The health and metrics listener stays on, on loopback and a free port.
        ("http.listen", "127.0.0.1:0".into()),
        ("worker.concurrency", spec.concurrency.to_string()),
    ];
    v.extend(
        args.set
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, val)| (k, val.to_string())),
    );
    v.into_iter().map(|(k, val)| (k.to_string(), val)).collect()
}

fn env_name(key: &str) -> String {
    format!("IMAGEGEN__{}", key.replace('.', "__").to_uppercase())
}

async fn run_one(args: &Args, spec: &RunSpec, id: &str) -> anyhow::Result<Value> {
    let run_dir = std::env::current_dir()?
        .join(&args.out_dir)
        .join("runs")
        .join(format!("{}-{id}", spec.label.replace(['/', '#'], "-")));
    std::fs::create_dir_all(&run_dir)?;
    let fake_port = free_port()?;
    let overrides = overrides(args, id, fake_port, spec, &run_dir.join("spool"));
    let pairs: Vec<(&str, String)> = overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let settings =
        Settings::load_with_overrides(&Sources::default(), &pairs).context("benchmark settings")?;
    let connection = connect(&settings, "bench").await?;
    // Ctrl-C ends the measurement (its child processes are killed on drop), not the clean-up.
    let result = tokio::select! {
        r = run_with_queues(args, spec, id, &run_dir, fake_port, &overrides, &settings, &connection) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };

    // Clean up whatever happened.
    let a = &settings.amqp;
    let mut queues = vec![
        a.jobs_queue.clone(),
        a.dead_letter_queue.clone(),
        a.results_queue.clone(),
    ];
    queues.extend(
        a.delay_tiers_secs
            .iter()
            .map(|t| settings.delay_queue_name(*t)),
    );
    for q in queues {
        // A channel per delete: deleting a queue that is not there closes the channel.
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    if let Ok(channel) = connection.create_channel().await {
        let _ = channel
            .exchange_delete(
                a.results_exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = connection.close(200, "bench done".into()).await;
    let _ = std::fs::remove_dir_all(run_dir.join("spool"));
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_with_queues(
    args: &Args,
    spec: &RunSpec,
    id: &str,
    run_dir: &Path,
    fake_port: u16,
    overrides: &[(String, String)],
    settings: &Settings,
    connection: &lapin::Connection,
) -> anyhow::Result<Value> {
    // The run's queues, created with the worker's own arguments plus x-expires, so that an
    // interrupted run leaves nothing behind for long; the worker accepts them as they are.
    let expires = |mut t: FieldTable| {
        t.insert("x-expires".into(), AMQPValue::LongInt(30 * 60 * 1000));
        t
    };
    let a = &settings.amqp;
    for (name, arguments) in topology::queues(settings) {
        topology::ensure_queue(connection, &name, expires(arguments)).await?;
    }
    topology::declare(connection, settings).await?;

    // The fake image API, its own process.
    let mut fake = Proc {
        name: "fake-api",
        child: Command::new(&args.fake_bin)
            .args([
                "openai",
                "--listen",
                &format!("127.0.0.1:{fake_port}"),
                "--latency-ms",
                &spec.latency_ms.to_string(),
                "--image-bytes",
                &spec.image_bytes.to_string(),
            ])
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(run_dir.join("fake-api.log"))?)
            .spawn()
            .context("starting the fake API")?,
    };
    let http = reqwest::Client::new();
    let stats_url = format!("http://127.0.0.1:{fake_port}/_fake/stats");
    let deadline = Instant::now() + Duration::from_secs(15);
    while http.get(&stats_url).send().await.is_err() {
        if Instant::now() > deadline || fake.child.try_wait()?.is_some() {
            bail!(
                "the fake API did not start (see {}/fake-api.log)",
                run_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Listen before publishing, then publish every job before the worker starts.
    let mut listener = ResultListener::open(connection, &a.results_exchange, "#").await?;
    let batch = format!("bench-{id}");
    let jobs: Vec<(String, Vec<u8>)> = (0..spec.n)
        .map(|i| {
            let job_id = format!("job-{i:06}");
            let body = json!({
                "id": job_id,
                "batch": batch,
                "prompt": format!("benchmark prompt {i}: a lighthouse on a cliff at dusk, oil painting"),
            });
            (job_id, body.to_string().into_bytes())
        })
        .collect();
    let enqueue_started = Instant::now();
    let published = publish_jobs(connection, &a.jobs_queue, &jobs).await?;
    let enqueue_secs = enqueue_started.elapsed().as_secs_f64();
    eprintln!("published {published} jobs in {enqueue_secs:.1} s; starting the worker");

    let (busy_before, garage_before) =
        wait_idle(Duration::from_secs(args.wait_idle_secs), args.idle_below).await;
    eprintln!(
        "before the worker's start: host {:.0}% busy, Garage using {:.2} cores",
        busy_before * 100.0,
        garage_before
    );

    // The worker, its own process: defaults, plus the overrides.
    let before = CpuSnapshot::take();
    let mut command = Command::new(&args.bin);
    command
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(run_dir.join("worker.log"))?);
    for (key, value) in overrides {
        let key = match key.strip_prefix("providers.openai.") {
            Some(rest) if args.legacy_provider => format!("provider.{rest}"),
            _ => key.clone(),
        };
        command.env(env_name(&key), value);
    }
    let started = Instant::now();
    let mut worker = Proc {
        name: "worker",
        child: command.spawn().context("starting the worker")?,
    };

    // Every job's event, once.
    let mut pending: HashSet<&str> = jobs.iter().map(|(id, _)| id.as_str()).collect();
    let mut durations = Vec::with_capacity(spec.n);
    let (mut succeeded, mut failed, mut duplicates, mut attempts) = (0usize, 0usize, 0usize, 0u64);
    let mut first_event = None;
    let mut last_event = started;
    let deadline = started + Duration::from_secs(args.timeout_secs);
    // The worker's RSS about once a second: (seconds since its start, KiB, events so far).
    let mut rss_samples: Vec<(f64, u64, usize)> = Vec::new();
    let mut next_sample = started;
    while !pending.is_empty() {
        if Instant::now() >= next_sample {
            if let Some(kib) = status_kib(worker.pid(), "VmRSS:") {
                let t = round(started.elapsed().as_secs_f64(), 2);
                rss_samples.push((t, kib, spec.n - pending.len()));
            }
            next_sample += Duration::from_secs(1);
        }
        let wait = deadline.saturating_duration_since(Instant::now());
        match listener.next(wait.min(Duration::from_secs(1))).await? {
            Some(event) => {
                if !pending.remove(event.data.job_id.as_str()) {
                    duplicates += 1;
                    continue;
                }
                last_event = Instant::now();
                first_event.get_or_insert(last_event);
                durations.push(event.data.duration_ms);
                attempts += u64::from(event.data.attempts);
                match event.data.status {
                    Status::Succeeded => succeeded += 1,
                    Status::Failed => failed += 1,
                }
            }
            None => {
                if let Some(status) = worker.child.try_wait()? {
                    bail!(
                        "the worker exited ({status}) with {} events missing (see {}/worker.log)",
                        pending.len(),
                        run_dir.display()
                    );
                }
                if Instant::now() >= deadline {
                    bail!(
                        "{} of {} events missing after {} s",
                        pending.len(),
                        spec.n,
                        args.timeout_secs
                    );
                }
            }
        }
    }
    // Just before stopping the worker: its CPU time and memory, and everyone else's CPU.
    let after = CpuSnapshot::take();
    let worker_stat = proc_ticks(worker.pid()).context("reading the worker's /proc/PID/stat")?;
    let (peak_rss_kib, rss_kib) = (
        status_kib(worker.pid(), "VmHWM:"),
        status_kib(worker.pid(), "VmRSS:"),
    );
    let threads = status_kib(worker.pid(), "Threads:");
    // RSS when 10%, 50% and 90% of the events were in (from the samples).
    let rss_at = |fraction: f64| {
        let done = (spec.n as f64 * fraction) as usize;
        rss_samples
            .iter()
            .find(|(_, _, d)| *d >= done)
            .map(|(_, kib, _)| *kib)
    };
    let rss_progress = json!({ "10%": rss_at(0.1), "50%": rss_at(0.5), "90%": rss_at(0.9) });
    // At most ~200 samples in the record.
    let step = rss_samples.len().div_ceil(200).max(1);
    let rss_series: Vec<_> = rss_samples.iter().step_by(step).collect();
    let worker_exit = worker.stop(Duration::from_secs(60)).await;
    let stats: Value = http.get(&stats_url).send().await?.json().await?;
    fake.stop(Duration::from_secs(10)).await;
    listener.close().await;

    let tck = clock_ticks();
    let window = last_event.duration_since(started).as_secs_f64();
    let worker_cpu_ms = (worker_stat.1 as f64) * 1000.0 / tck;
    durations.sort_unstable();
    let bound =
        (spec.latency_ms > 0).then(|| spec.concurrency as f64 / (spec.latency_ms as f64 / 1000.0));
    let throughput = spec.n as f64 / window;
    let cpu = after.delta(&before, worker.pid(), fake.pid(), tck);
    let provider_latency = provider_latencies(&run_dir.join("worker.log"));
    Ok(json!({
        "scenario": spec.scenario,
        "label": spec.label,
        "run_id": id,
        "n": spec.n,
        "concurrency": spec.concurrency,
        "latency_ms": spec.latency_ms,
        "image_bytes": spec.image_bytes,
        "enqueue_secs": round(enqueue_secs, 3),
        "wall_secs": round(window, 3),
        "first_event_secs": first_event.map(|t| round(t.duration_since(started).as_secs_f64(), 3)),
        "throughput_jobs_per_sec": round(throughput, 2),
        "bound_jobs_per_sec": bound.map(|b| round(b, 2)),
        "ratio_to_bound": bound.map(|b| round(throughput / b, 4)),
        "worker_cpu_ms": round(worker_cpu_ms, 1),
        "worker_cpu_ms_per_job": round(worker_cpu_ms / spec.n as f64, 3),
        "worker_peak_rss_kib": peak_rss_kib,
        "worker_rss_at_end_kib": rss_kib,
        "worker_threads": threads,
        "non_default_settings": args.set,
        "worker_rss_kib_when_done": rss_progress,
        "worker_rss_samples_secs_kib_done": rss_series,
        "worker_exit_code": worker_exit,
        "job_duration_ms": {
            "p50": percentile(&durations, 0.50),
            "p99": percentile(&durations, 0.99),
            "max": durations.last(),
        },
        "provider_call_ms_from_worker_log": provider_latency,
        "events": { "succeeded": succeeded, "failed": failed, "duplicates": duplicates, "attempts": attempts },
        "fake_api": stats,
        "cpu_secs_during_run": cpu,
        "host_busy_fraction_before": round(busy_before, 3),
        "garage_cores_before": round(garage_before, 3),
        "logs": run_dir.display().to_string(),
    }))
}

/// Publishes the jobs to `queue` as a producer would: persistent JSON messages with a message id,
/// with publisher confirms (up to 1000 unconfirmed at a time). Returns how many were confirmed.
async fn publish_jobs(
    connection: &lapin::Connection,
    queue: &str,
    jobs: &[(String, Vec<u8>)],
) -> anyhow::Result<usize> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut confirmed = 0;
    for chunk in jobs.chunks(1000) {
        let mut pending = Vec::with_capacity(chunk.len());
        for (id, body) in chunk {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2);
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            pending.push(
                channel
                    .basic_publish("".into(), queue.into(), options, body, properties)
                    .await?,
            );
        }
        for confirm in pending {
            match confirm.await? {
                Confirmation::Ack(None) => confirmed += 1,
                other => bail!("the broker did not confirm a job: {other:?}"),
            }
        }
    }
    let _ = channel.close(200, "published".into()).await;
    Ok(confirmed)
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Nearest-rank percentile of sorted values.
fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// p50/p99 of the provider call latencies the worker logs ("provider returned", latency_ms).
fn provider_latencies(log: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(log).ok()?;
    let mut v: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("provider returned"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|l| l.pointer("/fields/latency_ms")?.as_u64())
        .collect();
    v.sort_unstable();
    (!v.is_empty()).then(
        || json!({ "calls": v.len(), "p50": percentile(&v, 0.5), "p99": percentile(&v, 0.99) }),
    )
}

/// Deletes every object under `prefix` (with its own S3 client, set up like the worker's).
async fn delete_objects(prefix: &str) -> anyhow::Result<usize> {
    use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new(S3_REGION))
        .endpoint_url(S3_ENDPOINT)
        .credentials_provider(aws_credential_types::Credentials::new(
            S3_KEY_ID, S3_SECRET, None, None, "bench",
        ))
        .load()
        .await;
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    let client = aws_sdk_s3::Client::from_conf(config);
    let mut deleted = 0;
    loop {
        let page = client
            .list_objects_v2()
            .bucket(S3_BUCKET)
            .prefix(prefix)
            .send()
            .await?;
        let keys: Vec<String> = page
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect();
        if keys.is_empty() {
            return Ok(deleted);
        }
        let results: Vec<_> = futures_util::stream::iter(keys)
            .map(|key| client.delete_object().bucket(S3_BUCKET).key(key).send())
            .buffer_unordered(32)
            .collect()
            .await;
        for r in results {
            r?;
            deleted += 1;
        }
    }
}

fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (comm, utime + stime in clock ticks) of a process.
fn proc_ticks(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the comm: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// A `kB` (or plain number) field of /proc/PID/status.
fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
}

/// (busy, total) ticks of the host's CPUs, from /proc/stat.
fn host_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// CPU ticks of every process named `comm`.
fn ticks_of(comm: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_ticks)
        .filter(|(c, _)| c == comm)
        .map(|(_, t)| t)
        .sum()
}

/// Samples the host over 3 s (1 s when not waiting) until its busy fraction is at most `below`
/// or `limit` has passed. Returns the last sample: the host's busy fraction, and Garage's CPU use
/// in cores (it frees deleted objects' blocks in the background, long after the deletes).
async fn wait_idle(limit: Duration, below: f64) -> (f64, f64) {
    let deadline = Instant::now() + limit;
    let tck = clock_ticks();
    loop {
        let started = Instant::now();
        let ((b0, t0), g0) = (host_ticks(), ticks_of("garage"));
        tokio::time::sleep(Duration::from_secs(if limit.is_zero() { 1 } else { 3 })).await;
        let ((b1, t1), g1) = (host_ticks(), ticks_of("garage"));
        let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
        let garage = g1.saturating_sub(g0) as f64 / tck / started.elapsed().as_secs_f64();
        if busy <= below || Instant::now() >= deadline {
            return (busy, garage);
        }
    }
}

/// CPU ticks of every process, and of the host (busy and total) from /proc/stat.
struct CpuSnapshot {
    procs: HashMap<u32, (String, u64)>,
    host_busy: u64,
    host_total: u64,
}

impl CpuSnapshot {
    fn take() -> Self {
        let mut procs = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                if let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                    && let Some(t) = proc_ticks(pid)
                {
                    procs.insert(pid, t);
                }
            }
        }
        let (busy, total) = host_ticks();
        Self {
            procs,
            host_busy: busy,
            host_total: total,
        }
    }

    /// CPU seconds used between `before` and `self`, by group.
    fn delta(&self, before: &CpuSnapshot, worker: u32, fake: u32, tck: f64) -> Value {
        let me = std::process::id();
        let mut groups: BTreeMap<&str, u64> = BTreeMap::new();
        let mut others: HashMap<String, u64> = HashMap::new();
        let mut known = 0;
        for (pid, (comm, ticks)) in &self.procs {
            let prior = before
                .procs
                .get(pid)
                // Same pid (kernel workers rename themselves as they go), not a reused one.
                .filter(|(_, t)| t <= ticks)
                .map_or(0, |(_, t)| *t);
            let used = ticks.saturating_sub(prior);
            let group = match comm.as_str() {
                _ if *pid == worker => "worker",
                _ if *pid == fake => "fake_api",
                _ if *pid == me => "harness",
                "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => "rabbitmq",
                "garage" => "garage",
                _ => {
                    let name = if comm.starts_with("kworker") {
                        "kworker".to_string()
                    } else {
                        comm.clone()
                    };
                    *others.entry(name).or_default() += used;
                    continue;
                }
            };
            *groups.entry(group).or_default() += used;
            known += used;
        }
        let secs = |t: u64| round(t as f64 / tck, 2);
        let host_busy = self.host_busy.saturating_sub(before.host_busy);
        let host_total = self.host_total.saturating_sub(before.host_total);
        let mut top: Vec<(String, u64)> = others.into_iter().filter(|(_, t)| *t > 0).collect();
        top.sort_by_key(|t| std::cmp::Reverse(t.1));
        top.truncate(5);
        let mut out = serde_json::Map::new();
        for g in ["worker", "rabbitmq", "garage", "fake_api", "harness"] {
            out.insert(g.into(), json!(secs(groups.get(g).copied().unwrap_or(0))));
        }
        out.insert("other".into(), json!(secs(host_busy.saturating_sub(known))));
        out.insert("host_busy".into(), json!(secs(host_busy)));
        out.insert("host_capacity".into(), json!(secs(host_total)));
        out.insert(
            "host_busy_fraction".into(),
            json!(round(host_busy as f64 / host_total.max(1) as f64, 3)),
        );
        out.insert(
            "top_other_processes".into(),
            json!(
                top.into_iter()
                    .map(|(c, t)| json!({ "comm": c, "cpu_secs": secs(t) }))
                    .collect::<Vec<_>>()
            ),
        );
        Value::Object(out)
    }
}

fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

fn machine_info(bin: &Path) -> Value {
    let lscpu = command_output("lscpu", &[]).unwrap_or_default();
    let field = |name: &str| {
        lscpu
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|s| s.trim().to_string())
    };
    // Hosts that print the same model name ("AMD EPYC") differ by generation: the family and
    // model numbers tell them apart (AMD family 23: Zen 2, 25: Zen 3/4, 26: Zen 5).
    let model = field("Model name:");
    let generation = field("CPU family:")
        .map(|f| format!("family {f} model {}", field("Model:").unwrap_or_default()));
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    json!({
        "cpu_model": model,
        "cpu_family_model": generation,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "mem_total_mib": mem_kib.map(|k| k / 1024),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "os": std::fs::read_to_string("/etc/os-release").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")).map(|v| v.trim_matches('"').to_string())),
        "rabbitmq": command_output("rabbitmqctl", &["version"]),
        "erlang": command_output("dpkg-query", &["-W", "-f", "${Version}", "erlang-base"]),
        "garage": command_output("garage", &["--version"]),
        "imagegen": command_output(&bin.display().to_string(), &["--version"]),
        "imagegen_binary": bin.display().to_string(),
        "imagegen_binary_sha256": std::fs::read(bin).ok().map(|b| hex::encode(Sha256::digest(b))),
        "rustc": command_output("rustc", &["--version"]),
        "git_commit": command_output("git", &["rev-parse", "--short", "HEAD"]),
        "git_src_dirty": command_output("git", &["status", "--porcelain", "--", "src"]).is_some(),
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string()),
    })
}

/// The human-readable tables, with the targets.
fn report(results: &[Value]) -> String {
    let mut out = String::new();
    let f = |v: &Value, p: &str| v.pointer(p).cloned().unwrap_or(Value::Null);
    // serde_json's Display ignores widths: format through a String.
    let s = |v: Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s,
        v => v.to_string(),
    };
    let num = |v: Value, d: usize| match v.as_f64() {
        Some(x) => format!("{x:.d$}"),
        None => "-".into(),
    };
    let _ = writeln!(
        out,
        "{:<8} {:>6} {:>5} {:>6} {:>6} {:>8} {:>8} {:>7} {:>6} {:>8} {:>8} {:>7} {:>7} {:>6} {:>6} {:>5}",
        "run",
        "N",
        "conc",
        "lat_ms",
        "img_KB",
        "wall_s",
        "jobs/s",
        "bound",
        "ratio",
        "cpu_ms/j",
        "rss_MiB",
        "p50_ms",
        "p99_ms",
        "calls",
        "billed",
        "fail"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:<8} {:>6} {:>5} {:>6} {:>6} {:>8} {:>8} {:>7} {:>6} {:>8} {:>8} {:>7} {:>7} {:>6} {:>6} {:>5}",
            f(r, "/label").as_str().unwrap_or("?"),
            s(f(r, "/n")),
            s(f(r, "/concurrency")),
            s(f(r, "/latency_ms")),
            f(r, "/image_bytes").as_u64().map_or(0, |b| b / 1000),
            num(f(r, "/wall_secs"), 2),
            num(f(r, "/throughput_jobs_per_sec"), 1),
            num(f(r, "/bound_jobs_per_sec"), 1),
            num(f(r, "/ratio_to_bound"), 3),
            num(f(r, "/worker_cpu_ms_per_job"), 3),
            num(
                json!(f(r, "/worker_peak_rss_kib").as_f64().map(|k| k / 1024.0)),
                1
            ),
            s(f(r, "/job_duration_ms/p50")),
            s(f(r, "/job_duration_ms/p99")),
            s(f(r, "/fake_api/requests")),
            s(f(r, "/fake_api/billed")),
            s(f(r, "/events/failed")),
        );
    }
    let _ = writeln!(
        out,
        "\nCPU seconds from the worker's start to the last event (host capacity = wall x cores):"
    );
    let _ = writeln!(
        out,
        "{:<8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}  top other",
        "run",
        "worker",
        "rabbitmq",
        "garage",
        "fake_api",
        "harness",
        "other",
        "host_busy",
        "capacity"
    );
    for r in results {
        let c = |k: &str| num(f(r, &format!("/cpu_secs_during_run/{k}")), 2);
        let top: Vec<String> = f(r, "/cpu_secs_during_run/top_other_processes")
            .as_array()
            .map(|a| {
                a.iter()
                    .take(3)
                    .map(|p| format!("{} {}", p["comm"].as_str().unwrap_or("?"), p["cpu_secs"]))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}  {}",
            f(r, "/label").as_str().unwrap_or("?"),
            c("worker"),
            c("rabbitmq"),
            c("garage"),
            c("fake_api"),
            c("harness"),
            c("other"),
            c("host_busy"),
            c("host_capacity"),
            top.join(", ")
        );
    }
    let _ = writeln!(out, "\nTargets:");
    let mut lines = String::new();
    let mut check = |label: &str, what: &str, value: Option<f64>, target: f64, at_least: bool| {
        let out = &mut lines;
        if let Some(v) = value {
            let met = if at_least { v >= target } else { v <= target };
            let op = if at_least { ">=" } else { "<=" };
            let _ = writeln!(
                out,
                "  {label:<6} {what:<22} {v:>9.3} {op} {target:<6} {}",
                if met { "met" } else { "MISSED" }
            );
        }
    };
    let mut skipped = Vec::new();
    for r in results {
        let label = f(r, "/label").as_str().unwrap_or("?").to_string();
        if r["non_default_settings"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            skipped.push(format!(
                "  {label:<6} not checked: run with {}",
                r["non_default_settings"]
            ));
            continue;
        }
        match f(r, "/scenario").as_str() {
            Some("a") => {
                check(
                    &label,
                    "ratio to bound",
                    f(r, "/ratio_to_bound").as_f64(),
                    TARGET_RATIO,
                    true,
                );
                check(
                    &label,
                    "CPU ms per job",
                    f(r, "/worker_cpu_ms_per_job").as_f64(),
                    TARGET_CPU_MS_PER_JOB,
                    false,
                );
                check(
                    &label,
                    "peak RSS MiB",
                    f(r, "/worker_peak_rss_kib").as_f64().map(|k| k / 1024.0),
                    TARGET_RSS_MIB,
                    false,
                );
            }
            Some("b") => {
                check(
                    &label,
                    "CPU ms per job",
                    f(r, "/worker_cpu_ms_per_job").as_f64(),
                    TARGET_CPU_MS_PER_JOB,
                    false,
                );
            }
            _ => {}
        }
    }
    out.push_str(&lines);
    for line in skipped {
        let _ = writeln!(out, "{line}");
    }
    let d: Vec<&Value> = results.iter().filter(|r| r["scenario"] == "d").collect();
    for pair in d.chunks(2) {
        if let [small, large] = pair {
            let rss = |r: &Value| r["worker_peak_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0;
            let growth = rss(large) / rss(small).max(f64::MIN_POSITIVE);
            let _ = writeln!(
                out,
                "  {:<6} peak RSS N={} {:.1} MiB vs N={} {:.1} MiB: x{growth:.2} {}",
                large["label"].as_str().unwrap_or("d"),
                small["n"],
                rss(small),
                large["n"],
                rss(large),
                if growth <= 1.10 {
                    "flat (within 10%)"
                } else {
                    "NOT flat (grew more than 10%)"
                }
            );
            let mib = |k: &str| {
                large["worker_rss_kib_when_done"][k]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{:.1}", v / 1024.0))
            };
            let _ = writeln!(
                out,
                "         RSS of the N={} worker at 10% / 50% / 90% of its events: {} / {} / {} MiB",
                large["n"],
                mib("10%"),
                mib("50%"),
                mib("90%")
            );
        }
    }
    out
}

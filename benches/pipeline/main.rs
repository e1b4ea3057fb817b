//! End-to-end benchmark of the worker: `make bench` (see BENCHMARKS.md).
//!
//! For each run it starts the fake image API (`imagegen-fakes openai`, or `imagegen-fakes bfl` for
//! the submit-and-poll scenario; its own process, with the run's
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
//! cargo bench --bench pipeline -- --scenario a|b|c|d|jitter|burst|fleet|poll|all|a,b [--n N] [--concurrency C]
//!     [--latency-ms MS] [--image-kb KB] [--repeat K] [--wait-idle-secs S]
//!     [--bin .bench/imagegen] [--out-dir .bench] [--note TEXT]
//! ```
//!
//! Needs RabbitMQ on 127.0.0.1:5672 and Garage on 127.0.0.1:3900 (`scripts/services.sh`) and a
//! copy of the release binary at `--bin` (`make bench` does all of it).

#![recursion_limit = "256"]

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
use imagegen_fakes::latency::Schedule;
use lapin::options::{
    BasicPublishOptions, ConfirmSelectOptions, ExchangeDeleteOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Confirmation};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

mod floor;
mod host;
mod procs;
mod report;
mod run;
mod scenarios;

use host::*;
use procs::*;
use report::*;
use run::*;
use scenarios::*;

/// Garage as `scripts/services.sh` sets it up.
const S3_ENDPOINT: &str = "http://127.0.0.1:3900";
const S3_REGION: &str = "garage";
const S3_BUCKET: &str = "imagegen-dev";
const S3_KEY_ID: &str = "GK1d3a9e0c5b7f2a4e6c8d0b1f";
const S3_SECRET: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";

/// Targets of scenario a and b (300 KB images).
const TARGET_RATIO: f64 = 0.97;
const TARGET_CPU_MS_PER_JOB: f64 = 1.5;
const TARGET_RSS_MIB: f64 = 48.0;
/// Targets of the big-image scenarios (jitter, burst) and the fleet.
const TARGET_RATIO_TO_IDEAL: f64 = 0.95;
const TARGET_CPU_MS_ABOVE_FLOOR: f64 = 1.5;
const TARGET_BURST_RSS_MIB: f64 = 128.0;
const TARGET_RSS_PER_SLOT_KIB: f64 = 64.0;
const TARGET_FLEET_RATIO: f64 = 0.9;
const TARGET_FLEET_429: f64 = 0.02;

#[derive(Parser, Debug)]
#[command(about = "End-to-end benchmark of the imagegen worker (RabbitMQ, Garage, fake image API)")]
struct Args {
    /// Scenarios to run: a, b, c, d, jitter, burst, fleet, all, or a comma-separated list (a,b).
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
    // The floor of each image size, measured here and now.
    let mut floors: BTreeMap<usize, Value> = BTreeMap::new();
    for spec in &runs {
        if let std::collections::btree_map::Entry::Vacant(e) = floors.entry(spec.image_bytes) {
            let floor = floor::measure(spec.image_bytes)?;
            eprintln!("floor: {floor}");
            e.insert(floor);
        }
    }
    for spec in &runs {
        let id = run_id();
        prefixes.push(format!("bench/{id}/"));
        eprintln!(
            "\n== run {}: N={} workers={} concurrency={} latency={}+-{} ms tick={:?} rpm={:?} image={} bytes",
            spec.label,
            spec.n,
            spec.workers,
            spec.concurrency,
            spec.latency_ms,
            spec.jitter_ms,
            spec.tick_ms,
            spec.rpm,
            spec.image_bytes
        );
        let outcome = run_one(&args, spec, &id).await;
        match outcome {
            Ok(mut result) => {
                let floor = &floors[&spec.image_bytes];
                if let (Some(cpu), Some(floor_ms)) = (
                    result["worker_cpu_ms_per_job"].as_f64(),
                    floor["floor_ms"].as_f64(),
                ) {
                    result["cpu_ms_above_floor"] = json!(round(cpu - floor_ms, 3));
                }
                result["floor"] = floor.clone();
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

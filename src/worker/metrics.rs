//! Every metric the worker exports, by name, in one place (Prometheus conventions: base units,
//! `_total` for counters, `_seconds` and `_bytes` suffixes). The rest of the code calls the
//! functions here, never the `metrics` macros with a name of its own.
//!
//! Exported at `/metrics` by [`super::health`] in the Prometheus text format. Metrics about a
//! provider carry its name as the `provider` label.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const JOBS: &str = "imagegen_jobs_total";
pub const JOBS_IN_FLIGHT: &str = "imagegen_jobs_in_flight";
pub const PROVIDER_REQUESTS: &str = "imagegen_provider_requests_total";
pub const PROVIDER_DURATION: &str = "imagegen_provider_request_duration_seconds";
pub const RETRIES: &str = "imagegen_retries_total";
pub const DELAYED: &str = "imagegen_delayed_republishes_total";
pub const CONCURRENCY_LIMIT: &str = "imagegen_provider_concurrency_limit";
pub const UPLOADED_BYTES: &str = "imagegen_uploaded_bytes_total";
pub const STORAGE_DURATION: &str = "imagegen_storage_request_duration_seconds";
pub const IMAGES: &str = "imagegen_images_generated_total";
pub const COST: &str = "imagegen_cost_usd_total";
pub const POSSIBLY_BILLED: &str = "imagegen_possibly_billed_total";
pub const JOB_PANICS: &str = "imagegen_job_panics_total";
pub const FALLBACKS: &str = "imagegen_fallbacks_total";
pub const REGENERATED: &str = "imagegen_images_lost_total";
pub const RECONNECTS: &str = "imagegen_broker_reconnects_total";
pub const PAUSED: &str = "imagegen_paused";
pub const PROVIDER_PAUSED: &str = "imagegen_provider_paused";
pub const ANSWER_MEMORY: &str = "imagegen_answer_memory_bytes";
pub const ANSWER_MEMORY_LIMIT: &str = "imagegen_answer_memory_limit_bytes";
pub const ANSWER_MEMORY_WAITS: &str = "imagegen_answer_memory_waits_total";
pub const LANE_RECORDED: &str = "imagegen_lane_jobs_recorded_total";
pub const LANE_SPLIT: &str = "imagegen_lane_lines_split_total";
pub const LANE_BATCHES: &str = "imagegen_lane_provider_batches_total";

/// Buckets of the provider's latency: image generation takes seconds to minutes.
const PROVIDER_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0,
];
/// Buckets of storage calls.
const STORAGE_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder (once) and returns the handle that renders it.
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(PROVIDER_DURATION.into()), PROVIDER_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(STORAGE_DURATION.into()),
                        STORAGE_BUCKETS,
                    )
                })
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder (a test harness) may be installed already: then ours only renders
            // what it was given, which is nothing, and the other one keeps working.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_counter!(
        JOBS,
        "Jobs finished, by outcome (succeeded, failed) and error kind."
    );
    describe_gauge!(
        JOBS_IN_FLIGHT,
        "Jobs held by this worker (delivered, not yet settled)."
    );
    describe_counter!(
        PROVIDER_REQUESTS,
        "Provider calls, by HTTP status (`error` when there was no response)."
    );
    describe_histogram!(PROVIDER_DURATION, Unit::Seconds, "Provider call latency.");
    describe_counter!(RETRIES, "Provider calls and uploads retried.");
    describe_counter!(
        DELAYED,
        "Jobs republished to a delay queue for a long wait."
    );
    describe_gauge!(
        CONCURRENCY_LIMIT,
        "The adaptive limit of provider calls in flight."
    );
    describe_counter!(
        UPLOADED_BYTES,
        Unit::Bytes,
        "Image bytes uploaded to the store."
    );
    describe_histogram!(STORAGE_DURATION, Unit::Seconds, "Image upload latency.");
    describe_counter!(IMAGES, "Images bought from the provider.");
    describe_counter!(
        COST_MICROS,
        "USD spent, from reported usage and the price table (estimates included)."
    );
    describe_counter!(
        JOB_PANICS,
        "Jobs whose processing panicked (a bug): each is deferred as a failed attempt."
    );
    describe_counter!(
        POSSIBLY_BILLED,
        "Failed provider calls that may have been billed (timeout or reset after sending)."
    );
    describe_counter!(
        FALLBACKS,
        "Jobs moved from a provider out of service for them to a fallback provider."
    );
    describe_counter!(
        REGENERATED,
        "Bought images that could be neither stored nor spooled: they will be bought again."
    );
    describe_counter!(RECONNECTS, "Broker connections re-opened after a loss.");
    describe_counter!(
        LANE_RECORDED,
        "Jobs recorded for the batch lane (their messages settled)."
    );
    describe_counter!(
        LANE_SPLIT,
        "Lines of provider batch output and error files turned into outcomes."
    );
    describe_counter!(
        LANE_BATCHES,
        "Provider batches by what this worker did with them (created, cancelled as duplicates, ended)."
    );

    describe_gauge!(PAUSED, "1 while the worker takes no jobs, by reason.");
    describe_gauge!(
        PROVIDER_PAUSED,
        "1 while a provider refuses every request (its jobs wait in the delay queues), by reason."
    );
}

pub fn job_finished(succeeded: bool, kind: Option<&str>) {
    let outcome = if succeeded { "succeeded" } else { "failed" };
    counter!(JOBS, "outcome" => outcome, "kind" => kind.unwrap_or("").to_string()).increment(1);
}

pub fn jobs_in_flight(delta: f64) {
    gauge!(JOBS_IN_FLIGHT).increment(delta);
}

/// A provider call ended: its HTTP status (`None`: no response) and latency.
pub fn provider_call(provider: &str, status: Option<u16>, latency: Duration) {
    let status = status.map_or_else(|| "error".to_string(), |s| s.to_string());
    counter!(PROVIDER_REQUESTS, "provider" => provider.to_string(), "status" => status)
        .increment(1);
    histogram!(PROVIDER_DURATION, "provider" => provider.to_string()).record(latency.as_secs_f64());
}

pub fn retry() {
    counter!(RETRIES).increment(1);
}

pub fn lane_recorded() {
    counter!(LANE_RECORDED).increment(1);
}

pub fn lane_split() {
    counter!(LANE_SPLIT).increment(1);
}

pub fn lane_batches(what: &'static str) {
    counter!(LANE_BATCHES, "what" => what).increment(1);
}

pub fn delayed() {
    counter!(DELAYED).increment(1);
}

pub fn concurrency_limit(provider: &str, limit: usize) {
    gauge!(CONCURRENCY_LIMIT, "provider" => provider.to_string()).set(limit as f64);
}

pub fn uploaded(bytes: u64, latency: Duration) {
    counter!(UPLOADED_BYTES).increment(bytes);
    histogram!(STORAGE_DURATION).record(latency.as_secs_f64());
}

pub fn images_generated(provider: &str, n: u64) {
    counter!(IMAGES, "provider" => provider.to_string()).increment(n);
}

/// Counters hold integers: the cost is kept in micro-dollars and exported in dollars by
/// [`render`].
pub fn cost(provider: &str, usd: f64) {
    counter!(COST_MICROS, "provider" => provider.to_string())
        .increment((usd.max(0.0) * 1e6).round() as u64);
}
const COST_MICROS: &str = "imagegen_cost_microusd_total";

pub fn possibly_billed(provider: &str, n: u64) {
    counter!(POSSIBLY_BILLED, "provider" => provider.to_string()).increment(n);
}

pub fn fallback(from: &str, to: &str) {
    counter!(FALLBACKS, "provider" => from.to_string(), "to" => to.to_string()).increment(1);
}

pub fn job_panicked(provider: &str) {
    counter!(JOB_PANICS, "provider" => provider.to_string()).increment(1);
}

pub fn images_lost(n: u64) {
    counter!(REGENERATED).increment(n);
}

pub fn reconnect() {
    counter!(RECONNECTS).increment(1);
}

/// Reasons of a pause, as the gauges' `reason` label.
const PAUSE_REASONS: &[&str] = &[
    "quota_exhausted",
    "unauthorized",
    "storage_unavailable",
    "storage_refused",
    "budget_exhausted",
    "broker_blocked",
];

/// Sets the pause gauge: 1 for `reason` (one of [`PAUSE_REASONS`]), 0 for the others.
pub fn paused(reason: Option<&str>) {
    for r in PAUSE_REASONS {
        gauge!(PAUSED, "reason" => *r).set(if Some(*r) == reason { 1.0 } else { 0.0 });
    }
}

/// Sets a provider's pause gauge, like [`paused`].
pub fn provider_paused(provider: &str, reason: Option<&str>) {
    for r in PAUSE_REASONS {
        gauge!(PROVIDER_PAUSED, "provider" => provider.to_string(), "reason" => *r)
            .set(if Some(*r) == reason { 1.0 } else { 0.0 });
    }
}

/// The Prometheus text: the recorder's output, with the micro-dollar counter turned into
/// `imagegen_cost_usd_total`.
/// The answer memory: bytes held now (answers, request bodies, idle buffers), its limit, and
/// how many answers have had to wait for room.
pub fn answer_memory(held: usize, limit: usize, waits: u64) {
    gauge!(ANSWER_MEMORY).set(held as f64);
    gauge!(ANSWER_MEMORY_LIMIT).set(limit as f64);
    counter!(ANSWER_MEMORY_WAITS).absolute(waits);
}

pub fn render(handle: &PrometheusHandle) -> String {
    let text = handle.render();
    let mut out = String::with_capacity(text.len() + 128);
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix(COST_MICROS) {
            if let Some((labels, value)) = rest.rsplit_once(' ')
                && let Ok(micros) = value.parse::<f64>()
            {
                out.push_str(&format!("{COST}{labels} {}\n", micros / 1e6));
            }
            continue;
        }
        if line.starts_with('#') && line.contains(COST_MICROS) {
            out.push_str(&line.replace(COST_MICROS, COST));
            out.push('\n');
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

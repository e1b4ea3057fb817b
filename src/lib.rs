//! imagegen turns queued text prompts into stored images.
//!
//! Workers consume prompt jobs from RabbitMQ, call an image generation API with bounded
//! concurrency and retries, upload the images to S3-compatible storage (or a directory), and
//! publish one CloudEvents completion event per job to a results exchange.
//!
//! # Layout
//! - [`config`]: typed settings, layered from `config/*.toml` and the environment, validated at start-up.
//! - [`cost`]: what a job cost, from reported usage and the configured prices.
//! - [`job`]: the job message contract: parsing, validation, deterministic ids.
//! - [`event`]: the result event (CloudEvents 1.0) and the result record stored next to the images.
//! - [`error`]: the one error taxonomy (permanent / retryable / stop everything) and its classifier.
//! - [`retry`]: backoff with full jitter that honours server-given delays.
//! - [`provider`]: image providers (`openai`, `placeholder`) behind the [`provider::ImageProvider`] trait.
//! - [`buffers`]: image-sized buffers reused from one job to the next.
//! - [`spool`]: local disk for generated images that could not be uploaded yet.
//! - [`storage`]: object stores (`s3`, `fs`) behind the [`storage::ObjectStore`] trait.
//! - [`pipeline`]: processing of one job, knowing nothing of AMQP.
//! - [`amqp`]: the transport: topology, the consumer loop that turns outcomes into acks, confirmed publishing.
//! - [`enqueue`]: reading job files and publishing them with confirms.
//! - [`dlq`]: listing the dead-letter queue and replaying jobs from it.
//! - [`fake_api`]: an in-process fake of the OpenAI Images API for tests, benchmarks and demos.
//! - [`telemetry`]: logging set-up.
//! - [`cli`]: the command line (the binary's `main` only calls [`cli::main`]).

/// Bounds glibc malloc's memory for a worker's pattern: large buffers (HTTP read buffers of a few
/// hundred kilobytes) allocated on one thread and freed on another. Fewer arenas, and a fixed
/// threshold above which buffers are mapped and unmapped on their own, so they go back to the
/// system instead of fragmenting the heap: the peak stays flat however many jobs go through.
/// The cost is the kernel clearing those pages again (about 0.3 ms of CPU per job with
/// 300 KB images, BENCHMARKS.md); image buffers themselves are pooled ([`buffers`]).
///
/// glibc's own variables (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`), when set, win.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (variable, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, 2),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, 256 * 1024),
    ] {
        if std::env::var_os(variable).is_none() {
            // SAFETY: mallopt only sets an allocator parameter; called before the runtime
            // starts threads.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
}

pub mod amqp;
pub mod batch;
pub mod budget;
pub mod buffers;
pub mod cli;
pub mod config;
pub mod cost;
pub mod dlq;
pub mod enqueue;
pub mod error;
pub mod event;
pub mod fake_api;
pub mod gallery;
pub mod http;
pub mod job;
pub mod metrics;
pub mod pipeline;
pub mod provider;
pub mod retry;
pub mod spool;
pub mod storage;
pub mod telemetry;
pub mod throttle;
pub mod watch;

/// Makes ring the process's TLS crypto provider (reqwest, lapin and the S3 client all use rustls
/// with ring; this avoids building a second crypto library). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

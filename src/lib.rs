//! imagegen turns queued text prompts into stored images.
//!
//! Workers consume prompt jobs from RabbitMQ, call an image generation API with bounded
//! concurrency and retries, upload the images to S3-compatible storage (or a directory), and
//! publish one CloudEvents completion event per job to a results exchange.
//!
//! # Layout
//!
//! Dependencies run one way, from the top of this list to the bottom: nothing imports [`cli`].
//! The pure part (the domain, and the readers of every input from outside) is the core crate,
//! `imagegen-core`, which imports nothing of this one and is fuzzed alone (`fuzz/`).
//!
//! - [`cli`]: the command line (the binary's `main` only calls [`cli::main`]).
//!   - [`cli::enqueue`] (reading job files, templates and variations, publishing with confirms),
//!     [`cli::watch`], [`cli::status`], [`cli::gallery`], [`cli::dlq`], [`cli::run`], with
//!     [`cli::output`] (exit codes, progress bars) and [`cli::telemetry`] (logging set-up).
//! - [`worker`]: the worker, above the edges:
//!   - [`worker::build`]: the one place a worker is wired together from settings;
//!   - [`worker::consumer`]: the consumer loop; [`worker::settle`]: what becomes of a message;
//!   - [`worker::pipeline`]: one job's trip ([`worker::pipeline::run`]), in parts
//!     ([`worker::pipeline::attempt`], [`worker::pipeline::lease`],
//!     [`worker::pipeline::images`], [`worker::pipeline::journal`],
//!     [`worker::pipeline::events`]), knowing nothing of AMQP;
//!   - [`worker::providers`]: each provider's throttle, retries, prices and pause state;
//!   - [`worker::throttle`], [`worker::retry`], [`worker::budget`], [`worker::spool`],
//!     [`worker::health`], [`worker::metrics`].
//! - The edges, side by side:
//!   - [`provider`]: the provider contract ([`provider::ImageProvider`], the neutral
//!     [`provider::request`]), the drivers ([`provider::openai`], [`provider::comfyui`], [`provider::placeholder`], ...),
//!     the HTTP helpers they share ([`provider::http`]), and the answer buffers they read into
//!     ([`provider::buffers`], from the core crate, whose answer readers decode into them);
//!   - [`storage`]: object stores ([`storage::s3`], [`storage::fs`]) behind
//!     [`storage::ObjectStore`], and what is known of a batch ([`storage::batches`]);
//!   - [`amqp`]: connections, topology, confirmed publishing, result listeners, the worker's
//!     headers;
//!   - [`imaging`]: decoding with bounds, the variants a job asks for, alpha checks, on
//!     threads of their own ([`imaging::ImageWork`]).
//! - [`config`]: typed settings, layered from `config/*.toml` and the environment, validated at
//!   start-up ([`config::sections`], [`config::providers`]).
//! - [`domain`] (from the core crate): the job contract ([`domain::job`], read with [`domain::json`], which refuses
//!   a key named twice), the result event ([`domain::event`]), the error taxonomy
//!   ([`domain::error`]), costs ([`domain::cost`]), reported rate limits ([`domain::limits`])
//!   and where objects live ([`domain::keys`]).
//!
//! The fake provider APIs the tests and the benchmark use are a crate of their own
//! (`imagegen-fakes`, in `fakes/`): the shipped binary does not contain them.

/// Bounds glibc malloc's memory for a worker's pattern: large buffers (HTTP read buffers of a few
/// hundred kilobytes) allocated on one thread and freed on another. Fewer arenas, and a fixed
/// threshold above which buffers are mapped and unmapped on their own, so they go back to the
/// system instead of fragmenting the heap: the peak stays flat however many jobs go through.
/// The cost is the kernel clearing those pages again (about 0.3 ms of CPU per job with
/// 300 KB images, BENCHMARKS.md); image buffers themselves are pooled ([`provider::buffers`]).
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
pub mod cli;
#[deny(missing_docs)]
pub mod config;
pub mod imaging;
pub mod provider;
pub mod references;
pub mod storage;
pub mod worker;

/// The domain, from the core crate (`imagegen-core`), where it is fuzzed and property-tested
/// alone.
pub use imagegen_core::domain;

/// Makes ring the process's TLS crypto provider (reqwest, lapin and the S3 client all use rustls
/// with ring; this avoids building a second crypto library). Idempotent.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

//! The sections of the settings other than the providers, each with its own checks. The doc
//! comment of a field is its documentation; `config/default.toml` says the same with the default.

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, in_range, in_unit, invalid};

/// `[amqp]`: the broker and the topology.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    /// Broker URL (`amqp://` or `amqps://`), or several (a cluster's nodes) separated by commas.
    /// Contains a secret: never logged.
    pub url: SecretString,
    /// Declare the topology at start (create what is missing, accept what exists).
    pub declare_topology: bool,
    /// Durable quorum queue that holds the jobs.
    pub jobs_queue: String,
    /// Queue that receives dead-lettered jobs.
    pub dead_letter_queue: String,
    /// Durable topic exchange for result events.
    pub results_exchange: String,
    /// Durable queue bound to the results exchange with `#`; empty: not declared.
    pub results_queue: String,
    /// `x-delivery-limit` of the jobs queue, set when the queue is created.
    pub delivery_limit: u32,
    /// Delay queues for long waits, by TTL in seconds.
    pub delay_tiers_secs: Vec<u64>,
    /// Connection name shown in the management UI.
    pub connection_name: String,
    /// Seconds to wait for a connection to the broker.
    pub connect_timeout_secs: u64,
    /// Largest AMQP frame offered to the broker, in bytes.
    pub frame_max: u32,
    /// Key of the seal on the worker's own headers (the count of failed attempts), the same on
    /// every worker of a fleet. A secret: never logged. Empty: a random key of each process.
    pub header_key: SecretString,
}

impl AmqpSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        // One address, or several (a cluster's nodes) separated by commas.
        let urls: Vec<&str> = self
            .url
            .expose_secret()
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .collect();
        if urls.is_empty() {
            return Err(invalid("amqp.url", "is empty"));
        }
        for (i, url) in urls.iter().enumerate() {
            let which = if urls.len() == 1 {
                String::new()
            } else {
                format!("address {} ", i + 1)
            };
            if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
                return Err(invalid(
                    "amqp.url",
                    format!("{which}must start with amqp:// or amqps://"),
                ));
            }
            if url.parse::<lapin::uri::AMQPUri>().is_err() {
                return Err(invalid(
                    "amqp.url",
                    format!("{which}is not a valid AMQP URI (percent-encode a ',' in a password)"),
                ));
            }
        }
        for (key, name) in [
            ("amqp.jobs_queue", &self.jobs_queue),
            ("amqp.dead_letter_queue", &self.dead_letter_queue),
            ("amqp.results_exchange", &self.results_exchange),
        ] {
            check_amqp_name(key, name, false)?;
        }
        check_amqp_name("amqp.results_queue", &self.results_queue, true)?;
        if self.jobs_queue == self.dead_letter_queue {
            return Err(invalid(
                "amqp.dead_letter_queue",
                "must differ from amqp.jobs_queue",
            ));
        }
        in_range(
            "amqp.connect_timeout_secs",
            self.connect_timeout_secs,
            1,
            600,
        )?;
        // 4096 is AMQP's smallest frame; a broker configured above 1 MiB frames is unheard of.
        in_range("amqp.frame_max", self.frame_max.into(), 4096, 1 << 20)?;
        let tiers = &self.delay_tiers_secs;
        if tiers.is_empty() || tiers.windows(2).any(|w| w[0] >= w[1]) || tiers[0] == 0 {
            return Err(invalid(
                "amqp.delay_tiers_secs",
                "must be a non-empty, strictly increasing list of seconds above 0",
            ));
        }
        in_range(
            "amqp.delay_tiers_secs",
            *tiers.last().unwrap_or(&1),
            1,
            86_400 * 7,
        )
    }
}

/// `[worker]`: how one worker process takes and holds jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    /// The provider of jobs that name none (a name of `[providers]`); empty: the only one.
    pub default_provider: String,
    /// Provider calls in flight at once, for each provider that sets no `concurrency` of its own.
    pub concurrency: usize,
    /// Threads that run jobs; 0: one per CPU the process may use.
    pub threads: usize,
    /// Most unacknowledged jobs held (AMQP prefetch); 0: derived from the concurrency.
    pub prefetch: u16,
    /// Bytes of provider answers (and request bodies) held at once by all providers together,
    /// idle reusable buffers included; an answer waits for room before its body is read.
    pub answer_memory_bytes: usize,
    /// Seconds in-flight jobs get to finish after SIGTERM before they are returned.
    pub shutdown_grace_secs: u64,
    /// While a provider (or the whole worker) is paused, one real job is tried this often.
    pub pause_probe_secs: u64,
    /// Longest a job waiting at a submit-and-poll provider is held in-process before it goes
    /// through a delay queue (its handle stays in the job's journal).
    pub pending_hold_secs: u64,
    /// Lifetime of a job's lease, renewed every third of it (stores with conditional writes).
    pub lease_secs: u64,
    /// Times a job's lease may be found abandoned before the job fails as poison.
    pub max_lease_takeovers: u32,
    /// Largest job message accepted, in bytes.
    pub max_message_bytes: usize,
    /// Longest prompt accepted, in characters.
    pub max_prompt_chars: usize,
    /// Largest `metadata` object accepted, in bytes of JSON.
    pub max_metadata_bytes: usize,
    /// Images decoded, resized and encoded at once (variants, transparency checks), on threads
    /// apart from the async ones; 0: one per CPU the process may use.
    pub image_workers: usize,
}

impl WorkerSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        in_range("worker.concurrency", self.concurrency as u64, 1, 1024)?;
        in_range("worker.threads", self.threads as u64, 0, 256)?;
        in_range("worker.image_workers", self.image_workers as u64, 0, 256)?;
        if self.prefetch != 0 {
            in_range("worker.prefetch", self.prefetch as u64, 1, 2000)?;
        }
        in_range(
            "worker.answer_memory_bytes",
            self.answer_memory_bytes as u64,
            1 << 20,
            1 << 40,
        )?;
        in_range(
            "worker.shutdown_grace_secs",
            self.shutdown_grace_secs,
            0,
            3600,
        )?;
        in_range("worker.pause_probe_secs", self.pause_probe_secs, 1, 86_400)?;
        in_range("worker.pending_hold_secs", self.pending_hold_secs, 0, 600)?;
        in_range("worker.lease_secs", self.lease_secs, 2, 3600)?;
        in_range(
            "worker.max_lease_takeovers",
            self.max_lease_takeovers as u64,
            0,
            1000,
        )?;
        in_range(
            "worker.max_message_bytes",
            self.max_message_bytes as u64,
            1024,
            16 << 20,
        )?;
        in_range(
            "worker.max_prompt_chars",
            self.max_prompt_chars as u64,
            1,
            1_000_000,
        )?;
        in_range(
            "worker.max_metadata_bytes",
            self.max_metadata_bytes as u64,
            2,
            1 << 20,
        )
    }
}

/// `[retry]` (and a provider's own `retry` table): retries of provider calls and uploads.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    /// Attempts (the first one included) before a job fails as `retries_exhausted`.
    pub max_attempts: u32,
    /// First backoff delay, doubled on each retry, with full jitter.
    pub initial_delay_ms: u64,
    /// Cap on one backoff delay.
    pub max_delay_ms: u64,
    /// Cap on the sum of the waits of one job, server-given delays included.
    pub max_total_delay_secs: u64,
    /// Longest wait slept while holding a job's message; a longer one goes to a delay queue.
    pub max_in_process_wait_secs: u64,
    /// Retries after a failure that may have been billed.
    pub max_possibly_billed_retries: u32,
}

impl RetrySettings {
    /// `section`: where these settings come from, for messages (`retry`, `providers.x.retry`).
    pub(super) fn validate(&self, section: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{section}.{name}");
        in_range(key("max_attempts"), self.max_attempts as u64, 1, 100)?;
        in_range(key("initial_delay_ms"), self.initial_delay_ms, 1, 600_000)?;
        in_range(
            key("max_delay_ms"),
            self.max_delay_ms,
            self.initial_delay_ms,
            3_600_000,
        )?;
        in_range(
            key("max_total_delay_secs"),
            self.max_total_delay_secs,
            0,
            86_400,
        )?;
        in_range(
            key("max_in_process_wait_secs"),
            self.max_in_process_wait_secs,
            0,
            600,
        )?;
        in_range(
            key("max_possibly_billed_retries"),
            self.max_possibly_billed_retries as u64,
            0,
            10,
        )
    }
}

/// `[limits]` (and a provider's own `limits` table): how fast a provider is called.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    /// Requests per minute this process may send; 0: no local cap.
    pub requests_per_minute: u64,
    /// Images per minute this process may ask for; 0: no local cap.
    pub images_per_minute: u64,
    /// Seconds of the rate each bucket holds: the largest burst after an idle spell.
    pub burst_secs: u64,
    /// false: a fixed concurrency of `initial_concurrency` (or the provider's concurrency).
    pub adaptive: bool,
    /// The adaptive limit never goes below this.
    pub min_concurrency: usize,
    /// Where the limit starts; 0: the provider's concurrency.
    pub initial_concurrency: usize,
    /// Multiplier applied to the limit on a 429 or a 503.
    pub decrease_ratio: f64,
    /// A round trip this much slower than the moving average (and 500 ms more) is pushback.
    pub latency_threshold: f64,
    /// Fraction of a reported rate limit below which calls are paced; 0: no pacing.
    pub pacing_reserve: f64,
    /// How often the throttle's state is logged when it changed.
    pub log_every_secs: u64,
}

impl LimitsSettings {
    /// `concurrency`: the provider's, which bounds the adaptive limit.
    pub(super) fn validate(&self, section: &str, concurrency: usize) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{section}.{name}");
        in_range(
            key("requests_per_minute"),
            self.requests_per_minute,
            0,
            10_000_000,
        )?;
        in_range(
            key("images_per_minute"),
            self.images_per_minute,
            0,
            10_000_000,
        )?;
        in_range(key("burst_secs"), self.burst_secs, 1, 3600)?;
        in_range(
            key("min_concurrency"),
            self.min_concurrency as u64,
            1,
            concurrency as u64,
        )?;
        if self.initial_concurrency != 0 {
            in_range(
                key("initial_concurrency"),
                self.initial_concurrency as u64,
                self.min_concurrency as u64,
                concurrency as u64,
            )?;
        }
        in_unit(key("decrease_ratio"), self.decrease_ratio, false)?;
        in_unit(key("pacing_reserve"), self.pacing_reserve, true)?;
        if !(self.latency_threshold.is_finite() && self.latency_threshold > 0.0) {
            return Err(invalid(
                key("latency_threshold"),
                format!("is {}, must be above 0", self.latency_threshold),
            ));
        }
        in_range(key("log_every_secs"), self.log_every_secs, 1, 86_400)
    }
}

/// `[budget]`: spend caps in USD, from the prices (0: no cap).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    /// What this worker process may spend before it pauses until restarted.
    pub max_worker_usd: f64,
    /// What the whole fleet may spend on one batch before its remaining jobs fail.
    pub max_batch_usd: f64,
    /// How old a worker's view of a batch's spend may be, in seconds.
    pub refresh_secs: f64,
}

impl BudgetSettings {
    /// Whether any cap is set.
    pub fn capped(&self) -> bool {
        self.max_worker_usd > 0.0 || self.max_batch_usd > 0.0
    }

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        for (key, value) in [
            ("budget.max_worker_usd", self.max_worker_usd),
            ("budget.max_batch_usd", self.max_batch_usd),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(invalid(
                    key,
                    format!("is {value}, must be 0 (no cap) or more"),
                ));
            }
        }
        if !(self.refresh_secs.is_finite() && (0.0..=3600.0).contains(&self.refresh_secs)) {
            return Err(invalid(
                "budget.refresh_secs",
                format!("is {}, must be between 0 and 3600", self.refresh_secs),
            ));
        }
        Ok(())
    }
}

/// `[events]`: the result events.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    /// CloudEvents `source` attribute.
    pub source: String,
}

impl EventSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if self.source.trim().is_empty() {
            return Err(invalid("events.source", "must not be empty"));
        }
        Ok(())
    }
}

/// `[http]`: the health and metrics listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    /// Address and port to listen on; empty: no listener.
    pub listen: String,
}

impl HttpSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        if !self.listen.is_empty() && self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "http.listen",
                "must be an address and port (0.0.0.0:9185), or \"\" for no listener",
            ));
        }
        Ok(())
    }
}

/// How logs are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    /// Human-readable on a terminal, JSON otherwise.
    Auto,
    /// One JSON object a line.
    Json,
    /// Human-readable.
    Pretty,
}

/// `[log]`: logging.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// `auto`, `json` or `pretty`.
    pub format: LogFormat,
    /// Default filter when `RUST_LOG` is not set.
    pub level: String,
}

fn check_amqp_name(key: &'static str, name: &str, may_be_empty: bool) -> Result<(), ConfigError> {
    if name.is_empty() && !may_be_empty {
        return Err(invalid(key, "must not be empty"));
    }
    if name.len() > 255 || name.starts_with("amq.") {
        return Err(invalid(
            key,
            "must be at most 255 bytes and must not start with `amq.`",
        ));
    }
    Ok(())
}

//! Typed settings: loaded in layers, validated once at start-up.
//!
//! `config/default.toml` documents every key and its default; it is compiled into the binary, so
//! these structs carry no defaults of their own and the file stays the single source of truth.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

/// The defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

/// Prefix of the environment variables that override any key (`IMAGEGEN__WORKER__CONCURRENCY`).
pub const ENV_PREFIX: &str = "IMAGEGEN";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration could not be read: {0}")]
    Load(#[from] config::ConfigError),
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid { key: &'static str, problem: String },
}

fn invalid(key: &'static str, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        problem: problem.into(),
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    pub amqp: AmqpSettings,
    pub worker: WorkerSettings,
    pub provider: ProviderSettings,
    pub retry: RetrySettings,
    pub limits: LimitsSettings,
    pub budget: BudgetSettings,
    pub storage: StorageSettings,
    pub spool: SpoolSettings,
    pub pricing: crate::cost::PriceTable,
    pub events: EventSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AmqpSettings {
    pub url: SecretString,
    pub declare_topology: bool,
    pub jobs_queue: String,
    pub dead_letter_queue: String,
    pub results_exchange: String,
    pub results_queue: String,
    pub delivery_limit: u32,
    pub delay_tiers_secs: Vec<u64>,
    pub connection_name: String,
    pub connect_timeout_secs: u64,
    pub frame_max: u32,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerSettings {
    pub concurrency: usize,
    pub threads: usize,
    pub prefetch: u16,
    pub shutdown_grace_secs: u64,
    pub pause_probe_secs: u64,
    pub lease_secs: u64,
    pub max_lease_takeovers: u32,
    pub max_message_bytes: usize,
    pub max_prompt_chars: usize,
    pub max_metadata_bytes: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Openai,
    Placeholder,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum AuthScheme {
    Bearer,
    ApiKey,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderSettings {
    pub kind: ProviderKind,
    pub base_url: String,
    pub api_key: SecretString,
    pub auth: AuthScheme,
    pub model: String,
    pub size: String,
    pub quality: String,
    pub output_format: String,
    pub background: String,
    pub response_format: String,
    pub request_timeout_secs: u64,
    pub connect_timeout_secs: u64,
    pub max_response_bytes: usize,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    pub max_attempts: u32,
    pub initial_delay_ms: u64,
    pub max_delay_ms: u64,
    pub max_total_delay_secs: u64,
    pub max_in_process_wait_secs: u64,
    pub max_possibly_billed_retries: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    S3,
    Fs,
}

/// `[http]`: the health and metrics listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpSettings {
    pub listen: String,
}

/// `[budget]`: spend caps (see [`crate::budget`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BudgetSettings {
    pub max_worker_usd: f64,
    pub max_batch_usd: f64,
    pub refresh_secs: f64,
}

/// `[limits]`: how fast the provider is called (see [`crate::throttle`]).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsSettings {
    pub requests_per_minute: u64,
    pub images_per_minute: u64,
    pub burst_secs: u64,
    pub adaptive: bool,
    pub min_concurrency: usize,
    pub initial_concurrency: usize,
    pub decrease_ratio: f64,
    pub latency_threshold: f64,
    pub pacing_reserve: f64,
    pub log_every_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    pub kind: StorageKind,
    pub root: PathBuf,
    pub bucket: String,
    pub prefix: String,
    pub endpoint_url: String,
    pub region: String,
    pub force_path_style: bool,
    pub access_key_id: String,
    pub secret_access_key: SecretString,
    pub request_timeout_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolSettings {
    pub dir: PathBuf,
    pub max_bytes: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EventSettings {
    pub source: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Auto,
    Json,
    Pretty,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    pub format: LogFormat,
    pub level: String,
}

/// Where settings come from besides the compiled-in defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// `APP_ENV`: loads `{config_dir}/{app_env}.toml` when it exists.
    pub app_env: Option<String>,
    /// Directory of the per-environment files (default `config`).
    pub config_dir: Option<PathBuf>,
    /// An explicit file (`--config`); it must exist.
    pub file: Option<PathBuf>,
    /// Read the process environment (standard variables and `IMAGEGEN__*`).
    pub use_env: bool,
}

impl Sources {
    /// The sources a deployed process uses: `APP_ENV`, `IMAGEGEN_CONFIG_DIR`, the environment.
    pub fn from_env(file: Option<PathBuf>) -> Self {
        Self {
            app_env: std::env::var("APP_ENV").ok().filter(|s| !s.is_empty()),
            config_dir: std::env::var_os("IMAGEGEN_CONFIG_DIR").map(PathBuf::from),
            file,
            use_env: true,
        }
    }
}

/// Standard variables of the ecosystem and the keys they set. `IMAGEGEN__*` still wins over them.
const STANDARD_VARS: &[(&str, &str)] = &[
    ("AMQP_URL", "amqp.url"),
    ("OPENAI_API_KEY", "provider.api_key"),
    ("OPENAI_BASE_URL", "provider.base_url"),
];

impl Settings {
    /// Loads and validates the settings.
    pub fn load(sources: &Sources) -> Result<Self, ConfigError> {
        Self::load_with_overrides(sources, &[])
    }

    /// Loads with extra `key = value` overrides applied last (used by tests and subcommands).
    pub fn load_with_overrides(
        sources: &Sources,
        overrides: &[(&str, String)],
    ) -> Result<Self, ConfigError> {
        let mut builder = config::Config::builder().add_source(config::File::from_str(
            DEFAULT_TOML,
            config::FileFormat::Toml,
        ));
        let dir = sources
            .config_dir
            .clone()
            .unwrap_or_else(|| PathBuf::from("config"));
        if let Some(env) = &sources.app_env {
            builder = builder
                .add_source(config::File::from(dir.join(format!("{env}.toml"))).required(false));
        }
        if let Some(file) = &sources.file {
            builder = builder.add_source(config::File::from(file.as_path()).required(true));
        }
        if sources.use_env {
            for (var, key) in STANDARD_VARS {
                let prefixed = format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase());
                if let (Ok(value), Err(_)) = (std::env::var(var), std::env::var(&prefixed))
                    && !value.is_empty()
                {
                    builder = builder.set_override(*key, value)?;
                }
            }
            builder = builder.add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    // IMAGEGEN__AMQP__DELAY_TIERS_SECS=5,30,120
                    .list_separator(",")
                    .with_list_parse_key("amqp.delay_tiers_secs"),
            );
        }
        for (key, value) in overrides {
            builder = builder.set_override(*key, value.as_str())?;
        }
        let settings: Settings = builder.build()?.try_deserialize()?;
        settings.validate()?;
        Ok(settings)
    }

    /// Checks every bound and cross-field rule, naming the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self.amqp.url.expose_secret();
        if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
            return Err(invalid("amqp.url", "must start with amqp:// or amqps://"));
        }
        if url.parse::<lapin::uri::AMQPUri>().is_err() {
            return Err(invalid("amqp.url", "is not a valid AMQP URI"));
        }
        for (key, name) in [
            ("amqp.jobs_queue", &self.amqp.jobs_queue),
            ("amqp.dead_letter_queue", &self.amqp.dead_letter_queue),
            ("amqp.results_exchange", &self.amqp.results_exchange),
        ] {
            check_amqp_name(key, name, false)?;
        }
        check_amqp_name("amqp.results_queue", &self.amqp.results_queue, true)?;
        if self.amqp.jobs_queue == self.amqp.dead_letter_queue {
            return Err(invalid(
                "amqp.dead_letter_queue",
                "must differ from amqp.jobs_queue",
            ));
        }
        in_range(
            "amqp.connect_timeout_secs",
            self.amqp.connect_timeout_secs,
            1,
            600,
        )?;
        // 4096 is AMQP's smallest frame. Above RabbitMQ's default, 128 KiB, only the buffers grow.
        in_range("amqp.frame_max", self.amqp.frame_max.into(), 4096, 131_072)?;

        let w = &self.worker;
        in_range("worker.concurrency", w.concurrency as u64, 1, 1024)?;
        in_range("worker.threads", w.threads as u64, 0, 256)?;
        if w.prefetch != 0 {
            in_range("worker.prefetch", w.prefetch as u64, 1, 2000)?;
            if (w.prefetch as usize) < w.concurrency {
                return Err(invalid(
                    "worker.prefetch",
                    format!(
                        "({}) is below worker.concurrency ({}): provider slots would sit idle",
                        w.prefetch, w.concurrency
                    ),
                ));
            }
        }
        in_range("worker.shutdown_grace_secs", w.shutdown_grace_secs, 0, 3600)?;
        in_range("worker.pause_probe_secs", w.pause_probe_secs, 1, 86_400)?;
        in_range("worker.lease_secs", w.lease_secs, 2, 3600)?;
        in_range(
            "worker.max_lease_takeovers",
            w.max_lease_takeovers as u64,
            0,
            1000,
        )?;
        in_range(
            "worker.max_message_bytes",
            w.max_message_bytes as u64,
            1024,
            16 << 20,
        )?;
        in_range(
            "worker.max_prompt_chars",
            w.max_prompt_chars as u64,
            1,
            1_000_000,
        )?;
        in_range(
            "worker.max_metadata_bytes",
            w.max_metadata_bytes as u64,
            2,
            1 << 20,
        )?;

        let l = &self.limits;
        in_range(
            "limits.requests_per_minute",
            l.requests_per_minute,
            0,
            10_000_000,
        )?;
        in_range(
            "limits.images_per_minute",
            l.images_per_minute,
            0,
            10_000_000,
        )?;
        in_range("limits.burst_secs", l.burst_secs, 1, 3600)?;
        in_range(
            "limits.min_concurrency",
            l.min_concurrency as u64,
            1,
            w.concurrency as u64,
        )?;
        if l.initial_concurrency != 0 {
            in_range(
                "limits.initial_concurrency",
                l.initial_concurrency as u64,
                l.min_concurrency as u64,
                w.concurrency as u64,
            )?;
        }
        in_unit("limits.decrease_ratio", l.decrease_ratio, false)?;
        in_unit("limits.pacing_reserve", l.pacing_reserve, true)?;
        if !(l.latency_threshold.is_finite() && l.latency_threshold > 0.0) {
            return Err(invalid(
                "limits.latency_threshold",
                format!("is {}, must be above 0", l.latency_threshold),
            ));
        }
        in_range("limits.log_every_secs", l.log_every_secs, 1, 86_400)?;

        if !self.http.listen.is_empty() && self.http.listen.parse::<std::net::SocketAddr>().is_err()
        {
            return Err(invalid(
                "http.listen",
                "must be an address and port (0.0.0.0:9185), or \"\" for no listener",
            ));
        }
        let b = &self.budget;
        for (key, value) in [
            ("budget.max_worker_usd", b.max_worker_usd),
            ("budget.max_batch_usd", b.max_batch_usd),
        ] {
            if !(value.is_finite() && value >= 0.0) {
                return Err(invalid(
                    key,
                    format!("is {value}, must be 0 (no cap) or more"),
                ));
            }
        }
        if !(b.refresh_secs.is_finite() && (0.0..=3600.0).contains(&b.refresh_secs)) {
            return Err(invalid(
                "budget.refresh_secs",
                format!("is {}, must be between 0 and 3600", b.refresh_secs),
            ));
        }
        if (b.max_worker_usd > 0.0 || b.max_batch_usd > 0.0)
            && self.pricing.models.is_empty()
            && self.pricing.per_image.is_empty()
        {
            return Err(invalid(
                "budget.max_worker_usd",
                "a spend cap needs prices: [[pricing.models]] or [[pricing.per_image]] is empty",
            ));
        }

        let p = &self.provider;
        if p.kind == ProviderKind::Openai {
            if !(p.base_url.starts_with("http://") || p.base_url.starts_with("https://")) {
                return Err(invalid(
                    "provider.base_url",
                    "must be an http:// or https:// URL",
                ));
            }
            if reqwest::Url::parse(&p.base_url).is_err() {
                return Err(invalid("provider.base_url", "is not a valid URL"));
            }
            if p.api_key.expose_secret().trim().is_empty() {
                return Err(invalid(
                    "provider.api_key",
                    "is required when provider.kind = \"openai\" (set OPENAI_API_KEY)",
                ));
            }
        }
        if p.model.trim().is_empty() {
            return Err(invalid("provider.model", "must not be empty"));
        }
        if !matches!(p.response_format.as_str(), "" | "url" | "b64_json") {
            return Err(invalid(
                "provider.response_format",
                "must be \"\", \"url\" or \"b64_json\"",
            ));
        }
        in_range(
            "provider.request_timeout_secs",
            p.request_timeout_secs,
            1,
            3600,
        )?;
        in_range(
            "provider.connect_timeout_secs",
            p.connect_timeout_secs,
            1,
            600,
        )?;
        in_range(
            "provider.max_response_bytes",
            p.max_response_bytes as u64,
            1024,
            1 << 32,
        )?;

        let r = &self.retry;
        in_range("retry.max_attempts", r.max_attempts as u64, 1, 100)?;
        in_range("retry.initial_delay_ms", r.initial_delay_ms, 1, 600_000)?;
        in_range(
            "retry.max_delay_ms",
            r.max_delay_ms,
            r.initial_delay_ms,
            3_600_000,
        )?;
        in_range(
            "retry.max_total_delay_secs",
            r.max_total_delay_secs,
            0,
            86_400,
        )?;
        in_range(
            "retry.max_in_process_wait_secs",
            r.max_in_process_wait_secs,
            0,
            600,
        )?;
        in_range(
            "retry.max_possibly_billed_retries",
            r.max_possibly_billed_retries as u64,
            0,
            10,
        )?;
        let tiers = &self.amqp.delay_tiers_secs;
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
        )?;

        let s = &self.storage;
        match s.kind {
            StorageKind::Fs => {
                if s.root.as_os_str().is_empty() {
                    return Err(invalid(
                        "storage.root",
                        "must not be empty when storage.kind = \"fs\"",
                    ));
                }
            }
            StorageKind::S3 => {
                check_bucket(&s.bucket)?;
                if !s.endpoint_url.is_empty() && reqwest::Url::parse(&s.endpoint_url).is_err() {
                    return Err(invalid("storage.endpoint_url", "is not a valid URL"));
                }
                if s.access_key_id.is_empty() != s.secret_access_key.expose_secret().is_empty() {
                    return Err(invalid(
                        "storage.access_key_id",
                        "and storage.secret_access_key must be set together",
                    ));
                }
            }
        }
        if s.prefix.starts_with('/') || s.prefix.split('/').any(|part| part == "..") {
            return Err(invalid(
                "storage.prefix",
                "must be relative and must not contain `..`",
            ));
        }
        in_range(
            "storage.request_timeout_secs",
            s.request_timeout_secs,
            1,
            3600,
        )?;
        in_range("spool.max_bytes", self.spool.max_bytes, 0, 1 << 50)?;
        self.pricing.validate().map_err(|e| invalid("pricing", e))?;
        if self.events.source.trim().is_empty() {
            return Err(invalid("events.source", "must not be empty"));
        }
        Ok(())
    }

    /// The effective prefetch (see `worker.prefetch`).
    pub fn prefetch(&self) -> u16 {
        match self.worker.prefetch {
            0 => {
                let c = self.worker.concurrency;
                (c + c / 4 + 1).min(2000) as u16
            }
            p => p,
        }
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.worker.shutdown_grace_secs)
    }

    /// The delay queue for a wait: the shortest tier that covers it, else the longest.
    pub fn delay_queue(&self, wait: Duration) -> (String, Duration) {
        let tiers = &self.amqp.delay_tiers_secs;
        let secs = tiers
            .iter()
            .copied()
            .find(|t| Duration::from_secs(*t) >= wait)
            .unwrap_or_else(|| tiers.last().copied().unwrap_or(60));
        (self.delay_queue_name(secs), Duration::from_secs(secs))
    }

    pub fn delay_queue_name(&self, secs: u64) -> String {
        format!("{}.delay.{secs}s", self.amqp.jobs_queue)
    }

    /// The AMQP URL with its password masked, for logs.
    pub fn amqp_url_redacted(&self) -> String {
        redact_url(self.amqp.url.expose_secret())
    }
}

fn in_range(key: &'static str, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("is {value}, must be between {min} and {max}"),
        ));
    }
    Ok(())
}

/// A fraction: above 0 (or 0 itself when `zero_ok`) and below 1.
fn in_unit(key: &'static str, value: f64, zero_ok: bool) -> Result<(), ConfigError> {
    let low_ok = if zero_ok { value >= 0.0 } else { value > 0.0 };
    if !(value.is_finite() && low_ok && value < 1.0) {
        let low = if zero_ok { "0 <=" } else { "0 <" };
        return Err(invalid(key, format!("is {value}, must be {low} x < 1")));
    }
    Ok(())
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

fn check_bucket(bucket: &str) -> Result<(), ConfigError> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !ok {
        return Err(invalid(
            "storage.bucket",
            "must be 3-63 characters of lowercase letters, digits, `-` and `.`",
        ));
    }
    Ok(())
}

/// Masks the password of a URL (`amqp://user:****@host/vhost`).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "****".into();
    };
    let (authority, tail) = match rest.find('/') {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{scheme}://{user}:****@{host}{tail}")
        }
        None => url.to_string(),
    }
}

/// Reads a settings file for tests and tools without touching the process environment.
pub fn load_file(path: &Path) -> Result<Settings, ConfigError> {
    Settings::load(&Sources {
        file: Some(path.to_path_buf()),
        ..Sources::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn defaults() -> Settings {
        Settings::load(&Sources::default()).expect("defaults are valid")
    }

    #[test]
    fn embedded_defaults_are_valid_and_offline() {
        let s = defaults();
        assert_eq!(s.provider.kind, ProviderKind::Placeholder);
        assert_eq!(s.storage.kind, StorageKind::Fs);
        assert_eq!(s.amqp.jobs_queue, "imagegen.jobs");
        assert_eq!(s.worker.concurrency, 8);
        assert_eq!(s.worker.threads, 0);
        // 8 + 2 + 1: a little above the provider concurrency.
        assert_eq!(s.prefetch(), 11);
    }

    #[test]
    fn overrides_apply_and_are_typed() {
        let s = Settings::load_with_overrides(
            &Sources::default(),
            &[
                ("worker.concurrency", "32".into()),
                ("worker.prefetch", "40".into()),
            ],
        )
        .unwrap();
        assert_eq!(s.worker.concurrency, 32);
        assert_eq!(s.prefetch(), 40);
    }

    fn error_of(overrides: &[(&str, String)]) -> String {
        Settings::load_with_overrides(&Sources::default(), overrides)
            .expect_err("must be rejected")
            .to_string()
    }

    #[test]
    fn invalid_values_name_the_key() {
        assert!(error_of(&[("worker.concurrency", "0".into())]).contains("worker.concurrency"));
        assert!(error_of(&[("worker.threads", "257".into())]).contains("worker.threads"));
        assert!(error_of(&[("amqp.frame_max", "4095".into())]).contains("amqp.frame_max"));
        assert!(error_of(&[("amqp.frame_max", "131073".into())]).contains("amqp.frame_max"));
        assert!(error_of(&[("amqp.url", "http://x".into())]).contains("amqp.url"));
        assert!(
            error_of(&[
                ("worker.concurrency", "16".into()),
                ("worker.prefetch", "4".into())
            ])
            .contains("worker.prefetch")
        );
        assert!(error_of(&[("provider.kind", "openai".into())]).contains("provider.api_key"));
        assert!(
            error_of(&[
                ("storage.kind", "s3".into()),
                ("storage.bucket", "Bad_Bucket".into())
            ])
            .contains("storage.bucket")
        );
        assert!(error_of(&[("storage.prefix", "../up".into())]).contains("storage.prefix"));
        assert!(error_of(&[("provider.kind", "dalle".into())]).contains("kind"));
    }

    #[test]
    fn delay_tiers_pick_the_shortest_that_covers_the_wait() {
        let s = defaults();
        assert_eq!(
            s.delay_queue(Duration::from_secs(3)),
            ("imagegen.jobs.delay.5s".into(), Duration::from_secs(5))
        );
        assert_eq!(
            s.delay_queue(Duration::from_secs(31)).1,
            Duration::from_secs(120)
        );
        assert_eq!(
            s.delay_queue(Duration::from_secs(99_999)).1,
            Duration::from_secs(1800)
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.toml");
        std::fs::write(&file, "[amqp]\ndelay_tiers_secs = [30, 10]\n").unwrap();
        let err = load_file(&file).unwrap_err().to_string();
        assert!(err.contains("amqp.delay_tiers_secs"), "{err}");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("x.toml");
        std::fs::write(&file, "[worker]\nconcurency = 3\n").unwrap();
        let err = load_file(&file).unwrap_err().to_string();
        assert!(err.contains("concurency"), "{err}");
    }

    #[test]
    fn environment_file_layers_over_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("staging.toml"),
            "[worker]\nconcurrency = 3\n",
        )
        .unwrap();
        let s = Settings::load(&Sources {
            app_env: Some("staging".into()),
            config_dir: Some(dir.path().to_path_buf()),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.worker.concurrency, 3);
        // A missing environment file is not an error.
        let s = Settings::load(&Sources {
            app_env: Some("nowhere".into()),
            config_dir: Some(dir.path().to_path_buf()),
            ..Sources::default()
        })
        .unwrap();
        assert_eq!(s.worker.concurrency, 8);
        assert_eq!(s.worker.threads, 0);
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let s = Settings::load_with_overrides(
            &Sources::default(),
            &[
                ("provider.api_key", "sk-very-secret".into()),
                ("amqp.url", "amqp://bob:hunter2@rabbit:5672/%2f".into()),
                ("storage.secret_access_key", "s3-secret".into()),
                ("storage.access_key_id", "AKID".into()),
            ],
        )
        .unwrap();
        let debug = format!("{s:?}");
        for secret in ["sk-very-secret", "hunter2", "s3-secret"] {
            assert!(!debug.contains(secret), "{secret} leaked: {debug}");
        }
        assert_eq!(s.amqp_url_redacted(), "amqp://bob:****@rabbit:5672/%2f");
    }
}

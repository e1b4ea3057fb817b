//! Typed settings: loaded in layers, validated once at start-up.
//!
//! `config/default.toml` documents every key and its default; it is compiled into the binary, so
//! these structs carry no defaults of their own and the file stays the single source of truth.
//! Each section checks itself ([`sections`]); the providers are resolved from their tables
//! ([`providers`]).

pub mod azure;
mod checks;
pub mod kinds;
pub mod lane;
pub mod providers;
pub mod references;
pub mod sections;
pub mod selfhosted;
pub mod storage;

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Deserialize;

pub use lane::{LaneSettings, Unfinished};
pub use providers::{
    AuthScheme, AzureAuth, AzureOpenAiSettings, AzureSurface, BflSettings, FalSettings,
    GeminiSettings, KindSettings, OpenAiSettings, PlaceholderSettings, ProviderDefaults,
    ProviderKind, ProviderSettings, ReplicateSettings, StabilitySettings,
};
pub use references::ReferenceSettings;
pub use sections::{
    AmqpSettings, BudgetSettings, EventSettings, HttpSettings, LimitsSettings, LogFormat,
    LogSettings, RetrySettings, WorkerSettings,
};
pub use selfhosted::{Automatic1111Settings, ComfyUiInputs, ComfyUiSettings};
pub use storage::{SpoolSettings, StorageKind, StorageSettings};

use crate::domain::cost::PriceTable;
use crate::domain::job::JobRules;

/// The defaults, compiled in.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// Prefix of the environment variables that override any key (`IMAGEGEN__WORKER__CONCURRENCY`).
pub const ENV_PREFIX: &str = "IMAGEGEN";

/// Why the settings cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A layer could not be read or parsed.
    #[error("configuration could not be read: {0}")]
    Load(#[from] config::ConfigError),
    /// A value breaks a rule; `key` names it.
    #[error("invalid configuration: `{key}` {problem}")]
    Invalid {
        /// The key at fault (`worker.concurrency`, `providers.openai.api_key`).
        key: String,
        /// What is wrong with it.
        problem: String,
    },
}

fn invalid(key: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        problem: problem.into(),
    }
}

/// Every setting of a worker or a command.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// `[amqp]`.
    pub amqp: AmqpSettings,
    /// `[worker]`.
    pub worker: WorkerSettings,
    /// `[retry]`: the retries of every provider that has no `retry` table of its own, and of
    /// uploads.
    pub retry: RetrySettings,
    /// `[limits]`: the rate limits of every provider that has no `limits` table of its own.
    pub limits: LimitsSettings,
    /// `[budget]`.
    pub budget: BudgetSettings,
    /// `[storage]`.
    pub storage: StorageSettings,
    /// `[spool]`.
    pub spool: SpoolSettings,
    /// `[references]`: reading a job's reference images.
    pub references: ReferenceSettings,
    /// `[lane]`: the batch lane (a provider's batch API).
    pub lane: LaneSettings,
    /// `[pricing]`: the prices of every provider that has no `pricing` table of its own.
    pub pricing: PriceTable,
    /// `[events]`.
    pub events: EventSettings,
    /// `[http]`.
    pub http: HttpSettings,
    /// `[log]`.
    pub log: LogSettings,
    /// `[provider_defaults.KIND]`: what each kind's keys default to.
    pub provider_defaults: ProviderDefaults,
    /// The configured providers, resolved from `[providers.NAME]` (and the `[provider]` of
    /// earlier releases) by [`providers::resolve`], sorted by name.
    #[serde(skip)]
    pub providers: Vec<ProviderSettings>,
    /// What start-up should warn about (deprecated keys); logged once logging is set up.
    #[serde(skip)]
    pub warnings: Vec<String>,
}

/// The tables [`providers::resolve`] reads, not serde.
const PROVIDER_TABLES: &[&str] = &["providers", "provider"];

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
    /// With `use_env`: these variables instead of the process's (tests, tools). `None`: the
    /// process's own.
    pub env: Option<Vec<(String, String)>>,
}

impl Sources {
    /// The sources a deployed process uses: `APP_ENV`, `IMAGEGEN_CONFIG_DIR`, the environment.
    pub fn from_env(file: Option<PathBuf>) -> Self {
        Self {
            app_env: std::env::var("APP_ENV").ok().filter(|s| !s.is_empty()),
            config_dir: std::env::var_os("IMAGEGEN_CONFIG_DIR").map(PathBuf::from),
            file,
            use_env: true,
            env: None,
        }
    }
}

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
        // The standard variables set keys of a provider whose presence only the other layers
        // tell: a first build finds it.
        let first = Self::build(sources, overrides, &[])?;
        let mut standard: Vec<(String, String)> = Vec::new();
        if sources.use_env {
            standard.push(("AMQP_URL".into(), "amqp.url".into()));
            if let Some(target) = providers::openai_vars_target(&first) {
                for (var, key) in providers::OPENAI_VARS {
                    standard.push(((*var).into(), format!("{target}.{key}")));
                }
            }
        }
        let cfg = if standard.is_empty() {
            first
        } else {
            Self::build(sources, overrides, &standard)?
        };
        let mut root: config::Map<String, config::Value> = cfg.clone().try_deserialize()?;
        for table in PROVIDER_TABLES {
            root.remove(*table);
        }
        providers::commas_to_lists(&mut root);
        let mut settings: Settings =
            config::Value::new(None, config::ValueKind::Table(root)).try_deserialize()?;
        // The sections the providers are resolved against, first: their own keys are named.
        settings.validate_sections()?;
        let resolved = providers::resolve(&cfg, &settings.worker)?;
        settings.providers = resolved.providers;
        settings.worker.default_provider = resolved.default;
        settings.warnings = resolved.warnings;
        settings.validate()?;
        Ok(settings)
    }

    /// The layers, in order. `standard`: (variable, key) pairs of the ecosystem's variables;
    /// `IMAGEGEN__*` still wins over them.
    fn build(
        sources: &Sources,
        overrides: &[(&str, String)],
        standard: &[(String, String)],
    ) -> Result<config::Config, ConfigError> {
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
            let vars: Vec<(String, String)> = sources
                .env
                .clone()
                .unwrap_or_else(|| std::env::vars().collect());
            let set = |name: &str| {
                vars.iter()
                    .any(|(n, _)| n == name || *n == format!("{name}_FILE"))
            };
            for (var, key) in standard {
                let prefixed = format!("{ENV_PREFIX}__{}", key.replace('.', "__").to_uppercase());
                if set(&prefixed) {
                    continue;
                }
                if let Some(value) = env_or_file(&vars, var)?
                    && !value.is_empty()
                {
                    builder = builder.set_override(key.as_str(), value)?;
                }
            }
            // IMAGEGEN__SECTION__KEY_FILE=/run/secrets/key sets section.key to the file's text.
            let mut plain = config::Map::new();
            let mut from_files = Vec::new();
            for (name, value) in &vars {
                let Some(rest) = name.strip_prefix(&format!("{ENV_PREFIX}__")) else {
                    continue;
                };
                match rest.strip_suffix("_FILE") {
                    Some(base) => {
                        if vars
                            .iter()
                            .any(|(n, _)| *n == format!("{ENV_PREFIX}__{base}"))
                        {
                            return Err(invalid(
                                name.clone(),
                                format!("is set beside {ENV_PREFIX}__{base}: set one of them"),
                            ));
                        }
                        let key = base.to_lowercase().replace("__", ".");
                        from_files.push((key, read_secret_file(name, value)?));
                    }
                    None => {
                        plain.insert(name.clone(), value.clone());
                    }
                }
            }
            builder = builder.add_source(
                config::Environment::with_prefix(ENV_PREFIX)
                    .prefix_separator("__")
                    .separator("__")
                    .try_parsing(true)
                    // IMAGEGEN__AMQP__DELAY_TIERS_SECS=5,30,120
                    .list_separator(",")
                    .with_list_parse_key("amqp.delay_tiers_secs")
                    .source(Some(plain)),
            );
            for (key, value) in from_files {
                builder = builder.set_override(key, value)?;
            }
        }
        for (key, value) in overrides {
            builder = builder.set_override(*key, value.as_str())?;
        }
        Ok(builder.build()?)
    }

    /// Checks every bound and cross-field rule, naming the key at fault. (Each provider's own
    /// keys were checked when its table was read.)
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.validate_sections()?;
        self.validate_across()
    }

    /// Each section on its own.
    fn validate_sections(&self) -> Result<(), ConfigError> {
        self.amqp.validate()?;
        self.worker.validate()?;
        self.retry.validate("retry")?;
        self.limits.validate("limits", self.worker.concurrency)?;
        self.budget.validate()?;
        self.storage.validate()?;
        self.spool.validate()?;
        self.references.validate()?;
        self.lane.validate()?;
        self.events.validate()?;
        self.http.validate()?;
        self.pricing.validate().map_err(|e| invalid("pricing", e))
    }

    /// The rules between sections and providers.
    fn validate_across(&self) -> Result<(), ConfigError> {
        if self.worker.prefetch != 0 && (self.worker.prefetch as usize) < self.concurrency() {
            return Err(invalid(
                "worker.prefetch",
                format!(
                    "({}) is below the providers' concurrency ({}): provider slots would sit idle",
                    self.worker.prefetch,
                    self.concurrency()
                ),
            ));
        }
        if self.budget.capped()
            && let Some(p) = self.providers.iter().find(|p| p.pricing.is_empty())
        {
            return Err(invalid(
                "budget.max_worker_usd",
                format!(
                    "a spend cap needs prices: provider {} has none ([pricing] or its own \
                     pricing table is empty)",
                    p.name
                ),
            ));
        }
        self.validate_lane_provider()?;
        if !self
            .providers
            .iter()
            .any(|p| p.name == self.worker.default_provider)
        {
            return Err(invalid(
                "worker.default_provider",
                format!(
                    "{:?} is not a configured provider",
                    self.worker.default_provider
                ),
            ));
        }
        Ok(())
    }

    /// A configured provider by name.
    pub fn provider(&self, name: &str) -> Option<&ProviderSettings> {
        self.providers.iter().find(|p| p.name == name)
    }

    /// The provider of jobs that name none.
    pub fn default_provider(&self) -> &ProviderSettings {
        self.provider(&self.worker.default_provider)
            .or(self.providers.first())
            .expect("settings have at least one provider")
    }

    /// Provider calls this worker may have in flight at once, all providers together.
    pub fn concurrency(&self) -> usize {
        self.providers.iter().map(|p| p.concurrency).sum()
    }

    /// The bounds a job must keep to, and the providers it may choose.
    pub fn job_rules(&self) -> JobRules {
        JobRules {
            max_message_bytes: self.worker.max_message_bytes,
            max_prompt_chars: self.worker.max_prompt_chars,
            max_metadata_bytes: self.worker.max_metadata_bytes,
            providers: self.providers.iter().map(|p| p.name.clone()).collect(),
        }
    }

    /// The effective prefetch (see `worker.prefetch`): a little above the concurrency, so that
    /// uploads and confirms overlap the next provider calls.
    pub fn prefetch(&self) -> u16 {
        match self.worker.prefetch {
            0 => {
                let c = self.concurrency();
                (c + c / 4 + 1).min(2000) as u16
            }
            p => p,
        }
    }

    /// How long in-flight jobs get after a stop request.
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

    /// The name of the delay queue of a tier.
    pub fn delay_queue_name(&self, secs: u64) -> String {
        format!("{}.delay.{secs}s", self.amqp.jobs_queue)
    }

    /// The AMQP URL with its password masked, for logs.
    pub fn amqp_url_redacted(&self) -> String {
        self.amqp
            .url
            .expose_secret()
            .split(',')
            .map(|u| redact_url(u.trim()))
            .collect::<Vec<_>>()
            .join(",")
    }
}

fn in_range(key: impl Into<String>, value: u64, min: u64, max: u64) -> Result<(), ConfigError> {
    if value < min || value > max {
        return Err(invalid(
            key,
            format!("is {value}, must be between {min} and {max}"),
        ));
    }
    Ok(())
}

/// A fraction: above 0 (or 0 itself when `zero_ok`) and below 1.
fn in_unit(key: impl Into<String>, value: f64, zero_ok: bool) -> Result<(), ConfigError> {
    let low_ok = if zero_ok { value >= 0.0 } else { value > 0.0 };
    if !(value.is_finite() && low_ok && value < 1.0) {
        let low = if zero_ok { "0 <=" } else { "0 <" };
        return Err(invalid(key, format!("is {value}, must be {low} x < 1")));
    }
    Ok(())
}

/// Masks the password of a URL (`amqp://user:****@host/vhost`).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "****".into();
    };
    // The password may hold any character, `/`, `?`, `#` and `@` included (not all users
    // percent-encode it): everything up to the last `@` is user information. Hiding too much
    // (a path with an `@`) is the safe way to be wrong.
    match rest.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split(':').next().unwrap_or("");
            let user = if user.contains(['/', '?', '#']) {
                "****"
            } else {
                user
            };
            format!("{scheme}://{user}:****@{host}")
        }
        None => url.to_string(),
    }
}

/// The value of variable `var`, or the text of the file that `{var}_FILE` names (as mounted
/// from a Kubernetes Secret); `None` when neither is set.
fn env_or_file(vars: &[(String, String)], var: &str) -> Result<Option<String>, ConfigError> {
    let get = |name: &str| vars.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let file_var = format!("{var}_FILE");
    match (get(var), get(&file_var)) {
        (Some(_), Some(_)) => Err(invalid(
            file_var,
            format!("is set beside {var}: set one of them"),
        )),
        (Some(value), None) => Ok(Some(value)),
        (None, Some(path)) => read_secret_file(&file_var, &path).map(Some),
        (None, None) => Ok(None),
    }
}

/// A secret from a file: its text without the final line break. The error names the variable
/// and the path, never the content.
fn read_secret_file(var: &str, path: &str) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        invalid(
            var.to_string(),
            format!("names {path}, which cannot be read: {e}"),
        )
    })?;
    let text = text.strip_suffix('\n').unwrap_or(&text);
    Ok(text.strip_suffix('\r').unwrap_or(text).to_string())
}

/// Reads a settings file for tests and tools without touching the process environment.
pub fn load_file(path: &Path) -> Result<Settings, ConfigError> {
    Settings::load(&Sources {
        file: Some(path.to_path_buf()),
        ..Sources::default()
    })
}

#[cfg(test)]
mod tests;

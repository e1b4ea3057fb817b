//! The start-up checks of each kind's keys ([`KindKeys`]), and those the HTTP kinds share.

use secrecy::{ExposeSecret, SecretString};

use super::kinds::{
    Automatic1111Settings, AzureOpenAiSettings, BflSettings, ComfyUiSettings, FalSettings,
    GeminiSettings, OpenAiSettings, PlaceholderSettings, ReplicateSettings, StabilitySettings,
};
use super::{ConfigError, in_range, invalid};

/// The keys every HTTP provider has: its base URL, key, default model, timeouts
/// (`[request_timeout_secs, connect_timeout_secs]`) and answer size limit.
pub(super) fn validate_http(
    section: &str,
    base_url: &str,
    api_key: &SecretString,
    model: &str,
    [request_timeout_secs, connect_timeout_secs]: [u64; 2],
    max_response_bytes: usize,
) -> Result<(), ConfigError> {
    let key = |name: &str| format!("{section}.{name}");
    if !(base_url.starts_with("http://") || base_url.starts_with("https://")) {
        return Err(invalid(
            key("base_url"),
            "must be an http:// or https:// URL",
        ));
    }
    if reqwest::Url::parse(base_url).is_err() {
        return Err(invalid(key("base_url"), "is not a valid URL"));
    }
    if api_key.expose_secret().trim().is_empty() {
        let name = section.trim_start_matches("providers.").to_uppercase();
        let hint = if name == "OPENAI" {
            "set OPENAI_API_KEY or IMAGEGEN__PROVIDERS__OPENAI__API_KEY".to_string()
        } else {
            format!("set IMAGEGEN__PROVIDERS__{name}__API_KEY")
        };
        return Err(invalid(key("api_key"), format!("is required ({hint})")));
    }
    if model.trim().is_empty() {
        return Err(invalid(key("model"), "must not be empty"));
    }
    validate_limits(
        section,
        [request_timeout_secs, connect_timeout_secs],
        max_response_bytes,
    )
}

/// A provider's timeouts (`[request_timeout_secs, connect_timeout_secs]`) and answer size limit.
pub(super) fn validate_limits(
    section: &str,
    [request_timeout_secs, connect_timeout_secs]: [u64; 2],
    max_response_bytes: usize,
) -> Result<(), ConfigError> {
    let key = |name: &str| format!("{section}.{name}");
    in_range(key("request_timeout_secs"), request_timeout_secs, 1, 3600)?;
    in_range(key("connect_timeout_secs"), connect_timeout_secs, 1, 600)?;
    in_range(
        key("max_response_bytes"),
        max_response_bytes as u64,
        1024,
        1 << 32,
    )
}

/// The keys of one kind, deserialised from `[provider_defaults.KIND]` and the provider's table.
pub(super) trait KindKeys: serde::de::DeserializeOwned {
    /// What the keys become before they are checked (the environment's part filled in).
    fn prepared(self) -> Self {
        self
    }

    /// Checks the keys at start-up; `section` names the provider's table in errors.
    fn check(&self, section: &str) -> Result<(), ConfigError>;
}

impl KindKeys for OpenAiSettings {
    fn check(&self, section: &str) -> Result<(), ConfigError> {
        validate_http(
            section,
            &self.base_url,
            &self.api_key,
            &self.model,
            [self.request_timeout_secs, self.connect_timeout_secs],
            self.max_response_bytes,
        )?;
        if !matches!(self.response_format.as_str(), "" | "url" | "b64_json") {
            return Err(invalid(
                format!("{section}.response_format"),
                "must be \"\", \"url\" or \"b64_json\"",
            ));
        }
        Ok(())
    }
}

impl KindKeys for PlaceholderSettings {
    fn check(&self, section: &str) -> Result<(), ConfigError> {
        if self.model.trim().is_empty() {
            return Err(invalid(format!("{section}.model"), "must not be empty"));
        }
        Ok(())
    }
}

impl KindKeys for GeminiSettings {
    fn check(&self, section: &str) -> Result<(), ConfigError> {
        validate_http(
            section,
            &self.base_url,
            &self.api_key,
            &self.model,
            [self.request_timeout_secs, self.connect_timeout_secs],
            self.max_response_bytes,
        )
    }
}

impl KindKeys for BflSettings {
    fn check(&self, section: &str) -> Result<(), ConfigError> {
        validate_http(
            section,
            &self.base_url,
            &self.api_key,
            &self.model,
            [self.request_timeout_secs, self.connect_timeout_secs],
            self.max_response_bytes,
        )?;
        in_range(
            format!("{section}.max_active"),
            self.max_active as u64,
            1,
            1024,
        )?;
        validate_polls(section, self.poll_min_ms, self.poll_max_secs)?;
        validate_format(section, &self.output_format, &["png", "jpeg"])
    }
}

impl KindKeys for AzureOpenAiSettings {
    fn prepared(self) -> Self {
        self.with_environment()
    }

    fn check(&self, section: &str) -> Result<(), ConfigError> {
        self.validate(section)
    }
}

impl KindKeys for StabilitySettings {
    fn check(&self, section: &str) -> Result<(), ConfigError> {
        validate_http(
            section,
            &self.base_url,
            &self.api_key,
            &self.model,
            [self.request_timeout_secs, self.connect_timeout_secs],
            self.max_response_bytes,
        )?;
        in_range(
            format!("{section}.rate_limit_wait_secs"),
            self.rate_limit_wait_secs,
            1,
            3600,
        )?;
        validate_format(section, &self.output_format, &["png", "jpeg", "webp"])
    }
}

impl KindKeys for ReplicateSettings {
    fn check(&self, section: &str) -> Result<(), ConfigError> {
        validate_http(
            section,
            &self.base_url,
            &self.api_key,
            &self.model,
            [self.request_timeout_secs, self.connect_timeout_secs],
            self.max_response_bytes,
        )?;
        validate_polls(section, self.poll_min_ms, self.poll_max_secs)?;
        in_range(
            format!("{section}.images_per_call"),
            self.images_per_call.into(),
            1,
            10,
        )?;
        validate_format(section, &self.output_format, &["png", "jpeg", "webp"])
    }
}

impl KindKeys for FalSettings {
    fn check(&self, section: &str) -> Result<(), ConfigError> {
        validate_http(
            section,
            &self.base_url,
            &self.api_key,
            &self.model,
            [self.request_timeout_secs, self.connect_timeout_secs],
            self.max_response_bytes,
        )?;
        validate_polls(section, self.poll_min_ms, self.poll_max_secs)?;
        validate_format(section, &self.output_format, &["png", "jpeg"])
    }
}

impl KindKeys for ComfyUiSettings {
    fn check(&self, section: &str) -> Result<(), ConfigError> {
        self.validate(section)
    }
}

impl KindKeys for Automatic1111Settings {
    fn check(&self, section: &str) -> Result<(), ConfigError> {
        self.validate(section)
    }
}

/// A kind's `output_format`: one of `allowed`.
fn validate_format(section: &str, format: &str, allowed: &[&str]) -> Result<(), ConfigError> {
    if allowed.contains(&format) {
        return Ok(());
    }
    let names: Vec<String> = allowed.iter().map(|f| format!("\"{f}\"")).collect();
    let list = match names.split_last() {
        Some((last, [])) => last.clone(),
        Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
        None => String::new(),
    };
    Err(invalid(
        format!("{section}.output_format"),
        format!("must be {list}"),
    ))
}

/// The poll backoff of a submit-and-poll kind: `poll_min_ms` and `poll_max_secs`.
pub(super) fn validate_polls(
    section: &str,
    poll_min_ms: u64,
    poll_max_secs: u64,
) -> Result<(), ConfigError> {
    let key = |name: &str| format!("{section}.{name}");
    in_range(key("poll_min_ms"), poll_min_ms, 100, 60_000)?;
    in_range(key("poll_max_secs"), poll_max_secs, 1, 600)?;
    if poll_max_secs * 1000 < poll_min_ms {
        return Err(invalid(
            key("poll_max_secs"),
            "must be at least poll_min_ms",
        ));
    }
    Ok(())
}

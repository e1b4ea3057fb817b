//! `[providers.NAME]`: the image providers a worker can call, each of a `kind`.
//!
//! A provider's table holds the keys of its kind and, optionally, what it does differently from
//! the worker's own sections: `concurrency` (default `worker.concurrency`), and `limits`,
//! `retry` and `pricing` tables whose keys replace those of `[limits]`, `[retry]` and
//! `[pricing]`. Keys of its kind that it leaves out come from `[provider_defaults.KIND]`, where
//! `config/default.toml` documents every key of every kind.
//!
//! Names match `[a-z][a-z0-9_]*`, so `IMAGEGEN__PROVIDERS__NAME__KEY` overrides work. With no
//! `[providers]` at all, one provider named `placeholder` of kind `placeholder` is configured:
//! the embedded default needs no key and no network.
//!
//! The section `[provider]` of earlier releases (one provider, flat keys) is still read, as a
//! provider named after its kind, with a warning that names the keys to use instead.

use std::collections::BTreeSet;

use config::{Map, Value, ValueKind};
use serde::de::DeserializeOwned;

use super::checks::KindKeys;
pub use super::kinds::{
    AuthScheme, AzureAuth, AzureOpenAiSettings, AzureSurface, BflSettings, FalSettings,
    GeminiSettings, KindSettings, OpenAiSettings, PlaceholderSettings, ProviderDefaults,
    ProviderKind, ReplicateSettings, StabilitySettings,
};
use super::sections::{LimitsSettings, RetrySettings, WorkerSettings};
use super::{ConfigError, in_range, invalid};
use crate::domain::cost::PriceTable;
use crate::domain::job::RESERVED_PARAMS;

/// One configured provider, resolved: its kind's keys, and the worker's sections with its own
/// changes applied.
#[derive(Debug, Clone)]
pub struct ProviderSettings {
    /// The name jobs choose it by (`provider` in a job).
    pub name: String,
    /// Its kind and the kind's keys.
    pub kind: KindSettings,
    /// Calls in flight at once.
    pub concurrency: usize,
    /// How fast it is called.
    pub limits: LimitsSettings,
    /// How its calls are retried.
    pub retry: RetrySettings,
    /// Its prices.
    pub pricing: PriceTable,
    /// Fields of a job's `params` this provider accepts beyond those its kind takes (a host
    /// that speaks a kind's protocol with fields of its own). Never a field the worker controls.
    pub params_allowed: Vec<String>,
    /// The providers a job moves to, in order, when this one is out of service for it (paused
    /// for quota, credits or credentials, or retries exhausted on transient errors).
    pub fallback: Vec<String>,
    /// Whether a content refusal moves the job to the fallback providers too (default: no, it
    /// fails the job).
    pub fallback_on_refusal: bool,
}

/// What [`resolve`] makes of the `[providers]` tables.
pub(super) struct Resolved {
    pub providers: Vec<ProviderSettings>,
    pub default: String,
    pub warnings: Vec<String>,
}

/// The environment variable and the key it sets on the provider named `openai` (or on the
/// `[provider]` of earlier releases).
pub(super) const OPENAI_VARS: &[(&str, &str)] = &[
    ("OPENAI_API_KEY", "api_key"),
    ("OPENAI_BASE_URL", "base_url"),
];

/// Where the `OPENAI_*` variables go: the `[provider]` of earlier releases when there is one,
/// else the provider named `openai` when there is one.
pub(super) fn openai_vars_target(cfg: &config::Config) -> Option<&'static str> {
    if cfg.get_table("provider").is_ok() {
        Some("provider")
    } else if cfg.get_table("providers.openai").is_ok() {
        Some("providers.openai")
    } else {
        None
    }
}

/// Reads every provider's table, applies its kind's defaults and the worker's sections, and
/// names the default provider.
pub(super) fn resolve(
    cfg: &config::Config,
    worker: &WorkerSettings,
) -> Result<Resolved, ConfigError> {
    let mut warnings = Vec::new();
    let mut tables: Vec<(String, Map<String, Value>)> = match cfg.get_table("providers") {
        Ok(t) => t
            .into_iter()
            .map(|(name, v)| {
                let table = v
                    .into_table()
                    .map_err(|_| invalid(format!("providers.{name}"), "must be a table"))?;
                Ok((name, table))
            })
            .collect::<Result<_, ConfigError>>()?,
        Err(_) => Vec::new(),
    };
    tables.sort_by(|a, b| a.0.cmp(&b.0));
    let mut legacy_name = None;
    if let Ok(legacy) = cfg.get_table("provider") {
        let (name, table, warning) = from_legacy(cfg, legacy)?;
        if tables.iter().any(|(n, _)| *n == name) {
            return Err(invalid(
                "provider",
                format!(
                    "and [providers.{name}] are both set: move the keys of [provider] into \
                     [providers.{name}]"
                ),
            ));
        }
        warnings.push(warning);
        legacy_name = Some(name.clone());
        tables.push((name, table));
    }
    if tables.is_empty() {
        let mut table = Map::new();
        table.insert("kind".into(), Value::from("placeholder"));
        tables.push(("placeholder".into(), table));
    }
    let mut providers = Vec::with_capacity(tables.len());
    for (name, table) in tables {
        providers.push(resolve_one(cfg, worker, name, table)?);
    }
    let names: Vec<&str> = providers.iter().map(|p| p.name.as_str()).collect();
    for p in &providers {
        let key = format!("providers.{}.fallback", p.name);
        for (i, f) in p.fallback.iter().enumerate() {
            if !names.contains(&f.as_str()) {
                return Err(invalid(
                    key,
                    format!(
                        "names {f:?}, which is not a configured provider (configured: {})",
                        names.join(", ")
                    ),
                ));
            }
            if *f == p.name || p.fallback[..i].contains(f) {
                return Err(invalid(
                    key,
                    format!("names {f:?} twice, or the provider itself"),
                ));
            }
        }
    }
    let default = match (worker.default_provider.as_str(), legacy_name) {
        ("", Some(legacy)) => legacy,
        ("", None) if names.len() == 1 => names[0].to_string(),
        ("", None) => {
            return Err(invalid(
                "worker.default_provider",
                format!(
                    "must name the provider of jobs that name none: one of {}",
                    names.join(", ")
                ),
            ));
        }
        (name, _) if names.contains(&name) => name.to_string(),
        (name, _) => {
            return Err(invalid(
                "worker.default_provider",
                format!(
                    "is {name:?}, which is not a configured provider (configured: {})",
                    names.join(", ")
                ),
            ));
        }
    };
    Ok(Resolved {
        providers,
        default,
        warnings,
    })
}

fn resolve_one(
    cfg: &config::Config,
    worker: &WorkerSettings,
    name: String,
    mut table: Map<String, Value>,
) -> Result<ProviderSettings, ConfigError> {
    let section = format!("providers.{name}");
    if !valid_name(&name) {
        return Err(invalid(
            section,
            "names a provider with 1-64 characters of [a-z0-9_], starting with a letter \
             (so that IMAGEGEN__PROVIDERS__NAME__KEY can override its keys)",
        ));
    }
    let kind_key = format!("{section}.kind");
    let kind = match table.remove("kind").map(Value::into_string) {
        Some(Ok(k)) => ProviderKind::parse(&k).ok_or_else(|| {
            invalid(
                kind_key.clone(),
                format!("is {k:?}, must be one of {}", ProviderKind::names()),
            )
        })?,
        _ => {
            return Err(invalid(
                kind_key,
                format!("is required: one of {}", ProviderKind::names()),
            ));
        }
    };
    let concurrency = match table.remove("concurrency") {
        None => worker.concurrency,
        Some(v) => {
            let n = v
                .into_int()
                .map_err(|e| invalid(format!("{section}.concurrency"), e.to_string()))?;
            in_range(format!("{section}.concurrency"), n.max(0) as u64, 1, 1024)?;
            n as usize
        }
    };
    let params_allowed = match table.remove("params_allowed") {
        None => Vec::new(),
        Some(v) => v
            .try_deserialize::<Vec<String>>()
            .map_err(|e| invalid(format!("{section}.params_allowed"), e.to_string()))?,
    };
    if let Some(p) = params_allowed
        .iter()
        .find(|p| p.is_empty() || RESERVED_PARAMS.contains(&p.as_str()))
    {
        return Err(invalid(
            format!("{section}.params_allowed"),
            format!("names {p:?}: a field the worker controls (or none) cannot be allowed"),
        ));
    }
    // A list, or (from the environment) names separated by commas.
    let fallback = match table.remove("fallback") {
        None => Vec::new(),
        Some(v) => match v.clone().into_string() {
            Ok(text) if !matches!(v.kind, ValueKind::Array(_)) => text
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(str::to_string)
                .collect(),
            _ => v
                .try_deserialize::<Vec<String>>()
                .map_err(|e| invalid(format!("{section}.fallback"), e.to_string()))?,
        },
    };
    let fallback_on_refusal = match table.remove("fallback_on_refusal") {
        None => false,
        Some(v) => v
            .into_bool()
            .map_err(|e| invalid(format!("{section}.fallback_on_refusal"), e.to_string()))?,
    };
    let limits: LimitsSettings = overlaid(cfg, "limits", table.remove("limits"), &section)?;
    limits.validate(&format!("{section}.limits"), concurrency)?;
    let retry: RetrySettings = overlaid(cfg, "retry", table.remove("retry"), &section)?;
    retry.validate(&format!("{section}.retry"))?;
    let pricing: PriceTable = overlaid(cfg, "pricing", table.remove("pricing"), &section)?;
    pricing
        .validate()
        .map_err(|e| invalid(format!("{section}.pricing"), e))?;
    // Lists may come from the environment as items separated by commas.
    for key in ["hosts", "download_hosts"] {
        if let Some(v) = table.get_mut(key) {
            text_to_list(v);
        }
    }
    if let Some(Value {
        kind: ValueKind::Table(inputs),
        ..
    }) = table.get_mut("inputs")
        && let Some(v) = inputs.get_mut("images")
    {
        text_to_list(v);
    }
    let defaults = format!("provider_defaults.{}", kind.as_str());
    let keys = Some(table_value(table));
    let kind = match kind {
        ProviderKind::Openai => KindSettings::Openai(kind_keys(cfg, &defaults, keys, &section)?),
        ProviderKind::Placeholder => {
            KindSettings::Placeholder(kind_keys(cfg, &defaults, keys, &section)?)
        }
        ProviderKind::Gemini => KindSettings::Gemini(kind_keys(cfg, &defaults, keys, &section)?),
        ProviderKind::Bfl => KindSettings::Bfl(kind_keys(cfg, &defaults, keys, &section)?),
        ProviderKind::AzureOpenai => {
            KindSettings::AzureOpenai(kind_keys(cfg, &defaults, keys, &section)?)
        }
        ProviderKind::Stability => {
            KindSettings::Stability(kind_keys(cfg, &defaults, keys, &section)?)
        }
        ProviderKind::Replicate => {
            KindSettings::Replicate(kind_keys(cfg, &defaults, keys, &section)?)
        }
        ProviderKind::Fal => KindSettings::Fal(kind_keys(cfg, &defaults, keys, &section)?),
        ProviderKind::ComfyUi => KindSettings::ComfyUi(kind_keys(cfg, &defaults, keys, &section)?),
        ProviderKind::Automatic1111 => {
            KindSettings::Automatic1111(kind_keys(cfg, &defaults, keys, &section)?)
        }
    };
    Ok(ProviderSettings {
        name,
        kind,
        concurrency,
        limits,
        retry,
        pricing,
        params_allowed,
        fallback,
        fallback_on_refusal,
    })
}

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 64
        && bytes.next().is_some_and(|b| b.is_ascii_lowercase())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

fn table_value(table: Map<String, Value>) -> Value {
    Value::new(None, ValueKind::Table(table))
}

/// A kind's keys: `[provider_defaults.KIND]` with the provider's own over them, checked.
fn kind_keys<T: KindKeys>(
    cfg: &config::Config,
    defaults: &str,
    keys: Option<Value>,
    section: &str,
) -> Result<T, ConfigError> {
    let s = T::prepared(overlaid(cfg, defaults, keys, section)?);
    s.check(section)?;
    Ok(s)
}

/// The table at `base` with the keys of `over` replacing its own, deserialised. Errors name the
/// provider's section.
fn overlaid<T: DeserializeOwned>(
    cfg: &config::Config,
    base: &str,
    over: Option<Value>,
    section: &str,
) -> Result<T, ConfigError> {
    let mut table = cfg
        .get_table(base)
        .map_err(|e| invalid(base.to_string(), e.to_string()))?;
    if let Some(over) = over {
        let over = over
            .into_table()
            .map_err(|e| invalid(section.to_string(), e.to_string()))?;
        merge(&mut table, over);
    }
    table_value(table)
        .try_deserialize()
        .map_err(|e| invalid(section.to_string(), e.to_string()))
}

/// `over`'s keys over `base`'s; a table in both is merged the same way (a provider that sets
/// one of `inputs` keeps the defaults of the others).
fn merge(base: &mut Map<String, Value>, over: Map<String, Value>) {
    for (key, value) in over {
        match (base.get_mut(&key), value) {
            (
                Some(Value {
                    kind: ValueKind::Table(mine),
                    ..
                }),
                Value {
                    kind: ValueKind::Table(theirs),
                    ..
                },
            ) => merge(mine, theirs),
            (_, value) => {
                base.insert(key, value);
            }
        }
    }
}

/// `[provider]` of earlier releases as a provider named after its kind.
fn from_legacy(
    cfg: &config::Config,
    mut legacy: Map<String, Value>,
) -> Result<(String, Map<String, Value>, String), ConfigError> {
    let kind = match legacy.remove("kind").map(Value::into_string) {
        None => ProviderKind::Placeholder,
        Some(Ok(k)) => ProviderKind::parse(&k).ok_or_else(|| {
            invalid(
                "provider.kind",
                format!("is {k:?}, must be one of {}", ProviderKind::names()),
            )
        })?,
        Some(Err(e)) => return Err(invalid("provider.kind", e.to_string())),
    };
    let name = kind.as_str().to_string();
    // [provider] held every key of every kind; only those of its kind mean something.
    let own: BTreeSet<String> = cfg
        .get_table(&format!("provider_defaults.{name}"))
        .map(|t| t.into_keys().collect())
        .unwrap_or_default();
    // Its keys were those of kind openai: anything else is a typo, as it always was.
    let known: BTreeSet<String> = cfg
        .get_table("provider_defaults.openai")
        .map(|t| t.into_keys().collect())
        .unwrap_or_default();
    if let Some(unknown) = legacy.keys().find(|k| !known.contains(*k)) {
        return Err(invalid(
            "provider",
            format!("has an unknown key `{unknown}`"),
        ));
    }
    let given: Vec<String> = legacy.keys().cloned().collect();
    legacy.retain(|k, _| own.contains(k));
    legacy.insert("kind".into(), Value::from(name.as_str()));
    let env = given
        .iter()
        .map(|k| {
            format!(
                "IMAGEGEN__PROVIDER__{0} -> IMAGEGEN__PROVIDERS__{1}__{0}",
                k.to_uppercase(),
                name.to_uppercase()
            )
        })
        .collect::<Vec<_>>()
        .join(", ");
    let warning = format!(
        "the [provider] section is deprecated: it is read as [providers.{name}] with \
         kind = \"{name}\", the default provider (worker.default_provider = \"{name}\"). Write \
         it that way; in the environment: {}",
        if env.is_empty() {
            format!("IMAGEGEN__PROVIDERS__{}__KIND={name}", name.to_uppercase())
        } else {
            env
        }
    );
    Ok((name, legacy, warning))
}

/// Lists that may be given as text (from the environment, or an override): items separated by
/// commas.
const TEXT_LISTS: &[(&str, &str)] = &[
    ("references", "download_hosts"),
    ("references", "allowed_prefixes"),
];

pub(super) fn commas_to_lists(root: &mut config::Map<String, config::Value>) {
    for (table, key) in TEXT_LISTS {
        if let Some(config::ValueKind::Table(t)) = root.get_mut(*table).map(|v| &mut v.kind)
            && let Some(v) = t.get_mut(*key)
        {
            text_to_list(v);
        }
    }
}

/// A list given as text (from the environment, or an override): its items, separated by commas.
pub(super) fn text_to_list(v: &mut config::Value) {
    if let config::ValueKind::String(text) = &v.kind {
        let items = text
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| config::Value::new(None, config::ValueKind::String(s.to_string())))
            .collect();
        *v = config::Value::new(None, config::ValueKind::Array(items));
    }
}

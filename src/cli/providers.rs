//! `imagegen providers`: the configured providers, each with its kind, model, limits, prices
//! and fallbacks, and whether it answers with its credentials (its cheapest authenticated call,
//! which buys nothing).

use std::process::ExitCode;
use std::time::Duration;

use serde::Serialize;

use crate::config::Settings;
use crate::domain::cost::PriceTable;
use crate::provider::buffers::BufferPool;

#[derive(Debug, Serialize)]
struct ProviderRow {
    name: String,
    kind: &'static str,
    default: bool,
    model: String,
    concurrency: usize,
    requests_per_minute: u64,
    images_per_minute: u64,
    /// The prices that apply to its default model, in the units it bills.
    price: Option<String>,
    fallback: Vec<String>,
    /// `None` when not checked (`--offline`).
    answers: Option<bool>,
    check: Option<String>,
}

/// The price that applies to `model`, in the units it is billed in.
fn price_of(prices: &PriceTable, model: &str) -> Option<String> {
    let matches = |pattern: &str| match pattern.strip_suffix('*') {
        Some(prefix) => model.starts_with(prefix),
        None => pattern == model,
    };
    if let Some(p) = prices.per_image.iter().find(|p| matches(&p.model)) {
        return Some(format!("${} per image", p.usd));
    }
    if let Some(p) = prices.per_megapixel.iter().find(|p| matches(&p.model)) {
        return Some(format!("${} per megapixel", p.usd));
    }
    if let Some(p) = prices.per_credit.iter().find(|p| matches(&p.model)) {
        return Some(format!("${} per credit", p.usd));
    }
    if let Some(p) = prices.per_gpu_second.iter().find(|p| matches(&p.model)) {
        return Some(format!("${} per GPU second", p.usd));
    }
    if let Some(p) = prices.models.iter().find(|p| matches(&p.model)) {
        return Some(format!(
            "${} / ${} / ${} per million text-in / image-in / image-out tokens",
            p.text_input_usd_per_mtok, p.image_input_usd_per_mtok, p.image_output_usd_per_mtok
        ));
    }
    (prices.fallback_usd_per_image > 0.0).then(|| {
        format!(
            "${} per image (fallback estimate)",
            prices.fallback_usd_per_image
        )
    })
}

/// `imagegen providers`. Exit code 3 when a provider checked does not answer.
pub async fn providers(settings: &Settings, offline: bool, json: bool) -> anyhow::Result<ExitCode> {
    crate::install_crypto_provider();
    let memory = BufferPool::new(settings.worker.answer_memory_bytes);
    let mut rows = Vec::new();
    let mut checks = Vec::new();
    for p in &settings.providers {
        let provider = crate::provider::build(p, &memory)?;
        let model = provider.defaults().model.clone();
        rows.push(ProviderRow {
            name: p.name.clone(),
            kind: p.kind.kind().as_str(),
            default: p.name == settings.default_provider().name,
            price: price_of(&p.pricing, &model),
            model,
            concurrency: p.concurrency,
            requests_per_minute: p.limits.requests_per_minute,
            images_per_minute: p.limits.images_per_minute,
            fallback: p.fallback.clone(),
            answers: None,
            check: None,
        });
        checks.push(provider);
    }
    if !offline {
        let results = futures_util::future::join_all(checks.iter().map(|p| async move {
            tokio::time::timeout(Duration::from_secs(15), p.check())
                .await
                .unwrap_or_else(|_| Err("no answer within 15 s".into()))
        }))
        .await;
        for (row, result) in rows.iter_mut().zip(results) {
            row.answers = Some(result.is_ok());
            row.check = Some(result.unwrap_or_else(|why| why));
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        for r in &rows {
            println!(
                "{}{} (kind {}): model {}, {} calls at once{}{}",
                r.name,
                if r.default { " [default]" } else { "" },
                r.kind,
                r.model,
                r.concurrency,
                match (r.requests_per_minute, r.images_per_minute) {
                    (0, 0) => String::new(),
                    (rpm, ipm) =>
                        format!(", {rpm} requests / {ipm} images per minute (0: no limit)"),
                },
                if r.fallback.is_empty() {
                    String::new()
                } else {
                    format!(", falls back to {}", r.fallback.join(", "))
                }
            );
            println!(
                "  price: {}",
                r.price
                    .as_deref()
                    .unwrap_or("none configured for its default model")
            );
            if let Some(check) = &r.check {
                println!("  {}", check);
            }
        }
    }
    Ok(if rows.iter().any(|r| r.answers == Some(false)) {
        ExitCode::from(3)
    } else {
        ExitCode::SUCCESS
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_shown_in_the_units_each_model_is_billed_in() {
        let settings = Settings::load(&crate::config::Sources::default()).unwrap();
        let p = &settings.pricing;
        assert_eq!(
            price_of(p, "flux-2-pro").as_deref(),
            Some("$0.03 per megapixel")
        );
        let gemini = price_of(p, "gemini-2.5-flash-image").unwrap();
        assert!(gemini.contains("$30 per million"), "{gemini}");
        assert_eq!(price_of(p, "placeholder").as_deref(), Some("$0 per image"));
        assert_eq!(price_of(p, "unknown-model"), None);
    }
}

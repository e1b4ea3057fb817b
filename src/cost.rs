//! What a job cost, from the provider's reported usage and the price table in config.
//!
//! - Token-billed models (OpenAI GPT image models): text input, image input and image output
//!   tokens times their prices per million. Exact when the provider reports usage.
//! - When usage is missing, an estimate from the requested size and quality (output tokens per
//!   image as the provider documents them) is given and marked `cost_estimated`.
//! - Per-image prices (providers that bill per image) are exact.
//!
//! Prices change: they live in config (`[[pricing.models]]`, `[[pricing.per_image]]`), not here.

use serde::Deserialize;
use serde_json::Value;

/// Token prices of a model, USD per million tokens. `model` matches exactly, or as a prefix when
/// it ends with `*` (`gpt-image-2*`).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ModelPrice {
    pub model: String,
    pub text_input_usd_per_mtok: f64,
    pub image_input_usd_per_mtok: f64,
    pub image_output_usd_per_mtok: f64,
}

/// A price per image; `*` matches anything.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ImagePrice {
    pub model: String,
    #[serde(default = "any")]
    pub size: String,
    #[serde(default = "any")]
    pub quality: String,
    pub usd: f64,
}

fn any() -> String {
    "*".into()
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PriceTable {
    #[serde(default)]
    pub models: Vec<ModelPrice>,
    #[serde(default)]
    pub per_image: Vec<ImagePrice>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cost {
    pub usd: f64,
    pub estimated: bool,
}

/// What was bought.
#[derive(Debug, Clone, Copy)]
pub struct Purchase<'a> {
    pub model: &'a str,
    pub size: &'a str,
    pub quality: &'a str,
    pub prompt: &'a str,
    pub images: u32,
    pub usage: Option<&'a Value>,
}

fn matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
}

fn tokens(usage: &Value, path: &[&str]) -> Option<f64> {
    path.iter()
        .try_fold(usage, |v, k| v.get(k))
        .and_then(Value::as_f64)
}

/// Output tokens of one 1024x1024 image by quality, as documented for GPT image models; other
/// sizes scale with their pixel count.
fn estimated_output_tokens(size: &str, quality: &str) -> f64 {
    let base = match quality {
        "low" => 272.0,
        "high" => 4160.0,
        "xhigh" | "max" => 8320.0,
        _ => 1056.0,
    };
    let pixels = size
        .split_once('x')
        .and_then(|(w, h)| Some(w.trim().parse::<f64>().ok()? * h.trim().parse::<f64>().ok()?))
        .unwrap_or(1024.0 * 1024.0);
    base * pixels / (1024.0 * 1024.0)
}

impl PriceTable {
    pub fn validate(&self) -> Result<(), String> {
        let prices = self
            .models
            .iter()
            .flat_map(|m| {
                [
                    m.text_input_usd_per_mtok,
                    m.image_input_usd_per_mtok,
                    m.image_output_usd_per_mtok,
                ]
            })
            .chain(self.per_image.iter().map(|p| p.usd));
        for p in prices {
            if !p.is_finite() || p < 0.0 {
                return Err(format!("prices must be finite and not negative, got {p}"));
            }
        }
        Ok(())
    }

    /// The cost of a purchase, or `None` when no price applies.
    pub fn cost(&self, p: Purchase<'_>) -> Option<Cost> {
        if let Some(price) = self.per_image.iter().find(|i| {
            matches(&i.model, p.model) && matches(&i.size, p.size) && matches(&i.quality, p.quality)
        }) {
            return Some(Cost {
                usd: price.usd * p.images as f64,
                estimated: false,
            });
        }
        let price = self.models.iter().find(|m| matches(&m.model, p.model))?;
        let per = |tokens: f64, usd_per_mtok: f64| tokens * usd_per_mtok / 1_000_000.0;
        if let Some(usage) = p.usage {
            let input = tokens(usage, &["input_tokens"]).unwrap_or(0.0);
            let text_in = tokens(usage, &["input_tokens_details", "text_tokens"]).unwrap_or(input);
            let image_in = tokens(usage, &["input_tokens_details", "image_tokens"]).unwrap_or(0.0);
            let image_out = tokens(usage, &["output_tokens_details", "image_tokens"])
                .or_else(|| tokens(usage, &["output_tokens"]))
                .unwrap_or(0.0);
            let usd = per(text_in, price.text_input_usd_per_mtok)
                + per(image_in, price.image_input_usd_per_mtok)
                + per(image_out, price.image_output_usd_per_mtok);
            return Some(Cost {
                usd,
                estimated: false,
            });
        }
        // No usage reported: estimate (about four characters a token for the prompt).
        let text_in = (p.prompt.chars().count() as f64 / 4.0).ceil();
        let image_out = estimated_output_tokens(p.size, p.quality) * p.images as f64;
        Some(Cost {
            usd: per(text_in, price.text_input_usd_per_mtok)
                + per(image_out, price.image_output_usd_per_mtok),
            estimated: true,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table() -> PriceTable {
        PriceTable {
            models: vec![ModelPrice {
                model: "gpt-image-2*".into(),
                text_input_usd_per_mtok: 5.0,
                image_input_usd_per_mtok: 8.0,
                image_output_usd_per_mtok: 30.0,
            }],
            per_image: vec![ImagePrice {
                model: "placeholder".into(),
                size: any(),
                quality: any(),
                usd: 0.0,
            }],
        }
    }

    fn purchase<'a>(model: &'a str, usage: Option<&'a Value>) -> Purchase<'a> {
        Purchase {
            model,
            size: "1024x1024",
            quality: "high",
            prompt: "a red fox in the snow",
            images: 2,
            usage,
        }
    }

    #[test]
    fn reported_usage_is_priced_exactly() {
        let usage = json!({"input_tokens": 50, "input_tokens_details": {"text_tokens": 40, "image_tokens": 10},
            "output_tokens": 8320, "output_tokens_details": {"image_tokens": 8320, "text_tokens": 0}});
        let cost = table()
            .cost(purchase("gpt-image-2.5-flare", Some(&usage)))
            .unwrap();
        let expected = 40.0 * 5.0 / 1e6 + 10.0 * 8.0 / 1e6 + 8320.0 * 30.0 / 1e6;
        assert!((cost.usd - expected).abs() < 1e-12, "{cost:?}");
        assert!(!cost.estimated);
    }

    #[test]
    fn missing_usage_gives_a_marked_estimate() {
        let cost = table().cost(purchase("gpt-image-2", None)).unwrap();
        assert!(cost.estimated);
        // Two high-quality 1024x1024 images: 2 x 4160 output tokens at $30/M, plus the prompt.
        assert!(
            (cost.usd - (8320.0 * 30.0 / 1e6 + 6.0 * 5.0 / 1e6)).abs() < 1e-9,
            "{cost:?}"
        );
    }

    #[test]
    fn per_image_prices_and_unknown_models() {
        assert_eq!(
            table().cost(purchase("placeholder", None)),
            Some(Cost {
                usd: 0.0,
                estimated: false
            })
        );
        assert_eq!(table().cost(purchase("some-other-model", None)), None);
        assert!(!matches("gpt-image-2", "gpt-image-2.5"));
        assert!(matches("gpt-image-2*", "gpt-image-2.5"));
    }

    #[test]
    fn negative_prices_are_refused() {
        let mut t = table();
        t.per_image[0].usd = -1.0;
        assert!(t.validate().is_err());
    }
}

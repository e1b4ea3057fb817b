//! What a purchase cost: the provider's usage, normalised ([`Usage`]), priced by the table in
//! config ([`PriceTable`]).
//!
//! Each provider turns what it reports (OpenAI's token counts, a megapixel count, credits) into
//! a [`Usage`]; when it reports nothing, it estimates one from the request and marks it
//! `estimated`. The price table knows nothing of any provider's vocabulary:
//!
//! - per image (`[[pricing.per_image]]`, by model, size and quality): exact;
//! - per megapixel (`[[pricing.per_megapixel]]`) and per credit (`[[pricing.per_credit]]`);
//! - per second of GPU time (`[[pricing.per_gpu_second]]`: self-hosted servers, whose cost is
//!   the time their GPUs run);
//! - per million tokens (`[[pricing.models]]`): text input, image input and image output.
//!
//! Prices change: they live in config, not here.

use serde::{Deserialize, Serialize};

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

/// A price per unit the provider counts (a megapixel, a credit) for a model; `*` matches any.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UnitPrice {
    pub model: String,
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
    #[serde(default)]
    pub per_megapixel: Vec<UnitPrice>,
    #[serde(default)]
    pub per_credit: Vec<UnitPrice>,
    #[serde(default)]
    pub per_gpu_second: Vec<UnitPrice>,
    /// USD per image for a model that no list prices, marked as an estimate; 0: none (the
    /// model is unpriced: its cost is unknown, and with a spend cap its jobs are refused).
    #[serde(default)]
    pub fallback_usd_per_image: f64,
}

/// What one call (or a job's calls, summed) used, in the units providers bill by. Fields a
/// provider does not report stay 0.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub input_text_tokens: f64,
    pub input_image_tokens: f64,
    pub output_text_tokens: f64,
    pub output_image_tokens: f64,
    /// Images delivered.
    pub images: u32,
    /// Megapixels of the images delivered (or asked for).
    pub megapixels: f64,
    /// Provider credits spent.
    pub credits: f64,
    /// Seconds a (self-hosted) GPU ran for it.
    pub gpu_seconds: f64,
    /// The provider reported no usage: these are estimates from the request.
    pub estimated: bool,
}

impl Usage {
    /// Adds another call's usage to this one.
    pub fn add(&mut self, other: &Usage) {
        self.input_text_tokens += other.input_text_tokens;
        self.input_image_tokens += other.input_image_tokens;
        self.output_text_tokens += other.output_text_tokens;
        self.output_image_tokens += other.output_image_tokens;
        self.images += other.images;
        self.megapixels += other.megapixels;
        self.credits += other.credits;
        self.gpu_seconds += other.gpu_seconds;
        self.estimated |= other.estimated;
    }

    /// Provider tokens of every kind, or `None` when the provider counts none.
    pub fn tokens(&self) -> Option<f64> {
        let total = self.input_text_tokens
            + self.input_image_tokens
            + self.output_text_tokens
            + self.output_image_tokens;
        (total > 0.0).then_some(total)
    }
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
    pub usage: &'a Usage,
}

fn matches(pattern: &str, value: &str) -> bool {
    match pattern.strip_suffix('*') {
        Some(prefix) => value.starts_with(prefix),
        None => pattern == value,
    }
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
            .chain(self.per_image.iter().map(|p| p.usd))
            .chain(self.per_megapixel.iter().map(|p| p.usd))
            .chain(self.per_credit.iter().map(|p| p.usd))
            .chain(self.per_gpu_second.iter().map(|p| p.usd))
            .chain([self.fallback_usd_per_image]);
        for p in prices {
            if !p.is_finite() || p < 0.0 {
                return Err(format!("prices must be finite and not negative, got {p}"));
            }
        }
        Ok(())
    }

    /// Whether the table holds any price at all.
    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
            && self.per_image.is_empty()
            && self.per_megapixel.is_empty()
            && self.per_credit.is_empty()
            && self.per_gpu_second.is_empty()
            && self.fallback_usd_per_image == 0.0
    }

    /// The cost of a purchase, or `None` when no price applies to the model.
    pub fn cost(&self, p: Purchase<'_>) -> Option<Cost> {
        let u = p.usage;
        let exact = |usd: f64| Cost {
            usd,
            estimated: u.estimated,
        };
        if let Some(price) = self.per_image.iter().find(|i| {
            matches(&i.model, p.model) && matches(&i.size, p.size) && matches(&i.quality, p.quality)
        }) {
            // The images delivered are known exactly, whatever else the provider reported.
            return Some(Cost {
                usd: price.usd * u.images as f64,
                estimated: false,
            });
        }
        let unit = |list: &[UnitPrice]| {
            list.iter()
                .find(|m| matches(&m.model, p.model))
                .map(|m| m.usd)
        };
        if let Some(usd) = unit(&self.per_megapixel) {
            return Some(exact(usd * u.megapixels));
        }
        if let Some(usd) = unit(&self.per_credit) {
            return Some(exact(usd * u.credits));
        }
        if let Some(usd) = unit(&self.per_gpu_second) {
            return Some(exact(usd * u.gpu_seconds));
        }
        let Some(price) = self.models.iter().find(|m| matches(&m.model, p.model)) else {
            return (self.fallback_usd_per_image > 0.0).then_some(Cost {
                usd: self.fallback_usd_per_image * u.images as f64,
                estimated: true,
            });
        };
        let per = |tokens: f64, usd_per_mtok: f64| tokens * usd_per_mtok / 1_000_000.0;
        Some(exact(
            per(u.input_text_tokens, price.text_input_usd_per_mtok)
                + per(u.input_image_tokens, price.image_input_usd_per_mtok)
                + per(u.output_image_tokens, price.image_output_usd_per_mtok),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
            per_megapixel: vec![UnitPrice {
                model: "flux-2-*".into(),
                usd: 0.03,
            }],
            per_credit: vec![UnitPrice {
                model: "sd3.5-large".into(),
                usd: 0.01,
            }],
            per_gpu_second: vec![],
            fallback_usd_per_image: 0.0,
        }
    }

    fn purchase<'a>(model: &'a str, usage: &'a Usage) -> Purchase<'a> {
        Purchase {
            model,
            size: "1024x1024",
            quality: "high",
            usage,
        }
    }

    #[test]
    fn gpu_time_is_priced_per_second() {
        let table = PriceTable {
            per_gpu_second: vec![UnitPrice {
                model: "sd_xl*".into(),
                usd: 0.0004,
            }],
            ..PriceTable::default()
        };
        let usage = Usage {
            images: 2,
            gpu_seconds: 12.5,
            ..Usage::default()
        };
        let cost = table
            .cost(purchase("sd_xl_base_1.0.safetensors", &usage))
            .unwrap();
        assert!((cost.usd - 0.005).abs() < 1e-12, "{cost:?}");
        assert!(!cost.estimated);
        assert!(table.cost(purchase("flux-dev", &usage)).is_none());
    }

    #[test]
    fn reported_tokens_are_priced_exactly() {
        let usage = Usage {
            input_text_tokens: 40.0,
            input_image_tokens: 10.0,
            output_image_tokens: 8320.0,
            images: 2,
            ..Usage::default()
        };
        let cost = table()
            .cost(purchase("gpt-image-2.5-flare", &usage))
            .unwrap();
        let expected = 40.0 * 5.0 / 1e6 + 10.0 * 8.0 / 1e6 + 8320.0 * 30.0 / 1e6;
        assert!((cost.usd - expected).abs() < 1e-12, "{cost:?}");
        assert!(!cost.estimated);
    }

    #[test]
    fn an_estimated_usage_gives_a_marked_estimate() {
        let usage = Usage {
            input_text_tokens: 6.0,
            output_image_tokens: 8320.0,
            images: 2,
            estimated: true,
            ..Usage::default()
        };
        let cost = table().cost(purchase("gpt-image-2", &usage)).unwrap();
        assert!(cost.estimated);
        assert!(
            (cost.usd - (8320.0 * 30.0 / 1e6 + 6.0 * 5.0 / 1e6)).abs() < 1e-9,
            "{cost:?}"
        );
    }

    #[test]
    fn per_image_megapixel_and_credit_prices_and_unknown_models() {
        let usage = Usage {
            images: 2,
            megapixels: 4.0,
            credits: 13.0,
            ..Usage::default()
        };
        assert_eq!(
            table().cost(purchase("placeholder", &usage)),
            Some(Cost {
                usd: 0.0,
                estimated: false
            })
        );
        let flux = table().cost(purchase("flux-2-pro", &usage)).unwrap();
        assert!((flux.usd - 0.12).abs() < 1e-12, "{flux:?}");
        let sd = table().cost(purchase("sd3.5-large", &usage)).unwrap();
        assert!((sd.usd - 0.13).abs() < 1e-12, "{sd:?}");
        assert_eq!(table().cost(purchase("some-other-model", &usage)), None);
        // A fallback price prices what no list knows, per image and as an estimate.
        let fallback = PriceTable {
            fallback_usd_per_image: 0.05,
            ..table()
        };
        assert_eq!(
            fallback.cost(purchase("some-other-model", &usage)),
            Some(Cost {
                usd: 0.1,
                estimated: true
            })
        );
        assert!(!matches("gpt-image-2", "gpt-image-2.5"));
        assert!(matches("gpt-image-2*", "gpt-image-2.5"));
    }

    #[test]
    fn usage_of_several_calls_adds_up() {
        let mut total = Usage {
            input_text_tokens: 10.0,
            output_image_tokens: 1056.0,
            images: 1,
            ..Usage::default()
        };
        total.add(&Usage {
            input_text_tokens: 10.0,
            output_image_tokens: 2112.0,
            images: 2,
            estimated: true,
            ..Usage::default()
        });
        assert_eq!(total.input_text_tokens, 20.0);
        assert_eq!(total.output_image_tokens, 3168.0);
        assert_eq!(total.images, 3);
        assert!(total.estimated);
        assert_eq!(total.tokens(), Some(3188.0));
        assert_eq!(Usage::default().tokens(), None);
    }

    #[test]
    fn negative_prices_are_refused() {
        let mut t = table();
        t.per_image[0].usd = -1.0;
        assert!(t.validate().is_err());
        let mut t = table();
        t.per_credit[0].usd = f64::NAN;
        assert!(t.validate().is_err());
    }
}

//! A job's `outputs`: variants derived from each generated image (a 512x512 tile, a WebP for the
//! web, a thumbnail for review), each stored beside the original, which is always kept.
//!
//! ```json
//! "outputs": [
//!   {"name": "tile", "size": "512x512", "format": "png"},
//!   {"name": "web", "size": "1024x1024", "fit": "inside", "format": "webp", "quality": 82},
//!   {"name": "thumb", "size": "256x256", "format": "jpeg", "quality": 70, "strip_metadata": true}
//! ]
//! ```

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The most variants a job may ask for.
pub const MAX_OUTPUTS: usize = 8;

/// The longest side of a variant, in pixels.
pub const MAX_OUTPUT_SIDE: u32 = 8192;

/// How an image is brought to a variant's size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Fit {
    /// Exactly the size: scaled to cover it, then the overflow cropped, centred.
    Cover,
    /// Within the size, the aspect kept: scaled so that both sides fit.
    Inside,
}

/// A variant's encoding.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "format", rename_all = "snake_case")]
pub enum Encoding {
    Png,
    /// JPEG (no alpha: a transparent image is flattened onto white).
    Jpeg {
        quality: u8,
    },
    /// WebP, lossy at `quality`, or lossless.
    Webp {
        quality: Option<u8>,
    },
}

impl Encoding {
    pub fn extension(self) -> &'static str {
        match self {
            Encoding::Png => "png",
            Encoding::Jpeg { .. } => "jpeg",
            Encoding::Webp { .. } => "webp",
        }
    }

    pub fn content_type(self) -> &'static str {
        match self {
            Encoding::Png => "image/png",
            Encoding::Jpeg { .. } => "image/jpeg",
            Encoding::Webp { .. } => "image/webp",
        }
    }
}

/// One variant a job asks for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSpec {
    /// Its name: `[a-z0-9][a-z0-9_-]*`, at most 32 characters, unique in the job. Part of its
    /// object key (`{job dir}/variants/{name}/{index}.{ext}`).
    pub name: String,
    pub width: u32,
    pub height: u32,
    pub fit: Fit,
    pub encoding: Encoding,
    /// Drop the metadata the original carries (its color profile) instead of keeping it.
    pub strip_metadata: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Wire {
    name: Option<String>,
    size: Option<String>,
    fit: Option<String>,
    format: Option<String>,
    quality: Option<Value>,
    lossless: Option<bool>,
    strip_metadata: Option<bool>,
}

fn valid_name(name: &str) -> bool {
    let mut bytes = name.bytes();
    name.len() <= 32
        && bytes
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-')
}

/// Reads and checks `outputs`; the error says which entry and why.
pub fn parse(values: Vec<Value>) -> Result<Vec<OutputSpec>, String> {
    if values.len() > MAX_OUTPUTS {
        return Err(format!(
            "`outputs` has {} entries, at most {MAX_OUTPUTS}",
            values.len()
        ));
    }
    let mut specs: Vec<OutputSpec> = Vec::with_capacity(values.len());
    for (i, value) in values.into_iter().enumerate() {
        let at = format!("`outputs[{i}]`");
        let wire: Wire = serde_json::from_value(value).map_err(|e| format!("{at}: {e}"))?;
        let name = wire.name.ok_or(format!("{at} needs a `name`"))?;
        if !valid_name(&name) {
            return Err(format!(
                "{at}: name {:?} must be 1-32 characters of [a-z0-9_-], starting with a letter or digit",
                super::truncate(&name, 40)
            ));
        }
        if specs.iter().any(|s| s.name == name) {
            return Err(format!("{at}: the name {name:?} is used twice"));
        }
        let size = wire
            .size
            .ok_or(format!("{at} needs a `size` (WIDTHxHEIGHT)"))?;
        let (width, height) = size
            .split_once('x')
            .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)))
            .filter(|(w, h)| (1..=MAX_OUTPUT_SIDE).contains(w) && (1..=MAX_OUTPUT_SIDE).contains(h))
            .ok_or(format!(
                "{at}: size {:?} must be WIDTHxHEIGHT, each side 1-{MAX_OUTPUT_SIDE}",
                super::truncate(&size, 40)
            ))?;
        let fit = match wire.fit.as_deref() {
            None | Some("cover") => Fit::Cover,
            Some("inside") => Fit::Inside,
            Some(other) => {
                return Err(format!(
                    "{at}: fit {:?} must be \"cover\" (exact size, cropped) or \"inside\" (within it)",
                    super::truncate(other, 40)
                ));
            }
        };
        let quality = match wire.quality {
            None => None,
            Some(q) => Some(
                q.as_u64()
                    .filter(|q| (1..=100).contains(q))
                    .map(|q| q as u8)
                    .ok_or(format!(
                        "{at}: quality must be a whole number from 1 to 100"
                    ))?,
            ),
        };
        let lossless = wire.lossless.unwrap_or(false);
        let encoding = match wire.format.as_deref().unwrap_or("png") {
            "png" if quality.is_none() && !lossless => Encoding::Png,
            "jpeg" | "jpg" if !lossless => Encoding::Jpeg {
                quality: quality.unwrap_or(85),
            },
            "webp" if lossless && quality.is_some() => {
                return Err(format!("{at}: a lossless WebP takes no quality"));
            }
            "webp" => Encoding::Webp {
                quality: if lossless {
                    None
                } else {
                    Some(quality.unwrap_or(80))
                },
            },
            "png" => {
                return Err(format!(
                    "{at}: PNG is lossless: it takes no quality nor lossless"
                ));
            }
            "jpeg" | "jpg" => return Err(format!("{at}: JPEG cannot be lossless")),
            other => {
                return Err(format!(
                    "{at}: format {:?} must be png, jpeg or webp",
                    super::truncate(other, 40)
                ));
            }
        };
        specs.push(OutputSpec {
            name,
            width,
            height,
            fit,
            encoding,
            strip_metadata: wire.strip_metadata.unwrap_or(false),
        });
    }
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn outputs_are_read_with_their_defaults() {
        let specs = parse(vec![
            json!({"name": "tile", "size": "512x512"}),
            json!({"name": "web", "size": "1024x768", "fit": "inside", "format": "webp", "quality": 82}),
            json!({"name": "lossless", "size": "64x64", "format": "webp", "lossless": true}),
            json!({"name": "thumb", "size": "256x256", "format": "jpeg", "strip_metadata": true}),
        ])
        .unwrap();
        assert_eq!(specs[0].encoding, Encoding::Png);
        assert_eq!(specs[0].fit, Fit::Cover);
        assert_eq!((specs[1].width, specs[1].height), (1024, 768));
        assert_eq!(specs[1].encoding, Encoding::Webp { quality: Some(82) });
        assert_eq!(specs[2].encoding, Encoding::Webp { quality: None });
        assert_eq!(specs[3].encoding, Encoding::Jpeg { quality: 85 });
        assert!(specs[3].strip_metadata);
    }

    #[test]
    fn bad_outputs_say_which_and_why() {
        for (value, why) in [
            (json!({"size": "1x1"}), "needs a `name`"),
            (json!({"name": "Tile", "size": "1x1"}), "[a-z0-9_-]"),
            (json!({"name": "t", "size": "0x10"}), "each side"),
            (json!({"name": "t", "size": "10x99999"}), "each side"),
            (
                json!({"name": "t", "size": "10x10", "fit": "fill"}),
                "cover",
            ),
            (
                json!({"name": "t", "size": "10x10", "format": "gif"}),
                "png, jpeg or webp",
            ),
            (
                json!({"name": "t", "size": "10x10", "format": "png", "quality": 5}),
                "PNG is lossless",
            ),
            (
                json!({"name": "t", "size": "10x10", "format": "webp", "quality": 101}),
                "1 to 100",
            ),
            (
                json!({"name": "t", "size": "10x10", "format": "webp", "lossless": true, "quality": 5}),
                "takes no quality",
            ),
            (
                json!({"name": "t", "size": "10x10", "colour": "red"}),
                "unknown field",
            ),
        ] {
            let e = parse(vec![value]).unwrap_err();
            assert!(e.contains(why) && e.contains("outputs[0]"), "{why}: {e}");
        }
        let twice = parse(vec![
            json!({"name": "a", "size": "1x1"}),
            json!({"name": "a", "size": "2x2"}),
        ]);
        assert!(twice.unwrap_err().contains("used twice"));
        let many = vec![json!({"name": "a", "size": "1x1"}); 9];
        assert!(parse(many).unwrap_err().contains("at most 8"));
    }
}

//! The `placeholder` provider: renders a deterministic PNG from the prompt, locally.
//!
//! No network and no cost: it is the embedded default behind `make run`, and serves dry runs of a
//! whole pipeline (queues, storage, events) before real money is spent.

use bytes::Bytes;
use futures_util::future::BoxFuture;
use sha2::{Digest, Sha256};

use super::{
    Answer, Capabilities, GeneratedImage, Generation, ImageProvider, ImageRequest, JobDefaults,
    Journal, Mode, Size, Sizes,
};
use crate::config::PlaceholderSettings;
use crate::domain::cost::Usage;
use crate::domain::error::Failure;

/// Largest side rendered; larger requested sizes are scaled down to keep it cheap.
const MAX_SIDE: u32 = 1024;
const DEFAULT_SIDE: u32 = 1024;

/// It stands in for any provider in a dry run, so it takes every field.
const CAPABILITIES: Capabilities = Capabilities {
    images_per_call: 10,
    sizes: Sizes::Any,
    formats: None,
    seed: true,
    negative_prompt: true,
    transparency: true,
    mode: Mode::Synchronous,
    references: 0,
    mask: false,
    // It renders from the prompt alone: a job's params would change nothing.
    params: &[],
};

pub struct Placeholder {
    defaults: JobDefaults,
}

impl Placeholder {
    pub fn new(settings: &PlaceholderSettings) -> Self {
        Self {
            defaults: JobDefaults {
                model: settings.model.clone(),
                size: settings.size.clone(),
                quality: None,
                output_format: Some(settings.output_format.clone()).filter(|f| !f.is_empty()),
                background: None,
            },
        }
    }
}

impl ImageProvider for Placeholder {
    fn kind(&self) -> &'static str {
        "placeholder"
    }

    fn capabilities(&self) -> &Capabilities {
        &CAPABILITIES
    }

    fn defaults(&self) -> &JobDefaults {
        &self.defaults
    }

    fn estimate(&self, request: &ImageRequest) -> Usage {
        Usage {
            images: request.count.into(),
            ..Usage::default()
        }
    }

    fn submit<'a>(
        &'a self,
        request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(async move {
            let prompt = request.prompt.clone();
            let (w, h) = dimensions(&request.size);
            let (count, seed, model) = (request.count, request.seed, request.model.clone());
            // Rendering is CPU work: keep it off the async workers.
            tokio::task::spawn_blocking(move || {
                let images = (0..count as u32)
                    .map(|index| {
                        render(&prompt, seed, index, w, h).map(|png| GeneratedImage {
                            data: Bytes::from(png),
                            content_type: "image/png",
                            extension: "png",
                            revised_prompt: None,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(Answer::Done(Generation {
                    usage: Usage {
                        images: images.len() as u32,
                        ..Usage::default()
                    },
                    images,
                    reported_usage: None,
                    model: Some(model),
                    request_id: None,
                    rate_limits: None,
                }))
            })
            .await
            .map_err(|e| Failure::transient(format!("placeholder rendering panicked: {e}")))?
        })
    }
}

/// `WxH` scaled to fit MAX_SIDE; an aspect ratio at MAX_SIDE on its long side; anything else
/// (`auto`) is square.
fn dimensions(size: &Size) -> (u32, u32) {
    let (w, h) = match *size {
        Size::Pixels { width, height } | Size::Aspect { width, height } => (width, height),
        _ => (DEFAULT_SIDE, DEFAULT_SIDE),
    };
    let (w, h) = match size {
        // A ratio has no pixels of its own: the long side is the largest rendered.
        Size::Aspect { .. } => {
            let scale = MAX_SIDE as f64 / w.max(h) as f64;
            ((w as f64 * scale) as u32, (h as f64 * scale) as u32)
        }
        _ => (w, h),
    };
    let scale = (MAX_SIDE as f64 / w.max(h) as f64).min(1.0);
    (
        ((w as f64 * scale) as u32).max(1),
        ((h as f64 * scale) as u32).max(1),
    )
}

/// A diagonal gradient between two colours taken from the digest of the prompt (and the seed,
/// when there is one), with an 8x8 pattern of lighter cells (mirrored, like an identicon), so
/// different prompts look different.
fn render(prompt: &str, seed: Option<u64>, index: u32, w: u32, h: u32) -> Result<Vec<u8>, Failure> {
    let mut digest = Sha256::new().chain_update(prompt);
    if let Some(seed) = seed {
        digest.update(seed.to_be_bytes());
    }
    let digest = digest.chain_update(index.to_be_bytes()).finalize();
    let c1 = [digest[0], digest[1], digest[2]];
    let c2 = [digest[3], digest[4], digest[5]];
    let pattern = u64::from_be_bytes(digest[8..16].try_into().unwrap_or_default());
    let mut pixels = Vec::with_capacity((w * h * 3) as usize);
    for y in 0..h {
        for x in 0..w {
            let t = (x + y) as f32 / (w + h) as f32;
            let (cx, cy) = ((x * 8 / w).min(7), (y * 8 / h).min(7));
            let bit = (cy * 4 + cx.min(7 - cx)) as u64;
            let lit = pattern >> bit & 1 == 1;
            for c in 0..3 {
                let v = c1[c] as f32 * (1.0 - t) + c2[c] as f32 * t;
                pixels.push(if lit {
                    (v * 0.5 + 127.0) as u8
                } else {
                    v as u8
                });
            }
        }
    }
    let mut out = Vec::new();
    let mut encoder = png::Encoder::new(&mut out, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Fast);
    let fail =
        |e: png::EncodingError| Failure::transient(format!("placeholder PNG encoding failed: {e}"));
    encoder
        .add_text_chunk("Description".into(), prompt.chars().take(1000).collect())
        .map_err(fail)?;
    let mut writer = encoder.write_header().map_err(fail)?;
    writer.write_image_data(&pixels).map_err(fail)?;
    writer.finish().map_err(fail)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_honoured_within_the_cap() {
        let d = |s: &str| dimensions(&Size::parse(s));
        assert_eq!(d("512x256"), (512, 256));
        assert_eq!(d("2048x1024"), (1024, 512));
        assert_eq!(d("auto"), (1024, 1024));
        assert_eq!(d("0x5"), (1024, 1024));
        assert_eq!(d("16:9"), (1024, 576));
    }

    #[test]
    fn renders_are_deterministic_valid_pngs_that_differ_by_prompt() {
        let a = render("a red fox", None, 0, 64, 32).unwrap();
        assert_eq!(a, render("a red fox", None, 0, 64, 32).unwrap());
        assert_ne!(a, render("a blue fox", None, 0, 64, 32).unwrap());
        assert_ne!(a, render("a red fox", None, 1, 64, 32).unwrap());
        assert_ne!(a, render("a red fox", Some(7), 0, 64, 32).unwrap());
        let decoder = png::Decoder::new(std::io::Cursor::new(a));
        let reader = decoder.read_info().unwrap();
        assert_eq!((reader.info().width, reader.info().height), (64, 32));
    }
}

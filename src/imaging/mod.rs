//! Image work on the worker's side of a purchase: the variants a job asks for (resized,
//! cropped, encoded), and whether an image uses its alpha channel. CPU-bound work, run on
//! threads apart from the async ones and bounded ([`ImageWork`]), so that it never stalls the
//! consumer, the uploads or the provider calls.
//!
//! Decoding is bounded too: an image's header must promise at most
//! [`crate::provider::MAX_IMAGE_PIXELS`], and the decoder may allocate at most that many RGBA
//! pixels, so a decompression bomb is an error, not an allocation.

pub mod variant;

use std::sync::Arc;

use image::{DynamicImage, ImageFormat, ImageReader};
use tokio::sync::Semaphore;

pub use variant::{Variant, make_variant, size_of};

use crate::provider::MAX_IMAGE_PIXELS;

/// The threads image work may use at once, apart from the async ones.
#[derive(Clone)]
pub struct ImageWork {
    permits: Arc<Semaphore>,
}

impl ImageWork {
    /// `workers`: images worked on at once (0: one per CPU this process may use).
    pub fn new(workers: usize) -> Self {
        let workers = if workers == 0 {
            std::thread::available_parallelism().map_or(2, usize::from)
        } else {
            workers
        };
        Self {
            permits: Arc::new(Semaphore::new(workers)),
        }
    }

    /// Runs `work` on a blocking thread once one of the permits is free.
    pub async fn run<T: Send + 'static>(&self, work: impl FnOnce() -> T + Send + 'static) -> T {
        let _permit = self
            .permits
            .clone()
            .acquire_owned()
            .await
            .expect("the image work semaphore is never closed");
        match tokio::task::spawn_blocking(work).await {
            Ok(done) => done,
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}

/// A decoded image, with the color profile its file carried.
pub struct Decoded {
    pub image: DynamicImage,
    pub icc_profile: Option<Vec<u8>>,
}

/// Decodes PNG, JPEG or WebP bytes within the pixel and allocation bounds.
pub fn decode(data: &[u8]) -> Result<Decoded, String> {
    let format = image::guess_format(data)
        .ok()
        .filter(|f| matches!(f, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP))
        .ok_or("not a PNG, JPEG or WebP image")?;
    let mut reader = ImageReader::with_format(std::io::Cursor::new(data), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 4);
    reader.limits(limits);
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| format!("the image does not decode: {e}"))?;
    let icc_profile = image::ImageDecoder::icc_profile(&mut decoder)
        .ok()
        .flatten();
    let image = DynamicImage::from_decoder(decoder)
        .map_err(|e| format!("the image does not decode: {e}"))?;
    Ok(Decoded { image, icc_profile })
}

/// Whether the image has an alpha channel that some pixel uses (alpha below 255).
pub fn uses_alpha(image: &DynamicImage) -> bool {
    if !image.color().has_alpha() {
        return false;
    }
    match image {
        DynamicImage::ImageRgba8(i) => i.pixels().any(|p| p.0[3] < 255),
        DynamicImage::ImageLumaA8(i) => i.pixels().any(|p| p.0[1] < 255),
        DynamicImage::ImageRgba16(i) => i.pixels().any(|p| p.0[3] < u16::MAX),
        DynamicImage::ImageLumaA16(i) => i.pixels().any(|p| p.0[1] < u16::MAX),
        other => other.to_rgba8().pixels().any(|p| p.0[3] < 255),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use image::{Rgba, RgbaImage};

    /// A PNG of `width` x `height`: a gradient, transparent on its left half when `alpha`.
    pub fn png(width: u32, height: u32, alpha: bool) -> Vec<u8> {
        let image = RgbaImage::from_fn(width, height, |x, y| {
            let a = if alpha && x < width / 2 { 0 } else { 255 };
            Rgba([(x * 255 / width) as u8, (y * 255 / height) as u8, 128, a])
        });
        let mut out = std::io::Cursor::new(Vec::new());
        image.write_to(&mut out, ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn alpha_counts_only_when_a_pixel_uses_it() {
        let opaque = decode(&png(32, 16, false)).unwrap().image;
        assert!(opaque.color().has_alpha(), "an RGBA image...");
        assert!(!uses_alpha(&opaque), "...whose every pixel is opaque");
        assert!(uses_alpha(&decode(&png(32, 16, true)).unwrap().image));
    }

    #[test]
    fn a_decompression_bomb_is_refused_before_it_allocates() {
        // A valid PNG header promising 60000x60000 pixels (3.6 gigapixels), no data.
        let mut bomb = Vec::new();
        let mut encoder = png::Encoder::new(&mut bomb, 60_000, 60_000);
        encoder.set_color(png::ColorType::Rgba);
        drop(encoder.write_header().unwrap());
        let e = decode(&bomb).err().expect("refused");
        assert!(e.contains("does not decode"), "{e}");
        assert!(decode(b"<html>").is_err());
    }

    #[tokio::test]
    async fn work_runs_off_the_async_threads_a_few_at_a_time() {
        let work = ImageWork::new(2);
        let runs: Vec<_> = (0..6)
            .map(|i| {
                let work = work.clone();
                tokio::spawn(async move { work.run(move || i * 2).await })
            })
            .collect();
        let mut sum = 0;
        for r in runs {
            sum += r.await.unwrap();
        }
        assert_eq!(sum, 30);
    }
}

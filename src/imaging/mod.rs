//! Image work on the worker's side of a purchase: the variants a job asks for (resized,
//! cropped, encoded), and whether an image uses its alpha channel. CPU-bound work, run on
//! threads apart from the async ones and bounded ([`ImageWork`]), so that it never stalls the
//! consumer, the uploads or the provider calls.
//!
//! Decoding is bounded too: an image's header must promise at most
//! [`MAX_IMAGE_PIXELS`], and the decoder may allocate at most that many RGBA
//! pixels, so a decompression bomb is an error, not an allocation.

pub mod variant;

use std::sync::Arc;

use image::{DynamicImage, ImageFormat, ImageReader};
use tokio::sync::Semaphore;

pub use variant::{Variant, make_variant, size_of};

/// The largest image decoded here, and that a provider's answer may hold, in pixels (a
/// 16K-by-16K image is far beyond what any image API makes): a larger header is a broken or
/// hostile answer, refused before anything allocates for it.
pub const MAX_IMAGE_PIXELS: u64 = 16_384 * 16_384;

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
    decode_within(data, MAX_IMAGE_PIXELS)
}

/// Decodes PNG, JPEG or WebP bytes of at most `max_pixels` (and as many RGBA pixels allocated).
pub fn decode_within(data: &[u8], max_pixels: u64) -> Result<Decoded, String> {
    let format = image::guess_format(data)
        .ok()
        .filter(|f| matches!(f, ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP))
        .ok_or("not a PNG, JPEG or WebP image")?;
    // The header alone first: its size decides before anything is allocated.
    let (width, height) = header_size(data, format)?;
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(format!(
            "an image of {width}x{height} pixels, more than the {max_pixels} allowed"
        ));
    }
    let mut reader = ImageReader::with_format(std::io::Cursor::new(data), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    limits.max_alloc = Some(max_pixels.min(MAX_IMAGE_PIXELS) * 4);
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

/// A mask whose transparent pixels mark where to paint (OpenAI's convention), as the black and
/// white PNG other servers take (AUTOMATIC1111: white is painted).
pub fn paint_mask(png: &[u8]) -> Result<Vec<u8>, String> {
    let decoded = decode(png)?;
    let rgba = decoded.image.to_rgba8();
    let gray = image::GrayImage::from_fn(rgba.width(), rgba.height(), |x, y| {
        image::Luma([if rgba.get_pixel(x, y).0[3] < 128 {
            255
        } else {
            0
        }])
    });
    let mut out = std::io::Cursor::new(Vec::new());
    gray.write_to(&mut out, ImageFormat::Png)
        .map_err(|e| format!("the mask could not be encoded: {e}"))?;
    Ok(out.into_inner())
}

/// The size an image's header announces: a PNG's from its IHDR chunk (read alone, whatever
/// follows), others' by their decoder's header reading.
fn header_size(data: &[u8], format: ImageFormat) -> Result<(u32, u32), String> {
    if format == ImageFormat::Png {
        if data.len() < 24 || &data[12..16] != b"IHDR" {
            return Err("the image does not decode: a PNG without its IHDR header".into());
        }
        let be = |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
        return Ok((be(16), be(20)));
    }
    ImageReader::with_format(std::io::Cursor::new(data), format)
        .into_dimensions()
        .map_err(|e| format!("the image does not decode: {e}"))
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
        assert!(e.contains("60000x60000"), "{e}");
        assert!(decode(b"<html>").is_err());
    }

    #[test]
    fn a_transparent_mask_becomes_white_where_to_paint() {
        let mask = paint_mask(&png(8, 2, true)).unwrap();
        let gray = decode(&mask).unwrap().image.to_luma8();
        assert_eq!(gray.get_pixel(0, 0).0, [255], "transparent: paint");
        assert_eq!(gray.get_pixel(7, 1).0, [0], "opaque: keep");
    }

    #[tokio::test]
    async fn work_runs_off_the_async_threads_a_few_at_a_time() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let work = ImageWork::new(2);
        let (now, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let runs: Vec<_> = (0..6)
            .map(|i| {
                let (work, now, most) = (work.clone(), now.clone(), most.clone());
                tokio::spawn(async move {
                    work.run(move || {
                        let at_once = now.fetch_add(1, Ordering::SeqCst) + 1;
                        most.fetch_max(at_once, Ordering::SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(30));
                        now.fetch_sub(1, Ordering::SeqCst);
                        i * 2
                    })
                    .await
                })
            })
            .collect();
        let mut sum = 0;
        for r in runs {
            sum += r.await.unwrap();
        }
        assert_eq!(sum, 30);
        assert!(
            most.load(Ordering::SeqCst) <= 2,
            "never more than its permits at once"
        );
    }
}

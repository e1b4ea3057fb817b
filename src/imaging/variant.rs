//! One variant of an image: scaled (Lanczos3) to cover its size and cropped, centred, or to fit
//! within it; then encoded as PNG, JPEG, or WebP (lossless by the image crate, lossy by libwebp).
//! The original's color profile goes with it unless the job strips metadata (lossy WebP carries
//! none); nothing else of the original's metadata is written.

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{DynamicImage, ImageEncoder, RgbImage};

use super::Decoded;
use crate::domain::job::{Encoding, Fit, OutputSpec};

/// A variant, encoded.
#[derive(Debug, Clone)]
pub struct Variant {
    pub data: Vec<u8>,
    pub width: u32,
    pub height: u32,
    pub content_type: &'static str,
    pub extension: &'static str,
}

/// The size of `spec`'s variant of an image of `width` x `height`.
pub fn size_of(width: u32, height: u32, spec: &OutputSpec) -> (u32, u32) {
    match spec.fit {
        Fit::Cover => (spec.width, spec.height),
        Fit::Inside => {
            let scale = f64::min(
                f64::from(spec.width) / f64::from(width),
                f64::from(spec.height) / f64::from(height),
            );
            let side = |s: u32, max: u32| ((f64::from(s) * scale).round() as u32).clamp(1, max);
            (side(width, spec.width), side(height, spec.height))
        }
    }
}

/// Makes `spec`'s variant of a decoded image.
pub fn make_variant(original: &Decoded, spec: &OutputSpec) -> Result<Variant, String> {
    let source = &original.image;
    // 8 bits a channel, with alpha only where the original has it.
    let source: DynamicImage = if source.color().has_alpha() {
        DynamicImage::ImageRgba8(source.to_rgba8())
    } else {
        DynamicImage::ImageRgb8(source.to_rgb8())
    };
    let (width, height) = size_of(source.width(), source.height(), spec);
    let mut resized = DynamicImage::new(width, height, source.color());
    let mut options = ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Lanczos3));
    if spec.fit == Fit::Cover {
        options = options.fit_into_destination(Some((0.5, 0.5)));
    }
    Resizer::new()
        .resize(&source, &mut resized, &options)
        .map_err(|e| format!("the image could not be resized: {e}"))?;
    let icc = (!spec.strip_metadata)
        .then_some(original.icc_profile.as_deref())
        .flatten();
    let data = encode(&resized, spec.encoding, icc)?;
    Ok(Variant {
        data,
        width,
        height,
        content_type: spec.encoding.content_type(),
        extension: spec.encoding.extension(),
    })
}

fn encode(image: &DynamicImage, encoding: Encoding, icc: Option<&[u8]>) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    let (width, height) = (image.width(), image.height());
    let failed = |e: image::ImageError| format!("the variant could not be encoded: {e}");
    match encoding {
        Encoding::Png => {
            let mut encoder = PngEncoder::new(&mut out);
            if let Some(icc) = icc {
                let _ = encoder.set_icc_profile(icc.to_vec());
            }
            encoder
                .write_image(image.as_bytes(), width, height, image.color().into())
                .map_err(failed)?;
        }
        Encoding::Jpeg { quality } => {
            let flat = flatten(image);
            let mut encoder = JpegEncoder::new_with_quality(&mut out, quality);
            if let Some(icc) = icc {
                let _ = encoder.set_icc_profile(icc.to_vec());
            }
            encoder
                .write_image(flat.as_raw(), width, height, image::ExtendedColorType::Rgb8)
                .map_err(failed)?;
        }
        Encoding::Webp { quality: None } => {
            let mut encoder = WebPEncoder::new_lossless(&mut out);
            if let Some(icc) = icc {
                let _ = encoder.set_icc_profile(icc.to_vec());
            }
            encoder
                .write_image(image.as_bytes(), width, height, image.color().into())
                .map_err(failed)?;
        }
        Encoding::Webp {
            quality: Some(quality),
        } => {
            let encoder = match image {
                DynamicImage::ImageRgba8(i) => webp::Encoder::from_rgba(i.as_raw(), width, height),
                DynamicImage::ImageRgb8(i) => webp::Encoder::from_rgb(i.as_raw(), width, height),
                _ => return Err("the variant has no 8-bit RGB(A) pixels to encode".into()),
            };
            out = encoder
                .encode_simple(false, f32::from(quality))
                .map_err(|e| format!("libwebp could not encode the variant: {e:?}"))?
                .to_vec();
        }
    }
    Ok(out)
}

/// The image on white, without alpha (JPEG has none).
fn flatten(image: &DynamicImage) -> RgbImage {
    match image {
        DynamicImage::ImageRgba8(rgba) => RgbImage::from_fn(rgba.width(), rgba.height(), |x, y| {
            let [r, g, b, a] = rgba.get_pixel(x, y).0;
            let over =
                |c: u8| ((u16::from(c) * u16::from(a) + 255 * (255 - u16::from(a))) / 255) as u8;
            image::Rgb([over(r), over(g), over(b)])
        }),
        other => other.to_rgb8(),
    }
}

#[cfg(test)]
mod tests {
    use super::super::{decode, tests::png, uses_alpha};
    use super::*;

    fn spec(size: (u32, u32), fit: Fit, encoding: Encoding) -> OutputSpec {
        OutputSpec {
            name: "v".into(),
            width: size.0,
            height: size.1,
            fit,
            encoding,
            strip_metadata: false,
        }
    }

    #[test]
    fn each_variant_decodes_back_at_its_size_and_format() {
        let original = decode(&png(300, 200, true)).unwrap();
        for (size, fit, encoding, expect, format) in [
            (
                (128, 128),
                Fit::Cover,
                Encoding::Png,
                (128, 128),
                image::ImageFormat::Png,
            ),
            (
                (128, 128),
                Fit::Inside,
                Encoding::Png,
                (128, 85),
                image::ImageFormat::Png,
            ),
            (
                (64, 32),
                Fit::Cover,
                Encoding::Jpeg { quality: 80 },
                (64, 32),
                image::ImageFormat::Jpeg,
            ),
            (
                (100, 100),
                Fit::Inside,
                Encoding::Webp { quality: Some(70) },
                (100, 67),
                image::ImageFormat::WebP,
            ),
            (
                (50, 50),
                Fit::Cover,
                Encoding::Webp { quality: None },
                (50, 50),
                image::ImageFormat::WebP,
            ),
        ] {
            let spec = spec(size, fit, encoding);
            let v = make_variant(&original, &spec).unwrap();
            assert_eq!((v.width, v.height), expect, "{encoding:?} {fit:?}");
            assert_eq!(size_of(300, 200, &spec), expect, "known without making it");
            assert_eq!(image::guess_format(&v.data).unwrap(), format);
            let back = decode(&v.data).unwrap().image;
            assert_eq!((back.width(), back.height()), expect);
            // Alpha survives where the format has it; JPEG is flattened.
            let keeps_alpha = !matches!(encoding, Encoding::Jpeg { .. });
            assert_eq!(uses_alpha(&back), keeps_alpha, "{encoding:?}");
        }
    }

    #[test]
    fn cover_crops_the_centre() {
        // 300x100: the left third red, the rest blue. A 100x100 cover keeps the centre: blue.
        let image = image::RgbImage::from_fn(300, 100, |x, _| {
            if x < 100 {
                image::Rgb([255, 0, 0])
            } else {
                image::Rgb([0, 0, 255])
            }
        });
        let original = Decoded {
            image: DynamicImage::ImageRgb8(image),
            icc_profile: None,
        };
        let v = make_variant(&original, &spec((100, 100), Fit::Cover, Encoding::Png)).unwrap();
        let back = decode(&v.data).unwrap().image.to_rgb8();
        assert_eq!(back.get_pixel(50, 50).0, [0, 0, 255]);
        assert_eq!(
            back.get_pixel(5, 50).0[0],
            0,
            "no red at the left edge: it was cropped"
        );
    }
}

//! The images the fake returns: valid PNGs of about the wanted size, each one different.
//!
//! Clients decode, hash and store what they get, so an image must be a real PNG, and two images
//! must never be equal (a client that mixed up two answers, or stored one twice, would otherwise go
//! unnoticed). A benchmark asks for tens of 300 KB images a second on a small machine, and the
//! fake's CPU time is measured next to the worker's, so making an image must cost no more than a
//! few passes over its bytes: the pixels are compressed once, and each image is the same 64x64
//! picture with its own `tEXt` chunk, padded to size by a chunk of random bytes that decoders skip.
//! The padding comes after the image data, so that a client reading the header up to the image
//! data (to learn its size) reads what it would of a real image, whose bulk is its image data.
//! The padding and the end of the image are the same in every image: their base64 is made once,
//! and each answer encodes only its own head (a real provider's CPU is not on the client's host;
//! the fake's should weigh as little as it can beside the client it is measured with).

use ::png::chunk::{self, ChunkType};
use ::png::{BitDepth, ColorType, Encoder};
use base64_simd::STANDARD as BASE64;

/// Ancillary, private, safe to copy: decoders that do not know it skip it.
const PADDING: ChunkType = ChunkType(*b"fkPd");

/// Keyword of the per-image text chunk.
const KEYWORD: &[u8] = b"Comment";

/// The longest per-image text kept; more would only make images larger than asked.
const TEXT_MAX: usize = 240;

/// Bytes reserved for the per-image tEXt chunk when sizing the padding.
const TEXT_ESTIMATE: usize = 96;

/// Chunk length, type and CRC around a chunk's data.
const CHUNK_OVERHEAD: usize = 12;

/// Signature and IHDR chunk, as [`Encoder::write_header`] writes them.
const HEADER_LEN: usize = 8 + CHUNK_OVERHEAD + 13;

pub(crate) struct PngTemplate {
    width: u32,
    height: u32,
    /// The zlib stream of the picture's scanlines.
    idat: Vec<u8>,
    padding: Vec<u8>,
    /// The end of every image: the padding chunk (if any) and IEND.
    tail: Vec<u8>,
    /// The base64 of `tail` from each of its first three bytes on: an image's head, with as many
    /// bytes of the tail as make its length a multiple of three, is encoded and followed by one
    /// of these.
    tail_b64: [String; 3],
}

impl PngTemplate {
    pub(crate) fn new(target_bytes: usize) -> Self {
        Self::sized(target_bytes, 64)
    }

    /// Pictures of `side` x `side` pixels (a client that decodes and resizes them does the work
    /// a real image costs), padded to about `target_bytes`.
    pub(crate) fn sized(target_bytes: usize, side: u32) -> Self {
        let (width, height) = (side.max(1), side.max(1));
        // Each scanline is filtered as encoders do, with Sub (type 1: each byte minus the one a
        // pixel to its left); on a gradient that leaves a repetition deflate all but removes.
        let mut scanlines = Vec::with_capacity((height * (1 + 3 * width)) as usize);
        for y in 0..height {
            scanlines.push(1);
            let mut left = [0u8; 3];
            for x in 0..width {
                let pixel = [(x * 4) as u8, (y * 4) as u8, ((x + y) * 2) as u8];
                scanlines.extend((0..3).map(|c| pixel[c].wrapping_sub(left[c])));
                left = pixel;
            }
        }
        let idat = miniz_oxide::deflate::compress_to_vec_zlib(&scanlines, 9);
        // Everything but the text and the padding: header, IDAT, IEND.
        let fixed = HEADER_LEN + CHUNK_OVERHEAD + idat.len() + CHUNK_OVERHEAD;
        let pad = target_bytes.saturating_sub(fixed + CHUNK_OVERHEAD + TEXT_ESTIMATE);
        let mut padding = vec![0u8; pad];
        fastrand::fill(&mut padding);
        let mut template = Self {
            width,
            height,
            idat,
            padding,
            tail: Vec::new(),
            tail_b64: Default::default(),
        };
        let whole = template.encode_with("", true);
        let head = template.encode_with("", false).len() - CHUNK_OVERHEAD;
        template.tail = whole[head..].to_vec();
        template.tail_b64 = [0, 1, 2].map(|k| BASE64.encode_to_string(&template.tail[k..]));
        template
    }

    /// About the length of [`Self::encode`]'s output, to reserve room for it.
    pub(crate) fn len_estimate(&self) -> usize {
        HEADER_LEN + 4 * CHUNK_OVERHEAD + TEXT_ESTIMATE + self.padding.len() + self.idat.len()
    }

    /// The exact length of [`Self::encode`]'s output for `text`, without making the image: what
    /// a file of many images needs to announce its size before it is written.
    pub(crate) fn encoded_len(&self, text: &str) -> usize {
        let comment = KEYWORD.len() + 1 + text.chars().take(TEXT_MAX).count();
        let padding = if self.padding.is_empty() {
            0
        } else {
            CHUNK_OVERHEAD + self.padding.len()
        };
        HEADER_LEN
            + CHUNK_OVERHEAD
            + comment
            + CHUNK_OVERHEAD
            + self.idat.len()
            + padding
            + CHUNK_OVERHEAD
    }

    /// The exact length of [`Self::write_b64`]'s output for `text`.
    pub(crate) fn b64_len(&self, text: &str) -> usize {
        self.encoded_len(text).div_ceil(3) * 4
    }

    /// About the length of [`Self::write_b64`]'s output.
    pub(crate) fn b64_len_estimate(&self) -> usize {
        self.len_estimate().div_ceil(3) * 4 + 4 * (TEXT_MAX - TEXT_ESTIMATE).div_ceil(3)
    }

    /// The image, with a `tEXt` "Comment" chunk holding `text`. The chunk is Latin-1 and a prompt
    /// is UTF-8, so anything but printable ASCII becomes '?'.
    pub(crate) fn encode(&self, text: &str) -> Vec<u8> {
        self.encode_with(text, true)
    }

    /// The image, with its padding chunk or without it.
    fn encode_with(&self, text: &str, padding: bool) -> Vec<u8> {
        let mut comment = Vec::with_capacity(KEYWORD.len() + 1 + TEXT_MAX);
        comment.extend_from_slice(KEYWORD);
        comment.push(0);
        comment.extend(text.chars().take(TEXT_MAX).map(|c| {
            if c == ' ' || c.is_ascii_graphic() {
                c as u8
            } else {
                b'?'
            }
        }));
        let mut out = Vec::with_capacity(self.len_estimate() + TEXT_MAX);
        let mut encoder = Encoder::new(&mut out, self.width, self.height);
        encoder.set_color(ColorType::Rgb);
        encoder.set_depth(BitDepth::Eight);
        encoder
            .write_header()
            .and_then(|mut writer| {
                writer.write_chunk(chunk::tEXt, &comment)?;
                writer.write_chunk(chunk::IDAT, &self.idat)?;
                if padding && !self.padding.is_empty() {
                    writer.write_chunk(PADDING, &self.padding)?;
                }
                writer.finish()
            })
            .expect("writing a PNG to memory cannot fail");
        out
    }

    /// Appends the base64 of [`Self::encode`]: the head's (its chunks up to the padding) made
    /// now, the rest copied.
    pub(crate) fn write_b64(&self, text: &str, out: &mut String) {
        let mut head = self.encode_with(text, false);
        head.truncate(head.len() - CHUNK_OVERHEAD);
        // IEND alone is 12 bytes: the tail always has the two bytes this may take.
        let k = (3 - head.len() % 3) % 3;
        head.extend_from_slice(&self.tail[..k]);
        BASE64.encode_append(&head, out);
        out.push_str(&self.tail_b64[k]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> (u32, u32, Vec<String>) {
        let decoder = ::png::Decoder::new(std::io::Cursor::new(bytes));
        let mut reader = decoder.read_info().expect("valid PNG header");
        let mut buf = vec![0; reader.output_buffer_size()];
        let frame = reader.next_frame(&mut buf).expect("valid PNG data");
        assert_eq!(
            buf[3 * 65..3 * 66],
            [4, 4, 4],
            "pixel (1, 1) of the gradient"
        );
        let texts = reader.info().uncompressed_latin1_text.iter();
        let texts = texts.map(|t| format!("{}={}", t.keyword, t.text)).collect();
        (frame.width, frame.height, texts)
    }

    #[test]
    fn images_are_valid_pngs_carrying_their_text() {
        let template = PngTemplate::new(2048);
        let png = template.encode("imagegen-fake seq=3 index=1 prompt=a fox");
        let (w, h, texts) = decode(&png);
        assert_eq!((w, h), (64, 64));
        assert_eq!(texts, ["Comment=imagegen-fake seq=3 index=1 prompt=a fox"]);
        let other = template.encode("imagegen-fake seq=3 index=2 prompt=a fox");
        assert_ne!(png, other);
    }

    #[test]
    fn images_have_about_the_wanted_size() {
        for target in [0, 2048, 20_000, 300_000] {
            let template = PngTemplate::new(target);
            let png = template.encode("imagegen-fake seq=0 index=0 prompt=p");
            assert!(png.len() <= template.len_estimate(), "{target}");
            if target >= 2048 {
                let off = png.len().abs_diff(target);
                assert!(off <= TEXT_ESTIMATE, "{target}: {} bytes", png.len());
            }
            decode(&png);
        }
    }

    #[test]
    fn text_is_kept_printable_and_short() {
        let template = PngTemplate::new(0);
        let long = format!("prompt=caf\u{e9}\n{}", "x".repeat(500));
        let (_, _, texts) = decode(&template.encode(&long));
        assert!(
            texts[0].starts_with("Comment=prompt=caf??xxx"),
            "{}",
            texts[0]
        );
        assert_eq!(texts[0].len(), "Comment=".len() + TEXT_MAX);
    }

    #[test]
    fn lengths_are_known_without_encoding() {
        let long = format!("caf\u{e9} {}", "x".repeat(500));
        for target in [0, 2048, 300_000] {
            let template = PngTemplate::sized(target, 16);
            for text in [
                "",
                "t",
                "imagegen-fake seq=1 index=0 prompt=a fox",
                long.as_str(),
            ] {
                assert_eq!(template.encoded_len(text), template.encode(text).len());
                let mut b64 = String::new();
                template.write_b64(text, &mut b64);
                assert_eq!(template.b64_len(text), b64.len());
            }
        }
    }

    #[test]
    fn base64_is_the_image() {
        for target in [0, 5000] {
            let template = PngTemplate::new(target);
            // Heads of every length modulo three.
            for text in ["t", "tt", "ttt", "a fox on a hill"] {
                let mut b64 = String::from("prefix");
                template.write_b64(text, &mut b64);
                assert!(b64.len() - "prefix".len() <= template.b64_len_estimate());
                let png = BASE64.decode_to_vec(&b64["prefix".len()..]).unwrap();
                assert_eq!(png, template.encode(text), "{target} {text}");
            }
        }
    }
}

//! Reading a 200 answer of the Images API: `{"data": [{"b64_json" | "url", "revised_prompt"}],
//! "usage", "output_format"}`.
//!
//! The types are tolerant: every field is optional and open, because a parse failure after a
//! 200 would throw away an image that was already paid for. The megabytes of base64 are decoded
//! in the answer's own buffer, never copied.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::buffers::PooledBuf;
use crate::domain::error::Failure;
use crate::http::{billed_failure, decode_in_place, decode_owned};

#[derive(Deserialize)]
struct ImagesResponse<'a> {
    #[serde(default, borrow)]
    data: Vec<ImageData<'a>>,
    #[serde(default)]
    usage: Option<Value>,
    #[serde(default)]
    output_format: Option<String>,
}

#[derive(Deserialize)]
struct ImageData<'a> {
    /// Borrowed from the response body when it has no escapes (base64 never does): no copy.
    #[serde(default, borrow)]
    b64_json: Option<Borrowed<'a>>,
    #[serde(default)]
    url: Option<String>,
    #[serde(default, borrow)]
    revised_prompt: Option<Cow<'a, str>>,
}

/// A string borrowed from the response body when it has no escapes (serde only borrows a `Cow`
/// field directly, not inside an `Option`, hence the wrapper).
#[derive(Deserialize)]
struct Borrowed<'a>(#[serde(borrow)] Cow<'a, str>);

/// Where an answer's image is.
pub enum ImageBytes {
    Decoded(Bytes),
    Url(String),
}

/// A 200 answer, its images decoded.
pub struct Answer {
    pub images: Vec<(ImageBytes, Option<String>)>,
    pub usage: Option<Value>,
    pub output_format: Option<String>,
}

/// Parses a 200 answer and decodes its base64 images *in the body's own buffer* (SIMD): each
/// image is written over the text it came from. No second copy of an image ever exists: the
/// peak is the body itself (4/3 of the images), and the images are uploaded from it; it goes
/// back to its pool when the last of them is dropped.
pub fn decode_answer(mut body: PooledBuf) -> Result<Answer, Failure> {
    // The megabytes of base64 are located with a SIMD search for their closing quotes, and the
    // JSON parser only reads the rest (a few hundred bytes). When that is not possible (an
    // escape inside the base64), the parser reads the whole answer.
    let located = base64_spans(&body).and_then(|spans| {
        let mut skeleton = Vec::with_capacity(1024);
        let mut from = 0;
        for span in &spans {
            skeleton.extend_from_slice(&body[from..span.start]);
            from = span.end;
        }
        skeleton.extend_from_slice(&body[from..]);
        decode_located(&skeleton, &spans)
    });
    let (mut sources, usage, output_format) = match located {
        Some(found) => found,
        None => {
            let parsed: ImagesResponse<'_> = serde_json::from_slice(&body).map_err(|e| {
                billed_failure(format!(
                    "the provider's 200 response could not be read: {e}"
                ))
            })?;
            let base = body.as_ptr() as usize;
            sources_of(parsed, |b64| {
                let start = b64.as_ptr() as usize - base;
                Some(start..start + b64.len())
            })
        }
    };
    for (source, _) in &mut sources {
        if let Source::InBody(span) = source {
            *span = decode_in_place(&mut body, span.clone())?;
        }
    }
    answer_of((sources, usage, output_format), body.freeze())
}

/// The sources of an answer whose base64 values were taken out of its JSON (`skeleton`, where
/// each value is left empty), given where each value is (`images`, in order): `None` when the
/// skeleton does not pair each value with an image.
pub(super) fn decode_located(skeleton: &[u8], images: &[Range<usize>]) -> Option<Sources> {
    let parsed: ImagesResponse<'_> = serde_json::from_slice(skeleton).ok()?;
    // Every value must be the `b64_json` of a `data` item, in order.
    let in_data = parsed.data.iter().filter(|i| i.b64_json.is_some()).count();
    if in_data != images.len() {
        return None;
    }
    let mut images = images.iter().cloned();
    Some(sources_of(parsed, |_| images.next()))
}

/// The answer: each image in the body is a slice of `decoded`, where `sources` place them.
pub(super) fn answer_of(
    (sources, usage, output_format): Sources,
    decoded: Bytes,
) -> Result<Answer, Failure> {
    let mut images = Vec::with_capacity(sources.len());
    for (source, revised_prompt) in sources {
        let data = match source {
            Source::InBody(span) => ImageBytes::Decoded(decoded.slice(span)),
            Source::Owned(b64) => ImageBytes::Decoded(decode_owned(&b64)?),
            Source::Url(url) => ImageBytes::Url(url),
        };
        images.push((data, revised_prompt));
    }
    Ok(Answer {
        images,
        usage,
        output_format,
    })
}

pub(super) enum Source {
    /// Where the base64 text is within the body.
    InBody(Range<usize>),
    /// Base64 with JSON escapes (`\/`), unescaped by the parser.
    Owned(String),
    Url(String),
}

pub(super) type Sources = (Vec<(Source, Option<String>)>, Option<Value>, Option<String>);

/// The images of a parsed answer; `in_body` locates a borrowed base64 string in the body.
fn sources_of(
    parsed: ImagesResponse<'_>,
    mut in_body: impl FnMut(&str) -> Option<Range<usize>>,
) -> Sources {
    let sources = parsed
        .data
        .into_iter()
        .filter_map(|item| {
            let source = match (item.b64_json, item.url) {
                (Some(Borrowed(Cow::Borrowed(b64))), _) => Source::InBody(in_body(b64)?),
                (Some(Borrowed(Cow::Owned(b64))), _) => Source::Owned(b64),
                (None, Some(url)) => Source::Url(url),
                (None, None) => return None,
            };
            Some((source, item.revised_prompt.map(Cow::into_owned)))
        })
        .collect();
    (sources, parsed.usage, parsed.output_format)
}

/// The values of the `"b64_json"` keys of an answer, found by a SIMD search for their closing
/// quotes instead of a character-by-character parse. `None` when one has an escape (`\/`),
/// which only the JSON parser reads right. The key only matches where it is a key: inside a
/// JSON string its quotes would be escaped.
fn base64_spans(body: &[u8]) -> Option<Vec<Range<usize>>> {
    const KEY: &[u8] = b"\"b64_json\"";
    let skip_space = |mut i: usize| {
        while body.get(i).is_some_and(u8::is_ascii_whitespace) {
            i += 1;
        }
        i
    };
    let finder = memchr::memmem::Finder::new(KEY);
    let mut spans = Vec::new();
    let mut at = 0;
    while let Some(found) = finder.find(&body[at..]) {
        let colon = skip_space(at + found + KEY.len());
        if body.get(colon) != Some(&b':') {
            return None;
        }
        let quote = skip_space(colon + 1);
        if body.get(quote) != Some(&b'"') {
            // null or something else: the parser decides.
            at = quote;
            continue;
        }
        let start = quote + 1;
        let end = start + memchr::memchr2(b'"', b'\\', &body[start..])?;
        if body[end] != b'"' {
            return None;
        }
        spans.push(start..end);
        at = end + 1;
    }
    Some(spans)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::buffers::BufferPool;

    #[test]
    fn tolerant_parsing_keeps_images_with_unexpected_fields() {
        let body = br#"{"created":1,"data":[{"b64_json":"aGk=","future_field":1}],"size":"4096x4096",
            "quality":"ultra","output_format":"avif","usage":{"input_tokens":3,"new":{"x":1}},"extra":[]}"#;
        let parsed: ImagesResponse<'_> = serde_json::from_slice(body).unwrap();
        assert_eq!(parsed.data.len(), 1);
        assert!(matches!(
            parsed.data[0].b64_json,
            Some(Borrowed(Cow::Borrowed("aGk=")))
        ));
        assert_eq!(parsed.usage.unwrap()["input_tokens"], 3);
    }

    fn pooled(pool: &BufferPool, text: &str) -> PooledBuf {
        let mut buf = pool.try_take(text.len()).expect("an unbounded pool");
        buf.extend_from_slice(text.as_bytes());
        buf
    }

    #[test]
    fn base64_is_located_without_parsing_it_and_odd_answers_fall_back_to_the_parser() {
        let b64 = |data: &[u8]| base64_simd::STANDARD.encode_to_string(data);
        let image: Vec<u8> = (0..30_000u32).map(|i| (i * 13 % 256) as u8).collect();
        let decoded = |body: &str| -> Vec<(Vec<u8>, Option<String>)> {
            let pool = BufferPool::unbounded();
            decode_answer(pooled(&pool, body))
                .unwrap()
                .images
                .into_iter()
                .map(|(data, revised)| match data {
                    ImageBytes::Decoded(d) => (d.to_vec(), revised),
                    ImageBytes::Url(u) => (u.into_bytes(), revised),
                })
                .collect()
        };
        // The key's text inside a string has escaped quotes: it is not taken for a key.
        let tricky = r#"say \"b64_json\": \"AAAA\""#;
        let plain = format!(
            r#"{{"created":1,"data":[{{"revised_prompt":"{tricky}","b64_json" : "{}"}},
            {{"b64_json":"{}"}}],"usage":{{"total_tokens":2}}}}"#,
            b64(&image),
            b64(&image[..10])
        );
        assert_eq!(base64_spans(plain.as_bytes()).map(|s| s.len()), Some(2));
        let got = decoded(&plain);
        assert_eq!(got.len(), 2);
        assert_eq!(got[0].0, image);
        assert_eq!(got[0].1.as_deref(), Some(r#"say "b64_json": "AAAA""#));
        assert_eq!(got[1], (image[..10].to_vec(), None));
        // A b64_json outside `data`: the spans do not match the items, the parser reads it all.
        let outside = format!(
            r#"{{"extra":{{"b64_json":"AAAA"}},"data":[{{"b64_json":"{}"}}]}}"#,
            b64(&image)
        );
        assert_eq!(base64_spans(outside.as_bytes()).map(|s| s.len()), Some(2));
        assert_eq!(decoded(&outside), vec![(image.clone(), None)]);
        // An escaped slash: only the parser can read it.
        let escaped = format!(
            r#"{{"data":[{{"b64_json":"{}"}}]}}"#,
            b64(&[0xff, 0xff, 0xfe])
        )
        .replace('/', "\\/");
        assert!(base64_spans(escaped.as_bytes()).is_none());
        assert_eq!(decoded(&escaped), vec![(vec![0xff, 0xff, 0xfe], None)]);
        // null, with a URL instead.
        let null = r#"{"data":[{"b64_json": null, "url":"https://x/y.png"}]}"#;
        assert_eq!(base64_spans(null.as_bytes()).map(|s| s.len()), Some(0));
        assert_eq!(decoded(null), vec![(b"https://x/y.png".to_vec(), None)]);
    }

    #[test]
    fn images_are_decoded_in_the_body_buffer_in_order() {
        let b64 = |data: &[u8]| base64_simd::STANDARD.encode_to_string(data);
        let first: Vec<u8> = (0..40_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let second: Vec<u8> = (0..5u8).collect();
        // `/` may be escaped as `\/` in JSON: that image is unescaped by the parser instead.
        let third = [0xffu8, 0xff, 0xfe];
        let third_b64 = b64(&third).replace('/', "\\/");
        let body = format!(
            r#"{{"created":1,"data":[{{"b64_json":"{}","revised_prompt":"r1"}},{{"url":"https://x/y.png"}},
            {{"b64_json":"{}"}},{{"b64_json":"{third_b64}"}}],"usage":{{"total_tokens":9}},"output_format":"webp"}}"#,
            b64(&first),
            b64(&second)
        );
        let pool = BufferPool::unbounded();
        let answer = decode_answer(pooled(&pool, &body)).unwrap();
        assert_eq!(answer.usage.unwrap()["total_tokens"], 9);
        assert_eq!(answer.output_format.as_deref(), Some("webp"));
        let got: Vec<_> = answer
            .images
            .into_iter()
            .map(|(data, revised)| match data {
                ImageBytes::Decoded(d) => (d.to_vec(), revised),
                ImageBytes::Url(u) => (u.into_bytes(), revised),
            })
            .collect();
        assert_eq!(got[0], (first.clone(), Some("r1".to_string())));
        assert_eq!(got[1], (b"https://x/y.png".to_vec(), None));
        assert_eq!(got[2], (second, None));
        assert_eq!(got[3], (third.to_vec(), None));
        assert_eq!(
            pool.idle(),
            1,
            "the images dropped, their buffer is back in the pool"
        );

        let broken = format!(r#"{{"data":[{{"b64_json":"{}!"}}]}}"#, b64(&first));
        match decode_answer(pooled(&pool, &broken)) {
            Err(Failure::Retryable {
                possibly_billed,
                message,
                ..
            }) => {
                assert!(possibly_billed);
                assert!(message.contains("invalid base64"), "{message}");
            }
            Ok(_) => panic!("invalid base64 accepted"),
            Err(other) => panic!("{other:?}"),
        }
    }
}

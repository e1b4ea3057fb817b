//! The Images API's answers: a 200 body gives exactly the images a plain JSON parser and base64
//! decoder find in it (the fast path locates the base64 without parsing it), or a failure, and
//! the streaming reader gives the same as the whole-body reader however the body is cut into
//! chunks; an error body gives a classified failure. Never a panic.
#![no_main]

use imagegen_core::buffers::BufferPool;
use imagegen_core::domain::error::Failure;
use imagegen_core::domain::json::parse_unique;
use imagegen_core::domain::limits::MAX_REPORTED_DELAY;
use imagegen_core::openai::answer::{ImageBytes, decode_answer};
use imagegen_core::openai::errors::{ApiErrorBody, classify};
use imagegen_core::openai::stream::AnswerReader;
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

/// What the answer must hold, read the slow and obvious way: `None` when the body is not the
/// shape the reader accepts (then only "no panic" is checked).
fn expected(body: &[u8]) -> Option<Result<Vec<Expected>, ()>> {
    let text = std::str::from_utf8(body).ok()?;
    // A key named twice is read differently by different parsers: no oracle for it.
    let value = parse_unique(text).ok()?;
    let object = value.as_object()?;
    let string_or_null = |v: Option<&Value>| matches!(v, None | Some(Value::Null | Value::String(_)));
    if !string_or_null(object.get("output_format")) {
        return None;
    }
    let items = match object.get("data") {
        None => return Some(Ok(Vec::new())),
        Some(Value::Array(items)) => items,
        Some(_) => return None,
    };
    let mut out = Vec::new();
    for item in items {
        let item = item.as_object()?;
        for field in ["b64_json", "url", "revised_prompt"] {
            if !string_or_null(item.get(field)) {
                return None;
            }
        }
        match (item.get("b64_json"), item.get("url")) {
            (Some(Value::String(b64)), _) => {
                match base64_simd::STANDARD.decode_to_vec(b64.as_bytes()) {
                    Ok(bytes) => out.push(Expected::Bytes(bytes)),
                    Err(_) => return Some(Err(())),
                }
            }
            (_, Some(Value::String(url))) => out.push(Expected::Url(url.clone())),
            _ => {}
        }
    }
    Some(Ok(out))
}

#[derive(Debug, PartialEq)]
enum Expected {
    Bytes(Vec<u8>),
    Url(String),
}

fuzz_target!(|body: &[u8]| {
    let pool = BufferPool::unbounded();
    let mut buf = pool.try_take(body.len()).expect("an unbounded pool");
    buf.extend_from_slice(body);
    let images = |answer: imagegen_core::openai::answer::Answer| {
        answer
            .images
            .into_iter()
            .map(|(image, _)| match image {
                ImageBytes::Decoded(bytes) => Expected::Bytes(bytes.to_vec()),
                ImageBytes::Url(url) => Expected::Url(url),
            })
            .collect::<Vec<_>>()
    };
    let got = decode_answer(buf).map(images);

    // Streamed, in chunks whose sizes come from the body's last bytes (1 to 256 bytes each).
    let mut reader = AnswerReader::new(pool.try_take(body.len()).expect("an unbounded pool"));
    let sizes: Vec<usize> = body.iter().rev().take(16).map(|b| usize::from(*b) + 1).collect();
    let (mut at, mut i) = (0, 0);
    let mut pushed = Ok(());
    while at < body.len() && pushed.is_ok() {
        let size = sizes.get(i % sizes.len().max(1)).copied().unwrap_or(body.len());
        let end = (at + size).min(body.len());
        pushed = reader.push(&body[at..end]);
        (at, i) = (end, i + 1);
    }
    let streamed = pushed.and_then(|()| reader.finish()).map(images);
    match (&got, &streamed) {
        (Ok(whole), Ok(streamed)) => assert_eq!(whole, streamed, "streamed differently"),
        (Err(_), Err(failure)) => assert!(failure.possibly_billed()),
        _ => panic!("the whole body read {:?}, streamed {:?}", got.is_ok(), streamed.is_ok()),
    }
    if let Err(failure) = &got {
        assert!(failure.possibly_billed(), "a 200 was paid for: {failure:?}");
    }
    match expected(body) {
        Some(Ok(images)) => assert_eq!(got.as_ref().ok(), Some(&images)),
        Some(Err(())) => assert!(got.is_err(), "invalid base64 accepted"),
        None => {}
    }

    // The same bytes as an error body, under a status from its first bytes.
    let status = 400 + u16::from(body.first().copied().unwrap_or(0)) % 200;
    let error = ApiErrorBody::parse(body);
    match classify(status, &error, Some(MAX_REPORTED_DELAY), None, None) {
        Failure::Retryable { after, .. } => assert!(after <= Some(MAX_REPORTED_DELAY)),
        Failure::Permanent { message, .. } | Failure::Stop { message, .. } => {
            assert!(!message.is_empty())
        }
    }
});

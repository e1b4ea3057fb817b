//! The Images API's answers: a 200 body gives exactly the images a plain JSON parser and base64
//! decoder find in it (the fast path locates the base64 without parsing it), or a failure; an
//! error body gives a classified failure. Never a panic.
#![no_main]

use imagegen_core::buffers::BufferPool;
use imagegen_core::domain::error::Failure;
use imagegen_core::domain::json::parse_unique;
use imagegen_core::domain::limits::MAX_REPORTED_DELAY;
use imagegen_core::openai::answer::{ImageBytes, decode_answer};
use imagegen_core::openai::errors::{ApiErrorBody, classify};
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
    let got = decode_answer(buf).map(|answer| {
        answer
            .images
            .into_iter()
            .map(|(image, _)| match image {
                ImageBytes::Decoded(bytes) => Expected::Bytes(bytes.to_vec()),
                ImageBytes::Url(url) => Expected::Url(url),
            })
            .collect::<Vec<_>>()
    });
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

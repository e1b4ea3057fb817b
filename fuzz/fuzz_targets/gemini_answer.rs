//! The Gemini API's answers: a 200 body gives exactly the images a plain JSON parser and base64
//! decoder find in its first candidate, or, when it holds none, a failure that is a refusal
//! exactly when the body says so (a `blockReason`, a refusing `finishReason`); an error body
//! gives a classified failure with a bounded delay. Never a panic.
#![no_main]

use imagegen_core::buffers::BufferPool;
use imagegen_core::domain::error::{ErrorKind, Failure};
use imagegen_core::domain::json::parse_unique;
use imagegen_core::domain::limits::MAX_REPORTED_DELAY;
use imagegen_core::gemini::answer::{REFUSAL_FINISH_REASONS, decode_answer};
use imagegen_core::gemini::errors::{Status, classify};
use libfuzzer_sys::fuzz_target;
use serde_json::{Map, Value};

enum Expected {
    Images(Vec<Vec<u8>>),
    Refusal,
    NoImage,
}

/// One of two spellings of a field (camelCase, as the REST API writes, or snake_case); `Err`
/// when both are there (the reader refuses that) or the value is not of the wanted shape.
fn field<'a>(o: &'a Map<String, Value>, camel: &str, snake: &str) -> Result<Option<&'a Value>, ()> {
    match (o.get(camel), o.get(snake)) {
        (Some(_), Some(_)) => Err(()),
        (Some(Value::Null), None) | (None, Some(Value::Null)) | (None, None) => Ok(None),
        (Some(v), None) | (None, Some(v)) => Ok(Some(v)),
    }
}

fn string(v: Option<&Value>) -> Result<Option<&str>, ()> {
    match v {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(()),
    }
}

/// What the answer must give, read the slow and obvious way; `None`: no oracle (only "no
/// panic" is checked).
fn expected(body: &[u8]) -> Option<Expected> {
    let value = parse_unique(std::str::from_utf8(body).ok()?).ok()?;
    let top = value.as_object()?;
    let candidates = match top.get("candidates") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(c)) => c.clone(),
        Some(_) => return None,
    };
    let feedback = field(top, "promptFeedback", "prompt_feedback").ok()?;
    let block = match feedback {
        None => None,
        Some(Value::Object(f)) => string(field(f, "blockReason", "block_reason").ok()?).ok()?,
        Some(_) => return None,
    };
    for other in [("usageMetadata", "usage_metadata"), ("modelVersion", "model_version"), ("responseId", "response_id")] {
        let v = field(top, other.0, other.1).ok()?;
        if other.0 != "usageMetadata" {
            string(v).ok()?;
        }
    }
    let mut images = Vec::new();
    let mut finish = None;
    for (i, candidate) in candidates.iter().enumerate() {
        let c = candidate.as_object()?;
        let reason = string(field(c, "finishReason", "finish_reason").ok()?).ok()?;
        string(field(c, "finishMessage", "finish_message").ok()?).ok()?;
        let parts = match c.get("content") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Object(content)) => match content.get("parts") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(p)) => p.clone(),
                Some(_) => return None,
            },
            Some(_) => return None,
        };
        let mut found = Vec::new();
        for part in &parts {
            let p = part.as_object()?;
            let thought = match p.get("thought") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(_) => return None,
            };
            string(p.get("text")).ok()?;
            let inline = match field(p, "inlineData", "inline_data").ok()? {
                None => continue,
                Some(Value::Object(d)) => d,
                Some(_) => return None,
            };
            let mime = string(field(inline, "mimeType", "mime_type").ok()?).ok()?;
            let data = string(inline.get("data")).ok()?;
            if thought || mime.is_some_and(|m| !m.starts_with("image/")) {
                continue;
            }
            if let Some(data) = data {
                found.push(data.to_string());
            }
        }
        if i == 0 {
            finish = reason.map(str::to_string);
            for b64 in found {
                // Invalid base64 fails the answer: no oracle for which failure.
                images.push(base64_simd::STANDARD.decode_to_vec(b64.as_bytes()).ok()?);
            }
        }
    }
    if !images.is_empty() {
        return Some(Expected::Images(images));
    }
    let refused = block.is_some()
        || finish
            .as_deref()
            .is_some_and(|r| REFUSAL_FINISH_REASONS.contains(&r));
    Some(if refused { Expected::Refusal } else { Expected::NoImage })
}

fuzz_target!(|data: &[u8]| {
    let Some((&first, rest)) = data.split_first() else {
        return;
    };
    if first & 1 == 0 {
        let pool = BufferPool::unbounded();
        let mut buf = pool.try_take(rest.len()).expect("unbounded");
        buf.extend_from_slice(rest);
        let got = decode_answer(buf);
        match (expected(rest), got) {
            (None, _) => {}
            (Some(Expected::Images(want)), Ok(answer)) => {
                let got: Vec<Vec<u8>> = answer.images.iter().map(|i| i.data.to_vec()).collect();
                assert_eq!(got, want);
            }
            (Some(Expected::Refusal), Err(f)) => {
                assert_eq!(f.kind(), Some(ErrorKind::ContentPolicy), "{f}")
            }
            (Some(Expected::NoImage), Err(f)) => {
                assert_eq!(f.kind(), Some(ErrorKind::InvalidRequest), "{f}")
            }
            (Some(Expected::Images(_)), Err(f)) => panic!("images expected, got {f}"),
            (Some(_), Ok(answer)) => panic!("no image expected, got {}", answer.images.len()),
        }
    } else {
        let status = 400 + u16::from(first >> 1) % 200;
        let failure = classify(status, &Status::parse(rest), None, None);
        if let Failure::Retryable { after: Some(after), .. } = &failure {
            assert!(*after <= MAX_REPORTED_DELAY);
        }
        assert!(!failure.message().is_empty());
    }
});

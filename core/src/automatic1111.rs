//! What AUTOMATIC1111's web UI (and Forge, its fork) answers on its API: `POST
//! /sdapi/v1/txt2img` answers `{"images": [BASE64 PNG...], "parameters": {...}, "info": "JSON
//! TEXT"}`; errors are `{"error": CLASS, "detail", "body", "errors": MESSAGE}` (its own handler:
//! 401 with `--api-auth`, 500 for anything that failed, an out-of-memory among them), or
//! FastAPI's 422 `{"detail": [...]}` for a body it cannot read.
//!
//! The traps: with more than one image the server may put a grid of them first (its
//! `return_grid` option): `info.index_of_first_image` says where the images start; `info` is
//! JSON inside a string; and nothing in an answer can be fetched again: a lost answer is a lost
//! (and spent) run.

use serde::Deserialize;
use serde_json::Value;

use crate::domain::error::{ErrorKind, Failure, ProviderDetail, StopReason};
use crate::http::{billed_failure, by_status, decode_owned, fastapi_detail};

/// A read answer: its images (PNG bytes, grid left out) and the seeds they were made with.
#[derive(Debug, Clone, PartialEq)]
pub struct Generated {
    pub images: Vec<bytes::Bytes>,
    pub seeds: Vec<u64>,
}

#[derive(Deserialize)]
struct Body {
    #[serde(default)]
    images: Vec<String>,
    #[serde(default)]
    info: Option<String>,
}

#[derive(Deserialize, Default)]
struct Info {
    #[serde(default)]
    index_of_first_image: usize,
    #[serde(default)]
    all_seeds: Vec<u64>,
}

/// Reads the answer to a `txt2img`. The run is spent: a failure to read it is billed.
pub fn read_answer(body: &[u8]) -> Result<Generated, Failure> {
    let parsed: Body = serde_json::from_slice(body)
        .map_err(|e| billed_failure(format!("the server's answer could not be read: {e}")))?;
    let info: Info = parsed
        .info
        .as_deref()
        .and_then(|i| serde_json::from_str(i).ok())
        .unwrap_or_default();
    let first = if parsed.images.len() > 1 {
        info.index_of_first_image.min(parsed.images.len())
    } else {
        0
    };
    let images = parsed.images[first..]
        .iter()
        .map(|b64| decode_owned(b64.strip_prefix("data:image/png;base64,").unwrap_or(b64)))
        .collect::<Result<Vec<_>, _>>()?;
    if images.is_empty() {
        return Err(billed_failure(
            "the server answered no image (send_images off, or the run was interrupted)".into(),
        ));
    }
    Ok(Generated {
        images,
        seeds: info.all_seeds,
    })
}

/// A refused call: 401 is wrong credentials (a stop); 422 a body it cannot take (permanent); a
/// 500 is a run that failed there (retried: an out-of-memory passes when the GPU is free).
pub fn classify(status: u16, body: &[u8]) -> Failure {
    let value: Option<Value> = serde_json::from_slice(body).ok();
    let text = |key: &str| {
        value
            .as_ref()
            .and_then(|v| v.get(key))
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(str::to_string)
    };
    let class = text("error");
    let message = match (class.as_deref(), text("errors").or_else(|| text("detail"))) {
        (Some(class), Some(m)) => format!("{class}: {m}"),
        (None, Some(m)) => m,
        _ => fastapi_detail(body).unwrap_or_else(|| {
            format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body[..body.len().min(300)]).trim()
            )
        }),
    };
    let message: String = message.chars().take(1000).collect();
    let detail = Box::new(ProviderDetail {
        status: Some(status),
        code: class,
        ..ProviderDetail::default()
    });
    match status {
        401 => Failure::Stop {
            reason: StopReason::Unauthorized,
            message: format!("the server refused the credentials: {message}"),
            detail,
        },
        404 | 422 => Failure::Permanent {
            kind: ErrorKind::InvalidRequest,
            message,
            detail,
        },
        _ => by_status(status, message, None, None, detail),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_is_left_out_and_the_seeds_kept() {
        let png = "iVBORw0KGgo=";
        let body = format!(
            r#"{{"images":["{png}","{png}","{png}"],"parameters":{{}},
                "info":"{{\"index_of_first_image\": 1, \"all_seeds\": [7, 8]}}"}}"#
        );
        let g = read_answer(body.as_bytes()).unwrap();
        assert_eq!(g.images.len(), 2);
        assert_eq!(g.seeds, vec![7, 8]);
        let one = format!(r#"{{"images":["{png}"],"info":"{{\"index_of_first_image\": 1}}"}}"#);
        assert_eq!(read_answer(one.as_bytes()).unwrap().images.len(), 1);
        assert!(
            read_answer(br#"{"images":[]}"#)
                .unwrap_err()
                .possibly_billed()
        );
        assert!(read_answer(br#"{"images":["%%%"]}"#).is_err());
    }

    #[test]
    fn errors_are_classified() {
        let oom =
            br#"{"error":"OutOfMemoryError","detail":"","body":"","errors":"CUDA out of memory"}"#;
        let f = classify(500, oom);
        assert!(f.is_retryable());
        assert!(
            f.message().contains("OutOfMemoryError: CUDA out of memory"),
            "{f}"
        );
        let auth = br#"{"error":"HTTPException","detail":"Incorrect username or password","body":"","errors":"401: Incorrect username or password"}"#;
        assert!(matches!(classify(401, auth), Failure::Stop { .. }));
        let bad = br#"{"detail":[{"loc":["body","steps"],"msg":"value is not a valid integer","type":"type_error.integer"}]}"#;
        let f = classify(422, bad);
        assert_eq!(f.kind(), Some(ErrorKind::InvalidRequest));
        assert!(f.message().contains("steps"), "{f}");
    }
}

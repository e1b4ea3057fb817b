//! Reading a 200 answer of `generateContent`: `{"candidates": [{"content": {"parts": [...]},
//! "finishReason"}], "promptFeedback": {"blockReason"}, "usageMetadata", "modelVersion",
//! "responseId"}`, where each part is a `text` or an `inlineData {mimeType, data}` (the REST API
//! writes camelCase; the snake_case of the request shape is read too).
//!
//! Every field is optional and open: a parse failure after a 200 would throw away an image that
//! was already paid for. The base64 of the images is decoded in the answer's own buffer.

use std::borrow::Cow;
use std::ops::Range;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::Value;

use crate::buffers::PooledBuf;
use crate::domain::error::{ErrorKind, Failure, ProviderDetail};
use crate::http::{billed_failure, decode_in_place, decode_owned};

/// `finishReason`s that say the model refused to make the image (or was stopped from it).
pub const REFUSAL_FINISH_REASONS: &[&str] = &[
    "SAFETY",
    "PROHIBITED_CONTENT",
    "BLOCKLIST",
    "SPII",
    "RECITATION",
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION",
    "IMAGE_OTHER",
    "NO_IMAGE",
];

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Response<'a> {
    #[serde(default, borrow)]
    candidates: Vec<Candidate<'a>>,
    #[serde(default, alias = "prompt_feedback")]
    prompt_feedback: Option<PromptFeedback>,
    #[serde(default, alias = "usage_metadata")]
    usage_metadata: Option<Value>,
    #[serde(default, alias = "model_version")]
    model_version: Option<String>,
    #[serde(default, alias = "response_id")]
    response_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Candidate<'a> {
    #[serde(default, borrow)]
    content: Option<Content<'a>>,
    #[serde(default, alias = "finish_reason")]
    finish_reason: Option<String>,
    #[serde(default, alias = "finish_message")]
    finish_message: Option<String>,
}

#[derive(Deserialize)]
struct Content<'a> {
    #[serde(default, borrow)]
    parts: Vec<Part<'a>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Part<'a> {
    #[serde(default)]
    text: Option<String>,
    #[serde(default, borrow, alias = "inline_data")]
    inline_data: Option<InlineData<'a>>,
    /// A "thought" part (models that think show their drafts): never the answer.
    #[serde(default)]
    thought: Option<bool>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct InlineData<'a> {
    #[serde(default, alias = "mime_type")]
    mime_type: Option<String>,
    /// Borrowed from the body when it has no escapes (base64 never does): no copy.
    #[serde(default, borrow)]
    data: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct PromptFeedback {
    #[serde(default, alias = "block_reason")]
    block_reason: Option<String>,
    #[serde(default, alias = "block_reason_message")]
    block_reason_message: Option<String>,
}

/// One image of an answer.
#[derive(Debug)]
pub struct Image {
    pub data: Bytes,
    /// The MIME type the answer declared (the bytes decide what is stored).
    pub mime_type: Option<String>,
}

/// A 200 answer that holds images.
#[derive(Debug)]
pub struct Answer {
    pub images: Vec<Image>,
    /// The text parts beside the images (the model's comment on its image).
    pub text: Option<String>,
    pub usage: Option<Value>,
    pub model_version: Option<String>,
    pub response_id: Option<String>,
}

enum Source {
    InBody(Range<usize>),
    Owned(String),
}

/// Reads a 200 answer. An answer without an image is a failure, never a success: a refusal
/// (`promptFeedback.blockReason`, or a refusing `finishReason`) is a permanent `content_policy`
/// failure with the reason as its code; any other answer without an image (text only, a
/// token limit) is a permanent `invalid_request` that quotes what the model said. Neither is
/// worth a blind retry, and both were billed.
pub fn decode_answer(mut body: PooledBuf) -> Result<Answer, Failure> {
    let read = read_parts(&body)?;
    if read.sources.is_empty() {
        return Err(no_image(
            read.feedback,
            read.finish_reason,
            read.finish_message,
            &read.text,
            read.response_id,
        ));
    }
    let mut sources = read.sources;
    for (source, _) in &mut sources {
        if let Source::InBody(span) = source {
            *span = decode_in_place(&mut body, span.clone())?;
        }
    }
    let decoded = body.freeze();
    let mut images = Vec::with_capacity(sources.len());
    for (source, mime_type) in sources {
        let data = match source {
            Source::InBody(span) => decoded.slice(span),
            Source::Owned(b64) => decode_owned(&b64)?,
        };
        images.push(Image { data, mime_type });
    }
    Ok(Answer {
        images,
        text: Some(read.text).filter(|t| !t.is_empty()),
        usage: read.usage,
        model_version: read.model_version,
        response_id: read.response_id,
    })
}

/// What an answer holds, its images located in the body (or unescaped into copies).
struct Parts {
    sources: Vec<(Source, Option<String>)>,
    text: String,
    finish_reason: Option<String>,
    finish_message: Option<String>,
    feedback: Option<PromptFeedback>,
    usage: Option<Value>,
    model_version: Option<String>,
    response_id: Option<String>,
}

fn read_parts(body: &[u8]) -> Result<Parts, Failure> {
    let base = body.as_ptr() as usize;
    let parsed: Response<'_> = serde_json::from_slice(body).map_err(|e| {
        billed_failure(format!(
            "the provider's 200 response could not be read: {e}"
        ))
    })?;
    let mut sources = Vec::new();
    let mut text = String::new();
    let candidate = parsed.candidates.into_iter().next();
    let (finish_reason, finish_message) = match &candidate {
        Some(c) => (c.finish_reason.clone(), c.finish_message.clone()),
        None => (None, None),
    };
    for part in candidate
        .and_then(|c| c.content)
        .map(|c| c.parts)
        .unwrap_or_default()
    {
        if part.thought == Some(true) {
            continue;
        }
        if let Some(t) = part.text {
            if !text.is_empty() {
                text.push('\n');
            }
            text.push_str(&t);
        }
        if let Some(InlineData {
            mime_type,
            data: Some(data),
        }) = part.inline_data
        {
            if mime_type
                .as_deref()
                .is_some_and(|m| !m.starts_with("image/"))
            {
                continue;
            }
            let source = match data {
                Cow::Borrowed(b64) => {
                    let start = b64.as_ptr() as usize - base;
                    Source::InBody(start..start + b64.len())
                }
                Cow::Owned(b64) => Source::Owned(b64),
            };
            sources.push((source, mime_type));
        }
    }
    Ok(Parts {
        sources,
        text,
        finish_reason,
        finish_message,
        feedback: parsed.prompt_feedback,
        usage: parsed.usage_metadata,
        model_version: parsed.model_version,
        response_id: parsed.response_id,
    })
}

/// The failure of a 200 answer without an image.
fn no_image(
    feedback: Option<PromptFeedback>,
    finish_reason: Option<String>,
    finish_message: Option<String>,
    text: &str,
    response_id: Option<String>,
) -> Failure {
    let said = |t: &str| {
        let t: String = t.chars().take(300).collect();
        if t.is_empty() {
            String::new()
        } else {
            format!(": {t}")
        }
    };
    let block = feedback.as_ref().and_then(|f| f.block_reason.clone());
    let refusal = block.clone().or_else(|| {
        finish_reason
            .clone()
            .filter(|r| REFUSAL_FINISH_REASONS.contains(&r.as_str()))
    });
    let detail = |code: Option<String>| {
        Box::new(ProviderDetail {
            status: Some(200),
            code,
            request_id: response_id.clone(),
            refusal: None,
            rate_limits: None,
            charged: false,
        })
    };
    if let Some(reason) = refusal {
        let (what, why) = match &block {
            Some(_) => (
                "blocked the prompt",
                feedback
                    .and_then(|f| f.block_reason_message)
                    .unwrap_or_default(),
            ),
            None => (
                "refused to make the image",
                finish_message.unwrap_or_else(|| text.to_string()),
            ),
        };
        return Failure::Permanent {
            kind: ErrorKind::ContentPolicy,
            message: format!("the provider {what} ({reason}){}", said(&why)),
            detail: detail(Some(reason)),
        };
    }
    let reason = finish_reason.unwrap_or_else(|| "none".into());
    Failure::Permanent {
        kind: ErrorKind::InvalidRequest,
        message: format!(
            "the provider answered without an image (finishReason {reason}){}",
            said(text)
        ),
        detail: detail(Some(reason)),
    }
}

#[cfg(test)]
mod tests;

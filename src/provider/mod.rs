//! Image providers: what turns a prompt into image bytes.
//!
//! The interface fits the three shapes of image APIs:
//! - synchronous JSON in, images out (OpenAI, Azure OpenAI, Together, DeepInfra): one call;
//! - multipart in, image bytes out (Stability AI): one call, the bytes are the image;
//! - submit, then poll a queue (ComfyUI, fal, Replicate): the provider writes the remote request
//!   id to the job's [`Journal`] *before* waiting, so that a redelivered job reads it back and
//!   polls the existing request instead of paying for a new one.
//!
//! Errors are already classified ([`Failure`]) by the provider, which knows its protocol.

pub mod openai;
pub mod placeholder;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::Value;

use crate::config::{ProviderKind, Settings};
use crate::error::Failure;
use crate::job::Job;

/// One provider call: produce the images of `job` at `indices` (fewer than `job.n` when some of
/// the job's images are already stored).
#[derive(Debug, Clone, Copy)]
pub struct ImageRequest<'a> {
    pub job: &'a Job,
    pub indices: &'a [u32],
}

impl ImageRequest<'_> {
    /// How many images to ask for.
    pub fn n(&self) -> u8 {
        self.indices.len() as u8
    }
}

#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub data: Bytes,
    pub content_type: &'static str,
    pub extension: &'static str,
    pub revised_prompt: Option<String>,
}

/// What one provider call returned.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub images: Vec<GeneratedImage>,
    /// Usage as the provider reported it (tokens for OpenAI).
    pub usage: Option<Value>,
    pub model: Option<String>,
    pub request_id: Option<String>,
    /// The response's rate-limit headers, for the throttle.
    pub rate_limits: Option<crate::throttle::RateLimits>,
}

/// Small durable notes of a job's progress at the provider, kept next to the job's images.
pub trait Journal: Send + Sync {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, Failure>>;
    fn put<'a>(&'a self, name: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), Failure>>;
}

pub trait ImageProvider: Send + Sync {
    /// A short name for logs (`openai`, `placeholder`).
    fn name(&self) -> &'static str;

    /// Makes one attempt. Retries are the caller's business; the failure says whether they help.
    fn generate<'a>(
        &'a self,
        request: ImageRequest<'a>,
        journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Generation, Failure>>;
}

/// Builds the configured provider.
pub fn from_settings(settings: &Settings) -> anyhow::Result<Arc<dyn ImageProvider>> {
    Ok(match settings.provider.kind {
        ProviderKind::Openai => Arc::new(openai::OpenAi::new(
            &settings.provider,
            settings.worker.concurrency,
        )?),
        ProviderKind::Placeholder => Arc::new(placeholder::Placeholder),
    })
}

/// The content type and file extension of image bytes, by their magic numbers; `declared` (the
/// requested output format) is the fallback.
pub fn sniff(data: &[u8], declared: &str) -> (&'static str, &'static str) {
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        ("image/png", "png")
    } else if data.starts_with(&[0xff, 0xd8, 0xff]) {
        ("image/jpeg", "jpeg")
    } else if data.len() >= 12 && &data[..4] == b"RIFF" && &data[8..12] == b"WEBP" {
        ("image/webp", "webp")
    } else if data.starts_with(b"GIF87a") || data.starts_with(b"GIF89a") {
        ("image/gif", "gif")
    } else {
        match declared {
            "png" => ("image/png", "png"),
            "jpeg" | "jpg" => ("image/jpeg", "jpeg"),
            "webp" => ("image/webp", "webp"),
            _ => ("application/octet-stream", "bin"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffing_trusts_bytes_over_the_declared_format() {
        assert_eq!(
            sniff(b"\x89PNG\r\n\x1a\nrest", "jpeg"),
            ("image/png", "png")
        );
        assert_eq!(
            sniff(&[0xff, 0xd8, 0xff, 0xe0], "png"),
            ("image/jpeg", "jpeg")
        );
        assert_eq!(
            sniff(b"RIFF\0\0\0\0WEBPVP8 ", "png"),
            ("image/webp", "webp")
        );
        assert_eq!(sniff(b"????", "webp"), ("image/webp", "webp"));
        assert_eq!(sniff(b"????", "tiff"), ("application/octet-stream", "bin"));
    }
}

//! Image providers: what turns a request into image bytes, behind one contract that is not any
//! one provider's.
//!
//! A provider takes a neutral [`ImageRequest`] (the job's fields with its defaults filled in, and
//! the job's `params` for its own vocabulary) and declares its [`Capabilities`]. It answers in
//! one of two ways:
//!
//! - **done**: the images are in the answer (OpenAI, Azure OpenAI, Gemini, Stability, AUTOMATIC1111);
//! - **pending**: the work is queued at the provider (BFL, Replicate, fal, ComfyUI): the answer
//!   carries a [`Handle`] and when to look again. The worker writes the handle to the job's
//!   [`Journal`] before it waits, and polls it later (in this process or, after a crash or a
//!   redelivery, in another): a job is never submitted twice. A provider that names the
//!   request itself (a client-chosen id) writes it to the journal *before* it submits.
//!
//! Each provider classifies its own errors into the taxonomy (it knows its protocol; the
//! status-code defaults are shared in [`http`]), reads its own rate-limit headers, and reports
//! its usage in the neutral [`Usage`], which the prices in config turn into a cost.

/// The answer buffers, from the core crate (its answer readers decode into them).
pub use imagegen_core::buffers;
pub mod automatic1111;
pub mod azure;
pub mod bfl;
pub mod comfyui;
pub mod download;
pub mod fal;
pub mod fetch;
pub mod gemini;
pub mod http;
pub mod multipart;
pub mod openai;
pub mod placeholder;
pub mod queued;
pub mod reference;
pub mod replicate;
pub mod request;
pub mod stability;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use reference::{RefImage, Resolved};
pub use request::{Capabilities, ImageRequest, JobDefaults, Mode, Size, Sizes};

use crate::config::{KindSettings, ProviderSettings};
use crate::domain::cost::Usage;
use crate::domain::error::{ErrorKind, Failure};
use crate::domain::limits::RateLimits;

#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub data: Bytes,
    pub content_type: &'static str,
    pub extension: &'static str,
    pub revised_prompt: Option<String>,
}

/// The images of one finished request.
#[derive(Debug, Clone, Default)]
pub struct Generation {
    pub images: Vec<GeneratedImage>,
    /// The usage as the provider reported it, for the event (its own vocabulary).
    pub reported_usage: Option<Value>,
    /// The usage in the neutral units the prices apply to (estimated when nothing was reported).
    pub usage: Usage,
    pub model: Option<String>,
    pub request_id: Option<String>,
    /// The answer's rate limits, for the throttle.
    pub rate_limits: Option<RateLimits>,
}

/// What a provider needs to find a queued request again: its own id, a polling URL, a host.
/// Opaque to the worker, which keeps it in the job's journal.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Handle(pub Value);

/// How a request ended, for now.
#[derive(Debug, Clone)]
pub enum Answer {
    /// The images are here.
    Done(Generation),
    /// The provider queued the work: poll `handle` again after `after`. Not a failure, and
    /// never counted as an attempt.
    Pending {
        handle: Handle,
        after: Duration,
        /// The provider's id of the request, for logs and events.
        request_id: Option<String>,
    },
    /// The provider has no room for the request now (the worker's share of its cap on queued
    /// work is full): nothing was sent; ask again after `after`. Not an attempt, and the job's
    /// message is not held meanwhile.
    Busy { after: Duration },
}

/// The code (in a failure's detail) of a poll that found the queued request gone at the
/// provider (failed there, forgotten, its result expired): the worker forgets the handle, and the
/// job's next attempt submits anew.
pub const HANDLE_LOST: &str = "handle_lost";

/// The job's journal, as a provider sees it: where a provider that names its requests itself
/// (a client-chosen id: ComfyUI's `prompt_id`) records the request it is about to make, *before*
/// it makes it. A later delivery (after a crash, a lost answer) then finds that request (by
/// [`ImageProvider::poll`]) instead of making another. Providers that learn their request's id
/// from the answer need not call it: the worker records the handle of a `Pending` answer itself.
pub trait Journal: Send + Sync {
    /// Records `handle` (with the request's id, for logs and events) as the request the job
    /// waits for. An error means it could not be kept: the provider must not submit (the
    /// request could be made twice).
    fn record<'a>(
        &'a self,
        handle: &'a Handle,
        request_id: Option<&'a str>,
    ) -> BoxFuture<'a, Result<(), Failure>>;
}

/// A request's reference images as files uploaded to the provider, by id, for its batch lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BatchFiles {
    pub images: Vec<String>,
    pub mask: Option<String>,
}

impl BatchFiles {
    /// Stand-ins for a request's references, to ask whether it could be a batch line.
    pub fn stand_ins(request: &ImageRequest) -> Self {
        Self {
            images: (0..request.reference_count)
                .map(|i| format!("file-{i}"))
                .collect(),
            mask: request.masked.then(|| "file-mask".to_string()),
        }
    }
}

pub trait ImageProvider: Send + Sync {
    /// The provider's kind, for logs (`openai`, `placeholder`).
    fn kind(&self) -> &'static str;

    /// What it can do.
    fn capabilities(&self) -> &Capabilities;

    /// What it fills in for the fields a job leaves out.
    fn defaults(&self) -> &JobDefaults;

    /// What a request would use, for estimates before any call (and when an answer reports
    /// nothing).
    fn estimate(&self, request: &ImageRequest) -> Usage {
        Usage {
            images: request.count.into(),
            estimated: true,
            ..Usage::default()
        }
    }

    /// Makes one request (at most `capabilities().images_per_call` images). Retries are the
    /// caller's business; the failure says whether they help.
    fn submit<'a>(
        &'a self,
        request: &'a ImageRequest,
        journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>>;

    /// Whether the provider answers, with the configured credentials, by its cheapest
    /// authenticated call (none buys anything): `Ok` says what it answered, `Err` why not.
    /// `imagegen providers` shows it.
    fn check(&self) -> BoxFuture<'_, Result<String, String>> {
        Box::pin(async { Ok("nothing to check".into()) })
    }

    /// Cancels a queued request the job no longer wants (cancelled, or past its deadline), where
    /// the provider can: best effort, never an error (the job ends either way).
    fn cancel<'a>(&'a self, _handle: &'a Handle) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// This request as a line of the provider's batch API: the line's `url` (the endpoint) and
    /// `body`; `files` names the request's reference images as uploaded to the provider (a
    /// batch line refers to them by id). `None`: the provider has no batch API, or none for
    /// this request.
    fn batch_line(
        &self,
        _request: &ImageRequest,
        _files: &BatchFiles,
    ) -> Option<(&'static str, serde_json::Value)> {
        None
    }

    /// What an answered line of a batch bought: its `status` and `body` read as the live answer
    /// to the same request would be (images checked, usage read, errors classified).
    fn read_batch_line<'a>(
        &'a self,
        _status: u16,
        _body: &'a [u8],
        _request_id: Option<String>,
        _request: &'a ImageRequest,
    ) -> BoxFuture<'a, Result<Generation, Failure>> {
        Box::pin(async move {
            Err(Failure::Permanent {
                kind: ErrorKind::InvalidRequest,
                message: format!("the {} provider has no batch API", self.kind()),
                detail: Box::default(),
            })
        })
    }

    /// Looks at a queued request again. Only providers that answer `Pending` are asked.
    fn poll<'a>(
        &'a self,
        _handle: &'a Handle,
        _request: &'a ImageRequest,
        _journal: &'a dyn Journal,
    ) -> BoxFuture<'a, Result<Answer, Failure>> {
        Box::pin(async move {
            Err(Failure::Permanent {
                kind: ErrorKind::InvalidRequest,
                message: format!(
                    "the {} provider queues no requests, so there is nothing to poll",
                    self.kind()
                ),
                detail: Box::default(),
            })
        })
    }
}

/// Builds a configured provider; `memory`: the worker's answer memory, shared by its providers.
pub fn build(
    settings: &ProviderSettings,
    memory: &buffers::BufferPool,
) -> anyhow::Result<Arc<dyn ImageProvider>> {
    Ok(match &settings.kind {
        KindSettings::Openai(s) => Arc::new(openai::OpenAi::new(s, memory.clone())?),
        KindSettings::Placeholder(s) => Arc::new(placeholder::Placeholder::new(s)),
        KindSettings::Gemini(s) => Arc::new(gemini::Gemini::new(s, memory.clone())?),
        KindSettings::Bfl(s) => Arc::new(bfl::Bfl::new(s, memory.clone())?),
        KindSettings::AzureOpenai(s) => Arc::new(azure::build(s, memory.clone())?),
        KindSettings::Stability(s) => Arc::new(stability::Stability::new(s, memory.clone())?),
        KindSettings::Replicate(s) => Arc::new(replicate::Replicate::new(s, memory.clone())?),
        KindSettings::Fal(s) => Arc::new(fal::Fal::new(s, memory.clone())?),
        KindSettings::ComfyUi(s) => Arc::new(comfyui::ComfyUi::new(s, memory.clone())?),
        KindSettings::Automatic1111(s) => {
            Arc::new(automatic1111::Automatic1111::new(s, memory.clone())?)
        }
    })
}

/// The largest image a provider's answer may hold, in pixels (the imaging module's bound).
pub use crate::imaging::MAX_IMAGE_PIXELS;

/// The image formats a provider's answer may hold.
const ANSWER_FORMATS: [(image::ImageFormat, &str, &str); 3] = [
    (image::ImageFormat::Png, "image/png", "png"),
    (image::ImageFormat::Jpeg, "image/jpeg", "jpeg"),
    (image::ImageFormat::WebP, "image/webp", "webp"),
];

/// Checks that a provider answered an image: PNG, JPEG or WebP by its magic numbers, with a
/// header that decodes to at most [`MAX_IMAGE_PIXELS`]. Returns its content type and file
/// extension; an HTML error page, an empty `b64_json` or a truncated file is an error saying
/// why (a provider error: the call may have been billed).
pub fn check_image(data: &[u8]) -> Result<(&'static str, &'static str), String> {
    let format = image::guess_format(data).ok();
    let Some((format, content_type, extension)) = ANSWER_FORMATS
        .into_iter()
        .find(|(f, ..)| Some(*f) == format)
    else {
        let start: String = data.iter().take(16).map(|b| format!("{b:02x}")).collect();
        return Err(format!(
            "{} bytes that are not a PNG, JPEG or WebP image (they start with {})",
            data.len(),
            if start.is_empty() { "nothing" } else { &start }
        ));
    };
    let mut reader = image::ImageReader::with_format(std::io::Cursor::new(data), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(16_384);
    limits.max_image_height = Some(16_384);
    limits.max_alloc = Some(MAX_IMAGE_PIXELS * 4);
    reader.limits(limits);
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| format!("a {extension} image whose header does not decode: {e}"))?;
    if width == 0 || height == 0 || u64::from(width) * u64::from(height) > MAX_IMAGE_PIXELS {
        return Err(format!(
            "a {extension} image of {width}x{height} pixels (at most {MAX_IMAGE_PIXELS})"
        ));
    }
    Ok((content_type, extension))
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

    fn png(width: u32, height: u32, body: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut encoder = png::Encoder::new(&mut out, width, height);
        encoder.set_color(png::ColorType::Grayscale);
        let mut writer = encoder.write_header().unwrap();
        if body {
            writer
                .write_image_data(&vec![7u8; (width * height) as usize])
                .unwrap();
        }
        drop(writer);
        out
    }

    #[test]
    fn only_real_images_of_sane_size_pass_the_check() {
        assert_eq!(check_image(&png(4, 3, true)), Ok(("image/png", "png")));
        for (bytes, why) in [
            (
                b"<html><body>502 Bad Gateway</body></html>".to_vec(),
                "not a PNG",
            ),
            (Vec::new(), "start with nothing"),
            (b"\x89PNG\r\n\x1a\n".to_vec(), "does not decode"),
            (b"GIF89a\x01\x00\x01\x00".to_vec(), "not a PNG"),
            // A header that promises 4 gigapixels: refused before anything is allocated.
            (png(65_535, 65_535, false), "png image"),
        ] {
            let err = check_image(&bytes).expect_err(why);
            assert!(err.contains(why), "{why}: {err}");
        }
    }
}

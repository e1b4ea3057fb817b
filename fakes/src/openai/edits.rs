//! `POST /v1/images/edits`: multipart/form-data with the generation fields as text parts, one
//! or more images (`image[]`, or `image`: PNG, WebP or JPEG, each under 50 MB, at most 16) and an
//! optional `mask` (a PNG under 4 MB with an alpha channel, the size of the first image). Checked
//! as the provider does, then answered like a generation. What each edit received is kept (the
//! digests of its images and mask), so a test can tell what the client sent.

use axum::Extension;
use axum::body::Bytes;
use axum::extract::connect_info::ConnectInfo;
use axum::extract::{Multipart, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use serde_json::{Map, Value};

use super::errors::ApiError;
use super::{FakeApi, lock};
use crate::digest;
use crate::net::ResetHandle;

/// Most images one edit takes.
const MAX_IMAGES: usize = 16;
const MAX_IMAGE_BYTES: usize = 50 * 1024 * 1024;
const MAX_MASK_BYTES: usize = 4 * 1024 * 1024;

/// What one edit request carried.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize, PartialEq)]
pub struct EditSeen {
    pub prompt: String,
    /// The [`crate::digest`] of each image, in order.
    pub images: Vec<String>,
    pub mask: Option<String>,
}

/// PNG, WebP or JPEG, by magic numbers.
pub(super) fn image_kind(data: &[u8]) -> Option<&'static str> {
    if data.starts_with(b"\x89PNG\r\n\x1a\n") {
        Some("png")
    } else if data.starts_with(&[0xff, 0xd8, 0xff]) {
        Some("jpeg")
    } else if data.len() >= 12 && &data[..4] == b"RIFF" && &data[8..12] == b"WEBP" {
        Some("webp")
    } else {
        None
    }
}

/// Width, height and color type of a PNG, from its IHDR.
fn png_header(data: &[u8]) -> Option<(u32, u32, u8)> {
    if data.len() < 33 || image_kind(data) != Some("png") {
        return None;
    }
    let be = |i: usize| u32::from_be_bytes([data[i], data[i + 1], data[i + 2], data[i + 3]]);
    Some((be(16), be(20), data[25]))
}

/// Width and height of an image the fake can read the size of (PNG; others unchecked).
fn size_of(data: &[u8]) -> Option<(u32, u32)> {
    png_header(data).map(|(w, h, _)| (w, h))
}

pub(super) async fn edits(
    State(api): State<FakeApi>,
    conn: Option<Extension<ConnectInfo<ResetHandle>>>,
    headers: HeaderMap,
    multipart: Result<Multipart, axum::extract::multipart::MultipartRejection>,
) -> Response {
    if let Err(e) = api.check_auth(&headers) {
        return e.into_response();
    }
    let Ok(mut multipart) = multipart else {
        return ApiError::invalid(
            None,
            "invalid_content_type",
            "Invalid Content-Type header, expected multipart/form-data.",
        )
        .into_response();
    };
    let mut fields = Map::new();
    let mut images: Vec<Bytes> = Vec::new();
    let mut mask: Option<Bytes> = None;
    loop {
        let field = match multipart.next_field().await {
            Ok(Some(f)) => f,
            Ok(None) => break,
            Err(e) => {
                return ApiError::invalid(None, "invalid_multipart", format!("Invalid body: {e}"))
                    .into_response();
            }
        };
        let name = field.name().unwrap_or_default().to_string();
        let is_file = field.file_name().is_some();
        let Ok(data) = field.bytes().await else {
            return ApiError::invalid(None, "invalid_multipart", "Invalid body.").into_response();
        };
        match (name.as_str(), is_file) {
            ("image[]" | "image", true) => images.push(data),
            ("mask", true) => mask = Some(data),
            (_, false) => {
                let text = String::from_utf8_lossy(&data).into_owned();
                // Numbers arrive as text in a form.
                let value = match (name.as_str(), text.parse::<u64>()) {
                    ("n" | "output_compression", Ok(n)) => Value::from(n),
                    _ => Value::String(text),
                };
                fields.insert(name, value);
            }
            (other, true) => {
                return ApiError::invalid(
                    Some(other),
                    "unknown_parameter",
                    format!("Unknown file parameter: '{other}'."),
                )
                .into_response();
            }
        }
    }
    if let Err(e) = check_files(&images, mask.as_deref()) {
        lock(&api.inner.counters).stats.requests += 1;
        return e.into_response();
    }
    let seen = EditSeen {
        prompt: fields
            .get("prompt")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        images: images.iter().map(|i| digest(i)).collect(),
        mask: mask.as_deref().map(digest),
    };
    lock(&api.inner.edits).push(seen);
    let body = Bytes::from(Value::Object(fields).to_string());
    super::generate::generations(State(api), conn, headers, body).await
}

pub(super) fn check_files(images: &[Bytes], mask: Option<&[u8]>) -> Result<(), ApiError> {
    if images.is_empty() {
        return Err(ApiError::invalid(
            Some("image"),
            "missing_required_parameter",
            "Missing required parameter: 'image'.",
        ));
    }
    if images.len() > MAX_IMAGES {
        return Err(ApiError::invalid(
            Some("image"),
            "too_many_images",
            format!(
                "Too many images: {} provided, at most {MAX_IMAGES} are allowed.",
                images.len()
            ),
        ));
    }
    for (i, image) in images.iter().enumerate() {
        if image_kind(image).is_none() {
            return Err(ApiError::invalid(
                Some(&format!("image[{i}]")),
                "invalid_image_format",
                "Invalid image file or mode for image 1, please check your image file.",
            ));
        }
        if image.len() > MAX_IMAGE_BYTES {
            return Err(ApiError::invalid(
                Some(&format!("image[{i}]")),
                "image_too_large",
                "Image file is too large: each image must be smaller than 50 MB.",
            ));
        }
    }
    if let Some(mask) = mask {
        let Some((w, h, color)) = png_header(mask) else {
            return Err(ApiError::invalid(
                Some("mask"),
                "invalid_image_format",
                "Invalid mask image format - mask image must be a PNG.",
            ));
        };
        if mask.len() > MAX_MASK_BYTES {
            return Err(ApiError::invalid(
                Some("mask"),
                "image_too_large",
                "Mask file is too large: it must be smaller than 4 MB.",
            ));
        }
        // Color types 4 (grey + alpha) and 6 (RGBA) have an alpha channel.
        if !matches!(color, 4 | 6) {
            return Err(ApiError::invalid(
                Some("mask"),
                "invalid_mask",
                "Invalid mask: the mask must have an alpha channel.",
            ));
        }
        if let Some((iw, ih)) = size_of(&images[0])
            && (iw, ih) != (w, h)
        {
            return Err(ApiError::invalid(
                Some("mask"),
                "invalid_mask_size",
                format!(
                    "Invalid mask: mask ({w}x{h}) and image ({iw}x{ih}) must be the same size."
                ),
            ));
        }
    }
    Ok(())
}

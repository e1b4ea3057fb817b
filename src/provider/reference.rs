//! A reference image as providers get it: read, sniffed and decoded within bounds (by the
//! worker's reference reader), shared by every request that sends it, with its base64 made once
//! for the providers that send it so.

use std::sync::{Arc, OnceLock};

use bytes::Bytes;
use sha2::{Digest, Sha256};

/// One reference image, read and checked, shared by the jobs that use it.
#[derive(Debug)]
pub struct RefImage {
    pub data: Bytes,
    pub content_type: &'static str,
    pub extension: &'static str,
    pub width: u32,
    pub height: u32,
    /// Whether some pixel is transparent (a mask must have such pixels).
    pub alpha: bool,
    pub sha256: String,
    /// Its base64, made once for all the requests that send it so.
    base64: OnceLock<Arc<str>>,
}

impl RefImage {
    /// An image already checked.
    pub fn from_checked(
        data: Bytes,
        content_type: &'static str,
        extension: &'static str,
        width: u32,
        height: u32,
        alpha: bool,
    ) -> Self {
        Self {
            sha256: hex::encode(Sha256::digest(&data)),
            data,
            content_type,
            extension,
            width,
            height,
            alpha,
            base64: OnceLock::new(),
        }
    }

    /// Its bytes in base64, encoded once.
    pub fn base64(&self) -> Arc<str> {
        self.base64
            .get_or_init(|| Arc::from(base64_simd::STANDARD.encode_to_string(&self.data)))
            .clone()
    }

    /// A `data:` URI of it.
    pub fn data_uri(&self) -> String {
        format!("data:{};base64,{}", self.content_type, self.base64())
    }
}

impl PartialEq for RefImage {
    fn eq(&self, other: &Self) -> bool {
        self.sha256 == other.sha256
    }
}

/// A request's reference images (a job's `images` and `mask`), read.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Resolved {
    pub images: Vec<Arc<RefImage>>,
    pub mask: Option<Arc<RefImage>>,
}

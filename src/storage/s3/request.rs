//! One signed request to the store: signing with SigV4 (the SDK's own signer), sending, and
//! what kind of failure an answer is.

use std::time::SystemTime;

use aws_sigv4::http_request::{
    PayloadChecksumKind, PercentEncodingMode, SignableBody, SignableRequest, SigningSettings,
    UriPathNormalizationMode, sign,
};
use aws_smithy_runtime_api::client::identity::Identity;
use bytes::Bytes;
use reqwest::{Method, StatusCode};

use super::S3Store;
use super::xml::error_body;
use crate::domain::error::with_causes;
use crate::storage::{StorageError, StorageErrorKind};

/// SHA-256 of an empty body.
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

impl S3Store {
    /// Signs and sends one request. `payload_sha256`: the body's hex SHA-256 when the caller
    /// has it (otherwise the signer hashes the body).
    pub(super) async fn send(
        &self,
        request: Request<'_>,
    ) -> Result<reqwest::Response, StorageError> {
        let Request {
            op,
            key,
            method,
            url,
            headers,
            body,
            payload_sha256,
        } = request;
        let failed = |message: String| unavailable(op, key, message);
        let credentials = self.credentials.get().await.map_err(failed)?;
        let identity = Identity::from(credentials);
        let mut settings = SigningSettings::default();
        settings.percent_encoding_mode = PercentEncodingMode::Single;
        settings.payload_checksum_kind = PayloadChecksumKind::XAmzSha256;
        settings.uri_path_normalization_mode = UriPathNormalizationMode::Disabled;
        let params = aws_sigv4::sign::v4::SigningParams::builder()
            .identity(&identity)
            .region(&self.signing_region)
            .name("s3")
            .time(SystemTime::now())
            .settings(settings)
            .build()
            .map_err(|e| failed(e.to_string()))?
            .into();
        let payload = match payload_sha256 {
            Some(hex) => SignableBody::Precomputed(hex.to_string()),
            None if body.is_empty() => SignableBody::Precomputed(EMPTY_SHA256.into()),
            None => SignableBody::Bytes(&body),
        };
        let signable = SignableRequest::new(
            method.as_str(),
            url.as_str(),
            headers.iter().map(|(k, v)| (k.as_str(), v.as_str())),
            payload,
        )
        .map_err(|e| failed(e.to_string()))?;
        let (instructions, _) = sign(signable, &params)
            .map_err(|e| failed(e.to_string()))?
            .into_parts();
        let mut builder = self.http.request(method, &url);
        for (name, value) in &headers {
            builder = builder.header(name, value);
        }
        for (name, value) in instructions.headers() {
            builder = builder.header(name, value);
        }
        if !body.is_empty() {
            builder = builder.body(body);
        }
        builder
            .send()
            .await
            .map_err(|e| failed(with_causes(&e.without_url())))
    }
}

/// One request to the store, before signing.
pub(super) struct Request<'a> {
    pub(super) op: &'static str,
    /// The object key (or prefix, or bucket) the request is about, for errors.
    pub(super) key: &'a str,
    pub(super) method: Method,
    pub(super) url: String,
    pub(super) headers: Vec<(String, String)>,
    pub(super) body: Bytes,
    pub(super) payload_sha256: Option<&'a str>,
}

impl<'a> Request<'a> {
    pub(super) fn empty(op: &'static str, key: &'a str, method: Method, url: String) -> Self {
        Self {
            op,
            key,
            method,
            url,
            headers: Vec::new(),
            body: Bytes::new(),
            payload_sha256: None,
        }
    }
}

/// A store's refusal: the HTTP status with S3's error code and message when the body has them.
pub(super) async fn failure(
    op: &'static str,
    key: &str,
    response: reqwest::Response,
) -> StorageError {
    let status = response.status();
    let body = response.bytes().await.unwrap_or_default();
    let error = error_body(&body);
    let message = match &error {
        Some((code, message)) if !message.is_empty() => {
            format!("HTTP {}: {code}: {message}", status.as_u16())
        }
        Some((code, _)) => format!("HTTP {}: {code}", status.as_u16()),
        None => format!("HTTP {}", status),
    };
    let code = error.as_ref().map_or("", |(code, _)| code.as_str());
    StorageError {
        op,
        key: key.into(),
        kind: kind_of(status, code),
        message,
    }
}

/// What kind of failure an S3 status (and error code) is.
fn kind_of(status: StatusCode, code: &str) -> StorageErrorKind {
    match status.as_u16() {
        401 | 403 => StorageErrorKind::Denied,
        404 => StorageErrorKind::NotFound,
        412 => StorageErrorKind::PreconditionFailed,
        429 | 503 => StorageErrorKind::Throttled,
        // A wrong region in the signature, a bad access key: configuration, not an outage.
        400 if matches!(
            code,
            "AuthorizationHeaderMalformed" | "InvalidAccessKeyId" | "SignatureDoesNotMatch"
        ) =>
        {
            StorageErrorKind::Denied
        }
        408 | 409 | 500.. => StorageErrorKind::Unavailable,
        _ => StorageErrorKind::Invalid,
    }
}

/// A request that got no answer: the store is unreachable (or credentials could not be had).
pub(super) fn unavailable(op: &'static str, key: &str, message: String) -> StorageError {
    StorageError {
        op,
        key: key.into(),
        kind: StorageErrorKind::Unavailable,
        message,
    }
}

//! What every HTTP provider shares that does I/O: reading answers within a size limit, and
//! classifying transport errors (was the request possibly billed?). The pure parts (the
//! `retry-after` header, the status-code defaults of the taxonomy) are in the core crate and
//! re-exported here.

pub use imagegen_core::http::{
    billed_failure, by_status, header_str, retry_after, with_request_id,
};

use crate::domain::error::{Failure, with_causes};

/// Error bodies are small; never read more than this of one.
pub const MAX_ERROR_BODY: usize = 64 * 1024;

/// The user agent of every provider request.
pub const USER_AGENT: &str = concat!("imagegen/", env!("CARGO_PKG_VERSION"));

/// Reads a body into `buf`, refusing more than `limit` bytes. The request was answered, so a
/// failure here may have been billed.
pub async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
    buf: &mut Vec<u8>,
) -> Result<(), Failure> {
    let expected = response.content_length().unwrap_or(0) as usize;
    if expected > limit {
        return Err(billed_failure(format!(
            "the provider's response is {expected} bytes, more than its max_response_bytes ({limit})"
        )));
    }
    buf.reserve(expected);
    while let Some(chunk) = response.chunk().await.map_err(transport_failure)? {
        if buf.len() + chunk.len() > limit {
            return Err(billed_failure(format!(
                "the provider's response exceeds its max_response_bytes ({limit})"
            )));
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(())
}

/// Classifies a transport error: a connection that never opened cannot have been billed; a
/// timeout or reset after the request was sent may have been.
pub fn transport_failure(error: reqwest::Error) -> Failure {
    let possibly_billed = !error.is_connect() && !error.is_builder();
    Failure::Retryable {
        // Without the URL: a query string may hold a signature or a key (`?key=`, a SAS token).
        message: with_causes(&error.without_url()),
        after: None,
        possibly_billed,
        detail: Box::default(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_transport_failure_never_shows_the_url_and_its_query() {
        crate::install_crypto_provider();
        // Nothing listens on port 1: the connection is refused at once, on loopback.
        let error = reqwest::Client::new()
            .post("http://127.0.0.1:1/v1/images?key=SECRET-KEY&sig=SECRET-SIG")
            .send()
            .await
            .unwrap_err();
        let failure = transport_failure(error);
        assert!(!failure.message().contains("SECRET"), "{failure:?}");
        assert!(!failure.possibly_billed(), "never connected: not billed");
    }
}

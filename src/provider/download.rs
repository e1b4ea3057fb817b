//! Downloading an image a provider made and gave out by URL (DALL-E style `url` answers, BFL's
//! `result.sample`, Replicate's outputs): pre-signed, maybe on another host, so fetched without
//! the provider's credentials and by the address rules of [`FetchRules`], into the answer
//! memory. The image is paid for already: a lost connection, a 429 or a 5xx is retried here, a
//! few times, rather than by buying the image again.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use bytes::Bytes;

use super::buffers::BufferPool;
use super::fetch::FetchRules;
use super::http::{Clock, billed_failure};
use crate::domain::error::{Failure, with_causes};

/// Retries of one image download (the image is paid for: retrying the call would buy it again).
const DOWNLOAD_RETRIES: usize = 3;

/// The downloads of one provider.
pub struct Downloads {
    /// Made on first use: most answers carry their images.
    client: tokio::sync::OnceCell<reqwest::Client>,
    /// Where images may come from.
    pub(crate) rules: FetchRules,
    connect_timeout: Duration,
    request_timeout: Duration,
    max_bytes: usize,
    buffers: BufferPool,
}

impl Downloads {
    pub fn new(
        rules: FetchRules,
        connect_timeout: Duration,
        request_timeout: Duration,
        max_bytes: usize,
        buffers: BufferPool,
    ) -> Self {
        Self {
            client: tokio::sync::OnceCell::new(),
            rules,
            connect_timeout,
            request_timeout,
            max_bytes,
            buffers,
        }
    }

    /// The answer memory the downloads read into (request bodies count in it while sent).
    pub fn memory(&self) -> &BufferPool {
        &self.buffers
    }

    /// Fetches the image at `url`. A failure is billed and retryable; when the host answered
    /// that the image is gone (403, 404 or 410: an expired URL), its detail carries that status.
    pub async fn get(&self, url: &str) -> Result<Bytes, Failure> {
        let client = self
            .client
            .get_or_try_init(|| async {
                // No timeout of the client's own: each download has a clock that stops while
                // the image waits for room in the answer memory.
                self.rules.client(self.connect_timeout, None, None)
            })
            .await
            .map_err(|e| billed_failure(format!("no HTTP client for the image download: {e}")))?;
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| billed_failure(format!("the image URL is not a URL: {e}")))?;
        if let Err(why) = self.rules.check(&parsed) {
            return Err(billed_failure(format!("the image URL was refused: {why}")));
        }
        // (transient, message, status)
        let fetch = || async {
            let mut clock = Clock::start(self.request_timeout);
            let response = clock
                .within(client.get(url).send())
                .await
                .map_err(|f| {
                    (
                        true,
                        format!("downloading the generated image failed: {}", f.message()),
                        None,
                    )
                })?
                // A refused redirect is final; a lost connection is worth another try.
                .map_err(|e| {
                    (
                        !e.is_redirect(),
                        format!(
                            "downloading the generated image failed: {}",
                            with_causes(&e.without_url())
                        ),
                        None,
                    )
                })?;
            let status = response.status();
            if !status.is_success() {
                let transient = status.is_server_error() || status.as_u16() == 429;
                return Err((
                    transient,
                    format!("downloading the generated image failed with HTTP {status}"),
                    Some(status.as_u16()),
                ));
            }
            // Too large is final; a connection lost mid-body is worth another try.
            let too_large = response
                .content_length()
                .is_some_and(|n| n > self.max_bytes as u64);
            let body = clock
                .read(&self.buffers, response, self.max_bytes)
                .await
                .map_err(|f| (!too_large, f.message().to_string(), None))?;
            Ok(body.freeze())
        };
        fetch
            .retry(
                ExponentialBuilder::default()
                    .with_min_delay(Duration::from_millis(250))
                    .with_max_times(DOWNLOAD_RETRIES),
            )
            .when(|(transient, ..)| *transient)
            .notify(|(_, message, _), after| {
                tracing::warn!(error = %message, after_ms = after.as_millis() as u64, "retrying the image download");
            })
            .await
            .map_err(|(_, message, status)| {
                let mut failure = billed_failure(message);
                failure.detail_mut().status = status;
                failure
            })
    }
}

//! What every HTTP provider shares that does I/O: reading answers within a size limit, and
//! classifying transport errors (was the request possibly billed?). The pure parts (the
//! `retry-after` header, the status-code defaults of the taxonomy) are in the core crate and
//! re-exported here.

pub use imagegen_core::http::{
    BodySink, billed_failure, by_status, decode_owned, header_str, retry_after, with_request_id,
};

use std::time::Duration;

use tokio::time::Instant;

use super::buffers::{BufferPool, PooledBuf};
use crate::domain::error::{Failure, with_causes};

/// The largest submit or poll answer read (a prediction's logs can be long).
pub const MAX_SMALL_ANSWER: usize = 4 << 20;

/// Error bodies are small; never read more than this of one.
pub const MAX_ERROR_BODY: usize = 64 * 1024;

/// The largest read buffer of a provider connection (HTTP/1): what a connection whose answer
/// waits for room in the answer memory holds of it, and the size of each read of an answer.
pub const READ_BUFFER: usize = 64 * 1024;

/// The user agent of every provider request.
pub const USER_AGENT: &str = concat!("imagegen/", env!("CARGO_PKG_VERSION"));

/// The HTTP client of a provider's API: `headers` (the credentials) on every request, and
/// nothing else of its own. No timeout: `request_timeout_secs` is kept by each call's [`Clock`],
/// which stops while an answer waits for room in the answer memory. A connection whose answer
/// waits holds at most [`READ_BUFFER`] of it; the rest waits in the kernel's socket buffer. No
/// redirect is followed: the credentials go to the configured host alone (a redirect, to any
/// host, would carry a custom header such as `api-key` along).
pub fn api_client(
    headers: reqwest::header::HeaderMap,
    connect_timeout: Duration,
) -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder()
        .user_agent(USER_AGENT)
        .default_headers(headers)
        .connect_timeout(connect_timeout)
        .pool_idle_timeout(Duration::from_secs(90))
        .http1_max_buf_size(READ_BUFFER)
        .redirect(reqwest::redirect::Policy::none())
        .build()?)
}

/// A provider's cheapest authenticated `GET` (its model, its credits), for `imagegen providers`:
/// `Ok` with `describe` of the answer's JSON, or why it did not answer.
pub async fn check_get(
    request: reqwest::RequestBuilder,
    timeout: Duration,
    describe: impl FnOnce(&serde_json::Value) -> String,
) -> Result<String, String> {
    let response = tokio::time::timeout(timeout, request.send())
        .await
        .map_err(|_| format!("no answer within {} s", timeout.as_secs()))?
        .map_err(|e| format!("unreachable: {}", with_causes(&e.without_url())))?;
    let status = response.status();
    let body = tokio::time::timeout(timeout, response.bytes())
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default();
    match status.as_u16() {
        200..=299 => Ok(describe(
            &serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
        )),
        401 | 403 => Err(format!("credentials refused (HTTP {})", status.as_u16())),
        code => Err(format!(
            "HTTP {code}: {}",
            String::from_utf8_lossy(&body[..body.len().min(200)])
        )),
    }
}

/// A secret as a header value, marked sensitive (never shown by the client's debug output).
pub fn secret_header(value: &str) -> anyhow::Result<reqwest::header::HeaderValue> {
    let mut value = reqwest::header::HeaderValue::from_str(value).map_err(|_| {
        anyhow::anyhow!("the provider's api_key contains characters not allowed in an HTTP header")
    })?;
    value.set_sensitive(true);
    Ok(value)
}

/// Passes a body to `sink` as it arrives, refusing more than `limit` bytes. The request was
/// answered, so a failure here may have been billed.
pub async fn read_limited(
    mut response: reqwest::Response,
    limit: usize,
    sink: &mut impl BodySink,
) -> Result<(), Failure> {
    let expected = response.content_length().unwrap_or(0) as usize;
    if expected > limit {
        return Err(billed_failure(format!(
            "the provider's response is {expected} bytes, more than its max_response_bytes ({limit})"
        )));
    }
    while let Some(chunk) = response.chunk().await.map_err(transport_failure)? {
        if sink.taken() + chunk.len() > limit {
            return Err(billed_failure(format!(
                "the provider's response exceeds its max_response_bytes ({limit})"
            )));
        }
        sink.push(&chunk)?;
    }
    Ok(())
}

/// The clock of one provider exchange: `request_timeout_secs` runs while the request is sent and
/// while the provider works and answers, never while an answer waits for room in the answer
/// memory (a timeout there would throw away an answer already paid for, and retry it).
pub struct Clock {
    deadline: Instant,
    limit: Duration,
}

impl Clock {
    pub fn start(limit: Duration) -> Self {
        Self {
            deadline: Instant::now() + limit,
            limit,
        }
    }

    /// Sends the request and waits for the answer's status and headers.
    pub async fn send(
        &self,
        request: reqwest::RequestBuilder,
    ) -> Result<reqwest::Response, Failure> {
        self.within(request.send())
            .await?
            .map_err(transport_failure)
    }

    /// Runs `work` within what is left of the timeout.
    pub async fn within<T>(&self, work: impl Future<Output = T>) -> Result<T, Failure> {
        tokio::time::timeout_at(self.deadline, work)
            .await
            .map_err(|_| self.timed_out())
    }

    /// Reads an answer's body into a buffer of `memory`, at most `limit` bytes: first waits until
    /// the budget has room for it (its `Content-Length`, or `limit` when it has none; the body
    /// meanwhile stays in the socket), then reads it within what is left of the timeout.
    pub async fn read(
        &mut self,
        memory: &BufferPool,
        response: reqwest::Response,
        limit: usize,
    ) -> Result<PooledBuf, Failure> {
        self.read_with(memory, response, limit, |n| n, |buf| buf)
            .await
    }

    /// Like [`read`](Self::read), into the sink that `sink` makes of the buffer, which needs
    /// `room(n)` bytes for an answer of `n` bytes.
    pub async fn read_with<S: BodySink>(
        &mut self,
        memory: &BufferPool,
        response: reqwest::Response,
        limit: usize,
        room: impl FnOnce(usize) -> usize,
        sink: impl FnOnce(PooledBuf) -> S,
    ) -> Result<S, Failure> {
        let expected = response.content_length().map(|n| n as usize);
        let reserve = match expected {
            Some(n) if n > limit => {
                return Err(billed_failure(format!(
                    "the provider's response is {n} bytes, more than its max_response_bytes ({limit})"
                )));
            }
            Some(n) => room(n),
            None => room(limit).min(memory.budget()),
        };
        let waiting = Instant::now();
        let buf = memory.take(reserve).await;
        let waited = waiting.elapsed();
        if waited > Duration::from_millis(100) {
            tracing::debug!(
                waited_ms = waited.as_millis() as u64,
                bytes = reserve,
                "an answer waited for room in the answer memory"
            );
        }
        self.deadline += waited;
        let mut sink = sink(buf);
        self.within(read_limited(response, limit, &mut sink))
            .await??;
        Ok(sink)
    }

    /// A small answer (a submit's, a poll's: JSON with an id, a status, URLs), at most `limit`
    /// bytes, outside the answer memory: one cut short, or larger, is an error, never a
    /// truncated body.
    pub async fn read_small(
        &self,
        response: reqwest::Response,
        limit: usize,
    ) -> Result<Vec<u8>, Failure> {
        let mut body = Vec::new();
        self.within(read_limited(response, limit, &mut body))
            .await??;
        Ok(body)
    }

    /// An error body: small, read within the timeout, outside the answer memory.
    pub async fn read_error(&self, response: reqwest::Response) -> Vec<u8> {
        let mut body = Vec::new();
        let _ = self
            .within(read_limited(response, MAX_ERROR_BODY, &mut body))
            .await;
        body
    }

    /// No answer in time, after the request was sent: it may have been billed.
    fn timed_out(&self) -> Failure {
        Failure::Retryable {
            message: format!(
                "no complete answer within the provider's request_timeout_secs ({} s)",
                self.limit.as_secs()
            ),
            after: None,
            possibly_billed: true,
            detail: Box::default(),
        }
    }
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

//! What the drivers of providers that queue the work (BFL, Replicate, fal) share: where their key
//! may go, when to look again, what a lost request is, and fetching the images a finished request
//! points to.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::download::Downloads;
use super::http::{billed_failure, with_request_id};
use super::{GeneratedImage, HANDLE_LOST, check_image};
use crate::domain::error::Failure;

/// Now, in Unix milliseconds: when a request was submitted, kept in its handle (a later
/// delivery, in another process, backs off by its age).
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Scheme, host and port of a URL: the key of a provider goes to its base URL's origin.
pub fn origin(url: &reqwest::Url) -> String {
    format!(
        "{}://{}:{}",
        url.scheme(),
        url.host_str().unwrap_or(""),
        url.port_or_known_default().unwrap_or(0)
    )
}

/// When to look at a request submitted at `submitted_unix_ms` again: an eighth of its age,
/// within `[min, max]` (a request is then seen done at most about 12 % after it is).
pub fn by_age(submitted_unix_ms: u64, min: Duration, max: Duration) -> Duration {
    let age = Duration::from_millis(unix_ms().saturating_sub(submitted_unix_ms));
    (age / 8).clamp(min, max)
}

/// The request is gone at the provider (failed, forgotten, its result expired): the job's next
/// attempt submits anew.
pub fn lost(message: String, id: Option<&str>) -> Failure {
    let mut failure = Failure::transient(message);
    let detail = failure.detail_mut();
    detail.code = Some(HANDLE_LOST.into());
    detail.request_id = id.map(str::to_string);
    failure
}

/// A poll buys nothing: a failure of one was never billed.
pub fn unbilled(mut failure: Failure) -> Failure {
    if let Failure::Retryable {
        possibly_billed, ..
    } = &mut failure
    {
        *possibly_billed = false;
    }
    failure
}

/// Fetches an image a finished request points to, and checks it is one. An image that is gone
/// (its URL expired: 403, 404 or 410) loses the request, to be submitted anew.
pub async fn fetch_image(
    downloads: &Downloads,
    url: &str,
    id: &str,
) -> Result<GeneratedImage, Failure> {
    let request_id = Some(id.to_string());
    let data: Bytes = downloads
        .get(url)
        .await
        .map_err(|f| match f.detail().status {
            Some(403 | 404 | 410) => lost(
                format!("the request's image is gone: {}", f.message()),
                Some(id),
            ),
            _ => with_request_id(f, &request_id),
        })?;
    let (content_type, extension) = check_image(&data).map_err(|why| {
        with_request_id(
            billed_failure(format!("the provider's image is not one: {why}")),
            &request_id,
        )
    })?;
    Ok(GeneratedImage {
        data,
        content_type,
        extension,
        revised_prompt: None,
    })
}

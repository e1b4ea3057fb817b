//! `[references]`: where a job's reference images may be read from, and the worker's cache of
//! them.

use serde::Deserialize;

use super::{ConfigError, in_range, invalid};

/// `[references]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReferenceSettings {
    /// Key prefixes of the configured bucket that references may name, besides
    /// `storage.prefix` (always allowed). Never another bucket.
    pub allowed_prefixes: Vec<String>,
    /// Whether `job:` references may name a job of another batch (`{"job", "batch"}`).
    pub other_batches: bool,
    /// Longest a job waits, in seconds, for an earlier job its `job:` reference names (deferred
    /// through the delay queues, no attempt counted), before it fails as `invalid_job`.
    pub job_wait_secs: u64,
    /// Bytes of reference images the worker keeps, shared by the jobs that use them.
    pub cache_bytes: usize,
    /// Seconds an image read from a URL or a store key is used before it is read again (an
    /// earlier job's image, which never changes, is kept until evicted).
    pub cache_ttl_secs: u64,
    /// Largest reference read, in bytes.
    pub max_bytes: usize,
    /// Most pixels a reference may decode to (a larger one, a decompression bomb among them, is
    /// `invalid_job`).
    pub max_pixels: u64,
    /// Hosts (`host:port`) references may be read from over plain http or at a private address.
    /// Others must be https and public.
    pub download_hosts: Vec<String>,
    /// Seconds allowed to read one reference from a URL.
    pub request_timeout_secs: u64,
    /// Seconds allowed to open a connection for it.
    pub connect_timeout_secs: u64,
}

impl ReferenceSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        in_range(
            "references.job_wait_secs",
            self.job_wait_secs,
            0,
            7 * 86_400,
        )?;
        in_range("references.cache_ttl_secs", self.cache_ttl_secs, 0, 86_400)?;
        in_range("references.max_bytes", self.max_bytes as u64, 1024, 1 << 30)?;
        in_range("references.max_pixels", self.max_pixels, 1, 16_384 * 16_384)?;
        in_range(
            "references.request_timeout_secs",
            self.request_timeout_secs,
            1,
            3600,
        )?;
        in_range(
            "references.connect_timeout_secs",
            self.connect_timeout_secs,
            1,
            600,
        )?;
        if let Some(p) = self
            .allowed_prefixes
            .iter()
            .find(|p| p.is_empty() || p.starts_with('/') || p.contains(".."))
        {
            return Err(invalid(
                "references.allowed_prefixes",
                format!("{p:?} is not a key prefix (not empty, no leading '/', no '..')"),
            ));
        }
        Ok(())
    }
}

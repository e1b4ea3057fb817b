//! The sections of the settings about where images go: the object store (`[storage]`) and the
//! local spool of images not yet uploaded (`[spool]`), each with its own checks.

use std::path::PathBuf;

use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;

use super::{ConfigError, in_range, invalid};

/// Which object store holds the images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StorageKind {
    /// AWS S3 or any S3-compatible store.
    S3,
    /// A local directory.
    Fs,
}

/// `[storage]`: where images and records go.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageSettings {
    /// `s3` or `fs`.
    pub kind: StorageKind,
    /// fs: the directory that holds the objects.
    pub root: PathBuf,
    /// s3: the bucket.
    pub bucket: String,
    /// Prefix of every object key (`prod/`).
    pub prefix: String,
    /// s3: endpoint of an S3-compatible store; empty: the AWS SDK's chain.
    pub endpoint_url: String,
    /// s3: region; empty: the AWS SDK's chain, else `us-east-1`.
    pub region: String,
    /// s3: path-style addressing, which most S3-compatible stores need.
    pub force_path_style: bool,
    /// s3: static access key id; empty: the AWS SDK's chain.
    pub access_key_id: String,
    /// s3: static secret key. Never logged.
    pub secret_access_key: SecretString,
    /// Seconds allowed for one storage request.
    pub request_timeout_secs: u64,
}

impl StorageSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        match self.kind {
            StorageKind::Fs => {
                if self.root.as_os_str().is_empty() {
                    return Err(invalid(
                        "storage.root",
                        "must not be empty when storage.kind = \"fs\"",
                    ));
                }
            }
            StorageKind::S3 => {
                check_bucket(&self.bucket)?;
                if !self.endpoint_url.is_empty() && reqwest::Url::parse(&self.endpoint_url).is_err()
                {
                    return Err(invalid("storage.endpoint_url", "is not a valid URL"));
                }
                if self.access_key_id.is_empty()
                    != self.secret_access_key.expose_secret().is_empty()
                {
                    return Err(invalid(
                        "storage.access_key_id",
                        "and storage.secret_access_key must be set together",
                    ));
                }
            }
        }
        if self.prefix.starts_with('/') || self.prefix.split('/').any(|part| part == "..") {
            return Err(invalid(
                "storage.prefix",
                "must be relative and must not contain `..`",
            ));
        }
        in_range(
            "storage.request_timeout_secs",
            self.request_timeout_secs,
            1,
            3600,
        )
    }
}

/// `[spool]`: local disk for images bought but not yet uploaded.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolSettings {
    /// The directory; empty: no spool.
    pub dir: PathBuf,
    /// Cap on the spool's size in bytes.
    pub max_bytes: u64,
}

impl SpoolSettings {
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        in_range("spool.max_bytes", self.max_bytes, 0, 1 << 50)
    }
}

fn check_bucket(bucket: &str) -> Result<(), ConfigError> {
    let ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !ok {
        return Err(invalid(
            "storage.bucket",
            "must be 3-63 characters of lowercase letters, digits, `-` and `.`",
        ));
    }
    Ok(())
}

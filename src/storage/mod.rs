//! Object stores: where images and result records go.
//!
//! `s3` talks to AWS S3 or any S3-compatible store; `fs` writes to a local directory. Keys are
//! full keys (the configured prefix included), laid out by [`crate::domain::keys`]. Errors say
//! what kind of failure they are ([`StorageErrorKind`]), so that a refused key or a missing
//! bucket is not taken for an outage and retried. [`batches`] reads and writes what is known of
//! a batch.

pub mod batches;
pub mod fs;
pub mod s3;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::config::{Settings, StorageKind};
use crate::domain::error::{Failure, StopReason};

/// Object metadata key holding the job id.
pub const META_JOB_ID: &str = "job-id";
/// Metadata key of an image's job fingerprint (see `Job::fingerprint`).
pub const META_FINGERPRINT: &str = "job-fingerprint";
/// Object metadata key holding the hex SHA-256 of the object's bytes.
pub const META_SHA256: &str = "sha256";

/// What kind of failure a storage error is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StorageErrorKind {
    /// The bucket (or the directory) does not exist.
    NotFound,
    /// The credentials are refused, or not allowed this operation.
    Denied,
    /// A conditional write found an object where it expected none.
    PreconditionFailed,
    /// The store asks for fewer requests (S3 `SlowDown`, 429, 503).
    Throttled,
    /// The store did not answer, or failed (connection, timeout, 5xx, a full disk).
    Unavailable,
    /// The request or the store's answer makes no sense (a malformed key, an unreadable answer,
    /// a redirect to another region).
    Invalid,
}

impl StorageErrorKind {
    /// Whether trying again later can help.
    pub fn is_transient(self) -> bool {
        matches!(
            self,
            StorageErrorKind::Throttled | StorageErrorKind::Unavailable
        )
    }
}

#[derive(Debug, thiserror::Error)]
#[error("storage {op} of `{key}` failed: {message}")]
pub struct StorageError {
    pub op: &'static str,
    pub key: String,
    pub kind: StorageErrorKind,
    pub message: String,
}

impl From<StorageError> for Failure {
    /// Throttling and outages are retried; anything else (access denied, no bucket) is no
    /// outage: nothing more is bought until an operator fixes it.
    fn from(e: StorageError) -> Self {
        if e.kind.is_transient() {
            Failure::transient(e.to_string())
        } else {
            Failure::Stop {
                reason: StopReason::StorageRefused,
                message: e.to_string(),
                detail: Box::default(),
            }
        }
    }
}

/// One page of a listing.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ListPage {
    /// Keys in key order.
    pub keys: Vec<String>,
    /// The store has more keys after the last one (S3's `IsTruncated`).
    pub truncated: bool,
}

/// What a HEAD tells of an object.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectInfo {
    pub size: u64,
    pub content_type: Option<String>,
    /// From the object's metadata, when it was written by imagegen.
    pub sha256: Option<String>,
    /// The fingerprint of the job that stored it, from its metadata (stores that keep it).
    pub fingerprint: Option<String>,
}

/// An object to write.
#[derive(Debug, Clone)]
pub struct PutObject<'a> {
    pub key: &'a str,
    pub data: Bytes,
    pub content_type: &'a str,
    pub metadata: &'a [(&'static str, String)],
    /// The hex SHA-256 of `data` when the caller has it: S3 stores it as the `sha256` metadata
    /// and signs the upload with it instead of hashing the bytes again (the server checks it).
    pub sha256: Option<&'a str>,
}

impl<'a> PutObject<'a> {
    /// An object without metadata (a record, a marker, a lease).
    pub fn new(key: &'a str, data: Bytes, content_type: &'a str) -> Self {
        Self {
            key,
            data,
            content_type,
            metadata: &[],
            sha256: None,
        }
    }

    /// A JSON document without metadata.
    pub fn json(key: &'a str, data: Bytes) -> Self {
        Self::new(key, data, "application/json")
    }
}

pub trait ObjectStore: Send + Sync {
    /// Writes an object whole; readers never see a partial object.
    fn put<'a>(&'a self, object: PutObject<'a>) -> BoxFuture<'a, Result<(), StorageError>>;
    /// Writes an object only if no object has that key; `Ok(false)` when one exists. Stores that
    /// ignore conditional writes (Garage) report `true` every time: see [`probe_conditional_put`].
    fn put_if_absent<'a>(
        &'a self,
        object: PutObject<'a>,
    ) -> BoxFuture<'a, Result<bool, StorageError>>;
    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>>;
    /// Reads an object; `None` when it does not exist.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StorageError>>;
    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StorageError>>;
    /// Keys that start with `prefix`, in key order, after `start_after` when given: one page
    /// (at most [`LIST_PAGE`] keys; page on with the last key). `prefix` ends at a `/`.
    fn list<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxFuture<'a, Result<ListPage, StorageError>>;
    /// A URL a browser can GET the object with for `ttl` (S3 presigned), or `None` when the store
    /// has no such thing (see [`ObjectStore::local_path`]).
    fn presigned_get<'a>(
        &'a self,
        _key: &'a str,
        _ttl: std::time::Duration,
    ) -> BoxFuture<'a, Result<Option<String>, StorageError>> {
        Box::pin(async { Ok(None) })
    }
    /// Where the object is on this machine's disk, for stores that keep files (`fs`).
    fn local_path(&self, _key: &str) -> Option<std::path::PathBuf> {
        None
    }
    /// Checks that the store is reachable and writable enough to start (bucket exists, root exists).
    fn check(&self) -> BoxFuture<'_, Result<(), StorageError>>;
    /// The bucket, or for `fs` the root directory.
    fn location(&self) -> &str;
    /// A URI for an object: `s3://bucket/key` or `file:///root/key`.
    fn uri(&self, key: &str) -> String;
}

/// Whether the store honours `If-None-Match: *` (AWS S3, MinIO, R2, the `fs` store do; Garage
/// does not): writes a probe object twice and checks that the second write is refused.
pub async fn probe_conditional_put(
    store: &dyn ObjectStore,
    prefix: &str,
) -> Result<bool, StorageError> {
    let key = crate::domain::keys::probe(prefix, fastrand::u64(..));
    let object = || PutObject::new(&key, Bytes::from_static(b"probe"), "text/plain");
    store.put_if_absent(object()).await?;
    let second = store.put_if_absent(object()).await;
    let _ = store.delete(&key).await;
    Ok(!second?)
}

/// Most keys one [`ObjectStore::list`] call returns.
pub const LIST_PAGE: usize = 1000;

/// Every key under `prefix` after `start_after`, page by page, for as long as the store says
/// there are more.
pub async fn list_all(
    store: &dyn ObjectStore,
    prefix: &str,
    start_after: Option<&str>,
) -> Result<Vec<String>, StorageError> {
    let mut keys: Vec<String> = Vec::new();
    loop {
        let after = keys.last().map(String::as_str).or(start_after);
        let page = store.list(prefix, after).await?;
        let more = page.truncated && !page.keys.is_empty();
        keys.extend(page.keys);
        if !more {
            return Ok(keys);
        }
    }
}

/// Builds the configured store.
pub async fn from_settings(settings: &Settings) -> anyhow::Result<Arc<dyn ObjectStore>> {
    Ok(match settings.storage.kind {
        StorageKind::S3 => Arc::new(s3::S3Store::new(&settings.storage).await?),
        StorageKind::Fs => Arc::new(fs::FsStore::with_prefix(
            &settings.storage.root,
            &settings.storage.prefix,
        )?),
    })
}

//! Object stores: where images and result records go.
//!
//! `s3` talks to AWS S3 or any S3-compatible store; `fs` writes to a local directory. Keys are
//! full keys (the configured prefix included); the pipeline builds them.

pub mod fs;
pub mod s3;

use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::BoxFuture;

use crate::config::{Settings, StorageKind};
use crate::error::Failure;

/// Object metadata key holding the job id.
pub const META_JOB_ID: &str = "job-id";
/// Object metadata key holding the hex SHA-256 of the object's bytes.
pub const META_SHA256: &str = "sha256";

#[derive(Debug, thiserror::Error)]
#[error("storage {op} of `{key}` failed: {message}")]
pub struct StorageError {
    pub op: &'static str,
    pub key: String,
    pub message: String,
}

impl From<StorageError> for Failure {
    fn from(e: StorageError) -> Self {
        Failure::transient(e.to_string())
    }
}

/// What a HEAD tells of an object.
#[derive(Debug, Clone, PartialEq)]
pub struct ObjectInfo {
    pub size: u64,
    pub content_type: Option<String>,
    /// From the object's metadata, when it was written by imagegen.
    pub sha256: Option<String>,
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
    /// Keys that start with `prefix`, in key order, after `start_after` when given (at most
    /// 1000: page with the last key returned). `prefix` ends at a `/`.
    fn list<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<String>, StorageError>>;
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
    let key = format!("{prefix}.imagegen/probe-{:016x}", fastrand::u64(..));
    let object = || PutObject {
        key: &key,
        data: Bytes::from_static(b"probe"),
        content_type: "text/plain",
        metadata: &[],
        sha256: None,
    };
    store.put_if_absent(object()).await?;
    let second = store.put_if_absent(object()).await;
    let _ = store.delete(&key).await;
    Ok(!second?)
}

/// Most keys one [`ObjectStore::list`] call returns.
pub const LIST_PAGE: usize = 1000;

/// Every key under `prefix` after `start_after`, page by page.
pub async fn list_all(
    store: &dyn ObjectStore,
    prefix: &str,
    start_after: Option<&str>,
) -> Result<Vec<String>, StorageError> {
    let mut keys: Vec<String> = Vec::new();
    loop {
        let after = keys.last().map(String::as_str).or(start_after);
        let page = store.list(prefix, after).await?;
        let full = page.len() >= LIST_PAGE;
        keys.extend(page);
        if !full {
            return Ok(keys);
        }
    }
}

/// Builds the configured store.
pub async fn from_settings(settings: &Settings) -> anyhow::Result<Arc<dyn ObjectStore>> {
    Ok(match settings.storage.kind {
        StorageKind::S3 => Arc::new(s3::S3Store::new(&settings.storage).await?),
        StorageKind::Fs => Arc::new(fs::FsStore::new(&settings.storage.root)?),
    })
}

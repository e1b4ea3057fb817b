//! A job's reference images (`images`, `mask`), read before its provider is called: from the
//! configured store (under `storage.prefix` or `references.allowed_prefixes`, never another
//! bucket), from a URL (by the download rules: `https://` to public addresses, unless the host
//! is configured as exempt), or from the stored result of an earlier job of the batch.
//!
//! Every reference is sniffed and decoded within pixel and allocation bounds on the image
//! threads: a file that is not an image, or a decompression bomb, fails the job as
//! `invalid_job`. A reference used by many jobs is read once per worker ([`cache`]).

pub mod cache;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::config::ReferenceSettings;
use crate::domain::error::Failure;
use crate::domain::event::CloudEvent;
use crate::domain::job::{Job, Reference};
use crate::domain::keys;
use crate::imaging::ImageWork;
use crate::provider::buffers::BufferPool;
use crate::provider::download::Downloads;
use crate::provider::fetch::FetchRules;
pub use crate::provider::reference::{RefImage, Resolved};
use crate::storage::ObjectStore;

/// Why a job's references are not at hand.
#[derive(Debug, Clone)]
pub enum Unresolved {
    /// An earlier job it names has no result yet: wait for it.
    NotYet(String),
    /// It can never be read as asked (outside the allowed prefixes, not an image, gone).
    Invalid(String),
    /// It could not be read now (the store, the network): try again.
    Transient(Failure),
}

/// Reads references for the worker's jobs.
pub struct References {
    store: Arc<dyn ObjectStore>,
    /// `storage.prefix`: where job results are.
    prefix: String,
    /// Where references may be read in the store.
    allowed: Vec<String>,
    other_batches: bool,
    downloads: Downloads,
    max_pixels: u64,
    cache: cache::Cache,
    work: ImageWork,
}

impl References {
    pub fn new(
        settings: &ReferenceSettings,
        store: Arc<dyn ObjectStore>,
        prefix: &str,
        memory: BufferPool,
        work: ImageWork,
    ) -> Self {
        let mut allowed: Vec<String> = settings.allowed_prefixes.clone();
        allowed.push(prefix.to_string());
        Self {
            store,
            prefix: prefix.to_string(),
            allowed,
            other_batches: settings.other_batches,
            downloads: Downloads::new(
                FetchRules::exempting(settings.download_hosts.iter().map(String::as_str)),
                Duration::from_secs(settings.connect_timeout_secs),
                Duration::from_secs(settings.request_timeout_secs),
                settings.max_bytes,
                memory,
            ),
            max_pixels: settings.max_pixels,
            cache: cache::Cache::new(
                settings.cache_bytes,
                Duration::from_secs(settings.cache_ttl_secs),
            ),
            work,
        }
    }

    /// Reads the job's references (none: at once).
    pub async fn resolve(&self, job: &Job) -> Result<Resolved, Unresolved> {
        let mut resolved = Resolved::default();
        for r in &job.images {
            resolved.images.push(self.one(job, r).await?);
        }
        if let Some(mask) = &job.mask {
            let image = self.one(job, mask).await?;
            if !(image.content_type == "image/png" && image.alpha) {
                return Err(Unresolved::Invalid(format!(
                    "the mask {mask} must be a PNG with transparent pixels (where to paint)"
                )));
            }
            resolved.mask = Some(image);
        }
        Ok(resolved)
    }

    async fn one(&self, job: &Job, r: &Reference) -> Result<Arc<RefImage>, Unresolved> {
        match r {
            Reference::Key { key } => {
                if !self.allowed.iter().any(|p| key.starts_with(p.as_str())) {
                    return Err(Unresolved::Invalid(format!(
                        "the reference {key} is outside the prefixes references may be read \
                         from ({})",
                        self.allowed
                            .iter()
                            .map(|p| if p.is_empty() { "the whole bucket" } else { p })
                            .collect::<Vec<_>>()
                            .join(", ")
                    )));
                }
                // An object may be written again under its key: read again after the TTL.
                let key = key.clone();
                self.cache
                    .get(&format!("key:{key}"), true, || self.read_stored(key))
                    .await
            }
            Reference::Url { url } => {
                let url = url.clone();
                self.cache
                    .get(&format!("url:{url}"), true, || async move {
                        let data = self.downloads.get(&url).await.map_err(|f| {
                            match f.detail().status {
                                Some(400..=499) => Unresolved::Invalid(format!(
                                    "the reference {} cannot be read: {}",
                                    Reference::Url { url: url.clone() },
                                    f.message()
                                )),
                                _ if f.message().contains("not allowed") => {
                                    Unresolved::Invalid(f.message().to_string())
                                }
                                _ => Unresolved::Transient(f),
                            }
                        })?;
                        self.check(data, &format!("{}", Reference::Url { url }))
                            .await
                    })
                    .await
            }
            Reference::Job { id, index, batch } => {
                let batch = match (batch, &job.batch) {
                    (Some(b), Some(own)) if b == own => Some(b.clone()),
                    (Some(b), _) if self.other_batches => Some(b.clone()),
                    (Some(b), _) => {
                        return Err(Unresolved::Invalid(format!(
                            "the reference {r} names another batch ({b}): set \
                             references.other_batches to allow it"
                        )));
                    }
                    (None, own) => own.clone(),
                };
                let dir = keys::job_dir(&self.prefix, batch.as_deref(), id);
                let key = self.result_key(&dir, r, *index).await?;
                self.cache
                    .get(&format!("key:{key}"), false, || self.read_stored(key))
                    .await
            }
        }
    }

    /// The key of image `index` of the job in `dir`, by its stored result.
    async fn result_key(&self, dir: &str, r: &Reference, index: u32) -> Result<String, Unresolved> {
        let record = self
            .store
            .get(&keys::record(dir))
            .await
            .map_err(|e| Unresolved::Transient(Failure::from(e)))?;
        let Some(record) = record else {
            let failed = self
                .store
                .head(&keys::failed_record(dir))
                .await
                .map_err(|e| Unresolved::Transient(Failure::from(e)))?;
            if failed.is_some() {
                return Err(Unresolved::Invalid(format!(
                    "the reference {r} names a job that failed"
                )));
            }
            return Err(Unresolved::NotYet(r.to_string()));
        };
        let event: CloudEvent = serde_json::from_slice(&record).map_err(|e| {
            Unresolved::Invalid(format!(
                "the result of the job {r} names cannot be read: {e}"
            ))
        })?;
        event
            .data
            .images
            .iter()
            .find(|i| i.index == index)
            .map(|i| i.key.clone())
            .ok_or_else(|| {
                Unresolved::Invalid(format!(
                    "the reference {r}: that job made {} images",
                    event.data.images.len()
                ))
            })
    }

    async fn read_stored(&self, key: String) -> Result<RefImage, Unresolved> {
        let data = self
            .store
            .get(&key)
            .await
            .map_err(|e| Unresolved::Transient(Failure::from(e)))?
            .ok_or_else(|| {
                Unresolved::Invalid(format!("the reference {key} is not in the store"))
            })?;
        self.check(data, &key).await
    }

    /// Sniffs and decodes the bytes within bounds, on the image threads.
    async fn check(&self, data: Bytes, what: &str) -> Result<RefImage, Unresolved> {
        let max_pixels = self.max_pixels;
        let bytes = data.clone();
        let checked = self
            .work
            .run(move || -> Result<(u32, u32, bool), String> {
                let decoded = crate::imaging::decode_within(&bytes, max_pixels)?;
                Ok((
                    decoded.image.width(),
                    decoded.image.height(),
                    crate::imaging::uses_alpha(&decoded.image),
                ))
            })
            .await
            .map_err(|why| Unresolved::Invalid(format!("the reference {what}: {why}")))?;
        let (content_type, extension) = crate::provider::sniff(&data, "");
        let (width, height, alpha) = checked;
        Ok(RefImage::from_checked(
            data,
            content_type,
            extension,
            width,
            height,
            alpha,
        ))
    }
}

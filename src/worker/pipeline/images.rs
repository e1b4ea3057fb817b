//! What a job has in the store: its listing, its stored images (reused, never bought again), the
//! images an earlier delivery spooled on this host, the uploads of new images (spooled when the
//! store fails), and its records.

use std::sync::Arc;

use bytes::Bytes;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::super::retry::RetryPolicy;
use super::super::spool::Spool;
use crate::domain::error::Failure;
use crate::domain::event::{CloudEvent, StoredImage};
use crate::domain::job::Job;
use crate::domain::keys;
use crate::provider::{GeneratedImage, sniff};
use crate::storage::{META_FINGERPRINT, META_JOB_ID, META_SHA256, ObjectStore, PutObject};

/// The keys of a job's directory.
pub struct Listing {
    pub keys: Vec<String>,
}

impl Listing {
    pub fn has(&self, key: &str) -> bool {
        self.keys.iter().any(|k| k == key)
    }
}

pub struct Images {
    pub store: Arc<dyn ObjectStore>,
    pub spool: Option<Spool>,
    /// Retries of storage requests.
    pub retry: RetryPolicy,
}

impl Images {
    /// Runs one storage request with retries.
    async fn retried<T, Fut>(&self, what: &str, op: impl FnMut() -> Fut) -> Result<T, Failure>
    where
        Fut: std::future::Future<Output = Result<T, Failure>>,
    {
        self.retry
            .run(op, |e, _| warn!(error = %e, "retrying {what}"))
            .await
            .result
    }

    /// One listing of the job's directory tells whether its result is stored, which of its
    /// images are, and whether it waits at a provider.
    pub async fn list(&self, dir: &str) -> Result<Listing, Failure> {
        let prefix = format!("{dir}/");
        let keys = self
            .retried("the listing of the job's objects", || async {
                crate::storage::list_all(&*self.store, &prefix, None)
                    .await
                    .map_err(Failure::from)
            })
            .await?;
        Ok(Listing { keys })
    }

    /// The stored record, when it can be read.
    pub async fn stored_event(&self, key: &str) -> Result<Option<CloudEvent>, Failure> {
        let bytes = self
            .retried("the result record lookup", || async {
                self.store.get(key).await.map_err(Failure::from)
            })
            .await?;
        let Some(bytes) = bytes else {
            return Ok(None);
        };
        match serde_json::from_slice::<CloudEvent>(&bytes) {
            Ok(event) => Ok(Some(event)),
            Err(e) => {
                warn!(error = %e, key, "stored result record is unreadable; processing the job again");
                Ok(None)
            }
        }
    }

    /// Images of this job that an earlier delivery already stored.
    pub async fn reuse(
        &self,
        job: &Job,
        dir: &str,
        listing: &Listing,
    ) -> Result<Vec<StoredImage>, Failure> {
        let mut images: Vec<StoredImage> = Vec::new();
        for key in &listing.keys {
            let Some((index, ext)) = keys::parse_image(dir, key) else {
                continue;
            };
            if index >= job.n as u32 || images.iter().any(|i| i.index == index) {
                continue;
            }
            let Some(info) = self.store.head(key).await.map_err(Failure::from)? else {
                continue;
            };
            if let Some(theirs) = &info.fingerprint
                && *theirs != job.fingerprint()
            {
                return Err(conflict(job));
            }
            let (sha256, content_type) = match info.sha256 {
                Some(sha) => (sha, info.content_type),
                None => {
                    let Some(data) = self.store.get(key).await.map_err(Failure::from)? else {
                        continue;
                    };
                    (hex::encode(Sha256::digest(&data)), None)
                }
            };
            let content_type = content_type.unwrap_or_else(|| sniff(&[], &ext).0.to_string());
            images.push(self.stored(key.clone(), index, content_type, info.size, sha256));
        }
        Ok(images)
    }

    fn stored(
        &self,
        key: String,
        index: u32,
        content_type: String,
        bytes: u64,
        sha256: String,
    ) -> StoredImage {
        StoredImage {
            index,
            bucket: self.store.location().to_string(),
            uri: self.store.uri(&key),
            key,
            content_type,
            bytes,
            sha256,
            width: None,
            height: None,
            alpha: None,
            variants: Vec::new(),
        }
    }

    /// Uploads images of this job that an earlier delivery spooled on this host.
    pub async fn unspool(
        &self,
        job: &Job,
        dir: &str,
        images: &mut Vec<StoredImage>,
    ) -> Result<(), Failure> {
        let Some(spool) = &self.spool else {
            return Ok(());
        };
        for spooled in spool.take_list(dir).await.map_err(Failure::from)? {
            let Some((index, ext)) = keys::parse_image(dir, &spooled.key) else {
                continue;
            };
            let size = spooled.data.len() as u64;
            if index >= job.n as u32 || images.iter().any(|i| i.index == index) {
                spool.remove(&spooled.key, size).await;
                continue;
            }
            let (content_type, _) = sniff(&spooled.data, &ext);
            let sha256 = hex::encode(Sha256::digest(&spooled.data));
            self.put_image(
                job,
                &spooled.key,
                spooled.data.clone(),
                content_type,
                &sha256,
            )
            .await?;
            info!(key = %spooled.key, "spooled image uploaded: not bought again");
            spool.remove(&spooled.key, size).await;
            images.push(self.stored(spooled.key, index, content_type.to_string(), size, sha256));
        }
        Ok(())
    }

    pub(super) async fn put_image(
        &self,
        job: &Job,
        key: &str,
        data: Bytes,
        content_type: &str,
        sha256: &str,
    ) -> Result<(), Failure> {
        let metadata = [
            (META_JOB_ID, job.id.clone()),
            (META_SHA256, sha256.to_string()),
            (META_FINGERPRINT, job.fingerprint()),
        ];
        self.retried("an image upload", || async {
            self.store
                .put(PutObject {
                    key,
                    data: data.clone(),
                    content_type,
                    metadata: &metadata,
                    sha256: Some(sha256),
                })
                .await
                .map_err(Failure::from)
        })
        .await
    }

    /// Uploads one answer's images (`indices` are theirs, in order) one by one, adding each to
    /// `stored` as it is stored. An image that cannot be stored is kept in the spool, with the
    /// rest of the answer, and the failure says storage is down.
    pub async fn upload(
        &self,
        job: &Job,
        dir: &str,
        indices: &[u32],
        answer: Vec<GeneratedImage>,
        stored: &mut Vec<StoredImage>,
    ) -> Result<(), Failure> {
        let mut answers = indices.iter().copied().zip(answer);
        while let Some((index, image)) = answers.next() {
            let key = keys::image(dir, index, image.extension);
            let sha256 = hex::encode(Sha256::digest(&image.data));
            let bytes = image.data.len() as u64;
            let started = std::time::Instant::now();
            let put = self
                .put_image(job, &key, image.data.clone(), image.content_type, &sha256)
                .await;
            if let Err(e) = put {
                self.keep_in_spool(&key, image.data).await;
                for (index, image) in answers {
                    self.keep_in_spool(&keys::image(dir, index, image.extension), image.data)
                        .await;
                }
                return Err(e.storage_down());
            }
            super::super::metrics::uploaded(bytes, started.elapsed());
            stored.push(self.stored(key, index, image.content_type.to_string(), bytes, sha256));
        }
        Ok(())
    }

    async fn keep_in_spool(&self, key: &str, data: Bytes) {
        let kept = match &self.spool {
            Some(spool) => spool.keep(key, data).await,
            None => false,
        };
        if kept {
            info!(key, "image spooled until storage is back");
        } else {
            super::super::metrics::images_lost(1);
            warn!(
                key,
                "image could not be spooled (no spool, or full): it will be generated again"
            );
        }
    }

    /// Stores a succeeded job's record, which makes its redeliveries free.
    pub async fn store_record(&self, job: &Job, dir: &str, record: Bytes) -> Result<(), Failure> {
        let key = keys::record(dir);
        let metadata = [(META_JOB_ID, job.id.clone())];
        self.retried("the result record upload", || async {
            self.store
                .put(PutObject {
                    key: &key,
                    data: record.clone(),
                    content_type: "application/json",
                    metadata: &metadata,
                    sha256: None,
                })
                .await
                .map_err(Failure::from)
        })
        .await
    }

    /// Keeps a failed job's event next to where its images would be, so that a batch's outcome
    /// can be read from the store (a later success's record wins over it).
    pub async fn store_failure(&self, dir: &str, event: &CloudEvent) {
        let Ok(body) = serde_json::to_vec(event) else {
            return;
        };
        let key = keys::failed_record(dir);
        let put = self
            .store
            .put(PutObject::json(&key, Bytes::from(body)))
            .await;
        if let Err(e) = put {
            warn!(error = %e, "could not store the failed job's record");
        }
    }
}

/// The failure of a job whose id was used before by another job: what is stored is not its.
pub fn conflict(job: &Job) -> Failure {
    Failure::Permanent {
        kind: crate::domain::error::ErrorKind::Conflict,
        message: format!(
            "job id {:?} (batch {}) was used before by a job with other fields: its stored \
             results are not handed to this one; give this job its own id",
            job.id,
            job.batch.as_deref().unwrap_or("none")
        ),
        detail: Box::default(),
    }
}

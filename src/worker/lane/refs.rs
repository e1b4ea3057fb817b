//! A lane job's reference images, for an edit in a batch: read as a live job reads them, then
//! uploaded to the provider once each (by content, whatever the number of jobs and files that
//! use it) and named in the job's line by file id. Inline data would fill an input file's
//! 200 MB with a few jobs.

use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::record::{LaneRecord, unix_ms};
use super::{Lane, lock};
use crate::amqp::publisher::Publisher;
use crate::domain::error::Failure;
use crate::domain::keys;
use crate::provider::BatchFiles;
use crate::provider::reference::RefImage;
use crate::references::Unresolved;

#[derive(Serialize, Deserialize)]
struct Uploaded {
    file_id: String,
}

impl Lane {
    /// The job's references as uploaded files; `None` when the job is not sent now (it waits
    /// for an earlier job's image, or a reference could not be read now, or it failed: then
    /// its outcome is published and its open mark gone).
    pub(super) async fn files_of(
        &self,
        publisher: &Publisher,
        record: &LaneRecord,
        key: &str,
    ) -> Result<Option<BatchFiles>, String> {
        let delivery = record.delivery();
        let why = match self
            .pipeline
            .lane_references(delivery.body, delivery.message_id)
            .await
        {
            Ok(resolved) => {
                let mut files = BatchFiles::default();
                for image in &resolved.images {
                    match self.file_of(image).await {
                        Ok(id) => files.images.push(id),
                        Err(e) => {
                            warn!(job_id = %record.job_id, error = %e, "a reference could not be uploaded: the job waits");
                            return Ok(None);
                        }
                    }
                }
                if let Some(mask) = &resolved.mask {
                    match self.file_of(mask).await {
                        Ok(id) => files.mask = Some(id),
                        Err(e) => {
                            warn!(job_id = %record.job_id, error = %e, "a mask could not be uploaded: the job waits");
                            return Ok(None);
                        }
                    }
                }
                return Ok(Some(files));
            }
            Err(Unresolved::NotYet(reference)) => {
                let waited = unix_ms().saturating_sub(record.recorded_ms) / 1000;
                if waited < self.settings.references.job_wait_secs {
                    return Ok(None);
                }
                format!(
                    "the reference {reference} names a job with no result after {waited} s \
                     (references.job_wait_secs)"
                )
            }
            Err(Unresolved::Invalid(why)) => why,
            Err(Unresolved::Transient(failure)) => {
                warn!(job_id = %record.job_id, error = %failure, "a reference could not be read: the job waits");
                return Ok(None);
            }
        };
        let outcome = self
            .pipeline
            .fail_lane_job(delivery, Failure::invalid_job(why), None)
            .await;
        self.deliver(publisher, record, outcome, None).await?;
        let _ = self.store().delete(key).await;
        Ok(None)
    }

    /// The provider's file id of a reference image, uploaded the first time it is asked for.
    async fn file_of(&self, image: &RefImage) -> Result<String, String> {
        if let Some(id) = lock(&self.reference_files).get(&image.sha256) {
            return Ok(id.clone());
        }
        let key = format!(
            "{}references/{}.json",
            keys::lane(&self.prefix, &self.provider),
            image.sha256
        );
        let id = match self
            .read_json::<Uploaded>(&key)
            .await
            .map_err(|e| e.to_string())?
        {
            Some(u) => u.file_id,
            None => {
                let name = format!("{}.{}", image.sha256, image.extension);
                let object = self
                    .client
                    .upload_as("vision", &name, image.content_type, image.data.clone())
                    .await
                    .map_err(|f| format!("uploading a reference failed: {f}"))?;
                self.write_json(
                    &key,
                    &Uploaded {
                        file_id: object.id.clone(),
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
                info!(sha256 = %image.sha256, file_id = %object.id, "reference image uploaded for the batch lane");
                object.id
            }
        };
        lock(&self.reference_files).insert(image.sha256.clone(), id.clone());
        Ok(id)
    }
}

//! The step that reads a job's reference images before its provider is called ([`References`]):
//! read, they go with every request of the job; an earlier job a `job:` reference names that
//! has no result yet defers the job (through the delay queues, no attempt counted) until it has
//! one, the job's deadline passes, or `references.job_wait_secs` runs out; a reference that can
//! never be read fails the job as `invalid_job`.

use std::time::Duration;

use tracing::{info, warn};

use super::Outcome;
use super::events::Progress;
use super::journal::StoreJournal;
use super::run::JobRun;
use crate::domain::error::Failure;
use crate::provider::queued::unix_ms;
use crate::references::Unresolved;

/// How long a job waiting for an earlier job is put off before it looks again.
const WAIT_STEP: Duration = Duration::from_secs(30);

impl JobRun<'_> {
    /// Reads the job's references into `progress` (at once when it has none). `Err`: how the
    /// delivery ends instead.
    pub(super) async fn read_references(&self, progress: &mut Progress) -> Result<(), Outcome> {
        if self.job.images.is_empty() && self.job.mask.is_none() {
            return Ok(());
        }
        let journal = StoreJournal {
            store: &*self.p.images.store,
            dir: self.dir,
        };
        match self.p.references.resolve(self.job).await {
            Ok(resolved) => {
                progress.refs = resolved;
                Ok(())
            }
            Err(Unresolved::NotYet(reference)) => {
                if let Some(failure) = self.p.unwanted(self.job).await {
                    return Err(self.failed(std::mem::take(progress), failure));
                }
                let now = unix_ms();
                let since = match journal.waiting_since().await {
                    Ok(Some(since)) => since,
                    Ok(None) => {
                        if let Err(e) = journal.set_waiting_since(now).await {
                            warn!(error = %e, "could not record when the job began to wait");
                        }
                        now
                    }
                    Err(failure) => return Err(self.storage_down(failure)),
                };
                let waited = Duration::from_millis(now.saturating_sub(since));
                let limit = Duration::from_secs(self.p.reference_wait_secs);
                if waited >= limit {
                    return Err(self.failed(
                        std::mem::take(progress),
                        Failure::invalid_job(format!(
                            "the reference {reference} names a job with no result after {} s \
                             (references.job_wait_secs)",
                            waited.as_secs()
                        )),
                    ));
                }
                info!(reference = %reference, waited_secs = waited.as_secs(),
                    "the job's reference has no result yet: it waits in a delay queue");
                // Through a delay queue, never held: the job it waits for may be queued behind
                // it. The attempts stay as they were.
                Err(Outcome::Defer {
                    after: WAIT_STEP.min(limit - waited).max(Duration::from_secs(1)),
                    attempts: progress.prior,
                })
            }
            Err(Unresolved::Invalid(why)) => {
                Err(self.failed(std::mem::take(progress), Failure::invalid_job(why)))
            }
            Err(Unresolved::Transient(failure)) => {
                warn!(error = %failure, "a reference could not be read: the job tries again later");
                Err(Outcome::Defer {
                    after: WAIT_STEP,
                    attempts: progress.prior + 1,
                })
            }
        }
    }
}

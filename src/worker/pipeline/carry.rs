//! The job's journal as its trip uses it: the request it waits for at its provider (read once
//! per delivery, ignored when spent or another provider's), recorded before anything waits, and
//! what the job bought so far, carried to the delivery that finishes it.

use tracing::warn;

use super::Outcome;
use super::events::Progress;
use super::images::Listing;
use super::journal::{PendingEntry, StoreJournal};
use super::run::JobRun;
use crate::domain::error::Failure;
use crate::domain::keys;

impl JobRun<'_> {
    /// The request the job waits for at its provider, when its journal has one.
    pub(super) async fn pending(
        &self,
        listing: &Listing,
        journal: &StoreJournal<'_>,
        stored: &[u32],
    ) -> Result<Option<PendingEntry>, Failure> {
        if !listing.has(&keys::journal(self.dir, keys::PENDING_JOURNAL_NAME)) {
            return Ok(None);
        }
        Ok(journal.pending().await?.filter(|entry| {
            if entry.answered(stored) {
                return false;
            }
            let same = entry.provider == self.route.name;
            if !same {
                warn!(recorded = %entry.provider, provider = %self.route.name,
                    "the journal names another provider than the job's: submitting anew");
            }
            same
        }))
    }

    /// The provider queued the job: its handle goes to the journal before anything waits, with
    /// what the job bought so far. `Err`: the outcome when the store cannot keep it.
    pub(super) async fn record_pending(
        &self,
        journal: &StoreJournal<'_>,
        progress: &Progress,
        entry: &PendingEntry,
    ) -> Result<(), Outcome> {
        self.carry_on(journal, progress).await;
        if let Err(failure) = journal.set_pending(entry).await {
            warn!(error = %failure,
                "could not record the provider's handle: a redelivery may submit the job again");
            return Err(self.storage_down(failure));
        }
        Ok(())
    }

    /// The job leaves this delivery unfinished: what it bought so far goes to its journal, so
    /// that the delivery that finishes it counts it (not written when nothing was bought).
    pub(super) async fn carry_on(&self, journal: &StoreJournal<'_>, progress: &Progress) {
        if progress.bought == 0 && progress.earlier.is_empty() {
            return;
        }
        if let Err(e) = journal.set_spent(&progress.spent()).await {
            warn!(error = %e, "could not record what the job bought so far: its event will count less");
        }
    }

    pub(super) fn count_possibly_billed(&self, progress: &mut Progress, n: u32) {
        progress.possibly_billed = n;
        crate::worker::metrics::possibly_billed(&self.route.name, n as u64);
        if n > 0 {
            warn!(
                possibly_billed = n,
                "requests that may have been billed without an image"
            );
        }
    }
}

//! How a job's trip ends: its images stored (the record, then the event), a stored result
//! published again, a failure, a paused provider, or a store that keeps failing.

use std::time::Duration;

use tracing::{info, warn};

use super::events::{JobEvent, Progress};
use super::run::JobRun;
use super::{Outcome, ReturnReason, Settle};
use crate::domain::error::Failure;
use crate::domain::event::CloudEvent;

impl JobRun<'_> {
    /// Every image is stored: the record, then the event.
    pub(super) async fn succeed(&self, progress: Progress) -> Outcome {
        let event = self.p.events.succeeded(self.event(), progress);
        let record = match serde_json::to_vec(&event) {
            Ok(r) => bytes::Bytes::from(r),
            Err(e) => {
                return self
                    .p
                    .events
                    .unrecorded(event, Failure::transient(e.to_string()));
            }
        };
        if let Err(failure) = self.p.images.store_record(self.job, self.dir, record).await {
            return self.storage_down(failure);
        }
        info!(
            images = event.data.images.len(),
            calls = event.data.attempts,
            "job succeeded"
        );
        Outcome::Finished {
            event: Box::new(event),
            settle: Settle::Ack,
        }
    }

    /// Whether a stored result is this job's: its fingerprint matches, or it has none (stored
    /// before fingerprints existed).
    pub(super) fn same_job(&self, event: &CloudEvent) -> bool {
        event
            .data
            .job_fingerprint
            .as_ref()
            .is_none_or(|theirs| *theirs == self.job.fingerprint())
    }

    pub(super) fn stored(&self, event: CloudEvent, why: &str) -> Outcome {
        info!("{why}: publishing it again without a provider call");
        Outcome::Finished {
            event: Box::new(event),
            settle: Settle::Ack,
        }
    }

    pub(super) fn failed(&self, progress: Progress, failure: Failure) -> Outcome {
        self.p.events.failed(self.event(), progress, failure)
    }

    /// What this job's event is built from.
    fn event(&self) -> JobEvent<'_> {
        JobEvent {
            job: self.job,
            route: self.route,
            request: &self.request,
            origin: self.delivery.origin(),
            started: self.started,
        }
    }

    /// The job's provider is paused: the job waits in a delay queue (no attempt counted), unless
    /// every provider is paused: then the worker stops taking jobs and the job goes back.
    pub(super) fn provider_paused(&self, wait: Duration, attempts: u32) -> Outcome {
        if let Some((reason, message)) = self.p.routes.all_paused() {
            return Outcome::Return {
                reason: ReturnReason::Stop { reason, message },
            };
        }
        let after = wait.max(Duration::from_secs(1));
        info!(provider = %self.route.name, after_secs = after.as_secs(),
            "the job's provider is paused: the job waits in a delay queue");
        Outcome::Defer { after, attempts }
    }

    /// Stops taking jobs after a storage failure (retries exhausted): the job goes back untouched.
    pub(super) fn storage_down(&self, failure: Failure) -> Outcome {
        match failure.storage_down() {
            Failure::Stop {
                reason, message, ..
            } => {
                warn!(error = %message, "storage keeps failing: the job goes back to the queue");
                self.halt.cancel();
                Outcome::Return {
                    reason: ReturnReason::Stop { reason, message },
                }
            }
            other => {
                // Not a transient storage failure (a bug or a refused key): give it back too,
                // it costs nothing to try again later.
                warn!(error = %other, "storage failed: the job goes back to the queue");
                Outcome::Return {
                    reason: ReturnReason::Halted,
                }
            }
        }
    }
}

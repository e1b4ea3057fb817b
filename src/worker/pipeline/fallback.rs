//! Falling back: a job whose provider is out of service for it (paused for quota, credits or
//! credentials, or its retries exhausted on transient errors) moves to the provider's
//! `fallback` providers in turn; a content refusal moves only where `fallback_on_refusal` says
//! so. What the job bought at each provider is priced and kept, for the event.

use tracing::warn;

use super::Outcome;
use super::events::Progress;
use super::images::Listing;
use super::journal::StoreJournal;
use super::run::{JobRun, Otherwise, Step};
use crate::domain::error::Failure;
use crate::domain::keys;
use crate::provider::ImageRequest;
use crate::worker::providers::Route;

impl JobRun<'_> {
    /// Buys the job's images at its provider and, when that one is out of service for the job,
    /// at its fallback providers in turn (`providers.NAME.fallback`, those that are not paused
    /// and can make what the job asks). With none left, the job waits for its provider (paused)
    /// or fails as it would have without them.
    pub(super) async fn buy_across(&self, listing: &Listing, progress: Progress) -> Outcome {
        let mut at: JobRun<'_> = self.at(self.route);
        let mut tried = vec![self.route.name.as_str()];
        // A job queued at a fallback provider by an earlier delivery goes on there.
        if listing.has(&keys::journal(self.dir, keys::PENDING_JOURNAL_NAME)) {
            let journal = StoreJournal {
                store: &*self.p.images.store,
                dir: self.dir,
            };
            let stored: Vec<u32> = progress.images.iter().map(|s| s.index).collect();
            if let Ok(Some(entry)) = journal.pending().await
                && !entry.answered(&stored)
                && let Some(route) = self
                    .route
                    .fallback
                    .iter()
                    .find(|f| **f == entry.provider)
                    .and_then(|f| self.p.routes.get(Some(f)))
            {
                tried.extend(
                    self.route
                        .fallback
                        .iter()
                        .take_while(|f| **f != entry.provider)
                        .map(String::as_str),
                );
                tried.push(route.name.as_str());
                at = self.at(route);
            }
        }
        let mut step = at.buy(listing, progress, self.delivery.attempts).await;
        loop {
            let (mut progress, failure, otherwise) = match step {
                Step::Done(outcome) => return outcome,
                Step::OutOfService {
                    progress,
                    failure,
                    otherwise,
                } => (progress, failure, otherwise),
            };
            let next = self
                .route
                .fallback
                .iter()
                .filter(|f| !tried.contains(&f.as_str()))
                .filter_map(|f| self.p.routes.get(Some(f)))
                .map(|route| self.at(route))
                .find(|run| {
                    run.route.paused().is_none()
                        && run.route.refusal(&run.request).is_none()
                        && (self.p.budget.is_none() || run.route.unpriced(&run.request).is_none())
                });
            let Some(next) = next else {
                return match otherwise {
                    Otherwise::Paused { wait, attempts } => {
                        // What it bought so far goes with it to the delivery that finishes it.
                        let journal = StoreJournal {
                            store: &*self.p.images.store,
                            dir: self.dir,
                        };
                        at.carry_on(&journal, &progress).await;
                        at.provider_paused(wait, attempts)
                    }
                    Otherwise::Failed => at.failed(*progress, failure),
                };
            };
            warn!(from = %at.route.name, to = %next.route.name, error = %failure,
                "the provider is out of service for this job: it moves to the fallback provider");
            crate::worker::metrics::fallback(&at.route.name, &next.route.name);
            progress.leave(at.route, &at.request);
            tried.push(next.route.name.as_str());
            at = next;
            step = at.buy(listing, *progress, 0).await;
        }
    }

    /// This job's run at `route` (its request with that provider's defaults).
    fn at<'r>(&'r self, route: &'r Route) -> JobRun<'r> {
        JobRun {
            p: self.p,
            job: self.job,
            route,
            request: if std::ptr::eq(route, self.route) {
                self.request.clone()
            } else {
                ImageRequest::for_job(self.job, route.provider.defaults(), self.job.n)
            },
            dir: self.dir,
            delivery: self.delivery,
            halt: self.halt,
            started: self.started,
        }
    }

    /// The job's provider is paused: out of service for the job.
    pub(super) fn out_of_service(&self, progress: Progress, otherwise: Otherwise) -> Step {
        let failure = match self.route.paused() {
            Some((reason, message)) => Failure::Stop {
                reason,
                message,
                detail: Box::default(),
            },
            None => Failure::transient(format!("provider {} is paused", self.route.name)),
        };
        Step::OutOfService {
            progress: Box::new(progress),
            failure,
            otherwise,
        }
    }
}

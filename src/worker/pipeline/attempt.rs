//! One provider attempt: wait for a call slot (unless the worker stops or the provider pauses
//! meanwhile), check the spend caps, submit the request (or poll the one already queued), count
//! what it cost, and tell the throttle how it went. It ends in one of four ways, and nothing
//! else: done, pending, failed, or halted before the provider was asked.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::super::budget::Budget;
use super::super::providers::Route;
use super::super::throttle::Feedback;
use super::journal::PendingEntry;
use crate::domain::cost::Purchase;
use crate::domain::error::Failure;
use crate::domain::job::Job;
use crate::provider::{Answer, Generation, Handle, ImageRequest, Journal};

/// How an attempt ended.
pub enum Attempt {
    /// The images are here.
    Done(Generation),
    /// The provider queued the request: look again after `after`.
    Pending {
        handle: Handle,
        after: Duration,
        request_id: Option<String>,
    },
    /// The provider has no room for the request now: nothing was sent.
    Busy { after: Duration },
    /// The provider said no.
    Failed(Failure),
    /// Nothing was asked of the provider.
    Halted(Halt),
}

/// Why an attempt did not reach the provider.
#[derive(Debug, Clone, PartialEq)]
pub enum Halt {
    /// The worker stops taking jobs (shutdown, a pause of the whole worker).
    Worker,
    /// The job's provider was paused while the job waited for a slot.
    Provider,
    /// A spend cap is reached: this worker's (a stop) or the job's batch's (a permanent
    /// `budget_exceeded`).
    Budget(Failure),
}

/// What one attempt needs.
pub struct AttemptContext<'a> {
    pub job: &'a Job,
    pub route: &'a Route,
    pub request: &'a ImageRequest,
    /// The request already queued at the provider, to poll instead of submitting.
    pub pending: Option<&'a PendingEntry>,
    pub journal: &'a dyn Journal,
    pub halt: &'a CancellationToken,
    pub budget: Option<&'a Budget>,
    /// This attempt is the paused provider's probe: its pause does not stop it.
    pub probe: bool,
}

impl AttemptContext<'_> {
    pub async fn run(&self) -> Attempt {
        let route = self.route;
        let polling = self.pending.is_some();
        // A poll is one short request that buys nothing: it takes no call slot. Polls are what
        // tell a provider's queued requests are done (and free its room for the next submits),
        // so they never wait behind submits that wait for that room.
        let permit = if polling {
            None
        } else {
            Some(tokio::select! {
                permit = route.throttle.acquire(self.request.count.into()) => permit,
                _ = self.halt.cancelled() => return Attempt::Halted(Halt::Worker),
                _ = route.until_paused(), if !self.probe => return Attempt::Halted(Halt::Provider),
            })
        };
        if self.halt.is_cancelled() {
            return Attempt::Halted(Halt::Worker);
        }
        // A paused provider's queued requests are still collected: they are paid for.
        if !self.probe && !polling && route.paused().is_some() {
            return Attempt::Halted(Halt::Provider);
        }
        // After the slot: spend committed by the calls this one waited for is counted. A poll
        // buys nothing, and its request is paid for: it is collected whatever the caps say.
        if !polling
            && let Some(budget) = self.budget
            && let Err(failure) = budget.check(self.job.batch.as_deref()).await
        {
            return Attempt::Halted(Halt::Budget(failure));
        }
        let started = Instant::now();
        let answer = match self.pending {
            Some(entry) => {
                route
                    .provider
                    .poll(&entry.handle, self.request, self.journal)
                    .await
            }
            None => route.provider.submit(self.request, self.journal).await,
        };
        let status = match &answer {
            Ok(_) => Some(200),
            Err(f) => f.detail().status,
        };
        super::super::metrics::provider_call(&route.name, status, started.elapsed());
        // Counted before the slot is free, so that the next call's budget check sees it.
        let spent = match &answer {
            Ok(Answer::Done(g)) if !g.images.is_empty() => {
                super::super::metrics::images_generated(&route.name, g.images.len() as u64);
                Some(self.cost(g))
            }
            // Paid for, maybe, with nothing to show: charged at the request's estimate, so that
            // a provider that keeps failing after billing cannot spend past the caps.
            Err(f) if (f.possibly_billed() && !polling) || f.detail().charged => {
                Some(route.estimated_cost(self.request).map_or(0.0, |c| c.usd))
            }
            _ => None,
        };
        if let Some(cost) = spent {
            super::super::metrics::cost(&route.name, cost);
            if let Some(budget) = self.budget {
                budget
                    .record(self.job.batch.as_deref(), &self.job.id, cost)
                    .await;
            }
        }
        if let Some(permit) = permit {
            match &answer {
                // Provider queue time is not latency: only a synchronous answer's round trip is.
                Ok(Answer::Done(g)) => {
                    permit.finish(Feedback::Done, g.rate_limits, g.usage.tokens())
                }
                Ok(Answer::Pending { .. } | Answer::Busy { .. }) => {
                    permit.finish(Feedback::Ignore, None, None)
                }
                Err(f) => permit.finish(Feedback::of(f), f.detail().rate_limits, None),
            }
        }
        match answer {
            Ok(Answer::Done(generation)) => {
                info!(
                    provider = %route.name,
                    images = generation.images.len(),
                    latency_ms = started.elapsed().as_millis() as u64,
                    request_id = generation.request_id.as_deref().unwrap_or(""),
                    "provider returned"
                );
                Attempt::Done(generation)
            }
            Ok(Answer::Pending {
                handle,
                after,
                request_id,
            }) => Attempt::Pending {
                handle,
                after,
                request_id,
            },
            Ok(Answer::Busy { after }) => Attempt::Busy { after },
            Err(failure) => Attempt::Failed(failure),
        }
    }

    /// What one answer cost (0 when the prices do not know the model).
    fn cost(&self, generation: &Generation) -> f64 {
        let model = generation.model.as_deref().unwrap_or(&self.request.model);
        self.route
            .prices
            .cost(Purchase {
                model,
                size: &self.request.size_text(),
                quality: self.request.quality.as_deref().unwrap_or(""),
                usage: &generation.usage,
            })
            .map_or(0.0, |c| c.usd)
    }
}

//! One job's trip, top to bottom: the orchestration that calls each step of the pipeline in
//! turn (result already stored, reuse, lease, attempts, uploads, record, event) and turns what
//! each step says into the job's [`Outcome`].

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::attempt::{Attempt, AttemptContext, Halt};
use super::events::Progress;
use super::images::{Listing, conflict};
use super::journal::{PendingEntry, Recorder, StoreJournal};
use super::{Delivery, Outcome, Pipeline, ReturnReason};
use crate::domain::error::{ErrorKind, Failure};
use crate::domain::job::Job;
use crate::domain::keys;
use crate::provider::{HANDLE_LOST, Handle, ImageRequest};
use crate::worker::providers::{Admission, Route};
use crate::worker::retry::Decision;

/// Where buying at one provider ended.
pub(super) enum Step {
    /// The job's outcome.
    Done(Outcome),
    /// The provider is out of service for the job: a fallback provider may take it.
    OutOfService {
        progress: Box<Progress>,
        failure: Failure,
        otherwise: Otherwise,
    },
}

/// What becomes of a job that is out of service at its provider and has no fallback left.
pub(super) enum Otherwise {
    /// It waits for the paused provider in a delay queue.
    Paused { wait: Duration, attempts: u32 },
    /// It fails with the provider's failure.
    Failed,
}

/// One job's trip through the pipeline.
pub(super) struct JobRun<'a> {
    pub(super) p: &'a Pipeline,
    pub(super) job: &'a Job,
    pub(super) route: &'a Route,
    /// The job's request for all its images, the provider's defaults filled in.
    pub(super) request: ImageRequest,
    pub(super) dir: &'a str,
    pub(super) delivery: Delivery<'a>,
    pub(super) halt: &'a CancellationToken,
    pub(super) started: Instant,
}

impl JobRun<'_> {
    pub(super) async fn run(&self) -> Outcome {
        let progress = Progress::new(self.delivery.attempts);
        if let Some(why) = self.route.refusal(&self.request) {
            return self.failed(progress, Failure::invalid_job(why));
        }
        if self.p.budget.is_some()
            && let Some(why) = self.route.unpriced(&self.request)
        {
            return self.failed(progress, Failure::invalid_job(why));
        }
        let listing = match self.p.images.list(self.dir).await {
            Ok(listing) => listing,
            Err(failure) => return self.storage_down(failure),
        };
        let record_key = keys::record(self.dir);
        if listing.has(&record_key) {
            match self.p.images.stored_event(&record_key).await {
                Ok(Some(event)) if !self.same_job(&event) => {
                    return self.failed(progress, conflict(self.job));
                }
                Ok(Some(event)) => return self.stored(event, "result already stored"),
                Ok(None) => {}
                Err(failure) => return self.storage_down(failure),
            }
        }
        if let Some(outcome) = self.to_lane(&listing).await {
            return outcome;
        }
        let mut progress = progress;
        match self.p.images.reuse(self.job, self.dir, &listing).await {
            Ok(images) => progress.images = images,
            Err(failure) if failure.kind() == Some(ErrorKind::Conflict) => {
                return self.failed(progress, failure);
            }
            Err(failure) => return self.storage_down(failure),
        }
        if let Err(failure) = self
            .p
            .images
            .unspool(self.job, self.dir, &mut progress.images)
            .await
        {
            return self.storage_down(failure);
        }
        // Images stored by an earlier delivery get the variants they lack.
        if let Err(failure) = self.derive(&mut progress.images, &[], Some(&listing)).await {
            return self.derive_failed(progress, failure);
        }
        let (lease, mut progress) = match self.lease(progress, &record_key).await {
            Ok(taken) => taken,
            Err(outcome) => return outcome,
        };
        if !progress.missing(self.job.n).is_empty()
            && let Err(outcome) = self.read_references(&mut progress).await
        {
            if let Some(guard) = lease {
                guard.release().await;
            }
            return outcome;
        }
        let outcome = self.buy_across(&listing, progress).await;
        if let Some(guard) = lease {
            guard.release().await;
        }
        outcome
    }

    /// Provider attempts until every image is stored, or the job fails, waits or is given back.
    pub(super) async fn buy(
        &self,
        listing: &Listing,
        mut progress: Progress,
        retries_from: u32,
    ) -> Step {
        let route = self.route;
        let prior = progress.prior;
        if retries_from >= route.retry.max_attempts {
            let failure = Failure::transient(format!("{retries_from} attempts already failed"));
            return Step::Done(self.failed(progress, failure));
        }
        if !progress.images.is_empty() {
            info!(
                reused = progress.images.len(),
                of = self.job.n,
                "reusing images already stored"
            );
        }
        let journal = StoreJournal {
            store: &*self.p.images.store,
            dir: self.dir,
        };
        let stored: Vec<u32> = progress.images.iter().map(|s| s.index).collect();
        let mut pending = match self.pending(listing, &journal, &stored).await {
            Ok(pending) => pending,
            Err(failure) => return Step::Done(self.storage_down(failure)),
        };
        let mut carried = false;
        if !progress.journal_read && listing.has(&keys::journal(self.dir, keys::SPENT_JOURNAL_NAME))
        {
            match journal.spent().await {
                Ok(Some(earlier)) => {
                    progress.carry(earlier);
                    carried = true;
                }
                Ok(None) => {}
                Err(failure) => return Step::Done(self.storage_down(failure)),
            }
        }
        progress.journal_read = true;
        if pending.is_some() && !carried {
            // The submit that queued it, in an earlier delivery, was a call of this job (the
            // carried record counts it when there is one: it was written at that submit).
            progress.calls += 1;
        }
        let mut retries = route.retry.retries(retries_from);
        let mut hold_from = self.started;
        let per_call = route.provider.capabilities().images_per_call.max(1) as usize;
        loop {
            let missing = progress.missing(self.job.n);
            if missing.is_empty() {
                break;
            }
            if let Some(failure) = self.p.unwanted(self.job).await {
                if let Some(entry) = &pending {
                    // Its queued request is not wanted either: stop paying for it.
                    route.provider.cancel(&entry.handle).await;
                }
                return Step::Done(self.failed(progress, failure));
            }
            // A request queued at a paused provider is still collected: it is paid for, and a
            // poll buys nothing.
            let probe = match route.admit(self.delivery.probe) {
                _ if pending.is_some() => None,
                Admission::Open => None,
                Admission::Probe(guard) => Some(guard),
                Admission::Paused(wait) => {
                    let attempts = prior + retries.failed();
                    return self.out_of_service(progress, Otherwise::Paused { wait, attempts });
                }
            };
            let count = match &pending {
                Some(entry) => entry.count,
                None => missing.len().min(per_call) as u8,
            };
            let request = ImageRequest {
                count,
                refs: progress.refs.clone(),
                ..self.request.clone()
            };
            let polling = pending.is_some();
            let indices = pending.as_ref().map_or_else(
                || missing[..(count as usize).min(missing.len())].to_vec(),
                |p| p.indices.clone(),
            );
            // Where a provider that names its request itself records it before submitting.
            let recorder = Recorder {
                journal: &journal,
                template: PendingEntry {
                    provider: route.name.clone(),
                    handle: Handle(serde_json::Value::Null),
                    count,
                    request_id: None,
                    indices: indices.clone(),
                },
                spent: (progress.bought > 0 || !progress.earlier.is_empty()).then(|| {
                    let mut spent = progress.spent();
                    spent.calls += 1;
                    spent
                }),
                recorded: Default::default(),
            };
            let attempt = AttemptContext {
                job: self.job,
                route,
                request: &request,
                pending: pending.as_ref(),
                journal: &recorder,
                halt: self.halt,
                budget: self.p.budget.as_ref(),
                probe: probe.is_some(),
            }
            .run()
            .await;
            if !polling
                && matches!(
                    attempt,
                    Attempt::Done(_) | Attempt::Pending { .. } | Attempt::Failed(_)
                )
            {
                progress.calls += 1;
            }
            let failure = match attempt {
                Attempt::Halted(Halt::Worker) => {
                    debug!(
                        "returned untouched: the worker stopped taking jobs before the provider call"
                    );
                    return Step::Done(Outcome::Return {
                        reason: ReturnReason::Halted,
                    });
                }
                Attempt::Halted(Halt::Provider) => {
                    let (wait, attempts) = (route.next_probe_in(), prior + retries.failed());
                    return self.out_of_service(progress, Otherwise::Paused { wait, attempts });
                }
                Attempt::Halted(Halt::Budget(Failure::Stop {
                    reason, message, ..
                })) => {
                    self.halt.cancel();
                    return Step::Done(Outcome::Return {
                        reason: ReturnReason::Stop { reason, message },
                    });
                }
                Attempt::Halted(Halt::Budget(failure)) => {
                    return Step::Done(self.failed(progress, failure));
                }
                Attempt::Busy { after } => {
                    if let Some(probe) = probe {
                        probe.through();
                    }
                    self.carry_on(&journal, &progress).await;
                    debug!(
                        after_ms = after.as_millis() as u64,
                        "the provider has no room for the job now: it waits in a delay queue"
                    );
                    let attempts = prior + retries.failed();
                    return Step::Done(Outcome::Pending { after, attempts });
                }
                Attempt::Pending {
                    handle,
                    after,
                    request_id,
                } => {
                    if let Some(probe) = probe {
                        probe.through();
                    }
                    let entry = PendingEntry {
                        provider: route.name.clone(),
                        handle,
                        count,
                        request_id,
                        indices,
                    };
                    // The handle goes to the journal before anything waits (again only if it
                    // changed: a poll that says "not yet" writes nothing, nor a submit whose
                    // provider recorded it before submitting).
                    if pending.as_ref() != Some(&entry)
                        && recorder.recorded().as_ref() != Some(&entry)
                        && let Err(outcome) = self.record_pending(&journal, &progress, &entry).await
                    {
                        return Step::Done(outcome);
                    }
                    let attempts = prior + retries.failed();
                    // Within the hold (counted from this delivery's submit, or from its start
                    // for a request queued by an earlier one), the job is polled here, its
                    // message held: no slot, no store round trip per poll. Past it, the message
                    // waits in a delay queue.
                    if !polling {
                        hold_from = Instant::now();
                    }
                    if hold_from.elapsed() + after <= self.p.pending_hold {
                        tokio::select! {
                            () = tokio::time::sleep(after) => {}
                            () = self.halt.cancelled() => {
                                return Step::Done(Outcome::Pending { after, attempts });
                            }
                        }
                        pending = Some(entry);
                        continue;
                    }
                    info!(
                        after_ms = after.as_millis() as u64,
                        request_id = entry.request_id.as_deref().unwrap_or(""),
                        "the provider queued the job: looking again later"
                    );
                    return Step::Done(Outcome::Pending { after, attempts });
                }
                Attempt::Failed(Failure::Stop {
                    reason, message, ..
                }) => {
                    // Nothing this provider does will work until an operator acts.
                    route.pause(reason, &message);
                    drop(probe);
                    let (wait, attempts) = (route.next_probe_in(), prior + retries.failed());
                    return self.out_of_service(progress, Otherwise::Paused { wait, attempts });
                }
                Attempt::Failed(failure) => {
                    if let Some(probe) = probe {
                        probe.through();
                    }
                    // A poll buys nothing: its failure (a download that broke off, an answer
                    // that did not read) is worth polling again, never a possibly billed call.
                    let recorded = recorder.recorded().filter(|_| !polling);
                    let failure = if polling || recorded.is_some() {
                        crate::provider::queued::unbilled(failure)
                    } else {
                        failure
                    };
                    // A submit whose request was recorded before it was sent, and then failed
                    // in a way that may pass (its answer lost, say), is looked up by its
                    // recorded id at the next attempt instead of being made again.
                    if let Some(entry) = recorded
                        && failure.is_retryable()
                        && failure.detail().code.as_deref() != Some(HANDLE_LOST)
                    {
                        pending = Some(entry);
                    }
                    if polling && failure.detail().code.as_deref() == Some(HANDLE_LOST) {
                        // The queued request is gone at the provider: forget it, so that the
                        // next attempt submits anew.
                        warn!(error = %failure, "the provider lost the queued request: it will be submitted again");
                        pending = None;
                        if let Err(e) = journal.clear_pending().await {
                            return Step::Done(self.storage_down(e));
                        }
                    }
                    if (failure.possibly_billed() && !polling) || failure.detail().charged {
                        let mut estimate = route.provider.estimate(&request);
                        estimate.estimated = true;
                        progress
                            .billed_unanswered
                            .get_or_insert_with(Default::default)
                            .add(&estimate);
                    }
                    failure
                }
                Attempt::Done(generation) => {
                    if let Some(probe) = probe {
                        probe.through();
                    }
                    progress.bought(&generation);
                    let returned = generation.images.len();
                    // A polled request fills the images its journal entry names (those still
                    // missing); a submitted one the first missing.
                    let targets: Vec<u32> = match &pending {
                        Some(entry) if polling && !entry.indices.is_empty() => entry
                            .indices
                            .iter()
                            .copied()
                            .filter(|i| missing.contains(i))
                            .collect(),
                        _ => missing.clone(),
                    };
                    let indices = &targets[..returned.min(targets.len())];
                    if let Err(outcome) = self
                        .store_bought(indices, generation.images, &mut progress)
                        .await
                    {
                        return Step::Done(outcome);
                    }
                    // Its journal entry stays: with its images stored, it is spent. A short answer
                    // leaves some of them missing: the entry goes, or a later delivery would poll
                    // the same request and store its images again in their place.
                    if pending.take().is_some()
                        && returned < count as usize
                        && let Err(e) = journal.clear_pending().await
                    {
                        warn!(error = %e, "could not clear the short-answered request from the journal");
                    }
                    if returned >= count as usize {
                        continue;
                    }
                    Failure::transient(format!(
                        "the provider returned {returned} of {count} images"
                    ))
                }
            };
            match retries.next(&failure) {
                Decision::Retry(wait) => {
                    crate::worker::metrics::retry();
                    let billed = matches!(
                        failure,
                        Failure::Retryable {
                            possibly_billed: true,
                            ..
                        }
                    );
                    warn!(error = %failure, possibly_billed = billed, wait_ms = wait.as_millis() as u64,
                        request_id = failure.detail().request_id.as_deref().unwrap_or(""), "retrying");
                    tokio::time::sleep(wait).await;
                }
                Decision::Defer(after) => {
                    self.count_possibly_billed(&mut progress, retries.possibly_billed());
                    self.carry_on(&journal, &progress).await;
                    let attempts = prior + retries.failed();
                    info!(error = %failure, after_secs = after.as_secs(), attempts,
                        "long wait: the job goes to a delay queue instead of holding its message");
                    return Step::Done(Outcome::Defer { after, attempts });
                }
                Decision::GiveUp => {
                    self.count_possibly_billed(&mut progress, retries.possibly_billed());
                    if let Some(entry) = &pending {
                        // The job leaves this provider: its queued request is not wanted.
                        route.provider.cancel(&entry.handle).await;
                    }
                    // Retries exhausted on transient errors: this provider is out of service
                    // for the job. A refusal moves only where the provider's config says so.
                    let moves = failure.is_retryable()
                        || (route.fallback_on_refusal
                            && failure.kind() == Some(ErrorKind::ContentPolicy));
                    if moves {
                        return Step::OutOfService {
                            progress: Box::new(progress),
                            failure,
                            otherwise: Otherwise::Failed,
                        };
                    }
                    return Step::Done(self.failed(progress, failure));
                }
            }
        }
        self.count_possibly_billed(&mut progress, retries.possibly_billed());
        Step::Done(self.succeed(progress).await)
    }
}

//! Processing of one job, from message body to outcome. Knows nothing of AMQP: the consumer
//! turns the [`Outcome`] into ack, dead-letter, delay or return.
//!
//! One job's trip, top to bottom ([`JobRun`]):
//!
//! validate -> can its provider do what it asks? -> result record already stored? (then its
//! event again, no provider call) -> images already stored (or spooled here) are reused -> take
//! the job's lease -> attempts for the missing images, as many calls as the provider's
//! images-per-call need: each one done, pending (queued at the provider: look again later, its
//! handle in the journal), failed (the retry decision: retry, defer, give up) or halted (the
//! worker or the provider stopped) -> upload each image -> store the result record -> event.
//!
//! The trip itself is [`run`]; its steps, each with one job: [`attempt`] (one provider attempt), [`lease`] (the lease guard),
//! [`images`] (listing, reuse, spool, uploads, records), [`journal`] (the provider's handle),
//! [`fallback`] (moving a job to the next provider when its own is out of service for it),
//! [`events`] (the one builder of result and failure events).

pub mod attempt;
mod carry;
pub mod derive;
mod endings;
pub mod events;
pub mod fallback;
pub mod images;
pub mod journal;
pub mod lane;
pub mod lease;
pub mod refs;
pub mod run;

use std::any::Any;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, info_span, warn};

use self::events::{Events, Origin};
use self::images::Images;
use self::lease::Leases;
use self::run::JobRun;
use super::budget::Budget;
use super::providers::{Route, Routes};
use super::retry::RetryPolicy;
use super::spool::Spool;
use crate::config::Settings;
use crate::domain::error::{ErrorKind, Failure, StopReason};
use crate::domain::event::{CloudEvent, Status};
use crate::domain::job::{Job, JobRules};
use crate::domain::keys;
use crate::provider::ImageRequest;
use crate::storage::ObjectStore;

/// A message as the pipeline sees it.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub body: &'a [u8],
    /// The AMQP `message_id`, the job id when the body has none.
    pub message_id: Option<&'a str>,
    /// The AMQP `correlation_id`, echoed in the job's event.
    pub correlation_id: Option<&'a str>,
    /// Provider attempts that failed on earlier deliveries (the `x-imagegen-attempts` header).
    pub attempts: u32,
    /// The worker's probe while every provider is paused: the job's provider is tried even
    /// though it is paused.
    pub probe: bool,
    /// The batch lane sent the job back to be called live (its `x-imagegen-lane` header): it
    /// does not go to the lane again.
    pub live_only: bool,
}

impl<'a> Delivery<'a> {
    /// The properties the producer matches the job's event by.
    pub fn origin(&self) -> Origin<'a> {
        Origin {
            message_id: self.message_id,
            correlation_id: self.correlation_id,
        }
    }
}

/// What to do with the message after processing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settle {
    Ack,
    DeadLetter,
}

#[derive(Debug)]
pub enum Outcome {
    /// Publish the event (with confirm), then settle the message.
    Finished {
        event: Box<CloudEvent>,
        settle: Settle,
    },
    /// Give the message back untouched: not a failed attempt.
    Return { reason: ReturnReason },
    /// The job goes to the batch lane: its record is written to the store, then the message is
    /// acked (its event comes from the lane). `recorded`: the record is already there.
    ToLane {
        entry: Box<lane::LaneEntry>,
        recorded: bool,
    },
    /// Retry later, after `after`: too long to hold the message. `attempts` is the new count of
    /// failed attempts to carry with the job.
    Defer { after: Duration, attempts: u32 },
    /// The job waits at its provider (the handle is in its journal): process it again after
    /// `after`, holding the message or through a delay queue. Not a failed attempt.
    Pending { after: Duration, attempts: u32 },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReturnReason {
    /// Nothing will work until an operator acts (every provider refuses all requests, storage
    /// keeps failing, this worker's spend cap): the worker stops taking jobs.
    Stop { reason: StopReason, message: String },
    /// The worker is stopping or pausing and the job had not reached the provider.
    Halted,
}

/// How long a batch's cancellation state is trusted before it is looked up again.
const CANCEL_CHECK_EVERY: Duration = Duration::from_secs(2);

pub struct Pipeline {
    routes: Routes,
    images: Images,
    rules: JobRules,
    prefix: String,
    events: Events,
    /// One lock per job being processed: a second delivery of the same job (a duplicate publish,
    /// a redelivery after a reconnect) waits for the first and then finds its stored result, so
    /// one process never calls the provider twice for one job at once.
    active: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Cross-process leases (when the store honours conditional writes): who holds a job.
    leases: Option<Leases>,
    /// Spend caps, when set.
    budget: Option<Budget>,
    /// Batches seen cancelled (or not), and when that was looked up.
    cancelled: Mutex<HashMap<String, (bool, Instant)>>,
    /// How long a job queued at its provider is polled in-process, its message held
    /// (`worker.pending_hold_secs`); then it waits in a delay queue.
    pending_hold: Duration,
    /// The threads that decode, resize and encode images (variants, transparency checks).
    imaging: crate::imaging::ImageWork,
    /// Reads jobs' reference images.
    references: crate::references::References,
    /// `references.job_wait_secs`.
    reference_wait_secs: u64,
    /// Which jobs go to the batch lane, when there is one.
    lane: Option<lane::LaneRouting>,
}

impl Pipeline {
    pub fn new(settings: &Settings, routes: Routes, store: Arc<dyn ObjectStore>) -> Self {
        let mut rules = settings.job_rules();
        rules.providers = routes.iter().map(|r| r.name.clone()).collect();
        let imaging = crate::imaging::ImageWork::new(settings.worker.image_workers);
        let memory = routes.memory().cloned().unwrap_or_else(|| {
            crate::provider::buffers::BufferPool::new(settings.worker.answer_memory_bytes)
        });
        let references = crate::references::References::new(
            &settings.references,
            store.clone(),
            &settings.storage.prefix,
            memory,
            imaging.clone(),
        );
        Self {
            routes,
            images: Images {
                store,
                spool: None,
                retry: RetryPolicy::from_settings(&settings.retry),
            },
            rules,
            prefix: settings.storage.prefix.clone(),
            events: Events::new(&settings.events.source),
            active: Mutex::new(HashMap::new()),
            leases: None,
            budget: None,
            cancelled: Mutex::default(),
            pending_hold: Duration::from_secs(settings.worker.pending_hold_secs),
            imaging,
            references,
            reference_wait_secs: settings.references.job_wait_secs,
            lane: lane::LaneRouting::from_settings(settings),
        }
    }

    /// Keeps images that cannot be uploaded in `spool` instead of losing them.
    pub fn with_spool(mut self, spool: Spool) -> Self {
        self.images.spool = Some(spool);
        self
    }

    /// Turns on spend caps.
    pub fn with_budget(mut self, budget: Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Turns on cross-process job leases (only for stores that honour conditional writes).
    pub fn with_leases(mut self, owner: String, ttl: Duration, max_takeovers: u32) -> Self {
        self.leases = Some(Leases::new(
            self.images.store.clone(),
            owner,
            ttl,
            max_takeovers,
        ));
        self
    }

    /// The providers, with their throttles and pause states.
    pub fn routes(&self) -> &Routes {
        &self.routes
    }

    /// The spend caps, when set.
    pub fn budget(&self) -> Option<&Budget> {
        self.budget.as_ref()
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.images.store
    }

    /// Processes one message. `halt` is cancelled when the worker stops taking jobs (the pipeline
    /// cancels it itself when storage keeps failing or this worker's spend cap is reached): a
    /// job that has not reached its provider by then is returned untouched.
    pub async fn process(&self, delivery: Delivery<'_>, halt: &CancellationToken) -> Outcome {
        let started = Instant::now();
        let job = match Job::parse(delivery.body, delivery.message_id, &self.rules) {
            Ok(job) => job,
            Err(invalid) => {
                warn!(job_id = %invalid.job_id, error = %invalid.message, "invalid job");
                return self.events.invalid(&invalid, delivery.origin(), started);
            }
        };
        let span = info_span!("job", job_id = %job.id, batch = job.batch.as_deref().unwrap_or("_"));
        let Some(route) = self.routes.get(job.provider.as_deref()) else {
            let failure = Failure::invalid_job("no provider is configured");
            let invalid = crate::domain::job::InvalidJob {
                job_id: job.id.clone(),
                batch: job.batch.clone(),
                metadata: job.metadata.clone(),
                message: failure.message().to_string(),
            };
            return self.events.invalid(&invalid, delivery.origin(), started);
        };
        let dir = job.dir(&self.prefix);
        let lock = {
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            active.entry(dir.clone()).or_default().clone()
        };
        let outcome = {
            let _guard = lock.lock().await;
            let run = JobRun {
                p: self,
                request: ImageRequest::for_job(&job, route.provider.defaults(), job.n),
                job: &job,
                route,
                dir: &dir,
                delivery,
                halt,
                started,
            };
            // A panic (a bug, or an answer no check foresaw) ends this attempt, not the worker:
            // the job is deferred with the attempt counted, and its message is settled.
            let outcome = match AssertUnwindSafe(run.run().instrument(span.clone()))
                .catch_unwind()
                .await
            {
                Ok(outcome) => outcome,
                Err(panic) => {
                    let _entered = span.enter();
                    panicked(route, delivery.attempts, panic.as_ref())
                }
            };
            self.store_failure(&dir, &outcome).instrument(span).await;
            outcome
        };
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and ours: nobody else waits for this job.
        if Arc::strong_count(&lock) == 2 {
            active.remove(&dir);
        }
        outcome
    }

    /// Keeps a failed job's event beside where its images would be. A conflict's directory holds
    /// another job's results: nothing of this one goes there.
    async fn store_failure(&self, dir: &str, outcome: &Outcome) {
        if let Outcome::Finished { event, .. } = outcome
            && event.data.status == Status::Failed
            && event.data.error.as_ref().map(|e| e.kind) != Some(ErrorKind::Conflict)
        {
            self.images.store_failure(dir, event).await;
        }
    }

    /// Why a job must not be started any more: its deadline passed, or its batch was cancelled.
    async fn unwanted(&self, job: &Job) -> Option<Failure> {
        let permanent = |kind, message: String| Failure::Permanent {
            kind,
            message,
            detail: Box::default(),
        };
        if let Some(deadline) = job.deadline
            && time::OffsetDateTime::now_utc() > deadline
        {
            return Some(permanent(
                ErrorKind::Expired,
                format!("the job's deadline {deadline} passed before its images were made"),
            ));
        }
        let batch = job.batch.as_deref()?;
        let known = {
            let cache = self.cancelled.lock().unwrap_or_else(|e| e.into_inner());
            cache
                .get(batch)
                .filter(|(_, at)| at.elapsed() < CANCEL_CHECK_EVERY)
                .map(|(c, _)| *c)
        };
        let cancelled = match known {
            Some(c) => c,
            None => {
                let key = keys::cancelled(&self.prefix, batch);
                // A store that cannot answer does not cancel anything.
                let c = matches!(self.images.store.head(&key).await, Ok(Some(_)));
                self.cancelled
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(batch.to_string(), (c, Instant::now()));
                c
            }
        };
        cancelled.then(|| {
            permanent(
                ErrorKind::Cancelled,
                format!("batch {batch} was cancelled before the job's images were made"),
            )
        })
    }
}

/// A job whose processing panicked: a failed attempt (it may have come after the request was
/// sent), deferred like any retry so that its message is settled and the attempts counted.
fn panicked(route: &Route, attempts: u32, panic: &(dyn Any + Send)) -> Outcome {
    let what = panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("a panic without a message");
    tracing::error!(provider = %route.name, panic = what,
        "processing the job panicked: it is deferred as a failed attempt");
    super::metrics::job_panicked(&route.name);
    Outcome::Defer {
        after: route.retry.initial_delay.max(Duration::from_secs(1)),
        attempts: attempts + 1,
    }
}

#[cfg(test)]
mod tests;

//! Processing of one job, from message body to result event. Knows nothing of AMQP: the
//! consumer turns the [`Outcome`] into ack, dead-letter or return.
//!
//! validate -> result record already stored? (then its event again, no provider call) ->
//! images already stored are reused -> call the provider for the missing ones (bounded
//! concurrency, retries) -> upload each image -> store the result record -> event.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::config::Settings;
use crate::error::{ErrorKind, Failure, StopReason};
use crate::event::{CloudEvent, EventError, ResultData, Status, StoredImage};
use crate::job::{Job, JobRules};
use crate::provider::{Generation, ImageProvider, ImageRequest, Journal};
use crate::retry::RetryPolicy;
use crate::spool::Spool;
use crate::storage::{META_JOB_ID, META_SHA256, ObjectStore, PutObject};
use crate::throttle::{Feedback, Throttle};

/// Name of the result record, next to the job's images.
pub const RECORD_NAME: &str = "result.json";

/// A message as the pipeline sees it.
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub body: &'a [u8],
    /// The AMQP `message_id`, the job id when the body has none.
    pub message_id: Option<&'a str>,
    /// Provider attempts that failed on earlier deliveries (the `x-imagegen-attempts` header).
    pub attempts: u32,
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
    /// Retry later, after `after`: too long to hold the message. `attempts` is the new count of
    /// failed attempts to carry with the job.
    Defer { after: Duration, attempts: u32 },
}

#[derive(Debug, Clone, PartialEq)]
pub enum ReturnReason {
    /// The provider says nothing will work until an operator acts.
    Stop { reason: StopReason, message: String },
    /// The worker is stopping or pausing and the job had not reached the provider.
    Halted,
}

pub struct Pipeline {
    provider: Arc<dyn ImageProvider>,
    store: Arc<dyn ObjectStore>,
    rules: JobRules,
    retry: RetryPolicy,
    /// Gates provider calls: adaptive concurrency, rate limits, header pacing.
    throttle: Arc<Throttle>,
    prefix: String,
    source: String,
    prices: crate::cost::PriceTable,
    /// One lock per job being processed: a second delivery of the same job (a duplicate publish,
    /// a redelivery after a reconnect) waits for the first and then finds its stored result, so
    /// one process never calls the provider twice for one job at once.
    active: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
    spool: Option<Spool>,
    /// Cross-process leases (when the store honours conditional writes): who holds a job.
    leases: Option<Leases>,
    /// Spend caps, when set.
    budget: Option<crate::budget::Budget>,
    /// Batches seen cancelled (or not), and when that was looked up.
    cancelled: Mutex<HashMap<String, (bool, Instant)>>,
}

/// How long a batch's cancellation state is trusted before it is looked up again.
const CANCEL_CHECK_EVERY: Duration = Duration::from_secs(2);

/// A job's lease: `{job dir}/lease.json`, written with `If-None-Match: *`, renewed before each
/// provider call, deleted when the job is done. A worker that finds another's live lease defers
/// the job (through a delay queue) instead of buying it too.
struct Leases {
    owner: String,
    ttl: Duration,
    max_takeovers: u32,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseBody {
    owner: String,
    expires_unix_ms: u64,
    /// Times a worker found this lease expired under another owner (a worker died on the job).
    #[serde(default)]
    takeovers: u32,
}

enum LeaseState {
    Acquired {
        key: String,
        takeovers: u32,
    },
    HeldElsewhere(Duration),
    /// Workers died on this job this many times: a poison job.
    Abandoned(u32),
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Pipeline {
    pub fn new(
        settings: &Settings,
        provider: Arc<dyn ImageProvider>,
        store: Arc<dyn ObjectStore>,
    ) -> Self {
        Self {
            provider,
            store,
            rules: JobRules::from_settings(settings),
            retry: RetryPolicy::from_settings(&settings.retry),
            throttle: Arc::new(Throttle::from_settings(settings)),
            prefix: settings.storage.prefix.clone(),
            source: settings.events.source.clone(),
            prices: settings.pricing.clone(),
            active: Mutex::new(HashMap::new()),
            spool: None,
            leases: None,
            budget: None,
            cancelled: Mutex::default(),
        }
    }

    /// Keeps images that cannot be uploaded in `spool` instead of losing them.
    pub fn with_spool(mut self, spool: Spool) -> Self {
        self.spool = Some(spool);
        self
    }

    /// Turns on spend caps.
    pub fn with_budget(mut self, budget: crate::budget::Budget) -> Self {
        self.budget = Some(budget);
        self
    }

    /// Turns on cross-process job leases (only for stores that honour conditional writes).
    pub fn with_leases(mut self, owner: String, ttl: Duration, max_takeovers: u32) -> Self {
        self.leases = Some(Leases {
            owner,
            ttl,
            max_takeovers,
        });
        self
    }

    /// The provider throttle (its state is logged and exported).
    pub fn throttle(&self) -> &Arc<Throttle> {
        &self.throttle
    }

    pub fn provider_name(&self) -> &'static str {
        self.provider.name()
    }

    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The key directory of a job's objects, prefix included.
    pub fn job_dir(&self, job: &Job) -> String {
        format!("{}{}", self.prefix, job.key_dir())
    }

    /// Processes one message. `halt` is cancelled when the worker stops taking jobs (the pipeline
    /// cancels it itself when the provider refuses all requests): a job that has not reached the
    /// provider by then is returned untouched.
    pub async fn process(&self, delivery: Delivery<'_>, halt: &CancellationToken) -> Outcome {
        let started = Instant::now();
        let job = match Job::parse(delivery.body, delivery.message_id, &self.rules) {
            Ok(job) => job,
            Err(invalid) => {
                warn!(job_id = %invalid.job_id, error = %invalid.message, "invalid job");
                let data = ResultData {
                    error: Some(EventError::from_failure(
                        ErrorKind::InvalidJob,
                        &invalid.failure(),
                    )),
                    metadata: invalid.metadata.clone(),
                    ..self.data(
                        &invalid.job_id,
                        invalid.batch.clone(),
                        Status::Failed,
                        started,
                    )
                };
                return self.finished(data, Settle::DeadLetter);
            }
        };
        let span = info_span!("job", job_id = %job.id, batch = job.batch.as_deref().unwrap_or("_"));
        let dir = self.job_dir(&job);
        let lock = {
            let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
            active.entry(dir.clone()).or_default().clone()
        };
        let outcome = {
            let _guard = lock.lock().await;
            let outcome = self
                .process_job(&job, &dir, delivery.attempts, started, halt)
                .instrument(span.clone())
                .await;
            if let Outcome::Finished { event, .. } = &outcome
                && event.data.status == Status::Failed
            {
                self.store_failure(&dir, event).instrument(span).await;
            }
            outcome
        };
        let mut active = self.active.lock().unwrap_or_else(|e| e.into_inner());
        // The map's reference and ours: nobody else waits for this job.
        if Arc::strong_count(&lock) == 2 {
            active.remove(&dir);
        }
        outcome
    }

    async fn process_job(
        &self,
        job: &Job,
        dir: &str,
        prior: u32,
        started: Instant,
        halt: &CancellationToken,
    ) -> Outcome {
        let record_key = format!("{dir}/{RECORD_NAME}");
        // One listing of the job's directory tells both whether its result is stored and which
        // of its images are (one request per job instead of two).
        let listed = match self.list_job_dir(dir).await {
            Ok(listed) => listed,
            Err(failure) => return self.storage_down(failure, halt),
        };
        if listed.contains(&record_key) {
            match self.stored_event(&record_key).await {
                Ok(Some(event)) => {
                    info!("result already stored: publishing it again without a provider call");
                    return Outcome::Finished {
                        event: Box::new(event),
                        settle: Settle::Ack,
                    };
                }
                Ok(None) => {}
                Err(failure) => return self.storage_down(failure, halt),
            }
        }
        let mut work = Work::default();
        match self.reuse_stored_images(job, dir, listed).await {
            Ok(images) => work.images = images,
            Err(failure) => return self.storage_down(failure, halt),
        }
        if let Err(failure) = self.unspool(job, dir, &mut work.images).await {
            return self.storage_down(failure, halt);
        }
        if work.images.len() < job.n as usize && self.leases.is_some() {
            match self.acquire_lease(dir).await {
                Ok(LeaseState::Acquired { key, takeovers }) => {
                    // Another worker may have finished the job (and released its lease) between
                    // our first look for the result and the lease: look again, now that no one
                    // else can start buying.
                    if let Ok(Some(event)) =
                        self.stored_event(&format!("{dir}/{RECORD_NAME}")).await
                    {
                        let _ = self.store.delete(&key).await;
                        info!(
                            "result stored by another worker meanwhile: publishing it again without a provider call"
                        );
                        return Outcome::Finished {
                            event: Box::new(event),
                            settle: Settle::Ack,
                        };
                    }
                    work.lease = Some((key, takeovers));
                }
                Ok(LeaseState::HeldElsewhere(left)) => {
                    info!(
                        left_ms = left.as_millis() as u64,
                        "another worker holds this job: deferring it"
                    );
                    return Outcome::Defer {
                        after: left.max(Duration::from_secs(1)),
                        attempts: prior,
                    };
                }
                Ok(LeaseState::Abandoned(deaths)) => {
                    let _ = self.store.delete(&format!("{dir}/lease.json")).await;
                    let failure = Failure::Permanent {
                        kind: ErrorKind::RetriesExhausted,
                        message: format!(
                            "workers died {deaths} times while processing this job: it is treated as poison"
                        ),
                        detail: Default::default(),
                    };
                    return self.failed(job, failure, work, prior, started);
                }
                Err(failure) => return self.storage_down(failure, halt),
            }
        }
        let lease = work.lease.clone();
        // The lease is renewed for as long as this worker has the job (waiting for a provider
        // slot, retrying, uploading), so it outlives a live worker but not a dead one.
        let outcome = tokio::select! {
            outcome = self.run_job(job, dir, prior, started, halt, work) => outcome,
            _ = self.keep_lease(lease.clone()) => unreachable!("keep_lease never returns"),
        };
        if let Some((key, _)) = lease
            && let Err(e) = self.store.delete(&key).await
        {
            warn!(error = %e, "could not delete the job's lease: it expires by itself");
        }
        outcome
    }

    /// Keeps a failed job's event next to where its images would be, so that a batch's outcome
    /// can be read from the store (a later success's record wins over it).
    async fn store_failure(&self, dir: &str, event: &CloudEvent) {
        let Ok(body) = serde_json::to_vec(event) else {
            return;
        };
        let key = format!("{dir}/{}", crate::batch::FAILED_RECORD_NAME);
        let put = self
            .store
            .put(PutObject {
                key: &key,
                data: Bytes::from(body),
                content_type: "application/json",
                metadata: &[],
                sha256: None,
            })
            .await;
        if let Err(e) = put {
            warn!(error = %e, "could not store the failed job's record");
        }
    }

    /// Writes this worker's lease on a job unless another worker holds a live one.
    async fn acquire_lease(&self, dir: &str) -> Result<LeaseState, Failure> {
        let Some(leases) = &self.leases else {
            return Ok(LeaseState::HeldElsewhere(Duration::ZERO));
        };
        let key = format!("{dir}/lease.json");
        if self.write_lease(&key, true, 0).await? {
            return Ok(LeaseState::Acquired { key, takeovers: 0 });
        }
        let current = self
            .store
            .get(&key)
            .await
            .map_err(Failure::from)?
            .and_then(|b| serde_json::from_slice::<LeaseBody>(&b).ok());
        let now = unix_ms();
        let takeovers = match current {
            Some(l) if l.owner != leases.owner && l.expires_unix_ms > now => {
                return Ok(LeaseState::HeldElsewhere(Duration::from_millis(
                    l.expires_unix_ms - now,
                )));
            }
            // Expired under another owner: that worker died (or stalled) on this job.
            Some(l) if l.owner != leases.owner => l.takeovers + 1,
            Some(l) => l.takeovers,
            None => 0,
        };
        if takeovers > leases.max_takeovers {
            return Ok(LeaseState::Abandoned(takeovers));
        }
        if takeovers > 0 {
            warn!(
                takeovers,
                "taking over the lease of a worker that died on this job"
            );
        }
        self.write_lease(&key, false, takeovers).await?;
        Ok(LeaseState::Acquired { key, takeovers })
    }

    /// Writes (`only_if_absent`) or renews the lease; false when another lease exists.
    async fn write_lease(
        &self,
        key: &str,
        only_if_absent: bool,
        takeovers: u32,
    ) -> Result<bool, Failure> {
        let Some(leases) = &self.leases else {
            return Ok(true);
        };
        let body = LeaseBody {
            owner: leases.owner.clone(),
            expires_unix_ms: unix_ms() + leases.ttl.as_millis() as u64,
            takeovers,
        };
        let object = PutObject {
            key,
            data: Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
            content_type: "application/json",
            metadata: &[],
            sha256: None,
        };
        let written = if only_if_absent {
            self.store.put_if_absent(object).await
        } else {
            self.store.put(object).await.map(|()| true)
        };
        written.map_err(Failure::from)
    }

    /// Renews the lease every third of its lifetime, for as long as it is polled.
    async fn keep_lease(&self, lease: Option<(String, u32)>) {
        let (Some(leases), Some((key, takeovers))) = (&self.leases, lease) else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(leases.ttl / 3).await;
            if let Err(e) = self.write_lease(&key, false, takeovers).await {
                warn!(error = %e, "could not renew the job's lease");
            }
        }
    }

    async fn run_job(
        &self,
        job: &Job,
        dir: &str,
        prior: u32,
        started: Instant,
        halt: &CancellationToken,
        work: Work,
    ) -> Outcome {
        let record_key = format!("{dir}/{RECORD_NAME}");
        if prior >= self.retry.max_attempts {
            let failure = Failure::transient(format!("{prior} attempts already failed"));
            return self.failed(job, failure, work, prior, started);
        }
        if !work.images.is_empty() {
            info!(
                reused = work.images.len(),
                of = job.n,
                "reusing images already stored"
            );
        }
        let work = Mutex::new(work);
        let journal = StoreJournal {
            store: &*self.store,
            dir,
        };
        let outcome = self
            .retry
            .run_from(
                prior,
                || self.generate_missing(job, dir, &work, &journal, halt),
                |failure, wait| {
                    let billed = matches!(failure, Failure::Retryable { possibly_billed: true, .. });
                    warn!(error = %failure, possibly_billed = billed, wait_ms = wait.as_millis() as u64,
                        request_id = failure.detail().request_id.as_deref().unwrap_or(""), "retrying");
                },
            )
            .await;
        let mut work = work.into_inner().unwrap_or_else(|e| e.into_inner());
        work.images.sort_by_key(|i| i.index);
        work.possibly_billed = outcome.possibly_billed;
        crate::metrics::possibly_billed(outcome.possibly_billed as u64);
        if outcome.possibly_billed > 0 {
            warn!(
                possibly_billed = outcome.possibly_billed,
                "requests that may have been billed without an image"
            );
        }
        match outcome.result {
            Ok(()) => {}
            Err(Failure::Stop {
                reason, message, ..
            }) => {
                return Outcome::Return {
                    reason: ReturnReason::Stop { reason, message },
                };
            }
            Err(_) if work.halted => {
                debug!(
                    "returned untouched: the worker stopped taking jobs before the provider call"
                );
                return Outcome::Return {
                    reason: ReturnReason::Halted,
                };
            }
            Err(failure) if outcome.deferred.is_some() && !work.halted => {
                let after = outcome.deferred.unwrap_or_default();
                let attempts = prior + work.calls;
                info!(error = %failure, after_secs = after.as_secs(), attempts,
                    "long wait: the job goes to a delay queue instead of holding its message");
                return Outcome::Defer { after, attempts };
            }
            Err(failure) => return self.failed(job, failure, work, prior, started),
        }
        let mut data = ResultData {
            images: work.images,
            attempts: prior + work.calls,
            possibly_billed: work.possibly_billed,
            model: Some(job.model.clone()),
            revised_prompt: work.revised_prompt,
            usage: work.usage,
            provider_request_id: work.request_id,
            metadata: job.metadata.clone(),
            ..self.data(&job.id, job.batch.clone(), Status::Succeeded, started)
        };
        if let Some(model) = work.model {
            data.model = Some(model);
        }
        self.price(job, work.bought, &mut data);
        let event = CloudEvent::new(&self.source, data);
        let record = match serde_json::to_vec(&event) {
            Ok(r) => Bytes::from(r),
            Err(e) => return self.failed_event(event, Failure::transient(e.to_string())),
        };
        let put = self
            .retry
            .run(
                || async {
                    self.store
                        .put(PutObject {
                            key: &record_key,
                            data: record.clone(),
                            content_type: "application/json",
                            metadata: &[(META_JOB_ID, job.id.clone())],
                            sha256: None,
                        })
                        .await
                        .map_err(Failure::from)
                },
                |failure, _| warn!(error = %failure, "retrying the result record upload"),
            )
            .await;
        if let Err(failure) = put.result {
            return self.storage_down(failure, halt);
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

    /// One attempt: asks the provider for the images still missing and uploads what it returns.
    /// Returns a retryable failure while images are missing.
    fn generate_missing<'a>(
        &'a self,
        job: &'a Job,
        dir: &'a str,
        work: &'a Mutex<Work>,
        journal: &'a StoreJournal<'a>,
        halt: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let missing: Vec<u32> = {
                let w = lock(work);
                (0..job.n as u32)
                    .filter(|i| !w.images.iter().any(|s| s.index == *i))
                    .collect()
            };
            if missing.is_empty() {
                return Ok(());
            }
            if let Some(failure) = self.unwanted(job).await {
                return Err(failure);
            }
            let permit = tokio::select! {
                permit = self.throttle.acquire(missing.len() as u32) => permit,
                _ = halt.cancelled() => {
                    // Not a failure: the worker stops taking jobs. Ends the retry loop.
                    lock(work).halted = true;
                    return Err(Failure::invalid_job("halted"));
                }
            };
            if halt.is_cancelled() {
                lock(work).halted = true;
                return Err(Failure::invalid_job("halted"));
            }
            // After the slot: spend committed by the calls this one waited for is counted.
            if let Some(budget) = &self.budget
                && let Err(failure) = budget.check(job.batch.as_deref()).await
            {
                if matches!(failure, Failure::Stop { .. }) {
                    halt.cancel();
                }
                return Err(failure);
            }
            lock(work).calls += 1;
            let call_started = Instant::now();
            let request = ImageRequest {
                job,
                indices: &missing,
            };
            let generation = self.provider.generate(request, journal).await;
            crate::metrics::provider_call(
                match &generation {
                    Ok(_) => Some(200),
                    Err(f) => f.detail().status,
                },
                call_started.elapsed(),
            );
            if let Err(Failure::Stop { .. }) = &generation {
                // Before the slot is free for the next job: nothing will work until an operator acts.
                halt.cancel();
            }
            // Counted before the slot is free, so the next call's budget check sees it.
            if let Ok(g) = &generation
                && !g.images.is_empty()
            {
                let cost = self.call_cost(job, g);
                crate::metrics::cost(cost);
                if let Some(budget) = &self.budget {
                    budget.record(job.batch.as_deref(), &job.id, cost).await;
                }
            }
            match &generation {
                Ok(g) => permit.finish(Feedback::Done, g.rate_limits, usage_tokens(&g.usage)),
                Err(f) => permit.finish(f.feedback(), f.detail().rate_limits, None),
            }
            let generation: Generation = generation?;
            info!(
                provider = self.provider.name(),
                images = generation.images.len(),
                latency_ms = call_started.elapsed().as_millis() as u64,
                request_id = generation.request_id.as_deref().unwrap_or(""),
                "provider returned"
            );
            {
                let mut w = lock(work);
                w.usage = merge_usage(w.usage.take(), generation.usage.clone());
                w.bought += generation.images.len() as u32;
                crate::metrics::images_generated(generation.images.len() as u64);
                if generation.request_id.is_some() {
                    w.request_id.clone_from(&generation.request_id);
                }
                if w.revised_prompt.is_none() {
                    w.revised_prompt = generation
                        .images
                        .iter()
                        .find_map(|i| i.revised_prompt.clone());
                }
                if w.model.is_none() {
                    w.model.clone_from(&generation.model);
                }
            }
            let returned = generation.images.len();
            let mut answers = missing.iter().copied().zip(generation.images);
            while let Some((index, image)) = answers.next() {
                let rest = &mut answers;
                let key = format!("{dir}/{index}.{}", image.extension);
                let sha256 = hex::encode(Sha256::digest(&image.data));
                let bytes = image.data.len() as u64;
                let metadata = [(META_JOB_ID, job.id.clone()), (META_SHA256, sha256.clone())];
                let upload_started = Instant::now();
                let upload = self
                    .retry
                    .run(
                        || async {
                            self.store
                                .put(PutObject {
                                    key: &key,
                                    data: image.data.clone(),
                                    content_type: image.content_type,
                                    metadata: &metadata,
                                    sha256: Some(&sha256),
                                })
                                .await
                                .map_err(Failure::from)
                        },
                        |e, _| warn!(error = %e, key = %key, "retrying upload"),
                    )
                    .await;
                if upload.result.is_ok() {
                    crate::metrics::uploaded(bytes, upload_started.elapsed());
                }
                if let Err(e) = upload.result {
                    // A generated image could not be stored: keep it (and the rest of this
                    // answer) in the spool, and stop buying images that cannot be stored.
                    halt.cancel();
                    self.keep_in_spool(&key, image.data).await;
                    for (index, image) in rest {
                        self.keep_in_spool(
                            &format!("{dir}/{index}.{}", image.extension),
                            image.data,
                        )
                        .await;
                    }
                    return Err(e.storage_down());
                }
                lock(work).images.push(StoredImage {
                    index,
                    bucket: self.store.location().to_string(),
                    uri: self.store.uri(&key),
                    key,
                    content_type: image.content_type.to_string(),
                    bytes,
                    sha256,
                });
            }
            if returned < missing.len() {
                return Err(Failure::transient(format!(
                    "the provider returned {returned} of {} images",
                    missing.len()
                )));
            }
            Ok(())
        })
    }

    /// Stops taking jobs after a storage failure (retries exhausted): the job goes back untouched.
    fn storage_down(&self, failure: Failure, halt: &CancellationToken) -> Outcome {
        match failure.storage_down() {
            Failure::Stop {
                reason, message, ..
            } => {
                warn!(error = %message, "storage keeps failing: the job goes back to the queue");
                halt.cancel();
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

    async fn keep_in_spool(&self, key: &str, data: Bytes) {
        let kept = match &self.spool {
            Some(spool) => spool.keep(key, data).await,
            None => false,
        };
        if kept {
            info!(key, "image spooled until storage is back");
        } else {
            crate::metrics::images_lost(1);
            warn!(
                key,
                "image could not be spooled (no spool, or full): it will be generated again"
            );
        }
    }

    /// Uploads images of this job that an earlier delivery spooled on this host.
    async fn unspool(
        &self,
        job: &Job,
        dir: &str,
        images: &mut Vec<StoredImage>,
    ) -> Result<(), Failure> {
        let Some(spool) = &self.spool else {
            return Ok(());
        };
        for spooled in spool.take_list(dir).await.map_err(Failure::from)? {
            let name = spooled.key.rsplit('/').next().unwrap_or("");
            let Some((index, ext)) = name.split_once('.') else {
                continue;
            };
            let Ok(index) = index.parse::<u32>() else {
                continue;
            };
            let size = spooled.data.len() as u64;
            if index >= job.n as u32 || images.iter().any(|i| i.index == index) {
                spool.remove(&spooled.key, size).await;
                continue;
            }
            let (content_type, _) = crate::provider::sniff(&spooled.data, ext);
            let sha256 = hex::encode(Sha256::digest(&spooled.data));
            let metadata = [(META_JOB_ID, job.id.clone()), (META_SHA256, sha256.clone())];
            self.retry
                .run(
                    || async {
                        self.store
                            .put(PutObject {
                                key: &spooled.key,
                                data: spooled.data.clone(),
                                content_type,
                                metadata: &metadata,
                                sha256: Some(&sha256),
                            })
                            .await
                            .map_err(Failure::from)
                    },
                    |e, _| warn!(error = %e, "retrying the upload of a spooled image"),
                )
                .await
                .result?;
            info!(key = %spooled.key, "spooled image uploaded: not bought again");
            spool.remove(&spooled.key, size).await;
            images.push(StoredImage {
                index,
                bucket: self.store.location().to_string(),
                uri: self.store.uri(&spooled.key),
                key: spooled.key,
                content_type: content_type.to_string(),
                bytes: size,
                sha256,
            });
        }
        Ok(())
    }

    /// The keys in a job's directory.
    async fn list_job_dir(&self, dir: &str) -> Result<Vec<String>, Failure> {
        self.retry
            .run(
                || async {
                    self.store
                        .list(&format!("{dir}/"), None)
                        .await
                        .map_err(Failure::from)
                },
                |e, _| warn!(error = %e, "retrying the listing of the job's objects"),
            )
            .await
            .result
    }

    async fn stored_event(&self, record_key: &str) -> Result<Option<CloudEvent>, Failure> {
        let get = self
            .retry
            .run(
                || async { self.store.get(record_key).await.map_err(Failure::from) },
                |e, _| warn!(error = %e, "retrying the result record lookup"),
            )
            .await;
        let Some(bytes) = get.result? else {
            return Ok(None);
        };
        match serde_json::from_slice::<CloudEvent>(&bytes) {
            Ok(event) => Ok(Some(event)),
            Err(e) => {
                warn!(error = %e, key = record_key, "stored result record is unreadable; processing the job again");
                Ok(None)
            }
        }
    }

    /// Images of this job that an earlier delivery already stored.
    async fn reuse_stored_images(
        &self,
        job: &Job,
        dir: &str,
        listed: Vec<String>,
    ) -> Result<Vec<StoredImage>, Failure> {
        let mut images: Vec<StoredImage> = Vec::new();
        for key in listed {
            let Some(name) = key.strip_prefix(dir).and_then(|k| k.strip_prefix('/')) else {
                continue;
            };
            let Some((index, ext)) = name.split_once('.') else {
                continue;
            };
            let Ok(index) = index.parse::<u32>() else {
                continue;
            };
            if index >= job.n as u32 || images.iter().any(|i| i.index == index) {
                continue;
            }
            let Some(info) = self.store.head(&key).await.map_err(Failure::from)? else {
                continue;
            };
            let (sha256, content_type) = match info.sha256 {
                Some(sha) => (sha, info.content_type),
                None => {
                    let Some(data) = self.store.get(&key).await.map_err(Failure::from)? else {
                        continue;
                    };
                    (hex::encode(Sha256::digest(&data)), None)
                }
            };
            let content_type =
                content_type.unwrap_or_else(|| crate::provider::sniff(&[], ext).0.to_string());
            images.push(StoredImage {
                index,
                bucket: self.store.location().to_string(),
                uri: self.store.uri(&key),
                key,
                content_type,
                bytes: info.size,
                sha256,
            });
        }
        Ok(images)
    }

    fn data(
        &self,
        job_id: &str,
        batch: Option<String>,
        status: Status,
        started: Instant,
    ) -> ResultData {
        ResultData {
            schema_version: crate::event::EVENT_SCHEMA_VERSION,
            job_id: job_id.to_string(),
            batch,
            status,
            images: Vec::new(),
            error: None,
            attempts: 0,
            possibly_billed: 0,
            model: None,
            revised_prompt: None,
            usage: None,
            cost_usd: None,
            cost_estimated: false,
            duration_ms: started.elapsed().as_millis() as u64,
            provider_request_id: None,
            refusal: None,
            metadata: Value::Null,
        }
    }

    /// Fills in what this processing of the job cost.
    fn price(&self, job: &Job, bought: u32, data: &mut ResultData) {
        if bought == 0 {
            // Nothing was bought here (stored images reused, or no provider call).
            data.cost_usd = Some(0.0);
            return;
        }
        let purchase = crate::cost::Purchase {
            model: data.model.as_deref().unwrap_or(&job.model),
            size: &job.size,
            quality: &job.quality,
            prompt: &job.prompt,
            images: bought,
            usage: data.usage.as_ref(),
        };
        if let Some(cost) = self.prices.cost(purchase) {
            data.cost_usd = Some(cost.usd);
            data.cost_estimated = cost.estimated;
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
                format!("the job's deadline {deadline} passed before it started"),
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
                let key = crate::batch::cancel_key(&self.prefix, batch);
                // A store that cannot answer does not cancel anything.
                let c = matches!(self.store.head(&key).await, Ok(Some(_)));
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
                format!("batch {batch} was cancelled before the job started"),
            )
        })
    }

    /// What one provider call cost (0 when the price table does not know the model).
    fn call_cost(&self, job: &Job, generation: &Generation) -> f64 {
        let purchase = crate::cost::Purchase {
            model: generation.model.as_deref().unwrap_or(&job.model),
            size: &job.size,
            quality: &job.quality,
            prompt: &job.prompt,
            images: generation.images.len() as u32,
            usage: generation.usage.as_ref(),
        };
        self.prices.cost(purchase).map_or(0.0, |c| c.usd)
    }

    fn failed(
        &self,
        job: &Job,
        failure: Failure,
        work: Work,
        prior: u32,
        started: Instant,
    ) -> Outcome {
        let mut data = ResultData {
            images: work.images,
            attempts: prior + work.calls,
            possibly_billed: work.possibly_billed,
            model: Some(job.model.clone()),
            usage: work.usage,
            metadata: job.metadata.clone(),
            ..self.data(&job.id, job.batch.clone(), Status::Failed, started)
        };
        self.price(job, work.bought, &mut data);
        self.fail(data, failure)
    }

    /// Turns a success that could not be recorded into a failure, keeping what it had.
    fn failed_event(&self, event: CloudEvent, failure: Failure) -> Outcome {
        let mut data = event.data;
        data.status = Status::Failed;
        self.fail(data, failure)
    }

    fn fail(&self, mut data: ResultData, failure: Failure) -> Outcome {
        let kind = match &failure {
            Failure::Permanent { kind, .. } => *kind,
            _ => ErrorKind::RetriesExhausted,
        };
        warn!(error = %failure, kind = %kind, attempts = data.attempts, "job failed");
        let detail = failure.detail().clone();
        data.error = Some(EventError::from_failure(kind, &failure));
        data.provider_request_id = detail.request_id.or(data.provider_request_id);
        data.refusal = detail.refusal;
        // Cancelled and expired jobs ended as asked: nothing to replay.
        let settle = match kind {
            ErrorKind::Cancelled | ErrorKind::Expired => Settle::Ack,
            _ => Settle::DeadLetter,
        };
        self.finished(data, settle)
    }

    fn finished(&self, data: ResultData, settle: Settle) -> Outcome {
        Outcome::Finished {
            event: Box::new(CloudEvent::new(&self.source, data)),
            settle,
        }
    }
}

/// Progress of one job across attempts.
#[derive(Default)]
struct Work {
    images: Vec<StoredImage>,
    calls: u32,
    /// Images the provider returned to this worker for this job.
    bought: u32,
    possibly_billed: u32,
    usage: Option<Value>,
    request_id: Option<String>,
    revised_prompt: Option<String>,
    model: Option<String>,
    /// The worker stopped taking jobs before this job's next provider call.
    halted: bool,
    /// This worker's lease on the job (key, takeovers), when leases are on.
    lease: Option<(String, u32)>,
}

fn lock(work: &Mutex<Work>) -> std::sync::MutexGuard<'_, Work> {
    work.lock().unwrap_or_else(|e| e.into_inner())
}

/// Sums the numbers of two usage objects, field by field (several calls made one job's images).
/// The provider tokens a call used (`usage.total_tokens`, else input + output), when reported.
fn usage_tokens(usage: &Option<Value>) -> Option<f64> {
    let usage = usage.as_ref()?;
    let field = |name: &str| usage.get(name).and_then(Value::as_f64);
    field("total_tokens").or_else(|| Some(field("input_tokens")? + field("output_tokens")?))
}

fn merge_usage(a: Option<Value>, b: Option<Value>) -> Option<Value> {
    match (a, b) {
        (None, b) => b,
        (a, None) => a,
        (Some(Value::Object(mut a)), Some(Value::Object(b))) => {
            for (k, v) in b {
                let merged = merge_usage(a.remove(&k), Some(v));
                if let Some(m) = merged {
                    a.insert(k, m);
                }
            }
            Some(Value::Object(a))
        }
        (Some(Value::Number(x)), Some(Value::Number(y))) => match (x.as_u64(), y.as_u64()) {
            (Some(x), Some(y)) => Some(Value::from(x + y)),
            _ => Some(Value::from(
                x.as_f64().unwrap_or(0.0) + y.as_f64().unwrap_or(0.0),
            )),
        },
        (_, b) => b,
    }
}

/// The job's journal: small objects under `{job dir}/journal/`.
struct StoreJournal<'a> {
    store: &'a dyn ObjectStore,
    dir: &'a str,
}

impl Journal for StoreJournal<'_> {
    fn get<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, Failure>> {
        Box::pin(async move {
            let key = format!("{}/journal/{name}", self.dir);
            self.store.get(&key).await.map_err(Failure::from)
        })
    }

    fn put<'a>(&'a self, name: &'a str, value: Bytes) -> BoxFuture<'a, Result<(), Failure>> {
        Box::pin(async move {
            let key = format!("{}/journal/{name}", self.dir);
            self.store
                .put(PutObject {
                    key: &key,
                    data: value,
                    content_type: "application/json",
                    metadata: &[],
                    sha256: None,
                })
                .await
                .map_err(Failure::from)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn usage_of_several_calls_is_summed() {
        let a = json!({"input_tokens": 10, "output_tokens": 1056, "input_tokens_details": {"text_tokens": 10}});
        let b = json!({"input_tokens": 10, "output_tokens": 2112, "input_tokens_details": {"text_tokens": 10}, "total_tokens": 5});
        let m = merge_usage(Some(a), Some(b)).unwrap();
        assert_eq!(m["input_tokens"], 20);
        assert_eq!(m["output_tokens"], 3168);
        assert_eq!(m["input_tokens_details"]["text_tokens"], 20);
        assert_eq!(m["total_tokens"], 5);
        assert_eq!(merge_usage(None, None), None);
    }
}

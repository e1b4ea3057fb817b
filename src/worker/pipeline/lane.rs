//! The batch lane as one job's trip sees it:
//!
//! - whether a job goes to the lane ([`LaneRouting`]): then its trip ends with its record
//!   written to the store ([`Outcome::ToLane`]) instead of a provider call, and its message is
//!   settled; the lane ([`crate::worker::lane`]) gives it its event later;
//! - how a line of a provider batch's output becomes the job's outcome
//!   ([`Pipeline::finish_line`]): through the same steps as a live answer (images stored,
//!   variants made, record, event), priced at the lane's price.

use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::Instrument;
use tracing::{info, info_span};

pub use super::events::InBatch;
use super::events::Progress;
use super::run::JobRun;
use super::{Delivery, Outcome, Pipeline};
use crate::config::Settings;
use crate::domain::error::Failure;
use crate::domain::job::{Job, Lane};
use crate::domain::keys;
use crate::provider::ImageRequest;

/// Which jobs go to the batch lane (`[lane]`).
#[derive(Debug, Clone)]
pub struct LaneRouting {
    /// The provider whose batch API the lane uses.
    pub provider: String,
    /// Jobs whose deadline is further than this go to the lane by themselves.
    route_after: Option<Duration>,
    /// What a lane job's deadline must leave: the completion window and a margin.
    least_time: Duration,
}

impl LaneRouting {
    pub fn from_settings(settings: &Settings) -> Option<Self> {
        let lane = &settings.lane;
        lane.enabled().then(|| Self {
            provider: lane.provider.clone(),
            route_after: (lane.route_deadline_after_secs > 0)
                .then(|| Duration::from_secs(lane.route_deadline_after_secs)),
            least_time: Duration::from_secs(
                crate::config::lane::WINDOW_SECS + lane.deadline_margin_secs,
            ),
        })
    }

    /// Whether `job`, at `provider`, asks for the lane (or is sent there by its deadline), and
    /// has the time for it.
    fn wants(&self, job: &Job, provider: &str) -> bool {
        if provider != self.provider {
            return false;
        }
        let now = time::OffsetDateTime::now_utc();
        let left = job.deadline.map(|d| d - now);
        let asked = match job.lane {
            Some(Lane::Batch) => true,
            Some(Lane::Live) => false,
            None => matches!((self.route_after, left), (Some(after), Some(left)) if left > after),
        };
        if asked && left.is_some_and(|left| left < self.least_time) {
            info!(
                "the job asks for the batch lane but its deadline leaves less than the batch \
                 window: it runs live"
            );
            return false;
        }
        asked
    }
}

/// A job on its way to the lane: where its record goes.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneEntry {
    /// The lane's provider.
    pub provider: String,
    pub job_id: String,
    pub batch: Option<String>,
    /// The job's directory (its record is `lane.json` there).
    pub dir: String,
}

/// What a line of a provider batch said of a job.
pub enum LineResult<'a> {
    /// The request was answered: the live endpoint's status and body.
    Answered {
        status: u16,
        body: &'a [u8],
        request_id: Option<String>,
    },
    /// It got no answer, for this reason.
    Failed(Failure),
}

impl JobRun<'_> {
    /// When the job goes to the lane: its outcome (its record to write, or already written, or
    /// the job is not wanted any more). `None`: it runs live.
    pub(super) async fn to_lane(&self, listing: &super::images::Listing) -> Option<Outcome> {
        let routing = self.p.lane.as_ref()?;
        if self.delivery.live_only || !routing.wants(self.job, &self.route.name) {
            return None;
        }
        let stand_ins = crate::provider::BatchFiles::stand_ins(&self.request);
        if self
            .route
            .provider
            .batch_line(&self.request, &stand_ins)
            .is_none()
        {
            info!("the lane's provider has no batch request for this job: it runs live");
            return None;
        }
        let entry = Box::new(LaneEntry {
            provider: routing.provider.clone(),
            job_id: self.job.id.clone(),
            batch: self.job.batch.clone(),
            dir: self.dir.to_string(),
        });
        if listing.has(&keys::lane_record(self.dir)) {
            return Some(Outcome::ToLane {
                entry,
                recorded: true,
            });
        }
        if let Some(failure) = self.p.unwanted(self.job).await {
            return Some(self.failed(Progress::new(self.delivery.attempts), failure));
        }
        Some(Outcome::ToLane {
            entry,
            recorded: false,
        })
    }

    /// The job's outcome from its line: its event, or `Defer` when the line did not give it
    /// every image or failed in a way a retry can mend (the lane sends the job back to be
    /// called live, where the images already stored are kept).
    async fn end_by_line(&self, line: LineResult<'_>, in_batch: InBatch) -> Outcome {
        let mut progress = Progress::new(self.delivery.attempts);
        progress.lane = Some(in_batch);
        let listing = match self.p.images.list(self.dir).await {
            Ok(listing) => listing,
            Err(failure) => return self.storage_down(failure),
        };
        let record_key = keys::record(self.dir);
        if listing.has(&record_key) {
            match self.p.images.stored_event(&record_key).await {
                Ok(Some(event)) if self.same_job(&event) => {
                    return self.stored(event, "result already stored");
                }
                Ok(_) => {}
                Err(failure) => return self.storage_down(failure),
            }
        }
        match self.p.images.reuse(self.job, self.dir, &listing).await {
            Ok(images) => progress.images = images,
            Err(failure) => return self.failed(progress, failure),
        }
        progress.calls = 1;
        let answered = match line {
            LineResult::Answered {
                status,
                body,
                request_id,
            } => {
                self.route
                    .provider
                    .read_batch_line(status, body, request_id, &self.request)
                    .await
            }
            LineResult::Failed(failure) => Err(failure),
        };
        let generation = match answered {
            Ok(generation) => generation,
            Err(failure) if failure.is_retryable() => {
                info!(error = %failure, "the job's batch request failed: it goes back to be called live");
                return Outcome::Defer {
                    after: Duration::ZERO,
                    attempts: self.delivery.attempts + 1,
                };
            }
            Err(failure) => return self.failed(progress, failure),
        };
        progress.bought(&generation);
        let missing = progress.missing(self.job.n);
        let take = generation.images.len().min(missing.len());
        let indices = &missing[..take];
        if let Err(outcome) = self
            .store_bought(indices, generation.images, &mut progress)
            .await
        {
            return outcome;
        }
        if !progress.missing(self.job.n).is_empty() {
            info!(
                stored = progress.images.len(),
                of = self.job.n,
                "the batch answered fewer images than asked: the job goes back to be called live"
            );
            return Outcome::Defer {
                after: Duration::ZERO,
                attempts: self.delivery.attempts + 1,
            };
        }
        self.succeed(progress).await
    }
}

impl Pipeline {
    /// The reference images of a lane job, read (none when it has none).
    pub async fn lane_references(
        &self,
        body: &[u8],
        message_id: Option<&str>,
    ) -> Result<crate::provider::Resolved, crate::references::Unresolved> {
        let job = Job::parse(body, message_id, &self.rules)
            .map_err(|e| crate::references::Unresolved::Invalid(e.message))?;
        if job.images.is_empty() && job.mask.is_none() {
            return Ok(crate::provider::Resolved::default());
        }
        self.references.resolve(&job).await
    }

    /// The batch request of a lane job (its `custom_id` aside): the endpoint and body of its
    /// line, its references named by `files`. `Err` says why the job cannot be sent (it is
    /// invalid, its provider is gone).
    pub fn lane_line(
        &self,
        body: &[u8],
        message_id: Option<&str>,
        files: &crate::provider::BatchFiles,
    ) -> Result<LaneLine, String> {
        let job = Job::parse(body, message_id, &self.rules).map_err(|e| e.message)?;
        let route = self
            .routes
            .get(job.provider.as_deref())
            .ok_or("its provider is not configured")?;
        let request = ImageRequest::for_job(&job, route.provider.defaults(), job.n);
        let (endpoint, body) = route
            .provider
            .batch_line(&request, files)
            .ok_or("its provider has no batch request for it")?;
        let estimate = route.provider.estimate(&request);
        let usd = route
            .prices
            .cost(crate::domain::cost::Purchase {
                model: &request.model,
                size: &request.size_text(),
                quality: request.quality.as_deref().unwrap_or(""),
                usage: &estimate,
            })
            .map(|c| c.usd);
        Ok(LaneLine {
            endpoint,
            body,
            estimated_usd: usd,
        })
    }

    /// A lane job's outcome from its line of a provider batch: as a live job's, from the same
    /// steps (a result already stored is its event again, without storing anything).
    pub async fn finish_line(
        &self,
        delivery: Delivery<'_>,
        line: LineResult<'_>,
        in_batch: InBatch,
    ) -> Outcome {
        self.end_lane_job(delivery, LaneEnd::Line(line, in_batch))
            .await
    }

    /// A job that did not run in its provider batch (expired, cancelled, the batch failed) and
    /// is not sent back live: its failure event, as a live job's.
    pub async fn fail_lane_job(
        &self,
        delivery: Delivery<'_>,
        failure: Failure,
        in_batch: Option<InBatch>,
    ) -> Outcome {
        self.end_lane_job(delivery, LaneEnd::Failed(failure, in_batch))
            .await
    }

    async fn end_lane_job(&self, delivery: Delivery<'_>, end: LaneEnd<'_>) -> Outcome {
        let started = Instant::now();
        let job = match Job::parse(delivery.body, delivery.message_id, &self.rules) {
            Ok(job) => job,
            Err(invalid) => return self.events.invalid(&invalid, delivery.origin(), started),
        };
        let span = info_span!("job", job_id = %job.id, batch = job.batch.as_deref().unwrap_or("_"));
        let Some(route) = self.routes.get(job.provider.as_deref()) else {
            return Outcome::Defer {
                after: Duration::ZERO,
                attempts: delivery.attempts,
            };
        };
        let dir = job.dir(&self.prefix);
        let halt = CancellationToken::new();
        let run = JobRun {
            p: self,
            request: ImageRequest::for_job(&job, route.provider.defaults(), job.n),
            job: &job,
            route,
            dir: &dir,
            delivery,
            halt: &halt,
            started,
        };
        let outcome = match end {
            LaneEnd::Line(line, in_batch) => {
                run.end_by_line(line, in_batch)
                    .instrument(span.clone())
                    .await
            }
            LaneEnd::Failed(failure, in_batch) => {
                let mut progress = Progress::new(delivery.attempts);
                progress.lane = in_batch;
                let _entered = span.enter();
                run.failed(progress, failure)
            }
        };
        self.store_failure(&dir, &outcome).instrument(span).await;
        outcome
    }

    /// Why a lane job must not be sent any more (its deadline passed, its batch was cancelled).
    pub async fn lane_unwanted(&self, body: &[u8], message_id: Option<&str>) -> Option<Failure> {
        let job = Job::parse(body, message_id, &self.rules).ok()?;
        self.unwanted(&job).await
    }
}

/// How a lane job ends: by its line, or failed without one.
enum LaneEnd<'a> {
    Line(LineResult<'a>, InBatch),
    Failed(Failure, Option<InBatch>),
}

/// A lane job's request line, but for its `custom_id`.
#[derive(Debug, Clone)]
pub struct LaneLine {
    pub endpoint: &'static str,
    pub body: serde_json::Value,
    /// What the live call would cost, by the provider's estimate (the lane's factor not
    /// applied).
    pub estimated_usd: Option<f64>,
}

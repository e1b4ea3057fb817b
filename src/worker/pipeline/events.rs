//! The one builder of result events: what a job's processing came to, priced, in the contract's
//! shape. Success and failure events share everything but their status and error.

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::Value;
use tracing::warn;

use super::{Outcome, Settle};
use crate::domain::cost::{Cost, Purchase, Usage};
use crate::domain::error::{ErrorKind, Failure};
use crate::domain::event::{
    CloudEvent, EVENT_SCHEMA_VERSION, EventError, ResultData, Status, StoredImage,
};
use crate::domain::job::{InvalidJob, Job};
use crate::domain::json::RawJson;
use crate::provider::{Generation, ImageRequest};
use crate::worker::providers::Route;

/// The message properties a producer matches events by, as it set them.
#[derive(Debug, Clone, Copy, Default)]
pub struct Origin<'a> {
    pub message_id: Option<&'a str>,
    pub correlation_id: Option<&'a str>,
}

impl Origin<'_> {
    /// At most this many characters of a producer's id are echoed.
    const MAX_CHARS: usize = 256;

    fn message_id(&self) -> Option<String> {
        self.message_id
            .map(|s| s.chars().take(Self::MAX_CHARS).collect())
    }

    fn correlation_id(&self) -> Option<String> {
        self.correlation_id
            .map(|s| s.chars().take(Self::MAX_CHARS).collect())
    }
}

/// What a job's event is built from, besides its progress.
#[derive(Clone, Copy)]
pub struct JobEvent<'a> {
    pub job: &'a Job,
    pub route: &'a Route,
    pub request: &'a ImageRequest,
    pub origin: Origin<'a>,
    pub started: Instant,
}

/// What the calls a job made at one provider cost, `usd` `None` when it has no price.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Tried {
    pub provider: String,
    pub usd: Option<f64>,
    pub estimated: bool,
}

/// What the calls of `progress` at `route` cost: what was bought, by the reported (or
/// estimated) usage, plus what calls lost after sending would have bought, as an estimate.
/// `None` when part of it has no price.
pub fn priced(route: &Route, request: &ImageRequest, progress: &Progress) -> Option<Cost> {
    let price = |model: &str, usage: &Usage| {
        route.prices.cost(Purchase {
            model,
            size: &request.size_text(),
            quality: request.quality.as_deref().unwrap_or(""),
            usage,
        })
    };
    // The batch lane's price is a share of the live one.
    let factor = progress.lane.as_ref().map_or(1.0, |l| l.price_factor);
    let price = |model: &str, usage: &Usage| {
        price(model, usage).map(|c| Cost {
            usd: c.usd * factor,
            ..c
        })
    };
    let bought = if progress.bought == 0 {
        // Nothing was bought here (stored images reused, or no provider call).
        Some(Cost {
            usd: 0.0,
            estimated: false,
        })
    } else {
        price(
            progress.model.as_deref().unwrap_or(&request.model),
            &progress.usage,
        )
    };
    let unanswered = progress
        .billed_unanswered
        .map(|usage| price(&request.model, &usage));
    match (bought, unanswered) {
        (bought, None) => bought,
        (Some(a), Some(Some(b))) => Some(Cost {
            usd: a.usd + b.usd,
            estimated: true,
        }),
        // Part of it has no price: the whole is unknown.
        _ => None,
    }
}

/// What a job's earlier deliveries bought, kept in its journal so that the event counts every
/// call of the job (a job of several calls at a provider that queues them spans deliveries).
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Spent {
    pub bought: u32,
    pub calls: u32,
    pub usage: Usage,
    pub reported_usage: Option<Value>,
    pub request_id: Option<String>,
    pub revised_prompt: Option<String>,
    pub model: Option<String>,
    /// The providers the job left before its current one, and what they cost.
    pub earlier: Vec<Tried>,
}

/// The provider batch a job was bought in.
#[derive(Debug, Clone, Default)]
pub struct InBatch {
    /// The provider's batch id.
    pub provider_batch: String,
    /// The lane's price as a share of the live price.
    pub price_factor: f64,
}

/// Progress of one job in this delivery: what is stored, what was bought, what it cost.
#[derive(Debug, Default)]
pub struct Progress {
    pub images: Vec<StoredImage>,
    /// Failed provider attempts of earlier deliveries.
    pub prior: u32,
    /// Provider calls made in this delivery.
    pub calls: u32,
    /// Images the provider returned to this worker for this job.
    pub bought: u32,
    pub possibly_billed: u32,
    /// What the calls that may have been billed without an answer would have bought, by the
    /// provider's estimate (charged as an estimate).
    pub billed_unanswered: Option<Usage>,
    /// What the provider reported, summed over calls (its own vocabulary, for the event).
    pub reported_usage: Option<Value>,
    /// The neutral usage, summed over calls (for the price).
    pub usage: Usage,
    pub request_id: Option<String>,
    pub revised_prompt: Option<String>,
    pub model: Option<String>,
    /// The providers the job left (fell back from) before its current one, and what their
    /// calls cost.
    pub earlier: Vec<Tried>,
    /// The journal's record of earlier deliveries was read (once per delivery, whichever
    /// provider the job is at).
    pub journal_read: bool,
    /// The job's reference images, read (empty when it has none).
    pub refs: crate::provider::Resolved,
    /// The provider batch that bought the job's images (the batch lane), when one did.
    pub lane: Option<InBatch>,
}

impl Progress {
    pub fn new(prior: u32) -> Self {
        Self {
            prior,
            ..Self::default()
        }
    }

    /// The indices of the job's images not stored yet.
    pub fn missing(&self, n: u8) -> Vec<u32> {
        (0..n as u32)
            .filter(|i| !self.images.iter().any(|s| s.index == *i))
            .collect()
    }

    /// What this delivery (and the earlier ones it carries on) bought, to carry on.
    pub fn spent(&self) -> Spent {
        Spent {
            bought: self.bought,
            calls: self.calls,
            usage: self.usage,
            reported_usage: self.reported_usage.clone(),
            request_id: self.request_id.clone(),
            revised_prompt: self.revised_prompt.clone(),
            model: self.model.clone(),
            earlier: self.earlier.clone(),
        }
    }

    /// The job leaves `route` for a fallback provider: what it bought there is priced and
    /// kept, and the counts start again for the next provider (the images stay).
    pub fn leave(&mut self, route: &Route, request: &ImageRequest) {
        let cost = priced(route, request, self);
        self.earlier.push(Tried {
            provider: route.name.clone(),
            usd: cost.map(|c| c.usd),
            estimated: cost.is_some_and(|c| c.estimated),
        });
        self.bought = 0;
        self.usage = Usage::default();
        self.billed_unanswered = None;
        self.model = None;
    }

    /// Carries on what earlier deliveries of the job bought.
    pub fn carry(&mut self, earlier: Spent) {
        self.bought += earlier.bought;
        self.calls += earlier.calls;
        self.usage.add(&earlier.usage);
        self.usage.estimated = earlier.usage.estimated || self.usage.estimated;
        self.reported_usage = merge_usage(earlier.reported_usage, self.reported_usage.take());
        self.request_id = self.request_id.take().or(earlier.request_id);
        self.revised_prompt = self.revised_prompt.take().or(earlier.revised_prompt);
        self.model = self.model.take().or(earlier.model);
        self.earlier = earlier.earlier;
    }

    /// Counts what one answer bought.
    pub fn bought(&mut self, generation: &Generation) {
        self.bought += generation.images.len() as u32;
        self.reported_usage = merge_usage(
            self.reported_usage.take(),
            generation.reported_usage.clone(),
        );
        self.usage.add(&generation.usage);
        if generation.request_id.is_some() {
            self.request_id.clone_from(&generation.request_id);
        }
        if self.revised_prompt.is_none() {
            self.revised_prompt = generation
                .images
                .iter()
                .find_map(|i| i.revised_prompt.clone());
        }
        if self.model.is_none() {
            self.model.clone_from(&generation.model);
        }
    }
}

/// Builds the events of one worker.
pub struct Events {
    source: String,
}

impl Events {
    pub fn new(source: &str) -> Self {
        Self {
            source: source.to_string(),
        }
    }

    fn data(
        &self,
        job_id: &str,
        batch: Option<String>,
        status: Status,
        started: Instant,
    ) -> ResultData {
        ResultData {
            schema_version: EVENT_SCHEMA_VERSION,
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
            metadata: RawJson::null(),
            job_fingerprint: None,
            message_id: None,
            correlation_id: None,
            provider: None,
            providers_tried: Vec::new(),
            cost_by_provider: None,
            background_ignored: false,
            references: Vec::new(),
            mask: None,
            lane: None,
            provider_batch: None,
        }
    }

    /// A message that is not a valid job: dead-lettered, with what is wrong.
    pub fn invalid(&self, invalid: &InvalidJob, origin: Origin<'_>, started: Instant) -> Outcome {
        let data = ResultData {
            message_id: origin.message_id(),
            correlation_id: origin.correlation_id(),
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
        self.finished(data, Settle::DeadLetter)
    }

    /// What the job came to, priced.
    fn of_job(&self, run: JobEvent<'_>, mut progress: Progress, status: Status) -> ResultData {
        let JobEvent {
            job,
            route,
            request,
            origin,
            started,
        } = run;
        let current = priced(route, request, &progress);
        let earlier = std::mem::take(&mut progress.earlier);
        let lane = progress.lane.take();
        let mut data = ResultData {
            message_id: origin.message_id(),
            correlation_id: origin.correlation_id(),
            images: progress.images,
            attempts: progress.prior + progress.calls,
            possibly_billed: progress.possibly_billed,
            model: Some(progress.model.unwrap_or_else(|| request.model.clone())),
            revised_prompt: progress.revised_prompt,
            usage: progress.reported_usage,
            provider_request_id: progress.request_id,
            metadata: job.metadata.clone(),
            job_fingerprint: Some(job.fingerprint()),
            ..self.data(&job.id, job.batch.clone(), status, started)
        };
        data.images.sort_by_key(|i| i.index);
        data.background_ignored = data.images.iter().any(|i| i.alpha == Some(false));
        data.references = job.images.iter().map(ToString::to_string).collect();
        data.mask = job.mask.as_ref().map(ToString::to_string);
        if let Some(lane) = lane {
            data.lane = Some(crate::domain::job::Lane::Batch.as_str().to_string());
            data.provider_batch = Some(lane.provider_batch);
        }
        let mut by_provider: BTreeMap<String, Option<f64>> = BTreeMap::new();
        let mut total = Some(0.0);
        let mut estimated = false;
        let mut tried = Vec::with_capacity(earlier.len() + 1);
        let here = Tried {
            provider: route.name.clone(),
            usd: current.map(|c| c.usd),
            estimated: current.is_some_and(|c| c.estimated),
        };
        for t in earlier.iter().chain(std::iter::once(&here)) {
            let entry = by_provider.entry(t.provider.clone()).or_insert(Some(0.0));
            *entry = entry.zip(t.usd).map(|(a, b)| a + b);
            total = total.zip(t.usd).map(|(a, b)| a + b);
            estimated |= t.estimated;
            tried.push(t.provider.clone());
        }
        data.cost_usd = total;
        data.cost_estimated = total.is_some() && estimated;
        data.provider = Some(route.name.clone());
        data.providers_tried = tried;
        data.cost_by_provider = Some(by_provider);
        data
    }

    /// A succeeded job's event (also its record).
    pub fn succeeded(&self, run: JobEvent<'_>, progress: Progress) -> CloudEvent {
        let data = self.of_job(run, progress, Status::Succeeded);
        CloudEvent::new(&self.source, data)
    }

    /// A job that failed for good.
    pub fn failed(&self, run: JobEvent<'_>, progress: Progress, failure: Failure) -> Outcome {
        let data = self.of_job(run, progress, Status::Failed);
        self.fail(data, failure)
    }

    /// A success that could not be recorded, as a failure that keeps what it had.
    pub fn unrecorded(&self, event: CloudEvent, failure: Failure) -> Outcome {
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

/// Sums the numbers of two usage objects, field by field (several calls made one job's images).
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

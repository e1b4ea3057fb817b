//! What becomes of one message: it runs through the pipeline, and its outcome becomes broker
//! operations, each only after the broker confirmed what it depends on.
//!
//! - finished: the event is published (with confirm), then the message is acked or
//!   dead-lettered (published to the dead-letter queue with headers that say why, with confirm,
//!   then acked; should that publish fail, the message is rejected and the queue's own
//!   dead-lettering takes it, without the headers);
//! - defer: the job goes to a delay queue (with confirm), carrying its failed attempts, then the
//!   original is acked;
//! - pending: the job waits at its provider: it is held and processed again when the provider
//!   said to look, as long as it has been held less than `worker.pending_hold_secs`; after that it
//!   is deferred like any long wait (its handle is in its journal, so it is never resubmitted);
//! - return (nack with requeue): the worker stops taking jobs, or the event could not be
//!   confirmed. Not a failed attempt.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicAckOptions, BasicNackOptions, BasicRejectOptions};

use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::pipeline::{Delivery, Outcome, Pipeline, ReturnReason, Settle};
use crate::amqp::headers::{HeaderSeal, failure_headers, republish_properties};
use crate::amqp::publisher::Publisher;
use crate::config::Settings;
use crate::domain::error::StopReason;
use crate::domain::event::EventError;

/// What a session needs to handle messages.
#[derive(Clone)]
pub(super) struct Context {
    pub pipeline: Arc<Pipeline>,
    /// Seals the count of failed attempts on the messages the worker republishes.
    pub seal: Arc<HeaderSeal>,
    pub publisher: Arc<Publisher>,
    pub settings: Arc<Settings>,
    /// Where a stop request goes (every provider paused, storage down, the spend cap).
    pub stop: mpsc::Sender<(StopReason, String)>,
    /// Where jobs waiting at their provider go back to be held until they are looked at again.
    pub waiting: mpsc::UnboundedSender<Waiting>,
}

/// A job waiting at its provider, held by this worker.
pub(super) struct Waiting {
    pub delivery: AmqpDelivery,
    /// Since when this worker holds the message.
    pub held_since: Instant,
    pub after: Duration,
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(super) enum Handled {
    Settled,
    Returned,
    /// Returned because nothing will work until an operator acts.
    Stopped,
    /// Held: it waits at its provider.
    Waiting,
}

/// Counts a job in flight for as long as it lives.
struct InFlight;

impl InFlight {
    fn new() -> Self {
        super::metrics::jobs_in_flight(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        super::metrics::jobs_in_flight(-1.0);
    }
}

/// Processes one message and settles it. `probe`: the worker's probe while every provider is
/// paused; `held_since`: since when this worker holds the message (now, unless it came back
/// from waiting at its provider).
pub(super) async fn handle(
    delivery: AmqpDelivery,
    cx: Context,
    halt: CancellationToken,
    probe: bool,
    held_since: Instant,
) -> Handled {
    let _in_flight = InFlight::new();
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_string());
    let correlation_id = delivery
        .properties
        .correlation_id()
        .as_ref()
        .map(|m| m.as_str().to_string());
    let attempts = cx.seal.attempts_of(&delivery.properties, &delivery.data);
    let outcome = cx
        .pipeline
        .process(
            Delivery {
                body: &delivery.data,
                message_id: message_id.as_deref(),
                correlation_id: correlation_id.as_deref(),
                attempts,
                probe,
                live_only: crate::amqp::headers::text(
                    delivery.properties.headers().as_ref(),
                    crate::amqp::headers::LANE_HEADER,
                )
                .as_deref()
                    == Some("live"),
            },
            &halt,
        )
        .await;
    match outcome {
        Outcome::Finished { event, settle } => {
            let a = &cx.settings.amqp;
            if let Err(e) = cx
                .publisher
                .publish_event(&a.results_exchange, &event)
                .await
            {
                error!(job_id = %event.data.job_id, error = %e, "result event not confirmed: returning the job to the queue");
                // Do not spin on a broker that refuses events.
                tokio::time::sleep(Duration::from_secs(1)).await;
                nack(&delivery, "event not confirmed").await;
                return Handled::Returned;
            }
            super::metrics::job_finished(
                event.data.status == crate::domain::event::Status::Succeeded,
                event.data.error.as_ref().map(|e| e.kind.as_str()),
            );
            let settled = match settle {
                Settle::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
                Settle::DeadLetter => {
                    dead_letter(
                        &delivery,
                        &cx,
                        event.data.error.as_ref(),
                        event.data.attempts,
                    )
                    .await
                }
            };
            match settled {
                Ok(true) => {}
                Ok(false) => warn!(job_id = %event.data.job_id,
                    "the channel that delivered the job is gone: it will be redelivered (its outcome is known)"),
                Err(e) => warn!(job_id = %event.data.job_id, error = %e,
                    "settling the job failed: it will be redelivered (its outcome is known)"),
            }
            Handled::Settled
        }
        Outcome::ToLane { entry, recorded } => {
            if !recorded {
                let written = match super::lane::record::LaneRecord::new(
                    &entry,
                    &delivery.data,
                    &delivery.properties,
                    attempts,
                ) {
                    Some(record) => {
                        super::lane::record::write(
                            &**cx.pipeline.store(),
                            &cx.settings.storage.prefix,
                            &record,
                        )
                        .await
                    }
                    // A job's body was parsed as UTF-8 JSON: never here.
                    None => Err(crate::storage::StorageError {
                        op: "write",
                        key: entry.dir.clone(),
                        kind: crate::storage::StorageErrorKind::Invalid,
                        message: "the job's body is not UTF-8".into(),
                    }),
                };
                if let Err(e) = written {
                    error!(job_id = %entry.job_id, error = %e,
                        "the lane record could not be written: returning the job to the queue");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    nack(&delivery, "lane record not written").await;
                    return Handled::Returned;
                }
                info!(job_id = %entry.job_id, "job recorded for the batch lane: its message is settled");
            }
            super::metrics::lane_recorded();
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                warn!(job_id = %entry.job_id, error = %e,
                    "acking a lane job failed: it will be redelivered (its record is kept)");
            }
            Handled::Settled
        }
        Outcome::Defer { after, attempts } => delay(&delivery, &cx, after, attempts).await,
        Outcome::Pending { after, attempts } => {
            let hold = Duration::from_secs(cx.settings.worker.pending_hold_secs);
            if held_since.elapsed() + after > hold {
                // Held long enough: the delay queues hold it now, its handle in its journal.
                return delay(&delivery, &cx, after, attempts).await;
            }
            let waiting = Waiting {
                delivery,
                held_since,
                after,
            };
            if let Err(mpsc::error::SendError(w)) = cx.waiting.send(waiting) {
                // The session is over: the message returns with its channel.
                nack(&w.delivery, "session over").await;
                return Handled::Returned;
            }
            Handled::Waiting
        }
        Outcome::Return { reason } => {
            let stopped = matches!(reason, ReturnReason::Stop { .. });
            if let ReturnReason::Stop { reason, message } = reason {
                let _ = cx.stop.try_send((reason, message));
            }
            nack(&delivery, "returned").await;
            if stopped {
                Handled::Stopped
            } else {
                Handled::Returned
            }
        }
    }
}

/// Sends a job through the delay queue that covers `after` (with confirm), then acks it.
async fn delay(delivery: &AmqpDelivery, cx: &Context, after: Duration, attempts: u32) -> Handled {
    let (queue, tier) = cx.settings.delay_queue(after);
    let properties = republish_properties(
        &delivery.properties,
        &cx.seal.attempts_headers(attempts, &delivery.data),
        cx.settings.amqp.frame_max,
    );
    match cx
        .publisher
        .publish("", &queue, &delivery.data, properties)
        .await
    {
        Ok(()) => {
            info!(queue = %queue, tier_secs = tier.as_secs(), attempts, "job delayed");
            super::metrics::delayed();
            if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                warn!(error = %e, "acking a delayed job failed: it may run twice (its result is idempotent)");
            }
            Handled::Settled
        }
        Err(e) => {
            error!(error = %e, queue = %queue, "could not delay the job: returning it to the queue");
            tokio::time::sleep(Duration::from_secs(1)).await;
            nack(delivery, "delay failed").await;
            Handled::Returned
        }
    }
}

/// Publishes a failed job to the dead-letter queue with headers saying why, then acks it. If that
/// publish fails, rejects it instead: the queue's own dead-lettering takes it.
async fn dead_letter(
    delivery: &AmqpDelivery,
    cx: &Context,
    error: Option<&EventError>,
    attempts: u32,
) -> lapin::Result<bool> {
    let [count, seal] = cx.seal.attempts_headers(attempts, &delivery.data);
    let [kind, message] = failure_headers(error);
    let properties = republish_properties(
        &delivery.properties,
        &[kind, message, count, seal],
        cx.settings.amqp.frame_max,
    );
    let queue = &cx.settings.amqp.dead_letter_queue;
    match cx
        .publisher
        .publish("", queue, &delivery.data, properties)
        .await
    {
        Ok(()) => delivery.acker.ack(BasicAckOptions::default()).await,
        Err(e) => {
            warn!(error = %e, "publishing to the dead-letter queue failed: rejecting to the queue's dead-letter exchange");
            delivery
                .acker
                .reject(BasicRejectOptions { requeue: false })
                .await
        }
    }
}

/// Returns a message to the queue untouched.
pub(super) async fn nack(delivery: &AmqpDelivery, why: &str) {
    let options = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    if let Err(e) = delivery.acker.nack(options).await {
        warn!(error = %e, why, "returning the message failed: the broker returns it when the channel closes");
    }
}

//! What becomes of a lane job's outcome, from its record (the message was settled long ago):
//! its event published (with confirm); a failed job's message dead-lettered as it came, with
//! the headers that say why; a job its provider batch did not run sent back to be called live
//! (with a header that keeps it from the lane), or failed, as `lane.unfinished` says.

use lapin::types::{AMQPValue, LongString};
use tracing::{info, warn};

use super::Lane;
use super::record::LaneRecord;
use crate::amqp::headers::{LANE_HEADER, failure_headers, republish_properties};
use crate::amqp::publisher::Publisher;
use crate::config::Unfinished;
use crate::domain::error::Failure;
use crate::domain::event::{EventError, Status};
use crate::worker::pipeline::lane::InBatch;
use crate::worker::pipeline::{Outcome, Settle};

/// The journal entry of a lane job sent back to be called live (so that a file's end, taken
/// again, does not send it twice).
pub(super) const SENT_LIVE: &str = "lane-sent-live.json";

impl Lane {
    /// Publishes what `outcome` says of the job of `record`. `Err`: nothing is settled yet
    /// (the broker or the store failed): the line is split again later.
    pub(super) async fn deliver(
        &self,
        publisher: &Publisher,
        record: &LaneRecord,
        outcome: Outcome,
        in_batch: Option<&InBatch>,
    ) -> Result<(), String> {
        match outcome {
            Outcome::Finished { event, settle } => {
                let exchange = &self.settings.amqp.results_exchange;
                publisher
                    .publish_event(exchange, &event)
                    .await
                    .map_err(|e| format!("event not confirmed: {e}"))?;
                crate::worker::metrics::job_finished(
                    event.data.status == Status::Succeeded,
                    event.data.error.as_ref().map(|e| e.kind.as_str()),
                );
                if settle == Settle::DeadLetter {
                    self.dead_letter(
                        publisher,
                        record,
                        event.data.error.as_ref(),
                        event.data.attempts,
                    )
                    .await?;
                }
                Ok(())
            }
            Outcome::Defer { attempts, .. } | Outcome::Pending { attempts, .. } => {
                let failure = Failure::transient("the provider batch did not buy the job's images");
                self.unfinished(publisher, record, attempts, failure, in_batch)
                    .await
            }
            Outcome::Return { .. } | Outcome::ToLane { .. } => {
                Err("the job's outcome could not be settled now (storage)".into())
            }
        }
    }

    /// A job its provider batch did not run (expired, cancelled, the batch failed, or its line
    /// failed in a way a retry can mend): back to be called live, or failed.
    pub(super) async fn unfinished(
        &self,
        publisher: &Publisher,
        record: &LaneRecord,
        attempts: u32,
        failure: Failure,
        in_batch: Option<&InBatch>,
    ) -> Result<(), String> {
        let delivery = record.delivery();
        // A job nobody wants any more (its batch cancelled, its deadline passed) ends so.
        if let Some(unwanted) = self
            .pipeline
            .lane_unwanted(delivery.body, delivery.message_id)
            .await
        {
            let outcome = self
                .pipeline
                .fail_lane_job(delivery, unwanted, in_batch.cloned())
                .await;
            return Box::pin(self.deliver(publisher, record, outcome, in_batch)).await;
        }
        match self.settings.lane.unfinished {
            Unfinished::Live => self.send_live(publisher, record, attempts).await,
            Unfinished::Fail => {
                let outcome = self
                    .pipeline
                    .fail_lane_job(delivery, failure, in_batch.cloned())
                    .await;
                if matches!(outcome, Outcome::Finished { .. }) {
                    Box::pin(self.deliver(publisher, record, outcome, in_batch)).await
                } else {
                    Err("the job's failure could not be recorded".into())
                }
            }
        }
    }

    /// Publishes the job again to the jobs queue, as it came, to be called live.
    async fn send_live(
        &self,
        publisher: &Publisher,
        record: &LaneRecord,
        attempts: u32,
    ) -> Result<(), String> {
        let body = record.body.as_bytes();
        let [count, seal] = self.seal.attempts_headers(attempts, body);
        let properties = republish_properties(
            &record.properties(),
            &[
                (LANE_HEADER, AMQPValue::LongString(LongString::from("live"))),
                count,
                seal,
            ],
            self.settings.amqp.frame_max,
        );
        publisher
            .publish("", &self.settings.amqp.jobs_queue, body, properties)
            .await
            .map_err(|e| format!("sending the job back live failed: {e}"))?;
        let mark = crate::domain::keys::journal(&record.dir(&self.prefix), SENT_LIVE);
        if let Err(e) = self
            .store()
            .put(crate::storage::PutObject::json(
                &mark,
                bytes::Bytes::from_static(b"{}"),
            ))
            .await
        {
            warn!(job_id = %record.job_id, error = %e, "the mark of a job sent back live could not be written");
        }
        info!(job_id = %record.job_id, "the provider batch did not run the job: it is sent back to be called live");
        Ok(())
    }

    /// The failed job's message to the dead-letter queue, with the headers that say why.
    async fn dead_letter(
        &self,
        publisher: &Publisher,
        record: &LaneRecord,
        error: Option<&EventError>,
        attempts: u32,
    ) -> Result<(), String> {
        let body = record.body.as_bytes();
        let [count, seal] = self.seal.attempts_headers(attempts, body);
        let [kind, message] = failure_headers(error);
        let properties = republish_properties(
            &record.properties(),
            &[kind, message, count, seal],
            self.settings.amqp.frame_max,
        );
        publisher
            .publish("", &self.settings.amqp.dead_letter_queue, body, properties)
            .await
            .map_err(|e| {
                warn!(job_id = %record.job_id, error = %e, "dead-lettering a lane job failed");
                format!("dead-lettering failed: {e}")
            })
    }
}

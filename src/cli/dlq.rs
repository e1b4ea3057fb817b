//! The dead-letter queue: listing what is there and why, and replaying jobs to the jobs queue.
//!
//! Both read messages without acknowledging them first: a message is removed from the dead-letter
//! queue only after its copy in the jobs queue is confirmed (replay), and closing the channel
//! returns everything else. A listing or replay killed halfway loses nothing; a replay killed
//! between a confirm and its ack leaves a duplicate in the jobs queue, which the stored result
//! record makes harmless.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection};
use serde::Serialize;

use crate::amqp::headers::{
    ERROR_KIND_HEADER, ERROR_MESSAGE_HEADER, claimed_attempts, latest_death, text,
};
use crate::amqp::publisher::Publisher;
use crate::amqp::{AmqpError, connect};
use crate::config::Settings;

/// At most this many messages are held unacknowledged while reading the queue.
const WINDOW: u16 = 1000;
/// Reading stops when no message arrives for this long.
const IDLE: Duration = Duration::from_millis(1500);

/// One dead-lettered job and why it is there.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadLetter {
    pub job_id: Option<String>,
    pub batch: Option<String>,
    /// The failure kind the worker recorded (`content_policy`, `invalid_job`, ...), or the
    /// broker's reason when the broker dead-lettered it (`delivery_limit`, `rejected`, ...).
    pub reason: String,
    pub message: Option<String>,
    pub attempts: u32,
    /// What the broker recorded in `x-death` (reason and count), when it dead-lettered the job.
    pub broker_reason: Option<String>,
    pub deaths: u64,
    pub bytes: usize,
}

#[derive(Debug, Default, Clone, Serialize, PartialEq)]
pub struct ReplayReport {
    pub replayed: usize,
    pub skipped: usize,
}

/// Which dead letters to replay.
#[derive(Debug, Clone, Default)]
pub struct ReplayFilter {
    pub limit: Option<usize>,
    pub batch: Option<String>,
    pub include_invalid: bool,
}

/// Reads a dead letter's story from its body and headers.
pub fn describe(body: &[u8], properties: &BasicProperties) -> DeadLetter {
    let json: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let field = |k: &str| {
        json.as_ref()
            .and_then(|j| j.get(k))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let job_id = field("id").or_else(|| {
        properties
            .message_id()
            .as_ref()
            .map(|m| m.as_str().to_string())
    });
    let headers = properties.headers().as_ref();
    let death = latest_death(headers).unwrap_or_default();
    let kind = text(headers, ERROR_KIND_HEADER);
    DeadLetter {
        job_id,
        batch: field("batch"),
        reason: kind
            .or_else(|| death.reason.clone())
            .unwrap_or_else(|| "unknown".into()),
        message: text(headers, ERROR_MESSAGE_HEADER),
        attempts: claimed_attempts(headers),
        broker_reason: death.reason,
        deaths: death.count,
        bytes: body.len(),
    }
}

/// The properties to replay a job with: the failure headers, the attempt count and the broker's
/// death records are dropped, so the job starts afresh.
fn fresh_properties(properties: &BasicProperties) -> BasicProperties {
    let mut table = FieldTable::default();
    if let Some(headers) = properties.headers() {
        for (k, v) in headers.inner() {
            let k = k.as_str();
            if !k.starts_with("x-imagegen-")
                && !k.starts_with("x-death")
                && k != "x-first-death-reason"
                && !k.starts_with("x-first-death")
                && !k.starts_with("x-last-death")
                && k != "x-delivery-count"
            {
                table.insert(k.into(), v.clone());
            }
        }
    }
    properties.clone().with_headers(table)
}

async fn reader(connection: &Connection, settings: &Settings) -> Result<(Channel, u32), AmqpError> {
    let channel = connection.create_channel().await?;
    let queue = channel
        .queue_declare(
            settings.amqp.dead_letter_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..QueueDeclareOptions::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .basic_qos(WINDOW, BasicQosOptions::default())
        .await?;
    Ok((channel, queue.message_count()))
}

async fn consume(channel: &Channel, settings: &Settings) -> Result<lapin::Consumer, AmqpError> {
    Ok(channel
        .basic_consume(
            settings.amqp.dead_letter_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?)
}

/// Lists up to `limit` dead letters, leaving them in the queue.
pub async fn list(settings: &Settings, limit: usize) -> anyhow::Result<Vec<DeadLetter>> {
    let connection = connect(settings, "dlq-list").await?;
    let (channel, count) = reader(&connection, settings).await?;
    let want = limit.min(count as usize).min(WINDOW as usize);
    let mut out = Vec::with_capacity(want);
    if want > 0 {
        let mut consumer = consume(&channel, settings).await?;
        while out.len() < want {
            match tokio::time::timeout(IDLE, consumer.next()).await {
                Ok(Some(Ok(d))) => out.push(describe(&d.data, &d.properties)),
                _ => break,
            }
        }
    }
    // Closing the channel returns every message read.
    let _ = channel.close(200, "listed".into()).await;
    let _ = connection.close(200, "listed".into()).await;
    Ok(out)
}

/// Moves dead letters back to the jobs queue, with confirms, resetting their attempt count.
/// `invalid_job` ones are skipped unless `include_invalid`.
pub async fn replay(settings: &Settings, filter: &ReplayFilter) -> anyhow::Result<ReplayReport> {
    let connection = Arc::new(connect(settings, "dlq-replay").await?);
    let (channel, count) = reader(&connection, settings).await?;
    let publisher = Publisher::new(connection.clone());
    publisher.open().await?;
    let mut report = ReplayReport::default();
    let limit = filter.limit.unwrap_or(usize::MAX);
    if count > 0 && limit > 0 {
        let mut consumer = consume(&channel, settings).await?;
        let mut seen = 0u32;
        let mut skipped = Vec::new();
        while seen < count && report.replayed < limit {
            let delivery = match tokio::time::timeout(IDLE, consumer.next()).await {
                Ok(Some(Ok(d))) => d,
                _ => break,
            };
            seen += 1;
            let letter = describe(&delivery.data, &delivery.properties);
            let wrong_batch = filter.batch.is_some() && letter.batch != filter.batch;
            if wrong_batch || (letter.reason == "invalid_job" && !filter.include_invalid) {
                // Held unacknowledged until the end (so it is not read again), then given back.
                report.skipped += 1;
                skipped.push(delivery);
                continue;
            }
            publisher
                .publish(
                    "",
                    &settings.amqp.jobs_queue,
                    &delivery.data,
                    fresh_properties(&delivery.properties),
                )
                .await?;
            delivery.acker.ack(BasicAckOptions::default()).await?;
            report.replayed += 1;
        }
        for delivery in skipped {
            let options = lapin::options::BasicNackOptions {
                multiple: false,
                requeue: true,
            };
            let _ = delivery.acker.nack(options).await;
        }
    }
    let _ = channel.close(200, "replayed".into()).await;
    publisher.close().await;
    let _ = connection.close(200, "replayed".into()).await;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::amqp::headers::ATTEMPTS_HEADER;
    use lapin::types::{AMQPValue, FieldArray, LongString};

    #[test]
    fn a_worker_dead_letter_tells_its_kind_and_a_broker_one_its_reason() {
        let mut h = FieldTable::default();
        h.insert(
            ERROR_KIND_HEADER.into(),
            AMQPValue::LongString(LongString::from("content_policy")),
        );
        h.insert(
            ERROR_MESSAGE_HEADER.into(),
            AMQPValue::LongString(LongString::from("refused")),
        );
        h.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongInt(1));
        let props = BasicProperties::default().with_headers(h);
        let d = describe(br#"{"id":"a","batch":"b","prompt":"p"}"#, &props);
        assert_eq!(
            (d.job_id.as_deref(), d.batch.as_deref()),
            (Some("a"), Some("b"))
        );
        assert_eq!((d.reason.as_str(), d.attempts), ("content_policy", 1));

        let mut death = FieldTable::default();
        death.insert(
            "reason".into(),
            AMQPValue::LongString(LongString::from("delivery_limit")),
        );
        death.insert("count".into(), AMQPValue::LongLongInt(1));
        let mut h = FieldTable::default();
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::FieldTable(death)])),
        );
        let props = BasicProperties::default()
            .with_message_id("m1".into())
            .with_headers(h);
        let d = describe(b"not json", &props);
        assert_eq!(d.job_id.as_deref(), Some("m1"));
        assert_eq!(d.reason, "delivery_limit");
        assert_eq!(d.deaths, 1);
    }

    #[test]
    fn replayed_jobs_start_afresh_but_keep_other_headers() {
        let mut h = FieldTable::default();
        h.insert(ATTEMPTS_HEADER.into(), AMQPValue::LongInt(5));
        h.insert(
            "x-death".into(),
            AMQPValue::FieldArray(FieldArray::default()),
        );
        h.insert(
            "x-first-death-reason".into(),
            AMQPValue::LongString(LongString::from("rejected")),
        );
        h.insert(
            "traceparent".into(),
            AMQPValue::LongString(LongString::from("00-abc")),
        );
        let props = fresh_properties(&BasicProperties::default().with_headers(h));
        let keys: Vec<String> = props
            .headers()
            .as_ref()
            .unwrap()
            .inner()
            .keys()
            .map(|k| k.to_string())
            .collect();
        assert_eq!(keys, vec!["traceparent".to_string()]);
    }
}

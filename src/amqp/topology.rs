//! Declares the broker topology: create what is missing, accept what exists.
//!
//! Queue arguments are fixed when a queue is created, and declaring an existing queue with other
//! arguments fails (406 PRECONDITION_FAILED) and closes the channel. So each entity is first
//! declared *passively* (does it exist?) and only created, with its arguments, when it does not.
//! An existing queue is accepted as it is: arguments that operators may tune later (length limits,
//! TTLs, delivery limits) belong in policies, which apply to existing queues.
//!
//! - jobs: durable quorum queue, dead-lettering at-least-once to the dead-letter queue
//!   (`x-dead-letter-strategy=at-least-once` needs `x-overflow=reject-publish`; RabbitMQ >= 3.10),
//!   with an explicit `x-delivery-limit` so that a poison message ends in the dead-letter queue;
//! - dead-letter queue: durable quorum queue;
//! - delay queues `{jobs}.delay.{secs}s`, one per tier: quorum queues with a message TTL that
//!   dead-letter (at-least-once) back to the jobs queue: delayed retries without plugins;
//! - with a batch lane, the collector's ticks: a quorum queue with a single active consumer (one
//!   collector at a time, the broker moving the role when its holder goes) and its delay queue
//!   (`lane.tick_secs`, dead-lettering back to it);
//! - results: durable topic exchange, and a durable quorum queue bound with `#` so that events are
//!   kept even when nobody listens.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Connection, ExchangeKind};
use tracing::{debug, info};

use super::{AmqpError, string, table};
use crate::config::Settings;

fn quorum() -> (&'static str, AMQPValue) {
    ("x-queue-type", string("quorum"))
}

/// Arguments of the jobs queue at creation.
pub fn jobs_queue_arguments(settings: &Settings) -> FieldTable {
    table([
        quorum(),
        ("x-dead-letter-exchange", string("")),
        (
            "x-dead-letter-routing-key",
            string(&settings.amqp.dead_letter_queue),
        ),
        ("x-dead-letter-strategy", string("at-least-once")),
        ("x-overflow", string("reject-publish")),
        (
            "x-delivery-limit",
            AMQPValue::LongInt(settings.amqp.delivery_limit.min(i32::MAX as u32) as i32),
        ),
    ])
}

/// Arguments of a delay queue: messages wait `secs`, then are dead-lettered back to the jobs
/// queue. One queue per delay: messages only expire at the head of a queue.
pub fn delay_queue_arguments(settings: &Settings, secs: u64) -> FieldTable {
    table([
        quorum(),
        (
            "x-message-ttl",
            AMQPValue::LongLongInt((secs * 1000).min(i64::MAX as u64) as i64),
        ),
        ("x-dead-letter-exchange", string("")),
        (
            "x-dead-letter-routing-key",
            string(&settings.amqp.jobs_queue),
        ),
        ("x-dead-letter-strategy", string("at-least-once")),
        ("x-overflow", string("reject-publish")),
    ])
}

/// Every queue the worker declares, with its arguments at creation: the dead-letter queue, the
/// jobs queue, the delay queues and the results queue (when one is configured).
pub fn queues(settings: &Settings) -> Vec<(String, FieldTable)> {
    let a = &settings.amqp;
    let mut queues = vec![
        (a.dead_letter_queue.clone(), table([quorum()])),
        (a.jobs_queue.clone(), jobs_queue_arguments(settings)),
    ];
    for secs in &a.delay_tiers_secs {
        queues.push((
            settings.delay_queue_name(*secs),
            delay_queue_arguments(settings, *secs),
        ));
    }
    if settings.lane.enabled() {
        queues.push((
            settings.lane_ticks_queue(),
            table([
                quorum(),
                ("x-single-active-consumer", AMQPValue::Boolean(true)),
            ]),
        ));
        queues.push((
            settings.lane_ticks_delay_queue(),
            table([
                quorum(),
                (
                    "x-message-ttl",
                    AMQPValue::LongLongInt((settings.lane.tick_secs * 1000) as i64),
                ),
                ("x-dead-letter-exchange", string("")),
                (
                    "x-dead-letter-routing-key",
                    string(&settings.lane_ticks_queue()),
                ),
                ("x-dead-letter-strategy", string("at-least-once")),
                ("x-overflow", string("reject-publish")),
            ]),
        ));
    }
    if !a.results_queue.is_empty() {
        queues.push((a.results_queue.clone(), table([quorum()])));
    }
    queues
}

/// Declares everything the worker needs (when `amqp.declare_topology` is on).
pub async fn declare(connection: &Connection, settings: &Settings) -> Result<(), AmqpError> {
    let a = &settings.amqp;
    for (name, arguments) in queues(settings) {
        ensure_queue(connection, &name, arguments).await?;
    }
    ensure_exchange(connection, &a.results_exchange).await?;
    if !a.results_queue.is_empty() {
        let channel = connection.create_channel().await?;
        channel
            .queue_bind(
                a.results_queue.as_str().into(),
                a.results_exchange.as_str().into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let _ = channel.close(200, "topology declared".into()).await;
    }
    Ok(())
}

/// Creates a durable queue with `arguments` unless it exists (then it is accepted as it is).
pub async fn ensure_queue(
    connection: &Connection,
    name: &str,
    arguments: FieldTable,
) -> Result<(), AmqpError> {
    // A failed passive declare closes its channel: use a throwaway one.
    let probe = connection.create_channel().await?;
    let passive = QueueDeclareOptions {
        passive: true,
        ..QueueDeclareOptions::default()
    };
    if probe
        .queue_declare(name.into(), passive, FieldTable::default())
        .await
        .is_ok()
    {
        debug!(queue = name, "queue exists; accepted as it is");
        let _ = probe.close(200, "ok".into()).await;
        return Ok(());
    }
    let channel = connection.create_channel().await?;
    channel
        .queue_declare(name.into(), QueueDeclareOptions::durable(), arguments)
        .await?;
    info!(queue = name, "queue created");
    let _ = channel.close(200, "ok".into()).await;
    Ok(())
}

async fn ensure_exchange(connection: &Connection, name: &str) -> Result<(), AmqpError> {
    let probe = connection.create_channel().await?;
    let passive = ExchangeDeclareOptions {
        passive: true,
        ..ExchangeDeclareOptions::default()
    };
    if probe
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            passive,
            FieldTable::default(),
        )
        .await
        .is_ok()
    {
        let _ = probe.close(200, "ok".into()).await;
        return Ok(());
    }
    let channel = connection.create_channel().await?;
    let options = ExchangeDeclareOptions {
        durable: true,
        ..ExchangeDeclareOptions::default()
    };
    channel
        .exchange_declare(
            name.into(),
            ExchangeKind::Topic,
            options,
            FieldTable::default(),
        )
        .await?;
    info!(exchange = name, "exchange created");
    let _ = channel.close(200, "ok".into()).await;
    Ok(())
}

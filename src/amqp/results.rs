//! Following result events: a private queue bound to the results exchange, so that listening
//! never steals events that other consumers of the results queue need.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

use super::AmqpError;
use crate::domain::event::CloudEvent;

pub struct ResultListener {
    channel: Channel,
    consumer: Consumer,
    /// A named queue to delete on close (an exclusive one goes by itself).
    named: Option<String>,
}

impl ResultListener {
    /// Binds an exclusive, server-named queue to `exchange` with `binding` (`#` for every event).
    /// It goes away with the connection.
    pub async fn open(
        connection: &Connection,
        exchange: &str,
        binding: &str,
    ) -> Result<Self, AmqpError> {
        let channel = connection.create_channel().await?;
        let options = QueueDeclareOptions {
            exclusive: true,
            auto_delete: true,
            ..QueueDeclareOptions::default()
        };
        let queue = channel
            .queue_declare("".into(), options, FieldTable::default())
            .await?;
        let name = queue.name().clone();
        Self::bind_and_consume(channel, name.to_string(), exchange, binding, None).await
    }

    /// Binds a durable queue of this name to `exchange`, which the broker deletes after
    /// `expires` without a consumer (`x-expires`): a listener that crashes leaves nothing behind
    /// for long, and one that reconnects within `expires` misses no event.
    pub async fn open_named(
        connection: &Connection,
        exchange: &str,
        binding: &str,
        queue: &str,
        expires: Duration,
    ) -> Result<Self, AmqpError> {
        let channel = connection.create_channel().await?;
        let mut args = FieldTable::default();
        args.insert(
            "x-expires".into(),
            lapin::types::AMQPValue::LongLongInt(expires.as_millis() as i64),
        );
        let options = QueueDeclareOptions {
            durable: true,
            ..QueueDeclareOptions::default()
        };
        channel.queue_declare(queue.into(), options, args).await?;
        Self::bind_and_consume(
            channel,
            queue.to_string(),
            exchange,
            binding,
            Some(queue.to_string()),
        )
        .await
    }

    async fn bind_and_consume(
        channel: Channel,
        name: String,
        exchange: &str,
        binding: &str,
        named: Option<String>,
    ) -> Result<Self, AmqpError> {
        channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                name.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self {
            channel,
            consumer,
            named,
        })
    }

    /// The next event, or `None` after `wait` without one. Messages that are not events are
    /// skipped.
    pub async fn next(&mut self, wait: Duration) -> Result<Option<CloudEvent>, AmqpError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let delivery = match tokio::time::timeout_at(deadline, self.consumer.next()).await {
                Err(_) | Ok(None) => return Ok(None),
                Ok(Some(delivery)) => delivery?,
            };
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            if let Ok(event) = serde_json::from_slice::<CloudEvent>(&delivery.data) {
                return Ok(Some(event));
            }
        }
    }

    pub async fn close(self) {
        if let Some(queue) = &self.named {
            let _ = self
                .channel
                .queue_delete(queue.as_str().into(), Default::default())
                .await;
        }
        let _ = self.channel.close(200, "done".into()).await;
    }
}

//! Following result events: a private queue bound to the results exchange, so that listening
//! never steals events that other consumers of the results queue need.

use std::time::Duration;

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer};

use super::AmqpError;
use crate::event::CloudEvent;

pub struct ResultListener {
    channel: Channel,
    consumer: Consumer,
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
        channel
            .queue_bind(
                name.clone(),
                exchange.into(),
                binding.into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let consumer = channel
            .basic_consume(
                name,
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        Ok(Self { channel, consumer })
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
        let _ = self.channel.close(200, "done".into()).await;
    }
}

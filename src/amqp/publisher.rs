//! Confirmed publishing: a publish counts only once the broker has confirmed it.
//!
//! Publishes are `mandatory` (an unroutable message is returned: an error, not a success) and
//! persistent. The publisher has a channel of its own, so a publishing error never closes the
//! channel that consumes jobs; a broken channel is replaced on the next publish.

use std::sync::Arc;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use tokio::sync::Mutex;

use super::AmqpError;
use crate::domain::event::CloudEvent;

/// The content type of a CloudEvent in structured mode.
pub const CLOUDEVENTS_JSON: &str = "application/cloudevents+json; charset=utf-8";

pub struct Publisher {
    connection: Arc<Connection>,
    channel: Mutex<Option<Channel>>,
}

impl Publisher {
    pub fn new(connection: Arc<Connection>) -> Self {
        Self {
            connection,
            channel: Mutex::new(None),
        }
    }

    /// Opens the publishing channel now rather than at the first publish.
    pub async fn open(&self) -> Result<(), AmqpError> {
        self.channel().await.map(|_| ())
    }

    async fn channel(&self) -> Result<Channel, AmqpError> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = self.connection.create_channel().await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Publishes and waits for the broker's confirm.
    pub async fn publish(
        &self,
        exchange: &str,
        routing_key: &str,
        payload: &[u8],
        properties: BasicProperties,
    ) -> Result<(), AmqpError> {
        let channel = self.channel().await?;
        let options = BasicPublishOptions {
            mandatory: true,
            ..BasicPublishOptions::default()
        };
        let properties = properties.with_delivery_mode(2);
        let target = if exchange.is_empty() {
            format!("queue {routing_key}")
        } else {
            format!("exchange {exchange} ({routing_key})")
        };
        let pending = channel
            .basic_publish(
                exchange.into(),
                routing_key.into(),
                options,
                payload,
                properties,
            )
            .await?;
        let confirm = pending.await?;
        match confirm {
            Confirmation::Ack(None) => Ok(()),
            Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)) => {
                Err(AmqpError::NotConfirmed {
                    target,
                    reason: format!("returned {} {}", returned.reply_code, returned.reply_text),
                })
            }
            Confirmation::Nack(None) => Err(AmqpError::NotConfirmed {
                target,
                reason: "nacked by the broker".into(),
            }),
            Confirmation::NotRequested => Err(AmqpError::NotConfirmed {
                target,
                reason: "publisher confirms are not enabled on the channel".into(),
            }),
        }
    }

    /// Publishes a result event to the results exchange, routed by its outcome.
    pub async fn publish_event(&self, exchange: &str, event: &CloudEvent) -> Result<(), AmqpError> {
        let payload = serde_json::to_vec(event).map_err(|e| AmqpError::NotConfirmed {
            target: exchange.into(),
            reason: format!("event could not be serialised: {e}"),
        })?;
        let properties = BasicProperties::default()
            .with_content_type(CLOUDEVENTS_JSON.into())
            .with_message_id(event.id.as_str().into())
            .with_type(event.kind.as_str().into())
            .with_app_id("imagegen".into())
            .with_timestamp(unix_now());
        self.publish(exchange, event.routing_key(), &payload, properties)
            .await
    }

    pub async fn close(&self) {
        if let Some(channel) = self.channel.lock().await.take() {
            let _ = channel.close(200, "bye".into()).await;
        }
    }
}

pub(crate) fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

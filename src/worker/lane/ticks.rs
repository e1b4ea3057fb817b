//! The collector role: one worker of the fleet at a time acts on the lane, the one the broker
//! makes the active consumer of the ticks queue (`x-single-active-consumer`; when it goes, the
//! broker gives the role to another, with no lock of ours to expire).
//!
//! One tick circulates: the active collector, given a tick, first publishes the next one to the
//! ticks' delay queue (with confirm; it comes back after `lane.tick_secs`), then acks this one,
//! then takes one step ([`Lane::step`]) unless its previous step still runs. No tick is held
//! while a step runs, so a long split never meets the broker's consumer timeout, and a collector
//! that dies mid-step leaves the next tick to its successor. Ticks beyond the one (every worker
//! seeds one at start when the queue is empty; a collector that died between publishing the
//! next tick and acking its own leaves two) are dropped by the active collector: it acks a tick
//! that is not the one it scheduled, as long as that one is on its way.

use std::sync::Arc;

use futures_util::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Connection};
use tokio_util::task::AbortOnDropHandle;
use tracing::{debug, info, warn};

use super::Lane;
use crate::amqp::publisher::Publisher;

impl Lane {
    /// Takes part in the collector role for as long as the connection lives: `Err` when it is
    /// lost. A step that runs when this returns is aborted (every step can be taken again).
    pub async fn collect_ticks(
        self: Arc<Self>,
        connection: Arc<Connection>,
        publisher: Arc<Publisher>,
    ) -> anyhow::Result<()> {
        let queue = self.settings.lane_ticks_queue();
        let channel = connection.create_channel().await?;
        channel.basic_qos(1, BasicQosOptions::default()).await?;
        let passive = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let waiting = channel
            .queue_declare(queue.as_str().into(), passive, FieldTable::default())
            .await?
            .message_count();
        if waiting == 0 {
            // A tick may wait in the delay queue: a second one is dropped by the collector.
            self.publish_tick(&publisher, &queue, &new_tick()).await?;
        }
        let tag = format!(
            "imagegen-lane-{}-{:08x}",
            std::process::id(),
            fastrand::u32(..)
        );
        let mut ticks = channel
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        let delay_queue = self.settings.lane_ticks_delay_queue();
        let mut scheduled: Option<String> = None;
        let mut running: Option<AbortOnDropHandle<()>> = None;
        while let Some(delivery) = ticks.next().await {
            let delivery = delivery?;
            let id = delivery
                .properties
                .message_id()
                .as_ref()
                .map(|m| m.as_str().to_string())
                .unwrap_or_default();
            if scheduled.is_some() && scheduled.as_deref() != Some(id.as_str()) {
                debug!(tick = %id, "a second tick: dropped");
                delivery.acker.ack(BasicAckOptions::default()).await?;
                continue;
            }
            if scheduled.is_none() {
                info!("this worker is the lane's collector now");
            }
            let next = new_tick();
            if let Err(e) = self.publish_tick(&publisher, &delay_queue, &next).await {
                warn!(error = %e, "the next tick could not be scheduled: this one goes back");
                let _ = delivery
                    .acker
                    .nack(BasicNackOptions {
                        requeue: true,
                        ..BasicNackOptions::default()
                    })
                    .await;
                tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                continue;
            }
            scheduled = Some(next);
            delivery.acker.ack(BasicAckOptions::default()).await?;
            if running.as_ref().is_some_and(|r| !r.is_finished()) {
                debug!("the previous step still runs: this tick only keeps the role");
                continue;
            }
            let (lane, publisher) = (self.clone(), publisher.clone());
            running = Some(AbortOnDropHandle::new(tokio::spawn(async move {
                lane.step(&publisher).await;
            })));
        }
        anyhow::bail!("the broker ended the consumer of {queue}")
    }

    async fn publish_tick(
        &self,
        publisher: &Publisher,
        queue: &str,
        id: &str,
    ) -> Result<(), crate::amqp::AmqpError> {
        let properties = BasicProperties::default().with_message_id(id.into());
        publisher.publish("", queue, b"tick", properties).await
    }

    /// One step of the collector: open records into files, then every active file one step on.
    pub async fn step(&self, publisher: &Publisher) {
        if let Err(e) = self.collect(publisher).await {
            warn!(error = %e, "collecting lane records failed: again at the next tick");
        }
        let files = match self.active_files().await {
            Ok(files) => files,
            Err(e) => {
                warn!(error = %e, "listing the lane's files failed: again at the next tick");
                return;
            }
        };
        for file in files {
            if let Err(e) = self.advance(publisher, &file).await {
                warn!(file, error = %e, "a lane file did not get further: again at the next tick");
            }
        }
    }
}

fn new_tick() -> String {
    format!("tick-{:016x}", fastrand::u64(..))
}

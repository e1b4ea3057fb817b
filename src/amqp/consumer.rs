//! The worker: consumes jobs, runs each through the [`Pipeline`], and settles its message only
//! after the job's event is confirmed by the broker.
//!
//! - ack: the job succeeded (or its stored result was published again);
//! - reject without requeue (dead-letter): the job failed for good, its `job.failed` event is out;
//! - nack with requeue (return): the worker stops taking jobs (quota, credentials, shutdown) or
//!   the event could not be confirmed; the job is redelivered and, its record being stored, not
//!   paid for again.
//!
//! Prefetch bounds the messages held; `worker.concurrency` bounds the provider calls (in the
//! pipeline), so uploads and confirms overlap the next provider calls.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::publisher::Publisher;
use super::{connect, topology};
use crate::config::Settings;
use crate::error::StopReason;
use crate::pipeline::{Delivery, Outcome, Pipeline, ReturnReason, Settle};
use crate::provider::ImageProvider;
use crate::storage::ObjectStore;

/// How the worker ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerExit {
    /// Stopped on request; in-flight jobs finished or were returned.
    Shutdown,
}

pub struct Worker {
    settings: Settings,
    pipeline: Arc<Pipeline>,
    provider_name: &'static str,
}

impl Worker {
    /// Builds the configured provider and store, and checks that the store is usable.
    pub async fn from_settings(settings: Settings) -> anyhow::Result<Self> {
        let provider = crate::provider::from_settings(&settings)?;
        let store = crate::storage::from_settings(&settings).await?;
        store.check().await?;
        Ok(Self::new(settings, provider, store))
    }

    pub fn new(
        settings: Settings,
        provider: Arc<dyn ImageProvider>,
        store: Arc<dyn ObjectStore>,
    ) -> Self {
        let provider_name = provider.name();
        let pipeline = Arc::new(Pipeline::new(&settings, provider, store));
        Self {
            settings,
            pipeline,
            provider_name,
        }
    }

    /// Consumes jobs until `shutdown` is cancelled, then stops taking jobs, lets in-flight jobs
    /// finish within `worker.shutdown_grace_secs`, and returns the rest to the queue.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<WorkerExit> {
        let s = &self.settings;
        let connection = Arc::new(connect(s, "worker").await?);
        if s.amqp.declare_topology {
            topology::declare(&connection, s).await?;
        }
        let publisher = Arc::new(Publisher::new(connection.clone()));
        let channel = connection.create_channel().await?;
        let prefetch = s.prefetch();
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let tag = format!("imagegen-{}-{:08x}", std::process::id(), fastrand::u32(..));
        let mut consumer = channel
            .basic_consume(
                s.amqp.jobs_queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        info!(
            broker = %s.amqp_url_redacted(),
            queue = %s.amqp.jobs_queue,
            prefetch,
            concurrency = s.worker.concurrency,
            provider = self.provider_name,
            storage = self.pipeline.store().location(),
            "worker started"
        );

        // Cancelled when the worker stops taking jobs (shutdown or pause): jobs that have not
        // reached the provider yet go back to the queue.
        let halt = CancellationToken::new();
        let tracker = TaskTracker::new();
        let (stop_tx, mut stop_rx) = mpsc::channel::<(StopReason, String)>(1);
        let mut paused: Option<StopReason> = None;
        let mut consuming = true;
        let mut reminder = tokio::time::interval(Duration::from_secs(60));
        let mut failure: Option<anyhow::Error> = None;

        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                Some((reason, message)) = stop_rx.recv(), if paused.is_none() => {
                    error!(%reason, error = %message,
                        "PROVIDER REFUSES ALL REQUESTS: the worker stops taking jobs; its jobs go back to the queue untouched. \
                         Fix the account (quota, billing, credentials) and restart the worker.");
                    paused = Some(reason);
                    halt.cancel();
                    if let Err(e) = channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await {
                        warn!(error = %e, "cancelling the consumer failed");
                    }
                    reminder.reset();
                }
                _ = reminder.tick(), if paused.is_some() => {
                    warn!(reason = %paused.map(|r| r.to_string()).unwrap_or_default(), "worker is paused and takes no jobs");
                }
                delivery = consumer.next(), if consuming => match delivery {
                    Some(Ok(delivery)) => {
                        if halt.is_cancelled() {
                            nack(&delivery, "paused").await;
                            continue;
                        }
                        let task = handle(
                            delivery,
                            self.pipeline.clone(),
                            publisher.clone(),
                            s.amqp.results_exchange.clone(),
                            halt.clone(),
                            stop_tx.clone(),
                        );
                        tracker.spawn(task);
                    }
                    Some(Err(e)) => {
                        failure = Some(anyhow::anyhow!("consuming from {} failed: {e}", s.amqp.jobs_queue));
                        break;
                    }
                    None => {
                        consuming = false;
                        if paused.is_none() {
                            failure = Some(anyhow::anyhow!("the broker cancelled the consumer of {}", s.amqp.jobs_queue));
                            break;
                        }
                    }
                },
            }
        }

        info!(
            in_flight = tracker.len(),
            "stopping: no new jobs; waiting for in-flight jobs"
        );
        halt.cancel();
        if consuming && paused.is_none() && failure.is_none() {
            let _ = channel
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        }
        tracker.close();
        let grace = s.shutdown_grace();
        if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
            warn!(
                still_running = tracker.len(),
                grace_secs = grace.as_secs(),
                "grace period over: returning the remaining jobs to the queue (a provider call still running may be paid again)"
            );
        }
        // Closing the channel returns every unacknowledged message to the queue.
        let _ = channel.close(200, "worker stopping".into()).await;
        publisher.close().await;
        let _ = connection.close(200, "worker stopping".into()).await;
        match failure {
            Some(e) => Err(e),
            None => {
                info!("worker stopped");
                Ok(WorkerExit::Shutdown)
            }
        }
    }
}

async fn handle(
    delivery: AmqpDelivery,
    pipeline: Arc<Pipeline>,
    publisher: Arc<Publisher>,
    exchange: String,
    halt: CancellationToken,
    stop: mpsc::Sender<(StopReason, String)>,
) {
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_string());
    let outcome = pipeline
        .process(
            Delivery {
                body: &delivery.data,
                message_id: message_id.as_deref(),
            },
            &halt,
        )
        .await;
    match outcome {
        Outcome::Finished { event, settle } => {
            match publisher.publish_event(&exchange, &event).await {
                Ok(()) => {
                    let settled = match settle {
                        Settle::Ack => delivery.acker.ack(BasicAckOptions::default()).await,
                        Settle::DeadLetter => {
                            delivery
                                .acker
                                .reject(BasicRejectOptions { requeue: false })
                                .await
                        }
                    };
                    match settled {
                        Ok(true) => {}
                        Ok(false) => warn!(job_id = %event.data.job_id,
                        "the channel that delivered the job is gone: it will be redelivered (its result is stored)"),
                        Err(e) => warn!(job_id = %event.data.job_id, error = %e,
                        "settling the job failed: it will be redelivered (its result is stored)"),
                    }
                }
                Err(e) => {
                    error!(job_id = %event.data.job_id, error = %e, "result event not confirmed: returning the job to the queue");
                    // Do not spin on a broker that refuses events.
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    nack(&delivery, "event not confirmed").await;
                }
            }
        }
        Outcome::Return { reason } => {
            if let ReturnReason::Stop { reason, message } = reason {
                let _ = stop.try_send((reason, message));
            }
            nack(&delivery, "returned").await;
        }
    }
}

/// Returns a message to the queue untouched.
async fn nack(delivery: &AmqpDelivery, why: &str) {
    let options = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    if let Err(e) = delivery.acker.nack(options).await {
        warn!(error = %e, why, "returning the message failed: the broker returns it when the channel closes");
    }
}

//! The worker: consumes jobs, runs each through the [`Pipeline`], and settles its message only
//! after the job's event is confirmed by the broker.
//!
//! - ack: the job succeeded (or its stored result was published again);
//! - dead-letter: the job failed for good and its `job.failed` event is out. The worker publishes
//!   the message to the dead-letter queue itself (with confirm), adding headers that say why, then
//!   acks it; should that publish fail, it rejects the message and the queue's own dead-lettering
//!   takes it (without the headers);
//! - defer: a wait too long to hold the message: the job goes to a delay queue (with confirm),
//!   carrying its count of failed attempts, then the original is acked;
//! - return (nack with requeue): the worker stops taking jobs (quota, credentials, a blocked
//!   broker, shutdown) or the event could not be confirmed. Not a failed attempt.
//!
//! A lost connection or channel is re-opened with backoff; topology, prefetch and consumer are
//! set up again. A provider that refuses all requests pauses the worker: it cancels its consumer,
//! then takes ONE real job every `worker.pause_probe_secs` and resumes when that job gets through.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures_util::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions, BasicRejectOptions,
};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Channel, Connection, Consumer, Event};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{error, info, warn};

use super::publisher::Publisher;
use super::{connect, topology};
use crate::config::Settings;
use crate::error::StopReason;
use crate::event::EventError;
use crate::pipeline::{Delivery, Outcome, Pipeline, ReturnReason, Settle};

/// Header carrying the count of provider attempts that really failed, across deliveries.
pub const ATTEMPTS_HEADER: &str = "x-imagegen-attempts";
/// Headers the worker adds when it dead-letters a job.
pub const ERROR_KIND_HEADER: &str = "x-imagegen-error-kind";
pub const ERROR_MESSAGE_HEADER: &str = "x-imagegen-error";

/// How the worker ended.
#[derive(Debug, Clone, PartialEq)]
pub enum WorkerExit {
    /// Stopped on request; in-flight jobs finished or were returned.
    Shutdown,
}

/// Why the worker takes no jobs for now.
#[derive(Debug, Clone, PartialEq)]
enum Pause {
    /// The provider refuses every request: probe with one job now and then.
    Provider(StopReason),
    /// The broker blocks publishers (memory or disk alarm): wait for it to unblock.
    BrokerBlocked(String),
    /// This worker spent its cap: paused until restarted.
    Budget,
}

/// What became of one message.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Handled {
    Settled,
    Returned,
    /// Returned because the provider refuses all requests.
    Stopped,
}

pub struct Worker {
    settings: Settings,
    pipeline: Arc<Pipeline>,
    provider_name: &'static str,
    health: Arc<crate::http::Health>,
}

/// What a session needs to handle messages.
#[derive(Clone)]
struct Context {
    pipeline: Arc<Pipeline>,
    publisher: Arc<Publisher>,
    settings: Arc<Settings>,
    stop: mpsc::Sender<(StopReason, String)>,
}

impl Worker {
    /// Builds the configured provider and store, checks that the store is usable, opens the
    /// spool, and turns on cross-process job leases when the store honours conditional writes.
    pub async fn from_settings(settings: Settings) -> anyhow::Result<Self> {
        // Before anything records a metric.
        crate::metrics::install();
        let provider = crate::provider::from_settings(&settings)?;
        let store = crate::storage::from_settings(&settings).await?;
        store.check().await?;
        let conditional =
            crate::storage::probe_conditional_put(&*store, &settings.storage.prefix).await?;
        let mut pipeline = Pipeline::new(&settings, provider, store.clone());
        if let Some(budget) = crate::budget::Budget::from_settings(&settings, store) {
            info!(
                max_worker_usd = settings.budget.max_worker_usd,
                max_batch_usd = settings.budget.max_batch_usd,
                "spend caps on"
            );
            pipeline = pipeline.with_budget(budget);
        }
        if !settings.spool.dir.as_os_str().is_empty() {
            let spool = crate::spool::Spool::open(&settings.spool.dir, settings.spool.max_bytes)
                .map_err(|e| {
                    anyhow::anyhow!(
                        "spool.dir {} cannot be used: {e}",
                        settings.spool.dir.display()
                    )
                })?;
            if spool.used_bytes() > 0 {
                info!(
                    bytes = spool.used_bytes(),
                    "spooled images from an earlier run wait for upload"
                );
            }
            pipeline = pipeline.with_spool(spool);
        }
        if conditional {
            let owner = format!(
                "{}-{}-{:08x}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()),
                std::process::id(),
                fastrand::u32(..)
            );
            let ttl = Duration::from_secs(settings.worker.lease_secs);
            pipeline = pipeline.with_leases(owner, ttl, settings.worker.max_lease_takeovers);
            info!("cross-process job leases on: the store honours conditional writes");
        } else {
            warn!(
                "the store ignores conditional writes (If-None-Match): no cross-process job leases; \
                 two workers given the same job at the same moment may both pay for it"
            );
        }
        Ok(Self::new(settings, pipeline))
    }

    pub fn new(settings: Settings, pipeline: Pipeline) -> Self {
        crate::metrics::install();
        crate::metrics::paused(None);
        Self {
            provider_name: pipeline.provider_name(),
            settings,
            pipeline: Arc::new(pipeline),
            health: Arc::default(),
        }
    }

    /// What the HTTP listener reports.
    pub fn health(&self) -> &Arc<crate::http::Health> {
        &self.health
    }

    /// Consumes jobs until `shutdown` is cancelled, then stops taking jobs, lets in-flight jobs
    /// finish within `worker.shutdown_grace_secs`, and returns the rest to the queue. A broker
    /// connection lost after start-up is re-opened with backoff; a failure before the first
    /// consumer is registered (wrong URL, credentials, missing queue) is returned.
    pub async fn run(self, shutdown: CancellationToken) -> anyhow::Result<WorkerExit> {
        let tracker = TaskTracker::new();
        let pipeline = self.pipeline.clone();
        let every = Duration::from_secs(self.settings.limits.log_every_secs);
        let _throttle_log = tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
            pipeline.throttle().report(every).await;
        }));
        let _http = if self.settings.http.listen.is_empty() {
            None
        } else {
            let (_, server) =
                crate::http::serve(&self.settings.http.listen, self.health.clone()).await?;
            Some(tokio_util::task::AbortOnDropHandle::new(tokio::spawn(
                server,
            )))
        };
        let mut reconnects = reconnect_backoff();
        let mut consumed_once = false;
        loop {
            let mut consuming = false;
            match self.session(&shutdown, &tracker, &mut consuming).await {
                Ok(()) => return Ok(WorkerExit::Shutdown),
                Err(e) if !consumed_once && !consuming => return Err(e),
                Err(e) => {
                    consumed_once = true;
                    self.health.set_broker_connected(false);
                    crate::metrics::reconnect();
                    if consuming {
                        reconnects = reconnect_backoff();
                    }
                    let wait = reconnects.next().unwrap_or(Duration::from_secs(30));
                    warn!(error = %format!("{e:#}"), retry_in_ms = wait.as_millis() as u64,
                        "broker connection lost: reconnecting (unacknowledged jobs return to the queue)");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = shutdown.cancelled() => {
                            wait_for_tasks(&tracker, self.settings.shutdown_grace()).await;
                            return Ok(WorkerExit::Shutdown);
                        }
                    }
                }
            }
        }
    }

    /// Registers a consumer, with a tag of its own (a tag is not reused after a cancel).
    async fn consume(&self, channel: &Channel) -> Result<Consumer, lapin::Error> {
        let tag = format!("imagegen-{}-{:08x}", std::process::id(), fastrand::u32(..));
        channel
            .basic_consume(
                self.settings.amqp.jobs_queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
    }

    /// One connection's life. `Ok` on shutdown; `Err` when the connection or channel is lost.
    async fn session(
        &self,
        shutdown: &CancellationToken,
        tracker: &TaskTracker,
        consuming: &mut bool,
    ) -> anyhow::Result<()> {
        let s = &self.settings;
        let connection: Arc<Connection> = Arc::new(connect(s, "worker").await?);
        if s.amqp.declare_topology {
            topology::declare(&connection, s).await?;
        }
        let mut broker_events = connection.events_listener();
        let publisher = Arc::new(Publisher::new(connection.clone()));
        publisher.open().await?;
        let channel = connection.create_channel().await?;
        let prefetch = s.prefetch();
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = Some(self.consume(&channel).await?);
        *consuming = true;
        self.health.set_broker_connected(true);
        info!(
            broker = %s.amqp_url_redacted(),
            queue = %s.amqp.jobs_queue,
            prefetch,
            concurrency = s.worker.concurrency,
            provider = self.provider_name,
            storage = self.pipeline.store().location(),
            "worker consuming"
        );

        let (stop_tx, mut stop_rx) = mpsc::channel::<(StopReason, String)>(4);
        let context = Context {
            pipeline: self.pipeline.clone(),
            publisher: publisher.clone(),
            settings: Arc::new(s.clone()),
            stop: stop_tx,
        };
        // Cancelled when the worker stops taking jobs (shutdown or pause): jobs that have not
        // reached the provider yet go back to the queue.
        let mut halt = CancellationToken::new();
        let mut pause: Option<Pause> = None;
        let mut probe = tokio::time::interval(Duration::from_secs(s.worker.pause_probe_secs));
        let mut reminder = tokio::time::interval(Duration::from_secs(60));
        let lost: Option<anyhow::Error> = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                Some((reason, message)) = stop_rx.recv() => {
                    if pause.is_none() {
                        if reason == StopReason::BudgetExhausted {
                            error!(%reason, error = %message,
                                "SPEND CAP REACHED: the worker stops taking jobs and returns them \
                                 untouched; restart it (with a higher budget.max_worker_usd) to resume");
                            pause = Some(Pause::Budget);
                            self.health.set_paused(Some("budget_exhausted"));
                        } else {
                            let what = match reason {
                                StopReason::StorageUnavailable => "STORAGE KEEPS FAILING",
                                _ => "PROVIDER REFUSES ALL REQUESTS (quota, billing or credentials)",
                            };
                            error!(%reason, error = %message,
                                "{what}: the worker stops taking jobs and returns them untouched; \
                                 it tries one job every {} s and resumes by itself when it gets through",
                                s.worker.pause_probe_secs);
                            pause = Some(Pause::Provider(reason));
                            self.health.set_paused(Some(&reason.to_string()));
                        }
                        halt.cancel();
                        cancel_consumer(&channel, &mut consumer).await;
                        probe.reset();
                        reminder.reset();
                    }
                }
                Some(event) = broker_events.next() => match event {
                    Event::ConnectionBlocked(why) => {
                        warn!(reason = %why, "the broker blocks publishers (resource alarm): pausing");
                        if pause.is_none() {
                            pause = Some(Pause::BrokerBlocked(why));
                            self.health.set_paused(Some("broker_blocked"));
                            halt.cancel();
                            cancel_consumer(&channel, &mut consumer).await;
                        }
                    }
                    Event::ConnectionUnblocked => {
                        if matches!(pause, Some(Pause::BrokerBlocked(_))) {
                            info!("the broker accepts publishes again: resuming");
                            pause = None;
                            self.health.set_paused(None);
                            halt = CancellationToken::new();
                            consumer = Some(self.consume(&channel).await?);
                        }
                    }
                    Event::Error(e) => break Some(anyhow::anyhow!("connection error: {e}")),
                    _ => {}
                },
                _ = probe.tick(), if matches!(pause, Some(Pause::Provider(_))) => {
                    let Some(message) = channel
                        .basic_get(s.amqp.jobs_queue.as_str().into(), BasicGetOptions { no_ack: false })
                        .await?
                    else {
                        continue;
                    };
                    info!("paused: probing with one real job");
                    let fresh = CancellationToken::new();
                    // A stop request does not wait for the probe: the unsettled job goes back to
                    // the queue when the channel closes.
                    let handled = tokio::select! {
                        handled = handle(message.delivery, context.clone(), fresh.clone()) => handled,
                        _ = shutdown.cancelled() => break None,
                    };
                    if handled != Handled::Stopped {
                        info!("the probe job got through: resuming");
                        pause = None;
                        self.health.set_paused(None);
                        halt = fresh;
                        consumer = Some(self.consume(&channel).await?);
                    }
                }
                _ = reminder.tick(), if pause.is_some() => {
                    warn!(pause = ?pause, "worker is paused and takes no jobs");
                }
                delivery = next_delivery(&mut consumer), if consumer.is_some() => match delivery {
                    Some(Ok(delivery)) => {
                        if halt.is_cancelled() {
                            nack(&delivery, "paused").await;
                            continue;
                        }
                        tracker.spawn(handle(delivery, context.clone(), halt.clone()));
                    }
                    Some(Err(e)) => break Some(anyhow::anyhow!("consuming from {} failed: {e}", s.amqp.jobs_queue)),
                    None => {
                        consumer = None;
                        if pause.is_none() {
                            break Some(anyhow::anyhow!("the broker cancelled the consumer of {}", s.amqp.jobs_queue));
                        }
                    }
                },
            }
        };
        if let Some(e) = lost {
            self.health.set_broker_connected(false);
            // The broker returns this connection's unacknowledged messages by itself.
            let _ = connection.close(200, "reconnecting".into()).await;
            return Err(e);
        }

        info!(
            in_flight = tracker.len(),
            "stopping: no new jobs; waiting for in-flight jobs"
        );
        halt.cancel();
        cancel_consumer(&channel, &mut consumer).await;
        wait_for_tasks(tracker, s.shutdown_grace()).await;
        // Closing the channel returns every unacknowledged message to the queue.
        let _ = channel.close(200, "worker stopping".into()).await;
        publisher.close().await;
        let _ = connection.close(200, "worker stopping".into()).await;
        info!("worker stopped");
        Ok(())
    }
}

fn reconnect_backoff() -> impl Iterator<Item = Duration> {
    backon::ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(500))
        .with_max_delay(Duration::from_secs(30))
        .with_jitter()
        .without_max_times()
        .build()
}

async fn next_delivery(consumer: &mut Option<Consumer>) -> Option<lapin::Result<AmqpDelivery>> {
    match consumer {
        Some(c) => c.next().await,
        None => std::future::pending().await,
    }
}

/// Cancels the consumer, then gives back the messages the broker had already sent it: they sit
/// in the client's buffer and would otherwise stay unacknowledged for as long as the channel
/// lives.
async fn cancel_consumer(channel: &Channel, consumer: &mut Option<Consumer>) {
    let Some(mut c) = consumer.take() else { return };
    if let Err(e) = channel
        .basic_cancel(c.tag(), BasicCancelOptions::default())
        .await
    {
        warn!(error = %e, "cancelling the consumer failed");
        return;
    }
    while let Ok(Some(Ok(delivery))) = tokio::time::timeout(Duration::from_secs(2), c.next()).await
    {
        nack(&delivery, "consumer cancelled").await;
    }
}

async fn wait_for_tasks(tracker: &TaskTracker, grace: Duration) {
    tracker.close();
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        warn!(
            still_running = tracker.len(),
            grace_secs = grace.as_secs(),
            "grace period over: returning the remaining jobs to the queue (a provider call still running may be paid again)"
        );
    }
}

/// The count of failed attempts a message carries.
fn attempts_of(properties: &BasicProperties) -> u32 {
    let value = properties
        .headers()
        .as_ref()
        .and_then(|h| h.inner().get(ATTEMPTS_HEADER).cloned());
    match value {
        Some(AMQPValue::LongInt(n)) => n.max(0) as u32,
        Some(AMQPValue::LongLongInt(n)) => n.clamp(0, u32::MAX as i64) as u32,
        Some(AMQPValue::LongUInt(n)) => n,
        Some(AMQPValue::ShortInt(n)) => n.max(0) as u32,
        Some(AMQPValue::ShortUInt(n)) => n as u32,
        Some(AMQPValue::ShortShortInt(n)) => n.max(0) as u32,
        Some(AMQPValue::ShortShortUInt(n)) => n as u32,
        Some(AMQPValue::LongString(s)) => s.to_string().parse().unwrap_or(0),
        _ => 0,
    }
}

/// The message's properties with `headers` set (others kept).
fn with_headers(properties: &BasicProperties, headers: &[(&str, AMQPValue)]) -> BasicProperties {
    let mut table = properties.headers().clone().unwrap_or_default();
    for (k, v) in headers {
        table.insert((*k).into(), v.clone());
    }
    properties.clone().with_headers(table)
}

/// Counts a job in flight for as long as it lives.
struct InFlight;

impl InFlight {
    fn new() -> Self {
        crate::metrics::jobs_in_flight(1.0);
        Self
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        crate::metrics::jobs_in_flight(-1.0);
    }
}

async fn handle(delivery: AmqpDelivery, cx: Context, halt: CancellationToken) -> Handled {
    let _in_flight = InFlight::new();
    let message_id = delivery
        .properties
        .message_id()
        .as_ref()
        .map(|m| m.as_str().to_string());
    let attempts = attempts_of(&delivery.properties);
    let outcome = cx
        .pipeline
        .process(
            Delivery {
                body: &delivery.data,
                message_id: message_id.as_deref(),
                attempts,
            },
            &halt,
        )
        .await;
    let a = &cx.settings.amqp;
    match outcome {
        Outcome::Finished { event, settle } => {
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
            crate::metrics::job_finished(
                event.data.status == crate::event::Status::Succeeded,
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
        Outcome::Defer { after, attempts } => {
            let (queue, tier) = cx.settings.delay_queue(after);
            let properties = with_headers(
                &delivery.properties,
                &[(
                    ATTEMPTS_HEADER,
                    AMQPValue::LongInt(attempts.min(i32::MAX as u32) as i32),
                )],
            );
            match cx
                .publisher
                .publish("", &queue, &delivery.data, properties)
                .await
            {
                Ok(()) => {
                    info!(queue = %queue, tier_secs = tier.as_secs(), attempts, "job delayed");
                    crate::metrics::delayed();
                    if let Err(e) = delivery.acker.ack(BasicAckOptions::default()).await {
                        warn!(error = %e, "acking a delayed job failed: it may run twice (its result is idempotent)");
                    }
                    Handled::Settled
                }
                Err(e) => {
                    error!(error = %e, queue = %queue, "could not delay the job: returning it to the queue");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    nack(&delivery, "delay failed").await;
                    Handled::Returned
                }
            }
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

/// Publishes a failed job to the dead-letter queue with headers saying why, then acks it. If that
/// publish fails, rejects it instead: the queue's own dead-lettering takes it.
async fn dead_letter(
    delivery: &AmqpDelivery,
    cx: &Context,
    error: Option<&EventError>,
    attempts: u32,
) -> lapin::Result<bool> {
    let (kind, message) = error
        .map(|e| {
            (
                e.kind.as_str(),
                e.message.chars().take(1000).collect::<String>(),
            )
        })
        .unwrap_or(("unknown", String::new()));
    let properties = with_headers(
        &delivery.properties,
        &[
            (
                ERROR_KIND_HEADER,
                AMQPValue::LongString(LongString::from(kind)),
            ),
            (
                ERROR_MESSAGE_HEADER,
                AMQPValue::LongString(LongString::from(message)),
            ),
            (
                ATTEMPTS_HEADER,
                AMQPValue::LongInt(attempts.min(i32::MAX as u32) as i32),
            ),
        ],
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
async fn nack(delivery: &AmqpDelivery, why: &str) {
    let options = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    if let Err(e) = delivery.acker.nack(options).await {
        warn!(error = %e, why, "returning the message failed: the broker returns it when the channel closes");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempts_header_reads_any_integer_type() {
        let props =
            |v: AMQPValue| with_headers(&BasicProperties::default(), &[(ATTEMPTS_HEADER, v)]);
        assert_eq!(attempts_of(&BasicProperties::default()), 0);
        assert_eq!(attempts_of(&props(AMQPValue::LongInt(3))), 3);
        assert_eq!(attempts_of(&props(AMQPValue::LongLongInt(4))), 4);
        assert_eq!(attempts_of(&props(AMQPValue::ShortShortUInt(2))), 2);
        assert_eq!(attempts_of(&props(AMQPValue::LongInt(-1))), 0);
        assert_eq!(attempts_of(&props(AMQPValue::LongString("5".into()))), 5);
    }
}

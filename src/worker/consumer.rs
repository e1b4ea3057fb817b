//! The consumer loop: one broker connection's life. It takes jobs from the jobs queue (bounded by
//! the prefetch), runs each in a task of its own ([`super::settle`]), holds the jobs that wait at
//! their provider until they are looked at again, and pauses and resumes.
//!
//! A lost connection or channel is re-opened with backoff; topology, prefetch and consumer are
//! set up again. When nothing will work until an operator acts (every provider refuses all
//! requests, storage keeps failing), the worker cancels its consumer, then takes ONE real job
//! every `worker.pause_probe_secs` and resumes when that job gets through. When only some
//! providers are paused, the worker goes on: their jobs wait in the delay queues.

use std::sync::Arc;
use std::time::Duration;

use backon::BackoffBuilder;
use futures_util::StreamExt;
use lapin::message::Delivery as AmqpDelivery;
use lapin::options::{BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lapin::{Channel, Connection, Consumer, Event};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tokio_util::time::DelayQueue;
use tracing::{error, info, warn};

use super::health::Health;
use super::pipeline::Pipeline;
use super::settle::{Context, Handled, Waiting, handle, nack};
use crate::amqp::headers::HeaderSeal;
use crate::amqp::publisher::Publisher;
use crate::amqp::{connect, topology};
use crate::config::Settings;
use crate::domain::error::StopReason;

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

pub struct Worker {
    settings: Settings,
    pipeline: Arc<Pipeline>,
    health: Arc<Health>,
    /// Seals the worker's own headers and checks them on delivery.
    seal: Arc<HeaderSeal>,
    /// The batch lane, when there is one: this worker takes part in its collector role.
    lane: Option<Arc<super::lane::Lane>>,
}

impl Worker {
    /// A worker of a pipeline built from `settings` (see [`Worker::from_settings`]).
    pub fn new(settings: Settings, pipeline: Pipeline) -> Self {
        super::metrics::install();
        super::metrics::paused(None);
        for route in pipeline.routes().iter() {
            super::metrics::provider_paused(&route.name, None);
        }
        let health = Arc::new(Health::default());
        if let Some(memory) = pipeline.routes().memory() {
            health.watch_answer_memory(memory.clone());
        }
        let seal = Arc::new(HeaderSeal::new(&settings.amqp.header_key));
        let pipeline = Arc::new(pipeline);
        let lane = super::lane::Lane::new(Arc::new(settings.clone()), pipeline.clone(), seal.clone())
            .unwrap_or_else(|e| {
                error!(error = %format!("{e:#}"), "the batch lane cannot start: its jobs wait in the store");
                None
            });
        Self {
            seal,
            settings,
            pipeline,
            health,
            lane,
        }
    }

    /// What the HTTP listener reports.
    pub fn health(&self) -> &Arc<Health> {
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
            futures_util::future::join_all(
                pipeline.routes().iter().map(|r| r.throttle.report(every)),
            )
            .await;
        }));
        let _http = if self.settings.http.listen.is_empty() {
            None
        } else {
            let (_, server) =
                super::health::serve(&self.settings.http.listen, self.health.clone()).await?;
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
                // At start-up, only a refusal that retrying cannot fix (credentials, virtual
                // host, on every address) is final; an unreachable broker is waited for.
                Err(e) if !consumed_once && !consuming && !crate::amqp::worth_retrying(&e) => {
                    return Err(e);
                }
                Err(e) => {
                    consumed_once = true;
                    self.health.set_broker_connected(false);
                    super::metrics::reconnect();
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
        // The lane's collector role, for as long as this connection lives (a consumer of the
        // ticks that fails, its queue missing say, is registered again after a while).
        let _lane = self.lane.clone().map(|lane| {
            let (connection, publisher) = (connection.clone(), publisher.clone());
            tokio_util::task::AbortOnDropHandle::new(tokio::spawn(async move {
                loop {
                    if let Err(e) = lane
                        .clone()
                        .collect_ticks(connection.clone(), publisher.clone())
                        .await
                    {
                        if !connection.status().connected() {
                            return;
                        }
                        error!(error = %format!("{e:#}"),
                            "the lane's collector cannot take its ticks: lane jobs wait in the store; trying again in 30 s");
                    }
                    tokio::time::sleep(Duration::from_secs(30)).await;
                }
            }))
        });
        let channel = connection.create_channel().await?;
        let prefetch = s.prefetch();
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await?;
        let mut consumer = Some(self.consume(&channel).await?);
        *consuming = true;
        self.health.set_broker_connected(true);
        let providers: Vec<&str> = self
            .pipeline
            .routes()
            .iter()
            .map(|r| r.name.as_str())
            .collect();
        info!(
            broker = %s.amqp_url_redacted(),
            queue = %s.amqp.jobs_queue,
            prefetch,
            concurrency = s.concurrency(),
            providers = %providers.join(","),
            default_provider = self.pipeline.routes().default_name(),
            storage = self.pipeline.store().location(),
            "worker consuming"
        );

        let (stop_tx, mut stop_rx) = mpsc::channel::<(StopReason, String)>(4);
        let (waiting_tx, mut waiting_rx) = mpsc::unbounded_channel::<Waiting>();
        // Jobs waiting at their provider, until it said to look again.
        let mut waiting: DelayQueue<(AmqpDelivery, Instant)> = DelayQueue::new();
        let context = Context {
            pipeline: self.pipeline.clone(),
            seal: self.seal.clone(),
            publisher: publisher.clone(),
            settings: Arc::new(s.clone()),
            stop: stop_tx,
            waiting: waiting_tx,
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
                                StopReason::StorageRefused => "STORAGE REFUSES THE WORKER (credentials, bucket)",
                                _ => "EVERY PROVIDER REFUSES ALL REQUESTS (quota, billing or credentials)",
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
                        handled = handle(message.delivery, context.clone(), fresh.clone(), true, Instant::now()) => handled,
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
                Some(w) = waiting_rx.recv() => {
                    waiting.insert((w.delivery, w.held_since), w.after);
                }
                Some(expired) = futures_util::StreamExt::next(&mut waiting), if !waiting.is_empty() => {
                    let (delivery, held_since) = expired.into_inner();
                    if halt.is_cancelled() {
                        nack(&delivery, "paused").await;
                        continue;
                    }
                    tracker.spawn(handle(delivery, context.clone(), halt.clone(), false, held_since));
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
                        tracker.spawn(handle(delivery, context.clone(), halt.clone(), false, Instant::now()));
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
        // Jobs waiting at their provider go back when the channel closes: their handles are in
        // their journals, so whoever gets them polls instead of submitting again.
        drop(waiting);
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

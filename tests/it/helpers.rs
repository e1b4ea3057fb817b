//! `TestEnv`: settings with unique names, a fake image API, and handles on the real services.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use imagegen::amqp::results::ResultListener;
use imagegen::amqp::{connect, topology};
use imagegen::config::{Settings, Sources};
use imagegen::domain::event::CloudEvent;
use imagegen::storage::ObjectStore;
use imagegen::worker::Worker;
use imagegen_fakes::openai::{FakeApi, FakeOptions, FakeServer};
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicGetOptions, ExchangeDeleteOptions,
    QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection};
use secrecy::ExposeSecret;
use serde_json::Value;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// The dev services that `scripts/services.sh` starts (overridable by environment).
pub fn amqp_url() -> String {
    std::env::var("IMAGEGEN_TEST_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}
pub const S3_ENDPOINT: &str = "http://127.0.0.1:3900";
pub const S3_BUCKET: &str = "imagegen-dev";
pub const S3_KEY_ID: &str = "GK1d3a9e0c5b7f2a4e6c8d0b1f";
pub const S3_SECRET: &str = "9f8e7d6c5b4a39281706f5e4d3c2b1a09f8e7d6c5b4a39281706f5e4d3c2b1a0";

#[derive(Clone, Copy, PartialEq)]
pub enum Store {
    S3,
    Fs,
}

pub struct TestEnv {
    pub id: String,
    pub settings: Settings,
    pub fake: FakeServer,
    pub connection: Connection,
    _spool: tempfile::TempDir,
    _dir: Option<tempfile::TempDir>,
}

pub struct RunningWorker {
    pub stop: CancellationToken,
    pub task: JoinHandle<anyhow::Result<imagegen::worker::WorkerExit>>,
}

impl RunningWorker {
    pub async fn shutdown(self) -> anyhow::Result<imagegen::worker::WorkerExit> {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("worker stops within 60 s")
            .expect("worker task")
    }
}

impl TestEnv {
    pub async fn new(store: Store) -> Self {
        Self::with(store, &[]).await
    }

    /// Settings: the real defaults, then unique names, the fake API, fast retries, then `extra`.
    pub async fn with(store: Store, extra: &[(&str, String)]) -> Self {
        imagegen::install_crypto_provider();
        let _ = tracing_subscriber::fmt()
            .with_env_filter(std::env::var("TEST_LOG").unwrap_or_else(|_| "imagegen=debug".into()))
            .with_test_writer()
            .try_init();
        let id = format!("{:016x}", fastrand::u64(..));
        let fake = FakeApi::new(FakeOptions::default())
            .start()
            .await
            .expect("fake API starts");
        let dir = (store == Store::Fs).then(|| tempfile::tempdir().expect("temp dir"));
        let spool = tempfile::tempdir().expect("temp dir");
        let mut overrides: Vec<(&str, String)> = vec![
            ("amqp.url", amqp_url()),
            ("amqp.jobs_queue", format!("it.{id}.jobs")),
            ("amqp.dead_letter_queue", format!("it.{id}.dead")),
            ("amqp.results_exchange", format!("it.{id}.results")),
            ("amqp.results_queue", format!("it.{id}.results")),
            ("providers.openai.kind", "openai".into()),
            ("providers.openai.base_url", fake.base_url()),
            ("providers.openai.api_key", "sk-test-key".into()),
            ("worker.concurrency", "4".into()),
            ("retry.initial_delay_ms", "20".into()),
            ("retry.max_delay_ms", "200".into()),
            ("storage.prefix", format!("it/{id}/")),
            ("spool.dir", spool.path().display().to_string()),
            // Short leases: a killed worker's jobs are taken over within seconds.
            ("worker.lease_secs", "3".into()),
            // Many workers run at once: only the tests of the listener open one.
            ("http.listen", String::new()),
        ];
        match store {
            Store::S3 => overrides.extend([
                ("storage.kind", "s3".into()),
                ("storage.bucket", S3_BUCKET.into()),
                ("storage.endpoint_url", S3_ENDPOINT.into()),
                ("storage.region", "garage".into()),
                ("storage.access_key_id", S3_KEY_ID.into()),
                ("storage.secret_access_key", S3_SECRET.into()),
            ]),
            Store::Fs => overrides.extend([
                ("storage.kind", "fs".into()),
                (
                    "storage.root",
                    dir.as_ref().unwrap().path().display().to_string(),
                ),
            ]),
        }
        overrides.extend(extra.iter().cloned());
        let mut settings = Settings::load_with_overrides(&Sources::default(), &overrides)
            .expect("test settings are valid");
        // Short delay tiers keep delayed-retry tests quick (and fewer queues per test).
        settings.amqp.delay_tiers_secs = vec![1, 3];
        settings.amqp.connection_name = format!("it-{id}");
        // One fleet: every worker of the test, in this process or its own, shares the key.
        settings.amqp.header_key = format!("it-{id}-header-key").into();
        settings.validate().expect("test settings are valid");
        let connection = connect(&settings, "test")
            .await
            .expect("RabbitMQ on 127.0.0.1:5672 (run `make services`)");
        // The test's queues expire when unused for 15 minutes, so that a test that fails midway
        // (and never reaches its cleanup) leaves nothing behind for long. Created here with the
        // worker's own arguments plus x-expires; the worker's declaration accepts them as they are.
        let expires = |mut args: FieldTable| {
            args.insert("x-expires".into(), AMQPValue::LongInt(15 * 60 * 1000));
            args
        };
        for (name, args) in topology::queues(&settings) {
            topology::ensure_queue(&connection, &name, expires(args))
                .await
                .expect("test queue");
        }
        topology::declare(&connection, &settings)
            .await
            .expect("topology");
        TestEnv {
            id,
            settings,
            fake,
            connection,
            _spool: spool,
            _dir: dir,
        }
    }

    pub fn fake(&self) -> &FakeApi {
        &self.fake.api
    }

    pub async fn store(&self) -> Arc<dyn ObjectStore> {
        imagegen::storage::from_settings(&self.settings)
            .await
            .expect("store")
    }

    pub async fn start_worker(&self) -> RunningWorker {
        self.start_worker_with(self.settings.clone()).await
    }

    pub async fn start_worker_with(&self, settings: Settings) -> RunningWorker {
        let worker = Worker::from_settings(settings)
            .await
            .expect("worker builds");
        let stop = CancellationToken::new();
        let task = tokio::spawn(worker.run(stop.clone()));
        RunningWorker { stop, task }
    }

    /// Listens to every event of this test's results exchange. Open it before publishing.
    pub async fn listen(&self) -> ResultListener {
        ResultListener::open(&self.connection, &self.settings.amqp.results_exchange, "#")
            .await
            .expect("listener")
    }

    /// Publishes a raw body to the jobs queue with plain lapin calls, as any AMQP client would
    /// (no imagegen code involved), and waits for the broker's confirm.
    pub async fn publish_raw(&self, body: &[u8], message_id: Option<&str>) {
        let mut props = BasicProperties::default()
            .with_content_type("application/json".into())
            .with_delivery_mode(2);
        if let Some(id) = message_id {
            props = props.with_message_id(id.into());
        }
        self.publish_with(body, props).await;
    }

    /// Publishes a job body with these properties, as any producer could.
    pub async fn publish_with(&self, body: &[u8], props: BasicProperties) {
        let channel = self.connection.create_channel().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        let confirm = channel
            .basic_publish(
                "".into(),
                self.settings.amqp.jobs_queue.as_str().into(),
                Default::default(),
                body,
                props,
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert!(confirm.is_ack(), "job published");
        let _ = channel.close(200, "ok".into()).await;
    }

    pub async fn publish(&self, job: Value) {
        self.publish_raw(&serde_json::to_vec(&job).unwrap(), None)
            .await;
    }

    /// Publishes many jobs on one channel, waiting for all the confirms at the end.
    pub async fn publish_many(&self, jobs: impl IntoIterator<Item = Value>) {
        let channel = self.connection.create_channel().await.unwrap();
        channel.confirm_select(Default::default()).await.unwrap();
        let mut confirms = Vec::new();
        for job in jobs {
            let props = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_delivery_mode(2);
            let confirm = channel
                .basic_publish(
                    "".into(),
                    self.settings.amqp.jobs_queue.as_str().into(),
                    Default::default(),
                    &serde_json::to_vec(&job).unwrap(),
                    props,
                )
                .await
                .unwrap();
            confirms.push(confirm);
        }
        for confirm in confirms {
            assert!(confirm.await.unwrap().is_ack(), "job published");
        }
        let _ = channel.close(200, "ok".into()).await;
    }

    /// Enqueues a text file of `prompts` (one a line) into `batch` with `imagegen enqueue --yes`,
    /// as a user would; returns the temporary directory the file is in.
    pub fn enqueue_prompts(&self, batch: &str, prompts: &[&str]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join(format!("{batch}.txt"));
        std::fs::write(&file, prompts.join("\n") + "\n").expect("prompts written");
        let out = self
            .command()
            .args(["enqueue", file.to_str().unwrap(), "--batch", batch, "--yes"])
            .output()
            .expect("enqueue runs");
        assert!(
            out.status.success(),
            "enqueue failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    }

    /// Waits for `n` events (fails the test after `wait`).
    pub async fn events(
        &self,
        listener: &mut ResultListener,
        n: usize,
        wait: Duration,
    ) -> Vec<CloudEvent> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut out = Vec::new();
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match listener.next(left).await.expect("listener") {
                Some(e) => out.push(e),
                None => panic!(
                    "only {} of {n} events arrived within {wait:?}: {out:#?}",
                    out.len()
                ),
            }
        }
        out
    }

    /// Messages ready in a queue (a passive declare).
    pub async fn ready(&self, queue: &str) -> u32 {
        let channel = self.connection.create_channel().await.unwrap();
        let q = channel
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .expect("queue exists");
        let _ = channel.close(200, "ok".into()).await;
        q.message_count()
    }

    /// Takes every message in the dead-letter queue (bodies and headers).
    pub async fn drain_dead_letters(&self) -> Vec<(Vec<u8>, BasicProperties)> {
        let channel = self.connection.create_channel().await.unwrap();
        let mut out = Vec::new();
        while let Some(message) = channel
            .basic_get(
                self.settings.amqp.dead_letter_queue.as_str().into(),
                BasicGetOptions::default(),
            )
            .await
            .unwrap()
        {
            message
                .delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
            out.push((
                message.delivery.data.clone(),
                message.delivery.properties.clone(),
            ));
        }
        let _ = channel.close(200, "ok".into()).await;
        out
    }

    /// Waits until the dead-letter queue holds `n` messages.
    pub async fn wait_dead_letters(&self, n: u32, wait: Duration) {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let have = self.ready(&self.settings.amqp.dead_letter_queue).await;
            if have >= n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{have} of {n} dead letters after {wait:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Reads every message of the results queue without removing... (it consumes and acks).
    pub async fn take_results_queue(&self, n: usize) -> Vec<CloudEvent> {
        let channel = self.connection.create_channel().await.unwrap();
        let mut consumer = channel
            .basic_consume(
                self.settings.amqp.results_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        let mut out = Vec::new();
        while out.len() < n {
            let d = tokio::time::timeout(Duration::from_secs(10), consumer.next())
                .await
                .expect("results queue message")
                .unwrap()
                .unwrap();
            d.acker.ack(BasicAckOptions::default()).await.unwrap();
            out.push(serde_json::from_slice(&d.data).unwrap());
        }
        let _ = channel.close(200, "ok".into()).await;
        out
    }

    /// The `imagegen` binary with this test's broker names in its environment (and nothing else).
    pub fn command(&self) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_imagegen"));
        let a = &self.settings.amqp;
        let tiers: Vec<String> = a.delay_tiers_secs.iter().map(u64::to_string).collect();
        cmd.env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("IMAGEGEN__AMQP__URL", amqp_url())
            .env("IMAGEGEN__AMQP__JOBS_QUEUE", &a.jobs_queue)
            .env("IMAGEGEN__AMQP__DEAD_LETTER_QUEUE", &a.dead_letter_queue)
            .env("IMAGEGEN__AMQP__RESULTS_EXCHANGE", &a.results_exchange)
            .env("IMAGEGEN__AMQP__RESULTS_QUEUE", &a.results_queue)
            .env("IMAGEGEN__AMQP__DELAY_TIERS_SECS", tiers.join(","))
            .env("IMAGEGEN__AMQP__CONNECTION_NAME", &a.connection_name)
            .env("IMAGEGEN__AMQP__HEADER_KEY", a.header_key.expose_secret())
            .env("IMAGEGEN__LOG__FORMAT", "json")
            .env("IMAGEGEN__HTTP__LISTEN", &self.settings.http.listen)
            .env("IMAGEGEN__STORAGE__PREFIX", &self.settings.storage.prefix)
            // The provider the test's own settings use: the fake API.
            .env("IMAGEGEN__PROVIDERS__OPENAI__KIND", "openai")
            .env(
                "IMAGEGEN__PROVIDERS__OPENAI__BASE_URL",
                self.fake.base_url(),
            )
            .env("IMAGEGEN__PROVIDERS__OPENAI__API_KEY", "sk-test")
            .env(
                "IMAGEGEN__WORKER__LEASE_SECS",
                self.settings.worker.lease_secs.to_string(),
            )
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        let st = &self.settings.storage;
        match st.kind {
            imagegen::config::StorageKind::Fs => {
                cmd.env("IMAGEGEN__STORAGE__KIND", "fs")
                    .env("IMAGEGEN__STORAGE__ROOT", &st.root);
            }
            imagegen::config::StorageKind::S3 => {
                cmd.env("IMAGEGEN__STORAGE__KIND", "s3")
                    .env("IMAGEGEN__STORAGE__BUCKET", &st.bucket)
                    .env("IMAGEGEN__STORAGE__ENDPOINT_URL", &st.endpoint_url)
                    .env("IMAGEGEN__STORAGE__REGION", &st.region)
                    .env("IMAGEGEN__STORAGE__ACCESS_KEY_ID", &st.access_key_id)
                    .env("IMAGEGEN__STORAGE__SECRET_ACCESS_KEY", S3_SECRET);
            }
        }
        cmd
    }

    /// A worker process on this test's queues, calling the fake API, with an `fs` store at `root`;
    /// `vars` are extra environment variables.
    pub fn spawn_worker(
        &self,
        root: &std::path::Path,
        vars: &[(&str, &str)],
    ) -> std::process::Child {
        let mut cmd = self.command();
        cmd.env("IMAGEGEN__STORAGE__KIND", "fs")
            .env("IMAGEGEN__STORAGE__ROOT", root)
            .env("IMAGEGEN__SPOOL__DIR", root.join(".spool"));
        for (k, v) in vars {
            cmd.env(k, v);
        }
        // IMAGEGEN_TEST_WORKER_LOGS=1 shows the workers' logs.
        let logs = std::env::var_os("IMAGEGEN_TEST_WORKER_LOGS").is_some();
        let stderr = if logs {
            std::process::Stdio::inherit()
        } else {
            std::process::Stdio::null()
        };
        // A test that panics does not leave its workers running: they get SIGKILL when the
        // thread that started them (the test's) ends.
        // SAFETY: prctl is async-signal-safe and touches nothing but the child's own settings.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.arg("worker")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("worker process starts")
    }

    /// Waits until `n` consumers are registered on the jobs queue.
    pub async fn wait_consumers(&self, n: u32) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let channel = self.connection.create_channel().await.unwrap();
            let q = channel
                .queue_declare(
                    self.settings.amqp.jobs_queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await
                .unwrap();
            let _ = channel.close(200, "ok".into()).await;
            if q.consumer_count() == n {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} of {n} consumers",
                q.consumer_count()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Opens a new connection (after the broker was restarted).
    pub async fn reconnect(&mut self) {
        self.connection = connect(&self.settings, "test")
            .await
            .expect("RabbitMQ is back");
    }

    /// Deletes this test's queues and exchange.
    pub async fn cleanup(self) {
        let a = &self.settings.amqp;
        let mut queues = vec![
            a.jobs_queue.clone(),
            a.dead_letter_queue.clone(),
            a.results_queue.clone(),
        ];
        queues.extend(
            a.delay_tiers_secs
                .iter()
                .map(|t| self.settings.delay_queue_name(*t)),
        );
        // A channel per delete: deleting a queue that is not there closes the channel.
        for q in queues {
            if let Ok(channel) = self.connection.create_channel().await {
                let _ = channel
                    .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                    .await;
            }
        }
        if let Ok(channel) = self.connection.create_channel().await {
            let _ = channel
                .exchange_delete(
                    a.results_exchange.as_str().into(),
                    ExchangeDeleteOptions::default(),
                )
                .await;
        }
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

/// Sends SIGTERM to a worker process and waits for it to exit.
pub async fn stop_process(mut child: std::process::Child) -> std::process::ExitStatus {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status();
    tokio::task::spawn_blocking(move || child.wait())
        .await
        .expect("wait task")
        .expect("worker exits")
}

/// Stops worker processes with SIGTERM and checks that each exits 0.
pub async fn stop_cleanly(workers: impl IntoIterator<Item = std::process::Child>) {
    for w in workers {
        assert_eq!(stop_process(w).await.code(), Some(0));
    }
}

/// Validates an instance against a schema of `schemas/`.
pub fn assert_valid(schema_file: &str, instance: &Value) {
    let path = format!("{}/schemas/{schema_file}", env!("CARGO_MANIFEST_DIR"));
    let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let validator = jsonschema::options()
        .should_validate_formats(true)
        .build(&schema)
        .expect("schema compiles");
    let errors: Vec<String> = validator
        .iter_errors(instance)
        .map(|e| format!("{} at {}", e, e.instance_path))
        .collect();
    assert!(
        errors.is_empty(),
        "{schema_file}: {errors:#?}\n{instance:#}"
    );
}

pub fn event_json(event: &CloudEvent) -> Value {
    serde_json::to_value(event).unwrap()
}

/// A fault of any fake for its next `times` requests (`None`: all) whose prompt contains `prompt`.
pub fn rule<F>(prompt: &str, fault: F, times: Option<u32>) -> imagegen_fakes::rules::Rule<F> {
    imagegen_fakes::rules::Rule {
        prompt_contains: Some(prompt.into()),
        fault,
        times,
    }
}

/// `kill -9` of a worker process while its job waits at a provider that queues the work: a worker
/// process (kind `kind` as the default provider, at `base_url` with `api_key`, on the fs store)
/// takes job `k1` of batch `batch` with `prompt`; once `queued()` says the provider has it and its
/// handle is in the job's journal, the process is killed and another started. Returns the event
/// of the job, after the second process has stopped with nothing left in the jobs queue.
pub async fn killed_while_queued(
    kind: &str,
    base_url: &str,
    api_key: &str,
    batch: &str,
    prompt: &str,
    queued: impl Fn() -> bool,
) -> CloudEvent {
    killed_while_queued_with(
        kind,
        &[("BASE_URL", base_url), ("API_KEY", api_key)],
        batch,
        prompt,
        queued,
    )
    .await
}

/// [`killed_while_queued`] with the provider's own keys (`("HOSTS", url)`, ...).
pub async fn killed_while_queued_with(
    kind: &str,
    keys: &[(&str, &str)],
    batch: &str,
    prompt: &str,
    queued: impl Fn() -> bool,
) -> CloudEvent {
    let env = TestEnv::new(Store::Fs).await;
    let data = tempfile::tempdir().unwrap();
    let name = kind.to_uppercase();
    let var = |key: &str| format!("IMAGEGEN__PROVIDERS__{name}__{key}");
    let mut owned = vec![
        (var("KIND"), kind.to_string()),
        (var("POLL_MIN_MS"), "200".into()),
        (var("POLL_MAX_SECS"), "1".into()),
        (
            "IMAGEGEN__WORKER__DEFAULT_PROVIDER".into(),
            kind.to_string(),
        ),
    ];
    owned.extend(keys.iter().map(|(k, v)| (var(k), v.to_string())));
    let vars: Vec<(&str, &str)> = owned
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let wait = Duration::from_secs(30);
    let mut listener = env.listen().await;
    let mut first = env.spawn_worker(data.path(), &vars);
    env.publish(serde_json::json!({"id": "k1", "prompt": prompt, "batch": batch}))
        .await;
    let deadline = std::time::Instant::now() + wait;
    let journal = data.path().join(format!(
        "{}images/{batch}/k1/journal/pending.json",
        env.settings.storage.prefix
    ));
    while !(queued() && journal.exists()) {
        assert!(
            std::time::Instant::now() < deadline,
            "the job never waited at the provider"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    first.kill().unwrap();
    first.wait().unwrap();
    let second = env.spawn_worker(data.path(), &vars);
    let event = listener
        .next(wait)
        .await
        .unwrap()
        .expect("the job finishes after the restart");
    if let Some(image) = event.data.images.first() {
        assert!(std::path::Path::new(image.uri.strip_prefix("file://").unwrap()).exists());
    }
    stop_process(second).await;
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 0);
    env.cleanup().await;
    event
}

/// A `side` x `side` PNG of one color, stored under the test's prefix at `refs/{name}`: its
/// key and its bytes (a reference image for jobs).
pub async fn stored_png(env: &TestEnv, name: &str, side: u32, rgb: [u8; 3]) -> (String, Vec<u8>) {
    let image = image::RgbImage::from_pixel(side, side, image::Rgb(rgb));
    let mut png = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut png, image::ImageFormat::Png)
        .expect("a PNG");
    let png = png.into_inner();
    let key = format!("{}refs/{name}", env.settings.storage.prefix);
    env.store()
        .await
        .put(imagegen::storage::PutObject {
            key: &key,
            data: bytes::Bytes::from(png.clone()),
            content_type: "image/png",
            metadata: &[],
            sha256: None,
        })
        .await
        .expect("the reference is stored");
    (key, png)
}

/// A collector of the test's batch lane, apart from any worker: its steps are taken by the
/// test (two at once, say, as when the broker moves the role while the old holder still runs).
pub struct LaneCollector {
    lane: Arc<imagegen::worker::lane::Lane>,
    publisher: Arc<imagegen::amqp::publisher::Publisher>,
}

impl LaneCollector {
    pub async fn step(&self) {
        self.lane.step(&self.publisher).await;
    }
}

pub async fn lane_collector(env: &TestEnv) -> LaneCollector {
    let settings = env.settings.clone();
    let routes = imagegen::worker::providers::Routes::from_settings(&settings).expect("routes");
    let pipeline = imagegen::worker::pipeline::Pipeline::new(&settings, routes, env.store().await);
    let seal = Arc::new(imagegen::amqp::headers::HeaderSeal::new(
        &settings.amqp.header_key,
    ));
    let lane =
        imagegen::worker::lane::Lane::new(Arc::new(settings.clone()), Arc::new(pipeline), seal)
            .expect("lane")
            .expect("the test's settings have a lane");
    let connection = Arc::new(connect(&settings, "lane-test").await.expect("broker"));
    let publisher = Arc::new(imagegen::amqp::publisher::Publisher::new(connection));
    publisher.open().await.expect("publisher");
    LaneCollector { lane, publisher }
}

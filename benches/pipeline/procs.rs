//! The processes of a run and what is around them: the worker's command and settings, stopping
//! processes, publishing the jobs, reading the worker's log, and deleting the run's objects.

use super::*;

/// Child processes of a run, killed if still running when dropped (on error).
pub(crate) struct Proc {
    pub(crate) name: &'static str,
    pub(crate) child: Child,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM, then SIGKILL after `grace`. Returns the exit code.
    pub(crate) async fn stop(&mut self, grace: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + grace;
        loop {
            match self.child.try_wait() {
                Ok(Some(status)) => return status.code(),
                Ok(None) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                _ => {
                    eprintln!("{} did not stop within {grace:?}: killing it", self.name);
                    let _ = self.child.kill();
                    return self.child.wait().ok().and_then(|s| s.code());
                }
            }
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A run id that sorts after every earlier one: `r` (after any hex digit of the random ids of
/// earlier versions of this harness), seconds since the epoch in hex, 4 random hex digits.
///
/// It is also the run's storage prefix. The worker lists each job's directory, and Garage's
/// listing walks forward from the prefix over deleted objects (kept as tombstones for a day) until
/// it finds live ones: with the prefixes of deleted runs sorting after this run's, that walk
/// (and Garage's CPU) would grow with every earlier run.
pub(crate) fn run_id() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!("r{secs:08x}{:04x}", fastrand::u16(..))
}

pub(crate) fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The overrides that point a worker at this run's queues, the fake and Garage: everything else
/// stays at its default, concurrency excepted (and what `--set` changes, for diagnostics).
pub(crate) fn overrides(
    args: &Args,
    id: &str,
    fake_port: u16,
    spec: &RunSpec,
    spool: &Path,
) -> Vec<(String, String)> {
    let mut v: Vec<(&str, String)> = vec![
        ("amqp.url", args.amqp_url.clone()),
        ("amqp.jobs_queue", format!("bench.{id}.jobs")),
        ("amqp.dead_letter_queue", format!("bench.{id}.dead")),
        ("amqp.results_exchange", format!("bench.{id}.results")),
        ("amqp.results_queue", format!("bench.{id}.results")),
        ("amqp.connection_name", format!("bench-{id}")),
        ("storage.kind", "s3".into()),
        ("storage.bucket", S3_BUCKET.into()),
        ("storage.endpoint_url", S3_ENDPOINT.into()),
        ("storage.region", S3_REGION.into()),
        ("storage.access_key_id", S3_KEY_ID.into()),
        ("storage.secret_access_key", S3_SECRET.into()),
        ("storage.prefix", format!("bench/{id}/")),
        ("spool.dir", spool.display().to_string()),
        // The health and metrics listener stays on, on loopback and a free port.
        ("http.listen", "127.0.0.1:0".into()),
        ("worker.concurrency", spec.concurrency.to_string()),
    ];
    let base_url = format!("http://127.0.0.1:{fake_port}/v1");
    match spec.provider {
        "bfl" => v.extend([
            ("providers.bfl.kind", "bfl".into()),
            ("providers.bfl.base_url", base_url),
            ("providers.bfl.api_key", "bfl-bench".into()),
            ("providers.bfl.max_active", spec.max_active.to_string()),
        ]),
        _ => v.extend([
            ("providers.openai.kind", "openai".into()),
            ("providers.openai.base_url", base_url),
            ("providers.openai.api_key", "sk-bench".into()),
        ]),
    }
    if spec.lane {
        // One input file: every job is recorded before the file is ten seconds old.
        v.extend([
            ("lane.provider", "openai".into()),
            ("lane.tick_secs", "1".into()),
            ("lane.poll_secs", "1".into()),
            ("lane.file_max_age_secs", "10".into()),
        ]);
    }
    v.extend(
        args.set
            .iter()
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, val)| (k, val.to_string())),
    );
    v.into_iter().map(|(k, val)| (k.to_string(), val)).collect()
}

pub(crate) fn env_name(key: &str) -> String {
    format!("IMAGEGEN__{}", key.replace('.', "__").to_uppercase())
}

/// The command that starts worker `index` of a run: defaults, plus the overrides, plus a
/// connection name, spool and log of its own.
pub(crate) fn worker_command(
    args: &Args,
    overrides: &[(String, String)],
    run_dir: &Path,
    index: usize,
    log: &str,
) -> anyhow::Result<Command> {
    let mut command = Command::new(&args.bin);
    command
        .arg("worker")
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(run_dir.join(log))?);
    for (key, value) in overrides {
        let key = match key.strip_prefix("providers.openai.") {
            Some(rest) if args.legacy_provider => format!("provider.{rest}"),
            _ => key.clone(),
        };
        let value = match key.as_str() {
            "amqp.connection_name" => format!("{value}-{index}"),
            "spool.dir" => format!("{value}-{index}"),
            _ => value.clone(),
        };
        command.env(env_name(&key), value);
    }
    Ok(command)
}

/// The RSS of a worker at rest: started on the run's (empty) queue, read once it consumes, then
/// stopped. What the memory targets are counted from.
pub(crate) async fn idle_rss_kib(
    args: &Args,
    overrides: &[(String, String)],
    run_dir: &Path,
) -> Option<u64> {
    let mut command = worker_command(args, overrides, run_dir, 99, "worker-idle.log").ok()?;
    let mut worker = Proc {
        name: "idle worker",
        child: command.spawn().ok()?,
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss = status_kib(worker.pid(), "VmRSS:");
    worker.stop(Duration::from_secs(10)).await;
    rss
}

/// Publishes the jobs to `queue` as a producer would: persistent JSON messages with a message id,
/// with publisher confirms (up to 1000 unconfirmed at a time). Returns how many were confirmed.
pub(crate) async fn publish_jobs(
    connection: &lapin::Connection,
    queue: &str,
    jobs: &[(String, Vec<u8>)],
) -> anyhow::Result<usize> {
    let channel = connection.create_channel().await?;
    channel
        .confirm_select(ConfirmSelectOptions::default())
        .await?;
    let mut confirmed = 0;
    for chunk in jobs.chunks(1000) {
        let mut pending = Vec::with_capacity(chunk.len());
        for (id, body) in chunk {
            let properties = BasicProperties::default()
                .with_content_type("application/json".into())
                .with_message_id(id.as_str().into())
                .with_delivery_mode(2);
            let options = BasicPublishOptions {
                mandatory: true,
                ..BasicPublishOptions::default()
            };
            pending.push(
                channel
                    .basic_publish("".into(), queue.into(), options, body, properties)
                    .await?,
            );
        }
        for confirm in pending {
            match confirm.await? {
                Confirmation::Ack(None) => confirmed += 1,
                other => bail!("the broker did not confirm a job: {other:?}"),
            }
        }
    }
    let _ = channel.close(200, "published".into()).await;
    Ok(confirmed)
}

/// p50/p99 of the provider call latencies the worker logs ("provider returned", latency_ms).
pub(crate) fn provider_latencies(log: &Path) -> Option<Value> {
    let text = std::fs::read_to_string(log).ok()?;
    let mut v: Vec<u64> = text
        .lines()
        .filter(|l| l.contains("provider returned"))
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|l| l.pointer("/fields/latency_ms")?.as_u64())
        .collect();
    v.sort_unstable();
    (!v.is_empty()).then(
        || json!({ "calls": v.len(), "p50": percentile(&v, 0.5), "p99": percentile(&v, 0.99) }),
    )
}

/// Deletes every object under `prefix` (with its own S3 client, set up like the worker's).
pub(crate) async fn delete_objects(prefix: &str) -> anyhow::Result<usize> {
    use aws_sdk_s3::config::{Region, RequestChecksumCalculation, ResponseChecksumValidation};
    let http = aws_smithy_http_client::Builder::new()
        .tls_provider(aws_smithy_http_client::tls::Provider::Rustls(
            aws_smithy_http_client::tls::rustls_provider::CryptoMode::Ring,
        ))
        .build_https();
    let shared = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .http_client(http)
        .region(Region::new(S3_REGION))
        .endpoint_url(S3_ENDPOINT)
        .credentials_provider(aws_credential_types::Credentials::new(
            S3_KEY_ID, S3_SECRET, None, None, "bench",
        ))
        .load()
        .await;
    let config = aws_sdk_s3::config::Builder::from(&shared)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    let client = aws_sdk_s3::Client::from_conf(config);
    let mut deleted = 0;
    loop {
        let page = client
            .list_objects_v2()
            .bucket(S3_BUCKET)
            .prefix(prefix)
            .send()
            .await?;
        let keys: Vec<String> = page
            .contents()
            .iter()
            .filter_map(|o| o.key().map(str::to_string))
            .collect();
        if keys.is_empty() {
            return Ok(deleted);
        }
        let results: Vec<_> = futures_util::stream::iter(keys)
            .map(|key| client.delete_object().bucket(S3_BUCKET).key(key).send())
            .buffer_unordered(32)
            .collect()
            .await;
        for r in results {
            r?;
            deleted += 1;
        }
    }
}

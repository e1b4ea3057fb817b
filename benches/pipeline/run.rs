//! One run: its queues, the fake API, the workers, the events, and what they cost.

use super::*;

pub(crate) async fn run_one(args: &Args, spec: &RunSpec, id: &str) -> anyhow::Result<Value> {
    let run_dir = std::env::current_dir()?
        .join(&args.out_dir)
        .join("runs")
        .join(format!("{}-{id}", spec.label.replace(['/', '#'], "-")));
    std::fs::create_dir_all(&run_dir)?;
    let fake_port = free_port()?;
    let overrides = overrides(args, id, fake_port, spec, &run_dir.join("spool"));
    let pairs: Vec<(&str, String)> = overrides
        .iter()
        .map(|(k, v)| (k.as_str(), v.clone()))
        .collect();
    let settings =
        Settings::load_with_overrides(&Sources::default(), &pairs).context("benchmark settings")?;
    let connection = connect(&settings, "bench").await?;
    // Ctrl-C ends the measurement (its child processes are killed on drop), not the clean-up.
    let result = tokio::select! {
        r = run_with_queues(args, spec, id, &run_dir, fake_port, &overrides, &settings, &connection) => r,
        _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
    };

    // Clean up whatever happened.
    let a = &settings.amqp;
    let mut queues = vec![
        a.jobs_queue.clone(),
        a.dead_letter_queue.clone(),
        a.results_queue.clone(),
    ];
    queues.extend(
        a.delay_tiers_secs
            .iter()
            .map(|t| settings.delay_queue_name(*t)),
    );
    if settings.lane.enabled() {
        queues.extend([
            settings.lane_ticks_queue(),
            settings.lane_ticks_delay_queue(),
        ]);
    }
    for q in queues {
        // A channel per delete: deleting a queue that is not there closes the channel.
        if let Ok(channel) = connection.create_channel().await {
            let _ = channel
                .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
    }
    if let Ok(channel) = connection.create_channel().await {
        let _ = channel
            .exchange_delete(
                a.results_exchange.as_str().into(),
                ExchangeDeleteOptions::default(),
            )
            .await;
    }
    let _ = connection.close(200, "bench done".into()).await;
    for index in (0..spec.workers).chain([99]) {
        let _ = std::fs::remove_dir_all(run_dir.join(format!("spool-{index}")));
    }
    result
}

#[allow(clippy::too_many_arguments)]
pub(crate) async fn run_with_queues(
    args: &Args,
    spec: &RunSpec,
    id: &str,
    run_dir: &Path,
    fake_port: u16,
    overrides: &[(String, String)],
    settings: &Settings,
    connection: &lapin::Connection,
) -> anyhow::Result<Value> {
    // The run's queues, created with the worker's own arguments plus x-expires, so that an
    // interrupted run leaves nothing behind for long; the worker accepts them as they are.
    let expires = |mut t: FieldTable| {
        t.insert("x-expires".into(), AMQPValue::LongInt(30 * 60 * 1000));
        t
    };
    let a = &settings.amqp;
    for (name, arguments) in topology::queues(settings) {
        topology::ensure_queue(connection, &name, expires(arguments)).await?;
    }
    topology::declare(connection, settings).await?;

    // The fake image API, its own process.
    let mut fake_args = match spec.provider {
        "bfl" => vec![
            "bfl".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{fake_port}"),
            "--generation-ms".into(),
            spec.latency_ms.to_string(),
            "--max-active".into(),
            spec.max_active.to_string(),
            "--image-bytes".into(),
            spec.image_bytes.to_string(),
        ],
        _ => vec![
            "openai".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{fake_port}"),
            "--latency-ms".into(),
            spec.latency_ms.to_string(),
            "--jitter-ms".into(),
            spec.jitter_ms.to_string(),
            "--seed".into(),
            spec.seed.to_string(),
            "--image-bytes".into(),
            spec.image_bytes.to_string(),
            "--image-side".into(),
            spec.image_side.to_string(),
        ],
    };
    if let Some(tick) = spec.tick_ms {
        fake_args.extend(["--tick-ms".into(), tick.to_string()]);
    }
    if let Some(rpm) = spec.rpm {
        fake_args.extend(["--rpm".into(), rpm.to_string()]);
    }
    let mut fake = Proc {
        name: "fake-api",
        child: Command::new(&args.fake_bin)
            .args(&fake_args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(run_dir.join("fake-api.log"))?)
            .spawn()
            .context("starting the fake API")?,
    };
    let http = reqwest::Client::new();
    let stats_url = format!("http://127.0.0.1:{fake_port}/_fake/stats");
    let deadline = Instant::now() + Duration::from_secs(15);
    while http.get(&stats_url).send().await.is_err() {
        if Instant::now() > deadline || fake.child.try_wait()?.is_some() {
            bail!(
                "the fake API did not start (see {}/fake-api.log)",
                run_dir.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let idle_rss = idle_rss_kib(args, overrides, run_dir).await;

    // Listen before publishing, then publish every job before the workers start.
    let mut listener = ResultListener::open(connection, &a.results_exchange, "#").await?;
    let batch = format!("bench-{id}");
    let jobs: Vec<(String, Vec<u8>)> = (0..spec.n)
        .map(|i| {
            let job_id = format!("job-{i:06}");
            let mut body = json!({
                "id": job_id,
                "batch": batch,
                "prompt": format!("benchmark prompt {i}: a lighthouse on a cliff at dusk, oil painting"),
            });
            if spec.lane {
                body["version"] = json!(3);
                body["lane"] = json!("batch");
            }
            if spec.variants {
                body["version"] = json!(3);
                body["outputs"] = json!([
                    {"name": "web", "size": "512x512", "format": "webp", "quality": 80},
                    {"name": "thumb", "size": "256x256", "format": "jpeg", "quality": 75}
                ]);
            }
            (job_id, body.to_string().into_bytes())
        })
        .collect();
    let enqueue_started = Instant::now();
    let published = publish_jobs(connection, &a.jobs_queue, &jobs).await?;
    let enqueue_secs = enqueue_started.elapsed().as_secs_f64();
    eprintln!("published {published} jobs in {enqueue_secs:.1} s; starting the worker(s)");

    let (busy_before, garage_before) =
        wait_idle(Duration::from_secs(args.wait_idle_secs), args.idle_below).await;
    eprintln!(
        "before the workers' start: host {:.0}% busy, Garage using {:.2} cores",
        busy_before * 100.0,
        garage_before
    );

    // The workers, their own processes: defaults, plus the overrides.
    let before = CpuSnapshot::take();
    let started = Instant::now();
    let started_unix_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as f64;
    let mut workers = Vec::with_capacity(spec.workers);
    for index in 0..spec.workers {
        let log = if index == 0 {
            "worker.log".to_string()
        } else {
            format!("worker-{index}.log")
        };
        let mut command = worker_command(args, overrides, run_dir, index, &log)?;
        workers.push(Proc {
            name: "worker",
            child: command.spawn().context("starting a worker")?,
        });
    }
    let pids: Vec<u32> = workers.iter().map(Proc::pid).collect();

    // Every job's event, once.
    let mut pending: HashSet<&str> = jobs.iter().map(|(id, _)| id.as_str()).collect();
    let mut durations = Vec::with_capacity(spec.n);
    let mut event_secs = Vec::with_capacity(spec.n);
    let (mut succeeded, mut failed, mut duplicates, mut attempts) = (0usize, 0usize, 0usize, 0u64);
    let mut first_event = None;
    let mut last_event = started;
    let deadline = started + Duration::from_secs(args.timeout_secs);
    // The first worker's RSS about once a second: (seconds since its start, KiB, events so far).
    let mut rss_samples: Vec<(f64, u64, usize)> = Vec::new();
    // The most socket memory any worker held at a sample (every half second), in bytes.
    let mut socket_peak: Option<u64> = None;
    let mut next_sample = started;
    while !pending.is_empty() {
        if Instant::now() >= next_sample {
            if let Some(kib) = status_kib(pids[0], "VmRSS:") {
                let t = round(started.elapsed().as_secs_f64(), 2);
                rss_samples.push((t, kib, spec.n - pending.len()));
            }
            if let Some(bytes) = socket_bytes(&pids) {
                let most = bytes.into_iter().max().unwrap_or(0);
                socket_peak = Some(socket_peak.unwrap_or(0).max(most));
            }
            next_sample += Duration::from_millis(500);
        }
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(next_sample.saturating_duration_since(Instant::now()))
            .max(Duration::from_millis(10));
        match listener.next(wait).await? {
            Some(event) => {
                if !pending.remove(event.data.job_id.as_str()) {
                    duplicates += 1;
                    continue;
                }
                last_event = Instant::now();
                first_event.get_or_insert(last_event);
                event_secs.push(last_event.duration_since(started).as_secs_f64());
                durations.push(event.data.duration_ms);
                attempts += u64::from(event.data.attempts);
                match event.data.status {
                    Status::Succeeded => succeeded += 1,
                    Status::Failed => failed += 1,
                }
            }
            None => {
                for worker in &mut workers {
                    if let Some(status) = worker.child.try_wait()? {
                        bail!(
                            "a worker exited ({status}) with {} events missing (see {}/worker*.log)",
                            pending.len(),
                            run_dir.display()
                        );
                    }
                }
                if Instant::now() >= deadline {
                    bail!(
                        "{} of {} events missing after {} s",
                        pending.len(),
                        spec.n,
                        args.timeout_secs
                    );
                }
            }
        }
    }
    // Just before stopping the workers: their CPU time and memory, and everyone else's CPU.
    let after = CpuSnapshot::take();
    let mut worker_ticks = 0;
    for pid in &pids {
        worker_ticks += proc_ticks(*pid)
            .context("reading a worker's /proc/PID/stat")?
            .1;
    }
    let minor_faults: u64 = pids.iter().filter_map(|p| proc_minor_faults(*p)).sum();
    let peaks: Vec<Option<u64>> = pids.iter().map(|p| status_kib(*p, "VmHWM:")).collect();
    let peak_rss_kib = peaks.iter().flatten().max().copied();
    let rss_kib = status_kib(pids[0], "VmRSS:");
    let threads = status_kib(pids[0], "Threads:");
    // RSS when 10%, 50% and 90% of the events were in (from the samples).
    let rss_at = |fraction: f64| {
        let done = (spec.n as f64 * fraction) as usize;
        rss_samples
            .iter()
            .find(|(_, _, d)| *d >= done)
            .map(|(_, kib, _)| *kib)
    };
    let rss_progress = json!({ "10%": rss_at(0.1), "50%": rss_at(0.5), "90%": rss_at(0.9) });
    // At most ~200 samples in the record.
    let step = rss_samples.len().div_ceil(200).max(1);
    let rss_series: Vec<_> = rss_samples.iter().step_by(step).collect();
    let mut exits = Vec::new();
    for worker in &mut workers {
        exits.push(worker.stop(Duration::from_secs(60)).await);
    }
    let stats: Value = http.get(&stats_url).send().await?.json().await?;
    fake.stop(Duration::from_secs(10)).await;
    listener.close().await;

    let tck = clock_ticks();
    let window = last_event.duration_since(started).as_secs_f64();
    let worker_cpu_ms = (worker_ticks as f64) * 1000.0 / tck;
    durations.sort_unstable();
    // C / L; with ticks and no latency of their own, a call takes a tick.
    let period_ms = match spec.tick_ms {
        Some(tick) if spec.latency_ms == 0 => tick,
        _ => spec.latency_ms,
    };
    let bound = (period_ms > 0).then(|| spec.slots() as f64 / (period_ms as f64 / 1000.0));
    let throughput = spec.n as f64 / window;
    // What the same latencies allow with nothing else taking time (rate limits aside).
    let ideal = spec
        .schedule()
        .ideal_makespan(spec.n as u64, spec.slots())
        .as_secs_f64();
    let limited = spec
        .limit_per_sec()
        .filter(|l| bound.is_some_and(|b| *l < b));
    // The steady rate: between the 25 % and the 75 % events.
    let quartile = |q: f64| event_secs[((spec.n as f64 * q) as usize).min(spec.n - 1)];
    let mid_rate = (spec.n >= 8).then(|| {
        let (t25, t75) = (quartile(0.25), quartile(0.75));
        (spec.n as f64 * 0.5) / (t75 - t25).max(f64::MIN_POSITIVE)
    });
    // With a binding account limit, the rate after the first minute (its bucket starts full).
    let after_first_minute = limited.and_then(|_| {
        let from = event_secs.iter().position(|t| *t >= 60.0)?;
        let span = event_secs.last()? - event_secs[from];
        (span > 10.0).then(|| (event_secs.len() - from) as f64 / span)
    });
    let requests = stats["requests"].as_f64().unwrap_or(0.0);
    let too_many = stats["errors_by_status"]["429"].as_f64().unwrap_or(0.0);
    let cpu = after.delta(&before, &pids, fake.pid(), tck);
    let provider_latency = provider_latencies(&run_dir.join("worker.log"));
    // The worker's start-up (from its start to the fake's first call), and how far the last
    // event came after the ideal makespan counted from that first call.
    let first_call_secs = stats["first_call_unix_ms"]
        .as_f64()
        .map(|ms| (ms - started_unix_ms) / 1000.0);
    let past_ideal_secs = first_call_secs.map(|first| window - first - ideal);
    Ok(json!({
        "scenario": spec.scenario,
        "label": spec.label,
        "run_id": id,
        "n": spec.n,
        "workers": spec.workers,
        "concurrency": spec.concurrency,
        "latency_ms": spec.latency_ms,
        "jitter_ms": spec.jitter_ms,
        "tick_ms": spec.tick_ms,
        "seed": spec.seed,
        "rpm": spec.rpm,
        "image_bytes": spec.image_bytes,
        "image_side": spec.image_side,
        "variants": spec.variants,
        "lane": spec.lane,
        "answer_memory_bytes": settings.worker.answer_memory_bytes,
        "enqueue_secs": round(enqueue_secs, 3),
        "wall_secs": round(window, 3),
        "first_event_secs": first_event.map(|t| round(t.duration_since(started).as_secs_f64(), 3)),
        "throughput_jobs_per_sec": round(throughput, 2),
        "bound_jobs_per_sec": bound.map(|b| round(b, 2)),
        "ratio_to_bound": bound.map(|b| round(throughput / b, 4)),
        "ideal_secs": round(ideal, 3),
        "ratio_to_ideal": (ideal > 0.0).then(|| round(ideal / window, 4)),
        "first_call_secs": first_call_secs.map(|s| round(s, 3)),
        "past_ideal_secs": past_ideal_secs.map(|s| round(s, 3)),
        "rate_25_75_jobs_per_sec": mid_rate.map(|r| round(r, 2)),
        "limit_jobs_per_sec": spec.limit_per_sec().map(|l| round(l, 2)),
        "rate_after_first_minute": after_first_minute.map(|r| round(r, 2)),
        "share_429": (requests > 0.0).then(|| round(too_many / requests, 4)),
        "worker_cpu_ms": round(worker_cpu_ms, 1),
        "worker_cpu_ms_per_job": round(worker_cpu_ms / spec.n as f64, 3),
        "worker_minor_faults_per_job": round(minor_faults as f64 / spec.n as f64, 1),
        "worker_idle_rss_kib": idle_rss,
        "worker_peak_rss_kib": peak_rss_kib,
        "worker_peak_rss_kib_each": peaks,
        "worker_peak_socket_kib": socket_peak.map(|b| b / 1024),
        "worker_rss_at_end_kib": rss_kib,
        "worker_threads": threads,
        "non_default_settings": args.set,
        "worker_rss_kib_when_done": rss_progress,
        "worker_rss_samples_secs_kib_done": rss_series,
        "worker_exit_codes": exits,
        "job_duration_ms": {
            "p50": percentile(&durations, 0.50),
            "p99": percentile(&durations, 0.99),
            "max": durations.last(),
        },
        "provider_call_ms_from_worker_log": provider_latency,
        "events": { "succeeded": succeeded, "failed": failed, "duplicates": duplicates, "attempts": attempts },
        "fake_api": stats,
        "cpu_secs_during_run": cpu,
        "host_busy_fraction_before": round(busy_before, 3),
        "garage_cores_before": round(garage_before, 3),
        "logs": run_dir.display().to_string(),
    }))
}

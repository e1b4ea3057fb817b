//! Faults: lost connections, paused providers, long waits, duplicates, ambiguous timeouts,
//! workers killed mid-run. Every fault here is local to the test (its own proxy, its own fake
//! API, its own queues and worker processes), so these tests run beside the others.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use imagegen::domain::event::{CloudEvent, Status};
use imagegen_fakes::openai::{FakeApi, FakeOptions, Fault, Rule};
use lapin::types::AMQPValue;
use serde_json::json;

use crate::helpers::{Store, TestEnv, assert_valid, event_json, stop_cleanly, stop_process};
use crate::proxy::Proxy;

const WAIT: Duration = Duration::from_secs(60);

fn rule(prompt: Option<&str>, fault: Fault, times: Option<u32>) -> Rule {
    Rule {
        prompt_contains: prompt.map(str::to_string),
        fault,
        times,
    }
}

/// Collects events until `n` distinct jobs have one; checks that duplicates are identical.
async fn distinct_events(
    listener: &mut imagegen::amqp::results::ResultListener,
    n: usize,
    already: Vec<CloudEvent>,
) -> HashMap<String, CloudEvent> {
    let deadline = Instant::now() + WAIT;
    let mut seen: HashMap<String, CloudEvent> = already
        .into_iter()
        .map(|e| (e.data.job_id.clone(), e))
        .collect();
    while seen.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        let Some(event) = listener.next(left).await.unwrap() else {
            panic!("{} of {n} jobs finished within {WAIT:?}", seen.len());
        };
        match seen.get(&event.data.job_id) {
            Some(earlier) => assert_eq!(earlier, &event, "a republished event is identical"),
            None => {
                seen.insert(event.data.job_id.clone(), event);
            }
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_broker_connections_are_reopened_and_nothing_is_paid_twice() {
    let env = TestEnv::new(Store::Fs).await;
    env.fake().set_latency(Duration::from_millis(150));
    let proxy = Proxy::start("127.0.0.1:5672".parse().unwrap()).await;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.addr);
    let data = tempfile::tempdir().unwrap();
    let vars = [
        ("IMAGEGEN__AMQP__URL", url.as_str()),
        ("IMAGEGEN__WORKER__CONCURRENCY", "8"),
    ];
    let mut listener = env.listen().await;
    let jobs = 300;
    for i in 0..jobs {
        env.publish(json!({"id": format!("cut-{i}"), "prompt": format!("cut job {i}")}))
            .await;
    }
    let workers = [
        env.spawn_worker(data.path(), &vars),
        env.spawn_worker(data.path(), &vars),
    ];
    // Cut every broker connection of both workers three times while jobs are in flight.
    let mut first = env.events(&mut listener, 30, WAIT).await;
    for _ in 0..3 {
        proxy.cut();
        first.extend(env.events(&mut listener, 30, WAIT).await);
    }
    let events = distinct_events(&mut listener, jobs, first).await;
    assert!(events.values().all(|e| e.data.status == Status::Succeeded));
    // Jobs in flight at a cut finish in their old task and store their result; their
    // redeliveries wait for them (same process) or meet the lease (other process) and find the
    // stored result: each job is bought once.
    assert_eq!(
        env.fake().stats().billed as usize,
        jobs,
        "{:?}",
        env.fake().stats()
    );
    stop_cleanly(workers).await;
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 0);
    env.cleanup().await;
}

#[tokio::test]
async fn a_paused_worker_probes_with_one_real_job_and_resumes_by_itself() {
    let env = TestEnv::with(Store::Fs, &[("worker.pause_probe_secs", "1".into())]).await;
    env.fake()
        .push_rule(rule(None, Fault::QuotaExhausted, Some(3)));
    let mut listener = env.listen().await;
    for i in 0..8 {
        env.publish(json!({"id": format!("p{i}"), "prompt": format!("paused job {i}")}))
            .await;
    }
    let worker = env.start_worker().await;
    let events = distinct_events(&mut listener, 8, Vec::new()).await;
    assert!(events.values().all(|e| e.data.status == Status::Succeeded));
    let stats = env.fake().stats();
    assert_eq!(stats.billed, 8);
    assert_eq!(stats.errors_by_status.get(&429), Some(&3));
    assert_eq!(env.ready(&env.settings.amqp.dead_letter_queue).await, 0);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_long_retry_after_goes_through_the_delay_queue() {
    let env = TestEnv::with(Store::Fs, &[("retry.max_in_process_wait_secs", "1".into())]).await;
    env.fake().push_rule(rule(
        Some("patient"),
        Fault::RateLimited {
            retry_after_secs: Some(2.0),
            retry_after_ms: None,
        },
        Some(1),
    ));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let started = Instant::now();
    env.publish(json!({"id": "patient", "prompt": "a patient job"}))
        .await;
    // While it waits, the message is in the 3 s delay queue, not held by the worker.
    let delay_queue = env.settings.delay_queue_name(3);
    let deadline = Instant::now() + Duration::from_secs(3);
    while env.ready(&delay_queue).await == 0 {
        assert!(
            Instant::now() < deadline,
            "the job never reached {delay_queue}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.status, Status::Succeeded);
    assert_eq!(
        event.data.attempts, 2,
        "the failed attempt travelled with the job"
    );
    assert!(started.elapsed() >= Duration::from_millis(2500));
    assert_eq!(env.fake().calls_for("patient"), 2);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn attempts_are_counted_across_deliveries_until_retries_are_exhausted() {
    let env = TestEnv::with(
        Store::Fs,
        &[
            ("retry.max_in_process_wait_secs", "1".into()),
            ("retry.max_attempts", "3".into()),
        ],
    )
    .await;
    env.fake().push_rule(rule(
        Some("never"),
        Fault::RateLimited {
            retry_after_secs: Some(2.0),
            retry_after_ms: None,
        },
        None,
    ));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "never", "prompt": "this never gets through"}))
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_valid("result-event.schema.json", &event_json(&event));
    let error = event.data.error.as_ref().unwrap();
    assert_eq!(error.kind.as_str(), "retries_exhausted");
    assert_eq!(event.data.attempts, 3);
    assert_eq!(env.fake().calls_for("never"), 3);
    env.wait_dead_letters(1, WAIT).await;
    let dead = env.drain_dead_letters().await;
    let headers = dead[0].1.headers().clone().unwrap();
    let header = |k: &str| headers.inner().get(k).cloned();
    assert_eq!(
        header("x-imagegen-error-kind"),
        Some(AMQPValue::LongString("retries_exhausted".into()))
    );
    assert_eq!(header("x-imagegen-attempts"), Some(AMQPValue::LongInt(3)));
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_count_of_failed_attempts_set_by_a_producer_is_not_believed() {
    let env = TestEnv::new(Store::Fs).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    // A producer claims 99 failed attempts, with a seal of its own making.
    let mut headers = lapin::types::FieldTable::default();
    headers.insert("x-imagegen-attempts".into(), AMQPValue::LongInt(99));
    headers.insert(
        "x-imagegen-seal".into(),
        AMQPValue::LongString("ab".repeat(32).into()),
    );
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_delivery_mode(2)
        .with_headers(headers);
    env.publish_with(br#"{"id":"forged","prompt":"a forged count"}"#, props)
        .await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    assert_eq!(event.data.attempts, 1);
    assert_eq!(env.fake().calls_for("forged count"), 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn the_same_job_delivered_twice_at_once_is_bought_once() {
    let env = TestEnv::new(Store::S3).await;
    env.fake().set_latency(Duration::from_millis(500));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let job = json!({"id": "twin", "prompt": "a job published twice", "n": 2});
    env.publish(job.clone()).await;
    env.publish(job).await;
    let events = env.events(&mut listener, 2, WAIT).await;
    assert_eq!(events[0], events[1]);
    assert_eq!(env.fake().stats().requests, 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn timeouts_after_sending_count_as_possibly_billed_and_are_retried_once() {
    let env = TestEnv::with(
        Store::Fs,
        &[("providers.openai.request_timeout_secs", "1".into())],
    )
    .await;
    env.fake()
        .push_rule(rule(Some("hangs once"), Fault::Hang { secs: 2.0 }, Some(1)));
    env.fake()
        .push_rule(rule(Some("hangs always"), Fault::Hang { secs: 2.0 }, None));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "once", "prompt": "it hangs once"}))
        .await;
    env.publish(json!({"id": "always", "prompt": "it hangs always"}))
        .await;
    let events = env.events(&mut listener, 2, WAIT).await;
    let by_id = |id: &str| events.iter().find(|e| e.data.job_id == id).unwrap();
    let once = by_id("once");
    assert_eq!(once.data.status, Status::Succeeded);
    assert_eq!((once.data.attempts, once.data.possibly_billed), (2, 1));
    let always = by_id("always");
    assert_eq!(
        always.data.error.as_ref().unwrap().kind.as_str(),
        "retries_exhausted"
    );
    // One retry after an ambiguous failure (retry.max_possibly_billed_retries = 1), no more.
    assert_eq!((always.data.attempts, always.data.possibly_billed), (2, 2));
    assert_eq!(env.fake().calls_for("hangs always"), 2);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn workers_killed_mid_run_lose_no_job_and_pay_twice_only_for_calls_in_flight() {
    let env = TestEnv::new(Store::Fs).await;
    env.fake().set_latency(Duration::from_millis(100));
    let data = tempfile::tempdir().unwrap();
    let jobs = 300;
    let concurrency = 8;
    let spawn = || env.spawn_worker(data.path(), &[("IMAGEGEN__WORKER__CONCURRENCY", "8")]);
    let mut listener = env.listen().await;
    for i in 0..jobs {
        env.publish(json!({"id": format!("k{i}"), "prompt": format!("kill test {i}")}))
            .await;
    }
    let mut workers = vec![spawn(), spawn()];
    let mut kills = 0;
    let mut seen: HashMap<String, CloudEvent> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < jobs {
        let left = deadline.saturating_duration_since(Instant::now());
        let event = listener
            .next(left)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{} of {jobs} jobs finished", seen.len()));
        if let Some(earlier) = seen.get(&event.data.job_id) {
            assert_eq!(earlier, &event, "a republished event is identical");
            continue;
        }
        seen.insert(event.data.job_id.clone(), event);
        // Kill a worker (SIGKILL) three times along the way, and start a fresh one.
        if kills < 3 && seen.len() >= 60 * (kills + 1) {
            let mut victim = workers.remove(0);
            victim.kill().unwrap();
            victim.wait().unwrap();
            kills += 1;
            workers.push(spawn());
        }
    }
    for w in workers {
        stop_process(w).await;
    }
    assert!(seen.values().all(|e| e.data.status == Status::Succeeded));
    for event in seen.values() {
        for image in &event.data.images {
            assert!(std::path::Path::new(image.uri.strip_prefix("file://").unwrap()).exists());
        }
    }
    let billed = env.fake().stats().billed as usize;
    // A response lost with its process is the one unavoidable double payment: images bought but
    // not yet stored when the worker died, i.e. its provider calls in flight and the uploads
    // that follow them. Both are bounded by the messages it holds (the prefetch).
    let held = prefetch_at(concurrency);
    assert!(billed >= jobs, "{billed}");
    assert!(
        billed <= jobs + kills * held,
        "{billed} billed for {jobs} jobs after {kills} kills"
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_outage_pauses_the_workers_and_spooled_images_are_not_bought_again() {
    let env = TestEnv::new(Store::S3).await;
    env.fake().set_latency(Duration::from_millis(100));
    let proxy = Proxy::start("127.0.0.1:3900".parse().unwrap()).await;
    let endpoint = format!("http://{}", proxy.addr);
    let data = tempfile::tempdir().unwrap();
    let s = &env.settings.storage;
    let vars = [
        ("IMAGEGEN__STORAGE__KIND", "s3"),
        ("IMAGEGEN__STORAGE__ENDPOINT_URL", endpoint.as_str()),
        ("IMAGEGEN__STORAGE__BUCKET", s.bucket.as_str()),
        ("IMAGEGEN__STORAGE__REGION", s.region.as_str()),
        ("IMAGEGEN__STORAGE__PREFIX", s.prefix.as_str()),
        (
            "IMAGEGEN__STORAGE__ACCESS_KEY_ID",
            crate::helpers::S3_KEY_ID,
        ),
        (
            "IMAGEGEN__STORAGE__SECRET_ACCESS_KEY",
            crate::helpers::S3_SECRET,
        ),
        ("IMAGEGEN__STORAGE__REQUEST_TIMEOUT_SECS", "2"),
        ("IMAGEGEN__RETRY__MAX_ATTEMPTS", "2"),
        ("IMAGEGEN__WORKER__PAUSE_PROBE_SECS", "1"),
        ("IMAGEGEN__WORKER__CONCURRENCY", "4"),
    ];
    let mut listener = env.listen().await;
    let jobs = 300;
    for i in 0..jobs {
        env.publish(
            json!({"id": format!("s{i}"), "batch": "out", "prompt": format!("outage job {i}")}),
        )
        .await;
    }
    let workers = [
        env.spawn_worker(data.path(), &vars),
        env.spawn_worker(data.path(), &vars),
    ];
    let deadline = Instant::now() + WAIT;
    while env.fake().stats().billed < 60 {
        assert!(Instant::now() < deadline, "the run never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Storage goes away mid-run: images already bought wait in the (shared, host-local) spool,
    // and both workers pause and stop buying.
    proxy.set_down(true);
    tokio::time::sleep(Duration::from_secs(6)).await;
    let bought = env.fake().stats().billed;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        env.fake().stats().billed,
        bought,
        "paused workers buy nothing"
    );
    assert!(
        walk(&data.path().join(".spool")) > 0,
        "bought images wait in the spool"
    );
    // Storage comes back: the workers' probes get through, they resume by themselves, upload the
    // spooled images, and finish the run.
    proxy.set_down(false);
    let events = distinct_events(&mut listener, jobs, Vec::new()).await;
    assert!(events.values().all(|e| e.data.status == Status::Succeeded));
    assert_eq!(
        env.fake().stats().billed as usize,
        jobs,
        "spooled images were uploaded, not bought again"
    );
    assert_eq!(
        walk(&data.path().join(".spool")),
        0,
        "the spool is empty again"
    );
    let store = env.store().await;
    for e in events.values() {
        for image in &e.data.images {
            assert!(
                store.head(&image.key).await.unwrap().is_some(),
                "{} stored",
                image.key
            );
        }
    }
    stop_cleanly(workers).await;
    env.cleanup().await;
}

#[tokio::test]
async fn the_conditional_write_probe_tells_the_truth_on_both_stores() {
    for store_kind in [Store::S3, Store::Fs] {
        let env = TestEnv::new(store_kind).await;
        let store = env.store().await;
        let honoured =
            imagegen::storage::probe_conditional_put(&*store, &env.settings.storage.prefix)
                .await
                .unwrap();
        let key = format!("it/{}/cond", env.id);
        let object = || imagegen::storage::PutObject {
            key: &key,
            data: bytes::Bytes::from_static(b"x"),
            content_type: "text/plain",
            metadata: &[],
            sha256: None,
        };
        assert!(store.put_if_absent(object()).await.unwrap());
        let second = store.put_if_absent(object()).await.unwrap();
        assert_eq!(second, !honoured, "the probe matches the store's behaviour");
        if store_kind == Store::Fs {
            assert!(honoured, "the fs store creates files atomically");
        }
        store.delete(&key).await.unwrap();
        env.cleanup().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_given_the_same_jobs_at_once_buy_each_once_when_the_store_has_leases() {
    let env = TestEnv::new(Store::Fs).await;
    env.fake().set_latency(Duration::from_millis(300));
    let data = tempfile::tempdir().unwrap();
    let vars = [("IMAGEGEN__WORKER__CONCURRENCY", "8")];
    let workers = [
        env.spawn_worker(data.path(), &vars),
        env.spawn_worker(data.path(), &vars),
    ];
    env.wait_consumers(2).await;
    let mut listener = env.listen().await;
    // Every job is published twice, back to back: both processes get copies of the same jobs.
    let jobs = 150;
    for i in 0..jobs {
        let job = json!({"id": format!("d{i}"), "prompt": format!("duplicate {i}")});
        env.publish(job.clone()).await;
        env.publish(job).await;
    }
    let events = distinct_events(&mut listener, jobs, Vec::new()).await;
    assert!(events.values().all(|e| e.data.status == Status::Succeeded));
    // One process bought each job; the copy that met a live lease was deferred and then found
    // the stored result.
    assert_eq!(
        env.fake().stats().billed as usize,
        jobs,
        "{:?}",
        env.fake().stats()
    );
    stop_cleanly(workers).await;
    env.cleanup().await;
}

#[tokio::test]
async fn sigterm_during_a_run_lets_in_flight_jobs_finish_and_loses_nothing() {
    let env = TestEnv::new(Store::Fs).await;
    env.fake().set_latency(Duration::from_millis(600));
    let data = tempfile::tempdir().unwrap();
    let vars = [
        ("IMAGEGEN__WORKER__CONCURRENCY", "8"),
        ("IMAGEGEN__WORKER__SHUTDOWN_GRACE_SECS", "10"),
    ];
    let mut listener = env.listen().await;
    let jobs = 300;
    for i in 0..jobs {
        env.publish(json!({"id": format!("t{i}"), "prompt": format!("sigterm job {i}")}))
            .await;
    }
    let first = env.spawn_worker(data.path(), &vars);
    // Once the run is well under way, ask the worker to stop, mid-call: its calls run in step
    // (8 at a time, 600 ms each), so right after a round of answers it has a new round in flight.
    let deadline = Instant::now() + WAIT;
    while env.fake().stats().billed < 40 {
        assert!(Instant::now() < deadline, "the run never got going");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let round = env.fake().stats().billed;
    while env.fake().stats().billed == round {
        assert!(Instant::now() < deadline, "no answer came");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let second = env.spawn_worker(data.path(), &vars);
    let stopped_at = Instant::now();
    assert_eq!(stop_process(first).await.code(), Some(0));
    // It waited for its calls in flight (600 ms each) rather than dropping them.
    assert!(
        stopped_at.elapsed() >= Duration::from_millis(200),
        "{:?}",
        stopped_at.elapsed()
    );
    let replacement = env.spawn_worker(data.path(), &vars);
    let events = distinct_events(&mut listener, jobs, Vec::new()).await;
    assert!(events.values().all(|e| e.data.status == Status::Succeeded));
    assert_eq!(
        env.fake().stats().billed as usize,
        jobs,
        "nothing was paid twice"
    );
    for w in [second, replacement] {
        assert_eq!(stop_process(w).await.code(), Some(0));
    }
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_provider_storm_across_two_processes_ends_with_every_job_done_and_bought_once() {
    let env = TestEnv::new(Store::Fs).await;
    env.fake().set_latency(Duration::from_millis(20));
    let any = |fault: Fault, times: u32| rule(None, fault, Some(times));
    let limited = |secs: f64| Fault::RateLimited {
        retry_after_secs: Some(secs),
        retry_after_ms: None,
    };
    // First-match rules, used up in order: a burst of 429s, then 503s, then long retry-afters
    // for some prompts (through the delay queue), then a quota-exhausted period. The first jobs
    // in flight absorb most of the 70 errors between them, hence the generous attempt limit.
    env.fake().push_rule(any(limited(0.2), 40));
    env.fake()
        .push_rule(any(Fault::ServerError { status: 503 }, 30));
    env.fake()
        .push_rule(rule(Some("storm 7"), limited(4.0), Some(6)));
    env.fake().push_rule(any(Fault::QuotaExhausted, 6));
    let data = tempfile::tempdir().unwrap();
    let vars = [
        ("IMAGEGEN__WORKER__CONCURRENCY", "8"),
        ("IMAGEGEN__WORKER__PAUSE_PROBE_SECS", "1"),
        ("IMAGEGEN__RETRY__MAX_ATTEMPTS", "25"),
        ("IMAGEGEN__RETRY__INITIAL_DELAY_MS", "50"),
        ("IMAGEGEN__RETRY__MAX_DELAY_MS", "400"),
        ("IMAGEGEN__RETRY__MAX_IN_PROCESS_WAIT_SECS", "1"),
    ];
    let spawn = || env.spawn_worker(data.path(), &vars);
    let mut listener = env.listen().await;
    let jobs = 300;
    for i in 0..jobs {
        env.publish(json!({"id": format!("st{i}"), "prompt": format!("storm {i}")}))
            .await;
    }
    let workers = vec![spawn(), spawn()];
    let events = distinct_events(&mut listener, jobs, Vec::new()).await;
    stop_cleanly(workers).await;
    let failed: Vec<_> = events
        .values()
        .filter(|e| e.data.status != Status::Succeeded)
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    let stats = env.fake().stats();
    assert_eq!(
        stats.billed as usize, jobs,
        "every job bought exactly once: {stats:?}"
    );
    assert_eq!(stats.errors_by_status.get(&503), Some(&30));
    // Every fault was served: 40 + 6 429s for rate limits, 6 for quota.
    assert_eq!(stats.errors_by_status.get(&429), Some(&52));
    // Jobs that met a long retry-after carried their failed attempt through the delay queue.
    assert!(
        events
            .values()
            .any(|e| e.data.job_id.starts_with("st7") && e.data.attempts > 1)
    );
    env.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_poison_job_mixed_into_a_run_ends_dead_lettered_and_the_run_completes() {
    let env = TestEnv::new(Store::Fs).await;
    // Each worker process talks to a fake API of its own, so the test knows which one took the
    // poison job: it hangs that worker, which is then killed (as an out-of-memory kill would).
    let other = FakeApi::new(FakeOptions::default()).start().await.unwrap();
    let fakes = [env.fake(), &other.api];
    for fake in fakes {
        fake.set_latency(Duration::from_millis(50));
        fake.push_rule(rule(Some("poison"), Fault::Hang { secs: 120.0 }, None));
    }
    let urls = [env.fake.base_url(), other.base_url()];
    let data = tempfile::tempdir().unwrap();
    let spawn = |i: usize| {
        let vars = [
            ("IMAGEGEN__WORKER__CONCURRENCY", "4"),
            ("IMAGEGEN__PROVIDERS__OPENAI__BASE_URL", urls[i].as_str()),
        ];
        env.spawn_worker(data.path(), &vars)
    };
    let mut listener = env.listen().await;
    let jobs = 300;
    for i in 0..jobs {
        if i == 50 {
            env.publish(json!({"id": "poison", "prompt": "the poison job"}))
                .await;
        }
        env.publish(json!({"id": format!("m{i}"), "prompt": format!("mixed job {i}")}))
            .await;
    }
    let mut workers = vec![spawn(0), spawn(1)];
    let mut poison_calls = [0, 0];
    let mut seen: HashMap<String, CloudEvent> = HashMap::new();
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(150);
    while seen.len() < jobs + 1 {
        assert!(
            Instant::now() < deadline,
            "{} of {} jobs ended after {kills} kills",
            seen.len(),
            jobs + 1
        );
        for i in 0..2 {
            let calls = fakes[i].calls_for("poison");
            if calls > poison_calls[i] {
                poison_calls[i] = calls;
                workers[i].kill().unwrap();
                workers[i].wait().unwrap();
                kills += 1;
                workers[i] = spawn(i);
            }
        }
        if let Some(event) = listener.next(Duration::from_millis(200)).await.unwrap() {
            if let Some(earlier) = seen.get(&event.data.job_id) {
                assert_eq!(earlier, &event, "a republished event is identical");
            }
            seen.insert(event.data.job_id.clone(), event);
        }
    }
    for w in workers {
        stop_process(w).await;
    }
    let poison = &seen["poison"];
    assert_eq!(poison.data.status, Status::Failed);
    assert!(
        poison
            .data
            .error
            .as_ref()
            .unwrap()
            .message
            .contains("poison"),
        "{poison:?}"
    );
    assert!(kills >= 2, "{kills}");
    env.wait_dead_letters(1, WAIT).await;
    let failed: Vec<_> = seen
        .values()
        .filter(|e| e.data.job_id != "poison" && e.data.status != Status::Succeeded)
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    let billed = (env.fake().stats().billed + other.api.stats().billed) as usize;
    let held = prefetch_at(4);
    assert!(
        billed >= jobs && billed <= jobs + kills * held,
        "{billed} billed for {jobs} jobs after {kills} kills"
    );
    env.cleanup().await;
}

/// Files below `dir`.
fn walk(dir: &std::path::Path) -> usize {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| {
                    if e.path().is_dir() {
                        walk(&e.path())
                    } else {
                        1
                    }
                })
                .sum()
        })
        .unwrap_or(0)
}

/// The prefetch of a worker of one provider at `concurrency`: the messages it holds at once.
fn prefetch_at(concurrency: usize) -> usize {
    imagegen::config::Settings::load_with_overrides(
        &imagegen::config::Sources::default(),
        &[("worker.concurrency", concurrency.to_string())],
    )
    .expect("settings")
    .prefetch() as usize
}

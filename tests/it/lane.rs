//! The batch lane end to end, on the real broker and store, against the fake's Files and Batch
//! APIs: jobs recorded and their messages settled, gathered into input files by one collector,
//! bought in provider batches at the batch price, and split into one event per job; expiry and
//! cancellation; the collector role moving to another worker; two collectors at once.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use imagegen::domain::error::ErrorKind;
use imagegen::domain::event::{CloudEvent, Status};
use serde_json::{Value, json};

use crate::helpers::{Store, TestEnv, assert_valid, event_json};

const WAIT: Duration = Duration::from_secs(60);

/// Lane settings for tests: a fast collector, files closed at once.
fn lane(extra: &[(&'static str, &str)]) -> Vec<(&'static str, String)> {
    let mut settings = vec![
        ("lane.provider", "openai".to_string()),
        ("lane.tick_secs", "1".into()),
        ("lane.poll_secs", "1".into()),
        ("lane.file_max_age_secs", "0".into()),
    ];
    settings.extend(extra.iter().map(|(k, v)| (*k, v.to_string())));
    settings
}

fn jobs(batch: &str, n: usize, prompt: &str) -> Vec<Value> {
    (0..n)
        .map(|i| {
            json!({"id": format!("j{i:05}"), "batch": batch, "prompt": format!("{prompt} {i}"),
                "lane": "batch", "size": "1024x1024", "quality": "low"})
        })
        .collect()
}

/// Every event by job, checking that a job's events (at least once) are all the same event.
fn by_job(events: Vec<CloudEvent>) -> BTreeMap<String, CloudEvent> {
    let mut out: BTreeMap<String, CloudEvent> = BTreeMap::new();
    for e in events {
        if let Some(first) = out.get(&e.data.job_id) {
            assert_eq!(first.id, e.id, "a job's events are one event");
        } else {
            out.insert(e.data.job_id.clone(), e);
        }
    }
    out
}

/// Waits until `n` distinct jobs have an event.
async fn outcomes(
    env: &TestEnv,
    listener: &mut imagegen::amqp::results::ResultListener,
    n: usize,
) -> BTreeMap<String, CloudEvent> {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut all = Vec::new();
    loop {
        let jobs: BTreeSet<&str> = all
            .iter()
            .map(|e: &CloudEvent| e.data.job_id.as_str())
            .collect();
        if jobs.len() >= n {
            break;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match listener.next(left).await.expect("listener") {
            Some(e) => all.push(e),
            None => panic!("only {} of {n} jobs ended within {WAIT:?}", jobs.len()),
        }
    }
    let _ = env;
    by_job(all)
}

#[tokio::test]
async fn a_lane_run_of_2000_jobs_buys_each_once_in_batches_at_the_batch_price() {
    let env = TestEnv::with(
        Store::S3,
        &lane(&[
            ("lane.file_max_requests", "700"),
            ("worker.concurrency", "8"),
        ]),
    )
    .await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish_many(jobs("night", 2000, "a lane lantern"))
        .await;
    let events = outcomes(&env, &mut listener, 2000).await;
    assert_eq!(events.len(), 2000);
    let stats = env.fake().batch_stats();
    // 2000 jobs, files of at most 700: at least three provider batches, none twice.
    assert!(stats.batches_created >= 3, "{stats:?}");
    assert_eq!(stats.batches_cancelled, 0, "{stats:?}");
    assert_eq!(stats.lines_billed, 2000, "each job bought once: {stats:?}");
    assert_eq!(env.fake().stats().requests, 0, "no live call");
    let mut provider_batches = BTreeSet::new();
    let store = env.store().await;
    for (i, event) in events.values().enumerate() {
        assert_eq!(
            event.data.status,
            Status::Succeeded,
            "{:?}",
            event.data.error
        );
        assert_eq!(event.data.lane.as_deref(), Some("batch"));
        let pb = event
            .data
            .provider_batch
            .clone()
            .expect("its provider batch");
        provider_batches.insert(pb);
        assert_eq!(event.data.images.len(), 1);
        if i % 250 == 0 {
            assert_valid("result-event.schema.json", &event_json(event));
            let bytes = store.get(&event.data.images[0].key).await.unwrap();
            assert!(bytes.expect("stored").starts_with(b"\x89PNG"));
        }
    }
    assert_eq!(provider_batches.len() as u64, stats.batches_created);
    // Once split, the batches' files are deleted at the provider.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let left: Vec<Value> = env
            .fake()
            .stored_files()
            .into_iter()
            .filter(|f| matches!(f["purpose"].as_str(), Some("batch" | "batch_output")))
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "left at the provider: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The messages were settled once recorded: nothing waits in the jobs queue.
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 0);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_lane_job_costs_the_batch_share_of_the_live_price() {
    let env = TestEnv::with(Store::S3, &lane(&[])).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    // The same request, live and through the lane.
    env.publish(
        json!({"id": "live", "prompt": "a priced fox", "size": "1024x1024", "quality": "low"}),
    )
    .await;
    env.publish(json!({"id": "lane", "prompt": "a priced fox", "size": "1024x1024", "quality": "low", "lane": "batch"}))
        .await;
    let events = outcomes(&env, &mut listener, 2).await;
    let (live, lane) = (&events["live"], &events["lane"]);
    assert_eq!(live.data.lane, None);
    assert_eq!(lane.data.lane.as_deref(), Some("batch"));
    let (l, b) = (live.data.cost_usd.unwrap(), lane.data.cost_usd.unwrap());
    assert!(l > 0.0);
    assert!((b - l * 0.5).abs() < 1e-9, "live {l}, lane {b}");
    assert_eq!(env.fake().billed_for("a priced fox"), 2);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn an_expired_provider_batch_sends_its_unrun_jobs_back_live_and_buys_each_once() {
    let env = TestEnv::with(Store::S3, &lane(&[("lane.file_max_age_secs", "2")])).await;
    env.fake().expire_next_batches(1);
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish_many(jobs("exp", 40, "an expiring owl")).await;
    let events = outcomes(&env, &mut listener, 40).await;
    let stats = env.fake().batch_stats();
    assert_eq!(stats.batches_expired, 1, "{stats:?}");
    assert!(stats.lines_not_run > 0, "{stats:?}");
    let (lane, live): (Vec<_>, Vec<_>) = events.values().partition(|e| e.data.lane.is_some());
    assert!(events.values().all(|e| e.data.status == Status::Succeeded));
    assert_eq!(lane.len() as u64, stats.lines_billed);
    assert_eq!(live.len() as u64, stats.lines_not_run);
    // Each job bought once, in the batch or live; the jobs sent back did not return to the lane.
    assert_eq!(env.fake().billed_for("an expiring owl"), 40);
    assert_eq!(env.fake().stats().billed, stats.lines_not_run);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn with_unfinished_fail_an_expired_batch_fails_its_unrun_jobs_to_the_dead_letters() {
    let env = TestEnv::with(Store::S3, &lane(&[("lane.unfinished", "fail")])).await;
    env.fake().expire_next_batches(1);
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish_many(jobs("expf", 20, "a failing owl")).await;
    let events = outcomes(&env, &mut listener, 20).await;
    let stats = env.fake().batch_stats();
    let failed: Vec<_> = events
        .values()
        .filter(|e| e.data.status == Status::Failed)
        .collect();
    assert_eq!(failed.len() as u64, stats.lines_not_run, "{stats:?}");
    assert!(!failed.is_empty());
    for f in &failed {
        assert_eq!(
            f.data.error.as_ref().unwrap().kind,
            ErrorKind::RetriesExhausted
        );
        assert_eq!(f.data.lane.as_deref(), Some("batch"));
    }
    env.wait_dead_letters(failed.len() as u32, WAIT).await;
    assert_eq!(env.fake().stats().requests, 0, "nothing was called live");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_cancelled_batch_cancels_its_provider_batch_before_it_runs() {
    let env = TestEnv::with(Store::S3, &lane(&[])).await;
    env.fake().hold_batches();
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish_many(jobs("cxl", 30, "a cancelled crow")).await;
    // Wait for the provider batch, then cancel the imagegen batch.
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.fake().batch_stats().batches_created == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no provider batch");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // `status` lists the open file and its provider batch's counts, as the collector saw them.
    let deadline = tokio::time::Instant::now() + WAIT;
    let lane_files = loop {
        let out = env
            .command()
            .args(["status", "--json"])
            .env("IMAGEGEN__LANE__PROVIDER", "openai")
            .output()
            .expect("status runs");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let status: Value = serde_json::from_slice(&out.stdout).expect("JSON");
        let files = status["lane_files"].as_array().cloned().unwrap_or_default();
        if files
            .iter()
            .any(|f| f["provider_batch"]["status"] == "validating")
        {
            break files;
        }
        assert!(tokio::time::Instant::now() < deadline, "status: {status}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let jobs_listed: u64 = lane_files.iter().map(|f| f["jobs"].as_u64().unwrap()).sum();
    assert!((1..=30).contains(&jobs_listed), "{lane_files:?}");
    assert!(lane_files.iter().all(|f| f["batch"] == "cxl"));
    let store = env.store().await;
    imagegen::storage::batches::cancel(&*store, &env.settings.storage.prefix, "cxl")
        .await
        .unwrap();
    let events = outcomes(&env, &mut listener, 30).await;
    env.fake().release_batches();
    for e in events.values() {
        assert_eq!(e.data.status, Status::Failed);
        assert_eq!(e.data.error.as_ref().unwrap().kind, ErrorKind::Cancelled);
    }
    let stats = env.fake().batch_stats();
    assert!(stats.batches_created >= 1, "{stats:?}");
    assert_eq!(stats.batches_cancelled, stats.batches_created, "{stats:?}");
    assert_eq!(stats.lines_billed, 0);
    assert_eq!(env.fake().billed_for("a cancelled crow"), 0);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn the_collector_role_moves_to_another_worker_when_its_holder_stops() {
    let env = TestEnv::with(Store::S3, &lane(&[("lane.file_max_age_secs", "2")])).await;
    env.fake().hold_batches();
    let mut listener = env.listen().await;
    let first = env.start_worker().await;
    env.publish_many(jobs("move", 50, "a moving heron")).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while env.fake().batch_stats().batches_created == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no provider batch");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The first worker goes; the second takes the role and ends the run.
    let second = env.start_worker().await;
    first.shutdown().await.unwrap();
    env.fake().release_batches();
    let events = outcomes(&env, &mut listener, 50).await;
    assert!(events.values().all(|e| e.data.status == Status::Succeeded));
    let stats = env.fake().batch_stats();
    let provider_batches: BTreeSet<_> = events
        .values()
        .filter_map(|e| e.data.provider_batch.clone())
        .collect();
    assert_eq!(
        stats.batches_created,
        provider_batches.len() as u64,
        "{stats:?}"
    );
    assert_eq!(stats.batches_cancelled, 0, "{stats:?}");
    assert_eq!(stats.lines_billed, 50);
    second.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn two_collectors_at_once_leave_one_provider_batch_running_per_job() {
    let env = TestEnv::with(Store::S3, &lane(&[])).await;
    env.fake().hold_batches();
    let mut listener = env.listen().await;
    // A worker records the jobs (its own collector too), then two more collectors act at the
    // same moments as it, as when the broker moves the role while the old holder still runs.
    let worker = env.start_worker().await;
    env.publish_many(jobs("twice", 60, "a doubled wren")).await;
    let deadline = tokio::time::Instant::now() + WAIT;
    let store = env.store().await;
    let open = imagegen::domain::keys::lane_open(&env.settings.storage.prefix, "openai");
    while imagegen::storage::list_all(&*store, &open, None)
        .await
        .unwrap()
        .len()
        < 60
        && env.fake().batch_stats().batches_created == 0
    {
        assert!(tokio::time::Instant::now() < deadline, "jobs not recorded");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let collector = crate::helpers::lane_collector(&env).await;
    let other = crate::helpers::lane_collector(&env).await;
    for _ in 0..4 {
        tokio::join!(collector.step(), other.step());
    }
    env.fake().release_batches();
    let events = outcomes(&env, &mut listener, 60).await;
    assert!(events.values().all(|e| e.data.status == Status::Succeeded));
    let stats = env.fake().batch_stats();
    // Whatever was created twice was cancelled before it ran: each job bought once.
    assert_eq!(stats.lines_billed, 60, "{stats:?}");
    assert_eq!(env.fake().billed_for("a doubled wren"), 60);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_with_a_far_deadline_goes_to_the_lane_by_itself_and_a_near_one_runs_live() {
    let env = TestEnv::with(
        Store::S3,
        &lane(&[("lane.route_deadline_after_secs", "172800")]),
    )
    .await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let in_days = |d: i64| {
        (time::OffsetDateTime::now_utc() + time::Duration::days(d))
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap()
    };
    env.publish(json!({"id": "far", "prompt": "a far deadline", "deadline": in_days(3)}))
        .await;
    env.publish(json!({"id": "near", "prompt": "a near deadline", "deadline": in_days(1)}))
        .await;
    // Asks for the lane, but its deadline leaves less than the window: live.
    env.publish(
        json!({"id": "hurry", "prompt": "a hurried one", "lane": "batch", "deadline": in_days(1)}),
    )
    .await;
    let events = outcomes(&env, &mut listener, 3).await;
    assert_eq!(events["far"].data.lane.as_deref(), Some("batch"));
    assert_eq!(events["near"].data.lane, None);
    assert_eq!(events["hurry"].data.lane, None);
    assert_eq!(env.fake().batch_stats().lines_billed, 1);
    assert_eq!(env.fake().stats().billed, 2);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn the_spend_cap_counts_a_file_at_the_batch_price_when_it_is_sent() {
    // Files of 10 jobs; one costs about $0.04 at the batch price: the second passes the cap.
    let env = TestEnv::with(
        Store::S3,
        &lane(&[
            ("lane.file_max_requests", "10"),
            ("lane.file_max_age_secs", "2"),
            ("budget.max_batch_usd", "0.03"),
        ]),
    )
    .await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish_many(jobs("capped", 20, "a capped crane")).await;
    let events = outcomes(&env, &mut listener, 20).await;
    let (ok, refused): (Vec<_>, Vec<_>) = events
        .values()
        .partition(|e| e.data.status == Status::Succeeded);
    assert_eq!(ok.len(), 10, "one file sent");
    assert_eq!(refused.len(), 10, "one file refused");
    for e in &refused {
        assert_eq!(
            e.data.error.as_ref().unwrap().kind,
            ErrorKind::BudgetExceeded
        );
    }
    assert_eq!(env.fake().batch_stats().lines_billed, 10);
    assert_eq!(env.fake().batch_stats().batches_created, 1);
    // Refused jobs are dead-lettered, to be replayed once the cap is raised.
    env.wait_dead_letters(10, WAIT).await;
    // The spend marker of the sent file, at the batch price.
    let store = env.store().await;
    let markers = imagegen::storage::list_all(
        &*store,
        &imagegen::domain::keys::spend_dir(&env.settings.storage.prefix, "capped"),
        None,
    )
    .await
    .unwrap();
    assert_eq!(markers.len(), 1, "{markers:?}");
    let spent: f64 = ok.iter().map(|e| e.data.cost_usd.unwrap()).sum();
    let (_, micros) =
        imagegen::domain::keys::parse_spend_marker(markers[0].rsplit('/').next().unwrap()).unwrap();
    let reserved = micros as f64 / 1e6;
    assert!(
        (reserved - spent).abs() < 0.005,
        "reserved {reserved}, spent {spent}"
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn lane_edits_name_their_references_by_file_ids_uploaded_once() {
    let env = TestEnv::with(Store::S3, &lane(&[("lane.file_max_age_secs", "2")])).await;
    let (plate_key, plate) = crate::helpers::stored_png(&env, "plate.png", 64, [200, 40, 40]).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let edits = (0..3).map(|i| {
        json!({"version": 3, "id": format!("e{i}"), "batch": "art", "prompt": format!("repaint the plate {i}"),
            "images": [plate_key], "lane": "batch"})
    });
    env.publish_many(edits.chain(jobs("art", 2, "a plain sketch")))
        .await;
    let events = outcomes(&env, &mut listener, 5).await;
    for e in events.values() {
        assert_eq!(e.data.status, Status::Succeeded, "{:?}", e.data.error);
        assert_eq!(e.data.lane.as_deref(), Some("batch"));
    }
    assert_eq!(events["e0"].data.references, vec![plate_key.clone()]);
    // Each edit line named the plate by file id: the fake read the same bytes for each.
    let seen = env.fake().edits();
    assert_eq!(seen.len(), 3, "{seen:?}");
    for edit in &seen {
        assert_eq!(edit.images, vec![imagegen_fakes::digest(&plate)]);
    }
    // One upload of the plate, whatever the number of jobs using it.
    let vision: Vec<_> = env
        .fake()
        .stored_files()
        .into_iter()
        .filter(|f| f["purpose"] == "vision")
        .collect();
    assert_eq!(vision.len(), 1, "{vision:?}");
    // Edits and generations go in files of their own.
    let endpoints: BTreeSet<String> = env
        .fake()
        .batches()
        .iter()
        .filter_map(|b| b["endpoint"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        endpoints,
        BTreeSet::from([
            "/v1/images/edits".to_string(),
            "/v1/images/generations".to_string()
        ])
    );
    assert_eq!(env.fake().stats().requests, 0, "no live call");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_provider_batch_that_fails_validation_sends_every_job_back_live() {
    let env = TestEnv::with(Store::S3, &lane(&[("lane.file_max_age_secs", "2")])).await;
    env.fake().fail_next_batches(1);
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish_many(jobs("bad", 12, "an invalid file")).await;
    let events = outcomes(&env, &mut listener, 12).await;
    let stats = env.fake().batch_stats();
    assert_eq!(stats.batches_failed, 1, "{stats:?}");
    // The failed batch ran nothing: the jobs it held were bought live, once each.
    let live = events.values().filter(|e| e.data.lane.is_none()).count() as u64;
    assert!(live >= 1);
    assert!(events.values().all(|e| e.data.status == Status::Succeeded));
    assert_eq!(live + stats.lines_billed, 12);
    assert_eq!(env.fake().stats().billed, live);
    assert_eq!(env.fake().billed_for("an invalid file"), 12);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn refused_and_invalid_lines_fail_with_the_kinds_of_live_jobs() {
    use imagegen_fakes::openai::Fault;
    let env = TestEnv::with(Store::S3, &lane(&[("lane.file_max_age_secs", "2")])).await;
    env.fake()
        .push_rule(crate::helpers::rule("refuse me", Fault::Moderation, None));
    env.fake().push_rule(crate::helpers::rule(
        "break me",
        Fault::InvalidRequest {
            param: Some("size".into()),
        },
        None,
    ));
    env.fake().push_rule(crate::helpers::rule(
        "overload me",
        Fault::ServerError { status: 500 },
        Some(1),
    ));
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let job = |id: &str, prompt: &str| json!({"id": id, "batch": "kinds", "prompt": prompt, "lane": "batch"});
    env.publish_many([
        job("ok", "a fine heron"),
        job("refused", "refuse me please"),
        job("invalid", "break me please"),
        job("flaky", "overload me once"),
    ])
    .await;
    let events = outcomes(&env, &mut listener, 4).await;
    assert_eq!(events["ok"].data.status, Status::Succeeded);
    let kind = |id: &str| events[id].data.error.as_ref().map(|e| e.kind);
    assert_eq!(kind("refused"), Some(ErrorKind::ContentPolicy));
    assert_eq!(kind("invalid"), Some(ErrorKind::InvalidRequest));
    for id in ["refused", "invalid"] {
        let e = &events[id];
        assert_eq!(e.data.lane.as_deref(), Some("batch"));
        assert!(e.data.provider_request_id.is_some(), "{e:?}");
        assert_eq!(e.data.error.as_ref().unwrap().provider_status, Some(400));
    }
    // A server error in a line is worth a retry: the job is called live, and succeeds.
    assert_eq!(events["flaky"].data.status, Status::Succeeded);
    assert_eq!(events["flaky"].data.lane, None);
    assert_eq!(
        env.fake().stats().billed,
        1,
        "only the flaky job was called live"
    );
    // Refused and invalid jobs are dead-lettered, as live ones are.
    env.wait_dead_letters(2, WAIT).await;
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

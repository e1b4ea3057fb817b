//! The batch lane's collector killed (`kill -9`) at each of its steps: while jobs are being
//! recorded, while an input file is being uploaded, while its provider batch is being created,
//! and while the batch's output is being split. Another worker takes the role and ends the run:
//! no job lost, each job's event published (at least once, always the same event), each job
//! bought once, no second provider batch left running.

use std::collections::BTreeMap;
use std::time::Duration;

use imagegen::domain::event::{CloudEvent, Status};
use serde_json::json;

use crate::helpers::{Store, TestEnv};

const JOBS: usize = 60;
const WAIT: Duration = Duration::from_secs(90);

/// Where the first collector is killed.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Step {
    Recording,
    Upload,
    Create,
    Split,
}

fn lane_vars() -> Vec<(&'static str, &'static str)> {
    vec![
        ("IMAGEGEN__LANE__PROVIDER", "openai"),
        ("IMAGEGEN__LANE__TICK_SECS", "1"),
        ("IMAGEGEN__LANE__POLL_SECS", "1"),
        ("IMAGEGEN__LANE__FILE_MAX_AGE_SECS", "1"),
        ("IMAGEGEN__LANE__CHECKPOINT_LINES", "10"),
        ("IMAGEGEN__LANE__SPLIT_CONCURRENCY", "2"),
    ]
}

async fn wait_for(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !ready() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn killed_at(step: Step) {
    let env = TestEnv::new(Store::Fs).await;
    let root = env.settings.storage.root.clone();
    let fake = env.fake().clone();
    match step {
        Step::Upload => fake.hang_next_uploads(1, Duration::from_secs(30)),
        Step::Create => fake.hang_next_creates(1, Duration::from_secs(30)),
        Step::Split => fake.slow_content(Duration::from_millis(100)),
        Step::Recording => {}
    }
    let mut listener = env.listen().await;
    let vars = lane_vars();
    let first = env.spawn_worker(&root, &vars);
    env.wait_consumers(1).await;
    let jobs = (0..JOBS).map(|i| {
        json!({"id": format!("c{i:03}"), "batch": "crash", "prompt": format!("a crashing kite {i}"),
            "lane": "batch"})
    });
    env.publish_many(jobs).await;
    let mut events: Vec<CloudEvent> = Vec::new();
    match step {
        Step::Recording => {
            // Some jobs recorded, not all.
            wait_for("jobs recorded", || count_files(&root, "lane.json") >= 5).await;
        }
        Step::Upload => wait_for("an upload", || fake.batch_stats().files_uploaded >= 1).await,
        Step::Create => wait_for("a create", || fake.batch_stats().batches_created >= 1).await,
        Step::Split => {
            // Some events published, not all.
            while events.len() < 10 {
                let e = listener
                    .next(WAIT)
                    .await
                    .expect("listener")
                    .expect("an event");
                events.push(e);
            }
        }
    }
    let status = stop_process_now(first).await;
    assert!(!status.success(), "the collector was killed");
    let second = env.spawn_worker(&root, &vars);
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut by_job: BTreeMap<String, CloudEvent> = BTreeMap::new();
    for e in events {
        by_job.entry(e.data.job_id.clone()).or_insert(e);
    }
    while by_job.len() < JOBS {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let Some(e) = listener.next(left).await.expect("listener") else {
            panic!("{step:?}: only {} of {JOBS} jobs ended", by_job.len());
        };
        if let Some(first) = by_job.get(&e.data.job_id) {
            assert_eq!(first.id, e.id, "{step:?}: a job's events are one event");
        }
        by_job.entry(e.data.job_id.clone()).or_insert(e);
    }
    for e in by_job.values() {
        assert_eq!(
            e.data.status,
            Status::Succeeded,
            "{step:?}: {:?}",
            e.data.error
        );
        assert_eq!(e.data.lane.as_deref(), Some("batch"));
    }
    let stats = fake.batch_stats();
    // Each job bought once, by the lane; a second batch of a file never ran.
    assert_eq!(stats.lines_billed, JOBS as u64, "{step:?}: {stats:?}");
    assert_eq!(fake.billed_for("a crashing kite"), JOBS as u64, "{step:?}");
    assert_eq!(fake.stats().requests, 0, "{step:?}: no live call");
    let running = fake
        .batches()
        .iter()
        .filter(|b| !matches!(b["status"].as_str(), Some("completed" | "cancelled")))
        .count();
    assert_eq!(running, 0, "{step:?}: no provider batch left running");
    if step == Step::Create {
        // The batch created while its collector died was found, not created again.
        assert_eq!(stats.batches_created, 1, "{stats:?}");
    }
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 0);
    crate::helpers::stop_cleanly([second]).await;
    env.cleanup().await;
}

/// SIGKILL, then the exit status.
async fn stop_process_now(mut child: std::process::Child) -> std::process::ExitStatus {
    child.kill().expect("kill -9");
    tokio::task::spawn_blocking(move || child.wait().expect("wait"))
        .await
        .expect("join")
}

fn count_files(dir: &std::path::Path, name: &str) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| {
            let path = e.path();
            if path.is_dir() {
                count_files(&path, name)
            } else {
                usize::from(path.file_name().is_some_and(|n| n == name))
            }
        })
        .sum()
}

#[tokio::test]
async fn a_collector_killed_while_jobs_are_recorded_loses_none() {
    killed_at(Step::Recording).await;
}

#[tokio::test]
async fn a_collector_killed_during_an_upload_loses_none() {
    killed_at(Step::Upload).await;
}

#[tokio::test]
async fn a_collector_killed_while_creating_a_batch_leaves_one_batch() {
    killed_at(Step::Create).await;
}

#[tokio::test]
async fn a_collector_killed_mid_split_publishes_every_event() {
    killed_at(Step::Split).await;
}

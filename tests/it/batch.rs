//! Bulk work from the command line: CSV, templates and variations, watch, status, cancel,
//! deadlines.

use std::process::Stdio;
use std::time::Duration;

use imagegen::domain::error::ErrorKind;
use imagegen::domain::event::Status;
use imagegen_fakes::openai::{Fault, Rule};
use serde_json::{Value, json};

use crate::helpers::{Store, TestEnv};

const WAIT: Duration = Duration::from_secs(60);

fn lines(bytes: &[u8]) -> Vec<Value> {
    String::from_utf8_lossy(bytes)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[tokio::test]
async fn csv_with_a_template_and_variations_enqueues_the_cross_product_once() {
    let env = TestEnv::new(Store::Fs).await;
    let dir = tempfile::tempdir().unwrap();
    let csv = dir.path().join("scenes.csv");
    std::fs::write(
        &csv,
        "scene,size,n,team\ncastle,1536x1024,1,art\n\"harbour, at dawn\",,2,level\n",
    )
    .unwrap();
    let args = |extra: &[&str]| {
        let mut a = vec![
            "enqueue".to_string(),
            csv.display().to_string(),
            "--batch".into(),
            "levels".into(),
            "--template".into(),
            "pixel-art {scene}, {time}, {weather}".into(),
            "--vary".into(),
            "time=day,night".into(),
            "--vary".into(),
            "weather=clear,rain,snow".into(),
        ];
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    // The guard: 2 rows x 6 variations = 12 jobs.
    let guarded = env
        .command()
        .args(args(&["--max-jobs", "10"]))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&guarded.stderr);
    assert_eq!(guarded.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("12 jobs") && stderr.contains("--max-jobs"),
        "{stderr}"
    );

    let dry = env.command().args(args(&["--dry-run"])).output().unwrap();
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let jobs = lines(&dry.stdout);
    assert_eq!(jobs.len(), 12);
    assert!(String::from_utf8_lossy(&dry.stderr).contains("2 input rows x 6 variations"));
    assert_eq!(jobs[0]["prompt"], "pixel-art castle, day, clear");
    assert_eq!(jobs[0]["size"], "1536x1024");
    assert_eq!(
        jobs[0]["metadata"],
        json!({"scene": "castle", "team": "art", "time": "day", "weather": "clear"})
    );
    assert_eq!(
        jobs[11]["prompt"],
        "pixel-art harbour, at dawn, night, snow"
    );
    assert_eq!(jobs[11]["n"], 2);
    assert_eq!(
        env.ready(&env.settings.amqp.jobs_queue).await,
        0,
        "a dry run publishes nothing"
    );

    let published = env
        .command()
        .args(args(&["--yes", "--json"]))
        .output()
        .unwrap();
    assert!(
        published.status.success(),
        "{}",
        String::from_utf8_lossy(&published.stderr)
    );
    let summary = &lines(&published.stdout)[0];
    assert_eq!(summary["published"], 12);
    assert_eq!(summary["images"], 18);
    assert!(summary["estimated_usd"].as_f64().unwrap() > 0.0);
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 12);
    // The batch record holds every job, with the same ids as the dry run.
    let store = env.store().await;
    let record = imagegen::storage::batches::load(&*store, &env.settings.storage.prefix, "levels")
        .await
        .unwrap()
        .unwrap();
    let ids: Vec<&str> = jobs.iter().map(|j| j["id"].as_str().unwrap()).collect();
    assert_eq!(
        record.jobs.keys().map(String::as_str).collect::<Vec<_>>(),
        {
            let mut sorted = ids.clone();
            sorted.sort();
            sorted
        }
    );
    // The same input again: the same 12 ids, so no new paid work once they are done.
    let again = env.command().args(args(&["--dry-run"])).output().unwrap();
    assert_eq!(
        lines(&again.stdout)
            .iter()
            .map(|j| j["id"].clone())
            .collect::<Vec<_>>(),
        jobs.iter().map(|j| j["id"].clone()).collect::<Vec<_>>()
    );
    env.cleanup().await;
}

#[tokio::test]
async fn watch_follows_a_batch_with_failures_before_and_after_the_run() {
    let env = TestEnv::new(Store::S3).await;
    env.fake().push_rule(Rule {
        prompt_contains: Some("forbidden".into()),
        fault: Fault::Moderation,
        times: None,
    });
    env.fake().set_latency(Duration::from_millis(200));
    let dir = env.enqueue_prompts(
        "watched",
        &[
            "a lighthouse",
            "a forbidden thing",
            "a meadow",
            "a forbidden place",
            "a comet",
        ],
    );
    // Watch starts before any worker.
    let out = dir.path().join("during");
    let watch = env
        .command()
        .args([
            "watch",
            "--batch",
            "watched",
            "--json",
            "--timeout",
            "60",
            "--out",
        ])
        .arg(&out)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let worker = env.start_worker().await;
    let watched = tokio::task::spawn_blocking(move || watch.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    let stderr = String::from_utf8_lossy(&watched.stderr);
    assert_eq!(
        watched.status.code(),
        Some(3),
        "failed jobs make exit code 3: {stderr}"
    );
    let summary = &lines(&watched.stdout)[0];
    assert_eq!(
        (
            summary["jobs"].as_u64(),
            summary["succeeded"].as_u64(),
            summary["failed"].as_u64()
        ),
        (Some(5), Some(3), Some(2))
    );
    let manifest = lines(&std::fs::read(out.join("manifest-watched.jsonl")).unwrap());
    assert_eq!(manifest.len(), 5);
    for row in &manifest {
        let forbidden = row["prompt"].as_str().unwrap().contains("forbidden");
        if forbidden {
            assert_eq!(row["status"], "failed", "{row}");
            assert_eq!(row["error_kind"], "content_policy");
            assert!(row["images"].as_array().unwrap().is_empty());
        } else {
            assert_eq!(row["status"], "succeeded", "{row}");
            let uri = row["images"][0].as_str().unwrap();
            assert!(uri.starts_with("s3://imagegen-dev/"), "{uri}");
            assert!(row["cost_usd"].as_f64().unwrap() > 0.0);
        }
    }
    let csv = std::fs::read_to_string(out.join("manifest-watched.csv")).unwrap();
    assert_eq!(csv.lines().count(), 6, "{csv}");
    assert!(csv.starts_with("job_id,prompt,status,images,error_kind,error,cost_usd"));
    worker.shutdown().await.unwrap();

    // After the run, on "another machine": the stored records alone give the same manifest.
    let after = dir.path().join("after");
    let again = env
        .command()
        .args(["watch", "--batch", "watched", "--timeout", "30", "--out"])
        .arg(&after)
        .output()
        .unwrap();
    assert_eq!(
        again.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(
        lines(&std::fs::read(after.join("manifest-watched.jsonl")).unwrap()),
        manifest
    );
    // status agrees.
    let status = env
        .command()
        .args(["status", "--batch", "watched", "--json"])
        .output()
        .unwrap();
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    let status = &lines(&status.stdout)[0];
    let b = &status["batches"][0];
    assert_eq!(
        (
            b["jobs"].as_u64(),
            b["succeeded"].as_u64(),
            b["failed"].as_u64(),
            b["pending"].as_u64()
        ),
        (Some(5), Some(3), Some(2), Some(0))
    );
    let jobs_queue = status["queues"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["queue"] == env.settings.amqp.jobs_queue.as_str())
        .unwrap();
    assert_eq!(jobs_queue["messages"], 0);
    // No watch queue is left behind.
    assert!(!status["queues"].to_string().contains(".watch."));
    env.cleanup().await;
}

#[tokio::test]
async fn a_cancelled_batch_and_an_expired_job_end_without_provider_calls() {
    let env = TestEnv::new(Store::Fs).await;
    let _prompts = env.enqueue_prompts("doomed", &["cancel one", "cancel two", "cancel three"]);
    let cancelled = env
        .command()
        .args(["cancel", "--batch", "doomed"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&cancelled.stderr);
    assert!(cancelled.status.success(), "{stderr}");
    assert!(stderr.contains("3 unfinished jobs"), "{stderr}");
    env.publish(json!({"id": "late", "prompt": "expired job", "deadline": "2020-01-01T00:00:00Z"}))
        .await;
    env.publish(
        json!({"id": "timely", "prompt": "timely job", "deadline": "2100-01-01T00:00:00Z"}),
    )
    .await;

    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let events = env.events(&mut listener, 5, WAIT).await;
    worker.shutdown().await.unwrap();
    for event in &events {
        let prompt_kind = match event.data.job_id.as_str() {
            "late" => Some(ErrorKind::Expired),
            "timely" => None,
            _ => Some(ErrorKind::Cancelled),
        };
        match prompt_kind {
            Some(kind) => {
                assert_eq!(event.data.status, Status::Failed);
                assert_eq!(event.data.error.as_ref().unwrap().kind, kind, "{event:?}");
                assert_eq!(event.data.attempts, 0);
            }
            None => assert_eq!(event.data.status, Status::Succeeded),
        }
    }
    assert_eq!(env.fake().calls_for("cancel"), 0);
    assert_eq!(env.fake().calls_for("expired"), 0);
    assert_eq!(env.fake().calls_for("timely"), 1);
    // Ended as asked: acknowledged, not dead-lettered.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(env.ready(&env.settings.amqp.dead_letter_queue).await, 0);
    env.cleanup().await;
}
